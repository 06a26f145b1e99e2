"""Build script for rlvrw.

Installs the pure-Python package (``rlvrw`` and its subpackages, plus ``kernels/`` as ``rlvrw.kernels``) and, when
the installed torch is a CUDA build and nvcc is available, the CUDA extension ``rlvrw._C`` built from ``csrc/``.
Otherwise it prints one line saying why the extension was skipped and installs the Python package alone (the
Triton and reference backends then serve every op).

    pip install --no-build-isolation -e .      # build against the torch already installed (keeps a CUDA torch)
    RLVRW_NO_CUDA_EXT=1 pip install ...         # never build the extension
    pip install -v ...                           # pip only shows this script's output with -v
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "rlvrw._C"
SKIP_PREFIX = f"rlvrw: skipping CUDA extension {EXT_NAME}: "

# Kernel flags. No --use_fast_math: the log-sum-exp and entropy must keep full fp32 accuracy.
NVCC_FLAGS = ["-O3", "-lineinfo"]  # torch adds --expt-relaxed-constexpr and the __CUDA_NO_HALF_* defines
GENCODE_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",  # PTX so that newer GPUs can JIT the kernels
]
CXX_FLAGS = ["-O3"]

# Language world models train Hugging Face causal LMs with LoRA (rlvrw.lang.train); the rewards need none of this.
LANG_REQUIRES = ["transformers>=4.56", "peft>=0.13", "tokenizers>=0.20"]
# Simulators that render robot manipulation on CPU: the embedded default dataset (rlvrw.data.sim).
SIM_REQUIRES = ["gym-pusht>=0.1.8,<0.2", "metaworld>=3.1,<4"]
INSTALL_REQUIRES = ["torch>=2.5", "triton", "numpy", "safetensors", "tqdm", "json-repair>=0.30"]
# Ranges, as every library's requirements are. The test environment is pinned on top of these by
# .ci/test-constraints.txt, which install.sh applies (re-resolve it with .ci/lock).
EXTRAS_REQUIRE = {
    "lang": LANG_REQUIRES,
    "sim": SIM_REQUIRES,
    "train": ["tensorboard"],
    "plot": ["matplotlib"],  # rlvrw experiment's figures
    "vllm": ["vllm"],
    "test": [
        "pytest", "pytest-benchmark", "scipy", "scikit-image", "pillow", "vector-quantize-pytorch", "tensorboard",
        "matplotlib",
    ] + LANG_REQUIRES + SIM_REQUIRES,
    "bench": ["pytest-benchmark", "liger-kernel", "vector-quantize-pytorch"],
}


def read_version() -> str:
    with open(os.path.join(HERE, "rlvrw", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read(), re.M)
    return match.group(1) if match else "0.0.0"


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME (as torch sees it) or PATH, or None."""
    homes = []
    try:
        from torch.utils.cpp_extension import CUDA_HOME

        homes.append(CUDA_HOME)
    except Exception:  # torch missing or broken: the caller reports that
        pass
    homes += [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    for home in homes:
        if home:
            candidate = os.path.join(home, "bin", "nvcc")
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
    return shutil.which("nvcc")


def nvcc_release(nvcc: str) -> str | None:
    """'13.0' from `nvcc --version`, or None when it cannot be read."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except Exception:
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def cuda_extension_decision(environ=None) -> tuple[bool, str]:
    """Whether to build rlvrw._C, and why (or why not). Never raises."""
    environ = os.environ if environ is None else environ
    if environ.get("RLVRW_NO_CUDA_EXT", "").strip() not in ("", "0"):
        return False, "RLVRW_NO_CUDA_EXT is set"
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any import failure means: no extension
        return False, (
            f"torch is not importable in the build environment ({type(exc).__name__}: {exc}); "
            "install torch first and use pip install --no-build-isolation"
        )
    if not getattr(torch.version, "cuda", None):
        return False, f"torch {torch.__version__} has no CUDA"
    nvcc = find_nvcc()
    if nvcc is None:
        return False, f"nvcc not found (torch {torch.__version__} has CUDA {torch.version.cuda}; set CUDA_HOME)"
    nvcc_version = nvcc_release(nvcc)
    if nvcc_version and nvcc_version.split(".")[0] != str(torch.version.cuda).split(".")[0]:
        # torch's BuildExtension refuses a CUDA major version different from torch's own: say so instead of failing.
        return False, (
            f"nvcc {nvcc_version} at {nvcc} does not match the CUDA {torch.version.cuda} of torch {torch.__version__} "
            "(set CUDA_HOME to a matching toolkit)"
        )
    if not glob.glob(os.path.join(HERE, "csrc", "*.cu")):
        return False, "no csrc/*.cu sources in this source tree"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), nvcc at {nvcc}"


def cuda_extension_kwargs(build: bool, reason: str) -> dict:
    """setup() keyword arguments for the extension, or {} (after printing the skip line)."""
    if not build:
        print(SKIP_PREFIX + reason, file=sys.stderr, flush=True)
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    nvcc_flags = list(NVCC_FLAGS)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # an explicit arch list wins (torch turns it into -gencode)
        nvcc_flags += GENCODE_FLAGS
    ext = CUDAExtension(
        name=EXT_NAME,
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": list(CXX_FLAGS), "nvcc": nvcc_flags},
    )
    print(f"rlvrw: building CUDA extension {EXT_NAME} with {reason}", file=sys.stderr, flush=True)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


def main() -> None:
    build, reason = cuda_extension_decision()
    # rlvrw.kernels comes from the top-level kernels/ folder (see rlvrw/kernels/__init__.py for why it is not there)
    packages = find_packages(where=HERE, include=["rlvrw", "rlvrw.*"])
    setup(
        name="rlvrw",
        version=read_version(),
        description="Kernels and a thin trainer for world models trained with RL from verifiable rewards (RLVR-World)",
        python_requires=">=3.10",
        packages=packages,
        package_dir={"rlvrw": "rlvrw", "rlvrw.kernels": "kernels"},
        install_requires=INSTALL_REQUIRES,
        extras_require=EXTRAS_REQUIRE,
        entry_points={"console_scripts": ["rlvrw = rlvrw.cli:main"]},
        zip_safe=False,
        **cuda_extension_kwargs(build, reason),
    )


if __name__ == "__main__":
    main()
