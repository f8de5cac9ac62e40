"""The Runs tab: every run found under the output root (so the list survives a UI restart), the selected run's
status, log tail and loss / lr / reward charts from its logging.jsonl, refreshed every few seconds; Stop signals its
process group."""

from __future__ import annotations

import time

import gradio as gr
import pandas as pd

from jaxswift.errors import JaxswiftError
from jaxswift.webui import runs

CHARTS = (("loss", "loss"), ("lr", "lr"), ("reward", "reward"))
TABLE = ["run", "recipe", "status", "started", "steps", "last loss"]
REFRESH_S = 2.0


def _train_records(run: runs.Run) -> list[dict]:
    return [r for r in runs.metrics(run) if r.get("split", "train") == "train" and "step" in r]


def table(found: list[runs.Run]) -> pd.DataFrame:
    rows = []
    for run in found:
        records = _train_records(run)
        losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
        rows.append([run.name, run.recipe, run.status, time.strftime("%m-%d %H:%M:%S", time.localtime(run.started)),
                     records[-1]["step"] if records else 0, round(losses[-1], 4) if losses else None])
    return pd.DataFrame(rows, columns=TABLE)


def chart_frames(run: runs.Run | None) -> tuple[list[pd.DataFrame], str]:
    """One (step, value) frame per chart (empty when the run logs no such metric) and a caption saying how many
    points each has."""
    records = _train_records(run) if run is not None else []
    frames, caption = [], []
    for key, label in CHARTS:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        frames.append(pd.DataFrame(points, columns=["step", label]))
        if points:
            caption.append(f"{label}: {len(points)} points, last {points[-1][1]:.4g} at step {points[-1][0]}")
    return frames, " · ".join(caption) or "no metrics logged yet"


def build(ctx) -> gr.Timer:
    """The tab's content; returns its refresh timer (inactive: the app turns it on while the tab is shown)."""
    L = ctx.labels
    gr.Markdown(f"{L['runs']} `{ctx.output_root}`")
    listing = gr.Dataframe(headers=TABLE, interactive=False, elem_id="runs-table", wrap=True)
    with gr.Row():
        selected = gr.Dropdown(label=L["run"], choices=[], allow_custom_value=False, elem_id="runs-select", scale=4)
        refresh = gr.Button(L["refresh"], elem_id="runs-refresh", scale=1)
        stop = gr.Button(L["stop"], variant="stop", elem_id="runs-stop", scale=1)
    status = gr.Markdown(elem_id="runs-status")
    caption = gr.Markdown(elem_id="runs-metrics")
    with gr.Row():
        # ".3~g": three significant digits, so a learning rate's axis reads 0.0003 or 3e-5, not a clipped 0.000300000
        plots = [gr.LinePlot(x="step", y=label, title=label, elem_id=f"runs-{key}", height=220, y_axis_format=".3~g")
                 for key, label in CHARTS]
    log = gr.Textbox(label=L["log"], lines=16, max_lines=16, autoscroll=True, elem_id="runs-log")
    timer = gr.Timer(REFRESH_S, active=False)
    known = gr.State(None)  # the runs this page has listed: a run that appears later is selected (just launched)

    def refresh_all(current: str | None, seen: list | None):
        found = runs.scan(ctx.output_root)
        choices = [str(r.output_dir) for r in found]
        new = [c for c in choices if seen is not None and c not in seen]
        if new:
            current = new[0]  # the newest: follow what was just launched
        elif current not in choices:
            current = choices[0] if choices else None
        run = next((r for r in found if str(r.output_dir) == current), None)
        frames, text = chart_frames(run)
        # a chart is shown only for what the run logs (SFT logs no reward); the loss chart always, to say "no data yet"
        charts = [gr.update(value=frame, visible=key == "loss" or not frame.empty)
                  for (key, _label), frame in zip(CHARTS, frames)]
        if run is None:
            head, tail = "", ""
        else:
            head = f"**{run.name}** — `{run.status}`" + (f" (exit code {run.returncode})"
                                                         if run.returncode not in (None, 0) else "")
            head += f"\n\n`{run.command}`"
            tail = runs.log_tail(run)
        return (table(found), gr.update(choices=choices, value=current), head, text, *charts, tail, choices)

    outputs = [listing, selected, status, caption, *plots, log, known]
    inputs = [selected, known]
    timer.tick(refresh_all, inputs=inputs, outputs=outputs, show_progress="hidden")
    refresh.click(refresh_all, inputs=inputs, outputs=outputs)
    selected.input(refresh_all, inputs=inputs, outputs=outputs, show_progress="hidden")
    ctx.on_load.append((refresh_all, inputs, outputs))

    def stop_selected(current: str | None, seen: list | None):
        if not current:
            gr.Warning("no run selected")
        else:
            try:
                run = runs.stop(current)
                gr.Info(f"{run.name}: {run.status}")
            except JaxswiftError as e:
                gr.Warning(str(e))
        return refresh_all(current, seen)

    stop.click(stop_selected, inputs=inputs, outputs=outputs, concurrency_limit=None)
    return timer
