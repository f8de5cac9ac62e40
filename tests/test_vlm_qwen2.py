"""Qwen2-VL and Qwen2.5-VL parity with transformers on tiny random models built offline (float32): logits with one
image, two images of different sizes and a video; token expansion; greedy generation; save -> transformers; the
infer CLI; bad inputs."""

import dataclasses

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
import jaxswift
from jaxswift.errors import ConfigError, DataError
from jaxswift.models.vision import rope_index, vision_inputs, vlm_forward

from vlm_fixtures import make_qwen2_vl, random_image

_forward = jax.jit(vlm_forward, static_argnames="cfg")


def forward_logits(model, prompt):
    """vlm_forward of one prompt, right-padded to 64 tokens (segment 0) so the tests share compiled shapes; the
    logits of the real tokens."""
    T = len(prompt.ids)
    pad = -T % 64
    tokens = np.pad(np.asarray([prompt.ids]), ((0, 0), (0, pad)))
    segments = np.pad(np.ones((1, T), np.int32), ((0, 0), (0, pad)))
    positions = np.pad(np.arange(T)[None], ((0, 0), (0, pad)))
    rope = np.pad(prompt.rope_positions[:, None], ((0, 0), (0, 0), (0, pad)))
    logits = _forward(model.params, jnp.asarray(tokens), cfg=model.config,
                      vision=model.processor.batch_vision([prompt]), rope_positions=jnp.asarray(rope),
                      positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments))
    return np.asarray(logits)[:, :T]


_BUILT = {}


def built(family, tmp_path_factory):
    """(transformers model, its processor, jaxswift model, folder), built once per family."""
    if family not in _BUILT:
        folder = tmp_path_factory.mktemp(family)
        # Qwen2.5-VL: images up to 40 merged tokens, so its 2x2-token windows come full and partial.
        hf_model, processor = make_qwen2_vl(folder, family=family,
                                            max_pixels=28 * 28 * (40 if family == "qwen2_5_vl" else 16))
        _BUILT[family] = hf_model, processor, jaxswift.load_model(str(folder)), folder
    return _BUILT[family]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen_vl(request, tmp_path_factory):
    return built(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory):
    return built("qwen2_vl", tmp_path_factory)


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def check_logits(hf_model, processor, model, messages, images):
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    ours = model.processor.encode_chat(messages)
    assert ours.ids == inputs["input_ids"][0].tolist()  # the processor's image-token expansion
    np.testing.assert_allclose(np.concatenate(ours.patches), inputs["pixel_values"].numpy(), atol=1e-5, rtol=0)
    positions, delta = hf_model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                     inputs["image_grid_thw"])
    np.testing.assert_array_equal(ours.rope_positions, positions[:, 0].numpy())
    assert ours.rope_delta == int(delta)
    with torch.no_grad():
        expected = hf_model(**inputs).logits.numpy()
    logits = forward_logits(model, ours)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


def test_logits_one_image(qwen_vl):
    hf_model, processor, model, _ = qwen_vl
    image = random_image(150, 200, seed=1)  # Qwen2.5-VL: 5 x 7 merged tokens, full and partial windows
    check_logits(hf_model, processor, model, user({"type": "image", "image": image},
                                                  {"type": "text", "text": "the cat"}), [image])


def test_logits_two_images_of_different_sizes(qwen_vl):
    hf_model, processor, model, _ = qwen_vl
    a, b = random_image(60, 90, seed=2), random_image(130, 40, seed=3)
    messages = user({"type": "image", "image": a}, {"type": "text", "text": "the cat"},
                    {"type": "image_url", "image_url": {"url": jaxswift.data.images.image_to_data_url(b)}},
                    {"type": "text", "text": "a dog"})
    check_logits(hf_model, processor, model, messages, [a, b])


def test_logits_video(qwen_vl):
    """transformers' video processor needs torchvision (absent here), so the model gets our video patches (their
    layout is tested against the image processor's in test_images.py) and the video tokens of our expansion."""
    hf_model, _, model, _ = qwen_vl
    frames = [random_image(56, 84, seed=s) for s in range(4)]
    image = random_image(40, 60, seed=9)
    prompt = model.processor.encode_chat(user({"type": "video", "video": frames}, {"type": "text", "text": "a"},
                                              {"type": "image", "image": image}))
    (video_patches, image_patches), (video_grid, image_grid) = prompt.patches, prompt.grids
    assert video_grid[0] == 2
    ids = torch.tensor([prompt.ids])
    token_types = (ids == model.config.image_token_id).int() + 2 * (ids == model.config.video_token_id).int()
    with torch.no_grad():
        expected = hf_model(input_ids=ids, pixel_values=torch.tensor(image_patches),
                            image_grid_thw=torch.tensor([image_grid]), pixel_values_videos=torch.tensor(video_patches),
                            video_grid_thw=torch.tensor([video_grid]), mm_token_type_ids=token_types).logits.numpy()
        positions, _ = hf_model.model.get_rope_index(ids, token_types, torch.tensor([image_grid]),
                                                     torch.tensor([video_grid]))
    np.testing.assert_array_equal(prompt.rope_positions, positions[:, 0].numpy())
    logits = forward_logits(model, prompt)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


def test_greedy_generation_matches(qwen_vl):
    hf_model, processor, model, _ = qwen_vl
    image = random_image(80, 50, seed=4)
    messages = user({"type": "image", "image": image}, {"type": "text", "text": "the dog"})
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=None)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    # a batch of two prompts of different lengths (left padding): each row gets its own answer
    other = user({"type": "text", "text": "a cat"}, {"type": "image", "image": random_image(50, 50, seed=5)})
    other_inputs = processor(text=[processor.apply_chat_template(other, add_generation_prompt=True)],
                             images=[random_image(50, 50, seed=5)], return_tensors="pt")
    with torch.no_grad():
        out = hf_model.generate(**other_inputs, max_new_tokens=12, do_sample=False, eos_token_id=None)
    expected_other = out[0, other_inputs["input_ids"].shape[1]:].tolist()
    prompts = [model.processor.encode_chat(messages), model.processor.encode_chat(other)]
    assert len(prompts[0]) != len(prompts[1])
    ours = jaxswift.api.generate_ids(model, prompts, max_new_tokens=12, ignore_eos=True)
    assert ours == [expected, expected_other]
    assert len(set(expected)) > 1  # not a degenerate repeat of one token


def test_chat_and_generate_api(qwen2_vl, tmp_path):
    _, _, model, _ = qwen2_vl
    image = random_image(64, 64, seed=6)
    image.save(tmp_path / "a.png")
    by_chat = jaxswift.chat(model, user({"type": "image", "image": str(tmp_path / "a.png")},
                                        {"type": "text", "text": "the"}), max_new_tokens=5)
    assert isinstance(by_chat, str)
    raw = jaxswift.generate(model, ["<image>the"], images=[[str(tmp_path / "a.png")]], max_new_tokens=5)
    assert isinstance(raw[0], str)


def test_save_loads_in_transformers(qwen_vl, tmp_path):
    hf_model, processor, model, _ = qwen_vl
    jaxswift.save_model(model, tmp_path / "out")
    reloaded = type(hf_model).from_pretrained(tmp_path / "out").eval()
    image = random_image(60, 60, seed=7)
    text = processor.apply_chat_template(user({"type": "image"}, {"type": "text", "text": "a"}),
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(**inputs).logits.numpy(), hf_model(**inputs).logits.numpy(), atol=1e-6)
    again = jaxswift.load_model(str(tmp_path / "out"))
    assert again.config == model.config


def test_bad_inputs(qwen2_vl, tmp_path):
    _, _, model, folder = qwen2_vl
    with pytest.raises(DataError, match="never downloads"):
        model.processor.encode_chat(user({"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}))
    with pytest.raises(DataError, match=r"message 0 part 1.*nothere.png.*not found"):
        model.processor.encode_chat(user({"type": "text", "text": "a"}, {"type": "image", "image": "nothere.png"}))
    with pytest.raises(DataError, match="2 <image> .* but 1 images"):
        jaxswift.generate(model, ["<image><image>a"], images=[[random_image(30, 30)]], max_new_tokens=2)
    with pytest.raises(DataError, match="1 image and 0 video placeholders but 0 images"):
        model.processor.encode_text("<|vision_start|><|image_pad|><|vision_end|>", [])
    with pytest.raises(ConfigError, match="one list per prompt"):
        jaxswift.generate(model, ["a", "b"], images=[[]], max_new_tokens=2)
    with pytest.raises(ConfigError, match="vision-language models only"):
        from vlm_fixtures import word_tokenizer  # noqa: F401 - any text folder will do
        tiny = tmp_path / "text"
        from transformers import AutoConfig, AutoModelForCausalLM
        cfg = AutoConfig.for_model("qwen2", vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=16)
        cfg.architectures = ["Qwen2ForCausalLM"]
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tiny)
        jaxswift.load_model(str(tiny), max_pixels=1000)


def test_max_pixels_is_honoured(qwen2_vl):
    _, _, _, folder = qwen2_vl
    small = jaxswift.load_model(str(folder), max_pixels=28 * 28 * 4)
    prompt = small.processor.encode_chat(user({"type": "image", "image": random_image(200, 200)}))
    assert sum(small.processor.images.num_tokens(g) for g in prompt.grids) <= 4


def test_rope_index_adjacent_images_and_text_only():
    """Two images with no token between them still get their own grids; a text-only prompt is plain positions."""
    from jaxswift.checkpoints.vlm import read_vlm_config  # noqa: F401
    from jaxswift.models.config import ModelConfig, RopeConfig
    from jaxswift.models.vision import VisionConfig, VLMConfig

    text = ModelConfig(family="qwen2", vocab_size=20, hidden_size=16, intermediate_size=16, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=8, rope=RopeConfig(mrope_section=(2, 1, 1)))
    cfg = VLMConfig("qwen2_vl", text, VisionConfig(depth=1, embed_dim=8, num_heads=2, mlp_dim=8, out_dim=16), 9)
    ids = [1, 9, 9, 9, 9, 9, 2]  # one 2x4 grid image (2 tokens) then a 2x6 one (3 tokens)
    positions, delta = rope_index(ids, [(1, 4, 4)[:1] + (2, 4), (1, 2, 6)], cfg)
    assert positions.tolist() == [[0, 1, 1, 3, 3, 3, 6], [0, 1, 1, 3, 3, 3, 6], [0, 1, 2, 3, 4, 5, 6]]
    assert delta == 0
    plain, d = rope_index([3, 4, 5], [], cfg)
    assert plain.tolist() == [[0, 1, 2]] * 3 and d == 0
    with pytest.raises(ValueError, match="more image placeholder"):
        rope_index(ids, [(1, 2, 4)], cfg)
    inputs = vision_inputs([np.zeros((8, 4)), np.zeros((12, 4))], [(1, 2, 4), (1, 2, 6)], 2, pad_to=24)
    assert inputs.patch_frames.tolist() == [1] * 8 + [2] * 12 + [0] * 4


def test_infer_cli_with_images(qwen2_vl, tmp_path, capsys):
    """`jaxswift infer --images a.png b.png --prompt ...` answers as chat() does with the same user turn."""
    from jaxswift.cli import main

    _, _, model, folder = qwen2_vl
    random_image(60, 40, seed=11).save(tmp_path / "a.png")
    random_image(30, 90, seed=12).save(tmp_path / "b.png")
    assert main(["infer", "--model", str(folder), "--images", str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                 "--prompt", "the cat", "--max_new_tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    expected = jaxswift.chat(model, user({"type": "image", "image": str(tmp_path / "a.png")},
                                         {"type": "image", "image": str(tmp_path / "b.png")},
                                         {"type": "text", "text": "the cat"}), max_new_tokens=6)
    assert printed == expected.strip()
    assert main(["infer", "--model", str(folder), "--images", str(tmp_path / "a.png")]) != 0
    assert "--images goes with --prompt" in capsys.readouterr().err
    assert main(["infer", "--model", str(folder), "--images", "http://h/x.png", "--prompt", "a"]) != 0
    assert "never downloads" in capsys.readouterr().err


def test_mesh_forward_equals_single_device(qwen2_vl):
    """The tower and aligner shard through the same logical-axis rules as the LLM (no mesh names in models/):
    a 4x2 mesh over 8 virtual devices gives the single-device logits."""
    from jaxswift.models.vision import vlm_logical_axes
    from jaxswift.parallel.mesh import make_mesh
    from jaxswift.parallel.rules import activation_sharding, load_rules, param_shardings

    _, _, model, _ = qwen2_vl
    prompt = model.processor.encode_chat(user({"type": "image", "image": random_image(60, 90, seed=13)},
                                              {"type": "text", "text": "a"}))
    expected = forward_logits(model, prompt)
    mesh = make_mesh("4x2", jax.devices()[:8])
    rules = load_rules("default")
    shardings = param_shardings(vlm_logical_axes(model.config), model.params, rules, mesh)
    params = jax.device_put(model.params, shardings)
    assert params["vision"]["layers"]["wqkv"].sharding.spec[3] == "tensor"  # the tower's heads really are split
    with activation_sharding(rules, mesh):
        logits = forward_logits(dataclasses.replace(model, params=params), prompt)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
