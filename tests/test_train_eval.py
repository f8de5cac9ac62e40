"""--eval_dataset in a training recipe: benchmark tasks scored every --eval_steps and at the end, logged next to the
loss (logging.jsonl and TensorBoard), and the last score is what `jaxswift eval` gives the exported adapter."""

from __future__ import annotations

import json

import pytest

from jaxswift.errors import ConfigError, DataError
from jaxswift.train.args import SftArguments


def eval_rows(out_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(out_dir / "logging.jsonl")]
    return {r["step"]: r for r in rows if r.get("split") == "eval"}


def tensorboard_tags(out_dir) -> set[str]:
    """Scalar tags in the run's TensorBoard event files (TFRecords: u64 length, u32 crc, an Event, u32 crc)."""
    from tensorboardX.proto.event_pb2 import Event

    tags = set()
    for path in out_dir.rglob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            n = int.from_bytes(data[pos:pos + 8], "little")
            tags |= {v.tag for v in Event.FromString(data[pos + 12:pos + 12 + n]).summary.value}
            pos += 12 + n + 4
    return tags


def test_sft_scores_tasks_during_training_like_jaxswift_eval(tiny_chat_model, tmp_path):
    from jaxswift.recipes import eval as eval_recipe
    from jaxswift.recipes.sft import train

    out = tmp_path / "sft"
    args = SftArguments(model=str(tiny_chat_model), dataset=["builtin:self_identity#8"], max_steps=2, eval_steps=1,
                        logging_steps=1, learning_rate=1e-2, max_length=128, disable_tqdm=True, demo_question="",
                        eval_dataset=["builtin"], eval_limit=4, output_dir=str(out))
    result = train(args, progress=False)
    logged = eval_rows(out)
    assert sorted(logged) == [1, 2]
    for row in logged.values():
        assert {"identity/regex_match", "arithmetic/exact_match", "general_mcq/acc", "general_mcq/acc_norm"} <= set(row)
    assert result.eval_losses == {}  # no validation set: tasks only

    tags = tensorboard_tags(out)  # the same scalars reach TensorBoard
    assert "eval/general_mcq/acc" in tags and "eval/identity/regex_match" in tags

    standalone = tmp_path / "eval"
    assert eval_recipe.main(["--model", str(tiny_chat_model), "--adapters", str(result.export_dir),
                             "--eval_dataset", "builtin", "--eval_limit", "4", "--seed", "42",
                             "--output_dir", str(standalone)]) == 0
    report = json.loads((standalone / "eval_result.json").read_text())
    scores = {f"{name}/{metric}": value for name, task in report["tasks"].items()
              for metric, value in task["metrics"].items()}
    final = logged[2]
    for key in ("identity/regex_match", "arithmetic/exact_match", "general_mcq/acc", "general_mcq/acc_norm"):
        assert final[key] == pytest.approx(scores[key], abs=1e-9), key


@pytest.mark.parametrize("flags, message", [
    (dict(eval_limit=3), "--eval_limit 3: needs --eval_dataset"),
    (dict(eval_dataset=["builtin"], eval_limit=0), "--eval_limit 0"),
])
def test_bad_eval_flags_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        SftArguments(**flags)


def test_a_bad_task_file_fails_before_the_model_loads(tmp_path):
    from jaxswift.recipes.sft import main

    bad = tmp_path / "mcq.csv"
    bad.write_text("question,A,B\nWhat?,x,y\n")
    with pytest.raises(DataError, match=r"mcq.csv:1: .*answer"):
        main(["--model", str(tmp_path / "no-such-model"), "--eval_dataset", f"general_mcq={bad}"])
