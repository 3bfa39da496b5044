"""Semantic segmentation: a class per pixel (class 0 is background; 255 in a mask is ignored)."""
