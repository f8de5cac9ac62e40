"""Assembles the pages: `build_ui` (every tab: the recipe forms of registry.py that this installation has, Chat,
Runs) and `build_chat_app` (the inference-only page of `jaxswift app`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline machines: no phoning home

import gradio as gr  # noqa: E402

from jaxswift.webui import chat, recipe_tab, runs_tab  # noqa: E402
from jaxswift.webui.labels import labels  # noqa: E402
from jaxswift.webui.registry import available_recipes  # noqa: E402


@dataclasses.dataclass
class UIContext:
    output_root: Path
    lang: str = "en"
    base_url: str | None = None
    api_key: str | None = None
    chat_model: str = "smollm2-135m-instruct"
    max_concurrency: int | None = None
    rate_limit: str | None = None
    max_num_seqs: int = 4
    max_model_len: int = 2048
    on_load: list = dataclasses.field(default_factory=list)  # (fn, inputs, outputs) run when a page opens

    @property
    def labels(self) -> dict[str, str]:
        return labels(self.lang)


def theme():
    """Local fonts only: the default theme would fetch Google fonts, which an offline page waits for."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def _wire_loads(demo: gr.Blocks, ctx: UIContext):
    for fn, inputs, outputs in ctx.on_load:
        demo.load(fn, inputs=inputs, outputs=outputs, show_progress="hidden")


def build_ui(ctx: UIContext, state: chat.ChatState | None = None) -> gr.Blocks:
    L = ctx.labels
    state = state or chat.ChatState(ctx)
    with gr.Blocks(title="jaxswift web-ui", analytics_enabled=False) as demo:
        gr.Markdown(f"## {L['title']}")
        tabs = []
        with gr.Tabs(elem_id="tabs"):
            for spec in available_recipes():
                with gr.Tab(L.get(f"tab_{spec.key}", spec.key), id=spec.key, elem_id=f"tab-{spec.key}") as t:
                    recipe_tab.build(spec, ctx)
                tabs.append(t)
            with gr.Tab(L["tab_chat"], id="chat", elem_id="tab-chat") as t:
                chat.build(ctx, state)
            tabs.append(t)
            with gr.Tab(L["tab_runs"], id="runs", elem_id="tab-runs") as runs:
                timer = runs_tab.build(ctx)
        # the Runs tab polls the disk only while it is shown
        runs.select(lambda: gr.Timer(active=True), outputs=timer, show_progress="hidden")
        for t in tabs:
            t.select(lambda: gr.Timer(active=False), outputs=timer, show_progress="hidden")
        _wire_loads(demo, ctx)
    return demo


def build_chat_app(ctx: UIContext, state: chat.ChatState) -> gr.Blocks:
    L = ctx.labels
    with gr.Blocks(title=f"jaxswift app: {state.backend.name}", analytics_enabled=False) as demo:
        gr.Markdown(f"## {L['chat_title']} {state.backend.name}")
        chat.build(ctx, state, fixed=True)
        _wire_loads(demo, ctx)
    return demo


def serve(demo: gr.Blocks, host: str, port: int, *, max_threads: int = 40):
    """Blocks until the server stops (Ctrl-C)."""
    demo.queue(default_concurrency_limit=None)
    demo.launch(server_name=host, server_port=port, theme=theme(), show_error=True, max_threads=max_threads,
                footer_links=[], quiet=False)
