"""What every recipe entry point shares: device setup before JAX starts, and errors printed for people."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable

from jaxswift.errors import ConfigError, JaxswiftError

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # recipe YAMLs shipped in the wheel


def quiet_libraries():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("absl", "orbax", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.ERROR)


def task_scorer_of(args):
    """--eval_dataset of a training recipe -> the trainer's `task_scorer` (train/loop.TaskScorer), or None. The tasks
    are read here, before the model loads, so a bad task file fails at once."""
    if not args.eval_dataset:
        return None
    from jaxswift.eval import load_tasks, make_evaluator

    tasks = load_tasks(args.eval_dataset)
    return lambda tokenizer, cfg: make_evaluator(tasks, tokenizer, cfg, seed=args.seed, limit=args.eval_limit)


def run_main(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Runs a recipe; a JaxswiftError (bad flag, file, row...) prints one line and exits with status 2."""
    quiet_libraries()
    try:
        return main(with_config_path(sys.argv[1:] if argv is None else argv)) or 0
    except JaxswiftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def resolve_config(name_or_path: str) -> str:
    """`--config` value -> a YAML path: an existing file as given, else a config shipped with jaxswift by name
    (`sft_lora_smollm2` or `sft_lora_smollm2.yaml`, from jaxswift/recipes/configs/)."""
    if Path(name_or_path).is_file():
        return name_or_path
    packaged = CONFIGS_DIR / Path(name_or_path).name
    packaged = packaged if packaged.suffix in (".yaml", ".yml") else packaged.with_name(packaged.name + ".yaml")
    if packaged.is_file() and Path(name_or_path).parent == Path("."):
        return str(packaged)
    known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
    raise ConfigError(f"--config {name_or_path}: no such file, and no config of that name ships with jaxswift "
                      f"(shipped: {known})")


def with_config_path(argv: list[str]) -> list[str]:
    """argv with a `--config NAME` (or `--config=NAME`) rewritten to the path `resolve_config` finds."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            argv[i + 1] = resolve_config(argv[i + 1])
        elif arg.startswith("--config="):
            argv[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    return argv


# What a config's `recipe:` key may name, per command that reads configs: `jaxswift sft --config
# sft_vlm_shapes.yaml` runs the picture demo (recipes/vlm_demo.py), whose config says `recipe: vlm_demo`.
CONFIG_RECIPES = {"sft": ("vlm_demo",)}


def config_recipe(argv: list[str], command: str) -> str:
    """The recipe argv's `--config` YAML asks for with its `recipe:` key, or `command` itself when it has none (a
    file that is not YAML is left to the recipe's own parser, which names the problem)."""
    import yaml

    paths = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    paths += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    if not paths or not Path(paths[-1]).is_file():
        return command
    try:
        raw = yaml.safe_load(Path(paths[-1]).read_text())
    except yaml.YAMLError:
        return command
    if not isinstance(raw, dict) or "recipe" not in raw:
        return command
    known = CONFIG_RECIPES.get(command, ())
    if raw["recipe"] not in known:
        raise ConfigError(f"{paths[-1]}: recipe {raw['recipe']!r} cannot run under `jaxswift {command}` "
                          f"(a config for it names no recipe{', or one of: ' + ', '.join(known) if known else ''})")
    return raw["recipe"]


def print_outcome(result, demo_question: str):
    """What every training recipe prints last: the demo answer before and after, and where the model went."""
    if result.demo_before is not None:
        print(f"\nQ: {demo_question}\nbefore: {result.demo_before}\nafter:  {result.demo_after}")
    print(f"\nsaved to {result.output_dir} (final model: {result.export_dir})")
