"""The `syncdiffusion` command: a prompt in, a panorama PNG out.

    syncdiffusion "a photo of a mountain range at twilight" -o mountains.png
    syncdiffusion "a photo of a city skyline at night" --compare -o compare.png
    syncdiffusion "a cozy living room" --model tiny -o smoke.png      # offline smoke run, random weights
    syncdiffusion "a harbour at dawn" --model black-forest-labs/FLUX.1-dev -o flux.png  # FLUX.1, 1024x4096
    syncdiffusion "a desert canyon" --sync-weight 0,10,20,40 -o sweep.png  # one seed, one labelled row per weight
    syncdiffusion "a green meadow" --region "a red barn" box:0.4,0.3,0.6,1 \
        --region "a full moon" moon_mask.png -o farm.png               # a prompt per region: white in the mask
    syncdiffusion "a harbour at dawn" --image photo.jpg --outpaint center -o harbour.png  # extend a photo
    syncdiffusion "a harbour at dusk" --image harbour.png --strength 0.6 -o dusk.png   # image-to-image
    syncdiffusion "a harbour at dawn" --image harbour.png --mask mask.png -o fixed.png  # repaint the white
    syncdiffusion "a coastal town" --control-image depth.png --controlnet lllyasviel/control_v11f1p_sd15_depth \
        --model stable-diffusion-v1-5/stable-diffusion-v1-5                 # follows the layout of depth.png
    syncdiffusion generate "demo"                                     # a prompt that is a subcommand's name
    syncdiffusion publish your-name/syncdiffusion                     # upload the pipeline to the Hub

Also `python -m syncdiffusion_utils.cli`. Expected failures (a bad size or stride, a model that cannot be found,
an output that cannot be written) print one line to stderr and exit non-zero.

This module holds the argument parsing and the subcommands; loading models is `syncdiffusion_utils.loading`, and
the call every entry point makes is `syncdiffusion_utils.calls.prepare_call`. `generator`, `save_image` and
`example_parser` are shared with the scripts in `examples/`. torch and diffusers are imported lazily, so `--help`
is instant.
"""

import argparse
import math
import os
import random
import re
import sys
import time
import traceback

from syncdiffusion_utils.calls import prepare_call
from syncdiffusion_utils.loading import (
    _PROGRAMMING_ERRORS,
    DEFAULT_MODEL,
    DEFAULT_SCHEDULER,
    SCHEDULERS,
    TINY,
    TINY_FLUX,
    TINY_MODELS,
    TINY_XL,
    CLIError,
    is_flux,
    load_control_image,
    load_for_export,
    load_perceptual_loss,
    load_pipeline,
    load_sync_decoder,
    note,
    pipeline_class_of,
    resolve_scheduler,
    with_controlnet,
)


DEFAULT_SIZE = {"real": (512, 2048, 50), TINY: (64, 256, 10)}  # height, width, steps when not given
DEFAULT_SIZE[TINY_XL] = DEFAULT_SIZE[TINY_FLUX] = DEFAULT_SIZE[TINY]
# T5 tokens of `--model tiny-flux` (its tokenizer has one token per character): a tenth of the time of FLUX's 512.
TINY_MAX_SEQUENCE_LENGTH = 64
DEFAULT_OUTPUT = "panorama.png"
DEFAULT_COMPARE_OUTPUT = "compare.png"

# Pipeline argument -> the flag that sets it, to turn the pipeline's input errors into command-line errors.
ARGUMENT_FLAGS = {
    "prompt": "PROMPT",
    "height": "--height",
    "width": "--width",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "negative_prompt": "--negative-prompt",
    "stride": "--stride",
    "view_batch_size": "--view-batch-size",
    "circular_padding": "--circular",
    "sync_weight": "--sync-weight",
    "sync_decay_rate": "--sync-decay-rate",
    "sync_freq": "--sync-freq",
    "sync_thres": "--sync-thres",
    "sync_mode": "--sync-mode",
    "sync_gradient": "--sync-gradient",
    "sync_reuse_noise": "--sync-reuse-noise",
    "sync_decoder": "--sync-decoder",
    "sync_lpips_size": "--sync-lpips-size",
    "sync_decode_downsample": "--sync-decode-downsample",
    "sync_gradient_checkpointing": "--sync-gradient-checkpointing",
    "image": "--control-image",
    "controlnet_conditioning_scale": "--controlnet-scale",
    "true_cfg_scale": "--true-cfg-scale",
    "max_sequence_length": "--max-sequence-length",
    "region_prompts": "--region",
    "region_masks": "--region",
    "region_bootstrap_steps": "--region-bootstrap-steps",
    "mask_image": "--mask",
    "strength": "--strength",
    "sync_anchor": "--sync-anchor",
}
# The same for a class whose `image` is the image to start from (--image), not a ControlNet condition.
START_IMAGE_FLAGS = {**ARGUMENT_FLAGS, "image": "--image"}
# `place_photo`'s argument -> the flag that sets it.
OUTPAINT_FLAGS = {"position": "--outpaint", "circular": "--circular", "height": "--height", "width": "--width"}
OUTPAINT_POSITIONS = ("left", "center", "right")
SYNC_ANCHORS = ("center", "image")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage dump) and do not exit the interpreter."""

    def error(self, message):
        raise CLIError(f"{message} (see `{self.prog} --help`)", code=2)


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared with examples/
# ----------------------------------------------------------------------------------------------------------------


def generator(seed):
    """A CPU `torch.Generator` seeded with `seed`: the same noise whatever the device."""
    import torch

    return torch.Generator(device="cpu").manual_seed(int(seed))


def save_image(image, path):
    """Save `image` to `path` (creating its folder) and print `wrote PATH (WxH pixels)`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    image.save(path)
    print(f"wrote {path} ({image.width}x{image.height} pixels)", flush=True)
    return path


def example_parser(doc, output, prompt):
    """The command line every example shares: --tiny, --model, --device, --prompt, --seed, --output."""
    description = (doc or "").strip()
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="run offline on the tiny random pipeline (seconds on CPU)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"Hub id or local folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default)")
    parser.add_argument("--prompt", default=prompt, help=f"default: {prompt!r}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", "-o", default=output, help=f"PNG to write (default: {output})")
    return parser


def label_and_stack(images_and_labels, background="white", color="black"):
    """Stack images vertically, each under a band holding its label (PIL's default font)."""
    from PIL import Image, ImageDraw, ImageFont

    width = max(image.width for image, _ in images_and_labels)
    size = max(10, min(48, min(image.height for image, _ in images_and_labels) // 16))
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(3, size // 3)
    bands = []
    for _, label in images_and_labels:
        left, top, right, bottom = measure.textbbox((0, 0), label, font=font)
        bands.append((bottom - top + 2 * pad, top))
    height = sum(image.height + band for (image, _), (band, _) in zip(images_and_labels, bands))
    canvas = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(canvas)
    y = 0
    for (image, label), (band, top) in zip(images_and_labels, bands):
        draw.text((pad, y + pad - top), label, fill=color, font=font)
        y += band
        canvas.paste(image.convert("RGB"), (0, y))
        y += image.height
    return canvas


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _view_batch_size(text):
    return text if text == "auto" else _positive_int(text)


def _sync_weights(text):
    """--sync-weight: one number >= 0 (a float), or a comma list of different ones such as 0,10,20,40 (a tuple)."""
    allowed = "a number >= 0 or a comma list of them such as 0,10,20,40"
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            what = "an empty item" if not item.strip() else repr(item.strip())
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r} ({what})") from None
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r} ({item.strip()} is not >= 0)")
        if value in values:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r} ({value:g} twice)")
        values.append(value)
    return values[0] if len(values) == 1 else tuple(values)


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _strength(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:  # also NaN
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def _outpaint_position(text):
    """--outpaint: left, center, right, or the photo's first column in pixels (an integer, negative allowed)."""
    if text in OUTPAINT_POSITIONS:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {', '.join(OUTPAINT_POSITIONS)} or a column in pixels (an integer), got {text!r}"
        ) from None


def _sync_anchor(text):
    """--sync-anchor: center, image, or a view index (an integer >= 0)."""
    if text in SYNC_ANCHORS:
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected center, image or a view index >= 0, got {text!r}")
    return value


def build_parser(prog="syncdiffusion"):
    parser = _Parser(
        prog=prog,
        description="Generate a coherent panorama with SyncDiffusion (a prompt in, a PNG out).",
        epilog=(
            "Subcommands (each with its own --help):\n"
            "  syncdiffusion demo [--model M]               the web app (needs the [demo] extra)\n"
            "  syncdiffusion generate-set PROMPTS.txt ...   panoramas for an evaluation, resumable\n"
            "  syncdiffusion evaluate DIR... --prompt P     the paper's metrics (needs the [eval] extra)\n"
            "  syncdiffusion export DIR --model M           a model folder that loads itself\n"
            "  syncdiffusion publish REPO_ID [--model M]    the same, or the pipeline file alone, on the Hub\n"
            "  syncdiffusion generate PROMPT ...            this command, for a prompt that is a subcommand's name\n"
            "                                               (or options first: syncdiffusion -o x.png -- PROMPT)\n"
            "Offline smoke run: `syncdiffusion 'a test' --model tiny -o smoke.png` (also tiny-xl, tiny-flux).\n"
            "A prompt per region (white in a mask of the panorama's size, or a box of fractions):\n"
            "  syncdiffusion 'a green meadow' --region 'a red barn' box:0.4,0.3,0.6,1 --region 'a full moon' moon.png\n"
            "A photo extended into a panorama (the rest generated, synchronized to the view over the photo):\n"
            "  syncdiffusion 'a harbour at dawn' --image photo.jpg --outpaint center -o harbour.png"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompt", help="what the panorama shows")
    parser.add_argument(
        "--output",
        "-o",
        help=f"image to write (default: {DEFAULT_OUTPUT}; with --compare or several --sync-weight values:"
        f" {DEFAULT_COMPARE_OUTPUT})",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Hub model id or local diffusers folder, SD, SDXL or FLUX.1 (default: {DEFAULT_MODEL}); the class"
        " comes from its model_index.json; `tiny`, `tiny-xl`, `tiny-flux`: offline random tiny models",
    )
    parser.add_argument(
        "--height", type=_positive_int, help="pixels, a multiple of 8 (default: 512; SDXL, FLUX: 1024; tiny: 64)"
    )
    parser.add_argument(
        "--width", type=_positive_int, help="pixels, a multiple of 8 (default: 2048; SDXL, FLUX: 4096; tiny: 256)"
    )
    parser.add_argument("--steps", type=_positive_int, help="denoising steps (default: 50; FLUX: 28; tiny: 10)")
    parser.add_argument(
        "--guidance",
        type=float,
        help="classifier-free guidance scale (default: the pipeline's, 7.5; SDXL: 5); FLUX.1 [dev]: the guidance"
        " embedding (default 3.5; [schnell] has none)",
    )
    parser.add_argument("--seed", type=int, help="random seed (default: a random one, printed)")
    parser.add_argument(
        "--stride",
        type=_positive_int,
        help="distance between views in latent pixels (default: 8, SDXL: 16; 8 means 25 views at 2048 px, twice the paper's 13 at 16;"
        " time grows with the view count)",
    )
    parser.add_argument(
        "--negative-prompt", help="what the panorama should not show (FLUX: with --true-cfg-scale above 1)"
    )
    parser.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        default=None,
        help=f"default: {DEFAULT_SCHEDULER}, the paper's, with which --sync-weight 20 was chosen; keep: the model's"
        " own scheduler (FLUX: the only choice, its flow-matching scheduler)",
    )

    sync = parser.add_argument_group("synchronization (SyncDiffusion)")
    sync.add_argument(
        "--sync-weight",
        type=_sync_weights,
        default=20.0,
        help="gradient step size; 0 = MultiDiffusion (default: 20, tuned for SD 2). Several, e.g. 0,10,20,40: one"
        " panorama per weight from one seed, stacked in one sheet labelled with each one's intra-LPIPS",
    )
    sync.add_argument(
        "--sync-thres", type=_non_negative_int, default=5, help="synchronize the first N steps (default: 5)"
    )
    sync.add_argument("--sync-decay-rate", type=float, default=0.95, help="weight decay per step (default: 0.95)")
    sync.add_argument("--sync-freq", type=_positive_int, default=1, help="synchronize every N-th step (default: 1)")
    sync.add_argument("--sync-mode", choices=("exact", "fast"), default="exact", help="exact (the paper's) or fast")
    sync.add_argument(
        "--sync-gradient",
        choices=("unet", "transformer", "x0"),
        help="through the denoiser (unet; FLUX: transformer) or x0 (default: from --sync-mode)",
    )
    sync.add_argument(
        "--sync-reuse-noise", action=argparse.BooleanOptionalAction, default=None, help="default: from --sync-mode"
    )
    sync.add_argument("--sync-lpips-size", type=_positive_int, help="resize compared images to this many pixels")
    sync.add_argument(
        "--sync-decode-downsample",
        type=_positive_int,
        default=1,
        help="average-pool the clean latent by this factor before decoding the loss image (default 1)",
    )
    sync.add_argument(
        "--sync-decoder",
        help="AutoencoderTiny Hub id or folder for the loss images, e.g. madebyollin/taesd (FLUX: madebyollin/taef1;"
        " `tiny` with the tiny models)",
    )
    sync.add_argument("--sync-gradient-checkpointing", action="store_true", help="less memory, more compute")
    sync.add_argument(
        "--lpips-weights",
        metavar="PATH",
        help="torchvision's VGG-16 weights (vgg16-397923af.pth) for LPIPS, instead of downloading them on first use",
    )
    sync.add_argument(
        "--compare",
        action="store_true",
        help="write MultiDiffusion and SyncDiffusion (same seed) stacked, labelled (a sweep, --sync-weight 0,20, also"
        " scores them)",
    )

    flux = parser.add_argument_group("FLUX.1")
    flux.add_argument(
        "--true-cfg-scale",
        type=float,
        help="true classifier-free guidance with --negative-prompt, above 1 (two transformer passes per view;"
        " default: the pipeline's, 1: off)",
    )
    flux.add_argument(
        "--max-sequence-length",
        type=_positive_int,
        help=f"T5 tokens of the prompt, at most 512 (default: 512; tiny-flux: {TINY_MAX_SEQUENCE_LENGTH})",
    )

    regions = parser.add_argument_group("region prompts (MultiDiffusion's region-based generation, synchronized)")
    regions.add_argument(
        "--region",
        nargs=2,
        action="append",
        metavar=("PROMPT", "MASK"),
        help="PROMPT where MASK is white; PROMPT (the positional one) is the background; repeatable. MASK: an image"
        " of the panorama's size in pixels (read as grayscale, white = the region, grays blend), or"
        " box:X0,Y0,X1,Y1, fractions of the width and height in [0, 1] with X0 < X1 and Y0 < Y1: a hard rectangle,"
        " the pixel columns round(X0*width) to round(X1*width) and rows round(Y0*height) to round(Y1*height),"
        " end excluded, halves rounded up (e.g. box:0.5,0,1,1 is the right half). The model sees masks averaged"
        " over 8x8-pixel blocks: an edge between blocks is soft",
    )
    regions.add_argument(
        "--region-bootstrap-steps",
        type=_non_negative_int,
        metavar="N",
        help="with --region: for the first N steps each region prompt sees a noised constant-colour background"
        " outside its mask, which keeps its object inside it (MultiDiffusion's bootstrapping; default: 40%% of"
        " the steps; 0: off; at most --steps)",
    )

    image = parser.add_argument_group("panoramas from an image (SD, SDXL, FLUX.1: each class that takes one)")
    image.add_argument(
        "--image",
        metavar="PATH",
        help="the image to start from. With --outpaint: a photo of any size to extend. Otherwise an image of the"
        " panorama's size (its size is the default --height/--width): image-to-image, or with --mask inpainting",
    )
    image.add_argument(
        "--outpaint",
        type=_outpaint_position,
        metavar="POSITION",
        help="extend the --image photo into a --height x --width panorama: the photo scaled to the height (aspect"
        " ratio kept), placed at left, center, right or a column in pixels from the left (with --circular also"
        " negative or past the edge: across the seam), kept; the rest generated from pure noise (--strength 1"
        " unless given: around the photo the canvas holds only its stretched edge colours)",
    )
    image.add_argument(
        "--mask",
        metavar="PATH",
        help="with --image: white = generate, black = keep, grays blend (read as grayscale; the image's size)",
    )
    image.add_argument(
        "--strength",
        type=_strength,
        help="with --image: how far it is noised, in (0, 1], the share of --steps that run (default: 1 with"
        " --outpaint, else the pipeline's: SD 0.8, with --mask 1; SDXL 0.3, with --mask 0.9999; FLUX.1 0.6)",
    )
    image.add_argument(
        "--sync-anchor",
        type=_sync_anchor,
        metavar="ANCHOR",
        help="the view every other is synchronized to: center (the middle view, the paper's), image (the view that"
        " keeps most of the image: the default with --mask or --outpaint) or a view index (row by row from the"
        " top left)",
    )

    control = parser.add_argument_group("ControlNet (a panorama that follows a layout)")
    control.add_argument(
        "--control-image",
        metavar="PATH",
        help="the condition for the whole panorama (depth, edges, pose, ...); its size is the default --height/--width",
    )
    control.add_argument(
        "--controlnet",
        metavar="ID_OR_PATH",
        help="ControlNet Hub id or folder, e.g. lllyasviel/control_v11f1p_sd15_depth (`tiny` with --model tiny)",
    )
    control.add_argument(
        "--controlnet-scale", type=float, default=1.0, help="ControlNet conditioning scale (default: 1)"
    )

    run = parser.add_argument_group("panorama and hardware")
    run.add_argument("--circular", action="store_true", help="360-degree panorama: the left and right edges meet")
    run.add_argument(
        "--view-batch-size",
        type=_view_batch_size,
        default="auto",
        help="views per UNet call: a number, or auto (default) to fill the free GPU memory (16 on a CPU); the"
        " image is the same, batches are faster",
    )
    run.add_argument(
        "--compile", action="store_true", help="torch.compile the UNet and VAE decoder (GPU; slow first call)"
    )
    run.add_argument(
        "--compile-mode",
        choices=("regional", "whole"),
        default=None,
        help="with --compile: regional (default: each repeated block) or whole (each model as one graph)",
    )
    run.add_argument(
        "--compile-cache",
        metavar="DIR",
        default=None,
        help="with --compile: torch's compile caches, shared by later runs (default: $SYNCDIFFUSION_COMPILE_CACHE,"
        " else ~/.cache/syncdiffusion/torch-compile)",
    )
    run.add_argument(
        "--vae-tiling",
        choices=("auto", "on", "off"),
        default="auto",
        help="decode the panorama in tiles: auto (default) when it would not fit in GPU memory at once",
    )
    run.add_argument("--fp16", action="store_true", help="half precision (GPU): float16; FLUX: bfloat16")
    run.add_argument("--device", default="auto", help="cuda, mps, cpu, ... (default: auto = cuda, else mps, else cpu)")
    run.add_argument("--attention-slicing", action="store_true", help="less memory, a little slower")
    run.add_argument("--cpu-offload", action="store_true", help="keep models on the CPU until used (GPU)")
    return parser


def check_output(path):
    """Raise `CLIError` naming --output unless `path` can be written; leaves no file behind."""
    from PIL import Image

    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CLIError(
            f"--output {path!r} is a directory; give a file name such as {os.path.join(path, DEFAULT_OUTPUT)}."
        )
    extension = os.path.splitext(path)[1].lower()
    if extension not in Image.registered_extensions():
        raise CLIError(f"--output {path!r}: unknown image extension {extension or '(none)'!r}; use .png.", code=2)
    if not os.path.isdir(folder):
        raise CLIError(f"--output {path!r}: the directory {folder} does not exist.")
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as error:
        raise CLIError(f"--output {path!r} cannot be written: {error.strerror or error}.") from None
    if not existed:
        os.remove(path)


def _with_flags(message, flags):
    """`message` with each `argument` that `flags` names replaced by its flag."""
    return re.sub(r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(0)), str(message))


def _input_error(error, flags=None):
    """The one-line message of a `ValueError` the pipeline raised in `check_inputs`, with flags for arguments
    (`flags`, default `ARGUMENT_FLAGS`: a ControlNet condition's `image` is --control-image)."""
    if not any(frame.name == "check_inputs" for frame in traceback.extract_tb(error.__traceback__)):
        return None
    return _with_flags(error, ARGUMENT_FLAGS if flags is None else flags)


def _control_image(args, tiny):
    """The --control-image, once it is known to come with a --controlnet that fits --model; None without either."""
    if args.control_image is None and args.controlnet is None:
        return None
    if args.control_image is None or args.controlnet is None:
        missing = "--control-image PATH" if args.control_image is None else "--controlnet ID_OR_PATH"
        raise CLIError(f"{missing} is missing: a ControlNet panorama needs both --control-image and --controlnet.", 2)
    if args.controlnet == TINY and not tiny:
        raise CLIError("--controlnet tiny is a random ControlNet for `--model tiny` only; use e.g. a Hub id.", 2)
    if tiny and args.controlnet != TINY:
        raise CLIError(
            f"--controlnet {args.controlnet!r} does not fit the tiny random UNet of `--model tiny`: use --controlnet tiny.",
            2,
        )
    return load_control_image(args.control_image)


def _command_sizes(args, tiny, control_image):
    """`(height, width, steps)` from the flags; what they leave out comes from the tiny model's or the condition's
    size, else is None: the pipeline class's own default (SD: 512x2048, SDXL: 1024x4096)."""
    default_height, default_width, default_steps = DEFAULT_SIZE[TINY if tiny else "real"]
    if control_image is not None:  # the condition covers the whole panorama: its size is the default size
        default_height, default_width = control_image.height, control_image.width
    elif not tiny:
        default_height = default_width = None
    height = default_height if args.height is None else args.height
    width = default_width if args.width is None else args.width
    steps = default_steps if args.steps is None else args.steps
    return height, width, steps


def _sync_weights_of(args):
    """The --sync-weight values as a tuple (one, or the sweep's several)."""
    return args.sync_weight if isinstance(args.sync_weight, tuple) else (args.sync_weight,)


def _check_flags_for_class(args, pipeline_class):
    """Raise `CLIError` for a flag that `pipeline_class` (the class --model loads) cannot take, before loading it."""
    from pipeline_syncdiffusion import SyncDiffusionPipeline

    if args.control_image is not None and not issubclass(pipeline_class, SyncDiffusionPipeline):
        raise CLIError(
            f"--controlnet works with Stable Diffusion 1.x and 2.x models, not a {pipeline_class.__name__}"
            f" (--model {args.model}).",
            code=2,
        )
    gradients = (pipeline_class.sync_denoiser_gradient, "x0")
    if args.sync_gradient is not None and args.sync_gradient not in gradients:
        raise CLIError(
            f"--sync-gradient {args.sync_gradient}: {pipeline_class.__name__} takes {' or '.join(gradients)}"
            f" ({gradients[0]}: through its denoiser).",
            code=2,
        )


def _flux_options(args, pipeline_class):
    """The FLUX-only arguments of the call (`true_cfg_scale`, `max_sequence_length`; None: the class's default), or
    `{}` for another class, where the FLUX flags are an error. A negative prompt that FLUX would ignore is one too."""
    given = [
        flag
        for flag, value in (
            ("--true-cfg-scale", args.true_cfg_scale),
            ("--max-sequence-length", args.max_sequence_length),
        )
        if value is not None
    ]
    if not is_flux(pipeline_class):
        if given:
            raise CLIError(
                f"{' and '.join(given)}: for FLUX models only (--model {args.model} is a {pipeline_class.__name__}).",
                code=2,
            )
        return {}
    true_cfg = args.true_cfg_scale
    if args.negative_prompt is not None and (true_cfg is None or true_cfg <= 1):
        raise CLIError(
            "--negative-prompt: FLUX uses it only with true classifier-free guidance, --true-cfg-scale above 1"
            " (e.g. 4; two transformer passes per view).",
            code=2,
        )
    if true_cfg is not None and true_cfg > 1 and args.negative_prompt is None:
        raise CLIError(
            f"--true-cfg-scale {true_cfg:g}: true classifier-free guidance needs --negative-prompt (an empty one:"
            " --negative-prompt '').",
            code=2,
        )
    max_sequence_length = args.max_sequence_length
    if max_sequence_length is None and args.model == TINY_FLUX:
        max_sequence_length = TINY_MAX_SEQUENCE_LENGTH
    return {"true_cfg_scale": true_cfg, "max_sequence_length": max_sequence_length}


BOX_PREFIX = "box:"
BOX_FORM = "box:X0,Y0,X1,Y1 with fractions of the panorama in [0, 1], X0 < X1 and Y0 < Y1"


def _round_half_up(value):
    return math.floor(value + 0.5)


def parse_box(text):
    """The fractions `(x0, y0, x1, y1)` of a `box:X0,Y0,X1,Y1` MASK; raises `ValueError` saying what is wrong."""
    items = text[len(BOX_PREFIX) :].split(",")
    if len(items) != 4:
        raise ValueError(f"{len(items)} numbers instead of 4")
    box = []
    for name, item in zip(("X0", "Y0", "X1", "Y1"), items):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"{name} {item.strip()!r} is not a number") from None
        if not 0 <= value <= 1:  # also NaN
            raise ValueError(f"{name} {item.strip()} is not in [0, 1]")
        box.append(value)
    x0, y0, x1, y1 = box
    for low, high, value_low, value_high in (("X0", "X1", x0, x1), ("Y0", "Y1", y0, y1)):
        if not value_low < value_high:
            raise ValueError(f"{low} {value_low:g} is not below {high} {value_high:g}")
    return x0, y0, x1, y1


def box_pixels(box, height, width):
    """The pixel rectangle `(left, top, right, bottom)` (right and bottom excluded) of the fractions `box` on a
    `height x width` panorama: each edge at the fraction times the size, rounded half up."""
    x0, y0, x1, y1 = box
    return (
        _round_half_up(x0 * width),
        _round_half_up(y0 * height),
        _round_half_up(x1 * width),
        _round_half_up(y1 * height),
    )


def box_mask(box, height, width):
    """A hard `height x width` mask ("L" PIL image: 255 inside `box_pixels(box, ...)`, 0 elsewhere)."""
    from PIL import Image

    mask = Image.new("L", (width, height), 0)
    left, top, right, bottom = box_pixels(box, height, width)
    mask.paste(255, (left, top, right, bottom))
    return mask


def region_mask(prompt, mask, height, width):
    """The MASK of `--region PROMPT MASK` as an "L" PIL image of the panorama's size: a `box:` rectangle, or the
    image at that path (grayscale). Raises `CLIError` (code 2) naming --region, the value and what is allowed."""
    from PIL import Image, UnidentifiedImageError

    flag = f"--region {prompt!r} {mask!r}"
    if mask.startswith(BOX_PREFIX):
        try:
            box = parse_box(mask)
        except ValueError as error:
            raise CLIError(f"{flag}: {error}; a box is {BOX_FORM}.", code=2) from None
        left, top, right, bottom = box_pixels(box, height, width)
        if right <= left or bottom <= top:
            raise CLIError(
                f"{flag}: the box covers no pixel of the {width}x{height} panorama (its edges round to columns"
                f" {left}..{right}, rows {top}..{bottom}); make it larger.",
                code=2,
            )
        return box_mask(box, height, width)
    if not os.path.isfile(mask):
        raise CLIError(
            f"{flag}: no such file; MASK is an image of the panorama's size ({width}x{height} pixels) or {BOX_FORM}.",
            code=2,
        )
    try:
        with Image.open(mask) as image:
            image.load()
            if image.size != (width, height):
                raise CLIError(
                    f"{flag}: the mask is {image.width}x{image.height} pixels, but the panorama is {width}x{height}"
                    " (--width x --height); a mask image must be the panorama's size.",
                    code=2,
                )
            return _grayscale(image, flag)
    except (OSError, UnidentifiedImageError) as error:
        raise CLIError(f"{flag}: cannot be read as an image: {str(error).splitlines()[0]}", code=2) from None


def _grayscale(image, flag):
    """`image` as an 8-bit "L" image. 16-bit grayscale (PNG's "I;16", or "I" in older Pillow) is scaled down, not
    clipped as Pillow's `convert("L")` clips it (a 50% gray would become white)."""
    import numpy as np
    from PIL import Image

    if image.mode == "F":
        raise CLIError(f"{flag}: a floating-point image; save the mask as an 8- or 16-bit grayscale PNG.", code=2)
    if image.mode != "I" and not image.mode.startswith("I;16"):
        return image.convert("L")
    values = np.asarray(image, dtype=np.float64)
    if values.min() < 0 or values.max() > 65535:
        raise CLIError(f"{flag}: 32-bit values beyond 0..65535; save the mask as an 8- or 16-bit grayscale PNG.", 2)
    return Image.fromarray(np.round(values / 257).astype(np.uint8))


def _running_class(pipeline_class, control_image):
    """The class the command calls: --model's, or the ControlNet pipeline with --control-image."""
    if control_image is None:
        return pipeline_class
    from pipeline_syncdiffusion_controlnet import SyncDiffusionControlNetPipeline

    return SyncDiffusionControlNetPipeline


def _region_options(args, pipeline_class, height, width, steps):
    """The region arguments of the call (`{}` without --region), each mask built and checked against the panorama's
    size before any model loads. `height`, `width`, `steps`: the command's, None for the class's own default."""
    if not args.region:
        if args.region_bootstrap_steps is not None:
            raise CLIError(f"--region-bootstrap-steps {args.region_bootstrap_steps}: only with --region.", code=2)
        return {}
    import inspect

    parameters = inspect.signature(pipeline_class.__call__).parameters
    if "region_prompts" not in parameters:
        raise CLIError(f"--region: {pipeline_class.__name__} (--model {args.model}) takes no region prompts yet.", 2)
    height = parameters["height"].default if height is None else height
    width = parameters["width"].default if width is None else width
    steps = parameters["num_inference_steps"].default if steps is None else steps
    bootstrap = args.region_bootstrap_steps
    if bootstrap is not None and bootstrap > steps:
        raise CLIError(
            f"--region-bootstrap-steps {bootstrap}: at most the {steps} denoising steps (--steps); 0 turns it off.",
            code=2,
        )
    options = {
        "region_prompts": [prompt for prompt, _ in args.region],
        "region_masks": [region_mask(prompt, mask, height, width) for prompt, mask in args.region],
    }
    if args.region_bootstrap_steps is not None:
        options["region_bootstrap_steps"] = args.region_bootstrap_steps
    return options


def takes_start_image(pipeline_class):
    """Whether `pipeline_class.__call__` takes an image to start from and its mask (`image` and `mask_image`), and
    is not a ControlNet pipeline, whose `image` is the condition (`controlnet_conditioning_scale`)."""
    import inspect

    parameters = inspect.signature(pipeline_class.__call__).parameters
    return {"image", "mask_image"} <= set(parameters) and "controlnet_conditioning_scale" not in parameters


def _check_image_flags(args, control_image):
    """Raise `CLIError` (code 2) for --image, --outpaint, --mask, --strength and --sync-anchor given together in a way
    that cannot work, before anything is read or loaded."""
    if args.image is None:
        for flag, value in (("--outpaint", args.outpaint), ("--mask", args.mask), ("--strength", args.strength)):
            if value is not None:
                raise CLIError(f"{flag} {value}: only with --image PATH, the image to start from.", code=2)
    if args.outpaint is not None and args.mask is not None:
        raise CLIError(
            f"--mask {args.mask!r}: not with --outpaint, which makes its own mask (white around the photo, black"
            " over it); give --mask for an image of the panorama's size, --outpaint for a photo to extend.",
            code=2,
        )
    if args.image is not None and control_image is not None:
        raise CLIError(
            f"--image {args.image!r}: not with --control-image; the ControlNet pipeline's image is its condition,"
            " and it starts from noise.",
            code=2,
        )
    if args.sync_anchor == "image" and args.mask is None and args.outpaint is None:
        raise CLIError(
            "--sync-anchor image: the view that keeps most of the image needs --mask or --outpaint (without a mask"
            " nothing is kept); use center or a view index.",
            code=2,
        )


def read_image(flag, path):
    """The image at `path` as an RGB PIL image; raises `CLIError` (code 2) naming `flag` when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise CLIError(f"{flag} {path!r}: no such file.", code=2)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise CLIError(f"{flag} {path!r}: cannot be read as an image: {str(error).splitlines()[0]}", code=2) from None


def read_mask(path, height, width):
    """The --mask at `path` as an "L" PIL image of the panorama's size (16-bit grayscale scaled to 8 bits); raises
    `CLIError` (code 2) for a missing file, another size or a mask that generates nothing."""
    from PIL import Image, UnidentifiedImageError

    flag = f"--mask {path!r}"
    if not os.path.isfile(path):
        raise CLIError(f"{flag}: no such file.", code=2)
    try:
        with Image.open(path) as image:
            image.load()
            size = image.size
            mask = _grayscale(image, flag)
    except (OSError, UnidentifiedImageError) as error:
        raise CLIError(f"{flag}: cannot be read as an image: {str(error).splitlines()[0]}", code=2) from None
    if size != (width, height):
        raise CLIError(
            f"{flag}: the mask is {size[0]}x{size[1]} pixels, but the panorama is {width}x{height}; a mask is the"
            " size of --image.",
            code=2,
        )
    if mask.getextrema()[1] == 0:
        raise CLIError(
            f"{flag} is black everywhere: it keeps the whole image and generates nothing (white = generate).", 2
        )
    return mask


def _image_options(args, pipeline_class, start_image, height, width, steps):
    """The image arguments of the call (`image`, `mask_image`, `strength`, `sync_anchor`; `{}` without --image and
    --sync-anchor): the --outpaint photo placed on the canvas, or the image and --mask checked against the panorama's
    size, all before any model loads. `height`, `width`, `steps`: the command's, None for the class's own default."""
    import inspect

    parameters = inspect.signature(pipeline_class.__call__).parameters
    options = {}
    if args.sync_anchor is not None:
        if "sync_anchor" not in parameters:
            raise CLIError(
                f"--sync-anchor: {pipeline_class.__name__} (--model {args.model}) takes no synchronization anchor.", 2
            )
        options["sync_anchor"] = args.sync_anchor
    if start_image is None:
        return options
    if not takes_start_image(pipeline_class):
        raise CLIError(
            f"--image: {pipeline_class.__name__} (--model {args.model}) takes no image to start from yet.", code=2
        )
    height = parameters["height"].default if height is None else height
    width = parameters["width"].default if width is None else width
    steps = parameters["num_inference_steps"].default if steps is None else steps
    # A UNet pipeline runs int(steps * strength) steps (get_timesteps), and none is an error; flow matching's
    # get_timesteps always runs at least one.
    unet = getattr(pipeline_class, "sync_denoiser_gradient", None) == "unet"
    if unet and args.strength is not None and int(steps * args.strength) < 1:
        raise CLIError(
            f"--strength {args.strength:g} of {steps} steps runs no step (the share of --steps that run, rounded"
            f" down): at least {1 / steps:g}, or more --steps.",
            code=2,
        )
    if args.outpaint is not None:
        from syncdiffusion_utils.outpainting import place_photo

        try:
            image, mask = place_photo(start_image, height, width, args.outpaint, circular=args.circular)
        except ValueError as error:
            flags = {**OUTPAINT_FLAGS, "photo": f"--image {args.image!r}", "position": "--outpaint"}
            raise CLIError(_with_flags(error, flags), code=2) from None
        options.update(image=image, mask_image=mask)
    else:
        if start_image.size != (width, height):
            raise CLIError(
                f"--image {args.image!r} is {start_image.width}x{start_image.height} pixels, but the panorama is"
                f" {width}x{height} (--width x --height): without --outpaint the image is the panorama's size;"
                " --outpaint POSITION extends a smaller photo.",
                code=2,
            )
        options["image"] = start_image
        if args.mask is not None:
            options["mask_image"] = read_mask(args.mask, height, width)
    if args.strength is not None:
        options["strength"] = args.strength
    elif args.outpaint is not None:  # the canvas around the photo is a placeholder: start it from pure noise
        options["strength"] = 1.0
    return options


def _runs(args, weights):
    """`(label, sync_weight)` of each panorama to make, in the order they are stacked."""
    if len(weights) > 1:
        return [
            (f"sync weight {weight:g}" + (" (MultiDiffusion)" if weight == 0 else ""), weight) for weight in weights
        ]
    runs = [(f"SyncDiffusion (sync weight {weights[0]:g}, {args.sync_mode})", weights[0])]
    if args.compare:
        runs.insert(0, ("MultiDiffusion (sync weight 0)", 0.0))
    return runs


def intra_lpips_window(pipe, height, width):
    """The crop side of the sweep's intra-LPIPS: the model's view (512 pixels for SD 2, as in the paper; 1024 for
    SDXL and FLUX), at most the panorama's shorter side. Raises `CLIError` when the panorama has only one crop."""
    from syncdiffusion_utils.calls import window_pixels
    from syncdiffusion_utils.metrics import intra_crop_boxes

    window = min(window_pixels(pipe), height, width)
    try:
        intra_crop_boxes(height, width, window, window)
    except ValueError as error:
        raise CLIError(f"--sync-weight with several values: {error} Make the panorama wider (--width).", 2) from None
    return window


def _intra_lpips(image, pipe, window):
    """The paper's intra-LPIPS of `image` (`metrics.intra_lpips`: `window`-pixel crops every `window` pixels, every
    pair) with the pipeline's LPIPS-VGG, `lpips.LPIPS(net="vgg")` as `syncdiffusion evaluate` loads it (the tiny
    models: the random one, as `evaluate --networks random`)."""
    from syncdiffusion_utils.metrics import intra_lpips

    return intra_lpips(image, window, window, loss=pipe.perceptual_loss(pipe._execution_device))


def _generate(args):
    tiny = args.model in TINY_MODELS
    weights = _sync_weights_of(args)
    sweep = len(weights) > 1
    if sweep and args.compare:
        raise CLIError(
            "--compare: not with several --sync-weight values, whose sheet already compares them (0 in the list is"
            " MultiDiffusion).",
            code=2,
        )
    control_image = _control_image(args, args.model == TINY)
    _check_image_flags(args, control_image)
    start_image = read_image("--image", args.image) if args.image is not None else None
    # Without --outpaint the image covers the whole panorama: its size is the default size, as a condition's is.
    whole_image = control_image if control_image is not None else None if args.outpaint else start_image
    height, width, steps = _command_sizes(args, tiny, whole_image)
    if not tiny and args.steps is None:
        steps = None  # the class's own: 50, FLUX 28
    if args.output is not None:
        output = args.output
    else:
        output = DEFAULT_COMPARE_OUTPUT if args.compare or sweep else DEFAULT_OUTPUT
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    check_output(output)
    if args.sync_decoder == TINY and not tiny:
        raise CLIError(
            "--sync-decoder tiny is a random decoder for the tiny models only; use e.g. madebyollin/taesd.", 2
        )
    pipeline_class = pipeline_class_of(args.model)  # from model_index.json: no weights loaded yet
    scheduler = resolve_scheduler(pipeline_class, args.scheduler)
    _check_flags_for_class(args, pipeline_class)
    flux_options = _flux_options(args, pipeline_class)
    running_class = _running_class(pipeline_class, control_image)
    region_options = _region_options(args, running_class, height, width, steps)
    image_options = _image_options(args, running_class, start_image, height, width, steps)

    import torch

    start = time.perf_counter()
    pipe = load_pipeline(
        args.model,
        args.device,
        args.fp16,
        scheduler=scheduler,
        attention_slicing=args.attention_slicing,
        cpu_offload=args.cpu_offload,
        compile=args.compile,
        compile_mode=args.compile_mode,
        compile_cache=args.compile_cache,
    )
    if control_image is not None:
        pipe = with_controlnet(pipe, args.controlnet)
    sync_decoder = load_sync_decoder(args.sync_decoder, pipe) if args.sync_decoder is not None else None
    if sweep or weights[0] != 0 or args.lpips_weights is not None:  # a sweep scores its panoramas with LPIPS
        load_perceptual_loss(pipe, args.lpips_weights)
    loaded = time.perf_counter()

    call = prepare_call(
        pipe,
        prompt=args.prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=args.guidance,
        negative_prompt=args.negative_prompt,
        stride=8 if tiny and args.stride is None else args.stride,  # the tiny models' window is 8 latents
        view_batch_size=args.view_batch_size,
        vae_tiling=args.vae_tiling,
        circular_padding=args.circular,
        sync_decay_rate=args.sync_decay_rate,
        sync_freq=args.sync_freq,
        sync_thres=args.sync_thres,
        sync_mode=args.sync_mode,
        sync_gradient=args.sync_gradient,
        sync_reuse_noise=args.sync_reuse_noise,
        sync_decoder=sync_decoder,
        sync_lpips_size=args.sync_lpips_size,
        sync_decode_downsample=args.sync_decode_downsample,
        sync_gradient_checkpointing=args.sync_gradient_checkpointing,
        **flux_options,
        **region_options,
        **image_options,
    )
    height, width = call["height"], call["width"]
    if args.vae_tiling == "auto" and pipe.vae.use_tiling:
        note(f"decoding the {width}x{height} panorama in tiles: at once it would not fit in the free GPU memory.")
    if control_image is not None:
        call.update(image=control_image, controlnet_conditioning_scale=args.controlnet_scale)
    window = intra_lpips_window(pipe, height, width) if sweep else None
    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    images = []
    for label, sync_weight in _runs(args, weights):
        several = args.compare or sweep
        pipe.set_progress_bar_config(disable=False, desc=label.split(" (")[0] if several else None)
        try:
            image = pipe(**call, sync_weight=sync_weight, generator=generator(seed)).images[0]
        except ValueError as error:
            message = _input_error(error, ARGUMENT_FLAGS if control_image is not None else START_IMAGE_FLAGS)
            if message is None:
                raise
            raise CLIError(message, code=2) from None
        except out_of_memory:
            raise CLIError(
                "out of GPU memory: try --fp16, --attention-slicing, --cpu-offload, --sync-mode fast,"
                " --sync-gradient-checkpointing or a smaller --width/--height."
            ) from None
        if sweep:
            score = _intra_lpips(image, pipe, window)
            print(f"sync weight {sync_weight:g}: intra-LPIPS {score:.4f} ({window}-pixel crops)", flush=True)
            label = f"{label}: intra-LPIPS {score:.4f}"
        images.append((image, label))
    done = time.perf_counter()

    image = label_and_stack(images) if len(images) > 1 else images[0][0]
    try:
        image.save(output)
    except OSError as error:
        raise CLIError(f"--output {output!r} cannot be written: {error}") from None
    what = ""
    if args.compare:
        what = f": MultiDiffusion above SyncDiffusion, {width}x{height} each"
    elif sweep:
        what = f": sync weights {', '.join(f'{w:g}' for w in weights)} top to bottom, {width}x{height} each"
    print(
        f"wrote {output} ({image.width}x{image.height} pixels{what}; seed {seed};"
        f" {done - loaded:.1f} s generating, {loaded - start:.1f} s loading)",
        flush=True,
    )
    return 0


def _generate_command(argv):
    """`syncdiffusion generate PROMPT ...`: the main command under a name, so that any prompt can be given."""
    return _generate(build_parser(prog="syncdiffusion generate").parse_args(argv))


# `syncdiffusion publish --pipeline NAME`: the module and class of each pipeline file.
PIPELINE_CLASSES = {
    "sd": ("pipeline_syncdiffusion", "SyncDiffusionPipeline"),
    "sdxl": ("pipeline_syncdiffusion_xl", "SyncDiffusionXLPipeline"),
    "controlnet": ("pipeline_syncdiffusion_controlnet", "SyncDiffusionControlNetPipeline"),
    "flux": ("pipeline_syncdiffusion_flux", "SyncDiffusionFluxPipeline"),
    "flux2-klein": ("pipeline_syncdiffusion_flux2", "SyncDiffusionFlux2KleinPipeline"),
    "z-image": ("pipeline_syncdiffusion_z_image", "SyncDiffusionZImagePipeline"),
}


def _pipeline_class_named(name):
    import importlib

    module, class_name = PIPELINE_CLASSES[name]
    return getattr(importlib.import_module(module), class_name)


def _publish(argv):
    parser = _Parser(
        prog="syncdiffusion publish",
        description="Upload the pipeline file (as pipeline.py) and its model card to a Hub model repository, so that"
        " `DiffusionPipeline.from_pretrained(model, custom_pipeline=REPO_ID, trust_remote_code=True)` loads it."
        " With --model: upload a ready-to-use model repo instead (the model's weights, syncdiffusion.py and a model"
        " card), which `DiffusionPipeline.from_pretrained(REPO_ID, trust_remote_code=True)` loads.",
    )
    parser.add_argument("repo_id", help="namespace/name, e.g. your-name/syncdiffusion")
    parser.add_argument(
        "--model", help="Hub model id, diffusers folder or .safetensors checkpoint whose weights to upload"
    )
    parser.add_argument(
        "--pipeline",
        choices=tuple(PIPELINE_CLASSES),
        help="which pipeline file to upload: sd (SD 1.x/2.x, the default), sdxl, controlnet, flux (FLUX.1),"
        " flux2-klein (FLUX.2 [klein]) or z-image (not with --model, whose own class is published)",
    )
    parser.add_argument("--token", help="a Hub token with write access (default: the saved login or HF_TOKEN)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--message", help="commit message")
    args = parser.parse_args(argv)
    if args.model is not None and args.pipeline is not None:
        raise CLIError(f"--pipeline {args.pipeline}: not with --model, whose own pipeline class is published.", 2)

    from syncdiffusion_utils import hub

    kwargs = {"token": args.token, "private": args.private}
    if args.message is not None:
        kwargs["commit_message"] = args.message
    try:
        if args.model is not None:
            hub._check_repo_id(args.repo_id)  # before loading any weights
            pipe = load_for_export(args.model)
            url = hub.publish_model(pipe, args.repo_id, base_model=args.model, **kwargs)
        else:
            url = hub.publish(
                args.repo_id,
                pipeline_class=_pipeline_class_named("sd" if args.pipeline is None else args.pipeline),
                **kwargs,
            )
    except _PROGRAMMING_ERRORS:
        raise
    except ValueError as error:  # an invalid repo id
        raise CLIError(error, code=2) from None
    except Exception as error:  # HTTP errors (HfHubHTTPError), no network (the HTTP client's own ConnectError), ...
        raise CLIError(f"could not publish to {args.repo_id!r}: {type(error).__name__}: {error}") from None
    print(f"published {args.repo_id}: {url}")
    return 0


def _export(argv):
    parser = _Parser(
        prog="syncdiffusion export",
        description="Save a model with the SyncDiffusion pipeline to a folder that loads itself: its weights,"
        " syncdiffusion.py and a model card. `DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True)` and"
        " `SyncDiffusionPipeline.from_pretrained(FOLDER)` load it; `hf upload` can publish it.",
    )
    parser.add_argument("folder", help="a new (or empty) folder to write")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Hub model id, diffusers folder or .safetensors checkpoint (default: {DEFAULT_MODEL}); `tiny`,"
        " `tiny-xl`, `tiny-flux`: random",
    )
    args = parser.parse_args(argv)

    if os.path.isfile(args.folder) or (os.path.isdir(args.folder) and os.listdir(args.folder)):
        raise CLIError(f"FOLDER {args.folder!r} already exists and is not an empty folder; give a new one.", code=2)
    from syncdiffusion_utils import hub

    pipe = load_for_export(args.model)
    try:
        hub.export(pipe, args.folder, base_model=None if args.model in TINY_MODELS else args.model)
    except OSError as error:
        raise CLIError(f"FOLDER {args.folder!r} cannot be written: {error.strerror or error}.") from None
    print(f"exported {args.model} to {args.folder}")
    return 0


# `syncdiffusion NAME ...`: subcommands, each a `main(argv) -> int` imported only when it runs (keeps --help instant).
SUBCOMMANDS = {
    "generate": "syncdiffusion_utils.cli:_generate_command",
    "publish": "syncdiffusion_utils.cli:_publish",
    "export": "syncdiffusion_utils.cli:_export",
    "evaluate": "syncdiffusion_utils.evaluation:main",
    "generate-set": "syncdiffusion_utils.generate_set:main",
    "demo": "syncdiffusion_utils.demo:main",
}


def _subcommand(name):
    import importlib

    module, function = SUBCOMMANDS[name].split(":")
    return getattr(importlib.import_module(module), function)


def main(argv=None) -> int:
    """Run the command with `argv` (default: `sys.argv[1:]`) and return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return _subcommand(argv[0])(argv[1:])
        return _generate(build_parser().parse_args(argv))
    except CLIError as error:
        print(f"syncdiffusion: error: {error}", file=sys.stderr, flush=True)
        return error.code
    except KeyboardInterrupt:
        print("syncdiffusion: interrupted", file=sys.stderr, flush=True)
        return 130
    except SystemExit as stop:  # --help
        return stop.code if isinstance(stop.code, int) else 0


if __name__ == "__main__":
    # `python -m syncdiffusion_utils.cli`: run the imported module's `main`, so that subcommands raise the same
    # `CLIError` class that it catches (this file as `__main__` is a second copy of the module).
    from syncdiffusion_utils.cli import main as _main

    sys.exit(_main())
