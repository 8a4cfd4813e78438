"""Objectives: the losses a training step minimises, chosen by `--loss`."""
