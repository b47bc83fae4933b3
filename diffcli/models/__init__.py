"""The networks, each with the config dataclass that rebuilds it and its presets. They know nothing of
files, training or sampling.

    dit.py           ModelConfig, presets and the diffusion transformer (DiT; cross-attention for text)
    autoencoder.py   AutoencoderConfig and the KL autoencoder of latent diffusion, in diffusers' names
    text.py          the word vocabulary and the builtin text encoder of text-to-image models
    clip.py          a frozen CLIP text encoder read from a local Hugging Face folder (diffcli[clip])
"""
