"""Preference losses vs TRL 1.16's own code, run here on the same numbers (loss, per-example losses, gradients).

TRL 1.16 computes DPO and KTO inside `_compute_loss(model, inputs)`, with no inner function that takes log-probs, so
those are called on a stub model whose forward returns our per-token log-probs (`precompute_ref_logps` supplies the
reference). CPO and ORPO (`trl.experimental`) and the reward model run their own loss/metrics methods on a
SimpleNamespace `self`. No loss is transcribed: every expected value comes from TRL.

Log-probs are multiples of 1/256, so float32 sums are exact in both frameworks and the 1e-6 tolerance only measures
the loss formulas. Label smoothing follows 1.16: `sigmoid` ignores it (TRL <= 0.28 smoothed it); cDPO is `robust`.
"""

from __future__ import annotations

import functools
import warnings
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import trl
from packaging.version import Version

assert Version(trl.__version__) >= Version("1.16"), f"parity targets TRL 1.16's loss code, found {trl.__version__}"

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl import DPOTrainer, KTOTrainer, RewardTrainer
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

from jaxswift.losses.preference import (  # noqa: E402
    cpo_loss, dpo_loss, kto_loss, ld_logps, orpo_loss, preference_metrics, reward_model_loss, wpo_weights)

B, T = 6, 10  # pairs, padded sequence length (prompt + completion)
TOL = dict(rtol=1e-6, atol=1e-6)


def _grid(rng, low, high, size):
    """Uniform values on a 1/256 grid: exact in float32, and so are their sums."""
    return rng.integers(int(low * 256), int(high * 256) + 1, size=size) / 256.0


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
                           unwrap_model=lambda m: m)


def _trainer_self(**attrs):
    base = dict(accelerator=_accelerator(), aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
                _total_train_tokens=0, _tp_size=1, precompute_ref_logps=True, ref_model=None,
                model=SimpleNamespace(training=True))
    return SimpleNamespace(**{**base, **attrs})


class _StubModel:
    """Stands in for the fused-LM-head forward: returns fixed per-token log-probs (0 where labels are -100)."""

    def __init__(self, by_width):
        self.by_width = by_width  # input width -> outputs, so KTO's KL batch gets its own

    def __call__(self, input_ids=None, **_):
        return self.by_width[input_ids.shape[1]]


def _outputs(log_probs, log_sum_sq_probs=None):
    zeros = torch.zeros_like(log_probs).detach()
    return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                           log_sum_sq_probs=log_sum_sq_probs, aux_loss=None)


def _completion_mask(rng, n):
    """[n, T]: a prompt of 1-3 tokens, then a completion of 1..rest tokens, then padding."""
    mask = np.zeros((n, T))
    for i in range(n):
        start = rng.integers(1, 4)
        mask[i, start:start + rng.integers(1, T - start + 1)] = 1
    return mask


def _dpo_data(seed):
    rng = np.random.default_rng(seed)
    mask = _completion_mask(rng, 2 * B)
    return dict(mask=mask, tok=_grid(rng, -3, 0, (2 * B, T - 1)) * mask[:, 1:], lssp=_grid(rng, -2, 0, (2 * B, T - 1)),
                ref=(_grid(rng, -3, 0, (2 * B, T - 1)) * mask[:, 1:]).sum(-1))


# ----------------------------------------------------------------------------------------------------------- DPO


def _trl_dpo(data, rows, cfg):
    """DPOTrainer._compute_loss on the pairs `rows` -> (loss, grad wrt per-token log-probs, logged metrics)."""
    idx = np.concatenate([rows, rows + B])
    smask = torch.tensor(data["mask"][idx, 1:], dtype=torch.float32)
    tok = torch.tensor(data["tok"][idx], dtype=torch.float32, requires_grad=True)
    lssp = torch.tensor(data["lssp"][idx], dtype=torch.float32)
    ref = torch.tensor(data["ref"][idx], dtype=torch.float32)
    loss_types = cfg["loss_type"] if isinstance(cfg["loss_type"], list) else [cfg["loss_type"]]
    self = _trainer_self(
        beta=cfg.get("beta", 0.1), loss_types=loss_types,
        loss_weights=cfg.get("loss_weights") or [1.0] * len(loss_types),
        label_smoothing=cfg.get("label_smoothing", 0.0), ld_alpha=cfg.get("ld_alpha"),
        f_divergence_type=cfg.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=cfg.get("f_alpha_divergence_coef", 0.5), use_weighting=cfg.get("use_weighting", False),
        args=SimpleNamespace(discopop_tau=cfg.get("discopop_tau", 0.05), gradient_checkpointing_kwargs=None))
    n = len(rows)
    inputs = dict(input_ids=torch.zeros(2 * n, T, dtype=torch.long), attention_mask=torch.ones(2 * n, T),
                  completion_mask=torch.tensor(data["mask"][idx], dtype=torch.long),
                  ref_chosen_logps=ref[:n], ref_rejected_logps=ref[n:])
    model = _StubModel({T: _outputs(tok * smask, lssp)})
    loss = DPOTrainer._compute_loss(self, model, inputs, return_outputs=False)
    loss.backward()
    return loss.item(), tok.grad.numpy(), {k: v[-1] for k, v in self._metrics["train"].items()}


def _ours_dpo(data, cfg):
    """Our dpo_loss fed the way a train step would feed it -> (mean loss, per-example, grad, metrics)."""
    smask = jnp.asarray(data["mask"][:, 1:], jnp.float32)
    ref = jnp.asarray(data["ref"], jnp.float32)
    lengths = jnp.asarray(data["mask"].sum(-1), jnp.float32)
    kw = dict(cfg)
    ld_alpha, use_weighting = kw.pop("ld_alpha", None), kw.pop("use_weighting", False)  # token-level options

    def mean_loss(tok):
        tok = tok * smask
        if ld_alpha is None:
            chosen, rejected = tok[:B].sum(-1), tok[B:].sum(-1)
        else:
            chosen, rejected = ld_logps(tok[:B], smask[:B], tok[B:], smask[B:], ld_alpha)
        weights = None
        if use_weighting:
            lssp = jnp.asarray(data["lssp"], jnp.float32)
            weights = wpo_weights(tok[:B], lssp[:B], smask[:B], tok[B:], lssp[B:], smask[B:])
        losses, cr, rr = dpo_loss(chosen, rejected, ref[:B], ref[B:], chosen_lengths=lengths[:B],
                                  rejected_lengths=lengths[B:], chosen_nll=-tok[:B].sum() / smask[:B].sum(),
                                  weights=weights, **kw)
        return losses.mean(), (losses, cr, rr)

    (loss, (losses, cr, rr)), grad = jax.value_and_grad(mean_loss, has_aux=True)(jnp.asarray(data["tok"], jnp.float32))
    return float(loss), np.asarray(losses), np.asarray(grad), preference_metrics(cr, rr)


DPO_CASES = {
    "sigmoid": dict(loss_type="sigmoid"),
    "hinge": dict(loss_type="hinge", beta=0.5),  # beta 0.5 puts pairs on both sides of the hinge
    "ipo": dict(loss_type="ipo"),
    "exo_pair": dict(loss_type="exo_pair", label_smoothing=1e-3),
    "nca_pair": dict(loss_type="nca_pair"),
    "robust": dict(loss_type="robust", label_smoothing=0.1),
    "bco_pair": dict(loss_type="bco_pair"),
    "sppo_hard": dict(loss_type="sppo_hard"),
    "aot": dict(loss_type="aot", label_smoothing=0.1),
    "aot_unpaired": dict(loss_type="aot_unpaired"),
    "apo_zero": dict(loss_type="apo_zero"),
    "apo_down": dict(loss_type="apo_down"),
    "discopop": dict(loss_type="discopop", beta=0.3),
    "sft": dict(loss_type="sft"),
    "sigmoid_norm": dict(loss_type="sigmoid_norm", beta=0.5),
    "mpo": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    "forward_kl": dict(loss_type="sigmoid", f_divergence_type="forward_kl"),
    "js_ipo": dict(loss_type="ipo", f_divergence_type="js_divergence"),
    "alpha_robust": dict(loss_type="robust", label_smoothing=0.2, f_divergence_type="alpha_divergence"),
    "alpha_1": dict(loss_type="hinge", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0),
    "ld_dpo": dict(loss_type="sigmoid", ld_alpha=0.3),
    "wpo": dict(loss_type=["apo_zero", "exo_pair"], label_smoothing=0.05, use_weighting=True),
}
_BATCH_COUPLED = ("aot", "aot_unpaired", "sft")  # sorting / a batch-mean NLL: per-pair runs would differ


@pytest.mark.parametrize("name", DPO_CASES)
def test_dpo_matches_trl(name):
    cfg, data = DPO_CASES[name], _dpo_data(seed=len(name))
    loss, losses, grad, metrics = _ours_dpo(data, cfg)
    trl_loss, trl_grad, trl_metrics = _trl_dpo(data, np.arange(B), cfg)
    np.testing.assert_allclose(loss, trl_loss, **TOL)
    np.testing.assert_allclose(grad, trl_grad, **TOL)
    for key, value in metrics.items():
        np.testing.assert_allclose(float(value), trl_metrics[key], **TOL)
    types = cfg["loss_type"] if isinstance(cfg["loss_type"], list) else [cfg["loss_type"]]
    if not set(types) & set(_BATCH_COUPLED):
        per_pair = [_trl_dpo(data, np.array([i]), cfg)[0] for i in range(B)]
        np.testing.assert_allclose(losses, per_pair, **TOL)


def test_rpo_alpha_is_sft_term_in_trl():
    # TRL 1.16 dropped `rpo_alpha`; its loss is loss_type ["sigmoid", "sft"] with weights [1, alpha].
    data = _dpo_data(seed=7)
    loss, _, grad, _ = _ours_dpo(data, dict(loss_type="sigmoid", rpo_alpha=0.5))
    trl_loss, trl_grad, _ = _trl_dpo(data, np.arange(B), dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]))
    np.testing.assert_allclose(loss, trl_loss, **TOL)
    np.testing.assert_allclose(grad, trl_grad, **TOL)


def test_dpo_jits_with_aliases():
    rng = np.random.default_rng(0)
    x = [jnp.asarray(_grid(rng, -20, -1, B), jnp.float32) for _ in range(4)]
    fn = functools.partial(dpo_loss, loss_type=["sigmoid", "aot_pair"], loss_weights=[1.0, 0.5], label_smoothing=0.1)
    eager = fn(*x)
    for a, b in zip(jax.jit(fn)(*x), eager):
        np.testing.assert_allclose(a, b, **TOL)
    unpaired = dpo_loss(*x, loss_type="aot_unpaired", label_smoothing=0.1)[0]
    sigmoid = dpo_loss(*x, loss_type="sigmoid")[0]
    np.testing.assert_allclose(eager[0], sigmoid + 0.5 * unpaired, **TOL)


# ----------------------------------------------------------------------------------------------------------- KTO


def _kto_data(seed):
    rng = np.random.default_rng(seed)
    mask = _completion_mask(rng, B)
    label = np.array([True, False, True, True, False, False])
    return dict(mask=mask, label=label, tok=_grid(rng, -3, 0, (B, T - 1)) * mask[:, 1:],
                ref=_grid(rng, -20, 0, B), kl=_grid(rng, -3, 0, (B, T)), ref_kl=_grid(rng, -25, 0, B))


def _trl_kto(data, cfg):
    smask = torch.tensor(data["mask"][:, 1:], dtype=torch.float32)
    tok = torch.tensor(data["tok"], dtype=torch.float32, requires_grad=True)
    calculate_kl = cfg["loss_type"] == "kto"
    self = _trainer_self(beta=cfg["beta"], loss_type=cfg["loss_type"], desirable_weight=cfg["desirable_weight"],
                         undesirable_weight=cfg["undesirable_weight"], calculate_KL=calculate_kl,
                         args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    self._compute_kl_logps = functools.partial(KTOTrainer._compute_kl_logps, self)
    f32 = functools.partial(torch.tensor, dtype=torch.float32)
    inputs = dict(input_ids=torch.zeros(B, T, dtype=torch.long), attention_mask=torch.ones(B, T),
                  completion_mask=torch.tensor(data["mask"], dtype=torch.long), label=torch.tensor(data["label"]),
                  ref_logps=f32(data["ref"]), ref_KL_logps=f32(data["ref_kl"]))
    if calculate_kl:  # the KL batch is one token wider, so the stub can tell it apart
        inputs |= dict(KL_input_ids=torch.zeros(B, T + 1, dtype=torch.long), KL_attention_mask=torch.ones(B, T + 1),
                       KL_completion_mask=torch.ones(B, T + 1, dtype=torch.long))
    model = _StubModel({T: _outputs(tok * smask), T + 1: _outputs(f32(data["kl"]))})
    loss = KTOTrainer._compute_loss(self, model, inputs, return_outputs=False)
    loss.backward()
    return loss.item(), tok.grad.numpy(), {k: v[-1] for k, v in self._metrics["train"].items()}


@pytest.mark.parametrize("cfg", [
    dict(loss_type="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.0),
    dict(loss_type="kto", beta=0.5, desirable_weight=1.33, undesirable_weight=0.7),
    dict(loss_type="apo_zero_unpaired", beta=0.2, desirable_weight=1.0, undesirable_weight=2.0),
], ids=["kto", "kto_weighted", "apo_zero_unpaired"])
def test_kto_matches_trl(cfg):
    data = _kto_data(seed=3)
    label, smask, ref = data["label"], jnp.asarray(data["mask"][:, 1:], jnp.float32), jnp.asarray(data["ref"])
    with_kl = cfg["loss_type"] == "kto"
    kl_logps = jnp.asarray(data["kl"], jnp.float32).sum(-1) if with_kl else None
    ref_kl = jnp.asarray(data["ref_kl"]) if with_kl else None

    def mean_loss(tok):
        logps = (tok * smask).sum(-1)
        out = kto_loss(logps[label], logps[~label], kl_logps, ref[label], ref[~label], ref_kl, **cfg)
        return out[0].mean(), out

    (loss, (_, cr, rr, kl)), grad = jax.value_and_grad(mean_loss, has_aux=True)(jnp.asarray(data["tok"], jnp.float32))
    trl_loss, trl_grad, trl_metrics = _trl_kto(data, cfg)
    np.testing.assert_allclose(loss, trl_loss, **TOL)
    np.testing.assert_allclose(grad, trl_grad, **TOL)
    np.testing.assert_allclose(kl, trl_metrics["kl"], **TOL)
    np.testing.assert_allclose(cr.mean(), trl_metrics["rewards/chosen"], **TOL)
    np.testing.assert_allclose(rr.mean(), trl_metrics["rewards/rejected"], **TOL)


def test_kto_kl_is_clamped_and_detached():
    args = [jnp.array([-5.0]), jnp.array([-6.0]), jnp.array([-9.0, -8.0]), jnp.array([-4.0]), jnp.array([-7.0]),
            jnp.array([-1.0, -2.0])]
    assert float(kto_loss(*args)[3]) == 0.0  # mean(policy - ref) KL < 0 -> 0
    grad = jax.grad(lambda kl: kto_loss(*args[:2], kl, *args[3:], beta=0.1)[0].mean())(jnp.array([3.0, 4.0]))
    assert not np.any(np.asarray(grad))


# ------------------------------------------------------------------------------------------------------ CPO, ORPO


def _pairs(seed, low, high):
    rng = np.random.default_rng(seed)
    return _grid(rng, low, high, B), _grid(rng, low, high, B), float(_grid(rng, 0.5, 3, 1)[0])


def _trl_pair_loss(trainer_cls, loss_fn_name, self, chosen, rejected, nll):
    """Run `loss_fn_name` and `get_batch_loss_metrics` with a stub forward -> (per-example out, loss, grads)."""
    c, r, n = (torch.tensor(v, dtype=torch.float32, requires_grad=True) for v in (chosen, rejected, nll))
    setattr(self, loss_fn_name, functools.partial(getattr(trainer_cls, loss_fn_name), self))
    self.concatenated_forward = lambda model, batch: (c, r, torch.zeros(B, 2, 3), torch.zeros(B, 2, 3), n)
    per_example = [t.detach().numpy() for t in getattr(self, loss_fn_name)(c, r)]
    loss, metrics = trainer_cls.get_batch_loss_metrics(self, None, None)
    loss.backward()
    return per_example, loss.item(), [t.grad.numpy() for t in (c, r, n)], metrics


def _ours_pair_loss(fn, chosen, rejected, nll, **kw):
    def mean_loss(c, r, n):
        out = fn(c, r, **kw) if fn is orpo_loss else fn(c, r, chosen_nll=n, **kw)
        total = out[0].mean() + (n if fn is orpo_loss else 0.0)  # ORPO's trainer adds the NLL itself
        return total, out

    args = [jnp.asarray(v, jnp.float32) for v in (chosen, rejected, nll)]
    (loss, out), grads = jax.value_and_grad(mean_loss, argnums=(0, 1, 2), has_aux=True)(*args)
    return [np.asarray(o) for o in out], float(loss), [np.asarray(g) for g in grads]


CPO_CASES = {
    "sigmoid": dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.1, cpo_alpha=1.0),
    "hinge": dict(loss_type="hinge", beta=0.5, cpo_alpha=0.5),
    "ipo": dict(loss_type="ipo", beta=0.1, cpo_alpha=0.0),
    "simpo": dict(loss_type="simpo", beta=2.5, simpo_gamma=1.375, cpo_alpha=0.0),
    "simpo_smoothed": dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, label_smoothing=0.2, cpo_alpha=0.3),
    "alphapo": dict(loss_type="alphapo", beta=2.5, simpo_gamma=0.5, alpha=0.25, cpo_alpha=1.0),
    "sigmoid_alpha": dict(loss_type="sigmoid", beta=0.1, alpha=-0.1, cpo_alpha=1.0),
}


@pytest.mark.parametrize("name", CPO_CASES)
def test_cpo_matches_trl(name):
    cfg = CPO_CASES[name]
    averaged = cfg["loss_type"] in ("ipo", "simpo", "alphapo")  # TRL's forward averages per token for these
    chosen, rejected, nll = _pairs(seed=len(name), low=-3 if averaged else -30, high=-0.1)
    with warnings.catch_warnings():  # TRL resolves "alphapo" in its config: take TRL's own resolution
        warnings.simplefilter("ignore")
        args = CPOConfig(output_dir="unused", report_to=[], use_cpu=True, bf16=False, **cfg)
    self = SimpleNamespace(beta=args.beta, label_smoothing=args.label_smoothing, loss_type=args.loss_type,
                           alpha=args.alpha, simpo_gamma=args.simpo_gamma, cpo_alpha=args.cpo_alpha,
                           accelerator=_accelerator(), aux_loss_enabled=False)
    (trl_losses, trl_cr, trl_rr), trl_loss, trl_grads, _ = _trl_pair_loss(
        CPOTrainer, "cpo_loss", self, chosen, rejected, nll)
    (losses, cr, rr), loss, grads = _ours_pair_loss(cpo_loss, chosen, rejected, nll, **cfg)
    np.testing.assert_allclose(losses, trl_losses + args.cpo_alpha * np.float32(nll), **TOL)
    np.testing.assert_allclose(cr, trl_cr, **TOL)
    np.testing.assert_allclose(rr, trl_rr, **TOL)
    np.testing.assert_allclose(loss, trl_loss, **TOL)
    for ours, theirs in zip(grads, trl_grads):
        np.testing.assert_allclose(ours, theirs, **TOL)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl(beta):
    # Means from -0.05 to -3 exercise both branches of log1mexp (split at -ln 2).
    chosen, rejected, nll = _pairs(seed=11, low=-3, high=-0.05)
    self = SimpleNamespace(beta=beta, accelerator=_accelerator(), aux_loss_enabled=False)
    (trl_losses, trl_cr, trl_rr, *_), trl_loss, trl_grads, metrics = _trl_pair_loss(
        ORPOTrainer, "odds_ratio_loss", self, chosen, rejected, nll)
    (losses, cr, rr, log_odds_ratio, log_odds_chosen), loss, grads = _ours_pair_loss(
        orpo_loss, chosen, rejected, nll, beta=beta)
    np.testing.assert_allclose(losses, -trl_losses, **TOL)  # TRL returns the term to maximize
    np.testing.assert_allclose(cr, trl_cr, **TOL)
    np.testing.assert_allclose(rr, trl_rr, **TOL)
    np.testing.assert_allclose(loss, trl_loss, **TOL)
    np.testing.assert_allclose(log_odds_ratio, metrics["log_odds_ratio"], **TOL)
    np.testing.assert_allclose(log_odds_chosen, metrics["log_odds_chosen"], **TOL)
    for ours, theirs in zip(grads, trl_grads):
        np.testing.assert_allclose(ours, theirs, **TOL)


# ------------------------------------------------------------------------------------------- reward model, metrics


@pytest.mark.parametrize("margin,coef", [(False, None), (True, None), (True, 0.01)])
def test_reward_model_loss_matches_trl(margin, coef):
    rng = np.random.default_rng(5)
    rc, rr, m = _grid(rng, -4, 4, B), _grid(rng, -4, 4, B), _grid(rng, 0, 2, B)
    tc, tr = (torch.tensor(v, dtype=torch.float32, requires_grad=True) for v in (rc, rr))
    inputs = dict(attention_mask=torch.ones(2 * B, 4))
    if margin:
        inputs["margin"] = torch.tensor(m, dtype=torch.float32)
    model = lambda **_: SimpleNamespace(logits=torch.cat([tc, tr])[:, None])  # noqa: E731
    self = _trainer_self(args=SimpleNamespace(center_rewards_coefficient=coef))
    trl_loss = RewardTrainer.compute_loss(self, model, inputs)
    trl_loss.backward()

    def mean_loss(c, r):
        return reward_model_loss(c, r, margin=m if margin else None, center_rewards_coefficient=coef).mean()

    loss, grads = jax.value_and_grad(mean_loss, argnums=(0, 1))(*(jnp.asarray(v, jnp.float32) for v in (rc, rr)))
    np.testing.assert_allclose(loss, trl_loss.item(), **TOL)
    np.testing.assert_allclose(grads[0], tc.grad.numpy(), **TOL)
    np.testing.assert_allclose(grads[1], tr.grad.numpy(), **TOL)
    metrics = preference_metrics(rc, rr)
    np.testing.assert_allclose(metrics["rewards/accuracies"], self._metrics["train"]["accuracy"][-1], **TOL)
    np.testing.assert_allclose(metrics["rewards/margins"], self._metrics["train"]["margin"][-1], **TOL)


# ------------------------------------------------------------------------------------------------------ bad input


def test_unknown_loss_type_names_the_allowed_ones():
    x = jnp.zeros(3)
    with pytest.raises(ValueError, match="unknown DPO loss_type 'dpo'.*'sigmoid'.*'sigmoid_norm'"):
        dpo_loss(x, x, x, x, loss_type="dpo")
    with pytest.raises(ValueError, match="unknown KTO loss_type 'bco'.*'kto', 'apo_zero_unpaired'"):
        kto_loss(x, x, x, x, x, x, loss_type="bco")
    with pytest.raises(ValueError, match="unknown CPO loss_type 'kto_pair'.*'simpo'"):
        cpo_loss(x, x, loss_type="kto_pair", chosen_nll=0.0)
    with pytest.raises(ValueError, match="unknown f_divergence_type"):
        dpo_loss(x, x, x, x, f_divergence_type="kl")


def test_bad_shapes_and_settings():
    x, y = jnp.zeros(3), jnp.zeros(4)
    cases = [
        (lambda: dpo_loss(x, y, x, x), "one shape"),
        (lambda: dpo_loss(x[:, None], x[:, None], x[:, None], x[:, None]), "1-D"),
        (lambda: kto_loss(x, x, x, y, x, x), "one shape"),
        (lambda: cpo_loss(x, y, chosen_nll=0.0), "one shape"),
        (lambda: orpo_loss(x, y), "one shape"),
        (lambda: reward_model_loss(x, x, margin=y), "one shape"),
        (lambda: dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5), r"\[0, 0.5\)"),
        (lambda: dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=-0.1), r"\[0, 0.5\)"),
        (lambda: dpo_loss(x, x, x, x, loss_type="exo_pair"), r"\(0, 1\)"),
        (lambda: dpo_loss(x, x, x, x, loss_type="sigmoid", label_smoothing=0.1), "not used by"),
        (lambda: cpo_loss(x, x, loss_type="hinge", label_smoothing=0.1, cpo_alpha=0.0), "not used by"),
        (lambda: dpo_loss(x, x, x, x, loss_type="ipo"), "chosen_lengths"),
        (lambda: dpo_loss(x, x, x, x, loss_type="sft"), "chosen_nll"),
        (lambda: dpo_loss(x, x, x, x, loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights"),
        (lambda: dpo_loss(x, x, x, x, loss_type="bco_pair", f_divergence_type="forward_kl"), "only works with"),
        (lambda: dpo_loss(x, x, x, x, beta=0.0), "beta"),
        (lambda: dpo_loss(x, x, x, x, loss_type="aot", weights=x), "sort"),
        (lambda: kto_loss(x, x, None, x, x, None), "KL"),
        (lambda: cpo_loss(x, x), "chosen_nll"),
        (lambda: ld_logps(x[None], x[None], x[None], x[None], 1.5), "ld_alpha"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            fn()
