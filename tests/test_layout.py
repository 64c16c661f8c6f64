"""The package's own modules never import each other's private (underscore) names."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY_ROOTS = ("src", "examples", "benchmarks", "scripts", "tests")


def private_imports(source: str):
    """(line, module, name) of every `from X import _name` of a first-party module in `source` (relative imports
    and `flowmo_diffusers...`); third-party modules are not ours to police."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        first_party = node.level > 0 or (node.module or "").split(".")[0] == "flowmo_diffusers"
        for alias in node.names:
            if first_party and alias.name.startswith("_") and not alias.name.startswith("__"):
                found.append((node.lineno, "." * node.level + (node.module or ""), alias.name))
    return found


def test_the_checker_sees_private_imports():
    assert private_imports("from .data import _decoder, public\nfrom flowmo_diffusers.x import _y\n") == [
        (1, ".data", "_decoder"),
        (2, "flowmo_diffusers.x", "_y"),
    ]
    assert private_imports("from huggingface_hub.utils import _http\nfrom . import __version__\n") == []


def test_no_module_imports_another_modules_private_names():
    offenders = [
        f"{path.relative_to(REPO)}:{line}: from {module} import {name}"
        for root in FIRST_PARTY_ROOTS
        for path in sorted((REPO / root).rglob("*.py"))
        for line, module, name in private_imports(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


#: What each subpackage of flowmo_diffusers may import (besides itself): imports run one way, from the entry points
#: (examples/, scripts/, benchmarks/) through evaluation / training, data / metrics, down to the models.
ALLOWED_IMPORTS = {
    "utils": set(),
    "schedulers": {"utils"},
    # The models take `from_single_file` from conversion.single_file, as diffusers' models take it from
    # diffusers.loaders; that module imports the converter inside its methods (the converter builds models).
    "models": {"schedulers", "utils", "conversion.single_file"},
    "conversion": {"models", "schedulers", "utils"},
    "pipelines": {"models", "schedulers", "conversion", "utils"},
    "metrics": {"utils"},
    "data": {"utils"},
    "training": {"data", "metrics", "models", "schedulers", "pipelines", "conversion", "utils"},
    "evaluation": {"data", "metrics", "models", "schedulers", "pipelines", "conversion", "utils"},
}
PACKAGE = REPO / "src" / "flowmo_diffusers"


def imported_modules(path: Path):
    """(line, dotted module below flowmo_diffusers) of every first-party import in the file at `path`, lazy ones too."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [module] if node.module else [".".join(base + [alias.name]) for alias in node.names]
            elif (node.module or "").startswith("flowmo_diffusers"):
                targets = [node.module.removeprefix("flowmo_diffusers").lstrip(".")]
            else:
                continue
            found += [(node.lineno, target) for target in targets]
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, alias.name.removeprefix("flowmo_diffusers").lstrip("."))
                for alias in node.names
                if alias.name.split(".")[0] == "flowmo_diffusers"
            ]
    return found


def is_allowed(importer: str, target: str) -> bool:
    if not target or importer == "" or target.split(".")[0] == importer:
        return True  # the package facade, and imports within a subpackage
    allowed = ALLOWED_IMPORTS[importer]
    return target.split(".")[0] in allowed or any(target == entry or target.startswith(entry + ".") for entry in allowed)


def test_the_layer_checker_resolves_relative_imports(tmp_path):
    assert is_allowed("training", "data.loaders") and not is_allowed("data", "training.recipe")
    assert is_allowed("models", "conversion.single_file") and not is_allowed("models", "conversion.original")
    assert not is_allowed("evaluation", "training") and not is_allowed("metrics", "models")


def test_subpackages_import_one_way():
    subpackages = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()}
    assert subpackages == set(ALLOWED_IMPORTS), "a new subpackage needs its place in ALLOWED_IMPORTS"
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        importer = parts[0] if len(parts) > 1 else ""
        for line, target in imported_modules(path):
            if not is_allowed(importer, target):
                offenders.append(f"{path.relative_to(REPO)}:{line}: {importer} imports {target}")
    assert offenders == []


def test_entry_points_use_the_package_not_each_other():
    """Example scripts, scripts and benchmarks import flowmo_diffusers; the package never imports them."""
    offenders = [
        f"{path.relative_to(REPO)}:{line}: imports {target}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for line, target in [(node.lineno, getattr(node, "module", None) or "")]
        if target.split(".")[0] in {"examples", "benchmarks", "scripts", "tests"}
    ]
    assert offenders == []


def google_style_argument_lines(source: str):
    """(line, text) of argument entries written `name: text` in the Args/Parameters/Attributes sections of the
    docstrings in `source`; diffusers' style is ``name (`type`, *optional*, defaults to `x`):``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        docstring = ast.get_docstring(node, clean=True)
        if not docstring:
            continue
        for section in re.finditer(r"^(Args|Parameters|Arguments|Attributes):\n((?:[ \t]+.*\n?|\n)+)", docstring, re.M):
            for text in section.group(2).split("\n"):
                if re.match(r"^    \S", text) and not re.match(r"^    [\w*]+(, [\w*]+)* \((`|\[)", text):
                    found.append((getattr(node, "lineno", 1), text.strip()))
    return found


def test_the_docstring_checker_tells_the_styles_apart():
    google = 'def f(x):\n    """Do it.\n\n    Args:\n        x: the input.\n    """\n'
    diffusers = 'def f(x):\n    """Do it.\n\n    Args:\n        x (`int`, *optional*, defaults to 1):\n            the input.\n    """\n'
    assert google_style_argument_lines(google) == [(1, "x: the input.")]
    assert google_style_argument_lines(diffusers) == []


def test_docstrings_use_one_argument_style():
    offenders = [
        f"{path.relative_to(REPO)}:{line}: {text[:80]}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, text in google_style_argument_lines(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_type_hints_use_one_style():
    """PEP 604 / 585 annotations (`int | None`, `list[str]`) everywhere: no `typing.Optional`, `Union`, `List`, ..."""
    old_style = {"Optional", "Union", "List", "Dict", "Tuple", "Set", "FrozenSet", "Type"}
    offenders = [
        f"{path.relative_to(REPO)}:{node.lineno}: from typing import {alias.name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.module == "typing"
        for alias in node.names
        if alias.name in old_style
    ]
    assert offenders == []
