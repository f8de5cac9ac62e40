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
    for row in rows:
        pixels = np.asarray(load_image(row["images"][0]))
        assert pixels.shape == (56, 56, 3)
        truth, reply = row["truth"], row["messages"][1]["content"]
        painted = (pixels != 255).any(-1)
        assert (pixels[painted] == shapes.COLOURS[truth["colour"]]).all(-1).mean() > 0.9  # antialiasing aside
        assert _components(painted) == shapes.COUNTS.index(truth["count"]) + 1
        assert truth["shape"] in shapes.SHAPES
        assert reply.split() == [truth["count"], truth["colour"], truth["shape"] + ("" if truth["count"] == "one" else "s")]
        assert shapes.read_description(reply) == truth
        assert row["messages"][0]["content"] == "<image>" + shapes.DESCRIBE
    assert {r["truth"]["count"] for r in rows} == set(shapes.COUNTS)  # the seed does not pin one answer


def test_answers_are_read_back_part_by_part():
    read = shapes.read_description
    assert read("Three Yellow triangles.") == {"count": "three", "colour": "yellow", "shape": "triangle"}
    assert read("one red circle and more") == {"count": "one", "colour": "red", "shape": "circle"}
    assert read("two blue") == {"count": "two", "colour": "blue", "shape": ""}  # a missing word is wrong, not skipped
    assert read("The shapes are red") == {"count": "the", "colour": "shapes", "shape": "are"}
    assert read("") == {"count": "", "colour": "", "shape": ""}


def test_each_shape_lies_whole_in_one_cell_of_the_token_grid():
    """One image token (2 x 2 patches of 14 pixels) sees one whole shape or nothing: every painted region's bounding
    box lies inside one 28-pixel cell, at most one region a cell, and the three shapes cover distinct areas."""
    area = {name: [] for name in shapes.SHAPES}
    for size in (56, 84):
        for row in shapes.shapes_rows(30, seed=7, size=size):
            painted = (np.asarray(load_image(row["images"][0])) != 255).any(-1)
            scene_cells = []
            for cy in range(size // shapes.CELL):
                for cx in range(size // shapes.CELL):
                    cell = painted[cy * shapes.CELL:(cy + 1) * shapes.CELL, cx * shapes.CELL:(cx + 1) * shapes.CELL]
                    if cell.any():
                        assert _components(cell) == 1, f"two shapes in cell {cy, cx}"
                        scene_cells.append(cell.sum())
            # as many shapes as painted cells: none straddles two cells (it would paint both) or lies off the grid
            assert _components(painted) == len(scene_cells)
            area[row["truth"]["shape"]] += scene_cells
    # circle ~0.79 and triangle ~0.5 of the square's area: one size lets area alone tell them apart
    assert max(area["triangle"]) < min(area["circle"]) and max(area["circle"]) < min(area["square"])


def test_cli_writes_train_and_held_out_sets(tmp_path, capsys):
    shapes.main(["--out", str(tmp_path), "--train", "4", "--test", "2"])
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert len(train) == 4 and len(test) == 2 and train[0]["images"] != test[0]["images"]
    with pytest.raises(SystemExit):
        shapes.main(["--out", str(tmp_path), "--size", "8"])
    assert "--size" in capsys.readouterr().err
