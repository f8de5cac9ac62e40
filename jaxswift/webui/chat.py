"""The Chat tab and the `jaxswift app` page: a local model (+ LoRA adapter) served in this process by the paged
engine, or a running OpenAI-compatible server (`--base_url`), streamed token by token into the page.

Requests are bounded as the server bounds them: `--max_concurrency` requests in flight and `--rate_limit` per client
(its address), through serve/limits.py; at most `--max_num_seqs` generations run at once, the rest wait in line."""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterator

import gradio as gr

from jaxswift.errors import ConfigError, JaxswiftError
from jaxswift.serve.limits import TooManyRequests


# The page is updated at most this often while an answer streams: every update re-renders the chat in the browser,
# and on a busy CPU a page full of recipe forms falls seconds behind a token-per-update stream (it then shows the
# answer in a few jumps instead of growing smoothly).
PAGE_UPDATE_S = 0.25


class LocalBackend:
    """A model loaded in the UI process, fed through an Orchestrator (so concurrent chats share decode steps)."""

    def __init__(self, model: str, adapters: str | None = None, *, max_num_seqs: int = 4, max_model_len: int = 2048):
        import jaxswift
        from jaxswift.infer.engine import JaxEngine
        from jaxswift.infer.orchestrator import Orchestrator

        self.name = model + (f" + {adapters}" if adapters else "")
        self.model = jaxswift.load_model(model)
        if self.model.tokenizer is None:
            raise ConfigError(f"model {model}: no tokenizer found; chat needs one")
        engine = JaxEngine(self.model, max_concurrent_decodes=max_num_seqs, max_model_len=max_model_len,
                           adapters={"adapter": adapters} if adapters else None)
        self.adapter = 1 if adapters else 0
        self.orchestrator = Orchestrator(engine, request_timeout=600.0)
        # compile prefill and decode now, so the first chat streams at once instead of waiting for XLA
        for _ in self.stream([{"role": "user", "content": "Hi"}], temperature=0.0, top_p=1.0, top_k=0,
                             max_tokens=2, seed=None):
            pass

    def stream(self, messages: list[dict], *, temperature: float, top_p: float, top_k: int, max_tokens: int,
               seed: int | None) -> Iterator[str]:
        from jaxswift.api import chat_prompt_ids
        from jaxswift.infer.engine_api import RequestSampling
        from jaxswift.infer.orchestrator import GenerationRequest

        sampling = RequestSampling(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                                   seed=seed, adapter=self.adapter)
        chunks: queue.Queue = queue.Queue()
        ticket = self.orchestrator.submit([GenerationRequest(tuple(chat_prompt_ids(self.model, messages)), sampling)],
                                          lambda _i, chunk: chunks.put(chunk))
        try:
            while True:
                chunk = chunks.get()
                if chunk.error is not None:
                    raise chunk.error
                if chunk.text:
                    yield chunk.text
                if chunk.final:
                    return
        finally:
            ticket.cancel()  # the page went away: free the slot

    def close(self):
        self.orchestrator.shutdown()


class OpenAIBackend:
    """A running server (`jaxswift deploy` or any OpenAI-compatible one) through the official client."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None):
        import openai

        url = base_url.rstrip("/")
        self.client = openai.OpenAI(base_url=url if url.endswith("/v1") else url + "/v1", api_key=api_key or "none",
                                    max_retries=0)
        try:
            self.model_id = model or self.client.models.list().data[0].id
        except openai.OpenAIError as e:
            raise ConfigError(f"--base_url {base_url}: {e}") from None
        self.name = f"{self.model_id} @ {base_url}"

    def stream(self, messages, *, temperature, top_p, top_k, max_tokens, seed) -> Iterator[str]:
        extra = {"top_k": top_k} if top_k else None
        events = self.client.chat.completions.create(model=self.model_id, messages=messages, stream=True,
                                                     temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                                     seed=seed, extra_body=extra)
        for event in events:
            if event.choices and event.choices[0].delta.content:
                yield event.choices[0].delta.content

    def close(self):
        self.client.close()


class ChatState:
    """The one backend of this UI process (shared by every page), swapped by Load, and the per-client limits."""

    def __init__(self, ctx):
        from jaxswift.serve.limits import ClientLimits

        self.ctx = ctx
        self.backend = None
        self.lock = threading.Lock()
        self.limits = ClientLimits(rate_limit=ctx.rate_limit, max_concurrency=ctx.max_concurrency)

    def load(self, model: str, adapters: str | None):
        with self.lock:
            old, self.backend = self.backend, None
            if old is not None:
                old.close()
            if self.ctx.base_url:
                self.backend = OpenAIBackend(self.ctx.base_url, self.ctx.api_key, model or None)
            else:
                self.backend = LocalBackend(model, adapters or None, max_num_seqs=self.ctx.max_num_seqs,
                                            max_model_len=self.ctx.max_model_len)
            return self.backend


def _client(request: gr.Request | None) -> str:
    return getattr(getattr(request, "client", None), "host", None) or "local"


def build(ctx, state: ChatState, *, fixed: bool = False) -> None:
    """The chat controls; fixed=True (the app page) shows the preloaded backend without Load controls."""
    L = ctx.labels
    with gr.Row(visible=not fixed):
        model = gr.Textbox(label=L["base_url"] + " model id" if ctx.base_url else L["model"], scale=3,
                           value="" if ctx.base_url else ctx.chat_model, elem_id="chat-model")
        adapters = gr.Textbox(label=L["adapters"], scale=3, elem_id="chat-adapters", visible=not ctx.base_url)
        load = gr.Button(L["load"], scale=1, elem_id="chat-load")
    loaded = gr.Markdown(f"{L['chat_title']} **{state.backend.name}**" if state.backend else L["no_model"],
                         elem_id="chat-status")
    with gr.Row():
        with gr.Column(scale=3):
            bot = gr.Chatbot(elem_id="chat-bot", height=360, label=L["tab_chat"])
            with gr.Row():
                message = gr.Textbox(label=L["message"], scale=5, elem_id="chat-message", lines=1, max_lines=4)
                send = gr.Button(L["send"], variant="primary", scale=1, elem_id="chat-send")
                clear = gr.Button(L["clear"], scale=1, elem_id="chat-clear")
        with gr.Column(scale=1):
            system = gr.Textbox(label=L["system"], lines=3, elem_id="chat-system")
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label=L["temperature"], elem_id="chat-temperature")
            top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label=L["top_p"], elem_id="chat-top_p")
            top_k = gr.Slider(0, 200, value=0, step=1, label=L["top_k"], elem_id="chat-top_k")
            max_tokens = gr.Slider(1, 1024, value=128, step=1, label=L["max_tokens"], elem_id="chat-max_tokens")
            seed = gr.Number(value=-1, precision=0, label=L["seed"], elem_id="chat-seed")

    def do_load(name: str, adapter: str):
        started = time.perf_counter()
        try:
            backend = state.load(name.strip(), adapter.strip())
        except (JaxswiftError, OSError) as e:
            return f"**{L['no_model']}** — {e}"
        return f"{L['chat_title']} **{backend.name}** ({L['loaded']}, {time.perf_counter() - started:.1f} s)"

    load.click(do_load, inputs=[model, adapters], outputs=loaded)

    def respond(text, history, system_prompt, temp, p, k, tokens, seed_value, request: gr.Request):
        history = list(history or [])
        backend = state.backend
        if not text.strip():
            yield history, text
            return
        if backend is None:
            raise gr.Error(L["no_model"])
        try:
            release = state.limits.admit(_client(request))
        except TooManyRequests as e:
            raise gr.Error(f"{e}; retry in {e.retry_after} s") from None
        try:
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt.strip() else [])
            messages += [{"role": m["role"], "content": _text(m["content"])} for m in history]
            messages.append({"role": "user", "content": text})
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
            yield history, ""
            sampling = dict(temperature=float(temp), top_p=float(p), top_k=int(k), max_tokens=int(tokens),
                            seed=None if seed_value is None or seed_value < 0 else int(seed_value))
            shown = time.monotonic()
            for piece in backend.stream(messages, **sampling):
                history[-1]["content"] += piece
                if time.monotonic() - shown >= PAGE_UPDATE_S:
                    shown = time.monotonic()
                    yield history, ""
            yield history, ""
        except Exception as e:  # the engine's or the server's refusal, shown in the page rather than lost in a log
            raise gr.Error(f"{type(e).__name__}: {e}") from None
        finally:
            release()

    inputs = [message, bot, system, temperature, top_p, top_k, max_tokens, seed]
    for trigger in (send.click, message.submit):
        trigger(respond, inputs=inputs, outputs=[bot, message], concurrency_limit=ctx.max_num_seqs,
                concurrency_id="chat")
    clear.click(lambda: ([], ""), outputs=[bot, message])


def _text(content) -> str:
    """A Chatbot message's content as plain text (gradio may hand back a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    if isinstance(content, dict):
        return content.get("text", "")
    return str(content)
