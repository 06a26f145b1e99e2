"""What a user installs: the source distribution carries everything a GPU machine needs to build rlvrw._C (csrc/,
CMakeLists.txt), the Triton kernels, the licence and install.sh; a wheel built from that sdist holds rlvrw.kernels
(from kernels/, which has no __init__.py on purpose), py.typed and the licence; the metadata names the licence, the
README as long description and every extra as a range.

The builds run on a copy of the checkout (the files git would clone), never in the working tree, with
RLVRW_NO_CUDA_EXT=1 so that a GPU machine does not compile the extension here.
"""

import email.parser
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CSRC_SUFFIXES = (".cu", ".cuh", ".cpp", ".h")
# Files install.sh and the CUDA build read, besides the packages.
TOP_LEVEL = ["LICENSE", "README.md", "install.sh", "CMakeLists.txt", "pyproject.toml", "setup.py",
             ".ci/test-constraints.txt"]
NOT_SHIPPED = ("tests/", "bench/", "examples/")
NEW_EXTRAS = ("verl", "trl", "flash-attn", "xformers", "dali", "cupy")
BUILD_ENV = {**os.environ, "RLVRW_NO_CUDA_EXT": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def load_setup():
    spec = importlib.util.spec_from_file_location("rlvrw_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # main() only runs under __main__
    return setup


def checkout_files() -> list[str]:
    """The checkout's files as a clone has them: tracked plus new files git does not ignore."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: the file list of a clone is unknown")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """(names in the sdist relative to its top folder, the unpacked sdist's path)."""
    tmp = tmp_path_factory.mktemp("sdist")
    clone = tmp / "clone"
    for name in checkout_files():
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, clone / name)
    run = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp / "dist")], cwd=clone,
                         env=BUILD_ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    (archive,) = (tmp / "dist").glob("rlvrw-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
        members = [m.name for m in tar.getmembers() if m.isfile()]
    top = members[0].split("/", 1)[0]
    names = sorted(m.split("/", 1)[1] for m in members)
    return names, tmp / "unpacked" / top


@pytest.fixture(scope="module")
def wheel(sdist, tmp_path_factory):
    """The wheel pip builds from the unpacked sdist: (names in it, its METADATA, the wheel's path)."""
    _, source = sdist
    out = tmp_path_factory.mktemp("wheel")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out),
                          str(source)], env=BUILD_ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    (path,) = out.glob("rlvrw-*.whl")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        return names, email.parser.Parser().parsestr(zf.read(metadata).decode()), path


def test_sdist_carries_the_cuda_sources_kernels_licence_and_install_script(sdist):
    names, _ = sdist
    csrc = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in CSRC_SUFFIXES)
    assert any(n.startswith("csrc/testing/") for n in csrc), "csrc/testing/ has sources to ship"
    kernels = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "kernels").glob("*.py"))
    # rlvrw.kernels is kernels/ (setup.py's package_dir): rlvrw/kernels/__init__.py serves checkouts only
    package = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "rlvrw").rglob("*.py")
                     if "__pycache__" not in p.parts and p.parent.name != "kernels")
    missing = sorted(set(csrc + kernels + package + TOP_LEVEL + ["rlvrw/py.typed"]) - set(names))
    assert not missing, f"the sdist leaves out {missing}"
    assert len(csrc) >= 6 and len(kernels) >= 5


def test_sdist_leaves_tests_benchmarks_data_and_build_outputs_out(sdist):
    names, _ = sdist
    stray = [n for n in names if n.startswith(NOT_SHIPPED) or "__pycache__" in n or n.endswith((".so", ".pyc", ".o"))]
    assert not stray, f"the sdist should not carry {stray}"


def test_wheel_from_the_sdist_holds_rlvrw_kernels_and_py_typed(wheel):
    names, _, _ = wheel
    kernels = {f"rlvrw/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert kernels <= set(names), f"the wheel lacks {sorted(kernels - set(names))}"
    assert "rlvrw/py.typed" in names and "rlvrw/ops/__init__.py" in names
    # the CUDA sources that rlvrw._C_cupy compiles with NVRTC where the extension was not built
    sources = {f"rlvrw/_csrc/{p.name}" for p in (ROOT / "csrc").iterdir() if p.suffix in CSRC_SUFFIXES}
    assert sources <= set(names), f"the wheel lacks {sorted(sources - set(names))}"
    assert not [n for n in names if n.startswith(("kernels/", "csrc/", "tests/", "examples/"))]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_installed_wheel_imports_its_own_kernels(wheel, tmp_path):
    """Installed from the wheel (away from any checkout), rlvrw.kernels resolves to the wheel's copy of kernels/ and
    the CUDA sources for NVRTC to its copy of csrc/."""
    _, _, path = wheel
    target = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(target),
                          str(path)], env=BUILD_ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    probe = ("import rlvrw, rlvrw.kernels.logprobs as k, rlvrw._nvrtc_source as s; "
             "print(rlvrw.__file__); print(k.__file__); print(s.csrc_dir())")
    env = {**BUILD_ENV, "PYTHONPATH": str(target), "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    package_file, kernel_file, csrc = run.stdout.split()
    assert Path(package_file).is_relative_to(target)
    assert Path(kernel_file) == target / "rlvrw" / "kernels" / "logprobs.py"
    assert Path(csrc) == target / "rlvrw" / "_csrc"


def test_metadata_licence_readme_and_extras(wheel):
    _, meta, _ = wheel
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().strip() == (ROOT / "README.md").read_text(encoding="utf-8").strip()
    assert "Typing :: Typed" in meta.get_all("Classifier")
    for name, url in (line.split(", ", 1) for line in meta.get_all("Project-URL") or []):
        assert url.startswith("https://") and "example" not in url, f"{name}: {url} looks like a placeholder"
    setup = load_setup()
    assert set(meta.get_all("Provides-Extra")) == set(setup.EXTRAS_REQUIRE)


def test_licence_is_apache_2_with_our_copyright():
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and text.count("\n") > 190  # the full text, not a pointer to it
    assert "Copyright 2026 the rlvrw authors" in text and "[yyyy]" not in text


@pytest.mark.parametrize("extra", [e for e in load_setup().EXTRAS_REQUIRE if e != "test"])
def test_every_extra_is_a_range(extra):
    """Libraries pin nothing: each requirement of an extra has a lower bound (the test lock pins the test env)."""
    for line in load_setup().EXTRAS_REQUIRE[extra]:
        req = Requirement(line)
        assert any(spec.operator in (">=", ">", "~=") for spec in req.specifier), f"{extra}: {line} has no lower bound"
        assert not any(spec.operator in ("==", "===") for spec in req.specifier), f"{extra}: {line} is a pin"


def test_the_adopters_extras_exist():
    assert set(NEW_EXTRAS) <= set(load_setup().EXTRAS_REQUIRE)
