"""Region prompts (MultiDiffusion's region-based generation): the pipelines against a region loop written after
MultiDiffusion's `region_based.py` (`tests/region_reference.py`), invariants with synchronization on, bootstrapping,
pass counts and bad input.

Tiny random components; 64x160-pixel panoramas (8x20 latents, 8-latent views at stride 4: 4 views). The two regions
are a hard left block and a soft ramp over the top rows, overlapping (there the background's weight is clamped to
0): the views hold the prompts {0, 1, 2}, {0, 1, 2}, {0, 2} and {0} (0 is the background).
"""

import copy
import logging
import re

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler

from syncdiffusion_utils.counting import PassCounter, StepRecorder
from tests.contract_pipelines import KINDS
from tests.reference_loop import view_starts
from tests.region_reference import latent_masks, prompt_weights, region_multidiffusion


pytestmark = pytest.mark.usefixtures("one_thread")

HEIGHT, WIDTH, STRIDE, WINDOW, FACTOR = 64, 160, 4, 8, 8
PANORAMA = {"height": HEIGHT, "width": WIDTH, "stride": STRIDE}
BACKGROUND = "a photo of a valley"
REGION_PROMPTS = ["a red barn", "a blue lake"]
GUIDANCE = 7.5

# Measured (float32, 3 DDIM steps): the pipeline and the reference agree to 4.0e-7 of the largest latent without
# bootstrapping and to 1.4e-6 with it (the pipeline batches its UNet calls per prompt and pools the masks with
# avg_pool2d); one prompt's weight 1% off moves the reference by 4.2e-4 at least (the background's, after one step).
# 2e-5 lies between: 14x above the noise, 20x below that error (test_a_one_percent_weight_error_fails checks it).
TOLERANCE = 2e-5


def region_masks():
    """Region 1: the left 60 pixel columns (latent column 7 half covered). Region 2: a ramp from 0.2 to 1 over
    columns 40..89 of the top 36 rows (latent row 4 half covered), overlapping region 1."""
    left = torch.zeros(HEIGHT, WIDTH)
    left[:, :60] = 1
    ramp = torch.zeros(HEIGHT, WIDTH)
    ramp[:36, 40:90] = torch.linspace(0.2, 1, 50)
    return torch.stack([left, ramp])


def starting_latents(batch=1, seed=3):
    return torch.randn(batch, 4, HEIGHT // FACTOR, WIDTH // FACTOR, generator=torch.Generator().manual_seed(seed))


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
    """The pipeline's latents after every step, as `callback_on_step_end` sees them."""
    trajectory = []

    def record(pipeline, step, timestep, tensors):
        trajectory.append(tensors["latents"].clone())
        return {}

    pipe(BACKGROUND, **PANORAMA, latents=latents, output_type="latent", callback_on_step_end=record, **call)
    return trajectory


# ----------------------------------------------------------------------------------------------------------------
# The reference: MultiDiffusion's region loop, with each model's own guided prediction
# ----------------------------------------------------------------------------------------------------------------


def sd_predict(pipe, prompts):
    """`predict(view_latents, t, prompt)`: classifier-free guided noise of the UNet for `prompts[prompt]` (negative
    prompt ""), the UNet seeing `[uncond, cond]` as `region_based.py` does."""
    embeds = []
    for prompt in prompts:
        positive, negative = pipe.encode_prompt(prompt, "cpu", 1, True)
        embeds.append(torch.cat([negative, positive]))

    def predict(view_latents, t, prompt):
        model_input = torch.cat([view_latents, view_latents])
        uncond, cond = pipe.unet(model_input, t, encoder_hidden_states=embeds[prompt]).sample.chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    return predict


def reference_trajectory(pipe, predict, latents, steps, masks, bootstrap_steps=0, seed=0, weight_scale=None):
    """The reference's latents after every step, with a DDIM copy of the pipeline's scheduler and its VAE."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    vae = pipe.vae

    def encode(images, generator):
        return vae.encode(images).latent_dist.sample(generator) * vae.config.scaling_factor

    trajectory = []
    region_multidiffusion(
        latents * scheduler.init_noise_sigma,
        scheduler.timesteps,
        views(),
        WINDOW,
        masks,
        FACTOR,
        predict,
        step=lambda output, t, view_latents: scheduler.step(output, t, view_latents).prev_sample,
        noised=lambda clean, noise, t: scheduler.add_noise(clean, noise, t.reshape(1)),
        encode=encode,
        bootstrap_steps=bootstrap_steps,
        generator=torch.Generator().manual_seed(seed),
        weight_scale=weight_scale,
        trajectory=trajectory,
    )
    return trajectory


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


@pytest.mark.parametrize("bootstrap_steps", [0, 2], ids=["no_bootstrapping", "bootstrapping"])
def test_sd_equals_multidiffusion_region_loop(pipe, bootstrap_steps):
    latents = starting_latents()
    ours = trajectory_of(pipe, latents, **region_call(bootstrap_steps))
    predict = sd_predict(pipe, [BACKGROUND, *REGION_PROMPTS])
    expected = reference_trajectory(pipe, predict, latents, 3, region_masks(), bootstrap_steps)
    errors = relative_errors(ours, expected)
    assert max(errors) < TOLERANCE, errors


def test_a_one_percent_weight_error_fails(pipe):
    """The tolerance catches any one prompt's weight 1% off."""
    latents = starting_latents()
    ours = trajectory_of(pipe, latents, **region_call(0))
    predict = sd_predict(pipe, [BACKGROUND, *REGION_PROMPTS])
    for prompt in range(1 + len(REGION_PROMPTS)):
        wrong = reference_trajectory(pipe, predict, latents, 3, region_masks(), weight_scale=(prompt, 1.01))
        assert max(relative_errors(ours, wrong)) > 10 * TOLERANCE, prompt


def test_other_bootstrapping_draws_fail(pipe):
    """The tolerance catches bootstrapping with other draws (the reference's generator seeded 1, not 0)."""
    latents = starting_latents()
    ours = trajectory_of(pipe, latents, **region_call(2))
    predict = sd_predict(pipe, [BACKGROUND, *REGION_PROMPTS])
    other_draws = reference_trajectory(pipe, predict, latents, 3, region_masks(), bootstrap_steps=2, seed=1)
    assert max(relative_errors(ours, other_draws)) > 10 * TOLERANCE


# ----------------------------------------------------------------------------------------------------------------
# Invariants with synchronization on (exact mode, the default weight), for every pipeline class
# ----------------------------------------------------------------------------------------------------------------

# The classes whose `__call__` takes region prompts.
REGION_KINDS = ["sd"]
# Views of 64 pixels on a 64x128 panorama at stride 4: 3 views, every step synchronized.
SMALL_MASK_SIZE = (64, 128)


def kind_pipeline(name, components_cache, lpips_module):
    kind = KINDS[name]
    pipe = kind.build(components_cache, lpips_module)
    if kind.denoiser == "unet":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return kind, pipe


@pytest.mark.parametrize("name", REGION_KINDS)
def test_synchronized_region_with_an_empty_mask_changes_nothing(name, components_cache, lpips_module, caplog):
    """A region whose mask is all zero covers no latent pixel: a warning says so, and the panorama is the one
    without it, bit for bit (only the background is denoised, the bootstrapping draws change nothing)."""
    kind, pipe = kind_pipeline(name, components_cache, lpips_module)
    plain = kind.images(pipe, sync_weight=20.0)
    with caplog.at_level(logging.WARNING):
        empty = kind.images(
            pipe, sync_weight=20.0, region_prompts=["a red barn"], region_masks=[torch.zeros(SMALL_MASK_SIZE)]
        )
    assert torch.equal(empty, plain)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("`region_masks[0]` covers no latent pixel" in message for message in warnings), warnings


@pytest.mark.parametrize("name", REGION_KINDS)
def test_synchronized_region_everywhere_with_the_background_prompt_changes_nothing(
    name, components_cache, lpips_module
):
    """A region covering the whole panorama with the background's own prompt leaves the background no weight, and
    its prompt denoises every view as the background would (bootstrapping included: the mask leaves no outside);
    with another prompt it changes the panorama."""
    kind, pipe = kind_pipeline(name, components_cache, lpips_module)
    plain = kind.images(pipe, sync_weight=20.0)
    everywhere = {"sync_weight": 20.0, "region_masks": [torch.ones(SMALL_MASK_SIZE)]}
    same = kind.images(pipe, region_prompts=[kind.call_arguments()["prompt"]], **everywhere)
    # Measured: 0 (bit for bit) for every class.
    assert (same - plain).abs().max() <= 1e-6 * plain.abs().max()
    other = kind.images(pipe, region_prompts=["a red barn"], **everywhere)
    assert (other - plain).abs().max() > 1e-2 * plain.abs().max()


# ----------------------------------------------------------------------------------------------------------------
# Without regions: the default path
# ----------------------------------------------------------------------------------------------------------------


def test_without_regions_the_panorama_is_the_plain_one(pipe, monkeypatch):
    """`region_prompts=None` (and every region argument None) is the call without them, bit for bit, synchronized,
    and prepares no regions; unsynchronized it is MultiDiffusion (the reference with no region), whose equality with
    diffusers' `StableDiffusionPanoramaPipeline` tests/test_panorama_parity.py checks."""

    def no_regions(*args, **kwargs):
        raise AssertionError("regions were prepared for a call without region prompts")

    latents = starting_latents()
    call = {"num_inference_steps": 1, "generator": torch.Generator().manual_seed(0)}
    plain = trajectory_of(pipe, latents, **call)
    monkeypatch.setattr(pipe, "prepare_regions", no_regions)
    nothing = {
        "region_prompts": None,
        "region_masks": None,
        "region_negative_prompts": None,
        "region_bootstrap_steps": None,
    }
    call["generator"] = torch.Generator().manual_seed(0)
    none_given = trajectory_of(pipe, latents, **call, **nothing)
    assert all(torch.equal(a, b) for a, b in zip(none_given, plain))
    multidiffusion = trajectory_of(pipe, latents, num_inference_steps=3, sync_weight=0, **nothing)
    no_region = torch.zeros(0, HEIGHT, WIDTH)
    expected = reference_trajectory(pipe, sd_predict(pipe, [BACKGROUND]), latents, 3, no_region)
    errors = relative_errors(multidiffusion, expected)
    assert max(errors) < TOLERANCE, errors


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


@pytest.mark.parametrize(
    "region, argument, detail", BAD_INPUTS, ids=[f"{argument}-{k}" for k, (_, argument, _) in enumerate(BAD_INPUTS)]
)
def test_bad_region_input_is_one_line_naming_the_argument_before_any_model_runs(pipe, region, argument, detail):
    def fail(*args, **kwargs):
        raise AssertionError("a model ran before the inputs were checked")

    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        model.register_forward_pre_hook(fail)
    with pytest.raises(ValueError) as error:
        pipe(BACKGROUND, **PANORAMA, num_inference_steps=3, **region)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"`{argument}`"), message
    assert re.search(detail, message), message
