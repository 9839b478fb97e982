"""Every scheduler the pipeline accepts, synchronized, against the plain reference loop (tests/reference_loop.py).

Second-order schedulers (Heun, KDPM2, KDPM2-Ancestral) evaluate the UNet twice per step; synchronization acts on
a step's first evaluation only and `sync_thres`, `sync_freq` and the decay count real steps (docs/algorithm.md).
"""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from reference_loop import (
    assert_trajectories_match,
    for_reference_comparison,
    pipeline_trajectory,
    reference_syncdiffusion,
)


pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
    "dpmsolver++_2m": (DPMSolverMultistepScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "kdpm2": (KDPM2DiscreteScheduler, {}),
    "kdpm2_ancestral": (KDPM2AncestralDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),  # Stable Diffusion's own scheduler config (PLMS)
}
# PNDM (PLMS) evaluates its first timestep twice and rebuilds the second evaluation from the sample it stored at the
# first, like a second-order correction, although its `order` is 1: the pipeline synchronizes on the first only.

PROMPT = "a photo of a forest"
# 64x96 pixels: 8x12 latents, 8-latent views at stride 4 -> 2 views, the second is the anchor. 3 steps, the first
# 2 synchronized (weights 20 and 19).
CALL = {"height": 64, "width": 96, "stride": 4, "num_inference_steps": 3, "sync_weight": 20.0, "sync_thres": 2}
LATENTS = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture
def pipe(pipe):
    return for_reference_comparison(pipe)  # see reference_loop.RELATIVE_TOLERANCE


def scheduler_for(pipe, name, prediction_type="epsilon"):
    cls, options = SCHEDULERS[name]
    return cls.from_config(pipe.scheduler.config, prediction_type=prediction_type, **options)


def pipeline_steps(pipe, **kwargs):
    """The pipeline's latents after every evaluation."""
    return pipeline_trajectory(pipe, PROMPT, LATENTS, generator=torch.Generator().manual_seed(7), **{**CALL, **kwargs})


def reference_trajectory(pipe, **kwargs):
    call = {**CALL, **kwargs}
    steps = []
    reference_syncdiffusion(
        pipe,
        PROMPT,
        LATENTS,
        steps=call.pop("num_inference_steps"),
        generator=torch.Generator().manual_seed(7),
        trajectory=steps,
        **{k: v for k, v in call.items() if k not in ("height", "width")},
    )
    return steps


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_matches_the_reference_loop(pipe, name):
    pipe.scheduler = scheduler_for(pipe, name)
    expected = reference_trajectory(pipe, scheduler=pipe.scheduler)
    try:
        ours = pipeline_steps(pipe)
    except ValueError as error:
        # PNDM's second PLMS evaluation rebuilds from a stored sample; refusing it with a clear error is allowed.
        assert name == "pndm" and "PNDMScheduler" in str(error)
        return
    assert_trajectories_match(ours, expected)
    # Synchronization acted, far above the tolerance.
    plain = pipeline_steps(pipe, sync_weight=0.0)[-1]
    assert ((ours[-1] - plain).abs().max() / plain.abs().max()).item() > 1e-3


@pytest.mark.parametrize("name", ["ddim", "euler", "heun"])
def test_v_prediction_matches_the_reference_loop(pipe, name):
    pipe.scheduler = scheduler_for(pipe, name, prediction_type="v_prediction")
    assert_trajectories_match(pipeline_steps(pipe), reference_trajectory(pipe, scheduler=pipe.scheduler))


def test_second_order_sync_freq_and_decay_count_real_steps(pipe):
    """Heun, 4 real steps (7 evaluations): synchronized at real steps 1 and 3 (`sync_freq=2`, 0-based), with
    weights 10 and 2.5 (`sync_decay_rate=0.5`)."""
    pipe.scheduler = scheduler_for(pipe, "heun")
    schedule = {"num_inference_steps": 4, "sync_thres": 4, "sync_freq": 2, "sync_decay_rate": 0.5, "sync_weight": 20.0}
    expected = reference_trajectory(pipe, scheduler=pipe.scheduler, **schedule)
    assert_trajectories_match(pipeline_steps(pipe, **schedule), expected)


def test_tolerance_catches_a_wrong_weight_at_one_step(pipe):
    """The reference with weight 20 instead of 19 at the second synchronized step fails the comparison
    (KDPM2-Ancestral, where such an error is smallest)."""
    pipe.scheduler = scheduler_for(pipe, "kdpm2_ancestral")
    right = reference_trajectory(pipe, scheduler=pipe.scheduler)
    wrong = reference_trajectory(
        pipe, scheduler=pipe.scheduler, weight_at=lambda step: 20.0 if step == 1 else 20.0 * 0.95**step
    )
    with pytest.raises(AssertionError, match="evaluation 2"):  # the first evaluation of the second real step
        assert_trajectories_match(wrong, right)
