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

from jaxswift.checkpoints.hf import load_hf_params, params_from_tensors, read_hf_config, save_hf
from jaxswift.errors import ConfigError
from jaxswift.infer.generate import generate_tokens, left_pad, stop_token_ids
from jaxswift.infer.sampling import SamplingParams
from jaxswift.models.config import DTYPES, ModelConfig, config_from_hf


@dataclasses.dataclass
class Model:
    config: ModelConfig
    params: Any
    tokenizer: Any = None
    source: str = ""


def _check_dtype(dtype: str | None):
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _load_tokenizer(folder: Path):
    import transformers

    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def load_model(name_or_path: str, dtype: str | None = None, *, shardings=None, load_tokenizer: bool = True) -> Model:
    """A model from an HF folder, a .gguf file, or an embedded name such as `smollm2-135m-instruct`.

    dtype: float32 | bfloat16 | float16 for both params and compute (default: the checkpoint's, float32 for GGUF).
    """
    from jaxswift.checkpoints.gguf import read_gguf
    from jaxswift.checkpoints.registry import resolve_model_path

    _check_dtype(dtype)
    path = resolve_model_path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        ckpt = read_gguf(path)
        config = config_from_hf(ckpt.hf_config, where=str(path), dtype=dtype or "float32")
        params = params_from_tensors(config, ckpt.tensors(), str(path), shardings)
        tokenizer = ckpt.tokenizer() if load_tokenizer else None
    else:
        config, raw = read_hf_config(path, dtype=dtype)
        if "quantization_config" in raw:  # GPTQ / AWQ / FP8 / int8: leaves that dequantize inside the matmul
            from jaxswift.quant.load import load_quantized_params
            params = load_quantized_params(path, config, raw["quantization_config"], shardings)
        else:
            params = load_hf_params(path, config, shardings)
        tokenizer = _load_tokenizer(path) if load_tokenizer else None
    return Model(config, params, tokenizer, str(path))


def save_model(model: Model, out_dir: str | Path) -> Path:
    """Writes an HF folder (config.json, model.safetensors, tokenizer) that transformers loads."""
    return save_hf(model.params, model.config, out_dir, tokenizer=model.tokenizer)


def generate_ids(model: Model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, ignore_eos: bool = False) -> list[list[int]]:
    """New token ids per prompt (without the final eos); ignore_eos generates exactly max_new_tokens."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    eos = stop_token_ids(model.config, model.tokenizer)
    stop = np.asarray([-1], np.int32) if ignore_eos else eos  # -1 matches no token
    pad = model.tokenizer.pad_token_id if model.tokenizer is not None and model.tokenizer.pad_token_id is not None \
        else int(eos[0])
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
             top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> list[str]:
    """Continues each raw-text prompt (no chat template); greedy when temperature is 0."""
    if model.tokenizer is None:
        raise ConfigError(f"{model.source}: the model has no tokenizer; pass token ids to generate_ids instead")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    encoded = [model.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    new_ids = generate_ids(model, encoded, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           top_k=top_k, seed=seed)
    return [model.tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]


def chat_prompt_ids(model: Model, messages: list[dict]) -> list[int]:
    """The model's own chat template with the assistant header appended, as token ids."""
    text = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return model.tokenizer.encode(text, add_special_tokens=False)


def chat(model: Model, messages: list[dict], *, max_new_tokens: int = 256, **sampling) -> str:
    """The assistant's reply to `messages` (OpenAI-style role/content dicts)."""
    if model.tokenizer is None:
        raise ConfigError(f"{model.source}: the model has no tokenizer, so it cannot chat")
    ids = generate_ids(model, [chat_prompt_ids(model, messages)], max_new_tokens=max_new_tokens, **sampling)[0]
    return model.tokenizer.decode(ids, skip_special_tokens=True)
