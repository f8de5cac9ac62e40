"""Mixture-of-experts blocks (qwen2_moe, qwen3_moe, mixtral): top-k routing, dropless expert compute, aux losses.

Letters beyond the legend of models/transformer.py: R token rows (B * T flattened), X the top-k choices of a row
(num_experts_per_tok), A = R * X assignments (row, choice).

Routing (all families): softmax over the router logits in float32, the top-k probabilities, renormalized to sum
to 1 when `norm_topk_prob` (always for mixtral; qwen2_moe / qwen3_moe read it from config.json).
Expert compute is dropless by default: assignments sorted by expert and run as grouped matmuls
(`jax.lax.ragged_dot`, group sizes = tokens per expert), weighted and summed back per row. With a capacity factor,
each expert takes at most C = ceil(capacity_factor * R * X / E) assignments of the call's R rows (padding takes
no slot); the first ones in (row, choice) order win, later ones are dropped (the token keeps its residual and its
other experts).
A dropped assignment, like a padding token's, gets the expert id E ("no expert").

The expert computation is the "moe_experts" override (models/hints.py):
  (x_RD, expert_RX, weight_RX, experts, capacity) -> out_RD,
where expert_RX holds ids in [0, E] (E = dropped), weight_RX the routing weights (0 where dropped), experts the
dict {"gate": [E, D, F], "up": [E, D, F], "down": [E, F, D]}, capacity the per-expert capacity C or None.
`local_experts` is the default; parallel/expert.py's expert-parallel version sends each assignment to the device
that holds its expert (all-to-all) and gives the same result.

Auxiliary losses (added to the training loss by the train step; they never change the forward's output):
- load balancing, as transformers' `load_balancing_loss_func` for one layer: E * sum_e f_e * p_e, with f_e the
  fraction of (real) assignments routed to e (sum_e f_e = X) and p_e the mean router probability of e; times
  `router_aux_loss_coef` when `output_router_logits` (HF applies it only then).
- router z-loss (ST-MoE): mean over real tokens of logsumexp(logits)^2, times `router_z_loss_coef`.
Both are per layer and averaged over layers (each layer adds its loss / L to the scanned aux sum). transformers
instead pools the statistics of all layers before the product; the two agree for one layer (see tests/test_moe.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxswift.models.config import ModelConfig
from jaxswift.models.hints import override


def route(h_RD, router_DE, cfg: ModelConfig):
    """-> (logits_RE float32, probs_RE float32, weight_RX float32, expert_RX int32)."""
    logits = jnp.einsum("RD,DE->RE", h_RD, router_DE.astype(h_RD.dtype), preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weight, expert = jax.lax.top_k(probs, cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
    return logits, probs, weight, expert.astype(jnp.int32)


def load_balancing_loss(probs_RE, expert_RX, mask_R) -> jax.Array:
    """E * sum_e (fraction of assignments to e) * (mean probability of e), over the rows where mask_R."""
    E = probs_RE.shape[-1]
    mask = mask_R.astype(jnp.float32)
    rows = jnp.maximum(jnp.sum(mask), 1.0)
    assigned = jnp.sum(jax.nn.one_hot(expert_RX, E, dtype=jnp.float32) * mask[:, None, None], axis=(0, 1)) / rows
    mean_prob = jnp.sum(probs_RE * mask[:, None], axis=0) / rows
    return E * jnp.sum(assigned * mean_prob)


def router_z_loss(logits_RE, mask_R) -> jax.Array:
    """Mean over the rows where mask_R of logsumexp(logits)^2."""
    mask = mask_R.astype(jnp.float32)
    z = jax.nn.logsumexp(logits_RE, axis=-1)
    return jnp.sum(mask * z * z) / jnp.maximum(jnp.sum(mask), 1.0)


def expert_capacity(rows: int, cfg: ModelConfig) -> int | None:
    """Assignments each expert takes per step (None: dropless)."""
    if cfg.capacity_factor is None:
        return None
    return math.ceil(cfg.capacity_factor * rows * cfg.num_experts_per_tok / cfg.num_experts)


def drop_over_capacity(expert_RX, mask_R, num_experts: int, capacity: int | None):
    """expert_RX with E ("no expert") for padding rows and for the assignments past each expert's capacity,
    counted in (row, choice) order over the real rows."""
    expert_RX = jnp.where(mask_R[:, None], expert_RX, num_experts)
    if capacity is None:
        return expert_RX
    flat = expert_RX.reshape(-1)
    onehot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)  # the dropped id E is all zeros
    position = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=-1) - 1  # earlier assignments to the same expert
    return jnp.where(position < capacity, flat, num_experts).reshape(expert_RX.shape)


def grouped_mlp(x_AD, group_sizes_E, experts: dict) -> jax.Array:
    """SwiGLU of each row with its group's expert; rows are sorted by expert, rows past the groups give zeros."""
    dtype = x_AD.dtype
    gate = jax.lax.ragged_dot(x_AD, experts["gate"].astype(dtype), group_sizes_E)
    up = jax.lax.ragged_dot(x_AD, experts["up"].astype(dtype), group_sizes_E)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, experts["down"].astype(dtype), group_sizes_E)


def local_experts(x_RD, expert_RX, weight_RX, experts: dict, capacity: int | None = None) -> jax.Array:
    """The default "moe_experts": all experts on this device, dropless grouped matmuls over sorted assignments.
    `capacity` is unused here (drops are already marked in expert_RX)."""
    R, X = expert_RX.shape
    E = experts["gate"].shape[0]
    flat = expert_RX.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # dropped assignments (id E) sort last, outside every group
    row = order // X
    out_AD = grouped_mlp(x_RD[row], jnp.bincount(flat, length=E).astype(jnp.int32), experts)
    weight_A = jnp.where(flat < E, weight_RX.reshape(-1), 0.0)[order].astype(out_AD.dtype)
    return jnp.zeros_like(x_RD).at[row].add(out_AD * weight_A[:, None])


def shared_expert(h_RD, layer) -> jax.Array:
    """qwen2_moe's shared expert: a SwiGLU MLP seen by every token, scaled by sigmoid(h . shared_expert_gate)."""
    dtype = h_RD.dtype
    gate = jnp.einsum("RD,DF->RF", h_RD, layer["shared_gate"].astype(dtype))
    up = jnp.einsum("RD,DF->RF", h_RD, layer["shared_up"].astype(dtype))
    out = jnp.einsum("RF,FD->RD", jax.nn.silu(gate) * up, layer["shared_down"].astype(dtype))
    scale = jax.nn.sigmoid(jnp.einsum("RD,D->R", h_RD, layer["shared_expert_gate"].astype(dtype)))
    return out * scale[:, None]


def moe_aux_loss(logits_RE, probs_RE, expert_RX, mask_R, cfg: ModelConfig) -> jax.Array:
    """This layer's share of the auxiliary loss (its losses / L, so that the sum over layers is their mean)."""
    aux = jnp.zeros((), jnp.float32)
    if cfg.aux_loss_coef:
        aux += cfg.aux_loss_coef * load_balancing_loss(probs_RE, expert_RX, mask_R)
    if cfg.router_z_loss_coef:
        aux += cfg.router_z_loss_coef * router_z_loss(logits_RE, mask_R)
    return aux / cfg.num_layers


def moe_block(h_BTD, layer, cfg: ModelConfig, segment_ids_BT=None):
    """An MoE block's feed-forward -> (out_BTD, aux). Padding tokens (segment 0) take no expert and no part in
    the aux losses; their output is only the shared expert's (qwen2_moe) or zero."""
    B, T, D = h_BTD.shape
    h_RD = h_BTD.reshape(B * T, D)
    mask_R = (jnp.ones((B * T,), bool) if segment_ids_BT is None else segment_ids_BT.reshape(-1) > 0)
    logits, probs, weight, expert = route(h_RD, layer["router"], cfg)
    aux = moe_aux_loss(logits, probs, expert, mask_R, cfg)
    expert = drop_over_capacity(expert, mask_R, cfg.num_experts, expert_capacity(B * T, cfg))
    experts = {"gate": layer["expert_gate"], "up": layer["expert_up"], "down": layer["expert_down"]}
    out = override("moe_experts", local_experts)(h_RD, expert, weight, experts, expert_capacity(B * T, cfg))
    if "shared_gate" in layer:
        out = out + shared_expert(h_RD, layer)
    return out.reshape(B, T, D), aux
