"""Tool calling, Hermes-style: how tools and tool traffic are rendered into the prompt, and how a completion's
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks become OpenAI `tool_calls`, whole or streamed.

Rendering. A chat template that knows tools (Qwen2.5 / Qwen3 and other Hermes-style templates: it reads a `tools`
variable) gets them as `apply_chat_template(..., tools=...)`, with each assistant tool call's `arguments` as an
object (what those templates `tojson`). A template that does not (SmolLM2's plain ChatML) gets the Hermes convention
spelled out in the messages themselves, which is this server's documented convention:

- the tools go into the system message (appended to the client's own system message, or as the only one): the
  `# Tools` section below, the function signatures one JSON object a line inside `<tools></tools>`, and the
  instruction to answer calls as `<tool_call>` JSON;
- an assistant message's tool calls become its content: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n
  </tool_call>` blocks after any text;
- consecutive `role: tool` messages become one user message of `<tool_response>\\n...\\n</tool_response>` blocks
  (Qwen2.5's layout).

Parsing. Every complete block whose JSON is an object with a served tool's `name` and an object `arguments` becomes a
call; anything else stays text (a model's malformed attempt is shown, not dropped). The stream parser holds back text
that may be the start of `<tool_call>` and emits each call when its block closes.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


def template_handles_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a `tools` variable itself."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = " ".join(template.values())
    return bool(template) and re.search(r"\btools\b", template) is not None


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


def _call(payload: str, names: set[str]) -> dict | None:
    """The OpenAI tool call of one block's JSON, or None when it is not a call of a served tool."""
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[dict]]:
    """(content: the text outside parsed blocks, stripped, None when empty; the calls in order)."""
    calls, content, at = [], [], 0
    for match in _BLOCK.finditer(text):
        call = _call(match.group(1), names)
        if call is None:
            continue
        content.append(text[at:match.start()])
        calls.append(call)
        at = match.end()
    content.append(text[at:])
    rest = "".join(content).strip()
    return (rest or None), calls


class ToolStreamParser:
    """Incremental parse_tool_calls: push text deltas, get (content delta, calls completed by this delta)."""

    def __init__(self, names: set[str]):
        self.names = names
        self.pending = ""  # text not released yet: a possible start of OPEN, or an open block
        self.calls = 0

    def push(self, text: str) -> tuple[str, list[dict]]:
        self.pending += text
        released, calls = "", []
        while True:
            start = self.pending.find(OPEN)
            if start < 0:
                hold = max((k for k in range(1, len(OPEN)) if self.pending.endswith(OPEN[:k])), default=0)
                cut = len(self.pending) - hold
                released, self.pending = released + self.pending[:cut], self.pending[cut:]
                break
            end = self.pending.find(CLOSE, start)
            if end < 0:  # a block is open: release the text before it and wait for its end
                released, self.pending = released + self.pending[:start], self.pending[start:]
                break
            call = _call(self.pending[start + len(OPEN):end], self.names)
            block_end = end + len(CLOSE)
            if call is None:
                released += self.pending[:block_end]
            else:
                released += self.pending[:start]
                calls.append(call)
            self.pending = self.pending[block_end:]
        self.calls += len(calls)
        if self.calls and released.strip() == "":  # whitespace between calls is not content
            released = ""
        return released, calls

    def finish(self) -> str:
        """What is left (an unclosed block, a held-back prefix) as text."""
        out, self.pending = self.pending, ""
        return out
