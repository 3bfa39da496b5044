"""Semantic segmentation: its stages, models, augmentation, losses, metrics and plots."""
