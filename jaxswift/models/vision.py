"""Vision-language models: a vision tower and an aligner that turn pixels into LLM embeddings, scattered into the
token embeddings at the image placeholders, then the text core (models/transformer.py) unchanged.

Params tree of a VLM (the three parts ms-swift freezes and tunes separately):
  {"vision":  the tower: patch_embed [X, E] and stacked `layers` [L, ...] (scanned),
   "aligner": the projector into the LLM width (Qwen2-VL's 2x2 patch merger),
   "llm":     the text model's tree, exactly as for a text model}

Qwen2-VL (family `qwen2_vl`):
  pixels [P, X] (P patches of all images / video frames, in the order their placeholders appear in the text;
  X = C * temporal_patch * patch * patch, see data/images.py) -> patch embedding (the Conv3d with stride = kernel,
  as one matmul) -> L pre-norm blocks of bidirectional attention within each frame (2-D rotary: half the rotated
  pairs take the patch's row, half its column) -> merger: LayerNorm, 4 adjacent patches (one 2x2 block)
  concatenated, Linear-GELU-Linear -> [P / 4, D].
  In the LLM, the tokens get 3-D M-RoPE positions (`rope_index`): text tokens (t, t, t); image tokens
  (start, start + row, start + col), video tokens (start + frame, ...).

llava / idefics3 / smolvlm (`VLMConfig.vision` a `ViTConfig`): the CLIP / SigLIP tower and connectors of
models/vit.py, dispatched by `vlm_param_specs` and `image_features`; their LLMs take plain 1-D positions.

Extra letters beside the legend of models/transformer.py: P patches, X pixels per patch, E vision width.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.errors import ConfigError
from jaxswift.models.config import ModelConfig, config_from_hf, config_to_hf
from jaxswift.models.rope import rotate_half_pairs
from jaxswift.models.spec import ParamSpec, init_from_specs, map_specs, param_specs
from jaxswift.models.transformer import hidden_states, linear, logits_from_hidden, rms_norm
from jaxswift.models.vit import (ACTIVATIONS, ViTConfig, ViTInputs, activation, layer_norm, pixel_shuffle_connector,
                                 pixel_shuffle_specs, post_norm, projector, projector_specs, vit_hidden_states,
                                 vit_specs)

VLM_ARCHITECTURES = {"Qwen2VLForConditionalGeneration": "qwen2_vl",
                     "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl"}
VLM_FAMILY_ARCHITECTURE = {family: arch for arch, family in VLM_ARCHITECTURES.items()}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    embed_dim: int  # E
    num_heads: int
    mlp_dim: int
    out_dim: int  # the LLM's hidden size D
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    # Qwen2.5-VL: RMSNorm, a gated (SwiGLU) MLP with biases, and attention within windows of `window` x `window`
    # LLM tokens except in the blocks of `full_attention_blocks`; video time positions step tokens_per_second.
    norm: str = "layer"  # layer | rms
    gated_mlp: bool = False
    window: int = 0  # in merged (LLM) tokens per side; 0 = every block attends over the whole frame
    full_attention_blocks: tuple[int, ...] = ()
    tokens_per_second: float = 0.0  # 0 = video frames step the time position by 1 (Qwen2-VL)

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"vision embed_dim ({self.embed_dim}) must be a multiple of num_heads ({self.num_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"vision hidden_act {self.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_pixels(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    family: str
    text: ModelConfig
    vision: VisionConfig | ViTConfig  # ViTConfig: the CLIP / SigLIP tower of llava and idefics3 (models/vit.py)
    image_token_id: int
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    tie_word_embeddings: bool = False
    # llava: transformers' vision_feature_layer (as a tuple) and vision_feature_select_strategy ("default" drops
    # each image's first token), projector_hidden_act and multimodal_projector_bias.
    feature_layers: tuple[int, ...] = (-1,)
    feature_select: str = "full"
    projector_act: str = "gelu"
    projector_bias: bool = True
    # idefics3 / smolvlm: the connector's pixel-shuffle factor (s x s patches -> one LLM token)
    scale_factor: int = 0

    @property
    def uses_mrope(self) -> bool:
        """Qwen2-VL's 3-D rotary positions; the ViT families' LLMs take plain 1-D positions."""
        return bool(self.text.rope.mrope_section)

    @property
    def tokens_per_image(self) -> int:
        """LLM tokens of one image (tile) for the ViT families: llava's (patches + class token, less the first
        token under the default strategy), idefics3's patches / s^2."""
        v = self.vision
        if self.family == "llava":
            return v.num_positions - (self.feature_select == "default")
        return v.patches_per_side ** 2 // self.scale_factor ** 2

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        return tuple(i for i in (self.image_token_id, self.video_token_id) if i is not None)


# ---------------------------------------------------------------------------------------------------------------
# HF config.json <-> VLMConfig


def is_vlm_config(d: dict) -> bool:
    return any(a in VLM_ARCHITECTURES for a in d.get("architectures") or []) or d.get("model_type") in (
        VLM_FAMILY_ARCHITECTURE)


def vlm_config_from_hf(d: dict, *, where: str = "config.json", dtype: str | None = None) -> VLMConfig:
    archs = d.get("architectures") or []
    family = next((VLM_ARCHITECTURES[a] for a in archs if a in VLM_ARCHITECTURES), d.get("model_type"))
    if family not in VLM_FAMILY_ARCHITECTURE:
        raise ConfigError(f"{where}: unknown vision-language architecture {archs or family!r} "
                          f"(supported: {', '.join(VLM_ARCHITECTURES)})")
    # transformers >= 5 nests the text fields in text_config; older Qwen2-VL files keep them at the top level.
    text = dict(d.get("text_config") or {k: v for k, v in d.items() if k != "vision_config"})
    text.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    text.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", False))
    if d.get("tie_word_embeddings"):
        text["tie_word_embeddings"] = True
    text.setdefault("dtype", d.get("dtype") or d.get("torch_dtype"))
    text_cfg = config_from_hf(text, where=f"{where} (text_config)", dtype=dtype)
    if not text_cfg.rope.mrope_section:
        raise ConfigError(f"{where}: text_config.rope_parameters needs 'mrope_section' for {family}")
    v = d.get("vision_config") or {}
    vwhere = f"{where} (vision_config)"
    for key in ("depth", "num_heads") + (("embed_dim",) if family == "qwen2_vl" else ()):
        if key not in v:
            raise ConfigError(f"{vwhere}: missing required field {key!r}")
    rope = v.get("rope_parameters") or {}
    common = dict(depth=int(v["depth"]), num_heads=int(v["num_heads"]), patch_size=int(v.get("patch_size", 14)),
                  temporal_patch_size=int(v.get("temporal_patch_size", 2)),
                  merge_size=int(v.get("spatial_merge_size", 2)), in_channels=int(v.get("in_channels", 3)),
                  rope_theta=float(rope.get("rope_theta", 10000.0)))
    if family == "qwen2_5_vl":
        for key in ("hidden_size", "intermediate_size", "out_hidden_size"):
            if key not in v:
                raise ConfigError(f"{vwhere}: missing required field {key!r}")
        window = int(v.get("window_size", 112)) // common["merge_size"] // common["patch_size"]
        vision = VisionConfig(
            embed_dim=int(v["hidden_size"]), mlp_dim=int(v["intermediate_size"]), out_dim=int(v["out_hidden_size"]),
            hidden_act=v.get("hidden_act", "silu"), norm="rms", gated_mlp=True, window=window,
            full_attention_blocks=tuple(int(i) for i in v.get("fullatt_block_indexes", (7, 15, 23, 31))),
            tokens_per_second=float(v.get("tokens_per_second", 4)), **common)
    else:
        vision = VisionConfig(
            embed_dim=int(v["embed_dim"]), mlp_dim=int(v["embed_dim"] * v.get("mlp_ratio", 4)),
            out_dim=int(v.get("hidden_size", text_cfg.hidden_size)), hidden_act=v.get("hidden_act", "quick_gelu"),
            **common)
    if vision.out_dim != text_cfg.hidden_size:
        raise ConfigError(f"{vwhere}: hidden_size {vision.out_dim} must equal the LLM's ({text_cfg.hidden_size})")
    return VLMConfig(family=family, text=text_cfg, vision=vision,
                     image_token_id=int(d.get("image_token_id", 151655)),
                     video_token_id=d.get("video_token_id", 151656),
                     vision_start_token_id=d.get("vision_start_token_id", 151652),
                     vision_end_token_id=d.get("vision_end_token_id", 151653),
                     tie_word_embeddings=text_cfg.tie_word_embeddings)


def _vision_config_to_hf(cfg: VLMConfig) -> dict:
    v = cfg.vision
    common = {"model_type": f"{cfg.family}_vision" if cfg.family == "qwen2_vl" else cfg.family, "depth": v.depth,
              "num_heads": v.num_heads, "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
              "spatial_merge_size": v.merge_size, "in_channels": v.in_channels, "hidden_act": v.hidden_act,
              "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}}
    if cfg.family == "qwen2_5_vl":
        return {**common, "hidden_size": v.embed_dim, "intermediate_size": v.mlp_dim, "out_hidden_size": v.out_dim,
                "window_size": v.window * v.merge_size * v.patch_size,
                "fullatt_block_indexes": list(v.full_attention_blocks),
                "tokens_per_second": int(v.tokens_per_second) if float(v.tokens_per_second).is_integer()
                else v.tokens_per_second}
    ratio = v.mlp_dim // v.embed_dim if v.mlp_dim % v.embed_dim == 0 else v.mlp_dim / v.embed_dim
    return {**common, "embed_dim": v.embed_dim, "hidden_size": v.out_dim, "mlp_ratio": ratio}


def vlm_config_to_hf(cfg: VLMConfig) -> dict:
    text = config_to_hf(cfg.text)
    text.pop("architectures")
    text["model_type"] = f"{cfg.family}_text"
    return {
        "architectures": [VLM_FAMILY_ARCHITECTURE[cfg.family]], "model_type": cfg.family,
        "dtype": cfg.text.param_dtype, "tie_word_embeddings": cfg.tie_word_embeddings,
        "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id, "vision_end_token_id": cfg.vision_end_token_id,
        "text_config": text,
        "vision_config": _vision_config_to_hf(cfg),
    }


# ---------------------------------------------------------------------------------------------------------------
# Params


def vision_specs(v: VisionConfig) -> dict:
    L, E, N, H, F = v.depth, v.embed_dim, v.num_heads, v.head_dim, v.mlp_dim
    specs = {
        "patch_embed": ParamSpec((v.patch_pixels, E), (None, "embed"), fan_in_axes=(0,)),
        "layers": {
            "norm1": ParamSpec((L, E), ("layers", "norm"), "ones"),
            "norm1_bias": ParamSpec((L, E), ("layers", "norm"), "zeros"),
            # q, k and v fused as HF's `qkv` Linear (one LoRA target there too): [L, E, 3, N, H]
            "wqkv": ParamSpec((L, E, 3, N, H), ("layers", "embed", None, "heads", "head_dim"), fan_in_axes=(1,)),
            "bqkv": ParamSpec((L, 3, N, H), ("layers", None, "heads", "head_dim"), "zeros"),
            "wo": ParamSpec((L, N, H, E), ("layers", "heads", "head_dim", "embed"), fan_in_axes=(1, 2)),
            "bo": ParamSpec((L, E), ("layers", "norm"), "zeros"),
            "norm2": ParamSpec((L, E), ("layers", "norm"), "ones"),
            "norm2_bias": ParamSpec((L, E), ("layers", "norm"), "zeros"),
            "fc1": ParamSpec((L, E, F), ("layers", "embed", "mlp"), fan_in_axes=(1,)),
            "fc1_bias": ParamSpec((L, F), ("layers", "mlp"), "zeros"),
            "fc2": ParamSpec((L, F, E), ("layers", "mlp", "embed"), fan_in_axes=(1,)),
            "fc2_bias": ParamSpec((L, E), ("layers", "norm"), "zeros"),
        },
    }
    layers = specs["layers"]
    if v.norm == "rms":
        del layers["norm1_bias"], layers["norm2_bias"]
    if v.gated_mlp:  # Qwen2.5-VL: down(silu(gate(x)) * up(x)), every projection with a bias
        for name in ("fc1", "fc1_bias", "fc2", "fc2_bias"):
            del layers[name]
        layers.update(
            w_gate=ParamSpec((L, E, F), ("layers", "embed", "mlp"), fan_in_axes=(1,)),
            w_gate_bias=ParamSpec((L, F), ("layers", "mlp"), "zeros"),
            w_up=ParamSpec((L, E, F), ("layers", "embed", "mlp"), fan_in_axes=(1,)),
            w_up_bias=ParamSpec((L, F), ("layers", "mlp"), "zeros"),
            w_down=ParamSpec((L, F, E), ("layers", "mlp", "embed"), fan_in_axes=(1,)),
            w_down_bias=ParamSpec((L, E), ("layers", "norm"), "zeros"))
    return specs


def aligner_specs(v: VisionConfig) -> dict:
    """Qwen2-VL's patch merger: LayerNorm over E, then the 2x2 block's 4E -> 4E -> D MLP."""
    E, M = v.embed_dim, v.embed_dim * v.merge_size ** 2
    specs = {
        "norm": ParamSpec((E,), ("norm",), "ones"),
        "norm_bias": ParamSpec((E,), ("norm",), "zeros"),
        "fc1": ParamSpec((M, M), (None, "mlp"), fan_in_axes=(0,)),
        "fc1_bias": ParamSpec((M,), ("mlp",), "zeros"),
        "fc2": ParamSpec((M, v.out_dim), ("mlp", "embed"), fan_in_axes=(0,)),
        "fc2_bias": ParamSpec((v.out_dim,), ("norm",), "zeros"),
    }
    if v.norm == "rms":
        del specs["norm_bias"]
    return specs


def vlm_param_specs(cfg: VLMConfig) -> dict:
    if isinstance(cfg.vision, ViTConfig):
        v, D = cfg.vision, cfg.text.hidden_size
        aligner = (projector_specs(v.embed_dim * len(cfg.feature_layers), D, cfg.projector_bias)
                   if cfg.family == "llava" else pixel_shuffle_specs(v.embed_dim, cfg.scale_factor, D))
        return {"vision": vit_specs(v), "aligner": aligner, "llm": param_specs(cfg.text)}
    return {"vision": vision_specs(cfg.vision), "aligner": aligner_specs(cfg.vision), "llm": param_specs(cfg.text)}


def vlm_logical_axes(cfg: VLMConfig) -> dict:
    return map_specs(lambda s: s.logical_axes, vlm_param_specs(cfg))


def init_vlm_params(cfg: VLMConfig, key: jax.Array) -> dict:
    return init_from_specs(vlm_param_specs(cfg), key, cfg.text.weight_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Host-side inputs: patch positions for the tower, M-RoPE positions for the LLM


class VisionInputs(NamedTuple):
    """What the tower needs for one batch, all images and videos in the order of their placeholders.

    pixels [P, X]; patch_rows_cols [P, 2] (each patch's row and column in its image, for the 2-D rotary);
    patch_frames [P] (attention stays within one frame: 1, 2, ...; 0 = padding patch); patch_windows [P]
    (Qwen2.5-VL's windowed blocks attend within one window: ids unique over frames; 0 = padding).
    """
    pixels: np.ndarray | jax.Array
    patch_rows_cols: np.ndarray | jax.Array
    patch_frames: np.ndarray | jax.Array
    patch_windows: np.ndarray | jax.Array


def vision_inputs(patches: Sequence[np.ndarray], grids: Sequence[tuple[int, int, int]], merge_size: int,
                  pad_to: int | None = None, window: int = 0) -> VisionInputs:
    """Concatenates the patches of several images / videos (as data/images.py makes them); pad_to adds padding
    patches (frame 0) up to that many, for fewer compiled shapes. window: VisionConfig.window (0: none)."""
    rows_cols, frames, windows, frame, n_windows = [], [], [], 0, 0
    for (t, h, w), p in zip(grids, patches):
        if len(p) != t * h * w:
            raise ValueError(f"{len(p)} patches for a grid of {t}x{h}x{w}")
        # Merge-block order, as the patches are laid out: (block row, block col, row in block, col in block).
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge_size, merge_size, w // merge_size, merge_size)
        r, c = r.reshape(block).transpose(0, 2, 1, 3).ravel(), c.reshape(block).transpose(0, 2, 1, 3).ravel()
        rows_cols.append(np.tile(np.stack([r, c], -1), (t, 1)))
        frames.append(np.repeat(np.arange(frame + 1, frame + t + 1), h * w))
        frame += t
        if window:  # windows of window x window merged tokens from the top-left corner, per frame
            per_row = -(-(w // merge_size) // window)
            in_frame = (r // merge_size // window) * per_row + (c // merge_size // window)
            per_frame = -(-(h // merge_size) // window) * per_row
            windows.append(np.concatenate([in_frame + n_windows + 1 + k * per_frame for k in range(t)]))
            n_windows += t * per_frame
    pixels = np.concatenate(patches).astype(np.float32)
    rows_cols, frames = np.concatenate(rows_cols).astype(np.int32), np.concatenate(frames).astype(np.int32)
    windows = np.concatenate(windows).astype(np.int32) if window else frames
    if pad_to is not None and pad_to > len(pixels):
        extra = pad_to - len(pixels)
        pixels = np.concatenate([pixels, np.zeros((extra, pixels.shape[1]), np.float32)])
        rows_cols = np.concatenate([rows_cols, np.zeros((extra, 2), np.int32)])
        frames = np.concatenate([frames, np.zeros(extra, np.int32)])
        windows = np.concatenate([windows, np.zeros(extra, np.int32)])
    return VisionInputs(pixels, rows_cols, frames, windows)


def rope_index(tokens: Sequence[int], grids: Sequence[tuple[int, int, int]], cfg: VLMConfig,
               seconds_per_grid: float = 1.0) -> tuple[np.ndarray, int]:
    """M-RoPE positions [3, T] of one unpadded sequence and its delta (next text position - T).

    transformers' get_rope_index: text continues one past the last position; an image / video of grid (t, h, w)
    (h, w in patches) takes llm grid (t, h/m, w/m) with positions start + (frame, row, col), and the text after it
    continues at start + max(h, w) / m. Qwen2.5-VL spaces a video's frames by tokens_per_second *
    seconds_per_grid (transformers' default when the processor gives no fps: 1 second per temporal patch).
    """
    tokens = np.asarray(tokens)
    placeholder = np.isin(tokens, cfg.placeholder_ids)
    m, per_second = cfg.vision.merge_size, cfg.vision.tokens_per_second
    grids = iter(grids)
    out, pos, index = [], 0, 0
    for is_vision, group in itertools.groupby(placeholder):
        n = len(list(group))
        end, index = index + n, index + (0 if is_vision else n)
        if not is_vision:
            out.append(np.broadcast_to(np.arange(pos, pos + n), (3, n)))
            pos += n
        while index < end:  # one run of placeholders may hold several adjacent images
            try:
                t, h, w = next(grids)
            except StopIteration:
                raise ValueError("more image placeholder tokens than images") from None
            gh, gw = h // m, w // m
            step = per_second * seconds_per_grid if per_second and tokens[index] == cfg.video_token_id else 1
            tt, hh, ww = np.meshgrid((np.arange(t) * step).astype(np.int64), np.arange(gh), np.arange(gw),
                                     indexing="ij")
            out.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + pos)
            pos += max(h, w) // m
            index += t * gh * gw
        if index > end:
            raise ValueError("image placeholder tokens do not match the image sizes")
    if next(grids, None) is not None:
        raise ValueError("more images than image placeholder runs")
    positions = np.concatenate(out, axis=1).astype(np.int32)
    return positions, int(positions.max()) + 1 - len(tokens)


# ---------------------------------------------------------------------------------------------------------------
# The tower


def vision_rope(rows_cols_P2, v: VisionConfig):
    """cos, sin [P, 1, H/2] of the 2-D rotary: the first H/4 frequencies rotate by row, the next H/4 by column."""
    quarter = v.head_dim // 2
    inv_freq = 1.0 / (v.rope_theta ** (np.arange(0, quarter, 2, dtype=np.float32) / quarter))
    angles = rows_cols_P2.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq, jnp.float32)  # [P, 2, H/4]
    angles = angles.reshape(angles.shape[0], 1, -1)
    return jnp.cos(angles), jnp.sin(angles)


def vision_norm(x, layer, name: str, v: VisionConfig):
    if v.norm == "rms":
        return rms_norm(x, layer[name], v.norm_eps)
    return layer_norm(x, layer[name], layer[name + "_bias"], v.norm_eps)


def vision_mlp(h_PE, layer, v: VisionConfig):
    if v.gated_mlp:
        gate = linear("PE,EF->PF", h_PE, layer["w_gate"]) + layer["w_gate_bias"].astype(h_PE.dtype)
        up = linear("PE,EF->PF", h_PE, layer["w_up"]) + layer["w_up_bias"].astype(h_PE.dtype)
        return linear("PF,FE->PE", activation(v.hidden_act, gate) * up, layer["w_down"]) + layer[
            "w_down_bias"].astype(h_PE.dtype)
    h = activation(v.hidden_act, linear("PE,EF->PF", h_PE, layer["fc1"]) + layer["fc1_bias"].astype(h_PE.dtype))
    return linear("PF,FE->PE", h, layer["fc2"]) + layer["fc2_bias"].astype(h_PE.dtype)


def vision_block(x_PE, layer, v: VisionConfig, cos, sin, mask_PP):
    h = vision_norm(x_PE, layer, "norm1", v)
    qkv = linear("PE,EQNH->PQNH", h, layer["wqkv"]) + layer["bqkv"].astype(h.dtype)
    q, k, val = rotate_half_pairs(qkv[:, 0], cos, sin), rotate_half_pairs(qkv[:, 1], cos, sin), qkv[:, 2]
    scores = jnp.einsum("PNH,SNH->NPS", q, k, preferred_element_type=jnp.float32) * v.head_dim ** -0.5
    probs = jax.nn.softmax(jnp.where(mask_PP[None], scores, -jnp.inf), axis=-1).astype(val.dtype)
    attn = jnp.einsum("NPS,SNH->PNH", probs, val)
    x_PE = x_PE + linear("PNH,NHE->PE", attn, layer["wo"]) + layer["bo"].astype(x_PE.dtype)
    return x_PE + vision_mlp(vision_norm(x_PE, layer, "norm2", v), layer, v)


def vision_tower(params_vision, inputs: VisionInputs, v: VisionConfig, dtype=jnp.float32):
    """[P, E]: the tower's last hidden states (before the aligner)."""
    x = linear("PX,XE->PE", jnp.asarray(inputs.pixels, dtype), params_vision["patch_embed"])
    frames, windows = jnp.asarray(inputs.patch_frames), jnp.asarray(inputs.patch_windows)
    # Padding patches (frame 0) attend to each other only, so no row is empty and real patches never see them.
    # Windows are the attention groups of the windowed blocks; nothing is permuted (transformers reorders the
    # patches window by window and back: the same sums under a mask).
    frame_mask = frames[:, None] == frames[None, :]
    window_mask = windows[:, None] == windows[None, :]
    full = jnp.asarray([not v.window or i in v.full_attention_blocks for i in range(v.depth)])
    cos, sin = vision_rope(jnp.asarray(inputs.patch_rows_cols), v)

    def body(x, xs):
        layer, is_full = xs
        return vision_block(x, layer, v, cos, sin, jnp.where(is_full, frame_mask, window_mask)), None

    x, _ = jax.lax.scan(body, x, (params_vision["layers"], full))
    return x


def aligner(params_aligner, x_PE, v: VisionConfig):
    """Qwen2-VL's merger: [P, E] -> [P / m^2, D]; the m^2 patches of one block are adjacent rows."""
    h = vision_norm(x_PE, params_aligner, "norm", v)
    h = h.reshape(-1, v.embed_dim * v.merge_size ** 2)
    h = jax.nn.gelu(linear("PM,MK->PK", h, params_aligner["fc1"]) + params_aligner["fc1_bias"].astype(h.dtype),
                    approximate=False)
    return linear("PM,MD->PD", h, params_aligner["fc2"]) + params_aligner["fc2_bias"].astype(h.dtype)


def vit_features(params, inputs: ViTInputs, cfg: VLMConfig):
    """[I * tokens_per_image, D]: llava's projected feature layers, or idefics3's pixel-shuffled last layer."""
    v, dtype = cfg.vision, cfg.text.compute_dtype
    if cfg.family == "llava":
        selected = vit_hidden_states(params["vision"], inputs, v, cfg.feature_layers, dtype)
        if cfg.feature_select == "default":
            selected = [h[:, 1:] for h in selected]
        out = projector(params["aligner"], jnp.concatenate(selected, axis=-1), cfg.projector_act)
    else:
        (last,) = vit_hidden_states(params["vision"], inputs, v, (-1,), dtype)
        out = pixel_shuffle_connector(params["aligner"], post_norm(params["vision"], last, v), cfg.scale_factor)
    return out.reshape(-1, out.shape[-1])


def image_features(params, inputs: VisionInputs | ViTInputs, cfg: VLMConfig):
    """[P / m^2, D] LLM embeddings of every image / video token, in placeholder order."""
    if isinstance(cfg.vision, ViTConfig):
        return vit_features(params, inputs, cfg)
    x = vision_tower(params["vision"], inputs, cfg.vision, cfg.text.compute_dtype)
    return aligner(params["aligner"], x, cfg.vision)


def scatter_features(embeds_BTD, tokens_BT, features_ND, placeholder_ids: tuple[int, ...]):
    """The token embeddings with the n-th placeholder token (row-major over the batch) replaced by feature n.
    Features past the number of placeholders (padding patches' rows) are never read."""
    is_placeholder = jnp.isin(tokens_BT, jnp.asarray(placeholder_ids))
    index = jnp.cumsum(is_placeholder.reshape(-1)).reshape(tokens_BT.shape) - 1
    gathered = jnp.take(features_ND, jnp.clip(index, 0, features_ND.shape[0] - 1), axis=0)
    return jnp.where(is_placeholder[..., None], gathered.astype(embeds_BTD.dtype), embeds_BTD)


def vlm_embeddings(params, tokens_BT, cfg: VLMConfig, vision: VisionInputs | ViTInputs | None):
    embeds = jnp.take(params["llm"]["embed"], tokens_BT, axis=0).astype(cfg.text.compute_dtype)
    if vision is None:
        return embeds
    return scatter_features(embeds, tokens_BT, image_features(params, vision, cfg), cfg.placeholder_ids)


def vlm_hidden_states(params, tokens_BT, cfg: VLMConfig, vision: VisionInputs | None = None, *,
                      rope_positions=None, positions=None, segment_ids=None, cache=None):
    embeds = vlm_embeddings(params, tokens_BT, cfg, vision)
    return hidden_states(params["llm"], tokens_BT, cfg.text, positions=positions, segment_ids=segment_ids,
                         cache=cache, rope_positions=rope_positions, embeds=embeds)


def row_image_features(params, vision_rows: VisionInputs | ViTInputs, cfg: VLMConfig, *,
                       rows_per_image_set: int = 1):
    """[B, N, D] features of each row's images (VisionInputs / ViTInputs with a leading [B] axis), the tower and
    aligner vmapped over rows. rows_per_image_set = G: rows come in runs of G with the same images (a GRPO group),
    so the tower runs on the first row of each run and its features are repeated (exact; gradients sum over the
    run)."""
    G = rows_per_image_set
    firsts = jax.tree.map(lambda x: x[::G], vision_rows) if G > 1 else vision_rows
    features = jax.vmap(lambda v: image_features(params, type(vision_rows)(*v), cfg))(firsts)
    return jnp.repeat(features, G, axis=0) if G > 1 else features


def row_vlm_hidden_states(params, tokens_BT, cfg: VLMConfig, vision_rows: VisionInputs | ViTInputs, *,
                          rope_positions, positions, segment_ids, feature_index_BT=None, placeholder_mask_BT=None, cache=None,
                          return_aux: bool = False, rows_per_image_set: int = 1):
    """vlm_hidden_states where every row brings its own images (VisionInputs with a leading [B] axis): the tower
    and aligner run once per row over the row's patches (vmapped, so data parallelism splits images with their
    rows; once per run of `rows_per_image_set` rows that share them: row_image_features). Placeholder tokens take
    the row's features in order, or the feature row `feature_index_BT` names; `placeholder_mask_BT` (default:
    every placeholder id) says which tokens are image tokens (a sampled completion may hold a placeholder id that
    is text to the model). rope_positions: [3, B, T] (None: a ViT family's 1-D positions)."""
    features_BND = row_image_features(params, vision_rows, cfg, rows_per_image_set=rows_per_image_set)
    embeds_BTD = jnp.take(params["llm"]["embed"], tokens_BT, axis=0).astype(cfg.text.compute_dtype)
    is_image = (jnp.isin(tokens_BT, jnp.asarray(cfg.placeholder_ids)) if placeholder_mask_BT is None
                else placeholder_mask_BT)
    index_BT = jnp.cumsum(is_image, axis=1) - 1 if feature_index_BT is None else feature_index_BT
    index_BT = jnp.clip(index_BT, 0, features_BND.shape[1] - 1)
    gathered_BTD = jnp.take_along_axis(features_BND, index_BT[..., None], axis=1).astype(embeds_BTD.dtype)
    embeds_BTD = jnp.where(is_image[..., None], gathered_BTD, embeds_BTD)
    return hidden_states(params["llm"], tokens_BT, cfg.text, positions=positions, segment_ids=segment_ids,
                         cache=cache, rope_positions=rope_positions, embeds=embeds_BTD, return_aux=return_aux)


def vlm_forward(params, tokens_BT, cfg: VLMConfig, vision: VisionInputs | None = None, *, rope_positions=None,
                positions=None, segment_ids=None, cache=None):
    """logits [B, T, V] float32 (and the cache with one): the tower runs once over all images of the batch."""
    h, new_cache = vlm_hidden_states(params, tokens_BT, cfg, vision, rope_positions=rope_positions,
                                     positions=positions, segment_ids=segment_ids, cache=cache)
    logits = logits_from_hidden(params["llm"], h, cfg.text)
    return logits if cache is None else (logits, new_cache)
