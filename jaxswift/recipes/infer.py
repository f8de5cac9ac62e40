"""Chat with a model: `python -m jaxswift.recipes.infer --model smollm2-135m-instruct --prompt "Hi"`.

Without --prompt: an interactive chat (empty line or Ctrl-D to quit). With --adapters DIR: a PEFT LoRA adapter
on top of the model. Batch mode, through the serving engine (continuous batching) with a progress bar:
`--dataset rows.jsonl --result_path out.jsonl` generates each row's last assistant turn (rows in any SFT format;
a final assistant turn, if present, is dropped and kept as `labels`) and writes one JSON line per input row.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import field
from typing import Optional

from jaxswift.errors import ConfigError
from jaxswift.recipes.common import run_main


@dataclasses.dataclass
class InferArguments:
    model: str = "smollm2-135m-instruct"
    adapters: Optional[str] = field(default=None, metadata={"help": "PEFT LoRA adapter folder"})
    prompt: Optional[str] = None
    system: Optional[str] = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    dtype: Optional[str] = None
    quant_method: Optional[str] = field(default=None, metadata={"help": "int8 | nf4: quantize a float model's "
                                                                       "projections on load"})
    dataset: Optional[str] = field(default=None, metadata={"help": "batch mode: rows to answer (SFT formats)"})
    result_path: Optional[str] = field(default=None, metadata={"help": "batch mode: output JSONL"})
    max_num_seqs: int = field(default=8, metadata={"help": "batch mode: requests decoded together"})
    max_model_len: int = field(default=2048, metadata={"help": "batch mode: prompt + completion tokens"})
    images: Optional[list[str]] = field(default=None, metadata={
        "help": "vision-language models: images (paths or data URLs) shown before --prompt, in one user turn"})
    max_pixels: Optional[int] = field(default=None, metadata={"help": "VLMs: most pixels per image after resizing"})
    min_pixels: Optional[int] = field(default=None, metadata={"help": "VLMs: fewest pixels per image after resizing"})
    config: Optional[str] = None

    def __post_init__(self):
        from jaxswift.recipes.serve import check_quant_method

        check_quant_method(self.quant_method)


def _load(args: InferArguments):
    from jaxswift.recipes.serve import load_for_inference

    model = load_for_inference(args.model, args.dtype, args.quant_method, min_pixels=args.min_pixels,
                               max_pixels=args.max_pixels)
    if args.images and not model.is_vlm:
        raise ConfigError(f"--images: {args.model} is a text-only model")
    if args.images and (args.prompt is None or args.dataset is not None):
        raise ConfigError("--images goes with --prompt (one user turn: the images, then the text)")
    if args.adapters and model.is_vlm:
        from jaxswift.checkpoints.vlm_peft import load_vlm_peft_adapter

        params, _ = load_vlm_peft_adapter(model.params, model.config, args.adapters)
        model = dataclasses.replace(model, params=params)
    elif args.adapters:
        from jaxswift.checkpoints.peft import load_peft_adapter

        params, _ = load_peft_adapter(model.params, model.config, args.adapters)
        model = dataclasses.replace(model, params=params)
    return model


def main(argv: list[str]) -> int:
    import jaxswift
    from jaxswift.train.args import parse_args

    args = parse_args(InferArguments, argv)
    if (args.dataset is None) != (args.result_path is None):
        raise ConfigError("batch mode needs both --dataset and --result_path")
    model = _load(args)
    if args.dataset is not None:
        from jaxswift.infer.batch import infer_dataset

        n = infer_dataset(model, args.dataset, args.result_path, max_new_tokens=args.max_new_tokens,
                          max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                          sampling=dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k),
                          seed=args.seed, system=args.system)
        print(f"wrote {n} responses to {args.result_path}")
        return 0
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, seed=args.seed)
    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        content = args.prompt if not args.images else [{"type": "image", "image": path} for path in args.images] + [
            {"type": "text", "text": args.prompt}]
        print(jaxswift.chat(model, history + [{"role": "user", "content": content}], **sampling))
        return 0
    print(f"chatting with {args.model} (empty line to quit)")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return 0
        if not line:
            return 0
        history.append({"role": "user", "content": line})
        reply = jaxswift.chat(model, history, **sampling)
        history.append({"role": "assistant", "content": reply})
        print(f"bot> {reply}")


if __name__ == "__main__":
    sys.exit(run_main(main))
