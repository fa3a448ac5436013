"""Run `axolotl train CONFIG` in-process with Liger's fused linear cross-entropy computed in plain torch.

Liger's kernel is Triton (GPU only). This keeps everything else of Liger's path as it is: its patched
`*ForCausalLM.forward` never calls `lm_head` during training and returns `logits=None`, the case STR must
handle from hidden states. Run with the Axolotl environment's Python; writes the number of fused-loss
calls to the file named by $STR_LIGER_CALLS.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import liger_kernel.transformers.functional as liger_functional
import torch
import torch.nn.functional as F

CALLS = 0


def fused_linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ce_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    lse_square_scale: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    softcap: float | None = None,
    return_z_loss: bool = False,
    accum_dtype: Any = None,
    use_token_scaling: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
) -> torch.Tensor:
    """Same signature and result as Liger's (loss only), computed from the hidden states in torch."""
    global CALLS
    CALLS += 1
    logits = input @ weight.T
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(
        logits.float(),
        target,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )


def main() -> None:
    liger_functional.liger_fused_linear_cross_entropy = fused_linear_cross_entropy
    from axolotl.cli.train import do_cli

    try:
        do_cli(config=sys.argv[1])
    finally:
        with open(os.environ["STR_LIGER_CALLS"], "w", encoding="utf-8") as out:
            out.write(str(CALLS))


if __name__ == "__main__":
    main()
