"""Generation and scoring: candidate responses from a model (`sample`, `beam_search`) and their
scores from a reward model, a Python function or an LLM judge (`score`, `labelers`)."""
