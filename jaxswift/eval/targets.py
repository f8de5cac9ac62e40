"""What an evaluation asks a model: log-likelihoods of continuations, and generations.

`InProcessTarget` runs jaxswift's forward (log-likelihood: packed, bucketed, jitted calls) and batched greedy /
sampled generation on a params pytree (LoRA leaves included). `RemoteTarget` asks any OpenAI-compatible server:
chat completions (or completions, for raw-text tasks) to generate, and legacy completions with echo + logprobs +
max_tokens 0 for log-likelihood, where the server offers them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from jaxswift.errors import ConfigError, JaxswiftError
from jaxswift.eval.loglik import Scored, encode_pair, loglikelihoods


class EvalError(JaxswiftError):
    """An evaluation target cannot do what a task needs (unreachable server, no prompt log-probs...)."""


@dataclasses.dataclass(frozen=True)
class GenRequest:
    messages: tuple | None      # chat turns (chat tasks) ...
    text: str | None            # ... or a raw-text prompt
    until: tuple[str, ...]
    max_new_tokens: int


def cut_at_stops(text: str, until: tuple[str, ...]) -> str:
    cut = min([text.find(s) for s in until if s and s in text], default=-1)
    return text if cut < 0 else text[:cut]


class InProcessTarget:
    """A jaxswift model in this process: `params` may carry LoRA adapters (the train state's params)."""

    def __init__(self, params, cfg, tokenizer, *, temperature: float = 0.0, seed: int = 0, batch_size: int = 64):
        if tokenizer is None:
            raise ConfigError("evaluation needs the model's tokenizer")
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        self.temperature, self.seed, self.batch_size = temperature, seed, batch_size
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (list(cfg.eos_token_ids) or [0])[0]
        self.prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[Scored]:
        encoded = [encode_pair(self.tokenizer, c, x, self.prefix_id) for c, x in pairs]
        return loglikelihoods(self.params, self.cfg, encoded, pad_id=self.pad_id)

    def rolling_loglikelihood(self, texts: list[str]) -> list[float]:
        """Each text's summed log-prob, token by token after the prefix token, in windows of the model's length
        (lm-evaluation-harness's rolling windows with one token of context)."""
        max_len = self.cfg.max_position_embeddings
        pairs, owner = [], []
        for i, text in enumerate(texts):
            ids = [self.prefix_id] + self.tokenizer.encode(text, add_special_tokens=False)
            for start in range(1, len(ids), max_len):
                pairs.append((ids[:start], ids[start:start + max_len]))
                owner.append(i)
        scored = loglikelihoods(self.params, self.cfg, pairs, pad_id=self.pad_id, max_length=max_len)
        totals = np.zeros(len(texts))
        np.add.at(totals, owner, [s.loglik for s in scored])
        return totals.tolist()

    def _prompt_ids(self, r: GenRequest) -> list[int]:
        if r.messages is not None:
            text = self.tokenizer.apply_chat_template(list(r.messages), tokenize=False, add_generation_prompt=True)
        else:
            text = r.text
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate(self, requests: list[GenRequest]) -> list[str]:
        """Batches of up to `batch_size` rows (a multiple of 8, the last one padded with copies), so a run compiles
        few shapes."""
        from jaxswift.api import Model, generate_ids

        model = Model(self.cfg, self.params, self.tokenizer)
        out: list[str | None] = [None] * len(requests)
        for n_new in sorted({r.max_new_tokens for r in requests}):
            idx = [i for i, r in enumerate(requests) if r.max_new_tokens == n_new]
            rows = min(self.batch_size, -(-len(idx) // 8) * 8)
            for start in range(0, len(idx), rows):
                chunk = idx[start:start + rows]
                prompts = [self._prompt_ids(requests[i]) for i in chunk]
                prompts += [prompts[0]] * (rows - len(prompts))
                new = generate_ids(model, prompts, max_new_tokens=n_new, temperature=self.temperature,
                                   seed=self.seed + start)
                for i, ids in zip(chunk, new):
                    out[i] = cut_at_stops(self.tokenizer.decode(ids, skip_special_tokens=True), requests[i].until)
        return out


class RemoteTarget:
    """An OpenAI-compatible server at `url` (with or without the trailing /v1)."""

    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None, temperature: float = 0.0,
                 seed: int = 0, concurrency: int = 8, timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.base = self.url.removesuffix("/v1")
        self.api_key, self.temperature, self.seed = api_key, temperature, seed
        self.concurrency, self.timeout = concurrency, timeout
        self.model = model or self._first_model()
        self.has_chat_template = True

    def _request(self, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base}/v1{path}", data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise _HTTPFailure(e.code, _error_message(e)) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise EvalError(f"cannot reach --eval_url {self.url} ({reason})") from None

    def _first_model(self) -> str:
        try:
            models = self._request("/models").get("data") or []
        except _HTTPFailure as e:
            raise EvalError(f"--eval_url {self.url}: GET /v1/models failed with HTTP {e.status}: {e.message}") from None
        if not models:
            raise EvalError(f"--eval_url {self.url}: /v1/models lists no model; pass --eval_model_name")
        return models[0]["id"]

    def _map(self, fn, items: list) -> list:
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    def generate(self, requests: list[GenRequest]) -> list[str]:
        return self._map(self._generate_one, requests)

    def _generate_one(self, r: GenRequest) -> str:
        body: dict[str, Any] = {"model": self.model, "max_tokens": r.max_new_tokens, "temperature": self.temperature,
                                "seed": self.seed}
        if r.until:
            body["stop"] = list(r.until)[:4]  # OpenAI's bound; the rest are cut below
        path = "/chat/completions" if r.messages is not None else "/completions"
        if r.messages is not None:
            body["messages"] = list(r.messages)
        else:
            body["prompt"] = r.text
        try:
            choice = self._request(path, body)["choices"][0]
        except _HTTPFailure as e:
            raise EvalError(f"--eval_url {self.url}: POST /v1{path} failed with HTTP {e.status}: {e.message}") from None
        text = choice["message"]["content"] if r.messages is not None else choice["text"]
        return cut_at_stops(text or "", r.until)

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[Scored]:
        return self._map(self._loglik_one, pairs)

    def rolling_loglikelihood(self, texts: list[str]) -> list[float]:
        raise EvalError(f"--eval_url {self.url}: perplexity tasks run in process only (the first token of an echoed "
                        f"prompt has no log-prob); evaluate them with --model")

    def _loglik_one(self, pair: tuple[str, str]) -> Scored:
        context, continuation = pair
        spaces = len(context) - len(context.rstrip())  # the split lm-evaluation-harness makes
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        body = {"model": self.model, "prompt": context + continuation, "echo": True, "logprobs": 1, "max_tokens": 0,
                "temperature": 0.0}
        try:
            lp = self._request("/completions", body)["choices"][0].get("logprobs")
        except _HTTPFailure as e:
            raise self._no_echo(f"HTTP {e.status}: {e.message}") from None
        if not lp or not lp.get("token_logprobs") or not lp.get("text_offset"):
            raise self._no_echo("the response has no logprobs.token_logprobs / text_offset")
        end = len(context) + len(continuation)
        picked = [i for i, off in enumerate(lp["text_offset"]) if len(context) <= off < end]
        if not picked or lp["token_logprobs"][picked[0]] is None:
            raise EvalError(f"--eval_url {self.url}: the echoed tokens do not split at the context's end "
                            f"({len(context)} characters)")
        total = float(sum(lp["token_logprobs"][i] for i in picked))
        tops = lp.get("top_logprobs") or []
        greedy = len(tops) == len(lp["tokens"]) and all(
            tops[i] and max(tops[i], key=tops[i].get) == lp["tokens"][i] for i in picked)
        return Scored(total, greedy)

    def _no_echo(self, detail: str) -> EvalError:
        return EvalError(f"the server at {self.url} does not return prompt log-probs (echo) for /v1/completions with "
                         f"echo=true, logprobs=1, max_tokens=0 ({detail}); log-likelihood tasks need them: evaluate "
                         f"those in process with --model, or run only generation tasks against the server")


class _HTTPFailure(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read())
        return str(body.get("error", {}).get("message") or body)
    except Exception:  # not JSON: the reason phrase will do
        return str(e.reason)
