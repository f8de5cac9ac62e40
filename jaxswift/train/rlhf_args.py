"""Preference-alignment arguments: the SFT flags plus ms-swift's RLHF flags (`--rlhf_type`, `--beta`, ...).

Defaults (ms-swift's where it has one): DPO with the `sigmoid` loss, beta 0.1 (SimPO: 2.0), rpo_alpha None,
cpo_alpha 1.0, simpo_gamma 1.0, KTO weights 1.0, loss over the last assistant reply (`--loss_scale last_round`).
GKD (`--rlhf_type gkd`, train/gkd.py): beta 0.5, lmbda 0.5, temperature 0.9, max_completion_length 512, seq_kd
false (ms-swift's and TRL's); the teacher is `--teacher_model DIR` or `--teacher_url http://host:port/v1`.
The no-flag run is a few-minute CPU demo: LoRA DPO on smollm2-135m-instruct with the built-in preference set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import ClassVar, Optional

from jaxswift.errors import ConfigError
from jaxswift.losses import preference as pl
from jaxswift.train.args import TASK_FLAGS_UNUSED, SftArguments

RLHF_TYPES = ("dpo", "kto", "cpo", "simpo", "orpo", "rm", "gkd")
NEEDS_REFERENCE = ("dpo", "kto")
# GKD: the preference flags it has no use for (flag -> default), and OpenAI's bound on top log-probs per token.
GKD_UNUSED = {"loss_type": None, "loss_weights": None, "label_smoothing": 0.0, "rpo_alpha": None, "discopop_tau": 0.05,
              "cpo_alpha": 1.0, "simpo_gamma": 1.0, "desirable_weight": 1.0, "undesirable_weight": 1.0,
              "center_rewards_coefficient": None, "ref_model": None, "precompute_ref_log_probs": False}
MAX_SERVER_TOP_K = 20
# aot sorts the batch: padding items (packing, the last partial step) would enter the sort.
UNSUPPORTED_DPO = ("aot", "aot_unpaired", "aot_pair")


@dataclasses.dataclass
class RlhfArguments(SftArguments):
    RECIPE: ClassVar[str] = "rlhf"
    UNUSED: ClassVar[dict[str, str]] = dict(TASK_FLAGS_UNUSED)

    # demo defaults (overriding SFT's)
    dataset: list[str] = field(default_factory=lambda: ["builtin:preference_demo"],
                               metadata={"help": "preference files; `path#N` takes N rows"})
    output_dir: str = "output/rlhf"
    loss_scale: str = field(default="last_round", metadata={"help": "last_round | default | all: tokens scored"})
    learning_rate: float = 3e-4
    num_train_epochs: int = 1
    logging_steps: int = 2
    per_device_eval_batch_size: int = 4  # scoring passes (precompute, eval) are forward only
    demo_question: str = "Can you give me a tip for staying focused while studying?"
    # the objective
    rlhf_type: str = field(default="dpo", metadata={"help": " | ".join(RLHF_TYPES)})
    beta: Optional[float] = field(default=None, metadata={"help": "default 0.1 (simpo: 2.0); ORPO's lambda"})
    loss_type: Optional[list[str]] = field(default=None, metadata={
        "help": "dpo: sigmoid (default), hinge, ipo, robust, bco_pair, ... several combine with --loss_weights; "
                "kto: kto | apo_zero_unpaired; cpo: sigmoid | hinge | ipo | simpo | alphapo"})
    loss_weights: Optional[list[float]] = None
    label_smoothing: float = 0.0
    rpo_alpha: Optional[float] = field(default=None, metadata={"help": "adds rpo_alpha * NLL(chosen) to DPO"})
    discopop_tau: float = 0.05
    cpo_alpha: float = field(default=1.0, metadata={"help": "CPO/SimPO: weight of NLL(chosen)"})
    simpo_gamma: float = 1.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    center_rewards_coefficient: Optional[float] = None
    # the reference model
    ref_model: Optional[str] = field(default=None, metadata={
        "help": "full tuning only (default: --model); LoRA's reference is the base with adapters off"})
    precompute_ref_log_probs: bool = field(default=False, metadata={
        "help": "score the data with the reference once, before training, instead of every step"})
    # GKD: distillation from a teacher (flags used by --rlhf_type gkd only; ms-swift's / TRL's names, ms-swift's
    # teacher_model_server / gkd_logits_topk accepted as aliases)
    teacher_model: Optional[str] = field(default=None, metadata={
        "help": "gkd: the teacher in process (HF folder, .gguf, embedded name); same tokenizer as --model"})
    teacher_url: Optional[str] = field(default=None, metadata={
        "aliases": ["--teacher_model_server"],
        "help": "gkd: an OpenAI-compatible server (http://host:port/v1) scoring with top-k prompt log-probs"})
    teacher_top_k: Optional[int] = field(default=None, metadata={
        "aliases": ["--gkd_logits_topk"],
        "help": "gkd: the teacher's K most likely tokens per position (the JSD over that support, both "
                "distributions renormalised on it); default 20 with --teacher_url, full logits in process"})
    lmbda: Optional[float] = field(default=None, metadata={
        "help": "gkd: the share of steps trained on the student's own completions (on-policy), default 0.5"})
    seq_kd: bool = field(default=False, metadata={
        "help": "gkd: the other steps train on the teacher's completions instead of the dataset's"})
    temperature: Optional[float] = field(default=None, metadata={
        "help": "gkd: sampling temperature, and the temperature of both distributions in the loss (default 0.9)"})
    max_completion_length: Optional[int] = field(default=None, metadata={
        "aliases": ["--max_new_tokens"],
        "help": "gkd: completion tokens generated (and dataset replies cut to it), default 512; --max_length "
                "bounds the prompt"})

    def __post_init__(self):
        super().__post_init__()
        if self.rlhf_type not in RLHF_TYPES:
            raise ConfigError(f"--rlhf_type {self.rlhf_type!r}: expected one of {' | '.join(RLHF_TYPES)}")
        if self.beta is None:
            self.beta = {"simpo": 2.0, "gkd": 0.5}.get(self.rlhf_type, 0.1)
        self._check_gkd()
        if self.rlhf_type == "gkd":
            return
        self.loss_type = self._default_loss_type()
        self._check_objective()
        self._check_reference()

    def _check_gkd(self):
        gkd_flags = {"teacher_model": None, "teacher_url": None, "teacher_top_k": None, "lmbda": None,
                     "seq_kd": False, "temperature": None, "max_completion_length": None}
        if self.rlhf_type != "gkd":
            given = [name for name, default in gkd_flags.items() if getattr(self, name) != default]
            if given:
                raise ConfigError(f"--{given[0]} is used by --rlhf_type gkd only (got --rlhf_type {self.rlhf_type})")
            return
        for name, default in GKD_UNUSED.items():
            if getattr(self, name) != default:
                raise ConfigError(f"--{name} is not used by --rlhf_type gkd (a preference / reference-model flag)")
        if self.packing_length is not None or self.loss_chunk_size != 512:
            raise ConfigError("--packing_length / --loss_chunk_size are not used by --rlhf_type gkd (each row is one "
                              "prompt and its completion, scored whole)")
        if self.loss_scale != "last_round":
            raise ConfigError(f"--loss_scale {self.loss_scale}: gkd distils the last assistant reply (the completion "
                              "the student or the teacher may regenerate); only last_round")
        if (self.teacher_model is None) == (self.teacher_url is None):
            raise ConfigError("--rlhf_type gkd needs one teacher: --teacher_model DIR (in process) or --teacher_url "
                              "http://host:port/v1 (a server)" + (", not both" if self.teacher_model else ""))
        self.lmbda = 0.5 if self.lmbda is None else self.lmbda
        self.temperature = 0.9 if self.temperature is None else self.temperature
        self.max_completion_length = 512 if self.max_completion_length is None else self.max_completion_length
        for name in ("beta", "lmbda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name} {getattr(self, name)}: expected a value in [0, 1]")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature {self.temperature}: must be > 0 (it samples and divides the logits)")
        if self.max_completion_length < 1:
            raise ConfigError(f"--max_completion_length {self.max_completion_length}: must be >= 1")
        self._check_teacher_url()

    def _check_teacher_url(self):
        if self.teacher_url is None:
            if self.teacher_top_k is not None and self.teacher_top_k < 1:
                raise ConfigError(f"--teacher_top_k {self.teacher_top_k}: must be >= 1 (or unset: full logits)")
            return
        if not self.teacher_url.startswith(("http://", "https://")):
            raise ConfigError(f"--teacher_url {self.teacher_url!r}: expected http://host:port/v1")
        self.teacher_top_k = MAX_SERVER_TOP_K if self.teacher_top_k is None else self.teacher_top_k
        if not 1 <= self.teacher_top_k <= MAX_SERVER_TOP_K:
            raise ConfigError(f"--teacher_top_k {self.teacher_top_k}: a server returns 1 to {MAX_SERVER_TOP_K} top "
                              "log-probs per token")

    def _default_loss_type(self) -> list[str] | None:
        given = list(self.loss_type) if self.loss_type else None
        if self.rlhf_type in ("orpo", "rm"):
            if given:
                raise ConfigError(f"--loss_type is not used by --rlhf_type {self.rlhf_type}")
            return None
        default = {"dpo": "sigmoid", "kto": "kto", "cpo": "sigmoid", "simpo": "simpo"}[self.rlhf_type]
        if given and len(given) > 1 and self.rlhf_type != "dpo":
            raise ConfigError(f"--loss_type {' '.join(given)}: several loss types combine only for dpo")
        return given or [default]

    def _check_objective(self):
        if self.loss_weights is not None and self.rlhf_type != "dpo":
            raise ConfigError("--loss_weights combines DPO loss types; it is not used by "
                              f"--rlhf_type {self.rlhf_type}")
        if set(self.loss_type or ()) & set(UNSUPPORTED_DPO):
            raise ConfigError(f"--loss_type {' '.join(self.loss_type)}: aot sorts the whole batch, which padding "
                              "items would distort; jaxswift does not train it")
        try:
            self._validate_with_losses()
        except ValueError as e:
            raise ConfigError(f"--rlhf_type {self.rlhf_type}: {e}") from None

    def _validate_with_losses(self):
        """The loss module's own checks (pure Python, nothing traced), run once here so bad flags fail early."""
        pl.check_beta(self.beta)
        t = self.rlhf_type
        if t == "dpo":
            pl.dpo_plan(self.loss_type, self.loss_weights, self.rpo_alpha, "reverse_kl", self.label_smoothing,
                         self.beta)
        elif t == "kto":
            pl.check_choice("KTO loss_type", self.loss_type[0], pl.KTO_LOSS_TYPES)
        elif t in ("cpo", "simpo"):
            pl.check_choice("CPO loss_type", self.loss_type[0], pl.CPO_LOSS_TYPES)
            pl.check_label_smoothing(self.label_smoothing, self.loss_type, {"sigmoid", "simpo", "alphapo"})
        if self.label_smoothing and t in ("kto", "orpo", "rm"):
            raise ValueError(f"label_smoothing={self.label_smoothing} is not used by {t}")
        if self.center_rewards_coefficient is not None and t != "rm":
            raise ValueError("center_rewards_coefficient is used by rm only")
        if min(self.desirable_weight, self.undesirable_weight) <= 0:
            raise ValueError("desirable_weight and undesirable_weight must be > 0")

    def _check_reference(self):
        if self.rlhf_type not in NEEDS_REFERENCE:
            if self.ref_model or self.precompute_ref_log_probs:
                raise ConfigError(f"--rlhf_type {self.rlhf_type} uses no reference model: drop --ref_model and "
                                  "--precompute_ref_log_probs")
            return
        if self.tuner_type == "lora" and self.ref_model:
            raise ConfigError("--ref_model with LoRA: the reference is the base model with adapters off (no second "
                              "copy); drop --ref_model, or use --tuner_type full")
        if self.tuner_type == "full":
            self.ref_model = self.ref_model or self.model

    @property
    def needs_reference(self) -> bool:
        return self.rlhf_type in NEEDS_REFERENCE
