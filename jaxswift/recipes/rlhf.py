"""Preference alignment and distillation: `python -m jaxswift.recipes.rlhf --rlhf_type
dpo|kto|cpo|simpo|orpo|rm|gkd [--flags ...]` (or `jaxswift rlhf ...`).

With no flags: DPO with LoRA on smollm2-135m-instruct over the built-in preference pairs, a few minutes on a CPU.
GKD needs a teacher: `--rlhf_type gkd --teacher_model DIR` or `--teacher_url http://host:port/v1`.
"""

from __future__ import annotations

import sys

from jaxswift.recipes.common import print_outcome, run_main, task_scorer_of

SHOWN = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "kl", "log_odds_ratio")


def main(argv: list[str]) -> int:
    from jaxswift.parallel.distributed import check_same_flags, initialize_distributed
    from jaxswift.train.rlhf_args import RlhfArguments
    from jaxswift.train.args import parse_args

    args = parse_args(RlhfArguments, argv)
    # before JAX creates its backend: join a multi-process job, and on CPU make this process's virtual devices
    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id, mesh=args.mesh)
    check_same_flags(args)
    result = train(args)
    if args.rlhf_type == "gkd":
        return _print_gkd(result, args)
    losses = list(result.losses.values())
    if losses:
        print(f"loss: first {losses[0]:.4f} -> last {losses[-1]:.4f} over {len(losses)} steps")
    if result.final_metrics:
        where = "validation items" if any("loss" in m for m in result.eval_metrics.values()) else "training items"
        shown = ", ".join(f"{k} {result.final_metrics[k]:.3f}" for k in SHOWN if k in result.final_metrics)
        print(f"{args.rlhf_type} on the {where}: {shown}")
    print_outcome(result, args.demo_question)
    return 0


def _print_gkd(result, args) -> int:
    losses = list(result.losses.values())
    if losses:
        print(f"loss (generalized JSD, beta {args.beta}): first {losses[0]:.4f} -> last {losses[-1]:.4f} over "
              f"{len(losses)} steps")
    if result.divergence_before is not None and result.divergence_after is not None:
        print(f"held-out divergence: before {result.divergence_before:.4f} -> after {result.divergence_after:.4f}")
    print_outcome(result, args.demo_question)
    return 0


def train(args, *, progress: bool = True):
    """A preference (or GKD) run, with the --eval_dataset tasks scored during training."""
    from jaxswift.train.rlhf import run_rlhf

    return run_rlhf(args, progress=progress, task_scorer=task_scorer_of(args))


if __name__ == "__main__":
    sys.exit(run_main(main))
