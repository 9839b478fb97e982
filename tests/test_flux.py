"""FLUX.1: the tiny offline components and the plain panorama loop (`tests/flux_reference.py`) against diffusers'
`FluxPipeline`."""

import copy
import os
import tempfile

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from syncdiffusion_utils.testing import (
    FLUX_PRESETS,
    make_flux_components,
    make_lpips,
    make_t5_tokenizer,
    make_tiny_flux_decoder,
    save_tiny_flux_lora,
    save_tiny_flux_pipeline,
)
from tests.flux_reference import flux_reference, image_ids, pack, shifted_sigmas, timestep_shift, unpack
from tests.reference_loop import SmoothPerceptualLoss


PROMPT = "a photo of a beach"
# FluxPipeline and the reference run the same operations on the same tensors: measured 0.0 relative difference in
# float32 for one view (1.2e-7 with two images per prompt). The bound leaves room for other CPU kernels and is 400x
# below the smallest error it must catch: a timestep shift from 4x the window's tokens moves the latents by 4.3e-3,
# a guidance of 3.0 for 3.5 by 2.6e-2.
TOLERANCE = 1e-5


@pytest.fixture(scope="session")
def flux_components_cache():
    return {}


@pytest.fixture
def flux_pipe(flux_components_cache):
    """A fresh `FluxPipeline` on copies of session-built tiny components; `flux_pipe(**variant)` for others."""

    def build(guidance_embeds=True, scheduler="dev"):
        key = (guidance_embeds, scheduler)
        if key not in flux_components_cache:
            flux_components_cache[key] = make_flux_components(guidance_embeds=guidance_embeds, scheduler=scheduler)
        pipe = FluxPipeline(**copy.deepcopy(flux_components_cache[key]))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return build


def noise(batch, height, width, seed=0):
    """FLUX's unpacked initial latent for an image of `height x width` pixels."""
    return torch.randn(batch, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


def flux_latents(pipe, latents, **call):
    """`FluxPipeline`'s final latent from the unpacked noise `latents`, unpacked."""
    height, width = (8 * side for side in latents.shape[-2:])
    packed = pipe(latents=pack(latents), height=height, width=width, output_type="latent", **call).images
    return unpack(packed, *latents.shape[-2:])


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------------------------------------------------
# The tiny components
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(64, 64), (64, 128)])
def test_tiny_flux_pipeline_makes_images(flux_pipe, height, width):
    pipe = flux_pipe()
    assert pipe.transformer.config.num_layers == 1 and pipe.transformer.config.num_single_layers == 1
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8
    images = pipe(PROMPT, height=height, width=width, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, height, width, 3)
    assert images.std() > 0.01  # not a constant image


def test_flux_pipeline_without_text_encoders_takes_embeds(flux_pipe):
    pipe = flux_pipe()
    with torch.no_grad():  # as in the pipeline: T5 with autograd on rounds differently (measured 9.5e-7)
        embeds, pooled, _ = pipe.encode_prompt(PROMPT, max_sequence_length=32)
    expected = flux_latents(pipe, noise(1, 64, 64), prompt=PROMPT, num_inference_steps=2, max_sequence_length=32)
    components = dict(pipe.components, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    bare = FluxPipeline(**components)
    bare.set_progress_bar_config(disable=True)
    ours = flux_latents(
        bare, noise(1, 64, 64), prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=2
    )
    assert torch.equal(ours, expected)


def test_t5_tokenizer_is_offline_and_ends_texts():
    tokenizer = make_t5_tokenizer()
    ids = tokenizer(["a photo", "a photo of a beach"], padding="max_length", max_length=12, truncation=True).input_ids
    assert ids[0][-1] == tokenizer.pad_token_id and tokenizer.eos_token_id in ids[0]
    assert ids[0][: ids[0].index(tokenizer.eos_token_id)] == ids[1][: ids[0].index(tokenizer.eos_token_id)]
    assert tokenizer.decode(ids[1], skip_special_tokens=True) == "a photo of a be"  # truncated to 11 + </s>


def test_building_components_leaves_no_temporary_folders():
    before = set(os.listdir(tempfile.gettempdir()))
    make_flux_components()
    assert set(os.listdir(tempfile.gettempdir())) - before == set()


def test_saved_tiny_flux_pipeline_reloads(flux_pipe, tmp_path):
    expected = flux_latents(flux_pipe(), noise(1, 64, 64), prompt=PROMPT, num_inference_steps=2)
    save_tiny_flux_pipeline(tmp_path)
    reloaded = FluxPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    ours = flux_latents(reloaded, noise(1, 64, 64), prompt=PROMPT, num_inference_steps=2)
    # Memory-mapped weights sit at other alignments, so CPU kernels round differently: measured 3.6e-7.
    assert relative_error(ours, expected) < TOLERANCE


def test_flux_preset_has_flux_architecture_and_reduces_for_cpu():
    full = FLUX_PRESETS["flux"]
    assert (full.num_layers, full.num_single_layers, full.num_attention_heads, full.attention_head_dim) == (
        19,
        38,
        24,
        128,
    )
    small = make_flux_components("flux", width_mult=1 / 12, depth_mult=1 / 19)
    config = small["transformer"].config
    assert (config.num_layers, config.num_single_layers, config.num_attention_heads) == (1, 2, 2)
    assert config.attention_head_dim == 128 and tuple(config.axes_dims_rope) == (16, 56, 56)
    assert small["vae"].config.latent_channels == 16 and small["vae"].config.shift_factor == 0.1159
    pipe = FluxPipeline(**small)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(PROMPT, height=64, width=64, num_inference_steps=1, output_type="latent").images.shape == (1, 16, 64)


def test_tiny_flux_decoder_decodes_sixteen_channels():
    decoder = make_tiny_flux_decoder(width_mult=0.125)
    with torch.no_grad():
        image = decoder.decode(torch.randn(1, 16, 8, 8)).sample
    assert image.shape == (1, 3, 64, 64)


def test_tiny_flux_lora_changes_the_result(flux_pipe, tmp_path):
    pytest.importorskip("peft")  # diffusers' load_lora_weights requires the peft backend
    pipe = flux_pipe()
    expected = flux_latents(pipe, noise(1, 64, 64), prompt=PROMPT, num_inference_steps=2)
    pipe.load_lora_weights(save_tiny_flux_lora(tmp_path, pipe.transformer))
    ours = flux_latents(pipe, noise(1, 64, 64), prompt=PROMPT, num_inference_steps=2)
    assert relative_error(ours, expected) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# The reference loop's parts against diffusers' own
# ---------------------------------------------------------------------------------------------------------------


def test_packing_and_ids_are_flux_pipelines():
    latents = torch.randn(2, 16, 6, 10)
    packed = FluxPipeline._pack_latents(latents, 2, 16, 6, 10)
    assert torch.equal(pack(latents), packed)
    assert torch.equal(unpack(packed, 6, 10), latents)
    assert torch.equal(
        image_ids(6, 10, torch.float32), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    )


@pytest.mark.parametrize("scheduler", ["dev", "schnell"])
@pytest.mark.parametrize("num_tokens", [16, 1024, 4096])
def test_sigma_schedule_is_the_schedulers(flux_pipe, scheduler, num_tokens):
    config = flux_pipe(scheduler=scheduler).scheduler
    mu = timestep_shift(num_tokens, config.config)
    assert mu == pytest.approx(calculate_shift(num_tokens, 256, 4096, 0.5, 1.15), abs=1e-12)
    config.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=mu)
    sigmas, timesteps = shifted_sigmas(config, 4, mu)
    assert torch.equal(sigmas, config.sigmas) and torch.equal(timesteps, config.timesteps)


def test_generator_noise_is_the_unpacked_latent_flux_pipeline_draws(flux_pipe):
    pipe = flux_pipe()
    generator = torch.Generator().manual_seed(3)
    ours = flux_latents(pipe, noise(2, 64, 64, seed=3), prompt=PROMPT, num_inference_steps=2, num_images_per_prompt=2)
    expected = pipe(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=2,
        num_images_per_prompt=2,
        generator=generator,
        output_type="latent",
    ).images
    assert torch.equal(pack(ours), expected)


# ---------------------------------------------------------------------------------------------------------------
# The reference loop: one view is FluxPipeline's image
# ---------------------------------------------------------------------------------------------------------------

ONE_VIEW_CASES = {
    "guidance embedding": ({}, {"guidance_scale": 3.5}),
    "no guidance embedding": ({"guidance_embeds": False}, {"guidance_scale": 3.5}),
    "true cfg": ({}, {"negative_prompt": "a photo of a forest", "true_cfg_scale": 4.0}),
    "two images per prompt": ({}, {"num_images": 2}),
    "custom sigmas": ({}, {"sigmas": [1.0, 0.6, 0.3]}),
}


@pytest.mark.parametrize("case", list(ONE_VIEW_CASES))
def test_reference_one_view_equals_flux_pipeline(flux_pipe, case):
    variant, call = ONE_VIEW_CASES[case]
    pipe = flux_pipe(**variant)
    num_images = call.pop("num_images", 1)
    steps = len(call["sigmas"]) if "sigmas" in call else 3
    latents = noise(num_images, 64, 64)
    ours = flux_reference(pipe, PROMPT, latents, steps, window=8, stride=8, max_sequence_length=32, **call)
    flux_call = dict(call, prompt=PROMPT, num_inference_steps=steps, max_sequence_length=32)
    expected = flux_latents(pipe, latents, **flux_call)
    assert relative_error(ours, expected) < TOLERANCE


def test_reference_one_view_equals_flux_schnell(flux_pipe):
    pipe = flux_pipe(guidance_embeds=False, scheduler="schnell")
    latents = noise(1, 64, 64)
    ours = flux_reference(pipe, PROMPT, latents, 4, window=8, stride=8, guidance_scale=0.0, max_sequence_length=256)
    expected = flux_latents(
        pipe, latents, prompt=PROMPT, num_inference_steps=4, guidance_scale=0.0, max_sequence_length=256
    )
    assert relative_error(ours, expected) < TOLERANCE


def test_reference_detects_a_wrong_guidance(flux_pipe):
    """The one-view comparison is sensitive: FluxPipeline with another guidance value misses the bound by far."""
    pipe = flux_pipe()
    latents = noise(1, 64, 64)
    ours = flux_reference(pipe, PROMPT, latents, 3, window=8, stride=8, guidance_scale=3.5, max_sequence_length=32)
    other = flux_latents(
        pipe, latents, prompt=PROMPT, num_inference_steps=3, guidance_scale=3.0, max_sequence_length=32
    )
    assert relative_error(ours, other) > 100 * TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# The reference loop with several views
# ---------------------------------------------------------------------------------------------------------------


def test_reference_tiles_are_independent_flux_images(flux_pipe):
    """With stride = window the views tile the panorama without overlap: each tile is FluxPipeline's image of its own
    noise, with the window's ids and timestep shift (not the panorama's)."""
    pipe = flux_pipe()
    latents = noise(1, 128, 192)
    ours = flux_reference(pipe, PROMPT, latents, 3, window=8, stride=8, max_sequence_length=32)
    for row in (0, 8):
        for column in (0, 8, 16):
            tile = latents[:, :, row : row + 8, column : column + 8]
            expected = flux_latents(pipe, tile, prompt=PROMPT, num_inference_steps=3, max_sequence_length=32)
            assert relative_error(ours[:, :, row : row + 8, column : column + 8], expected) < TOLERANCE


def test_reference_circular_views_turn_with_the_panorama(flux_pipe):
    """Circular views are the same all the way round: turning the noise by a multiple of the stride turns the
    MultiDiffusion result by as much, seam included."""
    pipe = flux_pipe()
    latents = noise(1, 64, 128)
    ours = flux_reference(pipe, PROMPT, latents, 2, window=8, stride=4, circular=True, max_sequence_length=32)
    turned = flux_reference(
        pipe, PROMPT, latents.roll(4, -1), 2, window=8, stride=4, circular=True, max_sequence_length=32
    )
    assert relative_error(turned, ours.roll(4, -1)) < TOLERANCE
    flat = flux_reference(pipe, PROMPT, latents, 2, window=8, stride=4, circular=False, max_sequence_length=32)
    assert relative_error(flat, ours) > 100 * TOLERANCE  # the wrapped view changes the edge columns


def test_reference_synchronization_changes_the_panorama_only_when_on(flux_pipe):
    pipe = flux_pipe().to(torch.float64)
    latents = noise(1, 64, 128).double()
    run = {"steps": 3, "window": 8, "stride": 4, "max_sequence_length": 32, "perceptual_loss": SmoothPerceptualLoss()}
    multidiffusion = flux_reference(pipe, PROMPT, latents, **run)
    synchronized = flux_reference(pipe, PROMPT, latents, sync_weight=20.0, sync_thres=2, **run)
    assert torch.isfinite(synchronized).all()
    assert relative_error(synchronized, multidiffusion) > 1e-4
    assert torch.equal(flux_reference(pipe, PROMPT, latents, sync_weight=20.0, sync_thres=0, **run), multidiffusion)


def test_reference_runs_with_lpips(flux_pipe):
    pipe = flux_pipe()
    latents = noise(1, 64, 96)
    synchronized = flux_reference(
        pipe,
        PROMPT,
        latents,
        2,
        window=8,
        stride=4,
        sync_weight=20.0,
        perceptual_loss=make_lpips(),
        max_sequence_length=32,
    )
    assert torch.isfinite(synchronized).all() and synchronized.shape == latents.shape
