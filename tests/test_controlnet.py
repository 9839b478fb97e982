"""SyncDiffusionControlNetPipeline: parity with diffusers' ControlNet pipeline and with SyncDiffusionPipeline, and a
reference loop (crop per view, residuals into the UNet, gradient through ControlNet, UNet, decoder and LPIPS)."""

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, MultiControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image

from pipeline_syncdiffusion import SyncDiffusionPipeline
from pipeline_syncdiffusion_controlnet import SyncDiffusionControlNetPipeline
from syncdiffusion_utils import cli
from syncdiffusion_utils.cli import main, with_controlnet
from syncdiffusion_utils.testing import make_components, make_tiny_controlnet


pytestmark = pytest.mark.usefixtures("one_thread")

GUIDANCE = 7.5
# Measured: the pipeline and the reference loop differ by 3e-5 to 5e-5 (float32 rounding of batched against
# unbatched passes, amplified by the synchronization step); leaving the ControlNet out of the gradient pass moves
# latents by 0.02 to 0.05, a wrong crop or a missing residual by about 1.
TOLERANCE = {"atol": 1e-3, "rtol": 1e-3}
# Without synchronization, or with a ControlNet scaled to 0, the same arithmetic runs: measured difference 0.
EXACT = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def parts():
    """Tiny SD components (8-latent views) and two tiny ControlNets with different random weights."""
    components = make_components("tiny", sample_size=8)
    return {
        "components": components,
        "controlnets": [make_tiny_controlnet(components["unet"], seed=seed) for seed in (0, 1)],
    }


def build(cls, parts, lpips_module=None, **extra):
    """`cls` on copies of the module's components (tests may change them freely)."""
    pipe = cls(
        **copy.deepcopy({**parts["components"], **extra}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if lpips_module is not None:
        pipe.set_perceptual_loss(lpips_module)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(parts, lpips_module):
    return build(SyncDiffusionControlNetPipeline, parts, lpips_module, controlnet=parts["controlnets"][0])


@pytest.fixture
def multi_pipe(parts, lpips_module):
    return build(
        SyncDiffusionControlNetPipeline, parts, lpips_module, controlnet=MultiControlNetModel(parts["controlnets"])
    )


def condition(height, width, seed=0):
    """A random condition image, `(1, 3, height, width)` in [0, 1]."""
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


def latents_of(pipe, **kwargs):
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe("a photo of a valley", output_type="latent", **kwargs).images


def reference_loop(
    pipe, latents, conditions, scales, steps, stride, sync_weight, sync_thres, circular=False, detach_control=False
):
    """SyncDiffusion with ControlNets written out plainly: DDIM, one image, one view at a time, views row-major.

    `conditions[k]` is ControlNet k's panorama-sized condition; `scales[i][k]` its scale at step i. Each view's
    ControlNets see the view's crop (columns wrapping round with `circular`); the synchronization gradient goes
    through ControlNets, UNet, VAE decoder and LPIPS (`detach_control`: not through the ControlNets).
    """
    unet, vae, lpips, controlnets = pipe.unet, pipe.vae, pipe.perceptual_loss("cpu"), pipe.controlnet_models
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    positive, negative = pipe.encode_prompt("a photo of a valley", "cpu", 1, True)
    embeds = torch.cat([negative, positive])
    n, factor = unet.config.sample_size, pipe.vae_scale_factor
    height, width = latents.shape[-2:]
    column_starts = range(0, width, stride) if circular else range(0, width - n + 1, stride)
    views = [(h, w) for h in range(0, height - n + 1, stride) for w in column_starts]
    anchor = views[len(views) // 2]

    def columns(w, size, scale=1):
        return [(scale * w + k) % (scale * size) for k in range(scale * n)]

    def noise(z, t, view, step_scales, detach=False):
        h, w = view
        z2 = torch.cat([z, z])
        down, mid = None, None
        for net, cond, scale in zip(controlnets, conditions, step_scales):
            crop = cond[:, :, factor * h : factor * (h + n)][..., columns(w, width, factor)]
            d, m = net(
                z2,
                t,
                encoder_hidden_states=embeds,
                controlnet_cond=torch.cat([crop, crop]),
                conditioning_scale=scale,
                return_dict=False,
            )
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if detach:
            down, mid = [d.detach() for d in down], mid.detach()
        uncond, cond = unet(
            z2,
            t,
            encoder_hidden_states=embeds,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample.chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    def image(z, t, view, step_scales, detach=False):
        x0 = scheduler.step(noise(z, t, view, step_scales, detach), t, z).pred_original_sample
        return (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

    z = latents.clone()
    for i, t in enumerate(scheduler.timesteps):
        value, count = torch.zeros_like(z), torch.zeros_like(z)
        sync = i < sync_thres
        if sync:
            anchor_image = image(
                z[:, :, anchor[0] : anchor[0] + n][..., columns(anchor[1], width)], t, anchor, scales[i]
            )
        for h, w in views:
            z_v = z[:, :, h : h + n][..., columns(w, width)].clone()
            if sync and (h, w) != anchor:
                z_v.requires_grad_(True)
                with torch.enable_grad():
                    predicted = image(z_v, t, (h, w), scales[i], detach=detach_control)
                    loss = lpips(predicted * 2 - 1, anchor_image * 2 - 1).sum()
                    (grad,) = torch.autograd.grad(loss, z_v)
                z_v = (z_v - sync_weight * 0.95**i * grad).detach()
            value[:, :, h : h + n, columns(w, width)] += scheduler.step(
                noise(z_v, t, (h, w), scales[i]), t, z_v
            ).prev_sample
            count[:, :, h : h + n, columns(w, width)] += 1
        z = value / count
    return z


# ---------------------------------------------------------------------------------------------------------------
# Parity with the pipelines it combines
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("guess_mode", [False, True])
def test_one_view_without_sync_equals_controlnet_pipeline(parts, pipe, guess_mode):
    reference = build(StableDiffusionControlNetPipeline, parts, controlnet=parts["controlnets"][0])
    kwargs = {"image": condition(64, 64), "num_inference_steps": 3, "guess_mode": guess_mode}
    expected = latents_of(reference, **kwargs, height=64, width=64, controlnet_conditioning_scale=0.8)
    ours = latents_of(pipe, **kwargs, sync_weight=0.0, controlnet_conditioning_scale=0.8)
    torch.testing.assert_close(ours, expected, **EXACT)
    # The ControlNet acted: without it the result is another one.
    assert (ours - latents_of(pipe, **kwargs, sync_weight=0.0, controlnet_conditioning_scale=0.0)).abs().max() > 1e-2


@torch.no_grad()
def test_zero_scale_equals_synchronized_syncdiffusion(parts, lpips_module):
    sync_pipe = build(SyncDiffusionPipeline, parts, lpips_module)
    pipe = SyncDiffusionControlNetPipeline.from_pipe(sync_pipe, controlnet=copy.deepcopy(parts["controlnets"][0]))
    kwargs = {"height": 64, "width": 128, "num_inference_steps": 2, "stride": 4, "sync_weight": 20.0, "sync_thres": 2}
    expected = latents_of(sync_pipe, **kwargs)
    ours = latents_of(pipe, **kwargs, image=condition(64, 128), controlnet_conditioning_scale=0.0)
    torch.testing.assert_close(ours, expected, **EXACT)


# ---------------------------------------------------------------------------------------------------------------
# Synchronized, several views: against the reference loop
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize(
    "width, circular, view_batch_size",
    [(128, False, 1), (96, True, "auto")],  # "auto" on the CPU: all views in one batch, gradient pass per view
    ids=["3_views", "circular_wraps_condition"],
)
def test_synchronized_views_match_reference_loop(pipe, width, circular, view_batch_size):
    latents = torch.randn(1, 4, 8, width // 8, generator=torch.Generator().manual_seed(1))
    cond = condition(64, width, seed=2)
    kwargs = {
        "num_inference_steps": 2,
        "stride": 4,
        "sync_weight": 20.0,
        "sync_thres": 2,
        "circular_padding": circular,
    }
    ours = latents_of(pipe, **kwargs, image=cond, latents=latents, view_batch_size=view_batch_size)
    reference = {
        "conditions": [cond],
        "scales": [[1.0]] * 2,
        "steps": 2,
        "stride": 4,
        "sync_weight": 20.0,
        "sync_thres": 2,
    }
    expected = reference_loop(pipe, latents, **reference, circular=circular)
    torch.testing.assert_close(ours, expected, **TOLERANCE)
    if not circular:
        # The gradient pass goes through the ControlNet: without that the result is measurably another one.
        detached = reference_loop(pipe, latents, **reference, detach_control=True)
        assert (detached - expected).abs().max() > 2e-2


def test_circular_view_condition_wraps_around():
    pipe = SyncDiffusionControlNetPipeline.__new__(SyncDiffusionControlNetPipeline)
    pipe.vae_scale_factor = 8
    cond = condition(64, 128)
    crop = pipe.get_view_condition(cond, [(0, 8, 12, 20)])  # latent columns 12..19 of 16: 4 at the end, 4 at the start
    torch.testing.assert_close(crop, torch.cat([cond[..., 96:], cond[..., :32]], dim=-1), atol=0, rtol=0)


@torch.no_grad()
def test_multi_controlnet_with_per_net_guidance_window_matches_reference_loop(multi_pipe):
    latents = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(3))
    conditions = [condition(64, 128, seed=4), condition(64, 128, seed=5)]
    kwargs = {"num_inference_steps": 3, "stride": 4, "sync_weight": 20.0, "sync_thres": 2}
    ours = latents_of(
        multi_pipe,
        **kwargs,
        image=conditions,
        latents=latents,
        controlnet_conditioning_scale=[0.7, 1.2],
        control_guidance_start=[0.0, 0.3],
        control_guidance_end=[0.6, 1.0],
        view_batch_size=2,
    )
    # 3 steps: ControlNet 0 in [0, 0.6] acts on steps 0 (0..1/3) and not 1 (1/3..2/3); ControlNet 1 from step 1 on.
    scales = [[0.7, 0.0], [0.0, 1.2], [0.0, 1.2]]
    expected = reference_loop(
        multi_pipe, latents, conditions, scales, steps=3, stride=4, sync_weight=20.0, sync_thres=2
    )
    torch.testing.assert_close(ours, expected, **TOLERANCE)


@torch.no_grad()
def test_multi_controlnet_with_one_scale_zero_equals_the_other_alone(parts, pipe, multi_pipe):
    kwargs = {"height": 64, "width": 128, "num_inference_steps": 2, "stride": 4, "sync_thres": 1, "view_batch_size": 3}
    cond = condition(64, 128, seed=6)
    alone = latents_of(pipe, **kwargs, image=cond, controlnet_conditioning_scale=0.5)
    multi = latents_of(
        multi_pipe, **kwargs, image=[cond, condition(64, 128, seed=7)], controlnet_conditioning_scale=[0.5, 0.0]
    )
    torch.testing.assert_close(multi, alone, **EXACT)


def test_control_keep_follows_diffusers_schedule():
    keep = SyncDiffusionControlNetPipeline.control_keep(4, [0.0, 0.25], [0.5, 1.0])
    assert keep == [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 1.0]]


# ---------------------------------------------------------------------------------------------------------------
# Inputs and loading
# ---------------------------------------------------------------------------------------------------------------

BAD_INPUTS = [
    ({"image": condition(64, 120), "width": 128}, "image"),
    ({"image": condition(64, 128), "width": 256}, "image"),
    ({"image": condition(60, 128)}, "image"),
    ({"image": None}, "image"),
    ({"controlnet_conditioning_scale": [1.0, 0.5]}, "controlnet_conditioning_scale"),
    ({"controlnet_conditioning_scale": "1"}, "controlnet_conditioning_scale"),
    ({"control_guidance_start": 0.6, "control_guidance_end": 0.5}, "control_guidance_start"),
    ({"control_guidance_end": 1.5}, "control_guidance_end"),
    ({"control_guidance_start": [0.0, 0.1]}, "control_guidance_start"),
    ({"stride": 0}, "stride"),
]
MULTI_BAD_INPUTS = [
    ({"image": condition(64, 128)}, "image"),
    ({"image": [condition(64, 128)] * 3}, "image"),
    ({"image": [condition(64, 128), condition(64, 96)]}, "image"),
    (
        {"image": [condition(64, 128)] * 2, "controlnet_conditioning_scale": [1.0, 0.5, 0.2]},
        "controlnet_conditioning_scale",
    ),
    ({"image": [condition(64, 128)] * 2, "control_guidance_end": [1.0, 0.5, 0.2]}, "control_guidance_end"),
]


def assert_rejected_before_any_model(pipe, kwargs, argument):
    def fail(*args, **kw):
        raise AssertionError("a model ran before the inputs were checked")

    for model in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.controlnet):
        model.register_forward_pre_hook(fail)
    call = {"prompt": "a photo", "image": condition(64, 128), "num_inference_steps": 2, "stride": 4, **kwargs}
    with pytest.raises(ValueError, match=f"`{argument}`"):
        pipe(**call)


@pytest.mark.parametrize("kwargs, argument", BAD_INPUTS, ids=[f"{a}-{i}" for i, (_, a) in enumerate(BAD_INPUTS)])
def test_bad_input_raises_before_any_model_runs(pipe, kwargs, argument):
    assert_rejected_before_any_model(pipe, kwargs, argument)


@pytest.mark.parametrize(
    "kwargs, argument", MULTI_BAD_INPUTS, ids=[f"{a}-{i}" for i, (_, a) in enumerate(MULTI_BAD_INPUTS)]
)
def test_bad_multi_controlnet_input_raises_before_any_model_runs(multi_pipe, kwargs, argument):
    assert_rejected_before_any_model(multi_pipe, kwargs, argument)


def test_wrong_size_message_names_both_sizes(pipe):
    with pytest.raises(ValueError, match=r"`image` has to cover the whole panorama, 64x256 .* but is 64x128"):
        pipe("a photo", image=condition(64, 128), width=256)


def test_from_pipe_shares_models(parts, lpips_module):
    controlnet_pipe = build(StableDiffusionControlNetPipeline, parts, controlnet=parts["controlnets"][0])
    pipe = SyncDiffusionControlNetPipeline.from_pipe(controlnet_pipe)
    assert pipe.unet is controlnet_pipe.unet and pipe.controlnet is controlnet_pipe.controlnet
    sync_pipe = build(SyncDiffusionPipeline, parts, lpips_module)
    pipe = SyncDiffusionControlNetPipeline.from_pipe(sync_pipe, controlnet=controlnet_pipe.controlnet)
    assert pipe.unet is sync_pipe.unet and pipe.controlnet is controlnet_pipe.controlnet
    assert pipe.perceptual_loss("cpu") is lpips_module  # LPIPS is not a component; it is shared too


# ---------------------------------------------------------------------------------------------------------------
# The command: --control-image and --controlnet
# ---------------------------------------------------------------------------------------------------------------

BASE = ["a photo of a valley", "--model", "tiny", "--steps", "2", "--stride", "4", "--sync-thres", "1", "--seed", "0"]


def write_condition(path, height=64, width=128):
    pixels = (condition(height, width)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def test_command_writes_the_pipelines_panorama_at_the_conditions_size(tmp_path, capsys, monkeypatch):
    built = []
    monkeypatch.setattr(cli, "with_controlnet", lambda *args: built.append(with_controlnet(*args)) or built[-1])
    control, output = write_condition(tmp_path / "depth.png"), tmp_path / "panorama.png"
    argv = ["--control-image", control, "--controlnet", "tiny", "--controlnet-scale", "0.8", "-o", str(output)]
    assert main(BASE + argv) == 0
    assert "wrote" in capsys.readouterr().out

    # The same call on the pipeline the command built: a tiny pipeline with a tiny ControlNet.
    (pipe,) = built
    assert isinstance(pipe, SyncDiffusionControlNetPipeline)
    with torch.no_grad():
        expected = pipe(
            "a photo of a valley",
            image=Image.open(control).convert("RGB"),
            num_inference_steps=2,
            stride=4,
            sync_thres=1,
            controlnet_conditioning_scale=0.8,
            generator=torch.Generator().manual_seed(0),
            view_batch_size="auto",  # the command's default
        ).images[0]
    with Image.open(output) as written:
        assert written.size == (128, 64)  # the condition's size: no --height or --width given
        np.testing.assert_array_equal(np.asarray(written.convert("RGB")), np.asarray(expected))


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--controlnet", "tiny"], ["--control-image PATH is missing"]),
        (
            ["--control-image", "{control}", "--controlnet", "tiny", "--model", "some/model"],
            ["--controlnet tiny", "--model tiny"],
        ),
        (
            ["--control-image", "{control}", "--controlnet", "lllyasviel/control_v11f1p_sd15_depth"],
            ["does not fit", "--controlnet tiny"],
        ),
        (["--control-image", "{missing}", "--controlnet", "tiny"], ["--control-image", "cannot be read"]),
        (
            ["--control-image", "{control}", "--controlnet", "tiny", "--width", "256"],
            ["--control-image has to cover the whole panorama, 64x256"],
        ),
    ],
    ids=["no_image", "tiny_controlnet_real_model", "real_controlnet_tiny_model", "unreadable_image", "wrong_size"],
)
def test_command_errors_are_one_line_naming_the_flag(tmp_path, capsys, flags, needles):
    values = {"control": write_condition(tmp_path / "depth.png"), "missing": str(tmp_path / "missing.png")}
    output = tmp_path / "out.png"
    assert main(BASE + [flag.format(**values) for flag in flags] + ["-o", str(output)]) != 0
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("syncdiffusion: error: "), err
    assert all(needle in lines[0] for needle in needles), lines[0]
    assert not output.exists()


def test_saved_pipeline_carries_its_source_and_loads_back(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "syncdiffusion_controlnet.py").is_file()
    loaded = SyncDiffusionControlNetPipeline.from_pretrained(tmp_path / "saved")
    assert isinstance(loaded, SyncDiffusionControlNetPipeline)
    torch.testing.assert_close(
        loaded.controlnet.controlnet_mid_block.weight, pipe.controlnet.controlnet_mid_block.weight
    )
