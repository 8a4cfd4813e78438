"""Fused kernels of rrhf-fast, importable as `rrhf_fast.kernels` (never as a bare `kernels`).

token_logprobs: per-token log-softmax gather straight from hidden states and the lm_head weight.
rrhf_loss: length-normalised response scores, pairwise hinge ranking loss and SFT loss, all queries
of a packed batch at once.
"""

if __name__ == "kernels":
    # Found under the bare name because the repository root is on sys.path (`python -m pytest`,
    # `python -c` from the root). transformers imports that name to probe for the Hugging Face
    # `kernels` package: stay an inert module with no version so that its probe answers "absent".
    __all__: list[str] = []
else:
    from .reference import RRHFOutput, rrhf_loss_torch, token_logprobs_torch
    from .rrhf_loss import rrhf_loss
    from .token_logprobs import token_logprobs

    __all__ = ["RRHFOutput", "rrhf_loss", "rrhf_loss_torch", "token_logprobs", "token_logprobs_torch"]
