"""diffcli eval: tiny folders and tiny models, the statistics cache and its invalidation, bad input."""

import json
import os
import zipfile

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffcli import records
from diffcli.files.checkpoint import save_model
from diffcli.cli import app
from diffcli.errors import InputError
from diffcli.eval import cache as eval_cache
from diffcli.eval import features
from diffcli.diffusion.schedule import NoiseSchedule

runner = CliRunner()


def diffcli(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def result_of(r) -> dict:
    assert r.exit_code == 0, r.output
    (line,) = r.stdout.splitlines()
    rec = json.loads(line)
    records.check("eval", rec)
    return rec


def failed(r, code: int, *words: str) -> str:
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "Traceback" not in r.output
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def folders(toy_image_folder):
    """REAL and SAMPLES: three colour classes, 5 noisy 8x8 images each, drawn with different seeds."""
    return toy_image_folder(per_class=5, seed=0), toy_image_folder(per_class=5, seed=1)


def test_folder_against_folder_table_and_json(folders, tmp_path):
    real, samples = folders
    r = diffcli("eval", samples, "--real", real, "--cache", tmp_path / "c")
    assert r.exit_code == 0, r.output
    for word in ("FID", "KID", "precision (k=3)", "recall (k=3)", "class accuracy", "15 / 15", "auto", "red"):
        assert word in r.stdout
    assert "training the auto classifier on 15 images" in r.stderr
    rec = result_of(diffcli("eval", samples, "--real", real, "--cache", tmp_path / "c", "--json"))
    assert rec["features"] == "auto" and rec["n_samples"] == rec["n_real"] == 15 and rec["real_cached"] is True
    assert rec["fid"] >= 0 and rec["kid_subset_size"] == 15 and rec["model_hash"] is None
    # three well-separated colours: the classifier recognises every sample's class
    assert rec["accuracy"] == 1.0 and rec["per_class_accuracy"] == {"blue": 1.0, "green": 1.0, "red": 1.0}
    assert 0 <= rec["precision"] <= 1 and 0 <= rec["recall"] <= 1


def test_identical_sets_score_zero_and_other_colours_do_not(folders, tmp_path, toy_image_folder):
    real, _ = folders
    same = result_of(diffcli("eval", real, "--real", real, "--cache", tmp_path, "--json"))
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert same["precision"] == same["recall"] == 1.0
    gray = toy_image_folder(classes=("x", "y"), per_class=5, seed=2)  # gray images: far from every colour
    far = result_of(diffcli("eval", gray, "--real", real, "--cache", tmp_path, "--json"))
    assert far["fid"] > 1.0 and far["kid_mean"] > 0.01
    assert far["accuracy"] is None  # the classes x and y are not folders of REAL


def test_images_in_memory_score_as_the_same_images_in_a_folder(folders, tmp_path):
    """Evaluator.score_pixels (training's samples) against a folder of the same pixels as PNGs, for one
    and three channels, from a batch tensor whose images are views into one storage."""
    from diffcli.eval.evaluate import Evaluator

    real, samples = folders
    ev = Evaluator.prepare(real, "auto", cache_dir=tmp_path / "c")
    files = sorted(samples.rglob("*.png"))
    pixels = torch.stack([torch.frombuffer(bytearray(Image.open(f).convert("RGB").tobytes()), dtype=torch.uint8)
                          .reshape(8, 8, 3) for f in files]).permute(0, 3, 1, 2)  # (N, 3, 8, 8), non-contiguous views
    classes = [f.parent.name for f in files]
    from_folder = result_of(diffcli("eval", samples, "--real", real, "--cache", tmp_path / "c", "--json"))
    in_memory = ev.score_pixels(pixels, classes)
    assert in_memory.fid == pytest.approx(from_folder["fid"], rel=1e-9) and in_memory.accuracy == from_folder["accuracy"]
    gray = pixels[:, :1]  # one channel: images differ, so the FID of the set against itself is 0 only if each is read
    assert ev.score_pixels(gray).fid != ev.score_pixels(gray[:1].expand(len(gray), -1, -1, -1)).fid


def test_statistics_cache_is_reused_and_invalidated(folders, tmp_path):
    real, samples = folders
    c = tmp_path / "cache"
    first = result_of(diffcli("eval", samples, "--real", real, "--cache", c, "--json"))
    assert first["real_cached"] is False
    entries = sorted(p.name for p in c.iterdir())
    assert [e.split("-")[0] for e in entries] == ["auto", "real"]
    again = result_of(diffcli("eval", samples, "--real", real, "--cache", c, "--json"))
    assert again["real_cached"] is True
    assert [again[k] for k in ("fid", "kid_mean", "kid_std", "precision", "recall", "accuracy")] == \
        [first[k] for k in ("fid", "kid_mean", "kid_std", "precision", "recall", "accuracy")]

    # a moved copy of the folder has the same content: the same entries serve it
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(real, moved)
    assert result_of(diffcli("eval", samples, "--real", moved, "--cache", c, "--json"))["real_cached"] is True

    # one image edited in place: the content key changes, a new entry is built
    img = next((real / "red").iterdir())
    Image.new("RGB", (8, 8), (255, 0, 0)).save(img)
    edited = result_of(diffcli("eval", samples, "--real", real, "--cache", c, "--json"))
    assert edited["real_cached"] is False and edited["fid"] != first["fid"]

    # a damaged entry is never trusted: a line says why, it is rebuilt, and the figures are those of a fresh build
    stats = sorted(c.glob("real-*.safetensors"), key=lambda p: p.stat().st_mtime)[-1]
    data = bytearray(stats.read_bytes())
    data[-5] ^= 0xFF  # one byte of a tensor
    stats.write_bytes(bytes(data))
    r = diffcli("eval", samples, "--real", real, "--cache", c, "--json")
    rebuilt = result_of(r)
    assert "is invalid (the tensors do not match their recorded SHA-256), rebuilding" in r.stderr
    assert rebuilt["real_cached"] is False and rebuilt["fid"] == edited["fid"]
    stats.write_bytes(stats.read_bytes()[:100])  # truncated
    r = diffcli("eval", samples, "--real", real, "--cache", c, "--json")
    assert "is invalid" in r.stderr and result_of(r)["fid"] == edited["fid"]
    # the classifier's entry too
    net = sorted(c.glob("auto-*.safetensors"), key=lambda p: p.stat().st_mtime)[-1]
    net.write_bytes(b"not a safetensors file at all")
    r = diffcli("eval", samples, "--real", real, "--cache", c, "--json")
    assert f"eval cache {net} is invalid" in r.stderr and "training the auto classifier" in r.stderr
    assert result_of(r)["fid"] == pytest.approx(edited["fid"], rel=1e-6)  # seeded training: the same network
    assert not list(c.glob(".*.tmp"))


def test_cache_entries_for_another_folder_are_refused(folders, tmp_path):
    """An entry renamed to another folder's name (or a hash prefix collision) fails its key check."""
    real, samples = folders
    c = tmp_path / "c"
    result_of(diffcli("eval", samples, "--real", real, "--cache", c, "--json"))
    log: list[str] = []
    (stats,) = c.glob("real-*.safetensors")
    assert eval_cache.read_stats(stats, "0" * 64, 128, log.append) is None
    assert "made for another folder or feature network" in log[0]
    (net,) = c.glob("auto-*.safetensors")
    assert eval_cache.read_net(net, "0" * 64, log.append) is None and "made for another folder" in log[1]


def test_unconditional_real_folder_uses_the_views_discriminator(toy_image_folder, tmp_path):
    real = toy_image_folder(classes=(), per_class=12, seed=0)
    samples = toy_image_folder(classes=(), per_class=6, seed=1)
    r = diffcli("eval", samples, "--real", real, "--cache", tmp_path, "--json")
    rec = result_of(r)
    assert "real vs blurred, noisy and ghosted views" in r.stderr
    assert rec["accuracy"] is None and rec["n_real"] == 12 and rec["kid_subset_size"] == 6


@pytest.fixture
def color_model(tmp_path, make_dit):
    path = tmp_path / "m.safetensors"
    save_model(path, make_dit(num_classes=3, seed=1), NoiseSchedule("cosine", 1000), "v", ["blue", "green", "red"])
    return path


def test_model_file_is_sampled_first(folders, tmp_path, color_model, make_dit):
    real, _ = folders
    r = diffcli("eval", color_model, "--real", real, "--num-images", 6, "--seed", 3, "--cache", tmp_path / "c", "--json")
    rec = result_of(r)
    assert rec["n_samples"] == 6 and rec["seed"] == 3 and len(rec["model_hash"]) == 10
    assert rec["accuracy"] is not None and set(rec["per_class_accuracy"]) == {"blue", "green", "red"}
    # a class model whose class names are not REAL's folders: FID still, accuracy null, and a line naming them
    other = tmp_path / "other.safetensors"
    save_model(other, make_dit(num_classes=2, seed=1), NoiseSchedule("cosine", 1000), "v", ["cat", "dog"])
    r = diffcli("eval", other, "--real", real, "-n", 4, "--cache", tmp_path / "c", "--json")
    assert result_of(r)["accuracy"] is None
    assert "the samples' classes cat, dog are not class folders of REAL" in r.stderr


# --------------------------------------------------------------------------------------------------
# Bad input: one line, the documented exit code, no traceback, nothing left in the cache
# --------------------------------------------------------------------------------------------------


def test_bad_folders(tmp_path, folders):
    real, samples = folders
    c = tmp_path / "cache"
    empty = tmp_path / "empty"
    empty.mkdir()
    failed(diffcli("eval", empty, "--real", real, "--cache", c), 4, "no images found in", str(empty))
    failed(diffcli("eval", samples, "--real", empty, "--cache", c), 4, "no images found in")
    failed(diffcli("eval", samples, "--real", tmp_path / "nope", "--cache", c), 4, "REAL: data folder not found")
    failed(diffcli("eval", tmp_path / "nope", "--real", real, "--cache", c), 4, "SAMPLES not found")
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (8, 8)).save(one / "a.png")
    failed(diffcli("eval", one, "--real", real, "--cache", c), 4, "only 1 readable image", "FID needs at least 2")
    failed(diffcli("eval", samples, "--real", one, "--cache", c), 4, "REAL", "FID needs at least 2")
    text = tmp_path / "text"
    text.mkdir()
    (text / "notes.txt").write_text("hello")
    failed(diffcli("eval", text, "--real", real, "--cache", c), 4, "no images found")
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(3):
        (junk / f"{i}.png").write_bytes(b"not a png")
    failed(diffcli("eval", samples, "--real", junk, "--cache", c), 4, "no readable image")
    assert not c.exists() or not list(c.iterdir())  # no entry, partial or stale, from any of these
    # junk samples are found out after REAL is ready: REAL's entries are complete and valid, nothing else
    failed(diffcli("eval", junk, "--real", real, "--cache", c, "-q"), 4, "SAMPLES", "no readable image")
    assert sorted(p.name.split("-")[0] for p in c.iterdir()) == ["auto", "real"]


def test_bad_options(tmp_path, folders, color_model):
    real, samples = folders
    c = tmp_path / "c"
    failed(diffcli("eval", samples, "--real", real, "--features", "vgg", "--cache", c), 2, "--features must be auto or inception")
    failed(diffcli("eval", samples, "--real", real, "-n", 10, "--cache", c), 2, "--num-images applies when SAMPLES is a model file")
    failed(diffcli("eval", color_model, "--real", real, "-n", 1, "--cache", c), 2, "--num-images must be between 2")
    assert diffcli("eval", samples, "--cache", c).exit_code == 2  # --real is required
    assert not c.exists()


def test_model_files_of_another_kind(tmp_path, folders, color_model):
    real, _ = folders
    c = tmp_path / "c"
    pt = tmp_path / "m.pt"
    with zipfile.ZipFile(pt, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    failed(diffcli("eval", pt, "--real", real, "--cache", c), 4, "not safetensors")
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(foreign))
    failed(diffcli("eval", foreign, "--real", real, "--cache", c), 4, "not a diffcli model file")
    # a cache entry is a diffcli file too, but not a model file
    result_of(diffcli("eval", real, "--real", real, "--cache", c, "--json"))
    entry = next(c.glob("real-*.safetensors"))
    failed(diffcli("eval", entry, "--real", real, "--cache", c), 4, "'diffcli.evalstats' file, not a diffcli model file")
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(color_model.read_bytes()[:-3])
    failed(diffcli("eval", truncated, "--real", real, "--cache", c), 4, "truncated")


def test_error_is_a_json_record_too(tmp_path, folders):
    real, _ = folders
    r = diffcli("eval", tmp_path / "nope", "--real", real, "--cache", tmp_path, "--json")
    assert r.exit_code == 4
    (line,) = r.stdout.splitlines()
    rec = json.loads(line)
    records.check("eval", rec)
    assert rec["kind"] == "error" and rec["exit_code"] == 4


# --------------------------------------------------------------------------------------------------
# --features inception
# --------------------------------------------------------------------------------------------------


def test_inception_needs_a_weights_file_and_never_downloads(folders, tmp_path, monkeypatch):
    real, samples = folders
    monkeypatch.delenv(features.INCEPTION_ENV, raising=False)
    line = failed(diffcli("eval", samples, "--real", real, "--features", "inception", "--cache", tmp_path), 2,
                  "--inception-weights", features.INCEPTION_FILE, features.INCEPTION_URL, "never downloads")
    assert "pip install" not in line
    failed(diffcli("eval", samples, "--real", real, "--inception-weights", tmp_path / "missing.pth", "--cache", tmp_path),
           4, "Inception weights not found", features.INCEPTION_FILE)
    # the environment variable makes inception the default
    failed(diffcli("eval", samples, "--real", real, "--cache", tmp_path,
                   env={features.INCEPTION_ENV: str(tmp_path / "missing.pth")}), 4, "Inception weights not found")


def test_wrong_and_truncated_inception_weights(folders, tmp_path):
    real, samples = folders
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x02" + b"x" * 100)
    failed(diffcli("eval", samples, "--real", real, "--inception-weights", garbage, "--cache", tmp_path), 4,
           "is not an Inception-v3 weights file", "a torch.save file the weights-only loader refuses")
    truncated = tmp_path / "truncated.pth"
    torch.save({"a": torch.zeros(3)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    failed(diffcli("eval", samples, "--real", real, "--inception-weights", truncated, "--cache", tmp_path), 4,
           "is not an Inception-v3 weights file")
    png = tmp_path / "image.png"
    Image.new("RGB", (4, 4)).save(png)
    failed(diffcli("eval", samples, "--real", real, "--inception-weights", png, "--cache", tmp_path), 4,
           "neither a torch .pth nor a safetensors file")
    nan = tmp_path / "nan.safetensors"
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.full((2, 2), float("nan"))}, str(nan))
    failed(diffcli("eval", samples, "--real", real, "--inception-weights", nan, "--cache", tmp_path), 4, "NaN")
    assert not list(tmp_path.glob("*-*.safetensors"))


class Runs:
    """An object whose deserialisation would run a command (creating a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_layout", [True, False], ids=["zip", "legacy"])
def test_torch_save_weights_are_read_as_tensors_and_nothing_else(tmp_path, zip_layout):
    g = torch.Generator().manual_seed(0)
    state = {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "bn.num_batches_tracked": torch.tensor(7),
             "half": torch.randn(3, generator=g).half(), "t": torch.randn(3, 5, generator=g).T}
    torch.save(state, tmp_path / "w.pth", _use_new_zipfile_serialization=zip_layout)
    got = features.read_inception_weights(tmp_path / "w.pth")
    assert list(got) == list(state) and all(torch.equal(got[k], state[k]) for k in state)
    # a file that would run a command when read: refused, and the command never ran
    marker = tmp_path / "ran"
    torch.save({"w": torch.zeros(2), "x": Runs(marker)}, tmp_path / "evil.pth", _use_new_zipfile_serialization=zip_layout)
    with pytest.raises(InputError, match="weights-only loader refuses"):
        features.read_inception_weights(tmp_path / "evil.pth")
    assert not marker.exists()
    for name, obj in (("list.pth", {"w": [1, 2]}), ("bare.pth", torch.zeros(3))):
        torch.save(obj, tmp_path / name, _use_new_zipfile_serialization=zip_layout)
        with pytest.raises(InputError, match="mapping of names to tensors"):
            features.read_inception_weights(tmp_path / name)
    # a stride-0 view of 2^40 elements over one stored value would take terabytes once copied
    huge = torch.zeros(1).as_strided((2**40,), (0,))
    torch.save({"w": huge}, tmp_path / "huge.pth", _use_new_zipfile_serialization=zip_layout)
    with pytest.raises(InputError, match="larger than the data stored for it"):
        features.read_inception_weights(tmp_path / "huge.pth")


def test_inception_without_the_extra_says_how_to_install_it(folders, tmp_path, monkeypatch):
    real, samples = folders
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(weights))
    real_find = features.importlib.util.find_spec
    monkeypatch.setattr(features.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch_fidelity" else real_find(name, *a))
    monkeypatch.delitem(features.sys.modules, "torch_fidelity", raising=False)
    failed(diffcli("eval", samples, "--real", real, "--inception-weights", weights, "--cache", tmp_path), 2,
           "pip install 'diffcli[eval]'")


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the names and shapes torch-fidelity's Inception-v3 has (found on the meta
    device, so nothing is initialised twice); BatchNorm variances positive."""
    mod = features._fidelity_inception_module()
    cls = mod.FeatureExtractorInceptionV3
    keep, keep_load = mod.load_state_dict_from_url, cls.load_state_dict
    mod.load_state_dict_from_url, cls.load_state_dict = (lambda *a, **k: None), (lambda self, sd, strict=True: None)
    try:
        with torch.device("meta"):
            shapes = {k: (v.shape, v.dtype) for k, v in cls("shapes", ["2048"]).state_dict().items()}
    finally:
        mod.load_state_dict_from_url, cls.load_state_dict = keep, keep_load
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, (shape, dtype) in shapes.items():
        if not dtype.is_floating_point:
            state[k] = torch.zeros(shape, dtype=dtype)
        elif k.endswith("running_var"):
            state[k] = 0.5 + torch.rand(shape, generator=g)
        else:
            state[k] = torch.randn(shape, generator=g) * 0.05
    return state


def test_inception_features_with_random_weights(tmp_path, toy_image_folder):
    """Needs torch-fidelity (the eval extra); skipped without it."""
    if features.importlib.util.find_spec("torch_fidelity") is None:
        pytest.skip("torch-fidelity (the eval extra) is not installed")
    from safetensors.torch import save_file

    state = random_inception_state()
    weights = tmp_path / "random.safetensors"
    save_file(state, str(weights))
    pth = tmp_path / "random.pth"
    torch.save(state, pth)  # torch-fidelity's own file is a torch.save file: read without running it
    from_pth = features.inception(str(pth), torch.device("cpu"))
    assert from_pth.digest == features.weights_digest(state, "inception-v3-compat|pil-bicubic-uint8")
    real = toy_image_folder(classes=(), per_class=2, seed=0)
    samples = toy_image_folder(classes=(), per_class=2, seed=1)
    rec = result_of(diffcli("eval", samples, "--real", real, "--inception-weights", weights, "--cache", tmp_path, "--json"))
    assert rec["features"] == "inception" and rec["n_real"] == 2 and rec["precision"] is None
    assert rec["classifier_accuracy"] is None  # no classes: no classifier trained
    assert [p.name.split("-")[0] for p in tmp_path.glob("*.safetensors") if p != weights] == ["real"]
    # a file with a tensor missing, or one of another shape: an InputError naming it
    del state["fc.bias"]
    with pytest.raises(InputError, match="does not hold the FID Inception-v3 weights.*fc.bias"):
        features.build_inception(state, "w.pth")
    state["fc.bias"] = torch.zeros(7)
    with pytest.raises(InputError, match="size mismatch for fc.bias"):
        features.build_inception(state, "w.pth")
    assert "torch_fidelity" not in features.sys.modules  # the stand-in package was removed again
