"""Property-based tests: whatever a user types for `diffcli sample`'s options, and whatever images sit
in a data folder, diffcli ends with one of its documented exit codes and never shows a traceback.

Values are drawn from what a user could plausibly (or mistakenly) type: small and huge integers,
negatives, NaN and infinities, free text. Text never holds NUL or lone surrogates: argv cannot carry
NUL, and a shell passes valid text. The model is a tiny DiT and --steps stays small when valid, so
each example costs milliseconds.
"""

from __future__ import annotations

import io
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from diffcli.files.checkpoint import save_model
from diffcli.cli import app
from diffcli.data.folder import load_folder
from diffcli.errors import DiffcliError
from diffcli.diffusion.schedule import NoiseSchedule

EXIT_CODES = {0, 1, 2, 3, 4, 130}
CLASSES = ["cat", "dog", "fish"]
runner = CliRunner()

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12)


def as_text(s: st.SearchStrategy) -> st.SearchStrategy[str]:
    return s.map(str)


def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy[str]:
    """A valid value four times in five, so that examples get past validation into sampling and
    writing; otherwise something wrong: an extreme, a wrong type, free text."""
    return st.integers(0, 4).flatmap(lambda k: as_text(valid) if k else st.one_of(as_text(invalid), text))


odd_floats = st.one_of(st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e308, -1e-308, -1.0, 2.0]),
                       st.floats(allow_nan=True, allow_infinity=True))
# a valid --steps stays at 8 or below (each example must cost milliseconds); the invalid ones are all
# refused before sampling
steps = mostly(st.integers(1, 8), st.sampled_from([0, -3, 1001, 2**31, 2**63, -(2**70)]))
eta = mostly(st.floats(0, 1), odd_floats)
guidance = mostly(st.floats(0, 10), odd_floats)
batch = mostly(st.integers(1, 6), st.sampled_from([0, -1, 2**40, -(2**63)]))
num_images = mostly(st.integers(1, 5), st.sampled_from([0, -2, 100_001, 10**12, 10**40]))
seed = mostly(st.integers(0, 2**62), st.sampled_from([-1, 2**63 - 2**32, 2**63, 2**70, -(2**70)]))
class_token = mostly(st.sampled_from(CLASSES + ["0", "1", "2", "all"]),
                     st.sampled_from(["3", "-1", "12", "-0", "--1", "²", "Cat", "", " 1"]))
valid_name = st.lists(st.sampled_from(["{seed}", "{index}", "{index:04d}", "{class}", "{steps}", "{sampler}", "x", "-",
                                       "sub/", "é", " ", ".png"]), min_size=1, max_size=5).map("".join)
invalid_name = st.lists(st.sampled_from(["{bogus}", "{seed.real}", "{index[0]}", "{seed:q}", "{", "}", "{}", "/", ".", "..",
                                         "../", "~", "{seed}", "\\", "%s"]), max_size=5).map("".join)
name = mostly(valid_name, invalid_name)


@st.composite
def sample_args(draw) -> list[str]:
    """`--steps` always (its default, 15, would make examples slow); the rest each maybe."""
    args = [f"--steps={draw(steps)}"]
    optional = {"--eta": eta, "--guidance": guidance, "--batch-size": batch, "--num-images": num_images,
                "--seed": seed, "--name": name}
    for option, values in optional.items():
        if draw(st.booleans()):
            args.append(f"{option}={draw(values)}")
    for token in draw(st.lists(class_token, max_size=3)):
        args.append(f"--class={token}")
    if draw(st.booleans()):
        args.append("--no-grid")
    return args


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, make_dit) -> Path:
    folder = tmp_path_factory.mktemp("properties")
    save_model(folder / "model.safetensors", make_dit(num_classes=3, seed=5), NoiseSchedule("linear", 1000), "v",
               CLASSES, sampling={"guidance": 2.0})
    return folder


def written(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=sample_args())
def test_sample_options_never_crash(workdir, args):
    out = Path(tempfile.mkdtemp(dir=workdir)) / "out"
    result = runner.invoke(app, ["sample", "-c", str(workdir / "model.safetensors"), "-o", str(out),
                                 "--device", "cpu", "--quiet", *args])
    event(f"exit {result.exit_code}")
    assert result.exit_code in EXIT_CODES, (args, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, repr(result.exception))
    assert "Traceback" not in result.output, (args, result.output)
    if result.exit_code == 0:
        printed = [Path(line) for line in result.stdout.splitlines()]
        assert printed and all(p.is_file() for p in printed), (args, result.stdout)
        # the images and nothing else, all in --out: no grid without --grid (stderr is not a terminal)
        assert sorted(written(out.parent)) == sorted(printed), (args, result.stdout)
        assert all(out in p.parents for p in printed), (args, result.stdout)
        for p in printed:
            with Image.open(p) as im:
                im.load()
    elif result.exit_code in (2, 3, 4):
        assert written(out) == [], args  # refused before anything was written
        assert result.stderr.startswith("Error: ") or "Usage:" in result.stderr, (args, result.stderr)


# --------------------------------------------------------------------------------------------------
# Data folders of small random images, whole or damaged
# --------------------------------------------------------------------------------------------------

EXTENSIONS = {"PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "JPEG": ".jpg", "WEBP": ".webp"}


def make_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = random.Random(seed)
    bands = {"L": 1, "RGB": 3, "RGBA": 4, "P": 1, "I;16": 2}[mode]  # I;16: two bytes a pixel
    im = Image.frombytes(mode, (w, h), rng.randbytes(w * h * bands))
    if mode == "P":
        im.putpalette(rng.randbytes(768))
    return im


def encode(im: Image.Image, fmt: str) -> tuple[bytes, str]:
    """The image in fmt, or as PNG when PIL cannot write this mode in that format."""
    for f in (fmt, "PNG"):
        buf = io.BytesIO()
        try:
            im.save(buf, f)
            return buf.getvalue(), EXTENSIONS[f]
        except (OSError, ValueError, KeyError):
            continue
    raise AssertionError(f"PIL cannot write {im.mode} as PNG")


image_spec = st.fixed_dictionaries({
    "mode": st.sampled_from(["L", "RGB", "RGBA", "P", "I;16"]),
    "fmt": st.sampled_from(list(EXTENSIONS)),
    "w": st.integers(1, 64),
    "h": st.integers(1, 64),
    "seed": st.integers(0, 2**16),
    "damage": st.sampled_from(["none", "none", "append", "truncate", "truncate+append", "garble"]),
    "cut": st.floats(0, 1),
    "extra": st.binary(min_size=1, max_size=64),
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(image_spec, min_size=1, max_size=3), class_folders=st.booleans())
def test_data_folder_of_random_images_never_crashes(workdir, specs, class_folders):
    root = Path(tempfile.mkdtemp(dir=workdir))
    paths, intact = [], []
    for i, s in enumerate(specs):
        data, ext = encode(make_image(s["mode"], s["w"], s["h"], s["seed"]), s["fmt"])
        if "truncate" in s["damage"]:
            data = data[: int(len(data) * s["cut"])]
        if "append" in s["damage"]:
            data += s["extra"]
        if s["damage"] == "garble":
            data = s["extra"]
        path = root / (f"c{i % 2}" if class_folders else "") / f"{i}{ext}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        paths.append(str(path))
        if s["damage"] == "none":
            intact.append(str(path))
    try:
        loaded = load_folder(root, (8, 8))
        event(f"loaded {len(loaded.files)}, skipped {len(loaded.skipped)}")
    except DiffcliError as e:
        event("refused (exit 4)")
        assert e.exit_code == 4, str(e)
        # only when some folder (the set, or one class) has no undamaged image
        assert {Path(p).parent for p in intact} != {Path(p).parent for p in paths}, (specs, str(e))
        return
    assert set(loaded.files) | {f for f, _ in loaded.skipped} == set(paths)
    assert set(intact) <= set(loaded.files), loaded.skipped  # an undamaged image always loads
    assert all(why for _, why in loaded.skipped)
    N = len(loaded.files)
    assert loaded.pixels.shape[0] == N and loaded.pixels.shape[1] in (1, 3) and loaded.pixels.shape[2:] == (8, 8)
    assert len(loaded.labels) == N
