"""Every GPU goal measured in one process, on one random-weight pipeline, the results saved after each run.

    python benchmarks/gpu_goals.py                  # SD 2 base architecture, float16, CUDA; results in benchmarks/

The project's own measurement (the figures of README.md and docs/gpu.md), kept beside the JSON files it writes and
not part of the installed package; it runs the checkout's `syncdiffusion_utils.benchmark` and pipelines.

A lent GPU is short of time, not memory, so the runs share one pipeline build and come most important first;
once `--budget` seconds have passed the remaining ones are skipped (and say so):

1. `gpu-default`: the command's default panorama (512x2048, 50 steps, 5 synchronized) with diffusers'
   `StableDiffusionPanoramaPipeline`, all views in one batch, as the reference; MultiDiffusion, exact, fast and
   fast + tiny decoder with `view_batch_size="auto"`.
2. `gpu-default-steady`: the reference, exact and fast again, each the faster of two calls (a process's first
   synchronized call also grows the allocator and chooses kernels).
3. `components`: seconds of each network pass (UNet, VAE decoder, LPIPS) alone, at 1, 4 and 8 views.
4. `gpu-wide` (exact, an emulated 6 GiB card) and `gpu-wide-fast` (the fast modes, 4 GiB, the text encoder moved
   to the CPU after encoding): 512x8192, tiled final decode.
5. `lpips-precision`: LPIPS's image gradient in float16 against float32, and the time of each.
6. `gpu-default-channels-last`: the reference, MultiDiffusion and exact with the UNet and VAE channels-last.
7. `gpu-default-unbatched`: MultiDiffusion with one view per UNet call, as the panorama pipeline's default.
8. `gpu-default-compiled`: the reference and MultiDiffusion with `torch.compile`d UNet and decoder.

Then the goal table. Everything goes into one file, `OUT/gpu-goals-DEVICE.json`, rewritten after each run. Random
weights: the costs are the real architectures', the images mean nothing.
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time
import traceback


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # `python benchmarks/gpu_goals.py`: the checkout's package and pipelines, installed or not
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from syncdiffusion_utils import benchmark  # noqa: E402


DEFAULT_MODES = [
    "panorama-pipeline",
    "multidiffusion@auto",
    "exact@auto",
    "fast@auto",
    "fast+tiny-decoder+lpips256@auto",
]
RUNS = [
    ("gpu-default", {"preset": "gpu-default", "modes": DEFAULT_MODES}),
    # The same after a first call of each (allocator grown, kernels chosen), as a user's second panorama runs.
    (
        "gpu-default-steady",
        {"preset": "gpu-default", "modes": ["panorama-pipeline", "exact@auto", "fast@auto"], "repeat": 2},
    ),
    ("components", {"measure": "components", "view_counts": (1, 4, 8)}),
    ("gpu-wide", {"preset": "gpu-wide"}),
    ("gpu-wide-fast", {"preset": "gpu-wide-fast"}),
    ("lpips-precision", {"measure": "lpips", "views": 8, "size": 512}),
    ("gpu-default-channels-last", {"preset": "gpu-default", "modes": DEFAULT_MODES[:3], "channels_last": True}),
    ("gpu-default-unbatched", {"preset": "gpu-default", "modes": ["panorama-pipeline", "multidiffusion@1"]}),
    # Compilation happens inside the first call of each new shape: the faster of two calls is kept. `needs`: the
    # seconds of budget that must be left for the run to start (compiling SD 2's UNet and decoder takes minutes).
    (
        "gpu-default-compiled",
        {"preset": "gpu-default", "modes": DEFAULT_MODES[:2], "compile": True, "repeat": 2, "needs": 150},
    ),
]
# run_benchmark's arguments a preset holds (the rest of a preset is the command line's business).
BENCHMARK_KEYS = (
    "height",
    "width",
    "stride",
    "steps",
    "sync_thres",
    "view_batch_size",
    "reference",
    "vae_tiling",
    "memory_limit_gib",
    "modes",
    "channels_last",
    "compile",
    "repeat",
    "offload_text_encoder",
)


def _device_slug(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


class Timer:
    """Median seconds of a callable over `repeat` runs after `warmup`, timed with device events on CUDA."""

    def __init__(self, device, warmup=1, repeat=3):
        self.device, self.warmup, self.repeat = device, warmup, repeat

    def __call__(self, fn):
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeat):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                begin = time.perf_counter()
                fn()
                times.append(time.perf_counter() - begin)
        return statistics.median(times)


def component_seconds(pipe, device, dtype, view_counts=(1, 8), seed=0, warmup=1, repeat=3):
    """
    Seconds of one pass of each network over `views` views: the guided UNet forward (2 samples a view), the UNet
    forward and backward to its input (the exact mode's gradient), the VAE decoder forward and forward+backward, and
    LPIPS forward+backward in float32, on the pipeline's window.
    """
    window = pipe.unet.config.sample_size
    generator = torch.Generator("cpu").manual_seed(seed)
    timer = Timer(device, warmup, repeat)
    embeds = pipe.encode_prompt("a photo of a mountain range at twilight", device, 1, True)
    embeds = torch.cat([embeds[1], embeds[0]])  # [uncond, cond]
    loss = pipe.perceptual_loss(device)
    result = {}
    for views in view_counts:
        latents = torch.randn((views, 4, window, window), generator=generator).to(device, dtype)
        hidden = embeds.repeat(views, 1, 1)
        t = torch.tensor(500, device=device)

        def unet_forward(x=latents):
            return pipe.unet(x.repeat_interleave(2, dim=0), t, encoder_hidden_states=hidden, return_dict=False)[0]

        def unet_backward():
            x = latents.detach().requires_grad_(True)
            with torch.enable_grad():
                torch.autograd.grad(unet_forward(x).float().square().sum(), x)

        def decode(x=latents):
            return pipe.vae.decode(x / pipe.vae.config.scaling_factor, return_dict=False)[0]

        def decode_backward():
            x = latents.detach().requires_grad_(True)
            with torch.enable_grad():
                torch.autograd.grad(decode(x).float().square().mean(), x)

        with torch.no_grad():
            images = decode().float().clamp(-1, 1)
        anchor = images[:1].expand_as(images)

        def lpips_backward():
            x = images.detach().requires_grad_(True)
            with torch.enable_grad():
                torch.autograd.grad(loss(x, anchor).sum(), x)

        with torch.no_grad():
            row = {"unet_guided_forward": timer(unet_forward), "decoder_forward": timer(decode)}
        row.update(
            unet_forward_backward=timer(unet_backward),
            decoder_forward_backward=timer(decode_backward),
            lpips_forward_backward=timer(lpips_backward),
        )
        result[str(views)] = row
        benchmark._release_memory(device)
    return result


def lpips_precision(pipe, device, views=8, size=512, seed=0, loss_scale=2.0**12, warmup=1, repeat=3):
    """
    LPIPS's gradient with respect to the images, float16 against float32 (the pipeline's choice), on smooth random
    images near a smooth random anchor: cosine, relative error, the share of float16 gradient elements that are zero
    where float32's are not (underflow), each with the loss scaled by `loss_scale` before the float16 backward, and
    the seconds of a forward+backward in each precision.
    """
    generator = torch.Generator("cpu").manual_seed(seed)

    def smooth(n):  # random low-frequency images in [-1, 1]: closer to photographs than white noise
        coarse = torch.rand((n, 3, size // 16, size // 16), generator=generator) * 2 - 1
        return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(
            -1, 1
        )

    anchor = smooth(1).expand(views, -1, -1, -1).to(device)
    images = (anchor + 0.3 * smooth(views).to(device)).clamp(-1, 1)
    loss32 = pipe.perceptual_loss(device)
    loss16 = copy.deepcopy(loss32).half()

    def gradient(loss, dtype, scale):
        x = images.to(dtype).requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss(x, anchor.to(dtype)).sum() * scale, x)
        return grad.float() / scale

    reference = gradient(loss32, torch.float32, 1.0)
    result = {"views": views, "size": size, "loss_scale": loss_scale, "backbone": "random VGG-16 (no weights here)"}
    for name, scale in (("float16", 1.0), ("float16_scaled", loss_scale)):
        grad = gradient(loss16, torch.float16, scale)
        result[name] = {
            "cosine": torch.nn.functional.cosine_similarity(grad.flatten(), reference.flatten(), dim=0).item(),
            "relative_error": ((grad - reference).norm() / reference.norm()).item(),
            "underflow_share": ((grad == 0) & (reference != 0)).float().mean().item(),
            "finite": bool(torch.isfinite(grad).all()),
        }
    timer = Timer(device, warmup, repeat)
    result["seconds_float32"] = timer(lambda: gradient(loss32, torch.float32, 1.0))
    result["seconds_float16"] = timer(lambda: gradient(loss16, torch.float16, loss_scale))
    result["gradient_abs_median_float32"] = reference.abs().median().item()
    return result


def _benchmark_run(pipe, arch, device, dtype, options, overrides):
    preset = {**benchmark.PRESETS[options["preset"]], **{k: v for k, v in options.items() if k != "preset"}}
    kwargs = {key: preset[key] for key in BENCHMARK_KEYS if key in preset}
    kwargs.update(overrides)
    channels_last = kwargs.pop("channels_last", False)
    if channels_last:
        benchmark.set_channels_last(pipe)
    try:
        rows = benchmark.run_benchmark(arch=arch, device=device, dtype=dtype, pipe=pipe, progress=True, **kwargs)
    finally:  # the next runs share this pipeline, also after a failed one
        if channels_last:
            benchmark.set_channels_last(pipe, False)
        pipe.text_encoder.to(device)
    print(benchmark.format_table(rows.config, rows), flush=True)
    return {"config": {**rows.config, "channels_last": channels_last}, "rows": list(rows)}


def _row(result, mode):
    for row in (result or {}).get("rows", []):
        if row["mode"] == mode:
            return row
    return None


def _ratio(numerator, denominator):
    return None if numerator is None or denominator is None else numerator / denominator


def goal_table(results):
    """The goals, each with its figure from `results` (None where its run did not happen or failed)."""
    default = results.get("gpu-default")
    reference = _row(default, "panorama-pipeline")
    exact, md = _row(default, "exact@auto"), _row(default, "multidiffusion@auto")
    channels_last = results.get("gpu-default-channels-last")
    exact_cl = _row(channels_last, "exact@auto")
    compiled = _row(results.get("gpu-default-compiled"), "multidiffusion@auto")
    wide, wide_fast = _row(results.get("gpu-wide"), "exact"), _row(results.get("gpu-wide-fast"), "fast")
    wide_tiny = _row(results.get("gpu-wide-fast"), "fast+tiny-decoder+lpips256")
    steady = results.get("gpu-default-steady")
    steady_reference, steady_exact = _row(steady, "panorama-pipeline"), _row(steady, "exact@auto")

    def seconds(row):
        return None if row is None or row.get("error") else row["seconds"]

    def over_reference(row):
        return _ratio(seconds(row), seconds(reference))

    def peak(row):
        return None if row is None else (None if row.get("error") else row["peak_mem_mib"])

    goals = [
        ("exact, 512x2048 / 50 steps, x the batched panorama pipeline (goal <= 1.25)", over_reference(exact), 1.25),
        ("  the same, channels-last UNet and VAE", over_reference(exact_cl), 1.25),
        (
            "  the same, each the faster of two calls (steady state)",
            _ratio(seconds(steady_exact), seconds(steady_reference)),
            1.25,
        ),
        ("MultiDiffusion auto, x the batched panorama pipeline (goal <= 1)", over_reference(md), 1.0),
        ("  the same, compiled UNet and decoder", over_reference(compiled), 1.0),
        ("512x8192 exact on a 6 GiB card: peak MiB (goal < 6144)", peak(wide), 6144),
        ("512x8192 fast on a 4 GiB card: peak MiB (goal < 4096)", peak(wide_fast), 4096),
        ("  the same, fast + tiny decoder + LPIPS at 256 px", peak(wide_tiny), 4096),
    ]
    return [
        {"goal": goal, "figure": figure, "bound": bound, "met": None if figure is None else figure <= bound}
        for goal, figure, bound in goals
    ] + [{"reference_seconds": seconds(reference), "exact_seconds": seconds(exact), "md_auto_seconds": seconds(md)}]


def run_goals(out, device="cuda", dtype="float16", budget=None, runs=None, overrides=None, arch="sd2"):
    """
    Run `runs` (default `RUNS`) in order on one `arch` pipeline with a 64-latent window. After each run
    `out/gpu-goals-DEVICE.json` is rewritten with every result so far and the goal table (one file, so that a run
    cut short still leaves what it measured). `overrides` replace the presets' sizes and steps (tests).
    """
    device = benchmark._resolve_device(device)
    torch_dtype = benchmark.DTYPES[dtype]
    overrides = {} if overrides is None else dict(overrides)
    started = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    slug = _device_slug(device)
    path = os.path.join(out, f"gpu-goals-{slug}.json")
    print(f"building {arch} in {dtype} on {device} ({slug}) ...", flush=True)
    pipe = benchmark.build_pipeline(arch, sample_size=64, device=device, dtype=torch_dtype)
    results, skipped = {}, []
    for name, options in RUNS if runs is None else runs:
        elapsed = time.perf_counter() - started
        options = dict(options)
        if budget is not None and elapsed + options.pop("needs", 0) > budget:
            skipped.append(name)
            print(f"== {name}: skipped, {elapsed:.0f} s of the {budget:.0f} s budget spent", flush=True)
            continue
        print(f"== {name} (at {elapsed:.0f} s)", flush=True)
        try:
            measure = {k: v for k, v in options.items() if k != "measure"}
            if options.get("measure") == "components":
                result = component_seconds(pipe, device, torch_dtype, **measure)
            elif options.get("measure") == "lpips":
                result = lpips_precision(pipe, device, **measure)
            else:
                result = _benchmark_run(pipe, arch, device, dtype, options, overrides)
        except Exception:  # one failed run must not cost the others
            result = {"error": traceback.format_exc()}
            print(result["error"], file=sys.stderr, flush=True)
        if "rows" not in result:
            print(json.dumps(result, indent=1), flush=True)
        result["seconds_in_session"] = time.perf_counter() - started
        results[name] = result
        _write(path, results, skipped)
        benchmark._release_memory(device)
    goals = _write(path, results, skipped)
    print(format_goals(goals, skipped), flush=True)
    return results, goals


def _write(path, results, skipped):
    goals = goal_table(results)
    versions = {
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"goals": goals, "skipped": skipped, "versions": versions, "runs": results}, f, indent=2)
    return goals


def _version(package):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def format_goals(goals, skipped=()):
    lines = ["", "goal".ljust(82) + "figure".rjust(10) + "  met"]
    for goal in goals:
        if "goal" not in goal:
            lines.append("seconds: " + ", ".join(f"{k} {benchmark._fmt(v, '.2f')}" for k, v in goal.items()))
            continue
        met = "-" if goal["met"] is None else ("yes" if goal["met"] else "NO")
        lines.append(goal["goal"].ljust(82) + benchmark._fmt(goal["figure"], ".2f").rjust(10) + "  " + met)
    if skipped:
        lines.append("skipped for the time budget: " + ", ".join(skipped))
    return "\n".join(lines)


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_goals.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=HERE, help="folder for the JSON file (default: this script's, benchmarks/)")
    parser.add_argument("--budget", type=_positive_float, help="seconds after which no further run starts")
    parser.add_argument("--only", help="comma-separated run names (default: all, in order)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float16", choices=sorted(benchmark.DTYPES))
    args = parser.parse_args(argv)
    runs = RUNS
    if args.only is not None:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {name for name, _ in RUNS})
        if unknown:
            parser.error(f"--only: unknown runs {unknown}; choose from {[name for name, _ in RUNS]}")
        runs = [run for run in RUNS if run[0] in wanted]
    run_goals(args.out, args.device, args.dtype, args.budget, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
