"""GKD's teachers: a model in process (`--teacher_model`), or an OpenAI-compatible server (`--teacher_url`).

The remote teacher scores a batch through `POST /v1/completions` with each row's prompt + completion token ids as
the prompt, `echo: true`, `max_tokens: 0`, `logprobs: K` and vLLM's `return_tokens_as_token_ids: true` (keys
`"token_id:123"`, so the alternatives map back to ids without decoding text): the echoed entry of the token at
sequence index s holds the teacher's K most likely tokens given the tokens before s, with their temperature-1
log-probs. Seq-KD completions come from the same endpoint with `max_tokens` > 0. vLLM and `jaxswift deploy`
answer both.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from jaxswift.errors import ConfigError, JaxswiftError

MAX_PROMPTS_PER_REQUEST = 64  # our server's bound on prompts in one /v1/completions body
TOKENIZER_PROBE = "Distillation probe: the teacher and the student must split this text the same way. 123 é 漢字"


class TeacherError(JaxswiftError):
    """The remote teacher failed or answered something unusable during training."""


def check_same_vocabulary(student, teacher, student_name: str, teacher_name: str) -> None:
    """The teacher's vocabulary must be the student's: GKD compares the two distributions token by token."""
    hint = ("GKD compares the two next-token distributions id by id, so the teacher needs the student's tokenizer "
            "(a mapping between different vocabularies is not supported)")
    sv, tv = student.config.vocab_size, teacher.config.vocab_size
    if sv != tv:
        raise ConfigError(f"--teacher_model {teacher_name} has a vocabulary of {tv} tokens, --model {student_name} "
                          f"one of {sv}; {hint}")
    if student.tokenizer is None or teacher.tokenizer is None:
        return
    s_vocab, t_vocab = student.tokenizer.get_vocab(), teacher.tokenizer.get_vocab()
    if s_vocab != t_vocab:
        differ = sorted(set(s_vocab.items()) ^ set(t_vocab.items()), key=lambda kv: kv[1])[:1]
        example = f" (e.g. {differ[0][0]!r} = id {differ[0][1]} in one only)" if differ else ""
        raise ConfigError(f"--teacher_model {teacher_name} and --model {student_name} have different tokenizers"
                          f"{example}; {hint}")


def _completion_ranges(tokens, segments, mask, prompt_length: int) -> list[tuple[list[int], int]]:
    """Per row: (the real token ids sent to the teacher: prompt without padding + completion up to its last counted
    token, the index of the first completion token in them)."""
    out = []
    for ids, seg, m in zip(tokens, segments, mask):
        prompt = ids[:prompt_length][seg[:prompt_length] > 0]
        counted = np.flatnonzero(m > 0)
        end = int(counted[-1]) + 1 if len(counted) else 0
        out.append(([int(t) for t in prompt] + [int(t) for t in ids[prompt_length:prompt_length + end]], len(prompt)))
    return out


@dataclasses.dataclass
class RemoteTeacher:
    """An OpenAI-compatible server at `url` (…/v1), scoring with its top-k prompt log-probs."""
    url: str
    top_k: int
    vocab_size: int
    timeout: float = 600.0
    model: str | None = None

    def __post_init__(self):
        self.url = self.url.rstrip("/")
        if self.model is None:
            models = self._request("GET /models").get("data") or []
            if not models:
                raise ConfigError(f"--teacher_url {self.url}: GET /models lists no model")
            self.model = models[0]["id"]

    def _request(self, what: str, body: dict | None = None, path: str | None = None) -> dict:
        method, endpoint = what.split(" ", 1)
        url = path or f"{self.url}{endpoint}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise TeacherError(f"--teacher_url {self.url}: {what} answered HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConfigError(f"--teacher_url {self.url}: cannot reach the teacher server ({reason}); start it "
                              "(e.g. `jaxswift deploy --model TEACHER`) or fix the URL") from None
        except ValueError as e:
            raise TeacherError(f"--teacher_url {self.url}: {what} did not answer JSON ({e})") from None

    def check_tokenizer(self, tokenizer) -> str:
        """Compares the server's tokenization of a probe text (vLLM's and our /tokenize) with the student's: a
        ConfigError when they differ; a note when the server has no /tokenize."""
        base = self.url.removesuffix("/v1")
        try:
            remote = self._request("POST /tokenize", {"model": self.model, "prompt": TOKENIZER_PROBE},
                                   path=f"{base}/tokenize").get("tokens")
        except TeacherError as e:
            return f"teacher tokenizer not checked ({e})"
        local = tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)
        if remote != local:
            raise ConfigError(f"--teacher_url {self.url}: the teacher tokenizes text differently from --model's "
                              f"tokenizer ({len(remote or [])} vs {len(local)} tokens for a probe text); GKD needs "
                              "the same vocabulary (a mapping between vocabularies is not supported)")
        return "teacher tokenizer: the same as the student's"

    def score(self, tokens, segments, mask, prompt_length: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [N, C, K] int32, temperature-1 log-probs [N, C, K] float32) of the teacher's top-K at each
        completion position of the [N, P + C] rows; positions past a row's last counted token hold id 0 with
        equal log-probs (masked out of the loss)."""
        N, C, K = len(tokens), mask.shape[1], self.top_k
        ids, logps = np.zeros((N, C, K), np.int32), np.zeros((N, C, K), np.float32)
        rows = _completion_ranges(tokens, segments, mask, prompt_length)
        for start in range(0, N, MAX_PROMPTS_PER_REQUEST):
            chunk = rows[start:start + MAX_PROMPTS_PER_REQUEST]
            body = {"model": self.model, "prompt": [r[0] for r in chunk], "echo": True, "max_tokens": 0,
                    "logprobs": K, "return_tokens_as_token_ids": True}
            choices = sorted(self._request("POST /completions", body).get("choices") or [], key=lambda c: c["index"])
            if len(choices) != len(chunk):
                raise TeacherError(f"--teacher_url {self.url}: {len(choices)} choices for {len(chunk)} prompts")
            for i, ((sent, first), choice) in enumerate(zip(chunk, choices)):
                top = (choice.get("logprobs") or {}).get("top_logprobs")
                if not top or len(top) < len(sent):
                    raise TeacherError(f"--teacher_url {self.url}: no prompt log-probs in the answer (the server "
                                       "must support echo with logprobs and max_tokens 0)")
                for j, entry in enumerate(top[first:len(sent)]):
                    ids[start + i, j], logps[start + i, j] = self._top_k(entry)
        return ids, logps

    def _top_k(self, entry: dict[str, float] | None) -> tuple[list[int], list[float]]:
        """The K most likely of an entry's alternatives (vLLM may add the scored token itself as a K+1-th)."""
        if not entry or len(entry) < self.top_k:
            raise TeacherError(f"--teacher_url {self.url}: a position has {len(entry or {})} top log-probs, "
                               f"--teacher_top_k is {self.top_k}")
        best = sorted(entry.items(), key=lambda kv: -kv[1])[:self.top_k]
        return [self._token_id(key) for key, _ in best], [float(v) for _, v in best]

    def _token_id(self, key: str) -> int:
        if not key.startswith("token_id:"):
            raise TeacherError(f"--teacher_url {self.url}: top log-probs keyed by text ({key!r}), not 'token_id:N': "
                               "the server ignores return_tokens_as_token_ids (vLLM and jaxswift deploy support it)")
        token = int(key.split(":", 1)[1])
        if not 0 <= token < self.vocab_size:
            raise ConfigError(f"--teacher_url {self.url}: the teacher returned token id {token}, outside the "
                              f"student's vocabulary of {self.vocab_size}; GKD needs the same tokenizer")
        return token

    def generate(self, prompts: list[list[int]], *, max_tokens: int, temperature: float, seed: int,
                 eos_ids) -> list[np.ndarray]:
        """Seq-KD: the teacher's sampled completion ids of each prompt (eos kept when it stopped there)."""
        out: list[np.ndarray] = []
        for start in range(0, len(prompts), MAX_PROMPTS_PER_REQUEST):
            chunk = prompts[start:start + MAX_PROMPTS_PER_REQUEST]
            body: dict[str, Any] = {"model": self.model, "prompt": chunk, "max_tokens": max_tokens,
                                    "temperature": temperature, "seed": seed + start, "logprobs": 0,
                                    "return_tokens_as_token_ids": True}
            choices = sorted(self._request("POST /completions", body).get("choices") or [], key=lambda c: c["index"])
            for choice in choices:
                keys = (choice.get("logprobs") or {}).get("tokens") or []
                ids = [self._token_id(k) for k in keys]
                if choice.get("finish_reason") == "stop" and (not ids or ids[-1] not in set(eos_ids)):
                    ids.append(int(eos_ids[0]))  # a server that hides the eos it stopped on
                out.append(np.asarray(ids[:max_tokens], np.int32))
        return out
