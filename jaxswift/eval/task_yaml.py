"""Task YAML: lm-evaluation-harness's keys (a subset), over local JSONL / CSV files, so one file serves both tools.

    task: my_task
    dataset_path: json                      # or csv
    dataset_kwargs: {data_files: {test: rows.jsonl, train: shots.jsonl}}
    test_split: test
    output_type: multiple_choice            # generate_until | loglikelihood_rolling
    doc_to_text: "Question: {{question}}\\nAnswer:"   # a column name or a Jinja template
    doc_to_choice: choices                   # a column, a template that renders a list, or a list
    doc_to_target: label                     # an index or the right choice's text
    target_delimiter: " "
    num_fewshot: 0
    metric_list: [{metric: acc}, {metric: acc_norm}]

jaxswift's own keys: `extract` (generate_until: none | gsm8k | boxed | number | letter). A key neither tool reads is
an error, not silently ignored.
"""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import yaml

from jaxswift.errors import ConfigError, DataError
from jaxswift.eval.tasks import Item, Task

OUTPUT_TYPES = {"multiple_choice": "multiple_choice", "generate_until": "generate",
                "loglikelihood_rolling": "perplexity"}
KEYS = {"task", "dataset_path", "dataset_kwargs", "test_split", "validation_split", "training_split",
        "fewshot_split", "output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "target_delimiter",
        "fewshot_delimiter", "description", "num_fewshot", "generation_kwargs", "metric_list", "tag", "metadata",
        "extract"}
METRICS = {"multiple_choice": {"acc", "acc_norm"}, "generate": {"exact_match", "regex_match", "rouge_l"},
           "perplexity": {"word_perplexity", "byte_perplexity", "bits_per_byte"}}
GENERATION_KEYS = {"until", "max_gen_toks", "do_sample", "temperature"}


def _rows(path: Path, kind: str, where: str) -> list[tuple[str, dict]]:
    if not path.is_file():
        raise DataError(f"{where}: data file {path} does not exist")
    if kind == "csv":
        with open(path, encoding="utf-8", newline="") as f:
            return [(f"{path}:{n}", row) for n, row in enumerate(csv.DictReader(f), 2)]
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return out


class _Docs:
    """doc_to_text / doc_to_target / doc_to_choice as lm-evaluation-harness reads them: a column name, a Jinja
    template (StrictUndefined, trailing newline kept), or a literal."""

    def __init__(self, cfg: dict, columns: set[str]):
        import jinja2

        self.cfg, self.columns = cfg, columns
        self.env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)

    def render(self, key: str, doc: dict, where: str):
        spec = self.cfg.get(key)
        if isinstance(spec, (int, list)):
            return spec
        if not isinstance(spec, str):
            raise ConfigError(f"{where}: {key} must be a column name, a template or a list, got {spec!r}")
        if spec in self.columns:
            return doc[spec]
        try:
            return self.env.from_string(spec).render(**doc)
        except Exception as e:  # jinja2's UndefinedError, TemplateSyntaxError...
            raise DataError(f"{where}: {key} template {spec!r}: {e}") from None

    def text(self, doc, where):
        return str(self.render("doc_to_text", doc, where))

    def choices(self, doc, where) -> list[str]:
        value = self.render("doc_to_choice", doc, where)
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise DataError(f"{where}: doc_to_choice rendered {value[:60]!r}, not a list") from None
        if not isinstance(value, (list, tuple)) or len(value) < 2:
            raise DataError(f"{where}: doc_to_choice must give a list of at least two choices, got {value!r}")
        return [str(v) for v in value]

    def target(self, doc, where, choices: list[str] | None):
        value = self.render("doc_to_target", doc, where)
        if choices is None:
            return str(value)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int):
            if not 0 <= value < len(choices):
                raise DataError(f"{where}: doc_to_target {value} is not an index into {len(choices)} choices")
            return value
        if str(value) in choices:
            return choices.index(str(value))
        raise DataError(f"{where}: doc_to_target {value!r} is neither a choice index nor one of the choices")


def _data_files(cfg: dict, base: Path, where: str) -> dict[str, Path]:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        raise ConfigError(f"{where}: dataset_kwargs.data_files is required (local files; no downloads)")
    if isinstance(files, (str, list)):
        files = {"train": files}
    out = {}
    for split, f in files.items():
        if isinstance(f, list):
            if len(f) != 1:
                raise ConfigError(f"{where}: data_files.{split}: one file per split, got {len(f)}")
            f = f[0]
        out[split] = (base / f) if not Path(f).is_absolute() else Path(f)
    return out


def _items(cfg, docs: _Docs, kind: str, rows) -> list[Item]:
    items = []
    for where, doc in rows:
        prompt = docs.text(doc, where)
        if kind == "multiple_choice":
            choices = docs.choices(doc, where)
            gold = docs.target(doc, where, choices)
            items.append(Item(where, prompt, tuple(choices), gold, target=choices[gold]))
        elif kind == "generate":
            answer = docs.target(doc, where, None)
            items.append(Item(where, prompt, answers=(answer,), target=answer))
        else:
            items.append(Item(where, docs.target(doc, where, None)))
    return items


def _check(cfg: dict, where: str) -> tuple[str, str]:
    unknown = sorted(set(cfg) - KEYS)
    if unknown:
        raise ConfigError(f"{where}: key(s) {', '.join(unknown)} not supported (supported: {', '.join(sorted(KEYS))})")
    for key in ("task", "output_type", "doc_to_target"):
        if key not in cfg:
            raise ConfigError(f"{where}: missing key {key!r}")
    kind = OUTPUT_TYPES.get(cfg["output_type"])
    if kind is None:
        raise ConfigError(f"{where}: output_type {cfg['output_type']!r} not supported "
                          f"(supported: {', '.join(OUTPUT_TYPES)})")
    if kind != "perplexity" and "doc_to_text" not in cfg:
        raise ConfigError(f"{where}: missing key 'doc_to_text'")
    if kind == "multiple_choice" and "doc_to_choice" not in cfg:
        raise ConfigError(f"{where}: multiple_choice needs doc_to_choice")
    if cfg.get("dataset_path", "json") not in ("json", "csv"):
        raise ConfigError(f"{where}: dataset_path must be json or csv over local files (dataset_kwargs.data_files), "
                          f"got {cfg['dataset_path']!r}")
    metrics = [m.get("metric") if isinstance(m, dict) else m for m in cfg.get("metric_list") or []]
    bad = [m for m in metrics if m not in METRICS[kind]]
    if bad:
        raise ConfigError(f"{where}: metric(s) {bad} not available for {cfg['output_type']} "
                          f"(available: {', '.join(sorted(METRICS[kind]))})")
    if kind == "generate" and len(metrics) > 1:
        raise ConfigError(f"{where}: generate_until takes one metric, got {metrics}")
    gen = cfg.get("generation_kwargs") or {}
    if set(gen) - GENERATION_KEYS:
        raise ConfigError(f"{where}: generation_kwargs key(s) {sorted(set(gen) - GENERATION_KEYS)} not supported "
                          f"(supported: {', '.join(sorted(GENERATION_KEYS))})")
    if gen.get("do_sample") or gen.get("temperature", 0):
        raise ConfigError(f"{where}: generation_kwargs: evaluation decodes greedily here (--temperature sets "
                          f"sampling for a whole run)")
    return kind, (metrics[0] if kind == "generate" and metrics else "exact_match")


def read_task_yaml(path: Path) -> Task:
    where = str(path)
    if not path.is_file():
        raise ConfigError(f"--eval_dataset {path}: no such task YAML")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a mapping of lm-evaluation-harness task keys")
    kind, metric = _check(cfg, where)
    files = _data_files(cfg, path.parent, where)
    fmt = cfg.get("dataset_path", "json")
    test_split = cfg.get("test_split") or cfg.get("validation_split") or "test"
    if test_split not in files:
        raise ConfigError(f"{where}: split {test_split!r} has no entry in dataset_kwargs.data_files "
                          f"({', '.join(files)})")
    rows = _rows(files[test_split], fmt, where)
    if not rows:
        raise DataError(f"{files[test_split]}: no rows")
    docs = _Docs(cfg, set(rows[0][1]))
    items = _items(cfg, docs, kind, rows)
    shot_split = cfg.get("fewshot_split") or cfg.get("training_split")
    pool = _items(cfg, docs, kind, _rows(files[shot_split], fmt, where)) if shot_split in files else []
    if shot_split and shot_split not in files:
        raise ConfigError(f"{where}: few-shot split {shot_split!r} has no entry in dataset_kwargs.data_files")
    gen = cfg.get("generation_kwargs") or {}
    until = gen.get("until", ["\n\n"])
    return Task(str(cfg["task"]), kind, tuple(items), tuple(pool), num_fewshot=int(cfg.get("num_fewshot") or 0),
                description=str(cfg.get("description") or ""), target_delimiter=str(cfg.get("target_delimiter", " ")),
                fewshot_delimiter=str(cfg.get("fewshot_delimiter", "\n\n")), metric=metric,
                extract=str(cfg.get("extract", "none")), until=tuple([until] if isinstance(until, str) else until),
                max_new_tokens=int(gen.get("max_gen_toks", 256)), chat=False)
