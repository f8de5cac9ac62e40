"""A chat page for one model: `python -m jaxswift.recipes.app --model DIR [--adapters DIR]` or `--base_url URL` of
a running server (or `jaxswift app ...`). Inference only: no training forms, no runs. Needs the `webui` extra."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import field
from typing import Optional

from jaxswift.errors import ConfigError
from jaxswift.recipes.common import run_main


@dataclasses.dataclass
class AppArguments:
    model: Optional[str] = field(default=None, metadata={"help": "HF folder, .gguf file or embedded name (or the "
                                                                  "model id on --base_url)"})
    adapters: Optional[str] = field(default=None, metadata={"help": "PEFT LoRA adapter folder on top of --model"})
    base_url: Optional[str] = field(default=None, metadata={"help": "a running OpenAI-compatible server"})
    api_key: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 7860
    lang: str = field(default="en", metadata={"help": "en | zh"})
    max_concurrency: Optional[int] = field(default=2, metadata={"help": "requests in flight per client"})
    rate_limit: Optional[str] = field(default=None, metadata={"help": "requests per client, e.g. 30/minute"})
    max_num_seqs: int = field(default=4, metadata={"help": "generations decoded together (local model)"})
    max_model_len: int = field(default=2048, metadata={"help": "prompt + answer tokens (local model)"})
    config: Optional[str] = None

    def __post_init__(self):
        if not self.model and not self.base_url:
            raise ConfigError("give --model (a local model) or --base_url (a running server)")
        if self.base_url and self.adapters:
            raise ConfigError("--adapters applies to a local --model; a server serves its adapters as model ids")
        for name in ("port", "max_num_seqs", "max_model_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")


def main(argv: list[str]) -> int:
    from jaxswift.recipes.webui import context
    from jaxswift.train.args import parse_args

    args = parse_args(AppArguments, argv)
    ctx = context(args)
    from jaxswift.webui.app import build_chat_app, serve
    from jaxswift.webui.chat import ChatState

    state = ChatState(ctx)
    backend = state.load(args.model or "", args.adapters)
    print(f"chat page for {backend.name}")
    serve(build_chat_app(ctx, state), args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
