"""llava parity with transformers on tiny random models built offline (float32): a CLIP tower + llama LLM with
the default feature strategy and layer -2, and a SigLIP tower + qwen2 LLM with the full strategy and two feature
layers; logits with one image and with two images of different sizes, the processor's token expansion and pixel
values, greedy generation, save -> transformers, the infer CLI, bad inputs."""

import numpy as np
import pytest
import torch

import jax
import jaxswift
from jaxswift.data.images import ClipVisionProcessor
from jaxswift.errors import ConfigError, DataError
from jaxswift.models.vision import vlm_forward

from vlm_fixtures import edited_folder, make_llava, random_image, rendered, user, vit_forward_logits

_forward = jax.jit(vlm_forward, static_argnames="cfg")
VARIANTS = {"clip-llama": dict(tower="clip", text="llama", feature_layer=-2, strategy="default"),
            "siglip-qwen2": dict(tower="siglip", text="qwen2", feature_layer=[-1, 0], strategy="full")}
_BUILT = {}


def built(variant, tmp_path_factory):
    """(transformers model, its processor, jaxswift model, folder), built once per variant."""
    if variant not in _BUILT:
        folder = tmp_path_factory.mktemp(variant)
        hf_model, processor = make_llava(folder, **VARIANTS[variant])
        _BUILT[variant] = hf_model, processor, jaxswift.load_model(str(folder)), folder
    return _BUILT[variant]


@pytest.fixture(scope="module", params=list(VARIANTS))
def llava(request, tmp_path_factory):
    return built(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def clip_llava(tmp_path_factory):
    return built("clip-llama", tmp_path_factory)


def check_logits(hf_model, processor, model, messages, images):
    inputs = processor(text=[rendered(processor, messages)], images=images, return_tensors="pt")
    ours = model.processor.encode_chat(messages)
    assert ours.ids == inputs["input_ids"][0].tolist()  # LlavaProcessor's image-token expansion
    pixels = np.concatenate([model.processor.images.pixels(im) for im in images])
    np.testing.assert_allclose(pixels, inputs["pixel_values"].numpy(), atol=1e-5, rtol=0)
    with torch.no_grad():
        expected = hf_model(**inputs).logits.numpy()
    np.testing.assert_allclose(vit_forward_logits(model, ours, _forward), expected, atol=1e-4, rtol=0)


def test_logits_one_image(llava):
    hf_model, processor, model, _ = llava
    image = random_image(50, 70, seed=1)
    check_logits(hf_model, processor, model, user({"type": "image", "image": image},
                                                  {"type": "text", "text": "the cat"}), [image])


def test_logits_two_images_of_different_sizes(llava):
    hf_model, processor, model, _ = llava
    a, b = random_image(60, 90, seed=2), random_image(130, 40, seed=3)
    messages = user({"type": "image", "image": a}, {"type": "text", "text": "the cat"},
                    {"type": "image_url", "image_url": {"url": jaxswift.data.images.image_to_data_url(b)}},
                    {"type": "text", "text": "a dog"})
    check_logits(hf_model, processor, model, messages, [a, b])


SIZES = [(50, 80), (300, 100), (28, 28), (13, 17), (97, 31)]


@pytest.mark.parametrize("kind", ["clip", "clip-crop", "clip-pad", "siglip"])
def test_pixels_equal_transformers(kind):
    """CLIPImageProcessor (shortest edge, center crop; a crop larger than the resized image zero-pads first) and
    SiglipImageProcessor (fixed size) in numpy/PIL."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    hf = {"clip": lambda: CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
          "clip-crop": lambda: CLIPImageProcessorPil(size={"shortest_edge": 35}, crop_size={"height": 21, "width": 28}),
          "clip-pad": lambda: CLIPImageProcessorPil(size={"shortest_edge": 14}, crop_size={"height": 28, "width": 21}),
          "siglip": lambda: SiglipImageProcessorPil(size={"height": 21, "width": 35})}[kind]()
    ours = ClipVisionProcessor.from_dict(hf.to_dict(), patch_size=7)
    for k, (h, w) in enumerate(SIZES):
        image = random_image(h, w, seed=k)
        expected = hf(images=[image], return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(ours.pixels(image), expected, atol=1e-5, rtol=0)
        patches, grid = ours.image(image)
        assert patches.shape == (1, grid[1] * grid[2], 3 * 7 * 7) and grid[1:] == (
            expected.shape[2] // 7, expected.shape[3] // 7)


def test_greedy_generation_matches(llava):
    hf_model, processor, model, _ = llava
    chats = [user({"type": "image", "image": random_image(80, 50, seed=4)}, {"type": "text", "text": "the dog"}),
             user({"type": "text", "text": "a cat a"}, {"type": "image", "image": random_image(50, 50, seed=5)},
                  {"type": "text", "text": "w3 w4 w5"})]
    expected = []
    for messages in chats:
        images = [p["image"] for p in messages[0]["content"] if p["type"] == "image"]
        inputs = processor(text=[rendered(processor, messages)], images=images, return_tensors="pt")
        with torch.no_grad():
            out = hf_model.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=None)
        expected.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    prompts = [model.processor.encode_chat(m) for m in chats]
    assert len(prompts[0]) != len(prompts[1])  # a batch of two lengths: left padding
    assert jaxswift.api.generate_ids(model, prompts, max_new_tokens=10, ignore_eos=True) == expected
    assert len(set(expected[0])) > 1  # not a degenerate repeat of one token


def test_save_loads_in_transformers(llava, tmp_path):
    hf_model, processor, model, _ = llava
    jaxswift.save_model(model, tmp_path / "out")
    reloaded = type(hf_model).from_pretrained(tmp_path / "out").eval()
    image = random_image(60, 60, seed=7)
    messages = user({"type": "image"}, {"type": "text", "text": "a"})
    inputs = processor(text=[rendered(processor, messages)], images=[image], return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(**inputs).logits.numpy(), hf_model(**inputs).logits.numpy(), atol=1e-6)
    again = jaxswift.load_model(str(tmp_path / "out"))
    assert again.config == model.config


def test_every_tensor_naming_loads(clip_llava, tmp_path):
    """transformers 5 saves llava as vision_tower.*, multi_modal_projector.*, language_model.model.*,
    language_model.lm_head.* (what every fixture load reads); transformers 4 wrote vision_tower.vision_model.*;
    jaxswift saves the in-memory names (model.vision_tower.*, ...). All three load to the same params."""
    import shutil

    from safetensors.numpy import load_file, save_file

    _, _, model, folder = clip_llava
    saved = load_file(str(folder / "model.safetensors"))
    assert any(n.startswith("vision_tower.encoder.") for n in saved)
    renames = {"v4": (("vision_tower.", "vision_tower.vision_model."),),
               "in-memory": (("vision_tower.", "model.vision_tower."),
                             ("multi_modal_projector.", "model.multi_modal_projector."),
                             ("language_model.model.", "model.language_model."),
                             ("language_model.lm_head.", "lm_head."))}
    for naming, table in renames.items():
        renamed = {}
        for name, array in saved.items():
            old, new = next(((o, n) for o, n in table if name.startswith(o)), ("", ""))
            renamed[new + name[len(old):]] = array
        assert renamed.keys() != saved.keys()
        out = tmp_path / naming
        out.mkdir()
        for f in folder.iterdir():
            if f.name != "model.safetensors":
                shutil.copy(f, out / f.name)
        save_file(renamed, str(out / "model.safetensors"), {"format": "pt"})
        jax.tree.map(np.testing.assert_array_equal, jaxswift.load_model(str(out)).params, model.params)


def test_infer_cli_with_an_image(clip_llava, tmp_path, capsys):
    from jaxswift.cli import main

    _, _, model, folder = clip_llava
    random_image(60, 40, seed=11).save(tmp_path / "a.png")
    assert main(["infer", "--model", str(folder), "--images", str(tmp_path / "a.png"), "--prompt", "the cat",
                 "--max_new_tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    expected = jaxswift.chat(model, user({"type": "image", "image": str(tmp_path / "a.png")},
                                         {"type": "text", "text": "the cat"}), max_new_tokens=6)
    assert printed == expected.strip() and printed


def test_bad_inputs(clip_llava, tmp_path):

    _, _, model, folder = clip_llava
    with pytest.raises(DataError, match="images only"):
        model.processor.encode_chat(user({"type": "video", "video": [random_image(28, 28)]}))
    with pytest.raises(DataError, match=r"prompt 0: 2 <image> .* but 1 images"):
        jaxswift.generate(model, ["<image><image>a"], images=[[random_image(30, 30)]], max_new_tokens=2)
    with pytest.raises(DataError, match=r"2 image placeholders \(<image>\) but 1 images"):
        model.processor.encode_text("<image>a<image>", [("image", random_image(30, 30))])
    with pytest.raises(ConfigError, match="min_pixels / max_pixels bound Qwen2-VL"):
        jaxswift.load_model(str(folder), max_pixels=1000)

    def edited(name, edit, file="config.json"):
        return edited_folder(folder, tmp_path / name, edit, file)

    with pytest.raises(ConfigError, match="vision feature layer 7 is out of range for a 3-layer tower"):
        jaxswift.load_model(edited("layer", lambda d: d.update(vision_feature_layer=7)))
    with pytest.raises(ConfigError, match="vision_feature_select_strategy must be one of"):
        jaxswift.load_model(edited("strategy", lambda d: d.update(vision_feature_select_strategy="cls")))
    with pytest.raises(ConfigError, match="vision_use_head"):
        jaxswift.load_model(edited("head", lambda d: d["vision_config"].update(model_type="siglip_vision_model")))
    with pytest.raises(ConfigError, match="llava vision tower 'dinov2' is not supported"):
        jaxswift.load_model(edited("tower", lambda d: d["vision_config"].update(model_type="dinov2")))
    with pytest.raises(ConfigError, match=r"makes \(14, 14\) images .* tower takes 28x28"):
        jaxswift.load_model(edited("crop", lambda d: d.update(crop_size={"height": 14, "width": 14}),
                                   "preprocessor_config.json"))
    with pytest.raises(ConfigError, match="do_pad"):
        jaxswift.load_model(edited("pad", lambda d: d.update(do_pad=True), "preprocessor_config.json"))


def test_peft_adapter_loads_onto_transformers(clip_llava, tmp_path):
    from vlm_fixtures import check_peft_adapter

    hf_model, processor, model, folder = clip_llava
    image = random_image(70, 50, seed=9)
    check_peft_adapter(type(hf_model), processor, model, folder, tmp_path / "adapter",
                       user({"type": "image", "image": image}, {"type": "text", "text": "a"}), [image], _forward,
                       [".vision_tower.encoder.layers.2.self_attn.q_proj.", ".multi_modal_projector.linear_2.",
                        ".language_model.layers.1.self_attn.v_proj."])
