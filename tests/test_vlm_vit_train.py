"""SFT on image rows for the ViT families (llava, idefics3) on tiny random models built offline (float32): the row
encoder's ids equal transformers' processor on the whole chat, the first step's loss equals transformers' loss on
the same rows, training lowers it with the tower frozen bit for bit, and packed rows give the unpacked loss."""

import json

import numpy as np
import pytest
import torch

import jax
import jaxswift
from jaxswift.data.multimodal import encode_multimodal_row
from jaxswift.data.multimodal_batch import assemble_multimodal, load_multimodal_rows
from jaxswift.train.args import SftArguments
from jaxswift.train.sft import run_sft
from jaxswift.train.step import vlm_nll_sums

from vlm_fixtures import make_idefics3, make_llava, random_image

# (user text, image sizes (h, w), reply): one or two images a row; idefics3 splits the 56-px ones into 2 x 2 tiles
# (the replies start with a space: the tiny idefics3 template writes the role right before a string content)
ROWS = [("<image>the cat", [(56, 42)], " w1 w2 w3"), ("<image>a dog <image>the", [(28, 28), (40, 56)], " w4"),
        ("image <image>", [(30, 50)], " w5 w6")]
FAMILIES = {"llava": lambda folder: make_llava(folder), "idefics3": lambda folder: make_idefics3(folder)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, transformers model, its processor, jaxswift model, folder, dataset path, rows)."""
    folder = tmp_path_factory.mktemp(request.param)
    hf_model, processor = FAMILIES[request.param](folder)
    data = tmp_path_factory.mktemp(f"{request.param}_rows")
    rows = []
    for k, (text, sizes, reply) in enumerate(ROWS):
        names = []
        for j, (h, w) in enumerate(sizes):
            random_image(h, w, seed=10 * k + j).save(data / f"img{k}_{j}.png")
            names.append(f"img{k}_{j}.png")
        rows.append({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": reply}],
                     "images": names})
    path = data / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return request.param, hf_model, processor, jaxswift.load_model(str(folder)), folder, path, rows


def hf_inputs(processor, row, data_dir):
    """transformers' processor on the whole chat (user turn with its images, then the reply)."""
    import PIL.Image

    from jaxswift.data.multimodal import split_image_placeholders

    user, reply = row["messages"]
    parts = [{"type": p["type"]} if p["type"] == "image" else p
             for p in split_image_placeholders(user["content"], row["images"])]
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": parts}, reply], tokenize=False)
    images = [PIL.Image.open(data_dir / name).convert("RGB") for name in row["images"]]
    return processor(text=[text], images=[images], return_tensors="pt")


def transformers_loss(family):
    """transformers' mean NLL over the assistant tokens of all rows (labels from jaxswift's loss mask), one row at
    a time; checks on the way that the row encoder's ids equal the processor's."""
    _, hf_model, processor, model, _, path, rows = family
    nll = count = 0.0
    for k, row in enumerate(rows):
        encoded = encode_multimodal_row(row, f"row {k}", model.processor, base_dir=path.parent).encoded
        inputs = hf_inputs(processor, row, path.parent)
        assert encoded.input_ids.tolist() == inputs["input_ids"][0].tolist(), k
        ids = inputs["input_ids"]
        labels = torch.where(torch.from_numpy(encoded.loss_mask[None].copy()), ids, torch.tensor(-100))
        with torch.no_grad():
            out = hf_model(**inputs, labels=labels)
        n = int(encoded.loss_mask[1:].sum())
        nll, count = nll + float(out.loss) * n, count + n
    return nll / count


def sft_args(family, out, **overrides) -> SftArguments:
    base = dict(model=str(family[4]), dataset=[str(family[5])], output_dir=str(out), max_steps=3, logging_steps=1,
                learning_rate=1e-3, per_device_train_batch_size=3, max_length=256, demo_question="",
                disable_tqdm=True, save_steps=1000, lr_scheduler_type="constant", tuner_type="full",
                freeze_aligner=False, mesh="1")
    return SftArguments(**{**base, **overrides})


def test_first_step_loss_equals_transformers_and_the_frozen_tower_stays(family, tmp_path):
    expected = transformers_loss(family)
    model = family[3]
    result = run_sft(sft_args(family, tmp_path), progress=False)
    np.testing.assert_allclose(result.losses[1], expected, atol=1e-4, rtol=0)
    assert result.losses[3] < result.losses[1]
    trained = jaxswift.load_model(str(result.export_dir))
    for a, b in zip(jax.tree.leaves(trained.params["vision"]), jax.tree.leaves(model.params["vision"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # freeze_vit (the default): bit-identical
    for part in ("aligner", "llm"):
        assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained.params[part]),
                                                            jax.tree.leaves(model.params[part]))), part


def test_packed_rows_give_the_unpacked_loss(family):
    """All rows in one packed row vs one row each: the same NLL sum and token count (each image's features land
    in its own segment)."""
    model = family[3]
    rows, _ = load_multimodal_rows([str(family[5])], model.processor, max_length=256)
    packed = assemble_multimodal(rows, [[0, 1, 2]], 256)
    unpacked = assemble_multimodal(rows, [[0], [1], [2]], 256)
    assert packed["pixels"].shape[1] >= sum(len(t) for i in range(3) for t in rows[i].patches)
    sums = jax.jit(lambda p, b: vlm_nll_sums(p, b, model.config, 128))
    (nll_p, n_p), (nll_u, n_u) = sums(model.params, packed), sums(model.params, unpacked)
    assert float(n_p) == float(n_u) > 0
    np.testing.assert_allclose(float(nll_p), float(nll_u), rtol=1e-5)
