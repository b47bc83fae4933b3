"""diffcli: train and sample diffusion transformers on your own images."""

__version__ = "0.1.0"
