"""Ring attention over the mesh axis `sequence` (8 virtual CPU devices, tiny float32 llama): attention equal to the
model's own and to a float64 numpy transcription, SFT loss and gradients equal to one device, the collective-permutes
of the compiled step as the formula says, the layouts' balance, and clear errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxswift.errors import ConfigError
from jaxswift.models import transformer
from jaxswift.models.config import ModelConfig
from jaxswift.models.spec import init_params
from jaxswift.parallel.collectives import count_collectives
from jaxswift.parallel.mesh import make_mesh
from jaxswift.parallel.ring_attention import (LAYOUTS, balance_sequence, balanced_step, make_self_attention,
                                              token_order)
from jaxswift.parallel.rules import activation_sharding, load_rules
from jaxswift.parallel.strategies import ParallelOptions
from jaxswift.train.step import nll_sums
from jaxswift.parallel.params import shard_params

B, T, N, K, H = 4, 32, 4, 2, 16  # GQA: two query heads per kv head
CFG = ModelConfig(family="llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=4, num_heads=N,
                  num_kv_heads=K, head_dim=H, sliding_windows=(0, 7, 0, 7), rms_norm_eps=1e-5)


def packed_rows() -> tuple[np.ndarray, np.ndarray]:
    """positions and segment ids [B, T]: rows with several segments (positions restart) and padding (segment 0)."""
    layouts = [[(1, 10), (2, 12), (3, 6), (0, 4)], [(1, 32)], [(1, 3), (2, 25), (0, 4)], [(1, 7), (2, 7), (3, 18)]]
    positions, segments = [], []
    for row in layouts:
        positions.append(np.concatenate([np.arange(n) if seg else np.zeros(n, int) for seg, n in row]))
        segments.append(np.concatenate([np.full(n, seg) for seg, n in row]))
    return np.stack(positions).astype(np.int32), np.stack(segments).astype(np.int32)


def numpy_attention(q, k, v, positions, segments, window) -> np.ndarray:
    """Float64 transcription: softmax(q k^T / sqrt(H)) v over same-segment keys at positions <= the query's (and
    > position - window when window > 0); query head n reads kv head n // (N / K)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros_like(q)
    group = q.shape[2] // k.shape[2]
    for b in range(q.shape[0]):
        distance = positions[b][:, None] - positions[b][None, :]
        mask = (segments[b][:, None] == segments[b][None, :]) & (distance >= 0)
        if window:
            mask &= distance < window
        for n in range(q.shape[2]):
            scores = q[b, :, n] @ k[b, :, n // group].T / np.sqrt(q.shape[-1])
            scores = np.where(mask, scores, -np.inf)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            out[b, :, n] = (weights / weights.sum(-1, keepdims=True)) @ v[b, :, n // group]
    return out


def test_layouts_are_permutations_that_balance_the_causal_work():
    """What each device of the ring computes on a plain causal row: zigzag gives every device the same causal
    pairs and the same number of non-empty half-block pairs (the rest are skipped); contiguous does not."""
    for n in (2, 4):
        for layout in LAYOUTS:
            assert sorted(token_order(64, n, layout)) == list(range(64))
        held = {layout: token_order(64, n, layout).reshape(n, -1) for layout in LAYOUTS}  # device -> positions
        causal_pairs = {layout: [int(np.sum(p + 1)) for p in held[layout]] for layout in LAYOUTS}
        assert len(set(causal_pairs["zigzag"])) == 1
        contiguous = causal_pairs["contiguous"]
        assert contiguous == sorted(contiguous) and len(set(contiguous)) == n  # the last device does the most

        def non_empty_half_blocks(device):
            halves = np.split(held["zigzag"][device], 2)
            return sum(int(np.any(q[:, None] >= k[None, :])) for src in range(n)
                       for q in halves for k in np.split(held["zigzag"][src], 2))
        assert [non_empty_half_blocks(d) for d in range(n)] == [2 * n + 1] * n  # of 4n: the rest is skipped


@jax.jit
def model_attention_and_grads(q, k, v, positions, segments, window, probe):
    out, vjp = jax.vjp(lambda *qkv: transformer.self_attention(*qkv, positions, segments, window), q, k, v)
    return out, vjp(probe)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ring_attention_equals_model_attention_and_numpy(n, layout):
    rng = np.random.default_rng(n)
    q, k, v = (rng.normal(size=(B, T, heads, H)).astype(np.float32) for heads in (N, K, K))
    positions, segments = packed_rows()
    mesh = make_mesh(f"sequence={n}")
    ring = make_self_attention(mesh, load_rules("sequence"), ParallelOptions(ring_attention_layout=layout))
    order = token_order(T, n, layout)
    inverse = np.argsort(order)
    probe = rng.normal(size=(B, T, N, H)).astype(np.float32)

    @jax.jit
    def ring_and_grads(q, k, v, window):
        def f(q, k, v):
            out = ring(q[:, order], k[:, order], v[:, order], positions[:, order], segments[:, order], window)
            return out[:, inverse]
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(probe)

    for window in (0, 5):
        got, got_grads = ring_and_grads(q, k, v, window)
        want, want_grads = model_attention_and_grads(q, k, v, positions, segments, window, probe)
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"window {window}")
        np.testing.assert_allclose(got, numpy_attention(q, k, v, positions, segments, window), atol=1e-5)
        for name, g, w in zip("qkv", got_grads, want_grads):
            np.testing.assert_allclose(g, w, atol=1e-5, err_msg=f"d{name}, window {window}")
        assert np.all(np.isfinite(got)) and all(np.all(np.isfinite(g)) for g in got_grads)


def sft_batch():
    rng = np.random.default_rng(0)
    positions, segments = packed_rows()
    tokens = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    targets = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    loss_weights = ((segments > 0) & (rng.random((B, T)) < 0.8)).astype(np.float32)
    return {"tokens": tokens, "targets": targets, "loss_weights": loss_weights, "segment_ids": segments,
            "positions": positions}


def mean_nll(cfg):
    def loss(params, batch):
        nll, weight = nll_sums(params, batch, cfg, loss_chunk=512)
        return nll / weight
    return loss


@pytest.fixture(scope="module")
def single_device():
    params = init_params(CFG, jax.random.key(0))
    loss, grads = jax.jit(jax.value_and_grad(mean_nll(CFG)))(params, sft_batch())
    return params, loss, grads


def sharded_step_equals_single_device(single_device, mesh, cfg, options=None):
    """Compiles the balanced, ring-attended (or `options`' strategy) loss and gradients for `mesh` (weights sharded
    by sharding/sequence.yaml), checks them against one device's, and returns the compiled step."""
    params, want_loss, want_grads = single_device
    rules, options = load_rules("sequence"), options or ParallelOptions()
    params = shard_params(params, cfg, rules, mesh)
    grad_step = balanced_step(jax.value_and_grad(mean_nll(cfg)), mesh, options)

    def traced(p, batch):
        with activation_sharding(rules, mesh, options):
            return grad_step(p, batch)

    compiled = jax.jit(traced).lower(params, sft_batch()).compile()
    loss, grads = compiled(params, sft_batch())
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6, atol=1e-6)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
    return compiled


@pytest.mark.parametrize("mesh_spec, remat", [("sequence=2", "none"), ("sequence=4", "full"),
                                              ("data=2,sequence=2,tensor=2", "full")])
def test_sft_loss_gradients_and_permutes_equal_single_device(single_device, mesh_spec, remat):
    """The SFT loss and its gradients, balanced (zigzag) and ring-attended, equal one device's; the compiled step
    runs per layer 2 (n-1) collective-permutes forward and 2 (n-1) + 2 n backward (k and v around the ring again,
    dk and dv with them and home), each one [B/dp, T/n, K/tensor, H] float32 block. Under remat the recomputed
    forward sends the same k, v hops as the backward, and XLA keeps one copy of each."""
    mesh = make_mesh(mesh_spec)
    n = mesh.shape["sequence"]
    compiled = sharded_step_equals_single_device(single_device, mesh, CFG.replace(remat=remat))
    per_layer = 2 * (n - 1) + 2 * (n - 1) + 2 * n
    block_bytes = B // mesh.shape["data"] * (T // n) * (K // mesh.shape["tensor"]) * H * 4
    permutes = count_collectives(compiled.as_text())["collective-permute"]
    assert permutes.count == CFG.num_layers * per_layer
    assert permutes.bytes == CFG.num_layers * per_layer * block_bytes


def test_ring_attention_inside_pipeline_stages_equals_single_device(single_device):
    """data=2,stage=2,sequence=2: each pipeline stage's layers (a shard_map over `stage`) run the ring over the
    remaining axes."""
    sharded_step_equals_single_device(single_device, make_mesh("data=2,stage=2,sequence=2"), CFG.replace(remat="full"))


def test_balance_sequence_permutes_every_token_array_alike():
    batch = {k: v[None] for k, v in sft_batch().items()}  # [A, B, T] as the trainer's steps get them
    batch["row_weight"] = np.ones((1, B), np.float32)
    balanced = balance_sequence(batch, 4, "zigzag")
    order = token_order(T, 4, "zigzag")
    for key in ("tokens", "targets", "loss_weights", "segment_ids", "positions"):
        np.testing.assert_array_equal(balanced[key], batch[key][..., order])
    assert balanced["row_weight"] is batch["row_weight"]
    assert balance_sequence(batch, 4, "contiguous") is batch and balance_sequence(batch, 1, "zigzag") is batch


def test_sft_picks_the_sequence_rules_on_a_sequence_mesh(monkeypatch, tmp_path):
    """--mesh with sequence > 1 and --sharding_rules default -> sharding/sequence.yaml; a table named by the user
    stays."""
    from jaxswift.train import loop
    from jaxswift.train.args import SftArguments

    monkeypatch.setattr(loop, "load_model", lambda *a, **k: type("Model", (), {"config": CFG})())

    def rules(mesh, flag="default"):
        args = SftArguments(mesh=mesh, sharding_rules=flag, output_dir=str(tmp_path / f"{mesh}-{flag}"))
        return loop.start_run(args).rules.source

    assert rules("sequence=2").endswith("sequence.yaml")
    assert rules("data=2,sequence=2,tensor=2").endswith("sequence.yaml")
    assert rules("sequence=2", "fsdp").endswith("fsdp.yaml")
    assert rules("data=2").endswith("default.yaml")


def test_sft_on_a_sequence_mesh_trains_like_one_device(tiny_chat_model, tmp_path, monkeypatch):
    """run_sft end to end on data=2,sequence=2,tensor=2: the steps balance their batches (zigzag) and give the
    one-device losses."""
    from jaxswift.parallel import ring_attention
    from jaxswift.train.args import SftArguments
    from jaxswift.train.sft import run_sft

    layouts = []
    real = ring_attention.balance_sequence
    monkeypatch.setattr(ring_attention, "balance_sequence",
                        lambda batch, n, layout: layouts.append((n, layout)) or real(batch, n, layout))

    def losses(mesh, per_device):
        args = SftArguments(model=str(tiny_chat_model), output_dir=str(tmp_path / mesh), mesh=mesh, max_steps=3,
                            tuner_type="full", per_device_train_batch_size=per_device, max_length=64,
                            learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, save_steps=1000,
                            demo_question="", disable_tqdm=True)
        return list(run_sft(args, progress=False).losses.values())

    want = losses("1", 2)
    assert not layouts
    got = losses("data=2,sequence=2,tensor=2", 1)
    assert set(layouts) == {(2, "zigzag")}
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("mesh_spec, layout, length, message", [
    ("sequence=4", "zigzag", 36, "sequence length 36 is not divisible by 8 (2 x mesh axis sequence=4)"),
    ("sequence=4", "striped", 30, "sequence length 30 is not divisible by 4 (mesh axis sequence=4)"),
    ("sequence=2", "contiguous", 33, "sequence length 33 is not divisible by 2 (mesh axis sequence=2)"),
])
def test_sequence_length_that_does_not_split_is_a_clear_error(mesh_spec, layout, length, message):
    mesh = make_mesh(mesh_spec)
    ring = make_self_attention(mesh, load_rules("sequence"), ParallelOptions(ring_attention_layout=layout))
    q, kv = jnp.zeros((1, length, N, H)), jnp.zeros((1, length, K, H))
    side = jnp.zeros((1, length), jnp.int32)
    with pytest.raises(ConfigError, match=re.escape(message)):
        jax.jit(ring)(q, kv, kv, side, side, 0)  # raised while tracing the step, as the trainer would
    if layout != "contiguous":
        with pytest.raises(ConfigError, match=f"sequence length {length}"):
            balance_sequence({"tokens": side, "positions": side, "segment_ids": side}, mesh.shape["sequence"], layout)


def test_unknown_layout_is_a_clear_error():
    with pytest.raises(ConfigError, match="--ring_attention_layout 'spiral': expected one of zigzag"):
        make_self_attention(make_mesh("sequence=2"), load_rules("sequence"),
                            ParallelOptions(ring_attention_layout="spiral"))
    with pytest.raises(ConfigError, match="--ring_attention_layout 'spiral'"):
        token_order(32, 2, "spiral")
