"""Files out and in: what diffcli writes and reads, each checked before anything is built from it.

    checkpoint.py        model files and training state: safetensors with JSON metadata, never unpickled
    autoencoder_file.py  autoencoder files in the same way
    convert.py           other projects' autoencoder layouts (diffusers, latent-diffusion) -> ours, by a name table
    images.py            tensors <-> PNG, grids, generation parameters in PNG text chunks
"""
