"""IP-Adapter inputs as the panorama pipeline takes them, on a tiny UNet with random IP-Adapter layers."""

import pytest
import torch
from diffusers import StableDiffusionPanoramaPipeline
from diffusers.models.attention_processor import IPAdapterAttnProcessor
from diffusers.models.embeddings import ImageProjection
from reference_loop import (
    assert_trajectories_match,
    for_reference_comparison,
    pipeline_trajectory,
    reference_syncdiffusion,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_ip_adapter(unet):
    """An IP-Adapter state dict (`image_proj` and `ip_adapter`) with random weights, as `load_ip_adapter` reads it."""
    cross = unet.config.cross_attention_dim
    channels = unet.config.block_out_channels
    layers, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):  # self-attention has no image branch
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = channels[::-1][int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        weights = IPAdapterAttnProcessor(hidden_size=hidden, cross_attention_dim=cross).state_dict()
        layers[f"{key}.to_k_ip.weight"] = weights["to_k_ip.0.weight"]
        layers[f"{key}.to_v_ip.weight"] = weights["to_v_ip.0.weight"]
        key += 2
    projection = ImageProjection(
        cross_attention_dim=cross, image_embed_dim=cross, num_image_text_embeds=4
    ).state_dict()
    image_proj = {
        "proj.weight": projection["image_embeds.weight"],
        "proj.bias": projection["image_embeds.bias"],
        "norm.weight": projection["norm.weight"],
        "norm.bias": projection["norm.bias"],
    }
    return {"image_proj": image_proj, "ip_adapter": layers}


@pytest.fixture
def ip_pipe(pipe):
    torch.manual_seed(0)
    pipe.unet._load_ip_adapter_weights([random_ip_adapter(pipe.unet)])
    return pipe


CALL = {"height": 64, "width": 128, "num_inference_steps": 2, "output_type": "latent"}
LATENTS = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(0))
# One adapter; `[negative, positive]` image embeddings as `prepare_ip_adapter_image_embeds` returns them with guidance.
EMBEDS = [torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(1))]


def test_ip_adapter_embeds_match_the_panorama_pipeline(ip_pipe):
    panorama = StableDiffusionPanoramaPipeline(**ip_pipe.components)
    panorama.set_progress_bar_config(disable=True)
    # The deprecated pipeline hard-codes a 64-latent window at stride 8; give it this pipeline's views.
    panorama.get_views = lambda h, w, circular_padding=False: ip_pipe.get_views(h, w, stride=8)
    ours = ip_pipe("a cat", latents=LATENTS, ip_adapter_image_embeds=EMBEDS, sync_weight=0, **CALL).images
    theirs = panorama("a cat", latents=LATENTS, ip_adapter_image_embeds=EMBEDS, **CALL).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    without = ip_pipe(
        "a cat", latents=LATENTS, ip_adapter_image_embeds=[torch.zeros(2, 1, 32)], sync_weight=0, **CALL
    ).images
    assert (ours - without).abs().max() > 1e-2  # the image embeddings condition the UNet


def test_ip_adapter_with_view_batches_and_synchronization(ip_pipe):
    """The deprecated pipeline crashes with `view_batch_size > 1`; here batching changes nothing."""
    kwargs = {"latents": LATENTS, "ip_adapter_image_embeds": EMBEDS, "stride": 4, **CALL}
    one = ip_pipe("a cat", view_batch_size=1, **kwargs).images
    three = ip_pipe("a cat", view_batch_size=3, **kwargs).images
    torch.testing.assert_close(three, one, atol=1e-3, rtol=1e-3)
    assert torch.isfinite(one).all()


def test_ip_adapter_synchronization_matches_the_reference_loop(ip_pipe):
    """The image embeddings condition every UNet pass, the gradient pass's included: compared step by step with the
    reference loop (float64, tests/reference_loop.py). Measured: 6e-8 of the largest latent; the reference with zero
    image embeddings in its gradient pass only is 5.4e-2 away."""
    for_reference_comparison(ip_pipe)
    latents, embeds = LATENTS.double(), EMBEDS[0].double()
    sync = {"stride": 4, "sync_weight": 20.0, "sync_thres": 2}
    ours = pipeline_trajectory(
        ip_pipe,
        "a cat",
        latents,
        ip_adapter_image_embeds=[embeds],
        height=64,
        width=128,
        num_inference_steps=2,
        **sync,
    )
    expected = []
    reference_syncdiffusion(ip_pipe, "a cat", latents, 2, image_embeds=embeds, trajectory=expected, **sync)
    assert_trajectories_match(ours, expected)
