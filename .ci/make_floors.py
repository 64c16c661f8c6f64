#!/usr/bin/env python3
"""Write .ci/floors.txt: a pip constraints file pinning every package to the lower bound setup.py declares.

    python3 .ci/make_floors.py            # (re)write .ci/floors.txt
    python3 .ci/make_floors.py --check    # exit 1 if .ci/floors.txt and setup.py disagree

.ci/run installs `pip install -c .ci/floors.txt -e ".[test]"` in a second venv and runs the tests there, so each
declared floor is a version the package was tested with. tests/test_floors.py checks that the file is up to date.
Requirements without a lower bound are listed in a comment: pip takes their newest release there too.
"""

import argparse
import contextlib
import os
import runpy
import sys
from pathlib import Path
from unittest import mock

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
FLOORS = Path(__file__).resolve().parent / "floors.txt"
HEADER = """\
# Generated from setup.py by .ci/make_floors.py; do not edit (tests/test_floors.py checks it).
# Each package at the lower bound setup.py declares, core and extras: .ci/run installs
#   pip install -c .ci/floors.txt -e ".[test]"
# in a second venv and runs the test suite against it.
"""


@contextlib.contextmanager
def _cwd(path: Path):
    before = os.getcwd()
    os.chdir(path)  # setup.py reads README.md relative to the working directory
    try:
        yield
    finally:
        os.chdir(before)


def declared_requirements(setup_py: Path = ROOT / "setup.py") -> list:
    """install_requires and every extras_require list of setup.py, as written (setup() itself is not run)."""
    captured = {}
    with mock.patch("setuptools.setup", lambda **kwargs: captured.update(kwargs)), _cwd(setup_py.parent):
        runpy.run_path(str(setup_py), run_name="__main__")
    requirements = list(captured.get("install_requires", []))
    for extra in captured.get("extras_require", {}).values():
        requirements += extra
    return [Requirement(text) for text in requirements]


def floors(requirements) -> tuple:
    """`({name: floor version}, [names without a lower bound])`; a package declared with two floors is an error."""
    found, names, unbounded = {}, {}, set()
    for requirement in requirements:
        key = canonicalize_name(requirement.name)
        bounds = [spec.version for spec in requirement.specifier if spec.operator in (">=", "==", "~=")]
        if len(bounds) > 1:
            raise SystemExit(f"setup.py: {requirement} has more than one lower bound")
        if not bounds:
            unbounded.add(requirement.name)
            continue
        if key in found and found[key] != bounds[0]:
            raise SystemExit(
                f"setup.py declares {requirement.name} with two floors, {found[key]} and {bounds[0]}: declare it once"
            )
        found[key] = bounds[0]
        names.setdefault(key, requirement.name)  # the first spelling
    unbounded = sorted(name for name in unbounded if canonicalize_name(name) not in found)
    return {names[key]: version for key, version in found.items()}, unbounded


def render(requirements=None) -> str:
    pinned, unbounded = floors(declared_requirements() if requirements is None else requirements)
    lines = [f"{name}=={version}" for name, version in sorted(pinned.items(), key=lambda item: item[0].lower())]
    comment = f"# no lower bound declared (newest release): {', '.join(unbounded)}\n" if unbounded else ""
    return HEADER + comment + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if .ci/floors.txt is not what setup.py gives")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not FLOORS.exists() or FLOORS.read_text() != text:
            print(f"{FLOORS} disagrees with setup.py: run python3 .ci/make_floors.py", file=sys.stderr)
            return 1
        return 0
    FLOORS.write_text(text)
    print(f"wrote {FLOORS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
