"""--task_type embedding: pooling parity with transformers, the losses against float64 transcriptions of ms-swift's,
training (full and LoRA), the exported folder, /v1/embeddings through the openai client, and bad inputs."""

import base64
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from jaxswift.checkpoints.hf import load_hf_params, read_hf_config
from jaxswift.errors import ConfigError, DataError
from jaxswift.losses.embedding import (contrastive_loss, cosine_similarity_loss, infonce_loss,
                                       online_contrastive_loss)
from jaxswift.models.pooling import embed

# ---------------------------------------------------------------- pooling vs transformers


def _tiny_hf(family: str, folder):
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=80, max_position_embeddings=256)
    config.architectures = [type(AutoModelForCausalLM.from_config(config)).__name__]
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # norms start at 1, biases at 0: randomize so a mis-mapped one cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return AutoModel.from_pretrained(folder, attn_implementation="eager").eval()


def last_token_pool(h, mask):
    """Qwen3-Embedding's reference pooling (its model card), then F.normalize as its usage does."""
    left_padding = mask[:, -1].sum() == mask.shape[0]
    if left_padding:
        pooled = h[:, -1]
    else:
        pooled = h[torch.arange(h.shape[0]), mask.sum(dim=1) - 1]
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def mean_pool(h, mask):
    m = mask[..., None].to(h.dtype)
    return (h * m).sum(dim=1) / m.sum(dim=1)


def _padded(seqs, side):
    T = max(map(len, seqs))
    tokens, mask = np.zeros((len(seqs), T), np.int64), np.zeros((len(seqs), T), np.int64)
    for i, s in enumerate(seqs):
        span = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        tokens[i, span], mask[i, span] = s, 1
    return tokens, mask


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pooled_vectors_equal_transformers_reference_with_padding_on_either_side(family, tmp_path):
    reference = _tiny_hf(family, tmp_path)
    cfg, _ = read_hf_config(tmp_path)
    params = load_hf_params(tmp_path, cfg)
    rng = np.random.RandomState(3)
    seqs = [rng.randint(1, 96, n).tolist() for n in (9, 4, 13)]
    for side in ("left", "right"):
        tokens, mask = _padded(seqs, side)
        with torch.no_grad():
            h = reference(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).last_hidden_state
        for pooling, normalize, expected in (("last", True, last_token_pool(h, torch.tensor(mask))),
                                             ("mean", False, mean_pool(h, torch.tensor(mask)))):
            ours = embed(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32), cfg,
                         pooling=pooling, normalize=normalize)
            np.testing.assert_allclose(np.asarray(ours), expected.numpy(), atol=1e-4, rtol=0,
                                       err_msg=f"{family} {side} padding, {pooling} pooling")


def test_left_and_right_padding_give_the_same_vectors_as_no_padding(tmp_path):
    _tiny_hf("qwen2", tmp_path)
    cfg, _ = read_hf_config(tmp_path)
    params = load_hf_params(tmp_path, cfg)
    seq = np.random.RandomState(5).randint(1, 96, 7)
    alone = embed(params, jnp.asarray(seq[None], jnp.int32), jnp.ones((1, 7), jnp.int32), cfg, pooling="mean")
    for side in ("left", "right"):
        tokens, mask = _padded([seq.tolist(), list(range(1, 12))], side)
        padded = embed(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32), cfg, pooling="mean")
        np.testing.assert_allclose(np.asarray(padded[0]), np.asarray(alone[0]), atol=1e-5)


def test_an_accumulated_step_is_the_mean_of_its_microbatches_losses_and_gradients(tmp_path):
    import jax
    import optax

    from jaxswift.train.embedding import EmbeddingOptions, embedding_loss, make_embedding_step
    from jaxswift.train.state import init_train_state

    _tiny_hf("qwen2", tmp_path)
    cfg, _ = read_hf_config(tmp_path)
    params = load_hf_params(tmp_path, cfg)
    rng = np.random.RandomState(11)
    tokens = rng.randint(1, 96, (2, 2, 3, 8)).astype(np.int32)  # [A, b, S, T]
    segments = np.ones_like(tokens)
    segments[0, 1, 2, 5:] = 0  # some right padding
    batch = {"tokens": tokens, "segment_ids": segments, "doc_mask": np.ones((2, 2, 3), bool),
             "labels": np.zeros((2, 2, 1), np.float32)}
    batch["doc_mask"][1, 0, 2] = False  # a missing hard negative
    opts = EmbeddingOptions(temperature=0.5)
    lr = 0.1
    state = init_train_state(params, jax.tree.map(lambda _: True, params), optax.sgd(lr), seed=0)
    new_state, metrics = jax.jit(make_embedding_step(cfg, optax.sgd(lr), opts))(state, batch)
    micro = [jax.tree.map(lambda a, k=k: a[k], batch) for k in range(2)]
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, m: embedding_loss(p, m, cfg, opts)[0]))
    losses, grads = zip(*[loss_and_grad(params, m) for m in micro])
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)
    expected = jax.tree.map(lambda p, g0, g1: p - lr * (g0 + g1) / 2, params, *grads)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


# ---------------------------------------------------------------- losses vs float64 transcriptions of ms-swift's


def _log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def infonce_reference(groups, temperature, use_batch):
    """ms-swift's InfonceLoss (the loop form, for rows with different numbers of negatives), in float64 numpy:
    groups[i] = [anchor, positive, negatives...]."""
    losses = []
    docs = np.concatenate([g[1:] for g in groups]) if use_batch else None
    offset = 0
    for g in groups:
        if use_batch:
            logits, target = g[0] @ docs.T / temperature, offset
        else:
            logits, target = g[0] @ g[1:].T / temperature, 0
        losses.append(-_log_softmax(logits)[target])
        offset += len(g) - 1
    return float(np.mean(losses))


def infonce_variant_reference(groups, temperature, margin=None, qq=False, dd=False):
    """ms-swift's in-batch InfonceLoss loop with its Qwen3-Embedding options (INFONCE_MASK_FAKE_NEGATIVE with
    INFONCE_FAKE_NEG_MARGIN, INFONCE_INCLUDE_QQ, INFONCE_INCLUDE_DD), in float64 numpy."""
    docs = np.concatenate([g[1:] for g in groups])
    queries = np.stack([g[0] for g in groups])
    losses, length = [], 0
    for idx, g in enumerate(groups):
        qd = g[0] @ docs.T
        threshold = qd[length] + (margin or 0.0)
        parts = [np.where(qd > threshold, -np.inf, qd) if margin is not None else qd]
        if qq:
            qq_vec = g[0] @ queries.T
            qq_vec[idx] = -np.inf
            parts.append(np.where(qq_vec > threshold, -np.inf, qq_vec) if margin is not None else qq_vec)
        if dd:
            dd_vec = g[1] @ docs.T
            dd_vec[length] = -np.inf
            parts.append(dd_vec)
        losses.append(-_log_softmax(np.concatenate(parts) / temperature)[length])
        length += len(g) - 1
    return float(np.mean(losses))


def _normalized(rng, *shape):
    x = rng.randn(*shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("temperature", [0.02, 0.1, 1.0])
@pytest.mark.parametrize("use_batch", [True, False])
def test_infonce_equals_a_float64_transcription_with_in_batch_and_hard_negatives(temperature, use_batch):
    rng = np.random.RandomState(int(temperature * 100) + use_batch)
    counts = [3, 1, 0, 2] if use_batch else [3, 1, 2, 2]  # hard negatives per row (padded to 3, masked)
    groups = [_normalized(rng, 2 + n, 16) for n in counts]
    B, G = len(groups), 1 + max(counts)
    docs = np.zeros((B, G, 16))
    mask = np.zeros((B, G), bool)
    for i, g in enumerate(groups):
        docs[i, :len(g) - 1], mask[i, :len(g) - 1] = g[1:], True
    anchors = np.stack([g[0] for g in groups])
    loss, metrics = infonce_loss(jnp.asarray(anchors, jnp.float32), jnp.asarray(docs, jnp.float32),
                                 jnp.asarray(mask), temperature=temperature, use_batch=use_batch)
    expected = infonce_reference(groups, temperature, use_batch)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)
    pos = np.array([g[0] @ g[1] for g in groups])
    np.testing.assert_allclose(float(metrics["mean_pos"]), pos.mean(), rtol=1e-5)
    negs = np.concatenate([g[2:] @ g[0] for g in groups])
    np.testing.assert_allclose(float(metrics["mean_neg"]), negs.mean(), rtol=1e-5)


@pytest.mark.parametrize("margin, qq, dd", [(0.05, False, False), (None, True, False), (None, False, True),
                                            (0.05, True, True)])
def test_infonce_options_equal_a_float64_transcription(margin, qq, dd):
    rng = np.random.RandomState(17)
    counts = [3, 1, 0, 2]
    groups = [_normalized(rng, 2 + n, 8) for n in counts]
    docs, mask = np.zeros((4, 4, 8)), np.zeros((4, 4), bool)
    for i, g in enumerate(groups):
        docs[i, :len(g) - 1], mask[i, :len(g) - 1] = g[1:], True
    anchors = jnp.asarray(np.stack([g[0] for g in groups]), jnp.float32)
    loss, _ = infonce_loss(anchors, jnp.asarray(docs, jnp.float32), jnp.asarray(mask), temperature=0.1,
                           fake_negative_margin=margin, include_qq=qq, include_dd=dd)
    expected = infonce_variant_reference(groups, 0.1, margin, qq, dd)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert abs(expected - infonce_reference(groups, 0.1, True)) > 1e-3  # the option changes the loss here


def test_pair_losses_equal_float64_transcriptions():
    rng = np.random.RandomState(7)
    a, b = rng.randn(8, 16), rng.randn(8, 16)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    soft = rng.rand(8)
    binary = np.array([1, 0, 1, 1, 0, 0, 1, 0], np.float64)
    d = 1 - cos
    ja, jb = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)

    np.testing.assert_allclose(float(cosine_similarity_loss(ja, jb, jnp.asarray(soft))), np.mean((cos - soft) ** 2),
                               rtol=1e-5)
    expected = np.mean(0.5 * (binary * d ** 2 + (1 - binary) * np.maximum(0.5 - d, 0) ** 2))
    np.testing.assert_allclose(float(contrastive_loss(ja, jb, jnp.asarray(binary))), expected, rtol=1e-5)

    for labels in (binary, np.array([1, 0, 0, 0, 0, 0, 0, 0.]), np.array([0, 1, 1, 1, 1, 1, 1, 1.])):
        negs, poss = d[labels == 0], d[labels == 1]  # sentence-transformers' selection, with boolean indexing
        hard_negs = negs[negs < (poss.max() if len(poss) > 1 else negs.mean())]
        hard_poss = poss[poss > (negs.min() if len(negs) > 1 else poss.mean())]
        expected = (hard_poss ** 2).sum() + (np.maximum(0.5 - hard_negs, 0) ** 2).sum()
        np.testing.assert_allclose(float(online_contrastive_loss(ja, jb, jnp.asarray(labels))), expected,
                                   rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- training, export


TOPICS = [("apples", "a red or green fruit that grows on trees"), ("rivers", "water flowing towards the sea"),
          ("violins", "string instruments played with a bow"), ("granite", "a hard rock made of crystals"),
          ("owls", "birds that hunt at night"), ("bread", "a food baked from flour and water"),
          ("comets", "icy bodies that orbit the sun"), ("tulips", "spring flowers grown from bulbs")]


def write_rows(path, *, negatives=True, label=None, drop_positive_at=None):
    with open(path, "w") as f:
        for i, (topic, fact) in enumerate(TOPICS):
            row = {"messages": [{"role": "user", "content": f"What are {topic}?"}],
                   "positive_messages": [[{"role": "user", "content": f"{topic.capitalize()} are {fact}."}]]}
            if negatives and i % 3:  # rows with 0, 1 and 2 hard negatives
                others = [TOPICS[(i + k) % len(TOPICS)][1] for k in range(1, 1 + i % 3)]
                row["negative_messages"] = [[{"role": "user", "content": f"They are {o}."}] for o in others]
            if label is not None:
                row["label"] = label(i)
            if i == drop_positive_at:
                del row["positive_messages"]
            f.write(json.dumps(row) + "\n")
    return path


def sft_args(*argv):
    from jaxswift.train.args import SftArguments, parse_args

    return parse_args(SftArguments, list(argv))


def run_args(model, data, out, *extra):
    return sft_args("--model", str(model), "--dataset", str(data), "--task_type", "embedding", "--output_dir",
                    str(out), "--mesh", "data=1", "--per_device_train_batch_size", "4", "--max_length", "32", "--logging_steps", "1",
                    "--save_steps", "1000", "--disable_tqdm", "true", "--seed", "0", *extra)


@pytest.fixture(scope="module")
def full_run(tiny_chat_model, tmp_path_factory):
    """Full tuning with infonce (in-batch + hard negatives), 6 steps, a validation split evaluated at the end."""
    from jaxswift.train.sft import run_sft

    root = tmp_path_factory.mktemp("embed_full")
    data = write_rows(root / "rows.jsonl")
    args = run_args(tiny_chat_model, data, root / "out", "--tuner_type", "full", "--learning_rate", "2e-3",
                    "--mesh", "data=2", "--per_device_train_batch_size", "2",
                    "--max_steps", "6", "--val_dataset", str(data), "--per_device_eval_batch_size", "2",
                    "--eval_steps", "1000", "--infonce_temperature", "0.05")
    return run_sft(args, progress=False)


def test_full_tuning_lowers_infonce_and_logs_retrieval_accuracy(full_run):
    losses = list(full_run.losses.values())
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, losses
    assert full_run.options.temperature == 0.05 and full_run.options.use_batch
    final_eval = full_run.eval_metrics[6]
    assert 0.0 <= final_eval["acc"] <= 1.0 and np.isfinite(final_eval["loss"])
    logged = [json.loads(line) for line in (full_run.output_dir / "logging.jsonl").read_text().splitlines()]
    evals = [r for r in logged if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [6] and evals[0]["acc"] == final_eval["acc"]
    assert all("acc" in r and "mean_pos" in r for r in logged if r["split"] == "train")


def test_exported_folder_loads_in_transformers_and_serves_the_same_vectors(full_run):
    from jaxswift import load_model
    from jaxswift.infer.embedding import Embedder, read_embedding_spec

    folder = full_run.export_dir
    spec = read_embedding_spec(folder)
    assert (spec.pooling, spec.normalize) == ("last", True)
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_lasttoken"] and not pooling["pooling_mode_mean_tokens"]
    reference = AutoModel.from_pretrained(folder).eval()
    embedder = Embedder(load_model(str(folder)), spec, max_length=32, max_batch=4)
    texts = ["What are owls?", "Bread is a food.", "Tulips"]
    ids = [embedder.encode(t) for t in texts]
    assert all(i[-1] == embedder.tokenizer.eos_token_id for i in ids)
    ours = embedder.embed(ids)
    tokens, mask = _padded(ids, "left")
    with torch.no_grad():
        h = reference(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).last_hidden_state
    np.testing.assert_allclose(ours, last_token_pool(h, torch.tensor(mask)).numpy(), atol=1e-4)


def test_lora_mean_pooling_with_the_contrastive_loss_and_accumulation_trains_and_writes_the_marker(tiny_chat_model, tmp_path):
    from jaxswift.train.sft import run_sft

    data = write_rows(tmp_path / "rows.jsonl", negatives=False, label=lambda i: i % 2)
    args = run_args(tiny_chat_model, data, tmp_path / "out", "--loss_type", "contrastive", "--embedding_pooling",
                    "mean", "--embedding_normalize", "false", "--lora_rank", "8", "--learning_rate", "1e-2",
                    "--max_steps", "6", "--lora_dropout", "0", "--per_device_train_batch_size", "2",
                    "--gradient_accumulation_steps", "2")
    result = run_sft(args, progress=False)
    losses = list(result.losses.values())
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    assert (result.export_dir / "adapter_config.json").is_file()
    from jaxswift.infer.embedding import read_embedding_spec

    spec = read_embedding_spec(result.export_dir)
    assert (spec.pooling, spec.normalize) == ("mean", False)


# ---------------------------------------------------------------- bad inputs


def test_a_row_without_positives_is_an_error_naming_file_and_line(tiny_chat_model, tmp_path):
    from jaxswift.train.sft import run_sft

    data = write_rows(tmp_path / "rows.jsonl", drop_positive_at=2)
    with pytest.raises(DataError, match=r"rows\.jsonl:3: the row has no positive"):
        run_sft(run_args(tiny_chat_model, data, tmp_path / "out", "--max_steps", "1"), progress=False)


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "a"}], "positive_messages": [[{"role": "user", "content": "b"}],
                                                                            [{"role": "user", "content": "c"}]]},
     "exactly one positive"),
    ({"messages": [{"role": "user", "content": "a"}], "positive_messages": [{"role": "user", "content": "b"}]},
     "expected a list of message lists"),
    ({"positive_messages": [[{"role": "user", "content": "b"}]]}, "needs 'messages'"),
    ({"messages": [{"role": "user", "content": "a"}], "positive_messages": [[{"role": "user", "content": "b"}]],
      "label": 1}, "infonce takes no label"),
    ({"messages": [{"role": "user", "content": " "}], "positive_messages": [[{"role": "user", "content": "b"}]]},
     "no text to embed"),
])
def test_bad_infonce_rows_are_named(row, message, smol_tokenizer):
    from jaxswift.data.embedding import load_embedding_rows

    path = _one_row_file(row)
    with pytest.raises(DataError, match=message):
        load_embedding_rows([str(path)], smol_tokenizer, loss_type="infonce", max_length=64)


@pytest.mark.parametrize("loss_type, extra, message", [
    ("cosine_similarity", {}, "needs a number per row"),
    ("contrastive", {"label": 0.5}, "takes labels 0 or 1"),
    ("online_contrastive", {"label": 1, "negative_messages": [[{"role": "user", "content": "n"}]]},
     "read by --loss_type infonce only"),
])
def test_bad_pair_rows_are_named(loss_type, extra, message, smol_tokenizer):
    from jaxswift.data.embedding import load_embedding_rows

    row = {"messages": [{"role": "user", "content": "a"}], "positive_messages": [[{"role": "user", "content": "b"}]],
           **extra}
    with pytest.raises(DataError, match=message):
        load_embedding_rows([str(_one_row_file(row))], smol_tokenizer, loss_type=loss_type, max_length=64)


_counter = iter(range(10 ** 6))


def _one_row_file(row):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / f"row{next(_counter)}.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return path


def test_bad_flags_are_refused_by_name(monkeypatch):
    from jaxswift.train.embedding import embedding_options

    with pytest.raises(ConfigError, match="--loss_type 'triplet'"):
        embedding_options(sft_args("--task_type", "embedding", "--loss_type", "triplet"))
    with pytest.raises(ConfigError, match="--embedding_pooling 'cls'"):
        embedding_options(sft_args("--task_type", "embedding", "--embedding_pooling", "cls"))
    from jaxswift.train.rlhf_args import RlhfArguments
    from jaxswift.train.sft import check_task_type

    with pytest.raises(ConfigError, match="--infonce_temperature: needs --task_type embedding"):
        check_task_type(sft_args("--infonce_temperature", "0.1"))
    with pytest.raises(ConfigError, match="--embedding_pooling is not used by rlhf"):
        RlhfArguments(embedding_pooling="mean")
    with pytest.raises(ConfigError, match="--infonce_temperature: read by --loss_type infonce only"):
        embedding_options(sft_args("--task_type", "embedding", "--loss_type", "contrastive",
                                   "--infonce_temperature", "0.1"))
    monkeypatch.setenv("INFONCE_TEMPERATURE", "0.3")
    monkeypatch.setenv("INFONCE_USE_BATCH", "false")
    opts = embedding_options(sft_args("--task_type", "embedding"))
    assert (opts.temperature, opts.use_batch) == (0.3, False)
    assert embedding_options(sft_args("--task_type", "embedding", "--infonce_temperature", "0.2")).temperature == 0.2
    monkeypatch.setenv("INFONCE_MASK_FAKE_NEGATIVE", "true")
    with pytest.raises(ConfigError, match="need --infonce_use_batch true"):
        embedding_options(sft_args("--task_type", "embedding"))
    monkeypatch.setenv("INFONCE_USE_BATCH", "true")
    monkeypatch.setenv("INFONCE_INCLUDE_DD", "1")
    opts = embedding_options(sft_args("--task_type", "embedding", "--infonce_fake_neg_margin", "0.2"))
    assert (opts.fake_negative_margin, opts.include_qq, opts.include_dd) == (0.2, False, True)
    monkeypatch.setenv("INFONCE_INCLUDE_QQ", "maybe")
    with pytest.raises(ConfigError, match=r"\$INFONCE_INCLUDE_QQ='maybe': expected true or false"):
        embedding_options(sft_args("--task_type", "embedding"))
    monkeypatch.delenv("INFONCE_MASK_FAKE_NEGATIVE")
    monkeypatch.delenv("INFONCE_INCLUDE_QQ")
    with pytest.raises(ConfigError, match="--infonce_fake_neg_margin: needs --infonce_mask_fake_negative true"):
        embedding_options(sft_args("--task_type", "embedding", "--infonce_fake_neg_margin", "0.2"))


def test_no_batch_infonce_needs_hard_negatives_in_every_row(tiny_chat_model, tmp_path):
    from jaxswift.train.sft import run_sft

    data = write_rows(tmp_path / "rows.jsonl")
    with pytest.raises(DataError, match=r"rows\.jsonl:1: --infonce_use_batch false .* no negative_messages"):
        run_sft(run_args(tiny_chat_model, data, tmp_path / "out", "--max_steps", "1", "--infonce_use_batch", "false"),
                progress=False)


# ---------------------------------------------------------------- /v1/embeddings


@pytest.fixture(scope="module")
def served(full_run):
    """`jaxswift deploy` of the trained folder (found an embedding model by its modules.json), with warmup."""
    from server_fixtures import running

    from jaxswift.recipes.serve import ServeArguments, build_server
    from jaxswift.train.args import parse_args

    args = parse_args(ServeArguments, ["--model", str(full_run.export_dir), "--served_model_name", "tiny-embed",
                                       "--max_model_len", "32", "--max_num_seqs", "4"])
    app, orchestrator = build_server(args)
    assert orchestrator is None
    with running(app) as url:
        yield url, app.state.server.embedder


def test_openai_client_embeddings_equal_jaxswift_pooled_vectors(served):
    import openai

    url, embedder = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    texts = ["What are comets?", "Granite is a hard rock.", "owls", "bread and tulips", "a fifth input"]
    ids = [embedder.encode(t) for t in texts]
    tokens, mask = _padded(ids, "right")
    expected = np.asarray(embed(embedder.model.params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32),
                                embedder.model.config, pooling="last", normalize=True))
    default = client.embeddings.create(model="tiny-embed", input=texts)  # the client asks for base64 by default
    floats = client.embeddings.create(model="tiny-embed", input=texts, encoding_format="float")
    for response in (default, floats):
        assert [d.index for d in response.data] == list(range(5))
        np.testing.assert_allclose(np.array([d.embedding for d in response.data]), expected, atol=1e-5)
    assert floats.usage.prompt_tokens == sum(map(len, ids))
    by_ids = client.embeddings.create(model="tiny-embed", input=ids[:2], encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in by_ids.data]), expected[:2], atol=1e-5)
    one = client.embeddings.create(model="tiny-embed", input=ids[0], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, expected[0], atol=1e-5)
    short = client.embeddings.create(model="tiny-embed", input=texts[:2], dimensions=16, encoding_format="float")
    cut = expected[:2, :16] / np.linalg.norm(expected[:2, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(np.array([d.embedding for d in short.data]), cut, atol=1e-5)


def test_raw_base64_is_little_endian_float32(served):
    import httpx

    url, embedder = served
    body = httpx.post(url + "/v1/embeddings", json={"input": "owls", "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(vector, embedder.embed([embedder.encode("owls")])[0], atol=1e-6)


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "is an embedding model"),
    ("/v1/completions", {"prompt": "hi"}, 400, "is an embedding model"),
    ("/v1/embeddings", {"input": []}, 400, "expected 1 to 2048 inputs"),
    ("/v1/embeddings", {"input": ""}, 400, "empty text"),
    ("/v1/embeddings", {"input": [[1, 2], [1, 2, 10 ** 9]]}, 400, r"input\[1\]: token id 1000000000"),
    ("/v1/embeddings", {"input": ["ok", [1, 2]]}, 400, r"^input"),
    ("/v1/embeddings", {"input": "word " * 40}, 400, "over this server's limit of 32"),
    ("/v1/embeddings", {"input": "owls", "dimensions": 65}, 400, "more than the model's 64"),
    ("/v1/embeddings", {"input": "owls", "model": "other"}, 404, "does not exist"),
    ("/v1/embeddings", {"input": "owls", "encoding_format": "hex"}, 400, "encoding_format"),
])
def test_bad_embedding_requests_get_a_4xx_naming_the_problem(served, path, body, status, message):
    import re

    import httpx

    url, _ = served
    response = httpx.post(url + path, json=body)
    assert response.status_code == status, response.text
    assert re.search(message, response.json()["error"]["message"]), response.json()


def test_deploy_flags_for_embeddings_are_checked(full_run, tiny_chat_model):
    from jaxswift.recipes.serve import ServeArguments, embedding_spec
    from jaxswift.train.args import parse_args

    serve = lambda *a: parse_args(ServeArguments, list(a))  # noqa: E731
    assert embedding_spec(serve("--model", str(tiny_chat_model))) is None  # no modules.json: a generative model
    spec = embedding_spec(serve("--model", str(tiny_chat_model), "--task_type", "embedding",
                                "--embedding_pooling", "mean"))
    assert (spec.pooling, spec.normalize) == ("mean", True)
    with pytest.raises(ConfigError, match="--embedding_pooling: needs an embedding model"):
        embedding_spec(serve("--model", str(tiny_chat_model), "--embedding_pooling", "mean"))
    with pytest.raises(ConfigError, match="--page_size is a generation-engine flag"):
        embedding_spec(serve("--model", str(full_run.export_dir), "--page_size", "32"))
    with pytest.raises(ConfigError, match="--task_type 'seq_cls'"):
        serve("--model", str(tiny_chat_model), "--task_type", "seq_cls")


def test_a_generative_server_refuses_embeddings_by_name(smol_tokenizer):
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from jaxswift.serve.openai import build_app

    orchestrator = SimpleNamespace(engine=SimpleNamespace(), tokenizer=smol_tokenizer)  # never reached
    client = TestClient(build_app(orchestrator, model_name="chatty"))
    response = client.post("/v1/embeddings", json={"input": "hi"})
    assert response.status_code == 400
    assert "'chatty' is a generative model" in response.json()["error"]["message"]


def test_unused_sft_flags_are_refused_and_hard_negatives_are_fixed_per_row():
    from jaxswift.data.embedding import EmbeddingRow, fix_negatives
    from jaxswift.train.embedding import check_embedding_run

    for flag, value in (("--system", "be brief"), ("--loss_chunk_size", "64"), ("--router_aux_loss_coef", "0.1")):
        with pytest.raises(ConfigError, match=f"{flag} is not used by --task_type embedding"):
            check_embedding_run(sft_args("--task_type", "embedding", flag, value))
    rows = [EmbeddingRow((1,), (2,), ((3,), (4,), (5,)), where="f:1"), EmbeddingRow((1,), (2,), ((6,),), where="f:2")]
    fixed = fix_negatives(rows, 2, seed=0)
    assert fixed[0].negatives == ((3,), (4,)) and fixed[1].negatives == ((6,), (6,))
    with pytest.raises(DataError, match="f:3: --infonce_hard_negatives 2 needs negative_messages"):
        fix_negatives([EmbeddingRow((1,), (2,), where="f:3")], 2, seed=0)
