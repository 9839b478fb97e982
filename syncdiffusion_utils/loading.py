"""Loading what a panorama needs: the device, the pipeline (Hub id, folder, single-file checkpoint or the offline
tiny models), its scheduler, a tiny decoder for the synchronization, a ControlNet and its condition, and LPIPS.

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
SINGLE_FILE_EXTENSIONS = (".safetensors", ".ckpt")  # `--model` as one checkpoint file in the original layout
SCHEDULERS = ("ddim", "euler", "dpm++", "keep")
# The paper's scheduler, with which its default `sync_weight=20` was chosen; `keep` leaves the model's own.
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


def _from_pretrained(model, torch_dtype):
    """`SyncDiffusionPipeline.from_pretrained`, turning "not found" into a `CLIError` that says how to get it."""
    from pipeline_syncdiffusion import SyncDiffusionPipeline

    if model.endswith(SINGLE_FILE_EXTENSIONS):
        return _from_single_file(model, torch_dtype)
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
    local_files_only = None if is_folder else _local_files_only()
    try:
        with _quiet_loading():
            return _pipeline_class(model, SyncDiffusionPipeline, local_files_only).from_pretrained(
                model, torch_dtype=torch_dtype, local_files_only=local_files_only
            )
    except (OSError, ValueError) as error:
        if is_folder:
            raise CLIError(
                f"--model {model!r}: cannot load the pipeline from this folder: {_first_line(error)}"
            ) from None
        where = "the local cache (HF_HUB_OFFLINE is set)" if _offline() else "the Hub or the local cache"
        raise CLIError(
            f"--model {model!r}: cannot find or download it from {where}. " + _WEIGHTS_HINT.format(model=model)
        ) from None


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


def _pipeline_class(model, default, local_files_only=None):
    """`SyncDiffusionXLPipeline` when the model's `model_index.json` names an SDXL pipeline, else `default`."""
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(model, local_files_only=local_files_only)
    class_name = config.get("_class_name")
    class_name = class_name[-1] if isinstance(class_name, (list, tuple)) else str(class_name)
    if "XL" not in class_name:
        return default
    from pipeline_syncdiffusion_xl import SyncDiffusionXLPipeline

    return SyncDiffusionXLPipeline


def load_pipeline(
    model=DEFAULT_MODEL,
    device="auto",
    fp16=False,
    *,
    scheduler=DEFAULT_SCHEDULER,
    attention_slicing=False,
    cpu_offload=False,
    progress=True,
    compile=False,
):
    """A ready `SyncDiffusionPipeline`: `model` is a Hub id, a local folder, or `"tiny"` (offline, random weights).

    `fp16` and `cpu_offload` are skipped with a printed note where they cannot help (on the CPU). `scheduler` is
    one of `SCHEDULERS`, or None to keep the model's. `compile` runs the UNet and the VAE decoder through
    `torch.compile` (the first call compiles: minutes; later calls are faster). Raises `CLIError` when the model
    cannot be found.
    """
    import torch

    device = resolve_device(device)
    check_device(device)
    dtype = torch.float32
    if fp16:
        if device.split(":")[0] == "cpu":
            note("--fp16 skipped on the CPU (float16 is slow or unsupported there): running in float32.")
        else:
            dtype = torch.float16

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
    else:
        pipe = _from_pretrained(model, dtype)

    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    if attention_slicing:
        pipe.enable_attention_slicing()
    if cpu_offload and device.split(":")[0] == "cpu":
        note("--cpu-offload skipped: there is no accelerator to offload from, the pipeline runs on the CPU.")
        cpu_offload = False
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if compile:
        # Views come in batches of at most two sizes, so shapes are static: no dynamic-shape compilation.
        pipe.unet = torch.compile(pipe.unet, dynamic=False)
        pipe.vae.decoder = torch.compile(pipe.vae.decoder, dynamic=False)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


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


def load_sync_decoder(name, pipe):
    """The `sync_decoder` for `pipe`: an `AutoencoderTiny` from a Hub id or folder (e.g. madebyollin/taesd), or
    `"tiny"` for the random one of `syncdiffusion_utils.testing` (offline; only meaningful with the tiny pipeline).
    """
    device = pipe._execution_device
    dtype = pipe.unet.dtype
    if name == TINY:
        from syncdiffusion_utils.testing import make_tiny_decoder

        decoder = make_tiny_decoder().to(device=device).requires_grad_(False)
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
    """The pipeline to save: `model` (Hub id, diffusers folder or single-file checkpoint) in float32, on the CPU."""
    import torch

    if model == TINY:
        from syncdiffusion_utils.testing import tiny_pipeline

        return tiny_pipeline(lpips_module=False)
    return _from_pretrained(model, torch.float32)
