"""The classification and reranking trainer (ms-swift's task types seq_cls, reranker, generative_reranker) on the
skeleton of `train.loop`.

seq_cls              `score` head at the last non-pad token (transformers' *ForSequenceClassification); the loss by
                     problem_type as transformers takes it: MSE (regression), cross-entropy (single label), BCE
                     with logits (multi-label). Exported as an XxxForSequenceClassification folder.
reranker             the same head with one label; each query's documents form a group (positive first):
                     pointwise_reranker = BCE of every document's logit against 1 / 0; listwise_reranker = softmax
                     cross-entropy of the positive within its group (logits / temperature), as ms-swift's losses.
generative_reranker  no head: the LM's logit("yes") - logit("no") at the last token is the score, with the same
                     two losses (Qwen3-Reranker style). Exported as the causal LM it stays.

Rows are never packed: each sequence is its own row, padded on the right with the pad id, and read at its last
token. A batch is [A, B, T] tokens / positions / segment_ids plus labels [A, B, C] and valid [A, B, 1] (0 for the
padding rows of a last partial step); the step's loss is the exact mean over all its real rows (or groups).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.checkpoints.hf import save_seq_cls, seq_cls_body
from jaxswift.checkpoints.peft import save_seq_cls_adapter
from jaxswift.data.classify import read_rerank_rows, read_seq_cls_rows
from jaxswift.data.formats import split_train_val
from jaxswift.data.pipeline import bucket_length
from jaxswift.errors import ConfigError, DataError
from jaxswift.models.heads import (ClassifierHead, default_problem_type, init_score, last_token_index, make_head,
                                   pooled, score_logits, yes_no_score)
from jaxswift.models.transformer import hidden_states
from jaxswift.optim.qgalore import float_view
from jaxswift.parallel.distributed import is_primary
from jaxswift.train.loop import (Feed, RunContext, compile_eval, compile_step, export_model, host_params,
                                 init_state, plot_run, refuse_vision_language, start_run, total_steps_of, train_loop)
from jaxswift.train.state import combine
from jaxswift.train.step import guarded_update
from jaxswift.train.tuning import build_optimizer, prepare_tuner

TASK_TYPES = ("seq_cls", "reranker", "generative_reranker")
RERANKER_LOSSES = ("pointwise_reranker", "listwise_reranker")
# ms-swift reads these from the environment (docs/source_en/BestPractices/Reranker.md); so do we.
RERANKER_ENV = {"MAX_POSITIVE_SAMPLES": 1, "MAX_NEGATIVE_SAMPLES": 7, "LISTWISE_RERANKER_TEMPERATURE": 1.0,
                "LISTWISE_RERANKER_MIN_GROUP_SIZE": 2, "GENERATIVE_RERANKER_POSITIVE_TOKEN": "yes",
                "GENERATIVE_RERANKER_NEGATIVE_TOKEN": "no"}


@dataclasses.dataclass(frozen=True)
class Task:
    """What the step computes; static under jit."""

    kind: str  # seq_cls | reranker | generative_reranker
    problem_type: str = "single_label_classification"  # seq_cls
    listwise: bool = False  # rerankers: listwise_reranker (else pointwise)
    group_size: int = 1  # sequences per item: 1 + negatives for rerankers
    pad_token_id: int = 0
    temperature: float = 1.0
    min_group_size: int = 2
    yes_id: int = -1  # generative_reranker's answer tokens
    no_id: int = -1

    @property
    def metric(self) -> str:
        return "mse" if self.kind == "seq_cls" and self.problem_type == "regression" else "acc"


@dataclasses.dataclass
class ClassifyResult:
    losses: dict[int, float]
    history: dict[int, dict[str, float]]
    eval_metrics: dict[int, dict[str, float]]
    output_dir: Path
    export_dir: Path | None
    head: ClassifierHead | None
    skipped_steps: int
    first_step_seconds: float
    demo_before: None = None  # the causal demo question does not apply to these task types
    demo_after: None = None

    @property
    def eval_losses(self) -> dict[int, float]:
        return {step: m["loss"] for step, m in self.eval_metrics.items() if "loss" in m}


def reranker_env(name: str):
    default = RERANKER_ENV[name]
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = type(default)(raw)
    except ValueError:
        raise ConfigError(f"environment {name}={raw!r}: expected a {type(default).__name__}") from None
    if isinstance(value, (int, float)) and value <= 0:
        raise ConfigError(f"environment {name}={raw!r}: expected a positive value")
    return value


def check_args(args) -> None:
    """The flags of these task types, checked before the model loads."""
    if args.task_type == "seq_cls":
        if args.loss_type is not None:
            raise ConfigError(f"--loss_type {args.loss_type}: seq_cls takes its loss from --problem_type "
                              "(regression: MSE, single_label_classification: cross-entropy, "
                              "multi_label_classification: BCE)")
    elif args.loss_type is not None and args.loss_type not in RERANKER_LOSSES:
        raise ConfigError(f"--loss_type {args.loss_type!r}: --task_type {args.task_type} trains with "
                          f"{' | '.join(RERANKER_LOSSES)}")
    if args.packing_length is not None:
        raise ConfigError(f"--packing_length: --task_type {args.task_type} never packs rows (each sequence is read "
                          "at its own last token)")
    if args.eval_dataset:
        raise ConfigError(f"--eval_dataset: benchmark tasks score causal LMs; --task_type {args.task_type} "
                          "evaluates on --val_dataset / --split_dataset_ratio (loss and accuracy or MSE)")


# --------------------------------------------------------------------------------------------- model and head


def pad_id_of(model) -> int:
    """The pad id the rows are padded with and the head reads past: the tokenizer's, else the config's, else EOS
    (the tokenizer's pad token is what ms-swift writes into the classifier's config)."""
    for value in (getattr(model.tokenizer, "pad_token_id", None), model.config.pad_token_id,
                  getattr(model.tokenizer, "eos_token_id", None), *model.config.eos_token_ids):
        if value is not None:
            return int(value)
    raise ConfigError(f"{model.source}: no pad, nor EOS, token id in the tokenizer or config.json; a classifier "
                      "needs one to find each row's last token")


def classifier_params(ctx: RunContext, args) -> tuple[dict, ClassifierHead]:
    """(decoder params without lm_head + params["score"], head): the folder's head when --model has one (its size
    checked against --num_labels), else a fresh one over the causal LM's decoder."""
    model = ctx.model
    num_labels = args.num_labels if args.task_type == "seq_cls" else 1
    if model.head is not None:
        if model.head.num_labels != num_labels:
            raise ConfigError(f"--num_labels {num_labels}: --model {args.model} already has a score head of "
                              f"{model.head.num_labels} labels (train that size, or start from the causal LM)")
        given = args.problem_type
        if given is not None and given != model.head.problem_type:
            raise ConfigError(f"--problem_type {given}: --model {args.model} was trained as "
                              f"{model.head.problem_type}")
        return dict(model.params), model.head
    problem_type = args.problem_type or default_problem_type(num_labels)
    head = make_head(num_labels, problem_type, pad_id_of(model))
    params = {k: v for k, v in model.params.items() if k != "lm_head"}
    params["score"] = init_score(model.config.hidden_size, num_labels, args.seed).astype(model.config.weight_dtype)
    return params, head


def answer_token_ids(tokenizer) -> tuple[int, int]:
    """generative_reranker: the ids of its positive and negative answer tokens (one token each)."""
    ids = []
    for name in ("GENERATIVE_RERANKER_POSITIVE_TOKEN", "GENERATIVE_RERANKER_NEGATIVE_TOKEN"):
        token = reranker_env(name)
        i = tokenizer.convert_tokens_to_ids(token)
        if i is None or tokenizer.convert_ids_to_tokens(i) != token:
            raise ConfigError(f"{name}={token!r}: not a single token of the tokenizer (the generative reranker reads "
                              "the LM's logit of one answer token)")
        ids.append(int(i))
    return ids[0], ids[1]


# --------------------------------------------------------------------------------------------- batches


def sequences_of(item) -> tuple[np.ndarray, ...]:
    """A reranker group's sequences (positive first), or a labelled sequence's one."""
    return tuple(item.sequences) if hasattr(item, "sequences") else (item.input_ids,)


def assemble(items, picks, task: Task, num_labels: int, length: int) -> dict:
    """[len(picks) * G, T] rows of the picked items (-1: a padding item) with labels [., C] and valid [., 1]."""
    G = task.group_size
    rows = len(picks) * G
    tokens = np.full((rows, length), task.pad_token_id, np.int32)
    segment_ids = np.zeros((rows, length), np.int32)
    labels = np.zeros((rows, num_labels), np.float32)
    valid = np.zeros((rows, 1), np.float32)  # [., 1]: every batch leaf is [A, B, x] for the batch sharding
    for k, i in enumerate(picks):
        if i < 0:
            continue
        item = items[i]
        for j, seq in enumerate(sequences_of(item)[:G]):
            r = k * G + j
            tokens[r, :len(seq)] = seq
            segment_ids[r, :len(seq)] = 1
            valid[r, 0] = 1.0
            labels[r] = item.label if task.kind == "seq_cls" else float(j == 0)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)) * segment_ids
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions, "labels": labels, "valid": valid}


def longest(items, picks) -> int:
    return max((max(len(s) for s in sequences_of(items[i])) for i in picks if i >= 0), default=1)


def step_batches(ctx: RunContext, items, task: Task, num_labels: int, items_per_step: int, micro: int,
                 total_steps: int) -> Callable:
    """start step -> this process's [A, b, T] batches: seeded epoch permutations, the last step of an epoch filled
    with padding items; the row length is the step's longest sequence, bucketed (few compiled shapes)."""
    n, args = len(items), ctx.args
    steps_per_epoch = -(-n // items_per_step)
    rows_per_micro = items_per_step // micro * task.group_size
    first, last = ctx.rows(rows_per_micro)

    def picks_of(step: int) -> np.ndarray:
        epoch, k = divmod(step, steps_per_epoch)
        order = np.random.default_rng(args.seed + epoch).permutation(n)
        picks = order[k * items_per_step:(k + 1) * items_per_step]
        return np.concatenate([picks, -np.ones(items_per_step - len(picks), np.int64)])

    def batches(start: int):
        for step in range(start, total_steps):
            picks = picks_of(step)
            length = bucket_length(longest(items, picks), args.max_length)
            parts = [assemble(items, p, task, num_labels, length) for p in np.split(picks, micro)]
            yield {k: np.stack([p[k] for p in parts])[:, first:last] for k in parts[0]}

    return batches


def eval_batches(items, task: Task, num_labels: int, items_per_batch: int, max_length: int):
    """Validation batches [1, b, T] in order, the last one filled with padding items."""
    for start in range(0, len(items), items_per_batch):
        picks = np.arange(start, start + items_per_batch)
        picks[picks >= len(items)] = -1
        batch = assemble(items, picks, task, num_labels, bucket_length(longest(items, picks), max_length))
        yield {k: v[None] for k, v in batch.items()}


# --------------------------------------------------------------------------------------------- losses


def row_scores(params, micro: dict, cfg, task: Task) -> jax.Array:
    """[B, C] logits (seq_cls, reranker: C = 1) or [B, 1] yes-minus-no scores (generative_reranker)."""
    h, _ = hidden_states(params, micro["tokens"], cfg, positions=micro["positions"], segment_ids=micro["segment_ids"])
    if task.kind == "generative_reranker":  # the last real token (the attention mask's, as ms-swift reads it)
        index = last_token_index(micro["segment_ids"], 0)
        return yes_no_score(params, pooled(h, index), cfg, task.yes_id, task.no_id)[:, None]
    return score_logits(params["score"], pooled(h, last_token_index(micro["tokens"], task.pad_token_id)))


def loss_sums(logits_BC, labels_BC, valid_B, task: Task):
    """(loss sum, count, metric sum) of one microbatch; the step divides both sums by the step's counts."""
    if task.kind == "seq_cls":
        return _seq_cls_sums(logits_BC, labels_BC, valid_B, task.problem_type)
    scores, targets = logits_BC[:, 0], labels_BC[:, 0]
    if not task.listwise:
        bce = jnp.logaddexp(0.0, scores) - targets * scores  # BCE with logits
        correct = ((scores > 0) == (targets > 0.5)).astype(jnp.float32)
        return jnp.sum(bce * valid_B), jnp.sum(valid_B), jnp.sum(correct * valid_B)
    G = task.group_size
    s_gG, v_gG = scores.reshape(-1, G) / task.temperature, valid_B.reshape(-1, G)
    masked = jnp.where(v_gG > 0, s_gG, -jnp.inf)
    ce = jax.nn.logsumexp(masked, axis=-1) - s_gG[:, 0]
    used = ((v_gG[:, 0] > 0) & (jnp.sum(v_gG, -1) >= task.min_group_size)).astype(jnp.float32)
    top1 = (jnp.argmax(masked, axis=-1) == 0).astype(jnp.float32)
    return jnp.sum(jnp.where(used > 0, ce, 0.0)), jnp.sum(used), jnp.sum(top1 * used)


def _seq_cls_sums(logits, labels, valid, problem_type: str):
    C = logits.shape[-1]
    if problem_type == "single_label_classification":
        ce = jax.nn.logsumexp(logits, -1) - jnp.sum(labels * logits, -1)
        correct = (jnp.argmax(logits, -1) == jnp.argmax(labels, -1)).astype(jnp.float32)
        return jnp.sum(ce * valid), jnp.sum(valid), jnp.sum(correct * valid)
    if problem_type == "multi_label_classification":  # torch's mean over every (row, label)
        bce = jnp.sum(jnp.logaddexp(0.0, logits) - labels * logits, -1)
        correct = jnp.sum(((logits > 0) == (labels > 0.5)).astype(jnp.float32), -1)
        return jnp.sum(bce * valid), jnp.sum(valid) * C, jnp.sum(correct * valid)
    se = jnp.sum((logits - labels) ** 2, -1)  # regression: MSE over every (row, label)
    return jnp.sum(se * valid), jnp.sum(valid) * C, jnp.sum(se * valid)


def micro_sums(params, micro, cfg, task: Task):
    return loss_sums(row_scores(params, micro, cfg, task), micro["labels"], micro["valid"][:, 0], task)


BATCH_KEYS = ("tokens", "segment_ids", "positions", "labels", "valid")


def make_classify_step(cfg, optimizer, task: Task, prepare_params: Callable | None = None) -> Callable:
    """(state, batch [A, B, T]) -> (state, metrics): the loss is the sum over all A microbatches divided by the
    step's count of rows (groups, for listwise), so any accumulation split gives the same update."""
    prepare = prepare_params or (lambda p, rng: p)

    def step(state, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        keys = jax.random.split(rng, batch["tokens"].shape[0])

        def one(carry, xs):
            micro, key = xs

            def loss_fn(t):
                total, count, metric = micro_sums(prepare(combine(t, state.frozen), key), micro, cfg, task)
                return total, (count, metric)

            (total, (count, metric)), grads = jax.value_and_grad(loss_fn, has_aux=True)(float_view(state.trainable))
            sums = (carry[0] + total, carry[1] + count, carry[2] + metric)
            return (*sums, jax.tree.map(jnp.add, carry[3], grads)), None

        zeros = jax.tree.map(jnp.zeros_like, float_view(state.trainable))
        init = (jnp.zeros((), jnp.float32),) * 3 + (zeros,)
        (total, count, metric, grads), _ = jax.lax.scan(one, init, ({k: batch[k] for k in BATCH_KEYS}, keys))
        denom = jnp.maximum(count, 1.0)
        loss = total / denom
        grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
        new_state, grad_norm, finite = guarded_update(state, grads, loss, optimizer, jax.random.fold_in(rng, 1 << 30))
        metrics = {"loss": loss, task.metric: metric / denom, "grad_norm": grad_norm,
                   "tokens": jnp.sum(batch["segment_ids"] > 0), "finite": finite,
                   "bad_streak": new_state.bad_streak, "skipped_steps": new_state.skipped_steps}
        return new_state, metrics

    return step


def make_evaluator(ctx: RunContext, state, task: Task, items, num_labels: int):
    """state -> {"loss", "acc" | "mse"} over the validation items."""
    def sums(params, batch):
        micro = {k: batch[k][0] for k in BATCH_KEYS}
        return micro_sums(params, micro, ctx.cfg, task)

    params_sharding = jax.tree.map(lambda x: x.sharding, state).params
    fn = compile_eval(ctx, sums, params_sharding)
    per_batch = ctx.args.per_device_eval_batch_size * ctx.dp

    def evaluate(step_state):
        params = float_view(step_state.params)
        total = count = metric = 0.0
        for batch in eval_batches(items, task, num_labels, per_batch, ctx.args.max_length):
            t, c, m = fn(params, ctx.put_whole(batch))
            total, count, metric = total + float(t), count + float(c), metric + float(m)
        return {"loss": total / max(count, 1.0), task.metric: metric / max(count, 1.0)}

    return evaluate


# --------------------------------------------------------------------------------------------- the run


def load_items(args, task: Task, head: ClassifierHead | None, tokenizer, log) -> tuple[list, list]:
    if tokenizer is None:
        raise ConfigError(f"{args.model}: the model has no tokenizer, which --task_type {args.task_type} needs")
    common = dict(max_length=args.max_length, truncation_strategy=args.truncation_strategy, system=args.system,
                  seed=args.seed)

    def read(specs):
        if task.kind == "seq_cls":
            return read_seq_cls_rows(specs, tokenizer, num_labels=head.num_labels, problem_type=head.problem_type,
                                     **common)
        return read_rerank_rows(specs, tokenizer, max_positives=reranker_env("MAX_POSITIVE_SAMPLES"),
                                max_negatives=task.group_size - 1, need_negatives=task.listwise, **common)

    train, stats = read(args.dataset)
    log(f"train data: {stats.summary()}")
    if args.val_dataset:
        val, val_stats = read(args.val_dataset)
        log(f"val data: {val_stats.summary()}")
    else:
        train, val = split_train_val(train, args.split_dataset_ratio, args.seed)
    if not train:
        raise DataError(f"--dataset {' '.join(args.dataset)}: no usable training example ({stats.summary()})")
    return train, val


def make_task(args, model, head: ClassifierHead | None) -> Task:
    if args.task_type == "seq_cls":
        return Task("seq_cls", head.problem_type, pad_token_id=head.pad_token_id)
    listwise = (args.loss_type or "pointwise_reranker") == "listwise_reranker"
    group = 1 + reranker_env("MAX_NEGATIVE_SAMPLES")
    yes_no = answer_token_ids(model.tokenizer) if args.task_type == "generative_reranker" else (-1, -1)
    return Task(args.task_type, listwise=listwise, group_size=group,
                pad_token_id=head.pad_token_id if head is not None else pad_id_of(model),
                temperature=float(reranker_env("LISTWISE_RERANKER_TEMPERATURE")),
                min_group_size=reranker_env("LISTWISE_RERANKER_MIN_GROUP_SIZE"), yes_id=yes_no[0], no_id=yes_no[1])


def run_classify(args, *, progress: bool = True) -> ClassifyResult:
    """`jaxswift sft --task_type seq_cls | reranker | generative_reranker`."""
    check_args(args)
    ctx = start_run(args)
    refuse_vision_language(ctx, f"--task_type {args.task_type}")
    messages: list[str] = [f"--task_type {args.task_type}: rows are not packed (each sequence is read at its own "
                           "last token); --packing applies to causal_lm"]
    head = None
    if args.task_type == "generative_reranker":
        if ctx.model.head is not None:
            raise ConfigError(f"--model {args.model}: a sequence-classification folder has no LM head; "
                              "generative_reranker scores with a causal LM's yes / no logits")
        params = ctx.model.params
    else:
        params, head = classifier_params(ctx, args)
        ctx = dataclasses.replace(ctx, cfg=seq_cls_body(ctx.cfg))
    task = make_task(args, ctx.model, head)
    num_labels = head.num_labels if head is not None else 1
    train_items, val_items = load_items(args, task, head, ctx.model.tokenizer, messages.append)
    ctx.model = dataclasses.replace(ctx.model, params=None)  # the train state holds the one copy from here on

    items_per_step = args.per_device_train_batch_size * ctx.dp * args.gradient_accumulation_steps
    steps_per_epoch = -(-len(train_items) // items_per_step)
    total_steps = total_steps_of(args, steps_per_epoch)
    optimizer, schedule = build_optimizer(args, total_steps, ctx.cfg)
    score = params.pop("score", None)
    tuned = prepare_tuner(params, args, ctx.cfg)
    if score is not None:  # the head always trains (PEFT's modules_to_save for SEQ_CLS)
        tuned = tuned._replace(params={**tuned.params, "score": score}, mask={**tuned.mask, "score": True})
    state, start_step = init_state(ctx, tuned, optimizer, messages)
    step = make_classify_step(ctx.cfg, optimizer, task, tuned.prepare)
    A = args.gradient_accumulation_steps
    feed = Feed(compile_step(ctx, step, state),
                step_batches(ctx, train_items, task, num_labels, items_per_step, A, total_steps),
                items_per_step * task.group_size, args.max_length, steps_per_epoch,
                make_evaluator(ctx, state, task, val_items, num_labels) if val_items else None)
    loop = train_loop(ctx, state, feed, total_steps=total_steps, start_step=start_step, schedule=schedule,
                      messages=messages, progress=progress)
    final = host_params(float_view(loop.state.params))
    export_dir = export_classifier(ctx, final, head, tuned.lora)
    plot_run(ctx)
    return ClassifyResult(loop.losses, loop.history, loop.eval_metrics, ctx.out_dir, export_dir, head,
                          int(jax.device_get(loop.state.skipped_steps)), loop.first_step_seconds)


def export_classifier(ctx: RunContext, params, head: ClassifierHead | None, lora_cfg) -> Path:
    """A classifier: an XxxForSequenceClassification folder (full) or a PEFT SEQ_CLS adapter with the score head
    (LoRA). The generative reranker: the causal LM as SFT exports it."""
    if head is None:
        return export_model(ctx, params, lora_cfg)
    path = ctx.out_dir / ("adapter" if lora_cfg is not None else "model")
    if not is_primary():
        return path
    tokenizer = ctx.model.tokenizer
    if lora_cfg is None:
        return save_seq_cls(params, ctx.cfg.replace(remat="none"), head, path, tokenizer=tokenizer)
    save_seq_cls_adapter(params, ctx.cfg, lora_cfg, head, path, base_model_name_or_path=ctx.args.model)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
