"""semibench: a reproducible benchmark for semi-supervised nuclei segmentation."""

__version__ = "0.1.0"
