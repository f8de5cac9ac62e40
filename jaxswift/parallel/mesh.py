"""Device meshes from the `--mesh` flag: `4x2` (data x tensor), `2x2x2` (data x fsdp x tensor), or named
`data=2,fsdp=2,tensor=2`. Axes not named have size 1, so every mesh has all six axes."""

from __future__ import annotations

import math
import os
import re

from jaxswift.errors import ConfigError

MESH_AXES = ("data", "fsdp", "stage", "sequence", "expert", "tensor")
_POSITIONAL = {1: ("data",), 2: ("data", "tensor"), 3: ("data", "fsdp", "tensor")}


def parse_mesh(spec: str | None) -> dict[str, int]:
    """'4x2' -> {'data': 4, 'tensor': 2, others: 1}; None/'' -> all devices on `data` (filled in later as -1)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    if not spec:
        sizes["data"] = -1
        return sizes
    spec = spec.strip()
    if "=" in spec:
        for part in spec.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in MESH_AXES:
                raise ConfigError(f"--mesh {spec!r}: unknown axis {name!r} (axes: {', '.join(MESH_AXES)})")
            if not value.strip().isdigit() or int(value) < 1:
                raise ConfigError(f"--mesh {spec!r}: size of {name!r} must be a positive integer, got {value!r}")
            sizes[name] = int(value)
        return sizes
    if not re.fullmatch(r"\d+(x\d+){0,2}", spec):
        raise ConfigError(f"--mesh {spec!r}: expected DATAxTENSOR like 4x2, DATAxFSDPxTENSOR like 2x2x2, "
                          f"or named sizes like data=2,fsdp=2,tensor=2")
    values = [int(v) for v in spec.split("x")]
    if min(values) < 1:
        raise ConfigError(f"--mesh {spec!r}: sizes must be >= 1")
    sizes.update(zip(_POSITIONAL[len(values)], values))
    return sizes


def mesh_device_count(sizes: dict[str, int]) -> int:
    return math.prod(v for v in sizes.values() if v > 0)


def ensure_cpu_devices(spec: str | None, num_processes: int = 1) -> None:
    """Before JAX starts: on a CPU-only machine, ask XLA for as many virtual devices as the mesh needs. The mesh
    counts global devices: each of `num_processes` processes gets mesh size / num_processes of them."""
    needed = mesh_device_count(parse_mesh(spec)) if spec else 1
    if num_processes > 1 and spec:
        if needed % num_processes:
            raise ConfigError(f"--mesh {spec!r}: its {needed} devices cannot be split evenly over "
                              f"--num_processes {num_processes} processes")
        needed //= num_processes
    if needed <= 1 or "jax" in __import__("sys").modules and _backend_started():
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and "cpu" not in platforms:
        return
    if not _has_accelerator():
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={needed}".strip()


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge._backends)
    except Exception:  # private API moved: assume not started
        return False


def _has_accelerator() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin",
                                                                  "libtpu", "jax_rocm60_plugin"))


def make_mesh(spec: str | None, devices=None):
    """A jax.sharding.Mesh with all six named axes."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = list(devices if devices is not None else jax.devices())
    sizes = parse_mesh(spec)
    if sizes["data"] == -1:
        sizes["data"] = len(devices)
    needed = mesh_device_count(sizes)
    if needed > len(devices):
        raise ConfigError(f"--mesh {spec or '(default)'} needs {needed} devices "
                          f"({' x '.join(f'{k}={v}' for k, v in sizes.items() if v > 1) or '1'}), "
                          f"but {len(devices)} are available")
    if needed < len(devices) and jax.process_count() > 1:
        raise ConfigError(f"--mesh {spec}: uses {needed} of the {len(devices)} devices of a "
                          f"{jax.process_count()}-process job; a multi-process mesh must span every device")
    devices = devices[:needed]  # a smaller mesh than the machine is fine (e.g. one device of eight)
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
