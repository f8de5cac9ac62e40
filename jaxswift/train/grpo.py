"""The GRPO-family trainer: prompts -> rollouts from the current weights -> rewards -> advantages -> jitted,
donated policy-gradient steps, on SFT's machinery (mesh, LoRA/full, optimizer, checkpoints + resume, logs, plot).

Each generation (`prompts_per_step` prompts x G completions) feeds `--num_iterations` optimizer steps. Old
log-probs (needed when num_iterations > 1 or for kl_in_reward) and reference log-probs (beta > 0) are computed in
jitted batches when the generation is made: with LoRA the reference is the same base with adapters off (no copy);
full tuning loads `--model` again, frozen. With num_iterations = 1 the old policy is the current one (ratio 1, as
TRL). Rollouts run on the train state's params, so they always sample the latest weights.
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

from jaxswift.data.formats import iter_rows, parse_dataset_spec, sample_counts
from jaxswift.errors import ConfigError, DataError
from jaxswift.losses import policy as pl
from jaxswift.models.config import ModelConfig
from jaxswift.rl import rewards as rw
from jaxswift.rl.rollout import (Rollout, RolloutSampling, completion_logps, engine_rollout,
                                 grouped_completion_logps, rollout, sequences, shares_prompts)
from jaxswift.train.grpo_args import GrpoArguments
from jaxswift.train.logging import plot_loss
from jaxswift.train.step import guarded_update
from jaxswift.train.state import TrainState, combine
from jaxswift.train.trainer import (_demo, _export, build_optimizer, compile_step, init_state, prepare_tuner,
                                    shard_params, start_run, train_loop)

PROMPT_FIELDS = ("prompt", "messages", "query")


# --------------------------------------------------------------------------------------------------------- prompts


@dataclasses.dataclass
class PromptRow:
    ids: list[int]
    prompt: Any  # as the row gives it (a string or messages): what reward functions receive
    columns: dict  # every other field of the row
    where: str


def _prompt_messages(row: dict, where: str, system: str | None) -> tuple[Any, list[dict]]:
    if not isinstance(row, dict) or not any(row.get(k) for k in PROMPT_FIELDS):
        found = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: no prompt: expected a non-empty {' | '.join(PROMPT_FIELDS)} field; found {found}")
    key = next(k for k in PROMPT_FIELDS if row.get(k))
    value = row[key]
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        messages = list(value)
        while messages and messages[-1]["role"] == "assistant":  # a reference answer is not part of the prompt
            messages.pop()
        if not messages:
            raise DataError(f"{where}: field {key!r} holds only assistant turns: no prompt")
    else:
        raise DataError(f"{where}: field {key!r} must be a string or a list of {{role, content}} messages")
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return value, messages


def load_prompts(specs: list[str], tokenizer, *, max_length: int, system: str | None, seed: int, log) -> list:
    """Prompt rows of every dataset (`path#N` takes N rows); prompts longer than max_length are skipped, counted."""
    rows, skipped = [], 0
    for spec in specs:
        path, n = parse_dataset_spec(spec)
        table = list(iter_rows(path))
        for (where, row), count in zip(table, sample_counts(len(table), n, seed)):
            if count == 0:
                continue
            prompt, messages = _prompt_messages(row, where, system)
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) > max_length:
                skipped += int(count)
                continue
            columns = {k: v for k, v in row.items() if k not in PROMPT_FIELDS}
            rows += [PromptRow(ids, prompt, columns, where)] * int(count)
    log(f"prompts: {len(rows)} used, {skipped} skipped (longer than --max_length {max_length})")
    if not rows:
        raise DataError(f"--dataset {' '.join(specs)}: no usable prompt")
    return rows


# ------------------------------------------------------------------------------------------------------- the step


def make_grpo_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, loss_cfg: pl.PolicyLossConfig, *,
                   reward_names: tuple[str, ...], temperature: float, has_old: bool,
                   prepare_params: Callable | None = None) -> Callable:
    """(state, batch) -> (state, metrics). batch: [A, b, ...] tokens/positions/segment_ids [P + C],
    completion_mask [C], advantages [1], rewards [R], and old_logps / ref_logps [C] when used."""
    prepare = prepare_params or (lambda params, rng: params)

    def micro_loss(trainable, frozen, micro, key, num_sequences, num_tokens):
        params = prepare(combine(trainable, frozen), key)
        C = micro["completion_mask"].shape[-1]
        logps, entropy = completion_logps(params, micro["tokens"], micro["positions"], micro["segment_ids"], cfg,
                                          prompt_length=micro["tokens"].shape[-1] - C, temperature=temperature,
                                          with_entropy=True)
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
            (loss, sums), grads = jax.value_and_grad(micro_loss, has_aux=True)(
                state.trainable, state.frozen, micro, key, A * b, num_tokens)
            return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], grads)), sums

        init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.trainable))
        (loss, grads), per_micro = jax.lax.scan(accumulate, init, (batch, jax.random.split(rng, A)))
        new_state, grad_norm, finite = guarded_update(state, grads, loss, optimizer, None)
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": jnp.sum(batch["segment_ids"] > 0),
                   "finite": finite, "bad_streak": new_state.bad_streak, "skipped_steps": new_state.skipped_steps,
                   **_step_metrics(jax.tree.map(jnp.sum, per_micro), batch, num_tokens, reward_names)}
        return new_state, metrics

    return step


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
    out["reward"], out["reward_std"] = jnp.mean(total), pl._std(total)
    for k, name in enumerate(reward_names):
        out[f"rewards/{name}/mean"] = jnp.mean(per_func[:, k])
        out[f"rewards/{name}/std"] = pl._std(per_func[:, k])
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
    prompts: list[PromptRow]
    reward_funcs: dict
    reward_weights: np.ndarray
    prompts_per_step: int
    micro_batches: int
    logps_fn: Callable  # jitted (params, tokens, positions, segments) -> [N, C]
    reference: Callable  # state -> reference params (adapters off / a frozen copy); None when beta = 0
    sample: Callable  # (params, prompt rows, key) -> (Rollout, env rewards or None)
    completions_log: Path | None = None

    def prompt_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.args.seed, epoch]).permutation(len(self.prompts))

    def prompts_at(self, index: int, count: int) -> list[PromptRow]:
        """`count` prompts from position `index` of the endless, per-epoch reshuffled stream."""
        out = []
        for k in range(index, index + count):
            epoch, offset = divmod(k, len(self.prompts))
            out.append(self.prompts[self.prompt_order(epoch)[offset]])
        return out

    def rewards_of(self, rows: list[PromptRow], r: Rollout, env_rewards) -> np.ndarray:
        G = self.args.num_generations
        completions = [self.tokenizer.decode(ids[m > 0], skip_special_tokens=True)
                       for ids, m in zip(r.completion_ids, r.completion_mask)]
        expanded = [row for row in rows for _ in range(G)]
        columns: dict[str, list] = {}
        for key in {k for row in rows for k in row.columns}:
            columns[key] = [row.columns.get(key) for row in expanded]
        columns["completion_ids"] = [ids[m > 0].tolist() for ids, m in zip(r.completion_ids, r.completion_mask)]
        columns["completion_lengths"] = r.lengths.tolist()
        if env_rewards is not None:
            columns["env_reward"] = list(env_rewards)
        scores = rw.score(self.reward_funcs, [row.prompt for row in expanded], completions, columns)
        self._log_completions(expanded, completions, scores)
        return scores

    def _log_completions(self, rows: list[PromptRow], completions: list[str], scores: np.ndarray):
        """The first group of every rollout, with its rewards, to output_dir/completions.jsonl (TRL's
        log_completions)."""
        if self.completions_log is None:
            return
        with open(self.completions_log, "a") as f:
            for row, text, s in list(zip(rows, completions, scores))[:self.args.num_generations]:
                f.write(json.dumps({"prompt": row.prompt, "completion": text,
                                    **{n: float(v) for n, v in zip(self.reward_funcs, s)}}) + "\n")

    def sample_groups(self, state, generation: int):
        """(prompt rows, rollout, rewards [N, R]); with dynamic sampling, groups whose rewards are all equal are
        replaced by fresh prompts (up to max_resample_times rounds), then refilled from the dropped ones."""
        params = state.params
        k = self.prompts_per_step
        key = jax.random.fold_in(jax.random.key(self.args.seed), generation)
        rows = self.prompts_at(generation * k, k)
        r, env = self.sample(params, rows, key)
        scores = self.rewards_of(rows, r, env)
        if not self.args.dynamic_sample:
            return rows, r, scores
        kept, dropped = _split_groups(rows, r, scores, self.reward_weights, self.args.num_generations)
        for attempt in range(self.args.max_resample_times):
            if len(kept) >= k:
                break
            more = self.prompts_at(10_000_019 * (attempt + 1) + generation * k, k)  # a stream apart from training
            r2, env2 = self.sample(params, more, jax.random.fold_in(key, attempt + 1))
            kept2, dropped2 = _split_groups(more, r2, self.rewards_of(more, r2, env2), self.reward_weights,
                                            self.args.num_generations)
            kept, dropped = kept + kept2, dropped + dropped2
        self.last_dynamic = {"groups_kept": min(len(kept), k), "groups_refilled": max(k - len(kept), 0)}
        return _join_groups((kept + dropped)[:k])

    def __call__(self, state, generation: int) -> dict[str, np.ndarray]:
        rows, r, scores = self.sample_groups(state, generation)
        args, G = self.args, self.args.num_generations
        seqs = sequences(r)
        total = scores @ self.reward_weights
        batch = {**seqs, "completion_mask": r.completion_mask.copy()}
        params = state.params
        if args.num_iterations > 1 or args.kl_in_reward:
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
        return {k: v.reshape(A, v.shape[0] // A, *v.shape[1:]) for k, v in batch.items()}

    def _logps(self, params, seqs: dict) -> np.ndarray:
        rows = len(seqs["tokens"]) // self.micro_batches
        out = [np.asarray(self.logps_fn(params, *(seqs[k][i:i + rows] for k in ("tokens", "positions",
                                                                                 "segment_ids"))))
               for i in range(0, len(seqs["tokens"]), rows)]
        return np.concatenate(out, 0)


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
    """What train_loop reads: an endless stream of step batches; a generation is remade every num_iterations
    steps from the state the last step returned (the holder), so rollouts always use the latest weights."""
    generator: Generator
    holder: Any  # .state: the latest train state
    rows_per_step: int
    length: int
    steps_per_epoch: int
    num_iterations: int

    def batches(self, start_step: int = 0):
        step = start_step
        while True:
            generation = step // self.num_iterations
            batch = self.generator(self.holder.state, generation)
            for _ in range(self.num_iterations - step % self.num_iterations):
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


def _samplers(args: GrpoArguments, model, cfg, eos_ids, pad_id, longest_prompt: int):
    """(params, rows, key) -> (Rollout, env rewards | None), by backend and turn count."""
    sampling = RolloutSampling(args.temperature, args.top_p, args.top_k, args.max_completion_length)
    G = args.num_generations
    if args.multi_turn_env:
        from jaxswift.rl.envs import env_factory, multi_turn_rollout

        make_env = env_factory(args.multi_turn_env)
        return lambda params, rows, key: multi_turn_rollout(
            params, [{"prompt": r.prompt, **r.columns} for r in rows], [r.ids for r in rows], cfg, model.tokenizer,
            make_env=make_env, max_turns=args.max_turns, sampling=sampling, num_generations=G, eos_ids=eos_ids,
            pad_id=pad_id, key=key)
    if args.rollout_backend == "engine":
        from jaxswift.infer.engine import JaxEngine
        from jaxswift.models.transformer import unstack_layers

        engine = JaxEngine(dataclasses.replace(model, config=cfg.replace(remat="none")),
                           max_concurrent_decodes=min(64, args.per_device_train_batch_size
                                                      * args.gradient_accumulation_steps),
                           max_model_len=int(2 ** np.ceil(np.log2(longest_prompt + args.max_completion_length + 1))))
        engine.params = None  # the engine samples the train state's params, passed per call: no copy kept

        def sample(params, rows, key):
            seed = int(jax.random.randint(key, (), 0, 2 ** 30))
            return engine_rollout(engine, unstack_layers(params), [r.ids for r in rows], sampling=sampling,
                                  num_generations=G, seed=seed), None
        return sample
    return lambda params, rows, key: (rollout(params, [r.ids for r in rows], cfg.replace(remat="none"),
                                              sampling=sampling, num_generations=G, eos_ids=eos_ids, pad_id=pad_id,
                                              key=key), None)


def _reward_funcs(args: GrpoArguments):
    funcs = rw.resolve_reward_funcs([f for f in args.reward_funcs if f != "env"], args.reward_settings()) \
        if [f for f in args.reward_funcs if f != "env"] else {}
    if "env" in args.reward_funcs:
        from jaxswift.rl.envs import env_reward
        funcs = {name: (env_reward if name == "env" else funcs[name]) for name in args.reward_funcs}
    if not funcs:
        raise ConfigError("--reward_funcs is empty: give at least one reward function")
    return funcs, rw.check_weights(args.reward_weights, list(funcs))


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


def run_grpo(args: GrpoArguments, *, progress: bool = True) -> GrpoResult:
    ctx = start_run(args)
    model, cfg = ctx.model, ctx.cfg
    if model.tokenizer is None:
        raise ConfigError(f"{args.model}: the model has no tokenizer, which GRPO needs for prompts and rewards")
    messages: list[str] = []
    funcs, weights = _reward_funcs(args)
    prompts = load_prompts(args.dataset, model.tokenizer, max_length=args.max_length, system=args.system,
                           seed=args.seed, log=messages.append)
    rows, prompts_per_step = _rows_per_step(args, ctx.dp)
    steps_per_epoch = max(1, len(prompts) // prompts_per_step) * args.num_iterations
    total_steps = args.max_steps if args.max_steps > 0 else args.num_train_epochs * steps_per_epoch
    optimizer, schedule = build_optimizer(args, total_steps)

    from jaxswift.api import _eos_ids
    eos_ids = _eos_ids(model)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else int(eos_ids[0])
    demo_before = _demo(model, model.params, model.config, args.demo_question, args.demo_max_new_tokens)
    params, mask, lora_cfg, prepare = prepare_tuner(model, args, cfg)
    state, start_step = init_state(ctx, params, mask, optimizer, messages)
    del params

    temperature = args.temperature
    plain_logps = jax.jit(lambda p, t, pos, seg: completion_logps(
        p, t, pos, seg, cfg, prompt_length=t.shape[1] - args.max_completion_length, temperature=temperature))

    def logps_fn(p, t, pos, seg):
        """Reference / old log-probs: each group's prompt runs once when its G rows share it (a rollout's rows
        always do; the check keeps any other layout on the plain path)."""
        P = t.shape[1] - args.max_completion_length
        if not shares_prompts(t, pos, seg, P, args.num_generations):
            return plain_logps(p, t, pos, seg)
        return grouped_completion_logps(p, t, pos, seg, cfg=cfg.replace(remat="none"), prompt_length=P,
                                        temperature=temperature, num_generations=args.num_generations)

    generator = Generator(args, cfg, model.tokenizer, prompts, funcs, weights, prompts_per_step,
                          args.gradient_accumulation_steps, logps_fn, _reference(args, ctx, lora_cfg),
                          _samplers(args, model, cfg, eos_ids, pad_id, max(len(p.ids) for p in prompts)),
                          completions_log=ctx.out_dir / "completions.jsonl")
    model = ctx.model = dataclasses.replace(model, params=None)  # the train state holds the one copy from here on
    step = make_grpo_step(cfg, optimizer, args.loss_config(), reward_names=tuple(funcs), temperature=temperature,
                          has_old=args.num_iterations > 1, prepare_params=prepare)
    compiled = compile_step(ctx, step, state)
    holder = _Holder(state)

    def step_fn(s, b):
        new_state, metrics = compiled(s, b)
        holder.state = new_state
        return new_state, metrics

    plan = RolloutPlan(generator, holder, rows, args.max_length + args.max_completion_length, steps_per_epoch,
                       args.num_iterations)
    messages.append(f"{prompts_per_step} prompts x {args.num_generations} completions per generation, "
                    f"{args.num_iterations} step(s) each; loss {args.loss_type} ({args.importance_sampling_level} "
                    f"level), advantages {args.advantage_estimator} / scale {args.scale_rewards}, beta {args.beta}"
                    + ("; reference: the base with adapters off" if lora_cfg is not None and args.beta else ""))
    loop = train_loop(ctx, state, step_fn, plan, total_steps=total_steps, start_step=start_step, schedule=schedule,
                      messages=messages, progress=progress)
    final_params = loop.state.params
    export_dir = _export(model, final_params, cfg, lora_cfg, args, ctx.out_dir)
    plot_loss(ctx.out_dir / "logging.jsonl", ctx.out_dir / "loss.png")
    demo_after = _demo(model, final_params, cfg, args.demo_question, args.demo_max_new_tokens)
    first, last = _reward_trend(loop.history)
    with open(ctx.out_dir / "logging.jsonl", "a") as f:
        f.write(json.dumps({"split": "summary", "reward_first_quarter": first, "reward_last_quarter": last}) + "\n")
    return GrpoResult(loop.history, ctx.out_dir, export_dir, first, last, demo_before, demo_after,
                      loop.first_step_seconds)


@dataclasses.dataclass
class _Holder:
    state: Any


def _reward_trend(history: dict[int, dict]) -> tuple[float, float]:
    steps = sorted(history)
    if not steps:
        return float("nan"), float("nan")
    q = max(1, len(steps) // 4)
    mean = lambda ss: float(np.mean([history[s]["reward"] for s in ss]))  # noqa: E731
    return mean(steps[:q]), mean(steps[-q:])
