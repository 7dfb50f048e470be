"""Patch classifiers and the model registry.

Built-in architectures, by registry name:

- ``vgg16_fcn``: Fast ScanNet's VGG16 without padding (Table I), patch 244, stride 32.
- ``tellez_cnn``: Tellez et al.'s distilled mitosis CNN (Table II), patch 97, stride 4.
- ``residual_fcn``: a padding-free ResNet-like net (cropped skips), stride 8.
- ``demo_cnn``: the bundled demo model's network, patch 38, stride 8.
- ``resnet18``, ``resnet34``, ``resnet50``: torchvision's ResNets (same parameter names, so
  torchvision checkpoints load), zero-padded: scanned in patch mode, 224 px patches at a
  32 px grid by default.

``create(name, **kwargs)`` builds one, ``list_models()`` names them all,
``@register_model`` adds yours; ``save_model`` / ``load_model`` write and read weights
files that say how they must be scanned (DESIGN.md 6.3).
"""
from .files import ModelCard, load_model, read_card, save_model
from .nets import demo_cnn, tellez_cnn, vgg16_fcn
from .registry import ENTRY_POINT_GROUP, ModelEntry, create, get_entry, list_models, register_model
from .residual import ValidBlock, residual_fcn
from .resnet import resnet18, resnet34, resnet50

register_model(vgg16_fcn, mpp=0.243)
register_model(tellez_cnn, mpp=0.25)
register_model(residual_fcn)
register_model(demo_cnn, mpp=1.0)
for _net in (resnet18, resnet34, resnet50):
    register_model(_net, patch=224, stride=32, dense=False,
                   description=f"torchvision's {_net.__name__} (zero padding: patch mode)")

__all__ = ["tellez_cnn", "vgg16_fcn", "residual_fcn", "demo_cnn", "resnet18", "resnet34", "resnet50", "ValidBlock", "create", "list_models",
           "register_model", "get_entry", "ModelEntry", "ENTRY_POINT_GROUP", "ModelCard", "save_model",
           "load_model", "read_card"]
