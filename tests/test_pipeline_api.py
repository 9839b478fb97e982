"""The diffusers contract: inputs, views, loading, callbacks, dtypes and memory options."""

import shutil

import numpy as np
import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from diffusers import DiffusionPipeline, HeunDiscreteScheduler, StableDiffusionPanoramaPipeline
from diffusers.models.attention_processor import AttnProcessor

import pipeline_syncdiffusion
from pipeline_syncdiffusion import SyncDiffusionPipeline
from syncdiffusion_utils.testing import save_tiny_pipeline, tiny_pipeline


SMALL = {"height": 64, "width": 128, "num_inference_steps": 2, "stride": 4}


def latents_of(pipe, **kwargs):
    return pipe(
        "a photo", **{**SMALL, **kwargs}, generator=torch.Generator().manual_seed(0), output_type="latent"
    ).images


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear ValueError naming the argument, before any model runs
# ---------------------------------------------------------------------------------------------------------------

# The panorama and sync_* arguments of every class: tests/test_contract.py.
BAD_INPUTS = [
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
    ({"guidance_rescale": 1.5}, "guidance_rescale"),
    ({"prompt_embeds": torch.zeros(1, 77, 32)}, "prompt_embeds"),
    ({"prompt": None}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"negative_prompt": "x", "negative_prompt_embeds": torch.zeros(1, 77, 32)}, "negative_prompt"),
    (
        {"prompt": None, "prompt_embeds": torch.zeros(1, 77, 32), "negative_prompt_embeds": torch.zeros(1, 70, 32)},
        "negative_prompt_embeds",
    ),
    ({"callback_on_step_end_tensor_inputs": ["noise_pred"]}, "callback_on_step_end_tensor_inputs"),
    ({"ip_adapter_image_embeds": torch.zeros(2, 1, 32)}, "ip_adapter_image_embeds"),
]


@pytest.mark.parametrize("kwargs, argument", BAD_INPUTS, ids=[f"{a}-{i}" for i, (_, a) in enumerate(BAD_INPUTS)])
def test_bad_input_raises_before_any_model_runs(pipe, kwargs, argument):
    def fail(*args, **kw):
        raise AssertionError("a model ran before the inputs were checked")

    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        model.register_forward_pre_hook(fail)
    call = {"prompt": "a photo", **SMALL, **kwargs}
    with pytest.raises(ValueError, match=f"`{argument}`"):
        pipe(**call)


def test_bad_value_is_named_in_the_message(pipe):
    with pytest.raises(ValueError, match=r"`stride` has to be an integer in 1\.\.8 .* but is 12"):
        pipe("a photo", **{**SMALL, "stride": 12})


def test_sample_prediction_with_x0_gradient_is_rejected(pipe):
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="sample")
    with pytest.raises(ValueError, match="sync_gradient='x0'"):
        pipe("a photo", **SMALL, sync_mode="fast")


# ---------------------------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------------------------


def coverage(views, height, width):
    covered = np.zeros((height, width), dtype=int)
    for h0, h1, w0, w1 in views:
        covered[h0:h1, np.arange(w0, w1) % width] += 1
    return covered


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize(
    "height, width, stride", [(64, 128, 4), (64, 200, 8), (136, 200, 3), (64, 64, 8), (40, 200, 5)]
)
def test_views_cover_every_latent_pixel(pipe, height, width, stride, circular):
    views = pipe.get_views(height * 8, width * 8, stride=stride, circular_padding=circular)
    n = pipe.unet.config.sample_size
    assert all(h1 - h0 == min(n, height) and w1 - w0 == min(n, width) for h0, h1, w0, w1 in views)
    assert coverage(views, height, width).min() >= 1
    assert len(set(views)) == len(views)


def test_edge_views_are_flush_with_the_border(pipe):
    # 25 latents wide, window 8, stride 8: starts 0, 8, 16 and one flush view at 17.
    views = pipe.get_views(64, 200, stride=8)
    assert [v[2] for v in views] == [0, 8, 16, 17]
    # The deprecated pipeline stops at 16 and never denoises the last latent column.
    deprecated = StableDiffusionPanoramaPipeline.get_views(pipe, 64, 200, window_size=8, stride=8)
    assert coverage(deprecated, 8, 25)[:, -1].max() == 0


def test_circular_views_wrap_around_and_rows_stack(pipe):
    views = pipe.get_views(128, 128, stride=4, circular_padding=True)  # 16x16 latents
    assert len(views) == 3 * 4  # rows at 0, 4, 8; columns at 0, 4, 8, 12 (the last wraps)
    assert (8, 16, 12, 20) in views


def test_window_follows_the_unet_and_the_vae():
    """SD 2.x 768 models have a 96-latent window; other VAEs another factor. Nothing assumes 64 and 8."""
    pipe = tiny_pipeline(sample_size=12, lpips_module=False)
    views = pipe.get_views(768, 2048, stride=16)
    assert {(v[1] - v[0], v[3] - v[2]) for v in views} == {(12, 12)}
    assert views[-1][3] == 2048 // 8
    pipe.vae_scale_factor = 4  # what a 3-block VAE gives
    assert pipe.get_views(48, 96, stride=12)[-1] == (0, 12, 12, 24)


@torch.no_grad()
def test_v_prediction_with_a_non_64_window_runs():
    pipe = tiny_pipeline(sample_size=12)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="v_prediction")
    image = pipe("a photo", height=96, width=160, num_inference_steps=2, stride=4, output_type="np").images
    assert image.shape == (1, 96, 160, 3) and np.isfinite(image).all()


# ---------------------------------------------------------------------------------------------------------------
# diffusers conventions
# ---------------------------------------------------------------------------------------------------------------


def test_generator_makes_it_deterministic(pipe):
    first, again = latents_of(pipe), latents_of(pipe)
    other = pipe("a photo", **SMALL, generator=torch.Generator().manual_seed(1), output_type="latent").images
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert (first - other).abs().max() > 1e-2


def test_callback_on_step_end_sees_and_replaces_tensors(pipe):
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((step, {k: tuple(v.shape) for k, v in tensors.items()}))
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 1 else {}

    inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    out = pipe(
        "a photo",
        **SMALL,
        num_images_per_prompt=2,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=inputs,
        output_type="latent",
    ).images
    assert [s for s, _ in seen] == [0, 1]
    assert seen[0][1] == {
        "latents": (2, 4, 8, 16),
        "prompt_embeds": (2, 77, 32),
        "negative_prompt_embeds": (2, 77, 32),
    }
    assert out.abs().max() == 0  # the callback's latents were used


def test_callback_can_replace_prompt_embeds(pipe):
    def callback(pipeline, step, timestep, tensors):
        return {"prompt_embeds": torch.zeros_like(tensors["prompt_embeds"])}

    replaced = pipe(
        "a photo",
        **{**SMALL, "num_inference_steps": 3},
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
        output_type="latent",
    ).images
    assert (replaced - latents_of(pipe, num_inference_steps=3)).abs().max() > 1e-3


def test_prompt_embeds_give_the_same_images_as_prompts(pipe):
    positive, negative = pipe.encode_prompt("a photo", "cpu", 1, True, "blurry")
    from_prompt = latents_of(pipe, negative_prompt="blurry")
    from_embeds = pipe(
        prompt_embeds=positive,
        negative_prompt_embeds=negative,
        **SMALL,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    torch.testing.assert_close(from_prompt, from_embeds, atol=1e-5, rtol=0)


def test_clip_skip_uses_an_earlier_text_encoder_layer(pipe):
    embeds, _ = pipe.encode_prompt("a photo", "cpu", 1, False, clip_skip=1)
    ids = pipe.tokenizer("a photo", padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    final_layer_norm = getattr(
        pipe.text_encoder, "text_model", pipe.text_encoder
    ).final_layer_norm  # nested in older transformers
    torch.testing.assert_close(embeds, final_layer_norm(hidden))
    assert (latents_of(pipe, clip_skip=1) - latents_of(pipe)).abs().max() > 1e-4


# `guidance_rescale` against diffusers' `rescale_noise_cfg` in the reference loop: test_synchronization.py.


@pytest.mark.parametrize("scheduler", ["ddim", "heun"])
def test_deprecated_callback_without_callback_steps_runs_every_step(pipe, scheduler):
    """`callback=` alone (as the panorama pipeline's users call it) is called after every real step, with its index
    and the panorama latents; Heun's two evaluations per step give one call."""
    if scheduler == "heun":
        pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    calls = []
    out = pipe(
        "a photo",
        **{**SMALL, "num_inference_steps": 3},
        sync_weight=0,
        output_type="latent",
        callback=lambda step, timestep, latents: calls.append((step, latents.clone())),
    )
    assert [step for step, _ in calls] == [0, 1, 2]
    torch.testing.assert_close(calls[-1][1], out.images, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# dtypes and memory options
# ---------------------------------------------------------------------------------------------------------------


def test_float16_synchronization_runs_lpips_in_float32(pipe):
    """LPIPS sees float32 images in a float16 pipeline; the latents stay float16. Whether the float16 update is
    right (against float32, with loss scaling) is test_fp16.py's."""
    pipe = pipe.to(torch.float16)
    lpips_dtypes = []
    pipe.perceptual_loss("cpu").register_forward_pre_hook(lambda m, args: lpips_dtypes.append(args[0].dtype))
    latents = pipe("a photo", **SMALL, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert lpips_dtypes and set(lpips_dtypes) == {torch.float32}
    assert latents.dtype == torch.float16 and torch.isfinite(latents).all()


def test_attention_slicing_gives_the_same_result(pipe):
    # Sliced attention computes, one slice at a time, exactly what diffusers' un-sliced `AttnProcessor` computes
    # (measured: bit-identical latents after a synchronized run). The default processor (SDPA) orders the sums
    # differently, and the synchronization gradient amplifies that float32 noise over the steps (1e-5 to 2e-4 here
    # and in CI), so the un-sliced reference is the same arithmetic, not SDPA; see the next test for SDPA.
    pipe.unet.set_attn_processor(AttnProcessor())
    plain = latents_of(pipe)
    pipe.enable_attention_slicing(1)
    torch.testing.assert_close(latents_of(pipe), plain, atol=1e-6, rtol=1e-6)


def test_sliced_and_sdpa_attention_agree_within_float32_noise(pipe):
    # One guided UNet call: SDPA and sliced attention differ by float32 rounding only (measured 7e-7 on outputs of
    # magnitude ~1.3); a slicing bug (a wrong slice, a lost scale) shows at 1e-2 and above.
    generator = torch.Generator().manual_seed(0)
    sample, states = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        sdpa = pipe.unet(sample, 500, encoder_hidden_states=states).sample
        pipe.enable_attention_slicing(1)
        sliced = pipe.unet(sample, 500, encoder_hidden_states=states).sample
    torch.testing.assert_close(sliced, sdpa, atol=1e-5, rtol=0)


def test_vae_tiling_decodes_the_panorama_in_tiles(pipe):
    decodes = []
    pipe.vae.decoder.register_forward_hook(lambda module, args, output: decodes.append(tuple(output.shape)))
    pipe.vae.enable_tiling()  # tiles of the VAE's sample_size: 64 pixels, so the 64x128 panorama needs several
    image = pipe("a photo", **SMALL, sync_weight=0, output_type="np").images
    assert image.shape == (1, 64, 128, 3) and np.isfinite(image).all()
    assert len(decodes) > 1 and all(shape[-1] < 128 for shape in decodes)


class WeightsAwayHook(ModelHook):
    """
    accelerate's `CpuOffload` without a second device: the previous model in the chain loses its weights while this
    one runs (`module.to("cpu")` swaps every parameter's data in place, as `param.data = ...` does here) and gets
    them back before its own forward.
    """

    def __init__(self, prev=None):
        self.prev = prev
        self.away = None

    def offload(self, module):
        self.away = {name: param.data for name, param in module.named_parameters()}
        for param in module.parameters():
            param.data = torch.empty(0)

    def pre_forward(self, module, *args, **kwargs):
        if self.prev is not None and self.prev[1].away is None:
            self.prev[1].offload(self.prev[0])
        if self.away is not None:
            for name, param in module.named_parameters():
                param.data = self.away[name]
            self.away = None
        return args, kwargs


def test_model_offloading_between_unet_and_decoder_keeps_the_result(pipe):
    """The decoder's forward takes the UNet's weights away, as `enable_model_cpu_offload` does; its backward still works."""
    plain = latents_of(pipe)
    unet_hook = WeightsAwayHook()
    vae_hook = WeightsAwayHook(prev=(pipe.unet, unet_hook))
    add_hook_to_module(pipe.unet, unet_hook)
    add_hook_to_module(pipe.vae, vae_hook)
    offloads = []
    unet_hook.offload = lambda module, offload=unet_hook.offload: (offloads.append(1), offload(module))
    torch.testing.assert_close(latents_of(pipe), plain, atol=1e-5, rtol=0)
    assert offloads  # the UNet really was without weights during the synchronization passes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="model CPU offload needs an accelerator")
def test_model_cpu_offload():
    pipe = tiny_pipeline()
    pipe.enable_model_cpu_offload()
    image = pipe("a photo", **SMALL, output_type="np").images
    assert np.isfinite(image).all()


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-model"))


def assert_loaded_pipeline_runs(pipe, lpips_module):
    assert type(pipe).__name__ == "SyncDiffusionPipeline"
    pipe.set_perceptual_loss(lpips_module)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo", **SMALL, output_type="np").images
    assert image.shape == (1, 64, 128, 3) and np.isfinite(image).all()


def test_load_with_custom_pipeline_file(saved_model, lpips_module):
    pipe = DiffusionPipeline.from_pretrained(
        saved_model, custom_pipeline=pipeline_syncdiffusion.__file__, trust_remote_code=True
    )
    assert_loaded_pipeline_runs(pipe, lpips_module)


def test_load_with_custom_pipeline_folder(saved_model, lpips_module, tmp_path):
    """A folder holding the file as `pipeline.py` is the layout of a Hub repo."""
    shutil.copy(pipeline_syncdiffusion.__file__, tmp_path / "pipeline.py")
    pipe = DiffusionPipeline.from_pretrained(saved_model, custom_pipeline=str(tmp_path), trust_remote_code=True)
    assert_loaded_pipeline_runs(pipe, lpips_module)


def test_swap_from_panorama_pipeline(saved_model, lpips_module):
    panorama = StableDiffusionPanoramaPipeline.from_pretrained(saved_model)
    assert_loaded_pipeline_runs(SyncDiffusionPipeline(**panorama.components), lpips_module)
    assert_loaded_pipeline_runs(SyncDiffusionPipeline.from_pipe(panorama), lpips_module)


def test_save_and_load_round_trip(pipe, lpips_module, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = SyncDiffusionPipeline.from_pretrained(tmp_path)
    assert_loaded_pipeline_runs(loaded, lpips_module)
    torch.testing.assert_close(latents_of(loaded), latents_of(pipe), atol=1e-6, rtol=0)


def test_safety_checker_runs_when_present(pipe):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    calls = []
    checker.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["clip_input"].shape), with_kwargs=True
    )
    pipe = type(pipe)(
        **{
            **pipe.components,
            "safety_checker": checker,
            "feature_extractor": CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
        }
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo", **SMALL, sync_weight=0, num_images_per_prompt=2, output_type="np")
    assert calls == [(2, 3, 32, 32)]
    assert len(out.nsfw_content_detected) == 2 and all(isinstance(x, bool) for x in out.nsfw_content_detected)
