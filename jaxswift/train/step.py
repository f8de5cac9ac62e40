"""The jitted train and eval steps: (state, batch) -> (state, metrics).

A batch is a dict of [A, B, T] arrays (A = gradient-accumulation microbatches): tokens, targets, loss_weights,
segment_ids, positions; a vision-language model's batch adds its rows' M-RoPE positions and image patches
(data/multimodal_batch.py). The loss is the mean NLL over every real target token of all A microbatches (not a mean of
microbatch means), so packed and unpacked batches, and any accumulation split, give the same loss and gradients.
Loss weights other than 1 (`--loss_scale hermes` ...) scale their tokens' NLL; the mean still divides by the number of
trained tokens (losses/lm.chunked_nll_sum), as ms-swift does.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxswift.losses.lm import chunked_nll_sum
from jaxswift.models.config import ModelConfig
from jaxswift.models.transformer import hidden_states
from jaxswift.models.vision import VisionInputs, VLMConfig, row_vlm_hidden_states
from jaxswift.models.vit import ViTConfig, ViTInputs
from jaxswift.optim.qgalore import apply_updates, float_view
from jaxswift.train.state import TrainState, combine, compute_view

BATCH_KEYS = ("tokens", "targets", "loss_weights", "segment_ids", "positions")
VLM_BATCH_KEYS = BATCH_KEYS + ("rope_positions", "pixels", "patch_rows_cols", "patch_frames", "patch_windows")
VIT_VLM_BATCH_KEYS = BATCH_KEYS + ("pixels", "tile_positions")


def nll_sums(params, micro: dict, cfg: ModelConfig, loss_chunk: int, *, with_aux: bool = True):
    """(NLL sum, loss-token count) of one microbatch. An MoE model's auxiliary loss (load balancing, router
    z-loss: a mean over tokens and layers) joins the sum times the microbatch's loss-token count, so that once the
    step divides by all loss tokens it counts as a loss-token-weighted mean of the microbatches' aux losses, whatever
    the accumulation split (the routing statistics themselves are per microbatch, as transformers' are per
    forward). Dense models add nothing."""
    h, _, aux = hidden_states(params, micro["tokens"], cfg, positions=micro["positions"],
                              segment_ids=micro["segment_ids"], return_aux=True)
    nll, weight = chunked_nll_sum(params, h, micro["targets"], micro["loss_weights"].astype(jnp.float32), cfg,
                                  loss_chunk)
    return (nll + aux * weight if with_aux and cfg.is_moe else nll), weight


def vlm_row_hidden_states(params, micro: dict, cfg: VLMConfig, *, return_aux: bool = False):
    """The text core's hidden states over a vision-language batch (models/vision.row_vlm_hidden_states): each
    row's images through the tower once, their features at the row's placeholders, in order or, when the batch has
    `feature_index [B, T]`, the feature row it names (a preference row stores the images its sequences share
    once: data/multimodal_preference.py); the text core with the rows' M-RoPE positions (Qwen2-VL) or 1-D
    positions (the ViT families: llava, idefics3, whose rows bring tiles: data/multimodal_batch.py)."""
    if isinstance(cfg.vision, ViTConfig):
        vision, rope = ViTInputs(micro["pixels"], micro["tile_positions"]), None
    else:
        vision = VisionInputs(micro["pixels"], micro["patch_rows_cols"], micro["patch_frames"],
                              micro["patch_windows"])
        rope = jnp.moveaxis(micro["rope_positions"], 1, 0)
    return row_vlm_hidden_states(params, micro["tokens"], cfg, vision, rope_positions=rope,
                                 positions=micro["positions"], segment_ids=micro["segment_ids"],
                                 feature_index_BT=micro.get("feature_index"), return_aux=return_aux)


def vlm_nll_sums(params, micro: dict, cfg: VLMConfig, loss_chunk: int, *, with_aux: bool = True):
    """nll_sums of a vision-language model (vlm_row_hidden_states, then the loss on the LLM's head)."""
    h, _, aux = vlm_row_hidden_states(params, micro, cfg, return_aux=True)
    nll, weight = chunked_nll_sum(params["llm"], h, micro["targets"], micro["loss_weights"].astype(jnp.float32),
                                  cfg.text, loss_chunk)
    return (nll + aux * weight if with_aux and cfg.text.is_moe else nll), weight


def _sums_and_keys(cfg):
    """The loss sums and batch keys of a text model or a vision-language model."""
    if not isinstance(cfg, VLMConfig):
        return nll_sums, BATCH_KEYS
    return vlm_nll_sums, VIT_VLM_BATCH_KEYS if isinstance(cfg.vision, ViTConfig) else VLM_BATCH_KEYS


def guarded_update(state: TrainState, grads, loss, optimizer: optax.GradientTransformation, key):
    """(new state, grad norm, finite): the optimizer update, skipped (weights and optimizer state kept, the skip
    counted) when the loss or the gradient norm is not finite. `key` drives Q-GaLore's stochastic rounding.

    A cond rather than a select over every buffer: the finite path pays nothing for the guard."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(_):
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        return apply_updates(state.trainable, updates, key), new_opt_state

    trainable, opt_state = jax.lax.cond(finite, update, lambda _: (state.trainable, state.opt_state), None)
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                              skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
                              bad_streak=jnp.where(finite, 0, state.bad_streak + 1))
    return new_state, grad_norm, finite


def _identity_prepare(params, rng):
    return params


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, *, loss_chunk: int = 512,
                    prepare_params: Callable = _identity_prepare) -> Callable:
    """prepare_params(params, rng) runs inside the step before the forward (e.g. to give LoRA its dropout keys).
    `cfg` is a ModelConfig, or a VLMConfig for a vision-language model's batches."""
    sums, batch_keys = _sums_and_keys(cfg)
    compute_dtype = (cfg.text if isinstance(cfg, VLMConfig) else cfg).compute_dtype

    def micro_grads(trainable, frozen, micro, rng):
        def loss_fn(t):
            # float32 master weights enter the forward in the compute dtype (no-op when they are the same)
            params = prepare_params(combine(compute_view(t, compute_dtype), frozen), rng)
            return sums(params, micro, cfg, loss_chunk)
        # Q-GaLore's 8-bit weights are differentiated at their dequantized view (identity for float params)
        (nll, weight), grads = jax.value_and_grad(loss_fn, has_aux=True)(float_view(trainable))
        return nll, weight, grads

    def step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        micro_rngs = jax.random.split(rng, batch["tokens"].shape[0])

        def accumulate(carry, xs):
            micro, key = xs
            nll, weight, grads = micro_grads(state.trainable, state.frozen, micro, key)
            total_nll, total_weight, total_grads = carry
            return (total_nll + nll, total_weight + weight, jax.tree.map(jnp.add, total_grads, grads)), None

        micros = {k: batch[k] for k in batch_keys}
        if batch["tokens"].shape[0] == 1:  # no accumulation: skip the zeros and the adds of a one-trip loop
            nll, weight, grads = micro_grads(state.trainable, state.frozen, jax.tree.map(lambda a: a[0], micros),
                                             micro_rngs[0])
        else:
            zeros = jax.tree.map(jnp.zeros_like, float_view(state.trainable))
            init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
            (nll, weight, grads), _ = jax.lax.scan(accumulate, init, (micros, micro_rngs))
        denom = jnp.maximum(weight, 1.0)
        loss = nll / denom
        # keep each gradient in its parameter's dtype: a bfloat16 state must come back as bfloat16 (its donated
        # buffers reused, no recompilation on the second step)
        grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
        new_state, grad_norm, finite = guarded_update(state, grads, loss, optimizer,
                                                      jax.random.fold_in(rng, 1 << 30))
        metrics = {"loss": loss, "grad_norm": grad_norm, "loss_tokens": weight,
                   "tokens": jnp.sum(batch["segment_ids"] > 0), "finite": finite,
                   "bad_streak": new_state.bad_streak, "skipped_steps": new_state.skipped_steps}
        return new_state, metrics

    return step


def make_eval_step(cfg: ModelConfig, *, loss_chunk: int = 512) -> Callable:
    """(params, batch [A, B, T]) -> (nll sum, weight sum), summed over microbatches (no MoE aux loss)."""
    sums, batch_keys = _sums_and_keys(cfg)

    def eval_step(params, batch):
        def one(carry, micro):
            nll, weight = sums(params, micro, cfg, loss_chunk, with_aux=False)
            return (carry[0] + nll, carry[1] + weight), None
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (nll, weight), _ = jax.lax.scan(one, init, {k: batch[k] for k in batch_keys})
        return nll, weight

    return eval_step
