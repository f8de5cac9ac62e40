"""A picture task the project generates itself: shapes, colours and counts drawn with PIL.

Each picture holds one to three shapes of one kind and one colour on a white ground; each row asks one question
about it (its colour, its shape or how many there are) and the answer is one word. Rows are ms-swift's convention:
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
# short: every question token is paid for in each training step (the one-word answers are taught by the rows)
QUESTIONS = {
    "colour": "What colour are the shapes?",
    "shape": "Which shape is drawn?",
    "count": "How many shapes are there?",
}


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    count: int
    boxes: tuple[tuple[int, int, int], ...]  # (left, top, side) of each shape, non-overlapping


def _place(rng: random.Random, count: int, size: int) -> tuple[tuple[int, int, int], ...]:
    """`count` squares of side between a quarter and a third of the picture, apart by at least 2 pixels."""
    while True:
        boxes = []
        for _ in range(count):
            side = rng.randint(size // 4, size // 3)
            boxes.append((rng.randint(1, size - side - 1), rng.randint(1, size - side - 1), side))
        if all(_apart(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]):
            return tuple(boxes)


def _apart(a, b, gap: int = 2) -> bool:
    (ax, ay, aside), (bx, by, bside) = a, b
    return ax + aside + gap <= bx or bx + bside + gap <= ax or ay + aside + gap <= by or by + bside + gap <= ay


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


def answer(scene: Scene, kind: str) -> str:
    return {"colour": scene.colour, "shape": scene.shape, "count": COUNTS[scene.count - 1]}[kind]


def shapes_rows(n: int, *, seed: int, size: int = 64, questions: int = 1) -> list[dict]:
    """n rows, each with its own picture. One question per row: the kinds in turn (colour, shape, count, colour,
    ...). More (up to three): a conversation asking that many kinds, starting where the one-question rows would, the
    picture shown once in the first turn (its tokens then serve every answer)."""
    if not 1 <= questions <= len(QUESTIONS):
        raise ValueError(f"questions must be 1 to {len(QUESTIONS)}, got {questions}")
    rng = random.Random(seed)
    kinds = tuple(QUESTIONS)
    rows = []
    for i in range(n):
        scene = random_scene(rng, size)
        asked = [kinds[(i + j) % len(kinds)] for j in range(questions)]
        messages = []
        for j, kind in enumerate(asked):
            messages += [{"role": "user", "content": ("<image>" if j == 0 else "") + QUESTIONS[kind]},
                         {"role": "assistant", "content": answer(scene, kind)}]
        rows.append({"messages": messages, "images": [image_to_data_url(draw(scene, size))], "kind": asked[0]})
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
    parser.add_argument("--size", type=int, default=64, help="picture side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="training seed; the held-out set uses seed + 1")
    args = parser.parse_args(argv)
    if min(args.train, args.test) < 1 or args.size < 16:
        parser.error("--train and --test must be >= 1 and --size >= 16")
    out = Path(args.out)
    for name, n, seed in (("train", args.train, args.seed), ("test", args.test, args.seed + 1)):
        print(write_jsonl(shapes_rows(n, seed=seed, size=args.size), out / f"{name}.jsonl"))


if __name__ == "__main__":
    main()
