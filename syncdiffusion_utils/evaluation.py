"""`syncdiffusion evaluate`: SyncDiffusion's metrics over folders of panoramas, one row per folder.

    syncdiffusion evaluate sets/multidiffusion sets/syncdiffusion --reference sets/single --json eval.json --plot eval.png

This module is the command: its arguments, reading the sets (a folder's `index.json` from `generate-set` names its
images and their prompts), scoring them, and the table, JSON, CSV and plot. The metrics themselves are functions
on images in `syncdiffusion_utils.metrics`.
"""

import csv
import json
import os
import sys

from syncdiffusion_utils.cli import _non_negative_int, _Parser, _positive_int
from syncdiffusion_utils.loading import CLIError, check_device, note, resolve_device
from syncdiffusion_utils.metrics import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_WINDOW,
    WeightsUnavailable,
    clip_score,
    crop,
    fid_kid_from_features,
    giqa_from_features,
    image_features,
    intra_crop_boxes,
    intra_lpips,
    intra_style_loss,
    load_clip,
    load_inception,
    load_lpips,
    load_vgg19,
    random_crop_boxes,
    random_networks,
)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INDEX = "index.json"  # written by `syncdiffusion generate-set`: the set's images, each with its prompt and seed
# name: (column title, what is better, needs). The directions are the paper's (Table 1 of the SyncDiffusion paper).
METRICS = {
    "intra-lpips": ("Intra-LPIPS", "lower", "panorama"),
    "intra-style": ("Intra-Style-L", "lower", "panorama"),
    "clip": ("Mean-CLIP-S", "higher", "prompt"),
    "giqa": ("Mean-GIQA", "higher", "reference"),
    "fid": ("FID", "lower", "reference"),
    "kid": ("KID", "lower", "reference"),
}
INTRA_METRICS = ("intra-lpips", "intra-style")
SET_METRICS = ("fid", "kid")  # one number per set, not per panorama
PLOT_EXTENSIONS = (".png", ".pdf", ".svg", ".jpg")


def build_parser():
    parser = _Parser(
        prog="syncdiffusion evaluate",
        description=(
            "Score folders of panoramas (one folder per method or setting) with SyncDiffusion's metrics: coherence"
            " (intra-LPIPS, intra-style loss; lower is better), prompt fidelity (CLIP score; higher is better) and,"
            " with --reference, quality against single images of the base model (FID, KID: lower; GIQA: higher)."
            " Prints a Markdown table (mean ± std over panoramas)."
        ),
        epilog=(
            "Example: syncdiffusion evaluate sets/multidiffusion sets/syncdiffusion --reference sets/single"
            " --json eval.json --plot eval.png. Prompts come from --prompt, or from the index.json that"
            " `syncdiffusion generate-set` writes. Offline smoke run: --networks random."
        ),
    )
    parser.add_argument("folders", nargs="+", metavar="PANORAMA_DIR", help="a folder of panoramas per method")
    parser.add_argument("--prompt", help="the prompt of every panorama (default: from each folder's index.json)")
    parser.add_argument(
        "--reference", metavar="DIR", help="single images of the base model at window size (FID, KID, GIQA)"
    )
    parser.add_argument("--labels", help="comma-separated row names, one per folder (default: the folder names)")
    parser.add_argument("--metrics", help=f"comma-separated, from {', '.join(METRICS)} (default: all that apply)")
    parser.add_argument(
        "--window", type=_positive_int, default=DEFAULT_WINDOW, help="crop size in pixels (default: 512)"
    )
    parser.add_argument(
        "--stride", type=_positive_int, default=DEFAULT_WINDOW, help="intra-metric crop stride (default: 512)"
    )
    parser.add_argument(
        "--crops",
        type=_positive_int,
        default=1,
        help="random crops per panorama for CLIP, FID, KID, GIQA (default: 1, the authors')",
    )
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the random crops (default: 0)")
    parser.add_argument("--giqa-k", type=_positive_int, default=8, help="K of KNN-GIQA (default: 8, the authors')")
    parser.add_argument(
        "--kid-subset-size", type=_positive_int, help="KID subset size (default: min(set sizes, 1000))"
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--csv", metavar="PATH", help="write the table as CSV")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart per metric (.png, .pdf, .svg)")
    parser.add_argument(
        "--clip-model", default=DEFAULT_CLIP_MODEL, help=f"Hub id or local folder (default: {DEFAULT_CLIP_MODEL})"
    )
    parser.add_argument(
        "--inception-weights", metavar="PATH", help="local copy of torch-fidelity's Inception weights (FID, KID, GIQA)"
    )
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default)")
    parser.add_argument(
        "--networks",
        choices=("pretrained", "random"),
        default="pretrained",
        help="random: random-weight networks, offline, for a smoke run (the scores mean nothing)",
    )
    return parser


def _list_images(folder, flag):
    if not os.path.isdir(folder):
        raise CLIError(f"{flag} {folder!r}: no such folder.")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise CLIError(f"{flag} {folder!r}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder.")
    return [os.path.join(folder, f) for f in files]


def _image_size(path, flag):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, UnidentifiedImageError) as error:
        raise CLIError(f"{flag}: cannot read {path!r} as an image: {error}.") from None


def read_index(folder):
    """The `images` of the folder's index.json (written by `generate-set`) and the number of images it plans, or
    None without an index. Each image is `{"file", "prompt", "seed", ...}`."""
    path = os.path.join(folder, INDEX)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        images, planned = index["images"], index.get("planned", len(index["images"]))
        for entry in images:
            if not (isinstance(entry["file"], str) and isinstance(entry["prompt"], str)):
                raise TypeError(f"an image entry {entry!r} has no file name or prompt")
            if os.path.basename(entry["file"]) != entry["file"]:
                raise ValueError(f"the file {entry['file']!r} is not in the folder")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CLIError(f"{path!r}: not an index written by `syncdiffusion generate-set` ({error}).") from None
    return images, planned


def _read_set(folder, label, prompt):
    """One folder's panoramas: the images its index.json lists, with their prompts (or `prompt`), or without an
    index every image in it, with `prompt` (None: no prompts); `notes` on what is left out, to print once every
    input is checked."""
    index = read_index(folder) if os.path.isdir(folder) else None
    notes = []
    if index is None:
        files = _list_images(folder, "PANORAMA_DIR")
        prompts = [prompt] * len(files)
    else:
        images, planned = index
        if not images:
            raise CLIError(f"PANORAMA_DIR {folder!r}: its {INDEX} lists no images (run generate-set to make them).")
        files = [os.path.join(folder, entry["file"]) for entry in images]
        for path in files:
            if not os.path.isfile(path):
                raise CLIError(
                    f"PANORAMA_DIR {folder!r}: its {INDEX} lists {os.path.basename(path)!r}, which is not there;"
                    " rerun generate-set with the same settings to make it."
                )
        prompts = [prompt if prompt is not None else entry["prompt"] for entry in images]
        unlisted = sorted(set(_list_images(folder, "PANORAMA_DIR")) - set(files))
        if unlisted:
            notes.append(f"{folder}: {len(unlisted)} image(s) not in its {INDEX}, not scored (e.g. {unlisted[0]!r}).")
        if len(images) < planned:
            notes.append(
                f"{folder}: {len(images)} of the {planned} panoramas its {INDEX} plans (generate-set did not finish)."
            )
    sizes = [_image_size(path, "PANORAMA_DIR") for path in files]
    return {"label": label, "folder": folder, "files": files, "sizes": sizes, "prompts": prompts, "notes": notes}


def _check_output(path, flag, extensions=None):
    if path is None:
        return
    if extensions and os.path.splitext(path)[1].lower() not in extensions:
        raise CLIError(f"{flag} {path!r}: use one of the extensions {', '.join(extensions)}.", code=2)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"{flag} {path!r}: the directory {folder} does not exist.")


def _choose_metrics(args, sets):
    """The metrics to compute and a note on those left out: the ones asked for (each must be computable), or all
    that apply."""
    without_prompts = [s["folder"] for s in sets if any(p is None for p in s["prompts"])]
    needs = {"panorama": True, "prompt": not without_prompts, "reference": args.reference is not None}
    why_not = {
        "reference": "no --reference",
        "prompt": f"no --prompt, and no {INDEX} in {', '.join(without_prompts)}",
    }
    if args.metrics is None:
        chosen = [name for name, (_, _, need) in METRICS.items() if needs[need]]
        reasons = [why_not[need] for need in ("reference", "prompt") if not needs[need]]
        skipped = [name for name in METRICS if name not in chosen]
        return chosen, (f"not computing {', '.join(skipped)} ({'; '.join(reasons)})." if skipped else None)
    chosen = [name.strip() for name in args.metrics.split(",")]
    for name in chosen:
        if name not in METRICS:
            raise CLIError(
                f"--metrics {args.metrics!r}: unknown metric {name!r}; choose from {', '.join(METRICS)}.", 2
            )
        need = METRICS[name][2]
        if need == "reference" and not needs["reference"]:
            raise CLIError(f"--metrics {name}: needs --reference DIR (single images of the base model).", code=2)
        if need == "prompt" and not needs["prompt"]:
            raise CLIError(f"--metrics {name}: needs prompts: {why_not['prompt']}.", 2)
    if len(set(chosen)) < len(chosen):
        raise CLIError(f"--metrics {args.metrics!r}: a metric is named twice.", 2)
    return chosen, None


def _labels(args):
    if args.labels is None:
        return [os.path.basename(os.path.normpath(folder)) for folder in args.folders]
    labels = [label.strip() for label in args.labels.split(",")]
    if len(labels) != len(args.folders):
        raise CLIError(f"--labels: {len(labels)} labels for {len(args.folders)} folders; give one per folder.", 2)
    if not all(labels):
        raise CLIError(f"--labels {args.labels!r}: a label is empty; give one name per folder.", 2)
    return labels


def _check_intra_crops(sets, metrics, window, stride):
    """Every panorama gives the intra metrics at least two crops to compare."""
    for s in sets:
        for path, (height, width) in zip(s["files"], s["sizes"]):
            for metric in set(metrics) & set(INTRA_METRICS):
                try:
                    intra_crop_boxes(height, width, window, stride, metric)
                except ValueError:
                    raise CLIError(
                        f"{path!r} ({width}x{height}) has one {window}-pixel crop for {metric} at --stride {stride}:"
                        " the intra metrics compare pairs of crops; use a smaller --stride or --window.",
                        2,
                    ) from None


def _check_reference(args, sets, metrics):
    """The reference images that FID, KID and GIQA need, checked against their parameters; None without them."""
    if not {"fid", "kid", "giqa"} & set(metrics):
        return None
    reference = _list_images(args.reference, "--reference")
    count = len(reference)
    if count < 2:
        raise CLIError(f"--reference {args.reference!r}: FID and KID need at least 2 images, found {count}.")
    if "giqa" in metrics and args.giqa_k > count:
        raise CLIError(f"--giqa-k {args.giqa_k}: larger than the {count} reference images.", 2)
    smallest = min([count] + [len(s["files"]) * args.crops for s in sets])
    if "kid" in metrics and args.kid_subset_size is not None and args.kid_subset_size > smallest:
        raise CLIError(
            f"--kid-subset-size {args.kid_subset_size}: larger than the smallest set ({smallest} images or"
            f" crops); use at most {smallest}, more --crops, or more images.",
            2,
        )
    for s in sets:
        if len(s["files"]) * args.crops < 2:
            raise CLIError(f"{s['folder']!r}: FID and KID need at least 2 crops; use --crops 2 or more panoramas.", 2)
    return reference


def _plan(args):
    """Check every input before any network loads; returns `(sets, reference_files, metrics)`."""
    labels = _labels(args)
    if args.prompt is not None and not args.prompt.strip():
        raise CLIError(f"--prompt {args.prompt!r}: an empty prompt; give the panoramas' prompt, or leave it out.", 2)
    for path, flag, extensions in (
        (args.json, "--json", None),
        (args.csv, "--csv", None),
        (args.plot, "--plot", PLOT_EXTENSIONS),
    ):
        _check_output(path, flag, extensions)

    sets = [_read_set(folder, label, args.prompt) for folder, label in zip(args.folders, labels)]
    for s in sets:
        for path, (height, width) in zip(s["files"], s["sizes"]):
            if height < args.window or width < args.window:
                raise CLIError(f"{path!r} is {width}x{height} pixels, smaller than --window {args.window}.", 2)
    metrics, skipped_note = _choose_metrics(args, sets)
    _check_intra_crops(sets, metrics, args.window, args.stride)
    reference = _check_reference(args, sets, metrics)
    for message in [m for s in sets for m in s["notes"]] + [skipped_note]:  # once every input is known to be good
        if message is not None:
            note(message)
    return sets, reference, metrics


def _load_networks(args, metrics, device):
    """The networks `metrics` need, on `device`."""
    if args.networks == "random":
        return random_networks()
    networks = {}
    try:
        if "intra-lpips" in metrics:
            networks["lpips"] = load_lpips()
        if "intra-style" in metrics:
            networks["vgg"] = load_vgg19()
        if "clip" in metrics:
            networks["clip"] = load_clip(args.clip_model)
        if {"fid", "kid", "giqa"} & set(metrics):
            networks["features"] = load_inception(args.inception_weights)
    except WeightsUnavailable as error:
        raise CLIError(str(error)) from None
    return networks


def _to_device(networks, device):
    moved = {}
    for name, network in networks.items():
        if name == "clip":
            moved[name] = (network[0].to(device), network[1])
        else:
            moved[name] = network.to(device)
    return moved


def _mean_std(values):
    import numpy as np

    return {"mean": float(np.mean(values)), "std": float(np.std(values))}  # population std, as the authors' scripts


def evaluate_set(
    files,
    prompts,
    metrics,
    networks,
    window,
    stride,
    crops,
    seed,
    reference_features=None,
    giqa_k=8,
    kid_subset_size=None,
    label=None,
):
    """Score one folder's panoramas: `{"metrics": {name: {"mean", "std"}}, "panoramas": [per-panorama scores]}`.

    Per-panorama metrics are averaged over the panoramas (population std); FID and KID are one number for the set
    (KID's std is over its random subsets). The random crops are drawn from `seed`, the same for every set.
    """
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    generator = np.random.default_rng(seed)
    per_panorama, crop_features = [], []
    for path, prompt in tqdm(list(zip(files, prompts)), desc=label, unit="panorama", file=sys.stderr):
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        scores = {"file": os.path.basename(path)}
        if "intra-lpips" in metrics:
            scores["intra-lpips"] = intra_lpips(image, window, stride, loss=networks["lpips"])
        if "intra-style" in metrics:
            scores["intra-style"] = intra_style_loss(image, window, stride, vgg=networks["vgg"])
        boxes = random_crop_boxes(image.height, image.width, window, crops, generator)
        pieces = list(crop(image, boxes))
        if "clip" in metrics:
            scores["clip"] = clip_score(pieces, prompt, model=networks["clip"])
        if reference_features is not None:
            features = image_features(pieces, networks["features"])
            crop_features.append(features)
            if "giqa" in metrics:
                scores["giqa"] = giqa_from_features(features, reference_features, giqa_k).mean().item()
        per_panorama.append(scores)

    summary = {name: _mean_std([s[name] for s in per_panorama]) for name in metrics if name not in SET_METRICS}
    if {"fid", "kid"} & set(metrics):
        import torch

        values = fid_kid_from_features(torch.cat(crop_features), reference_features, kid_subset_size)
        if "fid" in metrics:
            summary["fid"] = {"mean": values["fid"], "std": None}
        if "kid" in metrics:
            summary["kid"] = {"mean": values["kid"], "std": values["kid_std"]}
    return {"metrics": {name: summary[name] for name in metrics}, "panoramas": per_panorama}


def _column(name):
    title, better, _ = METRICS[name]
    return f"{title} {'↓' if better == 'lower' else '↑'}"


def _cell(value):
    if value is None:
        return "—"
    text = f"{value['mean']:.4g}"
    return text if value["std"] is None else f"{text} ± {value['std']:.2g}"


def markdown_table(results):
    """The results as a Markdown table: one row per set, one column per metric (mean ± std)."""
    metrics = list(results[0]["metrics"])
    header = ["set", "panoramas"] + [_column(name) for name in metrics]
    rows = [[r["label"], str(len(r["panoramas"]))] + [_cell(r["metrics"][name]) for name in metrics] for r in results]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(results, path):
    metrics = list(results[0]["metrics"])
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["set", "folder", "panoramas"] + [f"{n}_{k}" for n in metrics for k in ("mean", "std")])
        for r in results:
            values = [r["metrics"][n][k] for n in metrics for k in ("mean", "std")]
            writer.writerow([r["label"], r["folder"], len(r["panoramas"])] + ["" if v is None else v for v in values])


def plot(results, path):
    """One bar chart per metric, the sets side by side, error bars at ± std, the better direction in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(results[0]["metrics"])
    labels = [r["label"] for r in results]
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(results))]
    figure, axes = plt.subplots(
        1, len(metrics), figsize=(max(3.0, 0.9 * len(results) + 1.2) * len(metrics), 3.6), squeeze=False
    )
    for axis, name in zip(axes[0], metrics):
        title, better, _ = METRICS[name]
        means = [r["metrics"][name]["mean"] for r in results]
        stds = [r["metrics"][name]["std"] for r in results]
        yerr = None if all(std is None for std in stds) else [std or 0.0 for std in stds]  # FID has no spread
        axis.bar(range(len(results)), means, yerr=yerr, color=colors, capsize=4)
        axis.set_xticks(
            range(len(results)),
            labels,
            rotation=30 if len(results) > 2 else 0,
            ha="right" if len(results) > 2 else "center",
        )
        axis.set_title(f"{title}\n({better} is better)", fontsize=10)
        axis.grid(axis="y", alpha=0.3)
        axis.set_axisbelow(True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    """`syncdiffusion evaluate ...`: returns the exit status; errors are `CLIError`s (one line)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    sets, reference, metrics = _plan(args)
    device = resolve_device(args.device)
    check_device(device)
    networks = _to_device(_load_networks(args, metrics, device), device)

    reference_features = None
    if reference is not None:
        from PIL import Image

        def read(path):
            with Image.open(path) as image:
                return image.convert("RGB")

        reference_features = image_features([read(p) for p in reference], networks["features"])
    results = []
    for s in sets:
        scored = evaluate_set(
            s["files"],
            s["prompts"],
            metrics,
            networks,
            args.window,
            args.stride,
            args.crops,
            args.seed,
            reference_features,
            args.giqa_k,
            args.kid_subset_size,
            label=s["label"],
        )
        results.append({"label": s["label"], "folder": s["folder"], **scored})

    print(markdown_table(results), flush=True)
    settings = {
        "window": args.window,
        "stride": args.stride,
        "crops": args.crops,
        "seed": args.seed,
        "reference": args.reference,
        "giqa_k": args.giqa_k,
        "networks": args.networks,
        "clip_model": args.clip_model if "clip" in metrics else None,
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"settings": settings, "sets": results}, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.csv:
        write_csv(results, args.csv)
        print(f"wrote {args.csv}", file=sys.stderr)
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from syncdiffusion_utils.cli import main as _cli_main

    sys.exit(_cli_main(["evaluate"] + sys.argv[1:]))
