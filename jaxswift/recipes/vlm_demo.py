"""The picture demo: `python -m jaxswift.recipes.vlm_demo` teaches a language model to see, in minutes on a CPU.

The embedded SmolLM2 grows into a Qwen2-VL model whose vision tower and patch merger start from scratch
(checkpoints/vlm_from_llm.py), then SFT trains them (and, by default, the LLM with them) on pictures of shapes the
project draws itself (data/shapes.py), each described in three words: how many, what colour, which shape ("two red
circles"). Held-out accuracy is scored by greedy generation before training, at every --eval_steps and at the end:
each part of the description on its own (chance: a quarter to a third), `accuracy` their mean and `whole` the
descriptions right in all three, logged as eval/shapes/* next to the loss. Every SFT flag applies; the demo's own
are --train_rows, --test_rows and --image_size. With --model a Qwen2-VL folder it trains that model instead of
growing one.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import field
from pathlib import Path
from typing import ClassVar, Optional

from jaxswift.data.shapes import CELL, PARTS, read_description
from jaxswift.recipes.common import print_outcome, run_main
from jaxswift.train.args import SftArguments, parse_args

DEMO_DEFAULTS = "the demo draws its own pictures: set --train_rows, --test_rows and --image_size instead"


@dataclasses.dataclass
class VlmDemoArguments(SftArguments):
    RECIPE: ClassVar[str] = "vlm_demo"
    UNUSED: ClassVar[dict[str, str]] = {
        "dataset": DEMO_DEFAULTS, "val_dataset": DEMO_DEFAULTS, "split_dataset_ratio": DEMO_DEFAULTS,
        "eval_dataset": "the demo scores its own held-out pictures (eval/shapes/accuracy)",
        "eval_limit": "the demo scores its own held-out pictures (--test_rows)",
        "demo_question": "the demo's question is the held-out accuracy",
        "demo_max_new_tokens": "the demo's question is the held-out accuracy",
    }

    recipe: str = field(default="vlm_demo", metadata={
        "help": "vlm_demo (the only value): a config that says so runs this demo under `jaxswift sft --config`"})
    model: str = field(default="smollm2-135m-instruct", metadata={
        "help": "a text model (llama / qwen2) to grow a Qwen2-VL model from, or a Qwen2-VL folder"})
    output_dir: str = "output/vlm_demo"
    # the scratch tower and the merger train in full, the LLM through LoRA (ms-swift's "LoRA LLM, full ViT")
    tuner_type: str = "lora"
    modules_to_save: list[str] = field(default_factory=lambda: ["vision", "aligner"])
    learning_rate: float = 5e-4
    vit_lr: Optional[float] = 1e-3
    # low: Adam moves each of the merger's last-layer weights by ~lr a step, and over its 768 inputs that adds up to
    # ~300 x lr per feature coordinate, against token embeddings of RMS ~0.14 (feature norm after 10 steps:
    # x4.5 at 1e-3, x3 at 3e-4, x2.3 at 1e-4; docs/multimodal.md, the picture demo)
    aligner_lr: Optional[float] = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    num_train_epochs: int = 1
    max_length: int = 512
    gradient_checkpointing: bool = False  # 512-token rows of a 135M model fit without recomputing activations
    system: Optional[str] = field(default="", metadata={"help": "empty: a bare system turn (shorter rows)"})
    logging_steps: int = 5
    eval_steps: int = 50
    demo_question: str = ""
    # the demo's own
    train_rows: int = field(default=2000, metadata={"help": "pictures to train on (one description each)"})
    test_rows: int = field(default=60, metadata={"help": "held-out pictures (another seed), one description each"})
    image_size: int = field(default=56, metadata={
        "help": "picture side in pixels, a multiple of 28 (56: 2 x 2 cells of a shape each, 4 image tokens)"})

    def __post_init__(self):
        super().__post_init__()
        from jaxswift.errors import ConfigError

        if self.recipe != "vlm_demo":
            raise ConfigError(f"--recipe {self.recipe!r}: the picture demo's configs say recipe: vlm_demo")
        if min(self.train_rows, self.test_rows) < 1:
            raise ConfigError(f"--train_rows {self.train_rows} / --test_rows {self.test_rows}: both must be >= 1")
        if self.image_size < 56 or self.image_size % CELL:
            # a side off the grid would be resized by the processor, and shapes would straddle image tokens again
            raise ConfigError(f"--image_size {self.image_size}: a multiple of {CELL} (one image token's cell), "
                              f">= 56 (room for three shapes)")


def demo_model(args: VlmDemoArguments, out: Path) -> str:
    """--model as a Qwen2-VL folder: the grown one under output_dir (built once), or the folder given."""
    import jaxswift
    from jaxswift.checkpoints.registry import resolve_model_path
    from jaxswift.checkpoints.vlm import read_vlm_config
    from jaxswift.checkpoints.vlm_from_llm import grow_qwen2_vl

    source = resolve_model_path(args.model)
    if source.is_dir() and read_vlm_config(source) is not None:
        return str(source)
    grown = out / "grown_model"
    # built once per (model, seed, size); `merger` marks folders grown before the merger was scaled at init
    recipe = {"model": str(source), "seed": args.seed, "image_size": args.image_size, "merger": "embedding-scale"}
    marker = grown / "grown_from.json"
    if not marker.is_file() or json.loads(marker.read_text()) != recipe:
        text = jaxswift.load_model(args.model)
        print(f"growing a Qwen2-VL model from {args.model}: its LLM, a vision tower and merger from scratch")
        grow_qwen2_vl(text.params, text.config, text.tokenizer, grown, seed=args.seed,
                      max_pixels=args.image_size ** 2, min_pixels=min(56 * 56, args.image_size ** 2))
        marker.write_text(json.dumps(recipe))
    return str(grown)


def held_out_prompts(rows: list[dict], processor, system: str | None) -> list:
    """Each held-out row's question as a prompt (MultimodalPrompt), with the training rows' system turn."""
    from jaxswift.data.multimodal import row_messages_with_media
    from jaxswift.data.templates import with_system

    return [processor.encode_chat(with_system(row_messages_with_media(row, f"held-out row {i}")[:1], system),
                                  where=f"held-out row {i}") for i, row in enumerate(rows)]


def shapes_scorer(rows: list[dict], folder: str, system: str | None = None, batch_size: int = 16):
    """The trainer's task scorer (train/loop.TaskScorer) for the held-out rows: the greedy descriptions' first three
    words read as count, colour and shape (data/shapes.read_description), each part right or wrong; `accuracy` is
    the mean over the parts, `whole` the share of descriptions right in all three. `system`: the system turn the
    training rows were encoded with (--system), so that held-out prompts read as the training ones did (None: the
    chat template's default system line)."""
    from jaxswift.api import Model, generate_ids
    from jaxswift.data.multimodal_vit import vit_processor_class

    def make(tokenizer, cfg):
        processor = vit_processor_class(cfg).from_folder(folder, cfg, tokenizer)
        prompts = held_out_prompts(rows, processor, system)

        def score(params) -> dict:
            model = Model(cfg, params, tokenizer, folder, processor)
            answers = []
            for start in range(0, len(prompts), batch_size):
                ids = generate_ids(model, prompts[start:start + batch_size], max_new_tokens=4)
                answers += [read_description(tokenizer.decode(a, skip_special_tokens=True)) for a in ids]
            parts = {part: [a[part] == row["truth"][part] for a, row in zip(answers, rows)] for part in PARTS}
            out = {"shapes/accuracy": sum(map(sum, parts.values())) / (len(PARTS) * len(rows)),
                   "shapes/whole": sum(all(p) for p in zip(*parts.values())) / len(rows)}
            out |= {f"shapes/{part}": sum(right) / len(rows) for part, right in parts.items()}
            return out
        return score
    return make


def main(argv: list[str]) -> int:
    args = parse_args(VlmDemoArguments, argv)
    import jaxswift
    from jaxswift.data.shapes import shapes_rows, write_jsonl
    from jaxswift.train.sft import run_sft
    from jaxswift.train.logging import append_record

    out = Path(args.output_dir)
    model_dir = demo_model(args, out)
    train_file = write_jsonl(shapes_rows(args.train_rows, seed=args.seed, size=args.image_size),
                             out / "data" / "train.jsonl")
    test_rows = shapes_rows(args.test_rows, seed=args.seed + 1, size=args.image_size)
    write_jsonl(test_rows, out / "data" / "test.jsonl")
    scorer = shapes_scorer(test_rows, model_dir, args.system)
    untrained = jaxswift.load_model(model_dir)
    before = scorer(untrained.tokenizer, untrained.config)(untrained.params)
    del untrained
    print(f"held-out accuracy before training: {_accuracies(before)} (the tower starts from scratch)")
    append_record(out, {"step": 0, "split": "eval", **before})  # step 0 of the eval curves in loss.png
    sft_args = SftArguments(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SftArguments)}
                            | {"model": model_dir, "dataset": [str(train_file)]})
    result = run_sft(sft_args, task_scorer=scorer)
    after = result.eval_metrics[max(result.eval_metrics)] if result.eval_metrics else None
    if after is not None:
        print(f"held-out accuracy after training:  {_accuracies(after)}")
    print_outcome(result, "")
    return 0


def _accuracies(metrics: dict) -> str:
    parts = ", ".join(f"{part} {metrics[f'shapes/{part}']:.0%}" for part in PARTS)
    return f"{metrics['shapes/accuracy']:.0%} ({parts}; whole descriptions right: {metrics['shapes/whole']:.0%})"


if __name__ == "__main__":
    sys.exit(run_main(main))
