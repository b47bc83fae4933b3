"""--eval-every: FID, KID and class accuracy of the EMA model's samples while training runs.

The eval package does the work (diffcli/eval); this is the callback the loop calls. The real side
(--eval-real: its features, statistics and for `auto` features the classifier) is prepared once when
training starts, from the eval cache when it holds them. Every --eval-every steps the EMA model draws
--eval-images images with `sample`'s default sampler (DPM++ 2M, 15 steps, edm sigmas) from the same
seeds each time, so the figures move with the model alone; one record goes to metrics.jsonl, one line
to the log, scalars to TensorBoard, and the best FID so far ends up in the run's summary.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from diffcli import atomic
from diffcli.diffusion import registry
from diffcli.eval.evaluate import Evaluator, resolve_features
from diffcli.files.images import to_uint8
from diffcli.models.dit import DiT
from diffcli.diffusion.registry import sample
from diffcli.diffusion.schedule import NoiseSchedule
from diffcli.training.config import TrainConfig

BATCH = 64  # images per sampling batch


class EvalHook:
    def __init__(self, cfg: TrainConfig, evaluator: Evaluator, class_names: list[str], metrics: Path,
                 device: torch.device, log: Callable[[str], None], tb: Any = None) -> None:
        self.cfg, self.evaluator, self.class_names, self.metrics = cfg, evaluator, class_names, metrics
        self.device, self.log, self.tb = device, log, tb
        self.best_fid, self.best_step = _best_so_far(metrics, evaluator.kind)

    @classmethod
    def prepare(cls, cfg: TrainConfig, class_names: list[str], metrics: Path, device: torch.device,
                log: Callable[[str], None]) -> "EvalHook":
        """The real side of --eval-real, before the first step (features: inception when
        $DIFFCLI_INCEPTION_WEIGHTS is set, else auto, as `diffcli eval`)."""
        kind = resolve_features(None, None)
        evaluator = Evaluator.prepare(cfg.eval_real, kind, device=device, want_accuracy=bool(class_names), log=log)
        log(f"eval every {cfg.eval_every} steps: {cfg.eval_images} samples against {cfg.eval_real} ({kind} features)")
        return cls(cfg, evaluator, class_names, metrics, device, log)

    def due(self, step: int) -> bool:
        return step % self.cfg.eval_every == 0

    @torch.no_grad()
    def __call__(self, step: int, ema: DiT, schedule: NoiseSchedule) -> dict[str, Any]:
        """Sample with the EMA weights, measure, record; returns the metrics.jsonl record."""
        t0 = time.perf_counter()
        cfg, mc = self.cfg, ema.config
        n, K = cfg.eval_images, len(self.class_names)
        labels = torch.arange(n) % K if K else None
        sigmas = registry.resolve_sigmas(registry.DEFAULT_SAMPLER, "auto")
        batches = []
        for start in range(0, n, BATCH):
            seeds = list(range(start, min(n, start + BATCH)))  # the same noise at every evaluation
            res = sample(ema, schedule, (mc.in_channels, mc.image_height, mc.image_width), registry.DEFAULT_STEPS,
                         registry.DEFAULT_SAMPLER, seeds=seeds, labels=labels[seeds] if K else None,
                         null_label=ema.null_class if K else None, guidance=cfg.guidance if K else 1.0,
                         prediction=cfg.prediction, device=self.device, sigmas=sigmas)
            batches.append(to_uint8(res.images).permute(0, 3, 1, 2))  # (B, C, H, W) uint8, as PNGs hold them
        classes = [self.class_names[int(k)] for k in labels] if K else None
        s = self.evaluator.score_pixels(torch.cat(batches), classes)
        rec = {"step": step, "fid": s.fid, "kid": s.kid_mean, "kid_std": s.kid_std, "precision": s.precision,
               "recall": s.recall, "accuracy": s.accuracy, "features": s.features, "eval_images": s.n_samples,
               "eval_seconds": round(time.perf_counter() - t0, 2)}
        atomic.append_line(self.metrics, json.dumps(rec))
        if self.best_fid is None or s.fid < self.best_fid:
            self.best_fid, self.best_step = s.fid, step
        if self.tb is not None:
            for k in ("fid", "kid", "precision", "recall", "accuracy"):
                if rec[k] is not None:
                    self.tb.add_scalar(f"eval/{k}", rec[k], step)
        acc = "" if s.accuracy is None else f"  accuracy {s.accuracy:.3f}"
        self.log(f"eval at step {step} ({s.features} features, {s.n_samples} samples): FID {s.fid:.4f}  "
                 f"KID {s.kid_mean:.5f}{acc}  (best FID {self.best_fid:.4f} at step {self.best_step}; "
                 f"{rec['eval_seconds']:.0f} s)")
        return rec

    def best(self) -> dict[str, Any]:
        return {"best_fid": self.best_fid, "best_fid_step": self.best_step}


def _best_so_far(metrics: Path, kind: str) -> tuple[float | None, int | None]:
    """The lowest FID of this feature kind among the eval records already in metrics.jsonl (a resumed
    run keeps those up to its checkpoint)."""
    best: tuple[float | None, int | None] = (None, None)
    try:
        lines = metrics.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return best
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if not isinstance(r, dict):
            continue
        fid, step = r.get("fid"), r.get("step")
        if (r.get("features") == kind and isinstance(fid, (int, float)) and math.isfinite(fid) and isinstance(step, int)
                and (best[0] is None or fid < best[0])):
            best = (float(fid), step)
    return best
