"""diffcli.data.captions: one caption per image from metadata.jsonl or sidecar .txt files, and captions in
data.load_folder and its cache.

Every folder is built in tmp_path with PIL; each bad-input test checks the message names the file
(and the line, for metadata.jsonl) and says what is wrong, on one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffcli.data import folder as data
from diffcli.data.captions import MAX_CAPTION_BYTES, caption_sources, read_captions
from diffcli.data.folder import find_images, load_folder
from diffcli.errors import InputError


def image(path: Path, color=(10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def jsonl(root: Path, *rows) -> Path:
    """metadata.jsonl from rows: a dict becomes one JSON line, a str is written as it is."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path = root / "metadata.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def captions_of(root: Path, column: str = "text") -> list[str | None]:
    files, _, _ = find_images(root)
    return read_captions(root, files, column)


def refused(root: Path, column: str = "text") -> str:
    """The message of the InputError that reading root's captions raises, checked to be one line."""
    with pytest.raises(InputError) as e:
        captions_of(root, column)
    message = str(e.value)
    assert "\n" not in message and e.value.exit_code == 4
    return message


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


def test_sidecar_captions_are_normalised_and_missing_ones_are_none(tmp_path):
    image(tmp_path / "cat_001.png")
    image(tmp_path / "cat_002.png")
    image(tmp_path / "dog.jpg")
    (tmp_path / "cat_001.txt").write_text("  a cat\n\non a\tsofa \n", encoding="utf-8")
    (tmp_path / "dog.txt").write_bytes("\ufeffa dog\u3000running".encode())  # a BOM, an ideographic space
    assert captions_of(tmp_path) == ["a cat on a sofa", None, "a dog running"]


def test_metadata_jsonl_default_and_custom_column(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    image(tmp_path / "c.png")
    (tmp_path / "c.txt").write_text("ignored: metadata.jsonl wins", encoding="utf-8")
    jsonl(tmp_path, {"file_name": "a.png", "text": " first\n caption ", "prompt": "p-a"}, "",
          {"file_name": "./b.png", "text": "second", "prompt": "p-b"})
    assert captions_of(tmp_path) == ["first caption", "second", None]
    assert captions_of(tmp_path, "prompt") == ["p-a", "p-b", None]


def test_metadata_names_images_in_class_folders(tmp_path):
    image(tmp_path / "cats" / "x.png")
    image(tmp_path / "dogs" / "x.png")
    image(tmp_path / "dogs" / "y.png")
    jsonl(tmp_path, {"file_name": "dogs/x.png", "text": "a dog"}, {"file_name": "cats/x.png", "text": "a cat"})
    files, labels, names = find_images(tmp_path)
    assert names == ["cats", "dogs"] and labels == [0, 1, 1]
    assert read_captions(tmp_path, files) == ["a cat", "a dog", None]


def test_sidecars_in_class_folders(tmp_path):
    image(tmp_path / "cats" / "x.png")
    image(tmp_path / "dogs" / "x.png")
    (tmp_path / "dogs" / "x.txt").write_text("a dog", encoding="utf-8")
    assert captions_of(tmp_path) == [None, "a dog"]


def test_caption_sources_change_with_each_source(tmp_path):
    files = [image(tmp_path / "a.png"), image(tmp_path / "b.png")]
    before = caption_sources(tmp_path, files)
    assert caption_sources(tmp_path, files) == before
    side = tmp_path / "b.txt"
    side.write_text("b", encoding="utf-8")
    with_sidecar = caption_sources(tmp_path, files)
    side.write_text("bb", encoding="utf-8")
    edited = caption_sources(tmp_path, files)
    meta = jsonl(tmp_path, {"file_name": "a.png", "text": "a"})
    with_metadata = caption_sources(tmp_path, files)
    assert len({before, with_sidecar, edited, with_metadata}) == 4
    side.unlink()  # sidecars do not count once metadata.jsonl exists
    assert caption_sources(tmp_path, files) == with_metadata
    meta.write_text(json.dumps({"file_name": "a.png", "text": "aa"}) + "\n", encoding="utf-8")
    assert caption_sources(tmp_path, files) != with_metadata


# --------------------------------------------------------------------------------------------------
# Bad sidecars
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, says",
    [
        (b" \n\t ", "is empty"),
        (b"caf\xe9", "is not UTF-8 text (byte 4)"),
        (b"x" * (MAX_CAPTION_BYTES + 1), "is over 64 KiB"),
    ],
    ids=["empty", "latin-1", "too-long"],
)
def test_bad_sidecar_is_refused_naming_the_file(tmp_path, content, says):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(content)
    message = refused(tmp_path)
    assert message.startswith(f"caption file {tmp_path / 'b.txt'} ") and says in message


def test_sidecar_of_exactly_the_limit_is_accepted(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"y" * MAX_CAPTION_BYTES)
    assert captions_of(tmp_path) == ["y" * MAX_CAPTION_BYTES]


# --------------------------------------------------------------------------------------------------
# Bad metadata.jsonl lines
# --------------------------------------------------------------------------------------------------

GOOD = {"file_name": "a.png", "text": "fine"}


@pytest.mark.parametrize(
    "bad, says",
    [
        ('{"file_name": "b.png", "text": ', "not valid JSON"),
        ('["b.png", "a dog"]', 'must be a JSON object, found ["b.png", "a dog"]'),
        ({"name": "b.png", "text": "x"}, 'lacks "file_name" (has "name", "text")'),
        ({"file_name": 7, "text": "x"}, "file_name must be a string, found 7"),
        ({"file_name": "b.png", "caption": "x", "tags": "y"}, 'lacks the caption column "text" (has "file_name", "caption", "tags")'),
        ({"file_name": "b.png", "text": None}, '"text" must be a string, found null'),
        ({"file_name": "b.png", "text": ["x"]}, '"text" must be a string, found ["x"]'),
        ({"file_name": "b.png", "text": " \n "}, '"text" is empty'),
        ('{"file_name": "b.png", "text": "\\ud800"}', '"text" holds a lone surrogate'),
        ({"file_name": "b.png", "text": "z" * (MAX_CAPTION_BYTES + 1)}, '"text" is over 64 KiB'),
        ({"file_name": "gone.png", "text": "x"}, 'file_name "gone.png" is not an image in the folder'),
        ({"file_name": "notes.txt", "text": "x"}, 'file_name "notes.txt" is not an image in the folder'),
        ({"file_name": "../b.png", "text": "x"}, 'file_name "../b.png" is not an image in the folder'),
        ({"file_name": "./a.png", "text": "again"}, 'file_name "./a.png" was already captioned on line 1'),
    ],
    ids=["not-json", "not-object", "no-file-name", "file-name-number", "no-column", "null", "list", "empty",
         "surrogate", "too-long", "missing-image", "not-an-image", "outside", "twice"],
)
def test_bad_metadata_line_is_refused_naming_file_and_line(tmp_path, bad, says):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("not an image", encoding="utf-8")
    meta = jsonl(tmp_path, GOOD, "", bad)  # the blank line 2 is skipped but counted
    message = refused(tmp_path)
    assert message.startswith(f"{meta} line 3: {says}")
    assert len(message) < len(str(meta)) + 200  # quoted user text stays short


def test_metadata_not_utf8_names_the_line(tmp_path):
    image(tmp_path / "a.png")
    meta = tmp_path / "metadata.jsonl"
    meta.write_bytes(b'{"file_name": "a.png", "text": "caf\xe9"}\n')
    assert refused(tmp_path) == f"{meta} line 1: not UTF-8 (byte 36 of the line)"


def test_metadata_line_over_the_limit_is_refused_unread(tmp_path):
    image(tmp_path / "a.png")
    meta = jsonl(tmp_path, GOOD, {"file_name": "a.png", "text": "w" * (1024 * 1024)})
    assert refused(tmp_path) == f"{meta} line 2: longer than 1 MiB"


def test_long_user_text_is_quoted_briefly(tmp_path):
    image(tmp_path / "a.png")
    name = "n" * 10_000 + ".png"
    keys = {f"key{i}": "v" for i in range(50)}
    meta = jsonl(tmp_path, {"file_name": name, "text": "x"}, {"file_name": "a.png", **keys})
    first = refused(tmp_path)
    assert first.startswith(f"{meta} line 1: file_name \"nnn") and "..." in first and len(first) < len(str(meta)) + 150
    jsonl(tmp_path, {"file_name": "a.png", **keys})
    second = refused(tmp_path)
    assert second.endswith('"key5", "key6" and 43 more)') and len(second) < len(str(meta)) + 200


def test_metadata_with_a_custom_column_missing_lists_what_it_has(tmp_path):
    image(tmp_path / "a.png")
    meta = jsonl(tmp_path, GOOD)
    assert refused(tmp_path, "prompt") == f'{meta} line 1: lacks the caption column "prompt" (has "file_name", "text")'


# --------------------------------------------------------------------------------------------------
# Captions in load_folder and its cache
# --------------------------------------------------------------------------------------------------


def test_load_folder_keeps_captions_aligned_with_the_decoded_images(tmp_path):
    image(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "b.png").write_bytes(b"not a png")  # skipped when decoding: its caption goes with it
    image(tmp_path / "c.png", (4, 5, 6))
    image(tmp_path / "d.png", (7, 8, 9))
    jsonl(tmp_path, {"file_name": "a.png", "text": "one"}, {"file_name": "b.png", "text": "two"},
          {"file_name": "d.png", "text": "four"})
    s = load_folder(tmp_path, (8, 8), caption_column="text")
    assert [Path(f).name for f in s.files] == ["a.png", "c.png", "d.png"]
    assert s.captions == ["one", None, "four"]
    assert s.pixels[:, :, 0, 0].tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert s.summary()["captioned"] == 2 and s.summary()["skipped"] == 1


def test_without_a_caption_column_nothing_changes(tmp_path):
    from safetensors import safe_open

    image(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "a.txt").write_bytes(b"")  # would be refused if captions were read
    cache = tmp_path / "cache.safetensors"
    s = load_folder(tmp_path / "imgs", (8, 8), cache_path=cache)
    assert s.captions is None and "captioned" not in s.summary()
    with safe_open(cache, "pt") as f:
        meta = f.metadata()
    assert "captions" not in meta and meta["sha256"] == data.pixels_digest(s.pixels, s.labels)


def test_bad_captions_are_refused_before_anything_is_decoded(tmp_path, monkeypatch):
    image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe")
    decoded: list[Path] = []
    monkeypatch.setattr(data, "_decode", lambda path, *args: decoded.append(path))
    with pytest.raises(InputError, match="a.txt is not UTF-8"):
        load_folder(tmp_path, (8, 8), caption_column="text")
    assert decoded == []


def counting_decoder(monkeypatch) -> list[str]:
    """Replace data._decode with one that records each file it decodes."""
    decoded: list[str] = []
    real = data._decode

    def counting(path, *args):
        decoded.append(Path(path).name)
        return real(path, *args)

    monkeypatch.setattr(data, "_decode", counting)
    return decoded


def test_cache_round_trip_keeps_captions_and_a_sidecar_edit_rebuilds_it(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    image(root / "a.png", (1, 2, 3))
    image(root / "b.png", (4, 5, 6))
    (root / "a.txt").write_text("a red square", encoding="utf-8")
    cache = tmp_path / "cache.safetensors"
    decoded = counting_decoder(monkeypatch)
    plain = load_folder(root, (8, 8), cache_path=cache)
    assert plain.captions is None and sorted(decoded) == ["a.png", "b.png"]

    # asking for captions is another key: the cache without them is rebuilt with them
    decoded.clear()
    first = load_folder(root, (8, 8), cache_path=cache, caption_column="text")
    assert first.captions == ["a red square", None] and sorted(decoded) == ["a.png", "b.png"]

    decoded.clear()
    second = load_folder(root, (8, 8), cache_path=cache, caption_column="text")
    assert decoded == []  # read from the cache
    assert second.captions == first.captions and torch.equal(second.pixels, first.pixels)
    assert second.summary()["captioned"] == 1

    (root / "b.txt").write_text("a blue square", encoding="utf-8")
    third = load_folder(root, (8, 8), cache_path=cache, caption_column="text")
    assert third.captions == ["a red square", "a blue square"] and sorted(decoded) == ["a.png", "b.png"]

    (root / "a.txt").write_text("a crimson square", encoding="utf-8")  # another size: another fingerprint
    assert load_folder(root, (8, 8), cache_path=cache, caption_column="text").captions[0] == "a crimson square"


def test_metadata_edit_and_column_change_rebuild_the_cache(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    image(root / "a.png")
    jsonl(root, {"file_name": "a.png", "text": "short", "long": "a longer caption"})
    cache = tmp_path / "cache.safetensors"
    decoded = counting_decoder(monkeypatch)
    assert load_folder(root, (8, 8), cache_path=cache, caption_column="text").captions == ["short"]
    assert load_folder(root, (8, 8), cache_path=cache, caption_column="long").captions == ["a longer caption"]
    assert decoded == ["a.png", "a.png"]
    jsonl(root, {"file_name": "a.png", "text": "shorter", "long": "a longer caption"})
    assert load_folder(root, (8, 8), cache_path=cache, caption_column="text").captions == ["shorter"]
    assert decoded == ["a.png"] * 3


@pytest.mark.parametrize(
    "tamper",
    [
        lambda caps: caps[:1],  # too few
        lambda caps: [caps[0], 5],  # not a string
        lambda caps: [caps[0], ""],  # not a caption
        lambda caps: [caps[0], "x" * (MAX_CAPTION_BYTES + 1)],  # too long
        lambda caps: [caps[0], "a green square"],  # well formed but not what was cached: the SHA-256
        lambda caps: "not a list",
    ],
    ids=["short", "number", "empty", "too-long", "edited", "string"],
)
def test_a_cache_with_tampered_captions_is_rejected_and_rebuilt(tmp_path, monkeypatch, tamper):
    from safetensors import safe_open
    from safetensors.torch import load, save as save_tensors

    root = tmp_path / "imgs"
    image(root / "a.png")
    image(root / "b.png")
    (root / "a.txt").write_text("a red square", encoding="utf-8")
    (root / "b.txt").write_text("a blue square", encoding="utf-8")
    cache = tmp_path / "cache.safetensors"
    load_folder(root, (8, 8), cache_path=cache, caption_column="text")
    with safe_open(cache, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["captions"]) == ["a red square", "a blue square"]
    meta["captions"] = json.dumps(tamper(json.loads(meta["captions"])))
    cache.write_bytes(save_tensors(load(cache.read_bytes()), metadata=meta))

    decoded = counting_decoder(monkeypatch)
    logs: list[str] = []
    s = load_folder(root, (8, 8), cache_path=cache, log=logs.append, caption_column="text")
    assert s.captions == ["a red square", "a blue square"] and sorted(decoded) == ["a.png", "b.png"]
    assert len(logs) == 1 and logs[0].startswith(f"data cache {cache} is invalid (") and "captions" in logs[0]
    decoded.clear()
    assert load_folder(root, (8, 8), cache_path=cache, log=logs.append, caption_column="text").captions == s.captions
    assert decoded == [] and len(logs) == 1  # the rebuilt cache is used without complaint
