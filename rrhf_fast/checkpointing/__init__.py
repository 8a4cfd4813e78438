"""A run on disk: the output directory and its lock (`rundir`), checkpoints written atomically and
verified (`checkpoint`), where a run is and what it resumes (`run_state`, `resume`), the settings and
versions it ran with (`provenance`), and the `merge` command that folds a LoRA adapter into its base."""
