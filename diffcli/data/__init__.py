"""Images in: a folder on disk -> the tensors training reads.

    folder.py     image folder -> cached uint8 tensor + labels + class names (+ captions)
    captions.py   a caption per image, from .txt sidecars or a metadata.jsonl
    latents.py    a latent run's cache: every image encoded once by the autoencoder, checked on reuse
    mnist.py      the MNIST idx files -> an image folder (python -m diffcli.data.mnist)
"""
