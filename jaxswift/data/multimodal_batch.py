"""Training batches of image rows: the SFT batch of data/packing.py plus what a vision-language step needs.

Every key is [B, ...] with one entry per row, so a data-parallel mesh splits images together with their rows:

  tokens, targets, loss_weights, segment_ids, positions   [B, T]      as data/packing.py (segments, per-segment shift)
  rope_positions   int32    [B, 3, T]   each example's own M-RoPE positions (restarting at 0 in its segment)
  pixels           float32  [B, P, X]   the row's images / video frames, in placeholder order, then padding patches
  patch_rows_cols  int32    [B, P, 2]   2-D rotary position of each patch in its image
  patch_frames     int32    [B, P]      attention group of each patch: 1, 2, ... per frame of the row; 0 = padding
  patch_windows    int32    [B, P]      Qwen2.5-VL's windows (= patch_frames without windows)

A ViT family (llava, idefics3 / smolvlm: fixed-size images or tiles) has no rope_positions (1-D positions) and,
instead of the patch keys:

  pixels           float32  [B, I, S, X]  the row's images / tiles in placeholder order, then padding tiles
  tile_positions   int32    [B, I, S']    each tile's position-embedding rows (models/vit.vit_inputs)

P (patches per row) is the step's largest row rounded up to a multiple of 64 (few compiled shapes), I (tiles per
row) the largest row's rounded up to a multiple of 4. A packed row
holds several examples end to end: its patches are their images concatenated in the same order, so the k-th image
placeholder of the row takes the k-th image's features, which lie inside that image's own example (segment).

`MultimodalRows` is the random-access source grain reads: it keeps the rows (text and image references) and turns
row i into a `MultimodalExample` on access, so decoding and patchifying run in grain's reader threads, never on the
training thread. One pass at load time measures each example's token and patch counts (the step plan needs the
lengths before any batch is built).
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxswift.data.formats import (DatasetStats, count_rows, iter_rows, parse_dataset_spec, resolve_path,
                                   sample_counts)
from jaxswift.data.multimodal import MultimodalExample, VLMProcessor, encode_multimodal_row
from jaxswift.data.multimodal_vit import ViTVLMProcessor
from jaxswift.data.packing import assemble
from jaxswift.errors import ConfigError, DataError
from jaxswift.models.vision import vision_inputs
from jaxswift.models.vit import vit_inputs

PATCH_BUCKET = 64
TILE_BUCKET = 4
VISION_KEYS = ("rope_positions", "pixels", "patch_rows_cols", "patch_frames", "patch_windows")

SKIP_TOO_LONG = "longer than max_length (image rows are never truncated: truncation would cut image tokens)"
SKIP_NO_LOSS = "without an assistant token to train on"


@dataclasses.dataclass(frozen=True)
class _Row:
    where: str
    row: dict
    base_dir: Path


class MultimodalRows(Sequence[MultimodalExample]):
    """Rows with images, encoded (images decoded and patchified) each time one is read."""

    def __init__(self, rows: list[_Row], processor: VLMProcessor, lengths: Sequence[int],
                 patch_counts: Sequence[int], *, loss_scale: str = "default", system: str | None = None):
        self.rows, self.processor = rows, processor
        self.lengths = np.asarray(lengths, np.int64)
        self.patch_counts = np.asarray(patch_counts, np.int64)
        self.loss_scale, self.system = loss_scale, system

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        r = self.rows[int(i)]
        return encode_multimodal_row(r.row, r.where, self.processor, base_dir=r.base_dir,
                                     loss_scale=self.loss_scale, system=self.system)

    def subset(self, indices: Sequence[int]) -> "MultimodalRows":
        idx = [int(i) for i in indices]
        return MultimodalRows([self.rows[i] for i in idx], self.processor, self.lengths[idx],
                              self.patch_counts[idx], loss_scale=self.loss_scale, system=self.system)


def load_multimodal_rows(specs: list[str], processor: VLMProcessor, *, max_length: int,
                         truncation_strategy: str = "delete", loss_scale: str = "default",
                         system: str | None = None, seed: int = 42) -> tuple[MultimodalRows, DatasetStats]:
    """Every `--dataset` spec (`path#N` samples N rows) read into a `MultimodalRows`; rows longer than max_length
    or without a trained-on token are skipped and counted. Bad rows and images raise DataError naming file, line
    and image."""
    if not specs:
        raise ConfigError("--dataset: no dataset given")
    check_image_truncation(truncation_strategy)
    tally: collections.Counter = collections.Counter()
    rows, lengths, patches, tokens, loss_tokens = [], [], [], 0, 0
    for k, spec in enumerate(specs):
        path, n = parse_dataset_spec(spec)
        base_dir = resolve_path(path).parent
        counts = iter(lambda: 1, None) if n is None else iter(sample_counts(count_rows(path), n, seed + k))
        for (where, row), times in zip(iter_rows(path), counts):
            if times == 0:
                continue
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object (a row with named fields), got {type(row).__name__}")
            example = encode_multimodal_row(row, where, processor, base_dir=base_dir, loss_scale=loss_scale,
                                            system=system)
            outcome = ("kept" if len(example) <= max_length and example.encoded.loss_mask.any()
                       else SKIP_TOO_LONG if len(example) > max_length else SKIP_NO_LOSS)
            tally[outcome] += int(times)
            if outcome != "kept":
                continue
            for _ in range(int(times)):
                rows.append(_Row(where, row, base_dir))
                lengths.append(len(example))
                patches.append(sum(len(p) for p in example.patches))
                tokens += len(example)
                loss_tokens += int(example.encoded.loss_mask.sum())
    skipped = tuple((reason, n) for reason, n in tally.items() if reason != "kept")
    stats = DatasetStats(rows=sum(tally.values()), examples=len(rows), tokens=tokens, loss_tokens=loss_tokens,
                         truncated=0, skipped=skipped)
    return MultimodalRows(rows, processor, lengths, patches, loss_scale=loss_scale, system=system), stats


def tile_arrays(row_patches: Sequence[Sequence[np.ndarray]], cfg, num_rows: int) -> dict[str, np.ndarray]:
    """pixels [B, I, S, X] and tile_positions [B, I, S'] of a ViT family's rows: each image is an array of tiles
    [n, S, X] (one for llava), all the tower's full size."""
    side = cfg.vision.patches_per_side
    row_tiles = [[t for image in images for t in image] for images in row_patches]
    width = max(TILE_BUCKET, -(-max(map(len, row_tiles), default=0) // TILE_BUCKET) * TILE_BUCKET)
    blank = vit_inputs([np.zeros((side * side, cfg.vision.patch_pixels), np.float32)], [(side, side)], cfg.vision)
    pixels = np.zeros((num_rows, width, *blank.pixels.shape[1:]), np.float32)
    positions = np.zeros((num_rows, width, *blank.position_ids.shape[1:]), np.int32)
    for r, tiles in enumerate(row_tiles):
        if tiles:
            v = vit_inputs(tiles, [(side, side)] * len(tiles), cfg.vision)
            pixels[r, :len(tiles)], positions[r, :len(tiles)] = v.pixels, v.position_ids
    return {"pixels": pixels, "tile_positions": positions}


def check_image_truncation(truncation_strategy: str) -> None:
    """Image rows are dropped when too long, never cut: a cut would split an image's tokens."""
    if truncation_strategy != "delete":
        raise ConfigError(f"--truncation_strategy {truncation_strategy}: rows with images can only be dropped when "
                          "too long (delete); cutting them would split an image's tokens")


def patch_budget(counts: Sequence[int]) -> int:
    """Patches per row of a step: the largest row's, rounded up to a multiple of 64 (at least 64)."""
    return max(PATCH_BUCKET, -(-max(counts, default=0) // PATCH_BUCKET) * PATCH_BUCKET)


def assemble_multimodal(source: MultimodalRows, rows: Sequence[Sequence[int]], length: int,
                        num_rows: int | None = None) -> dict[str, np.ndarray]:
    """The batch whose row r holds source[rows[r]] end to end (see the module docstring); `num_rows` > len(rows)
    appends empty rows."""
    cfg = getattr(getattr(source, "processor", None), "cfg", None)
    if cfg is None:
        raise ConfigError("assemble_multimodal needs a source with a `processor` (a MultimodalRows)")
    num_rows = len(rows) if num_rows is None else num_rows
    examples = {i: source[i] for members in rows for i in members}
    batch = assemble({i: e.encoded for i, e in examples.items()}, rows, length, num_rows)
    row_patches = [[p for i in members for p in examples[i].patches] for members in rows]
    if isinstance(source.processor, ViTVLMProcessor):
        return {**batch, **tile_arrays(row_patches, cfg, num_rows)}
    batch["rope_positions"] = np.zeros((num_rows, 3, length), np.int32)
    for r, members in enumerate(rows):
        offset = 0
        for i in members:
            n = len(examples[i])
            batch["rope_positions"][r, :, offset:offset + n] = examples[i].rope_positions
            offset += n
    vision = cfg.vision
    row_grids = [[g for i in members for g in examples[i].grids] for members in rows]
    P = patch_budget([sum(len(p) for p in ps) for ps in row_patches])
    batch["pixels"] = np.zeros((num_rows, P, vision.patch_pixels), np.float32)
    batch["patch_rows_cols"] = np.zeros((num_rows, P, 2), np.int32)
    batch["patch_frames"] = np.zeros((num_rows, P), np.int32)
    batch["patch_windows"] = np.zeros((num_rows, P), np.int32)
    for r, (patches, grids) in enumerate(zip(row_patches, row_grids)):
        if patches:
            v = vision_inputs(patches, grids, vision.merge_size, pad_to=P, window=vision.window)
            batch["pixels"][r], batch["patch_rows_cols"][r] = v.pixels, v.patch_rows_cols
            batch["patch_frames"][r], batch["patch_windows"][r] = v.patch_frames, v.patch_windows
    return batch
