"""GRPO-family training: `python -m jaxswift.recipes.grpo [--flags ...]` (or `jaxswift grpo ...`).

With no flags: LoRA GRPO on smollm2-135m-instruct over the built-in arithmetic prompts, rewarded by the exact
answer and the <answer></answer> format; prints the mean reward of the first and last quarter of the steps.
"""

from __future__ import annotations

import sys

from jaxswift.recipes.common import print_outcome, run_main, task_scorer_of


def main(argv: list[str]) -> int:
    from jaxswift.parallel.distributed import check_same_flags, initialize_distributed
    from jaxswift.train.args import parse_args
    from jaxswift.train.grpo_args import GrpoArguments

    args = parse_args(GrpoArguments, argv)
    # before JAX creates its backend: join a multi-process job, and on CPU make this process's virtual devices
    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id, mesh=args.mesh)
    check_same_flags(args)
    result = train(args)
    print(f"mean reward: first quarter of the steps {result.reward_first:.3f} -> last quarter "
          f"{result.reward_last:.3f} over {len(result.history)} steps")
    print_outcome(result, args.demo_question)
    return 0


def train(args, *, progress: bool = True):
    """GRPO with its rl/ parts (rewards, rollout backend) built from the arguments, and the --eval_dataset tasks
    scored during training."""
    from jaxswift.rl import rewards, samplers
    from jaxswift.train.grpo import GrpoParts, run_grpo

    funcs, weights = samplers.reward_funcs(args)
    parts = GrpoParts(funcs, weights, rewards.score, samplers.sampler_factory(args))
    return run_grpo(args, parts, progress=progress, task_scorer=task_scorer_of(args))


if __name__ == "__main__":
    sys.exit(run_main(main))
