"""Panoramas from an image (`image`, `mask_image`, `strength`, `sync_anchor`): one view against diffusers'
image-to-image and inpainting pipelines (SD, SDXL, FLUX.1), several views against the plain loop of
tests/image_reference.py, the all-white mask against the text-to-image panorama, the kept region, the anchor, and bad
input."""

import copy
import logging
import re
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    UNet2DConditionModel,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from image_reference import reference_image_panorama
from reference_loop import (
    SmoothPerceptualLoss,
    assert_trajectories_match,
    for_reference_comparison,
    pipeline_trajectory,
)

from pipeline_syncdiffusion import SyncDiffusionPipeline, anchor_view_index
from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline
from pipeline_syncdiffusion_xl import SyncDiffusionXLPipeline
from syncdiffusion_utils.testing import make_flux_components, make_sdxl_components


pytestmark = pytest.mark.usefixtures("one_thread")

# 64x128 pixels: 8x16 latents, 8-latent views at stride 4 -> 3 views (columns 0, 4 and 8).
PANORAMA = {"height": 64, "width": 128, "stride": 4}
PROMPT = "a mountain lake"

# One view against diffusers' pipelines, np output: inpainting measured 0.0 (SD and SDXL, 4- and 9-channel UNets,
# strength 0.6 and 1.0, one or two images), FLUX.1 0.0 both ways; SD image-to-image with guidance 1.4e-6..4.2e-6,
# SDXL's 1.4e-6..2.5e-6 (0.0 without guidance): diffusers' image latents come out of the VAE channels-last and its
# UNet input keeps that layout, ours is contiguous, and the convolutions round differently. A 1% guidance-scale
# error moves the output by 1.6e-3..7.4e-3; 3e-5 lies between (7x over the noise, 50x under the smallest error).
ONE_VIEW_TOLERANCE = 3e-5


def photo(height, width, disc=True):
    """A test picture (gradients, a stripe pattern and, with `disc`, a red disc) as a PIL image."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x / (width - 1), y / (height - 1), 0.5 + 0.5 * np.sin(x / 9.0)], axis=-1)
    if disc:
        pixels[(x - width // 6) ** 2 + (y - height // 2) ** 2 < (height // 4) ** 2] = [0.9, 0.2, 0.1]
    return PIL.Image.fromarray((pixels * 255).round().astype(np.uint8))


def mask_of(height, width, kept_columns, soft_columns=()):
    """A PIL mask of the panorama's size: black (keep) over `kept_columns` (a slice of pixel columns), grey (128)
    over `soft_columns`, white (generate) elsewhere."""
    pixels = np.full((height, width), 255, dtype=np.uint8)
    pixels[:, kept_columns] = 0
    if soft_columns:
        pixels[:, soft_columns] = 128
    return PIL.Image.fromarray(pixels)


def as_tensors(image, mask):
    """The image `(1, 3, H, W)` in [-1, 1] and the mask `(1, 1, H, W)` in [0, 1] of the PIL ones, in float32 as the
    pipeline's image processor makes them."""
    pixels = torch.from_numpy(np.asarray(image).astype(np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    if mask is None:
        return pixels, None
    return pixels, torch.from_numpy(np.asarray(mask).astype(np.float32) / 255)[None, None]


def components_of(pipe, in_channels=4):
    """Copies of `pipe`'s SD components; `in_channels=9`: an inpainting UNet of the same config (random weights)."""
    components = {
        k: copy.deepcopy(pipe.components[k]) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    }
    if in_channels != 4:
        torch.manual_seed(1)
        components["unet"] = UNet2DConditionModel.from_config({**pipe.unet.config, "in_channels": in_channels}).eval()
    return components


def build(pipeline_class, components):
    """An SD pipeline of `pipeline_class` on `components`, without safety checker or progress bar."""
    pipe = pipeline_class(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


# ----------------------------------------------------------------------------------------------------------------
# One view: diffusers' own pipelines
# ----------------------------------------------------------------------------------------------------------------

IMAGES = {
    "one_image": lambda: {"generator": torch.Generator().manual_seed(3)},
    "two_images_generator_list": lambda: {"num_images_per_prompt": 2, "generator": generators([3, 4])},
    "no_guidance": lambda: {"guidance_scale": 1.0, "generator": torch.Generator().manual_seed(5)},
}


@pytest.mark.parametrize("images", list(IMAGES))
@pytest.mark.parametrize("strength", [0.6, 1.0])
@pytest.mark.parametrize("kind", ["img2img", "inpaint_4_channels", "inpaint_9_channels"])
def test_one_view_equals_diffusers_pipeline(pipe, kind, strength, images):
    """A window-sized image, MultiDiffusion (`sync_weight=0`), DDIM: the diffusers pipeline's output."""
    in_channels = 9 if kind == "inpaint_9_channels" else 4
    components = components_of(pipe, in_channels)
    ours = build(SyncDiffusionPipeline, copy.deepcopy(components))
    theirs_class = StableDiffusionImg2ImgPipeline if kind == "img2img" else StableDiffusionInpaintPipeline
    theirs = build(theirs_class, components)
    image = photo(64, 64)
    call = {"image": image, "strength": strength, "num_inference_steps": 5, "output_type": "np"}
    if kind != "img2img":
        call.update(mask_image=mask_of(64, 64, slice(0, 24)), height=64, width=64)
    expected = theirs(PROMPT, **call, **IMAGES[images]()).images
    result = ours(PROMPT, **{"height": 64, "width": 64, **call}, sync_weight=0.0, **IMAGES[images]()).images
    assert result.shape == expected.shape
    assert np.abs(result - expected).max() <= ONE_VIEW_TOLERANCE
    if images == "two_images_generator_list":
        assert np.abs(result[0] - result[1]).max() > 0.1  # each image its own generator's


def test_one_view_tolerance_catches_a_guidance_error(pipe):
    """A 1% guidance error moves image-to-image by 4.4e-3, 150x the tolerance."""
    components = components_of(pipe)
    theirs = build(StableDiffusionImg2ImgPipeline, copy.deepcopy(components))
    ours = build(SyncDiffusionPipeline, components)
    call = {"image": photo(64, 64), "strength": 0.6, "num_inference_steps": 5, "output_type": "np"}
    expected = theirs(PROMPT, **call, generator=torch.Generator().manual_seed(3)).images
    wrong = ours(
        PROMPT,
        **call,
        height=64,
        width=64,
        sync_weight=0.0,
        guidance_scale=7.575,
        generator=torch.Generator().manual_seed(3),
    ).images
    assert np.abs(wrong - expected).max() > 30 * ONE_VIEW_TOLERANCE


@pytest.fixture(scope="module")
def xl_components():
    return make_sdxl_components("tiny")


@pytest.mark.parametrize("strength", [0.6, 1.0])
@pytest.mark.parametrize("kind", ["img2img", "inpaint_4_channels", "inpaint_9_channels"])
def test_sdxl_one_view_equals_diffusers_pipeline(xl_components, kind, strength):
    """SDXL (Euler), two images per prompt from a generator list: StableDiffusionXLImg2ImgPipeline's and
    StableDiffusionXLInpaintPipeline's output (measured 1.7e-6..2.5e-6 image-to-image, 0.0 inpainting; guidance and
    strength passed, the two pipelines' defaults differ from each other)."""
    components = copy.deepcopy(xl_components)
    if kind == "inpaint_9_channels":
        torch.manual_seed(1)
        components["unet"] = UNet2DConditionModel.from_config({**components["unet"].config, "in_channels": 9}).eval()
    ours = SyncDiffusionXLPipeline(**copy.deepcopy(components), add_watermarker=False)
    theirs_class = StableDiffusionXLImg2ImgPipeline if kind == "img2img" else StableDiffusionXLInpaintPipeline
    theirs = theirs_class(**components, add_watermarker=False)
    for pipeline in (ours, theirs):
        pipeline.set_progress_bar_config(disable=True)
    size = 8 * components["unet"].config.sample_size
    call = {"image": photo(size, size), "strength": strength, "num_inference_steps": 5, "guidance_scale": 5.0}
    call.update(height=size, width=size, num_images_per_prompt=2, output_type="np")
    if kind != "img2img":
        call["mask_image"] = mask_of(size, size, slice(0, size // 2))
    expected = theirs(PROMPT, **call, generator=generators([3, 4])).images
    result = ours(PROMPT, **call, sync_weight=0.0, generator=generators([3, 4])).images
    assert result.shape == expected.shape
    assert np.abs(result - expected).max() <= ONE_VIEW_TOLERANCE


@pytest.fixture(scope="module")
def flux_components():
    return make_flux_components("tiny")


@pytest.mark.parametrize("strength", [0.6, 1.0])
@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_flux_one_view_equals_diffusers_pipeline(flux_components, kind, strength):
    """FLUX.1 (flow matching), two images per prompt from a generator list: FluxImg2ImgPipeline's and
    FluxInpaintPipeline's output (measured 0.0; a 1% guidance error moves it by 4.9e-2..1.0e-1). Guidance passed:
    theirs defaults to 7.0, ours to FluxPipeline's 3.5."""
    components = copy.deepcopy(flux_components)
    theirs = (FluxImg2ImgPipeline if kind == "img2img" else FluxInpaintPipeline)(**copy.deepcopy(components))
    ours = SyncDiffusionFluxPipeline(**components)
    for pipeline in (ours, theirs):
        pipeline.set_progress_bar_config(disable=True)
    call = {"image": photo(64, 64), "strength": strength, "num_inference_steps": 3, "max_sequence_length": 32}
    call.update(height=64, width=64, guidance_scale=3.5, num_images_per_prompt=2, output_type="np")
    if kind == "inpaint":
        call["mask_image"] = mask_of(64, 64, slice(0, 32))
    expected = theirs(PROMPT, **call, generator=generators([3, 4])).images
    result = ours(PROMPT, **call, window_size=64, sync_weight=0.0, generator=generators([3, 4])).images
    assert result.shape == expected.shape
    assert np.abs(result - expected).max() <= ONE_VIEW_TOLERANCE
    assert np.abs(result[0] - result[1]).max() > 0.1


# ----------------------------------------------------------------------------------------------------------------
# Several views: the plain loop of tests/image_reference.py
# ----------------------------------------------------------------------------------------------------------------

# The mask keeps the left 40 pixels (latent columns 0..4), blends a grey band (column 5, 128/255), generates the
# rest: view 0 keeps 5 latent columns, view 1 one, view 2 none, so "image" anchors view 0 (the middle is view 1).
MULTI_VIEW_MASK = {"kept_columns": slice(0, 40), "soft_columns": slice(40, 48)}

# (UNet input channels, with a mask, strength).
MULTI_VIEW_CASES = {
    "img2img": (4, False, 0.6),
    "inpaint_4_channels": (4, True, 0.6),
    "inpaint_4_channels_strength_1": (4, True, 1.0),
    "inpaint_9_channels": (9, True, 0.6),
    "inpaint_9_channels_strength_1": (9, True, 1.0),
}


def float64_pipeline(pipe, in_channels):
    """A pipeline on copies of `pipe`'s components in float64 with the smooth perceptual loss."""
    return for_reference_comparison(build(SyncDiffusionPipeline, components_of(pipe, in_channels)))


def multi_view_inputs(case):
    """`(image, mask or None, strength)` of a `MULTI_VIEW_CASES` case."""
    _, masked, strength = MULTI_VIEW_CASES[case]
    return photo(64, 128), mask_of(64, 128, **MULTI_VIEW_MASK) if masked else None, strength


def our_trajectory(pipe, case, sync_weight, view_batch_size=1):
    """The pipeline's latents after every step: 5 steps (from `strength` on), the first 2 synchronized if
    `sync_weight`."""
    image, mask, strength = multi_view_inputs(case)
    return pipeline_trajectory(
        pipe,
        PROMPT,
        None,
        **PANORAMA,
        num_inference_steps=5,
        sync_weight=sync_weight,
        sync_thres=2,
        view_batch_size=view_batch_size,
        image=image,
        mask_image=mask,
        strength=strength,
        generator=torch.Generator().manual_seed(7),
    )


def reference_trajectory(pipe, case, sync_weight, anchor):
    """The reference loop's latents after every step, as `our_trajectory`."""
    image, mask, strength = multi_view_inputs(case)
    trajectory = []
    reference_image_panorama(
        pipe,
        PROMPT,
        *as_tensors(image, mask),
        strength,
        5,
        PANORAMA["stride"],
        torch.Generator().manual_seed(7),
        sync_weight=sync_weight,
        sync_thres=2,
        anchor=anchor,
        trajectory=trajectory,
    )
    return trajectory


@pytest.mark.parametrize("case", list(MULTI_VIEW_CASES))
def test_multidiffusion_from_an_image_matches_reference_loop(pipe, case):
    """Measured 7.1e-8..1.3e-7 of the largest latent after every step (the pipeline sums the views in float32)."""
    in_channels, masked, strength = MULTI_VIEW_CASES[case]
    pipe = float64_pipeline(pipe, in_channels)
    ours = our_trajectory(pipe, case, 0.0, view_batch_size=3 if strength == 1 else 1)
    assert len(ours) == int(5 * strength)
    assert_trajectories_match(ours, reference_trajectory(pipe, case, 0.0, "center"))


@pytest.mark.parametrize("case", ["img2img", "inpaint_4_channels", "inpaint_9_channels_strength_1"])
def test_synchronized_from_an_image_matches_reference_loop(pipe, case):
    """Synchronized to the default anchor, the image's (view 0) with a mask, the middle view without: measured
    9.2e-8..1.6e-7."""
    in_channels, masked, _ = MULTI_VIEW_CASES[case]
    pipe = float64_pipeline(pipe, in_channels)
    ours = our_trajectory(pipe, case, 20.0, view_batch_size=3 if in_channels == 9 else 1)
    assert_trajectories_match(ours, reference_trajectory(pipe, case, 20.0, "image" if masked else "center"))


@pytest.mark.parametrize("case", ["inpaint_4_channels", "inpaint_9_channels"])
def test_synchronized_comparison_catches_the_wrong_anchor_and_a_1_percent_weight_error(pipe, case):
    """The reference synchronized to the middle view differs by 6e-2..1.4e-1 of the largest latent, and with a 1%
    larger weight by 5.4e-4..1.3e-3: far beyond the tolerance (2e-6)."""
    pipe = float64_pipeline(pipe, MULTI_VIEW_CASES[case][0])
    ours = our_trajectory(pipe, case, 20.0)
    with pytest.raises(AssertionError):
        assert_trajectories_match(ours, reference_trajectory(pipe, case, 20.0, "center"))
    with pytest.raises(AssertionError):
        assert_trajectories_match(ours, reference_trajectory(pipe, case, 20.2, "image"))


# ----------------------------------------------------------------------------------------------------------------
# An all-white mask: nothing kept
# ----------------------------------------------------------------------------------------------------------------


def white_mask(height, width):
    return PIL.Image.new("L", (width, height), 255)


@pytest.mark.parametrize("sync_weight", [0.0, 20.0], ids=["multidiffusion", "synchronized"])
def test_all_white_mask_at_strength_1_is_text_to_image_after_the_image_draw(pipe, sync_weight):
    """
    An all-white mask keeps nothing, and at `strength=1` the start is pure noise; but the inpainting path (a plain
    UNet) draws the image's latent, a latent-shaped posterior sample, from the generator before the noise. So the
    panorama is, bit for bit, the text-to-image one from a generator advanced by that one draw, or the one given
    `latents=` the second draw, and not the one from the same seed. Synchronized too: every view keeps nothing, the
    tie goes to the middle view, text-to-image's anchor.
    """
    pipe.set_perceptual_loss(SmoothPerceptualLoss())
    call = {**PANORAMA, "num_inference_steps": 3, "sync_weight": sync_weight, "sync_thres": 2, "output_type": "latent"}
    inpainted = pipe(
        PROMPT,
        image=photo(64, 128),
        mask_image=white_mask(64, 128),
        strength=1.0,
        generator=torch.Generator().manual_seed(5),
        **call,
    ).images
    advanced = torch.Generator().manual_seed(5)
    torch.randn((1, 4, 8, 16), generator=advanced)  # the image's posterior sample
    state = advanced.get_state()
    noise = torch.randn((1, 4, 8, 16), generator=advanced)
    assert torch.equal(pipe(PROMPT, generator=torch.Generator().set_state(state), **call).images, inpainted)
    assert torch.equal(pipe(PROMPT, latents=noise, **call).images, inpainted)
    same_seed = pipe(PROMPT, generator=torch.Generator().manual_seed(5), **call).images
    assert (same_seed - inpainted).abs().max() > 0.1


# Synchronized, the image-to-image panorama's latents are channels-last (the VAE encoder's layout, kept by
# StableDiffusionImg2ImgPipeline.prepare_latents), the inpainting path's contiguous (`repeat`), and the gradient
# pass rounds differently: measured 1.2e-6..1.9e-6 of the largest latent (3 seeds), 0.0 for MultiDiffusion. A 1%
# guidance error moves them by 3.2e-3..4.9e-3.
WHITE_MASK_TOLERANCE = 2e-5


@pytest.mark.parametrize("sync_weight", [0.0, 20.0], ids=["multidiffusion", "synchronized"])
def test_all_white_mask_below_strength_1_is_image_to_image(pipe, sync_weight):
    """Below `strength=1` the inpainting path draws what image-to-image draws (the image's latent, then the noise)
    and keeps nothing: the image-to-image panorama (bit for bit without synchronization)."""
    pipe.set_perceptual_loss(SmoothPerceptualLoss())
    call = {**PANORAMA, "image": photo(64, 128), "strength": 0.6, "num_inference_steps": 5}
    call.update(sync_weight=sync_weight, sync_thres=2)
    masked = pipeline_trajectory(
        pipe, PROMPT, None, mask_image=white_mask(64, 128), generator=torch.Generator().manual_seed(5), **call
    )
    unmasked = pipeline_trajectory(pipe, PROMPT, None, generator=torch.Generator().manual_seed(5), **call)
    if sync_weight == 0:
        assert all(torch.equal(a, b) for a, b in zip(masked, unmasked))
    assert_trajectories_match(masked, unmasked, tolerance=WHITE_MASK_TOLERANCE)


# ----------------------------------------------------------------------------------------------------------------
# The kept region
# ----------------------------------------------------------------------------------------------------------------

# Black (kept) over the left 48 pixels: latent columns 0..5, whole 8x8 blocks.
KEPT_PIXELS = slice(0, 48)
KEPT_LATENTS = slice(0, 6)


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_kept_latents_are_the_images_posterior_sample(pipe, strength):
    """A plain UNet: after the last step the kept latents are exactly the image's latent, the posterior sample
    drawn first from the call's generator (every image of the prompt, synchronized or not)."""
    pipe.set_perceptual_loss(SmoothPerceptualLoss())
    image = photo(64, 128)
    result = pipe(
        PROMPT,
        **PANORAMA,
        image=image,
        mask_image=mask_of(64, 128, KEPT_PIXELS),
        strength=strength,
        num_inference_steps=5,
        sync_thres=2,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(11),
        output_type="latent",
    ).images
    with torch.no_grad():  # the processor's tensor: the VAE's float32 rounding depends on the memory layout
        posterior = pipe.vae.encode(pipe.image_processor.preprocess(image)).latent_dist
    image_latents = posterior.sample(torch.Generator().manual_seed(11)) * pipe.vae.config.scaling_factor
    for latents in result:
        assert torch.equal(latents[..., KEPT_LATENTS], image_latents[0, ..., KEPT_LATENTS])
    assert (result[..., KEPT_LATENTS.stop :] - image_latents[..., KEPT_LATENTS.stop :]).abs().max() > 0.5


class BlockAverageAutoencoder(ModelMixin, ConfigMixin):
    """
    An autoencoder that reconstructs, where the tiny random AutoencoderKL does not: the latent of each 8x8 pixel
    block is its mean colour (and a zero fourth channel), the decoded block that colour. A posterior of
    AutoencoderKL's kind with a negligible spread (`logvar = -30`, std 3e-7): sampling it draws from the generator as
    AutoencoderKL's does.
    """

    @register_to_config
    def __init__(self, block_out_channels=(8, 8, 8, 8), latent_channels=4, scaling_factor=1.0):
        super().__init__()
        self.factor = 2 ** (len(block_out_channels) - 1)
        self.unit = torch.nn.Parameter(torch.ones(()))  # gives the model a dtype and a device

    def encode(self, images, return_dict=True):
        colours = F.avg_pool2d(images, self.factor) * self.unit
        mean = torch.cat([colours, torch.zeros_like(colours[:, :1])], dim=1)
        output = AutoencoderKLOutput(
            latent_dist=DiagonalGaussianDistribution(torch.cat([mean, torch.full_like(mean, -30.0)], 1))
        )
        return output if return_dict else (output.latent_dist,)

    def decode(self, latents, return_dict=True, generator=None):
        images = F.interpolate(latents[:, :3], scale_factor=self.factor, mode="nearest")
        return DecoderOutput(sample=images) if return_dict else (images,)


def test_kept_region_stays_the_image_up_to_the_vaes_reconstruction(pipe):
    """
    With an autoencoder that reconstructs (block means), the result's kept region differs from the image by no more
    than the autoencoder's own reconstruction `decode(encode(image))` does there: measured 0.1917 at most (the
    stripes' spread within a block), the result 0.1917 + 2.4e-7 (the posterior's spread), while the text-to-image
    panorama's is 1.0 there. The tiny random AutoencoderKL reconstructs nothing (0.95..1.0 at most, a mean of
    0.31..0.35 on the test picture, no better than a text-to-image panorama's 0.95..1.0): a bound from it could not
    fail, so its kept latents are checked instead (`test_kept_latents_are_the_images_posterior_sample`).
    """
    pipe.vae = BlockAverageAutoencoder().eval()
    pipe.set_perceptual_loss(SmoothPerceptualLoss())
    image = photo(64, 128, disc=False)  # smooth: the blocks' means are close to their pixels
    target = np.asarray(image).astype(np.float32) / 255
    with torch.no_grad():
        posterior = pipe.vae.encode(as_tensors(image, None)[0]).latent_dist
        reconstruction = pipe.image_processor.postprocess(pipe.vae.decode(posterior.mode()).sample, output_type="np")
    reconstruction_error = np.abs(reconstruction[0] - target)[:, KEPT_PIXELS].max()
    call = {**PANORAMA, "num_inference_steps": 4, "sync_thres": 2, "output_type": "np"}
    result = pipe(
        PROMPT,
        image=image,
        mask_image=mask_of(64, 128, KEPT_PIXELS),
        generator=torch.Generator().manual_seed(2),
        **call,
    ).images[0]
    text_to_image = pipe(PROMPT, generator=torch.Generator().manual_seed(2), **call).images[0]
    assert 0 < reconstruction_error < 0.25
    # Headroom: the posterior's spread (3e-7 of a latent) reaches the pixels as it is.
    assert np.abs(result - target)[:, KEPT_PIXELS].max() <= reconstruction_error + 1e-5
    assert np.abs(text_to_image - target)[:, KEPT_PIXELS].max() > 2 * reconstruction_error
    assert np.abs(result - target)[:, KEPT_PIXELS.stop :].max() > 2 * reconstruction_error  # generated there


# ----------------------------------------------------------------------------------------------------------------
# The anchor
# ----------------------------------------------------------------------------------------------------------------

# 64x192 pixels: 8x24 latents, views at columns 0, 4, 8, 12 and 16 (8 wide); the middle one is view 2.
WIDE = {"height": 64, "width": 192, "stride": 4}


class AnchorFound(Exception):
    pass


def anchor_of(pipe, **call):
    """The index of the view the first synchronized step anchors (the call stops there)."""
    with mock.patch.object(pipe, "prepare_anchor", side_effect=AnchorFound) as prepare_anchor:
        with pytest.raises(AnchorFound):
            pipe(PROMPT, **WIDE, num_inference_steps=2, generator=torch.Generator().manual_seed(0), **call)
    anchor_view = prepare_anchor.call_args.args[1]
    return pipe.get_views(WIDE["height"], WIDE["width"], stride=WIDE["stride"]).index(anchor_view)


def wide_mask(*kept_columns):
    """A 64x192 mask keeping (black) the given pixel column slices."""
    pixels = np.full((64, 192), 255, dtype=np.uint8)
    for columns in kept_columns:
        pixels[:, columns] = 0
    return PIL.Image.fromarray(pixels)


ANCHORS = {
    # The default with a mask: the view keeping most of the image.
    "keeps_the_left": ({"mask_image": wide_mask(slice(0, 48))}, 0),
    "keeps_the_right": ({"mask_image": wide_mask(slice(144, 192))}, 4),
    "keeps_latent_columns_12_to_17": ({"mask_image": wide_mask(slice(96, 144))}, 3),
    "image_anchor_named": ({"mask_image": wide_mask(slice(144, 192)), "sync_anchor": "image"}, 4),
    # Views 0 and 1 both keep latent columns 4..7: the tie goes to the one nearer the middle.
    "tie_nearest_the_middle": ({"mask_image": wide_mask(slice(32, 64))}, 1),
    "nothing_kept_the_middle": ({"mask_image": white_mask(64, 192)}, 2),
    "center_with_a_mask": ({"mask_image": wide_mask(slice(144, 192)), "sync_anchor": "center"}, 2),
    "index_with_a_mask": ({"mask_image": wide_mask(slice(144, 192)), "sync_anchor": 1}, 1),
    # Without a mask (image-to-image) the default is the middle view; "image" has nothing kept to weigh.
    "img2img_default": ({}, 2),
    "img2img_image_anchor": ({"sync_anchor": "image"}, 2),
    "img2img_index": ({"sync_anchor": 4}, 4),
}


@pytest.mark.parametrize("case", list(ANCHORS))
def test_sync_anchor(pipe, case):
    call, expected = ANCHORS[case]
    assert anchor_of(pipe, image=photo(64, 192), strength=1.0, **call) == expected


def test_text_to_image_anchor_is_the_middle_view_or_an_index(pipe):
    assert anchor_of(pipe) == 2
    assert anchor_of(pipe, sync_anchor=3) == 3
    assert anchor_of(pipe, sync_anchor="center") == 2


def test_image_anchor_sums_the_kept_share_of_soft_masks():
    """`anchor_view_index` weighs `1 - mask` per view: half-kept pixels count half."""
    views = [(0, 8, 0, 8), (0, 8, 4, 12), (0, 8, 8, 16)]
    keep = torch.zeros(1, 1, 8, 16)
    keep[..., 0:4] = 0.5  # view 0 only: 16
    keep[..., 12:14] = 1.0  # view 2 only: 16, plus ...
    keep[..., 14:15] = 0.25  # ... 2
    assert anchor_view_index(views, "image", keep) == 2
    keep[..., 14:15] = 0.0
    keep[..., 4:5] = 0.125  # views 0 and 1 get 1 more: view 0 leads with 17 to view 2's 16
    assert anchor_view_index(views, "image", keep) == 0


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


class ModelRan(Exception):
    pass


def forbid_models(pipe):
    """Every model of `pipe` raises `ModelRan` when it runs (the VAE's encoder and decoder are called through
    `encode`/`decode`, not `forward`)."""

    def fail(*args, **kwargs):
        raise ModelRan("a model ran before the inputs were checked")

    for model in (pipe.unet, pipe.text_encoder, pipe.vae.encoder, pipe.vae.decoder):
        model.register_forward_pre_hook(fail)
    return pipe


def mask_tensor_with(value):
    mask = torch.ones(1, 1, 64, 128)
    mask[..., 0, 0] = value
    return mask


IMAGE = photo(64, 128)
MASK = mask_of(64, 128, slice(0, 48))
BAD_INPUTS = {
    "image_size": ({"image": photo(64, 96)}, "image", "64x96 pixels.*the panorama is 64x128"),
    "image_array_size": ({"image": np.zeros((48, 128, 3), np.float32)}, "image", "48x128 pixels.*64x128"),
    "image_tensor_size": ({"image": torch.zeros(1, 3, 64, 64)}, "image", "64x64 pixels.*64x128"),
    "image_batch": ({"image": torch.zeros(2, 3, 64, 128)}, "image", "batch of 2"),
    "image_path": ({"image": "photo.png"}, "image", "PIL image"),
    "mask_size": ({"image": IMAGE, "mask_image": mask_of(32, 128, slice(0, 48))}, "mask_image", "32x128 pixels"),
    "mask_range": ({"image": IMAGE, "mask_image": mask_tensor_with(1.5)}, "mask_image", r"\[0, 1\]"),
    "mask_black": ({"image": IMAGE, "mask_image": mask_of(64, 128, slice(0, 128))}, "mask_image", "black everywhere"),
    "mask_without_image": ({"mask_image": MASK}, "mask_image", "needs `image`"),
    "strength_without_image": ({"strength": 0.5}, "strength", "needs `image`"),
    "strength_zero": ({"image": IMAGE, "strength": 0.0}, "strength", r"\(0, 1\]"),
    "strength_negative": ({"image": IMAGE, "strength": -0.5}, "strength", r"\(0, 1\]"),
    "strength_above_1": ({"image": IMAGE, "strength": 1.5}, "strength", r"\(0, 1\]"),
    "strength_bool": ({"image": IMAGE, "strength": True}, "strength", r"\(0, 1\]"),
    "strength_string": ({"image": IMAGE, "strength": "0.5"}, "strength", r"\(0, 1\]"),
    "strength_runs_no_step": ({"image": IMAGE, "strength": 0.3}, "strength", "runs no step"),
    "anchor_past_the_views": ({"sync_anchor": 3}, "sync_anchor", r"0\.\.2"),
    "anchor_negative": ({"sync_anchor": -1}, "sync_anchor", r"0\.\.2"),
    "anchor_bool": ({"sync_anchor": True}, "sync_anchor", r"0\.\.2"),
    "anchor_name": ({"image": IMAGE, "mask_image": MASK, "sync_anchor": "left"}, "sync_anchor", "'center', 'image'"),
    "anchor_float": ({"sync_anchor": 1.0}, "sync_anchor", r"0\.\.2"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_image_input_is_one_line_naming_the_argument_before_any_model_runs(pipe, case):
    call, argument, detail = BAD_INPUTS[case]
    forbid_models(pipe)
    with pytest.raises(ValueError) as error:
        pipe(PROMPT, **PANORAMA, num_inference_steps=3, **call)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"`{argument}`"), message
    assert re.search(detail, message), message


@pytest.mark.parametrize("call", [{"image": IMAGE}, {}], ids=["image_without_mask", "no_image"])
def test_an_inpainting_unet_needs_image_and_mask(pipe, call):
    pipe = forbid_models(build(SyncDiffusionPipeline, components_of(pipe, 9)))
    with pytest.raises(ValueError) as error:
        pipe(PROMPT, **PANORAMA, num_inference_steps=3, **call)
    message = str(error.value)
    assert "\n" not in message and "`mask_image`" in message and "9 input channels" in message, message


def test_an_all_white_mask_logs_a_warning_and_runs(pipe, caplog):
    forbid_models(pipe)
    with caplog.at_level(logging.WARNING), pytest.raises(ModelRan):
        pipe(PROMPT, **PANORAMA, num_inference_steps=3, image=IMAGE, mask_image=white_mask(64, 128))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any(message.startswith("`mask_image` is white everywhere") for message in warnings), warnings
