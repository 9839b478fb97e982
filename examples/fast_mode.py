"""The fast synchronization mode: about as many UNet passes as MultiDiffusion, for a few-times cheaper step.

`sync_mode="fast"` takes the synchronization gradient through the predicted clean latent only (no UNet backward
pass) and reuses each view's noise prediction. A tiny decoder (TAESD, `madebyollin/taesd`, an `AutoencoderTiny`)
makes the images the LPIPS loss compares instead of the full VAE, and `sync_lpips_size=256` compares them at 256
pixels. The final image is still decoded by the pipeline's VAE.

    python examples/fast_mode.py
    python examples/fast_mode.py --tiny      # offline: tiny random model and a random AutoencoderTiny
"""

from syncdiffusion_utils.calls import prepare_call
from syncdiffusion_utils.cli import example_parser, generator, save_image
from syncdiffusion_utils.loading import load_pipeline, load_sync_decoder


def main(argv=None):
    parser = example_parser(__doc__, "outputs/fast_mode.png", "a photo of a city skyline at night")
    parser.add_argument("--decoder", default="madebyollin/taesd", help="AutoencoderTiny Hub id or folder")
    args = parser.parse_args(argv)
    pipe = load_pipeline("tiny" if args.tiny else args.model, args.device)
    # AutoencoderTiny.from_pretrained("madebyollin/taesd") on the pipeline's device and dtype.
    decoder = load_sync_decoder("tiny" if args.tiny else args.decoder, pipe)
    height, width, steps = (64, 256, 8) if args.tiny else (512, 2048, 50)

    call = prepare_call(
        pipe,
        prompt=args.prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        sync_mode="fast",
        sync_decoder=decoder,
        sync_lpips_size=256,
    )
    image = pipe(**call, generator=generator(args.seed)).images[0]
    save_image(image, args.output)


if __name__ == "__main__":
    main()
