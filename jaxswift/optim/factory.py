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
    # GaLore (galore_torch's GaLoreAdamW) on the leaves the galore mask marks; Q-GaLore with galore_quantization
    use_galore: bool = False
    galore_rank: int = 128
    galore_update_interval: int = 200
    galore_scale: float = 0.25
    galore_quantization: bool = False
    galore_proj_bits: int = 4
    galore_proj_group_size: int = 256
    galore_cos_threshold: float = 0.4
    galore_gamma_proj: int = 2
    galore_queue_size: int = 5


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


def make_optimizer(cfg: OptimizerConfig, total_steps: int, *, galore_mask=None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """galore_mask (with cfg.use_galore): per trainable leaf a galore.Matrix (projected) or False (AdamW), as a
    pytree or a callable of the params (see `galore.galore_mask_for`)."""
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = []
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    if cfg.use_galore:
        parts.append(_galore(cfg, schedule, galore_mask))
    else:
        parts.append(optax.adamw(schedule, b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon,
                                 weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


def _galore(cfg: OptimizerConfig, schedule, galore_mask) -> optax.GradientTransformation:
    if galore_mask is None:
        raise ConfigError("--use_galore needs the GaLore target matrices (galore_mask)")
    common = dict(rank=cfg.galore_rank, update_proj_gap=cfg.galore_update_interval, scale=cfg.galore_scale,
                  weight_decay=cfg.weight_decay, b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon,
                  galore_mask=galore_mask, decay_mask=decay_mask)
    if not cfg.galore_quantization:
        from jaxswift.optim.galore import galore_adamw

        return galore_adamw(schedule, **common)
    from jaxswift.optim.qgalore import qgalore_adamw

    return qgalore_adamw(schedule, proj_bits=cfg.galore_proj_bits, proj_group_size=cfg.galore_proj_group_size,
                         cos_threshold=cfg.galore_cos_threshold, gamma_proj=cfg.galore_gamma_proj,
                         queue_size=cfg.galore_queue_size, **common)


def decay_mask(params):
    """HF Trainer decays every weight but biases and norms; LoRA magnitudes (DoRA) are norms too."""
    def is_matrix(path, x):
        name = jax.tree_util.keystr(path)
        return not any(k in name for k in ("norm", "'bq'", "'bk'", "'bv'", "magnitude"))
    return jax.tree_util.tree_map_with_path(is_matrix, params)
