"""Preference training steps: per-sequence log-probs read from packed segments, the objectives (DPO family, KTO,
CPO/SimPO, ORPO, reward model) on top of `losses.preference`, the reference model, and the jitted step.

Batch (see `data.preference.assemble_items`): the SFT arrays [A, B, T] plus item_mask / labels [A, B, I] (and
ref_logps [A, B, I, S] when precomputed); item k of a row is segments k*S+1 .. k*S+S (S = sequences per item).

The step's loss is exact under any packing and accumulation split: per-item losses are summed and divided by the
number of items in the whole step, and NLL terms (rpo_alpha, cpo_alpha, ORPO) by the step's chosen reply tokens.
Batch-coupled quantities are per micro-batch, as TRL takes them per device batch: KTO's KL reference point.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxswift.data.pipeline import StepPlan, bucket_length
from jaxswift.data.multimodal_preference import MultimodalPreferenceItem, assemble_multimodal_items
from jaxswift.data.preference import PreferenceItem, assemble_items, max_items_per_row
from jaxswift.losses import preference as pl
from jaxswift.losses.lm import token_logps
from jaxswift.models.config import ModelConfig
from jaxswift.models.transformer import hidden_states
from jaxswift.models.vision import VLMConfig
from jaxswift.optim.qgalore import float_view
from jaxswift.parallel.distributed import gather_to_host
from jaxswift.train.state import TrainState, combine
from jaxswift.train.step import guarded_update, vlm_row_hidden_states

REFERENCES = ("adapters_off", "params", "precomputed", "none")


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the step optimizes; static under jit. kind: dpo | kto | cpo (SimPO is cpo + loss_type simpo) | orpo | rm."""

    kind: str
    beta: float = 0.1
    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None
    discopop_tau: float = 0.05
    cpo_alpha: float = 1.0
    simpo_gamma: float = 1.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    center_rewards_coefficient: float | None = None

    @property
    def needs_reference(self) -> bool:
        return self.kind in ("dpo", "kto")

    @property
    def seqs_per_item(self) -> int:
        return 1 if self.kind == "kto" and self.loss_types[0] == "apo_zero_unpaired" else 2

    @property
    def value_head(self) -> bool:
        return self.kind == "rm"

    def dpo_terms(self) -> tuple[tuple[str, ...], tuple[float, ...]]:
        """DPO loss types other than `sft`, with weights; `sft` goes to `nll_weight`."""
        weights = self.loss_weights or (1.0,) * len(self.loss_types)
        kept = [(t, w) for t, w in zip(self.loss_types, weights) if t != "sft"]
        return tuple(t for t, _ in kept), tuple(w for _, w in kept)

    @property
    def nll_weight(self) -> float:
        """Weight of the mean NLL over the step's chosen reply tokens."""
        if self.kind == "dpo":
            weights = self.loss_weights or (1.0,) * len(self.loss_types)
            return (self.rpo_alpha or 0.0) + sum(w for t, w in zip(self.loss_types, weights) if t == "sft")
        if self.kind == "cpo":
            return 0.0 if self.loss_types[0] == "alphapo" else self.cpo_alpha  # TRL: alphapo means cpo_alpha 0
        return 1.0 if self.kind == "orpo" else 0.0


def objective_from_args(args) -> Objective:
    kind = "cpo" if args.rlhf_type == "simpo" else args.rlhf_type
    return Objective(kind=kind, beta=args.beta, loss_types=tuple(args.loss_type or ()),
                     loss_weights=tuple(args.loss_weights) if args.loss_weights else None,
                     label_smoothing=args.label_smoothing, rpo_alpha=args.rpo_alpha, discopop_tau=args.discopop_tau,
                     cpo_alpha=args.cpo_alpha, simpo_gamma=args.simpo_gamma, desirable_weight=args.desirable_weight,
                     undesirable_weight=args.undesirable_weight,
                     center_rewards_coefficient=args.center_rewards_coefficient)


# --------------------------------------------------------------------------------------------- the data plan


def preference_plan(items: list[PreferenceItem], *, rows_per_step: int, micro_batches: int, length: int,
                    packing: bool, seed: int) -> tuple[StepPlan, int]:
    """(the step plan over items, item slots per row). Every batch has the same item slots, so the step compiles
    once per row length."""
    slots = max_items_per_row([len(i) for i in items], length) if packing else 1
    plan = StepPlan(tuple(len(i) for i in items), rows_per_step=rows_per_step, length=length, packing=packing,
                    seed=seed, micro_batches=micro_batches)
    return plan, slots


def _assemble(items, rows, length, num_rows, items_per_row, ref_logps):
    """assemble_items, or its image-row version when the items carry images (data/multimodal_preference.py)."""
    first = next((items[r[0]] for r in rows if r), None)
    fn = assemble_multimodal_items if isinstance(first, MultimodalPreferenceItem) else assemble_items
    return fn(items, rows, length, num_rows, items_per_row, ref_logps)


def item_assembler(items_per_row: int, ref_logps: np.ndarray | None = None):
    """(items, rows, length) -> the preference batch of those rows (with the precomputed reference scores)."""
    return lambda items, rows, length: _assemble(items, rows, length, len(rows), items_per_row, ref_logps)


def item_batches(items, rows_per_batch: int, length: int, ref_logps=None):
    """(item indices, batch [1, R, ...]) one item per row, in order: for scoring and evaluation."""
    for start in range(0, len(items), rows_per_batch):
        chunk = list(range(start, min(start + rows_per_batch, len(items))))
        row_length = bucket_length(max(len(items[i]) for i in chunk), length)
        batch = _assemble(items, [[i] for i in chunk], row_length, rows_per_batch, 1, ref_logps)
        yield chunk, {k: v[None] for k, v in batch.items()}


# --------------------------------------------------------------------------------------------- sequence stats


class SeqStats(NamedTuple):
    logps: jax.Array  # [B, I, S] summed log-probs of the scored (reply) tokens
    tokens: jax.Array  # [B, I, S] how many tokens were scored
    rewards: jax.Array | None  # [B, I, S] value head at each sequence's last token (reward models)


def _last_tokens(seg_BT):
    nxt = jnp.pad(seg_BT[:, 1:], ((0, 0), (0, 1)))
    return ((seg_BT > 0) & (nxt != seg_BT)).astype(jnp.float32)


def sequence_stats(params, micro: dict, cfg: ModelConfig, seqs_per_item: int, *, value_head: bool = False,
                   loss_chunk: int = 512) -> SeqStats:
    """One forward over packed rows -> per-sequence sums. Segment k+1 of a row is its sequence slot k. A
    vision-language model (`cfg` a VLMConfig) runs its tower once over each row's distinct images first."""
    seg = micro["segment_ids"]
    B, I = micro["item_mask"].shape
    if isinstance(cfg, VLMConfig):
        h, _ = vlm_row_hidden_states(params, micro, cfg)
        params, cfg = {**params["llm"], **({"value_head": params["value_head"]} if value_head else {})}, cfg.text
    else:
        h, _ = hidden_states(params, micro["tokens"], cfg, positions=micro["positions"], segment_ids=seg)
    slots = (seg[..., None] == jnp.arange(1, I * seqs_per_item + 1)).astype(jnp.float32)  # [B, T, K]

    def per_seq(x_BT):  # an exact sum (no matmul, whose default precision on TPU would round to bf16)
        return jnp.sum(x_BT[..., None] * slots, axis=1).reshape(B, I, seqs_per_item)

    weights = micro["loss_weights"].astype(jnp.float32)
    if value_head:
        head = params["value_head"]
        score = jnp.sum(h.astype(jnp.float32) * head["w"], axis=-1) + head["b"]
        return SeqStats(jnp.zeros((B, I, seqs_per_item)), per_seq(weights), per_seq(score * _last_tokens(seg)))
    logps = token_logps(params, h, micro["targets"], cfg, loss_chunk)
    return SeqStats(per_seq(logps * weights), per_seq(weights), None)


def init_value_head(cfg: ModelConfig, seed: int) -> dict:
    """The reward model's head on the last token's hidden state: [D] weights (std 0.02, as HF's score layer) + bias."""
    w = 0.02 * jax.random.normal(jax.random.key(seed + 1), (cfg.hidden_size,), jnp.float32)
    return {"w": w, "b": jnp.zeros((), jnp.float32)}


# --------------------------------------------------------------------------------------------- objectives


class Terms(NamedTuple):
    item_loss: jax.Array  # sum of per-item losses over the micro batch's real items
    nll: jax.Array  # sum of NLL over its chosen reply tokens
    metrics: dict  # name -> (numerator, denominator), summed over micro batches, divided at the end


def _seq(x, k):
    return x[..., k].reshape(-1)


def _sums(values: dict, weights) -> dict:
    n = jnp.sum(weights)
    return {k: (jnp.sum(jax.lax.stop_gradient(v) * weights), n) for k, v in values.items()}


def _pair_metrics(chosen_rewards, rejected_rewards, pc, pr, mask) -> dict:
    values = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
              "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32)}
    if pc is not None:
        values.update({"logps/chosen": pc, "logps/rejected": pr})
    return _sums(values, mask)


def _dpo(obj: Objective, pol: SeqStats, ref, mask) -> Terms:
    m = mask > 0
    pc, pr, rc, rr = (jnp.where(m, x, 0.0) for x in (_seq(pol.logps, 0), _seq(pol.logps, 1), _seq(ref, 0),
                                                    _seq(ref, 1)))
    types, weights = obj.dpo_terms()
    if types:
        losses, cr, rj = pl.dpo_loss(pc, pr, rc, rr, beta=obj.beta, loss_type=list(types), loss_weights=list(weights),
                                     label_smoothing=obj.label_smoothing, discopop_tau=obj.discopop_tau,
                                     chosen_lengths=jnp.where(m, _seq(pol.tokens, 0), 1.0),
                                     rejected_lengths=jnp.where(m, _seq(pol.tokens, 1), 1.0))
    else:  # `sft` alone: only the NLL term
        losses, cr, rj = jnp.zeros_like(pc), obj.beta * (pc - rc), obj.beta * (pr - rr)
    return Terms(jnp.sum(losses * mask), -jnp.sum(pc * mask), _pair_metrics(cr, rj, pc, pr, mask))


def _kto(obj: Objective, pol: SeqStats, ref, mask, labels) -> Terms:
    m, good = mask > 0, labels > 0
    pc, rc = jnp.where(m, _seq(pol.logps, 0), 0.0), jnp.where(m, _seq(ref, 0), 0.0)
    kl_policy = kl_ref = None
    if obj.seqs_per_item == 2:
        # kto_loss takes mean(kl_policy - kl_ref) over its inputs; pass the mean over real items only.
        shift = jnp.sum((_seq(pol.logps, 1) - _seq(ref, 1)) * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        kl_policy, kl_ref = jnp.full_like(pc, shift), jnp.zeros_like(pc)
    losses, rewards, _, kl = pl.kto_loss(pc, pc, kl_policy, rc, rc, kl_ref, beta=obj.beta,
                                         desirable_weight=obj.desirable_weight,
                                         undesirable_weight=obj.undesirable_weight, loss_type=obj.loss_types[0])
    n = pc.shape[0]
    per_item = jnp.where(good, losses[:n], losses[n:])  # each item is desirable or not: pick its loss
    chosen, rejected = mask * good, mask * ~good
    metrics = {**_sums({"rewards/chosen": rewards, "logps/chosen": pc}, chosen),
               **_sums({"rewards/rejected": rewards, "logps/rejected": pc}, rejected),
               "kl": (kl, jnp.ones(()))}
    return Terms(jnp.sum(per_item * mask), jnp.zeros(()), metrics)


def _mean_logps(pol: SeqStats, k: int, m):
    return jnp.where(m, _seq(pol.logps, k) / jnp.maximum(_seq(pol.tokens, k), 1.0), -1.0)


def _cpo(obj: Objective, pol: SeqStats, _, mask) -> Terms:
    m = mask > 0
    pc, pr = jnp.where(m, _seq(pol.logps, 0), 0.0), jnp.where(m, _seq(pol.logps, 1), 0.0)
    lt = obj.loss_types[0]
    # TRL's CPO forward gives per-token means for ipo and simpo (and alphapo), sums otherwise.
    xc, xr = (_mean_logps(pol, 0, m), _mean_logps(pol, 1, m)) if lt in ("ipo", "simpo", "alphapo") else (pc, pr)
    losses, cr, rj = pl.cpo_loss(xc, xr, beta=obj.beta, label_smoothing=obj.label_smoothing, loss_type=lt,
                                 simpo_gamma=obj.simpo_gamma, cpo_alpha=0.0)
    return Terms(jnp.sum(losses * mask), -jnp.sum(pc * mask), _pair_metrics(cr, rj, pc, pr, mask))


def _orpo(obj: Objective, pol: SeqStats, _, mask) -> Terms:
    m = mask > 0
    pc, pr = jnp.where(m, _seq(pol.logps, 0), 0.0), jnp.where(m, _seq(pol.logps, 1), 0.0)
    # log(1 - p) is -inf at a mean log-prob of exactly 0 (every token certain); keep it a hair below.
    xc, xr = (jnp.minimum(_mean_logps(pol, k, m), -1e-6) for k in (0, 1))
    losses, cr, rj, _, _ = pl.orpo_loss(xc, xr, beta=obj.beta)
    metrics = {**_pair_metrics(cr, rj, pc, pr, mask), **_sums({"log_odds_ratio": -losses / obj.beta}, mask)}
    return Terms(jnp.sum(losses * mask), -jnp.sum(pc * mask), metrics)


def _rm(obj: Objective, pol: SeqStats, _, mask) -> Terms:
    m = mask > 0
    rc, rr = jnp.where(m, _seq(pol.rewards, 0), 0.0), jnp.where(m, _seq(pol.rewards, 1), 0.0)
    losses = pl.reward_model_loss(rc, rr, center_rewards_coefficient=obj.center_rewards_coefficient)
    return Terms(jnp.sum(losses * mask), jnp.zeros(()), _pair_metrics(rc, rr, None, None, mask))


def objective_terms(obj: Objective, pol: SeqStats, ref, micro: dict) -> Terms:
    mask = micro["item_mask"].reshape(-1).astype(jnp.float32)
    if obj.kind == "kto":
        return _kto(obj, pol, ref, mask, micro["labels"].reshape(-1))
    return {"dpo": _dpo, "cpo": _cpo, "orpo": _orpo, "rm": _rm}[obj.kind](obj, pol, ref, mask)


def finalize_metrics(sums: dict) -> dict:
    """Means from (numerator, denominator) sums; NaN where nothing was counted (e.g. no undesirable example)."""
    out = {k: jnp.where(d > 0, n / jnp.maximum(d, 1e-9), jnp.nan) for k, (n, d) in sums.items()}
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def step_denominators(batch: dict, seqs_per_item: int):
    """(items, chosen reply tokens) in the whole step, at least 1: the loss terms' fixed divisors."""
    seg = batch["segment_ids"]
    chosen = (seg > 0) & ((seg - 1) % seqs_per_item == 0)
    n_items = jnp.maximum(jnp.sum(batch["item_mask"]), 1.0)
    return n_items, jnp.maximum(jnp.sum(batch["loss_weights"] * chosen), 1.0)


# --------------------------------------------------------------------------------------------- the step


def _reference_logps(reference: str, stats: Callable, state_or_params, ref_params, micro):
    """The reference model's sequence log-probs for a micro batch, outside any gradient."""
    if reference == "none":
        return None
    if reference == "precomputed":
        return micro["ref_logps"]
    if reference == "adapters_off":
        from jaxswift.tuners.lora import lora_disabled

        ref_params = lora_disabled(state_or_params)  # the same base arrays: no second copy of the weights
    return jax.lax.stop_gradient(stats(ref_params, micro).logps)


def make_preference_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, obj: Objective, *,
                         reference: str, loss_chunk: int = 512, prepare_params: Callable | None = None) -> Callable:
    """(state, batch, ref_params=None) -> (state, metrics).

    reference: "adapters_off" (LoRA: the trained params with adapters off), "params" (a frozen model passed as
    ref_params), "precomputed" (batch["ref_logps"]) or "none" (CPO, SimPO, ORPO, RM).
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    prepare = prepare_params or (lambda params, rng: params)
    stats = partial(sequence_stats, cfg=cfg, seqs_per_item=obj.seqs_per_item, value_head=obj.value_head,
                    loss_chunk=loss_chunk)

    def micro_step(state, micro, rng, ref_params, denominators):
        ref = _reference_logps(reference, stats, state.params, ref_params, micro)

        def loss_fn(trainable):
            terms = objective_terms(obj, stats(prepare(combine(trainable, state.frozen), rng), micro), ref, micro)
            loss = terms.item_loss / denominators[0] + obj.nll_weight * terms.nll / denominators[1]
            return loss, terms.metrics

        return jax.value_and_grad(loss_fn, has_aux=True)(float_view(state.trainable))  # Q-GaLore: at the floats

    def step(state: TrainState, batch: dict, ref_params=None):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        micro_rngs = jax.random.split(rng, batch["tokens"].shape[0])
        denominators = step_denominators(batch, obj.seqs_per_item)

        def accumulate(carry, xs):
            micro, key = xs
            (loss, metrics), grads = micro_step(state, micro, key, ref_params, denominators)
            return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], grads)), metrics

        init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, float_view(state.trainable)))
        (loss, grads), per_micro = jax.lax.scan(accumulate, init, (batch, micro_rngs))
        new_state, grad_norm, finite = guarded_update(state, grads, loss, optimizer,
                                                      jax.random.fold_in(rng, 1 << 30))  # Q-GaLore's rounding
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": jnp.sum(batch["segment_ids"] > 0),
                   "finite": finite, "bad_streak": new_state.bad_streak, "skipped_steps": new_state.skipped_steps,
                   **finalize_metrics(jax.tree.map(jnp.sum, per_micro))}
        return new_state, metrics

    return step


# --------------------------------------------------------------------------------------------- scoring, eval


def make_logps_fn(cfg: ModelConfig, obj: Objective, loss_chunk: int = 512) -> Callable:
    """(params, batch [1, R, ...]) -> [R, 1, S] sequence log-probs: to precompute the reference's."""
    def fn(params, batch):
        micro = jax.tree.map(lambda x: x[0], batch)
        return sequence_stats(params, micro, cfg, obj.seqs_per_item, loss_chunk=loss_chunk).logps
    return fn


def make_eval_fn(cfg: ModelConfig, obj: Objective, *, reference: str, loss_chunk: int = 512) -> Callable:
    """(params, batch [1, R, ...], ref_params=None) -> (item loss sum, nll sum, items, chosen tokens, metric sums)."""
    stats = partial(sequence_stats, cfg=cfg, seqs_per_item=obj.seqs_per_item, value_head=obj.value_head,
                    loss_chunk=loss_chunk)

    def fn(params, batch, ref_params=None):
        micro = jax.tree.map(lambda x: x[0], batch)
        ref = _reference_logps(reference, stats, params, ref_params, micro)
        terms = objective_terms(obj, stats(params, micro), ref, micro)
        n_items, n_tokens = step_denominators(micro, obj.seqs_per_item)
        return terms.item_loss, terms.nll, jnp.sum(micro["item_mask"]), n_tokens, terms.metrics

    return fn


def evaluate_items(eval_fn: Callable, obj: Objective, items, rows_per_batch: int, length: int, put: Callable,
                   ref_logps=None) -> dict[str, float]:
    """The objective's loss and metrics over `items` (one pass, host-side sums)."""
    loss = nll = n_items = n_tokens = 0.0
    sums: dict = {}
    for _, batch in item_batches(items, rows_per_batch, length, ref_logps):
        item_loss, nll_sum, items_here, tokens_here, metrics = jax.device_get(eval_fn(put(batch)))
        loss, nll = loss + float(item_loss), nll + float(nll_sum)
        n_items, n_tokens = n_items + float(items_here), n_tokens + float(tokens_here)
        for k, (num, den) in metrics.items():
            total = sums.get(k, (0.0, 0.0))
            sums[k] = (total[0] + float(num), total[1] + float(den))
    out = {"loss": loss / max(n_items, 1.0) + obj.nll_weight * nll / max(n_tokens, 1.0)}
    out.update({k: float(v) for k, v in finalize_metrics({k: (jnp.asarray(n), jnp.asarray(d))
                                                          for k, (n, d) in sums.items()}).items()})
    return out


def score_items(logps_fn: Callable, items, rows_per_batch: int, length: int, put: Callable) -> np.ndarray:
    """[items, S] sequence log-probs (e.g. the reference's, once before training)."""
    S = len(items[0].chats) if isinstance(items[0], MultimodalPreferenceItem) else len(items[0].sequences)
    out = np.zeros((len(items), S), np.float32)
    for chunk, batch in item_batches(items, rows_per_batch, length):
        out[chunk] = np.asarray(gather_to_host(logps_fn(put(batch))))[:len(chunk), 0]  # rows of every process
    return out
