"""Rerankers (issue 21): the classification reranker trained pointwise (full) and listwise (LoRA) on ms-swift's rows,
its export scored alike by transformers, the generative reranker's yes / no score against transformers' causal LM,
and the server: /v1/rerank, /v1/score and /v1/classify on exported folders, generation refused by name."""

import json
import os

import httpx
import numpy as np
import pytest

from jaxswift.errors import ConfigError, DataError
from jaxswift.train.args import SftArguments
from jaxswift.train.sft import run_sft
from server_fixtures import running

QUERIES = [("Which fruit is yellow and curved?", "The banana is a long curved yellow fruit.",
            ["Granite is an igneous rock.", "The violin has four strings."]),
           ("What do bees make?", "Bees make honey from the nectar of flowers.",
            ["Paris is the capital of France.", "Copper conducts electricity."]),
           ("How many legs does a spider have?", "A spider has eight legs.",
            ["The moon orbits the earth.", "Bread is baked in an oven."]),
           ("What is ice made of?", "Ice is frozen water.",
            ["Lions live in prides.", "The piano has 88 keys."])]


def rerank_rows():
    return [{"messages": [{"role": "user", "content": q}],
             "positive_messages": [[{"role": "assistant", "content": pos}]],
             "negative_messages": [[{"role": "assistant", "content": n}] for n in negs]} for q, pos, negs in QUERIES]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def rerank_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rerank")
    rows = rerank_rows()
    return write_jsonl(folder / "train.jsonl", rows), write_jsonl(folder / "val.jsonl", rows[:2])


@pytest.fixture(scope="module")
def two_negatives():
    """ms-swift's MAX_NEGATIVE_SAMPLES, read by the trainer: groups of 1 positive + 2 negatives."""
    old = os.environ.get("MAX_NEGATIVE_SAMPLES")
    os.environ["MAX_NEGATIVE_SAMPLES"] = "2"
    yield
    if old is None:
        del os.environ["MAX_NEGATIVE_SAMPLES"]
    else:
        os.environ["MAX_NEGATIVE_SAMPLES"] = old


def rr_args(model, out, data, **overrides) -> SftArguments:
    train, val = data
    base = dict(model=str(model), output_dir=str(out), dataset=[str(train)], val_dataset=[str(val)],
                task_type="reranker", max_steps=3, logging_steps=1, eval_steps=1000, learning_rate=3e-4,
                per_device_train_batch_size=4, per_device_eval_batch_size=2, max_length=96, demo_question="",
                disable_tqdm=True, save_steps=1000, lr_scheduler_type="constant", lora_dropout=0.0, mesh="1")
    return SftArguments(**{**base, **overrides})


def pairs_of(val_path):
    """(query, document, label) of every validation document, positive first as the trainer groups them."""
    for line in val_path.read_text().splitlines():
        row = json.loads(line)
        query = row["messages"][0]["content"]
        yield query, row["positive_messages"][0][0]["content"], 1.0
        for neg in row["negative_messages"]:
            yield query, neg[0]["content"], 0.0


def hf_pair_logits(model, tokenizer, pairs):
    import torch

    from jaxswift.data.classify import encode_messages

    out = []
    for query, doc, _ in pairs:
        ids = encode_messages(tokenizer, [{"role": "user", "content": query}, {"role": "assistant", "content": doc}])
        with torch.no_grad():
            out.append(model(input_ids=torch.tensor(ids)[None].long()).logits[0].numpy())
    return np.stack(out)


@pytest.fixture(scope="module")
def pointwise_run(tiny_chat_model, rerank_data, two_negatives, tmp_path_factory):
    return run_sft(rr_args(tiny_chat_model, tmp_path_factory.mktemp("pointwise"), rerank_data, tuner_type="full"),
                   progress=False)


def test_pointwise_reranker_export_scores_alike_in_transformers(pointwise_run, rerank_data, smol_tokenizer):
    import torch
    from transformers import AutoModelForSequenceClassification

    assert sorted(pointwise_run.losses) == [1, 2, 3] and pointwise_run.losses[3] < pointwise_run.losses[1]
    model = AutoModelForSequenceClassification.from_pretrained(pointwise_run.export_dir).eval()
    assert model.config.num_labels == 1
    pairs = list(pairs_of(rerank_data[1]))
    logits = hf_pair_logits(model, smol_tokenizer, pairs)[:, 0]
    labels = torch.tensor([label for _, _, label in pairs])
    ref = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(logits), labels)
    assert abs(float(ref) - pointwise_run.eval_metrics[3]["loss"]) < 1e-4


def test_listwise_lora_reranker_trains(tiny_chat_model, rerank_data, two_negatives, tmp_path):
    result = run_sft(rr_args(tiny_chat_model, tmp_path, rerank_data, loss_type="listwise_reranker",
                             learning_rate=3e-3, per_device_train_batch_size=4, max_steps=4), progress=False)
    assert all(np.isfinite(v) for v in result.losses.values()) and result.losses[4] < result.losses[1]
    config = json.loads((result.export_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    assert 0.0 <= result.eval_metrics[4]["acc"] <= 1.0


def test_generative_reranker_scores_with_the_lm_yes_no_logits(tiny_chat_model, smol_tokenizer, rerank_data,
                                                              two_negatives, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    import jaxswift
    from jaxswift.data.classify import encode_messages
    from jaxswift.models.heads import pooled, yes_no_score
    from jaxswift.models.transformer import hidden_states
    from jaxswift.train.classify import answer_token_ids

    yes, no = answer_token_ids(smol_tokenizer)
    model = jaxswift.load_model(str(tiny_chat_model))
    hf = AutoModelForCausalLM.from_pretrained(tiny_chat_model).eval()
    pairs = list(pairs_of(rerank_data[1]))[:2]
    for query, doc, _ in pairs:
        ids = encode_messages(smol_tokenizer, [{"role": "user", "content": query}, {"role": "assistant", "content": doc}])
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor(ids)[None].long()).logits[0, -1].numpy()
        h, _ = hidden_states(model.params, ids[None], model.config)
        ours = float(yes_no_score(model.params, pooled(h, np.array([len(ids) - 1])), model.config, yes, no)[0])
        assert abs(ours - (logits[yes] - logits[no])) < 1e-4
    result = run_sft(rr_args(tiny_chat_model, tmp_path, rerank_data, task_type="generative_reranker",
                             tuner_type="full", per_device_train_batch_size=4), progress=False)
    assert result.losses[3] < result.losses[1]
    assert json.loads((result.export_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_reranker_row_without_positives_is_named(tiny_chat_model, tmp_path):
    rows = rerank_rows()
    rows[1]["positive_messages"] = []
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"train.jsonl:2: no 'positive_messages'"):
        run_sft(rr_args(tiny_chat_model, tmp_path / "out", (train, train)), progress=False)


# ----------------------------------------------------------------------------------------------- the server


def test_rerank_and_score_endpoints(pointwise_run, smol_tokenizer):
    from transformers import AutoModelForSequenceClassification

    from jaxswift.recipes.serve import ServeArguments, build_server

    app, scorer = build_server(ServeArguments(model=str(pointwise_run.export_dir), served_model_name="rr"))
    model = AutoModelForSequenceClassification.from_pretrained(pointwise_run.export_dir).eval()
    query, pos, negs = QUERIES[0]
    docs = [negs[0], pos, negs[1]]
    expected = 1 / (1 + np.exp(-hf_pair_logits(model, smol_tokenizer, [(query, d, 0) for d in docs])[:, 0]))
    with running(app) as url:
        reply = httpx.post(f"{url}/v1/rerank", json={"model": "rr", "query": query, "documents": docs, "top_n": 2})
        assert reply.status_code == 200, reply.text
        results = reply.json()["results"]
        assert len(results) == 2 and [r["index"] for r in results] == list(np.argsort(-expected)[:2])
        for r in results:
            assert abs(r["relevance_score"] - expected[r["index"]]) < 1e-4
            assert r["document"] == {"text": docs[r["index"]]}
        scored = httpx.post(f"{url}/v1/score", json={"text_1": query, "text_2": docs}).json()["data"]
        np.testing.assert_allclose([d["score"] for d in scored], expected, atol=1e-4)
        chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and "reranker" in chat.json()["error"]["message"]
        bad = httpx.post(f"{url}/v1/rerank", json={"query": query, "documents": []})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "documents"
        wrong = httpx.post(f"{url}/v1/rerank", json={"model": "other", "query": query, "documents": docs})
        assert wrong.status_code == 404
    with pytest.raises(ConfigError, match="--max_num_seqs: .* is a sequence classifier"):
        build_server(ServeArguments(model=str(pointwise_run.export_dir), max_num_seqs=4))
