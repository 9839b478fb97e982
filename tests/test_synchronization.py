"""Synchronization on: the pipeline against a plain loop written from DESIGN §3, and the mechanism itself."""

import copy

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)


GUIDANCE = 7.5


def reference_syncdiffusion(
    pipe, prompt, latents, steps, stride, sync_weight, sync_thres, sync_decay_rate=0.95, sync_freq=1, circular=False
):
    """The paper's algorithm with DDIM, one image and one view at a time, x0 from `scheduler.step`.

    Views are row-major; with `circular` their columns wrap around the right edge (the width a multiple of `stride`).
    """
    unet, vae, lpips = pipe.unet, pipe.vae, pipe.perceptual_loss("cpu")
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    positive, negative = pipe.encode_prompt(prompt, "cpu", 1, True)
    embeds = torch.cat([negative, positive])
    n = unet.config.sample_size
    height, width = latents.shape[-2:]
    column_starts = range(0, width, stride) if circular else range(0, width - n + 1, stride)
    views = [(h, w) for h in range(0, height - n + 1, stride) for w in column_starts]
    anchor = views[len(views) // 2]

    def columns(w):
        return [(w + k) % width for k in range(n)]

    def noise(z, t):
        uncond, cond = unet(torch.cat([z, z]), t, encoder_hidden_states=embeds).sample.chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    def image(z, t):
        x0 = scheduler.step(noise(z, t), t, z).pred_original_sample
        return (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

    z = latents.clone()
    for i, t in enumerate(scheduler.timesteps):
        value, count = torch.zeros_like(z), torch.zeros_like(z)
        sync = i < sync_thres and (i + 1) % sync_freq == 0
        if sync:
            anchor_image = image(z[:, :, anchor[0] : anchor[0] + n][..., columns(anchor[1])], t)
        for h, w in views:
            z_v = z[:, :, h : h + n][..., columns(w)].clone()
            if sync and (h, w) != anchor:
                z_v.requires_grad_(True)
                with torch.enable_grad():
                    loss = lpips(image(z_v, t) * 2 - 1, anchor_image * 2 - 1).sum()
                    (grad,) = torch.autograd.grad(loss, z_v)
                z_v = (z_v - sync_weight * sync_decay_rate**i * grad).detach()
            value[:, :, h : h + n, columns(w)] += scheduler.step(noise(z_v, t), t, z_v).prev_sample
            count[:, :, h : h + n, columns(w)] += 1
        z = value / count
    return z


# Batched and unbatched float32 runs differ by rounding, which the synchronization step (weight 20) amplifies to
# ~2e-4; a real mistake (wrong anchor, gradients mixed across views or images) moves latents by more than 1e-2.
TOLERANCE = {"atol": 1e-3, "rtol": 1e-3}

# 64x128 pixels: 8x16 latents, 8-latent views at stride 4 -> 3 views, the middle one is the anchor.
SHAPE = {"height": 64, "width": 128}


@torch.no_grad()
@pytest.mark.parametrize("view_batch_size", [1, 3])
def test_matches_reference_loop(pipe, view_batch_size):
    latents = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(0))
    kwargs = {"num_inference_steps": 3, "stride": 4, "sync_weight": 20.0, "sync_thres": 2}
    ours = pipe("a photo of a forest", **SHAPE, **kwargs, latents=latents, view_batch_size=view_batch_size, output_type="latent").images
    expected = reference_syncdiffusion(pipe, "a photo of a forest", latents, steps=3, stride=4, sync_weight=20.0, sync_thres=2)
    torch.testing.assert_close(ours, expected, **TOLERANCE)
    # Synchronization really acted: the result is not MultiDiffusion's.
    plain = pipe("a photo of a forest", **SHAPE, **{**kwargs, "sync_weight": 0.0}, latents=latents, output_type="latent").images
    assert (ours - plain).abs().max() > 1e-2


@torch.no_grad()
@pytest.mark.parametrize(
    "height, width, circular",
    [(128, 64, False), (96, 96, False), (64, 96, True)],
    ids=["tall_3_rows", "grid_2x2", "circular_wraps"],
)
def test_tall_grid_and_circular_panoramas_match_reference_loop(pipe, height, width, circular):
    latents = torch.randn(1, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(2))
    kwargs = {"num_inference_steps": 2, "stride": 4, "sync_weight": 20.0, "sync_thres": 2}
    ours = pipe(
        "a waterfall", height=height, width=width, circular_padding=circular, **kwargs, latents=latents, output_type="latent"
    ).images
    expected = reference_syncdiffusion(
        pipe, "a waterfall", latents, steps=2, stride=4, sync_weight=20.0, sync_thres=2, circular=circular
    )
    torch.testing.assert_close(ours, expected, **TOLERANCE)
    plain = pipe(
        "a waterfall", height=height, width=width, circular_padding=circular, **{**kwargs, "sync_weight": 0.0},
        latents=latents, output_type="latent",
    ).images
    assert (ours - plain).abs().max() > 1e-2


@torch.no_grad()
def test_two_prompts_each_have_their_own_anchor(pipe):
    prompts = ["a photo of a forest", "a city at night"]
    latents = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(3))
    kwargs = {"num_inference_steps": 2, "stride": 4, "sync_weight": 20.0, "sync_thres": 2}
    ours = pipe(prompts, **SHAPE, **kwargs, latents=latents, view_batch_size=2, output_type="latent").images
    expected = torch.cat(
        [reference_syncdiffusion(pipe, p, latents[k : k + 1], steps=2, stride=4, sync_weight=20.0, sync_thres=2) for k, p in enumerate(prompts)]
    )
    torch.testing.assert_close(ours, expected, **TOLERANCE)


@torch.no_grad()
def test_sync_freq_and_decay_follow_the_schedule(pipe):
    latents = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(4))
    kwargs = {"num_inference_steps": 3, "stride": 4, "sync_weight": 30.0, "sync_thres": 3, "sync_decay_rate": 0.5}
    ours = pipe("a lake", **SHAPE, **kwargs, sync_freq=2, latents=latents, output_type="latent").images
    expected = reference_syncdiffusion(pipe, "a lake", latents, steps=3, stride=4, sync_weight=30.0, sync_thres=3, sync_decay_rate=0.5, sync_freq=2)
    torch.testing.assert_close(ours, expected, **TOLERANCE)


def test_one_update_lowers_the_distance_to_the_anchor(sync_step):
    """The mechanism: a gradient step on a view's latent brings its predicted image closer to the anchor's."""
    step = sync_step
    pipe, sync = step.pipe, step.pipe._sync_settings()  # the exact mode
    with torch.no_grad():
        anchor = pipe.prepare_anchor(step.latents, step.views[1], step.t, step.conditioning, sync)
        view = pipe.get_view_latents(step.latents, [step.views[0]])
        updated, _ = pipe.synchronize_views(view, anchor["images"], step.t, 2.0, step.conditioning, sync)
        before = pipe.perceptual_distance(step.predicted_image(view), anchor["images"]).item()
        after = pipe.perceptual_distance(step.predicted_image(updated), anchor["images"]).item()
    assert (updated - view).abs().max() > 0
    assert after < before


SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}


@torch.no_grad()
@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_every_scheduler_synchronizes_and_stays_finite(pipe, name, prediction_type):
    pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config, prediction_type=prediction_type)
    kwargs = {"num_inference_steps": 4, "stride": 4, "sync_thres": 2, "output_type": "np", "view_batch_size": 2}
    synced = pipe("a mountain", **SHAPE, **kwargs, generator=torch.Generator().manual_seed(0)).images
    plain = pipe("a mountain", **SHAPE, **kwargs, sync_weight=0, generator=torch.Generator().manual_seed(0)).images
    assert synced.shape == (1, 64, 128, 3) and np.isfinite(synced).all()
    assert np.abs(synced - plain).max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("name", ["ddim", "euler", "euler_ancestral"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_clean_latent_equals_the_schedulers_own_prediction(pipe, name, prediction_type):
    """`predict_clean_latents` equals `step(...).pred_original_sample` where the scheduler reports it."""
    if (name, prediction_type) == ("euler_ancestral", "sample"):
        pytest.skip("EulerAncestralDiscreteScheduler does not implement prediction_type='sample'")
    scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config, prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    pipe.scheduler = scheduler
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for t in scheduler.timesteps[:3]:
        model_input = scheduler.scale_model_input(latents, t)
        state = copy.deepcopy(scheduler.__dict__)
        ours = pipe.predict_clean_latents(model_input, noise, t)
        assert scheduler.__dict__.keys() == state.keys()
        assert getattr(scheduler, "_step_index", None) == state.get("_step_index")  # not advanced
        output = scheduler.step(noise, t, latents, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(ours, output.pred_original_sample, atol=1e-5, rtol=1e-5)
        latents = output.prev_sample


@torch.no_grad()
@pytest.mark.parametrize("name", ["dpmsolver++", "unipc"])
def test_clean_latent_matches_multistep_schedulers_without_advancing_them(pipe, name):
    """DPM-Solver and UniPC do not report x0; compare with their own `convert_model_output` and check the state."""
    scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)
    pipe.scheduler = scheduler
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for t in scheduler.timesteps[:3]:
        step_index, outputs = scheduler.step_index, [o for o in scheduler.model_outputs]
        ours = pipe.predict_clean_latents(scheduler.scale_model_input(latents, t), noise, t)
        assert scheduler.step_index == step_index
        assert all((a is None and b is None) or a is b for a, b in zip(outputs, scheduler.model_outputs))
        if scheduler.step_index is None:
            scheduler._init_step_index(t)
        expected = scheduler.convert_model_output(noise, sample=latents)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
        latents = scheduler.step(noise, t, latents).prev_sample
