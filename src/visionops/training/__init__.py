"""The training loop shared by the tasks: devices, DDP, checkpoints, schedules, early stopping."""
