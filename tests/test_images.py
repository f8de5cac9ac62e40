"""Image decoding and preprocessing: pixel values equal transformers' image processors'; bad images get errors
that name them."""

import base64
import io

import numpy as np
import PIL.Image
import pytest

from jaxswift.data.images import QwenVisionProcessor, image_to_data_url, load_image
from jaxswift.errors import ConfigError, DataError

SIZES = [(50, 80), (300, 100), (28, 28), (13, 17), (400, 640), (97, 31)]


def random_image(h, w, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return PIL.Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode)


@pytest.mark.parametrize("bounds", [(28 * 28 * 4, 28 * 28 * 64), (56 * 56, 28 * 28 * 1280)])
def test_qwen2_vl_pixels_equal_transformers(bounds):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    min_pixels, max_pixels = bounds
    hf = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    ours = QwenVisionProcessor.from_dict(hf.to_dict())
    assert (ours.min_pixels, ours.max_pixels) == bounds
    for k, (h, w) in enumerate(SIZES):
        image = random_image(h, w, seed=k)
        out = hf(images=[image], return_tensors="np")
        patches, grid = ours.image(image)
        assert [list(grid)] == out["image_grid_thw"].tolist()
        np.testing.assert_allclose(patches, out["pixel_values"], atol=1e-5, rtol=0)


def test_qwen2_vl_several_images_and_transparency():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    hf = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=28 * 28 * 16)
    ours = QwenVisionProcessor(min_pixels=3136, max_pixels=28 * 28 * 16)
    images = [random_image(60, 90, 1, "RGBA"), random_image(120, 40, 2)]
    out = hf(images=images, return_tensors="np")
    patches = [ours.image(load_image(im)) for im in images]
    np.testing.assert_allclose(np.concatenate([p for p, _ in patches]), out["pixel_values"], atol=1e-5, rtol=0)
    assert [list(g) for _, g in patches] == out["image_grid_thw"].tolist()


def test_video_of_repeated_frame_equals_the_image():
    """A video's temporal patch holds consecutive frames; two copies of one frame give the image's patches."""
    proc = QwenVisionProcessor(min_pixels=3136, max_pixels=28 * 28 * 16)
    image = random_image(70, 50, 3)
    p_image, grid = proc.image(image)
    p_video, vgrid = proc.video([image, image])
    assert vgrid == grid
    np.testing.assert_array_equal(p_video, p_image)
    # three frames pad to four with the last one: two temporal patches, the second of frames (3, 3)
    other = random_image(70, 50, 4)
    p3, g3 = proc.video([image, image, other])
    assert g3 == (2, *grid[1:])
    np.testing.assert_array_equal(p3[: len(p_image)], p_image)
    np.testing.assert_array_equal(p3[len(p_image):], proc.image(other)[0])


def test_max_pixels_bounds_the_tokens():
    proc = QwenVisionProcessor(max_pixels=28 * 28 * 8)
    _, grid = proc.image(random_image(600, 900))
    assert proc.num_tokens(grid) <= 8
    with pytest.raises(ConfigError, match="min_pixels"):
        QwenVisionProcessor(min_pixels=100, max_pixels=10)


def test_paths_and_data_urls(tmp_path):
    image = random_image(20, 30, 5)
    (tmp_path / "imgs").mkdir()
    image.save(tmp_path / "imgs" / "a.png")
    from_path = load_image("imgs/a.png", base_dir=tmp_path)
    from_url = load_image(image_to_data_url(image))
    np.testing.assert_array_equal(np.asarray(from_path), np.asarray(image))
    np.testing.assert_array_equal(np.asarray(from_url), np.asarray(image))
    assert load_image({"url": image_to_data_url(image)}).size == (30, 20)


def test_bad_images_name_the_image(tmp_path):
    with pytest.raises(DataError, match=r"train.jsonl:3.*http://x/a.png.*never downloads"):
        load_image("http://x/a.png", where="train.jsonl:3 image 0")
    with pytest.raises(DataError, match=r"row 1 image 2.*missing.png.*not found"):
        load_image("missing.png", base_dir=tmp_path, where="row 1 image 2")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"row 4.*bad.png.*not a readable image"):
        load_image("bad.png", base_dir=tmp_path, where="row 4")
    with pytest.raises(DataError, match="invalid base64"):
        load_image("data:image/png;base64,@@@", where="msg")
    corrupt = "data:image/png;base64," + base64.b64encode(b"garbage bytes").decode()
    with pytest.raises(DataError, match=r"msg \(data URL\): not a readable image"):
        load_image(corrupt, where="msg")
    with pytest.raises(DataError, match="data:image"):
        load_image("data:text/plain;base64,aGVsbG8=", where="msg")
    with pytest.raises(DataError, match="must be a path"):
        load_image(42, where="msg")
    with pytest.raises(DataError, match="aspect ratio"):
        QwenVisionProcessor().image(random_image(1, 300))
    buffer = io.BytesIO()
    random_image(4, 4).save(buffer, format="JPEG")
    assert load_image(buffer.getvalue()).size == (4, 4)
