"""Every pipeline class on tiny random components, so that one contract test runs for all of them.

`KINDS` holds one `PipelineKind` per class: how to build it (SD: `make_components("tiny", sample_size=8)`; SDXL:
`make_sdxl_components`; ControlNet: the SD components plus `make_tiny_controlnet(unet)`; FLUX.1, FLUX.2 [klein] and
Z-Image: `make_flux_components("tiny")`, `make_flux2_klein_components("tiny")`, `make_z_image_components("tiny")`),
how to call it (the ControlNet class with a condition `image` of the panorama's size; the transformer classes with a
64-pixel `window_size`) and what differs between the classes (the denoiser, guidance rows and calls, latent layout,
schedulers, half precision). Views are 64x64 pixels (8 latents); `SMALL` is a 64x128-pixel panorama, 3 views
at stride 4. Only public API is used: `__call__`, components, `denoiser`, `denoising_models`,
`set_perceptual_loss`, `scheduler`.
"""

import copy
from dataclasses import dataclass, field

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.callbacks import SDCFGCutoffCallback, SDXLCFGCutoffCallback
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from pipeline_syncdiffusion import SyncDiffusionPipeline
from pipeline_syncdiffusion_controlnet import SyncDiffusionControlNetPipeline
from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline
from pipeline_syncdiffusion_flux2 import SyncDiffusionFlux2KleinPipeline
from pipeline_syncdiffusion_xl import SyncDiffusionXLPipeline
from pipeline_syncdiffusion_z_image import SyncDiffusionZImagePipeline
from syncdiffusion_utils.testing import (
    make_components,
    make_flux2_klein_components,
    make_flux_components,
    make_sdxl_components,
    make_tiny_controlnet,
    make_z_image_components,
)
from tests.flux2_reference import normalized_latents, vae_latents
from tests.flux_reference import pack, unpack


PROMPT = "a photo of a forest"
# 64x128 pixels: 8x16 latents, 8-latent views at stride 4 -> 3 views (columns 0, 4, 8), the middle one the anchor.
SMALL = {"height": 64, "width": 128, "stride": 4, "num_inference_steps": 2, "output_type": "latent"}
NUM_VIEWS = 3

# Schedulers of the classes with a UNet (epsilon prediction): synchronized runs, the refused family, stochastic ones
# (name: class, scheduler options, call options).
UNET_SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
}
UNET_REFUSED_SCHEDULERS = {"flow_match_euler": (FlowMatchEulerDiscreteScheduler, {})}
UNET_STOCHASTIC_SCHEDULERS = {
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}, {}),
    "ddim_eta": (DDIMScheduler, {}, {"eta": 0.5}),
}
UNET_STEP_NOISE_SCHEDULERS = {"ddpm": (DDPMScheduler, {}), "euler_ancestral": (EulerAncestralDiscreteScheduler, {})}

# FLUX: flow matching only. `stochastic_sampling` (diffusers >= 0.32) re-noises every step, z' = (1 - s') x0 + s' eps.
FLUX_SCHEDULERS = {
    "flow_match_euler": (FlowMatchEulerDiscreteScheduler, {}),
    "flow_match_euler_schnell": (FlowMatchEulerDiscreteScheduler, {"shift": 1.0, "use_dynamic_shifting": False}),
    "flow_match_euler_stochastic": (FlowMatchEulerDiscreteScheduler, {"stochastic_sampling": True}),
}
FLUX_REFUSED_SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),  # variance-preserving
    "euler": (EulerDiscreteScheduler, {}),  # sigma-scaled
}
FLUX_STOCHASTIC_SCHEDULERS = {
    "flow_match_euler_stochastic": (FlowMatchEulerDiscreteScheduler, {"stochastic_sampling": True}, {}),
}
FLUX_STEP_NOISE_SCHEDULERS = {
    "flow_match_euler_stochastic": (FlowMatchEulerDiscreteScheduler, {"stochastic_sampling": True}),
}

# The transformer classes' tiny components, which do not depend on the window (a call argument).
TRANSFORMER_COMPONENTS = {
    SyncDiffusionFluxPipeline: lambda: make_flux_components("tiny"),
    SyncDiffusionFlux2KleinPipeline: lambda: make_flux2_klein_components("tiny"),
    SyncDiffusionZImagePipeline: lambda: make_z_image_components("tiny"),
}


def condition_image(height, width, seed=0):
    """A random ControlNet condition, `(1, 3, height, width)` in [0, 1]."""
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class PipelineKind:
    """One pipeline class: how to build it on tiny components, how to call it on a small panorama, and what the
    contract expects of it where the classes differ."""

    name: str
    pipeline_class: type
    # The documented `__call__` defaults in which this class differs from `SyncDiffusionPipeline`.
    own_defaults: dict = field(default_factory=dict)
    # diffusers' classifier-free-guidance cutoff callback for this family (a `PipelineCallback`); None: no CFG.
    cfg_cutoff_callback: type | None = SDCFGCutoffCallback
    # Whether `__call__` takes a ControlNet condition `image` (of the panorama's size).
    conditioned: bool = False
    # The denoiser's component name: also the exact `sync_gradient` value and `syncdiffusion_utils.counting`'s key.
    denoiser: str = "unet"
    # Denoiser rows per view and image: classifier-free guidance's `[uncond, cond]`; FLUX's guidance is an embedding.
    guidance_rows: int = 2
    # Denoiser calls per view pass: FLUX.2 [klein] runs its guidance's positive and negative rows as two calls (as
    # Flux2KleinPipeline does), the others in one batch.
    guidance_calls: int = 1
    latent_channels: int = 4
    # Whether `output_type="latent"` (and `callback_on_step_end`) give FLUX's packed `(B, h/2 * w/2, 4C)` latents.
    packed_latents: bool = False
    # Whether `output_type="latent"` is the VAE's latent `(B, C, h, w)` (FLUX.2 [klein]: the transformer's 2x2 patches
    # denormalized by the VAE's batch norm, as Flux2KleinPipeline returns it) while callbacks see the transformer's
    # packed, normalized latent `(B, h/2 * w/2, 4C)`.
    vae_output_latents: bool = False
    # The dtype of `output_type="latent"` in a bfloat16 pipeline (Z-Image keeps its latents in float32).
    bfloat16_latents_dtype: torch.dtype = torch.bfloat16
    # Whether the denoiser returns a list of per-image outputs (Z-Image's transformer).
    denoiser_returns_list: bool = False
    # The real model's window in latents and the documented default stride for it.
    real_window: int = 64
    real_default_stride: int = 8
    # Arguments every call of this class gets (FLUX: the 64-pixel window instead of 1024, a short T5 sequence).
    call_options: dict = field(default_factory=dict)
    # name: (class, options) of schedulers that run synchronized, and of those refused with a ValueError.
    schedulers: dict = field(default_factory=lambda: UNET_SCHEDULERS)
    refused_schedulers: dict = field(default_factory=lambda: UNET_REFUSED_SCHEDULERS)
    # name: (class, scheduler options, call options) of schedulers that draw step noise from the generator.
    stochastic_schedulers: dict = field(default_factory=lambda: UNET_STOCHASTIC_SCHEDULERS)
    step_noise_schedulers: dict = field(default_factory=lambda: UNET_STEP_NOISE_SCHEDULERS)
    # Whether float16 applies (its loss scaling is tested); the transformer classes run in bfloat16.
    float16: bool = True
    # Arguments refused by this class only (a ValueError naming the argument), on top of the common ones.
    own_bad_inputs: tuple = ()

    @property
    def exact_gradient(self) -> str:
        """`sync_gradient`'s value for the exact gradient: through this class's denoiser."""
        return self.denoiser

    def build(self, components_cache, lpips_module, sample_size=8):
        """A fresh pipeline on copies of session-built components (tests may change them freely). `sample_size` is
        the UNet's (the transformer classes' window is a call argument)."""
        components = copy.deepcopy(self.components(components_cache, sample_size))
        if self.pipeline_class is SyncDiffusionXLPipeline:
            pipe = SyncDiffusionXLPipeline(**components, add_watermarker=False)
        elif self.pipeline_class in TRANSFORMER_COMPONENTS:
            pipe = self.pipeline_class(**components)
        else:
            pipe = self.pipeline_class(
                **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
        pipe.set_perceptual_loss(lpips_module)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def components(self, cache, sample_size):
        if self.pipeline_class in TRANSFORMER_COMPONENTS:
            sample_size = None  # the tiny transformer components do not depend on the window
        key = (self.name, sample_size)
        if key not in cache:
            if self.pipeline_class is SyncDiffusionXLPipeline:
                cache[key] = make_sdxl_components("tiny", sample_size=sample_size)
            elif self.pipeline_class in TRANSFORMER_COMPONENTS:
                cache[key] = TRANSFORMER_COMPONENTS[self.pipeline_class]()
            else:
                cache[key] = make_components("tiny", sample_size=sample_size)
                if self.conditioned:
                    cache[key]["controlnet"] = make_tiny_controlnet(cache[key]["unet"])
        return cache[key]

    def call_arguments(self, **kwargs):
        """`SMALL` and `call_options` with `kwargs` over them, a seeded generator, and for the ControlNet class a
        condition image of the panorama's size (unless `image` is given; rounded up to a valid image size, so that a
        bad `height` or `width` is the only bad input)."""
        call = {"prompt": PROMPT, **SMALL, **self.call_options, **kwargs}
        call.setdefault("generator", torch.Generator().manual_seed(0))
        if self.conditioned and "image" not in call:
            height, width = (max(8, -(-size // 8) * 8) for size in (call.get("height", 64), call.get("width", 128)))
            call["image"] = condition_image(height, width)
        return call

    def __call__(self, pipe, **kwargs):
        """The pipeline's output for `call_arguments(**kwargs)`."""
        return pipe(**self.call_arguments(**kwargs))

    def images(self, pipe, **kwargs):
        return self(pipe, **kwargs).images

    def latent_shape(self, num_images, height, width):
        """The shape of `output_type="latent"` for `num_images` panoramas of `height x width` pixels."""
        if self.packed_latents:
            return (num_images, (height // 16) * (width // 16), 4 * self.latent_channels)
        return (num_images, self.latent_channels, height // 8, width // 8)

    def callback_latent_shape(self, num_images, height, width):
        """The shape of the latents callbacks get (and may replace) for `num_images` `height x width` panoramas."""
        if self.vae_output_latents:
            return (num_images, (height // 16) * (width // 16), 4 * self.latent_channels)
        return self.latent_shape(num_images, height, width)

    def output_latents(self, pipe, callback_latents, height, width):
        """What `output_type="latent"` returns for the latents a callback got or returned at the last step: the same
        tensor, or for FLUX.2 [klein] the VAE's latent of the packed normalized one."""
        if self.vae_output_latents:
            return vae_latents(pipe.vae, unpack(callback_latents, height // 8, width // 8))
        return callback_latents

    def callback_latents(self, pipe, output_latents, height, width):
        """The inverse of `output_latents`."""
        if self.vae_output_latents:
            return pack(normalized_latents(pipe.vae, output_latents))
        return output_latents

    def denoiser_latents(self, pipe, latents, height, width):
        """`output_type="latent"`'s latents as the denoiser's latent `(B, C, height / 8, width / 8)`: FLUX's unpacked,
        FLUX.2 [klein]'s normalized again."""
        if self.packed_latents:
            return unpack(latents, height // 8, width // 8)
        if self.vae_output_latents:
            return normalized_latents(pipe.vae, latents)
        return latents


# The transformer classes' own rules, refused with a ValueError naming the argument.
TRANSFORMER_BAD_INPUTS = (
    ({"sync_gradient": "unet"}, "sync_gradient"),
    ({"height": 72}, "height"),  # a multiple of 8, not of 16: views pack into 2x2 patches
    ({"width": 136}, "width"),
    ({"stride": 3}, "stride"),  # odd: the views' patches would not be the panorama's
    ({"window_size": 72}, "window_size"),
)

KINDS = {
    "sd": PipelineKind(
        "sd", SyncDiffusionPipeline, own_bad_inputs=(({"sync_gradient": "transformer"}, "sync_gradient"),)
    ),
    "sdxl": PipelineKind(
        "sdxl",
        SyncDiffusionXLPipeline,
        own_defaults={"height": 1024, "width": 4096, "guidance_scale": 5.0},
        cfg_cutoff_callback=SDXLCFGCutoffCallback,
        real_window=128,
        real_default_stride=16,
        own_bad_inputs=(({"sync_gradient": "transformer"}, "sync_gradient"),),
    ),
    "controlnet": PipelineKind(
        "controlnet",
        SyncDiffusionControlNetPipeline,
        # The panorama's size defaults to the condition image's.
        own_defaults={"height": None, "width": None},
        conditioned=True,
        own_bad_inputs=(({"sync_gradient": "transformer"}, "sync_gradient"),),
    ),
    "flux": PipelineKind(
        "flux",
        SyncDiffusionFluxPipeline,
        # FluxPipeline's steps and guidance embedding (FLUX.1-dev); a 4:1 panorama of 1024-pixel windows.
        own_defaults={"height": 1024, "width": 4096, "num_inference_steps": 28, "guidance_scale": 3.5},
        cfg_cutoff_callback=None,
        denoiser="transformer",
        guidance_rows=1,
        latent_channels=16,
        packed_latents=True,
        # The 1024-pixel window, and its default stride: a quarter of it (even, for FLUX's 2x2 patches).
        real_window=128,
        real_default_stride=32,
        call_options={"window_size": 64, "max_sequence_length": 32},
        schedulers=FLUX_SCHEDULERS,
        refused_schedulers=FLUX_REFUSED_SCHEDULERS,
        stochastic_schedulers=FLUX_STOCHASTIC_SCHEDULERS,
        step_noise_schedulers=FLUX_STEP_NOISE_SCHEDULERS,
        float16=False,
        own_bad_inputs=TRANSFORMER_BAD_INPUTS,
    ),
    "flux2": PipelineKind(
        "flux2",
        SyncDiffusionFlux2KleinPipeline,
        # Flux2KleinPipeline's guidance (a base model's real classifier-free guidance); a 4:1 panorama of 1024-pixel
        # windows. Its 50 steps are SD's.
        own_defaults={"height": 1024, "width": 4096, "guidance_scale": 4.0},
        # Flux2KleinPipeline reads its guidance scale every step: SD's cutoff callback turns its guidance off (its
        # slice of SD's `[uncond, cond]` embeddings keeps one image's).
        cfg_cutoff_callback=SDCFGCutoffCallback,
        denoiser="transformer",
        # Its guidance (4.0 > 1, not step-distilled): a positive and a negative transformer call per view, one row each.
        guidance_rows=2,
        guidance_calls=2,
        latent_channels=32,
        vae_output_latents=True,
        real_window=128,
        real_default_stride=32,
        call_options={"window_size": 64, "max_sequence_length": 32},
        schedulers=FLUX_SCHEDULERS,
        refused_schedulers=FLUX_REFUSED_SCHEDULERS,
        stochastic_schedulers=FLUX_STOCHASTIC_SCHEDULERS,
        step_noise_schedulers=FLUX_STEP_NOISE_SCHEDULERS,
        float16=False,
        own_bad_inputs=TRANSFORMER_BAD_INPUTS
        + (
            ({"image": "reference.png"}, "image"),  # reference images are PIL images
            ({"guidance_scale": -1.0}, "guidance_scale"),
        ),
    ),
    "z_image": PipelineKind(
        "z_image",
        SyncDiffusionZImagePipeline,
        # ZImagePipeline's guidance; a 4:1 panorama of 1024-pixel windows. Its 50 steps are SD's.
        own_defaults={"height": 1024, "width": 4096, "guidance_scale": 5.0},
        # ZImagePipeline reads its guidance scale every step: SD's cutoff callback turns its guidance off (its slice
        # of SD's `[uncond, cond]` embeddings keeps one image's).
        cfg_cutoff_callback=SDCFGCutoffCallback,
        denoiser="transformer",
        latent_channels=16,
        bfloat16_latents_dtype=torch.float32,
        denoiser_returns_list=True,
        real_window=128,
        real_default_stride=32,
        call_options={"window_size": 64},
        schedulers=FLUX_SCHEDULERS,
        refused_schedulers=FLUX_REFUSED_SCHEDULERS,
        stochastic_schedulers=FLUX_STOCHASTIC_SCHEDULERS,
        step_noise_schedulers=FLUX_STEP_NOISE_SCHEDULERS,
        float16=False,
        own_bad_inputs=TRANSFORMER_BAD_INPUTS
        + (
            ({"cfg_truncation": "late"}, "cfg_truncation"),
            ({"cfg_normalization": -1.0}, "cfg_normalization"),
            ({"guidance_scale": -1.0}, "guidance_scale"),
        ),
    ),
}
# The classes with a UNet (SD, SDXL, ControlNet): epsilon-prediction schedulers, float16, 4-channel latents.
UNET_KINDS = {name: kind for name, kind in KINDS.items() if kind.denoiser == "unet"}


def denoisers(pipe):
    """The models that run once per view and step: the UNet (and the ControlNets where there are), or the
    transformer."""
    return list(pipe.denoising_models)


def pipeline_models(pipe):
    """Every model of the pipeline."""
    names = ("unet", "transformer", "controlnet", "vae", "text_encoder", "text_encoder_2")
    return [getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None]


def model_input(args, kwargs):
    """The batch a model call runs on: the first tensor passed (FLUX's transformers take `hidden_states` first,
    Z-Image's its images' latents, stacked)."""
    named = kwargs.get("hidden_states", kwargs.get("sample"))
    if isinstance(named, torch.Tensor):
        return named
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def record_forwards(monkeypatch, module, record=None):
    """Wrap `module.forward` so that each call appends its batch size to `record` (returned)."""
    record = [] if record is None else record
    original = module.forward

    def forward(*args, **kwargs):
        record.append(model_input(args, kwargs).shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "forward", forward)
    return record


def zero_prediction_denoiser(monkeypatch, pipe, kind):
    """Make the denoiser predict zeros (and run nothing): zero noise for a UNet, zero velocity for a transformer, so
    the scheduler's own step noise is all that changes the latents. A list of per-image zeros where the denoiser
    returns one."""
    denoiser = pipe.denoiser
    output_class = (
        Transformer2DModelOutput if denoiser is getattr(pipe, "transformer", None) else UNet2DConditionOutput
    )

    def forward(*args, return_dict=True, **kwargs):
        zeros = torch.zeros_like(model_input(args, kwargs))
        zeros = list(zeros.unbind(0)) if kind.denoiser_returns_list else zeros
        return output_class(sample=zeros) if return_dict else (zeros,)

    monkeypatch.setattr(denoiser, "forward", forward)


def zeros_like_prompt_embeds(prompt_embeds):
    """Zero prompt embeddings of the form a callback got: a tensor, or Z-Image's list of one `(tokens, dim)` tensor
    per image."""
    if isinstance(prompt_embeds, list):
        return [torch.zeros_like(embeds) for embeds in prompt_embeds]
    return torch.zeros_like(prompt_embeds)


class NonCheckpointableDecoder(torch.nn.Module):
    """A working `sync_decoder` (1x1 convolution, 8x upsampling) that does not support gradient checkpointing."""

    _supports_gradient_checkpointing = False

    def __init__(self, latent_channels=4):
        super().__init__()
        self.conv = torch.nn.Conv2d(latent_channels, 3, 1)
        self.config = type("Config", (), {"scaling_factor": 1.0})()

    @property
    def dtype(self):
        return self.conv.weight.dtype

    @property
    def device(self):
        return self.conv.weight.device

    def decode(self, latents, return_dict=True):
        image = torch.nn.functional.interpolate(self.conv(latents), scale_factor=8)
        return (image,) if not return_dict else type("DecoderOutput", (), {"sample": image})()
