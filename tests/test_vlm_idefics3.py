"""idefics3 and smolvlm parity with transformers on tiny random models built offline (float32): a 3-block SigLIP
tower of 28 x 28 tiles, pixel shuffle 2, a llama LLM; images up to 56 pixels a side, so up to 2 x 2 tiles plus the
global image. Logits with one image and with two images of different sizes, the processor's `<row_i_col_j>` /
`<global-img>` expansion and pixel values, greedy generation, save -> transformers, the infer CLI, bad inputs."""

import numpy as np
import pytest
import torch

import jax
import jaxswift
from jaxswift.data.images import Idefics3VisionProcessor
from jaxswift.data.multimodal_vit import ViTVLMProcessor
from jaxswift.errors import ConfigError, DataError
from jaxswift.models.vision import vlm_forward
from jaxswift.models.vit import bucketed_positions

from vlm_fixtures import edited_folder, make_idefics3, random_image, rendered, user, vit_forward_logits

_forward = jax.jit(vlm_forward, static_argnames="cfg")
_BUILT = {}


def built(family, tmp_path_factory):
    """(transformers model, its processor, jaxswift model, folder), built once per family."""
    if family not in _BUILT:
        folder = tmp_path_factory.mktemp(family)
        hf_model, processor = make_idefics3(folder, family=family)
        _BUILT[family] = hf_model, processor, jaxswift.load_model(str(folder)), folder
    return _BUILT[family]


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def idefics3(request, tmp_path_factory):
    return built(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def idefics3_only(tmp_path_factory):
    return built("idefics3", tmp_path_factory)


def hf_inputs(processor, messages, images):
    return processor(text=[rendered(processor, messages)], images=images, return_tensors="pt")


def check_logits(hf_model, processor, model, messages, images):
    inputs = hf_inputs(processor, messages, images)
    ours = model.processor.encode_chat(messages)
    assert ours.ids == inputs["input_ids"][0].tolist()  # the processor's row / col / global-image expansion
    tiles = np.concatenate([model.processor.images.pixels(im)[0] for im in images])
    np.testing.assert_allclose(tiles, inputs["pixel_values"].numpy()[0], atol=1e-5, rtol=0)
    with torch.no_grad():
        expected = hf_model(**inputs).logits.numpy()
    np.testing.assert_allclose(vit_forward_logits(model, ours, _forward), expected, atol=1e-4, rtol=0)
    return ours


def test_logits_one_image(idefics3):
    hf_model, processor, model, _ = idefics3
    image = random_image(40, 60, seed=1)  # -> 2 x 2 tiles + the global image
    ours = check_logits(hf_model, processor, model, user({"type": "image", "image": image},
                                                         {"type": "text", "text": "the cat"}), [image])
    assert ours.grids == [(5, 2, 2)]


def test_logits_two_images_of_different_sizes(idefics3):
    hf_model, processor, model, _ = idefics3
    a, b = random_image(20, 100, seed=2), random_image(90, 60, seed=3)  # 1 x 2 and 2 x 2 tiles
    messages = user({"type": "image", "image": a}, {"type": "text", "text": "the cat"},
                    {"type": "image_url", "image_url": {"url": jaxswift.data.images.image_to_data_url(b)}},
                    {"type": "text", "text": "a dog"})
    ours = check_logits(hf_model, processor, model, messages, [a, b])
    assert ours.grids == [(3, 1, 2), (5, 2, 2)]


SIZES = [(50, 80), (300, 100), (28, 28), (13, 17), (97, 31), (56, 56), (20, 100)]


@pytest.mark.parametrize("settings", [dict(longest_edge=56), dict(longest_edge=84), dict(longest_edge=28),
                                      dict(longest_edge=56, do_image_splitting=False)])
def test_pixels_equal_transformers(settings):
    """Idefics3ImageProcessor: longest-edge resize, tiles + the global image (or one image when it fits one tile
    or splitting is off), LANCZOS on uint8, rescale, normalize; rows and cols as the processor counts them."""
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    hf = Idefics3ImageProcessorPil(size={"longest_edge": settings["longest_edge"]},
                                   max_image_size={"longest_edge": 28},
                                   do_image_splitting=settings.get("do_image_splitting", True))
    ours = Idefics3VisionProcessor.from_dict(hf.to_dict(), patch_size=7)
    for k, (h, w) in enumerate(SIZES):
        image = random_image(h, w, seed=k)
        out = hf(images=[image], return_tensors="np", return_row_col_info=True)
        pixels, rows, cols = ours.pixels(image)
        assert (rows, cols) == (out["rows"][0][0], out["cols"][0][0])
        np.testing.assert_allclose(pixels, out["pixel_values"][0], atol=1e-5, rtol=0)


def test_unsplit_image_expansion(idefics3_only):
    """An image that fits one tile becomes `<fake><global-img><image> x n<fake>` only, as in transformers."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    _, processor, model, _ = idefics3_only
    hf = Idefics3Processor(image_processor=Idefics3ImageProcessorPil(size={"longest_edge": 28},
                                                                     max_image_size={"longest_edge": 28}),
                           tokenizer=processor.tokenizer, image_seq_len=4, chat_template=processor.chat_template)
    ours = ViTVLMProcessor(model.config, model.tokenizer, Idefics3VisionProcessor(patch_size=7, longest_edge=28,
                                                                                  tile=28))
    image = random_image(30, 20, seed=8)
    messages = user({"type": "text", "text": "a"}, {"type": "image", "image": image})
    prompt = ours.encode_chat(messages)
    assert prompt.ids == hf_inputs(hf, messages, [image])["input_ids"][0].tolist()
    assert prompt.grids == [(1, 0, 0)] and "<row_" not in model.tokenizer.decode(prompt.ids)


def test_bucketed_positions_match_transformers():
    """Tiles smaller than the tower's table take bucketed position ids (idefics3's NaViT-style embeddings)."""
    from transformers import Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings

    emb = Idefics3VisionEmbeddings(Idefics3VisionConfig(hidden_size=8, image_size=28, patch_size=7))
    with torch.no_grad():
        emb.position_embedding.weight.copy_(torch.arange(16.0)[:, None].expand(16, 8))
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.bias.zero_()
        for rows, cols in [(4, 4), (3, 2), (1, 4), (2, 3)]:
            mask = torch.zeros(1, 4, 4, dtype=torch.bool)
            mask[0, :rows, :cols] = True
            ids = emb(torch.zeros(1, 3, 28, 28), mask)[0, :, 0].reshape(4, 4)[:rows, :cols].reshape(-1)
            assert bucketed_positions(rows, cols, 4).tolist() == ids.long().tolist()


def test_greedy_generation_matches(idefics3):
    hf_model, processor, model, _ = idefics3
    chats = [user({"type": "image", "image": random_image(30, 50, seed=4)}, {"type": "text", "text": "the dog"}),
             user({"type": "text", "text": "a cat a"}, {"type": "image", "image": random_image(50, 50, seed=5)},
                  {"type": "text", "text": "w3 w4 w5 w6"})]
    expected = []
    for messages in chats:
        images = [p["image"] for p in messages[0]["content"] if p["type"] == "image"]
        inputs = hf_inputs(processor, messages, images)
        with torch.no_grad():
            out = hf_model.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=None)
        expected.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    prompts = [model.processor.encode_chat(m) for m in chats]
    assert len(prompts[0]) != len(prompts[1])  # a batch of two lengths: left padding
    assert jaxswift.api.generate_ids(model, prompts, max_new_tokens=10, ignore_eos=True) == expected
    assert len(set(expected[0])) > 1


def test_save_loads_in_transformers(idefics3, tmp_path):
    hf_model, processor, model, _ = idefics3
    jaxswift.save_model(model, tmp_path / "out")
    reloaded = type(hf_model).from_pretrained(tmp_path / "out").eval()
    image = random_image(60, 30, seed=7)
    inputs = hf_inputs(processor, user({"type": "image"}, {"type": "text", "text": "a"}), [image])
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(**inputs).logits.numpy(), hf_model(**inputs).logits.numpy(), atol=1e-6)
    assert jaxswift.load_model(str(tmp_path / "out")).config == model.config


def test_infer_cli_with_two_images(idefics3_only, tmp_path, capsys):
    from jaxswift.cli import main

    _, _, model, folder = idefics3_only
    random_image(60, 40, seed=11).save(tmp_path / "a.png")
    random_image(20, 50, seed=12).save(tmp_path / "b.png")
    assert main(["infer", "--model", str(folder), "--images", str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                 "--prompt", "the cat", "--max_new_tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    expected = jaxswift.chat(model, user({"type": "image", "image": str(tmp_path / "a.png")},
                                         {"type": "image", "image": str(tmp_path / "b.png")},
                                         {"type": "text", "text": "the cat"}), max_new_tokens=6)
    assert printed == expected.strip() and printed


def test_bad_inputs(idefics3_only, tmp_path):

    _, _, model, folder = idefics3_only
    with pytest.raises(DataError, match="idefics3 models take images only"):
        model.processor.encode_chat(user({"type": "video", "video": [random_image(28, 28)]}))
    with pytest.raises(DataError, match=r"1 image placeholders \(<image>\) but 2 images"):
        model.processor.encode_text("a<image>", [("image", random_image(30, 30))] * 2)

    def edited(name, edit, file="config.json"):
        return edited_folder(folder, tmp_path / name, edit, file)

    with pytest.raises(ConfigError, match="scale_factor 3 must divide the 4 patches per side"):
        jaxswift.load_model(edited("scale", lambda d: d.update(scale_factor=3)))
    with pytest.raises(ConfigError, match=r"max_image_size.longest_edge \(56\) must equal the tower's image_size"):
        jaxswift.load_model(edited("tile", lambda d: d.update(max_image_size={"longest_edge": 56}),
                                   "preprocessor_config.json"))
    with pytest.raises(ConfigError, match="text_config.model_type 'gpt2' is not a supported text family"):
        jaxswift.load_model(edited("text", lambda d: d["text_config"].update(model_type="gpt2")))


def test_peft_adapter_loads_onto_transformers(idefics3_only, tmp_path):
    from vlm_fixtures import check_peft_adapter

    hf_model, processor, model, folder = idefics3_only
    image = random_image(30, 50, seed=9)
    check_peft_adapter(type(hf_model), processor, model, folder, tmp_path / "adapter",
                       user({"type": "image", "image": image}, {"type": "text", "text": "a"}), [image], _forward,
                       [".vision_model.encoder.layers.2.mlp.fc2.", ".connector.modality_projection.proj.",
                        ".text_model.layers.1.mlp.down_proj."])
