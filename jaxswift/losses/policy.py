"""Policy-gradient losses (GRPO family) and group advantages, with TRL 1.16's GRPO formulas.

Per-token inputs are float32 [B, T] completion log-probs (policy, old policy, reference) and a [B, T] completion
mask; advantages are [B]. Loss types: grpo, bnpo, dr_grpo, dapo (PPO clip), cispo (clipped IS weight, detached),
sapo (soft gate). GSPO is `importance_sampling_level="sequence"`: one ratio per sequence, exp(mean_t log ratio).
The k3 KL to the reference is added per token as beta * KL. Hyperparameters are Python values (static under jit).

Aggregations are written as "sum of something / a denominator" so that a step split into micro-batches gives the
same loss as the whole batch: pass the whole step's `num_sequences` / `num_tokens` to every micro-batch.
  grpo, sapo:  sum_i (sum_t l m / sum_t m) / num_sequences        (mean over sequences of per-sequence means)
  bnpo:        sum l m / num_tokens                                (mean over the batch's completion tokens)
  dr_grpo:     sum l m / (num_sequences * max_completion_length)
  dapo, cispo: sum l m / num_tokens, num_tokens = completion tokens of the whole generation batch
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
IMPORTANCE_LEVELS = ("token", "sequence")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # advantages divide by (std + STD_EPS), as TRL


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    loss_type: str = "grpo"
    importance_sampling_level: str = "token"
    epsilon: float = 0.2  # lower clip: rho >= 1 - epsilon
    epsilon_high: float | None = None  # upper clip (default: epsilon; DAPO 0.28; CISPO's IS cap, about 5)
    delta: float | None = None  # two-sided clipping: rho capped at delta first (> 1 + epsilon_high)
    beta: float = 0.04  # weight of the k3 KL to the reference (0: no reference needed)
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    max_completion_length: int = 256  # dr_grpo's constant denominator

    def __post_init__(self):
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_LEVELS)
        if self.epsilon_high is None:
            object.__setattr__(self, "epsilon_high", self.epsilon)
        if not 0 <= self.epsilon < 1:
            raise ValueError(f"epsilon must lie in [0, 1), got {self.epsilon}")
        if self.epsilon_high < 0:
            raise ValueError(f"epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.delta is not None and not self.delta > 1 + self.epsilon_high:
            raise ValueError(f"delta must be > 1 + epsilon_high = {1 + self.epsilon_high}, got {self.delta}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if min(self.sapo_temperature_pos, self.sapo_temperature_neg) <= 0:
            raise ValueError("sapo temperatures must be > 0")
        if self.max_completion_length <= 0:
            raise ValueError(f"max_completion_length must be > 0, got {self.max_completion_length}")

    @property
    def epsilon_low(self) -> float:
        return self.epsilon


def check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {' | '.join(allowed)}")


# ------------------------------------------------------------------------------------------------- per-token terms


def log_importance_weights(logps_BT, old_logps_BT, mask_BT, level: str):
    """log rho: [B, T] per token, or [B, 1] per sequence (GSPO: the masked mean of the token log-ratios)."""
    log_ratio = logps_BT - old_logps_BT
    if level == "token":
        return log_ratio
    return (jnp.sum(log_ratio * mask_BT, -1) / jnp.maximum(jnp.sum(mask_BT, -1), 1.0))[:, None]


def k3_kl(logps_BT, ref_logps_BT):
    """exp(ref - logp) - (ref - logp) - 1 per token (Schulman's k3, >= 0)."""
    d = ref_logps_BT - logps_BT
    return jnp.exp(d) - d - 1.0


def _clipped_objective(rho, adv, cfg: PolicyLossConfig):
    clipped = jnp.clip(rho, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    if cfg.delta is not None:
        rho = jnp.minimum(rho, cfg.delta)
    return -jnp.minimum(rho * adv, clipped * adv)


def per_token_loss(logps_BT, old_logps_BT, ref_logps_BT, advantages_B, mask_BT, cfg: PolicyLossConfig):
    """(per-token loss [B, T], ratio [B, T] or [B, 1], KL [B, T] or None)."""
    logps_BT, old_logps_BT, mask_BT = (jnp.asarray(x, jnp.float32) for x in (logps_BT, old_logps_BT, mask_BT))
    adv = jnp.asarray(advantages_B, jnp.float32)[:, None]
    rho = jnp.exp(log_importance_weights(logps_BT, old_logps_BT, mask_BT, cfg.importance_sampling_level))
    if cfg.loss_type == "cispo":
        loss = -jax.lax.stop_gradient(jnp.minimum(rho, cfg.epsilon_high)) * adv * logps_BT
    elif cfg.loss_type == "sapo":
        tau = jnp.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        loss = -(4.0 / tau) * jax.nn.sigmoid(tau * (rho - 1.0)) * adv
    else:
        loss = _clipped_objective(rho, adv, cfg)
    loss = jnp.broadcast_to(loss, logps_BT.shape)
    kl = None
    if cfg.beta != 0.0:
        kl = k3_kl(logps_BT, jnp.asarray(ref_logps_BT, jnp.float32))
        loss = loss + cfg.beta * kl
    return loss, rho, kl


# ------------------------------------------------------------------------------------------------------ aggregation


def aggregate(loss_BT, mask_BT, cfg: PolicyLossConfig, *, num_sequences=None, num_tokens=None):
    """The scalar loss by loss type (module docstring); denominators default to this batch's own."""
    mask = jnp.asarray(mask_BT, jnp.float32)
    num_sequences = loss_BT.shape[0] if num_sequences is None else num_sequences
    num_tokens = jnp.sum(mask) if num_tokens is None else num_tokens
    if cfg.loss_type in ("grpo", "sapo"):
        per_seq = jnp.sum(loss_BT * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
        return jnp.sum(per_seq) / num_sequences
    if cfg.loss_type == "dr_grpo":
        return jnp.sum(loss_BT * mask) / (num_sequences * cfg.max_completion_length)
    return jnp.sum(loss_BT * mask) / jnp.maximum(num_tokens, 1.0)  # bnpo, dapo, cispo


def policy_loss(logps_BT, old_logps_BT, ref_logps_BT, advantages_B, mask_BT, cfg: PolicyLossConfig, *,
                num_sequences=None, num_tokens=None):
    """(scalar loss, metric sums): the loss of this (micro-)batch and masked token sums for clip ratios and KL."""
    loss_BT, rho, kl = per_token_loss(logps_BT, old_logps_BT, ref_logps_BT, advantages_B, mask_BT, cfg)
    loss = aggregate(loss_BT, mask_BT, cfg, num_sequences=num_sequences, num_tokens=num_tokens)
    return loss, clip_sums(rho, advantages_B, mask_BT, cfg, kl)


def clip_sums(rho, advantages_B, mask_BT, cfg: PolicyLossConfig, kl=None) -> dict:
    """Sums for TRL's metrics: clip flags summed over completion tokens (token level) or over sequences (sequence
    level), with that count as `clip_ratio/count`; the masked KL sum over tokens. Divide to get the means."""
    mask = jnp.asarray(mask_BT, jnp.float32)
    if cfg.importance_sampling_level == "sequence":
        mask = (jnp.sum(mask, -1, keepdims=True) > 0).astype(jnp.float32)
    rho = jax.lax.stop_gradient(rho)
    adv = jnp.asarray(advantages_B, jnp.float32)[:, None]
    if cfg.loss_type == "cispo":
        flags = {"clip_ratio/cispo": (rho > cfg.epsilon_high) & (adv > 0)}
    elif cfg.loss_type == "sapo":
        flags = {}
    else:
        low = (rho < 1 - cfg.epsilon_low) & (adv < 0)
        high = (rho > 1 + cfg.epsilon_high) & (adv > 0)
        flags = {"clip_ratio/low": low, "clip_ratio/high": high, "clip_ratio/region": low | high}
    sums = {k: jnp.sum(v.astype(jnp.float32) * mask) for k, v in flags.items()}
    sums["clip_ratio/count"] = jnp.sum(mask)
    if kl is not None:
        sums["kl"] = jnp.sum(jax.lax.stop_gradient(kl) * jnp.asarray(mask_BT, jnp.float32))
    return sums


# ------------------------------------------------------------------------------------------------------- advantages


def sample_std(x, axis=None, keepdims=False):
    """Sample standard deviation (Bessel-corrected, as torch.std and TRL's nanstd)."""
    n = x.size if axis is None else x.shape[axis]
    mean = jnp.mean(x, axis=axis, keepdims=True)
    var = jnp.sum((x - mean) ** 2, axis=axis, keepdims=keepdims) / max(n - 1, 1)
    return jnp.sqrt(var)


def check_advantage_args(estimator: str, scale_rewards: str, num_generations: int):
    check_choice("advantage_estimator", estimator, ADVANTAGE_ESTIMATORS)
    check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    if num_generations < 2 and (estimator == "rloo" or (estimator == "grpo" and scale_rewards == "group")):
        raise ValueError(f"num_generations={num_generations}: {estimator} with scale_rewards={scale_rewards} "
                         "compares completions within a group, which needs at least 2 per prompt")


def group_advantages(rewards_B, num_generations: int, estimator: str = "grpo", scale_rewards: str = "group"):
    """Advantages [B] from rewards [B] ordered prompt by prompt (G consecutive completions per prompt).

    grpo: r - mean_group, / (std_group | std_batch + 1e-4) unless scale_rewards=none (Dr.GRPO).
    rloo: r - (sum_group - r) / (G - 1), the same std division as grpo.
    reinforce_plus_plus: r - mean_group, then whitened over the batch (scale_rewards is not used).
    """
    check_advantage_args(estimator, scale_rewards, num_generations)
    r = jnp.asarray(rewards_B, jnp.float32)
    grouped = r.reshape(-1, num_generations)
    mean = jnp.mean(grouped, axis=1, keepdims=True)
    if estimator == "reinforce_plus_plus":
        centered = (grouped - mean).reshape(-1)
        return (centered - jnp.mean(centered)) / (sample_std(centered) + STD_EPS)
    if estimator == "rloo":
        baseline = (jnp.sum(grouped, axis=1, keepdims=True) - grouped) / (num_generations - 1)
        adv = grouped - baseline
    else:
        adv = grouped - mean
    if scale_rewards == "group":
        adv = adv / (sample_std(grouped, axis=1, keepdims=True) + STD_EPS)
    elif scale_rewards == "batch":
        adv = adv / (sample_std(r) + STD_EPS)
    return adv.reshape(-1)


def kl_penalized_rewards(rewards_B, old_logps_BT, ref_logps_BT, mask_BT, beta: float):
    """`kl_in_reward`: r - beta * sum_t (logp_old - logp_ref) over the completion tokens."""
    mask = jnp.asarray(mask_BT, jnp.float32)
    kl = jnp.sum((jnp.asarray(old_logps_BT, jnp.float32) - jnp.asarray(ref_logps_BT, jnp.float32)) * mask, -1)
    return jnp.asarray(rewards_B, jnp.float32) - beta * kl
