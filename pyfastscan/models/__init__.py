"""Patch classifiers without padding, ready for pyfastscan.to_dense."""
from .nets import tellez_cnn, vgg16_fcn

__all__ = ["tellez_cnn", "vgg16_fcn"]
