"""The Typer app: parse options, call one core function, print. No tensor maths here.

Conventions (documented in the README): results go to stdout, logs and progress to stderr; library
errors are DiffcliError subclasses, turned into one `Error: ...` line and their exit code.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Callable, List, Optional, TypeVar

import typer

from diffcli import __version__
from diffcli.errors import DiffcliError, Interrupted, UsageError

app = typer.Typer(
    name="diffcli",
    help="Train and sample diffusion transformers (DiT) on your own images.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

T = TypeVar("T")


def _err(message: str) -> None:
    print(f"Error: {message}", file=sys.stderr)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_core(fn: Callable[[], T], json_command: str | None = None) -> T:
    """Run a core call; map library exceptions to `Error: ...` and the class's exit code (with --json,
    also an `error` record on stdout). SIGTERM stops it like Ctrl-C (exit 130; an atomic write in
    progress removes its temporary file). A stop that saved its work (Interrupted) is a notice, not
    an error."""
    try:
        old = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread
        old = None

    def fail(message: str, code: int) -> typer.Exit:
        if json_command:
            from diffcli.records import emit

            emit(json_command, "error", message=message, exit_code=code)
        return typer.Exit(code)

    try:
        return fn()
    except Interrupted as e:
        print(e, file=sys.stderr)  # e.g. "interrupted at step 300; checkpoint saved in ... (resume with ...)"
        raise fail(str(e), e.exit_code)
    except DiffcliError as e:
        if os.environ.get("DIFFCLI_DEBUG"):
            raise
        _err(str(e))
        raise fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        _err("interrupted")
        raise fail("interrupted", 130)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def version_callback(value: bool) -> None:
    if value:
        print(f"diffcli {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=version_callback, is_eager=True
    ),
) -> None:
    """Train and sample diffusion transformers (DiT) on your own images.

    Results go to stdout, logs and progress to stderr. Exit codes: 0 ok, 1 runtime failure,
    2 usage error, 3 output exists, 4 bad or missing input, 130 interrupted.
    Set DIFFCLI_DEBUG=1 to see tracebacks.
    """


# --------------------------------------------------------------------------------------------------
# inspect-schedule
# --------------------------------------------------------------------------------------------------


@app.command("inspect-schedule")
def inspect_schedule(
    schedule: Optional[str] = typer.Option(
        None, help="linear, scaled_linear, cosine or sigmoid.", show_default="cosine, as train"
    ),
    timesteps: Optional[int] = typer.Option(None, help="Number of diffusion timesteps T.", show_default="1000"),
    beta_start: Optional[float] = typer.Option(None, help="First beta (linear, scaled_linear, sigmoid).", show_default="1e-4"),
    beta_end: Optional[float] = typer.Option(None, help="Last beta (linear, scaled_linear, sigmoid).", show_default="0.02"),
    zero_terminal_snr: bool = typer.Option(False, "--zero-terminal-snr", help="Rescale so that alpha_bar at t=T-1 is exactly 0."),
    checkpoint: Optional[Path] = typer.Option(None, help="Read the schedule stored in this model file."),
    compare: Optional[str] = typer.Option(None, help="Schedules side by side, e.g. linear,cosine."),
    steps: Optional[int] = typer.Option(None, help="Show the N timesteps a sampler with N steps visits."),
    spacing: Optional[str] = typer.Option(
        None, help="Spacing of those steps (ddim, ddpm, --sigmas none): leading, trailing or linspace.", show_default="trailing"
    ),
    sampler: Optional[str] = typer.Option(
        None, "--sampler", help="With --steps: the steps of this sampler (ddim, ddpm, euler, euler_a, heun, dpm++2m).",
        show_default="dpm++2m, as sample",
    ),
    sigmas: Optional[str] = typer.Option(None, "--sigmas", help="With an ODE --sampler: auto, edm, karras, tuned or none, as for sample.", show_default="auto"),
    rows: Optional[int] = typer.Option(
        None, help="Show this many evenly spaced timesteps, t=0 and t=T-1 included.", show_default="11; every row with --json/--csv"
    ),
    json_out: bool = typer.Option(False, "--json", help="JSON Lines (sampling, schedule and row records) with every value at full precision."),
    csv_out: bool = typer.Option(False, "--csv", help="Print CSV with every value at full precision."),
    plot: Optional[Path] = typer.Option(None, help="Also draw alpha_bar and log-SNR against t into this PNG (its folder must exist)."),
    width: int = typer.Option(900, help="Width of the plot in pixels."),
    height: int = typer.Option(600, help="Height of the plot in pixels."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the --plot file if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No messages on stderr."),
) -> None:
    """Show a noise schedule: beta, alpha_bar, SNR and sigma at chosen timesteps, as a table, JSON or CSV."""
    from diffcli import inspect as core  # imports torch; keep `diffcli --help` fast

    def build() -> "core.Inspection":
        if json_out and csv_out:
            raise UsageError("give either --json or --csv, not both")
        schedules = core.load_schedules(
            schedule, compare, timesteps, beta_start, beta_end, zero_terminal_snr, checkpoint
        )
        return core.choose_rows(schedules, rows, steps, spacing, json_out or csv_out, sampler, sigmas,
                                core.load_tuned(checkpoint))

    json_command = "inspect-schedule" if json_out else None
    inspection = run_core(build, json_command)
    if plot is not None:
        run_core(lambda: core.plot_schedules(inspection, plot, width, height, overwrite), json_command)
        if not quiet:
            print(f"wrote {plot} ({width}x{height})", file=sys.stderr)
    if json_out:
        sys.stdout.write("".join(text + "\n" for text in core.to_json_lines(inspection)))
    elif csv_out:
        sys.stdout.write(core.to_csv(inspection))
    else:
        from diffcli.progress import console

        print(core.heading(inspection))
        for table in core.tables(inspection):
            console().print(table)
        for s in inspection.schedules:
            print(core.summary(s))
        for text in core.tuned_lines(inspection):
            print(text)


# --------------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------------


@app.command()
def info(
    model: Path = typer.Argument(..., metavar="MODEL", help="A model file or training checkpoint (.safetensors)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on one line."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No messages on stderr."),
) -> None:
    """Show what a model file or training checkpoint holds, read from its header (no weights are loaded)."""
    from diffcli import info as core

    described = run_core(lambda: core.describe(model), "info" if json_out else None)
    if json_out:
        from diffcli.records import line

        print(line("info", **described.to_dict()))
    else:
        from diffcli.progress import console

        out = console()
        with out.capture() as captured:
            out.print(core.table(described))
        print("\n".join(text.rstrip() for text in captured.get().splitlines()))  # no padding to the width


# --------------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------------


@app.command("eval")
def eval_(
    samples: Path = typer.Argument(..., metavar="SAMPLES", help="A folder of images, or a model file (.safetensors) to sample first."),
    real: Path = typer.Option(..., "--real", help="The folder of real images; class subfolders give class accuracy."),
    features: Optional[str] = typer.Option(None, "--features", help="auto (a classifier diffcli trains on REAL) or inception (FID Inception-v3).", show_default="inception when a weights file is set, else auto"),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth or a .safetensors of it (or $DIFFCLI_INCEPTION_WEIGHTS)."),
    num_images: Optional[int] = typer.Option(None, "--num-images", "-n", help="SAMPLES a model file: images to draw with its defaults.", show_default="1000"),
    seed: int = typer.Option(0, "--seed", help="SAMPLES a model file: base seed (image i gets seed+i)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="SAMPLES a model file: images per forward batch."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Folder of cached real-side features and classifiers.", show_default="$XDG_CACHE_HOME/diffcli/eval or ~/.cache/diffcli/eval"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch.", show_default="the CPUs this process may use"),
    log_every: float = typer.Option(30.0, "--log-every", help="Seconds between progress lines when stderr is not a terminal."),
    json_out: bool = typer.Option(False, "--json", help="Print one `result` record (JSON Lines) instead of the table."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only results."),
) -> None:
    """Measure a model's samples against real images: FID, KID, precision/recall and class accuracy."""
    from diffcli.progress import Progress

    def job():
        from diffcli.eval.evaluate import EvalOptions, evaluate

        if threads is not None:
            if threads < 1:
                raise UsageError(f"--threads must be >= 1, got {threads}")
            import torch

            torch.set_num_threads(threads)
        if batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
        opts = EvalOptions(samples=str(samples), real=str(real), features=features,
                           inception_weights=str(inception_weights) if inception_weights else None,
                           num_images=num_images, seed=seed, batch_size=batch_size,
                           cache=str(cache) if cache else None, device=device)
        with Progress("evaluating", quiet=quiet, log_every=log_every, json_command="eval" if json_out else None) as bar:
            return evaluate(opts, log=bar.log, progress=lambda i, n, task: bar.update(i, n, task=task))

    result = run_core(job, "eval" if json_out else None)
    if json_out:
        from diffcli.records import emit

        emit("eval", "result", **result.to_dict())
    else:
        from diffcli.eval.report import tables
        from diffcli.progress import console

        out = console()
        for table in tables(result):
            out.print(table)


# --------------------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------------------


@app.command()
def sample(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Model file (.safetensors). Default: the model shipped in weights/."),
    steps: Optional[int] = typer.Option(None, "--steps", "-s", help="Sampling steps.", show_default="15"),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="dpm++2m, heun, euler, euler_a, ddim or ddpm.", show_default="dpm++2m"),
    eta: Optional[float] = typer.Option(None, "--eta", help="DDIM eta: 0 deterministic, 1 DDPM-like.", show_default="0"),
    spacing: Optional[str] = typer.Option(None, "--spacing", help="Timesteps of ddim/ddpm and of --sigmas none: trailing, leading or linspace.", show_default="trailing"),
    sigmas: Optional[str] = typer.Option(None, "--sigmas", help="Step sizes for the ODE samplers: edm (Karras rho 7 from sigma 80), karras (over the model's whole sigma range), tuned (stored by diffcli tune for this sampler and step count), none (the --spacing timesteps); auto: tuned when the model has them, else edm.", show_default="auto"),
    guidance_interval: Optional[str] = typer.Option(None, "--guidance-interval", help="Guide only at noise levels LO < sigma <= HI (e.g. 0.3,5), a plain conditional step elsewhere; auto: the interval diffcli tune stored with the tuned sigmas in use; none: every step.", show_default="auto"),
    num_images: Optional[int] = typer.Option(None, "--num-images", "-n", help="Images to make. Default: one per class (16 for an unconditional model); a text model: per prompt, 4 for --prompt, 1 per line of --prompts."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Images per forward batch."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Base seed; image i gets seed+i. Random (and printed) when omitted."),
    classes: List[str] = typer.Option([], "--class", help="Class index or name; repeatable; 'all' cycles through the classes."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="A text-to-image model: what to draw (\"\" samples without a caption)."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="A text-to-image model: a file of prompts, one a line; -n images each."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="A text-to-image model: guide away from this (it replaces the null caption in classifier-free guidance)."),
    text_encoder: Optional[Path] = typer.Option(None, "--text-encoder", help="A model trained with a CLIP text encoder: that encoder's folder."),
    guidance: Optional[float] = typer.Option(None, "--guidance", "-g", help="Classifier-free guidance scale (1 = off). Default: the model file's."),
    out: Path = typer.Option(Path("samples"), "--out", "-o", help="Output folder: it receives the images and nothing else."),
    name: Optional[str] = typer.Option(None, "--name", help="File name template; fields {seed} {index} {class} {steps} {sampler}, {prompt} and {prompt_index} for a text model, and {stem} (the input's name) with --init-image.", show_default="{seed}-{index:04d}.png; {stem}-{seed}.png with --init-image"),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Also write a grid PNG of all images here. Interactive runs without -n get one beside --out (OUT-grid-SEED.png)."),
    no_grid: bool = typer.Option(False, "--no-grid", help="No grid, not even the interactive one."),
    from_png: Optional[Path] = typer.Option(None, "--from-png", help="Render again the image a diffcli PNG records (seed, class, sampler, steps, ...); options given beside it override."),
    force: bool = typer.Option(False, "--force", help="With --from-png: use this model even if its hash differs from the recorded one."),
    init_image: Optional[Path] = typer.Option(None, "--init-image", help="Edit this image (or each image in this folder) instead of starting from noise: image-to-image, or inpainting with --mask."),
    strength: Optional[float] = typer.Option(None, "--strength", help="With --init-image: the part of the schedule that is run, in (0, 1]; 1 starts from noise.", show_default="0.6; 1 with --mask"),
    mask: Optional[Path] = typer.Option(None, "--mask", help="With --init-image: a grayscale image (or a folder, matched by name) whose white part is redrawn; the rest is kept exactly."),
    resample: Optional[int] = typer.Option(None, "--resample", help="With --mask: take each step R times, going back up in between (RePaint's harmonisation).", show_default="1"),
    mask_blur: Optional[float] = typer.Option(None, "--mask-blur", help="With --mask: soft edges, fading in over about PX pixels inside the mask.", show_default="0"),
    decoder: Optional[Path] = typer.Option(None, "--decoder", help="A latent model: decode with this autoencoder file's decoder instead of the one the model file embeds."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing files."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Keep existing files and make only the missing ones."),
    no_metadata: bool = typer.Option(False, "--no-metadata", help="Do not embed generation parameters in the PNGs."),
    clip: Optional[bool] = typer.Option(None, "--clip/--no-clip", help="Clip the predicted x0 to [-1, 1].", show_default="clip"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch.", show_default="the CPUs this process may use"),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto (fp32 on CPU, bf16 on GPU), fp32, bf16 or fp16.", show_default="auto"),
    log_every: float = typer.Option(30.0, "--log-every", help="Seconds between progress lines when stderr is not a terminal."),
    json_out: bool = typer.Option(False, "--json", help="JSON Lines on stdout: image, grid and summary records (see README)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only results."),
) -> None:
    """Turn noise into PNGs with a trained model."""
    from diffcli.sampling import generate
    from diffcli.progress import Progress
    from diffcli.records import line

    chosen = {
        "steps": steps, "sampler": sampler, "eta": eta, "spacing": spacing, "sigmas": sigmas, "num_images": num_images,
        "seed": seed, "classes": list(classes) or None, "guidance": guidance, "clip_x0": clip, "precision": precision,
        "guidance_interval": guidance_interval,
        "init_image": str(init_image) if init_image is not None else None, "strength": strength,
        "mask": str(mask) if mask is not None else None, "resample": resample, "mask_blur": mask_blur,
        "prompt": prompt, "prompts_file": str(prompts_file) if prompts_file is not None else None,
        "negative_prompt": negative_prompt,
    }
    given = {k for k, v in chosen.items() if v is not None}
    opts = generate.SampleOptions(
        checkpoint=str(checkpoint) if checkpoint else None, batch_size=batch_size, out=str(out), name=name,
        grid=str(grid) if grid else None, overwrite=overwrite, skip_existing=skip_existing,
        metadata=not no_metadata, device=device, threads=threads, force=force,
        decoder=str(decoder) if decoder else None, text_encoder=str(text_encoder) if text_encoder else None,
        grid_beside_out=grid is None and not no_grid and num_images is None and from_png is None and sys.stderr.isatty(),
        **{k: chosen[k] for k in given},
    )

    def job() -> None:
        if from_png is not None:
            generate.apply_recorded(opts, generate.recorded_parameters(from_png), given, str(from_png))
        elif force:
            raise UsageError("--force only applies to --from-png")
        with Progress("sampling", quiet=quiet, log_every=log_every, json_command="sample" if json_out else None) as bar:
            for rec in generate.run(opts, progress=bar.update, log=bar.log):
                kind = rec.pop("kind")
                if json_out:
                    print(line("sample", kind, **rec), flush=True)
                elif kind == "grid":
                    print(rec["path"], flush=True)
                elif kind == "image" and not rec["skipped"]:
                    print(rec["path"], flush=True)

    run_core(job, json_command="sample" if json_out else None)


# --------------------------------------------------------------------------------------------------
# tune
# --------------------------------------------------------------------------------------------------


@app.command()
def tune(
    model: Path = typer.Argument(..., metavar="MODEL", help="The model file (.safetensors) to tune."),
    steps: int = typer.Option(..., "--steps", "-s", help="The step count to tune the sigmas for."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="A deterministic ODE sampler: dpm++2m, heun or euler.", show_default="dpm++2m, as sample"),
    guidance: Optional[float] = typer.Option(None, "--guidance", "-g", help="Guidance scale to tune at.", show_default="the model file's"),
    classes: List[str] = typer.Option([], "--class", help="Classes to tune on (index or name; repeatable); they cycle over the seeds.", show_default="all"),
    seeds: int = typer.Option(32, "--seeds", help="Training seeds (0..K-1): the search minimises their distance to the reference."),
    validation_seeds: int = typer.Option(32, "--validation-seeds", help="Separate seeds the result is judged on."),
    reference: str = typer.Option("dpm++2m:100", "--reference", help="SAMPLER:STEPS of the reference solve, e.g. ddim:1000."),
    reference_cache: Optional[Path] = typer.Option(None, "--reference-cache", help="A .safetensors file that keeps the reference solves: the next tune of the same model, seeds and reference reads them instead (a many-step reference is most of a tune's time)."),
    max_evaluations: int = typer.Option(200, "--max-evaluations", help="N-step solves of the training seeds the search may spend."),
    start: Optional[str] = typer.Option(None, "--start", help="Where the search starts: edm, karras, none, or tuned (continue from the file's entry for this sampler and step count).", show_default="the best fixed family on the training seeds"),
    guidance_interval: bool = typer.Option(False, "--guidance-interval", help="Also find where guidance is needed, judged by the distance to the reference (or, with --real, by class accuracy); stored with the sigmas."),
    distance_tolerance: float = typer.Option(2.0, "--distance-tolerance", help="With --guidance-interval and no --real: percent the interval may add to the distance with guidance at every step."),
    real: Optional[Path] = typer.Option(None, "--real", help="With --guidance-interval: judge by class accuracy instead, by the classifier diffcli eval trains on this class folder."),
    interval_images: int = typer.Option(200, "--interval-images", help="With --guidance-interval --real: images per accuracy check."),
    accuracy_tolerance: float = typer.Option(1.0, "--accuracy-tolerance", help="With --guidance-interval --real: percentage points of class accuracy the interval may cost."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the tuned model file here (a copy with the result in its metadata)."),
    in_place: bool = typer.Option(False, "--in-place", help="Store the result in MODEL itself (atomically)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per forward batch."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Folder of diffcli eval's cached classifiers.", show_default="as diffcli eval"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch.", show_default="the CPUs this process may use"),
    log_every: float = typer.Option(30.0, "--log-every", help="Seconds between progress lines when stderr is not a terminal."),
    json_out: bool = typer.Option(False, "--json", help="Print one `result` record (JSON Lines) instead of the table."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only results."),
) -> None:
    """Find the step sigmas (and a guidance interval) that suit MODEL at --steps; store them when they help."""
    from diffcli.progress import Progress

    def job():
        from diffcli.diffusion.tune import TuneOptions, tune as run_tune

        if threads is not None:
            if threads < 1:
                raise UsageError(f"--threads must be >= 1, got {threads}")
            import torch

            torch.set_num_threads(threads)
        opts = TuneOptions(model=str(model), steps=steps, sampler=sampler, guidance=guidance, classes=list(classes),
                           seeds=seeds, validation_seeds=validation_seeds, reference=reference,
                           max_evaluations=max_evaluations, start=start,
                           reference_cache=str(reference_cache) if reference_cache else None, guidance_interval=guidance_interval,
                           real=str(real) if real else None, interval_images=interval_images,
                           accuracy_tolerance=accuracy_tolerance, distance_tolerance=distance_tolerance, out=str(out) if out else None, in_place=in_place,
                           overwrite=overwrite, batch_size=batch_size, device=device,
                           cache=str(cache) if cache else None)
        with Progress("tuning", quiet=quiet, log_every=log_every, json_command="tune" if json_out else None) as bar:
            result = run_tune(opts, log=bar.log, progress=lambda i, n, task: bar.update(i, n, task=task))
            if result.stored and result.stored_before:
                bar.log(f"the stored sigmas stay (the search's {result.distance['tuned']:.4f} is no closer than their "
                        f"{result.distance['stored']:.4f}); their guidance interval is stored in {result.stored}")
            elif result.stored_before:
                bar.log(f"the tuned sigmas ({result.distance['tuned']:.4f}) are no closer than the ones {model} holds "
                        f"({result.distance['stored']:.4f}) on the validation seeds: nothing stored")
            elif not result.better:
                bar.log(f"the tuned sigmas ({result.distance['tuned']:.4f}) do not beat {result.best_fixed} "
                        f"({result.distance[result.best_fixed]:.4f}) on the validation seeds: nothing stored")
            elif result.stored:
                bar.log(f"stored in {result.stored}: `diffcli sample -c {result.stored} --steps {result.steps}"
                        f"{'' if result.sampler == 'dpm++2m' else ' --sampler ' + result.sampler}` uses them")
            else:
                bar.log("nothing stored: give --out FILE or --in-place to keep them")
            return result

    result = run_core(job, "tune" if json_out else None)
    if json_out:
        from diffcli.records import emit

        emit("tune", "result", **result.to_dict())
    else:
        from diffcli.diffusion.tune import table
        from diffcli.progress import console

        console().print(table(result))


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------


@app.command()
def train(
    data_dir: Path = typer.Argument(..., help="Folder of images; class subfolders give a class-conditional model."),
    out: Path = typer.Option(Path("runs/default"), "--out", "-o", help="Run folder (config, metrics, previews, checkpoints, model file)."),
    preset: str = typer.Option("default", "--preset", help="Training recipe: default (the shipped model's) or quick (small folders on a CPU: README, Training on a CPU). Options given replace its values."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Architecture: DiT-{T,XS,M,S,B,L,XL}/{2,4,8}.", show_default="DiT-M/4; quick: DiT-XS/4"),
    long_skip: bool = typer.Option(True, "--long-skip/--no-long-skip", help="U-ViT long skip connections between shallow and deep blocks."),
    learn_sigma: bool = typer.Option(False, "--learn-sigma", help="Learn the variance too (Improved DDPM hybrid loss)."),
    resolution: str = typer.Option("32", "--resolution", "-r", help="Training size: 32 or HxW such as 32x48."),
    channels: str = typer.Option("auto", "--channels", help="auto (1 if every image is grayscale), 1 or 3."),
    crop: str = typer.Option("center", "--crop", help="center or random."),
    flip: bool = typer.Option(False, "--flip", help="Random horizontal flips."),
    unconditional: bool = typer.Option(False, "--unconditional", help="Ignore class subfolders."),
    steps: int = typer.Option(10000, "--steps", help="Optimizer steps in total (a resumed run continues to this)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Global batch size (split across processes).", show_default="256; quick: 64"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (AdamW).", show_default="0.001; quick: 0.002"),
    lr_schedule: str = typer.Option("constant", "--lr-schedule", help="After warm-up: constant or cosine."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear learning-rate warm-up.", show_default="500, or a tenth of a shorter run; quick: 200"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Gradient clipping (0 disables)."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per step."),
    ema_decay: Optional[float] = typer.Option(None, "--ema-decay", show_default="0.9995; quick: 0.999"),
    schedule: str = typer.Option("cosine", "--schedule", help="linear, scaled_linear, cosine or sigmoid."),
    timesteps: int = typer.Option(1000, "--timesteps"),
    beta_start: float = typer.Option(1e-4, "--beta-start"),
    beta_end: float = typer.Option(0.02, "--beta-end"),
    zero_terminal_snr: bool = typer.Option(False, "--zero-terminal-snr"),
    prediction: str = typer.Option("v", "--prediction", help="epsilon or v."),
    class_dropout: float = typer.Option(0.1, "--class-dropout", help="Label dropout for classifier-free guidance."),
    min_snr_gamma: float = typer.Option(5.0, "--min-snr-gamma", help="Min-SNR loss weighting gamma (0 disables)."),
    timestep_sampling: str = typer.Option("uniform", "--timestep-sampling", help="uniform or logit-normal."),
    guidance: float = typer.Option(1.5, "--guidance", help="Default CFG scale stored in the model file (previews use it)."),
    precision: str = typer.Option("auto", "--precision", help="auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    num_workers: int = typer.Option(0, "--num-workers", help="Image decoding threads (0: automatic)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", show_default="1000; quick: 500"),
    keep_last: int = typer.Option(3, "--keep-last", help="Checkpoints to keep."),
    sample_every: Optional[int] = typer.Option(None, "--sample-every", help="Preview grid every N steps and at the end (0: never).", show_default="1000; quick: 500"),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Stop after this many minutes of training (a resumed run counts its earlier minutes), with a checkpoint and the model file, even before --steps."),
    autoencoder: Optional[Path] = typer.Option(None, "--autoencoder", help="Train a latent model: encode every image once with this autoencoder file (train-autoencoder or convert-autoencoder) and denoise its latents."),
    text_encoder: str = typer.Option("auto", "--text-encoder", help="Captions (a .txt beside each image, or metadata.jsonl) make a text-to-image model: auto (builtin when the folder has captions), builtin (trained with the model, stored in its file), a CLIP text encoder folder (frozen; needs diffcli[clip]), or none (ignore captions)."),
    caption_column: str = typer.Option("text", "--caption-column", help="The metadata.jsonl column that holds the captions."),
    caption_dropout: float = typer.Option(0.1, "--caption-dropout", help="Captions replaced by the null caption, for classifier-free guidance."),
    caption_tokens: int = typer.Option(32, "--caption-tokens", help="Builtin text encoder: words read per caption (the longest caption's, at most this)."),
    text_depth: int = typer.Option(2, "--text-depth", help="Builtin text encoder: transformer layers."),
    metrics_every: int = typer.Option(50, "--metrics-every", help="Steps per metrics.jsonl record."),
    log_every: float = typer.Option(30.0, "--log-every", help="Seconds between progress lines when stderr is not a terminal."),
    resume: str = typer.Option("auto", "--resume", help="auto (newest checkpoint in --out), never, or a checkpoint path."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also write TensorBoard events (needs tensorboard)."),
    save_dtype: str = typer.Option("fp32", "--save-dtype", help="Weights in model.safetensors: fp32, or fp16 (half the size)."),
    eval_every: int = typer.Option(0, "--eval-every", help="Every K steps, FID/KID/accuracy of EMA samples against --eval-real (0: never)."),
    eval_real: Optional[Path] = typer.Option(None, "--eval-real", help="Folder of real images for --eval-every."),
    eval_images: int = typer.Option(1000, "--eval-images", help="Samples per --eval-every evaluation."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch."),
    json_out: bool = typer.Option(False, "--json", help="JSON Lines: a summary record on stdout, progress records on stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only results."),
) -> None:
    """Train a diffusion transformer on a folder of images."""
    from diffcli.progress import Progress
    from diffcli.training import TrainConfig, train as train_core

    def job() -> None:
        cfg = TrainConfig.from_options(
            preset, data_dir=str(data_dir), out=str(out), model=model, long_skip=long_skip, learn_sigma=learn_sigma,
            resolution=resolution, channels=channels, crop=crop, flip=flip, unconditional=unconditional, steps=steps,
            batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
            weight_decay=weight_decay, max_grad_norm=max_grad_norm, grad_accum=grad_accum, ema_decay=ema_decay,
            schedule=schedule, timesteps=timesteps, beta_start=beta_start, beta_end=beta_end,
            zero_terminal_snr=zero_terminal_snr, prediction=prediction, class_dropout=class_dropout,
            min_snr_gamma=min_snr_gamma, timestep_sampling=timestep_sampling, guidance=guidance,
            precision=precision, compile=compile_, seed=seed, device=device, num_workers=num_workers,
            checkpoint_every=checkpoint_every, keep_last=keep_last, sample_every=sample_every, metrics_every=metrics_every,
            resume=resume, tensorboard=tensorboard, save_dtype=save_dtype,
            eval_every=eval_every, eval_real=str(eval_real) if eval_real else None, eval_images=eval_images,
            time_limit=time_limit, autoencoder=str(autoencoder) if autoencoder else None,
            text_encoder=text_encoder, caption_column=caption_column, caption_dropout=caption_dropout,
            caption_tokens=caption_tokens, text_depth=text_depth,
        )
        _set_threads(threads)
        with Progress("training", quiet=quiet, log_every=log_every, json_command="train" if json_out else None) as bar:
            result = train_core(cfg, log=bar.log, progress=bar.update,
                                decode_progress=lambda i, n: bar.update(i, n, task="decoding images"))
        if os.environ.get("RANK", "0") != "0":
            return
        if json_out:
            from diffcli.records import emit

            emit("train", "summary", **result.to_dict())
        else:
            print(f"model: {result.model_path}\nrun: {result.run_dir}\nsteps: {result.steps}  "
                  f"loss: {result.final_loss:.4f}  {result.images_per_second:.0f} img/s  {result.seconds:.0f} s")
            if result.best_fid is not None:
                print(f"best FID: {result.best_fid:.4f} at step {result.best_fid_step}")

    run_core(job, "train" if json_out else None)


@app.command("train-autoencoder")
def train_autoencoder(
    data_dir: Path = typer.Argument(..., help="Folder of images (class subfolders are read and their classes ignored)."),
    out: Path = typer.Option(Path("runs/autoencoder"), "--out", "-o", help="Run folder (config, metrics, previews, checkpoints, model file)."),
    preset: str = typer.Option("f4", "--preset", help="Architecture: f4 (sides / 4) or f8 (sides / 8)."),
    latent_channels: int = typer.Option(4, "--latent-channels", help="Channels of the latent."),
    resolution: str = typer.Option("32", "--resolution", "-r", help="Training size: 32 or HxW, a multiple of the factor."),
    channels: str = typer.Option("auto", "--channels", help="auto (1 if every image is grayscale), 1 or 3."),
    flip: bool = typer.Option(False, "--flip", help="Random horizontal flips."),
    steps: int = typer.Option(20000, "--steps", help="Optimizer steps in total (a resumed run continues to this)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b"),
    lr: float = typer.Option(2e-4, "--lr", help="Peak learning rate (AdamW, betas 0.5, 0.9)."),
    warmup_steps: int = typer.Option(200, "--warmup-steps"),
    loss: str = typer.Option("l1", "--loss", help="Reconstruction loss: l1 or l2."),
    kl_weight: float = typer.Option(1e-6, "--kl-weight", help="Weight of the KL term (per latent element vs per pixel value)."),
    disc_start: int = typer.Option(0, "--disc-start", help="Step the patch discriminator (hinge loss) switches on (0: never)."),
    disc_weight: float = typer.Option(0.1, "--disc-weight", help="Weight of the adversarial term."),
    ema_decay: float = typer.Option(0.999, "--ema-decay"),
    holdout: int = typer.Option(256, "--holdout", help="Images held out of training to measure PSNR (at most a fifth of the folder)."),
    checkpoint_every: int = typer.Option(1000, "--checkpoint-every", help="Steps between checkpoints (each measures held-out PSNR)."),
    keep_last: int = typer.Option(3, "--keep-last", help="Checkpoints to keep."),
    sample_every: int = typer.Option(1000, "--sample-every", help="Preview (originals above reconstructions) every N steps and at the end (0: never)."),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Stop after this many minutes of training, with a checkpoint and the model file."),
    metrics_every: int = typer.Option(50, "--metrics-every", help="Steps per metrics.jsonl loss record."),
    log_every: float = typer.Option(30.0, "--log-every", help="Seconds between progress lines when stderr is not a terminal."),
    resume: str = typer.Option("auto", "--resume", help="auto (newest checkpoint in --out), never, or a checkpoint path."),
    save_dtype: str = typer.Option("fp32", "--save-dtype", help="Weights in model.safetensors: fp32 or fp16."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch."),
    json_out: bool = typer.Option(False, "--json", help="JSON Lines: a summary record on stdout, progress records on stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only results."),
) -> None:
    """Train a KL autoencoder (for latent models) on a folder of images."""
    from diffcli.progress import Progress
    from diffcli.training.autoencoder import AETrainConfig, train_autoencoder as core

    def job() -> None:
        cfg = AETrainConfig(
            data_dir=str(data_dir), out=str(out), preset=preset, latent_channels=latent_channels, resolution=resolution,
            channels=channels, flip=flip, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, loss=loss,
            kl_weight=kl_weight, disc_start=disc_start, disc_weight=disc_weight, ema_decay=ema_decay, holdout=holdout,
            checkpoint_every=checkpoint_every, keep_last=keep_last, sample_every=sample_every, time_limit=time_limit,
            metrics_every=metrics_every, resume=resume, save_dtype=save_dtype, seed=seed, device=device,
        )
        _set_threads(threads)
        with Progress("training", quiet=quiet, log_every=log_every,
                      json_command="train-autoencoder" if json_out else None) as bar:
            result = core(cfg, log=bar.log, progress=bar.update,
                          decode_progress=lambda i, n: bar.update(i, n, task="decoding images"))
        if json_out:
            from diffcli.records import emit

            emit("train-autoencoder", "summary", **result.to_dict())
        else:
            print(f"autoencoder: {result.model_path}\nrun: {result.run_dir}\nsteps: {result.steps}  "
                  f"loss: {result.final_loss:.4f}  held-out PSNR: {result.psnr:.2f} dB  "
                  f"{result.images_per_second:.0f} img/s  {result.seconds:.0f} s")

    run_core(job, "train-autoencoder" if json_out else None)


@app.command()
def reconstruct(
    autoencoder: Path = typer.Argument(..., help="Autoencoder file (train-autoencoder or convert-autoencoder)."),
    folder: Path = typer.Argument(..., help="Folder of images (class subfolders allowed)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the reconstructions: the same relative names, as .png."),
    resolution: Optional[str] = typer.Option(None, "--resolution", "-r", help="Resize and centre-crop to this size (32 or HxW), as training does. Default: each image's own size, cropped to a multiple of the factor."),
    batch_size: int = typer.Option(16, "--batch-size", "-b"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing files."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch."),
    log_every: float = typer.Option(30.0, "--log-every", help="Seconds between progress lines when stderr is not a terminal."),
    json_out: bool = typer.Option(False, "--json", help="JSON Lines: one image record per image, then a summary record."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only results."),
) -> None:
    """Encode and decode every image of a folder: how faithful an autoencoder is (PSNR, SSIM)."""
    from diffcli.progress import Progress
    from diffcli.reconstruct import reconstruct as core

    def job() -> None:
        _set_threads(threads)
        from diffcli.records import emit

        with Progress("reconstructing", quiet=quiet, log_every=log_every,
                      json_command="reconstruct" if json_out else None) as bar:
            for rec in core(autoencoder, folder, out, resolution=resolution, overwrite=overwrite,
                            batch_size=batch_size, device=device, progress=bar.update):
                kind = rec.pop("kind")
                if json_out:
                    emit("reconstruct", kind, **rec)
                elif kind == "summary":
                    print(f"{rec['images']} images -> {out}\n"
                          f"PSNR  mean {rec['psnr_mean']:.2f} dB  worst {rec['psnr_worst']:.2f} dB ({rec['worst_psnr_file']})\n"
                          f"SSIM  mean {rec['ssim_mean']:.4f}     worst {rec['ssim_worst']:.4f} ({rec['worst_ssim_file']})\n"
                          f"autoencoder {rec['autoencoder']} ({rec['autoencoder_hash']}), factor {rec['factor']}, "
                          f"{rec['seconds']:.1f} s")

    run_core(job, "reconstruct" if json_out else None)


@app.command("convert-autoencoder")
def convert_autoencoder(
    src: Path = typer.Argument(..., help="A diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors, or a pipeline folder with vae/), or a latent-diffusion .safetensors file (a VAE file or a whole SD checkpoint)."),
    out: Path = typer.Argument(..., help="The diffcli autoencoder file to write (.safetensors)."),
    scaling_factor: Optional[float] = typer.Option(None, "--scaling-factor", help="Latent scale (0.18215 for SD 1.x/2.x, 0.13025 for SDXL). Default: the diffusers config's; none for a single file (a latent run then measures it)."),
    norm_groups: Optional[int] = typer.Option(None, "--norm-groups", help="GroupNorm groups of a single file's blocks (not in its tensors).", show_default="32"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print one `result` record (JSON Lines)."),
) -> None:
    """Import an existing VAE (diffusers or latent-diffusion layout) as a diffcli autoencoder file."""
    from diffcli.files.convert import convert_autoencoder as core

    result = run_core(lambda: core(src, out, scaling_factor=scaling_factor, overwrite=overwrite,
                                   norm_num_groups=norm_groups), "convert-autoencoder" if json_out else None)
    if json_out:
        from diffcli.records import emit

        emit("convert-autoencoder", "result", **result)
    else:
        c = result["config"]
        scale = result["scaling_factor"]
        print(f"{result['out']} ({result['sha256'][:10]}): {result['layout']} layout, {result['tensors']} tensors, "
              f"{result['parameters'] / 1e6:.2f} M parameters\n"
              f"factor {result['factor']}, {c['latent_channels']} latent channels, widths {c['block_out_channels']}, "
              f"scaling factor {scale if scale is not None else 'none (measured by a latent run)'}"
              + (f"\nignored {result['ignored_tensors']} tensors that are not the autoencoder's" if result["ignored_tensors"] else ""))


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def share_the_machine() -> None:
    """Set before torch loads, unless the user set them: OpenMP threads that wait for work sleep
    instead of spinning (on a loaded 2-core machine a 50-step sample took 54 s spinning, 14 s
    passive), and no more threads than the CPUs this process may use, divided among the processes
    torchrun starts on this machine."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "OMP_NUM_THREADS" not in os.environ:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        threads = max(1, usable_cpus() // local)
        if threads < (os.cpu_count() or threads) or local > 1:  # else torch's own default fits already
            os.environ["OMP_NUM_THREADS"] = str(threads)


def main() -> None:
    """The `diffcli` entry point. Typer/click's own errors (a wrong type, an unknown option, a missing
    argument) become one `Error: ...` line and exit 2 like ours, instead of a boxed usage message."""
    share_the_machine()
    try:  # typer >= 0.20 vendors click; older versions use click itself
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors
    no_args_help = getattr(click_errors, "NoArgsIsHelpError", ())  # click >= 8.2

    try:
        code = app(prog_name="diffcli", standalone_mode=False)  # a typer.Exit comes back as its code
    except no_args_help as e:
        help_text = e.format_message()  # empty when rich has printed the help already
        if help_text.strip():
            print(help_text)
        code = e.exit_code
    except click_errors.UsageError as e:
        ctx = getattr(e, "ctx", None)
        if ctx is not None:
            command = ctx.command_path
        else:  # some parser errors carry no context: name the subcommand from argv
            command = " ".join(["diffcli", *[a for a in sys.argv[1:2] if not a.startswith("-")]])
        _err(" ".join(e.format_message().split()) + f" (see '{command} --help')")
        code = 2
    except click_errors.ClickException as e:
        _err(" ".join(e.format_message().split()))
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt, EOFError):
        _err("interrupted")
        code = 130
    except typer.Exit as e:
        code = e.exit_code
    sys.exit(code if isinstance(code, int) else 0)
