"""A panorama that follows a layout: a depth map as wide as the panorama, given to a ControlNet view by view, with
SyncDiffusion keeping the views one scene.

    python examples/controlnet_panorama.py                                   # a drawn mountain-range depth map
    python examples/controlnet_panorama.py --control-image my_depth.png      # your own, 512 pixels high
    python examples/controlnet_panorama.py --tiny                            # offline, tiny random models

Stable Diffusion 1.5 with its depth ControlNet by default (a ControlNet has to be trained for the base model). Without
--control-image it draws a depth map (near is white): a valley floor rising to a ridge line, sky behind; it writes
that map next to the panorama as `*_condition.png`.
"""

import os

import numpy as np
from PIL import Image

from syncdiffusion_utils.calls import prepare_call
from syncdiffusion_utils.cli import example_parser, generator, save_image
from syncdiffusion_utils.loading import load_control_image, load_pipeline, with_controlnet


MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CONTROLNET = "lllyasviel/control_v11f1p_sd15_depth"


def mountain_depth(height, width, seed=0):
    """A depth map, near = white: the ground brightens towards the viewer, a ridge line of mixed sines, black sky."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 2 * np.pi, width, endpoint=False)
    ridge = sum(rng.uniform(0.03, 0.08) / k * np.sin(k * x + rng.uniform(0, 2 * np.pi)) for k in (1, 2, 3, 5, 8))
    ridge = height * (0.45 - ridge * 2)  # the ridge's height in rows from the top, per column
    rows = np.arange(height)[:, None]
    horizon = 0.62 * height
    ground = np.clip((rows - horizon) / (height - horizon), 0, 1) * 0.7 + 0.3  # 0.3 at the horizon, 1 at the bottom
    mountains = np.where(rows >= ridge[None, :], 0.25 + 0.05 * (rows - ridge[None, :]) / height, 0.0)
    depth = np.where(rows >= horizon, ground, mountains)
    return Image.fromarray((depth * 255).astype(np.uint8)).convert("RGB")


def main(argv=None):
    parser = example_parser(
        __doc__, "outputs/controlnet_panorama.png", "a photo of a mountain range above a lake at dawn"
    )
    parser.set_defaults(model=MODEL)
    parser.add_argument(
        "--controlnet", default=CONTROLNET, help=f"ControlNet Hub id or folder (default: {CONTROLNET})"
    )
    parser.add_argument("--control-image", help="depth map of the whole panorama (default: a drawn one, 512x2048)")
    args = parser.parse_args(argv)

    pipe = load_pipeline("tiny" if args.tiny else args.model, args.device)
    pipe = with_controlnet(pipe, "tiny" if args.tiny else args.controlnet)
    height, width, steps = (64, 256, 8) if args.tiny else (512, 2048, 50)
    if args.control_image:
        depth = load_control_image(args.control_image)  # the panorama takes its size
    else:
        depth = mountain_depth(height, width, seed=args.seed)

    # The panorama takes the condition's size; view batches sized to the GPU, the decode tiled if need be.
    call = prepare_call(pipe, prompt=args.prompt, image=depth, num_inference_steps=steps)
    image = pipe(**call, generator=generator(args.seed)).images[0]
    save_image(image, args.output)
    stem, extension = os.path.splitext(args.output)
    save_image(depth, f"{stem}_condition{extension}")


if __name__ == "__main__":
    main()
