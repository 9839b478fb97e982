import warnings

import pytest
import torch

import copy

from pipeline_syncdiffusion import SyncDiffusionPipeline
from syncdiffusion_utils.testing import make_components, make_lpips


warnings.filterwarnings("ignore", message=".*deprecated.*")


@pytest.fixture(scope="session")
def lpips_module():
    """One random-backbone LPIPS-VGG for the whole session (building VGG costs about a second)."""
    return make_lpips()


@pytest.fixture(scope="session")
def components_cache():
    return {}


def fresh_pipeline(cache, lpips_module, sample_size):
    """A new pipeline on copies of session-built tiny components (tests may change them freely)."""
    if sample_size not in cache:
        cache[sample_size] = make_components("tiny", sample_size=sample_size)
    pipe = SyncDiffusionPipeline(
        **copy.deepcopy(cache[sample_size]), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_perceptual_loss(lpips_module)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(components_cache, lpips_module):
    """A fresh tiny pipeline: 64x64-pixel views (8 latents), factor-8 VAE, DDIM."""
    return fresh_pipeline(components_cache, lpips_module, 8)


@pytest.fixture
def pipe64(components_cache, lpips_module):
    """A tiny pipeline with the deprecated panorama pipeline's geometry: 64-latent views, factor 8."""
    return fresh_pipeline(components_cache, lpips_module, 64)


