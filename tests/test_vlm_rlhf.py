"""DPO (and the preference path it shares) on image rows, on a tiny random Qwen2-VL built offline by transformers:
per-sequence log-probs of chosen / rejected equal transformers', the DPO loss equals TRL's formula in float64 on
them, the tower sees a pair's shared images once, `jaxswift rlhf --rlhf_type dpo` trains 2 steps with the freeze
flags honoured, and bad rows are named."""

import json

import jax
import numpy as np
import pytest
import torch

import jaxswift
from jaxswift.data.multimodal import encode_multimodal_row
from jaxswift.data.multimodal_preference import assemble_multimodal_items, build_multimodal_preference_items
from jaxswift.errors import DataError
from jaxswift.train.preference import Objective, make_eval_fn, make_logps_fn

from vlm_fixtures import random_image

# (row, its images as (name, h, w)): ms-swift's rejected_response with one and with two images, TRL's
# prompt / chosen / rejected, ms-swift's rejected_images (the rejected side sees another picture), a text-only pair.
ROWS = [
    ({"messages": [{"role": "user", "content": "<image>the cat"}, {"role": "assistant", "content": "w1 w2 w3"}],
      "rejected_response": "w4 w5", "images": ["a.png"]}, [("a.png", 56, 56)]),
    ({"messages": [{"role": "user", "content": "<image>a dog <image> the"}, {"role": "assistant", "content": "w6"}],
      "rejected_response": "w7 w8 w9", "images": ["b.png", "c.png"]}, [("b.png", 28, 56), ("c.png", 56, 28)]),
    ({"prompt": "<image>image", "chosen": "w10 w11", "rejected": "w12", "images": ["d.png"]}, [("d.png", 42, 56)]),
    ({"messages": [{"role": "user", "content": "<image>the"}, {"role": "assistant", "content": "w13"}],
      "rejected_response": "w13", "images": ["a.png"], "rejected_images": ["e.png"]}, [("e.png", 56, 42)]),
    ({"messages": [{"role": "user", "content": "the the"}, {"role": "assistant", "content": "w14 w15"}],
      "rejected_response": "w16"}, []),
]


def write_rows(folder, rows):
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def vlm(tmp_path_factory, tiny_qwen2_vl):
    """(transformers model, jaxswift model, folder, dataset path)."""
    hf_model, folder = tiny_qwen2_vl
    data = tmp_path_factory.mktemp("vlm_pairs")
    for _, images in ROWS:
        for k, (name, h, w) in enumerate(images):
            random_image(h, w, seed=sum(map(ord, name))).save(data / name)
    return hf_model, jaxswift.load_model(str(folder)), folder, write_rows(data, [r for r, _ in ROWS])


@pytest.fixture(scope="module")
def items(vlm):
    out, stats = build_multimodal_preference_items([str(vlm[3])], vlm[1].processor, kto=False, max_length=128)
    assert len(out) == len(ROWS) and stats.skipped == ()
    return out


def transformers_logps(hf_model, model, folder, item) -> list[float]:
    """Sum of log p(token) over each sequence's scored (last reply) tokens, by transformers' model. Ids and masks
    come from jaxswift's row encoder (equal to transformers' processor: tests/test_vlm_data.py), pixels and grids
    from transformers' own image processor."""
    import PIL.Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(folder))
    out = []
    for chat in item.chats:
        encoded = encode_multimodal_row(chat, "row", model.processor, base_dir=item.base_dir,
                                        loss_scale="last_round").encoded
        vision = {}
        if chat["images"]:
            images = [PIL.Image.open(item.base_dir / p).convert("RGB") for p in chat["images"]]
            px = image_processor(images=images, return_tensors="pt")
            vision = dict(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
        ids = torch.tensor([encoded.input_ids.tolist()])
        mm = torch.from_numpy(np.isin(encoded.input_ids, model.config.placeholder_ids)[None].astype(np.int64))
        with torch.no_grad():
            logits = hf_model(input_ids=ids, mm_token_type_ids=mm, **vision).logits[0].double()
        logps = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0].numpy()
        out.append(float((logps * encoded.loss_mask[1:]).sum()))
    return out


@pytest.fixture(scope="module")
def reference_logps(vlm, items):
    hf_model, model, folder, _ = vlm
    return np.asarray([transformers_logps(hf_model, model, folder, item) for item in items])  # [items, 2] float64


def test_sequence_logps_equal_transformers_and_shared_images_run_once(vlm, items, reference_logps):
    model = vlm[1]
    batch = assemble_multimodal_items(items, [[i] for i in range(len(items))], 128, len(items), 1)
    logps_fn = jax.jit(make_logps_fn(model.config, Objective("dpo")))
    ours = np.asarray(logps_fn(model.params, {k: v[None] for k, v in batch.items()}))[:, 0]
    np.testing.assert_allclose(ours, reference_logps, atol=1e-4, rtol=0)
    # the tower's inputs hold each row's distinct images once: the pair's shared prompt images are not doubled
    assert [int(batch["patch_frames"][r].max()) for r in range(len(items))] == [1, 2, 1, 2, 0]
    # every item packed into one row: the same log-probs (images deduplicated across items too, in order)
    length = sum(len(i) for i in items)
    packed = assemble_multimodal_items(items, [list(range(len(items)))], length, 1, len(items))
    assert int(packed["patch_frames"].max()) == 5  # a.png b.png c.png d.png e.png
    packed_logps = np.asarray(jax.jit(make_logps_fn(model.config, Objective("dpo")))(
        model.params, {k: v[None] for k, v in packed.items()}))[0]
    np.testing.assert_allclose(packed_logps, ours, atol=1e-5, rtol=0)


def test_dpo_loss_equals_trls_formula_in_float64(vlm, items, reference_logps):
    """The batch's DPO loss (TRL's sigmoid) against a float64 transcription of TRL's formula on transformers'
    log-probs; the reference's log-probs are the policy's shifted (precomputed), so margins vary."""
    model, beta = vlm[1], 0.1
    ref = reference_logps + np.random.default_rng(0).normal(0, 2.0, reference_logps.shape)
    batch = assemble_multimodal_items(items, [[i] for i in range(len(items))], 128, len(items), 1,
                                      ref.astype(np.float32))
    obj = Objective("dpo", beta=beta)
    item_loss, _, n_items, _, metrics = jax.jit(make_eval_fn(model.config, obj, reference="precomputed"))(
        model.params, {k: v[None] for k, v in batch.items()})
    pc, pr = reference_logps[:, 0], reference_logps[:, 1]
    logits = (pc - pr) - (ref[:, 0] - ref[:, 1])
    log_sigmoid = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    trl = -log_sigmoid(beta * logits)
    np.testing.assert_allclose(float(item_loss) / float(n_items), trl.mean(), atol=1e-5, rtol=0)
    chosen_rewards = beta * (pc - ref[:, 0])
    np.testing.assert_allclose(float(metrics["rewards/chosen"][0]) / float(metrics["rewards/chosen"][1]),
                               chosen_rewards.mean(), atol=1e-4, rtol=0)


def test_rlhf_cli_trains_dpo_on_image_rows_with_freeze_flags(vlm, tmp_path, capsys):
    """`jaxswift rlhf --rlhf_type dpo`, full tuning, ms-swift's defaults (tower and aligner frozen): 2 steps; the
    exported tower and aligner are bit-identical to the loaded ones, the LLM moved."""
    from jaxswift.cli import main

    model, folder, data = vlm[1], vlm[2], vlm[3]
    code = main(["rlhf", "--rlhf_type", "dpo", "--model", str(folder), "--dataset", str(data), "--output_dir",
                 str(tmp_path / "out"), "--tuner_type", "full", "--max_steps", "2", "--per_device_train_batch_size",
                 "2", "--max_length", "128", "--learning_rate", "1e-3", "--logging_steps", "1", "--mesh", "1",
                 "--demo_question", "", "--disable_tqdm", "true", "--save_steps", "1000",
                 "--per_device_eval_batch_size", "8"])
    assert code == 0
    out = capsys.readouterr().out
    assert "over 2 steps" in out, out
    trained = jaxswift.load_model(str(tmp_path / "out" / "model"))
    assert trained.is_vlm
    for part in ("vision", "aligner"):
        for a, b in zip(jax.tree.leaves(trained.params[part]), jax.tree.leaves(model.params[part])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=part)
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained.params["llm"]),
                                                      jax.tree.leaves(model.params["llm"]))]
    assert any(moved)


def test_bad_image_rows_are_named(vlm, tmp_path):
    model = vlm[1]
    random_image(28, 28).save(tmp_path / "a.png")
    pair = {"messages": [{"role": "user", "content": "<image>the"}, {"role": "assistant", "content": "w1"}],
            "rejected_response": "w2", "images": ["a.png"]}
    cases = [
        ({**pair, "rejected_images": ["a.png", "a.png"]},
         r"pairs.jsonl:2: chosen and rejected carry different image counts \(1 in 'images', 2 in 'rejected_images'\)"),
        ({**pair, "images": ["missing.png"]}, r"pairs.jsonl:2 image 0 .*image file '.*missing.png' not found"),
        ({**pair, "images": []}, r"pairs.jsonl:2: 1 <image> and 0 <video> markers in the messages but 0 images"),
        ({**pair, "rejected_videos": [["a.png"]]}, r"pairs.jsonl:2: 'rejected_videos' is not supported"),
        ({k: v for k, v in pair.items() if k != "rejected_response"} | {"rejected_messages": pair["messages"]},
         r"pairs.jsonl:2: ms-swift's 'rejected_messages' .* is not supported"),
    ]
    for row, message in cases:
        path = write_rows(tmp_path, [pair, row])
        with pytest.raises(DataError, match=message):
            build_multimodal_preference_items([str(path)], model.processor, kto=False, max_length=128)
    # the text path never drops a row's images silently: a text-only model refuses them
    from jaxswift.data.preference import build_preference_items

    path = write_rows(tmp_path, [pair])
    with pytest.raises(DataError, match="pairs.jsonl:1: the row has images or videos; it needs a vision-language"):
        build_preference_items([str(path)], model.tokenizer, kto=False, max_length=128)


def test_kto_items_carry_their_prompts_images(vlm):
    """KTO unpairs each pair (desirable chosen, undesirable rejected, each answering its side's prompt images) and
    adds the mismatched KL sequence (this prompt and its images, the previous example's reply): the batch stores a
    row's images once however many of its sequences show them."""
    model = vlm[1]
    kto, _ = build_multimodal_preference_items([str(vlm[3])], model.processor, kto=True, max_length=128)
    assert [i.label for i in kto] == [True, False] * len(ROWS)
    assert [c["images"] for c in kto[6].chats] == [["a.png"]] * 2  # row 4's chosen: images, its KL sequence too
    assert [c["images"] for c in kto[7].chats] == [["e.png"]] * 2  # row 4's rejected: rejected_images
    batch = assemble_multimodal_items(kto, [[0], [7]], 128, 2, 1)
    assert [int(batch["patch_frames"][r].max()) for r in range(2)] == [1, 1]
    seg, index, tokens = batch["segment_ids"][0], batch["feature_index"][0], batch["tokens"][0]
    image = np.isin(tokens, model.config.placeholder_ids)
    assert image[seg == 1].sum() == image[seg == 2].sum() == 4  # a 56 x 56 image: 4 tokens in each sequence
    np.testing.assert_array_equal(index[image & (seg == 1)], index[image & (seg == 2)])  # the same feature rows
