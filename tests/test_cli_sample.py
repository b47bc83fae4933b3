"""`diffcli sample`, run the way a user would: invoke, check the exit code, then the output and files.

The model files are tiny DiTs (8x8, width 32) with perturbed weights, so images are not flat.
"""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from diffcli.files.checkpoint import save_model
from diffcli.cli import app
from diffcli.files.images import read_png_text
from diffcli.diffusion.schedule import NoiseSchedule

runner = CliRunner()
CLASSES = ["cat", "dog", "fish"]


def diffcli(*args) -> "Result":  # noqa: F821
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory, make_dit) -> dict[str, Path]:
    """rgb: conditional (cat, dog, fish), v prediction, guidance 2 stored; gray: unconditional, 1 channel."""
    folder = tmp_path_factory.mktemp("models")
    rgb, gray = folder / "rgb.safetensors", folder / "gray.safetensors"
    save_model(rgb, make_dit(num_classes=3, seed=1), NoiseSchedule("linear", 1000), "v", CLASSES,
               sampling={"guidance": 2.0})
    save_model(gray, make_dit(in_channels=1, seed=2), NoiseSchedule("cosine", 1000), "v", [])
    return {"rgb": rgb, "gray": gray}


@pytest.fixture
def rgb(models) -> Path:
    return models["rgb"]


def pixels(path: Path) -> bytes:
    with Image.open(path) as im:
        return im.tobytes()


def same_image(a: Path, b: Path) -> bool:
    """The same picture made in batches of different sizes: the noise is bit-identical, but the CPU's
    matrix library may round a batch of 4 and a batch of 1 differently in the last bit, which can move
    a pixel by one level (README, "Reproducible seeds"); another seed gives another picture."""
    pa, pb = pixels(a), pixels(b)
    return len(pa) == len(pb) and max(abs(x - y) for x, y in zip(pa, pb)) <= 1


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """name -> (inode, mtime_ns, bytes) of every file, hidden ones (temporary files) included."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def parameters(text: str) -> dict[str, str]:
    """'Steps: 50, Sampler: ddim, ...' -> {'Steps': '50', 'Sampler': 'ddim', ...}"""
    return dict(part.split(": ", 1) for part in text.split(", "))


def json_lines(stdout: str) -> list[dict]:
    """The JSON Lines of --json; every record names its kind first."""
    records = [json.loads(line) for line in stdout.splitlines()]
    assert all(next(iter(r)) == "kind" for r in records), records
    return records


def images_of(records: list[dict]) -> list[dict]:
    return [r for r in records if r["kind"] == "image"]


# the fields of a written image's --json record; "sigmas" (ODE step sigmas) and "eta" (ddim) when they apply
IMAGE_FIELDS = {"kind", "path", "index", "seed", "class", "steps", "sampler", "guidance", "width", "height",
                "model_hash", "diffcli_version", "clip", "precision", "device", "nfe", "seconds", "skipped"}


def assert_one_error_line(result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# --------------------------------------------------------------------------------------------------
# A normal run
# --------------------------------------------------------------------------------------------------


def test_sample_16_images_and_a_grid(tmp_path, rgb):
    out, grid = tmp_path / "out", tmp_path / "g.png"
    result = diffcli("sample", "--checkpoint", rgb, "--sampler", "ddim", "--steps", 50, "-n", 16, "--grid", grid, "--seed", 7, "-o", out)
    assert result.exit_code == 0, result.output
    names = [f"{7 + i}-{i:04d}.png" for i in range(16)]
    assert result.stdout.splitlines() == [str(out / n) for n in names] + [str(grid)]
    assert sorted(os.listdir(out)) == sorted(names)  # no stray temporary files
    assert "seed 7 (given); 16 images, ddim 50 steps, guidance 2" in " ".join(result.stderr.split())

    model_hash = hashlib.sha256(rgb.read_bytes()).hexdigest()[:10]
    for i, name in enumerate(names):
        with Image.open(out / name) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (8, 8))
        text = read_png_text(out / name)
        p = parameters(text["parameters"])
        assert p["Steps"] == "50" and p["Sampler"] == "ddim" and p["CFG scale"] == "2.0"
        assert p["Seed"] == str(7 + i) and p["Size"] == "8x8" and p["Model hash"] == model_hash
        assert p["Class"] == CLASSES[i % 3] and p["Eta"] == "0.0" and p["NFE"] == "50"
        doc = json.loads(text["diffcli"])
        assert (doc["seed"], doc["class"], doc["steps"], doc["guidance"], doc["model_hash"]) == (7 + i, CLASSES[i % 3], 50, 2.0, model_hash)
    assert len({pixels(out / n) for n in names}) == 16  # 16 different images

    # the grid: one row per class (cat: 0 3 ... 15; dog: 1 4 ... 13; fish: 2 5 ... 14), 2 px gaps,
    # 6 columns, upscaled 8x (cells of at least 64 px)
    with Image.open(grid) as im:
        assert im.mode == "RGB" and im.size == (8 * (6 * 10 + 2), 8 * (3 * 10 + 2))
        small = im.resize((62, 32), Image.NEAREST)
    assert json.loads(read_png_text(grid)["diffcli"])["images"] == 16
    for i, name in enumerate(names):
        row, col = i % 3, i // 3
        cell = small.crop((2 + col * 10, 2 + row * 10, 10 + col * 10, 10 + row * 10))
        assert cell.tobytes() == pixels(out / name), f"image {i} is not at row {row}, column {col}"
    blank = small.crop((2 + 5 * 10, 12, 10 + 5 * 10, 20)).tobytes()  # dog has no 6th image
    assert blank == bytes(8 * 8 * 3)


def test_grayscale_model_writes_L_pngs(tmp_path, models):
    out, grid = tmp_path / "out", tmp_path / "grid.png"
    result = diffcli("sample", "-c", models["gray"], "--steps", 5, "-n", 2, "--seed", 0, "-o", out, "--grid", grid)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == ["0-0000.png", "1-0001.png"]  # the grid is where --grid says, not in --out
    for path in (out / "0-0000.png", out / "1-0001.png", grid):
        with Image.open(path) as im:
            assert im.mode == "L"
    text = parameters(read_png_text(out / "0-0000.png")["parameters"])
    assert text["CFG scale"] == "1.0" and "Class" not in text  # unconditional: no guidance, no class


def test_json_lines(tmp_path, rgb):
    out = tmp_path / "out"
    result = diffcli("sample", "-c", rgb, "--sampler", "ddim", "--steps", 4, "-n", 4, "--seed", 3, "-o", out, "--json",
                     "-g", 1.5, "--device", "cpu")
    assert result.exit_code == 0, result.output
    *images, summary = json_lines(result.stdout)
    model_hash = hashlib.sha256(rgb.read_bytes()).hexdigest()[:10]
    assert [r["kind"] for r in images] == ["image"] * 4
    assert [r["index"] for r in images] == [0, 1, 2, 3]
    assert [r["seed"] for r in images] == [3, 4, 5, 6]
    assert [r["class"] for r in images] == ["cat", "dog", "fish", "cat"]
    for r in images:
        assert set(r) == IMAGE_FIELDS | {"eta", "spacing"}  # ddim: eta and the spacing, no step sigmas
        assert r["path"] == str(out / f"{r['seed']}-{r['index']:04d}.png") and Path(r["path"]).is_file()
        assert (r["steps"], r["sampler"], r["guidance"], r["model_hash"], r["eta"]) == (4, "ddim", 1.5, model_hash, 0.0)
        assert (r["clip"], r["precision"], r["device"], r["nfe"], r["spacing"]) == (True, "fp32", "cpu", 4, "trailing")
        assert isinstance(r["seconds"], float) and r["seconds"] >= 0 and r["skipped"] is False
        # the PNG records what the JSON line says, minus where it was written and how long it took
        recorded = json.loads(read_png_text(r["path"])["diffcli"])
        assert recorded == {k: v for k, v in r.items() if k not in ("kind", "path", "index", "seconds", "skipped")}
    assert set(summary) == {"kind", "images", "skipped", "seconds", "out"}  # no grid asked for: none
    assert (summary["kind"], summary["images"], summary["skipped"], summary["out"]) == ("summary", 4, 0, str(out))
    assert isinstance(summary["seconds"], float) and summary["seconds"] >= 0
    assert sorted(os.listdir(tmp_path)) == ["out"] and len(os.listdir(out)) == 4  # no grid anywhere


def test_json_lines_with_a_grid(tmp_path, rgb):
    out, grid = tmp_path / "out", tmp_path / "sheet.png"
    result = diffcli("sample", "-c", rgb, "--steps", 3, "-n", 3, "--seed", 1, "-o", out, "--grid", grid, "--json")
    assert result.exit_code == 0, result.output
    records = json_lines(result.stdout)
    assert [r["kind"] for r in records] == ["image"] * 3 + ["grid", "summary"]
    for r in records[:3]:
        assert set(r) == IMAGE_FIELDS | {"sigmas"} and r["sigmas"] == "edm"  # the default ODE sampler: no eta, no spacing
    assert records[3] == {"kind": "grid", "path": str(grid), "images": 3}
    summary = records[4]
    assert {k: summary[k] for k in ("images", "skipped", "out", "grid")} == {"images": 3, "skipped": 0, "out": str(out),
                                                                             "grid": str(grid)}
    assert set(summary) == {"kind", "images", "skipped", "seconds", "out", "grid"}
    assert json.loads(read_png_text(grid)["diffcli"])["images"] == 3

    # without --json: the image paths, then the grid's
    again = diffcli("sample", "-c", rgb, "--steps", 3, "-n", 3, "--seed", 1, "-o", out, "--grid", grid, "--overwrite")
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines() == [r["path"] for r in records[:3]] + [str(grid)]


def test_grid_only_when_asked_and_its_folder_must_exist(tmp_path, rgb):
    out = tmp_path / "out"
    for extra in ([], ["--no-grid"]):  # not a terminal: no interactive grid either way
        result = diffcli("sample", "-c", rgb, "--steps", 2, "--seed", 5, "-o", out, "--overwrite", *extra)
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines() == [str(out / f"{5 + i}-{i:04d}.png") for i in range(3)]  # one per class
        assert sorted(os.listdir(tmp_path)) == ["out"] and len(os.listdir(out)) == 3

    result = diffcli("sample", "-c", rgb, "--steps", 2, "--seed", 5, "-o", tmp_path / "new", "--grid",
                     tmp_path / "missing" / "g.png")
    assert result.exit_code == 2
    assert "the folder of --grid does not exist" in assert_one_error_line(result)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # neither --out nor the grid's folder was created

    # --grid inside --out, which does not exist yet: --out is created, so that is fine
    result = diffcli("sample", "-c", rgb, "--steps", 2, "--seed", 5, "-o", tmp_path / "new", "--grid",
                     tmp_path / "new" / "g.png")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / "new")) == ["5-0000.png", "6-0001.png", "7-0002.png", "g.png"]


def test_no_metadata(tmp_path, rgb):
    out, grid = tmp_path / "out", tmp_path / "grid.png"
    result = diffcli("sample", "-c", rgb, "--steps", 3, "-n", 2, "--seed", 0, "-o", out, "--grid", grid, "--no-metadata")
    assert result.exit_code == 0, result.output
    for path in (out / "0-0000.png", out / "1-0001.png", grid):
        assert path.is_file() and read_png_text(path) == {}


# --------------------------------------------------------------------------------------------------
# Seeds and reproducibility
# --------------------------------------------------------------------------------------------------


def test_same_seed_twice_gives_the_same_pixels(tmp_path, rgb):
    args = ["sample", "-c", rgb, "--steps", 10, "-n", 3, "--seed", 11, "-o", tmp_path, "--no-grid"]
    assert diffcli(*args).exit_code == 0
    first = {n: pixels(tmp_path / n) for n in os.listdir(tmp_path)}
    result = diffcli(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert {n: pixels(tmp_path / n) for n in os.listdir(tmp_path)} == first


def test_image_i_has_seed_s_plus_i(tmp_path, rgb):
    """`--seed 5 -n 3` image 1 is `--seed 6 -n 1` image 0 (same class, so the same conditioning)."""
    a = diffcli("sample", "-c", rgb, "--steps", 8, "--seed", 5, "-n", 3, "--class", "dog", "-o", tmp_path / "a")
    b = diffcli("sample", "-c", rgb, "--steps", 8, "--seed", 6, "-n", 1, "--class", "dog", "-o", tmp_path / "b")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert same_image(tmp_path / "a" / "6-0001.png", tmp_path / "b" / "6-0000.png")
    assert not same_image(tmp_path / "a" / "5-0000.png", tmp_path / "b" / "6-0000.png")


def test_batch_size_does_not_change_the_pixels(tmp_path, rgb):
    for b in (1, 8):
        result = diffcli("sample", "-c", rgb, "--steps", 8, "-n", 5, "--seed", 0, "--batch-size", b,
                         "-o", tmp_path / f"b{b}", "--no-grid", "--sampler", "ddpm")
        assert result.exit_code == 0, result.output
    for i in range(5):
        name = f"{i}-{i:04d}.png"
        assert same_image(tmp_path / "b1" / name, tmp_path / "b8" / name), name


# --------------------------------------------------------------------------------------------------
# Existing outputs
# --------------------------------------------------------------------------------------------------


def test_existing_outputs_exit_3_and_nothing_changes(tmp_path, rgb):
    out, grid = tmp_path / "out", tmp_path / "grid.png"
    args = ["sample", "-c", rgb, "--steps", 3, "-n", 3, "--seed", 0, "-o", out, "--grid", grid]
    assert diffcli(*args).exit_code == 0

    def state():
        return sorted(os.listdir(tmp_path)), snapshot(out), (grid.stat().st_ino, grid.stat().st_mtime_ns, grid.read_bytes())

    before = state()
    assert before[0] == ["grid.png", "out"] and len(before[1]) == 3  # 3 images in --out, the grid beside it
    result = diffcli(*args)
    assert result.exit_code == 3
    assert "exists" in assert_one_error_line(result)
    assert result.stdout == ""
    assert state() == before
    # with --json the error is also a record on stdout
    result = diffcli(*args, "--json")
    assert result.exit_code == 3
    line = assert_one_error_line(result)
    assert json_lines(result.stdout) == [{"kind": "error", "message": line.removeprefix("Error: "), "exit_code": 3}]
    assert state() == before
    # only the grid exists: still exit 3
    for n in ("0-0000.png", "1-0001.png", "2-0002.png"):
        (out / n).unlink()
    result = diffcli(*args)
    assert result.exit_code == 3
    assert str(grid) in assert_one_error_line(result)
    assert os.listdir(out) == [] and state()[2] == before[2]


def test_overwrite_replaces(tmp_path, rgb):
    out, grid = tmp_path / "out", tmp_path / "grid.png"
    args = ["sample", "-c", rgb, "-n", 2, "--seed", 0, "-o", out, "--grid", grid]
    assert diffcli(*args, "--steps", 3).exit_code == 0
    assert json.loads(read_png_text(grid)["diffcli"])["steps"] == 3
    result = diffcli(*args, "--steps", 6, "--overwrite")
    assert result.exit_code == 0, result.output
    for name in ("0-0000.png", "1-0001.png"):
        assert parameters(read_png_text(out / name)["parameters"])["Steps"] == "6"
    assert json.loads(read_png_text(grid)["diffcli"])["steps"] == 6


def test_skip_existing_makes_only_the_missing_images(tmp_path, rgb):
    out, grid = tmp_path / "out", tmp_path / "grid.png"
    args = ["sample", "-c", rgb, "--steps", 5, "-n", 4, "--seed", 20, "-o", out]
    assert diffcli(*args).exit_code == 0
    original = pixels(out / "21-0001.png")
    (out / "21-0001.png").unlink()
    kept = snapshot(out)
    result = diffcli(*args, "--skip-existing", "--json", "--grid", grid)
    assert result.exit_code == 0, result.output
    *images, grid_record, summary = json_lines(result.stdout)
    assert [(r["kind"], r["index"], r["skipped"]) for r in images] == [
        ("image", 0, True), ("image", 2, True), ("image", 3, True), ("image", 1, False)]
    for r in images[:3]:  # a skipped image: where it is and its seed, nothing about how it was made
        assert r == {"kind": "image", "path": str(out / f"{20 + r['index']}-{r['index']:04d}.png"), "index": r["index"],
                     "seed": 20 + r["index"], "skipped": True}
    assert grid_record == {"kind": "grid", "path": str(grid), "images": 4}  # the kept images are in it too
    assert (summary["kind"], summary["images"], summary["skipped"], summary["grid"]) == ("summary", 1, 3, str(grid))
    after = snapshot(out)
    assert {n: after[n] for n in kept} == kept  # same inode, mtime and bytes: untouched
    regenerated = pixels(out / "21-0001.png")  # from its own seed, alone rather than in a batch of 4
    assert max(abs(x - y) for x, y in zip(regenerated, original)) <= 1, "see same_image"
    assert set(after) == set(kept) | {"21-0001.png"}


def test_overwrite_and_skip_existing_exclude_each_other(tmp_path, rgb):
    result = diffcli("sample", "-c", rgb, "-o", tmp_path, "--overwrite", "--skip-existing")
    assert result.exit_code == 2
    assert_one_error_line(result)


# --------------------------------------------------------------------------------------------------
# Classes
# --------------------------------------------------------------------------------------------------


def test_class_by_name_or_index(tmp_path, rgb):
    runs = {}
    for token in ("dog", "1"):
        result = diffcli("sample", "-c", rgb, "--steps", 4, "-n", 2, "--seed", 9, "--class", token,
                         "-o", tmp_path / token, "--json", "--no-grid")
        assert result.exit_code == 0, result.output
        records = json_lines(result.stdout)
        assert [r["kind"] for r in records] == ["image", "image", "summary"]
        runs[token] = images_of(records)
        assert [r["class"] for r in runs[token]] == ["dog", "dog"]
    for a, b in zip(runs["dog"], runs["1"]):
        assert pixels(Path(a["path"])) == pixels(Path(b["path"]))


def test_repeated_class_option_cycles(tmp_path, rgb):
    result = diffcli("sample", "-c", rgb, "--steps", 2, "-n", 5, "--seed", 0, "--class", "fish", "--class", "0",
                     "-o", tmp_path, "--json", "--no-grid")
    assert result.exit_code == 0, result.output
    assert [r["class"] for r in images_of(json_lines(result.stdout))] == ["fish", "cat", "fish", "cat", "fish"]


@pytest.mark.parametrize("token,message", [("7", "out of range"), ("-1", "out of range"), ("bird", "unknown class 'bird'")])
def test_bad_class_exits_2(tmp_path, rgb, token, message):
    result = diffcli("sample", "-c", rgb, "--class", token, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert message in assert_one_error_line(result)
    assert not (tmp_path / "out").exists()


def test_class_on_an_unconditional_model_exits_2(tmp_path, models):
    result = diffcli("sample", "-c", models["gray"], "--class", "0", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "unconditional" in assert_one_error_line(result)


# --------------------------------------------------------------------------------------------------
# Bad model files and options
# --------------------------------------------------------------------------------------------------


def test_corrupt_foreign_and_missing_model_files_exit_4(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(os.urandom(2000))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, foreign)
    for path, message in ((corrupt, "not a safetensors file"), (foreign, "without diffcli metadata"),
                          (tmp_path / "missing.safetensors", "not found")):
        result = diffcli("sample", "--checkpoint", path, "-o", tmp_path / "out")
        assert result.exit_code == 4, result.output
        assert message in assert_one_error_line(result)
        assert result.stdout == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "option,value,message",
    [("--steps", "0", "--steps"), ("--steps", "1001", "at most"), ("--eta", "2", "--eta"),
     ("--guidance", "-1", "--guidance"), ("--batch-size", "0", "--batch-size"), ("-n", "0", "--num-images"),
     ("--sampler", "plms", "unknown sampler"), ("--name", "../x.png", "outside the output folder"),
     ("--name", "{bogus}.png", "unknown field {bogus}"), ("--name", "{seed", "bad --name"),
     ("--name", "fixed.png", "same file name"), ("--device", "tpu", "unknown device"),
     ("--grid", "no-such-folder/g.png", "the folder of --grid does not exist"),
     ("--spacing", "leading", "--spacing does not apply to --sigmas edm")],
)
def test_bad_options_exit_2_and_write_nothing(tmp_path, rgb, option, value, message):
    out = tmp_path / "out"
    result = diffcli("sample", "-c", rgb, "-n", 3, "--seed", 0, "-o", out, option, value)
    assert result.exit_code == 2, result.output
    assert message in assert_one_error_line(result)
    assert not out.exists() and not (tmp_path / "x.png").exists()


def test_absolute_name_exits_2(tmp_path, rgb):
    target = tmp_path / "abs.png"
    for name in (str(target), "/tmp/abs.png"):
        result = diffcli("sample", "-c", rgb, "-n", 1, "--seed", 0, "-o", tmp_path / "out", "--name", name)
        assert result.exit_code == 2, result.output
        assert "absolute path" in assert_one_error_line(result)
    assert not target.exists() and not (tmp_path / "out").exists()


def test_default_sampler_is_dpmpp_2m_with_edm_sigmas_for_15_steps(tmp_path, rgb):
    result = diffcli("sample", "-c", rgb, "-n", 1, "--seed", 0, "-o", tmp_path, "--json", "--no-grid")
    assert result.exit_code == 0, result.output
    rec = json.loads(result.stdout.splitlines()[0])
    assert (rec["sampler"], rec["steps"], rec["sigmas"], rec["nfe"]) == ("dpm++2m", 15, "edm", 15)
    p = parameters(read_png_text(rec["path"])["parameters"])
    assert p["Sampler"] == "dpm++2m" and p["Sigmas"] == "edm" and "Spacing" not in p


def test_sigmas_none_uses_the_spacing_timesteps_and_auto_is_ignored_by_ddim(tmp_path, rgb):
    result = diffcli("sample", "-c", rgb, "-n", 1, "--seed", 0, "-o", tmp_path / "a", "--json", "--no-grid",
                     "--sigmas", "none", "--steps", 5)
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout.splitlines()[0])
    assert first["kind"] == "image" and "sigmas" not in first and first["spacing"] == "trailing"
    # an ODE sampler at --spacing timesteps: --sigmas none (with the default edm sigmas --spacing is refused)
    result = diffcli("sample", "-c", rgb, "-n", 1, "--seed", 0, "-o", tmp_path / "d", "--json",
                     "--sigmas", "none", "--spacing", "leading", "--steps", 5)
    assert result.exit_code == 0, result.output
    rec = json.loads(result.stdout.splitlines()[0])
    assert rec["spacing"] == "leading" and "sigmas" not in rec
    assert pixels(Path(rec["path"])) != pixels(Path(first["path"]))  # other timesteps, another image
    result = diffcli("sample", "-c", rgb, "-n", 1, "--seed", 0, "-o", tmp_path / "e", "--spacing", "leading", "--steps", 5)
    assert result.exit_code == 2 and "--spacing does not apply to --sigmas edm" in assert_one_error_line(result)
    assert not (tmp_path / "e").exists()
    result = diffcli("sample", "-c", rgb, "-n", 1, "--seed", 0, "-o", tmp_path / "b", "--sampler", "ddim", "--steps", 5)
    assert result.exit_code == 0, result.output
    result = diffcli("sample", "-c", rgb, "-n", 1, "--seed", 0, "-o", tmp_path / "c", "--sampler", "ddim", "--sigmas", "edm")
    assert result.exit_code == 2 and "needs an ODE sampler" in result.stderr
