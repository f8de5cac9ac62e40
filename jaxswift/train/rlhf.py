"""The preference trainer: SFT's run (mesh, LoRA/full, checkpoints, logs, export) over preference items, with an
objective (`train.preference`) and a reference model.

Reference, by case: LoRA -> the same base with adapters off, inside the step (no second copy of the weights);
full tuning -> `--ref_model` (default: `--model`) loaded frozen beside the trained copy; `--precompute_ref_log_probs`
-> the reference scores every item once before training and is then dropped. CPO, SimPO, ORPO and RM need none.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from jaxswift.api import load_model
from jaxswift.checkpoints.safetensors_io import write_safetensors
from jaxswift.data.formats import split_train_val
from jaxswift.data.multimodal_preference import build_multimodal_preference_items
from jaxswift.data.preference import build_preference_items
from jaxswift.errors import ConfigError, DataError
from jaxswift.optim.qgalore import float_view
from jaxswift.parallel.distributed import is_primary
from jaxswift.train.gkd import run_gkd
from jaxswift.train.logging import append_record
from jaxswift.train.loop import (Feed, RunContext, compile_step, demo_answer, export_model, host_params, init_state,
                                 plot_run, start_run, total_steps_of, train_loop, TaskScorer, with_task_scores)
from jaxswift.train.preference import (evaluate_items, init_value_head, item_assembler, make_eval_fn, make_logps_fn,
                                       make_preference_step, objective_from_args, preference_plan, score_items)
from jaxswift.train.rlhf_args import RlhfArguments
from jaxswift.train.sft import MROPE_VLM_FAMILIES, check_vlm_run, grain_batches
from jaxswift.parallel.params import shard_params
from jaxswift.train.state import count_bytes
from jaxswift.train.tuning import TunedParams, build_optimizer, prepare_tuner

SAME_ARCHITECTURE = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "tie_word_embeddings", "qkv_bias", "qk_norm", "rope")
FINAL_EVAL_ITEMS = 512  # without a validation set, the final metrics are taken on this many training items


@dataclasses.dataclass
class RlhfResult:
    losses: dict[int, float]
    history: dict[int, dict[str, float]]  # every step's metrics: loss, rewards/*, logps/*, ...
    eval_metrics: dict[int, dict[str, float]]
    final_metrics: dict[str, float]  # the trained model on the validation set, else on the training items
    output_dir: Path
    export_dir: Path | None
    demo_before: str | None
    demo_after: str | None
    skipped_steps: int
    first_step_seconds: float
    state_bytes: int  # the train state: params (one copy of the base with LoRA), optimizer state, counters
    reference_bytes: int  # a separate reference model kept through training (full tuning without precompute)


def _load_items(args: RlhfArguments, obj, model, log):
    """(train, val) items: text pairs, or for a vision-language model image rows (data/multimodal_preference.py)."""
    kto = obj.kind == "kto"
    common = dict(kto=kto, kl_sequences=obj.seqs_per_item == 2, max_length=args.max_length,
                  truncation_strategy=args.truncation_strategy, loss_scale=args.loss_scale, system=args.system,
                  seed=args.seed)
    if model.is_vlm:
        if model.processor is None:
            raise ConfigError(f"{args.model}: the vision-language model has no tokenizer / processor files, which "
                              "preference training needs to encode chats with images")
        build, source = build_multimodal_preference_items, model.processor
    else:
        build, source = build_preference_items, model.tokenizer
    train, stats = build(args.dataset, source, **common)
    log(f"train data ({'labelled completions' if kto else 'pairs'}): {stats.summary()}")
    if args.val_dataset:
        val, val_stats = build(args.val_dataset, source, **common)
        log(f"val data: {val_stats.summary()}")
    else:
        train, val = split_train_val(train, args.split_dataset_ratio, args.seed)
    if not train:
        raise DataError(f"--dataset {' '.join(args.dataset)}: no usable training item ({stats.summary()})")
    return train, val


def preference_row_length(args: RlhfArguments, seqs_per_item: int, items) -> int:
    """Rows hold whole items. Packed: --packing_length, by default --max_length (as SFT) widened to the longest
    item; unpacked: room for one item at --max_length per sequence (batches are cut to their longest)."""
    if not args.packing:
        return seqs_per_item * args.max_length
    longest = max(len(i) for i in items)
    if args.packing_length is None:
        return max(args.max_length, longest)
    if longest > args.packing_length:
        raise ConfigError(f"--packing_length {args.packing_length} is shorter than an item of {longest} tokens (its "
                          f"sequences share one row); raise it to at least {longest}")
    return args.packing_length


def _reference_params(ctx, args: RlhfArguments, state, start_step: int):
    """Frozen reference params for full tuning (None with LoRA: adapters off). The initial policy itself when it
    is only needed to precompute before the first update; otherwise loaded from --ref_model."""
    if args.tuner_type == "lora":
        return None
    if args.precompute_ref_log_probs and args.ref_model == args.model and start_step == 0:
        return state.params
    ref = load_model(args.ref_model, dtype=args.dtype, load_tokenizer=False)
    if ctx.model.is_vlm:
        _check_same_vlm(ref, state, args)
        return shard_params(ref.params, ref.config, ctx.rules, ctx.mesh)
    differ = [f for f in SAME_ARCHITECTURE if getattr(ref.config, f) != getattr(ctx.cfg, f)]
    if differ:
        raise ConfigError(f"--ref_model {args.ref_model}: its {', '.join(differ)} differ from --model {args.model}'s; "
                          "the reference must have the same architecture and vocabulary")
    return shard_params(ref.params, ref.config, ctx.rules, ctx.mesh)


def _check_same_vlm(ref, state, args) -> None:
    """A vision-language reference must be the same architecture: its tower, aligner and LLM shapes."""
    if not ref.is_vlm:
        raise ConfigError(f"--ref_model {args.ref_model}: a text-only model cannot be the reference of the "
                          f"vision-language model {args.model}")
    shapes = lambda params: jax.tree.map(lambda x: tuple(x.shape), params)  # noqa: E731
    if shapes(ref.params) != shapes(float_view(state.params)):
        raise ConfigError(f"--ref_model {args.ref_model}: its tower, aligner or LLM shapes differ from --model "
                          f"{args.model}'s; the reference must have the same architecture and vocabulary")


def _bind(fn, ref_params):
    """fn(params, batch, [ref_params]) jitted -> params -> (batch -> result): for scoring and evaluation."""
    jitted = jax.jit(fn)
    extra = () if ref_params is None else (ref_params,)
    return lambda params: (lambda batch: jitted(params, batch, *extra))


@dataclasses.dataclass
class _Scoring:
    """How items are scored outside the train step (precompute, eval, final metrics): rows per batch, row length,
    and the placement of a batch on the mesh."""
    rows: int
    length: int
    put: Callable


def run_rlhf(args: RlhfArguments, *, progress: bool = True, task_scorer: TaskScorer | None = None) -> RlhfResult:
    """A preference run; `--rlhf_type gkd` is distillation, run by train.gkd (its result is a GkdResult)."""
    if args.rlhf_type == "gkd":
        if jax.process_count() > 1:  # its on-policy samples and teacher calls are per process so far
            raise ConfigError(f"--rlhf_type gkd runs in one process so far ({jax.process_count()} processes here); "
                              "the other --rlhf_type values (dpo, kto, cpo, simpo, orpo, rm) run multi-process")
        return run_gkd(args, progress=progress, task_scorer=task_scorer)
    ctx = start_run(args)
    if ctx.model.is_vlm:
        check_vlm_run(ctx, MROPE_VLM_FAMILIES, "rlhf")
    model, cfg, obj = ctx.model, ctx.cfg, objective_from_args(args)
    messages: list[str] = []
    train_items, val_items = _load_items(args, obj, model, messages.append)
    length = preference_row_length(args, obj.seqs_per_item, train_items + val_items)
    plan, slots = preference_plan(train_items, rows_per_step=args.per_device_train_batch_size * ctx.dp *
                                  args.gradient_accumulation_steps, micro_batches=args.gradient_accumulation_steps,
                                  length=length, packing=args.packing, seed=args.seed)
    total_steps = total_steps_of(args, plan.steps_per_epoch)
    optimizer, schedule = build_optimizer(args, total_steps, cfg)

    demo = (lambda p, c: None) if obj.value_head else \
        (lambda p, c: demo_answer(model, p, c, args.demo_question, args.demo_max_new_tokens))
    demo_before = demo(model.params, model.config)
    tuned = _tuned_params(model, args, cfg, obj)
    model = ctx.model = dataclasses.replace(model, params=None)  # the train state holds the one copy from here on
    state, start_step = init_state(ctx, tuned, optimizer, messages)

    reference = _reference_mode(args, obj)
    ref_params = _reference_params(ctx, args, state, start_step) if obj.needs_reference else None
    scoring = _Scoring(args.per_device_eval_batch_size * ctx.dp, length, ctx.put_whole)
    train_ref = val_ref = None
    if reference == "precomputed":
        train_ref, val_ref = _precompute(ctx, obj, train_items, val_items, state, ref_params, scoring, messages)
        ref_params = None  # dropped: training reads the scores
    messages.append(_reference_note(args, reference))

    step = make_preference_step(cfg, optimizer, obj, reference=reference, loss_chunk=args.loss_chunk_size,
                                prepare_params=tuned.prepare)
    eval_scorer = _bind(make_eval_fn(cfg, obj, reference=reference, loss_chunk=args.loss_chunk_size), ref_params)
    evaluate = (lambda s: evaluate_items(eval_scorer(float_view(s.params)), obj, val_items, scoring.rows, length,
                                         scoring.put, val_ref)) if val_items else None
    feed = Feed(compile_step(ctx, step, state, *(() if ref_params is None else (ref_params,))),
                grain_batches(ctx, plan, train_items, total_steps, item_assembler(slots, train_ref)),
                plan.rows_per_step, plan.length, plan.steps_per_epoch, with_task_scores(evaluate, ctx, task_scorer))
    loop = train_loop(ctx, state, feed, total_steps=total_steps, start_step=start_step, schedule=schedule,
                      messages=messages, progress=progress)
    final = _final_metrics(loop, obj, val_items, train_items, train_ref, eval_scorer, scoring, ctx.out_dir)
    reference_bytes = 0 if ref_params is None else count_bytes(ref_params)
    del ref_params

    final_params, export_dir = _export_model(ctx, loop.state, tuned.lora)
    plot_run(ctx)
    return RlhfResult(loop.losses, loop.history, loop.eval_metrics, final, ctx.out_dir, export_dir, demo_before,
                      demo(final_params, cfg), int(jax.device_get(loop.state.skipped_steps)),
                      loop.first_step_seconds, count_bytes(loop.state), reference_bytes)


def _tuned_params(model, args: RlhfArguments, cfg, obj) -> TunedParams:
    """prepare_tuner's params, plus a reward model's value head (trained in every tuner mode)."""
    tuned = prepare_tuner(model.params, args, cfg)
    if not obj.value_head:
        return tuned
    text_cfg = cfg.text if model.is_vlm else cfg
    return tuned._replace(params={**tuned.params, "value_head": init_value_head(text_cfg, args.seed)},
                          mask={**tuned.mask, "value_head": {"w": True, "b": True}})


def _export_model(ctx: RunContext, state, lora_cfg):
    """(final params without the value head, export folder): SFT's export, the value head saved beside it."""
    params = dict(host_params(float_view(state.params)))  # Q-GaLore's 8-bit weights back to floats
    head = params.pop("value_head", None)
    export_dir = export_model(ctx, params, lora_cfg)
    if head is not None and is_primary():
        _save_value_head(head, export_dir)
    return params, export_dir


def _reference_mode(args: RlhfArguments, obj) -> str:
    if not obj.needs_reference:
        return "none"
    if args.precompute_ref_log_probs:
        return "precomputed"
    return "adapters_off" if args.tuner_type == "lora" else "params"


def _reference_note(args: RlhfArguments, reference: str) -> str:
    return {"none": f"{args.rlhf_type}: no reference model",
            "adapters_off": "reference: the base model with adapters off (no second copy of the weights)",
            "params": f"reference: {args.ref_model}, frozen beside the trained copy",
            "precomputed": "reference: log-probs precomputed before training"}[reference]


def _precompute(ctx, obj, train_items, val_items, state, ref_params, scoring: _Scoring, messages):
    """(train, val) reference log-probs [items, S], scored once before training."""
    from jaxswift.tuners.lora import lora_disabled

    params = ref_params if ref_params is not None else lora_disabled(state.params)
    logps = jax.jit(make_logps_fn(ctx.cfg, obj, ctx.args.loss_chunk_size))
    score = lambda items: score_items(lambda b: logps(params, b), items, scoring.rows, scoring.length,  # noqa: E731
                                      scoring.put)
    t0 = time.perf_counter()
    train_ref = score(train_items)
    val_ref = score(val_items) if val_items else None
    messages.append(f"reference log-probs of {len(train_items) + len(val_items)} items precomputed in "
                    f"{time.perf_counter() - t0:.1f}s")
    return train_ref, val_ref


def _final_metrics(loop, obj, val_items, train_items, train_ref, eval_scorer, scoring: _Scoring,
                   out_dir: Path) -> dict:
    """The trained model's metrics: the last eval when there is a validation set, else on the training items (the
    first FINAL_EVAL_ITEMS), appended to logging.jsonl as split `train_items`."""
    if val_items:
        return loop.eval_metrics[max(loop.eval_metrics)] if loop.eval_metrics else {}
    items = train_items[:FINAL_EVAL_ITEMS]
    ref = None if train_ref is None else train_ref[:len(items)]
    metrics = evaluate_items(eval_scorer(float_view(loop.state.params)), obj, items, scoring.rows, scoring.length,
                             scoring.put,
                             ref)
    step = max(loop.losses, default=0)
    if is_primary():
        append_record(out_dir, {"step": step, "split": "train_items", "items": len(items), **metrics})
    return metrics


def _save_value_head(head: dict, export_dir: Path) -> Path:
    """value_head.safetensors beside the exported model, in TRL's value-head names (v_head.summary: Linear(D, 1))."""
    w = np.asarray(jax.device_get(head["w"]), np.float32)[None, :]
    b = np.asarray(jax.device_get(head["b"]), np.float32).reshape(1)
    path = Path(export_dir) / "value_head.safetensors"
    write_safetensors(path, {"v_head.summary.weight": w, "v_head.summary.bias": b})
    return path
