"""Images in: decoding (files, data URLs) and preprocessing as transformers' image processors do it, in numpy/PIL.

Preprocessing reproduces the processors' arithmetic step for step (PIL resampling on uint8 RGB, rescale in float64,
normalize, then the model's patch layout), so pixel values agree with transformers' to float32 rounding; no torch.

Qwen2-VL / Qwen2.5-VL (`QwenVisionProcessor`): `smart_resize` to multiples of patch * merge within
[min_pixels, max_pixels], then patches of [C, temporal_patch, patch, patch] in merge-block order (the 2x2 patches
that the merger joins are adjacent rows). An image is its own frame repeated temporal_patch times; a video is a
list of frames, padded to a multiple of temporal_patch with its last frame.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxswift.errors import ConfigError, DataError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as processor configs spell `resample`


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def _pil():
    try:
        import PIL.Image
    except ImportError:  # pragma: no cover - pillow is a declared dependency
        raise ConfigError("images need Pillow: pip install pillow") from None
    return PIL.Image


def to_rgb(image):
    """RGB, compositing any transparency onto white (as transformers' convert_to_rgb does)."""
    Image = _pil()
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def load_image(ref, *, base_dir: str | Path | None = None, where: str = "image"):
    """A PIL RGB image from a path (relative to base_dir), a `data:image/...;base64,` URL, raw bytes or a PIL image.

    http(s) URLs are refused: nothing is ever downloaded. Every failure names `where` and the image.
    """
    Image = _pil()
    if isinstance(ref, Image.Image):
        return to_rgb(ref)
    if isinstance(ref, dict):  # {"url": ...} of OpenAI's image_url part, {"path": ...} / {"bytes": ...} of datasets
        value = ref.get("url") or ref.get("path") or ref.get("bytes") or ref.get("image")
        if value is None:
            raise DataError(f"{where}: an image object needs 'url', 'path' or 'bytes', got keys {sorted(ref)}")
        return load_image(value, base_dir=base_dir, where=where)
    if isinstance(ref, (bytes, bytearray)):
        return _decode(bytes(ref), f"{where} (inline bytes)")
    if not isinstance(ref, str) or not ref:
        raise DataError(f"{where}: an image must be a path or a data URL, got {type(ref).__name__} {ref!r:.60}")
    if ref.startswith(("http://", "https://")):
        raise DataError(f"{where}: image URL {ref[:80]!r} refused: jaxswift never downloads; pass a local path or a "
                        f"base64 data URL (data:image/png;base64,...)")
    if ref.startswith("data:"):
        return _decode(data_url_bytes(ref, where), f"{where} (data URL)")
    path = Path(ref)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.is_file():
        raise DataError(f"{where}: image file {str(path)!r} not found")
    return _decode(path.read_bytes(), f"{where} ({path})")


def data_url_bytes(url: str, where: str = "image") -> bytes:
    """The encoded image bytes of a `data:image/<type>;base64,<data>` URL; DataError naming `where` otherwise."""
    header, sep, payload = url.partition(",")
    if not url.startswith("data:") or not sep or not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise DataError(f"{where}: a data URL must look like data:image/<type>;base64,<data>, got {url[:40]!r}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DataError(f"{where}: invalid base64 in image data URL ({e})") from None


def _decode(data: bytes, where: str):
    Image = _pil()
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise DataError(f"{where}: not a readable image ({type(e).__name__}: {e})") from None
    return to_rgb(image)


def image_to_data_url(image, fmt: str = "PNG") -> str:
    """A PIL image as a base64 data URL (for OpenAI-style messages)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


# ---------------------------------------------------------------------------------------------------------------
# Shared steps (PIL resize on uint8, rescale in float64, normalize), channels first


def resize_uint8(image, height: int, width: int, resample: int = BICUBIC) -> np.ndarray:
    """[3, height, width] uint8: PIL resampling of the uint8 image, as transformers' PIL backend does."""
    return np.moveaxis(np.asarray(image.resize((width, height), resample=resample)), -1, 0)


def rescale_normalize(image_CHW: np.ndarray, scale: float | None, mean, std) -> np.ndarray:
    x = image_CHW.astype(np.float64)
    if scale is not None:
        x = (x * scale).astype(np.float32)
    if mean is not None:
        mean, std = np.asarray(mean, np.float32)[:, None, None], np.asarray(std, np.float32)[:, None, None]
        x = ((x - mean) / std).astype(np.float32)
    return x.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
                 where: str = "image") -> tuple[int, int]:
    """(height, width), both multiples of `factor`, with height * width in [min_pixels, max_pixels] and the aspect
    ratio kept as closely as possible (Qwen2-VL's rule)."""
    if min(height, width) <= 0:
        raise DataError(f"{where}: empty image ({width}x{height})")
    if max(height, width) / min(height, width) > 200:
        raise DataError(f"{where}: aspect ratio {max(height, width) / min(height, width):.0f}:1 is over 200:1 "
                        f"({width}x{height})")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclasses.dataclass(frozen=True)
class QwenVisionProcessor:
    """Qwen2-VL's image processor (also Qwen2.5-VL's). `max_pixels` / `min_pixels` bound the image tokens: an image
    becomes about pixels / (patch * merge)^2 tokens."""
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = BICUBIC

    def __post_init__(self):
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError(f"need 0 < min_pixels <= max_pixels, got min_pixels={self.min_pixels}, "
                              f"max_pixels={self.max_pixels}")

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "QwenVisionProcessor":
        """From a preprocessor_config.json dict; overrides (e.g. max_pixels=...) win over the file."""
        size = d.get("size") or {}
        fields = dict(
            patch_size=d.get("patch_size"), temporal_patch_size=d.get("temporal_patch_size"),
            merge_size=d.get("merge_size"), min_pixels=d.get("min_pixels", size.get("shortest_edge")),
            max_pixels=d.get("max_pixels", size.get("longest_edge")),
            image_mean=tuple(d["image_mean"]) if "image_mean" in d else None,
            image_std=tuple(d["image_std"]) if "image_std" in d else None,
            rescale_factor=d.get("rescale_factor"), do_resize=d.get("do_resize"), do_rescale=d.get("do_rescale"),
            do_normalize=d.get("do_normalize"), resample=d.get("resample"))
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**{k: v for k, v in fields.items() if v is not None})

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def target_size(self, height: int, width: int, where: str = "image") -> tuple[int, int]:
        if not self.do_resize:
            if height % self.factor or width % self.factor:
                raise DataError(f"{where}: with do_resize=false the image ({width}x{height}) must be a multiple "
                                f"of {self.factor} pixels on each side")
            return height, width
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels, where)

    def _frame(self, image, height: int, width: int) -> np.ndarray:
        if (image.height, image.width) != (height, width):
            pixels = resize_uint8(image, height, width, self.resample)
        else:
            pixels = np.moveaxis(np.asarray(image), -1, 0)
        return rescale_normalize(pixels, self.rescale_factor if self.do_rescale else None,
                                 self.image_mean if self.do_normalize else None, self.image_std)

    def patchify(self, frames_FCHW: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """[F, C, H, W] frames -> (patches [t*h*w, C*tp*p*p], grid (t, h, w)); F is padded to a multiple of the
        temporal patch with the last frame."""
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -len(frames_FCHW) % tp:
            frames_FCHW = np.concatenate([frames_FCHW, np.repeat(frames_FCHW[-1:], pad, axis=0)])
        F, C, H, W = frames_FCHW.shape
        t, h, w = F // tp, H // p, W // p
        x = frames_FCHW.reshape(t, tp, C, h // m, m, p, w // m, m, p)
        # (t, h-blocks, w-blocks, merge rows, merge cols, C, tp, p, p): one merge block's patches are adjacent.
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return np.ascontiguousarray(x.reshape(t * h * w, C * tp * p * p), np.float32), (t, h, w)

    def image(self, image, where: str = "image") -> tuple[np.ndarray, tuple[int, int, int]]:
        """One PIL image -> (patches, (1, h, w))."""
        height, width = self.target_size(image.height, image.width, where)
        frame = self._frame(image, height, width)
        return self.patchify(np.repeat(frame[None], self.temporal_patch_size, axis=0))

    def video(self, frames: Sequence, where: str = "video") -> tuple[np.ndarray, tuple[int, int, int]]:
        """A list of PIL frames (same size) -> (patches, (t, h, w)). Frames are resized as the first one is."""
        if not frames:
            raise DataError(f"{where}: a video needs at least one frame")
        sizes = {(f.height, f.width) for f in frames}
        if len(sizes) > 1:
            raise DataError(f"{where}: video frames differ in size ({sorted(sizes)})")
        height, width = self.target_size(frames[0].height, frames[0].width, where)
        return self.patchify(np.stack([self._frame(f, height, width) for f in frames]))

    def num_tokens(self, grid_thw) -> int:
        """Placeholder tokens in the text for one image / video of this grid."""
        t, h, w = grid_thw
        return t * h * w // self.merge_size ** 2


def read_processor_config(folder: str | Path) -> dict:
    """preprocessor_config.json of a model folder ({} when absent)."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None


# ---------------------------------------------------------------------------------------------------------------
# CLIP / SigLIP (llava) and Idefics3 / SmolVLM: fixed-size images (or tiles) cut into P patches of C * p * p values


LANCZOS = 1  # PIL.Image.Resampling.LANCZOS


def vit_patches(image_CHW: np.ndarray, patch_size: int) -> np.ndarray:
    """[C, H, W] -> [H/p * W/p, C*p*p]: patches row by row, each flattened as the patch Conv2d's kernel is."""
    C, H, W = image_CHW.shape
    p = patch_size
    if H % p or W % p:
        raise DataError(f"image of {W}x{H} pixels is not a whole number of {p}x{p} patches")
    x = image_CHW.reshape(C, H // p, p, W // p, p).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(x.reshape((H // p) * (W // p), C * p * p), np.float32)


def _size_dict(value, where: str, key: str) -> dict:
    """A processor size entry: {"shortest_edge": n}, {"height": h, "width": w}, or a bare int (older files)."""
    if isinstance(value, int):
        return {"shortest_edge": value} if key == "size" else {"height": value, "width": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be an object or an int, got {value!r}")
    return value


def center_crop_uint8(pixels_CHW: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' center_crop: the middle height x width, zero-padding first where the image is smaller."""
    C, H, W = pixels_CHW.shape
    top, left = (H - height) // 2, (W - width) // 2
    if top >= 0 and left >= 0:
        return pixels_CHW[:, top:top + height, left:left + width]
    new_h, new_w = max(height, H), max(width, W)
    padded = np.zeros((C, new_h, new_w), pixels_CHW.dtype)
    pad_top, pad_left = math.ceil((new_h - H) / 2), math.ceil((new_w - W) / 2)
    padded[:, pad_top:pad_top + H, pad_left:pad_left + W] = pixels_CHW
    top, left = top + pad_top, left + pad_left
    return padded[:, top:top + height, left:left + width]


@dataclasses.dataclass(frozen=True)
class ClipVisionProcessor:
    """CLIPImageProcessor (resize the shortest edge, center crop) and SiglipImageProcessor (resize to a fixed
    height x width) in one: `image` gives one [1, C, H, W] image and its patches."""
    patch_size: int
    shortest_edge: int | None = 224  # resize so the shorter side is this (CLIP), or
    resize_to: tuple[int, int] | None = None  # (height, width) exactly (SigLIP)
    crop_size: tuple[int, int] | None = (224, 224)  # center crop (height, width); None = no crop
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = BICUBIC

    @classmethod
    def from_dict(cls, d: dict, patch_size: int, where: str = "preprocessor_config.json") -> "ClipVisionProcessor":
        if d.get("do_pad"):
            raise ConfigError(f"{where}: do_pad (LlavaImageProcessor's pad-to-square) is not supported; the CLIP / "
                              f"SigLIP processors' resize + center crop are")
        size = _size_dict(d.get("size", {"shortest_edge": 224}), where, "size")
        if "shortest_edge" in size and "longest_edge" not in size:
            shortest, resize_to = int(size["shortest_edge"]), None
        elif "height" in size and "width" in size:
            shortest, resize_to = None, (int(size["height"]), int(size["width"]))
        else:
            raise ConfigError(f"{where}: size {size} is not supported (shortest_edge, or height and width)")
        crop = None
        if d.get("do_center_crop", "crop_size" in d and shortest is not None):
            c = _size_dict(d.get("crop_size", 224), where, "crop_size")
            crop = (int(c["height"]), int(c["width"]))
        fields = dict(shortest_edge=shortest, resize_to=resize_to,
                      image_mean=tuple(d["image_mean"]) if "image_mean" in d else None,
                      image_std=tuple(d["image_std"]) if "image_std" in d else None,
                      rescale_factor=d.get("rescale_factor"), do_resize=d.get("do_resize"),
                      do_rescale=d.get("do_rescale"), do_normalize=d.get("do_normalize"), resample=d.get("resample"))
        return cls(patch_size=patch_size, crop_size=crop, **{k: v for k, v in fields.items() if v is not None})

    def _resized(self, image) -> np.ndarray:
        if not self.do_resize:
            return np.moveaxis(np.asarray(image), -1, 0)
        if self.resize_to is not None:
            return resize_uint8(image, *self.resize_to, self.resample)
        short, long = sorted((image.width, image.height))
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        height, width = (new_long, new_short) if image.width <= image.height else (new_short, new_long)
        return resize_uint8(image, height, width, self.resample)

    def pixels(self, image, where: str = "image") -> np.ndarray:
        """[1, C, H, W] float32, as the transformers processor's pixel_values."""
        if min(image.width, image.height) <= 0:
            raise DataError(f"{where}: empty image ({image.width}x{image.height})")
        x = self._resized(image)
        if self.crop_size is not None:
            x = center_crop_uint8(x, *self.crop_size)
        x = rescale_normalize(x, self.rescale_factor if self.do_rescale else None,
                              self.image_mean if self.do_normalize else None, self.image_std)
        return x[None]

    def image(self, image, where: str = "image") -> tuple[np.ndarray, tuple[int, int, int]]:
        """(patches [1, P, X], grid (1, rows, cols) of patches)."""
        x = self.pixels(image, where)[0]
        return vit_patches(x, self.patch_size)[None], (1, x.shape[1] // self.patch_size, x.shape[2] // self.patch_size)


def _rescale_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    """Idefics3's resize: the longest edge to max_len, the other side kept in ratio and rounded up to even."""
    aspect_ratio = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect_ratio)
        height += height % 2
    else:
        height = max_len
        width = int(height * aspect_ratio)
        width += width % 2
    return max(height, 1), max(width, 1)


def _scale_below(height: int, width: int, max_len: int) -> tuple[int, int]:
    aspect_ratio = width / height
    if width >= height and width > max_len:
        width, height = max_len, int(max_len / aspect_ratio)
    elif height > width and height > max_len:
        height, width = max_len, int(max_len * aspect_ratio)
    return max(height, 1), max(width, 1)


IDEFICS3_MAX_IMAGE_SIZE = 4096


@dataclasses.dataclass(frozen=True)
class Idefics3VisionProcessor:
    """Idefics3ImageProcessor (also SmolVLM's): the longest edge resized to `longest_edge`, then (splitting) both
    sides up to multiples of `tile` and cut into tiles of tile x tile row by row, plus the whole image resized to
    one tile (the global image); without splitting, the image resized to one tile. All resizes on uint8 (LANCZOS)."""
    patch_size: int
    longest_edge: int = 4 * 364
    tile: int = 364  # max_image_size.longest_edge
    do_image_splitting: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = LANCZOS

    def __post_init__(self):
        if self.tile % self.patch_size:
            raise ConfigError(f"max_image_size.longest_edge ({self.tile}) must be a multiple of the patch size "
                              f"({self.patch_size})")

    @classmethod
    def from_dict(cls, d: dict, patch_size: int, where: str = "preprocessor_config.json"):
        size, tile = d.get("size") or {}, d.get("max_image_size") or {}
        for name, value in (("size", size), ("max_image_size", tile)):
            if not isinstance(value, dict) or (value and "longest_edge" not in value):
                raise ConfigError(f"{where}: {name} must look like {{'longest_edge': n}}, got {value!r}")
        fields = dict(longest_edge=size.get("longest_edge"), tile=tile.get("longest_edge"),
                      do_image_splitting=d.get("do_image_splitting"),
                      image_mean=tuple(d["image_mean"]) if "image_mean" in d else None,
                      image_std=tuple(d["image_std"]) if "image_std" in d else None,
                      rescale_factor=d.get("rescale_factor"), do_resize=d.get("do_resize"),
                      do_rescale=d.get("do_rescale"), do_normalize=d.get("do_normalize"), resample=d.get("resample"))
        return cls(patch_size=patch_size, **{k: v for k, v in fields.items() if v is not None})

    def _resize(self, image, height: int, width: int):
        return image if (image.height, image.width) == (height, width) else image.resize(
            (width, height), resample=self.resample)

    def frames(self, image, where: str = "image") -> tuple[list, int, int]:
        """(PIL tiles row by row then the global image, rows, cols); rows = cols = 0 for one unsplit image."""
        if min(image.width, image.height) <= 0:
            raise DataError(f"{where}: empty image ({image.width}x{image.height})")
        if self.do_resize:
            h, w = _rescale_to_max_len(image.height, image.width, self.longest_edge)
            image = self._resize(image, *_scale_below(h, w, IDEFICS3_MAX_IMAGE_SIZE))
        T = self.tile
        if not self.do_image_splitting:
            return [self._resize(image, T, T)], 0, 0
        height, width = image.height, image.width
        aspect_ratio = width / height
        if width >= height:
            width = math.ceil(width / T) * T
            height = math.ceil(int(width / aspect_ratio) / T) * T
        else:
            height = math.ceil(height / T) * T
            width = math.ceil(int(height * aspect_ratio) / T) * T
        image = self._resize(image, height, width)
        if height <= T and width <= T:
            return [image], 0, 0
        rows, cols = (height - T) // T + 1, (width - T) // T + 1
        tiles = [image.crop((c * T, r * T, c * T + T, r * T + T)) for r in range(rows) for c in range(cols)]
        return tiles + [self._resize(image, T, T)], rows, cols

    def pixels(self, image, where: str = "image") -> tuple[np.ndarray, int, int]:
        """([tiles, C, T, T] float32, rows, cols): the transformers processor's pixel_values of this image."""
        frames, rows, cols = self.frames(image, where)
        scale = self.rescale_factor if self.do_rescale else None
        mean = self.image_mean if self.do_normalize else None
        out = [rescale_normalize(np.moveaxis(np.asarray(f), -1, 0), scale, mean, self.image_std) for f in frames]
        return np.stack(out), rows, cols

    def image(self, image, where: str = "image") -> tuple[np.ndarray, tuple[int, int, int]]:
        """(patches [tiles, P, X], grid (tiles, rows, cols) of the split)."""
        x, rows, cols = self.pixels(image, where)
        return np.stack([vit_patches(t, self.patch_size) for t in x]), (len(x), rows, cols)
