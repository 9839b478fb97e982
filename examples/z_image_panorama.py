"""A Z-Image panorama with SyncDiffusion: 1024x4096 pixels from 13 views of 1024 pixels, 256 pixels apart
(Z-Image-Turbo, bfloat16, `view_batch_size="auto"`): Turbo's 8 steps without guidance, the first 4 synchronized. A
Z-Image that is not step-distilled takes `ZImagePipeline`'s settings: `--steps 50 --guidance-scale 5`. `--fast`
synchronizes with the fast mode (x0 gradient, reused velocity: no transformer backward).

    python examples/z_image_panorama.py
    python examples/z_image_panorama.py --fast
    python examples/z_image_panorama.py --tiny      # offline, tiny random Z-Image, seconds on a CPU
"""

import argparse
import os
import tempfile

import torch
from diffusers import DiffusionPipeline

from syncdiffusion_utils.cli import example_parser, generator, save_image
from syncdiffusion_utils.loading import resolve_device


PIPELINE_FILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipeline_syncdiffusion_z_image.py"
)
# Z-Image-Turbo's settings (its model card's): 8 steps, no classifier-free guidance.
TURBO_STEPS, TURBO_GUIDANCE_SCALE = 8, 0.0
# The tiny model's panorama: 64-pixel views (its window) every 4 latents, 5 views.
TINY_CALL = {"height": 64, "width": 192, "window_size": 64, "stride": 4, "max_sequence_length": 32}


def sync_steps(num_inference_steps):
    """The synchronized steps: the paper's 5, at most half of a few-step model's (2 of 4, 4 of 8)."""
    return min(5, num_inference_steps // 2)


def load(args):
    """The pipeline, loaded the way a real model is: a model folder with this repository's pipeline file."""
    if args.tiny:
        from syncdiffusion_utils.testing import make_lpips, save_tiny_z_image_pipeline

        with tempfile.TemporaryDirectory(prefix="tiny-z-image-") as folder:
            pipe = DiffusionPipeline.from_pretrained(
                save_tiny_z_image_pipeline(folder), custom_pipeline=PIPELINE_FILE, trust_remote_code=True
            )
        pipe.set_perceptual_loss(make_lpips())  # random-backbone LPIPS-VGG: nothing to download
        return pipe
    return DiffusionPipeline.from_pretrained(
        args.model, custom_pipeline=PIPELINE_FILE, trust_remote_code=True, torch_dtype=torch.bfloat16
    ).to(resolve_device(args.device))


def panorama_call(args):
    """The arguments of the panorama: the tiny one, or 1024x4096; the steps and guidance of `--steps` and
    `--guidance-scale`."""
    call = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale}
    call["sync_thres"] = sync_steps(args.steps)
    call.update(TINY_CALL if args.tiny else {"height": 1024, "width": 4096, "view_batch_size": "auto"})
    if args.fast:
        call["sync_mode"] = "fast"
    return call


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive number of steps")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a number >= 0 (0 turns classifier-free guidance off)")
    return value


def make_parser():
    parser = example_parser(__doc__, "outputs/z_image_panorama.png", "a photo of a mountain range at twilight")
    parser.set_defaults(model="Tongyi-MAI/Z-Image-Turbo")
    parser.add_argument("--steps", type=positive_int, default=TURBO_STEPS, help=f"default: {TURBO_STEPS} (Turbo's)")
    parser.add_argument(
        "--guidance-scale",
        type=non_negative_float,
        default=TURBO_GUIDANCE_SCALE,
        help=f"classifier-free guidance, on above 0 (default: {TURBO_GUIDANCE_SCALE}, Turbo's)",
    )
    parser.add_argument("--fast", action="store_true", help="the fast synchronization (x0 gradient, reused velocity)")
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    pipe = load(args)
    image = pipe(args.prompt, generator=generator(args.seed), **panorama_call(args)).images[0]
    save_image(image, args.output)


if __name__ == "__main__":
    main()
