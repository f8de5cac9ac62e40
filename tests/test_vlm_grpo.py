"""GRPO on image prompts (a tiny random Qwen2-VL built offline by transformers): the engine's rollout log-probs
equal the trainer's recomputation with the image features (plain and grouped), the tower runs once per group at
prefill, and a 2-step run with a rule reward trains (LoRA on tower and LLM, reference = adapters off)."""

import json

import jax
import numpy as np
import pytest

import jaxswift
from jaxswift.data.prompts import load_prompts
from jaxswift.errors import ConfigError, DataError
from jaxswift.infer import engine_vlm
from jaxswift.infer.engine import JaxEngine
from jaxswift.infer.engine_vlm import request_images
from jaxswift.infer.rollout import RolloutSampling, engine_rollout, sequences
from jaxswift.infer.rollout_vlm import grouped_vlm_completion_logps, rollout_vision_batch, vlm_completion_logps
from jaxswift.models.transformer import unstack_layers
from jaxswift.recipes.grpo import train as train_grpo
from jaxswift.train.grpo_args import GrpoArguments

from vlm_fixtures import random_image

ROWS = [{"prompt": "<image>the cat", "images": ["a.png"], "solution": "w1"},
        {"prompt": "a dog <image> the <image>", "images": ["b.png", "c.png"], "solution": "w2"},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                   {"type": "text", "text": "image"}]}], "solution": "w3"},
        {"prompt": "<image>", "images": ["c.png"], "solution": "w4"}]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory, tiny_qwen2_vl):
    """(jaxswift model, folder, prompt rows with images, the same plus a text-only prompt)."""
    folder = tiny_qwen2_vl[1]
    data = tmp_path_factory.mktemp("vlm_prompts")
    for name, (h, w) in {"a.png": (56, 56), "b.png": (28, 56), "c.png": (56, 28)}.items():
        random_image(h, w, seed=ord(name[0])).save(data / name)
    (data / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    mixed = ROWS[:2] + [{"prompt": "the the", "solution": "w5"}]
    (data / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    return jaxswift.load_model(str(folder)), folder, data / "prompts.jsonl", data / "mixed.jsonl"


@pytest.fixture
def tower_calls(monkeypatch):
    """How many times the engine's image prefill (the one place its tower runs) is called."""
    calls = []
    original = engine_vlm.prefill_with_images

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine_vlm, "prefill_with_images", counted)
    return calls


def test_engine_rollout_logprobs_equal_the_trainers_with_the_tower_once_per_group(vlm, tower_calls):
    """LoRA with random B on tower, aligner and LLM (as a trainer's params are mid-run), handed to the engine per
    call (the LLM's) and through set_tower_params (the tower's); prompts with one and two images and a text one."""
    from jaxswift.tuners.lora import LoraConfig
    from jaxswift.tuners.vlm_lora import add_vlm_lora, randomize_b

    model, G = vlm[0], 3
    lora = LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj"))
    params = randomize_b(add_vlm_lora(model.params, model.config, lora, jax.random.key(0)), jax.random.key(1))
    prompts = load_prompts([str(vlm[3])], model.tokenizer, max_length=128, system=None, seed=0, log=print,
                           processor=model.processor)
    assert [p.images is not None for p in prompts] == [True, True, False]
    engine = JaxEngine(model, max_concurrent_decodes=4, max_model_len=128, prefill_buckets=(64,))
    engine.set_tower_params({k: v for k, v in params.items() if k != "llm"})
    images = [None if p.images is None else request_images(model.processor, p.images) for p in prompts]
    r = engine_rollout(engine, unstack_layers(params["llm"]), [p.ids for p in prompts], images=images,
                       sampling=RolloutSampling(temperature=1.0, max_completion_length=6), num_generations=G, seed=3)
    assert len(tower_calls) == 2  # one prefill (tower run) per image prompt, shared by its G completions
    assert r.completion_mask.sum() > G * len(prompts)
    seqs = sequences(r)
    P = r.prompt_ids.shape[1]
    seqs.update(rollout_vision_batch([p.images or _text_prompt(p) for p in prompts], seqs, P, G, model.config))
    plain = jax.jit(lambda p, b: vlm_completion_logps(p, b, model.config, prompt_length=P, temperature=1.0))(
        params, seqs)
    np.testing.assert_allclose(r.logprobs, np.asarray(plain) * r.completion_mask, atol=1e-4, rtol=0)
    per_group = jax.jit(lambda p, b: vlm_completion_logps(p, b, model.config, prompt_length=P, temperature=1.0,
                                                          num_generations=G))(params, seqs)  # the step's tower
    np.testing.assert_allclose(np.asarray(per_group), np.asarray(plain), atol=1e-6, rtol=0)
    grouped = grouped_vlm_completion_logps(params, seqs, cfg=model.config, prompt_length=P, temperature=1.0,
                                           num_generations=G)
    np.testing.assert_allclose(np.asarray(grouped) * r.completion_mask, np.asarray(plain) * r.completion_mask,
                               atol=1e-5, rtol=0)


def _text_prompt(p):
    from jaxswift.data.multimodal import MultimodalPrompt

    return MultimodalPrompt(p.ids, [], [], np.broadcast_to(np.arange(len(p.ids)), (3, len(p.ids))), 0)


def grpo_args(vlm, out, **overrides) -> GrpoArguments:
    base = dict(model=str(vlm[1]), dataset=[str(vlm[2])], output_dir=str(out), max_steps=2, logging_steps=1,
                learning_rate=1e-2, demo_question="", disable_tqdm=True, save_steps=1000, mesh="1",
                num_generations=2, per_device_train_batch_size=4, max_completion_length=4, max_length=64,
                rollout_backend="engine", reward_funcs=["repetition", "soft_overlong"], soft_cache_length=3,
                beta=0.04, freeze_vit=False, lora_dropout=0.0)
    return GrpoArguments(**{**base, **overrides})


def run(args):
    return train_grpo(args, progress=False)


def test_grpo_trains_two_steps_on_image_prompts(vlm, tmp_path, tower_calls):
    """LoRA on the tower (--freeze_vit false) and the LLM, beta 0.04 (the reference: adapters off, scored with
    each prompt's tower once per group): 2 steps of 2 prompts x 2 completions; the engine prefills each prompt's
    images once, with the tower's latest adapters."""
    result = run(grpo_args(vlm, tmp_path / "out"))
    assert sorted(result.history) == [1, 2]
    for metrics in result.history.values():
        assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]) and "kl" in metrics
    assert result.history[2]["kl"] > 0  # the adapters moved off the reference after step 1
    assert len(tower_calls) == 2 * 2  # 2 generations x 2 prompts, each prefilled (tower run) once for its group
    assert (result.export_dir / "adapter_config.json").is_file()
    adapted = json.loads((result.export_dir / "adapter_config.json").read_text())["target_modules"]
    assert "visual" in adapted and "language_model" in adapted


def test_bad_image_prompts_and_backends_are_refused(vlm, tmp_path):
    model = vlm[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "<image> the", "images": ["nowhere.png"]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1 image 0 .*image file '.*nowhere.png' not found"):
        load_prompts([str(bad)], model.tokenizer, max_length=64, system=None, seed=0, log=print,
                     processor=model.processor)
    bad.write_text(json.dumps({"prompt": "<image> the", "images": []}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: 1 <image> and 0 <video> markers in the prompt but 0 images"):
        load_prompts([str(bad)], model.tokenizer, max_length=64, system=None, seed=0, log=print,
                     processor=model.processor)
    with pytest.raises(DataError, match=r"prompts.jsonl:1: the prompt has images or content parts; it needs a "
                                        "vision-language model"):
        load_prompts([str(vlm[2])], model.tokenizer, max_length=64, system=None, seed=0, log=print)  # text path
    with pytest.raises(ConfigError, match="--truncation_strategy left: prompts with images"):
        load_prompts([str(vlm[2])], model.tokenizer, max_length=64, system=None, seed=0, log=print,
                     processor=model.processor, truncation_strategy="left")
    with pytest.raises(ConfigError, match="--rollout_backend generate is text-only so far"):
        run(grpo_args(vlm, tmp_path / "gen", rollout_backend="generate"))
