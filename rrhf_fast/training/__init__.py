"""Training: the loop (`train`), its set-up, step planning and run state, optimizer, checkpoints,
resume rules, distributed wrapping, held-out evaluation, run provenance and curves."""
