"""Multiple-choice evaluation speed: `jaxswift eval` in process vs lm-evaluation-harness's `hf` model, one run.

    python benchmarks/eval.py                 # 100 items x 4 choices, SmolLM2-135M-Instruct float32
    python benchmarks/eval.py --items 10      # smoke

Both sides score the same task YAML (lm-eval keys, local JSONL) on the same weights: jaxswift's SmolLM2 (from the
embedded GGUF) saved as an HF folder, which lm-eval's `hf` model loads with transformers, float32. Items are
HellaSwag-shaped: a ~40-word context and 4 endings of 6-14 words. Timed: the whole evaluation of the task once the
model is loaded (lm-eval: `simple_evaluate` on a ready HFLM, batch size --batch_size; jaxswift: `evaluate` on a
ready InProcessTarget, first call including its compilation, and a second, warm call). Results are checked equal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

WORDS = ("river stone light garden window paper music yellow quiet morning letter bridge forest simple kitchen "
         "travel winter number silver market corner planet gentle orange button candle harbor pencil thunder").split()


def write_task(folder: Path, items: int) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(items):
        ctx = " ".join(rng.choices(WORDS, k=40)).capitalize()
        endings = [" ".join(rng.choices(WORDS, k=rng.randint(6, 14))) + "." for _ in range(4)]
        rows.append({"ctx": ctx, "endings": endings, "label": rng.randrange(4)})
    (folder / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "bench_mc.yaml").write_text(
        "task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'bench.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: ctx\ndoc_to_choice: endings\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return folder / "bench_mc.yaml"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=8, help="lm-eval's hf batch size")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import jaxswift
    from jaxswift.eval import InProcessTarget, evaluate
    from jaxswift.eval.task_yaml import read_task_yaml

    torch.set_num_threads(os.cpu_count() or 2)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        yaml_path = write_task(tmp, args.items)
        model = jaxswift.load_model("smollm2-135m-instruct")
        jaxswift.save_model(model, tmp / "hf")

        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        lm = HFLM(pretrained=str(tmp / "hf"), dtype="float32", batch_size=args.batch_size, device="cpu")
        manager = TaskManager(include_path=str(tmp))
        t = time.perf_counter()
        ref = simple_evaluate(model=lm, tasks=["bench_mc"], task_manager=manager, log_samples=True)
        ref_s = time.perf_counter() - t

        task = read_task_yaml(yaml_path)
        target = InProcessTarget(model.params, model.config, model.tokenizer)
        t = time.perf_counter()
        [got] = evaluate([task], target)
        cold_s = time.perf_counter() - t
        t = time.perf_counter()
        evaluate([task], target)
        warm_s = time.perf_counter() - t

    samples = sorted(ref["samples"]["bench_mc"], key=lambda s: s["doc_id"])
    diff = max(abs(a - float(r[0])) for rec, s in zip(got.records, samples)
               for a, r in zip(rec["logliks"], s["filtered_resps"]))
    same = got.metrics["acc"] == ref["results"]["bench_mc"]["acc,none"] and \
        got.metrics["acc_norm"] == ref["results"]["bench_mc"]["acc_norm,none"]
    n = args.items * 4
    print(f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, load at start "
          f"{' '.join(f'{x:.2f}' for x in load_start)}, at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{args.items} items x 4 choices ({n} continuations), SmolLM2-135M float32")
    print(f"lm-eval hf (batch {args.batch_size}): {ref_s:.1f} s ({n / ref_s:.1f} continuations/s)")
    print(f"jaxswift, first call (with compile): {cold_s:.1f} s ({n / cold_s:.1f}/s)  ratio {ref_s / cold_s:.2f}x")
    print(f"jaxswift, warm: {warm_s:.1f} s ({n / warm_s:.1f}/s)  ratio {ref_s / warm_s:.2f}x")
    print(f"same acc / acc_norm: {same}; max |loglik diff| {diff:.2e}")


if __name__ == "__main__":
    main()
