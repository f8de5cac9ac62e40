"""The public Python API: load a model, run it, generate, chat, save.

    model = jaxswift.load_model("smollm2-135m-instruct")
    print(jaxswift.chat(model, [{"role": "user", "content": "Hi!"}]))
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxswift.checkpoints.hf import (classifier_head_from_hf, is_seq_cls_config, load_hf_params, load_seq_cls_params,
                                     params_from_tensors, read_hf_config, save_hf, save_seq_cls)
from jaxswift.errors import ConfigError
from jaxswift.infer.generate import generate_tokens, left_pad, stop_token_ids
from jaxswift.infer.sampling import SamplingParams
from jaxswift.models.config import DTYPES, ModelConfig, config_from_hf
from jaxswift.models.vision import VLMConfig


@dataclasses.dataclass
class Model:
    config: ModelConfig  # or a VLMConfig (models/vision.py) for vision-language models
    params: Any
    tokenizer: Any = None
    source: str = ""
    processor: Any = None  # VLMs: data/multimodal.VLMProcessor (tokenizer + image preprocessing)
    head: Any = None  # sequence classifiers: models/heads.ClassifierHead (params["score"] holds its weight)

    @property
    def is_vlm(self) -> bool:
        return isinstance(self.config, VLMConfig)

    @property
    def text_config(self) -> ModelConfig:
        return self.config.text if self.is_vlm else self.config


def _check_dtype(dtype: str | None):
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _load_tokenizer(folder: Path):
    import transformers

    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def load_model(name_or_path: str, dtype: str | None = None, *, shardings=None, load_tokenizer: bool = True,
               min_pixels: int | None = None, max_pixels: int | None = None) -> Model:
    """A model from an HF folder, a .gguf file, or an embedded name such as `smollm2-135m-instruct`.

    dtype: float32 | bfloat16 | float16 for both params and compute (default: the checkpoint's, float32 for GGUF).
    min_pixels / max_pixels (vision-language models only) override the folder's image-size bounds.
    """
    from jaxswift.checkpoints.gguf import read_gguf
    from jaxswift.checkpoints.registry import resolve_model_path
    from jaxswift.checkpoints.vlm import read_vlm_config

    _check_dtype(dtype)
    path = resolve_model_path(name_or_path)
    vlm = read_vlm_config(path, dtype) if path.is_dir() else None
    if vlm is not None:
        return _load_vlm(path, vlm, shardings, load_tokenizer, min_pixels, max_pixels)
    if min_pixels is not None or max_pixels is not None:
        raise ConfigError(f"{path}: min_pixels / max_pixels apply to vision-language models only")
    if path.is_file() and path.suffix == ".gguf":
        ckpt = read_gguf(path)
        config = config_from_hf(ckpt.hf_config, where=str(path), dtype=dtype or "float32")
        params = params_from_tensors(config, ckpt.tensors(), str(path), shardings)
        tokenizer = ckpt.tokenizer() if load_tokenizer else None
    else:
        config, raw = read_hf_config(path, dtype=dtype)
        head = None
        if is_seq_cls_config(raw):  # XxxForSequenceClassification: the decoder plus params["score"]
            if "quantization_config" in raw:
                raise ConfigError(f"{path}: quantized sequence-classification folders are not supported")
            head = classifier_head_from_hf(raw, str(path / "config.json"))
            params = load_seq_cls_params(path, config, head, shardings)
        elif "quantization_config" in raw:  # GPTQ / AWQ / FP8 / int8: leaves that dequantize inside the matmul
            from jaxswift.quant.load import load_quantized_params
            params = load_quantized_params(path, config, raw["quantization_config"], shardings)
        else:
            params = load_hf_params(path, config, shardings)
        tokenizer = _load_tokenizer(path) if load_tokenizer else None
        return Model(config, params, tokenizer, str(path), head=head)
    return Model(config, params, tokenizer, str(path))


def _load_vlm(path: Path, cfg: VLMConfig, shardings, load_tokenizer: bool, min_pixels, max_pixels) -> Model:
    from jaxswift.checkpoints.vlm import load_vlm_params
    from jaxswift.data.multimodal_vit import vit_processor_class

    if shardings is not None:
        raise ConfigError(f"{path}: sharded loading of vision-language models is not supported yet")
    params = load_vlm_params(path, cfg)
    tokenizer = _load_tokenizer(path) if load_tokenizer else None
    processor = None if tokenizer is None else vit_processor_class(cfg).from_folder(
        path, cfg, tokenizer, min_pixels=min_pixels, max_pixels=max_pixels)
    return Model(cfg, params, tokenizer, str(path), processor)


def save_model(model: Model, out_dir: str | Path) -> Path:
    """Writes an HF folder (config.json, model.safetensors, tokenizer) that transformers loads."""
    if model.is_vlm:
        from jaxswift.checkpoints.vlm import save_vlm

        out = save_vlm(model.params, model.config, out_dir, source=model.source or None)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(out))
        return out
    if model.head is not None:
        return save_seq_cls(model.params, model.config, model.head, out_dir, tokenizer=model.tokenizer)
    return save_hf(model.params, model.config, out_dir, tokenizer=model.tokenizer)


def generate_ids(model: Model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, ignore_eos: bool = False) -> list[list[int]]:
    """New token ids per prompt (without the final eos); ignore_eos generates exactly max_new_tokens."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    if model.is_vlm:
        from jaxswift.data.multimodal import MultimodalPrompt
        from jaxswift.models.vision import rope_index

        # Plain token ids: an image placeholder among them would have no image to fill it.
        prompts = [p if isinstance(p, MultimodalPrompt) else MultimodalPrompt(list(p), [], [], *(
            rope_index(p, [], model.config) if model.config.uses_mrope else (None, 0))) for p in prompts]
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    eos = stop_token_ids(model.text_config, model.tokenizer)
    stop = np.asarray([-1], np.int32) if ignore_eos else eos  # -1 matches no token
    pad = model.tokenizer.pad_token_id if model.tokenizer is not None and model.tokenizer.pad_token_id is not None \
        else int(eos[0])
    if model.is_vlm:
        from jaxswift.infer.generate_vlm import generate_vlm_tokens, left_pad_multimodal

        tokens, positions, segments, rope, delta = left_pad_multimodal(prompts, pad)
        vision = model.processor.batch_vision(prompts)
        out, lengths = generate_vlm_tokens(model.params, tokens, positions, segments, rope, delta, vision, stop,
                                           jax.random.key(seed), cfg=model.config, max_new_tokens=max_new_tokens,
                                           sampling=sampling)
    else:
        tokens, positions, segments = left_pad(prompts, pad)
        out, lengths = generate_tokens(model.params, tokens, positions, segments, stop, jax.random.key(seed),
                                       cfg=model.config, max_new_tokens=max_new_tokens, sampling=sampling)
    out, lengths = np.asarray(out), np.asarray(lengths)
    results = []
    for row, n in zip(out, lengths):
        ids = row[:n].tolist()
        if ids and ids[-1] in stop:
            ids = ids[:-1]
        results.append(ids)
    return results


def generate(model: Model, prompts: list[str] | str, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, images: list | None = None) -> list[str]:
    """Continues each raw-text prompt (no chat template); greedy when temperature is 0.

    Vision-language models: `images` holds one list of images (paths, data URLs, PIL images) per prompt, one for
    each `<image>` marker in its text (ms-swift's convention).
    """
    if model.tokenizer is None:
        raise ConfigError(f"{model.source}: the model has no tokenizer; pass token ids to generate_ids instead")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if images is not None and not model.is_vlm:
        raise ConfigError(f"{model.source}: images given, but this is a text-only model")
    if model.is_vlm:
        if images is not None and len(images) != len(prompts):
            raise ConfigError(f"images needs one list per prompt: {len(prompts)} prompts, {len(images)} lists")
        encoded = [_encode_marked(model, p, images[i] if images is not None else [], f"prompt {i}")
                   for i, p in enumerate(prompts)]
    else:
        encoded = [model.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    new_ids = generate_ids(model, encoded, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           top_k=top_k, seed=seed)
    return [model.tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]


def _encode_marked(model: Model, text: str, images, where: str):
    """A raw VLM prompt with `<image>` markers and its images -> MultimodalPrompt."""
    from jaxswift.data.multimodal import message_media, split_image_placeholders

    parts = split_image_placeholders(text, images, where=where)
    media, _ = message_media([{"role": "user", "content": parts}], where=where)
    rendered = "".join(model.processor.markup(p["type"]) if p["type"] != "text" else p["text"] for p in parts)
    return model.processor.encode_text(rendered, media, where)


def chat_prompt_ids(model: Model, messages: list[dict]) -> list[int]:
    """The model's own chat template with the assistant header appended, as token ids."""
    text = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return model.tokenizer.encode(text, add_special_tokens=False)


def chat(model: Model, messages: list[dict], *, max_new_tokens: int = 256, **sampling) -> str:
    """The assistant's reply to `messages` (OpenAI-style role/content dicts)."""
    if model.tokenizer is None:
        raise ConfigError(f"{model.source}: the model has no tokenizer, so it cannot chat")
    prompt = model.processor.encode_chat(messages) if model.is_vlm else chat_prompt_ids(model, messages)
    ids = generate_ids(model, [prompt], max_new_tokens=max_new_tokens, **sampling)[0]
    return model.tokenizer.decode(ids, skip_special_tokens=True)
