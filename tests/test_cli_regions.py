"""`syncdiffusion --region PROMPT MASK`: region prompts from the command, offline on the tiny models."""

import functools
import inspect

import numpy as np
import pytest
from PIL import Image

from pipeline_syncdiffusion import SyncDiffusionPipeline
from pipeline_syncdiffusion_controlnet import SyncDiffusionControlNetPipeline
from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline
from pipeline_syncdiffusion_xl import SyncDiffusionXLPipeline
from syncdiffusion_utils import cli
from syncdiffusion_utils.cli import main
from tests.test_cli import assert_one_line_error, pixels


pytestmark = pytest.mark.usefixtures("one_thread")

# A 64x128 panorama: two 64x64 views side by side (stride 8 latents), 2 steps, one of them synchronized.
SIZE = ["--height", "64", "--width", "128"]
TINY = ["a photo of a lake", "--model", "tiny", *SIZE, "--steps", "2", "--sync-thres", "1", "--seed", "0"]
RIGHT_HALF = "box:0.5,0,1,1"


def takes_regions(pipeline_class):
    return "region_prompts" in inspect.signature(pipeline_class.__call__).parameters


@pytest.fixture
def calls(monkeypatch):
    """The keyword arguments of every call of each pipeline class (the calls run as usual)."""
    seen = []
    for pipeline_class in (
        SyncDiffusionPipeline,
        SyncDiffusionXLPipeline,
        SyncDiffusionControlNetPipeline,
        SyncDiffusionFluxPipeline,
    ):
        original = pipeline_class.__call__

        def call(self, *args, _original=original, **kwargs):
            seen.append({**kwargs, "class": type(self).__name__})
            return _original(self, *args, **kwargs)

        # wraps: the command reads the class's defaults and region arguments from its signature
        monkeypatch.setattr(pipeline_class, "__call__", functools.wraps(original)(call))
    return seen


@pytest.fixture
def no_model_loading(monkeypatch):
    def load_pipeline(*args, **kwargs):
        raise AssertionError("the region should be checked before loading the model")

    monkeypatch.setattr(cli, "load_pipeline", load_pipeline)


def mask_file(path, height, width, box):
    """A PNG mask: white inside the pixel rectangle `box` (left, top, right, bottom), black elsewhere."""
    mask = np.zeros((height, width), dtype=np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    Image.fromarray(mask).save(path)
    return mask


@pytest.mark.parametrize(
    "box, height, width, rows, columns",
    [
        ("box:0.5,0,1,1", 64, 128, (0, 64), (64, 128)),
        ("box:0,0,1,1", 64, 128, (0, 64), (0, 128)),
        # edges at 12.5, 2.5, 75.5 and 7.5 pixels: halves round up (Python's round would give 12, 2, 76, 8)
        ("box:0.125,0.25,0.755,0.75", 10, 100, (3, 8), (13, 76)),
        ("box:0.3,0.1,0.301,0.9", 20, 1000, (2, 18), (300, 301)),
    ],
)
def test_a_box_is_exactly_its_rounded_pixel_rectangle(box, height, width, rows, columns):
    mask = cli.region_mask("a barn", box, height, width)
    assert mask.mode == "L" and mask.size == (width, height)
    expected = np.zeros((height, width), dtype=np.uint8)
    expected[rows[0] : rows[1], columns[0] : columns[1]] = 255
    np.testing.assert_array_equal(np.asarray(mask), expected)


def test_a_16_bit_mask_is_scaled_not_clipped(tmp_path):
    """Pillow's `convert("L")` clips 16-bit values: a 50% gray (32768) would read as white."""
    values = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "mask16.png")
    mask = cli.region_mask("a barn", str(tmp_path / "mask16.png"), 1, 4)
    np.testing.assert_array_equal(np.asarray(mask), [[0, 64, 128, 255]])


def test_a_png_mask_and_a_box_region_write_a_png_and_reach_the_call(tmp_path, calls, capsys):
    drawn = mask_file(tmp_path / "moon.png", 64, 128, (8, 0, 40, 32))
    output = tmp_path / "regions.png"
    regions = ["--region", "a red barn", RIGHT_HALF, "--region", "a full moon", str(tmp_path / "moon.png")]
    assert main(TINY + regions + ["--region-bootstrap-steps", "1", "-o", str(output)]) == 0

    image = pixels(output)
    assert image.shape == (64, 128, 3) and image.std() > 5
    assert f"wrote {output}" in capsys.readouterr().out
    (call,) = calls
    assert call["region_prompts"] == ["a red barn", "a full moon"]
    assert call["region_bootstrap_steps"] == 1
    barn, moon = (np.asarray(mask) for mask in call["region_masks"])
    assert barn.shape == (64, 128) and (barn[:, 64:] == 255).all() and (barn[:, :64] == 0).all()
    np.testing.assert_array_equal(moon, drawn)


def test_without_bootstrap_steps_the_pipeline_chooses(tmp_path, calls):
    assert main(TINY + ["--region", "a red barn", RIGHT_HALF, "-o", str(tmp_path / "x.png")]) == 0
    (call,) = calls
    assert "region_bootstrap_steps" not in call  # the pipeline's default, 40% of the steps


def test_a_region_changes_the_panorama_in_its_pixels(tmp_path):
    """Same seed, with and without a region prompt on the right half: the right half changes. MultiDiffusion
    (--sync-weight 0), whose two views do not overlap: the left half changes only through the VAE decoder (its
    mid-block attention sees the whole latent). Measured mean differences over seeds 0-2 (0-255 scale): inside
    10.6-14.8, left 48 columns 2.4-3.8 (ratio 3.2-4.5)."""
    plain, region = tmp_path / "plain.png", tmp_path / "region.png"
    args = TINY + ["--sync-weight", "0"]
    assert main(args + ["-o", str(plain)]) == 0
    assert main(args + ["--region", "a red barn", RIGHT_HALF, "-o", str(region)]) == 0

    difference = np.abs(pixels(plain) - pixels(region))
    inside, outside = difference[:, 64:].mean(), difference[:, :48].mean()
    assert inside > 5, inside
    assert inside > 2 * outside, (inside, outside)


def test_compare_with_a_region_gives_both_panoramas_the_region(tmp_path, calls, capsys):
    output = tmp_path / "compare.png"
    assert main(TINY + ["--region", "a red barn", RIGHT_HALF, "--compare", "-o", str(output)]) == 0

    multi, sync = calls
    assert (multi["sync_weight"], sync["sync_weight"]) == (0.0, 20.0)
    for call in calls:
        assert call["region_prompts"] == ["a red barn"]
        assert (np.asarray(call["region_masks"][0])[:, 64:] == 255).all()
    image = pixels(output)
    assert image.shape[1] == 128 and image.shape[0] > 2 * 64  # two labelled panoramas stacked
    assert "MultiDiffusion above SyncDiffusion" in capsys.readouterr().out


def test_a_sweep_gives_every_weight_the_region(tmp_path, calls):
    output = tmp_path / "sweep.png"
    assert main(TINY + ["--region", "a red barn", RIGHT_HALF, "--sync-weight", "0,20", "-o", str(output)]) == 0

    assert [call["sync_weight"] for call in calls] == [0.0, 20.0]
    assert all(call["region_prompts"] == ["a red barn"] for call in calls)
    assert pixels(output).shape[0] > 2 * 64


@pytest.mark.parametrize(
    "mask, needles",
    [
        ("box:0.5,0,0.2,1", ["X0 0.5 is not below X1 0.2"]),
        ("box:0,0.6,1,0.6", ["Y0 0.6 is not below Y1 0.6"]),
        ("box:0,0,1.5,1", ["X1 1.5 is not in [0, 1]"]),
        ("box:-0.1,0,1,1", ["X0 -0.1 is not in [0, 1]"]),
        ("box:0,0,nan,1", ["X1 nan is not in [0, 1]"]),
        ("box:0,0,1", ["3 numbers instead of 4"]),
        ("box:0,0,1,top", ["Y1 'top' is not a number"]),
        ("box:0.5,0,0.501,1", ["covers no pixel", "128x64"]),
        ("{tmp}/missing.png", ["no such file", "128x64"]),
        ("{tmp}/small.png", ["is 64x64 pixels", "the panorama is 128x64"]),
        ("{tmp}/notes.txt", ["cannot be read as an image"]),
    ],
)
def test_a_bad_region_is_a_one_line_error_before_loading(mask, needles, tmp_path, capsys, no_model_loading):
    Image.new("L", (64, 64), 255).save(tmp_path / "small.png")
    (tmp_path / "notes.txt").write_text("not an image")
    mask = mask.format(tmp=tmp_path)
    output = tmp_path / "x.png"
    assert main(TINY + ["--region", "a red barn", mask, "-o", str(output)]) == 2
    line = assert_one_line_error(capsys.readouterr().err, "--region 'a red barn'", repr(mask), *needles)
    if mask.startswith("box:") and "no pixel" not in line:
        assert "box:X0,Y0,X1,Y1" in line and "[0, 1]" in line  # what is allowed
    assert not output.exists()


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--region-bootstrap-steps", "1"], ["--region-bootstrap-steps 1", "only with --region"]),
        (["--region", "a barn", RIGHT_HALF, "--region-bootstrap-steps", "3"], ["--region-bootstrap-steps 3", "2"]),
        (["--region", "a barn", RIGHT_HALF, "--region-bootstrap-steps", "-1"], ["--region-bootstrap-steps", "-1"]),
        (["--region", "a barn"], ["--region", "2 arguments"]),
    ],
)
def test_bad_bootstrap_steps_fail_before_loading(flags, needles, tmp_path, capsys, no_model_loading):
    assert main(TINY + flags + ["-o", str(tmp_path / "x.png")]) == 2
    assert_one_line_error(capsys.readouterr().err, *needles)


def test_a_mask_is_checked_against_the_classs_default_size_before_loading(tmp_path, capsys, monkeypatch):
    """A real model without --height/--width: the mask must be SD's default 512x2048, known before loading."""
    monkeypatch.setattr(cli, "pipeline_class_of", lambda model: SyncDiffusionPipeline)
    monkeypatch.setattr(cli, "load_pipeline", lambda *args, **kwargs: pytest.fail("loaded before the size check"))
    Image.new("L", (256, 64), 255).save(tmp_path / "mask.png")
    args = ["a lake", "--model", "some/sd-model", "--region", "a barn", str(tmp_path / "mask.png")]
    assert main(args + ["-o", str(tmp_path / "x.png")]) == 2
    assert_one_line_error(capsys.readouterr().err, "--region 'a barn'", "is 256x64 pixels", "panorama is 2048x512")

    args = ["a lake", "--model", "some/sd-model", "--region", "a barn", RIGHT_HALF, "--region-bootstrap-steps", "51"]
    assert main(args + ["-o", str(tmp_path / "x.png")]) == 2
    assert_one_line_error(capsys.readouterr().err, "--region-bootstrap-steps 51", "50 denoising steps")


def control_args(tmp_path):
    Image.new("RGB", (128, 64), "gray").save(tmp_path / "depth.png")
    return ["--control-image", str(tmp_path / "depth.png"), "--controlnet", "tiny"]


# The command line of each tiny model other than SD, for a 64x128 panorama with the box region.
OTHER_MODELS = {
    "sdxl": (SyncDiffusionXLPipeline, lambda tmp_path: ["--model", "tiny-xl"]),
    "controlnet": (SyncDiffusionControlNetPipeline, lambda tmp_path: ["--model", "tiny", *control_args(tmp_path)]),
    "flux": (SyncDiffusionFluxPipeline, lambda tmp_path: ["--model", "tiny-flux"]),
}


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(
            name,
            marks=pytest.mark.skipif(
                not takes_regions(pipeline_class), reason=f"{pipeline_class.__name__}: no regions"
            ),
        )
        for name, (pipeline_class, _) in OTHER_MODELS.items()
    ],
)
def test_regions_reach_every_model(model, tmp_path, calls):
    pipeline_class, model_args = OTHER_MODELS[model]
    output = tmp_path / "x.png"
    args = ["a harbour", *model_args(tmp_path), *SIZE, "--steps", "2", "--sync-thres", "1", "--seed", "0"]
    assert main(args + ["--region", "a lighthouse", RIGHT_HALF, "-o", str(output)]) == 0

    (call,) = calls
    assert call["class"] == pipeline_class.__name__ and call["region_prompts"] == ["a lighthouse"]
    image = pixels(output)
    assert image.shape == (64, 128, 3) and image.std() > 5


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(
            name, marks=pytest.mark.skipif(takes_regions(pipeline_class), reason=f"{pipeline_class.__name__}: regions")
        )
        for name, (pipeline_class, _) in OTHER_MODELS.items()
    ],
)
def test_a_class_without_regions_refuses_them_before_loading(model, tmp_path, capsys, no_model_loading):
    pipeline_class, model_args = OTHER_MODELS[model]
    args = ["a harbour", *model_args(tmp_path), *SIZE, "--region", "a lighthouse", RIGHT_HALF]
    assert main(args + ["-o", str(tmp_path / "x.png")]) == 2
    assert_one_line_error(capsys.readouterr().err, "--region", pipeline_class.__name__)


def test_help_and_docstring_show_regions(capsys):
    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    for needle in ("--region PROMPT MASK", "box:X0,Y0,X1,Y1", "--region-bootstrap-steps", "halves rounded up"):
        assert needle in help_text
    assert "--region" in cli.__doc__
