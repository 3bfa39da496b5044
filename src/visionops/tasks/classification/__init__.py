"""Image classification: its stages, model wrapper, augmentation, losses, metrics and plots."""
