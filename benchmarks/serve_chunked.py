"""Chunked prefill: how much a long prompt's admission slows the streams already running; SmolLM2-135M-Instruct,
float32, CPU, one run.

    python benchmarks/serve_chunked.py              # the acceptance run: a 4,000-token prompt, chunks of 16
    python benchmarks/serve_chunked.py --smoke      # tiny random model, short prompt: checks the script runs

Workload: --streams clients with short chat prompts decode --stream_tokens tokens each (greedy, ignore_eos) through
the Orchestrator in this process (no HTTP). Once every stream has produced --steady_tokens tokens, one request with a
prompt of --long_tokens tokens arrives (max_tokens 1). Steady TPOT: the running streams' gaps between consecutive
tokens before it arrives. TPOT while admitting: their gaps from its arrival until its first token. Both as p50 and
p99 (nearest rank) over all streams' gaps. Run twice: without chunked prefill (the whole prompt between two decode
steps) and with `max_num_batched_tokens` = --chunk (one chunk between two decode steps). Prefix caching is off
(each run's long prompt would otherwise be found cached). Each configuration first runs the same workload once
untimed, with another long prompt (it compiles the prefill and decode shapes).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from serve import QUESTIONS, log, percentiles, tiny_model_folder  # noqa: E402  (the serving benchmark's helpers)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--long_tokens", type=int, default=4000)
    # 16: on a 2-core CPU a 16-token chunk over a 4k-token context costs about two decode steps of 4 streams
    p.add_argument("--chunk", type=int, default=16, help="max_num_batched_tokens of the chunked run")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--steady_tokens", type=int, default=12)
    p.add_argument("--stream_tokens", type=int, default=None,
                   help="tokens per stream; unset: enough to outlast a chunked admission (the run stops them after "
                        "it)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 300-token prompt, chunks of 64")
    args = p.parse_args(argv)
    if args.smoke:
        args.long_tokens, args.chunk, args.streams = 300, 64, 2
    if min(args.long_tokens, args.chunk, args.streams, args.steady_tokens) < 1:
        p.error("--long_tokens, --chunk, --streams and --steady_tokens must be positive")
    if args.stream_tokens is None:
        args.stream_tokens = 2 * args.steady_tokens + args.long_tokens // args.chunk + 64
    return args


def run_once(orchestrator, stream_prompts, long_prompt, args) -> dict:
    """Streams, then the long prompt; the streams' token gaps before and during its admission."""
    from jaxswift.infer.engine_api import RequestSampling
    from jaxswift.infer.orchestrator import GenerationRequest

    stamps = {i: [] for i in range(len(stream_prompts))}
    steady = threading.Event()

    def sink_for(i):
        def sink(_, chunk):
            if chunk.token_ids:
                stamps[i].append(time.perf_counter())
            if all(len(s) >= args.steady_tokens for s in stamps.values()):
                steady.set()
        return sink

    tickets = [orchestrator.submit([GenerationRequest(p, RequestSampling(max_tokens=args.stream_tokens,
                                                                         ignore_eos=True))], sink_for(i))
               for i, p in enumerate(stream_prompts)]
    assert steady.wait(600), "the streams did not start"
    arrived = time.perf_counter()
    (long,) = orchestrator.generate([GenerationRequest(long_prompt, RequestSampling(max_tokens=1))])
    first_token = time.perf_counter()
    assert long.error is None, long.error
    deadline = time.perf_counter() + 60  # each stream's first token after the admission ends its last gap there
    while any(not s or s[-1] <= first_token for s in stamps.values()) and time.perf_counter() < deadline:
        time.sleep(0.01)
    for t in tickets:
        t.cancel()
    gaps = lambda keep: [b - a for s in stamps.values() for a, b in zip(s, s[1:]) if keep(a, b)]  # noqa: E731
    before = gaps(lambda a, b: b <= arrived)
    during = gaps(lambda a, b: b > arrived and a < first_token)
    assert during, "no stream token came out during the admission (streams too short?)"
    return {"steady": percentiles(before), "during": percentiles(during), "ttft": first_token - arrived}


def main(argv=None):
    args = parse_args(argv)
    import jaxswift
    from jaxswift.api import chat_prompt_ids
    from jaxswift.checkpoints.registry import resolve_model_path
    from jaxswift.infer.engine import JaxEngine
    from jaxswift.infer.orchestrator import Orchestrator

    source = tiny_model_folder() if args.smoke else str(resolve_model_path("smollm2-135m-instruct"))
    log(f"loading {source}")
    model = jaxswift.load_model(source)
    streams = [chat_prompt_ids(model, [{"role": "user", "content": q}]) for q in QUESTIONS[:args.streams]]
    text = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(args.long_tokens))
    tokens = model.tokenizer.encode(text)
    long_prompts = [tokens[:args.long_tokens], tokens[1:args.long_tokens + 1]]  # warm-up, then the timed one
    max_len = args.long_tokens + args.stream_tokens + 16
    rows = []
    for chunk in (None, args.chunk):
        engine = JaxEngine(model, max_concurrent_decodes=args.streams + 1, max_model_len=max_len,
                           enable_prefix_caching=False, max_num_batched_tokens=chunk)
        orchestrator = Orchestrator(engine)
        try:
            for timed, long_prompt in zip((False, True), long_prompts):
                log(f"max_num_batched_tokens {chunk}: {'timed' if timed else 'warm-up'} run")
                r = run_once(orchestrator, streams, long_prompt, args)
        finally:
            orchestrator.shutdown()
        rows.append((chunk, r))
    print(report(rows, args, argv))


def report(rows, args, argv) -> str:
    ms = lambda v: "/".join(f"{x * 1e3:.0f}" for x in v)  # noqa: E731
    version = importlib.metadata.version
    lines = [f"command: python benchmarks/serve_chunked.py {' '.join(argv if argv is not None else sys.argv[1:])}",
             f"machine: {os.cpu_count()} cores, load {' '.join(open('/proc/loadavg').read().split()[:3])}; "
             f"jax {version('jax')}; {args.streams} running streams, a {args.long_tokens}-token prompt arrives",
             "", "| max_num_batched_tokens | steady TPOT p50/p99 ms | TPOT while admitting p50/p99 ms | p99 ratio "
             "| long prompt TTFT s |", "|---|---|---|---|---|"]
    for chunk, r in rows:
        lines.append(f"| {chunk or 'off (whole prompt)'} | {ms(r['steady'][::2])} | {ms(r['during'][::2])} "
                     f"| {r['during'][2] / r['steady'][2]:.2f}x | {r['ttft']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
