"""Structured output and tool calling through the OpenAI server (one in-process uvicorn server for the module, the
tiny random llama with SmolLM2's tokenizer).

A random model under a grammar still produces sentences of the grammar, so at temperature 1.0 every answer must
validate against its schema with `jsonschema` (the strings in these schemas are bounded: an unbounded string under
a random model rarely draws its closing quote, see infer/grammar.py on max_tokens).
"""

import concurrent.futures
import json
import re

import jsonschema
import pytest

import jaxswift
from jaxswift.infer.engine import JaxEngine
from jaxswift.infer.orchestrator import Orchestrator
from jaxswift.serve.openai import build_app
from jaxswift.serve.tools import ToolStreamParser, parse_tool_calls, render_hermes
from test_serve import Served, assert_envelope, post, running

MODEL = "tiny-structured"
KEY = "test-key"

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                            "maxItems": 3}}, "required": ["id", "tags"]}}, "required": ["user"]},
    {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number"}, "ok": {"type": "boolean"}},
                                "required": ["x", "ok"]}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"flag": {"type": "boolean"}, "nothing": {"type": "null"}},
     "required": ["flag", "nothing"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["code"]},
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 4}},
     "required": ["a"]},
    {"type": "object", "properties": {"level": {"enum": [1, 2, 3]}, "kind": {"const": "fixed"}},
     "required": ["level", "kind"]},
    {"type": "object", "properties": {"days": {"type": "array", "items": {"enum": ["mon", "tue", "wed"]},
                                               "minItems": 1, "maxItems": 4}}, "required": ["days"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "integer"}}, "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]}},
     "required": ["v"]},
]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo", "Lima"]},
                                                    "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def served(tiny_chat_model):
    model = jaxswift.load_model(str(tiny_chat_model))
    engine = JaxEngine(model, max_concurrent_decodes=8, max_model_len=512, page_size=16, prefill_buckets=(64, 256))
    orchestrator = Orchestrator(engine, max_queue=128)
    app = build_app(orchestrator, model_name=MODEL, api_keys=[KEY])
    with running(app) as url:
        yield Served(url, orchestrator, engine)
    orchestrator.shutdown()


def _schema_request(client, i: int, stream: bool):
    schema = SCHEMAS[i % len(SCHEMAS)]
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": f"Give me data #{i}"}], temperature=1.0,
                  max_tokens=200, seed=i, response_format={"type": "json_schema",
                                                           "json_schema": {"name": f"s{i}", "schema": schema}})
    if not stream:
        out = client.chat.completions.create(**kwargs)
        return schema, out.choices[0].message.content, out.choices[0].finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return schema, text, finish


@pytest.mark.parametrize("stream", [False, True])
def test_50_schema_constrained_requests_at_temperature_1_all_validate(served, stream):
    client = served.client(KEY, timeout=600)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: _schema_request(client, i, stream), range(50)))
    for schema, text, finish in results:
        assert finish == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)
    assert len({json.dumps(s) for s, _, _ in results}) >= 10
    assert served.idle()


def test_choice_regex_and_json_object(served):
    client = served.client(KEY)
    for seed in range(4):
        out = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=10, temperature=1.0, seed=seed,
                                        extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
        assert out.choices[0].text in ("yes", "no", "maybe")
        out = client.completions.create(model=MODEL, prompt="Code:", max_tokens=20, temperature=1.0, seed=seed,
                                        extra_body={"structured_outputs": {"regex": "[A-Z]{2}[0-9]{3}"}})
        assert re.fullmatch("[A-Z]{2}[0-9]{3}", out.choices[0].text), out.choices[0].text
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "json please"}],
                                         max_tokens=300, temperature=0, response_format={"type": "json_object"})
    text, finish = out.choices[0].message.content, out.choices[0].finish_reason
    assert text.startswith("{")
    if finish == "stop":  # a random model may fill a string until max_tokens (then the text is cut, as in vLLM)
        assert isinstance(json.loads(text), dict)
    else:
        assert finish == "length" and out.usage.completion_tokens == 300


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "root ::= 'a'"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "structured_outputs.choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "tools.0.function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{oops"}}]}]}, "messages.0.tool_calls.0.function.arguments"),
])
def test_bad_constraints_and_tools_are_400_naming_the_field(served, body, param):
    full = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
    status, _, answer = post(served.url + "/v1/chat/completions", full)
    assert status == 400, answer
    assert_envelope(answer, 400)
    assert answer["error"]["param"] == param, answer
    status, _, _ = post(served.url + "/v1/chat/completions", {"model": MODEL, "max_tokens": 2,
                                                               "messages": [{"role": "user", "content": "ok"}]})
    assert status == 200


# ---------------------------------------------------------------- tool calling

def test_parse_tool_calls_whole_and_streamed():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>\n<tool_call>\n'
            '{"name": "get_time", "arguments": {"city": "Lima"}}\n</tool_call>')
    names = {"get_weather", "get_time"}
    content, calls = parse_tool_calls(text, names)
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "C"}
    assert content.startswith("Let me check.") and '"unknown"' in content  # not a served tool: stays text
    for size in (1, 3, 7, 50):
        parser, streamed, streamed_calls = ToolStreamParser(names), "", []
        for at in range(0, len(text), size):
            delta, new = parser.push(text[at:at + size])
            assert "<tool_call>\n{\"name\": \"get" not in delta
            streamed, streamed_calls = streamed + delta, streamed_calls + new
        streamed += parser.finish()
        assert [c["function"] for c in streamed_calls] == [c["function"] for c in calls]
        # the same text; the stream drops whitespace-only pieces between calls, so compare it word by word
        assert streamed.split() == content.split()
    assert parse_tool_calls("no calls <tool_call> {broken", names) == ("no calls <tool_call> {broken", [])


def test_hermes_rendering_for_templates_without_tools(served):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}}]},
                {"role": "tool", "content": "18C", "tool_call_id": "c1"},
                {"role": "tool", "content": "sunny", "tool_call_id": "c2"}]
    rendered = render_hermes(messages, [WEATHER])
    assert rendered[0]["role"] == "system" and rendered[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps(WEATHER) in rendered[0]["content"]
    assert rendered[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": '
                                                           '{"city": "Paris", "unit": "C"}}\n</tool_call>'}
    assert rendered[3] == {"role": "user", "content": "<tool_response>\n18C\n</tool_response>\n"
                                                      "<tool_response>\nsunny\n</tool_response>"}
    status, _, out = post(served.url + "/tokenize", {"model": MODEL, "messages": messages[:2], "tools": [WEATHER]})
    assert status == 200
    text = served.engine.tokenizer.decode(out["tokens"])
    assert "<tools>" in text and '"get_weather"' in text


def _round_trip(client, stream: bool, tool_choice):
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    kwargs = dict(model=MODEL, tools=[WEATHER, TIME], temperature=1.0, seed=3, max_tokens=80)
    if not stream:
        first = client.chat.completions.create(messages=messages, tool_choice=tool_choice, **kwargs)
        message, finish = first.choices[0].message, first.choices[0].finish_reason
        calls = [{"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                                "arguments": c.function.arguments}}
                 for c in message.tool_calls]
    else:
        calls, finish = {}, None
        for chunk in client.chat.completions.create(messages=messages, tool_choice=tool_choice, stream=True,
                                                    **kwargs):
            for c in chunk.choices:
                finish = c.finish_reason or finish
                for d in c.delta.tool_calls or ():
                    entry = calls.setdefault(d.index, {"id": "", "type": "function",
                                                       "function": {"name": "", "arguments": ""}})
                    entry["id"] += d.id or ""
                    entry["function"]["name"] += d.function.name or ""
                    entry["function"]["arguments"] += d.function.arguments or ""
        calls = [calls[i] for i in sorted(calls)]
    assert finish == "tool_calls" and len(calls) == 1
    call = calls[0]
    arguments = json.loads(call["function"]["arguments"])
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}[call["function"]["name"]]
    jsonschema.validate(arguments, schema)
    messages += [{"role": "assistant", "content": None, "tool_calls": calls},
                 {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temperature": 18})}]
    final = client.chat.completions.create(messages=messages, tool_choice="none", **kwargs)
    assert final.choices[0].message.tool_calls is None and final.choices[0].finish_reason in ("stop", "length")
    return call


@pytest.mark.parametrize("stream", [False, True])
def test_openai_client_tool_round_trip(served, stream):
    client = served.client(KEY)
    call = _round_trip(client, stream, "required")
    assert call["function"]["name"] in ("get_weather", "get_time")
    named = _round_trip(client, stream, {"type": "function", "function": {"name": "get_time"}})
    assert named["function"]["name"] == "get_time"
    assert served.idle()


def test_tool_choice_required_always_parses(served):
    client = served.client(KEY, timeout=600)

    def ask(seed):
        out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Go {seed}"}],
                                             tools=[WEATHER, TIME], tool_choice="required", temperature=1.0,
                                             seed=seed, max_tokens=80)
        return out.choices[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(ask, range(16)))
    for choice in choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        json.loads(choice.message.tool_calls[0].function.arguments)
