"""Ahead-of-time memory and FLOPs plan of the SFT train step for a target mesh, without allocating any weight.

The planner builds the same step as SFT (`make_train_step` over a `TrainState`, full / LoRA / QLoRA params, AdamW or
GaLore) over abstract params: ShapeDtypeStructs that carry the NamedShardings of the rule tables. It lowers and
compiles that step for the mesh's devices (virtual CPU devices when planning on a CPU machine), with explicit in/out
shardings and the state donated as in training, and reads XLA's per-device memory analysis:

    weights       trainable + frozen params, from their shardings
    optimizer     optimizer state
    batch, misc   the [A, B, T] batch, step counters, RNG
    temporaries   XLA's temp allocation: gradients, saved activations, logits chunks, workspace
    outputs       step outputs not aliased to the donated state: the metrics, and any state leaf the step returns
                  in another dtype than it received
    total         arguments + temporaries + unaliased outputs: every buffer of the step live at once (its peak)

FLOPs: XLA's `cost_analysis` counts the body of a loop once (the layer scan, the loss-chunk scan), so the planner also
counts matmul FLOPs in the step's jaxpr, each loop body times its trip count (`matmul_flops`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import field
from pathlib import Path
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxswift.errors import ConfigError
from jaxswift.models.config import ModelConfig, config_from_hf
from jaxswift.parallel.collectives import count_collectives
from jaxswift.parallel.mesh import parse_mesh

PRESETS_DIR = Path(__file__).resolve().parents[1] / "models" / "presets"
TUNER_TYPES = ("full", "lora", "qlora")
QUANT_METHODS = ("nf4", "int8")
GiB = 2 ** 30


@dataclasses.dataclass
class PlanArguments:
    """Flags of `python -m jaxswift.recipes.plan` (SFT's names where SFT has the flag)."""

    model: str = field(default="qwen2.5-7b", metadata={"help": "preset name, config.json, HF folder or .gguf"})
    mesh: Optional[str] = field(default=None, metadata={"help": "target mesh, e.g. fsdp=8 (default: one device)"})
    tuner_type: str = field(default="lora", metadata={"help": "full | lora | qlora (= lora with --quant_method nf4)"})
    quant_method: Optional[str] = field(default=None, metadata={"help": "nf4 | int8: the LoRA base stored quantized"})
    max_length: int = 2048
    per_device_train_batch_size: int = 1
    gradient_checkpointing: bool = True
    dtype: str = field(default="bfloat16", metadata={"help": "float32 | bfloat16: compute and frozen weights"})
    param_dtype: Optional[str] = field(default=None, metadata={
        "help": "float32 | bfloat16: trained parameters (master weights) and so their optimizer state; default "
                "float32, as SFT"})
    sharding_rules: str = "default"
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    use_galore: bool = False
    galore_rank: int = 128
    galore_update_interval: int = 200
    galore_scale: float = 0.25
    loss_chunk_size: int = 512
    sequence_parallel: str = field(default="ring", metadata={
        "help": "attention of a mesh axis sequence > 1: ring | ulysses (their traffic and attention memory differ: "
                "the plan prints both formulas' figures)"})
    emulate_accelerator: bool = field(default=True, metadata={"help": (
        "on the CPU backend, keep XLA:CPU from hoisting out of the layer loop the float32 copies of bfloat16 weights "
        "it makes for its own matmuls (a whole-model copy no accelerator makes); false: plan the CPU program")})
    # serving (`--serve true`): the engine `jaxswift deploy --mesh` would build, not a train step
    serve: bool = field(default=False, metadata={"help": "plan `jaxswift deploy`: weights and the paged KV cache "
                                                         "per device for --max_num_seqs x --max_model_len"})
    max_num_seqs: int = field(default=8, metadata={"help": "--serve: requests decoded together"})
    max_model_len: int = field(default=2048, metadata={"help": "--serve: prompt + completion tokens per request"})
    page_size: int = field(default=16, metadata={"help": "--serve: tokens per KV-cache page"})
    config: Optional[str] = field(default=None, metadata={"help": "YAML file with the same keys as the flags"})

    # what a serving plan has no use for: giving one with --serve is an error, never ignored
    TRAIN_ONLY: ClassVar[tuple[str, ...]] = (
        "tuner_type", "quant_method", "max_length", "per_device_train_batch_size", "gradient_checkpointing",
        "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "use_galore", "galore_rank",
        "galore_update_interval", "galore_scale", "loss_chunk_size", "sequence_parallel", "param_dtype")
    SERVE_ONLY: ClassVar[tuple[str, ...]] = ("max_num_seqs", "max_model_len", "page_size")

    def __post_init__(self):
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(self)}
        for name in self.TRAIN_ONLY if self.serve else self.SERVE_ONLY:
            if getattr(self, name) != defaults[name]:
                raise ConfigError(f"--{name} is not used by " + (
                    "--serve true (it plans the serving engine)" if self.serve else
                    "a training plan (it plans a train step; --serve true plans the serving engine)"))
        for name in self.SERVE_ONLY:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.tuner_type not in TUNER_TYPES:
            raise ConfigError(f"--tuner_type {self.tuner_type!r}: expected one of {' | '.join(TUNER_TYPES)}")
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            if value is not None and value not in ("float32", "bfloat16"):
                raise ConfigError(f"--{name} {value!r}: expected float32 | bfloat16")
        for name in ("max_length", "per_device_train_batch_size", "lora_rank", "galore_rank",
                     "galore_update_interval", "loss_chunk_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.tuner_type == "qlora":
            self.quant_method = self.quant_method or "nf4"
        if self.quant_method is not None:
            if self.quant_method not in QUANT_METHODS:
                raise ConfigError(f"--quant_method {self.quant_method!r}: expected {' | '.join(QUANT_METHODS)}")
            if self.tuner_type == "full":
                raise ConfigError(f"--quant_method {self.quant_method} quantizes the frozen base under LoRA: it needs "
                                  "--tuner_type lora or qlora, not full")
        if self.sequence_parallel not in ("ring", "ulysses"):
            raise ConfigError(f"--sequence_parallel {self.sequence_parallel!r}: expected one of ring | ulysses")
        if self.sequence_parallel == "ulysses" and parse_mesh(self.mesh)["sequence"] <= 1:
            raise ConfigError(f"--sequence_parallel ulysses needs a --mesh with a sequence axis > 1 (got --mesh "
                              f"{self.mesh!r}), for example --mesh sequence=4")
        if self.use_galore and self.tuner_type != "full":
            raise ConfigError(f"--use_galore projects full-rank gradients: it needs --tuner_type full, "
                              f"not {self.tuner_type}")


# ---------------------------------------------------------------------------------------------------------------
# the model: preset, config.json, HF folder or GGUF


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def _preset_path(name: str) -> Path | None:
    wanted = name.strip().lower().rsplit("/", 1)[-1].removeprefix("meta-")
    return next((p for p in PRESETS_DIR.glob("*.json") if p.stem == wanted), None)


def read_model_config_dict(model: str) -> tuple[dict, str]:
    """(config.json dict, where it came from) for a preset name, a config.json, an HF folder or a .gguf file."""
    path = Path(model).expanduser()
    if not path.exists():
        preset = _preset_path(model)
        if preset is None:
            from jaxswift.checkpoints.registry import embedded_name, resolve_model_path

            if embedded_name(model) is None:
                raise ConfigError(f"--model {model!r}: not a file, a folder or a preset "
                                  f"(presets: {', '.join(preset_names())})")
            path = resolve_model_path(model)
        else:
            path = preset
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"--model {model}: the folder has no config.json")
    if path.suffix == ".gguf":
        from jaxswift.checkpoints.gguf import read_gguf

        return read_gguf(path).hf_config, str(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--model {path}: not a readable config.json ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--model {path}: expected a JSON object (a config.json)")
    return raw, str(path)


def load_plan_config(model: str, dtype: str) -> tuple[ModelConfig, str]:
    """The ModelConfig to plan for (dense or mixture-of-experts)."""
    raw, where = read_model_config_dict(model)
    return config_from_hf(raw, where=where, dtype=dtype), where


# ---------------------------------------------------------------------------------------------------------------
# abstract, sharded train state and batch


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def state_shardings(state, cfg: ModelConfig, rules, mesh):
    """The SFT trainer's shardings for every leaf of a train state (see `trainer.tree_shardings`)."""
    from jaxswift.parallel.params import tree_shardings

    return tree_shardings(state, cfg, rules, mesh)


def abstract_params_for(cfg: ModelConfig, args: PlanArguments):
    """(abstract params, trainable mask, prepare_params) as SFT would set them up, allocating nothing: the trained
    leaves in --param_dtype (float32 master weights by default), the frozen ones in --dtype."""
    from jaxswift.train.state import master_weights

    params, mask, prepare = _abstract_tuner(cfg, args)
    master = jnp.dtype(args.param_dtype or "float32")
    return master_weights(params, mask, master), mask, prepare


def _abstract_tuner(cfg: ModelConfig, args: PlanArguments):
    from jaxswift.models.spec import abstract_params
    from jaxswift.tuners import lora

    params = abstract_params(cfg)
    if args.tuner_type == "full":
        return params, jax.tree.map(lambda _: True, params), None
    if args.quant_method is not None:
        from jaxswift.quant.nf4 import abstract_quantized_params

        params = abstract_quantized_params(cfg, args.quant_method, params)
    from jaxswift.train.tuning import target_modules

    lora_cfg = lora.LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                               target_modules=target_modules(args.target_modules))
    params = jax.eval_shape(lambda p: lora.add_lora(p, cfg, lora_cfg, jax.random.key(0)), params)
    return params, lora.trainable_mask(params), (lora.with_dropout if args.lora_dropout > 0 else None)


def plan_optimizer(cfg: ModelConfig, args: PlanArguments):
    """SFT's optimizer (global-norm clipping + AdamW), or GaLore-AdamW on attention and MLP matrices."""
    import optax

    from jaxswift.optim.factory import OptimizerConfig, decay_mask, make_optimizer

    opt_cfg = OptimizerConfig()
    if not args.use_galore:
        return make_optimizer(opt_cfg, total_steps=1000)[0]
    from jaxswift.optim.galore import galore_adamw, galore_mask_for

    return optax.chain(optax.clip_by_global_norm(opt_cfg.max_grad_norm), galore_adamw(
        opt_cfg.learning_rate, rank=args.galore_rank, update_proj_gap=args.galore_update_interval,
        scale=args.galore_scale, weight_decay=opt_cfg.weight_decay, galore_mask=galore_mask_for(cfg),
        decay_mask=decay_mask))


def abstract_batch(rows: int, length: int, sharding) -> dict:
    """One [A=1, B, T] SFT batch as ShapeDtypeStructs."""
    from jaxswift.data.packing import BATCH_DTYPES

    return {k: jax.ShapeDtypeStruct((1, rows, length), dt, sharding=sharding) for k, dt in BATCH_DTYPES.items()}


# ---------------------------------------------------------------------------------------------------------------
# counting


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def _dot_flops(eqn) -> int:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    rhs_free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
    return 2 * math.prod(lhs) * math.prod(rhs_free)


def _ragged_dot_flops(eqn) -> int:
    """Each lhs element meets one group's rhs: 2 * |lhs| * (rhs dims neither contracted, batched nor groups)."""
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    numbers = eqn.params["ragged_dot_dimension_numbers"]
    (_, rhs_contract), (_, rhs_batch) = numbers.dot_dimension_numbers
    skipped = set(rhs_contract) | set(rhs_batch) | set(numbers.rhs_group_dimensions)
    return 2 * math.prod(lhs) * math.prod(d for i, d in enumerate(rhs) if i not in skipped)


def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jax.extend.core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def _output_shards(mesh, out_specs) -> int:
    """How many distinct shards a shard_map's outputs are split into (the mesh axes its out_specs name)."""
    named = {axis for spec in out_specs for entry in spec if entry is not None
             for axis in ((entry,) if isinstance(entry, str) else entry)}
    return math.prod(mesh.shape[a] for a in named)


def matmul_flops(jaxpr) -> int:
    """FLOPs of every dot_general in a jaxpr (2 per multiply-add), a scan body counted `length` times, the costlier
    branch of a cond; a while loop's body once (its trip count is not static)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            total += _dot_flops(eqn)
            continue
        if eqn.primitive.name == "ragged_dot_general":  # MoE experts (grouped matmuls) and their transposes
            total += _ragged_dot_flops(eqn)
            continue
        inner = [matmul_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v)]
        if not inner:
            continue
        if eqn.primitive.name == "shard_map":  # the body sees one shard: it runs once per shard of its outputs
            total += sum(inner) * _output_shards(eqn.params["mesh"], eqn.params["out_specs"])
        elif eqn.primitive.name == "cond":
            total += max(inner)
        else:
            total += sum(inner) * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    return total


# ---------------------------------------------------------------------------------------------------------------
# the plan


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one compiled train step, and its FLOPs."""

    model: str
    tuner_type: str
    mesh: str
    devices: int
    platform: str
    batch_rows: int  # global rows per step (per-device batch x data-parallel ways)
    length: int
    dtype: str
    remat: str
    weights: int
    optimizer: int
    batch_and_misc: int
    temporaries: int
    unaliased_outputs: int
    matmul_flops: int  # whole step, all devices
    xla_flops: float  # XLA cost_analysis, per device, loop bodies once
    compile_seconds: float
    notes: tuple[str, ...] = ()
    sequence: "SequenceTraffic | None" = None  # the attention's strategy on a sequence axis > 1
    collectives: dict = field(default_factory=dict)  # {kind: CollectiveStats} of the compiled step, per device

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.batch_and_misc + self.temporaries + self.unaliased_outputs


@dataclasses.dataclass(frozen=True)
class SequenceTraffic:
    """What the attention's sequence parallelism costs one device per step, from the formulas in docs/parallelism.md
    (`sequence_traffic`); the plan prints it next to the collectives counted in the compiled step."""

    strategy: str  # ring | ulysses
    n: int  # devices on the sequence axis
    kv_repeats: int  # ulysses: each kv head sent this many times (1: none)
    collectives: int  # collective-permutes (ring) or all-to-alls (ulysses) per step
    buffer_bytes: int  # summed over those collectives: the buffers they exchange
    sent_bytes: int  # of those, the bytes that leave the device
    attention_scores: int  # float32 attention scores one layer's attention holds at once


def sequence_traffic(cfg: ModelConfig, args: PlanArguments, mesh, rules) -> SequenceTraffic | None:
    """Per device and step, for rows of --max_length tokens, --per_device_train_batch_size of them, and heads per
    tensor shard N, K (H the head dim, b the compute dtype's bytes, L / stage layers; pipeline bubbles not counted):

      ring     per layer 2 (n-1) forward hops of k and v [B, T/n, K, H] in b bytes, 2 (n-1) again in the backward
               (the remat recompute shares them), and 2 n hops of their float32 gradients:
               B (T/n) K H (4 (n-1) b + 8 n); every hop sends its whole buffer. Scores at once: one block pair,
               B N (T/n / p)^2 x 4 (p = 2 halves under zigzag).
      ulysses  per layer all-to-alls of q and out [B, T/n, N, H] and of k and v [B, T/n, K r, H] (r = kv repeats),
               forward, backward and (under remat) the recomputed forward: (2 N + 2 K r) B (T/n) H b x (2 or 3);
               an all-to-all keeps 1/n of its buffer, so (n-1)/n of it is sent. Scores at once: the whole row for
               N / n heads, B (N/n) T^2 x 4 (the model's attention skips the keys after each 128-query block, so
               causal rows hold about half).
    """
    from jaxswift.parallel.ulysses import check_heads, local_heads

    n = mesh.shape["sequence"]
    if n == 1:
        return None
    N, K = local_heads(cfg.num_heads, cfg.num_kv_heads, mesh, rules)
    B, T, H, b = args.per_device_train_batch_size, args.max_length, cfg.head_dim, jnp.dtype(cfg.compute_dtype).itemsize
    layers = cfg.num_layers // mesh.shape["stage"]
    if args.sequence_parallel == "ring":
        parts = 2  # the planner's step runs the default layout, zigzag
        per_layer = B * (T // n) * K * H * (4 * (n - 1) * b + 8 * n)
        return SequenceTraffic("ring", n, 1, layers * (4 * (n - 1) + 2 * n), layers * per_layer, layers * per_layer,
                               B * N * (T // n // parts) ** 2 * 4)
    repeats = check_heads(cfg.num_heads, cfg.num_kv_heads, mesh, rules)
    passes = 3 if args.gradient_checkpointing else 2
    buffers = layers * passes * (2 * N + 2 * K * repeats) * B * (T // n) * H * b
    return SequenceTraffic("ulysses", n, repeats, layers * passes * 4, buffers, buffers * (n - 1) // n,
                           B * (N // n) * T * T * 4)


def _compiler_notes(mesh, cfg: ModelConfig) -> tuple[str, ...]:
    if mesh.devices.flat[0].platform != "cpu" or cfg.dtype != "bfloat16":
        return ()
    if "while-loop-invariant-code-motion" in os.environ.get("XLA_FLAGS", ""):
        return ("XLA:CPU converts bfloat16 weights to float32 for its matmuls; kept per layer here as with "
                "--emulate_accelerator (an accelerator runs them in bfloat16 and makes no such copy)",)
    return ("XLA:CPU converts bfloat16 weights to float32 for its matmuls and hoists the copies out of the layer "
            "loop: the temporaries include a float32 copy of the layers that an accelerator would not make",)


def _tuner_description(args: PlanArguments) -> str:
    master = args.param_dtype or "float32"
    if args.tuner_type == "full":
        return (f"full + GaLore rank {args.galore_rank}" if args.use_galore else "full") + f", {master} master weights"
    return f"LoRA rank {args.lora_rank} over a {args.quant_method or args.dtype} base, {master} adapters"


def _mesh_description(mesh) -> str:
    return " x ".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1) or "one device"


@dataclasses.dataclass(frozen=True)
class PlannedStep:
    """SFT's train step over an abstract, sharded state and batch: ready to lower, never allocated."""

    step: Any  # (state, batch) -> (state, metrics), tracing under the rules' activation constraints
    state: Any  # TrainState of ShapeDtypeStructs with NamedShardings
    batch: dict
    mesh: Any
    cfg: ModelConfig
    source: str  # where the model config came from
    sequence: SequenceTraffic | None = None

    def jitted(self):
        """jit as SFT's `compile_step` does it: state shardings in and out, batch over data, state donated."""
        shardings = jax.tree.map(lambda x: x.sharding, self.state)
        batch_sharding = jax.tree.map(lambda x: x.sharding, self.batch)
        return jax.jit(self.step, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                       donate_argnums=0)

    def matmul_flops(self) -> int:
        return matmul_flops(jax.make_jaxpr(self.step)(self.state, self.batch).jaxpr)

    def dtype_changes(self) -> list[tuple[str, str, int]]:
        """(dtype in, dtype out, bytes per device) of each state leaf the step returns in another dtype: it cannot
        reuse its donated buffer, and the next step sees new input types (a recompilation)."""
        new_state, _ = jax.eval_shape(self.step, self.state, self.batch)
        return [(jnp.dtype(old.dtype).name, jnp.dtype(new.dtype).name,
                 per_device_bytes(jax.ShapeDtypeStruct(old.shape, new.dtype, sharding=old.sharding)))
                for old, new in zip(jax.tree.leaves(self.state), jax.tree.leaves(new_state)) if old.dtype != new.dtype]


def build_step(args: PlanArguments) -> PlannedStep:
    """The state SFT would build (tuner, optimizer, shardings) and its step, over abstract params."""
    from jaxswift.parallel.mesh import make_mesh
    from jaxswift.parallel.rules import activation_sharding, batch_sharding, data_parallel_size, rules_for_mesh
    from jaxswift.parallel.strategies import ParallelOptions
    from jaxswift.train.state import init_train_state
    from jaxswift.train.step import make_train_step

    cfg, source = load_plan_config(args.model, args.dtype)
    cfg = cfg.replace(remat="full" if args.gradient_checkpointing else "none")
    mesh = make_mesh(args.mesh or "1")
    rules = rules_for_mesh(args.sharding_rules, mesh)
    traffic = sequence_traffic(cfg, args, mesh, rules)  # refuses heads that Ulysses cannot split, before compiling
    params, mask, prepare = abstract_params_for(cfg, args)
    optimizer = plan_optimizer(cfg, args)
    state = jax.eval_shape(lambda p: init_train_state(p, mask, optimizer, 0), params)
    state = _with_shardings(state, state_shardings(state, cfg, rules, mesh))
    rows = args.per_device_train_batch_size * data_parallel_size(rules, mesh)
    batch = abstract_batch(rows, args.max_length,
                           NamedSharding(mesh, PartitionSpec(None, *batch_sharding(rules, mesh).spec)))
    step_kwargs = {"loss_chunk": args.loss_chunk_size}
    if prepare is not None:
        step_kwargs["prepare_params"] = prepare
    step = make_train_step(cfg, optimizer, **step_kwargs)

    def traced(s, b):
        with activation_sharding(rules, mesh, ParallelOptions.from_args(args)):
            return step(s, b)

    return PlannedStep(traced, state, batch, mesh, cfg, source, traffic)


def plan_train_step(args: PlanArguments) -> MemoryPlan:
    """Builds SFT's train step over abstract sharded params, lowers and compiles it for the mesh, and measures it."""
    planned = build_step(args)
    started = time.perf_counter()
    compiled = planned.jitted().lower(planned.state, planned.batch).compile()
    compile_seconds = time.perf_counter() - started
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state, mesh = planned.state, planned.mesh
    weights = per_device_bytes(state.trainable) + per_device_bytes(state.frozen)
    opt = per_device_bytes(state.opt_state)
    return MemoryPlan(
        model=planned.source, tuner_type=_tuner_description(args),
        mesh=_mesh_description(mesh), devices=mesh.size, platform=mesh.devices.flat[0].platform,
        batch_rows=planned.batch["tokens"].shape[1], length=args.max_length, dtype=args.dtype,
        remat=planned.cfg.remat, weights=weights, optimizer=opt,
        batch_and_misc=memory.argument_size_in_bytes - weights - opt, temporaries=memory.temp_size_in_bytes,
        unaliased_outputs=memory.output_size_in_bytes - memory.alias_size_in_bytes,
        matmul_flops=planned.matmul_flops(), xla_flops=float(cost.get("flops", float("nan"))),
        compile_seconds=compile_seconds, notes=_compiler_notes(mesh, planned.cfg) + _dtype_notes(planned),
        sequence=planned.sequence, collectives=count_collectives(compiled.as_text()))


def _dtype_notes(planned: PlannedStep) -> tuple[str, ...]:
    changes = planned.dtype_changes()
    if not changes:
        return ()
    kinds = sorted({f"{a} -> {b}" for a, b, _ in changes})
    return (f"{len(changes)} state leaves come back from the step in another dtype ({', '.join(kinds)}; "
            f"{sum(n for *_, n in changes) / GiB:.3f} GiB per device): they cannot reuse the donated buffers "
            "(see the unaliased outputs), and the next step recompiles for the new types",)


def _gib(n: float) -> str:
    return f"{n / GiB:8.3f}"


def format_plan(plan: MemoryPlan) -> str:
    """The table the recipe prints."""
    rows = [("weights (trainable + frozen)", plan.weights), ("optimizer state", plan.optimizer),
            ("batch, step counters, RNG", plan.batch_and_misc),
            ("gradients + activations + temporaries (XLA temp)", plan.temporaries),
            ("step outputs not aliased to the state", plan.unaliased_outputs), ("total (peak)", plan.total)]
    width = max(len(name) for name, _ in rows)
    lines = [f"model {plan.model} | {plan.tuner_type} | {plan.dtype}, remat {plan.remat} | "
             f"{plan.batch_rows} x {plan.length} tokens per step | mesh {plan.mesh} ({plan.devices} "
             f"{plan.platform} device{'s' * (plan.devices > 1)})",
             f"{'memory per device':<{width}}      GiB"]
    lines += [f"{name:<{width}} {_gib(value)}" for name, value in rows]
    lines += [f"matmul FLOPs per step: {plan.matmul_flops:.4g} (all devices; {plan.matmul_flops / plan.devices:.4g} "
              f"per device), counted in the step's jaxpr with loop bodies times their trip counts",
              f"XLA cost_analysis flops: {plan.xla_flops:.4g} per device (XLA counts each loop body once)",
              f"compile: {plan.compile_seconds:.1f} s"]
    if plan.sequence is not None:
        seq = plan.sequence
        kind = "collective-permutes" if seq.strategy == "ring" else "all-to-alls"
        repeats = f", kv heads sent {seq.kv_repeats}x" if seq.kv_repeats > 1 else ""
        lines.append(f"sequence parallelism: {seq.strategy} over sequence={seq.n}{repeats}: {seq.collectives} {kind} "
                     f"per step ({seq.buffer_bytes / GiB:.4f} GiB of buffers, {seq.sent_bytes / GiB:.4f} GiB sent per "
                     f"device); attention scores of one layer at once {seq.attention_scores / GiB:.4f} GiB "
                     f"(formulas: docs/parallelism.md)")
    if plan.collectives:
        lines.append("collectives in the compiled step, per device: " + ", ".join(
            f"{kind} {stats.count} ({stats.bytes / GiB:.4f} GiB)" for kind, stats in sorted(plan.collectives.items())))
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# serving: the engine `jaxswift deploy --mesh` builds


@dataclasses.dataclass(frozen=True)
class ServePlan:
    model: str
    mesh: str
    devices: int
    dtype: str
    slots: int
    max_model_len: int
    pages: int  # allocatable KV pages (every slot full), plus the one scratch page
    page_size: int
    weights: int  # bytes per device
    kv_cache: int
    kv_sharded: bool
    kv_heads: int
    kv_copies: int  # each kv head repeated this many times so that tensor splits the cache (1: not repeated)
    tensor: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def plan_serving(args: PlanArguments) -> ServePlan:
    """Per-device weights and KV cache of the serving engine on the mesh: params sharded by the default rule table
    (parallel/params.py, as JaxEngine does), each layer's k and v pools as infer/kv_cache.pool_sharding lays them;
    counted from abstract arrays, nothing allocated."""
    from jaxswift.infer.kv_cache import pages_for, pool_shape, pool_sharding
    from jaxswift.models.spec import abstract_params
    from jaxswift.parallel.mesh import make_mesh
    from jaxswift.parallel.params import serving_kv_copies, tree_shardings
    from jaxswift.parallel.rules import rules_for_mesh

    cfg, source = load_plan_config(args.model, args.dtype)
    mesh = make_mesh(args.mesh or "1")
    rules = rules_for_mesh(args.sharding_rules, mesh)
    kv_heads, copies = cfg.num_kv_heads, serving_kv_copies(cfg, mesh)
    cfg = cfg.replace(num_kv_heads=kv_heads * copies)  # as JaxEngine repeats them (tensor a multiple of kv heads)
    params = abstract_params(cfg)
    weights = per_device_bytes(_with_shardings(params, tree_shardings(params, cfg, rules, mesh)))
    pages = args.max_num_seqs * pages_for(args.max_model_len, args.page_size)
    sharding = pool_sharding(cfg, pages, args.page_size, rules, mesh)
    pool = jax.ShapeDtypeStruct(pool_shape(cfg, pages, args.page_size), cfg.compute_dtype, sharding=sharding)
    return ServePlan(model=source, mesh=_mesh_description(mesh), devices=mesh.size, dtype=args.dtype,
                     slots=args.max_num_seqs, max_model_len=args.max_model_len, pages=pages,
                     page_size=args.page_size, weights=weights, kv_cache=2 * cfg.num_layers * per_device_bytes(pool),
                     kv_sharded=any(axis is not None for axis in sharding.spec), kv_heads=kv_heads,
                     kv_copies=copies, tensor=mesh.shape["tensor"])


def format_serve_plan(plan: ServePlan) -> str:
    lines = [f"serving {plan.model} | {plan.dtype} | {plan.slots} requests x {plan.max_model_len} tokens "
             f"({plan.pages} KV pages of {plan.page_size}) | mesh {plan.mesh} ({plan.devices} "
             f"device{'s' * (plan.devices > 1)})",
             f"{'memory per device':<34}      GiB",
             f"{'weights':<34} {_gib(plan.weights)}",
             f"{'KV cache' + (' (kv heads split)' if plan.kv_sharded else ' (replicated)'):<34} {_gib(plan.kv_cache)}",
             f"{'total':<34} {_gib(plan.total)}"]
    if plan.kv_copies > 1:
        lines.append(f"note: the model's {plan.kv_heads} kv heads are each repeated {plan.kv_copies} times so that "
                     f"tensor={plan.tensor} splits the KV cache (one head per device), as vLLM does")
    if not plan.kv_sharded and plan.tensor > 1:
        lines.append(f"note: the model's {plan.kv_heads} kv heads do not split {plan.tensor} ways, so every device "
                     f"holds the whole KV cache; a tensor size that divides {plan.kv_heads} (with data for the rest "
                     f"of the devices) splits it")
    return "\n".join(lines)
