"""A rollout server for GRPO: `jaxswift rollout --model smollm2-135m-instruct --port 8001` (ms-swift's `swift
rollout`). It loads the model on its own devices (start it with its own CUDA_VISIBLE_DEVICES / TPU chips, or on
another host) and serves generation to `jaxswift grpo --rollout_mode server --rollout_url http://HOST:8001`, which
pushes its weights after each update (protocol: jaxswift/infer/rollout_remote.py).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import field
from typing import Optional

from jaxswift.errors import ConfigError
from jaxswift.recipes.common import run_main


@dataclasses.dataclass
class RolloutArguments:
    model: str = field(default="smollm2-135m-instruct", metadata={
        "help": "the trainer's --model (HF folder, .gguf file or embedded name): its structure receives the pushes"})
    dtype: Optional[str] = field(default=None, metadata={"help": "the trainer's --dtype (pushes must match it)"})
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "warning"
    config: Optional[str] = None

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")


def main(argv: list[str]) -> int:
    import jaxswift
    from jaxswift.serve.rollout_server import RolloutService, serve_rollouts
    from jaxswift.train.args import parse_args

    args = parse_args(RolloutArguments, argv)
    model = jaxswift.load_model(args.model, dtype=args.dtype, load_tokenizer=False)
    if model.is_vlm:
        raise ConfigError(f"--model {args.model}: a vision-language model; the rollout server serves text models")
    service = RolloutService(model, name=args.model)
    print(f"rollout server for {args.model} on http://{args.host}:{args.port}", flush=True)
    serve_rollouts(service, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
