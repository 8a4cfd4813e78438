"""What a run reports: metrics to trackers (`tracking`), its training curves (`plot`) and the model
card written beside each checkpoint (`model_card`)."""
