"""GRPO rollout placement: whole-step time with rollouts colocated, on a rollout server, and on a server with
--async_generate, in one run; plus what a weight push costs (full sync, LoRA update).

    python benchmarks/grpo_rollout.py                        # SmolLM2-135M-Instruct, 2 prompts x 4, 16 new tokens
    python benchmarks/grpo_rollout.py --model DIR --steps 3  # another model / a quicker run

Each mode is one `jaxswift.recipes.grpo.train` run (LoRA rank 8, loss grpo, beta 0.04, float32) on the same
prompts; the step time is the median interval between consecutive step ends (logging.jsonl's elapsed_s) after the
first (compilation). Server modes start `python -m jaxswift.recipes.rollout` as its own process on a free port; on a
machine with one set of CPU cores the two processes share them, so this measures the protocol's overhead and what
overlap survives, not the speedup of separate devices. The peer (ms-swift's vLLM server mode) needs CUDA; the
comparison here is between jaxswift's own placements, ratio to colocate printed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo import log, machine, prompts, step_durations  # noqa: E402  (the GRPO benchmark's prompts and helpers)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--new_tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="steps per mode (the first is not timed)")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jaxswift.recipes.rollout", "--model", model, "--port", str(port)],
                            env=os.environ.copy())
    return proc, f"http://127.0.0.1:{port}"


def push_costs(model_name: str, url: str) -> dict:
    """Seconds and MB of a full push (every param: the first sync) and of a LoRA rank-8 push (the per-step one)."""
    import jax

    import jaxswift
    from jaxswift.infer.rollout_remote import RolloutClient, host_leaves
    from jaxswift.train.grpo_remote import tuner_description
    from jaxswift.tuners.lora import LoraConfig, add_lora, partition

    model = jaxswift.load_model(model_name, load_tokenizer=False)
    lora_cfg = LoraConfig(rank=8, alpha=32.0, dropout=0.0)
    params = add_lora(model.params, model.config, lora_cfg, jax.random.key(0))
    client = RolloutClient(url, timeout=600)
    client.wait_ready()
    out = {}
    for name, tree, full in (("full", params, True), ("lora", partition(params)[0], False)):
        leaves = host_leaves(tree)
        t0 = time.perf_counter()
        client.push(leaves, 1_000_000 + full, full=full, tuner=tuner_description(lora_cfg))
        out[name] = {"seconds": time.perf_counter() - t0, "MB": sum(v.nbytes for v in leaves.values()) / 1e6}
    return out


def grpo_steps(args, data: Path, out: Path, **mode) -> float:
    from jaxswift.recipes.grpo import train as run_grpo
    from jaxswift.train.grpo_args import GrpoArguments
    from jaxswift.train.logging import read_log

    run_args = GrpoArguments(
        model=args.model, dataset=[str(data)], output_dir=str(out), max_steps=args.steps,
        num_generations=args.generations, per_device_train_batch_size=args.prompts * args.generations,
        max_completion_length=args.new_tokens, temperature=1.0, beta=0.04, loss_type="grpo", lora_rank=8,
        lora_alpha=32, lora_dropout=0.0, gradient_checkpointing=False, logging_steps=1, demo_question="",
        disable_tqdm=True, mesh="1", save_steps=10 ** 9, **mode)
    run_grpo(run_args, progress=False)
    ends = [r["elapsed_s"] for r in read_log(out / "logging.jsonl") if r.get("split") == "train"]
    return statistics.median(step_durations(ends, 1))


def main(argv=None):
    args = parse_args(argv)
    rows = prompts(args.prompts)
    results = {"machine_start": machine(), "settings": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "prompts.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        log("colocate")
        results["colocate"] = grpo_steps(args, data, work / "colocate")
        proc, url = start_server(args.model)
        try:
            results["push"] = push_costs(args.model, url)
            log(f"pushes: {results['push']}")
            log("server")
            results["server"] = grpo_steps(args, data, work / "server", rollout_mode="server", rollout_url=url)
            log("server + async")
            results["server_async"] = grpo_steps(args, data, work / "async", rollout_mode="server", rollout_url=url,
                                                 async_generate=True)
        finally:
            proc.terminate()
            proc.wait(60)
    results["machine_end"] = machine()
    print(json.dumps(results, indent=1))
    base = results["colocate"]
    print("\n| mode | step s (median) | vs colocate |\n|---|---:|---:|")
    for name in ("colocate", "server", "server_async"):
        print(f"| {name} | {results[name]:.2f} | {base / results[name]:.2f}x |")
    for name, p in results["push"].items():
        print(f"push {name}: {p['MB']:.1f} MB in {p['seconds']:.2f} s ({p['MB'] / p['seconds']:.0f} MB/s)")


if __name__ == "__main__":
    main()
