"""An SDXL panorama: `SyncDiffusionXLPipeline` on Stable Diffusion XL base, 1024x4096 pixels in views of 1024 pixels,
kept one scene by SyncDiffusion.

    python examples/sdxl_panorama.py
    python examples/sdxl_panorama.py --fp16        # on a GPU: the SDXL VAE still decodes in float32 (force_upcast)
    python examples/sdxl_panorama.py --tiny        # offline, tiny random SDXL model

LPIPS on 1024-pixel views costs four times what it does on SD 2's 512-pixel ones: `sync_lpips_size=512` compares
the views at 512 pixels instead.
"""

from syncdiffusion_utils.calls import prepare_call
from syncdiffusion_utils.cli import example_parser, generator, save_image
from syncdiffusion_utils.loading import load_pipeline


MODEL = "stabilityai/stable-diffusion-xl-base-1.0"


def main(argv=None):
    parser = example_parser(__doc__, "outputs/sdxl_panorama.png", "a photo of a mountain range at twilight")
    parser.set_defaults(model=MODEL)
    parser.add_argument("--fp16", action="store_true", help="float16 weights (GPU only)")
    args = parser.parse_args(argv)

    # `load_pipeline` picks SyncDiffusionXLPipeline from the model's model_index.json; `tiny-xl` is built offline.
    pipe = load_pipeline("tiny-xl" if args.tiny else args.model, args.device, fp16=args.fp16)
    # The UNet's window is 128 latents (1024 pixels) for SDXL base, 8 latents (64 pixels) for the tiny model; the
    # default stride is an eighth of it (16 latents), which for the tiny model would make 25 views: 4 there.
    if args.tiny:
        height, width, steps, stride, lpips_size = 64, 256, 8, 4, None
    else:
        height, width, steps, stride, lpips_size = 1024, 4096, 50, None, 512

    call = prepare_call(
        pipe,
        prompt=args.prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        stride=stride,
        sync_lpips_size=lpips_size,
    )
    image = pipe(**call, generator=generator(args.seed)).images[0]
    save_image(image, args.output)


if __name__ == "__main__":
    main()
