"""SFT and GRPO on a tiny Qwen2 whose tokenizer is trained on the ByteSized32 sample, saved and loaded like any model.

CPU only and small: a few steps on the shortest transitions. The vLLM backend needs a GPU and vllm; its weight
sync is checked here through ``merged_weights``, the tensors it loads.
"""

import json

import numpy as np
import pytest
import torch

from conftest import EXAMPLE_DATA
from rlvrw import ops
from rlvrw.cli import main as rlvrw_main
from rlvrw.lang import reward_pool, rollout, tasks, text_game, tiny_model, web

pytest.importorskip("transformers")
pytest.importorskip("peft")
train = pytest.importorskip("rlvrw.lang.train")
hf_model = pytest.importorskip("rlvrw.lang.hf_model")

SAMPLE = EXAMPLE_DATA / "text_game" / "bytesized32_train_sample.jsonl"
WEB_SAMPLE = EXAMPLE_DATA / "web" / "sample_tao_annotated.json"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def records():
    return text_game.load(str(SAMPLE)).records


@pytest.fixture(scope="module")
def short_records(records):
    """The four transitions with the shortest prompts, two of them with changes: quick to train on."""
    by_length = sorted(records, key=lambda r: len(text_game.build_prompt(r)))
    changed = [r for r in by_length if text_game.gold_answer(r)["modified"]][:2]
    unchanged = [r for r in by_length if not text_game.is_changed(r)][:2]
    return changed + unchanged


@pytest.fixture(scope="module")
def model_dir(records, tmp_path_factory):
    texts = [text_game.build_prompt(r) for r in records] + [text_game.gold_response(r) for r in records]
    return tiny_model.build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "qwen2"), texts, hidden_size=32)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return hf_model.load_text_tokenizer(model_dir)


@pytest.fixture
def batch(short_records, tokenizer):
    task = tasks.get_task("text_game")
    prompts = [tasks.encode_prompt(tokenizer, task.build_prompt(r)) for r in short_records]
    responses = [tasks.encode_response(tokenizer, task.gold_response(r)) for r in short_records]
    return train.pack(prompts, responses, tokenizer.pad_token_id)


def lora_policy(model_dir, rank=8):
    return hf_model.add_lora(hf_model.load_model(model_dir, CPU, torch.float32), hf_model.LoraSettings(rank=rank, alpha=16))


# -------------------------------------------------------------------------------------------------- tiny model
def test_tiny_model_loads_like_any_model(model_dir, tokenizer, records):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert model.config.model_type == "qwen2" and model.config.vocab_size == len(tokenizer)
    text = text_game.gold_response(records[5])
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    prompt = tasks.chat_prompt(tokenizer, "hello")
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = tasks.encode_prompt(tokenizer, "hello")
    assert tokenizer.convert_ids_to_tokens(ids[0]) == "<|im_start|>"
    assert tasks.encode_response(tokenizer, "x")[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(
        "<|im_end|>")


def test_prompt_without_a_chat_template(model_dir):
    tokenizer = hf_model.load_text_tokenizer(model_dir)
    tokenizer.chat_template = None
    assert tasks.chat_prompt(tokenizer, "hello") == "hello\n"
    assert tokenizer.decode(tasks.encode_prompt(tokenizer, "hello")) == "hello\n"


def test_llama_variant(tmp_path):
    path = tiny_model.build_tiny_model(str(tmp_path / "llama"), ["some text to learn from"] * 20, arch="llama",
                                       vocab_size=300, hidden_size=16, layers=1, heads=2)
    assert hf_model.load_model(path, CPU, torch.float32).config.model_type == "llama"
    with pytest.raises(ValueError, match="arch"):
        tiny_model.build_tiny_model(str(tmp_path / "x"), ["text"], arch="gpt2")


# ----------------------------------------------------------------------------------------------------- batches
def test_pack_aligns_responses_and_rows_trim_padding():
    batch = train.pack([[5, 6, 7], [8]], [[1, 2], [3, 4, 9, 9]], pad_id=0)
    assert batch.prompt_len == 3 and batch.input_ids.shape == (2, 7)
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 2, 0, 0], [0, 0, 8, 3, 4, 9, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]]
    assert batch.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    second = batch.rows(1, 2)
    assert second.input_ids.tolist() == [[8, 3, 4, 9, 9]] and second.prompt_len == 1
    first = batch.rows(0, 1)
    assert first.input_ids.tolist() == [[5, 6, 7, 1, 2]] and first.response_ids.tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="prompts"):
        train.pack([[1]], [], pad_id=0)


def test_logprobs_equal_the_models_own_logits(model_dir, batch):
    model = hf_model.load_model(model_dir, CPU, torch.float32, trainable=False)
    with torch.no_grad():
        logp = train.response_logprobs(model, batch, temperature=0.7)
        positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions).logits
    start = batch.prompt_len - 1
    expected = torch.log_softmax(logits[:, start:-1] / 0.7, -1).gather(-1, batch.response_ids[..., None])[..., 0]
    mask = batch.response_mask.bool()
    torch.testing.assert_close(logp[mask], expected[mask], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------- SFT
def test_sft_step_decreases_the_loss_and_lora_reference_is_the_base(model_dir, batch):
    policy = lora_policy(model_dir)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in policy.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    with torch.no_grad():
        before = train.sft_loss(policy, batch).item()
    stats = train.sft_update(policy, optimizer, batch, micro_batch_size=2, max_grad_norm=1.0)
    assert stats["loss"] == pytest.approx(before, rel=1e-5)  # micro-batches add up to the whole batch's mean
    with torch.no_grad():
        after = train.sft_loss(policy, batch).item()
    assert after < before

    base = hf_model.load_model(model_dir, CPU, torch.float32, trainable=False)
    with torch.no_grad():
        reference = train.reference_logprobs(policy, None, batch)
        torch.testing.assert_close(reference, train.response_logprobs(base, batch), rtol=0, atol=1e-6)
        assert (train.response_logprobs(policy, batch) - reference).abs().max() > 1e-3  # the adapters act


def test_gradient_checkpointing_gives_the_same_gradients(model_dir, batch):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same adapter initialization both times
        policy = lora_policy(model_dir)
        if checkpointing:
            hf_model.enable_gradient_checkpointing(policy)
        policy.train()
        train.sft_loss(policy, batch.rows(0, 2)).backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if p.requires_grad})
    assert any(g.abs().max() > 0 for g in grads[0].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)


def test_merged_weights_are_the_merged_model(model_dir, batch):
    """What a vLLM engine or a checkpoint receives: base weights plus LoRA deltas, under the base model's names."""
    policy = lora_policy(model_dir)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    merged = dict(hf_model.merged_weights(policy))
    expected = policy.merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor)


def test_lora_checkpoint_is_a_plain_model(model_dir, batch, tmp_path):
    policy = lora_policy(model_dir)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
        expected = train.response_logprobs(policy, batch)
    tokenizer = hf_model.load_text_tokenizer(model_dir)
    path = tmp_path / "saved"
    hf_model.save_model(policy, tokenizer, str(path), {"step": 3})
    hf_model.save_model(policy, tokenizer, str(path), {"step": 4})  # over an existing one
    assert json.loads((path / "trainer_state.json").read_text()) == {"step": 4}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    reloaded = hf_model.load_model(str(path), CPU, torch.float32, trainable=False)
    with torch.no_grad():
        torch.testing.assert_close(train.response_logprobs(reloaded, batch), expected, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------------------- GRPO
def test_rollouts_stop_at_the_end_token(model_dir, tokenizer, short_records):
    model = hf_model.load_model(model_dir, CPU, torch.float32, trainable=False)
    prompts = [tasks.encode_prompt(tokenizer, text_game.build_prompt(r)) for r in short_records[:2]]
    sampler = rollout.HFRollout(model, tokenizer, max_new_tokens=8, temperature=1.0, batch_size=4)
    out = sampler.generate(prompts, n=3)
    assert out.prompt_ids == [prompts[0]] * 3 + [prompts[1]] * 3
    assert len(out.texts) == 6 and out.sample_logprobs is None
    for ids, cut in zip(out.response_ids, out.truncated):
        assert (len(ids) == 8 and tokenizer.eos_token_id not in ids) if cut else ids[-1] == tokenizer.eos_token_id
    greedy = rollout.HFRollout(model, tokenizer, max_new_tokens=8, temperature=0.0)
    assert greedy.generate(prompts[:1]).response_ids == greedy.generate(prompts[:1]).response_ids
    assert rollout.cut_at_stop([4, 2, 7], [2]) == ([4, 2], False)
    assert rollout.cut_at_stop([4, 7], [2]) == ([4, 7], True)


def test_grpo_step_decreases_its_loss(model_dir, tokenizer, short_records):
    policy = lora_policy(model_dir)
    prompts = [tasks.encode_prompt(tokenizer, text_game.build_prompt(r)) for r in short_records[:2]]
    out = rollout.HFRollout(policy, tokenizer, max_new_tokens=12).generate(prompts, n=5)
    batch = train.pack(out.prompt_ids, out.response_ids, tokenizer.pad_token_id)
    # a stand-in verifiable reward that varies within each group: the share of '{' in the response
    rewards = torch.tensor([t.count("{") / max(len(t), 1) + i % 2 for i, t in enumerate(out.texts)])
    advantages = ops.group_advantages(rewards, 5)
    ref_logp = train.reference_logprobs(policy, None, batch)
    options = {"kl_coef": 1e-3, "kl_type": "k3", "dual_clip": 3.0}
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    stats = train.grpo_update(policy, optimizer, batch, advantages, ref_logp, micro_batch_size=4,
                              max_grad_norm=1.0, **options)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-9)  # the adapters start at zero: the policy is the reference
    with torch.no_grad():
        after, after_stats, _ = train.grpo_batch_loss(policy, batch, advantages, stats["old_logp"], ref_logp,
                                                      **options)
    assert after.item() < stats["loss"]
    assert after_stats["kl"].item() > 0


def test_reward_pool_in_processes_and_inline(short_records):
    texts = [text_game.gold_response(r) for r in short_records] + ["nonsense"]
    recs = list(short_records) + [short_records[0]]
    with reward_pool.RewardPool(tasks.text_game_task_score, workers=0) as inline:
        expected = inline.submit(texts, recs).result()
    with reward_pool.RewardPool(tasks.text_game_task_score, workers=2) as pool:
        got = pool.submit(texts, recs).result()
    assert got.rewards == expected.rewards and got.parsed == expected.parsed == [True] * 4 + [False]
    assert got.rewards[:2] == [pytest.approx(1.3)] * 2 and got.rewards[4] == 0.0


def test_a_record_that_breaks_the_scorer_costs_only_itself():
    broken = {"next_state_tao": "no sections"}
    with reward_pool.RewardPool(tasks.web_f1_score, workers=0) as pool:
        result = pool.submit(["New items:\nNone", "New items:\nNone"],
                             [{"next_state_tao": "New items:\nNone"}, broken]).result()
    assert result.rewards == [1.0, 0.0] and len(result.errors) == 1 and "gold_text" in result.errors[0]


def test_configs_name_bad_options(model_dir, tmp_path):
    with pytest.raises(ValueError, match="model"):
        train.SFTConfig(model=str(tmp_path / "none"), out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="group_size"):
        train.GRPOConfig(model=model_dir, out_dir=str(tmp_path), group_size=1)
    with pytest.raises(ValueError, match="kl_type"):
        train.GRPOConfig(model=model_dir, out_dir=str(tmp_path), kl_type="k9")
    with pytest.raises(ValueError, match="lora rank"):
        hf_model.LoraSettings(rank=0)
    with pytest.raises(ValueError, match="backend"):
        train.GRPOConfig(model=model_dir, out_dir=str(tmp_path), backend="tgi")


# ----------------------------------------------------------------------------------------------------- the CLI
def test_cli_sft_rl_eval_on_the_tiny_model(model_dir, short_records, tmp_path, capsys):
    data = tmp_path / "short.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in short_records))
    sft_dir, rl_dir = tmp_path / "sft", tmp_path / "rl"
    common = ["--task", "text_game", "--data", str(data)]
    assert rlvrw_main(["lang", "sft", *common, "--model", model_dir, "--out", str(sft_dir), "--max-steps", "2",
                       "--batch-size", "2", "--lr", "1e-2", "--lora-rank", "8"]) == 0
    losses = [json.loads(line)["loss"] for line in (sft_dir / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 2
    assert rlvrw_main(["lang", "rl", *common, "--model", str(sft_dir / "model"), "--out", str(rl_dir), "--steps", "1",
                       "--prompts-per-step", "1", "--group-size", "2", "--max-new-tokens", "6", "--reward", "task",
                       "--reward-workers", "0", "--lr", "1e-4"]) == 0
    step = json.loads((rl_dir / "log.jsonl").read_text())
    assert step["step"] == 1 and 0 <= step["unparseable"] <= 2
    results = tmp_path / "eval.json"
    assert rlvrw_main(["lang", "eval", *common, "--model", str(rl_dir / "model"), "--max-new-tokens", "6",
                       "--out", str(results)]) == 0
    saved = json.loads(results.read_text())
    assert saved["metrics"]["count"]["all"] == 4 and len(saved["responses"]) == 4
    out = capsys.readouterr().out
    assert "unchanged" in out and "unparseable" in out


def test_cli_eval_of_gold_and_saved_responses(short_records, tmp_path, capsys):
    data = tmp_path / "short.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in short_records))
    assert rlvrw_main(["lang", "eval", "--task", "text_game", "--data", str(data), "--gold"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if line}
    assert rows["all"] == ["1.0000", "4"] and rows["changed"] == ["1.0000", "2"]
    saved = tmp_path / "responses.jsonl"
    saved.write_text("\n".join(json.dumps({"response": "no idea"}) for _ in short_records))
    assert rlvrw_main(["lang", "eval", "--task", "text_game", "--data", str(data), "--responses", str(saved)]) == 0
    assert "unparseable: 4" in capsys.readouterr().out
    assert rlvrw_main(["lang", "eval", "--task", "web", "--data", str(tmp_path / "missing.json"), "--gold"]) == 2
    assert "error: --data: path must be an existing file" in capsys.readouterr().err


def test_web_task_trains_too(tmp_path):
    """One SFT step on web pages: long accessibility trees, so a tokenizer of their own and the shortest record."""
    records = sorted(web.load(str(WEB_SAMPLE)).records, key=lambda r: len(r["observation"]))[:1]
    task = tasks.get_task("web")
    texts = [task.build_prompt(r) for r in records] + [task.gold_response(r) for r in records]
    path = tiny_model.build_tiny_model(str(tmp_path / "web"), texts, vocab_size=1024, hidden_size=16, layers=1,
                                       heads=2)
    summary = train.run_sft(task, records, train.SFTConfig(model=path, out_dir=str(tmp_path / "run"), max_steps=1,
                                                           lora=hf_model.LoraSettings(rank=4, alpha=8)))
    assert summary["steps"] == 1 and (tmp_path / "run" / "model" / "config.json").exists()


# -------------------------------------------------------------------------------------------------- GPU, vLLM
@pytest.mark.gpu
def test_grpo_run_on_a_gpu(model_dir, short_records, tmp_path):
    """The whole GRPO loop on CUDA in bfloat16 with the Hugging Face backend and a frozen reference copy."""
    task = tasks.get_task("text_game", "task")
    cfg = train.GRPOConfig(model=model_dir, out_dir=str(tmp_path), steps=2, prompts_per_step=2, max_new_tokens=16,
                           device="cuda", dtype="bfloat16", backend="hf", reward_workers=1, lr=1e-5)
    summary = train.run_grpo(task, short_records, cfg)
    assert summary["steps"] == 2 and (tmp_path / "model" / "config.json").exists()


@pytest.mark.gpu
def test_vllm_sampler_agrees_with_the_trainer_after_a_weight_sync(records, tmp_path):
    """vLLM loads the base model; after ``sync_weights`` with changed LoRA adapters its log-probs of what it samples
    are the trainer's (bfloat16 noise aside)."""
    pytest.importorskip("vllm", reason="vllm is not installed")
    texts = [text_game.build_prompt(r) for r in records] + [text_game.gold_response(r) for r in records]
    # head size 64: vLLM's attention kernels want a common head size
    path = tiny_model.build_tiny_model(str(tmp_path / "tiny"), texts, hidden_size=256, heads=4)
    tokenizer = hf_model.load_text_tokenizer(path)
    policy = hf_model.add_lora(hf_model.load_model(path, torch.device("cuda"), torch.bfloat16), hf_model.LoraSettings(rank=8))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    engine = rollout.VLLMRollout(path, rollout.stop_token_ids(policy, tokenizer), max_new_tokens=16,
                                 gpu_memory_utilization=0.2, max_model_len=4096)
    engine.sync_weights(policy)
    prompts = [tasks.encode_prompt(tokenizer, text_game.build_prompt(r)) for r in records[:2]]
    out = engine.generate(prompts, n=3)
    assert len(out.texts) == 6 and all(len(lp) == len(ids) for lp, ids in zip(out.sample_logprobs, out.response_ids))
    batch = train.pack(out.prompt_ids, out.response_ids, tokenizer.pad_token_id).to("cuda")
    with torch.no_grad():
        trainer_logp = train.response_logprobs(policy, batch)
    assert train.sampler_logprob_gap(out.sample_logprobs, trainer_logp, batch) < 0.05


# ------------------------------------------------------------------------------------ non-finite and corrupt input
@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
def test_a_non_finite_loss_is_never_an_update_nor_a_saved_model(model_dir, batch, tmp_path, on_nonfinite):
    from rlvrw.guard import NonFiniteGuard
    from rlvrw.usage import TrainingStopped

    policy = lora_policy(model_dir)
    with torch.no_grad():
        next(p for n, p in policy.named_parameters() if "lora_A" in n)[0, 0] = float("nan")
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    guard = NonFiniteGuard(on_nonfinite, "sft")
    if on_nonfinite == "stop":
        with pytest.raises(TrainingStopped, match=r"sft step 4: loss, grad_norm not finite"):
            train.sft_update(policy, optimizer, batch, micro_batch_size=2, max_grad_norm=1.0, guard=guard, step=4)
    else:
        stats = train.sft_update(policy, optimizer, batch, micro_batch_size=2, max_grad_norm=1.0, guard=guard)
        assert guard.check() == 1 and not np.isfinite(stats["loss"])
    for name, param in policy.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, before[name], rtol=0, atol=0, equal_nan=True)
    with pytest.raises(TrainingStopped, match="never saved"):
        hf_model.save_model(policy, hf_model.load_text_tokenizer(model_dir), str(tmp_path / "saved"))
    assert not (tmp_path / "saved").exists()


def test_non_finite_settings_and_a_corrupt_model_are_named(model_dir, tmp_path):
    from rlvrw.files import CorruptFileError

    with pytest.raises(ValueError, match="lr must be a finite number > 0, got inf"):
        train.SFTConfig(model=model_dir, out_dir=str(tmp_path), lr=float("inf"))
    with pytest.raises(ValueError, match="temperature"):
        train.GRPOConfig(model=model_dir, out_dir=str(tmp_path), temperature=float("nan"))
    with pytest.raises(ValueError, match="on_nonfinite"):
        train.SFTConfig(model=model_dir, out_dir=str(tmp_path), on_nonfinite="ignore")
    saved = tmp_path / "saved"
    model = hf_model.load_model(model_dir, CPU, torch.float32)
    hf_model.save_model(model, hf_model.load_text_tokenizer(model_dir), str(saved))
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(CorruptFileError, match=r"model\.safetensors: truncated"):
        hf_model.load_model(str(saved), CPU, torch.float32)
