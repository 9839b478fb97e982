"""Loading what a panorama needs: the device, the pipeline (Hub id, folder, single-file checkpoint or the offline
tiny models; its class, SD, SDXL, FLUX.1, FLUX.2 [klein] or Z-Image, from the model's `model_index.json`), its
scheduler, a tiny decoder for the synchronization, a ControlNet and its condition, and LPIPS.

Shared by the `syncdiffusion` command, its subcommands (`demo`, `generate-set`, `export`, `publish`) and the scripts
in `examples/`. Expected failures (a model that cannot be found, a device this machine lacks, missing LPIPS weights)
raise `CLIError`, whose message is one line naming the flag; the command prints it and exits non-zero. torch and
diffusers are imported lazily, so `syncdiffusion --help` stays instant.
"""

import contextlib
import functools
import os
import sys
import warnings


DEFAULT_MODEL = "stabilityai/stable-diffusion-2-base"
TINY = "tiny"  # `--model tiny`: the offline random tiny pipeline of `syncdiffusion_utils.testing`
TINY_XL = "tiny-xl"  # `--model tiny-xl`: the offline random tiny SDXL pipeline (SyncDiffusionXLPipeline)
TINY_FLUX = "tiny-flux"  # `--model tiny-flux`: the offline random tiny FLUX.1 pipeline (SyncDiffusionFluxPipeline)
# `--model tiny-flux2`: the offline random tiny FLUX.2 [klein] base model (SyncDiffusionFlux2KleinPipeline)
TINY_FLUX2 = "tiny-flux2"
TINY_Z_IMAGE = "tiny-z-image"  # `--model tiny-z-image`: the offline random tiny Z-Image (SyncDiffusionZImagePipeline)
TINY_MODELS = (TINY, TINY_XL, TINY_FLUX, TINY_FLUX2, TINY_Z_IMAGE)
# The tiny transformer models' VAE sample size in latents (64 pixels): their default window, as 128 latents (1024
# pixels) are FLUX.1's, FLUX.2 [klein]'s and Z-Image's.
TINY_FLUX_SAMPLE_SIZE = 8
SINGLE_FILE_EXTENSIONS = (".safetensors", ".ckpt")  # `--model` as one checkpoint file in the original layout
SCHEDULERS = ("ddim", "euler", "dpm++", "keep")
# The diffusers class each --scheduler builds, to match it with a pipeline class's scheduler families.
SCHEDULER_CLASS_NAMES = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}
# The paper's scheduler, with which its default `sync_weight=20` was chosen; `keep` leaves the model's own (the
# transformer classes' default: their flow-matching scheduler, the only family they run).
DEFAULT_SCHEDULER = "ddim"

_WEIGHTS_HINT = (
    "To get the weights: run `hf auth login` (for gated models) and `hf download {model}`, or pass a local"
    " diffusers folder with --model (or `--model tiny` for an offline smoke run)."
)
HUB_PROBE_TIMEOUT = 3.0  # seconds to wait for the Hub's first answer before loading from the local cache alone
# Errors that are bugs, never dressed up as a one-line "cannot load" message.
_PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, ImportError, AssertionError, KeyError, IndexError)


class CLIError(Exception):
    """An expected failure: `main` prints its message as one line to stderr and returns `code`."""

    def __init__(self, message, code=1):
        super().__init__(" ".join(str(message).split()))
        self.code = code


def note(message):
    """A one-line note on stderr (something skipped or adjusted, not an error)."""
    print(f"note: {message}", file=sys.stderr, flush=True)


def resolve_device(device="auto"):
    """`"auto"`: cuda if available, else mps, else cpu; any other value is returned as given."""
    if device not in (None, "auto"):
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def check_device(device):
    """Raise `CLIError` naming --device unless torch can run on `device` here."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise CLIError(
            f"--device {device!r}: not a torch device; use auto, cuda, cuda:N, mps or cpu.", code=2
        ) from None
    mps = getattr(torch.backends, "mps", None)
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": mps is not None and mps.is_available()}
    if not available.get(kind, True):
        raise CLIError(f"--device {device!r}: {kind} is not available on this machine; use --device auto or cpu.")
    index = torch.device(device).index
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise CLIError(
            f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to"
            f" cuda:{torch.cuda.device_count() - 1}; use one of those or --device auto."
        )


def _offline():
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def _hub_reachable(endpoint):
    """Whether the Hub at `endpoint` answers at all (any HTTP status) within `HUB_PROBE_TIMEOUT` seconds.

    huggingface_hub retries a failed connection five times with backoff, about 23 s per file: without the probe an
    unreachable Hub took the command ~40 s to report. Asked once per endpoint and process.
    """
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT)
    except _PROGRAMMING_ERRORS:
        raise
    except Exception:  # no route, no name, refused, timed out: the HTTP client's own errors
        return False
    return True


def _local_files_only():
    """`local_files_only` for a Hub id: True (the local cache alone) when HF_HUB_OFFLINE is set or the Hub does not
    answer, else None (the library's default: the Hub, then the cache)."""
    from huggingface_hub import constants

    return True if _offline() or not _hub_reachable(constants.ENDPOINT) else None


def _first_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


@contextlib.contextmanager
def _quiet_loading():
    """diffusers logs "Couldn't connect to the Hub" and the like before raising, and newer versions warn that
    `torch_dtype` is now `dtype` (older ones only know `torch_dtype`): keep a failure to one line."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging

    verbosity = diffusers_logging.get_verbosity(), hub_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            yield
    finally:
        diffusers_logging.set_verbosity(verbosity[0])
        hub_logging.set_verbosity(verbosity[1])


def _check_model_path(model):
    """Whether `model` is a local folder; raises `CLIError` for a path that is not a diffusers pipeline folder."""
    is_folder = os.path.isdir(model)
    looks_local = model.startswith(("/", "./", "../", "~", ".\\")) or "\\" in model or model.count("/") > 1
    if not is_folder and looks_local:
        raise CLIError(
            f"--model {model!r}: no such folder, and not a Hub model id. " + _WEIGHTS_HINT.format(model=DEFAULT_MODEL)
        )
    if is_folder and not os.path.isfile(os.path.join(model, "model_index.json")):
        raise CLIError(
            f"--model {model!r}: not a diffusers pipeline folder (it has no model_index.json). "
            + _WEIGHTS_HINT.format(model=DEFAULT_MODEL)
        )
    return is_folder


def _cannot_load(model, is_folder, error):
    """The `CLIError` for a folder or Hub model that diffusers could not load (`error`)."""
    if is_folder:
        return CLIError(f"--model {model!r}: cannot load the pipeline from this folder: {_first_line(error)}")
    where = "the local cache (HF_HUB_OFFLINE is set)" if _offline() else "the Hub or the local cache"
    return CLIError(
        f"--model {model!r}: cannot find or download it from {where}. " + _WEIGHTS_HINT.format(model=model)
    )


def _from_pretrained(model, torch_dtype, pipeline_class=None):
    """`pipeline_class.from_pretrained` (default: the class `model_index.json` names), turning "not found" into a
    `CLIError` that says how to get it."""
    if model.endswith(SINGLE_FILE_EXTENSIONS):
        return _from_single_file(model, torch_dtype)
    is_folder = _check_model_path(model)
    local_files_only = None if is_folder else _local_files_only()
    try:
        with _quiet_loading():
            if pipeline_class is None:
                pipeline_class = _pipeline_class(model, local_files_only)
            return pipeline_class.from_pretrained(model, torch_dtype=torch_dtype, local_files_only=local_files_only)
    except (OSError, ValueError) as error:
        raise _cannot_load(model, is_folder, error) from None


def _from_single_file(path, torch_dtype):
    """`SyncDiffusionPipeline.from_single_file` for a checkpoint in the original layout (A1111 / Civitai files)."""
    from pipeline_syncdiffusion import SyncDiffusionPipeline

    if not os.path.isfile(path):
        raise CLIError(f"--model {path!r}: no such checkpoint file.")
    try:
        with _quiet_loading():
            return SyncDiffusionPipeline.from_single_file(
                path, torch_dtype=torch_dtype, local_files_only=bool(_local_files_only())
            )
    except _PROGRAMMING_ERRORS:
        raise
    except Exception as error:  # a corrupt file, or the component configs not cached and no network, ...
        raise CLIError(
            f"--model {path!r}: cannot load this checkpoint: {_first_line(error)} (the component configs of its"
            " base model come from the Hub, or its local cache, on first use)"
        ) from None


# `model_index.json` class names of FLUX.1 text-to-image models (and of a saved SyncDiffusionFluxPipeline).
FLUX_CLASS_NAMES = ("FluxPipeline", "SyncDiffusionFluxPipeline")
# Those of FLUX.2 [klein] text-to-image models (base and step-distilled) and of Z-Image ones (Z-Image, Turbo).
FLUX2_KLEIN_CLASS_NAMES = ("Flux2KleinPipeline", "SyncDiffusionFlux2KleinPipeline")
Z_IMAGE_CLASS_NAMES = ("ZImagePipeline", "SyncDiffusionZImagePipeline")


def _flux2_klein_class():
    from pipeline_syncdiffusion_flux2 import SyncDiffusionFlux2KleinPipeline

    return SyncDiffusionFlux2KleinPipeline


def _z_image_class():
    from pipeline_syncdiffusion_z_image import SyncDiffusionZImagePipeline

    return SyncDiffusionZImagePipeline


def _pipeline_class(model, local_files_only=None):
    """The SyncDiffusion class for the pipeline the model's `model_index.json` names: `SyncDiffusionFluxPipeline`
    for FLUX.1, `SyncDiffusionFlux2KleinPipeline` for FLUX.2 [klein], `SyncDiffusionZImagePipeline` for Z-Image,
    `SyncDiffusionXLPipeline` for SDXL, else `SyncDiffusionPipeline`. Raises `CLIError` for FLUX.2 [dev] and for
    another FLUX, FLUX.2 or Z-Image pipeline (Fill, Kontext, inpainting, ControlNet, ...), whose models take other
    inputs."""
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(model, local_files_only=local_files_only)
    class_name = config.get("_class_name")
    class_name = class_name[-1] if isinstance(class_name, (list, tuple)) else str(class_name)
    if class_name in FLUX_CLASS_NAMES:
        from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline

        return SyncDiffusionFluxPipeline
    if class_name in FLUX2_KLEIN_CLASS_NAMES:
        return _flux2_klein_class()
    if class_name in Z_IMAGE_CLASS_NAMES:
        return _z_image_class()
    if class_name == "Flux2Pipeline":
        # FLUX.2 [dev] shares klein's transformer class and VAE, not its text encoder (Mistral Small 3, not Qwen3)
        # nor its guidance (an embedding, not classifier-free): klein's class would run it wrong.
        raise CLIError(
            f"--model {model!r} is FLUX.2 [dev] (Flux2Pipeline), which SyncDiffusion does not support: its FLUX.2"
            " pipeline takes FLUX.2 [klein] models (Flux2KleinPipeline), e.g. black-forest-labs/FLUX.2-klein-4B or"
            " black-forest-labs/FLUX.2-klein-base-4B.",
            code=2,
        )
    if "Flux2" in class_name:
        raise CLIError(
            f"--model {model!r} is a {class_name} model: SyncDiffusion's FLUX.2 pipeline takes FLUX.2 [klein]"
            " text-to-image models (Flux2KleinPipeline), e.g. black-forest-labs/FLUX.2-klein-4B.",
            code=2,
        )
    if "ZImage" in class_name:
        raise CLIError(
            f"--model {model!r} is a {class_name} model: SyncDiffusion's Z-Image pipeline takes Z-Image"
            " text-to-image models (ZImagePipeline), e.g. Tongyi-MAI/Z-Image-Turbo.",
            code=2,
        )
    if "Flux" in class_name:
        raise CLIError(
            f"--model {model!r} is a {class_name} model: SyncDiffusion's FLUX pipeline takes FLUX.1 text-to-image"
            " models (FluxPipeline), e.g. black-forest-labs/FLUX.1-dev or black-forest-labs/FLUX.1-schnell.",
            code=2,
        )
    if "XL" in class_name:
        from pipeline_syncdiffusion_xl import SyncDiffusionXLPipeline

        return SyncDiffusionXLPipeline
    from pipeline_syncdiffusion import SyncDiffusionPipeline

    return SyncDiffusionPipeline


def pipeline_class_of(model):
    """The class `load_pipeline(model)` builds, found without loading any weights: from `model_index.json` for a
    folder or Hub id (downloading that file alone), `SyncDiffusionPipeline` for a single-file checkpoint, the tiny
    models' own classes. Raises `CLIError` as `load_pipeline` does when the model cannot be found."""
    if model in TINY_MODELS or model.endswith(SINGLE_FILE_EXTENSIONS):
        if model == TINY_XL:
            from pipeline_syncdiffusion_xl import SyncDiffusionXLPipeline

            return SyncDiffusionXLPipeline
        if model == TINY_FLUX:
            from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline

            return SyncDiffusionFluxPipeline
        if model == TINY_FLUX2:
            return _flux2_klein_class()
        if model == TINY_Z_IMAGE:
            return _z_image_class()
        from pipeline_syncdiffusion import SyncDiffusionPipeline

        return SyncDiffusionPipeline
    is_folder = _check_model_path(model)
    try:
        with _quiet_loading():
            return _pipeline_class(model, None if is_folder else _local_files_only())
    except (OSError, ValueError) as error:
        raise _cannot_load(model, is_folder, error) from None


def _is_class(pipeline_class, name):
    """Whether `pipeline_class` is the class `name` or a subclass (found by name along the MRO: a copy loaded from a
    repo's own file counts, and the check imports no pipeline file)."""
    return any(base.__name__ == name for base in pipeline_class.__mro__)


def is_flux(pipeline_class):
    """Whether `pipeline_class` is `SyncDiffusionFluxPipeline` (FLUX.1) or a subclass."""
    return _is_class(pipeline_class, "SyncDiffusionFluxPipeline")


def is_flux2_klein(pipeline_class):
    """Whether `pipeline_class` is `SyncDiffusionFlux2KleinPipeline` (FLUX.2 [klein]) or a subclass."""
    return _is_class(pipeline_class, "SyncDiffusionFlux2KleinPipeline")


def is_z_image(pipeline_class):
    """Whether `pipeline_class` is `SyncDiffusionZImagePipeline` (Z-Image) or a subclass."""
    return _is_class(pipeline_class, "SyncDiffusionZImagePipeline")


def is_transformer_pipeline(pipeline_class):
    """Whether `pipeline_class` denoises with a transformer (FLUX.1, FLUX.2 [klein], Z-Image): its exact
    synchronization gradient is named "transformer"."""
    return getattr(pipeline_class, "sync_denoiser_gradient", "unet") == "transformer"


def half_precision_dtype(pipeline_class):
    """The dtype `--fp16` runs `pipeline_class` in: float16 for the UNet classes, bfloat16 for the transformer ones
    (trained and shipped in bfloat16; FLUX.1's activations overflow float16)."""
    import torch

    return torch.bfloat16 if is_transformer_pipeline(pipeline_class) else torch.float16


def schedulers_for(pipeline_class):
    """The `SCHEDULERS` that `pipeline_class` runs: those of its scheduler families, and "keep" (SD, SDXL and
    ControlNet: all four; FLUX, flow matching only: "keep")."""
    from pipeline_syncdiffusion import SCHEDULER_FAMILIES

    supported = {name for family in pipeline_class._scheduler_families for name in SCHEDULER_FAMILIES[family]}
    return tuple(name for name in SCHEDULERS if name == "keep" or SCHEDULER_CLASS_NAMES[name] in supported)


def resolve_scheduler(pipeline_class, scheduler=None):
    """`scheduler` checked against `pipeline_class`; None is the class's default (`DEFAULT_SCHEDULER`, or "keep"
    where the class does not run it: the transformer classes). Raises `CLIError` naming --scheduler for one the
    class cannot run."""
    allowed = schedulers_for(pipeline_class)
    default = DEFAULT_SCHEDULER if DEFAULT_SCHEDULER in allowed else "keep"
    if scheduler is None:
        return default
    if scheduler not in SCHEDULERS:
        raise CLIError(f"--scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}.", code=2)
    if scheduler not in allowed:
        families = " or ".join(pipeline_class._scheduler_families)
        choices = " or ".join(f"--scheduler {name}" for name in allowed)
        raise CLIError(
            f"--scheduler {scheduler}: {pipeline_class.__name__} runs {families} schedulers only; use {choices}"
            f" (keep: the model's own scheduler{', the default here' if default == 'keep' else ''}).",
            code=2,
        )
    return scheduler


def load_pipeline(
    model=DEFAULT_MODEL,
    device="auto",
    fp16=False,
    *,
    scheduler=None,
    attention_slicing=False,
    cpu_offload=False,
    progress=True,
    compile=False,
    compile_mode=None,
    compile_cache=None,
):
    """A ready pipeline: `model` is a Hub id, a local folder, a single-file checkpoint, or one of `TINY_MODELS`
    (offline, random weights). The class is the one `pipeline_class_of(model)` finds: `SyncDiffusionPipeline`,
    `SyncDiffusionXLPipeline`, `SyncDiffusionFluxPipeline`, `SyncDiffusionFlux2KleinPipeline` or
    `SyncDiffusionZImagePipeline`.

    `fp16` is half precision, `half_precision_dtype(class)`: float16, bfloat16 for the transformer classes (FLUX.1
    overflows float16; Z-Image keeps its latents in float32 either way). `fp16` and `cpu_offload` are skipped with a
    printed note where they cannot help (on the CPU). `scheduler` is one of the class's `schedulers_for`, or None
    for its default (`DEFAULT_SCHEDULER`; the transformer classes: "keep", their own flow-matching one); one the
    class cannot run is a `CLIError` before any weights load.

    `compile` compiles the denoiser and the VAE decoder with `torch.compile` (`syncdiffusion_utils.compiling`):
    `compile_mode` "regional" (the default: their repeated blocks) or "whole"; the first calls compile, and torch's
    caches in `compile_cache` (default `$SYNCDIFFUSION_COMPILE_CACHE`, else ~/.cache/syncdiffusion/torch-compile)
    spare later processes most of it.
    Raises `CLIError` when the model cannot be found or a compile option is wrong.
    """
    import torch

    device = resolve_device(device)
    check_device(device)
    compile_mode = _compile_options(compile, compile_mode, compile_cache)
    pipeline_class = pipeline_class_of(model)
    scheduler = resolve_scheduler(pipeline_class, scheduler)
    dtype = torch.float32
    if fp16:
        if device.split(":")[0] == "cpu":
            note("--fp16 skipped on the CPU (float16 is slow or unsupported there): running in float32.")
        else:
            dtype = half_precision_dtype(pipeline_class)

    if model == TINY:
        from syncdiffusion_utils.testing import tiny_pipeline

        with warnings.catch_warnings():  # torchvision's notes about the random LPIPS backbone's arguments
            warnings.simplefilter("ignore", UserWarning)
            pipe = tiny_pipeline()
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    elif model == TINY_XL:
        from syncdiffusion_utils.testing import tiny_xl_pipeline

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            pipe = tiny_xl_pipeline()
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    elif model in (TINY_FLUX, TINY_FLUX2, TINY_Z_IMAGE):
        pipe = _tiny_transformer_pipeline(model, pipeline_class)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        pipe = _from_pretrained(model, dtype, pipeline_class)

    set_scheduler(pipe, scheduler)
    if attention_slicing and is_transformer_pipeline(pipeline_class):
        note(
            f"--attention-slicing skipped: {pipeline_class.__name__}'s transformer has no attention slicing (its"
            " attention is SDPA's)."
        )
    elif attention_slicing:
        pipe.enable_attention_slicing()
    if cpu_offload and device.split(":")[0] == "cpu":
        note("--cpu-offload skipped: there is no accelerator to offload from, the pipeline runs on the CPU.")
        cpu_offload = False
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if compile:
        from syncdiffusion_utils.compiling import compile_pipeline

        # Views come in batches of at most two sizes, so shapes are static: no dynamic-shape compilation.
        compile_pipeline(pipe, compile_mode, dynamic=False)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


def _tiny_transformer_maker(model):
    """The `syncdiffusion_utils.testing` function that builds the tiny transformer model `model`."""
    from syncdiffusion_utils import testing

    makers = {
        TINY_FLUX: testing.tiny_flux_pipeline,
        TINY_FLUX2: testing.tiny_flux2_klein_pipeline,
        TINY_Z_IMAGE: testing.tiny_z_image_pipeline,
    }
    return makers[model]


def _tiny_transformer_pipeline(model, pipeline_class):
    """`--model tiny-flux`, `tiny-flux2` or `tiny-z-image`: the tiny random FLUX.1, FLUX.2 [klein] (a base model:
    classifier-free guidance) or Z-Image of `syncdiffusion_utils.testing` in `pipeline_class`, with a random LPIPS;
    its default window is the tiny VAE's 64-pixel sample size, as the real models' is their 1024 pixels."""
    with warnings.catch_warnings():  # torchvision's notes about the random LPIPS backbone's arguments
        warnings.simplefilter("ignore", UserWarning)
        pipe = _tiny_transformer_maker(model)(pipeline_class=pipeline_class)
    pipe.default_sample_size = TINY_FLUX_SAMPLE_SIZE
    return pipe


def _compile_options(compile, compile_mode, compile_cache):
    """The compile mode `load_pipeline` uses, after pointing torch's compile caches at their folder; raises
    `CLIError` naming --compile-mode or --compile-cache for a wrong value, or one given without --compile."""
    from syncdiffusion_utils.compiling import COMPILE_MODES, DEFAULT_COMPILE_MODE, setup_compile_cache

    if not compile:
        options = (("--compile-mode", compile_mode), ("--compile-cache", compile_cache))
        given = [flag for flag, value in options if value is not None]
        if given:
            raise CLIError(f"{' and '.join(given)}: only with --compile (nothing is compiled without it).", code=2)
        return None
    compile_mode = DEFAULT_COMPILE_MODE if compile_mode is None else compile_mode
    if compile_mode not in COMPILE_MODES:
        raise CLIError(f"--compile-mode {compile_mode!r}: choose one of {', '.join(COMPILE_MODES)}.", code=2)
    try:
        setup_compile_cache(compile_cache)
    except ValueError as error:
        raise CLIError(f"--compile-cache: {error}", code=2) from None
    return compile_mode


def set_scheduler(pipe, name):
    """Replace `pipe.scheduler` by `name` ("ddim", "euler" or "dpm++") built from the current scheduler's config;
    `"keep"` leaves the model's own scheduler."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "keep":
        pass
    elif name == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif name == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    elif name == "dpm++":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    else:
        raise CLIError(f"--scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}.", code=2)
    return pipe.scheduler


def _tiny_flux2_decoder(seed=0):
    """A random-weight `AutoencoderTiny` for FLUX.2's 32-channel VAE latent: TAESD's architecture (factor 8) at
    TAEF1's width, with 32 latent channels, as TAEF2 takes that latent."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(
        encoder_block_out_channels=(64,) * 4, decoder_block_out_channels=(64,) * 4, latent_channels=32
    ).eval()


def load_sync_decoder(name, pipe):
    """The `sync_decoder` for `pipe`: an `AutoencoderTiny` from a Hub id or folder (e.g. madebyollin/taesd; for FLUX.1
    and Z-Image, whose VAE is FLUX.1's, madebyollin/taef1; for FLUX.2 [klein] a decoder of its 32-channel latent), or
    `"tiny"` for a random one (offline; only meaningful with the tiny pipelines: TAESD's architecture, TAEF1's for
    FLUX.1 and Z-Image, 32 latent channels for FLUX.2 [klein]).
    """
    device = pipe._execution_device
    dtype = pipe.denoiser.dtype
    if name == TINY:
        from syncdiffusion_utils.testing import make_tiny_decoder, make_tiny_flux_decoder

        if is_flux2_klein(type(pipe)):
            make = _tiny_flux2_decoder
        elif is_flux(type(pipe)) or is_z_image(type(pipe)):
            make = make_tiny_flux_decoder
        else:
            make = make_tiny_decoder
        decoder = make().to(device=device).requires_grad_(False)
        return decoder.to(dtype=dtype) if dtype != decoder.dtype else decoder

    from diffusers import AutoencoderTiny

    if not os.path.isdir(name) and (name.startswith(("/", "./", "../", "~")) or name.count("/") > 1):
        raise CLIError(f"--sync-decoder {name!r}: no such folder, and not a Hub model id.")
    try:
        with _quiet_loading():
            decoder = AutoencoderTiny.from_pretrained(
                name, torch_dtype=dtype, local_files_only=None if os.path.isdir(name) else _local_files_only()
            )
    except (OSError, ValueError) as error:
        raise CLIError(
            f"--sync-decoder {name!r}: cannot load an AutoencoderTiny ({_first_line(error)}). Run"
            f" `hf download {name}` where there is network, or pass a local folder."
        ) from None
    return decoder.to(device=device).eval().requires_grad_(False)


def load_control_image(path):
    """The ControlNet condition at `path` as an RGB PIL image; raises `CLIError` naming --control-image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise CLIError(f"--control-image {path!r} cannot be read as an image: {_first_line(error)}") from None


def with_controlnet(pipe, name):
    """`pipe` as a `SyncDiffusionControlNetPipeline` sharing its models (on its device, offloaded if it was), with the
    `ControlNetModel` `name`: a Hub id or folder (e.g. lllyasviel/control_v11f1p_sd15_depth), or `"tiny"` (random
    weights, for the tiny pipeline)."""
    from diffusers import ControlNetModel

    from pipeline_syncdiffusion import SyncDiffusionPipeline
    from pipeline_syncdiffusion_controlnet import SyncDiffusionControlNetPipeline

    if not isinstance(pipe, SyncDiffusionPipeline):
        raise CLIError(f"--controlnet works with Stable Diffusion 1.x and 2.x models, not a {type(pipe).__name__}.", 2)
    device, dtype = pipe._execution_device, pipe.unet.dtype
    if name == TINY:
        from syncdiffusion_utils.testing import make_tiny_controlnet

        controlnet = make_tiny_controlnet(pipe.unet)
    else:
        if not os.path.isdir(name) and (name.startswith(("/", "./", "../", "~")) or name.count("/") > 1):
            raise CLIError(f"--controlnet {name!r}: no such folder, and not a Hub model id.")
        try:
            with _quiet_loading():
                controlnet = ControlNetModel.from_pretrained(
                    name, torch_dtype=dtype, local_files_only=None if os.path.isdir(name) else _local_files_only()
                )
        except (OSError, ValueError) as error:
            raise CLIError(
                f"--controlnet {name!r}: cannot load a ControlNetModel ({_first_line(error)}). Run"
                f" `hf download {name}` where there is network, or pass a local folder."
            ) from None
    expected, found = pipe.unet.config.cross_attention_dim, controlnet.config.cross_attention_dim
    if expected != found:
        raise CLIError(
            f"--controlnet {name!r} was trained for another base model (text features of size {found}, the UNet's"
            f" are {expected}): use a ControlNet for this --model (SD 1.5 ControlNets need an SD 1.5 --model)."
        )
    offloaded = bool(getattr(pipe, "_all_hooks", None))
    if offloaded:
        pipe.remove_all_hooks()  # offloading is set up again on the new pipeline, with the ControlNet
    with _quiet_loading():  # `from_pipe` casts every model to `torch_dtype`, warning for each
        pipe = SyncDiffusionControlNetPipeline.from_pipe(
            pipe, controlnet=controlnet.eval().requires_grad_(False), torch_dtype=dtype
        )
    if offloaded:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def load_perceptual_loss(pipe, weights=None):
    """Build `pipe`'s LPIPS now, from `weights` (torchvision's VGG-16 file) or torch's hub cache (downloading it),
    so that missing weights are a one-line `CLIError` before any model runs."""
    try:
        if weights is not None:
            pipe.set_perceptual_loss(vgg_weights=os.path.expanduser(weights))
        pipe.perceptual_loss(pipe._execution_device)
    except ValueError as error:
        raise CLIError(str(error).replace("`vgg_weights`", "--lpips-weights"), code=2) from None
    except OSError as error:  # no network and no cached weights
        raise CLIError(
            f"{error} In this command: --lpips-weights PATH (or --sync-weight 0: MultiDiffusion)."
        ) from None


def load_for_export(model):
    """The pipeline to save: `model` (Hub id, diffusers folder, single-file checkpoint or a tiny model) in float32,
    on the CPU."""
    import torch

    if model == TINY:
        from syncdiffusion_utils.testing import tiny_pipeline

        return tiny_pipeline(lpips_module=False)
    if model == TINY_XL:
        from syncdiffusion_utils.testing import tiny_xl_pipeline

        return tiny_xl_pipeline(lpips_module=False)
    if model in (TINY_FLUX, TINY_FLUX2, TINY_Z_IMAGE):
        return _tiny_transformer_maker(model)(pipeline_class=pipeline_class_of(model), lpips_module=False)
    return _from_pretrained(model, torch.float32)
