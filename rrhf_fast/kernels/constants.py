"""The kernels' choices, importable without torch or triton: the config builds its flags from these."""

IMPLS = ("auto", "triton", "torch")  # `impl=` of token_logprobs and rrhf_loss
MODES = ("paper", "official")  # rrhf_loss's length normalisation (docs/DESIGN.md §4)
SFT_REDUCTIONS = ("mean", "sum")  # rrhf_loss's SFT term: token mean, or the paper's sum
