"""A FLUX.1 panorama with SyncDiffusion: 1024x4096 pixels from 13 views of 1024 pixels, 256 pixels apart, the first
5 of 28 steps synchronized (FLUX.1-dev, bfloat16, `view_batch_size="auto"`). `--fast` synchronizes with the fast
mode (x0 gradient, reused velocity: no transformer backward); `--model black-forest-labs/FLUX.1-schnell` runs 4 steps
without guidance.

    python examples/flux_panorama.py
    python examples/flux_panorama.py --model black-forest-labs/FLUX.1-schnell --fast
    python examples/flux_panorama.py --tiny      # offline, tiny random FLUX, seconds on a CPU
"""

import os
import tempfile

import torch
from diffusers import DiffusionPipeline

from syncdiffusion_utils.cli import example_parser, generator, save_image
from syncdiffusion_utils.loading import resolve_device


PIPELINE_FILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipeline_syncdiffusion_flux.py"
)


def load(args):
    """`(pipe, call)`: the pipeline and the arguments of the panorama it makes."""
    if args.tiny:
        # A tiny random FLUX model folder, loaded the way a real one is: with this repository's pipeline file.
        from syncdiffusion_utils.testing import make_lpips, save_tiny_flux_pipeline

        with tempfile.TemporaryDirectory(prefix="tiny-flux-") as folder:
            pipe = DiffusionPipeline.from_pretrained(
                save_tiny_flux_pipeline(folder), custom_pipeline=PIPELINE_FILE, trust_remote_code=True
            )
        pipe.set_perceptual_loss(make_lpips())  # random-backbone LPIPS-VGG: nothing to download
        # 64-pixel views (the tiny model's window) every 4 latents: 5 views; 2 of 4 steps synchronized.
        tiny = {"window_size": 64, "stride": 4, "num_inference_steps": 4, "sync_thres": 2, "max_sequence_length": 32}
        return pipe, {"height": 64, "width": 192, **tiny}

    pipe = DiffusionPipeline.from_pretrained(
        args.model, custom_pipeline=PIPELINE_FILE, trust_remote_code=True, torch_dtype=torch.bfloat16
    ).to(resolve_device(args.device))
    if pipe.transformer.config.guidance_embeds:  # FLUX.1-dev: guidance-distilled, 28 steps
        steps = {"num_inference_steps": 28, "guidance_scale": 3.5}
    else:  # FLUX.1-schnell: 4 steps, no guidance embedding, 256 text tokens
        steps = {"num_inference_steps": 4, "guidance_scale": 0.0, "max_sequence_length": 256, "sync_thres": 2}
    return pipe, {"height": 1024, "width": 4096, "view_batch_size": "auto", **steps}


def main(argv=None):
    parser = example_parser(__doc__, "outputs/flux_panorama.png", "a photo of a mountain range at twilight")
    parser.set_defaults(model="black-forest-labs/FLUX.1-dev")
    parser.add_argument("--fast", action="store_true", help="the fast synchronization (x0 gradient, reused velocity)")
    args = parser.parse_args(argv)
    pipe, call = load(args)
    if args.fast:
        call["sync_mode"] = "fast"
    image = pipe(args.prompt, generator=generator(args.seed), **call).images[0]
    save_image(image, args.output)


if __name__ == "__main__":
    main()
