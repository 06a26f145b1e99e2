"""The vLLM rollout's settings, checked against a fake ``vllm`` module (no vLLM or GPU needed): the engine runs in
this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, forced over a user's 1, and a clear error when vLLM still starts
it elsewhere), log-probs are ``processed_logprobs`` (after temperature), the weight sync loads the trainer's weights
into the engine's model and drops its prefix cache. On a GPU with vLLM installed (marked ``gpu``): the sampler's
log-probs at temperature 0.7 are the trainer's at 0.7.
"""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from rlvrw.lang import rollout

ENV = rollout.IN_PROCESS_ENV


class FakeEngineModel:
    def __init__(self):
        self.loaded: dict[str, torch.Tensor] = {}

    def load_weights(self, weights):
        self.loaded.update((name, tensor.clone()) for name, tensor in weights)
        return set(self.loaded)


class FakeLLM:
    """vllm.LLM as the rollout uses it. The engine runs in this process when the environment says 0 at construction,
    unless ``cached_env`` holds what vLLM read before (it caches its environment once an engine has started)."""

    cached_env: str | None = None
    refuse_logprobs_mode = False
    last: FakeLLM | None = None

    def __init__(self, **kwargs):
        if self.refuse_logprobs_mode and "logprobs_mode" in kwargs:
            raise TypeError("EngineArgs.__init__() got an unexpected keyword argument 'logprobs_mode'")
        self.kwargs = kwargs
        self.env_at_start = os.environ.get(ENV)
        seen = self.cached_env if self.cached_env is not None else self.env_at_start
        self.in_process = seen == "0"
        self.model = FakeEngineModel()
        self.prefix_resets = 0
        self.generate_calls = []
        FakeLLM.last = self

    def apply_model(self, func):
        if not self.in_process:  # what vLLM's encoder does with a function for a child process
            raise TypeError("Object of type <class 'function'> is not serializable")
        return [func(self.model)]

    def reset_prefix_cache(self):
        self.prefix_resets += 1

    def generate(self, prompts, params, use_tqdm=True):
        self.generate_calls.append((prompts, params))
        outputs = []
        for p, prompt in enumerate(prompts):
            samples = []
            for i in range(params.n):
                ids = [10 + i, 11, 2] if i % 2 == 0 else [12, 13, 14]  # odd samples hit the length limit
                logprobs = [{t: types.SimpleNamespace(logprob=-0.1 * (t + p))} for t in ids]
                samples.append(types.SimpleNamespace(token_ids=ids, logprobs=logprobs, text=f"s{p}{i}",
                                                     finish_reason="stop" if i % 2 == 0 else "length"))
            outputs.append(types.SimpleNamespace(outputs=samples))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    monkeypatch.setattr(FakeLLM, "cached_env", None)
    monkeypatch.setattr(FakeLLM, "refuse_logprobs_mode", False)
    FakeLLM.last = None
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(
        LLM=FakeLLM, SamplingParams=lambda **kwargs: types.SimpleNamespace(**kwargs)))
    monkeypatch.delenv(ENV, raising=False)
    return FakeLLM


def make_rollout(**overrides) -> rollout.VLLMRollout:
    kwargs = dict(max_new_tokens=3, temperature=0.7, gpu_memory_utilization=0.3, max_model_len=64, seed=5)
    return rollout.VLLMRollout("/models/tiny", [2], **{**kwargs, **overrides})


def test_engine_settings(fake_vllm):
    make_rollout(dtype="float16")
    llm = fake_vllm.last
    assert llm.env_at_start == "0" and llm.in_process
    assert llm.kwargs == dict(model="/models/tiny", dtype="float16", gpu_memory_utilization=0.3, max_model_len=64,
                              enable_prefix_caching=True, seed=5, logprobs_mode="processed_logprobs")


def test_a_users_multiprocessing_setting_is_overridden(fake_vllm, monkeypatch):
    monkeypatch.setenv(ENV, "1")
    with pytest.warns(RuntimeWarning, match=f"{ENV}='1' overridden with 0"):
        make_rollout()
    assert fake_vllm.last.env_at_start == "0" and fake_vllm.last.in_process


def test_an_engine_in_another_process_is_refused_by_name(fake_vllm, monkeypatch):
    """vLLM already read 1 in this process (its environment cache): setting 0 now cannot help, and the error says
    which variable to set and when."""
    monkeypatch.setattr(FakeLLM, "cached_env", "1")
    with pytest.raises(RuntimeError, match=f"another process.*not serializable.*{ENV}=0 in the environment"):
        make_rollout()


def test_an_old_vllm_without_logprobs_mode_is_named(fake_vllm, monkeypatch):
    monkeypatch.setattr(FakeLLM, "refuse_logprobs_mode", True)
    with pytest.raises(RuntimeError, match="vLLM 0.10 or newer.*logprobs_mode"):
        make_rollout()


def test_sync_weights_loads_the_trainers_weights_and_drops_the_prefix_cache(fake_vllm):
    sampler = make_rollout()
    trainer = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    sampler.sync_weights(trainer)
    engine = fake_vllm.last
    assert engine.model.loaded.keys() == trainer.state_dict().keys()
    for name, tensor in trainer.state_dict().items():
        assert torch.equal(engine.model.loaded[name], tensor)
    assert engine.prefix_resets == 1


def test_generate_asks_for_the_sampled_tokens_logprobs(fake_vllm):
    sampler = make_rollout()
    out = sampler.generate([[1, 5], [1, 6, 7]], n=2)
    (prompts, params), = fake_vllm.last.generate_calls
    assert prompts == [{"prompt_token_ids": [1, 5]}, {"prompt_token_ids": [1, 6, 7]}]
    assert (params.n, params.temperature, params.top_p, params.max_tokens, params.logprobs) == (2, 0.7, 1.0, 3, 0)
    assert params.stop_token_ids == [2]
    assert out.prompt_ids == [[1, 5], [1, 5], [1, 6, 7], [1, 6, 7]]
    assert out.response_ids == [[10, 11, 2], [12, 13, 14], [10, 11, 2], [12, 13, 14]]
    assert out.truncated == [False, True, False, True]
    assert out.sample_logprobs[2] == pytest.approx([-1.1, -1.2, -0.3])


# ---- GPU -------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_vllm_logprobs_are_after_temperature(tmp_path):
    """After a weight sync that sharpens the output layer, the sampler's log-probs at temperature 0.7 are the
    trainer's at 0.7 (bf16 noise aside), and far from the trainer's at 1."""
    pytest.importorskip("vllm", reason="vllm is not installed")
    from rlvrw.lang import hf_model, tiny_model, train

    texts = [f"the box {i} moves {'left' if i % 2 else 'right'} by {i % 7} steps" for i in range(200)]
    path = tiny_model.build_tiny_model(str(tmp_path / "tiny"), texts, hidden_size=256, heads=4)  # head size 64
    tokenizer = hf_model.load_text_tokenizer(path)
    policy = hf_model.load_model(path, torch.device("cuda"), torch.bfloat16)
    engine = rollout.VLLMRollout(path, rollout.stop_token_ids(policy, tokenizer), max_new_tokens=16,
                                 temperature=0.7, gpu_memory_utilization=0.2, max_model_len=512)
    with torch.no_grad():  # logits of std ~1.5 rather than the init's ~0.3: temperature then matters
        policy.get_output_embeddings().weight.mul_(5.0)
    engine.sync_weights(policy)
    prompts = [tokenizer(t).input_ids for t in texts[:2]]
    out = engine.generate(prompts, n=3)
    batch = train.pack(out.prompt_ids, out.response_ids, tokenizer.pad_token_id).to("cuda")
    with torch.no_grad():
        at_temperature = train.response_logprobs(policy, batch, temperature=0.7)
        at_one = train.response_logprobs(policy, batch, temperature=1.0)
    gap = train.sampler_logprob_gap(out.sample_logprobs, at_temperature, batch)
    assert gap < 0.05
    assert gap < train.sampler_logprob_gap(out.sample_logprobs, at_one, batch) / 2
