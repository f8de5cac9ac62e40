"""LoRA, rsLoRA, DoRA and PiSSA as a params transformation (house rule 7).

`add_lora` swaps each targeted projection weight for a `LoraWeight` that keeps the frozen base beside the
adapter; the forward's `linear` calls `LoraWeight.apply`, which adds `(x @ A) @ B * scale` without ever forming
W + BA. Layouts follow the base weight's: the contracted (input) axes come first, the output axes last, so
  base [L, *in, *out]    a [L, *in, r]    b [L, r, *out]    magnitude (DoRA) [L, *out]
and every array keeps the leading layers axis, so `jax.lax.scan` slices adapters with the base.

Training:
    params = add_lora(params, cfg, LoraConfig(rank=8), key)
    trainable, frozen = partition(params)             # gradients only w.r.t. adapters; one copy of the base
    loss = lambda t, rng: loss_fn(with_dropout(combine(t, frozen), rng))
`with_dropout` gives each adapter of each layer its own key, so lora_dropout is real in training (as peft, one
independent mask per module); params without keys (inference) skip it. Each jax.random call site costs compile
time (seconds with threefry on CPU): an "rbg"/"unsafe_rbg" key compiles faster if that matters.
Adapters are float32 whatever the base dtype (as peft's autocast_adapter_dtype); they are cast to the compute
dtype inside the matmul.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxswift.errors import CheckpointError, ConfigError
from jaxswift.models.config import ModelConfig
from jaxswift.models.families import HF_MODULE_NAMES, weight_maps
from jaxswift.models.spec import param_specs
from jaxswift.models.transformer import linear, matmul_einsum

ALL_LINEAR = tuple(HF_MODULE_NAMES)  # wq wk wv wo w_gate w_up w_down: never lm_head or embeddings (as peft)
INITS = ("true", "gaussian", "pissa")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Defaults are ms-swift's (lora_rank 8, lora_alpha 32, lora_dropout 0.05, all-linear).

    target_modules: "all-linear"; a list of names (HF `q_proj` or ours `wq`, also `self_attn.q_proj`); or any
    other string, a regex that must fully match HF module names (`model.layers.0.self_attn.q_proj`) or the
    short names, as peft treats a string.
    init: "true" (peft's default: A kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r), B = 0) or "pissa".
    """
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "true"

    def __post_init__(self):
        if isinstance(self.target_modules, (list, tuple)):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.init is True or str(self.init).lower() == "true":
            object.__setattr__(self, "init", "true")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"lora rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ConfigError(f"lora init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not self.target_modules:
            raise ConfigError("lora target_modules is empty")

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank


# --- the weight ---------------------------------------------------------------------------------------------------


def split_equation(equation: str):
    """(x spec, contracted letters, weight's output letters, output spec, the rank letter) of a linear's einsum."""
    inputs, out = equation.replace(" ", "").split("->")
    x_spec, w_spec = inputs.split(",")
    contracted = "".join(c for c in w_spec if c in x_spec)
    w_out = "".join(c for c in w_spec if c not in x_spec)
    if w_spec != contracted + w_out:
        raise ValueError(f"LoRA needs the weight's input axes before its output axes, got {equation!r}")
    rank = next(c for c in string.ascii_letters if c not in equation)
    return x_spec, contracted, w_out, out, rank


def _dropout(x, rate: float, key):
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _delta(a, b, n_in: int):
    """B A in our layout ([..., *in, *out]), for merging and for DoRA's norm; leading axes (layers) batch."""
    lead = a.ndim - 1 - n_in
    in_shape, out_shape, r = a.shape[lead:lead + n_in], b.shape[lead + 1:], a.shape[-1]
    a2 = a.reshape(*a.shape[:lead], math.prod(in_shape), r)
    b2 = b.reshape(*b.shape[:lead], r, math.prod(out_shape))
    return jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(*a.shape[:lead], *in_shape, *out_shape)


@struct.dataclass
class LoraWeight:
    """A frozen base weight with its adapter; see the module docstring for layouts.

    init_a / init_b (PiSSA only) keep the initial adapter, frozen, so an export can be converted to a standard
    LoRA of the original base. dropout_key is set only by `with_dropout` (training); None means no dropout.
    """
    base: Any
    a: Any
    b: Any
    magnitude: Any = None
    init_a: Any = None
    init_b: Any = None
    dropout_key: Any = None
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    n_in: int = struct.field(pytree_node=False, default=1)

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def apply(self, equation: str, x):
        x_spec, contracted, w_out, out, r = split_equation(equation)
        kept = "".join(c for c in x_spec if c not in contracted)
        base_out = linear(equation, x, self.base)
        lora_x = x if self.dropout_key is None else _dropout(x, self.dropout, self.dropout_key)
        h = matmul_einsum(f"{x_spec},{contracted}{r}->{kept}{r}", lora_x, self.a.astype(x.dtype))
        lora_out = matmul_einsum(f"{kept}{r},{r}{w_out}->{out}", h, self.b.astype(x.dtype))
        if self.magnitude is None:
            return base_out + lora_out * self.scale
        # DoRA, as peft: y = W x + (m/|W+sBA| - 1) W x' + (m/|W+sBA|) s B A x', x' = dropout(x); the norm is
        # detached (DoRA paper 4.3). It is the one place W + sBA is formed, one layer at a time inside the scan.
        factor = (self.magnitude / jax.lax.stop_gradient(self.weight_norm())).astype(x.dtype)
        base_drop = base_out if self.dropout_key is None else linear(equation, lora_x, self.base)
        scaled = lambda y: jnp.einsum(f"{out},{w_out}->{out}", y, factor)  # noqa: E731  per output feature
        return base_out + scaled(base_drop) - base_drop + scaled(lora_out) * self.scale

    def _dense(self):
        """W + scale*BA in float32 (merge and DoRA's norm only; training never forms it otherwise)."""
        delta = _delta(self.a.astype(jnp.float32), self.b.astype(jnp.float32), self.n_in)
        return self.base.astype(jnp.float32) + self.scale * delta

    def _input_axes(self) -> tuple[int, ...]:
        lead = self.a.ndim - 1 - self.n_in  # 1 with the layers axis, 0 inside the scan
        return tuple(range(lead, lead + self.n_in))

    def weight_norm(self):
        """Per output feature L2 norm of W + scale*BA over the input axes (peft's column norm), float32."""
        return jnp.linalg.norm(self._dense(), axis=self._input_axes())

    def merged(self):
        """W + scale*BA (DoRA: rescaled per output feature to the magnitude), in the base dtype."""
        w = self._dense()
        if self.magnitude is not None:
            norm = jnp.linalg.norm(w, axis=self._input_axes(), keepdims=True)
            w = w * jnp.expand_dims(self.magnitude.astype(jnp.float32), self._input_axes()) / norm
        return w.astype(self.base.dtype)


def is_lora(x) -> bool:
    return isinstance(x, LoraWeight)


# --- targets ------------------------------------------------------------------------------------------------------


def module_names(cfg: ModelConfig) -> dict[str, str]:
    """ours -> HF module path template, e.g. wq -> model.layers.{i}.self_attn.q_proj."""
    return {m.path[-1]: m.hf_name.removesuffix(".weight") for m in weight_maps(cfg)
            if m.path[0] == "layers" and m.path[-1] in ALL_LINEAR}


def _regex_targets(pattern: str, modules: dict[str, str], num_layers: int) -> list[str]:
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"lora target_modules {pattern!r} is not a valid regex ({e})") from None
    chosen = []
    for name, template in modules.items():
        hits = [bool(regex.fullmatch(template.format(i=i))) for i in range(num_layers)]
        if regex.fullmatch(name) or regex.fullmatch(HF_MODULE_NAMES[name]) or all(hits):
            chosen.append(name)
        elif any(hits):
            raise ConfigError(f"lora target_modules {pattern!r} selects {HF_MODULE_NAMES[name]} in some layers only; "
                              "layers are stacked, so a module is adapted in all layers or none")
    return chosen


def resolve_targets(cfg: ModelConfig, target_modules) -> list[str]:
    """Our names of the targeted projections, in model order; ConfigError when a name matches nothing."""
    modules = module_names(cfg)
    available = ", ".join(f"{HF_MODULE_NAMES[n]} ({n})" for n in modules)
    if target_modules == "all-linear":
        return list(modules)
    if isinstance(target_modules, str):
        chosen = _regex_targets(target_modules, modules, cfg.num_layers)
        if not chosen:
            raise ConfigError(f"lora target_modules {target_modules!r} matches no module; available: {available}")
        return chosen
    chosen = set()
    for target in target_modules:
        hits = {n for n, template in modules.items() if target == n or template.endswith("." + target)}
        if not hits:
            raise ConfigError(f"lora target_modules: {target!r} names no module of this model; available: {available}")
        chosen |= hits
    return [n for n in modules if n in chosen]


# --- adding adapters ----------------------------------------------------------------------------------------------


def input_axes(cfg: ModelConfig, name: str) -> int:
    spec = param_specs(cfg)["layers"][name]
    n_in = len(spec.fan_in_axes)
    assert spec.fan_in_axes == tuple(range(1, 1 + n_in)), (name, spec.fan_in_axes)  # inputs lead, after L
    return n_in


def _pissa(w, rank: int, scale: float, n_in: int):
    """PiSSA (peft init_lora_weights="pissa"): the top-r singular triplets go to the adapter, the base keeps
    the residual, so base + scale*BA equals the original weight."""
    L, in_shape, out_shape = w.shape[0], w.shape[1:1 + n_in], w.shape[1 + n_in:]
    w2 = w.astype(jnp.float32).reshape(L, math.prod(in_shape), math.prod(out_shape))
    u, s, vh = jnp.linalg.svd(w2, full_matrices=False)
    root = jnp.sqrt(s[:, :rank] / scale)
    a = (u[:, :, :rank] * root[:, None, :]).reshape(L, *in_shape, rank)
    b = (root[:, :, None] * vh[:, :rank, :]).reshape(L, rank, *out_shape)
    residual = w.astype(jnp.float32) - scale * _delta(a, b, n_in)
    return a, b, residual.astype(w.dtype)


def _init_arrays(w, lora_cfg: LoraConfig, n_in: int, noise) -> dict:
    """The new arrays of one target: a, b, and the DoRA magnitude or the PiSSA residual base.
    noise [L, *in, r]: uniform in [-1, 1) for init "true", standard normal for "gaussian"."""
    r, scale = lora_cfg.rank, lora_cfg.scale
    in_shape, out_shape = w.shape[1:1 + n_in], w.shape[1 + n_in:]
    out = {}
    if lora_cfg.init == "pissa":
        out["a"], out["b"], out["base"] = _pissa(w, r, scale, n_in)
        out["init_a"], out["init_b"] = jnp.copy(out["a"]), jnp.copy(out["b"])  # donation must not see one buffer twice
    else:
        # "true" is torch's kaiming_uniform_(a=sqrt(5)) on the (r, in) matrix: bound = 1/sqrt(fan_in)
        out["a"] = noise / math.sqrt(math.prod(in_shape)) if lora_cfg.init == "true" else noise / r
        out["b"] = jnp.zeros((w.shape[0], r, *out_shape), jnp.float32)
    if lora_cfg.use_dora:  # peft: the magnitude starts at |W + sBA|, so DoRA's output equals LoRA's at init
        out["magnitude"] = LoraWeight(out.get("base", w), out["a"], out["b"], scale=scale, n_in=n_in).weight_norm()
    return out


@partial(jax.jit, static_argnums=(1, 2))
def _init_all(weights: dict, lora_cfg: LoraConfig, n_ins: tuple, key) -> dict:
    """{name: new arrays} for all targets in one compiled call. One random draw, sliced per target: each
    jax.random call site costs seconds of compile on CPU, so there is one, not one per target."""
    shapes = [(weights[name].shape[0], *weights[name].shape[1:1 + n_in], lora_cfg.rank) for name, n_in in n_ins]
    sizes = [math.prod(shape) for shape in shapes]
    if lora_cfg.init == "gaussian":
        flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
    else:
        flat = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return {name: _init_arrays(weights[name], lora_cfg, n_in, flat[start:start + size].reshape(shape))
            for (name, n_in), start, size, shape in zip(n_ins, starts, sizes, shapes)}


def add_lora(params: dict, cfg: ModelConfig, lora_cfg: LoraConfig, key) -> dict:
    """params with a LoraWeight in place of each targeted projection (the base arrays are shared, not copied)."""
    targets = resolve_targets(cfg, lora_cfg.target_modules)
    layers = dict(params["layers"])
    for name in targets:
        if is_lora(layers[name]):
            raise ConfigError(f"{name} ({HF_MODULE_NAMES[name]}) already carries a LoRA adapter; merge_lora first")
    n_ins = tuple((name, input_axes(cfg, name)) for name in targets)
    if lora_cfg.init == "pissa":
        for name, n_in in n_ins:
            shape = layers[name].shape
            if lora_cfg.rank > min(math.prod(shape[1:1 + n_in]), math.prod(shape[1 + n_in:])):
                raise ConfigError(f"pissa rank {lora_cfg.rank} exceeds the smaller side of {name} {shape[1:]}")
    shape_only = dataclasses.replace(lora_cfg, dropout=0.0, target_modules="all-linear")  # fewer recompiles
    new = _init_all({name: layers[name] for name in targets}, shape_only, n_ins, key)
    for name, n_in in n_ins:  # the base arrays are shared with `params`, not copied (PiSSA replaces them)
        layers[name] = LoraWeight(layers[name], None, None, scale=lora_cfg.scale, dropout=lora_cfg.dropout,
                                  n_in=n_in).replace(**new[name])
    return {**params, "layers": layers}


def with_dropout(params, key):
    """Training view of params: every LoraWeight with dropout > 0 gets one PRNG key per layer (a [L] key array
    that the decoder's scan slices), each target its own. Call inside the loss with a fresh key per step; params
    without keys (the default, and inference) run without dropout."""
    leaves, treedef = jax.tree.flatten(params, is_leaf=is_lora)
    dropped = [i for i, leaf in enumerate(leaves) if is_lora(leaf) and leaf.dropout > 0]
    if not dropped:
        return params
    layers = max(leaves[i].base.shape[0] for i in dropped)
    keys = jax.random.split(key, (len(dropped), layers))  # one split call site (each costs compile time)
    for row, i in enumerate(dropped):
        leaves[i] = leaves[i].replace(dropout_key=keys[row, :leaves[i].base.shape[0]])
    return jax.tree.unflatten(treedef, leaves)


# --- training views -----------------------------------------------------------------------------------------------

_TRAINABLE = ("a", "b", "magnitude")
_FROZEN = ("base", "init_a", "init_b", "dropout_key")


def _blank(w: LoraWeight, fields, value=None) -> LoraWeight:
    """w with the given fields replaced by `value` (or a function of the field), keeping None fields None."""
    return w.replace(**{f: None if getattr(w, f) is None else value(getattr(w, f)) if callable(value) else value
                        for f in fields})


def trainable_mask(params):
    """Same structure as params: True at LoRA a / b / magnitude, False everywhere else (for optax)."""
    def one(x):
        # a quantized base (nf4, int8) is a pytree of its own: False on each of its leaves
        frozen = lambda f: jax.tree.map(lambda _: False, f)  # noqa: E731
        return _blank(_blank(x, _TRAINABLE, True), _FROZEN, frozen) if is_lora(x) else False
    return jax.tree.map(one, params, is_leaf=is_lora)


def partition(params):
    """(trainable, frozen): the adapters, and everything else; each has None where the other holds an array.
    Take gradients w.r.t. `trainable` only; `combine` puts them back together without copying the base."""
    trainable = jax.tree.map(lambda x: _blank(x, _FROZEN) if is_lora(x) else None, params, is_leaf=is_lora)
    frozen = jax.tree.map(lambda x: _blank(x, _TRAINABLE) if is_lora(x) else x, params, is_leaf=is_lora)
    return trainable, frozen


def combine(trainable, frozen):
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def lora_logical_axes(logical, params):
    """Logical axes for params carrying LoraWeights (from models.spec.logical_axes(cfg)): the rank axis is
    `lora_rank`, the other adapter axes follow the base weight's."""
    def one(axes, x):
        if not is_lora(x):
            return axes
        lead, inputs, outputs = axes[:1], axes[1:1 + x.n_in], axes[1 + x.n_in:]
        a_axes, b_axes = (*lead, *inputs, "lora_rank"), (*lead, "lora_rank", *outputs)
        return LoraWeight(axes, a_axes, b_axes,
                          None if x.magnitude is None else (*lead, *outputs),
                          None if x.init_a is None else a_axes, None if x.init_b is None else b_axes,
                          None if x.dropout_key is None else lead, x.scale, x.dropout, x.n_in)
    return jax.tree.map(one, logical, params, is_leaf=lambda t: isinstance(t, tuple))


def lora_disabled(params):
    """The base model's view of params with adapters off, sharing the base arrays (e.g. the DPO/GRPO reference:
    no second copy). A PiSSA base is the residual, so there the initial adapter stays on: base + s*B0A0 = W."""
    def off(x):
        if not is_lora(x):
            return x
        if x.init_a is None:
            return x.base
        return LoraWeight(x.base, x.init_a, x.init_b, scale=x.scale, n_in=x.n_in)
    return jax.tree.map(off, params, is_leaf=is_lora)


def merge_lora(params):
    """Plain params: each LoraWeight replaced by W + scale*BA (DoRA-aware), in the base dtype."""
    return jax.tree.map(lambda x: x.merged() if is_lora(x) else x, params, is_leaf=is_lora)


# --- adapter state (checkpoints) ----------------------------------------------------------------------------------


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _lora_items(params) -> dict[str, LoraWeight]:
    """{'layers/wq': LoraWeight, ...}."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)
    return {_path_str(path): leaf for path, leaf in flat if is_lora(leaf)}


def lora_state(params) -> dict[str, dict[str, jax.Array]]:
    """{'layers/wq': {'a': ..., 'b': ..., ['magnitude': ...]}, ...}: the trainable adapter arrays only. A PiSSA
    base is not included: add_lora(init='pissa') on the same base recomputes it deterministically."""
    return {path: {f: getattr(w, f) for f in _TRAINABLE if getattr(w, f) is not None}
            for path, w in _lora_items(params).items()}


def load_lora_state(params, state: dict, source: str = "adapter state"):
    """params with the adapter arrays of `state` (from lora_state); the params must already carry LoRA."""
    unexpected = sorted(set(state) - set(_lora_items(params)))
    if unexpected:
        raise CheckpointError(f"{source}: adapters {unexpected} have no LoRA target in these params "
                              f"(targets: {sorted(_lora_items(params))})")
    return jax.tree_util.tree_map_with_path(
        lambda path, x: _load_one(x, _path_str(path), state, source) if is_lora(x) else x, params, is_leaf=is_lora)


def _load_one(w: LoraWeight, path: str, state: dict, source: str) -> LoraWeight:
    if path not in state:
        raise CheckpointError(f"{source}: no adapter for {path}")
    new = {}
    for f in _TRAINABLE:
        current = getattr(w, f)
        if current is None:
            continue
        if f not in state[path]:
            raise CheckpointError(f"{source}: {path} lacks {f!r}")
        value = jnp.asarray(state[path][f], current.dtype)
        if value.shape != current.shape:
            raise CheckpointError(f"{source}: {path}/{f} has shape {value.shape}, expected {current.shape}")
        new[f] = value
    return w.replace(**new)
