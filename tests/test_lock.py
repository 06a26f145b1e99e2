"""The test environment's lock (.ci/test-constraints.txt) pins every package the test install asks for.

install.sh applies the lock with ``pip -c``: a requirement the lock does not pin would float to whatever is newest on
the day CI runs, which is how a dependency release once broke a fresh clone. Re-resolve the lock with ``.ci/lock``.
"""

import importlib.util
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / ".ci" / "test-constraints.txt"
NOT_LOCKED = {"torch"}  # install.sh takes torch==2.13.0 itself, or keeps a CUDA build that is already there


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def setup_module_requirements():
    spec = importlib.util.spec_from_file_location("rlvrw_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # main() only runs under __main__
    return setup


def read_lock() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"{LOCK.name}: {line!r} is not an exact pin (name==version)"
        assert canonical(name) not in pins, f"{LOCK.name} pins {name} twice"
        pins[canonical(name)] = Version(version)
    return pins


def test_every_test_requirement_is_pinned_within_its_range():
    setup = setup_module_requirements()
    pins = read_lock()
    wanted = [Requirement(r) for r in setup.INSTALL_REQUIRES + setup.EXTRAS_REQUIRE["test"]]
    assert wanted
    for req in wanted:
        name = canonical(req.name)
        if name in NOT_LOCKED:
            continue
        assert name in pins, f"{req.name} (a test requirement) is not pinned in {LOCK.name}: run .ci/lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {req.name}=={pins[name]}, outside the requirement {req}: run .ci/lock")


def test_lock_leaves_torch_to_install_sh():
    pins = read_lock()
    assert "torch" not in pins and not any(n.startswith("nvidia-") for n in pins)
    install = (ROOT / "install.sh").read_text()
    assert "-c \"$constraints\"" in install and ".ci/test-constraints.txt" in install


@pytest.mark.parametrize("extra", ["lang", "sim", "verl", "trl"])
def test_test_extra_includes_the_optional_extras_it_tests(extra):
    setup = setup_module_requirements()
    assert set(setup.EXTRAS_REQUIRE[extra]) <= set(setup.EXTRAS_REQUIRE["test"])
