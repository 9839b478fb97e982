"""FLUX.2 [klein]: the plain panorama loop (`tests/flux2_reference.py`) against diffusers' `Flux2KleinPipeline`, and
`SyncDiffusionFlux2KleinPipeline` against both: one view, MultiDiffusion, synchronization, passes, bad input,
loading, region prompts."""

import copy
import dataclasses
import inspect
import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderTiny, DDIMScheduler, DiffusionPipeline, Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

import pipeline_syncdiffusion_flux2
from pipeline_syncdiffusion_flux2 import SyncDiffusionFlux2KleinPipeline, SyncSettings, crop_views
from syncdiffusion_utils.counting import PassCounter, expected_plain_step, expected_sync_step
from syncdiffusion_utils.testing import make_flux2_klein_components, save_tiny_flux2_klein_pipeline
from tests import test_hub, test_loading
from tests.flux2_reference import (
    empirical_mu,
    flux2_reference,
    image_ids,
    normalized_latents,
    pack,
    patchify,
    shifted_sigmas,
    unpack,
    unpatchify,
    vae_latents,
)
from tests.reference_loop import SmoothPerceptualLoss


# Loading tests reuse the fake Hub and the custom-code cache of the SD loading tests.
fake_hub = test_hub.fake_hub
modules_cache = test_loading.modules_cache

PROMPT = "a photo of a beach"
# Flux2KleinPipeline and this pipeline run the same operations on the same tensors for one view: measured 0.0 in
# float32 (images and latents, every case below). The bound leaves room for other CPU kernels and lies far below the
# errors it must catch: guidance 3.5 for 4.0 moves the image by 2.7e-3, the shift of twice the window's tokens by 2.1e-3.
TOLERANCE = 1e-5
# 64x128 pixels: 8x16 latents, 8-latent (64-pixel) views at stride 4 -> 3 views; 3 steps, a short text.
SMALL = {"num_inference_steps": 3, "max_sequence_length": 32}
WIDE = {"height": 64, "width": 128, "window_size": 64, "stride": 4}


@pytest.fixture(scope="session")
def klein_components_cache():
    return {}


@pytest.fixture
def klein_pair(klein_components_cache):
    """`(Flux2KleinPipeline, SyncDiffusionFlux2KleinPipeline)` on copies of the same tiny components (the smooth
    perceptual loss); `klein_pair(is_distilled=True)` for a step-distilled model."""

    def build(is_distilled=False):
        if is_distilled not in klein_components_cache:
            klein_components_cache[is_distilled] = make_flux2_klein_components(is_distilled=is_distilled)
        parts = copy.deepcopy(klein_components_cache[is_distilled])
        klein, ours = Flux2KleinPipeline(**copy.deepcopy(parts)), SyncDiffusionFlux2KleinPipeline(**parts)
        for pipe in (klein, ours):
            pipe.set_progress_bar_config(disable=True)
        ours.set_perceptual_loss(SmoothPerceptualLoss())
        return klein, ours

    return build


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def noise(batch, height, width, seed=0, dtype=torch.float32):
    """FLUX.2's initial noise as Flux2KleinPipeline draws it, `(batch, 128, height / 16, width / 16)`."""
    return torch.randn(batch, 128, height // 16, width // 16, generator=generator(seed), dtype=dtype)


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def reference_image(seed=0, size=(64, 80)):
    """A random RGB reference image (FLUX.2's editing input), `size` = (width, height)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


# ---------------------------------------------------------------------------------------------------------------
# The reference loop's parts against diffusers' own, and one view against Flux2KleinPipeline
# ---------------------------------------------------------------------------------------------------------------


def test_patches_packing_and_ids_are_flux2_klein_pipelines(klein_pair):
    klein, _ = klein_pair()
    latents = torch.randn(2, 32, 6, 10)
    patches = Flux2KleinPipeline._patchify_latents(latents)
    assert torch.equal(patchify(latents), patches) and torch.equal(unpatchify(patches), latents)
    assert torch.equal(pack(latents), Flux2KleinPipeline._pack_latents(patches))
    assert torch.equal(unpack(pack(latents), 6, 10), latents)
    assert torch.equal(image_ids(6, 10), Flux2KleinPipeline._prepare_latent_ids(patches)[0])
    # The VAE's latent: denormalized by its (random, not identity) batch-norm statistics.
    mean = klein.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(klein.vae.bn.running_var.view(1, -1, 1, 1) + klein.vae.config.batch_norm_eps)
    expected = Flux2KleinPipeline._unpatchify_latents(patches * std + mean)
    assert torch.equal(vae_latents(klein.vae, latents), expected) and not torch.allclose(expected, latents)


@pytest.mark.parametrize("num_tokens", [16, 1024, 4096, 8192])
@pytest.mark.parametrize("steps", [4, 50])
def test_shift_and_sigmas_are_flux2s(klein_pair, num_tokens, steps):
    scheduler = klein_pair()[0].scheduler
    mu = empirical_mu(num_tokens, steps)
    assert mu == pytest.approx(compute_empirical_mu(num_tokens, steps), abs=1e-12)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    sigmas, timesteps = shifted_sigmas(scheduler, steps, mu)
    assert torch.equal(sigmas, scheduler.sigmas) and torch.equal(timesteps, scheduler.timesteps)


def klein_latents(pipe, latents, **call):
    """Flux2KleinPipeline's final latent from the noise `latents` (patchified), as the transformer's latent."""
    height, width = (16 * side for side in latents.shape[-2:])
    raw = pipe(latents=latents, height=height, width=width, output_type="latent", **call).images
    return normalized_latents(pipe.vae, raw)


@pytest.mark.parametrize("call", [{"guidance_scale": 4.0}, {"guidance_scale": 1.0}])
def test_reference_one_view_equals_flux2_klein_pipeline(klein_pair, call):
    klein, _ = klein_pair()
    latents = noise(2, 64, 64)
    ours = flux2_reference(klein, PROMPT, unpatchify(latents), 3, window=8, stride=8, **call)
    expected = klein_latents(klein, latents, prompt=PROMPT, num_images_per_prompt=2, **SMALL, **call)
    assert relative_error(ours, expected) < TOLERANCE
    if call["guidance_scale"] > 1:  # the comparison sees a wrong guidance
        other = klein_latents(klein, latents, prompt=PROMPT, num_images_per_prompt=2, **SMALL, guidance_scale=3.5)
        assert relative_error(ours, other) > 100 * TOLERANCE


def test_reference_tiles_are_independent_flux2_images(klein_pair):
    """With stride = window the views tile the panorama without overlap: each tile is Flux2KleinPipeline's image of
    its own noise, with the window's ids and timestep shift (not the panorama's)."""
    klein, _ = klein_pair()
    latents = noise(1, 128, 128)
    ours = flux2_reference(klein, PROMPT, unpatchify(latents), 2, window=8, stride=8)
    for row in (0, 8):
        for column in (0, 8):
            tile = latents[:, :, row // 2 : row // 2 + 4, column // 2 : column // 2 + 4]
            expected = klein_latents(klein, tile, prompt=PROMPT, num_inference_steps=2, max_sequence_length=32)
            assert relative_error(ours[:, :, row : row + 8, column : column + 8], expected) < TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# SyncDiffusionFlux2KleinPipeline: one view is Flux2KleinPipeline's image
# ---------------------------------------------------------------------------------------------------------------

ONE_VIEW = {
    "guidance": ({}, {"guidance_scale": 4.0}, {}),
    "no guidance": ({}, {"guidance_scale": 1.0}, {}),
    "two images per prompt": ({}, {"num_images_per_prompt": 2}, {}),
    "two prompts": ({}, {"prompt": [PROMPT, "a photo of a forest"]}, {}),
    "step-distilled": ({"is_distilled": True}, {"guidance_scale": 4.0}, {}),
    "custom sigmas": ({}, {"sigmas": [1.0, 0.6, 0.3], "num_inference_steps": 10}, {}),
    "reference images": ({}, {"image": [reference_image(0), reference_image(1, (80, 64))]}, {}),
    # Flux2KleinPipeline takes a negative prompt as embeddings only (its default is the empty prompt's).
    "negative prompt": ({}, {}, {"negative_prompt": "a photo of a forest"}),
}


@pytest.mark.parametrize("case", list(ONE_VIEW))
def test_one_view_is_flux2_klein_pipelines_image(klein_pair, case):
    variant, call, ours_only = ONE_VIEW[case]
    klein, ours = klein_pair(**variant)
    call = {"prompt": PROMPT, **SMALL, **call}
    klein_call = dict(call)
    if "negative_prompt" in ours_only:
        with torch.no_grad():
            klein_call["negative_prompt_embeds"] = klein.encode_prompt(
                ours_only["negative_prompt"], max_sequence_length=32
            )[0]
    expected = klein(height=64, width=64, generator=generator(), output_type="np", **klein_call).images
    image = ours(
        height=64,
        width=64,
        window_size=64,
        sync_weight=0,
        generator=generator(),
        output_type="np",
        **call,
        **ours_only,
    ).images
    assert image.shape == expected.shape and abs(image - expected).max() < TOLERANCE


def test_one_view_guidance_and_negative_prompt_change_the_image(klein_pair):
    """The one-view comparisons see what they test: guidance, a negative prompt, a reference image, step
    distillation each change the image by far more than TOLERANCE."""
    _, ours = klein_pair()

    def image(**call):
        run = {"height": 64, "width": 64, "window_size": 64, "output_type": "np", **SMALL, **call}
        return ours(PROMPT, generator=generator(), **run).images

    guided = image()
    for other in (
        image(guidance_scale=3.5),
        image(guidance_scale=1.0),
        image(negative_prompt="a photo of a forest"),
        image(image=reference_image()),
    ):
        assert abs(other - guided).max() > 100 * TOLERANCE


def test_latents_in_and_latent_out_are_flux2_klein_pipelines(klein_pair):
    klein, ours = klein_pair()
    latents = noise(1, 64, 64)
    call = {"prompt": PROMPT, "height": 64, "width": 64, "output_type": "latent", **SMALL}
    expected = klein(latents=latents, **call).images
    patchified = ours(latents=latents, window_size=64, **call).images
    packed = ours(latents=Flux2KleinPipeline._pack_latents(latents), window_size=64, **call).images
    laid_out = ours(latents=unpatchify(latents), window_size=64, **call).images
    assert patchified.shape == expected.shape == (1, 32, 8, 8)
    assert relative_error(patchified, expected) < TOLERANCE
    assert torch.equal(patchified, packed) and torch.equal(patchified, laid_out)


def test_callbacks_see_and_replace_flux2_klein_pipelines_packed_latents(klein_pair):
    klein, ours = klein_pair()
    seen = {}

    def halve_at_first_step(pipe, step, timestep, tensors):
        seen.setdefault(type(pipe).__name__, []).append(tuple(tensors["latents"].shape))
        return {"latents": tensors["latents"] / 2} if step == 0 else {}

    call = {"height": 64, "width": 64, "output_type": "latent", "callback_on_step_end": halve_at_first_step, **SMALL}
    expected = klein(prompt=PROMPT, generator=generator(), **call).images
    latents = ours(PROMPT, window_size=64, generator=generator(), **call).images
    assert seen["Flux2KleinPipeline"] == seen["SyncDiffusionFlux2KleinPipeline"] == [(1, 16, 128)] * 3
    assert relative_error(latents, expected) < TOLERANCE
    unchanged = ours(PROMPT, window_size=64, generator=generator(), **dict(call, callback_on_step_end=None)).images
    assert relative_error(latents, unchanged) > 0.01


def test_call_takes_every_flux2_klein_pipeline_argument():
    """Every `Flux2KleinPipeline.__call__` argument, with its default except the panorama's size."""
    ours = inspect.signature(SyncDiffusionFlux2KleinPipeline.__call__).parameters
    for name, parameter in inspect.signature(Flux2KleinPipeline.__call__).parameters.items():
        assert name in ours, name
        if name not in ("height", "width"):
            assert ours[name].default == parameter.default, name
    assert (ours["height"].default, ours["width"].default) == (1024, 4096)


# ---------------------------------------------------------------------------------------------------------------
# MultiDiffusion and SyncDiffusion against the reference loop
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("view_batch_size", [1, 3])
def test_multidiffusion_equals_the_reference_loop(klein_pair, circular, view_batch_size):
    """64x160 pixels, stride 4: 4 views (5 circular, the last wrapping round), with classifier-free guidance."""
    _, ours = klein_pair()
    latents = noise(1, 64, 160)
    expected = flux2_reference(ours, PROMPT, unpatchify(latents), 3, window=8, stride=4, circular=circular)
    call = {"height": 64, "width": 160, "window_size": 64, "stride": 4, "circular_padding": circular}
    raw = ours(
        PROMPT, latents=latents, view_batch_size=view_batch_size, sync_weight=0, output_type="latent", **call, **SMALL
    ).images
    assert relative_error(raw, vae_latents(ours.vae, expected)) < TOLERANCE


# Synchronized comparisons run in float64 with the smooth loss (as tests/reference_loop.py explains): the pipeline
# and the reference agree to 1.2e-7 of the largest latent (the core computes the update and the views' sums in
# float32), a 1% weight error at the second synchronized step moves them by 2.2e-4; 2e-6 lies between (17x above the
# noise, 110x below the error).
SYNC_TOLERANCE = 2e-6
SYNC_CASES = {
    "one view per batch": ({"view_batch_size": 1}, {}, 1, {}),
    "two views per batch": ({"view_batch_size": 2}, {}, 1, {}),
    "no guidance": ({}, {"guidance_scale": 1.0}, 1, {}),
    "two images per prompt": ({"num_images_per_prompt": 2, "view_batch_size": 3}, {}, 2, {}),
    "the first view as anchor": ({"sync_anchor": 0, "view_batch_size": 2}, {}, 1, {"anchor_index": 0}),
}


@pytest.mark.parametrize("case", list(SYNC_CASES))
def test_synchronization_equals_the_reference_loop(klein_pair, case):
    """Gradient through the transformer (the guided velocity included), the VAE decoder and the loss; every image
    synchronized to its own anchor."""
    pipeline_only, shared, num_images, reference_only = SYNC_CASES[case]
    _, ours = klein_pair()
    ours = ours.to(torch.float64)
    latents = noise(num_images, 64, 128, dtype=torch.float64)
    run = {"sync_weight": 20.0, "sync_thres": 2, "max_sequence_length": 32, **shared}
    reference = {"window": 8, "stride": 4, "perceptual_loss": SmoothPerceptualLoss(), **run, **reference_only}
    expected = vae_latents(ours.vae, flux2_reference(ours, PROMPT, unpatchify(latents), 3, **reference))
    call = {"height": 64, "width": 128, "window_size": 64, "stride": 4, "num_inference_steps": 3, **pipeline_only}
    raw = ours(PROMPT, latents=latents, output_type="latent", **call, **run).images
    assert relative_error(raw, expected) < SYNC_TOLERANCE
    wrong = flux2_reference(
        ours,
        PROMPT,
        unpatchify(latents),
        3,
        weight_at=lambda step: 20.0 * 0.95**step * (1.01 if step == 1 else 1.0),
        **reference,
    )
    assert relative_error(raw, vae_latents(ours.vae, wrong)) > 10 * SYNC_TOLERANCE


def test_synchronization_with_reference_images_batches_alike(klein_pair):
    """Each view of a batch gets the reference images' tokens: batches of 1 and 3 views give the same synchronized
    panorama, to float32 batching noise (measured 4.3e-7; the SD tests' bound, 1e-4); without the image it moves
    by 3.0e-3."""
    _, ours = klein_pair()
    call = {"image": reference_image(), "sync_thres": 2, "output_type": "latent", **WIDE, **SMALL}
    one, three = (ours(PROMPT, generator=generator(), view_batch_size=size, **call).images for size in (1, 3))
    assert relative_error(three, one) < 1e-4
    assert relative_error(ours(PROMPT, generator=generator(), **dict(call, image=None)).images, one) > 1e-3


@torch.no_grad()
def test_circular_panorama_decodes_without_a_seam(klein_pair):
    """A 360-degree panorama repeats without end: its decode should be the middle of the decode of three copies side
    by side. The padded decode is, at the edges too; a plain decode's edge columns, which see no wrap, are not."""
    _, ours = klein_pair()
    call = {"circular_padding": True, "sync_weight": 0, **WIDE, **SMALL}
    raw = ours(PROMPT, generator=generator(), output_type="latent", **call).images
    latents = normalized_latents(ours.vae, raw)
    wrapped = ours.vae.decode(torch.cat([raw] * 3, dim=-1)).sample[..., 128:256]
    padded = ours.decode_latents_with_padding(latents)
    plain = ours.vae.decode(raw).sample

    def edge_difference(image):
        columns = (image - wrapped).abs().mean(dim=(0, 1, 2))
        return torch.cat([columns[:4], columns[-4:]]).max().item()

    assert padded.shape == wrapped.shape == (1, 3, 64, 128)
    assert edge_difference(padded) < 0.1 * edge_difference(plain)
    image = ours(PROMPT, generator=generator(), output_type="pt", **call).images
    assert torch.allclose(image, (padded / 2 + 0.5).clamp(0, 1), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Passes
# ---------------------------------------------------------------------------------------------------------------

MODES = {
    "exact": ({}, {}),
    "fast": ({"sync_mode": "fast"}, {"gradient": "x0", "reuse_noise": True}),
    "checkpointing": ({"sync_gradient_checkpointing": True}, {"checkpointing": True}),
}


# The counter's backward hooks on the decoder also fire where only its output needs a gradient; torch says so.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("mode", list(MODES))
def test_passes_follow_the_formulas(klein_pair, mode):
    """View-passes of a guided call (two transformer calls per view-pass) with two images per prompt: 3 views, 3
    steps, 2 synchronized."""
    call, formula = MODES[mode]
    _, ours = klein_pair()
    with PassCounter(ours) as counter:
        ours(
            PROMPT, sync_thres=2, num_images_per_prompt=2, view_batch_size=2, output_type="np", **WIDE, **SMALL, **call
        )
    sync = expected_sync_step(3, denoiser="transformer", **{"gradient": "transformer", **formula})
    plain = expected_plain_step(3, denoiser="transformer")
    counts = counter.as_dict()
    for key, value in sync.items():
        assert counts[key] == 2 * value + plain[key], key
    assert counts["final_decode"] == 1


def tiny_sync_decoder():
    """A random `AutoencoderTiny` for FLUX.2's 32-channel VAE latent (as TAEF2 takes it), factor 8."""
    torch.manual_seed(3)
    channels = (8, 8, 8, 8)
    return AutoencoderTiny(
        latent_channels=32,
        encoder_block_out_channels=channels,
        decoder_block_out_channels=channels,
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).eval()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_a_sync_decoder_decodes_the_vae_latent_and_replaces_the_vae_in_the_loss(klein_pair):
    _, ours = klein_pair()
    decoder = tiny_sync_decoder()
    clean = unpatchify(noise(2, 64, 64))
    with torch.no_grad():
        expected = (decoder.decode(vae_latents(ours.vae, clean)).sample / 2 + 0.5).clamp(0, 1)
        assert torch.equal(ours.decode_for_sync(clean, decoder), expected)
    with PassCounter(ours, sync_decoder=decoder) as counter:
        ours(PROMPT, sync_thres=2, sync_mode="fast", sync_decoder=decoder, output_type="np", **WIDE, **SMALL)
    counts = counter.as_dict()
    expected_counts = expected_sync_step(3, denoiser="transformer", gradient="x0", reuse_noise=True)
    assert counts["sync_dec_fwd"] == 2 * expected_counts["dec_fwd"] and counts["sync_dec_bwd"] == 2 * 2
    assert counts["vae_dec_fwd"] == 0 and counts["final_decode"] == 1  # the VAE decodes the panorama only


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the argument, before any model runs
# ---------------------------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "window_size": {"window_size": 72},
    "height": {"height": 72},
    "width": {"width": 136},
    "stride": {"stride": 3},
    "height ": {"height": 48},
    "sync_gradient": {"sync_gradient": "unet"},
    "sync_decode_downsample": {"sync_decode_downsample": 3},
    "guidance_scale": {"guidance_scale": -1.0},
    "max_sequence_length": {"max_sequence_length": 0},
    "text_encoder_out_layers": {"text_encoder_out_layers": (9, 18, 99)},
    "latents": {"latents": torch.zeros(1, 128, 4, 4)},
    "latents ": {"latents": torch.zeros(1, 32, 8, 8)},
    "generator": {"generator": [torch.Generator(), torch.Generator()]},
    "negative_prompt": {"negative_prompt": ["a", "b"]},
    "negative_prompt_embeds": {"negative_prompt_embeds": torch.zeros(1, 8, 7)},
    "image": {"image": np.zeros((64, 64, 3), dtype=np.uint8)},
    "image[1]": {"image": [reference_image(), reference_image(size=(32, 64))]},
    "callback_on_step_end_tensor_inputs": {"callback_on_step_end_tensor_inputs": ["negative_prompt_embeds"]},
    "region_masks[0]": {"region_prompts": ["a tree"], "region_masks": [torch.ones(64, 64)]},
    "sync_anchor": {"sync_anchor": 3},  # 3 views: 0..2
    "sync_anchor ": {"sync_anchor": "left"},
    "circular_padding": {"circular_padding": "yes"},
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
def test_bad_input_is_one_line_naming_the_argument(klein_pair, argument):
    _, ours = klein_pair()
    calls = watch_models(ours)
    with pytest.raises(ValueError) as error:
        ours(PROMPT, **{**WIDE, **SMALL, **BAD_INPUTS[argument]})
    message = str(error.value)
    assert f"`{argument.strip()}`" in message and "\n" not in message
    assert calls == []


def test_prompts_without_a_text_encoder_and_other_schedulers_are_refused(klein_pair):
    _, ours = klein_pair()
    with torch.no_grad():
        embeds = ours.encode_prompt(PROMPT, max_sequence_length=32)[0]
    bare = SyncDiffusionFlux2KleinPipeline(**dict(ours.components, text_encoder=None, tokenizer=None))
    calls = watch_models(bare)
    with pytest.raises(ValueError, match="`prompt` needs the `text_encoder`"):
        bare(PROMPT, **WIDE, **SMALL)
    # Guided, the empty negative prompt would be encoded: its embeddings must be given.
    with pytest.raises(ValueError, match="`negative_prompt` needs the `text_encoder`"):
        bare(prompt_embeds=embeds, **WIDE, **SMALL)
    bare.scheduler = DDIMScheduler()
    with pytest.raises(ValueError, match="`scheduler`"):
        bare(prompt_embeds=embeds, guidance_scale=1.0, **WIDE, **SMALL)
    assert calls == []


def test_without_text_encoder_from_embeds(klein_pair):
    _, ours = klein_pair()
    with torch.no_grad():
        embeds = ours.encode_prompt(PROMPT, max_sequence_length=32)[0]
        negative = ours.encode_prompt("", max_sequence_length=32)[0]
    call = {"sync_thres": 2, "num_images_per_prompt": 2, "output_type": "latent", **WIDE}
    expected = ours(PROMPT, generator=generator(), **call, **SMALL).images
    bare = SyncDiffusionFlux2KleinPipeline(**dict(ours.components, text_encoder=None, tokenizer=None))
    bare.set_perceptual_loss(ours._perceptual_loss)
    bare.set_progress_bar_config(disable=True)
    latents = bare(
        prompt_embeds=embeds, negative_prompt_embeds=negative, generator=generator(), num_inference_steps=3, **call
    ).images
    assert latents.shape == expected.shape and relative_error(latents, expected) < TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# Region prompts: the synchronized invariants
# ---------------------------------------------------------------------------------------------------------------


def test_regions_that_change_nothing_change_nothing_synchronized(klein_pair, caplog):
    """An empty mask warns and changes nothing; a mask everywhere with the background's own prompt (and the call's
    negative) is the background: both bit for bit, synchronized with guidance and bootstrapping (its default, 1 of 3
    steps)."""
    _, ours = klein_pair()
    call = {"sync_thres": 2, "output_type": "latent", **WIDE, **SMALL}
    plain = ours(PROMPT, generator=generator(), **call).images
    empty = ours(
        PROMPT, generator=generator(), region_prompts=["a red house"], region_masks=[torch.zeros(64, 128)], **call
    ).images
    assert "covers no latent pixel" in caplog.text
    everywhere = ours(
        PROMPT, generator=generator(), region_prompts=[PROMPT], region_masks=[torch.ones(64, 128)], **call
    ).images
    assert torch.equal(empty, plain) and torch.equal(everywhere, plain)
    left = torch.zeros(64, 128)
    left[:, :48] = 1
    house = ours(PROMPT, generator=generator(), region_prompts=["a red house"], region_masks=[left], **call).images
    assert relative_error(house, plain) > 1e-3  # a real region does change it (measured 4.5e-3)


@torch.no_grad()
def test_bootstrap_backgrounds_are_encoded_as_the_transformers_latent(klein_pair):
    """Region bootstrapping encodes constant-colour views: a sample of the VAE's posterior, normalized by its
    batch-norm statistics into the transformer's latent (with its patches laid out)."""
    _, ours = klein_pair()
    images = torch.rand(2, 3, 64, 64, generator=generator()) * 2 - 1
    raw = ours.vae.encode(images).latent_dist.sample(generator(1))
    assert torch.equal(ours.encode_latents(images, generator(1)), normalized_latents(ours.vae, raw))


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

LOAD_CALL = {"sync_thres": 2, "output_type": "np", **WIDE, **SMALL}
# Weights loaded from safetensors sit at other memory alignments, where CPU kernels may round differently: loaded
# pipelines' synchronized images differ by up to 2.9e-6 (in [0, 1]); a wrong component (the step-distilled flag
# lost: no guidance) changes them by 3.4e-2.
LOADED_TOLERANCE = 5e-5


def images_of(pipe):
    pipe.set_perceptual_loss(SmoothPerceptualLoss())
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, generator=generator(), **LOAD_CALL).images


def test_from_flux2_klein_pipeline_and_its_components(klein_pair):
    klein, ours = klein_pair()
    expected = images_of(ours)
    for pipe in (
        SyncDiffusionFlux2KleinPipeline.from_pipe(klein),
        SyncDiffusionFlux2KleinPipeline(**klein.components),
    ):
        assert type(pipe) is SyncDiffusionFlux2KleinPipeline
        assert abs(images_of(pipe) - expected).max() == 0
    distilled = SyncDiffusionFlux2KleinPipeline.from_pipe(klein_pair(is_distilled=True)[0])
    assert distilled.config.is_distilled and abs(images_of(distilled) - expected).max() > 1e-2


@pytest.fixture
def klein_folder(tmp_path_factory):
    return save_tiny_flux2_klein_pipeline(tmp_path_factory.mktemp("klein") / "model")


@pytest.mark.parametrize("how", ["file", "folder"])
def test_custom_pipeline_from_a_file_or_folder(klein_folder, tmp_path, how, modules_cache):
    source = Path(pipeline_syncdiffusion_flux2.__file__)
    if how == "folder":
        (tmp_path / "code").mkdir()
        (tmp_path / "code" / "pipeline.py").write_bytes(source.read_bytes())
        custom = str(tmp_path / "code")
    else:
        custom = str(source)
    pipe = DiffusionPipeline.from_pretrained(klein_folder, custom_pipeline=custom, trust_remote_code=True)
    assert (
        type(pipe).__name__ == "SyncDiffusionFlux2KleinPipeline" and type(pipe) is not SyncDiffusionFlux2KleinPipeline
    )
    direct = SyncDiffusionFlux2KleinPipeline.from_pretrained(klein_folder)
    assert abs(images_of(pipe) - images_of(direct)).max() < LOADED_TOLERANCE


def test_saved_pipeline_carries_its_source_and_reloads(klein_pair, tmp_path, modules_cache):
    _, ours = klein_pair(is_distilled=True)
    expected = images_of(ours)
    saved = tmp_path / "saved"
    ours.save_pretrained(saved)
    assert (saved / "syncdiffusion_flux2.py").read_bytes() == Path(pipeline_syncdiffusion_flux2.__file__).read_bytes()
    model_index = json.loads((saved / "model_index.json").read_text())
    assert model_index["_class_name"] == ["syncdiffusion_flux2", "SyncDiffusionFlux2KleinPipeline"]
    assert model_index["transformer"] == ["diffusers", "Flux2Transformer2DModel"] and model_index["is_distilled"]
    direct = SyncDiffusionFlux2KleinPipeline.from_pretrained(saved)
    remote = DiffusionPipeline.from_pretrained(saved, trust_remote_code=True)
    assert type(direct) is SyncDiffusionFlux2KleinPipeline
    assert type(remote).__name__ == "SyncDiffusionFlux2KleinPipeline" and type(remote) is not type(direct)
    for pipe in (direct, remote):
        assert pipe.config.is_distilled
        assert abs(images_of(pipe) - expected).max() < LOADED_TOLERANCE


def test_custom_pipeline_from_a_fake_hub(fake_hub, klein_folder):
    repo_id = "syncdiffusion-test/syncdiffusion-flux2"
    sha = fake_hub.add_repo(repo_id, {"pipeline.py": Path(pipeline_syncdiffusion_flux2.__file__).read_bytes()})
    pipe = DiffusionPipeline.from_pretrained(klein_folder, custom_pipeline=repo_id, trust_remote_code=True)
    module_file = Path(sys.modules[type(pipe).__module__].__file__)
    assert type(pipe).__name__ == "SyncDiffusionFlux2KleinPipeline" and module_file.parent.name == sha
    direct = SyncDiffusionFlux2KleinPipeline.from_pretrained(klein_folder)
    assert abs(images_of(pipe) - images_of(direct)).max() < LOADED_TOLERANCE


def save_tiny_flux2_lora(folder, transformer, seed=1, rank=4):
    """A random LoRA for `transformer`'s attention projections in diffusers' FLUX.2 LoRA format, in `folder`."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    adapted = copy.deepcopy(transformer)
    torch.manual_seed(seed)
    # init_lora_weights=False draws both LoRA matrices at random: a fresh LoRA's zero B would change nothing.
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    adapted.add_adapter(config)
    Flux2KleinPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(adapted))
    return folder


def test_a_tiny_lora_loads_and_changes_the_result(klein_pair, tmp_path):
    pytest.importorskip("peft")  # diffusers' load_lora_weights requires the peft backend
    _, ours = klein_pair()
    expected = images_of(ours)
    ours.load_lora_weights(save_tiny_flux2_lora(tmp_path, ours.transformer))
    assert abs(images_of(ours) - expected).max() > 1e-3  # measured 1.4e-2
    ours.unload_lora_weights()
    assert abs(images_of(ours) - expected).max() == 0


# ---------------------------------------------------------------------------------------------------------------
# The synchronization update and memory
# ---------------------------------------------------------------------------------------------------------------


def test_one_update_lowers_the_views_lpips_distance_to_the_anchor(klein_pair, lpips_module):
    """The mechanism with LPIPS (random VGG): the step brings the view's predicted image closer to the anchor's, the
    opposite step moves it away."""
    _, ours = klein_pair()
    ours.set_perceptual_loss(lpips_module)
    ours._guidance_scale, ours._attention_kwargs = 4.0, None
    with torch.no_grad():
        positive = ours.encode_prompt(PROMPT, max_sequence_length=32)
        negative = ours.encode_prompt("", max_sequence_length=32)
    ids = ours._prepare_latent_ids(torch.empty(1, 0, 4, 4))
    conditioning = ours._conditioning(positive, negative, ids, None, 4.0)
    ours.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 20, 20), mu=compute_empirical_mu(16, 20))
    ours.scheduler.set_begin_index(0)
    t = ours.scheduler.timesteps[0]
    views = ours.get_views(64, 128, 64, stride=4)
    latents = unpatchify(noise(1, 64, 128, seed=5))
    sync = SyncSettings()
    anchor = ours.prepare_anchor(latents, views[1], t, conditioning, sync)
    before = crop_views(latents, views[:1])

    def distance(view_latents):
        with torch.no_grad():
            velocity = ours.predict_noise(view_latents, t, conditioning, views[:1])
            image = ours.decode_for_sync(ours.predict_clean_latents(view_latents, velocity, t))
        return ours.perceptual_distance(image, anchor["images"]).item()

    def updated(weight):
        return ours.synchronize_views(before, views[:1], anchor["images"], t, weight, conditioning, sync)[0]

    assert distance(updated(20.0)) < distance(before) < distance(updated(-20.0))


def test_the_transformer_estimate_matches_what_autograd_saves(klein_pair):
    """The gradient pass's transformer term of `view_memory` against the bytes autograd saves in it, measured with
    saved-tensor hooks (weights excluded) on the tiny transformer with guidance: within a factor 2 (measured: 1.00)."""
    _, ours = klein_pair()
    with torch.no_grad():
        positive = ours.encode_prompt(PROMPT, max_sequence_length=32)
        negative = ours.encode_prompt("", max_sequence_length=32)
    ours._window_size, ours._text_tokens, ours._reference_tokens, ours._true_cfg = 64, 32, 0, True
    ours._attention_kwargs = None
    sync = SyncSettings()
    estimate = ours.view_memory(1, torch.float32, sync) - ours.view_memory(
        1, torch.float32, dataclasses.replace(sync, through_denoiser=False)
    )
    conditioning = ours._conditioning(positive, negative, ours._prepare_latent_ids(torch.empty(1, 0, 4, 4)), None, 4.0)
    weights = {p.data_ptr() for p in ours.transformer.parameters()}
    saved = {}

    def pack_hook(tensor):
        if tensor.data_ptr() not in weights:
            saved[(tensor.data_ptr(), tuple(tensor.shape))] = tensor.numel() * tensor.element_size()
        return tensor

    latents = unpatchify(noise(1, 64, 64)).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda tensor: tensor):
        ours.predict_noise(latents, torch.tensor(500.0), conditioning, [(0, 8, 0, 8)])
    measured = sum(saved.values())
    assert 0.5 < estimate / measured < 2, estimate / measured


def test_auto_view_batches_fit_the_gradient_pass_or_checkpoint(klein_pair, monkeypatch):
    """On CUDA, "auto" divides the free memory by the per-view estimates; when one view's gradient pass does not fit,
    it turns on gradient checkpointing (CUDA's free memory is faked here)."""
    _, ours = klein_pair()
    ours._window_size, ours._text_tokens, ours._reference_tokens, ours._true_cfg = 64, 32, 0, True
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


def test_an_unknown_keyword_is_a_type_error(klein_pair):
    _, ours = klein_pair()
    with pytest.raises(TypeError, match="`sync_weigth`"):
        ours(PROMPT, height=64, width=64, window_size=64, sync_weigth=1.0, **SMALL)
