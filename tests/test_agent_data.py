"""Agent (tool-call) training data: OpenAI and ms-swift rows, rendering through the family's tool template (native
Qwen2.5 or Hermes-style for SmolLM2's plain ChatML), ms-swift's `--loss_scale` variants as per-token weights, the
weighted loss, and bad rows."""

import copy
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import trl

import jaxswift
from jaxswift.data import cache as token_cache
from jaxswift.data.formats import build_sft_examples, row_to_messages, row_tools
from jaxswift.data.packing import assemble
from jaxswift.data.templates import EncodedChat, encode_chat, parse_loss_scale, reply_char_weights
from jaxswift.errors import ConfigError, DataError
from jaxswift.models.transformer import forward
from jaxswift.train.args import SftArguments
from jaxswift.train.rlhf_args import RlhfArguments
from jaxswift.train.sft import run_sft
from jaxswift.train.step import nll_sums

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CALL_PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_ROME = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'

# OpenAI style: arguments as a JSON string and as an object, two results, then the answer; a second round.
OPENAI_ROW = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "c2", "content": '{"temp": 25}'},
    {"role": "assistant", "content": "Paris 21, Rome 25."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."}]}

# The same conversation as ms-swift writes it (its "Agent support" doc): tools as a JSON string, one `tool_call`
# message per call holding its JSON, `tool_response` messages.
SWIFT_ROW = {"tools": json.dumps(TOOLS), "messages": [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "tool_call", "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
    {"role": "tool_call", "content": '{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}'},
    {"role": "tool_response", "content": '{"temp": 21}'},
    {"role": "tool_response", "content": {"temp": 25}},
    {"role": "assistant", "content": "Paris 21, Rome 25."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."}]}


@pytest.fixture(scope="module")
def qwen_tok(smol_tokenizer):
    """SmolLM2's ChatML tokenizer with Qwen2.5's chat template (as TRL ships it): a template that renders tools."""
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    return tok


def weight_runs(tok, enc: EncodedChat) -> list[tuple[float, str]]:
    """(weight, decoded text) of each run of equally weighted trained tokens."""
    w, out, t = enc.weights, [], 0
    while t < len(w):
        u = t + 1
        while u < len(w) and w[u] == w[t]:
            u += 1
        if w[t] != 0:
            out.append((float(w[t]), tok.decode(enc.input_ids[t:u].tolist(), skip_special_tokens=False)))
        t = u
    return out


def openai_messages():
    return row_to_messages(OPENAI_ROW, "row")


def test_native_template_renders_exactly_as_apply_chat_template(qwen_tok):
    messages = openai_messages()
    enc = encode_chat(qwen_tok, messages, tools=TOOLS)
    parsed = copy.deepcopy(OPENAI_ROW["messages"])
    parsed[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}  # tool templates `tojson` an object
    expected = qwen_tok.apply_chat_template(parsed, tools=TOOLS, tokenize=False)
    assert qwen_tok.decode(enc.input_ids.tolist(), skip_special_tokens=False) == expected
    assert enc.input_ids.tolist() == qwen_tok(expected, add_special_tokens=False)["input_ids"]
    assert CALL_PARIS + "\n" + CALL_ROME in expected and "<tool_response>\n{\"temp\": 25}\n</tool_response>" in expected


def test_template_without_tools_renders_hermes_style(smol_tokenizer):
    enc = encode_chat(smol_tokenizer, openai_messages(), tools=TOOLS)
    text = smol_tokenizer.decode(enc.input_ids.tolist(), skip_special_tokens=False)
    tools_line = json.dumps(TOOLS[0])
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou may call one or more functions")
    assert f"<tools>\n{tools_line}\n</tools>" in text
    assert (f"<|im_start|>assistant\n{CALL_PARIS}\n{CALL_ROME}<|im_end|>\n<|im_start|>user\n<tool_response>\n"
            '{"temp": 21}\n</tool_response>\n<tool_response>\n{"temp": 25}\n</tool_response><|im_end|>\n'
            "<|im_start|>assistant\nParis 21, Rome 25.<|im_end|>") in text


@pytest.mark.parametrize("tok_name", ["smol", "qwen"])
@pytest.mark.parametrize("loss_scale, expected", [
    ("default", [(1.0, f"{CALL_PARIS}\n{CALL_ROME}<|im_end|>"), (1.0, "Paris 21, Rome 25.<|im_end|>"),
                 (1.0, "You are welcome.<|im_end|>")]),
    ("last_round", [(1.0, "You are welcome.<|im_end|>")]),
    ("hermes", [(2.0, CALL_PARIS), (1.0, "\n"), (2.0, CALL_ROME), (1.0, "<|im_end|>"),
                (1.0, "Paris 21, Rome 25.<|im_end|>"), (1.0, "You are welcome.<|im_end|>")]),
    ("last_round+hermes", [(1.0, "You are welcome.<|im_end|>")]),
])
def test_trained_tokens_and_weights_per_loss_scale(smol_tokenizer, qwen_tok, tok_name, loss_scale, expected):
    tok = smol_tokenizer if tok_name == "smol" else qwen_tok
    enc = encode_chat(tok, openai_messages(), tools=TOOLS, loss_scale=loss_scale)
    assert weight_runs(tok, enc) == expected
    assert np.array_equal(enc.loss_mask, enc.weights > 0)
    assert (enc.loss_weights is None) == ("hermes" not in loss_scale or loss_scale.startswith("last_round"))


@pytest.mark.parametrize("tok_name", ["smol", "qwen"])
def test_all_trains_everything_but_the_tool_results(smol_tokenizer, qwen_tok, tok_name):
    tok = smol_tokenizer if tok_name == "smol" else qwen_tok
    enc = encode_chat(tok, openai_messages(), tools=TOOLS, loss_scale="all")
    untrained = [tok.decode(enc.input_ids[t:t + 1].tolist()) for t in np.flatnonzero(enc.weights == 0)]
    assert "".join(untrained) == '{"temp": 21}{"temp": 25}'
    assert set(enc.weights.tolist()) == {0.0, 1.0}


def test_think_and_react_scales_weigh_reply_text(smol_tokenizer):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\n\n</think>\n\nHello!"}]
    assert weight_runs(smol_tokenizer, encode_chat(smol_tokenizer, chat, loss_scale="ignore_empty_think")) == [
        (1.0, "Hello!<|im_end|>")]
    chat[1]["content"] = "<think>\nmaybe\n</think>\nHello!"
    assert weight_runs(smol_tokenizer, encode_chat(smol_tokenizer, chat, loss_scale="ignore_think_prefix")) == [
        (1.0, "maybe\n</think>\nHello!<|im_end|>")]
    chat[1]["content"] = ("Thought: look it up\nAction: get_weather\nAction Input: {\"city\": \"Paris\"}\n"
                          "Observation: 21 degrees\nFinal Answer: warm")
    runs = weight_runs(smol_tokenizer, encode_chat(smol_tokenizer, chat, loss_scale="react"))
    # ms-swift's react table: Action / Action Input and their text x2, the Observation key x2 and its text 0
    assert runs == [(1.0, "Thought: look it up\n"), (2.0, 'Action: get_weather\nAction Input: {"city": "Paris"}\n'
                                                          "Observation:"),
                    (1.0, "Final Answer: warm<|im_end|>")]


def test_chained_scales_multiply_per_part():
    reply = "<think>\n</think>\n" + CALL_PARIS
    w = reply_char_weights(reply, ("hermes", "ignore_empty_think"))
    cut = len("<think>\n</think>\n")
    assert set(w[:cut].tolist()) == {0.0} and set(w[cut:].tolist()) == {2.0}
    assert parse_loss_scale("last_round+hermes+ignore_empty_think").base == "last_round"


def test_swift_rows_encode_like_openai_rows(smol_tokenizer, qwen_tok, tmp_path):
    sharegpt = {"tools": [json.dumps(TOOLS[0]["function"])], "conversations": [
        {"from": "human", "value": "Weather in Paris and Rome?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Rome"}}'},
        {"from": "observation", "value": '{"temp": 21}'}, {"from": "observation", "value": '{"temp": 25}'},
        {"from": "gpt", "value": "Paris 21, Rome 25."}, {"from": "human", "value": "Thanks!"},
        {"from": "gpt", "value": "You are welcome."}]}
    path = tmp_path / "agent.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (OPENAI_ROW, SWIFT_ROW, sharegpt)))
    for tok in (smol_tokenizer, qwen_tok):
        examples, stats = build_sft_examples([str(path)], tok, max_length=1024, loss_scale="hermes")
        assert stats.examples == 3
        for other in examples[1:]:
            np.testing.assert_array_equal(other.input_ids, examples[0].input_ids)
            np.testing.assert_array_equal(other.weights, examples[0].weights)


def test_swift_text_before_calls_joins_the_call_turn():
    row = {"messages": [{"role": "user", "content": "Go"}, {"role": "assistant", "content": "Checking."},
                        {"role": "tool_call", "content": '{"name": "f", "arguments": {}}'},
                        {"role": "tool_response", "content": "ok"}, {"role": "assistant", "content": "Done."}]}
    messages = row_to_messages(row, "row")
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1]["content"] == "Checking." and messages[1]["tool_calls"][0]["function"]["name"] == "f"


def test_tools_column_forms():
    assert row_tools({"tools": json.dumps(TOOLS)}, "r") == TOOLS
    assert row_tools({"tools": [json.dumps(TOOLS[0])]}, "r") == TOOLS
    assert row_tools({"tools": [TOOLS[0]["function"]]}, "r") == TOOLS  # a bare function is wrapped
    with pytest.raises(DataError, match=r"r: tools\[0\]: expected"):
        row_tools({"tools": [{"description": "no name"}]}, "r")


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{city: Paris}"}}]}]},
     r"bad\.jsonl:2: messages\[1\]\.tool_calls\[0\]\.function\.arguments: invalid JSON"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "21"},
                   {"role": "assistant", "content": "y"}]},
     r"bad\.jsonl:2: messages\[1\]: a 'tool' message .* answers no call"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool_response", "content": "21"},
                   {"role": "assistant", "content": "y"}]},
     r"bad\.jsonl:2: messages\[1\]: a 'tool' message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool_call", "content": "get_weather(Paris)"},
                   {"role": "tool_response", "content": "21"}, {"role": "assistant", "content": "y"}]},
     r"bad\.jsonl:2: messages\[1\]\.content: a tool_call message holds one call as JSON"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}]}]},
     r"bad\.jsonl:2: messages\[1\]\.tool_calls\[0\]\.function\.arguments: expected a JSON object"),
])
def test_bad_agent_rows_name_row_and_field(smol_tokenizer, tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                    + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        build_sft_examples([str(path)], smol_tokenizer, max_length=256)


@pytest.mark.parametrize("loss_scale, message", [
    ("hermess", r"unknown 'hermess'; expected \[default\|last_round\|all\+\]NAME"),
    ("qwen", r"'qwen' is not supported: .*FUNCTION"),
    ("last_round+agentflan", r"'agentflan' is not supported"),
])
def test_unknown_or_refused_loss_scale(smol_tokenizer, loss_scale, message):
    with pytest.raises(ConfigError, match=message):
        SftArguments(loss_scale=loss_scale)
    with pytest.raises(ConfigError, match=message):
        encode_chat(smol_tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                    loss_scale=loss_scale)


def test_preference_training_refuses_weighted_scales():
    with pytest.raises(ConfigError, match="weighted loss scales are for SFT"):
        RlhfArguments(loss_scale="hermes")


def test_weighted_loss_is_weighted_nll_over_trained_token_count(tiny_chat_model, smol_tokenizer):
    """The step's loss with hermes weights: sum(w * nll) / (number of trained tokens), as ms-swift's loss_scale."""
    model = jaxswift.load_model(str(tiny_chat_model))
    enc = encode_chat(smol_tokenizer, openai_messages(), tools=TOOLS, loss_scale="hermes")
    batch = assemble([enc], [[0]], len(enc) + 3)
    nll, count = nll_sums(model.params, {k: jnp.asarray(v) for k, v in batch.items()}, model.config, 64)
    logits = np.asarray(forward(model.params, jnp.asarray(batch["tokens"]), model.config), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    w = batch["loss_weights"][0].astype(np.float64)
    token_nll = -logp[np.arange(len(w)), batch["targets"][0]]
    assert set(w.tolist()) == {0.0, 1.0, 2.0}
    assert float(count) == np.count_nonzero(w)
    np.testing.assert_allclose(float(nll), (w * token_nll).sum(), rtol=1e-5)


def test_token_cache_keeps_weights(smol_tokenizer, tmp_path, monkeypatch):
    """A plain row first (no weights), flushed before the weighted one: its mask becomes its weights on disk."""
    plain = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(plain) + "\n" + json.dumps(OPENAI_ROW) + "\n")
    monkeypatch.setattr(token_cache, "_FLUSH_TOKENS", 1)
    cache, stats = token_cache.cache_sft_dataset([str(path)], smol_tokenizer, tmp_path / "cache", max_length=1024,
                                                 loss_scale="hermes")
    direct, _ = build_sft_examples([str(path)], smol_tokenizer, max_length=1024, loss_scale="hermes")
    assert stats.loss_tokens == sum(int(e.loss_mask.sum()) for e in direct)
    for got, want in zip(cache, direct):
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        np.testing.assert_array_equal(got.weights, want.weights)


def test_sft_trains_on_agent_rows(tiny_chat_model, tmp_path):
    path = tmp_path / "agent.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (OPENAI_ROW, SWIFT_ROW) * 2))
    args = SftArguments(model=str(tiny_chat_model), dataset=[str(path)], output_dir=str(tmp_path / "out"),
                        loss_scale="hermes", max_steps=3, logging_steps=1, learning_rate=1e-3, max_length=384,
                        per_device_train_batch_size=1, demo_question="", disable_tqdm=True, save_steps=1000,
                        lr_scheduler_type="constant", lora_dropout=0.0)
    result = run_sft(args, progress=False)
    losses = list(result.losses.values())
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[-1] < losses[0]
