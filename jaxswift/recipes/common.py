"""What every recipe entry point shares: device setup before JAX starts, and errors printed for people."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from jaxswift.errors import JaxswiftError


def quiet_libraries():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("absl", "orbax", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_main(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Runs a recipe; a JaxswiftError (bad flag, file, row...) prints one line and exits with status 2."""
    quiet_libraries()
    try:
        return main(sys.argv[1:] if argv is None else argv) or 0
    except JaxswiftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def print_outcome(result, demo_question: str):
    """What every training recipe prints last: the demo answer before and after, and where the model went."""
    if result.demo_before is not None:
        print(f"\nQ: {demo_question}\nbefore: {result.demo_before}\nafter:  {result.demo_after}")
    print(f"\nsaved to {result.output_dir} (final model: {result.export_dir})")
