"""A Qwen2-VL folder grown from a text model: its LLM, a vision tower and patch merger initialised from scratch.

What the picture demo (recipes/vlm_demo.py) trains: the embedded SmolLM2 becomes the LLM of a `qwen2_vl` model that
transformers and jaxswift both load. Nothing of the text model changes behaviour on text:
- a llama LLM becomes Qwen2's, whose q/k/v projections carry biases: they start at zero;
- Qwen2-VL's 3-D rotary positions (M-RoPE) equal plain 1-D positions on text, whatever `mrope_section` is, because
  the three position streams are equal there;
- the vision tokens (`<|vision_start|>`, `<|image_pad|>`, ...) are appended to the vocabulary, their embedding rows
  the mean of the others (a tied head then gives them an average logit, not a wild one);
- the chat template is the text model's ChatML with Qwen2-VL's image and video parts added.

The merger's last layer is scaled at init so that image features come out at the size of the LLM's token
embeddings (`scale_merger_to_embeddings`): with the fan-in init alone they are ~5x larger (SmolLM2: feature norm ~14
against ~3.2 per token), and the first steps' gradients, which teach the answer format, blow them up further
(docs/multimodal.md, the picture demo).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxswift.checkpoints.vlm import save_vlm
from jaxswift.errors import ConfigError
from jaxswift.models.config import ModelConfig, config_to_hf
from jaxswift.models.vision import aligner, init_vlm_params, vlm_config_from_hf

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# ChatML as SmolLM2 writes it (its default system line included), plus Qwen2-VL's markup for image / video parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' and default_system %}"
    "{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' or 'video' in part %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Qwen2-VL's image processor settings (OpenAI CLIP's normalisation, 14-pixel patches, 2 x 2 merge).
PROCESSOR = {"image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True,
             "rescale_factor": 1 / 255, "do_normalize": True, "resample": 3,
             "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
             "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}


@dataclasses.dataclass(frozen=True)
class TowerShape:
    """The from-scratch tower: Qwen2-VL's block (LayerNorm, quick-GELU MLP), small."""
    depth: int = 4
    embed_dim: int = 192
    num_heads: int = 3
    mlp_ratio: int = 4


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL splits the rotary frequencies (head_dim / 2) into time, height and width as 16:24:24 (of 64)."""
    half = head_dim // 2
    if half % 8:
        raise ConfigError(f"head_dim {head_dim}: M-RoPE needs head_dim / 2 divisible by 8")
    return [half // 4, 3 * half // 8, 3 * half // 8]


def qwen2_vl_config(text: ModelConfig, vocab_size: int, token_ids: dict[str, int], tower: TowerShape) -> dict:
    """The config.json of the grown model (transformers' Qwen2VLConfig layout)."""
    if text.family not in ("llama", "qwen2"):
        raise ConfigError(f"growing a Qwen2-VL model needs a llama or qwen2 LLM, got {text.family}")
    hf = config_to_hf(text)
    rope = {"rope_type": "default", "rope_theta": hf["rope_parameters"]["rope_theta"],
            "mrope_section": _mrope_section(text.head_dim)}
    text_config = {k: v for k, v in hf.items() if k not in ("architectures", "rope_scaling", "rope_theta")}
    text_config.update(model_type="qwen2_vl_text", vocab_size=vocab_size, rope_parameters=rope,
                       use_sliding_window=False, attention_bias=True)
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "dtype": hf["dtype"],
        "tie_word_embeddings": hf["tie_word_embeddings"],
        "image_token_id": token_ids["<|image_pad|>"], "video_token_id": token_ids["<|video_pad|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"], "vision_end_token_id": token_ids["<|vision_end|>"],
        "text_config": text_config,
        "vision_config": {"model_type": "qwen2_vl_vision", "depth": tower.depth, "embed_dim": tower.embed_dim,
                          "num_heads": tower.num_heads, "mlp_ratio": tower.mlp_ratio, "hidden_size": text.hidden_size,
                          "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3,
                          "hidden_act": "quick_gelu"},
    }


def _grown_llm(text_params: dict, llm_template: dict, vocab_size: int) -> dict:
    """The text model's params in the Qwen2 layout: the same leaves, zero q/k/v biases, the embedding grown to
    `vocab_size` rows (new rows: the mean row)."""
    def fill(path, template):
        node = text_params
        for key in path:
            node = node.get(key.key) if isinstance(node, dict) else None
        if node is None:  # a leaf the llama layout lacks: only Qwen2's attention biases
            if not path[-1].key.startswith("b"):
                raise ConfigError(f"growing a Qwen2-VL model: the text model has no {jax.tree_util.keystr(path)}")
            return jnp.zeros(template.shape, template.dtype)
        if path[-1].key == "embed" and node.shape[0] < vocab_size:
            extra = jnp.broadcast_to(node.mean(axis=0), (vocab_size - node.shape[0], node.shape[1]))
            return jnp.concatenate([node, extra.astype(node.dtype)])
        if node.shape != template.shape:
            raise ConfigError(f"growing a Qwen2-VL model: {jax.tree_util.keystr(path)} has shape {node.shape}, "
                              f"the Qwen2 layout wants {template.shape}")
        return node
    return jax.tree_util.tree_map_with_path(fill, llm_template)


def grow_qwen2_vl(text_params: dict, text_cfg: ModelConfig, tokenizer, out_dir: str | Path, *,
                  tower: TowerShape = TowerShape(), min_pixels: int = 56 * 56, max_pixels: int = 112 * 112,
                  seed: int = 0) -> Path:
    """Writes the Qwen2-VL folder (weights, config, tokenizer with the vision tokens, chat template, image
    processor bounds) and returns it. The tower and the merger are random (seeded): they learn in training."""
    tokenizer.add_tokens(list(VISION_TOKENS), special_tokens=True)
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    vocab_size = max(len(tokenizer), text_cfg.vocab_size)
    hf = qwen2_vl_config(text_cfg, vocab_size, token_ids, tower)
    cfg = vlm_config_from_hf(hf, where="the grown Qwen2-VL config")
    shapes = jax.eval_shape(lambda: init_vlm_params(cfg, jax.random.key(seed)))
    params = init_vlm_params(dataclasses.replace(cfg, text=cfg.text.replace(num_layers=1)), jax.random.key(seed))
    params["llm"] = _grown_llm(text_params, shapes["llm"], vocab_size)
    params["aligner"] = scale_merger_to_embeddings(params["aligner"], params["llm"]["embed"], cfg.vision,
                                                   jax.random.key(seed + 1))
    out = save_vlm(params, cfg, out_dir)
    # the default system line is baked in as a Jinja string literal (JSON's escaping is a subset of Jinja's)
    tokenizer.chat_template = CHAT_TEMPLATE.replace("default_system", json.dumps(_default_system(tokenizer)))
    tokenizer.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps(
        {**PROCESSOR, "min_pixels": min_pixels, "max_pixels": max_pixels,
         "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}}, indent=2))
    return out


def scale_merger_to_embeddings(aligner_params: dict, embed_VD, v, key) -> dict:
    """The merger with its output layer scaled so that features have the token embeddings' RMS. The merger starts
    with a LayerNorm, so its output scale at init does not depend on what the tower feeds it: Gaussian inputs
    measure it."""
    probe = jax.random.normal(key, (64 * v.merge_size ** 2, v.embed_dim), jnp.float32)
    features_ND = aligner(aligner_params, probe, v)
    target = jnp.sqrt(jnp.mean(jnp.square(embed_VD.astype(jnp.float32))))
    scale = target / jnp.sqrt(jnp.mean(jnp.square(features_ND)))
    return {**aligner_params, "fc2": (aligner_params["fc2"] * scale).astype(aligner_params["fc2"].dtype),
            "fc2_bias": (aligner_params["fc2_bias"] * scale).astype(aligner_params["fc2_bias"].dtype)}


def _default_system(tokenizer) -> str:
    """The system line the text model's own template adds when a chat has none (SmolLM2's), else none."""
    probe = [{"role": "user", "content": "\x00"}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>" in text:
        return text[len(head):text.index("<|im_end|>")]
    return ""

