"""With synchronization off, SyncDiffusionPipeline gives diffusers' StableDiffusionPanoramaPipeline's images."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPanoramaPipeline


# The deprecated pipeline's geometry: factor 8 and a 64-latent window. 512x640 pixels gives 3 views at stride 8 (10 circular).
SIZE = {"height": 512, "width": 640, "num_inference_steps": 2}


@pytest.fixture
def panorama(pipe64):
    panorama = StableDiffusionPanoramaPipeline(**pipe64.components)
    panorama.set_progress_bar_config(disable=True)
    return panorama


def run_both(pipe, panorama, **kwargs):
    ours = pipe(
        "a photo of the dolomites", **SIZE, sync_weight=0, generator=torch.Generator().manual_seed(0), **kwargs
    )
    theirs = panorama("a photo of the dolomites", **SIZE, generator=torch.Generator().manual_seed(0), **kwargs)
    return ours.images, theirs.images


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"circular_padding": True},
        {"view_batch_size": 3},
        {"guidance_scale": 1.0},
        {"negative_prompt": "blurry"},
    ],
    ids=["default", "circular", "view_batch_size_3", "no_guidance", "negative_prompt"],
)
def test_same_images_as_panorama_pipeline(pipe64, panorama, kwargs):
    ours, theirs = run_both(pipe64, panorama, output_type="np", **kwargs)
    assert ours.shape == (1, 512, 640, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types_match_panorama_pipeline(pipe64, panorama, output_type):
    ours, theirs = run_both(pipe64, panorama, output_type=output_type)
    if output_type == "pil":
        assert ours[0].size == (640, 512)
        ours, theirs = np.asarray(ours[0], dtype=np.int16), np.asarray(theirs[0], dtype=np.int16)
        assert np.abs(ours - theirs).max() <= 1
    elif output_type == "latent":
        assert ours.shape == (1, 4, 64, 80)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    else:
        expected = (1, 3, 512, 640) if output_type == "pt" else (1, 512, 640, 3)
        assert tuple(ours.shape) == expected
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5)


def test_several_images_match_panorama_pipeline_per_image(pipe64, panorama):
    """`num_images_per_prompt=2` with a negative prompt equals the panorama pipeline run on each image alone.

    The deprecated pipeline cannot be compared batched: it pairs the guidance batch `[z0, z0, z1, z1]` with
    embeddings `[neg, neg, pos, pos]`, so with two images neither gets classifier-free guidance.
    """
    latents = torch.randn(2, 4, 64, 80, generator=torch.Generator().manual_seed(1))
    kwargs = {**SIZE, "negative_prompt": "blurry", "output_type": "latent"}
    ours = pipe64("a photo", num_images_per_prompt=2, latents=latents, sync_weight=0, **kwargs).images
    per_image = [panorama("a photo", latents=latents[k : k + 1], **kwargs).images for k in range(2)]
    torch.testing.assert_close(ours, torch.cat(per_image), atol=1e-4, rtol=0)
    batched = panorama("a photo", num_images_per_prompt=2, latents=latents, **kwargs).images
    assert (batched - torch.cat(per_image)).abs().max() > 1e-2  # the deprecated pipeline's bug is real


def test_stochastic_steps_draw_the_panoramas_noise_once(pipe64, panorama):
    """DDIM with `eta > 0` injects noise at every step. One view draws what the panorama pipeline draws; with several
    views the panorama pipeline draws it per view batch, which under-noises overlaps (tests/test_contract.py measures
    the variance), and this pipeline draws it once for the panorama: the images differ."""
    one_view = {"height": 512, "width": 512, "num_inference_steps": 2, "eta": 0.5, "output_type": "latent"}
    ours = pipe64("a photo", **one_view, sync_weight=0, generator=torch.Generator().manual_seed(0)).images
    theirs = panorama("a photo", **one_view, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    ours, theirs = run_both(pipe64, panorama, output_type="latent", eta=0.5)
    assert (ours - theirs).abs().max() > 1e-2


def test_guidance_rescale_is_applied(pipe64, panorama):
    """The deprecated pipeline silently ignores `guidance_rescale`; this one applies it."""
    ours, theirs = run_both(pipe64, panorama, output_type="latent", guidance_rescale=0.7)
    plain, _ = run_both(pipe64, panorama, output_type="latent")
    torch.testing.assert_close(theirs, plain, atol=1e-6, rtol=0)
    assert (ours - plain).abs().max() > 1e-3


def test_circular_several_rows_runs_where_panorama_pipeline_crashes(pipe64, panorama):
    kwargs = {"height": 576, "width": 576, "num_inference_steps": 1, "circular_padding": True, "output_type": "np"}
    with pytest.raises(RuntimeError):
        panorama("a photo", **kwargs)
    image = pipe64("a photo", sync_weight=0, **kwargs).images
    assert image.shape == (1, 576, 576, 3) and np.isfinite(image).all()
