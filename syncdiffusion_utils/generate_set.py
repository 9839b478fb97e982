"""`syncdiffusion generate-set`: the panoramas of an evaluation, every prompt of a file times every seed.

    syncdiffusion generate-set prompts.txt --out sets/multidiffusion --seeds 0-19 --sync-weight 0
    syncdiffusion generate-set prompts.txt --out sets/syncdiffusion --seeds 0-19
    syncdiffusion generate-set prompts.txt --out sets/fast --seeds 0-19 --sync-mode fast
    syncdiffusion evaluate sets/multidiffusion sets/syncdiffusion sets/fast --plot eval.png

Every option of the main command applies (model, size, steps, scheduler, synchronization, hardware), except PROMPT,
--output, --seed and --compare. Files that already exist are skipped, so an interrupted run resumes where it
stopped. The folder's `index.json` records each image's prompt and seed (which `evaluate` reads) and the settings
(a resumed run must use the same ones).

Under `accelerate launch` each process generates its share of the prompt x seed pairs on its own device, and the
main process writes the index once all are done:

    accelerate launch --multi_gpu --num_processes 4 -m syncdiffusion_utils.generate_set prompts.txt --out sets/sync
"""

import json
import os
import re
import sys

from syncdiffusion_utils import cli
from syncdiffusion_utils.cli import CLIError, _Parser


INDEX = "index.json"
# Main-command options that name one image; a set has many.
NOT_FOR_SETS = {"output": "--output", "seed": "--seed", "compare": "--compare"}
# Settings recorded in the index: what makes two runs' images comparable.
SETTINGS = (
    "model",
    "height",
    "width",
    "steps",
    "guidance",
    "stride",
    "negative_prompt",
    "scheduler",
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
    "circular",
    "fp16",
)


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
            " --sync-weight, --sync-mode, --device, ...), except PROMPT, --output, --seed and --compare."
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
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise CLIError(f"--seeds {text!r}: the range {part.strip()!r} runs backwards.", code=2)
        seeds += [seed for seed in range(first, last + 1) if seed not in seeds]
    return seeds


def read_prompts(path):
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    except OSError as error:
        raise CLIError(f"PROMPTS {path!r}: cannot be read: {error.strerror or error}.") from None
    if not prompts:
        raise CLIError(f"PROMPTS {path!r}: no prompts (one per line; lines starting with # are skipped).")
    return prompts


def file_name(prompt_index, prompt, seed):
    """`007-a-photo-of-a-city-seed3.png`: sorted by prompt, then seed; readable; safe on every file system."""
    slug = "-".join(re.findall(r"[a-z0-9]+", prompt.lower()))[:40].strip("-") or "prompt"
    return f"{prompt_index:03d}-{slug}-seed{seed}.png"


def plan(prompts, seeds):
    """Every (prompt, seed) pair with its file name, prompt-major."""
    return [
        {"file": file_name(i, prompt, seed), "prompt": prompt, "prompt_index": i, "seed": seed}
        for i, prompt in enumerate(prompts)
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
    tiny = args.model == cli.TINY
    height, width, steps = cli.DEFAULT_SIZE[cli.TINY if tiny else "real"]
    args.height, args.width, args.steps = args.height or height, args.width or width, args.steps or steps
    if args.sync_decoder == cli.TINY and not tiny:
        raise CLIError(
            "--sync-decoder tiny is a random decoder for `--model tiny` only; use e.g. madebyollin/taesd.", 2
        )
    return args


def _check_resume(out, settings):
    """A folder with an index may only be extended with the same settings."""
    path = os.path.join(out, INDEX)
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)["settings"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CLIError(f"--out {out!r}: its {INDEX} cannot be read ({error}); move it away to start over.") from None
    changed = [key for key in settings if previous.get(key) != settings[key]]
    if changed:
        what = ", ".join(f"{key} {previous.get(key)!r} -> {settings[key]!r}" for key in changed)
        raise CLIError(f"--out {out!r} holds a set made with other settings ({what}); use another --out.")


def _pipeline_call(args):
    return {
        "height": args.height,
        "width": args.width,
        "num_inference_steps": args.steps,
        "guidance_scale": 7.5 if args.guidance is None else args.guidance,
        "negative_prompt": args.negative_prompt,
        "stride": args.stride or 8,
        "view_batch_size": args.view_batch_size,
        "circular_padding": args.circular,
        "sync_weight": args.sync_weight,
        "sync_decay_rate": args.sync_decay_rate,
        "sync_freq": args.sync_freq,
        "sync_thres": args.sync_thres,
        "sync_mode": args.sync_mode,
        "sync_gradient": args.sync_gradient,
        "sync_reuse_noise": args.sync_reuse_noise,
        "sync_lpips_size": args.sync_lpips_size,
        "sync_decode_downsample": args.sync_decode_downsample,
        "sync_gradient_checkpointing": args.sync_gradient_checkpointing,
    }


def _generate(jobs, args, device, out, rank):
    """Generate `jobs` on `device`, each saved under `out` through a temporary file (a killed run leaves no
    half-written PNG that a resumed run would take as done)."""
    pipe = cli.load_pipeline(
        args.model,
        device,
        args.fp16,
        scheduler=args.scheduler,
        attention_slicing=args.attention_slicing,
        cpu_offload=args.cpu_offload,
        progress=False,
    )
    call = _pipeline_call(args)
    if args.sync_decoder:
        call["sync_decoder"] = cli.load_sync_decoder(args.sync_decoder, pipe)
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


def main(argv=None) -> int:
    """`syncdiffusion generate-set ...`: returns the exit status; errors are `CLIError`s (one line)."""
    own, rest = _add_arguments(build_parser()).parse_known_args(sys.argv[1:] if argv is None else argv)
    args = _generation_args(rest)
    prompts, seeds = read_prompts(own.prompts), parse_seeds(own.seeds)
    settings = {key: getattr(args, key) for key in SETTINGS}
    if os.path.exists(own.out) and not os.path.isdir(own.out):
        raise CLIError(f"--out {own.out!r} is a file, not a folder.")
    _check_resume(own.out, settings)
    jobs = plan(prompts, seeds)

    from accelerate import PartialState

    device = cli.resolve_device(args.device)
    cli.check_device(device)
    # accelerate spreads processes over CPUs only when told (PartialState(cpu=True)); with GPUs each process
    # takes its own unless --device names one.
    state = PartialState(cpu=device.split(":")[0] == "cpu")
    if state.num_processes > 1 and args.device == "auto":
        device = str(state.device)
    if state.is_main_process:
        os.makedirs(own.out, exist_ok=True)
    state.wait_for_everyone()

    todo = [job for job in jobs if not os.path.isfile(os.path.join(own.out, job["file"]))]
    if state.is_main_process and len(todo) < len(jobs):
        cli.note(f"{len(jobs) - len(todo)} of {len(jobs)} panoramas exist in {own.out}: skipped.")
    with state.split_between_processes(todo) as mine:
        if mine:
            _generate(mine, args, device, own.out, state.process_index)
    state.wait_for_everyone()

    if state.is_main_process:
        done = [job for job in jobs if os.path.isfile(os.path.join(own.out, job["file"]))]
        with open(os.path.join(own.out, INDEX), "w", encoding="utf-8") as f:
            json.dump({"settings": settings, "images": done}, f, indent=2)
        print(f"{len(done)} panoramas in {own.out} ({len(prompts)} prompts x {len(seeds)} seeds); index {INDEX}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(["generate-set"] + sys.argv[1:]))
