"""Sentence vectors of an embedding model, for `jaxswift deploy` (/v1/embeddings) and library use.

    embedder = Embedder(model, EmbeddingSpec("last", normalize=True), max_length=512)
    vectors = embedder.embed([embedder.encode("a text"), [12, 34, 2]])    # [n, D] float32 numpy

Inputs are encoded as training encodes a row's text (data/embedding.encode_text: the tokenizer's ids, EOS last);
token-id inputs are taken as given. Rows are right-padded to a power-of-two length (at least 16, at most max_length)
and run in chunks of at most `max_batch` rows, each chunk padded to a power of two rows, so few shapes compile
(`warmup` compiles them all).

An embedding folder says how it pools through sentence-transformers' `modules.json` + `1_Pooling/config.json`
(what `jaxswift sft --task_type embedding` writes, and what Qwen3-Embedding and other hub models ship):
`read_embedding_spec(folder)`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from jaxswift.data.embedding import encode_text
from jaxswift.errors import ConfigError
from jaxswift.models.pooling import POOLINGS, embed


MIN_LENGTH = 16


@dataclasses.dataclass(frozen=True)
class EmbeddingSpec:
    pooling: str = "last"
    normalize: bool = True

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ConfigError(f"embedding pooling {self.pooling!r}: expected one of {' | '.join(POOLINGS)}")


def read_embedding_spec(folder: str | Path) -> EmbeddingSpec | None:
    """The pooling a sentence-transformers folder declares (None when the folder has no modules.json). A pooling
    jaxswift cannot compute (CLS, max, ...) is a ConfigError naming the file."""
    folder = Path(folder)
    modules_file = folder / "modules.json"
    if not folder.is_dir() or not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text())
        types = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{modules_file}: not a sentence-transformers module list ({e})") from None
    if "Pooling" not in types:
        raise ConfigError(f"{modules_file}: no Pooling module; jaxswift serves last-token or mean pooling")
    config_file = folder / types["Pooling"] / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{config_file}: cannot read the pooling config ({e})") from None
    modes = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and v is True)
    by_mode = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean"}
    if len(modes) != 1 or modes[0] not in by_mode:
        raise ConfigError(f"{config_file}: pooling {', '.join(modes) or 'none'}; jaxswift serves "
                          "pooling_mode_lasttoken or pooling_mode_mean_tokens (one of them)")
    extra = sorted(set(types) - {"Transformer", "Pooling", "Normalize"})
    if extra:
        raise ConfigError(f"{modules_file}: modules {', '.join(extra)} are not supported (Transformer, Pooling, "
                          "Normalize are)")
    return EmbeddingSpec(by_mode[modes[0]], "Normalize" in types)


class Embedder:
    """A loaded text model's params, config and tokenizer, and one jitted embed per (rows, length) bucket."""

    def __init__(self, model, spec: EmbeddingSpec, *, max_length: int, max_batch: int = 32):
        if model.is_vlm:
            raise ConfigError(f"{model.source}: embeddings are served for text models; this is a vision-language "
                              "model")
        if model.tokenizer is None:
            raise ConfigError(f"{model.source}: no tokenizer found; an embedding server needs one")
        if max_length < 1 or max_batch < 1:
            raise ConfigError(f"max_length and max_batch must be positive, got {max_length}, {max_batch}")
        self.model, self.spec = model, spec
        self.tokenizer = model.tokenizer
        self.max_length, self.max_batch = max_length, max_batch
        self.dimensions = model.config.hidden_size
        self.vocab_size = model.config.vocab_size
        cfg = model.config
        self._embed = jax.jit(lambda p, t, s: embed(p, t, s, cfg, pooling=spec.pooling, normalize=spec.normalize))

    def encode(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text)

    def embed(self, inputs: list[list[int]]) -> np.ndarray:
        """[len(inputs), D] float32 vectors; every input 1..max_length ids (the caller checks)."""
        out = []
        for start in range(0, len(inputs), self.max_batch):
            chunk = inputs[start:start + self.max_batch]
            rows = min(_power_of_two(len(chunk)), self.max_batch)
            length = min(max(_power_of_two(max(len(ids) for ids in chunk)), MIN_LENGTH), self.max_length)
            tokens = np.zeros((rows, length), np.int32)
            segments = np.zeros((rows, length), np.int32)
            for i, ids in enumerate(chunk):
                tokens[i, :len(ids)], segments[i, :len(ids)] = ids, 1
            out.append(np.asarray(self._embed(self.model.params, tokens, segments))[:len(chunk)])
        return np.concatenate(out, axis=0)

    def shapes(self) -> list[tuple[int, int]]:
        """Every (rows, length) `embed` can run: the compiled shapes."""
        rows = sorted({min(_power_of_two(n), self.max_batch) for n in range(1, self.max_batch + 1)})
        lengths = sorted({min(max(_power_of_two(n), MIN_LENGTH), self.max_length)
                          for n in [1] + [1 << k for k in range(self.max_length.bit_length() + 1)]})
        return [(r, t) for r in rows for t in lengths]

    def warmup(self) -> None:
        """Compile every shape before serving."""
        for rows, length in self.shapes():
            ids = np.zeros((rows, length), np.int32)
            jax.block_until_ready(self._embed(self.model.params, ids, np.ones_like(ids)))


def _power_of_two(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()
