# Copyright 2026 The syncdiffusion authors. Licensed under the Apache License, Version 2.0.
#
# SyncDiffusion: Coherent Montage via Synchronized Joint Diffusions
# Yuseung Lee, Kunho Kim, Hyunjin Kim, Minhyuk Sung. NeurIPS 2023. https://huggingface.co/papers/2306.05178
#
# A diffusers custom pipeline. Load it with
#     DiffusionPipeline.from_pretrained(model, custom_pipeline="pipeline_syncdiffusion.py", trust_remote_code=True)
# It imports only the standard library, torch, diffusers and transformers; lpips is imported on first use.
"""SyncDiffusionPipeline: MultiDiffusion panoramas whose windows are synchronized by an LPIPS gradient."""

import copy
import inspect
import json
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.loaders import (
    FromSingleFileMixin,
    IPAdapterMixin,
    StableDiffusionLoraLoaderMixin,
    TextualInversionLoaderMixin,
)
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, StableDiffusionMixin
from diffusers.pipelines.stable_diffusion import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionPipelineOutput,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import (
    USE_PEFT_BACKEND,
    deprecate,
    logging,
    replace_example_docstring,
    scale_lora_layers,
    unscale_lora_layers,
)
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection


logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DDIMScheduler, DiffusionPipeline

        >>> model_ckpt = "stabilityai/stable-diffusion-2-base"
        >>> pipe = DiffusionPipeline.from_pretrained(
        ...     model_ckpt,
        ...     custom_pipeline="pipeline_syncdiffusion.py",  # a file, a folder or a Hub repo id
        ...     trust_remote_code=True,
        ...     torch_dtype=torch.float16,
        ... )
        >>> pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        >>> pipe = pipe.to("cuda")

        >>> prompt = "a photo of a mountain range at twilight"
        >>> image = pipe(prompt, height=512, width=2048, sync_weight=20.0).images[0]
        ```
"""

# ----------------------------------------------------------------------------------------------------------------------
# The panorama core. It knows nothing of UNets, transformers or text encoders, and every syncdiffusion pipeline file
# holds it verbatim, with the core methods of its class: `# Copied from pipeline_syncdiffusion.<name>`, checked by
# `python -m syncdiffusion_utils.check_copies`.
# ----------------------------------------------------------------------------------------------------------------------

SYNC_MODES = ("exact", "fast")

VARIANCE_PRESERVING = "variance-preserving"
SIGMA_SCALED = "sigma-scaled"
FLOW_MATCHING = "flow-matching"
# Scheduler families: how a scheduler's noisy latent `z` relates to the clean one `x0`, so how the clean latent is
# predicted and on which latent the synchronization step is taken; the schedulers of each family whose clean-latent
# prediction is tested against their own.
SCHEDULER_FAMILIES = {
    # z = alpha x0 + sigma eps with alpha**2 + sigma**2 = 1; the model sees z
    VARIANCE_PRESERVING: (
        "DDIMScheduler",
        "DDPMScheduler",
        "PNDMScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
    ),
    # z = x0 + sigma eps; the model sees the variance-preserving z / sqrt(sigma**2 + 1)
    SIGMA_SCALED: (
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "LMSDiscreteScheduler",
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
    ),
    # z = (1 - sigma) x0 + sigma eps; the model sees z and predicts the velocity v = eps - x0
    FLOW_MATCHING: ("FlowMatchEulerDiscreteScheduler",),
}


def scheduler_family(scheduler) -> str | None:
    """The family of `scheduler` (a class of `SCHEDULER_FAMILIES`, or a subclass), None if it is of none of them.

    A variance-preserving scheduler set to flow sigmas (`use_flow_sigmas`, `prediction_type="flow_prediction"`) is a
    flow-matching one.
    """
    config = scheduler.config
    if config.get("use_flow_sigmas", False) or config.get("prediction_type") == "flow_prediction":
        return FLOW_MATCHING
    names = {cls.__name__ for cls in type(scheduler).__mro__}
    return next((family for family, members in SCHEDULER_FAMILIES.items() if names & set(members)), None)


@dataclass(frozen=True)
class SyncSettings:
    """The synchronization of one call: the `sync_*` arguments of `__call__`, resolved."""

    weight: float = 20.0  # w: the step size of the gradient descent; 0 turns synchronization off
    decay_rate: float = 0.95  # the weight at step i is weight * decay_rate**i
    freq: int = 1  # synchronize every freq-th step ...
    thres: int = 5  # ... of the first thres steps
    through_denoiser: bool = True  # exact: differentiate through the denoiser; False: its prediction is held constant
    reuse_noise: bool = False  # the denoising step reuses the prediction made before the update
    decoder: Any = None  # the decoder of the compared images; None: the pipeline's VAE
    lpips_size: int | None = None
    decode_downsample: int = 1
    checkpointing: bool = False
    gradient_batch_size: int = 1  # views per gradient pass

    @classmethod
    def from_arguments(cls, mode="exact", gradient=None, reuse_noise=None, **settings):
        """`sync_mode="fast"` means an x0 gradient and a reused prediction, unless those are given."""
        fast = mode == "fast"
        through_denoiser = not fast if gradient is None else gradient != "x0"
        return cls(
            through_denoiser=through_denoiser, reuse_noise=fast if reuse_noise is None else reuse_noise, **settings
        )

    @property
    def active(self) -> bool:
        return self.weight > 0 and self.thres > 0

    def weight_at(self, step: int) -> float | None:
        """The weight of denoising step `step`, or None where that step is not synchronized."""
        if not self.active or step >= self.thres or (step + 1) % self.freq != 0:
            return None
        return self.weight * self.decay_rate**step


def view_starts(size: int, window: int, stride: int, circular: bool = False) -> list[int]:
    """Start offsets of the views along one axis of `size` latent pixels.

    If the stride does not divide the span, one more view is added flush with the far edge, so that every latent pixel
    is denoised. Circular views start every `stride` pixels all the way round; the last ones wrap past the edge.
    """
    if size <= window:
        return [0]
    if circular:
        return list(range(0, size, stride))
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def get_views(height: int, width: int, window: int, stride: int, circular: bool = False) -> list[tuple]:
    """Windows of a `height x width` latent, row-major, as `(h_start, h_end, w_start, w_end)` in latent pixels.

    Views wrap around the right edge with `circular` (then `w_end` may exceed `width`).
    """
    rows = view_starts(height, window, stride)
    columns = view_starts(width, window, stride, circular)
    window_h, window_w = min(window, height), min(window, width)
    return [(h, h + window_h, w, w + window_w) for h in rows for w in columns]


def view_columns(view: tuple, width: int, device) -> torch.Tensor:
    """Column indices of a view, wrapped around the panorama for circular views."""
    return torch.arange(view[2], view[3], device=device) % width


def crop_views(latents: torch.Tensor, views: list) -> torch.Tensor:
    """The crops of `latents` under `views`, stacked view-major: `(len(views) * batch, channels, h, w)`."""
    width = latents.shape[-1]
    crops = []
    for view in views:
        h_start, h_end, w_start, w_end = view
        if w_end <= width:
            crops.append(latents[:, :, h_start:h_end, w_start:w_end])
        else:
            crops.append(latents[:, :, h_start:h_end].index_select(3, view_columns(view, width, latents.device)))
    return torch.cat(crops)


def add_views(value: torch.Tensor, count: torch.Tensor, view_latents: torch.Tensor, views: list, weights=None):
    """
    Accumulate view-major `view_latents` into the panorama sums `value` and their counts `count`; with `weights` (one
    `(1, 1, h, w)` crop per view) each view adds `weight * latents` to `value` and `weight` to `count`.
    """
    width = value.shape[-1]
    for k, (crop, view) in enumerate(zip(view_latents.chunk(len(views)), views)):
        h_start, h_end, w_start, w_end = view
        weight = None if weights is None else weights[k]
        if weight is not None:
            crop, ones = crop * weight, weight.expand_as(crop)
        if w_end <= width:
            value[:, :, h_start:h_end, w_start:w_end] += crop
            count[:, :, h_start:h_end, w_start:w_end] += 1 if weight is None else ones
        else:
            columns = view_columns(view, width, value.device)
            ones = torch.ones_like(crop, dtype=count.dtype) if weight is None else ones.to(count.dtype)
            value[:, :, h_start:h_end].index_add_(3, columns, crop.to(value.dtype))
            count[:, :, h_start:h_end].index_add_(3, columns, ones)


def balanced_batch_size(count: int, limit) -> int:
    """The batch size that splits `count` items into the fewest batches of at most `limit`, as even as can be."""
    limit = int(min(max(limit, 1), count))
    batches = -(-count // limit)
    return -(-count // batches)


class PanoramaNoise:
    """
    The noise a stochastic scheduler (Euler ancestral, DDIM with `eta > 0`, DDPM, ...) injects at one evaluation,
    drawn once for the whole panorama latent; each view batch's `scheduler.step` gets its views' crop of it.

    Drawn per view batch, as the deprecated panorama pipeline does, the views' noises are independent and their mean
    gives a latent pixel covered by k views 1/k of the scheduler's variance. The scheduler draws through its module's
    `randn_tensor`, which `crop` stands in for during one `step` (so two pipelines sharing a scheduler class must not
    step at once from two threads); with one view the numbers are those the scheduler would draw.
    """

    def __init__(self, scheduler, shape):
        self.module = sys.modules[type(scheduler).step.__module__]
        self.shape = tuple(shape)
        self.noise = None

    def new_evaluation(self):
        self.noise = None

    @contextmanager
    def crop(self, views: list):
        draw = getattr(self.module, "randn_tensor", None)
        if draw is None:  # a scheduler that draws no noise this way
            yield
            return

        def view_noise(shape, generator=None, device=None, dtype=None, layout=None):
            if self.noise is None:
                self.noise = draw(self.shape, generator=generator, device=device, dtype=dtype, layout=layout)
            noise = crop_views(self.noise, views)
            if tuple(noise.shape) != tuple(shape):
                raise RuntimeError(f"the scheduler drew noise of shape {tuple(shape)}, not its views' {noise.shape}")
            return noise.to(device=device, dtype=dtype)

        self.module.randn_tensor = view_noise
        try:
            yield
        finally:
            self.module.randn_tensor = draw


def image_size(image) -> tuple:
    """`(height, width)` in pixels of an image argument: a PIL image, a `(height, width[, channels])` array or a
    `([batch,] channels, height, width)` tensor."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray):
        return tuple(image.shape[-3:-1] if image.ndim >= 3 and image.shape[-1] in (1, 3, 4) else image.shape[-2:])
    return tuple(image.shape[-2:])


def anchor_view_index(views: list, sync_anchor, keep=None) -> int:
    """
    The index of the anchor view: `"center"` the middle view (the paper's), `"image"` the view that keeps most of
    the image (the largest sum of `keep = 1 - mask` over its latent pixels; ties go to the view nearest the middle),
    or a view index.
    """
    center = len(views) // 2
    if sync_anchor == "center" or (sync_anchor == "image" and keep is None):
        return center
    if sync_anchor == "image":
        kept = [float(crop_views(keep, [view]).sum()) for view in views]
        return max(range(len(views)), key=lambda k: (kept[k], -abs(k - center)))
    return sync_anchor


# MultiDiffusion's bootstrapping (`region_based.py`): the first 20 of 50 steps by default.
REGION_BOOTSTRAP_FRACTION = 0.4


def region_mask_tensor(mask, index: int) -> torch.Tensor:
    """`region_masks[index]` as a float32 `(height, width)` tensor in [0, 1]: a PIL image (white = 1), an array or a
    tensor (values in [0, 1]), with any leading dimensions of size 1."""
    name = f"`region_masks[{index}]`"
    if isinstance(mask, PIL.Image.Image):
        mask = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    elif isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask)
    elif not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} has to be a PIL image, a numpy array or a torch tensor, but is {type(mask)}.")
    while mask.ndim > 2 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"{name} has to be one `(height, width)` mask, but has shape {tuple(mask.shape)}.")
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise ValueError(f"{name} has to hold floats in [0, 1] (or booleans), but has dtype {mask.dtype}.")
    mask = mask.detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError(
            f"{name} has to hold values in [0, 1], but they range over [{mask.min().item():g}, {mask.max().item():g}]."
        )
    return mask


def region_weights(latent_masks: torch.Tensor) -> torch.Tensor:
    """
    Every prompt's weight over the panorama latent, `(1 + regions, 1, 1, height, width)`, from the regions'
    `(regions, height, width)` masks: the background first, weighted `max(1 - sum of the region masks, 0)` as in
    MultiDiffusion's `region_based.py`, so that a region's prompt alone shapes the inside of a hard mask.
    """
    background = (1 - latent_masks.sum(0, keepdim=True)).clamp_min(0)
    return torch.cat([background, latent_masks])[:, None, None]


@dataclass
class PanoramaRegions:
    """Region prompts: their conditioning, each prompt's weight map (background first) and the bootstrapping."""

    conditionings: list  # one per region prompt; the background's is the call's
    weights: torch.Tensor  # (prompts, 1, 1, height, width) float32, background first
    view_prompts: dict  # view -> the prompts whose weight is nonzero in it
    bootstrap_steps: int
    backgrounds: torch.Tensor | None = None  # (colours, channels, h, w) latents of constant-colour view images
    background_choice: torch.Tensor | None = None  # (bootstrap_steps, views, prompts, batch) background indices
    view_index: dict | None = None
    initial_noise: torch.Tensor | None = None  # the starting latents, the noise bootstrapped backgrounds get


@dataclass
class PanoramaState:
    """The views of one call and what the denoising loop keeps between its steps."""

    views: list
    view_batches: list
    scheduler_states: list  # one per view batch: multistep schedulers keep a per-sample history
    anchor_view: tuple
    anchor_batch: int
    value: torch.Tensor  # the float32 sums of the denoised views (a pixel can be the sum of dozens)
    count: torch.Tensor
    noise: PanoramaNoise
    step: int = -1  # the denoising step; second-order schedulers evaluate the model twice per step
    regions: PanoramaRegions | None = None


def loss_scale(image_grad: torch.Tensor, dtypes) -> torch.Tensor:
    """
    Per view, the power of two that brings the largest image gradient to 2**6 when a backward pass runs in float16
    (any of `dtypes`: the decoder's and the denoiser's), else 1.

    In float16, LPIPS gradients (~1e-6 per pixel at 512x512) fall below its smallest normal number (6e-5) on their
    way back; as in mixed-precision training they are scaled first. 2**6 leaves a factor of 1000 of headroom below
    float16's maximum for their growth through the decoder and the denoiser.
    """
    if torch.float16 not in dtypes:
        return torch.ones((), device=image_grad.device)
    peak = image_grad.abs().flatten(1).amax(1).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.exp2(torch.floor(torch.log2(2.0**6 / peak))).view(-1, 1, 1, 1)


def unscale_gradient(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 gradient `grad / scale`; a clear error rather than a NaN panorama if float16 overflowed."""
    grad = grad.float() / scale
    if scale.ndim and not torch.isfinite(grad).all():
        raise FloatingPointError(
            "the synchronization gradient overflowed in float16; run the VAE in float32"
            " (`pipe.vae.to(torch.float32)`) or the pipeline in bfloat16."
        )
    return grad


def perceptual_gradient(clean_latents, anchor_images, decode, distance, backward_dtypes):
    """
    `(d L / d x0 * scale, scale)` with `L = sum_v distance(decode(x0_v), anchor_v)`, for a stack of clean latents.

    The distance runs and differentiates in float32; `scale` is the `loss_scale` of the backward through `decode`
    and the denoiser. Each view's distance depends only on its own latent, so one backward gives every view's gradient.
    """
    clean_latents = clean_latents.detach().requires_grad_(True)
    images = decode(clean_latents)
    compared = images.detach().float().requires_grad_(True)
    (image_grad,) = torch.autograd.grad(distance(compared, anchor_images).sum(), compared)
    scale = loss_scale(image_grad, (images.dtype, *backward_dtypes))
    (grad,) = torch.autograd.grad(images, clean_latents, (image_grad * scale).to(images.dtype))
    return grad, scale


def synchronization_update(model_input, anchor_images, weight, predict_clean, decode, distance, before_backward=None):
    """
    SyncDiffusion's update of a stack of views: `u <- u - w * d distance(decode(x0(u)), anchor) / d u`.

    `model_input` is the denoiser's input `u`; `predict_clean(u) -> (x0, model_output)` runs the denoiser, with or
    without its gradient; `before_backward()` runs before the backward through it (model CPU offloading moves the
    denoiser away while the decoder runs). Returns the float32 updated input and the model output made before.
    """
    model_input = model_input.detach().requires_grad_(True)
    with torch.enable_grad():
        clean_latents, model_output = predict_clean(model_input)
        clean_grad, scale = perceptual_gradient(clean_latents, anchor_images, decode, distance, (clean_latents.dtype,))
        if before_backward is not None:
            before_backward()
        (grad,) = torch.autograd.grad(clean_latents, model_input, clean_grad.to(clean_latents.dtype))
    return model_input.detach().float() - weight * unscale_gradient(grad, scale), model_output.detach()


def onload(model):
    """Move `model` back to the execution device if model CPU offloading took it away (as a forward call would)."""
    hook = getattr(model, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(model)


# torchvision's VGG-16 weights, the backbone of LPIPS-VGG, downloaded into `torch.hub.get_dir()/checkpoints` on first use.
_VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
_VGG16_FILE = _VGG16_URL.rsplit("/", 1)[-1]


def _missing_vgg_weights_message(error) -> str:
    """One line: LPIPS-VGG's backbone could not be downloaded, and the two ways out."""
    cache = os.path.join(torch.hub.get_dir(), "checkpoints", _VGG16_FILE)
    reason = " ".join(str(getattr(error, "reason", None) or error).split())
    return (
        f"LPIPS-VGG needs torchvision's VGG-16 weights and could not download them ({reason}): put {_VGG16_FILE}"
        f" (from {_VGG16_URL}) at {cache}, or pass a local copy with"
        " `pipe.set_perceptual_loss(vgg_weights=PATH)` (another loss: `pipe.set_perceptual_loss(module)`)."
    )


class SyncDiffusionPipeline(
    DiffusionPipeline,
    StableDiffusionMixin,
    TextualInversionLoaderMixin,
    StableDiffusionLoraLoaderMixin,
    IPAdapterMixin,
    FromSingleFileMixin,
):
    r"""
    Pipeline for coherent panoramas with SyncDiffusion ([paper](https://huggingface.co/papers/2306.05178)).

    Like MultiDiffusion ([`StableDiffusionPanoramaPipeline`]), it denoises overlapping windows ("views") of a wide
    latent and averages them. At the first `sync_thres` steps it also moves every view's latent down the gradient
    of the LPIPS distance between that view's predicted clean image and the anchor view's, so that all views agree
    on one scene. With `sync_weight=0` it is MultiDiffusion and gives the panorama pipeline's images.

    A drop-in replacement for the deprecated [`StableDiffusionPanoramaPipeline`]: the same components and the same
    `__call__` arguments, with its bugs fixed (`guidance_rescale` is applied, circular panoramas may have several
    rows, windows follow the UNet's `sample_size` and the VAE's scale factor, every latent pixel is denoised).

    This model inherits from [`DiffusionPipeline`]. Check the superclass documentation for the generic methods
    implemented for all pipelines (downloading, saving, running on a particular device, etc.). It also inherits
    [`~loaders.TextualInversionLoaderMixin.load_textual_inversion`],
    [`~loaders.StableDiffusionLoraLoaderMixin.load_lora_weights`] and [`~loaders.IPAdapterMixin.load_ip_adapter`].

    Args:
        vae ([`AutoencoderKL`]):
            Variational Auto-Encoder (VAE) model to encode and decode images to and from latent representations.
        text_encoder ([`~transformers.CLIPTextModel`]):
            Frozen text-encoder.
        tokenizer ([`~transformers.CLIPTokenizer`]):
            A `CLIPTokenizer` to tokenize text.
        unet ([`UNet2DConditionModel`]):
            A `UNet2DConditionModel` to denoise the encoded image latents. Its `sample_size` is the view size.
        scheduler ([`SchedulerMixin`]):
            A scheduler with `alphas_cumprod` (DDIM, the paper's) or `sigmas` (Euler, DPM-Solver, UniPC, ...).
        safety_checker ([`StableDiffusionSafetyChecker`]):
            Classification module that estimates whether generated images could be considered offensive or harmful.
        feature_extractor ([`~transformers.CLIPImageProcessor`]):
            A `CLIPImageProcessor` to extract features from generated images; used as inputs to the `safety_checker`.
        image_encoder ([`~transformers.CLIPVisionModelWithProjection`], *optional*):
            Image encoder for IP-Adapter.
        requires_safety_checker (`bool`, defaults to `True`):
            Whether a missing safety checker is warned about.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    # The scheduler families this pipeline supports, and the name of the exact synchronization gradient.
    _scheduler_families = (VARIANCE_PRESERVING, SIGMA_SCALED)
    sync_denoiser_gradient = "unet"
    # A saved pipeline carries its source as `{_source_name}.py`; `custom_pipeline="syncdiffusion"` names it.
    _source_name = "syncdiffusion"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker,
        feature_extractor: CLIPImageProcessor,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        requires_safety_checker: bool = True,
    ):
        super().__init__()

        if safety_checker is None and requires_safety_checker:
            logger.warning(
                f"You have disabled the safety checker for {self.__class__} by passing `safety_checker=None`. Ensure"
                " that you abide to the conditions of the Stable Diffusion license and do not expose unfiltered"
                " results in services or applications open to the public."
            )
        if safety_checker is not None and feature_extractor is None:
            raise ValueError(
                f"Make sure to define a feature extractor when loading {self.__class__} if you want to use the safety"
                " checker. If you do not want to use the safety checker, you can pass `'safety_checker=None'` instead."
            )

        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # Soft masks are kept (StableDiffusionInpaintPipeline binarizes them; a binary mask is the same either way).
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=False, do_convert_grayscale=True
        )
        self.register_to_config(requires_safety_checker=requires_safety_checker)
        # LPIPS is not a saved component: it is built on first synchronized call (see `perceptual_loss`).
        self._perceptual_loss = None

    # A saved pipeline carries its own code: `save_pretrained` ends with `save_config`, before any upload.
    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """
        Write `model_index.json` and, next to it, this pipeline's source file as `{_source_name}.py`.

        The config's `_class_name` is `[_source_name, class name]`, so the saved folder or pushed repo loads itself:
        `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` runs the saved file.
        """
        os.makedirs(save_directory, exist_ok=True)
        source = os.path.join(save_directory, f"{self._source_name}.py")
        shutil.copyfile(inspect.getsourcefile(type(self)), source)
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    def to_json_string(self) -> str:
        """The config as JSON, with `_class_name` naming the saved source file and the class in it."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = [self._source_name, type(self).__name__]
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike, **kwargs):
        """
        A saved config. Loaded through this class itself (`SyncDiffusionPipeline.from_pretrained`), a `_class_name`
        `[file, this class]` becomes the plain class name: the installed class is used, not the file saved with it
        (which diffusers would run only with `trust_remote_code=True`).
        """
        config = super()._dict_from_json_file(json_file, **kwargs)  # diffusers >= 0.36 passes `dduf_entries`
        class_name = config.get("_class_name")
        if isinstance(class_name, list) and class_name[-1] in {base.__name__ for base in cls.__mro__}:
            config["_class_name"] = class_name[-1]
        return config

    # Prompt, image and latent preparation are Stable Diffusion's own, shared rather than copied.
    encode_image = StableDiffusionPipeline.encode_image
    prepare_ip_adapter_image_embeds = StableDiffusionPipeline.prepare_ip_adapter_image_embeds
    run_safety_checker = StableDiffusionPipeline.run_safety_checker
    prepare_extra_step_kwargs = StableDiffusionPipeline.prepare_extra_step_kwargs
    prepare_latents = StableDiffusionPipeline.prepare_latents
    get_timesteps = StableDiffusionImg2ImgPipeline.get_timesteps
    prepare_img2img_latents = StableDiffusionImg2ImgPipeline.prepare_latents
    prepare_inpaint_latents = StableDiffusionInpaintPipeline.prepare_latents
    _encode_vae_image = StableDiffusionInpaintPipeline._encode_vae_image
    get_guidance_scale_embedding = StableDiffusionPipeline.get_guidance_scale_embedding

    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ):
        """
        Stable Diffusion's `encode_prompt`, returning `(prompt_embeds, negative_prompt_embeds)`.

        transformers 5 flattened `CLIPTextModel` (no `.text_model`), which breaks diffusers' `clip_skip` branch; the
        skipped-layer embeddings are then computed here and handed over as `prompt_embeds`.
        """
        if clip_skip is not None and prompt_embeds is None and not hasattr(self.text_encoder, "text_model"):
            if lora_scale is not None and USE_PEFT_BACKEND:
                scale_lora_layers(self.text_encoder, lora_scale)
            prompt_embeds = self._clip_skip_embeds(prompt, device, clip_skip)
            if lora_scale is not None and USE_PEFT_BACKEND:
                unscale_lora_layers(self.text_encoder, lora_scale)
        return StableDiffusionPipeline.encode_prompt(
            self,
            prompt,
            device,
            num_images_per_prompt,
            do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )

    def _clip_skip_embeds(self, prompt, device, clip_skip):
        """Text embeddings from `clip_skip` layers before the last, through the final layer norm."""
        if isinstance(self, TextualInversionLoaderMixin):
            prompt = self.maybe_convert_prompt(prompt, self.tokenizer)
        text_inputs = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        attention_mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            attention_mask = text_inputs.attention_mask.to(device)
        output = self.text_encoder(
            text_inputs.input_ids.to(device), attention_mask=attention_mask, output_hidden_states=True
        )
        return self.text_encoder.final_layer_norm(output.hidden_states[-(clip_skip + 1)])

    # ------------------------------------------------------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------------------------------------------------------

    def check_inputs(
        self,
        prompt,
        height,
        width,
        callback_steps,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
        callback_on_step_end_tensor_inputs=None,
        num_inference_steps=50,
        num_images_per_prompt=1,
        latents=None,
        guidance_rescale=0.0,
        **panorama_inputs,
    ):
        """
        Raise a `ValueError` naming the argument, its value and what is allowed, before any model runs: the prompt,
        IP-Adapter and latents here, the panorama's, the synchronization's and the scheduler in
        `check_panorama_inputs`.
        """
        self.check_panorama_inputs(
            height,
            width,
            size_multiple=self.vae_scale_factor,
            window=self.unet.config.sample_size,
            num_inference_steps=num_inference_steps,
            num_images_per_prompt=num_images_per_prompt,
            callback_steps=callback_steps,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            **panorama_inputs,
        )
        self.check_prompt_inputs(
            prompt,
            height,
            width,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            ip_adapter_image,
            ip_adapter_image_embeds,
            num_images_per_prompt,
            latents,
            guidance_rescale,
        )

    def check_prompt_inputs(
        self,
        prompt,
        height,
        width,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
        num_images_per_prompt=1,
        latents=None,
        guidance_rescale=0.0,
    ):
        """The prompt, IP-Adapter, guidance rescale and latents arguments of a Stable Diffusion UNet."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`; both are undefined.")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"`prompt` has to be of type `str` or `list`, but is {type(prompt)}.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    "`prompt_embeds` and `negative_prompt_embeds` have to have the same shape, but have"
                    f" {tuple(prompt_embeds.shape)} and {tuple(negative_prompt_embeds.shape)}."
                )
        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise ValueError("Pass either `ip_adapter_image` or `ip_adapter_image_embeds`, not both.")
        if ip_adapter_image_embeds is not None:
            if not isinstance(ip_adapter_image_embeds, list):
                raise ValueError(
                    f"`ip_adapter_image_embeds` has to be a list of tensors, but is {type(ip_adapter_image_embeds)}."
                )
            if ip_adapter_image_embeds[0].ndim not in (3, 4):
                raise ValueError(
                    "`ip_adapter_image_embeds` has to be a list of 3D or 4D tensors, but holds"
                    f" {ip_adapter_image_embeds[0].ndim}D ones."
                )
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"`guidance_rescale` has to be in [0, 1], but is {guidance_rescale!r}.")
        if latents is not None:
            batch_size = (
                1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
            )
            factor = self.vae_scale_factor
            shape = (
                batch_size * num_images_per_prompt,
                self.vae.config.latent_channels,
                height // factor,
                width // factor,
            )
            if tuple(latents.shape) != shape:
                raise ValueError(
                    f"`latents` has to have shape {shape} (batch, channels, height / {factor}, width / {factor}),"
                    f" but has shape {tuple(latents.shape)}."
                )

    # ------------------------------------------------------------------------------------------------------------------
    # The per-model seam: views in pixels, memory, the denoiser, the decoder of the compared images
    # ------------------------------------------------------------------------------------------------------------------

    def get_views(
        self,
        panorama_height: int,
        panorama_width: int,
        window_size: int | None = None,
        stride: int = 8,
        circular_padding: bool = False,
    ) -> list[tuple[int, int, int, int]]:
        """
        Windows of the panorama latent, row-major, as `(h_start, h_end, w_start, w_end)` in latent pixels.

        Args:
            panorama_height (`int`): Panorama height in image pixels.
            panorama_width (`int`): Panorama width in image pixels.
            window_size (`int`, *optional*): View side in latent pixels; defaults to `unet.config.sample_size`.
            stride (`int`, defaults to 8): Distance between neighbouring views in latent pixels.
            circular_padding (`bool`, defaults to `False`):
                Whether views wrap around the right edge (then `w_end` may exceed the latent width).

        Returns:
            `list[tuple[int, int, int, int]]`. If the stride does not divide the span, one more row (column) of views
            is added flush with the bottom (right) edge, so that every latent pixel is denoised.
        """
        window = self.unet.config.sample_size if window_size is None else window_size
        factor = self.vae_scale_factor
        return get_views(panorama_height // factor, panorama_width // factor, window, stride, circular_padding)

    # Tensor elements per pixel, per sample and per channel of the model's first block, measured on the Stable
    # Diffusion 2 base architecture (bytes of the tensors autograd saves in one pass, linear in the view's pixels from
    # 8x8 to 32x32 latents): the UNet saves 355 * C per latent pixel per sample, the VAE decoder 45 * C per image
    # pixel, LPIPS-VGG 610 per compared pixel (in float32). A forward without gradient holds a small part of what a
    # backward needs; 48 * C per latent pixel per sample bounds it (the feed-forward layers' 8 * C channels and the
    # attention projections at the first block's resolution).
    UNET_FORWARD_ELEMENTS = 48
    UNET_SAVED_ELEMENTS = 355
    DECODER_SAVED_ELEMENTS = 45
    LPIPS_SAVED_ELEMENTS = 610
    # What activation checkpointing keeps of a model's saved tensors (block inputs, plus one block at a time).
    CHECKPOINTED_FRACTION = 0.2
    # Share of the free device memory the views of one batch may take.
    AUTO_MEMORY_FRACTION = 0.8
    # Without a memory reading (CPU, MPS): views per denoising batch, and per gradient pass.
    AUTO_HOST_VIEW_BATCH_SIZE = 16

    def view_memory(self, num_images, dtype, sync: SyncSettings | None = None) -> int:
        """
        Estimated bytes one view needs: its guided UNet forward, or with `sync` its whole gradient pass (UNet forward
        and backward, decoder forward and backward, LPIPS in float32).
        """
        window = self.unet.config.sample_size
        samples = num_images * (2 if self.do_classifier_free_guidance else 1)
        unet_units = window * window * samples * self.unet.config.block_out_channels[0]
        element = torch.finfo(dtype).bits // 8
        if sync is None:
            return self.UNET_FORWARD_ELEMENTS * unet_units * element

        kept = self.CHECKPOINTED_FRACTION if sync.checkpointing else 1.0
        unet = self.UNET_SAVED_ELEMENTS * unet_units * element * kept if sync.through_denoiser else 0
        decoder = sync.decoder if sync.decoder is not None else self.vae
        channels = getattr(decoder.config, "block_out_channels", None) or decoder.config.decoder_block_out_channels
        pixels = (window * self.vae_scale_factor // sync.decode_downsample) ** 2
        decode = self.DECODER_SAVED_ELEMENTS * pixels * num_images * min(channels) * element * kept
        compared = pixels if sync.lpips_size is None else min(pixels, sync.lpips_size**2)
        lpips = self.LPIPS_SAVED_ELEMENTS * compared * num_images * 4
        return int(unet + decode + lpips)

    @property
    def denoiser(self):
        """The model that predicts the noise: the UNet."""
        return self.unet

    @property
    def denoising_models(self) -> tuple:
        """Every model the noise prediction runs through (and the gradient pass differentiates)."""
        return (self.unet,)

    @property
    def inpainting_channels(self) -> bool:
        """Whether the UNet is an inpainting one: 9 input channels, the latents, the mask and the masked image's."""
        return self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1

    def predict_noise(self, model_input: torch.Tensor, t, conditioning: dict, views: list) -> torch.Tensor:
        """
        Guided noise prediction for a stack of `views` (view-major, `batch` images each).

        `model_input` is already scaled by `scheduler.scale_model_input`. With guidance the UNet sees every latent
        twice, interleaved `[uncond, cond]`, as the panorama pipeline does. An inpainting UNet also sees the views'
        crops of the mask and the masked image's latent.
        """
        num_views = len(views)
        if conditioning.get("inpainting_input") is not None:
            mask, masked_image_latents = conditioning["inpainting_input"]
            extra = [crop_views(mask, views), crop_views(masked_image_latents, views)]
            model_input = torch.cat([model_input, *[e.to(model_input.dtype) for e in extra]], dim=1)
        added_cond_kwargs = None
        if conditioning["image_embeds"] is not None:
            image_embeds = [e.repeat(num_views, *[1] * (e.ndim - 1)) for e in conditioning["image_embeds"]]
            added_cond_kwargs = {"image_embeds": image_embeds}
        timestep_cond = conditioning["timestep_cond"]
        if timestep_cond is not None:
            timestep_cond = timestep_cond.repeat(num_views, 1)
        noise_pred = self.unet(
            model_input.repeat_interleave(2, dim=0) if self.do_classifier_free_guidance else model_input,
            t,
            encoder_hidden_states=conditioning["encoder_hidden_states"].repeat(num_views, 1, 1),
            timestep_cond=timestep_cond,
            cross_attention_kwargs=self.cross_attention_kwargs,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )[0]
        return self.combine_guidance(noise_pred)

    def combine_guidance(self, noise_pred: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance of interleaved `[uncond, cond]` predictions (and `guidance_rescale`)."""
        if not self.do_classifier_free_guidance:
            return noise_pred
        noise_pred_uncond, noise_pred_text = noise_pred[::2], noise_pred[1::2]
        guided = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
        if self.guidance_rescale > 0.0:
            # Section 3.4 of https://huggingface.co/papers/2305.08891
            guided = rescale_noise_cfg(guided, noise_pred_text, guidance_rescale=self.guidance_rescale)
        return guided

    def decode_for_sync(self, clean_latents: torch.Tensor, decoder=None, downsample: int = 1) -> torch.Tensor:
        """
        `D(x) = clamp(decoder.decode(x / scaling_factor) / 2 + 0.5, 0, 1)`: the image the loss compares.

        With `downsample > 1` the clean latent is average-pooled by that factor first, so the decoder renders a
        smaller image (`downsample**2` times fewer pixels to decode, differentiate and compare).
        """
        decoder = decoder if decoder is not None else self.vae
        if downsample > 1:
            clean_latents = F.avg_pool2d(clean_latents, downsample)
        scaling_factor = getattr(decoder.config, "scaling_factor", 1.0)
        clean_latents = clean_latents.to(decoder.dtype)
        image = decoder.decode(clean_latents / scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)

    def prepare_image_latents(
        self,
        image,
        mask_image,
        strength,
        timesteps,
        batch_size,
        num_images_per_prompt,
        dtype,
        device,
        generator,
        latents,
    ):
        """
        The starting latents of an image-to-image or inpainting call, made by the diffusers pipelines' own
        `prepare_latents` (`prepare_img2img_latents`, `prepare_inpaint_latents`: the same random draws, in the same
        order), and with a mask what the loop needs to keep the image: `{"mask", "image_latents", "noise",
        "inpainting_input"}`, else None.
        """
        height, width = image_size(image)
        init_image = self.image_processor.preprocess(image, height=height, width=width).to(torch.float32)
        num_images = batch_size * num_images_per_prompt
        latent_timestep = timesteps[:1].repeat(num_images)
        if mask_image is None:
            latents = self.prepare_img2img_latents(
                init_image, latent_timestep, batch_size, num_images_per_prompt, dtype, device, generator
            )
            return latents, None
        latents, noise, *image_latents = self.prepare_inpaint_latents(
            num_images,
            self.vae.config.latent_channels,
            height,
            width,
            dtype,
            device,
            generator,
            latents,
            image=init_image,
            timestep=latent_timestep,
            is_strength_max=strength == 1.0,
            return_noise=True,
            return_image_latents=not self.inpainting_channels,
        )
        mask_condition = self.mask_processor.preprocess(mask_image, height=height, width=width)
        mask = F.interpolate(mask_condition, size=latents.shape[-2:]).to(device=device, dtype=dtype)
        kept = {"mask": mask.repeat(num_images, 1, 1, 1), "noise": noise, "inpainting_input": None}
        kept["image_latents"] = image_latents[0] if image_latents else None
        if self.inpainting_channels:
            masked_image = (init_image * (mask_condition < 0.5)).to(device=device, dtype=dtype)
            masked_image_latents = self._encode_vae_image(masked_image, generator=generator).to(dtype)
            kept["inpainting_input"] = (kept["mask"], masked_image_latents.repeat(num_images, 1, 1, 1))
        return latents, kept

    def encode_latents(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """The UNet's latent of `images` in [-1, 1]: a sample of the VAE encoder's distribution, scaled."""
        posterior = self.vae.encode(images.to(self.vae.dtype))
        return retrieve_latents(posterior, generator=generator) * self.vae.config.scaling_factor

    def decode_latents_with_padding(self, latents: torch.Tensor, padding: int = 8) -> torch.Tensor:
        """
        Decode a circular panorama seam-free: decode with `padding` latent columns wrapped onto each side, then crop.

        Args:
            latents (`torch.Tensor`): The panorama latents.
            padding (`int`, defaults to 8): Latent columns borrowed from the opposite edge on each side.
        """
        padding = min(padding, latents.shape[-1])
        latents = latents / self.vae.config.scaling_factor
        latents = torch.cat((latents[..., -padding:], latents, latents[..., :padding]), dim=-1)
        image = self.vae.decode(latents, return_dict=False)[0]
        padding_pixels = self.vae_scale_factor * padding
        return image[..., padding_pixels:-padding_pixels]

    def _conditioning(
        self, prompt_embeds, negative_prompt_embeds, image_embeds, timestep_cond, num_images, inpainting_input=None
    ):
        """Per-image UNet conditioning; with guidance each image's `[negative, positive]` pair is interleaved.
        `inpainting_input`: the latent mask and masked image an inpainting UNet takes."""
        if self.do_classifier_free_guidance:
            encoder_hidden_states = torch.stack([negative_prompt_embeds, prompt_embeds], dim=1).flatten(0, 1)
            if image_embeds is not None:
                image_embeds = [torch.stack(e.chunk(2), dim=1).flatten(0, 1) for e in image_embeds]
            if timestep_cond is not None:
                timestep_cond = timestep_cond.repeat_interleave(2, dim=0)
        else:
            encoder_hidden_states = prompt_embeds
        return {
            "encoder_hidden_states": encoder_hidden_states,
            "image_embeds": image_embeds,
            "timestep_cond": timestep_cond,
            "batch_size": num_images,
            "inpainting_input": inpainting_input,
        }

    # ------------------------------------------------------------------------------------------------------------------
    # Properties
    # ------------------------------------------------------------------------------------------------------------------

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def guidance_rescale(self):
        return self._guidance_rescale

    @property
    def cross_attention_kwargs(self):
        return self._cross_attention_kwargs

    @property
    def clip_skip(self):
        return self._clip_skip

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    # ------------------------------------------------------------------------------------------------------------------
    # The panorama core's methods (the same in every pipeline file)
    # ------------------------------------------------------------------------------------------------------------------

    def check_panorama_inputs(
        self,
        height,
        width,
        size_multiple,
        window,
        stride,
        stride_multiple=1,
        view_batch_size=1,
        num_inference_steps=50,
        num_images_per_prompt=1,
        callback_steps=None,
        callback_on_step_end_tensor_inputs=None,
        sync_weight=0.0,
        sync_decay_rate=0.95,
        sync_freq=1,
        sync_thres=5,
        sync_mode="exact",
        sync_gradient=None,
        sync_reuse_noise=None,
        sync_decoder=None,
        sync_lpips_size=None,
        sync_decode_downsample=1,
        sync_gradient_checkpointing=False,
        region_prompts=None,
        region_masks=None,
        region_negative_prompts=None,
        region_bootstrap_steps=None,
        image=None,
        mask_image=None,
        strength=None,
        sync_anchor=None,
        circular_padding=False,
    ):
        """
        The panorama's, the synchronization's, the regions' and the image's arguments, and the scheduler: a `ValueError` naming the argument,
        its value and what is allowed, before any model runs. `window` is the view side in latent pixels.
        """
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % size_multiple != 0:
                raise ValueError(f"`{name}` has to be a positive multiple of {size_multiple}, but is {value!r}.")
        if not isinstance(stride, int) or not 1 <= stride <= window or stride % stride_multiple:
            allowed = (
                f"an integer in 1..{window}"
                if stride_multiple == 1
                else f"a multiple of {stride_multiple} in 1..{window}"
            )
            raise ValueError(f"`stride` has to be {allowed} (the view size in latent pixels), but is {stride!r}.")
        if view_batch_size != "auto" and (not isinstance(view_batch_size, int) or view_batch_size < 1):
            raise ValueError(f"`view_batch_size` has to be a positive integer or 'auto', but is {view_batch_size!r}.")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` has to be a positive integer, but is {num_inference_steps!r}.")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(
                f"`num_images_per_prompt` has to be a positive integer, but is {num_images_per_prompt!r}."
            )
        if callback_steps is not None and (not isinstance(callback_steps, int) or callback_steps <= 0):
            raise ValueError(f"`callback_steps` has to be a positive integer, but is {callback_steps!r}.")
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but found"
                    f" {unknown}."
                )

        if not isinstance(sync_weight, (int, float)) or sync_weight < 0:
            raise ValueError(f"`sync_weight` has to be >= 0 (0 turns synchronization off), but is {sync_weight!r}.")
        if not isinstance(sync_decay_rate, (int, float)) or not 0.0 < sync_decay_rate <= 1.0:
            raise ValueError(f"`sync_decay_rate` has to be in (0, 1], but is {sync_decay_rate!r}.")
        if not isinstance(sync_freq, int) or sync_freq < 1:
            raise ValueError(f"`sync_freq` has to be a positive integer, but is {sync_freq!r}.")
        if not isinstance(sync_thres, int) or sync_thres < 0:
            raise ValueError(f"`sync_thres` has to be a non-negative integer, but is {sync_thres!r}.")
        if sync_mode not in SYNC_MODES:
            raise ValueError(f"`sync_mode` has to be one of {SYNC_MODES}, but is {sync_mode!r}.")
        gradients = (self.sync_denoiser_gradient, "x0")
        if sync_gradient is not None and sync_gradient not in gradients:
            raise ValueError(f"`sync_gradient` has to be one of {gradients} or None, but is {sync_gradient!r}.")
        if sync_reuse_noise not in (None, True, False):
            raise ValueError(f"`sync_reuse_noise` has to be True, False or None, but is {sync_reuse_noise!r}.")
        if sync_decoder is not None and not callable(getattr(sync_decoder, "decode", None)):
            raise ValueError(
                f"`sync_decoder` has to have a `decode` method (e.g. `AutoencoderTiny`), but is {sync_decoder!r}."
            )
        if sync_gradient_checkpointing not in (True, False):
            raise ValueError(
                f"`sync_gradient_checkpointing` has to be True or False, but is {sync_gradient_checkpointing!r}."
            )
        if sync_gradient_checkpointing and sync_decoder is not None:
            if not getattr(sync_decoder, "_supports_gradient_checkpointing", False):
                raise ValueError(
                    "`sync_gradient_checkpointing=True` needs a `sync_decoder` that supports gradient checkpointing"
                    f" (`enable_gradient_checkpointing`), but {type(sync_decoder).__name__} does not."
                )
        if sync_lpips_size is not None and (not isinstance(sync_lpips_size, int) or sync_lpips_size < 32):
            raise ValueError(
                f"`sync_lpips_size` has to be an integer >= 32 (pixels) or None, but is {sync_lpips_size!r}."
            )
        if (
            not isinstance(sync_decode_downsample, int)
            or sync_decode_downsample < 1
            or window % sync_decode_downsample
        ):
            raise ValueError(
                f"`sync_decode_downsample` has to be a positive integer dividing the view size {window}, but is"
                f" {sync_decode_downsample!r}."
            )
        factor = self.vae_scale_factor
        several_views = height // factor > window or width // factor > window
        if sync_weight > 0 and sync_thres > 0 and several_views:
            # The images LPIPS compares: one view's, decoded from the (pooled) clean latent, resized to `sync_lpips_size`.
            compared = [min(window, side // factor) * factor // sync_decode_downsample for side in (height, width)]
            if sync_lpips_size is not None and max(compared) > sync_lpips_size:
                compared = [max(1, round(side * sync_lpips_size / max(compared))) for side in compared]
            if min(compared) < self.SYNC_MIN_IMAGE_SIDE:
                raise ValueError(
                    f"synchronization would compare {compared[0]}x{compared[1]}-pixel view images (`height` {height},"
                    f" `width` {width}, `sync_decode_downsample` {sync_decode_downsample}, `sync_lpips_size`"
                    f" {sync_lpips_size}), smaller than the {self.SYNC_MIN_IMAGE_SIDE} pixels LPIPS-VGG's pooling needs:"
                    " a larger panorama, a smaller `sync_decode_downsample`, a larger `sync_lpips_size`, or"
                    " `sync_weight=0`."
                )
        self.check_region_inputs(
            region_prompts,
            region_masks,
            region_negative_prompts,
            region_bootstrap_steps,
            height,
            width,
            num_inference_steps,
        )
        if circular_padding not in (True, False):
            raise ValueError(f"`circular_padding` has to be True or False, but is {circular_padding!r}.")
        num_views = len(get_views(height // factor, width // factor, window, stride, circular_padding))
        self.check_image_inputs(
            image, mask_image, strength, sync_anchor, height, width, num_inference_steps, num_views
        )
        self.check_scheduler(
            synchronized=sync_weight > 0 and sync_thres > 0, sync_gradient=sync_gradient, sync_mode=sync_mode
        )

    # The smallest side of an image LPIPS-VGG can compare (its fifth block sees 1/16 of it).
    SYNC_MIN_IMAGE_SIDE = 16

    def check_scheduler(self, synchronized, sync_gradient=None, sync_mode="exact"):
        """The scheduler's family has to be one this pipeline supports; synchronization needs a known one."""
        scheduler = self.scheduler
        name = type(scheduler).__name__
        family = scheduler_family(scheduler)
        supported = [name for family in self._scheduler_families for name in SCHEDULER_FAMILIES[family]]
        if family is not None and family not in self._scheduler_families:
            raise ValueError(
                f"`scheduler` {name} is a {family} scheduler, which {type(self).__name__} does not support; use a"
                f" {' or '.join(self._scheduler_families)} one: {', '.join(supported)}."
            )
        if not synchronized:
            return
        if family is None:
            raise ValueError(
                f"synchronization needs a scheduler whose clean-latent prediction is known, but `scheduler` is {name};"
                f" use one of {', '.join(supported)}, or `sync_weight=0`."
            )
        if hasattr(scheduler, "ets") and not scheduler.config.get("skip_prk_steps", True):
            raise ValueError(
                "synchronization does not support PNDMScheduler's Runge-Kutta warm-up (`skip_prk_steps=False`):"
                " use `PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)` or another scheduler."
            )
        if family == FLOW_MATCHING:
            return
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                "synchronization needs the scheduler's `prediction_type` to be 'epsilon', 'v_prediction' or"
                f" 'sample', but it is {prediction_type!r}."
            )
        if prediction_type == "sample" and not SyncSettings.from_arguments(sync_mode, sync_gradient).through_denoiser:
            raise ValueError(
                "`sync_gradient='x0'` (also implied by `sync_mode='fast'`) treats the model output as constant, which"
                f" leaves no gradient with `prediction_type='sample'`; use `sync_gradient='{self.sync_denoiser_gradient}'`."
            )

    def take_deprecated_callback(self, kwargs: dict):
        """
        `(callback, callback_steps)` out of `__call__`'s `**kwargs` (deprecated), and a `TypeError` for any other key:
        a misspelt argument must not run as if it were not there.
        """
        callback = kwargs.pop("callback", None)
        callback_steps = kwargs.pop("callback_steps", None)
        if kwargs:
            names = ", ".join(f"`{name}`" for name in kwargs)
            raise TypeError(f"{type(self).__name__}.__call__() got unexpected keyword arguments: {names}.")
        if callback is not None:
            deprecate("callback", "1.0.0", "Use `callback_on_step_end` instead of `callback`.")
        if callback_steps is not None:
            deprecate("callback_steps", "1.0.0", "Use `callback_on_step_end` instead of `callback_steps`.")
        return callback, callback_steps

    def run_step_end_callback(self, callback_on_step_end, tensor_inputs, i, t, tensors: dict):
        """
        `callback_on_step_end(self, i, t, {name: tensors[name] for name in tensor_inputs})`: returns `tensors` with
        the callback's replacements, and whether it replaced any but the latents (then the conditioning is rebuilt).
        """
        outputs = callback_on_step_end(self, i, t, {name: tensors[name] for name in tensor_inputs})
        replaced = {name: value for name, value in outputs.items() if name in tensors and value is not tensors[name]}
        return {**tensors, **replaced}, any(name != "latents" for name in replaced)

    def view_batch_sizes(
        self, view_batch_size, num_views, num_images, device, dtype, sync: SyncSettings, regions=None
    ):
        """
        `(views per denoising batch, sync)`, with `sync`'s gradient batch and checkpointing set for "auto"; with
        `regions`, "auto" sizes for a view denoised for as many prompts as the most any view has.
        """
        if regions is not None:
            num_images *= max(len(prompts) for prompts in regions.view_prompts.values())
        if view_batch_size != "auto":
            return view_batch_size, replace(sync, gradient_batch_size=view_batch_size)
        return self.auto_view_batch_sizes(num_views, num_images, device, dtype, sync.active and num_views > 1, sync)

    def auto_view_batch_sizes(self, num_views, num_images, device, dtype, sync_active, sync: SyncSettings):
        """
        `view_batch_size="auto"`: `(views per denoising batch, sync)` with sync's views per gradient pass and gradient
        checkpointing chosen.

        On CUDA, as many views as fit in `AUTO_MEMORY_FRACTION` of the free memory (`torch.cuda.mem_get_info`) by the
        estimates of `view_memory`, in batches of nearly equal size (fewer distinct shapes for compiled models). The
        gradient pass is sized separately, since a view holds ~20x more memory there; if not even one view fits,
        activation checkpointing is turned on for it (the same result, more compute). Elsewhere there is no memory
        reading: `AUTO_HOST_VIEW_BATCH_SIZE` views per denoising batch and one per gradient pass.
        """
        device = torch.device(device)
        if device.type != "cuda":
            return balanced_batch_size(num_views, self.AUTO_HOST_VIEW_BATCH_SIZE), replace(sync, gradient_batch_size=1)

        budget = torch.cuda.mem_get_info(device)[0] * self.AUTO_MEMORY_FRACTION
        view_batch_size = balanced_batch_size(num_views, budget // self.view_memory(num_images, dtype))
        if not sync_active:
            return view_batch_size, replace(sync, gradient_batch_size=1)
        per_view = self.view_memory(num_images, dtype, sync)
        if per_view > budget and not sync.checkpointing:
            sync = replace(sync, checkpointing=True)
            per_view = self.view_memory(num_images, dtype, sync)
            logger.info("view_batch_size='auto': one view's gradient pass does not fit; using gradient checkpointing.")
        return view_batch_size, replace(
            sync, gradient_batch_size=balanced_batch_size(view_batch_size, budget // per_view)
        )

    def scale_model_input(self, latents: torch.Tensor, t) -> torch.Tensor:
        """The denoiser's input for `latents`: the scheduler's scaling, none for flow matching."""
        if scheduler_family(self.scheduler) == FLOW_MATCHING:
            return latents
        return self.scheduler.scale_model_input(latents, t)

    def _sigma(self, t) -> float:
        """The sigma of the scheduler's current step, a host number (schedulers keep `sigmas` on the host)."""
        index = self.scheduler.step_index
        if index is None:
            index = self.scheduler.index_for_timestep(t)
        return float(self.scheduler.sigmas[index])

    def _alpha_sigma(self, t, device, dtype):
        """
        `(alpha_t, sigma_t)` of the current step in variance-preserving form, `u = alpha_t x_0 + sigma_t eps`, read
        from the scheduler's own parameterization.
        """
        scheduler = self.scheduler
        if hasattr(scheduler, "sigmas"):
            # Sigma-parameterized schedulers (Euler, DPM-Solver, UniPC, LMS, ...): the sigma of this step, which also
            # covers Karras and other non-integer timestep schedules.
            sigma = self._sigma(t)
            alpha_t = (sigma**2 + 1) ** -0.5
            return alpha_t, sigma * alpha_t
        # `alphas_cumprod` lives on the host and `t` on the device: index a device copy, or the host would wait.
        alphas_cumprod = self._device_table(scheduler.alphas_cumprod, device)
        alpha_prod = alphas_cumprod[torch.as_tensor(t, device=device).long()]
        return (alpha_prod**0.5).to(dtype), ((1 - alpha_prod) ** 0.5).to(dtype)

    def _device_table(self, table, device):
        """`table` (a scheduler's host tensor) in float32 on `device`, copied once and reused while it is unchanged."""
        cached = getattr(self, "_device_tables", None)
        if cached is None or cached[0] is not table or cached[1].device != torch.device(device):
            cached = (table, table.to(device=device, dtype=torch.float32))
            self._device_tables = cached
        return cached[1]

    def predict_clean_latents(self, model_input: torch.Tensor, model_output: torch.Tensor, t) -> torch.Tensor:
        """
        The clean latent `x0` the scheduler predicts from the model output, without advancing the scheduler.

        Flow matching: `x0 = z - sigma * v`. Otherwise `model_input = scale_model_input(z, t)` is the
        variance-preserving noisy latent (sigma-scaled schedulers divide by `sqrt(sigma**2 + 1)`), and `x0` follows
        the scheduler's `prediction_type`: for DDIM this equals `step(...).pred_original_sample`, for Euler
        `z - sigma * eps`.
        """
        if scheduler_family(self.scheduler) == FLOW_MATCHING:
            return model_input - self._sigma(t) * model_output
        alpha_t, sigma_t = self._alpha_sigma(t, model_input.device, model_input.dtype)
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return (model_input - sigma_t * model_output) / alpha_t
        if prediction_type == "v_prediction":
            return alpha_t * model_input - sigma_t * model_output
        if prediction_type == "sample":
            return model_output
        raise ValueError(f"Unsupported `prediction_type` {prediction_type!r}.")

    def set_perceptual_loss(
        self, module: torch.nn.Module | None = None, *, vgg_weights: str | os.PathLike | None = None
    ):
        """
        Replace the perceptual loss, by default `lpips.LPIPS(net="vgg")` built on first use.

        Args:
            module (`torch.nn.Module`, *optional*):
                `module(images_a, images_b)` takes two image batches in [-1, 1] and returns one distance per image.
                It runs in float32 whatever the pipeline's dtype. `None` goes back to the default.
            vgg_weights (`str` or `os.PathLike`, *optional*):
                A local copy of torchvision's VGG-16 weights (`vgg16-397923af.pth`): LPIPS-VGG is built from it now
                instead of downloading them on first use.
        """
        if module is not None and vgg_weights is not None:
            raise ValueError("Pass either `module` or `vgg_weights` to `set_perceptual_loss`, not both.")
        self._perceptual_loss = self._lpips_vgg(vgg_weights) if vgg_weights is not None else module

    def perceptual_loss(self, device) -> torch.nn.Module:
        """The perceptual loss module on `device` in float32, creating LPIPS-VGG on first use."""
        if self._perceptual_loss is None:
            self._perceptual_loss = self._lpips_vgg()
        return self._perceptual_loss.to(device=device, dtype=torch.float32)

    @staticmethod
    def _lpips_vgg(vgg_weights=None) -> torch.nn.Module:
        """LPIPS-VGG with torchvision's VGG-16 from `vgg_weights`, or downloaded into torch's hub cache."""
        try:
            import lpips
        except ImportError as error:
            raise ImportError(
                "SyncDiffusion needs the `lpips` package for its perceptual loss: `pip install lpips`, or pass"
                " `sync_weight=0` for plain MultiDiffusion."
            ) from error
        if vgg_weights is None:
            try:
                with warnings.catch_warnings():  # torch 2.4-2.5 warn about lpips' own `torch.load` of its heads
                    warnings.filterwarnings("ignore", message=".*weights_only.*", category=FutureWarning)
                    loss = lpips.LPIPS(net="vgg", verbose=False)
            except OSError as error:  # no network: urllib's URLError, or a refused connection
                raise OSError(_missing_vgg_weights_message(error)) from None
            return loss.eval().requires_grad_(False)

        if not os.path.isfile(vgg_weights):
            raise ValueError(f"`vgg_weights` {str(vgg_weights)!r} is not a file; expected {_VGG16_FILE}.")
        with (
            warnings.catch_warnings()
        ):  # torchvision's notes about `pretrained=False`; torch 2.4-2.5's about lpips' load
            warnings.simplefilter("ignore", UserWarning)
            warnings.filterwarnings("ignore", message=".*weights_only.*", category=FutureWarning)
            loss = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
        # lpips splits torchvision's `vgg16().features` into five slices that keep the layer indices as names.
        layers = dict(module for part in loss.net.children() for module in part.named_children())
        features = torch.nn.Sequential(*(layers[str(index)] for index in range(len(layers))))
        state_dict = torch.load(vgg_weights, map_location="cpu", weights_only=True)
        state_dict = {
            key[len("features.") :]: value for key, value in state_dict.items() if key.startswith("features.")
        }
        expected = features.state_dict()
        wrong = [key for key in expected if getattr(state_dict.get(key), "shape", None) != expected[key].shape]
        if wrong:
            raise ValueError(
                f"`vgg_weights` {str(vgg_weights)!r}: not torchvision's VGG-16 weights ({len(wrong)} of the"
                f" {len(expected)} `features.*` tensors missing or of another shape, e.g. `features.{wrong[0]}`)."
            )
        features.load_state_dict(state_dict)
        return loss.eval().requires_grad_(False)

    def perceptual_distance(self, images, anchor_images, lpips_size=None) -> torch.Tensor:
        """LPIPS distance per image between images in [0, 1], computed in float32."""
        images, anchor_images = images.float() * 2 - 1, anchor_images.float() * 2 - 1
        if lpips_size is not None and max(images.shape[-2:]) > lpips_size:
            scale = lpips_size / max(images.shape[-2:])
            size = [max(1, round(side * scale)) for side in images.shape[-2:]]
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
            anchor_images = F.interpolate(
                anchor_images, size=size, mode="bilinear", antialias=True, align_corners=False
            )
        return self.perceptual_loss(images.device)(images, anchor_images).reshape(images.shape[0], -1).sum(1)

    @contextmanager
    def _sync_checkpointing(self, enabled, decoder=None):
        """Activation checkpointing in the denoising models and the synchronization's decoder, in the gradient pass."""
        decoder = decoder if decoder is not None else self.vae
        candidates = (*self.denoising_models, decoder)
        models = [m for m in candidates if enabled and getattr(m, "_supports_gradient_checkpointing", False)]
        previous = [m.is_gradient_checkpointing for m in models]
        for model in models:
            model.enable_gradient_checkpointing()
        try:
            yield
        finally:
            for model, was_enabled in zip(models, previous):
                if not was_enabled:
                    model.disable_gradient_checkpointing()

    def check_image_inputs(self, image, mask_image, strength, sync_anchor, height, width, steps, num_views):
        """The image to start from or repaint, its mask (the panorama's size), `strength` and `sync_anchor`."""
        if image is None:
            for name, value in (("mask_image", mask_image), ("strength", strength)):
                if value is not None:
                    raise ValueError(f"`{name}` needs `image`, but `image` is None.")
        for name, value in (("image", image), ("mask_image", mask_image)):
            if value is None:
                continue
            if not isinstance(value, (PIL.Image.Image, np.ndarray, torch.Tensor)):
                raise ValueError(
                    f"`{name}` has to be one PIL image, numpy array or torch tensor (the panorama's size), but is"
                    f" {type(value)}."
                )
            if isinstance(value, torch.Tensor) and value.ndim == 4 and value.shape[0] != 1:
                raise ValueError(f"`{name}` has to be one image, but is a batch of {value.shape[0]}.")
            if image_size(value) != (height, width):
                size = image_size(value)
                raise ValueError(
                    f"`{name}` is {size[0]}x{size[1]} pixels (height x width), but the panorama is {height}x{width}:"
                    " pass `height` and `width` of the image, or resize it."
                )
        if strength is not None:
            if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0 < strength <= 1:
                raise ValueError(f"`strength` has to be in (0, 1], but is {strength!r}.")
            # (Flow-matching pipelines round the other way, as SD 3's: at least one step always runs.)
            if scheduler_family(self.scheduler) != FLOW_MATCHING and int(steps * strength) < 1:
                raise ValueError(
                    f"`strength` {strength} of {steps} steps runs no step (`int(num_inference_steps * strength)` is"
                    " 0): a larger `strength` or more steps."
                )
        if mask_image is not None:
            mask = self.mask_processor.preprocess(mask_image, height=height, width=width)
            if mask.min() < 0 or mask.max() > 1:
                raise ValueError("`mask_image` has to hold values in [0, 1] (white = generate, black = keep).")
            if mask.max() == 0:
                raise ValueError(
                    "`mask_image` is black everywhere: it keeps the whole image and generates nothing (white = generate)."
                )
            if mask.min() == 1:
                logger.warning(
                    "`mask_image` is white everywhere: it keeps nothing of the image (`strength=1`: the text-to-image"
                    " panorama, but for the random draws of the image's encoding; below 1: image-to-image)."
                )
        if self.inpainting_channels and mask_image is None:
            raise ValueError(
                f"this {type(self.denoiser).__name__} is an inpainting model ({self.denoiser.config.in_channels} input"
                " channels: latents, mask, masked image): it needs `image` and `mask_image`."
            )
        anchors = ("center", "image")
        if sync_anchor is not None and sync_anchor not in anchors:
            if not isinstance(sync_anchor, int) or isinstance(sync_anchor, bool) or not 0 <= sync_anchor < num_views:
                raise ValueError(
                    f"`sync_anchor` has to be one of {anchors}, a view index in 0..{num_views - 1}, or None, but is"
                    f" {sync_anchor!r}."
                )

    def check_region_inputs(
        self, region_prompts, region_masks, region_negative_prompts, region_bootstrap_steps, height, width, steps
    ):
        """Region prompts, their masks (the panorama's size in pixels, values in [0, 1]) and bootstrapping."""
        if region_prompts is None:
            for name, value in (
                ("region_masks", region_masks),
                ("region_negative_prompts", region_negative_prompts),
                ("region_bootstrap_steps", region_bootstrap_steps),
            ):
                if value is not None:
                    raise ValueError(f"`{name}` needs `region_prompts`, but `region_prompts` is None.")
            return
        if (
            not isinstance(region_prompts, list)
            or not region_prompts
            or not all(isinstance(p, str) for p in region_prompts)
        ):
            raise ValueError(f"`region_prompts` has to be a non-empty list of strings, but is {region_prompts!r}.")
        if not isinstance(region_masks, (list, tuple)) or len(region_masks) != len(region_prompts):
            count = len(region_masks) if isinstance(region_masks, (list, tuple)) else type(region_masks).__name__
            raise ValueError(
                f"`region_masks` has to be a list of one mask per region prompt ({len(region_prompts)}), but has"
                f" {count}."
            )
        for index, mask in enumerate(region_masks):
            mask = region_mask_tensor(mask, index)
            if tuple(mask.shape) != (height, width):
                raise ValueError(
                    f"`region_masks[{index}]` is {mask.shape[0]}x{mask.shape[1]} pixels (height x width), but the"
                    f" panorama is {height}x{width}."
                )
        if region_negative_prompts is not None and (
            not isinstance(region_negative_prompts, list)
            or len(region_negative_prompts) != len(region_prompts)
            or not all(p is None or isinstance(p, str) for p in region_negative_prompts)
        ):
            raise ValueError(
                "`region_negative_prompts` has to be a list of one string (or None) per region prompt"
                f" ({len(region_prompts)}), but is {region_negative_prompts!r}."
            )
        if region_bootstrap_steps is not None and (
            not isinstance(region_bootstrap_steps, int)
            or isinstance(region_bootstrap_steps, bool)
            or not 0 <= region_bootstrap_steps <= steps
        ):
            raise ValueError(
                f"`region_bootstrap_steps` has to be an integer in 0..{steps} (`num_inference_steps`) or None, but is"
                f" {region_bootstrap_steps!r}."
            )

    def prepare_regions(self, conditionings, region_masks, bootstrap_steps, views, latents, steps, generator):
        """
        The call's `PanoramaRegions`: each mask averaged over the VAE's pixel blocks to the latent, the prompts
        present in each view, and for bootstrapping constant-colour backgrounds encoded at the view size (as many as
        bootstrap steps, as `region_based.py` does) with a random choice per step, view, region and image.
        """
        factor = self.vae_scale_factor
        masks = torch.stack([region_mask_tensor(mask, k) for k, mask in enumerate(region_masks)])
        latent_masks = F.avg_pool2d(masks[:, None], factor)[:, 0].to(latents.device)
        for index in torch.nonzero(latent_masks.flatten(1).amax(1) == 0).flatten().tolist():
            logger.warning(f"`region_masks[{index}]` covers no latent pixel: its region prompt changes nothing.")
        weights = region_weights(latent_masks)
        view_prompts = {
            view: [p for p in range(len(weights)) if crop_views(weights[p], [view]).any()] for view in views
        }
        if bootstrap_steps is None:
            bootstrap_steps = round(REGION_BOOTSTRAP_FRACTION * steps)
        regions = PanoramaRegions(conditionings, weights, view_prompts, bootstrap_steps)
        if bootstrap_steps == 0:
            return regions
        # A generator of their own, seeded from the call's (its first one) without consuming it: the draws of the
        # scheduler's noise after this stay those of a call without regions.
        first = generator[0] if isinstance(generator, list) else generator
        device = first.device if first is not None else latents.device
        if first is not None:
            seed_generator = torch.Generator(device).set_state(first.get_state())
            seed = int(torch.randint(2**62, (1,), generator=seed_generator, device=device))
            first = torch.Generator(device).manual_seed(seed)
        colours = torch.rand((bootstrap_steps, 3, 1, 1), generator=first, device=device)
        h_start, h_end, w_start, w_end = views[0]
        size = ((h_end - h_start) * factor, (w_end - w_start) * factor)
        images = [(2 * colour - 1).expand(1, 3, *size) for colour in colours.to(latents.device)]
        regions.backgrounds = torch.cat([self.encode_latents(image, first) for image in images]).to(latents.dtype)
        choice_shape = (bootstrap_steps, len(views), len(weights), latents.shape[0])
        regions.background_choice = torch.randint(bootstrap_steps, choice_shape, generator=first, device=device)
        regions.view_index = {view: k for k, view in enumerate(views)}
        # The unit noise the latents were drawn from (sigma-scaled schedulers start from `init_noise_sigma` times it).
        start_sigma = 1.0 if scheduler_family(self.scheduler) == FLOW_MATCHING else self.scheduler.init_noise_sigma
        regions.initial_noise = latents / start_sigma
        return regions

    def add_noise(self, clean_latents: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """`clean_latents` noised to step `t` as the scheduler would (flow matching: `sigma * noise + (1 - sigma) x`)."""
        timesteps = torch.as_tensor(t, device=clean_latents.device).reshape(1)
        if scheduler_family(self.scheduler) == FLOW_MATCHING:
            return self.scheduler.scale_noise(clean_latents, timesteps, noise)
        return self.scheduler.add_noise(clean_latents, noise, timesteps)

    def keep_image(self, latents, kept: dict, timesteps, i: int) -> torch.Tensor:
        """
        Inpainting with a plain denoiser, as `StableDiffusionInpaintPipeline` does for 4-channel UNets: after step
        `i`, the kept region (`1 - mask`) becomes the image's latent noised to the next step (the image itself after
        the last).
        """
        image_latents = kept["image_latents"]
        if i < len(timesteps) - 1:
            image_latents = self.add_noise(image_latents, kept["noise"], timesteps[i + 1])
        mask = kept["mask"]
        return (1 - mask) * image_latents + mask * latents

    def view_items(self, views: list, regions: PanoramaRegions | None) -> list:
        """`(view, prompt)` of every prompt denoised in each view, view-major; prompt 0 is the call's own."""
        if regions is None:
            return [(view, 0) for view in views]
        return [(view, prompt) for view in views for prompt in regions.view_prompts[view]]

    def region_items(self, view_latents, views, t, panorama: PanoramaState | None, input_scale=1.0):
        """
        The latent of every `view_items` entry from the views' latents: a view's own for each of its prompts; in the
        bootstrapping steps a region's outside its mask is a noised constant-colour background. `input_scale` is
        `scale_model_input`'s factor when `view_latents` are model inputs.
        """
        regions = panorama.regions if panorama is not None else None
        if regions is None:
            return view_latents
        bootstrapping = panorama.step < regions.bootstrap_steps
        if all(regions.view_prompts[view] == [0] for view in views):  # the background alone: the views' own
            return view_latents
        items = []
        for view, latents in zip(views, view_latents.chunk(len(views))):
            for prompt in regions.view_prompts[view]:
                if not bootstrapping or prompt == 0:
                    items.append(latents)
                    continue
                choice = regions.background_choice[panorama.step, regions.view_index[view], prompt]
                background = regions.backgrounds[choice.to(regions.backgrounds.device)]
                noise = crop_views(regions.initial_noise, [view])
                background = self.add_noise(background, noise, t).to(latents.dtype) * input_scale
                weight = crop_views(regions.weights[prompt], [view]).to(latents.dtype)
                items.append(latents * weight + background * (1 - weight))
        return torch.cat(items)

    def predict_items(self, model_input, t, conditioning, views, panorama: PanoramaState | None):
        """The model output of every `view_items` entry: one `predict_noise` per prompt present."""
        regions = panorama.regions if panorama is not None else None
        if regions is None:
            return self.predict_noise(model_input, t, conditioning, views)
        items = self.view_items(views, regions)
        prompts = sorted({prompt for _, prompt in items})
        if len(prompts) == 1:
            prompt_conditioning = conditioning if prompts[0] == 0 else regions.conditionings[prompts[0] - 1]
            return self.predict_noise(model_input, t, prompt_conditioning, [view for view, _ in items])
        inputs = model_input.chunk(len(items))
        outputs = [None] * len(items)
        for prompt in prompts:
            picked = [k for k, (_, p) in enumerate(items) if p == prompt]
            prompt_conditioning = conditioning if prompt == 0 else regions.conditionings[prompt - 1]
            prompt_views = [items[k][0] for k in picked]
            output = self.predict_noise(torch.cat([inputs[k] for k in picked]), t, prompt_conditioning, prompt_views)
            for k, output_k in zip(picked, output.chunk(len(picked))):
                outputs[k] = output_k
        return torch.cat(outputs)

    def combine_items(self, item_latents, views, panorama: PanoramaState | None):
        """Each view's mask-weighted mean of its prompts' `item_latents` (its own with no regions)."""
        regions = panorama.regions if panorama is not None else None
        if regions is None:
            return item_latents
        items = self.view_items(views, regions)
        if len(items) == len(views):  # one prompt in each view: its own
            return item_latents
        chunks = item_latents.chunk(len(items))
        combined = []
        for view in views:
            picked = [k for k, (v, _) in enumerate(items) if v == view]
            weights = [crop_views(regions.weights[items[k][1]], [view]).to(item_latents.dtype) for k in picked]
            total = sum(w * chunks[k] for w, k in zip(weights, picked))
            combined.append(total / sum(weights))
        return torch.cat(combined)

    def synchronize_views(
        self, view_latents, views, anchor_images, t, weight, conditioning, sync: SyncSettings, panorama=None
    ):
        """
        SyncDiffusion's update of a stack of (non-anchor) views:
        `z_v <- z_v - w * d LPIPS(D(x0(z_v)), D(x0(z_anchor))) / d z_v`.

        The step is taken on the denoiser's input `scale_model_input(z_v)`: `z_v` itself for DDIM (the paper's),
        DPM-Solver, UniPC and flow matching; for sigma-scaled schedulers (Euler, LMS) the variance-preserving latent,
        so that `sync_weight` means the same as with DDIM instead of a step `sigma**2 + 1` times smaller. With region
        prompts `x0(z_v)` is the mask-weighted mean of the view's prompts' clean latents (`combine_items`): the
        image the view will contribute.

        Returns the updated latents and the model output (of every `view_items` entry) predicted before the update.
        """
        input_scale = self.scale_model_input(torch.ones_like(view_latents[:1, :1, :1, :1]), t).float()

        def predict_clean(model_input):
            item_input = self.region_items(model_input, views, t, panorama, input_scale.to(model_input.dtype))
            with torch.set_grad_enabled(sync.through_denoiser):
                model_output = self.predict_items(item_input, t, conditioning, views, panorama)
            clean_latents = self.predict_clean_latents(item_input, model_output, t)
            return self.combine_items(clean_latents, views, panorama), model_output

        def decode(clean_latents):
            return self.decode_for_sync(clean_latents, sync.decoder, sync.decode_downsample)

        def distance(images, anchor):
            return self.perceptual_distance(images, anchor, sync.lpips_size)

        model_input = self.scale_model_input(view_latents, t)
        with self._sync_checkpointing(sync.checkpointing, sync.decoder):
            updated, model_output = synchronization_update(
                model_input, anchor_images, weight, predict_clean, decode, distance, lambda: onload(self.denoiser)
            )
        return (updated / input_scale).to(view_latents.dtype), model_output

    def prepare_anchor(self, latents, anchor_view, t, conditioning, sync: SyncSettings, panorama=None):
        """The anchor view's model output (reused for its own step) and its decoded clean image, no gradient."""
        anchor_latents = self.region_items(crop_views(latents, [anchor_view]), [anchor_view], t, panorama)
        model_input = self.scale_model_input(anchor_latents, t)
        model_output = self.predict_items(model_input, t, conditioning, [anchor_view], panorama)
        clean_latents = self.predict_clean_latents(model_input, model_output, t)
        clean_latents = self.combine_items(clean_latents, [anchor_view], panorama)
        images = self.decode_for_sync(clean_latents, sync.decoder, sync.decode_downsample)
        return {"view": anchor_view, "model_output": model_output, "images": images}

    def denoise_view_batch(
        self, view_latents, views, anchor, weight, t, conditioning, sync: SyncSettings, panorama=None
    ):
        """
        The model output for one batch of views, synchronizing the non-anchor ones first on a synchronized step
        (`anchor` given).

        Returns the latents and the model output of every `view_items` entry (the views' own without regions).
        """
        if anchor is None:
            item_latents = self.region_items(view_latents, views, t, panorama)
            model_input = self.scale_model_input(item_latents, t)
            return item_latents, self.predict_items(model_input, t, conditioning, views, panorama)

        regions = panorama.regions if panorama is not None else None
        rows = view_latents.shape[0] // len(views)
        item_rows = [rows * len(self.view_items([view], regions)) for view in views]
        latents_per_view = list(view_latents.chunk(len(views)))
        others = [k for k, view in enumerate(views) if view != anchor["view"]]
        outputs_per_view = [anchor["model_output"]] * len(views)  # the anchor keeps its own prediction
        # The gradient pass holds far more memory per view than a forward: it runs on chunks of the other views.
        for start in range(0, len(others), sync.gradient_batch_size):
            chunk = others[start : start + sync.gradient_batch_size]
            stacked = torch.cat([latents_per_view[k] for k in chunk])
            anchor_images = anchor["images"].repeat(len(chunk), 1, 1, 1)
            chunk_views = [views[k] for k in chunk]
            updated, before = self.synchronize_views(
                stacked, chunk_views, anchor_images, t, weight, conditioning, sync, panorama
            )
            before = before.split([item_rows[k] for k in chunk])
            for k, latents_k, output_k in zip(chunk, updated.chunk(len(chunk)), before):
                latents_per_view[k], outputs_per_view[k] = latents_k, output_k
        if others and not sync.reuse_noise:
            # The denoising step predicts again from the updated latents, in one call for the whole batch.
            other_views = [views[k] for k in others]
            updated = self.region_items(torch.cat([latents_per_view[k] for k in others]), other_views, t, panorama)
            after = self.predict_items(self.scale_model_input(updated, t), t, conditioning, other_views, panorama)
            for k, output_k in zip(others, after.split([item_rows[k] for k in others])):
                outputs_per_view[k] = output_k
        item_latents = self.region_items(torch.cat(latents_per_view), views, t, panorama)
        return item_latents, torch.cat(outputs_per_view)

    def prepare_panorama(
        self, latents: torch.Tensor, views: list, view_batch_size: int, regions=None, anchor_index=None
    ) -> PanoramaState:
        """The views in batches, one scheduler state per batch, the anchor (`views[len(views) // 2]` unless
        `anchor_index` says), the sums."""
        anchor_index = len(views) // 2 if anchor_index is None else anchor_index
        view_batches = [views[i : i + view_batch_size] for i in range(0, len(views), view_batch_size)]
        return PanoramaState(
            views=views,
            view_batches=view_batches,
            scheduler_states=[self._scheduler_state() for _ in view_batches],
            anchor_view=views[anchor_index],
            anchor_batch=anchor_index // view_batch_size,
            value=torch.zeros_like(latents, dtype=torch.float32),
            count=torch.zeros_like(latents, dtype=torch.float32),
            noise=PanoramaNoise(self.scheduler, latents.shape),
            regions=regions,
        )

    def denoise_step(self, latents, t, panorama: PanoramaState, conditioning, sync: SyncSettings, extra_step_kwargs):
        """
        One step of the joint diffusion: every view is denoised from its crop of `latents` (synchronized to the
        anchor view first, on the early steps), and every latent pixel becomes the mean of its views (MultiDiffusion,
        Eq. 5). With region prompts every prompt present in a view is denoised from it, and each adds its result
        weighted by its mask: the pixel is the mask-weighted mean over views and prompts. Returns the new latents.
        """
        panorama.value.zero_()
        panorama.count.zero_()
        panorama.noise.new_evaluation()
        # Synchronize on a step's first evaluation only: the correction of a second-order step (Heun, KDPM2) starts
        # again from the sample its first evaluation stored, so an update there would be lost.
        self.scheduler.__dict__.update(panorama.scheduler_states[panorama.anchor_batch])
        first_evaluation = self._first_evaluation()
        panorama.step += first_evaluation
        weight = sync.weight_at(panorama.step) if first_evaluation and len(panorama.views) > 1 else None
        anchor = None
        if weight is not None:
            anchor = self.prepare_anchor(latents, panorama.anchor_view, t, conditioning, sync, panorama)
            # The anchor's batch keeps what scale_model_input recorded there (it reuses this prediction).
            panorama.scheduler_states[panorama.anchor_batch] = self._scheduler_state()

        regions = panorama.regions
        for j, views in enumerate(panorama.view_batches):
            self.scheduler.__dict__.update(panorama.scheduler_states[j])
            view_latents = crop_views(latents, views)
            item_latents, model_output = self.denoise_view_batch(
                view_latents, views, anchor, weight, t, conditioning, sync, panorama
            )
            items = self.view_items(views, regions)
            item_views = [view for view, _ in items]
            with panorama.noise.crop(item_views):
                denoised = self.scheduler.step(model_output, t, item_latents, **extra_step_kwargs, return_dict=False)[
                    0
                ]
            panorama.scheduler_states[j] = self._scheduler_state()
            weights = None if regions is None else [crop_views(regions.weights[p], [v]) for v, p in items]
            add_views(panorama.value, panorama.count, denoised, item_views, weights)
        return torch.where(panorama.count > 0, panorama.value / panorama.count, panorama.value).to(latents.dtype)

    def _first_evaluation(self):
        """
        Whether the scheduler's next model evaluation starts a denoising step. Not so for the correction of a
        second-order step (Heun, KDPM2), nor for PNDM's second evaluation of its first timestep: those start again
        from the sample their step's first evaluation stored, so an update made there would be lost.
        """
        scheduler = self.scheduler
        if hasattr(scheduler, "state_in_first_order"):
            return scheduler.state_in_first_order
        if hasattr(scheduler, "cur_sample") and hasattr(scheduler, "ets"):  # PNDM with PLMS steps (`check_scheduler`)
            return scheduler.counter != 1
        return True

    def _scheduler_state(self):
        """
        The scheduler's state for one view batch: its history (lists, dicts) copied, tensors shared. Schedulers rebind
        their tensors rather than change them in place, so this is a deep copy without copying device tensors.
        """
        return {k: copy.copy(v) if isinstance(v, (list, dict)) else v for k, v in self.scheduler.__dict__.items()}

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    # ------------------------------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] = None,
        height: int | None = 512,
        width: int | None = 2048,
        num_inference_steps: int = 50,
        timesteps: list[int] = None,
        guidance_scale: float = 7.5,
        view_batch_size: int | str = 1,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        circular_padding: bool = False,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        stride: int = 8,
        sync_weight: float = 20.0,
        sync_decay_rate: float = 0.95,
        sync_freq: int = 1,
        sync_thres: int = 5,
        sync_mode: str = "exact",
        sync_gradient: str | None = None,
        sync_reuse_noise: bool | None = None,
        sync_decoder: Any | None = None,
        sync_lpips_size: int | None = None,
        sync_gradient_checkpointing: bool = False,
        sync_decode_downsample: int = 1,
        region_prompts: list[str] | None = None,
        region_masks: list[PipelineImageInput] | None = None,
        region_negative_prompts: list[str | None] | None = None,
        region_bootstrap_steps: int | None = None,
        image: PipelineImageInput | None = None,
        mask_image: PipelineImageInput | None = None,
        strength: float | None = None,
        sync_anchor: str | int | None = None,
        **kwargs: Any,
    ):
        r"""
        The call function to the pipeline for generation.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompt or prompts to guide image generation. If not defined, you need to pass `prompt_embeds`.
            height (`int`, *optional*, defaults to 512):
                The height in pixels of the generated image: a multiple of the VAE scale factor. Taller than the
                UNet's window (`unet.config.sample_size * vae_scale_factor`) gives several rows of views.
            width (`int`, *optional*, defaults to 2048):
                The width in pixels of the generated image: a multiple of the VAE scale factor.
            num_inference_steps (`int`, *optional*, defaults to 50):
                The number of denoising steps.
            timesteps (`list[int]`, *optional*):
                Custom timesteps for schedulers that accept them.
            guidance_scale (`float`, *optional*, defaults to 7.5):
                Classifier-free guidance scale; guidance is enabled when `guidance_scale > 1`.
            view_batch_size (`int` or `"auto"`, *optional*, defaults to 1):
                How many views are denoised, and synchronized, in one batch. Larger is faster on a GPU (one 64x64
                window per UNet call leaves it mostly idle) and uses more memory; the result is the same. `"auto"`
                sizes the denoising batches and, separately, the synchronization's gradient pass to the free GPU
                memory (see `auto_view_batch_sizes`), turning on gradient checkpointing if one view's gradient pass
                would not fit.
            negative_prompt (`str` or `list[str]`, *optional*):
                The prompt or prompts not to guide the image generation. Ignored without guidance.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                The number of images to generate per prompt. Each image is synchronized to its own anchor.
            eta (`float`, *optional*, defaults to 0.0):
                DDIM's eta; ignored by other schedulers.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                A generator to make generation deterministic.
            latents (`torch.Tensor`, *optional*):
                Pre-generated noisy latents of shape `(batch, 4, height / 8, width / 8)`.
            prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated text embeddings, instead of `prompt`.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated negative text embeddings, instead of `negative_prompt`.
            ip_adapter_image: (`PipelineImageInput`, *optional*):
                Optional image input to work with IP Adapters.
            ip_adapter_image_embeds (`list[torch.Tensor]`, *optional*):
                Pre-generated image embeddings for IP-Adapter, one tensor per adapter, with the negative embeddings
                first when guidance is on (as `prepare_ip_adapter_image_embeds` returns them).
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`~pipelines.stable_diffusion.StableDiffusionPipelineOutput`] or a tuple.
            cross_attention_kwargs (`dict`, *optional*):
                Keyword arguments passed to the attention processors.
            guidance_rescale (`float`, *optional*, defaults to 0.0):
                Guidance rescale factor from [Common Diffusion Noise Schedules and Sample Steps are
                Flawed](https://huggingface.co/papers/2305.08891); applied when guidance is on.
            circular_padding (`bool`, *optional*, defaults to `False`):
                Whether views wrap around the right edge, for a 360-degree panorama whose left and right edges meet
                without a seam. Works with several rows.
            clip_skip (`int`, *optional*):
                Number of layers to be skipped from CLIP while computing the prompt embeddings.
            callback_on_step_end (`Callable`, *optional*):
                Called at the end of each step as `callback_on_step_end(self, step, timestep, callback_kwargs)`; it
                may return replacements for the tensors in `callback_kwargs`.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["latents"]`):
                Tensors passed to `callback_on_step_end`: any of `latents`, `prompt_embeds`, `negative_prompt_embeds`.
            stride (`int`, *optional*, defaults to 8):
                Distance between neighbouring views, in latent pixels (1 to the view size). The paper used 16;
                smaller strides mean more views and more overlap.
            sync_weight (`float`, *optional*, defaults to 20.0):
                Step size `w` of the synchronization gradient descent. `0` turns synchronization off
                (MultiDiffusion).
            sync_decay_rate (`float`, *optional*, defaults to 0.95):
                The weight at step `i` is `sync_weight * sync_decay_rate ** i`. In (0, 1].
            sync_freq (`int`, *optional*, defaults to 1):
                Synchronize every `sync_freq`-th step.
            sync_thres (`int`, *optional*, defaults to 5):
                Synchronize only the first `sync_thres` steps (the layout is set early). The authors' sample script
                used 10.
            sync_mode (`str`, *optional*, defaults to `"exact"`):
                `"exact"` is the paper's algorithm. `"fast"` sets `sync_gradient="x0"` and `sync_reuse_noise=True`
                unless those are given: a synchronized step then costs as many UNet passes as a MultiDiffusion step.
            sync_gradient (`str`, *optional*):
                `"unet"` (exact) backpropagates through the UNet; `"x0"` treats the noise prediction as constant, so
                `d x0 / d z_t` is a per-step scale and no UNet backward runs. Defaults from `sync_mode`.
            sync_reuse_noise (`bool`, *optional*):
                Whether a view's denoising step reuses the noise predicted before its synchronization update instead
                of predicting it again from the updated latent. Defaults from `sync_mode`.
            sync_decoder (*optional*):
                A decoder with `decode` (e.g. [`AutoencoderTiny`], TAESD) that makes the images the loss compares,
                instead of the full VAE. The final image is always decoded by the VAE.
            sync_lpips_size (`int`, *optional*):
                Resize the compared images so their longer side is this many pixels before LPIPS.
            sync_gradient_checkpointing (`bool`, *optional*, defaults to `False`):
                Recompute UNet and VAE-decoder activations in the gradient pass instead of storing them: lower peak
                memory, one more forward of each per synchronized view, the same result.
            sync_decode_downsample (`int`, *optional*, defaults to 1):
                Average-pool the predicted clean latents by this factor before decoding the images the loss
                compares (2: a 256x256 image for a 512x512 view). Decoder and LPIPS cost fall by its square; the
                loss then sees layout and colour at lower resolution rather than fine texture. Not in the paper.
            region_prompts (`list[str]`, *optional*):
                Prompts for regions of the panorama (MultiDiffusion's region-based generation), one per mask in
                `region_masks`; `prompt` is the background's. Each view denoises every prompt present in it, and each
                prompt adds its result weighted by its mask; the background weighs `max(1 - sum of the masks, 0)`.
                Synchronization compares each view's mask-weighted clean image with the anchor view's.
            region_masks (`list`, *optional*):
                One mask per region prompt, the panorama's size in pixels: PIL images (white = the region), arrays or
                tensors of values in [0, 1]; soft edges are allowed. Averaged over the VAE's pixel blocks.
            region_negative_prompts (`list[str | None]`, *optional*):
                A negative prompt per region prompt; `None` (the default) takes `negative_prompt`.
            region_bootstrap_steps (`int`, *optional*):
                MultiDiffusion's bootstrapping: during the first this many steps a region's latent outside its mask
                is replaced by a noised constant-colour background, drawn from a generator seeded from `generator`'s
                state (its first one, if a list) without consuming it, which keeps each region's content inside its
                mask. Defaults to `round(0.4 *
                num_inference_steps)` (20 of 50, as MultiDiffusion's `region_based.py`); 0 turns it off.
            image (`PipelineImageInput`, *optional*):
                One image of the panorama's size (`height x width` pixels; PIL, array or tensor as diffusers' image
                processor takes it) to start from: image-to-image without `mask_image`, as
                `StableDiffusionImg2ImgPipeline`; inpainting or outpainting with it, as `StableDiffusionInpaintPipeline`.
                Every prompt's images start from it.
            mask_image (`PipelineImageInput`, *optional*):
                White where the panorama is generated, black where `image` is kept; soft values blend. An ordinary
                UNet gets the kept region back after every step, noised to the next one; an inpainting UNet (9 input
                channels) sees the mask and the masked image instead. Needs `image`.
            strength (`float`, *optional*):
                How far `image` is noised before denoising, in (0, 1]: the share of the steps that run. Defaults to
                0.8 without `mask_image` and 1.0 with it (the two diffusers pipelines' defaults).
            sync_anchor (`str` or `int`, *optional*):
                The view every other is synchronized to: `"center"` (the middle view, the paper's), `"image"` (the
                view that keeps most of `image` under `mask_image`, so every view is pulled toward the photo's look),
                or a view index (`get_views` order). Defaults to `"image"` with a mask, else `"center"`.

        Examples:

        Returns:
            [`~pipelines.stable_diffusion.StableDiffusionPipelineOutput`] or `tuple`:
                The generated images and, per image, whether the safety checker flagged it (`None` without one).
        """

        callback, callback_steps = self.take_deprecated_callback(kwargs)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height and width to the UNet's window
        window = self.unet.config.sample_size * self.vae_scale_factor
        height = window if height is None else height
        width = window if width is None else width

        # 1. Check inputs
        self.check_inputs(
            prompt,
            height,
            width,
            callback_steps,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            ip_adapter_image,
            ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs,
            num_inference_steps=num_inference_steps if timesteps is None else len(timesteps),
            num_images_per_prompt=num_images_per_prompt,
            latents=latents,
            guidance_rescale=guidance_rescale,
            stride=stride,
            view_batch_size=view_batch_size,
            sync_weight=sync_weight,
            sync_decay_rate=sync_decay_rate,
            sync_freq=sync_freq,
            sync_thres=sync_thres,
            sync_mode=sync_mode,
            sync_gradient=sync_gradient,
            sync_reuse_noise=sync_reuse_noise,
            sync_decoder=sync_decoder,
            sync_lpips_size=sync_lpips_size,
            sync_decode_downsample=sync_decode_downsample,
            sync_gradient_checkpointing=sync_gradient_checkpointing,
            region_prompts=region_prompts,
            region_masks=region_masks,
            region_negative_prompts=region_negative_prompts,
            region_bootstrap_steps=region_bootstrap_steps,
            image=image,
            mask_image=mask_image,
            strength=strength,
            sync_anchor=sync_anchor,
            circular_padding=circular_padding,
        )
        if callback is not None and callback_steps is None:
            callback_steps = 1

        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        # 2. Define call parameters
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        num_images = batch_size * num_images_per_prompt
        device = self._execution_device

        # 3. Encode input prompt (and IP-Adapter image)
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        region_tensors = []  # the conditioning tensors of each region prompt, for every image
        for region_prompt, region_negative_prompt in zip(
            region_prompts or [], region_negative_prompts or [None] * len(region_prompts or [])
        ):
            embeds, negative_embeds = self.encode_prompt(
                [region_prompt] * batch_size,
                device,
                num_images_per_prompt,
                self.do_classifier_free_guidance and region_negative_prompt is not None,
                None if region_negative_prompt is None else [region_negative_prompt] * batch_size,
                lora_scale=lora_scale,
                clip_skip=clip_skip,
            )
            if region_negative_prompt is None:  # the call's own negative
                negative_embeds = negative_prompt_embeds
            region_tensors.append({"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds})
        image_embeds = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, num_images, self.do_classifier_free_guidance
            )

        # 4. Prepare timesteps (from `strength` on, with an image)
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps)
        if image is not None:
            strength = (0.8 if mask_image is None else 1.0) if strength is None else strength
            timesteps, num_inference_steps = self.get_timesteps(num_inference_steps, strength, device)

        # 5. Prepare latent variables: noise, or the image noised to the first step
        kept = None
        if image is None:
            latents = self.prepare_latents(
                num_images,
                self.vae.config.latent_channels,
                height,
                width,
                prompt_embeds.dtype,
                device,
                generator,
                latents,
            )
        else:
            latents, kept = self.prepare_image_latents(
                image,
                mask_image,
                strength,
                timesteps,
                batch_size,
                num_images_per_prompt,
                prompt_embeds.dtype,
                device,
                generator,
                latents,
            )
        inpainting_input = None if kept is None else kept["inpainting_input"]

        # 6. Views and their batches; the synchronization's settings
        views = self.get_views(height, width, stride=stride, circular_padding=circular_padding)
        sync = SyncSettings.from_arguments(
            sync_mode,
            sync_gradient,
            sync_reuse_noise,
            weight=sync_weight,
            decay_rate=sync_decay_rate,
            freq=sync_freq,
            thres=sync_thres,
            decoder=sync_decoder,
            lpips_size=sync_lpips_size,
            decode_downsample=sync_decode_downsample,
            checkpointing=sync_gradient_checkpointing,
        )

        # 7. Extra step kwargs and the UNet's conditioning, the regions', the view batches
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(num_images)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)
        conditioning_tensors = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
        conditioning = self._conditioning(
            **conditioning_tensors,
            image_embeds=image_embeds,
            timestep_cond=timestep_cond,
            num_images=num_images,
            inpainting_input=inpainting_input,
        )
        regions = None
        if region_prompts is not None:
            region_conditionings = [
                self._conditioning(
                    **region,
                    image_embeds=image_embeds,
                    timestep_cond=timestep_cond,
                    num_images=num_images,
                    inpainting_input=inpainting_input,
                )
                for region in region_tensors
            ]
            regions = self.prepare_regions(
                region_conditionings,
                region_masks,
                region_bootstrap_steps,
                views,
                latents,
                num_inference_steps,
                generator,
            )
        view_batch_size, sync = self.view_batch_sizes(
            view_batch_size, len(views), num_images, device, latents.dtype, sync, regions
        )
        keep = None if kept is None else 1 - kept["mask"][:1]
        default_anchor = "center" if kept is None else "image"
        anchor_index = anchor_view_index(views, default_anchor if sync_anchor is None else sync_anchor, keep)
        panorama = self.prepare_panorama(latents, views, view_batch_size, regions, anchor_index)

        # 8. Denoising loop: MultiDiffusion over the views, with SyncDiffusion's update in the early steps
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue

                latents = self.denoise_step(latents, t, panorama, conditioning, sync, extra_step_kwargs)
                if kept is not None and not self.inpainting_channels:
                    latents = self.keep_image(latents, kept, timesteps, i)

                if callback_on_step_end is not None:
                    guided = self.do_classifier_free_guidance
                    tensors, replaced = self.run_step_end_callback(
                        callback_on_step_end,
                        callback_on_step_end_tensor_inputs,
                        i,
                        t,
                        {"latents": latents, **conditioning_tensors},
                    )
                    latents = tensors.pop("latents")
                    if replaced or guided != self.do_classifier_free_guidance:
                        conditioning_tensors = tensors
                        conditioning = self._conditioning(
                            **tensors,
                            image_embeds=image_embeds,
                            timestep_cond=timestep_cond,
                            num_images=num_images,
                            inpainting_input=inpainting_input,
                        )
                        if regions is not None:
                            regions.conditionings = [
                                self._conditioning(
                                    **region,
                                    image_embeds=image_embeds,
                                    timestep_cond=timestep_cond,
                                    num_images=num_images,
                                    inpainting_input=inpainting_input,
                                )
                                for region in region_tensors
                            ]

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
                    if callback is not None and i % callback_steps == 0:
                        step_idx = i // getattr(self.scheduler, "order", 1)
                        callback(step_idx, t, latents)

        # 9. Decode
        if output_type != "latent":
            if circular_padding:
                image = self.decode_latents_with_padding(latents)
            else:
                image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
        else:
            image = latents
            has_nsfw_concept = None

        if has_nsfw_concept is None:
            do_denormalize = [True] * image.shape[0]
        else:
            do_denormalize = [not has_nsfw for has_nsfw in has_nsfw_concept]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

        self.maybe_free_model_hooks()

        if not return_dict:
            return (image, has_nsfw_concept)
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)
