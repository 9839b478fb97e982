"""Synchronization on: the pipeline against the plain loop of docs/algorithm.md (tests/reference_loop.py), and the
mechanism itself. Every scheduler against the same loop: test_schedulers.py."""

import copy

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from reference_loop import (
    assert_trajectories_match,
    for_reference_comparison,
    pipeline_trajectory,
    reference_syncdiffusion,
)

from pipeline_syncdiffusion import SyncSettings, crop_views


pytestmark = pytest.mark.usefixtures("one_thread")

# 64x128 pixels: 8x16 latents, 8-latent views at stride 4 -> 3 views, the middle one is the anchor.
SHAPE = {"height": 64, "width": 128}
SYNC = {"stride": 4, "sync_weight": 20.0, "sync_thres": 2}


def float64_latents(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def compare_with_reference(pipe, prompt, latents, steps, view_batch_size=1, circular=False, **sync):
    """Pipeline and reference loop in float64, step by step (see reference_loop.RELATIVE_TOLERANCE); returns the
    pipeline's final latents."""
    for_reference_comparison(pipe)
    sync = {**SYNC, **sync}
    height, width = latents.shape[-2] * 8, latents.shape[-1] * 8
    ours = pipeline_trajectory(
        pipe,
        prompt,
        latents,
        height=height,
        width=width,
        num_inference_steps=steps,
        circular_padding=circular,
        view_batch_size=view_batch_size,
        **sync,
    )
    expected = []
    reference_syncdiffusion(pipe, prompt, latents, steps, circular=circular, trajectory=expected, **sync)
    assert_trajectories_match(ours, expected)
    return ours[-1]


def assert_synchronization_acted(pipe, prompt, latents, synced, **call):
    """The result is not MultiDiffusion's: synchronization moved it far beyond the tolerance."""
    plain = pipe(prompt, latents=latents, sync_weight=0.0, output_type="latent", **call).images
    assert ((synced - plain).abs().max() / plain.abs().max()).item() > 1e-3


@pytest.mark.parametrize("view_batch_size", [1, 3])
def test_matches_reference_loop(pipe, view_batch_size):
    latents = float64_latents((1, 4, 8, 16), 0)
    ours = compare_with_reference(pipe, "a photo of a forest", latents, 3, view_batch_size=view_batch_size)
    assert_synchronization_acted(pipe, "a photo of a forest", latents, ours, **SHAPE, num_inference_steps=3, stride=4)


@pytest.mark.parametrize(
    "height, width, circular",
    [(128, 64, False), (96, 96, False), (64, 96, True), (96, 96, True)],
    ids=["tall_3_rows", "grid_2x2", "circular_wraps", "circular_2_rows"],
)
def test_tall_grid_and_circular_panoramas_match_reference_loop(pipe, height, width, circular):
    latents = float64_latents((1, 4, height // 8, width // 8), 2)
    ours = compare_with_reference(pipe, "a waterfall", latents, 2, circular=circular)
    assert_synchronization_acted(
        pipe,
        "a waterfall",
        latents,
        ours,
        height=height,
        width=width,
        circular_padding=circular,
        num_inference_steps=2,
        stride=4,
    )


def test_two_prompts_each_have_their_own_anchor(pipe):
    prompts = ["a photo of a forest", "a city at night"]
    latents = float64_latents((2, 4, 8, 16), 3)
    for_reference_comparison(pipe)
    ours = pipeline_trajectory(pipe, prompts, latents, **SHAPE, **SYNC, num_inference_steps=2, view_batch_size=2)
    for k, prompt in enumerate(prompts):
        expected = []
        reference_syncdiffusion(pipe, prompt, latents[k : k + 1], 2, trajectory=expected, **SYNC)
        assert_trajectories_match([step[k : k + 1] for step in ours], expected)


def test_sync_freq_and_decay_follow_the_schedule(pipe):
    """Synchronized at steps 1 and 3 (0-based; `sync_freq=2`) with weights 15 and 3.75 (`sync_decay_rate=0.5`)."""
    latents = float64_latents((1, 4, 8, 16), 4)
    compare_with_reference(
        pipe, "a lake", latents, 4, sync_weight=30.0, sync_thres=4, sync_decay_rate=0.5, sync_freq=2
    )


def test_guidance_rescale_matches_rescale_noise_cfg_in_the_reference(pipe):
    """`guidance_rescale` is diffusers' `rescale_noise_cfg` on every guided prediction, the gradient pass's too."""
    latents = float64_latents((1, 4, 8, 16), 6)
    ours = compare_with_reference(pipe, "a beach", latents, 2, guidance_rescale=0.7)
    without = pipe("a beach", latents=latents, **SHAPE, **SYNC, num_inference_steps=2, output_type="latent").images
    assert ((ours - without).abs().max() / without.abs().max()).item() > 1e-3


@torch.no_grad()
def test_view_batching_changes_nothing(pipe):
    """In float64 (smooth loss) batching changes nothing at all: measured 0.0 for 2, 3 and "auto" views per batch,
    on 1 and 2 threads. A 1% weight error at the second synchronized step alone moves the latents by 7.6e-5."""
    for_reference_comparison(pipe)
    latents = float64_latents((1, 4, 8, 16), 0)
    call = {**SHAPE, **SYNC, "num_inference_steps": 3}
    one = pipeline_trajectory(pipe, "a photo of a forest", latents, view_batch_size=1, **call)
    for view_batch_size in (2, 3, "auto"):
        batched = pipeline_trajectory(pipe, "a photo of a forest", latents, view_batch_size=view_batch_size, **call)
        assert_trajectories_match(batched, one)
    wrong = pipeline_trajectory(
        pipe, "a photo of a forest", latents, view_batch_size=3, **call, sync_decay_rate=0.9405
    )
    with pytest.raises(AssertionError):
        assert_trajectories_match(wrong, one)


# Batched and unbatched float32 kernels round differently, and LPIPS on a random VGG amplifies it: measured
# 6e-8 (2 views a batch), 1.3e-6..1.5e-6 ("auto"), 2.5e-6 (3, one thread) and 1.4e-5 (3, two threads) of the
# largest latent on an AMD EPYC, 2.7e-5 on CI's. 1e-4 leaves 3.6x over the worst; a 1% sync weight error gives 2.4e-4.
FLOAT32_BATCHING_TOLERANCE = 1e-4


def test_view_batching_changes_nothing_in_float32(pipe):
    """What users run: float32 with LPIPS, 3 views a batch against one (3 steps, 2 synchronized, DDIM)."""
    latents = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(0))
    call = {**SHAPE, **SYNC, "num_inference_steps": 3}
    one = pipeline_trajectory(pipe, "a photo of a forest", latents, view_batch_size=1, **call)
    three = pipeline_trajectory(pipe, "a photo of a forest", latents, view_batch_size=3, **call)
    assert_trajectories_match(three, one, tolerance=FLOAT32_BATCHING_TOLERANCE)
    wrong = pipeline_trajectory(
        pipe, "a photo of a forest", latents, view_batch_size=3, **{**call, "sync_weight": 20.2}
    )
    with pytest.raises(AssertionError):
        assert_trajectories_match(wrong, one, tolerance=FLOAT32_BATCHING_TOLERANCE)


def test_one_update_lowers_the_distance_to_the_anchor(sync_step):
    """The mechanism: a gradient step on a view's latent brings its predicted image closer to the anchor's."""
    step = sync_step
    pipe, sync = step.pipe, SyncSettings()  # the exact mode
    with torch.no_grad():
        anchor = pipe.prepare_anchor(step.latents, step.views[1], step.t, step.conditioning, sync)
        view = crop_views(step.latents, [step.views[0]])
        updated, _ = pipe.synchronize_views(
            view, step.views[:1], anchor["images"], step.t, 2.0, step.conditioning, sync
        )
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
        step_index, outputs = scheduler.step_index, list(scheduler.model_outputs)
        ours = pipe.predict_clean_latents(scheduler.scale_model_input(latents, t), noise, t)
        assert scheduler.step_index == step_index
        assert all((a is None and b is None) or a is b for a, b in zip(outputs, scheduler.model_outputs))
        if scheduler.step_index is None:
            scheduler._init_step_index(t)
        expected = scheduler.convert_model_output(noise, sample=latents)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
        latents = scheduler.step(noise, t, latents).prev_sample
