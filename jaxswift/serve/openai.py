"""OpenAI's HTTP API over an Orchestrator (FastAPI): /v1/models, /v1/completions, /v1/chat/completions (SSE streaming
with `data: [DONE]`), /health, /metrics, /tokenize, /detokenize.

Evaluators (lm-evaluation-harness's `local-completions`) score prompts through /v1/completions: token-id prompts
(`list[int]`, `list[list[int]]`), `echo` with `logprobs` returns the prompt's tokens first, each with its log-prob
given the tokens before it and its top alternatives (the first token's are null), and `max_tokens: 0` scores the
prompt alone. `echo` is refused with `stream: true`. vLLM's `return_tokens_as_token_ids: true` names log-prob
tokens and top_logprobs keys "token_id:N" instead of their text (distillation teachers map them back to ids).

Structured output: chat `response_format` `{"type": "json_object"}` / `{"type": "json_schema", "json_schema":
{"schema": ...}}`, and vLLM's `structured_outputs` (`json`, `json_object`, `regex`, `choice`) on both endpoints,
compiled by infer/grammar.py (outlines-core) and enforced per token inside the engine's step. Tool calling: `tools`,
`tool_choice` (`auto` parses the output's Hermes `<tool_call>` blocks into `tool_calls`, also as streamed deltas;
`none` leaves the text alone; `required` and a named function constrain the output to one call, so it always
parses), `role: "tool"` messages; rendering as serve/tools.py describes.

Images (a vision-language model): chat user messages take `{"type": "image_url", "image_url": {"url":
"data:image/png;base64,..."}}` parts. Each image is decoded, checked against `max_image_pixels` and preprocessed on
the way in (off the event loop), so a bad one is a 400 naming `messages[i].content[j]` before anything is queued;
the engine runs the tower once at the request's prefill (infer/engine_vlm.py). http(s) URLs are never fetched and
file paths never read: only data URLs. A text-only model answers an image part with a 400.

Every error, FastAPI's own validation errors included, answers with OpenAI's envelope
`{"error": {"message", "type", "param", "code"}}`; a client's mistake is a 4xx, never a 500. Bodies are validated
strictly (no type coercion, unknown fields refused) so that nothing a client sends is silently ignored. `user`
(OpenAI's end-user id) gives each end user of a client its own share of the per-client limits (`--rate_limit`,
`--max_concurrency`).

Embedding models (`jaxswift sft --task_type embedding` folders, Qwen3-Embedding-style folders with
sentence-transformers' modules.json) get their own app, `build_embedding_app`: /v1/embeddings (texts or token ids,
`encoding_format` float | base64, `dimensions` cut Matryoshka-style and renormalised), /v1/models and /health;
chat and completion requests to it are 400s naming the task, as /v1/embeddings is on a generative server.

    app = build_app(orchestrator, model_name="smollm2-135m-instruct", api_keys=["secret"])
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import json
import secrets
import time
import uuid
from typing import Any, Literal, Sequence

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxswift.errors import ConfigError
from jaxswift.infer.engine_api import RequestSampling
from jaxswift.infer.orchestrator import (AsyncSink, Chunk, EngineShutdown, GenerationRequest, Orchestrator,
                                         QueueFull, RequestRejected, RequestTimeout, RequestTooLarge,
                                         TokenLogprob)
from jaxswift.serve.limits import ClientLimits, TooManyRequests
from jaxswift.serve.metrics import ServerMetrics
from jaxswift.serve.tools import ToolStreamParser, parse_tool_calls, render_hermes, template_handles_tools

MAX_N = 16
MAX_PROMPTS = 64
MAX_LOGPROBS = 20  # OpenAI's bound on top_logprobs (the engine's MAX_TOP_LOGPROBS)
MAX_STOP_TOKEN_IDS = 16
DISCONNECT_POLL_S = 1.0
MAX_IMAGE_PIXELS = 32 * 1024 * 1024  # default bound on a decoded image (width x height): an 8K x 4K photo passes


# ---------------------------------------------------------------- errors

class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers


def error_body(status: int, message: str, type: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": status}}


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.type, e.param), status_code=e.status, headers=e.headers)


def _field_path(loc) -> str | None:
    """`body.prompt.list[int].0` -> `prompt.0`: the fields of a pydantic error location, without union type tags."""
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    return ".".join(parts) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "TextPart", "ImagePart", "StreamOptions",
              "ResponseFormat", "NamedToolChoice", "ToolCall", "Tool", "JsonSchemaFormat", "StructuredOutputs"}


def _validation_error(errors: list[dict]) -> APIError:
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"invalid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})")
    param = _field_path(first.get("loc", ()))
    same_field = [e for e in errors if _field_path(e.get("loc", ())) == param]
    if len(same_field) > 1:  # every branch of a union failed: say what was given instead of each branch's complaint
        message = f"{param}: invalid value {first.get('input')!r:.80} (wrong type or shape)"
    else:
        message = f"{param or 'request body'}: {first.get('msg', 'invalid value')}"
    return APIError(400, message, param=param)


def _install_error_handlers(app: FastAPI):
    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_, e: RequestValidationError):
        return _error_response(_validation_error(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(e.status_code, str(e.detail), kind, headers=getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def server_error(_, e: Exception):
        return _error_response(APIError(500, f"internal server error ({type(e).__name__})", "server_error"))


def _orchestrator_error(e: Exception) -> APIError:
    if isinstance(e, QueueFull):
        return APIError(429, str(e), "rate_limit_error", headers={"Retry-After": str(e.retry_after)})
    if isinstance(e, TooManyRequests):
        return APIError(429, str(e), "rate_limit_error", headers={"Retry-After": str(e.retry_after)})
    if isinstance(e, RequestTooLarge):
        return APIError(400, str(e), param="max_tokens")
    if isinstance(e, RequestRejected):
        return APIError(400, str(e))
    if isinstance(e, RequestTimeout):
        return APIError(504, str(e), "timeout_error")
    if isinstance(e, EngineShutdown):
        return APIError(503, str(e), "server_error")
    return APIError(500, str(e), "server_error")


# ---------------------------------------------------------------- request bodies

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str  # a data URL: data:image/<type>;base64,<data>


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class FunctionCall(_Strict):
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` request field (the constraints this server supports; give exactly one)."""
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class _SamplingBody(_Strict):
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    stop: str | list[str] | None = Field(None)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, min_length=1, max_length=256)  # the end user: limits count per (client, user)
    logit_bias: dict[str, float] | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's: log-prob tokens (and top_logprobs keys) as "token_id:123", so clients map them back to ids exactly
    # (distillation teachers); text keys are ambiguous where two ids decode to the same text
    return_tokens_as_token_ids: bool = False

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_N:
            raise APIError(400, f"stop: at most {MAX_N} stop strings, got {len(stops)}", param="stop")
        return tuple(s for s in stops if s)


class CompletionBody(_SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)  # 0 only with echo: the prompt's log-probs alone (evaluators)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class ChatBody(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None


class TokenizeBody(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    add_special_tokens: bool = False
    add_generation_prompt: bool = True


class DetokenizeBody(_Strict):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------- the server

@dataclasses.dataclass
class ServerConfig:
    model_name: str
    adapter_names: Sequence[str] = ()
    api_keys: Sequence[str] = ()
    rate_limit: str | None = None
    max_concurrency: int | None = None
    max_image_pixels: int = MAX_IMAGE_PIXELS


class OpenAIServer:
    """What the handlers share: the orchestrator, the tokenizer, model names, limits and metrics."""

    def __init__(self, orchestrator: Orchestrator, config: ServerConfig):
        self.orchestrator = orchestrator
        self.engine = orchestrator.engine
        self.tokenizer = orchestrator.tokenizer
        self.config = config
        self.limits = ClientLimits(config.rate_limit, config.max_concurrency)
        self.metrics = ServerMetrics(orchestrator)
        self.created = int(time.time())
        self.vocab_size = len(self.tokenizer)
        self.token_text = functools.lru_cache(maxsize=65536)(lambda token_id: self.tokenizer.decode([token_id]))

    # ---- models and prompts
    def adapter_for(self, name: str | None) -> int:
        if name is None or name == self.config.model_name:
            return 0
        if name in self.config.adapter_names:
            return self.engine.adapter_index(name)
        known = ", ".join([self.config.model_name, *self.config.adapter_names])
        raise APIError(404, f"model {name!r} does not exist (served: {known})", "not_found_error", "model")

    def model_cards(self) -> list[dict]:
        base = self.config.model_name
        card = lambda name, parent: {"id": name, "object": "model", "created": self.created,  # noqa: E731
                                     "owned_by": "jaxswift", "root": base, "parent": parent,
                                     "max_model_len": self.engine.max_model_len}
        return [card(base, None)] + [card(name, base) for name in self.config.adapter_names]

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    tools: list[Tool] | None = None) -> list[int]:
        """The conversation's prompt ids; tools, tool calls and tool results rendered by the template when it
        knows tools, else the Hermes way (serve/tools.py)."""
        for where, _ in _image_parts(messages):
            raise APIError(400, f"{where}: image parts are taken by /v1/chat/completions only", param=where)
        rendered = [_message_dict(m, i) for i, m in enumerate(messages)]
        tool_dicts = [t.model_dump(exclude_none=True) for t in tools] if tools else None
        extra = {}
        if template_handles_tools(self.tokenizer):
            extra = {"tools": tool_dicts} if tool_dicts else {}
        else:
            rendered = render_hermes(rendered, tool_dicts)
        try:
            text = self.tokenizer.apply_chat_template(rendered, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **extra)
        except Exception as e:  # the template rejected the conversation (e.g. roles out of order)
            raise APIError(400, f"messages: the chat template cannot render them ({e})", param="messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def completion_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [self.tokenizer.encode(prompt, add_special_tokens=False)]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            prompts = [self.tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else list(p)
                       for p in prompt]
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise APIError(400, f"prompt: expected 1 to {MAX_PROMPTS} prompts, got {len(prompts)}", param="prompt")
        for ids in prompts:
            self.check_token_ids(ids, "prompt")
        return prompts

    def check_token_ids(self, ids: list[int], param: str):
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                           param=param)

    def image_prompt(self, body: "ChatBody"):
        """(prompt ids, engine_vlm.RequestImages) of a chat whose user messages hold image parts: every image
        decoded (data URLs only), bounded and preprocessed, the chat encoded by the model's processor as `jaxswift
        infer --images` does. A 400 names the part at fault."""
        from jaxswift.errors import JaxswiftError
        from jaxswift.infer.engine_vlm import request_images

        first = _image_parts(body.messages)[0][0]
        processor = getattr(self.engine, "processor", None)
        if processor is None:
            raise APIError(400, f"model {self.config.model_name!r} does not take images ({first} is an image_url "
                                f"part); send text only", param=first)
        if body.tools:
            raise APIError(400, "tools cannot be combined with images on this server", param="tools")
        messages = []
        for i, m in enumerate(body.messages):
            if not any(isinstance(p, ImagePart) for p in m.content if isinstance(m.content, list)):
                messages.append(_message_dict(m, i))
                continue
            if m.role != "user":
                raise APIError(400, f"messages[{i}]: images go in user messages, not {m.role!r} ones",
                               param=f"messages.{i}.content")
            parts = [{"type": "text", "text": p.text} if isinstance(p, TextPart) else
                     {"type": "image", "image": decode_image_url(p.image_url.url, f"messages[{i}].content[{j}]",
                                                                 self.config.max_image_pixels)}
                     for j, p in enumerate(m.content)]
            messages.append({"role": m.role, "content": parts, **({"name": m.name} if m.name else {})})
        try:
            prompt = processor.encode_chat(messages, add_generation_prompt=body.add_generation_prompt)
        except JaxswiftError as e:  # the template or the processor refused the conversation
            raise APIError(400, f"messages: {e}", param="messages") from None
        return list(prompt.ids), request_images(processor, prompt)

    # ---- structured output
    async def constraint(self, body: _SamplingBody, tool_mode: str = "none", tool_name: str | None = None):
        """The grammar.Constraint the request asks for (response_format, structured_outputs, or tool_choice
        required / named), compiled off the event loop; None for free text. 400 naming the field when the
        constraint is invalid, unsupported or given twice."""
        asked = []
        fmt = getattr(body, "response_format", None)
        if fmt is not None and fmt.type != "text":
            if fmt.type == "json_schema" and fmt.json_schema is None:
                raise APIError(400, "response_format: type json_schema needs a json_schema object",
                               param="response_format.json_schema")
            if fmt.type == "json_object" and fmt.json_schema is not None:
                raise APIError(400, "response_format: json_schema is only for type json_schema",
                               param="response_format.json_schema")
            asked.append(("response_format.json_schema.schema", "json_schema", fmt.json_schema.schema_)
                         if fmt.type == "json_schema" else ("response_format", "json_object", None))
        so = body.structured_outputs
        if so is not None:
            given = [(f"structured_outputs.{name}", kind, value) for name, kind, value in (
                ("json", "json_schema", so.json_), ("json_object", "json_object", so.json_object or None),
                ("regex", "regex", so.regex), ("choice", "choice", so.choice)) if value is not None]
            if len(given) != 1:
                raise APIError(400, "structured_outputs: give exactly one of json, json_object, regex, choice",
                               param="structured_outputs")
            asked += given
        if tool_mode in ("required", "named"):
            asked.append(("tool_choice", "tool_call", tool_name))
        if not asked:
            return None
        if len(asked) > 1:
            raise APIError(400, f"{asked[0][0]} and {asked[1][0]} both constrain the output; give one",
                           param=asked[1][0])
        param, kind, value = asked[0]
        tools = [t.model_dump(exclude_none=True) for t in getattr(body, "tools", None) or []]
        return await asyncio.to_thread(self._compile, param, kind, value, tools)

    def _compile(self, param: str, kind: str, value, tools: list[dict]):
        from jaxswift.infer.grammar import ConstraintError

        try:
            grammar = self.engine.grammar
            if kind == "json_schema":
                if isinstance(value, str):
                    try:
                        value = json.loads(value)
                    except ValueError as e:
                        raise ConstraintError(f"not valid JSON ({e})") from None
                return grammar.json_schema(value)
            if kind == "json_object":
                return grammar.json_object()
            if kind == "regex":
                return grammar.regex(value)
            if kind == "choice":
                return grammar.choice(value)
            return grammar.tool_call(tools, value)
        except ConstraintError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None

    # ---- requests
    def check_fits(self, prompts: list[list[int]], max_tokens: int):
        limit = self.engine.max_model_len
        for ids in prompts:
            if len(ids) >= limit:
                raise APIError(400, f"the prompt has {len(ids)} tokens; the context holds {limit} tokens, "
                                    f"prompt and completion together", param="messages/prompt")
            try:
                self.orchestrator.check_fits(len(ids), max_tokens)
            except RequestTooLarge as e:
                raise _orchestrator_error(e) from None

    def sampling(self, body: _SamplingBody, max_tokens: int, logprobs: int | None, adapter: int, choice: int,
                 constraint=None):
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
        for t in body.stop_token_ids or ():
            self.check_token_ids([t], "stop_token_ids")
        seed = None if body.seed is None else (body.seed + choice) % 2 ** 63
        return RequestSampling(
            temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0), min_p=body.min_p,
            repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, seed=seed, max_tokens=max_tokens,
            stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos, logprobs=logprobs,
            adapter=adapter, constraint=constraint)

    def requests(self, body: _SamplingBody, prompts: list[list[int]], max_tokens: int, logprobs: int | None,
                 adapter: int, constraint=None) -> list[GenerationRequest]:
        stops = body.stop_strings()
        return [GenerationRequest(tuple(ids), self.sampling(body, max_tokens, logprobs, adapter, j, constraint), stops)
                for ids in prompts for j in range(body.n)]

    def submit(self, requests: list[GenerationRequest], sink, client: str):
        if len(requests) > self.orchestrator.max_queue:  # would never fit: the client's mistake, not a busy server
            raise APIError(400, f"n x prompts = {len(requests)} requests; this server queues at most "
                                f"{self.orchestrator.max_queue} at once", param="n")
        release = self.limits.admit(client)
        try:
            return self.orchestrator.submit(requests, sink), release
        except Exception:
            release()
            raise


def _message_dict(m: ChatMessage, i: int) -> dict:
    content = m.content
    if isinstance(content, list):
        content = "".join(part.text for part in content)
    out = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
    out.update({k: v for k, v in (("name", m.name), ("tool_call_id", m.tool_call_id)) if v is not None})
    if m.tool_calls:
        out["tool_calls"] = [_tool_call_dict(c, f"messages.{i}.tool_calls.{j}.function.arguments")
                             for j, c in enumerate(m.tool_calls)]
    return out


def _image_parts(messages: list[ChatMessage]) -> list[tuple[str, ImagePart]]:
    """(`messages[i].content[j]`, part) of every image part, in order."""
    return [(f"messages[{i}].content[{j}]", p) for i, m in enumerate(messages) if isinstance(m.content, list)
            for j, p in enumerate(m.content) if isinstance(p, ImagePart)]


def decode_image_url(url: str, where: str, max_pixels: int):
    """The PIL RGB image of a `data:image/<type>;base64,` URL; a 400 naming `where` for an http(s) URL or
    anything else that is not a data URL, invalid base64, bytes that are no image, or an image of more than
    max_pixels pixels (checked from the header, before the pixels are decoded)."""
    import PIL.Image

    from jaxswift.data.images import data_url_bytes, load_image
    from jaxswift.errors import DataError

    bad = lambda message: APIError(400, f"{where}: {message}", param=where)  # noqa: E731
    if url.startswith(("http://", "https://")):
        raise bad(f"image URLs are not fetched ({url[:60]!r}); send the image as a data URL "
                  "(data:image/png;base64,...)")
    if not url.startswith("data:"):  # a server never reads its own files
        raise bad(f"expected a data URL (data:image/<type>;base64,<data>), got {url[:40]!r}")
    try:
        data = data_url_bytes(url, where)
    except DataError as e:
        raise APIError(400, str(e), param=where) from None
    try:
        width, height = PIL.Image.open(io.BytesIO(data)).size  # the header only
    except PIL.Image.DecompressionBombError as e:
        raise bad(f"the image is over this server's limit of {max_pixels} pixels ({e})") from None
    except Exception as e:  # PIL raises many types for bytes that are no image
        raise bad(f"not a readable image ({type(e).__name__}: {e})") from None
    if width * height > max_pixels:
        raise bad(f"the image is {width}x{height} = {width * height} pixels, over this server's limit of "
                  f"{max_pixels} pixels (--max_image_pixels)")
    try:
        return load_image(data, where=where)
    except DataError as e:
        raise APIError(400, str(e), param=where) from None


def _tool_call_dict(call: ToolCall, where: str) -> dict:
    """A tool call with its arguments parsed: what tool-aware templates (and the Hermes rendering) expect."""
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError as e:
        raise APIError(400, f"{where}: not valid JSON ({e})", param=where) from None
    if not isinstance(arguments, dict):
        raise APIError(400, f"{where}: expected a JSON object, got {call.function.arguments!r:.80}", param=where)
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


def check_tools(tools: list[Tool] | None, tool_choice) -> tuple[str, str | None]:
    """(mode: "none" | "auto" | "required" | "named", the named function) of a request; 400 naming the field for
    a tool_choice without tools, a name not among the tools, a duplicate name or a parameters schema that is not
    one."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    names = [t.function.name for t in tools or []]
    for i, t in enumerate(tools or []):
        if names.index(t.function.name) != i:
            raise APIError(400, f"tools.{i}.function.name: {t.function.name!r} is given twice",
                           param=f"tools.{i}.function.name")
        if t.function.parameters is not None:
            try:
                Draft202012Validator.check_schema(t.function.parameters)
            except SchemaError as e:
                where = f"tools.{i}.function.parameters"
                raise APIError(400, f"{where}: not a valid JSON schema ({e.message})", param=where) from None
    if tool_choice is None:
        return ("auto" if tools else "none"), None
    if not tools and tool_choice != "none":
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if isinstance(tool_choice, NamedToolChoice):
        if tool_choice.function.name not in names:
            raise APIError(400, f"tool_choice: no tool named {tool_choice.function.name!r} (tools: "
                                f"{', '.join(names)})", param="tool_choice")
        return "named", tool_choice.function.name
    return tool_choice, None


# ---------------------------------------------------------------- response shapes

def _token_name(server: OpenAIServer, token_ids: bool):
    """token id -> its name in log-prob answers: its text, or "token_id:N" (return_tokens_as_token_ids)."""
    return (lambda i: f"token_id:{i}") if token_ids else server.token_text


def _chat_logprobs(server: OpenAIServer, items: list[TokenLogprob], token_ids: bool = False) -> dict:
    name = _token_name(server, token_ids)

    def entry(token_id: int, logprob: float) -> dict:
        text = server.token_text(token_id)
        return {"token": name(token_id), "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, p) for i, p in lp.top]}
                        for lp in items]}


def _completion_logprobs(server: OpenAIServer, items: list[TokenLogprob], text_start: int = 0,
                         token_ids: bool = False) -> dict:
    """OpenAI's legacy completions log-probs; an item whose logprob is None (the first echoed prompt token, which
    nothing before it predicts) gets null log-prob and null alternatives, as vLLM answers. Offsets count text."""
    name = _token_name(server, token_ids)
    offsets, at = [], text_start
    for lp in items:
        offsets.append(at)
        at += len(server.token_text(lp.token_id))
    return {"tokens": [name(lp.token_id) for lp in items], "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [None if lp.logprob is None else {name(i): p for i, p in lp.top} for lp in items],
            "text_offset": offsets}


def _echoed_logprobs(prompt_ids: list[int], scored: list[TokenLogprob | None] | None) -> list[TokenLogprob]:
    """The prompt's tokens as log-prob items: the first unscored (None), the others as the engine scored them."""
    scored = scored or [None] * len(prompt_ids)
    return [TokenLogprob(t, None, []) if lp is None else lp for t, lp in zip(prompt_ids, scored)]


@dataclasses.dataclass
class _Shape:
    """The OpenAI object names and choice layout of one endpoint."""
    chat: bool
    id: str
    model: str
    created: int
    logprobs: bool
    # completions with echo: per prompt, (its text, its token ids); choice i echoes prompt i // n
    echo: list[tuple[str, list[int]]] | None = None
    n: int = 1
    tool_names: set[str] | None = None  # chat with tools: the output's <tool_call> blocks become tool_calls
    token_ids: bool = False  # return_tokens_as_token_ids

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def envelope(self, choices: list[dict], usage: dict | None, chunk: bool) -> dict:
        obj = self.object + (".chunk" if chunk and self.chat else "")
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def choice(self, server: OpenAIServer, index: int, text: str | None, logprobs: list[TokenLogprob],
               finish_reason: str | None, *, delta: bool, first: bool = False, text_start: int = 0,
               tool_calls: list[dict] | None = None) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": text} if (first or not delta) else {"content": text}
            if tool_calls:
                message["tool_calls"] = tool_calls
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
            out = {"index": index, ("delta" if delta else "message"): message}
            out["logprobs"] = _chat_logprobs(server, logprobs, self.token_ids) if self.logprobs else None
        else:
            out = {"index": index, "text": text,
                   "logprobs": (_completion_logprobs(server, logprobs, text_start, self.token_ids) if self.logprobs
                                else None)}
        out["finish_reason"] = finish_reason
        return out


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------- running a request

class _LeasedStream(StreamingResponse):
    """A streaming response that cancels its requests and frees the client's lease however it ends."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _run(server: OpenAIServer, request: Request, shape: _Shape, body: _SamplingBody,
               requests: list[GenerationRequest], prompt_tokens: int, client: str):
    sink = AsyncSink()
    if body.user is not None:  # an app serving many people: one of them cannot spend the others' limits
        client = f"{client}|user:{body.user}"
    try:
        ticket, release = server.submit(requests, sink, client)
    except (QueueFull, TooManyRequests, RequestTooLarge, EngineShutdown) as e:
        raise _orchestrator_error(e) from None

    def close():
        ticket.cancel()
        release()

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        stream = _stream(server, shape, sink, ticket, len(requests), prompt_tokens, include_usage)
        return _LeasedStream(stream, close)
    try:
        return await _collect(server, request, shape, sink, ticket, len(requests), prompt_tokens)
    finally:
        close()


async def _next_chunk(sink: AsyncSink, request: Request | None):
    """The next (index, chunk); raises APIError(499) when a waiting non-streaming client has gone."""
    while True:
        try:
            return await asyncio.wait_for(sink.queue.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if request is not None and await request.is_disconnected():
                raise APIError(499, "client closed the request") from None


async def _collect(server, request, shape: _Shape, sink, ticket, n: int, prompt_tokens: int) -> dict:
    merged = [Chunk() for _ in range(n)]
    left = n
    while left:
        index, chunk = await _next_chunk(sink, request)
        if chunk.error is not None:
            raise _orchestrator_error(chunk.error)
        m = merged[index]
        m.text += chunk.text
        m.logprobs += chunk.logprobs
        m.prompt_logprobs = m.prompt_logprobs or chunk.prompt_logprobs
        m.completion_tokens, m.finish_reason = chunk.completion_tokens, chunk.finish_reason
        left -= chunk.final
    completion_tokens = sum(m.completion_tokens for m in merged)
    server.metrics.observe_finished(ticket, prompt_tokens, completion_tokens)
    if shape.echo is not None:  # the prompt's text and scores first; choice i's prompt scored with choice i - i % n
        for i, m in enumerate(merged):
            text, ids = shape.echo[i // shape.n]
            m.text = text + m.text
            m.logprobs = _echoed_logprobs(ids, merged[i - i % shape.n].prompt_logprobs) + m.logprobs
    choices = []
    for i, m in enumerate(merged):
        text, calls = (m.text, None) if shape.tool_names is None else parse_tool_calls(m.text, shape.tool_names)
        choices.append(shape.choice(server, i, text, m.logprobs, m.finish_reason, delta=False, tool_calls=calls))
    return shape.envelope(choices, _usage(prompt_tokens, completion_tokens), chunk=False)


async def _stream(server, shape: _Shape, sink, ticket, n: int, prompt_tokens: int, include_usage: bool):
    started, text_len, tokens = [False] * n, [0] * n, [0] * n
    parsers = None if shape.tool_names is None else [ToolStreamParser(shape.tool_names) for _ in range(n)]
    calls_sent = [0] * n
    left = n
    while left:
        index, chunk = await _next_chunk(sink, None)
        if chunk.error is not None:
            e = _orchestrator_error(chunk.error)
            yield _sse(error_body(e.status, e.message, e.type))
            break
        tokens[index] = chunk.completion_tokens
        left -= chunk.final
        text, calls = chunk.text, None
        if parsers is not None:  # tool calls go out whole, each when its block closes
            text, calls = parsers[index].push(chunk.text)
            text += parsers[index].finish() if chunk.final else ""
            calls = [{"index": calls_sent[index] + k, **c} for k, c in enumerate(calls)] or None
            calls_sent[index] += len(calls or ())
        if not (text or calls or chunk.logprobs or chunk.final or not started[index]):
            continue
        finish = chunk.finish_reason
        if finish == "stop" and calls_sent[index] and parsers is not None:
            finish = "tool_calls"
        choice = shape.choice(server, index, text, chunk.logprobs, finish, delta=True,
                              first=not started[index], text_start=text_len[index], tool_calls=calls)
        started[index], text_len[index] = True, text_len[index] + len(text)
        yield _sse(shape.envelope([choice], None, chunk=True))
    else:
        server.metrics.observe_finished(ticket, prompt_tokens, sum(tokens))
        if include_usage:
            yield _sse(shape.envelope([], _usage(prompt_tokens, sum(tokens)), chunk=True))
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------- the app

def build_app(orchestrator: Orchestrator, *, model_name: str, adapter_names: Sequence[str] = (),
              api_keys: Sequence[str] = (), rate_limit: str | None = None,
              max_concurrency: int | None = None, max_image_pixels: int = MAX_IMAGE_PIXELS) -> FastAPI:
    if not isinstance(max_image_pixels, int) or max_image_pixels < 1:
        raise ConfigError(f"max_image_pixels must be a positive integer, got {max_image_pixels!r}")
    config = ServerConfig(model_name, tuple(adapter_names), tuple(api_keys), rate_limit, max_concurrency,
                          max_image_pixels)
    server = OpenAIServer(orchestrator, config)
    app = FastAPI(title="jaxswift", description="OpenAI-compatible API served by jaxswift")
    app.state.server = server
    _install_error_handlers(app)
    _install_metrics_middleware(app, server)
    client = _client_dependency(server)
    _add_generation_routes(app, server, client)
    _add_utility_routes(app, server, client)
    _refuse_embeddings(app, server, client)
    return app


def _refuse_embeddings(app: FastAPI, server: OpenAIServer, client):
    @app.post("/v1/embeddings")
    async def embeddings(_: Request, __: str = Depends(client)):
        raise APIError(400, f"model {server.config.model_name!r} is a generative model; /v1/embeddings needs an "
                            "embedding model (jaxswift deploy --task_type embedding, or a folder with "
                            "sentence-transformers' modules.json)")


def _client_dependency(server: OpenAIServer):
    """Checks `Authorization: Bearer KEY` when keys are set; the client identity (key or address) for limits."""

    async def client(request: Request) -> str:
        keys = server.config.api_keys
        if not keys:
            return f"addr:{request.client.host if request.client else 'unknown'}"
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and any(secrets.compare_digest(given.strip(), k) for k in keys):
            return f"key:{given.strip()}"
        raise APIError(401, "missing or invalid API key (send `Authorization: Bearer <key>`)", "authentication_error",
                       headers={"WWW-Authenticate": "Bearer"})

    return client


def _install_metrics_middleware(app: FastAPI, server: OpenAIServer):
    known = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics", "/tokenize",
             "/detokenize"}

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        path = request.url.path
        server.metrics.count_request(path if path in known else "other", response.status_code)
        return response


def _add_generation_routes(app: FastAPI, server: OpenAIServer, client):
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request, who: str = Depends(client)):
        adapter = server.adapter_for(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        tool_mode, tool_name = check_tools(body.tools, body.tool_choice)
        images = None
        if _image_parts(body.messages):  # decoded and preprocessed off the event loop
            prompt, images = await asyncio.to_thread(server.image_prompt, body)
        else:
            prompt = server.chat_prompt(body.messages, body.add_generation_prompt, body.tools)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(
            server.engine.max_model_len - len(prompt), 1)
        server.check_fits([prompt], max_tokens)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        shape = _Shape(True, f"chatcmpl-{uuid.uuid4().hex}", body.model or server.config.model_name,
                       int(time.time()), body.logprobs,
                       tool_names=None if tool_mode == "none" else {t.function.name for t in body.tools},
                       token_ids=body.return_tokens_as_token_ids)
        constraint = await server.constraint(body, tool_mode, tool_name)
        requests = server.requests(body, [prompt], max_tokens, logprobs, adapter, constraint)
        if images is not None:
            requests = [dataclasses.replace(r, images=images) for r in requests]
        return await _run(server, request, shape, body, requests, len(prompt), who)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request, who: str = Depends(client)):
        adapter = server.adapter_for(body.model)
        if body.echo and body.stream:
            raise APIError(400, "echo is not supported with stream: true on this server (send stream: false)",
                           param="echo")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 is allowed only with echo (scoring the prompt)", param="max_tokens")
        prompts = server.completion_prompts(body.prompt)
        server.check_fits(prompts, body.max_tokens)
        echo = None
        if body.echo:
            one = isinstance(body.prompt, str) or isinstance(body.prompt[0], int)
            texts = [p if isinstance(p, str) else server.tokenizer.decode(ids)
                     for p, ids in zip([body.prompt] if one else body.prompt, prompts)]
            echo = list(zip(texts, prompts))
        shape = _Shape(False, f"cmpl-{uuid.uuid4().hex}", body.model or server.config.model_name,
                       int(time.time()), body.logprobs is not None, echo, body.n,
                       token_ids=body.return_tokens_as_token_ids)
        constraint = await server.constraint(body)
        if constraint is not None and body.max_tokens == 0:
            raise APIError(400, "structured_outputs needs max_tokens >= 1", param="structured_outputs")
        requests = server.requests(body, prompts, body.max_tokens, body.logprobs, adapter, constraint)
        if body.echo and body.logprobs is not None:  # the first choice of each prompt scores it for all n
            requests = [dataclasses.replace(r, prompt_logprobs=body.logprobs) if i % body.n == 0 else r
                        for i, r in enumerate(requests)]
        return await _run(server, request, shape, body, requests, sum(map(len, prompts)), who)


def _add_utility_routes(app: FastAPI, server: OpenAIServer, client):
    @app.get("/v1/models")
    async def models(_: str = Depends(client)):
        return {"object": "list", "data": server.model_cards()}

    @app.get("/health")
    async def health():
        if not server.orchestrator.alive:
            raise APIError(503, "the engine thread is not running", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        data, content_type = server.metrics.render()
        return Response(data, media_type=content_type)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody, _: str = Depends(client)):
        server.adapter_for(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            ids = server.chat_prompt(body.messages, body.add_generation_prompt, body.tools)
        else:
            ids = server.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": server.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeBody, _: str = Depends(client)):
        server.adapter_for(body.model)
        server.check_token_ids(body.tokens, "tokens")
        return {"prompt": server.tokenizer.decode(body.tokens)}


# ---------------------------------------------------------------- embeddings

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's bound on one request's inputs


class EmbeddingBody(_Strict):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, min_length=1, max_length=256)


class EmbeddingServer:
    """What the embedding handlers share: the Embedder (infer/embedding.py), the model name, limits, auth."""

    def __init__(self, embedder, config: ServerConfig):
        import threading

        self.embedder, self.config = embedder, config
        self.tokenizer = embedder.tokenizer
        self.limits = ClientLimits(config.rate_limit, config.max_concurrency)
        self.created = int(time.time())
        self.lock = threading.Lock()  # one forward at a time: requests queue here instead of racing for memory

    def check_model(self, name: str | None):
        if name is not None and name != self.config.model_name:
            raise APIError(404, f"model {name!r} does not exist (served: {self.config.model_name})",
                           "not_found_error", "model")

    def inputs(self, given) -> list[list[int]]:
        """Each input's ids (texts encoded as training encodes them); a 400 names the input at fault."""
        embedder = self.embedder
        if isinstance(given, str) or (given and all(isinstance(t, int) for t in given)):
            given = [given]
        if not 1 <= len(given) <= MAX_EMBEDDING_INPUTS:
            raise APIError(400, f"input: expected 1 to {MAX_EMBEDDING_INPUTS} inputs, got {len(given)}",
                           param="input")
        out = []
        for i, item in enumerate(given):
            where = f"input[{i}]" if len(given) > 1 else "input"
            if isinstance(item, str):
                if not item.strip():
                    raise APIError(400, f"{where}: empty text (nothing to embed)", param="input")
                ids = embedder.encode(item)
            else:
                ids = list(item)
                if not ids:
                    raise APIError(400, f"{where}: empty token list (nothing to embed)", param="input")
                bad = [t for t in ids if not 0 <= t < embedder.vocab_size]
                if bad:
                    raise APIError(400, f"{where}: token id {bad[0]} is outside the vocabulary [0, "
                                        f"{embedder.vocab_size})", param="input")
            if len(ids) > embedder.max_length:
                raise APIError(400, f"{where}: {len(ids)} tokens, over this server's limit of {embedder.max_length} "
                                    "(--max_model_len)", param="input")
            out.append(ids)
        return out

    def run(self, ids: list[list[int]]):
        with self.lock:
            return self.embedder.embed(ids)


def shorten(vectors, dimensions: int | None, normalized: bool, full: int):
    """Matryoshka: the first `dimensions` components, L2-normalised again when the model normalises its vectors."""
    import numpy as np

    if dimensions is None:
        return vectors
    if dimensions > full:
        raise APIError(400, f"dimensions: {dimensions} is more than the model's {full}", param="dimensions")
    cut = vectors[:, :dimensions]
    if normalized:
        cut = cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)
    return cut


def _embedding_item(index: int, vector, encoding_format: str) -> dict:
    import base64

    import numpy as np

    value = (base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii") if encoding_format == "base64"
             else [float(x) for x in vector])
    return {"object": "embedding", "index": index, "embedding": value}


def build_embedding_app(embedder, *, model_name: str, api_keys: Sequence[str] = (), rate_limit: str | None = None,
                        max_concurrency: int | None = None) -> FastAPI:
    """OpenAI's /v1/embeddings (and /v1/models, /health) over an embedding model; chat and completion
    requests get a 400 that says the model embeds."""
    server = EmbeddingServer(embedder, ServerConfig(model_name, (), tuple(api_keys), rate_limit, max_concurrency))
    app = FastAPI(title="jaxswift", description="OpenAI-compatible embeddings served by jaxswift")
    app.state.server = server
    _install_error_handlers(app)
    client = _client_dependency(server)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingBody, who: str = Depends(client)):
        server.check_model(body.model)
        ids = server.inputs(body.input)
        try:
            release = server.limits.admit(who if body.user is None else f"{who}|user:{body.user}")
        except TooManyRequests as e:
            raise _orchestrator_error(e) from None
        try:
            vectors = await asyncio.to_thread(server.run, ids)
        finally:
            release()
        vectors = shorten(vectors, body.dimensions, embedder.spec.normalize, embedder.dimensions)
        tokens = sum(map(len, ids))
        return {"object": "list", "model": body.model or model_name,
                "data": [_embedding_item(i, v, body.encoding_format) for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def refuse(endpoint: str):
        async def handler(_: Request, __: str = Depends(client)):
            raise APIError(400, f"model {model_name!r} is an embedding model (--task_type embedding): it serves "
                                f"/v1/embeddings, not {endpoint}")
        return handler

    for endpoint in ("/v1/chat/completions", "/v1/completions"):
        app.post(endpoint)(refuse(endpoint))

    @app.get("/v1/models")
    async def models(_: str = Depends(client)):
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "jaxswift", "root": model_name, "parent": None,
                                            "max_model_len": embedder.max_length, "task": "embedding",
                                            "dimensions": embedder.dimensions}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


# ---------------------------------------------------------------- sequence classifiers and rerankers
# A folder with a score head (XxxForSequenceClassification) is served without the generation engine:
# POST /v1/classify (vLLM's), /v1/rerank (vLLM / Jina / Cohere) and /v1/score (vLLM's) run the classifier in the
# request's thread (infer/classify.SequenceScorer); generation routes answer 400 naming the task.

MAX_INPUTS = 256


class ClassifyBody(_Strict):
    model: str | None = None
    input: str | list[str]
    user: str | None = None


class RerankBody(_Strict):
    model: str | None = None
    query: str
    documents: list[str]
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = True


class ScoreBody(_Strict):
    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]


class ClassifierServer:
    """What the classifier routes share: the scorer, the model name and the API keys."""

    def __init__(self, scorer, config: ServerConfig):
        self.scorer, self.config = scorer, config
        self.created = int(time.time())

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(404, f"model {name!r} does not exist (served: {self.config.model_name})",
                           "not_found_error", "model")

    def check_count(self, n: int, param: str) -> None:
        if n == 0:
            raise APIError(400, f"{param}: give at least one text", param=param)
        if n > MAX_INPUTS:
            raise APIError(400, f"{param}: at most {MAX_INPUTS} texts per request, got {n}", param=param)

    async def logits(self, sequences, param: str):
        try:
            return await asyncio.to_thread(self.scorer.logits, sequences)
        except ConfigError as e:  # too long
            raise APIError(400, f"{param}: {e}", param=param) from None

    @property
    def task(self) -> str:
        head = self.scorer.head
        return "reranker" if head.num_labels == 1 else f"sequence classifier ({head.num_labels} labels)"


def build_classifier_app(scorer, *, model_name: str, api_keys: Sequence[str] = ()) -> FastAPI:
    """The HTTP API of a sequence classifier (`scorer`: infer/classify.SequenceScorer)."""
    server = ClassifierServer(scorer, ServerConfig(model_name, (), tuple(api_keys)))
    app = FastAPI(title="jaxswift", description="sequence classification and reranking served by jaxswift")
    app.state.server = server
    _install_error_handlers(app)
    client = _client_dependency(server)
    _add_classify_routes(app, server, client)
    _add_rerank_routes(app, server, client)

    @app.get("/v1/models")
    async def models(_: str = Depends(client)):
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "jaxswift", "root": model_name, "parent": None,
                                            "max_model_len": scorer.max_length}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    async def no_generation(_: str = Depends(client)):
        raise APIError(400, f"{model_name} is a {server.task}: it does not generate text; use /v1/classify"
                       + (", /v1/rerank or /v1/score" if scorer.head.num_labels == 1 else ""))

    for route in ("/v1/chat/completions", "/v1/completions"):
        app.add_api_route(route, no_generation, methods=["POST"])
    return app


def _add_classify_routes(app: FastAPI, server: ClassifierServer, client):
    @app.post("/v1/classify")
    async def classify(body: ClassifyBody, _: str = Depends(client)):
        server.check_model(body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        server.check_count(len(texts), "input")
        scorer = server.scorer
        sequences = [scorer.encode_text(t) for t in texts]
        probs = scorer.probabilities(await server.logits(sequences, "input"))
        data = []
        for i, p in enumerate(probs):
            label = None if scorer.head.is_regression else scorer.head.labels[int(np.argmax(p))]
            data.append({"index": i, "label": label, "probs": [float(x) for x in p],
                         "num_classes": scorer.head.num_labels})
        tokens = sum(len(s) for s in sequences)
        return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": body.model or server.config.model_name, "data": data, "usage": _usage(tokens, 0)}


def _add_rerank_routes(app: FastAPI, server: ClassifierServer, client):
    def check_reranker():
        if server.scorer.head.num_labels != 1:
            raise APIError(400, f"{server.config.model_name} is a {server.task}; reranking needs a one-label head "
                           "(a model trained with --task_type reranker)")

    @app.post("/v1/rerank")
    async def rerank(body: RerankBody, _: str = Depends(client)):
        server.check_model(body.model)
        check_reranker()
        server.check_count(len(body.documents), "documents")
        scorer = server.scorer
        sequences = [scorer.encode_pair(body.query, d) for d in body.documents]
        logits = (await server.logits(sequences, "documents"))[:, 0].astype(np.float64)
        scores = 1.0 / (1.0 + np.exp(-logits))
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:body.top_n or len(scores)]
        results = [{"index": i, "relevance_score": float(scores[i]),
                    **({"document": {"text": body.documents[i]}} if body.return_documents else {})} for i in order]
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": body.model or server.config.model_name,
                "results": results, "usage": {"total_tokens": sum(len(s) for s in sequences)}}

    @app.post("/v1/score")
    async def score(body: ScoreBody, _: str = Depends(client)):
        server.check_model(body.model)
        check_reranker()
        first = [body.text_1] if isinstance(body.text_1, str) else body.text_1
        second = [body.text_2] if isinstance(body.text_2, str) else body.text_2
        if len(first) != 1 and len(first) != len(second):
            raise APIError(400, f"text_1 has {len(first)} texts and text_2 {len(second)}: give one text_1, or as "
                           "many as text_2", param="text_1")
        server.check_count(len(second), "text_2")
        pairs = list(zip(first * len(second) if len(first) == 1 else first, second))
        sequences = [server.scorer.encode_pair(q, d) for q, d in pairs]
        logits = (await server.logits(sequences, "text_2"))[:, 0].astype(np.float64)
        data = [{"index": i, "object": "score", "score": float(1.0 / (1.0 + np.exp(-x)))} for i, x in enumerate(logits)]
        return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": body.model or server.config.model_name, "data": data,
                "usage": _usage(sum(len(s) for s in sequences), 0)}
