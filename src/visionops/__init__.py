"""visionops: reproducible training, checking and shipping of image classifiers."""

__version__ = "0.1.0"
