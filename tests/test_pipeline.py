"""Pipeline parallelism over `stage` (GPipe and circular) equals the single-device computation; its collectives
match the schedule's formula; bad layouts get clear errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxswift.errors import ConfigError
from jaxswift.models.config import ModelConfig
from jaxswift.models.spec import init_params
from jaxswift.models.transformer import hidden_states
from jaxswift.parallel.collectives import count_collectives
from jaxswift.parallel.mesh import make_mesh
from jaxswift.parallel.pipeline import make_run_layers, plan_pipeline, relayout_rounds
from jaxswift.parallel.rules import activation_sharding, batch_sharding, load_rules
from jaxswift.parallel.strategies import ParallelOptions
from jaxswift.train.step import nll_sums
from jaxswift.parallel.params import tree_shardings
from jaxswift.tuners import lora

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=8, num_heads=4,
                  num_kv_heads=2, head_dim=8)
B, T = 8, 16


def packed_batch(seed: int = 0) -> dict:
    """8 rows of 16 tokens: two packed segments per row (positions restart), some padding, a loss mask."""
    rng = np.random.default_rng(seed)
    segments = np.where(np.arange(T) < 9, 1, 2)[None].repeat(B, 0)
    segments[:, -2:] = 0
    positions = np.where(segments == 2, np.arange(T) - 9, np.arange(T)) * (segments > 0)
    return {"tokens": jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32),
            "targets": jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32),
            "loss_weights": jnp.asarray((rng.random((B, T)) < 0.8) * (segments > 0), jnp.float32),
            "segment_ids": jnp.asarray(segments, jnp.int32), "positions": jnp.asarray(positions, jnp.int32)}


def mean_nll(params, batch, cfg):
    nll, weight = nll_sums(params, batch, cfg, 512)
    return nll / weight


def compile_loss_and_grad(loss, params, batch, mesh_spec=None, rules_name="pipeline", options=None):
    """(compiled fn, sharded params, sharded batch): value_and_grad of `loss`, on `mesh_spec` under the pipeline
    override (single device when None)."""
    if mesh_spec is None:
        fn = jax.jit(jax.value_and_grad(loss))
        return fn.lower(params, batch).compile(), params, batch
    mesh, rules = make_mesh(mesh_spec), load_rules(rules_name)

    def traced(p, b):
        with activation_sharding(rules, mesh, options or ParallelOptions()):
            return jax.value_and_grad(loss)(p, b)

    params = jax.device_put(params, tree_shardings(params, CFG, rules, mesh))
    batch = jax.device_put(batch, batch_sharding(rules, mesh))
    return jax.jit(traced).lower(params, batch).compile(), params, batch


def assert_same(got, want):
    (loss, grads), (ref_loss, ref_grads) = got, want
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    flat, ref_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref_flat)
    for (path, g), r in zip(flat, ref_flat):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def permute_formula(mesh_spec: str, options: ParallelOptions) -> tuple[int, float]:
    """(count, bytes) of collective-permutes per train step: one per schedule iteration each way (forward, and
    its transpose in the backward), each moving one microbatch's [B / M / (data x fsdp), T, D] float32 slice."""
    mesh = make_mesh(mesh_spec)
    S, V = mesh.shape["stage"], options.virtual_stages
    M = options.num_microbatches or S
    iterations = V * (max(M, S) if V > 1 else M) + S - 1
    rows = B // M // (mesh.shape["data"] * mesh.shape["fsdp"])
    return 2 * iterations, 2 * iterations * rows * T * CFG.hidden_size * 4


@pytest.fixture(scope="module")
def dense():
    params, batch = init_params(CFG, jax.random.key(0)), packed_batch()
    compiled, _, _ = compile_loss_and_grad(lambda p, b: mean_nll(p, b, CFG), params, batch)
    return params, batch, compiled(params, batch)


CASES = {  # mesh, options, rule table, remat
    "stage4_gpipe_8_microbatches": ("stage=4", ParallelOptions(num_microbatches=8), "pipeline", "full"),
    "stage2_circular_4_microbatches": ("stage=2", ParallelOptions(num_microbatches=4, virtual_stages=2),
                                       "pipeline", "none"),
    "stage4_circular_2_microbatches_default_rules": (
        "stage=4", ParallelOptions(num_microbatches=2, virtual_stages=2, pipeline_schedule="circular"), "default",
        "none"),
    "data2_stage2_tensor2": ("data=2,stage=2,tensor=2", ParallelOptions(), "pipeline", "dots"),
}


def layer_weight_bytes(params) -> int:
    return sum(a.nbytes for a in jax.tree.leaves(params["layers"]))


def expected_collectives(mesh_spec: str, options: ParallelOptions, params) -> dict:
    """Per train step on a stage-only mesh with the pipeline rules: the schedule's permutes; the stage outputs
    summed onto every stage (forward) and the input's cotangent summed back (backward), [B, T, D] float32 each.
    Circular: each weight leaf also moves from its stored block to its round-robin stage in V permutes (a stage's
    share of the layer bytes), and its gradient back the same way. GPipe moves no weight."""
    S, V = make_mesh(mesh_spec).shape["stage"], options.virtual_stages
    count, nbytes = permute_formula(mesh_spec, options)
    if V > 1:
        leaves = len(jax.tree.leaves(params["layers"]))
        count, nbytes = count + 2 * V * leaves, nbytes + 2 * layer_weight_bytes(params) / S
    return {"collective-permute": (count, nbytes), "all-reduce": (2, 2 * B * T * CFG.hidden_size * 4)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pipeline_loss_gradients_and_collectives_equal_single_device(dense, case):
    mesh_spec, options, rules_name, remat = CASES[case]
    params, batch, want = dense
    cfg = CFG.replace(remat=remat)
    compiled, sharded_params, sharded_batch = compile_loss_and_grad(
        lambda p, b: mean_nll(p, b, cfg), params, batch, mesh_spec, rules_name, options)
    assert_same(compiled(sharded_params, sharded_batch), want)
    collectives = count_collectives(compiled.as_text())
    if "," not in mesh_spec:  # default.yaml, like pipeline.yaml, keeps each stage's layers on that stage
        assert {k: (v.count, v.bytes) for k, v in collectives.items()} == expected_collectives(
            mesh_spec, options, params)
    else:  # other axes too: the schedule's permutes alone
        permutes = collectives["collective-permute"]
        assert (permutes.count, permutes.bytes) == permute_formula(mesh_spec, options)


def with_random_adapters(params, key):
    """LoRA (rank 4) on o_proj (two contracted axes) and up_proj, B random so that every adapter gets a gradient."""
    params = lora.add_lora(params, CFG, lora.LoraConfig(rank=4, dropout=0.0, target_modules=("wo", "w_up")), key)
    return jax.tree.map(lambda w: w.replace(b=0.1 * jax.random.normal(key, w.b.shape)) if lora.is_lora(w) else w,
                        params, is_leaf=lora.is_lora)


def test_lora_with_remat_equals_single_device():
    """The adapters' gradients with the base frozen (LoraWeight pytrees cut into stages), remat on, GPipe with 4
    microbatches on data=2,stage=2,tensor=2."""
    params = with_random_adapters(init_params(CFG, jax.random.key(1)), jax.random.key(2))
    trainable, frozen = lora.partition(params)
    batch = packed_batch(1)
    cfg = CFG.replace(remat="full")

    def loss(t, b):
        return mean_nll(lora.combine(t, frozen), b, cfg)

    compiled, _, _ = compile_loss_and_grad(loss, trainable, batch)
    want = compiled(trainable, batch)
    compiled, sharded, sharded_batch = compile_loss_and_grad(loss, trainable, batch, "data=2,stage=2,tensor=2",
                                                             options=ParallelOptions(num_microbatches=4))
    assert_same(compiled(sharded, sharded_batch), want)


def test_each_microbatch_draws_its_own_dropout_keys():
    """Per-layer PRNG keys among the layer inputs (LoRA dropout) are folded with the microbatch index: the rows of
    different microbatches get different masks, the same as a plain scan over each microbatch with its folded key."""
    from jaxswift.models.transformer import scan_layers

    def layer_fn(x, side, xs):
        key, _ = xs
        return x + jax.random.bernoulli(key, 0.5, x.shape), jnp.zeros((), jnp.float32)

    keys = jax.random.split(jax.random.key(5), 4)
    windows = jnp.zeros((4,), jnp.int32)
    side = (packed_batch()["positions"], packed_batch()["segment_ids"])
    x = jnp.zeros((B, T, 4))
    run = make_run_layers(make_mesh("stage=2"), load_rules("pipeline"),  # circular: the keys change stage too
                          ParallelOptions(num_microbatches=2, virtual_stages=2))
    got, _ = jax.jit(lambda x: run(layer_fn, x, side, (keys, windows)))(x)
    for m in range(2):  # microbatch m holds rows m, m + 2, m + 4, ...
        folded = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, m)
        want, _ = scan_layers(layer_fn, x[m::2], (side[0][m::2], side[1][m::2]), (folded, windows))
        np.testing.assert_array_equal(got[m::2], want)
    assert not np.array_equal(got[0::2], got[1::2])


def test_aux_is_summed_over_layers_and_averaged_over_microbatches():
    """A per-token-mean aux (as MoE load balancing) from each layer: the pipeline's total equals the plain scan's
    over the whole batch, value and gradients (circular, 4 stages, 8 microbatches)."""
    from jaxswift.models.transformer import scan_layers

    def layer_fn(x, side, xs):
        (w, window), (positions, _) = xs, side
        h = jnp.tanh(x @ w) * (1.0 + positions[..., None] % 3)
        return x + h, jnp.mean(h ** 2) + 0.0 * window

    key = jax.random.key(4)
    x = jax.random.normal(key, (B, T, 32))
    w = jax.random.normal(jax.random.fold_in(key, 1), (8, 32, 32)) / 6
    side = (packed_batch()["positions"], packed_batch()["segment_ids"])
    windows = jnp.zeros((8,), jnp.int32)
    mesh = make_mesh("stage=4")
    pipelined = make_run_layers(mesh, load_rules("default"), ParallelOptions(num_microbatches=8, virtual_stages=2))

    def total(run):
        def f(x, w):
            y, aux = run(layer_fn, x, side, (w, windows))
            return jnp.sum(y ** 2) / y.size + aux, aux
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, w)

    (value, aux), grads = total(pipelined)
    (want_value, want_aux), want_grads = total(scan_layers)
    np.testing.assert_allclose([value, aux], [want_value, want_aux], rtol=1e-5)
    for g, r in zip(grads, want_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


# --- errors ---------------------------------------------------------------------------------------------------------


def test_relayout_rounds_are_permutations_that_land_every_chunk():
    """Block -> round-robin moves: each round a permutation of the stages; chunk c goes from (c // V, c % V) to
    (c % S, c // S)."""
    for stages in range(1, 9):
        for virtual in range(1, 9):
            landed = {}
            for moves in relayout_rounds(stages, virtual):
                assert sorted(to for _, to, _ in moves) == list(range(stages))
                landed.update({(s, slot): (to, lands) for s, (slot, to, lands) in enumerate(moves)})
            assert landed == {(c // virtual, c % virtual): (c % stages, c // stages)
                              for c in range(stages * virtual)}


@pytest.mark.parametrize("layers, rows, stages, options, message", [
    (6, 8, 4, ParallelOptions(), "6 layers are not divisible by mesh axis stage=4 x --virtual_stages 1"),
    (8, 8, 2, ParallelOptions(virtual_stages=3), "8 layers are not divisible by mesh axis stage=2 x "
                                                  "--virtual_stages 3"),
    (8, 6, 2, ParallelOptions(num_microbatches=4), "batch of 6 rows"),
    (8, 8, 2, ParallelOptions(pipeline_schedule="circular"), "circular needs --virtual_stages > 1"),
    (8, 8, 2, ParallelOptions(pipeline_schedule="gpipe", virtual_stages=2), "--virtual_stages 2 needs "
                                                                            "--pipeline_schedule circular"),
    (8, 8, 2, ParallelOptions(pipeline_schedule="1f1b"), "--pipeline_schedule '1f1b'"),
    (8, 8, 2, ParallelOptions(num_microbatches=0), "--num_microbatches must be positive"),
    (8, 8, 2, ParallelOptions(virtual_stages=0), "--virtual_stages must be a positive integer"),
])
def test_bad_pipeline_layouts_get_clear_errors(layers, rows, stages, options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_pipeline(layers, rows, stages, options)


def test_microbatches_default_to_one_per_stage_or_what_divides_the_rows():
    assert plan_pipeline(8, 8, 4, ParallelOptions()).microbatches == 4
    assert plan_pipeline(8, 6, 4, ParallelOptions()).microbatches == 3
    assert plan_pipeline(8, 1, 2, ParallelOptions()).microbatches == 1


def test_forward_on_a_stage_mesh_checks_the_layers():
    """Through the model: 8 layers on stage=2 with 3 virtual stages fails while tracing, naming the flags."""
    mesh, rules = make_mesh("stage=2"), load_rules("pipeline")
    tokens = jnp.zeros((4, 8), jnp.int32)
    with pytest.raises(ConfigError, match="not divisible by mesh axis stage=2 x --virtual_stages 3"):
        with activation_sharding(rules, mesh, ParallelOptions(virtual_stages=3)):
            jax.eval_shape(lambda p: hidden_states(p, tokens, CFG), init_params(CFG, jax.random.key(0)))
    with pytest.raises(ConfigError, match="circular needs --virtual_stages > 1"):
        make_run_layers(mesh, rules, ParallelOptions(pipeline_schedule="circular"))


def test_sft_recipe_on_data_stage_tensor_mesh_gives_the_same_losses(tiny_chat_model, tmp_path):
    """The SFT run (LoRA, gradient checkpointing, 2 steps of 4 rows) on data=2,stage=2,tensor=2 with the pipeline
    rules logs the losses of the single-device run (the second loss follows the first step's gradients)."""
    from jaxswift.train.args import SftArguments
    from jaxswift.train.sft import run_sft

    common = dict(model=str(tiny_chat_model), max_steps=2, logging_steps=1, learning_rate=1e-3, max_length=64,
                  demo_question="", disable_tqdm=True, save_steps=1000, lr_scheduler_type="constant",
                  tuner_type="lora", lora_dropout=0.0, gradient_checkpointing=True)
    single = run_sft(SftArguments(output_dir=str(tmp_path / "one"), mesh="1", per_device_train_batch_size=4,
                                  **common), progress=False)
    staged = run_sft(SftArguments(output_dir=str(tmp_path / "pp"), mesh="data=2,stage=2,tensor=2",
                                  sharding_rules="pipeline", per_device_train_batch_size=2, **common),
                     progress=False)
    assert len(single.losses) == 2
    np.testing.assert_allclose(list(staged.losses.values()), list(single.losses.values()), rtol=1e-5)
