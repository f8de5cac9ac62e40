"""The GKD trainer (`jaxswift rlhf --rlhf_type gkd`): a student distilled from a teacher by the generalized JSD
(losses/distill.py) over completion tokens, on the skeleton of `train.loop` (mesh, LoRA/full, checkpoints, logs,
export).

Each step's completions (TRL's GKDTrainer): with probability `--lmbda` the student's own samples at
`--temperature` (on-policy, infer/rollout.py's jitted sampler on the train state's latest params); otherwise the
teacher's samples with `--seq_kd`, else the dataset's replies. The draw is seeded by (seed, step), so a resumed run
makes the same choices. Every row is [P + C]: the prompt left-padded to the data's longest (P), the completion
right-padded to `--max_completion_length` (C), so one program serves every step.

The teacher: `--teacher_model` runs in process beside the student (frozen, its logits computed inside the jitted
step); `--teacher_url` is a server whose top-k log-probs (`--teacher_top_k`) are fetched on the host per batch. A
top-k teacher, remote or in process, is used as losses/distill.topk_jsd defines it (both distributions renormalised
over the teacher's top-k support). Held-out divergence: the same loss over the validation rows' dataset replies,
before training, every --eval_steps and at the end.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxswift.api import load_model
from jaxswift.data.formats import build_sft_examples, split_train_val
from jaxswift.data.prompts import PromptStream
from jaxswift.errors import ConfigError, DataError
from jaxswift.infer.generate import stop_token_ids
from jaxswift.infer.rollout import RolloutSampling, rollout
from jaxswift.losses import distill
from jaxswift.models.config import ModelConfig
from jaxswift.models.transformer import hidden_states, logits_from_hidden
from jaxswift.optim.qgalore import float_view
from jaxswift.parallel.params import shard_params
from jaxswift.train.gkd_teacher import RemoteTeacher, check_same_vocabulary
from jaxswift.train.logging import append_record
from jaxswift.train.loop import (
    Feed,
    LatestState,
    TaskScorer,
    compile_eval,
    compile_step,
    demo_answer,
    export_model,
    host_params,
    init_state,
    plot_run,
    refuse_vision_language,
    start_run,
    total_steps_of,
    train_loop,
    with_task_scores,
)
from jaxswift.train.state import TrainState, combine
from jaxswift.train.step import guarded_update
from jaxswift.train.tuning import build_optimizer, prepare_tuner

SOURCES = ("dataset", "student", "teacher")  # where a step's completions come from (batch["source"])


# --------------------------------------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class GkdItem:
    prompt: tuple[int, ...]  # the chat-templated prompt, ending where the last assistant reply starts
    completion: np.ndarray  # int32: the dataset's last reply (cut to --max_completion_length)
    mask: np.ndarray  # float32: 1 on the reply's trained tokens (the template's end-of-turn included)


def load_gkd_items(specs: list[str], tokenizer, args, log: Callable[[str], None], what: str) -> list[GkdItem]:
    """Conversations -> (prompt, last reply) items. Prompts longer than --max_length follow
    --truncation_strategy (delete: skipped, counted); replies longer than --max_completion_length are cut."""
    examples, stats = build_sft_examples(specs, tokenizer, max_length=1 << 30, loss_scale="last_round",
                                         system=args.system, seed=args.seed)
    items, too_long, cut = [], 0, 0
    for ex in examples:
        trained = np.flatnonzero(ex.loss_mask)
        start, end = int(trained[0]), int(trained[-1]) + 1
        prompt = ex.input_ids[:start].tolist()
        if len(prompt) > args.max_length:
            if args.truncation_strategy == "delete":
                too_long += 1
                continue
            prompt = prompt[-args.max_length:] if args.truncation_strategy == "left" else prompt[:args.max_length]
        C = args.max_completion_length
        cut += end - start > C
        items.append(GkdItem(tuple(prompt), ex.input_ids[start:end][:C].astype(np.int32),
                             ex.loss_mask[start:end][:C].astype(np.float32)))
    log(f"{what}: {stats.summary()}; {len(items)} (prompt, reply) items, {too_long} skipped (prompt longer than "
        f"--max_length {args.max_length}), {cut} replies cut to --max_completion_length {args.max_completion_length}")
    return items


def gkd_rows(prompts: list, completions: list, masks: list, P: int, C: int, pad_id: int) -> dict[str, np.ndarray]:
    """[N, P + C] tokens / positions / segment_ids (prompt left-padded, padding segment 0) and completion_mask
    [N, C] of prompt + completion rows."""
    N = len(prompts)
    tokens = np.full((N, P + C), pad_id, np.int32)
    positions, segments = np.zeros((N, P + C), np.int32), np.zeros((N, P + C), np.int32)
    completion_mask = np.zeros((N, C), np.float32)
    for i, (prompt, completion, mask) in enumerate(zip(prompts, completions, masks)):
        n, L = len(prompt), min(len(completion), C)
        tokens[i, P - n:P], positions[i, P - n:P], segments[i, P - n:] = prompt, np.arange(n), 1
        tokens[i, P:P + L], completion_mask[i, :L] = completion[:L], mask[:L]
        positions[i, P:] = n + np.arange(C)
    return {"tokens": tokens, "positions": positions, "segment_ids": segments, "completion_mask": completion_mask}


# ------------------------------------------------------------------------------------------------------ the loss


@dataclasses.dataclass(frozen=True)
class GkdLoss:
    beta: float
    temperature: float
    top_k: int | None  # an in-process teacher used through its top-k (None: full logits)


def completion_logits(params, rows: dict, cfg: ModelConfig):
    """Logits [B, C, V] (float32) predicting each completion token of [B, P + C] rows."""
    P = rows["tokens"].shape[-1] - rows["completion_mask"].shape[-1]
    h = hidden_states(params, rows["tokens"], cfg, positions=rows["positions"], segment_ids=rows["segment_ids"])[0]
    return logits_from_hidden(params, h[:, P - 1:-1], cfg).astype(jnp.float32)


def token_divergence(params, rows: dict, teacher_params, *, cfg: ModelConfig, teacher_cfg: ModelConfig | None,
                     loss: GkdLoss):
    """JSD_beta [B, C] at each completion position: against the remote teacher's top-k in the rows
    (teacher_ids / teacher_logps), else against the in-process teacher's logits (its top-k when loss.top_k)."""
    student = completion_logits(params, rows, cfg)
    kw = dict(beta=loss.beta, temperature=loss.temperature)
    if "teacher_ids" in rows:
        return distill.topk_jsd(student, rows["teacher_ids"], rows["teacher_logps"], **kw)
    teacher = jax.lax.stop_gradient(completion_logits(teacher_params, rows, teacher_cfg))
    if loss.top_k:
        return distill.topk_jsd(student, *distill.teacher_top_k(teacher, loss.top_k), **kw)
    return distill.token_jsd(student, teacher, **kw)


def divergence_sums(params, rows: dict, teacher_params=None, *, cfg, teacher_cfg, loss: GkdLoss):
    """(summed divergence over the counted completion tokens, their count): for evaluation."""
    jsd = token_divergence(params, rows, teacher_params, cfg=cfg, teacher_cfg=teacher_cfg, loss=loss)
    return jnp.sum(jsd * rows["completion_mask"]), jnp.sum(rows["completion_mask"])


def make_gkd_step(cfg: ModelConfig, teacher_cfg: ModelConfig | None, optimizer: optax.GradientTransformation,
                  loss: GkdLoss, *, prepare_params: Callable | None = None) -> Callable:
    """(state, batch[, teacher params]) -> (state, metrics). batch: [A, b, ...] rows (gkd_rows), source [1], and
    teacher_ids / teacher_logps [C, K] from a remote teacher. The loss is TRL's batchmean with labels: the summed
    divergence over the step's counted completion tokens divided by their number (over all micro-batches)."""
    prepare = prepare_params or (lambda params, rng: params)

    def micro_loss(trainable, frozen, micro, key, teacher_params, num_tokens):
        params = prepare(combine(trainable, frozen), key)
        jsd = token_divergence(params, micro, teacher_params, cfg=cfg, teacher_cfg=teacher_cfg, loss=loss)
        return jnp.sum(jsd * micro["completion_mask"]) / num_tokens

    def step(state: TrainState, batch: dict, teacher_params=None):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        num_tokens = jnp.maximum(jnp.sum(batch["completion_mask"]), 1.0)

        def accumulate(carry, xs):
            micro, key = xs
            value, grads = jax.value_and_grad(micro_loss)(float_view(state.trainable), state.frozen, micro, key,
                                                          teacher_params, num_tokens)
            return (carry[0] + value, jax.tree.map(jnp.add, carry[1], grads)), None

        A = batch["tokens"].shape[0]
        init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, float_view(state.trainable)))
        (value, grads), _ = jax.lax.scan(accumulate, init, (batch, jax.random.split(rng, A)))
        new_state, grad_norm, finite = guarded_update(state, grads, value, optimizer, jax.random.fold_in(rng, 1 << 30))
        lengths = jnp.sum(batch["completion_mask"], axis=-1)
        P = batch["tokens"].shape[-1] - batch["completion_mask"].shape[-1]
        real = jnp.sum(batch["segment_ids"][..., :P] > 0) + jnp.sum(batch["completion_mask"] > 0)  # no padding
        metrics = {"loss": value, "grad_norm": grad_norm, "tokens": real,
                   "loss_tokens": jnp.sum(batch["completion_mask"]), "finite": finite,
                   "bad_streak": new_state.bad_streak, "skipped_steps": new_state.skipped_steps,
                   "completion_length": jnp.mean(lengths),
                   **{f"source/{name}": jnp.mean(batch["source"] == k) for k, name in enumerate(SOURCES)}}
        return new_state, metrics

    return step


# ----------------------------------------------------------------------------------------------------- teachers


@dataclasses.dataclass
class Teacher:
    """The run's teacher: in process (params, cfg) or remote."""
    params: Any = None
    cfg: ModelConfig | None = None
    remote: RemoteTeacher | None = None

    @property
    def extra(self) -> tuple:
        """What the compiled step and evaluation take beside the batch."""
        return () if self.params is None else (self.params,)


def load_teacher(ctx, args, messages: list[str]) -> Teacher:
    model = ctx.model
    if args.teacher_url:
        remote = RemoteTeacher(args.teacher_url, args.teacher_top_k, model.config.vocab_size)
        if model.tokenizer is not None:
            messages.append(remote.check_tokenizer(model.tokenizer))
        messages.append(f"teacher: {remote.model} at {args.teacher_url}, top {args.teacher_top_k} log-probs per "
                        "token (JSD over that support)")
        return Teacher(remote=remote)
    teacher = load_model(args.teacher_model, dtype=args.dtype)
    if teacher.is_vlm:
        raise ConfigError(f"--teacher_model {args.teacher_model}: a {teacher.config.family} vision-language model; "
                          "gkd distils text-only models so far")
    check_same_vocabulary(model, teacher, args.model, args.teacher_model)
    if args.teacher_top_k is not None and args.teacher_top_k > teacher.config.vocab_size:
        raise ConfigError(f"--teacher_top_k {args.teacher_top_k}: more than the vocabulary "
                          f"({teacher.config.vocab_size})")
    cfg = teacher.config.replace(remat="none")
    support = f"its top {args.teacher_top_k} tokens" if args.teacher_top_k else "full logits"
    messages.append(f"teacher: {args.teacher_model} in process ({cfg.family}, {cfg.num_layers} layers), {support}")
    return Teacher(params=shard_params(teacher.params, cfg, ctx.rules, ctx.mesh), cfg=cfg)


# ------------------------------------------------------------------------------------------------------ batches


@dataclasses.dataclass
class BatchMaker:
    """Makes each step's batch: the draw of its completions' source, the rows, and a remote teacher's scores."""
    args: Any
    cfg: ModelConfig
    teacher: Teacher
    eos_ids: np.ndarray
    pad_id: int
    prompt_width: int
    micro_batches: int

    def source(self, step: int) -> int:
        """0 dataset, 1 student (on-policy, probability lmbda), 2 teacher (seq_kd): seeded by (seed, step)."""
        if np.random.default_rng([self.args.seed, step, 7]).random() < self.args.lmbda:
            return 1
        return 2 if self.args.seq_kd else 0

    def __call__(self, state, step: int, items: list[GkdItem]) -> dict[str, np.ndarray]:
        source = self.source(step)
        prompts = [list(it.prompt) for it in items]
        if source == 0:
            completions, masks = [it.completion for it in items], [it.mask for it in items]
        else:
            completions = self._generate(state, step, prompts, source)
            masks = [np.ones(len(c), np.float32) for c in completions]
        batch = self.rows(prompts, completions, masks)
        batch["source"] = np.full((len(items), 1), source, np.int32)
        A = self.micro_batches
        return {k: v.reshape(A, v.shape[0] // A, *v.shape[1:]) for k, v in batch.items()}

    def rows(self, prompts, completions, masks) -> dict[str, np.ndarray]:
        C = self.args.max_completion_length
        batch = gkd_rows(prompts, completions, masks, self.prompt_width, C, self.pad_id)
        if self.teacher.remote is not None:
            batch["teacher_ids"], batch["teacher_logps"] = self.teacher.remote.score(
                batch["tokens"], batch["segment_ids"], batch["completion_mask"], self.prompt_width)
        return batch

    def _generate(self, state, step: int, prompts: list[list[int]], source: int) -> list[np.ndarray]:
        args = self.args
        C = args.max_completion_length
        if source == 2 and self.teacher.remote is not None:
            return self.teacher.remote.generate(prompts, max_tokens=C, temperature=args.temperature,
                                                seed=args.seed * 100_003 + step, eos_ids=self.eos_ids)
        params, cfg = (float_view(state.params), self.cfg) if source == 1 else (self.teacher.params, self.teacher.cfg)
        r = rollout(params, prompts, cfg.replace(remat="none"),
                    sampling=RolloutSampling(temperature=args.temperature, max_completion_length=C),
                    num_generations=1, eos_ids=self.eos_ids, pad_id=self.pad_id,
                    key=jax.random.fold_in(jax.random.key(args.seed), step))
        return [ids[:n] for ids, n in zip(r.completion_ids, r.lengths)]


def step_batches(maker: BatchMaker, stream: PromptStream, holder: LatestState, rows_per_step: int, total_steps: int):
    """start step -> iterator over the steps' batches (grain reads each step's items)."""
    def batches(start_step: int):
        items = stream.generations(rows_per_step, total_steps, start=start_step)
        for step, step_items in enumerate(items, start=start_step):
            yield maker(holder.state, step, step_items)
    return batches


# --------------------------------------------------------------------------------------------------- evaluation


def make_evaluator(ctx, maker: BatchMaker, teacher: Teacher, loss: GkdLoss, params_sharding, val_items):
    """state -> {"loss": the held-out divergence}: the same JSD over the validation rows' dataset replies (a remote
    teacher's scores fetched once)."""
    if not val_items:
        return None
    rows = ctx.args.per_device_eval_batch_size * ctx.dp
    batches = []
    for start in range(0, len(val_items), rows):
        chunk = val_items[start:start + rows]
        chunk = chunk + [chunk[0]] * (rows - len(chunk))
        masks = [it.mask if k < len(val_items) - start else it.mask * 0 for k, it in enumerate(chunk)]
        batch = maker.rows([list(it.prompt) for it in chunk], [it.completion for it in chunk], masks)
        batches.append({k: v[None] for k, v in batch.items()})
    fn = lambda p, b, *t: divergence_sums(p, jax.tree.map(lambda x: x[0], b), *t, cfg=ctx.cfg,  # noqa: E731
                                          teacher_cfg=teacher.cfg, loss=loss)
    scorer = compile_eval(ctx, fn, params_sharding, *teacher.extra)

    def evaluate(state) -> dict:
        total = count = 0.0
        params = float_view(state.params)
        for batch in batches:
            s, n = scorer(params, ctx.put_whole(batch))
            total, count = total + float(s), count + float(n)
        return {"loss": total / max(count, 1.0)}

    return evaluate


# ------------------------------------------------------------------------------------------------------------ run


@dataclasses.dataclass
class GkdResult:
    losses: dict[int, float]
    history: dict[int, dict[str, float]]
    eval_metrics: dict[int, dict[str, float]]
    divergence_before: float | None  # held-out divergence before training (None without validation rows)
    divergence_after: float | None
    output_dir: Path
    export_dir: Path | None
    demo_before: str | None
    demo_after: str | None
    skipped_steps: int
    first_step_seconds: float


def _data(args, tokenizer, messages):
    train = load_gkd_items(args.dataset, tokenizer, args, messages.append, "train data")
    if args.val_dataset:
        val = load_gkd_items(args.val_dataset, tokenizer, args, messages.append, "val data")
    else:
        train, val = split_train_val(train, args.split_dataset_ratio, args.seed)
    if not train:
        raise DataError(f"--dataset {' '.join(args.dataset)}: no usable (prompt, reply) item")
    return train, val


def run_gkd(args, *, progress: bool = True, task_scorer: TaskScorer | None = None) -> GkdResult:
    ctx = start_run(args)
    refuse_vision_language(ctx, "gkd")
    model, cfg = ctx.model, ctx.cfg
    if model.tokenizer is None:
        raise ConfigError(f"{args.model}: the model has no tokenizer, which GKD needs for prompts and replies")
    messages: list[str] = []
    teacher = load_teacher(ctx, args, messages)
    train_items, val_items = _data(args, model.tokenizer, messages)
    rows_per_step = args.per_device_train_batch_size * ctx.dp * args.gradient_accumulation_steps
    steps_per_epoch = max(1, len(train_items) // rows_per_step)
    total_steps = total_steps_of(args, steps_per_epoch)
    optimizer, schedule = build_optimizer(args, total_steps, cfg)
    loss = GkdLoss(args.beta, args.temperature, None if teacher.remote else args.teacher_top_k)

    eos = stop_token_ids(model.config, model.tokenizer)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else int(eos[0])
    demo_before = demo_answer(model, model.params, model.config, args.demo_question, args.demo_max_new_tokens)
    tuned = prepare_tuner(model.params, args, cfg)
    model = ctx.model = dataclasses.replace(model, params=None)  # the train state holds the one copy from here on
    state, start_step = init_state(ctx, tuned, optimizer, messages)
    width = max(len(it.prompt) for it in train_items + val_items)
    maker = BatchMaker(args, cfg, teacher, eos, pad_id, width, args.gradient_accumulation_steps)
    step = make_gkd_step(cfg, teacher.cfg, optimizer, loss, prepare_params=tuned.prepare)
    holder = LatestState(state, compile_step(ctx, step, state, *teacher.extra))
    evaluate = make_evaluator(ctx, maker, teacher, loss, jax.tree.map(lambda x: x.sharding, state).params, val_items)
    before = evaluate(state)["loss"] if evaluate is not None else None
    if before is not None:
        messages.append(f"held-out divergence before training: {before:.4f} ({len(val_items)} rows)")
    messages.append(_summary(args, rows_per_step))
    feed = Feed(holder.step, step_batches(maker, PromptStream(train_items, args.seed), holder, rows_per_step,
                                          total_steps),
                rows_per_step, width + args.max_completion_length, steps_per_epoch,
                with_task_scores(evaluate, ctx, task_scorer))
    loop = train_loop(ctx, state, feed, total_steps=total_steps, start_step=start_step, schedule=schedule,
                      messages=messages, progress=progress)
    return _finish(ctx, args, loop, tuned.lora, demo_before, before)


def _summary(args, rows_per_step: int) -> str:
    sources = f"student samples with probability {args.lmbda}, else " + ("teacher samples (seq_kd)" if args.seq_kd
                                                                          else "the dataset's replies")
    return (f"gkd: beta {args.beta}, temperature {args.temperature}, {rows_per_step} rows per step; completions: "
            f"{sources} (up to {args.max_completion_length} tokens)")


def _finish(ctx, args, loop, lora_cfg, demo_before, before) -> GkdResult:
    final_params = host_params(float_view(loop.state.params))
    export_dir = export_model(ctx, final_params, lora_cfg)
    plot_run(ctx)
    demo_after = demo_answer(ctx.model, final_params, ctx.cfg, args.demo_question, args.demo_max_new_tokens)
    evals = [m["loss"] for _, m in sorted(loop.eval_metrics.items()) if "loss" in m]
    after = evals[-1] if evals else None
    if before is not None:
        append_record(ctx.out_dir, {"split": "summary", "divergence_before": before, "divergence_after": after})
    return GkdResult(loop.losses, loop.history, loop.eval_metrics, before, after, ctx.out_dir, export_dir,
                     demo_before, demo_after, int(jax.device_get(loop.state.skipped_steps)), loop.first_step_seconds)
