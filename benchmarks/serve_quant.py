"""Quantized weights in the engine: batch-1 decode speed and held-out perplexity of SmolLM2-135M-Instruct served in
float32, int8 and nf4 (quantized on load, `--quant_method`), the int8 folder `jaxswift export --quant_method int8`
writes, and optionally a 4-bit GPTQ export; CPU, one run. "int8" decodes with the int8 kernel (jaxswift/kernels,
docs/kernels.md) where it builds; "int8 xla" is the same weights in plain XLA (the kernel's fallback).

    python benchmarks/serve_quant.py              # float32, int8, int8 xla, nf4, int8 folder
    python benchmarks/serve_quant.py --variants float32,int8,"int8 xla"   # a subset (float32 first: the ratios)
    python benchmarks/serve_quant.py --gptq       # also a GPTQ export (calibrates first: several minutes)
    python benchmarks/serve_quant.py --smoke      # tiny random model: checks the script runs

Per variant:
  - engine step: median time of one `JaxEngine.generate` step with one occupied slot (the server's decode step).
    The variants' engines are built first and then timed in turns (--rounds rounds of --steps steps each), so a
    change in the machine's load falls on all of them alike.
  - generate: tokens/s of `jaxswift.generate_ids` (one prompt, contiguous cache, greedy, eos ignored): the decode
    rate from two lengths, (N2 - N1) / (t2 - t1), which cancels the prefill.
  - perplexity: exp(mean next-token NLL) over 4 x 128 tokens of held-out English (standard-library docstrings of
    threading, subprocess, textwrap, difflib: text the model was not quantized or calibrated on).
  - decode temp: temporary bytes of the compiled one-token forward (compiled.memory_analysis()): a float copy of
    a quantized projection would show here.
Ratios are against float32.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from serve import decode_step_times, log, tiny_model_folder  # noqa: E402

import jaxswift  # noqa: E402
from jaxswift.api import chat_prompt_ids  # noqa: E402
from jaxswift.infer.engine import JaxEngine  # noqa: E402
from jaxswift.kernels import int8_matvec  # noqa: E402
from jaxswift.models.transformer import forward, unstack_layers  # noqa: E402
from jaxswift.quant.serving import RowInt8Weight, inference_params  # noqa: E402

HELD_OUT = ("threading", "subprocess", "textwrap", "difflib")
VARIANTS = ("float32", "int8", "int8 xla", "nf4", "int8 folder")
CALIBRATION = ("argparse", "collections", "json", "logging", "pathlib", "dataclasses", "functools", "typing")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--gptq", action="store_true", help="also a 4-bit GPTQ export (group 32, act-order)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma separated, from " + ", ".join(VARIANTS))
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or args.variants[0] != "float32":
        p.error(f"--variants {','.join(args.variants)}: expected float32 first, then any of {', '.join(VARIANTS)}")
    if args.smoke:
        args.rounds, args.steps = 1, 4
    return args


def docstrings(modules) -> str:
    parts = []
    for name in modules:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        parts += [inspect.getdoc(getattr(module, a)) or "" for a in sorted(dir(module)) if not a.startswith("_")
                  and (inspect.isclass(getattr(module, a)) or inspect.isfunction(getattr(module, a)))]
    return "\n\n".join(p for p in parts if p)


def windows(tokenizer, text, n, length):
    ids = tokenizer.encode(text, add_special_tokens=False)[: n * length]
    return np.asarray(ids, np.int32).reshape(n, length)


def perplexity(model, tokens) -> float:
    logits = jax.jit(forward, static_argnums=2)(model.params, jnp.asarray(tokens[:, :-1]), model.config)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return float(jnp.exp(-jnp.take_along_axis(logp, jnp.asarray(tokens[:, 1:, None]), axis=-1).mean()))


def decode_temp_bytes(model) -> int:
    params = unstack_layers(model.params)
    compiled = jax.jit(forward, static_argnums=2).lower(params, jnp.zeros((1, 1), jnp.int32), model.config).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def weight_bytes(model) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(model.params))


def generate_rate(model, prompt, n1: int, n2: int) -> float:
    def timed(n):
        jaxswift.generate_ids(model, [prompt], max_new_tokens=n, ignore_eos=True)  # compile
        start = time.perf_counter()
        jaxswift.generate_ids(model, [prompt], max_new_tokens=n, ignore_eos=True)
        return time.perf_counter() - start
    t1, t2 = timed(n1), timed(n2)
    return (n2 - n1) / max(t2 - t1, 1e-9)


def variants(base, args, tmp: str) -> dict:
    from jaxswift.quant.export_formats import QuantSpec, quantize_model, save_quantized

    out = {"float32": base}
    for method in ("int8", "nf4"):
        if method in args.variants or (method == "int8" and "int8 xla" in args.variants):
            out[method] = dataclasses.replace(base, params=inference_params(base.params, base.config, method, "bench"))
    if "int8 xla" in args.variants:
        out["int8 xla"] = dataclasses.replace(out["int8"], params=without_kernel(out["int8"].params))
    specs = [QuantSpec("int8", 8)] if "int8 folder" in args.variants else []
    specs += [QuantSpec("gptq", 4, 32, desc_act=True, sym=False)] if args.gptq else []
    for spec in specs:
        calibration = windows(base.tokenizer, docstrings(CALIBRATION), 16, 128) if spec.method == "gptq" else None
        folder = os.path.join(tmp, spec.method)
        log(f"exporting {spec.method} to {folder}")
        save_quantized(base, quantize_model(base, spec, calibration), spec, folder)
        loaded = jaxswift.load_model(folder)
        out[f"{spec.method} folder"] = dataclasses.replace(
            loaded, params=inference_params(loaded.params, loaded.config, None, folder))
    return {name: out[name] for name in (*args.variants, "gptq folder") if name in out}  # in --variants' order


def without_kernel(params):
    """The same int8 weights with their decode matmul kept in plain XLA (RowInt8Weight.kernel=False)."""
    return jax.tree.map(lambda leaf: dataclasses.replace(leaf, kernel=False) if isinstance(leaf, RowInt8Weight)
                        else leaf, params, is_leaf=lambda leaf: isinstance(leaf, RowInt8Weight))


def main(argv=None):
    args = parse_args(argv)
    base = jaxswift.load_model(tiny_model_folder() if args.smoke else "smollm2-135m-instruct")
    tok = base.tokenizer
    prompt = chat_prompt_ids(base, [{"role": "user", "content": "Tell me about the history of printing."}])
    held_out = windows(tok, docstrings(HELD_OUT), 4, 128)
    with tempfile.TemporaryDirectory() as tmp:
        models = variants(base, args, tmp)
        engines = {name: JaxEngine(m, max_concurrent_decodes=1, max_model_len=512, prefill_buckets=(64,))
                   for name, m in models.items()}
        steps = {name: [] for name in models}
        for r in range(args.rounds):
            for name, engine in engines.items():
                steps[name].append(decode_step_times(engine, prompt, [1], steps=args.steps)[1])
            log(f"round {r + 1} (load average {os.getloadavg()[0]:.2f}): "
                + ", ".join(f"{n} {steps[n][-1] * 1e3:.1f} ms" for n in steps))
        rows = []
        for name, m in models.items():
            log(f"{name}: generate and perplexity")
            rows.append({"name": name, "step": statistics.median(steps[name]),
                         "gen": generate_rate(m, prompt, 8, 8 + 4 * args.steps), "ppl": perplexity(m, held_out),
                         "temp": decode_temp_bytes(m), "bytes": weight_bytes(m)})
    print(report(rows, args, argv))


def report(rows, args, argv) -> str:
    f = rows[0]
    lines = [f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"load average {os.getloadavg()[0]:.2f}, jax {jax.__version__}",
             f"command: python benchmarks/serve_quant.py {' '.join(argv or sys.argv[1:])}",
             f"int8 kernel: {int8_matvec.unavailable_reason() or 'on'}", "",
             "| weights | engine step (ms) | engine tok/s | x float32 | generate tok/s | x float32 | held-out ppl | "
             "ppl / float32 | weights (MB) | decode temp (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['step'] * 1e3:.1f} | {1 / r['step']:.2f} | {f['step'] / r['step']:.2f} | "
                     f"{r['gen']:.2f} | {r['gen'] / f['gen']:.2f} | {r['ppl']:.3f} | {r['ppl'] / f['ppl']:.4f} | "
                     f"{r['bytes'] / 1e6:.0f} | {r['temp'] / 1e6:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
