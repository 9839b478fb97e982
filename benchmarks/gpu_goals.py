"""Every GPU goal measured in one process, on one random-weight pipeline, the results saved after each run.

    python benchmarks/gpu_goals.py                  # SD 2 base architecture, float16, CUDA; results in benchmarks/

The project's own measurement (the figures of README.md and docs/gpu.md), kept beside the JSON files it writes and
not part of the installed package; it runs the checkout's `syncdiffusion_utils.benchmark` and pipelines.

A lent GPU is short of time, not memory, so the runs come most important first, those in this process share one
pipeline build (made when the first of them starts), and once `--budget` seconds have passed the remaining ones are
skipped (and say so). The `compile` group (`--only compile`) is what the compiled exact mode costs, and comes first:

1. `first-call-exact`: a fresh process, as the `syncdiffusion` command is (one panorama per process): the default
   panorama (512x2048, 50 steps, 5 synchronized) in the exact mode with `view_batch_size="auto"`, its first call
   (no warm-up: the allocator grows, kernels are chosen) and a second call; then diffusers'
   `StableDiffusionPanoramaPipeline` with all views in one batch, twice: the ratios' reference.
2. `first-call-exact-compiled`: run 1's exact mode with the UNet's and the VAE decoder's repeated blocks compiled
   (regional compilation, `syncdiffusion_utils.compiling`), torch's compile caches in a new, empty folder: the
   first call compiles (forward and backward), the second is the steady state.
3. `first-call-exact-compiled-warm`: the same again in another fresh process, on the caches the previous one filled
   (what a second `syncdiffusion --compile` run pays).
4. `first-call-exact-capped`: run 1's exact mode with at most 8 views per gradient pass (a smaller allocator on a
   first call, against slower passes): the data for a first-call cap in "auto".
5. `gpu-default-compiled`: a fresh process, `benchmark --preset gpu-default --compile`'s rows: the reference,
   MultiDiffusion, exact and fast, eager, then compiled (regional, on the warm caches), two calls each.
6. `first-call-exact-compiled-whole`: run 2 with each model compiled whole (`--compile-mode whole`), its own empty
   cache folder.
7. `flux-default-compiled`: a fresh process, `benchmark --preset flux-default --compile`'s MultiDiffusion, exact and
   fast (FLUX.1's architecture in bfloat16, 1024x4096), eager then compiled, two calls each; it needs 590 s of
   budget, so it runs alone (`--only flux-default-compiled`).

Then the earlier measurements, in this process:

8. `gpu-default`: the reference; MultiDiffusion, exact, fast and fast + tiny decoder with "auto", first calls.
9. `gpu-default-steady`: the reference, exact and fast again, each the faster of two calls.
10. `components`: seconds of each network pass (UNet, VAE decoder, LPIPS) alone, at 1, 4 and 8 views.
11. `gpu-wide` (exact, an emulated 6 GiB card) and `gpu-wide-fast` (the fast modes, 4 GiB, the text encoder moved
    to the CPU after encoding): 512x8192, tiled final decode.
12. `lpips-precision`: LPIPS's image gradient in float16 against float32, and the time of each.
13. `gpu-default-channels-last`: the reference, MultiDiffusion and exact with the UNet and VAE channels-last.
14. `gpu-default-unbatched`: MultiDiffusion with one view per UNet call, as the panorama pipeline's default.

Then the goal table. Everything goes into one file, `OUT/gpu-goals-DEVICE.json`, rewritten after each run (a fresh
process's run is written when it ends). Random weights: the costs are the real architectures', the images mean
nothing.
"""

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace


STARTED = time.perf_counter()  # a fresh process's imports count from here
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # `python benchmarks/gpu_goals.py`: the checkout's package and pipelines, installed or not
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from syncdiffusion_utils import benchmark, compiling  # noqa: E402


# The FLUX default panorama's modes, eager and then compiled; eager MultiDiffusion is the reference.
FLUX_MODES = ["multidiffusion", "exact", "fast"]
DEFAULT_MODES = [
    "panorama-pipeline",
    "multidiffusion@auto",
    "exact@auto",
    "fast@auto",
    "fast+tiny-decoder+lpips256@auto",
]
# A first call of the exact mode, and a second, with nothing run before in the process.
FIRST_CALL = {"preset": "gpu-default", "modes": ["exact@auto"], "reference": "exact@auto", "warmup": False}
# The same, then the reference twice (after the exact mode's calls: a warm process), for the ratios.
FIRST_CALL_AND_REFERENCE = {**FIRST_CALL, "modes": ["exact@auto", "panorama-pipeline"]}
# The gradient-pass cap of `first-call-exact-capped`: the trial cap of docs/gpu.md (7% slower in the steady state).
GRADIENT_CAP = 8
# `process`: the run goes to a fresh process (`--child`); `compile_first`: the pipeline is compiled so before the
# first call; `cache`: the compile cache folder, by name (one per name and session, new and empty at first use).
# `needs`: the seconds of budget that must be left for the run to start.
COMPILE_RUNS = [
    ("first-call-exact", {"process": {"options": FIRST_CALL_AND_REFERENCE}, "needs": 90}),
    (
        "first-call-exact-compiled",
        {"process": {"options": FIRST_CALL, "compile_first": "regional", "cache": "regional"}, "needs": 240},
    ),
    (
        "first-call-exact-compiled-warm",
        {"process": {"options": FIRST_CALL, "compile_first": "regional", "cache": "regional"}, "needs": 120},
    ),
    ("first-call-exact-capped", {"process": {"options": FIRST_CALL, "gradient_cap": GRADIENT_CAP}, "needs": 90}),
    (
        "gpu-default-compiled",
        {
            "process": {
                "options": {"preset": "gpu-default", "modes": DEFAULT_MODES[:4], "compile": True},
                "cache": "regional",
            },
            "needs": 240,
        },
    ),
    (
        "first-call-exact-compiled-whole",
        {"process": {"options": FIRST_CALL, "compile_first": "whole", "cache": "whole"}, "needs": 300},
    ),
    # The FLUX default panorama (FLUX.1's architecture, T5-XXL's encoder included, bfloat16): building it alone takes
    # minutes, so it needs a budget of its own (`--only flux-default-compiled`).
    (
        "flux-default-compiled",
        {
            "process": {
                "options": {"preset": "flux-default", "modes": FLUX_MODES, "compile": True, "repeat": 2},
                "arch": "flux",
                "dtype": "bfloat16",
                "sample_size": 128,
                "build": {"full_text_encoders": True},
                "cache": "flux",
            },
            "needs": 590,
        },
    ),
]
GROUPS = {"compile": [name for name, _ in COMPILE_RUNS]}
RUNS = COMPILE_RUNS + [
    # First calls of each mode (after the warm-up), as docs/gpu.md's table.
    ("gpu-default", {"preset": "gpu-default", "modes": DEFAULT_MODES, "repeat": 1}),
    # The same after a first call of each (allocator grown, kernels chosen), as a user's second panorama runs.
    (
        "gpu-default-steady",
        {"preset": "gpu-default", "modes": ["panorama-pipeline", "exact@auto", "fast@auto"], "repeat": 2},
    ),
    ("components", {"measure": "components", "view_counts": (1, 4, 8)}),
    ("gpu-wide", {"preset": "gpu-wide"}),
    ("gpu-wide-fast", {"preset": "gpu-wide-fast"}),
    ("lpips-precision", {"measure": "lpips", "views": 8, "size": 512}),
    (
        "gpu-default-channels-last",
        {"preset": "gpu-default", "modes": DEFAULT_MODES[:3], "channels_last": True, "repeat": 1},
    ),
    (
        "gpu-default-unbatched",
        {"preset": "gpu-default", "modes": ["panorama-pipeline", "multidiffusion@1"], "repeat": 1},
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
    "compile_mode",
    "compile_cache",
    "compile_backend",
    "repeat",
    "warmup",
    "offload_text_encoder",
    "full_text_encoders",
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
    compiled_run = results.get("gpu-default-compiled")
    compiled_reference = _row(compiled_run, "panorama-pipeline")
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

    def call(row, index, key="seconds"):
        """The `index`-th call's figure (0: the first call, 1: the second, the steady state)."""
        calls = [] if row is None or row.get("error") else row.get("calls", [])
        return calls[index][key] if len(calls) > index else None

    def over_compiled_reference(mode):  # the compiled run's fastest call over its own eager reference's
        return _ratio(seconds(_row(compiled_run, mode + benchmark.COMPILED_SUFFIX)), seconds(compiled_reference))

    flux_run = results.get("flux-default-compiled")

    def over_flux_reference(mode):
        return _ratio(seconds(_row(flux_run, mode)), seconds(_row(flux_run, "multidiffusion")))

    fresh = {name: _row(results.get(name), "exact@auto") for name, _ in COMPILE_RUNS if name.startswith("first")}
    reference_steady = call(_row(results.get("first-call-exact"), "panorama-pipeline"), 1)

    goals = [
        ("exact, 512x2048 / 50 steps, x the batched panorama pipeline (goal <= 1.25)", over_reference(exact), 1.25),
        ("  the same, channels-last UNet and VAE", over_reference(exact_cl), 1.25),
        (
            "  the same, each the faster of two calls (steady state)",
            _ratio(seconds(steady_exact), seconds(steady_reference)),
            1.25,
        ),
        ("MultiDiffusion auto, x the batched panorama pipeline (goal <= 1)", over_reference(md), 1.0),
        (
            "  the same, compiled (regional), x the eager reference of its run",
            over_compiled_reference(DEFAULT_MODES[1]),
            1.0,
        ),
        ("512x8192 exact on a 6 GiB card: peak MiB (goal < 6144)", peak(wide), 6144),
        ("512x8192 fast on a 4 GiB card: peak MiB (goal < 4096)", peak(wide_fast), 4096),
        ("  the same, fast + tiny decoder + LPIPS at 256 px", peak(wide_tiny), 4096),
        (
            "exact compiled (regional), second call, x the reference's (goal <= 1.25)",
            _ratio(call(fresh["first-call-exact-compiled"], 1), reference_steady),
            1.25,
        ),
        (
            "  the same, whole models compiled",
            _ratio(call(fresh["first-call-exact-compiled-whole"], 1), reference_steady),
            1.25,
        ),
        ("  the same, eager", _ratio(call(fresh["first-call-exact"], 1), reference_steady), 1.25),
        ("  compiled in the benchmark's process, x its eager reference", over_compiled_reference("exact@auto"), 1.25),
        (
            "fast compiled in the benchmark's process, x its eager reference",
            over_compiled_reference("fast@auto"),
            None,
        ),
        (
            "exact, first call of a fresh process (the command), eager: seconds",
            call(fresh["first-call-exact"], 0),
            None,
        ),
        ("  compiled (regional), empty compile caches: seconds", call(fresh["first-call-exact-compiled"], 0), None),
        (
            "    of which compiling: seconds",
            call(fresh["first-call-exact-compiled"], 0, "compile_seconds"),
            None,
        ),
        (
            "  compiled (regional), the caches of an earlier process: seconds",
            call(fresh["first-call-exact-compiled-warm"], 0),
            None,
        ),
        ("  compiled whole, empty compile caches: seconds", call(fresh["first-call-exact-compiled-whole"], 0), None),
        (
            f"  eager, at most {GRADIENT_CAP} views per gradient pass: seconds",
            call(fresh["first-call-exact-capped"], 0),
            None,
        ),
        ("  eager: peak MiB", call(fresh["first-call-exact"], 0, "peak_mem_mib"), None),
        (
            f"  eager, at most {GRADIENT_CAP} views per gradient pass: peak MiB",
            call(fresh["first-call-exact-capped"], 0, "peak_mem_mib"),
            None,
        ),
        ("FLUX default panorama, exact, x eager MultiDiffusion", over_flux_reference("exact"), None),
        ("  the same, compiled (regional)", over_flux_reference("exact" + benchmark.COMPILED_SUFFIX), None),
    ]
    return [
        {
            "goal": goal,
            "figure": figure,
            "bound": bound,
            "met": None if figure is None or bound is None else figure <= bound,
        }
        for goal, figure, bound in goals
    ] + [{"reference_seconds": seconds(reference), "exact_seconds": seconds(exact), "md_auto_seconds": seconds(md)}]


def run_goals(out, device="cuda", dtype="float16", budget=None, runs=None, overrides=None, arch="sd2", sample_size=64):
    """
    Run `runs` (default `RUNS`) in order on one `arch` pipeline with a `sample_size` window, built when the first run
    of this process starts; a run with `process` goes to a fresh process of its own (`process_run`). After each run
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
    pipe = None
    caches = tempfile.mkdtemp(prefix="syncdiffusion-compile-caches-")  # the named cache folders of this session
    results, skipped = {}, []
    try:
        for name, options in RUNS if runs is None else runs:
            elapsed = time.perf_counter() - started
            options = dict(options)
            needs = options.pop("needs", 0)
            if budget is not None and elapsed + needs > budget:
                skipped.append(name)
                print(f"== {name}: skipped, {elapsed:.0f} s of the {budget:.0f} s budget spent", flush=True)
                continue
            print(f"== {name} (at {elapsed:.0f} s)", flush=True)
            try:
                measure = {k: v for k, v in options.items() if k != "measure"}
                if "process" in options:
                    timeout = None if budget is None else budget - elapsed
                    spec = {"sample_size": sample_size, **options["process"]}
                    result = process_run(spec, arch, device, dtype, overrides, caches, timeout)
                else:
                    if pipe is None:
                        print(f"building {arch} in {dtype} on {device} ({slug}) ...", flush=True)
                        pipe = benchmark.build_pipeline(
                            arch, sample_size=sample_size, device=device, dtype=torch_dtype
                        )
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
            if pipe is not None:  # a process that only starts others leaves the device to them
                benchmark._release_memory(device)
    finally:
        shutil.rmtree(caches, ignore_errors=True)
    goals = _write(path, results, skipped)
    print(format_goals(goals, skipped), flush=True)
    return results, goals


# ----------------------------------------------------------------------------------------------------------------
# A run in a fresh process
# ----------------------------------------------------------------------------------------------------------------


def process_run(spec, arch, device, dtype, overrides, caches, timeout=None):
    """
    Run `spec` in a fresh Python process (this script with `--child`) and return its result. The child's output
    goes to this process's; `timeout` seconds at most (then the result is an error saying so). `spec["cache"]`
    names a compile cache folder under `caches`, shared by the runs that name it; `spec` may name its own `arch`,
    `dtype`, `sample_size` and `build_pipeline` arguments (`build`).
    """
    spec = {"arch": arch, "dtype": dtype, **spec, "device": str(device), "overrides": overrides}
    if spec.get("cache") is not None:
        spec["cache_dir"] = os.path.join(caches, spec["cache"])
    with tempfile.TemporaryDirectory(prefix="syncdiffusion-child-") as folder:
        result_path = os.path.join(folder, "result.json")
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            json.dumps(spec),
            "--child-result",
            result_path,
        ]
        try:
            done = subprocess.run(command, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"error": f"the fresh process ran past the {timeout:.0f} s left of the budget", "spec": spec}
        if done.returncode != 0 or not os.path.exists(result_path):
            return {"error": f"the fresh process exited with status {done.returncode}", "spec": spec}
        with open(result_path, encoding="utf-8") as f:
            return json.load(f)


def _count_files(folder):
    return sum(len(files) for _, _, files in os.walk(folder)) if folder and os.path.isdir(folder) else 0


def child_run(spec):
    """
    The measurement of a fresh process: build the pipeline, point torch's compile caches at `spec["cache_dir"]`,
    compile it (`spec["compile_first"]`: a compile mode, before any call), cap its gradient passes
    (`spec["gradient_cap"]`) and run `spec["options"]` as an in-process run would. The result says how long the
    process took to get there, and how many files the cache folder held before and after.
    """
    imported = time.perf_counter() - STARTED
    device = torch.device(spec["device"])
    torch_dtype = benchmark.DTYPES[spec["dtype"]]
    build_start = time.perf_counter()
    build = spec.get("build", {})
    pipe = benchmark.build_pipeline(
        spec["arch"], sample_size=spec["sample_size"], device=device, dtype=torch_dtype, **build
    )
    build_seconds = time.perf_counter() - build_start
    cache_dir = spec.get("cache_dir")
    result = {"spec": spec, "import_seconds": imported, "build_seconds": build_seconds}
    result["cache_files_before"] = _count_files(cache_dir)
    if cache_dir is not None:
        result["cache"] = compiling.setup_compile_cache(cache_dir)
    overrides = dict(spec.get("overrides") or {})
    if spec.get("compile_first"):
        backend = overrides.pop("compile_backend", "inductor")
        result["compiled"] = compiling.compile_pipeline(pipe, spec["compile_first"], backend=backend)
    options = {**spec["options"], **({"compile_cache": cache_dir} if cache_dir else {})}
    with gradient_views_capped(pipe, spec.get("gradient_cap")):
        result.update(_benchmark_run(pipe, spec["arch"], device, spec["dtype"], options, overrides))
    result["cache_files_after"] = _count_files(cache_dir)
    result["process_seconds"] = time.perf_counter() - STARTED
    return result


@contextmanager
def gradient_views_capped(pipe, cap):
    """
    `view_batch_size="auto"` with at most `cap` views per gradient pass (None: as the pipeline chooses), in batches
    of nearly equal size as "auto" makes them; the pipeline's own sizing is untouched and restored on exit.
    """
    if cap is None:
        yield pipe
        return
    from pipeline_syncdiffusion import balanced_batch_size

    choose = pipe.auto_view_batch_sizes

    def auto_view_batch_sizes(*args, **kwargs):
        view_batch_size, sync = choose(*args, **kwargs)
        if sync.gradient_batch_size > cap:
            sync = replace(sync, gradient_batch_size=balanced_batch_size(view_batch_size, cap))
        return view_batch_size, sync

    pipe.auto_view_batch_sizes = auto_view_batch_sizes
    try:
        yield pipe
    finally:
        del pipe.auto_view_batch_sizes


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
    parser.add_argument(
        "--only", help=f"comma-separated run names or groups ({', '.join(GROUPS)}) (default: all, in order)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float16", choices=sorted(benchmark.DTYPES))
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a fresh process's run (JSON), from process_run
    parser.add_argument("--child-result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        result = child_run(json.loads(args.child))
        with open(args.child_result, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        return 0
    try:
        runs = RUNS if args.only is None else select_runs(args.only)
    except ValueError as error:
        parser.error(str(error))
    run_goals(args.out, args.device, args.dtype, args.budget, runs)
    return 0


def select_runs(only):
    """The runs `--only` names (comma-separated run names and `GROUPS`), in `RUNS`' order."""
    wanted = [run for entry in only.split(",") for run in GROUPS.get(entry, [entry])]
    unknown = sorted(set(wanted) - {name for name, _ in RUNS})
    if unknown:
        names = [name for name, _ in RUNS]
        raise ValueError(f"--only: unknown runs {unknown}; choose from {names} or the groups {list(GROUPS)}")
    return [run for run in RUNS if run[0] in wanted]


if __name__ == "__main__":
    sys.exit(main())
