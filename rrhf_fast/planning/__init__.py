"""Will it fit? One training step simulated on fake tensors (`simulate`, with `plan_cuda` for the
CUDA-only paths), its memory tracked by category (`memtrack`), the `plan` command (`plan`) and the
check `train` runs before any weights load (`fit_check`)."""
