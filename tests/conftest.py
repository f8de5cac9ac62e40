"""Test setup: 8 virtual CPU devices (set before JAX is imported) and shared fixtures."""

import gc
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """After each test module: drop JAX's compiled programs. Each XLA:CPU executable keeps a few memory mappings
    for its code; a whole suite in one process compiles ~10,000 of them and would pass the kernel's limit of
    65,530 mappings per process (vm.max_map_count), where the next compilation segfaults."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's tokenizer (ChatML template), read once from the embedded GGUF."""
    from jaxswift.checkpoints.gguf import read_gguf
    from jaxswift.checkpoints.registry import resolve_model_path

    return read_gguf(resolve_model_path("smollm2-135m-instruct")).tokenizer()


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smol_tokenizer):
    """A tiny random llama (2 layers, hidden 64) with SmolLM2's tokenizer, saved as an HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("tiny_chat_model")
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", vocab_size=len(smol_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True, max_position_embeddings=1024,
        bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id)
    config.architectures = ["LlamaForCausalLM"]
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    smol_tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct as jaxswift loads it (float32), shared by the tests that need it."""
    import jaxswift

    return jaxswift.load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_hf():
    """(model, tokenizer): transformers loading the same GGUF, float32, eval mode — the parity reference."""
    import torch
    import transformers

    from jaxswift.checkpoints.registry import resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory):
    """(transformers model, folder): a tiny random Qwen2-VL (images of 28..56 px), shared by the DPO and GRPO
    image-row tests (tests/vlm_fixtures.make_qwen2_vl)."""
    from vlm_fixtures import make_qwen2_vl

    folder = tmp_path_factory.mktemp("tiny_qwen2_vl")
    hf_model, _ = make_qwen2_vl(folder, min_pixels=28 * 28, max_pixels=56 * 56)
    return hf_model, folder
