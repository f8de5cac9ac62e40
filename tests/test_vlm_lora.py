"""LoRA on a tiny Qwen2-VL (tower, aligner and LLM): the exported PEFT adapter, loaded by peft onto the
transformers model, gives jaxswift's logits (adapters with random nonzero B)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxswift
from jaxswift.checkpoints.vlm_peft import save_vlm_peft_adapter
from jaxswift.errors import ConfigError
from jaxswift.models.vision import vlm_forward
from jaxswift.tuners.lora import LoraConfig
from jaxswift.tuners.vlm_lora import add_vlm_lora, randomize_b

from vlm_fixtures import make_qwen2_vl, random_image

forward = jax.jit(vlm_forward, static_argnames="cfg")


@pytest.mark.parametrize("parts", [("vision", "aligner", "llm"), ("vision",)])
def test_peft_loads_the_vlm_adapter(tmp_path, parts):
    from peft import PeftModel

    hf_model, processor = make_qwen2_vl(tmp_path / "base")
    model = jaxswift.load_model(str(tmp_path / "base"))
    lora = LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj"))
    params = randomize_b(add_vlm_lora(model.params, model.config, lora, jax.random.key(0), parts=parts),
                         jax.random.key(1))
    save_vlm_peft_adapter(params, model.config, lora, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    adapted = {n for n, _ in peft_model.named_parameters() if "lora_B" in n}
    assert any(".visual.blocks.1.attn.qkv." in n for n in adapted)
    assert any(".language_model." in n for n in adapted) == ("llm" in parts)
    assert any(".merger." in n for n in adapted) == ("aligner" in parts)

    image = random_image(90, 60, seed=3)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "a"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        expected = peft_model(**inputs).logits.numpy()
    prompt = model.processor.encode_chat(messages)
    tokens, vision = jnp.asarray([prompt.ids]), model.processor.batch_vision([prompt])
    rope = jnp.asarray(prompt.rope_positions[:, None])
    ours = forward(params, tokens, cfg=model.config, vision=vision, rope_positions=rope)
    base = forward(model.params, tokens, cfg=model.config, vision=vision, rope_positions=rope)
    assert np.abs(np.asarray(ours) - np.asarray(base)).max() > 1e-3  # the adapters really change the output
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=0)


def test_bad_lora_parts(tmp_path):
    make_qwen2_vl(tmp_path)
    model = jaxswift.load_model(str(tmp_path))
    with pytest.raises(ConfigError, match="parts must be some of"):
        add_vlm_lora(model.params, model.config, LoraConfig(), jax.random.key(0), parts=("vit",))
    with pytest.raises(ConfigError, match="DoRA"):
        add_vlm_lora(model.params, model.config, LoraConfig(use_dora=True), jax.random.key(0))


def test_export_merges_a_vlm_adapter_as_peft_does(tmp_path):
    """`jaxswift export --adapters` on a Qwen2-VL adapter (tower + aligner + LLM): transformers loads the merged folder
    and its logits equal peft's merge_and_unload of the same adapter."""
    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration

    from jaxswift.recipes.export import main as export

    hf_model, processor = make_qwen2_vl(tmp_path / "base")
    model = jaxswift.load_model(str(tmp_path / "base"))
    lora = LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj"))
    params = randomize_b(add_vlm_lora(model.params, model.config, lora, jax.random.key(0)), jax.random.key(1))
    save_vlm_peft_adapter(params, model.config, lora, tmp_path / "adapter", str(tmp_path / "base"))
    assert export(["--adapters", str(tmp_path / "adapter"), "--output_dir", str(tmp_path / "merged")]) == 0

    image = random_image(90, 60, seed=5)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "a"}]}]
    for name in ("preprocessor_config.json", "tokenizer.json"):  # the processor came along
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "base" / name).read_bytes(), name
    assert jaxswift.load_model(str(tmp_path / "merged")).is_vlm
    inputs = processor(text=[processor.apply_chat_template(messages, add_generation_prompt=True)], images=[image],
                       return_tensors="pt")
    merged = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    reference = PeftModel.from_pretrained(hf_model, tmp_path / "adapter").merge_and_unload().eval()
    with torch.no_grad():
        ours, expected = merged(**inputs).logits.numpy(), reference(**inputs).logits.numpy()
        base = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "base").eval()(**inputs).logits.numpy()
    assert np.abs(expected - base).max() > 1e-3  # the adapter really changes the model
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="vision-language model"):
        export(["--adapters", str(tmp_path / "adapter"), "--output_dir", str(tmp_path / "q"), "--quant_method", "int8"])
