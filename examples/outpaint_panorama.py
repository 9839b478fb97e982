"""Extend a photo into a panorama: the photo is scaled to the panorama's height, placed (centred by default) and
kept, and Stable Diffusion generates the rest, synchronized to the view that keeps most of the photo
(`sync_anchor="image"`), so that every view is pulled toward the photo's look: one scene that continues the photo,
not a collage around it.

    python examples/outpaint_panorama.py
    python examples/outpaint_panorama.py --tiny                              # offline, tiny random model
    python examples/outpaint_panorama.py --photo beach.jpg --position left --prompt "a photo of a beach"

The photo is drawn in this script (an evening sky over green hills, a sun and a house) unless `--photo` names one.
`syncdiffusion_utils.outpainting.place_photo` makes the canvas the pipeline starts from (the photo, its edge colours
stretched to the panorama's edges) and the mask (white: generated; black: the photo). `--canvas-output` also writes
that canvas. The tiny model has random weights: around the photo it generates noise, not hills.
"""

from PIL import Image, ImageDraw

from syncdiffusion_utils.calls import prepare_call
from syncdiffusion_utils.cli import example_parser, generator, save_image
from syncdiffusion_utils.loading import load_pipeline
from syncdiffusion_utils.outpainting import POSITIONS, place_photo


PROMPT = "a photo of green hills under an evening sky"
# height, width (pixels) and steps: the tiny UNet's window is 64 pixels, SD 2 base's 512
TINY_PANORAMA = (64, 256, 8)
PANORAMA = (512, 2048, 50)
PHOTO_ASPECT = 1.5  # the drawn photo's width over its height: 3:2


def make_photo(height):
    """An evening sky (blue at the top to orange at the horizon) over green hills, a sun and a small house, 3:2."""
    width = round(PHOTO_ASPECT * height)
    photo = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(photo)
    horizon = round(0.6 * height)
    for y in range(horizon):
        share = y / max(1, horizon - 1)
        draw.line(
            [(0, y), (width, y)], fill=(round(40 + 210 * share), round(80 + 90 * share), round(200 - 150 * share))
        )
    draw.ellipse([0.6 * width, 0.25 * height, 0.75 * width, 0.25 * height + 0.15 * width], fill=(255, 220, 120))
    hills = [(0, horizon), (0.3 * width, 0.5 * height), (0.65 * width, 0.62 * height), (width, 0.52 * height)]
    draw.polygon([*hills, (width, height), (0, height)], fill=(60, 140, 60))
    left, top = 0.2 * width, 0.62 * height
    draw.rectangle([left, top, left + 0.12 * width, top + 0.14 * height], fill=(230, 230, 220))
    draw.polygon(
        [(left - 2, top), (left + 0.06 * width, top - 0.1 * height), (left + 0.12 * width + 2, top)],
        fill=(150, 40, 30),
    )
    return photo


def position(text):
    """--position: left, center, right, or the photo's first column in pixels."""
    return text if text in POSITIONS else int(text)


def main(argv=None):
    parser = example_parser(__doc__, "outputs/outpaint_panorama.png", PROMPT)
    parser.add_argument("--photo", help="extend this photo instead of the drawn one")
    parser.add_argument(
        "--position", type=position, default="center", help="left, center (default), right or a column in pixels"
    )
    parser.add_argument("--canvas-output", help="also write the canvas the pipeline starts from here")
    args = parser.parse_args(argv)
    pipe = load_pipeline("tiny" if args.tiny else args.model, args.device)
    height, width, steps = TINY_PANORAMA if args.tiny else PANORAMA

    if args.photo:
        with Image.open(args.photo) as photo:
            photo = photo.convert("RGB")
    else:
        photo = make_photo(height)
    image, mask_image = place_photo(photo, height, width, args.position)
    if args.canvas_output:
        save_image(image, args.canvas_output)

    call = prepare_call(pipe, prompt=args.prompt, height=height, width=width, num_inference_steps=steps)
    panorama = pipe(
        **call,
        image=image,
        mask_image=mask_image,  # white: generated; black: kept (strength 1 by default: the rest starts from noise)
        sync_anchor="image",  # the default with a mask, spelled out: the view over the photo is the anchor
        generator=generator(args.seed),
    ).images[0]
    save_image(panorama, args.output)


if __name__ == "__main__":
    main()
