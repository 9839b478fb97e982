"""Swap SyncDiffusion in for an existing StableDiffusionPanoramaPipeline, without loading the models again.

diffusers deprecated StableDiffusionPanoramaPipeline (MultiDiffusion). SyncDiffusionPipeline has the same components
and the same call arguments, so code holding a panorama pipeline switches in one line, either way:

    sync = SyncDiffusionPipeline.from_pipe(panorama)         # shares the models and the scheduler's config
    sync = SyncDiffusionPipeline(**panorama.components)      # the same, by hand

    python examples/swap_from_panorama.py            # stabilityai/stable-diffusion-2-base
    python examples/swap_from_panorama.py --tiny     # offline, tiny random model
"""

import torch
from diffusers import DDIMScheduler, StableDiffusionPanoramaPipeline

from pipeline_syncdiffusion import SyncDiffusionPipeline
from syncdiffusion_utils.calls import prepare_call
from syncdiffusion_utils.cli import example_parser, generator, save_image
from syncdiffusion_utils.loading import resolve_device


def main(argv=None):
    parser = example_parser(__doc__, "outputs/swap_from_panorama.png", "a photo of the dolomites")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)

    # The pipeline an existing program already has.
    if args.tiny:
        from syncdiffusion_utils.testing import make_lpips, tiny_pipeline

        panorama = tiny_pipeline(pipeline_class=StableDiffusionPanoramaPipeline)
        height, width, steps = 64, 256, 8
    else:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        panorama = StableDiffusionPanoramaPipeline.from_pretrained(args.model, torch_dtype=dtype)
        panorama.scheduler = DDIMScheduler.from_config(panorama.scheduler.config)
        height, width, steps = 512, 2048, 50

    # The swap: no weights are loaded or copied.
    sync = SyncDiffusionPipeline.from_pipe(panorama)
    by_hand = SyncDiffusionPipeline(**panorama.components)
    print(
        f"from_pipe shares the UNet: {sync.unet is panorama.unet}; **components too: {by_hand.unet is panorama.unet}"
    )
    if args.tiny:
        sync.set_perceptual_loss(make_lpips())  # LPIPS with a random backbone: nothing to download
    sync = sync.to(device)
    sync.set_progress_bar_config(disable=False)

    # The same arguments as for the panorama pipeline (synchronization is on by default, sync_weight=20), with
    # view batches sized to the GPU and the decode tiled if it would not fit: `sync(prompt, height=..., ...)` works too.
    call = prepare_call(sync, prompt=args.prompt, height=height, width=width, num_inference_steps=steps)
    image = sync(**call, generator=generator(args.seed)).images[0]
    save_image(image, args.output)


if __name__ == "__main__":
    main()
