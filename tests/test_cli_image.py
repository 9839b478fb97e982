"""`syncdiffusion --image`: outpainting a photo (--outpaint), image-to-image (--strength), inpainting (--mask) and
the synchronization anchor (--sync-anchor) from the command, offline on the tiny models.

Whether the kept region comes back needs a VAE that reconstructs: the tiny model's random one does not (measured
with this file's photo: mean error 75-82 on 0-255 for its reconstruction, 74-83 for a panorama made without the
photo). `averaging_vae` is one by construction, an `AutoencoderKL` whose encoder averages 8x8-pixel blocks and whose
decoder repeats each latent pixel over its block, so its reconstruction error is the photo's deviation from its
block means (19.4 here) and a kept region must match it to the PNG's rounding.
"""

import functools
import inspect
import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageDraw

from pipeline_syncdiffusion import SyncDiffusionPipeline
from pipeline_syncdiffusion_controlnet import SyncDiffusionControlNetPipeline
from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline
from pipeline_syncdiffusion_xl import SyncDiffusionXLPipeline
from syncdiffusion_utils import cli
from syncdiffusion_utils.cli import main, takes_start_image
from syncdiffusion_utils.outpainting import place_photo
from tests.test_cli import assert_one_line_error, pixels


pytestmark = pytest.mark.usefixtures("one_thread")

# A 64x256 panorama: four 64x64 views side by side (stride 8 latents), 2 steps, one of them synchronized.
RUN = ["a photo of a harbour", "--model", "tiny", "--steps", "2", "--sync-thres", "1", "--seed", "0"]
OUTPAINT_SIZE = ["--height", "64", "--width", "256"]
# The largest gap between a PNG's pixels and the float image it was saved from: 0.5, and headroom for the averaging
# VAE's float error through the pipeline (measured at most 0.0022 on 0-255, 2 and 8 steps, circular or not).
PNG_ROUNDING = 0.5 + 0.02


# ----------------------------------------------------------------------------------------------------------------
# Helpers and fixtures
# ----------------------------------------------------------------------------------------------------------------


def make_photo(height=64, width=96):
    """A gradient with a yellow disc and a blue box: smooth, with sharp edges."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 128)], -1).astype(np.uint8)
    photo = Image.fromarray(pixels)
    draw = ImageDraw.Draw(photo)
    draw.ellipse([20, 10, 50, 40], fill=(255, 255, 0))
    draw.rectangle([60, 30, 90, 60], fill=(0, 0, 200))
    return photo


def save(image, path):
    image.save(path)
    return str(path)


# Constant channels of this size make the final GroupNorm's deviation (nearly) independent of the image.
AVERAGING_CONSTANT = 10000.0


def averaging_vae():
    """An `AutoencoderKL` whose encoder averages 8x8-pixel blocks (latent channels 0-2: the block's mean, in [-1, 1];
    3: zero; log-variance -30) and whose decoder repeats each latent pixel over its block. Residual branches and the
    mid-block attention output are zero (identity blocks); the down- and upsampling convolutions average 2x2 and
    copy; the GroupNorm before each `conv_out` sees the signal `s` and `-s` with two constant channels `+-C`, so its
    mean is 0 and its deviation about C / sqrt(8), and `silu(a) - silu(-a) = a` undoes the SiLU exactly."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16,) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        sample_size=64,
    ).eval()
    deviation = AVERAGING_CONSTANT / math.sqrt(8)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.zero_()
        for coder, in_channels in ((vae.encoder, 3), (vae.decoder, 4)):
            coder.conv_norm_out.weight.fill_(1.0)
            for c in range(3):
                coder.conv_in.weight[c, c, 1, 1] = 1.0
                coder.conv_in.weight[3 + c, c, 1, 1] = -1.0
                coder.conv_out.weight[c, c, 1, 1] = deviation
                coder.conv_out.weight[c, 3 + c, 1, 1] = -deviation
            coder.conv_in.bias[6], coder.conv_in.bias[7] = AVERAGING_CONSTANT, -AVERAGING_CONSTANT
        for block in vae.encoder.down_blocks:
            for downsampler in block.downsamplers or []:
                for c in range(16):
                    downsampler.conv.weight[c, c, :2, :2] = 0.25
        for block in vae.decoder.up_blocks:
            for upsampler in block.upsamplers or []:
                for c in range(16):
                    upsampler.conv.weight[c, c, 1, 1] = 1.0
        vae.encoder.conv_out.bias[4:] = -30.0
        vae.quant_conv.weight[:, :, 0, 0] = torch.eye(8)
        vae.post_quant_conv.weight[:, :, 0, 0] = torch.eye(4)
    return vae


def reconstruction(vae, image):
    """`decode(encode(image))` as float RGB on 0-255, as the pipeline's image processor normalizes and clips."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        decoded = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return ((decoded[0].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1) * 255


@pytest.fixture
def vae(monkeypatch):
    """The command's models get the averaging VAE; returns one for the test's own reconstructions."""
    load = cli.load_pipeline

    def load_pipeline(*args, **kwargs):
        pipe = load(*args, **kwargs)
        pipe.vae = averaging_vae()
        return pipe

    monkeypatch.setattr(cli, "load_pipeline", load_pipeline)
    return averaging_vae()


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

        # wraps: the command reads the class's defaults and image arguments from its signature
        monkeypatch.setattr(pipeline_class, "__call__", functools.wraps(original)(call))
    return seen


@pytest.fixture
def no_model_loading(monkeypatch):
    def load_pipeline(*args, **kwargs):
        raise AssertionError("the image flags should be checked before loading the model")

    monkeypatch.setattr(cli, "load_pipeline", load_pipeline)


def assert_same_image(actual, expected):
    assert actual.size == expected.size and actual.mode == expected.mode
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))


def assert_kept(output, vae, image, kept, photo_pixels=None):
    """The kept pixels of `output` (a PNG's array) are the VAE's reconstruction of `image` there, to the PNG's
    rounding, hence within its reconstruction error of the image."""
    rebuilt = reconstruction(vae, image)
    target = np.asarray(image, dtype=np.float64) if photo_pixels is None else photo_pixels
    assert np.abs(output - rebuilt)[kept].max() <= PNG_ROUNDING
    error, vae_error = np.abs(output - target)[kept].mean(), np.abs(rebuilt - target)[kept].mean()
    assert error <= vae_error + PNG_ROUNDING, (error, vae_error)
    return vae_error


# ----------------------------------------------------------------------------------------------------------------
# Outpainting
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "position, circular", [("center", False), ("right", False), ("0", False), ("-40", True)], ids=str
)
def test_outpaint_keeps_the_photo_and_generates_the_rest(position, circular, tmp_path, vae, calls, capsys):
    photo = make_photo()
    output = tmp_path / "harbour.png"
    flags = ["--image", save(photo, tmp_path / "photo.png"), "--outpaint", position] + ["--circular"] * circular
    assert main(RUN + OUTPAINT_SIZE + flags + ["-o", str(output)]) == 0
    assert f"wrote {output} (256x64 pixels" in capsys.readouterr().out

    place = int(position) if position.lstrip("-").isdigit() else position
    image, mask = place_photo(photo, 64, 256, place, circular=circular)
    (call,) = calls
    assert_same_image(call["image"], image)
    assert_same_image(call["mask_image"], mask)
    assert call["circular_padding"] is circular and "sync_anchor" not in call
    assert call["strength"] == 1.0  # the canvas around the photo starts from pure noise, whatever the class

    result = pixels(output)
    assert result.shape == (64, 256, 3)
    kept = np.asarray(mask) == 0
    vae_error = assert_kept(result, vae, image, kept)
    assert vae_error > 5  # the photo's edges: a real measure, not a copy
    # the rest is generated: far from the fill (measured 124 on 0-255)
    assert np.abs(result - np.asarray(image, dtype=np.float64))[~kept].mean() > 5 * vae_error


def test_without_the_photo_the_same_pixels_are_far_from_it(tmp_path, vae):
    """The check above can fail: a panorama made without --image is 7x further from the photo than the VAE's
    reconstruction (measured 131.6 against 19.4)."""
    photo = make_photo()
    image, mask = place_photo(photo, 64, 256, "center")
    kept = np.asarray(mask) == 0
    assert main(RUN + OUTPAINT_SIZE + ["-o", str(tmp_path / "plain.png")]) == 0
    plain = pixels(tmp_path / "plain.png")
    vae_error = np.abs(reconstruction(vae, image) - np.asarray(image, dtype=np.float64))[kept].mean()
    assert np.abs(plain - np.asarray(image, dtype=np.float64))[kept].mean() > 3 * vae_error


def test_outpaint_scales_the_photo_to_the_panoramas_height(tmp_path, calls):
    """A 128x192 photo on a 64x256 canvas: 96 pixels wide, columns 80..175 kept."""
    photo = make_photo(128, 192)
    flags = ["--image", save(photo, tmp_path / "photo.png"), "--outpaint", "center"]
    assert main(RUN + OUTPAINT_SIZE + flags + ["-o", str(tmp_path / "x.png")]) == 0
    (call,) = calls
    assert call["image"].size == (256, 64) and (call["height"], call["width"]) == (64, 256)
    mask = np.asarray(call["mask_image"])
    assert (mask[:, 80:176] == 0).all() and (mask[:, :80] == 255).all() and (mask[:, 176:] == 255).all()


def test_compare_gives_both_panoramas_the_photo(tmp_path, calls, capsys):
    photo = make_photo()
    output = tmp_path / "compare.png"
    flags = ["--image", save(photo, tmp_path / "photo.png"), "--outpaint", "center", "--strength", "0.5"]
    assert main(RUN + OUTPAINT_SIZE + flags + ["--compare", "-o", str(output)]) == 0
    image, mask = place_photo(photo, 64, 256, "center")
    multi, sync = calls
    assert (multi["sync_weight"], sync["sync_weight"]) == (0.0, 20.0)
    for call in calls:
        assert_same_image(call["image"], image)
        assert_same_image(call["mask_image"], mask)
        assert call["strength"] == 0.5
    assert pixels(output).shape[0] > 2 * 64  # two labelled panoramas stacked
    assert "MultiDiffusion above SyncDiffusion" in capsys.readouterr().out


def test_a_sweep_gives_every_weight_the_photo(tmp_path, calls):
    flags = ["--image", save(make_photo(), tmp_path / "photo.png"), "--outpaint", "left", "--sync-weight", "0,20"]
    assert main(RUN + OUTPAINT_SIZE + flags + ["-o", str(tmp_path / "sweep.png")]) == 0
    assert [call["sync_weight"] for call in calls] == [0.0, 20.0]
    assert all((np.asarray(call["mask_image"])[:, :96] == 0).all() for call in calls)


# ----------------------------------------------------------------------------------------------------------------
# Image-to-image and inpainting
# ----------------------------------------------------------------------------------------------------------------


def panorama_file(tmp_path, height=64, width=128):
    """A 64x128 gradient panorama with shapes (two photos side by side)."""
    panorama = Image.new("RGB", (width, height))
    panorama.paste(make_photo(height, width // 2), (0, 0))
    panorama.paste(make_photo(height, width // 2).transpose(Image.Transpose.FLIP_LEFT_RIGHT), (width // 2, 0))
    return save(panorama, tmp_path / "panorama.png"), panorama


def test_image_to_image_starts_from_the_image_at_its_size(tmp_path, vae, calls):
    """No --height/--width: the image's 64x128. Strength 0.5 of 2 steps runs one step, from the image noised to
    it: measured (seeds 0-2) a mean distance of 49.5-50.9 from the image on 0-255, against 115-127 for the
    text-to-image panorama (the random UNet's one step moves it far; the averaging VAE's own error is 17.6)."""
    path, panorama = panorama_file(tmp_path)
    assert main(RUN + ["--image", path, "--strength", "0.5", "-o", str(tmp_path / "dusk.png")]) == 0
    assert main(RUN + ["--width", "128", "-o", str(tmp_path / "plain.png")]) == 0
    first, _ = calls
    assert_same_image(first["image"], panorama)
    assert first["strength"] == 0.5 and "mask_image" not in first and (first["height"], first["width"]) == (64, 128)

    source = np.asarray(panorama, dtype=np.float64)
    result, plain = pixels(tmp_path / "dusk.png"), pixels(tmp_path / "plain.png")
    assert result.shape == (64, 128, 3)
    assert np.abs(result - source).mean() < np.abs(plain - source).mean() / 2


def test_inpainting_keeps_the_black_of_the_mask(tmp_path, vae, calls):
    """A mask white on the right half: the left half is kept (to the VAE's reconstruction), the right generated."""
    path, panorama = panorama_file(tmp_path)
    mask = np.zeros((64, 128), dtype=np.uint8)
    mask[:, 64:] = 255
    mask_path = save(Image.fromarray(mask), tmp_path / "mask.png")
    assert main(RUN + ["--image", path, "--mask", mask_path, "-o", str(tmp_path / "fixed.png")]) == 0
    (call,) = calls
    assert_same_image(call["image"], panorama)
    np.testing.assert_array_equal(np.asarray(call["mask_image"]), mask)
    assert "strength" not in call  # the pipeline's default: 1 with a mask

    result = pixels(tmp_path / "fixed.png")
    kept = mask == 0
    vae_error = assert_kept(result, vae, panorama, kept)
    assert np.abs(result - np.asarray(panorama, dtype=np.float64))[~kept].mean() > 3 * vae_error


def test_a_16_bit_mask_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "mask16.png")
    mask = cli.read_mask(str(tmp_path / "mask16.png"), 1, 4)
    np.testing.assert_array_equal(np.asarray(mask), [[0, 64, 128, 255]])


@pytest.mark.parametrize("anchor, expected", [("center", "center"), ("image", "image"), ("3", 3)])
def test_the_sync_anchor_reaches_the_call(anchor, expected, tmp_path, calls):
    flags = ["--image", save(make_photo(), tmp_path / "photo.png"), "--outpaint", "right", "--sync-anchor", anchor]
    assert main(RUN + OUTPAINT_SIZE + flags + ["-o", str(tmp_path / "x.png")]) == 0
    (call,) = calls
    assert call["sync_anchor"] == expected


def test_a_sync_anchor_without_an_image_anchors_the_text_to_image_panorama(tmp_path, calls):
    assert main(RUN + OUTPAINT_SIZE + ["--sync-anchor", "0", "-o", str(tmp_path / "x.png")]) == 0
    (call,) = calls
    assert call["sync_anchor"] == 0 and "image" not in call


def test_a_view_past_the_last_is_the_pipelines_one_line_error(tmp_path, capsys):
    """Four views at 64x256: the view count needs the model's window, so the pipeline checks it (after loading)."""
    assert main(RUN + OUTPAINT_SIZE + ["--sync-anchor", "4", "-o", str(tmp_path / "x.png")]) == 2
    assert_one_line_error(capsys.readouterr().err, "--sync-anchor", "0..3", "4")
    assert not (tmp_path / "x.png").exists()


def test_the_pipelines_image_errors_name_image_not_control_image(tmp_path, capsys, monkeypatch):
    """An error the pipeline raises about its `image` after loading (forced here: the command checks the sizes
    first) names --image, not --control-image (the ControlNet pipeline's `image`)."""

    def refuse(self, *args, **kwargs):
        raise ValueError("`image` and `mask_image` refused by this test.")

    monkeypatch.setattr(SyncDiffusionPipeline, "check_image_inputs", refuse)
    path, _ = panorama_file(tmp_path)
    assert main(RUN + ["--image", path, "-o", str(tmp_path / "x.png")]) == 2
    assert_one_line_error(capsys.readouterr().err, "--image and --mask refused by this test.")


# ----------------------------------------------------------------------------------------------------------------
# Errors before loading
# ----------------------------------------------------------------------------------------------------------------


def error_files(tmp_path):
    """The files the error cases name."""
    save(make_photo(), tmp_path / "photo.png")
    save(make_photo(64, 300), tmp_path / "wide.png")
    panorama_file(tmp_path)
    save(Image.new("L", (128, 64), 255), tmp_path / "mask.png")
    save(Image.new("L", (64, 64), 255), tmp_path / "small_mask.png")
    save(Image.new("L", (128, 64), 0), tmp_path / "black_mask.png")
    (tmp_path / "notes.txt").write_text("not an image")
    save(Image.new("RGB", (128, 64), "gray"), tmp_path / "depth.png")


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--mask", "{tmp}/mask.png"], ["--mask", "only with --image"]),
        (["--outpaint", "center"], ["--outpaint center", "only with --image"]),
        (["--strength", "0.5"], ["--strength 0.5", "only with --image"]),
        (
            ["--image", "{tmp}/photo.png", "--outpaint", "center", "--mask", "{tmp}/mask.png"],
            ["--mask", "not with --outpaint"],
        ),
        (["--sync-anchor", "image"], ["--sync-anchor image", "needs --mask or --outpaint"]),
        (["--image", "{tmp}/panorama.png", "--sync-anchor", "image"], ["--sync-anchor image", "--mask or --outpaint"]),
        (["--image", "{tmp}/panorama.png", "--strength", "0"], ["--strength", "(0, 1]", "0"]),
        (["--image", "{tmp}/panorama.png", "--strength", "1.5"], ["--strength", "(0, 1]", "1.5"]),
        (["--image", "{tmp}/panorama.png", "--strength", "nan"], ["--strength", "(0, 1]", "nan"]),
        (["--image", "{tmp}/panorama.png", "--strength", "most"], ["--strength", "(0, 1]", "'most'"]),
        (["--image", "{tmp}/panorama.png", "--strength", "0.4"], ["--strength 0.4 of 2 steps", "at least 0.5"]),
        (["--image", "{tmp}/photo.png", "--outpaint", "middle"], ["--outpaint", "left, center, right", "'middle'"]),
        (["--sync-anchor", "left"], ["--sync-anchor", "center, image or a view index", "'left'"]),
        (["--sync-anchor", "-1"], ["--sync-anchor", "a view index >= 0", "'-1'"]),
        (
            ["--image", "{tmp}/photo.png", "--outpaint", "-1", *OUTPAINT_SIZE],
            ["--outpaint -1", "0..160", "(--circular)"],
        ),
        (
            ["--image", "{tmp}/photo.png", "--outpaint", "300", "--circular", *OUTPAINT_SIZE],
            ["--outpaint 300", "more than a turn", "-255..255"],
        ),
        (
            ["--image", "{tmp}/wide.png", "--outpaint", "left", *OUTPAINT_SIZE],
            ["--image '{tmp}/wide.png' is 300x64", "300 pixels wide", "256 pixels"],
        ),
        (
            ["--image", "{tmp}/photo.png", *OUTPAINT_SIZE],
            ["--image '{tmp}/photo.png' is 96x64 pixels", "the panorama is 256x64", "--outpaint"],
        ),
        (["--image", "{tmp}/missing.png"], ["--image '{tmp}/missing.png'", "no such file"]),
        (["--image", "{tmp}/notes.txt"], ["--image '{tmp}/notes.txt'", "cannot be read as an image"]),
        (["--image", "{tmp}/panorama.png", "--mask", "{tmp}/missing.png"], ["--mask", "no such file"]),
        (["--image", "{tmp}/panorama.png", "--mask", "{tmp}/notes.txt"], ["--mask", "cannot be read as an image"]),
        (
            ["--image", "{tmp}/panorama.png", "--mask", "{tmp}/small_mask.png"],
            ["--mask", "is 64x64 pixels", "the panorama is 128x64"],
        ),
        (["--image", "{tmp}/panorama.png", "--mask", "{tmp}/black_mask.png"], ["--mask", "black everywhere"]),
        (
            ["--image", "{tmp}/panorama.png", "--control-image", "{tmp}/depth.png", "--controlnet", "tiny"],
            ["--image", "not with --control-image"],
        ),
    ],
)
def test_a_bad_image_flag_is_a_one_line_error_before_loading(flags, needles, tmp_path, capsys, no_model_loading):
    error_files(tmp_path)
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    output = tmp_path / "x.png"
    assert main(RUN + flags + ["-o", str(output)]) == 2
    assert_one_line_error(capsys.readouterr().err, *[needle.format(tmp=tmp_path) for needle in needles])
    assert not output.exists()


def test_sizes_and_steps_are_the_classs_defaults_before_loading(tmp_path, capsys, monkeypatch):
    """A real SD model without --height/--width/--steps: the canvas is SD's 512x2048 and the steps 50, known
    before loading."""
    monkeypatch.setattr(cli, "pipeline_class_of", lambda model: SyncDiffusionPipeline)
    monkeypatch.setattr(cli, "load_pipeline", lambda *args, **kwargs: pytest.fail("loaded before the check"))
    save(make_photo(512, 2048), tmp_path / "wide.png")
    save(make_photo(), tmp_path / "photo.png")
    model = ["a harbour", "--model", "some/sd-model", "-o", str(tmp_path / "x.png")]
    assert main(model + ["--image", str(tmp_path / "wide.png"), "--outpaint", "center"]) == 2
    assert_one_line_error(capsys.readouterr().err, "is 2048x512", "2048 pixels wide", "(2048 pixels")
    assert main(model + ["--image", str(tmp_path / "photo.png"), "--outpaint", "center", "--strength", "0.01"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--strength 0.01 of 50 steps", "at least 0.02")


# The command line of each tiny model other than SD.
OTHER_MODELS = {
    "sdxl": (SyncDiffusionXLPipeline, ["--model", "tiny-xl"]),
    "flux": (SyncDiffusionFluxPipeline, ["--model", "tiny-flux"]),
}


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(name, marks=pytest.mark.skipif(not takes_start_image(cls), reason=f"{cls.__name__}: no image"))
        for name, (cls, _) in OTHER_MODELS.items()
    ],
)
def test_outpainting_reaches_every_model_that_takes_an_image(model, tmp_path, calls):
    pipeline_class, model_args = OTHER_MODELS[model]
    photo = make_photo()
    args = ["a harbour", *model_args, *OUTPAINT_SIZE, "--steps", "2", "--sync-thres", "1", "--seed", "0"]
    flags = ["--image", save(photo, tmp_path / "photo.png"), "--outpaint", "center"]
    assert main(args + flags + ["-o", str(tmp_path / "x.png")]) == 0
    (call,) = calls
    image, mask = place_photo(photo, 64, 256, "center")
    assert call["class"] == pipeline_class.__name__ and call["strength"] == 1.0  # not SDXL's 0.9999, FLUX's 0.6
    assert_same_image(call["image"], image)
    assert_same_image(call["mask_image"], mask)
    assert pixels(tmp_path / "x.png").shape == (64, 256, 3)


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(name, marks=pytest.mark.skipif(takes_start_image(cls), reason=f"{cls.__name__}: takes an image"))
        for name, (cls, _) in OTHER_MODELS.items()
    ],
)
def test_a_class_without_an_image_refuses_it_before_loading(model, tmp_path, capsys, no_model_loading):
    pipeline_class, model_args = OTHER_MODELS[model]
    path, _ = panorama_file(tmp_path)
    assert main(["a harbour", *model_args, "--image", path, "-o", str(tmp_path / "x.png")]) == 2
    assert_one_line_error(capsys.readouterr().err, "--image", pipeline_class.__name__, "takes no image")


def takes_sync_anchor(pipeline_class):
    return "sync_anchor" in inspect.signature(pipeline_class.__call__).parameters


def control_args(tmp_path):
    save(Image.new("RGB", (128, 64), "gray"), tmp_path / "depth.png")
    return ["--model", "tiny", "--control-image", str(tmp_path / "depth.png"), "--controlnet", "tiny"]


# The command line of each tiny model other than SD, for a 64x128 panorama.
ANCHOR_MODELS = {
    "sdxl": (SyncDiffusionXLPipeline, lambda tmp_path: ["--model", "tiny-xl"]),
    "controlnet": (SyncDiffusionControlNetPipeline, control_args),
    "flux": (SyncDiffusionFluxPipeline, lambda tmp_path: ["--model", "tiny-flux"]),
}


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(name, marks=pytest.mark.skipif(not takes_sync_anchor(cls), reason=f"{cls.__name__}: no anchor"))
        for name, (cls, _) in ANCHOR_MODELS.items()
    ],
)
def test_the_sync_anchor_reaches_every_class_that_takes_it(model, tmp_path, calls):
    pipeline_class, model_args = ANCHOR_MODELS[model]
    args = ["a harbour", *model_args(tmp_path), "--height", "64", "--width", "128", "--steps", "2"]
    assert main(args + ["--sync-thres", "1", "--seed", "0", "--sync-anchor", "1", "-o", str(tmp_path / "x.png")]) == 0
    (call,) = calls
    assert call["class"] == pipeline_class.__name__ and call["sync_anchor"] == 1


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(name, marks=pytest.mark.skipif(takes_sync_anchor(cls), reason=f"{cls.__name__}: an anchor"))
        for name, (cls, _) in ANCHOR_MODELS.items()
    ],
)
def test_a_class_without_a_sync_anchor_refuses_it_before_loading(model, tmp_path, capsys, no_model_loading):
    pipeline_class, model_args = ANCHOR_MODELS[model]
    args = ["a harbour", *model_args(tmp_path), "--sync-anchor", "1", "-o", str(tmp_path / "x.png")]
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr().err, "--sync-anchor", pipeline_class.__name__)


@pytest.mark.skipif(not takes_start_image(SyncDiffusionFluxPipeline), reason="FLUX takes no image")
def test_flow_matching_runs_a_step_at_any_strength(tmp_path, calls):
    """FLUX's get_timesteps runs at least one step: --strength 0.1 of 2 steps is no error there (for SD it is)."""
    path, _ = panorama_file(tmp_path)
    args = ["a harbour", "--model", "tiny-flux", "--image", path, "--strength", "0.1", "--steps", "2"]
    assert main(args + ["--sync-thres", "1", "--seed", "0", "-o", str(tmp_path / "x.png")]) == 0
    (call,) = calls
    assert call["strength"] == 0.1 and pixels(tmp_path / "x.png").shape == (64, 128, 3)


def test_which_classes_take_an_image():
    assert takes_start_image(SyncDiffusionPipeline)
    assert not takes_start_image(SyncDiffusionControlNetPipeline)  # its `image` is the condition


def test_help_and_docstring_show_the_image_flags(capsys):
    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    for needle in ("--image PATH", "--outpaint POSITION", "--mask PATH", "--strength", "--sync-anchor ANCHOR"):
        assert needle in help_text
    for needle in ("--outpaint center", "--strength 0.6", "--mask mask.png"):
        assert needle in cli.__doc__
