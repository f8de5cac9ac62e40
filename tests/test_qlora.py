"""QLoRA: NF4 weights bit for bit as bitsandbytes' CPU backend makes them, its safetensors layout both ways
(transformers loads ours, we load transformers'), int8 per channel as LLM.int8, quantized bases in SFT."""

import json

import bitsandbytes.functional as bnb_f
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxswift
from jaxswift.errors import CheckpointError, ConfigError
from jaxswift.models.config import ModelConfig
from jaxswift.models.spec import init_params
from jaxswift.models.transformer import forward
from jaxswift.quant import nf4
from jaxswift.quant.int8 import Int8Weight, quantize_int8
from jaxswift.train.args import SftArguments, parse_args
from jaxswift.train.sft import run_sft
from jaxswift.tuners import lora

# torch-layout (out, in) shapes: whole blocks, a last partial block, a real SmolLM2 MLP matrix, an odd count
SHAPES = [(64, 64), (96, 40), (1536, 576), (7, 9)]


def torch_weight(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05


def ours_from_torch(w: torch.Tensor):
    """torch (out, in) -> our [in, out] (one input axis)."""
    return jnp.asarray(w.numpy().T)


def test_tables_are_bitsandbytes():
    assert np.array_equal(nf4.NF4_LEVELS, bnb_f.get_4bit_type("nf4", device="cpu").numpy())
    assert np.array_equal(nf4.DYNAMIC_MAP, bnb_f.create_dynamic_map().numpy())


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_codes_absmax_and_values_match_bitsandbytes(shape):
    """Runs bitsandbytes' own CPU quantize_4bit (it has one in 0.50): packed codes, absmax and dequantized values
    are identical, bit for bit."""
    w = torch_weight(shape, seed=sum(shape))
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    ours = nf4.quantize_nf4(ours_from_torch(w), 1, lead=0, double_quant=False)
    np.testing.assert_array_equal(np.asarray(ours.packed), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(ours.absmax), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(ours.dequantize_torch()), bnb_f.dequantize_4bit(packed, state).numpy())
    np.testing.assert_array_equal(np.asarray(ours.dequantize()), np.asarray(ours.dequantize_torch()).T)


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_double_quantization_matches_bitsandbytes(shape):
    """compress_statistics=True: the 4-bit codes are identical; the offset is torch's float32 mean (summation order
    is torch's, so ours may differ in the last bit: checked to 1 ulp); from the same offset the 8-bit absmax codes
    and the nested absmax are identical, and so are the dequantized values."""
    w = torch_weight(shape, seed=7 * sum(shape))
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = nf4.quantize_nf4(ours_from_torch(w), 1, lead=0)
    np.testing.assert_array_equal(np.asarray(ours.packed), packed.numpy().reshape(-1))
    offset = state.offset.numpy()
    assert abs(float(ours.offset) - float(offset)) <= np.spacing(np.float32(offset))

    _, plain = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    codes, nested, _ = nf4.double_quantize(jnp.asarray(plain.absmax.numpy()), offset)
    np.testing.assert_array_equal(np.asarray(codes), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(nested), state.state2.absmax.numpy())
    same_offset = ours.replace(absmax=codes, nested_absmax=nested, offset=jnp.asarray(offset))
    np.testing.assert_array_equal(np.asarray(same_offset.dequantize_torch()),
                                  bnb_f.dequantize_4bit(packed, state).numpy())


def test_8bit_blockwise_codes_match_bitsandbytes_cpu_kernel():
    """The nested absmax codes go through bitsandbytes' CPU kernel, which snaps value/absmax to a 65535-step grid
    before its lookup: values near a midpoint round as the kernel does (these 40k values hit such cases)."""
    x = torch.randn(40_000, generator=torch.Generator().manual_seed(3)) * 0.01
    codes, state = bnb_f.quantize_blockwise(x, blocksize=256)
    ours, absmax = nf4.quantize_blockwise(jnp.asarray(x.numpy()), nf4.DYNAMIC_MAP, 256, grid=nf4.CPU_GRID)
    np.testing.assert_array_equal(np.asarray(ours), codes.numpy())
    np.testing.assert_array_equal(np.asarray(absmax), state.absmax.numpy())
    exact, _ = nf4.quantize_blockwise(jnp.asarray(x.numpy()), nf4.DYNAMIC_MAP, 256)
    assert (np.asarray(exact) != codes.numpy()).any()  # the grid matters: plain nearest-level rounding differs


def test_bnb_tensors_both_ways():
    """Our tensors through bitsandbytes' QuantState.from_dict + dequantize_4bit, and bitsandbytes' packed state
    dict through our reader: the same values as the other side, bit for bit."""
    w = torch_weight((96, 64), seed=11)
    name = "model.layers.0.self_attn.q_proj.weight"
    ours = nf4.quantize_nf4(ours_from_torch(w), 1, lead=0)
    tensors = nf4.bnb_tensors(ours, name)
    qs = {k[len(name) + 1:]: torch.from_numpy(v) for k, v in tensors.items() if k != name}
    state = bnb_f.QuantState.from_dict(qs, device=torch.device("cpu"))
    theirs = bnb_f.dequantize_4bit(torch.from_numpy(tensors[name]), state).numpy()
    np.testing.assert_array_equal(np.asarray(ours.dequantize_torch()), theirs)

    packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    saved = {name: packed.numpy(), **{f"{name}.{k}": v.numpy() for k, v in state.as_dict(packed=True).items()}}
    read = nf4.nf4_from_bnb_tensors(saved, name, (64,), (96,))
    np.testing.assert_array_equal(np.asarray(read.dequantize_torch()), bnb_f.dequantize_4bit(packed, state).numpy())


def test_bad_bnb_tensors_are_named():
    w = nf4.quantize_nf4(jnp.ones((64, 32)), 1, lead=0)
    name = "model.layers.0.mlp.up_proj.weight"
    tensors = nf4.bnb_tensors(w, name)
    with pytest.raises(CheckpointError, match=r"up_proj.weight has shape \[32, 64\], the config expects \[64, 32\]"):
        nf4.nf4_from_bnb_tensors(tensors, name, (32,), (64,))
    del tensors[f"{name}.absmax"]
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.0.mlp.up_proj.weight.absmax'"):
        nf4.nf4_from_bnb_tensors(tensors, name, (64,), (32,))
    with pytest.raises(ConfigError, match="nf4 block size 100"):
        nf4.quantize_nf4(jnp.ones((64, 32)), 1, lead=0, blocksize=100)


def test_int8_matches_bitsandbytes_llm_int8():
    w = torch_weight((96, 64), seed=5)
    cb, scb, _ = bnb_f.int8_vectorwise_quant(w.clone())
    ours = quantize_int8(ours_from_torch(w), 1, lead=0)
    np.testing.assert_array_equal(np.asarray(ours.q).T, cb.numpy())
    np.testing.assert_array_equal(np.asarray(ours.absmax), scb.numpy())
    np.testing.assert_allclose(np.asarray(ours.dequantize()).T, cb.numpy() * scb.numpy()[:, None] / 127, rtol=1e-6)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_weights_dequantize_inside_the_matmul(method):
    """apply() == einsum with the dequantized weight, for both kinds of projection layout, and a whole forward of
    quantized params == the forward of their dequantized copy (the scan slices the quantized leaves per layer)."""
    cfg = ModelConfig("llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    params = init_params(cfg, jax.random.key(0))
    quantized = nf4.quantize_params(params, cfg, method)
    x = jax.random.normal(jax.random.key(1), (2, 3, 64))
    h = jax.random.normal(jax.random.key(2), (2, 3, 4, 16))

    @jax.jit
    def both_ways(quantized):  # one compile instead of one per eager op
        wq = jax.tree.map(lambda a: a[0], quantized["layers"]["wq"])
        wo = jax.tree.map(lambda a: a[0], quantized["layers"]["wo"])
        dense = jax.tree.map(lambda w: w.dequantize() if hasattr(w, "dequantize") else w, quantized,
                             is_leaf=lambda w: hasattr(w, "dequantize"))
        return (wq.apply("BTD,DNH->BTNH", x), jnp.einsum("BTD,DNH->BTNH", x, wq.dequantize()),
                wo.apply("BTNH,NHD->BTD", h), jnp.einsum("BTNH,NHD->BTD", h, wo.dequantize()), dense)

    q_out, q_ref, o_out, o_ref, dense = both_ways(quantized)
    np.testing.assert_allclose(q_out, q_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o_out, o_ref, rtol=1e-5, atol=1e-5)
    tokens = jnp.array([[1, 5, 9, 30]])
    run = jax.jit(forward, static_argnums=2)
    np.testing.assert_allclose(run(quantized, tokens, cfg), run(dense, tokens, cfg), rtol=1e-5, atol=1e-5)
    error = jnp.max(jnp.abs(dense["layers"]["w_up"] - params["layers"]["w_up"]))
    assert 0 < error < (0.2 if method == "nf4" else 0.01) * jnp.max(jnp.abs(params["layers"]["w_up"]))


def test_quantized_base_is_frozen_and_gets_no_gradient():
    cfg = ModelConfig("llama", vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=2, head_dim=32)
    params = nf4.quantize_params(init_params(cfg, jax.random.key(0)), cfg, "nf4")
    params = lora.add_lora(params, cfg, lora.LoraConfig(rank=4, dropout=0.0, init="gaussian"), jax.random.key(1))
    trainable, frozen = lora.partition(params)
    assert not any(isinstance(x, nf4.NF4Weight) for x in jax.tree.leaves(
        trainable, is_leaf=lambda x: isinstance(x, nf4.NF4Weight)))
    mask = lora.trainable_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    base_leaves = jax.tree.leaves(mask["layers"]["wq"].base)
    assert len(base_leaves) == 4 and not any(base_leaves)
    tokens = jnp.array([[1, 2, 3]])
    grads = jax.jit(jax.grad(lambda t: forward(lora.combine(t, frozen), tokens, cfg).sum()))(trainable)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["layers"]["wq"].b).sum()) > 0  # B starts at zero, so dL/dA = 0 at init


def test_abstract_quantized_params_for_a_7b_config():
    """ShapeDtypeStructs only (a 7B model is never allocated): NF4 is half a byte per weight plus 1 byte per block
    of 64, plus 4 bytes per 256 blocks and the offset."""
    cfg = ModelConfig("qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                      num_heads=28, num_kv_heads=4, head_dim=128, qkv_bias=True)
    abstract = nf4.abstract_quantized_params(cfg, "nf4")
    w_up = abstract["layers"]["w_up"]
    assert isinstance(w_up, nf4.NF4Weight) and isinstance(w_up.packed, jax.ShapeDtypeStruct)
    n = 3584 * 18944
    assert w_up.packed.shape == (28, n // 2) and w_up.packed.dtype == jnp.uint8
    assert w_up.absmax.shape == (28, n // 64) and w_up.nested_absmax.shape == (28, -(-n // 64 // 256))
    assert abstract["embed"].shape == (152064, 3584)  # embeddings, norms and lm_head stay float


@pytest.fixture(scope="module")
def bnb_folder(tmp_path_factory, tiny_chat_model):
    """transformers quantizes the tiny model with bitsandbytes (CPU) and saves it."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model, quantization_config=config, device_map="cpu")
    folder = tmp_path_factory.mktemp("bnb_nf4")
    model.save_pretrained(folder)
    return folder, model


def dequantized_copy(model):
    """The transformers model with each bitsandbytes Linear4bit replaced by a float nn.Linear holding its
    dequantized weight: the reference for our dequantize-in-the-matmul forward (bitsandbytes' own CPU 4-bit matmul
    is not float32-exact: about 2e-3 off x @ dequantize(W) on this model)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child).__name__ == "Linear4bit":
                dense = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                dense.weight.data = bnb_f.dequantize_4bit(child.weight.data, child.weight.quant_state).float()
                if child.bias is not None:
                    dense.bias.data = child.bias.data.float()
                setattr(module, child_name, dense)
    return model


def test_transformers_bnb_folders_load_both_ways(bnb_folder, tiny_chat_model, tmp_path):
    """We read transformers' NF4 folder, and transformers reads ours: the Linear4bit weights dequantize to exactly
    ours, and our logits equal transformers' on those dequantized weights (1e-4)."""
    from transformers import AutoModelForCausalLM

    folder, theirs = bnb_folder
    tokens = np.array([[1, 17, 300, 4000, 9]])
    cfg, params = nf4.load_bnb_nf4(folder)
    assert isinstance(params["layers"]["w_down"], nf4.NF4Weight)
    layer = theirs.model.layers[0].self_attn.o_proj
    np.testing.assert_array_equal(
        np.asarray(jax.tree.map(lambda a: a[0], params["layers"]["wo"]).dequantize_torch()),
        bnb_f.dequantize_4bit(layer.weight.data, layer.weight.quant_state).numpy())
    with torch.no_grad():
        expected = dequantized_copy(theirs)(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(forward(params, jnp.asarray(tokens), cfg), expected, atol=1e-4, rtol=1e-4)

    base = jaxswift.load_model(str(tiny_chat_model), load_tokenizer=False)
    quantized = nf4.quantize_params(base.params, base.config, "nf4")
    nf4.save_bnb_nf4(quantized, base.config, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    layer = loaded.model.layers[1].mlp.up_proj
    assert type(layer).__name__ == "Linear4bit"
    mine = jax.tree.map(lambda a: a[1], quantized["layers"]["w_up"]).dequantize_torch()
    np.testing.assert_array_equal(bnb_f.dequantize_4bit(layer.weight.data, layer.weight.quant_state).numpy(),
                                  np.asarray(mine))
    with torch.no_grad():
        logits = dequantized_copy(loaded)(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(forward(quantized, jnp.asarray(tokens), base.config), logits, atol=1e-4, rtol=1e-4)


def sft_args(model, out, **overrides) -> SftArguments:
    base = dict(model=str(model), output_dir=str(out), max_steps=5, logging_steps=1, learning_rate=2e-3,
                per_device_train_batch_size=2, max_length=128, demo_question="", disable_tqdm=True,
                save_steps=1000, lr_scheduler_type="constant", lora_dropout=0.0, mesh="1")
    return SftArguments(**{**base, **overrides})


def test_qlora_sft_lowers_the_loss_like_lora(tiny_chat_model, tmp_path):
    plain = run_sft(sft_args(tiny_chat_model, tmp_path / "lora"), progress=False).losses
    quantized = run_sft(sft_args(tiny_chat_model, tmp_path / "qlora", quant_method="nf4"), progress=False).losses
    assert sorted(plain) == sorted(quantized) == [1, 2, 3, 4, 5]
    assert quantized[5] < quantized[1] and plain[5] < plain[1]
    for step in plain:
        assert abs(quantized[step] - plain[step]) <= 0.1 * plain[step], step
    drop, quantized_drop = plain[1] - plain[5], quantized[1] - quantized[5]
    assert abs(quantized_drop - drop) <= 0.5 * drop


@pytest.mark.parametrize("flags, message", [
    (dict(quant_method="gptq"), r"--quant_method 'gptq': expected nf4 \| int8"),
    (dict(quant_method="nf4", tuner_type="full"), r"needs --tuner_type lora \(got full\)"),
    (dict(quant_method="int8", use_dora=True), "DoRA and PiSSA"),
    (dict(quant_method="nf4", init_weights="pissa"), "DoRA and PiSSA"),
])
def test_bad_quant_flags(flags, message):
    with pytest.raises(ConfigError, match=message):
        SftArguments(**flags)


def test_bad_quant_flag_on_the_command_line():
    with pytest.raises(ConfigError, match="--quant_method 'fp4'"):
        parse_args(SftArguments, ["--quant_method", "fp4"])
    assert parse_args(SftArguments, ["--quant_method", "int8"]).quant_method == "int8"


def test_quantize_params_refuses_adapted_or_unknown():
    cfg = ModelConfig("llama", vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=2, head_dim=32)
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ConfigError, match="--quant_method 'nf8'"):
        nf4.quantize_params(params, cfg, "nf8")
    adapted = lora.add_lora(params, cfg, lora.LoraConfig(rank=2), jax.random.key(1))
    with pytest.raises(ConfigError, match="wq: already quantized or adapted"):
        nf4.quantize_params(adapted, cfg, "nf4")
    assert isinstance(nf4.quantize_params(params, cfg, "int8")["layers"]["w_down"], Int8Weight)
