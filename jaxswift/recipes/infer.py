"""Chat with a model: `python -m jaxswift.recipes.infer --model smollm2-135m-instruct --prompt "Hi"`.

Without --prompt: an interactive chat (empty line or Ctrl-D to quit). With --adapters DIR: a PEFT LoRA adapter
on top of the model.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import field
from typing import Optional

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
    config: Optional[str] = None


def _load(args: InferArguments):
    import jaxswift

    model = jaxswift.load_model(args.model, dtype=args.dtype)
    if args.adapters:
        from jaxswift.checkpoints.peft import load_peft_adapter

        params, _ = load_peft_adapter(model.params, model.config, args.adapters)
        model = dataclasses.replace(model, params=params)
    return model


def main(argv: list[str]) -> int:
    import jaxswift
    from jaxswift.train.args import parse_args

    args = parse_args(InferArguments, argv)
    model = _load(args)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, seed=args.seed)
    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        print(jaxswift.chat(model, history + [{"role": "user", "content": args.prompt}], **sampling))
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
