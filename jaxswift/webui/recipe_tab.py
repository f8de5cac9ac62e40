"""A recipe's tab, built from its registry entry: the form (common fields, then "Advanced"), the live command line
and `--config` YAML, and Launch (a run of its own, listed in Runs) or, for the planner, Run-and-show-output."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import gradio as gr

from jaxswift.errors import JaxswiftError
from jaxswift.webui import forms, runs
from jaxswift.webui.forms import FieldInfo, FormError, RecipeSpec

PER_ROW = 3


def fresh_output_dir(output_root: Path, key: str) -> str:
    return str(output_root / f"{key}-{time.strftime('%Y%m%d-%H%M%S')}")


def _widget(spec: RecipeSpec, f: FieldInfo, value=None):
    common = dict(label=f.name, info=f.help or None, elem_id=f"{spec.key}-{f.name}")
    value = f.default_text if value is None else value
    if f.kind == "bool":
        return gr.Checkbox(value=value, **common)
    if f.choices:
        choices = list(f.choices) if f.default_text in f.choices else [f.default_text, *f.choices]
        return gr.Dropdown(choices=choices, value=value, allow_custom_value=True, **common)
    return gr.Textbox(value=value, max_lines=1, **common)


def _rows(spec: RecipeSpec, fields: list[FieldInfo], values: dict) -> list:
    out = []
    for start in range(0, len(fields), PER_ROW):
        with gr.Row():
            out += [_widget(spec, f, values.get(f.name)) for f in fields[start:start + PER_ROW]]
    return out


def _error(L: dict, e: Exception) -> str:
    return f"**{L['invalid']}** — {e}"


def build(spec: RecipeSpec, ctx) -> None:
    """The tab's content (call inside `gr.Tab`). ctx: the UI's settings (output_root, labels)."""
    L = ctx.labels
    fields = forms.describe(spec.arguments_class(), spec.choices)
    names = [f.name for f in fields]
    common = [f for name in spec.common for f in fields if f.name == name]
    advanced = [f for f in fields if f.name not in spec.common]
    has_output_dir = "output_dir" in names
    initial = {}
    if spec.launches_run and has_output_dir:  # each page load proposes a new folder under the output root
        initial["output_dir"] = lambda: fresh_output_dir(ctx.output_root, spec.key)
    ordered = common + advanced
    widgets = _rows(spec, common, initial)
    with gr.Accordion(L["advanced"], open=False, elem_id=f"{spec.key}-advanced"):
        widgets += _rows(spec, advanced, initial)
    with gr.Row():
        command = gr.Code(label=L["command"], language="shell", interactive=False, elem_id=f"{spec.key}-command",
                          lines=2)
        config = gr.Code(label=L["config_yaml"], language="yaml", interactive=False, elem_id=f"{spec.key}-yaml",
                         lines=2)
    button = gr.Button(L["launch"] if spec.launches_run else L["run_plan"], variant="primary",
                       elem_id=f"{spec.key}-launch")
    message = gr.Markdown(elem_id=f"{spec.key}-message")

    def values_of(*values) -> dict:
        return dict(zip([f.name for f in ordered], values))

    def preview(*values):
        """The command line and YAML as the form stands, and what the parser says about it (no launch)."""
        line = ""
        try:
            line = forms.command_line(spec, forms.to_flags(ordered, values_of(*values)))
            flags, args = forms.validate(spec, ordered, values_of(*values))
            return line, forms.config_yaml(flags, args, ordered), ""
        except FormError as e:
            return line, "", _error(L, e)

    gr.on([w.change for w in widgets], preview, inputs=widgets, outputs=[command, config, message],
          trigger_mode="always_last", show_progress="hidden")
    ctx.on_load.append((preview, widgets, [command, config, message]))

    if spec.launches_run:
        def launch(*values):
            try:
                flags, args = forms.validate(spec, ordered, values_of(*values))
                folder = _run_folder(ctx.output_root, spec, args)
                run = runs.launch(spec.module, ["jaxswift", spec.command, *flags], folder, env=dict(os.environ))
            except JaxswiftError as e:
                return _error(L, e)
            return (f"**{L['launched']}** `{run.command}` — pid {run.pid}, output `{run.output_dir}` "
                    f"({L['tab_runs']})")

        button.click(launch, inputs=widgets, outputs=message, concurrency_limit=None)
    else:
        output = gr.Textbox(label=L["plan_output"], lines=14, elem_id=f"{spec.key}-output")

        def run_inline(*values):
            try:
                flags, _ = forms.validate(spec, ordered, values_of(*values))
            except FormError as e:
                yield _error(L, e), ""
                return
            yield f"`{forms.command_line(spec, flags)}`", ""
            yield from _stream_process([sys.executable, "-m", spec.module, *flags], forms.command_line(spec, flags))

        button.click(run_inline, inputs=widgets, outputs=[message, output])


def _run_folder(output_root: Path, spec: RecipeSpec, args) -> Path:
    """Where the run lives: its --output_dir (which must lie under the output root, so Runs finds it again after a
    restart), or a new folder there for a recipe without one."""
    folder = getattr(args, "output_dir", None)
    if not folder:
        if hasattr(args, "output_dir"):
            raise FormError("output_dir: give the folder the run writes to")
        return Path(fresh_output_dir(output_root, spec.key))
    folder = Path(folder).expanduser().resolve()
    root = output_root.expanduser().resolve()
    if not folder.is_relative_to(root):
        raise FormError(f"output_dir: {folder} is outside the output root {root} (the UI's --output_root), where the "
                        f"Runs tab looks for runs")
    return folder


def _stream_process(command: list[str], line: str):
    """Runs a short recipe (the planner) and yields its output as it grows."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    text = ""
    try:
        for chunk in proc.stdout:
            text += chunk
            yield f"`{line}`", text
        proc.wait()
    finally:
        if proc.poll() is None:  # the page went away mid-run
            proc.kill()
            proc.wait()
    yield f"`{line}` — exit code {proc.returncode}", text
