"""`syncdiffusion generate-set`: the panoramas of an evaluation, every prompt of a file times every seed.

    syncdiffusion generate-set prompts.txt --out sets/multidiffusion --seeds 0-19 --sync-weight 0
    syncdiffusion generate-set prompts.txt --out sets/syncdiffusion --seeds 0-19
    syncdiffusion generate-set prompts.txt --out sets/fast --seeds 0-19 --sync-mode fast
    syncdiffusion evaluate sets/multidiffusion sets/syncdiffusion sets/fast --plot eval.png

Every option of the main command applies (model, size, steps, scheduler, synchronization, ControlNet, hardware) and
resolves as there: what is left out comes from the pipeline class (SDXL: 1024x4096, guidance 5), so a set's image
is the main command's for the same prompt and seed. PROMPT, --output, --seed and --compare name one image and are
refused.

The folder's `index.json` is written before the first panorama: the settings that determine the images, each
image made so far with its prompt and seed (which `evaluate` reads), and how many are planned. A resumed run must
have the same settings; files that exist are skipped, so an interrupted run resumes where it stopped. Each file
name ends in a hash of everything that determines its image (settings, prompt, seed), so an edited prompt is a new
file, never an old image under a new prompt.

Under `accelerate launch` each process generates its share of the prompt x seed pairs on its own device, and the
main process keeps the index:

    accelerate launch --multi_gpu --num_processes 4 -m syncdiffusion_utils.generate_set prompts.txt --out sets/sync
"""

import hashlib
import json
import os
import re
import sys

from syncdiffusion_utils import calls, cli, loading
from syncdiffusion_utils.cli import _Parser
from syncdiffusion_utils.loading import CLIError


INDEX = "index.json"
# Main-command options that name one image; a set has many.
NOT_FOR_SETS = {"output": "--output", "seed": "--seed", "compare": "--compare"}
# The command's region and image flags: a set's index records text-to-image settings only, so they are refused rather
# than ignored.
TEXT_TO_IMAGE_ONLY = {
    "region": "--region",
    "region_bootstrap_steps": "--region-bootstrap-steps",
    "image": "--image",
    "outpaint": "--outpaint",
    "mask": "--mask",
    "strength": "--strength",
    "sync_anchor": "--sync-anchor",
}
# What determines a set's images, recorded in its index, compared on resume and hashed into the file names.
SETTINGS = (
    "model",
    "dtype",
    "scheduler",
    "height",
    "width",
    "steps",
    "guidance",
    "stride",
    "negative_prompt",
    "circular",
    "sync_weight",
    "sync_thres",
    "sync_decay_rate",
    "sync_freq",
    "sync_mode",
    "sync_gradient",
    "sync_reuse_noise",
    "sync_lpips_size",
    "sync_decode_downsample",
    "sync_decoder",
    "vae_tiling",
    "controlnet",
    "controlnet_scale",
    "control_image_sha256",
    "true_cfg_scale",
    "max_sequence_length",
)
# Settings the pipeline class decides when the flags leave them out: known only once the model is loaded.
CLASS_DEFAULTED = {
    "height": "height",
    "width": "width",
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "stride": "stride",
}
KEY_DIGITS = 12  # hex digits of the hash that ends a file name


def build_parser():
    return _Parser(
        prog="syncdiffusion generate-set",
        allow_abbrev=False,  # --seed must not pass for --seeds, nor --out for --output
        description=(
            "Generate a panorama for every prompt of PROMPTS (one per line; blank lines and lines starting with #"
            " are skipped) and every seed, into --out, skipping files that exist. Runs under `accelerate launch`"
            " to spread the work over processes."
        ),
        epilog=(
            "Every generation option of `syncdiffusion --help` applies (--model, --height, --width, --steps,"
            " --sync-weight, --sync-mode, --control-image, --vae-tiling, --device, ...), except PROMPT, --output,"
            " --seed and --compare."
        ),
    )


def _add_arguments(parser):
    parser.add_argument("prompts", metavar="PROMPTS", help="a text file, one prompt per line")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the panoramas and index.json")
    parser.add_argument("--seeds", default="0", help="e.g. 0-19, or 0,3,7, or 0-9,20-29 (default: 0)")
    return parser


def parse_seeds(text):
    """`"0-19"`, `"0,3,7"` or `"0-9,20-29"` as a list of distinct seeds in the given order."""
    seeds = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise CLIError(f"--seeds {text!r}: {part!r} is not a seed or a range like 0-19.", code=2)
        first = int(match.group(1))
        last = first if match.group(2) is None else int(match.group(2))
        if last < first:
            raise CLIError(f"--seeds {text!r}: the range {part.strip()!r} runs backwards.", code=2)
        seeds += [seed for seed in range(first, last + 1) if seed not in seeds]
    return seeds


def read_prompts(path):
    """The prompts of the file at `path`, one a line, skipping blank lines and lines starting with `#`. A UTF-8
    byte-order mark (as Windows editors write) is not part of the first line; a prompt given twice is an error (its
    panoramas would count twice)."""
    prompts, lines = [], {}
    try:
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                prompt = line.strip()
                if not prompt or prompt.startswith("#"):
                    continue
                if prompt in lines:
                    raise CLIError(
                        f"PROMPTS {path!r}: line {number} repeats line {lines[prompt]} ({prompt!r}); give each"
                        " prompt once."
                    )
                lines[prompt] = number
                prompts.append(prompt)
    except OSError as error:
        raise CLIError(f"PROMPTS {path!r}: cannot be read: {error.strerror or error}.") from None
    except UnicodeDecodeError as error:
        raise CLIError(f"PROMPTS {path!r}: not UTF-8 text ({error.reason} at byte {error.start}).") from None
    if not prompts:
        raise CLIError(f"PROMPTS {path!r}: no prompts (one per line; lines starting with # are skipped).")
    return prompts


def image_key(settings, prompt, seed):
    """A hash of everything that determines one image of a set: its settings, prompt and seed."""
    identity = json.dumps({"settings": settings, "prompt": prompt, "seed": seed}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:KEY_DIGITS]


def file_name(prompt, seed, settings):
    """`a-photo-of-a-city-seed3-0123456789ab.png`: readable (the prompt's first words and the seed), safe on every
    file system, and ending in `image_key`, so that another prompt or other settings never reuse the file."""
    slug = "-".join(re.findall(r"[a-z0-9]+", prompt.lower()))[:40].strip("-") or "prompt"
    return f"{slug}-seed{seed}-{image_key(settings, prompt, seed)}.png"


def plan(prompts, seeds, settings):
    """Every (prompt, seed) pair with its file name, prompt-major."""
    return [
        {"file": file_name(prompt, seed, settings), "prompt": prompt, "seed": seed}
        for prompt in prompts
        for seed in seeds
    ]


def _generation_args(rest):
    """The main command's options from the arguments `generate-set` does not know itself."""
    parser = cli.build_parser()
    parser.prog = "syncdiffusion generate-set"
    args = parser.parse_args(["(set)"] + rest)
    defaults = parser.parse_args(["(set)"])
    for name, flag in NOT_FOR_SETS.items():
        if getattr(args, name) != getattr(defaults, name):
            raise CLIError(f"{flag}: not for a set (it names one image); use --out and --seeds.", code=2)
    for name, flag in TEXT_TO_IMAGE_ONLY.items():
        if getattr(args, name, None) is not None:
            raise CLIError(
                f"{flag}: not for a set (sets are text-to-image panoramas); make region and image panoramas with"
                " `syncdiffusion`.",
                code=2,
            )
    if args.lpips_weights is not None and not os.path.isfile(os.path.expanduser(args.lpips_weights)):
        raise CLIError(f"--lpips-weights {args.lpips_weights!r} is not a file; expected vgg16-397923af.pth.", 2)
    if isinstance(args.sync_weight, tuple):
        raise CLIError(
            "--sync-weight: one value for a set; a sweep of several is for one panorama"
            " (syncdiffusion PROMPT --sync-weight 0,10,20,40).",
            code=2,
        )
    if args.sync_decoder == loading.TINY and args.model not in loading.TINY_MODELS:
        raise CLIError(
            "--sync-decoder tiny is a random decoder for `--model tiny` only; use e.g. madebyollin/taesd.", 2
        )
    return args


def _file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _flag_settings(args, height, width, steps, flux_options):
    """The settings the flags fix before any model loads: all of `SETTINGS` but the dtype and what the pipeline
    class decides because the flags leave it out."""
    settings = {
        "model": args.model,
        "scheduler": args.scheduler,
        "height": height,
        "width": width,
        "steps": steps,
        "guidance": args.guidance,
        "stride": args.stride,
        "negative_prompt": args.negative_prompt,
        "circular": args.circular,
        "sync_weight": args.sync_weight,
        "sync_thres": args.sync_thres,
        "sync_decay_rate": args.sync_decay_rate,
        "sync_freq": args.sync_freq,
        "sync_mode": args.sync_mode,
        "sync_gradient": args.sync_gradient,
        "sync_reuse_noise": args.sync_reuse_noise,
        "sync_lpips_size": args.sync_lpips_size,
        "sync_decode_downsample": args.sync_decode_downsample,
        "sync_decoder": args.sync_decoder,
        "vae_tiling": args.vae_tiling,
        "controlnet": args.controlnet,
        "controlnet_scale": None if args.controlnet is None else args.controlnet_scale,
        "control_image_sha256": None if args.control_image is None else _file_digest(args.control_image),
        "true_cfg_scale": flux_options.get("true_cfg_scale"),
        "max_sequence_length": flux_options.get("max_sequence_length"),
    }
    return {key: value for key, value in settings.items() if not (key in CLASS_DEFAULTED and value is None)}


def _options(args, device, processes):
    """What the index records without comparing it: how the images were made, not what they are."""
    return {
        "device": device,
        "processes": processes,
        "view_batch_size": args.view_batch_size,
        "attention_slicing": args.attention_slicing,
        "cpu_offload": args.cpu_offload,
        "compile": args.compile,
        "compile_mode": args.compile_mode,
        "compile_cache": args.compile_cache,
        "sync_gradient_checkpointing": args.sync_gradient_checkpointing,
        "lpips_weights": args.lpips_weights,
        "control_image": args.control_image,
    }


def _read_index(out):
    """The folder's index as a dict, or None without one; raises `CLIError` for one that cannot be read."""
    path = os.path.join(out, INDEX)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        if not isinstance(index["settings"], dict):
            raise TypeError("its settings are not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CLIError(f"--out {out!r}: its {INDEX} cannot be read ({error}); move it away to start over.") from None
    return index


def _check_resume(out, settings, complete):
    """A folder with an index may only be extended with the same settings: those in `settings`, and with
    `complete` also every setting the index has that `settings` lacks."""
    index = _read_index(out)
    if index is None:
        return
    previous = index["settings"]
    keys = list(settings) + ([key for key in previous if key not in settings] if complete else [])
    changed = [key for key in keys if previous.get(key) != settings.get(key)]
    if changed:
        what = ", ".join(f"{key} {previous.get(key)!r} -> {settings.get(key)!r}" for key in changed)
        raise CLIError(f"--out {out!r} holds a set made with other settings ({what}); use another --out.")


def write_index(out, settings, options, prompts, seeds, jobs):
    """Write `out/index.json`: the settings, the plan, and the planned images whose files exist (through a temporary
    file, so that a killed run leaves the previous index whole)."""
    index = {
        "settings": settings,
        "options": options,
        "prompts": prompts,
        "seeds": seeds,
        "planned": len(jobs),
        "images": [job for job in jobs if os.path.isfile(os.path.join(out, job["file"]))],
    }
    path = os.path.join(out, INDEX)
    with open(path + ".part", "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, ensure_ascii=False)
    os.replace(path + ".part", path)
    return index


def _load(args, device, control_image, height, width, steps, flux_options):
    """The pipeline, as the main command loads it, and the keyword arguments of its call (`calls.prepare_call`)."""
    pipe = loading.load_pipeline(
        args.model,
        device,
        args.fp16,
        scheduler=args.scheduler,
        attention_slicing=args.attention_slicing,
        cpu_offload=args.cpu_offload,
        progress=False,
        compile=args.compile,
        compile_mode=args.compile_mode,
        compile_cache=args.compile_cache,
    )
    if control_image is not None:
        pipe = loading.with_controlnet(pipe, args.controlnet)
    sync_decoder = None if args.sync_decoder is None else loading.load_sync_decoder(args.sync_decoder, pipe)
    if args.sync_weight != 0 or args.lpips_weights is not None:
        loading.load_perceptual_loss(pipe, args.lpips_weights)
    tiny = args.model in loading.TINY_MODELS
    control = {} if control_image is None else {"image": control_image}
    if control_image is not None:
        control["controlnet_conditioning_scale"] = args.controlnet_scale
    call = calls.prepare_call(
        pipe,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=args.guidance,
        negative_prompt=args.negative_prompt,
        stride=8 if tiny and args.stride is None else args.stride,  # as the main command: the tiny window is 8
        view_batch_size=args.view_batch_size,
        vae_tiling=args.vae_tiling,
        circular_padding=args.circular,
        sync_weight=args.sync_weight,
        sync_decay_rate=args.sync_decay_rate,
        sync_freq=args.sync_freq,
        sync_thres=args.sync_thres,
        sync_mode=args.sync_mode,
        sync_gradient=args.sync_gradient,
        sync_reuse_noise=args.sync_reuse_noise,
        sync_decoder=sync_decoder,
        sync_lpips_size=args.sync_lpips_size,
        sync_decode_downsample=args.sync_decode_downsample,
        sync_gradient_checkpointing=args.sync_gradient_checkpointing,
        **control,
        **flux_options,
    )
    return pipe, call


def _settings(flag_settings, pipe, call):
    """Every one of `SETTINGS`, with the loaded pipeline's dtype and the values its call resolved."""
    resolved = {key: call.get(name) for key, name in CLASS_DEFAULTED.items()}
    resolved["dtype"] = str(pipe.denoiser.dtype).removeprefix("torch.")
    settings = {**flag_settings, **resolved}
    return {key: settings[key] for key in SETTINGS}


def _generate(pipe, call, jobs, out, rank, on_saved):
    """Generate `jobs`, each saved under `out` through a temporary file (a killed run leaves no half-written PNG
    that a resumed run would take as done); `on_saved()` after each."""
    for number, job in enumerate(jobs, 1):
        try:
            image = pipe(prompt=job["prompt"], generator=cli.generator(job["seed"]), **call).images[0]
        except ValueError as error:
            message = cli._input_error(error)
            if message is None:
                raise
            raise CLIError(message, code=2) from None
        path = os.path.join(out, job["file"])
        image.save(path + ".part", format="PNG")
        os.replace(path + ".part", path)
        print(f"[process {rank}] wrote {path} ({number}/{len(jobs)})", flush=True)
        on_saved()


def main(argv=None) -> int:
    """`syncdiffusion generate-set ...`: returns the exit status; errors are `CLIError`s (one line)."""
    own, rest = _add_arguments(build_parser()).parse_known_args(sys.argv[1:] if argv is None else argv)
    args = _generation_args(rest)
    prompts, seeds = read_prompts(own.prompts), parse_seeds(own.seeds)
    if os.path.exists(own.out) and not os.path.isdir(own.out):
        raise CLIError(f"--out {own.out!r} is a file, not a folder.")
    # The flags the model's class cannot take are errors before anything loads, as in the main command.
    pipeline_class = loading.pipeline_class_of(args.model)
    cli._check_flags_for_class(args, pipeline_class)
    flux_options = cli._flux_options(args, pipeline_class)
    # The main command's sizes: the flags, else the tiny model's or the ControlNet condition's, else the class's.
    control_image = cli._control_image(args, args.model == loading.TINY)
    height, width, steps = cli._command_sizes(args, args.model in loading.TINY_MODELS, control_image)
    if args.model not in loading.TINY_MODELS and args.steps is None:
        steps = None  # the class's own, as in the main command: 50, FLUX 28
    flag_settings = _flag_settings(args, height, width, steps, flux_options)
    _check_resume(own.out, flag_settings, complete=False)  # what the flags fix, before loading any model

    from accelerate import PartialState

    device = loading.resolve_device(args.device)
    loading.check_device(device)
    # accelerate spreads processes over CPUs only when told (PartialState(cpu=True)); with GPUs each process
    # takes its own unless --device names one.
    state = PartialState(cpu=device.split(":")[0] == "cpu")
    if state.num_processes > 1 and args.device == "auto":
        device = str(state.device)
    pipe, call = _load(args, device, control_image, height, width, steps, flux_options)
    settings = _settings(flag_settings, pipe, call)
    _check_resume(own.out, settings, complete=True)
    state.wait_for_everyone()  # every process has read the old index before the main one rewrites it

    jobs = plan(prompts, seeds, settings)
    options = _options(args, device, state.num_processes)
    if state.is_main_process:
        os.makedirs(own.out, exist_ok=True)
        write_index(own.out, settings, options, prompts, seeds, jobs)
    state.wait_for_everyone()

    todo = [job for job in jobs if not os.path.isfile(os.path.join(own.out, job["file"]))]
    if state.is_main_process and len(todo) < len(jobs):
        cli.note(f"{len(jobs) - len(todo)} of {len(jobs)} panoramas exist in {own.out}: skipped.")

    def saved():  # the main process keeps the index up to date, listing every process's finished files
        if state.is_main_process:
            write_index(own.out, settings, options, prompts, seeds, jobs)

    with state.split_between_processes(todo) as mine:
        _generate(pipe, call, mine, own.out, state.process_index, saved)
    state.wait_for_everyone()

    if state.is_main_process:
        done = write_index(own.out, settings, options, prompts, seeds, jobs)["images"]
        print(f"{len(done)} panoramas in {own.out} ({len(prompts)} prompts x {len(seeds)} seeds); index {INDEX}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(["generate-set"] + sys.argv[1:]))
