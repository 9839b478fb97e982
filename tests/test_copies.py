"""`# Copied from` blocks stay identical to their sources (`syncdiffusion_utils.check_copies`)."""

import ast
import os
import textwrap

import pytest

import pipeline_syncdiffusion_controlnet
import pipeline_syncdiffusion_xl
from syncdiffusion_utils import check_copies
from syncdiffusion_utils.testing import tiny_xl_pipeline


@pytest.mark.parametrize("filename", check_copies.pipeline_files(), ids=os.path.basename)
def test_pipeline_copies_match_their_sources(filename):
    drifted = check_copies.check(files=[filename])
    assert not drifted, (
        "\n".join(block.describe() for block in drifted) + "\nrun: python -m syncdiffusion_utils.check_copies --fix"
    )


DERIVED_FILES = [f for f in check_copies.pipeline_files() if os.path.basename(f) != "pipeline_syncdiffusion.py"]


@pytest.mark.parametrize("filename", DERIVED_FILES, ids=os.path.basename)
def test_every_pipeline_file_copies_the_whole_panorama_core(filename):
    """The views, the synchronization update and the loop's step are one copied core, not adapted per file."""
    names = check_copies.core_names()
    short = {name.split(".")[-1] for name in names}
    assert {"get_views", "crop_views", "add_views", "SyncSettings", "synchronization_update"} <= short
    assert {
        "denoise_step",
        "denoise_view_batch",
        "prepare_anchor",
        "synchronize_views",
        "check_panorama_inputs",
    } <= short
    assert check_copies.missing_core(filename) == []


def test_a_missing_core_copy_is_reported(tmp_path):
    """Dropping one core copy from a pipeline file makes the checker fail, naming it."""
    for name in ("pipeline_syncdiffusion.py", "pipeline_syncdiffusion_xl.py"):
        (tmp_path / name).write_text(open(os.path.join(check_copies.REPO_ROOT, name)).read())
    xl = tmp_path / "pipeline_syncdiffusion_xl.py"
    text = xl.read_text().replace(
        "    # Copied from pipeline_syncdiffusion.SyncDiffusionPipeline.denoise_step\n", "", 1
    )
    xl.write_text(text)
    assert check_copies.missing_core(str(xl), root=str(tmp_path)) == [
        "pipeline_syncdiffusion.SyncDiffusionPipeline.denoise_step"
    ]
    assert check_copies.main([], root=str(tmp_path)) == 1


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
        (pipeline_syncdiffusion_controlnet, tiny_controlnet_pipeline),
    ],
    ids=["xl", "controlnet"],
)
def test_copied_code_finds_every_attribute_it_uses(module, build):
    """A copy that calls a helper the source class gained (and the copy's class lacks) fails here, not at run time."""
    available = set(dir(build()))
    used, assigned = {}, set()
    for block in check_copies.find_copies(module.__file__):
        if not block.name.startswith("pipeline_syncdiffusion.SyncDiffusionPipeline."):
            continue  # module-level definitions (the core's classes) have their own `self`
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
