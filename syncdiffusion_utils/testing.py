"""Offline components: tiny random models for tests, and random-weight presets of real architectures.

Nothing here downloads anything. `tiny` builds a pipeline small enough for CPU tests; `sd2` builds the real
Stable Diffusion 2 base UNet, VAE and text encoder with random weights, for benchmarks (`width_mult` shrinks
the channel widths for quick CPU runs).
"""

import json
import os
import tempfile
import warnings
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pipeline_syncdiffusion import SyncDiffusionPipeline


def _bytes_to_unicode():
    """The byte-level BPE alphabet: each of the 256 bytes as one printable character (GPT-2 / CLIP)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def make_tokenizer(folder=None):
    """A CLIP tokenizer with a character-level vocabulary (no merges), written to `folder` and loaded back.

    Without `folder` the files go to a temporary folder, removed once the tokenizer is loaded.
    """
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="syncdiffusion-tokenizer-") as folder:
            return make_tokenizer(folder)
    vocab = {}
    for char in _bytes_to_unicode():
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    # Some transformers versions silently ignore the files; fail loudly instead of testing a broken tokenizer.
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")
    return tokenizer


@dataclass(frozen=True)
class Preset:
    """Architecture hyper-parameters of one random-weight pipeline."""

    unet_channels: tuple
    unet_down: tuple
    unet_up: tuple
    attention_head_dim: tuple
    layers_per_block: int
    cross_attention_dim: int
    norm_num_groups: int
    use_linear_projection: bool
    vae_channels: tuple
    vae_norm_num_groups: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    text_projection: int
    text_act: str


PRESETS = {
    "tiny": Preset(
        unet_channels=(16, 32),
        unet_down=("CrossAttnDownBlock2D", "DownBlock2D"),
        unet_up=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        layers_per_block=1,
        cross_attention_dim=32,
        norm_num_groups=8,
        use_linear_projection=False,
        vae_channels=(8, 8, 8, 8),
        vae_norm_num_groups=8,
        text_hidden=32,
        text_layers=2,
        text_heads=4,
        text_intermediate=37,
        text_projection=32,
        text_act="quick_gelu",
    ),
    # stabilityai/stable-diffusion-2-base: unet/, vae/ and text_encoder/ config.json.
    "sd2": Preset(
        unet_channels=(320, 640, 1280, 1280),
        unet_down=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        unet_up=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(5, 10, 20, 20),
        layers_per_block=2,
        cross_attention_dim=1024,
        norm_num_groups=32,
        use_linear_projection=True,
        vae_channels=(128, 256, 512, 512),
        vae_norm_num_groups=32,
        text_hidden=1024,
        text_layers=23,
        text_heads=16,
        text_intermediate=4096,
        text_projection=512,
        text_act="gelu",
    ),
}


def _scaled(channels, width_mult, groups):
    """Channel widths times `width_mult`, rounded to a multiple of the group-norm group count."""
    return tuple(max(groups, int(round(c * width_mult / groups)) * groups) for c in channels)


def make_components(preset="tiny", sample_size=8, width_mult=1.0, seed=0, tokenizer_folder=None):
    """Random-weight `vae, text_encoder, tokenizer, unet, scheduler` (no safety checker) of an architecture preset.

    `sample_size` is the UNet window in latent pixels: the pipeline's views are `sample_size` latents wide, i.e.
    `8 * sample_size` image pixels with these 4-block VAEs.
    """
    p = PRESETS[preset]
    torch.manual_seed(seed)
    groups = p.norm_num_groups
    unet_channels = _scaled(p.unet_channels, width_mult, groups)
    # Keep the head count of the real model: head dim scales with the width.
    heads = p.attention_head_dim
    if preset == "sd2":
        head_dim = tuple(max(1, int(h * c / c0)) for h, c, c0 in zip(heads, unet_channels, p.unet_channels))
        heads = head_dim
    cross_dim = (
        max(8, int(round(p.cross_attention_dim * width_mult / 8)) * 8) if preset != "tiny" else p.cross_attention_dim
    )
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=unet_channels,
        down_block_types=p.unet_down,
        up_block_types=p.unet_up,
        layers_per_block=p.layers_per_block,
        attention_head_dim=heads,
        cross_attention_dim=cross_dim,
        norm_num_groups=groups,
        use_linear_projection=p.use_linear_projection,
    )
    vae_groups = p.vae_norm_num_groups
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(p.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(p.vae_channels),
        block_out_channels=_scaled(p.vae_channels, width_mult, vae_groups),
        layers_per_block=1 if preset == "tiny" else 2,
        latent_channels=4,
        norm_num_groups=vae_groups,
        sample_size=sample_size * 8,
    )
    tokenizer = make_tokenizer(tokenizer_folder)
    heads_text = p.text_heads
    text_hidden = p.text_hidden if preset == "tiny" else cross_dim
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden,
            intermediate_size=max(8, int(p.text_intermediate * text_hidden / p.text_hidden)),
            num_hidden_layers=p.text_layers,
            num_attention_heads=heads_text if text_hidden % heads_text == 0 else 1,
            max_position_embeddings=77,
            projection_dim=p.text_projection,
            hidden_act=p.text_act,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    for model in (unet, vae, text_encoder):
        model.eval()
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet, "scheduler": scheduler}


def make_tiny_decoder(seed=0, width_mult=1.0):
    """A random-weight `AutoencoderTiny` (TAESD's architecture; factor 8, 4 latent channels).

    `width_mult=1` is the real TAESD width (64 channels); tests use a narrower one.
    """
    torch.manual_seed(seed)
    width = max(4, int(64 * width_mult))
    decoder = AutoencoderTiny(
        encoder_block_out_channels=(width,) * 4,
        decoder_block_out_channels=(width,) * 4,
    )
    return decoder.eval()


def make_lpips(seed=0):
    """LPIPS-VGG with a random backbone (seeded): the real architecture and linear heads, no download."""
    import lpips

    torch.manual_seed(seed)
    with warnings.catch_warnings():  # torch 2.4-2.5 warn about lpips' own `torch.load` of its linear heads
        warnings.filterwarnings("ignore", message=".*weights_only.*", category=FutureWarning)
        return lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()


def tiny_pipeline(sample_size=8, seed=0, lpips_module=True, pipeline_class=SyncDiffusionPipeline, **kwargs):
    """A `SyncDiffusionPipeline` (or `pipeline_class`) on tiny random components, ready to run on CPU.

    With `lpips_module=True` the perceptual loss is a random-backbone LPIPS-VGG (no download).
    """
    components = make_components("tiny", sample_size=sample_size, seed=seed, **kwargs)
    pipe = pipeline_class(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if lpips_module and hasattr(pipe, "set_perceptual_loss"):
        pipe.set_perceptual_loss(make_lpips())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(folder, sample_size=8, seed=0):
    """Save the tiny components as a plain Stable Diffusion model folder (`model_index.json` naming
    `StableDiffusionPipeline`, one folder per component): what `custom_pipeline` is applied to. A saved
    `SyncDiffusionPipeline` folder would carry, and run, its own code instead.
    """
    pipe = tiny_pipeline(
        sample_size=sample_size, seed=seed, lpips_module=False, pipeline_class=StableDiffusionPipeline
    )
    pipe.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Stable Diffusion XL
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class XLPreset:
    """Architecture hyper-parameters of one random-weight SDXL pipeline (two text encoders, `text_time` UNet)."""

    unet_channels: tuple
    unet_down: tuple
    unet_up: tuple
    attention_heads: tuple
    transformer_layers_per_block: tuple
    layers_per_block: int
    addition_time_embed_dim: int
    norm_num_groups: int
    vae_channels: tuple
    vae_norm_num_groups: int
    vae_layers_per_block: int
    text_hidden: tuple  # text_encoder, text_encoder_2
    text_layers: tuple
    text_heads: tuple
    text_intermediate: tuple
    text_act: tuple


XL_PRESETS = {
    # Shaped like diffusers' own SDXL fast tests (text_time UNet, CLIPTextModelWithProjection), with a factor-8 VAE.
    "tiny": XLPreset(
        unet_channels=(16, 32),
        unet_down=("DownBlock2D", "CrossAttnDownBlock2D"),
        unet_up=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_heads=(2, 4),
        transformer_layers_per_block=(1, 1),
        layers_per_block=1,
        addition_time_embed_dim=8,
        norm_num_groups=8,
        vae_channels=(8, 8, 8, 8),
        vae_norm_num_groups=8,
        vae_layers_per_block=1,
        text_hidden=(32, 32),
        text_layers=(2, 2),
        text_heads=(4, 4),
        text_intermediate=(37, 37),
        text_act=("quick_gelu", "gelu"),
    ),
    # stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/, text_encoder/ and text_encoder_2/ config.json.
    "sdxl": XLPreset(
        unet_channels=(320, 640, 1280),
        unet_down=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        unet_up=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_heads=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        layers_per_block=2,
        addition_time_embed_dim=256,
        norm_num_groups=32,
        vae_channels=(128, 256, 512, 512),
        vae_norm_num_groups=32,
        vae_layers_per_block=2,
        text_hidden=(768, 1280),
        text_layers=(12, 32),
        text_heads=(12, 20),
        text_intermediate=(3072, 5120),
        text_act=("quick_gelu", "gelu"),
    ),
}


def _heads(channels, heads):
    """The largest head count <= `heads` that divides `channels` (widths scaled by `width_mult` may not divide)."""
    return next(h for h in range(min(heads, channels), 0, -1) if channels % h == 0)


def make_sdxl_components(preset="tiny", sample_size=8, width_mult=1.0, seed=0):
    """Random-weight SDXL components: `vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler`.

    `sample_size` is the UNet window in latent pixels (`8 * sample_size` image pixels; SDXL's is 128). `width_mult`
    scales every channel width (UNet, VAE, both text encoders) and keeps depths, for quick CPU runs of `"sdxl"`.
    The VAE has SDXL's `force_upcast=True` and scaling factor; the scheduler is SDXL's Euler.
    """
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection

    p = XL_PRESETS[preset]
    scale = 1.0 if preset == "tiny" else width_mult
    torch.manual_seed(seed)
    groups = p.norm_num_groups
    unet_channels = _scaled(p.unet_channels, scale, groups)
    text_hidden = [_scaled((h,), scale, 8)[0] for h in p.text_hidden]
    with tempfile.TemporaryDirectory(prefix="syncdiffusion-tokenizer-") as folder:
        tokenizer = make_tokenizer(folder)
        tokenizer_2 = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    text_encoders = []
    for k, model_class in enumerate((CLIPTextModel, CLIPTextModelWithProjection)):
        config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden[k],
            intermediate_size=max(8, int(p.text_intermediate[k] * text_hidden[k] / p.text_hidden[k])),
            num_hidden_layers=p.text_layers[k],
            num_attention_heads=_heads(text_hidden[k], p.text_heads[k]),
            max_position_embeddings=77,
            projection_dim=text_hidden[k],
            hidden_act=p.text_act[k],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text_encoders.append(model_class(config))
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=unet_channels,
        down_block_types=p.unet_down,
        up_block_types=p.unet_up,
        layers_per_block=p.layers_per_block,
        attention_head_dim=tuple(_heads(c, h) for c, h in zip(unet_channels, p.attention_heads)),
        transformer_layers_per_block=p.transformer_layers_per_block,
        cross_attention_dim=sum(text_hidden),
        norm_num_groups=groups,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=p.addition_time_embed_dim,
        # six time ids (original size, crop corner, target size) and the pooled embedding of text_encoder_2
        projection_class_embeddings_input_dim=6 * p.addition_time_embed_dim + text_hidden[1],
    )
    vae_groups = p.vae_norm_num_groups
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(p.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(p.vae_channels),
        block_out_channels=_scaled(p.vae_channels, scale, vae_groups),
        layers_per_block=p.vae_layers_per_block,
        latent_channels=4,
        norm_num_groups=vae_groups,
        sample_size=sample_size * 8,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    for model in (unet, vae, *text_encoders):
        model.eval()
    return {
        "vae": vae,
        "text_encoder": text_encoders[0],
        "text_encoder_2": text_encoders[1],
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "unet": unet,
        "scheduler": scheduler,
    }


def tiny_xl_pipeline(sample_size=8, seed=0, lpips_module=True):
    """A `SyncDiffusionXLPipeline` on tiny random SDXL components, ready to run on CPU (no watermark)."""
    from pipeline_syncdiffusion_xl import SyncDiffusionXLPipeline

    pipe = SyncDiffusionXLPipeline(
        **make_sdxl_components("tiny", sample_size=sample_size, seed=seed), add_watermarker=False
    )
    if lpips_module:
        pipe.set_perceptual_loss(make_lpips())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_xl_pipeline(folder, sample_size=8, seed=0):
    """Save a tiny SDXL pipeline in diffusers' folder layout; its `model_index.json` names `StableDiffusionXLPipeline`,
    as a real SDXL model's does."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        **make_sdxl_components("tiny", sample_size=sample_size, seed=seed), add_watermarker=False
    )
    pipe.save_pretrained(folder)
    return folder


def make_tiny_controlnet(unet, seed=0):
    """A `ControlNetModel` for `unet` (`ControlNetModel.from_unet`, a narrow condition encoder) whose zero-initialized
    output convolutions get small random weights, so that, unlike a fresh ControlNet, its residuals are not zero."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    zero_initialized = [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_mid_block]
    for conv in [*zero_initialized, *controlnet.controlnet_down_blocks]:
        torch.nn.init.normal_(conv.weight, std=0.1)
        torch.nn.init.normal_(conv.bias, std=0.1)
    return controlnet.eval()


def make_controlnet(unet, seed=0):
    """A random-weight `ControlNetModel` for `unet` with the real condition encoder (`ControlNetModel.from_unet`, as
    the SD 1.5 and 2.x ControlNets are built), for benchmarks: its zero-initialized output convolutions get the
    default random initialization, so that its residuals, like a trained one's, are not zero."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet)
    zero_initialized = [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_mid_block]
    for conv in [*zero_initialized, *controlnet.controlnet_down_blocks]:
        conv.reset_parameters()
    return controlnet.eval()


# ----------------------------------------------------------------------------------------------------------------
# FLUX.1
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FluxPreset:
    """Architecture hyper-parameters of one random-weight FLUX.1 pipeline (MMDiT transformer, 16-channel VAE)."""

    num_layers: int  # double-stream blocks
    num_single_layers: int
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int  # T5 width
    pooled_projection_dim: int  # CLIP width
    axes_dims_rope: tuple  # sums to attention_head_dim
    vae_channels: tuple
    vae_norm_num_groups: int
    vae_layers_per_block: int
    clip_layers: int
    clip_heads: int
    clip_intermediate: int
    t5_layers: int
    t5_heads: int
    t5_d_kv: int
    t5_d_ff: int


FLUX_PRESETS = {
    "tiny": FluxPreset(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
        vae_channels=(8, 8, 8, 8),
        vae_norm_num_groups=8,
        vae_layers_per_block=1,
        clip_layers=2,
        clip_heads=4,
        clip_intermediate=37,
        t5_layers=2,
        t5_heads=4,
        t5_d_kv=8,
        t5_d_ff=37,
    ),
    # black-forest-labs/FLUX.1-dev: transformer/, vae/, text_encoder/ (CLIP ViT-L/14) and text_encoder_2/ (T5-XXL
    # encoder) config.json.
    "flux": FluxPreset(
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        axes_dims_rope=(16, 56, 56),
        vae_channels=(128, 256, 512, 512),
        vae_norm_num_groups=32,
        vae_layers_per_block=2,
        clip_layers=12,
        clip_heads=12,
        clip_intermediate=3072,
        t5_layers=24,
        t5_heads=64,
        t5_d_kv=64,
        t5_d_ff=10240,
    ),
}

# FLUX.1's VAE latent normalization (vae/config.json of FLUX.1-dev and -schnell).
FLUX_VAE_SCALING_FACTOR = 0.3611
FLUX_VAE_SHIFT_FACTOR = 0.1159

# scheduler/scheduler_config.json: dev shifts the sigmas by the image's token count (`mu`), schnell does not.
FLUX_SCHEDULER_CONFIGS = {
    "dev": {"shift": 3.0, "use_dynamic_shifting": True},
    "schnell": {"shift": 1.0, "use_dynamic_shifting": False},
}


def make_t5_tokenizer():
    """An offline T5 tokenizer: a character-level Unigram model (`tokenizers`) in `T5TokenizerFast`, with T5's
    `<pad>` (0), `</s>` (1, appended to every text) and `<unk>` (2). Nothing is written to disk."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    characters = string.ascii_letters + string.digits + string.punctuation
    # Word-initial characters ("▁a") score higher than inner ones, so a word splits as "▁a" + characters.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -2.5) for c in characters] + [(c, -3.0) for c in characters]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    )
    if len(tokenizer) != len(pieces):
        raise RuntimeError(f"T5 tokenizer has {len(tokenizer)} tokens, expected {len(pieces)}")
    return tokenizer


def _flux_text_encoders(p, clip_width, t5_width, layers):
    """CLIP (pooled, `clip_width`) and T5 encoder (`t5_width`) with `layers(n)` blocks for the preset's `n`."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = make_tokenizer()
    tokenizer_2 = make_t5_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=clip_width,
            intermediate_size=max(8, p.clip_intermediate * clip_width // (64 * p.clip_heads)),
            num_hidden_layers=layers(p.clip_layers),
            num_attention_heads=_heads(clip_width, p.clip_heads),
            max_position_embeddings=77,
            projection_dim=clip_width,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    t5_heads = _heads(t5_width // p.t5_d_kv, p.t5_heads) if t5_width >= p.t5_d_kv else 1
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=t5_width,
            d_kv=t5_width // t5_heads,
            d_ff=max(8, p.t5_d_ff * t5_width // (p.t5_heads * p.t5_d_kv)),
            num_layers=layers(p.t5_layers),
            num_heads=t5_heads,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=0,
        )
    )
    return tokenizer, text_encoder, tokenizer_2, text_encoder_2


def make_flux_components(
    preset="tiny",
    seed=0,
    guidance_embeds=True,
    scheduler="dev",
    width_mult=1.0,
    depth_mult=1.0,
    full_text_encoders=False,
):
    """Random-weight FLUX.1 components: `scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
    transformer` (the keyword arguments of `FluxPipeline`).

    `guidance_embeds=True` is FLUX.1-dev's guidance-distilled transformer, `False` FLUX.1-schnell's; `scheduler` is
    `"dev"` (sigmas shifted by the image's token count) or `"schnell"` (no shift). The VAE has FLUX's 16 latent
    channels, scaling and shift factors and factor 8.

    `"flux"` is FLUX.1's real architecture (19 double and 38 single blocks, 24 heads of 128, 16-channel VAE).
    `width_mult` scales the head count (head size and rotary axes stay) and every other width, `depth_mult` the
    block counts, for CPU runs; the text encoders are encoded once per call and do not enter a panorama's loop, so
    they keep the scaled widths but have one block each unless `full_text_encoders=True` (T5-XXL's encoder alone is
    4.7 billion parameters). Tokenizers are character-level (offline), so the text vocabularies are small.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    if preset not in FLUX_PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {sorted(FLUX_PRESETS)}")
    if scheduler not in FLUX_SCHEDULER_CONFIGS:
        raise ValueError(f"scheduler={scheduler!r}: expected one of {sorted(FLUX_SCHEDULER_CONFIGS)}")
    p = FLUX_PRESETS[preset]
    if preset == "tiny" and (width_mult != 1.0 or depth_mult != 1.0):
        raise ValueError("width_mult and depth_mult apply to the 'flux' preset only")
    torch.manual_seed(seed)

    def depth(n):
        return max(1, int(round(n * depth_mult)))

    heads = max(1, int(round(p.num_attention_heads * width_mult)))
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels in 2x2 patches
        num_layers=depth(p.num_layers),
        num_single_layers=depth(p.num_single_layers),
        attention_head_dim=p.attention_head_dim,
        num_attention_heads=heads,
        joint_attention_dim=_scaled((p.joint_attention_dim,), width_mult, 8)[0],
        pooled_projection_dim=_scaled((p.pooled_projection_dim,), width_mult, 8)[0],
        guidance_embeds=guidance_embeds,
        axes_dims_rope=p.axes_dims_rope,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(p.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(p.vae_channels),
        block_out_channels=_scaled(p.vae_channels, width_mult, p.vae_norm_num_groups),
        layers_per_block=p.vae_layers_per_block,
        latent_channels=16,
        norm_num_groups=p.vae_norm_num_groups,
        sample_size=1024 if preset == "flux" else 64,
        scaling_factor=FLUX_VAE_SCALING_FACTOR,
        shift_factor=FLUX_VAE_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    text_layers = depth if (preset == "tiny" or full_text_encoders) else (lambda n: 1)
    tokenizer, text_encoder, tokenizer_2, text_encoder_2 = _flux_text_encoders(
        p,
        clip_width=transformer.config.pooled_projection_dim,
        t5_width=transformer.config.joint_attention_dim,
        layers=text_layers,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        **FLUX_SCHEDULER_CONFIGS[scheduler],
    )
    for model in (transformer, vae, text_encoder, text_encoder_2):
        model.eval()
    return {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "transformer": transformer,
    }


def make_tiny_flux_decoder(seed=0, width_mult=1.0):
    """A random-weight `AutoencoderTiny` with TAEF1's architecture (TAESD's, with 16 latent channels; factor 8).

    Like TAEF1 (`scaling_factor=1`, `shift_factor=0`, the defaults) it decodes the transformer's latent as it is,
    without the VAE's scaling and shift (TAEF1 replaces `FluxPipeline.vae` as it is). `width_mult=1` is TAEF1's width
    (64 channels); tests use a narrower one.
    """
    torch.manual_seed(seed)
    width = max(4, int(64 * width_mult))
    decoder = AutoencoderTiny(
        encoder_block_out_channels=(width,) * 4,
        decoder_block_out_channels=(width,) * 4,
        latent_channels=16,
    )
    return decoder.eval()


def tiny_flux_pipeline(seed=0, guidance_embeds=True, scheduler="dev", pipeline_class=None, lpips_module=True):
    """A pipeline (`pipeline_class`, default diffusers' `FluxPipeline`) on tiny random FLUX components, on CPU.

    With `lpips_module=True` a pipeline that has `set_perceptual_loss` gets a random-backbone LPIPS-VGG.
    """
    from diffusers import FluxPipeline

    pipeline_class = FluxPipeline if pipeline_class is None else pipeline_class
    components = make_flux_components("tiny", seed=seed, guidance_embeds=guidance_embeds, scheduler=scheduler)
    pipe = pipeline_class(**components)
    if lpips_module and hasattr(pipe, "set_perceptual_loss"):
        pipe.set_perceptual_loss(make_lpips())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_flux_pipeline(folder, seed=0, guidance_embeds=True, scheduler="dev"):
    """Save the tiny FLUX components as a plain FLUX model folder (`model_index.json` naming `FluxPipeline`, one
    folder per component): what `custom_pipeline` is applied to."""
    tiny_flux_pipeline(seed=seed, guidance_embeds=guidance_embeds, scheduler=scheduler).save_pretrained(folder)
    return folder


def save_tiny_flux_lora(folder, transformer, seed=1, rank=4):
    """Write a random LoRA for `transformer`'s attention projections to `folder` (`pytorch_lora_weights.safetensors`,
    diffusers' FLUX LoRA format) and return `folder`; `transformer` itself is left unchanged. Needs `peft`, as
    diffusers' `load_lora_weights` does."""
    import copy

    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    adapted = copy.deepcopy(transformer)
    torch.manual_seed(seed)
    # init_lora_weights=False draws both LoRA matrices at random: a fresh LoRA's zero B would change nothing.
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    adapted.add_adapter(config)
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(adapted))
    return folder


def add_tiny_flux_ip_adapter(transformer, image_embed_dim=16, seed=2):
    """Give `transformer` a random IP-Adapter (FLUX's IP-Adapter attention in every double-stream block and an
    image projection of `image_embed_dim`-wide image embeddings to 4 tokens), loaded as diffusers loads a real one.

    The image embeddings are then passed as `ip_adapter_image_embeds=[tensor (batch, 1, image_embed_dim)]`.
    """
    generator = torch.Generator().manual_seed(seed)
    width, text_width = transformer.inner_dim, transformer.config.joint_attention_dim

    def weights(*shape):
        return torch.randn(*shape, generator=generator) * 0.2

    image_proj = {
        "proj.weight": weights(4 * text_width, image_embed_dim),
        "proj.bias": weights(4 * text_width),
        "norm.weight": torch.ones(text_width),
        "norm.bias": torch.zeros(text_width),
    }
    ip_adapter = {}
    for block in range(transformer.config.num_layers):
        for name in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{block}.{name}.weight"] = weights(width, text_width)
            ip_adapter[f"{block}.{name}.bias"] = weights(width)
    transformer._load_ip_adapter_weights(
        [{"image_proj": image_proj, "ip_adapter": ip_adapter}], low_cpu_mem_usage=False
    )
    return transformer


# ----------------------------------------------------------------------------------------------------------------
# Qwen3 text encoders and their tokenizer (FLUX.2 [klein], Z-Image)
# ----------------------------------------------------------------------------------------------------------------

# Qwen3's special tokens, in Qwen3's order: `<|endoftext|>` pads, `<|im_end|>` ends a turn (the EOS token).
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

# Qwen3's chat template for what the pipelines send (one turn per message, no tools): a generation prompt opens the
# assistant's turn and `enable_thinking=False` closes an empty thinking block, as Qwen3's own template does.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def make_qwen_tokenizer():
    """An offline Qwen tokenizer (`Qwen2TokenizerFast`, what FLUX.2 [klein] and Z-Image load): Qwen2's byte-level
    BPE with a vocabulary of the 256 bytes (no merges) and Qwen3's special tokens and chat template. Nothing is
    written to disk."""
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast

    vocab = {char: i for i, char in enumerate(_bytes_to_unicode())}
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN3_CHAT_TEMPLATE,
    )
    # Special tokens are never split into bytes; in the vocabulary already, they keep their ids.
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS], True)
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"Qwen tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")
    return tokenizer


@dataclass(frozen=True)
class Qwen3Preset:
    """Architecture hyper-parameters of a Qwen3 text encoder."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool


QWEN3_PRESETS = {
    # The tiny text encoder of both tiny pipelines (grouped-query attention, like Qwen3's).
    "tiny": Qwen3Preset(
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        intermediate_size=32,
        tie_word_embeddings=True,
    ),
    # Qwen/Qwen3-4B config.json (FLUX.2-klein-4B's and Z-Image-Turbo's text_encoder/).
    "qwen3-4b": Qwen3Preset(
        hidden_size=2560,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=9728,
        tie_word_embeddings=True,
    ),
    # Qwen/Qwen3-8B config.json (FLUX.2-klein-9B's text_encoder/).
    "qwen3-8b": Qwen3Preset(
        hidden_size=4096,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=12288,
        tie_word_embeddings=False,
    ),
}


def _qwen3_text_encoder(model_class, p, tokenizer, width_mult=1.0, num_layers=None):
    """A random-weight Qwen3 `model_class` (`Qwen3ForCausalLM` or `Qwen3Model`) of preset `p`: `width_mult` scales
    the hidden and MLP widths and the head counts (head size and the query/key-value head ratio stay), `num_layers`
    replaces the depth. Its vocabulary is `tokenizer`'s."""
    from transformers import Qwen3Config

    kv_heads = max(1, int(round(p.num_kv_heads * width_mult)))
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=_scaled((p.hidden_size,), width_mult, 8)[0],
        intermediate_size=_scaled((p.intermediate_size,), width_mult, 8)[0],
        num_hidden_layers=p.num_layers if num_layers is None else num_layers,
        num_attention_heads=kv_heads * (p.num_heads // p.num_kv_heads),
        num_key_value_heads=kv_heads,
        head_dim=p.head_dim,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=p.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model_class(config).eval()


# ----------------------------------------------------------------------------------------------------------------
# FLUX.2 [klein]
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flux2KleinPreset:
    """Architecture hyper-parameters of one random-weight FLUX.2 [klein] pipeline."""

    num_layers: int  # double-stream blocks
    num_single_layers: int
    attention_head_dim: int
    num_attention_heads: int
    axes_dims_rope: tuple  # sums to attention_head_dim
    vae_channels: tuple
    vae_norm_num_groups: int
    vae_layers_per_block: int
    text_encoder: str  # a QWEN3_PRESETS key
    text_layers: int  # the tiny text encoder's depth; the real presets keep the Qwen3 preset's


# The Qwen3 layers whose hidden states Flux2KleinPipeline stacks into the prompt embedding (its default
# `text_encoder_out_layers`): the transformer's text width is their count times the text encoder's width.
FLUX2_KLEIN_TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)

FLUX2_KLEIN_PRESETS = {
    # 28 text layers: the fewest for which the pipeline's default `text_encoder_out_layers` exist (and are not the
    # final, normalized hidden state), so the pipeline runs with its defaults.
    "tiny": Flux2KleinPreset(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        axes_dims_rope=(4, 4, 4, 4),
        vae_channels=(8, 8, 8, 8),
        vae_norm_num_groups=8,
        vae_layers_per_block=1,
        text_encoder="tiny",
        text_layers=28,
    ),
    # black-forest-labs/FLUX.2-klein-4B: transformer/config.json (the flux2 repository's Klein4BParams: depth 5,
    # 20 single blocks, hidden 3072 = 24 heads of 128, context 7680 = 3 x 2560), vae/config.json (FLUX.2's VAE:
    # AutoencoderKLFlux2's defaults), text_encoder/ (Qwen3-4B).
    "klein-4b": Flux2KleinPreset(
        num_layers=5,
        num_single_layers=20,
        attention_head_dim=128,
        num_attention_heads=24,
        axes_dims_rope=(32, 32, 32, 32),
        vae_channels=(128, 256, 512, 512),
        vae_norm_num_groups=32,
        vae_layers_per_block=2,
        text_encoder="qwen3-4b",
        text_layers=36,
    ),
    # black-forest-labs/FLUX.2-klein-9B (Klein9BParams: depth 8, 24 single blocks, hidden 4096 = 32 heads of 128,
    # context 12288 = 3 x 4096), FLUX.2's VAE, text_encoder/ (Qwen3-8B).
    "klein-9b": Flux2KleinPreset(
        num_layers=8,
        num_single_layers=24,
        attention_head_dim=128,
        num_attention_heads=32,
        axes_dims_rope=(32, 32, 32, 32),
        vae_channels=(128, 256, 512, 512),
        vae_norm_num_groups=32,
        vae_layers_per_block=2,
        text_encoder="qwen3-8b",
        text_layers=36,
    ),
}

# FLUX.2 latents: 32 VAE channels, patchified 2x2 into the transformer's 128 input channels.
FLUX2_LATENT_CHANNELS = 32

# FLUX.2-klein scheduler/scheduler_config.json (FLUX.2's): the pipeline passes `mu` (its empirical shift of the
# image's token count and step count), so `use_dynamic_shifting` and the exponential time shift are what matter.
FLUX2_KLEIN_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}


def _randomize_batch_norm(vae, seed):
    """Give FLUX.2's VAE latent batch norm random running statistics: a fresh one is the identity, under which a
    pipeline that forgot to (de)normalize its latents would pass its tests."""
    generator = torch.Generator().manual_seed(seed)
    channels = vae.bn.running_mean.shape[0]
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.2 * torch.randn(channels, generator=generator))
        vae.bn.running_var.copy_(torch.exp(0.5 * torch.randn(channels, generator=generator)))
    return vae


def make_flux2_klein_components(
    preset="tiny", seed=0, is_distilled=False, width_mult=1.0, depth_mult=1.0, full_text_encoder=False
):
    """Random-weight FLUX.2 [klein] components: `scheduler, vae, text_encoder, tokenizer, transformer, is_distilled`
    (the keyword arguments of `Flux2KleinPipeline`).

    `is_distilled=False` is a klein base model (real classifier-free guidance with the empty negative prompt when
    `guidance_scale > 1`), `True` a step-distilled one (guidance ignored). The VAE is FLUX.2's (`AutoencoderKLFlux2`:
    32 latent channels, factor 8, a latent batch norm, here with random statistics); the transformer reads 2x2
    patches (128 channels) and the stacked hidden states of Qwen3 layers 9, 18 and 27
    (`FLUX2_KLEIN_TEXT_ENCODER_OUT_LAYERS`), so the pipeline runs with its own defaults.

    `"klein-4b"` and `"klein-9b"` are the real architectures. `width_mult` scales the head counts (head size and
    rotary axes stay) and every other width, `depth_mult` the block counts, for CPU runs; the text encoder is encoded
    once per call and does not enter a panorama's loop, so it keeps 28 layers (the last one whose output the
    pipeline reads is the 27th) unless `full_text_encoder=True` (36). The tokenizer is byte-level (offline), so the
    text vocabulary is small.
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    if preset not in FLUX2_KLEIN_PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {sorted(FLUX2_KLEIN_PRESETS)}")
    if preset == "tiny" and (width_mult != 1.0 or depth_mult != 1.0 or full_text_encoder):
        raise ValueError("width_mult, depth_mult and full_text_encoder apply to the real presets only")
    if not width_mult > 0 or not depth_mult > 0:
        raise ValueError(f"width_mult={width_mult}, depth_mult={depth_mult}: expected positive numbers")
    p = FLUX2_KLEIN_PRESETS[preset]
    torch.manual_seed(seed)

    def depth(n):
        return max(1, int(round(n * depth_mult)))

    tokenizer = make_qwen_tokenizer()
    text_layers = p.text_layers if (preset == "tiny" or full_text_encoder) else 28
    text_encoder = _qwen3_text_encoder(
        Qwen3ForCausalLM, QWEN3_PRESETS[p.text_encoder], tokenizer, width_mult, num_layers=text_layers
    )
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * FLUX2_LATENT_CHANNELS,
        num_layers=depth(p.num_layers),
        num_single_layers=depth(p.num_single_layers),
        attention_head_dim=p.attention_head_dim,
        num_attention_heads=max(1, int(round(p.num_attention_heads * width_mult))),
        joint_attention_dim=len(FLUX2_KLEIN_TEXT_ENCODER_OUT_LAYERS) * text_encoder.config.hidden_size,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=p.axes_dims_rope,
        rope_theta=2000,
        guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=_scaled(p.vae_channels, width_mult, p.vae_norm_num_groups),
        layers_per_block=p.vae_layers_per_block,
        latent_channels=FLUX2_LATENT_CHANNELS,
        norm_num_groups=p.vae_norm_num_groups,
        sample_size=64 if preset == "tiny" else 1024,
    )
    _randomize_batch_norm(vae, seed)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX2_KLEIN_SCHEDULER_CONFIG)
    for model in (transformer, vae):
        model.eval()
    return {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
        "is_distilled": is_distilled,
    }


def tiny_flux2_klein_pipeline(seed=0, pipeline_class=None, lpips_module=True, is_distilled=False):
    """A pipeline (`pipeline_class`, default diffusers' `Flux2KleinPipeline`) on tiny random FLUX.2 [klein]
    components, on CPU. With `lpips_module=True` a pipeline that has `set_perceptual_loss` gets a random-backbone
    LPIPS-VGG."""
    from diffusers import Flux2KleinPipeline

    pipeline_class = Flux2KleinPipeline if pipeline_class is None else pipeline_class
    pipe = pipeline_class(**make_flux2_klein_components("tiny", seed=seed, is_distilled=is_distilled))
    if lpips_module and hasattr(pipe, "set_perceptual_loss"):
        pipe.set_perceptual_loss(make_lpips())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_flux2_klein_pipeline(folder, seed=0, is_distilled=False):
    """Save the tiny FLUX.2 [klein] components as a plain model folder (`model_index.json` naming
    `Flux2KleinPipeline`, one folder per component): what `custom_pipeline` is applied to."""
    tiny_flux2_klein_pipeline(seed=seed, lpips_module=False, is_distilled=is_distilled).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Z-Image
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZImagePreset:
    """Architecture hyper-parameters of one random-weight Z-Image pipeline (single-stream DiT, FLUX.1's VAE)."""

    dim: int  # num_heads * head size
    num_heads: int
    num_layers: int
    num_refiner_layers: int  # noise and context refiner blocks, each
    axes_dims: tuple  # rotary axes (caption/frame, height, width); sums to the head size
    vae_channels: tuple
    vae_norm_num_groups: int
    vae_layers_per_block: int
    text_encoder: str  # a QWEN3_PRESETS key


Z_IMAGE_PRESETS = {
    "tiny": ZImagePreset(
        dim=32,
        num_heads=2,
        num_layers=2,
        num_refiner_layers=1,
        axes_dims=(8, 4, 4),
        vae_channels=(8, 8, 8, 8),
        vae_norm_num_groups=8,
        vae_layers_per_block=1,
        text_encoder="tiny",
    ),
    # Tongyi-MAI/Z-Image-Turbo: transformer/config.json (dim 3840, 30 layers, 2 refiner layers, 30 heads and 30
    # key-value heads, cap_feat_dim 2560 = Qwen3-4B's width, axes_dims [32, 48, 48], axes_lens [1024, 512, 512]:
    # ZImageTransformer2DModel's defaults), vae/ (FLUX.1's VAE), text_encoder/ (Qwen3-4B, read at its
    # second-to-last hidden state).
    "z-image-turbo": ZImagePreset(
        dim=3840,
        num_heads=30,
        num_layers=30,
        num_refiner_layers=2,
        axes_dims=(32, 48, 48),
        vae_channels=(128, 256, 512, 512),
        vae_norm_num_groups=32,
        vae_layers_per_block=2,
        text_encoder="qwen3-4b",
    ),
}

# Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json: a fixed shift of 3 (the pipeline's `mu` is unused).
Z_IMAGE_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}


def make_z_image_components(preset="tiny", seed=0, width_mult=1.0, depth_mult=1.0, full_text_encoder=False):
    """Random-weight Z-Image components: `scheduler, vae, text_encoder, tokenizer, transformer` (the keyword
    arguments of `ZImagePipeline`).

    The VAE is FLUX.1's (`AutoencoderKL`: 16 latent channels, its scaling and shift factors, factor 8); the
    transformer reads 2x2 patches and the second-to-last hidden state of a Qwen3 `Qwen3Model`. Its padding tokens
    (created with `torch.empty`) get seeded random values.

    `"z-image-turbo"` is the real architecture. `width_mult` scales the head count (head size and rotary axes stay)
    and every other width, `depth_mult` the block counts, for CPU runs; the text encoder is encoded once per call,
    so it has 2 layers unless `full_text_encoder=True` (36). The tokenizer is byte-level (offline).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Model

    if preset not in Z_IMAGE_PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {sorted(Z_IMAGE_PRESETS)}")
    if preset == "tiny" and (width_mult != 1.0 or depth_mult != 1.0 or full_text_encoder):
        raise ValueError("width_mult, depth_mult and full_text_encoder apply to the 'z-image-turbo' preset only")
    if not width_mult > 0 or not depth_mult > 0:
        raise ValueError(f"width_mult={width_mult}, depth_mult={depth_mult}: expected positive numbers")
    p = Z_IMAGE_PRESETS[preset]
    torch.manual_seed(seed)

    def depth(n):
        return max(1, int(round(n * depth_mult)))

    tokenizer = make_qwen_tokenizer()
    text_layers = None if (preset == "tiny" or full_text_encoder) else 2
    text_encoder = _qwen3_text_encoder(
        Qwen3Model, QWEN3_PRESETS[p.text_encoder], tokenizer, width_mult, num_layers=text_layers
    )
    heads = max(1, int(round(p.num_heads * width_mult)))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=heads * (p.dim // p.num_heads),
        n_layers=depth(p.num_layers),
        n_refiner_layers=depth(p.num_refiner_layers),
        n_heads=heads,
        n_kv_heads=heads,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=text_encoder.config.hidden_size,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=list(p.axes_dims),
        axes_lens=[1024, 512, 512],
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pad_token in (transformer.x_pad_token, transformer.cap_pad_token):
            pad_token.copy_(torch.randn(pad_token.shape, generator=generator))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(p.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(p.vae_channels),
        block_out_channels=_scaled(p.vae_channels, width_mult, p.vae_norm_num_groups),
        layers_per_block=p.vae_layers_per_block,
        latent_channels=16,
        norm_num_groups=p.vae_norm_num_groups,
        sample_size=64 if preset == "tiny" else 1024,
        scaling_factor=FLUX_VAE_SCALING_FACTOR,
        shift_factor=FLUX_VAE_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER_CONFIG)
    for model in (transformer, vae):
        model.eval()
    return {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }


def tiny_z_image_pipeline(seed=0, pipeline_class=None, lpips_module=True):
    """A pipeline (`pipeline_class`, default diffusers' `ZImagePipeline`) on tiny random Z-Image components, on CPU.
    With `lpips_module=True` a pipeline that has `set_perceptual_loss` gets a random-backbone LPIPS-VGG."""
    from diffusers import ZImagePipeline

    pipeline_class = ZImagePipeline if pipeline_class is None else pipeline_class
    pipe = pipeline_class(**make_z_image_components("tiny", seed=seed))
    if lpips_module and hasattr(pipe, "set_perceptual_loss"):
        pipe.set_perceptual_loss(make_lpips())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_z_image_pipeline(folder, seed=0):
    """Save the tiny Z-Image components as a plain model folder (`model_index.json` naming `ZImagePipeline`, one
    folder per component): what `custom_pipeline` is applied to."""
    tiny_z_image_pipeline(seed=seed, lpips_module=False).save_pretrained(folder)
    return folder
