"""Structured output's cost: 8 concurrent requests constrained by a JSON schema vs the same 8 unconstrained, through
jaxswift's Orchestrator (no HTTP), SmolLM2-135M-Instruct, float32, CPU, one run.

    python benchmarks/serve_structured.py            # the acceptance row (>= 80% of unconstrained tokens/s)
    python benchmarks/serve_structured.py --smoke    # tiny random model: checks the script runs

Each request asks for exactly --new_tokens tokens at temperature 1.0 (ignore_eos; the schema's array of bounded
strings has no length limit, so a constrained request never completes before max_tokens: both sides generate the
same number of tokens). Output tokens/s = all generated tokens / wall time of the wave; the constrained side pays
the host's per-token grammar advance and bitmask write and the jitted mask. One untimed wave of each first
(compiles, and the schema's index is built and cached).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 12}}},
          "required": ["items"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(__file__))
    import jaxswift
    from jaxswift.infer.engine import JaxEngine
    from jaxswift.infer.engine_api import RequestSampling
    from jaxswift.infer.orchestrator import GenerationRequest, Orchestrator

    if args.smoke:
        from serve import tiny_model_folder

        source, args.new_tokens = tiny_model_folder(), 8
    else:
        source = "smollm2-135m-instruct"
    model = jaxswift.load_model(source)
    engine = JaxEngine(model, max_concurrent_decodes=args.clients, max_model_len=256, prefill_buckets=(64, 128))
    engine.warmup()
    orchestrator = Orchestrator(engine)
    t0 = time.perf_counter()
    constraint = engine.grammar.json_schema(SCHEMA)
    compile_s = time.perf_counter() - t0
    questions = [f"List {i + 3} fruits as JSON." for i in range(args.clients)]
    prompts = [model.tokenizer.encode(model.tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True), add_special_tokens=False)
        for q in questions]

    def wave(constrained: bool) -> tuple[float, int, list[str]]:
        requests = [GenerationRequest(tuple(ids), RequestSampling(
            temperature=1.0, seed=i, max_tokens=args.new_tokens, ignore_eos=True,
            constraint=constraint if constrained else None)) for i, ids in enumerate(prompts)]
        start = time.perf_counter()
        out = orchestrator.generate(requests)
        wall = time.perf_counter() - start
        errors = [c.error for c in out if c.error is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
        return wall, sum(len(c.token_ids) for c in out), [c.text for c in out]

    rows = {}
    for constrained in (False, True):
        wave(constrained)  # untimed: compiles
        wall, tokens, texts = wave(constrained)
        rows[constrained] = tokens / wall
        print(f"{'constrained' if constrained else 'unconstrained'}: {tokens} tokens in {wall:.2f}s = "
              f"{tokens / wall:.1f} tokens/s; first output {texts[0][:80]!r}", flush=True)
    orchestrator.shutdown()
    ratio = rows[True] / rows[False]
    print(json.dumps({"clients": args.clients, "new_tokens": args.new_tokens, "schema_compile_s": round(compile_s, 2),
                      "unconstrained_tok_s": round(rows[False], 1), "constrained_tok_s": round(rows[True], 1),
                      "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
