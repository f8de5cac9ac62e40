"""Dataset rows with images: ms-swift's `<image>` + `images` and OpenAI content parts -> token ids equal to
transformers' processor on the same chat, loss only on the replies; bad rows name file, line and image."""

import json

import numpy as np
import pytest

import jaxswift
from jaxswift.data.formats import build_sft_examples
from jaxswift.data.images import image_to_data_url
from jaxswift.data.multimodal import iter_multimodal_examples
from jaxswift.errors import DataError

from vlm_fixtures import make_qwen2_vl, random_image


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_vl_data")
    _, processor = make_qwen2_vl(folder)
    return processor, jaxswift.load_model(str(folder), load_tokenizer=True)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rows_equal_the_processor(vlm, tmp_path):
    hf_processor, model = vlm
    (tmp_path / "imgs").mkdir()
    a, b = random_image(60, 90, seed=1), random_image(100, 50, seed=2)
    a.save(tmp_path / "imgs" / "a.png")
    rows = [
        {"messages": [{"role": "user", "content": "<image>the cat"}, {"role": "assistant", "content": "w1 w2"},
                      {"role": "user", "content": "a <image>"}, {"role": "assistant", "content": "w3"}],
         "images": ["imgs/a.png", image_to_data_url(b)]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_to_data_url(b)}},
                                                   {"type": "text", "text": "the dog"}]},
                      {"role": "assistant", "content": "w4 w5 w6"}]},
    ]
    examples = list(iter_multimodal_examples(write_rows(tmp_path / "train.jsonl", rows), model.processor))
    for example, images, row in zip(examples, [[a, b], [b]], rows):
        markup = "<|vision_start|><|image_pad|><|vision_end|>"
        parts = [[{"type": "image"} if p.get("type") != "text" else p for p in m["content"]]
                 if isinstance(m["content"], list) else m["content"].replace("<image>", markup)
                 for m in row["messages"]]
        messages = [{"role": m["role"], "content": c} for m, c in zip(row["messages"], parts)]
        text = hf_processor.apply_chat_template(messages)
        expected = hf_processor(text=[text], images=images, return_tensors="np")
        assert example.encoded.input_ids.tolist() == expected["input_ids"][0].tolist()
        np.testing.assert_allclose(np.concatenate(example.patches), expected["pixel_values"], atol=1e-5)
        ids, mask = example.encoded.input_ids, example.encoded.loss_mask
        assert not mask[np.isin(ids, model.config.placeholder_ids)].any()
        trained = model.tokenizer.decode(ids[mask])
        replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert trained.replace("<|im_end|>", " ").split() == " ".join(replies).split()
        assert example.rope_positions.shape == (3, len(ids))


def test_bad_rows_name_file_line_and_image(vlm, tmp_path):
    _, model = vlm
    random_image(20, 20).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    user = lambda text: [{"role": "user", "content": text}, {"role": "assistant", "content": "w1"}]  # noqa: E731
    cases = [
        ({"messages": user("<image>a"), "images": ["http://example.com/a.png"]}, r"bad.jsonl:1 image 0.*never downl"),
        ({"messages": user("<image><image>a"), "images": ["ok.png", "gone.png"]},
         r"bad.jsonl:1 image 1.*gone.png.*not found"),
        ({"messages": user("<image>a"), "images": ["broken.png"]}, r"bad.jsonl:1 image 0.*broken.png.*not a readable"),
        ({"messages": user("<image>a"), "images": []}, r"bad.jsonl:1: 1 <image> .* but 0 images"),
        ({"messages": user("a"), "images": "ok.png"}, r"bad.jsonl:1: 0 <image> .* but 1 images"),
        ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, r"bad.jsonl:1: messages\[0\]"),
        ({"messages": user("<image>a"), "images": 5}, r"bad.jsonl:1: field 'images'"),
    ]
    for row, pattern in cases:
        with pytest.raises(DataError, match=pattern):
            list(iter_multimodal_examples(write_rows(tmp_path / "bad.jsonl", [row]), model.processor))


def test_text_pipeline_refuses_image_rows(vlm, tmp_path):
    _, model = vlm
    path = write_rows(tmp_path / "rows.jsonl", [{"messages": [{"role": "user", "content": "<image>a"},
                                                             {"role": "assistant", "content": "w1"}],
                                                "images": ["a.png"]}])
    with pytest.raises(DataError, match="rows.jsonl:1: the row has images.*vision-language model"):
        build_sft_examples([str(path)], model.tokenizer, max_length=64)
