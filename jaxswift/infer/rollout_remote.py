"""A rollout server's wire protocol and the trainer's client (GRPO `--rollout_mode server`).

The server (`jaxswift rollout`, serve/rollout_server.py) holds its own copy of the policy on its own devices and
answers three requests:

    GET  /health   -> {"status": "ok", "model": ..., "weights_version": v}   (-1: the weights as loaded)
    POST /weights?version=v&chunk=i&chunks=n&full=0|1   body: safetensors bytes of some of the params' leaves,
         named by their pytree paths (`['layers']['wq'].a`); the n chunks of version v are applied together, with
         the last one, so a rollout never sees half a push. full=1 (the first push of a run) carries every leaf and
         the tuner's description (metadata "tuner": "full" or the LoRA config as JSON), from which the server
         builds the trainer's params structure (adapters beside the base); later pushes carry the trainable
         leaves only (the adapters with LoRA).
    POST /rollout  JSON {"prompts": [[ids]], "num_generations", "temperature", "top_p", "top_k",
         "max_completion_length", "eos_ids", "pad_id", "key": [2 x uint32]}
         -> safetensors bytes: completion_ids [N, C] int32, logprobs [N, C] float32 (at temperature, as the
            trainer scores them), lengths [N] int32; metadata "weights_version": the version that sampled them.

Why safetensors bytes over plain HTTP: every leaf travels as its raw buffer (bfloat16 included, no text encoding,
no pickle), the header names, shapes and types it so the receiver checks each one against its own params, the
format is the one the project already reads and writes, and HTTP needs nothing beyond the standard library on
the trainer's side and the serving stack on the server's. Pushes are cut into chunks of whole tensors (64 MiB by
default) so neither side holds a whole full-model body twice; nothing touches disk. The key is sent as raw key
data, so a server on the same kind of device samples exactly what the colocated path would.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.checkpoints.safetensors_io import safetensors_bytes, tensors_from_bytes
from jaxswift.errors import ConfigError, JaxswiftError

CHUNK_BYTES = 64 << 20
AS_LOADED = -1  # the version of the weights a server loaded itself, before any push


class RolloutServerError(JaxswiftError):
    """The rollout server cannot be reached, stopped answering, or refused a request."""


class WeightsError(ValueError):
    """Pushed weights do not fit the params they should replace (names, shapes or dtypes)."""


# ------------------------------------------------------------------------------------------------- the weights


def leaves_by_path(tree) -> dict[str, Any]:
    """{pytree path: leaf}: the names a push gives its tensors (None holes, as in a train state's trainable
    half, have no leaves)."""
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def host_leaves(tree) -> dict[str, np.ndarray]:
    """The tree's leaves by path, fetched to host memory (numpy) for a push."""
    named = leaves_by_path(tree)
    return dict(zip(named, jax.device_get(list(named.values()))))


def replace_leaves(tree, new: dict[str, np.ndarray], *, complete: bool):
    """`tree` with the leaves named in `new` replaced (put on the default device). Every name must be one of the
    tree's paths, with its shape and dtype; complete: every leaf must be given (a full push)."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [jax.tree_util.keystr(p) for p, _ in paths]
    unknown = sorted(set(new) - set(names))
    if unknown:
        raise WeightsError(f"{len(unknown)} pushed tensor(s) are not params of this model, e.g. {unknown[:3]} "
                           f"(its params: {names[:3]} ...)")
    if complete and len(new) != len(names):
        missing = [n for n in names if n not in new]
        raise WeightsError(f"a full push must carry every param; missing {len(missing)}, e.g. {missing[:3]}")
    leaves = []
    for name, (_, leaf) in zip(names, paths):
        if name not in new:
            leaves.append(leaf)
            continue
        value = new[name]
        if tuple(value.shape) != tuple(leaf.shape) or np.dtype(value.dtype) != np.dtype(leaf.dtype):
            raise WeightsError(f"pushed {name}: {value.dtype}{list(value.shape)}, the model's is "
                               f"{np.dtype(leaf.dtype)}{list(leaf.shape)} (same --model and --dtype on both sides?)")
        leaves.append(jnp.asarray(value))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def weight_chunks(leaves: dict[str, np.ndarray], chunk_bytes: int = CHUNK_BYTES) -> list[dict[str, np.ndarray]]:
    """Whole tensors grouped into chunks of at most chunk_bytes (a larger tensor travels alone)."""
    chunks: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in leaves.items():
        if chunks[-1] and size + value.nbytes > chunk_bytes:
            chunks.append({})
            size = 0
        chunks[-1][name] = value
        size += value.nbytes
    return chunks


def encode_samples(completion_ids, logprobs, lengths, version: int) -> bytes:
    return safetensors_bytes({"completion_ids": np.asarray(completion_ids, np.int32),
                              "logprobs": np.asarray(logprobs, np.float32),
                              "lengths": np.asarray(lengths, np.int32)}, {"weights_version": str(version)})


# -------------------------------------------------------------------------------------------------- the client


def check_url(url: str, flag: str = "--rollout_url") -> str:
    """`http://host:port` (a trailing slash dropped); anything else is a ConfigError naming the flag."""
    parts = urllib.parse.urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(f"{flag} {url!r}: expected http://HOST:PORT of a `jaxswift rollout` server")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"{flag} {url!r}: the port is not a number") from None
    return url.rstrip("/")


class RolloutClient:
    """The trainer's side of the protocol above. Every failure is a RolloutServerError naming the URL and what
    was being asked; `timeout` bounds each answer (and the wait for the server at start)."""

    def __init__(self, url: str, timeout: float):
        self.url, self.timeout = check_url(url), timeout
        # a rollout server sits on the cluster's own network: no HTTP proxy from the environment
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _call(self, what: str, path: str, body: bytes | None = None, content_type: str = "application/json",
              timeout: float | None = None) -> tuple[bytes, dict]:
        request = urllib.request.Request(self.url + path, data=body, method="GET" if body is None else "POST",
                                         headers={"Content-Type": content_type})
        try:
            with self._opener.open(request, timeout=timeout or self.timeout) as response:
                return response.read(), dict(response.headers)
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("detail", detail)
            except (json.JSONDecodeError, AttributeError):
                pass
            raise RolloutServerError(f"rollout server {self.url} refused {what} (HTTP {e.code}): {detail}") from None
        except (OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            raise RolloutServerError(f"rollout server {self.url} did not answer {what} "
                                     f"({type(reason).__name__}: {reason})") from None

    def wait_ready(self) -> dict:
        """The server's /health once it answers; a RolloutServerError after `timeout` seconds of silence."""
        deadline, last = time.monotonic() + self.timeout, None
        while True:
            try:
                return json.loads(self._call("a health check", "/health", timeout=min(self.timeout, 10.0))[0])
            except RolloutServerError as e:
                last = e
            if time.monotonic() >= deadline:
                raise RolloutServerError(f"no rollout server answers at {self.url} (waited {self.timeout:g} s; "
                                         f"last: {last}). Start one with `jaxswift rollout --model ... --port ...` "
                                         f"or fix --rollout_url") from None
            time.sleep(0.5)

    def push(self, leaves: dict[str, np.ndarray], version: int, *, full: bool, tuner: str | None = None,
             chunk_bytes: int = CHUNK_BYTES) -> None:
        """Sends the leaves as weights `version` (applied by the server with the last chunk)."""
        chunks = weight_chunks(leaves, chunk_bytes)
        for i, chunk in enumerate(chunks):
            meta = {"tuner": tuner} if (full and tuner is not None and i == 0) else None
            query = urllib.parse.urlencode({"version": version, "chunk": i, "chunks": len(chunks),
                                            "full": int(full)})
            self._call(f"weights version {version} (chunk {i + 1} of {len(chunks)})", f"/weights?{query}",
                       safetensors_bytes(chunk, meta), "application/octet-stream")

    def rollout(self, request: dict) -> tuple[dict[str, np.ndarray], int]:
        """({completion_ids, logprobs, lengths}, the weights version that sampled them) for a /rollout body."""
        body, _ = self._call("a rollout request", "/rollout", json.dumps(request).encode())
        try:
            arrays, meta = tensors_from_bytes(body, f"rollout server {self.url}: /rollout answer")
            return arrays, int(meta["weights_version"])
        except (JaxswiftError, KeyError, ValueError) as e:
            raise RolloutServerError(f"rollout server {self.url} sent a malformed rollout answer ({e})") from None


def rollout_request(prompts_ids: list[list[int]], *, sampling, num_generations: int, eos_ids, pad_id: int,
                    key) -> dict:
    """The /rollout body: the prompts' token ids, the sampling settings and the raw data of a typed JAX key."""
    return {"prompts": [list(map(int, p)) for p in prompts_ids], "num_generations": num_generations,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
            "max_completion_length": sampling.max_completion_length, "eos_ids": [int(e) for e in eos_ids],
            "pad_id": int(pad_id), "key": np.asarray(jax.random.key_data(key)).astype(np.uint32).tolist()}
