"""SyncDiffusion on a small GPU: half precision, attention slicing, model CPU offload, and the memory-lean settings
of the pipeline itself (one view per batch, gradient checkpointing in the synchronization pass, the fast mode).

    python examples/small_gpu.py
    python examples/small_gpu.py --tiny      # offline, tiny random model

On a machine without a GPU, half precision and offloading cannot help: they are skipped with a printed note and the
example runs in float32 on the CPU.
"""

import torch

from syncdiffusion_utils.calls import prepare_call
from syncdiffusion_utils.cli import example_parser, generator, save_image
from syncdiffusion_utils.loading import load_pipeline, resolve_device


def main(argv=None):
    parser = example_parser(__doc__, "outputs/small_gpu.png", "a photo of a harbour at sunrise")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    pipe = load_pipeline(
        "tiny" if args.tiny else args.model,
        device,
        fp16=True,  # half the memory of the weights and activations
        attention_slicing=True,  # attention in slices: a lower peak, a little slower
        cpu_offload=True,  # each model moves to the GPU only while it runs
    )
    height, width, steps = (64, 256, 8) if args.tiny else (512, 2048, 50)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    call = prepare_call(
        pipe,
        prompt=args.prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        view_batch_size=1,  # one view at a time
        vae_tiling="auto",  # tiled decoding when the whole panorama would not fit at once
        sync_mode="fast",  # no backward pass through the UNet
        sync_gradient_checkpointing=True,  # recompute activations in the gradient pass instead of storing them
    )
    image = pipe(**call, generator=generator(args.seed)).images[0]
    save_image(image, args.output)
    if device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
