"""Every flag of every training recipe is honoured or rejected, never silently ignored.

Each recipe trains a tiny model in a few configurations that between them take every code path a flag steers
(LoRA and full tuning, GaLore, validation, the demo, ...), with the arguments wrapped so that every field the run
reads is recorded (reads by `dataclasses` itself, such as `asdict` for args.json, and by the arguments' own
validation do not count). A field that no run reads must be one the recipe rejects: setting it is a ConfigError
that names the flag.
"""

from __future__ import annotations

import dataclasses
import re
import sys

import pytest

from jaxswift.errors import ConfigError
from jaxswift.eval.tasks import BUILTIN_DIR
from jaxswift.recipes import grpo as grpo_recipe
from jaxswift.recipes import rlhf as rlhf_recipe
from jaxswift.recipes import sft as sft_recipe
from jaxswift.train.args import SftArguments
from jaxswift.train.grpo_args import GrpoArguments
from jaxswift.train.rlhf_args import RlhfArguments

# Read by the recipe entry points before a trainer runs: `config` by parse_args (tests/test_sft.py: YAML), the
# multi-process flags by initialize_distributed (tests/test_multihost.py, tests/test_multihost_rl.py). Checked below
# in the recipes' source.
ENTRY_FLAGS = {"config", "coordinator_address", "num_processes", "process_id"}
# GRPO's rollout-server flags are read in server mode only, whose runs need a server: tests/test_grpo_rollout_server.py
# runs them (and checks that colocated runs refuse these flags).
SERVER_FLAGS = {"grpo": {"rollout_url", "rollout_timeout"}}

COMMON = dict(max_steps=2, logging_steps=1, learning_rate=1e-3, disable_tqdm=True, save_steps=1, eval_steps=1,
              max_length=128, lora_dropout=0.0, mesh="1", demo_question="Hi?", demo_max_new_tokens=2)
EPOCH = dict(max_steps=0, num_train_epochs=1)  # length by epochs (the other run by --max_steps)
TASKS = dict(eval_dataset=[f"general_mcq={BUILTIN_DIR / 'general_mcq.csv'}"], eval_limit=2)  # scored in training
FULL = dict(tuner_type="full", use_galore=True, galore_rank=4, freeze_parameters=["mlp_norm"],
            trainable_parameters=["final_norm"], demo_question="")

RUNS = {
    "sft": (SftArguments, sft_recipe.train, [
        dict(**TASKS, **EPOCH, split_dataset_ratio=0.3, dataset=["builtin:self_identity#6"]),
        dict(FULL, galore_quantization=True, galore_target_modules=["q_proj", "v_proj"], packing=False,
             val_dataset=["builtin:self_identity#2"], dataset=["builtin:self_identity#8"]),
    ]),
    "rlhf": (RlhfArguments, rlhf_recipe.train, [
        dict(**TASKS, **EPOCH, split_dataset_ratio=0.3, dataset=["builtin:preference_demo#8"],
             per_device_train_batch_size=2),
        dict(FULL, galore_quantization=True, precompute_ref_log_probs=False, dataset=["builtin:preference_demo#8"],
             packing=False, val_dataset=["builtin:preference_demo#2"]),
        # GKD; the teacher is the tiny model itself ("MODEL": the student's folder, same vocabulary)
        dict(rlhf_type="gkd", teacher_model="MODEL", teacher_top_k=5, lmbda=1.0, seq_kd=True,
             temperature=0.7, max_completion_length=4, dataset=["builtin:preference_demo#4"]),
    ]),
    "grpo": (GrpoArguments, grpo_recipe.train, [
        dict(**TASKS, **EPOCH, dataset=["builtin:arithmetic#4"], num_generations=4, per_device_train_batch_size=8,
             max_completion_length=4, max_length=96),
        dict(FULL, galore_quantization=True, dataset=["builtin:arithmetic#16"], num_generations=4,
             per_device_train_batch_size=8,
             max_completion_length=4, dynamic_sample=True, max_resample_times=1, multi_turn_env=
             "builtin:arithmetic_retry", max_turns=2, reward_funcs=["env"], max_length=96),
    ]),
}


def tracking(cls, reads: set[str]):
    """A subclass of `cls` whose instances record every field read after construction."""
    names = {f.name for f in dataclasses.fields(cls)}

    class Tracked(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            object.__setattr__(self, "_tracked", True)

        def __getattribute__(self, name):
            if name in names and object.__getattribute__(self, "__dict__").get("_tracked") \
                    and sys._getframe(1).f_globals.get("__name__") != "dataclasses":
                reads.add(name)
            return object.__getattribute__(self, name)

    return Tracked


def non_default(f: dataclasses.Field):
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default + 1
    if isinstance(default, list) or default is None:
        return ["builtin:self_identity"] if "dataset" in f.name else 7
    return default + "x"


@pytest.mark.parametrize("recipe", sorted(RUNS))
def test_every_flag_is_honoured_or_rejected(recipe, tiny_chat_model, tmp_path):
    cls, run, configs = RUNS[recipe]
    reads: set[str] = set()
    Tracked = tracking(cls, reads)
    common = {k: v for k, v in COMMON.items() if k not in cls.UNUSED}
    for k, overrides in enumerate(configs):
        overrides = {key: str(tiny_chat_model) if value == "MODEL" else value for key, value in overrides.items()}
        run(Tracked(**{**common, "model": str(tiny_chat_model), "output_dir": str(tmp_path / str(k)),
                       **overrides}), progress=False)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unread = set(fields) - reads - ENTRY_FLAGS - SERVER_FLAGS.get(recipe, set())
    assert unread == set(cls.UNUSED), (f"{recipe}: flags accepted but never read: {sorted(unread - set(cls.UNUSED))};"
                                       f" flags declared unused but read: {sorted(set(cls.UNUSED) - unread)}")
    for name in cls.UNUSED:
        with pytest.raises(ConfigError, match=f"--{name} is not used by {recipe}"):
            cls(**{name: non_default(fields[name])})


@pytest.mark.parametrize("recipe", sorted(RUNS))
def test_entry_flags_are_read_by_the_recipe(recipe):
    import importlib
    import inspect

    source = inspect.getsource(importlib.import_module(f"jaxswift.recipes.{recipe}"))
    assert "initialize_distributed(args.coordinator_address, args.num_processes, args.process_id" in source


def test_task_type_flags_are_checked_by_name():
    from jaxswift.train.args import SftArguments
    from jaxswift.train.rlhf_args import RlhfArguments
    from jaxswift.train.sft import check_task_type
    bad = {"task_type": "classify"}, {"task_type": "seq_cls"}, {"num_labels": 3}, \
        {"task_type": "seq_cls", "num_labels": 2, "problem_type": "ranking"}
    for kwargs, needle in zip(bad, ("--task_type 'classify'", "needs --num_labels", "--num_labels 3",
                                    "--problem_type 'ranking'")):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            SftArguments(**kwargs)
    with pytest.raises(ConfigError, match="--loss_type infonce"):
        check_task_type(SftArguments(loss_type="infonce"))
    with pytest.raises(ConfigError, match="--task_type is not used by rlhf"):
        RlhfArguments(task_type="seq_cls", num_labels=2)
