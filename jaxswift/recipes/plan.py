"""Memory planner: `python -m jaxswift.recipes.plan --model qwen2.5-7b --mesh fsdp=8 --tuner_type full`, or
`--serve true --mesh tensor=8 --max_num_seqs 32 --max_model_len 4096` for the serving engine.

Compiles SFT's train step ahead of time for the mesh's device count, on virtual CPU devices unless JAX_PLATFORMS
names another platform, without allocating a weight, and prints per-device memory and FLOPs per step. The figures are
XLA:CPU's; with --emulate_accelerator (the default) XLA:CPU is kept from hoisting the float32 copies of bfloat16
weights it makes for its own matmuls out of the layer loop, which no accelerator compiler would make.
"""

from __future__ import annotations

import os
import sys

from jaxswift.recipes.common import run_main


# XLA:CPU runs bfloat16 matmuls in float32; this pass would hoist those weight conversions out of the layer scan.
HOISTING_PASS = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"


def _virtual_cpu_devices(mesh: str | None, emulate_accelerator: bool) -> None:
    """Before JAX starts: plan on the CPU backend with as many virtual devices as the mesh has."""
    from jaxswift.parallel.mesh import mesh_device_count, parse_mesh

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    needed = mesh_device_count(parse_mesh(mesh)) if mesh else 1
    flags = os.environ.get("XLA_FLAGS", "").split()
    if needed > 1 and not any("xla_force_host_platform_device_count" in f for f in flags):
        flags.append(f"--xla_force_host_platform_device_count={needed}")
    if emulate_accelerator and not any("xla_disable_hlo_passes" in f for f in flags):
        flags.append(HOISTING_PASS)
    os.environ["XLA_FLAGS"] = " ".join(flags)


def main(argv: list[str]) -> int:
    from jaxswift.train.args import parse_args
    from jaxswift.train.plan import PlanArguments

    args = parse_args(PlanArguments, argv)
    _virtual_cpu_devices(args.mesh, args.emulate_accelerator)
    from jaxswift.train.plan import format_plan, format_serve_plan, plan_serving, plan_train_step

    print(format_serve_plan(plan_serving(args)) if args.serve else format_plan(plan_train_step(args)))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
