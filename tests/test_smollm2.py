"""The real embedded model: SmolLM2-135M-Instruct from its GGUF, against transformers loading the same file."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxswift

CHAT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name a primary colour."},
    {"role": "assistant", "content": "Blue is a primary colour."},
    {"role": "user", "content": "And another one?"},
    {"role": "assistant", "content": "Red is another."},
    {"role": "user", "content": "Write two sentences about the sea."},
]


@pytest.fixture
def ours(smollm2):
    return smollm2


@pytest.fixture
def reference(smollm2_hf):
    return smollm2_hf


def prompt_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def test_three_turn_chat_logits(ours, reference):
    model, tokenizer = reference
    ids = prompt_ids(tokenizer, CHAT)
    assert ids == prompt_ids(ours.tokenizer, CHAT)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits.numpy()
    got = np.asarray(jaxswift.forward(ours.params, jnp.asarray([ids]), ours.config))
    relative = np.abs(got - ref).max() / np.abs(ref).max()
    assert relative < 1e-3, relative


def test_64_greedy_tokens_identical(ours, reference):
    model, tokenizer = reference
    ids = prompt_ids(tokenizer, CHAT)
    with torch.no_grad():
        # An explicit mask: SmolLM2's pad id is <|im_end|>, which generate would otherwise mask out of the prompt.
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=64, min_new_tokens=64, do_sample=False, eos_token_id=None,
                             pad_token_id=tokenizer.pad_token_id)
    expected = out[0, len(ids):].tolist()
    got = jaxswift.generate_ids(ours, [ids], max_new_tokens=64, ignore_eos=True)[0]
    assert got == expected


def test_batched_generation_equals_one_at_a_time(ours):
    """Left padding to a shared bucket must not change any row's greedy output."""
    questions = ["What is 2+2?", "Name a fruit.", "Say hello in French, then explain the word at length."]
    prompts = [prompt_ids(ours.tokenizer, [{"role": "user", "content": q}]) for q in questions]
    batched = jaxswift.generate_ids(ours, prompts, max_new_tokens=24)
    alone = [jaxswift.generate_ids(ours, [p], max_new_tokens=24)[0] for p in prompts]
    assert batched == alone
    assert all(len(r) > 0 for r in batched)


def test_chat_answers(ours):
    reply = jaxswift.chat(ours, [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)
    assert "Paris" in reply


def test_infer_cli_prints_the_reply():
    result = subprocess.run([sys.executable, "-m", "jaxswift.recipes.infer", "--model", "smollm2-135m-instruct",
                             "--prompt", "What is the capital of France?", "--max_new_tokens", "16"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_cli_rejects_unknown_flag_and_model():
    result = subprocess.run([sys.executable, "-m", "jaxswift.cli", "infer", "--modle", "x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--modle" in result.stderr
    result = subprocess.run([sys.executable, "-m", "jaxswift.cli", "infer", "--model", "no-such-model",
                             "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no-such-model" in result.stderr and "Traceback" not in result.stderr
