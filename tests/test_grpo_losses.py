"""GRPO-family losses and advantages against two references: a float64 numpy transcription of REFERENCE.md written
here, and TRL 1.16's own `GRPOTrainer._compute_loss` run on the same tensors (float64 torch) with the model forward
replaced by the given log-probs. Every loss_type x importance level x advantage estimator, within 1e-6.

TRL computes advantages inside `_generate_and_score_completions` (generation, reward calls and advantages in one
method, grpo estimator only; RLOO lives in a separate trainer, REINFORCE++ nowhere), which cannot be called on
tensors in isolation: advantages are checked against the numpy transcription only.
"""

import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer

from jaxswift.losses import policy as pl

G, PROMPTS, T = 4, 3, 7
B = G * PROMPTS
LOSS_TYPES = pl.LOSS_TYPES
LEVELS = pl.IMPORTANCE_LEVELS
ESTIMATORS = pl.ADVANTAGE_ESTIMATORS


def make_inputs(seed=0):
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(0.05, 3.0, (B, T))
    # ratios well outside [0.8, 1.28], per token and per sequence (GSPO): clipping is exercised
    old = logps + rng.normal(0, 0.3, (B, T)) + rng.normal(0, 0.4, (B, 1))
    ref = logps + rng.normal(0, 0.2, (B, T))
    lengths = rng.integers(1, T + 1, B)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)
    rewards = rng.integers(0, 3, B).astype(np.float64) + rng.normal(0, 0.1, B)
    return logps, old, ref, mask, rewards


# --- the float64 numpy transcription of REFERENCE.md ----------------------------------------------------------------


def np_std(x, axis=None):
    return np.std(x, axis=axis, ddof=1, keepdims=axis is not None)


def np_advantages(r, g, estimator, scale):
    grouped = r.reshape(-1, g)
    mean = grouped.mean(1, keepdims=True)
    if estimator == "reinforce_plus_plus":
        a = (grouped - mean).reshape(-1)
        return (a - a.mean()) / (np.std(a, ddof=1) + 1e-4)
    a = grouped - (grouped.sum(1, keepdims=True) - grouped) / (g - 1) if estimator == "rloo" else grouped - mean
    if scale == "group":
        a = a / (np_std(grouped, 1) + 1e-4)
    elif scale == "batch":
        a = a / (np.std(r, ddof=1) + 1e-4)
    return a.reshape(-1)


def np_loss(logps, old, ref, adv, mask, loss_type, level, eps_low, eps_high, delta, beta, max_len,
            tau_pos=1.0, tau_neg=1.05):
    a = adv[:, None]
    log_ratio = logps - old
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(1) / np.maximum(mask.sum(1), 1))[:, None]
    rho = np.exp(log_ratio) * np.ones_like(logps)
    if loss_type == "cispo":
        per_tok = -np.minimum(rho, eps_high) * a * logps
    elif loss_type == "sapo":
        tau = np.where(a > 0, tau_pos, tau_neg)
        per_tok = -(4 / tau) / (1 + np.exp(-tau * (rho - 1))) * a
    else:
        capped = rho if delta is None else np.minimum(rho, delta)
        per_tok = -np.minimum(capped * a, np.clip(rho, 1 - eps_low, 1 + eps_high) * a)
    kl = np.exp(ref - logps) - (ref - logps) - 1
    per_tok = per_tok + beta * kl
    if loss_type in ("grpo", "sapo"):
        return ((per_tok * mask).sum(1) / mask.sum(1)).mean()
    if loss_type == "dr_grpo":
        return (per_tok * mask).sum() / (len(logps) * max_len)
    return (per_tok * mask).sum() / mask.sum()


# --- TRL's own loss path ------------------------------------------------------------------------------------------


def trl_loss(logps, old, ref, adv, mask, loss_type, level, eps_low, eps_high, delta, beta, max_len):
    """GRPOTrainer._compute_loss on float64 tensors; returns (loss, d loss / d logps, TRL's logged metrics)."""
    policy = torch.tensor(logps, dtype=torch.float64, requires_grad=True)
    accelerator = types.SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x,
                                        gather_for_metrics=lambda x: x, sync_gradients=True)
    fake = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (policy, torch.zeros_like(policy), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=delta, sapo_temperature_pos=1.0,
                                   sapo_temperature_neg=1.05, steps_per_generation=1),
        use_vllm=False, model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        accelerator=accelerator, max_completion_length=max_len, _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)))
    m = torch.tensor(mask, dtype=torch.float64)
    inputs = {"prompt_ids": torch.zeros((B, 2), dtype=torch.long), "prompt_mask": torch.ones((B, 2)),
              "completion_ids": torch.zeros((B, T), dtype=torch.long), "completion_mask": m,
              "advantages": torch.tensor(adv, dtype=torch.float64),
              "old_per_token_logps": torch.tensor(old, dtype=torch.float64),
              "ref_per_token_logps": torch.tensor(ref, dtype=torch.float64), "num_items_in_batch": m.sum()}
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    loss.backward()
    return loss.item(), policy.grad.numpy(), {k: v[-1] for k, v in fake._metrics["train"].items()}


def hyper(loss_type):
    """epsilon_low, epsilon_high, delta per loss type (CISPO's eps_high is its IS cap; delta only for PPO clip)."""
    if loss_type == "cispo":
        return 0.2, 1.5, None
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        return 0.2, 0.28, 1.6
    return 0.2, 0.2, None


def jax_loss(logps, old, ref, adv, mask, cfg):
    """(loss, d loss / d logps, metric sums) from one jitted value_and_grad."""
    fn = jax.jit(jax.value_and_grad(lambda lp: pl.policy_loss(lp, old, ref, adv, mask, cfg), has_aux=True))
    (loss, sums), grad = fn(jnp.asarray(logps, jnp.float32))
    return float(loss), np.asarray(grad), {k: float(v) for k, v in sums.items()}


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_matches_numpy_and_trl(loss_type, level, estimator):
    logps, old, ref, mask, rewards = make_inputs(seed=LOSS_TYPES.index(loss_type) + 10 * LEVELS.index(level))
    adv = np.asarray(pl.group_advantages(rewards, G, estimator, "group"), np.float64)
    eps_low, eps_high, delta = hyper(loss_type)
    beta, max_len = 0.04, T + 3
    cfg = pl.PolicyLossConfig(loss_type=loss_type, importance_sampling_level=level, epsilon=eps_low,
                              epsilon_high=eps_high, delta=delta, beta=beta, max_completion_length=max_len)
    got, grad, sums = jax_loss(logps, old, ref, adv.astype(np.float32), mask, cfg)
    want_np = np_loss(logps, old, ref, adv, mask, loss_type, level, eps_low, eps_high, delta, beta, max_len)
    want_trl, trl_grad, trl_metrics = trl_loss(logps, old, ref, adv, mask, loss_type, level, eps_low, eps_high,
                                               delta, beta, max_len)
    # the transcription and TRL agree (TRL's sapo builds its temperatures as float32 scalars: 1e-7, not 1e-12)
    assert abs(want_np - want_trl) < 1e-7
    np.testing.assert_allclose(got, want_trl, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, want_np, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad, trl_grad, rtol=1e-5, atol=1e-6)  # stop-gradients (cispo) and clipping
    tokens = mask.sum()
    np.testing.assert_allclose(sums["kl"] / tokens, trl_metrics["kl"], rtol=1e-5, atol=1e-7)
    names = {"clip_ratio/low": "clip_ratio/low_mean", "clip_ratio/high": "clip_ratio/high_mean",
             "clip_ratio/region": "clip_ratio/region_mean", "clip_ratio/cispo": "cispo_clip_ratio"}
    for ours, theirs in names.items():
        if theirs in trl_metrics:
            np.testing.assert_allclose(sums[ours] / sums["clip_ratio/count"], trl_metrics[theirs], atol=1e-7)
    if loss_type not in ("sapo",):
        assert any(v > 0 for k, v in sums.items() if k.startswith("clip_ratio/") and k != "clip_ratio/count"), "the inputs must exercise clipping"


@pytest.mark.parametrize("scale", pl.SCALE_REWARDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_advantages_match_numpy(estimator, scale):
    _, _, _, _, rewards = make_inputs(seed=3)
    got = np.asarray(pl.group_advantages(rewards.astype(np.float32), G, estimator, scale))
    np.testing.assert_allclose(got, np_advantages(rewards, G, estimator, scale), rtol=1e-6, atol=1e-6)


def test_rloo_baseline_is_leave_one_out():
    r = np.array([1.0, 2.0, 4.0, 8.0])
    got = np.asarray(pl.group_advantages(r, 4, "rloo", "none"))
    np.testing.assert_allclose(got, [1 - 14 / 3, 2 - 13 / 3, 4 - 11 / 3, 8 - 7 / 3], rtol=1e-6)


def test_micro_batches_sum_to_the_whole_batch_loss():
    logps, old, ref, mask, rewards = make_inputs(seed=5)
    adv = np.asarray(pl.group_advantages(rewards, G))

    @jax.jit
    def whole_and_parts(lp):
        out = []
        for loss_type in LOSS_TYPES:
            cfg = pl.PolicyLossConfig(loss_type=loss_type, max_completion_length=T)
            whole = pl.policy_loss(lp, old, ref, adv, mask, cfg)[0]
            parts = [pl.policy_loss(lp[s], old[s], ref[s], adv[s], mask[s], cfg, num_sequences=B,
                                    num_tokens=mask.sum())[0] for s in (slice(0, 5), slice(5, B))]
            out.append((whole, parts[0] + parts[1]))
        return out

    for loss_type, (whole, parts) in zip(LOSS_TYPES, whole_and_parts(logps)):
        np.testing.assert_allclose(float(parts), float(whole), rtol=1e-6, atol=1e-7, err_msg=loss_type)


def test_kl_in_reward_matches_numpy():
    logps, old, ref, mask, rewards = make_inputs(seed=7)
    got = np.asarray(pl.kl_penalized_rewards(rewards, old, ref, mask, 0.05))
    np.testing.assert_allclose(got, rewards - 0.05 * ((old - ref) * mask).sum(1), rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_generations=1.*at least 2"):
        pl.group_advantages(np.ones(4), 1, "grpo", "group")
    with pytest.raises(ValueError, match="num_generations=1"):
        pl.check_advantage_args("rloo", "none", 1)
    pl.check_advantage_args("grpo", "batch", 1)  # batch scaling does not need a group
    with pytest.raises(ValueError, match="loss_type 'ppo'"):
        pl.PolicyLossConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        pl.PolicyLossConfig(importance_sampling_level="tokens")
    with pytest.raises(ValueError, match="delta"):
        pl.PolicyLossConfig(delta=1.1)
    with pytest.raises(ValueError, match="advantage_estimator"):
        pl.group_advantages(np.ones(4), 2, "gae")
