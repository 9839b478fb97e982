"""`syncdiffusion generate-set`: prompts x seeds into a folder with an index, resumable, and spread over two CPU
processes by `accelerate launch`; `evaluate` reads its index."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from syncdiffusion_utils import cli, evaluation, generate_set
from syncdiffusion_utils.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
# 2 prompts x 2 seeds of a 64x128 panorama in 2 steps, MultiDiffusion (sync weight 0: no LPIPS passes).
GENERATION = ["--model", "tiny", "--height", "64", "--width", "128", "--steps", "2", "--sync-weight", "0"]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of a lake\n\n# not a prompt\na city at night, neon!\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny(pipe, monkeypatch):
    """`--model tiny` loads the session's tiny pipeline (same weights as `load_pipeline("tiny")`), and counts calls."""
    calls = []
    original = pipe.__call__

    class Counting:
        def __getattr__(self, name):
            return getattr(pipe, name)

        def __call__(self, *args, **kwargs):
            calls.append(kwargs["prompt"])
            return original(*args, **kwargs)

    monkeypatch.setattr(cli, "load_pipeline", lambda *args, **kwargs: Counting())
    return pipe, calls


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def expected_files():
    return [f"{p}-seed{s}.png" for p in ("000-a-photo-of-a-lake", "001-a-city-at-night-neon") for s in (0, 1)]


def test_seeds_and_prompts_parse():
    assert generate_set.parse_seeds("0-3") == [0, 1, 2, 3]
    assert generate_set.parse_seeds("5, 0-1,1") == [5, 0, 1]
    for bad in ("3-1", "a", "1-", ""):
        with pytest.raises(cli.CLIError, match="--seeds"):
            generate_set.parse_seeds(bad)
    assert generate_set.file_name(7, "A photo: of a City!", 3) == "007-a-photo-of-a-city-seed3.png"


def test_generate_set_writes_every_pair_and_its_index_and_resumes(tmp_path, prompts_file, tiny, capsys):
    pipe, calls = tiny
    out = tmp_path / "set"
    assert main(["generate-set", str(prompts_file), "--out", str(out), "--seeds", "0-1"] + GENERATION) == 0
    assert sorted(os.listdir(out)) == sorted(expected_files() + ["index.json"])
    index = json.loads((out / "index.json").read_text())
    assert [(i["file"], i["prompt"], i["seed"]) for i in index["images"]] == [
        (f, p, s)
        for f, (p, s) in zip(
            expected_files(), [(p, s) for p in ("a photo of a lake", "a city at night, neon!") for s in (0, 1)]
        )
    ]
    assert index["settings"]["sync_weight"] == 0 and index["settings"]["steps"] == 2

    # The file is the pipeline's image for that prompt and seed, as the main command makes it.
    call = {
        "height": 64,
        "width": 128,
        "num_inference_steps": 2,
        "sync_weight": 0.0,
        "view_batch_size": "auto",
    }  # as the command
    image = pipe("a city at night, neon!", generator=cli.generator(1), **call).images[0]
    assert np.abs(pixels(out / expected_files()[3]) - np.asarray(image, dtype=np.int16)).max() == 0

    # Resume: only the missing file is generated.
    calls.clear()
    (out / expected_files()[1]).unlink()
    assert main(["generate-set", str(prompts_file), "--out", str(out), "--seeds", "0-1"] + GENERATION) == 0
    assert calls == ["a photo of a lake"] and len(os.listdir(out)) == 5
    assert "3 of 4 panoramas exist" in capsys.readouterr().err


def test_evaluate_takes_the_prompts_from_the_index(tmp_path, prompts_file, tiny, lpips_module, monkeypatch, capsys):
    out = tmp_path / "set"
    assert main(["generate-set", str(prompts_file), "--out", str(out), "--seeds", "0"] + GENERATION) == 0
    networks = evaluation.random_networks(lpips_module=lpips_module)
    monkeypatch.setattr(evaluation, "random_networks", lambda *args, **kwargs: networks)
    capsys.readouterr()
    argv = [
        "evaluate",
        str(out),
        "--window",
        "64",
        "--stride",
        "32",
        "--networks",
        "random",
        "--json",
        str(tmp_path / "r.json"),
    ]
    assert main(argv) == 0
    assert (
        capsys.readouterr().out.splitlines()[0]
        == "| set | panoramas | Intra-LPIPS ↓ | Intra-Style-L ↓ | Mean-CLIP-S ↑ |"
    )
    result = json.loads((tmp_path / "r.json").read_text())["sets"][0]
    assert [p["file"] for p in result["panoramas"]] == [expected_files()[0], expected_files()[2]]
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
    ],
)
def test_bad_input_is_one_line(tmp_path, prompts_file, monkeypatch, capsys, extra, needles):
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["generate-set", str(prompts_file), "--out", str(tmp_path / "set")] + GENERATION + extra) != 0
    assert_one_line_error(capsys.readouterr().err, *needles)


def test_missing_or_empty_prompts_and_changed_settings_are_one_line(tmp_path, prompts_file, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
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

    # Each process generated two of the four, and the index lists all four once.
    for rank in (0, 1):
        assert done.stdout.count(f"[process {rank}] wrote") == 2, done.stdout
    index = json.loads((out / "index.json").read_text())
    assert [entry["file"] for entry in index["images"]] == expected_files()
    # Each file is the one a single process makes for its prompt and seed.
    image = pipe(
        "a photo of a lake", generator=cli.generator(1), height=64, width=128, num_inference_steps=2, sync_weight=0.0
    ).images[0]
    assert np.abs(pixels(out / expected_files()[1]) - np.asarray(image, dtype=np.int16)).max() <= 1  # threads
