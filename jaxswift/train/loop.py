"""The training skeleton every trainer composes (SFT, RLHF, GRPO, and those to come).

    ctx = start_run(args)                       # inputs checked, output folder, mesh, rules, the model
    tuned = prepare_tuner(ctx.model.params, args, ctx.cfg)            (train.tuning)
    state, start = init_state(ctx, tuned, optimizer, messages)       # sharded; resumed from a checkpoint
    step = compile_step(ctx, my_step, state)    # (state, batch) -> (state, metrics), jitted, state donated
    loop = train_loop(ctx, state, Feed(step, batches, ...), ...)     # logs, eval, checkpoints
    export_dir = export_model(ctx, loop.state.params, tuned.lora)   # PEFT adapter or HF folder

A trainer supplies only its batches (a `Feed`) and its step (loss). Batches are host numpy arrays of this
process's rows; the loop places them on the mesh. Metrics are read one step behind, so the host never stalls the
device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxswift.api import Model, chat, load_model
from jaxswift.checkpoints.hf import save_hf
from jaxswift.checkpoints.peft import save_peft_adapter
from jaxswift.checkpoints.state import StateCheckpointer, resolve_resume, restore_state
from jaxswift.checkpoints.vlm import save_vlm
from jaxswift.checkpoints.vlm_peft import save_vlm_peft_adapter
from jaxswift.data.formats import check_dataset_specs
from jaxswift.errors import ConfigError, JaxswiftError
from jaxswift.models.attention_kernels import normalize_attn_impl
from jaxswift.models.vision import VLMConfig
from jaxswift.optim.qgalore import float_view
from jaxswift.parallel.distributed import gather_to_host, is_primary, process_rows, put_process_batch
from jaxswift.parallel.mesh import make_mesh
from jaxswift.parallel.rules import activation_sharding, data_parallel_size, rules_for_mesh
from jaxswift.parallel.strategies import ParallelOptions
from jaxswift.parallel.ulysses import check_heads
from jaxswift.train.logging import RunLogger, plot_loss
from jaxswift.parallel.params import shard_params, tree_shardings
from jaxswift.train.state import init_train_state
from jaxswift.train.tuning import TunedParams, modules_to_save, moe_overrides


class TrainingStopped(JaxswiftError):
    """Training cannot go on (for example: too many non-finite steps in a row)."""


class BatchSourceLost(TrainingStopped):
    """The batches' source is gone (a rollout server stopped answering): the loop checkpoints the last state
    before stopping, so the run resumes from where it was."""


# ------------------------------------------------------------------------------------------------------ the run


@dataclasses.dataclass
class RunContext:
    """What every training recipe sets up first: output folder, mesh, sharding rules, the model."""

    args: Any  # the recipe's arguments dataclass (SftArguments or a subclass)
    out_dir: Path
    mesh: Any
    rules: Any
    dp: int  # data-parallel ways (data x fsdp): rows per step = per-device batch x dp x accumulation
    model: Model
    cfg: Any  # the model config with the run's remat policy and MoE flags

    @property
    def batch_sharding(self) -> NamedSharding:
        axes = tuple(a for a in self.rules.activations.get("batch", ()) if self.mesh.shape[a] > 1)
        entry = None if not axes else axes[0] if len(axes) == 1 else axes
        return NamedSharding(self.mesh, PartitionSpec(None, entry, None))

    @property
    def parallel(self) -> ParallelOptions:
        return ParallelOptions.from_args(self.args)

    def rows(self, rows_per_microbatch: int) -> tuple[int, int]:
        """This process's block of a microbatch's rows (all of them in a one-process run)."""
        return process_rows(self.batch_sharding, rows_per_microbatch)

    def put(self, local_batch: dict, rows_per_microbatch: int) -> dict:
        """This process's rows of a [A, B, T] batch -> the global batch on the mesh."""
        return put_process_batch(local_batch, self.batch_sharding, rows_per_microbatch)

    def put_whole(self, batch: dict) -> dict:
        """A whole [A, B, T] host batch (every process has it) -> the global batch: each process copies its rows."""
        rows = next(iter(batch.values())).shape[1]
        first, last = self.rows(rows)
        return self.put({k: v[:, first:last] for k, v in batch.items()}, rows)


def check_inputs(args) -> None:
    """Every input path a run reads, checked before anything heavy is loaded (a typo fails in a second, not after
    the model has loaded)."""
    check_dataset_specs(args.dataset, "--dataset")
    if "val_dataset" not in args.UNUSED:
        check_dataset_specs(args.val_dataset, "--val_dataset")


def start_run(args) -> RunContext:
    check_inputs(args)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_primary():
        (out_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    mesh = make_mesh(args.mesh)
    rules = rules_for_mesh(args.sharding_rules, mesh)
    model = load_model(args.model, dtype=getattr(args, "torch_dtype", None) or args.dtype)
    cfg = run_config(model.config, args)
    check_sequence_parallel(cfg, args, mesh, rules)
    return RunContext(args, out_dir, mesh, rules, data_parallel_size(rules, mesh), model, cfg)


def check_sequence_parallel(cfg, args, mesh, rules) -> None:
    """--sequence_parallel ulysses on a model whose heads do not split over the mesh's sequence axis: refused here,
    by name, before anything compiles."""
    if getattr(args, "sequence_parallel", "ring") == "ulysses" and mesh.shape["sequence"] > 1:
        text = getattr(cfg, "text", cfg)  # a VLM's language model runs the override
        check_heads(text.num_heads, text.num_kv_heads, mesh, rules)


def refuse_vision_language(ctx: RunContext, recipe: str) -> None:
    """A trainer that reads text rows only, given a vision-language model: refused by name before any compile."""
    if ctx.model.is_vlm:
        raise ConfigError(f"--model {ctx.args.model}: {recipe} trains text-only models so far; this is a "
                          f"{ctx.model.config.family} vision-language model (jaxswift sft trains it on image rows)")


def run_config(config, args):
    """The model config with the run's remat policy and MoE flags (a VLM's on its LLM; the tower is not remat)."""
    if isinstance(config, VLMConfig):
        return dataclasses.replace(config, text=run_config(config.text, args))
    changes = {"remat": "full" if args.gradient_checkpointing else "none"}
    if getattr(args, "attn_impl", None) is not None:
        changes["attn_impl"] = normalize_attn_impl(args.attn_impl)
    return moe_overrides(config.replace(**changes), args)


def total_steps_of(args, steps_per_epoch: int) -> int:
    return args.max_steps if args.max_steps > 0 else args.num_train_epochs * steps_per_epoch


def init_state(ctx: RunContext, tuned: TunedParams, optimizer, messages: list[str]):
    """(sharded train state, start step): fresh, or restored from --resume_from_checkpoint."""
    params = shard_params(tuned.params, ctx.cfg, ctx.rules, ctx.mesh)
    init = lambda p: init_train_state(p, tuned.mask, optimizer, ctx.args.seed)  # noqa: E731
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


def compile_eval(ctx: RunContext, fn, params_sharding, *extra):
    """fn(params, batch, *extra) jitted under the run's activation sharding: returns (params, batch) -> result."""
    def traced(p, b, *e):
        with activation_sharding(ctx.rules, ctx.mesh, ctx.parallel):
            return fn(p, b, *e)

    extra_sharding = jax.tree.map(lambda x: x.sharding, extra)
    jitted = jax.jit(traced, in_shardings=(params_sharding, ctx.batch_sharding, *extra_sharding))
    return lambda p, b: jitted(p, b, *extra)


# ----------------------------------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Feed:
    """What a trainer gives the loop: its compiled step and where its batches come from."""

    step: Callable  # (state, global batch) -> (state, metrics)
    batches: Callable[[int], Iterator[dict]]  # start step -> this process's [A, b, T] host batches
    rows_per_step: int
    length: int
    steps_per_epoch: int
    evaluate: Callable | None = None  # state -> {metric: value}, every --eval_steps and at the end


@dataclasses.dataclass
class LoopResult:
    state: Any
    losses: dict[int, float]
    history: dict[int, dict[str, float]]  # every finite step's metrics
    eval_metrics: dict[int, dict[str, float]]
    first_step_seconds: float


# Metrics logged as their latest value; every other metric is averaged over the logging window.
LATEST_METRICS = ("grad_norm", "tokens", "loss_tokens", "skipped_steps")
CONTROL_METRICS = ("finite", "bad_streak")


def _window_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]  # e.g. a KTO step without undesirable examples gives NaN
    return sum(finite) / len(finite) if finite else float("nan")


class MetricsReader:
    """Reads each step's metrics (one step behind), stops on non-finite streaks, keeps the history, and logs the
    window means every --logging_steps."""

    def __init__(self, args, logger: RunLogger, schedule, start_step: int, total_steps: int):
        self.args, self.logger, self.schedule = args, logger, schedule
        self.start_step, self.total_steps = start_step, total_steps
        self.max_nonfinite_steps = args.max_nonfinite_steps
        self.losses: dict[int, float] = {}
        self.history: dict[int, dict[str, float]] = {}
        self.window: dict[str, list[float]] = {}
        self.first_step_seconds = 0.0

    def read(self, step_no: int, metrics, started: float) -> None:
        metrics = jax.device_get(metrics)
        if step_no == self.start_step + 1:
            self.first_step_seconds = time.perf_counter() - started
            self.logger.write(f"first step (compile + run): {self.first_step_seconds:.1f}s")
        if not metrics["finite"]:
            self._skipped(step_no, int(metrics["bad_streak"]))
            return
        record = {k: float(v) for k, v in metrics.items() if k not in CONTROL_METRICS}
        self.losses[step_no], self.history[step_no] = record["loss"], record
        for k, v in record.items():
            if k not in LATEST_METRICS:
                self.window.setdefault(k, []).append(v)
        lr = float(self.schedule(step_no - 1))
        self.logger.advance(step_no, record["loss"], lr, record["tokens"])
        if step_no == self.start_step + 1:
            self.logger.restart_clock()  # tokens/s and ETA from here on exclude compilation
        if step_no % self.args.logging_steps == 0 or step_no == self.total_steps:
            self._log_window(step_no, record, lr)

    def _skipped(self, step_no: int, streak: int) -> None:
        self.logger.write(f"step {step_no}: non-finite loss or gradient, update skipped ({streak} in a row)")
        if streak >= self.max_nonfinite_steps:
            raise TrainingStopped(f"stopped at step {step_no}: {streak} non-finite steps in a row (lower "
                                  "--learning_rate, check the data, or use --dtype float32)")

    def _log_window(self, step_no: int, record: dict, lr: float) -> None:
        elapsed = time.perf_counter() - self.logger.start
        logged = {k: _window_mean(v) for k, v in self.window.items()}
        logged.update({"lr": lr, **{k: record[k] for k in LATEST_METRICS if k in record},
                       "tokens_per_s": self.logger.tokens / max(elapsed, 1e-9)})
        self.logger.log(step_no, logged)
        self.window.clear()


def _checkpoint_meta(args, step_no: int) -> dict:
    return {"step": step_no, "args": dataclasses.asdict(args)}


def train_loop(ctx: RunContext, state, feed: Feed, *, total_steps: int, start_step: int, schedule,
               messages=(), progress: bool = True) -> LoopResult:
    """Steps start_step+1 .. total_steps: metrics read one step behind, logs, eval every --eval_steps (when the
    feed evaluates), checkpoints every --save_steps and at the end."""
    args = ctx.args
    logger = RunLogger(ctx.out_dir, total_steps, start_step, enable_bar=not args.disable_tqdm and progress,
                       write_files=is_primary())
    for m in [*messages, _plan_line(ctx, feed, total_steps)]:
        logger.write(m)
    reader = MetricsReader(args, logger, schedule, start_step, total_steps)
    checkpointer = StateCheckpointer(ctx.out_dir, args.save_total_limit)
    evals: dict[int, dict[str, float]] = {}
    try:
        state = _run_steps(ctx, state, feed, reader, checkpointer, evals, start_step, total_steps)
        if feed.evaluate is not None and total_steps not in evals and total_steps > start_step:
            evals[total_steps] = _evaluate(feed, state, logger, total_steps)
        if total_steps > start_step:
            checkpointer.save(state, _checkpoint_meta(args, total_steps))
    finally:
        logger.close()
        checkpointer.close()
    return LoopResult(state, reader.losses, reader.history, evals, reader.first_step_seconds)


def _run_steps(ctx, state, feed: Feed, reader: MetricsReader, checkpointer, evals, start_step, total_steps):
    args = ctx.args
    batches = feed.batches(start_step)
    pending = None  # (step, metrics, t0): read one step behind so the host never stalls the device
    t0 = time.perf_counter()
    for step_no in range(start_step + 1, total_steps + 1):
        try:
            batch = next(batches)
        except BatchSourceLost:
            if step_no - 1 > start_step:
                checkpointer.save(state, _checkpoint_meta(args, step_no - 1))
            raise
        state, metrics = feed.step(state, ctx.put(batch, feed.rows_per_step // len(batch["tokens"])))
        if pending is not None:
            reader.read(*pending)
        pending = (step_no, metrics, t0)
        if step_no % args.eval_steps == 0 and feed.evaluate is not None:
            reader.read(*pending)
            pending = None
            evals[step_no] = _evaluate(feed, state, reader.logger, step_no)
        if step_no % args.save_steps == 0 and step_no != total_steps:
            checkpointer.save(state, _checkpoint_meta(args, step_no))
    if pending is not None:
        reader.read(*pending)
    return state


# (tokenizer, cfg) -> (params -> {"task/metric": score}): the --eval_dataset tasks, read by the recipe (train does
# not import eval), built here once the model is loaded.
TaskScorer = Callable[[Any, Any], Callable[[Any], dict]]


def with_task_scores(evaluate: Callable | None, ctx: RunContext, task_scorer: TaskScorer | None) -> Callable | None:
    """Feed.evaluate plus the benchmark tasks' scores of the params being trained (Q-GaLore's 8-bit weights read as
    floats; LoRA adapters applied by the forward, nothing merged)."""
    if task_scorer is None:
        return evaluate
    score = task_scorer(ctx.model.tokenizer, ctx.cfg)

    def evaluate_with_tasks(state) -> dict:
        metrics = evaluate(state) if evaluate is not None else {}
        return {**metrics, **score(float_view(state.params))}

    return evaluate_with_tasks


def _evaluate(feed: Feed, state, logger: RunLogger, step_no: int) -> dict:
    metrics = feed.evaluate(state)
    logger.log(step_no, metrics, prefix="eval")
    logger.write(f"step {step_no}: eval " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics


def _plan_line(ctx: RunContext, feed: Feed, total_steps: int) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in ctx.mesh.shape.items() if v > 1) or "single device"
    return (f"{total_steps} steps x {feed.rows_per_step} rows of {feed.length} tokens ({feed.steps_per_epoch} "
            f"steps/epoch); mesh {mesh}")


# --------------------------------------------------------------------------------------------- after the loop


def demo_answer(model: Model, params, cfg, question: str, max_new_tokens: int) -> str | None:
    """The model's answer to the demo question (None when there is no question or no tokenizer)."""
    if not question or model.tokenizer is None:
        return None
    return chat(dataclasses.replace(model, params=params, config=cfg), [{"role": "user", "content": question}],
                max_new_tokens=max_new_tokens)


def export_model(ctx: RunContext, params, lora_cfg) -> Path:
    """The final model in the format others load: a PEFT adapter (LoRA) or a full HF folder. Multi-process:
    `params` must be host arrays (`gather_to_host`); written by process 0 only (every process returns the path)."""
    args, model = ctx.args, ctx.model
    path = ctx.out_dir / ("adapter" if lora_cfg is not None else "model")
    if not is_primary():
        return path
    if lora_cfg is None:  # float32 master weights saved in the dtype the model was loaded in (--dtype), as before
        text_cfg = ctx.cfg.text if isinstance(ctx.cfg, VLMConfig) else ctx.cfg
        params = jax.tree.map(lambda x: x.astype(text_cfg.weight_dtype)
                              if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    if isinstance(ctx.cfg, VLMConfig):
        return _export_vlm(ctx, params, lora_cfg, path)
    if lora_cfg is None:
        return save_hf(params, ctx.cfg.replace(remat="none"), path, tokenizer=model.tokenizer)
    save_peft_adapter(params, ctx.cfg, lora_cfg, path, base_model_name_or_path=args.model)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(path))
    return path


def _export_vlm(ctx: RunContext, params, lora_cfg, path: Path) -> Path:
    """A vision-language model: the HF folder (processor and tokenizer files copied from --model), or a PEFT
    adapter over the tower / aligner / LLM modules it adapts (and the parts of --modules_to_save, whole)."""
    cfg = dataclasses.replace(ctx.cfg, text=ctx.cfg.text.replace(remat="none"))
    if lora_cfg is None:
        return save_vlm(params, cfg, path, source=ctx.args.model)
    save_vlm_peft_adapter(params, cfg, lora_cfg, path, base_model_name_or_path=ctx.args.model,
                          full_parts=modules_to_save(ctx.args))
    if ctx.model.tokenizer is not None:
        ctx.model.tokenizer.save_pretrained(str(path))
    return path


@dataclasses.dataclass
class LatestState:
    """The compiled step, keeping the state it returned last: the trainers whose batches are generated by the model
    being trained (GRPO's rollouts, GKD's on-policy samples) read it while the loop owns the steps."""
    state: Any
    compiled: Callable

    def step(self, state, batch):
        self.state, metrics = self.compiled(state, batch)
        return self.state, metrics


def plot_run(ctx: RunContext) -> None:
    if is_primary():
        plot_loss(ctx.out_dir / "logging.jsonl", ctx.out_dir / "loss.png")


def host_params(params):
    """The final params on every process's host (multi-process: gathered), for export and the demo."""
    return gather_to_host(params)
