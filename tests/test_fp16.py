"""float16: the synchronization update matches the float32 one from the same weights (loss scaling, docs/algorithm.md).

At 512x512 LPIPS gradients are ~1e-6 per pixel, below float16's smallest normal number (6.1e-5), so an unscaled
backward pass through a float16 decoder and UNet zeroes or truncates them. The tiny model's 64-pixel images give
gradients a thousand times larger; LPIPS times 1e-3 (with the weight times 1e3, the same update in exact arithmetic)
brings them down to where real models' are.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import fresh_pipeline
from diffusers import DDIMScheduler

from pipeline_syncdiffusion import crop_views


pytestmark = pytest.mark.usefixtures("one_thread")

LOSS_SCALE = 1e-3
# A weight of 400 on LPIPS makes updates of up to 1.5 latent units, far above float16's rounding of the latents
# (~1e-3), so the comparison measures the gradient, not the rounding of the result.
SYNC_WEIGHT = 400.0 / LOSS_SCALE


class RecordingDDIM(DDIMScheduler):
    """DDIM that keeps the latents each view batch is stepped from: the views' latents after synchronization."""

    samples = []

    def step(self, model_output, timestep, sample, *args, **kwargs):
        RecordingDDIM.samples.append(sample.detach().float().clone())
        return super().step(model_output, timestep, sample, *args, **kwargs)


class ScaledLoss(torch.nn.Module):
    def __init__(self, loss, scale):
        super().__init__()
        self.loss, self.scale = loss, scale

    def forward(self, images, anchor_images):
        return self.scale * self.loss(images, anchor_images)


def synchronization_update(pipe, dtype):
    """One synchronized DDIM step of a 64x128 panorama (3 views in one batch): each view's latent change."""
    pipe.set_perceptual_loss(ScaledLoss(pipe.perceptual_loss("cpu"), LOSS_SCALE))
    pipe.scheduler = RecordingDDIM.from_config(pipe.scheduler.config)
    pipe = pipe.to(dtype)
    latents = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    RecordingDDIM.samples.clear()
    with torch.no_grad():
        pipe(
            "a photo of a forest",
            latents=latents,
            height=64,
            width=128,
            stride=4,
            num_inference_steps=1,
            sync_thres=1,
            sync_weight=SYNC_WEIGHT,
            view_batch_size=3,
            output_type="latent",
        )
    (stepped,) = RecordingDDIM.samples
    return stepped - crop_views(latents.float(), pipe.get_views(64, 128, stride=4))


def test_float16_update_matches_float32(components_cache, lpips_module):
    """Measured: cosine 0.99974, relative error 2.3% (float16 arithmetic in the decoder and UNet). Without loss
    scaling (before it was added) the same float16 update had cosine 0.176 and relative error 98.7%: 93% of its
    entries were exactly zero."""
    reference = synchronization_update(fresh_pipeline(components_cache, lpips_module, 8), torch.float32)
    half = synchronization_update(fresh_pipeline(components_cache, lpips_module, 8), torch.float16)
    assert reference.abs().max() > 1.0  # the update is far above float16's rounding of the latents
    cosine = F.cosine_similarity(half.flatten(), reference.flatten(), dim=0).item()
    relative_error = ((half - reference).norm() / reference.norm()).item()
    assert cosine > 0.999
    assert relative_error < 0.05
