"""EDSR and MDSR super-resolution on Ray: training, batch upscaling, serving and evaluation."""

__version__ = "0.1.0"
