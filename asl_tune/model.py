"""DexNet: the seed notebook's AlexNet-like CNN, with the head's width and input size as parameters."""

from __future__ import annotations

import torch
from torch import nn

from asl_tune.config import config_problems
from asl_tune.errors import AslTuneError


def _conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def feature_side(image_size: int) -> int:
    """Side of the conv stack's output map for a square input (8 at the seed's 200 px)."""
    s = _conv_out(image_size, 11, 4, 2)
    s = _conv_out(s, 3, 2)
    s = _conv_out(s, 5, 1, 2)
    s = _conv_out(s, 3, 2)
    s = _conv_out(s, 3, 1, 2)
    s = _conv_out(s, 3, 1, 2)
    s = _conv_out(s, 3, 1, 2)
    s = _conv_out(s, 3, 2)
    return s


class DexNet(nn.Module):
    """The seed's conv stack unchanged; head Linear(flat->w) ReLU Dropout Linear(w->w/2) Dropout Linear(w/2->classes)."""

    def __init__(self, head_width: int = 512, image_size: int = 200, num_classes: int = 29, dropout: float = 0.5):
        super().__init__()
        problems = config_problems({"head_width": head_width, "image_size": image_size, "dropout": dropout})  # the rules live in config
        if problems:
            raise AslTuneError("; ".join(f"{name}: {why}, got {value!r}" for name, why, value in problems))
        side = feature_side(image_size)
        self.image_size = image_size  # input side in px, for flops_per_image
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(96, 256, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(256, 384, kernel_size=3, padding=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        # No ReLU after the second Linear: the seed has none, and its parameter counts are the contract.
        self.head = nn.Sequential(
            nn.Linear(256 * side * side, head_width),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(head_width, head_width // 2),
            nn.Dropout(p=dropout),
            nn.Linear(head_width // 2, num_classes),
        )

        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He (Kaiming) normal weights for the ReLU layers, zero biases.

        PyTorch's default init shrinks the signal about tenfold through this stack (it has no
        normalisation layers): the logits start almost identical for every image and SGD sits at
        loss ln(classes) for hundreds of steps. The seed got away with it over 10 epochs of 60,900
        images; short CPU trials do not. He init keeps the activations' scale from layer to layer.
        """
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # The classifier starts near zero: every class equally likely, loss ln(classes), no wild first steps.
        nn.init.normal_(self.head[-1].weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 3, H, W) float, normalised -> (B, 256, s, s) -> (B, classes) logits
        return self.head(torch.flatten(self.features(x), 1))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flops_per_image(model: DexNet) -> int:
    """Forward FLOPs for one image, counted as torch.utils.flop_counter does: 2 per multiply-add of each conv and Linear.

    Biases, ReLU, pooling and dropout are left out, as the counter leaves them out. Exact and free of
    noise: the architecture alone decides it, so trials of one architecture share it.
    """
    side, flops = model.image_size, 0
    for layer in model.features:
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
            kernel, stride, padding = (_first(getattr(layer, k)) for k in ("kernel_size", "stride", "padding"))
            side = _conv_out(side, kernel, stride, padding)
        if isinstance(layer, nn.Conv2d):  # (C_in, S, S) -> (C_out, s, s): C_in * k * k multiply-adds per output
            flops += 2 * layer.in_channels * layer.out_channels * kernel * kernel * side * side
    return flops + sum(2 * layer.in_features * layer.out_features for layer in model.head if isinstance(layer, nn.Linear))


def _first(value: int | tuple[int, ...]) -> int:
    """A square layer's kernel, stride or padding as one int (torch keeps some as (k, k) pairs)."""
    return value[0] if isinstance(value, tuple) else value
