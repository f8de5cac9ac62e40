"""Tiny random vision-language models built offline with transformers (config, random weights, a WordLevel
tokenizer with the family's special tokens, the family's processor), shared by the VLM tests."""

from __future__ import annotations

from pathlib import Path
import numpy as np

WORDS = [f"w{i}" for i in range(90)] + ["user", "assistant", "system", "\n", "a", "the", "cat", "dog", "image"]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's own template, shortened: content parts render images / videos as vision_start, pad, vision_end.
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def word_tokenizer(special: list[str], template: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(special + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=special[2] if len(special) > 2 else special[0],
                                   pad_token=special[0], additional_special_tokens=special[1:])
    fast.chat_template = template
    return fast


QWEN_VISION = {
    "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2),
    # window 56 px = 2 x 2 merged tokens: images of 4 x 6 tokens hold full and partial windows
    "qwen2_5_vl": dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=4,
                       window_size=56, fullatt_block_indexes=[1], tokens_per_second=2),
}


def make_qwen2_vl(folder, seed: int = 0, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 16,
                  family: str = "qwen2_vl"):
    """(model, processor) of a tiny random Qwen2-VL / Qwen2.5-VL saved to folder (weights, config, tokenizer,
    processor)."""
    import torch
    import transformers
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    prefix = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL"}[family]
    config_class = getattr(transformers, f"{prefix}Config")
    model_class = getattr(transformers, f"{prefix}ForConditionalGeneration")
    processor_class = getattr(transformers, f"{prefix}Processor", Qwen2VLProcessor)

    tokenizer = word_tokenizer(QWEN_SPECIAL, QWEN_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    torch.manual_seed(seed)
    config = config_class(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=10000.0),
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(**QWEN_VISION[family], patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    model = model_class(config).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: randomize so a mis-mapped one cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    processor = _without_video(processor_class)(image_processor=image_processor, tokenizer=tokenizer,
                                                 video_processor=None, chat_template=QWEN_TEMPLATE)
    image_processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, processor


def _without_video(processor_class):
    """The processor class, accepting video_processor=None: transformers' video processors need torchvision, which
    the test environment lacks. Token expansion and image handling stay transformers' own code."""
    class Processor(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)
    return Processor


def random_image(h, w, seed=0):
    import PIL.Image

    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# llava and idefics3 / smolvlm: a 3-block CLIP or SigLIP tower of 28 x 28 images in 7 x 7 patches

LLAVA_SPECIAL = ["<pad>", "<s>", "</s>", "<image>"]
# llava-1.5's shape of prompt ("USER: <image>\n... ASSISTANT:"), with the words this vocabulary has.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}<image>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}</s>{% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}")
TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=28,
             patch_size=7)


def _randomize(model):
    import torch

    with torch.no_grad():  # norms start at 1 and biases at 0: randomize so a mis-mapped one cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or "class_embedding" in name:
                p.add_(0.1 * torch.randn_like(p))


def _text_config(tokenizer, family: str, eos: str, pad: str) -> dict:
    return dict(model_type=family, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids(eos),
                pad_token_id=tokenizer.convert_tokens_to_ids(pad))


def make_llava(folder, tower: str = "clip", text: str = "llama", feature_layer=-2, strategy: str = "default",
               seed: int = 0):
    """(model, processor) of a tiny random llava (CLIP or SigLIP tower, llama or qwen2 LLM) saved to folder."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = word_tokenizer(LLAVA_SPECIAL, LLAVA_TEMPLATE)
    vision = dict(TOWER, model_type=f"{tower}_vision_model")
    if tower == "siglip":
        vision["vision_use_head"] = False
    torch.manual_seed(seed)
    config = LlavaConfig(vision_config=vision, text_config=_text_config(tokenizer, text, "</s>", "<pad>"),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy)
    model = LlavaForConditionalGeneration(config).eval()
    _randomize(model)
    model.save_pretrained(folder)
    if tower == "clip":
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    else:
        image_processor = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=7,
                               vision_feature_select_strategy=strategy,
                               num_additional_image_tokens=1 if tower == "clip" else 0, chat_template=LLAVA_TEMPLATE)
    image_processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, processor


IDEFICS3_SPECIAL = (["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                     "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
# Idefics3's own template, shortened ("User:<image>text<end_of_utterance>\nAssistant:").
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}<image>"
    "{% elif 'text' in part %} {{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}assistant{% endif %}")


def make_idefics3(folder, family: str = "idefics3", seed: int = 0, longest_edge: int = 56,
                  do_image_splitting: bool = True):
    """(model, processor) of a tiny random Idefics3 / SmolVLM (SigLIP tower of 28 x 28 tiles, pixel shuffle 2,
    llama LLM) saved to folder; images are resized to at most `longest_edge` (2 x 2 tiles)."""
    import torch
    import transformers

    prefix = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}[family]
    tokenizer = word_tokenizer(IDEFICS3_SPECIAL, IDEFICS3_TEMPLATE)
    torch.manual_seed(seed)
    config = getattr(transformers, f"{prefix}Config")(
        vision_config={k: v for k, v in TOWER.items()},
        text_config=_text_config(tokenizer, "llama", "<end_of_utterance>", "<|endoftext|>"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval()
    _randomize(model)
    with torch.no_grad():  # its init (std 0.02) gives a greedy loop of one token: wider weights, varied answers
        for name, p in model.named_parameters():
            if p.ndim == 2 and ("text_model" in name or "lm_head" in name):
                p.normal_(0.0, 0.15)
    model.save_pretrained(folder)
    module = getattr(transformers.models, family)
    pil = getattr(getattr(module, f"image_processing_pil_{family}"), f"{prefix}ImageProcessorPil")
    image_processor = pil(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": 28},
                          do_image_splitting=do_image_splitting)
    processor_class = getattr(transformers, f"{prefix}Processor")
    kwargs = {"video_processor": None} if family == "smolvlm" else {}
    processor = (_without_video(processor_class) if kwargs else processor_class)(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE,
        **kwargs)
    image_processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, processor


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def rendered(processor, messages):
    """The chat template's text, as transformers' processor renders it (media parts reduced to their type; the
    tokenizer's template, so processors whose apply_chat_template needs a video processor work too)."""
    parts = [{"type": "text", "text": p["text"]} if p["type"] == "text" else {"type": p["type"].replace("_url", "")}
             for p in messages[0]["content"]]
    return processor.tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                                   add_generation_prompt=True)


def vit_forward_logits(model, prompt, forward):
    """`forward` (a jitted vlm_forward) of one llava / idefics3 prompt, right-padded to 64 tokens (segment 0) so
    the tests share compiled shapes; the logits of the real tokens."""
    import jax.numpy as jnp

    T = len(prompt.ids)
    pad = -T % 64
    tokens = np.pad(np.asarray([prompt.ids]), ((0, 0), (0, pad)))
    segments = np.pad(np.ones((1, T), np.int32), ((0, 0), (0, pad)))
    positions = np.pad(np.arange(T)[None], ((0, 0), (0, pad)))
    logits = forward(model.params, jnp.asarray(tokens), cfg=model.config, vision=model.processor.batch_vision([prompt]),
                     positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments))
    return np.asarray(logits)[:, :T]


def check_peft_adapter(hf_class, processor, model, folder, out_dir, messages, images, forward, expect_modules):
    """LoRA on tower, aligner and LLM (random nonzero B), exported in PEFT format, loaded by peft onto a fresh
    transformers model of the folder: its logits equal jaxswift's within 1e-4."""
    import dataclasses

    import jax
    import torch
    from peft import PeftModel

    from jaxswift.checkpoints.vlm_peft import save_vlm_peft_adapter
    from jaxswift.tuners.lora import LoraConfig
    from jaxswift.tuners.vlm_lora import add_vlm_lora, randomize_b

    lora = LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj"))
    params = randomize_b(add_vlm_lora(model.params, model.config, lora, jax.random.key(0)), jax.random.key(1))
    save_vlm_peft_adapter(params, model.config, lora, out_dir)
    peft_model = PeftModel.from_pretrained(hf_class.from_pretrained(folder).eval(), out_dir).eval()
    adapted = {n for n, _ in peft_model.named_parameters() if "lora_B" in n}
    for module in expect_modules:
        assert any(module in n for n in adapted), module
    inputs = processor(text=[rendered(processor, messages)], images=images, return_tensors="pt")
    with torch.no_grad():
        expected = peft_model(**inputs).logits.numpy()
    prompt = model.processor.encode_chat(messages)
    ours = vit_forward_logits(dataclasses.replace(model, params=params), prompt, forward)
    base = vit_forward_logits(model, prompt, forward)
    assert np.abs(ours - base).max() > 1e-3  # the adapters really change the output
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def edited_folder(folder, out, edit, file: str = "config.json") -> str:
    """A copy of the model folder at `out` whose JSON `file` went through `edit(dict)` (bad-input tests)."""
    import json
    import shutil

    shutil.copytree(folder, out)
    data = json.loads((Path(out) / file).read_text())
    edit(data)
    (Path(out) / file).write_text(json.dumps(data))
    return str(out)
