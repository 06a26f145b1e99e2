"""rlvrw.integrations.trl.GRPOTrainer against TRL 1.16's own GRPOTrainer, in float64: a real trainer on a tiny Llama
built here (no hub), one batch, the loss computed by TRL's ``compute_loss`` and by ours on the same trainer: equal
loss, equal gradient of every parameter, equal logged metrics. The batch has left-padded prompts, completions of
different lengths and a fully masked one.

TRL's fused LM head accumulates in float32 whatever the model's dtype, so the comparison is made twice: with TRL's
head as it is (float32 agreement: our head, slicing and loss against TRL's whole path), and with TRL's head replaced
by the float64 logits path (agreement to 1e-9: the loss, its per-process normalizers, the gradients and the metrics).
"""

import collections
import math

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")
rlvrw_trl = pytest.importorskip("rlvrw.integrations.trl")
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from rlvrw.lang import tiny_model  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-12)
# TRL's head: float32 accumulation, whose error scales with the largest entries of a gradient, not with each one
# (a near-zero entry of the embedding gradient differed by 1.2e-7 on one CPU and not on another)
TRL_HEAD_TOL = dict(rtol=2e-5, atol=1e-7, atol_of_largest=2e-5)
B, P, C = 5, 4, 7  # completions, prompt length, completion length


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer, saved as a Hugging Face model directory."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = tiny_model.train_tokenizer(["the cat sat on the mat", "a dog ran in the park"] * 4, vocab_size=300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_trainer(model_dir, tmp_path, cls=rlvrw_trl.GRPOTrainer, **config):
    args = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                          per_device_train_batch_size=4, num_generations=4, max_completion_length=10,
                          model_init_kwargs={"dtype": torch.float64}, **config)
    return cls(model=model_dir, reward_funcs=lambda completions, **kwargs: [0.0] * len(completions), args=args,
               train_dataset=Dataset.from_dict({"prompt": ["the cat", "a dog"] * 4}))


def make_inputs(trainer, is_ratio=None, seed=0):
    """One micro-batch as ``_generate_and_score_completions`` hands it to ``compute_loss``."""
    g = torch.Generator().manual_seed(seed)
    vocab = trainer.model.config.vocab_size
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = prompt_mask[3, :1] = 0  # left padding
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_mask[0, 5:] = completion_mask[2, 3:] = 0
    completion_mask[4] = 0  # a fully masked completion
    inputs = {
        "prompt_ids": torch.randint(0, vocab, (B, P), generator=g) * prompt_mask,
        "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(0, vocab, (B, C), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.randn(B, dtype=torch.float64, generator=g),
        "num_items_in_batch": torch.tensor(float(3 * completion_mask.sum())),
    }
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([prompt_mask, completion_mask], 1), C)
    inputs["old_per_token_logps"] = logp + 0.3 * torch.randn(B, C, dtype=torch.float64, generator=g)
    inputs["ref_per_token_logps"] = logp + 0.3 * torch.randn(B, C, dtype=torch.float64, generator=g)
    if is_ratio is not None:
        shape = (B, C) if is_ratio == "token" else (B, 1)
        inputs["importance_sampling_ratio"] = torch.exp(0.3 * torch.randn(shape, dtype=torch.float64, generator=g))
    return inputs


def float64_head(trainer, model, input_ids, attention_mask, logits_to_keep, **unused):
    """TRL's ``_get_per_token_logps_and_entropies`` through the model's own logits, in float64."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -logits_to_keep - 1:-1]
    log_softmax = torch.log_softmax(logits / trainer.temperature, dim=-1)
    logp = log_softmax.gather(-1, input_ids[:, -logits_to_keep:, None])[..., 0]
    return logp, -(log_softmax.exp() * log_softmax).sum(-1), None


def loss_and_grads(trainer, compute_loss, inputs):
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    loss = compute_loss(trainer, trainer.model, inputs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {mode: dict(m) for mode, m in trainer._metrics.items()}


CASES = {  # GRPOConfig settings (use_bias_correction_kl is on by default), and: vLLM importance-sampling ratio,
    # processes, accumulation steps, train/eval
    "grpo": (dict(loss_type="grpo", beta=0.04), None, 1, 4, "train"),
    "bnpo-plain-kl": (dict(loss_type="bnpo", epsilon_high=0.28, beta=0.04, use_bias_correction_kl=False), None, 1, 2,
                      "train"),
    "dr_grpo": (dict(loss_type="dr_grpo", beta=0.04, delta=2.0), None, 1, 3, "train"),
    "dapo-3-processes": (dict(loss_type="dapo", beta=0.04, epsilon_high=0.28, delta=3.0, steps_per_generation=2),
                         "token", 3, 4, "train"),
    "luspo-sequence": (dict(loss_type="luspo", importance_sampling_level="sequence"), "sequence", 2, 2, "train"),
    "grpo-sequence-entropy": (dict(loss_type="grpo", beta=0.04, importance_sampling_level="sequence",
                                   entropy_coef=0.01), "sequence", 1, 2, "train"),
    "dapo-eval": (dict(loss_type="dapo", beta=0.04, steps_per_generation=2), None, 2, 4, "eval"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_gradients_and_metrics_equal_trl(case, model_dir, tmp_path, monkeypatch):
    config, is_ratio, processes, accumulation, mode = CASES[case]
    trainer = make_trainer(model_dir, tmp_path, **config)
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: processes))
    trainer.current_gradient_accumulation_steps = accumulation
    if is_ratio is not None:  # as with use_vllm=True (which would start vLLM here)
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    trainer.model.train(mode == "train")
    inputs = make_inputs(trainer, is_ratio)
    got = loss_and_grads(trainer, rlvrw_trl.GRPOTrainer.compute_loss, inputs)
    assert_equal(got, loss_and_grads(trainer, trl.GRPOTrainer.compute_loss, inputs), mode, TRL_HEAD_TOL)
    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies",
                        lambda *args, **kwargs: float64_head(trainer, *args, **kwargs))
    assert_equal(got, loss_and_grads(trainer, trl.GRPOTrainer.compute_loss, inputs), mode, TOL)


def assert_equal(got, expected, mode, tol):
    tol = dict(tol)
    of_largest = tol.pop("atol_of_largest", 0.0)
    torch.testing.assert_close(got[0], expected[0], **tol)
    assert got[1].keys() == expected[1].keys() and len(got[1]) > 5
    for name, want in expected[1].items():
        atol = max(tol["atol"], of_largest * want.abs().max().item())
        torch.testing.assert_close(got[1][name], want, rtol=tol["rtol"], atol=atol,
                                   msg=lambda message, name=name: f"{name}: {message}")
    metrics, expected_metrics = got[2][mode], expected[2][mode]
    assert metrics.keys() == expected_metrics.keys(), (sorted(metrics), sorted(expected_metrics))
    for name, values in expected_metrics.items():
        assert len(metrics[name]) == len(values) == 1, name
        assert math.isclose(metrics[name][0], values[0], rel_tol=tol["rtol"], abs_tol=tol["atol"]), \
            (name, metrics[name], values)


def test_unsupported_settings_are_refused_before_loading(tmp_path):
    for setting, word in ((dict(loss_type="cispo"), "loss_type"), (dict(loss_type="sapo"), "loss_type"),
                          (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
                          (dict(use_adaptive_entropy=True), "use_adaptive_entropy"),
                          (dict(delta=1.1), "delta")):
        with pytest.raises(ValueError, match=word):  # a model path that does not exist: nothing was loaded
            make_trainer(str(tmp_path / "no-such-model"), tmp_path, **setting)


def test_models_it_cannot_serve_are_refused(model_dir, tmp_path):
    config = LlamaConfig.from_pretrained(model_dir)
    config.logits_scaling = 2.0
    model = LlamaForCausalLM(config)
    args = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                          num_generations=4, beta=0.0)
    with pytest.raises(ValueError, match="logits_scaling"):
        rlvrw_trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                              args=args, train_dataset=Dataset.from_dict({"prompt": ["a"] * 4}),
                              processing_class=tiny_model.train_tokenizer(["a b"], vocab_size=300))


def test_the_loss_runs_inside_the_ddp_wrapper(model_dir, tmp_path):
    """Under DistributedDataParallel (one CPU process, gloo) the loss runs as the wrapper's forward, so DDP reduces
    the gradients; they equal those without the wrapper, and the model's forward is restored afterwards."""
    dist = torch.distributed
    trainer = make_trainer(model_dir, tmp_path, loss_type="dapo", beta=0.04)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    inputs = make_inputs(trainer)
    expected = loss_and_grads(trainer, rlvrw_trl.GRPOTrainer.compute_loss, inputs)
    model = trainer.model
    forward = model.__dict__.get("forward")  # TRL's fused-head forward, an attribute of the instance
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapper = torch.nn.parallel.DistributedDataParallel(model)
        calls = []
        wrapper.register_forward_pre_hook(lambda module, args: calls.append(len(args)))
        model.zero_grad(set_to_none=True)
        loss = rlvrw_trl.GRPOTrainer.compute_loss(trainer, wrapper, inputs)
        loss.backward()
    finally:
        dist.destroy_process_group()
    assert calls == [2]  # (the unwrapped model, the inputs) went through DDP's forward
    assert model.__dict__.get("forward") is forward
    torch.testing.assert_close(loss.detach(), expected[0], **TOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[1][name], **TOL, msg=name)
