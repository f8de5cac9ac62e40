"""Evaluation output: a terminal table, `eval_result.json`, a PNG bar chart, and several runs side by side."""

from __future__ import annotations

import json
from pathlib import Path

from jaxswift.errors import ConfigError
from jaxswift.eval.runner import TaskResult

RESULT_FILE = "eval_result.json"
HIGHER_IS_BETTER = {"word_perplexity": False, "byte_perplexity": False, "bits_per_byte": False}


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def results_table(results: list[TaskResult]) -> str:
    rows = [[r.name, r.kind, k, f"{v:.4f}", str(r.n)] for r in results for k, v in r.metrics.items()]
    return table(rows, ["task", "kind", "metric", "value", "items"])


def write_results(out_dir: Path, results: list[TaskResult], run: dict) -> Path:
    """`out_dir/eval_result.json`: the run's settings, and per task its metrics, item count and records."""
    out_dir.mkdir(parents=True, exist_ok=True)
    body = {"run": run, "tasks": {r.name: {"kind": r.kind, "metrics": r.metrics, "n": r.n, "records": r.records}
                                  for r in results}}
    path = out_dir / RESULT_FILE
    path.write_text(json.dumps(body, indent=1, ensure_ascii=False), encoding="utf-8")
    return path


def read_results(run_dir: Path) -> dict:
    path = run_dir / RESULT_FILE if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise ConfigError(f"--compare {run_dir}: no {RESULT_FILE} there (a jaxswift eval --output_dir)")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        return {f"{task}/{k}": v for task, t in body["tasks"].items() for k, v in t["metrics"].items()}
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise ConfigError(f"{path}: not a jaxswift eval result ({e})") from None


def bar_chart(series: dict[str, dict[str, float]], path: Path, title: str) -> Path:
    """Grouped bars: one group per task/metric, one bar per run (series name -> {metric: value})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = list(dict.fromkeys(m for values in series.values() for m in values))
    x = np.arange(len(metrics))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(metrics) + 2), 4))
    for i, (name, values) in enumerate(series.items()):
        heights = [values.get(m, np.nan) for m in metrics]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(x, metrics, rotation=20, ha="right", fontsize=8)
    if all(HIGHER_IS_BETTER.get(m.split("/")[-1], True) for m in metrics):
        ax.set_ylim(0, 1.08)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(run_dirs: list[str], out_dir: Path | None) -> tuple[str, Path | None]:
    """(table, chart path): each run's metrics side by side."""
    runs = {d: read_results(Path(d)) for d in run_dirs}
    metrics = list(dict.fromkeys(m for values in runs.values() for m in values))
    rows = [[m] + [f"{runs[d][m]:.4f}" if m in runs[d] else "-" for d in run_dirs] for m in metrics]
    text = table(rows, ["task/metric"] + list(run_dirs))
    chart = bar_chart(runs, out_dir / "compare.png", "jaxswift eval: runs compared") if out_dir else None
    return text, chart
