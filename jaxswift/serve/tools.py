"""Tool calling, Hermes-style: how tools and tool traffic are rendered into the prompt, and how a completion's
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks become OpenAI `tool_calls`, whole or streamed.

Rendering (data/tools.py, shared with training): a template that knows tools renders them itself; others get
the Hermes convention spelled out in the messages (`render_hermes`).

Parsing. Every complete block whose JSON is an object with a served tool's `name` and an object `arguments` becomes a
call; anything else stays text (a model's malformed attempt is shown, not dropped). The stream parser holds back text
that may be the start of `<tool_call>` and emits each call when its block closes.
"""

from __future__ import annotations

import json
import re
import uuid

from jaxswift.data.tools import (CLOSE, OPEN, call_block, render_hermes, template_handles_tools,  # noqa: F401
                                 tools_system_text)

_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


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
