"""Processors of the ViT vision-language families (llava, idefics3, smolvlm): chat messages with images -> token
ids + the tower's inputs, as transformers' LlavaProcessor / Idefics3Processor / SmolVLMProcessor do it.

The chat template renders each image as the family's `<image>` token; each one is then replaced, in order, by:
  llava:    `<image>` x tokens_per_image (the tower's patches, + the class token, less the first token under the
            default feature strategy);
  idefics3: per tile, row by row, `<fake_token_around_image><row_i_col_j>` + `<image>` x seq_len, a newline after
            each row, then `\\n<fake_token_around_image><global-img>` + `<image>` x seq_len +
            `<fake_token_around_image>` for the global image (an unsplit image: only that last group, without the
            leading newline).
The LLM takes plain 1-D positions (no M-RoPE): `MultimodalPrompt.rope_positions` is None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from jaxswift.data.images import ClipVisionProcessor, Idefics3VisionProcessor, read_processor_config
from jaxswift.data.multimodal import MultimodalPrompt, VLMProcessor
from jaxswift.errors import ConfigError, DataError
from jaxswift.models.vision import VLMConfig
from jaxswift.models.vit import ViTInputs, vit_inputs

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"


class ViTVLMProcessor(VLMProcessor):
    """Tokenizer + image processor of one llava / idefics3 / smolvlm folder (same methods as VLMProcessor)."""

    def __init__(self, cfg: VLMConfig, tokenizer, image_processor):
        self.cfg, self.tokenizer, self.images = cfg, tokenizer, image_processor
        self.image_token = tokenizer.convert_ids_to_tokens(cfg.image_token_id)
        self.video_token = None
        if cfg.family != "llava":
            for token in (FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN):
                if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
                    raise ConfigError(f"{cfg.family}: the tokenizer has no {token} token")

    @classmethod
    def from_folder(cls, folder: str | Path, cfg: VLMConfig, tokenizer, *, min_pixels: int | None = None,
                    max_pixels: int | None = None) -> "ViTVLMProcessor":
        if min_pixels is not None or max_pixels is not None:
            raise ConfigError(f"{folder}: min_pixels / max_pixels bound Qwen2-VL's image tokens; {cfg.family} "
                              f"images always take a fixed number of tokens per image / tile")
        d = read_processor_config(folder)
        where = str(Path(folder) / "preprocessor_config.json")
        if cfg.family == "llava":
            images = ClipVisionProcessor.from_dict(d, cfg.vision.patch_size, where)
            out = images.crop_size or images.resize_to
            if out != (cfg.vision.image_size,) * 2:
                raise ConfigError(f"{where}: the processor makes {out} images (crop_size / size) but the tower takes "
                                  f"{cfg.vision.image_size}x{cfg.vision.image_size}")
        else:
            images = Idefics3VisionProcessor.from_dict(d, cfg.vision.patch_size, where)
            if images.tile != cfg.vision.image_size:
                raise ConfigError(f"{where}: max_image_size.longest_edge ({images.tile}) must equal the tower's "
                                  f"image_size ({cfg.vision.image_size})")
        return cls(cfg, tokenizer, images)

    def image_text(self, grid: tuple[int, int, int]) -> str:
        """What one image's placeholder becomes in the text."""
        image = self.image_token * self.cfg.tokens_per_image
        if self.cfg.family == "llava":
            return image
        _, rows, cols = grid
        whole = f"{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{image}{FAKE_IMAGE_TOKEN}"
        if rows == 0 and cols == 0:
            return whole
        tiles = "".join("".join(f"{FAKE_IMAGE_TOKEN}<row_{r + 1}_col_{c + 1}>{image}" for c in range(cols)) + "\n"
                        for r in range(rows))
        return tiles + "\n" + whole

    def expand(self, text: str, grids: Sequence[tuple[int, int, int]], kinds: Sequence[str],
               where: str = "prompt") -> str:
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(kinds):
            raise DataError(f"{where}: the text has {len(pieces) - 1} image placeholders ({self.image_token}) but "
                            f"{len(kinds)} images were given")
        out = [pieces[0]]
        for grid, piece in zip(grids, pieces[1:]):
            out += [self.image_text(grid), piece]
        return "".join(out)

    def preprocess(self, media: Sequence[tuple[str, Any]], where: str = "prompt"):
        patches, grids = [], []
        for i, (kind, value) in enumerate(media):
            if kind != "image":
                raise DataError(f"{where} {kind} {i}: {self.cfg.family} models take images only")
            p, g = self.images.image(value, f"{where} image {i}")
            patches.append(p)
            grids.append(g)
        return patches, grids

    def encode_text(self, text: str, media: Sequence[tuple[str, Any]], where: str = "prompt") -> MultimodalPrompt:
        patches, grids = self.preprocess(media, where)
        expanded = self.expand(text, grids, [k for k, _ in media], where)
        ids = self.tokenizer.encode(expanded, add_special_tokens=False)
        return MultimodalPrompt(ids, patches, grids, None, 0)

    def expansion_ids(self, placeholder_id: int, grid: tuple[int, int, int]) -> list[int]:
        return self.tokenizer.encode(self.image_text(grid), add_special_tokens=False)

    def rope_positions(self, ids, grids) -> None:
        return None  # the LLM takes 1-D positions

    def markup(self, kind: str) -> str:
        if kind != "image":
            raise DataError(f"{self.cfg.family} models take images only, not {kind}s")
        return self.image_token

    def batch_vision(self, prompts: Sequence[MultimodalPrompt]) -> ViTInputs | None:
        """Every image / tile of the batch, in placeholder order, as one tower batch."""
        tiles = [t for prompt in prompts for p in prompt.patches for t in p]
        if not tiles:
            return None
        side = self.cfg.vision.patches_per_side
        return vit_inputs(tiles, [(side, side)] * len(tiles), self.cfg.vision)


def vit_processor_class(cfg: VLMConfig) -> type[VLMProcessor]:
    """The processor class of a VLM family."""
    return ViTVLMProcessor if cfg.family in ("llava", "idefics3", "smolvlm") else VLMProcessor
