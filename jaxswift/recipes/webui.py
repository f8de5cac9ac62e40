"""The web UI: `python -m jaxswift.recipes.webui [--port 7860] [--lang en|zh] [--output_root ./output]` (or
`jaxswift web-ui`). Needs the `webui` extra: `pip install -e ".[webui]"`.

Tabs for SFT, RLHF, GRPO, Export, Plan (and Eval where the eval recipe exists), Chat and Runs. Launching a form
starts the recipe as its own process writing to its output_dir under --output_root; the Runs tab finds every run
there again after a restart. Chat talks to a model loaded in this process, or to `--base_url` of a running server.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import field
from pathlib import Path
from typing import Optional

from jaxswift.errors import ConfigError
from jaxswift.recipes.common import run_main


@dataclasses.dataclass
class WebUIArguments:
    host: str = "127.0.0.1"
    port: int = 7860
    lang: str = field(default="en", metadata={"help": "en | zh"})
    output_root: str = field(default="output", metadata={"help": "where runs are launched and looked for"})
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "Chat tab: the model proposed to load"})
    base_url: Optional[str] = field(default=None, metadata={"help": "Chat tab: a running OpenAI-compatible server "
                                                                      "instead of a local model"})
    api_key: Optional[str] = field(default=None, metadata={"help": "Chat tab: the server's key (with --base_url)"})
    max_concurrency: Optional[int] = field(default=2, metadata={"help": "Chat: requests in flight per client"})
    rate_limit: Optional[str] = field(default=None, metadata={"help": "Chat: requests per client, e.g. 30/minute"})
    max_num_seqs: int = field(default=4, metadata={"help": "Chat: generations decoded together (local model)"})
    max_model_len: int = field(default=2048, metadata={"help": "Chat: prompt + answer tokens (local model)"})
    config: Optional[str] = None

    def __post_init__(self):
        for name in ("port", "max_num_seqs", "max_model_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")


def context(args, **extra):
    """The UI's settings from the flags; a bad --lang / --rate_limit / --max_concurrency fails here."""
    try:
        from jaxswift.webui.app import UIContext
    except ImportError as e:
        raise ConfigError(f"the web UI needs gradio: pip install -e \".[webui]\" ({e})") from None
    from jaxswift.serve.limits import ClientLimits
    from jaxswift.webui.labels import labels

    labels(args.lang)
    ClientLimits(args.rate_limit, args.max_concurrency)
    settings = dict(output_root=Path(getattr(args, "output_root", "output")), lang=args.lang,
                    base_url=args.base_url, api_key=args.api_key, chat_model=args.model or "",
                    max_concurrency=args.max_concurrency, rate_limit=args.rate_limit,
                    max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len)
    return UIContext(**{**settings, **extra})


def main(argv: list[str]) -> int:
    from jaxswift.train.args import parse_args

    args = parse_args(WebUIArguments, argv)
    ctx = context(args)
    from jaxswift.webui.app import build_ui, serve

    ctx.output_root.mkdir(parents=True, exist_ok=True)
    serve(build_ui(ctx), args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
