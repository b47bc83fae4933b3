"""Editing (diffcli.sampling.edit): `sample --init-image [--strength] [--mask]`.

The maths against closed forms on a recording toy denoiser (where an edit starts, which timesteps it
visits, what the known region holds after each step), then the command the way a user runs it on a
tiny DiT: pixels outside the mask byte-identical to the input for every kind of sampler, batch-size
invariance, folders of inputs and masks, records, --from-png, and every bad input.
"""

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffcli import records
from diffcli.sampling import edit, generate
from diffcli.diffusion import ode, registry
from diffcli.files.checkpoint import save_model
from diffcli.cli import app
from diffcli.files.images import from_uint8, read_png_text
from diffcli.diffusion.registry import sample
from diffcli.diffusion.samplers import ImageNoise, Level, Start, ddpm_level, renoise
from diffcli.diffusion.schedule import NoiseSchedule

runner = CliRunner()
COSINE = NoiseSchedule("cosine", 1000)
LINEAR = NoiseSchedule("linear", 1000)
CLASSES = ["cat", "dog", "fish"]
SHAPE = (3, 8, 8)


def diffcli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error(result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def pixels(path: Path) -> torch.Tensor:
    """A PNG as uint8 (H, W, C)."""
    with Image.open(path) as im:
        C = len(im.getbands())
        return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(im.height, im.width, C)


def save_rgb(path: Path, seed: int, size: int = 8) -> Path:
    g = torch.Generator().manual_seed(seed)
    px = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
    Image.frombytes("RGB", (size, size), bytes(px.flatten().tolist())).save(path)
    return path


def save_mask(path: Path, size: int = 8, box: tuple[int, int] = (2, 6)) -> Path:
    """White (redraw) square rows/columns box[0]..box[1]-1, black elsewhere."""
    im = Image.new("L", (size, size), 0)
    im.paste(255, (box[0], box[0], box[1], box[1]))
    im.save(path)
    return path


class Recorder:
    """f(x, t, y): deterministic, depends on all three, records (x, t, y) of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def __call__(self, x, t, y):
        self.calls.append((x.clone(), t.clone(), None if y is None else y.clone()))
        return torch.sin(x) * 0.5 + t[:, None, None, None] / 2000


def first_noise(seeds, shape=SHAPE) -> torch.Tensor:
    return ImageNoise(seeds, shape, torch.device("cpu"), torch.float32).draw()


@pytest.fixture(scope="module")
def models(tmp_path_factory, make_dit) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    rgb, gray = folder / "rgb.safetensors", folder / "gray.safetensors"
    save_model(rgb, make_dit(num_classes=3, seed=1), NoiseSchedule("cosine", 1000), "v", CLASSES, sampling={"guidance": 2.0})
    save_model(gray, make_dit(in_channels=1, seed=2), NoiseSchedule("linear", 1000), "v", [])
    return {"rgb": rgb, "gray": gray}


@pytest.fixture
def rgb(models) -> Path:
    return models["rgb"]


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """An 8x8 RGB init image and an 8x8 mask with a 4x4 white centre."""
    return {"init": save_rgb(tmp_path / "photo.png", 0), "mask": save_mask(tmp_path / "mask.png")}


# --------------------------------------------------------------------------------------------------
# The truncated schedule and the start (SDEdit)
# --------------------------------------------------------------------------------------------------


def test_span_is_the_strength_of_the_schedule_and_the_steps_are_spread_over_it():
    assert edit.span(0.6, COSINE, 15) == 600 and edit.span(1.0, COSINE, 15) == 1000 and edit.span(0.01, COSINE, 10) == 10
    # trailing over [0, 600): round(arange(600, 0, -60)) - 1
    assert COSINE.timesteps(10, "trailing", span=600).tolist() == list(range(599, 0, -60))
    assert COSINE.timesteps(4, "leading", span=600).tolist() == [450, 300, 150, 0]  # arange(4) * (600 // 4)
    assert COSINE.timesteps(3, "linspace", span=601).tolist() == [600, 300, 0]
    for spacing in ("trailing", "leading", "linspace"):  # the whole schedule is the plain one
        assert COSINE.timesteps(7, spacing, span=1000).tolist() == COSINE.timesteps(7, spacing).tolist()
    with pytest.raises(Exception, match="fewer than --steps 15"):
        edit.span(0.01, COSINE, 15)


def test_step_sigmas_start_at_the_strengths_sigma():
    sig = ode.step_sigmas(COSINE, 6, sigmas="karras", span=600)
    s_top, s_min = float(COSINE.sigmas[599]), float(COSINE.sigmas[0])
    rho = ode.KARRAS_RHO
    want = [(s_top ** (1 / rho) + i / 5 * (s_min ** (1 / rho) - s_top ** (1 / rho))) ** rho for i in range(6)]
    assert sig[0] == s_top and sig[-2] == s_min and sig[-1] == 0.0
    assert sig[:-1] == pytest.approx(want, rel=1e-12)
    # edm below sigma 80 is karras; at strength 1 both are the plain lists
    assert ode.step_sigmas(COSINE, 6, sigmas="edm", span=600) == sig
    assert ode.step_sigmas(COSINE, 6, sigmas="edm", span=1000) == ode.step_sigmas(COSINE, 6, sigmas="edm")
    assert ode.step_sigmas(COSINE, 5, "trailing", None, span=600) == [float(COSINE.sigmas[t]) for t in (599, 479, 359, 239, 119)] + [0.0]


def test_ddim_starts_at_sqrt_ab_x0_plus_sqrt_1_minus_ab_eps_exactly():
    f = Recorder()
    seeds = [3, 8]
    x0 = from_uint8(torch.randint(0, 256, (2, *SHAPE), generator=torch.Generator().manual_seed(1)))
    res = sample(f, COSINE, SHAPE, 10, "ddim", seeds=seeds, start=Start(x0, 600), clip_x0=None)
    assert res.timesteps == list(range(599, 0, -60)) and res.nfe == len(f.calls) == 10
    ab = float(COSINE.alphas_cumprod[599])
    want = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * first_noise(seeds)
    assert torch.equal(f.calls[0][0], want)
    assert [float(t[0]) for _, t, _ in f.calls] == [float(t) for t in range(599, 0, -60)]


@pytest.mark.parametrize("sampler", ["euler", "dpm++2m", "heun", "euler_a"])
def test_ode_samplers_start_at_x0_plus_sigma_eps(sampler):
    f = Recorder()
    seeds = [5]
    x0 = from_uint8(torch.randint(0, 256, (1, *SHAPE), generator=torch.Generator().manual_seed(2)))
    res = sample(f, COSINE, SHAPE, 6, sampler, seeds=seeds, start=Start(x0, 600), sigmas="edm")
    sig0 = float(COSINE.sigmas[599])
    assert res.sigmas == ode.step_sigmas(COSINE, 6, sigmas="edm", span=600) and res.sigmas[0] == sig0
    # the model's input at the first level is x_t = x sqrt(ab) with x = x0 + sigma eps (the VE view)
    x = x0 + sig0 * first_noise(seeds)
    assert torch.equal(f.calls[0][0], x * math.sqrt(1 / (1 + sig0**2)))
    assert float(f.calls[0][1][0]) == pytest.approx(599, abs=1e-4)
    assert res.nfe == len(f.calls) == ode.nfe(sampler, 6, "edm", COSINE, span=600) == (11 if sampler == "heun" else 6)


def test_strength_one_starts_where_plain_sampling_starts():
    """The same first timestep and the same noise; the init image enters scaled by sqrt(ab_999) = 4.9e-5."""
    x0 = torch.ones(1, *SHAPE)
    plain, edited = Recorder(), Recorder()
    a = sample(plain, COSINE, SHAPE, 5, "ddim", seeds=[0], clip_x0=None)
    b = sample(edited, COSINE, SHAPE, 5, "ddim", seeds=[0], clip_x0=None, start=Start(x0, 1000))
    assert a.timesteps == b.timesteps == [999, 799, 599, 399, 199]
    ab = float(COSINE.alphas_cumprod[999])
    gap = (edited.calls[0][0] - plain.calls[0][0]).abs().max().item()
    assert math.sqrt(ab) < 5e-5 and gap == pytest.approx(math.sqrt(ab) * 1, abs=1e-6)  # x0 = 1; float32 rounding
    c = sample(Recorder(), COSINE, SHAPE, 5, "dpm++2m", seeds=[0], sigmas="edm")
    d = sample(Recorder(), COSINE, SHAPE, 5, "dpm++2m", seeds=[0], sigmas="edm", start=Start(x0, 1000))
    assert c.sigmas == d.sigmas and c.sigmas[0] == ode.sigma_max(COSINE)


# --------------------------------------------------------------------------------------------------
# Inpainting (RePaint): the constraint, the forward step back, the final pixels
# --------------------------------------------------------------------------------------------------


def test_inpaint_puts_back_the_noised_init_with_the_images_own_noise():
    x0 = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    w = torch.zeros(2, 1, 8, 8)
    w[:, :, 2:6, 2:6] = 1.0
    w[1, :, 0, 0] = 0.25
    c = edit.Inpaint(x0, w, resample=3)
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    noise = ImageNoise([7, 9], SHAPE, torch.device("cpu"), torch.float32)
    level = ddpm_level(COSINE, 499)
    got = c(x, level, noise)
    eps = first_noise([7, 9])  # the next draw of each image's generator
    want = w * x + (1 - w) * (level.a * x0 + level.s * eps)
    assert torch.equal(got, want)
    inside = w.expand_as(x) == 1
    assert torch.equal(got[inside], x[inside])  # the redrawn region is the sampler's, to the bit
    # at the clean level the known region is x0 itself, bit for bit, and no noise is drawn
    clean = c(x, Level(1.0, 0.0), noise)
    outside = w.expand_as(x) == 0
    assert torch.equal(clean[outside], x0[outside])
    fresh = ImageNoise([7, 9], SHAPE, torch.device("cpu"), torch.float32)
    fresh.draw()
    assert torch.equal(noise.draw(), fresh.draw())  # one draw so far: none at the clean level


def test_renoise_is_the_forward_process_between_two_levels():
    noise = ImageNoise([4], SHAPE, torch.device("cpu"), torch.float64)
    x = torch.randn(1, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    lo, hi = ddpm_level(LINEAR, 300), ddpm_level(LINEAR, 500)
    z = ImageNoise([4], SHAPE, torch.device("cpu"), torch.float64).draw()
    ab_lo, ab_hi = float(LINEAR.alphas_cumprod[300]), float(LINEAR.alphas_cumprod[500])
    want = math.sqrt(ab_hi / ab_lo) * x + math.sqrt(1 - ab_hi / ab_lo) * z  # q(x_500 | x_300), strided beta
    torch.testing.assert_close(renoise(x, lo, hi, noise), want, rtol=1e-12, atol=1e-12)
    noise = ImageNoise([4], SHAPE, torch.device("cpu"), torch.float64)
    got = renoise(x, Level(1.0, 0.5), Level(1.0, 2.0), noise)  # VE: x + sqrt(2^2 - 0.5^2) z
    torch.testing.assert_close(got, x + math.sqrt(4 - 0.25) * z, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampler, resample, nfe", [("ddim", 1, 6), ("ddim", 3, 16), ("euler", 2, 11), ("dpm++2m", 2, 11),
                                                    ("heun", 2, 21), ("ddpm", 2, 11)])
def test_resample_takes_every_step_but_the_last_r_times(sampler, resample, nfe):
    """RePaint Algorithm 1: U tries per step, none repeated at the step to the clean image."""
    f = Recorder()
    x0 = torch.zeros(1, *SHAPE)
    w = torch.ones(1, 1, 8, 8)
    w[..., :4] = 0
    kw = {"sigmas": "karras"} if sampler in registry.ODE_SAMPLERS else {}
    res = sample(f, COSINE, SHAPE, 6, sampler, seeds=[0], start=Start(x0, 600),
                 constraint=edit.Inpaint(x0, w, resample), **kw)
    assert res.nfe == len(f.calls) == nfe
    assert torch.equal(res.images[..., :4], x0[..., :4])  # the known region ends as x0, exactly


def correlated_pair_model(schedule: NoiseSchedule, rho: float):
    """The exact model for x0 ~ N(0, [[1, rho], [rho, 1]]) over an image of two pixels, as eps: in the VE view
    x = x0 + sigma n, E[x0 | x] = Sigma (Sigma + sigma^2 I)^-1 x, at the (fractional) timestep's sigma
    (log sigma interpolated over the table, as diffcli.diffusion.ode queries it)."""
    cov = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64)
    log_sig = schedule.sigmas.log()

    def f(x_t, t, y):
        lo = t.double().floor().long().clamp(max=len(log_sig) - 2)
        frac = t.double() - lo
        sig = float(torch.exp(log_sig[lo] * (1 - frac) + log_sig[lo + 1] * frac)[0])
        x = x_t * math.sqrt(1 + sig**2)  # x_t / sqrt(ab)
        D = (x.reshape(-1, 2) @ (cov @ torch.linalg.inv(cov + sig**2 * torch.eye(2, dtype=torch.float64))).T)
        return (x - D.reshape(x.shape)) / sig

    return f


@pytest.mark.parametrize("sampler, steps, kw", [("ddpm", 20, {}), ("dpm++2m", 10, {"sigmas": "edm"})])
def test_resampling_harmonises_the_unknown_pixel_with_the_known_one(sampler, steps, kw):
    """Pixel 0 known (1.5), pixel 1 redrawn, correlation 0.9: the exact conditional of pixel 1 is
    N(0.9 * 1.5, 1 - 0.81) = N(1.35, 0.436^2). Replacing the known pixel alone leaves pixel 1 far below
    (RePaint's motivation); each resampling loop moves it towards 1.35, without overshooting or diverging."""
    N, rho = 1000, 0.9
    x0 = torch.tensor([1.5, 0.0], dtype=torch.float64).reshape(1, 1, 1, 2).repeat(N, 1, 1, 1)
    w = torch.tensor([0.0, 1.0], dtype=torch.float64).reshape(1, 1, 1, 2).repeat(N, 1, 1, 1)
    means, stds = [], []
    for R in (1, 4, 10):
        res = sample(correlated_pair_model(COSINE, rho), COSINE, (1, 1, 2), steps, sampler, seeds=list(range(N)),
                     start=Start(x0, 1000), constraint=edit.Inpaint(x0, w, R), dtype=torch.float64, clip_x0=None, **kw)
        assert torch.equal(res.images[:, 0, 0, 0], x0[:, 0, 0, 0])
        means.append(float(res.images[:, 0, 0, 1].mean()))
        stds.append(float(res.images[:, 0, 0, 1].std()))
    want = rho * 1.5
    assert means[0] < want - 0.3 and means[0] + 0.2 < means[1] < means[2] < want + 0.05, means
    assert abs(means[2] - want) < 0.2 and all(0.3 < s < 0.8 for s in stds[1:]), (means, stds)


def test_feather_is_zero_outside_the_mask_and_fades_in_inside_it():
    hard = torch.zeros(1, 1, 30, 30)
    hard[..., :, 10:] = 1.0  # a straight vertical edge between columns 9 and 10
    w = edit.feather(hard, 2.0)
    assert torch.equal(w[..., :10], torch.zeros(1, 1, 30, 10))
    row = w[0, 0, 15, 10:16]
    # distance d = j + 0.5 inside the edge: w = 2 Phi(d / 2) - 1 = erf(d / (2 sqrt 2)) (a truncated, discrete kernel)
    want = torch.tensor([math.erf((j + 0.5) / (2 * math.sqrt(2))) for j in range(6)])
    torch.testing.assert_close(row, want.float(), atol=0.03, rtol=0)
    assert bool((row[1:] > row[:-1]).all()) and float(w[0, 0, 15, 29]) == 1.0
    assert torch.equal(edit.feather(hard, 0.0), hard)


def test_compose_keeps_the_init_bytes_where_the_weight_is_zero():
    gen = torch.tensor([[[[10], [20]], [[30], [40]]]], dtype=torch.uint8)  # (1, 2, 2, 1)
    init = torch.tensor([[[[200, 201], [202, 203]]]], dtype=torch.uint8)  # (1, 1, 2, 2)
    w = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]]])
    got = edit.compose(gen, init, w)
    assert got.flatten().tolist() == [200, 20, round(0.5 * 30 + 0.5 * 202), round(0.25 * 40 + 0.75 * 203)]
    assert edit.compose(gen, init, None) is gen


# --------------------------------------------------------------------------------------------------
# The command: steps visited, pixels outside the mask, seeds and batches
# --------------------------------------------------------------------------------------------------


def recording(calls: list):
    def wrap(model, device, dtype):
        def f(x, t, y):
            calls.append((float(t[0]), x.shape[0], None if y is None else y.tolist()))
            return model(x, t, y)

        return f

    return wrap


@pytest.mark.parametrize("options, visited", [
    ({"sampler": "ddim", "steps": 10}, [float(t) for t in range(599, 0, -60)]),
    ({"sampler": "ddim", "steps": 4, "spacing": "leading"}, [450.0, 300.0, 150.0, 0.0]),
    ({"steps": 6}, None),  # dpm++2m with edm sigmas from sigma(599)
])
def test_the_model_is_called_n_times_over_the_truncated_schedule(tmp_path, monkeypatch, rgb, files, options, visited):
    calls: list = []
    monkeypatch.setattr(generate, "autocast_denoiser", recording(calls))
    opts = generate.SampleOptions(checkpoint=str(rgb), init_image=str(files["init"]), strength=0.6, seed=0,
                                  out=str(tmp_path / "out"), device="cpu", classes=["dog"], **options)
    logged: list[str] = []
    (image,) = [r for r in generate.run(opts, log=logged.append) if r["kind"] == "image"]
    steps = options["steps"]
    assert image["nfe"] == steps == len(calls)
    if visited is None:
        visited = [ode.sigma_to_t(COSINE, s) for s in ode.step_sigmas(COSINE, steps, sigmas="edm", span=600)[:-1]]
    assert [t for t, _, _ in calls] == pytest.approx(visited, rel=1e-6)
    assert all(b == 2 and y == [1, 3] for _, b, y in calls)  # guided: dog and the null class in one batch
    assert logged[-1] == f"img2img: strength 0.6, {steps} steps from t={visited[0]:g}; input {files['init']}"


def test_an_edit_without_class_is_unconditional(tmp_path, monkeypatch, rgb, files):
    calls: list = []
    monkeypatch.setattr(generate, "autocast_denoiser", recording(calls))
    opts = generate.SampleOptions(checkpoint=str(rgb), init_image=str(files["init"]), steps=3, seed=0, device="cpu",
                                  out=str(tmp_path / "out"))
    (image,) = [r for r in generate.run(opts) if r["kind"] == "image"]
    assert image["class"] is None and image["guidance"] == 1.0
    assert [(b, y) for _, b, y in calls] == [(1, [3])] * 3  # the null class, no guidance batch


SAMPLER_OPTIONS = [
    ["--sampler", "ddim", "--steps", "8"],
    ["--steps", "6"],  # dpm++2m, edm
    ["--sampler", "euler_a", "--steps", "6"],
    ["--sampler", "heun", "--steps", "4", "--sigmas", "karras", "--resample", "2"],
    ["--sampler", "ddpm", "--steps", "8", "--resample", "2"],
    ["--sampler", "ddim", "--steps", "8", "--eta", "1", "--mask-blur", "1.5"],
    ["--steps", "6", "--strength", "0.5", "--mask-blur", "0.7"],
]


@pytest.mark.parametrize("options", SAMPLER_OPTIONS, ids=lambda o: " ".join(o))
def test_pixels_outside_the_mask_come_back_unchanged(tmp_path, rgb, files, options):
    out = tmp_path / "out"
    result = diffcli("sample", "-c", rgb, "--init-image", files["init"], "--mask", files["mask"], "--class", "fish",
                     "-n", 3, "--seed", 1, "-o", out, *options)
    assert result.exit_code == 0, result.output
    init, mask = pixels(files["init"]), pixels(files["mask"])[..., 0]
    made = sorted(out.iterdir())
    assert [p.name for p in made] == ["photo-1.png", "photo-2.png", "photo-3.png"]
    for p in made:
        px = pixels(p)
        assert torch.equal(px[mask == 0], init[mask == 0])
        assert not torch.equal(px[mask == 255], init[mask == 255])  # the square was redrawn
    assert pixels(made[0]).tolist() != pixels(made[1]).tolist()  # another seed, another drawing


def test_a_larger_init_image_and_its_mask_are_resized_as_train_does(tmp_path, rgb):
    """A 16x24 image: resized on its short side to 8x12 and centre-cropped to 8x8 (columns 2..9); its mask of the
    same size goes through the same crop, nearest-neighbour, and a scaled mask (8x12) as well."""
    init = tmp_path / "wide.png"
    g = torch.Generator().manual_seed(5)
    px = torch.randint(0, 256, (16, 24, 3), generator=g, dtype=torch.uint8)
    Image.frombytes("RGB", (24, 16), bytes(px.flatten().tolist())).save(init)
    full = Image.new("L", (24, 16), 0)
    full.paste(255, (8, 4, 16, 12))  # x 8..15, y 4..11: after scaling by 1/2 and cropping 2 columns, 2..5 x 2..5
    full.save(tmp_path / "mask-full.png")
    full.resize((12, 8), Image.NEAREST).save(tmp_path / "mask-half.png")
    expected_init, _ = edit.load_init(init, 3, 8, 8)
    want_mask = torch.zeros(8, 8, dtype=torch.bool)
    want_mask[2:6, 2:6] = True
    for mask in ("mask-full.png", "mask-half.png"):
        out = tmp_path / f"out-{mask}"
        result = diffcli("sample", "-c", rgb, "--init-image", init, "--mask", tmp_path / mask, "--steps", 4, "--seed", 0,
                         "-o", out, "--name", "x.png")
        assert result.exit_code == 0, result.output
        assert torch.equal(edit.load_mask(tmp_path / mask, init, (24, 16), 8, 8)[0].bool(), want_mask)
        px = pixels(out / "x.png").permute(2, 0, 1)  # (3, 8, 8)
        assert torch.equal(px[:, ~want_mask], expected_init[:, ~want_mask])


def test_gray_model_takes_the_luma_of_a_colour_image(tmp_path, models, files):
    out = tmp_path / "out"
    result = diffcli("sample", "-c", models["gray"], "--init-image", files["init"], "--mask", files["mask"], "--steps", 4,
                     "--seed", 0, "-o", out, "--name", "g.png")
    assert result.exit_code == 0, result.output
    rgb = pixels(files["init"]).float()
    luma = (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).round().to(torch.uint8)
    px, keep = pixels(out / "g.png")[..., 0], pixels(files["mask"])[..., 0] == 0
    assert torch.equal(px[keep], luma[keep])


def test_batch_size_and_neighbours_do_not_change_an_edit(tmp_path, rgb, files):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        save_rgb(folder / name, 10 + i)
    for b in (1, 3):
        for extra in ([], ["--mask", files["mask"], "--resample", "2"]):
            result = diffcli("sample", "-c", rgb, "--init-image", folder, "--sampler", "ddpm", "--steps", 6, "--seed", 4,
                             "--class", "cat", "--batch-size", b, "-o", tmp_path / f"b{b}{len(extra)}", *extra)
            assert result.exit_code == 0, result.output
    for k in (0, 4):  # without and with the mask
        for name in ("a-4.png", "b-5.png", "c-6.png"):
            assert torch.equal(pixels(tmp_path / f"b1{k}" / name), pixels(tmp_path / f"b3{k}" / name)), name
    # image b of the folder (seed 5) is `--init-image b.png --seed 5` alone
    alone = diffcli("sample", "-c", rgb, "--init-image", folder / "b.png", "--sampler", "ddpm", "--steps", 6, "--seed", 5,
                    "--class", "cat", "-o", tmp_path / "alone")
    assert alone.exit_code == 0, alone.output
    assert torch.equal(pixels(tmp_path / "alone" / "b-5.png"), pixels(tmp_path / "b10" / "b-5.png"))


def test_folders_of_images_and_masks_matched_by_name(tmp_path, rgb):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i, name in enumerate(("one.png", "two.jpg", "three.png")):
        save_rgb(images / name, i) if name.endswith(".png") else Image.new("RGB", (8, 8), (90, 20, 200)).save(images / name)
    (images / "notes.txt").write_text("not an image")
    boxes = {"one": (0, 4), "two": (4, 8), "three": (2, 6)}
    for stem, box in boxes.items():
        save_mask(masks / f"{stem}.png", box=box)
    out = tmp_path / "out"
    result = diffcli("sample", "-c", rgb, "--init-image", images, "--mask", masks, "--steps", 3, "--seed", 0,
                     "--name", "{stem}.png", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    recs = [json.loads(line) for line in result.stdout.splitlines()]
    made = [r for r in recs if r["kind"] == "image"]
    # sorted by file name: one, three, two; seeds 0, 1, 2
    assert [(Path(r["path"]).name, r["seed"], Path(r["init_image"]).name, Path(r["mask"]).name) for r in made] == [
        ("one.png", 0, "one.png", "one.png"), ("three.png", 1, "three.png", "three.png"), ("two.png", 2, "two.jpg", "two.png")]
    assert sorted(os.listdir(out)) == ["one.png", "three.png", "two.png"]
    for stem, box in boxes.items():
        init = edit.load_init(next(images.glob(f"{stem}.*")), 3, 8, 8)[0].permute(1, 2, 0)
        keep = pixels(masks / f"{stem}.png")[..., 0] == 0
        assert torch.equal(pixels(out / f"{stem}.png")[keep], init[keep]), stem
    # a folder mask with no match is a bad input, and nothing is written
    (masks / "two.png").unlink()
    result = diffcli("sample", "-c", rgb, "--init-image", images, "--mask", masks, "--steps", 3, "-o", tmp_path / "none")
    assert result.exit_code == 4
    assert "no mask for two.jpg" in one_error(result)
    assert not (tmp_path / "none").exists()


# --------------------------------------------------------------------------------------------------
# Records and --from-png
# --------------------------------------------------------------------------------------------------


def sha10(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def test_records_say_what_was_edited_from_which_files(tmp_path, rgb, files):
    out = tmp_path / "out"
    result = diffcli("sample", "-c", rgb, "--init-image", files["init"], "--mask", files["mask"], "--strength", 0.8,
                     "--resample", 2, "--mask-blur", 1.5, "--class", "dog", "--sampler", "ddim", "--steps", 5, "--seed", 9,
                     "-o", out, "--json", "--grid", tmp_path / "g.png")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    for rec in lines:
        records.check("sample", rec)
    image = lines[0]
    assert (image["init_image"], image["init_sha256"], image["strength"]) == (str(files["init"]), sha10(files["init"]), 0.8)
    assert (image["mask"], image["mask_sha256"], image["resample"], image["mask_blur"]) == (
        str(files["mask"]), sha10(files["mask"]), 2, 1.5)
    assert image["nfe"] == 4 * 2 + 1 and image["steps"] == 5
    text = read_png_text(Path(image["path"]))
    recorded = json.loads(text["diffcli"])
    assert recorded == {k: v for k, v in image.items() if k not in ("kind", "path", "index", "seconds", "skipped")}
    params = dict(part.split(": ", 1) for part in text["parameters"].split(", "))
    assert params["Denoising strength"] == "0.8" and params["Mask blur"] == "1.5" and params["Steps"] == "5"
    # image-to-image without a mask: no mask fields, no Mask blur
    plain = diffcli("sample", "-c", rgb, "--init-image", files["init"], "--steps", 3, "-o", tmp_path / "i2i", "--json")
    image = json.loads(plain.stdout.splitlines()[0])
    records.check("sample", image)
    assert image["strength"] == 0.6 and not {"mask", "mask_sha256", "resample", "mask_blur"} & set(image)
    params = read_png_text(Path(image["path"]))["parameters"]
    assert "Denoising strength: 0.6" in params and "Mask blur" not in params


@pytest.mark.parametrize("options", [
    ["--strength", "0.7", "--sampler", "euler_a", "--steps", "5"],
    ["--mask", "MASK", "--resample", "2", "--mask-blur", "1", "--class", "dog", "--sampler", "ddpm", "--steps", "6"],
    ["--mask", "MASK", "--strength", "0.5", "--class", "fish"],
])
def test_from_png_redoes_an_edit_byte_for_byte(tmp_path, rgb, files, options):
    options = [str(files["mask"]) if o == "MASK" else o for o in options]
    first = tmp_path / "first"
    made = diffcli("sample", "-c", rgb, "--init-image", files["init"], "-n", 2, "--seed", 30, "-o", first, *options)
    assert made.exit_code == 0, made.output
    png = first / "photo-31.png"
    again = diffcli("sample", "-c", rgb, "--from-png", png, "-o", tmp_path / "again")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "again" / "photo-31.png").read_bytes() == png.read_bytes()


def test_from_png_needs_the_files_it_was_made_from(tmp_path, rgb, files):
    made = diffcli("sample", "-c", rgb, "--init-image", files["init"], "--mask", files["mask"], "--steps", 4, "--seed", 2,
                   "-o", tmp_path / "a")
    assert made.exit_code == 0, made.output
    png = tmp_path / "a" / "photo-2.png"
    moved = tmp_path / "kept" / "photo.png"
    moved.parent.mkdir()
    original = files["init"].read_bytes()
    moved.write_bytes(original)

    files["init"].write_bytes(save_rgb(tmp_path / "other.png", 99).read_bytes())  # the file changed since
    refused = diffcli("sample", "-c", rgb, "--from-png", png, "-o", tmp_path / "b")
    assert refused.exit_code == 4
    line = one_error(refused)
    assert str(files["init"]) in line and sha10(moved) in line and "--init-image" in line
    assert not (tmp_path / "b").exists()
    files["init"].unlink()  # gone
    refused = diffcli("sample", "-c", rgb, "--from-png", png, "-o", tmp_path / "b")
    assert refused.exit_code == 4 and "which is missing" in one_error(refused)
    files["mask"].unlink()
    # given again from elsewhere: the same pixels (the record names the new path)
    again = diffcli("sample", "-c", rgb, "--from-png", png, "--init-image", moved, "-o", tmp_path / "b")
    assert again.exit_code == 4 and f"the mask {files['mask']}" in one_error(again)  # the mask is needed too
    save_mask(tmp_path / "m2.png")
    again = diffcli("sample", "-c", rgb, "--from-png", png, "--init-image", moved, "--mask", tmp_path / "m2.png",
                    "-o", tmp_path / "b")
    assert again.exit_code == 0, again.output
    assert torch.equal(pixels(tmp_path / "b" / "photo-2.png"), pixels(png))
    assert json.loads(read_png_text(tmp_path / "b" / "photo-2.png")["diffcli"])["init_image"] == str(moved)


@pytest.mark.parametrize("change, message", [
    ({"init_sha256": "xyz"}, "init_sha256 must be the hexadecimal hash"),
    ({"init_sha256": None}, "init_sha256 must be the hexadecimal hash"),
    ({"init_image": "a\nb.png"}, "control characters"),
    ({"strength": 0}, "diffcli.strength must be a finite number in (0, 1]"),
    ({"strength": None}, "strength is missing"),
    ({"resample": 0}, "diffcli.resample must be an integer"),
    ({"init_image": None, "init_sha256": None}, "mask is recorded without an init_image"),
])
def test_a_bad_edit_record_is_refused(tmp_path, rgb, files, change, message):
    made = diffcli("sample", "-c", rgb, "--init-image", files["init"], "--mask", files["mask"], "--steps", 3, "--seed", 0,
                   "-o", tmp_path / "a")
    assert made.exit_code == 0
    png = tmp_path / "a" / "photo-0.png"
    record = json.loads(read_png_text(png)["diffcli"])
    record.update(change)
    record = {k: v for k, v in record.items() if v is not None}
    from diffcli.files.images import png_bytes

    with Image.open(png) as im:
        (tmp_path / "bad.png").write_bytes(png_bytes(im, {"diffcli": json.dumps(record)}))
    result = diffcli("sample", "-c", rgb, "--from-png", tmp_path / "bad.png", "-o", tmp_path / "out")
    assert result.exit_code == 4, result.output
    assert message in one_error(result)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Bad input: one line, the documented exit code, nothing written
# --------------------------------------------------------------------------------------------------


def bad_inputs(tmp_path: Path, files: dict[str, Path]) -> dict[str, list]:
    (tmp_path / "text.png").write_text("this is not a PNG")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    Image.new("L", (20, 10), 255).save(tmp_path / "wide-mask.png")
    return {
        "missing init": [["--init-image", tmp_path / "nope.png"], 4, "--init-image: no such file or folder"],
        "unreadable init": [["--init-image", tmp_path / "text.png"], 4, "cannot be used: unreadable"],
        "folder without images": [["--init-image", tmp_path / "empty"], 4, "no images in the folder"],
        "missing mask": [["--init-image", files["init"], "--mask", tmp_path / "nope.png"], 4, "--mask: no such file"],
        "unreadable mask": [["--init-image", files["init"], "--mask", tmp_path / "text.png"], 4, "--mask"],
        "mask of another shape": [["--init-image", files["init"], "--mask", tmp_path / "wide-mask.png"], 4,
                                  "cannot be resized to match"],
        "strength 0": [["--init-image", files["init"], "--strength", "0"], 2, "--strength must be in (0, 1]"],
        "strength 1.5": [["--init-image", files["init"], "--strength", "1.5"], 2, "--strength must be in (0, 1]"],
        "strength nan": [["--init-image", files["init"], "--strength", "nan"], 2, "--strength must be in (0, 1]"],
        "strength below the steps": [["--init-image", files["init"], "--strength", "0.005"], 2, "fewer than --steps 15"],
        "mask without init": [["--mask", files["mask"]], 2, "--mask needs --init-image"],
        "strength without init": [["--strength", "0.5"], 2, "--strength needs --init-image"],
        "resample without mask": [["--init-image", files["init"], "--resample", "2"], 2, "--resample needs --mask"],
        "resample 0": [["--init-image", files["init"], "--mask", files["mask"], "--resample", "0"], 2, "--resample must be"],
        "negative blur": [["--init-image", files["init"], "--mask", files["mask"], "--mask-blur", "-1"], 2, "--mask-blur must be"],
        "-n with a folder": [["--init-image", tmp_path, "-n", "2"], 2, "--num-images does not apply to a folder"],
        "stem without init": [["--name", "{stem}.png"], 2, "{stem}"],
        "guidance without class": [["--init-image", files["init"], "--guidance", "3"], 2, "--guidance needs --class"],
    }


CASES = ["missing init", "unreadable init", "folder without images", "missing mask", "unreadable mask",
         "mask of another shape", "strength 0", "strength 1.5", "strength nan", "strength below the steps",
         "mask without init", "strength without init", "resample without mask", "resample 0", "negative blur",
         "-n with a folder", "stem without init", "guidance without class"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, rgb, files, case):
    args, code, message = bad_inputs(tmp_path, files)[case]
    out = tmp_path / "out"
    before = sorted(os.listdir(tmp_path))
    result = diffcli("sample", "-c", rgb, "--seed", 0, "-o", out, *args)
    assert result.exit_code == code, result.output
    assert message in one_error(result)
    assert result.stdout == ""
    assert sorted(os.listdir(tmp_path)) == before and not out.exists()
    as_json = diffcli("sample", "-c", rgb, "--seed", 0, "-o", out, "--json", *args)
    (rec,) = [json.loads(line) for line in as_json.stdout.splitlines()]
    records.check("sample", rec)
    assert rec["kind"] == "error" and rec["exit_code"] == code


def test_the_readme_example_is_redone_from_its_png(tmp_path, monkeypatch):
    """weights/edit-as-8.png: the README's `--mask ... --class 8 --seed 1` on the shipped model. Its record
    names weights/edit-example.png relative to the repository, where the README's commands run."""
    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    png = root / "weights" / "edit-as-8.png"
    recorded = json.loads(read_png_text(png)["diffcli"])
    assert (recorded["init_image"], recorded["mask"], recorded["class"]) == (
        "weights/edit-example.png", "weights/edit-mask.png", "8")
    result = diffcli("sample", "--from-png", png, "-o", tmp_path)
    assert result.exit_code == 0, result.output
    (made,) = tmp_path.iterdir()
    assert made.read_bytes() == png.read_bytes()
    keep = pixels(root / "weights" / "edit-mask.png")[..., 0] == 0
    assert torch.equal(pixels(made)[keep], pixels(root / "weights" / "edit-example.png")[keep])
