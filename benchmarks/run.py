"""diffcli against diffusers and against this machine's matmul peak, on the CPU, in fp32.

    make bench                                   # installs the `bench` extra, then runs this
    .venv/bin/python benchmarks/run.py --quick   # a smoke run: fewer repetitions and steps

Figures (one object each in benchmarks/results.json; "ratio" is always diffcli / peer, so > 1 means
diffcli is faster, except in the peak figures where it is the fraction of the matmul peak reached):
  1. denoiser forward, images/s, torch.inference_mode: DiT-S/2 on 32x32x3 (1000 classes) and the
     shipped model's configuration (DiT-M/4, 28x28x1, 10 classes, U-ViT long skips), batch 16 and 64,
     against diffusers.DiTTransformer2DModel with the same depth, width, heads and patch (it has no
     long skips: the closest configuration, with slightly less work than diffcli's).
  2. end-to-end sampling, images/s: DDIM with classifier-free guidance (cond and uncond in one batch),
     diffcli.diffusion.samplers.sample against diffusers' DDIMScheduler driving its model in the usual
     pipeline-style loop.
  3. training step, images/s: forward + backward + AdamW step at batch 64, diffcli's
     training.losses.diffusion_loss (TrainConfig defaults: v-prediction, Min-SNR weights) against an
     MSE-on-noise step of the diffusers model.
  4. achieved GFLOP/s of diffcli's forward and training step against torch.mm's fp32 GFLOP/s on
     4096x4096 matrices, timed interleaved with them (FLOPs counted analytically: dit_flops below).
  5. `diffcli sample --steps 50` with defaults on the shipped model, as a whole process: wall time
     (start-up included) and peak resident memory (ru_maxrss of the child).

Every comparison runs the two sides interleaved in the same process, A B B A A B ..., so that drift
and other processes' load hit both alike; the ratio of medians is the headline. Both sides run with
torch's default thread count, the same random inputs, and weights drawn the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# torch's OpenMP (libgomp) busy-waits between parallel regions by default. On a machine shared with
# other busy processes that made a 2-thread forward of the shipped model ~9x slower than 1 thread (a
# waiting thread spins on the core its peer needs); with passive waiting it is on par. The in-process
# figures measure the code, not that interaction, so both sides run with passive waiting unless the
# caller chose a policy. It must be set before torch loads libgomp. The whole-process figure runs
# `diffcli sample` in the caller's own environment, and once more with passive waiting.
CALLER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

from diffcli.models.dit import DiT, ModelConfig, count_parameters, preset_config
from diffcli.diffusion.registry import sample
from diffcli.diffusion.schedule import NoiseSchedule
from diffcli.training import TrainConfig
from diffcli.training.losses import diffusion_loss

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.json"
SHIPPED = ROOT / "weights" / "diffcli-mnist.safetensors"

# --------------------------------------------------------------------------------------------------
# FLOPs, counted analytically (a multiply-add is 2 FLOPs)
# --------------------------------------------------------------------------------------------------

FLOP_FORMULA = (
    "forward FLOPs per image = depth * N * (2 * (4 + 2 * mlp_ratio) * D^2 + 4 * N * D)"
    " + long skips: (depth // 2) * N * 2 * 2D * D"
    " + per image: depth * 2 * D * 6D (adaLN) + 2 * D * 2D (final adaLN) + 2 * (256 * D + D * D) (timestep MLP)"
    " + patch embedding and output: 2 * N * p^2 * (C_in + C_out) * D;"
    " per token per block that is 2 * 12 * D^2 for the qkv, proj and MLP matmuls at mlp_ratio 4"
    " (qkv 3D^2, proj D^2, MLP 8D^2 multiply-adds) and 4 * N * D for attention (QK^T and AV);"
    " training step = 3 x forward (backward = 2 x forward); LayerNorm, softmax, GELU, biases and the"
    " optimizer are not counted"
)


def dit_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs per image of a diffcli DiT (see FLOP_FORMULA)."""
    D, N, p = cfg.hidden_size, cfg.num_tokens, cfg.patch_size
    per_token_block = 2 * (4 + 2 * cfg.mlp_ratio) * D * D + 4 * N * D
    total = cfg.depth * N * per_token_block
    if cfg.long_skip:
        total += (cfg.depth // 2) * N * 2 * (2 * D) * D
    total += cfg.depth * 2 * D * 6 * D + 2 * D * 2 * D + 2 * (256 * D + D * D)
    total += 2 * N * p * p * (cfg.in_channels + cfg.out_channels) * D
    return float(total)


# --------------------------------------------------------------------------------------------------
# Timing and statistics
# --------------------------------------------------------------------------------------------------


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, run in turns: A B, then B A, ... (first mover alternates)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    items = list(fns.items())
    for r in range(reps):
        for name, f in items if r % 2 == 0 else items[::-1]:
            gc.collect()
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return times


def spread(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"min": _r(v[0]), "q1": _r(q[0]), "q3": _r(q[2]), "max": _r(v[-1])}


def _r(x: float) -> float:
    return float(f"{x:.4g}")


@dataclass
class Context:
    machine: dict[str, Any]
    torch_version: str
    date: str


def figure(ctx: Context, name: str, configuration: str, unit: str, ours: list[float],
           theirs: list[float] | None, peer: str | None, **extra: Any) -> dict[str, Any]:
    """One results.json object; ours/theirs are per-repetition values in `unit`."""
    a = statistics.median(ours)
    b = statistics.median(theirs) if theirs else None
    return {
        "name": name, "configuration": configuration, "unit": unit,
        "diffcli_median": _r(a), "peer": peer, "peer_median": _r(b) if b is not None else None,
        "ratio": _r(a / b) if b else None, "repetitions": len(ours),
        "spread": {"diffcli": spread(ours), **({"peer": spread(theirs)} if theirs else {})},
        **extra,
        "machine": ctx.machine, "torch": ctx.torch_version, "date": ctx.date,
    }


def peak_figure(ctx: Context, name: str, configuration: str, flops: float,
                tm: dict[str, list[float]]) -> dict[str, Any]:
    """diffcli's GFLOP/s (median over its repetitions) as a share of the matmul peak: the best of the
    torch.mm repetitions timed between them (other processes can only slow a repetition down, so the
    best one is the closest to the machine's peak and the share is a conservative figure)."""
    ours = [flops / s / 1e9 for s in tm["diffcli"]]
    mm = [2 * 4096**3 / s / 1e9 for s in tm["mm"]]
    rec = figure(ctx, name, f"{configuration}. {FLOP_FORMULA}", "GFLOP/s", ours, mm,
                 "torch.mm fp32 4096x4096, timed interleaved; ratio = diffcli median / best torch.mm repetition")
    rec["peer_best"] = _r(max(mm))
    rec["ratio"] = _r(statistics.median(ours) / max(mm))
    rec["peer_share_of_peak"] = _r(statistics.median([flops / s / 1e9 for s in tm["diffusers"]]) / max(mm))
    return rec


def machine_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    with contextlib.suppress(OSError):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["diffcli_commit"] = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, check=False,
                                                capture_output=True, text=True, timeout=10).stdout.strip()
    return info


# --------------------------------------------------------------------------------------------------
# The two models
# --------------------------------------------------------------------------------------------------


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter ~ N(0, 0.02^2): both sides get weights drawn the same way (no zero-init
    shortcuts; a freshly initialised DiT outputs exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def peer_model(cfg: ModelConfig) -> torch.nn.Module:
    """diffusers.DiTTransformer2DModel with diffcli's depth, width, heads, patch, channels and classes
    (no learned sigma on either side; no long skips: diffusers has none)."""
    from diffusers import DiTTransformer2DModel

    if cfg.image_height != cfg.image_width:
        raise ValueError("DiTTransformer2DModel needs square images")
    return DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        sample_size=cfg.image_height, patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes,
        norm_eps=1e-6,
    )


def describe(cfg: ModelConfig, ours: torch.nn.Module, theirs: torch.nn.Module) -> str:
    skip = ", U-ViT long skips (diffcli only: diffusers has none)" if cfg.long_skip else ""
    return (f"depth {cfg.depth}, width {cfg.hidden_size}, {cfg.num_heads} heads, patch {cfg.patch_size}, "
            f"{cfg.in_channels}x{cfg.image_height}x{cfg.image_width}, {cfg.num_tokens} tokens, "
            f"{cfg.num_classes} classes, no learned sigma{skip}; parameters: diffcli "
            f"{count_parameters(ours) / 1e6:.1f} M, diffusers {count_parameters(theirs) / 1e6:.1f} M "
            f"(diffusers keeps a timestep+class embedder in every block)")


def inputs(cfg: ModelConfig, B: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, cfg.image_height, cfg.image_width, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randint(0, cfg.num_classes, (B,), generator=g)
    return x, t, y


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def _peer_forward(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, t, y, return_dict=False)[0]


def s2_config() -> ModelConfig:
    return preset_config("DiT-S/2", image_height=32, image_width=32, in_channels=3, num_classes=1000)


def shipped_model() -> tuple[ModelConfig, torch.nn.Module]:
    if SHIPPED.exists():
        from diffcli.files.checkpoint import load_model

        mf = load_model(SHIPPED, torch.device("cpu"))
        return mf.config, mf.model.float().eval()
    cfg = preset_config("DiT-M/4", image_height=28, image_width=28, in_channels=1, num_classes=10, long_skip=True)
    return cfg, randomize(DiT(cfg), 0).eval()


def forward_figures(ctx: Context, reps: dict[int, int]) -> list[dict[str, Any]]:
    out = []
    cfg = s2_config()
    ours, theirs = randomize(DiT(cfg), 0).eval(), randomize(peer_model(cfg), 1).eval()
    shipped_cfg, shipped = shipped_model()
    shipped_peer = randomize(peer_model(shipped_cfg), 1).eval()
    a = torch.randn(4096, 4096)
    b = torch.randn(4096, 4096)
    c = torch.empty(4096, 4096)
    for label, cfg_, m, p in (("DiT-S/2", cfg, ours, theirs), ("shipped DiT-M/4", shipped_cfg, shipped, shipped_peer)):
        for B, n in reps.items():
            x, t, y = inputs(cfg_, B)
            fns: dict[str, Callable[[], Any]] = {
                "diffcli": functools.partial(m, x, t.float(), y),
                "diffusers": functools.partial(_peer_forward, p, x, t, y),
            }
            with_peak = label == "DiT-S/2" and B == max(reps)
            if with_peak:
                fns["mm"] = lambda: torch.mm(a, b, out=c)
            with torch.inference_mode():
                assert fns["diffcli"]().shape == fns["diffusers"]().shape  # doubles as the warm-up
                tm = interleaved(fns, n, warmup=0)
            log(f"forward {label} batch {B}: {_summary(tm)}")
            conf = f"{label}: {describe(cfg_, m, p)}; batch {B}, fp32, torch.inference_mode"
            out.append(figure(ctx, f"forward {label} batch {B}", conf, "images/s",
                              [B / s for s in tm["diffcli"]], [B / s for s in tm["diffusers"]],
                              "diffusers.DiTTransformer2DModel"))
            if with_peak:
                flops = dit_flops(cfg_) * B
                out.append(peak_figure(ctx, f"forward DiT-S/2 batch {B}: share of matmul peak",
                                       f"{conf}; {flops / 1e9:.1f} GFLOP per forward", flops, tm))
    return out


def sampling_figure(ctx: Context, n_images: int, steps: int, reps: int, guidance: float = 4.0) -> dict[str, Any]:
    from diffusers import DDIMScheduler

    cfg = s2_config()
    ours, theirs = randomize(DiT(cfg), 0).eval(), randomize(peer_model(cfg), 1).eval()
    schedule = NoiseSchedule("cosine", 1000)
    labels = torch.arange(n_images) % cfg.num_classes
    shape = (cfg.in_channels, cfg.image_height, cfg.image_width)

    def run_ours() -> torch.Tensor:
        return sample(ours, schedule, shape, steps, "ddim", seeds=range(n_images), labels=labels,
                      null_label=cfg.num_classes, guidance=guidance, prediction="epsilon", clip_x0=1.0,
                      spacing="trailing").images

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                              prediction_type="epsilon", timestep_spacing="trailing", set_alpha_to_one=True)

    def run_theirs() -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(n_images, *shape, generator=g)
        y_in = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            model_in = torch.cat([latents, latents])
            out = theirs(model_in, t.expand(2 * n_images), y_in, return_dict=False)[0]
            cond, uncond = out.chunk(2)
            eps = uncond + guidance * (cond - uncond)
            latents = scheduler.step(eps, t, latents).prev_sample
        return latents

    with torch.inference_mode():
        tm = interleaved({"diffcli": run_ours, "diffusers": run_theirs}, reps, warmup=0)
    log(f"sampling ({steps} steps): {_summary(tm)}")
    conf = (f"{n_images} images of DiT-S/2 32x32x3 ({describe(cfg, ours, theirs)}), DDIM "
            f"(trailing spacing, eta 0, clipped x0), guidance {guidance:g} with cond and uncond in one batch "
            f"of {2 * n_images}, fp32, torch.inference_mode; diffcli: samplers.sample with per-image seeds; "
            "diffusers: DDIMScheduler + DiTTransformer2DModel in a pipeline-style loop")
    scale = 50 / steps
    if steps != 50:
        conf += (f". Timed: a {steps}-step schedule, to fit the run in minutes on a small CPU; every step costs the same (one guided forward of {2 * n_images} images and one "
                 f"update), so the 50-step figures are the timed seconds x {scale:g}")
    return figure(ctx, f"sampling DiT-S/2, {n_images} images, DDIM 50 steps, guided", conf,
                  "images/s (50 steps)", [n_images / (s * scale) for s in tm["diffcli"]],
                  [n_images / (s * scale) for s in tm["diffusers"]], "diffusers DDIMScheduler + DiTTransformer2DModel",
                  timed_steps=steps, timed_seconds={k: [_r(s) for s in v] for k, v in tm.items()})


def training_figures(ctx: Context, B: int, reps: int) -> list[dict[str, Any]]:
    from diffusers import DDPMScheduler

    cfg = s2_config()
    ours, theirs = randomize(DiT(cfg), 0).train(), randomize(peer_model(cfg), 1).train()
    tcfg = TrainConfig()
    schedule = NoiseSchedule(tcfg.schedule, tcfg.timesteps, tcfg.beta_start, tcfg.beta_end, tcfg.zero_terminal_snr)
    peer_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    x0 = torch.rand(B, cfg.in_channels, cfg.image_height, cfg.image_width) * 2 - 1
    labels = torch.randint(0, cfg.num_classes, (B,))
    g = torch.Generator().manual_seed(0)

    def step_ours() -> None:
        t = torch.randint(0, 1000, (B,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        y = torch.where(torch.rand(B, generator=g) < tcfg.class_dropout, cfg.num_classes, labels)
        loss = diffusion_loss(ours, schedule, tcfg, x0, y, t, noise).mean()
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs() -> None:
        t = torch.randint(0, 1000, (B,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = peer_sched.add_noise(x0, noise, t)
        pred = theirs(x_t, t, labels, return_dict=False)[0]  # the model drops labels itself (p = 0.1)
        loss = F.mse_loss(pred, noise)
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    a = torch.randn(4096, 4096)
    b = torch.randn(4096, 4096)
    c = torch.empty(4096, 4096)
    tm = interleaved({"diffcli": step_ours, "diffusers": step_theirs, "mm": lambda: torch.mm(a, b, out=c)}, reps)
    log(f"training batch {B}: {_summary(tm)}")
    conf = (f"DiT-S/2 32x32x3 ({describe(cfg, ours, theirs)}), batch {B}, fp32: forward + loss + backward + "
            "AdamW step + zero_grad (no EMA, no gradient clipping on either side); diffcli: "
            "train.diffusion_loss with TrainConfig defaults (v target, Min-SNR-5 weights, cosine schedule, "
            "10% label dropout); diffusers: DDPMScheduler.add_noise and MSE on the noise")
    flops = 3 * dit_flops(cfg) * B
    return [
        figure(ctx, f"training step DiT-S/2 batch {B}", conf, "images/s",
               [B / s for s in tm["diffcli"]], [B / s for s in tm["diffusers"]],
               "diffusers.DiTTransformer2DModel + AdamW"),
        peak_figure(ctx, f"training step DiT-S/2 batch {B}: share of matmul peak",
                    f"{conf}; {flops / 1e9:.1f} GFLOP per step", flops, tm),
    ]


# Runs argv as a grandchild and prints its wall time and peak RSS. A child forked from this big
# process would report this process's RSS as its own ru_maxrss (Linux counts the memory a child
# inherits at fork); a grandchild forked from this small launcher reports only its own.
_LAUNCHER = """
import json, os, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
wall = time.perf_counter() - t0
print(json.dumps({"rc": rc, "wall": wall, "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def _run_cli(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one `diffcli ...` process."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *argv], check=False, capture_output=True, text=True,
                          env=env)
    res = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {"rc": proc.returncode}
    if proc.returncode != 0 or res["rc"] != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr[-2000:]}")
    return res["wall"], res["maxrss_kib"] / 1024


def cli_figure(ctx: Context, runs: int) -> dict[str, Any]:
    exe = Path(sys.executable).with_name("diffcli")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "diffcli"]
    caller_env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if CALLER_OMP_WAIT_POLICY is not None:
        caller_env["OMP_WAIT_POLICY"] = CALLER_OMP_WAIT_POLICY
    envs = {"as called": caller_env, "passive": {**caller_env, "OMP_WAIT_POLICY": "PASSIVE"}}
    walls: dict[str, list[float]] = {k: [] for k in envs}
    rss: dict[str, list[float]] = {k: [] for k in envs}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            for name, env in envs.items() if i % 2 == 0 else list(envs.items())[::-1]:
                out = f"{tmp}/{name.replace(' ', '-')}-{i}"
                w, r = _run_cli([*cmd, "sample", "--steps", "50", "--seed", "0", "--out", out, "-q"], env)
                walls[name].append(w)
                rss[name].append(r)
    log(f"cli: wall {walls} s, peak RSS {rss} MiB")
    from diffcli.sampling.generate import SampleOptions

    policy = CALLER_OMP_WAIT_POLICY or "unset (libgomp spins)"
    d = SampleOptions()
    conf = ("`diffcli sample --steps 50 --seed 0 --out DIR -q` with every other option at its default on the "
            f"shipped model (DiT-M/4 + long skips; 10 images, one per class; sampler {d.sampler}, sigmas "
            f"{d.sigmas}; guidance from the model file, so one batch of 20 with cond and uncond; {d.device} device), "
            "as a whole process: interpreter start-up, imports, model load, sampling, PNGs and the grid; peak RSS "
            f"is the process's ru_maxrss. OMP_WAIT_POLICY: {policy}")
    return figure(ctx, "diffcli sample --steps 50 (whole process)", conf, "seconds", walls["as called"], None, None,
                  peak_rss_mib={"median": _r(statistics.median(rss["as called"])), "max": _r(max(rss["as called"])),
                                "runs": [_r(r) for r in rss["as called"]]},
                  with_omp_wait_policy_passive={"median_seconds": _r(statistics.median(walls["passive"])),
                                                "spread": spread(walls["passive"])})


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def _summary(tm: dict[str, list[float]]) -> str:
    return ", ".join(f"{k} median {statistics.median(v):.3f} s" for k, v in tm.items())


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def print_table(results: list[dict[str, Any]], ctx: Context) -> None:
    from rich.console import Console
    from rich.table import Table

    m = ctx.machine
    table = Table(title=f"diffcli vs diffusers on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch "
                        f"threads), fp32, torch {ctx.torch_version}, {ctx.date}")
    for col in ("figure", "unit", "diffcli", "peer", "ratio", "reps", "diffcli min-max"):
        table.add_column(col, justify="left" if col in ("figure", "unit") else "right")
    notes = []
    for r in results:
        s = r["spread"]["diffcli"]
        ratio = r["ratio"]
        if ratio is None:
            ratio_text = "-"
        elif "peak" in r["name"]:
            ratio_text = f"{ratio:.0%} of peak"
        else:
            ratio_text = f"{ratio:.2f}x"
        peer = f"{r.get('peer_best', r['peer_median']):.4g}" if r["peer_median"] is not None else "-"
        if "peak_rss_mib" in r:
            notes.append(f"{r['name']}: peak RSS {r['peak_rss_mib']['median']:.0f} MiB; with OMP_WAIT_POLICY=PASSIVE "
                         f"{r['with_omp_wait_policy_passive']['median_seconds']:.3g} s")
        table.add_row(r["name"], r["unit"], f"{r['diffcli_median']:.4g}", peer, ratio_text, str(r["repetitions"]),
                      f"{s['min']:.4g}-{s['max']:.4g}")
    console = Console(width=None if sys.stdout.isatty() else 130)
    console.print(table)
    for note in notes:
        console.print(note)
    console.print("ratio: diffcli / peer (>1: diffcli faster), or the share of the matmul peak (peer: the best "
                  "torch.mm repetition). peer: diffusers "
                  f"{m.get('diffusers', '?')}; configurations, spreads and the FLOP formula in the results file. "
                  f"Load average at start {m.get('load_average_at_start')}, at end {m.get('load_average_at_end')}.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: few repetitions, few sampling steps")
    ap.add_argument("--sample-steps", type=int, default=None,
                    help="DDIM steps actually timed in the sampling figure, scaled to 50 (default 4; --quick 2; 50: all)")
    ap.add_argument("--only", default="forward,sampling,training,cli", help="comma-separated figures to run")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    try:
        import diffusers
    except ImportError:
        print("diffusers is missing: pip install -e '.[bench]' (make bench does it)", file=sys.stderr)
        return 2
    import diffusers.utils.logging as dlog

    dlog.set_verbosity_error()
    ctx = Context(machine_info(), torch.__version__,
                  datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    ctx.machine["diffusers"] = diffusers.__version__
    q = args.quick
    t_start = time.perf_counter()
    log(f"{ctx.machine}; torch {ctx.torch_version}")
    results: list[dict[str, Any]] = []
    # repetitions sized for ~12 minutes on 2 busy cores (a DiT-S/2 training step at batch 64 takes ~20 s)
    if "forward" in only:
        results += forward_figures(ctx, {16: 3, 64: 2} if q else {16: 7, 64: 4})
    if "sampling" in only:
        steps = args.sample_steps or (2 if q else 4)
        results.append(sampling_figure(ctx, 64, steps, 1 if q else 2))
    if "training" in only:
        results += training_figures(ctx, 64, 2 if q else 3)
    if "cli" in only:
        results.append(cli_figure(ctx, 1 if q else 2))
    with contextlib.suppress(OSError):
        ctx.machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    ctx.machine["bench_seconds"] = round(time.perf_counter() - t_start, 1)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results, ctx)
    print(f"wrote {args.out} in {ctx.machine['bench_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
