"""GaLore vs galore_torch's GaLoreAdamW (the reference), memory figures, and bad inputs."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxswift.errors import ConfigError
from jaxswift.models.config import ModelConfig
from jaxswift.models.spec import abstract_params, init_params
from jaxswift.optim.galore import Matrix, galore, galore_adamw, galore_mask_for, optimizer_state_bytes

import galore_torch  # the reference (test extra): a missing install fails, never skips
import torch

HP = dict(rank=4, update_proj_gap=2, scale=0.25, weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-6)
LR = 0.05
TINY = ModelConfig(family="llama", vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                   num_kv_heads=1, head_dim=8)


def _torch_view(x, mat):
    """Our leaf [batch..., in..., out...] as numpy torch-layout matrices [batch..., m, n]."""
    batch, m, n = mat.split(x.shape)
    return np.asarray(x).reshape(*batch, n, m).swapaxes(-1, -2)


def _from_torch_view(y, mat, shape):
    return np.asarray(y).swapaxes(-1, -2).reshape(shape)


def _grad(rng, shape, mat):
    """Random gradient whose torch-layout matrices have well-separated singular values: the SVD (in any library) is
    then well conditioned, so the comparison tests GaLore and not LAPACK's float32 rounding."""
    if not isinstance(mat, Matrix):
        return rng.standard_normal(shape).astype(np.float32)
    batch, m, n = mat.split(shape)
    k = min(m, n)
    out = []
    for _ in range(int(np.prod(batch))):
        q1, _ = np.linalg.qr(rng.standard_normal((m, k)))
        q2, _ = np.linalg.qr(rng.standard_normal((n, k)))
        out.append(q1 * np.linspace(4.0, 0.5, k) @ q2.T)
    return _from_torch_view(np.stack(out).reshape(*batch, m, n), mat, shape).astype(np.float32)


def _canonical_svd(svd):
    """torch.linalg.svd with jaxswift's sign convention (largest-|.| entry of each used singular vector positive).

    Signs are arbitrary in any SVD, and GaLore keeps Adam moments across projector refreshes, so after a refresh the
    result depends on them; pinning the same convention on both sides makes multi-step runs comparable."""
    def wrapped(a, full_matrices=True):
        u, s, vh = svd(a, full_matrices=full_matrices)
        vec = vh if a.shape[-2] >= a.shape[-1] else u.mT
        sign = torch.sign(vec.gather(-1, vec.abs().argmax(-1, keepdim=True)))
        return u * sign.mT, s, vh * sign
    return wrapped


def _split(x, mat):
    """The arrays galore_torch optimizes for one leaf: one (m, n) matrix per layer, or the leaf itself."""
    if not isinstance(mat, Matrix):
        return [np.asarray(x)]
    t = _torch_view(x, mat)
    return [np.ascontiguousarray(a) for a in t.reshape(-1, *t.shape[-2:])]


def _join(arrays, mat, shape):
    if not isinstance(mat, Matrix):
        return arrays[0]
    batch, m, n = mat.split(shape)
    return _from_torch_view(np.stack(arrays).reshape(*batch, m, n), mat, shape)


def _reference(params, grads, mask, hp):
    """galore_torch's GaLoreAdamW: a GaLore group (one param per layer matrix) and a plain group (the rest)."""
    flat, treedef = jax.tree.flatten(params)
    mats = treedef.flatten_up_to(mask)
    tparams = [[torch.nn.Parameter(torch.tensor(a)) for a in _split(x, m)] for x, m in zip(flat, mats)]
    low = [p for ps, m in zip(tparams, mats) if isinstance(m, Matrix) for p in ps]
    full = [p for ps, m in zip(tparams, mats) if not isinstance(m, Matrix) for p in ps]
    groups = [{"params": low, "rank": hp["rank"], "update_proj_gap": hp["update_proj_gap"], "scale": hp["scale"],
               "proj_type": "std"}] * bool(low) + [{"params": full}] * bool(full)
    opt = galore_torch.GaLoreAdamW(groups, lr=LR, betas=(hp["b1"], hp["b2"]), eps=hp["eps"],
                                   weight_decay=hp["weight_decay"], no_deprecation_warning=True)
    for g in grads:
        for ps, x, m in zip(tparams, treedef.flatten_up_to(g), mats):
            for p, a in zip(ps, _split(x, m)):
                p.grad = torch.tensor(a)
        opt.step()
    return treedef.unflatten([_join([p.detach().numpy() for p in ps], m, x.shape)
                              for ps, x, m in zip(tparams, flat, mats)])


def _ours(params, grads, mask, hp):
    """Jitted galore_adamw steps; also returns the projectors after each step."""
    tx = galore_adamw(LR, galore_mask=mask, **hp)
    state, update, projs = tx.init(params), jax.jit(tx.update), []
    for g in grads:
        upd, state = update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, upd)
        projs.append(state[0].proj)
    return params, projs


@pytest.mark.parametrize("shape", [(16, 24), (24, 16)], ids=["torch_m>=n", "torch_m<n"])
def test_one_step_matches_galore_torch(shape):
    # One step is sign-invariant (P appears twice), so the stock galore_torch SVD is used as is.
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal(shape), jnp.float32)}
    mask = {"w": Matrix(0, 1)}
    grads = [{"w": _grad(rng, shape, Matrix(0, 1))}]
    ours, _ = _ours(params, grads, mask, HP)
    ref = _reference(params, grads, mask, HP)
    np.testing.assert_allclose(ours["w"], ref["w"], atol=1e-5, rtol=0)
    assert np.abs(np.asarray(ours["w"]) - np.asarray(params["w"])).max() > 1e-3  # it did move


def test_model_with_refresh_matches_galore_torch(monkeypatch):
    """A tiny model's stacked leaves (wq [L,D,N,H], wo [L,N,H,D], MLP; both projection sides), 3 steps with gap 2
    (refreshes at steps 0 and 2), GaLore on attention/MLP and AdamW on embeddings, norms and lm_head."""
    monkeypatch.setattr(torch.linalg, "svd", _canonical_svd(torch.linalg.svd))
    rng = np.random.default_rng(1)
    params = init_params(TINY, jax.random.key(0))
    mask = galore_mask_for(TINY)
    assert mask["layers"]["wo"] == Matrix(1, 2) and mask["embed"] is False and mask["lm_head"] is False
    grads = [jax.tree.map(lambda p, m: _grad(rng, p.shape, m), params, mask) for _ in range(3)]
    ours, projs = _ours(params, grads, mask, HP)
    ref = _reference(params, grads, mask, HP)
    for name, a, b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(name[0]))
    p0, p1, p2 = (np.asarray(p["layers"]["w_gate"]) for p in projs)
    assert np.array_equal(p0, p1) and not np.allclose(p1, p2)  # refreshed at step 2 only
    assert projs[0]["layers"]["w_gate"].shape == (2, 4, 16)  # torch (24, 16): P = Vh[:r]
    assert projs[0]["layers"]["w_down"].shape == (2, 16, 4)  # torch (16, 24): P = U[:, :r]


def test_non_galore_leaves_are_plain_adam():
    # With eps = 0 and no decay, galore_torch's Adam formula is ordinary bias-corrected Adam (optax.adam).
    rng = np.random.default_rng(2)
    params = {"norm": jnp.asarray(rng.standard_normal(8), jnp.float32),
              "embed": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)}
    ours_tx = galore_adamw(LR, galore_mask=False, **{**HP, "eps": 0.0, "weight_decay": 0.0})
    ref_tx = optax.adam(LR, b1=HP["b1"], b2=HP["b2"], eps=0.0)
    a, b, sa, sb = params, params, ours_tx.init(params), ref_tx.init(params)
    for _ in range(3):
        g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
        ua, sa = ours_tx.update(g, sa, a)
        ub, sb = ref_tx.update(g, sb, b)
        a, b = optax.apply_updates(a, ua), optax.apply_updates(b, ub)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=0), a, b)


def test_sharded_gradients_match_unsharded():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.standard_normal((2, 16, 24)), jnp.float32)}
    grads = {"w": jnp.asarray(_grad(rng, (2, 16, 24), Matrix(1, 1)))}
    tx = galore(4, 2, 0.25, galore_mask=True)
    state = tx.init(params)
    want, _ = jax.jit(tx.update)(grads, state)
    shard = NamedSharding(Mesh(np.array(jax.devices()[:2]), ("fsdp",)), P("fsdp"))
    got, new_state = jax.jit(tx.update)(jax.device_put(grads, shard), state)
    np.testing.assert_allclose(got["w"], want["w"], atol=1e-6)
    assert new_state.proj["w"].shape == (2, 4, 16)


QWEN25_7B = ModelConfig(family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, qkv_bias=True)


def test_memory_qwen25_7b_rank128():
    params = abstract_params(QWEN25_7B)  # ShapeDtypeStructs only: nothing is allocated
    mask = galore_mask_for(QWEN25_7B)
    gal = galore_adamw(1e-3, rank=128, galore_mask=mask)
    adamw = optax.adamw(1e-3)
    total_adamw, total_galore = optimizer_state_bytes(params, adamw), optimizer_state_bytes(params, gal)
    matrices = {"layers": {k: v for k, v in params["layers"].items() if isinstance(mask["layers"][k], Matrix)}}
    mat_mask = {"layers": {k: mask["layers"][k] for k in matrices["layers"]}}
    mat_adamw = optimizer_state_bytes(matrices, adamw)
    mat_galore = optimizer_state_bytes(matrices, galore_adamw(1e-3, rank=128, galore_mask=mat_mask))
    print(f"\nQwen2.5-7B optimizer state, f32: AdamW {total_adamw / 2**30:.2f} GiB, GaLore r128 "
          f"{total_galore / 2**30:.2f} GiB ({1 - total_galore / total_adamw:.1%} less); attention+MLP matrices: "
          f"{mat_adamw / 2**30:.2f} -> {mat_galore / 2**30:.2f} GiB ({1 - mat_galore / mat_adamw:.1%} less)")
    assert mat_galore <= 0.3 * mat_adamw
    assert total_galore <= 0.3 * total_adamw
    # 8 m n bytes per m x n (m >= n) matrix for AdamW; GaLore keeps 8 m r + 4 r n (moments + projector).
    m, n, r, layers = 18944, 3584, 128, 28
    gate = optimizer_state_bytes({"w": jax.ShapeDtypeStruct((layers, n, m), jnp.float32)},
                                 galore_adamw(1e-3, rank=r, galore_mask={"w": Matrix(1, 1)}))
    assert gate == layers * (8 * m * r + 4 * r * n) + 2 * 4  # + the two int32 step counters


def test_bad_inputs():
    for rank in (0, -1, 2.5):
        with pytest.raises(ConfigError, match="galore_rank"):
            galore_adamw(1e-3, rank=rank, galore_mask=True)
    with pytest.raises(ConfigError, match="galore_update_proj_gap"):
        galore_adamw(1e-3, update_proj_gap=0, galore_mask=True)
    with pytest.raises(ConfigError, match="explicit"):  # 4-D leaf: which axes are the matrix is ambiguous
        galore(galore_mask=True).init({"wq": jnp.zeros((2, 16, 2, 8))})
    # rank > min(m, n) is clamped with a warning, as galore_torch's Vh[:r] / U[:, :r] slicing clamps.
    with pytest.warns(UserWarning, match="exceeds min"):
        state = galore(rank=64, galore_mask=True).init({"w": jnp.zeros((16, 24))})
    assert state.proj["w"].shape == (16, 16) and state.mu["w"].shape == (24, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        galore(rank=16, galore_mask=True).init({"w": jnp.zeros((16, 24))})  # rank == min(m, n): no warning
