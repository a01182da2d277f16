"""mrivq: hierarchical VQ-VAE-2 models for MRI slices."""

__version__ = "0.1.0"
