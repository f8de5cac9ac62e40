"""GRPO-family arguments: the SFT flags plus TRL / ms-swift's GRPO flags (same names).

Defaults, and why:
- loss_type grpo, beta 0.04 (ms-swift's; TRL 1.16 defaults to dapo with beta 0). With LoRA the reference costs no
  memory (the base with adapters off), and a small k3 KL keeps a tiny model's sampling from collapsing on a
  few-hundred-prompt task; `grpo` (per-sequence means) is the loss the GRPO paper and most recipes report.
  Set --beta 0 to skip the reference forward entirely.
- epsilon 0.2 (epsilon_high = epsilon unless set; DAPO uses 0.28), scale_rewards group, advantage_estimator grpo.
- The no-flag run is the CPU demo: LoRA on smollm2-135m-instruct over the built-in arithmetic task, rewarded by
  exact answer (accuracy: the last number of the reply equals the solution); sampled at temperature 0.7
  (SmolLM2-135M at 1.0 rambles). About a third of its first replies are right, mostly lost to trailing text with
  more numbers; a format reward (plain_answer, ~0.4 from the start) would only make the start look better.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import ClassVar, Optional

from jaxswift.errors import ConfigError
from jaxswift.losses import policy as pl
from jaxswift.train.args import TASK_FLAGS_UNUSED, SftArguments


DEMO_REWARDS = ["accuracy"]


@dataclasses.dataclass
class GrpoArguments(SftArguments):
    RECIPE: ClassVar[str] = "grpo"
    UNUSED: ClassVar[dict[str, str]] = {
        "val_dataset": "GRPO has no validation loss (its rewards are logged every step; --eval_dataset scores tasks)",
        "split_dataset_ratio": "GRPO has no validation loss (its rewards are logged every step; --eval_dataset "
                               "scores tasks)",
        "per_device_eval_batch_size": "GRPO has no validation loss (its rewards are logged every step; "
                                      "--eval_dataset scores tasks)",
        "packing": "rollout rows (a prompt and its completion) are never packed",
        "packing_length": "rollout rows (a prompt and its completion) are never packed",
        "loss_scale": "the policy loss covers exactly the sampled completion tokens",
        "loss_chunk_size": "completions are scored whole (--max_completion_length tokens), not in chunks",
        **TASK_FLAGS_UNUSED,
    }

    # demo defaults (overriding SFT's)
    packing: bool = False
    dataset: list[str] = field(default_factory=lambda: ["builtin:arithmetic"],
                               metadata={"help": "prompt rows (prompt | messages | query, plus reward columns)"})
    output_dir: str = "output/grpo"
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "constant"
    lora_dropout: float = 0.0  # rollouts sample without dropout; training the same keeps ratio 1 on-policy
    num_train_epochs: int = 1
    max_steps: int = 24
    max_length: int = 256  # prompt tokens (longer prompts are skipped and counted)
    per_device_train_batch_size: int = 16  # completions per micro-batch (a multiple of num_generations overall)
    logging_steps: int = 2
    save_steps: int = 1000
    demo_question: str = "What is 7 + 8? Reply with only the number."
    demo_max_new_tokens: int = 16
    # rollouts
    num_generations: int = field(default=8, metadata={"help": "completions sampled per prompt (G)"})
    max_completion_length: int = 16
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    rollout_backend: str = field(default="generate", metadata={
        "help": "generate (one jitted batch, each prompt prefilled once for its G rows: the faster for a step's "
                "rollouts, which all start together) | engine (JaxEngine: paged KV cache, continuous batching)"})
    # rewards
    reward_funcs: list[str] = field(default_factory=lambda: list(DEMO_REWARDS), metadata={
        "help": "built-ins (accuracy, format, answer_format, plain_answer, cosine, repetition, soft_overlong, env) or "
                "module:function plugins"})
    reward_weights: Optional[list[float]] = field(default=None, metadata={
        "help": "one weight per reward function (default: 1 each)"})
    soft_cache_length: int = field(default=4, metadata={"help": "soft_overlong: tokens of the linear penalty"})
    repetition_n_grams: int = 3
    repetition_max_penalty: float = -1.0
    # the objective
    loss_type: str = field(default="grpo", metadata={"help": " | ".join(pl.LOSS_TYPES)})
    importance_sampling_level: str = field(default="token", metadata={"help": "token | sequence (GSPO)"})
    advantage_estimator: str = field(default="grpo", metadata={"help": " | ".join(pl.ADVANTAGE_ESTIMATORS)})
    scale_rewards: str = field(default="group", metadata={"help": "group | batch | none"})
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    delta: Optional[float] = None
    beta: float = 0.04
    kl_in_reward: bool = field(default=False, metadata={
        "help": "subtract beta * KL(old || ref) from the reward instead of adding beta * KL to the loss"})
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    num_iterations: int = field(default=1, metadata={"help": "optimizer steps per rollout batch (mu)"})
    dynamic_sample: bool = field(default=False, metadata={"help": "DAPO: drop groups whose rewards are all equal"})
    max_resample_times: int = 3
    overlong_filter: bool = field(default=False, metadata={"help": "DAPO: no loss on truncated completions"})
    # multi-turn
    multi_turn_env: Optional[str] = field(default=None, metadata={
        "help": "builtin:arithmetic_retry or module:factory (reset/step environment)"})
    max_turns: int = 1
    # rollout placement (ms-swift's --vllm_mode / --async_generate)
    rollout_mode: str = field(default="colocate", metadata={
        "help": "colocate (rollouts on the trainer's devices, between steps) | server (a `jaxswift rollout` "
                "process at --rollout_url samples; the trainer pushes its weights after each generation's updates)"})
    rollout_url: Optional[str] = field(default=None, metadata={"help": "server mode: http://HOST:PORT of the "
                                                                       "rollout server"})
    rollout_timeout: float = field(default=240.0, metadata={
        "help": "server mode: seconds to wait for the server at start, and for any one answer"})
    async_generate: bool = field(default=False, metadata={
        "help": "server mode: request the next generation's rollouts before this one's updates (one step "
                "off-policy, corrected by the ratio to the rollout's own log-probs)"})

    def __post_init__(self):
        super().__post_init__()
        for name, value, allowed in (("rollout_backend", self.rollout_backend, ("engine", "generate")),):
            if value not in allowed:
                raise ConfigError(f"--{name} {value!r}: expected one of {' | '.join(allowed)}")
        for name in ("num_generations", "max_completion_length", "num_iterations", "max_turns", "soft_cache_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        try:
            self.loss_config()
            pl.check_advantage_args(self.advantage_estimator, self.scale_rewards, self.num_generations)
            from jaxswift.infer.rollout import RolloutSampling
            RolloutSampling(self.temperature, self.top_p, self.top_k, self.max_completion_length)
        except ValueError as e:
            raise ConfigError(f"--{_flag_of(str(e))}: {e}") from None
        if self.kl_in_reward and self.beta == 0:
            raise ConfigError("--kl_in_reward needs --beta > 0 (the KL's weight in the reward)")
        if self.multi_turn_env is None and self.max_turns > 1:
            raise ConfigError("--max_turns > 1 needs an environment: set --multi_turn_env")
        self._check_rollout_placement()
        if self.soft_cache_length >= self.max_completion_length and "soft_overlong" in self.reward_funcs:
            raise ConfigError(f"--soft_cache_length {self.soft_cache_length} must be < --max_completion_length "
                              f"{self.max_completion_length}")

    def _check_rollout_placement(self):
        if self.rollout_mode not in ("colocate", "server"):
            raise ConfigError(f"--rollout_mode {self.rollout_mode!r}: expected colocate | server")
        if self.rollout_mode == "colocate":
            for name in ("rollout_url", "async_generate", "rollout_timeout"):
                if getattr(self, name) != getattr(GrpoArguments, name):
                    raise ConfigError(f"--{name} needs --rollout_mode server (colocated rollouts use the trainer's "
                                      "own weights: nothing to fetch, wait for or overlap)")
            return
        if not self.rollout_url:
            raise ConfigError("--rollout_mode server needs --rollout_url http://HOST:PORT (a `jaxswift rollout` "
                              "server)")
        from jaxswift.infer.rollout_remote import check_url
        check_url(self.rollout_url)
        if not self.rollout_timeout > 0:
            raise ConfigError(f"--rollout_timeout must be > 0 seconds, got {self.rollout_timeout}")
        refused = {"multi_turn_env": "multi-turn environments run colocated (the environment steps between turns "
                                     "on the trainer's side)",
                   "quant_method": "a quantized (QLoRA) base is not pushed to a rollout server yet",
                   "galore_quantization": "Q-GaLore's 8-bit weights are not pushed to a rollout server yet"}
        for name, why in refused.items():
            if getattr(self, name, None):
                raise ConfigError(f"--{name} with --rollout_mode server: {why}")
        if (self.num_processes or 1) > 1:
            raise ConfigError(f"--num_processes {self.num_processes} with --rollout_mode server: one trainer process "
                              "pushes to one rollout server (multi-process trainers sample colocated)")
        if self.rollout_backend != "generate":
            raise ConfigError(f"--rollout_backend {self.rollout_backend} with --rollout_mode server: the rollout "
                              "server samples with the generate backend (log-probs at temperature, as the trainer "
                              "scores them)")

    def loss_config(self) -> pl.PolicyLossConfig:
        return pl.PolicyLossConfig(
            loss_type=self.loss_type, importance_sampling_level=self.importance_sampling_level, epsilon=self.epsilon,
            epsilon_high=self.epsilon_high, delta=self.delta, beta=0.0 if self.kl_in_reward else self.beta,
            sapo_temperature_pos=self.sapo_temperature_pos, sapo_temperature_neg=self.sapo_temperature_neg,
            max_completion_length=self.max_completion_length)

    @property
    def needs_reference(self) -> bool:
        return self.beta != 0.0


def _flag_of(message: str) -> str:
    """The flag a loss-module message is about (its messages start with the parameter's name)."""
    for name in ("num_generations", "loss_type", "importance_sampling_level", "advantage_estimator",
                 "scale_rewards", "epsilon_high", "epsilon", "delta", "beta", "temperature", "top_p", "top_k",
                 "max_completion_length", "sapo"):
        if name in message:
            return name
    return "loss"
