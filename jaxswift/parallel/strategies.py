"""Which parallel strategy replaces which part of the forward, from the mesh and the run's flags.

A mesh axis of size > 1 switches its strategy on: `stage` -> pipeline (`parallel/pipeline.py`, the "run_layers"
override), `sequence` -> ring attention (`parallel/ring_attention.py`, "self_attention"), `expert` -> expert
parallelism (`parallel/expert.py`, "moe_experts"). data, fsdp and tensor need no override: the rule tables and
XLA's SPMD partitioner do them. See `models/hints.py` for the override contracts.
"""

from __future__ import annotations

import contextlib
import dataclasses

from jaxswift.errors import ConfigError
from jaxswift.models import hints


@dataclasses.dataclass(frozen=True)
class ParallelOptions:
    num_microbatches: int | None = None  # pipeline microbatches per step (None: one per stage)
    virtual_stages: int = 1  # > 1: circular (interleaved) pipeline schedule
    pipeline_schedule: str = "auto"  # auto (gpipe, circular when virtual_stages > 1) | gpipe | circular
    ring_attention_layout: str = "zigzag"  # zigzag | striped | contiguous (causal load balancing)
    sequence_parallel: str = "ring"  # ring | ulysses: the attention of a `sequence` axis > 1

    @classmethod
    def from_args(cls, args) -> "ParallelOptions":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


SEQUENCE_PARALLEL = ("ring", "ulysses")


def check_sequence_parallel(value: str) -> None:
    if value not in SEQUENCE_PARALLEL:
        raise ConfigError(f"--sequence_parallel {value!r}: expected one of {' | '.join(SEQUENCE_PARALLEL)}")


def parallel_overrides(mesh, rules, options: ParallelOptions | None = None) -> dict:
    options = options or ParallelOptions()
    fns = {}
    if mesh.shape.get("stage", 1) > 1:
        from jaxswift.parallel.pipeline import make_run_layers
        fns["run_layers"] = make_run_layers(mesh, rules, options)
    if mesh.shape.get("sequence", 1) > 1:
        check_sequence_parallel(options.sequence_parallel)
        if options.sequence_parallel == "ulysses":
            from jaxswift.parallel.ulysses import make_self_attention
        else:
            from jaxswift.parallel.ring_attention import make_self_attention
        fns["self_attention"] = make_self_attention(mesh, rules, options)
    if mesh.size > 1:  # expert parallelism over `expert`; else per-data-shard expert compute (MoE blocks only)
        from jaxswift.parallel.expert import make_moe_experts
        fns["moe_experts"] = make_moe_experts(mesh, rules, options)
    return fns


@contextlib.contextmanager
def use_parallel(mesh, rules, options: ParallelOptions | None = None):
    """Model code traced inside runs each mesh axis's strategy."""
    with hints.use_overrides(**parallel_overrides(mesh, rules, options)):
        yield
