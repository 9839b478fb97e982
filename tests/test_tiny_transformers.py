"""The offline FLUX.2 [klein] and Z-Image components of `syncdiffusion_utils.testing`: the Qwen tokenizer, diffusers'
own `Flux2KleinPipeline` and `ZImagePipeline` on the tiny models (64x64 and 64x128 pixels, with and without
guidance), save/reload, and the real-architecture presets reduced for the CPU."""

import copy
import json
import os
import tempfile

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, ZImagePipeline
from transformers import AutoTokenizer, Qwen2TokenizerFast, Qwen3ForCausalLM, Qwen3Model

from syncdiffusion_utils.testing import (
    FLUX2_KLEIN_PRESETS,
    FLUX2_KLEIN_TEXT_ENCODER_OUT_LAYERS,
    QWEN_SPECIAL_TOKENS,
    Z_IMAGE_PRESETS,
    make_flux2_klein_components,
    make_qwen_tokenizer,
    make_z_image_components,
    save_tiny_flux2_klein_pipeline,
    save_tiny_z_image_pipeline,
    tiny_flux2_klein_pipeline,
    tiny_z_image_pipeline,
)


PROMPT = "a photo of a forest"
SIZES = [(64, 64), (64, 128)]
# Two tiny runs of the same call on the same components are bitwise equal on CPU (measured 0.0); reloaded weights
# sit at other memory alignments, so kernels may round differently (FLUX.1's tiny model: 3.6e-7 relative).
RELOAD_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def klein_components():
    return make_flux2_klein_components("tiny")


@pytest.fixture(scope="module")
def z_image_components():
    return make_z_image_components("tiny")


def klein(components, is_distilled=False):
    pipe = Flux2KleinPipeline(**{**copy.deepcopy(components), "is_distilled": is_distilled})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def z_image(components):
    pipe = ZImagePipeline(**copy.deepcopy(components))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, seed=0, height=64, width=64, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        prompt=PROMPT,
        height=height,
        width=width,
        num_inference_steps=2,
        generator=generator,
        output_type="np",
        **kwargs,
    ).images


def relative_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------------------------------------------------------
# The Qwen tokenizer
# ------------------------------------------------------------------------------------------------------------------


def test_qwen_tokenizer_has_qwen3_special_tokens_and_byte_level_vocabulary():
    tokenizer = make_qwen_tokenizer()
    assert isinstance(tokenizer, Qwen2TokenizerFast)
    assert len(tokenizer) == 256 + len(QWEN_SPECIAL_TOKENS)
    assert tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS)) == list(range(256, 261))
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token) == ("<|endoftext|>", "<|im_end|>", None)
    text = "a café, 2 snowy <|im_start|>peaks"
    ids = tokenizer(text).input_ids
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids  # a special token stays whole
    assert len(ids) == len(text.replace("<|im_start|>", "X").encode("utf-8"))  # every other byte is one token
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize(
    "enable_thinking, expected_end",
    [(False, "<|im_start|>assistant\n<think>\n\n</think>\n\n"), (True, "<|im_start|>assistant\n")],
)
def test_qwen_chat_template_renders_what_the_pipelines_ask_for(enable_thinking, expected_end):
    # Flux2KleinPipeline asks for enable_thinking=False, ZImagePipeline for True (Qwen3's template's output).
    tokenizer = make_qwen_tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
    )
    assert text == f"<|im_start|>user\n{PROMPT}<|im_end|>\n" + expected_end


def test_qwen_tokenizer_pads_right_and_truncates():
    tokenizer = make_qwen_tokenizer()
    short = tokenizer("ab", padding="max_length", max_length=5, truncation=True)
    assert short.input_ids == [tokenizer.convert_tokens_to_ids(c) for c in "ab"] + [tokenizer.pad_token_id] * 3
    assert short.attention_mask == [1, 1, 0, 0, 0]
    assert len(tokenizer("a long prompt", max_length=4, truncation=True).input_ids) == 4


def test_qwen_tokenizer_saves_and_reloads_offline(tmp_path, monkeypatch):
    tokenizer = make_qwen_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for reloaded in (Qwen2TokenizerFast.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert isinstance(reloaded, Qwen2TokenizerFast)
        messages = [{"role": "user", "content": PROMPT}]
        for thinking in (False, True):
            options = {"tokenize": False, "add_generation_prompt": True, "enable_thinking": thinking}
            assert reloaded.apply_chat_template(messages, **options) == tokenizer.apply_chat_template(
                messages, **options
            )
        assert reloaded("a café <|im_end|>").input_ids == tokenizer("a café <|im_end|>").input_ids


def test_building_components_leaves_no_temporary_folders():
    before = set(os.listdir(tempfile.gettempdir()))
    make_flux2_klein_components()
    make_z_image_components()
    assert set(os.listdir(tempfile.gettempdir())) - before == set()


# ------------------------------------------------------------------------------------------------------------------
# FLUX.2 [klein]
# ------------------------------------------------------------------------------------------------------------------


def test_tiny_klein_components_match_the_pipeline(klein_components):
    assert set(klein_components) == {"scheduler", "vae", "text_encoder", "tokenizer", "transformer", "is_distilled"}
    assert isinstance(klein_components["text_encoder"], Qwen3ForCausalLM)
    text_width = klein_components["text_encoder"].config.hidden_size
    config = klein_components["transformer"].config
    assert config.joint_attention_dim == len(FLUX2_KLEIN_TEXT_ENCODER_OUT_LAYERS) * text_width
    assert config.in_channels == 4 * klein_components["vae"].config.latent_channels == 128
    assert klein_components["text_encoder"].config.num_hidden_layers > max(FLUX2_KLEIN_TEXT_ENCODER_OUT_LAYERS)
    pipe = klein(klein_components)
    assert pipe.vae_scale_factor == 8
    # The latent batch norm is not the identity, so a pipeline that skips it decodes other images.
    bn = klein_components["vae"].bn
    assert bn.running_mean.abs().min() > 0 and (bn.running_var - 1).abs().min() > 0


@pytest.mark.parametrize("height, width", SIZES)
@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_klein_pipeline_runs_on_tiny_components(klein_components, height, width, guidance_scale):
    pipe = klein(klein_components)
    image = run(pipe, height=height, width=width, guidance_scale=guidance_scale)
    assert image.shape == (1, height, width, 3)
    assert np.isfinite(image).all() and image.std() > 0.01
    assert np.array_equal(run(pipe, height=height, width=width, guidance_scale=guidance_scale), image)
    assert np.abs(run(pipe, seed=1, height=height, width=width, guidance_scale=guidance_scale) - image).max() > 0.01


def test_klein_guidance_and_negative_prompt_change_the_image(klein_components):
    pipe = klein(klein_components)
    guided = run(pipe, guidance_scale=4.0)
    assert np.abs(guided - run(pipe, guidance_scale=1.0)).max() > 1e-3
    # The negative prompt (klein's is "" unless embeddings are given) enters the guided velocity.
    negative, _ = pipe.encode_prompt("blurry")
    assert np.abs(guided - run(pipe, guidance_scale=4.0, negative_prompt_embeds=negative)).max() > 1e-3


def test_distilled_klein_ignores_guidance(klein_components):
    pipe = klein(klein_components, is_distilled=True)
    assert np.array_equal(run(pipe, guidance_scale=4.0), run(klein(klein_components), guidance_scale=1.0))


def test_saved_tiny_klein_pipeline_reloads_offline(tmp_path, monkeypatch):
    expected = run(tiny_flux2_klein_pipeline(lpips_module=False), guidance_scale=4.0)
    save_tiny_flux2_klein_pipeline(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is False
    assert index["text_encoder"] == ["transformers", "Qwen3ForCausalLM"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reloaded = Flux2KleinPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.tokenizer, Qwen2TokenizerFast)
    assert torch.equal(reloaded.vae.bn.running_var, tiny_flux2_klein_pipeline(lpips_module=False).vae.bn.running_var)
    assert relative_error(run(reloaded, guidance_scale=4.0), expected) < RELOAD_TOLERANCE


def test_tiny_klein_pipeline_takes_a_pipeline_class(klein_components):
    class Subclass(Flux2KleinPipeline):
        pass

    pipe = tiny_flux2_klein_pipeline(seed=1, pipeline_class=Subclass, is_distilled=True)
    assert type(pipe) is Subclass and pipe.config.is_distilled
    # Another seed draws other weights.
    other = pipe.transformer.x_embedder.weight
    assert not torch.equal(other, klein_components["transformer"].x_embedder.weight)


def test_klein_presets_have_the_real_architectures_and_reduce_for_cpu():
    assert {
        name: (p.num_layers, p.num_single_layers, p.num_attention_heads)
        for name, p in FLUX2_KLEIN_PRESETS.items()
        if name != "tiny"
    } == {"klein-4b": (5, 20, 24), "klein-9b": (8, 24, 32)}
    small = make_flux2_klein_components("klein-4b", width_mult=1 / 24, depth_mult=1 / 20)
    config = small["transformer"].config
    assert (config.num_layers, config.num_single_layers, config.num_attention_heads) == (1, 1, 1)
    assert config.attention_head_dim == 128 and tuple(config.axes_dims_rope) == (32, 32, 32, 32)
    text = small["text_encoder"].config
    assert config.joint_attention_dim == 3 * text.hidden_size and text.num_hidden_layers == 28
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (4, 1, 128)
    assert small["vae"].config.latent_channels == 32 and small["vae"].config.block_out_channels == (32, 32, 32, 32)
    pipe = Flux2KleinPipeline(**small)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(prompt=PROMPT, height=64, width=64, num_inference_steps=1, output_type="latent").images
    assert latents.shape == (1, 32, 8, 8) and torch.isfinite(latents).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"preset": "klein"}, "preset='klein'"),
        ({"width_mult": 0.5}, "real presets only"),
        ({"preset": "klein-4b", "depth_mult": 0.0}, "depth_mult=0.0"),
    ],
)
def test_klein_components_refuse_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_flux2_klein_components(**kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Z-Image
# ------------------------------------------------------------------------------------------------------------------


def test_tiny_z_image_components_match_the_pipeline(z_image_components):
    assert set(z_image_components) == {"scheduler", "vae", "text_encoder", "tokenizer", "transformer"}
    assert isinstance(z_image_components["text_encoder"], Qwen3Model)
    transformer = z_image_components["transformer"]
    assert transformer.config.cap_feat_dim == z_image_components["text_encoder"].config.hidden_size
    assert torch.isfinite(transformer.x_pad_token).all() and transformer.x_pad_token.abs().max() > 0
    assert torch.isfinite(transformer.cap_pad_token).all() and transformer.cap_pad_token.abs().max() > 0
    vae = z_image_components["vae"].config
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 0.3611, 0.1159)
    assert z_image_components["scheduler"].config.shift == 3.0
    assert z_image(z_image_components).vae_scale_factor == 8


@pytest.mark.parametrize("height, width", SIZES)
@pytest.mark.parametrize("guidance_scale", [4.0, 0.0])
def test_z_image_pipeline_runs_on_tiny_components(z_image_components, height, width, guidance_scale):
    pipe = z_image(z_image_components)
    image = run(pipe, height=height, width=width, guidance_scale=guidance_scale)
    assert image.shape == (1, height, width, 3)
    assert np.isfinite(image).all() and image.std() > 0.01
    assert np.array_equal(run(pipe, height=height, width=width, guidance_scale=guidance_scale), image)
    assert np.abs(run(pipe, seed=1, height=height, width=width, guidance_scale=guidance_scale) - image).max() > 0.01


def test_z_image_guidance_and_negative_prompt_change_the_image(z_image_components):
    pipe = z_image(z_image_components)
    guided = run(pipe, guidance_scale=4.0)
    assert np.abs(guided - run(pipe, guidance_scale=0.0)).max() > 1e-3
    assert np.abs(guided - run(pipe, guidance_scale=4.0, negative_prompt="blurry")).max() > 1e-3
    # cfg_normalization rescales the guided velocity to at most its factor times the conditional one's norm.
    assert np.abs(guided - run(pipe, guidance_scale=4.0, cfg_normalization=1.0)).max() > 1e-3


def test_saved_tiny_z_image_pipeline_reloads_offline(tmp_path, monkeypatch):
    expected = run(tiny_z_image_pipeline(lpips_module=False), guidance_scale=4.0)
    save_tiny_z_image_pipeline(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline" and index["text_encoder"] == ["transformers", "Qwen3Model"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reloaded = ZImagePipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.tokenizer, Qwen2TokenizerFast)
    assert relative_error(run(reloaded, guidance_scale=4.0), expected) < RELOAD_TOLERANCE


def test_z_image_preset_has_the_real_architecture_and_reduces_for_cpu():
    full = Z_IMAGE_PRESETS["z-image-turbo"]
    assert (full.dim, full.num_heads, full.num_layers, full.num_refiner_layers) == (3840, 30, 30, 2)
    small = make_z_image_components("z-image-turbo", width_mult=1 / 30, depth_mult=1 / 30)
    config = small["transformer"].config
    assert (config.dim, config.n_heads, config.n_layers, config.n_refiner_layers) == (128, 1, 1, 1)
    assert tuple(config.axes_dims) == (32, 48, 48)
    assert config.cap_feat_dim == small["text_encoder"].config.hidden_size
    assert small["vae"].config.block_out_channels == (32, 32, 32, 32)
    pipe = ZImagePipeline(**small)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(prompt=PROMPT, height=64, width=64, num_inference_steps=1, output_type="latent").images
    assert latents.shape == (1, 16, 8, 8) and torch.isfinite(latents).all()


def test_z_image_components_refuse_bad_arguments():
    with pytest.raises(ValueError, match="preset='z-image'"):
        make_z_image_components("z-image")
    with pytest.raises(ValueError, match="'z-image-turbo' preset only"):
        make_z_image_components(width_mult=0.5)


# ------------------------------------------------------------------------------------------------------------------
# The real presets at full size, built on the meta device (no memory): their published parameter counts
# ------------------------------------------------------------------------------------------------------------------

QWEN_VOCABULARY = 151936  # Qwen3's; the offline tokenizer's is 261, so the text encoders have fewer embeddings


def billions(model):
    return sum(p.numel() for p in model.parameters()) / 1e9


def embeddings(components, tied):
    """The embedding parameters the real Qwen3 vocabulary would add (twice for an untied output head)."""
    config = components["text_encoder"].config
    return (1 if tied else 2) * (QWEN_VOCABULARY - config.vocab_size) * config.hidden_size / 1e9


@pytest.mark.parametrize(
    "preset, transformer_billions, text_billions, tied",
    # FLUX.2 [klein] 4B and 9B flow models; Qwen3-4B (4.02B) and Qwen3-8B (8.19B).
    [("klein-4b", 3.88, 4.02, True), ("klein-9b", 9.08, 8.19, False)],
)
def test_full_klein_presets_have_the_published_sizes(preset, transformer_billions, text_billions, tied):
    with torch.device("meta"):
        components = make_flux2_klein_components(preset, full_text_encoder=True)
    assert components["text_encoder"].config.num_hidden_layers == 36
    assert billions(components["transformer"]) == pytest.approx(transformer_billions, abs=0.01)
    text = billions(components["text_encoder"]) + embeddings(components, tied)
    assert text == pytest.approx(text_billions, abs=0.01)


def test_full_z_image_preset_has_the_published_size():
    with torch.device("meta"):
        components = make_z_image_components("z-image-turbo", full_text_encoder=True)
    assert billions(components["transformer"]) == pytest.approx(6.15, abs=0.01)  # Z-Image's 6B single-stream DiT
    text = billions(components["text_encoder"]) + embeddings(components, tied=True)
    assert text == pytest.approx(4.02, abs=0.01)  # Qwen3-4B
    assert sum(p.numel() for p in components["vae"].parameters()) / 1e6 == pytest.approx(83.8, abs=0.1)  # FLUX.1's
