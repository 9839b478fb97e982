import copy
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from pipeline_syncdiffusion import SyncDiffusionPipeline
from syncdiffusion_utils.testing import make_components, make_lpips


warnings.filterwarnings("ignore", message=".*deprecated.*")


@pytest.fixture(autouse=True)
def forget_custom_pipeline_modules():
    """
    diffusers imports a custom pipeline file as `diffusers_modules.local.<file name>` and executes a second file of
    the same name into the same module, keeping the first file's classes: after a test loads the SD pipeline from a
    folder's `pipeline.py`, another loading the SDXL one from its own `pipeline.py` finds two pipeline classes. A
    user process loads one; each test starts as a fresh process would.
    """
    yield
    for name in [name for name in sys.modules if name.startswith("diffusers_modules.")]:
        del sys.modules[name]


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


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a loaded 2-core machine two threads per process make
    them an order of magnitude slower (measured: a synchronized tiny run stalls behind another process's threads).
    Every test runs on one thread; the suite uses the cores through pytest-xdist's workers (`-n auto` in setup.cfg),
    one thread each. Modules may still name the fixture."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def sync_step(pipe):
    """
    `pipe` set up for direct calls of its synchronization methods: the first of 10 DDIM steps, guidance 7.5, a
    64x128-pixel panorama (views at stride 4). `predicted_image(z, downsample)` is `D(x0(z))` without gradient.
    """
    pipe._guidance_scale, pipe._guidance_rescale, pipe._cross_attention_kwargs = 7.5, 0.0, None
    pipe.scheduler.set_timesteps(10)
    t = pipe.scheduler.timesteps[0]
    positive, negative = pipe.encode_prompt("a photo of a beach", "cpu", 1, True)
    conditioning = pipe._conditioning(positive, negative, None, None, 1)

    views = pipe.get_views(64, 128, stride=4)

    @torch.no_grad()
    def predicted_image(z, downsample=1):
        model_input = pipe.scheduler.scale_model_input(z, t)
        noise_pred = pipe.predict_noise(model_input, t, conditioning, views[: z.shape[0]])
        x0 = pipe.predict_clean_latents(model_input, noise_pred, t)
        return pipe.decode_for_sync(x0, downsample=downsample)

    return SimpleNamespace(
        pipe=pipe,
        t=t,
        conditioning=conditioning,
        latents=torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(5)),
        views=views,
        predicted_image=predicted_image,
    )
