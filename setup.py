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
# The RL frameworks whose GRPO losses rlvrw.ops.grpo_loss reproduces; the tests compare against their own functions.
VERL_REQUIRES = ["verl>=0.9.1,<0.10"]
TRL_REQUIRES = ["trl>=1.16,<2", "liger-kernel>=0.8.5,<0.9"]
INSTALL_REQUIRES = ["torch>=2.5", "triton", "numpy", "safetensors", "tqdm", "json-repair>=0.30"]
# Ranges, as every library's requirements are. The test environment is pinned on top of these by
# .ci/test-constraints.txt, which install.sh applies (re-resolve it with .ci/lock).
EXTRAS_REQUIRE = {
    "lang": LANG_REQUIRES,
    "sim": SIM_REQUIRES,
    "train": ["tensorboard>=2.14,<3"],
    "plot": ["matplotlib>=3.7,<4"],  # rlvrw experiment's figures
    "vllm": ["vllm>=0.10,<1"],
    "test": [
        "pytest", "pytest-benchmark", "hypothesis", "scipy", "scikit-image", "pillow", "vector-quantize-pytorch",
        "tensorboard", "matplotlib",
    ] + LANG_REQUIRES + SIM_REQUIRES + VERL_REQUIRES + TRL_REQUIRES,
    "bench": ["pytest-benchmark>=4,<6", "liger-kernel>=0.8.5,<0.9", "vector-quantize-pytorch>=1.30,<2"],
    # Integrations and accelerators, each optional with a tested fallback (tests/test_packaging_extras.py).
    # rlvrw.integrations.verl / .trl plug the ops into these frameworks; rlvrw itself never imports them.
    "verl": VERL_REQUIRES,
    "trl": TRL_REQUIRES,
    # The world model's attention: flash-attn, else xformers, else PyTorch's SDPA (rlvrw.models.transformer).
    "flash-attn": ["flash-attn>=2.6,<3"],
    "xformers": ["xformers>=0.0.28,<0.1"],
    # GPU frame resizing in rlvrw.data.rt1.DaliClipLoader (else the DataLoader resizes on the CPU), and the CUDA
    # kernels compiled at first use with NVRTC when rlvrw._C was not built (rlvrw._C_cupy). Both ship one wheel per
    # CUDA major version: these are the CUDA 12 builds, which a CUDA 13 driver runs too (nvidia-dali-cuda130 and
    # cupy-cuda13x are their CUDA 13 twins). cupy's [ctk] brings NVRTC as wheels: no CUDA toolkit needed.
    "dali": ["nvidia-dali-cuda120>=1.40,<3"],
    "cupy": ["cupy-cuda12x[ctk]>=14,<15"],
}


CLASSIFIERS = [
    "Development Status :: 3 - Alpha",
    "Intended Audience :: Science/Research",
    "Intended Audience :: Developers",
    "Operating System :: POSIX :: Linux",
    "Programming Language :: Python :: 3",
    "Programming Language :: Python :: 3 :: Only",
    "Programming Language :: C++",
    "Environment :: GPU :: NVIDIA CUDA",
    "Topic :: Scientific/Engineering :: Artificial Intelligence",
    "Typing :: Typed",
]


def read_version() -> str:
    with open(os.path.join(HERE, "rlvrw", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read(), re.M)
    return match.group(1) if match else "0.0.0"


def read_readme() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


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
    # rlvrw.kernels comes from the top-level kernels/ folder (see rlvrw/kernels/__init__.py for why it is not there).
    # Named here, not found: an sdist has no rlvrw/kernels/__init__.py, so find_packages would drop the kernels.
    # rlvrw._csrc carries the CUDA sources into the wheel: rlvrw._C_cupy compiles them with NVRTC where _C is not built.
    packages = sorted(set(find_packages(where=HERE, include=["rlvrw", "rlvrw.*"])) | {"rlvrw.kernels", "rlvrw._csrc"})
    setup(
        name="rlvrw",
        version=read_version(),
        description="Kernels and a thin trainer for world models trained with RL from verifiable rewards (RLVR-World)",
        long_description=read_readme(),
        long_description_content_type="text/markdown",
        author="the rlvrw authors",
        license_expression="Apache-2.0",
        license_files=["LICENSE"],
        project_urls={"Paper": "https://arxiv.org/abs/2505.13934"},
        keywords=["reinforcement learning", "RLVR", "GRPO", "world models", "triton", "cuda", "kernels"],
        classifiers=CLASSIFIERS,
        python_requires=">=3.10",
        packages=packages,
        package_dir={"rlvrw": "rlvrw", "rlvrw.kernels": "kernels", "rlvrw._csrc": "csrc"},
        package_data={"rlvrw": ["py.typed"], "rlvrw._csrc": ["*.cu", "*.cuh", "*.h", "ops.cpp"]},
        install_requires=INSTALL_REQUIRES,
        extras_require=EXTRAS_REQUIRE,
        entry_points={"console_scripts": ["rlvrw = rlvrw.cli:main"]},
        zip_safe=False,
        **cuda_extension_kwargs(build, reason),
    )


if __name__ == "__main__":
    main()
