"""diffcli.data.folder: image folder -> uint8 tensor + labels + class names.

Every image here is built with PIL in tmp_path, so each test states exactly which pixels go in and
checks which pixels come out.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile

from diffcli.data import folder as data
from diffcli.data.folder import find_images, load_folder, load_rgb, parse_resolution
from diffcli.errors import InputError, UsageError


def save(path: Path, im: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def solid(color, size=(8, 8), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def pixel(im: Image.Image, xy=(0, 0)) -> tuple:
    return tuple(im.getpixel(xy))


def names(paths) -> list[str]:
    return [Path(p).name for p in paths]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (8-bit RGB) followed by a tiny IDAT and IEND:
    valid chunks and CRCs, but far too little pixel data, so only the header can be trusted."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------------
# Finding files and classes
# --------------------------------------------------------------------------------------------------


def test_class_subfolders_sorted_and_labelled(tmp_path):
    for cls, n in (("zebra", 1), ("apple", 2), ("mango", 3)):
        for i in range(n):
            save(tmp_path / cls / f"{i}.png", solid((i, i, i)))
    files, labels, classes = find_images(tmp_path)
    assert classes == ["apple", "mango", "zebra"]
    assert [(f.parent.name, y) for f, y in zip(files, labels)] == [
        ("apple", 0), ("apple", 0), ("mango", 1), ("mango", 1), ("mango", 1), ("zebra", 2)
    ]
    s = load_folder(tmp_path, (8, 8))
    assert s.conditional and s.class_names == ["apple", "mango", "zebra"]
    assert s.labels.tolist() == [0, 0, 1, 1, 1, 2]
    assert s.summary()["class_counts"] == [2, 3, 1]


def test_nested_images_belong_to_their_top_level_class_and_loose_files_are_ignored(tmp_path):
    save(tmp_path / "cat" / "deep" / "er" / "a.png", solid("white"))
    save(tmp_path / "dog" / "b.png", solid("white"))
    save(tmp_path / "loose.png", solid("white"))  # not in a class folder
    files, labels, classes = find_images(tmp_path)
    assert classes == ["cat", "dog"]
    assert names(files) == ["a.png", "b.png"] and labels == [0, 1]


def test_flat_folder_is_unconditional(tmp_path):
    for i in range(3):
        save(tmp_path / f"{i}.png", solid((50 * i, 0, 0)))
    s = load_folder(tmp_path, (8, 8))
    assert s.class_names == [] and not s.conditional
    assert s.labels.tolist() == [0, 0, 0]
    assert s.pixels.shape == (3, 3, 8, 8)
    assert s.summary()["class_counts"] == []


def test_unconditional_flag_ignores_class_folders(tmp_path):
    save(tmp_path / "a" / "1.png", solid("red"))
    save(tmp_path / "b" / "2.png", solid("blue"))
    save(tmp_path / "top.png", solid("green"))
    s = load_folder(tmp_path, (8, 8), unconditional=True)
    assert s.class_names == []
    assert len(s.files) == 3 and s.labels.tolist() == [0, 0, 0]


def test_hidden_and_non_image_files_skipped_extensions_case_insensitive(tmp_path):
    save(tmp_path / "a.PNG", solid("red"))
    save(tmp_path / "b.JpG", solid("red"), format="JPEG")
    save(tmp_path / "c.jpeg", solid("red"))
    save(tmp_path / ".hidden.png", solid("red"))
    save(tmp_path / ".thumbs" / "d.png", solid("red"))  # hidden folder
    (tmp_path / "notes.txt").write_text("not an image")
    save(tmp_path / "e.tiff", solid("red"))  # not a supported extension
    (tmp_path / "folder.png").mkdir()  # a folder with an image-like name
    files, _, classes = find_images(tmp_path)
    assert names(files) == ["a.PNG", "b.JpG", "c.jpeg"]
    assert classes == []  # the hidden folder does not make this a class-folder layout
    s = load_folder(tmp_path, (8, 8))
    assert len(s.files) == 3 and s.skipped == []


# --------------------------------------------------------------------------------------------------
# Decoding: modes, channels, orientation
# --------------------------------------------------------------------------------------------------


def test_grayscale_set_gets_one_channel_one_colour_image_makes_three(tmp_path):
    save(tmp_path / "a.png", solid(40, mode="L"))
    save(tmp_path / "b.png", solid((90, 90, 90)))  # RGB but gray
    s = load_folder(tmp_path, (8, 8))
    assert s.pixels.shape == (2, 1, 8, 8)
    assert s.pixels[:, 0, 0, 0].tolist() == [40, 90]

    save(tmp_path / "c.png", solid((200, 10, 10)))
    s = load_folder(tmp_path, (8, 8))
    assert s.pixels.shape == (3, 3, 8, 8)
    assert s.pixels[0, :, 0, 0].tolist() == [40, 40, 40]
    assert s.pixels[2, :, 0, 0].tolist() == [200, 10, 10]


def test_channels_forced(tmp_path):
    save(tmp_path / "a.png", solid((200, 10, 10)))
    save(tmp_path / "b.png", solid(40, mode="L"))
    one = load_folder(tmp_path, (8, 8), channels="1")
    assert one.pixels.shape == (2, 1, 8, 8)
    # ITU-R 601 luma of (200, 10, 10): 0.299*200 + 0.587*10 + 0.114*10 = 66.8
    assert one.pixels[0, 0, 0, 0].item() == 67
    three = load_folder(tmp_path, (8, 8), channels="3")
    assert three.pixels.shape == (2, 3, 8, 8)
    with pytest.raises(UsageError):
        load_folder(tmp_path, (8, 8), channels="2")
    with pytest.raises(UsageError):
        load_folder(tmp_path, (8, 8), crop="diagonal")


def test_rgba_composited_on_white(tmp_path):
    im = Image.new("RGBA", (2, 1))
    im.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    im.putpixel((1, 0), (255, 0, 0, 128))  # half-transparent red -> pink
    out = load_rgb(save(tmp_path / "a.png", im))
    assert out.mode == "RGB"
    assert pixel(out, (0, 0)) == (255, 255, 255)
    r, g, b = pixel(out, (1, 0))
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1


def test_palette_image_pixel_values(tmp_path):
    im = Image.new("P", (3, 1))
    im.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0] + [0] * (256 * 3 - 9))
    for x in range(3):
        im.putpixel((x, 0), x)
    out = load_rgb(save(tmp_path / "p.png", im))
    assert [pixel(out, (x, 0)) for x in range(3)] == [(10, 20, 30), (200, 100, 50), (0, 255, 0)]


def test_palette_transparency_becomes_white(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    out = load_rgb(save(tmp_path / "p.png", im, transparency=0))
    assert pixel(out, (0, 0)) == (255, 255, 255)
    assert pixel(out, (1, 0)) == (200, 100, 50)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    im = Image.new("I;16", (4, 1))
    for x, v in enumerate((65535, 32768, 257, 0)):
        im.putpixel((x, 0), v)
    path = save(tmp_path / "g16.png", im)
    assert Image.open(path).mode.startswith("I")  # really stored as 16-bit
    out = load_rgb(path)
    values = [pixel(out, (x, 0))[0] for x in range(4)]
    assert values[0] == 255
    assert abs(values[1] - 128) <= 1  # 32768 / 257 = 127.5; clipping would give 255
    assert values[2] == 1 and values[3] == 0
    s = load_folder(tmp_path, (1, 4))
    assert s.pixels.shape == (1, 1, 1, 4) and s.pixels[0, 0, 0, 0].item() == 255


@pytest.mark.parametrize(
    "orientation, corner",
    [(1, "top_left"), (6, "top_right"), (8, "bottom_left"), (3, "bottom_right")],
)
def test_exif_orientation_applied(tmp_path, orientation, corner):
    # a black 32x32 JPEG with a white 8x8 block at the stored top-left corner
    im = solid((0, 0, 0), (32, 32))
    im.paste((255, 255, 255), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path / "r.jpg", im, exif=exif, quality=95)
    s = load_folder(tmp_path, (16, 16))
    lum = s.pixels[0].float().mean(0)  # (16, 16); gray in, so one channel
    corners = {"top_left": lum[:4, :4], "top_right": lum[:4, -4:], "bottom_left": lum[-4:, :4],
               "bottom_right": lum[-4:, -4:]}
    assert corners.pop(corner).mean() > 200, path
    assert all(c.mean() < 30 for c in corners.values())


def test_cmyk_jpeg_loads_as_rgb(tmp_path):
    path = save(tmp_path / "c.jpg", solid((255, 0, 0, 0), mode="CMYK"))  # pure cyan ink
    assert Image.open(path).mode == "CMYK"
    out = load_rgb(path)
    assert out.mode == "RGB"
    r, g, b = pixel(out, (4, 4))
    assert r < 20 and g > 235 and b > 235


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [solid((255, 0, 0)), solid((0, 0, 255)), solid((0, 255, 0))]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    s = load_folder(tmp_path, (8, 8))
    assert s.pixels[0, :, 4, 4].tolist() == [255, 0, 0]


def test_one_pixel_image_is_upscaled(tmp_path):
    save(tmp_path / "dot.png", solid((12, 34, 56), (1, 1)))
    s = load_folder(tmp_path, (8, 8))
    assert s.pixels.shape == (1, 3, 8, 8)
    assert (s.pixels[0] == torch.tensor([12, 34, 56], dtype=torch.uint8)[:, None, None]).all()


# --------------------------------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------------------------------


def test_unreadable_files_are_skipped_and_listed(tmp_path):
    save(tmp_path / "good.png", solid((1, 2, 3)))
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "PNG")
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello, I am not a PNG")
    s = load_folder(tmp_path, (8, 8))
    assert names(s.files) == ["good.png"]
    assert sorted(Path(f).name for f, _ in s.skipped) == ["empty.png", "text.png", "truncated.png"]
    assert all(why for _, why in s.skipped)
    assert s.summary()["skipped"] == 3


def test_decompression_bomb_refused_without_decoding(tmp_path, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    save(tmp_path / "good.png", solid((1, 2, 3)))

    def no_decoding(self, *a, **k):
        raise AssertionError("the bomb's pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ValueError, match="too large"):
        load_rgb(tmp_path / "bomb.png")
    monkeypatch.undo()
    s = load_folder(tmp_path, (8, 8))
    assert names(s.files) == ["good.png"]
    assert [(Path(f).name, "too large" in why) for f, why in s.skipped] == [("bomb.png", True)]


def test_bomb_below_pil_limit_but_above_ours_refused(tmp_path, monkeypatch):
    # 10000 x 9000 = 90 M pixels: over diffcli's 80 M limit, which is checked on the header alone
    (tmp_path / "big.png").write_bytes(png_header_only(10_000, 9_000))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's own guard off: ours must hold
    with pytest.raises(ValueError, match="too large"):
        load_rgb(tmp_path / "big.png")


def test_empty_missing_and_useless_folders_raise_input_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        load_folder(tmp_path / "empty", (8, 8))
    with pytest.raises(InputError, match="not found"):
        load_folder(tmp_path / "missing", (8, 8))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        load_folder(tmp_path / "a_file", (8, 8))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.txt").write_text("x")
    (tmp_path / "text" / "data.csv").write_text("1,2")
    with pytest.raises(InputError, match="no images"):
        load_folder(tmp_path / "text", (8, 8))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"")
    (tmp_path / "broken" / "b.jpg").write_text("nope")
    with pytest.raises(InputError, match="unreadable"):
        load_folder(tmp_path / "broken", (8, 8))


def test_class_folder_with_only_unreadable_files_is_an_input_error(tmp_path):
    save(tmp_path / "good" / "a.png", solid("red"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"")
    with pytest.raises(InputError, match="bad"):
        load_folder(tmp_path, (8, 8))


# --------------------------------------------------------------------------------------------------
# Geometry and resolution strings
# --------------------------------------------------------------------------------------------------


def test_resize_then_center_crop_drops_the_left_edge(tmp_path):
    # 40 wide x 20 high: gray, a red marker in the leftmost 4 columns, a blue one in the middle
    im = solid((128, 128, 128), (40, 20))
    im.paste((255, 0, 0), (0, 0, 4, 20))
    im.paste((0, 0, 255), (18, 8, 22, 12))
    save(tmp_path / "wide.png", im)
    s = load_folder(tmp_path, (16, 16))
    x = s.pixels[0].int()  # (3, 16, 16): resized to 32x16, then 8 columns cut from each side
    assert x.shape == (3, 16, 16)
    redness = x[0] - x[2]
    assert redness.max() < 40  # the left-edge marker is gone
    blueness = x[2] - x[0]
    assert blueness[7:9, 7:9].min() > 200  # the center marker survives, still centered
    assert blueness[:3].max() < 40 and blueness[-3:].max() < 40


def test_non_square_resolution(tmp_path):
    # tall target: a 20x20 image with a red top row band
    im = solid((128, 128, 128), (20, 20))
    im.paste((255, 0, 0), (0, 0, 20, 5))
    save(tmp_path / "a.png", im)
    s = load_folder(tmp_path, (8, 16))
    assert s.pixels.shape == (1, 3, 8, 16)  # H=8, W=16: the center band of rows is kept
    assert (s.pixels[0, 0].int() - s.pixels[0, 2].int()).max() < 40


def test_random_crop_caches_a_margin(tmp_path):
    save(tmp_path / "a.png", solid("red", (40, 40)))
    s = load_folder(tmp_path, (16, 16), crop="random")
    assert s.pixels.shape == (1, 3, 18, 18)  # 16 * 1.125


@pytest.mark.parametrize("text, hw", [("32", (32, 32)), ("32x48", (32, 48)), ("16X8", (16, 8)), (64, (64, 64))])
def test_parse_resolution(text, hw):
    assert parse_resolution(text) == hw


@pytest.mark.parametrize("text", ["", "abc", "32x", "x32", "32x48x2", "0", "-8", "32x0", "5000", "3.5"])
def test_parse_resolution_rejects(text):
    with pytest.raises(UsageError):
        parse_resolution(text)


# --------------------------------------------------------------------------------------------------
# The data cache
# --------------------------------------------------------------------------------------------------


def test_cache_reused_then_invalidated_when_the_folder_changes(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    save(root / "a" / "1.png", solid((10, 20, 30)))
    save(root / "b" / "2.png", solid((40, 50, 60)))
    cache = tmp_path / "cache.safetensors"
    decoded: list[str] = []
    real = data._decode

    def counting(path, *args):
        decoded.append(Path(path).name)
        return real(path, *args)

    monkeypatch.setattr(data, "_decode", counting)
    first = load_folder(root, (8, 8), cache_path=cache)
    assert sorted(decoded) == ["1.png", "2.png"] and cache.exists()

    def broken(path, *args):
        raise ValueError("decoder must not run: the cache should have been used")

    monkeypatch.setattr(data, "_decode", broken)
    second = load_folder(root, (8, 8), cache_path=cache)
    assert torch.equal(second.pixels, first.pixels) and torch.equal(second.labels, first.labels)
    assert second.class_names == ["a", "b"] and second.files == first.files

    # another resolution misses the cache, so the broken decoder runs and every file fails
    with pytest.raises(InputError, match="unreadable"):
        load_folder(root, (16, 16), cache_path=cache)

    # a new file changes the folder: the cache is ignored and everything is decoded again
    save(root / "b" / "3.png", solid((70, 80, 90)))
    decoded.clear()
    monkeypatch.setattr(data, "_decode", counting)
    third = load_folder(root, (8, 8), cache_path=cache)
    assert sorted(decoded) == ["1.png", "2.png", "3.png"]
    assert third.labels.tolist() == [0, 1, 1]
    assert third.pixels[2, :, 0, 0].tolist() == [70, 80, 90]


def test_cache_invalidated_when_a_file_is_rewritten(tmp_path):
    root = tmp_path / "imgs"
    save(root / "1.png", solid((10, 20, 30)))
    cache = tmp_path / "cache.safetensors"
    assert load_folder(root, (8, 8), cache_path=cache).pixels[0, :, 0, 0].tolist() == [10, 20, 30]
    save(root / "1.png", solid((200, 100, 0), (9, 9)))  # different size -> different fingerprint
    assert load_folder(root, (8, 8), cache_path=cache).pixels[0, :, 0, 0].tolist() == [200, 100, 0]


def test_damaged_cache_is_rebuilt(tmp_path):
    root = tmp_path / "imgs"
    save(root / "1.png", solid((10, 20, 30)))
    cache = tmp_path / "cache.safetensors"
    cache.write_bytes(b"garbage, not safetensors")
    s = load_folder(root, (8, 8), cache_path=cache)
    assert s.pixels[0, :, 0, 0].tolist() == [10, 20, 30]
    assert load_folder(root, (8, 8), cache_path=cache).pixels[0, :, 0, 0].tolist() == [10, 20, 30]


def test_a_cache_that_fails_its_checks_is_rebuilt_with_a_log_line(tmp_path):
    """The cache matches the folder (same key) but its pixels were edited, or a label: both are found
    (a SHA-256 of the data, every label against the class folders), logged and rebuilt from the images."""
    from safetensors import safe_open
    from safetensors.torch import load, save as save_tensors

    root = tmp_path / "imgs"
    save(root / "a" / "1.png", solid((10, 20, 30)))
    save(root / "b" / "1.png", solid((200, 100, 0)))
    cache = tmp_path / "cache.safetensors"
    load_folder(root, (8, 8), cache_path=cache)
    with safe_open(cache, "pt") as f:
        meta = f.metadata()
    tensors = load(cache.read_bytes())
    edited = {"pixels": tensors["pixels"].clone(), "labels": tensors["labels"].clone()}
    edited["pixels"][0, 0, 0, 0] += 1
    swapped = {"pixels": tensors["pixels"], "labels": tensors["labels"].flip(0)}
    for what, content in [("pixels", save_tensors(edited, metadata=meta)), ("labels", save_tensors(swapped, metadata=meta))]:
        cache.write_bytes(content)
        logs: list[str] = []
        s = load_folder(root, (8, 8), cache_path=cache, log=logs.append)
        assert s.pixels[:, :, 0, 0].tolist() == [[10, 20, 30], [200, 100, 0]] and s.labels.tolist() == [0, 1], what
        assert len(logs) == 1 and logs[0].startswith(f"data cache {cache} is invalid (") and logs[0].endswith("), rebuilding")
        assert load_folder(root, (8, 8), cache_path=cache, log=logs.append).labels.tolist() == [0, 1]
        assert len(logs) == 1  # the rebuilt cache is used without complaint


def test_class_folders_with_control_characters_are_refused(tmp_path):
    """Class names travel into model files, file names and the terminal; a model file refuses them, so
    training refuses them first."""
    save(tmp_path / "ok" / "1.png", solid((1, 2, 3)))
    save(tmp_path / "bad\x1b[2J" / "1.png", solid((1, 2, 3)))
    with pytest.raises(InputError, match="holds a control character"):
        find_images(tmp_path)
