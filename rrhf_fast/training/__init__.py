"""Training: the loop (`train`), its set-up (`setup`), held-out evaluation (`evaluate`), and the
commands beside it: `train-rm` (`train_rm`) and `inspect`, which shows what train would pack."""
