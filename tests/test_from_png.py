"""`diffcli sample --from-png`: render again the image a diffcli PNG records, byte for byte, and refuse
every PNG that does not record one with one line and exit 4, writing nothing."""

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from diffcli.files.checkpoint import save_model
from diffcli.cli import app
from diffcli.files.images import read_png_text
from diffcli.diffusion.schedule import NoiseSchedule

runner = CliRunner()
CLASSES = ["cat", "dog", "fish"]
SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "diffcli-mnist.safetensors"


def diffcli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory, make_dit) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    a, b = folder / "a.safetensors", folder / "b.safetensors"
    save_model(a, make_dit(num_classes=3, seed=1), NoiseSchedule("cosine", 1000), "v", CLASSES, sampling={"guidance": 2.0})
    save_model(b, make_dit(num_classes=3, seed=2), NoiseSchedule("cosine", 1000), "v", CLASSES, sampling={"guidance": 2.0})
    return {"a": a, "b": b}


def one_error(result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("options", [
    [],  # the defaults: dpm++2m, 15 steps, edm sigmas
    ["--sampler", "ddim", "--steps", "12", "--eta", "0.7", "--spacing", "leading"],
    ["--sampler", "euler_a", "--steps", "9", "--sigmas", "karras", "--guidance", "3.5"],
    ["--sampler", "heun", "--steps", "6", "--sigmas", "none", "--spacing", "linspace", "--no-clip"],
    ["--sampler", "ddpm", "--steps", "10"],
])
def test_from_png_reproduces_the_file_byte_for_byte(tmp_path, models, options):
    made = diffcli("sample", "-c", models["a"], "-n", 3, "--class", "dog", "--seed", 40, "-o", tmp_path / "first", *options)
    assert made.exit_code == 0, made.output
    for name in ("40-0000.png", "42-0002.png"):  # the first and a later image of a batch
        again = diffcli("sample", "-c", models["a"], "--from-png", tmp_path / "first" / name, "-o", tmp_path / name)
        assert again.exit_code == 0, again.output
        (made,) = (tmp_path / name).iterdir()  # one image, named by the template with index 0
        assert made.read_bytes() == (tmp_path / "first" / name).read_bytes()


def test_options_given_beside_it_override_the_record(tmp_path, models):
    assert diffcli("sample", "-c", models["a"], "-n", 1, "--class", "cat", "--seed", 3, "--steps", 8, "-o", tmp_path / "a").exit_code == 0
    png = tmp_path / "a" / "3-0000.png"
    result = diffcli("sample", "-c", models["a"], "--from-png", png, "--class", "fish", "--steps", 5, "-o", tmp_path / "b", "--json")
    assert result.exit_code == 0, result.output
    image = json.loads(result.stdout.splitlines()[0])
    assert image["kind"] == "image" and image["from_png"] == str(png)
    assert (image["seed"], image["class"], image["steps"], image["sampler"]) == (3, "fish", 5, "dpm++2m")
    recorded = json.loads(read_png_text(tmp_path / "b" / "3-0000.png")["diffcli"])
    assert (recorded["class"], recorded["steps"], recorded["guidance"]) == ("fish", 5, 2.0)
    # the same options typed out by hand give the same file
    by_hand = diffcli("sample", "-c", models["a"], "-n", 1, "--class", "fish", "--seed", 3, "--steps", 5, "-o", tmp_path / "c")
    assert by_hand.exit_code == 0
    assert (tmp_path / "c" / "3-0000.png").read_bytes() == (tmp_path / "b" / "3-0000.png").read_bytes()


def test_another_model_is_refused_unless_forced(tmp_path, models):
    assert diffcli("sample", "-c", models["a"], "-n", 1, "--seed", 1, "-o", tmp_path / "a").exit_code == 0
    png = tmp_path / "a" / "1-0000.png"
    refused = diffcli("sample", "-c", models["b"], "--from-png", png, "-o", tmp_path / "b")
    assert refused.exit_code == 4
    assert "model hash" in one_error(refused) and "--force" in refused.stderr
    assert not (tmp_path / "b").exists()
    forced = diffcli("sample", "-c", models["b"], "--from-png", png, "--force", "-o", tmp_path / "b")
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "b" / "1-0000.png").exists()
    assert (tmp_path / "b" / "1-0000.png").read_bytes() != png.read_bytes()  # other weights, other image
    assert diffcli("sample", "-c", models["a"], "--force", "-o", tmp_path / "c").exit_code == 2  # --force alone


def test_the_shipped_example_image_is_reproduced(tmp_path):
    """The README's example: weights/example-7.png re-rendered by the shipped model, byte for byte."""
    example = SHIPPED.parent / "example-7.png"
    result = diffcli("sample", "--from-png", example, "-o", tmp_path)
    assert result.exit_code == 0, result.output
    (made,) = tmp_path.iterdir()
    assert made.read_bytes() == example.read_bytes()


def png_with(text: dict[str, str]) -> bytes:
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.new("L", (8, 8), 99).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


GOOD = {"seed": 1, "steps": 4, "sampler": "ddim", "guidance": 1.0, "model_hash": "0123456789", "class": "cat"}


@pytest.mark.parametrize("make, message", [
    (lambda: png_with({}), "no diffcli generation parameters"),
    (lambda: png_with({"parameters": "a cat, Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Model hash: abc"}),
     "another tool's generation text"),
    (lambda: png_with({"diffcli": "{not json"}), "its diffcli record is not valid JSON"),
    (lambda: png_with({"diffcli": "[1, 2]"}), "diffcli must be an object"),
    (lambda: png_with({"diffcli": json.dumps({"grid": True, "seed": 0})}), "is a grid"),
    (lambda: png_with({"diffcli": json.dumps({k: v for k, v in GOOD.items() if k != "seed"})}), "diffcli.seed is missing"),
    (lambda: png_with({"diffcli": json.dumps({**GOOD, "steps": 0})}), "diffcli.steps must be an integer in [1, 100000], found 0"),
    (lambda: png_with({"diffcli": json.dumps({**GOOD, "steps": True})}), "diffcli.steps must be an integer"),
    (lambda: png_with({"diffcli": json.dumps({**GOOD, "seed": -1})}), "diffcli.seed must be an integer"),
    (lambda: png_with({"diffcli": json.dumps({**GOOD, "sampler": "plms"})}), "diffcli.sampler must be one of"),
    (lambda: png_with({"diffcli": json.dumps({**GOOD, "guidance": float("nan")})}), "diffcli.guidance must be a finite number >= 0, found NaN"),
    (lambda: png_with({"diffcli": json.dumps({**GOOD, "guidance": "2"})}), "diffcli.guidance must be a finite number"),
    (lambda: png_with({"diffcli": json.dumps({**GOOD, "model_hash": "../../x"})}), "model_hash must be hexadecimal"),
    (lambda: png_with({"diffcli": json.dumps({**GOOD, "sigmas": "exponential"})}), "diffcli.sigmas must be one of"),
    (lambda: png_with({"diffcli": json.dumps(GOOD)})[:60], "is truncated"),
    (lambda: b"\x89PNG\r\n\x1a\n" + bytes(range(200)), "is truncated"),  # the first chunk claims 66,051 bytes
    (lambda: b"GIF89a" + bytes(30), "is not a PNG file"),
])
def test_png_without_a_usable_record_exits_4_writing_nothing(tmp_path, models, make, message):
    png = tmp_path / "in.png"
    png.write_bytes(make())
    result = diffcli("sample", "-c", models["a"], "--from-png", png, "-o", tmp_path / "out")
    assert result.exit_code == 4, result.output
    assert message in one_error(result)
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()


def test_missing_png_exits_4(tmp_path, models):
    result = diffcli("sample", "-c", models["a"], "--from-png", tmp_path / "nope.png", "-o", tmp_path / "out")
    assert result.exit_code == 4
    assert "no such file" in one_error(result)


def test_huge_text_chunk_is_refused_quickly(tmp_path, models):
    """A PNG whose text chunk claims megabytes: Pillow's chunk limits refuse it, no traceback."""
    body = png_with({})
    iend = body.rindex(b"IEND") - 4
    data = b"diffcli\x00" + b"x" * (8 * 1024 * 1024)
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    (tmp_path / "big.png").write_bytes(body[:iend] + chunk + body[iend:])
    result = diffcli("sample", "-c", models["a"], "--from-png", tmp_path / "big.png", "-o", tmp_path / "out")
    assert result.exit_code == 4, result.output
    one_error(result)
