"""`jaxswift eval` against lm-evaluation-harness itself: the same task YAML over local JSONL files, lm-eval's `hf`
model (transformers) and jaxswift on the same tiny random model folder: identical acc / acc_norm, per-item
log-likelihoods within 1e-3."""

import json
import random

import numpy as np
import pytest

from jaxswift.cli import main as cli_main

WORDS = ("river stone lamp quietly orange seven garden window under bright paper music cloud "
         "fast little across heavy winter blue table").split()
N_ITEMS = 60

TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def _rows():
    """Choices of 1 to 6 words (so acc_norm's per-character normalization matters), some contexts with trailing
    spaces (lm-eval moves them into the continuation)."""
    rng = random.Random(0)
    rows = []
    for i in range(N_ITEMS):
        question = " ".join(rng.choices(WORDS, k=rng.randint(3, 9))) + (" " if i % 5 == 0 else "")
        choices = [" ".join(rng.choices(WORDS, k=rng.randint(1, 6))) for _ in range(rng.choice((2, 3, 4)))]
        rows.append({"question": question, "choices": choices, "label": rng.randrange(len(choices))})
    return rows


@pytest.fixture(scope="module")
def task_yaml(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_mc")
    data = folder / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    (folder / "tiny_mc.yaml").write_text(TASK_YAML.format(path=data))
    return folder / "tiny_mc.yaml"


def _lm_eval(model_dir, task_yaml):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=["tiny_mc"],
                          task_manager=TaskManager(include_path=str(task_yaml.parent)), batch_size=8,
                          log_samples=True, device="cpu")
    samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    logliks = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return out["results"]["tiny_mc"], logliks, samples


def test_loglik_matches_lm_eval(tiny_chat_model, task_yaml, tmp_path):
    ref_metrics, ref_logliks, ref_samples = _lm_eval(tiny_chat_model, task_yaml)
    assert cli_main(["eval", "--model", str(tiny_chat_model), "--eval_dataset", str(task_yaml),
                     "--output_dir", str(tmp_path)]) == 0
    got = json.loads((tmp_path / "eval_result.json").read_text())["tasks"]["tiny_mc"]
    assert got["n"] == len(ref_logliks) == N_ITEMS
    for record, ref, sample in zip(got["records"], ref_logliks, ref_samples):
        np.testing.assert_allclose(record["logliks"], ref, atol=1e-3)
        assert record["acc"] == sample["acc"] and record["acc_norm"] == sample["acc_norm"], record["where"]
    assert got["metrics"]["acc"] == ref_metrics["acc,none"]
    assert got["metrics"]["acc_norm"] == ref_metrics["acc_norm,none"]
    assert got["metrics"]["acc"] != got["metrics"]["acc_norm"]  # the items tell the two metrics apart
