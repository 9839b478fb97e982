"""Property-based tests: argument combinations for every pipeline class (SD, SDXL, ControlNet) on tiny components.

Hypothesis draws a whole call: sizes, stride, circular padding, view batches, scheduler, generators (none, one, a
list of the right or the wrong length), prompts and images per prompt, guidance, negative prompts, every `sync_*`
option, a tiny `sync_decoder`, callbacks, output types and steps. A drawn argument is either valid or taken from that
argument's invalid values (at most two invalid arguments per call). The property:

- a call with an invalid argument raises a `ValueError` or `TypeError` whose message names one of the invalid
  arguments, before the UNet (or the ControlNet) runs once;
- a call with valid arguments returns images of the right type and shape (prompts x images per prompt; latents
  `(n, 4, H / 8, W / 8)`), whose values, and the latents the VAE decoded, are finite.

Anything else (another exception, a refusal of valid input, input accepted that is invalid, a wrong shape, NaN) is a
finding. Each call is kept cheap by its cost (gradient passes and view passes, from the views' geometry): sizes and
strides are drawn among those that fit.

Profiles (`SYNCDIFFUSION_HYPOTHESIS_PROFILE`): `ci` (default; derandomized, about a minute for the file on one core)
and `long` (thousands of draws, random): `SYNCDIFFUSION_HYPOTHESIS_PROFILE=long python -m pytest -q
tests/test_properties.py --hypothesis-show-statistics`.
"""

import collections
import os
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import pytest
import torch
from contract_pipelines import KINDS, condition_image, denoisers
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import seed as seed_decorator
from hypothesis import strategies as st

from pipeline_syncdiffusion import get_views
from syncdiffusion_utils.testing import make_tiny_decoder


pytestmark = pytest.mark.usefixtures("one_thread")

PROFILES = {
    # About 20 s per class on one core of a loaded 2-core machine; the same draws on every run.
    "ci": settings(
        max_examples=60,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    ),
    "long": settings(
        max_examples=1500,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    ),
}
PROFILE = os.environ.get("SYNCDIFFUSION_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in PROFILES:
    raise ValueError(f"SYNCDIFFUSION_HYPOTHESIS_PROFILE has to be one of {list(PROFILES)}, but is {PROFILE!r}.")

WINDOW = 8  # the tiny UNet's view side in latent pixels (64 image pixels)
FACTOR = 8  # the VAE's scale factor
PROMPTS = ["a photo of a forest", "a snowy mountain range"]

# name -> (scheduler class, its options, the call's `eta`)
SCHEDULERS = {
    "ddim": (DDIMScheduler, {}, 0.0),
    "ddim_eta": (DDIMScheduler, {}, 0.5),
    "ddpm": (DDPMScheduler, {}, 0.0),
    "euler": (EulerDiscreteScheduler, {}, 0.0),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}, 0.0),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}, 0.0),
    "sde-dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}, 0.0),
    "unipc": (UniPCMultistepScheduler, {}, 0.0),
    "lms": (LMSDiscreteScheduler, {}, 0.0),
    "heun": (HeunDiscreteScheduler, {}, 0.0),
    "kdpm2": (KDPM2DiscreteScheduler, {}, 0.0),
    "kdpm2_ancestral": (KDPM2AncestralDiscreteScheduler, {}, 0.0),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}, 0.0),
}
# An epsilon-predicting UNet under a flow-matching scheduler: refused by every class here.
REFUSED_SCHEDULERS = {"flow_match_euler": (FlowMatchEulerDiscreteScheduler, {}, 0.0)}
SECOND_ORDER = {"heun", "kdpm2", "kdpm2_ancestral"}

# Each argument's valid values (a strategy) and invalid ones (a list).
SIZES = list(range(FACTOR, 192 + 1, FACTOR))
ARGUMENTS = {
    "height": (st.sampled_from(SIZES), [0, -64, 60, 64.0]),
    "width": (st.sampled_from(SIZES), [0, -64, 100, 128.0]),
    "stride": (st.integers(1, WINDOW), [0, -1, WINDOW + 1, 4.0]),
    "view_batch_size": (st.sampled_from([1, 2, 3, 4, "auto"]), [0, -1, "x"]),
    "scheduler": (st.sampled_from(list(SCHEDULERS)), list(REFUSED_SCHEDULERS)),
    "generator": (st.sampled_from([None, "one", "list"]), ["wrong_length_list"]),
    "num_images_per_prompt": (st.integers(1, 2), [0]),
    "num_inference_steps": (st.integers(1, 3), [0]),
    "negative_prompt": (st.sampled_from([None, "blurry", "list"]), ["wrong_length_list"]),
    "sync_weight": (st.sampled_from([0.0, 20.0]), [-1.0]),
    "sync_mode": (st.sampled_from(["exact", "fast"]), ["fastest"]),
    "sync_thres": (st.integers(0, 3), [-1]),
    "sync_freq": (st.integers(1, 2), [0]),
    "sync_gradient": (st.sampled_from([None, "unet", "x0"]), ["vae"]),
    "sync_reuse_noise": (st.sampled_from([None, True, False]), ["yes"]),
    "sync_decode_downsample": (st.sampled_from([1, 2]), [0, 3]),
    "sync_lpips_size": (st.sampled_from([None, 32]), [16]),
    "sync_decoder": (st.sampled_from([None, "tiny"]), []),
    "sync_gradient_checkpointing": (st.booleans(), ["yes"]),
    "callback_on_step_end": (st.sampled_from([None, "returns_nothing", "returns_latents"]), []),
    "callback_on_step_end_tensor_inputs": (st.just(["latents"]), [["latents", "noise"]]),
    "output_type": (st.sampled_from(["latent", "np", "pt", "pil"]), []),
}
INVALIDATABLE = [name for name, (_, invalid) in ARGUMENTS.items() if invalid]

# The cost of one call, bounded so that each runs in well under a second on one core: the synchronization's gradient
# passes (one view of one image through UNet, decoder and LPIPS, forward and backward; ~0.06 s each) and the
# denoising view passes (~3 ms each).
MAX_GRADIENT_PASSES = 8
MAX_VIEW_PASSES = 240


@dataclass
class Combination:
    """One drawn call: `arguments` as drawn (generators, schedulers, decoders and callbacks by name), `invalid` the
    names of the arguments drawn from their invalid values."""

    arguments: dict
    invalid: tuple = field(default_factory=tuple)


def view_count(height, width, stride, circular):
    return len(get_views(height // FACTOR, width // FACTOR, WINDOW, stride, circular))


def synchronized_steps(arguments, num_views):
    """How many denoising steps synchronize (each costs a gradient pass per non-anchor view and image)."""
    if arguments["sync_weight"] <= 0 or num_views < 2:
        return 0
    steps = range(min(arguments["num_inference_steps"], arguments["sync_thres"]))
    return sum(1 for step in steps if (step + 1) % arguments["sync_freq"] == 0)


def fits(arguments, height, width, stride):
    """Whether the call's cost stays within `MAX_GRADIENT_PASSES` and `MAX_VIEW_PASSES`."""
    num_views = view_count(height, width, stride, arguments["circular_padding"])
    order = 2 if arguments["scheduler"] in SECOND_ORDER else 1
    images = arguments["num_images_per_prompt"] * len(arguments["prompt_list"])
    gradient_passes = (num_views - 1) * images * synchronized_steps(arguments, num_views)
    view_passes = num_views * images * arguments["num_inference_steps"] * order
    return gradient_passes <= MAX_GRADIENT_PASSES and view_passes <= MAX_VIEW_PASSES


def valid_size(value, fallback):
    """`value` where it is a valid size (a positive multiple of 8), else `fallback`."""
    return value if isinstance(value, int) and value > 0 and value % FACTOR == 0 else fallback


def valid_or(value, fallback):
    """`value` where it is a valid positive integer, else `fallback` (to size the cost of a call that must fail)."""
    return value if isinstance(value, int) and value > 0 else fallback


@st.composite
def combinations(draw):
    """A `Combination`: none, one or two arguments invalid; sizes and stride among those that fit the cost."""
    invalid = draw(
        st.one_of(st.just(()), st.lists(st.sampled_from(INVALIDATABLE), min_size=1, max_size=2, unique=True))
    )

    def argument(name):
        valid, invalid_values = ARGUMENTS[name]
        return draw(st.sampled_from(invalid_values) if name in invalid else valid)

    prompt = draw(st.one_of(st.just(PROMPTS[0]), st.lists(st.sampled_from(PROMPTS), min_size=1, max_size=2)))
    arguments = {"prompt": prompt, "prompt_list": [prompt] if isinstance(prompt, str) else prompt}
    arguments["circular_padding"] = draw(st.booleans())
    for name in ARGUMENTS:
        if name not in ("height", "width", "stride"):
            arguments[name] = argument(name)
    # A negative prompt of the wrong length is wrong only under guidance: without, it is documented as ignored.
    arguments["guidance_scale"] = 7.5 if "negative_prompt" in invalid else draw(st.sampled_from([1.0, 7.5]))

    # The cost of the call as if its invalid arguments were valid ones (it has to fail before any model runs).
    costed = {
        **arguments,
        "scheduler": "ddim" if "scheduler" in invalid else arguments["scheduler"],
        "num_images_per_prompt": valid_or(arguments["num_images_per_prompt"], 1),
        "num_inference_steps": valid_or(arguments["num_inference_steps"], 1),
        "sync_weight": max(arguments["sync_weight"], 0),
        "sync_thres": valid_or(arguments["sync_thres"], 1),
        "sync_freq": valid_or(arguments["sync_freq"], 1),
    }
    for name in ("height", "width", "stride"):
        if name in invalid:
            arguments[name] = argument(name)
    # An invalid size is costed as 64 pixels; a valid height is drawn before the width, as if the width were 8.
    if "height" not in invalid:
        width = valid_size(arguments["width"], 64) if "width" in invalid else FACTOR
        arguments["height"] = draw(st.sampled_from([h for h in SIZES if fits(costed, h, width, WINDOW)]))
    height = valid_size(arguments["height"], 64)
    if "width" not in invalid:
        arguments["width"] = draw(st.sampled_from([w for w in SIZES if fits(costed, height, w, WINDOW)]))
    width = valid_size(arguments["width"], 64)
    if "stride" not in invalid:
        strides = [s for s in range(WINDOW, 0, -1) if fits(costed, height, width, s)]
        arguments["stride"] = draw(st.sampled_from(strides))  # shrinks toward the window: the fewest views
    if (arguments["height"], arguments["width"]) == (FACTOR, FACTOR):
        # The tiny VAE's group norms hold one channel per group, which a 1x1 latent leaves a single value (an error
        # in torch); a real one holds 16 (SD 2's 512 channels in 32 groups). Its latents are still checked.
        arguments["output_type"] = "latent"
    return Combination(arguments, tuple(invalid))


# ---------------------------------------------------------------------------------------------------------------
# Building and checking one call
# ---------------------------------------------------------------------------------------------------------------


class Pipelines(dict):
    """`{kind name: (pipeline, its original scheduler config)}` and a tiny `sync_decoder`, with a short repr for
    Hypothesis' reports."""

    def __init__(self, tiny_decoder):
        super().__init__()
        self.tiny_decoder = tiny_decoder

    def __repr__(self):
        return f"Pipelines({', '.join(self)})"


def build_pipelines(components_cache, lpips_module):
    built = Pipelines(make_tiny_decoder(width_mult=0.25))
    for name, kind in KINDS.items():
        pipe = kind.build(components_cache, lpips_module)
        built[name] = pipe, dict(pipe.scheduler.config)
    return built


@pytest.fixture(scope="module")
def pipelines(components_cache, lpips_module):
    """One pipeline per class for the whole module (each example sets its own scheduler)."""
    return build_pipelines(components_cache, lpips_module)


def make_scheduler(name, base_config):
    scheduler_class, options, _ = {**SCHEDULERS, **REFUSED_SCHEDULERS}[name]
    if scheduler_class is FlowMatchEulerDiscreteScheduler:
        return scheduler_class(**options)
    return scheduler_class.from_config(base_config, **options)


def make_generator(spec, num_images, seed=0):
    if spec is None:
        return None
    if spec == "one":
        return torch.Generator().manual_seed(seed)
    length = num_images if spec == "list" else (num_images + 1 if num_images == 1 else num_images - 1)
    return [torch.Generator().manual_seed(seed + k) for k in range(length)]


def make_negative_prompt(spec, prompts):
    if spec in (None, "blurry"):
        return spec
    length = len(prompts) if spec == "list" else len(prompts) + 1
    return ["blurry"] * length


def make_callback(spec):
    def returns_nothing(pipeline, step, timestep, tensors):
        return {}

    def returns_latents(pipeline, step, timestep, tensors):
        return {"latents": tensors["latents"]}

    return {None: None, "returns_nothing": returns_nothing, "returns_latents": returns_latents}[spec]


def call_arguments(kind, combination, tiny_decoder):
    """The keyword arguments of `pipe(...)` for `combination` (without the scheduler, which is set on the pipe)."""
    arguments = dict(combination.arguments)
    prompts = arguments.pop("prompt_list")
    scheduler = arguments.pop("scheduler")
    images_per_prompt = arguments["num_images_per_prompt"]
    num_images = len(prompts) * (images_per_prompt if isinstance(images_per_prompt, int) else 1)
    arguments["generator"] = make_generator(arguments["generator"], max(num_images, 1))
    arguments["negative_prompt"] = make_negative_prompt(arguments["negative_prompt"], prompts)
    arguments["sync_decoder"] = tiny_decoder if arguments["sync_decoder"] == "tiny" else None
    arguments["callback_on_step_end"] = make_callback(arguments["callback_on_step_end"])
    arguments["eta"] = {**SCHEDULERS, **REFUSED_SCHEDULERS}[scheduler][2]
    if kind.conditioned:  # the condition of the panorama's size (64 pixels for an invalid size)
        arguments["image"] = condition_image(valid_size(arguments["height"], 64), valid_size(arguments["width"], 64))
    return arguments


class CallRecord:
    """Counts denoiser forwards and records what the VAE decodes during one call (undone on exit)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.denoiser_calls = 0
        self.decoded = []  # (latents, images) of each `vae.decode`

    def __enter__(self):
        self.patch = pytest.MonkeyPatch()
        for model in denoisers(self.pipe):
            self.patch.setattr(model, "forward", self.counting(model.forward))
        self.patch.setattr(self.pipe.vae, "decode", self.recording(self.pipe.vae.decode))
        return self

    def __exit__(self, *exc_info):
        self.patch.undo()

    def counting(self, forward):
        def counted(*args, **kwargs):
            self.denoiser_calls += 1
            return forward(*args, **kwargs)

        return counted

    def recording(self, decode):
        def recorded(latents, *args, **kwargs):
            output = decode(latents, *args, **kwargs)
            images = output[0] if isinstance(output, tuple) else output.sample
            self.decoded.append((latents.detach(), images.detach()))
            return output

        return recorded


def expected_images(combination):
    arguments = combination.arguments
    return len(arguments["prompt_list"]) * arguments["num_images_per_prompt"]


def assert_right_output(images, combination):
    """Images of the right type and shape, finite (and in [0, 1] where decoded)."""
    arguments = combination.arguments
    n, height, width = expected_images(combination), arguments["height"], arguments["width"]
    output_type = arguments["output_type"]
    if output_type == "latent":
        assert isinstance(images, torch.Tensor) and tuple(images.shape) == (n, 4, height // FACTOR, width // FACTOR)
        assert torch.isfinite(images).all()
    elif output_type == "pt":
        assert isinstance(images, torch.Tensor) and tuple(images.shape) == (n, 3, height, width)
        assert torch.isfinite(images).all() and 0 <= images.min() and images.max() <= 1
    elif output_type == "np":
        assert isinstance(images, np.ndarray) and images.shape == (n, height, width, 3)
        assert np.isfinite(images).all() and 0 <= images.min() and images.max() <= 1
    else:
        assert isinstance(images, list) and len(images) == n
        assert all(isinstance(image, PIL.Image.Image) and image.size == (width, height) for image in images)


def refused_arguments(kind, combination):
    """The arguments for which the call has to be refused: the invalid ones, and for the SD and ControlNet classes a
    negative prompt of another type than the prompt under guidance (`StableDiffusionPipeline.encode_prompt`'s
    `TypeError`; the SDXL class broadcasts a `str` one)."""
    arguments = combination.arguments
    refused = list(combination.invalid)
    negative_prompt = make_negative_prompt(arguments["negative_prompt"], arguments["prompt_list"])
    if (
        kind.name != "sdxl"
        and negative_prompt is not None
        and type(negative_prompt) is not type(arguments["prompt"])
        and arguments["guidance_scale"] > 1
    ):
        refused.append("negative_prompt")
    return refused


def check_call(kind, pipe, base_config, combination, tiny_decoder):
    """The property for one combination (see the module's docstring)."""
    note(f"{kind.name}: {combination}")
    pipe.scheduler = make_scheduler(combination.arguments["scheduler"], base_config)
    arguments = call_arguments(kind, combination, tiny_decoder)
    refused = refused_arguments(kind, combination)
    with torch.no_grad(), CallRecord(pipe) as record:
        if refused:
            with pytest.raises((ValueError, TypeError)) as error:
                pipe(**arguments)
            message = str(error.value)
            assert any(name in message for name in refused), (refused, message)
            assert record.denoiser_calls == 0
            return
        images = pipe(**arguments).images
    assert_right_output(images, combination)
    if combination.arguments["output_type"] != "latent":
        assert record.decoded, "the VAE decoded nothing"
        for latents, decoded in record.decoded:
            assert torch.isfinite(latents).all() and torch.isfinite(decoded).all()


@pytest.mark.parametrize("kind_name", list(KINDS))
@PROFILES[PROFILE]
@given(data=st.data())
def test_every_argument_combination_is_refused_early_or_runs(kind_name, pipelines, data):
    pipe, base_config = pipelines[kind_name]
    combination = data.draw(combinations(), label="combination")
    check_call(KINDS[kind_name], pipe, base_config, combination, pipelines.tiny_decoder)


def test_combinations_cover_valid_and_invalid_calls():
    """The strategy draws valid calls and calls with each invalid argument (a strategy that drew only refusals would
    pass the property without running a pipeline)."""
    seen_valid, seen_invalid = [], set()

    @settings(max_examples=300, derandomize=True, database=None, deadline=None)
    @given(combinations())
    def collect(combination):
        seen_valid.append(not combination.invalid)
        seen_invalid.update(combination.invalid)

    collect()
    assert 0.3 < np.mean(seen_valid) < 0.9
    assert seen_invalid == set(INVALIDATABLE)


def test_cost_bound_keeps_big_panoramas_for_multidiffusion():
    """Big panoramas are drawn where they are cheap (no synchronization) and the bound excludes the costly ones."""
    plain = {
        "circular_padding": False,
        "scheduler": "ddim",
        "num_images_per_prompt": 1,
        "prompt_list": [PROMPTS[0]],
        "num_inference_steps": 3,
        "sync_weight": 0.0,
        "sync_thres": 3,
        "sync_freq": 1,
    }
    assert fits(plain, 192, 192, WINDOW)
    assert not fits({**plain, "sync_weight": 20.0}, 192, 192, WINDOW)  # 8 views x 3 steps of gradient passes
    assert fits({**plain, "sync_weight": 20.0}, 64, 128, 4)  # 3 views: 2 x 3 gradient passes


# ---------------------------------------------------------------------------------------------------------------
# A survey: every distinct failure of many draws (`python tests/test_properties.py --examples 3000`)
# ---------------------------------------------------------------------------------------------------------------


def failure_signature(error):
    """What tells two failures apart: the exception's type, the innermost frame in a pipeline file (or this one) and
    the innermost frame of all."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [
        f for f in frames if os.path.basename(f.filename).startswith(("pipeline_syncdiffusion", "test_properties"))
    ]
    where = f"{os.path.basename(ours[-1].filename)}:{ours[-1].lineno}" if ours else "?"
    return f"{type(error).__name__} at {where} ({frames[-1].name})"


def survey(examples, seed=0, seconds=None):
    """Draw up to `examples` calls over every class (for at most `seconds`) without stopping at a failure: returns
    `{signature: failures}`, each failure `(kind, combination, the exception's last line)`, and the number of calls
    made per class and validity."""
    from syncdiffusion_utils.testing import make_lpips

    torch.set_num_threads(1)
    pipes = build_pipelines({}, make_lpips())
    failures, calls = {}, collections.Counter()
    deadline = time.monotonic() + (float("inf") if seconds is None else seconds)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @seed_decorator(seed)
    @given(st.sampled_from(list(KINDS)), combinations())
    def draw(kind_name, combination):
        if time.monotonic() > deadline:
            return
        pipe, base_config = pipes[kind_name]
        calls[kind_name, "invalid" if combination.invalid else "valid"] += 1
        try:
            check_call(KINDS[kind_name], pipe, base_config, combination, pipes.tiny_decoder)
        except (Exception, pytest.fail.Exception) as error:  # every failure is recorded; the survey goes on
            line = "".join(traceback.format_exception_only(error)).strip().splitlines()[-1][:300]
            failures.setdefault(failure_signature(error), []).append((kind_name, combination, line))

    draw()
    return failures, calls


def smallest(failures):
    """The failure whose call is the smallest (fewest latent pixels, then the shortest repr)."""

    def size(failure):
        arguments = failure[1].arguments
        pixels = [arguments[name] if isinstance(arguments[name], int) else 0 for name in ("height", "width")]
        return (pixels[0] * pixels[1], len(repr(failure[1])))

    return min(failures, key=size)


# ---------------------------------------------------------------------------------------------------------------
# Findings, each as a regular test
# ---------------------------------------------------------------------------------------------------------------


def assert_refused_early_or_runs(kind_name, pipelines, names, **call):
    """The call (2 views of a 64x72-pixel-wide panorama unless `call` says otherwise, 1 synchronized DDIM step)
    raises a `ValueError` naming one of `names` before any denoiser runs, or returns finite latents of the panorama's
    shape."""
    kind = KINDS[kind_name]
    pipe, base_config = pipelines[kind_name]
    pipe.scheduler = make_scheduler("ddim", base_config)
    arguments = kind.call_arguments(**{"width": 72, "stride": 8, "num_inference_steps": 1, "sync_thres": 1, **call})
    with torch.no_grad(), CallRecord(pipe) as record:
        try:
            latents = pipe(**arguments).images
        except ValueError as error:
            assert any(f"`{name}" in str(error) for name in names), str(error)
            assert record.denoiser_calls == 0
            return
    assert latents.shape == (1, 4, arguments["height"] // FACTOR, arguments["width"] // FACTOR)
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize("kind_name", list(KINDS))
def test_synchronized_panorama_one_latent_high(kind_name, pipelines):
    """8 pixels high: the views are 1 latent high and the images LPIPS compares 8 pixels, fewer than LPIPS-VGG's four
    max-pools need (16). Found: `RuntimeError: Given input size: (512x1x8). Calculated output size: (512x0x4). Output
    size is too small` in LPIPS' fifth slice."""
    assert_refused_early_or_runs(kind_name, pipelines, ["height"], height=8)


@pytest.mark.parametrize("kind_name", list(KINDS))
def test_sync_decode_downsample_larger_than_the_views(kind_name, pipelines):
    """`sync_decode_downsample=2` divides the window (8 latents) but not the 1-latent-high views of an 8-pixel-high
    panorama. Found: `RuntimeError: Given input size: (4x1x8). Calculated output size: (4x0x4). Output size is too
    small` in `decode_for_sync`'s `F.avg_pool2d`."""
    assert_refused_early_or_runs(
        kind_name, pipelines, ["sync_decode_downsample", "height"], height=8, sync_decode_downsample=2
    )


@pytest.mark.parametrize("kind_name", list(KINDS))
@pytest.mark.parametrize(
    "call", [{"sync_decode_downsample": 2}, {"sync_lpips_size": 32}], ids=["downsample", "lpips_size"]
)
def test_loss_images_of_views_lower_than_the_window(kind_name, pipelines, call):
    """16 pixels high: the views are 2 latents high, and LPIPS compares 16-pixel-high images, which it can (without
    the option). Halved by `sync_decode_downsample=2`, or resized by `sync_lpips_size=32` (the longer side, 72 -> 32),
    they are 8 pixels high. Found: `RuntimeError: Given input size: (512x1x4). Calculated output size: (512x0x2).
    Output size is too small` in LPIPS."""
    assert_refused_early_or_runs(kind_name, pipelines, [*call, "height"], height=16, **call)


@pytest.mark.parametrize("size", ["height", "width"])
def test_controlnet_zero_size_is_an_error_not_the_condition_size(pipelines, size):
    """`height=0` (or `width=0`) for the ControlNet class: `_default_size` takes `height or image_height`, so 0 becomes
    the condition image's size and the call runs (found: DID NOT RAISE). A size is defaulted only when None."""
    pipe, base_config = pipelines["controlnet"]
    pipe.scheduler = make_scheduler("ddim", base_config)
    arguments = KINDS["controlnet"].call_arguments(num_inference_steps=1, sync_weight=0, **{size: 0})
    with torch.no_grad(), CallRecord(pipe) as record:
        with pytest.raises(ValueError, match=f"`{size}`"):
            pipe(**arguments)
    assert record.denoiser_calls == 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=survey.__doc__)
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=None)
    options = parser.parse_args()
    start = time.monotonic()
    found, made = survey(options.examples, options.seed, options.seconds)
    print(f"{sum(made.values())} calls in {time.monotonic() - start:.0f} s: {dict(made)}")
    for signature, failures in sorted(found.items(), key=lambda item: -len(item[1])):
        kinds = collections.Counter(kind for kind, _, _ in failures)
        kind, combination, line = smallest(failures)
        print(f"\n{len(failures)} x {signature} {dict(kinds)}\n  {line}\n  smallest: {kind} {combination}")
