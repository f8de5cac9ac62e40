"""The recipe tabs: one entry per recipe. A new recipe gets its tab by adding an entry here; every field of its
arguments dataclass is reachable (the `common` ones first, the rest under "Advanced"). The arguments are named by
their public "module:Class" path only, so the trainers can move code around behind them."""

from __future__ import annotations

from jaxswift.webui.forms import RecipeSpec

TRAIN_CHOICES = {
    "tuner_type": ("lora", "full"),
    "dtype": ("float32", "bfloat16"),
    "lr_scheduler_type": ("cosine", "linear", "constant"),
    "truncation_strategy": ("delete", "left", "right"),
    "loss_scale": ("default", "last_round", "all"),
    "init_weights": ("true", "gaussian", "pissa"),
    "quant_method": ("", "nf4", "int8"),
}
TRAIN_PATHS = {"model": "model", "dataset": "dataset", "val_dataset": "dataset", "config": "file",
               "resume_from_checkpoint": "file", "ref_model": "model"}
TRAIN_COMMON = ("model", "dataset", "tuner_type", "lora_rank", "lora_alpha", "learning_rate", "num_train_epochs",
                "max_steps", "max_length", "per_device_train_batch_size", "gradient_accumulation_steps",
                "logging_steps", "save_steps", "output_dir")

RECIPES: tuple[RecipeSpec, ...] = (
    RecipeSpec("sft", "sft", "jaxswift.recipes.sft", "jaxswift.train.args:SftArguments",
               common=TRAIN_COMMON + ("packing", "mesh"), paths=TRAIN_PATHS,
               # SFT also weighs agent (tool-call) rows; preference training takes 0/1 masks only
               choices={**TRAIN_CHOICES, "loss_scale": TRAIN_CHOICES["loss_scale"] + (
                   "hermes", "last_round+hermes", "react", "ignore_empty_think")}),
    RecipeSpec("rlhf", "rlhf", "jaxswift.recipes.rlhf", "jaxswift.train.rlhf_args:RlhfArguments",
               common=("rlhf_type", "beta", "loss_type") + TRAIN_COMMON,
               choices={**TRAIN_CHOICES, "rlhf_type": ("dpo", "kto", "cpo", "simpo", "orpo", "rm", "gkd")},
               paths=TRAIN_PATHS),
    RecipeSpec("grpo", "grpo", "jaxswift.recipes.grpo", "jaxswift.train.grpo_args:GrpoArguments",
               common=("loss_type", "reward_funcs", "reward_weights", "num_generations", "max_completion_length",
                       "temperature", "beta", "epsilon") + TRAIN_COMMON,
               choices={**TRAIN_CHOICES, "loss_type": ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"),
                        "advantage_estimator": ("grpo", "rloo", "reinforce_plus_plus"),
                        "scale_rewards": ("group", "batch", "none"), "rollout_backend": ("generate", "engine"),
                        "rollout_mode": ("colocate", "server"),
                        "importance_sampling_level": ("token", "sequence")},
               paths=TRAIN_PATHS),
    RecipeSpec("eval", "eval", "jaxswift.recipes.eval", "jaxswift.recipes.eval:EvalArguments",
               common=("model", "adapters", "eval_dataset", "eval_limit", "output_dir"),
               paths={"model": "model", "adapters": "file", "config": "file"}),
    RecipeSpec("export", "export", "jaxswift.recipes.export", "jaxswift.recipes.export:ExportArguments",
               common=("adapters", "model", "merge_lora", "quant_method", "quant_bits", "group_size", "dataset",
                       "output_dir"),
               choices={"quant_method": ("", "gptq", "awq", "fp8", "int8"), "dtype": ("", "float32", "bfloat16")},
               paths={"model": "model", "adapters": "file", "dataset": "dataset", "config": "file"}),
    RecipeSpec("plan", "plan", "jaxswift.recipes.plan", "jaxswift.train.plan:PlanArguments",
               common=("model", "mesh", "tuner_type", "quant_method", "max_length", "per_device_train_batch_size",
                       "dtype"),
               choices={"tuner_type": ("full", "lora", "qlora"), "dtype": ("float32", "bfloat16"),
                        "quant_method": ("", "nf4", "int8")},
               paths={"model": "model", "config": "file"}, launches_run=False),
)


def available_recipes() -> list[RecipeSpec]:
    return [spec for spec in RECIPES if spec.available()]


def recipe(key: str) -> RecipeSpec:
    for spec in RECIPES:
        if spec.key == key:
            return spec
    raise KeyError(key)
