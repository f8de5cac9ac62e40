"""Evaluation tasks: the formats sets are distributed in, read into one item shape.

A Task is a list of Items plus how to ask and how to score:
  kind "multiple_choice": the context is `prompt`, each choice is a continuation (`target_delimiter + choice`);
      scored by log-likelihood (acc, acc_norm as lm-evaluation-harness defines them).
  kind "generate": the model answers `prompt` (through its chat template when it has one), the answer is extracted
      (`extract`) and compared with `answers` (`metric`: exact_match | regex_match | rouge_l).
  kind "perplexity": `prompt` is a text scored token by token (word_perplexity, byte_perplexity, bits_per_byte).

Every reader names the file and line of a bad row. Task YAMLs follow lm-evaluation-harness's keys (a subset), so
one YAML file serves both tools.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Any

from jaxswift.errors import ConfigError, DataError

KINDS = ("multiple_choice", "generate", "perplexity")
GEN_METRICS = ("exact_match", "regex_match", "rouge_l")
EXTRACTORS = ("none", "gsm8k", "boxed", "number", "letter")
BUILTIN_DIR = Path(__file__).parent / "builtin"


@dataclasses.dataclass(frozen=True)
class Item:
    where: str                      # "file:line", for records and errors
    prompt: str                     # context (multiple choice), question (generate), text (perplexity)
    choices: tuple[str, ...] = ()   # multiple choice: the continuations, without the delimiter
    gold: int = -1                  # multiple choice: index of the right choice
    answers: tuple[str, ...] = ()   # generate: accepted answers (a regex for regex_match)
    target: str = ""                # few-shot: the worked answer shown after the prompt
    system: str | None = None       # generate: a system message for chat models


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str
    items: tuple[Item, ...]
    fewshot_pool: tuple[Item, ...] = ()
    num_fewshot: int = 0
    description: str = ""           # text before the few-shot examples
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    metric: str = "exact_match"     # generate
    extract: str = "none"           # generate
    until: tuple[str, ...] = ()     # generate: stop strings (the answer is cut at the first)
    max_new_tokens: int = 64        # generate
    chat: bool = True               # generate: use the model's chat template when it has one

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"task {self.name}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "generate" and self.metric not in GEN_METRICS:
            raise ConfigError(f"task {self.name}: metric must be one of {', '.join(GEN_METRICS)}, got {self.metric!r}")
        if self.extract not in EXTRACTORS:
            raise ConfigError(f"task {self.name}: extract must be one of {', '.join(EXTRACTORS)}, "
                              f"got {self.extract!r}")
        if not self.items:
            raise DataError(f"task {self.name}: no items")


# ---------------------------------------------------------------------------------------------------------------
# reading rows


def _jsonl_rows(path: Path):
    """(line number, dict) for each non-empty line."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield n, row


def _field(row: dict, names: tuple[str, ...], where: str, fmt: str):
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    raise DataError(f"{where}: {fmt} row has no {' / '.join(repr(n) for n in names)} field "
                    f"(fields: {', '.join(row) or 'none'})")


def _gsm8k_answer(answer: str, where: str) -> str:
    if "####" not in answer:
        raise DataError(f"{where}: GSM8K row's answer has no '#### <number>' final answer")
    return answer.split("####")[-1].strip().replace(",", "")


def read_gsm8k(path: Path) -> list[Item]:
    items = []
    for n, row in _jsonl_rows(path):
        where = f"{path}:{n}"
        question = str(_field(row, ("question",), where, "GSM8K"))
        answer = str(_field(row, ("answer",), where, "GSM8K"))
        items.append(Item(where, question, answers=(_gsm8k_answer(answer, where),), target=answer.strip()))
    return items


def _arc_choices(row: dict, where: str) -> tuple[list[str], list[str]]:
    """ARC's two shapes: HF's {"choices": {"text": [...], "label": [...]}} and AllenAI's
    {"question": {"stem", "choices": [{"text", "label"}]}}."""
    question = row.get("question")
    choices = question.get("choices") if isinstance(question, dict) else row.get("choices")
    if isinstance(choices, dict) and "text" in choices and "label" in choices:
        return [str(t) for t in choices["text"]], [str(x) for x in choices["label"]]
    if isinstance(choices, list) and all(isinstance(c, dict) and "text" in c and "label" in c for c in choices):
        return [str(c["text"]) for c in choices], [str(c["label"]) for c in choices]
    raise DataError(f"{where}: ARC row needs choices as {{'text': [...], 'label': [...]}} or a list of "
                    f"{{'text', 'label'}} objects")


def read_arc(path: Path) -> list[Item]:
    items = []
    for n, row in _jsonl_rows(path):
        where = f"{path}:{n}"
        question = _field(row, ("question",), where, "ARC")
        stem = question.get("stem", "") if isinstance(question, dict) else str(question)
        texts, labels = _arc_choices(row, where)
        key = str(_field(row, ("answerKey",), where, "ARC"))
        if key not in labels:
            raise DataError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
        items.append(Item(where, f"Question: {stem}\nAnswer:", tuple(texts), labels.index(key),
                          target=texts[labels.index(key)]))
    return items


def _hellaswag_clean(text: str) -> str:
    """lm-evaluation-harness's HellaSwag preprocessing (WikiHow artifacts out)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: Path) -> list[Item]:
    items = []
    for n, row in _jsonl_rows(path):
        where = f"{path}:{n}"
        ctx_a = str(_field(row, ("ctx_a",), where, "HellaSwag"))
        ctx_b = str(row.get("ctx_b", ""))
        label = str(_field(row, ("activity_label",), where, "HellaSwag"))
        endings = _field(row, ("endings",), where, "HellaSwag")
        gold = _field(row, ("label",), where, "HellaSwag")
        if not isinstance(endings, list) or not endings:
            raise DataError(f"{where}: HellaSwag 'endings' must be a non-empty list")
        if not str(gold).strip().isdigit() or not 0 <= int(gold) < len(endings):
            raise DataError(f"{where}: HellaSwag 'label' must be an index into endings (0..{len(endings) - 1}), "
                            f"got {gold!r}")
        query = _hellaswag_clean(f"{label}: {ctx_a} {ctx_b.capitalize()}")
        choices = tuple(_hellaswag_clean(str(e)) for e in endings)
        items.append(Item(where, query, choices, int(gold), target=choices[int(gold)]))
    return items


def _mcq_prompt(question: str, options: list[tuple[str, str]]) -> str:
    return question.strip() + "".join(f"\n{letter}. {text}" for letter, text in options) + "\nAnswer:"


def _letter_item(where: str, question: str, options: list[tuple[str, str]], answer: str) -> Item:
    letters = [letter for letter, _ in options]
    answer = answer.strip()
    if answer not in letters:
        raise DataError(f"{where}: answer {answer!r} is not one of the choice columns {', '.join(letters)}")
    return Item(where, _mcq_prompt(question, options), tuple(letters), letters.index(answer), target=answer)


def read_mmlu(path: Path) -> list[Item]:
    """MMLU's CSV: no header; question, A, B, C, D, answer letter. The subject comes from the file name."""
    items = []
    with open(_existing(path), encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            if len(row) != 6:
                raise DataError(f"{path}:{n}: MMLU row needs 6 columns (question, A, B, C, D, answer), "
                                f"got {len(row)}")
            options = list(zip("ABCD", row[1:5]))
            items.append(_letter_item(f"{path}:{n}", row[0], options, row[5]))
    return items


def mmlu_description(path: Path) -> str:
    subject = re.sub(r"_(test|dev|val|validation)$", "", path.stem).replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


def read_general_mcq(path: Path) -> list[Item]:
    """EvalScope's general_mcq CSV: a header with `question`, choice columns A, B, C, ... and `answer` (`id`
    optional)."""
    items = []
    with open(_existing(path), encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        letters = [c for c in header if re.fullmatch(r"[A-Z]", c)]
        missing = [c for c in ("question", "answer") if c not in header] + ([] if len(letters) >= 2 else ["A, B"])
        if missing:
            raise DataError(f"{path}:1: general_mcq CSV header lacks column(s) {', '.join(missing)} "
                            f"(header: {', '.join(header) or 'empty'}; expected id,question,A,B,...,answer)")
        for n, row in enumerate(reader, 2):
            options = [(c, row[c]) for c in letters if row.get(c) not in (None, "")]
            if len(options) < 2:
                raise DataError(f"{path}:{n}: general_mcq row has fewer than two filled choice columns")
            items.append(_letter_item(f"{path}:{n}", row["question"] or "", options, row["answer"] or ""))
    return items


def read_general_qa(path: Path) -> list[Item]:
    """EvalScope's general_qa JSONL: `query` (or `question`), `response` (or `answer`), optional `system`."""
    items = []
    for n, row in _jsonl_rows(path):
        where = f"{path}:{n}"
        query = str(_field(row, ("query", "question"), where, "general_qa"))
        response = _field(row, ("response", "answer"), where, "general_qa")
        answers = tuple(str(r) for r in response) if isinstance(response, list) else (str(response),)
        items.append(Item(where, query, answers=answers, target=answers[0], system=row.get("system")))
    return items


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return path


# ---------------------------------------------------------------------------------------------------------------
# named formats and the built-in sets


def _format_task(fmt: str, path: Path, name: str) -> Task:
    if fmt == "gsm8k":
        return Task(name, "generate", tuple(read_gsm8k(path)), metric="exact_match", extract="gsm8k",
                    until=("Question:",), max_new_tokens=256)
    if fmt == "arc":
        return Task(name, "multiple_choice", tuple(read_arc(path)))
    if fmt == "hellaswag":
        return Task(name, "multiple_choice", tuple(read_hellaswag(path)))
    if fmt == "mmlu":
        return Task(name, "multiple_choice", tuple(read_mmlu(path)), description=mmlu_description(path))
    if fmt == "general_mcq":
        return Task(name, "multiple_choice", tuple(read_general_mcq(path)))
    if fmt == "general_qa":
        return Task(name, "generate", tuple(read_general_qa(path)), metric="rouge_l", max_new_tokens=128)
    raise AssertionError(fmt)


FORMATS = ("gsm8k", "arc", "mmlu", "hellaswag", "general_mcq", "general_qa")


def builtin_tasks() -> list[Task]:
    """The default run's sets, written by the project: the SFT demo's identity (does the model call itself
    Juniper, made by the jaxswift team?), the GRPO demo's arithmetic, and general-knowledge multiple choice."""
    identity = tuple(Item(f"{BUILTIN_DIR / 'identity.jsonl'}:{n}", str(row["query"]), answers=(row["pattern"],))
                     for n, row in _jsonl_rows(BUILTIN_DIR / "identity.jsonl"))
    arithmetic = tuple(Item(f"{BUILTIN_DIR / 'arithmetic.jsonl'}:{n}", str(row["prompt"]),
                            answers=(str(row["solution"]),))
                       for n, row in _jsonl_rows(BUILTIN_DIR / "arithmetic.jsonl"))
    return [
        Task("identity", "generate", identity, metric="regex_match", max_new_tokens=24),
        Task("arithmetic", "generate", arithmetic, metric="exact_match", extract="number", max_new_tokens=24),
        Task("general_mcq", "multiple_choice", tuple(read_general_mcq(BUILTIN_DIR / "general_mcq.csv"))),
    ]


def load_task(spec: str) -> list[Task]:
    """One --eval_dataset value: `builtin`, `FORMAT=PATH`, `NAME:FORMAT=PATH`, or a task YAML path."""
    if spec == "builtin":
        return builtin_tasks()
    if "=" in spec:
        fmt, path = spec.split("=", 1)
        name, _, fmt = fmt.rpartition(":")
        if fmt not in FORMATS:
            raise ConfigError(f"--eval_dataset {spec}: unknown task format {fmt!r} (known: {', '.join(FORMATS)}, "
                              f"or a task YAML path, or builtin)")
        return [_format_task(fmt, Path(path), name or fmt)]
    if spec.endswith((".yaml", ".yml")):
        from jaxswift.eval.task_yaml import read_task_yaml

        return [read_task_yaml(Path(spec))]
    raise ConfigError(f"--eval_dataset {spec}: expected builtin, FORMAT=PATH (formats: {', '.join(FORMATS)}) "
                      f"or a task YAML file (.yaml)")


def load_tasks(specs: list[str]) -> list[Task]:
    tasks = [t for spec in specs for t in load_task(spec)]
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"--eval_dataset: task name(s) {', '.join(dup)} given twice; name them NAME:FORMAT=PATH")
    return tasks


# ---------------------------------------------------------------------------------------------------------------
# limit and few-shot


def select(task: Task, limit: int | None, num_fewshot: int | None) -> Task:
    """The first `limit` items (as lm-evaluation-harness's --limit), and the few-shot count to use."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--eval_limit must be >= 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num_fewshot must be >= 0, got {num_fewshot}")
    items = task.items[:limit] if limit else task.items
    shots = task.num_fewshot if num_fewshot is None else num_fewshot
    pool = task.fewshot_pool or task.items
    if shots and len(pool) <= shots:
        raise ConfigError(f"task {task.name}: {shots} few-shot examples need more than {len(pool)} items to draw from")
    return dataclasses.replace(task, items=items, num_fewshot=shots)


def fewshot_examples(task: Task, index: int, seed: int) -> list[Item]:
    """The item's few-shot examples: drawn from the pool with a seed per (task, item), never the item itself."""
    if not task.num_fewshot:
        return []
    item = task.items[index]
    pool = [x for x in (task.fewshot_pool or task.items) if x.where != item.where]
    return random.Random(f"{seed}:{task.name}:{index}").sample(pool, task.num_fewshot)


def context_text(task: Task, index: int, seed: int) -> str:
    """lm-evaluation-harness's context: description, examples joined by the few-shot delimiter, then the prompt."""
    shots = [f"{x.prompt}{task.target_delimiter}{x.target}" for x in fewshot_examples(task, index, seed)]
    return task.description + "".join(s + task.fewshot_delimiter for s in shots) + task.items[index].prompt


def chat_messages(task: Task, index: int, seed: int) -> list[dict[str, Any]]:
    """A generation item as chat turns: system, few-shot examples as user/assistant pairs, the question."""
    item = task.items[index]
    messages = [{"role": "system", "content": item.system}] if item.system else []
    for x in fewshot_examples(task, index, seed):
        messages += [{"role": "user", "content": x.prompt}, {"role": "assistant", "content": x.target}]
    return messages + [{"role": "user", "content": task.description + item.prompt}]


def parse_choice_list(text: str, where: str) -> list[str]:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise DataError(f"{where}: choices {text[:60]!r} are not a list literal") from None
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: choices must be a list, got {type(value).__name__}")
    return [str(v) for v in value]
