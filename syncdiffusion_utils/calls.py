"""One way to prepare a pipeline call, shared by the command, the demo, `generate-set` and the examples.

    call = prepare_call(pipe, prompt="a photo of a mountain range", height=512, width=2048, sync_weight=20.0)
    image = pipe(**call, generator=generator(0)).images[0]

`prepare_call` fills in what the caller left out (None) from the pipeline class's own `__call__` defaults (SD:
512x2048, 50 steps, guidance 7.5, stride 8; SDXL: 1024x4096, guidance 5, its stride from the window; FLUX.1:
1024x4096, 28 steps, guidance 3.5 (its guidance embedding), its stride from the window, 512 T5 tokens), asks for
view batches sized by the pipeline (`view_batch_size="auto"`: the free GPU memory on CUDA, 16 views elsewhere), and
turns the VAE's tiling on when decoding the whole panorama at once would not fit in the free GPU memory. The
pipelines' own default, one view per UNet call and no tiling, is several times slower on a GPU (MultiDiffusion at
512x2048 on an H200: 35.66 s against 6.94 s with "auto").
"""

import inspect
import operator


# `__call__` arguments whose None means "left out": `prepare_call` replaces it with the class's default (those a
# class lacks, such as FLUX's `true_cfg_scale` and `max_sequence_length` for SD, are not added).
DEFAULTED = (
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "stride",
    "true_cfg_scale",
    "max_sequence_length",
)
VAE_TILING = ("auto", "on", "off")

# Elements per image pixel a whole-panorama VAE decode holds at its peak, per channel of the decoder's widest block
# at full resolution (SD's VAE: 128): estimated from a 6.07 GB peak measured on an H100 for a 512x3072 float16
# MultiDiffusion run (the final decode is its peak), less ~2.6 GB of SD 2 weights.
DECODE_ELEMENTS = 9


def call_defaults(pipe):
    """The defaults of the pipeline class's `__call__` for `DEFAULTED` (they differ for SDXL, ControlNet and FLUX; a
    None default, e.g. SDXL's and FLUX's stride or the ControlNet pipeline's size, is resolved by the pipeline)."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    return {name: parameters[name].default for name in DEFAULTED if name in parameters}


def window_pixels(pipe):
    """The side of one view in image pixels by default: FLUX's `default_window_size`, else the UNet's sample size
    times the VAE's scale factor."""
    if hasattr(pipe, "default_window_size"):
        return pipe.default_window_size
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def decode_fits(pipe, height, width, margin=0.8):
    """Whether decoding a `height x width` panorama at once fits in `margin` of the free GPU memory (always True off
    CUDA, where memory is not the limit)."""
    import torch

    device = pipe._execution_device
    if device.type != "cuda":
        return True
    channels = min(pipe.vae.config.block_out_channels)
    needed = DECODE_ELEMENTS * channels * height * width * torch.finfo(pipe.vae.dtype).bits // 8
    return needed < torch.cuda.mem_get_info(device)[0] * margin


def set_vae_tiling(pipe, mode, height, width):
    """Tile the VAE's decode: `mode` "on", "off", or "auto" (on when the whole panorama would not fit at once).
    Returns whether tiling is on."""
    if mode not in VAE_TILING:
        raise ValueError(f"`vae_tiling` has to be one of {', '.join(VAE_TILING)}, but is {mode!r}.")
    tiling = mode == "on" or (mode == "auto" and not decode_fits(pipe, height, width))
    if tiling:
        pipe.vae.enable_tiling()
    else:
        pipe.vae.disable_tiling()
    return tiling


def _image_size(image):
    """`(height, width)` of a ControlNet condition: a PIL image, a CHW/BCHW tensor, an HWC/BHWC array, or a list."""
    if isinstance(image, (list, tuple)):
        image = image[0]
    if hasattr(image, "size") and not callable(image.size):  # PIL: (width, height)
        return image.size[1], image.size[0]
    shape = tuple(image.shape)
    if type(image).__module__.startswith("torch"):
        return shape[-2], shape[-1]
    return (shape[-3], shape[-2]) if len(shape) >= 3 else shape


def _check_size(name, value):
    try:
        whole = not isinstance(value, bool) and operator.index(value) >= 1
    except TypeError:
        whole = False
    if not whole:
        raise ValueError(f"`{name}` has to be a positive whole number of pixels, but is {value!r}.")


def prepare_call(pipe, *, height=None, width=None, view_batch_size="auto", vae_tiling="auto", **call) -> dict:
    """Set up `pipe` for one call and return the keyword arguments of `pipe(**returned)`.

    Args:
        pipe: a loaded `SyncDiffusionPipeline`, `SyncDiffusionXLPipeline`, `SyncDiffusionControlNetPipeline` or
            `SyncDiffusionFluxPipeline`.
        height (`int`, *optional*), width (`int`, *optional*):
            The panorama's size in pixels; None: the class's default (for the ControlNet pipeline: the size of
            `image`).
        view_batch_size (`int` or `"auto"`, defaults to `"auto"`):
            Views per UNet call. `"auto"` (also for None) is passed on: the pipeline sizes its batches to the free
            GPU memory (16 views on a CPU or MPS). The image does not depend on it.
        vae_tiling (`str`, defaults to `"auto"`):
            `"on"`, `"off"`, or `"auto"`: tiled decoding (`pipe.vae.enable_tiling()`) when decoding the whole
            panorama at once would not fit in the free GPU memory. This changes `pipe.vae` for later calls too.
        **call:
            Any other `__call__` argument (`prompt`, `sync_weight`, `generator`, ...), passed on as given, except
            that a None `num_inference_steps`, `guidance_scale`, `stride`, `true_cfg_scale` or
            `max_sequence_length` becomes the class's default (where the class has that argument).

    Returns:
        `dict`: the arguments for `pipe(...)`, every one of `DEFAULTED` that the class has included.

    Raises `ValueError` naming the argument for a size that is not a positive whole number or an unknown
    `vae_tiling`, before `pipe` changes; the pipeline checks everything else when it is called.
    """
    call = {"height": height, "width": width, **call}
    for name, default in call_defaults(pipe).items():
        if call.get(name) is None:
            call[name] = default
    call["view_batch_size"] = "auto" if view_batch_size is None else view_batch_size

    height, width = call["height"], call["width"]
    if (height is None or width is None) and call.get("image") is not None:  # ControlNet: the condition's size
        image_height, image_width = _image_size(call["image"])
        height = image_height if height is None else height
        width = image_width if width is None else width
    for name, value in (("height", height), ("width", width)):
        _check_size(name, value)
    set_vae_tiling(pipe, vae_tiling, height, width)
    return call
