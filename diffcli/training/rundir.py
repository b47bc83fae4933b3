"""The run folder: its layout, the checkpoints and model file written into it, and resuming from them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from diffcli import atomic
from diffcli.files import checkpoint
from diffcli.data.folder import ImageSet
from diffcli.errors import InputError, OutputExistsError, UsageError
from diffcli.models.dit import DiT, ModelConfig
from diffcli.diffusion.schedule import NoiseSchedule
from diffcli.training.config import TrainConfig


class RunDir:
    """config.json, metrics.jsonl, samples/step_NNNNNNN.png, checkpoints/, model.safetensors."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.metrics = self.root / "metrics.jsonl"
        self.samples = self.root / "samples"
        self.checkpoints = self.root / "checkpoints"
        self.model = self.root / "model.safetensors"
        self.cache = self.root / "data-cache.safetensors"

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:07d}.safetensors"

    def list_checkpoints(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.glob("step_*.safetensors") if p.name[5:12].isdigit())

    def start(self, config: dict[str, Any], started: float, start_step: int) -> None:
        """Write config.json, delete the temporary files of a killed run (written before `started`, a
        time.time() value) and drop the metrics records after the step training starts from."""
        atomic.write_bytes(self.config, json.dumps(config, indent=2).encode())
        for folder in (self.root, self.checkpoints, self.samples):
            atomic.remove_stale_temps(folder, older_than=started)
        trim_metrics(self.metrics, start_step)


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep the metrics records up to the step training starts from. Records after it (logged before a
    crash, after the last checkpoint) are logged again, and a line cut short by a crash would
    otherwise end up in the middle of the file once new lines are appended."""
    if not path.exists():
        return
    raw = path.read_bytes()
    keep = []
    for line in raw.split(b"\n")[:-1]:  # what follows the last newline is a cut-short line
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue
        if isinstance(step, int) and step <= last_step:
            keep.append(line + b"\n")
    if b"".join(keep) != raw:
        atomic.write_bytes(path, b"".join(keep))


# --------------------------------------------------------------------------------------------------
# Training state: model, EMA, optimizer moments (safetensors only)
# --------------------------------------------------------------------------------------------------


def optimizer_tensors(prefix: str, module: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's state for module's parameters as named tensors: {prefix}.exp_avg.NAME, .exp_avg_sq.NAME,
    .step.NAME (none before the first step). Shared by train and train-autoencoder."""
    out = {}
    for name, p in module.named_parameters():
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                out[f"{prefix}.{key}.{name}"] = torch.as_tensor(st[key]).float().reshape(() if key == "step" else p.shape)
    return out


def load_optimizer_tensors(prefix: str, tensors: dict[str, torch.Tensor], module: nn.Module,
                           opt: torch.optim.Optimizer) -> None:
    """The inverse of optimizer_tensors: parameters without saved state start fresh."""
    for name, p in module.named_parameters():
        key = f"{prefix}.exp_avg.{name}"
        if key in tensors:
            # fused (CUDA) AdamW keeps its step counter on the parameter's device, the plain one on the CPU
            step_device = p.device if opt.defaults.get("fused") else torch.device("cpu")
            opt.state[p] = {
                "step": tensors[f"{prefix}.step.{name}"].to(torch.float32).reshape(()).to(step_device),
                "exp_avg": tensors[key].to(p.device, p.dtype),
                "exp_avg_sq": tensors[f"{prefix}.exp_avg_sq.{name}"].to(p.device, p.dtype),
            }


def state_tensors(model: DiT, ema: DiT, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    return tensors | optimizer_tensors("opt", model, opt)


def load_state_tensors(tensors: dict[str, torch.Tensor], model: DiT, ema: DiT, opt: torch.optim.Optimizer) -> None:
    def sub(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    model.load_state_dict(sub("model."), strict=True)
    ema.load_state_dict(sub("ema."), strict=True)
    load_optimizer_tensors("opt", tensors, model, opt)


# --------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------


@dataclass
class Resumed:
    """Where training starts: step 0 with nothing loaded, or a checkpoint's step, state and metadata."""

    path: Path | None = None
    step: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        """Training time spent before this process started."""
        return float(self.meta.get("seconds", "0") or 0)


def resolve_resume(cfg: TrainConfig, run: RunDir) -> Path | None:
    if cfg.resume == "never":
        if run.list_checkpoints():
            raise OutputExistsError(
                f"{run.root} already holds a run; use --resume auto to continue it or choose another --out"
            )
        return None
    if cfg.resume == "auto":
        ckpts = run.list_checkpoints()
        return ckpts[-1] if ckpts else None
    path = Path(cfg.resume)
    if not path.exists():
        raise InputError(f"--resume: checkpoint not found: {path}")
    return path


def resume_point(cfg: TrainConfig, run: RunDir) -> Resumed:
    """The checkpoint --resume names, read, after checking it was trained with the same IDENTITY options."""
    path = resolve_resume(cfg, run)
    if path is None:
        return Resumed()
    tensors, meta = checkpoint.read_state(path)  # every field and tensor checked
    saved = checkpoint.meta_json(meta, "train_config", path)
    if not isinstance(saved, dict):
        raise InputError(f"{path} has malformed 'train_config' metadata")
    cfg.resolve_warmup(saved)  # an automatic warm-up stays what the run started with, whatever --steps is now
    diff = [k for k in TrainConfig.IDENTITY if k in saved and saved[k] != getattr(cfg, k)]
    if diff:
        shown = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} (now {getattr(cfg, k)!r})" for k in diff[:4])
        raise UsageError(f"cannot resume {path.name} with different options: it was trained with {shown}")
    return Resumed(path, int(meta.get("step", "0")), tensors, meta)


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


@dataclass
class Checkpointer:
    """Writes a step's training state to checkpoints/ (keeping the last --keep-last) and its EMA
    weights, with everything needed to sample, to model.safetensors."""

    run: RunDir
    cfg: TrainConfig
    data: ImageSet
    model_config: ModelConfig
    schedule: NoiseSchedule
    latent: tuple[Any, Any] | None = None  # a latent run: (checkpoint.LatentSpec, its LatentDecoder)
    text: Any = None  # a text-to-image run: its diffcli.models.text.TextSpec

    def save(self, step: int, model: DiT, ema: DiT, opt: torch.optim.Optimizer, elapsed: Callable[[], float],
             final: bool = False) -> None:
        cfg, data, run = self.cfg, self.data, self.run
        meta = {"train_config": cfg.to_dict(), "step": str(step), "seconds": str(round(elapsed(), 3)),
                "class_names": data.class_names,
                "model_config": self.model_config.to_dict(), "schedule": self.schedule.to_dict(),
                **({"text_encoder": self.text.to_dict()} if self.text is not None else {})}
        checkpoint.write(run.checkpoint_path(step), state_tensors(model, ema, opt), meta, checkpoint.STATE_FORMAT)
        for old in run.list_checkpoints()[: -cfg.keep_last]:
            old.unlink(missing_ok=True)
        B = cfg.batch_size
        checkpoint.save_model(run.model, ema, self.schedule, cfg.prediction, data.class_names,
                              training={"steps": step, "images_seen": step * B, "dataset_images": len(data.files),
                                        "dataset": str(cfg.data_dir), "preset": cfg.model, "batch_size": B,
                                        "lr": cfg.lr, "seconds": round(elapsed(), 1), "final": final},
                              sampling={"guidance": cfg.guidance if data.class_names or self.text else 1.0},
                              dtype=torch.float16 if cfg.save_dtype == "fp16" else torch.float32,
                              latent=self.latent, text=self.text)
