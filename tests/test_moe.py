"""Mixture of experts: qwen2_moe / qwen3_moe / mixtral parity with transformers, aux losses, capacity dropping,
expert parallelism equal to local compute (forward, loss and gradients), its all-to-alls, and bad configs."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import jaxswift
from jaxswift.checkpoints.hf import save_hf
from jaxswift.errors import ConfigError
from jaxswift.models import moe
from jaxswift.models.config import config_from_hf
from jaxswift.models.spec import init_params, logical_axes
from jaxswift.models.transformer import forward, hidden_states
from jaxswift.parallel.collectives import compiled_collectives, count_collectives
from jaxswift.parallel.expert import send_slots
from jaxswift.parallel.mesh import make_mesh
from jaxswift.parallel.rules import activation_sharding, load_rules, param_shardings
from jaxswift.train.state import init_train_state
from jaxswift.train.step import make_eval_step, make_train_step

BASE = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_experts_per_tok=2, max_position_embeddings=256, initializer_range=0.2, bos_token_id=0,
            eos_token_id=1)
FAMILIES = {
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      intermediate_size=80, norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=32, intermediate_size=80, norm_topk_prob=True),
    "mixtral": dict(num_local_experts=4, intermediate_size=32),
}


def make_hf_moe(family: str, folder, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **{**BASE, **FAMILIES[family], **overrides})
    config.architectures = [type(AutoModelForCausalLM.from_config(config)).__name__]
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # norms start at 1: randomize so a mis-mapped one cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def tokens(batch=2, length=12, seed=0):
    return np.random.RandomState(seed).randint(0, BASE["vocab_size"], (batch, length))


@pytest.fixture(scope="module")
def qwen2_moe_pair(tmp_path_factory):
    """(transformers model, jaxswift model) of one tiny qwen2_moe."""
    folder = tmp_path_factory.mktemp("qwen2_moe")
    hf = make_hf_moe("qwen2_moe", folder)
    return hf, jaxswift.load_model(str(folder), load_tokenizer=False)


@pytest.fixture(scope="module")
def qwen2_moe(qwen2_moe_pair):
    return qwen2_moe_pair[1]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers_both_ways(family, tmp_path):
    hf = make_hf_moe(family, tmp_path / "hf")
    model = jaxswift.load_model(str(tmp_path / "hf"), load_tokenizer=False)
    assert model.config.family == family and model.config.num_experts == 4
    toks = tokens()
    with torch.no_grad():
        expected = hf(torch.tensor(toks)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(model.params, jnp.asarray(toks), model.config)), expected,
                               atol=1e-4)
    # and back: our config.json and per-expert tensors load in transformers to the same model
    save_hf(model.params, model.config, tmp_path / "ours")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_allclose(again(torch.tensor(toks)).logits.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_balancing_loss_matches_transformers_per_layer(family, tmp_path):
    """Ours averages transformers' load_balancing_loss_func over layers (transformers pools the layers' statistics
    first; for one layer the two are the same loss), padding excluded through the attention mask."""
    hf = make_hf_moe(family, tmp_path)
    model = jaxswift.load_model(str(tmp_path), load_tokenizer=False)
    cfg = model.config.replace(router_aux_loss_coef=1.0, output_router_logits=True)
    toks = tokens()
    mask = np.ones_like(toks)
    mask[1, 8:] = 0  # right padding
    with torch.no_grad():
        out = hf(torch.tensor(toks), attention_mask=torch.tensor(mask), output_router_logits=True)
    per_layer = [load_balancing_loss_func((logits,), 4, 2, torch.tensor(mask)).item() for logits in out.router_logits]
    _, _, aux = hidden_states(model.params, jnp.asarray(toks), cfg, segment_ids=jnp.asarray(mask), return_aux=True)
    np.testing.assert_allclose(float(aux), np.mean(per_layer), rtol=1e-5)


def test_one_layer_aux_loss_equals_the_transformers_models(tmp_path):
    hf = make_hf_moe("qwen3_moe", tmp_path, num_hidden_layers=1, output_router_logits=True, router_aux_loss_coef=0.3)
    model = jaxswift.load_model(str(tmp_path), load_tokenizer=False)
    assert model.config.aux_loss_coef == 0.3
    toks = tokens()
    with torch.no_grad():
        expected = hf(torch.tensor(toks)).aux_loss.item() * 0.3
    _, _, aux = hidden_states(model.params, jnp.asarray(toks), model.config, return_aux=True)
    np.testing.assert_allclose(float(aux), expected, rtol=1e-5)


def _numpy_moe(h, layer, top_k, capacity, mask):
    """float64 transcription: softmax routing, top-k renormalized, per-expert capacity in (row, choice) order,
    padding rows routed nowhere; also the z-loss."""
    h = h.astype(np.float64)
    logits = h @ np.asarray(layer["router"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out, taken = np.zeros_like(h), {}
    for r in range(len(h)):
        choice = np.argsort(-probs[r])[:top_k]
        weights = probs[r, choice] / probs[r, choice].sum()
        for e, w in zip(choice, weights):
            if not mask[r] or taken.get(e, 0) >= capacity:
                continue
            taken[e] = taken.get(e, 0) + 1
            gate, up, down = (np.asarray(layer[k][e], np.float64) for k in ("expert_gate", "expert_up", "expert_down"))
            a = h[r] @ gate
            out[r] += w * ((a / (1 + np.exp(-a)) * (h[r] @ up)) @ down)
    lse = np.log(np.exp(logits).sum(-1))
    return out, sum(taken.values()), float((mask * lse ** 2).sum() / mask.sum())


@pytest.mark.parametrize("capacity_factor", [0.5, None])
def test_capacity_factor_drops_assignments_past_capacity(capacity_factor):
    cfg = config_from_hf({"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 16, "hidden_size": 16,
                          "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
                          "norm_topk_prob": True, "capacity_factor": capacity_factor, "router_z_loss_coef": 1.0})
    layer = jax.tree.map(lambda a: a[0], init_params(cfg, jax.random.key(1))["layers"])
    h = np.random.RandomState(2).randn(3, 8, 16).astype(np.float32)
    segments = np.ones((3, 8), np.int32)
    segments[2, 5:] = 0  # padding takes no slot
    out, aux = jax.jit(moe.moe_block, static_argnums=2)(jnp.asarray(h), layer, cfg, jnp.asarray(segments))
    capacity = math.ceil(capacity_factor * 24 * 2 / 4) if capacity_factor else 10 ** 9
    expected, kept, z_loss = _numpy_moe(h.reshape(24, 16), layer, 2, capacity, segments.reshape(-1))
    np.testing.assert_allclose(np.asarray(out).reshape(24, 16), expected, atol=1e-5)
    if capacity_factor == 0.5:
        assert kept < 21 * 2  # some of the 21 real rows' assignments were dropped
    if capacity_factor is None:
        assert kept == 21 * 2
    np.testing.assert_allclose(float(aux), z_loss, rtol=1e-5)  # z-loss only (no balancing without the flag)


def _on_mesh(spec: str, fn, *args):
    mesh, rules = make_mesh(spec), load_rules("moe")
    jitted = jax.jit(lambda *a: _traced(rules, mesh, fn, *a))
    return jitted, mesh, rules


def _traced(rules, mesh, fn, *args):
    with activation_sharding(rules, mesh):
        return fn(*args)


@pytest.mark.parametrize("mesh, capacity_factor", [("expert=4", None), ("data=2,expert=2", 0.75),
                                                   ("expert=2,fsdp=2,tensor=2", None), ("data=2,fsdp=2", 0.75),
                                                   ("stage=2,expert=2", None)])
def test_expert_parallel_forward_equals_local(qwen2_moe, mesh, capacity_factor):
    cfg = qwen2_moe.config.replace(capacity_factor=capacity_factor)
    toks = jnp.asarray(tokens(batch=2, length=7))  # 14 rows: not divisible by 4 shards, so rows are padded
    local = forward(qwen2_moe.params, toks, cfg)
    jitted, mesh_, rules = _on_mesh(mesh, lambda p, t: forward(p, t, cfg))
    params = jax.device_put(qwen2_moe.params, param_shardings(logical_axes(cfg), qwen2_moe.params, rules, mesh_))
    np.testing.assert_allclose(np.asarray(jitted(params, toks)), np.asarray(local), atol=1e-5)


def _train_batch(cfg, seed=0):
    rng = np.random.RandomState(seed)
    toks = rng.randint(0, cfg.vocab_size, (2, 4, 9))  # 2 accumulation microbatches of 4 rows
    segments = np.ones((2, 4, 8), np.int32)
    segments[1, 3, 5:] = 0
    return {"tokens": toks[..., :-1], "targets": toks[..., 1:], "loss_weights": segments.astype(np.float32),
            "segment_ids": segments, "positions": np.broadcast_to(np.arange(8), (2, 4, 8)).astype(np.int32)}


AUX_ON = dict(router_aux_loss_coef=0.1, output_router_logits=True, router_z_loss_coef=0.01)


@pytest.fixture(scope="module")
def local_step(qwen2_moe):
    """(cfg with aux and z-loss on, step, initial state, batch, state and metrics after one step on one device)."""
    cfg = qwen2_moe.config.replace(**AUX_ON)
    step = make_train_step(cfg, optax.sgd(1.0), loss_chunk=64)
    state = init_train_state(qwen2_moe.params, jax.tree.map(lambda _: True, qwen2_moe.params), optax.sgd(1.0), 0)
    batch = jax.tree.map(jnp.asarray, _train_batch(cfg))
    return cfg, step, state, batch, *jax.jit(step)(state, batch)


def test_train_step_under_expert_mesh_equals_single_device(local_step):
    """Loss and gradients (SGD with lr 1: new params = params - grads) with aux and z-loss on, expert=4 vs one
    device, two accumulation microbatches."""
    cfg, step, state, batch, local_state, local_metrics = local_step
    jitted, mesh, rules = _on_mesh("expert=4", step)
    compiled = jitted.lower(state, batch).compile()
    mesh_state, mesh_metrics = compiled(state, batch)
    # per microbatch and layer: 3 all-to-alls forward (rows, ids, results), 2 backward (rows', results' cotangents)
    P, D, A, L = 4, cfg.hidden_size, 2, cfg.num_layers
    S = send_slots(4 * 8 // P, cfg.num_experts_per_tok, cfg.num_experts // P, None)
    all_to_all = count_collectives(compiled.as_text())["all-to-all"]
    assert (all_to_all.count, all_to_all.bytes) == (5 * A * L, A * L * (4 * P * S * D * 4 + P * S * 4))
    np.testing.assert_allclose(float(mesh_metrics["loss"]), float(local_metrics["loss"]), rtol=1e-5)
    grads = jax.tree.map(lambda new, old: old - new, local_state.trainable, state.trainable)
    mesh_grads = jax.tree.map(lambda new, old: old - new, mesh_state.trainable, state.trainable)
    for (path, g), got in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(mesh_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(g), atol=1e-5, err_msg=jax.tree_util.keystr(path))
    assert float(jnp.abs(grads["layers"]["router"]).max()) > 0


def test_aux_loss_joins_the_training_loss(local_step):
    """The step's loss is the NLL (the eval step's, which has no aux) plus the loss-token-weighted mean of its
    microbatches' aux losses."""
    cfg, _, state, batch, _, metrics = local_step
    nll, weight = jax.jit(make_eval_step(cfg, loss_chunk=64))(state.trainable, batch)
    aux_of = jax.jit(lambda p, m: hidden_states(p, m["tokens"], cfg, positions=m["positions"],
                                                segment_ids=m["segment_ids"], return_aux=True)[2])
    weights, auxes = [], []
    for a in range(2):
        micro = jax.tree.map(lambda x: x[a], batch)
        weights.append(float(micro["loss_weights"].sum()))
        auxes.append(float(aux_of(state.trainable, micro)))
    assert min(auxes) > 0
    np.testing.assert_allclose(float(metrics["loss"]) - float(nll / weight), np.average(auxes, weights=weights),
                               rtol=1e-4)


def test_all_to_all_count_and_bytes_match_formula(qwen2_moe):
    """Forward on expert=4: per MoE layer three all-to-alls (rows, local expert ids, results), each P x S slots."""
    cfg = qwen2_moe.config
    B, T, P = 4, 12, 4
    jitted, mesh, rules = _on_mesh(f"expert={P}", lambda p, t: forward(p, t, cfg))
    params = jax.device_put(qwen2_moe.params, param_shardings(logical_axes(cfg), qwen2_moe.params, rules, mesh))
    stats = compiled_collectives(jitted, params, jnp.asarray(tokens(B, T)))
    S = send_slots(B * T // P, cfg.num_experts_per_tok, cfg.num_experts // P, None)
    D, L = cfg.hidden_size, cfg.num_layers
    assert stats["all-to-all"].count == 3 * L
    assert stats["all-to-all"].bytes == L * (2 * P * S * D * 4 + P * S * 4)


def test_lora_all_linear_adapts_attention_and_leaves_experts(qwen2_moe):
    from jaxswift.tuners import lora

    params = lora.add_lora(qwen2_moe.params, qwen2_moe.config, lora.LoraConfig(rank=4), jax.random.key(0))
    adapted = sorted(k for k, v in params["layers"].items() if lora.is_lora(v))
    assert adapted == ["wk", "wo", "wq", "wv"]
    run = jax.jit(lambda p: forward(p, jnp.asarray(tokens()), qwen2_moe.config))
    np.testing.assert_allclose(np.asarray(run(params)), np.asarray(run(qwen2_moe.params)), atol=1e-5)  # B = 0


def test_experts_not_divisible_by_the_expert_axis(qwen2_moe):
    jitted, mesh, _ = _on_mesh("expert=8", lambda p, t: forward(p, t, qwen2_moe.config))
    with pytest.raises(ConfigError, match=r"num_experts \(4\) must be divisible by the expert axis size \(8\)"):
        jitted(qwen2_moe.params, jnp.asarray(tokens()))


MOE_JSON = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 16, "hidden_size": 16, "intermediate_size": 8,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 8}


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["DeepseekV3ForCausalLM"]}, "unknown architecture"),
    ({"mlp_only_layers": [1]}, "mix dense and MoE blocks"),
    ({"decoder_sparse_step": 2}, "mix dense and MoE blocks"),
    ({"num_experts": None}, "missing required field 'num_experts'"),
    ({"num_experts_per_tok": 5}, r"num_experts_per_tok must be in 1..num_experts \(4\)"),
    ({"moe_intermediate_size": None}, "missing required field 'moe_intermediate_size'"),
    ({"capacity_factor": 0}, "capacity_factor must be > 0"),
    ({"architectures": ["MixtralForCausalLM"], "router_jitter_noise": 0.1}, "router_jitter_noise"),
    ({"architectures": ["Qwen2MoeForCausalLM"]}, "shared_expert_intermediate_size"),
])
def test_bad_moe_configs_get_clear_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        config_from_hf({**MOE_JSON, **change}, where="moe/config.json")


def test_greedy_decoding_equals_transformers_cached_and_paged(qwen2_moe_pair):
    """The KV-cache decoder (generate_ids) and the serving engine's paged decoder both run the MoE blocks; each
    greedy token is transformers' argmax given the prompt and the tokens before (teacher forcing, one forward)."""
    from jaxswift.infer.engine import JaxEngine
    from jaxswift.infer.engine_api import RequestSampling

    hf, model = qwen2_moe_pair
    ids = tokens(1, 6, seed=3)[0].tolist()
    expected = jaxswift.generate_ids(model, [ids], max_new_tokens=8, ignore_eos=True)[0]
    with torch.no_grad():
        logits = hf(torch.tensor([ids + expected])).logits[0, 5:-1].numpy()
    assert logits.argmax(-1).tolist() == expected
    engine = JaxEngine(model, max_concurrent_decodes=2, max_model_len=32, page_size=8, prefill_buckets=(8,))
    padded, n = engine.pad_prompt(ids)
    prefix, first = engine.prefill(engine.params, padded, n, RequestSampling(max_tokens=8, ignore_eos=True))
    state = engine.insert(prefix, engine.init_decode_state(), 0)
    got = [int(first.tokens[0])]
    for _ in range(7):
        state, result = engine.generate(engine.params, state)
        got.append(int(result.tokens[0]))
    assert got == expected


def test_planner_counts_expert_flops_alike_on_one_device_and_a_mesh(tmp_path):
    """Expert matmuls (ragged_dot) count, and a shard_map body counts once per shard: the same global batch has the
    same FLOPs on one device, on data=2 (per-shard experts) and on expert=2 (all-to-all)."""
    from jaxswift.train.plan import PlanArguments, build_step

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**MOE_JSON, "vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4}))
    flops = {}
    # the same global batch of 4 rows: moe.yaml splits rows over expert too (rows per step = per device x 2)
    for mesh, rows, rules in (("1", 4, "default"), ("data=2", 2, "default"), ("expert=2", 2, "moe")):
        args = PlanArguments(model=str(path), mesh=mesh, tuner_type="full", dtype="float32", max_length=16,
                             per_device_train_batch_size=rows, sharding_rules=rules, loss_chunk_size=16)
        flops[mesh] = build_step(args).matmul_flops()
    assert flops["1"] == flops["data=2"]
    # expert=2 runs its grouped matmuls over the whole receive buffer (2 devices x P x S rows) instead of the
    # 4 * 16 * 2 assignments; each row costs 3 matmuls of 2*D*F, 4 times (forward, remat forward, 2 in backward)
    D, F, L = 32, 8, 2
    buffer_rows = 2 * 2 * send_slots(4 * 16 // 2, 2, 2, None)
    assert flops["expert=2"] - flops["1"] == (buffer_rows - 4 * 16 * 2) * 3 * 4 * 2 * D * F * L


def test_galore_projects_each_experts_matrix(qwen2_moe):
    """GaLore reads expert weights [L, E, D, F] as L x E matrices, the router as one per layer, and leaves the
    shared-expert gate (a vector per layer) to AdamW; one update runs over the whole MoE params tree."""
    from jaxswift.optim.galore import Matrix, galore_adamw, galore_mask_for

    mask = galore_mask_for(qwen2_moe.config)["layers"]
    assert (mask["expert_down"], mask["router"], mask["shared_up"]) == (Matrix(2, 1), Matrix(1, 1), Matrix(1, 1))
    assert mask["shared_expert_gate"] is False
    tx = galore_adamw(1e-3, rank=4, update_proj_gap=1, galore_mask=galore_mask_for(qwen2_moe.config))
    grads = jax.tree.map(jnp.ones_like, qwen2_moe.params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(qwen2_moe.params), qwen2_moe.params)
    assert updates["layers"]["expert_gate"].shape == qwen2_moe.params["layers"]["expert_gate"].shape
    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))


def test_moe_flags_override_the_config_and_are_refused_on_a_dense_model(qwen2_moe):
    from jaxswift.errors import ConfigError
    from jaxswift.train.args import SftArguments
    from jaxswift.train.tuning import moe_overrides

    args = SftArguments(router_aux_loss_coef=0.02, router_z_loss_coef=1e-3, moe_expert_capacity_factor=1.25)
    cfg = moe_overrides(qwen2_moe.config, args)
    assert (cfg.aux_loss_coef, cfg.router_z_loss_coef, cfg.capacity_factor) == (0.02, 1e-3, 1.25)
    assert moe_overrides(qwen2_moe.config, SftArguments()) == qwen2_moe.config
    dense = qwen2_moe.config.replace(num_experts=0)
    with pytest.raises(ConfigError, match="--router_aux_loss_coef, --router_z_loss_coef, "
                                          "--moe_expert_capacity_factor: the model .* has no experts"):
        moe_overrides(dense, args)
