"""GGUF export: files jaxswift writes load in transformers (`gguf_file=`) and in jaxswift with the same logits,
hold the tensor types and metadata llama.cpp expects, carry the tokenizer and chat template, and merge adapters.

The references are transformers' own GGUF loader (which dequantizes with the `gguf` package and undoes llama.cpp's
q/k permutation itself), `gguf.GGUFReader`, and `gguf.quants` for what each block format must hold.
"""

import dataclasses
import json

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

import jaxswift
from jaxswift.checkpoints.gguf import gguf_tensor_name, read_gguf
from jaxswift.checkpoints.gguf_export import check_gguf_export, save_gguf
from jaxswift.checkpoints.hf import hf_tensors
from jaxswift.errors import ConfigError
from jaxswift.models.config import RopeConfig
from jaxswift.models.transformer import forward
from jaxswift.recipes.export import main as export_main
from peft_fixtures import randomize_lora_b

TOKENS = np.random.RandomState(3).randint(0, 300, (2, 11))  # inside every test vocabulary
CHAT = [{"role": "system", "content": "Be brief. 日本"}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."}, {"role": "user", "content": "  and\n\n3+3?"}]


def jax_logits(model) -> np.ndarray:
    return np.asarray(forward(model.params, jnp.asarray(TOKENS), model.config), dtype=np.float32)


def hf_gguf_logits(path) -> np.ndarray:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.as_tensor(TOKENS)).logits.float().numpy()


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


CORPUS = ["the quick brown fox jumps over the lazy dog", "What is 2+2? And 3+3?",
          "héllo wörld — naïve café 日本", "def f(x):\n    return {'k': x**2}\n", "I'm, you're, we'll, they'd 12345"] * 30
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def small_tokenizer(split: str | None):
    """A byte-level BPE (~300 tokens) trained here, with ChatML specials, a user-defined `<think>` and a chat
    template; `split` is the word regex ahead of ByteLevel (None: GPT-2's own). Small, so files parse fast."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from jaxswift.checkpoints.gguf_tokenizer import PRE_TOKENIZER_SPLITS

    tok = Tokenizer(models.BPE())
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[split]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                                chat_template=CHATML)
    fast.add_tokens(["<think>"])
    return fast


def save_tiny(folder, family: str, tokenizer, *, spare_rows=0, seed=0, **extra):
    """A tiny random HF model of `family` (2 layers, hidden 64) with `tokenizer`, saved to `folder`."""
    torch.manual_seed(seed)
    sizes = dict(vocab_size=len(tokenizer) + spare_rows, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=family == "llama",
                 max_position_embeddings=512, rope_theta=50000.0, bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id)
    config = transformers.AutoConfig.for_model(family, **{**sizes, **extra})
    config.architectures = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                             "mistral": "MistralForCausalLM"}[family]]
    hf = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random q/k/v biases (qwen2), so a missing or unpermuted bias shows
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.5)
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tiny_chat_model):
    """{name: HF folder}: llama (tied, GPT-2 split), qwen2 (untied, biases, Qwen2 split, 16 spare embedding rows),
    qwen3, mistral (written as GGUF 'llama', Llama 3 split), and conftest's tiny llama with SmolLM2's tokenizer."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {"llama": save_tiny(root / "llama", "llama", small_tokenizer(None)),
            "qwen2": save_tiny(root / "qwen2", "qwen2", small_tokenizer("qwen2"), spare_rows=16, seed=1),
            # q/k norms, and head_dim != hidden / heads; 128 because transformers' GGUF loader ignores qwen3's
            # attention.key_length and keeps Qwen3Config's default head_dim (128)
            "qwen3": save_tiny(root / "qwen3", "qwen3", small_tokenizer("qwen2"), seed=2, head_dim=128),
            "mistral": save_tiny(root / "mistral", "mistral", small_tokenizer("llama-bpe"), seed=3,
                                 sliding_window=None),
            "smol": tiny_chat_model}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_models):
    """{(model, type): (source model, GGUF path)}, each written by `jaxswift export --to_gguf true`."""
    out = tmp_path_factory.mktemp("gguf")
    files = {}
    for name, types in (("llama", ("f16", "q4_0")), ("qwen2", ("f16", "q8_0", "q4_0")), ("smol", ("q8_0",)),
                        ("qwen3", ("f16",)), ("mistral", ("q8_0",))):
        source = jaxswift.load_model(str(tiny_models[name]))
        for gguf_type in types:
            assert export_main(["--model", str(tiny_models[name]), "--to_gguf", "true", "--gguf_type", gguf_type,
                                "--output_dir", str(out / name)]) == 0
            files[name, gguf_type] = source, out / name / f"model-{gguf_type}.gguf"
    return files


CASES = [("llama", "f16"), ("llama", "q4_0"), ("qwen2", "f16"), ("qwen2", "q8_0"), ("qwen2", "q4_0"),
         ("qwen3", "f16"), ("mistral", "q8_0")]


@pytest.mark.parametrize("family,gguf_type", CASES)
def test_transformers_and_jaxswift_agree_on_the_file(exported, family, gguf_type):
    source, path = exported[family, gguf_type]
    back = jaxswift.load_model(str(path), load_tokenizer=False)
    ours, theirs = jax_logits(back), hf_gguf_logits(path)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)  # the same dequantized weights, the same logits
    error = rel_err(ours, jax_logits(source))
    if gguf_type == "f16":
        assert error < 1e-3
    else:  # the blocks are really quantized: the logits move, but stay those of the same model
        assert 1e-4 < error < 0.2, error


@pytest.mark.parametrize("family,gguf_type", CASES)
def test_file_holds_the_quantized_source_tensors(exported, family, gguf_type):
    """Every tensor read back equals quantize-then-dequantize of the source tensor with the type llama.cpp uses."""
    source, path = exported[family, gguf_type]
    original = hf_tensors(source.params, source.config, dtype=np.float32)
    expected_types = {name: tensor.tensor_type for name, tensor in
                      ((t.name, t) for t in gguf.GGUFReader(path).tensors)}
    seen = set()
    for name, array in read_gguf(path).tensors():
        qtype = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[gguf_type]
        gguf_name = gguf_tensor_name(name)
        if original[name].ndim == 1:
            qtype = Q.F32
        elif gguf_type == "q4_0" and (gguf_name == "output.weight" or (
                source.config.tie_word_embeddings and gguf_name == "token_embd.weight")):
            qtype = Q.Q8_0  # llama-quantize's Q6_K head; rows of 64 are no whole 256-block: Q8_0, as llama.cpp
        assert expected_types[gguf_name] == qtype, gguf_name
        reference = dequantize(quantize(original[name], qtype), qtype).reshape(original[name].shape)
        np.testing.assert_array_equal(array, reference, err_msg=name)
        seen.add(name)
    assert seen == set(original)


def test_gguf_reader_lists_metadata_and_types(exported):
    source, path = exported["qwen2", "q4_0"]
    tokenizer = source.tokenizer
    reader = gguf.GGUFReader(path)

    def meta(key):
        return reader.get_field(key).contents()

    assert meta("general.architecture") == "qwen2"
    assert meta("general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0
    cfg = source.config
    assert [meta(f"qwen2.{k}") for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                                         "attention.head_count", "attention.head_count_kv")] == [512, 64, 2, 128, 4, 2]
    assert meta("qwen2.rope.freq_base") == 50000.0 == cfg.rope.theta
    assert meta("qwen2.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps, rel=1e-6)
    assert (meta("tokenizer.ggml.model"), meta("tokenizer.ggml.pre")) == ("gpt2", "qwen2")
    tokens, types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    n = len(tokenizer)
    assert len(tokens) == len(types) == n + 16 == cfg.vocab_size
    assert tokens[:n] == tokenizer.convert_ids_to_tokens(list(range(n)))
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 16)] and set(types[n:]) == {gguf.TokenType.UNUSED}
    assert types[tokens.index("<|im_end|>")] == gguf.TokenType.CONTROL
    assert types[tokens.index("<think>")] == gguf.TokenType.USER_DEFINED
    assert types[tokens.index("the")] == gguf.TokenType.NORMAL
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert meta("tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert (meta("tokenizer.ggml.bos_token_id"), meta("tokenizer.ggml.eos_token_id"),
            meta("tokenizer.ggml.padding_token_id")) == (0, 2, 0)
    assert meta("tokenizer.ggml.add_bos_token") is False and meta("tokenizer.ggml.add_eos_token") is False
    assert meta("tokenizer.chat_template") == CHATML
    types_by_name = {t.name: t.tensor_type for t in reader.tensors}
    assert types_by_name["output.weight"] == Q.Q8_0 and types_by_name["token_embd.weight"] == Q.Q4_0
    assert types_by_name["blk.1.attn_q.weight"] == Q.Q4_0 and types_by_name["blk.1.attn_q.bias"] == Q.F32
    assert types_by_name["output_norm.weight"] == Q.F32
    assert meta("general.architecture") == "qwen2"
    llama = gguf.GGUFReader(exported["llama", "f16"][1])
    assert llama.get_field("tokenizer.ggml.pre").contents() == "gpt2"  # GPT-2's own split: no Split regex
    assert {t.name: t.tensor_type for t in llama.tensors}["token_embd.weight"] == Q.F16
    assert "output.weight" not in {t.name for t in llama.tensors}  # tied, as llama.cpp writes it
    mistral = gguf.GGUFReader(exported["mistral", "q8_0"][1])
    assert [mistral.get_field(k).contents() for k in ("general.architecture", "tokenizer.ggml.pre")] == \
        ["llama", "llama-bpe"]


@pytest.mark.parametrize("rope", [RopeConfig(theta=50000.0, type="linear", factor=2.0),
                                  RopeConfig(theta=50000.0, type="llama3", factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=64)])
def test_rope_scaling_round_trips(tmp_path, exported, rope):
    """Linear scaling goes into metadata, Llama 3's into llama.cpp's rope_freqs tensor; jaxswift reads both back.
    (transformers' GGUF loader reads neither for llama files, so it is no reference here.)"""
    source, _ = exported["llama", "f16"]
    scaled = dataclasses.replace(source, config=source.config.replace(rope=rope))
    path = save_gguf(scaled, tmp_path / "scaled.gguf", "f16")
    back = jaxswift.load_model(str(path), load_tokenizer=False)
    assert back.config.rope == rope
    assert rel_err(jax_logits(back), jax_logits(scaled)) < 1e-3
    assert rel_err(jax_logits(scaled), jax_logits(source)) > 1e-3  # the scaling matters at these positions
    names = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert ("rope_freqs.weight" in names) == (rope.type == "llama3")


@pytest.mark.parametrize("reader", ["jaxswift", "transformers"])
@pytest.mark.parametrize("model", ["smol", "llama", "qwen2", "mistral"])
def test_tokenizer_and_template_round_trip(exported, model, reader):
    """A chat rendered with the file's template and encoded by the file's tokenizer gives the original's ids."""
    source, path = exported[model, "f16" if model == "llama" else "q8_0"]
    if reader == "jaxswift":
        tokenizer = read_gguf(path).tokenizer()
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    original = source.tokenizer
    assert tokenizer.chat_template == original.chat_template

    def chat_ids(tok):
        return tok(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]

    assert chat_ids(tokenizer) == chat_ids(original)
    assert len(chat_ids(original)) > 20
    text = "héllo  wörld 12345\n\tcode <|im_start|>x <think> the lazy dog"
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]


def test_adapters_are_merged_first(tmp_path, tiny_models):
    from peft import LoraConfig, get_peft_model

    folder = tiny_models["llama"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora_b(peft_model, seed=2, std=0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        merged = peft_model.merge_and_unload().eval()(torch.as_tensor(TOKENS)).logits.numpy()
    assert export_main(["--adapters", str(tmp_path / "adapter"), "--model", str(folder),
                        "--to_gguf", "true", "--output_dir", str(tmp_path / "out")]) == 0
    path = tmp_path / "out" / "model-f16.gguf"  # f16 is the default type
    assert rel_err(hf_gguf_logits(path), merged) < 1e-3
    base = jaxswift.load_model(str(folder), load_tokenizer=False)
    assert rel_err(jax_logits(base), merged) > 1e-2  # the adapter matters


@pytest.mark.parametrize("argv,message", [
    (["--gguf_type", "q5_k_m"],
     r"--gguf_type 'q5_k_m' is not a GGUF type jaxswift writes \(supported: f16, q8_0, q4_0, q4_k_m\)"),
    (["--gguf_type", "q5_x"], r"--gguf_type 'q5_x' is not a GGUF type jaxswift writes \(supported: f16, q8_0, q4_0, q4_k_m\)"),
    (["--quant_method", "fp8"], r"--to_gguf and --quant_method fp8 exclude each other"),
])
def test_bad_flags_are_refused_before_loading(argv, message):
    with pytest.raises(ConfigError, match=message):
        export_main(["--model", "/nonexistent/model", "--to_gguf", "true", *argv])


def test_gguf_type_without_to_gguf_is_refused():
    with pytest.raises(ConfigError, match=r"--gguf_type q8_0 needs --to_gguf true"):
        export_main(["--model", "/nonexistent/model", "--gguf_type", "q8_0"])


def test_quantized_folder_is_refused(tmp_path, tiny_models):
    assert export_main(["--model", str(tiny_models["llama"]), "--quant_method", "int8",
                        "--output_dir", str(tmp_path / "int8")]) == 0
    with pytest.raises(ConfigError, match=r"--to_gguf: .*int8 holds quantized weights \(GPTQ/AWQ/FP8/int8\)"):
        export_main(["--model", str(tmp_path / "int8"), "--to_gguf", "true", "--output_dir", str(tmp_path / "g")])
    assert not (tmp_path / "g").exists()


def test_unsupported_families_and_models_are_refused(exported):
    source, _ = exported["llama", "f16"]
    cfg, tokenizer = source.config, source.tokenizer
    moe = cfg.replace(family="mixtral", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    with pytest.raises(ConfigError, match=r"family 'mixtral' has no GGUF export \(GGUF export of mixture-of-experts "
                                          r"models is not implemented\) \(supported: llama, mistral, qwen2, qwen3\)"):
        check_gguf_export(moe, "f16", tokenizer)
    windowed = cfg.replace(family="mistral", sliding_windows=(16, 16))
    with pytest.raises(ConfigError, match=r"mistral with sliding-window attention cannot be written as GGUF 'llama'"):
        check_gguf_export(windowed, "q8_0", tokenizer)
    yarn = cfg.replace(rope=RopeConfig(theta=1e4, type="yarn", factor=4.0, original_max_position_embeddings=64))
    with pytest.raises(ConfigError, match=r"RoPE scaling 'yarn' is not exported \(supported: default, linear, "
                                          r"llama3\)"):
        check_gguf_export(yarn, "f16", tokenizer)
    with pytest.raises(ConfigError, match=r"the model has no tokenizer"):
        check_gguf_export(cfg, "f16", None)


# ------------------------------------------------------------------------------------------------ q4_k_m


def k_quant_error(x, qtype):
    from jaxswift.checkpoints.gguf_export import quantize_tensor

    return dequantize(quantize_tensor(x, qtype), qtype).reshape(x.shape) - x


@pytest.mark.parametrize("qtype,nearest", [(Q.Q4_K, Q.Q4_0), (Q.Q6_K, Q.Q5_0)])
def test_k_quant_bytes_round_trip_through_gguf_dequantize(qtype, nearest):
    """Our Q4_K / Q6_K bytes, read by gguf's dequantizer: errors within a grid step, and below the plain 32-block
    format with fewer or as many bits (the point of the super-block search)."""
    x = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32) * np.linspace(0.1, 3, 512)
    err = k_quant_error(x, qtype)
    sub = x.reshape(-1, 8, 32) if qtype == Q.Q4_K else x.reshape(-1, 16, 16)
    if qtype == Q.Q4_K:  # codes 0..15 over [min(x, 0), max(x)] of each sub-block
        step = (sub.max(2) - np.minimum(sub.min(2), 0)) / 15
    else:  # codes -32..31 over [-max|x|, max|x|]
        step = 2 * np.abs(sub).max(2) / 63
    # within one step of the super-block's coarsest sub-block grid (the 6-/8-bit sub-block scales are relative to it)
    assert (np.abs(err.reshape(len(sub), -1)).max(1) <= step.max(1)).all()
    plain = dequantize(quantize(x, nearest), nearest).reshape(x.shape) - x
    assert np.sqrt(np.mean(err ** 2)) < np.sqrt(np.mean(plain ** 2))


@pytest.mark.parametrize("data", ["gauss", "wide", "sparse"])
def test_k_quants_equal_llama_cpp_bytes(data):
    """Byte for byte llama.cpp's quantize_row_q4_K_ref / quantize_row_q6_K_ref output on the same inputs (stored in
    tests/data/kquants_llama_cpp.npz by make_kquants_golden.py, from llama.cpp's own C compiled alone)."""
    from pathlib import Path

    from jaxswift.checkpoints.gguf_kquants import quantize_q4_k, quantize_q6_k

    golden = np.load(Path(__file__).parent / "data" / "kquants_llama_cpp.npz")
    x = golden[f"{data}_x"]
    np.testing.assert_array_equal(quantize_q4_k(x), golden[f"{data}_q4_k"])
    np.testing.assert_array_equal(quantize_q6_k(x), golden[f"{data}_q6_k"])


def test_k_quant_exactly_representable_blocks_are_exact():
    rng = np.random.default_rng(1)
    d, ls = 2.0 ** -6, rng.integers(1, 64, 8)
    ls[3] = 63
    codes = rng.integers(0, 16, (8, 32))
    codes[:, 0] = 15
    q4 = (d * ls[:, None] * codes).astype(np.float32).reshape(1, 256)  # d * scale_j * q, no min
    assert np.array_equal(q4 + k_quant_error(q4, Q.Q4_K), q4)
    scales = 2.0 ** -3 * rng.integers(1, 129, 16) / 128
    scales[5] = 2.0 ** -3
    codes = rng.integers(-32, 32, (16, 16))
    codes[:, 0] = -32
    q6 = (scales[:, None] * codes).astype(np.float32).reshape(1, 256)
    assert np.array_equal(q6 + k_quant_error(q6, Q.Q6_K), q6)
    zeros = np.zeros((2, 256), np.float32)
    assert not k_quant_error(zeros, Q.Q4_K).any() and not k_quant_error(zeros, Q.Q6_K).any()


def test_q4_k_m_types_follow_llama_quantize():
    from jaxswift.checkpoints.gguf_export import tensor_type

    def q4km(name, shape, tied=False, layers=32):
        return tensor_type(name, shape, "q4_k_m", tied, layers)

    # a 7B llama (32 layers): half the attn_v / ffn_down get Q6_K, llama.cpp's use_more_bits
    six = [i for i in range(32) if q4km(f"blk.{i}.attn_v.weight", (1024, 4096)) == Q.Q6_K]
    assert six == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert six == [i for i in range(32) if q4km(f"blk.{i}.ffn_down.weight", (4096, 11008 + 256)) == Q.Q6_K]
    assert q4km("blk.5.attn_q.weight", (4096, 4096)) == q4km("token_embd.weight", (32000, 4096)) == Q.Q4_K
    assert q4km("output.weight", (32000, 4096)) == q4km("token_embd.weight", (32000, 4096), tied=True) == Q.Q6_K
    assert q4km("blk.5.attn_norm.weight", (4096,)) == Q.F32
    # rows that are not whole 256-blocks fall back as llama.cpp does; rows of neither 256 nor 32 -> F16
    assert q4km("blk.0.ffn_down.weight", (64, 11040)) == Q.Q8_0 and q4km("blk.5.ffn_down.weight", (64, 11040)) == Q.Q5_0
    assert q4km("output.weight", (300, 576)) == Q.Q8_0 and q4km("blk.5.attn_q.weight", (48, 48)) == Q.F16
    assert q4km("blk.1.attn_v.weight", (256, 256), layers=80) == Q.Q6_K  # a 70B's Q5_K, written as Q6_K


@pytest.fixture(scope="module")
def q4_k_m_file(tmp_path_factory):
    """A qwen2 whose every matrix row is whole 256-blocks (hidden 256, heads 4 x 64, mlp 512), untied, exported
    with --gguf_type q4_k_m."""
    root = tmp_path_factory.mktemp("q4km")
    folder = save_tiny(root / "qwen2_256", "qwen2", small_tokenizer("qwen2"), seed=4, hidden_size=256,
                       intermediate_size=512)
    assert export_main(["--model", str(folder), "--to_gguf", "true", "--gguf_type", "q4_k_m",
                        "--output_dir", str(root / "out")]) == 0
    return jaxswift.load_model(str(folder)), root / "out" / "model-q4_k_m.gguf"


def test_q4_k_m_file_types_and_file_type(q4_k_m_file):
    _, path = q4_k_m_file
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["token_embd.weight"] == Q.Q4_K and types["output.weight"] == Q.Q6_K
    assert (types["blk.0.attn_v.weight"], types["blk.1.attn_v.weight"]) == (Q.Q4_K, Q.Q6_K)  # use_more_bits(1, 2)
    assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"]) == (Q.Q4_K, Q.Q6_K)
    for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert types[f"blk.0.{kind}.weight"] == types[f"blk.1.{kind}.weight"] == Q.Q4_K, kind
    assert {types[n] for n in types if n.endswith(("norm.weight", ".bias"))} == {Q.F32}


def test_q4_k_m_loads_in_transformers_and_jaxswift(q4_k_m_file):
    """transformers (`gguf_file=`) and jaxswift read the same dequantized tensors: logits within 1e-4; the file
    holds exactly our quantized source tensors."""
    from jaxswift.checkpoints.gguf_export import quantize_tensor

    source, path = q4_k_m_file
    back = jaxswift.load_model(str(path), load_tokenizer=False)
    ours, theirs = jax_logits(back), hf_gguf_logits(path)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert 1e-4 < rel_err(ours, jax_logits(source)) < 0.2  # really quantized, still the same model
    original = hf_tensors(source.params, source.config, dtype=np.float32)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    checked = 0
    for name, array in read_gguf(path).tensors():  # qwen2 files keep q/k rows in HF order (no permutation)
        qtype = types[gguf_tensor_name(name)]
        if qtype in (Q.Q4_K, Q.Q6_K):
            expected = dequantize(quantize_tensor(original[name], qtype), qtype).reshape(array.shape)
            np.testing.assert_array_equal(array, expected, err_msg=name)
            checked += 1
    assert checked == 2 + 2 * 7  # embedding, head, 7 matrices per layer
