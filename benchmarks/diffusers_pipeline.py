"""The peer of the end-to-end figure in tune_bench.py: a diffusers DiT sampling job of the shipped model's size.

It does what diffusers' DiTPipeline.__call__ does, minus the VAE decode (the shipped model works on
pixels): DiTTransformer2DModel with the shipped model's depth, width, heads, patch, channels and classes
(random weights: the time does not depend on them), DDIMScheduler over the same cosine schedule with
trailing spacing, classifier-free guidance with cond and uncond in one batch, then PNG files. Run as a
whole process, its imports and set-up included, like `diffcli sample`:

    python benchmarks/diffusers_pipeline.py -n 64 --steps 50 --out /tmp/peer
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=64, help="images")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--batch-size", type=int, default=16, help="images per batch (diffcli sample's default)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from diffusers import DDIMScheduler, DiTTransformer2DModel
    from PIL import Image

    depth, width, heads, patch, size, classes = 8, 256, 4, 4, 28, 10  # weights/diffcli-mnist.safetensors
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=width // heads, in_channels=1,
                                  out_channels=1, num_layers=depth, sample_size=size, patch_size=patch,
                                  num_embeds_ada_norm=classes, norm_eps=1e-6).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                              prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for start in range(0, args.n, args.batch_size):
            B = min(args.batch_size, args.n - start)
            labels = torch.arange(start, start + B) % classes
            x = torch.randn(B, 1, size, size, generator=torch.Generator().manual_seed(start))
            y = torch.cat([labels, torch.full_like(labels, classes)])
            scheduler.set_timesteps(args.steps)
            for t in scheduler.timesteps:
                pred = model(torch.cat([x, x]), t.expand(2 * B), y, return_dict=False)[0]
                cond, uncond = pred.chunk(2)
                x = scheduler.step(uncond + args.guidance * (cond - uncond), t, x).prev_sample
            pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
            for i in range(B):
                Image.fromarray(pixels[i]).save(out / f"{start + i:04d}.png")
    print(f"{args.n} images in {os.fspath(out)}")


if __name__ == "__main__":
    main()
