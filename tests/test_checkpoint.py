"""Model files: safetensors with JSON metadata that rebuild the model exactly; every kind of bad file
is an InputError (exit code 4), and nothing in diffcli ever unpickles."""

import ast
import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import diffcli
from diffcli.files.checkpoint import MODEL_FORMAT, load_model, read_schedule, save_model, write
from diffcli.errors import InputError
from diffcli.diffusion.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule("cosine", 500)
CLASSES = ["cat", "dog", "fish"]
TRAINING = {"steps": 1234, "images_seen": 5678}


@pytest.fixture
def model(make_dit):
    return make_dit(num_classes=3, learn_sigma=True, image_width=16)


@pytest.fixture
def model_file(tmp_path, model):
    path = tmp_path / "m.safetensors"
    save_model(path, model, SCHEDULE, "v", CLASSES, training=TRAINING, sampling={"guidance": 2.5})
    return path


def probe(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 8, 16, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([0.0, 10.0, 250.0, 499.0]), torch.tensor([0, 1, 2, 3]))


# --------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------


def test_fp32_round_trip_is_exact(model, model_file):
    mf = load_model(model_file)
    assert mf.config == model.config
    assert mf.schedule == SCHEDULE and torch.equal(mf.schedule.alphas_cumprod, SCHEDULE.alphas_cumprod)
    assert (mf.prediction, mf.class_names, mf.training, mf.sampling) == ("v", CLASSES, TRAINING, {"guidance": 2.5})
    assert mf.sha256 == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert mf.model_hash == mf.sha256[:10]
    assert mf.path == str(model_file)
    assert not mf.model.training  # loaded for inference
    for k, v in model.state_dict().items():
        assert torch.equal(mf.model.state_dict()[k], v), k
    out = probe(model)
    assert out.abs().max() > 0.1
    assert torch.equal(probe(mf.model), out)
    assert read_schedule(model_file) == SCHEDULE


def test_fp16_file_is_half_the_size_and_near_identical(tmp_path, model, model_file):
    half = tmp_path / "half.safetensors"
    save_model(half, model, SCHEDULE, "v", CLASSES, dtype=torch.float16)
    assert half.stat().st_size < 0.6 * model_file.stat().st_size
    with safe_open(half, "pt") as f:
        assert f.get_tensor("blocks.0.attn.qkv.weight").dtype == torch.float16
        assert f.metadata()["weights_dtype"] == "float16"
    mf = load_model(half)
    for k, v in model.state_dict().items():
        got = mf.model.state_dict()[k]
        assert got.dtype == torch.float32
        assert torch.equal(got, v.half().float()), k  # exactly the fp16 rounding, cast back
    ref = probe(model)
    out = probe(mf.model)
    assert not torch.equal(out, ref)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-2 * ref.abs().max().item())


def test_metadata_fields(model, model_file):
    """Read with safetensors itself, not through diffcli: every setting needed to sample is there."""
    with safe_open(model_file, "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == MODEL_FORMAT == "diffcli.model"
    assert meta["format_version"] == "1"
    assert meta["diffcli_version"] == diffcli.__version__
    assert json.loads(meta["model_config"]) == model.config.to_dict()
    assert json.loads(meta["schedule"]) == {"kind": "cosine", "num_timesteps": 500, "beta_start": 1e-4,
                                           "beta_end": 0.02, "zero_terminal_snr": False}
    assert meta["prediction"] == "v"
    assert json.loads(meta["class_names"]) == CLASSES
    assert json.loads(meta["training"]) == TRAINING
    assert json.loads(meta["sampling"]) == {"guidance": 2.5}
    assert json.loads(meta["image_size"]) == [8, 16] and json.loads(meta["channels"]) == 3
    assert keys == set(model.state_dict())
    assert "pos_embed" not in keys


# --------------------------------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------------------------------


def header_and_tensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(path, "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def rewrite(src: Path, dst: Path, **meta_changes: str) -> Path:
    """The same tensors under changed metadata strings."""
    meta, tensors = header_and_tensors(src)
    meta.update(meta_changes)
    save_file(tensors, dst, metadata=meta)
    return dst


def test_the_rewrite_helper_itself_gives_a_loadable_file(tmp_path, model_file):
    """So that the failures below come from the one change each makes."""
    mf = load_model(rewrite(model_file, tmp_path / "same.safetensors"))
    assert mf.class_names == CLASSES


@pytest.mark.parametrize(
    "make_bad,message",
    [
        (lambda src, dst: dst.write_bytes(src.read_bytes()[: len(src.read_bytes()) // 2]), "truncated"),
        (lambda src, dst: dst.write_bytes(src.read_bytes()[:-1]), "truncated"),
        (lambda src, dst: dst.write_bytes(src.read_bytes()[:30]), "truncated"),
        (lambda src, dst: dst.write_bytes(b""), "not a diffcli"),
        (lambda src, dst: dst.write_bytes(random.Random(0).randbytes(4096)), "truncated or not a safetensors"),
        (lambda src, dst: dst.write_bytes((20).to_bytes(8, "little") + b"{not json at all}   " + b"\0" * 64), "not a diffcli"),
        (lambda src, dst: save_file({"w": torch.ones(2, 2)}, dst), "without diffcli metadata"),
        (lambda src, dst: save_file({"w": torch.ones(2, 2)}, dst, metadata={"format": "pt"}), "'pt' file"),
        (lambda src, dst: rewrite(src, dst, format="diffcli.state"), "'diffcli.state' file"),
        (lambda src, dst: rewrite(src, dst, model_config="{not json"), "malformed 'model_config'"),
        (lambda src, dst: rewrite(src, dst, class_names="[cat, dog"), "malformed 'class_names'"),
        (lambda src, dst: rewrite(src, dst, class_names='["cat", "dog"]'), "class_names"),
        (lambda src, dst: rewrite(src, dst, prediction="x0"), "prediction"),
        (lambda src, dst: rewrite(src, dst, schedule='{"kind": "linear", "warmup": 3}'), "invalid model metadata"),
        (lambda src, dst: rewrite(src, dst, model_config='{"depth": 2, "hidden_size": 30}'), "invalid model metadata"),
        (lambda src, dst: rewrite(src, dst, format_version="2"), "newer"),
        (lambda src, dst: rewrite(src, dst, format_version="one"), "malformed format_version"),
    ],
    ids=["half", "last-byte", "in-header", "empty", "random", "header-not-json", "foreign", "foreign-format",
         "state-file", "config-json", "names-json", "names-count", "prediction", "schedule-field", "config-invalid",
         "future-version", "version-not-int"],
)
def test_bad_files_raise_input_error(tmp_path, model_file, make_bad, message):
    bad = tmp_path / "bad.safetensors"
    make_bad(model_file, bad)
    with pytest.raises(InputError, match=message):
        load_model(bad)


def test_tensor_shapes_that_do_not_match_the_config(tmp_path, model, model_file):
    cfg = model.config.to_dict()
    wider = json.dumps(cfg | {"hidden_size": 64, "num_heads": 2})
    with pytest.raises(InputError, match="do not match the model config"):
        load_model(rewrite(model_file, tmp_path / "wider.safetensors", model_config=wider))
    deeper = json.dumps(cfg | {"depth": 3})  # a missing block: strict loading notices
    with pytest.raises(InputError, match="do not match the model config"):
        load_model(rewrite(model_file, tmp_path / "deeper.safetensors", model_config=deeper))
    meta, tensors = header_and_tensors(model_file)
    tensors["extra.weight"] = torch.zeros(1)
    write(tmp_path / "extra.safetensors", tensors, {k: v for k, v in meta.items() if not k.startswith("format")}, MODEL_FORMAT)
    with pytest.raises(InputError, match="do not match the model config"):
        load_model(tmp_path / "extra.safetensors")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(InputError, match="not a file"):
        load_model(tmp_path)


# --------------------------------------------------------------------------------------------------
# Never unpickle
# --------------------------------------------------------------------------------------------------

UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unpickling_uses(source: str) -> list[str]:
    """Code (not comments or docstrings) that imports a pickle-like module or calls torch.load, except
    torch.load(..., weights_only=True): torch's restricted loader, which builds tensors and plain
    containers only (used for one file from elsewhere: the public Inception weights of `eval`)."""
    found = []
    tree = ast.parse(source)
    allowed = {
        id(node.func) for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load"
        and any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords)
    }
    for node in ast.walk(tree):
        if id(node) in allowed:
            continue
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in UNPICKLERS:
                found.append(node.module)
            if node.module in ("torch", "torch.serialization") and any(a.name == "load" for a in node.names):
                found.append(f"from {node.module} import load")
        elif isinstance(node, ast.Attribute) and node.attr == "load":
            base = ast.unparse(node.value)
            if base in ("torch", "torch.serialization", "serialization") or base in UNPICKLERS:
                found.append(f"{base}.load")
        elif isinstance(node, ast.Name) and node.id in UNPICKLERS:
            found.append(node.id)
        elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            found.append("allow_pickle=")
    return found


def test_the_unpickling_check_finds_what_it_looks_for():
    assert unpickling_uses("import torch\nsd = torch.load('x.pt')") == ["torch.load"]
    assert unpickling_uses("import torch\nsd = torch.load('x.pt', weights_only=False)") == ["torch.load"]
    assert unpickling_uses("import torch\nsd = torch.load('x.pt', weights_only=True)") == []  # torch's restricted loader
    assert unpickling_uses("import torch\nf = torch.load\nsd = f('x.pt', weights_only=True)") == ["torch.load"]
    assert unpickling_uses("import pickle as p") == ["pickle"]
    assert unpickling_uses("from torch import load") == ["from torch import load"]
    assert unpickling_uses('"""Never unpickled; no pickle here."""\n# torch.load is banned\nx = 1') == []


def test_no_pickle_or_torch_load_in_diffcli():
    package = Path(diffcli.__file__).parent
    files = sorted(package.rglob("*.py"))
    assert len(files) >= 10
    offenders = {str(f.relative_to(package)): uses for f in files if (uses := unpickling_uses(f.read_text()))}
    assert offenders == {}


# --------------------------------------------------------------------------------------------------
# The one validation step: before anything is built, bounded by the file
# --------------------------------------------------------------------------------------------------


def test_a_huge_claimed_model_is_refused_from_the_header_alone(tmp_path, model, model_file, monkeypatch):
    """Sizes in range but far beyond the tensors present: refused by the first tensor that disagrees,
    before any module is built (DiT is never constructed) and in well under a second."""
    import time

    import diffcli.files.checkpoint as ckpt

    cfg = model.config.to_dict() | {"depth": 1024, "hidden_size": 65536, "num_heads": 16}
    bad = rewrite(model_file, tmp_path / "huge.safetensors", model_config=json.dumps(cfg))
    monkeypatch.setattr(ckpt, "DiT", lambda cfg: pytest.fail("a model was built"))
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=r"tensor x_embedder.weight has shape \[32, 3, 4, 4\], the config needs \[65536, 3, 4, 4\]"):
        load_model(bad)
    with pytest.raises(InputError, match="x_embedder.weight has shape"):
        read_schedule(bad)
    assert time.perf_counter() - t0 < 1


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"model_config": {"depth": float("nan")}}, "model_config.depth must be an integer in [1, 1024], found NaN"),
        ({"weights_dtype": "float32"}, "is float16, the config needs float32"),
        ({"weights_dtype": "bfloat16"}, 'weights_dtype must be one of "float32", "float16", found "bfloat16"'),
        ({"class_names": '["a", "b", "a"]'}, "class_names[2] repeats the name"),
        ({"class_names": '["a", "b\\u001b[2J", "c"]'}, "class_names[1] holds a control character"),
        ({"sampling": '{"guidance": -1}'}, "sampling.guidance must be a finite number >= 0, found -1"),
        ({"image_size": "[8, 8]"}, "image_size is [8, 8], the model config has [8, 16]"),
        ({"prediction": "epsilon", "schedule": json.dumps(NoiseSchedule("linear", 500, zero_terminal_snr=True).to_dict())},
         "prediction 'epsilon' cannot be sampled with schedule.zero_terminal_snr"),
    ],
)
def test_metadata_fields_are_named_with_what_was_found(tmp_path, model, changes, words):
    half = tmp_path / "half.safetensors"
    save_model(half, model, SCHEDULE, "v", CLASSES, dtype=torch.float16)
    if isinstance(changes.get("model_config"), dict):  # fields changed in the model's own config (NaN as JSON writes it)
        changes = {**changes, "model_config": json.dumps(model.config.to_dict() | changes["model_config"])}
    bad = rewrite(half, tmp_path / "bad.safetensors", **changes)
    with pytest.raises(InputError) as info:
        load_model(bad)
    assert words in str(info.value) and str(bad) in str(info.value)


def test_weights_that_are_not_finite_are_refused(tmp_path, model_file):
    meta, tensors = header_and_tensors(model_file)
    tensors["blocks.1.mlp.2.weight"][3, 5] = float("nan")
    save_file(tensors, tmp_path / "nan.safetensors", metadata=meta)
    with pytest.raises(InputError, match="tensor blocks.1.mlp.2.weight holds NaN or infinite values"):
        load_model(tmp_path / "nan.safetensors")
    assert read_schedule(tmp_path / "nan.safetensors") == SCHEDULE  # the schedule alone needs no weights
