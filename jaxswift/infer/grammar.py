"""Structured output: constraints compiled to per-token masks with outlines-core.

A `Constraint` is a regular language over the tokenizer's vocabulary (outlines-core's `Index`: for every automaton
state, the tokens that keep the text inside the language). JSON schemas become regexes with outlines-core's
`build_regex_from_schema`; `json_object` uses `JSON_OBJECT` below; `choice` is an alternation of literals; `regex`
is the client's. Each request that carries one gets its own `GuideState` (the automaton state), which the engine
advances on the host with every emitted token and which writes the slot's row of the bitmask [S, ceil(V / 32)]
that the jitted sampling step applies (sampling.apply_token_mask). eos is allowed exactly when the text so far is a
whole sentence of the language, so a request ends when its output is complete.

Why outlines-core and not xgrammar: both install from PyPI on CPU / Python 3.11, but xgrammar 0.2 requires torch,
imports it at `import xgrammar` (25 s here) and jaxswift imports no torch; outlines-core is a Rust extension with no
Python dependencies (measured: a 5-property schema compiles in 0.6 s over SmolLM2's 49k vocabulary). Its cost is
the generic JSON object: outlines-core's regex for `{"type": "object"}` (any nesting) takes a minute to index, so
`json_object` here is an object of primitives, arrays and objects nested at most two levels deep (documented).

max_tokens cuts a constrained output like any other (finish_reason "length"; the text is then an unfinished
sentence of the language), as vLLM does: give strings a `maxLength` (or an enum / pattern) and a sufficient
max_tokens. Compiled indexes are cached by regex.
"""

from __future__ import annotations

import collections
import json
import threading

import numpy as np

from jaxswift.errors import ConfigError


class ConstraintError(ConfigError):
    """The constraint cannot be compiled (an invalid or unsupported schema / regex); the message says why."""


_WS = r"[ ]?"  # whitespace between JSON tokens: at most one space (the generic pattern makes indexes explode)
_STRING = r'"([^"\\\x00-\x1f]|\\["\\/bfnrt])*"'
_NUMBER = r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?"
_PRIMITIVE = rf"({_STRING}|{_NUMBER}|true|false|null)"
_FLAT_ARRAY = rf"\[{_WS}({_PRIMITIVE}({_WS},{_WS}{_PRIMITIVE})*)?{_WS}\]"
_INNER_VALUE = rf"({_PRIMITIVE}|{_FLAT_ARRAY})"
_INNER_OBJECT = rf"\{{{_WS}({_STRING}{_WS}:{_WS}{_INNER_VALUE}({_WS},{_WS}{_STRING}{_WS}:{_WS}{_INNER_VALUE})*)?{_WS}\}}"
_VALUE = rf"({_PRIMITIVE}|{_FLAT_ARRAY}|{_INNER_OBJECT})"
JSON_OBJECT = rf"\{{{_WS}({_STRING}{_WS}:{_WS}{_VALUE}({_WS},{_WS}{_STRING}{_WS}:{_WS}{_VALUE})*)?{_WS}\}}"


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> printable character table (GPT-2's)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def token_bytes(tokenizer) -> dict[bytes, list[int]]:
    """Each ordinary token's bytes -> its ids (special tokens left out: constrained text never contains them).
    Byte-level BPE tokens map through GPT-2's table; SentencePiece pieces turn `▁` into a space and `<0xNN>` into
    the byte."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    byte_level = "ByteLevel" in type(decoder).__name__ or "ByteLevel" in repr(decoder)
    table = _byte_decoder()
    special = set(getattr(tokenizer, "all_special_ids", ()))
    out: dict[bytes, list[int]] = collections.defaultdict(list)
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            continue
        if byte_level:
            if any(c not in table for c in piece):
                continue
            data = bytes(table[c] for c in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            data = bytes([int(piece[3:5], 16)])
        else:
            data = piece.replace("\u2581", " ").encode("utf-8")
        if data:
            out[data].append(token_id)
    return dict(out)


class Constraint:
    """A compiled regular language over the vocabulary; `guide()` starts a request's walk through it."""

    def __init__(self, index, description: str):
        self.index, self.description = index, description

    def guide(self, compiler: "GrammarCompiler") -> "GuideState":
        import outlines_core

        return GuideState(outlines_core.Guide(self.index), compiler)

    def __repr__(self):
        return f"Constraint({self.description})"


class GuideState:
    """One request's automaton state: writes its allowed-token bitmask row, advances with each emitted token."""

    def __init__(self, guide, compiler: "GrammarCompiler"):
        self.guide, self.compiler = guide, compiler

    def write_mask(self, row_W: np.ndarray):
        """row_W: uint32 [ceil(V / 32)] (C-contiguous), overwritten with this state's allowed tokens."""
        row_W[:] = 0
        self.guide.write_mask_into(row_W.ctypes.data, row_W.size, 4)
        eos = self.compiler.eos_ids
        if (row_W[eos[0] // 32] >> np.uint32(eos[0] % 32)) & 1:  # every eos id ends the request, not only the first
            for e in eos[1:]:
                row_W[e // 32] |= np.uint32(1 << (e % 32))

    def advance(self, token_id: int):
        if token_id in self.compiler.eos_ids or self.guide.is_finished():
            return
        self.guide.advance(int(token_id))


class GrammarCompiler:
    """Compiles constraints for one tokenizer (its vocabulary built once); thread-safe, cached by regex."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: tuple[int, ...], cache_size: int = 64):
        import outlines_core

        if not eos_ids:
            raise ConfigError("structured output needs the model's eos token id")
        self.vocab_size, self.eos_ids = vocab_size, tuple(int(e) for e in eos_ids)
        self.words = -(-vocab_size // 32)
        self._vocabulary = outlines_core.Vocabulary(self.eos_ids[0], token_bytes(tokenizer))
        self._cache: collections.OrderedDict[str, Constraint] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def regex(self, pattern: str, description: str | None = None) -> Constraint:
        import outlines_core

        with self._lock:
            if pattern in self._cache:
                self._cache.move_to_end(pattern)
                return self._cache[pattern]
        try:
            index = outlines_core.Index(pattern, self._vocabulary)
        except Exception as e:  # outlines-core raises ValueError / its own errors for bad or empty languages
            raise ConstraintError(f"cannot compile the regular expression ({e})") from None
        constraint = Constraint(index, description or f"regex {pattern[:60]!r}")
        with self._lock:
            self._cache[pattern] = constraint
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return constraint

    def json_schema(self, schema) -> Constraint:
        return self.regex(schema_regex(schema), "json_schema")

    def json_object(self) -> Constraint:
        return self.regex(JSON_OBJECT, "json_object")

    def choice(self, options: list[str]) -> Constraint:
        if not options or not all(isinstance(o, str) and o for o in options):
            raise ConstraintError("choice must be a non-empty list of non-empty strings")
        return self.regex("(" + "|".join(_escape(o) for o in options) + ")", "choice")

    def tool_call(self, tools: list[dict], name: str | None) -> Constraint:
        """One Hermes `<tool_call>` block calling `name` (or any of the tools), its arguments matching the tool's
        parameters schema."""
        alternatives = []
        for tool in tools:
            function = tool["function"]
            if name is not None and function["name"] != name:
                continue
            parameters = function.get("parameters") or {"type": "object", "properties": {}}
            arguments = schema_regex(parameters)
            alternatives.append(rf'\{{"name":{_WS}"{_escape(function["name"])}",{_WS}"arguments":{_WS}{arguments}\}}')
        block = r"<tool_call>\n(" + "|".join(alternatives) + r")\n</tool_call>"
        return self.regex(block, f"tool call ({name or 'any tool'})")


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def schema_regex(schema) -> str:
    """outlines-core's regex of a JSON schema; ConstraintError naming the problem when it is not a valid schema or
    outlines-core does not support it."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError
    from outlines_core.json_schema import build_regex_from_schema

    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise ConstraintError(f"not a valid JSON schema: {e.message}") from None
    try:
        return build_regex_from_schema(json.dumps(schema), whitespace_pattern=_WS)
    except Exception as e:
        raise ConstraintError(f"unsupported JSON schema ({e})") from None
