"""SFT on image rows (a tiny random Qwen2-VL built offline by transformers): the step-0 loss equals transformers'
on the same rows, the exported folder loads back, ms-swift's freeze flags and per-part learning rates, --mesh 4x2
gives the single-device losses, packed rows give the unpacked loss and gradients."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxswift
from jaxswift.data.multimodal_batch import assemble_multimodal, load_multimodal_rows
from jaxswift.errors import ConfigError
from jaxswift.tuners.lora import is_lora
from jaxswift.train.args import SftArguments, parse_args
from jaxswift.train.sft import run_sft
from jaxswift.train.state import init_train_state
from jaxswift.train.step import make_train_step, vlm_nll_sums
from jaxswift.train.tuning import build_optimizer, prepare_tuner

from vlm_fixtures import make_qwen2_vl, random_image

# (user text, image sizes, reply): images of 28..56 px, one or two per row, a text-only row too
ROWS = [("the cat", [(56, 56)], "w1 w2 w3"), ("<image>a dog <image> the", [(28, 56), (56, 28)], "w4"),
        ("image", [(42, 56)], "w5 w6"), ("the the", [], "w7 w8 w9")]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """(transformers model, jaxswift model, folder, dataset path, the rows as transformers messages + images)."""
    folder = tmp_path_factory.mktemp("qwen2_vl_train")
    hf_model, _ = make_qwen2_vl(folder, min_pixels=28 * 28, max_pixels=56 * 56)
    data = tmp_path_factory.mktemp("vlm_rows")
    rows, chats = [], []
    for k, (text, sizes, reply) in enumerate(ROWS):
        names = []
        for j, (h, w) in enumerate(sizes):
            random_image(h, w, seed=10 * k + j).save(data / f"img{k}_{j}.png")
            names.append(f"img{k}_{j}.png")
        content = text if "<image>" in text else "<image>" * len(sizes) + text
        rows.append({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": reply}],
                     "images": names})
        chats.append((rows[-1]["messages"], [data / n for n in names]))
    path = data / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return hf_model, jaxswift.load_model(str(folder)), folder, path, chats


def vlm_args(vlm, out, **overrides) -> SftArguments:
    base = dict(model=str(vlm[2]), dataset=[str(vlm[3])], output_dir=str(out), max_steps=3, logging_steps=1,
                learning_rate=1e-3, per_device_train_batch_size=4, max_length=128, packing_length=256,
                demo_question="", disable_tqdm=True, save_steps=1000, lr_scheduler_type="constant",
                lora_dropout=0.0, tuner_type="full", freeze_aligner=False)
    return SftArguments(**{**base, **overrides})


def transformers_loss(hf_model, model, folder, chats) -> float:
    """transformers' mean NLL over the assistant tokens of all rows (labels -100 elsewhere), one row at a time.
    Token ids and loss masks come from jaxswift's row encoder (equal to transformers' processor:
    tests/test_vlm_data.py), pixel values and grids from transformers' own image processor."""
    import PIL.Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from jaxswift.data.multimodal import encode_multimodal_row

    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(folder))
    nll = count = 0.0
    for messages, images in chats:
        encoded = encode_multimodal_row({"messages": messages, "images": [str(p) for p in images]}, "row",
                                        model.processor).encoded
        ids = torch.tensor([encoded.input_ids.tolist()])
        labels = torch.where(torch.from_numpy(encoded.loss_mask[None].copy()), ids, torch.tensor(-100))
        vision = {}
        if images:
            px = image_processor(images=[PIL.Image.open(p).convert("RGB") for p in images], return_tensors="pt")
            vision = dict(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
        mm = torch.from_numpy(np.isin(encoded.input_ids, model.config.placeholder_ids)[None].astype(np.int64))
        with torch.no_grad():
            out = hf_model(input_ids=ids, labels=labels, mm_token_type_ids=mm, **vision)
        n = int(encoded.loss_mask[1:].sum())
        nll, count = nll + float(out.loss) * n, count + n
    return nll / count


@pytest.fixture(scope="module")
def single_run(vlm, tmp_path_factory):
    """Full tuning, packed rows, ms-swift's default freeze_vit, aligner and LLM trained: 3 steps on one device."""
    args = vlm_args(vlm, tmp_path_factory.mktemp("single"), val_dataset=[str(vlm[3])], demo_question="the cat",
                    demo_max_new_tokens=2)
    return args, run_sft(args, progress=False)


def test_step0_loss_equals_transformers_and_export_loads(vlm, single_run):
    hf_model, model, folder, _, chats = vlm
    args, result = single_run
    expected = transformers_loss(hf_model, model, folder, chats)
    np.testing.assert_allclose(result.losses[1], expected, atol=1e-4, rtol=0)
    assert result.losses[3] < result.losses[1]
    assert result.eval_losses[3] < expected  # the validation pass (all rows) after training
    assert isinstance(result.demo_before, str) and isinstance(result.demo_after, str)
    trained = jaxswift.load_model(str(result.export_dir))  # the HF folder, processor and tokenizer included
    assert trained.is_vlm and trained.processor is not None
    for a, b in zip(jax.tree.leaves(trained.params["vision"]), jax.tree.leaves(model.params["vision"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # freeze_vit (default true): bit-identical
    for part in ("aligner", "llm"):
        moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained.params[part]),
                                                          jax.tree.leaves(model.params[part]))]
        assert all(moved), part


def test_mesh_4x2_gives_single_device_losses(vlm, single_run, tmp_path):
    args, result = single_run
    meshed = run_sft(vlm_args(vlm, tmp_path / "mesh", mesh="4x2", per_device_train_batch_size=1,
                              val_dataset=[str(vlm[3])]), progress=False)
    assert len(result.losses) == 3
    np.testing.assert_allclose(list(meshed.losses.values()), list(result.losses.values()), rtol=0, atol=1e-4)
    np.testing.assert_allclose(meshed.eval_losses[3], result.eval_losses[3], rtol=0, atol=1e-4)


def _train(vlm, steps=3, batch=None, **flags):
    """(params before, params after `steps` steps on one batch of all rows) through the trainer's tuner, optimizer
    and jitted step."""
    model = vlm[1]
    args = vlm_args(vlm, "/tmp/unused", **flags)
    tuned = prepare_tuner(model.params, args, model.config)
    optimizer, _ = build_optimizer(args, steps, model.config)
    state = init_train_state(tuned.params, tuned.mask, optimizer, args.seed)
    step = jax.jit(make_train_step(model.config, optimizer))
    for _ in range(steps):
        state, metrics = step(state, {k: v[None] for k, v in batch.items()})
    assert bool(metrics["finite"])
    return tuned.params, state.params


@pytest.fixture(scope="module")
def batch(vlm):
    rows, _ = load_multimodal_rows([str(vlm[3])], vlm[1].processor, max_length=128)
    return assemble_multimodal(rows, [[0], [1], [2], [3]], 64)


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_freeze_flags_keep_parts_bit_identical(vlm, batch):
    """Tower trained, aligner and LLM frozen (single_run covers the default: tower frozen, the rest trained)."""
    frozen = ("aligner", "llm")
    before, after = _train(vlm, batch=batch, freeze_vit=False, freeze_aligner=True, freeze_llm=True)
    for part in ("vision", "aligner", "llm"):
        assert _same(before[part], after[part]) == (part in frozen), part


def test_lora_all_linear_follows_the_freeze_flags(vlm, batch):
    """ms-swift: all-linear adapts the parts that are not frozen (default: the LLM only); named targets reach the
    tower and the aligner whatever the flags."""
    model = vlm[1]

    def adapted(**flags):
        tuned = prepare_tuner(model.params, vlm_args(vlm, "/tmp/unused", tuner_type="lora", **flags), model.config)
        leaves = jax.tree.leaves(tuned.params, is_leaf=is_lora)
        return {part for part in ("vision", "aligner", "llm")
                if any(is_lora(x) for x in jax.tree.leaves(tuned.params[part], is_leaf=is_lora))} if leaves else set()

    assert adapted(freeze_aligner=None) == {"llm"}
    assert adapted(freeze_vit=False, freeze_llm=True) == {"vision", "aligner"}
    assert adapted(target_modules=["qkv", "mlp.0"]) == {"vision", "aligner"}
    assert adapted(target_modules=[r"model\.visual\.blocks\.\d+\.attn\.proj|.*q_proj"]) == {"vision", "llm"}
    with pytest.raises(ConfigError, match="some layers only"):
        adapted(target_modules=[r"model\.visual\.blocks\.0\.attn\.qkv"])
    with pytest.raises(ConfigError, match="'nope' names no module"):
        adapted(target_modules=["nope"])
    before, after = _train(vlm, batch=batch, tuner_type="lora", target_modules=["qkv", "q_proj"])
    base = lambda p: jax.tree.map(lambda x: x.base if is_lora(x) else x, p, is_leaf=is_lora)  # noqa: E731
    assert _same(base(before), base(after))  # LoRA: every base weight stays as loaded
    tower_b = after["vision"]["layers"]["wqkv"].b
    assert float(jnp.abs(tower_b).max()) > 0  # the tower's adapter trained


def test_part_learning_rates(vlm):
    """Over 3 AdamW steps on the same gradients (weight decay and clipping on, a cosine schedule), the tower's
    updates under --vit_lr 2e-3 equal a plain run's at lr 2e-3, the aligner's under --aligner_lr 5e-4 a run's at
    5e-4, and the LLM's a run's at --learning_rate 1e-3."""
    model = vlm[1]
    params = jax.tree.map(np.asarray, model.params)
    grads = [jax.tree.map(lambda p, k=k: np.random.default_rng(k).normal(size=p.shape).astype(np.float32), params)
             for k in range(3)]

    def updates(**flags):
        args = vlm_args(vlm, "/tmp/unused", lr_scheduler_type="cosine", max_grad_norm=50.0, **flags)
        optimizer, _ = build_optimizer(args, 10, model.config)
        state, out, update = optimizer.init(params), [], jax.jit(optimizer.update)
        for g in grads:
            u, state = update(g, state, params)
            out.append(u)
        return out

    mixed = updates(learning_rate=1e-3, vit_lr=2e-3, aligner_lr=5e-4)
    for part, lr in (("vision", 2e-3), ("aligner", 5e-4), ("llm", 1e-3)):
        plain = updates(learning_rate=lr)
        for step in range(3):
            for a, b in zip(jax.tree.leaves(mixed[step][part]), jax.tree.leaves(plain[step][part])):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12, err_msg=f"{part} step {step}")
    assert not np.allclose(mixed[0]["vision"]["patch_embed"], updates(learning_rate=1e-3)[0]["vision"]["patch_embed"])


def test_vlm_flags_rejected_on_a_text_model(tiny_chat_model, tmp_path):
    text = jaxswift.load_model(str(tiny_chat_model))
    for flags in (dict(freeze_vit=True), dict(vit_lr=1e-4), dict(freeze_llm=False, aligner_lr=1e-5)):
        args = SftArguments(model=str(tiny_chat_model), output_dir=str(tmp_path), **flags)
        with pytest.raises(ConfigError, match=r"--(freeze_vit|vit_lr|freeze_llm).*text-only model"):
            prepare_tuner(text.params, args, text.config)
    parsed = parse_args(SftArguments, ["--freeze_vit", "false", "--freeze_llm", "true", "--vit_lr", "1e-5"])
    assert (parsed.freeze_vit, parsed.freeze_aligner, parsed.freeze_llm, parsed.vit_lr) == (False, None, True, 1e-5)
    with pytest.raises(ConfigError, match="--vit_lr must be >= 0"):
        SftArguments(vit_lr=-1.0)


def test_packed_loss_and_gradients_equal_unpacked(vlm):
    """Three image rows (four images of three sizes) and a text row packed into one row: the tower runs once over
    the row's concatenated patches, each image lands in its own segment, M-RoPE restarts per segment."""
    model = vlm[1]
    rows, _ = load_multimodal_rows([str(vlm[3])], model.processor, max_length=128)
    packed = assemble_multimodal(rows, [[0, 1, 2, 3]], int(rows.lengths.sum()) + 3)
    unpacked = assemble_multimodal(rows, [[0], [1], [2], [3]], int(rows.lengths.max()))
    assert packed["patch_frames"].max() == 4 and packed["pixels"].shape[0] == 1

    def loss(params, b):
        nll, weight = vlm_nll_sums(params, {k: jnp.asarray(v) for k, v in b.items()}, model.config, 512)
        return nll / weight

    loss_and_grad = jax.jit(jax.value_and_grad(loss))
    loss_p, grad_p = loss_and_grad(model.params, packed)
    loss_u, grad_u = loss_and_grad(model.params, unpacked)
    np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5, atol=0)
    for gp, gu in zip(jax.tree.leaves(grad_p), jax.tree.leaves(grad_u)):
        np.testing.assert_allclose(gp, gu, atol=1e-5, rtol=1e-5)


def test_lora_adapter_trained_by_sft_loads_with_peft_and_back_into_jaxswift(vlm, tmp_path):
    """The adapter `jaxswift sft` writes (tower + aligner + LLM) loads onto the transformers model with peft, and back
    into jaxswift (`jaxswift infer --adapters`): the same logits on a prompt with an image (1e-4)."""
    from jaxswift.checkpoints.vlm_peft import load_vlm_peft_adapter
    from jaxswift.errors import CheckpointError
    from jaxswift.recipes.infer import InferArguments, _load

    model, folder = vlm[1], vlm[2]
    result = run_sft(vlm_args(vlm, tmp_path / "lora", tuner_type="lora", freeze_vit=False, freeze_aligner=False,
                              max_steps=2, learning_rate=5e-2), progress=False)
    adapter = result.export_dir
    params, lora_cfg = load_vlm_peft_adapter(model.params, model.config, adapter)
    assert {p for p in ("vision", "aligner", "llm")
            if any(is_lora(x) for x in jax.tree.leaves(params[p], is_leaf=is_lora))} == {"vision", "aligner", "llm"}
    assert is_lora(_load(InferArguments(model=str(folder), adapters=str(adapter))).params["vision"]["layers"]["wqkv"])

    ours, base, expected = adapted_logits(vlm, params, adapter)
    assert np.abs(ours - base).max() > 1e-3  # two steps at lr 5e-2 moved the adapters
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)

    stray = tmp_path / "stray"  # an adapter of some other model: refused, naming a tensor it cannot place
    stray.mkdir()
    (stray / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    from jaxswift.checkpoints.safetensors_io import write_safetensors

    write_safetensors(stray / "adapter_model.safetensors",
                      {"base_model.model.model.other.q_proj.lora_A.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(CheckpointError, match="no module for"):
        load_vlm_peft_adapter(model.params, model.config, stray)


def adapted_logits(vlm, params, adapter):
    """(jaxswift's logits under `params`, the base model's, peft's with `adapter` on the transformers model) on a
    prompt with an image."""
    import copy

    from peft import PeftModel
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from jaxswift.models.vision import vlm_forward

    hf_model, model, folder = vlm[0], vlm[1], vlm[2]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), adapter).eval()
    image = random_image(56, 42, seed=7)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "the"}]}]
    prompt = model.processor.encode_chat(messages)
    tokens, vision = jnp.asarray([prompt.ids]), model.processor.batch_vision([prompt])
    rope = jnp.asarray(prompt.rope_positions[:, None])
    ours = np.asarray(vlm_forward(params, tokens, model.config, vision, rope_positions=rope))
    base = np.asarray(vlm_forward(model.params, tokens, model.config, vision, rope_positions=rope))
    pixels = Qwen2VLImageProcessorPil.from_pretrained(str(folder))(images=[image], return_tensors="pt")
    mm = torch.from_numpy(np.isin(prompt.ids, model.config.placeholder_ids)[None].astype(np.int64))
    with torch.no_grad():
        expected = peft_model(input_ids=torch.tensor([prompt.ids]), mm_token_type_ids=mm, **pixels).logits.numpy()
    return ours, base, expected


def test_lora_llm_with_tower_and_aligner_trained_whole(vlm, tmp_path):
    """--modules_to_save vision aligner: the tower and the aligner train in full (over the default freeze_vit),
    the LLM through LoRA; the adapter holds them whole as PEFT's modules_to_save, loads onto the transformers model
    with peft and back into jaxswift with the same logits (1e-4)."""
    import json as json_lib

    from jaxswift.checkpoints.vlm_peft import load_vlm_peft_adapter

    model = vlm[1]
    result = run_sft(vlm_args(vlm, tmp_path / "run", tuner_type="lora", freeze_aligner=None, max_steps=2,
                              learning_rate=5e-2, vit_lr=1e-2, aligner_lr=1e-2,
                              modules_to_save=["vision", "aligner"]), progress=False)
    adapter = result.export_dir
    config = json_lib.loads((adapter / "adapter_config.json").read_text())
    assert "model.visual.blocks.1.attn.qkv" in config["modules_to_save"]
    assert "model.visual.merger.mlp.0" in config["modules_to_save"]
    params, _ = load_vlm_peft_adapter(model.params, model.config, adapter)
    assert not any(is_lora(x) for part in ("vision", "aligner")
                   for x in jax.tree.leaves(params[part], is_leaf=is_lora))
    assert is_lora(params["llm"]["layers"]["wq"])
    for part in ("vision", "aligner"):  # trained whole: every leaf moved
        for new, old in zip(jax.tree.leaves(params[part]), jax.tree.leaves(model.params[part])):
            assert not np.array_equal(np.asarray(new), np.asarray(old)), part
    ours, base, expected = adapted_logits(vlm, params, adapter)
    assert np.abs(ours - base).max() > 1e-3
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_modules_to_save_bad_values(vlm, tiny_chat_model, tmp_path):
    model = vlm[1]
    cases = [(dict(modules_to_save=["llm"]), "expected vision or aligner"),
             (dict(modules_to_save=["vision"], freeze_vit=True), "--freeze_vit true freezes"),
             (dict(modules_to_save=["aligner"], target_modules=["mlp.0"]), "a part is one or the other"),
             (dict(modules_to_save=["vision"], tuner_type="full"), "already trains every part")]
    for flags, message in cases:
        with pytest.raises(ConfigError, match=message):
            prepare_tuner(model.params, vlm_args(vlm, tmp_path, **{"tuner_type": "lora", **flags}), model.config)
    text = jaxswift.load_model(str(tiny_chat_model))
    with pytest.raises(ConfigError, match="text-only model"):
        prepare_tuner(text.params, SftArguments(model=str(tiny_chat_model), modules_to_save=["vision"]), text.config)


def test_preference_and_grpo_refuse_families_they_do_not_train_yet(tmp_path):
    """llava trains with SFT (tests/test_vlm_vit_train.py); DPO and GRPO take M-RoPE families only so far."""
    from types import SimpleNamespace

    from jaxswift.train.sft import MROPE_VLM_FAMILIES, check_vlm_run
    from vlm_fixtures import make_llava

    make_llava(tmp_path / "llava")
    llava = jaxswift.load_model(str(tmp_path / "llava"))
    ctx = SimpleNamespace(args=SftArguments(model="llava-folder"), model=llava, mesh=SimpleNamespace(shape={}))
    check_vlm_run(ctx)  # SFT takes it
    with pytest.raises(ConfigError, match="rlhf on image rows covers qwen2_vl, qwen2_5_vl so far; llava models load"):
        check_vlm_run(ctx, MROPE_VLM_FAMILIES, "rlhf")
