"""Region prompts (MultiDiffusion's region-based generation) in every pipeline class: against a region loop written
after MultiDiffusion's `region_based.py` (`tests/region_reference.py`) with each model's own prediction, invariants
with synchronization on, the path without regions, bootstrapping, pass counts, mask forms and bad input.

Tiny random components, DDIM for the UNet classes. The reference comparisons run 64x160-pixel panoramas (8x20
latents, 8-latent views at stride 4: 4 views) with two regions, a hard left block and a soft ramp over the top rows,
overlapping (there the background's weight is clamped to 0): the views hold the prompts {0, 1, 2}, {0, 1, 2}, {0, 2}
and {0} (0 is the background). The synchronized invariants run the contract tests' 64x128 panorama (3 views)."""

import copy
import logging
import re

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

from syncdiffusion_utils.counting import PassCounter, StepRecorder
from tests.contract_pipelines import KINDS, pipeline_models
from tests.flux_reference import image_ids, pack, shifted_sigmas, timestep_shift, unpack
from tests.reference_loop import view_starts
from tests.region_reference import latent_masks, prompt_weights, region_multidiffusion


pytestmark = pytest.mark.usefixtures("one_thread")

HEIGHT, WIDTH, STRIDE, WINDOW, FACTOR = 64, 160, 4, 8, 8
PANORAMA = {"height": HEIGHT, "width": WIDTH, "stride": STRIDE}
BACKGROUND = "a photo of a valley"
REGION_PROMPTS = ["a red barn", "a blue lake"]

# The reference's tolerance per class, relative to a step's largest latent. Measured in float32 (the pipelines batch
# each prompt's views into one call and pool the masks with avg_pool2d): the largest difference from the reference
# over 3 steps without and with bootstrapping, and the smallest a 1% error in one prompt's weight makes in 2 steps:
#   SD          4.0e-7, 5.4e-7     4.9e-4
#   SDXL        3.6e-6, 3.8e-6     5.7e-4
#   ControlNet  3.4e-7, 5.5e-7     4.1e-4
#   FLUX        1.8e-7, 1.4e-7     3.8e-5
# Each bound is 8x to 18x above its class's noise and 19x to 49x below the error it must catch
# (test_a_one_percent_weight_error_fails checks that it fails by 10x).
TOLERANCES = {"sd": 1e-5, "sdxl": 3e-5, "controlnet": 1e-5, "flux": 2e-6}


# The classes whose `__call__` takes region prompts.
REGION_KINDS = ["sd", "sdxl", "controlnet", "flux"]
# Views of 64 pixels on a 64x128 panorama at stride 4: 3 views, every step synchronized.
SMALL_MASK_SIZE = (64, 128)


def kind_pipeline(name, components_cache, lpips_module):
    kind = KINDS[name]
    pipe = kind.build(components_cache, lpips_module)
    if kind.denoiser == "unet":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return kind, pipe


def region_masks():
    """Region 1: the left 60 pixel columns (latent column 7 half covered). Region 2: a ramp from 0.2 to 1 over
    columns 40..89 of the top 36 rows (latent row 4 half covered), overlapping region 1."""
    left = torch.zeros(HEIGHT, WIDTH)
    left[:, :60] = 1
    ramp = torch.zeros(HEIGHT, WIDTH)
    ramp[:36, 40:90] = torch.linspace(0.2, 1, 50)
    return torch.stack([left, ramp])


def starting_latents(seed=3, channels=4):
    return torch.randn(1, channels, HEIGHT // FACTOR, WIDTH // FACTOR, generator=torch.Generator().manual_seed(seed))


def views():
    return [(0, column) for column in view_starts(WIDTH // FACTOR, WINDOW, STRIDE, False)]


def prompts_in_views(masks):
    """The prompts (0 the background) whose weight is nonzero somewhere in each view, from the masks alone."""
    weights = prompt_weights(latent_masks(masks, FACTOR))
    return [
        [p for p in range(len(weights)) if weights[p, row : row + WINDOW, column : column + WINDOW].any()]
        for row, column in views()
    ]


def relative_errors(ours, expected):
    """Per step, the largest difference over the step's largest latent."""
    assert len(ours) == len(expected)
    return [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, expected)]


def trajectory_of(pipe, latents, **call):
    """The pipeline's latents after every step, as `callback_on_step_end` sees them (FLUX's unpacked)."""
    trajectory = []

    def record(pipeline, step, timestep, tensors):
        trajectory.append(tensors["latents"].clone())
        return {}

    call = {"prompt": BACKGROUND, **PANORAMA, "output_type": "latent", **call}
    pipe(latents=latents, callback_on_step_end=record, **call)
    if trajectory[0].ndim == 3:  # FLUX's packed latents
        trajectory = [unpack(z, HEIGHT // FACTOR, WIDTH // FACTOR) for z in trajectory]
    return trajectory


# ----------------------------------------------------------------------------------------------------------------
# The reference: MultiDiffusion's region loop, with each model's own guided prediction
# ----------------------------------------------------------------------------------------------------------------


def sd_predict(pipe, prompts, call, negative_prompts=None):
    """`predict(view_latents, t, prompt, view)`: the UNet's classifier-free guided noise for `prompts[prompt]`
    (negative prompt `negative_prompts[prompt]`, by default ""), the UNet seeing `[uncond, cond]` as
    `region_based.py` does."""
    embeds = []
    for prompt, negative_prompt in zip(prompts, negative_prompts or [None] * len(prompts)):
        positive, negative = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt)
        embeds.append(torch.cat([negative, positive]))

    def predict(view_latents, t, prompt, view):
        model_input = torch.cat([view_latents, view_latents])
        uncond, cond = pipe.unet(model_input, t, encoder_hidden_states=embeds[prompt]).sample.chunk(2)
        return uncond + call["guidance_scale"] * (cond - uncond)

    return predict


def sdxl_predict(pipe, prompts, call):
    """SDXL's guided noise: both text encoders' embeddings, the pooled ones, and the micro-conditioning of one
    view-sized image, written out: time ids `(64, 64, 0, 0, 64, 64)`."""
    embeds, pooled = [], []
    for prompt in prompts:
        positive, negative, positive_pooled, negative_pooled = pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1
        )
        embeds.append(torch.cat([negative, positive]))
        pooled.append(torch.cat([negative_pooled, positive_pooled]))
    view_pixels = float(WINDOW * FACTOR)
    time_ids = torch.tensor([[view_pixels, view_pixels, 0.0, 0.0, view_pixels, view_pixels]] * 2)

    def predict(view_latents, t, prompt, view):
        added = {"text_embeds": pooled[prompt], "time_ids": time_ids}
        model_input = torch.cat([view_latents, view_latents])
        noise = pipe.unet(model_input, t, encoder_hidden_states=embeds[prompt], added_cond_kwargs=added).sample
        uncond, cond = noise.chunk(2)
        return uncond + call["guidance_scale"] * (cond - uncond)

    return predict


def controlnet_predict(pipe, prompts, call):
    """The UNet's guided noise with the ControlNet's residuals of the view's crop of the condition image; the
    ControlNet sees the prompt's own embeddings."""
    embeds = []
    for prompt in prompts:
        positive, negative = pipe.encode_prompt(prompt, "cpu", 1, True)
        embeds.append(torch.cat([negative, positive]))
    condition = call["image"]

    def predict(view_latents, t, prompt, view):
        row, column = view
        crop = condition[:, :, FACTOR * row : FACTOR * (row + WINDOW), FACTOR * column : FACTOR * (column + WINDOW)]
        model_input = torch.cat([view_latents, view_latents])
        down, mid = pipe.controlnet(
            model_input,
            t,
            encoder_hidden_states=embeds[prompt],
            controlnet_cond=torch.cat([crop, crop]),
            conditioning_scale=1.0,
            return_dict=False,
        )
        noise = pipe.unet(
            model_input,
            t,
            encoder_hidden_states=embeds[prompt],
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        uncond, cond = noise.chunk(2)
        return uncond + call["guidance_scale"] * (cond - uncond)

    return predict


def flux_predict(pipe, prompts, call):
    """FLUX's velocity of one view: packed alone in 2x2 patches with a view-sized image's ids, the guidance
    embedded (no true CFG)."""
    texts = [pipe.encode_prompt(prompt, max_sequence_length=call["max_sequence_length"]) for prompt in prompts]
    ids = image_ids(WINDOW, WINDOW, torch.float32)
    guidance = torch.full((1,), call["guidance_scale"])

    def predict(view_latents, t, prompt, view):
        embeds, pooled, text_ids = texts[prompt]
        velocity = pipe.transformer(
            hidden_states=pack(view_latents),
            timestep=t.expand(1) / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=ids,
            return_dict=False,
        )[0]
        return unpack(velocity, WINDOW, WINDOW)

    return predict


def ddim_schedule(pipe, steps):
    """DDIM's timesteps, step and forward noising, from a copy of the pipeline's scheduler."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    return {
        "timesteps": scheduler.timesteps,
        "step": lambda output, t, view_latents: scheduler.step(output, t, view_latents).prev_sample,
        "noised": lambda clean, noise, t: scheduler.add_noise(clean, noise, t.reshape(1)),
    }


def flow_schedule(pipe, steps):
    """FLUX's shifted sigmas (shifted by the window's token count), the Euler step `z + (sigma' - sigma) v` and the
    forward noising `sigma * noise + (1 - sigma) * x`, written out."""
    sigmas, timesteps = shifted_sigmas(
        pipe.scheduler, steps, timestep_shift((WINDOW // 2) ** 2, pipe.scheduler.config)
    )
    index = {float(t): i for i, t in enumerate(timesteps)}

    def step(velocity, t, view_latents):
        i = index[float(t)]
        return view_latents + (sigmas[i + 1] - sigmas[i]) * velocity

    def noised(clean, noise, t):
        sigma = sigmas[index[float(t)]]
        return sigma * noise + (1 - sigma) * clean

    return {"timesteps": timesteps, "step": step, "noised": noised}


def vae_encoder(pipe):
    """`encode(images, generator)`: a posterior sample of the VAE, scaled (and shifted) as the model's latents."""
    config = pipe.vae.config
    shift = config.get("shift_factor") or 0.0

    def encode(images, generator):
        return (pipe.vae.encode(images).latent_dist.sample(generator) - shift) * config.scaling_factor

    return encode


# name: (model output, schedule, latent channels, guidance of the calls)
REFERENCE_MODELS = {
    "sd": (sd_predict, ddim_schedule, 4, 7.5),
    "sdxl": (sdxl_predict, ddim_schedule, 4, 5.0),
    "controlnet": (controlnet_predict, ddim_schedule, 4, 7.5),
    "flux": (flux_predict, flow_schedule, 16, 3.5),
}


def region_call(bootstrap_steps, steps=3, seed=0, **call):
    """The arguments of an unsynchronized call with the two regions."""
    return {
        "num_inference_steps": steps,
        "sync_weight": 0,
        "region_prompts": REGION_PROMPTS,
        "region_masks": list(region_masks()),
        "region_bootstrap_steps": bootstrap_steps,
        "generator": torch.Generator().manual_seed(seed),
        **call,
    }


class ReferenceComparison:
    """One class's pipeline on the regions, and the reference loop with that class's model functions."""

    def __init__(self, name, components_cache, lpips_module):
        self.kind, self.pipe = kind_pipeline(name, components_cache, lpips_module)
        self.tolerance = TOLERANCES[name]
        predict, schedule, channels, guidance = REFERENCE_MODELS[name]
        self.call = self.kind.call_arguments(**PANORAMA, prompt=BACKGROUND, guidance_scale=guidance)
        self.predict = predict(self.pipe, [BACKGROUND, *REGION_PROMPTS], self.call)
        self.schedule, self.channels = schedule, channels
        self.latents = starting_latents(channels=channels)

    def pipeline(self, bootstrap_steps, steps=3):
        return trajectory_of(self.pipe, self.latents, **{**self.call, **region_call(bootstrap_steps, steps)})

    def reference(self, bootstrap_steps, steps=3, seed=0, weight_scale=None, masks=None):
        trajectory = []
        region_multidiffusion(
            self.latents,
            views=views(),
            window=WINDOW,
            masks=region_masks() if masks is None else masks,
            factor=FACTOR,
            predict=self.predict,
            encode=vae_encoder(self.pipe),
            bootstrap_steps=bootstrap_steps,
            generator=torch.Generator().manual_seed(seed),
            weight_scale=weight_scale,
            trajectory=trajectory,
            **self.schedule(self.pipe, steps),
        )
        return trajectory


@pytest.fixture
def comparison(request, components_cache, lpips_module):
    return ReferenceComparison(request.param, components_cache, lpips_module)


REFERENCE_CASES = [(name, steps) for name in REGION_KINDS for steps in (0, 2)]


@pytest.mark.parametrize(
    "comparison, bootstrap_steps",
    REFERENCE_CASES,
    ids=[f"{name}-{'bootstrapping' if steps else 'no_bootstrapping'}" for name, steps in REFERENCE_CASES],
    indirect=["comparison"],
)
def test_equals_multidiffusion_region_loop(comparison, bootstrap_steps):
    errors = relative_errors(comparison.pipeline(bootstrap_steps), comparison.reference(bootstrap_steps))
    assert max(errors) < comparison.tolerance, errors


@pytest.mark.parametrize("comparison", ["sd"], indirect=True)
def test_region_negative_prompts_default_to_the_calls(comparison):
    """A region's negative prompt guides its own predictions; a region without one (None) takes `negative_prompt`,
    not the empty one."""
    comparison.call.update(negative_prompt="dark", region_negative_prompts=["blurry", None])
    ours = comparison.pipeline(0)
    prompts = [BACKGROUND, *REGION_PROMPTS]
    for negatives, close in ((["dark", "blurry", "dark"], True), (["dark", "blurry", ""], False)):
        comparison.predict = sd_predict(comparison.pipe, prompts, comparison.call, negatives)
        error = max(relative_errors(ours, comparison.reference(0)))
        assert error < comparison.tolerance if close else error > 10 * comparison.tolerance, (negatives, error)


@pytest.mark.parametrize("comparison", REGION_KINDS, indirect=True)
def test_a_one_percent_weight_error_fails(comparison):
    """The tolerance catches any one prompt's weight 1% off."""
    ours = comparison.pipeline(0, steps=2)
    for prompt in range(1 + len(REGION_PROMPTS)):
        wrong = comparison.reference(0, steps=2, weight_scale=(prompt, 1.01))
        assert max(relative_errors(ours, wrong)) > 10 * comparison.tolerance, prompt


@pytest.mark.parametrize("comparison", REGION_KINDS, indirect=True)
def test_other_bootstrapping_draws_fail(comparison):
    """The tolerance catches bootstrapping with other draws (the reference given the call's generator seeded 1, not
    0: measured 2.6e-2 to 1.8e-1)."""
    other_draws = comparison.reference(2, seed=1)
    assert max(relative_errors(comparison.pipeline(2), other_draws)) > 10 * comparison.tolerance


# ----------------------------------------------------------------------------------------------------------------
# Invariants with synchronization on (exact mode, the default weight), for every pipeline class
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synchronized_plain(components_cache, lpips_module):
    """`synchronized_plain(name)`: the class's panorama without regions, synchronized by default (exact mode, the
    default weight: LPIPS runs), made once per module."""
    panoramas = {}

    def plain(name):
        if name not in panoramas:
            kind, pipe = kind_pipeline(name, components_cache, lpips_module)
            with PassCounter(pipe) as counter:
                panoramas[name] = kind.images(pipe)
            assert counter.lpips_fwd > 0
        return panoramas[name]

    return plain


@pytest.mark.parametrize("name", REGION_KINDS)
def test_synchronized_region_with_an_empty_mask_changes_nothing(
    name, components_cache, lpips_module, synchronized_plain, caplog
):
    """A region whose mask is all zero covers no latent pixel: a warning says so, and the panorama is the one
    without it, bit for bit (only the background is denoised, the bootstrapping draws change nothing)."""
    kind, pipe = kind_pipeline(name, components_cache, lpips_module)
    plain = synchronized_plain(name)
    with caplog.at_level(logging.WARNING):
        empty = kind.images(pipe, region_prompts=["a red barn"], region_masks=[torch.zeros(SMALL_MASK_SIZE)])
    assert torch.equal(empty, plain)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("`region_masks[0]` covers no latent pixel" in message for message in warnings), warnings


@pytest.mark.parametrize("name", REGION_KINDS)
def test_synchronized_region_everywhere_with_the_background_prompt_changes_nothing(
    name, components_cache, lpips_module, synchronized_plain
):
    """A region covering the whole panorama with the background's own prompt leaves the background no weight, and
    its prompt denoises every view as the background would (bootstrapping included: the mask leaves no outside);
    with another prompt it changes the panorama."""
    kind, pipe = kind_pipeline(name, components_cache, lpips_module)
    plain = synchronized_plain(name)
    everywhere = {"region_masks": [torch.ones(SMALL_MASK_SIZE)]}
    same = kind.images(pipe, region_prompts=[kind.call_arguments()["prompt"]], **everywhere)
    # Measured: 0 (bit for bit) for every class.
    assert (same - plain).abs().max() <= 1e-6 * plain.abs().max()
    other = kind.images(pipe, region_prompts=["a red barn"], **everywhere)
    assert (other - plain).abs().max() > 1e-2 * plain.abs().max()


@pytest.mark.parametrize(
    "scheduler, call",
    [(DDIMScheduler, {"eta": 0.5}), (EulerAncestralDiscreteScheduler, {})],
    ids=["ddim_eta", "euler_a"],
)
def test_an_empty_region_changes_nothing_with_a_stochastic_scheduler(pipe, scheduler, call):
    """Bootstrapping draws from a generator of its own: the starting latents and the step noise a stochastic
    scheduler draws from the call's generator are those of the call without regions, bit for bit."""
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)

    def run(**region):
        generator = torch.Generator().manual_seed(0)
        call_arguments = {**PANORAMA, "num_inference_steps": 2, "sync_weight": 0, "output_type": "latent", **call}
        return pipe(BACKGROUND, generator=generator, **call_arguments, **region).images

    empty = {
        "region_prompts": ["a red barn"],
        "region_masks": [torch.zeros(HEIGHT, WIDTH)],
        "region_bootstrap_steps": 2,
    }
    assert torch.equal(run(**empty), run())


# ----------------------------------------------------------------------------------------------------------------
# Without regions: the default path
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("comparison", ["sd"], indirect=True)
def test_without_regions_the_panorama_is_the_plain_one(comparison, monkeypatch):
    """`region_prompts=None` (and every region argument None) is the call without them, bit for bit, synchronized,
    and prepares no regions; unsynchronized it is MultiDiffusion (the reference with no region), whose equality with
    diffusers' `StableDiffusionPanoramaPipeline` tests/test_panorama_parity.py checks."""
    pipe, latents = comparison.pipe, comparison.latents

    def no_regions(*args, **kwargs):
        raise AssertionError("regions were prepared for a call without region prompts")

    plain = trajectory_of(pipe, latents, num_inference_steps=1)
    monkeypatch.setattr(pipe, "prepare_regions", no_regions)
    nothing = {
        "region_prompts": None,
        "region_masks": None,
        "region_negative_prompts": None,
        "region_bootstrap_steps": None,
    }
    assert torch.equal(trajectory_of(pipe, latents, num_inference_steps=1, **nothing)[0], plain[0])
    multidiffusion = trajectory_of(pipe, latents, num_inference_steps=3, sync_weight=0, **nothing)
    errors = relative_errors(multidiffusion, comparison.reference(0, masks=torch.zeros(0, HEIGHT, WIDTH)))
    assert max(errors) < comparison.tolerance, errors


# ----------------------------------------------------------------------------------------------------------------
# Bootstrapping
# ----------------------------------------------------------------------------------------------------------------


def region_latents(pipe, bootstrap_steps, seed=0, steps=3, **call):
    """The final latents of an unsynchronized region call (`call` over `region_call`'s arguments)."""
    arguments = {**region_call(bootstrap_steps, steps=steps, seed=seed), **call}
    return pipe(BACKGROUND, **PANORAMA, latents=starting_latents(), output_type="latent", **arguments).images


def test_bootstrapping_draws_from_the_generator(pipe):
    """The same seed gives the same panorama, another seed another one; without bootstrapping nothing is drawn (the
    starting latents are given and DDIM's step draws no noise), so the seed changes nothing."""
    first = region_latents(pipe, 2, seed=0)
    assert torch.equal(region_latents(pipe, 2, seed=0), first)
    assert (region_latents(pipe, 2, seed=1) - first).abs().max() > 1e-2 * first.abs().max()
    assert torch.equal(region_latents(pipe, 0, seed=1), region_latents(pipe, 0, seed=0))


def test_steps_past_bootstrapping_are_unaffected_by_it(pipe, monkeypatch):
    """Runs bootstrapped for 1 and 2 of 4 steps, their latents replaced by the same tensor after step 2, end equal
    bit for bit: a step past `region_bootstrap_steps` depends only on the latents it starts from. Bootstrapped for 3
    steps they do not. Backgrounds are encoded (one per bootstrapping step) before the first step and noised in the
    bootstrapping steps only."""
    replacement = starting_latents(seed=11)
    events = []  # ("step end", i), ("encode", None), ("noise", step) in call order
    encode_latents, add_noise = pipe.encode_latents, pipe.add_noise

    def record_encode(*args, **kwargs):
        events.append(("encode", None))
        return encode_latents(*args, **kwargs)

    def record_noise(*args, **kwargs):
        events.append(("noise", sum(kind == "step end" for kind, _ in events)))
        return add_noise(*args, **kwargs)

    def replace_after_second_step(pipeline, step, timestep, tensors):
        events.append(("step end", step))
        return {"latents": replacement.clone()} if step == 1 else {}

    monkeypatch.setattr(pipe, "encode_latents", record_encode)
    monkeypatch.setattr(pipe, "add_noise", record_noise)
    finals = {}
    for bootstrap_steps in (1, 2, 3):
        events.clear()
        finals[bootstrap_steps] = region_latents(
            pipe, bootstrap_steps, steps=4, callback_on_step_end=replace_after_second_step
        )
        first_step_end = events.index(("step end", 0))
        assert [kind for kind, _ in events[:first_step_end]].count("encode") == bootstrap_steps
        assert ("encode", None) not in events[first_step_end:]
        assert {step for kind, step in events if kind == "noise"} == set(range(bootstrap_steps))
    assert torch.equal(finals[1], finals[2])
    assert (finals[3] - finals[2]).abs().max() > 1e-3 * finals[2].abs().max()


# ----------------------------------------------------------------------------------------------------------------
# Pass counts: a view runs the prompts present in it
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("view_batch_size", [1, 4])
def test_passes_are_the_prompts_present_in_each_view(pipe, view_batch_size):
    """Per step, UNet view-passes sum over the views the prompts present there (9 here, against 4 views): a
    synchronized step runs each prompt of the anchor once and each prompt of the other views twice (gradient pass
    and denoising) with one backward, and decodes and compares one image per view as without regions."""
    present = [len(prompts) for prompts in prompts_in_views(region_masks())]
    assert present == [3, 3, 2, 1]
    anchor = len(present) // 2
    others = sum(present) - present[anchor]
    with PassCounter(pipe) as counter:
        with StepRecorder(pipe, counter) as recorder:
            region_latents(
                pipe,
                1,
                steps=2,
                sync_weight=20.0,
                sync_thres=1,
                view_batch_size=view_batch_size,
                callback_on_step_end=recorder,
            )
    synchronized, plain = recorder.step_counts
    assert {key: synchronized[key] for key in ("unet_fwd", "unet_bwd", "dec_fwd", "dec_bwd", "lpips_fwd")} == {
        "unet_fwd": present[anchor] + 2 * others,
        "unet_bwd": others,
        "dec_fwd": len(present),
        "dec_bwd": len(present) - 1,
        "lpips_fwd": len(present) - 1,
    }
    assert plain["unet_fwd"] == sum(present) and plain["unet_bwd"] == 0 and plain["dec_fwd"] == 0


# ----------------------------------------------------------------------------------------------------------------
# Masks: the accepted forms, and bad input
# ----------------------------------------------------------------------------------------------------------------


def test_every_mask_form_gives_the_same_panorama(pipe):
    """A PIL image (white = the region), a numpy array, a bool tensor and a tensor with leading size-1 dimensions
    are the same mask as the float tensor."""
    hard = region_masks()[0]
    forms = [
        PIL.Image.fromarray((hard.numpy() * 255).astype(np.uint8)),
        hard.numpy(),
        hard.bool(),
        hard[None, None],
    ]

    def run(mask):
        return region_latents(pipe, 1, steps=1, region_masks=[mask, region_masks()[1]])

    expected = run(hard)
    for form in forms:
        assert torch.equal(run(form), expected), type(form)


def bad(**region):
    """A region call with `region` over two valid regions."""
    return {"region_prompts": REGION_PROMPTS, "region_masks": list(region_masks()), **region}


def mask_with(value):
    mask = region_masks()[0].clone()
    mask[0, 0] = value
    return mask


BAD_INPUTS = [
    (bad(region_masks=[torch.ones(64, 96), region_masks()[1]]), "region_masks[0]", "64x96 pixels"),
    (bad(region_masks=[region_masks()[0], torch.ones(56, 160)]), "region_masks[1]", "the panorama is 64x160"),
    (bad(region_masks=[region_masks()[0]]), "region_masks", "has 1"),
    (bad(region_masks=list(region_masks()) * 2), "region_masks", "has 4"),
    (bad(region_masks=region_masks()), "region_masks", "Tensor"),
    (bad(region_masks=[mask_with(1.5), region_masks()[1]]), "region_masks[0]", r"\[0, 1\]"),
    (bad(region_masks=[mask_with(-0.1), region_masks()[1]]), "region_masks[0]", r"\[0, 1\]"),
    (bad(region_masks=[mask_with(float("nan")), region_masks()[1]]), "region_masks[0]", r"\[0, 1\]"),
    (bad(region_masks=[region_masks()[0], region_masks()[1].long()]), "region_masks[1]", "dtype"),
    (bad(region_masks=[region_masks(), region_masks()[1]]), "region_masks[0]", "shape"),
    (bad(region_masks=["left.png", region_masks()[1]]), "region_masks[0]", "PIL image"),
    (bad(region_bootstrap_steps=-1), "region_bootstrap_steps", r"0\.\.3"),
    (bad(region_bootstrap_steps=4), "region_bootstrap_steps", r"0\.\.3"),
    (bad(region_bootstrap_steps=1.0), "region_bootstrap_steps", "integer"),
    (bad(region_bootstrap_steps=True), "region_bootstrap_steps", "integer"),
    (bad(region_negative_prompts=["blurry"]), "region_negative_prompts", "one string"),
    (bad(region_negative_prompts="blurry"), "region_negative_prompts", "one string"),
    (bad(region_prompts=[]), "region_prompts", "non-empty list"),
    (bad(region_prompts="a red barn"), "region_prompts", "non-empty list"),
    ({"region_masks": list(region_masks())}, "region_masks", "needs `region_prompts`"),
    ({"region_negative_prompts": ["blurry"]}, "region_negative_prompts", "needs `region_prompts`"),
    ({"region_bootstrap_steps": 1}, "region_bootstrap_steps", "needs `region_prompts`"),
]


@pytest.mark.parametrize("name", REGION_KINDS)
def test_bad_region_input_is_one_line_naming_the_argument_before_any_model_runs(name, components_cache, lpips_module):
    kind = KINDS[name]
    pipe = kind.build(components_cache, lpips_module)

    def fail(*args, **kwargs):
        raise AssertionError("a model ran before the inputs were checked")

    for model in pipeline_models(pipe):
        model.register_forward_pre_hook(fail)
    for region, argument, detail in BAD_INPUTS:
        with pytest.raises(ValueError) as error:
            kind(pipe, **PANORAMA, num_inference_steps=3, **region)
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"`{argument}`"), message
        assert re.search(detail, message), message
