"""A picture task the project generates itself: shapes, colours and counts drawn with PIL.

Each picture holds one to three shapes of one kind and one colour on a white ground, one to a cell of a 28-pixel
grid; each row asks for a description and the answer says how many, what colour and which shape in three words
("two red circles"). Rows are ms-swift's convention:
`<image>` in the user turn, the picture as a data URL in `images`, so a dataset file needs no image folder beside it.

Everything follows from the seed: the same (seed, count) gives the same rows on every machine, and a held-out set is
the same generator under another seed (`python -m jaxswift.data.shapes --help`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

from jaxswift.data.images import image_to_data_url

COLOURS = {"red": (215, 40, 40), "green": (35, 160, 60), "blue": (40, 80, 215), "yellow": (225, 195, 30)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")
PARTS = ("count", "colour", "shape")  # the words of a description, in order


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    count: int
    boxes: tuple[tuple[int, int, int], ...]  # (left, top, side) of each shape, non-overlapping


# Qwen2-VL's 14-pixel patches merged 2 x 2: one image token sees one 28-pixel cell
CELL = 28
SIDE = 22  # one size: a square, a circle and a triangle then cover distinct areas of their cell
SHIFT = (CELL - SIDE) // 2


def _place(rng: random.Random, count: int, size: int) -> tuple[tuple[int, int, int], ...]:
    """`count` squares of side SIDE in distinct cells of the picture's 28-pixel grid, one to a cell, centred and
    shifted by up to 2 pixels. Why a grid: a shape drawn across cell borders reaches the LLM in pieces spread over
    up to four image tokens, which a tower trained from scratch did not learn to reassemble within the demo's ten
    minutes (shape and count stayed at chance, docs/multimodal.md); whole shapes make shape a property of one token
    and count the number of tokens that are not blank."""
    per_side = size // CELL
    if count > per_side ** 2:
        raise ValueError(f"{count} shapes need {count} cells of {CELL} pixels; a {size}-pixel picture has "
                         f"{per_side ** 2}")
    margin = (size - per_side * CELL) // 2  # the grid centred when size is not a multiple of the cell
    boxes = []
    for cell in rng.sample(range(per_side ** 2), count):
        row, col = divmod(cell, per_side)
        left = margin + col * CELL + SHIFT + rng.randint(-2, 2)
        top = margin + row * CELL + SHIFT + rng.randint(-2, 2)
        boxes.append((left, top, SIDE))
    return tuple(boxes)


def random_scene(rng: random.Random, size: int) -> Scene:
    count = rng.randint(1, len(COUNTS))
    return Scene(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), count, _place(rng, count, size))


def draw(scene: Scene, size: int):
    """The scene as a size x size RGB PIL image."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    for left, top, side in scene.boxes:
        right, bottom = left + side, top + side
        if scene.shape == "circle":
            pen.ellipse((left, top, right, bottom), fill=fill)
        elif scene.shape == "square":
            pen.rectangle((left, top, right, bottom), fill=fill)
        else:
            pen.polygon([(left + side / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return image


DESCRIBE = "Describe the shapes."


def description(scene: Scene) -> str:
    """The answer to DESCRIBE: count, colour and shape in three words ("two red circles"), each one SmolLM2 token."""
    plural = "s" if scene.count > 1 else ""
    return f"{COUNTS[scene.count - 1]} {scene.colour} {scene.shape}{plural}"


def read_description(text: str) -> dict[str, str]:
    """{count, colour, shape} read back from an answer's first three words (plural shapes made singular); a part
    that is missing reads as ""."""
    words = [w.lower().strip(".,!") for w in text.split()[:3]] + ["", "", ""]
    if words[2].endswith("s") and words[2][:-1] in SHAPES:
        words[2] = words[2][:-1]
    return dict(zip(PARTS, words))


def shapes_rows(n: int, *, seed: int, size: int = 56) -> list[dict]:
    """n rows, each with its own picture described in one answer of three words: each picture teaches its count,
    colour and shape for about 30 tokens, where one question a part costs three times as many (docs/multimodal.md,
    the picture demo). `truth` holds the three parts for scoring."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        scene = random_scene(rng, size)
        rows.append({"messages": [{"role": "user", "content": "<image>" + DESCRIBE},
                                  {"role": "assistant", "content": description(scene)}],
                     "images": [image_to_data_url(draw(scene, size))],
                     "truth": {"count": COUNTS[scene.count - 1], "colour": scene.colour, "shape": scene.shape}})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jaxswift.data.shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for train.jsonl and test.jsonl")
    parser.add_argument("--train", type=int, default=600, help="training rows")
    parser.add_argument("--test", type=int, default=60, help="held-out rows (another seed)")
    parser.add_argument("--size", type=int, default=56, help="picture side in pixels (a 28-pixel grid)")
    parser.add_argument("--seed", type=int, default=0, help="training seed; the held-out set uses seed + 1")
    args = parser.parse_args(argv)
    if min(args.train, args.test) < 1 or args.size < 2 * CELL:
        parser.error(f"--train and --test must be >= 1 and --size >= {2 * CELL} (room for three shapes)")
    out = Path(args.out)
    for name, n, seed in (("train", args.train, args.seed), ("test", args.test, args.seed + 1)):
        print(write_jsonl(shapes_rows(n, seed=seed, size=args.size), out / f"{name}.jsonl"))


if __name__ == "__main__":
    main()
