"""Quantized weights in the engine: GPTQ folders from `jaxswift export` served over HTTP, `--quant_method int8|nf4`
on load (deploy and infer), the int8 decode matmul that reads the codes in place, and the errors for bad inputs.

Speed and held-out perplexity on SmolLM2 live in benchmarks/serve_quant.py (benchmarks/RESULTS.md).
"""

import json
import shutil
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxswift
from jaxswift.api import chat_prompt_ids
from jaxswift.errors import CheckpointError, ConfigError
from jaxswift.models.config import ModelConfig
from jaxswift.models.spec import init_params
from jaxswift.models.transformer import forward, unstack_layers
from jaxswift.quant.nf4 import NF4Weight
from jaxswift.quant.qweight import QuantizedWeight
from jaxswift.quant.serving import RowInt8Weight, inference_params, row_int8
from jaxswift.recipes.common import run_main
from jaxswift.recipes.serve import ServeArguments, build_server
from jaxswift.train.args import parse_args

from server_fixtures import running

PROMPT = "Name three colours of the rainbow."


def chat(url: str, max_tokens: int = 8) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def greedy_text(model, max_tokens: int = 8) -> str:
    """The reference: jaxswift.generate_ids (contiguous cache, no engine) on the same params."""
    prompt = chat_prompt_ids(model, [{"role": "user", "content": PROMPT}])
    ids = jaxswift.generate_ids(model, [prompt], max_new_tokens=max_tokens)[0]
    return model.tokenizer.decode(ids, skip_special_tokens=True)


def serve_args(folder, *extra) -> ServeArguments:
    return parse_args(ServeArguments, ["--model", str(folder), "--served_model_name", "m", "--max_num_seqs", "2",
                                       "--max_model_len", "128", "--no_warmup", *extra])


@pytest.fixture(scope="module")
def gptq_folder(tiny_chat_model, tmp_path_factory):
    """A 4-bit GPTQ folder written by `jaxswift export` (the recipe, calibrated on a small JSONL)."""
    from jaxswift.recipes.export import main

    tmp = tmp_path_factory.mktemp("gptq_export")
    calib = tmp / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"Line {i}: a quantized model still answers questions."})
                               for i in range(20)))
    out = tmp / "gptq"
    assert run_main(main, ["--model", str(tiny_chat_model), "--quant_method", "gptq", "--group_size", "32",
                           "--quant_n_samples", "2", "--quant_seqlen", "32", "--dataset", str(calib),
                           "--output_dir", str(out)]) == 0
    return out


def _served_answer(args: ServeArguments):
    app, orchestrator = build_server(args)
    try:
        with running(app) as url:
            return chat(url), orchestrator.engine.params
    finally:
        orchestrator.shutdown()


def test_gptq_folder_written_by_export_serves_and_answers(gptq_folder):
    answer, params = _served_answer(serve_args(gptq_folder))
    assert isinstance(params["layers"][0]["w_up"], QuantizedWeight)  # served quantized, not converted to float
    expected = greedy_text(jaxswift.load_model(str(gptq_folder)))
    assert answer["choices"][0]["message"]["content"] == expected and expected
    assert answer["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("method, leaf", [("int8", RowInt8Weight), ("nf4", NF4Weight)])
def test_quant_method_on_load_serves_the_quantized_weights(tiny_chat_model, method, leaf):
    answer, params = _served_answer(serve_args(tiny_chat_model, "--quant_method", method))
    assert isinstance(params["layers"][0]["wq"], leaf) and isinstance(params["embed"], jax.Array)
    model = jaxswift.load_model(str(tiny_chat_model))
    quantized = model.__class__(model.config, inference_params(model.params, model.config, method, "test"),
                                model.tokenizer)
    assert answer["choices"][0]["message"]["content"] == greedy_text(quantized)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (1, 12)), jnp.int32)
    ref, ours = (jax.jit(forward, static_argnums=2)(p, tokens, model.config) for p in (model.params,
                                                                                       quantized.params))
    error = float(jnp.abs(ours - ref).max()) / float(jnp.abs(ref).max())
    assert 0 < error < (0.02 if method == "int8" else 0.15), error


def test_infer_recipe_quantizes_on_load(tiny_chat_model):
    from jaxswift.recipes.infer import InferArguments, _load, main

    args = ["--model", str(tiny_chat_model), "--prompt", "Hi", "--max_new_tokens", "3", "--quant_method", "int8"]
    assert isinstance(_load(parse_args(InferArguments, args)).params["layers"]["w_gate"], RowInt8Weight)
    assert run_main(main, args) == 0


# ---------------------------------------------------------------- the int8 matmul

@pytest.mark.parametrize("rows", [1, 3, 32])  # 1 and 3: the reduction path; 32: dequantize, then one dot
def test_row_int8_matmul_equals_the_dequantized_weight(rows):
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((1, 4, 16, 48)).astype(np.float32))  # [L, N, H, D] like wo
    q = row_int8(w, 2)
    w_back = q.dequantize()
    assert w_back.shape == w.shape and q.codes.dtype == jnp.int8 and q.codes.shape == (1, 48, 64)
    assert float(jnp.abs(w_back - w).max()) <= float(q.scale.max()) / 2 + 1e-6  # round to nearest
    one = jax.tree.map(lambda a: a[0], q)
    x = jnp.asarray(rng.standard_normal((rows, 1, 4, 16)).astype(np.float32))
    ours = one.apply("BTNH,NHD->BTD", x)
    ref = jnp.einsum("BTNH,NHD->BTD", x, w_back[0])
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_int8_export_folder_serves_as_row_int8_with_the_same_weights(tiny_chat_model, tmp_path):
    from jaxswift.quant.export_formats import QuantSpec, quantize_model, save_quantized

    model = jaxswift.load_model(str(tiny_chat_model))
    spec = QuantSpec("int8", 8)
    save_quantized(model, quantize_model(model, spec, None), spec, tmp_path / "int8")
    loaded = jaxswift.load_model(str(tmp_path / "int8"))
    served = inference_params(loaded.params, loaded.config, None, "test")
    assert isinstance(served["lm_head"], RowInt8Weight)  # int8 serving's output projection (the folder's is float)
    for key in ("wq", "wo", "w_down"):
        before, after = loaded.params["layers"][key], served["layers"][key]
        assert isinstance(before, QuantizedWeight) and isinstance(after, RowInt8Weight)
        np.testing.assert_array_equal(np.asarray(after.dequantize()), np.asarray(before.dequantize()))


def test_decode_reads_int8_codes_in_place_without_a_float_copy():
    """The compiled one-token forward over int8 weights needs less temporary memory than one float projection:
    no projection is converted to a float array (XLA:CPU would otherwise allocate it as a temporary)."""
    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=256, intermediate_size=1024, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=64)
    params = init_params(cfg, jax.random.key(0))
    quantized = unstack_layers(inference_params(params, cfg, "int8", "test"))
    one_weight = 256 * 1024 * 4

    def temp_bytes(rows):
        tokens = jnp.zeros((1, rows), jnp.int32)
        compiled = jax.jit(forward, static_argnums=2).lower(quantized, tokens, cfg).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(1) < one_weight / 4
    assert temp_bytes(64) >= one_weight  # prefill converts (the check above can tell the difference)


# ---------------------------------------------------------------- bad inputs

def test_unknown_quant_method_is_refused_by_deploy_and_infer():
    from jaxswift.recipes.infer import InferArguments

    for cls in (ServeArguments, InferArguments):
        with pytest.raises(ConfigError, match=r"--quant_method 'int4': expected nf4 \| int8"):
            parse_args(cls, ["--quant_method", "int4"])


def test_quant_method_on_an_already_quantized_folder_is_refused(gptq_folder):
    with pytest.raises(ConfigError, match="already quantized .*QuantizedWeight.*drop --quant_method"):
        build_server(serve_args(gptq_folder, "--quant_method", "int8"))


def test_missing_or_inconsistent_quantization_config_is_named(gptq_folder, tiny_chat_model, tmp_path):
    missing = tmp_path / "missing"
    shutil.copytree(gptq_folder, missing)
    config = json.loads((missing / "config.json").read_text())
    quantization_config = config.pop("quantization_config")
    (missing / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="qweight.*needs the quantization_config"):
        build_server(serve_args(missing))

    float_folder = tmp_path / "float_with_gptq_config"
    shutil.copytree(tiny_chat_model, float_folder)
    config = json.loads((float_folder / "config.json").read_text())
    (float_folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    with pytest.raises(CheckpointError, match="quant_method 'gptq', but every linear weight is a plain float"):
        build_server(serve_args(float_folder))

    wrong_bits = tmp_path / "wrong_bits"
    shutil.copytree(gptq_folder, wrong_bits)
    config = json.loads((wrong_bits / "config.json").read_text())
    config["quantization_config"]["bits"] = 3
    (wrong_bits / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantization_config bits 3 is not 4 or 8"):
        build_server(serve_args(wrong_bits))
