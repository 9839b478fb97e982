"""Keep the `# Copied from` blocks of the pipeline files identical to their sources, as diffusers' check_copies does.

    python -m syncdiffusion_utils.check_copies          # list drifted blocks, exit 1 if any
    python -m syncdiffusion_utils.check_copies --fix    # rewrite them from their sources

A pipeline file is self-contained, so code shared with another pipeline file is copied, and the copy says so on the
line right above it (above its decorators, if any)::

    # Copied from pipeline_syncdiffusion.SyncDiffusionPipeline.get_views
    def get_views(self, ...):

    # Copied from pipeline_syncdiffusion.SyncDiffusionPipeline.check_inputs with check_inputs->check_panorama_inputs
    def check_panorama_inputs(self, ...):

The name after `Copied from` is `module.Class.method`, `module.function` or `module.CONSTANT`, the module a
top-level `.py` file of the repository. The copied block is the source's decorators, `def`/`class` line and body
(or the assignment), with each `old->new` replacement applied as a plain string replacement, in order, and
re-indented to the copy's indentation. Every `pipeline_syncdiffusion*.py` file at the top level is checked.

The panorama core, the module-level definitions of `pipeline_syncdiffusion.py` under its "The panorama core" banner
and the `SyncDiffusionPipeline` methods under "The panorama core's methods", must be copied into every other
pipeline file: a missing one is reported like a drifted one.
"""

import argparse
import ast
import glob
import os
import re
import sys
import textwrap
from dataclasses import dataclass


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILE_PATTERN = "pipeline_syncdiffusion*.py"
CORE_MODULE = "pipeline_syncdiffusion"
CORE_CLASS = "SyncDiffusionPipeline"
_CORE_BANNER = "# The panorama core."
_CORE_METHODS_BANNER = "# The panorama core's methods"

_MARKER = re.compile(r"^(?P<indent>[ \t]*)#\s*Copied from\s+(?P<name>[\w.]+)(?:\s+with\s+(?P<replacements>.*?))?\s*$")
_REPLACEMENT = re.compile(r"^\s*(\S+?)->(\S*)\s*$")


class CopyError(ValueError):
    """A marker that cannot be checked: unknown source, malformed replacement, no block under it."""


@dataclass
class CopyBlock:
    """One `# Copied from` block of a file: where it is (1-based, inclusive lines) and what it should be."""

    filename: str
    marker_line: int
    name: str
    start: int  # first line of the block (its first decorator, or the def/class/assignment)
    end: int  # last line of the block
    observed: str
    expected: str

    @property
    def drifted(self):
        return self.observed != self.expected

    def describe(self):
        return f"{self.filename}:{self.start}: copy of {self.name} does not match its source"


def _block_span(node):
    """1-based `(first, last)` lines of a def/class (decorators included) or an assignment."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return first, node.end_lineno


def _defines(node, name):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name == name
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
    if isinstance(node, ast.AnnAssign):
        return isinstance(node.target, ast.Name) and node.target.id == name
    return False


def _read_lines(path):
    with open(path, "r", encoding="utf-8", newline="") as f:
        return f.read().splitlines(keepends=True)


def find_source(name, root=REPO_ROOT):
    """The source text (dedented, decorators included) of `module.Class.method`, `module.function` or `module.NAME`."""
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        path = os.path.join(root, *parts[:split]) + ".py"
        if os.path.isfile(path):
            break
    else:
        raise CopyError(f"`{name}`: no module file for it under {root}")
    lines = _read_lines(path)
    body = ast.parse("".join(lines), filename=path).body
    node = None
    for part in parts[split:]:
        node = next((n for n in body if _defines(n, part)), None)
        if node is None:
            raise CopyError(f"`{name}`: {part!r} is not defined in {os.path.relpath(path, root)}")
        body = getattr(node, "body", [])
    first, last = _block_span(node)
    return textwrap.dedent("".join(lines[first - 1 : last]))


def parse_replacements(text):
    """`"a->b, c->d"` as `[("a", "b"), ("c", "d")]`."""
    pairs = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        match = _REPLACEMENT.match(item)
        if match is None:
            raise CopyError(f"replacement {item.strip()!r} is not of the form old->new")
        pairs.append(match.groups())
    return pairs


def expected_code(name, replacements, indent, root=REPO_ROOT):
    """The block the copy should be: the source, with `replacements` applied, indented by `indent`."""
    code = find_source(name, root)
    for old, new in parse_replacements(replacements):
        code = code.replace(old, new)
    return textwrap.indent(code, indent, lambda line: line.strip() != "")


def find_copies(filename, root=REPO_ROOT):
    """Every `# Copied from` block of `filename`, with its observed and expected text."""
    lines = _read_lines(filename)
    tree = ast.parse("".join(lines), filename=filename)
    starts = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)):
            starts.setdefault(_block_span(node)[0], node)
    blocks = []
    for index, line in enumerate(lines):
        match = _MARKER.match(line)
        if match is None:
            continue
        marker_line = index + 1
        node = starts.get(marker_line + 1)
        where = f"{os.path.relpath(filename, root)}:{marker_line}"
        if node is None:
            raise CopyError(f"{where}: `# Copied from` must be right above a def, class or assignment")
        start, end = _block_span(node)
        try:
            expected = expected_code(match["name"], match["replacements"], match["indent"], root)
        except CopyError as error:
            raise CopyError(f"{where}: {error}") from None
        observed = "".join(lines[start - 1 : end])
        blocks.append(CopyBlock(filename, marker_line, match["name"], start, end, observed, expected))
    return blocks


def fix_file(filename, root=REPO_ROOT):
    """Rewrite the drifted copies of `filename` from their sources; returns the blocks that were rewritten."""
    drifted = [block for block in find_copies(filename, root) if block.drifted]
    if not drifted:
        return []
    lines = _read_lines(filename)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    # Bottom-up, so that the line numbers of the blocks above stay valid.
    for block in sorted(drifted, key=lambda b: b.start, reverse=True):
        expected = block.expected.replace("\n", newline)
        if not expected.endswith(newline):
            expected += newline
        lines[block.start - 1 : block.end] = [expected]
    text = "".join(lines)
    ast.parse(text, filename=filename)  # never write a file that no longer parses
    with open(filename, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return drifted


def _defined_name(node):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id
    return None


def _banner_line(lines, banner, start=0):
    """The 1-based line of the first comment line holding `banner` at or after line `start`."""
    for index in range(start, len(lines)):
        if lines[index].strip().startswith("#") and banner in lines[index]:
            return index + 1
    raise CopyError(f"{CORE_MODULE}.py has no `{banner}` banner")


def core_names(root=REPO_ROOT):
    """The names every pipeline file copies: `CORE_MODULE.name` and `CORE_MODULE.CORE_CLASS.method` (none where
    `CORE_MODULE` has no core banner)."""
    path = os.path.join(root, CORE_MODULE + ".py")
    lines = _read_lines(path)
    if not any(_CORE_BANNER in line for line in lines):
        return []
    tree = ast.parse("".join(lines), filename=path)
    core_start = _banner_line(lines, _CORE_BANNER)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == CORE_CLASS)
    names = [
        f"{CORE_MODULE}.{_defined_name(node)}"
        for node in tree.body
        if core_start < node.lineno < cls.lineno and _defined_name(node) is not None
    ]
    methods_start = _banner_line(lines, _CORE_METHODS_BANNER, cls.lineno)
    # The core's methods run up to the class's next banner (a `# ---` line after the banner's own closing one).
    methods_end = next(
        (i + 1 for i in range(methods_start + 1, cls.end_lineno) if lines[i].strip().startswith("# ---")),
        cls.end_lineno,
    )
    names += [
        f"{CORE_MODULE}.{CORE_CLASS}.{_defined_name(node)}"
        for node in cls.body
        if methods_start < node.lineno < methods_end and _defined_name(node) is not None
    ]
    return names


def missing_core(filename, root=REPO_ROOT):
    """The core definitions `filename` does not copy (none for the core's own file)."""
    if os.path.basename(filename) == CORE_MODULE + ".py":
        return []
    copied = {block.name for block in find_copies(filename, root)}
    return [name for name in core_names(root) if name not in copied]


def pipeline_files(root=REPO_ROOT):
    return sorted(glob.glob(os.path.join(root, FILE_PATTERN)))


def check(root=REPO_ROOT, fix=False, files=None):
    """The drifted blocks of every pipeline file (rewritten first with `fix=True`, then none should remain)."""
    drifted = []
    for filename in files or pipeline_files(root):
        if fix:
            fix_file(filename, root)
        drifted += [block for block in find_copies(filename, root) if block.drifted]
    return drifted


def main(argv=None, root=REPO_ROOT):
    parser = argparse.ArgumentParser(
        prog="python -m syncdiffusion_utils.check_copies", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--fix", action="store_true", help="rewrite drifted copies from their sources")
    parser.add_argument("files", nargs="*", help=f"files to check (default: every top-level {FILE_PATTERN})")
    args = parser.parse_args(argv)
    try:
        if args.fix:
            rewritten = []
            for filename in args.files or pipeline_files(root):
                rewritten += fix_file(filename, root)
            for block in rewritten:
                print(f"fixed {os.path.relpath(block.filename, root)}:{block.start}: copy of {block.name}")
        drifted = check(root, files=args.files or None)
        missing = {filename: missing_core(filename, root) for filename in args.files or pipeline_files(root)}
    except (CopyError, SyntaxError) as error:
        print(f"check_copies: error: {error}", file=sys.stderr)
        return 1
    for block in drifted:
        print(
            f"- {os.path.relpath(block.filename, root)}:{block.start}: copy of {block.name} does not match its source"
        )
    if drifted:
        print("Run `python -m syncdiffusion_utils.check_copies --fix` to rewrite them.")
    for filename, names in missing.items():
        for name in names:
            print(
                f"- {os.path.relpath(filename, root)}: the panorama core's {name} is not copied (`# Copied from {name}`)"
            )
    return 1 if drifted or any(missing.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
