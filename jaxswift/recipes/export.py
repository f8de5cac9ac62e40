"""Export: `python -m jaxswift.recipes.export --adapters DIR --merge_lora true --output_dir OUT`.

Writes a full Hugging Face folder: the base model (from --model, or the adapter's base_model_name_or_path) with the
PEFT LoRA adapter merged into its weights. Without --adapters it converts --model (e.g. a GGUF) to an HF folder.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import field
from pathlib import Path
from typing import Optional

from jaxswift.recipes.common import run_main


@dataclasses.dataclass
class ExportArguments:
    model: Optional[str] = field(default=None, metadata={"help": "base model (default: the adapter's base)"})
    adapters: Optional[str] = field(default=None, metadata={"help": "PEFT LoRA adapter folder"})
    merge_lora: bool = True
    output_dir: Optional[str] = None
    dtype: Optional[str] = None
    config: Optional[str] = None


def _base_model(args: ExportArguments) -> str:
    from jaxswift.errors import ConfigError

    if args.model:
        return args.model
    if not args.adapters:
        raise ConfigError("give --model (to convert) or --adapters (to merge)")
    config = Path(args.adapters) / "adapter_config.json"
    if not config.is_file():
        raise ConfigError(f"--adapters {args.adapters}: no adapter_config.json")
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{config}: no base_model_name_or_path; pass --model")
    return base


def main(argv: list[str]) -> int:
    import jaxswift
    from jaxswift.errors import ConfigError
    from jaxswift.train.args import parse_args

    args = parse_args(ExportArguments, argv)
    if args.adapters and not args.merge_lora:
        raise ConfigError("--merge_lora false: the adapter folder already is the unmerged export")
    model = jaxswift.load_model(_base_model(args), dtype=args.dtype)
    out = Path(args.output_dir or (f"{args.adapters.rstrip('/')}-merged" if args.adapters else "exported"))
    if args.adapters:
        from jaxswift.checkpoints.peft import load_peft_adapter, merge_and_save

        params, _ = load_peft_adapter(model.params, model.config, args.adapters)
        merge_and_save(dataclasses.replace(model, params=params), out)
    else:
        jaxswift.save_model(model, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
