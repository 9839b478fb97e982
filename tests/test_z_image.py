"""Z-Image: `SyncDiffusionZImagePipeline` against diffusers' `ZImagePipeline` (one view) and against a plain panorama
loop written in `tests/z_image_reference.py` (MultiDiffusion and SyncDiffusion), on the tiny offline components of
`syncdiffusion_utils.testing.make_z_image_components`."""

import copy
import dataclasses
import inspect
import json
import logging
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ZImagePipeline

import pipeline_syncdiffusion_z_image
from pipeline_syncdiffusion_z_image import SyncDiffusionZImagePipeline, SyncSettings, crop_views
from syncdiffusion_utils.counting import PassCounter, expected_plain_step, expected_sync_step
from syncdiffusion_utils.testing import make_tiny_flux_decoder, make_z_image_components, save_tiny_z_image_pipeline
from tests import test_loading
from tests.reference_loop import SmoothPerceptualLoss
from tests.z_image_reference import default_sigmas, z_image_reference


pytestmark = pytest.mark.usefixtures("one_thread")

modules_cache = test_loading.modules_cache

PROMPT = "a photo of a beach"
# One view runs the same operations as ZImagePipeline on the same tensors: measured 0.0 in float32 in every case
# below. MultiDiffusion batches views whose positive and negative captions differ in length (padded, masked):
# measured 5.4e-7 against the reference. The bound is 1e-5, far below the errors it must catch (a guidance of 4.5
# for 5 moves one view's latents by 3.8e-2, `cfg_normalization=1.2` by 4.8e-2; test_the_guidance_options_change_the_image).
TOLERANCE = 1e-5
# Synchronized comparisons run in float64 with the smooth loss (tests/reference_loop.py says why): measured 9.2e-8 to
# 1.2e-7 of the largest latent (the core sums the views in float32, the scheduler steps in float32, the rotary
# embedding runs in float32), while a 1% weight error at the second synchronized step moves them by 2.3e-4 to 2.5e-4:
# 2e-6 lies between (17x above the noise, 110x below the error).
SYNC_TOLERANCE = 2e-6
SMALL = {"num_inference_steps": 3, "max_sequence_length": 32}
# 64x128 pixels, 64-pixel views at stride 4: 3 views (the middle one the anchor).
PANORAMA = {"height": 64, "width": 128, "window_size": 64, "stride": 4}


@pytest.fixture(scope="session")
def z_image_components():
    return make_z_image_components()


@pytest.fixture
def z_pair(z_image_components, lpips_module):
    """`(ZImagePipeline, SyncDiffusionZImagePipeline)` on copies of the same tiny components."""

    def build():
        reference = ZImagePipeline(**copy.deepcopy(z_image_components))
        ours = SyncDiffusionZImagePipeline(**copy.deepcopy(z_image_components))
        for pipe in (reference, ours):
            pipe.set_progress_bar_config(disable=True)
        ours.set_perceptual_loss(lpips_module)
        return reference, ours

    return build


@pytest.fixture
def ours(z_pair):
    return z_pair()[1]


def generator():
    return torch.Generator().manual_seed(0)


def noise(batch, height, width, seed=0, dtype=torch.float32):
    return torch.randn(batch, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------------------------------------------------
# One view is ZImagePipeline's image; the reference loop is too
# ---------------------------------------------------------------------------------------------------------------

ONE_VIEW = {
    "guidance": {},
    "no guidance": {"guidance_scale": 0.0},
    "two images per prompt": {"num_images_per_prompt": 2},
    "two prompts": {"prompt": [PROMPT, "a photo of a forest"], "negative_prompt": ["a city", "a desert"]},
    # truncation: the third of 3 steps (normalized time 0.4) runs without guidance
    "normalization and truncation": {"negative_prompt": "a city", "cfg_normalization": True, "cfg_truncation": 0.3},
    "normalization to 1.2": {"cfg_normalization": 1.2},
    "custom sigmas": {"sigmas": [1.0, 0.6, 0.3]},
}


@pytest.mark.parametrize("case", list(ONE_VIEW))
def test_one_view_is_z_image_pipelines_image(z_pair, case):
    reference, ours = z_pair()
    call = {"prompt": PROMPT, "height": 64, "width": 64, **SMALL, **ONE_VIEW[case]}
    # ZImagePipeline writes the chat-templated prompts into the lists it is given: each call gets its own.
    expected = reference(generator=generator(), output_type="latent", **copy.deepcopy(call)).images
    latents = ours(window_size=64, sync_weight=0, generator=generator(), output_type="latent", **call).images
    assert latents.shape == expected.shape and relative_error(latents, expected) < TOLERANCE


def test_one_view_decodes_as_z_image_pipeline(z_pair):
    reference, ours = z_pair()
    expected = reference(PROMPT, height=64, width=64, generator=generator(), output_type="np", **SMALL).images
    images = ours(PROMPT, height=64, width=64, window_size=64, generator=generator(), output_type="np", **SMALL).images
    assert images.shape == (1, 64, 64, 3) and abs(images - expected).max() < TOLERANCE


def test_one_view_in_bfloat16_is_z_image_pipelines_image(z_pair):
    """bfloat16 models with float32 latents and guidance in float32, as ZImagePipeline runs them (measured 0.0)."""
    reference, ours = (pipe.to(torch.bfloat16) for pipe in z_pair())
    call = {"height": 64, "width": 64, "cfg_normalization": True, "output_type": "np", **SMALL}
    expected = reference(PROMPT, generator=generator(), **call).images
    images = ours(PROMPT, window_size=64, generator=generator(), **call).images
    assert abs(images - expected).max() < TOLERANCE


def test_the_guidance_options_change_the_image(z_pair):
    """The one-view comparisons are sensitive to every guidance option on the tiny model."""
    reference, _ = z_pair()
    latents = noise(1, 64, 64)

    def run(**call):
        return reference(PROMPT, latents=latents, height=64, width=64, output_type="latent", **SMALL, **call).images

    plain = run()
    for call, at_least in (
        ({"guidance_scale": 4.5}, 1e-2),
        ({"cfg_normalization": True}, 1e-1),
        ({"cfg_normalization": 1.2}, 1e-2),
        ({"cfg_truncation": 0.3}, 1e-1),
        ({"guidance_scale": 0.0}, 1e-1),
    ):
        assert relative_error(run(**call), plain) > at_least, call


REFERENCE_ONE_VIEW = {
    "guidance": {},
    "no guidance": {"guidance_scale": 0.0},
    "normalization and truncation": {"negative_prompt": "a city", "cfg_normalization": True, "cfg_truncation": 0.3},
}


@pytest.mark.parametrize("case", list(REFERENCE_ONE_VIEW))
def test_reference_one_view_is_z_image_pipelines_image(z_pair, case):
    reference, _ = z_pair()
    call = REFERENCE_ONE_VIEW[case]
    latents = noise(1, 64, 64)
    ours = z_image_reference(reference, PROMPT, latents, 3, window=8, stride=8, max_sequence_length=32, **call)
    expected = reference(PROMPT, latents=latents, height=64, width=64, output_type="latent", **SMALL, **call).images
    assert relative_error(ours, expected) < TOLERANCE


def test_reference_default_sigmas_are_z_image_pipelines():
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

    assert default_sigmas(7) == get_default_z_image_sigmas(7)


@pytest.mark.parametrize("dynamic_shift", [False, True])
def test_tiles_are_independent_z_image_images(z_pair, dynamic_shift):
    """With stride = window the views tile the panorama: each tile is ZImagePipeline's image of its own noise, so
    each view has an image's own position ids and the window's timestep shift (with dynamic shifting, a panorama's
    token count would shift the sigmas further)."""
    reference, ours = z_pair()
    if dynamic_shift:
        for pipe in (reference, ours):
            pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    latents = noise(1, 128, 192)
    call = {"prompt": PROMPT, "output_type": "latent", **SMALL}
    panorama = ours(latents=latents, height=128, width=192, window_size=64, stride=8, sync_weight=0, **call).images
    for row in (0, 8):
        for column in (0, 8, 16):
            tile = latents[:, :, row : row + 8, column : column + 8]
            expected = reference(latents=tile, height=64, width=64, **call).images
            assert relative_error(panorama[:, :, row : row + 8, column : column + 8], expected) < TOLERANCE
    whole = reference(latents=latents, height=128, width=192, **call).images
    assert relative_error(panorama, whole) > 100 * TOLERANCE  # one image of the whole size is another thing


def test_call_takes_every_z_image_pipeline_argument():
    """Every `ZImagePipeline.__call__` argument, in its order and with its default except the panorama's size."""
    ours = inspect.signature(SyncDiffusionZImagePipeline.__call__).parameters
    theirs = inspect.signature(ZImagePipeline.__call__).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for name, parameter in theirs.items():
        if name not in ("height", "width"):
            assert ours[name].default == parameter.default, name
    assert (ours["height"].default, ours["width"].default) == (1024, 4096)


def test_components_and_loaders_are_z_image_pipelines():
    ours = inspect.signature(SyncDiffusionZImagePipeline.__init__).parameters
    assert list(ours) == list(inspect.signature(ZImagePipeline.__init__).parameters)
    for base in ZImagePipeline.__mro__[1:]:
        if base.__name__.endswith("Mixin"):
            assert issubclass(SyncDiffusionZImagePipeline, base), base.__name__
    assert SyncDiffusionZImagePipeline.model_cpu_offload_seq == ZImagePipeline.model_cpu_offload_seq


# ---------------------------------------------------------------------------------------------------------------
# Several views: MultiDiffusion and SyncDiffusion against the reference loop
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("view_batch_size", [1, 3, "auto"])
def test_multidiffusion_equals_the_reference_loop(ours, circular, view_batch_size):
    latents = noise(1, 64, 160)  # 8x20 latents: 4 views at stride 4 (5 circular)
    expected = z_image_reference(
        ours, PROMPT, latents, 3, window=8, stride=4, circular=circular, max_sequence_length=32
    )
    panorama = ours(
        PROMPT,
        height=64,
        width=160,
        window_size=64,
        stride=4,
        circular_padding=circular,
        view_batch_size=view_batch_size,
        latents=latents,
        sync_weight=0,
        output_type="latent",
        **SMALL,
    ).images
    assert relative_error(panorama, expected) < TOLERANCE


def test_circular_views_turn_with_the_panorama(ours):
    """Circular views are the same all the way round: turning the noise by a multiple of the stride turns the
    MultiDiffusion panorama by as much, seam included."""

    def run(latents, circular=True):
        call = {"height": 64, "width": 128, "window_size": 64, "stride": 4, "sync_weight": 0, "output_type": "latent"}
        return ours(PROMPT, latents=latents, circular_padding=circular, **call, **SMALL).images

    latents = noise(1, 64, 128)
    panorama = run(latents)
    assert relative_error(run(latents.roll(4, -1)), panorama.roll(4, -1)) < TOLERANCE
    assert relative_error(run(latents, circular=False), panorama) > 100 * TOLERANCE


@torch.no_grad()
def test_circular_panorama_is_decoded_with_wrapped_columns(ours):
    call = {**PANORAMA, "circular_padding": True, "sync_weight": 0, "generator": generator(), **SMALL}
    latents = ours(PROMPT, output_type="latent", **call).images
    call["generator"] = generator()
    image = ours(PROMPT, output_type="pt", **call).images
    padded = ours.decode_latents_with_padding(latents)
    plain = ours._vae_decode(latents)
    assert padded.shape == plain.shape == (1, 3, 64, 128)
    assert torch.allclose(image, (padded / 2 + 0.5).clamp(0, 1), atol=1e-6)
    assert (padded - plain)[..., :4].abs().max() > 1e-3  # the edge columns see the other edge


SYNC_CASES = {
    "guidance": ({}, {}, 1),
    "two views per batch": ({"view_batch_size": 2}, {}, 1),
    "normalization and truncation": (
        {},
        {"negative_prompt": "a city", "cfg_normalization": 1.0, "cfg_truncation": 0.3},
        1,
    ),
    "no guidance": ({}, {"guidance_scale": 0.0}, 1),
    "two images per prompt": ({"num_images_per_prompt": 2, "view_batch_size": 3}, {}, 2),
}


@pytest.mark.parametrize("case", list(SYNC_CASES))
def test_synchronization_equals_the_reference_loop(ours, case):
    """The gradient goes through the guided velocity (the transformer's doubled batch, normalization included), the
    VAE decoder and the loss; every image is synchronized to its own anchor. In float64 with the smooth loss."""
    pipeline_only, shared, num_images = SYNC_CASES[case]
    ours = ours.to(torch.float64)
    ours.set_perceptual_loss(SmoothPerceptualLoss())
    latents = noise(num_images, 64, 128, dtype=torch.float64)
    run = {"sync_weight": 20.0, "sync_thres": 2, "max_sequence_length": 32, **shared}
    reference = {"window": 8, "stride": 4, "perceptual_loss": SmoothPerceptualLoss(), **run}
    expected = z_image_reference(ours, PROMPT, latents, 3, **reference)
    call = {**PANORAMA, "num_inference_steps": 3, **pipeline_only}
    panorama = ours(PROMPT, latents=latents, output_type="latent", **call, **run).images
    assert panorama.dtype == torch.float64
    assert relative_error(panorama, expected) < SYNC_TOLERANCE
    wrong = z_image_reference(
        ours, PROMPT, latents, 3, weight_at=lambda step: 20.0 * 0.95**step * (1.01 if step == 1 else 1.0), **reference
    )
    assert relative_error(panorama, wrong) > 10 * SYNC_TOLERANCE


def test_one_update_lowers_the_views_lpips_distance_to_the_anchor(ours):
    """The mechanism with LPIPS: the step brings the view's predicted image closer to the anchor's, the opposite
    step moves it away."""
    ours._guidance_scale, ours._joint_attention_kwargs, ours._current_guidance_scale = 5.0, None, 5.0
    with torch.no_grad():
        positive = ours._text_conditioning(PROMPT, None, 1, "cpu", 32)
        negative = ours._text_conditioning([""], None, 1, "cpu", 32)
    conditioning = ours._conditioning(positive, negative, False)
    ours.scheduler.set_timesteps(sigmas=default_sigmas(20))
    ours.scheduler.set_begin_index(0)
    t = ours.scheduler.timesteps[0]
    views = ours.get_views(64, 128, 64, stride=4)
    latents = noise(1, 64, 128, seed=5)
    sync = SyncSettings()
    anchor = ours.prepare_anchor(latents, views[1], t, conditioning, sync)
    before = crop_views(latents, views[:1])

    @torch.no_grad()
    def distance(view_latents):
        velocity = ours.predict_noise(view_latents, t, conditioning, views[:1])
        image = ours.decode_for_sync(ours.predict_clean_latents(view_latents, velocity, t))
        return ours.perceptual_distance(image, anchor["images"]).item()

    def updated(weight):
        return ours.synchronize_views(before, views[:1], anchor["images"], t, weight, conditioning, sync)[0]

    assert distance(updated(20.0)) < distance(before) < distance(updated(-20.0))


def test_bfloat16_synchronized_panorama_is_finite(ours):
    """bfloat16 models with float32 latents, as ZImagePipeline runs them; LPIPS stays in float32."""
    ours = ours.to(torch.bfloat16)
    panorama = ours(PROMPT, generator=generator(), sync_thres=2, output_type="latent", **PANORAMA, **SMALL).images
    assert panorama.dtype == torch.float32 and torch.isfinite(panorama).all() and panorama.std() > 0.1


# ---------------------------------------------------------------------------------------------------------------
# Passes
# ---------------------------------------------------------------------------------------------------------------

MODES = {
    "exact": ({}, {}),
    "x0 gradient": ({"sync_gradient": "x0"}, {"gradient": "x0"}),
    "reused velocity": ({"sync_reuse_noise": True}, {"reuse_noise": True}),
    "fast": ({"sync_mode": "fast"}, {"gradient": "x0", "reuse_noise": True}),
    "checkpointing": ({"sync_gradient_checkpointing": True}, {"checkpointing": True}),
    "fast with checkpointing": (
        {"sync_mode": "fast", "sync_gradient_checkpointing": True},
        {"gradient": "x0", "reuse_noise": True, "checkpointing": True},
    ),
}
COUNTED = (
    "transformer_fwd",
    "transformer_recompute",
    "transformer_bwd",
    "dec_fwd",
    "dec_bwd",
    "lpips_fwd",
    "lpips_bwd",
)


def expected_counts(steps, synchronized, **formula):
    """`steps` steps of 3 views, the first `synchronized` of them synchronized, in view-passes."""
    sync = expected_sync_step(3, denoiser="transformer", **formula)
    plain = expected_plain_step(3, denoiser="transformer")
    return {key: synchronized * sync[key] + (steps - synchronized) * plain[key] for key in COUNTED}


class TransformerBackwards:
    """
    The transformer's backwards and recomputed forwards, in view-passes, which `PassCounter` misses for Z-Image: it
    counts them with a full backward hook, and torch fires that only for a module whose output holds tensors at its
    top level, while this transformer returns a list of images. Its final layer returns a tensor, and its backward is
    the transformer's. Activation checkpointing re-runs the blocks in the backward: the first refiner block running
    outside the transformer's forward starts a recomputation.
    """

    def __init__(self, pipe, num_images=1):
        self.pipe, self.num_images = pipe, num_images
        self.counts = {"transformer_bwd": 0, "transformer_recompute": 0}
        self.depth = 0

    def add(self, key, batch):
        self.counts[key] += Fraction(batch, self.num_images * (2 if self.pipe._true_cfg else 1))

    def __enter__(self):
        transformer = self.pipe.transformer
        final_layer = next(iter(transformer.all_final_layer.values()))

        def enter(module, args):
            self.depth += 1

        def leave(module, args, output):
            self.depth -= 1

        def block(module, args):
            if not self.depth:
                self.add("transformer_recompute", args[0].shape[0])

        self.handles = [
            transformer.register_forward_pre_hook(enter),
            transformer.register_forward_hook(leave),
            final_layer.register_full_backward_hook(lambda m, gi, go: self.add("transformer_bwd", go[0].shape[0])),
            transformer.noise_refiner[0].register_forward_pre_hook(block),
        ]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return False


def count_passes(pipe, num_images=1, sync_decoder=None, **call):
    """The view-passes of one call as `PassCounter` counts them, checked against hooks on the final layer."""
    with PassCounter(pipe, sync_decoder=sync_decoder) as counter, TransformerBackwards(pipe, num_images) as backwards:
        pipe(PROMPT, sync_decoder=sync_decoder, **call)
    counts = counter.as_dict()
    # PassCounter counts Z-Image's backwards (through its list output's tensors): the final layer's hooks agree.
    assert {key: counts[key] for key in backwards.counts} == backwards.counts
    return counts


# The counter's backward hooks on the decoder also fire where only its output needs a gradient; torch says so.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize(
    "mode, guidance",
    [(mode, {}) for mode in MODES]
    + [("exact", {"guidance_scale": 0.0}), ("exact", {"num_images_per_prompt": 2}), ("fast", {"guidance_scale": 0.0})],
)
def test_passes_follow_the_formulas(ours, mode, guidance):
    """A view-pass is one view's guided velocity: one transformer call on the doubled batch with guidance, counted
    once per image."""
    call, formula = MODES[mode]
    num_images = guidance.get("num_images_per_prompt", 1)
    run = {"sync_thres": 2, "view_batch_size": 2, "output_type": "np", **PANORAMA, **SMALL, **call, **guidance}
    counts = count_passes(ours, num_images, **run)
    assert {key: counts[key] for key in COUNTED} == expected_counts(3, 2, **formula)
    assert counts["final_decode"] == 1


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_truncated_guidance_counts_one_view_pass_per_view_and_halves_the_transformer_batch(ours):
    """With `cfg_truncation` the last step runs unguided: a view is still one view-pass, on half the batch."""
    batches = []
    ours.transformer.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    counts = count_passes(ours, sync_thres=1, cfg_truncation=0.3, output_type="latent", **PANORAMA, **SMALL)
    assert {key: counts[key] for key in COUNTED} == expected_counts(3, 1)
    # 3 views a step, guided at the first two; the first step synchronized (the anchor, 2 gradient passes, 2 after)
    assert batches == [2] * 5 + [2] * 3 + [1] * 3


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_tiny_decoder_replaces_the_vae_in_the_loss(ours):
    decoder = make_tiny_flux_decoder(width_mult=0.125)
    run = {"sync_thres": 2, "sync_mode": "fast", "output_type": "latent", **PANORAMA, **SMALL}
    counts = count_passes(ours, sync_decoder=decoder, **run)
    assert {key: counts[key] for key in COUNTED} == expected_counts(3, 2, gradient="x0", reuse_noise=True)
    assert counts["sync_dec_fwd"] == 2 * 3 and counts["vae_dec_fwd"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------


def test_auto_view_batches_fit_the_gradient_pass_or_checkpoint(ours, monkeypatch):
    """On CUDA, "auto" divides the free memory by the per-view estimates; when one view's gradient pass does not fit,
    it turns on gradient checkpointing (CUDA's free memory is faked here)."""
    ours._window_size, ours._text_tokens, ours._true_cfg = 64, 32, True
    sync = SyncSettings()
    gradient_pass = ours.view_memory(1, torch.float32, sync)
    assert gradient_pass > 10 * ours.view_memory(1, torch.float32)
    free = {}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 10 * free["bytes"]))
    free["bytes"] = int(2.5 * gradient_pass / ours.AUTO_MEMORY_FRACTION)
    view_batch_size, fitted = ours.auto_view_batch_sizes(5, 1, "cuda", torch.float32, True, sync)
    assert view_batch_size == 5 and fitted.gradient_batch_size == 2 and not fitted.checkpointing
    free["bytes"] = int(0.5 * gradient_pass / ours.AUTO_MEMORY_FRACTION)
    _, checkpointed = ours.auto_view_batch_sizes(5, 1, "cuda", torch.float32, True, sync)
    assert checkpointed.checkpointing and checkpointed.gradient_batch_size >= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("guidance_scale", [0.0, 5.0])
def test_the_transformer_estimate_matches_what_autograd_saves(ours, dtype, guidance_scale):
    """The gradient pass's transformer term of `view_memory` against the bytes autograd saves in it (saved-tensor
    hooks, weights excluded) on the tiny transformer: within a factor 2 (measured 0.95 in float32 and bfloat16)."""
    ours = ours.to(dtype)
    ours._joint_attention_kwargs, ours._current_guidance_scale = None, guidance_scale
    with torch.no_grad():
        positive = ours._text_conditioning(PROMPT, None, 1, "cpu", 32)
        negative = ours._text_conditioning([""], None, 1, "cpu", 32)
    conditioning = ours._conditioning(positive, negative if guidance_scale else None, False)
    tokens = max(len(e) for e in positive + negative)
    ours._window_size, ours._text_tokens, ours._true_cfg = 64, tokens, guidance_scale > 0
    sync = SyncSettings()
    estimate = ours.view_memory(1, dtype, sync) - ours.view_memory(
        1, dtype, dataclasses.replace(sync, through_denoiser=False)
    )
    weights = {p.data_ptr() for p in ours.transformer.parameters()}
    saved = {}

    def pack_hook(tensor):
        if tensor.data_ptr() not in weights:
            saved[(tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)] = tensor.numel() * tensor.element_size()
        return tensor

    latents = noise(1, 64, 64).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda tensor: tensor):
        ours.predict_noise(latents, torch.tensor(900.0), conditioning, [(0, 8, 0, 8)])
    measured = sum(saved.values())
    assert 0.5 < estimate / measured < 2, estimate / measured


# ---------------------------------------------------------------------------------------------------------------
# Callbacks, embeddings, keywords
# ---------------------------------------------------------------------------------------------------------------


def test_callbacks_see_and_replace_latents_as_with_z_image_pipeline(z_pair):
    reference, ours = z_pair()
    seen = {}

    def halve_at_first_step(pipe, step, timestep, tensors):
        seen.setdefault(type(pipe).__name__, []).append(tuple(tensors["latents"].shape))
        return {"latents": tensors["latents"] / 2} if step == 0 else {}

    call = {"height": 64, "width": 64, "output_type": "latent", **SMALL}
    expected = reference(PROMPT, generator=generator(), callback_on_step_end=halve_at_first_step, **call).images
    latents = ours(PROMPT, window_size=64, generator=generator(), callback_on_step_end=halve_at_first_step, **call)
    assert seen["ZImagePipeline"] == seen["SyncDiffusionZImagePipeline"] == [(1, 16, 8, 8)] * 3
    assert relative_error(latents.images, expected) < TOLERANCE
    assert relative_error(expected, reference(PROMPT, generator=generator(), **call).images) > 0.01


def test_a_callback_replacing_the_prompt_embeddings_conditions_the_next_steps(z_pair):
    reference, ours = z_pair()
    with torch.no_grad():
        other = ours._text_conditioning("a photo of a forest", None, 1, "cpu", 32)

    def swap(pipe, step, timestep, tensors):
        return {"prompt_embeds": other} if step == 0 else {}

    call = {"height": 64, "width": 64, "output_type": "latent", "callback_on_step_end": swap, **SMALL}
    inputs = {"callback_on_step_end_tensor_inputs": ["latents", "prompt_embeds"]}
    expected = reference(PROMPT, generator=generator(), **call, **inputs).images
    latents = ours(PROMPT, window_size=64, generator=generator(), **call, **inputs).images
    assert relative_error(latents, expected) < TOLERANCE
    call.pop("callback_on_step_end")
    assert relative_error(latents, ours(PROMPT, window_size=64, generator=generator(), **call).images) > 0.01


def test_without_a_text_encoder_from_embeddings(ours):
    """Caption embeddings for the prompt and the negative prompt ("" by default) instead of the text encoder, repeated
    per image."""
    with torch.no_grad():
        embeds = ours._text_conditioning(PROMPT, None, 1, "cpu", 32)
        negative = ours._text_conditioning([""], None, 1, "cpu", 32)
    call = {**PANORAMA, "sync_thres": 2, "num_images_per_prompt": 2, "output_type": "latent", **SMALL}
    expected = ours(PROMPT, generator=generator(), **call).images
    bare = SyncDiffusionZImagePipeline(**dict(ours.components, text_encoder=None, tokenizer=None))
    bare.set_perceptual_loss(ours._perceptual_loss)
    bare.set_progress_bar_config(disable=True)
    latents = bare(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=generator(), **call).images
    assert latents.shape == (2, 16, 8, 16) and relative_error(latents, expected) < TOLERANCE


def test_the_callers_prompt_list_is_left_as_it_was(ours):
    """ZImagePipeline's `_encode_prompt` writes the chat-templated prompts into the list it is given."""
    prompts = [PROMPT, "a photo of a forest"]
    negative = ["a city", "a desert"]
    ours(prompts, negative_prompt=negative, sync_weight=0, output_type="latent", **PANORAMA, **SMALL)
    assert prompts == [PROMPT, "a photo of a forest"] and negative == ["a city", "a desert"]


def test_a_string_negative_prompt_serves_every_prompt(ours):
    call = {**PANORAMA, "sync_weight": 0, "output_type": "latent", **SMALL}
    prompts = [PROMPT, "a photo of a forest"]
    one = ours(prompts, negative_prompt="a city", generator=generator(), **call).images
    each = ours(prompts, negative_prompt=["a city"] * 2, generator=generator(), **call).images
    assert torch.equal(one, each)


def save_tiny_z_image_lora(folder, transformer, seed=1, rank=4):
    """A random LoRA of `transformer`'s attention projections in diffusers' Z-Image LoRA format (both LoRA matrices
    random: a fresh LoRA's zero B would change nothing); `transformer` is left unchanged."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    adapted = copy.deepcopy(transformer)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    adapted.add_adapter(config)
    ZImagePipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(adapted))
    return folder


def test_a_tiny_lora_loads_scales_and_unloads(ours, tmp_path):
    """`load_lora_weights` (ZImageLoraLoaderMixin) changes the synchronized panorama, `joint_attention_kwargs`'s
    `scale` scales it (measured: 0.39 with the LoRA, 0.25 at scale 0.5), and unloading gives the panorama back."""
    pytest.importorskip("peft")  # diffusers' load_lora_weights requires the peft backend

    def run(**call):
        return ours(PROMPT, generator=generator(), sync_thres=1, output_type="latent", **PANORAMA, **SMALL, **call)

    plain = run().images
    ours.load_lora_weights(save_tiny_z_image_lora(tmp_path, ours.transformer))
    adapted, half = run().images, run(joint_attention_kwargs={"scale": 0.5}).images
    assert relative_error(adapted, plain) > 0.1 and relative_error(half, plain) > 0.05
    assert relative_error(half, adapted) > 0.05
    ours.unload_lora_weights()
    assert torch.equal(run().images, plain)


def test_an_unknown_keyword_is_a_type_error(ours):
    with pytest.raises(TypeError, match="`sync_weigth`"):
        ours(PROMPT, height=64, width=64, window_size=64, sync_weigth=1.0, **SMALL)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the argument, before any model runs
# ---------------------------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "window_size": {"window_size": 72},
    "height": {"height": 72},
    "width": {"width": 136},
    "stride": {"stride": 3},
    "stride ": {"stride": 0},
    "height  ": {"height": 48},
    "view_batch_size": {"view_batch_size": 0},
    "circular_padding": {"circular_padding": "yes"},
    "sync_weight": {"sync_weight": -1.0},
    "sync_decay_rate": {"sync_decay_rate": 0.0},
    "sync_freq": {"sync_freq": 0},
    "sync_thres": {"sync_thres": -1},
    "sync_mode": {"sync_mode": "slow"},
    "sync_gradient": {"sync_gradient": "unet"},
    "sync_lpips_size": {"sync_lpips_size": 16},
    "sync_decode_downsample": {"sync_decode_downsample": 3},
    "num_inference_steps": {"num_inference_steps": 0},
    "guidance_scale": {"guidance_scale": -1.0},
    "cfg_normalization": {"cfg_normalization": "yes"},
    "cfg_normalization ": {"cfg_normalization": -0.5},
    "cfg_truncation": {"cfg_truncation": "0.5"},
    "max_sequence_length": {"max_sequence_length": 0},
    "negative_prompt": {"negative_prompt": ["a city", "a desert"]},
    "prompt": {"prompt": 3},
    "latents": {"latents": torch.zeros(1, 16, 8, 8)},
    "generator": {"generator": [torch.Generator(), torch.Generator()]},
    "callback_on_step_end_tensor_inputs": {"callback_on_step_end_tensor_inputs": ["negative_prompt_embeds"]},
    "region_masks": {"region_masks": [torch.ones(64, 128)]},
    "region_prompts": {"region_prompts": "a red barn", "region_masks": [torch.ones(64, 128)]},
}


def watch_models(pipe):
    """A list that records every model forward of `pipe`."""
    calls = []
    for name in ("text_encoder", "transformer", "vae"):
        model = getattr(pipe, name)
        if model is not None:
            model.register_forward_pre_hook(lambda module, args, name=name: calls.append(name))
    return calls


@pytest.mark.parametrize("argument", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_argument(ours, argument):
    calls = watch_models(ours)
    call = {"prompt": PROMPT, **PANORAMA, **SMALL, **BAD_INPUTS[argument]}
    with pytest.raises(ValueError) as error:
        ours(**call)
    message = str(error.value)
    assert f"`{argument.strip()}`" in message and "\n" not in message
    assert calls == []


def test_bad_embeddings_are_refused_before_any_model_runs(ours):
    with torch.no_grad():
        embeds = ours._text_conditioning(PROMPT, None, 1, "cpu", 32)
    calls = watch_models(ours)
    call = {**PANORAMA, "num_inference_steps": 2}
    for arguments, name in (
        ({"prompt_embeds": embeds}, "negative_prompt_embeds"),  # guidance needs the negative side too
        ({"prompt_embeds": embeds[0]}, "prompt_embeds"),  # a tensor, not a list of them
        ({"prompt_embeds": [embeds[0][:, :8]], "guidance_scale": 0.0}, "prompt_embeds"),
        ({"prompt": PROMPT, "prompt_embeds": embeds}, "prompt_embeds"),
        ({"prompt_embeds": embeds, "negative_prompt_embeds": embeds * 2}, "negative_prompt_embeds"),
        ({"prompt": PROMPT, "negative_prompt": "a city", "negative_prompt_embeds": embeds}, "negative_prompt_embeds"),
    ):
        with pytest.raises(ValueError, match=f"`{name}`"):
            ours(**arguments, **call)
    assert calls == []


def test_another_scheduler_family_is_refused(ours):
    ours.scheduler = DDIMScheduler()
    calls = watch_models(ours)
    with pytest.raises(ValueError, match="`scheduler`"):
        ours(PROMPT, **PANORAMA, **SMALL)
    assert calls == []


# ---------------------------------------------------------------------------------------------------------------
# Region prompts, synchronized: the invariants
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synchronized_panorama(z_image_components, lpips_module):
    """The synchronized panorama without regions (exact mode, LPIPS), made once."""
    pipe = SyncDiffusionZImagePipeline(**copy.deepcopy(z_image_components))
    pipe.set_perceptual_loss(lpips_module)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, generator=generator(), sync_thres=2, output_type="latent", **PANORAMA, **SMALL).images


def regions_run(pipe, **regions):
    return pipe(PROMPT, generator=generator(), sync_thres=2, output_type="latent", **PANORAMA, **SMALL, **regions)


def test_a_region_with_an_empty_mask_changes_nothing(ours, synchronized_panorama, caplog):
    with caplog.at_level(logging.WARNING):
        empty = regions_run(ours, region_prompts=["a red barn"], region_masks=[torch.zeros(64, 128)]).images
    assert torch.equal(empty, synchronized_panorama)
    assert any("`region_masks[0]` covers no latent pixel" in record.getMessage() for record in caplog.records)


def test_a_region_everywhere_with_the_background_prompt_changes_nothing(ours, synchronized_panorama):
    """A mask over the whole panorama leaves the background no weight; with the background's own prompt (and
    negative) every view is denoised as without regions, bootstrapping included: the mask leaves no outside."""
    everywhere = {"region_masks": [torch.ones(64, 128)]}
    same = regions_run(ours, region_prompts=[PROMPT], **everywhere).images
    assert (same - synchronized_panorama).abs().max() <= 1e-6 * synchronized_panorama.abs().max()
    other = regions_run(ours, region_prompts=["a red barn"], **everywhere).images
    assert relative_error(other, synchronized_panorama) > 1e-2


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_region_passes_are_the_prompts_present_in_each_view(ours):
    """A region over the left 24 pixels (3 latent columns) is present in the first view only (the views start at
    latent columns 0, 4 and 8): its denoiser passes double there."""
    mask = torch.zeros(64, 128)
    mask[:, :24] = 1
    regions = {"region_prompts": ["a red barn"], "region_masks": [mask], "region_bootstrap_steps": 0}
    counts = count_passes(
        ours, generator=generator(), sync_thres=2, output_type="latent", **PANORAMA, **SMALL, **regions
    )
    prompts = [2, 1, 1]
    sync = expected_sync_step(3, denoiser="transformer", view_prompts=prompts)
    plain = expected_plain_step(3, denoiser="transformer", view_prompts=prompts)
    assert {key: counts[key] for key in COUNTED} == {key: 2 * sync[key] + plain[key] for key in COUNTED}


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

LOAD_CALL = {**PANORAMA, "sync_thres": 2, "output_type": "np", **SMALL}
# Weights loaded from safetensors sit at other memory alignments, where CPU kernels may round differently, and the
# synchronized steps amplify that through LPIPS (measured here: 0.0; FLUX's loaded pipelines: 3.4e-5); another
# seed's VAE or text encoder changes the images by 1.0 or 0.64.
LOADED_TOLERANCE = 2e-4


def images_of(pipe, lpips_module):
    pipe.set_perceptual_loss(lpips_module)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, generator=generator(), **LOAD_CALL).images


@pytest.fixture(scope="module")
def z_image_folder(tmp_path_factory):
    return save_tiny_z_image_pipeline(tmp_path_factory.mktemp("z_image") / "model")


@pytest.fixture(scope="module")
def expected_images(z_image_folder, lpips_module):
    return images_of(SyncDiffusionZImagePipeline.from_pretrained(z_image_folder), lpips_module)


def test_from_z_image_pipeline_and_its_components(z_pair, lpips_module):
    reference, ours = z_pair()
    expected = images_of(ours, lpips_module)
    for pipe in (
        SyncDiffusionZImagePipeline.from_pipe(reference),
        SyncDiffusionZImagePipeline(**reference.components),
    ):
        assert type(pipe) is SyncDiffusionZImagePipeline
        assert abs(images_of(pipe, lpips_module) - expected).max() == 0


@pytest.mark.parametrize("how", ["file", "folder"])
def test_custom_pipeline_from_a_file_or_folder(
    z_image_folder, expected_images, lpips_module, tmp_path, how, modules_cache
):
    source = Path(pipeline_syncdiffusion_z_image.__file__)
    if how == "folder":
        (tmp_path / "code").mkdir()
        (tmp_path / "code" / "pipeline.py").write_bytes(source.read_bytes())
        custom = str(tmp_path / "code")
    else:
        custom = str(source)
    pipe = DiffusionPipeline.from_pretrained(z_image_folder, custom_pipeline=custom, trust_remote_code=True)
    assert type(pipe).__name__ == "SyncDiffusionZImagePipeline" and type(pipe) is not SyncDiffusionZImagePipeline
    assert abs(images_of(pipe, lpips_module) - expected_images).max() < LOADED_TOLERANCE


def test_saved_pipeline_carries_its_source_and_reloads(
    z_image_folder, expected_images, lpips_module, tmp_path, modules_cache
):
    SyncDiffusionZImagePipeline.from_pretrained(z_image_folder).save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    source = Path(pipeline_syncdiffusion_z_image.__file__).read_bytes()
    assert (saved / "syncdiffusion_z_image.py").read_bytes() == source
    model_index = json.loads((saved / "model_index.json").read_text())
    assert model_index["_class_name"] == ["syncdiffusion_z_image", "SyncDiffusionZImagePipeline"]
    assert model_index["transformer"] == ["diffusers", "ZImageTransformer2DModel"]
    direct = SyncDiffusionZImagePipeline.from_pretrained(saved)
    remote = DiffusionPipeline.from_pretrained(saved, trust_remote_code=True)
    by_name = DiffusionPipeline.from_pretrained(saved, custom_pipeline="syncdiffusion_z_image", trust_remote_code=True)
    assert type(direct) is SyncDiffusionZImagePipeline
    for pipe in (remote, by_name):
        assert type(pipe).__name__ == "SyncDiffusionZImagePipeline" and type(pipe) is not SyncDiffusionZImagePipeline
    for pipe in (direct, remote, by_name):
        assert abs(images_of(pipe, lpips_module) - expected_images).max() < LOADED_TOLERANCE
