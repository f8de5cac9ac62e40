"""The generated picture task (data/shapes.py): deterministic, answers true to the pictures, rows jaxswift reads."""

import json

import numpy as np
import pytest

from jaxswift.data import shapes
from jaxswift.data.images import load_image


def _components(mask: np.ndarray) -> int:
    """Connected regions of a boolean mask (4-neighbour flood fill)."""
    seen, count = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count, stack = count + 1, [start]
        while stack:
            y, x = stack.pop()
            if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and mask[y, x] and not seen[y, x]:
                seen[y, x] = True
                stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
    return count


def test_rows_follow_the_seed_and_the_answers_match_the_pictures():
    rows = shapes.shapes_rows(30, seed=3)
    assert rows == shapes.shapes_rows(30, seed=3)
    assert rows != shapes.shapes_rows(30, seed=4)
    assert [r["kind"] for r in rows[:3]] == ["colour", "shape", "count"]
    for row in rows:
        pixels = np.asarray(load_image(row["images"][0]))
        assert pixels.shape == (64, 64, 3)
        reply = row["messages"][1]["content"]
        painted = (pixels != 255).any(-1)
        if row["kind"] == "colour":
            assert (pixels[painted] == shapes.COLOURS[reply]).all(-1).mean() > 0.9  # antialiasing aside
        elif row["kind"] == "count":
            assert _components(painted) == shapes.COUNTS.index(reply) + 1
        else:
            assert reply in shapes.SHAPES
        assert row["messages"][0]["content"].startswith("<image>")


def test_rows_with_three_questions_show_the_picture_once():
    one, three = shapes.shapes_rows(4, seed=5), shapes.shapes_rows(4, seed=5, questions=3)
    for single, multi in zip(one, three):
        assert multi["images"] == single["images"] and multi["messages"][:2] == single["messages"]
        users = [m["content"] for m in multi["messages"][::2]]
        assert [u.count("<image>") for u in users] == [1, 0, 0]
        asked = {u.removeprefix("<image>") for u in users}
        assert asked == set(shapes.QUESTIONS.values())  # each kind once
    with pytest.raises(ValueError, match="questions must be 1 to 3"):
        shapes.shapes_rows(1, seed=0, questions=4)


def test_cli_writes_train_and_held_out_sets(tmp_path, capsys):
    shapes.main(["--out", str(tmp_path), "--train", "4", "--test", "2"])
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert len(train) == 4 and len(test) == 2 and train[0]["images"] != test[0]["images"]
    with pytest.raises(SystemExit):
        shapes.main(["--out", str(tmp_path), "--size", "8"])
    assert "--size" in capsys.readouterr().err
