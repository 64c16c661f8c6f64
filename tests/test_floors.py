"""The CI constraints file .ci/floors.txt pins exactly the lower bounds setup.py declares (see .ci/make_floors.py)."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement

from testing_utils import load_script

CI = Path(__file__).resolve().parents[1] / ".ci"


def make_floors():
    return load_script(CI / "make_floors.py")


def test_floors_file_agrees_with_setup_py():
    module = make_floors()
    assert (CI / "floors.txt").read_text() == module.render(), "run python3 .ci/make_floors.py"
    assert module.main(["--check"]) == 0


def test_every_declared_floor_is_pinned():
    module = make_floors()
    pins = {}
    for line in (CI / "floors.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    for requirement in module.declared_requirements():
        lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if lower:
            assert pins[requirement.name] == lower[0], requirement
    assert pins["torch"] and pins["diffusers"] and pins["transformers"]  # the core is covered


def test_disagreeing_or_repeated_floors_are_caught(tmp_path):
    module = make_floors()
    pinned, unbounded = module.floors([Requirement("torch>=2.5.1"), Requirement("numpy"), Requirement("Torch>=2.5.1")])
    assert pinned == {"torch": "2.5.1"} and unbounded == ["numpy"]
    with pytest.raises(SystemExit, match="two floors"):
        module.floors([Requirement("accelerate>=1.0"), Requirement("accelerate>=1.3.0")])
    text = module.render([Requirement("diffusers>=0.36.0"), Requirement("pyyaml")])
    assert text.endswith("# no lower bound declared (newest release): pyyaml\ndiffusers==0.36.0\n")
