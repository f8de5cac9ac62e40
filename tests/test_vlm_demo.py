"""The picture demo: a Qwen2-VL grown from a text model (checkpoints/vlm_from_llm.py) is a folder transformers loads,
answers text exactly as the text model did and reads images as jaxswift does; the demo recipe runs end to end
(a tiny llama stands in for SmolLM2 here; the real run's figures are in benchmarks/RESULTS.md)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxswift
from jaxswift.checkpoints.vlm_from_llm import grow_qwen2_vl
from jaxswift.errors import ConfigError
from jaxswift.models.vision import image_features, vlm_forward
from jaxswift.recipes import vlm_demo

from vlm_fixtures import random_image


@pytest.fixture(scope="module")
def grown(tiny_chat_model, tmp_path_factory):
    text = jaxswift.load_model(str(tiny_chat_model))
    folder = grow_qwen2_vl(text.params, text.config, text.tokenizer, tmp_path_factory.mktemp("grown"), seed=3)
    return tiny_chat_model, folder


def test_grown_model_keeps_the_text_model_and_reads_images_as_transformers(grown):
    from transformers import AutoModelForCausalLM, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    text_folder, folder = grown
    hf_vlm = Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()
    hf_text = AutoModelForCausalLM.from_pretrained(text_folder).eval()
    ids = torch.tensor([[1, 5, 900, 33, 7, 2000, 12]])
    with torch.no_grad():  # zero q/k/v biases, equal M-RoPE streams, mean-initialised new rows: the same model
        grown_logits, text_logits = hf_vlm(input_ids=ids).logits, hf_text(input_ids=ids).logits
    np.testing.assert_allclose(grown_logits[..., :text_logits.shape[-1]].numpy(), text_logits.numpy(), atol=1e-5)

    model = jaxswift.load_model(str(folder))
    # the merger is scaled at init: image features come out at the size of the token embeddings
    features = image_features(model.params, model.processor.batch_vision(
        [model.processor.encode_chat([{"role": "user", "content": [{"type": "image", "image": random_image(56, 56)}]}])]),
        model.config)
    embed_rms = float(jnp.sqrt(jnp.mean(jnp.square(model.params["llm"]["embed"]))))
    assert 0.5 < float(jnp.sqrt(jnp.mean(jnp.square(features)))) / embed_rms < 2.0
    image = random_image(100, 80, seed=1)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
    prompt = model.processor.encode_chat(messages)
    assert model.tokenizer.decode(prompt.ids).count("<|vision_start|>") == 1
    ours = vlm_forward(model.params, jnp.asarray([prompt.ids]), model.config, model.processor.batch_vision([prompt]),
                       rope_positions=jnp.asarray(prompt.rope_positions[:, None]))
    pixels = Qwen2VLImageProcessorPil.from_pretrained(str(folder))(images=[image], return_tensors="pt")
    mm = torch.from_numpy(np.isin(prompt.ids, model.config.placeholder_ids)[None].astype(np.int64))
    with torch.no_grad():
        expected = hf_vlm(input_ids=torch.tensor([prompt.ids]), mm_token_type_ids=mm, **pixels).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=0)


def test_demo_runs_end_to_end_under_sft_and_scores_before_and_after(grown, tmp_path, capsys):
    """`jaxswift sft --config sft_vlm_shapes.yaml` runs the demo (the config's `recipe: vlm_demo`), flags on top."""
    from jaxswift import cli

    text_folder, _ = grown
    out = tmp_path / "demo"
    assert cli.main(["sft", "--config", "sft_vlm_shapes.yaml", "--model", str(text_folder), "--output_dir", str(out),
                     "--train_rows", "8", "--test_rows", "4", "--max_steps", "2", "--eval_steps", "2",
                     "--image_size", "56", "--disable_tqdm", "true"]) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy before training:" in printed and "tower starts from scratch" in printed
    assert "held-out accuracy after training:" in printed
    evals = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()
             if '"split": "eval"' in line]
    assert evals and {"shapes/accuracy", "shapes/whole", "shapes/colour", "shapes/shape", "shapes/count"} <= set(evals[-1])
    assert [e["step"] for e in evals] == [0, 2]  # the score before training starts the curves
    from jaxswift.train.logging import eval_scores, read_log

    scores = eval_scores(read_log(out / "logging.jsonl"))  # drawn beside the loss in loss.png
    assert set(scores) == {"shapes/accuracy", "shapes/whole", "shapes/colour", "shapes/shape", "shapes/count"}
    assert [step for step, _ in scores["shapes/accuracy"]] == [0, 2] and (out / "loss.png").stat().st_size > 0
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "model.visual.merger.mlp.0" in adapter["modules_to_save"]  # tower and merger saved whole
    rows = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and len(rows[0]["messages"]) == 2  # one description a picture


def test_demo_flags_it_does_not_use_are_refused(tmp_path):
    for flags, message in ((["--dataset", "x.jsonl"], "--dataset is not used by vlm_demo"),
                           (["--eval_dataset", "mmlu"], "--eval_dataset is not used by vlm_demo"),
                           (["--train_rows", "0"], "--train_rows 0"),
                           (["--image_size", "70"], "--image_size 70: a multiple of 28"),
                           (["--image_size", "28"], "--image_size 28: a multiple of 28.*>= 56")):
        with pytest.raises(ConfigError, match=message):
            vlm_demo.main(["--output_dir", str(tmp_path), *flags])


def test_held_out_prompts_read_as_the_training_rows(grown):
    """The scorer asks with the system turn the rows trained with (--system ""), not the template's default line."""
    from jaxswift.data.multimodal_batch import load_multimodal_rows
    from jaxswift.data.shapes import shapes_rows, write_jsonl

    _, folder = grown
    model = jaxswift.load_model(str(folder))
    rows = shapes_rows(2, seed=0, size=56)
    prompt = vlm_demo.held_out_prompts(rows, model.processor, "")[0]
    train, _ = load_multimodal_rows([str(write_jsonl(rows, folder.parent / "rows.jsonl"))], model.processor,
                                    max_length=512, system="")
    trained = train[0].encoded
    answer_at = int(np.argmax(trained.loss_mask))  # the prompt is everything before the first trained token
    assert prompt.ids == trained.input_ids[:answer_at].tolist()
    default = vlm_demo.held_out_prompts(rows, model.processor, None)[0]
    assert default.ids != prompt.ids  # the template's own system line differs: the check can fail


def test_a_config_naming_another_recipe_is_refused(tmp_path):
    from jaxswift.recipes import sft

    config = tmp_path / "other.yaml"
    config.write_text("recipe: grpo\nmax_steps: 2\n")
    with pytest.raises(ConfigError, match=r"other.yaml: recipe 'grpo' cannot run under `jaxswift sft`.*vlm_demo"):
        sft.main(["--config", str(config)])
    with pytest.raises(ConfigError, match="--recipe 'sft': the picture demo's configs say recipe: vlm_demo"):
        vlm_demo.main(["--output_dir", str(tmp_path), "--recipe", "sft"])


def test_shipped_config_spells_out_the_demo_defaults():
    from jaxswift.recipes.common import resolve_config
    from jaxswift.train.args import parse_args

    path = resolve_config("sft_vlm_shapes.yaml")
    assert parse_args(vlm_demo.VlmDemoArguments, ["--config", path]) == vlm_demo.VlmDemoArguments(config=path)
