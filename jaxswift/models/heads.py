"""Heads over the decoder's final hidden states for tasks other than next-token prediction (einsum legend in
models/transformer.py; C = classes).

Sequence classification follows transformers' `*ForSequenceClassification`: a bias-free `score` Linear(D, C) read
at each row's last non-pad token, which transformers finds as the rightmost token that is not `pad_token_id` (so
left and right padding both work, and a row that ends in the pad id is read before it). The params keep the weight
as params["score"] [D, C] (HF's `score.weight` is [C, D]).

The generative reranker (Qwen3-Reranker style) has no head: its score is the LM's logit of "yes" minus that of
"no" at the last token, i.e. the last hidden state times the difference of those two output-weight columns.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxswift.errors import ConfigError
from jaxswift.models.config import ModelConfig
from jaxswift.models.transformer import hidden_states, output_weight

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


@dataclasses.dataclass(frozen=True)
class ClassifierHead:
    """What a sequence-classification folder's config.json says about its head (static, hashable)."""

    num_labels: int
    problem_type: str
    pad_token_id: int
    labels: tuple[str, ...]  # id2label, by class index

    @property
    def is_regression(self) -> bool:
        return self.problem_type == "regression"


def default_problem_type(num_labels: int) -> str:
    """transformers' inference when config.problem_type is unset (integer labels assumed for C > 1)."""
    return "regression" if num_labels == 1 else "single_label_classification"


def make_head(num_labels: int, problem_type: str | None, pad_token_id: int,
              labels: tuple[str, ...] | None = None) -> ClassifierHead:
    problem_type = problem_type or default_problem_type(num_labels)
    if problem_type not in PROBLEM_TYPES:
        raise ConfigError(f"problem_type {problem_type!r}: expected one of {' | '.join(PROBLEM_TYPES)}")
    labels = tuple(labels) if labels else tuple(f"LABEL_{i}" for i in range(num_labels))
    if len(labels) != num_labels:
        raise ConfigError(f"id2label has {len(labels)} names for {num_labels} labels")
    return ClassifierHead(num_labels, problem_type, int(pad_token_id), labels)


def init_score(hidden_size: int, num_labels: int, seed: int) -> jax.Array:
    """A fresh head [D, C]: normal(0, 0.02), transformers' initializer_range for these models."""
    return 0.02 * jax.random.normal(jax.random.key(seed + 1), (hidden_size, num_labels), jnp.float32)


def last_token_index(tokens_BT: jax.Array, pad_token_id: int) -> jax.Array:
    """[B] index of each row's rightmost token that is not the pad id (0 for a row of pads), as transformers."""
    T = tokens_BT.shape[1]
    not_pad = (tokens_BT != pad_token_id).astype(jnp.int32)
    return jnp.argmax(jnp.arange(T, dtype=jnp.int32) * not_pad, axis=-1)


def pooled(h_BTD: jax.Array, index_B: jax.Array) -> jax.Array:
    """[B, D]: each row's hidden state at `index_B`."""
    return jnp.take_along_axis(h_BTD, index_B[:, None, None], axis=1)[:, 0]


def score_logits(score_DC, h_BD: jax.Array) -> jax.Array:
    """[B, C] float32 class logits of pooled hidden states (the head applied at one position per row)."""
    return jnp.einsum("BD,DC->BC", h_BD.astype(jnp.float32), score_DC.astype(jnp.float32))


def sequence_logits(params, tokens_BT, cfg: ModelConfig, pad_token_id: int, *, positions=None,
                    segment_ids=None) -> jax.Array:
    """[B, C] logits of a sequence classifier: `score` at each row's last non-pad token."""
    h, _ = hidden_states(params, tokens_BT, cfg, positions=positions, segment_ids=segment_ids)
    return score_logits(params["score"], pooled(h, last_token_index(tokens_BT, pad_token_id)))


def yes_no_score(params, h_BD: jax.Array, cfg: ModelConfig, yes_id: int, no_id: int) -> jax.Array:
    """[B] float32 logit(yes) - logit(no) of the LM head at pooled hidden states (generative reranker)."""
    w_DV = output_weight(params, cfg)
    if hasattr(w_DV, "apply"):  # a LoRA or quantized lm_head: the full logits, then the two columns
        logits = w_DV.apply("BTD,DV->BTV", h_BD[:, None]).astype(jnp.float32)[:, 0]
        return logits[:, yes_id] - logits[:, no_id]
    diff_D = w_DV[:, yes_id].astype(jnp.float32) - w_DV[:, no_id].astype(jnp.float32)
    return jnp.einsum("BD,D->B", h_BD.astype(jnp.float32), diff_D)
