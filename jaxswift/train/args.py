"""SFT arguments: one flat dataclass whose field names are the CLI flags (ms-swift's names where one exists) and the
keys of a `--config` YAML file. Parsed by transformers' HfArgumentParser; flags override the file.

Defaults make the no-flag run a few-minute CPU demo (LoRA on smollm2-135m-instruct, built-in identity set, packing,
3 epochs at 3e-4); set the flags for real runs."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Any, ClassVar, Optional

import yaml

from jaxswift.data.templates import BASE_LOSS_SCALES, parse_loss_scale
from jaxswift.errors import ConfigError
from jaxswift.parallel.mesh import parse_mesh

DEFAULT_MODEL = "smollm2-135m-instruct"
TASK_TYPES = ("causal_lm", "seq_cls", "embedding", "reranker", "generative_reranker")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


@dataclasses.dataclass
class SftArguments:
    # model
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "HF folder, .gguf file, or an embedded model name"})
    dtype: str = field(default="float32", metadata={
        "help": "float32 | bfloat16: the compute dtype, and the dtype of frozen weights (LoRA bases) and of the saved "
                "HF folder; trained parameters are kept in --param_dtype"})
    torch_dtype: Optional[str] = field(default=None, metadata={"help": "ms-swift's older name of --dtype"})
    param_dtype: Optional[str] = field(default=None, metadata={
        "help": "float32 | bfloat16: the dtype of the trained parameters (master weights) and so of their optimizer "
                "state; default float32, so small updates are not rounded away under --dtype bfloat16"})
    attn_impl: Optional[str] = field(default=None, metadata={
        "help": "self-attention kernel: auto (default: cudnn on GPU, splash on TPU, einsum on CPU) | einsum | xla | "
                "cudnn | splash; ms-swift's eager = einsum, sdpa = xla, flash_attn = the backend's flash kernel"})
    # data
    dataset: list[str] = field(default_factory=lambda: ["builtin:self_identity"],
                               metadata={"help": "files or folders; `path#N` takes N rows"})
    val_dataset: list[str] = field(default_factory=list)
    split_dataset_ratio: float = 0.0
    eval_dataset: list[str] = field(default_factory=list, metadata={
        "help": "benchmark tasks scored every --eval_steps and at the end, as `jaxswift eval --eval_dataset` takes "
                "them (builtin | FORMAT=PATH | NAME:FORMAT=PATH | a task YAML); logged as eval/TASK/METRIC"})
    eval_limit: Optional[int] = field(default=None, metadata={"help": "--eval_dataset: the first N items per task"})
    system: Optional[str] = None
    max_length: int = 512
    truncation_strategy: str = field(default="delete", metadata={"help": "delete | left | right"})
    loss_scale: str = field(default="default", metadata={
        "help": "default | last_round | all, optionally + pattern weights as ms-swift: hermes (tool calls x2), react, "
                "ignore_empty_think, ignore_think_prefix; e.g. last_round+hermes. Tool results are never trained"})
    packing: bool = True  # on by default: no compute on padding (ms-swift's default is off)
    packing_length: Optional[int] = None
    # what the model is trained to do (ms-swift's task types): causal_lm is SFT on chats; the others put a head on
    # the last token's hidden state (seq_cls, reranker), pool it into a vector (embedding), or score with the LM's
    # logits of two answer tokens (generative_reranker).
    task_type: str = field(default="causal_lm", metadata={"help": " | ".join(TASK_TYPES)})
    num_labels: Optional[int] = field(default=None, metadata={"help": "seq_cls: the number of classes (1: regression)"})
    problem_type: Optional[str] = field(default=None, metadata={
        "help": "seq_cls: regression | single_label_classification | multi_label_classification (default: "
                "regression for 1 label, else single_label_classification, as transformers infers it)"})
    loss_type: Optional[str] = field(default=None, metadata={
        "help": "embedding / reranker losses by ms-swift's names (causal_lm and seq_cls: unused)"})
    # --task_type embedding (train/embedding.py checks them; other task types refuse them); unset: ms-swift's
    # environment variables, then ms-swift's defaults
    embedding_pooling: Optional[str] = field(default=None, metadata={
        "help": "embedding: last | mean (default last: the EOS token's hidden state, as Qwen3-Embedding)"})
    embedding_normalize: Optional[bool] = field(default=None, metadata={
        "help": "embedding: L2-normalise the pooled vectors (default true)"})
    infonce_temperature: Optional[float] = field(default=None, metadata={
        "help": "embedding, infonce: similarity / temperature (default $INFONCE_TEMPERATURE, else 0.1)"})
    infonce_use_batch: Optional[bool] = field(default=None, metadata={
        "help": "embedding, infonce: other rows' documents as negatives too (default $INFONCE_USE_BATCH, else true)"})
    infonce_hard_negatives: Optional[int] = field(default=None, metadata={
        "help": "embedding, infonce: hard negatives per row, cut or resampled to this count (default "
                "$INFONCE_HARD_NEGATIVES, else each row's own, padded and masked)"})
    infonce_mask_fake_negative: Optional[bool] = field(default=None, metadata={
        "help": "embedding, infonce in-batch: drop negatives scoring above the positive + --infonce_fake_neg_margin "
                "(default $INFONCE_MASK_FAKE_NEGATIVE, else false)"})
    infonce_fake_neg_margin: Optional[float] = field(default=None, metadata={
        "help": "embedding, infonce: the fake-negative margin (default $INFONCE_FAKE_NEG_MARGIN, else 0.1)"})
    infonce_include_qq: Optional[bool] = field(default=None, metadata={
        "help": "embedding, infonce in-batch: the other anchors as negatives too (default $INFONCE_INCLUDE_QQ, else "
                "false)"})
    infonce_include_dd: Optional[bool] = field(default=None, metadata={
        "help": "embedding, infonce in-batch: the documents against the positive as negatives too (default "
                "$INFONCE_INCLUDE_DD, else false)"})
    # tuner
    tuner_type: str = field(default="lora", metadata={"help": "lora | full"})
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    use_rslora: bool = False
    use_dora: bool = False
    init_weights: str = field(default="true", metadata={"help": "true | gaussian | pissa"})
    freeze_parameters: list[str] = field(default_factory=list, metadata={"help": "regexes (full tuning)"})
    trainable_parameters: list[str] = field(default_factory=list, metadata={"help": "regexes, override freezing"})
    # vision-language models (ms-swift's flags; unset: ms-swift's defaults, freeze_vit and freeze_aligner true,
    # freeze_llm false). Full tuning: a frozen part keeps its weights. LoRA with all-linear: a frozen part gets no
    # adapters. An error on a text-only model.
    freeze_vit: Optional[bool] = field(default=None, metadata={"help": "VLM: freeze the vision tower (default true)"})
    freeze_aligner: Optional[bool] = field(default=None, metadata={
        "help": "VLM: freeze the aligner (Qwen2-VL's patch merger; default true)"})
    freeze_llm: Optional[bool] = field(default=None, metadata={"help": "VLM: freeze the language model (default false)"})
    modules_to_save: list[str] = field(default_factory=list, metadata={
        "help": "VLM LoRA: parts trained in full next to the adapters and saved with them as PEFT's modules_to_save "
                "(vision | aligner): a tower trained from scratch, with LoRA on the LLM"})
    vit_lr: Optional[float] = field(default=None, metadata={"help": "VLM: the vision tower's learning rate "
                                                                    "(default --learning_rate; same schedule)"})
    aligner_lr: Optional[float] = field(default=None, metadata={"help": "VLM: the aligner's learning rate "
                                                                        "(default --learning_rate; same schedule)"})
    quant_method: Optional[str] = field(default=None, metadata={
        "help": "QLoRA: nf4 | int8 (base projections stored quantized, dequantized in the matmul; lora only)"})
    # GaLore / Q-GaLore (full tuning): low-rank projected AdamW on the attention and MLP matrices
    use_galore: bool = False
    galore_rank: int = 128
    galore_update_interval: int = field(default=200, metadata={"help": "steps between projector refreshes"})
    galore_scale: float = 0.25
    galore_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={
        "help": "all-linear (attention + MLP) or module names (q_proj ... / wq ...)"})
    galore_quantization: bool = field(default=False, metadata={
        "help": "Q-GaLore: int8 weights with stochastic rounding, 4-bit projectors, lazy subspace updates"})
    galore_proj_bits: int = 4
    galore_proj_group_size: int = 256
    galore_weight_group_size: int = 256
    galore_cos_threshold: float = 0.4
    galore_gamma_proj: int = 2
    galore_queue_size: int = 5
    # optimization
    learning_rate: float = 3e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "cosine | linear | constant"})
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    num_train_epochs: int = field(default=5, metadata={
        "help": "5 fits the built-in identity demo: at 3 the taught answer still degenerates into repetition"})
    max_steps: int = -1
    gradient_checkpointing: bool = True
    loss_chunk_size: int = field(default=512, metadata={"help": "sequence chunk of the cross-entropy"})
    max_nonfinite_steps: int = field(default=5, metadata={"help": "stop after this many non-finite steps in a row"})
    seed: int = 42
    # observability and checkpoints
    output_dir: str = "output/sft"
    logging_steps: int = 5
    eval_steps: int = 50
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    resume_from_checkpoint: Optional[str] = None
    disable_tqdm: bool = False
    # parallelism
    mesh: Optional[str] = field(default=None, metadata={"help": "4x2 (data x tensor) or data=2,fsdp=2,tensor=2"})
    sharding_rules: str = "default"
    num_microbatches: Optional[int] = field(default=None, metadata={
        "help": "pipeline (mesh axis stage > 1): microbatches per step; default one per stage"})
    virtual_stages: int = field(default=1, metadata={"help": "pipeline: layer chunks per stage (> 1: circular)"})
    pipeline_schedule: str = field(default="auto", metadata={"help": "auto | gpipe | circular"})
    # mixture of experts (None: the model's config.json)
    router_aux_loss_coef: Optional[float] = field(default=None, metadata={
        "help": "MoE load-balancing loss weight (> 0 turns it on, as output_router_logits does in HF)"})
    router_z_loss_coef: Optional[float] = None
    moe_expert_capacity_factor: Optional[float] = field(default=None, metadata={
        "help": "MoE: tokens per expert = ceil(factor x tokens x top_k / experts), the rest dropped; unset: dropless"})
    ring_attention_layout: str = field(default="zigzag", metadata={
        "help": "sequence parallelism: zigzag | striped | contiguous (causal load balancing)"})
    sequence_parallel: str = field(default="ring", metadata={
        "help": "attention on a --mesh with sequence > 1 (ms-swift's sequence_parallel_size is that axis's size): "
                "ring (ring attention: key/value blocks go round the devices) | ulysses (all-to-all from a split "
                "over tokens to a split over heads, which must divide by the sequence size)"})
    # multi-process (docs/multihost.md): else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, TPU/SLURM
    coordinator_address: Optional[str] = field(default=None, metadata={"help": "HOST:PORT of process 0"})
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    # demo: the answer to this question before and after training (empty to skip)
    demo_question: str = "Who are you, and who made you?"
    demo_max_new_tokens: int = 48
    config: Optional[str] = field(default=None, metadata={"help": "YAML file with the same keys as the flags"})

    # Flags this recipe inherits but has no use for: flag -> why. Giving one a value is an error, never ignored.
    UNUSED: ClassVar[dict[str, str]] = {}
    RECIPE: ClassVar[str] = "sft"

    def __post_init__(self):
        self._reject_unused()
        self._merge_dtype_flags()
        checks = {
            "tuner_type": (self.tuner_type, ("lora", "full")),
            "truncation_strategy": (self.truncation_strategy, ("delete", "left", "right")),
            "dtype": (self.dtype, ("float32", "bfloat16")),
            "task_type": (self.task_type, TASK_TYPES),
            "init_weights": (self.init_weights, ("true", "gaussian", "pissa")),
            "pipeline_schedule": (self.pipeline_schedule, ("auto", "gpipe", "circular")),
            "ring_attention_layout": (self.ring_attention_layout, ("zigzag", "striped", "contiguous")),
            "sequence_parallel": (self.sequence_parallel, ("ring", "ulysses")),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ConfigError(f"--{name} {value!r}: expected one of {' | '.join(allowed)}")
        if parse_loss_scale(self.loss_scale).patterns and self.RECIPE != "sft":
            raise ConfigError(f"--loss_scale {self.loss_scale}: weighted loss scales are for SFT; {self.RECIPE} takes "
                              f"{' | '.join(BASE_LOSS_SCALES)}")
        positive = ("max_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "lora_rank", "logging_steps", "eval_steps", "save_steps",
                    "virtual_stages")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set --max_steps or --num_train_epochs to a positive number")
        if self.num_microbatches is not None and self.num_microbatches <= 0:
            raise ConfigError(f"--num_microbatches must be positive, got {self.num_microbatches}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate must be positive, got {self.learning_rate}")
        for name in ("vit_lr", "aligner_lr"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_limit is not None and (self.eval_limit < 1 or not self.eval_dataset):
            raise ConfigError(f"--eval_limit {self.eval_limit}: needs --eval_dataset and a value >= 1")
        self._check_memory_flags()
        self._check_task_flags()
        self._check_sequence_parallel()

    def _check_sequence_parallel(self):
        """--sequence_parallel ulysses needs a sequence axis, and takes no ring layout (never silently ignored)."""
        if self.sequence_parallel != "ulysses":
            return
        if parse_mesh(self.mesh)["sequence"] <= 1:
            raise ConfigError(f"--sequence_parallel ulysses needs a --mesh with a sequence axis > 1 (got --mesh "
                              f"{self.mesh!r}), for example --mesh sequence=4")
        if self.ring_attention_layout != "zigzag":
            raise ConfigError(f"--ring_attention_layout {self.ring_attention_layout} balances ring attention; "
                              f"--sequence_parallel ulysses attends over whole rows and keeps the tokens in order")

    def _merge_dtype_flags(self):
        """--torch_dtype is --dtype by ms-swift's older name (both given: they must agree); --param_dtype and
        --attn_impl are checked here so that a typo fails before the model loads."""
        from jaxswift.models.attention_kernels import normalize_attn_impl

        if self.torch_dtype is not None:
            if self.dtype != "float32" and self.dtype != self.torch_dtype:
                raise ConfigError(f"--torch_dtype {self.torch_dtype} and --dtype {self.dtype} disagree: give one")
            self.dtype, self.torch_dtype = self.torch_dtype, None
        if self.param_dtype is not None and self.param_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"--param_dtype {self.param_dtype!r}: expected float32 | bfloat16")
        normalize_attn_impl(self.attn_impl)

    @property
    def master_dtype(self) -> str:
        """The dtype trained parameters and their optimizer state are kept in."""
        return self.param_dtype or "float32"

    def _check_task_flags(self):
        if self.num_labels is not None and (self.task_type != "seq_cls" or self.num_labels < 1):
            raise ConfigError(f"--num_labels {self.num_labels}: needs --task_type seq_cls and a value >= 1")
        if self.problem_type is not None:
            if self.task_type != "seq_cls":
                raise ConfigError(f"--problem_type {self.problem_type}: needs --task_type seq_cls")
            if self.problem_type not in PROBLEM_TYPES:
                raise ConfigError(f"--problem_type {self.problem_type!r}: expected one of {' | '.join(PROBLEM_TYPES)}")
        if self.task_type == "seq_cls" and self.num_labels is None:
            raise ConfigError("--task_type seq_cls needs --num_labels (the number of classes; 1 for regression)")

    def _reject_unused(self):
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(self) if f.name in self.UNUSED}
        for name, why in self.UNUSED.items():
            if getattr(self, name) != defaults[name]:
                raise ConfigError(f"--{name} is not used by {self.RECIPE}: {why}")

    def _check_memory_flags(self):
        """QLoRA needs LoRA; GaLore needs full tuning (LoRA adapters are already low rank: nothing to project)."""
        if self.quant_method is not None:
            if self.quant_method not in ("nf4", "int8"):
                raise ConfigError(f"--quant_method {self.quant_method!r}: expected nf4 | int8 (QLoRA base weights)")
            if self.tuner_type != "lora":
                raise ConfigError(f"--quant_method {self.quant_method} stores the frozen base quantized, which needs "
                                  f"--tuner_type lora (got {self.tuner_type})")
            if self.use_dora or self.init_weights == "pissa":
                raise ConfigError("--quant_method: DoRA and PiSSA read or rewrite the base weights in float; use "
                                  "plain LoRA or rsLoRA with a quantized base")
        if self.galore_quantization and not self.use_galore:
            raise ConfigError("--galore_quantization true is Q-GaLore and needs --use_galore true")
        if not self.use_galore:
            return
        if self.tuner_type != "full":
            raise ConfigError("--use_galore projects full-rank gradients: use --tuner_type full (LoRA adapters are "
                              "already low rank)")
        for name in ("galore_rank", "galore_update_interval", "galore_proj_group_size", "galore_weight_group_size",
                     "galore_queue_size", "galore_gamma_proj"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if self.galore_scale <= 0:
            raise ConfigError(f"--galore_scale must be positive, got {self.galore_scale}")
        if self.galore_proj_bits not in (4, 8):
            raise ConfigError(f"--galore_proj_bits {self.galore_proj_bits}: expected 4 or 8")


def _read_yaml(path: str, fields: set[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of flag names to values")
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {', '.join(unknown)} (keys are the recipe's flag names)")
    return raw


def parse_args(cls, argv: list[str] | None):
    """Flags -> dataclass; `--config FILE` supplies defaults that flags override. Unknown flags are errors."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        values = _read_yaml(pre.config, names - {"config"})
        parser.set_defaults(**{k: v for k, v in values.items()})
    try:
        (args,) = parser.parse_args_into_dataclasses(argv, return_remaining_strings=False)
    except ValueError as e:
        raise ConfigError(str(e).replace("\n", " ")) from None
    return args


# The task-type flags, for the trainers that train a causal LM only (RLHF, GRPO).
TASK_FLAGS_UNUSED = {name: "preference and RL training train a causal LM (--task_type is an SFT flag)"
                     for name in ("task_type", "num_labels", "problem_type", "embedding_pooling",
                                  "embedding_normalize", "infonce_temperature", "infonce_use_batch",
                                  "infonce_hard_negatives", "infonce_mask_fake_negative", "infonce_fake_neg_margin",
                                  "infonce_include_qq", "infonce_include_dd")}
