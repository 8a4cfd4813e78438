"""The optimizers and their update rules: the choice of --optim and the learning-rate schedule (`optim`),
the per-parameter optimizer they build on (`paramwise`), the step inside the backward
(`in_backward`), the state on the host (`offload`), and the bf16 rounding of the update (`bf16_update`)."""
