"""Preference losses (DPO family, KTO, CPO/SimPO, ORPO, reward model) with TRL 1.16's formulas and inputs.

Every function takes per-example sequence log-probs (float32, shape [B]) and returns per-example losses: the train
step's loss is their mean, exactly as TRL takes `losses.mean()`. Rewards come back detached. Hyperparameters and
`loss_type` are Python values (static under `jit`); checks on them run once, at trace time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# Older TRL (and ms-swift) called TRL 1.16's `aot_unpaired` `aot_pair`.
_DPO_ALIASES = {"aot_pair": "aot_unpaired"}
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The f-DPO reparameterization only cancels log Z(x) in the chosen-rejected difference (TRL's rule).
_F_DIVERGENCE_LOSS_TYPES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
_USES_LABEL_SMOOTHING = {"robust", "exo_pair", "aot", "aot_unpaired"}
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")


def _f32(*xs):
    return [None if x is None else jnp.asarray(x, jnp.float32) for x in xs]


def _same_shape(**arrays):
    shapes = {k: tuple(v.shape) for k, v in arrays.items() if v is not None}
    if len(set(shapes.values())) > 1 or any(len(s) != 1 for s in shapes.values()):
        raise ValueError(f"expected 1-D per-example log-probs of one shape [B], got {shapes}")


def check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")


def check_beta(beta):
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def check_label_smoothing(label_smoothing, loss_types, users):
    if label_smoothing and not set(loss_types) & users:
        # TRL ignores it (1.16 DPO silently; CPO with a warning); a value nobody reads is a config mistake.
        raise ValueError(f"label_smoothing={label_smoothing} is not used by loss_type {list(loss_types)}; "
                         f"only {sorted(users)} use it (TRL >= 0.29 no longer smooths 'sigmoid': use 'robust')")
    if "exo_pair" in loss_types and not 0.0 < label_smoothing < 1.0:  # EXO takes log(eps) and log(1 - eps)
        raise ValueError(f"label_smoothing must lie in (0, 1) for exo_pair (EXO suggests 1e-3), got {label_smoothing}")
    if set(loss_types) & users - {"exo_pair"} and not 0.0 <= label_smoothing < 0.5:  # a flip rate; 0.5 divides by zero
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")


# ----------------------------------------------------------------------------------------------------------- DPO


class _Pair(NamedTuple):
    """What the DPO loss types read; names follow TRL's `_compute_loss`."""

    beta: float
    chosen_logps: jax.Array
    rejected_logps: jax.Array
    ref_chosen_logps: jax.Array
    ref_rejected_logps: jax.Array
    chosen_logratios: jax.Array
    rejected_logratios: jax.Array
    chosen_scores: jax.Array  # f'(ratio): the log-ratios unless an f-divergence is chosen
    rejected_scores: jax.Array
    label_smoothing: float
    discopop_tau: float
    chosen_lengths: jax.Array | None
    rejected_lengths: jax.Array | None
    chosen_nll: jax.Array | None


def _smoothed_logistic(z, eps):
    return -jax.nn.log_sigmoid(z) * (1 - eps) - jax.nn.log_sigmoid(-z) * eps


def _length_normalized_delta(p: _Pair):
    if p.chosen_lengths is None or p.rejected_lengths is None:
        raise ValueError("loss_type 'ipo' and 'sigmoid_norm' average per token: pass chosen_lengths and "
                         "rejected_lengths (completion token counts, as TRL's completion_mask sums)")
    chosen = p.chosen_scores / jnp.maximum(p.chosen_lengths, 1.0)
    return chosen - p.rejected_scores / jnp.maximum(p.rejected_lengths, 1.0)


def _exo_pair(p: _Pair):
    z = p.beta * (p.chosen_scores - p.rejected_scores)
    eps = p.label_smoothing
    return (jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - math.log1p(-eps))
            + jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - math.log(eps)))


def _discopop(p: _Pair):
    z = p.beta * (p.chosen_scores - p.rejected_scores)
    mix = jax.nn.sigmoid(z / p.discopop_tau)
    return -jax.nn.log_sigmoid(z) * (1 - mix) + jnp.exp(-z) * mix


def _sft(p: _Pair):
    if p.chosen_nll is None:
        raise ValueError("loss_type 'sft' and rpo_alpha need chosen_nll (mean NLL of the chosen completion tokens)")
    return jnp.broadcast_to(p.chosen_nll, p.chosen_logps.shape)


def _aot(p: _Pair):
    # Sorting pairs each batch quantile with its reference quantile; entry i is no longer example i.
    delta = jnp.sort(p.chosen_logps - p.rejected_logps) - jnp.sort(p.ref_chosen_logps - p.ref_rejected_logps)
    return _smoothed_logistic(p.beta * delta, p.label_smoothing)


def _aot_unpaired(p: _Pair):
    delta = jnp.sort(p.chosen_logratios) - jnp.sort(p.rejected_logratios)
    return _smoothed_logistic(p.beta * delta, p.label_smoothing)


def _robust(p: _Pair):
    z, eps = p.beta * (p.chosen_scores - p.rejected_scores), p.label_smoothing
    return (-(1 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1 - 2 * eps)


_DPO_TERMS = {
    "sigmoid": lambda p: -jax.nn.log_sigmoid(p.beta * (p.chosen_scores - p.rejected_scores)),
    "hinge": lambda p: jax.nn.relu(1 - p.beta * (p.chosen_scores - p.rejected_scores)),
    "ipo": lambda p: (_length_normalized_delta(p) - 1 / (2 * p.beta)) ** 2,
    "exo_pair": _exo_pair,
    "nca_pair": lambda p: (-jax.nn.log_sigmoid(p.beta * p.chosen_logratios)
                           - 0.5 * jax.nn.log_sigmoid(-p.beta * p.chosen_logratios)
                           - 0.5 * jax.nn.log_sigmoid(-p.beta * p.rejected_logratios)),
    "robust": _robust,
    "bco_pair": lambda p: (-jax.nn.log_sigmoid(p.beta * p.chosen_logratios)
                           - jax.nn.log_sigmoid(-p.beta * p.rejected_logratios)),
    "sppo_hard": lambda p: (p.chosen_logratios - 0.5 / p.beta) ** 2 + (p.rejected_logratios + 0.5 / p.beta) ** 2,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": lambda p: (1 - jax.nn.sigmoid(p.beta * p.chosen_logratios)
                           + jax.nn.sigmoid(p.beta * p.rejected_logratios)),
    "apo_down": lambda p: (jax.nn.sigmoid(p.beta * p.chosen_logratios)
                           + 1 - jax.nn.sigmoid(p.beta * (p.chosen_logratios - p.rejected_logratios))),
    "discopop": _discopop,
    "sft": _sft,
    "sigmoid_norm": lambda p: -jax.nn.log_sigmoid(p.beta * _length_normalized_delta(p)),
}


def _f_scores(logratios, f_divergence_type, coef):
    """f'(pi/pi_ref) of the f-DPO paper, as TRL computes it (the alpha case clamps the exponent at 80)."""
    if f_divergence_type == "forward_kl":
        return 1 - jnp.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + jax.nn.log_sigmoid(logratios)
    if f_divergence_type == "alpha_divergence" and abs(coef - 1.0) >= 1e-6:
        return (jnp.exp(jnp.minimum((coef - 1.0) * logratios, 80.0)) - 1.0) / (coef - 1.0)
    return logratios  # reverse_kl, and alpha -> 1


def dpo_plan(loss_type, loss_weights, rpo_alpha, f_divergence_type, label_smoothing, beta):
    """Validated [(loss type, weight)], with rpo_alpha as an extra 'sft' term."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    types = [_DPO_ALIASES.get(t, t) for t in types]
    for t in types:
        check_choice("DPO loss_type", t, DPO_LOSS_TYPES + tuple(_DPO_ALIASES))
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(types)} loss types {types}")
    check_choice("f_divergence_type", f_divergence_type, F_DIVERGENCES)
    if f_divergence_type != "reverse_kl" and not set(types) <= _F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(f"f_divergence_type={f_divergence_type!r} only works with loss types "
                         f"{sorted(_F_DIVERGENCE_LOSS_TYPES)}, got {types}")
    check_beta(beta)
    check_label_smoothing(label_smoothing, types, _USES_LABEL_SMOOTHING)
    plan = list(zip(types, weights))
    return plan + [("sft", rpo_alpha)] if rpo_alpha else plan


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
             loss_type: str | Sequence[str] = "sigmoid", loss_weights: Sequence[float] | None = None,
             label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None, chosen_nll=None, rpo_alpha=None,
             discopop_tau=0.05, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, weights=None):
    """DPO and its variants as TRL 1.16's DPOTrainer: -> (losses [B], chosen_rewards [B], rejected_rewards [B]).

    Log-probs are summed over completion tokens (`ld_logps` gives LD-DPO's weighted sums). `loss_type` is one name
    or a list combined with `loss_weights` (MPO: e.g. ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]); losses are
    sum_k weight_k * term_k per example. Extra inputs, as TRL reads them:
      - ipo, sigmoid_norm: `chosen_lengths` / `rejected_lengths`, completion token counts (clamped to >= 1); the
        summed scores are divided by them (TRL's per-token average).
      - sft: `chosen_nll`, the mean NLL over all chosen completion tokens of the batch (a scalar, broadcast).
      - robust (label flip rate in [0, 0.5)), exo_pair (EXO's epsilon, > 0), aot, aot_unpaired: `label_smoothing`.
        1.16's `sigmoid` ignores label smoothing (TRL <= 0.28 smoothed it); here a value no type reads is an error.
      - discopop: `discopop_tau`. bco_pair has no running-mean shift in 1.16 (older TRL subtracted one).
      - aot, aot_unpaired sort the batch: per-example entries are quantiles, only their mean is meaningful.
    `rpo_alpha` (RPO, kept from TRL < 1.0 and ms-swift) adds rpo_alpha * chosen_nll: the same as appending "sft"
    with weight rpo_alpha. `weights` ([B], WPO, see `wpo_weights`) multiply every term. Rewards are
    beta * (policy - reference) log-ratios, detached, whatever the loss type.
    """
    plan = dpo_plan(loss_type, loss_weights, rpo_alpha, f_divergence_type, label_smoothing, beta)
    pc, pr, rc, rr, cl, rl, nll, w = _f32(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                          ref_rejected_logps, chosen_lengths, rejected_lengths, chosen_nll, weights)
    _same_shape(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr,
                chosen_lengths=cl, rejected_lengths=rl, weights=w)
    clr, rlr = pc - rc, pr - rr
    p = _Pair(beta, pc, pr, rc, rr, clr, rlr, _f_scores(clr, f_divergence_type, f_alpha_divergence_coef),
              _f_scores(rlr, f_divergence_type, f_alpha_divergence_coef), label_smoothing, discopop_tau, cl, rl, nll)
    losses = sum(weight * _DPO_TERMS[t](p) for t, weight in plan)
    if w is not None:
        if {"aot", "aot_unpaired"} & {t for t, _ in plan}:
            raise ValueError("WPO weights cannot go with 'aot'/'aot_unpaired': they sort the batch (TRL refuses too)")
        losses = losses * jax.lax.stop_gradient(w)
    return losses, jax.lax.stop_gradient(beta * clr), jax.lax.stop_gradient(beta * rlr)


def ld_logps(chosen_token_logps, chosen_mask, rejected_token_logps, rejected_mask, ld_alpha):
    """LD-DPO sequence log-probs ([B, T] each -> two [B]): tokens past the shorter completion count ld_alpha times.

    Apply to policy and reference alike (TRL's `ld_alpha`); ld_alpha = 1 gives plain sums.
    """
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must lie in [0, 1], got {ld_alpha}")
    masks = [jnp.asarray(m, jnp.float32) for m in (chosen_mask, rejected_mask)]
    shared = jnp.minimum(masks[0].sum(-1), masks[1].sum(-1))[:, None]

    def one(tok, mask):
        pos = jnp.cumsum(mask, axis=-1)
        tok = jnp.asarray(tok, jnp.float32) * mask
        return jnp.sum(tok * (pos <= shared), -1) + ld_alpha * jnp.sum(tok * (pos > shared), -1)

    return one(chosen_token_logps, masks[0]), one(rejected_token_logps, masks[1])


def wpo_weights(chosen_token_logps, chosen_log_sum_sq_probs, chosen_mask, rejected_token_logps,
                rejected_log_sum_sq_probs, rejected_mask):
    """WPO pair weights (TRL's `use_weighting`): exp(mean aligned log-prob) of chosen times that of rejected.

    `*_log_sum_sq_probs` are log sum_v p_v^2 per token (the policy's own sampling distribution); detached.
    """

    def one(tok, lssp, mask):
        mask = jnp.asarray(mask, jnp.float32)
        aligned = (jnp.asarray(tok, jnp.float32) - jnp.asarray(lssp, jnp.float32)) * mask
        return jnp.exp(aligned.sum(-1) / jnp.maximum(mask.sum(-1), 1.0))

    weights = one(chosen_token_logps, chosen_log_sum_sq_probs, chosen_mask)
    return jax.lax.stop_gradient(weights * one(rejected_token_logps, rejected_log_sum_sq_probs, rejected_mask))


# ----------------------------------------------------------------------------------------------------------- KTO


def kto_loss(policy_chosen_logps, policy_rejected_logps, policy_kl_logps, ref_chosen_logps, ref_rejected_logps,
             ref_kl_logps, *, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto"):
    """KTO as TRL 1.16's KTOTrainer: -> (losses [Bc + Br], chosen_rewards [Bc], rejected_rewards [Br], kl []).

    A KTO batch holds Bc desirable and Br undesirable examples (either may be empty). The KL reference point
    z = max(0, mean(policy_kl_logps - ref_kl_logps)) is taken over the whole batch's mismatched pairs (prompt i with
    completion i-1) and is detached (TRL computes the policy KL log-probs under no_grad). Losses are
    desirable_weight * (1 - sigmoid(beta (r - z))) then undesirable_weight * (1 - sigmoid(beta (z - r))); the
    train loss is their mean. `apo_zero_unpaired` uses no KL: pass None for both KL arrays (kl comes back 0).
    """
    check_choice("KTO loss_type", loss_type, KTO_LOSS_TYPES)
    check_beta(beta)
    pc, pr, pk, rc, rr, rk = _f32(policy_chosen_logps, policy_rejected_logps, policy_kl_logps, ref_chosen_logps,
                                  ref_rejected_logps, ref_kl_logps)
    _same_shape(policy_chosen_logps=pc, ref_chosen_logps=rc)
    _same_shape(policy_rejected_logps=pr, ref_rejected_logps=rr)
    if loss_type == "kto":
        if pk is None or rk is None:
            raise ValueError("loss_type 'kto' needs policy_kl_logps and ref_kl_logps (the mismatched KL pairs)")
        _same_shape(policy_kl_logps=pk, ref_kl_logps=rk)
        kl = jax.lax.stop_gradient(jnp.maximum(jnp.mean(pk - rk), 0.0))
        chosen = 1 - jax.nn.sigmoid(beta * (pc - rc - kl))
        rejected = 1 - jax.nn.sigmoid(beta * (kl - (pr - rr)))
    else:
        kl = jnp.zeros((), jnp.float32)
        chosen = 1 - jax.nn.sigmoid(beta * (pc - rc))
        rejected = jax.nn.sigmoid(beta * (pr - rr))
    losses = jnp.concatenate([desirable_weight * chosen, undesirable_weight * rejected])
    return losses, jax.lax.stop_gradient(beta * (pc - rc)), jax.lax.stop_gradient(beta * (pr - rr)), kl


# ------------------------------------------------------------------------------------------------------ CPO, ORPO


def cpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta=0.1, label_smoothing=0.0, loss_type="sigmoid",
             simpo_gamma=0.5, alpha=0.0, cpo_alpha=1.0, chosen_nll=None):
    """CPO / SimPO / AlphaPO as TRL's CPOTrainer (trl.experimental.cpo): -> (losses, chosen_rewards, rejected_rewards).

    No reference model. Inputs are what TRL's forward produces: summed completion log-probs for sigmoid/hinge, the
    per-token MEAN for ipo and simpo (and alphapo). simpo subtracts gamma/beta from the margin (label smoothing
    still applies, hinge and ipo reject it). `alpha` != 0 (AlphaPO) replaces log p by (1 - p^-alpha) / alpha in the
    margin and the rewards. `cpo_alpha` (TRL default 1.0) adds cpo_alpha * chosen_nll, the mean token NLL of the
    chosen completions (a scalar, broadcast), to every example. loss_type "alphapo" is TRL's config shorthand for
    simpo with cpo_alpha 0 (and, like TRL, it overrides the cpo_alpha given).
    """
    check_choice("CPO loss_type", loss_type, CPO_LOSS_TYPES)
    if loss_type == "alphapo":
        loss_type, cpo_alpha = "simpo", 0.0
    check_beta(beta)
    check_label_smoothing(label_smoothing, [loss_type], {"sigmoid", "simpo"})
    pc, pr, nll = _f32(policy_chosen_logps, policy_rejected_logps, chosen_nll)
    _same_shape(policy_chosen_logps=pc, policy_rejected_logps=pr)
    if alpha != 0.0:
        pc, pr = (1 - jnp.exp(-alpha * pc)) / alpha, (1 - jnp.exp(-alpha * pr)) / alpha
    margin = pc - pr - (simpo_gamma / beta if loss_type == "simpo" else 0.0)
    if loss_type in ("sigmoid", "simpo"):
        losses = _smoothed_logistic(beta * margin, label_smoothing)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * margin)
    else:  # ipo
        losses = (margin - 1 / (2 * beta)) ** 2
    if cpo_alpha:
        if nll is None:
            raise ValueError(f"cpo_alpha={cpo_alpha} adds cpo_alpha * NLL(chosen): pass chosen_nll, or cpo_alpha=0")
        losses = losses + cpo_alpha * nll
    return losses, jax.lax.stop_gradient(beta * pc), jax.lax.stop_gradient(beta * pr)


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, branching at -ln 2 like TRL to avoid cancellation."""
    return jnp.where(x < -math.log(2), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta=0.1):
    """ORPO's odds-ratio term as TRL's ORPOTrainer.odds_ratio_loss (trl.experimental.orpo).

    -> (losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen). Inputs are per-token MEAN
    completion log-probs (< 0). losses = -beta * log sigmoid(log_odds) is the part to MINIMIZE; TRL returns its
    negation and the trainer subtracts it. The trainer adds the chosen NLL itself: total = nll + mean(losses), where
    TRL's NLL is the token-mean cross-entropy of the whole chosen sequence, prompt included. The two scalars are
    TRL's logged values under TRL's names: log_odds_ratio = mean(log sigmoid(log_odds)), log_odds_chosen =
    mean(log_odds).
    """
    check_beta(beta)
    pc, pr = _f32(policy_chosen_logps, policy_rejected_logps)
    _same_shape(policy_chosen_logps=pc, policy_rejected_logps=pr)
    log_odds = (pc - pr) - (_log1mexp(pc) - _log1mexp(pr))
    ratio = jax.nn.log_sigmoid(log_odds)
    sg = jax.lax.stop_gradient
    return -beta * ratio, sg(beta * pc), sg(beta * pr), sg(jnp.mean(ratio)), sg(jnp.mean(log_odds))


# ----------------------------------------------------------------------------------------------- reward, metrics


def reward_model_loss(chosen_rewards, rejected_rewards, *, margin=None, center_rewards_coefficient=None):
    """Bradley-Terry loss as TRL's RewardTrainer: -log sigmoid(r_c - r_r - margin) per pair.

    `center_rewards_coefficient` adds coef * (r_c + r_r)^2 per pair (TRL adds coef * its batch mean), keeping
    rewards centred on zero.
    """
    rc, rr, m = _f32(chosen_rewards, rejected_rewards, margin)
    _same_shape(chosen_rewards=rc, rejected_rewards=rr, margin=m)
    losses = -jax.nn.log_sigmoid(rc - rr - (0.0 if m is None else m))
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (rc + rr) ** 2
    return losses


def preference_metrics(chosen_rewards, rejected_rewards) -> dict[str, jax.Array]:
    """TRL's logged reward metrics: batch means of the rewards, of chosen > rejected, and of the margin."""
    rc, rr = _f32(chosen_rewards, rejected_rewards)
    return {"rewards/chosen": jnp.mean(rc), "rewards/rejected": jnp.mean(rr),
            "rewards/accuracies": jnp.mean((rc > rr).astype(jnp.float32)), "rewards/margins": jnp.mean(rc - rr)}
