"""The Engine API shape (JetStream's, implemented here, not imported): prefill -> insert into a slot -> generate.

An engine owns `max_concurrent_decodes` slots. A request is prefilled alone (`prefill`, which also samples its first
token), then inserted into a free slot of the decode state (`insert`); every `generate` call then advances every
occupied slot by one token. The orchestrator (`orchestrator.py`) is the only caller; it keeps the pool of free
slots, asks `can_admit` before inserting (when KV pages run out a request waits: it never corrupts another), and
calls `free_resource` when a request ends (eos, stop, max_tokens, a disconnected client).

Unlike JetStream, sampling is per request: every slot carries its own `RequestSampling`, applied inside the
jitted step.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import numpy as np

Params = Any
Prefix = Any
DecodeState = Any


@dataclasses.dataclass(frozen=True)
class RequestSampling:
    """Per-request sampling, as OpenAI / vLLM name it. temperature 0 is greedy.

    seed None draws from the engine's own stream; a given seed makes the request's samples reproducible whatever
    else shares the batch. logprobs: how many top alternatives to report per token (0: only the chosen token's
    log-prob; None: none). Stop strings are the orchestrator's (they can span token boundaries); stop token ids,
    eos and max_tokens are the engine's.
    """
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    adapter: int = 0  # index of a LoRA adapter served on the same base (0: the base model)
    # structured output: a grammar.Constraint the output must match (the engine masks every step's tokens)
    constraint: Any = None


@dataclasses.dataclass
class ResultTokens:
    """What one prefill or generate step produced, per slot (numpy, on the host).

    tokens [S]: the token sampled this step; valid [S]: the slot was occupied and produced `tokens`; lengths [S]:
    tokens generated so far by the slot's request (this one included); done [S]: the request ended with this token
    (eos / stop token id / max_tokens / context full): the orchestrator then frees the slot. logprobs [S]: the
    chosen token's log-prob, log_softmax of the raw logits (before penalties and temperature: vLLM's default);
    top_ids / top_logprobs [S, k]: the k best alternatives, k the largest `logprobs` among the slots (may be 0).
    A prefill's ResultTokens has S = 1.
    """
    tokens: np.ndarray
    valid: np.ndarray
    lengths: np.ndarray
    done: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray

    def slot(self, i: int) -> dict:
        return {name: getattr(self, name)[i] for name in
                ("tokens", "valid", "lengths", "done", "logprobs", "top_ids", "top_logprobs")}


class Engine(abc.ABC):
    """JetStream's Engine shape. `params` are passed in (not held) so a trainer can serve its current weights."""

    @abc.abstractmethod
    def prefill(self, params: Params, padded_tokens: np.ndarray, true_length: int, sampling: RequestSampling,
                existing_prefix: Prefix | None = None) -> tuple[Prefix, ResultTokens]:
        """Runs the prompt (padded to a bucket; `true_length` real tokens) and samples its first token."""

    @abc.abstractmethod
    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
        """Places a prefilled request into `slot` (taking KV pages for it)."""

    @abc.abstractmethod
    def generate(self, params: Params, decode_state: DecodeState) -> tuple[DecodeState, ResultTokens]:
        """One decode step for every occupied slot."""

    @abc.abstractmethod
    def init_decode_state(self) -> DecodeState:
        """An empty decode state: every slot free."""

    @abc.abstractmethod
    def free_resource(self, decode_state: DecodeState, slot: int) -> DecodeState:
        """Ends the slot's request and returns its KV pages."""

    @abc.abstractmethod
    def can_admit(self, prompt_length: int, max_tokens: int) -> bool:
        """Whether a request of this size can be inserted now without running out of KV pages later."""

    @abc.abstractmethod
    def pad_prompt(self, token_ids: list[int]) -> tuple[np.ndarray, int]:
        """(padded_tokens [bucket], true_length): the prompt padded to the length bucket `prefill` expects."""

    @property
    @abc.abstractmethod
    def max_concurrent_decodes(self) -> int: ...

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """Longest prompt + completion a slot holds."""

    @property
    @abc.abstractmethod
    def max_prefill_length(self) -> int: ...

    @property
    def samples_per_slot(self) -> int:
        return 1

    @property
    def mesh(self):
        return None
