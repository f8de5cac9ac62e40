"""Fused kernels for a sequence attending over itself, chosen by backend (`--attn_impl`).

Legend as in transformer.py. The einsum softmax of `transformer.self_attention` is the reference and the CPU
default; cudnn and splash compute the same masked softmax attention without materialising the [B, K, G*T, S]
scores; xla is jax's own unfused version (the full score matrix), a second reference on any backend:

  einsum  transformer.py's grouped einsum softmax (block-causal): CPU default, the reference, every mask.
  xla     `jax.nn.dot_product_attention(implementation="xla")`: any backend; the boolean mask as given.
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention (NVIDIA GPU, bfloat16 or
          float16, head_dim a multiple of 8 up to 128). Causal by index (the kernel skips the blocks above the
          diagonal); segments and sliding windows arrive as the same boolean mask, which cuDNN turns into a bias.
  splash  the Pallas splash kernel of `jax.experimental.pallas.ops.tpu.splash_attention` (TPU): causal or local
          (sliding window) block masks built once per shape, segment ids for packing.

`auto` picks cudnn on an NVIDIA GPU when the dtype and head_dim allow, splash on a TPU where the module imports,
einsum otherwise (its block-causal skipping does about half the work of xla's full score matrix). Asking for a
kernel the backend lacks is an error, never a silent fallback.

cudnn and splash mask by index, as `causal_self_attention`'s block skipping does: within a segment positions grow
with the index (packed, padded and plain rows all do), so index-causal keeps every key the position mask keeps;
cudnn also receives the exact position mask. splash takes segment ids and the window only (index distance = position
distance for contiguous positions, the training batches' case).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.errors import ConfigError

ATTN_IMPLS = ("auto", "einsum", "xla", "cudnn", "splash")
# ms-swift's --attn_impl values (transformers' attn_implementation names) -> ours. "flash" = the backend's flash
# kernel: cudnn on GPU, splash on TPU, refused on CPU (there is none; einsum is the fast path there).
MS_SWIFT_NAMES = {"eager": "einsum", "sdpa": "xla", "flash_attn": "flash", "flash_attention_2": "flash",
                  "flash_attention_3": "flash"}
SPLASH_BLOCK = 128  # splash's tile along T and S: sequences are padded up to a multiple of it
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def backend_name() -> str:
    """jax.default_backend() (one place, so tests can pretend to be on a GPU or TPU)."""
    return jax.default_backend()


def is_cuda() -> bool:
    """An NVIDIA GPU backend (cuDNN exists there; ROCm GPUs report the same backend name without it)."""
    if backend_name() != "gpu":
        return False
    try:
        return "rocm" not in jax.devices()[0].client.platform_version.lower()
    except Exception:  # noqa: BLE001 - an unknown client: assume CUDA, cuDNN's own error names the problem
        return True


@functools.cache
def splash_module():
    """(splash_attention_kernel, splash_attention_mask) modules, or None where this jax has no splash kernel."""
    try:
        from jax.experimental.pallas.ops.tpu.splash_attention import (splash_attention_kernel,
                                                                      splash_attention_mask)
    except Exception:  # noqa: BLE001 - ImportError or a Pallas/TPU import failure: the kernel is not available
        return None
    return splash_attention_kernel, splash_attention_mask


def normalize_attn_impl(value: str | None, where: str = "--attn_impl") -> str:
    """A user's --attn_impl (ours or ms-swift's names) -> one of ATTN_IMPLS; None -> auto."""
    if value is None:
        return "auto"
    name = MS_SWIFT_NAMES.get(value, value)
    if name == "flash" and value != "flash":
        backend = backend_name()
        if backend == "tpu":
            return "splash"
        if backend == "gpu":
            return "cudnn"
        raise ConfigError(f"{where} {value}: there is no flash-attention kernel on the {backend} backend; use "
                          f"auto (einsum here), einsum or xla")
    if name not in ATTN_IMPLS:
        known = " | ".join(ATTN_IMPLS + tuple(MS_SWIFT_NAMES))
        raise ConfigError(f"{where} {value!r}: expected one of {known}")
    return name


def resolve_attn_impl(requested: str, dtype, head_dim: int) -> str:
    """The kernel `requested` (ATTN_IMPLS) runs as on this backend, or a ConfigError saying why it cannot run here."""
    backend = backend_name()
    cudnn_ok = jnp.dtype(dtype) in map(jnp.dtype, CUDNN_DTYPES) and head_dim % 8 == 0 and head_dim <= 128
    if requested == "auto":
        if backend == "gpu" and is_cuda() and cudnn_ok:
            return "cudnn"
        if backend == "tpu" and splash_module() is not None:
            return "splash"
        return "einsum"
    if requested == "cudnn":
        if not is_cuda():
            raise ConfigError(f"--attn_impl cudnn needs an NVIDIA GPU; this backend is {backend} "
                              f"(use auto, einsum or xla)")
        if not cudnn_ok:
            raise ConfigError(f"--attn_impl cudnn: cuDNN flash attention takes bfloat16 or float16 with head_dim a "
                              f"multiple of 8 up to 128; this model computes in {jnp.dtype(dtype).name} with "
                              f"head_dim {head_dim} (use --dtype bfloat16, or --attn_impl einsum)")
    if requested == "splash":
        if backend != "tpu":
            raise ConfigError(f"--attn_impl splash is a TPU kernel; this backend is {backend} (use auto, einsum "
                              f"or xla)")
        if splash_module() is None:
            raise ConfigError("--attn_impl splash: this jax has no jax.experimental.pallas.ops.tpu.splash_attention "
                              "(use auto or einsum)")
    if requested not in ATTN_IMPLS:
        raise ConfigError(f"attn_impl {requested!r}: expected one of {' | '.join(ATTN_IMPLS)}")
    return requested


def dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, implementation: str,
                          windows: tuple[int, ...] = (0,)) -> jax.Array:
    """jax.nn.dot_product_attention with our boolean mask [B, T, S] (True = attend); grouped heads as given.
    cudnn also gets is_causal, so it skips the key blocks after each query block, and, when every layer has the
    same sliding window (a static value), that window, so it skips the blocks before it too. The mask stays exact:
    both only prune keys the mask already drops."""
    window = windows[0] if len(windows) == 1 and windows[0] > 0 else None
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None],
                                        is_causal=implementation == "cudnn", implementation=implementation,
                                        local_window_size=None if window is None else (window - 1, 0))


@functools.cache
def _splash_kernel(length: int, num_heads: int, window: int, interpret: bool):
    """A splash kernel for [N, T, H] queries over [K, T, H] keys: causal, or local (window) when window > 0."""
    kernel_lib, mask_lib = splash_module()
    shape = (length, length)
    head_mask = mask_lib.LocalMask(shape, (window - 1, 0), 0) if window > 0 else mask_lib.CausalMask(shape)
    block = min(SPLASH_BLOCK, length)
    sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([head_mask] * num_heads), block_sizes=sizes,
                                      head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, window, windows: tuple[int, ...], *,
                     interpret: bool | None = None) -> jax.Array:
    """Splash attention of a sequence over itself with segment ids; `window` may be traced (a scanned layer's),
    so one kernel is built per distinct value in `windows` (the model's) and `lax.switch` picks it.

    T is padded to a multiple of SPLASH_BLOCK with segment id -1, which no real token has; the padded queries see
    only padding and are cut off. interpret=True runs the kernel through Pallas' interpreter; by default it does
    so off a TPU (jax's real backend), which is how the CPU tests check the kernel against the einsum path.
    """
    kernel_lib, _ = splash_module()
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    B, T, N, H = q_BTNH.shape
    padded = max(SPLASH_BLOCK, math.ceil(T / SPLASH_BLOCK) * SPLASH_BLOCK)
    pad = lambda x, value=0: jnp.pad(x, [(0, 0), (0, padded - T)] + [(0, 0)] * (x.ndim - 2),  # noqa: E731
                                     constant_values=value)
    q_BNTH = pad(q_BTNH * jnp.asarray(H ** -0.5, q_BTNH.dtype)).transpose(0, 2, 1, 3)
    k_BKTH, v_BKTH = pad(k_BTKH).transpose(0, 2, 1, 3), pad(v_BTKH).transpose(0, 2, 1, 3)
    segments = kernel_lib.SegmentIds(q=pad(segment_ids_BT, -1), kv=pad(segment_ids_BT, -1))

    def run(w):
        kernel = _splash_kernel(padded, N, w, interpret)
        return lambda: jax.vmap(kernel)(q_BNTH, k_BKTH, v_BKTH, segment_ids=segments)

    distinct = sorted(set(windows))
    if len(distinct) == 1:
        out_BNTH = run(distinct[0])()
    else:
        index = jnp.searchsorted(jnp.asarray(distinct, jnp.int32), jnp.asarray(window, jnp.int32))
        out_BNTH = jax.lax.switch(index, [run(w) for w in distinct])
    return out_BNTH.transpose(0, 2, 1, 3)[:, :T].astype(q_BTNH.dtype)


def distinct_windows(window_per_layer) -> tuple[int, ...]:
    return tuple(sorted({int(w) for w in np.asarray(window_per_layer).reshape(-1)}))
