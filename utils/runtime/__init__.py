"""What every script runs on: processes and launchers, checkpoints and RNG states, signals, monitoring, flags and
errors, SLURM."""
