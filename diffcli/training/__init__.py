"""Training: an image folder and a TrainConfig -> a run folder with checkpoints and a model file.

    config.py       TrainConfig: the options, the ones that must match to resume, their checks
    batches.py      step s -> this process's batch, drawn from (seed, s) alone (data order, noise, crops, flips)
    losses.py       the loss: eps or v target, Min-SNR-gamma weights, L_vlb for a learned variance
    loop.py         train(): set-up, the optimizer step, EMA, metrics, previews, signals
    rundir.py       the run folder: layout, checkpoints and the model file, resuming
    distributed.py  torchrun: rank, device, and the collectives the loop needs
"""

from diffcli.training.config import TrainConfig
from diffcli.training.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
