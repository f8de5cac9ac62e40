"""Scoring with a sequence classifier (an XxxForSequenceClassification folder): class probabilities of chats, and
reranker relevance of (query, document) pairs, encoded exactly as the trainer encodes them (data/classify.py).

Each call pads its sequences on the right with the pad id to a bucketed length (few compiled shapes) and runs the
jitted forward in batches; the head reads each row's last non-pad token (models/heads.py)."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.data.classify import encode_messages
from jaxswift.data.pipeline import bucket_length
from jaxswift.errors import ConfigError
from jaxswift.models.heads import sequence_logits


class SequenceScorer:
    """Logits, probabilities and rerank scores of a loaded classifier `Model` (model.head set)."""

    def __init__(self, model, *, max_length: int = 2048, batch_size: int = 16):
        if model.head is None:
            raise ConfigError(f"{model.source}: not a sequence classifier (its config.json names no "
                              "XxxForSequenceClassification architecture)")
        if model.tokenizer is None:
            raise ConfigError(f"{model.source}: no tokenizer found; scoring needs one")
        self.model, self.head, self.tokenizer = model, model.head, model.tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self._lock = threading.Lock()  # one forward at a time (requests arrive on several threads)
        head, cfg = model.head, model.config

        def forward(params, tokens, segment_ids):
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape) * segment_ids
            return sequence_logits(params, tokens, cfg, head.pad_token_id, positions=positions,
                                   segment_ids=segment_ids)

        self._forward = jax.jit(forward)

    # ---- encoding
    def encode_text(self, text: str) -> np.ndarray:
        """A text is the user turn of a one-turn chat, as seq_cls rows with one user message train."""
        return encode_messages(self.tokenizer, [{"role": "user", "content": text}])

    def encode_pair(self, query: str, document: str) -> np.ndarray:
        """(query, document) as a reranker row's sequence: the query's user turn, the document as the reply."""
        return encode_messages(self.tokenizer, [{"role": "user", "content": query},
                                                {"role": "assistant", "content": document}])

    # ---- scoring
    def logits(self, sequences: list[np.ndarray]) -> np.ndarray:
        """[N, C] float32 logits; a sequence longer than max_length is an error naming it."""
        for i, seq in enumerate(sequences):
            if len(seq) > self.max_length:
                raise ConfigError(f"input {i}: {len(seq)} tokens, more than the {self.max_length} this server takes")
        out = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start:start + self.batch_size]
            rows = min(self.batch_size, 1 << (len(chunk) - 1).bit_length())  # powers of two: few shapes
            length = bucket_length(max(len(s) for s in chunk), self.max_length)
            tokens = np.full((rows, length), self.head.pad_token_id, np.int32)
            segment_ids = np.zeros((rows, length), np.int32)
            for r, seq in enumerate(chunk):
                tokens[r, :len(seq)], segment_ids[r, :len(seq)] = seq, 1
            with self._lock:
                logits = self._forward(self.model.params, tokens, segment_ids)
            out.append(np.asarray(jax.device_get(logits))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, self.head.num_labels), np.float32)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Per class: softmax (single label), sigmoid (multi-label); regression outputs are returned as they are."""
        if self.head.problem_type == "single_label_classification":
            shifted = np.exp(logits - logits.max(-1, keepdims=True))
            return shifted / shifted.sum(-1, keepdims=True)
        if self.head.problem_type == "multi_label_classification":
            return 1.0 / (1.0 + np.exp(-logits))
        return logits

    def relevance(self, query: str, documents: list[str]) -> np.ndarray:
        """[len(documents)] sigmoid of the reranker's one logit per (query, document)."""
        if self.head.num_labels != 1:
            raise ConfigError(f"{self.model.source}: reranking needs a one-label head (a reranker); this classifier "
                              f"has {self.head.num_labels} labels")
        logits = self.logits([self.encode_pair(query, d) for d in documents])[:, 0]
        return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))

    def shutdown(self) -> None:
        """Nothing runs in the background (scoring happens in the request's thread); here for the serve recipe."""
