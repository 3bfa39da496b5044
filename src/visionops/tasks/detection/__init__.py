"""Object detection: its stages, models, augmentation, losses, metrics and plots."""
