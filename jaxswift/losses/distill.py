"""Knowledge-distillation losses (GKD, Agarwal et al. 2024, eq. 1): the generalized Jensen-Shannon divergence
between the student's and the teacher's next-token distributions at temperature T.

    JSD_beta(P_t || P_s) = beta * KL(P_t || M) + (1 - beta) * KL(P_s || M),   M = beta * P_t + (1 - beta) * P_s

beta = 0 is the forward KL(P_t || P_s), beta = 1 the reverse KL(P_s || P_t) (TRL's `generalized_jsd_loss`, whose
beta-weighting and reduction these follow term for term).

Two forms of the teacher:
- full logits [..., V] (an in-process teacher): `token_jsd(student_logits, teacher_logits, ...)`;
- a sparse top-k teacher (a server's `top_logprobs`, or an in-process teacher with `--teacher_top_k`): the K ids the
  teacher ranks highest at each position and their log-probs at temperature 1 (as servers report them). Both
  distributions are then restricted to that support and renormalised there, and the JSD is taken over the K
  entries: `topk_jsd`. Renormalising commutes with the temperature (log p(i) / T - logsumexp_S(log p / T) equals
  z_i / T - logsumexp_S(z / T) for the logits z), so temperature-1 log-probs from a server give the same
  distribution as the teacher's own logits would. With K = V it is `token_jsd` exactly.

Shapes: any leading axes (B, C); the last is the vocabulary (V) or the support (K). Math in float32 (float64 inputs
stay float64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {beta}")


def _at_least_f32(x):
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def generalized_jsd(student_logps, teacher_logps, beta: float):
    """Per-position divergence [...]: JSD_beta over the last axis, from normalised log-probs of the same support."""
    check_beta(beta)

    def kl(p_log, q_log):  # KL(p || q) = sum p (log p - log q), as torch's kl_div(q_log, p_log, log_target=True)
        return jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1)

    if beta == 0.0:
        return kl(teacher_logps, student_logps)
    if beta == 1.0:
        return kl(student_logps, teacher_logps)
    dtype = student_logps.dtype
    mixture = jnp.logaddexp(student_logps + jnp.log1p(-jnp.asarray(beta, dtype)),
                            teacher_logps + jnp.log(jnp.asarray(beta, dtype)))
    return beta * kl(teacher_logps, mixture) + (1.0 - beta) * kl(student_logps, mixture)


def token_jsd(student_logits, teacher_logits, *, beta: float, temperature: float = 1.0):
    """Per-token JSD_beta [...] of full-vocabulary logits [..., V] at `temperature`."""
    s = jax.nn.log_softmax(_at_least_f32(student_logits) / temperature, axis=-1)
    t = jax.nn.log_softmax(_at_least_f32(teacher_logits) / temperature, axis=-1)
    return generalized_jsd(s, t, beta)


def teacher_top_k(teacher_logits, k: int):
    """(ids [..., K] int32, log-probs at temperature 1 [..., K]) of the teacher's K most likely tokens, best first:
    what a server's `top_logprobs` reports."""
    logits = _at_least_f32(teacher_logits)
    top, ids = jax.lax.top_k(logits, k)
    return ids.astype(jnp.int32), top - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def topk_jsd(student_logits, teacher_ids, teacher_logps, *, beta: float, temperature: float = 1.0):
    """Per-token JSD_beta [...] over the teacher's top-K support: the student's logits [..., V] gathered at
    teacher_ids [..., K] and the teacher's temperature-1 log-probs [..., K], each divided by `temperature` and
    renormalised over the K ids."""
    s = jnp.take_along_axis(_at_least_f32(student_logits), teacher_ids, axis=-1)
    s = jax.nn.log_softmax(s / temperature, axis=-1)
    t = jax.nn.log_softmax(_at_least_f32(teacher_logps) / temperature, axis=-1)
    return generalized_jsd(s, t, beta)


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, *, beta: float = 0.5,
                         temperature: float = 1.0, reduction: str = "batchmean"):
    """TRL's `GKDTrainer.generalized_jsd_loss`: logits [B, T, V], labels [B, T] with -100 on positions left out.
    batchmean: the summed divergence over the counted tokens (with labels; at least 1), else over B rows."""
    jsd = token_jsd(student_logits, teacher_logits, beta=beta, temperature=temperature)
    mask = jnp.ones(jsd.shape, jsd.dtype) if labels is None else (labels != -100).astype(jsd.dtype)
    total = jnp.sum(jsd * mask)
    if reduction == "batchmean":
        return total / (jnp.maximum(jnp.sum(mask), 1.0) if labels is not None else max(jsd.shape[0], 1))
    if reduction == "sum":
        return total
    if reduction == "mean":  # torch's mean over the kept elements: tokens x vocabulary
        return total / (jnp.sum(mask) * student_logits.shape[-1])
    raise ValueError(f"reduction {reduction!r}: expected batchmean | sum | mean (per token: token_jsd)")
