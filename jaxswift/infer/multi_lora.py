"""Several LoRA adapters on one base, each row of a batch choosing its own (multi-LoRA serving).

Adapters are stacked on an adapter axis A, with index 0 all zeros (the base model alone):
  base [L, *in, *out]    a [L, A, *in, r]    b [L, A, r, *out]   (b already scaled by alpha/r)
Ranks are padded with zeros to the largest, and an adapter that does not target a module has zeros there, so
every row runs the same matmuls. `with_adapter_index` sets each row's adapter inside the jitted step; the forward's
`linear` then calls `MultiLoraWeight.apply`, which adds `(x @ a[row]) @ b[row]` per row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxswift.checkpoints.peft import load_peft_adapter
from jaxswift.errors import CheckpointError
from jaxswift.models.config import ModelConfig
from jaxswift.models.transformer import linear
from jaxswift.tuners.lora import is_lora, split_equation


@struct.dataclass
class MultiLoraWeight:
    base: Any
    a: Any
    b: Any
    index: Any = None  # [B] adapter per row, set by with_adapter_index

    def apply(self, equation: str, x):
        x_spec, contracted, w_out, out, r = split_equation(equation)
        row = x_spec[0]
        kept = "".join(c for c in x_spec if c not in contracted)
        base_out = linear(equation, x, self.base)
        a = jnp.take(self.a, self.index, axis=0).astype(x.dtype)  # [B, *in, r]
        b = jnp.take(self.b, self.index, axis=0).astype(x.dtype)  # [B, r, *out]
        h = jnp.einsum(f"{x_spec},{row}{contracted}{r}->{kept}{r}", x, a)
        return base_out + jnp.einsum(f"{kept}{r},{row}{r}{w_out}->{out}", h, b)


def is_multi_lora(x) -> bool:
    return isinstance(x, MultiLoraWeight)


def with_adapter_index(params, index_B):
    """params whose multi-LoRA weights use adapter index_B[row] for each row of the batch."""
    return jax.tree.map(lambda w: w.replace(index=index_B) if is_multi_lora(w) else w, params,
                        is_leaf=is_multi_lora)


def _adapter_arrays(folder: str | Path, params, cfg: ModelConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module: (a [L, *in, r], b [L, r, *out] scaled)} of one PEFT adapter folder."""
    loaded, lora_cfg = load_peft_adapter(params, cfg, folder)
    if lora_cfg.use_dora or lora_cfg.init == "pissa":
        kind = "DoRA" if lora_cfg.use_dora else "PiSSA (it changes the base weights)"
        raise CheckpointError(f"{folder}: {kind} adapters cannot share a base with others; merge it into the "
                              "model (jaxswift export --merge_lora) and serve that instead")
    return {name: (np.asarray(w.a, np.float32), np.asarray(w.b, np.float32) * w.scale)
            for name, w in loaded["layers"].items() if is_lora(w)}


def stack_adapters(params, cfg: ModelConfig, folders: list[str | Path]) -> dict:
    """The base params (stacked layers) with a MultiLoraWeight wherever any adapter applies; adapter i + 1 is
    folders[i]."""
    adapters = [_adapter_arrays(folder, params, cfg) for folder in folders]
    rank = max(a.shape[-1] for adapter in adapters for a, _ in adapter.values())
    layers = dict(params["layers"])
    for name in sorted({name for adapter in adapters for name in adapter}):
        base = layers[name]
        n_in = _inputs(adapters, name)
        in_shape, out_shape = base.shape[1:1 + n_in], base.shape[1 + n_in:]
        a_all = np.zeros((base.shape[0], len(folders) + 1, *in_shape, rank), np.float32)
        b_all = np.zeros((base.shape[0], len(folders) + 1, rank, *out_shape), np.float32)
        for i, adapter in enumerate(adapters, start=1):
            if name in adapter:
                a, b = adapter[name]
                a_all[:, i, ..., :a.shape[-1]] = a
                b_all[:, i, :b.shape[1]] = b
        layers[name] = MultiLoraWeight(base, jnp.asarray(a_all), jnp.asarray(b_all))
    return {**params, "layers": layers}


def _inputs(adapters, name) -> int:
    """How many input axes the module's weight has (a's axes between layers and rank)."""
    a = next(adapter[name][0] for adapter in adapters if name in adapter)
    return a.ndim - 2
