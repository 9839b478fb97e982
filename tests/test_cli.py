"""The `syncdiffusion` command, offline on the tiny pipeline: in process through `main`, and as a newcomer runs
the installed console script."""

import functools
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_syncdiffusion import SyncDiffusionPipeline
from syncdiffusion_utils import cli, loading
from syncdiffusion_utils.calls import prepare_call
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


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--stride", "0"], "--stride"),
        (["--stride", "-4"], "--stride"),
        (["--height", "0"], "--height"),
        (["--width", "0"], "--width"),
        (["--steps", "0"], "--steps"),
        (["--sync-freq", "0"], "--sync-freq"),
        (["--sync-lpips-size", "0"], "--sync-lpips-size"),
        (["--sync-decode-downsample", "0"], "--sync-decode-downsample"),
        (["--view-batch-size", "0"], "--view-batch-size"),
    ],
)
def test_zero_is_rejected_at_parse_time_not_replaced_by_the_default(flags, flag, tmp_path, capsys, no_model_loading):
    """`--stride 0` used to become the default stride (`args.stride or 8`): now it is an error before any model."""
    assert main(TINY + flags + ["-o", str(tmp_path / "x.png")]) == 2
    line = assert_one_line_error(capsys.readouterr().err, flag, "expected a positive integer")
    assert flags[1] in line


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
    assert calls == [("me/syncdiffusion", {"pipeline_class": SyncDiffusionPipeline, "token": "T", "private": True})]
    assert "https://huggingface.co/me/syncdiffusion/commit/abc" in capsys.readouterr().out


def test_publish_pipeline_flag_picks_the_class(monkeypatch, capsys):
    from pipeline_syncdiffusion_controlnet import SyncDiffusionControlNetPipeline
    from pipeline_syncdiffusion_xl import SyncDiffusionXLPipeline
    from syncdiffusion_utils import hub

    classes = []
    monkeypatch.setattr(hub, "publish", lambda repo_id, **kwargs: classes.append(kwargs["pipeline_class"]) or "url")
    assert main(["publish", "me/sync-xl", "--pipeline", "sdxl"]) == 0
    assert main(["publish", "me/sync-control", "--pipeline", "controlnet"]) == 0
    assert classes == [SyncDiffusionXLPipeline, SyncDiffusionControlNetPipeline]

    # With --model the model's own class is published: --pipeline there is an error, before any loading.
    monkeypatch.setattr(cli, "load_for_export", lambda model: pytest.fail("a model was loaded"))
    capsys.readouterr()
    assert main(["publish", "me/x", "--model", "tiny", "--pipeline", "sdxl"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--pipeline sdxl", "--model")


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
    assert loading.set_scheduler(pipe, "keep") is own
    assert isinstance(loading.set_scheduler(pipe, loading.DEFAULT_SCHEDULER), DDIMScheduler)


def test_help_says_what_the_default_stride_costs(capsys):
    assert main(["--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "25 views at 2048 px" in help_text and "keep" in help_text


# ---------------------------------------------------------------------------------------------------------------
# A prompt that is a subcommand's name
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def prompts(monkeypatch):
    """The prompts the SD pipeline is called with (the call runs as usual)."""
    seen = []
    original = SyncDiffusionPipeline.__call__

    @functools.wraps(original)  # the call's defaults are read from the signature
    def call(self, *args, **kwargs):
        seen.append(kwargs["prompt"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SyncDiffusionPipeline, "__call__", call)
    return seen


@pytest.mark.parametrize("how", ["generate", "options first", "double dash"])
def test_a_prompt_named_like_a_subcommand_can_be_generated(how, prompts, tmp_path, capsys):
    output = tmp_path / "demo.png"
    options = TINY[1:] + ["--sync-weight", "0", "-o", str(output)]
    argv = {
        "generate": ["generate", "demo"] + options,  # syncdiffusion generate demo --model tiny ...
        "options first": options + ["demo"],  # syncdiffusion --model tiny ... demo
        "double dash": options + ["--", "demo"],  # syncdiffusion --model tiny ... -- demo
    }[how]
    assert main(argv) == 0
    assert prompts == ["demo"]
    assert pixels(output).shape == (64, 128, 3)
    assert f"wrote {output}" in capsys.readouterr().out


def test_generate_subcommand_has_its_own_help_and_errors(capsys):
    assert main(["generate", "--help"]) == 0
    assert "syncdiffusion generate" in capsys.readouterr().out
    assert main(["generate", "a lake", "--stride", "0"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--stride")


# ---------------------------------------------------------------------------------------------------------------
# The call the command prepares (`calls.prepare_call`, shared with the demo, generate-set and the examples)
# ---------------------------------------------------------------------------------------------------------------

GIB = 2**30


class CallRecorded(Exception):
    """Raised by the recording `__call__` below: the test has what it needs, no denoising runs."""


@pytest.fixture
def fake_gpu(monkeypatch):
    """The SD pipeline runs "on CUDA" (its execution device) with `free` bytes free; its `__call__` records its
    arguments and whether the VAE tiles, then stops. Set `fake_gpu.free` before the call."""
    state = type("FakeGpu", (), {"free": 80 * GIB, "calls": []})()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state.free, 80 * GIB))
    monkeypatch.setattr(SyncDiffusionPipeline, "_execution_device", property(lambda self: torch.device("cuda")))
    original = SyncDiffusionPipeline.__call__

    @functools.wraps(original)
    def record(self, **kwargs):
        state.calls.append({**kwargs, "vae_tiling": self.vae.use_tiling})
        raise CallRecorded

    monkeypatch.setattr(SyncDiffusionPipeline, "__call__", record)
    return state


def decode_bytes(pipe, height, width):
    """What the whole-panorama decode is estimated to hold (`calls.decode_fits`)."""
    from syncdiffusion_utils.calls import DECODE_ELEMENTS

    return DECODE_ELEMENTS * min(pipe.vae.config.block_out_channels) * height * width * 4


@pytest.mark.parametrize("fits", [True, False], ids=["decode-fits", "decode-does-not-fit"])
def test_the_command_asks_for_auto_view_batches_and_tiles_when_the_decode_does_not_fit(fits, fake_gpu, capsys):
    from syncdiffusion_utils.testing import tiny_pipeline

    needed = decode_bytes(tiny_pipeline(lpips_module=False), 64, 256)
    # Free memory just above or below what the decode needs at the 0.8 margin.
    fake_gpu.free = int(needed / 0.8 * (1.5 if fits else 0.5))
    args = ["a lake", "--model", "tiny", "--width", "256", "--steps", "2", "--sync-weight", "0", "--seed", "1"]
    with pytest.raises(CallRecorded):
        main(args)
    (call,) = fake_gpu.calls
    assert call["view_batch_size"] == "auto"
    assert call["vae_tiling"] is not fits
    assert (call["height"], call["width"], call["num_inference_steps"], call["stride"]) == (64, 256, 2, 8)
    assert call["guidance_scale"] == 7.5  # the class's default
    err = capsys.readouterr().err
    assert ("decoding the 256x64 panorama in tiles" in err) is not fits


def test_the_command_passes_explicit_view_batches_and_tiling_on(fake_gpu):
    args = ["a lake", "--model", "tiny", "--steps", "2", "--sync-weight", "0", "--view-batch-size", "3"]
    with pytest.raises(CallRecorded):
        main(args + ["--vae-tiling", "on"])
    (call,) = fake_gpu.calls
    assert call["view_batch_size"] == 3 and call["vae_tiling"] is True


def test_prepare_call_fills_the_class_defaults_and_keeps_what_is_given(pipe):
    call = prepare_call(pipe, prompt="a lake", height=64, width=None, stride=None, sync_weight=0.0)
    assert call == {
        "prompt": "a lake",
        "height": 64,
        "width": 2048,
        "num_inference_steps": 50,
        "guidance_scale": 7.5,
        "stride": 8,
        "view_batch_size": "auto",
        "sync_weight": 0.0,
    }
    # Given values, a guidance of 0 included, are kept; None is "left out"; other None arguments pass as given.
    call = prepare_call(pipe, height=64, width=128, guidance_scale=0.0, view_batch_size=None, sync_gradient=None)
    assert call["guidance_scale"] == 0.0 and call["view_batch_size"] == "auto" and call["sync_gradient"] is None
    assert prepare_call(pipe, height=64, width=128, view_batch_size=2)["view_batch_size"] == 2
    assert not pipe.vae.use_tiling  # on the CPU the decode always "fits"
    prepare_call(pipe, height=64, width=128, vae_tiling="on")
    assert pipe.vae.use_tiling
    prepare_call(pipe, height=64, width=128, vae_tiling="off")
    assert not pipe.vae.use_tiling


def test_prepare_call_uses_each_classs_own_defaults():
    from syncdiffusion_utils.testing import make_tiny_controlnet, tiny_pipeline, tiny_xl_pipeline

    call = prepare_call(tiny_xl_pipeline(lpips_module=False), prompt="a lake")
    assert (call["height"], call["width"], call["guidance_scale"]) == (1024, 4096, 5.0)
    assert call["stride"] is None  # SDXL's pipeline picks an eighth of its window itself

    from PIL import Image

    from pipeline_syncdiffusion_controlnet import SyncDiffusionControlNetPipeline

    sd = tiny_pipeline(lpips_module=False)
    control = SyncDiffusionControlNetPipeline(**sd.components, controlnet=make_tiny_controlnet(sd.unet))
    condition = Image.new("RGB", (192, 64))
    call = prepare_call(control, prompt="a lake", image=condition)
    assert call["height"] is None and call["width"] is None  # the pipeline takes the condition's size
    assert call["image"] is condition and call["view_batch_size"] == "auto"


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"height": 0}, "`height` has to be a positive whole number"),
        ({"width": 100.5}, "`width` has to be a positive whole number"),
        ({"width": "256"}, "`width` has to be a positive whole number"),
        ({"vae_tiling": "yes"}, "`vae_tiling` has to be one of auto, on, off, but is 'yes'"),
    ],
)
def test_prepare_call_rejects_bad_input_before_changing_the_pipe(pipe, bad, match):
    pipe.vae.enable_tiling()
    with pytest.raises(ValueError, match=match):
        prepare_call(pipe, **{"height": 64, "width": 128, **bad})
    assert pipe.vae.use_tiling, "the VAE's tiling changed before the error"


# ---------------------------------------------------------------------------------------------------------------
# An unreachable Hub: the one-line error in seconds, not after huggingface_hub's retries
# ---------------------------------------------------------------------------------------------------------------


def test_unreachable_hub_fails_within_seconds_with_the_same_message(tmp_path, capsys, monkeypatch):
    """Offline without HF_HUB_OFFLINE, the command took ~37 s here (huggingface_hub retries each file five times
    with backoff) to print its error; the Hub is now probed once, and the cache used alone."""
    from huggingface_hub import constants

    import pipeline_syncdiffusion  # noqa: F401  (imported before the clock starts, as the command has by then)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused, never leaves
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    started = time.perf_counter()
    assert main(["a lake", "--model", "nobody-here/no-such-model", "-o", str(tmp_path / "x.png")]) == 1
    seconds = time.perf_counter() - started
    line = assert_one_line_error(capsys.readouterr().err, "--model 'nobody-here/no-such-model'")
    assert "cannot find or download it from the Hub or the local cache" in line
    assert "hf download nobody-here/no-such-model" in line
    assert seconds < 10, f"{seconds:.1f} s"  # measured 0.11 s; 23.5 s without the probe


def test_the_hub_probe_sees_a_server_that_answers(tmp_path):
    """Any HTTP answer counts as reachable (here a 404 from a local server); a refused port does not."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert loading._hub_reachable(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert not loading._hub_reachable("http://127.0.0.1:9")


# ---------------------------------------------------------------------------------------------------------------
# FLUX.1: `--model tiny-flux`, its flags, and the flags it refuses
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def flux_calls(monkeypatch):
    """The keyword arguments of every `SyncDiffusionFluxPipeline` call (the call runs as usual)."""
    from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline

    seen = []
    original = SyncDiffusionFluxPipeline.__call__

    @functools.wraps(original)  # the command reads the class's defaults from its signature
    def call(self, *args, **kwargs):
        seen.append({**kwargs, "scheduler": type(self.scheduler).__name__, "window": self.default_window_size})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SyncDiffusionFluxPipeline, "__call__", call)
    return seen


def test_tiny_flux_runs_the_flux_pipeline_offline_in_seconds(tmp_path, capsys, flux_calls, monkeypatch):
    """The issue's `syncdiffusion "..." --model tiny-flux -o x.png`, with the command's own defaults."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output = tmp_path / "x.png"
    assert main(["a harbour at dawn", "--model", "tiny-flux", "--seed", "0", "-o", str(output)]) == 0

    (call,) = flux_calls
    assert call["scheduler"] == "FlowMatchEulerDiscreteScheduler"  # "keep": FLUX's own, not the SD default ddim
    assert call["window"] == 64  # the tiny VAE's sample size, as FLUX.1's window is its 1024 pixels
    assert (call["height"], call["width"], call["num_inference_steps"], call["stride"]) == (64, 256, 10, 8)
    assert call["guidance_scale"] == 3.5 and call["true_cfg_scale"] == 1.0  # the class's defaults
    assert call["max_sequence_length"] == cli.TINY_MAX_SEQUENCE_LENGTH and call["sync_weight"] == 20.0
    image = pixels(output)
    assert image.shape == (64, 256, 3) and image.std() > 5
    out = capsys.readouterr().out
    generating = float(re.search(r"([\d.]+) s generating", out).group(1))
    assert generating < 60, out  # measured 2.8 s on a shared 2-core CPU


def test_flux_true_cfg_and_sequence_length_flags_reach_the_call(tmp_path, flux_calls):
    from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline
    from syncdiffusion_utils.testing import tiny_flux_pipeline

    output = tmp_path / "cfg.png"
    args = ["a lake", "--model", "tiny-flux", "--height", "64", "--width", "128", "--steps", "2", "--seed", "4"]
    args += ["--sync-weight", "0", "--true-cfg-scale", "4", "--negative-prompt", "blurry", "--guidance", "2"]
    assert main(args + ["--max-sequence-length", "16", "-o", str(output)]) == 0
    (call,) = flux_calls
    assert call["true_cfg_scale"] == 4.0 and call["negative_prompt"] == "blurry" and call["guidance_scale"] == 2.0
    assert call["max_sequence_length"] == 16

    # The same panorama as the pipeline called directly with those arguments (bit-identical on the same CPU).
    pipe = tiny_flux_pipeline(pipeline_class=SyncDiffusionFluxPipeline, lpips_module=False)
    pipe.default_sample_size = 8
    direct = pipe(
        prompt="a lake",
        negative_prompt="blurry",
        true_cfg_scale=4.0,
        guidance_scale=2.0,
        max_sequence_length=16,
        height=64,
        width=128,
        num_inference_steps=2,
        stride=8,
        sync_weight=0.0,
        view_batch_size="auto",
        generator=cli.generator(4),
    ).images[0]
    assert np.array_equal(pixels(output), np.asarray(direct, dtype=np.float64))


@pytest.mark.parametrize(
    "model, flags, needles",
    [
        ("tiny-flux", ["--scheduler", "ddim"], ["--scheduler ddim", "flow-matching", "--scheduler keep"]),
        ("tiny-flux", ["--scheduler", "euler"], ["--scheduler euler", "--scheduler keep"]),
        ("tiny", ["--true-cfg-scale", "4"], ["--true-cfg-scale", "FLUX models only"]),
        ("tiny-xl", ["--max-sequence-length", "64"], ["--max-sequence-length", "FLUX models only"]),
        ("tiny-flux", ["--negative-prompt", "blurry"], ["--negative-prompt", "--true-cfg-scale above 1"]),
        ("tiny-flux", ["--negative-prompt", "x", "--true-cfg-scale", "1"], ["--negative-prompt"]),
        ("tiny-flux", ["--true-cfg-scale", "4"], ["--true-cfg-scale 4", "--negative-prompt"]),
        ("tiny-flux", ["--sync-gradient", "unet"], ["--sync-gradient unet", "transformer or x0"]),
        ("tiny", ["--sync-gradient", "transformer"], ["--sync-gradient transformer", "unet or x0"]),
        ("tiny-flux", ["--max-sequence-length", "0"], ["--max-sequence-length", "positive integer"]),
    ],
)
def test_flux_flags_and_the_flags_flux_refuses_fail_before_loading(
    model, flags, needles, tmp_path, capsys, no_model_loading
):
    assert main(["a lake", "--model", model, "-o", str(tmp_path / "x.png")] + flags) == 2
    assert_one_line_error(capsys.readouterr().err, *needles)


def test_flux_refuses_a_controlnet_before_loading(tmp_path, capsys, no_model_loading):
    Image.new("RGB", (128, 64)).save(tmp_path / "depth.png")
    args = ["a lake", "--model", "tiny-flux", "--control-image", str(tmp_path / "depth.png"), "--controlnet", "tiny"]
    assert main(args + ["-o", str(tmp_path / "x.png")]) == 2
    assert_one_line_error(capsys.readouterr().err, "--controlnet")


def test_a_too_long_sequence_is_the_pipelines_error_named_by_its_flag(tmp_path, capsys):
    assert main(["a lake", "--model", "tiny-flux", "--max-sequence-length", "600", "-o", str(tmp_path / "x.png")]) == 2
    assert_one_line_error(capsys.readouterr().err, "--max-sequence-length", "1..512", "600")


def test_each_class_has_its_own_default_scheduler():
    from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline
    from pipeline_syncdiffusion_xl import SyncDiffusionXLPipeline

    assert (
        loading.resolve_scheduler(SyncDiffusionPipeline)
        == loading.resolve_scheduler(SyncDiffusionXLPipeline)
        == "ddim"
    )
    assert loading.resolve_scheduler(SyncDiffusionFluxPipeline) == "keep"
    assert loading.schedulers_for(SyncDiffusionFluxPipeline) == ("keep",)
    assert loading.schedulers_for(SyncDiffusionPipeline) == loading.SCHEDULERS


def test_prepare_call_gives_fluxs_own_defaults():
    from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline
    from syncdiffusion_utils.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(pipeline_class=SyncDiffusionFluxPipeline, lpips_module=False)
    call = prepare_call(pipe, prompt="a lake", true_cfg_scale=None, max_sequence_length=None)
    assert call == {
        "prompt": "a lake",
        "height": 1024,
        "width": 4096,
        "num_inference_steps": 28,
        "guidance_scale": 3.5,
        "stride": None,  # the pipeline picks a quarter of its window, even
        "true_cfg_scale": 1.0,
        "max_sequence_length": 512,
        "view_batch_size": "auto",
    }
    # An SD pipeline has neither FLUX argument: none is added.
    from syncdiffusion_utils.testing import tiny_pipeline

    assert "max_sequence_length" not in prepare_call(tiny_pipeline(lpips_module=False), prompt="a lake")


# ---------------------------------------------------------------------------------------------------------------
# The sync-weight sweep: `--sync-weight 0,10,20,40`, one seed, one labelled sheet with each row's intra-LPIPS
# ---------------------------------------------------------------------------------------------------------------

SWEEP = ["a photo of a lake", "--height", "64", "--width", "128", "--steps", "3", "--sync-thres", "2", "--seed", "2"]


@pytest.fixture
def stacked(monkeypatch):
    """The `(image, label)` rows the command stacks (`label_and_stack` runs as usual)."""
    rows = []
    original = cli.label_and_stack

    def record(images_and_labels, **kwargs):
        rows.extend(images_and_labels)
        return original(images_and_labels, **kwargs)

    monkeypatch.setattr(cli, "label_and_stack", record)
    return rows


def find_rows(sheet, image):
    """The top offsets where `image` (an array) lies in `sheet`, full width."""
    height = image.shape[0]
    return [y for y in range(sheet.shape[0] - height + 1) if np.array_equal(sheet[y : y + height], image)]


@pytest.mark.parametrize(
    "model, weights",
    [("tiny", "0,10,40"), ("tiny-xl", "0,20"), ("tiny-flux", "0,20"), ("controlnet", "0,20")],
    ids=["sd", "sdxl", "flux", "controlnet"],
)
def test_a_sync_weight_sweep_writes_one_labelled_row_per_weight_scored_by_intra_lpips(
    model, weights, tmp_path, capsys, stacked, lpips_module
):
    from syncdiffusion_utils.metrics import intra_lpips

    flags = ["--model", model]
    if model == "controlnet":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 128, 3), dtype=np.uint8)).save(
            tmp_path / "depth.png"
        )
        flags = ["--model", "tiny", "--control-image", str(tmp_path / "depth.png"), "--controlnet", "tiny"]
    sheet_path, single_path = tmp_path / "sweep.png", tmp_path / "single.png"

    assert main(SWEEP + flags + ["--sync-weight", weights, "-o", str(sheet_path)]) == 0
    out = capsys.readouterr().out
    assert main(SWEEP + flags + ["--sync-weight", "0", "-o", str(single_path)]) == 0

    values = [float(value) for value in weights.split(",")]
    assert len(stacked) == len(values)  # one row per weight
    sheet = pixels(sheet_path)
    assert sheet.shape[1] == 128 and sheet.shape[0] > 64 * len(values)
    for (image, label), value in zip(stacked, values):
        assert label.startswith(f"sync weight {value:g}")
        # The label's intra-LPIPS is the paper's metric of that row: 64-pixel crops (the tiny views), the random
        # LPIPS-VGG of the tiny models, which the session fixture also is (same seed, same weights).
        score = intra_lpips(image, 64, 64, loss=lpips_module)
        assert f"intra-LPIPS {score:.4f}" in label, (label, score)
        assert f"sync weight {value:g}: intra-LPIPS {score:.4f}" in out
        assert find_rows(sheet, np.asarray(image.convert("RGB"), dtype=np.float64)), f"row {label!r} not in the sheet"
    # The first row is the single MultiDiffusion run from the same seed, exactly; synchronization changed the others.
    first_rows = find_rows(sheet, pixels(single_path))
    assert first_rows and first_rows[0] < sheet.shape[0] // len(values)
    assert "(MultiDiffusion)" in stacked[0][1]
    assert not np.array_equal(np.asarray(stacked[0][0]), np.asarray(stacked[-1][0]))
    assert f"wrote {sheet_path}" in out and "sync weights " + weights.replace(",", ", ") in out


@pytest.mark.parametrize(
    "value, needle",
    [
        ("0,,20", "an empty item"),
        ("0,20,", "an empty item"),
        (",", "an empty item"),
        ("0,-10", "-10 is not >= 0"),
        ("0,ten", "'ten'"),
        ("0,nan", "nan is not >= 0"),
        ("10,10", "10 twice"),
        ("-5", "-5 is not >= 0"),
    ],
)
def test_a_bad_sync_weight_list_is_a_one_line_error_at_parse_time(value, needle, tmp_path, capsys, no_model_loading):
    assert main(TINY + [f"--sync-weight={value}", "-o", str(tmp_path / "x.png")]) == 2
    assert_one_line_error(capsys.readouterr().err, "--sync-weight", needle)


def test_a_sweep_refuses_compare_and_a_panorama_of_one_crop(tmp_path, capsys, prompts):
    args = TINY + ["--sync-weight", "0,20", "-o", str(tmp_path / "x.png")]
    assert main(args + ["--compare"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--compare", "--sync-weight")
    # 64x64: one 64-pixel crop, no pair for intra-LPIPS: refused before any panorama is made.
    assert main(args + ["--width", "64"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--sync-weight", "one 64-pixel crop")
    assert prompts == [] and not (tmp_path / "x.png").exists()
