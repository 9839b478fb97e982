"""Pass counts of every synchronization mode, counted with hooks (`syncdiffusion_utils.counting.PassCounter`).

Per synchronized step with N views the exact mode makes 2N-1 UNet forward, N-1 UNet backward, N VAE-decoder
forward, N-1 VAE-decoder backward and N-1 LPIPS view-passes; each fast mode removes what it says it removes. With
region prompts a view's denoiser passes are made once per prompt present in it.
Images are 64 x 128 pixels with 64-pixel windows at stride 4 latents: N = 3 views.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.utils.checkpoint

from syncdiffusion_utils.counting import (
    PassCounter,
    StepRecorder,
    expected_plain_step,
    expected_sync_step,
    prompts_per_view,
)
from syncdiffusion_utils.testing import make_lpips, make_tiny_decoder, tiny_pipeline


HEIGHT, WIDTH, STRIDE = 64, 128, 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(sample_size=8)


@pytest.fixture(scope="module")
def num_views(pipe):
    n = len(pipe.get_views(HEIGHT, WIDTH, stride=STRIDE))
    assert n == 3
    return n


@pytest.fixture(scope="module")
def tiny_decoder():
    return make_tiny_decoder(width_mult=0.25)


def run(pipe, counter_kwargs=None, **kwargs):
    """One call (by default one synchronized step, latent output) under a `PassCounter`; `(counts, output)`."""
    call = {
        "prompt": "a lighthouse",
        "height": HEIGHT,
        "width": WIDTH,
        "stride": STRIDE,
        "num_inference_steps": 1,
        "generator": torch.Generator().manual_seed(0),
        "output_type": "latent",
    }
    call.update(kwargs)
    with PassCounter(pipe, sync_decoder=call.get("sync_decoder"), **(counter_kwargs or {})) as counter:
        output = pipe(**call).images
    return counter.as_dict(), output


def exact_counts(n):
    return {
        "unet_fwd": 2 * n - 1,
        "unet_recompute": 0,
        "unet_bwd": n - 1,
        "vae_dec_fwd": n,
        "vae_dec_recompute": 0,
        "vae_dec_bwd": n - 1,
        "sync_dec_fwd": 0,
        "sync_dec_bwd": 0,
        "dec_fwd": n,
        "dec_bwd": n - 1,
        "lpips_fwd": n - 1,
        "lpips_bwd": n - 1,
        "final_decode": 0,
    }


def assert_counts(counts, expected):
    assert {key: counts[key] for key in expected} == expected


@pytest.mark.parametrize("view_batch_size", [1, 2, 3])
def test_exact_mode_makes_no_wasted_pass(pipe, num_views, view_batch_size):
    counts, _ = run(pipe, view_batch_size=view_batch_size)
    assert_counts(counts, exact_counts(num_views))


def test_counts_are_per_view_whatever_the_image_batch(pipe, num_views):
    counts, _ = run(pipe, num_images_per_prompt=2, view_batch_size=2)
    assert_counts(counts, exact_counts(num_views))
    # Counting samples instead (one image assumed) doubles every count: each view is in the batch twice.
    counts, _ = run(pipe, counter_kwargs={"num_images": 1}, num_images_per_prompt=2)
    assert counts["unet_fwd"] == 2 * (2 * num_views - 1)
    assert counts["lpips_fwd"] == 2 * (num_views - 1)


def test_guidance_batch_counts_once(pipe, num_views):
    # Without guidance the UNet sees each view once; the counts are the same as with the doubled batch.
    counts, _ = run(pipe, guidance_scale=1.0)
    assert_counts(counts, exact_counts(num_views))


def test_multidiffusion_and_final_decode(pipe, num_views):
    counts, _ = run(pipe, sync_weight=0.0, output_type="np")
    assert_counts(
        counts,
        {"unet_fwd": num_views, "unet_bwd": 0, "dec_fwd": 0, "dec_bwd": 0, "lpips_fwd": 0, "final_decode": 1},
    )
    # The panorama's own decode is not a view-pass; with two images it is still one per image.
    counts, _ = run(pipe, output_type="np", num_images_per_prompt=2)
    assert counts["final_decode"] == 1
    assert counts["vae_dec_fwd"] == num_views


def test_per_step_counts(pipe, num_views):
    """Two steps, the first synchronized: the second is a plain MultiDiffusion step."""
    with PassCounter(pipe) as counter, StepRecorder(pipe, counter) as recorder:
        pipe(
            "a lighthouse",
            height=HEIGHT,
            width=WIDTH,
            stride=STRIDE,
            num_inference_steps=2,
            sync_thres=1,
            output_type="latent",
            callback_on_step_end=recorder,
        )
    first, second = recorder.step_counts
    assert_counts(first, exact_counts(num_views))
    assert_counts(second, {"unet_fwd": num_views, "unet_bwd": 0, "dec_fwd": 0, "dec_bwd": 0, "lpips_fwd": 0})
    assert counter.unet_fwd == 3 * num_views - 1
    assert len(recorder.step_seconds) == len(recorder.step_cpu_seconds) == 2


@pytest.mark.parametrize(
    "kwargs, unet_fwd, unet_bwd",
    [
        ({"sync_gradient": "x0"}, "2N-1", "0"),  # the gradient pass's forward runs without autograd
        ({"sync_reuse_noise": True}, "N", "N-1"),  # no second forward after the update
        ({"sync_mode": "fast"}, "N", "0"),  # both
        ({"sync_mode": "fast", "sync_gradient": "unet"}, "N", "N-1"),  # explicit settings override the mode
        ({"sync_mode": "fast", "sync_reuse_noise": False}, "2N-1", "0"),
        ({"sync_mode": "exact", "sync_gradient": "x0", "sync_reuse_noise": True}, "N", "0"),
    ],
)
def test_fast_modes_remove_what_they_say(pipe, num_views, kwargs, unet_fwd, unet_bwd):
    n = num_views
    value = {"2N-1": 2 * n - 1, "N": n, "N-1": n - 1, "0": 0}
    counts, _ = run(pipe, **kwargs)
    expected = {**exact_counts(n), "unet_fwd": value[unet_fwd], "unet_bwd": value[unet_bwd]}
    assert_counts(counts, expected)
    gradient = kwargs.get("sync_gradient") or ("x0" if kwargs.get("sync_mode") == "fast" else "unet")
    reuse = kwargs.get("sync_reuse_noise", kwargs.get("sync_mode") == "fast")
    formula = expected_sync_step(n, gradient=gradient, reuse_noise=reuse)
    assert_counts(counts, formula)


def test_sync_decoder_replaces_the_vae_in_the_loss(pipe, num_views, tiny_decoder):
    n = num_views
    counts, _ = run(pipe, sync_decoder=tiny_decoder, output_type="np")
    assert_counts(
        counts,
        {
            "vae_dec_fwd": 0,
            "vae_dec_bwd": 0,
            "final_decode": 1,  # the VAE still decodes the panorama
            "sync_dec_fwd": n,
            "sync_dec_bwd": n - 1,
            "dec_fwd": n,
            "dec_bwd": n - 1,
            "unet_fwd": 2 * n - 1,
            "unet_bwd": n - 1,
            "lpips_fwd": n - 1,
        },
    )


def test_sync_decoder_composes_with_fast_mode(pipe, num_views, tiny_decoder):
    n = num_views
    counts, _ = run(pipe, sync_mode="fast", sync_decoder=tiny_decoder, sync_lpips_size=32)
    assert_counts(counts, {"unet_fwd": n, "unet_bwd": 0, "vae_dec_fwd": 0, "sync_dec_fwd": n, "sync_dec_bwd": n - 1})
    assert counts["lpips_sizes"] == [[32, 32]]


def test_lpips_size_resizes_what_lpips_sees(pipe, num_views):
    counts, _ = run(pipe)
    assert counts["lpips_sizes"] == [[64, 64]]
    counts, _ = run(pipe, sync_lpips_size=32)
    assert counts["lpips_sizes"] == [[32, 32]]
    assert counts["lpips_fwd"] == num_views - 1
    # Larger than the images: nothing to resize.
    counts, _ = run(pipe, sync_lpips_size=128)
    assert counts["lpips_sizes"] == [[64, 64]]


def test_gradient_checkpointing_recomputes_and_changes_nothing(pipe, num_views):
    n = num_views
    plain_counts, plain = run(pipe)
    counts, checkpointed = run(pipe, sync_gradient_checkpointing=True)
    torch.testing.assert_close(checkpointed, plain, atol=1e-5, rtol=0)
    # The backwards re-run the UNet and the VAE decoder once per synchronized view: counted as forwards.
    assert_counts(
        counts,
        {
            **exact_counts(n),
            "unet_fwd": 2 * n - 1 + (n - 1),
            "unet_recompute": n - 1,
            "vae_dec_fwd": n + (n - 1),
            "vae_dec_recompute": n - 1,
            "dec_fwd": n + (n - 1),
        },
    )
    assert_counts(counts, expected_sync_step(n, checkpointing=True))
    assert plain_counts["unet_recompute"] == plain_counts["vae_dec_recompute"] == 0
    # Without a UNet backward there is nothing to recompute in the UNet.
    counts, _ = run(pipe, sync_gradient="x0", sync_gradient_checkpointing=True)
    assert counts["unet_recompute"] == 0 and counts["vae_dec_recompute"] == n - 1


def test_counter_changes_nothing_and_cleans_up(pipe):
    kwargs = {
        "prompt": "a lighthouse",
        "height": HEIGHT,
        "width": WIDTH,
        "stride": STRIDE,
        "num_inference_steps": 1,
        "output_type": "np",
    }
    without = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    hooks_before = {
        name: (len(m._forward_pre_hooks), len(m._forward_hooks), len(m._backward_hooks), len(m._backward_pre_hooks))
        for name, m in pipe.unet.named_modules()
    }
    with PassCounter(pipe):
        with_counter = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(with_counter, without)
    hooks_after = {
        name: (len(m._forward_pre_hooks), len(m._forward_hooks), len(m._backward_hooks), len(m._backward_pre_hooks))
        for name, m in pipe.unet.named_modules()
    }
    assert hooks_after == hooks_before
    for name in ("decode_for_sync", "prepare_latents", "perceptual_loss"):
        assert name not in pipe.__dict__


def test_perceptual_loss_set_after_the_counter_starts(pipe, num_views):
    """The default LPIPS is built lazily: a module handed out by `perceptual_loss` later is still counted."""
    previous = pipe._perceptual_loss
    pipe.set_perceptual_loss(None)
    try:
        with PassCounter(pipe) as counter:
            pipe.set_perceptual_loss(make_lpips())
            pipe(
                "a lighthouse",
                height=HEIGHT,
                width=WIDTH,
                stride=STRIDE,
                num_inference_steps=1,
                output_type="latent",
            )
        assert counter.lpips_fwd == num_views - 1
        assert counter.lpips_bwd == num_views - 1
    finally:
        pipe.set_perceptual_loss(previous)


# ----------------------------------------------------------------------------------------------------------------
# Region prompts: a view's denoiser passes are made once per prompt present in it
# ----------------------------------------------------------------------------------------------------------------


def box_mask(x0, x1):
    """A hard mask of the panorama's size, 1 in pixel columns `x0:x1` over the full height."""
    mask = torch.zeros(HEIGHT, WIDTH)
    mask[:, x0:x1] = 1.0
    return mask


# Latent columns of the views: [0, 8), [4, 12) (the anchor), [8, 16). Region A covers latents 0-7, B 10-15:
# view 0 holds A alone (no background left), the anchor A, B and the background (latents 8-9), view 2 B and the
# background. Every view costs a different number of prompts, so a formula off by a view shows.
REGION_MASKS = [box_mask(0, 64), box_mask(80, 128)]
PROMPTS_PER_VIEW = [1, 3, 2]


def test_prompts_per_view_from_the_masks(pipe):
    views = pipe.get_views(HEIGHT, WIDTH, stride=STRIDE)
    assert prompts_per_view(REGION_MASKS, views) == PROMPTS_PER_VIEW
    # an empty region is present nowhere; a single pixel is present where its 8x8 block is
    assert prompts_per_view(REGION_MASKS + [torch.zeros(HEIGHT, WIDTH)], views) == PROMPTS_PER_VIEW
    speck = torch.zeros(HEIGHT, WIDTH)
    speck[0, 127] = 1.0
    assert prompts_per_view(REGION_MASKS + [speck], views) == [1, 3, 3]
    # a soft mask leaves the background some weight: present with it
    assert prompts_per_view([0.5 * box_mask(0, 128)], views) == [2, 2, 2]
    # circular views wrap: the last one sees region A again
    circular = pipe.get_views(HEIGHT, WIDTH, stride=STRIDE, circular_padding=True)
    assert circular[-1][3] > WIDTH // 8 and prompts_per_view(REGION_MASKS, circular)[-1] == 2
    with pytest.raises(ValueError, match="view_prompts"):
        expected_plain_step(3, view_prompts=[1, 2])
    with pytest.raises(ValueError, match="region_masks"):
        prompts_per_view([box_mask(0, 64), torch.zeros(HEIGHT, 64)], views)


def region_step_counts(pipe, masks, **kwargs):
    """Two steps, the first synchronized (unless `sync_weight=0`), with the region prompts: each step's counts."""
    prompts = [f"region {k}" for k in range(len(masks))]
    with PassCounter(pipe) as counter, StepRecorder(pipe, counter) as recorder:
        pipe(
            "a lighthouse",
            height=HEIGHT,
            width=WIDTH,
            stride=STRIDE,
            num_inference_steps=2,
            sync_thres=1,
            output_type="latent",
            region_prompts=prompts,
            region_masks=masks,
            callback_on_step_end=recorder,
            **kwargs,
        )
    return recorder.step_counts


@pytest.mark.parametrize(
    "kwargs, settings",
    [
        ({}, {}),
        ({"sync_mode": "fast"}, {"gradient": "x0", "reuse_noise": True}),
        ({"sync_gradient_checkpointing": True}, {"checkpointing": True}),
        ({"sync_weight": 0.0}, None),
    ],
)
def test_region_counts_equal_the_formula(pipe, num_views, kwargs, settings):
    first, second = region_step_counts(pipe, REGION_MASKS, **kwargs)
    plain = expected_plain_step(num_views, view_prompts=PROMPTS_PER_VIEW)
    if settings is None:  # MultiDiffusion with regions: one pass per prompt present in each view, every step
        assert_counts(first, plain)
    else:
        assert_counts(first, expected_sync_step(num_views, view_prompts=PROMPTS_PER_VIEW, **settings))
    assert_counts(second, plain)
    assert second["unet_fwd"] == sum(PROMPTS_PER_VIEW) == 6
    if not kwargs:
        # exact: the anchor's 3 prompts, then 1 + 2 prompts of the other views twice (gradient pass, after the update)
        assert (first["unet_fwd"], first["unet_bwd"]) == (3 + 2 * (1 + 2), 1 + 2)
        # the loss images are one per view: decoder and LPIPS as without regions
        assert (first["dec_fwd"], first["dec_bwd"], first["lpips_fwd"]) == (num_views, num_views - 1, num_views - 1)


def test_a_region_covering_no_latent_pixel_adds_no_pass(pipe, num_views):
    """An all-zero mask is present in no view: the same passes as without it, every step."""
    empty = torch.zeros(HEIGHT, WIDTH)
    with_empty = region_step_counts(pipe, REGION_MASKS + [empty])
    assert with_empty == region_step_counts(pipe, REGION_MASKS)
    assert_counts(with_empty[0], expected_sync_step(num_views, view_prompts=PROMPTS_PER_VIEW))


# ----------------------------------------------------------------------------------------------------------------
# Outputs torch's module backward hooks do not see (Z-Image's transformer returns a list of images)
# ----------------------------------------------------------------------------------------------------------------


class ListTransformer(torch.nn.Module):
    """A denoiser returning its images as a list (as `ZImageTransformer2DModel` does) or in a dict, checkpointable."""

    def __init__(self, output="list", checkpointing=False):
        super().__init__()
        self.block = torch.nn.Linear(4, 4)
        self.output, self.checkpointing = output, checkpointing

    def forward(self, x):
        if self.checkpointing:
            y = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)
        else:
            y = self.block(x)
        images = list(y.unbind(0))
        return (images,) if self.output == "list" else {"sample": images}


def toy_pipe(**kwargs):
    """The least a `PassCounter` counts: a transformer and a VAE (here a no-op)."""
    return SimpleNamespace(transformer=ListTransformer(**kwargs), vae=torch.nn.Identity())


@pytest.mark.parametrize("output", ["list", "dict"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_backward_through_a_list_output_is_counted_with_the_forwards_batch(output, checkpointing):
    pipe = toy_pipe(output=output, checkpointing=checkpointing)
    x = torch.randn(3, 4, requires_grad=True)
    with PassCounter(pipe) as counter:
        result = pipe.transformer(x)
        images = result[0] if output == "list" else result["sample"]
        torch.stack(images).square().sum().backward(retain_graph=True)
        assert (counter.transformer_fwd, counter.transformer_bwd) == (3 + 3 * checkpointing, 3)
        assert counter.transformer_recompute == 3 * checkpointing
        # a second backward through the same forward is a second backward
        torch.stack(images).sum().backward()
        assert counter.transformer_bwd == 6
        with torch.no_grad():
            pipe.transformer(x)  # no gradient: nothing to hook
    assert (counter.transformer_fwd, counter.transformer_bwd) == (6 + 6 * checkpointing, 6)


def test_a_list_of_images_as_input_counts_its_length():
    """`ZImagePipeline` passes one latent per image, as a list: its length is the batch."""

    class ListInput(torch.nn.Module):
        def forward(self, images):
            return ([image * 2 for image in images],)

    pipe = SimpleNamespace(transformer=ListInput(), vae=torch.nn.Identity())
    with PassCounter(pipe) as counter:
        pipe.transformer([torch.zeros(16, 1, 4, 4)] * 3)
    assert counter.transformer_fwd == 3  # not 16, the first image's channels


@pytest.fixture(scope="module")
def z_image_pipe():
    from pipeline_syncdiffusion_z_image import SyncDiffusionZImagePipeline
    from syncdiffusion_utils.testing import tiny_z_image_pipeline

    return tiny_z_image_pipeline(pipeline_class=SyncDiffusionZImagePipeline)


# The decoder's full backward hook also fires where only its output needs a gradient; torch says so.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize(
    "kwargs, formula",
    [
        ({}, {}),
        ({"view_batch_size": 2, "sync_gradient_checkpointing": True}, {"checkpointing": True}),
        ({"num_images_per_prompt": 2}, {}),
        ({"guidance_scale": 0.0}, {}),
        ({"sync_mode": "fast"}, {"gradient": "x0", "reuse_noise": True}),
    ],
)
def test_z_image_exact_mode_counts_the_transformers_backwards_as_the_formula(z_image_pipe, kwargs, formula):
    """Z-Image's transformer returns a list of images, so torch's module backward hooks never fire on it: the
    counter hooks the tensors of its output instead. Its final layer, which returns a tensor, witnesses the
    backwards independently: one per gradient pass, on the doubled batch with guidance."""
    pipe = z_image_pipe
    final_layer = next(iter(pipe.transformer.all_final_layer.values()))
    final_backwards = []
    handle = final_layer.register_full_backward_hook(lambda m, gi, go: final_backwards.append(go[0].shape[0]))
    try:
        with PassCounter(pipe) as counter:
            pipe(
                "a beach",
                height=64,
                width=128,
                window_size=64,
                stride=4,
                num_inference_steps=1,
                max_sequence_length=16,
                output_type="latent",
                **kwargs,
            )
    finally:
        handle.remove()
    expected = expected_sync_step(3, denoiser="transformer", **{"gradient": "transformer", **formula})
    assert_counts(counter.as_dict(), expected)
    images = kwargs.get("num_images_per_prompt", 1) * (1 if kwargs.get("guidance_scale") == 0.0 else 2)
    assert sum(final_backwards) == expected["transformer_bwd"] * images
