"""The `syncdiffusion` command, offline on the tiny pipeline: in process through `main`, and as a newcomer runs
the installed console script."""

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from syncdiffusion_utils import cli
from syncdiffusion_utils.cli import main


# Small and quick: a 64x128 panorama (two 64x64 views), 3 steps, 2 of them synchronized.
TINY = ["a photo of a lake", "--model", "tiny", "--height", "64", "--width", "128", "--steps", "3"]
TINY += ["--sync-thres", "2", "--seed", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def pixels(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def assert_one_line_error(err, *needles):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("syncdiffusion: error: "), lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def test_tiny_run_writes_the_panorama(tmp_path, capsys):
    output = tmp_path / "panorama.png"
    assert main(TINY + ["-o", str(output)]) == 0

    image = pixels(output)
    assert image.shape == (64, 128, 3)
    assert image.std() > 5, "the panorama is blank"
    out = capsys.readouterr().out
    assert f"wrote {output}" in out and "128x64" in out and " s generating" in out


def test_tiny_xl_runs_the_sdxl_pipeline(tmp_path, capsys, monkeypatch):
    """`syncdiffusion "..." --model tiny-xl -o x.png`: the offline tiny SDXL, through SyncDiffusionXLPipeline."""
    from pipeline_syncdiffusion_xl import SyncDiffusionXLPipeline

    calls = []
    original = SyncDiffusionXLPipeline.__call__

    @functools.wraps(original)  # the command reads the class's defaults from its signature
    def call(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SyncDiffusionXLPipeline, "__call__", call)
    output = tmp_path / "x.png"
    args = ["a harbour at dawn", "--model", "tiny-xl", "--height", "64", "--width", "128", "--steps", "2"]
    assert main(args + ["--sync-thres", "1", "-o", str(output)]) == 0
    assert calls, "the SDXL pipeline did not run"
    image = pixels(output)
    assert image.shape == (64, 128, 3) and image.std() > 5
    assert f"wrote {output}" in capsys.readouterr().out


def test_compare_stacks_labelled_multidiffusion_and_syncdiffusion(tmp_path, capsys):
    output = tmp_path / "compare.png"
    assert main(TINY + ["--compare", "-o", str(output)]) == 0

    image = pixels(output)
    height, width, _ = image.shape
    assert width == 128
    assert height > 2 * 64
    # Two equal label bands, each above its panorama.
    band = (height - 2 * 64) // 2
    assert 2 * band + 2 * 64 == height
    multi, sync = image[band : band + 64], image[2 * band + 64 :]
    assert image[:band].std() > 5, "the label band holds no text"
    assert multi.std() > 5 and sync.std() > 5
    assert np.abs(multi - sync).mean() > 0.1, "synchronization changed nothing"
    assert f"wrote {output}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--height", "100"], "--height"),
        (["--width", "130"], "--width"),
        (["--stride", "9"], "--stride"),
        (["--sync-weight", "-1"], "--sync-weight"),
        (["--sync-lpips-size", "16"], "--sync-lpips-size"),
        (["--height", "0"], "--height"),
        (["--scheduler", "pndm"], "--scheduler"),
    ],
)
def test_bad_arguments_name_the_flag(flags, flag, tmp_path, capsys):
    output = tmp_path / "bad.png"
    assert main(TINY + flags + ["-o", str(output)]) == 2
    assert_one_line_error(capsys.readouterr().err, flag)
    assert not output.exists()


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""

    def load_pipeline(*args, **kwargs):
        raise AssertionError("the output path should be checked before loading the model")

    monkeypatch.setattr(cli, "load_pipeline", load_pipeline)


@pytest.mark.parametrize("where", ["missing directory", "parent is a file", "a directory"])
def test_unwritable_output_fails_before_loading(where, tmp_path, capsys, no_model_loading):
    (tmp_path / "file").write_text("")
    output = {
        "missing directory": tmp_path / "missing" / "out.png",
        "parent is a file": tmp_path / "file" / "out.png",
        "a directory": tmp_path,
    }[where]
    assert main(TINY + ["-o", str(output)]) != 0
    assert_one_line_error(capsys.readouterr().err, "--output", str(output))


def test_missing_local_model_says_how_to_get_weights(tmp_path, capsys):
    assert main(["a lake", "--model", "/nonexistent/model", "-o", str(tmp_path / "x.png")]) != 0
    line = assert_one_line_error(capsys.readouterr().err, "--model", "/nonexistent/model")
    assert "hf download stabilityai/stable-diffusion-2-base" in line and "hf auth login" in line


def test_missing_hub_model_offline_says_how_to_get_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["a lake", "--model", "nobody-here/no-such-model", "-o", str(tmp_path / "x.png")]) != 0
    line = assert_one_line_error(capsys.readouterr().err, "--model", "nobody-here/no-such-model")
    assert "hf download nobody-here/no-such-model" in line and "hf auth login" in line


def test_folder_without_a_pipeline(tmp_path, capsys):
    assert main(["a lake", "--model", str(tmp_path), "-o", str(tmp_path / "x.png")]) != 0
    assert_one_line_error(capsys.readouterr().err, "--model", "model_index.json")


def test_publish_calls_hub_publish(monkeypatch, capsys):
    from syncdiffusion_utils import hub

    calls = []

    def publish(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.setattr(hub, "publish", publish)
    assert main(["publish", "me/syncdiffusion", "--token", "T", "--private"]) == 0
    assert calls == [("me/syncdiffusion", {"token": "T", "private": True})]
    assert "https://huggingface.co/me/syncdiffusion/commit/abc" in capsys.readouterr().out


def test_publish_bad_repo_id_is_one_line(capsys):
    assert main(["publish", "not-a-repo-id"]) == 2
    assert_one_line_error(capsys.readouterr().err, "not-a-repo-id")


def test_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--sync-mode", "--compare", "--circular", "--cpu-offload", "--scheduler", "publish"):
        assert flag in out


# ---------------------------------------------------------------------------------------------------------------
# A newcomer: `pip install -e .`, then the `syncdiffusion` command, nothing else.
# ---------------------------------------------------------------------------------------------------------------


def console_script():
    """The `syncdiffusion` script installed next to this Python (the environment under test), else on PATH."""
    for candidate in (Path(sys.executable).parent / "syncdiffusion", shutil.which("syncdiffusion")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail("the `syncdiffusion` console script is not installed: run `pip install -e .`")


def run(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_newcomer_runs_the_console_script(tmp_path):
    script = console_script()

    result = run([script, "a photo of a lake", "--model", "tiny", "-o", "tmp.png"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "wrote tmp.png" in result.stdout
    image = pixels(tmp_path / "tmp.png")
    assert image.shape == (64, 256, 3)  # the tiny model's default size
    assert image.std() > 5

    result = run([script, "a photo of a lake", "--model", "tiny", "--compare", "-o", "compare.png"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    image = pixels(tmp_path / "compare.png")
    assert image.shape[1] == 256 and image.shape[0] > 2 * 64
    assert image.std() > 5


def test_python_m_and_help(tmp_path):
    result = run([sys.executable, "-m", "syncdiffusion_utils.cli", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--sync-weight" in result.stdout
    result = run([sys.executable, "-m", "syncdiffusion_utils.cli", "a lake", "--steps", "0"], tmp_path)
    assert result.returncode == 2
    assert "--steps" in result.stderr and "Traceback" not in result.stderr


def test_local_model_folder(tmp_path, capsys):
    """A diffusers folder goes through `SyncDiffusionPipeline.from_pretrained`, as a real checkpoint does."""
    from syncdiffusion_utils.testing import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / "model")
    output = tmp_path / "folder.png"
    # Without synchronization: a loaded pipeline would build LPIPS with pretrained VGG weights (a download).
    args = ["a lake", "--model", str(folder), "--height", "64", "--width", "128", "--steps", "2"]
    assert main(args + ["--sync-weight", "0", "--scheduler", "euler", "-o", str(output)]) == 0
    assert pixels(output).shape == (64, 128, 3)
    assert f"wrote {output}" in capsys.readouterr().out


def test_unavailable_device(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(TINY + ["--device", "cuda", "-o", str(tmp_path / "x.png")]) != 0
    assert_one_line_error(capsys.readouterr().err, "--device")


def test_device_index_beyond_the_machines_gpus(tmp_path, capsys, monkeypatch):
    """`--device cuda:7` on a one-GPU machine: one line naming the devices there, before any model loads."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(TINY + ["--device", "cuda:7", "-o", str(tmp_path / "x.png")]) != 0
    assert_one_line_error(capsys.readouterr().err, "--device 'cuda:7'", "cuda:0")


def test_scheduler_keep_leaves_the_models_own_and_the_default_is_ddim():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    from syncdiffusion_utils.testing import tiny_pipeline

    pipe = tiny_pipeline(lpips_module=False)
    own = pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert cli.set_scheduler(pipe, "keep") is own
    assert isinstance(cli.set_scheduler(pipe, cli.DEFAULT_SCHEDULER), DDIMScheduler)


def test_help_says_what_the_default_stride_costs(capsys):
    assert main(["--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "25 views at 2048 px" in help_text and "keep" in help_text
