"""The int8 decode kernel (jaxswift/kernels/int8_matvec.cc, an XLA FFI custom call): its numbers against a float64
reference, its place in jitted and unrolled decode code (reading the codes in place), its build (cached, atomic,
lazily), the fallback to plain XLA and why it is taken, and int8 serving's output projection.

The kernel is built once per session (the `kernel` fixture); a machine that cannot build it fails here rather than
skipping: CI installs g++ (.ci/run). Decode speed lives in benchmarks/serve_quant.py.
"""

import concurrent.futures
import logging
import re
import stat
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxswift
from jaxswift.errors import ConfigError
from jaxswift.kernels import int8_matvec
from jaxswift.models.config import ModelConfig
from jaxswift.models.spec import init_params
from jaxswift.models.transformer import forward, init_cache, output_weight, unstack_layers
from jaxswift.quant.serving import (RowInt8Weight, blocked_matmul, inference_params, reduce_matmul, row_int8,
                                    xla_matvec)

CALL = f'custom_call_target="{int8_matvec.TARGET}"'


@pytest.fixture(scope="module")
def kernel():
    reason = int8_matvec.unavailable_reason()
    assert reason is None, f"the int8 kernel did not build or load on this machine: {reason}"


@pytest.fixture
def reload_kernel():
    """Lets a test change how the kernel loads (compiler, cache folder); the next test loads it afresh."""
    int8_matvec._load.cache_clear()
    yield
    int8_matvec._load.cache_clear()


def random_int8(rng, O, I):
    codes = rng.integers(-128, 128, (O, I)).astype(np.int8)
    codes.flat[:2] = (-128, -127)  # the extremes of the codes
    codes.flat[-1] = 127
    scale = (rng.random(O) + 0.5).astype(np.float32) / 100
    return codes, scale


def reference(x, codes, scale):
    return (x.astype(np.float64) @ codes.T.astype(np.float64)) * scale.astype(np.float64)


def kernel_matvec(x, codes, scale):
    return int8_matvec.matvec(x, codes, scale, fallback=xla_matvec)


def fresh(fn):
    """A new jitted function, traced anew: the kernel-or-fallback choice is made when a function is traced."""
    return jax.jit(lambda *args: fn(*args))


def custom_calls(fn, *args) -> int:
    return fresh(fn).lower(*args).compile().as_text().count(CALL)


# ---------------------------------------------------------------- numbers

@pytest.mark.parametrize("rows", range(1, 9))
def test_kernel_equals_a_float64_reference(kernel, rows):
    """Odd sizes: I not a multiple of 16 (the vector width) nor O of the 4-channel tiles or of the thread split;
    the last weight (2 MB) is past the size where the kernel splits its channels over threads."""
    rng = np.random.default_rng(rows)
    run = jax.jit(kernel_matvec)
    for O, I in [(1, 1), (5, 3), (37, 17), (131, 577), (1029, 99), (2053, 1031)]:
        codes, scale = random_int8(rng, O, I)
        x = rng.standard_normal((rows, I)).astype(np.float32)
        np.testing.assert_allclose(np.asarray(run(x, codes, scale)), reference(x, codes, scale), rtol=1e-5,
                                   atol=1e-6 * np.abs(reference(x, codes, scale)).max())
    assert custom_calls(kernel_matvec, x, codes, scale) == 1  # the kernel ran, not the fallback


def test_the_avx2_and_plain_loops_equal_the_reference_too(kernel):
    """The kernel's other compile-time paths, for machines without AVX-512: built here with those instruction sets
    turned off (cached like the native build), each registered under a name of its own."""
    import ctypes

    variants = {"avx2": ("-mno-avx512f",), "plain": ("-mno-avx512f", "-mno-avx2", "-mno-fma")}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        built = dict(zip(variants, pool.map(lambda extra: int8_matvec.build((*int8_matvec.FLAGS, *extra)),
                                            variants.values())))
    rng = np.random.default_rng(9)
    for name, path in built.items():
        target = f"{int8_matvec.TARGET}_{name}"
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(ctypes.cdll.LoadLibrary(str(path)).Int8Matvec))
        for rows, (O, I) in [(1, (37, 17)), (3, (131, 577)), (8, (2053, 1031))]:
            codes, scale = random_int8(rng, O, I)
            x = rng.standard_normal((rows, I)).astype(np.float32)
            y = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows, O), jnp.float32))(x, codes, scale)
            np.testing.assert_allclose(np.asarray(y), reference(x, codes, scale), rtol=1e-5,
                                       atol=1e-6 * np.abs(reference(x, codes, scale)).max(), err_msg=name)


def test_kernel_rejects_rows_it_has_no_tiles_for(kernel):
    """matvec sends more than MAX_ROWS rows to the fallback; the custom call itself refuses them with a message."""
    codes, scale = random_int8(np.random.default_rng(0), 8, 16)
    with pytest.raises(Exception, match=r"expected x \[R, I\] with 1 <= R <= 8"):
        jax.jit(int8_matvec._custom_call)(jnp.ones((9, 16)), codes, scale).block_until_ready()
    assert custom_calls(kernel_matvec, jnp.ones((9, 16)), codes, scale) == 0


def test_kernel_inside_unrolled_layers_reads_each_weight_in_place(kernel):
    """Three int8 weights chained in one jitted function (decoding's unrolled layers): three custom calls whose
    codes operands are the parameters themselves (no copy, transpose or conversion of an int8 array first)."""
    rng = np.random.default_rng(3)
    layers = [row_int8(jnp.asarray(rng.standard_normal((1, 96, 96)).astype(np.float32) / 10), 1) for _ in range(3)]
    layers = [jax.tree.map(lambda a: a[0], q) for q in layers]
    x = jnp.asarray(rng.standard_normal((2, 1, 96)).astype(np.float32))

    def unrolled(layers, x):
        for q in layers:
            x = jnp.tanh(q.apply("BTD,DF->BTF", x))
        return x

    ref = np.asarray(x, np.float64)
    for q in layers:
        ref = np.tanh(reference(ref[:, 0], np.asarray(q.codes), np.asarray(q.scale)))[:, None]
    np.testing.assert_allclose(np.asarray(jax.jit(unrolled)(layers, x)), ref, rtol=1e-5, atol=1e-6)
    hlo = jax.jit(unrolled).lower(layers, x).compile().as_text()
    assert hlo.count(CALL) == 3
    assert not re.search(r"s8\[\d+,\d+\]\{[01],[01]\} (copy|transpose|fusion)\(", hlo), "an int8 weight was copied"


def test_the_same_function_lowered_for_a_gpu_runs_the_fallback(kernel):
    """The choice is made per platform when lowering (jax.lax.platform_dependent): code traced where the kernel
    runs still lowers for CUDA, without the CPU-only custom call."""
    fn = jax.jit(kernel_matvec)
    args = (jnp.ones((1, 64)), jnp.ones((32, 64), jnp.int8), jnp.ones(32))
    unchecked = [jax.export.DisabledSafetyCheck.custom_call(int8_matvec.TARGET)]
    calls = {platform: jax.export.export(fn, platforms=[platform], disabled_checks=unchecked)(*args).mlir_module()
             .count(f"stablehlo.custom_call @{int8_matvec.TARGET}") for platform in ("cpu", "cuda")}
    assert calls == {"cpu": 1, "cuda": 0}


# ---------------------------------------------------------------- the fallback

def test_env_var_turns_the_kernel_off_with_the_same_numbers(kernel, monkeypatch):
    rng = np.random.default_rng(4)
    codes, scale = random_int8(rng, 67, 45)
    x = rng.standard_normal((3, 45)).astype(np.float32)
    with_kernel = np.asarray(jax.jit(kernel_matvec)(x, codes, scale))
    monkeypatch.setenv(int8_matvec.ENV, "0")
    assert not int8_matvec.available() and custom_calls(kernel_matvec, x, codes, scale) == 0
    np.testing.assert_allclose(np.asarray(fresh(kernel_matvec)(x, codes, scale)), with_kernel, rtol=1e-5,
                               atol=1e-6)
    monkeypatch.setenv(int8_matvec.ENV, "maybe")
    with pytest.raises(ConfigError, match="JAXSWIFT_INT8_KERNEL='maybe': expected 0 .* or 1"):
        int8_matvec.available()


def test_missing_compiler_falls_back_and_says_why_once(kernel, reload_kernel, monkeypatch, tmp_path, caplog):
    rng = np.random.default_rng(5)
    codes, scale = random_int8(rng, 33, 20)
    x = rng.standard_normal((1, 20)).astype(np.float32)
    with_kernel = np.asarray(jax.jit(kernel_matvec)(x, codes, scale))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built there
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    int8_matvec._load.cache_clear()
    int8_matvec._note_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=int8_matvec.__name__):
        fallback = np.asarray(fresh(kernel_matvec)(x, codes, scale))
        assert custom_calls(kernel_matvec, x, codes, scale) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0] and "no-such-compiler" in warnings[0], warnings
    np.testing.assert_allclose(fallback, with_kernel, rtol=1e-5, atol=1e-6)


def test_a_failing_build_names_the_command_and_the_compiler_error(reload_kernel, monkeypatch, tmp_path):
    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo broken 1.0; exit 0; }\n"
                      "echo 'int8_matvec.cc:1: error: no AVX today' >&2\nexit 3\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(broken))
    reason = int8_matvec.unavailable_reason()
    assert reason is not None and "failed (exit 3)" in reason and "no AVX today" in reason, reason
    assert str(broken) in reason and "-march=native" in reason
    assert not list((tmp_path / "cache").rglob("*.so")), "a failed build left a file behind"


def test_concurrent_builds_publish_one_whole_library(kernel, monkeypatch, tmp_path):
    """Two builds at once into an empty cache (pytest-xdist workers): each compiles into a private file and renames
    it into place, so a process polling the target never sees it half written, and no temporary file remains. The
    'compiler' writes the real library in two halves, half a second apart."""
    real = int8_matvec.build()
    slow = tmp_path / "slow-cxx"
    slow.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        [ "$1" = --version ] && {{ echo slow 1.0; exit 0; }}
        while [ "$1" != -o ]; do shift; done
        head -c 4096 {real} > "$2"; sleep 0.5; cat {real} > "$2"
        """))
    slow.chmod(slow.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(slow))
    seen_sizes = set()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        builds = [pool.submit(int8_matvec.build) for _ in range(2)]
        while not all(b.done() for b in builds):
            seen_sizes |= {p.stat().st_size for p in (tmp_path / "cache").rglob("int8_matvec-*.so")}
        targets = {b.result() for b in builds}
    assert len(targets) == 1 and targets.pop().read_bytes() == real.read_bytes()
    assert seen_sizes <= {real.stat().st_size}, f"a partial library was visible: {seen_sizes}"
    leftovers = [p.name for p in int8_matvec.cache_folder().iterdir() if p.suffix != ".so" or p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_the_build_is_cached_by_source_flags_compiler_jaxlib_and_cpu(kernel):
    path = int8_matvec.build()
    assert path.parent == int8_matvec.cache_folder() and path.stat().st_size > 0
    assert int8_matvec.build() == path  # found, not rebuilt
    key = int8_matvec._build_key(int8_matvec._compiler(), int8_matvec.FLAGS)
    assert path.name == f"int8_matvec-{key}.so"
    assert int8_matvec._build_key(int8_matvec._compiler(), (*int8_matvec.FLAGS, "-DX")) != key


@pytest.mark.parametrize("rows", [1, 5])
def test_blocked_fallback_for_wide_weights_equals_the_reference(rows):
    """Without the kernel, a weight of WIDE_ROWS outputs or more (an output projection) is dotted block by block;
    a row count with no block divisor keeps the reduction."""
    rng = np.random.default_rng(rows)
    for O in (20480, 16411):  # 5 blocks of 4096; a prime
        codes, scale = random_int8(rng, O, 24)
        x = rng.standard_normal((rows, 24)).astype(np.float32)
        np.testing.assert_allclose(np.asarray(jax.jit(xla_matvec)(x, codes, scale)), reference(x, codes, scale),
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(blocked_matmul(x, codes[:4096], 1024)),
                               np.asarray(reduce_matmul(x, codes[:4096])), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- serving

def test_int8_decoding_gives_the_same_greedy_tokens_with_and_without_the_kernel(kernel, tiny_chat_model,
                                                                                 monkeypatch):
    """jaxswift.generate_ids over int8 params (prefill, then the decode loop) with the kernel, and with every
    RowInt8Weight kept in plain XLA (kernel=False): the same tokens, and the kernel path really ran."""
    model = jaxswift.load_model(str(tiny_chat_model))
    params = inference_params(model.params, model.config, "int8", "test")
    without = jax.tree.map(lambda leaf: leaf.replace(kernel=False) if isinstance(leaf, RowInt8Weight) else leaf,
                           params, is_leaf=lambda leaf: isinstance(leaf, RowInt8Weight))
    traced = []
    monkeypatch.setattr(int8_matvec, "_custom_call", lambda *a, call=int8_matvec._custom_call: (
        traced.append(a[1].shape), call(*a))[1])
    prompts = [[1, 17, 400, 9000, 31], [5, 6]]
    ours = jaxswift.generate_ids(model.__class__(model.config, params, model.tokenizer), prompts,
                                 max_new_tokens=12, ignore_eos=True)
    assert traced and (model.config.vocab_size, model.config.hidden_size) in traced  # the output head too
    traced.clear()
    plain = jaxswift.generate_ids(model.__class__(model.config, without, model.tokenizer), prompts,
                                  max_new_tokens=12, ignore_eos=True)
    assert not traced and ours == plain and len(ours[0]) == 12


def test_int8_serving_quantizes_the_output_projection_and_keeps_the_float_lookup(kernel, tiny_chat_model):
    model = jaxswift.load_model(str(tiny_chat_model))
    cfg = model.config
    params = inference_params(model.params, cfg, "int8", "test")
    head = params["lm_head"]
    assert cfg.tie_word_embeddings and isinstance(head, RowInt8Weight) and output_weight(params, cfg) is head
    assert head.codes.shape == (cfg.vocab_size, cfg.hidden_size) and params["embed"] is model.params["embed"]
    np.testing.assert_allclose(np.asarray(head.dequantize()), np.asarray(model.params["embed"]).T,
                               atol=float(head.scale.max()) / 2 + 1e-7)
    # one decode step, unrolled as the engine runs it, against the same weights dequantized to float (the lookup
    # from the float embedding, the logits from the int8 head's float values)
    dequantized = jax.tree.map(lambda leaf: leaf.dequantize() if isinstance(leaf, RowInt8Weight) else leaf, params,
                               is_leaf=lambda leaf: isinstance(leaf, RowInt8Weight))
    untied = cfg.replace(tie_word_embeddings=False)
    tokens = jnp.asarray([[7], [9000]], jnp.int32)
    step = jax.jit(forward, static_argnums=2)
    ours, _ = step(unstack_layers(params), tokens, cfg, cache=init_cache(cfg, 2, 8, per_layer=True))
    ref, _ = step(unstack_layers(dequantized), tokens, untied, cache=init_cache(untied, 2, 8, per_layer=True))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-4, atol=1e-5)


def test_untied_models_get_the_int8_output_projection_too():
    """(int8 folders: tests/test_serve_quant.py checks their served lm_head.)"""
    cfg = ModelConfig(family="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=32, tie_word_embeddings=False)
    params = init_params(cfg, jax.random.key(0))
    quantized = inference_params(params, cfg, "int8", "test")
    head = quantized["lm_head"]
    assert isinstance(head, RowInt8Weight) and head.codes.shape == (96, 64) and output_weight(quantized, cfg) is head
    np.testing.assert_allclose(np.asarray(head.dequantize()), np.asarray(params["lm_head"]),
                               atol=float(head.scale.max()) / 2 + 1e-7)
