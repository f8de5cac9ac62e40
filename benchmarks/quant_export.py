"""Perplexity of SmolLM2-135M-Instruct exported as GPTQ-4, AWQ-4, FP8 and int8, loaded back, vs the float model.

    python benchmarks/quant_export.py                 # full: 64 x 128 calibration tokens, 16 x 128 held out
    python benchmarks/quant_export.py --smoke         # tiny sizes, seconds

Calibration and held-out text are English docstrings of two disjoint sets of Python standard library modules
(nothing downloaded). Each method is quantized, written in its HF layout, read back with jaxswift.load_model (the
quantized leaves dequantize inside the matmul), and scored on the held-out windows. FP8 and int8 folders are also
loaded in transformers (through compressed-tensors) and scored there; GPTQ / AWQ need gptqmodel to load in
transformers, which has no CPU wheel that leaves torch alone, so those are scored by jaxswift only.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

CALIBRATION_MODULES = ("argparse", "collections", "json", "logging", "pathlib", "dataclasses", "functools",
                       "itertools", "typing", "unittest", "email", "http.client", "sqlite3", "csv")
HELD_OUT_MODULES = ("threading", "subprocess", "asyncio", "decimal", "fractions", "statistics", "textwrap",
                    "difflib", "shutil", "tarfile", "zipfile", "heapq", "bisect", "contextlib")


def docstring_text(modules) -> str:
    """The docstrings of the modules and their public members, joined into one text."""
    parts = []
    for name in modules:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            obj = getattr(module, attr, None)
            if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)):
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


def windows(tokenizer, text: str, n: int, length: int) -> np.ndarray:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < n * length:
        raise SystemExit(f"only {len(ids)} tokens of text for {n} x {length}")
    return np.asarray(ids[: n * length], np.int32).reshape(n, length)


def perplexity(params, cfg, tokens: np.ndarray) -> float:
    from jaxswift.models.transformer import forward

    @jax.jit
    def nll(params, tokens):
        logits = forward(params, tokens[:, :-1], cfg)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    return float(np.exp(np.mean([float(nll(params, jnp.asarray(row[None]))) for row in tokens])))


def transformers_perplexity(folder: str, tokens: np.ndarray) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        losses = [float(model(torch.as_tensor(row[None], dtype=torch.long),
                              labels=torch.as_tensor(row[None], dtype=torch.long)).loss) for row in tokens]
    return float(np.exp(np.mean(losses)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--methods", default="gptq,awq,fp8,int8")
    args = parser.parse_args(argv)
    import jaxswift
    from jaxswift.quant.export_formats import QuantSpec, quantize_model, save_quantized

    n_calib, n_eval, length = (4, 2, 64) if args.smoke else (64, 16, 128)
    model = jaxswift.load_model("smollm2-135m-instruct")
    calibration = windows(model.tokenizer, docstring_text(CALIBRATION_MODULES), n_calib, length)
    held_out = windows(model.tokenizer, docstring_text(HELD_OUT_MODULES), n_eval, length)
    base = perplexity(model.params, model.config, held_out)
    print(f"machine: {os.cpu_count()} CPUs; calibration {n_calib} x {length} tokens, held out {n_eval} x {length}")
    print("| format | perplexity | vs float | transformers | quantize s |\n|---|---|---|---|---|")
    print(f"| float32 | {base:.3f} | 1.000 | | |")
    specs = {"gptq": QuantSpec("gptq", 4, 32, desc_act=True, sym=False), "awq": QuantSpec("awq", 4, 32),
             "fp8": QuantSpec("fp8", 8),
             "int8": QuantSpec("int8", 8)}
    for name in args.methods.split(","):
        spec = specs[name]
        start = time.perf_counter()
        params = quantize_model(model, spec, calibration)
        seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as out:
            save_quantized(model, params, spec, out)
            loaded = jaxswift.load_model(out)
            ppl = perplexity(loaded.params, loaded.config, held_out)
            hf = f"{transformers_perplexity(out, held_out):.3f}" if name in ("fp8", "int8") else "needs gptqmodel"
        label = f"{name}-{spec.bits}" + (f" g{spec.group_size}" if name in ("gptq", "awq") else "") + \
            (" act-order asym" if name == "gptq" else "")
        print(f"| {label} | {ppl:.3f} | {ppl / base:.3f} | {hf} | {seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
