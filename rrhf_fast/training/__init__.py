"""Training: the loop (`train`), its optimizer, checkpoints, resume rules, distributed wrapping,
held-out evaluation, run provenance and curves."""
