"""Hugging Face weight names <-> the params tree: the llama-style families (llama, mistral, qwen2, qwen3) and
their mixture-of-experts relatives (qwen2_moe, qwen3_moe, mixtral).

Each entry says where one HF tensor lands and how its torch layout ((out, in) for linears) maps to ours
(heads kept as their own axis, inputs first). Derived from `param_specs`, so a key that the spec lacks
(biases, q/k norms, untied lm_head) is simply not in the map.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxswift.models.config import ModelConfig
from jaxswift.models.spec import param_specs


@dataclasses.dataclass(frozen=True)
class WeightMap:
    path: tuple[str, ...]  # key path in the params tree, e.g. ("layers", "wq")
    hf_name: str  # with "{i}" for the layer index where per layer, and "{e}" for the expert where per expert
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name

    @property
    def per_expert(self) -> bool:
        """One HF tensor per expert, stacked on our E axis (after L): [L, E, ...]."""
        return "{e}" in self.hf_name

    def names(self, cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
        """(HF name, index into our stacked array) for every tensor of this entry."""
        layers = range(cfg.num_layers) if self.per_layer else [None]
        experts = range(cfg.num_experts) if self.per_expert else [None]
        return [(self.hf_name.format(i=i, e=e), tuple(k for k in (i, e) if k is not None))
                for i in layers for e in experts]


def _same(w):
    return w


def _transpose(w):
    return w.T


def _in_heads(heads: int):
    # HF (heads*head_dim, embed) <-> ours (embed, heads, head_dim)
    return (lambda w: w.T.reshape(w.shape[1], heads, -1),
            lambda w: w.reshape(w.shape[0], -1).T)


def _out_heads(heads: int):
    # HF (embed, heads*head_dim) <-> ours (heads, head_dim, embed)
    return (lambda w: w.T.reshape(heads, -1, w.shape[0]),
            lambda w: w.reshape(-1, w.shape[-1]).T)


def _bias_heads(heads: int):
    return (lambda b: b.reshape(heads, -1), lambda b: b.reshape(-1))


def _shared_gate(w):
    return w.reshape(-1)  # HF (1, embed) <-> ours (embed,)


def _moe_table(cfg: ModelConfig) -> dict:
    """Router, experts and shared expert: HF's per-expert tensors (as save_pretrained writes them)."""
    if cfg.family == "mixtral":
        block, gate, up, down = "model.layers.{i}.block_sparse_moe.", "w1", "w3", "w2"
    else:
        block, gate, up, down = "model.layers.{i}.mlp.", "gate_proj", "up_proj", "down_proj"
    expert = block + "experts.{e}."
    return {
        ("layers", "router"): (block + "gate.weight", _transpose, _transpose),
        ("layers", "expert_gate"): (expert + gate + ".weight", _transpose, _transpose),
        ("layers", "expert_up"): (expert + up + ".weight", _transpose, _transpose),
        ("layers", "expert_down"): (expert + down + ".weight", _transpose, _transpose),
        ("layers", "shared_gate"): (block + "shared_expert.gate_proj.weight", _transpose, _transpose),
        ("layers", "shared_up"): (block + "shared_expert.up_proj.weight", _transpose, _transpose),
        ("layers", "shared_down"): (block + "shared_expert.down_proj.weight", _transpose, _transpose),
        ("layers", "shared_expert_gate"): (block + "shared_expert_gate.weight", _shared_gate,
                                           lambda w: w.reshape(1, -1)),
    }


def weight_maps(cfg: ModelConfig) -> list[WeightMap]:
    N, K = cfg.num_heads, cfg.num_kv_heads
    layer = "model.layers.{i}."
    table = {
        ("embed",): ("model.embed_tokens.weight", _same, _same),
        ("final_norm",): ("model.norm.weight", _same, _same),
        ("lm_head",): ("lm_head.weight", _transpose, _transpose),
        ("layers", "attn_norm"): (layer + "input_layernorm.weight", _same, _same),
        ("layers", "mlp_norm"): (layer + "post_attention_layernorm.weight", _same, _same),
        ("layers", "wq"): (layer + "self_attn.q_proj.weight", *_in_heads(N)),
        ("layers", "wk"): (layer + "self_attn.k_proj.weight", *_in_heads(K)),
        ("layers", "wv"): (layer + "self_attn.v_proj.weight", *_in_heads(K)),
        ("layers", "wo"): (layer + "self_attn.o_proj.weight", *_out_heads(N)),
        ("layers", "bq"): (layer + "self_attn.q_proj.bias", *_bias_heads(N)),
        ("layers", "bk"): (layer + "self_attn.k_proj.bias", *_bias_heads(K)),
        ("layers", "bv"): (layer + "self_attn.v_proj.bias", *_bias_heads(K)),
        ("layers", "q_norm"): (layer + "self_attn.q_norm.weight", _same, _same),
        ("layers", "k_norm"): (layer + "self_attn.k_norm.weight", _same, _same),
        ("layers", "w_gate"): (layer + "mlp.gate_proj.weight", _transpose, _transpose),
        ("layers", "w_up"): (layer + "mlp.up_proj.weight", _transpose, _transpose),
        ("layers", "w_down"): (layer + "mlp.down_proj.weight", _transpose, _transpose),
        **(_moe_table(cfg) if cfg.is_moe else {}),
    }
    specs = param_specs(cfg)
    maps = []
    for path, (name, to_ours, to_hf) in table.items():
        node = specs
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            maps.append(WeightMap(path, name, to_ours, to_hf))
    return maps


# HF module names of each linear weight, as PEFT's target_modules spell them.
HF_MODULE_NAMES = {
    "wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
    "w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj",
}
