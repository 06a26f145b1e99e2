"""TRL (1.16): ``GRPOTrainer`` whose loss is rlvrw's fused linear GRPO path, a drop-in for ``trl.GRPOTrainer``.

Swap the import and nothing else changes::

    from rlvrw.integrations.trl import GRPOTrainer   # was: from trl import GRPOTrainer

The loss of each micro-batch runs the model's backbone, then ``rlvrw.ops.linear_token_logprobs`` (log-probs and
entropies from the last hidden states and ``lm_head.weight``, never the (B, T, V) logits) and ``rlvrw.ops.grpo_loss``
with the options of TRL's ``loss_type`` and its per-process normalizers (gradient accumulation, steps per
generation, processes: the table in ``rlvrw.ops.grpo``). Values, gradients and the logged metrics (kl, entropy,
clip_ratio/*) equal those of TRL's ``compute_loss`` given the same log-probs; the head itself computes in the
weight's dtype outside autocast (TRL's accumulates in float32). Generation, rewards, advantages, old and reference
log-probs stay TRL's. The loss runs inside the model wrapper's forward (DDP, FSDP, DeepSpeed see an ordinary
forward).

Supported: ``loss_type`` grpo, bnpo, dr_grpo, dapo, luspo; ``beta``, ``epsilon``/``epsilon_high``, ``delta`` (>
``1 + epsilon_high``), ``importance_sampling_level``, the vLLM importance-sampling correction,
``use_bias_correction_kl`` (TRL's default: the KL term weighted by the ratio, added in plain torch), a static
``entropy_coef``, ``tool_mask``. Anything else is refused with a ValueError that names it, at construction: the loss
types cispo, sapo, vespo, ``top_entropy_quantile < 1``, ``off_policy_mask_threshold``, ``use_adaptive_entropy``,
per-token vLLM ratios with sequence-level importance sampling (TRL differentiates those another way), MoE auxiliary
losses, DeepSpeed ZeRO-3, models whose output layer has a bias, a logit scale or soft-capping; at the first batch:
image inputs.
"""

from __future__ import annotations

import torch

import rlvrw.ops as ops
from rlvrw.integrations import head_logprobs, missing_framework
from rlvrw.integrations._trl_options import ratio_weighted_kl, trl_loss_options

try:
    import trl
    from accelerate.utils import is_peft_model
    from trl.trainer.utils import nanmax, nanmin
except ImportError as exc:
    raise missing_framework(__name__, "TRL", "trl", exc) from exc

LOGIT_SCALE_ATTRIBUTES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes")


def check_config(args) -> dict:
    """The ``grpo_loss`` options of a ``GRPOConfig``, or a ValueError naming the setting that is not supported."""
    refused = {
        "top_entropy_quantile < 1": args.top_entropy_quantile < 1.0,
        "off_policy_mask_threshold": args.off_policy_mask_threshold is not None,
        "use_adaptive_entropy": args.use_adaptive_entropy,
        "vllm_importance_sampling_mode token_* with importance_sampling_level='sequence'": (
            args.use_vllm and args.vllm_importance_sampling_correction
            and args.importance_sampling_level == "sequence" and args.vllm_importance_sampling_mode.startswith("token")
        ),
    }
    for setting, is_set in refused.items():
        if is_set:
            raise ValueError(f"rlvrw.integrations.trl.GRPOTrainer does not support {setting}: use trl.GRPOTrainer")
    epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    return trl_loss_options(args.loss_type, args.epsilon, epsilon_high, args.beta, args.delta,
                            args.importance_sampling_level, args.max_completion_length)


def _check_model(model) -> None:
    text_config = model.config.get_text_config()
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        raise ValueError("models with final_logit_softcapping are not supported by rlvrw.integrations.trl")
    for name in LOGIT_SCALE_ATTRIBUTES:
        if getattr(text_config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"models whose logits are scaled ({name}={getattr(text_config, name)}) are not "
                             "supported by rlvrw.integrations.trl")
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError("rlvrw.integrations.trl needs an output layer (lm_head) without bias")


def _run_inside(wrapper: torch.nn.Module, module: torch.nn.Module, method, *args):
    """``method(*args)`` run as ``module``'s forward called by ``wrapper`` (DDP, FSDP or DeepSpeed): their hooks
    fire as for an ordinary forward (gradient reduction, gathered parameters)."""
    if wrapper is module:
        return method(*args)
    had_own_forward = "forward" in module.__dict__
    original = module.forward

    def restore():
        if had_own_forward:
            module.forward = original
        else:
            del module.forward

    def forward(*inner_args):
        restore()
        return method(*inner_args)

    module.forward = forward
    try:
        return wrapper(*args)
    finally:
        if module.__dict__.get("forward") is forward:
            restore()


def _causal_lm(unwrapped):
    """The Hugging Face causal LM inside a PEFT model (its LoRA layers are in place), or the model itself."""
    return unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped


class GRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` with its loss computed by rlvrw's fused linear GRPO path (see the module docstring).
    Takes exactly ``trl.GRPOTrainer``'s arguments."""

    def __init__(self, model, reward_funcs=None, args=None, *more, **kwargs):
        if args is not None:
            check_config(args)  # before TRL loads models
        super().__init__(model, reward_funcs, args, *more, **kwargs)
        self._rlvrw_options = check_config(self.args)
        _check_model(_causal_lm(self.accelerator.unwrap_model(self.model)))
        if self.aux_loss_enabled:
            raise ValueError("MoE auxiliary losses (router_aux_loss_coef) are not supported by "
                             "rlvrw.integrations.trl: use trl.GRPOTrainer")
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise ValueError("DeepSpeed ZeRO-3 is not supported by rlvrw.integrations.trl (its backward recomputes "
                             "from lm_head.weight, which ZeRO-3 has released): use trl.GRPOTrainer")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("The GRPOTrainer does not support returning outputs")
        if any(name in inputs for name in IMAGE_INPUTS):
            raise ValueError("image inputs are not supported by rlvrw.integrations.trl: use trl.GRPOTrainer")
        unwrapped = self.accelerator.unwrap_model(model)
        loss, detached = _run_inside(model, unwrapped, self._fused_loss, unwrapped, inputs)
        # metrics after the wrapper's forward: their collectives must not run inside it
        self._log_metrics(inputs, **detached)
        return loss

    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    def _loss_mask(self, inputs) -> torch.Tensor:
        mask = inputs["completion_mask"]
        return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]

    def _fused_loss(self, unwrapped, inputs):
        """(loss, detached values for the metrics) of one micro-batch: backbone, fused head, fused loss."""
        model = _causal_lm(unwrapped)
        completion_ids = inputs["completion_ids"]
        length = completion_ids.size(1)
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        with self.accelerator.autocast():
            hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = hidden.last_hidden_state[:, -length - 1:-1]  # the positions that predict the completion
        weight = model.get_output_embeddings().weight
        if hasattr(weight, "full_tensor"):  # FSDP2 shards the head as a DTensor
            weight = weight.full_tensor()
        mask = self._loss_mask(inputs)
        valid = mask != 0
        tokens = torch.where(valid, completion_ids, torch.zeros_like(completion_ids))
        logp, entropy = head_logprobs(hidden, weight, tokens, self.temperature, return_entropy=True)
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old
        weights = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights = inputs["importance_sampling_ratio"]
            weights = weights[:, 0] if weights.dim() == 2 and weights.shape[1] == 1 else weights
        options = dict(self._rlvrw_options, **self._normalizers(valid, inputs))
        ref = inputs["ref_per_token_logps"] if self.beta != 0 else None
        weighted_kl = ref is not None and self.args.use_bias_correction_kl
        loss, _ = ops.grpo_loss(logp, old, inputs["advantages"], mask, None if weighted_kl else ref,
                                rollout_is_weights=weights, **dict(options, kl_coef=0.0) if weighted_kl else options)
        kl = None
        if weighted_kl:
            kl_loss, kl = ratio_weighted_kl(logp, old, ref, valid, options)
            loss = loss + self.beta * kl_loss
        policy_loss = loss.detach() * self._policy_loss_scale()
        if self.entropy_coef != 0:
            accumulation = self.current_gradient_accumulation_steps if self._mode() == "train" else 1
            mean_entropy = torch.where(valid, entropy, 0).sum() / valid.sum().clamp(min=1)
            loss = loss - self.entropy_coef * mean_entropy / accumulation
        return loss, dict(logp=logp.detach(), entropy=entropy.detach(), policy_loss=policy_loss, kl=kl)

    def _normalizers(self, valid: torch.Tensor, inputs) -> dict:
        """TRL's per-process normalizers: the loss of a micro-batch, summed over the gradient-accumulation steps and
        averaged over the processes, is the loss of the whole batch (no accumulation in eval)."""
        train = self._mode() == "train"
        accumulation = self.current_gradient_accumulation_steps if train else 1
        if self.loss_type == "dapo":
            num_tokens = inputs["num_items_in_batch"].clamp(min=1.0)
            if train:
                num_tokens = num_tokens * accumulation / self.args.steps_per_generation
            return {"num_tokens": num_tokens, "dp_size": self.accelerator.num_processes}
        if self.loss_type == "bnpo":
            return {"num_tokens": valid.sum().clamp(min=1) * accumulation}
        return {"num_seqs": valid.shape[0] * accumulation}

    def _policy_loss_scale(self) -> float:
        """TRL logs ``policy_loss`` before dividing by the accumulation steps (dapo: as is)."""
        if self.loss_type == "dapo" or self._mode() != "train":
            return 1.0
        return self.current_gradient_accumulation_steps

    def _log_metrics(self, inputs, logp, entropy, policy_loss, kl) -> None:
        """TRL's metrics of ``_compute_loss``, from the detached log-probs, entropies, and the ratio-weighted KL (when
        ``use_bias_correction_kl``)."""
        mode = self._mode()
        metrics = self._metrics[mode]
        mask = self._loss_mask(inputs)
        valid = mask != 0
        if self.entropy_coef != 0:
            metrics["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)

        # in each metric's own dtype, as TRL's (the clip fractions are float32)
        def masked_seq_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1).to(x.dtype)

        def global_masked_mean(x):
            if x.shape[1] == 1:
                local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device, dtype=x.dtype)])
            else:
                local = torch.stack([(x * mask).sum(), mask.sum().to(x.dtype)])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        old = inputs.get("old_per_token_logps")
        log_ratio = torch.zeros_like(logp) if old is None else torch.where(valid, logp - old, 0)
        if self.importance_sampling_level == "sequence":
            log_ratio = (log_ratio.sum(-1) / valid.sum(-1).clamp(min=1)).unsqueeze(-1)
        if self.beta != 0:
            if kl is None:
                diff = torch.where(valid, inputs["ref_per_token_logps"] - logp, 0)
                kl = diff.exp() - diff - 1
            metrics["kl"].append(global_masked_mean(kl))
        metrics["entropy"].append(global_masked_mean(torch.where(valid, entropy, 0)))
        ratio = log_ratio.exp()
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
        metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
        metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high))).item())
