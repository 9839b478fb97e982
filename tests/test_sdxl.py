"""SyncDiffusionXLPipeline against StableDiffusionXLPipeline (one view) and against reference loops written here.

Tiny random SDXL components (`syncdiffusion_utils.testing.make_sdxl_components`): two CLIP text encoders (the second
with projection), a `text_time` UNet with 8-latent windows, a factor-8 VAE with `force_upcast=True`, Euler.
"""

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

from pipeline_syncdiffusion_xl import SyncDiffusionXLPipeline
from syncdiffusion_utils.counting import PassCounter, expected_sync_step
from syncdiffusion_utils.testing import make_sdxl_components


pytestmark = pytest.mark.usefixtures("one_thread")

GUIDANCE = 5.0
# 64x128 pixels: 8x16 latents, 8-latent views at stride 4 -> 3 views, the middle one is the anchor.
PANORAMA = {"height": 64, "width": 128, "stride": 4}


@pytest.fixture(scope="module")
def xl_components():
    return make_sdxl_components("tiny", sample_size=8)


@pytest.fixture
def xl_pipe(xl_components, lpips_module):
    pipe = SyncDiffusionXLPipeline(**copy.deepcopy(xl_components), add_watermarker=False)
    pipe.set_perceptual_loss(lpips_module)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# One view: StableDiffusionXLPipeline
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"guidance_scale": 1.0},
        {"guidance_rescale": 0.7},
        {"num_images_per_prompt": 2, "negative_prompt": "blurry"},
        {
            "original_size": (128, 96),
            "crops_coords_top_left": (8, 16),
            "negative_original_size": (32, 32),
            "negative_target_size": (64, 64),
        },
    ],
    ids=["default", "no_guidance", "guidance_rescale", "two_images_negative_prompt", "micro_conditioning"],
)
def test_one_view_matches_sdxl_pipeline(xl_pipe, kwargs):
    sdxl = StableDiffusionXLPipeline(**xl_pipe.components)
    sdxl.set_progress_bar_config(disable=True)
    common = {
        "prompt": "a photo of the dolomites",
        "height": 64,
        "width": 64,
        "num_inference_steps": 2,
        "output_type": "np",
    }
    ours = xl_pipe(**common, **kwargs, sync_weight=20.0, generator=torch.Generator().manual_seed(0)).images
    theirs = sdxl(**common, **kwargs, generator=torch.Generator().manual_seed(0)).images
    assert ours.shape == theirs.shape == (kwargs.get("num_images_per_prompt", 1), 64, 64, 3)
    # The UNet batch is ordered [neg, pos] per image here and [negs..., poss...] there: float32 rounding only (~1e-7).
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Reference loops
# ----------------------------------------------------------------------------------------------------------------


def reference_loop(pipe, prompt, latents, scheduler, steps, stride, sync_weight=0.0, sync_thres=0, decay=0.95):
    """MultiDiffusion with SyncDiffusion's update (the paper's algorithm), one view at a time, for SDXL.

    Every view gets the micro-conditioning of one 64x64 image, written out here: time ids `(64, 64, 0, 0, 64, 64)`.
    x0 comes from the scheduler's own `step`; the gradient goes through UNet, VAE decoder and LPIPS to the view latent.
    """
    unet, vae, lpips = pipe.unet, pipe.vae, pipe.perceptual_loss("cpu")
    positive, negative, pooled, negative_pooled = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1)
    embeds, text_embeds = torch.cat([negative, positive]), torch.cat([negative_pooled, pooled])
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
    n = unet.config.sample_size
    height, width = latents.shape[-2:]
    views = [(h, w) for h in range(0, height - n + 1, stride) for w in range(0, width - n + 1, stride)]
    anchor = views[len(views) // 2]
    scheduler.set_timesteps(steps)
    schedulers = {view: copy.deepcopy(scheduler) for view in views}  # one state per view

    def guided_noise(sched, z, t):
        model_input = torch.cat([sched.scale_model_input(z, t)] * 2)
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        uncond, cond = unet(model_input, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample.chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    def image(sched, z, t):
        x0 = copy.deepcopy(sched).step(guided_noise(sched, z, t), t, z).pred_original_sample
        return (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

    z = latents * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        value, count = torch.zeros_like(z), torch.zeros_like(z)
        sync = sync_weight > 0 and i < sync_thres
        if sync:
            anchor_image = image(schedulers[anchor], z[:, :, anchor[0] : anchor[0] + n, anchor[1] : anchor[1] + n], t)
        for h, w in views:
            sched = schedulers[(h, w)]
            z_v = z[:, :, h : h + n, w : w + n].clone()
            if sync and (h, w) != anchor:
                z_v.requires_grad_(True)
                with torch.enable_grad():
                    loss = lpips(image(sched, z_v, t) * 2 - 1, anchor_image * 2 - 1).sum()
                    (grad,) = torch.autograd.grad(loss, z_v)
                # The step is taken on the variance-preserving latent z / sqrt(sigma^2 + 1) (1 for DDIM).
                vp_scale = sched.scale_model_input(torch.ones(()), t)
                z_v = (z_v - sync_weight * decay**i * grad / vp_scale**2).detach()
            value[:, :, h : h + n, w : w + n] += sched.step(guided_noise(sched, z_v, t), t, z_v).prev_sample
            count[:, :, h : h + n, w : w + n] += 1
        z = value / count
    return z


# Batched and unbatched float32 runs differ by rounding, which the synchronization step amplifies to ~1e-4 (as in
# the SD tests); a real mistake (wrong anchor, wrong time ids, gradient scale) moves latents by more than 1e-2.
TOLERANCE = {"atol": 1e-3, "rtol": 1e-3}


@torch.no_grad()
@pytest.mark.parametrize("view_batch_size", [1, 3])
def test_multidiffusion_matches_reference_loop(xl_pipe, view_batch_size):
    latents = noise((1, 4, 8, 16), 0)
    ours = xl_pipe(
        "a forest",
        **PANORAMA,
        num_inference_steps=2,
        sync_weight=0.0,
        latents=latents,
        view_batch_size=view_batch_size,
        output_type="latent",
    ).images
    expected = reference_loop(xl_pipe, "a forest", latents, copy.deepcopy(xl_pipe.scheduler), steps=2, stride=4)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, EulerDiscreteScheduler], ids=["ddim", "euler"])
def test_synchronized_matches_reference_loop(xl_pipe, scheduler_class):
    # SDXL's own scheduler config has `clip_sample: false`; DDIM's default would clip x0 in the reference only.
    extra = {"clip_sample": False} if scheduler_class is DDIMScheduler else {}
    xl_pipe.scheduler = scheduler_class.from_config(xl_pipe.scheduler.config, **extra)
    latents = noise((1, 4, 8, 16), 1)
    kwargs = {"num_inference_steps": 2, "sync_thres": 2, "latents": latents, "output_type": "latent"}
    ours = xl_pipe("a forest", **PANORAMA, sync_weight=20.0, **kwargs).images
    expected = reference_loop(
        xl_pipe,
        "a forest",
        latents,
        copy.deepcopy(xl_pipe.scheduler),
        steps=2,
        stride=4,
        sync_weight=20.0,
        sync_thres=2,
    )
    torch.testing.assert_close(ours, expected, **TOLERANCE)
    plain = xl_pipe("a forest", **PANORAMA, sync_weight=0.0, **kwargs).images
    assert (ours - plain).abs().max() > 1e-2  # synchronization really acted


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_pass_counts_equal_the_formulas(xl_pipe, mode):
    call = {"prompt": "a lighthouse", **PANORAMA, "num_inference_steps": 1, "output_type": "latent", "sync_mode": mode}
    with PassCounter(xl_pipe) as counter:
        xl_pipe(**call, generator=torch.Generator().manual_seed(0))
    counts = counter.as_dict()
    num_views = len(xl_pipe.get_views(64, 128, stride=4))
    assert num_views == 3
    expected = expected_sync_step(num_views, gradient="unet" if mode == "exact" else "x0", reuse_noise=mode == "fast")
    assert {key: counts[key] for key in expected} == expected
    if mode == "exact":  # 2N-1, N-1, N, N-1, N-1
        assert (counts["unet_fwd"], counts["unet_bwd"], counts["dec_fwd"], counts["dec_bwd"], counts["lpips_fwd"]) == (
            5,
            2,
            3,
            2,
            2,
        )


# ----------------------------------------------------------------------------------------------------------------
# float16 and the SDXL VAE's force_upcast
# ----------------------------------------------------------------------------------------------------------------


def overflowing_vae(pipe):
    """Make the VAE overflow in float16 as SDXL's does: its first decoder layer's outputs exceed 65504."""
    with torch.no_grad():
        pipe.vae.post_quant_conv.weight.mul_(1e5)
        pipe.vae.post_quant_conv.bias.mul_(1e5)


def test_float16_with_force_upcast_gives_finite_images_and_syncs_in_float32(xl_pipe):
    overflowing_vae(xl_pipe)
    xl_pipe.to(dtype=torch.float16)
    decode_dtypes = []
    xl_pipe.vae.decoder.register_forward_pre_hook(lambda module, args: decode_dtypes.append(args[0].dtype))
    call = {"prompt": "a beach", **PANORAMA, "num_inference_steps": 2, "sync_thres": 1, "output_type": "np"}

    images = xl_pipe(**call, generator=torch.Generator().manual_seed(0)).images

    assert np.isfinite(images).all()
    # 3 synchronization decodes (anchor + 2 views) and the final decode, all in float32; the VAE is float16 again after.
    assert decode_dtypes == [torch.float32] * 4
    assert xl_pipe.vae.dtype == torch.float16 and xl_pipe.unet.dtype == torch.float16

    # Without the upcast the same VAE overflows in the synchronization's decode (the SD pipeline's overflow check
    # stops there); with synchronization off the latents stay finite but the final decode overflows.
    xl_pipe.vae.register_to_config(force_upcast=False)
    with pytest.raises(FloatingPointError, match="overflowed in float16"):
        xl_pipe(**{**call, "output_type": "latent"}, generator=torch.Generator().manual_seed(0))
    latents = xl_pipe(
        **{**call, "output_type": "latent"}, sync_weight=0, generator=torch.Generator().manual_seed(0)
    ).images
    assert torch.isfinite(latents).all()
    with torch.no_grad():
        assert not torch.isfinite(xl_pipe.decode_latents(latents)).all()


def test_unscale_latents_follows_latents_mean_and_std(xl_pipe):
    latents = noise((1, 4, 8, 8), 3)
    torch.testing.assert_close(xl_pipe.unscale_latents(latents, xl_pipe.vae), latents / 0.13025)
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.0, 2.0, 0.5, 1.5]
    xl_pipe.vae.register_to_config(latents_mean=mean, latents_std=std)
    expected = latents * torch.tensor(std).view(1, 4, 1, 1) / 0.13025 + torch.tensor(mean).view(1, 4, 1, 1)
    torch.testing.assert_close(xl_pipe.unscale_latents(latents, xl_pipe.vae), expected)
