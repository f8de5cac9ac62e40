"""Sequence classification and reranking (issue 21): parity of the head with transformers' *ForSequenceClassification
(padding on either side), the losses against their references, training (full and LoRA) with exports that
transformers / peft load and score exactly as jaxswift's final evaluation did, and the bad inputs."""

import json

import numpy as np
import pytest

from jaxswift.errors import ConfigError, DataError
from jaxswift.train.args import SftArguments
from jaxswift.train.sft import run_sft

VOCAB = 97
COLORS = [("red", 0), ("crimson", 0), ("scarlet", 0), ("blue", 1), ("navy", 1), ("azure", 1), ("green", 2),
          ("lime", 2), ("olive", 2)]


# ----------------------------------------------------------------------------------------------- the head


def make_hf_seq_cls(family: str, folder, num_labels: int = 3):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, num_labels=num_labels, pad_token_id=0,
                                  max_position_embeddings=128)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    model.save_pretrained(folder)
    return model


def padded(tokens, lengths, side):
    ids, mask = np.zeros_like(tokens), np.zeros_like(tokens)
    T = tokens.shape[1]
    for i, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, cols], mask[i, cols] = tokens[i, :n], 1
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logits_match_transformers_with_either_padding(family, tmp_path):
    import torch

    import jaxswift
    from jaxswift.models.heads import sequence_logits

    hf = make_hf_seq_cls(family, tmp_path / "hf")
    model = jaxswift.load_model(str(tmp_path / "hf"))
    assert model.head.num_labels == 3 and model.head.pad_token_id == 0
    assert model.head.problem_type == "single_label_classification"
    tokens = np.random.default_rng(0).integers(1, VOCAB, size=(3, 11))
    for side in ("right", "left"):
        ids, mask = padded(tokens, [11, 7, 3], side)
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
        ours = sequence_logits(model.params, ids, model.config, model.head.pad_token_id, positions=positions,
                               segment_ids=mask)
        np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
    # save -> transformers loads the same classifier
    jaxswift.save_model(model, tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["architectures"] == [f"{'Llama' if family == 'llama' else 'Qwen2'}ForSequenceClassification"]
    assert config["num_labels"] == 3 and config["pad_token_id"] == 0 and len(config["id2label"]) == 3
    from transformers import AutoModelForSequenceClassification

    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        np.testing.assert_allclose(again(input_ids=torch.tensor(tokens)).logits.numpy(),
                                   hf(input_ids=torch.tensor(tokens)).logits.numpy(), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------- the losses


def test_seq_cls_losses_equal_torch():
    import torch

    from jaxswift.train.classify import loss_sums, Task

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 4)).astype(np.float32)
    valid = np.array([1, 1, 1, 1, 1, 0], np.float32)  # the last row is padding
    cls = rng.integers(0, 4, size=6)
    t = torch.tensor(logits[:5])
    cases = {
        "single_label_classification": (np.eye(4, dtype=np.float32)[cls],
                                        torch.nn.functional.cross_entropy(t, torch.tensor(cls[:5]))),
        "multi_label_classification": ((rng.random((6, 4)) > 0.5).astype(np.float32), None),
        "regression": (rng.normal(size=(6, 4)).astype(np.float32), None),
    }
    for problem, (labels, ref) in cases.items():
        if problem == "multi_label_classification":
            ref = torch.nn.functional.binary_cross_entropy_with_logits(t, torch.tensor(labels[:5]))
        if problem == "regression":
            ref = torch.nn.functional.mse_loss(t, torch.tensor(labels[:5]))
        total, count, _ = loss_sums(logits, labels, valid, Task("seq_cls", problem))
        assert abs(float(total / count) - float(ref)) < 1e-5, problem


def listwise_reference(scores, labels, temperature, min_group_size=2):
    """ms-swift's ListwiseRerankerLoss (swift/loss/reranker.py), transcribed in float64."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    starts = list(np.flatnonzero(labels == 1))
    losses = []
    for k, s in enumerate(starts):
        group = scores[s:(starts[k + 1] if k + 1 < len(starts) else len(scores))] / temperature
        if len(group) < min_group_size:
            continue
        losses.append(np.log(np.sum(np.exp(group - group.max()))) + group.max() - group[0])
    return float(np.mean(losses))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_reranker_losses_equal_ms_swift(temperature):
    import torch

    from jaxswift.train.classify import loss_sums, Task

    rng = np.random.default_rng(2)
    G = 4  # groups of 1 positive + up to 3 negatives; the second group has only 2 documents
    scores = rng.normal(size=(3 * G, 1)).astype(np.float32)
    valid = np.ones(3 * G, np.float32)
    valid[G + 2:2 * G] = 0
    labels = np.zeros((3 * G, 1), np.float32)
    labels[::G] = 1
    kept = valid > 0
    # listwise: ms-swift's groups are what a batch holds (its padding rows do not exist there)
    total, count, _ = loss_sums(scores, labels, valid, Task("reranker", listwise=True, group_size=G,
                                                            temperature=temperature))
    ref = listwise_reference(scores[kept, 0], labels[kept, 0], temperature)
    assert abs(float(total / count) - ref) < 1e-5 and float(count) == 3
    total, count, _ = loss_sums(scores, labels, valid, Task("reranker", group_size=G))
    ref = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(scores[kept, 0]),
                                                               torch.tensor(labels[kept, 0]))
    assert abs(float(total / count) - float(ref)) < 1e-5


# ----------------------------------------------------------------------------------------------- training


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def color_rows():
    return [{"messages": [{"role": "user", "content": f"Which family is the color {name}?"}], "label": label}
            for name, label in COLORS]


@pytest.fixture(scope="module")
def color_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colors")
    rows = color_rows()
    return write_jsonl(folder / "train.jsonl", rows), write_jsonl(folder / "val.jsonl", rows[:4])


def cls_args(model, out, data, **overrides) -> SftArguments:
    train, val = data
    base = dict(model=str(model), output_dir=str(out), dataset=[str(train)], val_dataset=[str(val)],
                task_type="seq_cls", num_labels=3, max_steps=4, logging_steps=1, eval_steps=1000, learning_rate=3e-3,
                per_device_train_batch_size=4, per_device_eval_batch_size=4, max_length=64, demo_question="",
                disable_tqdm=True, save_steps=1000, lr_scheduler_type="constant", lora_dropout=0.0, mesh="1")
    return SftArguments(**{**base, **overrides})


def transformers_val_loss(model, tokenizer, val_path, pad_id):
    """Mean cross-entropy of the validation rows, each run alone through the transformers classifier."""
    import torch

    from jaxswift.data.classify import encode_messages

    losses = []
    for line in val_path.read_text().splitlines():
        row = json.loads(line)
        ids = torch.tensor(encode_messages(tokenizer, row["messages"]))[None].long()
        assert int(ids[0, -1]) != pad_id
        with torch.no_grad():
            out = model(input_ids=ids, labels=torch.tensor([row["label"]]))
        losses.append(float(out.loss))
    return float(np.mean(losses))


@pytest.fixture(scope="module")
def full_run(tiny_chat_model, color_data, tmp_path_factory):
    # the whole training set in every step: the loss falls step after step
    return run_sft(cls_args(tiny_chat_model, tmp_path_factory.mktemp("full"), color_data, tuner_type="full",
                            per_device_train_batch_size=len(COLORS), learning_rate=3e-4), progress=False)


def test_full_tuning_exports_a_folder_transformers_scores_alike(full_run, color_data, smol_tokenizer):
    from transformers import AutoModelForSequenceClassification

    losses = full_run.losses
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[3] < losses[2] < losses[1]
    record = [json.loads(line) for line in (full_run.output_dir / "logging.jsonl").read_text().splitlines()]
    assert any("train/acc" in r or "acc" in r for r in record)
    final_eval = full_run.eval_metrics[4]
    assert set(final_eval) == {"loss", "acc"}
    model = AutoModelForSequenceClassification.from_pretrained(full_run.export_dir).eval()
    assert model.config.num_labels == 3 and model.config.pad_token_id == smol_tokenizer.pad_token_id
    ref = transformers_val_loss(model, smol_tokenizer, color_data[1], model.config.pad_token_id)
    assert abs(ref - final_eval["loss"]) < 1e-4


def test_lora_adapter_loads_in_peft_with_the_same_scores(tiny_chat_model, color_data, smol_tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    result = run_sft(cls_args(tiny_chat_model, tmp_path, color_data, max_steps=3), progress=False)
    config = json.loads((result.export_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_chat_model, num_labels=3, pad_token_id=smol_tokenizer.pad_token_id)
    model = PeftModel.from_pretrained(base, result.export_dir).eval()
    ref = transformers_val_loss(model, smol_tokenizer, color_data[1], smol_tokenizer.pad_token_id)
    assert abs(ref - result.eval_metrics[3]["loss"]) < 1e-4
    # `jaxswift export --adapters DIR` merges it into a classifier folder (served by `jaxswift deploy`)
    from jaxswift.recipes.export import main as export_main

    assert export_main(["--adapters", str(result.export_dir), "--output_dir", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.num_labels == 3 and merged.config.architectures == ["LlamaForSequenceClassification"]
    ref = transformers_val_loss(merged, smol_tokenizer, color_data[1], smol_tokenizer.pad_token_id)
    assert abs(ref - result.eval_metrics[3]["loss"]) < 1e-4


def test_training_continues_from_an_exported_classifier(full_run, color_data, smol_tokenizer, tmp_path):
    """A seq_cls folder trains on with its own head (a near-zero step leaves the exported scores); a different
    --num_labels is refused by name."""
    from transformers import AutoModelForSequenceClassification

    result = run_sft(cls_args(full_run.export_dir, tmp_path / "more", color_data, tuner_type="full", max_steps=1,
                              learning_rate=1e-12), progress=False)
    model = AutoModelForSequenceClassification.from_pretrained(full_run.export_dir).eval()
    ref = transformers_val_loss(model, smol_tokenizer, color_data[1], model.config.pad_token_id)
    assert abs(result.eval_metrics[1]["loss"] - ref) < 1e-4
    with pytest.raises(ConfigError, match="already has a score head of 3 labels"):
        run_sft(cls_args(full_run.export_dir, tmp_path / "bad", color_data, num_labels=4), progress=False)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("label, message", [
    (3, r"train.jsonl:2: field 'label': class 3 is outside --num_labels 3"),
    (1.5, r"train.jsonl:2: field 'label': expected an integer class index .* regression"),
    ([0, 1], r"train.jsonl:2: field 'label': single-label classification expects one class index"),
    (None, r"train.jsonl:2: no 'label' field"),
])
def test_bad_labels_are_named_with_file_and_line(tiny_chat_model, tmp_path, label, message):
    rows = color_rows()[:3]
    rows[1] = {"messages": rows[1]["messages"], **({} if label is None else {"label": label})}
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=message):
        run_sft(cls_args(tiny_chat_model, tmp_path / "out", (train, train)), progress=False)


def test_bad_flags(tiny_chat_model, color_data, tmp_path):
    with pytest.raises(ConfigError, match="--loss_type infonce"):
        run_sft(cls_args(tiny_chat_model, tmp_path, color_data, loss_type="infonce"), progress=False)
    with pytest.raises(ConfigError, match="--packing_length"):
        run_sft(cls_args(tiny_chat_model, tmp_path, color_data, packing_length=128), progress=False)
    with pytest.raises(ConfigError, match="--task_type reranker trains with pointwise_reranker"):
        run_sft(cls_args(tiny_chat_model, tmp_path, color_data, task_type="reranker", num_labels=None,
                         loss_type="cosine_similarity"), progress=False)


def test_labels_of_every_problem_type():
    from jaxswift.data.classify import parse_label

    np.testing.assert_array_equal(parse_label(2, "f:1", 3, "single_label_classification"), [0, 0, 1])
    np.testing.assert_array_equal(parse_label([0, 2], "f:1", 3, "multi_label_classification"), [1, 0, 1])
    np.testing.assert_array_equal(parse_label(0.25, "f:1", 1, "regression"), [0.25])
    np.testing.assert_array_equal(parse_label([0.5, -1], "f:1", 2, "regression"), [0.5, -1])
    with pytest.raises(DataError, match=r"f:1: field 'label': class 5 is outside --num_labels 3"):
        parse_label([0, 5], "f:1", 3, "multi_label_classification")
    with pytest.raises(DataError, match=r"f:1: field 'label': regression with --num_labels 2 expects a list of 2"):
        parse_label(0.5, "f:1", 2, "regression")
    with pytest.raises(DataError, match=r"f:1: field 'label': expected an integer class index"):
        parse_label(True, "f:1", 3, "single_label_classification")


# ----------------------------------------------------------------------------------------------- the server


def test_classify_endpoint(full_run, smol_tokenizer):
    import httpx
    import torch
    from transformers import AutoModelForSequenceClassification

    from jaxswift.data.classify import encode_messages
    from jaxswift.recipes.serve import ServeArguments, build_server
    from server_fixtures import running

    app, _ = build_server(ServeArguments(model=str(full_run.export_dir), served_model_name="colors"))
    model = AutoModelForSequenceClassification.from_pretrained(full_run.export_dir).eval()
    texts = ["Which family is the color red?", "Which family is the color navy?"]
    expected = []
    for t in texts:
        ids = encode_messages(smol_tokenizer, [{"role": "user", "content": t}])
        with torch.no_grad():
            expected.append(torch.softmax(model(input_ids=torch.tensor(ids)[None].long()).logits[0], -1).numpy())
    with running(app) as url:
        reply = httpx.post(f"{url}/v1/classify", json={"model": "colors", "input": texts})
        assert reply.status_code == 200, reply.text
        data = reply.json()["data"]
        np.testing.assert_allclose([d["probs"] for d in data], expected, atol=1e-5)
        assert [d["label"] for d in data] == [f"LABEL_{int(np.argmax(p))}" for p in expected]
        assert data[0]["num_classes"] == 3
        one = httpx.post(f"{url}/v1/classify", json={"input": texts[0]}).json()["data"]
        np.testing.assert_allclose(one[0]["probs"], expected[0], atol=1e-5)
        rerank = httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["d"]})
        assert rerank.status_code == 400 and "3 labels" in rerank.json()["error"]["message"]
        chat = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"})
        assert chat.status_code == 400 and "sequence classifier" in chat.json()["error"]["message"]
        empty = httpx.post(f"{url}/v1/classify", json={"input": []})
        assert empty.status_code == 400 and empty.json()["error"]["param"] == "input"


def test_data_parallel_run_equals_one_device(tiny_chat_model, color_data, tmp_path):
    """The same 4 rows per step split over data=2 (2 per device) give the same losses and evaluation."""
    common = dict(tuner_type="full", max_steps=2, per_device_eval_batch_size=2)
    one = run_sft(cls_args(tiny_chat_model, tmp_path / "one", color_data, per_device_train_batch_size=4, mesh="1",
                           **common), progress=False)
    two = run_sft(cls_args(tiny_chat_model, tmp_path / "two", color_data, per_device_train_batch_size=2,
                           mesh="data=2", **common), progress=False)
    for step in (1, 2):
        assert abs(one.losses[step] - two.losses[step]) < 1e-5
    assert abs(one.eval_metrics[2]["loss"] - two.eval_metrics[2]["loss"]) < 1e-5


def test_regression_scores_like_transformers(tiny_chat_model, tmp_path, smol_tokenizer):
    """--num_labels 1 trains a regression head; transformers' MSE of the exported folder equals the final eval."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from jaxswift.data.classify import encode_messages

    rows = [{"messages": r["messages"], "label": 0.5 * r["label"] - 0.25} for r in color_rows()]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", rows[2:6])
    result = run_sft(cls_args(tiny_chat_model, tmp_path / "out", (train, val), num_labels=1, tuner_type="full",
                              max_steps=1), progress=False)
    model = AutoModelForSequenceClassification.from_pretrained(result.export_dir).eval()
    assert model.config.problem_type == "regression" and model.config.num_labels == 1
    losses = []
    for row in rows[2:6]:
        ids = torch.tensor(encode_messages(smol_tokenizer, row["messages"]))[None].long()
        with torch.no_grad():
            losses.append(float(model(input_ids=ids, labels=torch.tensor([row["label"]])).loss))
    assert set(result.eval_metrics[1]) == {"loss", "mse"}
    assert abs(np.mean(losses) - result.eval_metrics[1]["loss"]) < 1e-5
