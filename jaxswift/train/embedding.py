"""`jaxswift sft --task_type embedding`: a decoder LM trained as a sentence-embedding model on the skeleton of
`train.loop`, with ms-swift's embedding losses (losses/embedding.py) over pooled vectors (models/pooling.py).

Each row brings an anchor, its positive and (infonce) hard negatives; a batch is [A, b, S, T] (S sequences per
row: anchor, positive, negatives), embedded as b*S sequences in one forward. InfoNCE's in-batch negatives are the
other rows of the same microbatch (all data-parallel devices together: the loss sees the global batch). The
loss of a step is the mean of its microbatches' losses.

The final model is the HF folder (full tuning) or PEFT adapter (LoRA) of `train.loop.export_model`, plus
sentence-transformers' `modules.json` and `1_Pooling/config.json` naming the pooling and the normalisation:
sentence-transformers loads the folder, and `jaxswift deploy` serves it on /v1/embeddings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxswift.data.cache import split_indices
from jaxswift.data.embedding import (EmbeddingRow, assemble_embedding_batch, batch_length, fix_negatives,
                                     load_embedding_rows, sequences_per_row)
from jaxswift.errors import ConfigError, DataError
from jaxswift.losses.embedding import LOSS_TYPES, PAIR_LOSSES, infonce_loss
from jaxswift.models.pooling import POOLINGS, embed
from jaxswift.optim.qgalore import float_view
from jaxswift.parallel.distributed import is_primary
from jaxswift.train.loop import (Feed, RunContext, compile_eval, compile_step, export_model, host_params,
                                 init_state, plot_run, refuse_vision_language, start_run, total_steps_of,
                                 train_loop)
from jaxswift.train.state import TrainState, combine
from jaxswift.train.step import guarded_update
from jaxswift.train.tuning import build_optimizer, prepare_tuner

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class EmbeddingOptions:
    loss_type: str = "infonce"
    pooling: str = "last"
    normalize: bool = True
    temperature: float = 0.1
    use_batch: bool = True
    hard_negatives: int | None = None
    fake_negative_margin: float | None = None  # None: no fake-negative masking
    include_qq: bool = False
    include_dd: bool = False


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    if value.strip().lower() not in _TRUE + _FALSE:
        raise ConfigError(f"${name}={value!r}: expected true or false")
    return value.strip().lower() in _TRUE


def _env_number(name: str, kind):
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"${name}={value!r}: expected a {kind.__name__}") from None


def _flag_or_env(args, flag: str, env: str, default, kind=None):
    """A flag's value; unset, its ms-swift environment variable's (a bool, or a number of `kind`); else default."""
    value = getattr(args, flag)
    if value is not None:
        return value
    if kind is None:
        return _env_bool(env, default)
    value = _env_number(env, kind)
    return default if value is None else value


def embedding_options(args) -> EmbeddingOptions:
    """The run's options: flags first, then ms-swift's environment variables (INFONCE_TEMPERATURE,
    INFONCE_USE_BATCH, INFONCE_HARD_NEGATIVES, INFONCE_MASK_FAKE_NEGATIVE, INFONCE_FAKE_NEG_MARGIN, INFONCE_INCLUDE_QQ,
    INFONCE_INCLUDE_DD), then ms-swift's defaults. Each checked, by name."""
    loss_type = args.loss_type or "infonce"
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"--loss_type {loss_type!r}: --task_type embedding trains with one of "
                          f"{' | '.join(LOSS_TYPES)}")
    pooling = args.embedding_pooling or "last"
    if pooling not in POOLINGS:
        raise ConfigError(f"--embedding_pooling {pooling!r}: expected one of {' | '.join(POOLINGS)}")
    base = EmbeddingOptions(loss_type, pooling, args.embedding_normalize is not False)
    if loss_type != "infonce":
        given = [n for n in INFONCE_FLAGS if getattr(args, n) is not None]
        if given:
            raise ConfigError(f"--{given[0]}: read by --loss_type infonce only (got {loss_type})")
        return base
    return _infonce_options(args, base)


def _infonce_options(args, base: EmbeddingOptions) -> EmbeddingOptions:
    temperature = _flag_or_env(args, "infonce_temperature", "INFONCE_TEMPERATURE", 0.1, float)
    if not temperature > 0:
        raise ConfigError(f"--infonce_temperature must be positive, got {temperature}")
    use_batch = _flag_or_env(args, "infonce_use_batch", "INFONCE_USE_BATCH", True)
    hard = _flag_or_env(args, "infonce_hard_negatives", "INFONCE_HARD_NEGATIVES", None, int)
    if hard is not None and hard < 1:
        raise ConfigError(f"--infonce_hard_negatives must be >= 1, got {hard}")
    mask_fake = _flag_or_env(args, "infonce_mask_fake_negative", "INFONCE_MASK_FAKE_NEGATIVE", False)
    if args.infonce_fake_neg_margin is not None and not mask_fake:
        raise ConfigError("--infonce_fake_neg_margin: needs --infonce_mask_fake_negative true")
    margin = _flag_or_env(args, "infonce_fake_neg_margin", "INFONCE_FAKE_NEG_MARGIN", 0.1, float)
    include_qq = _flag_or_env(args, "infonce_include_qq", "INFONCE_INCLUDE_QQ", False)
    include_dd = _flag_or_env(args, "infonce_include_dd", "INFONCE_INCLUDE_DD", False)
    if not use_batch and (mask_fake or include_qq or include_dd):
        raise ConfigError("--infonce_mask_fake_negative / --infonce_include_qq / --infonce_include_dd (or their "
                          "environment variables) act on in-batch negatives: they need --infonce_use_batch true")
    return dataclasses.replace(base, temperature=float(temperature), use_batch=bool(use_batch), hard_negatives=hard,
                               fake_negative_margin=float(margin) if mask_fake else None,
                               include_qq=bool(include_qq), include_dd=bool(include_dd))


INFONCE_FLAGS = ("infonce_temperature", "infonce_use_batch", "infonce_hard_negatives", "infonce_mask_fake_negative",
                 "infonce_fake_neg_margin", "infonce_include_qq", "infonce_include_dd")
EMBEDDING_FLAGS = ("embedding_pooling", "embedding_normalize", *INFONCE_FLAGS)


def check_embedding_flags(args) -> None:
    """The embedding flags, given with another task type: refused by name."""
    given = [n for n in EMBEDDING_FLAGS if getattr(args, n) is not None]
    if given and args.task_type != "embedding":
        raise ConfigError(f"--{given[0]}: needs --task_type embedding (got {args.task_type})")


def check_embedding_run(args) -> None:
    """The SFT flags an embedding run has no use for, refused by name (never silently ignored)."""
    unused = {"eval_dataset": "benchmark tasks score a chat model; the embedding eval is --val_dataset / "
                              "--split_dataset_ratio (loss, in-batch retrieval accuracy)",
              "packing_length": "embedding rows are padded per sequence, never packed",
              "system": "put a system message into the rows (it is prepended to that text, as Qwen3-Embedding's "
                        "template does)",
              "loss_scale": "the embedding losses weight sequences, not tokens",
              "loss_chunk_size": "it chunks the language-model cross-entropy, which an embedding run does not compute",
              "demo_max_new_tokens": "an embedding model has no chat demo",
              "router_aux_loss_coef": "the MoE auxiliary losses are not added to the embedding losses yet",
              "router_z_loss_coef": "the MoE auxiliary losses are not added to the embedding losses yet",
              "num_microbatches": "pipeline meshes are not supported by --task_type embedding yet",
              "virtual_stages": "pipeline meshes are not supported by --task_type embedding yet",
              "pipeline_schedule": "pipeline meshes are not supported by --task_type embedding yet",
              "ring_attention_layout": "sequence-parallel meshes are not supported by --task_type embedding yet",
              "sequence_parallel": "sequence-parallel meshes are not supported by --task_type embedding yet"}
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(args)}
    for name, why in unused.items():
        if getattr(args, name) != defaults[name]:
            raise ConfigError(f"--{name} is not used by --task_type embedding: {why}")


# ------------------------------------------------------------------------------------------------ the loss


def embedding_loss(params, micro: dict, cfg, opts: EmbeddingOptions):
    """(loss, metrics) of one microbatch {tokens, segment_ids: [b, S, T], doc_mask: [b, S], labels: [b, 1]}."""
    b, S, T = micro["tokens"].shape
    vectors = embed(params, micro["tokens"].reshape(b * S, T), micro["segment_ids"].reshape(b * S, T), cfg,
                    pooling=opts.pooling, normalize=opts.normalize).reshape(b, S, -1)
    if opts.loss_type == "infonce":
        return infonce_loss(vectors[:, 0], vectors[:, 1:], micro["doc_mask"][:, 1:], temperature=opts.temperature,
                            use_batch=opts.use_batch, fake_negative_margin=opts.fake_negative_margin,
                            include_qq=opts.include_qq, include_dd=opts.include_dd)
    loss = PAIR_LOSSES[opts.loss_type](vectors[:, 0], vectors[:, 1], micro["labels"][:, 0])
    cos = jnp.sum(vectors[:, 0] * vectors[:, 1], axis=-1) / jnp.maximum(
        jnp.linalg.norm(vectors[:, 0], axis=-1) * jnp.linalg.norm(vectors[:, 1], axis=-1), 1e-8)
    return loss, {"mean_cos": jnp.mean(cos)}


def make_embedding_step(cfg, optimizer: optax.GradientTransformation, opts: EmbeddingOptions,
                        prepare_params: Callable | None = None) -> Callable:
    """(state, batch [A, b, S, T]) -> (state, metrics): the mean of the A microbatches' losses and gradients."""
    prepare = prepare_params or (lambda p, rng: p)

    def micro_grads(trainable, frozen, micro, rng):
        def loss_fn(t):
            return embedding_loss(prepare(combine(t, frozen), rng), micro, cfg, opts)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(float_view(trainable))
        return loss, metrics, grads

    def step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        A = batch["tokens"].shape[0]
        micro_rngs = jax.random.split(rng, A)

        def accumulate(carry, xs):
            micro, key = xs
            loss, metrics, grads = micro_grads(state.trainable, state.frozen, micro, key)
            return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

        first = micro_grads(state.trainable, state.frozen, jax.tree.map(lambda a: a[0], batch), micro_rngs[0])
        if A > 1:
            rest = (jax.tree.map(lambda a: a[1:], batch), micro_rngs[1:])
            first, _ = jax.lax.scan(accumulate, first, rest)
        loss, metrics, grads = jax.tree.map(lambda x: x / A, first)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, float_view(state.trainable))
        new_state, grad_norm, finite = guarded_update(state, grads, loss, optimizer,
                                                      jax.random.fold_in(rng, 1 << 30))
        tokens = jnp.sum(batch["segment_ids"] > 0)
        return new_state, {"loss": loss, **metrics, "grad_norm": grad_norm, "tokens": tokens, "finite": finite,
                           "bad_streak": new_state.bad_streak, "skipped_steps": new_state.skipped_steps}

    return step


# ------------------------------------------------------------------------------------------------ the data


@dataclasses.dataclass
class EmbeddingData:
    train: list[EmbeddingRow]
    val: list[EmbeddingRow]
    seqs: int  # S: sequences per row
    length: int  # T: tokens per sequence


def load_data(args, tokenizer, opts: EmbeddingOptions, log_fn) -> EmbeddingData:
    if tokenizer is None:
        raise ConfigError(f"{args.model}: the model has no tokenizer, which an embedding run needs")
    common = dict(loss_type=opts.loss_type, max_length=args.max_length,
                  truncation_strategy=args.truncation_strategy, seed=args.seed)
    train, stats = load_embedding_rows(args.dataset, tokenizer, **common)
    log_fn(f"train data: {stats.summary()}")
    if args.val_dataset:
        val, val_stats = load_embedding_rows(args.val_dataset, tokenizer, **common)
        log_fn(f"val data: {val_stats.summary()}")
    else:
        train_idx, val_idx = split_indices(len(train), args.split_dataset_ratio, args.seed)
        train, val = [train[i] for i in train_idx], [train[i] for i in val_idx]
    if not train:
        raise DataError(f"--dataset {' '.join(args.dataset)}: no usable training row ({stats.summary()})")
    if opts.hard_negatives is not None:
        train, val = fix_negatives(train, opts.hard_negatives, args.seed), fix_negatives(val, opts.hard_negatives,
                                                                                         args.seed + 1)
    if opts.loss_type == "infonce" and not opts.use_batch:
        bare = next((r for r in train + val if not r.negatives), None)
        if bare is not None:
            raise DataError(f"{bare.where}: --infonce_use_batch false compares each anchor with its own positive and "
                            "hard negatives only, and this row has no negative_messages")
    seqs = sequences_per_row(train + val)
    return EmbeddingData(train, val, seqs, batch_length(train + val, args.max_length))


def batch_iterator(ctx: RunContext, data: EmbeddingData, rows_per_step: int, micro: int, total_steps: int):
    """start step -> this process's [A, b, ...] host batches: each epoch a seeded permutation of the rows, cut into
    whole steps (the remainder of an epoch is dropped, so every step has the same shape)."""
    steps_per_epoch = len(data.train) // rows_per_step
    first, last = ctx.rows(rows_per_step // micro)

    def batches(start: int):
        for step in range(start, total_steps):
            epoch, k = divmod(step, steps_per_epoch)
            order = np.random.default_rng(ctx.args.seed + epoch).permutation(len(data.train))
            chosen = order[k * rows_per_step:(k + 1) * rows_per_step].reshape(micro, -1)
            micros = [assemble_embedding_batch([data.train[i] for i in rows[first:last]], data.seqs, data.length)
                      for rows in chosen]
            yield {key: np.stack([m[key] for m in micros]) for key in micros[0]}

    return batches


def embedding_evaluator(ctx: RunContext, state, data: EmbeddingData, opts: EmbeddingOptions):
    """state -> {loss, and the loss's metrics}: means over the validation set's whole batches of
    --per_device_eval_batch_size x data-parallel rows (in-batch negatives are that batch's rows)."""
    rows = ctx.args.per_device_eval_batch_size * ctx.dp
    if len(data.val) < rows:
        raise ConfigError(f"validation: {len(data.val)} rows, fewer than one eval batch of {rows} "
                          "(--per_device_eval_batch_size x data-parallel ways); give more or a smaller batch")
    params_sharding = jax.tree.map(lambda x: x.sharding, state).params
    eval_fn = compile_eval(ctx, lambda p, b: embedding_loss(float_view(p), jax.tree.map(lambda a: a[0], b),
                                                            ctx.cfg, opts), params_sharding)

    def evaluate(step_state) -> dict:
        totals: dict[str, float] = {}
        n = len(data.val) // rows
        for k in range(n):
            batch = assemble_embedding_batch(data.val[k * rows:(k + 1) * rows], data.seqs, data.length)
            loss, metrics = eval_fn(step_state.params, ctx.put_whole({key: v[None] for key, v in batch.items()}))
            for key, v in {"loss": loss, **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(v) / n
        return totals

    return evaluate


# ------------------------------------------------------------------------------------------------ export


def write_pooling_marker(folder: Path, opts: EmbeddingOptions, hidden_size: int) -> None:
    """sentence-transformers' module list and pooling config: the folder says how its vectors are made."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if opts.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": hidden_size, "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": opts.pooling == "mean", "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
               "pooling_mode_lasttoken": opts.pooling == "last", "include_prompt": True}
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))


# ------------------------------------------------------------------------------------------------ the run


@dataclasses.dataclass
class EmbeddingResult:
    losses: dict[int, float]
    eval_metrics: dict[int, dict[str, float]]
    output_dir: Path
    export_dir: Path | None
    options: EmbeddingOptions
    skipped_steps: int
    first_step_seconds: float
    demo_before: None = None  # no chat demo: print_outcome prints only where the model went
    demo_after: None = None

    @property
    def eval_losses(self) -> dict[int, float]:
        return {step: m["loss"] for step, m in self.eval_metrics.items() if "loss" in m}


def run_embedding(args, *, progress: bool = True) -> EmbeddingResult:
    check_embedding_run(args)
    opts = embedding_options(args)
    ctx = start_run(args)
    refuse_vision_language(ctx, "--task_type embedding")
    for axis in ("sequence", "stage"):
        if ctx.mesh.shape.get(axis, 1) > 1:
            raise ConfigError(f"--mesh: a {axis} axis > 1 is not supported by --task_type embedding yet (data, fsdp "
                              "and tensor axes are)")
    messages: list[str] = [f"embedding: loss {opts.loss_type}, pooling {opts.pooling}"
                           f"{' + L2 normalisation' if opts.normalize else ''}"
                           + (f", temperature {opts.temperature}, in-batch negatives {opts.use_batch}"
                              if opts.loss_type == "infonce" else "")]
    data = load_data(args, ctx.model.tokenizer, opts, messages.append)
    micro = args.gradient_accumulation_steps
    rows_per_step = args.per_device_train_batch_size * ctx.dp * micro
    if len(data.train) < rows_per_step:
        raise ConfigError(f"--dataset: {len(data.train)} training rows, fewer than one step's {rows_per_step} "
                          "(batch size x data-parallel ways x accumulation)")
    steps_per_epoch = len(data.train) // rows_per_step
    total_steps = total_steps_of(args, steps_per_epoch)
    optimizer, schedule = build_optimizer(args, total_steps, ctx.cfg)
    tuned = prepare_tuner(ctx.model.params, args, ctx.cfg)
    state, start_step = init_state(ctx, tuned, optimizer, messages)
    lora_cfg = tuned.lora
    step = make_embedding_step(ctx.cfg, optimizer, opts, tuned.prepare)
    del tuned
    evaluate = embedding_evaluator(ctx, state, data, opts) if data.val else None
    feed = Feed(compile_step(ctx, step, state), batch_iterator(ctx, data, rows_per_step, micro, total_steps),
                rows_per_step, data.length, steps_per_epoch, evaluate)
    loop = train_loop(ctx, state, feed, total_steps=total_steps, start_step=start_step, schedule=schedule,
                      messages=messages, progress=progress)
    final_params = host_params(float_view(loop.state.params))
    export_dir = export_model(ctx, final_params, lora_cfg)
    if is_primary():
        write_pooling_marker(export_dir, opts, ctx.cfg.hidden_size)
    plot_run(ctx)
    return EmbeddingResult(loop.losses, loop.eval_metrics, ctx.out_dir, export_dir, opts,
                           int(jax.device_get(loop.state.skipped_steps)), loop.first_step_seconds)
