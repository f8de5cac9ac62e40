"""Quantized export (GPTQ, AWQ, FP8, int8): layouts, round trips, loading in transformers, errors, SmolLM2 quality.

References: the checkpoint layouts are checked against float64/integer numpy transcriptions of the loaders'
unpacking formulas (AutoGPTQ's v1 qweight/qzeros, AutoAWQ's GEMM order), because transformers loads GPTQ and AWQ
only through gptqmodel, which has no CPU build that leaves this torch in place; FP8 and int8 folders are loaded in
transformers itself (through compressed-tensors) and compared logit for logit.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxswift
from jaxswift.errors import CheckpointError, ConfigError, DataError
from jaxswift.models.transformer import forward
from jaxswift.quant import gptq
from jaxswift.quant.export_formats import QuantSpec, quantize_model, save_quantized
from jaxswift.quant.packing import pack_int32, unpack_int32
from jaxswift.quant.qweight import LINEAR_KEYS, QuantizedWeight

AUTOAWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # AutoAWQ's unpacking: slot of output column o % 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random llama (hidden 128, 4 heads / 2 kv heads, mlp 256, 2 layers), as an HF folder and loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=256, hidden_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                                  tie_word_embeddings=False, max_position_embeddings=256)
    config.architectures = ["LlamaForCausalLM"]
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder, jaxswift.load_model(str(folder), load_tokenizer=False)


def _calibration(n=4, t=32):
    return np.random.default_rng(0).integers(0, 256, (n, t)).astype(np.int32)


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_packing_matches_autogptq_unpacking(bits):
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, (64, 24)).astype(np.uint8)
    packed = pack_int32(codes, bits, axis=0)
    assert packed.dtype == np.int32 and packed.shape == (64 * bits // 32, 24)
    per_word = 32 // bits
    rows = np.arange(64)[:, None]
    words = packed.view(np.uint32)[rows // per_word, np.arange(24)]
    reference = (words >> (bits * (rows % per_word))) & (2 ** bits - 1)
    np.testing.assert_array_equal(reference, codes)
    np.testing.assert_array_equal(unpack_int32(packed, bits, axis=0), codes)


def test_awq_packing_matches_autoawq_unpacking():
    from jaxswift.quant.awq import AWQ_ORDER

    codes = np.random.default_rng(1).integers(0, 16, (16, 32)).astype(np.uint8)
    packed = pack_int32(codes, 4, axis=1, order=AWQ_ORDER)
    assert packed.shape == (16, 4)
    cols = np.arange(32)[None, :]
    slot = np.asarray(AUTOAWQ_REVERSE_ORDER)[cols % 8]
    reference = (packed.view(np.uint32)[np.arange(16)[:, None], cols // 8] >> (4 * slot)) & 15
    np.testing.assert_array_equal(reference, codes)
    np.testing.assert_array_equal(unpack_int32(packed, 4, axis=1, order=AWQ_ORDER), codes)


# ---------------------------------------------------------------- GPTQ math

def _reference_gptq(w_OI, h, bits, gs, desc_act):
    """The GPTQ loop without lazy blocks, float64 (Frantar et al., Algorithm 1)."""
    w, h = w_OI.astype(np.float64).copy(), h.astype(np.float64).copy()
    I = w.shape[1]
    h[np.diag_indices(I)] += 0.01 * np.mean(np.diag(h))
    perm = np.argsort(-np.diag(h), kind="stable") if desc_act else np.arange(I)
    w, h = w[:, perm], h[np.ix_(perm, perm)]
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    maxq, q = 2 ** bits - 1, np.zeros_like(w)
    for j in range(I):
        if j % gs == 0:
            block = w[:, j:j + gs]
            high = np.maximum(np.maximum(-block.min(1), block.max(1)), 0)
            scale = (2 * high / maxq).astype(np.float16).astype(np.float64)
            zero = (maxq + 1) // 2
        q[:, j] = np.clip(np.round(w[:, j] / scale) + zero, 0, maxq)
        err = (w[:, j] - (q[:, j] - zero) * scale) / u[j, j]
        w[:, j:] -= np.outer(err, u[j, j:])
    return q[:, np.argsort(perm)]


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_matches_the_unblocked_float64_algorithm(desc_act):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(256, 16)) @ rng.normal(size=(16, 64)) + 0.1 * rng.normal(size=(256, 64))  # correlated
    h = 2 * x.T @ x / len(x)
    w_IO = rng.normal(size=(64, 16)).astype(np.float32)
    q = gptq.gptq_quantize(w_IO, h, bits=4, group_size=16, desc_act=desc_act)
    reference = _reference_gptq(w_IO.T, h, 4, 16, desc_act).T
    assert np.mean(np.asarray(q.codes) == reference) > 0.99  # float32 vs float64 may flip a rare tie
    # GPTQ's objective: a smaller output error on the calibration inputs than round-to-nearest on its own grid
    deq = (np.asarray(q.codes, np.float64) - q.zero[q.g_idx]) * q.scale[q.g_idx]
    rtn_scale, rtn_zero = (np.repeat(np.asarray(a), 16, axis=0) for a in zip(*[
        gptq.minmax_params(w_IO[g:g + 16].T, 4, True) for g in range(0, 64, 16)]))
    rtn = (np.clip(np.round(w_IO / rtn_scale) + rtn_zero, 0, 15) - rtn_zero) * rtn_scale
    err = lambda w: np.mean((x @ (w - w_IO)) ** 2)  # noqa: E731
    assert err(deq) < 0.5 * err(rtn), (err(deq), err(rtn))
    if desc_act:
        assert not np.array_equal(q.g_idx, np.sort(q.g_idx))  # groups follow the act order


# ---------------------------------------------------------------- AWQ math

def _tiny_layer(tiny):
    return {k: np.asarray(v[0], np.float32) for k, v in tiny[1].params["layers"].items()}


def _awq_activations(shape, seed=3):
    """Inputs with a few outlier channels, the case AWQ's activation-aware scales are for."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * np.where(rng.random(shape[-1]) < 0.05, 20.0, 1.0)).astype(np.float32)


def _reference_awq_fake_quantize(w_IO, gs):
    """AutoAWQ's pseudo_quantize_tensor with zero_point, float64, scales rounded to float16 as they are stored."""
    groups = w_IO.reshape(-1, gs, w_IO.shape[1])
    high, low = groups.max(axis=1, keepdims=True), groups.min(axis=1, keepdims=True)
    scale = (np.maximum(high - low, 1e-5) / 15).astype(np.float16).astype(np.float64)
    zero = np.clip(-np.round(low / scale), 0, 15)
    return ((np.clip(np.round(groups / scale) + zero, 0, 15) - zero) * scale).reshape(w_IO.shape)


def _reference_block(block, layer, x, cfg):
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    if block == "mlp":
        return (silu(x @ layer["w_gate"]) * (x @ layer["w_up"])) @ layer["w_down"]
    if block == "wo":
        return x @ layer["wo"].reshape(-1, cfg.hidden_size)
    return x @ layer["w_down"]


@pytest.mark.parametrize("block, keys, heads_per_scale", [("mlp", ("w_gate", "w_up"), 1), ("w_down", ("w_down",), 1),
                                                          ("wo", ("wo",), 2)])
def test_awq_scale_search_matches_a_float64_transcription_of_autoawq(tiny, block, keys, heads_per_scale):
    """For each ratio a of the grid: s = x_mean^a / (w_mean^(1-a) + 1e-4), normalised, the block run with
    quantize(w * s) / s, mean squared error against the float block; the search returns the s of the smallest.
    o's scales are shared by the query heads of each kv head (2 here), the mean of their statistics."""
    from jaxswift.quant import awq

    cfg, layer, gs = tiny[1].config, _tiny_layer(tiny), 32
    w = {k: layer[k].reshape(-1, layer[k].shape[-1]).astype(np.float64) if k != "wo" else
         layer[k].reshape(-1, cfg.hidden_size).astype(np.float64) for k in layer if k in LINEAR_KEYS}
    x = _awq_activations((2, 16, w[keys[0]].shape[0]))
    s_chosen, errors = awq.search_scale({k: jnp.asarray(v) for k, v in layer.items()}, jnp.asarray(x), keys=keys,
                                        block=block, heads_per_scale=heads_per_scale, bits=4, group_size=gs,
                                        cfg=cfg, window=0)
    x64 = x.reshape(-1, x.shape[-1]).astype(np.float64)
    shared = np.concatenate([w[k] for k in keys], axis=1)
    groups = np.abs(shared).reshape(-1, gs, shared.shape[1])
    w_mean = (groups / (groups.max(axis=1, keepdims=True) + 1e-6)).reshape(shared.shape).mean(axis=1)
    x_mean = np.abs(x64).mean(axis=0)

    def tie(v):  # the mean over the query heads of each kv head, repeated over them
        per_kv = v.reshape(cfg.num_kv_heads, heads_per_scale, -1).mean(axis=1)
        return np.repeat(per_kv, heads_per_scale, axis=0).reshape(-1)

    x_mean, w_mean = tie(x_mean), tie(w_mean)
    reference = _reference_block(block, w, x64, cfg)
    expected, scales = [], []
    for ratio in np.arange(20) / 20:
        s = np.maximum(x_mean ** ratio / (w_mean ** (1 - ratio) + 1e-4), 1e-4)
        s = s / np.sqrt(s.max() * s.min())
        w_q = _reference_awq_fake_quantize(shared * s[:, None], gs) / s[:, None]
        candidate, start = dict(w), 0
        for k in keys:
            candidate[k] = w_q[:, start:start + w[k].shape[1]]
            start += w[k].shape[1]
        expected.append(np.mean((_reference_block(block, candidate, x64, cfg) - reference) ** 2))
        scales.append(s)
    np.testing.assert_allclose(np.asarray(errors), expected, rtol=2e-3)
    np.testing.assert_allclose(np.asarray(s_chosen), scales[int(np.argmin(expected))], rtol=1e-5)
    assert np.argmin(expected) > 0 and np.ptp(expected) > 0.1 * min(expected)  # the activations do matter here


def test_awq_clip_search_matches_a_float64_transcription_of_autoawq():
    """Each (output, group) of w is clipped to max|w| * (1 - k/20), k < 10, with the k whose quantized partial
    output (that group's inputs only) has the smallest mean squared error over the tokens; the first such k."""
    from jaxswift.quant import awq

    rng, gs = np.random.default_rng(5), 32
    w = (rng.standard_t(3, size=(64, 16)) * 0.1).astype(np.float32)  # heavy tails: clipping pays somewhere
    x = _awq_activations((48, 64))
    got = np.asarray(awq.search_clip(jnp.asarray(x), jnp.asarray(w), bits=4, group_size=gs))
    expected = w.astype(np.float64).copy()
    for g in range(0, 64, gs):
        x_g, w_g = x[:, g:g + gs].astype(np.float64), w[g:g + gs].astype(np.float64)
        for o in range(16):
            column, top = w_g[:, o:o + 1], np.abs(w_g[:, o]).max()
            errors = [np.mean((x_g @ (_reference_awq_fake_quantize(np.clip(column, -m, m), gs) - column)) ** 2)
                      for m in top * (1 - np.arange(10) / 20)]
            best = top * (1 - np.argmin(errors) / 20)
            expected[g:g + gs, o] = np.clip(w_g[:, o], -best, best)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.mean(got != w) > 0.01  # some groups were clipped


def test_awq_folded_scales_leave_the_float_layer_unchanged(tiny):
    """Each scale group's s goes into the rows of its weights and out of the op before (a norm, v's outputs under
    grouped-query attention, up's outputs): the layer computes the same function."""
    from jaxswift.models.transformer import decoder_layer
    from jaxswift.quant import awq
    from jaxswift.quant.calibration import sequence_positions

    cfg, layer = tiny[1].config, {k: jnp.asarray(v) for k, v in _tiny_layer(tiny).items()}
    folded, rng = dict(layer), np.random.default_rng(4)
    for keys, into, _, heads_per_scale in awq.scale_groups(cfg):
        width = np.prod(layer[keys[0]].shape[:2 if keys[0] == "wo" else 1])
        s = rng.uniform(0.2, 5.0, width // heads_per_scale).astype(np.float32)
        if heads_per_scale > 1:  # one scale per kv head channel, repeated over its query heads
            s = np.repeat(s.reshape(cfg.num_kv_heads, 1, -1), heads_per_scale, axis=1).reshape(-1)
        folded = awq.fold_scale(folded, keys, into, jnp.asarray(s), cfg)
    x = jnp.asarray(_awq_activations((2, 16, cfg.hidden_size)))
    positions, segments = sequence_positions(2, 16)
    expected = decoder_layer(x, layer, 0, cfg, positions, segments)[0]
    got = decoder_layer(x, folded, 0, cfg, positions, segments)[0]
    assert all(not np.allclose(folded[k], layer[k]) for k in ("attn_norm", "wv", "wo", "mlp_norm", "w_up"))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- export -> load round trips

SPECS = {
    "gptq4-act-order": QuantSpec("gptq", 4, 32, desc_act=True),
    "gptq8-asym-per-channel": QuantSpec("gptq", 8, -1, sym=False),
    "awq4": QuantSpec("awq", 4, 32),
    "fp8-tensor": QuantSpec("fp8", 8, per_channel=False),
    "int8": QuantSpec("int8", 8),
}


def _gptq_dequant_from_files(tensors, prefix, bits):
    """AutoGPTQ's v1 dequantization, transcribed: w[i, o] = scales[g, o] * (q[i, o] - (qzeros[g, o] + 1))."""
    qweight, qzeros = tensors[prefix + "qweight"].view(np.uint32), tensors[prefix + "qzeros"].view(np.uint32)
    scales, g_idx, per_word, mask = tensors[prefix + "scales"], tensors[prefix + "g_idx"], 32 // bits, 2 ** bits - 1
    rows, cols = np.arange(qweight.shape[0] * per_word)[:, None], np.arange(scales.shape[1])[None, :]
    q = (qweight[rows // per_word, cols] >> (bits * (rows % per_word))) & mask
    z = ((qzeros[g_idx[:, None], cols // per_word] >> (bits * (cols % per_word))) & mask) + 1
    return scales.astype(np.float64)[g_idx[:, None], cols] * (q.astype(np.float64) - z)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """name -> (params with quantized leaves, folder written by save_quantized), each made once."""
    cache = {}

    def make(name):
        if name not in cache:
            spec, out = SPECS[name], tmp_path_factory.mktemp(name)
            params = quantize_model(tiny[1], spec, _calibration() if spec.method in ("gptq", "awq") else None)
            cache[name] = params, save_quantized(tiny[1], params, spec, out)
        return cache[name]
    return make


@pytest.mark.parametrize("name", list(SPECS))
def test_export_then_load_gives_the_quantizer_weights(tiny, exported, name):
    from safetensors.numpy import load_file

    folder, model = tiny
    spec = SPECS[name]
    params, out = exported(name)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    expected_method = {"gptq": "gptq", "awq": "awq"}.get(spec.method, "compressed-tensors")
    assert qc["quant_method"] == expected_method
    loaded = jaxswift.load_model(str(out), load_tokenizer=False)
    for key in LINEAR_KEYS:
        ours, back = params["layers"][key], loaded.params["layers"][key]
        assert isinstance(back, QuantizedWeight) and back.shape == model.params["layers"][key].shape[1:]
        np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(ours.dequantize()))
    if spec.method == "gptq":
        assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == (spec.bits, spec.group_size,
                                                                             spec.desc_act, spec.sym)
        files = load_file(str(out / "model.safetensors"))
        w = _gptq_dequant_from_files(files, "model.layers.1.mlp.down_proj.", spec.bits)
        np.testing.assert_allclose(w, np.asarray(params["layers"]["w_down"].dequantize())[1], rtol=0, atol=1e-6)
    if spec.method == "awq":
        assert (qc["version"], qc["zero_point"], qc["group_size"]) == ("gemm", True, 32)
    if spec.method in ("fp8", "int8"):
        group = qc["config_groups"]["group_0"]["weights"]
        expected = ("float", "tensor") if spec.method == "fp8" else ("int", "channel")
        assert (group["type"], group["strategy"]) == expected


def test_quantized_model_runs_close_to_float_and_identically_after_reload(tiny, exported):
    folder, model = tiny
    params, out = exported("gptq4-act-order")
    loaded = jaxswift.load_model(str(out), load_tokenizer=False)
    tokens = jnp.asarray(_calibration(2, 16))
    run = jax.jit(forward, static_argnums=2)
    ref, ours, back = (run(p, tokens, model.config) for p in (model.params, params, loaded.params))
    np.testing.assert_array_equal(np.asarray(back), np.asarray(ours))
    assert 0 < float(jnp.abs(ours - ref).max()) < 0.2 * float(jnp.abs(ref).max())


@pytest.mark.parametrize("name", ["fp8-tensor", "int8"])
def test_fp8_and_int8_folders_load_in_transformers(tiny, exported, name):
    import torch
    from transformers import AutoModelForCausalLM

    _, out = exported(name)
    reference = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)  # via compressed-tensors
    tokens = _calibration(1, 16)
    with torch.no_grad():
        expected = reference(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    loaded = jaxswift.load_model(str(out), load_tokenizer=False)
    ours = np.asarray(forward(loaded.params, jnp.asarray(tokens), loaded.config))
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("method, bits", [("awq", 8), ("fp8", 4), ("int8", 4), ("gptq", 3)])
def test_unsupported_bits_name_the_method(tiny, method, bits):
    with pytest.raises(ConfigError, match=f"--quant_bits {bits} is not supported by --quant_method {method}"):
        quantize_model(tiny[1], QuantSpec(method, bits), _calibration())


def test_group_size_that_does_not_divide_is_refused(tiny):
    with pytest.raises(ConfigError, match=r"--group_size 48 does not divide the model's hidden_size \(128\)"):
        quantize_model(tiny[1], QuantSpec("gptq", 4, 48), _calibration())


def test_calibrated_methods_need_data(tiny):
    with pytest.raises(ConfigError, match="needs calibration data: pass --dataset"):
        quantize_model(tiny[1], QuantSpec("awq", 4, 32), None)


def test_unreadable_quantization_config_is_named(tiny, exported, tmp_path):
    import shutil

    shutil.copytree(exported("int8")[1], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 3}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: quantization_config bits 3 is not 4 or 8"):
        jaxswift.load_model(str(tmp_path), load_tokenizer=False)


# ---------------------------------------------------------------- the recipe

def test_export_recipe_flags_and_errors(tiny_chat_model, tmp_path, capsys):
    from jaxswift.recipes.export import main
    from jaxswift.recipes.common import run_main

    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"Line {i}: quantized export keeps the model small."})
                               for i in range(40)))
    out = tmp_path / "gptq"
    args = ["--model", str(tiny_chat_model), "--quant_method", "gptq", "--group_size", "32", "--desc_act", "true",
            "--quant_n_samples", "2", "--quant_seqlen", "32", "--output_dir", str(out)]
    assert run_main(main, args + ["--dataset", str(calib)]) == 0
    loaded = jaxswift.load_model(str(out))
    assert isinstance(loaded.params["layers"]["wq"], QuantizedWeight) and loaded.tokenizer is not None
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is True

    assert run_main(main, args) == 2
    assert "need calibration data: pass --dataset FILE" in capsys.readouterr().err
    assert run_main(main, args + ["--dataset", str(calib), "--quant_n_samples", "400"]) == 2
    assert "needs 12800" in capsys.readouterr().err
    assert run_main(main, args[:2] + ["--quant_method", "awq", "--quant_bits", "8"]) == 2
    assert "--quant_bits 8 is not supported by --quant_method awq" in capsys.readouterr().err
    with pytest.raises(DataError):
        from jaxswift.quant.calibration import calibration_tokens
        calibration_tokens([str(calib)], loaded.tokenizer, n_samples=400, seqlen=32)


# ---------------------------------------------------------------- SmolLM2

def _docstrings(modules) -> str:
    """English text without a download: docstrings of standard library modules and their public members."""
    import importlib
    import inspect

    parts = []
    for name in modules:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        parts += [inspect.getdoc(getattr(module, a)) or "" for a in sorted(dir(module)) if not a.startswith("_")
                  and (inspect.isclass(getattr(module, a)) or inspect.isfunction(getattr(module, a)))]
    return "\n\n".join(p for p in parts if p)


CALIBRATION_MODULES = ("argparse", "collections", "json", "logging", "pathlib", "dataclasses", "functools", "typing")


def _windows(tokenizer, text, n, length):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) >= n * length, f"only {len(ids)} tokens of text"
    return np.asarray(ids[: n * length], np.int32).reshape(n, length)


def _perplexity(model, tokens) -> float:
    """exp(mean next-token NLL), log-softmax in float32."""
    logits = jax.jit(forward, static_argnums=2)(model.params, jnp.asarray(tokens[:, :-1]), model.config)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return float(jnp.exp(-jnp.take_along_axis(logp, jnp.asarray(tokens[:, 1:, None]), axis=-1).mean()))


def test_smollm2_gptq4_fp8_int8_exports_keep_perplexity(tmp_path):
    """Acceptance: 4-bit GPTQ and FP8 within 10% of the float model's held-out perplexity, int8 within 2%, each read
    back from its folder by jaxswift.load_model (GPTQ: our loader, since transformers needs gptqmodel for it;
    FP8/int8 also load in transformers, tested above on the tiny model).

    The embedded SmolLM2 is itself a Q4_1 GGUF (4-bit, blocks of 32 with a free offset): a second 4-bit grid with
    integer zero points only fits it in groups of 32 with asymmetric zeros, and act-order; with 16 x 128
    calibration tokens GPTQ lands at +15%, with 64 x 128 under +10%."""
    model = jaxswift.load_model("smollm2-135m-instruct")
    calibration = _windows(model.tokenizer, _docstrings(CALIBRATION_MODULES), 64, 128)
    # 16 x 128 held out, as benchmarks/quant_export.py: with 4 x 128 the GPTQ ratio was under 1.10 on CI and 1.12 on
    # another 2-core machine (the same code and packages: each CPU rounds the float path its own way)
    held_out = _windows(model.tokenizer, _docstrings(("threading", "subprocess", "textwrap", "difflib")), 16, 128)
    base = _perplexity(model, held_out)
    limits = {"gptq": 1.10, "fp8": 1.10, "int8": 1.02}
    ratios = {}
    for spec in (QuantSpec("gptq", 4, 32, desc_act=True, sym=False), QuantSpec("fp8", 8), QuantSpec("int8", 8)):
        out = tmp_path / spec.method
        save_quantized(model, quantize_model(model, spec, calibration), spec, out)
        loaded = jaxswift.load_model(str(out))
        assert isinstance(loaded.params["layers"]["w_down"], QuantizedWeight)
        ratios[spec.method] = _perplexity(loaded, held_out) / base
    print(f"held-out perplexity {base:.3f}; quantized / float: {ratios}")
    assert all(ratios[m] < limits[m] for m in limits), (base, ratios)
    assert ratios["gptq"] > 1.0 + 1e-4  # 4 bits cost something: the quantized weights were really used
