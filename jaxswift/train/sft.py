"""The SFT trainer: chats tokenized into memory-mapped caches, planned into packed (or bucketed) steps, fed by grain,
trained by the jitted NLL step on the skeleton of `train.loop`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from jaxswift.data.cache import Subset, cache_sft_dataset, split_indices
from jaxswift.data.multimodal_batch import assemble_multimodal, load_multimodal_rows
from jaxswift.data.packing import assemble
from jaxswift.data.pipeline import StepPlan, bucket_length, lengths_of, make_grain_loader
from jaxswift.errors import ConfigError, DataError
from jaxswift.optim.qgalore import float_view
from jaxswift.parallel.ring_attention import balanced_step
from jaxswift.train.args import SftArguments
from jaxswift.train.classify import run_classify
from jaxswift.train.embedding import check_embedding_flags, run_embedding
from jaxswift.train.loop import (Feed, RunContext, compile_eval, compile_step, demo_answer, export_model,
                                 host_params, init_state, plot_run, start_run, total_steps_of, train_loop,
                                 TaskScorer, with_task_scores)
from jaxswift.train.step import make_eval_step, make_train_step
from jaxswift.train.tuning import build_optimizer, prepare_tuner


@dataclasses.dataclass
class TrainResult:
    losses: dict[int, float]
    eval_losses: dict[int, float]
    output_dir: Path
    export_dir: Path | None
    demo_before: str | None
    demo_after: str | None
    skipped_steps: int
    first_step_seconds: float
    eval_metrics: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)  # step -> every metric


def load_sft_data(args: SftArguments, tokenizer, log_fn, cache_dir: Path):
    """(train, val): the datasets tokenized once into memory-mapped token caches under `cache_dir`, so a dataset
    larger than memory trains with only its offsets in RAM (each step reads just its rows)."""
    if tokenizer is None:
        raise ConfigError(f"{args.model}: the model has no tokenizer, which SFT needs to encode chats")
    common = dict(max_length=args.max_length, truncation_strategy=args.truncation_strategy,
                  loss_scale=args.loss_scale, system=args.system, seed=args.seed)
    cache_dir = cache_dir / f"process{jax.process_index()}"
    train, stats = cache_sft_dataset(args.dataset, tokenizer, cache_dir / "train", **common)
    log_fn(f"train data: {stats.summary()}")
    if args.val_dataset:
        val, val_stats = cache_sft_dataset(args.val_dataset, tokenizer, cache_dir / "val", **common)
        log_fn(f"val data: {val_stats.summary()}")
    else:
        train_idx, val_idx = split_indices(len(train), args.split_dataset_ratio, args.seed)
        train, val = Subset(train, train_idx), Subset(train, val_idx)
    if not len(train):
        raise DataError(f"--dataset {' '.join(args.dataset)}: no usable training example ({stats.summary()})")
    return train, val


def load_vlm_sft_data(args: SftArguments, model, log_fn):
    """(train, val) image rows of a vision-language model: kept in memory as rows, each decoded and patchified when
    grain reads it (data/multimodal_batch.py)."""
    if model.processor is None:
        raise ConfigError(f"{args.model}: the vision-language model has no tokenizer / processor files, which SFT "
                          "needs to encode chats with images")
    common = dict(max_length=args.max_length, truncation_strategy=args.truncation_strategy,
                  loss_scale=args.loss_scale, system=args.system, seed=args.seed)
    train, stats = load_multimodal_rows(args.dataset, model.processor, **common)
    log_fn(f"train data: {stats.summary()}")
    if args.val_dataset:
        val, val_stats = load_multimodal_rows(args.val_dataset, model.processor, **common)
        log_fn(f"val data: {val_stats.summary()}")
    else:
        train_idx, val_idx = split_indices(len(train), args.split_dataset_ratio, args.seed)
        train, val = train.subset(train_idx), train.subset(val_idx)
    if not len(train):
        raise DataError(f"--dataset {' '.join(args.dataset)}: no usable training example ({stats.summary()})")
    return train, val


# The families whose image rows the SFT data path encodes (data/multimodal.encode_multimodal_row), and those the
# preference and GRPO paths also take (their sequences carry M-RoPE positions: data/multimodal_preference.py).
SFT_VLM_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "idefics3", "smolvlm")
MROPE_VLM_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def check_vlm_run(ctx: RunContext, families: tuple[str, ...] = SFT_VLM_FAMILIES, trainer: str = "SFT") -> None:
    """What VLM training does not do yet, refused before anything is compiled."""
    args = ctx.args
    family = ctx.model.config.family
    if family not in families:
        raise ConfigError(f"--model {args.model}: {trainer} on image rows covers {', '.join(families)} so far; "
                          f"{family} models load, infer, serve, merge adapters and train with SFT")
    if jax.process_count() > 1:
        raise ConfigError("vision-language SFT runs in one process so far (each process would size its image "
                          "patches alone)")
    for axis in ("sequence", "stage"):
        if ctx.mesh.shape.get(axis, 1) > 1:
            raise ConfigError(f"--mesh: a {axis} axis > 1 is not supported for vision-language models yet "
                              "(data, fsdp and tensor axes are)")
    if args.eval_dataset:
        raise ConfigError("--eval_dataset: benchmark tasks score text models only so far; use --val_dataset or "
                          "--split_dataset_ratio for a vision-language model's validation loss")


def sft_plan(args: SftArguments, examples, dp: int) -> StepPlan:
    length = args.packing_length or args.max_length if args.packing else args.max_length
    return StepPlan(lengths_of(examples), rows_per_step=args.per_device_train_batch_size * dp *
                    args.gradient_accumulation_steps, length=length, packing=args.packing, seed=args.seed,
                    micro_batches=args.gradient_accumulation_steps)


def grain_batches(ctx: RunContext, plan: StepPlan, source, total_steps: int, assemble_fn=assemble):
    """start step -> grain's iterator over this process's rows of each step."""
    rows = ctx.rows(plan.rows_per_step // plan.micro_batches)
    return lambda start: iter(make_grain_loader(source, plan, num_steps=total_steps, start_step=start, rows=rows,
                                                assemble_fn=assemble_fn))


# The task types trained by train/classify.py (a score head or the LM's yes / no logits over each sequence).
CLASSIFY_TASK_TYPES = ("seq_cls", "reranker", "generative_reranker")


def check_task_type(args: SftArguments):
    """The embedding flags belong to --task_type embedding; embedding and the classifier tasks check the rest of
    their flags in their trainers; causal-LM SFT has no labels and no --loss_type."""
    check_embedding_flags(args)  # refused with any other task type
    if args.task_type == "embedding" or args.task_type in CLASSIFY_TASK_TYPES:
        return
    if args.num_labels is not None or args.problem_type is not None:
        raise ConfigError("--num_labels / --problem_type: need --task_type seq_cls")
    if args.loss_type is not None:
        raise ConfigError(f"--loss_type {args.loss_type}: --task_type causal_lm trains the language-model loss; "
                          "--loss_type names embedding and reranker losses")


def run_sft(args: SftArguments, *, progress: bool = True, task_scorer: TaskScorer | None = None) -> TrainResult:
    check_task_type(args)
    if args.task_type in CLASSIFY_TASK_TYPES:
        return run_classify(args, progress=progress)
    if args.task_type == "embedding":
        return run_embedding(args, progress=progress)
    ctx = start_run(args)
    model, cfg = ctx.model, ctx.cfg
    messages: list[str] = []
    if model.is_vlm:
        check_vlm_run(ctx)
        train_examples, val_examples = load_vlm_sft_data(args, model, messages.append)
    else:
        train_examples, val_examples = load_sft_data(args, model.tokenizer, messages.append,
                                                     ctx.out_dir / "data_cache")
    assemble_fn = assemble_multimodal if model.is_vlm else assemble
    plan = sft_plan(args, train_examples, ctx.dp)
    total_steps = total_steps_of(args, plan.steps_per_epoch)
    optimizer, schedule = build_optimizer(args, total_steps, cfg)

    demo_before = demo_answer(model, model.params, model.config, args.demo_question, args.demo_max_new_tokens)
    tuned = prepare_tuner(model.params, args, cfg)
    state, start_step = init_state(ctx, tuned, optimizer, messages)
    step_kwargs = {"loss_chunk": args.loss_chunk_size}
    if tuned.prepare is not None:
        step_kwargs["prepare_params"] = tuned.prepare
    lora_cfg = tuned.lora
    del tuned  # the train state holds the params from here on
    train_step = balanced_step(make_train_step(cfg, optimizer, **step_kwargs), ctx.mesh, ctx.parallel)
    feed = Feed(compile_step(ctx, train_step, state), grain_batches(ctx, plan, train_examples, total_steps, assemble_fn),
                plan.rows_per_step, plan.length, plan.steps_per_epoch,
                with_task_scores(sft_evaluator(ctx, state, val_examples) if len(val_examples) else None, ctx,
                                 task_scorer))

    loop = train_loop(ctx, state, feed, total_steps=total_steps, start_step=start_step, schedule=schedule,
                      messages=messages, progress=progress)
    final_params = host_params(float_view(loop.state.params))  # Q-GaLore's 8-bit weights back to floats
    export_dir = export_model(ctx, final_params, lora_cfg)
    plot_run(ctx)
    demo_after = demo_answer(model, final_params, cfg, args.demo_question, args.demo_max_new_tokens)
    eval_losses = {step: m["loss"] for step, m in loop.eval_metrics.items() if "loss" in m}
    return TrainResult(loop.losses, eval_losses, ctx.out_dir, export_dir, demo_before, demo_after,
                       int(jax.device_get(loop.state.skipped_steps)), loop.first_step_seconds, loop.eval_metrics)


def eval_batches(examples, batch_rows: int, max_length: int, assemble_fn=assemble):
    """Validation batches in order, one example per row, [1, B, T] (a single microbatch)."""
    lengths = lengths_of(examples)
    for start in range(0, len(examples), batch_rows):
        chunk = list(range(start, min(start + batch_rows, len(examples))))
        length = bucket_length(max(lengths[i] for i in chunk), max_length)
        batch = assemble_fn(examples, [[i] for i in chunk], length, batch_rows)
        yield {k: v[None] for k, v in batch.items()}


def sft_evaluator(ctx: RunContext, state, val_examples):
    """state -> {"loss": mean NLL over the validation tokens}."""
    eval_step = balanced_step(make_eval_step(ctx.cfg, loss_chunk=ctx.args.loss_chunk_size), ctx.mesh, ctx.parallel)
    params_sharding = jax.tree.map(lambda x: x.sharding, state).params
    eval_fn = compile_eval(ctx, eval_step, params_sharding)
    rows = ctx.args.per_device_eval_batch_size * ctx.dp

    def evaluate(step_state):
        nll = weight = 0.0
        assemble_fn = assemble_multimodal if ctx.model.is_vlm else assemble
        for batch in eval_batches(val_examples, rows, ctx.args.max_length, assemble_fn):
            n, w = eval_fn(step_state.params, ctx.put_whole(batch))
            nll, weight = nll + float(n), weight + float(w)
        return {"loss": nll / max(weight, 1.0)}

    return evaluate
