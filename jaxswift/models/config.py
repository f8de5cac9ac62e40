"""ModelConfig: the frozen, hashable description of a decoder-only transformer, and its HF config.json mapping.

A config is static under `jit`, so every field is a plain hashable value (tuples, not lists or dicts).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxswift.errors import ConfigError

# HF architecture name -> family. The families share one forward; they differ in config switches only.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral")
FAMILY_ARCHITECTURE = {family: arch for arch, family in ARCHITECTURES.items()}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int | None = None  # llama3, yarn
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn
    mrope_section: tuple[int, ...] = ()  # qwen2_vl: frequencies per (temporal, height, width) position row


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # qwen2
    qk_norm: bool = False  # qwen3
    sliding_windows: tuple[int, ...] = ()  # per layer; 0 = full attention; empty = all full
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; norms, softmax and logits math stay float32
    remat: str = "none"  # none | full | dots (save matmul outputs, recompute the rest)
    attn_impl: str = "auto"  # self-attention kernel: auto | einsum | xla | cudnn | splash (models/attention_kernels.py)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # mixture of experts (qwen2_moe, qwen3_moe, mixtral); num_experts = 0 for dense models. See models/moe.py.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # F of each routed expert
    shared_expert_intermediate_size: int = 0  # qwen2_moe: one sigmoid-gated shared expert; 0 = none
    norm_topk_prob: bool = False  # renormalize the top-k probabilities to sum to 1 (always on for mixtral)
    router_aux_loss_coef: float = 0.0  # HF's value; it joins the loss only when output_router_logits (as HF)
    output_router_logits: bool = False
    router_z_loss_coef: float = 0.0
    capacity_factor: float | None = None  # None = dropless; else each expert takes ceil(cf * tokens * k / E)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})")
        if self.remat not in ("none", "full", "dots"):
            raise ConfigError(f"remat must be none|full|dots, got {self.remat!r}")
        if self.attn_impl not in ("auto", "einsum", "xla", "cudnn", "splash"):
            raise ConfigError(f"attn_impl must be auto|einsum|xla|cudnn|splash, got {self.attn_impl!r}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok must be in 1..num_experts ({self.num_experts}), "
                              f"got {self.num_experts_per_tok}")
        if self.num_experts and self.moe_intermediate_size <= 0:
            raise ConfigError(f"moe_intermediate_size must be > 0, got {self.moe_intermediate_size}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"capacity_factor must be > 0 (or None for dropless), got {self.capacity_factor!r}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def aux_loss_coef(self) -> float:
        """The load-balancing loss weight that training applies (HF adds it only with output_router_logits)."""
        return self.router_aux_loss_coef if self.output_router_logits else 0.0

    @property
    def window_per_layer(self) -> tuple[int, ...]:
        return self.sliding_windows or (0,) * self.num_layers

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------------------------
# HF config.json <-> ModelConfig


def _require(d: dict, key: str, where: str):
    if key not in d or d[key] is None:
        raise ConfigError(f"{where}: missing required field {key!r}")
    return d[key]


def _rope_from_hf(d: dict, where: str) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files write `rope_theta` + `rope_scaling`.
    params = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "mrope":  # older Qwen2-VL configs: default frequencies, sections given separately
        rope_type = "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{where}: rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{where}: partial_rotary_factor != 1 is not supported")
    original = params.get("original_max_position_embeddings")
    if rope_type == "yarn" and original is None:
        original = d.get("max_position_embeddings")
    return RopeConfig(
        theta=float(theta), type=rope_type, factor=float(params.get("factor") or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"), mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"), truncate=bool(params.get("truncate", True)),
        mrope_section=tuple(int(s) for s in params.get("mrope_section") or ()))


def _sliding_windows(d: dict, family: str, num_layers: int) -> tuple[int, ...]:
    window = d.get("sliding_window")
    if family in ("mistral", "mixtral"):
        return (int(window),) * num_layers if window else ()
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        layer_types = d.get("layer_types")
        if layer_types is None and d.get("use_sliding_window") and window:
            # Older qwen configs: layers at index >= max_window_layers use the window.
            start = d.get("max_window_layers", num_layers)
            layer_types = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
        if not layer_types or not window or not d.get("use_sliding_window", True):
            return ()
        windows = tuple(int(window) if t == "sliding_attention" else 0 for t in layer_types)
        return windows if any(windows) else ()
    if family == "llama" and window:
        raise ConfigError("llama configs have no sliding window")
    return ()


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def _moe_fields(d: dict, family: str, where: str) -> dict:
    """The MoE fields of a qwen2_moe / qwen3_moe / mixtral config.json; {} for dense families."""
    if family not in MOE_FAMILIES:
        return {}
    experts = d.get("num_experts") or d.get("num_local_experts")
    if not experts:
        raise ConfigError(f"{where}: missing required field 'num_experts' (or 'num_local_experts')")
    # Layers are stacked and scanned, so every block must have the same shape: all MoE or none.
    step, dense = d.get("decoder_sparse_step", 1), sorted(d.get("mlp_only_layers") or [])
    if step != 1 or dense:
        raise ConfigError(f"{where}: decoder_sparse_step={step}, mlp_only_layers={dense}: models that mix dense and "
                          f"MoE blocks are not supported (every layer must be an MoE block)")
    if d.get("router_jitter_noise"):
        raise ConfigError(f"{where}: router_jitter_noise={d['router_jitter_noise']} is not supported (set it to 0)")
    if family == "qwen2_moe" and not d.get("shared_expert_intermediate_size"):
        raise ConfigError(f"{where}: missing required field 'shared_expert_intermediate_size'")
    capacity = d.get("capacity_factor")
    return dict(
        num_experts=int(experts),
        num_experts_per_tok=int(_require(d, "num_experts_per_tok", where)),
        moe_intermediate_size=int(_require(d, "intermediate_size" if family == "mixtral"
                                           else "moe_intermediate_size", where)),
        shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
        norm_topk_prob=True if family == "mixtral" else bool(d.get("norm_topk_prob", False)),
        router_aux_loss_coef=float(d.get("router_aux_loss_coef") or 0.0),
        output_router_logits=bool(d.get("output_router_logits", False)),
        router_z_loss_coef=float(d.get("router_z_loss_coef") or 0.0),
        capacity_factor=None if capacity is None else float(capacity))


def config_from_hf(d: dict[str, Any], *, where: str = "config.json", dtype: str | None = None) -> ModelConfig:
    """Reads a Hugging Face config.json dict; raises ConfigError naming `where` for what we cannot run."""
    archs = d.get("architectures") or []
    family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if family is None and d.get("model_type") in FAMILY_ARCHITECTURE and not archs:
        family = d["model_type"]
    if family is None:
        raise ConfigError(
            f"{where}: unknown architecture {archs or d.get('model_type')!r} "
            f"(supported: {', '.join(ARCHITECTURES)})")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (only silu)")
    if d.get("mlp_bias"):
        raise ConfigError(f"{where}: mlp_bias=true is not supported")
    num_heads = int(_require(d, "num_attention_heads", where))
    hidden = int(_require(d, "hidden_size", where))
    num_layers = int(_require(d, "num_hidden_layers", where))
    torch_dtype = d.get("dtype") or d.get("torch_dtype")
    param_dtype = dtype or (torch_dtype if torch_dtype in DTYPES else "float32")
    return ModelConfig(
        family=family,
        vocab_size=int(_require(d, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(_require(d, "intermediate_size", where)),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
        head_dim=int(d.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(d, where),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=(family == "qwen2" or (family == "qwen2_moe" and bool(d.get("qkv_bias", True)))
                  or bool(d.get("attention_bias", False))),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        sliding_windows=_sliding_windows(d, family, num_layers),
        param_dtype=param_dtype,
        dtype=dtype or param_dtype,
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=_eos_ids(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"),
        **_moe_fields(d, family, where),
    )


def _rope_to_hf(rope: RopeConfig) -> dict:
    if rope.type == "default":
        mrope = {"mrope_section": list(rope.mrope_section)} if rope.mrope_section else {}
        return {"rope_type": "default", "rope_theta": rope.theta, **mrope}
    out = {"rope_type": rope.type, "rope_theta": rope.theta, "factor": rope.factor}
    if rope.type == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                   original_max_position_embeddings=rope.original_max_position_embeddings)
    if rope.type == "yarn":
        out.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, truncate=rope.truncate,
                   original_max_position_embeddings=rope.original_max_position_embeddings)
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(rope, key) is not None:
                out[key] = getattr(rope, key)
    return out


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A config.json dict that transformers loads into the same architecture."""
    rope = _rope_to_hf(cfg.rope)
    d = {
        "architectures": [FAMILY_ARCHITECTURE[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        # Both spellings, so that transformers 4.x (rope_theta/rope_scaling) and 5.x (rope_parameters) agree.
        "rope_theta": cfg.rope.theta,
        "rope_scaling": None if cfg.rope.type == "default" else rope,
        "rope_parameters": rope,
        "dtype": cfg.param_dtype,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": (list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1
                         else (cfg.eos_token_ids[0] if cfg.eos_token_ids else None)),
        "pad_token_id": cfg.pad_token_id,
    }
    if cfg.family in ("llama", "qwen3", "qwen3_moe", "mixtral"):
        d["attention_bias"] = cfg.qkv_bias
    if cfg.family == "qwen2_moe":
        d["qkv_bias"] = cfg.qkv_bias
    d.update(_moe_to_hf(cfg))
    windows = set(cfg.window_per_layer) - {0}
    if cfg.family in ("mistral", "mixtral"):
        d["sliding_window"] = windows.pop() if windows else None
    elif cfg.family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        d["use_sliding_window"] = bool(windows)
        d["sliding_window"] = windows.pop() if windows else None
        d["max_window_layers"] = cfg.num_layers
        d["layer_types"] = ["sliding_attention" if w else "full_attention" for w in cfg.window_per_layer]
    return d


def _moe_to_hf(cfg: ModelConfig) -> dict:
    if not cfg.is_moe:
        return {}
    d = {"num_local_experts" if cfg.family == "mixtral" else "num_experts": cfg.num_experts,
         "num_experts_per_tok": cfg.num_experts_per_tok,
         "router_aux_loss_coef": cfg.router_aux_loss_coef, "output_router_logits": cfg.output_router_logits}
    if cfg.family == "mixtral":
        d["intermediate_size"] = cfg.moe_intermediate_size
        d["router_jitter_noise"] = 0.0
    else:
        d.update(moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                 decoder_sparse_step=1, mlp_only_layers=[])
    if cfg.family == "qwen2_moe":
        d["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
    if cfg.router_z_loss_coef:
        d["router_z_loss_coef"] = cfg.router_z_loss_coef
    if cfg.capacity_factor is not None:
        d["capacity_factor"] = cfg.capacity_factor
    return d
