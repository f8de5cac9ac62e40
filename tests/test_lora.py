"""LoRA / rsLoRA / DoRA / PiSSA: parity with peft itself, training views, and bad inputs."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from test_model_parity import BASE, hf_logits, make_hf_model
from transformers import AutoModelForCausalLM

import jaxswift
from jaxswift.checkpoints.peft import load_peft_adapter, merge_and_save, save_peft_adapter
from jaxswift.checkpoints.safetensors_io import SafetensorsFile, write_safetensors
from jaxswift.errors import CheckpointError, ConfigError
from jaxswift.models.transformer import forward
from jaxswift.tuners.lora import (LoraConfig, add_lora, combine, is_lora, load_lora_state, lora_disabled,
                                  lora_logical_axes, lora_state, merge_lora, partition, resolve_targets,
                                  trainable_mask, with_dropout)
from peft_fixtures import randomize_lora_b

TOKENS = np.random.RandomState(7).randint(0, BASE["vocab_size"], (2, 12))
ATOL = 1e-4


def base_model(tmp_path, family="llama", **overrides):
    hf = make_hf_model(family, overrides, tmp_path / "base")
    return hf, jaxswift.load_model(str(tmp_path / "base"), load_tokenizer=False)


def randomized(params, seed=1, std=0.1):
    """Non-zero B (and perturbed magnitudes) so that the adapter really changes the output (numpy: no compile)."""
    rng = np.random.RandomState(seed)

    def one(w):
        if not is_lora(w):
            return w
        w = w.replace(b=jnp.asarray(std * rng.standard_normal(w.b.shape), jnp.float32))
        if w.magnitude is not None:
            noise = 1 + 0.1 * rng.standard_normal(w.magnitude.shape)
            w = w.replace(magnitude=jnp.asarray(np.asarray(w.magnitude) * noise, jnp.float32))
        return w
    return jax.tree.map(one, params, is_leaf=is_lora)


_forward = jax.jit(forward, static_argnums=2)  # one compile per params structure, shared across tests


def logits(params, cfg, tokens=TOKENS):
    return np.asarray(_forward(params, jnp.asarray(tokens), cfg))


def peft_logits(hf_base, adapter_dir, tokens=TOKENS):
    return hf_logits(PeftModel.from_pretrained(hf_base, str(adapter_dir)).eval(), tokens)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- parity with peft ---------------------------------------------------------------------------------------------

VARIANTS = {
    "llama_lora": ("llama", dict()),
    "qwen2_lora": ("qwen2", dict()),
    "llama_rslora": ("llama", dict(use_rslora=True)),
    "qwen2_rslora": ("qwen2", dict(use_rslora=True)),
    "llama_dora": ("llama", dict(use_dora=True)),
    "qwen2_dora": ("qwen2", dict(use_dora=True)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_adapter_and_merged_export_match_peft(variant, tmp_path):
    family, options = VARIANTS[variant]
    hf, model = base_model(tmp_path, family)
    lora_cfg = LoraConfig(rank=4, alpha=8, dropout=0.1, target_modules="all-linear", **options)
    params = randomized(add_lora(model.params, model.config, lora_cfg, jax.random.key(0)))
    ours = logits(params, model.config)
    assert np.abs(ours - logits(model.params, model.config)).max() > 1e-2  # the adapter matters

    save_peft_adapter(params, model.config, lora_cfg, tmp_path / "adapter", str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"])
    np.testing.assert_allclose(peft_logits(hf, tmp_path / "adapter"), ours, atol=ATOL, rtol=0)

    model.params = params
    merge_and_save(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_logits(merged, TOKENS), ours, atol=ATOL, rtol=0)


def test_adapter_base_is_what_peft_resolves(tmp_path, monkeypatch):
    """adapter_config.json names a base other tools resolve: a local folder given relatively is written absolute, so
    peft.AutoPeftModelForCausalLM loads base + adapter from the adapter folder alone, from any working directory;
    the embedded model is written as its hub id (peft cannot download here: the value peft reads is checked)."""
    from peft import AutoPeftModelForCausalLM, PeftConfig

    hf, model = base_model(tmp_path)
    lora_cfg = LoraConfig(rank=4, alpha=8, target_modules="all-linear")
    params = randomized(add_lora(model.params, model.config, lora_cfg, jax.random.key(0)))
    monkeypatch.chdir(tmp_path)
    save_peft_adapter(params, model.config, lora_cfg, tmp_path / "adapter", "base")  # relative, as a user types it
    assert PeftConfig.from_pretrained(str(tmp_path / "adapter")).base_model_name_or_path == str(tmp_path / "base")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"), attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_logits(loaded, TOKENS), logits(params, model.config), atol=ATOL, rtol=0)

    for spelling in ("smollm2-135m-instruct", "SmolLM2-135M-Instruct"):
        save_peft_adapter(params, model.config, lora_cfg, tmp_path / spelling, spelling)
        assert PeftConfig.from_pretrained(str(tmp_path / spelling)).base_model_name_or_path == \
            "HuggingFaceTB/SmolLM2-135M-Instruct"
    save_peft_adapter(params, model.config, lora_cfg, tmp_path / "hub", "org/not-local")  # neither: as given
    assert PeftConfig.from_pretrained(str(tmp_path / "hub")).base_model_name_or_path == "org/not-local"


def test_save_load_round_trip_is_exact(tmp_path):
    _, model = base_model(tmp_path, "qwen2")
    lora_cfg = LoraConfig(rank=4, alpha=8, dropout=0.05, target_modules=["q_proj", "wv", "down_proj"],
                          use_dora=True, use_rslora=True)
    params = randomized(add_lora(model.params, model.config, lora_cfg, jax.random.key(0)))
    save_peft_adapter(params, model.config, lora_cfg, tmp_path / "adapter")
    loaded, loaded_cfg = load_peft_adapter(model.params, model.config, tmp_path / "adapter")
    assert (loaded_cfg.rank, loaded_cfg.alpha, loaded_cfg.dropout, loaded_cfg.use_dora, loaded_cfg.use_rslora) == \
        (4, 8, 0.05, True, True)
    assert resolve_targets(model.config, loaded_cfg.target_modules) == ["wq", "wv", "w_down"]
    original, again = lora_state(params), lora_state(loaded)
    assert original.keys() == again.keys() == {"layers/wq", "layers/wv", "layers/w_down"}
    for path in original:
        for field in ("a", "b", "magnitude"):
            np.testing.assert_array_equal(np.asarray(again[path][field]), np.asarray(original[path][field]))


def test_peft_created_pissa_adapter_loads_onto_the_original_base(tmp_path):
    """peft saves a PiSSA adapter for the residual base; loading it re-splits the given (original) base."""
    hf, model = base_model(tmp_path, "qwen2")
    peft_model = get_peft_model(hf, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "gate_proj"],
                                                   init_lora_weights="pissa"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "adapter")
    params, lora_cfg = load_peft_adapter(model.params, model.config, tmp_path / "adapter")
    assert lora_cfg.init == "pissa"
    np.testing.assert_allclose(logits(params, model.config), hf_logits(peft_model.eval(), TOKENS), atol=ATOL, rtol=0)


def test_peft_created_adapter_loads(tmp_path):
    hf, model = base_model(tmp_path, "llama")
    peft_model = get_peft_model(hf, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"],
                                                   use_dora=True))
    randomize_lora_b(peft_model, seed=3, std=0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = hf_logits(peft_model.eval(), TOKENS)
    params, lora_cfg = load_peft_adapter(model.params, model.config, tmp_path / "adapter")
    assert lora_cfg.use_dora and sorted(n for n, w in params["layers"].items() if is_lora(w)) == ["w_up", "wo", "wq"]
    np.testing.assert_allclose(logits(params, model.config), expected, atol=ATOL, rtol=0)


# --- init ---------------------------------------------------------------------------------------------------------


def test_default_init_is_kaiming_a_and_zero_b(tmp_path):
    _, model = base_model(tmp_path)
    params = add_lora(model.params, model.config, LoraConfig(rank=4, alpha=8), jax.random.key(0))
    # B = 0: the adapter adds exactly zero; only the contraction order of the base matmul may differ (ulps).
    np.testing.assert_allclose(logits(params, model.config), logits(model.params, model.config), atol=1e-6, rtol=0)
    assert lora_disabled(params)["layers"]["wq"] is model.params["layers"]["wq"]  # shared, not copied
    for name, fan_in in (("wq", 64), ("wo", 64), ("w_down", 80)):
        w = params["layers"][name]
        assert not np.asarray(w.b).any()
        bound = 1 / np.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) on torch's (r, in)
        a = np.asarray(w.a)
        assert a.shape[-1] == 4 and np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    gaussian = add_lora(model.params, model.config, LoraConfig(rank=4, init="gaussian"), jax.random.key(0))
    assert abs(np.asarray(gaussian["layers"]["w_up"].a).std() - 1 / 4) < 0.02


def test_pissa_residual_plus_adapter_is_the_original_and_exports_for_the_original_base(tmp_path):
    hf, model = base_model(tmp_path, "qwen2")
    lora_cfg = LoraConfig(rank=4, alpha=8, init="pissa")
    params = add_lora(model.params, model.config, lora_cfg, jax.random.key(0))
    for name in ("wq", "wo", "w_down"):
        w = params["layers"][name]
        assert not np.allclose(np.asarray(w.base), np.asarray(model.params["layers"][name]), atol=1e-3)
        np.testing.assert_allclose(np.asarray(w.merged()), np.asarray(model.params["layers"][name]), atol=1e-5)
    np.testing.assert_allclose(logits(params, model.config), logits(model.params, model.config), atol=ATOL)

    trained = randomized(params, std=0.05)  # stands in for training
    np.testing.assert_allclose(logits(lora_disabled(trained), model.config), logits(model.params, model.config),
                               atol=ATOL)
    save_peft_adapter(trained, model.config, lora_cfg, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    np.testing.assert_allclose(peft_logits(hf, tmp_path / "adapter"), logits(trained, model.config), atol=ATOL,
                               rtol=0)


# --- training -----------------------------------------------------------------------------------------------------


def lm_loss(params, cfg, tokens=TOKENS):
    out = forward(params, jnp.asarray(tokens), cfg)
    logp = jax.nn.log_softmax(out[:, :-1], axis=-1)
    return -jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], axis=-1).mean()


def test_mask_gradients_and_optax_step_touch_only_adapters(tmp_path):
    _, model = base_model(tmp_path, "qwen2")
    params = randomized(add_lora(model.params, model.config, LoraConfig(rank=4, alpha=8, use_dora=True,
                                                                        target_modules=["q_proj", "down_proj"]),
                                 jax.random.key(0)))
    mask = trainable_mask(params)
    marked = {jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_flatten_with_path(mask)[0] if v}
    assert marked == {f"['layers']['{n}'].{f}" for n in ("wq", "w_down") for f in ("a", "b", "magnitude")}

    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    tx = optax.multi_transform({"train": optax.adam(1e-2), "freeze": optax.set_to_zero()}, labels)

    @jax.jit
    def step(params):
        grads = jax.grad(lm_loss)(params, model.config)
        updates, _ = tx.update(grads, tx.init(params), params)
        return grads, optax.apply_updates(params, updates)

    full_grads, stepped = step(params)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(partition(full_grads)[0]))
    for before, after, trains in zip(jax.tree.leaves(params), jax.tree.leaves(stepped), jax.tree.leaves(mask)):
        assert np.array_equal(np.asarray(before), np.asarray(after)) != trains
    np.testing.assert_array_equal(np.asarray(stepped["embed"]), np.asarray(model.params["embed"]))


def test_dropout_is_real_in_training_and_off_in_inference(tmp_path):
    _, model = base_model(tmp_path)
    cfg = model.config

    def adapted(rate):
        lora_cfg = LoraConfig(rank=4, alpha=8, dropout=rate, target_modules=["q_proj", "v_proj", "down_proj"])
        return randomized(add_lora(model.params, cfg, lora_cfg, jax.random.key(0)))

    params = adapted(0.3)
    plain = logits(params, cfg)
    first, second = (logits(with_dropout(params, jax.random.key(s)), cfg) for s in (1, 2))
    assert np.abs(first - plain).max() > 1e-3 and np.abs(first - second).max() > 1e-3
    np.testing.assert_array_equal(logits(with_dropout(params, jax.random.key(1)), cfg), first)  # keyed, repeatable
    np.testing.assert_allclose(plain, logits(merge_lora(params), cfg), atol=1e-5)  # no keys: inference, no dropout
    no_dropout = adapted(0.0)
    assert with_dropout(no_dropout, jax.random.key(1)) is no_dropout  # rate 0: nothing to draw, same computation


def test_remat_full_gives_the_same_gradients_with_dropout(tmp_path):
    _, model = base_model(tmp_path)
    lora_cfg = LoraConfig(rank=4, alpha=8, dropout=0.2, use_dora=True, target_modules=["o_proj"])
    params = randomized(add_lora(model.params, model.config, lora_cfg, jax.random.key(0)))
    trainable, frozen = partition(params)

    def grads(remat):
        cfg = dataclasses.replace(model.config, remat=remat)
        loss = lambda t, rng: lm_loss(with_dropout(combine(t, frozen), rng), cfg)  # noqa: E731
        return jax.jit(jax.grad(loss))(trainable, jax.random.key(5))

    for g, h in zip(jax.tree.leaves(grads("none")), jax.tree.leaves(grads("full"))):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), atol=1e-6)


def test_lora_state_round_trip_and_sharded_forward(tmp_path):
    from jaxswift.models.spec import logical_axes
    from jaxswift.parallel.mesh import make_mesh
    from jaxswift.parallel.rules import load_rules, param_shardings

    _, model = base_model(tmp_path)
    lora_cfg = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "o_proj", "up_proj"])
    params = randomized(add_lora(model.params, model.config, lora_cfg, jax.random.key(0)))
    fresh = add_lora(model.params, model.config, lora_cfg, jax.random.key(9))
    restored = load_lora_state(fresh, jax.tree.map(np.asarray, lora_state(params)))
    expected = logits(params, model.config)
    np.testing.assert_array_equal(logits(restored, model.config), expected)
    bad = {**lora_state(params), "layers/wq": {"a": np.zeros((2, 64, 3)), "b": np.zeros((2, 3, 4, 16))}}
    with pytest.raises(CheckpointError) as e:
        load_lora_state(fresh, bad, source="ckpt/step_10")
    assert "ckpt/step_10" in one_line(e) and "layers/wq" in one_line(e) and "shape" in one_line(e)

    mesh = make_mesh("4x2", jax.devices()[:8])
    axes = lora_logical_axes(logical_axes(model.config), params)
    sharded = jax.device_put(params, param_shardings(axes, params, load_rules("default"), mesh))
    assert sharded["layers"]["wq"].b.sharding.spec[2] == "tensor"  # the adapter's output heads follow the base
    np.testing.assert_allclose(logits(sharded, model.config), expected, atol=1e-5)


def test_target_module_spellings(tmp_path):
    _, model = base_model(tmp_path)
    cfg = model.config
    assert resolve_targets(cfg, ["q_proj", "wv", "mlp.down_proj"]) == ["wq", "wv", "w_down"]
    assert resolve_targets(cfg, r".*\.(q_proj|v_proj)") == ["wq", "wv"]
    assert resolve_targets(cfg, "all-linear") == ["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"]
    merged = merge_lora(randomized(add_lora(model.params, cfg, LoraConfig(target_modules="wq"), jax.random.key(0))))
    assert not any(is_lora(w) for w in merged["layers"].values())


# --- bad inputs ---------------------------------------------------------------------------------------------------


def test_bad_configs(tmp_path):
    _, model = base_model(tmp_path)
    for targets in (["attn_proj"], "nothing.*", ["lm_head"]):
        with pytest.raises(ConfigError) as e:
            add_lora(model.params, model.config, LoraConfig(target_modules=targets), jax.random.key(0))
        assert "available" in one_line(e) and "q_proj" in one_line(e) and "down_proj" in one_line(e)
    with pytest.raises(ConfigError) as e:
        resolve_targets(model.config, r"model\.layers\.0\.self_attn\.q_proj")
    assert "some layers" in one_line(e)
    for rank in (0, -2):
        with pytest.raises(ConfigError) as e:
            LoraConfig(rank=rank)
        assert "rank" in one_line(e)


def test_bad_adapter_folders(tmp_path):
    _, model = base_model(tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_peft_adapter(model.params, model.config, tmp_path)
    assert "adapter_config.json" in one_line(e) and str(tmp_path) in one_line(e)

    lora_cfg = LoraConfig(rank=4, alpha=8)
    folder = save_peft_adapter(add_lora(model.params, model.config, lora_cfg, jax.random.key(0)), model.config,
                               lora_cfg, tmp_path / "adapter")
    make_hf_model("llama", dict(intermediate_size=48), tmp_path / "other")
    small = jaxswift.load_model(str(tmp_path / "other"), load_tokenizer=False)
    with pytest.raises(CheckpointError) as e:
        load_peft_adapter(small.params, small.config, folder)
    assert "adapter_model.safetensors" in one_line(e) and "shape" in one_line(e)

    weights = folder / "adapter_model.safetensors"
    tensors = {k: np.array(SafetensorsFile(weights).get(k)) for k in SafetensorsFile(weights).keys()}
    write_safetensors(weights, {**tensors, "base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32)})
    with pytest.raises(CheckpointError) as e:
        load_peft_adapter(model.params, model.config, folder)
    assert "unexpected tensor" in one_line(e) and "lm_head" in one_line(e)
    missing = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    write_safetensors(weights, {k: v for k, v in tensors.items() if k != missing})
    with pytest.raises(CheckpointError) as e:
        load_peft_adapter(model.params, model.config, folder)
    assert missing in one_line(e)

    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(CheckpointError) as e:
        load_peft_adapter(model.params, model.config, folder)
    assert "IA3" in one_line(e) and "adapter_config.json" in one_line(e)

    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        load_peft_adapter(model.params, model.config, folder)
    assert "adapter_model.safetensors" in one_line(e)
