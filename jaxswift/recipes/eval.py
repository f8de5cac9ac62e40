"""Evaluate a model: `python -m jaxswift.recipes.eval` (alias `jaxswift eval`).

    jaxswift eval                                                    # embedded SmolLM2 on the built-in sets
    jaxswift eval --adapters output/sft/adapter                      # the tuned adapter, same sets
    jaxswift eval --eval_dataset gsm8k=test.jsonl arc=arc.jsonl my_task.yaml --eval_limit 100 --num_fewshot 5
    jaxswift eval --eval_url http://localhost:8000/v1                # any OpenAI-compatible server
    jaxswift eval --compare output/eval_base output/eval_tuned       # runs side by side

Writes OUTPUT_DIR/eval_result.json (metrics, item counts, per-item records) and OUTPUT_DIR/eval_result.png.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import field
from pathlib import Path
from typing import Optional

from jaxswift.errors import ConfigError
from jaxswift.recipes.common import run_main


@dataclasses.dataclass
class EvalArguments:
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "HF folder, .gguf file or embedded name"})
    adapters: Optional[str] = field(default=None, metadata={"help": "PEFT LoRA adapter folder on top of --model"})
    eval_dataset: list[str] = field(default_factory=lambda: ["builtin"], metadata={
        "help": "builtin | FORMAT=PATH | NAME:FORMAT=PATH (formats: gsm8k arc mmlu hellaswag general_mcq "
                "general_qa) | a task YAML (lm-evaluation-harness keys)"})
    eval_limit: Optional[int] = field(default=None, metadata={"help": "the first N items of each task"})
    num_fewshot: Optional[int] = field(default=None, metadata={"help": "few-shot examples (unset: each task's own)"})
    seed: int = field(default=0, metadata={"help": "picks few-shot examples; seeds sampling"})
    temperature: float = field(default=0.0, metadata={"help": "generation tasks (0: greedy)"})
    max_new_tokens: Optional[int] = field(default=None, metadata={"help": "generation tasks (unset: each task's)"})
    eval_batch_size: int = field(default=64, metadata={"help": "generation rows decoded together (in process)"})
    eval_url: Optional[str] = field(default=None, metadata={"help": "an OpenAI-compatible server instead of --model"})
    eval_model_name: Optional[str] = field(default=None, metadata={"help": "--eval_url: the model id (unset: the "
                                                                             "server's first)"})
    eval_api_key: Optional[str] = field(default=None, metadata={"help": "--eval_url: Bearer key"})
    eval_concurrency: int = field(default=8, metadata={"help": "--eval_url: requests in flight"})
    dtype: Optional[str] = None
    output_dir: str = "output/eval"
    compare: list[str] = field(default_factory=list, metadata={"help": "eval output dirs to show side by side"})
    config: Optional[str] = None

    def __post_init__(self):
        for name in ("eval_batch_size", "eval_concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.eval_url and (self.adapters or self.dtype):
            raise ConfigError("--adapters / --dtype apply to an in-process model, not to --eval_url (serve the "
                              "adapter with `jaxswift deploy --adapters NAME=DIR` and pass --eval_model_name NAME)")
        if not self.eval_url and (self.eval_model_name or self.eval_api_key):
            raise ConfigError("--eval_model_name / --eval_api_key need --eval_url")


def _target(args: EvalArguments):
    from jaxswift.eval import InProcessTarget, RemoteTarget

    if args.eval_url:
        return RemoteTarget(args.eval_url, model=args.eval_model_name, api_key=args.eval_api_key,
                            temperature=args.temperature, seed=args.seed, concurrency=args.eval_concurrency)
    import jaxswift

    model = jaxswift.load_model(args.model, dtype=args.dtype)
    if args.adapters:
        from jaxswift.checkpoints.peft import load_peft_adapter

        params, _ = load_peft_adapter(model.params, model.config, args.adapters)
        model = dataclasses.replace(model, params=params)
    return InProcessTarget(model.params, model.config, model.tokenizer, temperature=args.temperature,
                           seed=args.seed, batch_size=args.eval_batch_size)


def main(argv: list[str]) -> int:
    from jaxswift.eval import evaluate, load_tasks
    from jaxswift.eval.report import bar_chart, compare, results_table, write_results
    from jaxswift.train.args import parse_args

    args = parse_args(EvalArguments, argv)
    out_dir = Path(args.output_dir)
    if args.compare:
        text, chart = compare(args.compare, out_dir)
        print(text + f"\n\nchart: {chart}")
        return 0
    tasks = load_tasks(args.eval_dataset)  # bad files fail before the model loads
    started = time.perf_counter()
    target = _target(args)
    results = evaluate(tasks, target, seed=args.seed, limit=args.eval_limit, num_fewshot=args.num_fewshot,
                       max_new_tokens=args.max_new_tokens, progress=lambda m: print(m, flush=True))
    seconds = time.perf_counter() - started
    name = args.eval_url or (args.model + (f" + {args.adapters}" if args.adapters else ""))
    run = {"target": name, "eval_dataset": args.eval_dataset, "eval_limit": args.eval_limit,
           "num_fewshot": args.num_fewshot, "seed": args.seed, "temperature": args.temperature, "seconds": seconds}
    path = write_results(out_dir, results, run)
    chart = bar_chart({name: {f"{r.name}/{k}": v for r in results for k, v in r.metrics.items()}},
                      out_dir / "eval_result.png", f"jaxswift eval: {name}")
    print(f"\n{results_table(results)}\n\n{seconds:.1f} s; results: {path}; chart: {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
