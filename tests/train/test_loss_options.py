"""min-SNR weighting and noise offset, checked against numbers worked out by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from sdswarm.train.step import diffusion_loss, min_snr_weights, snr

# betas all 0.5: alpha_bar_t = 0.5 ** (t + 1) = 1/2, 1/4, 1/8, 1/16, so SNR_t = alpha_bar / (1 - alpha_bar)
# = 1, 1/3, 1/7, 1/15
HALF_BETAS = [0.5] * 4
SNR = [1.0, 1 / 3, 1 / 7, 1 / 15]


def half_beta_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=4, trained_betas=HALF_BETAS, prediction_type=prediction_type)


def test_snr_of_each_timestep():
    torch.testing.assert_close(snr(half_beta_scheduler(), torch.arange(4)), torch.tensor(SNR))


@pytest.mark.parametrize(
    ("prediction_type", "expected"),
    [
        # epsilon: min(SNR, 0.2) / SNR -> 0.2/1, 0.2/(1/3), (1/7)/(1/7), (1/15)/(1/15)
        ("epsilon", [0.2, 0.6, 1.0, 1.0]),
        # v-prediction: min(SNR, 0.2) / (SNR + 1) -> 0.2/2, 0.2/(4/3), (1/7)/(8/7), (1/15)/(16/15)
        ("v_prediction", [0.1, 0.15, 1 / 8, 1 / 16]),
    ],
)
def test_min_snr_weights_by_hand(prediction_type, expected):
    weights = min_snr_weights(half_beta_scheduler(prediction_type), torch.arange(4), gamma=0.2)
    torch.testing.assert_close(weights, torch.tensor(expected))


class ZeroUNet(torch.nn.Module):
    """Predicts 0 and records what it was given, so a test can recover the noise that was drawn."""

    def forward(self, noisy, timesteps, encoder_hidden_states):
        self.noisy, self.timesteps = noisy.detach().clone(), timesteps.detach().clone()
        return SimpleNamespace(sample=torch.zeros_like(noisy))


def drawn_noise(unet: ZeroUNet, scheduler: DDPMScheduler) -> torch.Tensor:
    """With zero latents, noisy = sqrt(1 - alpha_bar_t) * noise."""
    alpha_bar = scheduler.alphas_cumprod[unet.timesteps]
    return unet.noisy / (1 - alpha_bar).sqrt().view(-1, 1, 1, 1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_loss_weights_each_sample(prediction_type):
    scheduler, unet = half_beta_scheduler(prediction_type), ZeroUNet()
    latents = torch.zeros(16, 4, 8, 8)
    loss = diffusion_loss(unet, scheduler, latents, torch.zeros(16, 77, 32), torch.Generator().manual_seed(0),
                          min_snr_gamma=0.2)

    noise, t = drawn_noise(unet, scheduler), unet.timesteps
    assert len(set(t.tolist())) > 1, "the test needs several timesteps"
    alpha_bar = torch.tensor([0.5, 0.25, 0.125, 0.0625])[t]
    ratio = alpha_bar / (1 - alpha_bar)
    if prediction_type == "epsilon":  # target = noise
        weight, target_sq = torch.clamp(ratio, max=0.2) / ratio, noise.pow(2).mean(dim=(1, 2, 3))
    else:  # target v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0, and x0 = 0
        weight, target_sq = torch.clamp(ratio, max=0.2) / (ratio + 1), alpha_bar * noise.pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, (weight * target_sq).mean(), rtol=1e-5, atol=0)


def test_noise_offset_adds_one_constant_per_sample_and_channel_and_is_the_target():
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012)
    latents, embeddings = torch.zeros(64, 4, 32, 32), torch.zeros(64, 77, 32)

    def run(offset: float) -> tuple[torch.Tensor, torch.Tensor]:
        unet = ZeroUNet()
        loss = diffusion_loss(unet, scheduler, latents, embeddings, torch.Generator().manual_seed(1),
                              noise_offset=offset)
        return loss, drawn_noise(unet, scheduler)

    for offset in (0.0, 0.5):
        loss, noise = run(offset)
        # zero prediction: the loss is the mean square of the target, i.e. of the (offset) noise itself
        torch.testing.assert_close(loss, noise.pow(2).mean(), rtol=1e-5, atol=0)
        channel_means = noise.mean(dim=(2, 3))  # 256 values: offset * N(0, 1) + N(0, 1/1024)
        spread = channel_means.pow(2).mean().item()
        if offset == 0:
            assert spread < 0.01
        else:  # E = 0.25 + 1/1024; 256 samples: +-3 sigma is about +-27 %
            assert 0.17 < spread < 0.34, spread
        # around its (b, c) constant, the noise is still unit Gaussian
        assert 0.95 < (noise - channel_means[..., None, None]).var().item() < 1.05

