"""Object detection: its stages, detector wrapper and rule, box-aware augmentation, metrics, distillation and serving."""
