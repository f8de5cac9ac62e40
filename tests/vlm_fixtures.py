"""Tiny random vision-language models built offline with transformers (config, random weights, a WordLevel
tokenizer with the family's special tokens, the family's processor), shared by the VLM tests."""

from __future__ import annotations

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
