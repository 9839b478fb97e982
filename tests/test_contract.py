"""One contract for every pipeline class: SD (`SyncDiffusionPipeline`), SDXL (`SyncDiffusionXLPipeline`),
ControlNet (`SyncDiffusionControlNetPipeline`), FLUX.1 (`SyncDiffusionFluxPipeline`), FLUX.2 [klein]
(`SyncDiffusionFlux2KleinPipeline`) and Z-Image (`SyncDiffusionZImagePipeline`), each on tiny random components
(tests/contract_pipelines.py).

API and defaults, bad and unknown input, callbacks, view batches, fast modes and their pass counts, half precision
(float16 loss scaling; the transformer classes: bfloat16), schedulers, generator lists and the step noise of
stochastic schedulers: what holds for one class holds for all. Where the classes differ (the transformers, FLUX's
packed latents, klein's VAE latent output and guidance calls, Z-Image's float32 latents, flow matching, FLUX's
guidance embedding) the difference is stated in the `PipelineKind` of tests/contract_pipelines.py, not here. Only public API is used (`__call__`, components, `denoiser`,
`denoising_models`, `set_perceptual_loss`, `scheduler`); models are counted by wrapping their `forward`.
"""

import inspect

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from contract_pipelines import (
    KINDS,
    NUM_VIEWS,
    NonCheckpointableDecoder,
    condition_image,
    denoisers,
    pipeline_models,
    record_forwards,
    zero_prediction_denoiser,
    zeros_like_prompt_embeds,
)
from diffusers import DDIMScheduler, MultiControlNetModel
from diffusers.callbacks import PipelineCallback

from pipeline_syncdiffusion import SyncDiffusionPipeline
from syncdiffusion_utils.counting import expected_plain_step, expected_sync_step
from syncdiffusion_utils.testing import make_tiny_controlnet


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=list(KINDS), scope="module")
def kind(request):
    """The pipeline class under test, with how to build and call it."""
    return KINDS[request.param]


@pytest.fixture
def pipe(kind, components_cache, lpips_module):
    """A fresh pipeline of `kind` (tests may change it)."""
    return kind.build(components_cache, lpips_module)


@pytest.fixture(scope="module")
def shared_pipe(kind, components_cache, lpips_module):
    """One pipeline of `kind` for the tests that change nothing in it (monkeypatched forwards are undone)."""
    return kind.build(components_cache, lpips_module)


def per_kind(table):
    """Parametrize `kind, name` over every class and each entry of its `PipelineKind.<table>` (a dict)."""
    cases = [(kind_name, name) for kind_name, kind in KINDS.items() for name in getattr(kind, table)]
    return pytest.mark.parametrize(
        "kind, name", cases, indirect=["kind"], ids=[f"{kind_name}-{name}" for kind_name, name in cases]
    )


def relative_difference(actual, expected):
    """`|actual - expected| / |expected|` in the Frobenius norm, in float32."""
    actual, expected = actual.float(), expected.float()
    return ((actual - expected).norm() / expected.norm()).item()


def names(argument):
    """A message pattern naming `argument` in backticks, alone (`stride`) or with a value (`stride=0`)."""
    return f"`{argument}[`=]"


def count_every_model(monkeypatch, pipe):
    record = []
    for model in pipeline_models(pipe):
        record_forwards(monkeypatch, model, record)
    return record


# ---------------------------------------------------------------------------------------------------------------
# API: the panorama arguments, their defaults, output types
# ---------------------------------------------------------------------------------------------------------------

SD_PARAMETERS = inspect.signature(SyncDiffusionPipeline.__call__).parameters
PANORAMA_ARGUMENTS = [
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "view_batch_size",
    "circular_padding",
    *[name for name in SD_PARAMETERS if name.startswith("sync_")],
]


def test_every_class_takes_the_panorama_arguments_with_the_sd_defaults(kind):
    """Every `sync_*` argument, `view_batch_size` and `circular_padding` with the SD class's default; size, steps and
    guidance differ only where documented (SDXL: 1024x4096, 5.0; ControlNet: the condition's size; FLUX: 1024x4096,
    28 steps, guidance embedding 3.5). The stride's default is checked by what it does (next test)."""
    assert len(PANORAMA_ARGUMENTS) > 10  # the SD class has its sync_* arguments
    parameters = inspect.signature(kind.pipeline_class.__call__).parameters
    assert "stride" in parameters
    for name in PANORAMA_ARGUMENTS:
        assert name in parameters, name
        expected = kind.own_defaults.get(name, SD_PARAMETERS[name].default)
        assert parameters[name].default == expected, name


@torch.no_grad()
def test_default_stride_follows_the_window(kind, components_cache, lpips_module, monkeypatch):
    """The default stride is an eighth of the UNet classes' window (SD's 64 latents: 8; SDXL's 128: 16) and a
    quarter of the transformer classes' (1024 pixels, 128 latents: 32). A panorama two strides wider than one window
    then has 3 views: one denoiser call each with `view_batch_size=1` (klein's guidance: two), a denoiser predicting
    zeros (only the count matters here, and attention over 128x128 latents is slow on a CPU)."""
    window, stride = kind.real_window, kind.real_default_stride
    pipe = kind.build(components_cache, lpips_module, sample_size=window)
    call = kind.call_arguments(
        height=8 * window, width=8 * (window + 2 * stride), num_inference_steps=1, sync_weight=0
    )
    del call["stride"]
    call.pop("window_size", None)  # the transformer classes' default window
    if kind.conditioned:
        call["controlnet_conditioning_scale"] = 0.0  # the ControlNet does not run
    zero_prediction_denoiser(monkeypatch, pipe, kind)
    denoiser_calls = record_forwards(monkeypatch, pipe.denoiser)
    pipe(**call)
    assert len(denoiser_calls) == 3 * kind.guidance_calls


@torch.no_grad()
def test_output_types_and_return_dict(kind, shared_pipe):
    """`"latent"` is the panorama latent (FLUX: packed, as `FluxPipeline` returns it; klein: the VAE's, as
    `Flux2KleinPipeline` returns it), the others the image."""

    def images(**kwargs):
        return kind.images(shared_pipe, num_inference_steps=1, sync_weight=0, **kwargs)

    latents = images(output_type="latent")
    assert isinstance(latents, torch.Tensor) and latents.shape == kind.latent_shape(1, 64, 128)
    array = images(output_type="np")
    assert isinstance(array, np.ndarray) and array.shape == (1, 64, 128, 3)
    assert 0 <= array.min() and array.max() <= 1
    tensor = images(output_type="pt")
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (1, 3, 64, 128)
    np.testing.assert_allclose(tensor.permute(0, 2, 3, 1).numpy(), array, atol=1e-6)
    (pil,) = images(output_type="pil")
    assert isinstance(pil, PIL.Image.Image) and pil.size == (128, 64)
    assert np.abs(np.asarray(pil, dtype=np.float32) - array[0] * 255).max() <= 1

    output = kind(shared_pipe, num_inference_steps=1, sync_weight=0, output_type="np", return_dict=False)
    assert isinstance(output, tuple)
    np.testing.assert_array_equal(output[0], array)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the argument, before any model runs
# ---------------------------------------------------------------------------------------------------------------

BAD_INPUTS = [
    ({"height": 60}, "height"),
    ({"width": 130}, "width"),
    ({"stride": 0}, "stride"),
    ({"stride": 9}, "stride"),
    ({"view_batch_size": 0}, "view_batch_size"),
    ({"latents": torch.zeros(1, 4, 8, 8)}, "latents"),
    ({"sync_weight": -1.0}, "sync_weight"),
    ({"sync_decay_rate": 0.0}, "sync_decay_rate"),
    ({"sync_decay_rate": 1.5}, "sync_decay_rate"),
    ({"sync_freq": 0}, "sync_freq"),
    ({"sync_thres": -1}, "sync_thres"),
    ({"sync_mode": "fastest"}, "sync_mode"),
    ({"sync_gradient": "vae"}, "sync_gradient"),
    ({"sync_reuse_noise": "yes"}, "sync_reuse_noise"),
    ({"sync_decoder": "madebyollin/taesd"}, "sync_decoder"),
    ({"sync_lpips_size": 16}, "sync_lpips_size"),
    ({"sync_decode_downsample": 0}, "sync_decode_downsample"),
    ({"sync_decode_downsample": 3}, "sync_decode_downsample"),  # does not divide the 8-latent window
    ({"sync_gradient_checkpointing": "yes"}, "sync_gradient_checkpointing"),
    (
        {"sync_gradient_checkpointing": True, "sync_decoder": NonCheckpointableDecoder()},
        "sync_gradient_checkpointing",
    ),
]


def assert_refused_before_any_model_runs(kind, pipe, monkeypatch, kwargs, argument):
    calls = count_every_model(monkeypatch, pipe)
    with pytest.raises(ValueError, match=names(argument)):
        kind(pipe, **kwargs)
    assert calls == []


@pytest.mark.parametrize("kwargs, argument", BAD_INPUTS, ids=[f"{a}-{i}" for i, (_, a) in enumerate(BAD_INPUTS)])
def test_bad_input_is_a_value_error_before_any_model_runs(kind, shared_pipe, monkeypatch, kwargs, argument):
    assert_refused_before_any_model_runs(kind, shared_pipe, monkeypatch, kwargs, argument)


OWN_BAD_INPUTS = [(kind_name, index) for kind_name, kind in KINDS.items() for index in range(len(kind.own_bad_inputs))]


@pytest.mark.parametrize(
    "kind, index",
    OWN_BAD_INPUTS,
    indirect=["kind"],
    ids=[f"{k}-{KINDS[k].own_bad_inputs[i][1]}-{i}" for k, i in OWN_BAD_INPUTS],
)
def test_class_specific_bad_input_is_a_value_error_before_any_model_runs(kind, shared_pipe, monkeypatch, index):
    """The other denoiser's `sync_gradient` name; FLUX's own rules: sizes and window multiples of 16, even strides."""
    kwargs, argument = kind.own_bad_inputs[index]
    assert_refused_before_any_model_runs(kind, shared_pipe, monkeypatch, kwargs, argument)


def test_non_checkpointable_sync_decoder_works_without_checkpointing(kind, shared_pipe):
    """The decoder of the test above is a working one: only the checkpointing request is wrong."""
    decoder = NonCheckpointableDecoder(kind.latent_channels)
    latents = kind.images(shared_pipe, num_inference_steps=1, sync_decoder=decoder)
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize("name", ["sync_wieght", "control_image"])
def test_unknown_keyword_argument_is_a_type_error(kind, shared_pipe, monkeypatch, name):
    """A typo or an argument of another class (the ControlNet inpainting pipelines' `control_image`) is not
    silently ignored."""
    value = 50 if name == "sync_wieght" else condition_image(64, 128)
    calls = count_every_model(monkeypatch, shared_pipe)
    with pytest.raises(TypeError, match=name):
        kind(shared_pipe, num_inference_steps=1, sync_weight=0, **{name: value})
    assert calls == []


# ---------------------------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_deprecated_callback_without_callback_steps_runs_every_step(kind, shared_pipe):
    """Every step, with the latents in the form `callback_on_step_end` gets them (FLUX: packed, as the call returns
    them; klein: packed and normalized, the call returns the VAE's latent of them)."""
    calls = []
    latents = kind.images(
        shared_pipe,
        num_inference_steps=3,
        sync_weight=0,
        callback=lambda step, timestep, latents: calls.append((step, latents.clone())),
    )
    assert [step for step, _ in calls] == [0, 1, 2]
    assert calls[-1][1].shape == kind.callback_latent_shape(1, 64, 128)
    torch.testing.assert_close(kind.output_latents(shared_pipe, calls[-1][1], 64, 128), latents, atol=0, rtol=0)


@torch.no_grad()
def test_callback_on_step_end_replaces_the_latents(kind, shared_pipe):
    def replace_at(step_to_replace, replacement):
        def callback(pipeline, step, timestep, tensors):
            return {"latents": replacement(tensors["latents"])} if step == step_to_replace else {}

        return kind.images(
            shared_pipe, sync_weight=0, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"]
        )

    last = replace_at(1, lambda latents: torch.full_like(latents, 0.5))
    # the last step's replacement is the result (klein: its VAE latent)
    half = torch.full(kind.callback_latent_shape(1, 64, 128), 0.5)
    torch.testing.assert_close(last, kind.output_latents(shared_pipe, half, 64, 128), atol=0, rtol=0)
    plain = kind.images(shared_pipe, sync_weight=0)
    assert relative_difference(replace_at(0, torch.zeros_like), plain) > 0.1  # the next step started from it


# Classes whose guidance ignores a callback's `_guidance_scale` today, unlike the diffusers pipelines they mirror
# (Flux2KleinPipeline and ZImagePipeline read the scale every step: with SD's cutoff callback after step 2 of 4 they
# run 7 transformer calls and [2, 2, 2, 1] rows, these classes 8 and [2, 2, 2, 2]). Strict: the fix shows.
@torch.no_grad()
def test_pipeline_callback_with_its_own_tensor_inputs_takes_effect(kind, shared_pipe, monkeypatch):
    """diffusers' CFG cutoff callback (its `tensor_inputs` are the prompt embeddings, not `latents`) after step 1
    of 3: the last step runs without guidance, one denoiser row per view instead of two (klein: one call instead of
    two)."""
    if kind.cfg_cutoff_callback is None:
        pytest.skip(
            f"diffusers has no classifier-free-guidance cutoff callback for {kind.pipeline_class.__name__} (FLUX.1's"
            " guidance is an embedding): the next test covers `PipelineCallback`s"
        )
    batches = record_forwards(monkeypatch, shared_pipe.denoiser)
    latents = kind.images(
        shared_pipe,
        num_inference_steps=3,
        sync_weight=0,
        callback_on_step_end=kind.cfg_cutoff_callback(cutoff_step_ratio=0.5),
    )
    assert torch.isfinite(latents).all()
    guided = [kind.guidance_rows // kind.guidance_calls] * (kind.guidance_calls * 2 * NUM_VIEWS)
    assert batches == guided + [1] * NUM_VIEWS
    assert shared_pipe.guidance_scale == 0.0


class ZeroPromptEmbeds(PipelineCallback):
    """Zeroes the prompt embeddings at `cutoff_step_index`: a `PipelineCallback` whose only tensor input is
    `prompt_embeds` (every class passes it to callbacks)."""

    tensor_inputs = ["prompt_embeds"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index == self.config.cutoff_step_index:
            return {"prompt_embeds": zeros_like_prompt_embeds(callback_kwargs["prompt_embeds"])}
        return {}


@torch.no_grad()
def test_pipeline_callback_replacing_prompt_embeds_conditions_the_next_steps(kind, shared_pipe):
    """The callback gets its `tensor_inputs` (not the default `["latents"]`: it would fail on the missing key), and
    the embeddings it returns condition the remaining steps, as a plain callback asking for them does."""

    def zero_prompt_embeds(pipeline, step, timestep, tensors):
        return {"prompt_embeds": zeros_like_prompt_embeds(tensors["prompt_embeds"])} if step == 0 else {}

    call = {"num_inference_steps": 3, "sync_weight": 0}
    plain = kind.images(shared_pipe, **call)
    through_class = kind.images(
        shared_pipe, callback_on_step_end=ZeroPromptEmbeds(cutoff_step_ratio=None, cutoff_step_index=0), **call
    )
    through_function = kind.images(
        shared_pipe,
        callback_on_step_end=zero_prompt_embeds,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
        **call,
    )
    torch.testing.assert_close(through_class, through_function, atol=0, rtol=0)
    # measured: 1.6e-2 (SDXL) to 1.2e-1 (SD); FLUX 1.9e-2
    assert relative_difference(through_class, plain) > 1e-3


@torch.no_grad()
def test_interrupt_from_a_callback_stops_the_loop(kind, shared_pipe, monkeypatch):
    calls = []
    for model in denoisers(shared_pipe):
        record_forwards(monkeypatch, model, calls)
    at_interrupt, steps = [], []

    def callback(pipeline, step, timestep, tensors):
        steps.append(step)
        pipeline._interrupt = True
        at_interrupt.append(len(calls))
        return {}

    kind(shared_pipe, num_inference_steps=4, sync_weight=0, callback_on_step_end=callback)
    assert steps == [0]
    assert at_interrupt[0] > 0 and len(calls) == at_interrupt[0]  # no model ran after the interrupt


# ---------------------------------------------------------------------------------------------------------------
# Fast modes and the passes each mode makes; view batches: the same latents whatever the batching
# ---------------------------------------------------------------------------------------------------------------

# Relative difference (Frobenius norm) of float32 latents batched differently, 2 steps of which 1 synchronized:
# measured up to 2.4e-5 (batch of 3 against 1, SD; ControlNet 1.7e-5, SDXL 1.1e-6; "auto" 1.3e-6) on 1 and 2
# threads; FLUX 2.3e-6 (batch of 3; 2 and "auto" 7e-8). A 1% error of the synchronization weight moves them by
# 1.2e-4 (SDXL) to 2.2e-4 (SD); FLUX's synchronization moves its tiny model's latents ~8x less (the exact mode
# 2.7e-3 from MultiDiffusion, SD 2.3e-2), a 1% weight error by 2.7e-5: its bound sits between. FLUX.2 [klein]: a
# batch of 3 views 1.6e-5 from one view per batch (2 and "auto": 1.1e-7, 2.4e-7), a 1% weight error 7.7e-5; Z-Image:
# 3.7e-7 to 6.2e-7, a 1% weight error 1.3e-4.
BATCHING_NOISE = {"sd": 6e-5, "sdxl": 6e-5, "controlnet": 6e-5, "flux": 1e-5, "flux2": 3e-5, "z_image": 1e-5}

MODES = {
    "multidiffusion": ({"sync_weight": 0}, None),
    "exact": ({}, {}),
    "fast": ({"sync_mode": "fast"}, {"gradient": "x0", "reuse_noise": True}),
    "x0_gradient": ({"sync_gradient": "x0"}, {"gradient": "x0"}),
    "reuse_noise": ({"sync_reuse_noise": True}, {"reuse_noise": True}),
}


@pytest.fixture(scope="module")
def mode_runs(components_cache, lpips_module):
    """`run(kind, mode)`: the latents of 2 steps, the first synchronized, and the view-passes of each denoising
    model (batches over images and guidance rows), computed once per module."""
    runs = {}

    def run(kind, mode):
        if (kind.name, mode) not in runs:
            pipe = kind.build(components_cache, lpips_module)
            with pytest.MonkeyPatch.context() as monkeypatch, torch.no_grad():
                batches = [record_forwards(monkeypatch, model) for model in denoisers(pipe)]
                latents = kind.images(pipe, sync_thres=1, **MODES[mode][0])
            # one image: `guidance_rows` rows per view (classifier-free guidance's two, FLUX's one)
            view_passes = [sum(record) / kind.guidance_rows for record in batches]
            runs[kind.name, mode] = latents, view_passes
        return runs[kind.name, mode]

    return run


@pytest.mark.parametrize("mode", list(MODES))
def test_denoiser_passes_follow_the_documented_formulas(kind, mode_runs, mode):
    """Denoiser (UNet and ControlNet, or FLUX's transformer) forwards in view-passes: docs/algorithm.md's and
    docs/flux.md's tables, `syncdiffusion_utils.counting`."""
    latents, view_passes = mode_runs(kind, mode)
    assert torch.isfinite(latents).all()
    controlnet = kind.conditioned
    sync_options = MODES[mode][1]
    first = (
        expected_plain_step(NUM_VIEWS, controlnet=controlnet, denoiser=kind.denoiser)
        if sync_options is None
        else expected_sync_step(NUM_VIEWS, controlnet=controlnet, denoiser=kind.denoiser, **sync_options)
    )
    second = expected_plain_step(NUM_VIEWS, controlnet=controlnet, denoiser=kind.denoiser)
    forwards = f"{kind.denoiser}_fwd"
    assert view_passes[0] == first[forwards] + second[forwards]
    if controlnet:
        assert view_passes[1] == first["controlnet_fwd"] + second["controlnet_fwd"]


@torch.no_grad()
def test_exact_gradient_is_named_after_the_denoiser(kind, shared_pipe, mode_runs):
    """`sync_gradient="unet"` (FLUX: `"transformer"`) is the exact mode's default, not another mode."""
    named = kind.images(shared_pipe, sync_thres=1, sync_gradient=kind.exact_gradient)
    assert relative_difference(named, mode_runs(kind, "exact")[0]) < BATCHING_NOISE[kind.name]
    assert relative_difference(named, mode_runs(kind, "x0_gradient")[0]) > FAST_MODE_EFFECT[kind.name]


# Measured relative differences (Frobenius norm) of the fast modes' latents: from the exact mode's 5.4e-3 (SDXL) to
# 1.7e-2 (SD), from MultiDiffusion's 8.4e-3 to 1.5e-2; FLUX: from the exact mode's 6.6e-4 (reused velocity) to
# 1.5e-3, from MultiDiffusion's 1.7e-3 to 2.3e-3; FLUX.2 [klein]: from the exact mode's 6.6e-4 (reused velocity) to
# 4.2e-3, from MultiDiffusion's 5.1e-3 to 7.3e-3; Z-Image: from the exact mode's 5.6e-3 to 1.1e-2, from
# MultiDiffusion's 3.0e-3 to 8.6e-3. float32 noise is below BATCHING_NOISE.
FAST_MODE_EFFECT = {"sd": 2e-3, "sdxl": 2e-3, "controlnet": 2e-3, "flux": 3e-4, "flux2": 3e-4, "z_image": 1e-3}


@pytest.mark.parametrize("mode", ["fast", "x0_gradient", "reuse_noise"])
def test_fast_modes_differ_from_exact_and_from_multidiffusion(kind, mode_runs, mode):
    latents, _ = mode_runs(kind, mode)
    assert relative_difference(latents, mode_runs(kind, "exact")[0]) > FAST_MODE_EFFECT[kind.name]
    assert relative_difference(latents, mode_runs(kind, "multidiffusion")[0]) > FAST_MODE_EFFECT[kind.name]


@torch.no_grad()
@pytest.mark.parametrize("view_batch_size", [2, 3, "auto"])
def test_view_batch_sizes_give_the_same_latents(kind, shared_pipe, mode_runs, view_batch_size):
    one_view_per_batch = mode_runs(kind, "exact")[0]
    batched = kind.images(shared_pipe, sync_thres=1, view_batch_size=view_batch_size)
    assert relative_difference(batched, one_view_per_batch) < BATCHING_NOISE[kind.name]


@torch.no_grad()
def test_view_batch_tolerance_catches_a_one_percent_weight_error(kind, shared_pipe, mode_runs):
    wrong_weight = kind.images(shared_pipe, sync_thres=1, sync_weight=20.2)
    assert relative_difference(wrong_weight, mode_runs(kind, "exact")[0]) > BATCHING_NOISE[kind.name]


# ---------------------------------------------------------------------------------------------------------------
# Half precision: float16's synchronization update matches float32's (loss scaling); FLUX runs in bfloat16
# ---------------------------------------------------------------------------------------------------------------

# As in tests/test_fp16.py: LPIPS times 1e-3 (the weight times 1e3) brings the tiny model's image gradients down to
# where real models' are, below float16's smallest normal number without loss scaling.
LOSS_SCALE = 1e-3
FP16_SYNC_WEIGHT = 400.0 / LOSS_SCALE


class ScaledLoss(torch.nn.Module):
    def __init__(self, loss, scale):
        super().__init__()
        self.loss, self.scale = loss, scale

    def forward(self, images, anchor_images):
        return self.scale * self.loss(images, anchor_images)


def synchronization_update(kind, components_cache, lpips_module, dtype, force_upcast=False):
    """One synchronized DDIM step of the 64x128 panorama, all 3 views in one batch: each view's latent change (the
    sample the scheduler steps from, minus the view's initial latents)."""
    pipe = kind.build(components_cache, lpips_module)
    pipe.vae.register_to_config(force_upcast=force_upcast)
    pipe.set_perceptual_loss(ScaledLoss(lpips_module, LOSS_SCALE))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    stepped = []
    step = pipe.scheduler.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        stepped.append(sample.detach().float().clone())
        return step(model_output, timestep, sample, *args, **kwargs)

    pipe.scheduler.step = recording_step
    pipe = pipe.to(dtype)
    latents = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        kind(
            pipe,
            latents=latents,
            num_inference_steps=1,
            sync_thres=1,
            sync_weight=FP16_SYNC_WEIGHT,
            view_batch_size=NUM_VIEWS,
        )
    (sample,) = stepped
    views = torch.cat([latents.float()[..., start : start + 8] for start in (0, 4, 8)])
    return sample - views


def assert_float16_update_matches_float32(reference, half):
    # Measured: cosine 0.99974 / relative error 2.3% (SD), 0.99966 / 2.6% (ControlNet), 0.99930 / 3.8% (SDXL, float16
    # VAE). Without loss scaling the SD update had cosine 0.176; the SDXL update with an upcast VAE, which today takes
    # the loss scale from the float32 image, has cosine 0.9939 and relative error 11% (4% of its entries zero), and
    # 0.99973 / 2.4% when the loss scale follows the float16 UNet.
    assert reference.abs().max() > 0.5  # far above float16's rounding of the latents (~1e-3)
    cosine = F.cosine_similarity(half.flatten(), reference.flatten(), dim=0).item()
    assert cosine > 0.999
    assert relative_difference(half, reference) < 0.05


def test_float16_update_matches_float32(kind, components_cache, lpips_module):
    if not kind.float16:
        pytest.skip(
            f"{kind.pipeline_class.__name__} runs in bfloat16, not float16 (the transformers' activations overflow"
            " float16's range; bfloat16 has float32's and needs no loss scaling): test_bfloat16_synchronized_run_is_finite"
        )
    reference = synchronization_update(kind, components_cache, lpips_module, torch.float32)
    half = synchronization_update(kind, components_cache, lpips_module, torch.float16)
    assert_float16_update_matches_float32(reference, half)


def test_float16_unet_gradient_is_loss_scaled_when_the_vae_is_upcast(components_cache, lpips_module):
    """SDXL's VAE with `force_upcast=True` decodes in float32 inside a float16 pipeline; the gradient still goes
    back through the float16 UNet, so it needs the loss scale as much as with a float16 VAE."""
    kind = KINDS["sdxl"]
    reference = synchronization_update(kind, components_cache, lpips_module, torch.float32, force_upcast=True)
    half = synchronization_update(kind, components_cache, lpips_module, torch.float16, force_upcast=True)
    assert_float16_update_matches_float32(reference, half)


@torch.no_grad()
def test_bfloat16_synchronized_run_is_finite(kind, components_cache, lpips_module):
    """Every model in bfloat16: a synchronized run (its gradient pass in bfloat16, LPIPS in float32) gives finite
    bfloat16 latents (Z-Image: float32, as ZImagePipeline keeps them) and a finite image, and the synchronization
    acted. How close bfloat16's gradient is to float32's is measured in tests/test_flux.py."""
    pipe = kind.build(components_cache, lpips_module).to(torch.bfloat16)
    latents = kind.images(pipe, sync_thres=1)
    assert latents.dtype == kind.bfloat16_latents_dtype and latents.shape == kind.latent_shape(1, 64, 128)
    assert torch.isfinite(latents).all()
    assert relative_difference(latents, kind.images(pipe, sync_weight=0)) > FAST_MODE_EFFECT[kind.name]
    image = kind.images(pipe, num_inference_steps=1, sync_thres=1, output_type="np")
    assert image.shape == (1, 64, 128, 3) and np.isfinite(image).all()


# ---------------------------------------------------------------------------------------------------------------
# Schedulers: every class's own family runs synchronized, the other families are refused
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
@per_kind("schedulers")
def test_scheduler_runs_synchronized(kind, pipe, name):
    scheduler_class, options = kind.schedulers[name]
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **options)
    # 64x96 pixels: 2 views at stride 4, the second the anchor
    synchronized = kind.images(pipe, width=96, sync_thres=1)
    plain = kind.images(pipe, width=96, sync_weight=0)
    assert torch.isfinite(synchronized).all()
    assert relative_difference(synchronized, plain) > SCHEDULER_SYNC_EFFECT[kind.name]


# The synchronization acted: measured 1.3e-2 to 2.1e-2 (SD, SDXL, ControlNet), 2.0e-3 (FLUX), 1.2e-3 to 5.8e-3
# (FLUX.2 [klein]), 4.9e-3 to 8.5e-3 (Z-Image); float32 noise is below BATCHING_NOISE.
SCHEDULER_SYNC_EFFECT = {"sd": 5e-3, "sdxl": 5e-3, "controlnet": 5e-3, "flux": 5e-4, "flux2": 5e-4, "z_image": 1e-3}


@per_kind("refused_schedulers")
def test_scheduler_of_another_family_is_refused_before_any_model_runs(kind, pipe, monkeypatch, name):
    """The UNet classes refuse flow matching (an epsilon UNet under it gets a wrong clean-latent formula); FLUX
    refuses the variance-preserving and sigma-scaled schedulers (a velocity under them, the same)."""
    scheduler_class, options = kind.refused_schedulers[name]
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **options)
    calls = count_every_model(monkeypatch, pipe)
    with pytest.raises(ValueError) as error:
        kind(pipe)
    assert "`scheduler`" in str(error.value) and scheduler_class.__name__ in str(error.value)
    assert calls == []


# ---------------------------------------------------------------------------------------------------------------
# Generators: a list, one per image, with stochastic schedulers and several views per batch
# ---------------------------------------------------------------------------------------------------------------

# Measured: the two-image call and two one-image calls differ by up to 1.8e-5 (relative, Frobenius norm; guidance
# batches and the synchronization update round differently), 0 without synchronization; another generator for an
# image changes it by ~1.
GENERATOR_NOISE = 1e-4


def assert_each_image_is_its_own_call(kind, pipe, **call):
    """`num_images_per_prompt=2` with `generator=[g1, g2]`: image k is the image of a one-image call with `g_k`."""
    seeds = (1, 2)
    both = kind.images(
        pipe, num_images_per_prompt=2, generator=[torch.Generator().manual_seed(s) for s in seeds], **call
    )
    assert both.shape == kind.latent_shape(2, 64, call.get("width", 128)) and torch.isfinite(both).all()
    for k, seed in enumerate(seeds):
        alone = kind.images(pipe, generator=torch.Generator().manual_seed(seed), **call)
        assert relative_difference(both[k : k + 1], alone) < GENERATOR_NOISE, k


@torch.no_grad()
@per_kind("stochastic_schedulers")
def test_stochastic_scheduler_run_is_reproducible_from_its_generator(kind, pipe, name):
    """The step noise comes from `generator`, not from torch's global random state: the same seed, the same
    latents (another seed: the next test's ~1 relative difference)."""
    scheduler_class, options, call_options = kind.stochastic_schedulers[name]
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **options)
    first, second = (kind.images(pipe, sync_weight=0, **call_options) for _ in range(2))
    torch.testing.assert_close(first, second, atol=0, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("view_batch_size", [2, "auto"])
@per_kind("stochastic_schedulers")
def test_generator_list_gives_each_image_its_own_call(kind, pipe, name, view_batch_size):
    """Several views per batch and images per call, each image's step noise from its own generator (the step noise
    is what differs from a deterministic scheduler; synchronized: the next test)."""
    scheduler_class, options, call_options = kind.stochastic_schedulers[name]
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **options)
    assert_each_image_is_its_own_call(kind, pipe, sync_weight=0, view_batch_size=view_batch_size, **call_options)


@torch.no_grad()
def test_generator_list_gives_each_image_its_own_synchronized_call(kind, pipe):
    """The same with synchronization, each image synchronized to its own anchor (64x96 pixels: 2 views, one
    batch), under the class's first stochastic scheduler (Euler ancestral; FLUX: stochastic flow matching)."""
    scheduler_class, options, call_options = next(iter(kind.stochastic_schedulers.values()))
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **options)
    assert_each_image_is_its_own_call(kind, pipe, width=96, sync_thres=1, view_batch_size=2, **call_options)


# ---------------------------------------------------------------------------------------------------------------
# Stochastic schedulers' step noise: the same variance wherever views overlap
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
@per_kind("step_noise_schedulers")
def test_step_noise_variance_does_not_depend_on_the_view_overlap(kind, pipe, monkeypatch, name):
    """
    With a denoiser that predicts zeros (noise, or FLUX's velocity) and zero initial latents, the latents at the end
    are the schedulers' injected noise. Its variance must be a single image's in every column of the panorama: in
    the edge columns (one view) and in the centre (4 views at stride 2). Averaging independently drawn noise of k
    views instead leaves 1/k of it (measured: 0.24 of a single image's in the centre, 0.91 at the edges).
    """
    scheduler_class, options = kind.step_noise_schedulers[name]
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **options)
    zero_prediction_denoiser(monkeypatch, pipe, kind)
    images = 16  # 16 images x 4 channels (FLUX, Z-Image: 16; klein: 32) x 8 rows: 512 (2048, 4096) per latent column

    def final_latents(width):
        latents = kind.images(
            pipe,
            width=width,
            stride=2,
            num_images_per_prompt=images,
            latents=torch.zeros(images, kind.latent_channels, 8, width // 8),
            sync_weight=0,
            view_batch_size=3,
        )
        return kind.denoiser_latents(pipe, latents, 64, width)

    single = final_latents(64).var().item()
    assert single > 0
    column_variance = final_latents(128).var(dim=(0, 1, 2)) / single
    # views at columns 0, 2, ..., 8: columns 0-1 and 14-15 in one view, 6-9 in four
    edges, centre = column_variance[[0, 1, 14, 15]].mean().item(), column_variance[6:10].mean().item()
    # 2048 samples per group: a variance estimate's relative standard error is 3%
    assert 0.8 < edges < 1.25
    assert 0.8 < centre < 1.25


# ---------------------------------------------------------------------------------------------------------------
# Multi-ControlNet (ControlNet class only)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def multi_controlnet_pipe(components_cache, lpips_module):
    kind = KINDS["controlnet"]
    pipe = kind.build(components_cache, lpips_module)
    second = make_tiny_controlnet(pipe.unet, seed=1)
    multi = kind.pipeline_class(
        **{**pipe.components, "controlnet": MultiControlNetModel([pipe.controlnet, second])},
        requires_safety_checker=False,
    )
    multi.set_perceptual_loss(lpips_module)
    multi.set_progress_bar_config(disable=True)
    return multi


@pytest.mark.parametrize("argument", ["control_guidance_start", "control_guidance_end"])
def test_one_guidance_window_for_two_controlnets_is_refused(multi_controlnet_pipe, monkeypatch, argument):
    """A one-element list for two ControlNets is refused as diffusers refuses it (today `control_guidance_end=[1.0]`
    with scales `[1, 1]` silently drops the second ControlNet)."""
    pipe = multi_controlnet_pipe
    calls = count_every_model(monkeypatch, pipe)
    value = [0.0] if argument == "control_guidance_start" else [1.0]
    with pytest.raises(ValueError, match=names(argument)):
        KINDS["controlnet"](
            pipe,
            image=[condition_image(64, 128, seed) for seed in (0, 1)],
            controlnet_conditioning_scale=[1.0, 1.0],
            num_inference_steps=1,
            sync_weight=0,
            **{argument: value},
        )
    assert calls == []
