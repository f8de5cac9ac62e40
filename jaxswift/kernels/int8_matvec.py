"""The int8-weight matvec of CPU decoding, y[R, O] = x[R, I] @ codes[O, I].T * scale[O], as an XLA FFI custom call.

XLA:CPU has no int8-weight dot (quant/serving.py); int8_matvec.cc, beside this file, streams the int8 codes once,
converts them to float in registers and multiplies them into up to MAX_ROWS rows of float32 x, on the calling thread
and XLA's intra-op thread pool. It is compiled on first use with the machine's C++ compiler (`-march=native`: the
kernel uses AVX-512 or AVX2 when the machine has them) into a cache folder, then loaded and registered with XLA.

`matvec(x, codes, scale, fallback=...)` runs the kernel on CPU and `fallback` (plain JAX, same numbers up to float
summation order) everywhere else: on other platforms (chosen when the jitted function is lowered, so the same params
serve a GPU), with JAXSWIFT_INT8_KERNEL=0, and when the kernel cannot be built or loaded (no compiler, a failed
build, an unwritable cache): that reason is logged once, as a warning, and nothing is raised. docs/kernels.md.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxswift.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "JAXSWIFT_INT8_KERNEL"  # 0 / false / off: always the fallback; 1 / true / on (the default): the kernel on CPU
TARGET = "jaxswift_int8_matvec"
SOURCE = Path(__file__).with_name("int8_matvec.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
MAX_ROWS = 8  # the kernel's register tiles cover 1..8 rows: the decode step's, not prefill's
BUILD_TIMEOUT_S = 300
_SWITCH = {"0": False, "false": False, "off": False, "1": True, "true": True, "on": True}


class KernelUnavailable(Exception):
    """Why the kernel cannot run here; logged once, then the fallback runs."""


def enabled() -> bool:
    """JAXSWIFT_INT8_KERNEL, read each time a function is traced (so a test or a process can switch it)."""
    value = os.environ.get(ENV, "1").strip().lower()
    if value not in _SWITCH:
        raise ConfigError(f"{ENV}={os.environ[ENV]!r}: expected 0 (int8 decoding in plain XLA) or 1 (with the int8 "
                          "kernel on CPU, the default)")
    return _SWITCH[value]


def available() -> bool:
    """Whether `matvec` runs the kernel on CPU: enabled, and built and registered in this process."""
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    """None when `matvec` runs the kernel on CPU, else why it runs the fallback (logged once per reason)."""
    reason = f"{ENV}=0" if not enabled() else _load()
    if reason is not None:
        _note_once(reason)
    return reason


def matvec(x_RI, codes_OI, scale_O, *, fallback):
    """float32 [R, O] = x @ codes.T * scale: the kernel on CPU, `fallback(x, codes, scale)` elsewhere."""
    R, I = x_RI.shape
    if codes_OI.dtype != jnp.int8 or codes_OI.shape[1] != I or scale_O.shape != codes_OI.shape[:1]:
        raise ValueError(f"int8 matvec: expected x [R, I], int8 codes [O, I], scale [O]; got x {x_RI.shape}, codes "
                         f"{codes_OI.dtype}{list(codes_OI.shape)}, scale {list(scale_O.shape)}")
    if not 1 <= R <= MAX_ROWS or not available():
        return fallback(x_RI, codes_OI, scale_O)
    return jax.lax.platform_dependent(x_RI.astype(jnp.float32), codes_OI, scale_O.astype(jnp.float32),
                                      cpu=_custom_call, default=fallback)


def _custom_call(x_RI, codes_OI, scale_O):
    out = jax.ShapeDtypeStruct((x_RI.shape[0], codes_OI.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x_RI, codes_OI, scale_O)


@functools.cache
def _note_once(reason: str):
    if reason == f"{ENV}=0":
        log.info("int8 kernel off (%s): int8 decoding runs in plain XLA", reason)
    else:
        log.warning("int8 kernel unavailable, so int8 decoding runs in plain XLA (on CPU 2-3x slower than with the "
                    "kernel, no faster than float32): %s", reason)


@functools.cache
def _load() -> str | None:
    """Builds (or finds) the kernel and registers it with XLA; None when it is ready, else why not."""
    try:
        if jax.default_backend() != "cpu":
            raise KernelUnavailable(f"the default backend is {jax.default_backend()}; the kernel is for CPU")
        library = ctypes.cdll.LoadLibrary(str(build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.Int8Matvec), platform="cpu")
    except KernelUnavailable as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 -- a library that does not load or register: the fallback, said why
        return f"{type(e).__name__} while loading the kernel: {e}"
    return None


def build(flags: tuple[str, ...] = FLAGS) -> Path:
    """The compiled kernel in the cache folder, compiled now unless a build for this source, flags, compiler, jaxlib
    and CPU is there. Concurrent builds (pytest-xdist workers) each write a private file and rename it into place, so
    a reader never sees a partial library."""
    compiler = _compiler()
    folder = cache_folder()
    target = folder / f"int8_matvec-{_build_key(compiler, flags)}.so"
    if target.exists():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".so", dir=folder)
        os.close(fd)
    except OSError as e:
        raise KernelUnavailable(f"cannot write the kernel cache folder {folder}: {e}") from e
    try:
        _compile(compiler, flags, Path(partial))
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def cache_folder() -> Path:
    """$XDG_CACHE_HOME/jaxswift/kernels (~/.cache/jaxswift/kernels without it)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "jaxswift" / "kernels"


def _compiler() -> str:
    name = os.environ.get("CXX") or "g++"
    found = shutil.which(name)
    if found is None:
        raise KernelUnavailable(f"no C++ compiler: {name!r} (from $CXX, default g++) is not on PATH; install g++ "
                                f"(apt-get install g++) or set {ENV}=0 to silence this")
    return found


def _compile(compiler: str, flags: tuple[str, ...], out: Path):
    command = [compiler, *flags, "-isystem", jax.ffi.include_dir(), "-o", str(out), str(SOURCE)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelUnavailable(f"{' '.join(command)} did not run: {e}") from e
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise KernelUnavailable(f"{' '.join(command)} failed (exit {done.returncode}):\n{tail}")


def _build_key(compiler: str, flags: tuple[str, ...]) -> str:
    """What the binary depends on: the source, flags, compiler, jaxlib (the FFI headers) and the CPU (-march=native)."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelUnavailable(f"{compiler} --version did not run: {e}") from e
    parts = [SOURCE.read_bytes(), " ".join(flags).encode(), version.encode(),
             importlib.metadata.version("jaxlib").encode(), _cpu_identity().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _cpu_identity() -> str:
    """The machine and its CPU's model and feature flags, which -march=native compiles for."""
    lines = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")) and line not in lines:
                    lines.append(line)
                if line.strip() == "":  # the first processor's block is enough
                    break
    except OSError:
        pass
    return platform.machine() + platform.processor() + "".join(lines)
