"""Every optional extra has a working fallback: each probe runs in a fresh interpreter with the extra's packages hidden
(``sys.modules[name] = None`` makes ``import name`` fail as if it were not installed), whether or not they are
installed here, and checks what rlvrw does instead.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
NOT_RUNTIME = {"test", "bench"}  # what the tests and benchmarks compare against, not code paths of rlvrw

HIDE = """
import importlib, sys
HIDDEN = {hidden!r}
for name in HIDDEN:
    sys.modules[name] = None
for name in HIDDEN:
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    else:
        raise AssertionError(f"{{name}} is still importable")
"""

# extra -> (modules hidden, probe run with them hidden)
FALLBACKS = {
    "lang": (["transformers", "peft", "tokenizers"], f"""
from rlvrw.lang import tasks, text_game, web
records = text_game.load({str(DATA / 'text_game' / 'bytesized32_train_sample.jsonl')!r}).records
assert len(records) == 64
assert all(text_game.binary_reward(text_game.gold_response(r), r) == 1.0 for r in records[:8])
pages = web.load({str(DATA / 'web' / 'sample_tao_annotated.json')!r}).records
task = tasks.get_task("web")
assert task is not None and len(pages) == 10
from rlvrw.lang import tiny_model
try:
    tiny_model.train_tokenizer(["a b c"])
except ImportError as exc:
    print("needs:", exc)
else:
    raise AssertionError("the tiny model trained without transformers")
"""),
    "sim": (["gym_pusht", "metaworld", "mujoco"], f"""
from rlvrw.data import rt1, sim
for cls, package in ((sim.PushTEpisodes, "gym-pusht"), (sim.MetaWorldEpisodes, "metaworld")):
    try:
        cls(sim.GenerationConfig("pusht", 1, 4, (32, 32), 0, (), 1, ""))
    except ImportError as exc:
        assert package in str(exc), exc
    else:
        raise AssertionError(f"{{cls.__name__}} ran without {{package}}")
clips = rt1.EpisodeClips({str(DATA / 'video')!r}, split="all", actions=False)
assert clips[0]["frames"].shape[0] == rt1.SINGLE_STEP_FRAMES  # episodes from files need no simulator
"""),
    "plot": (["matplotlib"], """
from rlvrw.train import experiment
try:
    experiment.plot("best_of_n", {}, None)
except ImportError as exc:
    assert "rlvrw[plot]" in str(exc), exc
else:
    raise AssertionError("plotted without matplotlib")
"""),
    "train": (["tensorboard"], """
import json, tempfile
from pathlib import Path
from rlvrw.train.logging import RunLogger
with tempfile.TemporaryDirectory() as d:
    run = RunLogger(d, total_steps=2, progress=False)
    run.log(1, {"loss": 0.5})
    run.close()
    lines = (Path(d) / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["loss"] == 0.5
    assert not (Path(d) / "tensorboard").exists() or not any((Path(d) / "tensorboard").iterdir())
    try:
        RunLogger(d, total_steps=1, tensorboard="on", progress=False)
    except ValueError as exc:
        assert "pip install tensorboard" in str(exc)
    else:
        raise AssertionError("tensorboard='on' worked without tensorboard")
"""),
    "vllm": (["vllm"], """
from rlvrw.lang import rollout
assert rollout.vllm_available() is False  # GRPO's backend "auto" then samples with Hugging Face generate
try:
    rollout.VLLMRollout("model", [0], max_new_tokens=4)
except ImportError:
    pass
else:
    raise AssertionError("VLLMRollout started without vllm")
"""),
    "flash-attn": (["flash_attn"], """
import torch
from rlvrw.models import WorldModelConfig, WorldModelTransformer
from rlvrw.models import attention as A
A._device_capability = lambda device: (9, 0)  # decide as on an H100, with no GPU here
cuda = torch.device("cuda")
assert "flash_attn is not installed" in A._flash_attn().unavailable
assert A.resolve_attention_backend("auto", cuda, torch.bfloat16, 64) in ("xformers", "sdpa")
try:
    A.resolve_attention_backend("flash", cuda, torch.bfloat16, 64)
except ValueError as exc:
    assert "flash_attn" in str(exc)
else:
    raise AssertionError("flash attention resolved without flash-attn")
model = WorldModelTransformer(WorldModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=64))
out = model(torch.randint(0, 40, (2, 8)))
assert torch.isfinite(out if torch.is_tensor(out) else out[0]).all()
"""),
    "xformers": (["xformers"], """
import types
import torch
from rlvrw.models import attention as A
A._device_capability = lambda device: (9, 0)  # decide as on an H100, with no GPU here
A._flash_attn = lambda: types.SimpleNamespace(unavailable="hidden too")  # neither accelerator: PyTorch's SDPA
cuda = torch.device("cuda")
assert "xformers is not installed" in A._xformers_ops().unavailable
assert A.resolve_attention_backend("auto", cuda, torch.float32, 64) == "sdpa"
assert A.resolve_attention_backend("auto", cuda, torch.bfloat16, 64) == "sdpa"
try:
    A.resolve_attention_backend("xformers", cuda, torch.float32, 64)
except ValueError as exc:
    assert "xformers" in str(exc)
else:
    raise AssertionError("xformers resolved without xformers")
"""),
    "dali": (["nvidia.dali"], f"""
import torch
from rlvrw.data import rt1
clips = rt1.EpisodeClips({str(DATA / 'video')!r}, split="all", actions=False, size=(32, 40))
try:
    rt1.DaliClipLoader(clips, batch_size=2)
except ImportError as exc:
    assert "nvidia-dali" in str(exc)
else:
    raise AssertionError("DaliClipLoader ran without DALI")
batch = next(iter(torch.utils.data.DataLoader(clips, batch_size=2)))  # the CPU resize instead
assert batch["frames"].shape[-2:] == (32, 40)
"""),
    "cupy": (["cupy"], """
import torch
from rlvrw import _C_cupy, _C_loader
from rlvrw.ops import _backend
sys.modules["rlvrw._C"] = None  # as where the extension was not built
_C_cupy._why_not = lambda: None  # as on a CUDA machine
assert _C_loader.load() is False and "cupy" in _C_loader.LOAD_ERROR.split("fallback")[1]
assert _backend.resolve("token_logprobs", torch.device("cuda")) == "triton"  # the Triton kernels serve CUDA
try:
    _backend.resolve("token_logprobs", torch.device("cuda"), "cuda")
except ValueError as exc:
    assert "cupy" in str(exc)
else:
    raise AssertionError("backend='cuda' resolved without rlvrw._C or cupy")
"""),
    "verl": (["verl"], """
import importlib.util
import torch
import rlvrw.ops as ops
logp = torch.randn(4, 6)
loss, _ = ops.grpo_loss(logp, logp.detach(), torch.randn(4), torch.ones(4, 6))
assert torch.isfinite(loss)
if importlib.util.find_spec("rlvrw.integrations") is not None and \\
        importlib.util.find_spec("rlvrw.integrations.verl") is not None:
    try:
        importlib.import_module("rlvrw.integrations.verl")
    except ImportError as exc:
        assert "verl" in str(exc).lower(), exc
"""),
    "trl": (["trl"], """
import importlib.util
import torch
import rlvrw.ops as ops
hidden, weight = torch.randn(2, 3, 8), torch.randn(11, 8)
logp = ops.linear_token_logprobs(hidden, weight, torch.randint(0, 11, (2, 3)))
assert logp.shape == (2, 3) and torch.isfinite(logp).all()
if importlib.util.find_spec("rlvrw.integrations") is not None and \\
        importlib.util.find_spec("rlvrw.integrations.trl") is not None:
    try:
        importlib.import_module("rlvrw.integrations.trl")
    except ImportError as exc:
        assert "trl" in str(exc).lower(), exc
"""),
}


def load_extras() -> dict:
    spec = importlib.util.spec_from_file_location("rlvrw_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    return setup.EXTRAS_REQUIRE


def test_every_runtime_extra_has_a_fallback_probe():
    assert set(load_extras()) - NOT_RUNTIME == set(FALLBACKS)


@pytest.mark.parametrize("extra", sorted(FALLBACKS))
def test_fallback_without_the_extra(extra):
    hidden, probe = FALLBACKS[extra]
    code = HIDE.format(hidden=hidden) + probe + "\nprint('fallback ok')\n"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "fallback ok" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
