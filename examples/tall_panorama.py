"""A tall panorama: an image taller than the UNet's window gets several rows of views, which SyncDiffusion keeps
coherent from top to bottom just as it does from left to right (the same works for a 2D grid, e.g. 1024x1024).

    python examples/tall_panorama.py
    python examples/tall_panorama.py --tiny      # offline, tiny random model
"""

from syncdiffusion_utils.calls import prepare_call
from syncdiffusion_utils.cli import example_parser, generator, save_image
from syncdiffusion_utils.loading import load_pipeline


def main(argv=None):
    parser = example_parser(__doc__, "outputs/tall_panorama.png", "a photo of a waterfall in a rainforest, vertical")
    parser.add_argument("--stride", type=int, default=8, help="distance between views, latent pixels (default: 8)")
    args = parser.parse_args(argv)
    pipe = load_pipeline("tiny" if args.tiny else args.model, args.device)
    # The UNet's window is 64 latents (512 pixels) for SD 2 base, 8 latents (64 pixels) for the tiny model.
    height, width, steps = (192, 64, 8) if args.tiny else (1536, 512, 50)

    views = pipe.get_views(height, width, stride=args.stride)
    rows = len({top for top, _, _, _ in views})
    print(f"{width}x{height} pixels: {len(views)} views in {rows} rows of {len(views) // rows}")

    call = prepare_call(
        pipe, prompt=args.prompt, height=height, width=width, num_inference_steps=steps, stride=args.stride
    )
    image = pipe(**call, generator=generator(args.seed)).images[0]
    save_image(image, args.output)


if __name__ == "__main__":
    main()
