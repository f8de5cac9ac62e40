"""Images through the OpenAI server (`jaxswift deploy` of a vision-language model): the official openai client sends
data-URL image parts and gets `jaxswift infer --images`'s greedy answer, streamed or not, alone or batched with
other requests (per-slot rope deltas); bad images and image parts to a text-only model get a 400 naming the part,
and the server keeps serving."""

from __future__ import annotations

import base64
import concurrent.futures
import io

import openai
import pytest

import jaxswift
from jaxswift.data.images import image_to_data_url as image_data_url
from jaxswift.errors import ConfigError
from jaxswift.infer.engine_api import RequestSampling
from jaxswift.infer.engine_vlm import RequestImages, request_images
from jaxswift.recipes.serve import ServeArguments, build_server

from server_fixtures import running
from vlm_fixtures import make_llava, make_qwen2_vl, random_image

MAX_TOKENS = 8
MAX_IMAGE_PIXELS = 100_000  # the deploy flag, small so that the too-large image stays cheap to make


def png_file(folder, name, h, w, seed):
    path = folder / name
    random_image(h, w, seed=seed).save(path)
    return path


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_turn(url: str, text: str = "the cat") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


class Deployed:
    def __init__(self, url, orchestrator, folder, model, hf=None):
        self.url, self.orchestrator, self.folder, self.model = url, orchestrator, folder, model
        self.hf = hf  # (transformers model, processor) of the folder
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

    def ask(self, messages, **kw) -> str:
        out = self.client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=MAX_TOKENS,
                                                  **kw)
        return out.choices[0].message.content

    def ask_streamed(self, messages) -> str:
        stream = self.client.chat.completions.create(model="m", messages=messages, temperature=0,
                                                     max_tokens=MAX_TOKENS, stream=True)
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    def reference(self, path, text: str = "the cat") -> str:
        """jaxswift.chat on the same user turn: what `jaxswift infer --images PATH --prompt TEXT` prints."""
        return jaxswift.chat(self.model, [{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                                        {"type": "text", "text": text}]}],
                             max_new_tokens=MAX_TOKENS)


def deploy(folder, **kw):
    """`jaxswift deploy --model folder --no_warmup ...`'s app, served by a real uvicorn."""
    args = ServeArguments(model=str(folder), served_model_name="m", max_num_seqs=4, max_model_len=128, warmup=False,
                          **kw)
    app, orchestrator = build_server(args)
    return app, orchestrator


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_vl_serve")
    hf = make_qwen2_vl(folder)
    app, orchestrator = deploy(folder, max_image_pixels=MAX_IMAGE_PIXELS)
    with running(app) as url:
        yield Deployed(url, orchestrator, folder, jaxswift.load_model(str(folder)), hf)
    orchestrator.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve_images")
    # a and b: the same size (equal prompt ids, other pixels); c: another size. Grids of 3 x 3 and 2 x 4 merged
    # tokens: M-RoPE advances 3 and 4 positions over 9 and 8 tokens, so the rope deltas are -6 and -4
    return {"a": png_file(folder, "a.png", 90, 90, 11), "b": png_file(folder, "b.png", 90, 90, 12),
            "c": png_file(folder, "c.png", 60, 110, 13)}


def test_image_chat_equals_infer_cli(qwen, images, capsys):
    """The openai client's data-URL image gets the answer `jaxswift infer --images` prints, streamed or not."""
    from jaxswift.cli import main

    assert main(["infer", "--model", str(qwen.folder), "--images", str(images["a"]), "--prompt", "the cat",
                 "--max_new_tokens", str(MAX_TOKENS)]) == 0
    printed = capsys.readouterr().out
    answer = qwen.ask(image_turn(data_url(images["a"])))
    assert answer, "the tiny model's greedy answer is not empty"
    assert printed == answer + "\n"
    assert qwen.ask_streamed(image_turn(data_url(images["a"]))) == answer
    # and transformers' greedy generate on the same turn
    import PIL.Image
    import torch

    hf_model, processor = qwen.hf
    image = PIL.Image.open(images["a"]).convert("RGB")
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                            "text": "the cat"}]}],
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    assert processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True) == answer


def test_same_placeholders_other_image_is_not_a_prefix_cache_hit(qwen, images):
    """b has a's size, so its prompt ids equal a's: its answer is still its own (image prompts bypass the cache)."""
    expected_a, expected_b = qwen.reference(images["a"]), qwen.reference(images["b"])
    assert expected_a != expected_b, "the two images must change the tiny model's answer for this test to mean much"
    assert qwen.ask(image_turn(data_url(images["a"]))) == expected_a
    hits = qwen.orchestrator.engine.prefix_cache_hit_tokens
    assert qwen.ask(image_turn(data_url(images["b"]))) == expected_b
    assert qwen.orchestrator.engine.prefix_cache_hit_tokens == hits
    # admitted in one round: b's prefill is not a's shared (as the n choices of one request share theirs)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(qwen.ask, [image_turn(data_url(images[k])) for k in "ab"]))
    assert answers == [expected_a, expected_b]
    choices = qwen.client.chat.completions.create(model="m", messages=image_turn(data_url(images["b"])), n=2,
                                                  temperature=0, max_tokens=MAX_TOKENS).choices
    assert [c.message.content for c in choices] == [expected_b] * 2


def test_concurrent_image_and_text_requests(qwen, images):
    """Two image requests (other images, other rope deltas) and a text one, decoded together, each answer as
    alone."""
    text_turn = [{"role": "user", "content": "the dog a cat"}]
    expected = [qwen.reference(images["a"]), qwen.reference(images["c"], "a dog"),
                jaxswift.chat(qwen.model, text_turn, max_new_tokens=MAX_TOKENS)]
    turns = [image_turn(data_url(images["a"])), image_turn(data_url(images["c"]), "a dog"), text_turn]
    deltas = [qwen.model.processor.encode_chat([{"role": "user", "content": [
        {"type": "image", "image": str(images[k])}, {"type": "text", "text": "a"}]}]).rope_delta for k in "ac"]
    assert deltas == [-6, -4]  # decoding rotates by position + each slot's own delta
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(qwen.ask, turns))
    assert answers == expected


def bad_request(served: Deployed, messages) -> str:
    with pytest.raises(openai.BadRequestError) as info:
        served.ask(messages)
    assert info.value.status_code == 400
    return info.value.body["message"]


def test_bad_images_get_400_then_serving_goes_on(qwen, images):
    big = io.BytesIO()
    random_image(1, 1).resize((1000, 1000)).save(big, format="PNG")
    big_url = "data:image/png;base64," + base64.b64encode(big.getvalue()).decode()
    not_png = "data:image/png;base64," + base64.b64encode(b"these bytes are no image").decode()
    cases = [
        ("http://example.com/cat.png", "messages[0].content[0]: image URLs are not fetched"),
        ("data:image/png;base64,@@not base64@@", "messages[0].content[0]: invalid base64"),
        (not_png, "messages[0].content[0]: not a readable image"),
        (big_url, f"the image is 1000x1000 = 1000000 pixels, over this server's limit of {MAX_IMAGE_PIXELS}"),
        (str(images["a"]), "messages[0].content[0]: expected a data URL"),  # a server never reads its files
    ]
    for url, message in cases:
        assert message in bad_request(qwen, image_turn(url)), url
    wrong_role = [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": data_url(images["a"])}}]}]
    assert "messages[1]: images go in user messages" in bad_request(qwen, wrong_role)
    assert qwen.ask(image_turn(data_url(images["a"]))) == qwen.reference(images["a"])


def test_image_to_text_only_model_gets_400(tiny_chat_model, images):
    app, orchestrator = deploy(tiny_chat_model)
    try:
        with running(app) as url:
            served = Deployed(url, orchestrator, tiny_chat_model, None)
            message = bad_request(served, image_turn(data_url(images["a"])))
            assert "model 'm' does not take images (messages[0].content[0] is an image_url part)" in message
            assert served.client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2).choices[0].finish_reason
    finally:
        orchestrator.shutdown()
    with pytest.raises(ConfigError, match="--max_image_pixels: .* is a text-only model"):
        deploy(tiny_chat_model, max_image_pixels=1000)
    engine = orchestrator.engine  # the engine itself refuses images too
    with pytest.raises(ConfigError, match="serves a text-only model"):
        engine.prefill(engine.params, *engine.pad_prompt([1, 2, 3]), RequestSampling(max_tokens=2),
                       images=RequestImages(None, None, 0, 1))


def test_engine_refuses_bad_image_prefills(qwen):
    from jaxswift.infer.engine import JaxEngine

    engine = JaxEngine(qwen.model, max_concurrent_decodes=1, max_model_len=128)  # not the server's: its thread's
    prompt = qwen.model.processor.encode_chat(image_turn(image_data_url(random_image(60, 60))))
    images = request_images(qwen.model.processor, prompt)
    padded, n = engine.pad_prompt(prompt.ids)
    sampling = RequestSampling(max_tokens=2)
    with pytest.raises(ConfigError, match="no image placeholder"):
        engine.prefill(engine.params, *engine.pad_prompt([20, 21, 22]), sampling, images=images)  # words only
    with pytest.raises(ConfigError, match="must be the RequestImages"):
        engine.prefill(engine.params, padded, n, sampling, images=prompt)
    with pytest.raises(ConfigError, match="existing_prefix does not apply"):
        engine.prefill(engine.params, padded, n, sampling, existing_prefix=object(), images=images)


def test_llava_image_chat_equals_chat(tmp_path, images):
    """llava (1-D positions, a CLIP tower): the served answer equals jaxswift.chat's (what infer prints)."""
    make_llava(tmp_path / "llava")
    app, orchestrator = deploy(tmp_path / "llava")
    try:
        with running(app) as url:
            served = Deployed(url, orchestrator, tmp_path / "llava", jaxswift.load_model(str(tmp_path / "llava")))
            assert served.ask(image_turn(data_url(images["a"]))) == served.reference(images["a"])
    finally:
        orchestrator.shutdown()
