"""Compiling a panorama pipeline with `torch.compile`, and the on-disk caches that let a second process start warm.

Two modes:

- `"regional"` (the default): the blocks each model repeats are compiled one by one (regional compilation), in the
  denoiser (UNet or transformer, and any ControlNet) and in the VAE decoder: the classes a model names in diffusers'
  `_repeated_blocks` (what `compile_repeated_blocks` compiles: the FLUX transformer's blocks, the UNet's transformer
  blocks) and `REPEATED_BLOCKS` (the ResNet blocks too, which the UNet's `_repeated_blocks` leaves out, and the VAE
  decoder's and TAESD's blocks). Blocks of one class and one shape share one compiled
  graph, forward and backward (AOTAutograd traces the backward of the gradient pass), so compiling costs a graph per
  distinct block shape, not a whole model per input shape.
- `"whole"`: each model's whole forward as one graph (`torch.compile(model)`), the denoiser and the VAE decoder.

Shapes are static (`dynamic=False`): `view_batch_size="auto"` batches views into at most two sizes per pass. Each
block class still sees many shapes (its channel widths, resolutions, batch sizes, with and without gradient): on the
Stable Diffusion 2 base architecture one synchronized call gave the UNet's and the decoder's `ResnetBlock2D` 103
graphs (measured with 9 views, batches of 9 and 5), past torch's default of 8 per function, beyond which torch runs
the block eagerly without a word. Both modes raise that limit to `RECOMPILE_LIMIT`.

The caches: torch keeps what it compiles on disk, per graph, as soon as it is compiled: Inductor's FX graph cache
(generated code), AOTAutograd's cache (forward and backward graphs), Triton's kernels and autotuning results. They
are all under `TORCHINDUCTOR_CACHE_DIR`, which `setup_compile_cache` points at one stated folder, so that every
process on the machine finds what an earlier one compiled (Dynamo still traces each graph again). These
caches are used rather than `torch.compiler.save_cache_artifacts` / `load_cache_artifacts`, which need an explicit
save at the end of a run: a run stopped halfway still leaves the graphs it compiled.
"""

import inspect
import os
import sys
from collections import Counter


COMPILE_MODES = ("regional", "whole")
DEFAULT_COMPILE_MODE = "regional"
# Blocks compiled in "regional" mode besides a model's own `_repeated_blocks`, by class name.
REPEATED_BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock", "AutoencoderTinyBlock")
# Compiled graphs one block function may keep. The SD 2 base UNet and VAE decoder needed 103 for one synchronized
# call (above); the rest is room for other image batches and a ControlNet's block shapes (not counted).
RECOMPILE_LIMIT = 512
CACHE_ENV = "SYNCDIFFUSION_COMPILE_CACHE"
# The Dynamo and Inductor timers whose sum is the compiling time (the backward is compiled on its first use).
_COMPILE_TIMERS = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")


def default_cache_dir():
    """`$XDG_CACHE_HOME/syncdiffusion/torch-compile`, with `XDG_CACHE_HOME` defaulting to `~/.cache`."""
    # The XDG base directory rule: an empty XDG_CACHE_HOME counts as unset.
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "syncdiffusion", "torch-compile")


def resolve_cache_dir(directory=None):
    """
    The compile cache folder: `directory` if given, else `$SYNCDIFFUSION_COMPILE_CACHE`, else torch's own
    `$TORCHINDUCTOR_CACHE_DIR` if the user set it, else `default_cache_dir()`. Raises `ValueError` for an empty one.
    """
    for name, value in (
        ("compile_cache", directory),
        (CACHE_ENV, os.environ.get(CACHE_ENV)),
        ("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR")),
    ):
        if value is None:
            continue
        if not str(value).strip():
            raise ValueError(f"{name}={value!r}: expected a folder for torch's compile caches, got an empty string")
        return os.path.abspath(os.path.expanduser(str(value)))
    return default_cache_dir()


def setup_compile_cache(directory=None):
    """
    Point torch's on-disk compile caches at one folder (see `resolve_cache_dir`), created if missing, for this
    process and the compile workers it starts. Call it before the first compiled call. Returns a dict: `directory`,
    and whether the FX graph cache and the AOTAutograd cache are on (torch's defaults; `TORCHINDUCTOR_FX_GRAPH_CACHE=0`
    or `TORCHINDUCTOR_AUTOGRAD_CACHE=0` turn them off). Raises `ValueError` if the folder cannot be created.
    """
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    directory = resolve_cache_dir(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise ValueError(f"compile_cache={directory!r}: cannot create the folder ({error.strerror})") from None
    if not os.access(directory, os.W_OK):
        raise ValueError(f"compile_cache={directory!r}: the folder is not writable")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
    if "torch._inductor.utils" in sys.modules:
        # Inductor remembers folders derived from the cache directory once it has used them.
        sys.modules["torch._inductor.utils"].clear_caches()
    return {
        "directory": directory,
        "fx_graph_cache": bool(inductor_config.fx_graph_cache),
        "autograd_cache": bool(functorch_config.enable_autograd_cache),
    }


def compile_seconds():
    """
    Seconds torch has spent compiling in this process so far (Dynamo's tracing and the backend's compiling, forward
    and backward), from torch's own timers; None where this torch version does not keep them.
    """
    from torch._dynamo import utils as dynamo_utils

    metrics = getattr(dynamo_utils, "compilation_time_metrics", None)
    if metrics is None:
        return None
    return float(sum(sum(metrics.get(name, ())) for name in _COMPILE_TIMERS))


def check_compile_mode(mode):
    """Raise `ValueError` naming `compile_mode` unless it is one of `COMPILE_MODES`."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode={mode!r}: expected one of {', '.join(COMPILE_MODES)}")


def repeated_block_names(model):
    """The class names of the blocks regional compilation compiles in `model`: its `_repeated_blocks` and ours."""
    return tuple(dict.fromkeys((*(getattr(model, "_repeated_blocks", None) or ()), *REPEATED_BLOCKS)))


def compiled_blocks(model):
    """How many submodules of `model` are compiled in place (`nn.Module.compile`), by class name."""
    return dict(Counter(type(m).__name__ for m in model.modules() if getattr(m, "_compiled_call_impl", None)))


def _limit_recompiles(compile_kwargs):
    """`compile_kwargs` with a per-call `recompile_limit` where torch.compile takes one (torch 2.14), else the same
    limit set globally; the cap on all the graphs of one function is raised to match."""
    import torch
    import torch._dynamo.config as dynamo_config

    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, RECOMPILE_LIMIT)
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        return {"recompile_limit": RECOMPILE_LIMIT, **compile_kwargs}
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    return compile_kwargs


def compile_blocks(model, names=None, **compile_kwargs):
    """
    Regional compilation: compile, in place, every submodule of `model` whose class name is in `names` (default
    `repeated_block_names(model)`), with `torch.compile` keyword arguments `compile_kwargs`. A block inside another
    compiled block is left to its parent's graph. Returns the count compiled by class name; raises `ValueError` if
    `model` has none of those blocks.
    """
    names = tuple(names) if names is not None else repeated_block_names(model)
    compile_kwargs = _limit_recompiles(compile_kwargs)
    counts = Counter()
    skip = set()
    for module in model.modules():
        if id(module) in skip:
            continue
        if type(module).__name__ in names:
            module.compile(**compile_kwargs)
            counts[type(module).__name__] += 1
            skip.update(id(inner) for inner in module.modules())
    if not counts:
        raise ValueError(f"{type(model).__name__} has none of the blocks {list(names)} to compile")
    return dict(counts)


def _attribute_of(pipe, model, default=None):
    """The name of the pipeline component that is `model` (`default` if none is; ValueError without a default)."""
    for name, component in pipe.components.items():
        if component is model:
            return name
    if default is None:
        raise ValueError(f"{type(model).__name__} is not a component of {type(pipe).__name__}")
    return default


def compile_pipeline(pipe, mode=DEFAULT_COMPILE_MODE, *, backend="inductor", dynamic=False, **compile_kwargs):
    """
    Compile `pipe`'s denoising models and its VAE decoder in `mode` (see the module doc), with `torch.compile`'s
    `backend`, `dynamic` and other keyword arguments. Returns `{"mode": mode, "models": {name: blocks}}`, where
    `blocks` counts the compiled blocks by class name (regional) or is `{"whole": 1}`.

    Regional mode compiles every model in `pipe.denoising_models` (ControlNets included) and `pipe.vae.decoder` in
    place; whole mode replaces `pipe.<denoiser>` and `pipe.vae.decoder` by their `torch.compile`d versions, as
    earlier versions of this project did. Compiling happens inside the first calls, for each new shape.
    """
    check_compile_mode(mode)
    compile_kwargs = {"backend": backend, "dynamic": dynamic, **compile_kwargs}
    models = {}
    if mode == "regional":
        for index, model in enumerate(pipe.denoising_models):
            # One of several ControlNets is no component itself: named by its class and place.
            name = _attribute_of(pipe, model, default=f"{type(model).__name__}.{index}")
            models[name] = compile_blocks(model, **compile_kwargs)
        models["vae.decoder"] = compile_blocks(pipe.vae.decoder, **compile_kwargs)
        return {"mode": mode, "models": models}

    import torch

    compile_kwargs = _limit_recompiles(compile_kwargs)
    name = _attribute_of(pipe, pipe.denoiser)
    setattr(pipe, name, torch.compile(getattr(pipe, name), **compile_kwargs))
    pipe.vae.decoder = torch.compile(pipe.vae.decoder, **compile_kwargs)
    return {"mode": mode, "models": {name: {"whole": 1}, "vae.decoder": {"whole": 1}}}


def compile_decoder(decoder, mode=DEFAULT_COMPILE_MODE, **compile_kwargs):
    """Compile a `sync_decoder` (e.g. `AutoencoderTiny`) the way `compile_pipeline` compiles the VAE's decoder, in
    place; returns its block counts (or `{"whole": 1}`)."""
    check_compile_mode(mode)
    compile_kwargs = {"backend": "inductor", "dynamic": False, **compile_kwargs}
    if mode == "regional":
        return compile_blocks(decoder.decoder, **compile_kwargs)
    import torch

    decoder.decoder = torch.compile(decoder.decoder, **_limit_recompiles(compile_kwargs))
    return {"whole": 1}


def uncompile_pipeline(pipe):
    """Undo `compile_pipeline`: blocks compiled in place run eagerly again, whole-model wrappers are unwrapped."""
    name = _attribute_of(pipe, pipe.denoiser)
    if hasattr(getattr(pipe, name), "_orig_mod"):
        setattr(pipe, name, getattr(pipe, name)._orig_mod)
    if hasattr(pipe.vae.decoder, "_orig_mod"):
        pipe.vae.decoder = pipe.vae.decoder._orig_mod
    for model in (*pipe.denoising_models, pipe.vae.decoder):
        for module in model.modules():
            if getattr(module, "_compiled_call_impl", None) is not None:
                module._compiled_call_impl = None
