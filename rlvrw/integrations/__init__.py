"""rlvrw's fused GRPO ops inside the RL frameworks people already run, with each framework's own semantics.

One module per framework, each importable without the others:

* ``rlvrw.integrations.verl``: importing it registers the VERL policy losses ``"rlvrw_grpo"`` and ``"rlvrw_gspo"``
  (``actor_rollout_ref.actor.policy_loss.loss_mode=rlvrw_grpo``); ``linear_cross_entropy`` is the fused
  log-prob + entropy of VERL's actor forward from hidden states and ``lm_head``.
* ``rlvrw.integrations.trl``: ``GRPOTrainer``, TRL's trainer with the loss computed by the fused linear path.
* ``rlvrw.integrations.openrlhf``: ``PolicyLoss``, OpenRLHF's constructor and call (needs only torch).
* ``rlvrw.integrations.liger``: ``LigerFusedLinearGRPOLoss``, Liger-Kernel's signature (needs only torch).

The frameworks' settings map onto ``rlvrw.ops.grpo_loss``'s options as the table in ``rlvrw.ops.grpo`` lists; the
tests run each framework's own function on the same inputs. These modules import ``rlvrw.ops`` and their framework,
nothing else of rlvrw, and nothing of rlvrw imports them.
"""

import torch

import rlvrw.ops as ops


def missing_framework(module: str, framework: str, extra: str, error: ImportError) -> ImportError:
    """The ImportError a module raises when its framework does not import: which one, and how to install it."""
    return ImportError(f"{module} needs {framework}, which did not import ({error}): pip install rlvrw[{extra}]")


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: float,
                  return_entropy: bool = False):
    """``ops.linear_token_logprobs`` for an output layer called from inside a framework's forward: outside autocast,
    in the weight's dtype (hidden states are cast to it), as the frameworks' own fused heads compute (under autocast
    the op itself would run the head in autocast's dtype, as an nn.Linear does)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return ops.linear_token_logprobs(hidden.to(weight.device, weight.dtype), weight, tokens, float(temperature),
                                         return_entropy=return_entropy)
