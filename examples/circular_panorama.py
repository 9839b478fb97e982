"""A 360-degree panorama: with `circular_padding=True` the views wrap around the right edge, so the left and right
edges of the image meet without a seam (for a panorama viewer, or a texture that tiles horizontally).

    python examples/circular_panorama.py
    python examples/circular_panorama.py --tiny      # offline, tiny random model

Besides the panorama it writes a copy rolled by half its width, which puts the wrap-around seam in the middle,
where it is easy to check that none shows.
"""

import os

from syncdiffusion_utils.calls import prepare_call
from syncdiffusion_utils.cli import example_parser, generator, save_image
from syncdiffusion_utils.loading import load_pipeline


def main(argv=None):
    parser = example_parser(__doc__, "outputs/circular_panorama.png", "a 360 degree photo of a lake in the alps")
    args = parser.parse_args(argv)
    pipe = load_pipeline("tiny" if args.tiny else args.model, args.device)
    height, width, steps = (64, 256, 8) if args.tiny else (512, 2048, 50)

    # View batches sized to the GPU, the 4096-pixel decode tiled if it would not fit at once.
    call = prepare_call(pipe, prompt=args.prompt, height=height, width=width, num_inference_steps=steps)
    image = pipe(**call, circular_padding=True, generator=generator(args.seed)).images[0]
    save_image(image, args.output)

    # The seam between the right and left edges, moved to the middle.
    half = image.width // 2
    rolled = image.copy()
    rolled.paste(image.crop((half, 0, image.width, image.height)), (0, 0))
    rolled.paste(image.crop((0, 0, half, image.height)), (image.width - half, 0))
    stem, extension = os.path.splitext(args.output)
    save_image(rolled, f"{stem}_rolled{extension}")


if __name__ == "__main__":
    main()
