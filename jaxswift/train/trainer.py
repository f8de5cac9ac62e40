"""The SFT trainer: data -> sharded train state -> jitted, donated steps -> logs, checkpoints, exports."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxswift.api import Model, chat, load_model
from jaxswift.checkpoints.hf import save_hf
from jaxswift.checkpoints.state import StateCheckpointer, resolve_resume, restore_state
from jaxswift.data.cache import Subset, cache_sft_dataset, split_indices
from jaxswift.errors import ConfigError, DataError, JaxswiftError
from jaxswift.models.families import weight_maps
from jaxswift.models.spec import param_specs
from jaxswift.optim.factory import OptimizerConfig, make_optimizer
from jaxswift.optim.qgalore import float_view
from jaxswift.parallel.distributed import gather_to_host, is_primary, put_global_batch
from jaxswift.parallel.mesh import make_mesh
from jaxswift.parallel.ring_attention import balanced_step
from jaxswift.parallel.rules import activation_sharding, data_parallel_size, partition_spec, rules_for_mesh
from jaxswift.parallel.strategies import ParallelOptions
from jaxswift.train.args import SftArguments
from jaxswift.train.batches import StepPlan, eval_batches
from jaxswift.train.logging import RunLogger, plot_loss
from jaxswift.train.state import init_train_state
from jaxswift.train.step import make_eval_step, make_train_step

log = logging.getLogger("jaxswift.train")


class TrainingStopped(JaxswiftError):
    """Training cannot go on (for example: too many non-finite steps in a row)."""


# ---------------------------------------------------------------------------------------------------------------
# params: tuner, trainable mask, shardings


def _param_paths(cfg) -> dict[tuple, tuple[str, str]]:
    """Our path -> (dotted name, HF name without the layer index), the names freeze patterns match against."""
    hf = {m.path: m.hf_name.replace("layers.{i}.", "layers.") for m in weight_maps(cfg)}
    return {path: (".".join(path), name) for path, name in hf.items()}


def full_tuning_mask(params, cfg, freeze: list[str], trainable: list[str]):
    """True for trainable leaves: everything, minus --freeze_parameters, plus --trainable_parameters."""
    names = _param_paths(cfg)
    for pattern in freeze + trainable:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"parameter pattern {pattern!r}: invalid regex ({e})") from None
        if not any(re.search(pattern, n) for pair in names.values() for n in pair):
            raise ConfigError(f"parameter pattern {pattern!r} matches no parameter (names look like "
                              f"{', '.join(sorted(n for n, _ in names.values())[:4])}, or HF names like "
                              f"model.layers.self_attn.q_proj.weight)")

    def decide(path, _):
        key = tuple(k.key for k in path)
        pair = names.get(key, (".".join(key), ""))
        frozen = any(re.search(p, n) for p in freeze for n in pair)
        forced = any(re.search(p, n) for p in trainable for n in pair)
        return forced or not frozen

    return jax.tree_util.tree_map_with_path(decide, params)


def param_logical_axes(params, cfg):
    """Logical axes for every leaf: the spec's where the leaf has the spec's shape (a base weight, plain or inside
    an adapter); adapters' small factors are replicated."""
    specs = param_specs(cfg)

    def axes(path, leaf):
        node = specs
        for k in path:
            name = getattr(k, "key", None)
            if isinstance(node, dict) and name in node:
                node = node[name]
        if hasattr(node, "shape") and tuple(node.shape) == tuple(leaf.shape):
            return node.logical_axes
        return (None,) * leaf.ndim

    return jax.tree_util.tree_map_with_path(axes, params)


def tree_shardings(tree, cfg, rules, mesh):
    """NamedShardings for a params tree or a whole train state: a leaf with the shape of a parameter (the param, a
    LoRA base, the optimizer's moments of it) takes that parameter's logical axes through the rule table (so fsdp
    shards weights and optimizer state alike); other leaves (adapters, low-rank moments, counters) are replicated."""
    leaves, treedef = jax.tree.flatten(tree)
    axes = treedef.flatten_up_to(param_logical_axes(tree, cfg))
    return treedef.unflatten(NamedSharding(mesh, partition_spec(a, x.shape, rules.params, mesh))
                             for a, x in zip(axes, leaves))


def shard_params(params, cfg, rules, mesh):
    return jax.tree.map(jax.device_put, params, tree_shardings(params, cfg, rules, mesh))


def _target_modules(values: list[str]):
    """--target_modules all-linear | q_proj v_proj ... | one regex (as peft reads a single string)."""
    if values == ["all-linear"]:
        return "all-linear"
    if len(values) == 1 and re.search(r"[\\^$*+?()\[\]|]", values[0]):
        return values[0]
    return tuple(values)


def prepare_tuner(model: Model, args: SftArguments, cfg):
    """(params, trainable mask, lora config or None, prepare_params for the step)."""
    if args.tuner_type == "full":
        mask = full_tuning_mask(model.params, cfg, args.freeze_parameters, args.trainable_parameters)
        if not any(jax.tree.leaves(mask)):
            raise ConfigError("--freeze_parameters froze every parameter: nothing to train")
        if args.galore_quantization:  # Q-GaLore: the projected matrices kept as 8-bit codes
            from jaxswift.optim.qgalore import quantize_weights

            params = quantize_weights(model.params, galore_targets(cfg, args.galore_target_modules)(model.params),
                                      args.galore_weight_group_size)
            return params, jax.tree.map(lambda m, p: jax.tree.map(lambda _: m, p), mask, params), None, None
        return model.params, mask, None, None
    from jaxswift.tuners import lora

    lora_cfg = lora.LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                               target_modules=_target_modules(args.target_modules),
                               use_rslora=args.use_rslora, use_dora=args.use_dora, init=args.init_weights)
    base = model.params
    if args.quant_method is not None:  # QLoRA: the frozen projections stored quantized, adapters in float32
        from jaxswift.quant.nf4 import quantize_params

        base = quantize_params(base, cfg, args.quant_method)
    params = lora.add_lora(base, cfg, lora_cfg, jax.random.key(args.seed))
    return params, lora.trainable_mask(params), lora_cfg, (lora.with_dropout if args.lora_dropout > 0 else None)


# ---------------------------------------------------------------------------------------------------------------
# the run


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


def _demo(model: Model, params, cfg, question: str, max_new_tokens: int) -> str | None:
    if not question or model.tokenizer is None:
        return None
    return chat(dataclasses.replace(model, params=params, config=cfg), [{"role": "user", "content": question}],
                max_new_tokens=max_new_tokens)


def _load_data(args: SftArguments, tokenizer, log_fn, cache_dir: Path):
    """(train, val, stats): the datasets tokenized once into memory-mapped token caches under `cache_dir`, so a
    dataset larger than memory trains with only its offsets in RAM (each step reads just its rows)."""
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
    return train, val, stats


def _total_steps(args: SftArguments, plan: StepPlan) -> int:
    return args.max_steps if args.max_steps > 0 else args.num_train_epochs * plan.steps_per_epoch


def _batch_sharding(mesh, rules):
    axes = tuple(a for a in rules.activations.get("batch", ()) if mesh.shape[a] > 1)
    entry = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, PartitionSpec(None, entry, None))


@dataclasses.dataclass
class RunContext:
    """What every training recipe sets up first: output folder, mesh, sharding rules, the model."""

    args: SftArguments
    out_dir: Path
    mesh: Any
    rules: Any
    dp: int  # data-parallel ways (data x fsdp): rows per step = per-device batch x dp x accumulation
    model: Model
    cfg: Any  # the model config with the run's remat policy

    @property
    def batch_sharding(self):
        return _batch_sharding(self.mesh, self.rules)

    @property
    def parallel(self) -> ParallelOptions:
        return ParallelOptions.from_args(self.args)


def moe_overrides(cfg, args: SftArguments):
    """The MoE flags over the model's config (an error on a dense model: the flags would do nothing)."""
    given = {k: getattr(args, k) for k in ("router_aux_loss_coef", "router_z_loss_coef", "moe_expert_capacity_factor")
             if getattr(args, k, None) is not None}
    if not given:
        return cfg
    if not cfg.is_moe:
        raise ConfigError(f"{', '.join('--' + k for k in given)}: the model ({cfg.family}) has no experts")
    changes = {}
    if "router_aux_loss_coef" in given:
        changes.update(router_aux_loss_coef=given["router_aux_loss_coef"],
                       output_router_logits=given["router_aux_loss_coef"] > 0)
    if "router_z_loss_coef" in given:
        changes["router_z_loss_coef"] = given["router_z_loss_coef"]
    if "moe_expert_capacity_factor" in given:
        changes["capacity_factor"] = given["moe_expert_capacity_factor"]
    return cfg.replace(**changes)


def start_run(args: SftArguments) -> RunContext:
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_primary():
        (out_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    mesh = make_mesh(args.mesh)
    rules = rules_for_mesh(args.sharding_rules, mesh)
    model = load_model(args.model, dtype=args.dtype)
    cfg = moe_overrides(model.config.replace(remat="full" if args.gradient_checkpointing else "none"), args)
    return RunContext(args, out_dir, mesh, rules, data_parallel_size(rules, mesh), model, cfg)


def build_optimizer(args: SftArguments, total_steps: int, cfg=None):
    """AdamW, or with --use_galore GaLore-AdamW (Q-GaLore with --galore_quantization) on the model `cfg`'s
    --galore_target_modules and AdamW on the rest."""
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
    galore = {k: getattr(args, k) for k in ("use_galore", "galore_rank", "galore_update_interval", "galore_scale",
                                            "galore_quantization", "galore_proj_bits", "galore_proj_group_size",
                                            "galore_cos_threshold", "galore_gamma_proj", "galore_queue_size")}
    mask = galore_targets(cfg, args.galore_target_modules) if args.use_galore else None
    return make_optimizer(OptimizerConfig(
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_epsilon=args.adam_epsilon, max_grad_norm=args.max_grad_norm,
        lr_scheduler_type=args.lr_scheduler_type, warmup_steps=warmup, **galore), total_steps, galore_mask=mask)


def galore_targets(cfg, target_modules: list[str]):
    """params -> per leaf a galore.Matrix on the targeted projections (all-linear: attention + MLP), False elsewhere
    (embeddings, norms, lm_head: AdamW). A callable, so frozen holes (None) in the trainable tree stay holes."""
    from jaxswift.optim.galore import galore_mask_for
    from jaxswift.tuners.lora import resolve_targets

    if cfg is None:
        raise ConfigError("--use_galore: build_optimizer needs the model config to find the target matrices")
    try:
        names = set(resolve_targets(cfg, _target_modules(target_modules)))
    except ConfigError as e:
        raise ConfigError(f"--galore_target_modules: {e}") from None
    layouts = galore_mask_for(cfg)["layers"]

    def mask(params):
        def one(path, _):
            keys = [getattr(k, "key", None) for k in path]
            return layouts[keys[1]] if keys[0] == "layers" and keys[-1] in names else False
        return jax.tree_util.tree_map_with_path(one, params)

    return mask


def init_state(ctx: RunContext, params, mask, optimizer, messages: list[str]):
    """(sharded train state, start step): fresh, or restored from --resume_from_checkpoint."""
    params = shard_params(params, ctx.cfg, ctx.rules, ctx.mesh)
    init = lambda p: init_train_state(p, mask, optimizer, ctx.args.seed)  # noqa: E731
    shardings = tree_shardings(jax.eval_shape(init, params), ctx.cfg, ctx.rules, ctx.mesh)
    state = jax.jit(init, out_shardings=shardings)(params)
    del params
    if not ctx.args.resume_from_checkpoint:
        return state, 0
    root, step = resolve_resume(ctx.args.resume_from_checkpoint, ctx.out_dir)
    state, _ = restore_state(root, step, state)
    start_step = int(jax.device_get(state.step))
    messages.append(f"resumed from {root / str(step)} at step {start_step}")
    return state, start_step


def compile_step(ctx: RunContext, step, state, *extra):
    """step(state, batch, *extra) jitted with the state's shardings, the batch sharded over data, the state donated;
    returns fn(state, batch). `extra` (e.g. a frozen reference model) is passed on every call, never donated."""
    def traced(s, b, *e):
        with activation_sharding(ctx.rules, ctx.mesh, ctx.parallel):
            return step(s, b, *e)

    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    extra_sharding = jax.tree.map(lambda x: x.sharding, extra)
    fn = jax.jit(traced, in_shardings=(state_sharding, ctx.batch_sharding, *extra_sharding),
                 out_shardings=(state_sharding, None), donate_argnums=0)
    return lambda s, b: fn(s, b, *extra)


# Metrics logged as their latest value; every other metric is averaged over the logging window.
LATEST_METRICS = ("grad_norm", "tokens", "loss_tokens", "skipped_steps")
CONTROL_METRICS = ("finite", "bad_streak")


@dataclasses.dataclass
class LoopResult:
    state: Any
    losses: dict[int, float]
    history: dict[int, dict[str, float]]  # every finite step's metrics
    eval_metrics: dict[int, dict[str, float]]
    first_step_seconds: float


def _window_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]  # e.g. a KTO step without undesirable examples gives NaN
    return sum(finite) / len(finite) if finite else float("nan")


def train_loop(ctx: RunContext, state, step_fn, plan: StepPlan, *, total_steps: int, start_step: int, schedule,
               evaluate=None, messages=(), progress: bool = True) -> LoopResult:
    """Steps start_step+1 .. total_steps: metrics read one step behind, logs, eval every --eval_steps (when
    `evaluate(state) -> dict` is given), checkpoints every --save_steps and at the end."""
    args = ctx.args
    logger = RunLogger(ctx.out_dir, total_steps, start_step, enable_bar=progress and not args.disable_tqdm,
                       write_files=is_primary())
    for m in messages:
        logger.write(m)
    logger.write(f"{total_steps} steps x {plan.rows_per_step} rows of {plan.length} tokens "
                 f"({plan.steps_per_epoch} steps/epoch); mesh "
                 f"{' x '.join(f'{k}={v}' for k, v in ctx.mesh.shape.items() if v > 1) or 'single device'}")
    checkpointer = StateCheckpointer(ctx.out_dir, args.save_total_limit)
    losses, history, evals = {}, {}, {}
    window: dict[str, list[float]] = {}
    first_step_seconds = 0.0
    pending = None  # (step, metrics, t0): read one step behind so the host never stalls the device

    def consume(step_no, metrics, started):
        nonlocal first_step_seconds
        metrics = jax.device_get(metrics)
        loss = float(metrics["loss"])
        if step_no == start_step + 1:
            first_step_seconds = time.perf_counter() - started
            logger.write(f"first step (compile + run): {first_step_seconds:.1f}s")
        if not metrics["finite"]:
            logger.write(f"step {step_no}: non-finite loss or gradient, update skipped "
                         f"({int(metrics['bad_streak'])} in a row)")
            if int(metrics["bad_streak"]) >= args.max_nonfinite_steps:
                raise TrainingStopped(f"stopped at step {step_no}: {int(metrics['bad_streak'])} non-finite steps in "
                                      f"a row (lower --learning_rate, check the data, or use --dtype float32)")
            return
        losses[step_no] = loss
        record = {k: float(v) for k, v in metrics.items() if k not in CONTROL_METRICS}
        history[step_no] = record
        for k, v in record.items():
            if k not in LATEST_METRICS:
                window.setdefault(k, []).append(v)
        lr = float(schedule(step_no - 1))
        logger.advance(step_no, loss, lr, float(metrics["tokens"]))
        if step_no == start_step + 1:
            logger.restart_clock()  # tokens/s and ETA from here on exclude compilation
        if step_no % args.logging_steps == 0 or step_no == total_steps:
            elapsed = time.perf_counter() - logger.start
            logged = {k: _window_mean(v) for k, v in window.items()}
            logged.update({"lr": lr, **{k: record[k] for k in LATEST_METRICS if k in record},
                           "tokens_per_s": logger.tokens / max(elapsed, 1e-9)})
            logger.log(step_no, logged)
            window.clear()

    def run_eval(step_no, announce: bool):
        evals[step_no] = evaluate(state)
        logger.log(step_no, evals[step_no], prefix="eval")
        if announce:
            logger.write(f"step {step_no}: eval " + ", ".join(f"{k} {v:.4f}" for k, v in evals[step_no].items()))

    batches = plan.batches(start_step)
    t0 = time.perf_counter()
    try:
        for step_no in range(start_step + 1, total_steps + 1):
            batch = put_global_batch(next(batches), ctx.batch_sharding)
            state, metrics = step_fn(state, batch)
            if pending is not None:
                consume(*pending)
            pending = (step_no, metrics, t0)
            if step_no % args.eval_steps == 0 and evaluate is not None:
                consume(*pending)
                pending = None
                run_eval(step_no, announce=True)
            if step_no % args.save_steps == 0 and step_no != total_steps:
                checkpointer.save(state, {"step": step_no, "args": dataclasses.asdict(args)})
        if pending is not None:
            consume(*pending)
        if evaluate is not None and total_steps not in evals:
            run_eval(total_steps, announce=False)
        if total_steps > start_step:
            checkpointer.save(state, {"step": total_steps, "args": dataclasses.asdict(args)})
    finally:
        logger.close()
        checkpointer.close()
    return LoopResult(state, losses, history, evals, first_step_seconds)


def run_sft(args: SftArguments, *, progress: bool = True) -> TrainResult:
    ctx = start_run(args)
    model, cfg = ctx.model, ctx.cfg
    messages = []
    train_examples, val_examples, _ = _load_data(args, model.tokenizer, messages.append, ctx.out_dir / "data_cache")
    length = args.packing_length or args.max_length if args.packing else args.max_length
    plan = StepPlan(train_examples, rows_per_step=args.per_device_train_batch_size * ctx.dp *
                    args.gradient_accumulation_steps, micro_batches=args.gradient_accumulation_steps,
                    length=length, packing=args.packing, seed=args.seed)
    total_steps = _total_steps(args, plan)
    optimizer, schedule = build_optimizer(args, total_steps, cfg)

    demo_before = _demo(model, model.params, model.config, args.demo_question, args.demo_max_new_tokens)
    params, mask, lora_cfg, prepare = prepare_tuner(model, args, cfg)
    state, start_step = init_state(ctx, params, mask, optimizer, messages)
    del params

    step_kwargs = {"loss_chunk": args.loss_chunk_size}
    if prepare is not None:
        step_kwargs["prepare_params"] = prepare
    train_step = balanced_step(make_train_step(cfg, optimizer, **step_kwargs), ctx.mesh, ctx.parallel)
    step_fn = compile_step(ctx, train_step, state)
    evaluate = _sft_evaluator(ctx, state, val_examples) if val_examples else None

    loop = train_loop(ctx, state, step_fn, plan, total_steps=total_steps, start_step=start_step,
                      schedule=schedule, evaluate=evaluate, messages=messages, progress=progress)
    final_params = float_view(loop.state.params)  # Q-GaLore's 8-bit weights back to floats for the export
    final_params = gather_to_host(final_params)  # multi-process: every process gets the whole model
    export_dir = _export(model, final_params, cfg, lora_cfg, args, ctx.out_dir)
    if is_primary():
        plot_loss(ctx.out_dir / "logging.jsonl", ctx.out_dir / "loss.png")
    demo_after = _demo(model, final_params, cfg, args.demo_question, args.demo_max_new_tokens)
    eval_losses = {step: m["loss"] for step, m in loop.eval_metrics.items()}
    return TrainResult(loop.losses, eval_losses, ctx.out_dir, export_dir, demo_before, demo_after,
                       int(jax.device_get(loop.state.skipped_steps)), loop.first_step_seconds)


def _sft_evaluator(ctx: RunContext, state, val_examples):
    """state -> {"loss": mean NLL over the validation tokens}."""
    eval_step = balanced_step(make_eval_step(ctx.cfg, loss_chunk=ctx.args.loss_chunk_size), ctx.mesh, ctx.parallel)

    def traced_eval(p, b):
        with activation_sharding(ctx.rules, ctx.mesh, ctx.parallel):
            return eval_step(p, b)

    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    eval_fn = jax.jit(traced_eval, in_shardings=(state_sharding.params, ctx.batch_sharding))

    def evaluate(step_state):
        nll = weight = 0.0
        for batch in eval_batches(val_examples, ctx.args.per_device_eval_batch_size * ctx.dp, ctx.args.max_length):
            n, w = eval_fn(step_state.params, put_global_batch(batch, ctx.batch_sharding))
            nll, weight = nll + float(n), weight + float(w)
        return {"loss": nll / max(weight, 1.0)}

    return evaluate


def _export(model: Model, params, cfg, lora_cfg, args: SftArguments, out_dir: Path) -> Path | None:
    """The final model in the format others load: a PEFT adapter (LoRA) or a full HF folder. Multi-process: written
    by process 0 only (every process returns its path)."""
    path = out_dir / ("adapter" if lora_cfg is not None else "model")
    if not is_primary():
        return path
    if lora_cfg is not None:
        from jaxswift.checkpoints.peft import save_peft_adapter

        save_peft_adapter(params, cfg, lora_cfg, path, base_model_name_or_path=args.model)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(path))
        return path
    return save_hf(params, cfg.replace(remat="none"), path, tokenizer=model.tokenizer)
