"""GRPO with its rollouts on a rollout server (`--rollout_mode server`, optionally `--async_generate`).

The trainer keeps its loop; only where the rollouts come from changes. `RemoteRollouts.sample` stands in for the
colocated sampler (same signature, same Rollout, the server's log-probs at temperature), and `RemotePlan` replaces
`RolloutPlan` to push weights around the generations:

    start:                 push every param (version = the state's step); the server builds the same structure
    each generation g:     push the trainable leaves if the state moved on; sample g from them
    --async_generate:      generation g+1 is requested right after g's batch is made, before g's updates, so the
                           server samples it (from the weights that made g) while the trainer steps; it is then
                           trained one update later: one step off-policy. The loss's old log-probs are the rollout's
                           own (the behaviour policy's), so the ratio exp(logp - old) corrects for it, clipped as
                           on-policy steps with num_iterations > 1 are.

Weights go out once per generation, after its updates (with num_iterations > 1, the steps in between never sample).
Every rollout says which weights version made it; an answer from another version than the one pushed (a server
restarted or shared with another trainer) stops the run. A server that stops answering stops it too, with a
BatchSourceLost the loop turns into a checkpoint of the last state.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
from typing import Any

import jax

from jaxswift.infer.rollout import RolloutSampling, rollout_from_samples
from jaxswift.infer.rollout_remote import RolloutClient, RolloutServerError, host_leaves, rollout_request
from jaxswift.optim.qgalore import float_view
from jaxswift.train.loop import BatchSourceLost


def generation_key(seed: int, generation: int):
    """The sampling key of a generation (colocated or remote, so both draw the same completions)."""
    return jax.random.fold_in(jax.random.key(seed), generation)


def tuner_description(lora_cfg) -> str:
    """What a full push tells the server about the params' structure: "full", or the LoRA config as JSON."""
    return "full" if lora_cfg is None else json.dumps(dataclasses.asdict(lora_cfg))


class RemoteRollouts:
    """The trainer's handle on a rollout server: weight pushes (versioned by the train step) and rollouts."""

    def __init__(self, args, eos_ids, pad_id: int, lora_cfg):
        self.client = RolloutClient(args.rollout_url, args.rollout_timeout)
        self.client.wait_ready()  # unreachable at start: a clear error before any work
        self.sampling = RolloutSampling(args.temperature, args.top_p, args.top_k, args.max_completion_length)
        self.G, self.eos_ids, self.pad_id = args.num_generations, list(eos_ids), pad_id
        self.tuner = tuner_description(lora_cfg)
        self.pushed: int | None = None  # the version on the server
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rollout-prefetch")
        self._prefetched: tuple[Any, concurrent.futures.Future] | None = None
        self.prefetch_hits = 0

    # --------------------------------------------------------------------------------------------- weights
    def push(self, state) -> None:
        """The state's weights to the server: every param the first time, the trainable ones after; nothing when
        the server has them already."""
        version = int(jax.device_get(state.step))
        if version == self.pushed:
            return
        full = self.pushed is None
        self.client.push(host_leaves(float_view(state.params if full else state.trainable)), version, full=full,
                         tuner=self.tuner)
        self.pushed = version

    # -------------------------------------------------------------------------------------------- rollouts
    def _request(self, ids, key) -> tuple[dict, int]:
        return rollout_request(ids, sampling=self.sampling, num_generations=self.G, eos_ids=self.eos_ids,
                               pad_id=self.pad_id, key=key), self.pushed

    def _fetch(self, request: dict, expected: int):
        arrays, version = self.client.rollout(request)
        if version != expected:
            raise RolloutServerError(f"rollout server {self.client.url} sampled with weights version {version}, "
                                     f"expected {expected}: was it restarted, or is another trainer pushing to it?")
        r = rollout_from_samples(request["prompts"], self.pad_id, self.G, arrays["completion_ids"],
                                 arrays["logprobs"], arrays["lengths"], self.eos_ids)
        return r, version

    def prefetch(self, rows, key) -> None:
        """Requests the rollouts of `rows` now (from the weights on the server now), in the background."""
        request, expected = self._request([r.ids for r in rows], key)
        self._prefetched = (request, self._pool.submit(self._fetch, request, expected))

    def sample(self, params, rows, key):
        """The colocated sampler's stand-in: (Rollout, None) from the server's weights (`params` are the
        trainer's, already pushed). A prefetched request for the same prompts and key is used if there is one."""
        request, expected = self._request([r.ids for r in rows], key)
        if self._prefetched is not None and self._prefetched[0] == request:
            future, self._prefetched = self._prefetched[1], None
            self.prefetch_hits += 1
            return future.result()[0], None
        return self._fetch(request, expected)[0], None

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclasses.dataclass
class RemotePlan:
    """RolloutPlan's batches with the rollouts on a server (see the module docstring)."""
    generator: Any  # train.grpo.Generator, sampling through `remote.sample`
    holder: Any  # .state: the latest train state
    total_steps: int
    num_iterations: int
    remote: RemoteRollouts
    async_generate: bool = False

    def batches(self, start_step: int = 0):
        try:
            yield from self._batches(start_step)
        except RolloutServerError as e:
            step = int(jax.device_get(self.holder.state.step))
            kept = (f"its state is checkpointed in the run's checkpoints folder (step {step})" if step > start_step
                    else "no step of this run had finished, so no new checkpoint")
            raise BatchSourceLost(f"{e}. Training stopped after step {step}; {kept}: restart the rollout server "
                                  "and resume with --resume_from_checkpoint latest") from None
        finally:
            self.remote.close()

    def _batches(self, start_step: int):
        gen, remote, mu = self.generator, self.remote, self.num_iterations
        first = start_step // mu
        items = enumerate(gen.stream.generations(gen.prompts_per_step, -(-self.total_steps // mu), start=first),
                          start=first)
        remote.push(self.holder.state)
        step, item = start_step, next(items, None)
        if self.async_generate and item is not None:
            remote.prefetch(item[1], generation_key(gen.args.seed, item[0]))
        while item is not None:
            generation, rows = item
            remote.push(self.holder.state)  # the last generation's updates (async: the server may be sampling)
            batch = gen(self.holder.state, generation, rows)
            item = next(items, None)
            if self.async_generate and item is not None:  # before this batch's updates: one step off-policy
                remote.prefetch(item[1], generation_key(gen.args.seed, item[0]))
            for _ in range(mu - step % mu):
                yield batch
                step += 1
