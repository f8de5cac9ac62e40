"""Vision-language SFT speed (issue 15): packing vs no packing on mixed image+text rows, and jaxswift's train step
vs transformers' on the same batch, in one run.

    python benchmarks/train_vlm.py            # Qwen2-VL layout: a SigLIP-base-sized tower (12 x 768, patch 14) + a
                                              # SmolLM2-135M-shaped LLM (30 x 576, vocab 49152), random weights
    python benchmarks/train_vlm.py --smoke    # a tiny model, to check the script

The model is built by transformers (Qwen2VLForConditionalGeneration, random init) and saved; jaxswift loads the same
folder. Both sides run full fine-tuning in float32: forward + backward + global-norm clip (1.0) + AdamW.

1. Packing. `--examples` rows of 0-2 random images (56..224 px) and chats of 10..300 words (`--lengths long_tail`:
   5..350 words, log-uniform: many short chats and a few long ones). Without packing: batches
   of `--rows` examples, each padded to its longest (bucketed as `jaxswift sft` does); with packing: examples packed
   first-fit-decreasing into rows of `--length` (each image's features in its own segment, the tower once per row),
   `--rows` rows a batch. Every batch shape is compiled in an untimed pass first; useful tokens/s = the examples'
   tokens (no padding) over the timed pass's seconds. Per layout it also times the tower + merger alone (forward
   and backward over the same batches' patches, padding included): the part of the step packing does not shrink.
2. Step. `--rows` rows of one 224 x 224 image (64 image tokens) + text, padded to `--step_length`: jaxswift's jitted
   step (make_train_step) vs transformers' (loss.backward, clip_grad_norm_, torch.optim.AdamW), medians over
   `--timed` steps after `--warmup`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny tokenizer and template of the tests

SIGLIP_BASE = dict(depth=12, embed_dim=768, num_heads=12, mlp_ratio=4)  # SigLIP-base: 12 x 768, MLP 3072
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, mrope=[8, 12, 12])  # head_dim 64 -> 32 rotary pairs
TINY_TOWER = dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2)
TINY_LLM = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512, mrope=[2, 3, 3])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=16, help="examples of the packing comparison")
    p.add_argument("--rows", type=int, default=4, help="rows per batch")
    p.add_argument("--length", type=int, default=512, help="packed row length (and the unpacked cap); full "
                   "fine-tuning at 4 x 1024 needs ~26 GB (20 GB of XLA temporaries) and does not fit a 24 GB machine")
    p.add_argument("--lengths", choices=("uniform", "long_tail"), default="uniform",
                   help="chat lengths of the packing comparison: 10..300 words uniform per turn, or 5..350 words "
                        "log-uniform per chat")
    p.add_argument("--step_length", type=int, default=512, help="row length of the step comparison")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timed", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--parts", default="packing,step", help="comma list of packing, step")
    p.add_argument("--smoke", action="store_true", help="tiny model, few examples, short rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.smoke:
        args.examples, args.length, args.step_length, args.timed = 8, 256, 128, 1
    return args


def build_model(folder: Path, smoke: bool):
    """transformers' Qwen2-VL with random weights, saved with the tests' word tokenizer and Qwen's template."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlm_fixtures import QWEN_SPECIAL, QWEN_TEMPLATE, word_tokenizer

    tower, llm = (TINY_TOWER, TINY_LLM) if smoke else (SIGLIP_BASE, SMOLLM2_135M)
    tokenizer = word_tokenizer(QWEN_SPECIAL, QWEN_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    text = {k: v for k, v in llm.items() if k != "mrope"}
    torch.manual_seed(0)
    config = Qwen2VLConfig(
        text_config=dict(**text, max_position_embeddings=4096, tie_word_embeddings=True,
                         rope_parameters=dict(rope_type="default", mrope_section=llm["mrope"], rope_theta=100000.0),
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(**tower, hidden_size=llm["hidden_size"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    model = Qwen2VLForConditionalGeneration(config)
    model.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def write_rows(folder: Path, n: int, seed: int, *, images=None, words=(10, 300), fixed_size=None,
               long_tail: bool = False) -> Path:
    """n rows of `images` (default 0-2) random pictures and chats of random words, as a JSONL with image files.
    Question and answer each draw `words` // 2 uniformly; with long_tail the chat's whole length is drawn
    log-uniformly in `words` (many short chats, a few long ones, as in real SFT sets)."""
    from vlm_fixtures import WORDS, random_image

    rng = random.Random(seed)
    vocab = [w for w in WORDS if w.startswith("w")]
    rows = []
    for i in range(n):
        k = rng.randint(0, 2) if images is None else images
        names = []
        for j in range(k):
            h, w = fixed_size or (28 * rng.randint(2, 8), 28 * rng.randint(2, 8))
            random_image(h, w, seed=1000 * seed + 10 * i + j).save(folder / f"img{i}_{j}.png")
            names.append(f"img{i}_{j}.png")
        if long_tail:
            total = round(math.exp(rng.uniform(math.log(words[0]), math.log(words[1]))))
            asked, answered = total // 2, total - total // 2
        else:
            asked, answered = rng.randint(*words) // 2, rng.randint(*words) // 2
        question = " ".join(rng.choices(vocab, k=asked))
        answer = " ".join(rng.choices(vocab, k=answered))
        rows.append({"messages": [{"role": "user", "content": "<image>" * k + question},
                                  {"role": "assistant", "content": answer}], "images": names})
    path = folder / f"rows{seed}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def jax_step(model, folder: Path, total_steps: int):
    """(jitted train step, initial state): full fine-tuning, AdamW, clip 1.0, constant lr — `jaxswift sft`'s step."""
    import jax

    from jaxswift.train.args import SftArguments
    from jaxswift.train.state import init_train_state
    from jaxswift.train.step import make_train_step
    from jaxswift.train.tuning import build_optimizer, prepare_tuner

    args = SftArguments(model=str(folder), output_dir=tempfile.mkdtemp(), tuner_type="full", freeze_vit=False,
                        freeze_aligner=False, learning_rate=1e-5, lr_scheduler_type="constant", max_grad_norm=1.0)
    tuned = prepare_tuner(model.params, args, model.config)
    optimizer, _ = build_optimizer(args, total_steps, model.config)
    state = init_train_state(tuned.params, tuned.mask, optimizer, args.seed)
    # the step donates its state: one buffer per leaf, none shared with the loaded model (built again per part)
    state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
    return jax.jit(make_train_step(model.config, optimizer), donate_argnums=0), state  # donated, as the trainer does


def run_batches(step, state, batches):
    import jax

    started = time.perf_counter()
    for batch in batches:
        state, metrics = step(state, {k: v[None] for k, v in batch.items()})
        jax.block_until_ready(metrics["loss"])
    return state, time.perf_counter() - started


def packing_part(model, folder: Path, args) -> dict:
    from jaxswift.data.multimodal_batch import assemble_multimodal, load_multimodal_rows
    from jaxswift.data.packing import first_fit_decreasing
    from jaxswift.data.pipeline import bucket_length

    long_tail = args.lengths == "long_tail"
    room = args.length - 150  # two 224-pixel images (128 tokens) and the template besides the words
    words = (5, min(350, room)) if long_tail else (10, min(300, room))
    path = write_rows(folder, args.examples, args.seed, words=words, long_tail=long_tail)
    rows, _ = load_multimodal_rows([str(path)], model.processor, max_length=args.length)
    if len(rows) != args.examples:  # rows over --length are deleted (truncation_strategy delete): say so
        raise SystemExit(f"--length {args.length}: {args.examples - len(rows)} of {args.examples} examples are longer")
    lengths = [int(x) for x in rows.lengths]
    order = list(range(len(lengths)))
    random.Random(args.seed).shuffle(order)
    unpacked = [[[i] for i in order[s:s + args.rows]] for s in range(0, len(order), args.rows)]
    unpacked = [assemble_multimodal(rows, b, bucket_length(max(lengths[i[0]] for i in b), args.length), args.rows)
                for b in unpacked]
    bins = first_fit_decreasing(lengths, args.length)
    packed = [assemble_multimodal(rows, bins[s:s + args.rows], args.length, args.rows)
              for s in range(0, len(bins), args.rows)]
    useful = sum(lengths)
    out = {"examples": len(lengths), "lengths": args.lengths, "length_range": [min(lengths), max(lengths)],
           "rows_with_images": int((rows.patch_counts > 0).sum()), "useful_tokens": useful}
    for name, batches in (("unpacked", unpacked), ("packed", packed)):
        step, state = jax_step(model, folder, 2 * len(batches))
        state, compile_pass = run_batches(step, state, batches)  # every shape compiled once
        state, seconds = run_batches(step, state, batches)
        del state
        out[name] = {"batches": len(batches), "shapes": sorted({b["tokens"].shape[1] for b in batches}),
                     "padded_tokens": int(sum(b["tokens"].size for b in batches)), "seconds": seconds,
                     "useful_tokens_per_s": useful / seconds, "first_pass_seconds": compile_pass,
                     "real_patches": int(rows.patch_counts.sum()),
                     "patch_slots": int(sum(b["pixels"].shape[0] * b["pixels"].shape[1] for b in batches)),
                     "tower_seconds": tower_seconds(model, batches)}
    out["ratio"] = out["packed"]["useful_tokens_per_s"] / out["unpacked"]["useful_tokens_per_s"]
    return out


def tower_seconds(model, batches) -> float:
    """Seconds of the tower and merger alone (forward + backward, per row as the step runs them) over the batches:
    the share of the step that packing the LLM's tokens does not shrink. Each shape is compiled first, untimed."""
    import jax

    from jaxswift.models.vision import VisionInputs, row_image_features

    grad = jax.jit(jax.grad(lambda params, vision: row_image_features(params, vision, model.config).sum()))
    inputs = [VisionInputs(b["pixels"], b["patch_rows_cols"], b["patch_frames"], b["patch_windows"]) for b in batches]
    for vision in inputs:
        jax.block_until_ready(grad(model.params, vision))
    started = time.perf_counter()
    for vision in inputs:
        jax.block_until_ready(grad(model.params, vision))
    return time.perf_counter() - started


def step_part(model, hf_model, folder: Path, args) -> dict:
    import torch

    from jaxswift.data.multimodal_batch import assemble_multimodal, load_multimodal_rows

    path = write_rows(folder, args.rows, args.seed + 1, images=1, fixed_size=(224, 224),
                      words=(args.step_length - 134, args.step_length - 84))  # + 64 image tokens + the template
    rows, _ = load_multimodal_rows([str(path)], model.processor, max_length=args.step_length)
    if len(rows) != args.rows:
        raise SystemExit(f"--step_length {args.step_length}: {args.rows - len(rows)} rows did not fit")
    batch = assemble_multimodal(rows, [[i] for i in range(len(rows.lengths))], args.step_length, args.rows)
    tokens = int((batch["segment_ids"] > 0).sum())

    step, state = jax_step(model, folder, args.warmup + args.timed)
    jax_times = []
    for i in range(args.warmup + args.timed):
        state, seconds = run_batches(step, state, [batch])
        jax_times.append(seconds)
    del state

    torch.set_num_threads(args.threads)
    hf_model.train()
    inputs = hf_inputs(rows, batch, folder)
    optimizer = torch.optim.AdamW(hf_model.parameters(), lr=1e-5, weight_decay=0.0)
    hf_times = []
    for i in range(args.warmup + args.timed):
        started = time.perf_counter()
        loss = hf_model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hf_times.append(time.perf_counter() - started)
    jax_s, hf_s = statistics.median(jax_times[args.warmup:]), statistics.median(hf_times[args.warmup:])
    return {"rows": args.rows, "length": args.step_length, "tokens": tokens, "jaxswift_s": jax_s,
            "transformers_s": hf_s, "jaxswift_first_s": jax_times[0], "ratio": hf_s / jax_s}


def hf_inputs(rows, batch, folder: Path) -> dict:
    """transformers' inputs for the same rows: jaxswift's ids and loss masks (equal to transformers' processor,
    tests/test_vlm_data.py), transformers' own pixel values, right padding with an attention mask."""
    import PIL.Image
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil.from_pretrained(str(folder))
    images = [PIL.Image.open(r.base_dir / name).convert("RGB") for r in rows.rows for name in r.row["images"]]
    pixels = processor(images=images, return_tensors="pt")
    ids = torch.from_numpy(batch["tokens"].astype(np.int64))
    mask = torch.from_numpy((batch["segment_ids"] > 0).astype(np.int64))
    labels = torch.where(torch.from_numpy(np.roll(batch["loss_weights"] > 0, 1, axis=1)), ids, -100)
    placeholders = torch.from_numpy(np.isin(batch["tokens"], rows.processor.cfg.placeholder_ids).astype(np.int64))
    return dict(input_ids=ids, attention_mask=mask, labels=labels, mm_token_type_ids=placeholders,
                pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])


def main(argv=None):
    args = parse_args(argv)
    import jaxswift

    parts = set(args.parts.split(","))
    folder = Path(tempfile.mkdtemp(prefix="train_vlm_"))
    started = time.perf_counter()
    hf_model = build_model(folder, args.smoke)
    model = jaxswift.load_model(str(folder))
    if "step" not in parts:
        del hf_model  # its weights would only crowd the packing runs' memory
    print(f"model: Qwen2-VL layout, tower {'tiny' if args.smoke else 'SigLIP-base-sized (12 x 768)'}, LLM "
          f"{'tiny' if args.smoke else 'SmolLM2-135M-shaped'}; built in {time.perf_counter() - started:.0f} s; "
          f"load {open('/proc/loadavg').read().split()[:3]}", flush=True)
    figures = {"smoke": args.smoke, "loadavg_start": open("/proc/loadavg").read().split()[:3]}
    if "packing" in parts:
        figures["packing"] = p = packing_part(model, folder, args)
        print(f"\npacking ({p['examples']} examples, {p['lengths']} lengths {p['length_range'][0]}.."
              f"{p['length_range'][1]} tokens, {p['useful_tokens']} useful tokens)")
        print("| layout | batches | row lengths | padded tokens | seconds | useful tokens/s | patch slots (real) "
              "| tower fwd+bwd s |")
        print("|---|---:|---|---:|---:|---:|---:|---:|")
        for name in ("unpacked", "packed"):
            r = p[name]
            print(f"| {name} | {r['batches']} | {r['shapes']} | {r['padded_tokens']} | {r['seconds']:.1f} | "
                  f"{r['useful_tokens_per_s']:.1f} | {r['patch_slots']} ({r['real_patches']}) | "
                  f"{r['tower_seconds']:.1f} |")
        print(f"packed / unpacked useful tokens/s: **{p['ratio']:.2f}x** (target >= 2x)", flush=True)
    if "step" in parts:
        figures["step"] = s = step_part(model, hf_model, folder, args)
        print(f"\nstep ({s['rows']} x {s['length']}, one 224 x 224 image a row, {s['tokens']} tokens)")
        print(f"jaxswift {s['jaxswift_s']:.2f} s, transformers {s['transformers_s']:.2f} s: "
              f"**{s['ratio']:.2f}x** (target >= 1.0x); jaxswift's first step (compile) {s['jaxswift_first_s']:.0f} s")
    figures["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
