"""Optimizers from flags: AdamW with warmup + cosine/linear/constant schedule and global-norm clipping."""

from __future__ import annotations

import dataclasses

import jax
import optax

from jaxswift.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    if cfg.lr_scheduler_type not in SCHEDULES:
        raise ConfigError(f"--lr_scheduler_type {cfg.lr_scheduler_type!r}: expected one of {', '.join(SCHEDULES)}")
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if cfg.lr_scheduler_type == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.lr_scheduler_type == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    # HF's warmup starts at 0 and reaches the peak at step `warmup`.
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = []
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(schedule, b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


def decay_mask(params):
    """HF Trainer decays every weight but biases and norms; LoRA magnitudes (DoRA) are norms too."""
    def is_matrix(path, x):
        name = jax.tree_util.keystr(path)
        return not any(k in name for k in ("norm", "'bq'", "'bk'", "'bv'", "magnitude"))
    return jax.tree_util.tree_map_with_path(is_matrix, params)
