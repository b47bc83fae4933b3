"""reconstruct: PSNR and SSIM against closed forms and a loop-over-windows reference; the folder round
trip (names, sizes, channels, numbers recomputed from the written files); every refusal before a write."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffcli import reconstruct as rc
from diffcli.models.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from diffcli.files.autoencoder_file import AutoencoderFile, load_autoencoder, save_autoencoder
from diffcli.errors import InputError, OutputExistsError, UsageError
from diffcli.reconstruct import PSNR_CAP, psnr, reconstruct, ssim

# --------------------------------------------------------------------------------------------------
# PSNR
# --------------------------------------------------------------------------------------------------


def test_psnr_of_a_constant_offset_is_the_closed_form():
    a = torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.8
    offsets = torch.tensor([0.1, 0.025], dtype=torch.float64).view(2, 1, 1, 1)
    got = psnr(a, a + offsets)
    want = torch.tensor([10 * math.log10(1 / 0.1**2), 10 * math.log10(1 / 0.025**2)], dtype=torch.float64)
    assert got.dtype == torch.float64 and got.shape == (2,)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)  # 20 dB and 32.04 dB
    # on a 0..255 scale with peak 255: the same numbers
    torch.testing.assert_close(psnr(a * 255, (a + offsets) * 255, peak=255.0), want, rtol=0, atol=1e-9)


def test_psnr_of_identical_images_is_inf():
    a = torch.rand(3, 1, 4, 4)
    b = a.clone()
    b[2, 0, 0, 0] += 0.5  # only the last image differs
    got = psnr(a, b)
    assert math.isinf(got[0]) and got[0] > 0 and math.isinf(got[1])
    assert math.isfinite(got[2])


def test_metrics_refuse_mismatched_shapes():
    with pytest.raises(ValueError):
        psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))
    with pytest.raises(ValueError):
        ssim(torch.zeros(3, 4, 4), torch.zeros(3, 4, 4))


# --------------------------------------------------------------------------------------------------
# SSIM
# --------------------------------------------------------------------------------------------------


def reference_ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Wang et al. 2004, written out: one (C, H, W) pair, every full window visited in Python loops,
    statistics in the two-pass form sum w (x - mu)^2 (the code under test uses E[x^2] - mu^2)."""
    C, H, W = a.shape
    kh = min(11, H) if min(11, H) % 2 else min(11, H) - 1
    kw = min(11, W) if min(11, W) % 2 else min(11, W) - 1

    def taps(k: int) -> list[float]:
        g = [math.exp(-((i - (k - 1) / 2) ** 2) / (2 * 1.5**2)) for i in range(k)]
        return [v / sum(g) for v in g]

    gy, gx = taps(kh), taps(kw)
    c1, c2 = 0.01**2, 0.03**2
    total, count = 0.0, 0
    for c in range(C):
        for top in range(H - kh + 1):
            for left in range(W - kw + 1):
                cells = [(gy[i] * gx[j], float(a[c, top + i, left + j]), float(b[c, top + i, left + j]))
                         for i in range(kh) for j in range(kw)]
                mx = sum(w * x for w, x, _ in cells)
                my = sum(w * y for w, _, y in cells)
                vx = sum(w * (x - mx) ** 2 for w, x, _ in cells)
                vy = sum(w * (y - my) ** 2 for w, _, y in cells)
                cxy = sum(w * (x - mx) * (y - my) for w, x, y in cells)
                total += (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
                count += 1
    return total / count


@pytest.mark.parametrize("shape", [(3, 12, 12), (1, 13, 12), (2, 8, 9), (1, 2, 15)])
def test_ssim_matches_the_loop_over_windows(shape):
    """12x12: 2x2 full windows; 8x9: a 7x9 window (sides under 11 use the largest odd fit); 2x15: 1x11."""
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.rand(2, *shape, generator=g, dtype=torch.float64)
    b = (a + 0.15 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = ssim(a, b)
    assert got.dtype == torch.float64 and got.shape == (2,)
    for i in range(2):
        assert abs(float(got[i]) - reference_ssim(a[i], b[i])) < 1e-6


def test_ssim_of_identical_images_is_exactly_one():
    a = torch.rand(3, 3, 16, 20, generator=torch.Generator().manual_seed(1))
    assert ssim(a, a.clone()).tolist() == [1.0, 1.0, 1.0]


def test_ssim_of_two_constant_images_is_the_luminance_term():
    """No variance, no covariance: the contrast-structure factor is C2 / C2 = 1."""
    a = torch.full((1, 3, 14, 14), 0.3)
    b = torch.full((1, 3, 14, 14), 0.7)
    c1 = 0.01**2
    want = (2 * 0.3 * 0.7 + c1) / (0.3**2 + 0.7**2 + c1)
    assert abs(float(ssim(a, b)[0]) - want) < 1e-7  # float32 inputs: 0.3 is 0.30000001...


def test_ssim_is_symmetric_and_below_one_for_noise():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(4, 3, 16, 16, generator=g)
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    ab, ba = ssim(a, b), ssim(b, a)
    torch.testing.assert_close(ab, ba, rtol=0, atol=1e-15)
    assert (ab < 1).all() and (ab > 0).all()
    assert (ssim(a, torch.rand(a.shape, generator=g)) < ab).all()  # unrelated images: less similar


# --------------------------------------------------------------------------------------------------
# The folder round trip
# --------------------------------------------------------------------------------------------------


def tiny_ae(channels: int = 3, seed: int = 0) -> AutoencoderKL:
    """f = 2, widths 8 and 16: a forward pass of a 16x16 image takes a few ms."""
    torch.manual_seed(seed)  # nn.Module initialisation draws from the global generator
    cfg = AutoencoderConfig(in_channels=channels, out_channels=channels, latent_channels=4,
                            block_out_channels=(8, 16), norm_num_groups=4)
    return AutoencoderKL(cfg).eval()


@pytest.fixture(scope="module")
def ae_files(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("ae")
    paths = {}
    for c in (1, 3):
        paths[c] = root / f"ae{c}.safetensors"
        save_autoencoder(paths[c], tiny_ae(c, seed=c))
    return paths


def write_image(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> Path:
    """A smooth gradient plus seeded noise, so that crops and channels are told apart."""
    g = torch.Generator().manual_seed(seed)
    C = 3 if mode == "RGB" else 1
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    base = torch.stack([(xx * 9 + yy * 5 + 40 * c) % 256 for c in range(C)], -1).float()  # (H, W, C)
    pixels = (base + torch.randint(-20, 21, base.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.frombytes(mode, (width, height), bytes(pixels.flatten().tolist()))
    im.save(path)
    return path


def read(path: Path, mode: str) -> torch.Tensor:
    """uint8 (C, H, W) of a file, converted to the mode."""
    with Image.open(path) as im:
        im = im.convert(mode)
        C = 3 if mode == "RGB" else 1
        return torch.tensor(list(im.tobytes()), dtype=torch.uint8).reshape(im.height, im.width, C).permute(2, 0, 1)


def center_crop(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    top, left = (x.shape[1] - H) // 2, (x.shape[2] - W) // 2
    return x[:, top:top + H, left:left + W]


def run(*args, **kwargs) -> tuple[list[dict], dict]:
    records = list(reconstruct(*args, **kwargs))
    assert [r["kind"] for r in records] == ["image"] * (len(records) - 1) + ["summary"]
    return records[:-1], records[-1]


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """Class subfolders and a loose file; RGB and gray; odd sizes; PNG and BMP."""
    root = tmp_path / "in"
    write_image(root / "cats" / "a.png", 9, 7, seed=1)  # -> 8x6
    write_image(root / "cats" / "b.bmp", 12, 10, "L", seed=2)  # gray, already a multiple of 2
    write_image(root / "dogs" / "c.png", 9, 7, "L", seed=3)  # same size as a.png: one batch
    write_image(root / "loose.png", 5, 11, seed=4)  # -> 4x10
    return root


def test_writes_one_png_per_image_at_its_own_size_cropped_to_the_factor(mixed_folder, ae_files, tmp_path):
    out = tmp_path / "out"
    records, summary = run(ae_files[3], mixed_folder, out, batch_size=4)
    by_file = {r["file"]: r for r in records}
    assert set(by_file) == {"cats/a.png", "cats/b.bmp", "dogs/c.png", "loose.png"}
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["cats/a.png", "cats/b.png", "dogs/c.png", "loose.png"]
    sizes = {"cats/a.png": (6, 8), "cats/b.bmp": (10, 12), "dogs/c.png": (6, 8), "loose.png": (10, 4)}
    for f, (H, W) in sizes.items():
        r = by_file[f]
        assert (r["height"], r["width"]) == (H, W)
        assert Path(r["out"]) == out / Path(f).with_suffix(".png")
        with Image.open(r["out"]) as im:
            assert im.size == (W, H) and im.mode == "RGB"  # gray inputs come back as RGB from an RGB autoencoder
    assert summary["images"] == 4 and summary["factor"] == 2
    assert summary["autoencoder"] == str(ae_files[3])
    assert summary["autoencoder_hash"] == load_autoencoder(ae_files[3]).hash
    assert summary["seconds"] >= 0


def test_numbers_are_those_of_the_written_files(mixed_folder, ae_files, tmp_path):
    """PSNR and SSIM recomputed here from the input (decoded and cropped by the test) and the PNG
    written: both sides are 8-bit, so they agree to float64 rounding, not to a quantisation tolerance."""
    records, summary = run(ae_files[3], mixed_folder, tmp_path / "out", batch_size=2)
    for r in records:
        H, W = r["height"], r["width"]
        a = center_crop(read(mixed_folder / r["file"], "RGB"), H, W).double()[None] / 255
        b = read(Path(r["out"]), "RGB").double()[None] / 255
        mse = float(((a - b) ** 2).mean())
        assert abs(r["psnr"] - 10 * math.log10(1 / mse)) < 1e-9
        assert abs(r["ssim"] - reference_ssim(a[0], b[0])) < 1e-6
    psnrs = {r["file"]: r["psnr"] for r in records}
    ssims = {r["file"]: r["ssim"] for r in records}
    assert summary["psnr_mean"] == pytest.approx(sum(psnrs.values()) / 4, abs=1e-12)
    assert summary["ssim_mean"] == pytest.approx(sum(ssims.values()) / 4, abs=1e-12)
    assert summary["psnr_worst"] == min(psnrs.values()) <= summary["psnr_mean"]
    assert summary["ssim_worst"] == min(ssims.values()) <= summary["ssim_mean"]
    assert psnrs[summary["worst_psnr_file"]] == summary["psnr_worst"]
    assert ssims[summary["worst_ssim_file"]] == summary["ssim_worst"]


def test_the_reconstruction_decodes_the_posterior_mean(mixed_folder, ae_files, tmp_path):
    """The PNG is decode(mean) to within one 8-bit level (batching may move a value across a rounding
    edge); a sample from the posterior (logvar about 0 in an untrained autoencoder) is far from it."""
    records, _ = run(ae_files[3], mixed_folder, tmp_path / "out")
    model = load_autoencoder(ae_files[3]).model
    r = next(r for r in records if r["file"] == "cats/a.png")
    x = center_crop(read(mixed_folder / "cats" / "a.png", "RGB"), 6, 8)[None].float() / 127.5 - 1
    with torch.no_grad():
        q = model.encode(x)
        mean = ((model.decode(q.mode()).clamp(-1, 1) + 1) * 127.5).round()
        sampled = ((model.decode(q.sample(torch.Generator().manual_seed(0))).clamp(-1, 1) + 1) * 127.5).round()
    got = read(Path(r["out"]), "RGB")[None].float()
    assert (got - mean).abs().max() <= 1
    assert (got - sampled).abs().max() > 5


def test_resolution_resizes_every_image_like_training(mixed_folder, ae_files, tmp_path):
    records, _ = run(ae_files[1], mixed_folder, tmp_path / "out", resolution="6x4")
    assert len(records) == 4
    for r in records:
        assert (r["height"], r["width"]) == (6, 4)
        with Image.open(r["out"]) as im:
            assert im.size == (4, 6) and im.mode == "L"  # a gray autoencoder writes gray PNGs
    with pytest.raises(UsageError, match="multiple"):
        reconstruct(ae_files[1], mixed_folder, tmp_path / "out2", resolution="7")
    with pytest.raises(UsageError):
        reconstruct(ae_files[1], mixed_folder, tmp_path / "out2", resolution="big")
    assert not (tmp_path / "out2").exists()


def test_progress_counts_images(mixed_folder, ae_files, tmp_path):
    calls = []
    run(ae_files[3], mixed_folder, tmp_path / "out", batch_size=1, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


# --------------------------------------------------------------------------------------------------
# An exact round trip (an identity autoencoder): inf PSNR, the capped mean, channel conversions
# --------------------------------------------------------------------------------------------------


class _Identity(torch.nn.Module):
    """f = 1: the latent is the image. Optionally blackens the top-left pixel, so an image whose
    top-left pixel is black already comes back exactly and the others do not."""

    def __init__(self, blacken: bool) -> None:
        super().__init__()
        self.blacken = blacken

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(torch.cat([x, torch.full_like(x, 5.0)], dim=1))  # logvar 5: a sample is noise

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z.clone()
        if self.blacken:
            z[:, :, 0, 0] = -1
        return z


@pytest.fixture
def identity_ae(monkeypatch, tmp_path):
    def use(channels: int, blacken: bool = False, levels: int = 1) -> Path:
        """levels: the factor is 2**(levels - 1) (the identity ignores it but the crop obeys it)."""
        cfg = AutoencoderConfig(in_channels=channels, out_channels=channels, latent_channels=channels,
                                block_out_channels=(4,) * levels, norm_num_groups=4)

        def load(path, device="cpu"):
            return AutoencoderFile(_Identity(blacken), cfg, None, sha256="ab" * 32, path=str(path))

        monkeypatch.setattr(rc, "load_autoencoder", load)
        return tmp_path / "identity.safetensors"

    return use


def test_an_exact_round_trip_scores_inf_and_one_and_caps_the_mean(tmp_path, identity_ae):
    folder = tmp_path / "in"
    write_image(folder / "rgb.png", 5, 4, seed=1)
    write_image(folder / "gray.png", 3, 6, "L", seed=2)
    records, summary = run(identity_ae(3), folder, tmp_path / "out")
    assert all(r["psnr"] == math.inf and r["ssim"] == 1.0 for r in records)
    assert summary["psnr_mean"] == PSNR_CAP and summary["psnr_worst"] == math.inf and summary["ssim_mean"] == 1.0
    assert summary["factor"] == 1 and summary["autoencoder_hash"] == "ab" * 5
    # the gray image went in (and came out) as RGB with three equal channels
    assert torch.equal(read(tmp_path / "out" / "gray.png", "RGB"), read(folder / "gray.png", "RGB"))


def test_the_mean_counts_an_exact_image_as_the_cap(tmp_path, identity_ae):
    folder = tmp_path / "in"
    write_image(folder / "a.png", 6, 6, seed=1)
    Image.new("RGB", (6, 6), (0, 0, 0)).save(folder / "b.png")  # black: the blackened pixel changes nothing
    records, summary = run(identity_ae(3, blacken=True), folder, tmp_path / "out")
    p = {r["file"]: r["psnr"] for r in records}
    assert p["b.png"] == math.inf and math.isfinite(p["a.png"])
    assert summary["psnr_mean"] == pytest.approx((p["a.png"] + PSNR_CAP) / 2, abs=1e-12)
    assert summary["psnr_worst"] == p["a.png"] and summary["worst_psnr_file"] == "a.png"


def test_the_crop_is_centred(tmp_path, identity_ae):
    """f = 4: 11x7 -> 8x4, 2 (left) + 1 (right) columns and 1 + 2 rows cut off; 4x13 -> 4x12, 0 + 1 rows."""
    folder = tmp_path / "in"
    write_image(folder / "a.png", 11, 7, seed=1)
    write_image(folder / "b.png", 4, 13, "L", seed=2)
    _, summary = run(identity_ae(3, levels=3), folder, tmp_path / "out")
    assert summary["factor"] == 4
    for name, (H, W) in {"a.png": (4, 8), "b.png": (12, 4)}.items():
        want = center_crop(read(folder / name, "RGB"), H, W)
        assert torch.equal(read(tmp_path / "out" / name, "RGB"), want)


def test_rgb_goes_to_a_gray_autoencoder_as_luma(tmp_path, identity_ae):
    folder = tmp_path / "in"
    write_image(folder / "rgb.png", 5, 4, seed=1)
    write_image(folder / "gray.png", 3, 6, "L", seed=2)
    records, _ = run(identity_ae(1), folder, tmp_path / "out")
    assert all(r["psnr"] == math.inf for r in records)
    for name in ("rgb.png", "gray.png"):
        with Image.open(tmp_path / "out" / name) as im:
            assert im.mode == "L"
        assert torch.equal(read(tmp_path / "out" / name, "L"), read(folder / name, "L"))  # PIL's luma


# --------------------------------------------------------------------------------------------------
# Refusals: each before anything is written
# --------------------------------------------------------------------------------------------------


def nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.rglob("*"))


def test_bad_autoencoder_files(mixed_folder, tmp_path, make_dit):
    from diffcli.files.checkpoint import save_model
    from diffcli.diffusion.schedule import NoiseSchedule

    out = tmp_path / "out"
    with pytest.raises(InputError, match="not found"):
        reconstruct(tmp_path / "missing.safetensors", mixed_folder, out)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(InputError):
        reconstruct(junk, mixed_folder, out)
    model = tmp_path / "model.safetensors"
    save_model(model, make_dit(), NoiseSchedule("cosine", 100), "v", [])
    with pytest.raises(InputError):
        reconstruct(model, mixed_folder, out)
    lopsided = tmp_path / "lopsided.safetensors"  # 3 channels in, 1 out: nothing to compare
    cfg = AutoencoderConfig(in_channels=3, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4)
    save_autoencoder(lopsided, AutoencoderKL(cfg))
    with pytest.raises(InputError, match="3-channel images and gives 1-channel"):
        reconstruct(lopsided, mixed_folder, out)
    assert nothing_written(out)


def test_a_folder_without_images(tmp_path, ae_files):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match=r"no images found in .*empty"):
        reconstruct(ae_files[3], empty, tmp_path / "out")
    with pytest.raises(InputError, match="not found"):
        reconstruct(ae_files[3], tmp_path / "nowhere", tmp_path / "out")


def test_existing_output_stops_the_run_before_any_write(mixed_folder, ae_files, tmp_path):
    out = tmp_path / "out"
    (out / "dogs").mkdir(parents=True)
    (out / "dogs" / "c.png").write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match=r"c\.png") as e:
        reconstruct(ae_files[3], mixed_folder, out)
    assert e.value.exit_code == 3
    assert [p for p in out.rglob("*") if p.is_file()] == [out / "dogs" / "c.png"]  # nothing else written
    assert (out / "dogs" / "c.png").read_bytes() == b"keep me"
    records, _ = run(ae_files[3], mixed_folder, out, overwrite=True)
    assert len(records) == 4
    with Image.open(out / "dogs" / "c.png") as im:
        assert im.size == (8, 6)


def test_out_inside_the_folder_is_refused(mixed_folder, ae_files):
    for out in (mixed_folder, mixed_folder / "cats" / "recon"):
        with pytest.raises(UsageError, match="inside the image folder"):
            reconstruct(ae_files[3], mixed_folder, out)
    assert not (mixed_folder / "cats" / "recon").exists()


def test_two_inputs_with_one_output_name_are_refused(tmp_path, ae_files):
    folder = tmp_path / "in"
    write_image(folder / "x.png", 4, 4)
    write_image(folder / "x.bmp", 4, 4)
    with pytest.raises(UsageError, match="both be reconstructed as"):
        reconstruct(ae_files[3], folder, tmp_path / "out")
    assert nothing_written(tmp_path / "out")


def test_an_image_smaller_than_the_factor_is_named(mixed_folder, ae_files, tmp_path):
    write_image(mixed_folder / "thin.png", 1, 9)
    with pytest.raises(InputError, match=r"thin\.png is 1x9 pixels, smaller than the autoencoder's factor 2"):
        reconstruct(ae_files[3], mixed_folder, tmp_path / "out")
    assert nothing_written(tmp_path / "out")
    records, _ = run(ae_files[3], mixed_folder, tmp_path / "out", resolution="4")  # resized: fine
    assert len(records) == 5


def test_an_unreadable_image_is_named(mixed_folder, ae_files, tmp_path):
    (mixed_folder / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(InputError, match=r"broken\.png"):
        reconstruct(ae_files[3], mixed_folder, tmp_path / "out")
    assert nothing_written(tmp_path / "out")


def test_an_output_that_would_replace_an_input_is_refused(tmp_path, ae_files):
    """The folder inside --out: in/in/x.png would be written to out/in/x.png, which is in/x.png."""
    out = tmp_path / "out"
    folder = out / "in"
    write_image(folder / "x.png", 4, 4, seed=1)
    write_image(folder / "in" / "x.png", 4, 4, seed=2)
    before = (folder / "x.png").read_bytes()
    with pytest.raises(UsageError, match="replace an input"):
        reconstruct(ae_files[3], folder, out, overwrite=True)
    assert (folder / "x.png").read_bytes() == before and not (out / "x.png").exists()


# --------------------------------------------------------------------------------------------------
# The command, as a user runs it
# --------------------------------------------------------------------------------------------------


def test_reconstruct_command_prints_the_summary_and_json_records(tmp_path, ae_files):
    import json

    from typer.testing import CliRunner

    from diffcli.cli import app
    from diffcli.records import check

    ae = ae_files[3]
    folder = tmp_path / "imgs"
    write_image(folder / "x" / "a.png", 8, 8, seed=1)
    write_image(folder / "b.png", 8, 8, seed=2)
    runner = CliRunner()
    r = runner.invoke(app, ["reconstruct", str(ae), str(folder), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"2 images -> {tmp_path / 'o'}\nPSNR  mean ")
    assert (tmp_path / "o" / "x" / "a.png").exists() and (tmp_path / "o" / "b.png").exists()
    r = runner.invoke(app, ["reconstruct", str(ae), str(folder), "--out", str(tmp_path / "o2"), "--json"])
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    for rec in recs:
        check("reconstruct", rec)
    assert [x["kind"] for x in recs] == ["image", "image", "summary"]
    assert recs[-1]["psnr_worst"] == min(x["psnr"] for x in recs[:2])
    # exists: exit 3, one error line
    r = runner.invoke(app, ["reconstruct", str(ae), str(folder), "--out", str(tmp_path / "o")])
    assert r.exit_code == 3 and r.stderr.startswith("Error: ") and len(r.stderr.splitlines()) == 1
