"""Numerical parity of diffcli's AutoencoderKL with diffusers', directly and after each import layout.

For an f=4 and an f=8 autoencoder (the f=8 one Stable Diffusion's VAE architecture: widths 128, 256,
512, 512, two resnets per level) with random weights, on the same images and latents:

    direct            diffusers' state dict loaded into diffcli as it is
    diffusers folder  diffusers' save_pretrained -> convert_autoencoder -> load_autoencoder
    ldm file          a latent-diffusion single file (first_stage_model.* inside a mock SD checkpoint,
                      named by a mapping written out here, not convert.py's) -> convert -> load

each reports the max abs difference of the encoder's posterior mean and of the decoder's output from
diffusers', in float32 on the CPU. Target: <= 1e-4. Needs diffusers (pip install -e '.[bench]'):

    python benchmarks/ae_parity.py --out benchmarks/ae_parity.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import torch

from diffcli import __version__
from diffcli.models.autoencoder import AutoencoderConfig, AutoencoderKL
from diffcli.files.autoencoder_file import load_autoencoder
from diffcli.files.convert import convert_autoencoder

CONFIGS = {
    "f4": AutoencoderConfig(block_out_channels=(64, 128, 256), layers_per_block=2, norm_num_groups=32),
    "f8 (SD VAE)": AutoencoderConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
}
TARGET = 1e-4


def random_weights(model: torch.nn.Module, seed: int) -> None:
    """Weights N(0, 1/fan_in) so activations stay of order one at any width; GroupNorm scales N(1, 0.05^2),
    biases N(0, 0.05^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_(float(name.endswith("weight")) + 0.05 * torch.randn(p.shape, generator=g))


def ldm_checkpoint(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers names -> latent-diffusion names, part by part, under first_stage_model. of a mock SD checkpoint."""
    out = {"model.diffusion_model.out.0.weight": torch.ones(4), "cond_stage_model.dummy": torch.zeros(3)}
    for name, t in state.items():
        p = name.split(".")
        if p[1] == "down_blocks":  # encoder.down_blocks.i.(resnets.j | downsamplers.0).rest
            head = [p[0], "down", p[2]] + (["block", p[4]] if p[3] == "resnets" else ["downsample"])
            p = head + p[5:]
        elif p[1] == "up_blocks":  # the decoder's levels, renumbered by resolution
            head = [p[0], "up", str(levels - 1 - int(p[2]))] + (["block", p[4]] if p[3] == "resnets" else ["upsample"])
            p = head + p[5:]
        elif p[1] == "mid_block":
            if p[2] == "resnets":
                p = [p[0], "mid", f"block_{int(p[3]) + 1}"] + p[4:]
            else:  # attentions.0.(group_norm | to_q | to_k | to_v | to_out.0).(weight | bias)
                leaf = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[p[4]]
                p = [p[0], "mid", "attn_1", leaf, p[-1]]
                if leaf != "norm" and p[-1] == "weight":
                    t = t[:, :, None, None]  # 1x1 convs in latent diffusion
        elif p[1] == "conv_norm_out":
            p = [p[0], "norm_out"] + p[2:]
        p = ["nin_shortcut" if s == "conv_shortcut" else s for s in p]
        out["first_stage_model." + ".".join(p)] = t.contiguous().clone()
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/ae_parity.json")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()

    import diffusers

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, cfg) in enumerate(CONFIGS.items()):
            n = len(cfg.block_out_channels)
            ref = diffusers.AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.block_out_channels,
                layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
                norm_num_groups=cfg.norm_num_groups, scaling_factor=0.18215).eval()
            random_weights(ref, seed=i)
            x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
            with torch.no_grad():
                ref_mean = ref.encode(x).latent_dist.mean
                z = ref_mean + 0.5 * torch.randn(ref_mean.shape, generator=torch.Generator().manual_seed(1))
                ref_out = ref.decode(z).sample

            direct = AutoencoderKL(cfg).eval()
            direct.load_state_dict(ref.state_dict(), strict=True)
            folder = Path(tmp) / f"diffusers-{i}"
            ref.save_pretrained(folder, safe_serialization=True)
            from safetensors.torch import save_file

            save_file(ldm_checkpoint(ref.state_dict(), n), Path(tmp) / f"sd-{i}.safetensors")
            candidates: list[tuple[str, AutoencoderKL, float]] = [("direct", direct, 0.0)]
            for layout, src, kw in (("diffusers folder", folder, {}),
                                    ("ldm file", Path(tmp) / f"sd-{i}.safetensors", {"scaling_factor": 0.18215})):
                out = Path(tmp) / f"ae-{i}-{layout.split()[0]}.safetensors"
                t0 = time.perf_counter()
                convert_autoencoder(src, out, **kw)
                seconds = time.perf_counter() - t0
                candidates.append((layout, load_autoencoder(out).model, seconds))
            for path, model, seconds in candidates:
                with torch.no_grad():
                    mean, dec = model.encode(x).mean, model.decode(z)
                rows.append({
                    "config": label, "block_out_channels": list(cfg.block_out_channels),
                    "layers_per_block": cfg.layers_per_block, "factor": cfg.factor,
                    "parameters": sum(p.numel() for p in direct.parameters()), "path": path,
                    "encoder_mean_max_abs_diff": max_diff(mean, ref_mean),
                    "decoder_max_abs_diff": max_diff(dec, ref_out),
                    "encoder_mean_max_abs": float(ref_mean.abs().max()), "decoder_max_abs": float(ref_out.abs().max()),
                    "convert_seconds": round(seconds, 2),
                })

    ok = all(r["encoder_mean_max_abs_diff"] <= TARGET and r["decoder_max_abs_diff"] <= TARGET for r in rows)
    print(f"{'config':12} {'path':17} {'params':>7} {'enc mean diff':>13} {'dec diff':>9} {'|dec| max':>9}")
    for r in rows:
        print(f"{r['config']:12} {r['path']:17} {r['parameters'] / 1e6:6.1f}M {r['encoder_mean_max_abs_diff']:13.2e} "
              f"{r['decoder_max_abs_diff']:9.2e} {r['decoder_max_abs']:9.3f}")
    print(f"target <= {TARGET:g}: {'met' if ok else 'NOT met'}")
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "diffcli": __version__,
        "device": "cpu", "dtype": "float32", "threads": torch.get_num_threads(),
        "image_size": args.size, "batch": args.batch, "target": TARGET, "target_met": ok, "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
