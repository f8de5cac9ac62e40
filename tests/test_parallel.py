"""Base strategies on 8 virtual CPU devices: data, fsdp and tensor parallelism (and a mix) give the single-device
loss and gradients of the SFT loss; each strategy's compiled collectives match the formula from the shapes; bad
mesh flags and rule tables get errors that name the flag.

Tiny float32 llama: L=4 layers, D=64, N=4 heads, K=2 kv heads, H=16, F=128, V=256 (untied lm_head); B=8 rows of
T=32 tokens (two packed segments per row)."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxswift.errors import ConfigError
from jaxswift.models.config import ModelConfig
from jaxswift.models.spec import init_params, logical_axes
from jaxswift.parallel.collectives import count_collectives
from jaxswift.parallel.mesh import make_mesh, parse_mesh
from jaxswift.parallel.rules import activation_sharding, batch_sharding, load_rules, param_shardings
from jaxswift.train.step import nll_sums

CFG = ModelConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=16)
B, T = 8, 32
F32 = 4  # bytes


def sft_loss(params, batch):
    """The SFT train step's loss: mean NLL over the weighted target tokens."""
    nll, weight = nll_sums(params, batch, CFG, loss_chunk=512)
    return nll / weight


LOSS_AND_GRADS = jax.value_and_grad(sft_loss)


def packed_batch(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    split = rng.integers(8, T - 8, B)[:, None]
    col = np.arange(T)[None, :]
    return {"tokens": rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32),
            "targets": rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32),
            "loss_weights": (rng.random((B, T)) < 0.7).astype(np.float32),
            "segment_ids": np.where(col < split, 1, 2).astype(np.int32),
            "positions": np.where(col < split, col, col - split).astype(np.int32)}


@pytest.fixture(scope="module")
def model_and_batch():
    return init_params(CFG, jax.random.key(0)), packed_batch()


@pytest.fixture(scope="module")
def single_device(model_and_batch):
    params, batch = model_and_batch
    loss, grads = jax.jit(LOSS_AND_GRADS)(params, batch)
    return float(loss), jax.tree.map(np.asarray, grads)


def sharded_run(mesh_spec: str, params, batch, rules_name: str = "default"):
    """(loss, gradients, {collective kind: (count, bytes)}) of one compiled loss-and-grads step on the mesh."""
    mesh, rules = make_mesh(mesh_spec), load_rules(rules_name)
    param_sharding = param_shardings(logical_axes(CFG), params, rules, mesh)
    data_sharding = batch_sharding(rules, mesh)

    def traced(p, b):
        with activation_sharding(rules, mesh):
            return LOSS_AND_GRADS(p, b)

    fn = jax.jit(traced, in_shardings=(param_sharding, data_sharding),
                 out_shardings=(NamedSharding(mesh, PartitionSpec()), param_sharding))
    args = jax.device_put(params, param_sharding), jax.device_put(batch, data_sharding)
    compiled = fn.lower(*args).compile()
    stats = {kind: (s.count, s.bytes) for kind, s in count_collectives(compiled.as_text()).items()}
    loss, grads = compiled(*args)
    return float(loss), jax.tree.map(np.asarray, grads), stats


@pytest.fixture(scope="module")
def on_mesh(model_and_batch):
    """mesh spec -> sharded_run's result, each mesh compiled once for the equality and the collectives tests."""
    cache = {}

    def run(mesh_spec):
        if mesh_spec not in cache:
            cache[mesh_spec] = sharded_run(mesh_spec, *model_and_batch)
        return cache[mesh_spec]

    return run


@pytest.mark.parametrize("mesh_spec", ["tensor=2", "fsdp=4", "data=2,fsdp=2,tensor=2", "data=8"])
def test_loss_and_gradients_equal_single_device(on_mesh, single_device, mesh_spec):
    loss, grads, _ = on_mesh(mesh_spec)
    ref_loss, ref_grads = single_device
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for (path, ref), got in zip(jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree.leaves(grads)):
        scale = float(np.max(np.abs(ref)))
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=f"{mesh_spec}: gradient of {jax.tree_util.keystr(path)}")


# ---------------------------------------------------------------------------------------------------------------
# collectives per step, from the shapes


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_data_parallel_all_reduces_the_gradients_once(model_and_batch, on_mesh):
    """data=8: replicated weights, so the only collective is the all-reduce of every gradient (XLA combines them
    into a few tuple all-reduces: one per layer iteration of the backward scan, plus the unscanned weights) and of
    the two loss sums (NLL and token weight, f32 scalars)."""
    params, _ = model_and_batch
    stats = on_mesh("data=8")[2]
    assert set(stats) == {"all-reduce"}
    count, moved = stats["all-reduce"]
    assert moved == nbytes(params) + 2 * F32
    assert 1 <= count <= CFG.num_layers + 2


def test_fsdp_gathers_weights_forward_and_backward_and_reduces_gradients(model_and_batch, on_mesh):
    """fsdp=4: every weight with an embed axis is sharded 4 ways (ZeRO-3). Inside the layer scan each of the 7
    sharded layer weights (wq wk wv wo w_gate w_up w_down) is all-gathered in the forward and again in the backward
    (the scan saves activations, not gathered weights): 2 x L x 7 all-gathers moving 2 x the layer weight bytes;
    outside the scan the lm_head is gathered once and the token ids once (the embedding table is sharded on its
    embed axis, so each device looks up every row for its columns).

    Gradients: XLA:CPU has no reduce-scatter; it lowers the gradient reduce-scatter as an all-reduce of the full
    gradient followed by a dynamic-slice, one tuple all-reduce per layer iteration. Everything but the lm_head is
    reduced that way (the lm_head's gradient is computed from activations all-to-all'ed onto its embed shards, so
    it needs no reduction), plus the two loss sums."""
    params, _ = model_and_batch
    stats = on_mesh("fsdp=4")[2]
    layers = params["layers"]
    sharded = [k for k, axes in logical_axes(CFG)["layers"].items() if "embed" in axes]
    assert sorted(sharded) == ["w_down", "w_gate", "w_up", "wk", "wo", "wq", "wv"]
    layer_weight_bytes = nbytes({k: layers[k] for k in sharded})

    assert stats["all-gather"] == (2 * CFG.num_layers * len(sharded) + 2,
                                   2 * layer_weight_bytes + nbytes(params["lm_head"]) + B * T * F32)
    assert "reduce-scatter" not in stats  # XLA:CPU: all-reduce + dynamic-slice instead
    count, moved = stats["all-reduce"]
    assert moved == nbytes(params) - nbytes(params["lm_head"]) + 2 * F32
    assert count == CFG.num_layers + 2


def test_tensor_parallel_all_reduces_activations_per_layer(on_mesh):
    """tensor=2 (Megatron): per layer, the forward all-reduces the two row-parallel outputs (wo, w_down: [B,T,D]
    each) and the backward the input gradients of the five column-parallel projections (wq wk wv: one tuple
    all-reduce, w_gate w_up: another), so 4 all-reduces moving 7 x B*T*D floats per layer. Outside the scan: the
    vocab-sharded embedding lookup (forward) and lm_head input gradient (backward), [B,T,D] each, and the
    vocab-sharded log-softmax (max, then sum-exp with the target logit: 3 x [B,T]).

    Nothing else: each device attends with its own heads (rows and kv heads stay separate batch axes of the
    attention matmuls, so no q, k or v is gathered)."""
    stats = on_mesh("tensor=2")[2]
    L, D = CFG.num_layers, CFG.hidden_size
    assert stats["all-reduce"] == (4 * L + 4, (7 * L + 2) * B * T * D * F32 + 3 * B * T * F32)
    assert set(stats) == {"all-reduce"}


# ---------------------------------------------------------------------------------------------------------------
# errors name the flag


def test_unknown_mesh_axis_names_the_flag():
    with pytest.raises(ConfigError, match=r"--mesh 'data=2,pipe=4': unknown axis 'pipe' \(axes: data, fsdp"):
        parse_mesh("data=2,pipe=4")


def test_mesh_larger_than_the_machine_names_the_flag():
    with pytest.raises(ConfigError, match=r"--mesh data=4,tensor=4 needs 16 devices \(data=4 x tensor=4\), but 8 "
                                          r"are available"):
        make_mesh("data=4,tensor=4")


@pytest.mark.parametrize("mesh_spec, message", [
    ("data=0", r"size of 'data' must be a positive integer"),
    ("4x2x2x2", r"expected DATAxTENSOR like 4x2"),
])
def test_malformed_mesh_names_the_flag(mesh_spec, message):
    with pytest.raises(ConfigError, match=rf"--mesh '{mesh_spec}': {message}"):
        parse_mesh(mesh_spec)


@pytest.mark.parametrize("table, message", [
    ("params:\n  embed: pipe\n", r"params\.embed: unknown mesh axis 'pipe'"),
    ("params:\n  embed: [fsdp, fsdp]\n", r"params\.embed: a mesh axis appears twice in \['fsdp', 'fsdp'\]"),
    ("params:\n  embed: 2\n", r"params\.embed: expected a mesh axis, a list of mesh axes or null, got 2"),
    ("activations:\n  tokens: data\n", r"activations: unknown logical axis 'tokens'"),
    ("parameters: {}\n", r"unknown sections \['parameters'\]"),
])
def test_invalid_rule_table_names_the_flag_and_file(tmp_path, table, message):
    path = tmp_path / "rules.yaml"
    path.write_text(table)
    with pytest.raises(ConfigError, match=rf"--sharding_rules {path}.*{message}"):
        load_rules(str(path))


def test_one_mesh_axis_on_two_dimensions_of_a_weight_names_the_flag(tmp_path, model_and_batch):
    """embed and mlp both on fsdp: w_gate, w_up, w_down [L, D, F] would be split twice over one mesh axis."""
    path = tmp_path / "twice.yaml"
    path.write_text("params:\n  embed: fsdp\n  mlp: fsdp\n")
    params, _ = model_and_batch
    with pytest.raises(ConfigError, match=rf"--sharding_rules {path}: parameter \['layers'\]\['w_\w+'\].*"
                                          r"mesh axis 'fsdp' appears twice"):
        param_shardings(logical_axes(CFG), params, load_rules(str(path)), make_mesh("fsdp=2"))

