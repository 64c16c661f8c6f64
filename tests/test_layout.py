"""The package's own modules never import each other's private (underscore) names."""

import ast
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
