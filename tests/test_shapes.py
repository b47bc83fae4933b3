"""benchmarks/shapes.py, the synthetic captioned set and its pixel-rule judge, and the judging side of
benchmarks/text_bench.py: the judge reads back every drawn triple (also with noise), the held-back
triples never reach a training folder, captions and files follow the issue's format, and a seed
fixes the bytes."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import shapes  # noqa: E402
import text_bench  # noqa: E402

ALL = [(f, b, s) for f in range(8) for b in range(8) if f != b for s in range(3)]
PALETTE = list(shapes.COLOURS.values())


def drawn(rng: random.Random, triple) -> tuple[np.ndarray, int, int, int]:
    """One image of the triple at a random side and offset, as uint8 (3, 32, 32), and its side, dx, dy."""
    side = rng.randint(*shapes.SIDES)
    dx, dy = rng.choice(shapes.offsets(side)), rng.choice(shapes.offsets(side))
    return np.asarray(shapes.draw(*triple, side, dx, dy)).transpose(2, 0, 1), side, dx, dy


def fg_box(image: np.ndarray, fg: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), inclusive, of the pixels of exactly the palette colour fg."""
    ys, xs = np.nonzero((image.transpose(1, 2, 0) == PALETTE[fg]).all(-1))
    return ys.min(), ys.max(), xs.min(), xs.max()


# --------------------------------------------------------------------------------------------------
# the set's definition
# --------------------------------------------------------------------------------------------------


def test_palette_and_shapes_are_the_issues():
    assert list(shapes.COLOURS) == ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    assert shapes.COLOURS["purple"] == (150, 60, 200) and shapes.COLOURS["black"] == (20, 20, 20)
    assert shapes.SHAPES == ("circle", "square", "triangle")


def test_captions_follow_the_exact_format_and_parse_back():
    assert shapes.caption(0, 2, 0) == "a red circle on a blue background"
    assert shapes.caption(7, 6, 2) == "a black triangle on a white background"
    for t in ALL:
        assert shapes.parse_caption(shapes.caption(*t)) == t
    for bad in ("a red circle on blue background", "a red red circle on a blue background",
                "a red circle on a red background", "a pink circle on a blue background"):
        with pytest.raises(ValueError):
            shapes.parse_caption(bad)


def test_held_back_triples_are_the_rules_and_split_the_168():
    held, seen = shapes.triples(True), shapes.triples(False)
    by_rule = [t for t in ALL if sum(t) % 5 == 0]
    assert len(ALL) == 168
    assert held == by_rule and sorted(held + seen) == ALL and not set(held) & set(seen)
    assert all(shapes.held_back(*t) for t in held) and not any(shapes.held_back(*t) for t in seen)
    assert abs(len(held) - len(ALL) / 5) < 2  # "20%": 32 of 168 (19.0%) by the rule
    # every colour and shape is still seen in training, as fg, as bg and with every shape
    assert {t[0] for t in seen} == {t[1] for t in seen} == set(range(8)) and {t[2] for t in seen} == {0, 1, 2}


# --------------------------------------------------------------------------------------------------
# drawing and judging
# --------------------------------------------------------------------------------------------------


def test_drawn_colours_are_exact_and_sizes_and_centres_in_range():
    rng = random.Random(1)
    sides, centres = set(), set()
    for t in ALL:
        for _ in range(3):
            image, side, dx, dy = drawn(rng, t)
            colours = {tuple(c) for c in image.reshape(3, -1).T}
            assert colours == {PALETTE[t[0]], PALETTE[t[1]]}
            top, bottom, left, right = fg_box(image, t[0])
            assert bottom - top + 1 == right - left + 1 == side and 14 <= side <= 22
            cy, cx = (top + bottom) / 2 - 15.5, (left + right) / 2 - 15.5  # 15.5: the centre in pixel indices
            assert abs(cy) <= 4 and abs(cx) <= 4
            sides.add(side)
            centres.add(cx)
    assert sides == set(range(14, 23))  # the draw spans the whole range ...
    assert min(centres) <= -3.5 and max(centres) >= 3.5  # ... and both far offsets


def test_a_box_off_the_border_is_refused():
    with pytest.raises(ValueError, match="border"):
        shapes.draw(0, 1, 1, 22, 5, 0)


def test_judge_recovers_every_triple_exactly_and_with_noise():
    rng, noise = random.Random(2), np.random.default_rng(3)
    triples = ALL * 2
    clean = np.stack([drawn(rng, t)[0] for t in triples])  # (336, 3, 32, 32)
    assert shapes.judge(clean) == triples
    noisy = np.clip(clean.astype(int) + noise.integers(-10, 11, clean.shape), 0, 255).astype(np.uint8)
    assert (noisy != clean).mean() > 0.9
    assert shapes.judge(noisy) == triples


def test_judge_takes_a_torch_tensor_and_ignores_specks():
    import torch

    image = np.asarray(shapes.draw(3, 7, 0, 16, 0, 0)).transpose(2, 0, 1).copy()  # yellow circle on black
    image[:, 2, 2] = image[:, 29, 29] = shapes.COLOURS["yellow"]  # specks of the fg colour far from the shape
    image[:, 3, 28] = shapes.COLOURS["red"]  # and one of another colour
    assert shapes.judge(torch.from_numpy(image[None])) == [(3, 7, 0)]


def test_judge_calls_an_empty_image_wrong():
    plain = np.full((1, 3, 32, 32), 20, dtype=np.uint8)
    assert shapes.judge(plain) == [(-1, 7, -1)]
    assert shapes.judge(plain[:0]) == []


# --------------------------------------------------------------------------------------------------
# make_set and the command line
# --------------------------------------------------------------------------------------------------


def test_sidecar_set_has_every_seen_triple_and_no_held_back_one(tmp_path):
    written = shapes.make_set(tmp_path / "set", 2, seed=0)
    files = sorted(p.name for p in (tmp_path / "set").iterdir())
    seen = shapes.triples(False)
    assert len(written) == 2 * len(seen) and len(files) == 2 * len(written)  # a PNG and a .txt each
    assert "r0_b2_circle_0001.png" in files and "r0_b2_circle_0001.txt" in files
    assert all(p.parent == tmp_path / "set" for p in written)  # one flat folder
    assert (tmp_path / "set" / "r0_b2_circle_0001.txt").read_text() == "a red circle on a blue background\n"
    found = shapes.read_set(tmp_path / "set")
    assert sorted(t for _, t in found) == sorted(seen * 2)
    assert not any(shapes.held_back(*t) for _, t in found)
    judged = shapes.judge(shapes.read_pngs([p for p, _ in found]))  # the pixels, not only the captions
    assert judged == [t for _, t in found]


def test_jsonl_set_with_held_back_and_a_seed_fixes_the_bytes(tmp_path):
    a = shapes.make_set(tmp_path / "a", 1, seed=5, layout="jsonl", include_held_back=True)
    b = shapes.make_set(tmp_path / "b", 1, seed=5, layout="jsonl", include_held_back=True)
    c = shapes.make_set(tmp_path / "c", 1, seed=6, layout="jsonl", include_held_back=True)
    assert len(a) == 168 and not list((tmp_path / "a").glob("*.txt"))
    rows = [json.loads(line) for line in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [p.name for p in a] and set(rows[0]) == {"file_name", "text"}
    assert sorted(shapes.parse_caption(r["text"]) for r in rows) == ALL
    assert {r["file_name"] for r in rows} == {p.name for p in (tmp_path / "a").glob("*.png")}
    bytes_of = lambda paths: [p.read_bytes() for p in paths]  # noqa: E731
    assert bytes_of(a) == bytes_of(b)
    assert bytes_of(a) != bytes_of(c)
    assert (tmp_path / "a" / "metadata.jsonl").read_bytes() == (tmp_path / "b" / "metadata.jsonl").read_bytes()


def test_cli_writes_a_set_and_refuses_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "set"
    assert shapes.main([str(out), "--per-triple", "1", "--seed", "3", "--layout", "jsonl"]) == 0
    assert "136 images (136 triples x 1)" in capsys.readouterr().out
    assert len(list(out.glob("*.png"))) == 136
    before = sorted(out.iterdir())
    assert shapes.main([str(out), "--per-triple", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "not an empty folder" in err and err.count("\n") == 1
    assert sorted(out.iterdir()) == before


# --------------------------------------------------------------------------------------------------
# text_bench
# --------------------------------------------------------------------------------------------------


def test_text_bench_scores_a_drawn_folder_100_percent(tmp_path, capsys):
    shapes.make_set(tmp_path / "set", 1, seed=0, include_held_back=True)
    results = tmp_path / "results.json"
    assert text_bench.main(["--real", str(tmp_path / "set"), "--out", str(results)]) == 0
    r = json.loads(results.read_text())
    for key, n in (("seen", 136), ("held_back", 32)):  # every shape judged as the one asked for
        confusion = r[key].pop("shape_confusion")
        assert sum(confusion[s][s] for s in shapes.SHAPES) == n
        assert sum(sum(row.values()) for row in confusion.values()) == n
    assert r["seen"] == {"images": 136, "triples": 136, "all_three": 1.0, "fg": 1.0, "bg": 1.0, "shape": 1.0}
    assert r["held_back"] == {"images": 32, "triples": 32, "all_three": 1.0, "fg": 1.0, "bg": 1.0, "shape": 1.0}
    assert all(r["targets"].values()) and r["machine"]["torch"] and r["date"].endswith("UTC")
    assert "100.0%" in capsys.readouterr().out


def test_text_bench_scores_each_attribute_apart():
    s = text_bench.score([(0, 1, 2), (3, 4, 0), (5, 6, 2)], [(0, 1, 1), (3, 4, 0), (5, 6, -1)])
    confusion = s.pop("shape_confusion")
    assert s == {"images": 3, "triples": 3, "all_three": 1 / 3, "fg": 1.0, "bg": 1.0, "shape": 1 / 3}
    # asked shape -> judged shape: a triangle drawn as a square once, not drawn at all once
    assert confusion["triangle"] == {"circle": 0, "square": 1, "triangle": 0, "none": 1}
    assert confusion["circle"] == {"circle": 1, "square": 0, "triangle": 0, "none": 0}
    assert sum(confusion["square"].values()) == 0
    assert text_bench.score([], [])["all_three"] is None


def test_text_bench_reads_the_image_records_of_sample_json(tmp_path):
    stdout = "\n".join(json.dumps(r) for r in (
        {"kind": "image", "path": "out/0-0000.png", "prompt": "a red circle on a blue background", "index": 0},
        {"kind": "grid", "path": "out/grid.png", "images": 1},
        {"kind": "summary", "images": 1, "skipped": 0, "seconds": 1.0, "out": "out"},
    )) + "\n"
    assert text_bench.image_records(stdout) == [(Path("out/0-0000.png"), (0, 2, 0))]
    prompts = tmp_path / "held.txt"
    chosen = text_bench.write_prompts(prompts, held_back=True)
    assert [shapes.parse_caption(line) for line in prompts.read_text().splitlines()] == chosen == shapes.triples(True)
