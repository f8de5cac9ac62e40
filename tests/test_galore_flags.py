"""GaLore and Q-GaLore from the SFT flags: targets, optimizer state size, training runs, Q-GaLore's quantizers,
stochastic rounding and lazy subspace updates, bad flags."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxswift.errors import ConfigError
from jaxswift.models.config import ModelConfig
from jaxswift.models.spec import abstract_params, init_params
from jaxswift.optim import qgalore
from jaxswift.optim.factory import OptimizerConfig, make_optimizer
from jaxswift.optim.galore import Matrix, galore_adamw, optimizer_state_bytes
from jaxswift.train.args import SftArguments, parse_args
from jaxswift.train.state import init_train_state
from jaxswift.train.step import make_train_step
from jaxswift.train.sft import run_sft
from jaxswift.train.tuning import build_optimizer, galore_targets

CFG = ModelConfig("llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16)


def test_default_targets_are_attention_and_mlp_matrices():
    layout = galore_targets(CFG, ["all-linear"])(abstract_params(CFG))
    assert layout["layers"]["wq"] == Matrix(1, 1) and layout["layers"]["wo"] == Matrix(1, 2)
    assert all(isinstance(layout["layers"][n], Matrix) for n in ("wk", "wv", "w_gate", "w_up", "w_down"))
    assert layout["embed"] is False and layout["final_norm"] is False and layout["lm_head"] is False
    assert layout["layers"]["attn_norm"] is False
    some = galore_targets(CFG, ["q_proj", "wv"])(abstract_params(CFG))
    assert [n for n, m in some["layers"].items() if m] == ["wq", "wv"]
    with pytest.raises(ConfigError, match="--galore_target_modules: .*'nope' names no module"):
        galore_targets(CFG, ["nope"])


def _state_bytes(**flags):
    args = SftArguments(tuner_type="full", **flags)
    optimizer, _ = build_optimizer(args, 10, CFG)
    return optimizer_state_bytes(abstract_params(CFG), optimizer)


def test_galore_optimizer_state_is_smaller_by_the_projected_moments():
    """AdamW keeps 2 float32 moments per weight; GaLore keeps them at R's low-rank shape plus P (r x smaller side)
    on every targeted matrix. The difference is computed here from the shapes, in float64."""
    adamw = _state_bytes()
    rank = 8
    galore = _state_bytes(use_galore=True, galore_rank=rank)
    saved = 0.0
    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        shape = abstract_params(CFG)["layers"][name].shape
        n_in = 2 if name == "wo" else 1
        n, m = math.prod(shape[1:1 + n_in]), math.prod(shape[1 + n_in:])  # torch (out=m, in=n)
        r = min(rank, m, n)
        saved += CFG.num_layers * (8.0 * m * n - 8.0 * max(m, n) * r - 4.0 * r * min(m, n))
    assert galore < adamw
    assert adamw - galore == saved
    q_galore = _state_bytes(use_galore=True, galore_rank=rank, galore_quantization=True)
    assert q_galore < galore  # 4-bit projectors


def test_galore_handles_frozen_holes_in_the_trainable_tree():
    """With --freeze_parameters the trainable tree has None where frozen leaves were: GaLore skips them."""
    params = abstract_params(CFG)
    trainable = {**params, "layers": {**params["layers"], "wk": None}}
    tx = galore_adamw(1e-3, rank=4, galore_mask=galore_targets(CFG, ["all-linear"]))
    state = jax.eval_shape(tx.init, trainable)
    assert jax.tree.structure(state[0].mu) == jax.tree.structure(trainable)


@pytest.mark.parametrize("quantized", [False, True], ids=["galore", "q-galore"])
def test_sft_with_galore_lowers_the_loss(tiny_chat_model, tmp_path, quantized):
    args = SftArguments(model=str(tiny_chat_model), output_dir=str(tmp_path), tuner_type="full", use_galore=True,
                        galore_rank=8, galore_update_interval=2, galore_quantization=quantized, max_steps=5,
                        logging_steps=1, learning_rate=1e-3, per_device_train_batch_size=2, max_length=128,
                        demo_question="", disable_tqdm=True, save_steps=1000, lr_scheduler_type="constant", mesh="1")
    result = run_sft(args, progress=False)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.05
    assert (result.export_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("flags, message", [
    (dict(use_galore=True), r"--use_galore .* use --tuner_type full"),
    (dict(tuner_type="full", galore_quantization=True), "needs --use_galore true"),
    (dict(tuner_type="full", use_galore=True, galore_rank=0), "--galore_rank must be a positive integer"),
    (dict(tuner_type="full", use_galore=True, galore_update_interval=-1), "--galore_update_interval must be"),
    (dict(tuner_type="full", use_galore=True, galore_scale=0.0), "--galore_scale must be positive"),
    (dict(tuner_type="full", use_galore=True, galore_proj_bits=3), "--galore_proj_bits 3: expected 4 or 8"),
])
def test_bad_galore_flags(flags, message):
    with pytest.raises(ConfigError, match=message):
        SftArguments(**flags)


def test_galore_flags_on_the_command_line():
    args = parse_args(SftArguments, ["--tuner_type", "full", "--use_galore", "true", "--galore_rank", "64",
                                     "--galore_update_interval", "50", "--galore_scale", "0.5"])
    assert (args.use_galore, args.galore_rank, args.galore_update_interval, args.galore_scale) == (True, 64, 50, 0.5)
    with pytest.raises(ConfigError, match="--galore_rank must be a positive integer, got 0"):
        parse_args(SftArguments, ["--tuner_type", "full", "--use_galore", "true", "--galore_rank", "0"])


# --- Q-GaLore pieces --------------------------------------------------------------------------------------------


def qgalore_quantize_reference(w: np.ndarray, group: int, bits: int):
    """Q-GaLore's `_quantize` (q_galore_projector.py / quantization.py) transcribed to numpy float32."""
    w = w.reshape(-1, group).astype(np.float32)
    max_int = np.float32(2 ** bits - 1)
    lo, hi = w.min(1, keepdims=True), w.max(1, keepdims=True)
    scales = np.maximum(hi - lo, np.float32(1e-5)) / max_int
    zeros = np.clip(-np.round(lo / scales), 0, max_int)
    codes = np.clip(np.round(w / scales) + zeros, 0, max_int)
    return codes, scales, zeros


@pytest.mark.parametrize("bits", [8, 4])
def test_group_quantization_is_qgalores_and_within_half_a_step(bits):
    w = np.asarray(jax.random.normal(jax.random.key(bits), (3, 512)) * 0.1)
    ours = qgalore.quantize_groups(jnp.asarray(w), lead=1, bits=bits, group=256)
    codes, scales, zeros = qgalore_quantize_reference(w, 256, bits)
    got = np.asarray(nf4_unpack(ours)).reshape(-1, 256)
    np.testing.assert_array_equal(got, codes)
    np.testing.assert_allclose(np.asarray(ours.scales).reshape(-1, 1), scales, rtol=1e-6)  # XLA may divide by 255 as a reciprocal multiply
    error = np.abs(np.asarray(ours.dequantize()) - w).reshape(-1, 256)
    assert np.all(error <= scales / 2 * (1 + 1e-5) + 1e-7)
    assert ours.codes.size == w.size * bits // 8  # 4-bit codes two per byte


def nf4_unpack(q):
    from jaxswift.quant.nf4 import unpack_nibbles

    return unpack_nibbles(q.codes, q.scales.size * q.group) if q.bits == 4 else q.codes


def test_stochastic_rounding_is_unbiased():
    """Values a quarter of a step above a code: round-to-nearest is biased by -1/4 step, stochastic rounding's mean
    over many draws converges to the value (within 5 standard errors), and each draw is within one step."""
    levels = jnp.arange(256, dtype=jnp.float32) * 0.01  # min 0, max 2.55: scale 0.01, zero 0
    x = levels.at[1:255].add(0.0025)
    draws = 2000
    keys = jax.random.split(jax.random.key(0), draws)
    samples = jax.jit(jax.vmap(lambda k: qgalore.quantize_groups(x, lead=0, key=k).dequantize()))(keys)
    scale = 0.01
    assert float(jnp.max(jnp.abs(samples - x))) < scale * (1 + 1e-4)
    bias = jnp.mean(samples, 0) - x
    assert float(jnp.max(jnp.abs(bias))) < 5 * (scale * math.sqrt(0.25 * 0.75) / math.sqrt(draws))
    nearest = qgalore.quantize_groups(x, lead=0).dequantize() - x
    assert float(jnp.mean(nearest[1:255])) < -0.2 * scale  # what stochastic rounding avoids


def reference_intervals(cosines, gap, queue_size, threshold, gamma, steps):
    """Q-GaLore's GaLoreProjector.project bookkeeping, given the cosine similarity each refresh would see."""
    queue, past, intervals, refreshes, it = [], False, [], [], iter(cosines)
    for step in range(steps):
        if step % gap == 0:
            refreshes.append(step)
            if past:
                if len(queue) == queue_size:
                    queue.pop(0)
                queue.append(next(it))
                if len(queue) == queue_size and sum(queue) / queue_size >= threshold:
                    gap = int(gap * gamma)
            past = True
        intervals.append(gap)
    return intervals, refreshes


def _run_projector(grads, **kw):
    tx = qgalore.qgalore(rank=2, update_proj_gap=1, galore_mask=Matrix(0, 1), **kw)
    state = tx.init(grads[0])
    intervals, projectors = [], []
    update = jax.jit(tx.update)
    for g in grads:
        _, state = update(g, state)
        ps = state.proj
        intervals.append(int(ps.interval))
        projectors.append(np.asarray(ps.proj.dequantize()))
    return intervals, projectors


def test_lazy_subspace_updates_follow_qgalore():
    """A gradient whose subspace never changes (cosine 1): the interval doubles as in Q-GaLore's projector, and no
    projector changes between refreshes. Alternating orthogonal subspaces (cosine 0): it never grows."""
    u = jax.random.normal(jax.random.key(0), (16, 32))  # our layout [in=16, out=32]: torch 32 x 16, right P
    steps, kw = 12, dict(queue_size=2, cos_threshold=0.4, gamma_proj=2)
    intervals, projectors = _run_projector([u] * steps, **kw)
    expected, refreshes = reference_intervals([1.0] * steps, 1, 2, 0.4, 2, steps)
    assert intervals == expected and expected[-1] > 1
    for step in range(1, steps):
        if step not in refreshes:
            np.testing.assert_array_equal(projectors[step], projectors[step - 1])

    e = np.eye(16, dtype=np.float32)
    a = np.outer(e[0], np.arange(1, 33)) + 0.1 * np.outer(e[1], np.ones(32))
    b = np.outer(e[2], np.arange(1, 33)) + 0.1 * np.outer(e[3], np.ones(32))
    intervals, _ = _run_projector([jnp.asarray(a if i % 2 == 0 else b) for i in range(steps)], **kw)
    assert intervals == reference_intervals([0.0] * steps, 1, 2, 0.4, 2, steps)[0] == [1] * steps


def test_qgalore_step_keeps_8bit_weights_and_lowers_the_loss():
    """Two target matrices (compile time grows with each projected leaf; the SFT test above runs all seven)."""
    cfg = CFG.replace(remat="none")
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    layout = galore_targets(cfg, ["q_proj", "up_proj"])
    params = qgalore.quantize_weights(params, layout(params), group=256)
    optimizer, _ = make_optimizer(OptimizerConfig(learning_rate=3e-3, use_galore=True, galore_rank=4,
                                                  galore_update_interval=3, galore_quantization=True), 20,
                                  galore_mask=layout)
    mask = jax.tree.map(lambda _: True, params)
    state = jax.jit(lambda p: init_train_state(p, mask, optimizer, seed=0))(params)
    tokens = jax.random.randint(jax.random.key(1), (1, 2, 17), 0, cfg.vocab_size)
    batch = {"tokens": tokens[..., :-1], "targets": tokens[..., 1:], "loss_weights": jnp.ones((1, 2, 16)),
             "segment_ids": jnp.ones((1, 2, 16), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (1, 2, 16))}
    step = jax.jit(make_train_step(cfg, optimizer))
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1
    w = state.trainable["layers"]["w_up"]
    assert isinstance(w, qgalore.GroupQuantized) and w.codes.dtype == jnp.uint8
    assert not np.array_equal(np.asarray(w.codes), np.asarray(params["layers"]["w_up"].codes))
    proj = state.opt_state[1][0].proj["layers"]["w_up"].proj
    assert proj.bits == 4 and proj.codes.dtype == jnp.uint8


def test_galore_update_is_the_same_on_sharded_gradients():
    """Params and gradients sharded over 8 devices (layers over one mesh axis, features over the other) give the
    single-device GaLore-AdamW updates, projector refreshes included (steps 0 and 2)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxswift.parallel.mesh import make_mesh

    keys = jax.random.split(jax.random.key(0), 3)
    params = {"embed": jax.random.normal(keys[0], (128, 64)),
              "layers": {"w_up": jax.random.normal(keys[1], (2, 64, 128)),
                         "w_down": jax.random.normal(keys[2], (2, 128, 64))}}
    grads = [jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), params) for i in range(3)]
    tx = galore_adamw(1e-2, rank=4, update_proj_gap=2, weight_decay=0.1,
                      galore_mask=galore_targets(CFG, ["up_proj", "down_proj"]))

    def run(params, grads):
        state, out = tx.init(params), []
        for g in grads:
            updates, state = tx.update(g, state, params)
            out.append(updates)
        return out

    expected = jax.jit(run)(params, grads)
    mesh = make_mesh("data=2,tensor=4")  # the trainer's mesh (automatic axes: XLA gathers what the SVD needs)
    specs = {"embed": P("tensor", None), "layers": {"w_up": P("data", None, "tensor"),
                                                    "w_down": P("data", "tensor", None)}}
    shard = lambda tree: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)  # noqa
    sharded_params, sharded_grads = shard(params), [shard(g) for g in grads]
    assert len(sharded_grads[0]["layers"]["w_up"].sharding.device_set) == 8
    got = jax.jit(run)(sharded_params, sharded_grads)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
