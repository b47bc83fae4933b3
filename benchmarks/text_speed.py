"""Training throughput of a text-to-image model against the class model of the same preset and size.

Both train on 32x32 RGB batches with the training loop's own step (diffcli.training.losses.diffusion_loss,
backward, AdamW, EMA update); the class model has 10 classes, the text model the builtin encoder over
captions of the shapes set (`benchmarks/shapes.py`: 7 words, 14-word vocabulary). Rounds alternate
between the two so that a machine's load changes hit both alike; the median of the rounds is reported,
and the ratio text / class (issue 13's target: >= 0.70).

    python benchmarks/text_speed.py --out benchmarks/text_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def make_models(preset: str):
    from dataclasses import replace

    from diffcli.models.dit import DiT, preset_config
    from diffcli.models.text import Vocabulary
    from shapes import SHAPES, COLOURS, caption

    base = preset_config(preset, image_height=32, image_width=32, in_channels=3, long_skip=True)
    captions = [caption(f, b, s) for f in range(len(COLOURS)) for b in range(len(COLOURS)) if f != b for s in range(len(SHAPES))]
    vocab = Vocabulary.build(captions)
    rows = vocab.rows(captions, 7)
    text_cfg = replace(base, text_encoder="builtin", context_dim=base.hidden_size, text_length=7,
                       text_vocab=vocab.size, text_depth=2, text_pooled=True).validate()  # as train makes a new text model
    class_cfg = replace(base, num_classes=10).validate()
    torch.manual_seed(0)
    return DiT(class_cfg), DiT(text_cfg), rows


def timed_steps(model, labels_of, batch: int, steps: int) -> float:
    """Images per second over `steps` training steps (after one warm-up step)."""
    from diffcli.diffusion.schedule import NoiseSchedule
    from diffcli.training.config import TrainConfig
    from diffcli.training.losses import diffusion_loss
    from diffcli.training.loop import ema_update

    cfg = TrainConfig()
    schedule = NoiseSchedule("cosine", 1000)
    ema = type(model)(model.config)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        x0 = torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(batch, 3, 32, 32, generator=g)
        loss = diffusion_loss(model, schedule, cfg, x0, labels_of(batch, g), t, noise).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, 0.999)

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="DiT-XS/4,DiT-M/4")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for preset in args.presets.split(","):
        class_model, text_model, rows = make_models(preset)
        cls_ips, txt_ips = [], []
        for _ in range(args.rounds):
            cls_ips.append(timed_steps(class_model, lambda b, g: torch.randint(0, 11, (b,), generator=g), args.batch, args.steps))
            txt_ips.append(timed_steps(text_model, lambda b, g: rows[torch.randint(0, len(rows), (b,), generator=g)],
                                       args.batch, args.steps))
        c, t = statistics.median(cls_ips), statistics.median(txt_ips)
        row = {"preset": preset, "class_images_per_second": round(c, 1), "text_images_per_second": round(t, 1),
               "ratio": round(t / c, 3), "class_parameters": sum(q.numel() for q in class_model.parameters()),
               "text_parameters": sum(q.numel() for q in text_model.parameters())}
        results.append(row)
        print(f"{preset}: class {c:.1f} img/s, text {t:.1f} img/s, text/class {t / c:.2f} (target >= 0.70)", flush=True)
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": args.threads, "batch": args.batch, "rounds": args.rounds,
              "steps_per_round": args.steps, "results": results}
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
