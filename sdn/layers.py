"""SDN layers (docs/maths.md#sdn-layer): drop-in replacements for a convolution.

Example::

    from sdn import SDNLayer
    layer = SDNLayer(64, 128, num_features=96, directions=[0, 1])  # for Conv2d(64, 128, 3, 1, 1)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sdn.sweep import sweep

Size = int | tuple[int, int]


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_size(name: str, value: object, minimum: int) -> None:
    if isinstance(value, tuple) and len(value) == 2:
        for item in value:
            _check_int(f"each entry of {name}", item, minimum)
    else:
        _check_int(name, value, minimum)


def _check_directions(directions: object) -> list[int]:
    if isinstance(directions, str | bytes) or not isinstance(directions, Sequence):
        raise ValueError(f"directions must be a list of ints in 0..3 (e.g. [0, 1]), got {directions!r}")
    for direction in directions:
        if isinstance(direction, bool) or not isinstance(direction, int) or not 0 <= direction <= 3:
            raise ValueError(
                f"directions must hold ints in 0..3 (0: left->right, 1: right->left, "
                f"2: top->bottom, 3: bottom->top), got {direction!r} in {list(directions)!r}"
            )
    return list(directions)


def _conv(
    in_channels: int, out_channels: int, kernel_size: Size, stride: Size, padding: Size, upsample: bool
) -> nn.Conv2d | nn.ConvTranspose2d:
    conv_type = nn.ConvTranspose2d if upsample else nn.Conv2d
    return conv_type(in_channels, out_channels, kernel_size, stride, padding)


class DirectionCycle:
    """Hands out sweep directions cyclically while a model is built (docs/maths.md#direction-cycle).

    >>> cycle = DirectionCycle()
    >>> cycle.take(3), cycle.take(2)
    ([0, 1, 2], [3, 0])
    """

    def __init__(self) -> None:
        self.counter = 0

    def take(self, n: int) -> list[int]:
        """The next `n` directions: [c, c+1, ..., c+n-1] mod 4; the counter moves on by n."""
        _check_int("n", n, 0)
        directions = [(self.counter + i) % 4 for i in range(n)]
        self.counter = (self.counter + n) % 4
        return directions


class Correction(nn.Module):
    """One correction sweep in a fixed direction, with its own GRUCell(3F, F) at `.cell`."""

    def __init__(self, num_features: int, direction: int) -> None:
        super().__init__()
        self.direction = direction
        self.cell = nn.GRUCell(3 * num_features, num_features)

    def forward(self, a: Tensor) -> Tensor:
        return sweep(a, self.cell, self.direction)

    def extra_repr(self) -> str:
        return f"direction={self.direction}"


class SDNLayer(nn.Module):
    """Spatial dependency layer: a drop-in replacement for `Conv2d(in, out, k, s, p)`.

    `a = tanh(project_in(x))` (a `Conv2d`, or `ConvTranspose2d` when `upsample`) with
    `num_features` channels; one GRU correction sweep over `a` per entry of `directions`
    (0: left->right, 1: right->left, 2: top->bottom, 3: bottom->top; any subset, order and
    repeats, empty for none); then `y = project_out(a)`, a 1x1 `Conv2d` to `out_channels`.
    The output has the shape the equivalent convolution would give.

    Example::

        layer = SDNLayer(3, 64, num_features=32, directions=[0, 1])       # ~ Conv2d(3, 64, 3, 1, 1)
        y = layer(torch.randn(8, 3, 32, 32))                             # (8, 64, 32, 32)
        up = SDNLayer(64, 32, 32, [2, 3], 4, 2, 1, upsample=True)        # ~ ConvTranspose2d
        up(y).shape                                                      # (8, 32, 64, 64)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_features: int,
        directions: Sequence[int],
        kernel_size: Size = 3,
        stride: Size = 1,
        padding: Size = 1,
        upsample: bool = False,
    ) -> None:
        super().__init__()
        _check_int("in_channels", in_channels, 1)
        _check_int("out_channels", out_channels, 1)
        _check_int("num_features", num_features, 1)
        _check_size("kernel_size", kernel_size, 1)
        _check_size("stride", stride, 1)
        _check_size("padding", padding, 0)
        self.project_in = _conv(in_channels, num_features, kernel_size, stride, padding, upsample)
        self.corrections = nn.ModuleList(
            Correction(num_features, direction) for direction in _check_directions(directions)
        )
        self.project_out = nn.Conv2d(num_features, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"SDNLayer expects a batch (B, C, H, W), got shape {tuple(x.shape)}")
        a = torch.tanh(self.project_in(x))
        for correction in self.corrections:
            a = correction(a)
        return self.project_out(a)


class ResSDNLayer(nn.Module):
    """Gated residual SDN layer: a drop-in replacement for `Conv2d(in, out, k, s, p)`.

    `s, g = sdn(x).chunk(2, dim=1)` with `sdn = SDNLayer(in, 2 * out, ...)`, `c = conv(x)` with
    `conv` the plain (transposed when `upsample`) convolution, and `y = σ(g) c + (1 - σ(g)) s`.

    Example::

        layer = ResSDNLayer(64, 64, num_features=96, directions=[0, 1])
        y = layer(torch.randn(8, 64, 16, 16))                            # (8, 64, 16, 16)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_features: int,
        directions: Sequence[int],
        kernel_size: Size = 3,
        stride: Size = 1,
        padding: Size = 1,
        upsample: bool = False,
    ) -> None:
        super().__init__()
        self.sdn = SDNLayer(
            in_channels,
            2 * out_channels,
            num_features,
            directions,
            kernel_size,
            stride,
            padding,
            upsample,
        )
        self.conv = _conv(in_channels, out_channels, kernel_size, stride, padding, upsample)

    def forward(self, x: Tensor) -> Tensor:
        s, g = self.sdn(x).chunk(2, dim=1)
        gate = torch.sigmoid(g)
        return gate * self.conv(x) + (1 - gate) * s
