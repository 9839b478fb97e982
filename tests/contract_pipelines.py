"""Every pipeline class on tiny random components, so that one contract test runs for all of them.

`KINDS` holds one `PipelineKind` per class: how to build it (SD: `make_components("tiny", sample_size=8)`; SDXL:
`make_sdxl_components`; ControlNet: the SD components plus `make_tiny_controlnet(unet)`) and how to call it (the
ControlNet class with a condition `image` of the panorama's size). Views are 64x64 pixels (8 latents); `SMALL` is a
64x128-pixel panorama, 3 views at stride 4. Only public API is used: `__call__`, components,
`set_perceptual_loss`, `scheduler`.
"""

import copy
from dataclasses import dataclass, field

import torch
from diffusers.callbacks import SDCFGCutoffCallback, SDXLCFGCutoffCallback
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from pipeline_syncdiffusion import SyncDiffusionPipeline
from pipeline_syncdiffusion_controlnet import SyncDiffusionControlNetPipeline
from pipeline_syncdiffusion_xl import SyncDiffusionXLPipeline
from syncdiffusion_utils.testing import make_components, make_sdxl_components, make_tiny_controlnet


PROMPT = "a photo of a forest"
# 64x128 pixels: 8x16 latents, 8-latent views at stride 4 -> 3 views (columns 0, 4, 8), the middle one the anchor.
SMALL = {"height": 64, "width": 128, "stride": 4, "num_inference_steps": 2, "output_type": "latent"}
NUM_VIEWS = 3


def condition_image(height, width, seed=0):
    """A random ControlNet condition, `(1, 3, height, width)` in [0, 1]."""
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class PipelineKind:
    """One pipeline class: how to build it on tiny components and how to call it on a small panorama."""

    name: str
    pipeline_class: type
    # The documented `__call__` defaults in which this class differs from `SyncDiffusionPipeline`.
    own_defaults: dict = field(default_factory=dict)
    # diffusers' classifier-free-guidance cutoff callback for this family (a `PipelineCallback`).
    cfg_cutoff_callback: type = SDCFGCutoffCallback
    # Whether `__call__` takes a ControlNet condition `image` (of the panorama's size).
    conditioned: bool = False

    def build(self, components_cache, lpips_module, sample_size=8):
        """A fresh pipeline on copies of session-built components (tests may change them freely)."""
        components = copy.deepcopy(self.components(components_cache, sample_size))
        if self.pipeline_class is SyncDiffusionXLPipeline:
            pipe = SyncDiffusionXLPipeline(**components, add_watermarker=False)
        else:
            pipe = self.pipeline_class(
                **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
        pipe.set_perceptual_loss(lpips_module)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def components(self, cache, sample_size):
        key = (self.name, sample_size)
        if key not in cache:
            if self.pipeline_class is SyncDiffusionXLPipeline:
                cache[key] = make_sdxl_components("tiny", sample_size=sample_size)
            else:
                cache[key] = make_components("tiny", sample_size=sample_size)
                if self.conditioned:
                    cache[key]["controlnet"] = make_tiny_controlnet(cache[key]["unet"])
        return cache[key]

    def call_arguments(self, **kwargs):
        """`SMALL` with `kwargs` over it, a seeded generator, and for the ControlNet class a condition image of
        the panorama's size (unless `image` is given; rounded up to a valid image size, so that a bad `height` or
        `width` is the only bad input)."""
        call = {"prompt": PROMPT, **SMALL, **kwargs}
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


KINDS = {
    "sd": PipelineKind("sd", SyncDiffusionPipeline),
    "sdxl": PipelineKind(
        "sdxl",
        SyncDiffusionXLPipeline,
        own_defaults={"height": 1024, "width": 4096, "guidance_scale": 5.0},
        cfg_cutoff_callback=SDXLCFGCutoffCallback,
    ),
    "controlnet": PipelineKind(
        "controlnet",
        SyncDiffusionControlNetPipeline,
        # The panorama's size defaults to the condition image's.
        own_defaults={"height": None, "width": None},
        conditioned=True,
    ),
}
# The real model's window in latents, whose eighth is the documented default stride (SD: 8, SDXL: 16).
REAL_WINDOW = {"sd": 64, "sdxl": 128, "controlnet": 64}


def denoisers(pipe):
    """The models that run once per view and step: the UNet, and the ControlNet where there is one."""
    return [model for model in (pipe.unet, getattr(pipe, "controlnet", None)) if model is not None]


def pipeline_models(pipe):
    """Every model of the pipeline."""
    names = ("unet", "controlnet", "vae", "text_encoder", "text_encoder_2")
    return [getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None]


def first_tensor(args, kwargs):
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def record_forwards(monkeypatch, module, record=None):
    """Wrap `module.forward` so that each call appends its batch size to `record` (returned)."""
    record = [] if record is None else record
    original = module.forward

    def forward(*args, **kwargs):
        record.append(first_tensor(args, kwargs).shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "forward", forward)
    return record


def zero_noise_unet(monkeypatch, unet):
    """Make the UNet predict zero noise (and run nothing): the scheduler's own step noise is all that changes the
    latents."""

    def forward(sample, *args, return_dict=True, **kwargs):
        zeros = torch.zeros_like(sample)
        return UNet2DConditionOutput(sample=zeros) if return_dict else (zeros,)

    monkeypatch.setattr(unet, "forward", forward)


class NonCheckpointableDecoder(torch.nn.Module):
    """A working `sync_decoder` (1x1 convolution, 8x upsampling) that does not support gradient checkpointing."""

    _supports_gradient_checkpointing = False

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 1)
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
