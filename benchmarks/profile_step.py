"""Where the time of one SFT train step goes: a jax.profiler trace of the compiled step, summed per HLO op.

    python benchmarks/profile_step.py --tuner full --layers 4        # SmolLM2 cut to 4 layers, batch 4 x 512
    python benchmarks/profile_step.py --tuner lora --top 30

Builds the same step as benchmarks/train.py (make_train_step over SmolLM2, float32, AdamW), runs it `--steps`
times under the profiler, and prints the ops of the step's executable by total time, each with the JAX operation
it came from (HLO metadata op_name), plus the time per category (matmul fusions, copies/transposes, loop fusions,
reductions...). Shares: they hold on a busy machine too, wall times do not.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tuner", default="full", choices=("lora", "full"))
    p.add_argument("--layers", type=int, default=0, help="keep only the first N layers (0: all 30)")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--steps", type=int, default=2, help="profiled steps (after one warm-up)")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--hlo", default="", help="also write the optimized HLO text here")
    p.add_argument("--by_source", action="store_true", help="also sum the time per JAX op (metadata op_name)")
    return p.parse_args(argv)


def build(args):
    import jax
    import numpy as np

    from jaxswift.api import load_model
    from jaxswift.optim.factory import OptimizerConfig, make_optimizer
    from jaxswift.train.state import init_train_state
    from jaxswift.train.step import make_train_step
    from jaxswift.tuners import lora

    model = load_model("smollm2-135m-instruct", dtype="float32")
    cfg, params = model.config.replace(remat=args.remat), model.params
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
        params = {**params, "layers": jax.tree.map(lambda a: a[:args.layers], params["layers"])}
    if args.tuner == "lora":
        params = lora.add_lora(params, cfg, lora.LoraConfig(rank=8, alpha=32, dropout=0.0), jax.random.key(0))
        mask = lora.trainable_mask(params)
    else:
        mask = jax.tree.map(lambda _: True, params)
    optimizer, _ = make_optimizer(OptimizerConfig(learning_rate=1e-4, lr_scheduler_type="constant"), 1000)
    state = jax.jit(lambda p: init_train_state(p, mask, optimizer, 0))(params)
    rng = np.random.default_rng(0)
    shape = (1, args.rows, args.length)
    batch = {"tokens": rng.integers(0, cfg.vocab_size, shape, dtype=np.int32),
             "targets": rng.integers(0, cfg.vocab_size, shape, dtype=np.int32),
             "loss_weights": np.ones(shape, np.float32), "segment_ids": np.ones(shape, np.int32),
             "positions": np.broadcast_to(np.arange(args.length, dtype=np.int32), shape).copy()}
    compiled = jax.jit(make_train_step(cfg, optimizer), donate_argnums=0).lower(state, batch).compile()
    return compiled, state, batch


def op_sources(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the JAX op_name of its metadata (shortened)."""
    out = {}
    for m in re.finditer(r"%([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]+)\"", hlo_text):
        out[m.group(1)] = re.sub(r"jit\([^)]*\)/", "", m.group(2))[-90:]
    return out


def category(name: str) -> str:
    base = re.sub(r"[.\d]+$", "", name)
    if "ynn" in base or "dot" in base or "gemm" in base or "matmul" in base:
        return "matmul"
    if base.startswith(("copy", "transpose")) or "transpose" in base:
        return "copy/transpose"
    if "reduce" in base:
        return "reduction"
    if "while" in base or "call" in base or "conditional" in base:
        return "control (nested)"
    return "elementwise/other" if "fusion" in base else base


def trace_events(trace_dir: str):
    path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
    with gzip.open(path) as f:
        return json.load(f)["traceEvents"]


def main(argv=None):
    args = parse_args(argv)
    import jax

    compiled, state, batch = build(args)
    hlo = compiled.as_text()
    if args.hlo:
        open(args.hlo, "w").write(hlo)
    sources = op_sources(hlo)
    state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    trace_dir = tempfile.mkdtemp(prefix="jaxswift_profile_")
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
            state, metrics = compiled(state, batch)
            jax.block_until_ready(state)
    wall = (time.perf_counter() - t0) / args.steps
    per_op = collections.Counter()
    for ev in trace_events(trace_dir):
        if ev.get("ph") == "X" and ev.get("name") in sources:
            per_op[ev["name"]] += ev.get("dur", 0) / 1e6 / args.steps
    total = sum(per_op.values())
    print(f"{args.tuner}, {args.layers or 30} layers, batch {args.rows} x {args.length}: "
          f"{wall:.2f} s/step wall, {total:.2f} s in HLO ops (nested ops counted inside their loops)")
    cats = collections.Counter()
    for name, s in per_op.items():
        if category(name) != "control (nested)":
            cats[category(name)] += s
    leaf_total = sum(cats.values())
    for cat, s in cats.most_common():
        print(f"  {cat:20s} {s:7.3f} s  {100 * s / leaf_total:5.1f}%")
    if args.by_source:
        by_source = collections.Counter()
        for name, s in per_op.items():
            if category(name) != "control (nested)":
                by_source[re.sub(r"while/body/closed_call/", "", sources.get(name, name))] += s
        print(f"\ntop {args.top} JAX ops:")
        for src, s in by_source.most_common(args.top):
            print(f"  {s:7.3f} s {100 * s / leaf_total:5.1f}%  {src}")
    print(f"\ntop {args.top} ops:")
    for name, s in per_op.most_common(args.top):
        if category(name) == "control (nested)":
            continue
        print(f"  {s:7.3f} s {100 * s / leaf_total:5.1f}%  {name:40s} {sources.get(name, '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
