"""Preference rows with images (DPO, KTO, CPO / SimPO, ORPO, reward models on a vision-language model).

Row formats are data/preference.py's, plus ms-swift's media columns:
  {"messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "A cat."}],
   "rejected_response": "A dog.", "images": ["cat.png"]}
The `<image>` markers sit in the prompt, so the prompt's images are shared by chosen and rejected. ms-swift's
`rejected_images` (the rejected side's prompt shows other images, same text) is honoured; it must hold as many
images as `images` (the prompt's markers are shared), else the row is refused naming file and line.
OpenAI-style content parts (`image_url`, `image`) work in the prompt messages as in SFT rows.

Items stay rows until a batch is built: `MultimodalPreferenceItem.sequences` decodes and patchifies its images
(in grain's reader threads), as data/multimodal_batch.MultimodalRows does for SFT.

The batch is data/preference.assemble_items' plus the vision keys of data/multimodal_batch.py, with one change:
a row's images are stored once however many of its sequences show them (chosen and rejected share the prompt's
pixels, so the tower runs once per pair's images), and `feature_index [B, T]` names, for every placeholder token,
its row in the tower's output for that row. Identical pixels give identical features, so sharing is exact.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxswift.data.formats import (DatasetStats, _maybe_json, _present, count_rows, iter_rows, parse_dataset_spec,
                                   resolve_path, row_media, sample_counts)
from jaxswift.data.multimodal import MultimodalExample, VLMProcessor, encode_multimodal_row
from jaxswift.data.multimodal_batch import SKIP_NO_LOSS, SKIP_TOO_LONG, check_image_truncation, patch_budget
from jaxswift.data.preference import SKIP_EMPTY_REPLY, PreferenceItem, assemble_items, parse_preference_row
from jaxswift.errors import ConfigError, DataError
from jaxswift.models.vision import vision_inputs


@dataclasses.dataclass(frozen=True)
class MultimodalPreferenceItem:
    """An item whose sequences are image rows: `chats[k]` is sequence k's row ({"messages", "images", "videos"}),
    encoded (images decoded) each time `sequences` is read. `length`: its tokens, measured once at load."""

    chats: tuple[dict, ...]
    where: str
    base_dir: Path
    processor: VLMProcessor
    length: int
    label: bool = True
    loss_scale: str = "last_round"
    system: str | None = None

    def __len__(self) -> int:
        return self.length

    @property
    def sequences(self) -> tuple[MultimodalExample, ...]:
        return tuple(_encode(chat, self) for chat in self.chats)


def _encode(chat: dict, item) -> MultimodalExample:
    if not chat["messages"]:  # KTO's stand-in KL sequence (see _kl_chat): one token, nothing scored
        return chat["stand_in"]
    return encode_multimodal_row(chat, item.where, item.processor, base_dir=item.base_dir,
                                 loss_scale=item.loss_scale, system=item.system)


def _side_media(row: dict, where: str) -> tuple[tuple[list, list], tuple[list, list]]:
    """((images, videos) of the chosen side, (images, videos) of the rejected side)."""
    images, videos = row_media(row, where)
    if _present(row, "rejected_videos"):
        raise DataError(f"{where}: 'rejected_videos' is not supported (the rejected side shows the prompt's videos); "
                        "'rejected_images' is")
    if not _present(row, "rejected_images"):
        return (images, videos), (images, videos)
    rejected = _maybe_json(row["rejected_images"], where, "rejected_images")
    rejected = [rejected] if isinstance(rejected, (str, dict)) else rejected
    if not isinstance(rejected, (list, tuple)):
        raise DataError(f"{where}: field 'rejected_images': expected a list of paths or data URLs, got "
                        f"{type(rejected).__name__}")
    if len(rejected) != len(images):
        raise DataError(f"{where}: chosen and rejected carry different image counts ({len(images)} in 'images', "
                        f"{len(rejected)} in 'rejected_images'); the pair shares its prompt's <image> markers, so "
                        "each side needs one image per marker")
    return (images, videos), (list(rejected), videos)


def _chat(messages: list[dict], media: tuple[list, list]) -> dict:
    return {"messages": messages, "images": media[0], "videos": media[1]}


def _measure(chat: dict, where: str, processor, base_dir, loss_scale, system, max_length):
    """(encoded example or None, outcome) of one sequence: images are never cut, so a long one is skipped."""
    reply = chat["messages"][-1]
    if isinstance(reply.get("content"), str) and not reply["content"].strip() and not reply.get("tool_calls"):
        return None, SKIP_EMPTY_REPLY
    example = encode_multimodal_row(chat, where, processor, base_dir=base_dir, loss_scale=loss_scale, system=system)
    if len(example) > max_length:
        return None, SKIP_TOO_LONG
    if not example.encoded.loss_mask.any():
        return None, SKIP_NO_LOSS
    return example, "kept"


def build_multimodal_preference_items(specs: list[str], processor: VLMProcessor, *, kto: bool,
                                      kl_sequences: bool = True, max_length: int,
                                      truncation_strategy: str = "delete", loss_scale: str = "last_round",
                                      system: str | None = None, seed: int = 42):
    """data/preference.build_preference_items for a vision-language model: (items, stats). Each sequence is
    encoded once here (images decoded) to learn its length; a pair whose chosen or rejected side is too long,
    empty or without a scored token is skipped whole and counted. Bad rows and images raise DataError naming the
    file, the line and the image."""
    if not specs:
        raise ConfigError("--dataset: no dataset given")
    check_image_truncation(truncation_strategy)
    tally: collections.Counter = collections.Counter()
    kept = []  # (PreferenceRow, chats, base_dir, lengths, loss tokens)
    for k, spec in enumerate(specs):
        path, n = parse_dataset_spec(spec)
        base_dir = resolve_path(path).parent
        counts = itertools.repeat(1) if n is None else sample_counts(count_rows(path), n, seed + k)
        for (where, row), times in zip(iter_rows(path), counts):
            if not times:
                continue
            parsed = parse_preference_row(_without_media(row), where, kto=kto)  # refuses a non-object row
            chosen_media, rejected_media = _side_media(row, where)
            for pref in parsed:
                if pref.rejected is not None:
                    chats = [_chat(pref.prompt + pref.chosen, chosen_media),
                             _chat(pref.prompt + pref.rejected, rejected_media)]
                else:  # KTO: an unpaired pair's undesirable completion answers the rejected side's prompt
                    unpaired_rejected = pref.label is False and len(parsed) == 2
                    chats = [_chat(pref.prompt + pref.chosen, rejected_media if unpaired_rejected else chosen_media)]
                outcomes = [_measure(c, where, processor, base_dir, loss_scale, system, max_length) for c in chats]
                skipped = next((why for ex, why in outcomes if ex is None), None)
                tally[skipped or "kept"] += int(times)
                if skipped is None:
                    examples = [ex for ex, _ in outcomes]
                    kept += [(pref, chats, base_dir, [len(e) for e in examples],
                              sum(int(e.encoded.loss_mask.sum()) for e in examples))] * int(times)
    items = []
    for i, (pref, chats, base_dir, lengths, _) in enumerate(kept):
        if kto and kl_sequences:
            kl, kl_length = _kl_chat(pref, chats[0], kept[i - 1][0], base_dir, processor, loss_scale, system,
                                     max_length)
            chats, lengths = chats + [kl], lengths + [kl_length]
        items.append(MultimodalPreferenceItem(tuple(chats), pref.where, base_dir, processor, sum(lengths),
                                              True if pref.label is None else pref.label, loss_scale, system))
    skipped = tuple((reason, n) for reason, n in tally.items() if reason != "kept")
    stats = DatasetStats(rows=sum(tally.values()), examples=len(items), tokens=sum(len(i) for i in items),
                         loss_tokens=sum(entry[4] for entry in kept), truncated=0, skipped=skipped)
    return items, stats


def _without_media(row):
    """The row for data/preference's parser, which knows nothing of media columns."""
    if not isinstance(row, dict):
        return row
    return {k: v for k, v in row.items() if k not in ("images", "videos", "rejected_images", "rejected_videos")}


def _kl_chat(pref, chat: dict, previous, base_dir, processor, loss_scale, system, max_length):
    """KTO's mismatched KL sequence (this prompt and its images, the previous example's reply) and its length. When
    it does not fit, a one-token stand-in that scores nothing (it only estimates a mean; the text path cuts it)."""
    kl = _chat(pref.prompt + previous.chosen, (chat["images"], chat["videos"]))
    example = encode_multimodal_row(kl, pref.where, processor, base_dir=base_dir, loss_scale=loss_scale,
                                    system=system)
    if len(example) <= max_length:
        return kl, len(example)
    first = example.encoded.input_ids[:1]
    stand_in = MultimodalExample(dataclasses.replace(example.encoded, input_ids=first,
                                                     loss_mask=np.zeros(1, bool), loss_weights=None),
                                 [], [], np.zeros((3, 1), np.int64))
    return {"messages": [], "stand_in": stand_in}, 1


# ---------------------------------------------------------------- the batch


def _image_key(patches: np.ndarray, grid) -> tuple:
    return tuple(grid), patches.shape, hashlib.sha1(np.ascontiguousarray(patches).tobytes()).hexdigest()


def assemble_multimodal_items(items: Sequence[MultimodalPreferenceItem], rows: Sequence[Sequence[int]], length: int,
                              num_rows: int, items_per_row: int, ref_logps: np.ndarray | None = None) -> dict:
    """assemble_items' arrays plus rope_positions [R, 3, T], the row's distinct images (pixels, patch_rows_cols,
    patch_frames, patch_windows [R, P, ...]) and feature_index [R, T] (see the module docstring)."""
    first = next((items[r[0]] for r in rows if r), None)
    if first is None:
        raise DataError("a preference batch with no item")
    vision_cfg = first.processor.cfg.vision
    encoded = {i: items[i].sequences for members in rows for i in members}
    text_items = {i: PreferenceItem(tuple(e.encoded for e in seqs), items[i].label) for i, seqs in encoded.items()}
    batch = assemble_items(text_items, rows, length, num_rows, items_per_row, ref_logps)
    batch["rope_positions"] = np.zeros((num_rows, 3, length), np.int32)
    batch["feature_index"] = np.zeros((num_rows, length), np.int32)
    per_row = []
    for r, members in enumerate(rows):
        unique: dict[tuple, int] = {}  # image key -> its index among the row's distinct images
        patches, grids, starts, offset = [], [], [], 0  # starts: each distinct image's first feature row
        for seq in (s for i in members for s in encoded[i]):
            n = len(seq)
            batch["rope_positions"][r, :, offset:offset + n] = seq.rope_positions
            rows_of_seq = []
            for p, g in zip(seq.patches, seq.grids):
                key = _image_key(p, g)
                if key not in unique:
                    unique[key] = len(patches)
                    starts.append(sum(len(q) for q in patches) // vision_cfg.merge_size ** 2)
                    patches.append(p)
                    grids.append(g)
                start = starts[unique[key]]
                rows_of_seq.append(np.arange(start, start + len(p) // vision_cfg.merge_size ** 2))
            placeholders = np.flatnonzero(np.isin(seq.encoded.input_ids, first.processor.cfg.placeholder_ids))
            if rows_of_seq:
                batch["feature_index"][r, offset + placeholders] = np.concatenate(rows_of_seq)
            offset += n
        per_row.append((patches, grids))
    P = patch_budget([sum(len(p) for p in ps) for ps, _ in per_row])
    batch["pixels"] = np.zeros((num_rows, P, vision_cfg.patch_pixels), np.float32)
    for key, shape in (("patch_rows_cols", (num_rows, P, 2)), ("patch_frames", (num_rows, P)),
                       ("patch_windows", (num_rows, P))):
        batch[key] = np.zeros(shape, np.int32)
    for r, (patches, grids) in enumerate(per_row):
        if patches:
            v = vision_inputs(patches, grids, vision_cfg.merge_size, pad_to=P, window=vision_cfg.window)
            batch["pixels"][r], batch["patch_rows_cols"][r] = v.pixels, v.patch_rows_cols
            batch["patch_frames"][r], batch["patch_windows"][r] = v.patch_frames, v.patch_windows
    return batch
