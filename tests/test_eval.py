"""Evaluation: format readers, extraction, packed log-likelihood == plain forward, the CLI's outputs, the
training-time evaluator with LoRA params, and bad inputs (one clear line each)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxswift
from jaxswift.cli import main as cli_main
from jaxswift.errors import ConfigError, DataError
from jaxswift.eval import (
    InProcessTarget,
    evaluate,
    load_task,
    load_tasks,
    make_evaluator,
)
from jaxswift.eval.loglik import encode_pair, loglikelihoods
from jaxswift.eval.scoring import extract, generation, rouge_l


@pytest.fixture(scope="module")
def tiny(tiny_chat_model):
    return jaxswift.load_model(str(tiny_chat_model))


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# formats


def test_format_readers(tmp_path):
    gsm = _write(tmp_path / "gsm.jsonl", json.dumps({"question": "2+2?", "answer": "2+2=4\n#### 4"}) + "\n"
                 + json.dumps({"question": "Big?", "answer": "so\n#### 1,200"}) + "\n")
    arc_hf = {"id": "a", "question": "Sky?", "choices": {"text": ["red", "blue"], "label": ["A", "B"]},
              "answerKey": "B"}
    arc_ai2 = {"question": {"stem": "Sea?", "choices": [{"text": "wet", "label": "1"}, {"text": "dry", "label": "2"}]},
               "answerKey": "1"}
    arc = _write(tmp_path / "arc.jsonl", json.dumps(arc_hf) + "\n" + json.dumps(arc_ai2) + "\n")
    mmlu = _write(tmp_path / "high_school_physics_test.csv", 'What is g?,1,9.8,3,4,B\n"A, b?",w,x,y,z,D\n')
    hs = _write(tmp_path / "hs.jsonl", json.dumps({"activity_label": "Cooking", "ctx_a": "He cuts onions.",
                                                   "ctx_b": "then he", "endings": ["fries them [title] ok", "sleeps"],
                                                   "label": "0"}) + "\n")
    mcq = _write(tmp_path / "mcq.csv", "id,question,A,B,C,answer\n1,Pick two,one,two,three,B\n")
    qa = _write(tmp_path / "qa.jsonl", json.dumps({"query": "Hi?", "response": "Hello there", "system": "Be kind"})
                + "\n")
    tasks = {t.name: t for t in load_tasks([f"gsm8k={gsm}", f"arc={arc}", f"mmlu={mmlu}", f"hellaswag={hs}",
                                            f"general_mcq={mcq}", f"my_qa:general_qa={qa}"])}
    assert [i.answers for i in tasks["gsm8k"].items] == [("4",), ("1200",)]
    assert tasks["gsm8k"].kind == "generate" and tasks["gsm8k"].extract == "gsm8k"
    assert tasks["arc"].items[0].prompt == "Question: Sky?\nAnswer:" and tasks["arc"].items[0].gold == 1
    assert tasks["arc"].items[1].choices == ("wet", "dry") and tasks["arc"].items[1].gold == 0
    assert tasks["mmlu"].items[0].prompt == "What is g?\nA. 1\nB. 9.8\nC. 3\nD. 4\nAnswer:"
    assert tasks["mmlu"].items[1].gold == 3 and tasks["mmlu"].items[0].choices == ("A", "B", "C", "D")
    assert "about high school physics" in tasks["mmlu"].description
    assert tasks["hellaswag"].items[0].prompt == "Cooking: He cuts onions. Then he"
    assert tasks["hellaswag"].items[0].choices == ("fries them. ok", "sleeps")
    assert tasks["general_mcq"].items[0].gold == 1 and tasks["general_mcq"].items[0].choices == ("A", "B", "C")
    assert tasks["my_qa"].items[0].system == "Be kind" and tasks["my_qa"].metric == "rouge_l"


def test_builtin_sets_and_fewshot():
    tasks = load_tasks(["builtin"])
    assert [t.name for t in tasks] == ["identity", "arithmetic", "general_mcq"]
    assert all(len(t.items) >= 20 for t in tasks)
    from jaxswift.eval.tasks import context_text, select

    mcq = select(tasks[2], limit=5, num_fewshot=2)
    assert len(mcq.items) == 5
    a, b = context_text(mcq, 0, seed=0), context_text(mcq, 0, seed=1)
    assert a.endswith(mcq.items[0].prompt) and a.count("Answer:") == 3
    assert a == context_text(mcq, 0, seed=0) and a != b  # seeded, and the seed matters
    assert mcq.items[0].prompt not in a[:-len(mcq.items[0].prompt)]  # an item is never its own example


def test_extraction_and_metrics():
    assert extract("so 3 + 4 = 7\n#### 7", "gsm8k") == "7"
    assert extract("the total is 1,234 apples.", "gsm8k") == "1234"
    assert extract(r"thus \boxed{\frac{1}{2}} done", "boxed") == r"\frac{1}{2}"
    assert extract("5 + 2 = 7", "number") == "7"
    assert generation("It is 7.", ("7",), "exact_match", "number") == ("7", 1.0)
    assert generation("I'm JUNIPER.", ("Juniper",), "regex_match", "none")[1] == 1.0
    assert rouge_l("the cat sat", "the cat sat down") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert rouge_l("dog", "cat") == 0.0


# ---------------------------------------------------------------------------------------------------------------
# scoring in process


def test_packed_loglikelihoods_equal_plain_forward(tiny):
    """Packing, bucketing, prefix sharing and the gathered vocabulary projection change no number."""
    tok = tiny.tokenizer
    pairs = [encode_pair(tok, "The cat sat on the", " mat", None), encode_pair(tok, "The cat sat on the", " hat", None),
             encode_pair(tok, "The cat sat on the", " mat today", None), encode_pair(tok, "One two", " three", None)]
    got = loglikelihoods(tiny.params, tiny.config, pairs, pad_id=0)
    for (ctx, cont), scored in zip(pairs, got):
        ids = jnp.asarray([ctx + cont])
        logp = jax.nn.log_softmax(jaxswift.forward(tiny.params, ids[:, :-1], tiny.config)[0], axis=-1)
        tail = logp[len(ctx) - 1:]
        want = float(sum(tail[j, t] for j, t in enumerate(cont)))
        assert scored.loglik == pytest.approx(want, abs=1e-4)
        assert scored.is_greedy == all(int(jnp.argmax(tail[j])) == t for j, t in enumerate(cont))


def test_make_evaluator_with_lora_params(tiny):
    """The training-time evaluator takes the train state's params: LoRA with B = 0 scores as the base, a trained
    (non-zero) adapter changes the scores."""
    from jaxswift.tuners import lora

    tasks = [t for t in load_tasks(["builtin"]) if t.name in ("general_mcq", "arithmetic")]
    evaluator = make_evaluator(tasks, tiny.tokenizer, tiny.config, limit=4, max_new_tokens=4)
    base = evaluator(tiny.params)
    assert set(base) == {"arithmetic/exact_match", "general_mcq/acc", "general_mcq/acc_norm"}
    with_lora = lora.add_lora(tiny.params, tiny.config, lora.LoraConfig(rank=4, target_modules="all-linear"),
                              jax.random.key(0))
    target = InProcessTarget(with_lora, tiny.config, tiny.tokenizer)
    [zero] = evaluate([tasks[1]], target, limit=4)
    [plain] = evaluate([tasks[1]], InProcessTarget(tiny.params, tiny.config, tiny.tokenizer), limit=4)
    np.testing.assert_allclose([r["logliks"] for r in zero.records], [r["logliks"] for r in plain.records],
                               atol=1e-5)
    moved = jax.tree.map(lambda x: x + 0.5 if x.ndim >= 2 else x, with_lora)
    [changed] = evaluate([tasks[1]], InProcessTarget(moved, tiny.config, tiny.tokenizer), limit=4)
    assert not np.allclose([r["logliks"] for r in changed.records], [r["logliks"] for r in plain.records])
    assert evaluator(with_lora) == base


# ---------------------------------------------------------------------------------------------------------------
# the command


def test_cli_writes_table_json_chart_and_compares(tiny_chat_model, tmp_path, capsys):
    for name, shots in (("a", "0"), ("b", "1")):
        assert cli_main(["eval", "--model", str(tiny_chat_model), "--eval_limit", "3", "--num_fewshot", shots,
                         "--max_new_tokens", "4", "--output_dir", str(tmp_path / name)]) == 0
    out = capsys.readouterr().out
    assert "general_mcq  multiple_choice  acc_norm" in out and "identity" in out
    body = json.loads((tmp_path / "a" / "eval_result.json").read_text())
    assert set(body["tasks"]) == {"identity", "arithmetic", "general_mcq"}
    assert all(t["n"] == 3 == len(t["records"]) for t in body["tasks"].values())
    assert body["tasks"]["general_mcq"]["records"][0]["context"].count("Answer:") == 1
    assert json.loads((tmp_path / "b" / "eval_result.json").read_text())["tasks"]["general_mcq"]["records"][0][
        "context"].count("Answer:") == 2
    assert (tmp_path / "a" / "eval_result.png").read_bytes()[:4] == b"\x89PNG"
    assert cli_main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b"),
                     "--output_dir", str(tmp_path / "cmp")]) == 0
    text = capsys.readouterr().out
    assert "general_mcq/acc" in text and str(tmp_path / "b") in text
    assert (tmp_path / "cmp" / "compare.png").is_file()


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: one line naming the file/line or URL


def _error_line(capsys, argv) -> str:
    assert cli_main(["eval", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_inputs(tmp_path, capsys):
    err = _error_line(capsys, ["--eval_dataset", "squad=x.jsonl"])
    assert "unknown task format 'squad'" in err and "gsm8k" in err
    csv = _write(tmp_path / "mcq.csv", "id,question,A,B,C\n1,Q?,a,b,c\n")
    err = _error_line(capsys, ["--eval_dataset", f"general_mcq={csv}"])
    assert f"{csv}:1" in err and "answer" in err
    mmlu = _write(tmp_path / "m.csv", "Q?,a,b,c,d,B\nQ2?,a,b,c\n")
    assert f"{mmlu}:2" in _error_line(capsys, ["--eval_dataset", f"mmlu={mmlu}"])
    gsm = _write(tmp_path / "g.jsonl", json.dumps({"question": "q", "answer": "4\n#### 4"}) + "\n"
                 + json.dumps({"question": "q", "answer": "no final answer"}) + "\n")
    err = _error_line(capsys, ["--eval_dataset", f"gsm8k={gsm}"])
    assert f"{gsm}:2" in err and "####" in err
    err = _error_line(capsys, ["--eval_url", "http://127.0.0.1:9/v1", "--eval_limit", "1"])
    assert "cannot reach --eval_url http://127.0.0.1:9/v1" in err
    yml = _write(tmp_path / "t.yaml", "task: t\noutput_type: multiple_choice\ndoc_to_text: q\ndoc_to_target: a\n"
                 "doc_to_choice: c\nfilter_list: []\ndataset_kwargs: {data_files: {test: x.jsonl}}\n")
    assert "filter_list not supported" in _error_line(capsys, ["--eval_dataset", str(yml)])


def test_bad_rows_raise_typed_errors(tmp_path):
    with pytest.raises(DataError, match=r"a\.jsonl:1: ARC row needs choices"):
        load_task(f"arc={_write(tmp_path / 'a.jsonl', json.dumps({'question': 'q', 'answerKey': 'A'}))}")
    row = {"activity_label": "x", "ctx_a": "y", "endings": ["a"], "label": 3}
    with pytest.raises(DataError, match=r"h\.jsonl:1: HellaSwag 'label'"):
        load_task(f"hellaswag={_write(tmp_path / 'h.jsonl', json.dumps(row))}")
    with pytest.raises(ConfigError, match="--eval_limit must be >= 1"):
        evaluate(load_tasks(["builtin"])[:1], None, limit=0)
