"""Ulysses attention over the mesh axis `sequence` (`--sequence_parallel ulysses`; 8 virtual CPU devices, tiny
float32 llama): attention and its gradients equal to the model's own and to a float64 numpy transcription on packed
rows with sliding windows, all-to-alls as the only collectives (their count and bytes as the formula says), the SFT
loss and gradients equal to one device, the flag's plumbing, and clear errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxswift.errors import ConfigError
from jaxswift.models import transformer
from jaxswift.models.spec import init_params
from jaxswift.parallel import ulysses
from jaxswift.parallel.collectives import count_collectives
from jaxswift.parallel.mesh import make_mesh
from jaxswift.parallel.ring_attention import balanced_step
from jaxswift.parallel.rules import load_rules
from jaxswift.parallel.strategies import ParallelOptions, parallel_overrides
from test_ring_attention import (B, CFG, H, K, N, T, mean_nll, numpy_attention, packed_rows, sft_batch,
                                 sharded_step_equals_single_device)

ULYSSES = ParallelOptions(sequence_parallel="ulysses")


def attention_and_grads(attention, positions, segments, probe):
    @jax.jit
    def run(q, k, v, window):
        out, vjp = jax.vjp(lambda *qkv: attention(*qkv, positions, segments, window), q, k, v)
        return out, vjp(probe)
    return run


@pytest.mark.parametrize("mesh_spec", ["sequence=2", "sequence=4", "data=2,sequence=2,tensor=2"])
def test_ulysses_equals_model_attention_and_numpy_and_sends_only_all_to_alls(mesh_spec):
    """Packed rows (several segments, padding), windows 0 and 5, GQA (2 query heads per kv head). sequence=4 and
    tensor=2 x sequence=2 repeat the kv heads (2 and 1 per shard do not split 4 and 2 ways). Forward and backward
    run 8 all-to-alls, q, k, v, out and back, each one [B/data, T/n, heads/tensor, H] float32 buffer per device;
    nothing else talks across devices."""
    mesh = make_mesh(mesh_spec)
    n, tp, dp = mesh.shape["sequence"], mesh.shape["tensor"], mesh.shape["data"]
    rng = np.random.default_rng(n)
    q, k, v = (rng.normal(size=(B, T, heads, H)).astype(np.float32) for heads in (N, K, K))
    positions, segments = packed_rows()
    probe = rng.normal(size=(B, T, N, H)).astype(np.float32)
    attention = ulysses.make_self_attention(mesh, load_rules("sequence"), ULYSSES)
    run = attention_and_grads(attention, positions, segments, probe)
    want_run = attention_and_grads(transformer.self_attention, positions, segments, probe)
    split = NamedSharding(mesh, PartitionSpec("data", "sequence", "tensor"))  # as the model's activations are
    q_split, k_split, v_split = (jax.device_put(x, split) for x in (q, k, v))
    for window in (0, 5):
        got, got_grads = run(q_split, k_split, v_split, window)
        want, want_grads = want_run(q, k, v, window)
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"window {window}")
        np.testing.assert_allclose(got, numpy_attention(q, k, v, positions, segments, window), atol=1e-5)
        for name, g, w in zip("qkv", got_grads, want_grads):
            np.testing.assert_allclose(g, w, atol=1e-5, err_msg=f"d{name}, window {window}")

    collectives = count_collectives(run.lower(q_split, k_split, v_split, 0).compile().as_text())
    assert set(collectives) == {"all-to-all"}
    kv_heads = (K // tp) * ulysses.kv_repeats(N // tp, K // tp, n)
    block = B // dp * (T // n) * H * 4
    assert collectives["all-to-all"].count == 8
    assert collectives["all-to-all"].bytes == 2 * (2 * N // tp + 2 * kv_heads) * block


@pytest.fixture(scope="module")
def single_device():
    params = init_params(CFG, jax.random.key(0))
    loss, grads = jax.jit(jax.value_and_grad(mean_nll(CFG)))(params, sft_batch())
    return params, loss, grads


@pytest.mark.parametrize("mesh_spec", ["data=2,sequence=2,tensor=2", "data=2,stage=2,sequence=2"])
def test_sft_loss_and_gradients_equal_single_device(single_device, mesh_spec):
    """The SFT loss and its gradients on packed rows with Ulysses attention (remat) equal one device's, with
    tensor (kv heads repeated: one per tensor shard, two devices) and inside pipeline stages; the compiled step's
    attention sends per layer run 4 all-to-alls forward, 4 again in the recomputed forward and 4 backward, and there
    is no collective-permute but the pipeline's. A pipeline of S stages runs its L / S layers for M + S - 1
    microbatch slots (M = S by default; the bubble's slots compute on filler)."""
    mesh = make_mesh(mesh_spec)
    compiled = sharded_step_equals_single_device(single_device, mesh, CFG.replace(remat="full"), ULYSSES)
    collectives = count_collectives(compiled.as_text())
    stages = mesh.shape["stage"]
    assert "collective-permute" not in collectives or stages > 1
    layers_run = CFG.num_layers // stages * (2 * stages - 1)
    assert collectives["all-to-all"].count == layers_run * 12


def test_the_flag_picks_ulysses_and_keeps_the_tokens_in_order():
    from jaxswift.train.args import SftArguments

    mesh, rules = make_mesh("sequence=2"), load_rules("sequence")
    options = ParallelOptions.from_args(SftArguments(mesh="sequence=2", sequence_parallel="ulysses"))
    assert options.sequence_parallel == "ulysses"
    assert parallel_overrides(mesh, rules, options)["self_attention"].__module__ == ulysses.__name__
    assert parallel_overrides(mesh, rules, ParallelOptions())["self_attention"].__module__.endswith("ring_attention")
    step = lambda first, batch: batch  # noqa: E731
    assert balanced_step(step, mesh, options) is step  # every device attends over the whole row: no reordering
    assert balanced_step(step, mesh, ParallelOptions()) is not step


def test_kv_repeats():
    assert ulysses.kv_repeats(4, 2, 2) == 1
    assert ulysses.kv_repeats(4, 2, 4) == 2  # kv heads 0, 0, 1, 1: device d gets query head d and its kv head
    assert ulysses.kv_repeats(12, 4, 6) == 3  # lcm(4, 6) = 12 kv heads, 2 per device with 2 query heads
    assert ulysses.kv_repeats(8, 1, 8) == 8  # multi-query attention
    with pytest.raises(ConfigError, match=re.escape("--sequence_parallel ulysses with mesh axis sequence=4: the 6 "
                                                    "query heads do not divide by 4")):
        ulysses.kv_repeats(6, 2, 4)


def test_heads_that_do_not_split_are_refused_by_the_trainer_and_the_attention(monkeypatch, tmp_path):
    """sequence=8 with 4 query heads: refused when the run starts (before any compile), naming the flag and the
    way out; the override itself refuses the same when traced. Heads are counted per tensor shard."""
    from jaxswift.train import loop
    from jaxswift.train.args import SftArguments

    monkeypatch.setattr(loop, "load_model", lambda *a, **k: type("Model", (), {"config": CFG})())
    message = "--sequence_parallel ulysses with mesh axis sequence=8: the 4 query heads do not divide by 8"
    with pytest.raises(ConfigError, match=re.escape(message) + ".*--sequence_parallel ring"):
        loop.start_run(SftArguments(mesh="sequence=8", sequence_parallel="ulysses", output_dir=str(tmp_path / "a")))
    with pytest.raises(ConfigError, match="the 2 query heads per tensor shard do not divide by 4"):
        loop.start_run(SftArguments(mesh="sequence=4,tensor=2", sequence_parallel="ulysses",
                                    output_dir=str(tmp_path / "b")))
    assert loop.start_run(SftArguments(mesh="sequence=8", output_dir=str(tmp_path / "c"))).mesh.shape["sequence"] == 8

    attention = ulysses.make_self_attention(make_mesh("sequence=8"), load_rules("sequence"), ULYSSES)
    q, kv, side = jnp.zeros((1, 32, N, H)), jnp.zeros((1, 32, K, H)), jnp.zeros((1, 32), jnp.int32)
    with pytest.raises(ConfigError, match=re.escape(message)):
        jax.jit(attention)(q, kv, kv, side, side, 0)


def test_sequence_length_that_does_not_split_is_a_clear_error():
    attention = ulysses.make_self_attention(make_mesh("sequence=4"), load_rules("sequence"), ULYSSES)
    q, kv, side = jnp.zeros((1, 30, N, H)), jnp.zeros((1, 30, K, H)), jnp.zeros((1, 30), jnp.int32)
    with pytest.raises(ConfigError, match=re.escape("--sequence_parallel ulysses: sequence length 30 is not "
                                                    "divisible by mesh axis sequence=4")):
        jax.jit(attention)(q, kv, kv, side, side, 0)


@pytest.mark.parametrize("flags, message", [
    ({"sequence_parallel": "spiral", "mesh": "sequence=2"}, "--sequence_parallel 'spiral': expected one of ring | "
                                                            "ulysses"),
    ({"sequence_parallel": "ulysses"}, "--sequence_parallel ulysses needs a --mesh with a sequence axis > 1"),
    ({"sequence_parallel": "ulysses", "mesh": "data=2"}, "--sequence_parallel ulysses needs a --mesh with a sequence"),
    ({"sequence_parallel": "ulysses", "mesh": "sequence=2", "ring_attention_layout": "striped"},
     "--ring_attention_layout striped balances ring attention; --sequence_parallel ulysses"),
])
def test_bad_flags(flags, message):
    from jaxswift.train.args import SftArguments

    with pytest.raises(ConfigError, match=re.escape(message)):
        SftArguments(**flags)
    with pytest.raises(ConfigError, match=re.escape("--sequence_parallel 'spiral'")):
        parallel_overrides(make_mesh("sequence=2"), load_rules("sequence"), ParallelOptions(sequence_parallel="spiral"))


# --- the planner ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("plan") / "config.json"
    path.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 96, "hidden_size": 64,
                                "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "tie_word_embeddings": False}))
    return str(path)


def test_plan_formula_matches_the_compiled_steps_all_to_alls(tiny_config):
    """`jaxswift plan --sequence_parallel ulysses`: the traffic formula (docs/parallelism.md) gives the count and the
    bytes of the all-to-alls XLA compiled into the planned SFT step (float32, where XLA:CPU keeps the buffers'
    dtype; sequence=4 sends each of the 2 kv heads twice), there is no collective-permute, and the plan prints both."""
    from jaxswift.train.plan import PlanArguments, format_plan, plan_train_step

    plan = plan_train_step(PlanArguments(model=tiny_config, mesh="sequence=4", tuner_type="full", dtype="float32",
                                         max_length=32, sequence_parallel="ulysses"))
    assert plan.sequence.strategy == "ulysses" and plan.sequence.kv_repeats == 2
    assert plan.collectives["all-to-all"].count == plan.sequence.collectives == 2 * 12  # 2 layers, remat
    assert plan.collectives["all-to-all"].bytes == plan.sequence.buffer_bytes
    assert plan.sequence.sent_bytes == plan.sequence.buffer_bytes * 3 // 4
    assert "collective-permute" not in plan.collectives
    text = format_plan(plan)
    assert "sequence parallelism: ulysses over sequence=4, kv heads sent 2x: 24 all-to-alls" in text
    assert "all-to-all 24" in text


@pytest.mark.parametrize("mesh_spec, remat", [("sequence=4", True), ("data=2,sequence=2,tensor=2", False)])
def test_plan_ring_formula_is_the_one_the_ring_test_checks_in_hlo(tiny_config, mesh_spec, remat):
    """The planner's ring figures (no compile here) equal the count and bytes tests/test_ring_attention.py checks
    against the compiled step: per layer 2 (n-1) + 2 (n-1) + 2 n permutes of one [B, T/n, K/tensor, H] block
    (float32: the k, v hops in the compute dtype, the dk, dv hops always float32), with and without remat."""
    from jaxswift.parallel.rules import rules_for_mesh
    from jaxswift.train.plan import PlanArguments, load_plan_config, sequence_traffic

    cfg = load_plan_config(tiny_config, "float32")[0]
    mesh = make_mesh(mesh_spec)
    args = PlanArguments(model=tiny_config, mesh=mesh_spec, max_length=32, per_device_train_batch_size=2,
                         gradient_checkpointing=remat)
    traffic = sequence_traffic(cfg, args, mesh, rules_for_mesh("default", mesh))
    n, tp = mesh.shape["sequence"], mesh.shape["tensor"]
    per_layer = 2 * (n - 1) + 2 * (n - 1) + 2 * n
    block = 2 * (32 // n) * (cfg.num_kv_heads // tp) * cfg.head_dim * 4
    assert (traffic.strategy, traffic.collectives) == ("ring", cfg.num_layers * per_layer)
    assert traffic.buffer_bytes == traffic.sent_bytes == cfg.num_layers * per_layer * block


def test_plan_bad_inputs(tiny_config):
    from jaxswift.train.plan import PlanArguments, build_step

    with pytest.raises(ConfigError, match=re.escape("--sequence_parallel ulysses needs a --mesh with a sequence")):
        PlanArguments(model=tiny_config, mesh="data=2", sequence_parallel="ulysses")
    with pytest.raises(ConfigError, match=re.escape("--sequence_parallel 'spiral'")):
        PlanArguments(model=tiny_config, mesh="sequence=2", sequence_parallel="spiral")
    with pytest.raises(ConfigError, match=re.escape("--sequence_parallel is not used by --serve true")):
        PlanArguments(model=tiny_config, mesh="tensor=2", serve=True, sequence_parallel="ulysses")
    with pytest.raises(ConfigError, match=re.escape("mesh axis sequence=8: the 4 query heads do not divide by 8")):
        build_step(PlanArguments(model=tiny_config, mesh="sequence=8", sequence_parallel="ulysses", max_length=32))
