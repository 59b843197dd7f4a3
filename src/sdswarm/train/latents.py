"""Cached VAE posteriors (`train.cache_latents`): each image of a chunk is encoded once, not once per pass.

What is kept is the posterior itself (the encoder's mean and log-variance), not one sample of it: every time
an image is trained, a fresh latent is drawn from it with the trainer's generator, exactly as without the
cache. So caching changes the cost, not the training (kohya caches one sample, which fixes the VAE noise of
each image for the whole run). The price is twice the memory of a latent: 128 KiB per 512 px image in fp32,
half that with a half-precision VAE; kept in host memory.

Images are recognised by their pixels (a hash of the bucket-resized tensor), so the cache needs nothing from
the data pipeline and can never hand back the latent of another image; an augmentation that changes the
pixels simply misses.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from sdswarm.train.step import scaled_sample


def pixel_key(pixels: torch.Tensor) -> bytes:
    """A digest of one image tensor's values, shape and dtype."""
    array = pixels.detach().cpu().contiguous().numpy()
    digest = hashlib.blake2b(array.data, digest_size=16)
    digest.update(repr((array.shape, array.dtype.str)).encode())
    return digest.digest()


class LatentCache:
    """VAE posteriors of the last `capacity` images seen, least recently used dropped first.

    With capacity = images per chunk, a chunk that is trained pass after pass is encoded once, and a new
    chunk is encoded once per image (within a pass every image is used once, so none is dropped before use).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.images_encoded = 0  # VAE encodes so far (misses)
        self._posteriors: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._posteriors)

    @torch.no_grad()
    def latents(self, vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Like step.encode_latents (same draws from `generator`), the VAE run only on images not cached."""
        keys = [pixel_key(image) for image in pixels]
        missing = [i for i, key in enumerate(keys) if key not in self._posteriors]
        fresh: dict[bytes, torch.Tensor] = {}
        if missing:
            batch = pixels[missing].to(device=vae.device, dtype=vae.dtype)
            moments = vae.encode(batch).latent_dist.parameters.cpu()  # one copy to the host, not one per image
            fresh = {keys[i]: m.clone() for i, m in zip(missing, moments, strict=True)}
            self.images_encoded += len(missing)
        # gather before storing: eviction must not drop what this batch needs
        moments = torch.stack([fresh[key] if key in fresh else self._posteriors[key] for key in keys])
        for key in keys:
            if key in fresh:
                self._posteriors[key] = fresh[key]
            self._posteriors.move_to_end(key)
        while len(self._posteriors) > self.capacity:
            self._posteriors.popitem(last=False)
        return scaled_sample(vae, DiagonalGaussianDistribution(moments.to(vae.device)), generator)
