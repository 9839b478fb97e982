"""Load SyncDiffusionPipeline as a diffusers custom pipeline: from the pipeline file, or from a Hub repository.

    python examples/load_custom_pipeline.py                                      # custom_pipeline=<the file>
    python examples/load_custom_pipeline.py --hub-repo your-name/syncdiffusion   # custom_pipeline=<a Hub repo id>
    python examples/load_custom_pipeline.py --tiny                               # offline, tiny random model

`custom_pipeline` takes the path of a .py file, a folder holding `pipeline.py`, or a Hub repo id (upload one with
`syncdiffusion publish your-name/syncdiffusion`). diffusers then runs that file's code, hence
`trust_remote_code=True`: read it first, and pin a Hub version with `custom_revision="<commit>"`.
With --tiny a tiny random pipeline is saved to a temporary folder and loaded back with the local file.
"""

import tempfile

import torch
from diffusers import DDIMScheduler, DiffusionPipeline

import pipeline_syncdiffusion
from syncdiffusion_utils.calls import prepare_call
from syncdiffusion_utils.cli import example_parser, generator, save_image
from syncdiffusion_utils.loading import resolve_device


PIPELINE_FILE = pipeline_syncdiffusion.__file__  # the installed pipeline_syncdiffusion.py


def load(model, custom_pipeline, device):
    """Any Stable Diffusion checkpoint, run by the SyncDiffusion code from `custom_pipeline`."""
    pipe = DiffusionPipeline.from_pretrained(
        model,
        custom_pipeline=custom_pipeline,  # a file, a folder or a Hub repo id
        trust_remote_code=True,
        torch_dtype=torch.float16 if device.startswith("cuda") else torch.float32,
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the paper's scheduler
    return pipe.to(device)


def main(argv=None):
    parser = example_parser(__doc__, "outputs/custom_pipeline.png", "a photo of a mountain range at twilight")
    parser.add_argument("--hub-repo", help="load the pipeline code from this Hub repo id instead of the local file")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    source = PIPELINE_FILE if args.tiny or args.hub_repo is None else args.hub_repo

    if args.tiny:
        from syncdiffusion_utils.testing import make_lpips, save_tiny_pipeline

        if args.hub_repo is not None:
            print("note: --hub-repo needs the network; with --tiny the local pipeline file is used")
        with tempfile.TemporaryDirectory() as folder:
            save_tiny_pipeline(folder)
            pipe = load(folder, PIPELINE_FILE, device)
        pipe.set_perceptual_loss(make_lpips())  # LPIPS with a random backbone: nothing to download
        height, width, steps = 64, 256, 8
    else:
        pipe = load(args.model, source, device)
        height, width, steps = 512, 2048, 50
    print(f"loaded {type(pipe).__name__} from {source}")

    # The loaded class's own call, with view batches sized to the GPU and the decode tiled if it would not fit.
    call = prepare_call(pipe, prompt=args.prompt, height=height, width=width, num_inference_steps=steps)
    image = pipe(**call, generator=generator(args.seed)).images[0]
    save_image(image, args.output)


if __name__ == "__main__":
    main()
