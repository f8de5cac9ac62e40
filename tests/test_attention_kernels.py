"""Attention kernels (models/attention_kernels.py) against the einsum path, and which kernel each backend gets.

On CPU: jax.nn.dot_product_attention(implementation="xla") and the splash kernel (through Pallas' interpreter) are
checked against the einsum reference with packing (segments, padding), sliding windows and GQA, forward and
gradients. cudnn needs an NVIDIA GPU: here only its selection and its refusals are tested (the backend is faked).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxswift.errors import ConfigError
from jaxswift.models import attention_kernels as kernels
from jaxswift.models.config import ModelConfig
from jaxswift.models.spec import init_params
from jaxswift.models.transformer import forward, self_attention

B, T, N, K, H = 3, 40, 4, 2, 16  # GQA: two query heads per kv head; T not a multiple of splash's block
CFG = ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=N,
                  num_kv_heads=K, head_dim=8, sliding_windows=(0, 5), rms_norm_eps=1e-5)


def packed_rows():
    """positions, segment ids [B, T]: several segments per row (positions restart at 0), padding (segment 0)."""
    layouts = [[(1, 12), (2, 20), (0, 8)], [(1, 40)], [(1, 3), (2, 7), (3, 26), (0, 4)]]
    pos = [np.concatenate([np.arange(n) if s else np.zeros(n, int) for s, n in row]) for row in layouts]
    seg = [np.concatenate([np.full(n, s) for s, n in row]) for row in layouts]
    return jnp.asarray(np.stack(pos), jnp.int32), jnp.asarray(np.stack(seg), jnp.int32)


def qkv(dtype):
    keys = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(keys[0], (B, T, N, H)).astype(dtype),
            jax.random.normal(keys[1], (B, T, K, H)).astype(dtype),
            jax.random.normal(keys[2], (B, T, K, H)).astype(dtype))


def real_rows(x, seg):
    """Outputs of padding tokens (segment 0) are never used: compare the real ones."""
    return np.where(np.asarray(seg)[:, :, None, None] > 0, np.asarray(x, np.float32), 0)


def attend_and_grads(impl, q, k, v, pos, seg, window, windows=(0, 5)):
    """Output and (dq, dk, dv) of a fixed random projection of the real tokens' output."""
    probe = jax.random.normal(jax.random.key(7), q.shape, jnp.float32) * (seg[:, :, None, None] > 0)

    def f(q, k, v):
        out = self_attention(q, k, v, pos, seg, window, impl=impl, windows=windows)
        return jnp.sum(out.astype(jnp.float32) * probe), out

    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-3)])
def test_xla_kernel_equals_einsum(window, dtype, atol):
    q, k, v = qkv(dtype)
    pos, seg = packed_rows()
    want, want_grads = attend_and_grads("einsum", q, k, v, pos, seg, window)
    got, got_grads = attend_and_grads("xla", q, k, v, pos, seg, window)
    assert got.dtype == want.dtype == dtype
    np.testing.assert_allclose(real_rows(got, seg), real_rows(want, seg), atol=atol, rtol=atol)
    if dtype == jnp.float32:  # gradients: float32 only (bfloat16 gradients round differently per kernel)
        for name, g, w in zip("qkv", got_grads, want_grads):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_a_static_window_is_passed_to_the_kernel_and_changes_nothing():
    """Every layer with the same window: jax.nn.dot_product_attention also gets it (cuDNN prunes the blocks
    before it); the result still equals einsum's."""
    q, k, v = qkv(jnp.float32)
    pos, seg = packed_rows()
    want, _ = attend_and_grads("einsum", q, k, v, pos, seg, 5, windows=(5,))
    got, _ = attend_and_grads("xla", q, k, v, pos, seg, 5, windows=(5,))
    np.testing.assert_allclose(real_rows(got, seg), real_rows(want, seg), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [0, 5])
def test_splash_kernel_equals_einsum(window):
    """The TPU kernel itself, run by Pallas' interpreter on CPU: segments, windows picked by a traced layer window
    (lax.switch between one kernel per window), T padded to its block and cut back, gradients."""
    q, k, v = qkv(jnp.float32)
    pos, seg = packed_rows()
    want, want_grads = attend_and_grads("einsum", q, k, v, pos, seg, window)
    got, got_grads = attend_and_grads("splash", q, k, v, pos, seg, jnp.asarray(window, jnp.int32))
    np.testing.assert_allclose(real_rows(got, seg), real_rows(want, seg), atol=1e-5, rtol=1e-5)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_whole_forward_with_the_xla_kernel_equals_einsum():
    """Every layer of a model with a full and a sliding-window layer (scanned: the window is traced), packed rows."""
    params = init_params(CFG, jax.random.key(1))
    pos, seg = packed_rows()
    tokens = jax.random.randint(jax.random.key(2), (B, T), 0, CFG.vocab_size)
    logits = {impl: forward(params, tokens, CFG.replace(attn_impl=impl), positions=pos, segment_ids=seg)
              for impl in ("einsum", "xla")}
    np.testing.assert_allclose(real_rows(logits["xla"][..., None], seg), real_rows(logits["einsum"][..., None], seg),
                               atol=1e-5, rtol=1e-5)


def fake_backend(monkeypatch, backend, *, cuda=True, splash=True):
    monkeypatch.setattr(kernels, "backend_name", lambda: backend)
    monkeypatch.setattr(kernels, "is_cuda", lambda: backend == "gpu" and cuda)
    if not splash:
        monkeypatch.setattr(kernels, "splash_module", lambda: None)


@pytest.mark.parametrize("backend, dtype, head_dim, want", [
    ("cpu", jnp.bfloat16, 64, "einsum"),
    ("gpu", jnp.bfloat16, 64, "cudnn"),
    ("gpu", jnp.float16, 128, "cudnn"),
    ("gpu", jnp.float32, 64, "einsum"),  # cuDNN flash attention has no float32
    ("gpu", jnp.bfloat16, 256, "einsum"),  # nor heads over 128
    ("tpu", jnp.bfloat16, 64, "splash"),
    ("tpu", jnp.float32, 128, "splash"),
])
def test_auto_picks_the_kernel_of_the_backend(monkeypatch, backend, dtype, head_dim, want):
    fake_backend(monkeypatch, backend)
    assert kernels.resolve_attn_impl("auto", dtype, head_dim) == want


def test_auto_falls_back_where_the_kernel_is_missing(monkeypatch):
    fake_backend(monkeypatch, "tpu", splash=False)
    assert kernels.resolve_attn_impl("auto", jnp.bfloat16, 64) == "einsum"
    fake_backend(monkeypatch, "gpu", cuda=False)  # ROCm: no cuDNN
    assert kernels.resolve_attn_impl("auto", jnp.bfloat16, 64) == "einsum"


@pytest.mark.parametrize("backend, impl, dtype, head_dim, needle", [
    ("cpu", "cudnn", jnp.bfloat16, 64, "cudnn needs an NVIDIA GPU; this backend is cpu"),
    ("tpu", "cudnn", jnp.bfloat16, 64, "cudnn needs an NVIDIA GPU; this backend is tpu"),
    ("gpu", "cudnn", jnp.float32, 64, "computes in float32 with head_dim 64"),
    ("gpu", "cudnn", jnp.bfloat16, 96 + 3, "head_dim 99"),
    ("cpu", "splash", jnp.float32, 64, "splash is a TPU kernel; this backend is cpu"),
    ("gpu", "splash", jnp.bfloat16, 64, "splash is a TPU kernel; this backend is gpu"),
])
def test_a_kernel_the_backend_lacks_is_refused(monkeypatch, backend, impl, dtype, head_dim, needle):
    fake_backend(monkeypatch, backend)
    with pytest.raises(ConfigError, match=needle):
        kernels.resolve_attn_impl(impl, dtype, head_dim)


def test_splash_refused_where_jax_lacks_it(monkeypatch):
    fake_backend(monkeypatch, "tpu", splash=False)
    with pytest.raises(ConfigError, match="has no jax.experimental.pallas.ops.tpu.splash_attention"):
        kernels.resolve_attn_impl("splash", jnp.bfloat16, 128)


@pytest.mark.parametrize("backend, value, want", [
    ("cpu", None, "auto"), ("cpu", "eager", "einsum"), ("cpu", "sdpa", "xla"), ("gpu", "flash_attn", "cudnn"),
    ("gpu", "flash_attention_2", "cudnn"), ("tpu", "flash_attn", "splash"), ("cpu", "xla", "xla"),
])
def test_ms_swift_names_map_to_ours(monkeypatch, backend, value, want):
    fake_backend(monkeypatch, backend)
    assert kernels.normalize_attn_impl(value) == want


def test_flash_on_cpu_and_unknown_names_are_refused(monkeypatch):
    fake_backend(monkeypatch, "cpu")
    with pytest.raises(ConfigError, match="no flash-attention kernel on the cpu backend"):
        kernels.normalize_attn_impl("flash_attn")
    with pytest.raises(ConfigError, match="--attn_impl 'flash'"):
        kernels.normalize_attn_impl("flash")
    with pytest.raises(ConfigError, match="attn_impl must be auto"):
        CFG.replace(attn_impl="cuda")


def test_the_model_refuses_a_kernel_the_backend_lacks():
    """The forward resolves cfg.attn_impl when traced: cudnn on this CPU is an error naming the flag."""
    params = init_params(CFG, jax.random.key(1))
    with pytest.raises(ConfigError, match="--attn_impl cudnn needs an NVIDIA GPU"):
        forward(params, jnp.zeros((1, 8), jnp.int32), CFG.replace(attn_impl="cudnn"))


def test_sft_flags_reach_the_model_config(monkeypatch):
    from jaxswift.train.args import SftArguments
    from jaxswift.train.loop import run_config

    assert run_config(CFG, SftArguments(attn_impl="sdpa")).attn_impl == "xla"
    assert run_config(CFG, SftArguments()).attn_impl == "auto"
    with pytest.raises(ConfigError, match="--attn_impl 'fast'"):
        SftArguments(attn_impl="fast")


def test_a_named_kernel_under_ring_attention_is_refused():
    """Sequence parallelism installs its own attention (ring); a kernel asked for by name would go unused."""
    from jaxswift.models.hints import use_overrides

    params = init_params(CFG, jax.random.key(1))
    with use_overrides(self_attention=lambda q, *_: q):
        forward(params, jnp.zeros((1, 8), jnp.int32), CFG)  # auto: the installed attention runs
        with pytest.raises(ConfigError, match="--attn_impl xla: sequence parallelism runs its own ring attention"):
            forward(params, jnp.zeros((1, 8), jnp.int32), CFG.replace(attn_impl="xla"))
