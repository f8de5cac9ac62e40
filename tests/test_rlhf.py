"""Preference alignment: row formats, the packed pair layout, log-prob parity with transformers, each objective
training on a tiny model, the reference model (adapters off / separate / precomputed), and bad inputs."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jaxswift
from jaxswift.data.preference import assemble_items, build_preference_items
from jaxswift.errors import ConfigError, DataError
from jaxswift.train.args import parse_args
from jaxswift.train.preference import sequence_stats
from jaxswift.train.rlhf import run_rlhf
from jaxswift.train.rlhf_args import RlhfArguments
from jaxswift.train.state import count_bytes

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
CHOSEN, REJECTED = "The capital of France is Paris.", "Berlin, obviously."


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def items_of(tokenizer, tmp_path, rows, **kw):
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    return build_preference_items([str(data)], tokenizer, kto=kw.pop("kto", False), max_length=kw.pop("max_length",
                                                                                                       256), **kw)


def rlhf_args(model, out, **overrides) -> RlhfArguments:
    base = dict(model=str(model), output_dir=str(out), dataset=["builtin:preference_demo#16"], max_steps=8,
                logging_steps=1, learning_rate=1e-3, max_length=128, demo_question="", disable_tqdm=True,
                save_steps=1000, lr_scheduler_type="constant", lora_dropout=0.0, mesh="1",
                per_device_train_batch_size=2, packing=False)
    return RlhfArguments(**{**base, **overrides})


# --- data ---------------------------------------------------------------------------------------------------------


def test_row_formats_encode_the_same_pair(smol_tokenizer, tmp_path):
    rows = [
        {"messages": [*PROMPT, {"role": "assistant", "content": CHOSEN}], "rejected_response": REJECTED},  # ms-swift
        {"chosen": [*PROMPT, {"role": "assistant", "content": CHOSEN}],  # TRL, implicit prompt
         "rejected": [*PROMPT, {"role": "assistant", "content": REJECTED}]},
        {"prompt": PROMPT[0]["content"], "chosen": CHOSEN, "rejected": REJECTED},  # TRL, strings
        {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": CHOSEN}],  # TRL, explicit prompt
         "rejected": [{"role": "assistant", "content": REJECTED}]},
    ]
    items, stats = items_of(smol_tokenizer, tmp_path, rows)
    assert stats.examples == 4 and stats.skipped == ()
    for item in items:
        assert len(item.sequences) == 2
        for got, want in zip(item.sequences, items[0].sequences):
            np.testing.assert_array_equal(got.input_ids, want.input_ids)
            np.testing.assert_array_equal(got.loss_mask, want.loss_mask)
    chosen, rejected = items[0].sequences
    scored = smol_tokenizer.decode(chosen.input_ids[chosen.loss_mask])
    assert scored == CHOSEN + "<|im_end|>"  # the reply through its end of turn, never the prompt
    assert smol_tokenizer.decode(rejected.input_ids[rejected.loss_mask]) == REJECTED + "<|im_end|>"


def test_kto_rows_labels_unpairing_and_kl_sequences(smol_tokenizer, tmp_path):
    rows = [{"messages": [*PROMPT, {"role": "assistant", "content": CHOSEN}], "label": True},
            {"prompt": "Name a colour.", "completion": "Blue.", "label": "false"},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
             "rejected_response": "Go away."}]
    items, stats = items_of(smol_tokenizer, tmp_path, rows, kto=True)
    assert [i.label for i in items] == [True, False, True, False]  # the pair row gave one of each
    assert stats.examples == 4
    decode = lambda s: smol_tokenizer.decode(s.input_ids)  # noqa: E731
    # The KL sequence is this prompt answered with the previous example's reply (cycling).
    assert "Name a colour." in decode(items[1].sequences[1]) and CHOSEN in decode(items[1].sequences[1])
    assert "France" in decode(items[0].sequences[1]) and "Go away." in decode(items[0].sequences[1])


@pytest.mark.parametrize("rows, kto, message", [
    ([{"messages": [*PROMPT, {"role": "assistant", "content": CHOSEN}]}], False,
     r"d\.jsonl:2: row has no rejected response"),
    ([{"chosen": [*PROMPT, {"role": "assistant", "content": CHOSEN}],
       "rejected": [{"role": "user", "content": "Capital of Spain?"}, {"role": "assistant", "content": "Madrid."}]}],
     False, r"d\.jsonl:2: 'chosen' and 'rejected' have different prompts"),
    ([{"messages": [*PROMPT, {"role": "assistant", "content": CHOSEN}]}], True,
     r"d\.jsonl:2: KTO row without a 'label'"),
    ([{"prompt": "Q", "chosen": "A"}], False, r"d\.jsonl:2: row has chosen but no 'rejected'"),
    ([{"messages": [*PROMPT, {"role": "assistant", "content": CHOSEN}], "label": "maybe"}], True,
     r"d\.jsonl:2: field 'label': expected true or false"),
])
def test_bad_rows_name_the_row(smol_tokenizer, tmp_path, rows, kto, message):
    good = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", **({"label": True} if kto else {})}
    if kto:
        good = {"prompt": "Hi", "completion": "Hello!", "label": True}
    with pytest.raises(DataError, match=message):
        items_of(smol_tokenizer, tmp_path, [good, *rows], kto=kto)


def test_too_long_pairs_are_skipped_and_counted(smol_tokenizer, tmp_path):
    rows = [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
            {"prompt": "Tell me a story.", "chosen": "Once upon a time " * 40, "rejected": "No."}]
    items, stats = items_of(smol_tokenizer, tmp_path, rows, max_length=64)
    assert len(items) == 1 and stats.skipped == (("longer than max_length (truncation_strategy=delete)", 1),)


# --- log-probs: packed pairs, parity with transformers -------------------------------------------------------------


def _hf_sequence_logps(hf_model, seq) -> float:
    import torch

    with torch.no_grad():
        logits = hf_model(torch.tensor(seq.input_ids[None], dtype=torch.long)).logits[0].double()
    logps = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(seq.input_ids[1:, None]).long())[:, 0]
    return float((logps * torch.tensor(seq.loss_mask[1:])).sum())


def _packed_logps(model, items):
    """All items end to end in one row: item k's chosen/rejected are segments 2k+1, 2k+2."""
    length = sum(len(i) for i in items) + 5
    batch = assemble_items(items, [list(range(len(items)))], length, 1, len(items))
    stats = sequence_stats(model.params, {k: jnp.asarray(v) for k, v in batch.items()}, model.config, 2)
    return np.asarray(stats.logps[0])  # [items, 2]


def test_smollm2_pair_logps_equal_transformers(smol_tokenizer, smollm2, smollm2_hf):
    items, _ = build_preference_items(["builtin:preference_demo#3"], smol_tokenizer, kto=False, max_length=256)
    ours = _packed_logps(smollm2, items)
    hf = smollm2_hf[0]
    theirs = np.array([[_hf_sequence_logps(hf, s) for s in item.sequences] for item in items])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)  # summed over each reply: 4e-5 seen on CPU
    assert (ours < -1).all()


def test_tiny_packed_logps_equal_transformers_one_per_row(tiny_chat_model, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    items, _ = build_preference_items(["builtin:preference_demo#4"], smol_tokenizer, kto=False, max_length=256)
    hf = AutoModelForCausalLM.from_pretrained(tiny_chat_model).eval()
    theirs = np.array([[_hf_sequence_logps(hf, s) for s in item.sequences] for item in items])
    np.testing.assert_allclose(_packed_logps(jaxswift.load_model(str(tiny_chat_model)), items), theirs, rtol=1e-5)


# --- training ---------------------------------------------------------------------------------------------------


def test_lora_dpo_learns_the_pairs_with_one_copy_of_the_base(tiny_chat_model, tmp_path):
    result = run_rlhf(rlhf_args(tiny_chat_model, tmp_path / "dpo", per_device_train_batch_size=4), progress=False)
    first = result.history[1]
    assert abs(first["loss"] - np.log(2)) < 1e-4  # policy == reference at step 0 (LoRA's B = 0)
    assert result.final_metrics["rewards/margins"] > 0.05 and result.final_metrics["rewards/accuracies"] >= 0.8
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"} <= set(first)
    base = count_bytes(jaxswift.load_model(str(tiny_chat_model), load_tokenizer=False).params)
    assert result.reference_bytes == 0
    # Base once (frozen), plus adapters and their two Adam moments: far below a second copy of the base.
    assert base <= result.state_bytes < 1.25 * base, (result.state_bytes, base)
    assert (result.export_dir / "adapter_config.json").is_file()


def test_precomputed_reference_gives_the_same_run(tiny_chat_model, tmp_path):
    """Precomputed reference log-probs == the reference computed in the step (here also on a 4x2 mesh)."""
    flags = dict(per_device_train_batch_size=4, max_steps=4)
    live = run_rlhf(rlhf_args(tiny_chat_model, tmp_path / "live", **flags), progress=False)
    pre = run_rlhf(rlhf_args(tiny_chat_model, tmp_path / "pre", precompute_ref_log_probs=True, mesh="4x2",
                             **{**flags, "per_device_train_batch_size": 1}), progress=False)
    np.testing.assert_allclose(list(pre.losses.values()), list(live.losses.values()), rtol=1e-4)
    assert pre.reference_bytes == 0


def test_full_dpo_keeps_a_frozen_reference(tiny_chat_model, tmp_path):
    result = run_rlhf(rlhf_args(tiny_chat_model, tmp_path / "full", tuner_type="full", max_steps=5,
                                learning_rate=3e-4, packing=True, packing_length=512), progress=False)
    base = count_bytes(jaxswift.load_model(str(tiny_chat_model), load_tokenizer=False).params)
    assert result.reference_bytes == base
    assert abs(result.history[1]["loss"] - np.log(2)) < 1e-4
    assert result.final_metrics["rewards/margins"] > result.history[1]["rewards/margins"]
    assert (result.export_dir / "config.json").is_file()


@pytest.mark.parametrize("rlhf_type, metric, flags", [
    ("kto", "rewards/margins", {}),
    ("simpo", "rewards/margins", {}),
    ("orpo", "log_odds_ratio", {"beta": 1.0, "learning_rate": 1e-3}),  # at lambda 0.1 NLL dominates ten steps
    ("rm", "rewards/accuracies", {}),
])
def test_each_objective_improves_its_metric(tiny_chat_model, tmp_path, rlhf_type, metric, flags):
    flags = {"tuner_type": "full", "max_steps": 10, "learning_rate": 3e-4, "per_device_train_batch_size": 4, **flags}
    result = run_rlhf(rlhf_args(tiny_chat_model, tmp_path / rlhf_type, rlhf_type=rlhf_type, **flags), progress=False)
    # A KTO step may hold no undesirable example (its rejected reward is NaN): start at the first full one.
    start = next(m[metric] for m in result.history.values() if np.isfinite(m[metric]))
    assert result.final_metrics[metric] > start + 0.05, (start, result.final_metrics)
    assert result.losses[max(result.losses)] < result.losses[1]
    if rlhf_type == "rm":
        assert (result.export_dir / "value_head.safetensors").is_file()
    if rlhf_type == "kto":
        assert "kl" in result.history[1]


# --- flags --------------------------------------------------------------------------------------------------------


def test_defaults_follow_ms_swift():
    dpo = RlhfArguments()
    assert (dpo.rlhf_type, dpo.beta, dpo.loss_type, dpo.rpo_alpha, dpo.tuner_type) == ("dpo", 0.1, ["sigmoid"],
                                                                                        None, "lora")
    simpo = parse_args(RlhfArguments, ["--rlhf_type", "simpo"])
    assert (simpo.beta, simpo.loss_type, simpo.simpo_gamma, simpo.cpo_alpha) == (2.0, ["simpo"], 1.0, 1.0)
    full = parse_args(RlhfArguments, ["--tuner_type", "full", "--model", "m"])
    assert full.ref_model == "m"  # full-tuning DPO: the reference defaults to the starting model
    mpo = parse_args(RlhfArguments, ["--loss_type", "sigmoid", "bco_pair", "sft", "--loss_weights", "0.8", "0.2", "1"])
    assert mpo.loss_weights == [0.8, 0.2, 1.0]


@pytest.mark.parametrize("flags, message", [
    (["--rlhf_type", "ppo"], "--rlhf_type 'ppo'"),
    (["--ref_model", "other"], "--ref_model with LoRA"),
    (["--rlhf_type", "orpo", "--loss_type", "sigmoid"], "--loss_type is not used by --rlhf_type orpo"),
    (["--rlhf_type", "cpo", "--precompute_ref_log_probs", "true"], "uses no reference model"),
    (["--loss_type", "sigmoid", "hinge", "--loss_weights", "1"], "loss_weights has 1 entries for 2"),
    (["--label_smoothing", "0.1"], "label_smoothing=0.1 is not used"),
    (["--loss_type", "aot"], "aot sorts the whole batch"),
    (["--beta", "0"], "beta must be > 0"),
])
def test_bad_flags_get_clear_errors(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(RlhfArguments, flags)


def test_packed_rows_fit_whole_items():
    from jaxswift.train.rlhf import preference_row_length

    items = [range(300), range(90)]  # anything with a length
    assert preference_row_length(RlhfArguments(max_length=256), 2, items) == 300  # max_length, widened to the longest item
    assert preference_row_length(RlhfArguments(max_length=256, packing=False), 2, items) == 512
    with pytest.raises(ConfigError, match="--packing_length 200 is shorter than an item of 300 tokens"):
        preference_row_length(RlhfArguments(packing_length=200), 2, items)


def test_cli_reports_a_row_without_rejected(tiny_chat_model, tmp_path, capsys):
    from jaxswift.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [*PROMPT, {"role": "assistant", "content": CHOSEN}]}])
    code = main(["rlhf", "--model", str(tiny_chat_model), "--dataset", str(data), "--output_dir",
                 str(tmp_path / "o"), "--mesh", "1", "--demo_question", ""])
    assert code == 2
    assert "d.jsonl:1: row has no rejected response" in capsys.readouterr().err
