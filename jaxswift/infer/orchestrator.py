"""The orchestrator: one background thread drives an Engine with continuous batching.

Requests wait in a bounded queue (a full queue raises `QueueFull`, which the server answers with 429). Between
decode steps the thread prefills waiting requests into free slots (`can_admit` first: when KV pages run out a
request waits), then runs one `generate` step for every occupied slot and hands each request its new text through
a `sink(index, Chunk)` callback, called on the engine thread. Text is detokenized incrementally (multi-byte
characters split over tokens come out whole) and stop strings are matched across token boundaries: text that could
still be the start of a stop string is held back, and text after a stop is never emitted.

Chunked prefill (an engine with `max_num_batched_tokens`): between two decode steps at most that many prompt tokens
are prefilled. A longer prompt runs one chunk per round (`engine.prefill_step`) and takes its slot after
the last one; the requests behind it wait (FIFO), so its slot and pages stay free for it meanwhile.

A cancelled request (client gone) or one past its deadline gives its slot and pages back before the next step.
`shutdown()` fails everything still waiting or running with `EngineShutdown` and joins the thread.

    orchestrator = Orchestrator(engine)
    results = orchestrator.generate([GenerationRequest(prompt_ids, RequestSampling(max_tokens=32))])
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable, Sequence

from jaxswift.errors import JaxswiftError
from jaxswift.infer.engine_api import Engine, RequestSampling, ResultTokens

log = logging.getLogger(__name__)


class OrchestratorError(JaxswiftError):
    """A request could not be served; the server maps each subclass to an HTTP status."""


class QueueFull(OrchestratorError):
    """The waiting queue is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class RequestTooLarge(OrchestratorError):
    """The prompt plus max_tokens does not fit the engine (a client's mistake)."""


class RequestRejected(OrchestratorError):
    """The engine refused the request's prompt or sampling settings (a client's mistake)."""


class RequestTimeout(OrchestratorError):
    """The request ran past its deadline (waiting and generating together)."""


class EngineShutdown(OrchestratorError):
    """The orchestrator stopped before the request finished."""


class EngineFailure(OrchestratorError):
    """The engine raised while running the request (a server fault, not the client's)."""


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...] | list[int]
    sampling: RequestSampling
    stop: tuple[str, ...] = ()
    timeout: float | None = None  # seconds from submission; None: the orchestrator's default
    # vLLM's prompt_logprobs: score the prompt's tokens too, with this many alternatives each (None: don't). With
    # sampling.max_tokens 0 the request only scores its prompt (an evaluator's echo request) and takes no slot.
    prompt_logprobs: int | None = None
    # a vision-language model's request with images: engine_vlm.RequestImages, preprocessed before submission (the
    # engine runs the tower at its prefill; no prefix cache, no chunked prefill)
    images: object | None = None


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the best alternatives (token id, log-prob), best first


@dataclasses.dataclass
class Chunk:
    """New output of one request. The last chunk has `finish_reason` ("stop" | "length") or `error` set."""
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: OrchestratorError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens generated so far (the final eos / stop token id excluded)
    # on the request's first chunk when it asked for prompt_logprobs: per prompt token, None for the first, else
    # a TokenLogprob of that token given the ones before it
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


Sink = Callable[[int, Chunk], None]


# ---------------------------------------------------------------- text: incremental decoding and stop strings

class IncrementalDetokenizer:
    """Decodes a growing token list into text deltas; a character split across tokens waits for its last byte."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # decoding restarts here, so merges with earlier tokens are seen
        self.read_offset = 0    # text up to this token has been returned

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        seen = decode(self.ids[self.prefix_offset:self.read_offset])
        full = decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd"):  # a character's first bytes: wait for the rest
            return ""
        if full == seen:  # special tokens (skipped): move past them so the window stays short
            self.read_offset = len(self.ids)
            return ""
        if len(full) < len(seen):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(seen):]


class StopStringMatcher:
    """Feeds text in, releases what can no longer be part of a stop string; `stopped` once one matched."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


# ---------------------------------------------------------------- one request's life on the engine thread

class _Live:
    """A submitted request: its output state, deadline and where its chunks go."""

    def __init__(self, ticket: "Ticket", index: int, request: GenerationRequest, tokenizer, deadline: float | None,
                 end_ids: frozenset[int]):
        self.ticket, self.index, self.request = ticket, index, request
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopStringMatcher(request.stop)
        self.deadline = deadline
        self.end_ids = end_ids  # tokens that end the request without being part of its output
        self.completion_tokens = 0
        self.slot: int | None = None
        self.finished = False
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # goes out with the first chunk
        self.partial = None  # chunked prefill: the engine's Prefix of the prompt's chunks done so far

    def score_prompt(self, engine: Engine, params):
        k = self.request.prompt_logprobs
        scored = engine.prompt_logprobs(params, list(self.request.prompt_ids), k, self.request.sampling.adapter)
        self.prompt_logprobs = [None if entry is None else TokenLogprob(token, entry[0], entry[1])
                                for token, entry in zip(self.request.prompt_ids, scored)]

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    def send(self, chunk: Chunk):
        chunk.prompt_tokens = len(self.request.prompt_ids)
        chunk.completion_tokens = self.completion_tokens
        chunk.prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, None
        self.finished = self.finished or chunk.final
        self.ticket.deliver(self.index, chunk)

    def fail(self, error: OrchestratorError):
        if not self.finished:
            self.send(Chunk(error=error))

    def take_token(self, result: ResultTokens, row: int) -> bool:
        """Handles one sampled token; True when the request has ended (the caller then frees its slot)."""
        token, done = int(result.tokens[row]), bool(result.done[row])
        ends_by_token = done and token in self.end_ids
        chunk = Chunk()
        if not ends_by_token:
            self.completion_tokens += 1
            chunk.token_ids.append(token)
            chunk.text = self.stops.push(self.detok.push(token))
            if self.request.sampling.logprobs is not None:
                chunk.logprobs.append(_token_logprob(result, row, token, self.request.sampling.logprobs))
        if self.stops.stopped:
            chunk.finish_reason = "stop"
        elif done:
            chunk.text += self.stops.flush()
            chunk.finish_reason = "stop" if ends_by_token else "length"
        self.send(chunk)
        return chunk.final


def _token_logprob(result: ResultTokens, row: int, token: int, k: int) -> TokenLogprob:
    top = [(int(i), float(p)) for i, p in zip(result.top_ids[row][:k], result.top_logprobs[row][:k])]
    return TokenLogprob(token, float(result.logprobs[row]), top)


class Ticket:
    """The handle of one `submit` call (n requests). `cancel()` is safe from any thread."""

    def __init__(self, sink: Sink, n: int):
        self._sink = sink
        self.n = n
        self.cancelled = False
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None

    def deliver(self, index: int, chunk: Chunk):
        if self.first_token_at is None and chunk.token_ids:
            self.first_token_at = time.monotonic()
        try:
            self._sink(index, chunk)
        except Exception:  # a closed event loop, a broken consumer: the request is abandoned
            log.debug("sink failed; cancelling the request", exc_info=True)
            self.cancelled = True

    def cancel(self):
        self.cancelled = True


# ---------------------------------------------------------------- the orchestrator

class Orchestrator:
    """Feeds `engine` from a bounded queue on one background thread (started at construction)."""

    def __init__(self, engine: Engine, *, max_queue: int = 256, request_timeout: float | None = None,
                 tokenizer=None, params=None):
        self.engine = engine
        self.params = engine.params if params is None else params
        self.tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self._eos_ids = frozenset(int(i) for i in getattr(engine, "eos_ids", ()))
        self._waiting: collections.deque[_Live] = collections.deque()
        self._running: dict[int, _Live] = {}
        self._free_slots = list(range(engine.max_concurrent_decodes))[::-1]
        self._last_prefill = None  # ((prompt ids, adapter), prefix) within one admission round
        # chunked prefill: at most this many prompt tokens between two decode steps (None: whole prompts)
        self._budget = getattr(engine, "max_num_batched_tokens", None)
        self._prefilling: _Live | None = None  # the request whose long prompt is being prefilled chunk by chunk
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="jaxswift-orchestrator", daemon=True)
        self._thread.start()

    # ---- public, any thread
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, requests: Sequence[GenerationRequest], sink: Sink) -> Ticket:
        """Queues the requests (all or none); chunks go to `sink(index, chunk)` on the engine thread."""
        for r in requests:
            self.check_fits(len(r.prompt_ids), r.sampling.max_tokens)
        ticket = Ticket(sink, len(requests))
        with self._wake:
            if self._stopping:
                raise EngineShutdown("the server is shutting down")
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            for i, r in enumerate(requests):
                timeout = self.request_timeout if r.timeout is None else r.timeout
                deadline = None if timeout is None else ticket.submitted_at + timeout
                eos = frozenset() if r.sampling.ignore_eos else self._eos_ids
                end_ids = eos | frozenset(int(t) for t in r.sampling.stop_token_ids)
                self._waiting.append(_Live(ticket, i, r, self.tokenizer, deadline, end_ids))
            self._wake.notify()
        return ticket

    def check_fits(self, prompt_length: int, max_tokens: int):
        limit = self.engine.max_model_len
        if prompt_length < 1:
            raise RequestTooLarge("the prompt is empty (it needs at least one token)")
        if prompt_length + max_tokens > limit:
            raise RequestTooLarge(f"the prompt ({prompt_length} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                  f"context of {limit} tokens")

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Chunk]:
        """Blocking: every request's whole output as one Chunk (text, token_ids, logprobs, finish_reason)."""
        results = [Chunk() for _ in requests]
        done = queue.Queue()

        def sink(index: int, chunk: Chunk):
            merged = results[index]
            merged.text += chunk.text
            merged.token_ids += chunk.token_ids
            merged.logprobs += chunk.logprobs
            merged.prompt_logprobs = merged.prompt_logprobs or chunk.prompt_logprobs
            merged.prompt_tokens, merged.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
            merged.finish_reason, merged.error = chunk.finish_reason, chunk.error
            if chunk.final:
                done.put(index)

        self.submit(requests, sink)
        for _ in requests:
            done.get()
        return results

    def shutdown(self, timeout: float | None = 30.0):
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    # ---- the engine thread
    def _loop(self):
        state = self.engine.init_decode_state()
        while True:
            with self._wake:
                if not (self._stopping or self._waiting or self._running or self._prefilling):
                    self._wake.wait(timeout=0.1)
                if self._stopping:
                    break
            try:
                state = self._step(state)
            except Exception as e:  # an engine fault fails the requests it touched, never the thread
                log.exception("engine step failed")
                for live in [*self._running.values()]:
                    live.fail(EngineFailure(f"the engine failed: {type(e).__name__}: {e}"))
                self._running.clear()
                self._fail_prefilling(EngineFailure(f"the engine failed: {type(e).__name__}: {e}"))
                self._free_slots = list(range(self.engine.max_concurrent_decodes))[::-1]
                state = self.engine.init_decode_state()
        self._fail_all(EngineShutdown("the server shut down before the request finished"))

    def _step(self, state):
        state = self._drop_abandoned(state, time.monotonic())
        state = self._admit(state)
        if not self._running:
            return state
        state, result = self.engine.generate(self.params, state)
        for slot, live in list(self._running.items()):
            if result.valid[slot] and live.take_token(result, slot):
                state = self._release(state, slot)
        return state

    def _drop_abandoned(self, state, now: float):
        for slot, live in list(self._running.items()):
            if live.ticket.cancelled or live.expired(now):
                if not live.ticket.cancelled:
                    live.fail(RequestTimeout("the request timed out"))
                state = self._release(state, slot)
        live = self._prefilling
        if live is not None and live.ticket.cancelled:
            self._forget_prefilling(live)
        elif live is not None and live.expired(now):
            self._fail_prefilling(RequestTimeout("the request timed out while its prompt was prefilled"))
        with self._wake:
            keep = collections.deque()
            for live in self._waiting:
                if live.ticket.cancelled:
                    continue
                if live.expired(now):
                    live.fail(RequestTimeout("the request timed out while waiting in the queue"))
                    continue
                keep.append(live)
            self._waiting = keep
        return state

    def _admit(self, state):
        """Prefills waiting requests, oldest first, while a slot is free and the engine has pages for them."""
        try:
            return self._admit_while_free(state)
        finally:
            self._last_prefill = None  # no prompt's keys/values held between rounds

    def _admit_while_free(self, state):
        spent = 0  # prompt tokens prefilled this round (chunked prefill keeps them within the budget)
        while self._free_slots:
            live = self._prefilling  # a long prompt being prefilled goes first: one more chunk
            if live is None:
                if spent and self._budget is not None and self._over_budget(self._budget - spent):
                    return state  # the next prompt waits for the next round
                live = self._next_admissible()
                if live is None:
                    return state
                if not self._score_prompt(live) or live.request.sampling.max_tokens == 0:
                    if not live.finished:  # max_tokens 0: the prompt's scores were all it asked for
                        live.send(Chunk(finish_reason="length"))
                    continue
            done_before = 0 if live.partial is None else live.partial.length
            try:
                first = self._prefill(live)
                if first is None:
                    continue
                if first[1] is None:  # more chunks to go: the running slots decode first
                    return state
                if live.take_token(first[1], 0) or live.ticket.cancelled:  # ended at its first token
                    if hasattr(self.engine, "cache_prefix"):  # its prompt may still serve the next request
                        state = self.engine.cache_prefix(first[0], state)
                    continue
                state = self.engine.insert(first[0], state, self._free_slots[-1])
            except Exception as e:  # the loop resets the engine; this request is in no queue, so fail it here
                live.fail(EngineFailure(f"the engine failed: {type(e).__name__}: {e}"))
                raise
            finally:
                spent += len(live.request.prompt_ids) - done_before
            live.slot = self._free_slots.pop()
            self._running[live.slot] = live
        return state

    def _over_budget(self, left: int) -> bool:
        """The next waiting prompt needs more than `left` tokens of prefill (another choice of the prompt just
        prefilled needs none: it resamples)."""
        with self._wake:
            if not self._waiting:
                return False
            request = self._waiting[0].request
        if self._last_prefill is not None and self._last_prefill[0] == _prefill_key(request):
            return False
        return len(request.prompt_ids) > left

    def _fail_prefilling(self, error: OrchestratorError):
        if self._prefilling is not None:
            self._prefilling.fail(error)
            self._prefilling.partial, self._prefilling = None, None

    def _next_admissible(self) -> _Live | None:
        """Pops the oldest waiting request if the engine can take it now (FIFO: the others wait behind it)."""
        with self._wake:
            while self._waiting:
                live = self._waiting[0]
                if live.request.sampling.max_tokens == 0:  # scores its prompt only: needs no slot nor pages
                    return self._waiting.popleft()
                try:
                    ok = self._can_admit(live.request)
                except JaxswiftError as e:
                    self._waiting.popleft()
                    live.fail(RequestRejected(str(e)))
                    continue
                if ok:
                    return self._waiting.popleft()
                if self._running:  # pages come back when a running request ends
                    return None
                self._waiting.popleft()  # nothing will ever free pages for it
                live.fail(RequestTooLarge("the request needs more KV-cache pages than the engine has"))
            return None

    def _can_admit(self, request: GenerationRequest) -> bool:
        """The engine's answer for this prompt when it can give one (pages shared with running requests through
        prefix caching take none), else for its length."""
        if hasattr(self.engine, "can_admit_prompt") and request.images is None:  # images: no cached pages
            return self.engine.can_admit_prompt(request.prompt_ids, request.sampling.max_tokens,
                                                request.sampling.adapter)
        return self.engine.can_admit(len(request.prompt_ids), request.sampling.max_tokens)

    def _score_prompt(self, live: _Live) -> bool:
        """Scores the prompt when the request asks for prompt_logprobs; False when that failed (it then failed)."""
        if live.request.prompt_logprobs is None:
            return True
        return self._guarded(live, "scoring the prompt", lambda: live.score_prompt(self.engine, self.params) or True)

    def _prefill(self, live: _Live):
        """(prefix, first ResultTokens), or None when the engine refused the request (only it fails). The n choices
        of one request (queued one after another) share the first one's prefill when the engine can `resample`.
        A prompt longer than the chunked-prefill budget runs one chunk per call: (partial prefix, None) until
        its last chunk."""
        return self._guarded(live, "prefill", lambda: self._prefill_or_chunk(live))

    def _prefill_or_chunk(self, live: _Live):
        sampling, ids, images = live.request.sampling, list(live.request.prompt_ids), live.request.images
        key = _prefill_key(live.request)
        if self._last_prefill is not None and self._last_prefill[0] == key and hasattr(self.engine, "resample"):
            return self.engine.resample(self._last_prefill[1], sampling)
        self._last_prefill = None
        if images is None and self._budget is not None and (live.partial is not None or len(ids) > self._budget):
            self._prefilling = live  # until its last chunk (a failure below fails it there)
            prefix, first = self.engine.prefill_step(self.params, ids, sampling, live.partial)
            live.partial = prefix if first is None else None
            if first is None:
                return prefix, None
            self._prefilling = None
        elif images is not None:  # prefilled whole, the tower run once
            prefix, first = self.engine.prefill(self.params, *self.engine.pad_prompt(ids), sampling, images=images)
        else:
            prefix, first = self.engine.prefill(self.params, *self.engine.pad_prompt(ids), sampling)
        self._last_prefill = (key, prefix)
        return prefix, first

    def _guarded(self, live: _Live, what: str, run):
        """run()'s value, or None when it raised: only this request fails (RequestRejected when the engine
        refused it, EngineFailure for a fault)."""
        try:
            return run()
        except JaxswiftError as e:
            self._forget_prefilling(live)
            live.fail(RequestRejected(str(e)))
        except Exception as e:
            log.exception("%s failed", what)
            self._forget_prefilling(live)
            live.fail(EngineFailure(f"{what} failed: {type(e).__name__}: {e}"))
        return None

    def _forget_prefilling(self, live: _Live):
        if self._prefilling is live:
            live.partial, self._prefilling = None, None

    def _release(self, state, slot: int):
        self._running.pop(slot, None)
        self._free_slots.append(slot)
        return self.engine.free_resource(state, slot)

    def _fail_all(self, error: OrchestratorError):
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for live in [*waiting, *self._running.values()]:
            live.fail(error)
        self._running.clear()
        self._fail_prefilling(error)


def _prefill_key(request: GenerationRequest) -> tuple:
    """What makes two requests' prefills equal: the prompt, the adapter and the images (by identity: the n choices
    of one request share one object; equal placeholder ids with other images are another prompt)."""
    return tuple(request.prompt_ids), request.sampling.adapter, request.images


class AsyncSink:
    """A sink that feeds an asyncio.Queue of (index, Chunk) from the engine thread (for FastAPI handlers)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Chunk]] = asyncio.Queue()

    def __call__(self, index: int, chunk: Chunk):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, chunk))

