"""Many GPUs: the torchrun process group, DDP or FSDP2 around the packed forward and the collectives
the loop and the checkpoints need (`distributed`), and the sharded optimizer state of an FSDP2 run
read without pickle (`safe_dcp`)."""
