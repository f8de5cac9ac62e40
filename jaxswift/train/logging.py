"""Run logs: a JSONL file, TensorBoard events, a progress bar, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tqdm.auto import tqdm


class RunLogger:
    """Writes every logged record to output_dir/logging.jsonl and TensorBoard (output_dir/runs); with
    write_files=False (the non-primary processes of a multi-process run) only the progress bar and messages."""

    def __init__(self, output_dir: str | Path, total_steps: int, initial_step: int = 0, enable_bar: bool = True,
                 write_files: bool = True):
        from tensorboardX import SummaryWriter

        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.dir / "logging.jsonl", "a", buffering=1) if write_files else None
        self.tb = SummaryWriter(str(self.dir / "runs")) if write_files else None
        self.bar = tqdm(total=total_steps, initial=initial_step, disable=not enable_bar, dynamic_ncols=True,
                        desc="train", unit="step")
        self.start = self.created = time.perf_counter()
        self.tokens = 0.0

    def log(self, step: int, record: dict, *, prefix: str = "train"):
        if self.jsonl is None:
            return
        record = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in record.items()}
        wall = {"elapsed_s": round(time.perf_counter() - self.created, 3)}  # JSONL only: step timing for benchmarks
        self.jsonl.write(json.dumps({"step": step, "split": prefix, **record, **wall}) + "\n")
        for key, value in record.items():
            if isinstance(value, float) and math.isfinite(value):
                self.tb.add_scalar(f"{prefix}/{key}", value, step)

    def advance(self, step: int, loss: float, lr: float, tokens: float):
        self.tokens += tokens
        elapsed = time.perf_counter() - self.start
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{self.tokens / max(elapsed, 1e-9):.0f}")
        self.bar.update(step - self.bar.n)

    def restart_clock(self):
        self.start, self.tokens = time.perf_counter(), 0.0

    def write(self, message: str):
        self.bar.write(message)

    def close(self):
        self.bar.close()
        if self.jsonl is not None:
            self.tb.close()
            self.jsonl.close()


def append_record(out_dir: str | Path, record: dict):
    """One record added to out_dir/logging.jsonl outside a RunLogger (a summary, a score taken before training)."""
    with open(Path(out_dir) / "logging.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_scores(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{name: [(step, value)]} of the eval records' task scores: named `task/metric` (a task scorer's or an eval
    dataset's, e.g. shapes/accuracy) with values in [0, 1], so that they share one axis."""
    scores: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.get("split") != "eval":
            continue
        for key, value in r.items():
            if "/" in key and isinstance(value, (int, float)) and 0.0 <= value <= 1.0:
                scores.setdefault(key, []).append((r["step"], float(value)))
    return scores


def plot_loss(log_path: str | Path, out_png: str | Path) -> Path | None:
    """Training (and eval) loss against step, from logging.jsonl; the eval task scores beside it when there are
    any (a person reads "did it learn" off a curve faster than off a table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train" and "loss" in r]
    evals = [(r["step"], r["loss"]) for r in records if r.get("split") == "eval" and "loss" in r]
    scores = eval_scores(records)
    if not train:
        return None
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(12 if scores else 7, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if scores:
        ax = axes[0, 1]
        for name, points in scores.items():
            ax.plot(*zip(*points), "o-", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("eval score")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
