"""Reward functions: built-ins users know from ms-swift (accuracy, format, cosine, repetition, soft_overlong) and
plugins `--reward_funcs mymodule:fn` (or `path/to/file.py:fn`), and a trained reward model (`rm:PATH`).

A reward function has TRL's signature: `fn(prompts, completions, **columns) -> list[float]`, one value per
completion. `prompts` and `completions` are lists of strings; every other column of the dataset rows arrives as a
list (one entry per completion), plus `completion_ids` (token ids) and `completion_lengths`. Scores are checked
where they come back: a function that raises, returns the wrong number of values or a non-number is named.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from jaxswift.errors import ConfigError, JaxswiftError

RewardFn = Callable[..., Sequence[float]]


class RewardError(JaxswiftError):
    """A reward function failed or returned something other than one number per completion."""


# ---------------------------------------------------------------------------------------------- answer extraction

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def extract_answer(text: str) -> str:
    """The final answer of a solution or completion: \\boxed{...}, else after the last '####', else inside
    <answer>...</answer>, else the last number, else the stripped text."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    tagged = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if tagged:
        return _boxed(tagged[-1]) or tagged[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else text.strip()


def _as_number(text: str) -> Fraction | None:
    t = text.strip().strip("$").replace(",", "").replace("\\!", "").rstrip(".").strip()
    t = re.sub(r"^\\?\(|\\?\)$", "", t)
    frac = re.fullmatch(r"\\d?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", t)
    if frac:
        t = f"{frac.group(1)}/{frac.group(2)}"
    percent = t.endswith("%")
    try:
        value = Fraction(t.rstrip("%").strip())
    except (ValueError, ZeroDivisionError):
        return None
    return value / 100 if percent else value


def answers_equal(predicted: str, reference: str) -> bool:
    """Numeric equivalence when both parse as numbers (1/2 == 0.5 == 50%), else normalized text equality."""
    a, b = _as_number(predicted), _as_number(reference)
    if a is not None and b is not None:
        return a == b or abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    norm = lambda s: re.sub(r"\s+", "", s).strip(".$").lower()  # noqa: E731
    return norm(predicted) == norm(reference) and norm(reference) != ""


# -------------------------------------------------------------------------------------------------------- built-ins


def _texts(completions) -> list[str]:
    """Completions as strings; TRL hands conversational ones as [{"role": "assistant", "content": ...}]."""
    return [c[-1]["content"] if isinstance(c, list) else c for c in completions]

SOLUTION_COLUMNS = ("solution", "answer", "ground_truth")


def _solutions(columns: dict, n: int) -> list[str]:
    for name in SOLUTION_COLUMNS:
        if name in columns:
            return [str(s) for s in columns[name]]
    raise RewardError(f"accuracy reward: the dataset rows need a reference answer in one of the columns "
                      f"{', '.join(SOLUTION_COLUMNS)} (found {', '.join(sorted(columns)) or 'none'})")


def accuracy(prompts, completions, **columns) -> list[float]:
    """1.0 when the completion's final answer equals the row's solution (\\boxed{} / #### / <answer> / last
    number), else 0.0."""
    completions = _texts(completions)
    solutions = _solutions(columns, len(completions))
    return [float(answers_equal(extract_answer(c), extract_answer(s))) for c, s in zip(completions, solutions)]


_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def format_reward(prompts, completions, **columns) -> list[float]:
    """1.0 for `<think>...</think><answer>...</answer>` and nothing else, else 0.0."""
    completions = _texts(completions)
    return [float(bool(_FORMAT.match(c))) for c in completions]


_ANSWER_FORMAT = re.compile(r"^\s*<answer>.*?</answer>\s*$", re.DOTALL)


def answer_format(prompts, completions, **columns) -> list[float]:
    """1.0 for a completion that is exactly `<answer>...</answer>`, else 0.0."""
    completions = _texts(completions)
    return [float(bool(_ANSWER_FORMAT.match(c))) for c in completions]


_PLAIN_ANSWER = re.compile(r"^[\d\s+\-*/x=().,]*?-?\d+\.?$")


def plain_answer(prompts, completions, **columns) -> list[float]:
    """1.0 for one short line of arithmetic ending in a number ('12 + 5 = 17', '17'), with nothing after it
    (the built-in arithmetic task's format), else 0.0."""
    completions = _texts(completions)
    return [float("\n" not in c.strip() and bool(_PLAIN_ANSWER.match(c.strip()))) for c in completions]


@dataclasses.dataclass(frozen=True)
class CosineReward:
    """Length-scaled correctness (ms-swift's cosine): correct answers earn more when short, wrong ones lose less
    when long. r = hi - (hi - lo) * (1 - cos(pi * L / max_len)) / 2 with (hi, lo) the correct or wrong pair."""
    max_len: int
    min_len_value_correct: float = 1.0
    max_len_value_correct: float = 0.5
    min_len_value_wrong: float = -0.5
    max_len_value_wrong: float = 0.0

    def __call__(self, prompts, completions, **columns) -> list[float]:
        correct = accuracy(prompts, completions, **columns)
        out = []
        for ok, length in zip(correct, columns["completion_lengths"]):
            hi, lo = ((self.min_len_value_correct, self.max_len_value_correct) if ok else
                      (self.min_len_value_wrong, self.max_len_value_wrong))
            progress = min(length, self.max_len) / self.max_len
            out.append(hi - (hi - lo) * (1 - math.cos(math.pi * progress)) / 2)
        return out


@dataclasses.dataclass(frozen=True)
class RepetitionReward:
    """n-gram repetition penalty: max_penalty * (1 - distinct n-grams / n-grams) over lower-cased words."""
    ngram_size: int = 3
    max_penalty: float = -1.0

    def __call__(self, prompts, completions, **columns) -> list[float]:
        completions = _texts(completions)
        out = []
        for text in completions:
            words = text.lower().split()
            total = len(words) - self.ngram_size + 1
            if total <= 0:
                out.append(0.0)
                continue
            distinct = len(set(zip(*(words[i:] for i in range(self.ngram_size)))))
            out.append((1 - distinct / total) * self.max_penalty)
        return out


@dataclasses.dataclass(frozen=True)
class SoftOverlongReward:
    """DAPO's soft overlong punishment: 0 up to max_len - cache, then falling linearly to -1 at max_len (tokens)."""
    max_len: int
    cache_len: int

    def __call__(self, prompts, completions, **columns) -> list[float]:
        expected = self.max_len - self.cache_len
        return [min(-(n - expected) / self.cache_len, 0.0) for n in columns["completion_lengths"]]


@dataclasses.dataclass(frozen=True)
class RewardSettings:
    """What the length-aware built-ins read (from the GRPO flags)."""
    max_completion_length: int = 256
    soft_cache_length: int = 64
    repetition_n_grams: int = 3
    repetition_max_penalty: float = -1.0


def builtin_rewards(settings: RewardSettings) -> dict[str, RewardFn]:
    return {
        "accuracy": accuracy,
        "format": format_reward,
        "answer_format": answer_format,
        "plain_answer": plain_answer,
        "cosine": CosineReward(settings.max_completion_length),
        "repetition": RepetitionReward(settings.repetition_n_grams, settings.repetition_max_penalty),
        "soft_overlong": SoftOverlongReward(settings.max_completion_length, settings.soft_cache_length),
    }


# ---------------------------------------------------------------------------------------------------------- plugins


def _import_module(spec: str, module: str):
    if module.endswith(".py"):
        path = Path(module).expanduser()
        if not path.is_file():
            raise ConfigError(f"--reward_funcs {spec}: file {module} not found")
        loaded = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(mod)
        return mod
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"--reward_funcs {spec}: cannot import module {module!r} ({e})") from None


def load_plugin(spec: str) -> RewardFn:
    """`module:function` or `file.py:function` -> the function."""
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name:
        raise ConfigError(f"--reward_funcs {spec!r}: a plugin is written module:function or path/file.py:function")
    fn = getattr(_import_module(spec, module), name, None)
    if not callable(fn):
        raise ConfigError(f"--reward_funcs {spec}: {module} has no function {name!r}")
    return fn


def resolve_reward_funcs(names: Sequence[str], settings: RewardSettings) -> dict[str, RewardFn]:
    """Names (built-in or plugin spec) -> {name: fn}, in order."""
    builtins = builtin_rewards(settings)
    out = {}
    for name in names:
        if name in out:
            raise ConfigError(f"--reward_funcs lists {name} twice")
        if name in builtins:
            out[name] = builtins[name]
        elif name.startswith("rm:"):
            out[name] = RewardModelReward(name[len("rm:"):])
        elif ":" in name:
            out[name] = load_plugin(name)
        else:
            raise ConfigError(f"--reward_funcs {name!r}: not a built-in ({', '.join(builtins)}) nor a plugin "
                              "module:function")
    if not out:
        raise ConfigError("--reward_funcs is empty: give at least one reward function")
    return out


# ---------------------------------------------------------------------------------------------------------- scoring


def _checked(name: str, values, n: int) -> np.ndarray:
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward function {name} returned {type(values).__name__}, expected a list of "
                          f"{n} numbers") from None
    if len(values) != n:
        raise RewardError(f"reward function {name} returned {len(values)} values for {n} completions")
    try:
        out = np.asarray([float(v) for v in values], np.float64)
    except (TypeError, ValueError):
        bad = next(v for v in values if not isinstance(v, (int, float, np.number)))
        raise RewardError(f"reward function {name} returned {bad!r} ({type(bad).__name__}), expected numbers") \
            from None
    if not np.all(np.isfinite(out)):
        raise RewardError(f"reward function {name} returned a non-finite value at completion "
                          f"{int(np.flatnonzero(~np.isfinite(out))[0])}")
    return out


def score(funcs: dict[str, RewardFn], prompts: list[str], completions: list[str], columns: dict[str, list]):
    """Rewards [N, R] (one column per function, in order). Errors name the function."""
    n = len(completions)
    out = np.zeros((n, len(funcs)), np.float64)
    for k, (name, fn) in enumerate(funcs.items()):
        try:
            values = fn(prompts, completions, **columns)
        except RewardError:
            raise
        except Exception as e:  # a plugin's bug: name it, keep the cause
            raise RewardError(f"reward function {name} raised {type(e).__name__}: {e}") from e
        out[:, k] = _checked(name, values, n)
    return out


def check_weights(weights: Sequence[float] | None, names: Sequence[str]) -> np.ndarray:
    if weights is None:
        return np.ones(len(names), np.float64)
    if len(weights) != len(names):
        raise ConfigError(f"--reward_weights has {len(weights)} values for {len(names)} reward functions "
                          f"({', '.join(names)})")
    return np.asarray(weights, np.float64)


# ---------------------------------------------------------------------------------------------- a reward model


class RewardModelReward:
    """A trained reward model as a reward function: `--reward_funcs rm:PATH`, PATH a full model folder exported by
    `jaxswift rlhf --rlhf_type rm --tuner_type full` (HF weights + value_head.safetensors, TRL's v_head names). The
    score is w . h + b on the last token of prompt + completion rendered with the model's chat template."""

    def __init__(self, path: str):
        import jax

        from jaxswift.api import load_model
        from jaxswift.checkpoints.safetensors_io import SafetensorsFile

        folder = Path(path).expanduser()
        head_file = folder / "value_head.safetensors"
        if not head_file.is_file():
            raise ConfigError(f"--reward_funcs rm:{path}: no value_head.safetensors in {folder} (export a reward "
                              "model with `jaxswift rlhf --rlhf_type rm --tuner_type full`)")
        self.model = load_model(str(folder))
        if self.model.tokenizer is None:
            raise ConfigError(f"--reward_funcs rm:{path}: the reward model has no tokenizer")
        head = SafetensorsFile(head_file)
        self.w = np.asarray(head.get("v_head.summary.weight"), np.float32).reshape(-1)
        self.b = np.asarray(head.get("v_head.summary.bias"), np.float32).reshape(())
        self._score = jax.jit(self._last_token_scores)

    def _last_token_scores(self, params, tokens, positions, segments, last):
        import jax.numpy as jnp

        from jaxswift.models.transformer import hidden_states

        h = hidden_states(params, tokens, self.model.config, positions=positions, segment_ids=segments)[0]
        h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
        return h_last @ self.w + self.b

    def _ids(self, prompt, completion: str) -> list[int]:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = self.model.tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": completion}],
                                                        tokenize=False)
        return self.model.tokenizer.encode(text, add_special_tokens=False)

    def __call__(self, prompts, completions, **columns) -> list[float]:
        from jaxswift.infer.generate import left_pad

        ids = [self._ids(p, c) for p, c in zip(prompts, completions)]
        tokens, positions, segments = left_pad(ids, 0)
        last = np.full((len(ids),), tokens.shape[1] - 1, np.int32)  # left-padded: every row ends at the end
        return np.asarray(self._score(self.model.params, tokens, positions, segments, last), np.float64).tolist()
