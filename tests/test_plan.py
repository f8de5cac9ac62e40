"""The ahead-of-time memory planner: presets, per-device accounting, FLOPs, bad inputs, and its figure against the
measured peak of a real SFT step.

"Measured peak" on CPU: XLA's CPU client keeps no allocator statistics (`Device.memory_stats()` is None), so the
real run is measured from the outside, as the operating system sees it. A fresh process (one CPU device) builds the
state and the step through the SFT trainer's own functions (`init_state`, `compile_step`), runs a warm-up step
(compilation), then runs three more steps while a thread samples its resident set size every 0.2 ms. glibc is told to
serve every allocation of 64 KiB or more with its own mmap (MALLOC_MMAP_THRESHOLD_), so a freed buffer leaves the
resident set and a new one enters it, instead of reusing heap that compilation left behind. The peak is then the
highest resident size during the steps minus the size just before them (when only the state and the batch are
live), plus the bytes of the live state and batch: every byte the step holds at its busiest moment.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxswift import cli
from jaxswift.errors import ConfigError
from jaxswift.models.spec import param_specs
from jaxswift.train.plan import (PlanArguments, build_step, format_serve_plan, load_plan_config, per_device_bytes,
                                 plan_serving, plan_train_step, preset_names)

TINY = {"architectures": ["LlamaForCausalLM"], "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}

# Published parameter counts (Hugging Face model cards / safetensors index totals).
PUBLISHED_PARAMS = {"qwen2.5-7b": 7_615_616_512, "llama-3-8b": 8_030_261_248, "qwen2.5-72b": 72_706_203_648,
                    "qwen3-30b-a3b": 30_532_122_624}


def _config_file(tmp_path, **changes):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY, **changes}))
    return str(path)


# --- presets -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_presets_load_with_the_published_sizes(name):
    cfg, source = load_plan_config(name, "bfloat16")
    count = sum(math.prod(s.shape) for s in jax.tree.leaves(param_specs(cfg), is_leaf=lambda x: hasattr(x, "shape")))
    assert count == PUBLISHED_PARAMS[name]
    assert source.endswith(f"{name}.json") and cfg.param_dtype == "bfloat16" and not cfg.tie_word_embeddings


def test_preset_spellings_and_the_moe_preset():
    assert set(preset_names()) == {"qwen2.5-7b", "llama-3-8b", "qwen2.5-72b", "qwen3-30b-a3b", "llama-3.2-1b"}
    assert load_plan_config("Qwen/Qwen2.5-7B", "float32")[0] == load_plan_config("qwen2.5-7b", "float32")[0]
    assert load_plan_config("meta-llama/Meta-Llama-3-8B", "float32")[0].rope.theta == 500000.0
    moe = load_plan_config("qwen3-30b-a3b", "bfloat16")[0]
    assert (moe.family, moe.num_experts, moe.num_experts_per_tok, moe.norm_topk_prob) == ("qwen3_moe", 128, 8, True)


# --- accounting and FLOPs (abstract only, nothing compiled) --------------------------------------------------------


def test_fsdp_shards_weights_and_optimizer_state(tmp_path):
    """fsdp=8: every weight with an `embed` axis (divisible by 8) is split 8 ways, norms are whole; the AdamW moments
    are sharded like their parameters (ZeRO), not replicated."""
    args = PlanArguments(model=_config_file(tmp_path), mesh="fsdp=8", tuner_type="full", dtype="float32")
    planned = build_step(args)
    specs = jax.tree.leaves(param_specs(planned.cfg), is_leaf=lambda x: hasattr(x, "shape"))
    expected = sum(math.prod(s.shape) * 4 // (8 if "embed" in s.logical_axes else 1) for s in specs)
    assert per_device_bytes(planned.state.trainable) == expected
    assert per_device_bytes(planned.state.frozen) == 0
    assert per_device_bytes(planned.state.opt_state) == 2 * expected + 8  # mu, nu; Adam and schedule step counts
    assert planned.batch["tokens"].shape == (1, 8, 2048)
    assert planned.batch["tokens"].sharding.shard_shape((1, 8, 2048)) == (1, 1, 2048)


@pytest.mark.parametrize("mesh, kv_split", [(None, 1), ("tensor=8", 1), ("data=2,tensor=4", 4)])
def test_serving_plan_counts_weights_and_kv_cache_per_device(mesh, kv_split):
    """qwen2.5-7b in bfloat16, 32 requests x 4096 tokens: the KV cache is 2 (k, v) x 28 layers x 4 kv heads x
    (32 x 256 pages + the scratch page) x 16 tokens x 128 x 2 bytes, split over tensor only where it divides the 4
    kv heads; weights are the published 7.6 B parameters in bfloat16 on one device, fewer per device on a mesh."""
    plan = plan_serving(PlanArguments(model="qwen2.5-7b", mesh=mesh, serve=True, max_num_seqs=32,
                                      max_model_len=4096))
    assert plan.pages == 32 * 256
    assert plan.kv_cache == 2 * 28 * 4 * (32 * 256 + 1) * 16 * 128 * 2 // kv_split
    if mesh is None:
        assert plan.weights == PUBLISHED_PARAMS["qwen2.5-7b"] * 2
    else:
        assert PUBLISHED_PARAMS["qwen2.5-7b"] * 2 / 8 < plan.weights < PUBLISHED_PARAMS["qwen2.5-7b"] * 2 / 3
    text = format_serve_plan(plan)
    assert "KV cache" in text and ("do not split 8 ways" in text) == (mesh == "tensor=8")
    with pytest.raises(ConfigError, match="--tuner_type is not used by --serve true"):
        PlanArguments(serve=True, tuner_type="full")
    with pytest.raises(ConfigError, match="--max_num_seqs is not used by a training plan"):
        PlanArguments(max_num_seqs=4)
    with pytest.raises(ConfigError, match="--max_model_len must be positive"):
        PlanArguments(serve=True, max_model_len=0)


def test_serving_plan_repeats_kv_heads_that_tensor_outnumbers():
    """qwen3-30b-a3b (32 query heads, 4 kv heads) on tensor=8: each kv head is repeated twice, as the engine does,
    so a device holds one kv head's cache: a quarter of what 4 replicated heads would take."""
    def plan(mesh):
        return plan_serving(PlanArguments(model="qwen3-30b-a3b", mesh=mesh, serve=True, max_num_seqs=8,
                                          max_model_len=1024))

    one, split = plan(None), plan("tensor=8")
    assert split.kv_copies == 2 and split.kv_sharded
    assert split.kv_cache * 4 == one.kv_cache
    assert "repeated 2 times" in format_serve_plan(split)
    assert plan("tensor=4").kv_copies == 1


def test_dtype_changes_of_the_state_are_reported(tmp_path):
    """A state leaf the step returns in another dtype cannot reuse its donated buffer: the planner names it."""
    planned = build_step(PlanArguments(model=_config_file(tmp_path), tuner_type="lora", dtype="float32"))
    assert planned.dtype_changes() == []
    widened = dataclasses.replace(planned, step=lambda s, b: (s.replace(step=s.step.astype(jnp.float32)), {}))
    assert widened.dtype_changes() == [("int32", "float32", 4)]


def _nf4_bytes(values: int) -> int:
    """One NF4 matrix as bitsandbytes stores it: 4-bit codes, a uint8 absmax per block of 64, a float32 absmax per
    256 blocks (double quantization) and one float32 offset."""
    blocks = -(-values // 64)
    return -(-values // 2) + blocks + 4 * -(-blocks // 256) + 4


def test_qlora_stores_the_base_projections_in_nf4(tmp_path):
    model = _config_file(tmp_path)
    common = dict(model=model, dtype="bfloat16", lora_rank=8)
    lora = build_step(PlanArguments(tuner_type="lora", **common))
    qlora = build_step(PlanArguments(tuner_type="qlora", **common))
    assert per_device_bytes(qlora.state.trainable) == per_device_bytes(lora.state.trainable)
    assert per_device_bytes(qlora.state.opt_state) == per_device_bytes(lora.state.opt_state)
    layers = param_specs(lora.cfg)["layers"]
    linear = [s for name, s in layers.items() if name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")]
    bf16 = sum(2 * math.prod(s.shape) for s in linear)
    nf4 = sum(s.shape[0] * _nf4_bytes(math.prod(s.shape[1:])) for s in linear)
    assert per_device_bytes(qlora.state.frozen) == per_device_bytes(lora.state.frozen) - bf16 + nf4


def _layer_forward_flops(c: dict, rows: int, length: int, block: int = 128) -> float:
    """Matmul FLOPs of one decoder layer's forward, float64: projections, then scores and values over the keys each
    query block sees (`causal_self_attention` skips the keys after the block)."""
    D, F, N, K = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    H = D // N
    projections = 2.0 * rows * length * (2 * D * N * H + 2 * D * K * H + 3 * D * F)
    blocks = [(block, end) for end in range(block, length + 1, block)] if length > block else [(length, length)]
    attention = sum(2 * 2.0 * rows * N * q * keys * H for q, keys in blocks)
    return projections + attention


@pytest.mark.parametrize("remat, length, chunk", [(False, 64, 512), (True, 256, 64)])
def test_matmul_flops_follow_the_formula(tmp_path, remat, length, chunk):
    """Full fine-tuning: backward = 2 x forward. Remat recomputes each layer's forward in the backward pass except
    w_down, the layer's last matmul, whose output no gradient needs; the chunked loss recomputes its logits whenever
    it scans. Loop bodies count trip-count times."""
    rows, D, F = 2, TINY["hidden_size"], TINY["intermediate_size"]
    args = PlanArguments(model=_config_file(tmp_path), tuner_type="full", dtype="float32", max_length=length,
                         per_device_train_batch_size=rows, gradient_checkpointing=remat, loss_chunk_size=chunk)
    layer = _layer_forward_flops(TINY, rows, length)
    recompute = layer - 2.0 * rows * length * F * D if remat else 0.0
    lm_head = 2.0 * rows * length * D * TINY["vocab_size"]
    expected = TINY["num_hidden_layers"] * (3 * layer + recompute) + (4 if length > chunk else 3) * lm_head
    assert build_step(args).matmul_flops() == expected


# --- bad inputs ----------------------------------------------------------------------------------------------------


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match=r"--model 'qwen9-1b': not a file, a folder or a preset \(presets: "
                                          r"llama-3-8b, llama-3.2-1b, qwen2.5-72b"):
        load_plan_config("qwen9-1b", "bfloat16")
    with pytest.raises(ConfigError, match="the folder has no config.json"):
        load_plan_config(str(tmp_path), "bfloat16")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json: not a readable config.json"):
        load_plan_config(str(tmp_path / "broken.json"), "bfloat16")
    model = _config_file(tmp_path)
    with pytest.raises(ConfigError, match=r"--mesh fsdp=16 needs 16 devices \(fsdp=16\), but 8 are available"):
        build_step(PlanArguments(model=model, mesh="fsdp=16"))
    with pytest.raises(ConfigError, match="--mesh 'pipe=2': unknown axis 'pipe'"):
        build_step(PlanArguments(model=model, mesh="pipe=2"))
    with pytest.raises(ConfigError, match=r"--tuner_type 'qlora4': expected one of full \| lora \| qlora"):
        PlanArguments(model=model, tuner_type="qlora4")
    with pytest.raises(ConfigError, match="--use_galore .* needs --tuner_type full, not lora"):
        PlanArguments(model=model, tuner_type="lora", use_galore=True)
    with pytest.raises(ConfigError, match=r"--quant_method 'nf8': expected nf4 \| int8"):
        PlanArguments(model=model, tuner_type="lora", quant_method="nf8")
    with pytest.raises(ConfigError, match="--quant_method nf4 quantizes the frozen base under LoRA: it needs "
                                          "--tuner_type lora or qlora, not full"):
        PlanArguments(model=model, tuner_type="full", quant_method="nf4")
    with pytest.raises(ConfigError, match="--max_length must be positive, got 0"):
        PlanArguments(model=model, max_length=0)


def test_cli_reports_errors_in_one_line(capsys):
    assert cli.main(["plan", "--model", "qwen9-1b"]) == 2
    assert "error: --model 'qwen9-1b': not a file, a folder or a preset" in capsys.readouterr().err
    assert cli.main(["plan", "--model", "qwen2.5-7b", "--mesh", "data=2,pipe=2"]) == 2
    assert "unknown axis 'pipe'" in capsys.readouterr().err


# --- against a real run --------------------------------------------------------------------------------------------

REAL_RUN = textwrap.dedent("""
    import json, os, sys, threading, time
    from pathlib import Path
    import jax, numpy as np
    from jaxswift.data.packing import BATCH_DTYPES
    from jaxswift.models.config import config_from_hf
    from jaxswift.models.spec import init_params
    from jaxswift.optim.factory import OptimizerConfig, make_optimizer
    from jaxswift.parallel.mesh import make_mesh
    from jaxswift.parallel.rules import load_rules
    from jaxswift.train.args import SftArguments
    from jaxswift.train.step import make_train_step
    from jaxswift.train.loop import RunContext, compile_step, init_state
    from jaxswift.train.tuning import TunedParams

    config_path, out_dir, rows, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    cfg = config_from_hf(json.loads(Path(config_path).read_text()), dtype="float32").replace(remat="full")
    args = SftArguments(output_dir=out_dir, tuner_type="full")
    ctx = RunContext(args, Path(out_dir), make_mesh("1"), load_rules("default"), 1, None, cfg)
    optimizer = make_optimizer(OptimizerConfig(), 1000)[0]
    params = init_params(cfg, jax.random.key(0))
    state, _ = init_state(ctx, TunedParams(params, jax.tree.map(lambda _: True, params), None, None), optimizer, [])
    del params
    step = compile_step(ctx, make_train_step(cfg, optimizer), state)
    rng = np.random.default_rng(0)
    batch = {k: np.zeros((1, rows, length), dt) for k, dt in BATCH_DTYPES.items()}
    batch["tokens"][:] = rng.integers(0, cfg.vocab_size, batch["tokens"].shape)
    batch["targets"][:] = rng.integers(0, cfg.vocab_size, batch["targets"].shape)
    batch["loss_weights"][:], batch["segment_ids"][:], batch["positions"][:] = 1, 1, np.arange(length)
    batch = jax.device_put(batch, ctx.batch_sharding)
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)  # compiled and warmed up

    page = os.sysconf("SC_PAGE_SIZE")
    resident = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * page
    peak, done = [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], resident())
            time.sleep(0.0002)
    time.sleep(0.2)
    before = resident()
    sampler = threading.Thread(target=sample)
    sampler.start()
    for _ in range(3):
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
    done.set()
    sampler.join()
    live = sum(x.nbytes for x in jax.tree.leaves((state, batch)))
    print(json.dumps({"peak": peak[0] - before + live, "live": live, "loss": float(metrics["loss"])}))
""")


def test_planned_peak_within_20_percent_of_a_real_run(tmp_path):
    model, rows, length = _config_file(tmp_path), 4, 512
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    real = subprocess.Popen([sys.executable, "-c", REAL_RUN, model, str(tmp_path / "run"), str(rows), str(length)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        plan = plan_train_step(PlanArguments(model=model, tuner_type="full", dtype="float32", max_length=length,
                                             per_device_train_batch_size=rows, gradient_checkpointing=True))
        out, err = real.communicate(timeout=600)
    finally:
        real.kill()
    assert real.returncode == 0, err[-3000:]
    measured = json.loads(out.strip().splitlines()[-1])
    print(f"\nplanned {plan.total / 2**20:.1f} MiB (temporaries {plan.temporaries / 2**20:.1f} MiB), "
          f"measured {measured['peak'] / 2**20:.1f} MiB (live state + batch {measured['live'] / 2**20:.1f} MiB)")
    assert np.isfinite(measured["loss"])
    # The planner's argument bytes are the real run's live state and batch, to the byte.
    assert plan.weights + plan.optimizer + plan.batch_and_misc == measured["live"]
    assert plan.temporaries > measured["live"]  # the comparison is about the step's own memory, not just weights
    assert abs(plan.total - measured["peak"]) <= 0.2 * measured["peak"]
