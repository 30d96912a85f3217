"""DINO pretraining: the loss, optimiser and schedules, one training step, and the run (epochs, checkpoints,
evaluations)."""
