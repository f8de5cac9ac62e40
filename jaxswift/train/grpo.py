"""The GRPO-family trainer: prompts -> rollouts from the current weights -> rewards -> advantages -> jitted,
donated policy-gradient steps, on SFT's machinery (mesh, LoRA/full, optimizer, checkpoints + resume, logs, plot).

Each generation (`prompts_per_step` prompts x G completions) feeds `--num_iterations` optimizer steps. Old
log-probs (needed when num_iterations > 1 or for kl_in_reward) and reference log-probs (beta > 0) are computed in
jitted batches when the generation is made: with LoRA the reference is the same base with adapters off (no copy);
full tuning loads `--model` again, frozen. With num_iterations = 1 the old policy is the current one (ratio 1, as
TRL). Rollouts run on the train state's params, so they always sample the latest weights.

Several processes (`jaxswift grpo --num_processes N`): generation is one program over the global mesh, every process
running the same jitted loop on the same prompts with the same key; a generation's rows are split over the mesh's
batch axes while they decode (`Generator.rows_sharding`), so each process's devices decode their block of rows, and
the sampled tokens equal one process's. The completions are gathered to every host; each process scores the rewards
of the rows it decoded (`Generator.owned`), and the rewards are shared (`parallel.distributed.share_rows`), so group
advantages, dynamic sampling and the logged reward metrics are those of the whole batch, as in one process. Each
process feeds the step only its rows of each micro batch (`Generator.rows`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxswift.infer.generate import stop_token_ids
from jaxswift.data.prompts import PromptRow, PromptStream, load_prompts
from jaxswift.errors import ConfigError
from jaxswift.infer.rollout import (Rollout, completion_logps, grouped_completion_logps, sequences,
                                    shared_prompt_completion_logps, shares_prompts)
from jaxswift.infer.rollout_vlm import grouped_vlm_completion_logps, rollout_vision_batch, vlm_completion_logps
from jaxswift.losses import policy as pl
from jaxswift.models.config import ModelConfig
from jaxswift.models.transformer import attention_impl
from jaxswift.models.vision import VLMConfig
from jaxswift.optim.qgalore import float_view
from jaxswift.parallel.distributed import gather_to_host, held_rows, is_primary, share_rows
from jaxswift.train.grpo_args import GrpoArguments
from jaxswift.train.grpo_remote import RemotePlan, RemoteRollouts, generation_key
from jaxswift.train.logging import append_record
from jaxswift.train.loop import (Feed, LatestState, compile_step, demo_answer, export_model, host_params, init_state,
                                 plot_run, start_run, total_steps_of, train_loop, TaskScorer, with_task_scores)
from jaxswift.parallel.params import shard_params
from jaxswift.train.sft import MROPE_VLM_FAMILIES, check_vlm_run
from jaxswift.train.state import TrainState, combine
from jaxswift.train.step import guarded_update
from jaxswift.train.tuning import build_optimizer, prepare_tuner


@dataclasses.dataclass
class GrpoParts:
    """What GRPO takes from rl/ (built there from the arguments, see `rl.samplers`): the reward functions and
    their weights, the scorer that runs them, and the rollout backend."""
    reward_funcs: dict  # name -> fn(prompts, completions, **columns) -> rewards
    reward_weights: np.ndarray
    score: Callable  # (funcs, prompts, completions, columns) -> [N, R] rewards
    make_sampler: Callable  # (model, cfg, eos_ids, pad_id, longest prompt, rows_sharding) -> sample(params, rows,
    #                         key); rows_sharding splits the decoding rows over the mesh


# ------------------------------------------------------------------------------------------------------- the step


def make_grpo_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, loss_cfg: pl.PolicyLossConfig, *,
                   reward_names: tuple[str, ...], temperature: float, has_old: bool,
                   prepare_params: Callable | None = None, num_generations: int = 1,
                   share_prompts: bool = False) -> Callable:
    """(state, batch) -> (state, metrics). batch: [A, b, ...] tokens/positions/segment_ids [P + C],
    completion_mask [C], advantages [1], rewards [R], and old_logps / ref_logps [C] when used; a vision-language
    model's rows add their prompt's images and M-RoPE positions (infer/rollout_vlm.py): with micro-batches of
    whole groups (b a multiple of num_generations, rows in a rollout's order) its tower runs once per group.
    share_prompts (a text model): each whole group's prompt runs once in the forward and backward
    (`shared_prompt_completion_logps`); the batches must share prompts within groups, as rollouts do."""
    prepare = prepare_params or (lambda params, rng: params)

    def micro_loss(trainable, frozen, micro, key, num_sequences, num_tokens):
        params = prepare(combine(trainable, frozen), key)
        C = micro["completion_mask"].shape[-1]
        groups_of = num_generations if micro["tokens"].shape[0] % num_generations == 0 else 1
        logps, entropy = rollout_logps(params, micro, cfg, prompt_length=micro["tokens"].shape[-1] - C,
                                       temperature=temperature, with_entropy=True, groups_of=groups_of,
                                       share_prompts=share_prompts)
        old = micro["old_logps"] if has_old else jax.lax.stop_gradient(logps)
        ref = micro["ref_logps"] if loss_cfg.beta != 0.0 else None
        mask = micro["completion_mask"]
        loss, sums = pl.policy_loss(logps, old, ref, micro["advantages"][:, 0], mask, loss_cfg,
                                    num_sequences=num_sequences, num_tokens=num_tokens)
        return loss, {**sums, "entropy": jnp.sum(entropy * mask)}

    def step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        A, b = batch["tokens"].shape[:2]
        num_tokens = jnp.sum(batch["completion_mask"])

        def accumulate(carry, xs):
            micro, key = xs
            (loss, sums), grads = jax.value_and_grad(micro_loss, has_aux=True)(  # at Q-GaLore's float view
                float_view(state.trainable), state.frozen, micro, key, A * b, num_tokens)
            return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], grads)), sums

        init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, float_view(state.trainable)))
        (loss, grads), per_micro = jax.lax.scan(accumulate, init, (batch, jax.random.split(rng, A)))
        new_state, grad_norm, finite = guarded_update(state, grads, loss, optimizer,
                                                      jax.random.fold_in(rng, 1 << 30))  # Q-GaLore's rounding
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": jnp.sum(batch["segment_ids"] > 0),
                   "finite": finite, "bad_streak": new_state.bad_streak, "skipped_steps": new_state.skipped_steps,
                   **_step_metrics(jax.tree.map(jnp.sum, per_micro), batch, num_tokens, reward_names)}
        return new_state, metrics

    return step


def rollout_logps(params, batch: dict, cfg, *, prompt_length: int, temperature: float, with_entropy: bool = False,
                  groups_of: int = 1, share_prompts: bool = False):
    """Completion log-probs of rollout rows (with the image features in place for a vision-language model; its
    tower once per run of `groups_of` rows sharing a prompt; a text model's prompt once per such run when
    share_prompts)."""
    if isinstance(cfg, VLMConfig):
        return vlm_completion_logps(params, batch, cfg, prompt_length=prompt_length, temperature=temperature,
                                    with_entropy=with_entropy, num_generations=groups_of)
    if share_prompts and groups_of > 1:
        return shared_prompt_completion_logps(params, batch["tokens"], batch["positions"], batch["segment_ids"],
                                              cfg, prompt_length=prompt_length, temperature=temperature,
                                              num_generations=groups_of, with_entropy=with_entropy)
    return completion_logps(params, batch["tokens"], batch["positions"], batch["segment_ids"], cfg,
                            prompt_length=prompt_length, temperature=temperature, with_entropy=with_entropy)


def _step_metrics(sums: dict, batch: dict, num_tokens, reward_names) -> dict:
    """TRL's GRPO metrics: token means of KL / entropy / clip flags, reward mean and std (total and per function),
    completion length."""
    out = {"entropy": sums["entropy"] / jnp.maximum(num_tokens, 1.0)}
    if "kl" in sums:
        out["kl"] = sums["kl"] / jnp.maximum(num_tokens, 1.0)
    count = jnp.maximum(sums["clip_ratio/count"], 1.0)
    out.update({k: v / count for k, v in sums.items() if k.startswith("clip_ratio/") and k != "clip_ratio/count"})
    per_func = batch["rewards"].reshape(-1, len(reward_names))
    total = batch["total_reward"].reshape(-1)
    out["reward"], out["reward_std"] = jnp.mean(total), pl.sample_std(total)
    for k, name in enumerate(reward_names):
        out[f"rewards/{name}/mean"] = jnp.mean(per_func[:, k])
        out[f"rewards/{name}/std"] = pl.sample_std(per_func[:, k])
    lengths = batch["completion_length"].reshape(-1)
    out["completion_length"] = jnp.mean(lengths)
    out["clipped_completions"] = jnp.mean(batch["truncated"].reshape(-1))
    return out


# ----------------------------------------------------------------------------------------------------- generations


@dataclasses.dataclass
class Generator:
    """Makes one generation (the batch of `num_iterations` steps) from the train state's current params."""
    args: GrpoArguments
    cfg: ModelConfig
    tokenizer: Any
    stream: PromptStream
    parts: GrpoParts
    prompts_per_step: int
    micro_batches: int
    logps_fn: Callable  # (params, rollout rows {tokens, positions, segment_ids, ...}) -> [N, C]
    reference: Callable  # state -> reference params (adapters off / a frozen copy); None when beta = 0
    sample: Callable  # (params, prompt rows, key) -> (Rollout, env rewards or None)
    completions_log: Path | None = None
    rows: tuple[int, int] | None = None  # this process's block [first, last) of each micro batch's rows (None: all)
    rows_sharding: Any = None  # how a generation's rows are split over the mesh while they decode (None: whole)
    share_prompts: bool = False  # the step runs each group's prompt once: every batch must share them

    def owned(self, n: int) -> np.ndarray:
        """[n] bool: the rows of a generation (prompt-major) this process decoded, and scores."""
        return np.ones(n, bool) if self.rows_sharding is None else held_rows(self.rows_sharding, n)

    def rewards_of(self, rows: list[PromptRow], r: Rollout, env_rewards) -> np.ndarray:
        """[N, R] rewards of every row: each process scores its own rows, then all share them."""
        G = self.args.num_generations
        expanded = [row for row in rows for _ in range(G)]
        mine = np.flatnonzero(self.owned(len(expanded)))
        completions = [self.tokenizer.decode(r.completion_ids[i][r.completion_mask[i] > 0], skip_special_tokens=True)
                       for i in mine]
        columns: dict[str, list] = {}
        for key in {k for row in rows for k in row.columns}:
            columns[key] = [expanded[i].columns.get(key) for i in mine]
        columns["completion_ids"] = [r.completion_ids[i][r.completion_mask[i] > 0].tolist() for i in mine]
        columns["completion_lengths"] = r.lengths[mine].tolist()
        if env_rewards is not None:
            columns["env_reward"] = [env_rewards[i] for i in mine]
        own = self.parts.score(self.parts.reward_funcs, [expanded[i].prompt for i in mine], completions, columns)
        scores = np.zeros((len(expanded), own.shape[1]), own.dtype)
        scores[mine] = own
        scores = share_rows(scores, self.owned(len(expanded)))
        self._log_completions(expanded, r, scores)
        return scores

    def _log_completions(self, rows: list[PromptRow], r: Rollout, scores: np.ndarray):
        """The first group of every rollout, with its rewards, to output_dir/completions.jsonl (TRL's
        log_completions); written by the primary process."""
        if self.completions_log is None or not is_primary():
            return
        with open(self.completions_log, "a") as f:
            for i in range(self.args.num_generations):
                text = self.tokenizer.decode(r.completion_ids[i][r.completion_mask[i] > 0], skip_special_tokens=True)
                f.write(json.dumps({"prompt": rows[i].prompt, "completion": text,
                                    **{n: float(v) for n, v in zip(self.parts.reward_funcs, scores[i])}}) + "\n")

    def sample_groups(self, state, generation: int, rows: list[PromptRow]):
        """(prompt rows, rollout, rewards [N, R]); with dynamic sampling, groups whose rewards are all equal are
        replaced by fresh prompts (up to max_resample_times rounds), then refilled from the dropped ones."""
        params, k, weights = float_view(state.params), self.prompts_per_step, self.parts.reward_weights
        key = generation_key(self.args.seed, generation)
        r, env = self.sample(params, rows, key)
        scores = self.rewards_of(rows, r, env)
        if not self.args.dynamic_sample:
            return rows, r, scores
        kept, dropped = _split_groups(rows, r, scores, weights, self.args.num_generations)
        for attempt in range(self.args.max_resample_times):
            if len(kept) >= k:
                break
            more = self.stream.at(10_000_019 * (attempt + 1) + generation * k, k)  # a stream apart from training
            r2, env2 = self.sample(params, more, jax.random.fold_in(key, attempt + 1))
            kept2, dropped2 = _split_groups(more, r2, self.rewards_of(more, r2, env2), weights,
                                            self.args.num_generations)
            kept, dropped = kept + kept2, dropped + dropped2
        return _join_groups((kept + dropped)[:k])

    def __call__(self, state, generation: int, rows: list[PromptRow]) -> dict[str, np.ndarray]:
        rows, r, scores = self.sample_groups(state, generation, rows)
        args, G = self.args, self.args.num_generations
        seqs = sequences(r)
        if self.share_prompts and not shares_prompts(seqs["tokens"], seqs["positions"], seqs["segment_ids"],
                                                     r.prompt_ids.shape[1], G):
            raise RuntimeError("a generation's rows do not come in groups that share their prompt, which the "
                               "train step was built to run once per group: a bug in the rollout layout")
        if isinstance(self.cfg, VLMConfig):  # each row's prompt images and M-RoPE positions
            seqs.update(rollout_vision_batch([_image_prompt(row, self.cfg) for row in rows], seqs,
                                             r.prompt_ids.shape[1], G, self.cfg))
        total = scores @ self.parts.reward_weights
        batch = {**seqs, "completion_mask": r.completion_mask.copy()}
        params = float_view(state.params)  # Q-GaLore's 8-bit weights as floats (identity otherwise)
        if args.async_generate:  # sampled one update ago: the behaviour policy's own log-probs correct for it
            batch["old_logps"] = r.logprobs.copy()
        elif args.num_iterations > 1 or args.kl_in_reward:
            batch["old_logps"] = self._logps(params, seqs)
        if args.beta != 0.0:
            batch["ref_logps"] = self._logps(self.reference(state), seqs)
        if args.kl_in_reward:
            total = np.asarray(pl.kl_penalized_rewards(total, batch["old_logps"], batch["ref_logps"],
                                                       r.completion_mask, args.beta), np.float64)
        batch["advantages"] = np.asarray(pl.group_advantages(total, G, args.advantage_estimator,
                                                             args.scale_rewards), np.float32)[:, None]
        if args.overlong_filter:
            batch["completion_mask"] = batch["completion_mask"] * ~r.truncated[:, None]
        batch.update(rewards=scores.astype(np.float32), total_reward=total.astype(np.float32)[:, None],
                     completion_length=r.lengths.astype(np.float32)[:, None],
                     truncated=r.truncated.astype(np.float32)[:, None])
        if not args.beta:
            batch.pop("ref_logps", None)
        A = self.micro_batches
        first, last = self.rows or (0, len(total) // A)
        return {k: v.reshape(A, v.shape[0] // A, *v.shape[1:])[:, first:last] for k, v in batch.items()}

    def _logps(self, params, seqs: dict) -> np.ndarray:
        rows = len(seqs["tokens"]) // self.micro_batches
        out = [np.asarray(gather_to_host(self.logps_fn(params, {k: v[i:i + rows] for k, v in seqs.items()})))
               for i in range(0, len(seqs["tokens"]), rows)]
        return np.concatenate(out, 0)


def _image_prompt(row: PromptRow, cfg: VLMConfig):
    """The row's MultimodalPrompt; a text-only prompt of a vision-language model: its ids, 1-D rope, no image."""
    if row.images is not None:
        return row.images
    from jaxswift.data.multimodal import MultimodalPrompt

    n = len(row.ids)
    return MultimodalPrompt(list(row.ids), [], [], np.broadcast_to(np.arange(n), (3, n)), 0)


def _split_groups(rows, r: Rollout, scores, weights, G):
    """([(row, rollout slice, scores)] of groups with differing rewards, [...] of groups with equal ones)."""
    total = scores @ weights
    kept, dropped = [], []
    for i, row in enumerate(rows):
        s = slice(i * G, (i + 1) * G)
        group = (row, _slice_rollout(r, s), scores[s])
        (kept if np.ptp(total[s]) > 0 else dropped).append(group)
    return kept, dropped


def _slice_rollout(r: Rollout, s) -> Rollout:
    return Rollout(*(getattr(r, f.name)[s] for f in dataclasses.fields(Rollout)))


def _join_groups(groups):
    rows = [g[0] for g in groups]
    width = max(g[1].prompt_ids.shape[1] for g in groups)

    def pad_left(x, value=0):
        return np.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=value)

    parts = []
    for _, r, _ in groups:
        pad_id = int(r.prompt_ids[0, 0]) if r.prompt_segments[0, 0] == 0 else 0
        parts.append(Rollout(pad_left(r.prompt_ids, pad_id), pad_left(r.prompt_positions),
                             pad_left(r.prompt_segments), r.completion_ids, r.completion_mask, r.logprobs,
                             r.truncated))
    joined = Rollout(*(np.concatenate([getattr(p, f.name) for p in parts], 0) for f in dataclasses.fields(Rollout)))
    return rows, joined, np.concatenate([g[2] for g in groups], 0)


@dataclasses.dataclass
class RolloutPlan:
    """The loop's batches: a generation is remade every num_iterations steps from the state the last step returned
    (the holder), so rollouts always use the latest weights; grain feeds each generation's prompts."""
    generator: Generator
    holder: Any  # .state: the latest train state
    total_steps: int
    num_iterations: int

    def batches(self, start_step: int = 0):
        k, mu = self.generator.prompts_per_step, self.num_iterations
        first = start_step // mu
        prompts = self.generator.stream.generations(k, -(-self.total_steps // mu), start=first)
        step = start_step
        for generation, rows in enumerate(prompts, start=first):
            batch = self.generator(self.holder.state, generation, rows)
            for _ in range(mu - step % mu):
                yield batch
                step += 1


# ------------------------------------------------------------------------------------------------------------ run


@dataclasses.dataclass
class GrpoResult:
    history: dict[int, dict[str, float]]
    output_dir: Path
    export_dir: Path | None
    reward_first: float  # mean reward of the first logged quarter of steps
    reward_last: float  # ... and of the last quarter
    demo_before: str | None
    demo_after: str | None
    first_step_seconds: float


def _reference(args: GrpoArguments, ctx, lora_cfg):
    if args.beta == 0.0:
        return None
    if lora_cfg is not None:
        from jaxswift.tuners.lora import lora_disabled
        return lambda state: lora_disabled(state.params)
    from jaxswift.api import load_model

    ref = load_model(args.model, dtype=args.dtype, load_tokenizer=False)
    ref_params = shard_params(ref.params, ref.config, ctx.rules, ctx.mesh)
    return lambda state: ref_params


def _rows_per_step(args: GrpoArguments, dp: int) -> tuple[int, int]:
    rows = args.per_device_train_batch_size * dp * args.gradient_accumulation_steps
    if rows % args.num_generations:
        raise ConfigError(f"completions per step ({args.per_device_train_batch_size} x {dp} data-parallel x "
                          f"{args.gradient_accumulation_steps} accumulation = {rows}) must be a multiple of "
                          f"--num_generations {args.num_generations}")
    return rows, rows // args.num_generations


def _shares_prompts_in_the_step(args: GrpoArguments, ctx) -> bool:
    """Whether the policy's forward and backward run each group's prompt once: a text model, groups of several
    rows, and attention that takes parent segments (not splash, not a sequence mesh axis's ring attention)."""
    return (not ctx.model.is_vlm and args.num_generations > 1 and attention_impl(ctx.cfg) != "splash"
            and ctx.mesh.shape.get("sequence", 1) == 1)


def _logps_fn(args: GrpoArguments, cfg):
    """Reference / old log-probs: each group's prompt (and a VLM's tower) runs once when its G rows share it (a
    rollout's rows always do; the check keeps any other layout on the plain path)."""
    C, G, temperature = args.max_completion_length, args.num_generations, args.temperature
    plain = jax.jit(lambda p, b: rollout_logps(p, b, cfg, prompt_length=b["tokens"].shape[1] - C,
                                               temperature=temperature))
    vlm = isinstance(cfg, VLMConfig)

    def logps(p, batch):
        t, pos, seg = batch["tokens"], batch["positions"], batch["segment_ids"]
        P = t.shape[1] - C
        if not shares_prompts(t, pos, seg, P, G):
            return plain(p, batch)
        if vlm:
            no_remat = dataclasses.replace(cfg, text=cfg.text.replace(remat="none"))
            return grouped_vlm_completion_logps(p, batch, cfg=no_remat, prompt_length=P, temperature=temperature,
                                                num_generations=G)
        return grouped_completion_logps(p, t, pos, seg, cfg=cfg.replace(remat="none"), prompt_length=P,
                                        temperature=temperature, num_generations=G)
    return logps


def _summary(args: GrpoArguments, prompts_per_step: int, lora: bool) -> str:
    return (f"{prompts_per_step} prompts x {args.num_generations} completions per generation, "
            f"{args.num_iterations} step(s) each; loss {args.loss_type} ({args.importance_sampling_level} level), "
            f"advantages {args.advantage_estimator} / scale {args.scale_rewards}, beta {args.beta}"
            + ("; reference: the base with adapters off" if lora and args.beta else ""))


def run_grpo(args: GrpoArguments, parts: GrpoParts, *, progress: bool = True,
             task_scorer: TaskScorer | None = None) -> GrpoResult:
    check_multi_process(args)
    ctx = start_run(args)
    if ctx.model.is_vlm:
        check_vlm_run(ctx, MROPE_VLM_FAMILIES, "GRPO")
    model, cfg = ctx.model, ctx.cfg
    if model.tokenizer is None:
        raise ConfigError(f"{args.model}: the model has no tokenizer, which GRPO needs for prompts and rewards")
    messages: list[str] = []
    prompts = load_prompts(args.dataset, model.tokenizer, max_length=args.max_length, system=args.system,
                           seed=args.seed, log=messages.append, truncation_strategy=args.truncation_strategy,
                           processor=model.processor if model.is_vlm else None)
    rows, prompts_per_step = _rows_per_step(args, ctx.dp)
    steps_per_epoch = max(1, len(prompts) // prompts_per_step) * args.num_iterations
    total_steps = total_steps_of(args, steps_per_epoch)
    optimizer, schedule = build_optimizer(args, total_steps, cfg)

    eos = stop_token_ids(model.config.text if model.is_vlm else model.config, model.tokenizer)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else int(eos[0])
    demo_before = demo_answer(model, model.params, model.config, args.demo_question, args.demo_max_new_tokens)
    tuned = prepare_tuner(model.params, args, cfg)
    state, start_step = init_state(ctx, tuned, optimizer, messages)
    rows_sharding = NamedSharding(ctx.mesh, PartitionSpec(ctx.batch_sharding.spec[1]))  # a generation's [N] rows
    if args.rollout_mode == "server" and model.is_vlm:
        raise ConfigError("--rollout_mode server: a vision-language model's rollouts run colocated so far (the "
                          "rollout server takes text prompts)")
    remote = RemoteRollouts(args, eos, pad_id, tuned.lora) if args.rollout_mode == "server" else None
    sampler = remote.sample if remote else parts.make_sampler(model, cfg, eos, pad_id,
                                                              max(len(p.ids) for p in prompts), rows_sharding)
    share = _shares_prompts_in_the_step(args, ctx)
    generator = Generator(args, cfg, model.tokenizer, PromptStream(prompts, args.seed), parts, prompts_per_step,
                          args.gradient_accumulation_steps, _logps_fn(args, cfg), _reference(args, ctx, tuned.lora),
                          sampler, completions_log=ctx.out_dir / "completions.jsonl",
                          rows=ctx.rows(rows // args.gradient_accumulation_steps), rows_sharding=rows_sharding,
                          share_prompts=share)
    model = ctx.model = dataclasses.replace(model, params=None)  # the train state holds the one copy from here on
    step = make_grpo_step(cfg, optimizer, args.loss_config(), reward_names=tuple(parts.reward_funcs),
                          temperature=args.temperature, has_old=args.num_iterations > 1 or args.async_generate,
                          prepare_params=tuned.prepare, num_generations=args.num_generations, share_prompts=share)
    holder = LatestState(state, compile_step(ctx, step, state))
    plan = (RemotePlan(generator, holder, total_steps, args.num_iterations, remote, args.async_generate) if remote
            else RolloutPlan(generator, holder, total_steps, args.num_iterations))
    feed = Feed(holder.step, plan.batches, rows,
                args.max_length + args.max_completion_length, steps_per_epoch, with_task_scores(None, ctx, task_scorer))
    messages.append(_summary(args, prompts_per_step, tuned.lora is not None))
    loop = train_loop(ctx, state, feed, total_steps=total_steps, start_step=start_step, schedule=schedule,
                      messages=messages, progress=progress)
    return _finish(ctx, args, loop, tuned.lora, demo_before)


def check_multi_process(args: GrpoArguments) -> None:
    """What runs in one process only so far, refused by name in a multi-process job: the paged engine and the
    multi-turn environments drive generation from per-process host loops (slots, environment turns), where the
    processes of a job must run one program together."""
    if jax.process_count() == 1:
        return
    if args.rollout_backend == "engine":
        raise ConfigError(f"--rollout_backend engine runs in one process so far ({jax.process_count()} processes "
                          "here); multi-process GRPO generates with --rollout_backend generate")
    if args.multi_turn_env:
        raise ConfigError(f"--multi_turn_env runs in one process so far ({jax.process_count()} processes here)")


def _finish(ctx, args: GrpoArguments, loop, lora_cfg, demo_before) -> GrpoResult:
    final_params = host_params(float_view(loop.state.params))  # multi-process: gathered to every host
    export_dir = export_model(ctx, final_params, lora_cfg)
    plot_run(ctx)
    demo_after = demo_answer(ctx.model, final_params, ctx.cfg, args.demo_question, args.demo_max_new_tokens)
    first, last = _reward_trend(loop.history)
    if is_primary():
        append_record(ctx.out_dir, {"split": "summary", "reward_first_quarter": first, "reward_last_quarter": last})
    return GrpoResult(loop.history, ctx.out_dir, export_dir, first, last, demo_before, demo_after,
                      loop.first_step_seconds)


def _reward_trend(history: dict[int, dict]) -> tuple[float, float]:
    steps = sorted(history)
    if not steps:
        return float("nan"), float("nan")
    q = max(1, len(steps) // 4)
    mean = lambda ss: float(np.mean([history[s]["reward"] for s in ss]))  # noqa: E731
    return mean(steps[:q]), mean(steps[-q:])
