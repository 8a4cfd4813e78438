"""rrhf-fast: RRHF alignment of Hugging Face causal LMs, fast and on small GPUs."""

__version__ = "0.1.0"
