"""Parity of the model core with transformers on tiny random models of every family (float32)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import jaxswift
from jaxswift.checkpoints.hf import load_hf_params, read_hf_config
from jaxswift.errors import CheckpointError, ConfigError
from jaxswift.models.transformer import forward

BASE = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=80, max_position_embeddings=256)

VARIANTS = {
    "llama_gqa_untied": ("llama", dict()),
    "llama_mqa_tied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama_llama3_rope": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama_linear_rope": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "llama_yarn_rope": ("llama", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64))),
    "mistral_sliding_window": ("mistral", dict(sliding_window=5, head_dim=16)),
    "qwen2_bias_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2_sliding_layers": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                           num_hidden_layers=3)),
    "qwen3_qk_norm": ("qwen3", dict(head_dim=32)),
    "qwen3_mqa_tied": ("qwen3", dict(num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)),
}


def make_hf_model(family: str, overrides: dict, folder, seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **{**BASE, **overrides})
    config.architectures = [type(AutoModelForCausalLM.from_config(config)).__name__]
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    # Norm weights start at 1 and biases at 0: randomize so a mis-mapped norm or bias cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant, tmp_path):
    family, overrides = VARIANTS[variant]
    model = make_hf_model(family, overrides, tmp_path)
    cfg, _ = read_hf_config(tmp_path)
    params = load_hf_params(tmp_path, cfg)
    tokens = np.random.RandomState(1).randint(0, BASE["vocab_size"], (2, 24))
    ours = np.asarray(forward(params, jnp.asarray(tokens), cfg))
    np.testing.assert_allclose(ours, hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_variants_exercise_the_features(tmp_path):
    """Guards the parametrization above: each feature really is switched on in some variant."""
    seen = set()
    for name, (family, overrides) in VARIANTS.items():
        folder = tmp_path / name
        make_hf_model(family, overrides, folder)
        cfg, _ = read_hf_config(folder)
        seen |= {f"rope:{cfg.rope.type}", f"tied:{cfg.tie_word_embeddings}"}
        seen |= {"bias"} if cfg.qkv_bias else set()
        seen |= {"qk_norm"} if cfg.qk_norm else set()
        seen |= {"window"} if any(cfg.window_per_layer) else set()
        seen |= {"mixed_windows"} if len(set(cfg.window_per_layer)) > 1 else set()
        seen |= {"mqa"} if cfg.num_kv_heads == 1 else {"gqa"}
    assert seen >= {"rope:default", "rope:linear", "rope:llama3", "rope:yarn", "tied:True", "tied:False", "bias",
                    "qk_norm", "window", "mixed_windows", "mqa", "gqa"}


def test_save_model_round_trip(tmp_path):
    make_hf_model("qwen2", dict(), tmp_path / "src")
    model = jaxswift.load_model(str(tmp_path / "src"))
    jaxswift.save_model(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    tokens = np.random.RandomState(2).randint(0, BASE["vocab_size"], (2, 16))
    ours = np.asarray(forward(model.params, jnp.asarray(tokens), model.config))
    np.testing.assert_allclose(hf_logits(reloaded, tokens), ours, atol=1e-5, rtol=0)


def test_sharded_index_round_trip(tmp_path):
    make_hf_model("llama", dict(), tmp_path / "src")
    model = jaxswift.load_model(str(tmp_path / "src"))
    from jaxswift.checkpoints.hf import save_hf

    save_hf(model.params, model.config, tmp_path / "out", max_shard_bytes=50_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    again = jaxswift.load_model(str(tmp_path / "out"))
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_packed_segments_equal_separate_rows(tmp_path):
    make_hf_model("qwen3", dict(), tmp_path)
    model = jaxswift.load_model(str(tmp_path))
    rng = np.random.RandomState(3)
    a, b = rng.randint(0, 96, 9), rng.randint(0, 96, 6)
    packed = np.concatenate([a, b, np.zeros(3, int)])[None]
    segments = np.array([[1] * 9 + [2] * 6 + [0] * 3])
    positions = np.array([list(range(9)) + list(range(6)) + [0] * 3])
    out = np.asarray(forward(model.params, jnp.asarray(packed), model.config, positions=jnp.asarray(positions),
                             segment_ids=jnp.asarray(segments)))[0]
    alone_a = np.asarray(forward(model.params, jnp.asarray(a[None]), model.config))[0]
    alone_b = np.asarray(forward(model.params, jnp.asarray(b[None]), model.config))[0]
    np.testing.assert_allclose(out[:9], alone_a, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[9:15], alone_b, atol=1e-5, rtol=0)


def test_causality_by_gradient(tmp_path):
    """d logits[t] / d embedding[s] is zero for every s > t."""
    make_hf_model("llama", dict(), tmp_path)
    model = jaxswift.load_model(str(tmp_path))
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, 96, (1, 8)))
    t = 3

    def logit_t(embed):
        return forward({**model.params, "embed": embed}, tokens, model.config)[0, t].sum()

    grad = jax.grad(logit_t)(model.params["embed"])
    later = np.asarray(tokens[0, t + 1:])
    earlier = set(np.asarray(tokens[0, : t + 1]).tolist())
    for tok in later:
        if tok not in earlier:
            assert np.abs(np.asarray(grad[tok])).max() == 0.0


def test_mesh_forward_equals_single_device(tmp_path):
    from jaxswift.models.spec import logical_axes
    from jaxswift.parallel.mesh import make_mesh
    from jaxswift.parallel.rules import activation_sharding, batch_sharding, load_rules, param_shardings

    make_hf_model("llama", dict(num_attention_heads=4, num_key_value_heads=2), tmp_path)
    model = jaxswift.load_model(str(tmp_path))
    tokens = np.random.RandomState(5).randint(0, 96, (8, 16))
    expected = np.asarray(forward(model.params, jnp.asarray(tokens), model.config))

    mesh = make_mesh("4x2", jax.devices()[:8])
    rules = load_rules("default")
    shardings = param_shardings(logical_axes(model.config), model.params, rules, mesh)
    params = jax.device_put(model.params, shardings)
    assert params["layers"]["wq"].sharding.spec[2] == "tensor"  # heads really are split
    sharded_tokens = jax.device_put(jnp.asarray(tokens), batch_sharding(rules, mesh))

    def run(p, t):
        with activation_sharding(rules, mesh):
            return forward(p, t, model.config)

    out = jax.jit(run)(params, sharded_tokens)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)


# --- bad inputs -------------------------------------------------------------------------------------------------


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError) as e:
        read_hf_config(tmp_path)
    assert str(tmp_path) in one_line(e) and "config.json" in one_line(e)


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ConfigError) as e:
        read_hf_config(tmp_path)
    assert "GPT2LMHeadModel" in one_line(e) and "config.json" in one_line(e)


def test_truncated_safetensors(tmp_path):
    make_hf_model("llama", dict(), tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        jaxswift.load_model(str(tmp_path))
    assert "model.safetensors" in one_line(e) and "truncated" in one_line(e)


def test_missing_and_misshapen_tensors(tmp_path):
    from jaxswift.checkpoints.safetensors_io import SafetensorsFile, write_safetensors

    make_hf_model("llama", dict(), tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = {k: np.array(v) for k, v in ((k, SafetensorsFile(path).get(k)) for k in SafetensorsFile(path).keys())}
    del tensors["model.layers.1.mlp.up_proj.weight"]
    write_safetensors(path, tensors)
    with pytest.raises(CheckpointError) as e:
        jaxswift.load_model(str(tmp_path))
    assert "model.layers.1.mlp.up_proj.weight" in one_line(e)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    write_safetensors(path, tensors)
    with pytest.raises(CheckpointError) as e:
        jaxswift.load_model(str(tmp_path))
    assert "shape" in one_line(e)


def test_pickle_checkpoints_are_refused(tmp_path):
    make_hf_model("llama", dict(), tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        jaxswift.load_model(str(tmp_path))
    assert "safetensors" in one_line(e)


@pytest.mark.parametrize("length", [200, 256, 448])
def test_block_causal_attention_equals_full_attention(length):
    """causal_self_attention skips the keys after each query block (blocks of 128, the last one partial); on packed
    rows (two segments, then padding) it must equal attention over every key."""
    from jaxswift.models.transformer import attention_mask, causal_self_attention, grouped_attention

    rng = np.random.default_rng(length)
    B, N, K, H = 2, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(B, length, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, K, H, length)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, K, length, H)), jnp.float32)
    split, pad = length // 3, length - 10
    col = np.arange(length)
    seg = np.broadcast_to(np.where(col < split, 1, np.where(col < pad, 2, 0)), (B, length))
    pos = np.broadcast_to(np.where(col < split, col, np.where(col < pad, col - split, 0)), (B, length))
    mask = attention_mask(jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(seg), 0)
    real = seg[:, :, None, None] > 0
    np.testing.assert_allclose(np.where(real, causal_self_attention(q, k, v, mask), 0),
                               np.where(real, grouped_attention(q, k, v, mask), 0), atol=1e-6)
