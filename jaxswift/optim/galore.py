"""GaLore (Zhao et al., 2024) computed the way galore_torch's GaLoreAdamW computes it, for stacked per-layer params.

A GaLore leaf is read as a stack of torch-layout (out x in = m x n) matrices. At steps 0, gap, 2 gap, ... the
projector P is refreshed from the float32 SVD of the gradient: m >= n -> P = Vh[:r], R = G P^T; else P = U[:, :r],
R = P^T G, so P spans the smaller side and the Adam moments have R's low-rank shape. Adam runs on R with
galore_torch's formula (eps added to the uncorrected sqrt(v), bias correction folded into the step size); moments
are kept when P changes; the update goes back as scale * N P (or scale * P N). Weight decay is decoupled and, as in
galore_torch, applied after the update, to the updated weight. Unmasked leaves get the same AdamW in full rank.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxswift.errors import ConfigError
from jaxswift.models.spec import map_specs, param_specs

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Matrix:
    """How a leaf reads as stacked torch-layout matrices: `batch_dims` leading axes (layers), then `in_dims` input
    axes, then output axes. wq [L, D, N, H] is Matrix(1, 1): per layer an (N*H) x D matrix; wo [L, N, H, D] is
    Matrix(1, 2): per layer D x (N*H)."""

    batch_dims: int = 0
    in_dims: int = 1

    def split(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
        """(batch shape, m, n) with (m, n) torch's (out, in)."""
        b, i = self.batch_dims, self.in_dims
        return tuple(shape[:b]), math.prod(shape[b + i:]), math.prod(shape[b:b + i])


class GaloreState(NamedTuple):
    count: jax.Array  # steps taken (int32); galore_torch's state["step"]
    mu: optax.Updates  # first moment: R's shape for GaLore leaves, the leaf's shape otherwise (float32)
    nu: optax.Updates  # second moment, same shapes
    proj: optax.Updates  # P per GaLore leaf (float32); MaskedNode for the rest


MaskTree = Any  # bool | pytree of (bool | Matrix) | callable(params) -> such a pytree


def _check_args(rank, update_proj_gap):
    if not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"--galore_rank must be a positive integer, got {rank!r}")
    if not isinstance(update_proj_gap, int) or update_proj_gap <= 0:
        raise ConfigError(f"--galore_update_proj_gap must be a positive integer, got {update_proj_gap!r}")


def _resolve(mask: MaskTree, params) -> Any:
    """Per leaf: a Matrix (GaLore) or False (full-rank Adam). True means Matrix(0, 1) on a 2-D kernel [in, out] and
    Matrix(1, 1) on a stacked [L, in, out] one; higher ranks are ambiguous and need an explicit Matrix."""
    tree = mask(params) if callable(mask) else mask
    if isinstance(tree, (bool, Matrix)):
        tree = jax.tree.map(lambda _: tree, params)

    def one(path, m, x):
        name = jax.tree_util.keystr(path)
        if m is True:
            if x.ndim not in (2, 3):
                raise ConfigError(f"galore_mask{name}: a {x.ndim}-D leaf {x.shape} needs an explicit "
                                  "Matrix(batch_dims, in_dims) to say which axes are the matrix")
            m = Matrix(x.ndim - 2, 1)
        if m is False:
            return False
        if not isinstance(m, Matrix) or m.in_dims < 1 or m.batch_dims < 0 or m.batch_dims + m.in_dims >= x.ndim:
            raise ConfigError(f"galore_mask{name}: {m!r} does not fit a leaf of shape {x.shape}")
        return m

    return jax.tree_util.tree_map_with_path(one, tree, params)


def _low_rank_shapes(mat: Matrix, shape, rank):
    """(moment shape, projector shape): P spans the smaller of torch's (m, n)."""
    batch, m, n = mat.split(shape)
    r = min(rank, m, n)  # galore_torch's Vh[:r] / U[:, :r] slice clamps the same way
    return ((*batch, m, r), (*batch, r, n)) if m >= n else ((*batch, r, n), (*batch, m, r))


def _warn_clamped(layout, params, rank):
    def one(path, mat, x):
        if isinstance(mat, Matrix) and rank > min(mat.split(x.shape)[1:]):
            _, m, n = mat.split(x.shape)
            warnings.warn(f"--galore_rank {rank} exceeds min(m, n) = {min(m, n)} for params{jax.tree_util.keystr(path)}"
                          f" (torch shape {m} x {n}); using rank {min(m, n)}", stacklevel=4)
    jax.tree_util.tree_map_with_path(one, layout, params)


def _one_minus_pow(b, t):
    # 1 - b**t via expm1: float32 stays close to galore_torch's float64 (1 - 0.999 loses digits in float32).
    return 1.0 if b == 0 else -jnp.expm1(t * math.log(b))


def _adam_moments(x, mu, nu, b1, b2, eps, step_scale):
    """(bias-corrected Adam direction, new mu, new nu) for one (projected) gradient, as galore_torch's AdamW."""
    mu = b1 * mu + (1 - b1) * x
    nu = b2 * nu + (1 - b2) * x * x
    return mu / (jnp.sqrt(nu) + eps) * step_scale, mu, nu


def _to_torch(x, mat: Matrix):
    """[batch..., in..., out...] -> [batch..., m, n] (torch's (out, in))."""
    batch, m, n = mat.split(x.shape)
    return x.reshape(*batch, n, m).mT


def _canonical_sign(p, axis):
    # Singular vectors are defined up to sign, and moments carried across refreshes make GaLore sign-sensitive; fixing
    # the sign (largest-magnitude entry positive) makes results independent of the LAPACK / cuSOLVER build.
    idx = jnp.argmax(jnp.abs(p), axis=axis, keepdims=True)
    s = jnp.sign(jnp.take_along_axis(p, idx, axis=axis))
    return p * jnp.where(s == 0, 1, s)


def _projector(g, r):
    """galore_torch's get_orthogonal_matrix: right factor Vh[:r] when m >= n, else left factor U[:, :r]."""
    u, _, vh = jnp.linalg.svd(g, full_matrices=False)
    if g.shape[-2] >= g.shape[-1]:
        return _canonical_sign(vh[..., :r, :], axis=-1)
    return _canonical_sign(u[..., :, :r], axis=-2)


def _project(g, p):
    return g @ p.mT if g.shape[-2] >= g.shape[-1] else p.mT @ g


def _back(n, p, shape, mat: Matrix):
    """N P (right P, r x n) or P N (left P, m x r), back in the leaf's layout (scale not applied)."""
    _, m, nn = mat.split(shape)
    full = n @ p if m >= nn else p @ n
    return full.mT.reshape(shape)


def galore(rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25, *, b1: float = 0.9,
           b2: float = 0.999, eps: float = 1e-6, galore_mask: MaskTree = True) -> optax.GradientTransformation:
    """The GaLore-Adam direction: galore_torch's normalized Adam step, bias correction included, projected back and
    scaled; `galore_adamw` adds the learning rate and weight decay. Per leaf, galore_mask gives a Matrix (project),
    True (the default layout, see `_resolve`) or False (full-rank Adam)."""
    _check_args(rank, update_proj_gap)

    def init_fn(params):
        layout = _resolve(galore_mask, params)
        _warn_clamped(layout, params, rank)

        def moment(mat, x):
            return jnp.zeros(_low_rank_shapes(mat, x.shape, rank)[0] if isinstance(mat, Matrix) else x.shape, F32)

        def proj(mat, x):
            return jnp.zeros(_low_rank_shapes(mat, x.shape, rank)[1], F32) if isinstance(mat, Matrix) \
                else optax.MaskedNode()

        mu = jax.tree.map(moment, layout, params)
        return GaloreState(jnp.zeros([], jnp.int32), mu, jax.tree.map(jnp.zeros_like, mu),
                           jax.tree.map(proj, layout, params))

    def leaf_update(mat, g, mu, nu, p, refresh, step_scale):
        x = g.astype(F32)
        if isinstance(mat, Matrix):
            x = _to_torch(x, mat)
            r = min(rank, *x.shape[-2:])
            p = jax.lax.cond(refresh, lambda: _projector(x, r), lambda: p)
            x = _project(x, p)
        n, mu, nu = _adam_moments(x, mu, nu, b1, b2, eps, step_scale)
        if isinstance(mat, Matrix):
            n = scale * _back(n, p, g.shape, mat)
        return n.astype(g.dtype), mu, nu, p

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        layout = treedef.flatten_up_to(_resolve(galore_mask, updates))
        refresh = state.count % update_proj_gap == 0
        t = (state.count + 1).astype(F32)
        step_scale = jnp.sqrt(_one_minus_pow(b2, t)) / _one_minus_pow(b1, t)  # galore_torch's bias correction
        out = [leaf_update(mat, g, mu, nu, p, refresh, step_scale)
               for mat, g, mu, nu, p in zip(layout, leaves, treedef.flatten_up_to(state.mu),
                                            treedef.flatten_up_to(state.nu), treedef.flatten_up_to(state.proj))]
        new, mu, nu, proj = (treedef.unflatten(col) for col in zip(*out))
        return new, GaloreState(state.count + 1, mu, nu, proj)

    return optax.GradientTransformation(init_fn, update_fn)


def _lr_and_trailing_decay(learning_rate, weight_decay, decay_mask) -> optax.GradientTransformation:
    """-lr * u, then galore_torch's trailing decay: p <- p1 - lr * wd * p1 with p1 = p - lr * u."""

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        if not weight_decay:
            return jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates), \
                optax.ScaleByScheduleState(state.count + 1)
        if params is None:
            raise ValueError("galore_adamw with weight_decay needs params in update(updates, state, params)")
        mask = decay_mask(params) if callable(decay_mask) else decay_mask
        mask = jax.tree.map(lambda _: True, params) if mask is None else mask

        def one(u, p, decay):
            delta = -lr * u
            return (delta - lr * weight_decay * (p + delta) if decay else delta).astype(u.dtype)

        return jax.tree.map(one, updates, params, mask), optax.ScaleByScheduleState(state.count + 1)

    return optax.GradientTransformation(init_fn, update_fn)


def galore_adamw(learning_rate: float | optax.Schedule, *, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                 eps: float = 1e-6, galore_mask: MaskTree, decay_mask: MaskTree | None = None
                 ) -> optax.GradientTransformation:
    """GaLoreAdamW: GaLore on the leaves galore_mask marks (see `galore_mask_for`), full-rank AdamW on the rest.

    Defaults are galore_torch's. decay_mask (pytree or callable of bools; None = every leaf) mirrors its param groups.
    """
    return optax.chain(galore(rank, update_proj_gap, scale, b1=b1, b2=b2, eps=eps, galore_mask=galore_mask),
                       _lr_and_trailing_decay(learning_rate, weight_decay, decay_mask))


def galore_mask_for(cfg) -> dict:
    """The params tree of `cfg` with a Matrix on attention and MLP weights, False on embeddings, norms, biases and
    lm_head (what GaLore's recipes target). Derived from ParamSpec's fan_in_axes, which come right after `layers`."""
    def one(spec):
        if spec.logical_axes[0] != "layers" or spec.init != "normal":
            return False
        lead, n_in = spec.fan_in_axes[0], len(spec.fan_in_axes)  # MoE experts [L, E, D, F]: two leading axes
        assert spec.fan_in_axes == tuple(range(lead, lead + n_in)), spec
        if lead + n_in == len(spec.shape):  # no output axes: a vector per layer (qwen2_moe's shared-expert gate)
            return False
        return Matrix(lead, n_in)

    return map_specs(one, param_specs(cfg))


def optimizer_state_bytes(params_abstract, tx: optax.GradientTransformation) -> int:
    """Bytes of tx's state for params given as ShapeDtypeStructs; nothing is allocated."""
    state = jax.eval_shape(tx.init, params_abstract)
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
