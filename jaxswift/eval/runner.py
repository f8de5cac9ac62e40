"""Runs tasks against a target: requests out, per-item records and task metrics back.

    results = evaluate(load_tasks(["builtin"]), InProcessTarget(params, cfg, tokenizer), seed=0)

`make_evaluator` is the form training uses: a function of the params alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxswift.eval import scoring
from jaxswift.eval.targets import GenRequest, InProcessTarget
from jaxswift.eval.tasks import Task, chat_messages, context_text, select


@dataclasses.dataclass
class TaskResult:
    name: str
    kind: str
    metrics: dict[str, float]
    n: int
    records: list[dict]


def _mc_pairs(task: Task, seed: int):
    contexts = [context_text(task, i, seed) for i in range(len(task.items))]
    pairs = [(ctx, task.target_delimiter + c) for ctx, item in zip(contexts, task.items) for c in item.choices]
    return contexts, pairs


def _multiple_choice(task: Task, contexts: list[str], scored) -> TaskResult:
    scored = iter(scored)
    records = []
    for ctx, item in zip(contexts, task.items):
        got = [next(scored) for _ in item.choices]
        lls = [s.loglik for s in got]
        records.append({"where": item.where, "context": ctx, "choices": list(item.choices), "gold": item.gold,
                        "logliks": lls, "is_greedy": [s.is_greedy for s in got],
                        **scoring.multiple_choice(lls, item.choices, item.gold)})
    return _result(task, records, ("acc", "acc_norm"))


def _gen_requests(task: Task, target, seed: int) -> list[GenRequest]:
    chat = task.chat and target.has_chat_template
    return [GenRequest(tuple(chat_messages(task, i, seed)) if chat else None,
                       None if chat else context_text(task, i, seed), task.until, task.max_new_tokens)
            for i in range(len(task.items))]


def _generate(task: Task, requests: list[GenRequest], outputs: list[str]) -> TaskResult:
    records = []
    for item, req, text in zip(task.items, requests, outputs):
        answer, score = scoring.generation(text, item.answers, task.metric, task.extract)
        records.append({"where": item.where, "prompt": list(req.messages) if req.messages else req.text,
                        "output": text, "extracted": answer, "answers": list(item.answers), task.metric: score})
    return _result(task, records, (task.metric,))


def _perplexity(task: Task, lls: list[float]) -> TaskResult:
    records = [{"where": item.where, "loglik": ll, "words": len(item.prompt.split()),
                "bytes": len(item.prompt.encode("utf-8"))} for item, ll in zip(task.items, lls)]
    metrics = scoring.perplexity(sum(lls), sum(r["words"] for r in records), sum(r["bytes"] for r in records))
    return TaskResult(task.name, task.kind, metrics, len(records), records)


def _result(task: Task, records: list[dict], names: tuple[str, ...]) -> TaskResult:
    metrics = {name: float(np.mean([r[name] for r in records])) for name in names}
    return TaskResult(task.name, task.kind, metrics, len(records), records)


def _take(values: list, counts: list[int]) -> list[list]:
    out, start = [], 0
    for n in counts:
        out.append(values[start:start + n])
        start += n
    return out


def evaluate(tasks: list[Task], target, *, seed: int = 0, limit: int | None = None,
             num_fewshot: int | None = None, max_new_tokens: int | None = None,
             progress: Callable[[str], None] | None = None) -> list[TaskResult]:
    """Each task's metrics and per-item records. `limit`: the first N items; `num_fewshot` and `max_new_tokens`
    override every task's own; `seed` picks the few-shot examples (and seeds sampling, if any).

    The requests of all tasks go to the target together (one log-likelihood pass, one generation pass), so short
    tasks share batches and compiled shapes."""
    tasks = [select(t, limit, num_fewshot) for t in tasks]
    if max_new_tokens is not None:
        tasks = [dataclasses.replace(t, max_new_tokens=max_new_tokens) for t in tasks]
    for t in tasks:
        if progress:
            progress(f"{t.name}: {len(t.items)} items ({t.kind}, {t.num_fewshot}-shot)")
    mc = {t.name: _mc_pairs(t, seed) for t in tasks if t.kind == "multiple_choice"}
    gen = {t.name: _gen_requests(t, target, seed) for t in tasks if t.kind == "generate"}
    texts = {t.name: [item.prompt for item in t.items] for t in tasks if t.kind == "perplexity"}
    scored = dict(zip(mc, _take(target.loglikelihood([p for _, pairs in mc.values() for p in pairs]),
                                [len(pairs) for _, pairs in mc.values()]))) if mc else {}
    outputs = dict(zip(gen, _take(target.generate([r for rs in gen.values() for r in rs]),
                                  [len(rs) for rs in gen.values()]))) if gen else {}
    rolled = dict(zip(texts, _take(target.rolling_loglikelihood([x for xs in texts.values() for x in xs]),
                                   [len(xs) for xs in texts.values()]))) if texts else {}
    results = []
    for t in tasks:
        if t.kind == "multiple_choice":
            results.append(_multiple_choice(t, mc[t.name][0], scored[t.name]))
        elif t.kind == "generate":
            results.append(_generate(t, gen[t.name], outputs[t.name]))
        else:
            results.append(_perplexity(t, rolled[t.name]))
    return results


def flat_metrics(results: list[TaskResult]) -> dict[str, float]:
    """{"task/metric": value}, the shape a training log takes."""
    return {f"{r.name}/{k}": v for r in results for k, v in r.metrics.items()}


def make_evaluator(tasks: list[Task], tokenizer, cfg, *, seed: int = 0, limit: int | None = None,
                   num_fewshot: int | None = None, max_new_tokens: int | None = None,
                   batch_size: int = 64) -> Callable[..., dict[str, float]]:
    """`evaluator(params) -> {"task/metric": value}` for use inside training.

    params: the model's params pytree as the train state holds it, LoRA leaves included (the forward applies
    them; nothing is merged); replicated or sharded over a mesh alike. cfg: the run's ModelConfig; tokenizer: the
    model's. Tasks are read and limited once, here; each call only runs the model (greedy generation unless the
    tasks are sampled; the same seed every call, so scores move only with the params).
    """
    prepared = [select(t, limit, num_fewshot) for t in tasks]

    def evaluator(params) -> dict[str, float]:
        target = InProcessTarget(params, cfg, tokenizer, seed=seed, batch_size=batch_size)
        return flat_metrics(evaluate(prepared, target, seed=seed, max_new_tokens=max_new_tokens))

    return evaluator
