"""train.cache_latents: each image is VAE-encoded once, and training sees the same latents as without the cache."""

from __future__ import annotations

import random

import pytest
import torch

from sdswarm.model.loading import TINY_MODEL_ID, load_components
from sdswarm.node import latent_cache
from sdswarm.train.latents import LatentCache
from sdswarm.train.step import encode_latents


@pytest.fixture(scope="module")
def vae():
    return load_components(TINY_MODEL_ID).vae.eval()


class CountingVAE:
    """The VAE, counting the images it encodes."""

    def __init__(self, vae) -> None:
        self.vae, self.images = vae, 0

    def encode(self, pixels):
        self.images += len(pixels)
        return self.vae.encode(pixels)

    def __getattr__(self, name):
        return getattr(self.vae, name)


def test_three_passes_encode_each_image_once_and_draw_the_same_latents_as_no_cache(vae):
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    counting, cache = CountingVAE(vae), LatentCache(capacity=6)
    cached_rng, plain_rng = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    order = list(range(6))
    for pass_index in range(3):
        random.Random(pass_index).shuffle(order)  # other batches each pass, as with buckets_shuffle
        for start in (0, 3):
            batch = images[order[start:start + 3]]
            got = cache.latents(counting, batch, cached_rng)
            expected = encode_latents(vae, batch, plain_rng)
            # same posterior, same draws: only the cost differs
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert counting.images == 6, f"pass {pass_index}: the VAE ran on {counting.images} images"
    assert cache.images_encoded == 6 and len(cache) == 6


def test_fresh_noise_each_time_an_image_comes_back(vae):
    image = torch.zeros(1, 3, 64, 64)
    cache, rng = LatentCache(capacity=4), torch.Generator().manual_seed(0)
    first, second = cache.latents(vae, image, rng), cache.latents(vae, image, rng)
    assert cache.images_encoded == 1
    assert not torch.equal(first, second), "a cached posterior must still be sampled each time"


def test_least_recently_used_image_is_dropped_first(vae):
    a, b, c = (torch.full((1, 3, 64, 64), v) for v in (-0.5, 0.0, 0.5))
    cache, rng = LatentCache(capacity=2), torch.Generator().manual_seed(0)
    # a: miss, b: miss, a: hit, c: miss (drops b, used longest ago), b: miss (drops a), c: hit
    for image in (a, b, a, c, b, c):
        cache.latents(vae, image, rng)
    assert cache.images_encoded == 4 and len(cache) == 2


def test_config_turns_it_on_with_one_chunk_of_room(tiny_config):
    assert latent_cache(tiny_config) is None  # off by default
    config = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"cache_latents": True})})
    assert latent_cache(config).capacity == config.data.images_per_chunk
