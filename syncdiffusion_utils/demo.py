"""`syncdiffusion demo`: a Gradio web app for panoramas (needs the `[demo]` extra: `pip install -e ".[demo]"`).

    syncdiffusion demo                          # stabilityai/stable-diffusion-2-base on http://127.0.0.1:7860
    syncdiffusion demo --model tiny --port 8000 # offline, on the tiny random pipeline (seconds on a CPU)
    syncdiffusion demo --model black-forest-labs/FLUX.1-dev   # FLUX.1 (a large GPU); `tiny-flux` offline
    syncdiffusion demo --model black-forest-labs/FLUX.2-klein-4B  # FLUX.2 [klein]; `tiny-flux2` offline
    syncdiffusion demo --model Tongyi-MAI/Z-Image-Turbo      # Z-Image; `tiny-z-image` offline

The model is loaded once; the queue runs one generation at a time. `build_app(pipe)` builds the page for any loaded
SyncDiffusion pipeline (SD, SDXL, FLUX.1, FLUX.2 [klein] or Z-Image: the transformer models' pages have no scheduler
choice, and their negative prompt comes with their guidance: FLUX.1's true CFG, klein's and Z-Image's classifier-free
guidance) and `launch(app)` serves it (`demo/app.py`, the Hugging Face Space, uses the same two). Its "Regions" part is
a canvas of the panorama's shape: each painted layer is a region, generated from its own prompt (one per line), the
main prompt the background. Its "Extend a photo" part (models whose pipeline takes `image` and `mask_image`) places an
uploaded photo at the left, center or right of the panorama (`place_photo`) and generates the rest around it.
gradio, torch and diffusers are imported only when the app is built, so `syncdiffusion --help` stays instant.
"""

import argparse
import inspect
import random
import socket
import threading
import time

from syncdiffusion_utils.calls import call_defaults, prepare_call, window_pixels
from syncdiffusion_utils.cli import DEFAULT_SIZE, TINY_MAX_SEQUENCE_LENGTH, _input_error, _Parser, generator
from syncdiffusion_utils.loading import (
    DEFAULT_MODEL,
    TINY,
    TINY_MODELS,
    CLIError,
    is_flux,
    load_pipeline,
    resolve_scheduler,
    schedulers_for,
    set_scheduler,
)


INSTALL_HINT = 'the demo needs gradio: pip install "syncdiffusion[demo]" (or pip install "gradio>=6")'

# Size presets in windows (the UNet's view, e.g. 512 pixels for Stable Diffusion 2 base): rows, columns, circular.
PRESETS = {
    "wide": (1, 4, False),
    "wider": (1, 6, False),
    "360°": (1, 8, True),
    "tall": (4, 1, False),
}
CUSTOM = "custom"
DEFAULT_PRESET = "wide"

EXAMPLES = [
    "a photo of a mountain range at twilight",
    "a cinematic view of a castle in the sunset",
    "natural landscape in anime style illuminated with mountains",
    "a photo of a city skyline at night",
    "a watercolor painting of a beach with palm trees",
    "a photo of a forest with a river, morning fog",
]

MAX_SEED = 2**32 - 1
# The regions canvas is reset to a blank one of each new panorama size up to this many pixels (FLUX's 360° preset,
# 1024x8192, is 2**23); a larger size typed by mistake would cost a huge blank image for nothing.
MAX_CANVAS_PIXELS = 2**26
# Brush colours of the regions canvas, to tell the layers apart (the masks come from the layers, not the colours).
REGION_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4"]
# Where "Extend a photo" puts the photo (`place_photo`'s named positions; the page offers no pixel offset).
PHOTO_POSITIONS = ("left", "center", "right")
DEFAULT_PHOTO_POSITION = "center"
MULTIDIFFUSION = "MultiDiffusion"
SYNCDIFFUSION = "SyncDiffusion"

# The model families whose pipelines take guidance arguments of their own, by the class's name along its MRO (a copy
# loaded from a repository's own file counts; SD, SDXL and ControlNet are no family here).
FLUX, FLUX2_KLEIN, Z_IMAGE = "FLUX", "FLUX.2 [klein]", "Z-Image"
FAMILY_CLASSES = {
    "SyncDiffusionFluxPipeline": FLUX,
    "SyncDiffusionFlux2KleinPipeline": FLUX2_KLEIN,
    "SyncDiffusionZImagePipeline": Z_IMAGE,
}
# The demo's arguments of one family's pipeline alone: their family and what they are.
FAMILY_ARGUMENTS = {
    "true_cfg_scale": (FLUX, "true classifier-free guidance"),
    "cfg_normalization": (Z_IMAGE, "a bound on the guided velocity's norm"),
    "cfg_truncation": (Z_IMAGE, "the time after which guidance stops"),
}
# Each family's guidance: on above this scale (klein: 1, as Flux2KleinPipeline; Z-Image: 0, as ZImagePipeline), the
# slider's minimum and an example of a scale that is on.
GUIDANCE_OFF = {FLUX2_KLEIN: 1.0, Z_IMAGE: 0.0}
GUIDANCE_EXAMPLE = {FLUX2_KLEIN: 4, Z_IMAGE: 5}
# The step-distilled FLUX.2 [klein] models (`is_distilled`: klein-4B, klein-9B) run 4 steps without guidance (1: off,
# and no warning that a larger scale is ignored); Z-Image-Turbo 8 steps without guidance (its model card's).
DISTILLED_KLEIN_SETTINGS = (4, 1.0)
Z_IMAGE_TURBO_SETTINGS = (8, 0.0)
# The paper's 5 synchronized steps, at most half of a few-step model's (2 of klein's 4, 4 of Turbo's 8).
SYNC_THRES = 5


def preset_sizes(window):
    """`{label: (height, width, circular)}` of the presets for views of `window` pixels, e.g. "wide 512x2048"."""
    sizes = {}
    for name, (rows, columns, circular) in PRESETS.items():
        height, width = rows * window, columns * window
        sizes[f"{name} {height}x{width}"] = (height, width, circular)
    return sizes


class InputError(ValueError):
    """Bad input that the demo itself finds (the pipeline's `check_inputs` finds the rest)."""


def _whole(value):
    """A whole number from a form field as an `int` (fields send floats); anything else as given, for the pipeline
    to reject by name."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _count(number, noun):
    return f"{number} {noun}{'' if number == 1 else 's'}"


def blank_canvas(height, width):
    """The regions canvas's value for a panorama of `height x width` pixels: a white background, no layer painted."""
    from PIL import Image

    return {"background": Image.new("RGB", (width, height), "white"), "layers": [], "composite": None}


def region_prompt_lines(text):
    """The region prompts typed in the page, one per line; blank lines are no prompt."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def canvas_regions(canvas, region_prompts, height, width):
    """The regions painted on the canvas as the pipeline's region arguments.

    Args:
        canvas: the regions canvas's value (a `gr.ImageEditor`'s `{"background", "layers", "composite"}`, layers as
            RGBA arrays of `height x width` pixels), or None.
        region_prompts (`str`): one region prompt per line, for the painted layers in order.
        height (`int`), width (`int`): the panorama's size in pixels.

    Returns:
        `dict`: `{"region_prompts": [...], "region_masks": [...]}`, layer k's mask its opacity in [0, 1] (`alpha /
        255`, so soft brush edges stay soft), or `{}` when nothing is painted and no region prompt typed.

    Raises `InputError` naming what does not match: the painted layers and the prompts, an empty layer among painted
    ones (its prompt would go to the next layer), or a canvas that is not the panorama's size.
    """
    import numpy as np

    prompts = region_prompt_lines(region_prompts)
    layers = [np.asarray(layer) for layer in (canvas or {}).get("layers") or []]
    painted = [k for k, layer in enumerate(layers) if layer[..., 3].any()]
    if not painted and not prompts:
        return {}
    if not painted:
        raise InputError(
            f"There {'is' if len(prompts) == 1 else 'are'} {_count(len(prompts), 'region prompt')} but nothing is"
            " painted on the regions canvas: paint one layer per prompt (layer 1 for the first line), or clear the"
            " region prompts."
        )
    regions = painted[-1] + 1  # every layer up to the last painted one is a region, in order
    empty = [k + 1 for k in range(regions) if k not in painted]
    if empty:
        raise InputError(
            f"Layer {', '.join(map(str, empty))} of the regions canvas {'is' if len(empty) == 1 else 'are'} empty"
            f" but layer {painted[-1] + 1} is painted: the layers are the regions in order, so paint"
            f" {'it' if len(empty) == 1 else 'them'} or delete {'it' if len(empty) == 1 else 'them'}."
        )
    if regions != len(prompts):
        raise InputError(
            f"The regions canvas has {_count(regions, 'painted layer')} but there"
            f" {'is' if len(prompts) == 1 else 'are'} {_count(len(prompts), 'region prompt')}: type one prompt per"
            " painted layer, one per line (the first line for layer 1)."
        )
    for layer in layers[:regions]:
        if layer.shape[:2] != (height, width):
            raise InputError(
                f"The regions canvas is {layer.shape[0]}x{layer.shape[1]} pixels but the panorama is"
                f" {height}x{width} (height x width): paint the regions again on a canvas of the panorama's size."
            )
    masks = [layer[..., 3].astype(np.float32) / 255 for layer in layers[:regions]]
    return {"region_prompts": prompts, "region_masks": masks}


def model_family(pipeline_class):
    """`FLUX`, `FLUX2_KLEIN` or `Z_IMAGE` for a class of those families (or a subclass), else None (SD, SDXL,
    ControlNet)."""
    for base in pipeline_class.__mro__:
        if base.__name__ in FAMILY_CLASSES:
            return FAMILY_CLASSES[base.__name__]
    return None


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def extends_photos(pipeline_class):
    """Whether `pipeline_class` can extend a photo: its `__call__` takes `image` and `mask_image` (SD, SDXL, FLUX.1;
    not the ControlNet class, whose `image` is its condition, nor FLUX.2 [klein], whose `image` is its reference
    images: neither has a `mask_image`)."""
    parameters = inspect.signature(pipeline_class.__call__).parameters
    return "image" in parameters and "mask_image" in parameters


def check_photo_position(position):
    if not isinstance(position, str) or position not in PHOTO_POSITIONS:
        raise InputError(f"`photo_position` has to be one of {', '.join(PHOTO_POSITIONS)}, but is {position!r}.")


def photo_arguments(photo, position, height, width, circular):
    """The pipeline's `image` and `mask_image` for extending `photo` (a PIL image, or None: `{}`), placed at
    `position` of a `height x width` panorama by `place_photo` (360° when `circular`: the photo's edges continue
    across the seam). Raises `InputError` with `place_photo`'s words for a photo that does not fit."""
    if photo is None:
        return {}
    from syncdiffusion_utils.outpainting import place_photo

    try:
        image, mask_image = place_photo(photo, height, width, position=position, circular=circular)
    except ValueError as error:
        raise InputError(str(error)) from None
    return {"image": image, "mask_image": mask_image}


class PanoramaDemo:
    """The app's state around one loaded pipeline: generation, its progress and the stop request."""

    def __init__(self, pipe, model=DEFAULT_MODEL):
        self.pipe = pipe
        self.model = model
        self.family = model_family(type(pipe))
        self.flux = is_flux(type(pipe))  # FLUX.1
        # FLUX.2 [klein] klein-4B and -9B: step-distilled, without guidance (its config's `is_distilled`).
        self.distilled = self.family == FLUX2_KLEIN and bool(pipe.config.is_distilled)
        # Z-Image-Turbo, known by its name (its config is a Z-Image's): its 8 steps without guidance by default.
        self.turbo = self.family == Z_IMAGE and "turbo" in str(model).lower()
        self.extends_photos = extends_photos(type(pipe))
        self.window = window_pixels(pipe)
        self.sizes = preset_sizes(self.window)
        tiny = model in TINY_MODELS
        defaults = call_defaults(pipe)
        steps, self.default_guidance = defaults["num_inference_steps"], defaults["guidance_scale"]
        if self.distilled:
            steps, self.default_guidance = DISTILLED_KLEIN_SETTINGS
        elif self.turbo:
            steps, self.default_guidance = Z_IMAGE_TURBO_SETTINGS
        self.default_steps = DEFAULT_SIZE[TINY][2] if tiny else steps
        self.default_sync_thres = min(SYNC_THRES, self.default_steps // 2)
        self.schedulers = schedulers_for(type(pipe))  # the transformers: "keep" alone, their flow-matching scheduler
        self.default_scheduler = resolve_scheduler(type(pipe))
        # The text tokens of a class that takes `max_sequence_length` (FLUX's T5, klein's and Z-Image's Qwen3): the
        # class's 512, or the tiny models' few (their tokenizers have about one token per character).
        self.takes_max_sequence_length = "max_sequence_length" in defaults
        self.max_sequence_length = TINY_MAX_SEQUENCE_LENGTH if tiny and self.takes_max_sequence_length else None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the pipeline is stateful (scheduler, `_interrupt`): one call at a time

    def stop(self):
        """Ask the running generation to stop after its current step (the pipeline's `_interrupt`)."""
        self._stop.set()

    def generate(
        self,
        prompt,
        negative_prompt="",
        height=None,
        width=None,
        circular=False,
        steps=None,
        seed=None,
        random_seed=True,
        scheduler=None,
        stride=None,
        guidance=None,
        sync_weight=20.0,
        sync_thres=None,
        sync_mode="exact",
        compare=False,
        true_cfg_scale=None,
        cfg_normalization=None,
        cfg_truncation=None,
        region_prompts="",
        regions=None,
        photo=None,
        photo_position=DEFAULT_PHOTO_POSITION,
        progress=None,
    ):
        """Run the pipeline (MultiDiffusion first, from the same seed, when `compare`).

        The call is the command's (`prepare_call`): view batches sized by the pipeline ("auto"), the VAE tiled when the
        panorama would not fit in GPU memory at once; `stride` and `true_cfg_scale` None are the pipeline class's,
        `steps`, `guidance` and `sync_thres` None the demo's defaults (the class's, but a step-distilled FLUX.2
        [klein]'s 4 steps and guidance 1, Z-Image-Turbo's 8 steps and guidance 0; at most half the steps synchronized,
        the paper's 5 at most), `scheduler` None its default (the transformer models: "keep", the only one they run).
        The negative prompt goes with the model's guidance: FLUX.1 uses it only with `true_cfg_scale` above 1 (which
        needs one), FLUX.2 [klein] only with `guidance` above 1 (a step-distilled model never: it has no guidance),
        Z-Image only with `guidance` above 0; one that would be ignored is an input error. `cfg_normalization` and
        `cfg_truncation` are Z-Image's (None: the class's, off). `regions` is the regions canvas and `region_prompts`
        its prompts, one per line (`canvas_regions`); nothing painted and no region prompt: no regions. `photo` (a PIL
        image, or None) is extended: placed at `photo_position` ("left", "center" or "right") of the panorama
        (`photo_arguments`), the pipeline gets it as `image` and `mask_image` and generates the rest (the class's
        inpainting defaults: `strength` 1, the anchor the view over the photo). Returns `(syncdiffusion_image,
        multidiffusion_image, seed, status)`; an image is None when it was not made. `progress(done, total, label)` is
        called after every step. Raises `ValueError` with the pipeline's message for bad input (`InputError` for the
        demo's own findings), before any model runs.
        """
        if random_seed:
            seed = random.randint(0, MAX_SEED)
        seed = _whole(seed)
        if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise InputError(
                f"`seed` has to be a whole number in 0..{MAX_SEED} (or tick 'random seed'), but is {seed!r}."
            )
        check_photo_position(photo_position)
        if photo is not None and not self.extends_photos:
            raise InputError(
                f"This model ({type(self.pipe).__name__}) cannot extend a photo: its pipeline takes no `image` and"
                " `mask_image`. Remove the photo."
            )
        scheduler = self.default_scheduler if scheduler is None else scheduler
        if scheduler not in self.schedulers:
            own = f" ({self.family} runs its own flow-matching scheduler: keep)" if self.family else ""
            raise InputError(
                f"`scheduler` has to be one of {', '.join(self.schedulers)} for this model{own}, but is {scheduler!r}."
            )
        guidance = self.default_guidance if guidance is None else guidance
        sync_thres = self.default_sync_thres if sync_thres is None else sync_thres
        extra = (("true_cfg_scale", true_cfg_scale), ("cfg_normalization", cfg_normalization))
        extra += (("cfg_truncation", cfg_truncation),)
        arguments = {
            "prompt": prompt,
            "negative_prompt": negative_prompt or None,  # an empty field: no negative prompt
            "height": _whole(height),
            "width": _whole(width),
            "circular_padding": bool(circular),
            "num_inference_steps": _whole(steps if steps is not None else self.default_steps),
            "stride": _whole(stride),
            "guidance_scale": guidance,
            "sync_thres": _whole(sync_thres),
            "sync_mode": sync_mode,
            **self._family_arguments(negative_prompt, guidance, dict(extra)),
        }
        runs = [(SYNCDIFFUSION, sync_weight)]
        if compare:
            runs.insert(0, (MULTIDIFFUSION, 0.0))

        with self._lock:
            self._stop.clear()
            try:
                call = prepare_call(self.pipe, view_batch_size="auto", vae_tiling="auto", **arguments)
            except ValueError as error:  # a size that is not a whole number, found before the pipeline's checks
                raise InputError(str(error)) from None
            call.update(canvas_regions(regions, region_prompts, call["height"], call["width"]))
            call.update(
                photo_arguments(photo, photo_position, call["height"], call["width"], call["circular_padding"])
            )
            set_scheduler(self.pipe, scheduler)
            images, started = {}, time.perf_counter()
            for label, weight in runs:
                image, done, total = self._run(call, weight, seed, label, progress)
                if done < total:
                    return None, None, seed, f"Stopped at step {done} of {total} ({label}); nothing was kept."
                images[label] = image
        seconds = time.perf_counter() - started
        sync_image = images[SYNCDIFFUSION]
        made = " and ".join(images)
        extended = f" photo at the {photo_position}," if "mask_image" in call else ""
        painted = f" {_count(len(call['region_prompts']), 'region')}," if "region_prompts" in call else ""
        status = (
            f"{made}: {total}/{total} steps, {sync_image.width}x{sync_image.height} pixels, seed {seed},{extended}"
            f"{painted} {seconds:.1f} s."
        )
        return sync_image, images.get(MULTIDIFFUSION), seed, status

    def _family_arguments(self, negative_prompt, guidance, extra):
        """The call arguments of the model's family (`extra`: `true_cfg_scale`, FLUX.1's, and `cfg_normalization` and
        `cfg_truncation`, Z-Image's; None is left out) and `max_sequence_length` where the class takes it. One of
        another family, and a negative prompt that the model's guidance would ignore, are input errors."""
        for name, value in extra.items():
            owner, what = FAMILY_ARGUMENTS[name]
            if value is not None and self.family != owner:
                raise InputError(f"`{name}` is {owner}'s ({what}); this model has none.")
        arguments = {name: value for name, value in extra.items() if value is not None}
        if self.flux:
            arguments = self._flux_arguments(negative_prompt, extra["true_cfg_scale"])
        elif self.distilled:
            self._check_distilled(negative_prompt, guidance)
        elif self.family in GUIDANCE_OFF:
            self._check_negative_prompt(negative_prompt, guidance)
        if self.takes_max_sequence_length:
            arguments["max_sequence_length"] = self.max_sequence_length  # None: the class's
        return arguments

    def _flux_arguments(self, negative_prompt, true_cfg_scale):
        """FLUX.1's true CFG. A negative prompt without true CFG, which FLUX would ignore, and true CFG without one
        are input errors."""
        true_cfg = 1.0 if true_cfg_scale is None else true_cfg_scale
        if negative_prompt and not true_cfg > 1:
            raise InputError(
                "FLUX uses the negative prompt only with true CFG: set the true CFG scale above 1 (e.g. 4), or clear"
                " the negative prompt."
            )
        if true_cfg > 1 and not negative_prompt:
            raise InputError(
                f"A true CFG scale of {true_cfg:g} needs a negative prompt; set one, or the scale to 1 (off)."
            )
        return {"true_cfg_scale": true_cfg_scale}

    def _check_distilled(self, negative_prompt, guidance):
        """A step-distilled FLUX.2 [klein] runs without guidance: a negative prompt or a guidance scale above 1,
        which it would ignore, is an input error."""
        if negative_prompt:
            raise InputError(
                "This FLUX.2 [klein] model is step-distilled: it runs without guidance and ignores a negative prompt;"
                " clear the negative prompt."
            )
        if _is_number(guidance) and guidance > GUIDANCE_OFF[FLUX2_KLEIN]:
            raise InputError(
                "This FLUX.2 [klein] model is step-distilled: it runs without guidance, so `guidance_scale` has to be"
                f" at most 1 (off), but is {guidance:g}."
            )

    def _check_negative_prompt(self, negative_prompt, guidance):
        """FLUX.2 [klein] and Z-Image use the negative prompt only with their guidance on: one without it is an input
        error (a scale that is not a number, or negative, is the pipeline's to reject)."""
        off = GUIDANCE_OFF[self.family]
        if negative_prompt and _is_number(guidance) and 0 <= guidance <= off:
            raise InputError(
                f"{self.family} uses the negative prompt only with guidance: set the guidance scale above {off:g}"
                f" (e.g. {GUIDANCE_EXAMPLE[self.family]}), or clear the negative prompt."
            )

    def _run(self, call, sync_weight, seed, label, progress):
        """One pipeline call; returns the image, how many steps ran (fewer when stopped) and how many there were."""
        done = 0

        def on_step_end(pipe, step, timestep, callback_kwargs):
            nonlocal done
            done = step + 1
            if progress is not None:
                progress(done, pipe.num_timesteps, label)
            if self._stop.is_set():
                pipe._interrupt = True
            return {}

        image = self.pipe(
            **call, sync_weight=sync_weight, generator=generator(seed), callback_on_step_end=on_step_end
        ).images[0]
        return image, done, self.pipe.num_timesteps


def _user_error(error):
    """The one-line message to show in the page for an expected failure, or None for a bug (re-raised)."""
    import torch

    if isinstance(error, (CLIError, InputError)):
        return str(error)
    if isinstance(error, ValueError) and _input_error(error) is not None:
        return " ".join(str(error).split())  # the pipeline's own words: its argument names are the page's labels
    if isinstance(error, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return "Out of GPU memory: try a smaller size, fewer synchronization steps or sync mode 'fast'."
    return None


def _stride_slider(pipe, window):
    """`(minimum, step, value)` of the stride slider, in latent pixels: the class's default stride (SDXL's and the
    transformers' are None, picked by the pipeline from the window: the slider needs a number); the transformers'
    strides are even (their 2x2 latent patches)."""
    latent_window = window // pipe.vae_scale_factor
    if hasattr(pipe, "default_stride"):  # FLUX.1, FLUX.2 [klein], Z-Image: a quarter of the window, even
        return 2, 2, pipe.default_stride(window)
    stride = call_defaults(pipe)["stride"]
    return 1, 1, min(latent_window, stride if stride is not None else max(8, latent_window // 8))


def _guidance_label(demo):
    if demo.flux:
        return "Guidance scale (FLUX.1 [dev]: its guidance embedding)"
    if demo.family == FLUX2_KLEIN:
        return "Guidance scale (classifier-free, with the negative prompt; 1: off, two passes per view above)"
    if demo.family == Z_IMAGE:
        return "Guidance scale (classifier-free, with the negative prompt; 0: off, as Z-Image-Turbo)"
    return "Guidance scale"


def _negative_label(demo):
    if demo.flux:
        return "Negative prompt (FLUX: with a true CFG scale above 1)"
    if demo.family in GUIDANCE_OFF:
        return f"Negative prompt (with a guidance scale above {GUIDANCE_OFF[demo.family]:g})"
    return "Negative prompt"


def build_app(pipe, model=DEFAULT_MODEL):
    """The Gradio page (a `gr.Blocks`) around a loaded SyncDiffusion pipeline (SD, SDXL, FLUX.1, FLUX.2 [klein] or
    Z-Image); serve it with `launch`. The transformer models' pages hide the scheduler (they run their own
    flow-matching one). A FLUX.1 page adds the true CFG scale, which its negative prompt needs; FLUX.1 [schnell],
    without a guidance embedding, shows no guidance scale. A FLUX.2 [klein] page's guidance is classifier-free
    guidance, on above 1 (a step-distilled model's page shows neither a guidance scale nor a negative prompt); a
    Z-Image page's is on above 0 (Z-Image-Turbo's default: 0) and adds its CFG normalization and truncation. The
    "Regions" accordion holds the regions canvas (a `gr.ImageEditor` of the panorama's size, reset when the size
    changes) and its prompts; the "Extend a photo" accordion (shown for classes that take `image` and `mask_image`)
    its photo upload and position."""
    import gradio as gr

    demo = PanoramaDemo(pipe, model)
    sizes = demo.sizes
    default_size = next(label for label in sizes if label.startswith(DEFAULT_PRESET))
    height0, width0, circular0 = sizes[default_size]
    latent_window = demo.window // pipe.vae_scale_factor
    defaults = call_defaults(pipe)
    stride_minimum, stride_step, stride0 = _stride_slider(pipe, demo.window)
    size_step = pipe.image_processor.config.vae_scale_factor  # the transformers: 16 (2x2 latent patches), else 8
    # FLUX.1 [schnell] has no guidance embedding; a step-distilled FLUX.2 [klein] no guidance.
    guided = (not demo.flux or pipe.transformer.config.guidance_embeds) and not demo.distilled

    def run(values, region_prompts, regions, photo, photo_position, progress, **family_values):
        def report(done, total, label):
            progress((done, total), desc=label, unit="steps")

        try:
            return demo.generate(
                *values,
                **family_values,
                region_prompts=region_prompts,
                regions=regions,
                photo=photo,
                photo_position=photo_position,
                progress=report,
            )
        except Exception as error:
            message = _user_error(error)
            if message is None:
                raise
            raise gr.Error(message, duration=None, title="Cannot generate", print_exception=False) from None

    # Gradio passes the page's values by position and finds `progress` by its default, so the API's parameters are
    # these functions' own: FLUX.1's has one more, its true CFG scale, Z-Image's two, its CFG normalization and
    # truncation; the regions, then the photo come last (earlier API calls stand).
    def generate(
        prompt,
        negative_prompt,
        height,
        width,
        circular,
        steps,
        seed,
        random_seed,
        scheduler,
        stride,
        guidance,
        sync_weight,
        sync_thres,
        sync_mode,
        compare,
        region_prompts,
        regions,
        photo=None,  # the API's default (a `gr.Image` without a value would make it a required parameter): none
        photo_position=DEFAULT_PHOTO_POSITION,
        progress=gr.Progress(),
    ):
        values = (prompt, negative_prompt, height, width, circular, steps, seed, random_seed, scheduler, stride)
        values += (guidance, sync_weight, sync_thres, sync_mode, compare)
        return run(values, region_prompts, regions, photo, photo_position, progress)

    def generate_flux(
        prompt,
        negative_prompt,
        height,
        width,
        circular,
        steps,
        seed,
        random_seed,
        scheduler,
        stride,
        guidance,
        sync_weight,
        sync_thres,
        sync_mode,
        compare,
        true_cfg_scale,
        region_prompts,
        regions,
        photo=None,  # the API's default (a `gr.Image` without a value would make it a required parameter): none
        photo_position=DEFAULT_PHOTO_POSITION,
        progress=gr.Progress(),
    ):
        values = (prompt, negative_prompt, height, width, circular, steps, seed, random_seed, scheduler, stride)
        values += (guidance, sync_weight, sync_thres, sync_mode, compare)
        return run(values, region_prompts, regions, photo, photo_position, progress, true_cfg_scale=true_cfg_scale)

    def generate_z_image(
        prompt,
        negative_prompt,
        height,
        width,
        circular,
        steps,
        seed,
        random_seed,
        scheduler,
        stride,
        guidance,
        sync_weight,
        sync_thres,
        sync_mode,
        compare,
        cfg_normalization,
        cfg_truncation,
        region_prompts,
        regions,
        photo=None,  # the API's default (a `gr.Image` without a value would make it a required parameter): none
        photo_position=DEFAULT_PHOTO_POSITION,
        progress=gr.Progress(),
    ):
        values = (prompt, negative_prompt, height, width, circular, steps, seed, random_seed, scheduler, stride)
        values += (guidance, sync_weight, sync_thres, sync_mode, compare)
        cfg = {"cfg_normalization": cfg_normalization, "cfg_truncation": cfg_truncation}
        return run(values, region_prompts, regions, photo, photo_position, progress, **cfg)

    def choose_size(label):
        if label == CUSTOM:
            return gr.skip(), gr.skip(), gr.skip()
        return sizes[label]

    def fit_canvas(height, width):
        """A blank regions canvas of the new panorama size (regions painted for another shape do not carry over)."""
        height, width = _whole(height), _whole(width)
        if (
            not all(isinstance(side, int) and side > 0 for side in (height, width))
            or height * width > MAX_CANVAS_PIXELS
        ):
            return gr.skip()  # not a size (yet): the canvas stays, and generating names the size that is wrong
        return gr.update(value=blank_canvas(height, width), canvas_size=(width, height))

    with gr.Blocks(title="SyncDiffusion panoramas") as app:
        gr.Markdown(
            "# SyncDiffusion panoramas\n"
            "Coherent panoramas: MultiDiffusion's overlapping views, synchronized by an LPIPS gradient toward one"
            f" anchor view in the first steps. Model: `{model}` (views of {demo.window}x{demo.window} pixels)."
        )
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0], lines=2, elem_id="prompt")
                negative_prompt = gr.Textbox(
                    label=_negative_label(demo),
                    visible=not demo.distilled,  # a step-distilled FLUX.2 [klein] has no guidance to use it with
                    elem_id="negative-prompt",
                )
            with gr.Column(scale=1, min_width=200):
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                compare = gr.Checkbox(label="Compare with MultiDiffusion (same seed)", elem_id="compare")
        with gr.Row():
            size = gr.Radio(
                [*sizes, CUSTOM], value=default_size, label="Size (height x width)", scale=3, elem_id="size"
            )
            height = gr.Number(height0, label="Height", step=size_step, min_width=100, elem_id="height")
            width = gr.Number(width0, label="Width", step=size_step, min_width=100, elem_id="width")
            circular = gr.Checkbox(circular0, label="360° (the edges meet)", min_width=100, elem_id="circular")
        status = gr.Markdown(elem_id="status")
        result = gr.Image(
            label=SYNCDIFFUSION,
            type="pil",
            format="png",
            interactive=False,
            buttons=["download", "fullscreen"],
            elem_id="result",
        )
        baseline = gr.Image(
            label=f"{MULTIDIFFUSION} (same seed, sync weight 0)",
            type="pil",
            format="png",
            interactive=False,
            buttons=["download", "fullscreen"],
            visible=False,
            elem_id="baseline",
        )
        with gr.Accordion("Settings", open=False):
            with gr.Row():
                steps = gr.Slider(1, 100, value=demo.default_steps, step=1, label="Steps", elem_id="steps")
                guidance = gr.Slider(
                    GUIDANCE_OFF.get(demo.family, 1),  # Z-Image: 0, off (Z-Image-Turbo's)
                    20,
                    value=demo.default_guidance,
                    step=0.5,
                    label=_guidance_label(demo),
                    visible=guided,
                    elem_id="guidance",
                )
                scheduler = gr.Dropdown(
                    list(demo.schedulers),
                    value=demo.default_scheduler,
                    label="Scheduler",
                    visible=len(demo.schedulers) > 1,  # the transformers: their own flow-matching one, no choice
                    elem_id="scheduler",
                )
                stride = gr.Slider(
                    stride_minimum,
                    latent_window,
                    value=stride0,
                    step=stride_step,
                    label="Stride (latent pixels between views)",
                )
                family_inputs = []
                if demo.flux:
                    true_cfg = gr.Slider(
                        1,
                        10,
                        value=defaults["true_cfg_scale"],
                        step=0.5,
                        label="True CFG scale (with the negative prompt; 1: off, above: two passes per view)",
                        elem_id="true-cfg-scale",
                    )
                    family_inputs = [true_cfg]
                if demo.family == Z_IMAGE:
                    cfg_normalization = gr.Checkbox(
                        False,
                        label="CFG normalization (the guided velocity no longer than the positive one)",
                        elem_id="cfg-normalization",
                    )
                    cfg_truncation = gr.Slider(
                        0,
                        1,
                        value=inspect.signature(type(pipe).__call__).parameters["cfg_truncation"].default,
                        step=0.05,
                        label="CFG truncation (guidance stops once this fraction of the time has passed; 1: never)",
                        elem_id="cfg-truncation",
                    )
                    family_inputs = [cfg_normalization, cfg_truncation]
            with gr.Row():
                seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed")
                random_seed = gr.Checkbox(True, label="Random seed", elem_id="random-seed")
            with gr.Row():
                sync_weight = gr.Slider(0, 50, value=20, step=0.5, label="Sync weight (0 = MultiDiffusion)")
                sync_thres = gr.Slider(
                    0, 50, value=demo.default_sync_thres, step=1, label="Synchronized steps (the first N)"
                )
                sync_mode = gr.Radio(["exact", "fast"], value="exact", label="Sync mode (exact: the paper's)")
        with gr.Accordion("Regions", open=False):
            gr.Markdown(
                "Paint a region on each layer of the canvas (the panorama's shape; the layers button at its bottom"
                " right adds one) and type its prompt below; the prompt above is the background. An empty canvas:"
                " no regions. Changing the size clears the canvas."
            )
            region_prompts = gr.Textbox(
                "",  # a default: API calls that leave the regions out are as before
                label="Region prompts, one per line: the first for layer 1, the second for layer 2, ...",
                lines=2,
                elem_id="region-prompts",
            )
            regions = gr.ImageEditor(
                blank_canvas(height0, width0),
                label="Regions (one layer each)",
                type="numpy",
                image_mode="RGBA",
                format="png",
                sources=(),  # the canvas is the panorama's shape: no upload of another image
                transforms=(),
                brush=gr.Brush(default_size=max(1, demo.window // 8), colors=REGION_COLORS),
                canvas_size=(width0, height0),
                buttons=["fullscreen"],
                elem_id="regions",
            )
        with gr.Accordion("Extend a photo", open=False, visible=demo.extends_photos, elem_id="extend-photo"):
            gr.Markdown(
                "Upload a photo to extend it into the panorama: it is scaled to the panorama's height, placed at the"
                " left, the center or the right, and the prompt above generates the rest around it (the photo's part"
                " is kept). No photo: a panorama from the prompt alone."
            )
            with gr.Row():
                photo = gr.Image(
                    label="Photo",
                    type="pil",
                    image_mode="RGB",
                    sources=("upload", "clipboard"),
                    format="png",
                    scale=3,
                    elem_id="photo",
                )
                photo_position = gr.Radio(
                    list(PHOTO_POSITIONS),
                    value=DEFAULT_PHOTO_POSITION,
                    label="Photo position",
                    scale=1,
                    elem_id="photo-position",
                )
        gr.Examples([[text] for text in EXAMPLES], inputs=[prompt], label="Example prompts")

        size.change(choose_size, size, [height, width, circular], queue=False, api_visibility="private")
        for field in (height, width, circular):
            field.input(lambda: CUSTOM, None, size, queue=False, api_visibility="private")
        for field in (height, width):
            field.change(fit_canvas, [height, width], regions, queue=False, api_visibility="private")
        generate_button.click(
            generate_flux if demo.flux else generate_z_image if demo.family == Z_IMAGE else generate,
            [
                prompt,
                negative_prompt,
                height,
                width,
                circular,
                steps,
                seed,
                random_seed,
                scheduler,
                stride,
                guidance,
                sync_weight,
                sync_thres,
                sync_mode,
                compare,
                *family_inputs,
                region_prompts,
                regions,
                photo,
                photo_position,
            ],
            [result, baseline, seed, status],
            api_name="generate",
            concurrency_limit=1,
            concurrency_id="pipeline",
        )
        compare.change(lambda on: gr.update(visible=on), compare, baseline, queue=False, api_visibility="private")
        stop_button.click(demo.stop, None, None, queue=False, api_name="stop")
    app.panorama_demo = demo
    return app


def launch(app, **kwargs):
    """Serve `app` with a queue (one generation at a time) and a theme on system fonts (nothing fetched from the
    web); `kwargs` go to `gr.Blocks.launch` (server_name, server_port, share, prevent_thread_lock, ...)."""
    import gradio as gr

    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    app.queue(default_concurrency_limit=1)
    return app.launch(theme=theme, **kwargs)


def _port(text):
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in 1..65535, got {text!r}")
    return value


def check_address(host, port):
    """Raise `CLIError` naming --host and --port unless a server can listen there (checked before the model loads)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as error:
        raise CLIError(f"--host {host} --port {port}: cannot serve there ({error.strerror or error}).") from None


def build_parser():
    parser = _Parser(
        prog="syncdiffusion demo",
        description="Serve a web app for panoramas (Gradio): prompt, sizes, synchronization settings, a MultiDiffusion"
        " comparison, progress and stop. Needs the [demo] extra.",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="Hub model id or local diffusers folder, SD, SDXL, FLUX.1, FLUX.2 [klein] or Z-Image (default:"
        f" {DEFAULT_MODEL}); {', '.join(f'`{name}`' for name in TINY_MODELS)}: offline random tiny models",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1; 0.0.0.0: all)")
    parser.add_argument("--port", type=_port, default=7860, help="port (default: 7860)")
    parser.add_argument("--share", action="store_true", help="also serve on a temporary public gradio.live link")
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu, ... (default: auto)")
    parser.add_argument("--fp16", action="store_true", help="half precision (GPU)")
    parser.add_argument("--cpu-offload", action="store_true", help="keep models on the CPU until used (GPU)")
    return parser


def main(argv=None) -> int:
    """`syncdiffusion demo ...`: load the model once and serve the app until interrupted."""
    args = build_parser().parse_args(argv)
    check_address(args.host, args.port)
    try:
        import gradio  # noqa: F401  (checked before the model loads)
    except ImportError:
        raise CLIError(INSTALL_HINT) from None

    pipe = load_pipeline(args.model, args.device, args.fp16, cpu_offload=args.cpu_offload, progress=False)
    app = build_app(pipe, args.model)
    try:
        launch(app, server_name=args.host, server_port=args.port, share=args.share)
    except OSError as error:  # taken meanwhile
        raise CLIError(f"--host {args.host} --port {args.port}: cannot serve there ({error}).") from None
    return 0
