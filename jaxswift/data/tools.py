"""Tool traffic in chats, rendered Hermes-style for chat templates that do not know tools: one implementation shared
by training (data/templates.py) and the server (serve/tools.py, which adds the parsing of calls).

A chat template that knows tools (Qwen2.5 / Qwen3 and other Hermes-style templates: it reads a `tools` variable)
gets them as `apply_chat_template(..., tools=...)`, with each assistant tool call's `arguments` as an object (what
those templates `tojson`). A template that does not (SmolLM2's plain ChatML) gets the Hermes convention spelled out
in the messages themselves:

- the tools go into the system message (appended to the conversation's own system message, or as the only one): the
  `# Tools` section below, the function signatures one JSON object a line inside `<tools></tools>`, and the
  instruction to answer calls as `<tool_call>` JSON;
- an assistant message's tool calls become its content: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n
  </tool_call>` blocks after any text;
- consecutive `role: tool` messages become one user message of `<tool_response>\\n...\\n</tool_response>` blocks
  (Qwen2.5's layout).
"""

from __future__ import annotations

import json
import re
from typing import Any

from jaxswift.errors import DataError

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def template_handles_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a `tools` variable itself."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = " ".join(template.values())
    return bool(template) and re.search(r"\btools\b", template) is not None


def has_tool_traffic(messages, tools) -> bool:
    """Whether a chat carries tools, assistant tool calls or tool results."""
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def tools_system_text(tools: list[dict]) -> str:
    """The Hermes-style tools section of the system message (for templates without tool support)."""
    signatures = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{signatures}\n"
            "</tools>\n\nFor each function call, return a json object with function name and arguments within "
            f"{OPEN}{CLOSE} XML tags:\n{OPEN}\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
            f"{CLOSE}")


def call_block(name: str, arguments: Any) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def render_hermes(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Plain role/content messages carrying tools, tool calls and tool results the Hermes way (see the module
    docstring); `messages` have parsed `arguments` in their tool calls."""
    out: list[dict] = []
    if tools:
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"] + "\n\n" + tools_system_text(tools), messages[1:]
        else:
            system = tools_system_text(tools)
        out.append({"role": "system", "content": system})
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [call_block(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            text = "\n".join(([m["content"]] if m.get("content") else []) + blocks)
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_tool_responses"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_responses": True})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return [{k: v for k, v in m.items() if not k.startswith("_")} for m in out]


def normalize_tool_calls(messages: list[dict], fields: list[str] | None = None) -> list[dict]:
    """The chat with every assistant tool call in OpenAI's shape and its `arguments` parsed into an object (what
    tool-aware templates `tojson`, and what the Hermes rendering writes); a `tool` message must answer a call: it
    follows an assistant message with tool calls, or another tool message. Errors name `messages[k]...`, or
    `fields[k]` when given (where each message came from in the user's row)."""
    out: list[dict] = []
    for k, m in enumerate(messages):
        field = fields[k] if fields else f"messages[{k}]"
        if m.get("role") == "tool":
            prev = out[-1] if out else {}
            if not (prev.get("role") == "tool" or (prev.get("role") == "assistant" and prev.get("tool_calls"))):
                raise DataError(f"{field}: a 'tool' message (a tool's result) must follow an assistant "
                                "message with tool_calls, or another tool message; it answers no call here")
        if m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise DataError(f"{field}.tool_calls: expected a list of calls, got {type(calls).__name__}")
            m = {**m, "tool_calls": [_tool_call(c, f"{field}.tool_calls[{j}]") for j, c in enumerate(calls)]}
        out.append(m)
    return out


def _tool_call(call: Any, field: str) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise DataError(f"{field}: expected {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                        f"\"arguments\": ...}}}}, got {call!r:.80}")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise DataError(f"{field}.function.arguments: invalid JSON ({e.msg} at column {e.colno}): "
                            f"{arguments!r:.80}") from None
    if not isinstance(arguments, dict):
        raise DataError(f"{field}.function.arguments: expected a JSON object, got {arguments!r:.80}")
    return {**call, "type": "function", "function": {**function, "arguments": arguments}}


__all__ = ["normalize_tool_calls", "OPEN", "CLOSE", "template_handles_tools", "has_tool_traffic", "tools_system_text", "call_block",
           "render_hermes"]
