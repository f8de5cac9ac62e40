"""Dataset files -> rows -> OpenAI-style `messages` -> encoded SFT examples.

Readers stream where the format allows (JSONL line by line, CSV row by row, Parquet by row group, `save_to_disk`
folders through memory-mapped Arrow), so a file is never loaded whole except a `.json` list. Every row travels with
a `where` string (`data/train.jsonl:17`) so that errors and skips can name it.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from jaxswift.data.templates import EncodedChat, encode_chat, truncate
from jaxswift.data.tools import normalize_tool_calls
from jaxswift.errors import ConfigError, DataError

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_PREFIX = "builtin:"
READABLE = (".jsonl", ".json", ".csv", ".parquet", "a folder saved with datasets.save_to_disk")
ROLES = ("system", "user", "assistant", "tool")
# ms-swift's agent rows (its "Agent support" doc): `tool_call` messages hold one call's JSON each, `tool_response`
# messages a result; read as OpenAI-style assistant `tool_calls` and `tool` messages.
SWIFT_AGENT_ROLES = ("tool_call", "tool_response")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function": "tool", "observation": "tool",
                  "function_call": "tool_call", "tool_call": "tool_call", "tool_response": "tool_response"}
EXPECTED_FORMATS = ("messages", "conversations", "instruction+output (alpaca)", "query+response")


# ---------------------------------------------------------------- rows -> messages

def row_to_messages(row: Any, where: str) -> list[dict]:
    """Convert one row of any supported format to a list of {role, content} messages."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object (a row with named fields), got {type(row).__name__}")
    if _present(row, "messages"):
        return _with_system_column(_messages_rows(row["messages"], where), row, where)
    if _present(row, "conversations"):
        return _with_system_column(_sharegpt(row["conversations"], where), row, where)
    if _present(row, "instruction") and "output" in row:
        return _alpaca(row, where)
    if _present(row, "query") and "response" in row:
        return _query_response(row, where)
    raise DataError(f"{where}: row fits no known format; found keys {sorted(row)}; expected one of "
                    f"{', '.join(EXPECTED_FORMATS)}")


def row_tools(row: dict, where: str) -> list | None:
    """The optional `tools` column: a list, or a JSON string of one (as CSV, ms-swift and many hub datasets store
    it); each tool an object or a JSON string of one. A bare function ({name, parameters, ...}) is wrapped as
    {"type": "function", "function": ...}, as ms-swift does, so every template sees OpenAI's shape."""
    tools = _maybe_json(row.get("tools"), where, "tools")
    if tools in (None, "", []):
        return None
    if not isinstance(tools, list):
        raise DataError(f"{where}: field 'tools': expected a list of tool definitions, got {type(tools).__name__}")
    out = []
    for k, tool in enumerate(tools):
        tool = _maybe_json(tool, where, f"tools[{k}]")
        if isinstance(tool, dict) and "function" not in tool and isinstance(tool.get("name"), str):
            tool = {"type": "function", "function": tool}
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict) or \
                not isinstance(tool["function"].get("name"), str):
            raise DataError(f"{where}: tools[{k}]: expected {{\"type\": \"function\", \"function\": {{\"name\": "
                            f"..., \"parameters\": ...}}}}, got {tool!r:.80}")
        out.append(tool)
    return out


def _present(row: dict, key: str) -> bool:
    # Columnar files (CSV, Parquet) give every row every column; an empty cell means "not given".
    return row.get(key) not in (None, "")


def _maybe_json(value: Any, where: str, field: str) -> Any:
    if not isinstance(value, str) or value.strip()[:1] not in ("[", "{"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: field {field!r}: invalid JSON ({e.msg} at column {e.colno})") from None


def _text(value: Any, where: str, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r}: expected a string, got {type(value).__name__}")
    return value


def _messages_rows(messages: Any, where: str) -> list[dict]:
    messages = _maybe_json(messages, where, "messages")
    if not isinstance(messages, (list, tuple)):
        raise DataError(f"{where}: field 'messages': expected a list of {{role, content}}, got "
                        f"{type(messages).__name__}")
    return _agent_turns([_message(m, where, f"messages[{k}]", "role", "content", None)
                         for k, m in enumerate(messages)], where, "messages")


def _sharegpt(turns: Any, where: str) -> list[dict]:
    turns = _maybe_json(turns, where, "conversations")
    if not isinstance(turns, (list, tuple)):
        raise DataError(f"{where}: field 'conversations': expected a list of {{from, value}}, got "
                        f"{type(turns).__name__}")
    out = []
    for k, turn in enumerate(turns):
        keys = ("from", "value") if isinstance(turn, dict) and "from" in turn else ("role", "content")
        out.append(_message(turn, where, f"conversations[{k}]", *keys, SHAREGPT_ROLES))
    return _agent_turns(out, where, "conversations")


def _agent_turns(messages: list[dict], where: str, field: str) -> list[dict]:
    """ms-swift's `tool_call` / `tool_response` messages as OpenAI's: consecutive calls join one assistant message's
    `tool_calls` (an assistant text right before them becomes that message's content: ms-swift writes thinking, then
    the calls); a response becomes a `tool` message. Then every call is checked and its arguments parsed
    (data/tools.normalize_tool_calls); errors name the row's own message index."""
    out: list[dict] = []
    origin: list[str] = []
    for k, m in enumerate(messages):
        if m["role"] == "tool_call":
            call = _swift_call(m["content"], where, f"{field}[{k}].content")
            prev = out[-1] if out else {}
            joins = prev.get("role") == "assistant" and (prev.get("tool_calls") or messages[k - 1]["role"] == "assistant")
            if joins:
                out[-1] = {**prev, "tool_calls": [*prev.get("tool_calls", []), call]}
                continue
            m = {"role": "assistant", "content": "", "tool_calls": [call]}
        elif m["role"] == "tool_response":
            m = {**m, "role": "tool"}
        out.append(m)
        origin.append(f"{field}[{k}]")
    try:
        return normalize_tool_calls(out, origin)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def _swift_call(content: Any, where: str, field: str) -> dict:
    obj = _maybe_json(content, where, field) if isinstance(content, str) else content
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise DataError(f"{where}: {field}: a tool_call message holds one call as JSON {{\"name\": ..., "
                        f"\"arguments\": {{...}}}}, got {content!r:.80}")
    return {"type": "function", "function": {"name": obj["name"], "arguments": obj.get("arguments", {})}}


def _message(m: Any, where: str, field: str, role_key: str, content_key: str, role_map: dict | None) -> dict:
    if not isinstance(m, dict) or role_key not in m:
        raise DataError(f"{where}: {field}: expected an object with {role_key!r} and {content_key!r}, got "
                        f"{m!r:.80}")
    role = role_map.get(m[role_key]) if role_map else m[role_key]
    if role not in ROLES + SWIFT_AGENT_ROLES:
        allowed = sorted(role_map) if role_map else ROLES + SWIFT_AGENT_ROLES
        raise DataError(f"{where}: {field}.{role_key}={m[role_key]!r}; expected one of {', '.join(allowed)}")
    content = m.get(content_key)
    if role in ("tool", "tool_response") and isinstance(content, (dict, list)):
        content = json.dumps(content, ensure_ascii=False)  # a structured result is rendered as its JSON text
    if role == "tool_call" and isinstance(content, dict):
        return {"role": role, "content": content}
    # OpenAI-style content parts (text, image_url, image, video) stay a list for vision-language models.
    content = _parts(content, where, f"{field}.{content_key}") if isinstance(content, list) else _text(
        content, where, f"{field}.{content_key}")
    out = {"role": role, "content": content}
    # Tool-calling fields ride along so templates that support them can render them.
    out.update({k: v for k, v in m.items() if k in ("tool_calls", "name", "tool_call_id") and v is not None})
    if "tool_calls" in out:
        out["tool_calls"] = _maybe_json(out["tool_calls"], where, f"{field}.tool_calls")
    return out


PART_TYPES = ("text", "image_url", "image", "video")


def _parts(parts: list, where: str, field: str) -> list[dict]:
    for k, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in PART_TYPES or (kind not in part and kind != "image"):
            raise DataError(f"{where}: {field}[{k}]: expected a content part {{type: {'|'.join(PART_TYPES)}, "
                            f"<type>: ...}}, got {part!r:.80}")
        if kind == "text" and not isinstance(part["text"], str):
            raise DataError(f"{where}: {field}[{k}].text: expected a string, got {type(part['text']).__name__}")
    return list(parts)


def row_media(row: dict, where: str) -> tuple[list, list]:
    """The row's `images` and `videos` columns (ms-swift): lists (or JSON strings of lists, or one path)."""
    out = []
    for key in ("images", "videos"):
        value = _maybe_json(row.get(key), where, key)
        if value in (None, "", []):
            value = []
        elif isinstance(value, (str, dict)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise DataError(f"{where}: field {key!r}: expected a list of paths or data URLs, got "
                            f"{type(value).__name__}")
        out.append(list(value))
    return out[0], out[1]


def has_media(messages: list[dict], row: dict) -> bool:
    return any(isinstance(m.get("content"), list) for m in messages) or any(
        _present(row, k) and row[k] != [] for k in ("images", "videos"))


def _with_system_column(messages: list[dict], row: dict, where: str) -> list[dict]:
    # A separate `system` column (common next to messages/conversations) must not be silently ignored.
    if not _present(row, "system"):
        return messages
    if messages and messages[0]["role"] == "system":
        raise DataError(f"{where}: row has both a 'system' field and a system message; keep one")
    return [{"role": "system", "content": _text(row["system"], where, "system")}] + messages


def _alpaca(row: dict, where: str) -> list[dict]:
    prompt = _text(row["instruction"], where, "instruction")
    if _present(row, "input"):
        prompt = f"{prompt}\n{_text(row['input'], where, 'input')}"
    return _system(row, where) + [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": _text(row["output"], where, "output")}]


def _query_response(row: dict, where: str) -> list[dict]:
    history = _maybe_json(row.get("history"), where, "history") or []
    if not isinstance(history, (list, tuple)) or any(not isinstance(p, (list, tuple)) or len(p) != 2
                                                     for p in history):
        raise DataError(f"{where}: field 'history': expected a list of [query, response] pairs, got {history!r:.80}")
    pairs = [*history, (row["query"], row["response"])]
    turns = [[{"role": "user", "content": _text(q, where, "query")},
              {"role": "assistant", "content": _text(r, where, "response")}] for q, r in pairs]
    return _system(row, where) + [m for turn in turns for m in turn]


def _system(row: dict, where: str) -> list[dict]:
    return [{"role": "system", "content": _text(row["system"], where, "system")}] if _present(row, "system") else []


# ---------------------------------------------------------------- readers

def builtin_dataset_path(name: str) -> Path:
    """The packaged dataset `name` (e.g. `self_identity`), as used by the spec `builtin:self_identity`."""
    path = BUILTIN_DIR / f"{name}.jsonl"
    if not path.is_file():
        known = sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl"))
        raise DataError(f"unknown built-in dataset {name!r}; available: {', '.join(known)}")
    return path


def resolve_path(path: str | Path) -> Path:
    """`builtin:NAME` -> the packaged file; anything else must exist on disk (nothing is downloaded)."""
    text = str(path)
    if text.startswith(BUILTIN_PREFIX):
        return builtin_dataset_path(text[len(BUILTIN_PREFIX):])
    resolved = Path(text).expanduser()
    if not resolved.exists():
        raise DataError(f"dataset {text!r} does not exist; jaxswift reads local files only "
                        f"({', '.join(READABLE)}) or builtin:NAME")
    return resolved


def check_dataset_specs(specs: list[str], flag: str) -> None:
    """Every `path[#N]` of a dataset flag exists (or names a built-in set): checked before a run loads anything."""
    for spec in specs:
        path, _ = parse_dataset_spec(spec)
        try:
            resolve_path(path)
        except DataError as e:
            raise DataError(f"{flag} {spec}: {e}") from None


def iter_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield (where, row) for every row of a dataset file or folder, streaming where the format allows."""
    path = resolve_path(path)
    if path.is_dir():
        return _iter_saved_dataset(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown dataset file type {path.suffix!r}; readable: {', '.join(READABLE)}")
    return reader(path)


def count_rows(path: str | Path) -> int:
    """Number of rows, cheaply where the format stores it (Parquet metadata, Arrow) or by one streaming pass."""
    path = resolve_path(path)
    if path.is_dir():
        return len(_load_saved_dataset(path))
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq
        return pq.ParquetFile(path).metadata.num_rows
    if path.suffix.lower() == ".jsonl":  # one row per non-blank line; parsing waits for the reading pass
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    return sum(1 for _ in iter_rows(path))


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))  # with its newline, a cut-off line fails at "line 2 column 1"
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            yield f"{path}:{lineno}", row


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    # A JSON document cannot be parsed piecewise; large data belongs in JSONL or Parquet.
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows, got a {type(rows).__name__}; "
                        "use .jsonl for one object per line")
    for k, row in enumerate(rows):
        yield f"{path}[{k}]", row


def _iter_csv(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            # line_num is the row's last physical line (cells may hold newlines); it points the user close enough.
            yield f"{path}:{reader.line_num}", row


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq
    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{path}:row {n}", row
            n += 1


def _load_saved_dataset(path: Path):
    try:
        import datasets  # optional: only folders written by datasets.save_to_disk need it
    except ImportError:
        raise DataError(f"{path}: reading a folder saved with datasets.save_to_disk needs the `datasets` package "
                        "(pip install 'jaxswift[datasets]'); or pass a .jsonl/.json/.csv/.parquet file") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: a folder must be saved with datasets.save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)}); "
                            "pass the split's folder instead")
        ds = ds["train"]
    return ds


def _iter_saved_dataset(path: Path) -> Iterator[tuple[str, Any]]:
    for n, row in enumerate(_load_saved_dataset(path)):  # memory-mapped Arrow, read row by row
        yield f"{path}:row {n}", row


_READERS = {".jsonl": _iter_jsonl, ".json": _iter_json, ".csv": _iter_csv, ".parquet": _iter_parquet}


# ---------------------------------------------------------------- --dataset specs

def parse_dataset_spec(spec: str) -> tuple[str, int | None]:
    """`path#N` -> (path, N); `path` -> (path, None). A '#' not followed by digits is part of the path."""
    path, sep, count = str(spec).rpartition("#")
    if not sep or not count.lstrip("-").isdigit():
        return str(spec), None
    if int(count) <= 0:
        raise ConfigError(f"--dataset {spec!r}: the part after '#' must be a positive row count")
    return path, int(count)


def sample_counts(n_rows: int, n: int | None, seed: int) -> np.ndarray:
    """How often each row is used: all once for `n=None`; else N rows — whole copies of the file while N exceeds
    its length, and a seeded random choice (without replacement) for the rest."""
    if n is None:
        return np.ones(n_rows, dtype=np.int64)
    if n_rows == 0:
        raise DataError(f"cannot sample {n} rows from an empty dataset")
    counts = np.full(n_rows, n // n_rows, dtype=np.int64)
    counts[np.random.default_rng(seed).permutation(n_rows)[: n % n_rows]] += 1
    return counts


# ---------------------------------------------------------------- rows -> examples

@dataclasses.dataclass(frozen=True)
class DatasetStats:
    """What happened to every row used (a row repeated by `#N` counts each time): `rows == examples + skipped`;
    `truncated` examples were kept, shortened by the `left`/`right` strategy."""

    rows: int = 0
    examples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0
    skipped: tuple[tuple[str, int], ...] = ()  # (reason, count), in order of first appearance

    @property
    def skipped_total(self) -> int:
        return sum(n for _, n in self.skipped)

    def summary(self) -> str:
        text = (f"{self.rows} rows -> {self.examples} examples, {self.tokens} tokens "
                f"({self.loss_tokens} trained on)")
        if self.truncated:
            text += f"; {self.truncated} truncated"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{n} {reason}" for reason, n in self.skipped)
        return text


SKIP_NO_ASSISTANT = "without an assistant turn"
SKIP_EMPTY_ASSISTANT = "with an empty assistant reply"
SKIP_TOO_LONG = "longer than max_length (truncation_strategy=delete)"
SKIP_NO_LOSS = "with no trained-on token left after truncation"


def build_sft_examples(specs: list[str], tokenizer, *, max_length: int, truncation_strategy: str = "delete",
                       loss_scale: str = "default", system: str | None = None,
                       seed: int = 42) -> tuple[list[EncodedChat], DatasetStats]:
    """Read every `--dataset` spec, convert, encode and truncate; skipped rows are counted by reason."""
    tally: collections.Counter = collections.Counter()
    examples = list(iter_sft_examples(specs, tokenizer, tally, max_length=max_length, seed=seed, system=system,
                                      truncation_strategy=truncation_strategy, loss_scale=loss_scale))
    return examples, _stats(examples, tally)


def sampled_rows(specs: list[str], seed: int) -> Iterator[tuple[str, Any, int]]:
    """(where, row, times) of every --dataset spec's rows, `path#N` sampled (times > 1: the row drawn again, when N
    exceeds the file; rows not drawn are left out). Unsampled specs stream in one pass; `#N` counts the rows first."""
    if not specs:
        raise ConfigError("--dataset: no dataset given")
    for k, spec in enumerate(specs):
        path, n = parse_dataset_spec(spec)
        counts = itertools.repeat(1) if n is None else sample_counts(count_rows(path), n, seed + k)
        for (where, row), times in zip(iter_rows(path), counts):
            if times:
                yield where, row, int(times)


def iter_sft_examples(specs: list[str], tokenizer, tally: collections.Counter, *, max_length: int,
                      truncation_strategy: str = "delete", loss_scale: str = "default", system: str | None = None,
                      seed: int = 42) -> Iterator[EncodedChat]:
    """Streaming form of `build_sft_examples`: yields examples one at a time, counting outcomes in `tally`."""
    for where, row, times in sampled_rows(specs, seed):
        example, outcome = _row_to_example(row, where, tokenizer, max_length=max_length, system=system,
                                           truncation_strategy=truncation_strategy, loss_scale=loss_scale)
        tally[outcome] += times
        if example is not None:
            yield from itertools.repeat(example, times)


def _row_to_example(row, where: str, tokenizer, *, max_length, truncation_strategy, loss_scale, system):
    """(example or None, outcome) for one row; outcome is "kept", "truncated" or a skip reason."""
    messages = row_to_messages(row, where)
    if has_media(messages, row):
        raise DataError(f"{where}: the row has images or content parts; it needs a vision-language model")
    replies = [m for m in messages if m["role"] == "assistant"]
    if not replies:
        return None, SKIP_NO_ASSISTANT
    if any(not m["content"].strip() and not m.get("tool_calls") for m in replies):
        return None, SKIP_EMPTY_ASSISTANT
    try:
        full = encode_chat(tokenizer, messages, loss_scale=loss_scale, system=system, tools=row_tools(row, where))
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    kept = truncate(full, max_length, truncation_strategy)
    if kept is None:
        return None, SKIP_TOO_LONG
    if not kept.loss_mask.any():
        return None, SKIP_NO_LOSS
    return kept, "truncated" if len(kept) < len(full) else "kept"


def _stats(examples: Sequence[EncodedChat], tally: collections.Counter) -> DatasetStats:
    skipped = tuple((reason, n) for reason, n in tally.items() if reason not in ("kept", "truncated"))
    return DatasetStats(rows=sum(tally.values()), examples=len(examples),
                        tokens=sum(len(e) for e in examples), loss_tokens=sum(int(e.loss_mask.sum()) for e in examples),
                        truncated=tally["truncated"], skipped=skipped)


def split_train_val(examples: list, ratio: float, seed: int) -> tuple[list, list]:
    """`--split_dataset_ratio`: a seeded random `ratio` of the examples (at least one when ratio > 0) for validation."""
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"--split_dataset_ratio={ratio}; expected a fraction in [0, 1)")
    if ratio == 0.0:
        return list(examples), []
    n_val = max(1, int(round(len(examples) * ratio)))
    if n_val >= len(examples):
        raise ConfigError(f"--split_dataset_ratio={ratio} leaves no training examples out of {len(examples)}")
    order = np.random.default_rng(seed).permutation(len(examples))
    val = set(order[:n_val].tolist())
    return ([e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val])
