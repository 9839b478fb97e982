import warnings

import pytest
import torch

from syncdiffusion_utils.testing import make_lpips, tiny_pipeline


warnings.filterwarnings("ignore", message=".*deprecated.*")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def lpips_module():
    """One random-backbone LPIPS-VGG for the whole session (building VGG costs about a second)."""
    return make_lpips()


@pytest.fixture
def pipe(lpips_module):
    """A fresh tiny pipeline: 64x64-pixel views (8 latents), factor-8 VAE, DDIM."""
    pipe = tiny_pipeline(sample_size=8, lpips_module=False)
    pipe.set_perceptual_loss(lpips_module)
    return pipe


@pytest.fixture
def pipe64(lpips_module):
    """A tiny pipeline with the deprecated panorama pipeline's geometry: 64-latent views, factor 8."""
    pipe = tiny_pipeline(sample_size=64, lpips_module=False)
    pipe.set_perceptual_loss(lpips_module)
    return pipe


