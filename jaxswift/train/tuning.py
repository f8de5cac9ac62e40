"""What a run trains and how: the tuner (LoRA / full, QLoRA, Q-GaLore weights), the trainable mask, the optimizer
(AdamW or GaLore) and the MoE flags over the model config."""

from __future__ import annotations

import math
import re
from typing import Callable, NamedTuple

import jax
import optax

from jaxswift.errors import ConfigError
from jaxswift.models.config import DTYPES
from jaxswift.models.families import weight_maps
from jaxswift.models.vision import VLMConfig
from jaxswift.optim.factory import OptimizerConfig, make_optimizer
from jaxswift.train.state import master_weights

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
    """The run's tuner over the loaded `params`: LoRA (on a quantized base with --quant_method) or full tuning.

    Trained float leaves are kept in --param_dtype (default float32: master weights, and so a float32 optimizer
    state) whatever --dtype computes in; frozen leaves (LoRA bases) stay as loaded, in --dtype. Q-GaLore keeps its
    own 8-bit weights."""
    tuned = _tuner(params, args, cfg)
    if getattr(args, "galore_quantization", False):
        return tuned
    master = getattr(args, "param_dtype", None) or "float32"
    return tuned._replace(params=master_weights(tuned.params, tuned.mask, DTYPES[master]))


def _tuner(params, args, cfg) -> TunedParams:
    check_vlm_flags(args, cfg)
    if isinstance(cfg, VLMConfig):
        return prepare_vlm_tuner(params, args, cfg)
    if "modules_to_save" not in getattr(args, "UNUSED", {}) and getattr(args, "modules_to_save", None):
        raise ConfigError(f"--modules_to_save {' '.join(args.modules_to_save)}: names parts of a vision-language "
                          f"model (vision, aligner); {getattr(args, 'model', 'the model')} is a text-only model")
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
    model `cfg`'s --galore_target_modules and AdamW on the rest. A vision-language model's --vit_lr / --aligner_lr
    scale its parts' updates (`part_learning_rates`)."""
    check_vlm_flags(args, cfg)
    if isinstance(cfg, VLMConfig):
        if args.use_galore:
            raise ConfigError("--use_galore is not supported on vision-language models yet")
        optimizer, schedule = _text_optimizer(args, total_steps, cfg.text)
        return part_learning_rates(optimizer, args), schedule
    return _text_optimizer(args, total_steps, cfg)


def _text_optimizer(args, total_steps: int, cfg):
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


# ------------------------------------------------------------------------------------- vision-language models
# ms-swift's parts: vit = params["vision"], aligner = params["aligner"], llm = params["llm"].

VLM_PART_FLAGS = {"vision": "freeze_vit", "aligner": "freeze_aligner", "llm": "freeze_llm"}
VLM_FREEZE_DEFAULTS = {"freeze_vit": True, "freeze_aligner": True, "freeze_llm": False}  # ms-swift's
VLM_LR_FLAGS = {"vision": "vit_lr", "aligner": "aligner_lr"}


def check_vlm_flags(args, cfg) -> None:
    """The vision-language flags on a text-only model are an error (they would do nothing)."""
    unused = getattr(args, "UNUSED", {})  # a recipe that rejects the flags itself (RLHF, GRPO) never reads them
    given = [f"--{f}" for f in (*VLM_FREEZE_DEFAULTS, *VLM_LR_FLAGS.values())
             if f not in unused and getattr(args, f, None) is not None]
    if given and not isinstance(cfg, VLMConfig):
        raise ConfigError(f"{', '.join(given)}: {getattr(args, 'model', 'the model')} is a text-only model "
                          f"({cfg.family}); these flags choose how a vision-language model's vision tower (vit), "
                          "aligner and LLM train")


def frozen_parts(args) -> tuple[str, ...]:
    """The parts --freeze_vit / --freeze_aligner / --freeze_llm freeze (unset: ms-swift's defaults)."""
    def frozen(flag):
        value = getattr(args, flag, None)
        return VLM_FREEZE_DEFAULTS[flag] if value is None else value
    return tuple(part for part, flag in VLM_PART_FLAGS.items() if frozen(flag))


def _vlm_full_mask(params, args):
    """Full tuning: a frozen part's leaves are False; --freeze_parameters / --trainable_parameters (regexes over
    our dotted names, e.g. vision.layers.wqkv, llm.layers.wq) then freeze or unfreeze single leaves."""
    frozen_set = frozen_parts(args)
    names = {tuple(k.key for k in path): ".".join(k.key for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    patterns = [*args.freeze_parameters, *args.trainable_parameters]
    _check_patterns(patterns, {path: (name, "") for path, name in names.items()})

    def decide(path, _):
        name = names[tuple(k.key for k in path)]
        if any(re.search(p, name) for p in args.trainable_parameters):
            return True
        return path[0].key not in frozen_set and not any(re.search(p, name) for p in args.freeze_parameters)

    return jax.tree_util.tree_map_with_path(decide, params)


def prepare_vlm_tuner(params, args, cfg: VLMConfig) -> TunedParams:
    """ms-swift's semantics. Full tuning: the frozen parts keep their weights. LoRA: --target_modules all-linear
    adapts every linear of the parts that are not frozen (so by default the LLM only); named or regex targets
    adapt exactly the modules they name, in any part (tuners/vlm_lora.resolve_vlm_targets)."""
    for flag, value in (("quant_method", args.quant_method), ("use_galore", args.use_galore)):
        if value:
            raise ConfigError(f"--{flag} is not supported on vision-language models yet")
    if args.tuner_type == "full":
        if args.modules_to_save:
            raise ConfigError("--modules_to_save names the parts LoRA training updates in full; --tuner_type full "
                              "already trains every part that is not frozen")
        mask = _vlm_full_mask(params, args)
        if not any(jax.tree.leaves(mask)):
            raise ConfigError(f"nothing to train: {', '.join('--' + VLM_PART_FLAGS[p] for p in frozen_parts(args))} "
                              "froze every part (and --freeze_parameters the rest)")
        return TunedParams(params, mask, None, None)
    if args.freeze_parameters or args.trainable_parameters:
        raise ConfigError("--freeze_parameters / --trainable_parameters apply to full tuning (--tuner_type full); "
                          "with LoRA only the adapters train (and the parts of --modules_to_save)")
    from jaxswift.tuners import lora
    from jaxswift.tuners.vlm_lora import add_vlm_lora, resolve_vlm_targets

    saved = modules_to_save(args)
    targets = target_modules(args.target_modules)
    if targets == "all-linear":
        parts = tuple(p for p in VLM_PART_FLAGS if p not in frozen_parts(args) and p not in saved)
        modules, llm_targets = None, "all-linear"
        if not parts:
            raise ConfigError("--target_modules all-linear with --freeze_vit, --freeze_aligner and --freeze_llm all "
                              "true adapts nothing: unfreeze a part or name the modules")
    else:
        modules = resolve_vlm_targets(cfg, targets)
        both = [p for p in saved if modules.get(p)]
        if both:
            raise ConfigError(f"--target_modules adapts the {' and '.join(both)} part, which --modules_to_save "
                              "trains in full: a part is one or the other")
        # the LLM's targets are read only when "llm" is among the parts; LoraConfig wants a non-empty value
        parts, llm_targets = tuple(modules), modules.get("llm") or "all-linear"
    lora_cfg = lora.LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                               target_modules=llm_targets, use_rslora=args.use_rslora, use_dora=args.use_dora,
                               init=args.init_weights)
    params = add_vlm_lora(params, cfg, lora_cfg, jax.random.key(args.seed), parts=parts, modules=modules)
    mask = {part: jax.tree.map(lambda _: True, tree) if part in saved else tree
            for part, tree in lora.trainable_mask(params).items()}
    return TunedParams(params, mask, lora_cfg, lora.with_dropout if args.lora_dropout > 0 else None)


def modules_to_save(args) -> tuple[str, ...]:
    """--modules_to_save: the VLM parts (vision, aligner) LoRA training updates in full, as PEFT's modules_to_save
    does (ms-swift's "LoRA on the LLM, full ViT" recipe). A part its --freeze_* flag freezes explicitly is a
    contradiction; an unset flag's default (frozen tower) gives way."""
    parts = tuple(dict.fromkeys(getattr(args, "modules_to_save", None) or ()))
    for part in parts:
        if part not in ("vision", "aligner"):
            raise ConfigError(f"--modules_to_save {part!r}: expected vision or aligner (the LLM trains through "
                              "its adapters, or in full with --tuner_type full)")
        if getattr(args, VLM_PART_FLAGS[part]) is True:
            raise ConfigError(f"--modules_to_save {part} trains the part that --{VLM_PART_FLAGS[part]} true freezes")
    return parts


def part_learning_rates(optimizer, args):
    """--vit_lr / --aligner_lr: the part's updates scaled by its lr / --learning_rate (optax.multi_transform over
    the params' top-level keys). The updates are AdamW's lr x (Adam direction + weight decay x param), so the
    scaled update is AdamW's with the part's lr; the schedule's shape and the global gradient clipping are
    shared, as in ms-swift's parameter groups."""
    ratios = {part: (getattr(args, flag) if getattr(args, flag) is not None else args.learning_rate)
              / args.learning_rate for part, flag in VLM_LR_FLAGS.items()}
    if all(r == 1.0 for r in ratios.values()):
        return optimizer
    transforms = {part: optax.scale(r) for part, r in ratios.items()} | {"llm": optax.identity()}

    def labels(params):  # a reward model's value head (a top-level key beside the parts) trains with the LLM
        return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key if path[0].key in transforms else "llm",
                                                params)

    return optax.chain(optimizer, optax.multi_transform(transforms, labels))
