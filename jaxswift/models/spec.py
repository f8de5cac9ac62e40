"""ParamSpec: the one description of every parameter (shape, dtype, logical axes, init).

Init, abstract shapes, shardings, HF name maps and LoRA targets are all derived from `param_specs(cfg)`, so they
cannot drift apart. Per-layer weights carry a leading `layers` axis (the decoder scans over it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from jaxswift.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]
    init: str = "normal"  # normal | ones | zeros
    fan_in_axes: tuple[int, ...] = ()  # which axes are contracted in the matmul (for init scale)

    def __post_init__(self):
        assert len(self.shape) == len(self.logical_axes), (self.shape, self.logical_axes)


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def param_specs(cfg: ModelConfig) -> dict:
    """The params tree, as specs. Projections keep heads as their own axis: wq is [L, D, N, H]."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layers = {
        "attn_norm": ParamSpec((L, D), ("layers", "norm"), "ones"),
        "wq": ParamSpec((L, D, N, H), ("layers", "embed", "heads", "head_dim"), fan_in_axes=(1,)),
        "wk": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), fan_in_axes=(1,)),
        "wv": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), fan_in_axes=(1,)),
        "wo": ParamSpec((L, N, H, D), ("layers", "heads", "head_dim", "embed"), fan_in_axes=(1, 2)),
        "mlp_norm": ParamSpec((L, D), ("layers", "norm"), "ones"),
        **(moe_specs(cfg) if cfg.is_moe else {
            "w_gate": ParamSpec((L, D, F), ("layers", "embed", "mlp"), fan_in_axes=(1,)),
            "w_up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), fan_in_axes=(1,)),
            "w_down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), fan_in_axes=(1,)),
        }),
    }
    if cfg.qkv_bias:
        layers["bq"] = ParamSpec((L, N, H), ("layers", "heads", "head_dim"), "zeros")
        layers["bk"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
        layers["bv"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.qk_norm:
        layers["q_norm"] = ParamSpec((L, H), ("layers", "norm"), "ones")
        layers["k_norm"] = ParamSpec((L, H), ("layers", "norm"), "ones")
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), fan_in_axes=(1,)),
        "layers": layers,
        "final_norm": ParamSpec((D,), ("norm",), "ones"),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"), fan_in_axes=(0,))
    return specs


def moe_specs(cfg: ModelConfig) -> dict:
    """An MoE block's weights: the router, E routed experts (own names, so LoRA's all-linear and the quantizers,
    which look for w_gate/w_up/w_down, leave them alone), and qwen2_moe's shared expert with its sigmoid gate."""
    L, D, E, F, S = (cfg.num_layers, cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size,
                     cfg.shared_expert_intermediate_size)
    specs = {
        "router": ParamSpec((L, D, E), ("layers", "embed", None), fan_in_axes=(1,)),
        "expert_gate": ParamSpec((L, E, D, F), ("layers", "experts", "embed", "mlp"), fan_in_axes=(2,)),
        "expert_up": ParamSpec((L, E, D, F), ("layers", "experts", "embed", "mlp"), fan_in_axes=(2,)),
        "expert_down": ParamSpec((L, E, F, D), ("layers", "experts", "mlp", "embed"), fan_in_axes=(2,)),
    }
    if S:
        specs.update(
            shared_gate=ParamSpec((L, D, S), ("layers", "embed", "mlp"), fan_in_axes=(1,)),
            shared_up=ParamSpec((L, D, S), ("layers", "embed", "mlp"), fan_in_axes=(1,)),
            shared_down=ParamSpec((L, S, D), ("layers", "mlp", "embed"), fan_in_axes=(1,)),
            shared_expert_gate=ParamSpec((L, D), ("layers", "embed"), fan_in_axes=(1,)))
    return specs


def map_specs(fn: Callable[[ParamSpec], object], specs) -> object:
    return jax.tree.map(fn, specs, is_leaf=_is_spec)


def logical_axes(cfg: ModelConfig) -> dict:
    return map_specs(lambda s: s.logical_axes, param_specs(cfg))


def abstract_params(cfg: ModelConfig) -> dict:
    """ShapeDtypeStructs of the params: what eval_shape and AOT lowering need, nothing allocated."""
    return map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, cfg.weight_dtype), param_specs(cfg))


def _init_leaf(spec: ParamSpec, key, dtype):
    if spec.init == "ones":
        return jnp.ones(spec.shape, dtype)
    if spec.init == "zeros":
        return jnp.zeros(spec.shape, dtype)
    fan_in = math.prod(spec.shape[a] for a in spec.fan_in_axes) if spec.fan_in_axes else 1
    std = 0.02 if spec.logical_axes[0] == "vocab" else 1.0 / math.sqrt(fan_in)
    return (std * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype)


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Random params (for tests and from-scratch pretraining)."""
    return init_from_specs(param_specs(cfg), key, cfg.weight_dtype)


def init_from_specs(specs, key: jax.Array, dtype) -> dict:
    """Random params of any ParamSpec tree (the text core's, a vision tower's)."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [_init_leaf(s, k, dtype) for s, k in zip(leaves, keys)])
