"""Cost, speed and memory of SyncDiffusion's modes against MultiDiffusion, on random-weight models built offline.

    python -m syncdiffusion_utils.benchmark                       # tiny architecture, seconds on a CPU
    python -m syncdiffusion_utils.benchmark --arch sd2 --height 512 --width 1024 --stride 16 \\
        --steps 2 --sync-thres 2 --modes exact,fast,fast+tiny-decoder+lpips256 --json out.json
    python -m syncdiffusion_utils.benchmark --arch sdxl --width-mult 0.25 --modes exact,fast  # SDXL pipeline
    python -m syncdiffusion_utils.benchmark --controlnet     # SyncDiffusionControlNetPipeline, random ControlNet
    python -m syncdiffusion_utils.benchmark --regions 2 --modes multidiffusion,exact  # and each with 2 region prompts
    python -m syncdiffusion_utils.benchmark --arch z-image --width-mult 0.0334 --depth-mult 0.05 --sample-size 8 \
        --height 64 --width 128 --stride 4 --max-sequence-length 16  # Z-Image-Turbo's blocks, 1 head: a CPU run
    python -m syncdiffusion_utils.benchmark --preset flux2-klein-default  # FLUX.2-klein-4B's default panorama (GPU)

Every mode runs in one process on the same prompt, seed and initial latents, MultiDiffusion (`sync_weight=0`)
first, after a warm-up call. For each mode it reports

- wall time of the whole call and its ratio to MultiDiffusion's;
- wall time per step (step 0 starts at the call's first UNet forward, each step ends at `callback_on_step_end`),
  the mean synchronized step's ratio to MultiDiffusion's mean step, and the ratio a whole run would have with
  `--project-steps` steps of which the first `--project-sync-thres` are synchronized (by default the pipeline's
  defaults, 50 and 5), *projected from those per-step figures*: `((P - S) * t_md + S * t_sync) / (P * t_md)`
  (the prompt encoding and final decode, the same in every mode, are left out, so the real ratio is a bit lower);
- passes in view-passes (see `syncdiffusion_utils.counting`), counted with hooks, in the first (synchronized)
  step and in the whole call, and whether they equal the algorithm's formula;
- with `--regions N`, every mode again as `NAME+regions` right after it, with `N` region prompts in boxes side by
  side (the panorama's full height, together the middle `--region-coverage` of its width, 0.5 by default, their
  edges on the VAE's 8-pixel blocks): its passes against the region formula (per step and view, one denoiser pass
  per prompt present in the view, `syncdiffusion_utils.counting.prompts_per_view`), and its cost against the same
  mode without regions ('x plain': wall time of the whole call, one call each in this process, same settings,
  bootstrapping at the pipeline's default); its projection prices the unsynchronized steps at MultiDiffusion's
  with the regions;
- peak memory: on CUDA the peak allocated memory (`torch.cuda.max_memory_allocated`, weights included); on CPU the
  peak growth of the process's resident memory during the mode (sampled every few milliseconds by a thread,
  after handing freed memory back to the OS with `malloc_trim`).

Models have random weights (`syncdiffusion_utils.testing`), LPIPS a random VGG backbone: nothing is downloaded, and
the costs are those of the real architectures. On a CPU, quote ratios, not seconds.
"""

import argparse
import ctypes
import gc
import inspect
import json
import os
import sys
import threading
import time
from contextlib import ExitStack, contextmanager

import torch

from syncdiffusion_utils import compiling
from syncdiffusion_utils.counting import (
    PassCounter,
    StepRecorder,
    expected_plain_step,
    expected_sync_step,
    prompts_per_view,
)


TINY_DECODER_MODE = "fast+tiny-decoder+lpips256"
MODES = {
    "multidiffusion": {"sync_weight": 0.0},
    "exact": {},
    "exact+ckpt": {"sync_gradient_checkpointing": True},
    "x0": {"sync_gradient": "x0"},
    "reuse": {"sync_reuse_noise": True},
    "fast": {"sync_mode": "fast"},
    TINY_DECODER_MODE: {"sync_mode": "fast", "sync_decoder": "tiny", "sync_lpips_size": 256},
    # the loss image rendered from the clean latent pooled 2x: a quarter of the pixels to decode and compare
    "fast+tiny-decoder+downsample2": {"sync_mode": "fast", "sync_decoder": "tiny", "sync_decode_downsample": 2},
}
# diffusers' own StableDiffusionPanoramaPipeline on the same components (MultiDiffusion; its stride is fixed at 8).
PANORAMA_MODE = "panorama-pipeline"
# diffusers' FluxPipeline on the same components at the panorama's full size, unwindowed: what a user would try first.
FLUX_PIPELINE_MODE = "flux-pipeline"
# The same for FLUX.2 [klein] (diffusers' Flux2KleinPipeline) and Z-Image (ZImagePipeline).
FLUX2_KLEIN_PIPELINE_MODE = "flux2-klein-pipeline"
Z_IMAGE_PIPELINE_MODE = "z-image-pipeline"
REFERENCE_PIPELINES = {
    PANORAMA_MODE: "StableDiffusionPanoramaPipeline",
    FLUX_PIPELINE_MODE: "FluxPipeline",
    FLUX2_KLEIN_PIPELINE_MODE: "Flux2KleinPipeline",
    Z_IMAGE_PIPELINE_MODE: "ZImagePipeline",
}
# The reference pipelines that make the whole panorama as one image (no views), and the architecture of each.
FULL_SIZE_PIPELINES = {
    FLUX_PIPELINE_MODE: "flux",
    FLUX2_KLEIN_PIPELINE_MODE: "flux2-klein",
    Z_IMAGE_PIPELINE_MODE: "z-image",
}
# What `--arch flux`, `flux2-klein` and `z-image` run unless `--modes` says otherwise.
TRANSFORMER_MODES = ("multidiffusion", "exact", "exact+ckpt", "fast", TINY_DECODER_MODE)
FLUX_MODES = (*TRANSFORMER_MODES, FLUX_PIPELINE_MODE)
FLUX2_KLEIN_MODES = (*TRANSFORMER_MODES, FLUX2_KLEIN_PIPELINE_MODE)
Z_IMAGE_MODES = (*TRANSFORMER_MODES, Z_IMAGE_PIPELINE_MODE)
ARCH_MODES = {"flux": FLUX_MODES, "flux2-klein": FLUX2_KLEIN_MODES, "z-image": Z_IMAGE_MODES}
REFERENCE_MODE = "multidiffusion"
# A mode ending in this runs after the eager modes, on the pipeline compiled (`syncdiffusion_utils.compiling`).
COMPILED_SUFFIX = "+compiled"
# A mode ending in this (before `+compiled`) runs with the benchmark's region prompts (`--regions N`).
REGIONS_SUFFIX = "+regions"
# The part of the panorama's width the region boxes cover together, by default.
DEFAULT_REGION_COVERAGE = 0.5
# The any-width panorama of the small-card presets.
WIDE = {
    "arch": "sd2",
    "height": 512,
    "width": 8192,
    "stride": 16,
    "steps": 3,
    "sync_thres": 2,
    "dtype": "float16",
    "view_batch_size": "auto",
    "vae_tiling": True,
}
# Whole runs that measure the GPU goals, each one command: `--preset NAME`.
PRESETS = {
    # The command's default panorama: 512x2048, 50 steps, stride 8 (25 views), 5 synchronized steps, fp16.
    "gpu-default": {
        "arch": "sd2",
        "height": 512,
        "width": 2048,
        "stride": 8,
        "steps": 50,
        "sync_thres": 5,
        "dtype": "float16",
        "view_batch_size": "auto",
        "reference": PANORAMA_MODE,
        "modes": [PANORAMA_MODE, "multidiffusion@1", "multidiffusion", "exact", "fast", "fast+tiny-decoder+lpips256"],
        # Two calls of each mode: the first (with `--compile`, its compiling) and the steady state.
        "repeat": 2,
    },
    # Any width on a 6 GB card: 512x8192 (3 steps, 2 synchronized), tiled final decode, on an emulated 6 GiB card.
    "gpu-wide": {**WIDE, "memory_limit_gib": 6, "modes": ["multidiffusion", "exact"]},
    # The same panorama in the fast modes on an emulated 4 GiB card, the text encoder off the GPU after encoding.
    "gpu-wide-fast": {
        **WIDE,
        "memory_limit_gib": 4,
        "offload_text_encoder": True,
        "modes": ["multidiffusion", "fast", TINY_DECODER_MODE],
    },
    # The FLUX panorama's defaults: 1024x4096 (13 views of 1024 pixels at stride 32), 28 steps, 5 synchronized,
    # FLUX.1's real architecture (T5-XXL's encoder included) in bfloat16, beside FluxPipeline at 1024x4096.
    "flux-default": {
        "arch": "flux",
        "height": 1024,
        "width": 4096,
        "stride": 32,
        "steps": 28,
        "sync_thres": 5,
        "dtype": "bfloat16",
        "view_batch_size": "auto",
        "full_text_encoders": True,
        "modes": list(FLUX_MODES),
    },
    # The FLUX.2 [klein] panorama's defaults (SyncDiffusionFlux2KleinPipeline's): 1024x4096 (13 views of 1024
    # pixels at stride 32), 50 steps, 5 synchronized, classifier-free guidance 4.0 (a klein base model: the
    # transformer twice per view), FLUX.2-klein-4B's architecture (Qwen3-4B's text encoder in full) in bfloat16,
    # beside Flux2KleinPipeline at 1024x4096.
    "flux2-klein-default": {
        "arch": "flux2-klein",
        "height": 1024,
        "width": 4096,
        "stride": 32,
        "steps": 50,
        "sync_thres": 5,
        "guidance_scale": 4.0,
        "dtype": "bfloat16",
        "view_batch_size": "auto",
        "full_text_encoders": True,
        "modes": list(FLUX2_KLEIN_MODES),
    },
    # The Z-Image panorama's defaults (SyncDiffusionZImagePipeline's, ZImagePipeline's steps and guidance): 1024x4096
    # (13 views), 50 steps, 5 synchronized, classifier-free guidance 5.0 (a doubled batch), Z-Image-Turbo's
    # architecture (Qwen3-4B in full) in bfloat16, beside ZImagePipeline at 1024x4096.
    "z-image-default": {
        "arch": "z-image",
        "height": 1024,
        "width": 4096,
        "stride": 32,
        "steps": 50,
        "sync_thres": 5,
        "guidance_scale": 5.0,
        "dtype": "bfloat16",
        "view_batch_size": "auto",
        "full_text_encoders": True,
        "modes": list(Z_IMAGE_MODES),
    },
}
PASS_KEYS = ("unet_fwd", "unet_bwd", "dec_fwd", "dec_bwd", "lpips_fwd")
# The same for a pipeline whose denoiser is a transformer (FLUX).
TRANSFORMER_PASS_KEYS = ("transformer_fwd", "transformer_bwd", "dec_fwd", "dec_bwd", "lpips_fwd")
DENOISER_LABELS = {"unet": "UNet", "transformer": "transformer"}
DENOISER_COLUMNS = {"unet": "unet", "transformer": "tr"}
CONTROLNET_KEYS = ("controlnet_fwd", "controlnet_bwd")
CHECKED_KEYS = (
    "unet_fwd",
    "unet_recompute",
    "unet_bwd",
    "transformer_fwd",
    "transformer_recompute",
    "transformer_bwd",
    "controlnet_fwd",
    "controlnet_recompute",
    "controlnet_bwd",
    "dec_fwd",
    "dec_bwd",
    "lpips_fwd",
    "lpips_bwd",
)
ARCH_DEFAULTS = {
    # sample_size (latent window), height, width, stride: 5 views each
    "tiny": {"sample_size": 8, "height": 64, "width": 192, "stride": 4},
    "sd2": {"sample_size": 64, "height": 512, "width": 1024, "stride": 16},
    # stabilityai/stable-diffusion-xl-base-1.0's architecture and 1024-pixel window (SyncDiffusionXLPipeline)
    "sdxl": {"sample_size": 128, "height": 1024, "width": 2048, "stride": 32},
    # black-forest-labs/FLUX.1-dev's architecture and 1024-pixel window (SyncDiffusionFluxPipeline)
    "flux": {"sample_size": 128, "height": 1024, "width": 2048, "stride": 32},
    # black-forest-labs/FLUX.2-klein-4B's architecture and 1024-pixel window (SyncDiffusionFlux2KleinPipeline)
    "flux2-klein": {"sample_size": 128, "height": 1024, "width": 2048, "stride": 32},
    # Tongyi-MAI/Z-Image-Turbo's architecture and 1024-pixel window (SyncDiffusionZImagePipeline)
    "z-image": {"sample_size": 128, "height": 1024, "width": 2048, "stride": 32},
}
XL_ARCHS = ("sdxl",)
FLUX_ARCHS = ("flux",)
# The architectures whose denoiser is a transformer: views of any `window_size`, `depth_mult`, text encoders reduced.
TRANSFORMER_ARCHS = ("flux", "flux2-klein", "z-image")
# The guidance each architecture's pipeline defaults to: classifier-free guidance (FLUX.2 [klein] base: the
# transformer twice per view; Z-Image: a doubled batch), FLUX.1-dev's guidance embedding.
GUIDANCE_SCALES = {"flux": 3.5, "flux2-klein": 4.0, "z-image": 5.0}
DEFAULT_GUIDANCE_SCALE = 7.5
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------------


def _rss_bytes():
    """Resident set size of this process, in bytes."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil  # not a dependency of the package; only where /proc is missing

        return psutil.Process().memory_info().rss


def _release_memory(device):
    """Collect garbage and give freed memory back (CUDA cache, glibc heap) so the next mode starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Context manager: peak CUDA memory allocated (on CUDA), or peak RSS growth over its start (elsewhere), in MiB."""

    def __init__(self, device, interval=0.005):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_mib = None
        self.kind = "cuda peak allocated" if self.device.type == "cuda" else "peak RSS growth"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._base = _rss_bytes()
            self._peak = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.peak_mib = (self._peak - self._base) / 2**20
        return False


# ----------------------------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------------------------


def _resolve_device(device):
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def _synchronizer(device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


@contextmanager
def cuda_memory_limit(device, gib):
    """
    Emulate a CUDA card with `gib` GiB (nothing when `gib` is None or off CUDA): the caching allocator is capped
    there (`torch.cuda.set_per_process_memory_fraction`, so going over raises out-of-memory as on such a card), and
    `torch.cuda.mem_get_info`, which `view_batch_size="auto"` reads, reports what is left of it.
    """
    device = torch.device(device)
    if gib is None or device.type != "cuda":
        yield
        return
    limit = int(gib * 2**30)
    total = torch.cuda.get_device_properties(device).total_memory
    real_mem_get_info = torch.cuda.mem_get_info

    def mem_get_info(where=None):
        free, _ = real_mem_get_info(where)
        return min(free, max(0, limit - torch.cuda.memory_reserved(where))), limit

    _release_memory(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), index)
    torch.cuda.mem_get_info = mem_get_info
    try:
        yield
    finally:
        torch.cuda.mem_get_info = real_mem_get_info
        torch.cuda.set_per_process_memory_fraction(1.0, index)


def set_channels_last(pipe, enabled=True):
    """Put the UNet and the VAE in channels-last memory layout, or back (on an H200 it was slower: docs/gpu.md)."""
    memory_format = torch.channels_last if enabled else torch.contiguous_format
    for model in (pipe.unet, pipe.vae):
        model.to(memory_format=memory_format)


def _mode_settings(kwargs, denoiser="unet"):
    """`(sync on, gradient, reuse_noise, checkpointing, separate decoder)` for a mode's keyword arguments, with the
    defaults of the pipeline whose denoiser is `denoiser` (`"unet"`: SD's; `"transformer"`: FLUX's)."""
    if denoiser == "transformer":
        from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline as pipeline_class
        from pipeline_syncdiffusion_flux import SyncSettings
    else:
        from pipeline_syncdiffusion import SyncDiffusionPipeline as pipeline_class
        from pipeline_syncdiffusion import SyncSettings

    defaults = inspect.signature(pipeline_class.__call__).parameters
    settings = SyncSettings.from_arguments(
        kwargs.get("sync_mode", defaults["sync_mode"].default),
        kwargs.get("sync_gradient"),
        kwargs.get("sync_reuse_noise"),
        checkpointing=kwargs.get("sync_gradient_checkpointing", False),
    )
    return (
        kwargs.get("sync_weight", defaults["sync_weight"].default) > 0,
        denoiser if settings.through_denoiser else "x0",
        settings.reuse_noise,
        settings.checkpointing,
        kwargs.get("sync_decoder") is not None,
    )


def expected_passes(kwargs, num_views, steps, sync_thres, controlnet=False, denoiser="unet", view_prompts=None):
    """Expected view-passes of a mode: `(per synchronized step or None, whole call)`, in `CHECKED_KEYS`.
    `controlnet`: a ControlNet runs at every step (the pipeline's default guidance range). `denoiser`: `"unet"`, or
    `"transformer"` for FLUX (docs/flux.md: the same formulas in transformer passes; one view-pass is one view's
    guided velocity). `view_prompts`: with region prompts, the prompts present in each view (`prompts_per_view`)."""
    sync, gradient, reuse, checkpointing, tiny = _mode_settings(kwargs, denoiser)
    synced = min(steps, sync_thres) if sync and num_views > 1 else 0
    per_sync = None
    if synced:
        per_sync = expected_sync_step(
            num_views, gradient, reuse, checkpointing, tiny, controlnet, denoiser, view_prompts=view_prompts
        )
    plain = expected_plain_step(num_views, controlnet, denoiser, view_prompts=view_prompts)
    total = {key: (per_sync[key] * synced if per_sync else 0) + plain[key] * (steps - synced) for key in CHECKED_KEYS}
    return ({key: per_sync[key] for key in CHECKED_KEYS} if per_sync else None), total


def build_pipeline(
    arch="tiny",
    width_mult=1.0,
    sample_size=None,
    device="cpu",
    dtype=torch.float32,
    seed=0,
    controlnet=False,
    depth_mult=1.0,
    full_text_encoders=False,
):
    """
    A pipeline of random-weight `arch` components with a random-backbone LPIPS, on `device`: a
    `SyncDiffusionXLPipeline` for `sdxl`; for the transformer architectures (their heads and every width scaled by
    `width_mult`, their block counts by `depth_mult`, their text encoders reduced unless `full_text_encoders`) a
    `SyncDiffusionFluxPipeline` for `flux` (FLUX.1's architecture, text encoders of one block:
    `testing.make_flux_components`), a `SyncDiffusionFlux2KleinPipeline` for `flux2-klein` (FLUX.2-klein-4B's, a
    base model with its classifier-free guidance; Qwen3-4B cut to the 28 layers the pipeline reads:
    `testing.make_flux2_klein_components`), a `SyncDiffusionZImagePipeline` for `z-image` (Z-Image-Turbo's; Qwen3-4B
    of 2 layers: `testing.make_z_image_components`); else a `SyncDiffusionPipeline`, or with `controlnet` a
    `SyncDiffusionControlNetPipeline` with a random ControlNet made from the UNet (`ControlNetModel.from_unet`).
    """
    from syncdiffusion_utils.testing import make_lpips

    sample_size = sample_size or ARCH_DEFAULTS[arch]["sample_size"]
    if arch not in TRANSFORMER_ARCHS and (depth_mult != 1.0 or full_text_encoders):
        raise ValueError(
            f"depth_mult={depth_mult}, full_text_encoders={full_text_encoders}: for arch={_arch_list()} only"
        )
    if controlnet and (arch in XL_ARCHS or arch in TRANSFORMER_ARCHS):
        raise ValueError(f"--controlnet: there is no {arch} ControlNet pipeline; use --arch tiny or sd2")
    if arch in XL_ARCHS:
        pipe = _xl_pipeline(arch, sample_size, width_mult, seed)
    elif arch in TRANSFORMER_ARCHS:
        pipe = _transformer_pipeline(arch, width_mult, depth_mult, seed, full_text_encoders)
    else:
        pipe = _sd_pipeline(arch, sample_size, width_mult, seed, controlnet)
    pipe.set_perceptual_loss(make_lpips().requires_grad_(False))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def _arch_list():
    """The transformer architectures as `'flux', 'flux2-klein' or 'z-image'`."""
    names = [repr(arch) for arch in TRANSFORMER_ARCHS]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _sd_pipeline(arch, sample_size, width_mult, seed, controlnet):
    from pipeline_syncdiffusion import SyncDiffusionPipeline
    from pipeline_syncdiffusion_controlnet import SyncDiffusionControlNetPipeline
    from syncdiffusion_utils.testing import make_components, make_controlnet, make_tiny_controlnet

    components = make_components(arch, sample_size=sample_size, width_mult=width_mult, seed=seed)
    pipeline_class = SyncDiffusionPipeline
    if controlnet:
        make = make_tiny_controlnet if arch == "tiny" else make_controlnet
        components["controlnet"] = make(components["unet"], seed=seed)
        pipeline_class = SyncDiffusionControlNetPipeline
    return pipeline_class(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _xl_pipeline(arch, sample_size, width_mult, seed):
    from pipeline_syncdiffusion_xl import SyncDiffusionXLPipeline
    from syncdiffusion_utils.testing import make_sdxl_components

    components = make_sdxl_components(arch, sample_size=sample_size, width_mult=width_mult, seed=seed)
    return SyncDiffusionXLPipeline(**components, add_watermarker=False)


def _transformer_pipeline(arch, width_mult, depth_mult, seed, full_text_encoders):
    """The SyncDiffusion pipeline of transformer architecture `arch` on its real preset's random components."""
    from syncdiffusion_utils import testing

    reduced = {"seed": seed, "width_mult": width_mult, "depth_mult": depth_mult}
    if arch == "flux":
        from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline

        components = testing.make_flux_components("flux", full_text_encoders=full_text_encoders, **reduced)
        return SyncDiffusionFluxPipeline(**components)
    if arch == "flux2-klein":
        from pipeline_syncdiffusion_flux2 import SyncDiffusionFlux2KleinPipeline

        components = testing.make_flux2_klein_components("klein-4b", full_text_encoder=full_text_encoders, **reduced)
        return SyncDiffusionFlux2KleinPipeline(**components)
    from pipeline_syncdiffusion_z_image import SyncDiffusionZImagePipeline

    components = testing.make_z_image_components("z-image-turbo", full_text_encoder=full_text_encoders, **reduced)
    return SyncDiffusionZImagePipeline(**components)


def make_tiny_sync_decoder(pipe, seed=0):
    """The tiny decoder of the tiny-decoder modes for `pipe`, random, at its real width: TAESD's architecture for a
    UNet, TAEF1's (16 latent channels) for FLUX.1 and Z-Image, for FLUX.2 TAESD's with FLUX.2's 32 latent channels
    (as TAEF2 takes them)."""
    from diffusers import AutoencoderTiny

    from syncdiffusion_utils.testing import make_tiny_decoder, make_tiny_flux_decoder

    if _denoiser_name(pipe) == "unet":
        return make_tiny_decoder(seed=seed, width_mult=1.0)
    if pipe.vae.config.latent_channels == 16:
        return make_tiny_flux_decoder(seed=seed, width_mult=1.0)
    torch.manual_seed(seed)
    return AutoencoderTiny(latent_channels=pipe.vae.config.latent_channels).eval()


def _full_size_pipeline(pipe, base):
    """diffusers' own pipeline of reference mode `base` (`FULL_SIZE_PIPELINES`) on `pipe`'s components."""
    import diffusers

    reference = getattr(diffusers, REFERENCE_PIPELINES[base])(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    return reference


def _transformer_info(pipe, depth_mult, full_text_encoders, max_sequence_length):
    """What a transformer run's architecture is, reductions stated: the transformer's blocks, heads and width, the
    text encoder's layers and width, text tokens."""
    config = pipe.transformer.config
    if "n_layers" in config:  # Z-Image's: main layers, refiner blocks (noise and context, each)
        blocks = [config.n_layers, config.n_refiner_layers]
        heads, width = config.n_heads, config.dim
    else:
        blocks = [config.num_layers, config.num_single_layers]
        heads, width = config.num_attention_heads, config.num_attention_heads * config.attention_head_dim
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    return {
        "depth_mult": depth_mult,
        "full_text_encoders": full_text_encoders,
        "max_sequence_length": max_sequence_length,
        "transformer_blocks": blocks,
        "transformer_heads": heads,
        "transformer_width": width,
        "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "text_encoder_layers": [model.config.num_hidden_layers for model in text_encoders],
        "text_encoder_width": [model.config.hidden_size for model in text_encoders],
    }


def _check_transformer_options(
    arch, modes, controlnet, channels_last, offload_text_encoder, max_sequence_length, depth_mult
):
    """Refuse what a transformer run or an SD run cannot do, before anything is built."""
    bases = {_mode_name(m).partition("@")[0] for m in modes}
    transformer = arch in TRANSFORMER_ARCHS
    for mode, mode_arch in FULL_SIZE_PIPELINES.items():
        if mode in bases and arch != mode_arch:
            raise ValueError(f"{mode} is {REFERENCE_PIPELINES[mode]}: for arch={mode_arch!r} only")
    if not transformer and depth_mult != 1.0:
        raise ValueError(f"depth_mult={depth_mult}: for arch={_arch_list()} only")
    if not depth_mult > 0:
        raise ValueError(f"depth_mult={depth_mult}: a positive number")
    batched = [m for m in modes if _mode_name(m).partition("@")[0] in FULL_SIZE_PIPELINES and "@" in m]
    if batched:
        raise ValueError(
            f"modes {batched}: {', '.join(FULL_SIZE_PIPELINES)} have no views to batch; name them without @K"
        )
    if not transformer:
        return
    refused = {
        PANORAMA_MODE: PANORAMA_MODE in bases,
        "controlnet": controlnet,
        "channels_last": channels_last,
        "offload_text_encoder": offload_text_encoder,
    }
    for name, given in refused.items():
        if given:
            raise ValueError(f"{name}: not for arch={arch!r} (SD's UNet pipelines only)")
    if not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= 512:
        raise ValueError(f"max_sequence_length={max_sequence_length!r}: an integer from 1 to 512 (text tokens)")


def _denoiser_name(pipe):
    """`"transformer"` for a pipeline denoising with a transformer (FLUX), else `"unet"`."""
    return "transformer" if getattr(pipe, "transformer", None) is not None else "unet"


def _condition_image(height, width, seed):
    """A random condition image of the panorama's size (values in [0, 1]), as a ControlNet's `image`."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.rand((1, 3, height, width), generator=generator)


def check_region_options(regions, region_coverage):
    """Refuse a region count or coverage the benchmark cannot lay out, before anything is built."""
    if not isinstance(regions, int) or isinstance(regions, bool) or regions < 0:
        raise ValueError(f"regions={regions!r}: a non-negative integer (region prompts; 0 for none)")
    if (
        isinstance(region_coverage, bool)
        or not isinstance(region_coverage, (int, float))
        or not 0 < region_coverage <= 1
    ):
        raise ValueError(f"region_coverage={region_coverage!r}: a fraction of the panorama's width in (0, 1]")


def region_boxes(width, regions, coverage=DEFAULT_REGION_COVERAGE, vae_scale_factor=8):
    """
    The benchmark's `regions` boxes as `(x0, x1)` pixel columns (each of the panorama's full height): side by side,
    centred, together `coverage` of the width rounded to whole blocks of `vae_scale_factor` pixels (so that each
    mask is hard in the latent too), the blocks shared out as evenly as they go.
    """
    check_region_options(regions, coverage)
    blocks = width // vae_scale_factor
    covered = round(coverage * blocks)
    if covered < regions:
        raise ValueError(
            f"regions={regions}, region_coverage={coverage}: {covered} of the panorama's {blocks} latent columns"
            f" covered, fewer than one per region; cover more of the width or use fewer regions"
        )
    start = (blocks - covered) // 2
    edges = [start + k * covered // regions for k in range(regions + 1)]
    return [(x0 * vae_scale_factor, x1 * vae_scale_factor) for x0, x1 in zip(edges, edges[1:])]


def region_masks(height, width, boxes):
    """Hard float masks of the panorama's size in pixels, 1 inside each `(x0, x1)` box over the full height."""
    masks = []
    for x0, x1 in boxes:
        mask = torch.zeros(height, width)
        mask[:, x0:x1] = 1.0
        masks.append(mask)
    return masks


def region_prompts(prompt, regions):
    """A prompt per region, each its own (so that each is its own conditioning)."""
    return [f"{prompt}, region {k + 1} of {regions}" for k in range(regions)]


def _log(progress, message):
    """Print a progress line to `progress`: a file, `True` for standard error, `None`/`False` for silence."""
    if progress is True:
        progress = sys.stderr
    if progress:
        print(message, file=progress, flush=True)


def run_benchmark(
    arch="tiny",
    width_mult=1.0,
    sample_size=None,
    height=None,
    width=None,
    steps=2,
    sync_thres=2,
    stride=None,
    view_batch_size=1,
    dtype="float32",
    device="auto",
    modes=None,
    repeat=1,
    seed=0,
    prompt="a photo of a mountain range at twilight",
    guidance_scale=None,
    warmup=True,
    decode=True,
    project_steps=50,
    project_sync_thres=5,
    progress=True,
    pipe=None,
    reference=REFERENCE_MODE,
    compile=False,
    compile_mode="regional",
    compile_cache=None,
    compile_backend="inductor",
    vae_tiling=False,
    controlnet=False,
    channels_last=False,
    memory_limit_gib=None,
    offload_text_encoder=False,
    depth_mult=1.0,
    full_text_encoders=False,
    max_sequence_length=512,
    regions=0,
    region_coverage=DEFAULT_REGION_COVERAGE,
):
    """
    Run MultiDiffusion and the SyncDiffusion `modes` on the same inputs; return a list with one dict per mode (a
    `BenchmarkRows`, whose `.config` describes the run: views, expected formula, device, ...). Each row has
    `mode, kwargs, seconds, ratio, step_seconds, sync_steps, sync_step_seconds, plain_step_seconds, step_ratio,
    projected_ratio` (wall clock), the same prefixed `cpu_` (this process's CPU time), `passes` (whole call),
    `passes_sync_step` (first synchronized step), `expected_sync_step, expected_passes, passes_match, final_decode,
    peak_mem_mib, memory_kind`, and `calls` (each call's seconds, peak memory, compiling seconds and view batches),
    `first_call_seconds`, `steady_seconds` (the fastest call after the first; None with one call) and
    `compile_seconds` (torch's compiling during the mode's calls); MultiDiffusion's also `md_step_seconds`.
    MultiDiffusion always runs first, as the reference of the ratios (or `reference`). With `repeat > 1` the figures
    besides `calls` are the fastest (wall clock) call's. A mode named `NAME@K` runs mode `NAME` with
    `view_batch_size=K` (an integer or `auto`); `panorama-pipeline` is diffusers' `StableDiffusionPanoramaPipeline`
    on the same components with all views in one batch (`@K` too). A mode ending in `+compiled` runs after the
    others, on the pipeline compiled in `compile_mode` ("regional" or "whole", `syncdiffusion_utils.compiling`;
    the `sync_decoder` of the tiny-decoder modes too) with torch.compile's `compile_backend`, its caches in
    `compile_cache` (`compiling.setup_compile_cache`); `compile` adds every mode again compiled, reference included,
    and the pipeline is restored uncompiled at the end. `vae_tiling` decodes in tiles;
    `channels_last` puts the UNet and the VAE in channels-last layout; `memory_limit_gib` emulates a CUDA card of
    that size (`cuda_memory_limit`), where a mode that runs out of memory gets a row with its `error`;
    `offload_text_encoder` encodes the prompt once and moves the text encoder to the CPU for the run.
    `arch="sdxl"` runs `SyncDiffusionXLPipeline`; `controlnet` runs `SyncDiffusionControlNetPipeline` with a random
    ControlNet and a random condition image of the panorama's size (its passes counted as `controlnet_*`).
    `arch="flux"` runs `SyncDiffusionFluxPipeline` on FLUX.1's architecture, `"flux2-klein"`
    `SyncDiffusionFlux2KleinPipeline` on FLUX.2-klein-4B's, `"z-image"` `SyncDiffusionZImagePipeline` on
    Z-Image-Turbo's (`depth_mult`, `full_text_encoders`: `build_pipeline`), views of `sample_size` latents
    (`window_size = 8 * sample_size` pixels), `max_sequence_length` text tokens; their passes are `transformer_*`,
    and their `flux-pipeline`, `flux2-klein-pipeline` and `z-image-pipeline` modes are diffusers' `FluxPipeline`,
    `Flux2KleinPipeline` and `ZImagePipeline` on the same components and initial noise at the panorama's full size
    (no views: one transformer pass of the whole image per step). `guidance_scale` defaults to the architecture's
    (7.5; FLUX.1-dev's guidance embedding 3.5; FLUX.2 [klein] base's classifier-free guidance 4.0, Z-Image's 5.0).
    `regions > 0` runs every SyncDiffusion mode again as `NAME+regions` right after it (a mode may also be named so
    in `modes`), with `regions` region prompts in the boxes of `region_boxes` (together `region_coverage` of the
    width) and the pipeline's default bootstrapping; its row's passes are checked against the region formula
    (`view_prompts`: the prompts present in each view) and its `region_ratio` / `cpu_region_ratio` is its call's
    wall / CPU time over that of the same mode without regions (None when that mode did not run).
    Progress lines go to `progress` (`True`: standard error; a file; `None`: silent).
    `pipe` reuses a pipeline built by `build_pipeline` (its `arch`/`width_mult`/`sample_size` then only label the run).
    """
    device = _resolve_device(device)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    dtype_name = str(torch_dtype).replace("torch.", "")
    defaults = ARCH_DEFAULTS[arch]
    sample_size = sample_size or defaults["sample_size"]
    height = height or defaults["height"]
    width = width or defaults["width"]
    stride = stride or defaults["stride"]
    guidance_scale = GUIDANCE_SCALES.get(arch, DEFAULT_GUIDANCE_SCALE) if guidance_scale is None else guidance_scale
    modes = list(modes) if modes else list(ARCH_MODES.get(arch, MODES))
    unknown = [m for m in modes + [reference] if _mode_name(m).partition("@")[0] not in (*MODES, *REFERENCE_PIPELINES)]
    if unknown:
        raise ValueError(
            f"unknown modes {unknown}; choose from {list(MODES) + list(REFERENCE_PIPELINES)}, optionally @K or @auto,"
            f" and {COMPILED_SUFFIX}"
        )
    if reference.endswith(COMPILED_SUFFIX):
        raise ValueError(f"reference={reference!r}: the reference runs first, before compiling; name an eager mode")
    compiling.check_compile_mode(compile_mode)
    check_region_options(regions, region_coverage)
    regional = [m for m in modes + [reference] if _has_regions(m)]
    if regional and not regions:
        raise ValueError(f"modes {regional}: {REGIONS_SUFFIX} needs region prompts (regions > 0)")
    if any(_mode_base(m) in REFERENCE_PIPELINES for m in regional):
        raise ValueError(f"modes {regional}: {', '.join(REFERENCE_PIPELINES)} take no region prompts")
    if regions and offload_text_encoder:
        raise ValueError(f"regions={regions}: the region prompts need the text encoder; not with offload_text_encoder")
    modes = [reference] + [m for m in dict.fromkeys(modes) if m != reference]
    if regions:
        # each SyncDiffusion mode's twin with regions right after it, for the cost of regions in the same settings
        twins = [(m, _with_regions(m)) if _mode_base(m) not in REFERENCE_PIPELINES else (m,) for m in modes]
        modes = list(dict.fromkeys(m for pair in twins for m in pair))
    if compile:
        modes += [m + COMPILED_SUFFIX for m in modes if not m.endswith(COMPILED_SUFFIX)]
    # Eager modes first: compiling changes the pipeline for every later mode.
    modes = list(dict.fromkeys(sorted(modes, key=lambda m: m.endswith(COMPILED_SUFFIX))))
    if (arch in XL_ARCHS or controlnet) and any(_mode_name(m).partition("@")[0] == PANORAMA_MODE for m in modes):
        raise ValueError(f"{PANORAMA_MODE} is StableDiffusionPanoramaPipeline: SD 1.x/2.x without ControlNet only")
    _check_transformer_options(
        arch, modes, controlnet, channels_last, offload_text_encoder, max_sequence_length, depth_mult
    )
    synchronize = _synchronizer(device)

    t_build = time.perf_counter()
    if pipe is None:
        depth = f", depth x{depth_mult}" if arch in TRANSFORMER_ARCHS else ""
        _log(progress, f"building {arch} (width x{width_mult}{depth}) on {device} in {dtype_name} ...")
        transformer_options = {"depth_mult": depth_mult, "full_text_encoders": full_text_encoders}
        options = transformer_options if arch in TRANSFORMER_ARCHS else {}
        pipe = build_pipeline(arch, width_mult, sample_size, device, torch_dtype, seed, controlnet, **options)
    denoiser = _denoiser_name(pipe)
    controlnet = getattr(pipe, "controlnet", None) is not None
    if vae_tiling:
        pipe.vae.enable_tiling()
    if channels_last:
        set_channels_last(pipe)
    build_seconds = time.perf_counter() - t_build
    sample_size = pipe.unet.config.sample_size if denoiser == "unet" else sample_size
    # A transformer's views are `window_size` pixels (it has no fixed size), the UNet's its sample size.
    window_call = {"window_size": sample_size * pipe.vae_scale_factor} if denoiser == "transformer" else {}
    views = pipe.get_views(height, width, stride=stride, **window_call)
    num_views = len(views)
    region_call, view_prompts, boxes = {}, None, []
    if regions:
        if "region_prompts" not in inspect.signature(pipe.__call__).parameters:
            raise ValueError(f"regions={regions}: {type(pipe).__name__} takes no region prompts")
        boxes = region_boxes(width, regions, region_coverage, pipe.vae_scale_factor)
        masks = region_masks(height, width, boxes)
        view_prompts = prompts_per_view(masks, views, pipe.vae_scale_factor)
        region_call = {"region_prompts": region_prompts(prompt, regions), "region_masks": masks}
    if any(m.partition("@")[0] == PANORAMA_MODE for m in modes) and (sample_size != 64 or stride != 8):
        raise ValueError(f"{PANORAMA_MODE} has a fixed 64-latent window and stride 8: use --sample-size 64 --stride 8")
    tiny_decoder = None
    if any(MODES.get(_mode_name(m).partition("@")[0], {}).get("sync_decoder") == "tiny" for m in modes):
        tiny_decoder = make_tiny_sync_decoder(pipe, seed).to(device=device, dtype=torch_dtype)

    generator = torch.Generator("cpu").manual_seed(seed)
    factor = pipe.vae_scale_factor
    # a transformer's: the VAE's latent (FLUX's unpacked, FLUX.2's with its 2x2 patches laid out)
    channels = pipe.unet.config.in_channels if denoiser == "unet" else pipe.vae.config.latent_channels
    shape = (1, channels, height // factor, width // factor)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=torch_dtype)
    prompt_kwargs = {"prompt": prompt}
    if offload_text_encoder:
        # As a small card's user would: encode once, then keep the text encoder off the GPU.
        with torch.no_grad():
            embeds, negative_embeds = pipe.encode_prompt(prompt, device, 1, guidance_scale > 1)
        pipe.text_encoder.to("cpu")
        prompt_kwargs = {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}
    common = {
        **prompt_kwargs,
        "height": height,
        "width": width,
        "num_inference_steps": steps,
        "guidance_scale": guidance_scale,
        "stride": stride,
        "view_batch_size": view_batch_size,
        "sync_thres": sync_thres,
        "output_type": "np" if decode else "latent",
        **window_call,
        **({"max_sequence_length": max_sequence_length} if denoiser == "transformer" else {}),
    }
    condition = _condition_image(height, width, seed).to(device=device, dtype=torch_dtype) if controlnet else None
    if controlnet:
        common["image"] = condition
    expected_exact, _ = expected_passes({}, num_views, 1, 1, controlnet, denoiser)
    info = {
        "arch": arch,
        "width_mult": width_mult,
        "sample_size": sample_size,
        "height": height,
        "width": width,
        "stride": stride,
        "num_views": num_views,
        "view_batch_size": view_batch_size,
        "steps": steps,
        "sync_thres": sync_thres,
        "guidance_scale": guidance_scale,
        "dtype": dtype_name,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "reference": reference,
        "compile": compile,
        "compile_mode": compile_mode if any(m.endswith(COMPILED_SUFFIX) for m in modes) else None,
        "compiled_blocks": None,
        "compile_cache": None,
        "vae_tiling": vae_tiling,
        "channels_last": channels_last,
        "memory_limit_gib": memory_limit_gib if device.type == "cuda" else None,
        "offload_text_encoder": offload_text_encoder,
        "pipeline": type(pipe).__name__,
        "controlnet": controlnet,
        "torch": torch.__version__,
        "repeat": repeat,
        "warmup": warmup,
        "final_decode": decode,
        "build_seconds": build_seconds,
        "project_steps": project_steps,
        "project_sync_thres": project_sync_thres,
        "expected_exact_sync_step": expected_exact,
        "denoiser": denoiser,
        "regions": regions,
        "region_coverage": region_coverage if regions else None,
        "region_boxes": [list(box) for box in boxes],
        "region_covered_fraction": sum(x1 - x0 for x0, x1 in boxes) / width if regions else None,
        "view_prompts": view_prompts,
        "region_bootstrap_steps": _default_bootstrap_steps(steps) if regions else None,
        **(
            _transformer_info(pipe, depth_mult, full_text_encoders, max_sequence_length)
            if denoiser == "transformer"
            else {}
        ),
    }
    _log(
        progress,
        f"{num_views} views of {sample_size}x{sample_size} latents; per synchronized step the exact mode should make"
        f" {expected_exact[denoiser + '_fwd']} {DENOISER_LABELS[denoiser]} fwd (2N-1),"
        f" {expected_exact[denoiser + '_bwd']} {DENOISER_LABELS[denoiser]} bwd (N-1),"
        f" {expected_exact['dec_fwd']} decoder fwd (N), {expected_exact['dec_bwd']} decoder bwd (N-1),"
        f" {expected_exact['lpips_fwd']} LPIPS (N-1) view-passes"
        + (
            f"; ControlNet as the UNet: {expected_exact['controlnet_fwd']} fwd, {expected_exact['controlnet_bwd']} bwd"
            if controlnet
            else ""
        ),
    )

    with cuda_memory_limit(device, memory_limit_gib), ExitStack() as restore:
        if warmup:
            # First-call costs (allocator, kernels, lazy imports) must not count against the first mode measured.
            t0 = time.perf_counter()
            window = sample_size * factor
            warmup_call = {**common, "height": window, "width": window, "num_inference_steps": 1, "sync_weight": 0.0}
            if controlnet:
                warmup_call["image"] = condition[..., :window, :window]
            if regions:
                # the regions' first-call costs too (the VAE encoder of bootstrapping runs only with regions)
                warmup_mask = torch.zeros(window, window)
                warmup_mask[:, : window // 2] = 1.0
                warmup_call.update(
                    region_prompts=region_call["region_prompts"][:1],
                    region_masks=[warmup_mask],
                    region_bootstrap_steps=1,
                )
            pipe(**warmup_call)
            synchronize()
            _log(progress, f"warm-up call: {time.perf_counter() - t0:.1f} s")

        rows = []
        reference_name, reference = reference, None
        compiled = None
        for index, mode in enumerate(modes, 1):
            if mode.endswith(COMPILED_SUFFIX) and compiled is None:
                info["compile_cache"] = compiling.setup_compile_cache(compile_cache)["directory"]
                compiled = compiling.compile_pipeline(pipe, compile_mode, backend=compile_backend)
                restore.callback(compiling.uncompile_pipeline, pipe)
                if tiny_decoder is not None:
                    compiled["models"]["sync_decoder"] = compiling.compile_decoder(
                        tiny_decoder, compile_mode, backend=compile_backend
                    )
                info["compiled_blocks"] = compiled["models"]
                _log(progress, f"compiled ({compile_mode}): {compiled['models']}")
            base, _, batch = _mode_name(mode).partition("@")
            panorama = base == PANORAMA_MODE
            kwargs = {"sync_weight": 0.0} if base in REFERENCE_PIPELINES else dict(MODES[base])
            if kwargs.get("sync_decoder") == "tiny":
                kwargs["sync_decoder"] = tiny_decoder
            if batch or panorama:
                kwargs["view_batch_size"] = num_views if not batch else batch if batch == "auto" else int(batch)
            measured, ignored, adapt = _measured_pipeline(pipe, base)

            regional = _has_regions(mode)
            mode_region_call = region_call if regional else {}
            mode_view_prompts = view_prompts if regional else None

            def run(**call):
                call = {**common, **mode_region_call, **call}
                return measured(**adapt({k: v for k, v in call.items() if k not in ignored}))

            # diffusers' FluxPipeline (Flux2KleinPipeline, ZImagePipeline) has no views: the panorama is its image
            mode_views = 1 if base in FULL_SIZE_PIPELINES else num_views
            sync, *_ = _mode_settings(kwargs, denoiser)
            synced_steps = min(steps, sync_thres) if sync and mode_views > 1 else 0
            _log(progress, f"[{index}/{len(modes)}] {mode}: running ...")
            try:
                best = _measure(run, measured, kwargs, latents, repeat, device, synchronize, panorama, guidance_scale)
            except (torch.cuda.OutOfMemoryError, FloatingPointError) as error:
                if mode == reference_name:
                    raise
                rows.append(_error_row(mode, kwargs, error, device))
                _log(progress, f"[{index}/{len(modes)}] {mode}: {rows[-1]['error']}")
                continue
            step0 = best["step_counts"][0] if best["step_counts"] else {}
            passes_sync_step = {key: step0.get(key) for key in CHECKED_KEYS} if synced_steps else None

            def matches(expected_step, expected_total):
                whole = all(best["passes"][key] == expected_total[key] for key in CHECKED_KEYS)
                return whole and (not synced_steps or passes_sync_step == expected_step)

            expected_step, expected_total = expected_passes(
                kwargs, mode_views, steps, sync_thres, controlnet, denoiser, mode_view_prompts
            )
            passes_match, auto_checkpointing = matches(expected_step, expected_total), False
            if not passes_match and synced_steps and kwargs.get("view_batch_size", view_batch_size) == "auto":
                # "auto" turns checkpointing on where one view's gradient pass does not fit: its formula then.
                checkpointing = {**kwargs, "sync_gradient_checkpointing": True}
                checkpointed = expected_passes(
                    checkpointing, mode_views, steps, sync_thres, controlnet, denoiser, mode_view_prompts
                )
                if matches(*checkpointed):
                    (expected_step, expected_total), passes_match, auto_checkpointing = checkpointed, True, True
            row = {
                "mode": mode,
                "kwargs": {k: (type(v).__name__ if k == "sync_decoder" else v) for k, v in kwargs.items()},
                "sync_steps": synced_steps,
                "passes": best["passes"],
                "passes_sync_step": passes_sync_step,
                "expected_sync_step": expected_step,
                "expected_passes": expected_total,
                "passes_match": passes_match,
                "auto_checkpointing": auto_checkpointing,
                "final_decode": best["passes"]["final_decode"],
                "peak_mem_mib": best["peak_mem_mib"],
                "memory_kind": best["memory_kind"],
                "calls": best["calls"],
                "first_call_seconds": best["calls"][0]["seconds"],
                "steady_seconds": min((c["seconds"] for c in best["calls"][1:]), default=None),
                "compile_seconds": _sum_known(c["compile_seconds"] for c in best["calls"]),
                "regions": regions if regional else 0,
                "view_prompts": mode_view_prompts,
            }
            if mode == reference_name:
                reference = row
            # The same figures on two clocks: wall time, and this process's CPU time (steadier on a shared CPU).
            for prefix in ("", "cpu_"):
                step_seconds = best[prefix + "step_seconds"]
                row[prefix + "seconds"] = best[prefix + "seconds"]
                row[prefix + "step_seconds"] = step_seconds
                row[prefix + "sync_step_seconds"] = _mean(step_seconds[:synced_steps]) if synced_steps else None
                row[prefix + "plain_step_seconds"] = (
                    _mean(step_seconds[synced_steps:]) if steps > synced_steps else None
                )
                if mode == reference_name:
                    row[prefix + "md_step_seconds"] = _mean(step_seconds)
                md_step = reference[prefix + "md_step_seconds"]
                row[prefix + "ratio"] = row[prefix + "seconds"] / reference[prefix + "seconds"]
                step_time = row[prefix + "sync_step_seconds"] or _mean(step_seconds)
                row[prefix + "step_ratio"] = step_time / md_step
                # Unsynchronized steps do MultiDiffusion's work, so they are priced at MultiDiffusion's step time;
                # FluxPipeline's steps (the whole panorama at once) do other work, priced at its own step time.
                plain_step = step_time if base in FULL_SIZE_PIPELINES else md_step
                if regional:
                    # with regions they do MultiDiffusion's work with regions: its step time, or the mode's own
                    plain_step = _regions_plain_step(rows, row, prefix, reference_name)
                projected_synced = min(project_steps, project_sync_thres) if synced_steps else 0
                row[prefix + "projected_ratio"] = (
                    None
                    if plain_step is None
                    else ((project_steps - projected_synced) * plain_step + projected_synced * step_time)
                    / (project_steps * md_step)
                )
            plain = next((r for r in rows if r["mode"] == _without_regions(mode) and not r.get("error")), None)
            for prefix in ("", "cpu_"):
                row[prefix + "region_ratio"] = (
                    row[prefix + "seconds"] / plain[prefix + "seconds"] if regional and plain else None
                )
            rows.append(row)
            region_cost = f", x{row['region_ratio']:.2f} without regions" if row["region_ratio"] else ""
            _log(
                progress,
                f"[{index}/{len(modes)}] {mode}: {row['seconds']:.2f} s (x{row['ratio']:.2f} MultiDiffusion),"
                f" step x{row['step_ratio']:.2f} (cpu time x{row['cpu_step_ratio']:.2f}),"
                f" projected {project_steps}-step x{_fmt(row['projected_ratio'], '.3f')}"
                f" (cpu time x{_fmt(row['cpu_projected_ratio'], '.3f')}),"
                f" peak {row['peak_mem_mib']:.0f} MiB, passes {'as expected' if passes_match else 'NOT as expected'}"
                f"{region_cost}",
            )
    if offload_text_encoder:
        pipe.text_encoder.to(device)
    return BenchmarkRows(rows, info)


def _measure(run, measured, kwargs, latents, repeat, device, synchronize, panorama, guidance_scale):
    """
    Run one mode `repeat` times; the fastest run's times, step times, pass counts and peak memory, and `calls`: each
    call's seconds, peak memory, compiling seconds and view batches. Every call starts from an emptied allocator
    cache, so that "auto" reads the same free memory and chooses the same batches each time.
    """
    best, calls = None, []
    for _ in range(max(1, repeat)):
        _release_memory(device)
        compiled_before = compiling.compile_seconds()
        # The panorama pipeline's `do_classifier_free_guidance` is always False (a known bug), though it guides.
        guided = guidance_scale > 1 if panorama else None
        counter = PassCounter(measured, sync_decoder=kwargs.get("sync_decoder"), guided=guided)
        with PeakMemory(device) as memory, counter:
            with StepRecorder(measured, counter, synchronize) as recorder, ViewBatchRecorder(measured) as batches:
                synchronize()
                start, start_cpu = time.perf_counter(), time.process_time()
                run(**kwargs, latents=latents.clone(), callback_on_step_end=recorder)
                synchronize()
                seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        compiled_after = compiling.compile_seconds()
        calls.append(
            {
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "peak_mem_mib": memory.peak_mib,
                "compile_seconds": None if compiled_before is None else compiled_after - compiled_before,
                "view_batches": batches.chosen,
                "step_seconds": list(recorder.step_seconds),
            }
        )
        if best is None or seconds < best["seconds"]:
            best = {
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "step_seconds": list(recorder.step_seconds),
                "cpu_step_seconds": list(recorder.step_cpu_seconds),
                "step_counts": list(recorder.step_counts),
                "passes": counter.as_dict(),
                "peak_mem_mib": memory.peak_mib,
                "memory_kind": memory.kind,
            }
    best["calls"] = calls
    return best


def _regions_plain_step(rows, row, prefix, reference_name):
    """
    The price of an unsynchronized step for a `+regions` row's projection: the plain step time of MultiDiffusion
    with the regions (the reference's twin, else `multidiffusion+regions`) if it ran, else the row's own plain steps
    (None when it has none).
    """
    names = (_with_regions(reference_name), REFERENCE_MODE + REGIONS_SUFFIX)
    for name in names:
        twin = next((r for r in rows if r["mode"] == name and not r.get("error")), None)
        if twin is not None and twin[prefix + "plain_step_seconds"] is not None:
            return twin[prefix + "plain_step_seconds"]
    return row[prefix + "plain_step_seconds"]


def _sum_known(values):
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


class ViewBatchRecorder:
    """
    Context manager: the view batches a SyncDiffusion pipeline chooses in each call made inside it, as dicts
    `{"view_batch_size", "gradient_batch_size", "checkpointing"}` in `.chosen` (empty for a pipeline without
    `view_batch_sizes`, such as diffusers' panorama pipeline).
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self.chosen = []

    def __enter__(self):
        choose = getattr(self.pipe, "view_batch_sizes", None)
        if choose is None:
            return self

        def view_batch_sizes(*args, **kwargs):
            view_batch_size, sync = choose(*args, **kwargs)
            self.chosen.append(
                {
                    "view_batch_size": view_batch_size,
                    "gradient_batch_size": sync.gradient_batch_size,
                    "checkpointing": sync.checkpointing,
                }
            )
            return view_batch_size, sync

        self.pipe.view_batch_sizes = view_batch_sizes
        return self

    def __exit__(self, *exc):
        self.pipe.__dict__.pop("view_batch_sizes", None)
        return False


def _mode_name(mode):
    """`mode` without its `+compiled` and `+regions` suffixes: `NAME` or `NAME@K`."""
    mode = mode[: -len(COMPILED_SUFFIX)] if mode.endswith(COMPILED_SUFFIX) else mode
    return mode[: -len(REGIONS_SUFFIX)] if mode.endswith(REGIONS_SUFFIX) else mode


def _mode_base(mode):
    """The name of `mode` in `MODES` or `REFERENCE_PIPELINES`, without view batch size and suffixes."""
    return _mode_name(mode).partition("@")[0]


def _has_regions(mode):
    """Whether `mode` runs with the region prompts (`NAME[@K]+regions[+compiled]`)."""
    compiled = mode.endswith(COMPILED_SUFFIX)
    return (mode[: -len(COMPILED_SUFFIX)] if compiled else mode).endswith(REGIONS_SUFFIX)


def _with_regions(mode):
    """`mode`'s twin with the region prompts: `+regions` before any `+compiled`."""
    if _has_regions(mode):
        return mode
    if mode.endswith(COMPILED_SUFFIX):
        return mode[: -len(COMPILED_SUFFIX)] + REGIONS_SUFFIX + COMPILED_SUFFIX
    return mode + REGIONS_SUFFIX


def _without_regions(mode):
    """`mode`'s twin without the region prompts."""
    if not _has_regions(mode):
        return mode
    compiled = COMPILED_SUFFIX if mode.endswith(COMPILED_SUFFIX) else ""
    return mode[: len(mode) - len(compiled) - len(REGIONS_SUFFIX)] + compiled


def _default_bootstrap_steps(steps):
    """The bootstrapping steps the pipelines run by default (`region_bootstrap_steps=None`)."""
    from pipeline_syncdiffusion import REGION_BOOTSTRAP_FRACTION

    return round(REGION_BOOTSTRAP_FRACTION * steps)


def _error_row(mode, kwargs, error, device):
    """
    The row of a mode that ran out of memory (or whose float16 gradient overflowed): the error, and on CUDA the
    memory allocated when it happened.
    """
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if torch.device(device).type == "cuda" else None
    _release_memory(device)
    kind = "out of memory" if isinstance(error, torch.cuda.OutOfMemoryError) else type(error).__name__
    return {
        "mode": mode,
        "kwargs": {k: (type(v).__name__ if k == "sync_decoder" else v) for k, v in kwargs.items()},
        "error": f"{kind}: {str(error).splitlines()[0]}",
        "passes_match": False,
        "peak_mem_mib": peak,
        "memory_kind": PeakMemory(device).kind,
    }


def _measured_pipeline(pipe, base):
    """`(pipeline, ignored arguments, adapt)` that mode `base` runs: `pipe` itself, or a reference pipeline of
    diffusers on its components, which ignores the panorama's arguments; `adapt` turns the call's arguments into the
    reference's (FluxPipeline takes the initial noise packed, Flux2KleinPipeline as 2x2 patches, ZImagePipeline as it
    is, in float32 as it draws it)."""
    if base == PANORAMA_MODE:
        return _panorama_pipeline(pipe), ("sync_thres", "stride", "sync_weight"), dict  # its stride is 8
    if base in FULL_SIZE_PIPELINES:
        measured = _full_size_pipeline(pipe, base)

        def initial_noise(call):
            latents = call["latents"]
            if base == FLUX_PIPELINE_MODE:
                latents = measured._pack_latents(latents, *latents.shape)
            elif base == FLUX2_KLEIN_PIPELINE_MODE:
                latents = measured._patchify_latents(latents)
            else:
                latents = latents.float()
            return {**call, "latents": latents}

        return measured, ("sync_thres", "stride", "sync_weight", "view_batch_size", "window_size"), initial_noise
    return pipe, (), dict


def _panorama_pipeline(pipe):
    """diffusers' `StableDiffusionPanoramaPipeline` on `pipe`'s components."""
    from diffusers import StableDiffusionPanoramaPipeline

    panorama = StableDiffusionPanoramaPipeline(**pipe.components)
    panorama.set_progress_bar_config(disable=True)
    return panorama


class BenchmarkRows(list):
    """The rows of `run_benchmark`, a plain list of dicts, with the run's configuration as `.config`."""

    def __init__(self, rows, config):
        super().__init__(rows)
        self.config = config


def _mean(values):
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _flux_header(info):
    """The FLUX run's architecture, its reductions from FLUX.1's stated, and what the reference row is."""
    blocks, heads = info["transformer_blocks"], info["transformer_heads"]
    text = "T5 and CLIP at full depth" if info["full_text_encoders"] else "text encoders of one block each"
    return (
        f"FLUX.1's architecture with random weights: transformer of {blocks[0]} double + {blocks[1]} single blocks"
        f" (FLUX.1: 19 + 38), {heads} attention heads of 128 = width {info['transformer_width']} (FLUX.1: 24,"
        f" 3072), {info['transformer_parameters'] / 1e6:.1f} M parameters (FLUX.1: 11900; width_mult={info['width_mult']},"
        f" depth_mult={info['depth_mult']}); {text}; {info['max_sequence_length']} text tokens."
        f" {FLUX_PIPELINE_MODE}: diffusers' FluxPipeline on the same components and noise at the panorama's full size,"
        f" one transformer pass of the whole image per step (counted as 1)."
    )


# What the FLUX.2 [klein] and Z-Image headers say of each: the model, its blocks, the published sizes, the
# guidance, the reference mode.
TRANSFORMER_HEADERS = {
    "flux2-klein": {
        "model": "FLUX.2-klein-4B",
        "blocks": "{0} double + {1} single blocks (klein-4B: 5 + 20)",
        "published": "24 heads, width 3072, 3880 M parameters",
        "text": "Qwen3-4B: 36 layers of 2560; the 28 the pipeline reads from unless full_text_encoders",
        "guidance": "a klein base model: the transformer twice per view (positive, negative), one view-pass",
        "guided_above": 1.0,
        "reference": FLUX2_KLEIN_PIPELINE_MODE,
    },
    "z-image": {
        "model": "Z-Image-Turbo",
        "blocks": "{0} layers + {1} noise and {1} context refiner blocks (Z-Image-Turbo: 30 + 2 + 2)",
        "published": "30 heads, width 3840, 6150 M parameters",
        "text": "Qwen3-4B: 36 layers of 2560; 2 unless full_text_encoders",
        "guidance": "the positive and negative rows in one doubled batch, one view-pass",
        "guided_above": 0.0,
        "reference": Z_IMAGE_PIPELINE_MODE,
    },
}


def _transformer_header(info):
    """A transformer run's architecture, its reductions from the real one stated, and what the reference row is."""
    if info["arch"] not in TRANSFORMER_HEADERS:
        return _flux_header(info)
    about = TRANSFORMER_HEADERS[info["arch"]]
    heads, width = info["transformer_heads"], info["transformer_width"]
    layers, text_width = info["text_encoder_layers"][0], info["text_encoder_width"][0]
    guided = info["guidance_scale"] > about["guided_above"]
    guidance = (
        f"classifier-free guidance {info['guidance_scale']:g} ({about['guidance']})" if guided else "no guidance"
    )
    return (
        f"{about['model']}'s architecture with random weights: transformer of"
        f" {about['blocks'].format(*info['transformer_blocks'])}, {heads} attention heads of {width // heads} = width"
        f" {width}, {info['transformer_parameters'] / 1e6:.1f} M parameters ({about['model']}: {about['published']};"
        f" width_mult={info['width_mult']}, depth_mult={info['depth_mult']}); text encoder of {layers} layers of"
        f" {text_width} ({about['text']}); {info['max_sequence_length']} text tokens;"
        f" {guidance}."
        f" {about['reference']}: diffusers' {REFERENCE_PIPELINES[about['reference']]} on the same components and"
        f" noise at the panorama's full size, one transformer pass of the whole image per step (counted as 1)."
    )


def _regions_header(info):
    """What the `+regions` rows run and how their passes are checked."""
    prompts = info["view_prompts"]
    label = DENOISER_LABELS[info.get("denoiser", "unet")]
    boxes = ", ".join(f"{x0}-{x1}" for x0, x1 in info["region_boxes"])
    return (
        f"'{REGIONS_SUFFIX}': the mode with {info['regions']} region prompts, hard masks of the full height side by"
        f" side at pixel columns {boxes} ({info['region_covered_fraction']:.0%} of the width; asked"
        f" {info['region_coverage']:g}), bootstrapping in the first {info['region_bootstrap_steps']} steps (the"
        f" pipelines' default). Prompts present in each view, background included: {prompts}; a view's {label} passes"
        f" are made once per prompt present: per MultiDiffusion step {sum(prompts)} {label} fwd (sum over views) for"
        f" N={len(prompts)}; per synchronized step the anchor's {prompts[len(prompts) // 2]} and every other view's"
        f" gradient pass and second forward once per prompt, decoder and LPIPS once per view. 'x plain' (and its"
        f" cpu-time twin): the whole call against the same mode without regions."
    )


def format_table(info, rows):
    """The header lines and the table as text."""
    n = info["num_views"]
    exp = info["expected_exact_sync_step"]
    controlnet = info.get("controlnet", False)
    denoiser = info.get("denoiser", "unet")
    label = DENOISER_LABELS[denoiser]
    keys = TRANSFORMER_PASS_KEYS if denoiser == "transformer" else PASS_KEYS
    pass_keys = keys[:2] + CONTROLNET_KEYS + keys[2:] if controlnet else keys
    limit = info.get("memory_limit_gib")
    emulated = f"; a {limit:g} GiB card emulated (allocator capped, free memory read from the cap)" if limit else ""
    lines = [
        f"SyncDiffusion benchmark: {info.get('pipeline', 'SyncDiffusionPipeline')} arch={info['arch']}"
        f" width_mult={info['width_mult']} dtype={info['dtype']}"
        f" device={info['device']} [{info['device_name']}] torch {info['torch']}",
        *([_transformer_header(info)] if denoiser == "transformer" else []),
        f"{info['height']}x{info['width']} px, views of {info['sample_size']}x{info['sample_size']} latents at stride"
        f" {info['stride']}: N={n} views, view_batch_size={info['view_batch_size']}, {info['steps']} steps,"
        f" sync_thres={info['sync_thres']}, guidance {info['guidance_scale']}, best of {info['repeat']}",
        f"Passes are view-passes in the first denoising step (synchronized except for multidiffusion). Expected per"
        f" synchronized step, exact mode: {label} fwd 2N-1={exp[denoiser + '_fwd']},"
        f" {label} bwd N-1={exp[denoiser + '_bwd']},"
        f" decoder fwd N={exp['dec_fwd']}, decoder bwd N-1={exp['dec_bwd']}, LPIPS N-1={exp['lpips_fwd']};"
        f" MultiDiffusion: {label} fwd N={n}."
        + (" ControlNet (cn) fwd and bwd: the UNet's." if controlnet else "")
        + " 'ok' = every count (step and whole call) equals the formula.",
        f"MD = the reference mode, {info['reference']}"
        f"{'; VAE tiling' if info['vae_tiling'] else ''}"
        f"{'; channels-last UNet and VAE' if info.get('channels_last') else ''}{emulated}."
        f" x MD: whole call vs the reference; step x MD: mean synchronized step vs the reference's mean step;"
        f" proj. x MD: a {info['project_steps']}-step run with sync_thres={info['project_sync_thres']},"
        f" projected from the per-step figures. 'cpu': the same ratios in this process's CPU time (steadier than wall"
        f" time when other processes share the CPU; meaningless on a GPU)."
        + (
            f" '{COMPILED_SUFFIX}': the same mode after the eager ones, {info['compile_mode']} compilation"
            f" ({info['compiled_blocks']}), caches in {info['compile_cache']}."
            if info.get("compile_mode")
            else ""
        )
        + f" 'first s': the mode's first call; 'compile s': torch's compiling in its {info['repeat']} call(s).",
        *([_regions_header(info)] if info.get("regions") else []),
        "",
    ]
    memory_kind = rows[0]["memory_kind"] if rows else ""
    header = [
        "mode",
        "total s",
        "first s",
        "compile s",
        "x MD",
        "step s",
        "step x MD",
        "proj. x MD",
        "cpu step x MD",
        "cpu proj. x MD",
        f"{DENOISER_COLUMNS[denoiser]} fwd",
        f"{DENOISER_COLUMNS[denoiser]} bwd",
        *(("cn fwd", "cn bwd") if controlnet else ()),
        "dec fwd",
        "dec bwd",
        "lpips",
        "ok",
        f"MiB ({memory_kind})",
    ]
    regions = any(row.get("regions") for row in rows)
    if regions:
        header += ["x plain", "cpu x plain"]
    table = []
    for row in rows:
        if row.get("error"):
            failed = "OOM" if row["error"].startswith("out of memory") else "error"
            table.append([row["mode"], failed] + ["-"] * (len(header) - 4) + ["NO", _fmt(row["peak_mem_mib"], ".0f")])
            continue
        counts = row["passes_sync_step"] or (
            {key: row["passes"][key] / info["steps"] for key in pass_keys} if info["steps"] else {}
        )
        step_time = row["sync_step_seconds"] if row["sync_step_seconds"] is not None else _mean(row["step_seconds"])
        cells = [
            row["mode"],
            _fmt(row["seconds"], ".2f"),
            _fmt(row["first_call_seconds"], ".2f"),
            _fmt(row["compile_seconds"], ".1f"),
            _fmt(row["ratio"], ".2f"),
            _fmt(step_time, ".2f"),
            _fmt(row["step_ratio"], ".2f"),
            _fmt(row["projected_ratio"], ".3f"),
            _fmt(row["cpu_step_ratio"], ".2f"),
            _fmt(row["cpu_projected_ratio"], ".3f"),
        ]
        cells += [_fmt(counts.get(key), "g") for key in pass_keys]
        cells += ["ok" if row["passes_match"] else "NO", _fmt(row["peak_mem_mib"], ".0f")]
        if regions:
            cells += [_fmt(row.get("region_ratio"), ".2f"), _fmt(row.get("cpu_region_ratio"), ".2f")]
        table.append(cells)
    widths = [max(len(str(r[i])) for r in [header] + table) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines.append(line(header))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(line(cells) for cells in table)
    costs = [row for row in rows if row.get("regions") and row.get("region_ratio") is not None]
    if costs:
        lines.append("")
        lines.append(
            f"Cost of {info['regions']} region prompts (whole call, wall time, one call each in this process, same"
            " settings): "
            + ", ".join(
                f"{row['mode']} x{row['region_ratio']:.2f} {_without_regions(row['mode'])}"
                f" (cpu time x{row['cpu_region_ratio']:.2f})"
                for row in costs
            )
        )
    return "\n".join(lines)


# Options a preset may set: the command line's defaults apply only where neither says anything.
OPTION_DEFAULTS = {"arch": "tiny", "steps": 2, "sync_thres": 2, "dtype": "float32", "view_batch_size": 1, "repeat": 1}


def _view_batch_size(text):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive integer or auto")
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a non-negative integer")
    return value


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction in (0, 1]")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m syncdiffusion_utils.benchmark",
        description="Time, count passes and measure memory of SyncDiffusion's modes against MultiDiffusion"
        " (random-weight models, nothing downloaded).",
    )
    parser.add_argument("--arch", choices=sorted(ARCH_DEFAULTS), help="architecture preset (default tiny)")
    parser.add_argument(
        "--width-mult",
        type=float,
        default=1.0,
        help="scale channel widths, for the transformers (flux, flux2-klein, z-image) their heads too (default 1:"
        " the real widths)",
    )
    parser.add_argument(
        "--depth-mult",
        type=float,
        default=1.0,
        help="flux, flux2-klein, z-image: scale the transformer's block counts (FLUX.1: 19 double and 38 single;"
        " klein-4B: 5 and 20; Z-Image: 30 layers and 2 + 2 refiners; default 1: the real depth)",
    )
    parser.add_argument(
        "--full-text-encoders",
        action="store_true",
        help="the text encoders at full depth (flux: CLIP and T5-XXL's encoder, default one block each;"
        " flux2-klein: Qwen3-4B's 36 layers, default the 28 it reads; z-image: Qwen3-4B's 36, default 2;"
        " they run once per call)",
    )
    parser.add_argument(
        "--max-sequence-length",
        type=int,
        default=512,
        help="flux, flux2-klein, z-image: text tokens of the prompt (T5's; Qwen3's) (default 512)",
    )
    parser.add_argument(
        "--sample-size",
        type=int,
        default=None,
        help="view window in latents (default: 8 tiny, 64 sd2, 128 sdxl, flux, flux2-klein and z-image)",
    )
    parser.add_argument(
        "--height",
        type=int,
        default=None,
        help="image height in pixels (default: 64 tiny, 512 sd2, 1024 sdxl and the transformers)",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=None,
        help="image width in pixels (default: 192 tiny, 1024 sd2, 2048 sdxl and the transformers)",
    )
    parser.add_argument("--steps", type=int, help="denoising steps (default 2)")
    parser.add_argument("--sync-thres", type=int, help="synchronized steps (default 2: all of them)")
    parser.add_argument(
        "--stride",
        type=int,
        default=None,
        help="view stride in latents (default: 4 tiny, 16 sd2, 32 sdxl and the transformers)",
    )
    parser.add_argument(
        "--view-batch-size",
        type=_view_batch_size,
        default=None,
        help="views per UNet call: an integer or auto (default 1)",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a whole GPU measurement: "
        + ", ".join(f"{name} ({p['height']}x{p['width']}, {p['steps']} steps)" for name, p in PRESETS.items()),
    )
    parser.add_argument("--reference", default=None, help=f"the mode ratios refer to (default {REFERENCE_MODE})")
    parser.add_argument(
        "--compile",
        action="store_true",
        help=f"also run every mode compiled (NAME{COMPILED_SUFFIX}), after the eager ones",
    )
    parser.add_argument(
        "--compile-mode",
        choices=compiling.COMPILE_MODES,
        help="compiled modes' compilation: regional (default: the repeated blocks of the denoiser and the VAE"
        " decoder) or whole (each model)",
    )
    parser.add_argument(
        "--compile-cache",
        metavar="DIR",
        default=None,
        help="torch's compile caches (default: $SYNCDIFFUSION_COMPILE_CACHE, else ~/.cache/syncdiffusion/torch-compile)",
    )
    parser.add_argument("--vae-tiling", action="store_true", help="decode the panorama in tiles (vae.enable_tiling)")
    parser.add_argument(
        "--channels-last", action="store_true", help="channels-last memory layout for the UNet and VAE"
    )
    parser.add_argument(
        "--offload-text-encoder",
        action="store_true",
        help="encode the prompt once, then keep the text encoder on the CPU",
    )
    parser.add_argument(
        "--memory-limit",
        dest="memory_limit_gib",
        type=float,
        default=None,
        metavar="GIB",
        help="emulate a CUDA card of this many GiB: cap the allocator and report the free memory left under the cap",
    )
    parser.add_argument(
        "--controlnet",
        action="store_true",
        help="SyncDiffusionControlNetPipeline with a random ControlNet of the arch and a random condition image",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="default 7.5; flux: 3.5, FLUX.1-dev's guidance embedding; flux2-klein: 4.0, z-image: 5.0 (their"
        " classifier-free guidance)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default float32")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--modes",
        help=f"comma-separated subset of {','.join(MODES)},{','.join(REFERENCE_PIPELINES)}, each optionally NAME@K or"
        " NAME@auto (its view_batch_size); the reference (multidiffusion) always runs first; default: all of the"
        f" first {len(MODES)}, or for flux, flux2-klein and z-image {','.join(TRANSFORMER_MODES)} and its diffusers"
        f" pipeline ({', '.join(FULL_SIZE_PIPELINES)})",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--repeat", type=int, help="run each mode this many times: the first call, and the fastest (default 1)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="a photo of a mountain range at twilight")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up call")
    parser.add_argument("--no-decode", action="store_true", help="skip the final VAE decode (output_type='latent')")
    parser.add_argument("--project-steps", type=int, default=50, help="steps of the projected run (default 50)")
    parser.add_argument(
        "--project-sync-thres", type=int, default=5, help="sync_thres of the projected run (default 5)"
    )
    parser.add_argument(
        "--regions",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help=f"also run every mode with N region prompts (NAME{REGIONS_SUFFIX}, right after it): boxes of the full"
        " height side by side in the middle of the width; passes checked against the region formula, cost against"
        " the mode without regions (default 0: none)",
    )
    parser.add_argument(
        "--region-coverage",
        type=_fraction,
        default=None,
        metavar="F",
        help=f"with --regions: the fraction of the width the boxes cover together (default {DEFAULT_REGION_COVERAGE})",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the configuration and rows as JSON")
    args = parser.parse_args(argv)
    if REGIONS_SUFFIX in (args.modes or "") and not args.regions:
        parser.error(f"--modes {args.modes}: a {REGIONS_SUFFIX} mode needs --regions N (N > 0)")
    if args.region_coverage is not None and not args.regions:
        parser.error(f"--region-coverage {args.region_coverage}: only with --regions N (N > 0)")
    if args.region_coverage is None:
        args.region_coverage = DEFAULT_REGION_COVERAGE
    compiled_modes = args.compile or COMPILED_SUFFIX in (args.modes or "")
    for flag, value in (("--compile-mode", args.compile_mode), ("--compile-cache", args.compile_cache)):
        if value is not None and not compiled_modes:
            parser.error(f"{flag}: only with --compile or a {COMPILED_SUFFIX} mode")
    if args.compile_mode is None:
        args.compile_mode = compiling.DEFAULT_COMPILE_MODE
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # A preset fills in what the command line leaves unset, then the defaults fill in the rest.
    preset = PRESETS[args.preset] if args.preset else {}
    # Without --modes (or a preset's), run_benchmark runs its architecture's default modes.
    for key, value in {**preset, **({"modes": ",".join(preset["modes"])} if "modes" in preset else {})}.items():
        if getattr(args, key, None) in (None, False):
            setattr(args, key, value)
    for key, value in OPTION_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    rows = run_benchmark(
        arch=args.arch,
        width_mult=args.width_mult,
        sample_size=args.sample_size,
        height=args.height,
        width=args.width,
        steps=args.steps,
        sync_thres=args.sync_thres,
        stride=args.stride,
        view_batch_size=args.view_batch_size,
        dtype=args.dtype,
        device=args.device,
        reference=args.reference or REFERENCE_MODE,
        compile=args.compile,
        compile_mode=args.compile_mode,
        compile_cache=args.compile_cache,
        vae_tiling=args.vae_tiling,
        controlnet=args.controlnet,
        channels_last=args.channels_last,
        memory_limit_gib=args.memory_limit_gib,
        offload_text_encoder=args.offload_text_encoder,
        depth_mult=args.depth_mult,
        full_text_encoders=args.full_text_encoders,
        max_sequence_length=args.max_sequence_length,
        modes=None if args.modes is None else [m.strip() for m in args.modes.split(",") if m.strip()],
        repeat=args.repeat,
        seed=args.seed,
        prompt=args.prompt,
        guidance_scale=args.guidance_scale,
        warmup=not args.no_warmup,
        decode=not args.no_decode,
        project_steps=args.project_steps,
        project_sync_thres=args.project_sync_thres,
        regions=args.regions,
        region_coverage=args.region_coverage,
    )
    info = rows.config
    print(format_table(info, rows))
    if args.preset and not args.json:
        device = "".join(c if c.isalnum() else "-" for c in info["device_name"].lower()).strip("-")
        args.json = os.path.join("benchmarks", f"{args.preset}-{device}.json")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"config": info, "rows": list(rows)}, f, indent=2)
    return 0 if all(row["passes_match"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
