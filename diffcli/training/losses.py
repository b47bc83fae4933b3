"""The training loss: MSE on the eps or v target with Min-SNR-gamma weights, plus L_vlb for a learned variance."""

from __future__ import annotations

import math

import torch

from diffcli.diffusion.schedule import NoiseSchedule
from diffcli.training.config import TrainConfig


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023, Eq. 9 and Sec. 3.4): the x0-loss weight min(SNR, gamma)
    expressed for the eps target (divide by SNR) or the v target (divide by SNR + 1)."""
    clipped = snr.clamp(max=gamma)
    return clipped / snr.clamp(min=1e-12) if prediction == "epsilon" else clipped / (snr + 1)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-log p(x) for x in [-1, 1] quantised to 256 levels (DDPM Sec. 3.3, Eq. 13), elementwise."""
    inv = torch.exp(-log_scale)
    upper = torch.special.ndtr(inv * (x - mean + 1 / 255))
    lower = torch.special.ndtr(inv * (x - mean - 1 / 255))
    prob = torch.where(x < -0.999, upper, torch.where(x > 0.999, 1 - lower, upper - lower))
    return -torch.log(prob.clamp(min=1e-12))


def vlb_term(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
             x0_hat: torch.Tensor, var_values: torch.Tensor) -> torch.Tensor:
    """Improved DDPM L_vlb (Eqs. 4-6, 15) per sample, in bits per dimension. The mean is frozen
    (x0_hat detached) so this term trains only the variance, as in L_hybrid."""
    ab = schedule.alphas_cumprod.to(x0.device)
    ab_t = ab[t].float()
    ab_prev = torch.where(t > 0, ab[(t - 1).clamp(min=0)].float(), torch.ones_like(ab_t))
    beta = 1 - ab_t / ab_prev
    beta_tilde = (1 - ab_prev) / (1 - ab_t) * beta
    # log of beta_tilde, with its t = 0 value (zero) replaced by the t = 1 value, as Improved DDPM
    bt1 = float((1 - ab[0]) / (1 - ab[1]) * (1 - ab[1] / ab[0]))
    log_bt = torch.log(torch.where(t > 0, beta_tilde, torch.full_like(beta_tilde, bt1)))
    c1 = _bcast(ab_prev.sqrt() * beta / (1 - ab_t), x0)
    c2 = _bcast((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_t), x0)
    true_mean = c1 * x0 + c2 * x_t
    model_mean = c1 * x0_hat.detach() + c2 * x_t
    frac = (var_values + 1) / 2
    model_logvar = frac * _bcast(torch.log(beta), x0) + (1 - frac) * _bcast(log_bt, x0)
    kl = normal_kl(true_mean, _bcast(log_bt, x0), model_mean, model_logvar).flatten(1).mean(1)
    nll = discretized_gaussian_nll(x0, model_mean, 0.5 * model_logvar).flatten(1).mean(1)
    return torch.where(t == 0, nll, kl) / math.log(2.0)


def diffusion_loss(model: torch.nn.Module, schedule: NoiseSchedule, cfg: TrainConfig, x0: torch.Tensor,
                   y: torch.Tensor | None, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample loss: MSE on the eps or v target (DDPM L_simple; Salimans & Ho 2022 for v), with
    optional Min-SNR-gamma weights, plus lambda * L_vlb (lambda = 0.001) for learned variance."""
    x_t = schedule.add_noise(x0, noise, t)
    target = noise if cfg.prediction == "epsilon" else schedule.velocity(x0, noise, t)
    out = model(x_t, t, y).float()
    C = x0.shape[1]
    pred = out[:, :C]
    loss = (pred - target).pow(2).flatten(1).mean(1)  # (B,)
    if cfg.min_snr_gamma > 0:
        snr = schedule.snr.to(x0.device)[t].float()
        loss = loss * min_snr_weight(snr, cfg.min_snr_gamma, cfg.prediction)
    if out.shape[1] == 2 * C:
        ab = _bcast(schedule.alphas_cumprod.to(x0.device)[t].float(), x0)
        if cfg.prediction == "epsilon":
            x0_hat = (x_t - (1 - ab).sqrt() * pred) / ab.sqrt()
        else:
            x0_hat = ab.sqrt() * x_t - (1 - ab).sqrt() * pred
        loss = loss + 0.001 * schedule.num_timesteps / 1000 * vlb_term(schedule, x0, x_t, t, x0_hat.clamp(-1, 1), out[:, C:])
    return loss
