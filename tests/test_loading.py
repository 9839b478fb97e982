"""Loading as diffusers users do: saved pipelines that reload themselves, single-file checkpoints, LPIPS weights
offline, and test helpers that leave nothing behind. All offline; the Hub side is in `test_hub.py`.
"""

import glob
import json
import os
import socket
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from diffusers.utils import dynamic_modules_utils
from safetensors.torch import save_file

import pipeline_syncdiffusion
from pipeline_syncdiffusion import SyncDiffusionPipeline
from syncdiffusion_utils.testing import make_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"height": 64, "width": 128, "num_inference_steps": 3, "sync_thres": 2, "output_type": "np"}
CLASS_NAME = ["syncdiffusion", "SyncDiffusionPipeline"]


@pytest.fixture
def modules_cache(monkeypatch, tmp_path):
    """diffusers copies custom code into its modules cache and imports it from there: keep both in `tmp_path`."""
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("diffusers_modules"):
            del sys.modules[name]


def images(pipe, lpips_module, **kwargs):
    pipe.set_perceptual_loss(lpips_module)
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of a beach", generator=torch.Generator().manual_seed(0), **SMALL, **kwargs).images


# ---------------------------------------------------------------------------------------------------------------
# Saved pipelines reload themselves
# ---------------------------------------------------------------------------------------------------------------


def test_saved_pipeline_carries_its_source(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)

    assert (tmp_path / "syncdiffusion.py").read_bytes() == Path(pipeline_syncdiffusion.__file__).read_bytes()
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["_class_name"] == CLASS_NAME
    assert model_index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert pipe.config["_class_name"] == "SyncDiffusionPipeline"  # only the saved file names the source


def test_saved_pipeline_reloads_three_ways_with_the_same_images(pipe, lpips_module, tmp_path, modules_cache):
    expected = images(pipe, lpips_module)
    pipe.save_pretrained(tmp_path / "saved")
    folder = str(tmp_path / "saved")

    direct = SyncDiffusionPipeline.from_pretrained(folder)
    by_class_name = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    by_file_name = DiffusionPipeline.from_pretrained(folder, custom_pipeline="syncdiffusion", trust_remote_code=True)

    # Through the class itself: the installed class, no remote code; through DiffusionPipeline: the saved file.
    assert type(direct) is SyncDiffusionPipeline
    for loaded in (by_class_name, by_file_name):
        module = sys.modules[type(loaded).__module__]
        assert type(loaded).__name__ == "SyncDiffusionPipeline" and type(loaded) is not SyncDiffusionPipeline
        assert Path(module.__file__).name == "syncdiffusion.py"
        assert Path(module.__file__).read_bytes() == Path(pipeline_syncdiffusion.__file__).read_bytes()
    # Same weights, same code, same CPU, one thread: bit-identical (measured max difference 0).
    for loaded in (direct, by_class_name, by_file_name):
        np.testing.assert_array_equal(images(loaded, lpips_module), expected)


def test_saved_pipeline_needs_trust_remote_code_only_through_diffusion_pipeline(pipe, tmp_path, modules_cache):
    pipe.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(str(tmp_path))


def test_a_reloaded_pipeline_saves_the_same_source(pipe, tmp_path, modules_cache):
    pipe.save_pretrained(tmp_path / "first")
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "first"), trust_remote_code=True)
    loaded.save_pretrained(tmp_path / "second")

    assert (tmp_path / "second" / "syncdiffusion.py").read_bytes() == (
        tmp_path / "first" / "syncdiffusion.py"
    ).read_bytes()
    assert json.loads((tmp_path / "second" / "model_index.json").read_text())["_class_name"] == CLASS_NAME


# ---------------------------------------------------------------------------------------------------------------
# Single-file checkpoints (the original Stable Diffusion layout of A1111 / Civitai files)
# ---------------------------------------------------------------------------------------------------------------

_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
_VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _renamed(state_dict, prefixes, inner=()):
    """`state_dict` with each diffusers prefix replaced by its original one, and inner names renamed under it."""
    converted = {}
    for key, value in state_dict.items():
        for new, old in prefixes:
            if key.startswith(new):
                rest = key[len(new) :]
                for diffusers_name, original_name in inner:
                    if rest.startswith(diffusers_name + "."):
                        rest = original_name + rest[len(diffusers_name) :]
                converted[old + rest] = value
                break
        else:
            raise KeyError(f"no original name for {key}")
    return converted


def original_unet_state_dict(unet):
    """The UNet in the original (LDM) layout: the inverse of diffusers' `convert_ldm_unet_checkpoint`."""
    config, n = unet.config, len(unet.config.block_out_channels)
    layers = config.layers_per_block
    blocks = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ]
    resnets = [("mid_block.resnets.0.", "middle_block.0."), ("mid_block.resnets.1.", "middle_block.2.")]
    blocks.append(("mid_block.attentions.0.", "middle_block.1."))
    for i in range(n):
        for j in range(layers):
            resnets.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{1 + i * (layers + 1) + j}.0."))
            blocks.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{1 + i * (layers + 1) + j}.1."))
        blocks.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (layers + 1)}.0.op."))
        has_attention = "CrossAttn" in config.up_block_types[i]
        for j in range(layers + 1):
            resnets.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * (layers + 1) + j}.0."))
            blocks.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * (layers + 1) + j}.1."))
        upsampler = f"output_blocks.{i * (layers + 1) + layers}.{2 if has_attention else 1}.conv."
        blocks.append((f"up_blocks.{i}.upsamplers.0.conv.", upsampler))
    state_dict = unet.state_dict()
    converted = _renamed({k: v for k, v in state_dict.items() if ".resnets." in k}, resnets, _RESNET)
    converted.update(_renamed({k: v for k, v in state_dict.items() if ".resnets." not in k}, blocks))
    return {"model.diffusion_model." + key: value for key, value in converted.items()}


def original_vae_state_dict(vae):
    """The VAE in the original layout: the inverse of diffusers' `convert_ldm_vae_checkpoint`."""
    n = len(vae.config.block_out_channels)
    prefixes = [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        prefixes += [
            (f"{part}.conv_in.", f"{part}.conv_in."),
            (f"{part}.conv_out.", f"{part}.conv_out."),
            (f"{part}.conv_norm_out.", f"{part}.norm_out."),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."),
        ]
    for i in range(n):
        prefixes += [
            (f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
            (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
            (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."),
            (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."),
        ]
    converted = {}
    for key, value in _renamed(vae.state_dict(), prefixes, _VAE_ATTENTION).items():
        key = key.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".attn_1." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # linear in diffusers, 1x1 convolution originally
        converted["first_stage_model." + key] = value
    return converted


def original_text_encoder_state_dict(text_encoder):
    """CLIP in the original layout: transformers' names (as of transformers 4, under `text_model.`)."""
    return {
        "cond_stage_model.transformer." + (key if key.startswith("text_model.") else "text_model." + key): value
        for key, value in text_encoder.state_dict().items()
        if not key.endswith("position_ids")
    }


def write_single_file(pipe, path):
    """`pipe`'s UNet, VAE and text encoder as one original-layout `.safetensors` checkpoint."""
    state_dict = {
        **original_unet_state_dict(pipe.unet),
        **original_vae_state_dict(pipe.vae),
        **original_text_encoder_state_dict(pipe.text_encoder),
    }
    save_file({key: value.contiguous() for key, value in state_dict.items()}, str(path))
    return path


def save_config_folder(pipe, folder):
    """A plain Stable Diffusion folder with the same architecture, but other (random) weights: the `config`."""
    components = {name: component for name, component in pipe.components.items() if name != "image_encoder"}
    other = StableDiffusionPipeline(**components, requires_safety_checker=False)
    other.save_pretrained(folder)
    for model in ("unet", "vae", "text_encoder"):  # only the configs are read: leave no weights to fall back on
        for weights in (Path(folder) / model).glob("*.safetensors"):
            weights.unlink()
    return folder


def test_from_single_file_loads_the_original_layout(pipe, lpips_module, tmp_path):
    checkpoint = write_single_file(pipe, tmp_path / "tiny.safetensors")
    config = save_config_folder(pipe, tmp_path / "config")

    loaded = SyncDiffusionPipeline.from_single_file(str(checkpoint), config=str(config), local_files_only=True)

    assert type(loaded) is SyncDiffusionPipeline
    for name in ("unet", "vae", "text_encoder"):
        expected, actual = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(actual) == set(expected), name
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=f"{name}: {key}")
    np.testing.assert_array_equal(images(loaded, lpips_module), images(pipe, lpips_module))


# ---------------------------------------------------------------------------------------------------------------
# LPIPS weights offline
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """No connection can be opened, and torch's hub cache is an empty folder."""

    def refuse(*args, **kwargs):
        raise OSError("network access blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch-hub"))
    return tmp_path / "torch-hub"


def test_missing_lpips_weights_is_one_line_with_both_ways_out(pipe, no_network):
    pipe.set_perceptual_loss(None)
    with pytest.raises(OSError) as excinfo:
        pipe("a photo", height=64, width=128, num_inference_steps=2, output_type="np")

    message = str(excinfo.value)
    assert "\n" not in message
    assert "network access blocked by the test" in message
    assert str(no_network / "checkpoints" / "vgg16-397923af.pth") in message
    assert "set_perceptual_loss(vgg_weights=PATH)" in message and "set_perceptual_loss(module)" in message
    with pytest.raises(OSError):  # the test really is offline
        urllib.request.urlopen("https://download.pytorch.org/models/vgg16-397923af.pth", timeout=5)


def vgg16_state_dict(seed=0):
    """What torchvision's `vgg16-397923af.pth` holds, with random values: `features.*` of VGG-16 (configuration
    "D") and a `classifier.*` tensor (a small stand-in: building the real 120M-parameter classifier takes seconds)."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(seed)
    features = {f"features.{key}": value for key, value in make_layers(cfgs["D"]).state_dict().items()}
    return {**features, "classifier.0.weight": torch.randn(4, 8)}


def test_local_vgg_weights_build_lpips_from_that_file(pipe, tmp_path):
    weights = vgg16_state_dict()
    torch.save(weights, tmp_path / "vgg16.pth")

    pipe.set_perceptual_loss(vgg_weights=tmp_path / "vgg16.pth")

    loss = pipe.perceptual_loss("cpu")
    layers = dict(module for part in loss.net.children() for module in part.named_children())
    features = {key: value for key, value in weights.items() if key.startswith("features.")}
    assert len(features) == 26  # 13 convolutions, weight and bias
    for key, value in features.items():
        _, index, parameter = key.split(".")
        assert torch.equal(getattr(layers[index], parameter), value), key
    assert not any(parameter.requires_grad for parameter in loss.parameters())


def test_local_vgg_weights_errors(pipe, tmp_path):
    with pytest.raises(ValueError, match="`vgg_weights` .*missing.pth.* is not a file"):
        pipe.set_perceptual_loss(vgg_weights=tmp_path / "missing.pth")
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not torchvision's VGG-16 weights .*26 `features"):
        pipe.set_perceptual_loss(vgg_weights=tmp_path / "other.pth")
    with pytest.raises(ValueError, match="either `module` or `vgg_weights`"):
        pipe.set_perceptual_loss(torch.nn.Identity(), vgg_weights=tmp_path / "other.pth")


# ---------------------------------------------------------------------------------------------------------------
# Hygiene
# ---------------------------------------------------------------------------------------------------------------


def test_make_tokenizer_leaves_no_temporary_folder(tmp_path):
    pattern = os.path.join(tempfile.gettempdir(), "syncdiffusion-tokenizer-*")
    before = set(glob.glob(pattern))

    tokenizer = make_tokenizer()

    assert set(glob.glob(pattern)) <= before
    # Still whole without its files: it tokenizes, and saves and reloads the same.
    ids = tokenizer("a cat").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) == 6
    tokenizer.save_pretrained(tmp_path)
    assert type(tokenizer).from_pretrained(tmp_path)("a cat").input_ids == ids


# ---------------------------------------------------------------------------------------------------------------
# The command: export, --lpips-weights
# ---------------------------------------------------------------------------------------------------------------


def test_export_command_writes_a_folder_that_loads_itself(tmp_path, capsys):
    from syncdiffusion_utils.cli import main
    from syncdiffusion_utils.hub import model_repo_card
    from syncdiffusion_utils.testing import save_tiny_pipeline

    model = save_tiny_pipeline(tmp_path / "plain")
    out = tmp_path / "panorama-model"

    assert main(["export", str(out), "--model", str(model)]) == 0

    assert (out / "syncdiffusion.py").read_bytes() == Path(pipeline_syncdiffusion.__file__).read_bytes()
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == CLASS_NAME
    assert (out / "README.md").read_text() == model_repo_card("panorama-model", str(model))
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        model / "unet" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
    assert type(SyncDiffusionPipeline.from_pretrained(out)) is SyncDiffusionPipeline
    assert f"exported {model} to {out}" in capsys.readouterr().out

    assert main(["export", str(out), "--model", "tiny"]) == 2  # never over an existing folder
    err = error_line(capsys.readouterr().err)
    assert "already exists" in err and str(out) in err


def error_line(err):
    """The command's one error line (stderr may also hold progress bars)."""
    lines = [line for line in err.splitlines() if "syncdiffusion: error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def cli_args(model, output):
    return ["a lake", "--model", str(model), "--height", "64", "--width", "128", "--steps", "2", "-o", str(output)]


def test_lpips_weights_flag(tmp_path, capsys, no_network):
    from syncdiffusion_utils.cli import main
    from syncdiffusion_utils.testing import save_tiny_pipeline

    model = save_tiny_pipeline(tmp_path / "plain")
    torch.save(vgg16_state_dict(), tmp_path / "vgg16.pth")

    # Without the weights and without network: one line naming the file, where it goes, and the flag.
    assert main(cli_args(model, tmp_path / "missing.png")) == 1
    err = error_line(capsys.readouterr().err)
    assert str(no_network / "checkpoints" / "vgg16-397923af.pth") in err and "--lpips-weights PATH" in err
    assert not (tmp_path / "missing.png").exists()

    assert main(cli_args(model, tmp_path / "bad.png") + ["--lpips-weights", str(tmp_path / "nope.pth")]) == 2
    err = error_line(capsys.readouterr().err)
    assert "--lpips-weights" in err and "nope.pth" in err

    # With the local file: synchronized, offline.
    assert main(cli_args(model, tmp_path / "ok.png") + ["--lpips-weights", str(tmp_path / "vgg16.pth")]) == 0
    assert f"wrote {tmp_path / 'ok.png'}" in capsys.readouterr().out


def test_the_command_and_its_loading_modules_import_nothing_heavy():
    """`syncdiffusion --help` stays instant: the command, `loading` and `calls` import torch and diffusers lazily."""
    import subprocess

    code = (
        "import sys; import syncdiffusion_utils.cli, syncdiffusion_utils.loading, syncdiffusion_utils.calls;"
        " print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'huggingface_hub') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------------
# The class a model loads with: from its model_index.json (SD, SDXL, FLUX.1), and the offline tiny FLUX
# ---------------------------------------------------------------------------------------------------------------


def test_the_pipeline_class_comes_from_the_models_model_index(tmp_path):
    from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline
    from pipeline_syncdiffusion_xl import SyncDiffusionXLPipeline
    from syncdiffusion_utils import loading
    from syncdiffusion_utils.testing import save_tiny_flux_pipeline, save_tiny_pipeline, save_tiny_xl_pipeline

    flux = save_tiny_flux_pipeline(tmp_path / "flux")
    assert json.loads((flux / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    assert loading.pipeline_class_of(str(flux)) is SyncDiffusionFluxPipeline
    assert loading.pipeline_class_of(str(save_tiny_xl_pipeline(tmp_path / "xl"))) is SyncDiffusionXLPipeline
    assert loading.pipeline_class_of(str(save_tiny_pipeline(tmp_path / "sd"))) is SyncDiffusionPipeline
    for name, cls in (("tiny", SyncDiffusionPipeline), ("tiny-xl", SyncDiffusionXLPipeline)):
        assert loading.pipeline_class_of(name) is cls
    assert loading.pipeline_class_of("tiny-flux") is SyncDiffusionFluxPipeline

    # Loaded, the FLUX folder is the FLUX class with FLUX's own scheduler (the SD default, ddim, is not applied).
    pipe = loading.load_pipeline(str(flux), "cpu", progress=False)
    assert type(pipe) is SyncDiffusionFluxPipeline
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.default_window_size == 1024  # a real FLUX folder keeps FLUX.1's window


def test_another_flux_pipeline_is_refused_by_name(tmp_path):
    from syncdiffusion_utils import loading
    from syncdiffusion_utils.testing import save_tiny_flux_pipeline

    folder = save_tiny_flux_pipeline(tmp_path / "fill")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxFillPipeline"}))
    with pytest.raises(loading.CLIError, match="is a FluxFillPipeline model: .*FluxPipeline") as caught:
        loading.pipeline_class_of(str(folder))
    assert caught.value.code == 2


def test_tiny_flux_loads_offline_with_its_window_lpips_and_sync_decoder():
    from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline
    from syncdiffusion_utils import loading

    pipe = loading.load_pipeline("tiny-flux", "cpu", progress=False)
    assert type(pipe) is SyncDiffusionFluxPipeline
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.default_window_size == 64 and pipe.default_stride(64) == 2  # the tiny VAE's sample size
    assert pipe._perceptual_loss is not None  # a random LPIPS: nothing to download
    decoder = loading.load_sync_decoder("tiny", pipe)
    assert decoder.config.latent_channels == 16  # TAEF1's architecture, for FLUX's 16-channel latent
    with pytest.raises(loading.CLIError, match="--scheduler ddim: SyncDiffusionFluxPipeline runs flow-matching"):
        loading.load_pipeline("tiny-flux", "cpu", scheduler="ddim")


def test_export_command_of_tiny_flux_writes_a_folder_that_loads_itself(tmp_path, capsys):
    import pipeline_syncdiffusion_flux
    from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline
    from syncdiffusion_utils.cli import main
    from syncdiffusion_utils.hub import model_repo_card

    out = tmp_path / "flux-panorama"
    assert main(["export", str(out), "--model", "tiny-flux"]) == 0

    assert (out / "syncdiffusion_flux.py").read_bytes() == Path(pipeline_syncdiffusion_flux.__file__).read_bytes()
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["syncdiffusion_flux", "SyncDiffusionFluxPipeline"]
    assert (out / "README.md").read_text() == model_repo_card("flux-panorama", None, SyncDiffusionFluxPipeline)
    assert type(SyncDiffusionFluxPipeline.from_pretrained(out)) is SyncDiffusionFluxPipeline
    assert f"exported tiny-flux to {out}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# FLUX.2 [klein] and Z-Image: the class from model_index.json, FLUX.2 [dev] refused, the offline tiny models
# ---------------------------------------------------------------------------------------------------------------


def klein_class():
    from pipeline_syncdiffusion_flux2 import SyncDiffusionFlux2KleinPipeline

    return SyncDiffusionFlux2KleinPipeline


def z_image_class():
    from pipeline_syncdiffusion_z_image import SyncDiffusionZImagePipeline

    return SyncDiffusionZImagePipeline


def save_tiny_transformer_folder(name, folder, **kwargs):
    from syncdiffusion_utils.testing import save_tiny_flux2_klein_pipeline, save_tiny_z_image_pipeline

    save = {"flux2": save_tiny_flux2_klein_pipeline, "z-image": save_tiny_z_image_pipeline}[name]
    return save(folder, **kwargs)


TRANSFORMER_MODELS = [
    # (saved folder, tiny model, class, diffusers class in model_index.json, VAE latent channels)
    ("flux2", "tiny-flux2", klein_class, "Flux2KleinPipeline", 32),
    ("z-image", "tiny-z-image", z_image_class, "ZImagePipeline", 16),
]


@pytest.mark.parametrize(
    "name, tiny, pipeline_class, class_name, latent_channels", TRANSFORMER_MODELS, ids=["flux2", "z-image"]
)
def test_a_klein_or_z_image_folder_loads_with_its_own_class(
    name, tiny, pipeline_class, class_name, latent_channels, tmp_path
):
    from syncdiffusion_utils import loading

    folder = save_tiny_transformer_folder(name, tmp_path / name)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == class_name
    assert loading.pipeline_class_of(str(folder)) is pipeline_class()
    assert loading.pipeline_class_of(tiny) is pipeline_class()

    pipe = loading.load_pipeline(str(folder), "cpu", progress=False)
    assert type(pipe) is pipeline_class()
    assert pipe.transformer.dtype == torch.float32
    # The model's own flow-matching scheduler (the SD default, ddim, is neither applied nor accepted).
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.default_window_size == 1024 and pipe.default_stride(1024) == 32  # a real folder keeps its window
    assert pipe.vae.config.latent_channels == latent_channels
    with pytest.raises(loading.CLIError, match=f"--scheduler ddim: {pipeline_class().__name__} runs flow-matching"):
        loading.load_pipeline(str(folder), "cpu", scheduler="ddim")


def test_a_step_distilled_klein_folder_keeps_is_distilled(tmp_path):
    from syncdiffusion_utils import loading

    folder = save_tiny_transformer_folder("flux2", tmp_path / "distilled", is_distilled=True)
    pipe = loading.load_pipeline(str(folder), "cpu", progress=False)
    assert type(pipe) is klein_class() and pipe.config.is_distilled is True


@pytest.mark.parametrize(
    "name, class_name, message",
    [
        ("flux2", "Flux2Pipeline", "is FLUX.2 \\[dev\\] \\(Flux2Pipeline\\), which SyncDiffusion does not support"),
        ("flux2", "Flux2KleinKVPipeline", "is a Flux2KleinKVPipeline model: .*FLUX.2 \\[klein\\].*Flux2KleinPipeline"),
        ("flux2", "Flux2KleinInpaintPipeline", "is a Flux2KleinInpaintPipeline model: .*\\(Flux2KleinPipeline\\)"),
        ("z-image", "ZImageImg2ImgPipeline", "is a ZImageImg2ImgPipeline model: .*Z-Image .*\\(ZImagePipeline\\)"),
        ("z-image", "ZImageControlNetPipeline", "is a ZImageControlNetPipeline model: .*\\(ZImagePipeline\\)"),
    ],
    ids=["flux2-dev", "klein-kv", "klein-inpaint", "z-image-img2img", "z-image-controlnet"],
)
def test_flux2_dev_and_other_flux2_or_z_image_pipelines_are_refused_by_name(name, class_name, message, tmp_path):
    """FLUX.2 [dev] has klein's transformer class and VAE but another text encoder and an embedded guidance; the
    other FLUX.2 and Z-Image pipelines' models take other inputs. A one-line error (exit 2) before any weights load."""
    from syncdiffusion_utils import loading

    folder = save_tiny_transformer_folder(name, tmp_path / class_name)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": class_name}))
    for load in (loading.pipeline_class_of, loading.load_pipeline):
        with pytest.raises(loading.CLIError, match=message) as caught:
            load(str(folder))
        assert caught.value.code == 2 and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "name, tiny, pipeline_class, class_name, latent_channels", TRANSFORMER_MODELS, ids=["flux2", "z-image"]
)
def test_tiny_klein_and_z_image_load_offline_with_their_window_lpips_and_sync_decoder(
    name, tiny, pipeline_class, class_name, latent_channels, no_network, capsys
):
    from syncdiffusion_utils import loading

    pipe = loading.load_pipeline(tiny, "cpu", progress=False, attention_slicing=True)
    assert type(pipe) is pipeline_class()
    assert "--attention-slicing skipped" in capsys.readouterr().err  # the transformers' attention is SDPA's
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.default_window_size == 64 and pipe.default_stride(64) == 2  # the tiny VAE's sample size
    assert pipe._perceptual_loss is not None  # a random LPIPS: nothing to download
    if name == "flux2":
        assert pipe.config.is_distilled is False  # a base model: its classifier-free guidance runs
    decoder = loading.load_sync_decoder("tiny", pipe)
    assert decoder.config.latent_channels == latent_channels  # klein's 32-channel VAE latent; Z-Image's is FLUX.1's

    # Offline, synchronized through the tiny decoder: 3 views of the default window at its default stride.
    call = {"height": 64, "width": 96, "num_inference_steps": 2, "output_type": "np"}
    image = pipe("a lake", sync_thres=1, sync_decoder=decoder, generator=torch.Generator().manual_seed(0), **call)
    assert image.images.shape == (1, 64, 96, 3) and np.isfinite(image.images).all()
    multidiffusion = pipe("a lake", sync_weight=0, generator=torch.Generator().manual_seed(0), **call)
    # The synchronization acted: a random tiny decoder's gradient is small (measured 1.0e-5 klein, 3.0e-5 Z-Image;
    # the same call twice: 0).
    assert np.abs(image.images - multidiffusion.images).max() > 1e-6
    with pytest.raises(loading.CLIError, match=f"--scheduler ddim: {pipeline_class().__name__} runs flow-matching"):
        loading.load_pipeline(tiny, "cpu", scheduler="ddim")


def test_half_precision_is_bfloat16_for_the_transformer_classes():
    from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline
    from pipeline_syncdiffusion_xl import SyncDiffusionXLPipeline
    from syncdiffusion_utils import loading

    for pipeline_class in (SyncDiffusionFluxPipeline, klein_class(), z_image_class()):
        assert loading.is_transformer_pipeline(pipeline_class)
        assert loading.half_precision_dtype(pipeline_class) == torch.bfloat16
    for pipeline_class in (SyncDiffusionPipeline, SyncDiffusionXLPipeline):
        assert not loading.is_transformer_pipeline(pipeline_class)
        assert loading.half_precision_dtype(pipeline_class) == torch.float16
    # FLUX.1-only flags stay FLUX.1's: klein and Z-Image are not `is_flux`.
    assert [loading.is_flux(c) for c in (SyncDiffusionFluxPipeline, klein_class(), z_image_class())] == [1, 0, 0]
    assert loading.is_flux2_klein(klein_class()) and not loading.is_flux2_klein(z_image_class())
    assert loading.is_z_image(z_image_class()) and not loading.is_z_image(SyncDiffusionFluxPipeline)


@pytest.mark.parametrize(
    "tiny, pipeline_class, source",
    [("tiny-flux2", klein_class, "syncdiffusion_flux2"), ("tiny-z-image", z_image_class, "syncdiffusion_z_image")],
    ids=["flux2", "z-image"],
)
def test_export_command_of_tiny_klein_and_z_image_writes_a_folder_that_loads_itself(
    tiny, pipeline_class, source, tmp_path, capsys
):
    from syncdiffusion_utils.cli import main
    from syncdiffusion_utils.hub import model_repo_card

    out = tmp_path / "panorama"
    assert main(["export", str(out), "--model", tiny]) == 0

    file = Path(sys.modules[pipeline_class().__module__].__file__)
    assert (out / f"{source}.py").read_bytes() == file.read_bytes()
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == [source, pipeline_class().__name__]
    assert (out / "README.md").read_text() == model_repo_card("panorama", None, pipeline_class())
    assert type(pipeline_class().from_pretrained(out)) is pipeline_class()
    assert f"exported {tiny} to {out}" in capsys.readouterr().out
