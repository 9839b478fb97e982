"""`# Copied from` blocks stay identical to their sources (`syncdiffusion_utils.check_copies`)."""

import ast
import os
import textwrap

import pytest

import pipeline_syncdiffusion_xl
from syncdiffusion_utils import check_copies
from syncdiffusion_utils.testing import tiny_xl_pipeline


@pytest.mark.parametrize("filename", check_copies.pipeline_files(), ids=os.path.basename)
def test_pipeline_copies_match_their_sources(filename):
    drifted = check_copies.check(files=[filename])
    assert not drifted, (
        "\n".join(block.describe() for block in drifted) + "\nrun: python -m syncdiffusion_utils.check_copies --fix"
    )


def test_sdxl_pipeline_copies_the_panorama_and_synchronization_code():
    names = {block.name.split(".")[-1] for block in check_copies.find_copies(pipeline_syncdiffusion_xl.__file__)}
    assert {
        "get_views",
        "get_view_latents",
        "add_view_latents",
        "predict_clean_latents",
        "synchronize_views",
        "perceptual_gradient",
        "denoise_view_batch",
        "prepare_anchor",
        "check_inputs",
        "_sync_settings",
    } <= names


def tiny_controlnet_pipeline():
    from pipeline_syncdiffusion_controlnet import SyncDiffusionControlNetPipeline
    from syncdiffusion_utils.testing import make_components, make_tiny_controlnet

    components = make_components("tiny")
    controlnet = make_tiny_controlnet(components["unet"])
    return SyncDiffusionControlNetPipeline(
        **components, controlnet=controlnet, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


# Attributes `__call__` sets before any copied code runs.
SET_BY_CALL = {"_clip_skip", "_cross_attention_kwargs", "_num_timesteps", "_interrupt"}


@pytest.mark.parametrize(
    "module, build",
    [
        (pipeline_syncdiffusion_xl, lambda: tiny_xl_pipeline(lpips_module=False)),
        (pytest.importorskip("pipeline_syncdiffusion_controlnet"), tiny_controlnet_pipeline),
    ],
    ids=["xl", "controlnet"],
)
def test_copied_code_finds_every_attribute_it_uses(module, build):
    """A copy that calls a helper the source class gained (and the copy's class lacks) fails here, not at run time."""
    available = set(dir(build()))
    used, assigned = {}, set()
    for block in check_copies.find_copies(module.__file__):
        for node in ast.walk(ast.parse(textwrap.dedent(block.observed))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                if isinstance(node.ctx, ast.Store):
                    assigned.add(node.attr)  # a cache or state the copied code creates itself
                else:
                    used.setdefault(node.attr, block.name)
    missing = sorted(
        f"{name}: self.{attr}"
        for attr, name in used.items()
        if attr not in available | assigned | SET_BY_CALL and not attr.startswith("_guidance")
    )
    assert not missing, missing


SOURCE = '''\
SIZES = (1, 2)


class Source:
    def plain(self, x):
        """Twice x."""
        return 2 * x

    @staticmethod
    def decorated(value):
        return value + 1

    def renamed(self):
        return "Source"
'''

COPY = '''\
import os

# Copied from pipeline_syncdiffusion.SIZES
SIZES = (1, 2)


class Copy:
    # Copied from pipeline_syncdiffusion.Source.plain
    def plain(self, x):
        """Twice x."""
        return 2 * x

    def own(self):
        return os.sep

    # Copied from pipeline_syncdiffusion.Source.decorated
    @staticmethod
    def decorated(value):
        return value + 1

    # Copied from pipeline_syncdiffusion.Source.renamed with renamed->named, Source->Copy
    def named(self):
        return "Copy"
'''


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "pipeline_syncdiffusion.py").write_text(SOURCE)
    (tmp_path / "pipeline_syncdiffusion_copy.py").write_text(COPY)
    return tmp_path


def test_consistent_copies_pass(repo):
    assert check_copies.check(root=str(repo)) == []
    assert check_copies.main([], root=str(repo)) == 0


@pytest.mark.parametrize(
    "old, new",
    [
        ("        return 2 * x\n", "        return 3 * x\n"),  # body drifted
        ('        """Twice x."""\n', ""),  # docstring dropped
        ("    @staticmethod\n    def decorated", "    def decorated"),  # decorator dropped
        ('        return "Copy"\n', '        return "Source"\n'),  # replacement not applied
        ("SIZES = (1, 2)\n\n\nclass", "SIZES = (1, 2, 3)\n\n\nclass"),  # constant drifted
    ],
    ids=["body", "docstring", "decorator", "replacement", "constant"],
)
def test_drifted_copy_is_found_and_fixed(repo, capsys, old, new):
    copy_file = repo / "pipeline_syncdiffusion_copy.py"
    assert old in COPY
    copy_file.write_text(COPY.replace(old, new, 1))

    drifted = check_copies.check(root=str(repo))
    assert len(drifted) == 1
    assert check_copies.main([], root=str(repo)) == 1
    assert "does not match its source" in capsys.readouterr().out

    assert check_copies.main(["--fix"], root=str(repo)) == 0
    assert copy_file.read_text() == COPY  # rewritten exactly, the rest of the file untouched


def test_fix_follows_a_changed_source(repo):
    """What the lead does after editing the SD pipeline: the source changes, `--fix` carries it into the copies."""
    source = repo / "pipeline_syncdiffusion.py"
    source.write_text(SOURCE.replace("        return 2 * x\n", "        y = x + x\n        return y\n"))
    assert [b.name for b in check_copies.check(root=str(repo))] == ["pipeline_syncdiffusion.Source.plain"]
    assert check_copies.main(["--fix"], root=str(repo)) == 0
    assert "        y = x + x\n        return y\n" in (repo / "pipeline_syncdiffusion_copy.py").read_text()
    assert check_copies.check(root=str(repo)) == []


def test_a_missing_source_is_an_error(repo, capsys):
    (repo / "pipeline_syncdiffusion.py").write_text(SOURCE.replace("def plain", "def plainer"))
    assert check_copies.main([], root=str(repo)) == 1
    assert "'plain' is not defined" in capsys.readouterr().err
    with pytest.raises(check_copies.CopyError):
        check_copies.check(root=str(repo), fix=True)
