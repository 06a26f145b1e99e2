"""Sampling responses for GRPO: two backends with the same ``Rollouts``.

``HFRollout``: ``model.generate`` on the trainer's own model, always available. ``VLLMRollout``: a vLLM engine in
the same process, its weights overwritten from the trainer after every update; it also returns the sampler's
log-probs (after temperature).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from rlvrw import checks
from rlvrw.lang.hf_model import merged_weights


@dataclass
class Rollouts:
    """Sampled responses, one per (prompt, sample), laid out group by group (the ``n`` samples of a prompt are
    consecutive).

    response_ids end with a stop token unless ``truncated`` (the length limit was hit). sample_logprobs are the
    sampler's log-probs of the response tokens (vLLM), None where the backend gives none.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]
    sample_logprobs: list[list[float]] | None = None


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's end-of-sequence token and those of the model's generation config (chat models end a turn
    with their own token, e.g. Qwen's ``<|im_end|>``)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids += configured if isinstance(configured, list) else [configured]
    if not ids:
        raise ValueError("tokenizer must have an eos_token, or the model a generation_config.eos_token_id")
    return list(dict.fromkeys(ids))


def cut_at_stop(ids: list[int], stop_ids) -> tuple[list[int], bool]:
    """``ids`` up to and including the first stop token, and whether none was found (truncated)."""
    for index, token in enumerate(ids):
        if token in stop_ids:
            return ids[: index + 1], False
    return ids, True


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def _repeat(prompts: list[list[int]], n: int) -> list[list[int]]:
    return [p for p in prompts for _ in range(n)]


class HFRollout:
    """Sampling with ``model.generate`` on the trainer's model (no weight copy, nothing to sync).

    temperature 0 decodes greedily (evaluation). Sampling is from the full distribution: no top-k, no top-p, so that
    the trainer's log-probs at the same temperature are those of the sampler.
    """

    def __init__(self, model, tokenizer, *, max_new_tokens: int, temperature: float = 1.0, batch_size: int = 16):
        checks.integer("max_new_tokens", max_new_tokens)
        checks.number("temperature", temperature, low=0)
        checks.integer("batch_size", batch_size)
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.batch_size = max_new_tokens, float(temperature), batch_size
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

    def sync_weights(self, model) -> None:
        """Nothing to do: generation runs on the trainer's model itself."""

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int = 1) -> Rollouts:
        prompts = _repeat(prompt_ids, n)
        device = next(self.model.parameters()).device
        sampling = {"do_sample": True, "temperature": self.temperature, "top_k": 0, "top_p": 1.0}
        options = sampling if self.temperature > 0 else {"do_sample": False}
        was_training = self.model.training
        self.model.eval()
        responses, truncated = [], []
        try:
            for start in range(0, len(prompts), self.batch_size):
                ids, mask = _left_pad(prompts[start:start + self.batch_size], self.pad_id)
                out = self.model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=self.max_new_tokens,
                    eos_token_id=self.stop_ids, pad_token_id=self.pad_id, **options,
                )
                for row in out[:, ids.shape[1]:].tolist():
                    response, cut = cut_at_stop(row, self.stop_ids)
                    responses.append(response)
                    truncated.append(cut)
        finally:
            self.model.train(was_training)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return Rollouts(prompt_ids=prompts, response_ids=responses, texts=texts, truncated=truncated)


# vLLM runs its engine in a child process unless this is 0; the weight sync needs it in this one.
IN_PROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
# Log-probs of the distribution sampled from (after temperature), which the trainer recomputes at the same
# temperature; vLLM's default, "raw_logprobs", is the model's own distribution (temperature 1).
LOGPROBS_MODE = "processed_logprobs"


def force_in_process_engine() -> None:
    """Set ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` for the engines created next, warning when it held another value."""
    value = os.environ.get(IN_PROCESS_ENV)
    if value is not None and value.strip() != "0":
        warnings.warn(f"rlvrw: {IN_PROCESS_ENV}={value!r} overridden with 0: the vLLM rollout syncs the trainer's "
                      "weights into an engine running in this process", RuntimeWarning, stacklevel=3)
    os.environ[IN_PROCESS_ENV] = "0"


class VLLMRollout:
    """Sampling with a vLLM engine in this process (colocated with the trainer on the same GPU).

    The engine loads ``model_dir`` once; ``sync_weights`` then overwrites its weights with the trainer's (LoRA
    adapters merged in) after every update, through ``LLM.apply_model``, which hands the trainer's tensors to the
    engine's model only when the engine runs in this process. So the constructor sets
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (warning if it held another value), and checks afterwards that the engine's
    model is reachable here; when vLLM read the variable earlier in this process (it caches its environment once an
    engine has started), it raises and says so. Sampling log-probs (``Rollouts.sample_logprobs``) are vLLM's
    ``processed_logprobs``: after temperature, the distribution the tokens were drawn from. Needs ``pip install vllm``
    (0.10 or newer) and a GPU.
    """

    def __init__(self, model_dir: str, stop_ids: list[int], *, max_new_tokens: int,
                 temperature: float = 1.0, gpu_memory_utilization: float = 0.4, dtype: str = "bfloat16",
                 max_model_len: int | None = None, seed: int = 0):
        force_in_process_engine()
        from vllm import LLM

        self.stop_ids = stop_ids
        self.max_new_tokens, self.temperature = max_new_tokens, float(temperature)
        try:
            self.llm = LLM(model=model_dir, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                           max_model_len=max_model_len, enable_prefix_caching=True, seed=seed,
                           logprobs_mode=LOGPROBS_MODE)
        except TypeError as err:
            if "logprobs_mode" not in str(err):
                raise
            raise RuntimeError("the vLLM rollout needs vLLM 0.10 or newer (the logprobs_mode engine argument, for "
                               f"log-probs after temperature); the installed vLLM refused it: {err}") from err
        self._check_in_process()

    def _check_in_process(self) -> None:
        """Raise unless ``apply_model`` runs its function on the engine's model here, in this process."""
        reached: list = []
        try:
            self.llm.apply_model(lambda engine_model: reached.append(engine_model))
        except Exception as err:  # a multiprocess engine refuses to pickle the function, or fails to run it
            failure = f" (apply_model raised {type(err).__name__}: {err})"
        else:
            failure = ""
        if not reached:
            raise RuntimeError(
                f"the vLLM engine runs in another process, so the trainer's weights cannot be synced into it{failure}. "
                f"{IN_PROCESS_ENV} must be 0 when vLLM starts its first engine in this process: set "
                f"{IN_PROCESS_ENV}=0 in the environment before starting, or use backend='hf'"
            )

    @torch.no_grad()
    def sync_weights(self, model) -> None:
        weights = merged_weights(model)
        self.llm.apply_model(lambda engine_model: engine_model.load_weights(weights))
        self.llm.reset_prefix_cache()  # cached prompt states were computed with the old weights

    def generate(self, prompt_ids: list[list[int]], n: int = 1) -> Rollouts:
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=self.temperature, top_p=1.0, max_tokens=self.max_new_tokens,
                                logprobs=0, stop_token_ids=self.stop_ids, skip_special_tokens=True)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        rollouts = Rollouts(prompt_ids=[], response_ids=[], texts=[], truncated=[], sample_logprobs=[])
        for prompt, output in zip(prompt_ids, outputs):
            for sample in output.outputs:
                ids = list(sample.token_ids)
                rollouts.prompt_ids.append(prompt)
                rollouts.response_ids.append(ids)
                rollouts.texts.append(sample.text)
                rollouts.truncated.append(sample.finish_reason == "length")
                rollouts.sample_logprobs.append([step[token].logprob for step, token in zip(sample.logprobs, ids)])
        return rollouts


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()
