"""Model registry: CIFAR ResNets, a CIFAR ViT, the demo's digits net and torchvision CNNs."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import UserError
from .arch import tag
from .cifar_resnet import CifarResNet, resnet20, resnet32, resnet56
from .digits import DigitsNet, digits_net
from .vit import VisionTransformer, vit_cifar

LOCAL: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "digits_net": digits_net,
    "vit_cifar": vit_cifar,
}
TORCHVISION = ("resnet18", "resnet50", "mobilenet_v2")


def names() -> list[str]:
    return sorted([*LOCAL, *TORCHVISION])


def _torchvision(name: str, num_classes: int, pretrained: bool) -> nn.Module:
    import torchvision

    builder = getattr(torchvision.models, name)
    if not pretrained:
        return builder(weights=None, num_classes=num_classes)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        model = builder(weights=weights)
    except Exception as err:  # URLError, HTTP errors, hash mismatch...
        raise UserError(
            f"could not fetch torchvision's pretrained {name} weights ({type(err).__name__}: "
            f"{err}); connect to the internet once or put the file in the torch hub cache "
            f"({weights.url})"
        ) from None
    if num_classes != 1000:
        _replace_head(model, num_classes)
    return model


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """A fresh classifier for ``num_classes`` on an ImageNet-pretrained torchvision model."""
    if hasattr(model, "fc"):
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:
        last = model.classifier[-1]
        model.classifier[-1] = nn.Linear(last.in_features, num_classes)


def get(
    name: str, num_classes: int = 10, pretrained: bool = False, in_channels: int = 3
) -> nn.Module:
    """Build a model by name (see :func:`names`); ``pretrained`` loads torchvision's weights."""
    if name in LOCAL:
        if pretrained:
            raise ValueError(f"model {name!r} has no pretrained weights; train it with recipe fp")
        return LOCAL[name](num_classes=num_classes, in_channels=in_channels)
    if name in TORCHVISION:
        if in_channels != 3:
            raise ValueError(f"torchvision model {name!r} takes 3 input channels")
        return tag(_torchvision(name, num_classes, pretrained), name, num_classes, in_channels)
    raise ValueError(f"unknown model {name!r}; allowed: {', '.join(names())}")


__all__ = [
    "CifarResNet",
    "DigitsNet",
    "digits_net",
    "get",
    "names",
    "resnet20",
    "resnet32",
    "resnet56",
    "VisionTransformer",
    "vit_cifar",
]
