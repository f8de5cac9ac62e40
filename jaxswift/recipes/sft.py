"""Supervised fine-tuning: `python -m jaxswift.recipes.sft [--config FILE] [--flags ...]`.

With no flags: LoRA on smollm2-135m-instruct with the built-in self-identity dataset, a few minutes on a CPU.
A config whose `recipe:` key names another SFT recipe runs that one (`--config sft_vlm_shapes.yaml`: the picture
demo, recipes/vlm_demo.py).
"""

from __future__ import annotations

import sys

from jaxswift.recipes.common import config_recipe, print_outcome, run_main, task_scorer_of


def main(argv: list[str]) -> int:
    if config_recipe(argv, "sft") == "vlm_demo":
        from jaxswift.recipes import vlm_demo

        return vlm_demo.main(argv)
    from jaxswift.parallel.distributed import check_same_flags, initialize_distributed
    from jaxswift.train.args import SftArguments, parse_args

    args = parse_args(SftArguments, argv)
    # before JAX creates its backend: join a multi-process job, and on CPU make this process's virtual devices
    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id, mesh=args.mesh)
    check_same_flags(args)
    result = train(args)
    losses = list(result.losses.values())
    if losses:
        print(f"loss: first {losses[0]:.4f} -> last {losses[-1]:.4f} over {len(losses)} steps")
    if result.eval_losses:
        print(f"eval loss: {list(result.eval_losses.values())[-1]:.4f}")
    print_outcome(result, args.demo_question)
    return 0


def train(args, *, progress: bool = True):
    """SFT, with the --eval_dataset tasks scored during training."""
    from jaxswift.train.sft import run_sft

    return run_sft(args, progress=progress, task_scorer=task_scorer_of(args))


if __name__ == "__main__":
    sys.exit(run_main(main))
