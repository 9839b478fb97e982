"""Region prompts: a background prompt for the whole panorama and a prompt for each region, here "a red house" on
a house-shaped mask drawn in this script (a PIL image) and "a big oak tree" on a box (a numpy array), synchronized
so that the regions follow their prompts while the whole panorama stays one scene.

    python examples/region_panorama.py
    python examples/region_panorama.py --tiny                          # offline, tiny random model
    python examples/region_panorama.py --tiny --sheet docs/regions.png # the README's picture

The pipeline is loaded as a diffusers custom pipeline (`custom_pipeline=pipeline_syncdiffusion.py`). A mask is the
panorama's size in pixels, white (or 1) where its prompt applies; the background prompt weighs what the masks leave
uncovered. `--background-output` also writes the panorama from the same seed without the region prompts, and
`--sheet` a labelled picture of the masks, both panoramas and their difference. The tiny model has random weights:
its panoramas are noise, not houses; only where the regions change the image means anything there.
"""

import tempfile

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from PIL import Image, ImageChops, ImageDraw, ImageFilter

import pipeline_syncdiffusion
from syncdiffusion_utils.calls import prepare_call
from syncdiffusion_utils.cli import example_parser, generator, label_and_stack, save_image
from syncdiffusion_utils.loading import resolve_device


PIPELINE_FILE = pipeline_syncdiffusion.__file__  # the installed pipeline_syncdiffusion.py
BACKGROUND_PROMPT = "a photo of a green meadow under a blue sky"
HOUSE_PROMPT = "a photo of a red house"
TREE_PROMPT = "a photo of a big oak tree"
REGION_COLOURS = ((255, 200, 0), (0, 220, 255))  # the house's and the tree's in the sheet
# height, width (pixels) and steps: the tiny UNet's window is 8 latents (64 pixels), SD 2 base's 64 (512 pixels)
TINY_PANORAMA = (64, 256, 8)
PANORAMA = (512, 2048, 50)
SHEET_WIDTH = 1024  # a small panorama is enlarged (nearest pixel) to about this width in the sheet


def house_mask(height, width):
    """A house seen from the side, walls and a pointed roof, left of centre: white on black, as a PIL image."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    left, right, eaves = round(0.24 * width), round(0.44 * width), round(0.55 * height)
    draw.rectangle([left, eaves, right - 1, height - 1], fill=255)
    overhang = round(0.03 * width)
    draw.polygon(
        [(left - overhang, eaves), ((left + right) // 2, round(0.2 * height)), (right + overhang, eaves)], fill=255
    )
    return mask


def box_mask(height, width):
    """A tall box right of centre, 1 inside and 0 outside, as a float numpy array."""
    mask = np.zeros((height, width), dtype=np.float32)
    mask[round(0.1 * height) : round(0.95 * height), round(0.64 * width) : round(0.8 * width)] = 1.0
    return mask


def load(model, device):
    """Any Stable Diffusion checkpoint, run by the SyncDiffusion code of `pipeline_syncdiffusion.py`."""
    pipe = DiffusionPipeline.from_pretrained(
        model,
        custom_pipeline=PIPELINE_FILE,
        trust_remote_code=True,
        torch_dtype=torch.float16 if device.startswith("cuda") else torch.float32,
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the paper's scheduler
    return pipe.to(device)


def load_tiny(device):
    """The tiny random Stable Diffusion, saved as a plain model folder and loaded back with the pipeline file."""
    from syncdiffusion_utils.testing import make_lpips, save_tiny_pipeline

    with tempfile.TemporaryDirectory() as folder:
        save_tiny_pipeline(folder)
        pipe = load(folder, device)
    pipe.set_perceptual_loss(make_lpips())  # LPIPS with a random backbone: nothing to download
    return pipe


def outlined(image, masks, scale):
    """`image` enlarged `scale` times (nearest pixel) with each mask's outline drawn in its colour."""
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    for mask, colour in zip(masks, REGION_COLOURS):
        mask = mask.resize(image.size, Image.NEAREST)
        edge = ImageChops.subtract(mask.filter(ImageFilter.MaxFilter(3)), mask.filter(ImageFilter.MinFilter(3)))
        image.paste(colour, mask=edge)
    return image


def mask_image(masks, size, scale):
    """The masks in their colours on grey, enlarged `scale` times."""
    width, height = size
    image = Image.new("RGB", (width * scale, height * scale), (90, 90, 90))
    for mask, colour in zip(masks, REGION_COLOURS):
        image.paste(colour, mask=mask.resize(image.size, Image.NEAREST))
    return image


def difference(image, other, gain=4):
    """`gain` times the absolute difference of two images, averaged over the colour channels: white = changed."""
    delta = np.abs(np.asarray(image, dtype=np.float32) - np.asarray(other, dtype=np.float32)).mean(-1)
    return Image.fromarray(np.clip(gain * delta, 0, 255).astype(np.uint8)).convert("RGB")


def make_sheet(image, background_only, masks, tiny):
    """The masks, the panorama with its regions outlined, the background-only panorama and their difference."""
    scale = max(1, SHEET_WIDTH // image.width)
    enlarged = f", enlarged {scale}x" if scale > 1 else ""
    random = " (tiny model, random weights: noise, not a house)" if tiny else ""
    return label_and_stack(
        [
            (mask_image(masks, image.size, scale), f"masks: yellow '{HOUSE_PROMPT}', cyan '{TREE_PROMPT}'"),
            (outlined(image, masks, scale), f"with the region prompts{random}{enlarged}"),
            (outlined(background_only, masks, scale), f"'{BACKGROUND_PROMPT}' alone, same seed"),
            (outlined(difference(image, background_only), masks, scale), "difference x4: white is changed"),
        ]
    )


def main(argv=None):
    parser = example_parser(__doc__, "outputs/region_panorama.png", BACKGROUND_PROMPT)
    parser.add_argument("--background-output", help="also write the panorama without the region prompts here")
    parser.add_argument("--sheet", help="also write the masks, both panoramas and their difference here")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)

    pipe = load_tiny(device) if args.tiny else load(args.model, device)
    height, width, steps = TINY_PANORAMA if args.tiny else PANORAMA
    masks = [house_mask(height, width), box_mask(height, width)]

    call = prepare_call(pipe, prompt=args.prompt, height=height, width=width, num_inference_steps=steps)
    image = pipe(
        **call,
        region_prompts=[HOUSE_PROMPT, TREE_PROMPT],
        region_masks=masks,  # a PIL image and a numpy array, each height x width pixels
        generator=generator(args.seed),
    ).images[0]
    save_image(image, args.output)

    if args.background_output or args.sheet:
        background_only = pipe(**call, generator=generator(args.seed)).images[0]
        if args.background_output:
            save_image(background_only, args.background_output)
        if args.sheet:
            pil_masks = [masks[0], Image.fromarray((masks[1] * 255).astype(np.uint8))]
            save_image(make_sheet(image, background_only, pil_masks, args.tiny), args.sheet)


if __name__ == "__main__":
    main()
