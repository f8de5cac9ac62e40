"""The CLIP / SigLIP vision transformer (llava's and idefics3 / SmolVLM's tower) and their connectors, as pure
functions over a params pytree.

Tower (`vit_hidden_states`): an image's pixels, cut host-side into P patches of X = C * p * p values
(data/images.py: `vit_patches`), -> patch embedding (the stride = kernel Conv2d as one matmul; SigLIP's has a
bias) -> CLIP: a class token in front -> + learned position embeddings (one per position id, see `vit_inputs`)
-> CLIP: pre-LayerNorm -> L pre-norm blocks of full bidirectional attention (q, k, v with biases) and a fc1-act-fc2
MLP, stacked and scanned. The hidden states are numbered as transformers does: 0 is the embeddings (after CLIP's
pre-norm), k the output of block k; `post_norm` (SigLIP's post_layernorm) is applied only where the family does.

Connectors:
  llava:    selected hidden states (default strategy: without the first token) concatenated over the selected
            layers -> Linear -> act -> Linear into the LLM width (`projector`).
  idefics3: the last hidden state, post-normed -> pixel shuffle (s x s neighbouring patches into one vector of
            s^2 E) -> one Linear without bias (`pixel_shuffle_connector`).

Extra letters beside the legend of models/transformer.py: I images (tiles), P patches, S tokens of one image
(P, + 1 with a class token), X pixels per patch, E vision width.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.errors import ConfigError
from jaxswift.models.spec import ParamSpec
from jaxswift.models.transformer import linear

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "silu")
VIT_KINDS = ("clip", "siglip")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    kind: str  # clip | siglip (idefics3's tower is SigLIP's, with bucketed positions for smaller tiles)
    depth: int
    embed_dim: int  # E
    num_heads: int
    mlp_dim: int
    image_size: int
    patch_size: int
    in_channels: int = 3
    hidden_act: str = "quick_gelu"
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.kind not in VIT_KINDS:
            raise ConfigError(f"vision tower kind {self.kind!r} is not supported ({', '.join(VIT_KINDS)})")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"vision hidden_size ({self.embed_dim}) must be a multiple of num_attention_heads "
                              f"({self.num_heads})")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision image_size ({self.image_size}) must be a multiple of patch_size "
                              f"({self.patch_size})")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"vision hidden_act {self.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def class_token(self) -> bool:
        return self.kind == "clip"

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.patches_per_side ** 2 + self.class_token

    @property
    def patch_pixels(self) -> int:
        return self.in_channels * self.patch_size ** 2


def layer_norm(x, weight, bias, eps: float):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def activation(name: str, x):
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "gelu_pytorch_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "silu":
        return jax.nn.silu(x)
    raise ConfigError(f"activation {name!r} is not supported ({', '.join(ACTIVATIONS)})")


# ---------------------------------------------------------------------------------------------------------------
# Params


def vit_specs(v: ViTConfig) -> dict:
    L, E, N, H, F = v.depth, v.embed_dim, v.num_heads, v.head_dim, v.mlp_dim
    norm = lambda: ParamSpec((E,), ("norm",), "ones")  # noqa: E731
    zeros = lambda: ParamSpec((E,), ("norm",), "zeros")  # noqa: E731
    specs = {
        "patch_embed": ParamSpec((v.patch_pixels, E), (None, "embed"), fan_in_axes=(0,)),
        "pos_embed": ParamSpec((v.num_positions, E), (None, "embed"), fan_in_axes=(1,)),
        "layers": {
            "norm1": ParamSpec((L, E), ("layers", "norm"), "ones"),
            "norm1_bias": ParamSpec((L, E), ("layers", "norm"), "zeros"),
            "wq": ParamSpec((L, E, N, H), ("layers", "embed", "heads", "head_dim"), fan_in_axes=(1,)),
            "bq": ParamSpec((L, N, H), ("layers", "heads", "head_dim"), "zeros"),
            "wk": ParamSpec((L, E, N, H), ("layers", "embed", "heads", "head_dim"), fan_in_axes=(1,)),
            "bk": ParamSpec((L, N, H), ("layers", "heads", "head_dim"), "zeros"),
            "wv": ParamSpec((L, E, N, H), ("layers", "embed", "heads", "head_dim"), fan_in_axes=(1,)),
            "bv": ParamSpec((L, N, H), ("layers", "heads", "head_dim"), "zeros"),
            "wo": ParamSpec((L, N, H, E), ("layers", "heads", "head_dim", "embed"), fan_in_axes=(1, 2)),
            "bo": ParamSpec((L, E), ("layers", "norm"), "zeros"),
            "norm2": ParamSpec((L, E), ("layers", "norm"), "ones"),
            "norm2_bias": ParamSpec((L, E), ("layers", "norm"), "zeros"),
            "fc1": ParamSpec((L, E, F), ("layers", "embed", "mlp"), fan_in_axes=(1,)),
            "fc1_bias": ParamSpec((L, F), ("layers", "mlp"), "zeros"),
            "fc2": ParamSpec((L, F, E), ("layers", "mlp", "embed"), fan_in_axes=(1,)),
            "fc2_bias": ParamSpec((L, E), ("layers", "norm"), "zeros"),
        },
        # Loaded and saved for every kind (transformers keeps it), applied only by the families that use it.
        "post_norm": norm(),
        "post_norm_bias": zeros(),
    }
    if v.class_token:
        specs.update(class_embed=ParamSpec((E,), ("embed",), fan_in_axes=(0,)), pre_norm=norm(),
                     pre_norm_bias=zeros())
    else:
        specs["patch_bias"] = zeros()
    return specs


def projector_specs(in_dim: int, out_dim: int, bias: bool) -> dict:
    """llava's multi_modal_projector: Linear(in, D) -> act -> Linear(D, D)."""
    specs = {"fc1": ParamSpec((in_dim, out_dim), (None, "embed"), fan_in_axes=(0,)),
             "fc2": ParamSpec((out_dim, out_dim), ("mlp", "embed"), fan_in_axes=(0,))}
    if bias:
        specs.update(fc1_bias=ParamSpec((out_dim,), ("norm",), "zeros"),
                     fc2_bias=ParamSpec((out_dim,), ("norm",), "zeros"))
    return specs


def pixel_shuffle_specs(embed_dim: int, scale: int, out_dim: int) -> dict:
    """idefics3's connector: one Linear(s^2 E, D), no bias."""
    return {"proj": ParamSpec((embed_dim * scale ** 2, out_dim), (None, "embed"), fan_in_axes=(0,))}


# ---------------------------------------------------------------------------------------------------------------
# Host-side inputs


class ViTInputs(NamedTuple):
    """All images (or tiles) of a batch, in placeholder order: pixels [I, P, X] (`vit_patches`), position_ids
    [I, S] (the position-embedding row of every token, the class token's included)."""
    pixels: np.ndarray | jax.Array
    position_ids: np.ndarray | jax.Array


def bucketed_positions(rows: int, cols: int, per_side: int) -> np.ndarray:
    """[rows * cols] position ids of a rows x cols patch grid on a per_side x per_side table: each patch takes the
    table cell its fractional coordinate falls in (idefics3's NaViT-style embeddings; identity for a full grid)."""
    boundaries = np.arange(1 / per_side, 1.0, 1 / per_side, dtype=np.float32)
    def buckets(n):
        coords = np.minimum(np.arange(n, dtype=np.float32) * np.float32(1.0 / n), np.float32(1.0 - 1e-6))
        return np.searchsorted(boundaries, coords, side="right")
    return (buckets(rows)[:, None] * per_side + buckets(cols)[None, :]).reshape(-1)


def vit_inputs(patches, grids, v: ViTConfig) -> ViTInputs:
    """patches: one [P, X] array per image / tile; grids: its (rows, cols) of patches."""
    positions = []
    for p, (rows, cols) in zip(patches, grids):
        if len(p) != rows * cols:
            raise ValueError(f"{len(p)} patches for a grid of {rows}x{cols}")
        if (rows, cols) == (v.patches_per_side,) * 2:
            ids = np.arange(rows * cols)
        else:
            ids = bucketed_positions(rows, cols, v.patches_per_side)
        positions.append(np.concatenate([[0], ids + 1]) if v.class_token else ids)
    if len({len(p) for p in patches}) > 1:
        raise ValueError("the images of one tower batch must have the same number of patches")
    return ViTInputs(np.stack(patches).astype(np.float32), np.stack(positions).astype(np.int32))


# ---------------------------------------------------------------------------------------------------------------
# The tower


def vit_block(x_ISE, layer, v: ViTConfig):
    h = layer_norm(x_ISE, layer["norm1"], layer["norm1_bias"], v.norm_eps)
    q = linear("ISE,ENH->ISNH", h, layer["wq"]) + layer["bq"].astype(h.dtype)
    k = linear("ISE,ENH->ISNH", h, layer["wk"]) + layer["bk"].astype(h.dtype)
    val = linear("ISE,ENH->ISNH", h, layer["wv"]) + layer["bv"].astype(h.dtype)
    scores = jnp.einsum("ISNH,ITNH->INST", q, k, preferred_element_type=jnp.float32) * v.head_dim ** -0.5
    probs = jax.nn.softmax(scores, axis=-1).astype(val.dtype)
    attn = jnp.einsum("INST,ITNH->ISNH", probs, val)
    x_ISE = x_ISE + linear("ISNH,NHE->ISE", attn, layer["wo"]) + layer["bo"].astype(x_ISE.dtype)
    h = layer_norm(x_ISE, layer["norm2"], layer["norm2_bias"], v.norm_eps)
    h = activation(v.hidden_act, linear("ISE,EF->ISF", h, layer["fc1"]) + layer["fc1_bias"].astype(h.dtype))
    return x_ISE + linear("ISF,FE->ISE", h, layer["fc2"]) + layer["fc2_bias"].astype(h.dtype)


def vit_embeddings(params, inputs: ViTInputs, v: ViTConfig, dtype=jnp.float32):
    """[I, S, E]: hidden state 0."""
    x = linear("IPX,XE->IPE", jnp.asarray(inputs.pixels, dtype), params["patch_embed"])
    if "patch_bias" in params:
        x = x + params["patch_bias"].astype(x.dtype)
    if v.class_token:
        cls = jnp.broadcast_to(params["class_embed"].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
    x = x + jnp.take(params["pos_embed"], jnp.asarray(inputs.position_ids), axis=0).astype(x.dtype)
    if v.class_token:
        x = layer_norm(x, params["pre_norm"], params["pre_norm_bias"], v.norm_eps)
    return x


def hidden_index(layer: int, depth: int) -> int:
    """transformers' hidden_states[layer] as a count of blocks run (negative: from the end, -1 = all)."""
    index = layer if layer >= 0 else depth + 1 + layer
    if not 0 <= index <= depth:
        raise ConfigError(f"vision feature layer {layer} is out of range for a {depth}-layer tower")
    return index


def vit_hidden_states(params, inputs: ViTInputs, v: ViTConfig, layers: tuple[int, ...], dtype=jnp.float32):
    """The hidden states [I, S, E] numbered `layers` (transformers' numbering), in that order. Only the blocks up
    to the deepest one asked for run."""
    wanted = [hidden_index(i, v.depth) for i in layers]
    x = vit_embeddings(params, inputs, v, dtype)
    n = max(wanted)
    if n == 0:
        return [x for _ in wanted]
    stack = jax.tree.map(lambda a: a[:n], params["layers"]) if n < v.depth else params["layers"]

    def body(x, layer):
        x = vit_block(x, layer, v)
        return x, x

    _, ys = jax.lax.scan(body, x, stack)
    return [x if i == 0 else ys[i - 1] for i in wanted]


def post_norm(params, x_ISE, v: ViTConfig):
    return layer_norm(x_ISE, params["post_norm"], params["post_norm_bias"], v.norm_eps)


# ---------------------------------------------------------------------------------------------------------------
# Connectors


def projector(params, x, act: str):
    """llava: [I, S, K] -> [I, S, D]."""
    h = linear("ISK,KD->ISD", x, params["fc1"])
    if "fc1_bias" in params:
        h = h + params["fc1_bias"].astype(h.dtype)
    h = linear("ISK,KD->ISD", activation(act, h), params["fc2"])
    return h + params["fc2_bias"].astype(h.dtype) if "fc2_bias" in params else h


def pixel_shuffle(x_ISE, scale: int):
    """[I, S, E] -> [I, S / s^2, s^2 E], as idefics3's connector orders it: the s x s neighbours of each output
    token, row by row, concatenated along E."""
    I, S, E = x_ISE.shape
    side = int(round(S ** 0.5))
    x = x_ISE.reshape(I, side, side // scale, E * scale).transpose(0, 2, 1, 3)
    x = x.reshape(I, side // scale, side // scale, E * scale * scale).transpose(0, 2, 1, 3)
    return x.reshape(I, S // scale ** 2, E * scale * scale)


def pixel_shuffle_connector(params, x_ISE, scale: int):
    return linear("ISK,KD->ISD", pixel_shuffle(x_ISE, scale), params["proj"])
