"""Every `--json` line of every command is one object with its `kind` first and exactly the fields
diffcli.records.SCHEMA (and the README's "JSON output" section) documents for that command and kind."""

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffcli import records
from diffcli.files.checkpoint import save_model
from diffcli.cli import app
from diffcli.diffusion.schedule import NoiseSchedule

runner = CliRunner()
README = Path(__file__).resolve().parent.parent / "README.md"


def diffcli(*args):
    return runner.invoke(app, [str(a) for a in args])


def checked(command: str, text: str) -> list[dict]:
    """Parse JSON Lines and validate each record; returns them."""
    out = []
    for line in text.splitlines():
        rec = json.loads(line)
        records.check(command, rec)
        out.append(rec)
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory, make_dit) -> Path:
    path = tmp_path_factory.mktemp("m") / "m.safetensors"
    save_model(path, make_dit(num_classes=2, seed=1), NoiseSchedule("cosine", 1000), "v", ["a", "b"])
    return path


def test_check_rejects_records_off_the_schema():
    records.check("sample", {"kind": "grid", "path": "g.png", "images": 3})
    for bad in (
        {"path": "g.png", "images": 3},  # no kind
        {"images": 3, "kind": "grid", "path": "g.png"},  # kind not first
        {"kind": "grid", "path": "g.png"},  # a field missing
        {"kind": "grid", "path": "g.png", "images": 3, "extra": 1},  # an undocumented field
        {"kind": "row", "t": 0},  # a kind of another command
    ):
        with pytest.raises(ValueError):
            records.check("sample", bad)


def test_sample_lines(tmp_path, model):
    result = diffcli("sample", "-c", model, "-n", 3, "--steps", 2, "--seed", 0, "-o", tmp_path / "o",
                     "--grid", tmp_path / "g.png", "--json", "--log-every", 0)
    assert result.exit_code == 0, result.output
    recs = checked("sample", result.stdout)
    assert [r["kind"] for r in recs] == ["image"] * 3 + ["grid", "summary"]
    assert recs[-1] == {"kind": "summary", "images": 3, "skipped": 0, "seconds": recs[-1]["seconds"],
                        "out": str(tmp_path / "o"), "grid": str(tmp_path / "g.png")}
    # progress goes to stderr, as `progress` records (every update with --log-every 0)
    progress = checked("sample", "\n".join(l for l in result.stderr.splitlines() if l.startswith("{")))
    assert progress and all(p["kind"] == "progress" and p["task"] == "sampling" for p in progress)
    assert progress[-1]["completed"] == progress[-1]["total"] == 6  # 3 images x 2 steps
    # a second run with --skip-existing: skipped image records have the short shape
    again = diffcli("sample", "-c", model, "-n", 3, "--steps", 2, "--seed", 0, "-o", tmp_path / "o", "--skip-existing", "--json")
    recs = checked("sample", again.stdout)
    assert [r["skipped"] for r in recs[:3]] == [True] * 3 and recs[-1]["skipped"] == 3


def test_sample_error_is_a_record_too(tmp_path, model):
    result = diffcli("sample", "-c", model, "--steps", 0, "-o", tmp_path, "--json")
    assert result.exit_code == 2
    (rec,) = checked("sample", result.stdout)
    assert rec["kind"] == "error" and rec["exit_code"] == 2 and "--steps" in rec["message"]
    assert result.stderr.startswith("Error: --steps")


def test_progress_in_a_log_is_plain_lines(tmp_path, model):
    result = diffcli("sample", "-c", model, "-n", 2, "--steps", 3, "--seed", 0, "-o", tmp_path, "--log-every", 0)
    assert result.exit_code == 0, result.output
    lines = [l for l in result.stderr.splitlines() if l.startswith("sampling ")]
    assert lines and re.fullmatch(r"sampling 6/6  elapsed \d+s  ETA \d+s", lines[-1]), lines
    quiet = diffcli("sample", "-c", model, "-n", 2, "--steps", 3, "--seed", 0, "-o", tmp_path / "q", "--log-every", 0, "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_inspect_schedule_lines(model):
    result = diffcli("inspect-schedule", "--checkpoint", model, "--steps", 4, "--json")
    assert result.exit_code == 0, result.output
    recs = checked("inspect-schedule", result.stdout)
    assert [r["kind"] for r in recs[:2]] == ["sampling", "schedule"]
    rows = recs[2:]
    assert {r["kind"] for r in rows} == {"row"} and rows[0]["schedule"] == "cosine"
    assert [r["t"] for r in rows] == recs[0]["timesteps"] and len(rows) == 4
    compare = diffcli("inspect-schedule", "--compare", "linear,cosine", "--rows", 3, "--json")
    kinds = [r["kind"] for r in checked("inspect-schedule", compare.stdout)]
    assert kinds == ["schedule", "row", "row", "row"] * 2
    bad = diffcli("inspect-schedule", "--steps", 0, "--json")
    assert bad.exit_code == 2
    assert checked("inspect-schedule", bad.stdout)[0]["kind"] == "error"


def test_info_lines(tmp_path, model):
    result = diffcli("info", model, "--json")
    assert result.exit_code == 0, result.output
    (rec,) = checked("info", result.stdout)
    assert rec["kind"] == "model" and rec["classes"] == ["a", "b"]
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    bad = diffcli("info", tmp_path / "junk.safetensors", "--json")
    assert bad.exit_code == 4
    assert checked("info", bad.stdout)[0]["kind"] == "error"


def test_the_readme_documents_every_kind_and_field():
    """The README's JSON output tables list, per command, each kind with all its fields."""
    text = README.read_text()
    section = text[text.index("### JSON output"):]
    section = section[: section.index("\n## ")]
    for command, kinds in records.SCHEMA.items():
        for kind, (required, optional) in kinds.items():
            rows = [l for l in section.splitlines() if l.startswith(f"| `{command}` | `{kind}` |")]
            assert len(rows) == 1, f"README: no row for {command} {kind}"
            if "as `" in rows[0]:  # "as `model`": the same fields as a kind listed above
                continue
            for name in required + optional:
                assert f"`{name}`" in rows[0], f"README: {command} {kind} lacks {name}"
