"""Prefix caching: time to first token of a request whose prompt starts with a long prefix the server has seen
before (a chat front-end resending its system prompt), vs the first request with that prefix; SmolLM2-135M-Instruct,
float32, CPU, one run.

    python benchmarks/serve_prefix.py               # the acceptance run: a 1,000-token shared prefix
    python benchmarks/serve_prefix.py --smoke       # tiny random model, short prefix: checks the script runs

Workload, per round (--rounds, each with a new prefix text, so every round's first request misses the cache): a
system prompt of exactly --prefix_tokens tokens, then a short user question (SmolLM2's chat template), one request
at a time, max_tokens 1 (the request ends at its first token, so its latency is its TTFT). Request 1 carries the
new prefix; request 2 the same prefix and another question.
  - jaxswift, prefix caching on: the Orchestrator in this process (no HTTP), engine defaults (page 16); request 2
    reuses the prefix's cached pages and prefills only the rest.
  - jaxswift, prefix caching off: the same, `enable_prefix_caching=False` (request 2 runs its whole prompt).
  - transformers: `generate(max_new_tokens=1)` on each prompt, the peer's TTFT for the same prompts.
Both jaxswift engines first run one untimed round (it compiles the prefill shapes: whole prompt, and rest after a
cached prefix); transformers runs one untimed request. Figures are medians over the rounds.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from serve import load_hf, log, tiny_model_folder  # noqa: E402  (the serving benchmark's model loaders)

TOPICS = ["the history of the printing press", "how tides work", "the life cycle of stars", "bread baking",
          "the rules of chess", "migratory birds", "the water cycle", "early computers"]
QUESTIONS = ["Summarise the text in one sentence.", "What is the main idea?", "Give the text a title.",
             "Name one fact from the text."]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix_tokens", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max_model_len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 100-token prefix, 2 rounds")
    args = p.parse_args(argv)
    if args.smoke:
        args.prefix_tokens, args.rounds, args.max_model_len = 100, 2, 256
    if args.rounds < 1 or args.prefix_tokens < 1:
        p.error("--rounds and --prefix_tokens must be positive")
    return args


def system_prompt(tokenizer, topic: str, tokens: int) -> str:
    """A system prompt of exactly `tokens` tokens (alone) about `topic`: numbered sentences, cut to length."""
    sentences = " ".join(f"Note {i} on {topic}: this fact number {i} is part of the reference text." for i in
                         range(tokens))
    return tokenizer.decode(tokenizer.encode(sentences)[:tokens])


def prompts_of_round(tokenizer, r: int, prefix_tokens: int) -> list[list[int]]:
    system = system_prompt(tokenizer, TOPICS[r % len(TOPICS)] + f" (part {r})", prefix_tokens)
    return [tokenizer.apply_chat_template([{"role": "system", "content": system},
                                           {"role": "user", "content": QUESTIONS[(r + i) % len(QUESTIONS)]}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
            for i in range(2)]


def shared_length(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def jaxswift_ttft(orchestrator, ids: list[int]) -> float:
    from jaxswift.infer.engine_api import RequestSampling
    from jaxswift.infer.orchestrator import GenerationRequest

    start = time.perf_counter()
    (chunk,) = orchestrator.generate([GenerationRequest(ids, RequestSampling(max_tokens=1))])
    assert chunk.error is None, chunk.error
    return time.perf_counter() - start


def hf_ttft(model, ids: list[int]) -> float:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        model.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False)
    return time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    import jaxswift
    from jaxswift.checkpoints.registry import resolve_model_path
    from jaxswift.infer.engine import JaxEngine
    from jaxswift.infer.orchestrator import Orchestrator

    source = tiny_model_folder() if args.smoke else str(resolve_model_path("smollm2-135m-instruct"))
    model = jaxswift.load_model(source, dtype="float32")
    rounds = [prompts_of_round(model.tokenizer, r, args.prefix_tokens) for r in range(args.rounds + 1)]
    shared = min(shared_length(*pair) for pair in rounds)
    log(f"prompts of {len(rounds[1][0])} / {len(rounds[1][1])} tokens sharing their first {shared}")

    results = {}
    for name, caching in (("jaxswift, prefix caching on", True), ("jaxswift, prefix caching off", False)):
        engine = JaxEngine(model, max_concurrent_decodes=4, max_model_len=args.max_model_len,
                           enable_prefix_caching=caching)
        orchestrator = Orchestrator(engine)
        try:
            for ids in rounds[0]:  # untimed: compiles
                jaxswift_ttft(orchestrator, ids)
            hits = engine.prefix_cache_hit_tokens
            results[name] = [[jaxswift_ttft(orchestrator, ids) for ids in pair] for pair in rounds[1:]]
            log(f"{name}: {results[name]}; prompt tokens from the cache {engine.prefix_cache_hit_tokens - hits}")
        finally:
            orchestrator.shutdown()
    hf = load_hf(source, args.threads)
    hf_ttft(hf, rounds[0][0])
    results["transformers generate"] = [[hf_ttft(hf, ids) for ids in pair] for pair in rounds[1:]]
    log(f"transformers: {results['transformers generate']}")

    print(f"\nprefix {args.prefix_tokens} tokens (+ template and question: {len(rounds[1][0])} tokens in all, "
          f"{shared} shared), {args.rounds} rounds, medians; jax {jax.__version__}, torch "
          f"{importlib.metadata.version('torch')}, transformers {importlib.metadata.version('transformers')}, "
          f"{os.cpu_count()} CPUs\n")
    print("| server | TTFT request 1 (new prefix) ms | TTFT request 2 (same prefix) ms | request 2 / request 1 |")
    print("|---|---:|---:|---:|")
    for name, pairs in results.items():
        first = statistics.median(p[0] for p in pairs) * 1e3
        second = statistics.median(p[1] for p in pairs) * 1e3
        print(f"| {name} | {first:.0f} | {second:.0f} | {second / first:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
