"""Serving throughput and latency: jaxswift's engine + orchestrator (continuous batching over a paged KV cache) vs
transformers `generate`, on SmolLM2-135M-Instruct, float32, CPU, one run.

    python benchmarks/serve.py                       # the acceptance run: 1, 8 and 32 concurrent clients
    python benchmarks/serve.py --via http            # ... jaxswift measured through the HTTP server instead
    python benchmarks/serve.py --smoke               # tiny random model, tiny sizes: checks the script runs

Workload: at each concurrency C, C clients arrive at once, each with its own chat prompt (SmolLM2's template,
distinct questions), and each asks for exactly --new_tokens tokens (ignore_eos / min_new_tokens), greedy.
  - jaxswift, `--via orchestrator` (default): requests go straight to the Orchestrator in this process (no HTTP);
    `--via http`: a uvicorn server in this process, streamed chat completions through the official async `openai`
    client (client, JSON and SSE costs included).
  - transformers one at a time: the same C requests served sequentially (a FIFO server with one slot), so a
    request's TTFT includes its wait behind the earlier ones.
  - transformers batched: all C prompts in one left-padded `generate` call (a static batch).
Per request: TTFT = arrival to first token; TPOT = (last token - first token) / (tokens - 1). Output tokens/s =
all generated tokens / wall time of the wave. Percentiles p50/p90/p99 over the wave's requests (nearest rank).
jaxswift warms up as `jaxswift deploy` does (engine.warmup) and runs one untimed wave per C; the HF sides
run one untimed request first. A decode-step table (jaxswift's `generate` time per step at each batch size) shows
how step time grows with the batch.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import statistics
import sys
import threading
import time

import numpy as np

QUESTIONS = ["What is the capital of France?", "Explain photosynthesis briefly.", "Give me a synonym for happy.",
             "How many legs does a spider have?", "Write one sentence about the sea.", "What is 12 times 7?",
             "Name a famous painter.", "Why do leaves change colour?", "What does a compiler do?",
             "Suggest a name for a cat.", "What is the boiling point of water?", "Describe a rainbow."]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,8,32", help="concurrency levels, comma separated")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--via", choices=("orchestrator", "http"), default="orchestrator")
    p.add_argument("--max_model_len", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--skip_hf_single_above", type=int, default=1000,
                   help="skip transformers one-at-a-time above this concurrency (it is the slowest part)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, clients 1,2, 4 new tokens")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    if args.smoke:
        args.clients, args.new_tokens, args.max_model_len = [1, 2], 4, 128
    return args


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def percentiles(values: list[float]) -> tuple[float, float, float]:
    v = sorted(values)
    rank = lambda q: v[min(len(v) - 1, max(0, int(np.ceil(q * len(v))) - 1))]  # noqa: E731
    return rank(0.5), rank(0.9), rank(0.99)


def summary(name: str, clients: int, wall: float, ttft: list[float], tpot: list[float], tokens: int) -> dict:
    return {"name": name, "clients": clients, "tok_s": tokens / wall, "ttft": percentiles(ttft),
            "tpot": percentiles(tpot) if tpot else (float("nan"),) * 3, "tokens": tokens}


# ---------------------------------------------------------------- models

def tiny_model_folder() -> str:
    """A tiny random llama with SmolLM2's tokenizer (the --smoke model), saved as an HF folder."""
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from jaxswift.checkpoints.gguf import read_gguf
    from jaxswift.checkpoints.registry import resolve_model_path

    tok = read_gguf(resolve_model_path("smollm2-135m-instruct")).tokenizer()
    folder = tempfile.mkdtemp(prefix="serve-bench-")
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                  tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
    config.architectures = ["LlamaForCausalLM"]
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def load_hf(source: str, threads: int):
    import torch
    import transformers

    torch.set_num_threads(threads)
    if source.endswith(".gguf"):
        folder, name = os.path.split(source)
        return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()


# ---------------------------------------------------------------- jaxswift

def jaxswift_wave_orchestrator(orchestrator, prompts: list[list[int]], new_tokens: int) -> dict:
    from jaxswift.infer.engine_api import RequestSampling
    from jaxswift.infer.orchestrator import GenerationRequest

    start = time.perf_counter()
    first, last, count, done = {}, {}, {}, threading.Semaphore(0)

    def sink(i, chunk):
        now = time.perf_counter()
        if chunk.token_ids:
            first.setdefault(i, now)
            last[i], count[i] = now, chunk.completion_tokens
        if chunk.final:
            done.release()

    requests = [GenerationRequest(p, RequestSampling(max_tokens=new_tokens, ignore_eos=True)) for p in prompts]
    for i, r in enumerate(requests):  # one submit per client, as separate requests arrive
        orchestrator.submit([r], lambda _, c, i=i: sink(i, c))
    for _ in prompts:
        done.acquire()
    wall = time.perf_counter() - start
    return _timings(start, wall, first, last, count, len(prompts))


def jaxswift_wave_http(url: str, questions: list[str], new_tokens: int) -> dict:
    import openai

    async def one(client, i, question, start, first, last, count):
        stream = await client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": question}], max_tokens=new_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].delta.content:
                first.setdefault(i, now)
                last[i] = now
            if chunk.usage:
                count[i] = chunk.usage.completion_tokens

    async def wave():
        first, last, count = {}, {}, {}
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=3600) as client:
            start = time.perf_counter()
            await asyncio.gather(*(one(client, i, q, start, first, last, count) for i, q in enumerate(questions)))
            return _timings(start, time.perf_counter() - start, first, last, count, len(questions))

    return asyncio.run(wave())


def _timings(start, wall, first, last, count, n) -> dict:
    ttft = [first[i] - start for i in range(n)]
    tpot = [(last[i] - first[i]) / (count[i] - 1) for i in range(n) if count[i] > 1]
    return {"wall": wall, "ttft": ttft, "tpot": tpot, "tokens": sum(count.values())}


def start_http(orchestrator):
    import socket

    import uvicorn

    from jaxswift.serve.openai import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(orchestrator, model_name="bench"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def decode_step_times(engine, prompt: list[int], batches: list[int], steps: int = 16) -> dict[int, float]:
    """Median time of one engine `generate` step with B occupied slots."""
    from jaxswift.infer.engine_api import RequestSampling

    out = {}
    for b in batches:
        state = engine.init_decode_state()
        padded, n = engine.pad_prompt(prompt)
        for slot in range(b):
            prefix, _ = engine.prefill(engine.params, padded, n, RequestSampling(max_tokens=steps + 8,
                                                                                   ignore_eos=True))
            state = engine.insert(prefix, state, slot)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, _ = engine.generate(engine.params, state)
            times.append(time.perf_counter() - t)
        for slot in range(b):
            state = engine.free_resource(state, slot)
        out[b] = statistics.median(times[2:])
    return out


# ---------------------------------------------------------------- transformers

class Timestamps:
    """A transformers streamer that records when each generation step's tokens come out."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> list[float]:
    """Left-padded greedy batch of exactly new_tokens tokens; the time stamp of every step (the prompt's first)."""
    import torch

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    stamps = Timestamps()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, eos_token_id=None, pad_token_id=pad_id, streamer=stamps)
    return stamps.times[1:]


def hf_one_at_a_time(model, prompts, new_tokens, pad_id) -> dict:
    start = time.perf_counter()
    ttft, tpot = [], []
    for p in prompts:
        steps = hf_generate(model, [p], new_tokens, pad_id)
        ttft.append(steps[0] - start)
        tpot.append((steps[-1] - steps[0]) / max(len(steps) - 1, 1))
    return {"wall": time.perf_counter() - start, "ttft": ttft, "tpot": tpot, "tokens": len(prompts) * new_tokens}


def hf_batched(model, prompts, new_tokens, pad_id) -> dict:
    start = time.perf_counter()
    steps = hf_generate(model, prompts, new_tokens, pad_id)
    wall = time.perf_counter() - start
    n = len(prompts)
    return {"wall": wall, "ttft": [steps[0] - start] * n,
            "tpot": [(steps[-1] - steps[0]) / max(len(steps) - 1, 1)] * n, "tokens": n * new_tokens}


# ---------------------------------------------------------------- the run

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
    hf = load_hf(source, args.threads)
    slots = max(args.clients)
    # prefix caching off: the timed wave repeats the warm-up wave's prompts (serve_prefix.py measures caching)
    engine = JaxEngine(model, max_concurrent_decodes=slots, max_model_len=args.max_model_len,
                       enable_prefix_caching=False)
    log("jaxswift warmup (as `jaxswift deploy` does before serving)")
    engine.warmup()
    orchestrator = Orchestrator(engine, max_queue=4 * slots)
    url = start_http(orchestrator)[0] if args.via == "http" else None
    pad_id = int(engine.eos_ids[0])
    questions = [QUESTIONS[i % len(QUESTIONS)] + (f" ({i // len(QUESTIONS)})" if i >= len(QUESTIONS) else "")
                 for i in range(slots)]
    prompts = [chat_prompt_ids(model, [{"role": "user", "content": q}]) for q in questions]

    def jax_wave(c):
        if url is not None:
            return jaxswift_wave_http(url, questions[:c], args.new_tokens)
        return jaxswift_wave_orchestrator(orchestrator, prompts[:c], args.new_tokens)

    rows = []
    hf_generate(hf, prompts[:1], 2, pad_id)  # warm-up
    for c in args.clients:
        log(f"{c} clients: jaxswift warm-up wave")
        jax_wave(c)
        log(f"{c} clients: jaxswift")
        r = jax_wave(c)
        rows.append(summary(f"jaxswift ({args.via})", c, r["wall"], r["ttft"], r["tpot"], r["tokens"]))
        if c <= args.skip_hf_single_above:
            log(f"{c} clients: transformers one at a time")
            r = hf_one_at_a_time(hf, prompts[:c], args.new_tokens, pad_id)
            rows.append(summary("transformers one at a time", c, r["wall"], r["ttft"], r["tpot"], r["tokens"]))
        log(f"{c} clients: transformers batched")
        r = hf_batched(hf, prompts[:c], args.new_tokens, pad_id)
        rows.append(summary("transformers batched", c, r["wall"], r["ttft"], r["tpot"], r["tokens"]))
    orchestrator.shutdown()  # the engine serves one decode state: the step timing below takes it over
    steps = decode_step_times(engine, prompts[0], sorted({1, *args.clients}))
    print(report(rows, steps, args, argv))


def report(rows: list[dict], steps: dict[int, float], args, argv) -> str:
    trip = lambda v: "/".join(f"{x * 1e3:.0f}" for x in v)  # noqa: E731
    version = importlib.metadata.version
    lines = [f"command: python benchmarks/serve.py {' '.join(argv if argv is not None else sys.argv[1:])}",
             f"machine: {os.cpu_count()} cores, load {' '.join(open('/proc/loadavg').read().split()[:3])}; "
             f"jax {version('jax')}, torch {version('torch')}, transformers {version('transformers')}; "
             f"{args.new_tokens} new tokens per request",
             "", "| clients | server | output tok/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | vs HF one at a time |",
             "|---|---|---|---|---|---|"]
    single = {r["clients"]: r["tok_s"] for r in rows if r["name"] == "transformers one at a time"}
    for r in rows:
        # one at a time serves C requests at the same rate as one (a request's TTFT grows, not the rate): where it
        # was skipped (--skip_hf_single_above), the rate at the largest C measured below stands in (marked *)
        below = [c for c in single if c <= r["clients"]]
        base = single.get(r["clients"]) or (single[max(below)] if below else None)
        mark = "" if r["clients"] in single else "*"
        ratio = f"{r['tok_s'] / base:.2f}x{mark}" if base else "-"
        lines.append(f"| {r['clients']} | {r['name']} | {r['tok_s']:.1f} | {trip(r['ttft'])} | {trip(r['tpot'])} "
                     f"| {ratio} |")
    if single and any(r["clients"] not in single for r in rows):
        lines.append(f"* vs the one-at-a-time rate at {max(single)} client(s) (skipped above "
                     f"{args.skip_hf_single_above})")
    base = steps[min(steps)]
    lines += ["", "| decode batch | jaxswift step ms | vs batch 1 |", "|---|---|---|"]
    lines += [f"| {b} | {t * 1e3:.1f} | {t / base:.2f}x |" for b, t in steps.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
