"""SyncDiffusionXLPipeline's contract: loading (file, folder, Hub, from_pipe), input errors before any model runs."""

import shutil
import sys
import uuid

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from test_hub import fake_hub  # noqa: F401  (the fake Hub on 127.0.0.1, a fixture)

import pipeline_syncdiffusion_xl
from pipeline_syncdiffusion_xl import SyncDiffusionXLPipeline
from syncdiffusion_utils.testing import save_tiny_xl_pipeline


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved_xl_model(tmp_path_factory):
    """A tiny SDXL model folder whose model_index.json names StableDiffusionXLPipeline."""
    return str(save_tiny_xl_pipeline(tmp_path_factory.mktemp("tiny-xl")))


def generate(pipe, lpips_module, **kwargs):
    pipe.set_perceptual_loss(lpips_module)
    pipe.set_progress_bar_config(disable=True)
    call = {"height": 64, "width": 128, "stride": 4, "num_inference_steps": 2, "sync_thres": 1, "output_type": "np"}
    return pipe("a cat", **{**call, **kwargs}, generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def reference_images(saved_xl_model, lpips_module):
    return generate(SyncDiffusionXLPipeline.from_pretrained(saved_xl_model), lpips_module)


def assert_same_pipeline(pipe, lpips_module, reference_images):
    assert type(pipe).__name__ == "SyncDiffusionXLPipeline"
    images = generate(pipe, lpips_module)
    assert images.shape == (1, 64, 128, 3)
    np.testing.assert_allclose(images, reference_images, atol=1e-6)


def test_load_with_custom_pipeline_file(saved_xl_model, lpips_module, reference_images):
    pipe = DiffusionPipeline.from_pretrained(
        saved_xl_model, custom_pipeline=pipeline_syncdiffusion_xl.__file__, trust_remote_code=True
    )
    assert_same_pipeline(pipe, lpips_module, reference_images)


def test_load_with_custom_pipeline_folder(saved_xl_model, lpips_module, reference_images, tmp_path):
    shutil.copyfile(pipeline_syncdiffusion_xl.__file__, tmp_path / "pipeline.py")
    pipe = DiffusionPipeline.from_pretrained(saved_xl_model, custom_pipeline=str(tmp_path), trust_remote_code=True)
    assert_same_pipeline(pipe, lpips_module, reference_images)


def test_load_from_hub_repo(fake_hub, saved_xl_model, lpips_module, reference_images):  # noqa: F811
    repo_id = "syncdiffusion-test/syncdiffusion-xl"
    marker = uuid.uuid4().hex
    with open(pipeline_syncdiffusion_xl.__file__, "rb") as f:
        served = f.read() + f'\nSERVED_BY_FAKE_HUB = "{marker}"\n'.encode()
    fake_hub.add_repo(repo_id, {"pipeline.py": served})
    pipe = DiffusionPipeline.from_pretrained(saved_xl_model, custom_pipeline=repo_id, trust_remote_code=True)
    assert sys.modules[type(pipe).__module__].SERVED_BY_FAKE_HUB == marker
    assert fake_hub.requested("GET", f"/{repo_id}/resolve/main/pipeline.py")
    assert_same_pipeline(pipe, lpips_module, reference_images)


def test_from_pipe_and_components_of_an_sdxl_pipeline(saved_xl_model, lpips_module, reference_images):
    sdxl = StableDiffusionXLPipeline.from_pretrained(saved_xl_model)
    pipe = SyncDiffusionXLPipeline.from_pipe(sdxl)
    assert pipe.unet is sdxl.unet and pipe.text_encoder_2 is sdxl.text_encoder_2  # shared, not copied
    assert_same_pipeline(pipe, lpips_module, reference_images)
    assert_same_pipeline(SyncDiffusionXLPipeline(**sdxl.components), lpips_module, reference_images)


def test_save_and_load_round_trip(saved_xl_model, lpips_module, reference_images, tmp_path):
    SyncDiffusionXLPipeline.from_pretrained(saved_xl_model).save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "syncdiffusion_xl.py").is_file()  # the pipeline carries its own code
    assert_same_pipeline(SyncDiffusionXLPipeline.from_pretrained(tmp_path / "saved"), lpips_module, reference_images)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"height": 60}, "height"),
        ({"width": 32}, None),  # narrower than the window: one view of the panorama's size, allowed
        ({"stride": 0}, "stride"),
        ({"stride": 9}, "stride"),
        ({"sync_weight": -1.0}, "sync_weight"),
        ({"sync_mode": "slow"}, "sync_mode"),
        ({"sync_decay_rate": 0.0}, "sync_decay_rate"),
        ({"prompt_2": 3}, "prompt_2"),
        ({"original_size": (64,)}, "original_size"),
        ({"crops_coords_top_left": (-1, 0)}, "crops_coords_top_left"),
        ({"denoising_end": 1.5}, "denoising_end"),
        ({"prompt": None, "prompt_embeds": torch.zeros(1, 77, 64)}, "pooled_prompt_embeds"),
        (
            {"prompt": None, "prompt_embeds": torch.zeros(1, 77, 64), "pooled_prompt_embeds": torch.zeros(2, 32)},
            "pooled_prompt_embeds",
        ),
    ],
)
def test_bad_input_is_a_value_error_before_any_model_runs(saved_xl_model, kwargs, argument):
    pipe = SyncDiffusionXLPipeline.from_pretrained(saved_xl_model)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        model.register_forward_pre_hook(lambda module, args: calls.append(type(module).__name__))
    call = {
        "prompt": "a cat",
        "height": 64,
        "width": 128,
        "stride": 4,
        "num_inference_steps": 1,
        "output_type": "latent",
    }
    call.update(kwargs)
    if argument is None:
        pipe(**call, sync_weight=0)
        return
    with pytest.raises(ValueError, match=f"`{argument}`"):
        pipe(**call)
    assert calls == []
