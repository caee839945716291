"""Noise, targets and loss weights per training objective: epsilon, v-prediction, EDM.

SD1.x and SDXL predict the noise (epsilon), SD2.x-768 predicts v, Playground v2.5 is
trained EDM-style (Karras et al. 2022: log-normal σ, preconditioned input/output, target
x0 with λ(σ) weighting). Min-SNR-γ (Hang et al. 2023) reweights per sample. Everything is
per sample, so the prior-preservation halves of a batch each keep their own weights.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

EDM_P_MEAN, EDM_P_STD = -1.2, 1.2  # the EDM paper's training σ distribution


@dataclasses.dataclass
class Noised:
    model_input: torch.Tensor  # what the UNet sees
    timesteps: torch.Tensor  # what the UNet is conditioned on (t, or c_noise for EDM)
    noisy: torch.Tensor  # x_t itself
    sigma: torch.Tensor | None  # EDM only, [B, 1, 1, 1]


def noise_latents(sched, latents: torch.Tensor, noise: torch.Tensor, gen: torch.Generator,
                  objective: str) -> Noised:
    b = latents.shape[0]
    if objective == "edm":
        sigma = torch.exp(EDM_P_MEAN + EDM_P_STD * torch.randn(b, generator=gen)).to(latents.device)
        sigma = sigma.view(b, 1, 1, 1)
        noisy = latents + noise * sigma
        return Noised(sched.precondition_inputs(noisy, sigma), sched.precondition_noise(sigma.flatten()), noisy, sigma)
    t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen).to(latents.device)
    noisy = sched.add_noise(latents, noise, t)
    return Noised(noisy, t, noisy, None)


def per_sample_loss(sched, pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, n: Noised,
                    objective: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Unweighted (except EDM's λ(σ), which is part of the objective) MSE per sample; with
    `mask` ([B, 1, h, w] at the latents' size, see :func:`latent_mask`) only the subject's
    positions count (:func:`masked_mean`)."""
    if objective == "edm":
        denoised = sched.precondition_outputs(n.noisy, pred.float(), n.sigma)
        sd = sched.config.sigma_data
        weight = ((n.sigma**2 + sd**2) / (n.sigma * sd) ** 2).flatten()
        return weight * masked_mean(F.mse_loss(denoised, latents.float(), reduction="none"), mask)
    target = noise if objective == "epsilon" else sched.get_velocity(latents, noise, n.timesteps)
    return masked_mean(F.mse_loss(pred.float(), target.float(), reduction="none"), mask)


def masked_mean(err: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean of `err` [B, C, h, w] over the positions `mask` [B, 1, h, w] weights
    (None: every position). Normalised by the mask's area (Σ mask · C), not the frame's:
    kohya sd-scripts (--masked_loss, apply_masked_loss) multiplies the loss by the mask and
    then takes the plain mean over all positions, so a subject covering 10% of the frame
    gets a tenth of the gradient and small subjects barely train. Here every photo counts
    alike whatever its subject's size, and an all-ones mask gives exactly the unmasked loss.
    A mask with nothing in it (a random crop that missed the subject) gives 0."""
    if mask is None:
        return err.mean(dim=(1, 2, 3))
    m = mask.to(err.dtype)
    return (err * m).sum(dim=(1, 2, 3)) / (m.sum(dim=(1, 2, 3)) * err.shape[1]).clamp_min(1e-8)


def latent_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixel masks [B, 1, H, W] in [0, 1] at the latents' (h, w): area interpolation, so a
    latent position weighs the share of its pixels that are subject (kohya does the same)."""
    return F.interpolate(masks.float(), size=size, mode="area")


def snr_weights(sched, t: torch.Tensor, gamma: float, objective: str) -> torch.Tensor:
    """Min-SNR-γ weight per sample; ones when γ = 0."""
    if gamma <= 0:
        return torch.ones(t.shape[0])
    ac = sched.alphas_cumprod.to(t.device)[t].float()
    snr = ac / (1 - ac)
    if objective == "v_prediction":
        return torch.clamp(snr, max=gamma) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


def dreambooth_loss(per_sample: torch.Tensor, weights: torch.Tensor, n_instance: int,
                    prior_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """instance + λ·prior from one forward pass over the concatenated batch. Weights are
    applied per sample, so each half is weighted by its own timesteps (the diffusers
    scripts weight the instance half with weights computed for the whole batch)."""
    wl = weights.to(per_sample.device) * per_sample
    inst = wl[:n_instance].mean()
    if per_sample.shape[0] == n_instance:
        return inst, inst, torch.zeros_like(inst)
    prior = wl[n_instance:].mean()
    return inst + prior_weight * prior, inst, prior
