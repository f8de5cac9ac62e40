"""What a run trains and how: the tuner (LoRA / full, QLoRA, Q-GaLore weights), the trainable mask, the optimizer
(AdamW or GaLore) and the MoE flags over the model config."""

from __future__ import annotations

import math
import re
from typing import Callable, NamedTuple

import jax

from jaxswift.errors import ConfigError
from jaxswift.models.families import weight_maps
from jaxswift.optim.factory import OptimizerConfig, make_optimizer

GALORE_FLAGS = ("use_galore", "galore_rank", "galore_update_interval", "galore_scale", "galore_quantization",
                "galore_proj_bits", "galore_proj_group_size", "galore_cos_threshold", "galore_gamma_proj",
                "galore_queue_size")


class TunedParams(NamedTuple):
    params: dict  # the tuner's params tree: base (+ adapters)
    mask: dict  # True for trainable leaves
    lora: object | None  # the LoraConfig, None for full tuning
    prepare: Callable | None  # prepare_params(params, rng) for the step (LoRA dropout), or None


def _param_names(cfg) -> dict[tuple, tuple[str, str]]:
    """Our path -> (dotted name, HF name without the layer index), the names freeze patterns match against."""
    hf = {m.path: m.hf_name.replace("layers.{i}.", "layers.") for m in weight_maps(cfg)}
    return {path: (".".join(path), name) for path, name in hf.items()}


def _check_patterns(patterns: list[str], names: dict) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"parameter pattern {pattern!r}: invalid regex ({e})") from None
        if not any(re.search(pattern, n) for pair in names.values() for n in pair):
            raise ConfigError(f"parameter pattern {pattern!r} matches no parameter (names look like "
                              f"{', '.join(sorted(n for n, _ in names.values())[:4])}, or HF names like "
                              f"model.layers.self_attn.q_proj.weight)")


def full_tuning_mask(params, cfg, freeze: list[str], trainable: list[str]):
    """True for trainable leaves: everything, minus --freeze_parameters, plus --trainable_parameters."""
    names = _param_names(cfg)
    _check_patterns(freeze + trainable, names)

    def decide(path, _):
        key = tuple(k.key for k in path)
        pair = names.get(key, (".".join(key), ""))
        frozen = any(re.search(p, n) for p in freeze for n in pair)
        forced = any(re.search(p, n) for p in trainable for n in pair)
        return forced or not frozen

    return jax.tree_util.tree_map_with_path(decide, params)


def target_modules(values: list[str]):
    """--target_modules all-linear | q_proj v_proj ... | one regex (as peft reads a single string)."""
    if values == ["all-linear"]:
        return "all-linear"
    if len(values) == 1 and re.search(r"[\\^$*+?()\[\]|]", values[0]):
        return values[0]
    return tuple(values)


def _full_tuning(params, args, cfg) -> TunedParams:
    mask = full_tuning_mask(params, cfg, args.freeze_parameters, args.trainable_parameters)
    if not any(jax.tree.leaves(mask)):
        raise ConfigError("--freeze_parameters froze every parameter: nothing to train")
    if args.galore_quantization:  # Q-GaLore: the projected matrices kept as 8-bit codes
        from jaxswift.optim.qgalore import quantize_weights

        params = quantize_weights(params, galore_targets(cfg, args.galore_target_modules)(params),
                                  args.galore_weight_group_size)
        mask = jax.tree.map(lambda m, p: jax.tree.map(lambda _: m, p), mask, params)
    return TunedParams(params, mask, None, None)


def prepare_tuner(params, args, cfg) -> TunedParams:
    """The run's tuner over the loaded `params`: LoRA (on a quantized base with --quant_method) or full tuning."""
    if args.tuner_type == "full":
        return _full_tuning(params, args, cfg)
    from jaxswift.tuners import lora

    lora_cfg = lora.LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                               target_modules=target_modules(args.target_modules),
                               use_rslora=args.use_rslora, use_dora=args.use_dora, init=args.init_weights)
    if args.quant_method is not None:  # QLoRA: the frozen projections stored quantized, adapters in float32
        from jaxswift.quant.nf4 import quantize_params

        params = quantize_params(params, cfg, args.quant_method)
    params = lora.add_lora(params, cfg, lora_cfg, jax.random.key(args.seed))
    return TunedParams(params, lora.trainable_mask(params), lora_cfg,
                       lora.with_dropout if args.lora_dropout > 0 else None)


def build_optimizer(args, total_steps: int, cfg):
    """(optimizer, schedule): AdamW, or with --use_galore GaLore-AdamW (Q-GaLore with --galore_quantization) on the
    model `cfg`'s --galore_target_modules and AdamW on the rest."""
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
    galore = {k: getattr(args, k) for k in GALORE_FLAGS}
    mask = galore_targets(cfg, args.galore_target_modules) if args.use_galore else None
    return make_optimizer(OptimizerConfig(
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_epsilon=args.adam_epsilon, max_grad_norm=args.max_grad_norm,
        lr_scheduler_type=args.lr_scheduler_type, warmup_steps=warmup, **galore), total_steps, galore_mask=mask)


def galore_targets(cfg, modules: list[str]):
    """params -> per leaf a galore.Matrix on the targeted projections (all-linear: attention + MLP), False elsewhere
    (embeddings, norms, lm_head: AdamW). A callable, so frozen holes (None) in the trainable tree stay holes."""
    from jaxswift.optim.galore import galore_mask_for
    from jaxswift.tuners.lora import resolve_targets

    try:
        names = set(resolve_targets(cfg, target_modules(modules)))
    except ConfigError as e:
        raise ConfigError(f"--galore_target_modules: {e}") from None
    layouts = galore_mask_for(cfg)["layers"]

    def mask(params):
        def one(path, _):
            keys = [getattr(k, "key", None) for k in path]
            return layouts[keys[1]] if keys[0] == "layers" and keys[-1] in names else False
        return jax.tree_util.tree_map_with_path(one, params)

    return mask


def moe_overrides(cfg, args):
    """The MoE flags over the model's config (an error on a dense model: the flags would do nothing)."""
    given = {k: getattr(args, k) for k in ("router_aux_loss_coef", "router_z_loss_coef", "moe_expert_capacity_factor")
             if getattr(args, k, None) is not None}
    if not given:
        return cfg
    if not cfg.is_moe:
        raise ConfigError(f"{', '.join('--' + k for k in given)}: the model ({cfg.family}) has no experts")
    changes = {}
    if "router_aux_loss_coef" in given:
        changes.update(router_aux_loss_coef=given["router_aux_loss_coef"],
                       output_router_logits=given["router_aux_loss_coef"] > 0)
    if "router_z_loss_coef" in given:
        changes["router_z_loss_coef"] = given["router_z_loss_coef"]
    if "moe_expert_capacity_factor" in given:
        changes["capacity_factor"] = given["moe_expert_capacity_factor"]
    return cfg.replace(**changes)
