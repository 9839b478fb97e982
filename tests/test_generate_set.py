"""`syncdiffusion generate-set`: prompts x seeds into a folder with an index, the images the main command makes for
the same flags, resumable (and refused with other settings, also after a killed run), spread over two CPU
processes by `accelerate launch`; `evaluate` reads its index."""

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline_syncdiffusion_xl import SyncDiffusionXLPipeline
from syncdiffusion_utils import cli, evaluation, generate_set, loading
from syncdiffusion_utils.cli import main
from syncdiffusion_utils.generate_set import read_prompts
from syncdiffusion_utils.testing import tiny_xl_pipeline


pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
# A 64x128 panorama in 2 steps, MultiDiffusion (sync weight 0: no LPIPS passes).
GENERATION = ["--model", "tiny", "--height", "64", "--width", "128", "--steps", "2", "--sync-weight", "0"]
PROMPTS = ("a photo of a lake", "a city at night, neon!")


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(f"{PROMPTS[0]}\n\n# not a prompt\n{PROMPTS[1]}\n", encoding="utf-8")
    return path


def counting(pipe, record):
    """`pipe` with its call recorded (`record(pipe, kwargs)`); its class's signature stays the pipeline's, which
    `prepare_call` reads the defaults from."""
    base = type(pipe)

    @functools.wraps(base.__call__)
    def call(self, *args, **kwargs):
        record(self, kwargs)
        return base.__call__(self, *args, **kwargs)

    pipe.__class__ = type(f"Counting{base.__name__}", (base,), {"__call__": call})
    return pipe


@pytest.fixture
def tiny(pipe, monkeypatch):
    """`--model tiny` loads the session's tiny pipeline (same weights as `load_pipeline("tiny")`); the prompts of its
    calls and the arguments of the load are recorded."""
    calls, loads = [], []
    counting(pipe, lambda self, kwargs: calls.append(kwargs.get("prompt")))  # None: a test's own call

    def load(*args, **kwargs):
        loads.append(kwargs)
        return pipe

    monkeypatch.setattr(loading, "load_pipeline", load)
    return pipe, calls, loads


def no_model(monkeypatch):
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def index_of(out):
    return json.loads((out / "index.json").read_text(encoding="utf-8"))


def generate_set_argv(prompts_file, out, *extra, seeds="0-1"):
    return ["generate-set", str(prompts_file), "--out", str(out), "--seeds", seeds] + GENERATION + list(extra)


def test_seeds_parse_and_file_names_end_in_a_hash_of_what_makes_the_image():
    assert generate_set.parse_seeds("0-3") == [0, 1, 2, 3]
    assert generate_set.parse_seeds("5, 0-1,1") == [5, 0, 1]
    for bad in ("3-1", "a", "1-", ""):
        with pytest.raises(cli.CLIError, match="--seeds"):
            generate_set.parse_seeds(bad)

    settings = {"model": "tiny", "steps": 2}
    name = generate_set.file_name("A photo: of a City!", 3, settings)
    assert name.startswith("a-photo-of-a-city-seed3-") and len(name) == len("a-photo-of-a-city-seed3-.png") + 12
    assert name == generate_set.file_name("A photo: of a City!", 3, dict(settings))
    long = "a photo of a mountain range at twilight with a lake"  # the slug keeps its first 40 characters
    others = [
        ("A photo: of a City!", 4, settings),
        ("A photo: of a City!", 3, {**settings, "steps": 3}),
        (long, 3, settings),
        (long + " and a boat", 3, settings),
        ("東京の夜景", 3, settings),  # no ASCII letter: the slug is "prompt" for both
        ("大阪の夜景", 3, settings),
    ]
    names = [generate_set.file_name(*other) for other in others]
    assert len(set(names + [name])) == len(others) + 1


def test_prompts_file_skips_comments_after_a_byte_order_mark_and_refuses_repeats(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# prompts for the evaluation\r\na lake\r\n\r\n# a city\r\na city\r\n", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")  # what Notepad writes
    assert generate_set.read_prompts(path) == ["a lake", "a city"]

    path.write_text("a lake\na city\n a lake \n", encoding="utf-8")
    with pytest.raises(cli.CLIError, match="line 3 repeats line 1 .'a lake'."):
        generate_set.read_prompts(path)
    path.write_bytes("une île\n".encode("latin-1"))
    with pytest.raises(cli.CLIError, match="not UTF-8"):
        generate_set.read_prompts(path)


def test_generate_set_writes_every_pair_and_its_index_and_resumes(tmp_path, prompts_file, tiny, capsys):
    pipe, calls, _ = tiny
    out = tmp_path / "set"
    assert main(generate_set_argv(prompts_file, out)) == 0
    index = index_of(out)
    assert [(i["prompt"], i["seed"]) for i in index["images"]] == [(p, s) for p in PROMPTS for s in (0, 1)]
    files = [i["file"] for i in index["images"]]
    assert sorted(os.listdir(out)) == sorted(files + ["index.json"])
    assert index["planned"] == 4 and index["prompts"] == list(PROMPTS) and index["seeds"] == [0, 1]
    assert index["settings"]["sync_weight"] == 0 and index["settings"]["steps"] == 2
    assert list(index["settings"]) == list(generate_set.SETTINGS)

    # The file is the pipeline's image for that prompt and seed, as the main command makes it.
    call = {"height": 64, "width": 128, "num_inference_steps": 2, "sync_weight": 0.0, "view_batch_size": "auto"}
    image = pipe("a city at night, neon!", generator=cli.generator(1), **call).images[0]
    assert np.abs(pixels(out / files[3]) - np.asarray(image, dtype=np.int16)).max() == 0

    # Resume: only the missing file is generated.
    calls.clear()
    (out / files[1]).unlink()
    assert main(generate_set_argv(prompts_file, out)) == 0
    assert calls == ["a photo of a lake"] and len(os.listdir(out)) == 5
    assert "3 of 4 panoramas exist" in capsys.readouterr().err


def test_a_killed_run_leaves_its_settings_and_a_resume_with_others_is_refused(
    tmp_path, prompts_file, tiny, monkeypatch, capsys
):
    pipe, calls, _ = tiny
    original = type(pipe).__call__

    def killed_at_the_second(self, *args, **kwargs):
        if len(calls) == 1:
            raise KeyboardInterrupt  # what Ctrl-C (or a scheduler's SIGINT) raises mid-generation
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", functools.wraps(original)(killed_at_the_second))
    out = tmp_path / "set"
    assert main(generate_set_argv(prompts_file, out)) == 130
    index = index_of(out)
    assert index["settings"]["steps"] == 2 and index["planned"] == 4
    assert [(i["prompt"], i["seed"]) for i in index["images"]] == [(PROMPTS[0], 0)]  # the one made before the kill

    monkeypatch.setattr(type(pipe), "__call__", original)
    capsys.readouterr()
    no_model(monkeypatch)  # refused from the flags alone, before any model loads
    assert main(generate_set_argv(prompts_file, out, "--steps", "3")) != 0
    assert_one_line_error(capsys.readouterr().err, "other settings", "steps 2 -> 3")
    assert index_of(out) == index


def test_an_edited_prompt_is_a_new_image_not_the_old_one_renamed(tmp_path, tiny):
    """The edit is past the file name's first 40 characters, and non-ASCII prompts share their slug: the hash keeps
    them apart, and the index lists the images of the prompts as they are now."""
    pipe, calls, _ = tiny
    prompts, out = tmp_path / "prompts.txt", tmp_path / "set"
    first = "a photo of a mountain range at twilight, with a lake"
    prompts.write_text(f"{first}\n東京の夜景\n", encoding="utf-8")
    assert main(generate_set_argv(prompts, out, seeds="0")) == 0
    before = {i["prompt"]: i["file"] for i in index_of(out)["images"]}

    calls.clear()
    edited = first.replace("a lake", "a boat")
    prompts.write_text(f"{edited}\n大阪の夜景\n", encoding="utf-8")
    assert main(generate_set_argv(prompts, out, seeds="0")) == 0
    assert calls == [edited, "大阪の夜景"]  # nothing reused
    after = index_of(out)["images"]
    assert [i["prompt"] for i in after] == [edited, "大阪の夜景"]
    assert not {i["file"] for i in after} & set(before.values())
    call = {"height": 64, "width": 128, "num_inference_steps": 2, "sync_weight": 0.0, "view_batch_size": "auto"}
    image = pipe(edited, generator=cli.generator(0), **call).images[0]
    assert np.abs(pixels(out / after[0]["file"]) - np.asarray(image, dtype=np.int16)).max() == 0


def test_a_tiny_xl_set_is_what_the_main_command_makes(tmp_path, prompts_file, capsys):
    """`--model tiny-xl` with the size and steps left out: the main command's tiny defaults (64x256, 10 steps),
    not the real models' 50 steps; the set's image is the command's, pixel for pixel."""
    flags = ["--model", "tiny-xl", "--sync-weight", "0", "--width", "128"]
    single = tmp_path / "single.png"
    assert main([PROMPTS[1], "--seed", "1", "-o", str(single)] + flags) == 0
    out = tmp_path / "set"
    assert main(["generate-set", str(prompts_file), "--out", str(out), "--seeds", "1"] + flags) == 0
    index = index_of(out)
    assert (index["settings"]["steps"], index["settings"]["height"], index["settings"]["width"]) == (10, 64, 128)
    assert np.abs(pixels(out / index["images"][1]["file"]) - pixels(single)).max() == 0


class _Output:
    def __init__(self, images):
        self.images = images


def test_an_sdxl_set_takes_the_sdxl_class_defaults(tmp_path, prompts_file, monkeypatch):
    """A (fake-loaded) SDXL model with the size, guidance and stride left out: 1024x4096, guidance 5 and the
    pipeline's own stride (16 for SDXL's 128-latent window), as the main command, not SD's 512x2048, 7.5, 8."""
    received = []
    pipe = tiny_xl_pipeline(lpips_module=False)

    @functools.wraps(SyncDiffusionXLPipeline.__call__)
    def record(self, **kwargs):  # the arguments, and a small image instead of a 1024x4096 run
        received.append(kwargs)
        return _Output([Image.new("RGB", (16, 4))])

    pipe.__class__ = type("RecordingXL", (SyncDiffusionXLPipeline,), {"__call__": record})
    monkeypatch.setattr(loading, "load_pipeline", lambda *args, **kwargs: pipe)
    monkeypatch.setattr(loading, "pipeline_class_of", lambda model: SyncDiffusionXLPipeline)  # its model_index.json
    out = tmp_path / "set"
    argv = ["generate-set", str(prompts_file), "--out", str(out), "--model", "some/sdxl-model", "--sync-weight", "0"]
    assert main(argv) == 0
    call = received[0]
    assert (call["height"], call["width"], call["guidance_scale"], call["stride"]) == (1024, 4096, 5.0, None)
    assert call["num_inference_steps"] == 50 and call["view_batch_size"] == "auto"
    settings = index_of(out)["settings"]
    assert (settings["height"], settings["width"], settings["guidance"], settings["steps"]) == (1024, 4096, 5.0, 50)


def test_hardware_flags_are_honoured_and_recorded(tmp_path, prompts_file, tiny):
    """--compile reaches the loader, --vae-tiling the VAE (and the settings: tiles change the image), and the index
    records the rest of how the images were made."""
    pipe, _, loads = tiny
    tiling = []
    counting(pipe, lambda self, kwargs: tiling.append(self.vae.use_tiling))
    out = tmp_path / "set"
    argv = generate_set_argv(prompts_file, out, "--vae-tiling", "on", "--compile", "--view-batch-size", "2")
    assert main(argv[:4] + ["--seeds", "0"] + argv[6:]) == 0
    assert loads[0]["compile"] is True and tiling == [True, True]
    index = index_of(out)
    assert index["settings"]["vae_tiling"] == "on"
    assert index["options"]["compile"] is True and index["options"]["view_batch_size"] == 2
    assert index["options"]["device"] == "cpu" and index["options"]["processes"] == 1


def test_a_controlnet_set_is_what_the_main_command_makes(tmp_path, prompts_file, capsys):
    condition = tmp_path / "depth.png"
    gradient = np.linspace(0, 255, 128, dtype=np.uint8)[None, :, None].repeat(64, 0).repeat(3, 2)
    Image.fromarray(gradient).save(condition)
    flags = ["--model", "tiny", "--steps", "2", "--sync-weight", "0", "--control-image", str(condition)]
    flags += ["--controlnet", "tiny", "--controlnet-scale", "0.5"]
    single = tmp_path / "single.png"
    assert main([PROMPTS[0], "--seed", "0", "-o", str(single)] + flags) == 0
    out = tmp_path / "set"
    assert main(["generate-set", str(prompts_file), "--out", str(out)] + flags) == 0
    index = index_of(out)
    settings = index["settings"]
    assert (settings["controlnet"], settings["controlnet_scale"]) == ("tiny", 0.5)
    assert settings["control_image_sha256"] == hashlib.sha256(condition.read_bytes()).hexdigest()
    assert (settings["height"], settings["width"]) == (64, 128)  # the condition's size
    assert np.abs(pixels(out / index["images"][0]["file"]) - pixels(single)).max() == 0

    # Another condition is another set.
    Image.fromarray(255 - gradient).save(condition)
    capsys.readouterr()
    assert main(["generate-set", str(prompts_file), "--out", str(out)] + flags) != 0
    assert_one_line_error(capsys.readouterr().err, "other settings", "control_image_sha256")


def test_evaluate_takes_the_prompts_from_the_index(tmp_path, prompts_file, tiny, lpips_module, monkeypatch, capsys):
    out = tmp_path / "set"
    assert main(generate_set_argv(prompts_file, out, seeds="0")) == 0
    networks = evaluation.random_networks(lpips_module=lpips_module)
    monkeypatch.setattr(evaluation, "random_networks", lambda *args, **kwargs: networks)
    capsys.readouterr()
    argv = ["evaluate", str(out), "--window", "64", "--stride", "32", "--networks", "random"]
    assert main(argv + ["--json", str(tmp_path / "r.json")]) == 0
    assert (
        capsys.readouterr().out.splitlines()[0]
        == "| set | panoramas | Intra-LPIPS ↓ | Intra-Style-L ↓ | Mean-CLIP-S ↑ |"
    )
    result = json.loads((tmp_path / "r.json").read_text())["sets"][0]
    assert [p["file"] for p in result["panoramas"]] == [i["file"] for i in index_of(out)["images"]]
    assert all(p["intra-lpips"] > 0 for p in result["panoramas"])


def assert_one_line_error(err, *needles):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("syncdiffusion: error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--output", "x.png"], ["--output", "not for a set"]),
        (["--seed", "3"], ["--seed", "not for a set"]),
        (["--compare"], ["--compare"]),
        (["--seeds", "9-2"], ["--seeds", "backwards"]),
        (["--sync-mode", "fastest"], ["--sync-mode"]),
        (["--stride", "0"], ["--stride", "0"]),
        (["--steps", "0"], ["--steps", "0"]),
        (["--lpips-weights", "/nowhere/vgg16.pth"], ["--lpips-weights", "not a file"]),
        (["--control-image", "depth.png"], ["--controlnet", "missing"]),
        (["--vae-tiling", "sometimes"], ["--vae-tiling"]),
    ],
)
def test_bad_input_is_one_line(tmp_path, prompts_file, monkeypatch, capsys, extra, needles):
    no_model(monkeypatch)
    assert main(["generate-set", str(prompts_file), "--out", str(tmp_path / "set")] + GENERATION + extra) != 0
    assert_one_line_error(capsys.readouterr().err, *needles)
    assert not (tmp_path / "set").exists()


def test_missing_or_empty_prompts_and_changed_settings_are_one_line(tmp_path, prompts_file, monkeypatch, capsys):
    no_model(monkeypatch)
    assert main(["generate-set", str(tmp_path / "none.txt"), "--out", str(tmp_path / "set")] + GENERATION) != 0
    assert_one_line_error(capsys.readouterr().err, "none.txt", "cannot be read")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    assert main(["generate-set", str(empty), "--out", str(tmp_path / "set")] + GENERATION) != 0
    assert_one_line_error(capsys.readouterr().err, "no prompts")

    out = tmp_path / "set"
    out.mkdir()
    settings = dict.fromkeys(generate_set.SETTINGS)
    (out / "index.json").write_text(json.dumps({"settings": settings, "images": []}))
    assert main(["generate-set", str(prompts_file), "--out", str(out)] + GENERATION) != 0
    assert_one_line_error(capsys.readouterr().err, "other settings", "model None -> 'tiny'")


def test_accelerate_launch_splits_the_set_over_two_cpu_processes(tmp_path, prompts_file, pipe):
    out = tmp_path / "set"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29533",
        "-m",
        "syncdiffusion_utils.generate_set",
        str(prompts_file),
        "--out",
        str(out),
        "--seeds",
        "0-1",
        "--device",
        "cpu",
    ] + GENERATION
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    # Each process generated two of the four, and the index lists all four once, in plan order.
    for rank in (0, 1):
        assert done.stdout.count(f"[process {rank}] wrote") == 2, done.stdout
    index = index_of(out)
    assert [(i["prompt"], i["seed"]) for i in index["images"]] == [(p, s) for p in PROMPTS for s in (0, 1)]
    assert index["options"]["processes"] == 2
    # Each file is the one a single process makes for its prompt and seed.
    image = pipe(
        "a photo of a lake", generator=cli.generator(1), height=64, width=128, num_inference_steps=2, sync_weight=0.0
    ).images[0]
    assert np.abs(pixels(out / index["images"][1]["file"]) - np.asarray(image, dtype=np.int16)).max() <= 1  # threads


def test_a_sync_weight_sweep_is_refused_for_a_set(tmp_path, prompts_file, capsys):
    """`--sync-weight 0,20` makes one contact sheet in the main command; a set holds one weight: a one-line error."""
    argv = [
        "generate-set",
        str(prompts_file),
        "--out",
        str(tmp_path / "set"),
        "--model",
        "tiny",
        "--sync-weight",
        "0,20",
    ]
    assert main(argv) == 2
    assert "--sync-weight: one value for a set" in capsys.readouterr().err
    assert not (tmp_path / "set").exists()


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--region", "a red house", "box:0,0,0.5,1"], "--region"),
        (["--region-bootstrap-steps", "2"], "--region-bootstrap-steps"),
        (["--image", "photo.png"], "--image"),
        (["--image", "photo.png", "--outpaint", "center"], "--image"),
        (["--strength", "0.5"], "--strength"),
        (["--sync-anchor", "center"], "--sync-anchor"),
    ],
)
def test_region_and_image_flags_are_refused_for_a_set_not_ignored(tmp_path, prompts_file, capsys, flags, named):
    """A set's index records text-to-image settings: the command's region and image flags are a one-line error
    before any model loads, instead of a set of plain panoramas that silently lack them."""
    argv = ["generate-set", str(prompts_file), "--out", str(tmp_path / "set"), "--model", "tiny", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "not for a set" in err
    assert not (tmp_path / "set").exists()


def test_a_flux_set_refuses_a_negative_prompt_without_true_cfg(tmp_path, prompts_file, capsys):
    """As the main command: FLUX ignores a negative prompt unless true CFG is on, so the set refuses it before loading."""
    argv = [
        "generate-set", str(prompts_file), "--out", str(tmp_path / "set"), "--model", "tiny-flux",
        "--negative-prompt", "blurry",
    ]  # fmt: skip
    assert main(argv) == 2
    assert "--negative-prompt: FLUX uses it only with true classifier-free guidance" in capsys.readouterr().err


def test_a_tiny_flux_set_records_its_flux_options(tmp_path, prompts_file):
    """A tiny-flux set runs offline and records FLUX's options and the denoiser's dtype in its index."""
    out = tmp_path / "set"
    argv = [
        "generate-set", str(prompts_file), "--out", str(out), "--model", "tiny-flux", "--seeds", "0",
        "--sync-weight", "0", "--steps", "2", "--width", "128",
    ]  # fmt: skip
    assert main(argv) == 0
    settings = index_of(out)["settings"]
    assert settings["max_sequence_length"] == 64 and settings["true_cfg_scale"] is None
    assert settings["dtype"] == "float32" and settings["steps"] == 2
    assert len(list(out.glob("*.png"))) == len(read_prompts(str(prompts_file)))
