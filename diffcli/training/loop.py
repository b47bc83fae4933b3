"""train(): set up a run, then step, log, checkpoint and preview until --steps or a signal stops it."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from diffcli import __version__, atomic
from diffcli.files import checkpoint
from diffcli.data.folder import ImageSet, load_folder, parse_resolution
from diffcli.device import resolve_precision
from diffcli.errors import DiffcliError, InputError, Interrupted, UsageError
from diffcli.models.dit import DiT, ModelConfig, count_parameters, preset_config
from diffcli.diffusion.schedule import NoiseSchedule
from diffcli.training.batches import Batch, Batches
from diffcli.training.config import QUICK_TIP_IMAGES, TrainConfig
from diffcli.training.distributed import Dist, all_mean, any_rank, process_group
from diffcli.training.losses import diffusion_loss
from diffcli.training.rundir import Checkpointer, Resumed, RunDir, load_state_tensors, resume_point


@dataclass
class TrainResult:
    model_path: str
    run_dir: str
    steps: int
    resumed_from: int
    final_loss: float
    seconds: float
    images_per_second: float
    stopped_by: str = "steps"  # "steps": --steps reached; "time_limit": --time-limit reached first
    best_fid: float | None = None  # with --eval-every: the lowest FID so far, and its step
    best_fid_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train(cfg: TrainConfig, log: Callable[[str], None] = print,
          progress: Callable[[int, int, str], None] | None = None,
          decode_progress: Callable[[int, int], None] | None = None) -> TrainResult:
    cfg.validate()
    with process_group(cfg.device) as (d, device):
        return _train(cfg, d, device, log if d.main else (lambda m: None), progress if d.main else None,
                      decode_progress if d.main else None)


def _train(cfg: TrainConfig, d: Dist, device: torch.device, log: Callable[[str], None],
           progress: Callable[[int, int, str], None] | None,
           decode_progress: Callable[[int, int], None] | None) -> TrainResult:
    started = time.time()  # temporary files in the run folder older than this are from a killed run
    H, W = parse_resolution(cfg.resolution)
    run = RunDir(cfg.out)
    resumed = resume_point(cfg, run)
    if cfg.time_limit is not None and resumed.seconds >= cfg.time_limit * 60:
        raise UsageError(f"the run in {run.root} has already trained {resumed.seconds / 60:.1f} minutes, "
                         f"--time-limit is {cfg.time_limit:g}: give a larger --time-limit to continue it")
    if resumed.path is not None:
        log(f"resuming from {resumed.path} at step {resumed.step}")
    warmup_note = cfg.resolve_warmup()  # said once the data and model are known to be fine

    _check_captions(cfg)
    ae_spec = _check_autoencoder(cfg, H, W)
    # with an autoencoder, the images take its channels (gray ones are expanded for an RGB autoencoder)
    channels = cfg.channels if ae_spec is None else str(ae_spec.config.in_channels)
    data = _load_data(cfg, run, d, H, W, log, decode_progress, channels)
    latents, latent = None, None
    if ae_spec is not None:
        latents, latent = _prepare_latents(cfg, run, d, device, data, log, decode_progress)
    evaluation = None
    if cfg.eval_every and d.main:  # the real side, once, before the run starts (a bad --eval-real fails now)
        from diffcli.training.evaluation import EvalHook

        evaluation = EvalHook.prepare(cfg, data.class_names, run.metrics, device, log)
    C, h, w = (data.pixels.shape[1], H, W) if latents is None else tuple(latents.mean.shape[1:])
    mcfg = preset_config(cfg.model, image_height=h, image_width=w, in_channels=C,
                         num_classes=len(data.class_names), learn_sigma=cfg.learn_sigma, long_skip=cfg.long_skip)
    text = _prepare_text(cfg, data, mcfg, log, pooled=_pooled_text(resumed))
    if text is not None:
        mcfg = text.config
        data = replace(data, class_names=[])  # captions are the condition: class folders only hold the files
    learner = Learner.build(cfg, mcfg, d, device, resumed, text)
    log(f"model: {cfg.model}{' +long-skip' if cfg.long_skip else ''}, "
        f"{count_parameters(learner.model) / 1e6:.2f} M parameters; "
        f"{device.type}{f' x{d.world}' if d.active else ''}, {str(learner.dtype).removeprefix('torch.')}")
    if warmup_note:
        log(warmup_note)
    if cfg.preset != "default":
        from diffcli.training.config import RECIPES

        log(f"preset {cfg.preset}: " + ", ".join(f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in RECIPES[cfg.preset]))
    elif device.type == "cpu" and len(data.files) <= QUICK_TIP_IMAGES and not resumed.path:
        log(f"tip: on a CPU, --preset quick learns a folder of {len(data.files):,} images much sooner "
            f"(README: Training on a CPU)")

    summary = {"dataset": {**data.summary(), "path": str(cfg.data_dir)}, "model_config": mcfg.to_dict(),
               "parameters": count_parameters(learner.model), "world_size": d.world, "diffcli_version": __version__}
    if d.main:
        run.start({"train": cfg.to_dict(), **summary}, started, resumed.step)
    tb = _tensorboard(cfg, run) if d.main else None
    if evaluation is not None:
        evaluation.tb = tb
    batches = Batches(cfg, data, d.rank, d.world, device, latents, text.tokens if text else None)
    saver = Checkpointer(run, cfg, data, mcfg, learner.schedule, latent, text.spec if text else None)

    # ---- the loop -------------------------------------------------------------------------------
    t_start = time.perf_counter()
    prior_seconds = resumed.seconds
    elapsed = lambda: prior_seconds + time.perf_counter() - t_start  # noqa: E731
    meter = Meter(cfg, run, d.main, tb, progress)
    step = resumed.step
    limit_s = cfg.time_limit * 60 if cfg.time_limit is not None else math.inf
    stopped_by = "steps"
    with StopFlag() as stop:
        while step < cfg.steps:
            loss, grad_norm = learner.gradients(batches.at(step))
            if not torch.isfinite(loss):
                raise DiffcliError(
                    f"loss is {float(loss)} at step {step + 1}; training stopped. The last good checkpoint "
                    f"is kept in {run.checkpoints}; try a lower --lr or --precision fp32"
                )
            lr = lr_at(cfg, step)
            learner.apply(lr, ema_decay_at(cfg, step))
            step += 1
            meter.after_step(step, loss, grad_norm, lr, elapsed)

            # end of the step: checkpoint, preview, and stop together when any rank was signalled or
            # rank 0's clock passed --time-limit (one clock, so every rank stops at the same step)
            stop_now = any_rank(stop.signal is not None, d, device)
            time_up = any_rank(d.main and elapsed() >= limit_s, d, device) if limit_s < math.inf else False
            last = step == cfg.steps or time_up
            if (step % cfg.checkpoint_every == 0 or last or stop_now) and d.main:
                saver.save(step, learner.model, learner.ema, learner.opt, elapsed, final=step == cfg.steps)
            if cfg.sample_every and (step % cfg.sample_every == 0 or last) and d.main:
                png = run.samples / f"step_{step:07d}.png"
                preview(learner.ema, learner.schedule, cfg, data.class_names, png, device,
                        decoder=latent[1] if latent else None, text=text)
            if evaluation is not None and evaluation.due(step) and not stop_now:  # a stop is not kept waiting
                rec = evaluation(step, learner.ema, learner.schedule)
                meter.t_window += rec["eval_seconds"]  # images/s counts training time only
            if stop_now:
                raise Interrupted(f"interrupted at step {step}; checkpoint saved in {run.checkpoints} "
                                  f"(resume with --resume auto)")
            if time_up and step < cfg.steps:
                stopped_by = "time_limit"
                meter.flush(step, lr, elapsed)
                log(f"time limit: stopped at step {step} after {elapsed() / 60:.1f} minutes of training; checkpoint "
                    f"saved (a larger --time-limit or none continues it with --resume auto)")
                break
    meter.close()
    secs = time.perf_counter() - t_start
    done = step - resumed.step
    return TrainResult(str(run.model), str(run.root), step, resumed.step, meter.last_loss, round(elapsed(), 2),
                       round(done * cfg.batch_size / max(secs, 1e-9), 2), stopped_by,
                       **(evaluation.best() if evaluation else {}))


def _check_autoencoder(cfg: TrainConfig, H: int, W: int):
    """--autoencoder, read from its header before any image is decoded: the file is an autoencoder, its
    channels fit --channels, the resolution is a multiple of its factor and the latent of the patch size."""
    if not cfg.autoencoder:
        return None
    from diffcli.files.autoencoder_file import read_autoencoder_spec

    spec = read_autoencoder_spec(cfg.autoencoder)
    ae, path = spec.config, cfg.autoencoder
    if cfg.channels != "auto" and int(cfg.channels) != ae.in_channels:
        raise InputError(f"{path} encodes {ae.in_channels}-channel images, --channels is {cfg.channels}")
    if H % ae.factor or W % ae.factor:
        raise UsageError(f"--resolution {cfg.resolution} is not a multiple of {path}'s factor {ae.factor}")
    preset_config(cfg.model, image_height=H // ae.factor, image_width=W // ae.factor, in_channels=ae.latent_channels,
                  learn_sigma=cfg.learn_sigma, long_skip=cfg.long_skip)
    return spec


def _prepare_latents(cfg: TrainConfig, run: RunDir, d: Dist, device: torch.device, data: ImageSet,
                     log: Callable[[str], None], progress: Callable[[int, int], None] | None):
    """The cached posterior of every image (diffcli/data/latents.py; process 0 encodes, the others read),
    and what the model file embeds: the decoder and its settings."""
    from diffcli.models.autoencoder import LatentDecoder
    from diffcli.files.autoencoder_file import load_autoencoder
    from diffcli.files.checkpoint import LatentSpec
    from diffcli.data.folder import pixels_digest
    from diffcli.data.latents import load_or_encode

    ae = load_autoencoder(cfg.autoencoder, device)
    digest = pixels_digest(data.pixels, data.labels)
    path = run.root / "latents.safetensors"
    if d.main:  # (only process 0 writes in the run folder: another's clean-up could remove its temporary file)
        run.root.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale_temps(run.root, older_than=time.time())  # a cache a killed run was writing
    args = (ae, data.pixels, digest, cfg.flip, cfg.resolution, device, log, progress)
    latents = load_or_encode(path, *args, write=True) if d.main else None
    if d.active:
        torch.distributed.barrier()
    if latents is None:
        latents = load_or_encode(path, *args, write=False)
    decoder = LatentDecoder(ae.config, latents.scaling_factor)
    decoder.load_state_dict(ae.model.decoder_state())
    decoder.to(device).eval().requires_grad_(False)
    H, W = data.pixels.shape[2:]
    spec = LatentSpec(ae.config, latents.scaling_factor, ae.sha256, Path(ae.path).name, (H, W), ae.config.out_channels)
    return latents, (spec, decoder)


@dataclass
class TextRun:
    """A text-to-image run: the model config with its text fields, what the files record, the token
    row of every image, the prompts of the preview grid, and a frozen CLIP encoder if one is used."""

    config: ModelConfig
    spec: Any  # diffcli.models.text.TextSpec
    tokens: torch.Tensor  # (N, L) int64, PAD-padded; an image without a caption: all PAD (the null caption)
    prompts: list[str]  # up to PREVIEW_PROMPTS distinct captions, in file order
    clip: Any = None  # diffcli.models.clip.ClipTextEncoder for a CLIP run


PREVIEW_PROMPTS = 8


def _check_captions(cfg: TrainConfig) -> None:
    """What the captions decide, checked before any image is decoded or anything is written: a text
    encoder asked for where no image has a caption, and --eval-every with a text model."""
    if cfg.text_encoder == "none" or cfg.unconditional or not (cfg.text_encoder != "auto" or cfg.eval_every):
        return
    from diffcli.data.captions import read_captions
    from diffcli.data.folder import find_images

    files, _, _ = find_images(cfg.data_dir)
    if files and any(c is not None for c in read_captions(Path(cfg.data_dir), files, cfg.caption_column)):
        if cfg.eval_every:
            raise UsageError("--eval-every is not available for text-to-image models yet; sample with --prompts and "
                             "run diffcli eval on the images")
    elif cfg.text_encoder != "auto":
        raise InputError(f"--text-encoder {cfg.text_encoder}: no image in {cfg.data_dir} has a caption (a .txt file "
                         f"with the image's name beside it, or a metadata.jsonl with a {cfg.caption_column!r} column)")


def _pooled_text(resumed: Resumed) -> bool:
    """A new text model adds its pooled caption to adaLN (ModelConfig.text_pooled); a run resumed from a
    state saved before diffcli had that path keeps the architecture it was started with."""
    if not resumed.tensors:
        return True
    try:
        saved = json.loads(resumed.meta.get("model_config", "{}"))
    except ValueError:
        return True  # check_state_fits names the broken field
    return isinstance(saved, dict) and saved.get("text_pooled") is True


def _prepare_text(cfg: TrainConfig, data: ImageSet, base: ModelConfig, log: Callable[[str], None],
                  pooled: bool = True) -> TextRun | None:
    """Whether the run is text-to-image (--text-encoder auto: when the folder has captions), and its
    vocabulary (builtin) or frozen encoder (a CLIP folder); InputError when one is asked for and no
    image has a caption."""
    from diffcli.models.text import TextSpec, Vocabulary, words

    captions = data.captions
    if cfg.text_encoder == "none" or captions is None:
        return None
    n = sum(c is not None for c in captions)
    if n == 0:
        if cfg.text_encoder == "auto":
            return None
        raise InputError(f"--text-encoder {cfg.text_encoder}: no image in {cfg.data_dir} has a caption (a .txt file "
                         f"with the image's name beside it, or a metadata.jsonl with a {cfg.caption_column!r} column)")
    if cfg.eval_every:
        raise UsageError("--eval-every is not available for text-to-image models yet; sample with --prompts and "
                         "run diffcli eval on the images")
    N = len(captions)
    log(f"captions: {n} of {N} images" + (f" ({N - n} without: they train the null caption)" if n < N else "")
        + f"; a text-to-image model ({'builtin' if cfg.text_encoder == 'auto' else cfg.text_encoder} text encoder)")
    prompts = list(dict.fromkeys(c for c in captions if c is not None))[:PREVIEW_PROMPTS]
    if cfg.text_encoder in ("auto", "builtin"):
        vocab = Vocabulary.build(captions)
        longest = max(len(words(c)) for c in captions if c is not None)
        L = max(1, min(cfg.caption_tokens, longest))  # tokens per caption: the longest caption, at most --caption-tokens
        if longest > cfg.caption_tokens:
            cut = sum(len(words(c)) > L for c in captions if c is not None)
            log(f"warning: {cut} caption(s) have more than --caption-tokens {L} words; the model reads the first {L}")
        tokens = vocab.rows(captions, L)
        log(f"text: {vocab.size - 1:,} words in the vocabulary, {L} tokens per caption")
        mcfg = replace(base, num_classes=0, text_encoder="builtin", context_dim=base.hidden_size, text_length=L,
                       text_vocab=vocab.size, text_depth=cfg.text_depth, text_pooled=pooled).validate()
        return TextRun(mcfg, TextSpec("builtin", vocab), tokens, prompts)
    from diffcli.models.clip import ClipTextEncoder

    enc = ClipTextEncoder.load(cfg.text_encoder)
    tokens = enc.tokenize(captions, warn=log)
    mcfg = replace(base, num_classes=0, text_encoder="clip", context_dim=enc.width, text_length=enc.max_length,
                   text_pooled=pooled).validate()
    spec = TextSpec("clip", None, enc.identity["folder"], enc.identity["sha256"])
    log(f"text: CLIP text encoder {cfg.text_encoder} (frozen), width {enc.width}, {enc.max_length} tokens per caption")
    return TextRun(mcfg, spec, tokens, prompts, enc)


def _load_data(cfg: TrainConfig, run: RunDir, d: Dist, H: int, W: int, log: Callable[[str], None],
               decode_progress: Callable[[int, int], None] | None, channels: str | None = None) -> ImageSet:
    data = load_folder(cfg.data_dir, (H, W), channels or cfg.channels, cfg.crop, cfg.unconditional, cfg.num_workers,
                       decode_progress, cache_path=run.cache if d.main else None, log=log,
                       caption_column=None if cfg.text_encoder == "none" or cfg.unconditional else cfg.caption_column)
    if data.skipped:
        names = ", ".join(Path(f).name for f, _ in data.skipped[:5])
        log(f"warning: skipped {len(data.skipped)} unreadable file(s): {names}{' ...' if len(data.skipped) > 5 else ''}")
    C = data.pixels.shape[1]
    K = len(data.class_names)
    log(f"data: {len(data.files)} images, {C} channel(s), {H}x{W}, "
        + (f"{K} classes ({', '.join(data.class_names[:10])}{', ...' if K > 10 else ''})" if K
           else "no class folders" if data.captions and any(data.captions) else "unconditional"))
    return data


# --------------------------------------------------------------------------------------------------
# The model, its EMA copy and the optimizer; one optimizer step
# --------------------------------------------------------------------------------------------------


@dataclass
class Learner:
    """What one optimizer step works on, and the step itself in two halves: gradients, then apply."""

    cfg: TrainConfig
    d: Dist
    device: torch.device
    model: DiT
    ema: DiT
    opt: torch.optim.Optimizer
    net: torch.nn.Module  # the model as the loss calls it: wrapped for DDP and/or torch.compile
    schedule: NoiseSchedule
    dtype: torch.dtype  # autocast precision; float32 turns autocast off
    scaler: torch.amp.GradScaler | None  # fp16 on CUDA only

    @classmethod
    def build(cls, cfg: TrainConfig, mcfg: ModelConfig, d: Dist, device: torch.device, resumed: Resumed,
              text: TextRun | None = None) -> Learner:
        with torch.random.fork_rng(devices=[]):  # initialisation from the seed, without touching global RNG
            torch.manual_seed(cfg.seed)
            model = DiT(mcfg)
        ema = DiT(mcfg)
        ema.load_state_dict(model.state_dict())
        if text is not None and text.clip is not None:  # frozen, outside the weights: both read captions through it
            model.external_text = ema.external_text = text.clip
        model.to(device)
        ema.to(device).eval().requires_grad_(False)
        use_cuda = device.type == "cuda"
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                                **({"fused": True} if use_cuda else {}))
        if resumed.tensors:
            # e.g. a class added to the folder since, or captions changed
            checkpoint.check_state_fits(resumed.meta, mcfg, resumed.path, text.spec if text else None)
            load_state_tensors(resumed.tensors, model, ema, opt)
        schedule = NoiseSchedule(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end, cfg.zero_terminal_snr)
        dtype = resolve_precision(cfg.precision, device)
        if use_cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        scaler = torch.amp.GradScaler("cuda") if (dtype == torch.float16 and use_cuda) else None
        net: torch.nn.Module = model
        if d.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model, device_ids=[d.local_rank] if use_cuda else None)
        if cfg.compile:
            net = torch.compile(net)
        return cls(cfg, d, device, model, ema, opt, net, schedule, dtype, scaler)

    def gradients(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over --grad-accum micro-batches (DDP averages the gradients across
        ranks at the last one), then clipping. Returns the loss averaged over ranks and the gradient
        norm before clipping."""
        cfg, d = self.cfg, self.d
        loss_sum = torch.zeros((), device=self.device)
        for a, micro in enumerate(batch.split(cfg.grad_accum)):
            sync = not d.active or a == cfg.grad_accum - 1
            no_sync = d.active and not sync and hasattr(self.net, "no_sync")
            ctx = self.net.no_sync() if no_sync else contextlib.nullcontext()
            with ctx, torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                per = diffusion_loss(self.net, self.schedule, cfg, micro.x0, micro.y, micro.t, micro.noise)
                loss = per.mean() / cfg.grad_accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.opt)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return all_mean(loss_sum, d), grad_norm.detach()

    def apply(self, lr: float, ema_decay: float) -> None:
        """The optimizer step at this learning rate, then the EMA update."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        ema_update(self.ema, self.model, ema_decay)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up (Goyal et al. 2017), then constant or cosine decay to 0."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    return cfg.lr


def ema_decay_at(cfg: TrainConfig, step: int) -> float:
    """The usual warm-up of the EMA decay: min(decay, (1 + step) / (10 + step))."""
    return min(cfg.ema_decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: DiT, model: DiT, decay: float) -> None:
    ema_p = list(ema.parameters())
    p = [q.detach() for q in model.parameters()]
    torch._foreach_lerp_(ema_p, p, 1 - decay)  # ema = decay * ema + (1 - decay) * p


# --------------------------------------------------------------------------------------------------
# What a run reports: metrics.jsonl, TensorBoard, the progress line, preview grids
# --------------------------------------------------------------------------------------------------


class Meter:
    """Loss and gradient norm per step, averaged every --metrics-every steps into one metrics.jsonl
    record (and TensorBoard scalars), and the progress (bar, or a line every --log-every seconds in a
    log) after every step."""

    def __init__(self, cfg: TrainConfig, run: RunDir, main: bool, tb: Any,
                 progress: Callable[[int, int, str], None] | None) -> None:
        self.cfg, self.run, self.main, self.tb, self.progress = cfg, run, main, tb, progress
        self.window: list[torch.Tensor] = []
        self.window_gn: list[torch.Tensor] = []
        self.t_window, self.smooth = time.perf_counter(), None
        self.last_loss = float("nan")
        self.ips: float | None = None  # images/s over the last metrics window

    def after_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float,
                   elapsed: Callable[[], float]) -> None:
        cfg = self.cfg
        self.window.append(loss)
        self.window_gn.append(grad_norm)
        if step % cfg.metrics_every == 0 or step == cfg.steps:
            self._record(step, lr, elapsed)
        if self.progress:
            info = "" if self.smooth is None else f"loss {self.smooth:.4f}"
            fields = {} if self.smooth is None else {"loss": round(self.smooth, 6)}
            if self.ips is not None:
                info += f"  {self.ips:.0f} img/s"
                fields["images_per_second"] = round(self.ips, 2)
            self.progress(step, cfg.steps, info, **fields)

    def flush(self, step: int, lr: float, elapsed: Callable[[], float]) -> None:
        """Record the steps since the last metrics record (a run that stops between records)."""
        if self.window:
            self._record(step, lr, elapsed)

    def _record(self, step: int, lr: float, elapsed: Callable[[], float]) -> None:
        B = self.cfg.batch_size
        losses = torch.stack(self.window).float().cpu()
        mean_loss = float(losses.mean())
        self.last_loss = mean_loss
        self.smooth = mean_loss if self.smooth is None else 0.9 * self.smooth + 0.1 * mean_loss
        now = time.perf_counter()
        ips = len(self.window) * B / max(now - self.t_window, 1e-9)
        rec = {"step": step, "loss": mean_loss, "lr": lr, "grad_norm": float(torch.stack(self.window_gn).float().mean()),
               "images_per_second": round(ips, 2), "elapsed": round(elapsed(), 2), "images_seen": step * B}
        if self.main:
            atomic.append_line(self.run.metrics, json.dumps(rec))
            if self.tb is not None:
                for k in ("loss", "lr", "grad_norm", "images_per_second"):
                    self.tb.add_scalar(k, rec[k], step)
        self.window, self.window_gn, self.t_window = [], [], now
        self.ips = ips

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _tensorboard(cfg: TrainConfig, run: RunDir):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install 'diffcli[tensorboard]'") from None
    return SummaryWriter(str(run.root / "tensorboard"))


@torch.no_grad()
def preview(ema: DiT, schedule: NoiseSchedule, cfg: TrainConfig, class_names: list[str], path: Path,
            device: torch.device, steps: int = 25, per_class: int = 4,
            decoder: torch.nn.Module | None = None, text: TextRun | None = None) -> None:
    """A grid from a fixed seed with the EMA weights: one row per class (per_class images each), or
    16 images for an unconditional model; a text model: one row per prompt taken from the captions,
    which are written beside the grid (same name, .txt), a line per row."""
    from diffcli.files.images import make_grid, save_png, to_pil, to_uint8
    from diffcli.diffusion.samplers import sample

    K = len(class_names)
    null: Any = ema.null_class if K else None
    guidance = cfg.guidance if K else 1.0
    if text is not None:
        labels = _prompt_rows(text, ema).repeat_interleave(per_class, dim=0)
        cols, null, guidance = per_class, _null_row(ema), cfg.guidance
        atomic.write_bytes(path.with_suffix(".txt"), "".join(f"{p}\n" for p in text.prompts).encode())
    elif K:
        per = per_class if K <= 16 else 1
        labels = torch.arange(K).repeat_interleave(per)
        cols = per if K <= 16 else math.ceil(math.sqrt(K))
    else:
        labels, cols = None, 4
    n = len(labels) if labels is not None else 16
    cfg_m = ema.config
    res = sample(ema, schedule, (cfg_m.in_channels, cfg_m.image_height, cfg_m.image_width), steps, "ddim",
                 seeds=list(range(n)), labels=labels, null_label=null,
                 guidance=guidance, prediction=cfg.prediction, device=device,
                 clip_x0=1.0 if decoder is None else None)  # latents have no [-1, 1] range
    images = res.images if decoder is None else decoder(res.images.to(device)).clamp(-1, 1).cpu()
    grid = to_pil(make_grid(to_uint8(images), ncols=cols))
    scale = max(1, 64 // min(images.shape[2], images.shape[3]))
    if scale > 1:
        from PIL import Image

        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    save_png(path, grid, overwrite=True)


def _prompt_rows(text: TextRun, model: DiT) -> torch.Tensor:
    """The preview prompts' token rows."""
    if text.clip is not None:
        return text.clip.tokenize(text.prompts)
    return text.spec.vocabulary.rows(text.prompts, model.config.text_length)


def _null_row(model: DiT) -> torch.Tensor:
    from diffcli.models.text import PAD

    return torch.full((1, model.config.text_length), PAD, dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------------


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits 130."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
