"""A FLUX.2 [klein] panorama with SyncDiffusion: 1024x4096 pixels from 13 views of 1024 pixels, 256 pixels apart
(FLUX.2-klein-4B, bfloat16, `view_batch_size="auto"`). The step-distilled models (klein-4B, klein-9B) run their 4 steps
without guidance, the first 2 synchronized; a klein base model (`--model black-forest-labs/FLUX.2-klein-base-4B`)
runs 50 steps with classifier-free guidance 4.0, the first 5 synchronized. `--fast` synchronizes with the fast mode
(x0 gradient, reused velocity: no transformer backward).

    python examples/flux2_klein_panorama.py
    python examples/flux2_klein_panorama.py --model black-forest-labs/FLUX.2-klein-base-4B --fast
    python examples/flux2_klein_panorama.py --tiny      # offline, tiny random FLUX.2 [klein], seconds on a CPU
"""

import os
import tempfile

import torch
from diffusers import DiffusionPipeline

from syncdiffusion_utils.cli import example_parser, generator, save_image
from syncdiffusion_utils.loading import resolve_device


PIPELINE_FILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipeline_syncdiffusion_flux2.py"
)
# The tiny model's panorama: 64-pixel views (its window) every 4 latents, 5 views; 2 of 4 steps synchronized.
TINY_CALL = {
    "height": 64,
    "width": 192,
    "window_size": 64,
    "stride": 4,
    "num_inference_steps": 4,
    "sync_thres": 2,
    "max_sequence_length": 32,
}


def load(args):
    """The pipeline, loaded the way a real model is: a model folder with this repository's pipeline file."""
    if args.tiny:
        # A tiny random FLUX.2 [klein] (a base model: classifier-free guidance), saved as a model folder.
        from syncdiffusion_utils.testing import make_lpips, save_tiny_flux2_klein_pipeline

        with tempfile.TemporaryDirectory(prefix="tiny-flux2-") as folder:
            pipe = DiffusionPipeline.from_pretrained(
                save_tiny_flux2_klein_pipeline(folder), custom_pipeline=PIPELINE_FILE, trust_remote_code=True
            )
        pipe.set_perceptual_loss(make_lpips())  # random-backbone LPIPS-VGG: nothing to download
        return pipe
    return DiffusionPipeline.from_pretrained(
        args.model, custom_pipeline=PIPELINE_FILE, trust_remote_code=True, torch_dtype=torch.bfloat16
    ).to(resolve_device(args.device))


def panorama_call(pipe, args):
    """The arguments of the panorama `pipe` makes: the tiny one, or 1024x4096 with the model's own settings."""
    if args.tiny:
        call = dict(TINY_CALL)
    elif pipe.config.is_distilled:  # FLUX.2-klein-4B and -9B: step-distilled, 4 steps, guidance ignored
        # guidance_scale=1.0: no guidance, and no warning that a larger one is ignored.
        call = {"num_inference_steps": 4, "guidance_scale": 1.0, "sync_thres": 2}
    else:  # a klein base model: Flux2KleinPipeline's 50 steps and classifier-free guidance 4.0
        call = {"num_inference_steps": 50, "guidance_scale": 4.0, "sync_thres": 5}
    if not args.tiny:
        call.update(height=1024, width=4096, view_batch_size="auto")
    if args.fast:
        call["sync_mode"] = "fast"
    return call


def make_parser():
    parser = example_parser(__doc__, "outputs/flux2_klein_panorama.png", "a photo of a mountain range at twilight")
    parser.set_defaults(model="black-forest-labs/FLUX.2-klein-4B")
    parser.add_argument("--fast", action="store_true", help="the fast synchronization (x0 gradient, reused velocity)")
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    pipe = load(args)
    image = pipe(args.prompt, generator=generator(args.seed), **panorama_call(pipe, args)).images[0]
    save_image(image, args.output)


if __name__ == "__main__":
    main()
