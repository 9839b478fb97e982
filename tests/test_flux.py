"""FLUX.1: the tiny offline components, the plain panorama loop (`tests/flux_reference.py`) against diffusers'
`FluxPipeline`, and `SyncDiffusionFluxPipeline` against both."""

import copy
import dataclasses
import inspect
import json
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

import pipeline_syncdiffusion_flux
from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline, SyncSettings, crop_views
from syncdiffusion_utils.testing import (
    FLUX_PRESETS,
    add_tiny_flux_ip_adapter,
    make_flux_components,
    make_lpips,
    make_t5_tokenizer,
    make_tiny_flux_decoder,
    save_tiny_flux_lora,
    save_tiny_flux_pipeline,
)
from tests import test_hub, test_loading
from tests.flux_reference import flux_reference, image_ids, pack, shifted_sigmas, timestep_shift, unpack
from tests.reference_loop import SmoothPerceptualLoss


# Loading tests reuse the fake Hub and the custom-code cache of the SD loading tests.
fake_hub = test_hub.fake_hub
modules_cache = test_loading.modules_cache

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


# ---------------------------------------------------------------------------------------------------------------
# SyncDiffusionFluxPipeline
# ---------------------------------------------------------------------------------------------------------------

# Synchronized comparisons run in float64 with the smooth loss (as tests/reference_loop.py explains): the pipeline
# and the reference agree to 1.0e-7..1.4e-7 of the largest latent (the core computes the update and the views' sums in
# float32), a 1% weight error at the second synchronized step moves them by 1.6e-4; 2e-6 lies between (14x above the
# noise, 78x below the error).
SYNC_TOLERANCE = 2e-6
SMALL = {"num_inference_steps": 3, "max_sequence_length": 32}


def components(cache, guidance_embeds=True, scheduler="dev"):
    key = (guidance_embeds, scheduler)
    if key not in cache:
        cache[key] = make_flux_components(guidance_embeds=guidance_embeds, scheduler=scheduler)
    return copy.deepcopy(cache[key])


@pytest.fixture
def flux_pair(flux_components_cache, lpips_module):
    """`(FluxPipeline, SyncDiffusionFluxPipeline)` on copies of the same tiny components; `flux_pair(**variant)`."""

    def build(**variant):
        parts = components(flux_components_cache, **variant)
        flux, ours = FluxPipeline(**copy.deepcopy(parts)), SyncDiffusionFluxPipeline(**parts)
        for pipe in (flux, ours):
            pipe.set_progress_bar_config(disable=True)
        ours.set_perceptual_loss(lpips_module)
        return flux, ours

    return build


def generator():
    return torch.Generator().manual_seed(0)


ONE_VIEW = {
    "guidance embedding": ({}, {}),
    "no guidance embedding": ({"guidance_embeds": False}, {}),
    "true cfg": ({}, {"negative_prompt": "a photo of a forest", "true_cfg_scale": 4.0}),
    "two images per prompt": ({}, {"num_images_per_prompt": 2}),
}


@pytest.mark.parametrize("case", list(ONE_VIEW))
def test_one_view_is_flux_pipelines_image(flux_pair, case):
    variant, call = ONE_VIEW[case]
    flux, ours = flux_pair(**variant)
    expected = flux(PROMPT, height=64, width=64, generator=generator(), output_type="np", **SMALL, **call).images
    image = ours(
        PROMPT,
        height=64,
        width=64,
        window_size=64,
        sync_weight=0,
        generator=generator(),
        output_type="np",
        **SMALL,
        **call,
    ).images
    assert abs(image - expected).max() < TOLERANCE


def test_one_view_is_flux_schnells_image(flux_pair):
    flux, ours = flux_pair(guidance_embeds=False, scheduler="schnell")
    call = {"num_inference_steps": 4, "guidance_scale": 0.0, "max_sequence_length": 256, "output_type": "np"}
    expected = flux(PROMPT, height=64, width=64, generator=generator(), **call).images
    image = ours(PROMPT, height=64, width=64, window_size=64, generator=generator(), **call).images
    assert abs(image - expected).max() < TOLERANCE


def test_latents_packed_or_unpacked_and_latent_output_is_packed(flux_pair):
    flux, ours = flux_pair()
    latents = torch.randn(1, 16, 8, 16, generator=generator())
    call = {"height": 64, "width": 128, "window_size": 64, "stride": 4, "sync_weight": 0, "output_type": "latent"}
    unpacked = ours(PROMPT, latents=latents, **call, **SMALL).images
    packed = ours(PROMPT, latents=pack(latents), **call, **SMALL).images
    assert unpacked.shape == (1, 4 * 8, 64) and torch.equal(unpacked, packed)


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("view_batch_size", [1, 3])
def test_multidiffusion_equals_the_reference_loop(flux_pair, circular, view_batch_size):
    _, ours = flux_pair()
    latents = torch.randn(1, 16, 8, 20, generator=generator())
    expected = flux_reference(ours, PROMPT, latents, 3, window=8, stride=4, circular=circular, max_sequence_length=32)
    packed = ours(
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
    assert relative_error(unpack(packed, 8, 20), expected) < TOLERANCE


SYNC_CASES = {
    "one view per batch": ({"view_batch_size": 1}, {}, 1),
    "two views per batch": ({"view_batch_size": 2}, {}, 1),
    "true cfg": ({}, {"negative_prompt": "a photo of a forest", "true_cfg_scale": 3.0}, 1),
    "two images per prompt": ({"num_images_per_prompt": 2, "view_batch_size": 3}, {}, 2),
}


@pytest.mark.parametrize("case", list(SYNC_CASES))
def test_synchronization_equals_the_reference_loop(flux_pair, case):
    """Gradient through the transformer (the true-CFG velocity included), the VAE decoder and the loss; every image
    synchronized to its own anchor. In float64 with the smooth loss (see SYNC_TOLERANCE)."""
    pipeline_only, shared, num_images = SYNC_CASES[case]
    _, ours = flux_pair()
    ours = ours.to(torch.float64)
    ours.set_perceptual_loss(SmoothPerceptualLoss())
    latents = torch.randn(num_images, 16, 8, 16, generator=generator(), dtype=torch.float64)
    run = {"sync_weight": 20.0, "sync_thres": 2, "max_sequence_length": 32, **shared}
    reference = {"window": 8, "stride": 4, "perceptual_loss": SmoothPerceptualLoss(), **run}
    expected = flux_reference(ours, PROMPT, latents, 3, **reference)
    call = {"height": 64, "width": 128, "window_size": 64, "stride": 4, "num_inference_steps": 3, **pipeline_only}
    packed = ours(PROMPT, latents=latents, output_type="latent", **call, **run).images
    assert relative_error(unpack(packed, 8, 16), expected) < SYNC_TOLERANCE
    wrong = flux_reference(
        ours, PROMPT, latents, 3, weight_at=lambda step: 20.0 * 0.95**step * (1.01 if step == 1 else 1.0), **reference
    )
    assert relative_error(unpack(packed, 8, 16), wrong) > 10 * SYNC_TOLERANCE


def test_call_takes_every_flux_pipeline_argument():
    """Every `FluxPipeline.__call__` argument, with its default except the panorama's size."""
    ours = inspect.signature(SyncDiffusionFluxPipeline.__call__).parameters
    for name, parameter in inspect.signature(FluxPipeline.__call__).parameters.items():
        assert name in ours, name
        if name not in ("height", "width"):
            assert ours[name].default == parameter.default, name
    assert (ours["height"].default, ours["width"].default) == (1024, 4096)


# ---------------------------------------------------------------------------------------------------------------
# Passes
# ---------------------------------------------------------------------------------------------------------------


class FluxPassCounter:
    """View-passes of a call, with hooks: transformer and loss-decoder forwards and backwards (recomputations by
    activation checkpointing included in the forwards and counted apart), LPIPS forwards and backwards. A call on
    `k` views of `num_images` images counts `k`."""

    def __init__(self, pipe, num_images=1, sync_decoder=None):
        self.pipe, self.num_images = pipe, num_images
        self.decoder = (sync_decoder if sync_decoder is not None else pipe.vae).decoder
        self.counts = dict.fromkeys(
            [
                "transformer_fwd",
                "transformer_recompute",
                "transformer_bwd",
                "dec_fwd",
                "dec_recompute",
                "dec_bwd",
                "lpips_fwd",
                "lpips_bwd",
                "final_decode",
            ],
            0,
        )
        self.handles = []
        self.in_sync_decode = False

    def add(self, key, batch):
        self.counts[key] += batch // self.num_images

    def track(self, module, first_block, prefix, forward_key=None):
        calls = {"forward": 0}

        def forward(module, args, kwargs):
            tensor = kwargs.get("hidden_states", args[0] if args else None)
            key = forward_key() if forward_key else f"{prefix}_fwd"
            calls["batch"] = tensor.shape[0]
            calls["forward"] += 1
            self.add(key, tensor.shape[0])

        def block(module, args, kwargs):
            calls["block"] = calls.get("block", 0) + 1
            if calls["block"] > calls["forward"]:  # a block ran again without a new forward: recomputed
                self.add(f"{prefix}_recompute", calls["batch"])
                self.add(f"{prefix}_fwd", calls["batch"])
                calls["forward"] += 1

        def backward(module, grad_input, grad_output):
            self.add(f"{prefix}_bwd", grad_output[0].shape[0])

        self.handles += [
            module.register_forward_pre_hook(forward, with_kwargs=True),
            module.register_full_backward_hook(backward),
        ]
        if first_block is not None:
            self.handles.append(first_block.register_forward_pre_hook(block, with_kwargs=True))

    def __enter__(self):
        pipe = self.pipe
        self.track(pipe.transformer, pipe.transformer.transformer_blocks[0], "transformer")
        self.track(
            self.decoder,
            self.decoder.up_blocks[0] if hasattr(self.decoder, "up_blocks") else None,
            "dec",
            forward_key=lambda: "dec_fwd" if self.in_sync_decode else "final_decode",
        )
        self.track(pipe._perceptual_loss, None, "lpips")
        original = pipe.decode_for_sync

        def decode_for_sync(*args, **kwargs):
            self.in_sync_decode = True
            try:
                return original(*args, **kwargs)
            finally:
                self.in_sync_decode = False

        pipe.decode_for_sync = decode_for_sync
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        del self.pipe.decode_for_sync
        return False


def expected_passes(num_views, steps, synchronized, gradient="transformer", reuse=False, checkpointing=False):
    """The docs' formulas: a MultiDiffusion step N transformer forwards; a synchronized step 1 + (N - 1) gradient
    passes (+ N - 1 forwards after the update unless reused), N decodes, N - 1 decoder, LPIPS and (exact)
    transformer backwards, and with checkpointing one recomputed forward per backward."""
    n, others = num_views, num_views - 1
    through = gradient == "transformer"
    recompute_transformer = others if checkpointing and through else 0
    recompute_decoder = others if checkpointing else 0
    plain = steps - synchronized
    return {
        "transformer_fwd": plain * n + synchronized * (1 + others + (0 if reuse else others) + recompute_transformer),
        "transformer_recompute": synchronized * recompute_transformer,
        "transformer_bwd": synchronized * (others if through else 0),
        "dec_fwd": synchronized * (n + recompute_decoder),
        "dec_recompute": synchronized * recompute_decoder,
        "dec_bwd": synchronized * others,
        "lpips_fwd": synchronized * others,
        "lpips_bwd": synchronized * others,
        "final_decode": 1,
    }


MODES = {
    "exact": ({}, {}),
    "x0 gradient": ({"sync_gradient": "x0"}, {"gradient": "x0"}),
    "reused velocity": ({"sync_reuse_noise": True}, {"reuse": True}),
    "fast": ({"sync_mode": "fast"}, {"gradient": "x0", "reuse": True}),
    "checkpointing": ({"sync_gradient_checkpointing": True}, {"checkpointing": True}),
    "fast with checkpointing": (
        {"sync_mode": "fast", "sync_gradient_checkpointing": True},
        {"gradient": "x0", "reuse": True, "checkpointing": True},
    ),
}


# The counter's backward hooks on the decoder also fire where only its output needs a gradient; torch says so.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("num_images", [1, 2])
def test_passes_follow_the_formulas(flux_pair, mode, num_images):
    call, formula = MODES[mode]
    _, ours = flux_pair()
    with FluxPassCounter(ours, num_images=num_images) as counter:
        ours(
            PROMPT,
            height=64,
            width=128,
            window_size=64,
            stride=4,
            sync_thres=2,
            num_images_per_prompt=num_images,
            view_batch_size=2,
            output_type="np",
            **SMALL,
            **call,
        )
    assert counter.counts == expected_passes(3, 3, 2, **formula)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_tiny_decoder_replaces_the_vae_in_the_loss(flux_pair):
    _, ours = flux_pair()
    decoder = make_tiny_flux_decoder(width_mult=0.125)
    with FluxPassCounter(ours, sync_decoder=decoder) as counter:
        ours(
            PROMPT,
            height=64,
            width=128,
            window_size=64,
            stride=4,
            sync_thres=2,
            sync_mode="fast",
            sync_decoder=decoder,
            output_type="np",
            **SMALL,
        )
    expected = expected_passes(3, 3, 2, gradient="x0", reuse=True)
    expected["final_decode"] = 0  # counted on the tiny decoder: the VAE's final decode is not its
    assert counter.counts == expected


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the argument, before any model runs
# ---------------------------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "window_size": {"window_size": 72},
    "height": {"height": 72},
    "width": {"width": 136},
    "stride": {"stride": 3},
    "stride ": {"stride": 0},
    "height  ": {"height": 48, "window_size": 64},
    "view_batch_size": {"view_batch_size": 0},
    "sync_weight": {"sync_weight": -1.0},
    "sync_decay_rate": {"sync_decay_rate": 0.0},
    "sync_freq": {"sync_freq": 0},
    "sync_thres": {"sync_thres": -1},
    "sync_mode": {"sync_mode": "slow"},
    "sync_gradient": {"sync_gradient": "unet"},
    "sync_lpips_size": {"sync_lpips_size": 16},
    "sync_decode_downsample": {"sync_decode_downsample": 3},
    "max_sequence_length": {"max_sequence_length": 513},
    "latents": {"latents": torch.zeros(1, 16, 8, 8)},
    "num_inference_steps": {"num_inference_steps": 0},
    "generator": {"generator": [torch.Generator(), torch.Generator()]},
    "true_cfg_scale": {"true_cfg_scale": -1.0},
    "callback_on_step_end_tensor_inputs": {"callback_on_step_end_tensor_inputs": ["negative_prompt_embeds"]},
}


def watch_models(pipe):
    """A list that records every model forward of `pipe`."""
    calls = []
    for name in ("text_encoder", "text_encoder_2", "transformer", "vae"):
        model = getattr(pipe, name)
        if model is not None:
            model.register_forward_pre_hook(lambda module, args, name=name: calls.append(name))
    return calls


@pytest.mark.parametrize("argument", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_argument(flux_pair, argument):
    _, ours = flux_pair()
    calls = watch_models(ours)
    call = {"height": 64, "width": 128, "window_size": 64, "stride": 4, **SMALL, **BAD_INPUTS[argument]}
    with pytest.raises(ValueError) as error:
        ours(PROMPT, **call)
    message = str(error.value)
    assert f"`{argument.strip()}`" in message and "\n" not in message
    assert calls == []


def test_mismatched_embeds_are_refused(flux_pair):
    _, ours = flux_pair()
    with torch.no_grad():
        embeds, pooled, _ = ours.encode_prompt(PROMPT, max_sequence_length=32)
        negative, negative_pooled, _ = ours.encode_prompt("a forest", max_sequence_length=16)
    calls = watch_models(ours)
    call = {"height": 64, "width": 128, "window_size": 64, "stride": 4, "num_inference_steps": 2}
    with pytest.raises(ValueError, match="`pooled_prompt_embeds`"):
        ours(prompt_embeds=embeds, **call)
    with pytest.raises(ValueError, match="`negative_prompt_embeds`"):
        ours(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=negative,
            negative_pooled_prompt_embeds=negative_pooled,
            true_cfg_scale=4.0,
            **call,
        )
    with pytest.raises(ValueError, match="`pooled_prompt_embeds`"):
        ours(prompt_embeds=embeds, pooled_prompt_embeds=pooled[:, :16], **call)
    assert calls == []


def test_unsupported_scheduler_is_refused(flux_pair):
    _, ours = flux_pair()
    ours.scheduler = DDIMScheduler()
    calls = watch_models(ours)
    with pytest.raises(ValueError, match="`scheduler`"):
        ours(PROMPT, height=64, width=128, window_size=64, stride=4, **SMALL)
    assert calls == []


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

LOAD_CALL = {"height": 64, "width": 128, "window_size": 64, "stride": 4, "sync_thres": 2, "output_type": "np", **SMALL}


def images_of(pipe, lpips_module):
    pipe.set_perceptual_loss(lpips_module)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, generator=generator(), **LOAD_CALL).images


def test_from_flux_pipeline_and_its_components(flux_pair, lpips_module):
    flux, ours = flux_pair()
    expected = images_of(ours, lpips_module)
    for pipe in (SyncDiffusionFluxPipeline.from_pipe(flux), SyncDiffusionFluxPipeline(**flux.components)):
        assert type(pipe) is SyncDiffusionFluxPipeline
        assert abs(images_of(pipe, lpips_module) - expected).max() == 0


@pytest.fixture
def flux_folder(tmp_path_factory):
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "model")


# Weights loaded from safetensors sit at other memory alignments, where CPU kernels round differently (measured:
# 3.6e-7 of FluxPipeline's latents), and the synchronized steps amplify that through LPIPS: loaded pipelines' images
# differ by up to 3.4e-5 (in [0, 1]); a wrong or missing component changes them by more than 1e-2.
LOADED_TOLERANCE = 2e-4


@pytest.mark.parametrize("how", ["file", "folder"])
def test_custom_pipeline_from_a_file_or_folder(flux_folder, lpips_module, tmp_path, how, modules_cache):
    source = Path(pipeline_syncdiffusion_flux.__file__)
    if how == "folder":
        (tmp_path / "code").mkdir()
        (tmp_path / "code" / "pipeline.py").write_bytes(source.read_bytes())
        custom = str(tmp_path / "code")
    else:
        custom = str(source)
    pipe = DiffusionPipeline.from_pretrained(flux_folder, custom_pipeline=custom, trust_remote_code=True)
    assert type(pipe).__name__ == "SyncDiffusionFluxPipeline" and type(pipe) is not SyncDiffusionFluxPipeline
    direct = SyncDiffusionFluxPipeline.from_pretrained(flux_folder)
    assert abs(images_of(pipe, lpips_module) - images_of(direct, lpips_module)).max() < LOADED_TOLERANCE


def test_saved_pipeline_carries_its_source_and_reloads(flux_pair, lpips_module, tmp_path, modules_cache):
    _, ours = flux_pair()
    expected = images_of(ours, lpips_module)
    ours.save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    assert (saved / "syncdiffusion_flux.py").read_bytes() == Path(pipeline_syncdiffusion_flux.__file__).read_bytes()
    model_index = json.loads((saved / "model_index.json").read_text())
    assert model_index["_class_name"] == ["syncdiffusion_flux", "SyncDiffusionFluxPipeline"]
    assert model_index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    direct = SyncDiffusionFluxPipeline.from_pretrained(saved)
    remote = DiffusionPipeline.from_pretrained(saved, trust_remote_code=True)
    assert type(direct) is SyncDiffusionFluxPipeline
    assert type(remote).__name__ == "SyncDiffusionFluxPipeline" and type(remote) is not SyncDiffusionFluxPipeline
    for pipe in (direct, remote):
        assert abs(images_of(pipe, lpips_module) - expected).max() < LOADED_TOLERANCE


def test_custom_pipeline_from_a_fake_hub(fake_hub, flux_folder, lpips_module):
    repo_id = "syncdiffusion-test/syncdiffusion-flux"
    sha = fake_hub.add_repo(repo_id, {"pipeline.py": Path(pipeline_syncdiffusion_flux.__file__).read_bytes()})
    pipe = DiffusionPipeline.from_pretrained(flux_folder, custom_pipeline=repo_id, trust_remote_code=True)
    module_file = Path(sys.modules[type(pipe).__module__].__file__)
    assert type(pipe).__name__ == "SyncDiffusionFluxPipeline" and module_file.parent.name == sha
    direct = SyncDiffusionFluxPipeline.from_pretrained(flux_folder)
    assert abs(images_of(pipe, lpips_module) - images_of(direct, lpips_module)).max() < LOADED_TOLERANCE


def test_a_tiny_lora_loads_and_changes_the_result(flux_pair, lpips_module, tmp_path):
    pytest.importorskip("peft")  # diffusers' load_lora_weights requires the peft backend
    _, ours = flux_pair()
    expected = images_of(ours, lpips_module)
    ours.load_lora_weights(save_tiny_flux_lora(tmp_path, ours.transformer))
    assert abs(images_of(ours, lpips_module) - expected).max() > 1e-3
    ours.unload_lora_weights()
    assert abs(images_of(ours, lpips_module) - expected).max() == 0


# ---------------------------------------------------------------------------------------------------------------
# The synchronization update, precision, memory, circular decode
# ---------------------------------------------------------------------------------------------------------------


def sync_setup(pipe, dtype=torch.float32):
    """`pipe` ready for direct calls of its synchronization methods at the first of 20 steps (64x128 px, window 64,
    stride 4: 3 views), with the conditioning `__call__` would build."""
    pipe._joint_attention_kwargs, pipe._guidance_scale = None, 3.5
    with torch.no_grad():
        positive = pipe._text_conditioning(PROMPT, None, None, None, 1, max_sequence_length=32)
    ids = pipe._prepare_latent_image_ids(1, 4, 4, "cpu", dtype)
    guidance = torch.full((1,), 3.5)
    conditioning = pipe._conditioning(positive, None, None, None, guidance, ids, 1.0)
    mu = timestep_shift(16, pipe.scheduler.config)
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 20, 20), mu=mu)
    pipe.scheduler.set_begin_index(0)
    t = pipe.scheduler.timesteps[0]
    views = pipe.get_views(64, 128, 64, stride=4)
    latents = torch.randn(1, 16, 8, 16, generator=torch.Generator().manual_seed(5)).to(dtype)
    return SimpleNamespace(t=t, conditioning=conditioning, views=views, latents=latents)


def loss_image(pipe, view_latents, setup, views):
    with torch.no_grad():
        velocity = pipe.predict_noise(view_latents, setup.t, setup.conditioning, views)
        return pipe.decode_for_sync(pipe.predict_clean_latents(view_latents, velocity, setup.t))


def test_one_update_lowers_the_views_lpips_distance_to_the_anchor(flux_pair):
    """The mechanism: the step brings the view's predicted image closer to the anchor's, the opposite step moves it
    away (measured with the random-VGG LPIPS: 0.0872 -> 0.0868 at weight 20, 0.0876 at -20)."""
    _, ours = flux_pair()
    setup = sync_setup(ours)
    sync = SyncSettings()
    anchor = ours.prepare_anchor(setup.latents, setup.views[1], setup.t, setup.conditioning, sync)
    view = [setup.views[0]]
    before = crop_views(setup.latents, view)

    def distance(latents):
        return ours.perceptual_distance(loss_image(ours, latents, setup, view), anchor["images"]).item()

    def updated(weight):
        return ours.synchronize_views(before, view, anchor["images"], setup.t, weight, setup.conditioning, sync)[0]

    assert distance(updated(20.0)) < distance(before) < distance(updated(-20.0))


def test_bfloat16_gradient_pass_is_close_to_float32(flux_pair):
    """LPIPS stays float32; with the transformer and VAE in bfloat16 the synchronization gradient keeps the float32
    one's direction (measured on the tiny model: cosine 0.968-0.984, relative error 0.18-0.26 over seeds and steps;
    0.98 here)."""
    gradients = {}
    for dtype in (torch.float32, torch.bfloat16):
        _, ours = flux_pair()
        ours = ours.to(dtype)
        setup = sync_setup(ours, dtype)
        anchor = ours.prepare_anchor(setup.latents, setup.views[1], setup.t, setup.conditioning, SyncSettings())
        view = [setup.views[0]]
        before = crop_views(setup.latents, view)

        def predict_clean(latents):
            velocity = ours.predict_noise(latents, setup.t, setup.conditioning, view)
            return ours.predict_clean_latents(latents, velocity, setup.t), velocity

        updated, _ = pipeline_syncdiffusion_flux.synchronization_update(
            before, anchor["images"], 1.0, predict_clean, ours.decode_for_sync, ours.perceptual_distance
        )
        gradients[dtype] = (before.float() - updated).flatten()
    fp32, bf16 = gradients[torch.float32], gradients[torch.bfloat16]
    cosine = torch.nn.functional.cosine_similarity(fp32, bf16, dim=0).item()
    relative = ((bf16 - fp32).norm() / fp32.norm()).item()
    assert cosine > 0.95 and relative < 0.4, (cosine, relative)


def test_auto_view_batches_fit_the_gradient_pass_or_checkpoint(flux_pair, monkeypatch):
    """On CUDA, "auto" divides the free memory by the per-view estimates; when one view's gradient pass does not fit,
    it turns on gradient checkpointing (CUDA's free memory is faked here)."""
    _, ours = flux_pair()
    ours._window_size, ours._text_tokens, ours._true_cfg = 64, 32, False
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


def test_the_transformer_estimate_matches_what_autograd_saves(flux_pair):
    """The gradient pass's transformer term of `view_memory` against the bytes autograd saves in it, measured with
    saved-tensor hooks (weights excluded) on the tiny transformer: within a factor 2 (measured: 0.97)."""
    _, ours = flux_pair()
    ours._window_size, ours._text_tokens, ours._true_cfg = 64, 32, False
    sync = SyncSettings()
    estimate = ours.view_memory(1, torch.float32, sync) - ours.view_memory(
        1, torch.float32, dataclasses.replace(sync, through_denoiser=False)
    )
    setup = sync_setup(ours)
    weights = {p.data_ptr() for p in ours.transformer.parameters()}
    saved = {}

    def pack_hook(tensor):
        if tensor.data_ptr() not in weights:
            saved[(tensor.data_ptr(), tuple(tensor.shape))] = tensor.numel() * tensor.element_size()
        return tensor

    latents = crop_views(setup.latents, setup.views[:1]).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda tensor: tensor):
        ours.predict_noise(latents, setup.t, setup.conditioning, setup.views[:1])
    measured = sum(saved.values())
    assert 0.5 < estimate / measured < 2


@torch.no_grad()
def test_circular_panorama_decodes_without_a_seam(flux_pair):
    """A 360-degree panorama repeats without end: its decode should be the middle of the decode of three copies side
    by side. The padded decode is, at the edges too (measured: 0.007 mean difference in the edge columns, in
    [-1, 1]); a plain decode's edge columns, which see no wrap, are 0.13-0.21 off."""
    _, ours = flux_pair()
    call = {"height": 64, "width": 128, "window_size": 64, "stride": 4, "circular_padding": True, "sync_weight": 0}
    packed = ours(PROMPT, generator=generator(), output_type="latent", **call, **SMALL).images
    latents = unpack(packed, 8, 16)
    wrapped = ours.vae.decode(ours._decoder_input(torch.cat([latents] * 3, dim=-1), ours.vae)).sample[..., 128:256]
    padded = ours.decode_latents_with_padding(latents)
    plain = ours.vae.decode(ours._decoder_input(latents, ours.vae)).sample

    def edge_difference(image):
        columns = (image - wrapped).abs().mean(dim=(0, 1, 2))
        return torch.cat([columns[:4], columns[-4:]]).max().item()

    assert padded.shape == wrapped.shape == (1, 3, 64, 128)
    assert edge_difference(padded) < 0.03 < 0.1 < edge_difference(plain)
    image = ours(PROMPT, generator=generator(), output_type="pt", **call, **SMALL).images
    assert torch.allclose(image, (padded / 2 + 0.5).clamp(0, 1), atol=1e-6)


def test_an_unknown_keyword_is_a_type_error(flux_pair):
    _, ours = flux_pair()
    with pytest.raises(TypeError, match="`sync_weigth`"):
        ours(PROMPT, height=64, width=64, window_size=64, sync_weigth=1.0, **SMALL)


def test_callbacks_see_and_replace_flux_pipelines_packed_latents(flux_pair):
    flux, ours = flux_pair()
    seen = {}

    def halve_at_first_step(pipe, step, timestep, tensors):
        seen.setdefault(type(pipe).__name__, []).append(tuple(tensors["latents"].shape))
        return {"latents": tensors["latents"] / 2} if step == 0 else {}

    call = {"height": 64, "width": 64, "output_type": "latent", "callback_on_step_end": halve_at_first_step, **SMALL}
    expected = flux(PROMPT, generator=generator(), **call).images
    latents = ours(PROMPT, window_size=64, generator=generator(), **call).images
    assert seen["FluxPipeline"] == seen["SyncDiffusionFluxPipeline"] == [(1, 16, 64)] * 3
    assert relative_error(latents, expected) < TOLERANCE
    assert (
        relative_error(latents, flux(PROMPT, generator=generator(), **dict(call, callback_on_step_end=None)).images)
        > 0.01
    )


@pytest.mark.parametrize(
    "call, size", [({"sync_lpips_size": 32}, (32, 32)), ({"sync_decode_downsample": 2}, (32, 32)), ({}, (64, 64))]
)
def test_lpips_size_and_decode_downsample_shrink_the_compared_images(flux_pair, call, size):
    _, ours = flux_pair()
    sizes = set()
    handle = ours._perceptual_loss.register_forward_pre_hook(lambda module, args: sizes.add(tuple(args[0].shape[-2:])))
    ours(PROMPT, height=64, width=128, window_size=64, stride=4, sync_thres=1, output_type="latent", **SMALL, **call)
    handle.remove()
    assert sizes == {size}


@pytest.fixture
def ip_adapter_pair(flux_pair):
    """`flux_pair()` whose transformers carry the same random IP-Adapter, and its image embeddings."""
    flux, ours = flux_pair()
    add_tiny_flux_ip_adapter(flux.transformer)
    add_tiny_flux_ip_adapter(ours.transformer)
    embeds = [torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(1))]
    # Both sides as embeddings: a missing one would be a black image through an image encoder (none offline).
    images = {"ip_adapter_image_embeds": embeds, "negative_ip_adapter_image_embeds": [torch.zeros(1, 1, 16)]}
    return flux, ours, images


@pytest.mark.parametrize("call", [{}, {"negative_prompt": "a photo of a forest", "true_cfg_scale": 3.0}])
def test_ip_adapter_one_view_is_flux_pipelines(ip_adapter_pair, call):
    flux, ours, images = ip_adapter_pair
    run = {"height": 64, "width": 64, "output_type": "latent", **SMALL, **images, **call}
    expected = flux(PROMPT, generator=generator(), **run).images
    latents = ours(PROMPT, window_size=64, generator=generator(), **run).images
    assert relative_error(latents, expected) < TOLERANCE
    without = ours(
        PROMPT, window_size=64, generator=generator(), **dict(run, ip_adapter_image_embeds=[torch.zeros(1, 1, 16)])
    ).images
    assert relative_error(without, latents) > 0.01  # the image embeddings condition every pass


def test_ip_adapter_conditions_every_view_batch(ip_adapter_pair):
    """Each view of a batch gets its images' embeddings: batches of 1 and 3 views give the same synchronized
    panorama, to float32 batching noise (measured 2.0e-5, amplified by LPIPS; the SD tests' bound, 1e-4)."""
    _, ours, images = ip_adapter_pair
    run = {"height": 64, "width": 128, "window_size": 64, "stride": 4, "sync_thres": 2, "output_type": "latent"}
    one, three = (
        ours(PROMPT, generator=generator(), view_batch_size=size, **run, **SMALL, **images).images for size in (1, 3)
    )
    assert relative_error(three, one) < 1e-4


def test_without_text_encoders_from_embeds(flux_pair):
    _, ours = flux_pair()
    with torch.no_grad():
        embeds, pooled, _ = ours.encode_prompt(PROMPT, max_sequence_length=32)
    call = {"height": 64, "width": 128, "window_size": 64, "stride": 4, "sync_thres": 2, "output_type": "latent"}
    expected = ours(PROMPT, generator=generator(), num_images_per_prompt=2, **call, **SMALL).images
    bare = SyncDiffusionFluxPipeline(
        **dict(ours.components, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    )
    bare.set_perceptual_loss(ours._perceptual_loss)
    bare.set_progress_bar_config(disable=True)
    latents = bare(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        generator=generator(),
        num_images_per_prompt=2,  # the embeddings are repeated per image
        **call,
        num_inference_steps=3,
    ).images
    assert latents.shape == expected.shape and relative_error(latents, expected) < TOLERANCE
