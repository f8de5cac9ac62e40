"""Batch inference over a dataset file through the serving engine: every row's next assistant turn, one JSON line
per input row, in input order, with a progress bar.

Rows are in any SFT format that data/formats.py reads; a final assistant turn is dropped (it is written back as
`labels`) and generated. Every row is checked and tokenized before generation starts, so a bad row stops the run
with its file:line before any compute is spent.
"""

from __future__ import annotations

import dataclasses
import json
import queue
from pathlib import Path

from jaxswift.data.formats import iter_rows, row_to_messages
from jaxswift.errors import DataError
from jaxswift.infer.engine_api import RequestSampling
from jaxswift.infer.orchestrator import Chunk, GenerationRequest, Orchestrator


@dataclasses.dataclass
class PromptRow:
    where: str
    messages: list[dict]
    labels: str | None
    prompt_ids: list[int]


def _prompt_messages(row, where: str, system: str | None) -> tuple[list[dict], str | None]:
    """The conversation up to the turn to generate, and the dropped reference answer (if the row had one)."""
    answer_key = _missing_answer_key(row)
    if answer_key:  # rows meant for inference may leave the answer out
        row = {**row, answer_key: ""}
    messages = row_to_messages(row, where)
    labels = None
    if answer_key:
        messages = messages[:-1]
    elif messages and messages[-1]["role"] == "assistant":
        labels, messages = messages[-1]["content"], messages[:-1]
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}] + messages
    if not messages:
        raise DataError(f"{where}: no turns before the assistant's; nothing to answer")
    return messages, labels


def _missing_answer_key(row) -> str | None:
    if not isinstance(row, dict):
        return None
    for question, answer in (("instruction", "output"), ("query", "response")):
        if row.get(question) not in (None, "") and answer not in row:
            return answer
    return None


def read_prompt_rows(path: str, tokenizer, max_model_len: int, system: str | None = None) -> list[PromptRow]:
    rows = []
    for where, row in iter_rows(path):
        messages, labels = _prompt_messages(row, where, system)
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the template's own checks (role order, unsupported roles)
            raise DataError(f"{where}: the chat template cannot render this conversation ({e})") from None
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= max_model_len:
            raise DataError(f"{where}: the prompt has {len(ids)} tokens; --max_model_len {max_model_len} leaves no "
                            "room for the answer")
        rows.append(PromptRow(where, messages, labels, ids))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def infer_dataset(model, dataset: str, result_path: str, *, max_new_tokens: int, max_num_seqs: int = 8,
                  max_model_len: int = 2048, sampling: dict | None = None, seed: int | None = None,
                  system: str | None = None, progress: bool = True) -> int:
    """Answers every row of `dataset` into `result_path` (JSONL, one line per row, input order); the row count."""
    from tqdm import tqdm

    from jaxswift.infer.engine import JaxEngine

    if model.tokenizer is None:
        raise DataError(f"{model.source}: the model has no tokenizer, so it cannot render chat rows")
    rows = read_prompt_rows(dataset, model.tokenizer, max_model_len, system)
    engine = JaxEngine(model, max_concurrent_decodes=max_num_seqs, max_model_len=max_model_len)
    orchestrator = Orchestrator(engine, max_queue=len(rows))
    finished: queue.Queue[tuple[int, Chunk]] = queue.Queue()
    results: list[Chunk] = [Chunk() for _ in rows]
    try:
        for i, row in enumerate(rows):
            request = GenerationRequest(row.prompt_ids, RequestSampling(
                max_tokens=min(max_new_tokens, max_model_len - len(row.prompt_ids)),
                seed=None if seed is None else seed + i, **(sampling or {})))
            orchestrator.submit([request], _collector(results[i], i, finished))
        _write_in_order(rows, results, finished, Path(result_path), tqdm(total=len(rows), disable=not progress))
    finally:
        orchestrator.shutdown()
    return len(rows)


def _collector(merged: Chunk, i: int, finished: queue.Queue):
    def sink(_, chunk: Chunk):
        merged.text += chunk.text
        merged.completion_tokens, merged.prompt_tokens = chunk.completion_tokens, chunk.prompt_tokens
        merged.finish_reason, merged.error = chunk.finish_reason, chunk.error
        if chunk.final:
            finished.put(i)
    return sink


def _write_in_order(rows: list[PromptRow], results: list[Chunk], finished: queue.Queue, out: Path, bar):
    out.parent.mkdir(parents=True, exist_ok=True)
    done, next_row = set(), 0
    with open(out, "w", encoding="utf-8") as f:
        while next_row < len(rows):
            i = finished.get()
            if results[i].error is not None:
                raise DataError(f"{rows[i].where}: generation failed: {results[i].error}")
            done.add(i)
            bar.update(1)
            while next_row in done:
                f.write(json.dumps(_result_line(rows[next_row], results[next_row]), ensure_ascii=False) + "\n")
                next_row += 1
    bar.close()


def _result_line(row: PromptRow, result: Chunk) -> dict:
    line = {"messages": row.messages, "response": result.text, "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
    if row.labels is not None:
        line["labels"] = row.labels
    return line
