"""The rollout server: GRPO's generation in its own process, on its own devices, with weights pushed by the
trainer (protocol: infer/rollout_remote.py).

    service = RolloutService(jaxswift.load_model("smollm2-135m-instruct"))
    serve_rollouts(service, host="127.0.0.1", port=8000)

Rollouts run `infer.rollout.rollout` (the colocated generate backend: one jitted batch, each prompt prefilled once
for its G rows) on the latest complete push, one request at a time; a push arriving meanwhile is staged and
swapped in whole, so the rollout in flight finishes on the weights it started with and reports their version.
A partial push (adapters only) before any full push is refused: a server restarted mid-run must be synced again,
not left sampling its as-loaded base under the trainer's version number.
"""

from __future__ import annotations

import dataclasses
import json
import threading

import jax
import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jaxswift.errors import JaxswiftError
from jaxswift.infer.rollout import RolloutSampling, rollout
from jaxswift.infer.rollout_remote import AS_LOADED, WeightsError, encode_samples, replace_leaves
from jaxswift.checkpoints.safetensors_io import tensors_from_bytes


class RolloutBody(BaseModel):
    """POST /rollout (strict: unknown fields and wrong types are 422s naming the field)."""
    model_config = ConfigDict(extra="forbid", strict=True)
    prompts: list[list[int]] = Field(min_length=1)
    num_generations: int = Field(ge=1)
    temperature: float = Field(gt=0)
    top_p: float = 1.0
    top_k: int = 0
    max_completion_length: int = Field(ge=1)
    eos_ids: list[int] = Field(min_length=1)
    pad_id: int
    key: list[int] = Field(min_length=2, max_length=2)


class Conflict(JaxswiftError):
    """A push that does not follow the ones before it (an HTTP 409)."""


@dataclasses.dataclass
class _Staged:
    chunks: int
    full: bool
    tuner: str | None = None
    received: dict = dataclasses.field(default_factory=dict)  # chunk index -> {path: array}


class RolloutService:
    """The policy's params (with their version) and the rollouts sampled from them."""

    def __init__(self, model, name: str = ""):
        self.name = name or getattr(model.config, "name", "") or "model"
        self.cfg = model.config.replace(remat="none")
        self.shapes = jax.eval_shape(lambda p: p, model.params)  # what a full push is checked against
        self.params, self.version = model.params, AS_LOADED
        self._staged: dict[int, _Staged] = {}
        self._lock = threading.Lock()  # params, version and staging
        self._busy = threading.Lock()  # one rollout at a time on the devices

    def health(self) -> dict:
        return {"status": "ok", "model": self.name, "weights_version": self.version}

    def receive(self, body: bytes, *, version: int, chunk: int, chunks: int, full: bool) -> dict:
        """Stages one chunk of weights `version`; the last one applies them all at once."""
        if not 0 <= chunk < chunks:
            raise ValueError(f"chunk {chunk} of {chunks}: expected 0 <= chunk < chunks")
        tensors, meta = tensors_from_bytes(body, f"weights version {version}, chunk {chunk}")
        with self._lock:
            staged = self._staged.setdefault(version, _Staged(chunks, full))
            if (staged.chunks, staged.full) != (chunks, full):
                raise Conflict(f"weights version {version}: chunk {chunk} says {chunks} chunks (full={full}), "
                               f"earlier ones said {staged.chunks} (full={staged.full})")
            staged.received[chunk] = tensors
            staged.tuner = meta.get("tuner", staged.tuner)
            if len(staged.received) < chunks:
                return {"weights_version": self.version, "staged": version}
            del self._staged[version]
            leaves = {k: v for part in staged.received.values() for k, v in part.items()}
            if staged.full:
                self.params = replace_leaves(self._structure(staged.tuner), leaves, complete=True)
            elif self.version == AS_LOADED:
                raise Conflict(f"weights version {version} updates some params, but this server has had no full "
                               "push yet (restarted?): the trainer must push every param first")
            else:
                self.params = replace_leaves(self.params, leaves, complete=False)
            self.version = version
            self._staged = {v: s for v, s in self._staged.items() if v > version}  # older half-pushes are moot
            return {"weights_version": self.version}

    def _structure(self, tuner: str | None):
        """The trainer's params structure (shapes only): the loaded model's, with LoRA adapters when the tuner
        is a LoRA config."""
        if tuner in (None, "full"):
            return self.shapes
        from jaxswift.tuners.lora import LoraConfig, add_lora

        try:
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(tuner).items()}
            lora_cfg = LoraConfig(**fields)
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"weights metadata 'tuner': expected \"full\" or a LoRA config as JSON ({e})") from None
        return jax.eval_shape(lambda p: add_lora(p, self.cfg, lora_cfg, jax.random.key(0)), self.shapes)

    def sample(self, body: RolloutBody) -> bytes:
        """Completions, their log-probs at temperature and lengths, from the latest complete push."""
        sampling = RolloutSampling(body.temperature, body.top_p, body.top_k, body.max_completion_length)
        vocab = self.cfg.vocab_size
        for name, ids in (("prompts", [t for p in body.prompts for t in p]), ("eos_ids", body.eos_ids),
                          ("pad_id", [body.pad_id])):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{name}: token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
        if any(not p for p in body.prompts):
            raise ValueError("prompts: every prompt needs at least one token")
        key = jax.random.wrap_key_data(np.asarray(body.key, np.uint32))
        with self._busy:
            with self._lock:
                params, version = self.params, self.version
            r = rollout(params, body.prompts, self.cfg, sampling=sampling, num_generations=body.num_generations,
                        eos_ids=body.eos_ids, pad_id=body.pad_id, key=key)
        return encode_samples(r.completion_ids, r.logprobs, r.lengths, version)


def build_rollout_app(service: RolloutService) -> FastAPI:
    app = FastAPI(title="jaxswift rollout server")

    @app.get("/health")
    def health():
        return service.health()

    @app.post("/weights")
    async def weights(request: Request, version: int, chunk: int = 0, chunks: int = 1, full: int = 0):
        body = await request.body()
        try:
            return await run_in_threadpool(service.receive, body, version=version, chunk=chunk, chunks=chunks,
                                           full=bool(full))
        except Conflict as e:
            raise HTTPException(409, str(e)) from None
        except (WeightsError, ValueError, JaxswiftError) as e:
            raise HTTPException(400, str(e)) from None

    @app.post("/rollout")
    async def sample(request: Request):
        try:
            body = RolloutBody.model_validate_json(await request.body())
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "body"
            raise HTTPException(422, f"{where}: {first['msg']}") from None
        try:
            data = await run_in_threadpool(service.sample, body)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        return Response(data, media_type="application/octet-stream")

    return app


def serve_rollouts(service: RolloutService, *, host: str, port: int, log_level: str = "warning") -> None:
    """Serves `service` with uvicorn until stopped."""
    import uvicorn

    uvicorn.run(build_rollout_app(service), host=host, port=port, log_level=log_level)
