"""A vision-language model's processor: chat messages with images -> token ids + the tower's inputs.

As transformers' processors do it: the chat template renders each image as the family's markup (Qwen2-VL:
`<|vision_start|><|image_pad|><|vision_end|>`), then each placeholder token, in order, is repeated once per LLM
token of its image (grid t*h*w / merge^2), and the pixels are preprocessed (data/images.py).

Messages follow OpenAI's shape: content is a string or a list of parts, `{"type": "text", "text": ...}`,
`{"type": "image_url", "image_url": {"url": "data:..."}}`, `{"type": "image", "image": <path | data URL | PIL>}`,
`{"type": "video", "video": [frames]}`. ms-swift's rows (`<image>` in the text + an `images` list) convert to
parts with `split_image_placeholders`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxswift.data.formats import iter_rows, row_media, row_to_messages
from jaxswift.data.images import QwenVisionProcessor, load_image, read_processor_config
from jaxswift.data.templates import EncodedChat, encode_chat
from jaxswift.errors import DataError
from jaxswift.models.vision import VisionInputs, VLMConfig, rope_index, vision_inputs

IMAGE_PLACEHOLDER = "<image>"  # ms-swift's marker in dataset text
VIDEO_PLACEHOLDER = "<video>"
QWEN_MARKUP = {"image": "<|vision_start|><|image_pad|><|vision_end|>",
               "video": "<|vision_start|><|video_pad|><|vision_end|>"}


@dataclasses.dataclass
class MultimodalPrompt:
    """One sequence: token ids, its M-RoPE positions [3, T] and delta, and its images / videos in text order."""
    ids: list[int]
    patches: list[np.ndarray]
    grids: list[tuple[int, int, int]]
    rope_positions: np.ndarray
    rope_delta: int

    def __len__(self) -> int:
        return len(self.ids)


def split_image_placeholders(text: str, images: Sequence, videos: Sequence = (), where: str = "row") -> list[dict]:
    """ms-swift's `<image>` / `<video>` markers + lists -> OpenAI-style content parts, in order."""
    parts, images, videos = [], list(images), list(videos)
    n_img, n_vid = text.count(IMAGE_PLACEHOLDER), text.count(VIDEO_PLACEHOLDER)
    if n_img != len(images) or n_vid != len(videos):
        raise DataError(f"{where}: {n_img} {IMAGE_PLACEHOLDER} and {n_vid} {VIDEO_PLACEHOLDER} placeholders in the "
                        f"text but {len(images)} images and {len(videos)} videos")
    for piece in re.split(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})", text):
        if piece == IMAGE_PLACEHOLDER:
            parts.append({"type": "image", "image": images.pop(0)})
        elif piece == VIDEO_PLACEHOLDER:
            parts.append({"type": "video", "video": videos.pop(0)})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def message_media(messages: list[dict], *, base_dir=None, where: str = "messages") -> tuple[list, list[dict]]:
    """([("image", PIL) | ("video", [PIL frames])] in order, messages with media parts normalized to
    {"type": "image"} / {"type": "video"} for the chat template)."""
    media, normalized = [], []
    for m_index, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            normalized.append(message)
            continue
        parts = []
        for p_index, part in enumerate(content):
            here = f"{where} message {m_index} part {p_index}"
            if isinstance(part, dict) and part.get("type") in ("image_url", "image", "video"):
                here = f"{where} {part['type'].replace('_url', '')} {len(media)} (message {m_index} part {p_index})"
            if not isinstance(part, dict):
                raise DataError(f"{here}: a content part must be an object, got {type(part).__name__}")
            kind = part.get("type") or next((k for k in ("image_url", "image", "video", "text") if k in part), None)
            if kind in ("image_url", "image"):
                ref = part.get("image_url", part.get("image"))
                media.append(("image", load_image(ref, base_dir=base_dir, where=here)))
                parts.append({"type": "image"})
            elif kind == "video":
                frames = part.get("video")
                if not isinstance(frames, (list, tuple)) or not frames:
                    raise DataError(f"{here}: a video must be a non-empty list of frames (paths or data URLs)")
                media.append(("video", [load_image(f, base_dir=base_dir, where=f"{here} frame {i}")
                                        for i, f in enumerate(frames)]))
                parts.append({"type": "video"})
            elif kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            else:
                raise DataError(f"{here}: unknown content part type {kind!r} (text, image_url, image, video)")
        normalized.append({**message, "content": parts})
    return media, normalized


class VLMProcessor:
    """Tokenizer + image processor of one VLM folder."""

    def __init__(self, cfg: VLMConfig, tokenizer, image_processor: QwenVisionProcessor):
        self.cfg, self.tokenizer, self.images = cfg, tokenizer, image_processor
        self.image_token = tokenizer.convert_ids_to_tokens(cfg.image_token_id)
        self.video_token = tokenizer.convert_ids_to_tokens(cfg.video_token_id)

    @classmethod
    def from_folder(cls, folder: str | Path, cfg: VLMConfig, tokenizer, *, min_pixels: int | None = None,
                    max_pixels: int | None = None) -> "VLMProcessor":
        d = read_processor_config(folder)
        return cls(cfg, tokenizer, QwenVisionProcessor.from_dict(d, min_pixels=min_pixels, max_pixels=max_pixels))

    def expand(self, text: str, grids: Sequence[tuple[int, int, int]], kinds: Sequence[str],
               where: str = "prompt") -> str:
        """Each image / video placeholder token, in order, repeated once per LLM token of its grid."""
        pattern = f"({re.escape(self.image_token)}|{re.escape(self.video_token)})"
        pieces = re.split(pattern, text)
        found = [p for p in pieces if p in (self.image_token, self.video_token)]
        expected = [self.image_token if k == "image" else self.video_token for k in kinds]
        if found != expected:
            raise DataError(f"{where}: the text has {found.count(self.image_token)} image and "
                            f"{found.count(self.video_token)} video placeholders but {kinds.count('image')} images "
                            f"and {kinds.count('video')} videos were given (in this order: {list(kinds)})")
        grids, out = iter(grids), []
        for piece in pieces:
            is_placeholder = piece in (self.image_token, self.video_token)
            out.append(piece * self.images.num_tokens(next(grids)) if is_placeholder else piece)
        return "".join(out)

    def preprocess(self, media: Sequence[tuple[str, Any]], where: str = "prompt"):
        patches, grids = [], []
        for i, (kind, value) in enumerate(media):
            p, g = (self.images.image(value, f"{where} image {i}") if kind == "image"
                    else self.images.video(value, f"{where} video {i}"))
            patches.append(p)
            grids.append(g)
        return patches, grids

    def encode_text(self, text: str, media: Sequence[tuple[str, Any]], where: str = "prompt") -> MultimodalPrompt:
        """Rendered text with one placeholder token per image / video -> the model's inputs."""
        patches, grids = self.preprocess(media, where)
        expanded = self.expand(text, grids, [k for k, _ in media], where)
        ids = self.tokenizer.encode(expanded, add_special_tokens=False)
        positions, delta = rope_index(ids, grids, self.cfg)
        return MultimodalPrompt(ids, patches, grids, positions, delta)

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True, base_dir=None,
                    where: str = "messages") -> MultimodalPrompt:
        media, normalized = message_media(messages, base_dir=base_dir, where=where)
        text = self.tokenizer.apply_chat_template(normalized, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        return self.encode_text(text, media, where)

    def markup(self, kind: str) -> str:
        return QWEN_MARKUP[kind]

    def expansion_ids(self, placeholder_id: int, grid: tuple[int, int, int]) -> list[int]:
        """The ids one image's / video's placeholder token becomes, as `expand` does it to the text."""
        return [placeholder_id] * self.images.num_tokens(grid)

    def rope_positions(self, ids, grids: Sequence[tuple[int, int, int]]) -> np.ndarray | None:
        """The M-RoPE positions [3, T] of a sequence (None for a family with 1-D positions)."""
        return rope_index(ids, grids, self.cfg)[0]

    def batch_vision(self, prompts: Sequence[MultimodalPrompt]) -> VisionInputs | None:
        patches = [p for prompt in prompts for p in prompt.patches]
        grids = [g for prompt in prompts for g in prompt.grids]
        if not patches:
            return None
        # Padding patches (their own frame 0) up to a multiple of 64: fewer compiled shapes across images.
        total = sum(len(p) for p in patches)
        return vision_inputs(patches, grids, self.cfg.vision.merge_size, pad_to=-(-total // 64) * 64,
                             window=self.cfg.vision.window)


# ---------------------------------------------------------------------------------------------------------------
# Dataset rows with images (training examples)


@dataclasses.dataclass
class MultimodalExample:
    """One training row: `encoded` (ids with expanded image tokens, loss mask False on them), the row's images /
    videos as patches and grids in text order, and the M-RoPE positions [3, T] (None: 1-D positions)."""
    encoded: EncodedChat
    patches: list[np.ndarray]
    grids: list[tuple[int, int, int]]
    rope_positions: np.ndarray

    def __len__(self) -> int:
        return len(self.encoded)


def row_messages_with_media(row: dict, where: str) -> list[dict]:
    """The row's messages, with ms-swift `<image>` / `<video>` markers + `images` / `videos` columns turned into
    content parts (media are taken in order across the messages); OpenAI-style parts pass through."""
    return messages_with_media(row_to_messages(row, where), row, where)


def messages_with_media(messages: list[dict], row: dict, where: str, what: str = "the messages") -> list[dict]:
    """`messages` with ms-swift's `<image>` / `<video>` markers in their text turned into content parts that take
    the row's `images` / `videos` in order; the marker and media counts must agree (`what`: where the markers are,
    for the message)."""
    images, videos = row_media(row, where)
    strings = [m["content"] for m in messages if isinstance(m["content"], str)]
    markers_img = sum(text.count(IMAGE_PLACEHOLDER) for text in strings)
    markers_vid = sum(text.count(VIDEO_PLACEHOLDER) for text in strings)
    if markers_img != len(images) or markers_vid != len(videos):
        raise DataError(f"{where}: {markers_img} {IMAGE_PLACEHOLDER} and {markers_vid} {VIDEO_PLACEHOLDER} markers "
                        f"in {what} but {len(images)} images and {len(videos)} videos in the row")
    out = []
    for k, m in enumerate(messages):
        content = m["content"]
        if isinstance(content, str) and (IMAGE_PLACEHOLDER in content or VIDEO_PLACEHOLDER in content):
            n_img, n_vid = content.count(IMAGE_PLACEHOLDER), content.count(VIDEO_PLACEHOLDER)
            content = split_image_placeholders(content, images[:n_img], videos[:n_vid], where=f"{where} message {k}")
            images, videos = images[n_img:], videos[n_vid:]
        out.append({**m, "content": content})
    return out


def encode_multimodal_row(row: dict, where: str, processor: VLMProcessor, *, base_dir=None,
                          loss_scale: str = "default", system: str | None = None) -> MultimodalExample:
    """Row -> MultimodalExample. The chat is encoded with the text path's loss mask (templates.encode_chat) on
    one placeholder token per image, then each placeholder becomes its image's tokens (never trained on): repeated
    (Qwen2-VL, llava) or the tile markup around them (idefics3), which begins and ends with special tokens, so the
    text around it tokenizes as in the whole expanded text; the ids equal transformers' processor on the chat."""
    messages = row_messages_with_media(row, where)
    media, normalized = message_media(messages, base_dir=base_dir, where=where)
    try:
        encoded = encode_chat(processor.tokenizer, normalized, loss_scale=loss_scale, system=system)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    patches, grids = processor.preprocess(media, where)
    cfg = processor.cfg
    is_placeholder = np.isin(encoded.input_ids, cfg.placeholder_ids)
    if int(is_placeholder.sum()) != len(media):
        raise DataError(f"{where}: the chat template wrote {int(is_placeholder.sum())} image/video placeholders for "
                        f"{len(media)} images/videos")
    expansions = [processor.expansion_ids(int(t), g) for t, g in zip(encoded.input_ids[is_placeholder], grids)]
    repeats = np.ones(len(encoded), np.int64)
    repeats[is_placeholder] = [len(e) for e in expansions]
    ids = np.repeat(encoded.input_ids, repeats)
    starts = (np.cumsum(repeats) - repeats)[is_placeholder]
    for start, expansion in zip(starts, expansions):
        ids[start:start + len(expansion)] = expansion
    mask = np.repeat(encoded.loss_mask & ~is_placeholder, repeats)
    weights = None if encoded.loss_weights is None else np.repeat(encoded.loss_weights * ~is_placeholder, repeats)
    positions = processor.rope_positions(ids, grids)
    return MultimodalExample(EncodedChat(ids.astype(np.int32), mask, weights), patches, grids, positions)


def iter_multimodal_examples(path: str | Path, processor: VLMProcessor, **kwargs):
    """Every row of a dataset file as a MultimodalExample; image paths resolve against the file's folder."""
    base_dir = Path(path).parent
    for where, row in iter_rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object (a row with named fields), got {type(row).__name__}")
        yield encode_multimodal_row(row, where, processor, base_dir=base_dir, **kwargs)
