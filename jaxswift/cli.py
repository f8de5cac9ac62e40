"""`jaxswift <command> [flags]`: one entry point dispatching to the recipes."""

from __future__ import annotations

import importlib
import sys

from jaxswift.recipes.common import run_main

COMMANDS = {
    "sft": "jaxswift.recipes.sft",
    "vlm-demo": "jaxswift.recipes.vlm_demo",
    "rlhf": "jaxswift.recipes.rlhf",
    "grpo": "jaxswift.recipes.grpo",
    "infer": "jaxswift.recipes.infer",
    "export": "jaxswift.recipes.export",
    "plan": "jaxswift.recipes.plan",
    "deploy": "jaxswift.recipes.serve",
    "eval": "jaxswift.recipes.eval",
    "web-ui": "jaxswift.recipes.webui",
    "app": "jaxswift.recipes.app",
    "rollout": "jaxswift.recipes.rollout",
}
ALIASES = {"train": "sft", "chat": "infer", "serve": "deploy", "webui": "web-ui"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: jaxswift {{{'|'.join(COMMANDS)}}} [flags]   (jaxswift COMMAND --help for the flags)")
        return 0 if argv else 2
    command = ALIASES.get(argv[0], argv[0])
    if command not in COMMANDS:
        print(f"error: unknown command {argv[0]!r} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command])
    return run_main(module.main, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
