"""The web demo (`syncdiffusion demo`): its generation against direct pipeline calls, its regions canvas, its "Extend a
photo" mode, its command line, and the app served by the real command on the tiny model, driven in a headless
Chromium (Debian's, through Selenium and /usr/bin/chromedriver; regions painted with mouse drags, a photo uploaded) and
through gradio_client.

Set SYNCDIFFUSION_DEMO_SCREENSHOT=docs/demo.png to keep the browser test's screenshot of a finished comparison.
"""

import base64
import contextlib
import functools
import importlib.util
import io
import os
import runpy
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from syncdiffusion_utils import cli, demo, loading
from syncdiffusion_utils.cli import generator
from syncdiffusion_utils.demo import PanoramaDemo, preset_sizes


pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BAD_WIDTH = 100  # not a multiple of the VAE's factor 8: the pipeline's own check rejects it
# The served app's arguments of /generate, in order: a 64x256 panorama (four 64x64 views), 4 steps.
API_ARGUMENTS = {
    "prompt": "a photo of a lake",
    "negative_prompt": "",
    "height": 64,
    "width": 256,
    "circular": False,
    "steps": 4,
    "seed": 3,
    "random_seed": False,
    "scheduler": "ddim",
    "stride": 8,
    "guidance": 7.5,
    "sync_weight": 20,
    "sync_thres": 2,
    "sync_mode": "exact",
    "compare": False,
}


@functools.lru_cache(maxsize=1)
def pipeline_message():
    """The pipeline's own one-line message for `width=BAD_WIDTH`, which the page shows as it is."""
    from syncdiffusion_utils.testing import tiny_pipeline

    try:
        tiny_pipeline(lpips_module=False)("a photo of a lake", height=64, width=BAD_WIDTH)
    except ValueError as error:
        return str(error)
    raise AssertionError(f"the pipeline accepted width={BAD_WIDTH}")


def pixels(image):
    return np.asarray(image.convert("RGB"))


# ----------------------------------------------------------------------------------------------------------------
# Without a server
# ----------------------------------------------------------------------------------------------------------------


def test_importing_the_demo_and_its_help_import_nothing_heavy():
    code = (
        "import sys; from syncdiffusion_utils.cli import main; main(['demo', '--help']);"
        " print(sorted(m for m in ('torch', 'gradio', 'diffusers', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "--share" in done.stdout and "--model" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_presets_are_multiples_of_the_models_window():
    # Stable Diffusion 2 base: 512-pixel views, the paper's 512x2048 and 512x3072.
    assert preset_sizes(512) == {
        "wide 512x2048": (512, 2048, False),
        "wider 512x3072": (512, 3072, False),
        "360° 512x4096": (512, 4096, True),
        "tall 2048x512": (2048, 512, False),
    }
    assert preset_sizes(64)["wide 64x256"] == (64, 256, False)


def rgba_layer(height=16, width=32):
    """An unpainted layer of the regions canvas as the page sends it: RGBA, colour and opacity 0."""
    return np.zeros((height, width, 4), np.uint8)


def test_the_regions_canvas_is_one_mask_per_painted_layer_its_opacity_exactly():
    first = rgba_layer()
    first[2:6, 3:9] = (230, 25, 75, 255)
    first[10, 20] = (230, 25, 75, 128)  # a soft brush edge stays soft
    second = rgba_layer()
    second[:, 30:] = (60, 180, 75, 1)
    second[0, 0] = (255, 255, 255, 0)  # a colour without opacity is no paint
    canvas = {"background": np.full((16, 32, 4), 255, np.uint8), "layers": [first, second, rgba_layer()]}

    regions = demo.canvas_regions(canvas, "  a red boat \n\n a green tree\n", 16, 32)

    expected_first = np.zeros((16, 32), np.float32)
    expected_first[2:6, 3:9] = 1.0
    expected_first[10, 20] = np.float32(128) / 255
    expected_second = np.zeros((16, 32), np.float32)
    expected_second[:, 30:] = np.float32(1) / 255
    assert regions["region_prompts"] == ["a red boat", "a green tree"]  # blank lines are no prompt
    first_mask, second_mask = regions["region_masks"]  # the trailing empty layer is no region
    assert first_mask.dtype == second_mask.dtype == np.float32
    assert np.array_equal(first_mask, expected_first) and np.array_equal(second_mask, expected_second)


def test_an_empty_regions_canvas_without_region_prompts_is_no_regions():
    blank = demo.blank_canvas(16, 32)
    assert blank["background"].size == (32, 16) and blank["layers"] == []
    assert demo.canvas_regions(blank, "", 16, 32) == {}
    assert demo.canvas_regions(None, None, 16, 32) == {}
    assert demo.canvas_regions({**blank, "layers": [rgba_layer(), rgba_layer()]}, " \n", 16, 32) == {}


def painted_layer(height=16, width=32):
    layer = rgba_layer(height, width)
    layer[4:8, 4:8] = (230, 25, 75, 255)
    return layer


@pytest.mark.parametrize(
    "layers, prompts, message",
    [
        ([rgba_layer()], "a red boat", "There is 1 region prompt but nothing is painted on the regions canvas"),
        ([painted_layer()], "", "The regions canvas has 1 painted layer but there are 0 region prompts"),
        (
            [painted_layer(), painted_layer()],
            "a red boat\na green tree\na house",
            "The regions canvas has 2 painted layers but there are 3 region prompts",
        ),
        (
            [rgba_layer(), painted_layer()],
            "a red boat\na green tree",
            "Layer 1 of the regions canvas is empty but layer 2 is painted",
        ),
        (
            [painted_layer(16, 64)],
            "a red boat",
            "The regions canvas is 16x64 pixels but the panorama is 16x32 (height x width)",
        ),
    ],
    ids=["prompt-without-paint", "paint-without-prompt", "more-prompts-than-layers", "empty-layer", "other-size"],
)
def test_regions_that_do_not_match_their_prompts_or_the_panorama_are_named(layers, prompts, message):
    with pytest.raises(demo.InputError) as caught:
        demo.canvas_regions({"background": None, "layers": layers, "composite": None}, prompts, 16, 32)
    assert demo._user_error(caught.value).startswith(message)


def test_without_gradio_the_command_says_how_to_install_before_loading(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    monkeypatch.setattr(demo, "load_pipeline", lambda *args, **kwargs: pytest.fail("loaded the model"))
    assert cli.main(["demo", "--model", "tiny", "--port", str(_free_port())]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "syncdiffusion[demo]" in err and err.startswith("syncdiffusion: error:")


def test_bad_port_is_a_one_line_error(capsys):
    assert cli.main(["demo", "--port", "70000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--port" in err and "70000" in err


def test_a_taken_port_is_a_one_line_error_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(demo, "load_pipeline", lambda *args, **kwargs: pytest.fail("loaded the model"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["demo", "--model", "tiny", "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--port {port}: cannot serve there" in err


# ----------------------------------------------------------------------------------------------------------------
# Generation, in process on the tiny pipeline: 64x128 (two views at stride 4), 3 steps, 2 synchronized
# ----------------------------------------------------------------------------------------------------------------


def generate(app, **overrides):
    """`app.generate` with the small settings above; returns its result and the progress reports."""
    reports = []
    arguments = {
        "prompt": "a photo of a lake",
        "height": 64,
        "width": 128,
        "steps": 3,
        "stride": 4,
        "sync_weight": 20.0,
        "sync_thres": 2,
        "progress": lambda done, total, label: reports.append((done, total, label)),
    }
    arguments.update(overrides)
    return app.generate(**arguments), reports


def test_comparison_is_the_pipeline_at_sync_weight_20_and_0_from_the_shown_random_seed(pipe):
    app = PanoramaDemo(pipe, "tiny")
    (sync_image, multi_image, seed, status), reports = generate(app, compare=True, random_seed=True)

    call = {
        "prompt": "a photo of a lake",
        "height": 64,
        "width": 128,
        "num_inference_steps": 3,
        "stride": 4,
        "sync_thres": 2,
        "view_batch_size": "auto",  # the demo's call is the command's (`prepare_call`)
    }
    reference_sync = pipe(**call, sync_weight=20.0, generator=generator(seed)).images[0]
    reference_multi = pipe(**call, sync_weight=0.0, generator=generator(seed)).images[0]
    # Same seed, same CPU, same arguments: bit-identical (measured: max difference 0).
    assert np.array_equal(pixels(sync_image), pixels(reference_sync))
    assert np.array_equal(pixels(multi_image), pixels(reference_multi))
    assert np.abs(pixels(sync_image).astype(int) - pixels(multi_image)).max() > 0, "synchronization changed nothing"
    assert sync_image.size == (128, 64)
    assert reports == [(i, 3, label) for label in ("MultiDiffusion", "SyncDiffusion") for i in (1, 2, 3)]
    assert f"seed {seed}" in status and "3/3 steps" in status and "128x64" in status


def test_stop_ends_the_run_after_the_current_step_and_the_next_run_is_whole(pipe):
    app = PanoramaDemo(pipe, "tiny")
    reports = []

    def stop_at_two(done, total, label):
        reports.append((done, label))
        if done == 2:
            app.stop()

    sync_image, multi_image, _, status = app.generate(
        "a photo of a lake", height=64, width=128, steps=3, stride=4, compare=True, progress=stop_at_two
    )
    assert sync_image is multi_image is None
    assert status.startswith("Stopped at step 2 of 3 (MultiDiffusion)")
    assert reports == [(1, "MultiDiffusion"), (2, "MultiDiffusion")], "the run went on, or SyncDiffusion started"

    # The stop request does not outlive its run; the scheduler is the one chosen.
    (sync_image, _, _, status), reports = generate(app, scheduler="dpm++")
    assert sync_image is not None and len(reports) == 3 and "3/3 steps" in status
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"


def test_bad_input_is_the_pipelines_one_line_message_before_any_step(pipe):
    app = PanoramaDemo(pipe, "tiny")
    with pytest.raises(ValueError) as caught:
        generate(app, width=BAD_WIDTH, progress=lambda *report: pytest.fail("a step ran"))
    assert demo._user_error(caught.value) == pipeline_message()
    assert "`width`" in pipeline_message() and f"but is {BAD_WIDTH}." in pipeline_message()

    with pytest.raises(demo.InputError) as caught:
        generate(app, seed=-1, random_seed=False)
    assert demo._user_error(caught.value).startswith("`seed` has to be a whole number in 0..4294967295")
    assert demo._user_error(TypeError("a bug")) is None  # bugs are not dressed up as input errors


class CallRecorded(Exception):
    """Raised by the recording `__call__` below: the test has what it needs, no denoising runs."""


def record_calls(pipe, monkeypatch):
    """Make `pipe`'s class record the keyword arguments of its calls instead of running (`CallRecorded`)."""
    calls = []
    original = type(pipe).__call__

    @functools.wraps(original)  # the call's defaults are read from the signature
    def record(self, **kwargs):
        calls.append({**kwargs, "vae_tiling": self.vae.use_tiling})
        raise CallRecorded

    monkeypatch.setattr(type(pipe), "__call__", record)
    return calls


@pytest.mark.parametrize("fits", [True, False], ids=["decode-fits", "decode-does-not-fit"])
def test_the_demo_asks_for_auto_view_batches_and_tiles_when_the_decode_does_not_fit(fits, pipe, monkeypatch):
    """The page's call is the command's: on a GPU, view batches sized by the pipeline ("auto", not the pipeline's
    default of one view per UNet call, ~5x slower on an H200) and the VAE tiled when the 360° preset's decode would
    not fit."""
    import torch

    from syncdiffusion_utils.calls import DECODE_ELEMENTS

    height, width = 64, 512  # the tiny model's 360° preset
    needed = DECODE_ELEMENTS * min(pipe.vae.config.block_out_channels) * height * width * 4
    free = int(needed / 0.8 * (1.5 if fits else 0.5))  # just above or below the decode at the 0.8 margin
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
    monkeypatch.setattr(type(pipe), "_execution_device", property(lambda self: torch.device("cuda")))
    calls = record_calls(pipe, monkeypatch)
    app = PanoramaDemo(pipe, "tiny")
    label = next(label for label in app.sizes if label.startswith("360°"))
    assert app.sizes[label] == (height, width, True)
    with pytest.raises(CallRecorded):
        app.generate("a lake", height=height, width=width, circular=True, steps=2, random_seed=False, seed=0)
    (call,) = calls
    assert call["view_batch_size"] == "auto"
    assert call["vae_tiling"] is not fits
    assert call["circular_padding"] is True and (call["height"], call["width"]) == (height, width)
    assert call["guidance_scale"] == 7.5 and call["stride"] == 8  # the class's defaults, for what was left out


def test_a_size_that_is_not_a_whole_number_is_an_input_error(pipe):
    app = PanoramaDemo(pipe, "tiny")
    with pytest.raises(demo.InputError) as caught:
        generate(app, width=100.5, progress=lambda *report: pytest.fail("a step ran"))
    assert demo._user_error(caught.value) == "`width` has to be a positive whole number of pixels, but is 100.5."


def test_space_app_loads_the_configured_model_once_and_builds_the_same_app(monkeypatch, pipe):
    # The app itself is built and served below; here, what app.py adds: its model, loaded once, in float32 on a CPU.
    calls = []
    monkeypatch.setattr(loading, "load_pipeline", lambda *args, **kwargs: calls.append(("load", args, kwargs)) or pipe)
    monkeypatch.setattr(demo, "build_app", lambda *args: calls.append(("build", args)) or "the app")
    monkeypatch.setenv("SYNCDIFFUSION_MODEL", "tiny")
    monkeypatch.setattr(sys, "path", list(sys.path))  # app.py may add the checkout to it
    space = runpy.run_path(str(ROOT / "demo" / "app.py"), run_name="space")  # not "__main__": builds, no launch
    assert calls == [("load", ("tiny",), {"fp16": False, "progress": False}), ("build", (pipe, "tiny"))]
    assert space["demo"] == "the app"


# ----------------------------------------------------------------------------------------------------------------
# FLUX.1 models: `--model tiny-flux` / SYNCDIFFUSION_MODEL=tiny-flux, in process
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_pipe():
    """`loading.load_pipeline("tiny-flux")`: the tiny random FLUX.1 with its 64-pixel window, as the demo loads it."""
    return loading.load_pipeline("tiny-flux", "cpu", progress=False)


FLUX_CALL = {"prompt": "a photo of a lake", "height": 64, "width": 128, "num_inference_steps": 3, "stride": 4}
FLUX_CALL.update(sync_thres=2, max_sequence_length=cli.TINY_MAX_SEQUENCE_LENGTH, view_batch_size="auto")


def test_a_flux_demo_generates_and_compares_as_the_flux_pipeline(flux_pipe):
    from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline

    app = PanoramaDemo(flux_pipe, "tiny-flux")
    assert app.flux and app.schedulers == ("keep",) and app.default_scheduler == "keep"
    assert app.window == 64 and app.default_steps == 10  # the tiny defaults (a real FLUX: 1024 and its 28)
    (sync_image, multi_image, seed, status), reports = generate(app, compare=True, random_seed=True)

    assert type(flux_pipe) is SyncDiffusionFluxPipeline
    assert type(flux_pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"  # kept: FLUX's own
    reference_sync = flux_pipe(**FLUX_CALL, sync_weight=20.0, generator=generator(seed)).images[0]
    reference_multi = flux_pipe(**FLUX_CALL, sync_weight=0.0, generator=generator(seed)).images[0]
    # Same seed, same CPU, same arguments: bit-identical (measured: max difference 0).
    assert np.array_equal(pixels(sync_image), pixels(reference_sync))
    assert np.array_equal(pixels(multi_image), pixels(reference_multi))
    assert not np.array_equal(pixels(sync_image), pixels(multi_image)), "synchronization changed nothing"
    assert reports == [(i, 3, label) for label in ("MultiDiffusion", "SyncDiffusion") for i in (1, 2, 3)]
    assert "3/3 steps" in status and "128x64" in status

    # True CFG with a negative prompt: the pipeline's true CFG.
    (cfg_image, _, _, _), _ = generate(
        app, negative_prompt="blurry", true_cfg_scale=3.0, sync_weight=0.0, random_seed=False, seed=seed
    )
    direct = flux_pipe(
        **FLUX_CALL, negative_prompt="blurry", true_cfg_scale=3.0, sync_weight=0.0, generator=generator(seed)
    ).images[0]
    assert np.array_equal(pixels(cfg_image), pixels(direct))
    assert not np.array_equal(pixels(cfg_image), pixels(multi_image)), "the negative prompt changed nothing"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"scheduler": "ddim"}, "`scheduler` has to be one of keep for this model (FLUX runs its own flow-matching"),
        ({"negative_prompt": "blurry"}, "FLUX uses the negative prompt only with true CFG"),
        ({"negative_prompt": "blurry", "true_cfg_scale": 1.0}, "FLUX uses the negative prompt only with true CFG"),
        ({"true_cfg_scale": 4.0}, "A true CFG scale of 4 needs a negative prompt"),
    ],
)
def test_a_flux_demo_refuses_what_flux_does_not_run_before_any_step(flux_pipe, overrides, message):
    app = PanoramaDemo(flux_pipe, "tiny-flux")
    with pytest.raises(demo.InputError) as caught:
        generate(app, **overrides, progress=lambda *report: pytest.fail("a step ran"))
    assert demo._user_error(caught.value).startswith(message)


def test_an_sd_demo_refuses_a_true_cfg_scale(pipe):
    with pytest.raises(demo.InputError, match="`true_cfg_scale` is FLUX's"):
        generate(PanoramaDemo(pipe, "tiny"), true_cfg_scale=2.0, progress=lambda *report: pytest.fail("a step ran"))


def page_controls(app):
    """`{elem_id: props}` of the page's components that have an elem_id."""
    return {c["props"]["elem_id"]: c["props"] for c in app.config["components"] if c.get("props", {}).get("elem_id")}


def generate_endpoint(app):
    return next(fn for fn in app.fns.values() if fn.api_name == "generate")


def test_a_flux_page_hides_the_scheduler_and_adds_the_true_cfg_scale(flux_pipe, pipe):
    _require("gradio")
    flux_page = demo.build_app(flux_pipe, "tiny-flux")
    controls = page_controls(flux_page)
    assert controls["scheduler"]["visible"] is False and [c[0] for c in controls["scheduler"]["choices"]] == ["keep"]
    assert controls["true-cfg-scale"]["visible"] is not False and controls["true-cfg-scale"]["value"] == 1.0
    assert controls["guidance"]["value"] == 3.5 and controls["height"]["step"] == 16  # FLUX's 2x2 latent patches
    assert len(generate_endpoint(flux_page).inputs) == len(API_ARGUMENTS) + 5
    names = [p["parameter_name"] for p in flux_page.get_api_info()["named_endpoints"]["/generate"]["parameters"]]
    assert names == [*API_ARGUMENTS, "true_cfg_scale", "region_prompts", "regions", "photo", "photo_position"]

    sd_page = demo.build_app(pipe, "tiny")
    controls = page_controls(sd_page)
    assert "true-cfg-scale" not in controls and controls["scheduler"]["visible"] is not False
    assert len(generate_endpoint(sd_page).inputs) == len(API_ARGUMENTS) + 4  # the regions and the photo (below)


def test_the_space_app_serves_tiny_flux_end_to_end(monkeypatch):
    """SYNCDIFFUSION_MODEL=tiny-flux: app.py loads the FLUX class (for real) and its page generates."""
    _require("gradio")
    monkeypatch.setenv("SYNCDIFFUSION_MODEL", "tiny-flux")
    monkeypatch.setattr(sys, "path", list(sys.path))
    space = runpy.run_path(str(ROOT / "demo" / "app.py"), run_name="space")
    assert type(space["pipe"]).__name__ == "SyncDiffusionFluxPipeline"
    app = space["demo"].panorama_demo
    (sync_image, _, seed, status), reports = generate(app, random_seed=False, seed=5)
    assert sync_image.size == (128, 64) and pixels(sync_image).std() > 5 and len(reports) == 3
    assert seed == 5 and "3/3 steps" in status


def test_the_demo_command_loads_a_flux_model_and_builds_its_page(monkeypatch, flux_pipe):
    _require("gradio")
    served = []
    monkeypatch.setattr(demo, "load_pipeline", lambda model, *args, **kwargs: served.append(model) or flux_pipe)
    monkeypatch.setattr(demo, "launch", lambda app, **kwargs: served.append(app))
    assert cli.main(["demo", "--model", "tiny-flux", "--port", str(_free_port())]) == 0
    model, app = served
    assert model == "tiny-flux" and app.panorama_demo.flux and app.panorama_demo.pipe is flux_pipe


# ----------------------------------------------------------------------------------------------------------------
# FLUX.2 [klein] and Z-Image: `--model tiny-flux2` and `--model tiny-z-image`, in process
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def klein_pipe():
    """`loading.load_pipeline("tiny-flux2")`: the tiny random FLUX.2 [klein] base model (classifier-free guidance)
    with its 64-pixel window, as the demo loads it."""
    return loading.load_pipeline("tiny-flux2", "cpu", progress=False)


@pytest.fixture(scope="module")
def z_image_pipe():
    """`loading.load_pipeline("tiny-z-image")`: the tiny random Z-Image with its 64-pixel window."""
    return loading.load_pipeline("tiny-z-image", "cpu", progress=False)


@pytest.fixture(scope="module")
def distilled_klein_pipe(klein_pipe):
    """The tiny FLUX.2 [klein] as a step-distilled model (`is_distilled`, as klein-4B and -9B): the same weights."""
    from pipeline_syncdiffusion_flux2 import SyncDiffusionFlux2KleinPipeline

    pipe = SyncDiffusionFlux2KleinPipeline(**klein_pipe.components, is_distilled=True)
    pipe.default_sample_size = klein_pipe.default_sample_size  # the tiny window
    pipe.set_perceptual_loss(klein_pipe.perceptual_loss(klein_pipe.device))
    pipe.set_progress_bar_config(disable=True)
    return pipe


TRANSFORMERS = [("tiny-flux2", "klein_pipe"), ("tiny-z-image", "z_image_pipe")]


@pytest.mark.parametrize("model, fixture", TRANSFORMERS)
def test_a_klein_or_z_image_demo_generates_and_compares_as_its_pipeline(model, fixture, request):
    """The demo's runs are the pipeline's own calls with the class's guidance (klein 4.0, Z-Image 5.0: both on) and
    the empty negative prompt; a negative prompt goes with that guidance; Z-Image's CFG normalization and truncation
    reach its call. Same seed, same CPU, same arguments: bit-identical (measured: max difference 0)."""
    pipe = request.getfixturevalue(fixture)
    app = PanoramaDemo(pipe, model)
    assert app.family == {"tiny-flux2": demo.FLUX2_KLEIN, "tiny-z-image": demo.Z_IMAGE}[model] and not app.flux
    assert app.schedulers == ("keep",) and app.default_scheduler == "keep" and not app.extends_photos
    assert app.window == 64 and app.default_steps == 10  # the tiny defaults (the real models: 1024 and theirs)
    assert app.default_guidance == {"tiny-flux2": 4.0, "tiny-z-image": 5.0}[model]  # the class's
    (sync_image, multi_image, seed, status), reports = generate(app, compare=True, random_seed=True)

    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"  # kept: the model's own
    for made, weight in ((sync_image, 20.0), (multi_image, 0.0)):
        direct = pipe(**FLUX_CALL, sync_weight=weight, generator=generator(seed)).images[0]
        assert np.array_equal(pixels(made), pixels(direct))
    assert not np.array_equal(pixels(sync_image), pixels(multi_image)), "synchronization changed nothing"
    assert reports == [(i, 3, label) for label in ("MultiDiffusion", "SyncDiffusion") for i in (1, 2, 3)]
    assert "3/3 steps" in status and "128x64" in status

    guided = {"negative_prompt": "blurry", "guidance": 3.0}
    direct_guided = {"negative_prompt": "blurry", "guidance_scale": 3.0}
    if model == "tiny-z-image":
        guided.update(cfg_normalization=True, cfg_truncation=0.1)
        direct_guided.update(cfg_normalization=True, cfg_truncation=0.1)
    (image, _, _, _), _ = generate(app, **guided, sync_weight=0.0, random_seed=False, seed=seed)
    direct = pipe(**FLUX_CALL, **direct_guided, sync_weight=0.0, generator=generator(seed)).images[0]
    assert np.array_equal(pixels(image), pixels(direct))
    assert not np.array_equal(pixels(image), pixels(multi_image)), "the negative prompt changed nothing"


def test_z_image_page_values_reach_its_call_and_turbo_starts_without_guidance(z_image_pipe, monkeypatch):
    calls = record_calls(z_image_pipe, monkeypatch)
    with pytest.raises(CallRecorded):
        generate(PanoramaDemo(z_image_pipe, "tiny-z-image"), cfg_normalization=False, cfg_truncation=0.25)
    # Z-Image-Turbo, known by its name: its 8 steps and guidance 0 by default, 4 of them synchronized.
    turbo = PanoramaDemo(z_image_pipe, "Tongyi-MAI/Z-Image-Turbo")
    assert (turbo.default_steps, turbo.default_guidance, turbo.default_sync_thres) == (8, 0.0, 4)
    with pytest.raises(CallRecorded):
        turbo.generate("a lake", height=64, width=128, random_seed=False, seed=0)
    page, turbo_call = calls
    assert (page["cfg_normalization"], page["cfg_truncation"], page["guidance_scale"]) == (False, 0.25, 5.0)
    assert page["max_sequence_length"] == cli.TINY_MAX_SEQUENCE_LENGTH
    assert (turbo_call["num_inference_steps"], turbo_call["guidance_scale"], turbo_call["sync_thres"]) == (8, 0.0, 4)
    assert "cfg_normalization" not in turbo_call and turbo_call["max_sequence_length"] == 512  # the class's
    assert PanoramaDemo(z_image_pipe, "Tongyi-MAI/Z-Image").default_steps == 50  # not Turbo: the class's


def test_a_step_distilled_klein_runs_without_guidance_and_hides_it(distilled_klein_pipe, klein_pipe):
    """klein-4B and -9B (`is_distilled`): 4 steps, 2 synchronized, guidance 1 (off; a larger one it would ignore
    with a warning); the page shows neither the guidance scale nor the negative prompt."""
    real = PanoramaDemo(distilled_klein_pipe, "black-forest-labs/FLUX.2-klein-4B")
    assert real.distilled and (real.default_steps, real.default_guidance, real.default_sync_thres) == (4, 1.0, 2)
    assert not PanoramaDemo(klein_pipe, "black-forest-labs/FLUX.2-klein-base-4B").distilled
    assert PanoramaDemo(klein_pipe, "black-forest-labs/FLUX.2-klein-base-4B").default_steps == 50

    app = PanoramaDemo(distilled_klein_pipe, "tiny-flux2")
    (image, _, seed, _), _ = generate(app, sync_weight=0.0, random_seed=False, seed=6)
    direct = distilled_klein_pipe(**FLUX_CALL, guidance_scale=1.0, sync_weight=0.0, generator=generator(6))
    assert np.array_equal(pixels(image), pixels(direct.images[0]))
    guided = klein_pipe(**FLUX_CALL, sync_weight=0.0, generator=generator(6)).images[0]  # the same weights, CFG 4
    assert not np.array_equal(pixels(image), pixels(guided)), "the distilled model ran guidance"

    _require("gradio")
    controls = page_controls(demo.build_app(distilled_klein_pipe, "tiny-flux2"))
    assert controls["guidance"]["visible"] is False and controls["guidance"]["value"] == 1.0
    assert controls["negative-prompt"]["visible"] is False


@pytest.mark.parametrize(
    "fixture, overrides, message",
    [
        ("klein_pipe", {"scheduler": "ddim"}, "`scheduler` has to be one of keep for this model (FLUX.2 [klein] runs"),
        (
            "klein_pipe",
            {"negative_prompt": "blurry", "guidance": 1.0},
            "FLUX.2 [klein] uses the negative prompt only with guidance: set the guidance scale above 1 (e.g. 4)",
        ),
        ("klein_pipe", {"true_cfg_scale": 2.0}, "`true_cfg_scale` is FLUX's (true classifier-free guidance)"),
        ("klein_pipe", {"cfg_truncation": 0.5}, "`cfg_truncation` is Z-Image's (the time after which guidance"),
        (
            "distilled_klein_pipe",
            {"negative_prompt": "blurry"},
            "This FLUX.2 [klein] model is step-distilled: it runs without guidance and ignores a negative prompt",
        ),
        (
            "distilled_klein_pipe",
            {"guidance": 4.0},
            "This FLUX.2 [klein] model is step-distilled: it runs without guidance, so `guidance_scale` has to be at"
            " most 1 (off), but is 4.",
        ),
        (
            "z_image_pipe",
            {"negative_prompt": "blurry", "guidance": 0.0},
            "Z-Image uses the negative prompt only with guidance: set the guidance scale above 0 (e.g. 5)",
        ),
        ("z_image_pipe", {"true_cfg_scale": 2.0}, "`true_cfg_scale` is FLUX's"),
        ("z_image_pipe", {"scheduler": "euler"}, "`scheduler` has to be one of keep for this model (Z-Image runs"),
        ("pipe", {"cfg_normalization": True}, "`cfg_normalization` is Z-Image's (a bound on the guided velocity's"),
    ],
)
def test_a_klein_or_z_image_demo_refuses_what_its_model_would_ignore_before_any_step(
    fixture, overrides, message, request
):
    models = {"klein_pipe": "tiny-flux2", "distilled_klein_pipe": "tiny-flux2", "z_image_pipe": "tiny-z-image"}
    app = PanoramaDemo(request.getfixturevalue(fixture), models.get(fixture, "tiny"))
    with pytest.raises(demo.InputError) as caught:
        generate(app, **overrides, progress=lambda *report: pytest.fail("a step ran"))
    assert demo._user_error(caught.value).startswith(message)


@pytest.mark.parametrize("model, fixture", TRANSFORMERS)
def test_a_klein_or_z_image_page_has_its_guidance_no_scheduler_and_no_photo(model, fixture, request, monkeypatch):
    """The page builds: presets of its 64-pixel window, sizes in steps of 16, the scheduler hidden, its guidance
    (klein: on above 1; Z-Image: on above 0, with CFG normalization and truncation, which its API takes after
    `compare`), no "Extend a photo" (klein's `image` is its reference images, Z-Image has none)."""
    _require("gradio")
    pipe = request.getfixturevalue(fixture)
    page = demo.build_app(pipe, model)
    controls = page_controls(page)
    assert controls["scheduler"]["visible"] is False and controls["height"]["step"] == 16
    assert controls["regions"]["canvas_size"] == [256, 64]  # the default "wide 64x256"
    assert controls["extend-photo"]["visible"] is False and "true-cfg-scale" not in controls
    assert controls["guidance"]["visible"] is not False and controls["negative-prompt"]["visible"] is not False
    names = [p["parameter_name"] for p in page.get_api_info()["named_endpoints"]["/generate"]["parameters"]]
    if model == "tiny-flux2":
        assert (controls["guidance"]["minimum"], controls["guidance"]["value"]) == (1, 4.0)
        assert "cfg-normalization" not in controls
        assert names == [*API_ARGUMENTS, "region_prompts", "regions", "photo", "photo_position"]
    else:
        assert (controls["guidance"]["minimum"], controls["guidance"]["value"]) == (0, 5.0)
        assert controls["cfg-normalization"]["value"] is False and controls["cfg-truncation"]["value"] == 1.0
        cfg = ["cfg_normalization", "cfg_truncation"]
        assert names == [*API_ARGUMENTS, *cfg, "region_prompts", "regions", "photo", "photo_position"]

    with pytest.raises(demo.InputError) as caught:  # the photo never becomes klein's reference image
        generate(page.panorama_demo, photo=make_photo(), progress=lambda *report: pytest.fail("a step ran"))
    assert demo._user_error(caught.value).startswith(f"This model ({type(pipe).__name__}) cannot extend a photo")

    # The page's values, by position as Gradio passes them, reach the call where they belong.
    calls = record_calls(pipe, monkeypatch)
    values = {**API_ARGUMENTS, "negative_prompt": "blurry", "scheduler": "keep", "guidance": 3.0, "sync_thres": 2}
    if model == "tiny-z-image":
        values.update(cfg_normalization=True, cfg_truncation=0.5)
    with pytest.raises(CallRecorded):
        generate_endpoint(page).fn(*values.values(), "", None)  # no region prompts, no canvas
    (call,) = calls
    assert (call["prompt"], call["negative_prompt"], call["guidance_scale"]) == ("a photo of a lake", "blurry", 3.0)
    assert (call["height"], call["width"], call["num_inference_steps"], call["sync_thres"]) == (64, 256, 4, 2)
    if model == "tiny-z-image":
        assert (call["cfg_normalization"], call["cfg_truncation"]) == (True, 0.5)
    else:
        assert "cfg_normalization" not in call and "image" not in call


@pytest.mark.parametrize("model, fixture", TRANSFORMERS)
def test_the_demo_command_loads_a_klein_or_z_image_model_and_builds_its_page(model, fixture, request, monkeypatch):
    _require("gradio")
    pipe = request.getfixturevalue(fixture)
    served = []
    monkeypatch.setattr(demo, "load_pipeline", lambda name, *args, **kwargs: served.append(name) or pipe)
    monkeypatch.setattr(demo, "launch", lambda app, **kwargs: served.append(app))
    assert cli.main(["demo", "--model", model, "--port", str(_free_port())]) == 0
    name, app = served
    assert name == model and app.panorama_demo.pipe is pipe and app.panorama_demo.family is not None


# ----------------------------------------------------------------------------------------------------------------
# Regions: the canvas's painted layers and their prompts, in process (SD, SDXL and FLUX.1)
# ----------------------------------------------------------------------------------------------------------------


def two_regions(height=64, width=128):
    """A regions canvas with two painted layers: a square at the left (opaque) and a band at the right (half)."""
    left, right = rgba_layer(height, width), rgba_layer(height, width)
    left[16:48, 8:40] = (230, 25, 75, 255)
    right[:, 80:120] = (60, 180, 75, 128)
    return {"background": None, "layers": [left, right], "composite": None}


def region_masks(canvas):
    return [layer[..., 3].astype(np.float32) / 255 for layer in canvas["layers"]]


@pytest.fixture(scope="module")
def xl_pipe():
    """`loading.load_pipeline("tiny-xl")`: the tiny random SDXL, as the demo loads it."""
    return loading.load_pipeline("tiny-xl", "cpu", progress=False)


@pytest.mark.parametrize(
    "model, fixture", [("tiny", "pipe"), ("tiny-xl", "xl_pipe"), ("tiny-flux", "flux_pipe"), *TRANSFORMERS]
)
def test_painted_regions_reach_the_pipeline_of_every_class_the_demo_serves(model, fixture, request):
    pipe = request.getfixturevalue(fixture)
    app = PanoramaDemo(pipe, model)
    canvas = two_regions()
    (image, _, seed, status), reports = generate(
        app, region_prompts="a red boat\na green tree", regions=canvas, random_seed=False, seed=4
    )

    call = dict(FLUX_CALL)  # the small call of `generate`
    if not app.takes_max_sequence_length:  # SD, SDXL
        del call["max_sequence_length"]
    direct = pipe(
        **call,
        sync_weight=20.0,
        region_prompts=["a red boat", "a green tree"],
        region_masks=region_masks(canvas),
        generator=generator(seed),
    ).images[0]
    # Same seed, same CPU, same arguments: bit-identical; a demo that dropped the regions would differ (they change
    # the panorama: the browser test below).
    assert np.array_equal(pixels(image), pixels(direct))
    assert "2 regions" in status and len(reports) == 3


def test_the_regions_canvas_is_the_panoramas_size_and_a_new_size_clears_it(pipe):
    import gradio as gr

    page = demo.build_app(pipe, "tiny")
    regions = page_controls(page)["regions"]
    assert regions["canvas_size"] == [256, 64] and regions["value"]["layers"] == []  # the default "wide 64x256"
    assert regions["sources"] == [] and regions["transforms"] == []  # no upload or crop: the canvas keeps its shape
    names = [p["parameter_name"] for p in page.get_api_info()["named_endpoints"]["/generate"]["parameters"]]
    assert names == [*API_ARGUMENTS, "region_prompts", "regions", "photo", "photo_position"]

    fit_canvas = next(fn.fn for fn in page.fns.values() if fn.fn.__name__ == "fit_canvas")  # height's and width's
    update = fit_canvas(64.0, 384.0)
    assert update["canvas_size"] == (384, 64) and update["value"]["layers"] == []
    assert update["value"]["background"].size == (384, 64)
    assert fit_canvas(64, None) == fit_canvas(0, 128) == gr.skip()  # not a size yet: the canvas stays


def test_an_empty_canvas_calls_the_pipeline_as_without_regions(pipe, monkeypatch):
    calls = record_calls(pipe, monkeypatch)
    app = PanoramaDemo(pipe, "tiny")
    for canvas in (None, demo.blank_canvas(64, 128), {**two_regions(), "layers": [rgba_layer(64, 128)]}):
        with pytest.raises(CallRecorded):
            generate(app, regions=canvas, region_prompts="\n")
    assert len(calls) == 3 and not any(key.startswith("region") for call in calls for key in call)


def test_regions_that_do_not_match_are_an_input_error_before_any_step(pipe):
    app = PanoramaDemo(pipe, "tiny")
    with pytest.raises(demo.InputError) as caught:
        generate(app, regions=two_regions(), region_prompts="a red boat", progress=lambda *report: pytest.fail("ran"))
    assert demo._user_error(caught.value).startswith(
        "The regions canvas has 2 painted layers but there is 1 region prompt: type one prompt per painted layer"
    )


# ----------------------------------------------------------------------------------------------------------------
# Extend a photo: the uploaded photo, placed by `place_photo`, as the pipeline's `image` and `mask_image`
# ----------------------------------------------------------------------------------------------------------------


def make_photo(width=48, height=32):
    """A small picture with something in every column: a colour gradient, a yellow disc and a blue bar."""
    from PIL import ImageDraw

    rows, columns = np.mgrid[0:height, 0:width]
    red, green = columns * 255 // (width - 1), rows * 255 // (height - 1)
    blue = 255 - (rows + columns) * 255 // (width + height)
    photo = Image.fromarray(np.stack([red, green, blue], axis=-1).astype(np.uint8))
    draw = ImageDraw.Draw(photo)
    draw.ellipse((width // 4, height // 4, width // 2, height * 3 // 4), fill=(255, 230, 0))
    draw.rectangle((width * 3 // 4, 2, width * 3 // 4 + 3, height - 3), fill=(20, 20, 160))
    return photo


def kept_columns(mask_image):
    """The columns `mask_image` keeps (black from top to bottom)."""
    return np.flatnonzero((np.asarray(mask_image) == 0).all(axis=0)).tolist()


def comparable(call):
    """A recorded call without its per-call objects (the generator, compared by its seed, and the step callback)."""
    return {name: value for name, value in call.items() if name not in ("generator", "callback_on_step_end")}


def test_only_classes_that_take_image_and_mask_image_extend_photos():
    from pipeline_syncdiffusion import SyncDiffusionPipeline
    from pipeline_syncdiffusion_controlnet import SyncDiffusionControlNetPipeline
    from pipeline_syncdiffusion_flux2 import SyncDiffusionFlux2KleinPipeline
    from pipeline_syncdiffusion_z_image import SyncDiffusionZImagePipeline

    assert demo.extends_photos(SyncDiffusionPipeline)
    assert not demo.extends_photos(SyncDiffusionControlNetPipeline)  # its `image` is the condition
    assert not demo.extends_photos(SyncDiffusionFlux2KleinPipeline)  # its `image` is its reference images
    assert not demo.extends_photos(SyncDiffusionZImagePipeline)


# A 48x32 photo on the 64x128 panorama of `generate`: scaled to 96x64, 32 columns free.
@pytest.mark.parametrize("position, left", [("left", 0), ("center", 16), ("right", 32)])
def test_an_uploaded_photo_reaches_the_pipeline_as_place_photos_image_and_mask(position, left, pipe, monkeypatch):
    from syncdiffusion_utils.outpainting import place_photo

    calls = record_calls(pipe, monkeypatch)
    app = PanoramaDemo(pipe, "tiny")
    photo = make_photo()
    settings = {
        "negative_prompt": "blurry",
        "guidance": 6.0,
        "sync_weight": 12.5,
        "sync_thres": 3,
        "sync_mode": "fast",
    }
    for extra in ({}, {"photo": photo, "photo_position": position}):
        with pytest.raises(CallRecorded):
            generate(app, **settings, **extra, random_seed=False, seed=7)
    text_call, photo_call = calls

    image, mask_image = place_photo(photo, 64, 128, position=position)
    assert photo_call["image"].size == photo_call["mask_image"].size == (128, 64)
    assert np.array_equal(pixels(photo_call.pop("image")), pixels(image))
    assert np.array_equal(np.asarray(photo_call["mask_image"]), np.asarray(mask_image))
    assert kept_columns(photo_call.pop("mask_image")) == list(range(left, left + 96))
    # Everything else is the text mode's call: the settings, the size, the seed.
    assert comparable(photo_call) == comparable(text_call)
    assert photo_call["generator"].initial_seed() == text_call["generator"].initial_seed() == 7
    assert (photo_call["sync_weight"], photo_call["sync_thres"], photo_call["sync_mode"]) == (12.5, 3, "fast")
    assert photo_call["negative_prompt"] == "blurry" and photo_call["guidance_scale"] == 6.0


def test_a_360_panorama_places_the_photo_for_the_seam_and_regions_come_with_the_photo(pipe, monkeypatch):
    from syncdiffusion_utils.outpainting import place_photo

    calls = record_calls(pipe, monkeypatch)
    app = PanoramaDemo(pipe, "tiny")
    photo, canvas = make_photo(), two_regions()
    with pytest.raises(CallRecorded):
        generate(app, circular=True, photo=photo, photo_position="right", regions=canvas, region_prompts="a\nb")
    (call,) = calls

    seam, flat = place_photo(photo, 64, 128, "right", circular=True), place_photo(photo, 64, 128, "right")
    assert call["circular_padding"] is True
    assert np.array_equal(pixels(call["image"]), pixels(seam[0]))
    assert not np.array_equal(pixels(seam[0]), pixels(flat[0])), "the 360° fill is the flat one: no test"
    assert np.array_equal(np.asarray(call["mask_image"]), np.asarray(seam[1]))
    assert call["region_prompts"] == ["a", "b"] and len(call["region_masks"]) == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"photo_position": "top"}, "`photo_position` has to be one of left, center, right, but is 'top'."),
        ({"photo_position": None}, "`photo_position` has to be one of left, center, right, but is None."),
        (
            {"photo": "wide"},  # replaced by a 200x64 photo: 200 pixels wide on the 128-pixel panorama
            "`photo` is 200x64 pixels (width x height): scaled to the panorama's height 64 it is 200 pixels wide",
        ),
    ],
    ids=["unknown-position", "no-position", "photo-too-wide"],
)
def test_a_bad_photo_or_position_is_an_input_error_before_any_step(overrides, message, pipe):
    if overrides.get("photo") == "wide":
        overrides = {**overrides, "photo": make_photo(200, 64)}
    app = PanoramaDemo(pipe, "tiny")
    with pytest.raises(demo.InputError) as caught:
        generate(app, **overrides, progress=lambda *report: pytest.fail("a step ran"))
    assert demo._user_error(caught.value).startswith(message)


@pytest.mark.parametrize("model, fixture", [("tiny", "pipe"), ("tiny-xl", "xl_pipe"), ("tiny-flux", "flux_pipe")])
def test_extending_a_photo_is_the_pipelines_own_call_for_every_class_the_demo_serves(model, fixture, request):
    """SD, SDXL and FLUX.1 take `image` and `mask_image`: their pages show "Extend a photo", and the demo generates
    and compares from the placed photo bit-identically to their direct calls."""
    from syncdiffusion_utils.outpainting import place_photo

    pipe = request.getfixturevalue(fixture)
    app = PanoramaDemo(pipe, model)
    assert app.extends_photos
    page = page_controls(demo.build_app(pipe, model))
    assert page["extend-photo"]["visible"] is not False
    assert page["photo-position"]["value"] == "center" and page["photo"]["sources"] == ["upload", "clipboard"]
    photo = make_photo()
    (sync_image, multi_image, seed, status), reports = generate(
        app, photo=photo, photo_position="right", compare=True, random_seed=False, seed=4
    )
    image, mask_image = place_photo(photo, 64, 128, position="right")
    call = dict(FLUX_CALL, image=image, mask_image=mask_image)  # the small call of `generate`
    if not app.flux:
        del call["max_sequence_length"]
    # Same seed, same CPU, same arguments: bit-identical (measured: max difference 0), MultiDiffusion too.
    for made, weight in ((sync_image, 20.0), (multi_image, 0.0)):
        direct = pipe(**call, sync_weight=weight, generator=generator(seed)).images[0]
        assert np.array_equal(pixels(made), pixels(direct))
    # Every step of both runs reported (SDXL's inpainting strength is diffusers' 0.9999: 2 of the 3 steps run).
    total = pipe.num_timesteps
    assert reports == [(i, total, label) for label in ("MultiDiffusion", "SyncDiffusion") for i in range(1, total + 1)]
    assert f"{total}/{total} steps, 128x64 pixels, seed 4, photo at the right," in status


def test_a_class_without_mask_image_refuses_a_photo_and_hides_extend_a_photo(pipe):
    """The ControlNet class (its `image` is the condition, it has no `mask_image`): the photo is an input error
    before any step, and the page has no "Extend a photo"."""
    _require("gradio")
    controlnet_pipe = loading.with_controlnet(pipe, "tiny")
    app = PanoramaDemo(controlnet_pipe, "tiny")
    assert not app.extends_photos
    with pytest.raises(demo.InputError) as caught:
        generate(app, photo=make_photo(), progress=lambda *report: pytest.fail("a step ran"))
    assert demo._user_error(caught.value).startswith(
        "This model (SyncDiffusionControlNetPipeline) cannot extend a photo: its pipeline takes no `image` and"
    )
    assert page_controls(demo.build_app(controlnet_pipe, "tiny"))["extend-photo"]["visible"] is False


# ----------------------------------------------------------------------------------------------------------------
# The served app: `python -m syncdiffusion_utils.cli demo --model tiny` on 127.0.0.1
# ----------------------------------------------------------------------------------------------------------------


def _require(module):
    """Import `module`, or skip (fail under CI, which installs everything: a skip there would hide a broken setup)."""
    try:
        return __import__(module)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _fetch(url, timeout=10):
    """GET a local URL, ignoring any proxy settings."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        return response.read()


def _wait(condition, timeout, what, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module", autouse=True)
def demo_process(tmp_path_factory):
    """The real command serving the tiny model on a free port, started with the module's first test so that its
    start (imports, model) overlaps the in-process tests; stopped after the module's last test."""
    if importlib.util.find_spec("gradio") is None:  # (importing it here would cost seconds)
        yield None
        return
    folder = tmp_path_factory.mktemp("demo-server")
    port = _free_port()
    env = {
        **os.environ,
        "GRADIO_TEMP_DIR": str(folder / "gradio"),  # the served images, removed with the folder
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # see conftest's one_thread
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "syncdiffusion_utils.cli", "demo", "--model", "tiny", "--port", str(port)]
    log_path = folder / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        yield SimpleNamespace(process=process, url=f"http://127.0.0.1:{port}/", log=log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def server(demo_process):
    """`demo_process` once it answers HTTP."""
    _require("gradio")

    def serving():
        if demo_process.process.poll() is not None:
            pytest.fail(f"the demo exited with {demo_process.process.returncode}:\n{demo_process.log.read_text()}")
        with contextlib.suppress(OSError):
            return _fetch(demo_process.url, timeout=2)

    _wait(serving, 120, f"the demo to serve {demo_process.url}", interval=0.5)
    return demo_process


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Debian's headless Chromium, resolving no host but 127.0.0.1 (nothing leaves the machine)."""
    _require("selenium")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs the chromium and chromium-driver packages")
        pytest.skip("no system Chromium: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _type(driver, selector, text):
    """Replace the text of the field under `selector` as a person would (select all, type, leave the field)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    # A field inside a panel that just opened renders a moment later (longer on a loaded machine).
    field = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, selector), 30, selector)[0]
    field.click()
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(text, Keys.TAB)


def _text(driver, selector):
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return found[0].text if found else ""


def _served_image(driver, selector):
    """The image shown under `selector`, downloaded from its download link (the full-resolution PNG)."""
    from selenium.webdriver.common.by import By

    shown = driver.find_element(By.CSS_SELECTOR, f"{selector} img").get_attribute("src")
    download = driver.find_element(By.CSS_SELECTOR, f"{selector} a[download]").get_attribute("href")
    assert download == shown
    path = Path(download.split("file=", 1)[1])
    image = Image.open(io.BytesIO(_fetch(download)))
    assert image.format == "PNG"
    return image, path


def _screenshot(driver, path):
    """A PNG of the whole page, below the window's bottom too (Chromium's DevTools protocol)."""
    width, height = driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
    )
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {"captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}},
    )
    Path(path).write_bytes(base64.b64decode(shot["data"]))


# Records every text the progress bars show: a run on the tiny model lasts a second or two, too short to poll.
RECORD_PROGRESS = """
window.progressSeen = [];
new MutationObserver(() => {
  for (const bar of document.querySelectorAll('.progress-text')) window.progressSeen.push(bar.textContent.trim());
}).observe(document.body, {subtree: true, childList: true, characterData: true});
"""


def test_in_a_browser_generate_compare_bad_input_and_stop(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(server.url)
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#generate button, button#generate"), 60, "the page")
    driver.execute_script(RECORD_PROGRESS)

    _type(driver, "#prompt textarea", "a photo of a lake at dawn")
    driver.find_element(By.XPATH, "//button[contains(., 'Settings')]").click()
    _type(driver, "#steps input[type=number]", "4")
    driver.find_element(By.CSS_SELECTOR, "#compare input").click()
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#baseline"), 10, "the MultiDiffusion image's box")
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    status = _wait(lambda: "steps" in _text(driver, "#status") and _text(driver, "#status"), 60, "the result")

    seed = driver.find_element(By.CSS_SELECTOR, "#seed input").get_attribute("value")
    assert status.startswith("MultiDiffusion and SyncDiffusion: 4/4 steps, 256x64 pixels") and f"seed {seed}" in status
    images = {}
    for selector in ("#result", "#baseline"):
        image, path = _served_image(driver, selector)
        assert image.size == (256, 64), f"{selector} is {image.size}, not the requested 256x64"
        images[selector] = pixels(image)
        assert str(path).startswith(str(Path(server.log).parent)), "served from outside the app's folder"
    assert images["#result"].std() > 5, "blank panorama"
    assert not np.array_equal(images["#result"], images["#baseline"])
    assert "4/4 steps" in " ".join(driver.execute_script("return window.progressSeen")), "progress never reached 4/4"
    _screenshot(driver, tmp_path / "compare.png")
    if os.environ.get("SYNCDIFFUSION_DEMO_SCREENSHOT"):
        shutil.copyfile(tmp_path / "compare.png", os.environ["SYNCDIFFUSION_DEMO_SCREENSHOT"])

    # Bad input: the pipeline's one-line message, in the page; typing a size switches the preset to "custom".
    _type(driver, "#width input", str(BAD_WIDTH))
    # The switch is a round trip to the server (the width's change event): wait for it, it can lag under load.
    _wait(
        lambda: driver.find_element(By.CSS_SELECTOR, "#size input[value=custom]").is_selected(),
        30,
        "the size preset to switch to custom",
    )
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    message = pipeline_message().replace("`", "")
    _wait(lambda: message in driver.find_element(By.TAG_NAME, "body").text.replace("`", ""), 30, "the error message")
    _screenshot(driver, tmp_path / "bad-input.png")

    # Stop: a long run ends at the step after the click, and says so.
    _type(driver, "#width input", "256")
    _type(driver, "#steps input[type=number]", "100")
    driver.execute_script("window.progressSeen = [];")
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    _wait(
        lambda: any("/100 steps" in text for text in driver.execute_script("return window.progressSeen")),
        60,
        "the long run to start",
    )
    driver.find_element(By.CSS_SELECTOR, "#stop").click()
    status = _wait(lambda: "Stopped" in _text(driver, "#status") and _text(driver, "#status"), 60, "the stop")
    assert status.startswith("Stopped at step") and "of 100 (MultiDiffusion)" in status
    _screenshot(driver, tmp_path / "stopped.png")


def _canvas_zoom(driver):
    """The zoom the regions canvas reports, e.g. "441%" (it fits the canvas to the editor)."""
    from selenium.webdriver.common.by import By

    (zoom,) = [span.text for span in driver.find_elements(By.CSS_SELECTOR, "#regions span") if span.text.endswith("%")]
    return zoom


def _paint(driver, canvas, panorama_size, points):
    """One brush stroke through `points` (`(column, row)` in the panorama's pixels) on the regions canvas, which the
    editor shows centred in its element at the zoom it reports; the brush paints the straight lines between them."""
    from selenium.webdriver.common.action_chains import ActionChains

    scale, (height, width) = float(_canvas_zoom(driver)[:-1]) / 100, panorama_size

    def offset(x, y):  # from the element's centre, in CSS pixels
        return round((x - width / 2) * scale), round((y - height / 2) * scale)

    (first, *others) = points
    stroke = ActionChains(driver, duration=10).move_to_element_with_offset(canvas, *offset(*first)).click_and_hold()
    for point in others:
        stroke.move_to_element_with_offset(canvas, *offset(*point))
    stroke.release().perform()


def _wait_for_message(driver, message, what):
    """Wait for an error message in the page, then close it as a person would (it stays, over the buttons)."""
    from selenium.webdriver.common.by import By

    _wait(lambda: message in driver.find_element(By.TAG_NAME, "body").text, 30, what)
    for close in driver.find_elements(By.CSS_SELECTOR, "[data-testid=toast-close]"):
        close.click()
    _wait(lambda: not driver.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]"), 10, f"{what} to close")


def test_in_a_browser_two_painted_regions_change_their_pixels(server, browser, tmp_path):
    """Two regions painted on two layers with the mouse (the tiny model's brush: a radius of 8 pixels), their prompts
    typed, generated from the seed of a run without them: inside each region the panorama changes several times more
    than between them (measured in process, seeds 0-7: the regions' mean change 6.7-16 levels, between them 1.5-2.2)."""
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(server.url)
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#generate button, button#generate"), 60, "the page")
    _type(driver, "#prompt textarea", "a photo of a lake")
    driver.find_element(By.XPATH, "//button[contains(., 'Settings')]").click()
    _type(driver, "#steps input[type=number]", "4")
    driver.find_element(By.CSS_SELECTOR, "#random-seed input").click()
    _type(driver, "#seed input", "3")
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    _wait(lambda: "seed 3" in _text(driver, "#status"), 60, "the panorama without regions")
    without, _ = _served_image(driver, "#result")

    driver.find_element(By.XPATH, "//button[contains(., 'Regions')]").click()
    canvas = _wait(
        lambda: [c for c in driver.find_elements(By.CSS_SELECTOR, "#regions canvas") if c.is_displayed()],
        30,
        "the regions canvas",
    )[0]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    size = (64, 256)  # the default preset, "wide 64x256"
    _paint(driver, canvas, size, [(16, 24), (80, 24), (80, 40), (16, 40)])  # layer 1: rows 16-47, columns 8-87
    driver.find_element(By.CSS_SELECTOR, "#regions button[aria-label='Show Layers']").click()
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#regions button[aria-label='Add Layer']"), 10, "Add Layer")
    driver.find_element(By.CSS_SELECTOR, "#regions button[aria-label='Add Layer']").click()
    _paint(driver, canvas, size, [(176, 24), (240, 24), (240, 40), (176, 40)])  # layer 2: columns 168-247

    # One prompt for two painted layers: the page names the mismatch and generates nothing.
    _type(driver, "#region-prompts textarea", "a red boat")
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    message = "The regions canvas has 2 painted layers but there is 1 region prompt"
    _wait_for_message(driver, message, "the mismatch's message")

    _type(driver, "#region-prompts textarea", "a red boat\na green tree")
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    status = _wait(lambda: "2 regions" in _text(driver, "#status") and _text(driver, "#status"), 60, "the regions")
    assert status.startswith("SyncDiffusion: 4/4 steps, 256x64 pixels, seed 3, 2 regions")
    with_regions, _ = _served_image(driver, "#result")

    change = np.abs(pixels(with_regions).astype(int) - pixels(without)).mean(axis=2)
    between = change[:, 112:144].mean()
    for name, inside in (("left", change[20:44, 24:72]), ("right", change[20:44, 184:232])):
        assert inside.mean() > 2 * between, f"the {name} region changed {inside.mean():.1f}, between {between:.1f}"

    # A new size clears the canvas (a round trip to the server: the canvas fits the wider panorama at a new zoom), and
    # the prompts are left without regions.
    zoom = _canvas_zoom(driver)
    driver.find_element(By.XPATH, "//label[contains(., 'wider 64x384')]").click()
    _wait(lambda: _canvas_zoom(driver) != zoom, 30, "the canvas to fit the new size")
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    message = "There are 2 region prompts but nothing is painted on the regions canvas"
    _wait_for_message(driver, message, "the cleared canvas's message")
    _screenshot(driver, tmp_path / "regions.png")  # last: its full-page capture resizes the editor for a moment


def test_in_a_browser_an_uploaded_photo_is_extended_at_the_chosen_position(server, browser, pipe, tmp_path):
    """A photo uploaded in "Extend a photo", placed at the right of the default 64x256 panorama: the served PNG is the
    pipeline's own call with `place_photo`'s image and mask from the same seed, computed here in process."""
    from selenium.webdriver.common.by import By

    from syncdiffusion_utils.loading import set_scheduler
    from syncdiffusion_utils.outpainting import place_photo

    photo = make_photo(48, 64)  # the panorama's height already: placed as it is, columns 208-255
    photo.save(tmp_path / "photo.png")
    driver = browser
    driver.get(server.url)
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#generate button, button#generate"), 60, "the page")
    _type(driver, "#prompt textarea", "a photo of a lake")
    driver.find_element(By.XPATH, "//button[contains(., 'Settings')]").click()
    _type(driver, "#steps input[type=number]", "4")
    driver.find_element(By.CSS_SELECTOR, "#random-seed input").click()
    _type(driver, "#seed input", "3")

    driver.find_element(By.XPATH, "//button[contains(., 'Extend a photo')]").click()
    upload = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"), 30, "the photo upload")
    upload[0].send_keys(str(tmp_path / "photo.png"))
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#photo img"), 30, "the uploaded photo's preview")
    driver.find_element(By.XPATH, "//*[@id='photo-position']//label[contains(., 'right')]").click()
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    status = _wait(lambda: "photo at" in _text(driver, "#status") and _text(driver, "#status"), 60, "the panorama")
    assert status.startswith("SyncDiffusion: 4/4 steps, 256x64 pixels, seed 3, photo at the right,")
    served, _ = _served_image(driver, "#result")
    _screenshot(driver, tmp_path / "extend-photo.png")

    image, mask_image = place_photo(photo, 64, 256, position="right")
    assert kept_columns(mask_image) == list(range(208, 256))
    set_scheduler(pipe, "ddim")  # the page's default scheduler, and its default settings below
    direct = pipe(
        "a photo of a lake",
        height=64,
        width=256,
        num_inference_steps=4,
        stride=8,
        guidance_scale=7.5,
        sync_weight=20.0,
        sync_thres=5,
        view_batch_size="auto",
        image=image,
        mask_image=mask_image,
        generator=generator(3),
    ).images[0]
    # The served process and this one: the same tiny weights, CPU, one thread (measured: max difference 0).
    difference = np.abs(pixels(served).astype(int) - pixels(direct))
    assert difference.max() == 0, f"the served panorama differs by up to {difference.max()} levels"


def test_through_gradio_client_the_api_returns_the_image_and_keeps_serving(server, tmp_path):
    _require("gradio_client")
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server.url, download_files=str(tmp_path), verbose=False, analytics_enabled=False)
    with pytest.raises(AppError) as caught:
        client.predict(*{**API_ARGUMENTS, "width": BAD_WIDTH}.values(), api_name="/generate")
    assert pipeline_message() in str(caught.value)

    compare = {**API_ARGUMENTS, "compare": True}
    sync_path, multi_path, seed, status = client.predict(*compare.values(), api_name="/generate")
    again_path, none, _, _ = client.predict(*API_ARGUMENTS.values(), api_name="/generate")
    assert seed == 3 and "256x64" in status and none is None
    with Image.open(sync_path) as sync, Image.open(multi_path) as multi, Image.open(again_path) as again:
        assert sync.size == multi.size == again.size == (256, 64)
        # The same seed gives the same panorama, with or without the comparison (measured: identical).
        assert np.array_equal(pixels(sync), pixels(again))
        assert not np.array_equal(pixels(sync), pixels(multi))
    assert all(Path(path).is_relative_to(tmp_path) for path in (sync_path, multi_path, again_path))

    # A photo by keyword (the page's last two inputs): extended, from the same seed.
    from gradio_client import handle_file

    make_photo(48, 64).save(tmp_path / "photo.png")
    photo_path, _, _, status = client.predict(
        *API_ARGUMENTS.values(), photo=handle_file(tmp_path / "photo.png"), photo_position="left", api_name="/generate"
    )
    assert "seed 3, photo at the left," in status
    with Image.open(photo_path) as extended, Image.open(again_path) as again:
        assert extended.size == (256, 64) and not np.array_equal(pixels(extended), pixels(again))
