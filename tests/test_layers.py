"""SDN layers against the sweep's definition (docs/maths.md#sdn-layer): `reference_sweep`, itself
checked position by position against the table of neighbours."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from sdn import ResSDNLayer, SDNLayer
from sdn.layers import DirectionCycle
from sdn.sweep import CorrectionSweep, reference_sweep, sweep

# The table of docs/maths.md#directions: (dh, dw) offsets of a position's three neighbours, in order.
NEIGHBOURS = {
    0: ((-1, -1), (0, -1), (1, -1)),
    1: ((-1, 1), (0, 1), (1, 1)),
    2: ((-1, -1), (-1, 0), (-1, 1)),
    3: ((1, -1), (1, 0), (1, 1)),
}


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def lines_in_sweep_order(height: int, width: int, direction: int) -> list[list[tuple[int, int]]]:
    if direction in (0, 1):
        lines = [[(h, w) for h in range(height)] for w in range(width)]
    else:
        lines = [[(h, w) for w in range(width)] for h in range(height)]
    return lines[::-1] if direction in (1, 3) else lines


class RecordingCell(nn.Module):
    """Stands in for the GRU cell: returns each position's state unchanged and records the
    neighbours (B·N, 3F) every line was given, in the order the lines were updated."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[Tensor] = []

    def forward(self, neighbours: Tensor, state: Tensor) -> Tensor:
        self.inputs.append(neighbours)
        return state


@pytest.mark.parametrize("direction", [0, 1, 2, 3])
@pytest.mark.parametrize("size", [(4, 5), (5, 4), (1, 3), (3, 1)])
def test_reference_sweep_takes_the_neighbours_of_the_table(direction: int, size: tuple[int, int]) -> None:
    batch, features, (height, width) = 2, 3, size
    a = torch.randn(batch, features, height, width)
    cell = RecordingCell()
    assert torch.equal(reference_sweep(a, cell, direction), a)
    lines = lines_in_sweep_order(height, width, direction)[1:]
    assert len(cell.inputs) == len(lines)
    zero = a.new_zeros(batch, features)
    for line, given in zip(lines, cell.inputs, strict=True):
        given = given.view(batch, len(line), 3 * features)
        for n, (h, w) in enumerate(line):
            expected = [
                a[:, :, h + dh, w + dw] if 0 <= h + dh < height and 0 <= w + dw < width else zero
                for dh, dw in NEIGHBOURS[direction]
            ]
            assert torch.equal(given[:, n], torch.cat(expected, 1)), (h, w)


def reference_layer(layer: SDNLayer, x: Tensor) -> Tensor:
    a = torch.tanh(layer.project_in(x))
    for correction in layer.corrections:
        a = reference_sweep(a, correction.cell, correction.direction)
    return layer.project_out(a)


def gradients(y: Tensor, inputs: list[Tensor], grad: Tensor) -> list[Tensor]:
    found = torch.autograd.grad(y, inputs, grad, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, found, strict=True)]


def assert_matches_reference(layer: SDNLayer, x: Tensor) -> None:
    layer = layer.double()
    x = x.double().requires_grad_()
    inputs = [x, *layer.parameters()]
    y = layer(x)
    expected = reference_layer(layer, x)
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-9)
    grad = torch.randn_like(y)
    for got, want in zip(gradients(y, inputs, grad), gradients(expected, inputs, grad), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("direction", [0, 1, 2, 3])
@pytest.mark.parametrize("size", [(5, 7), (7, 5), (1, 1), (1, 6), (6, 1), (2, 2)])
def test_each_direction_matches_reference(direction: int, size: tuple[int, int]) -> None:
    assert_matches_reference(SDNLayer(2, 3, 4, [direction]), torch.randn(2, 2, *size))


@pytest.mark.parametrize("directions", [[0, 1, 2, 3], [3, 0, 2], [1, 1], []])
def test_stacked_directions_match_reference(directions: list[int]) -> None:
    assert_matches_reference(SDNLayer(2, 3, 4, directions), torch.randn(2, 2, 5, 7))


def test_strided_layer_matches_reference() -> None:
    layer = SDNLayer(2, 3, 4, [0, 2], kernel_size=3, stride=2, padding=1)
    x = torch.randn(2, 2, 9, 6)
    assert layer(x).shape == (2, 3, 5, 3)
    assert_matches_reference(layer, x)


def test_upsampling_layer_matches_reference() -> None:
    layer = SDNLayer(2, 3, 4, [1, 3], kernel_size=4, stride=2, padding=1, upsample=True)
    x = torch.randn(2, 2, 3, 4)
    assert layer(x).shape == (2, 3, 6, 8)
    assert_matches_reference(layer, x)


def test_channels_last_input_gives_the_same_output() -> None:
    layer = SDNLayer(3, 5, 4, [0, 3])
    x = torch.randn(2, 3, 6, 5)
    expected = layer(x)
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), expected)


@pytest.mark.parametrize("direction", [0, 1, 2, 3])
def test_sweep_gradcheck(direction: int) -> None:
    cell = nn.GRUCell(6, 2).double()
    a = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in cell.parameters()]

    def run(a: Tensor, *params: Tensor) -> Tensor:
        return CorrectionSweep.apply(a, *params, direction, torch.float64)

    assert torch.autograd.gradcheck(run, (a, *params))


def downstream(direction: int, source: tuple[int, int], position: tuple[int, int]) -> bool:
    """Whether `position` is reachable from `source` through the 3-neighbour cone of a sweep.

    `steps` counts lines after the source's line in sweep order, `across` the distance along
    the line; each line moves the cone by at most one position to either side.
    """
    (h0, w0), (h, w) = source, position
    steps = {0: w - w0, 1: w0 - w, 2: h - h0, 3: h0 - h}[direction]
    across = abs(h - h0) if direction in (0, 1) else abs(w - w0)
    return (steps == 0 and across == 0) or (steps > 0 and across <= steps)


@pytest.mark.parametrize("direction", [0, 1, 2, 3])
@pytest.mark.parametrize("source", [(0, 0), (2, 3), (4, 5), (1, 5), (4, 0)])
def test_perturbation_changes_only_downstream(direction: int, source: tuple[int, int]) -> None:
    cell = nn.GRUCell(9, 3).double()
    a = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    perturbed = a.clone()
    perturbed[:, :, source[0], source[1]] += 1.0
    with torch.no_grad():
        changed = (sweep(perturbed, cell, direction) != sweep(a, cell, direction)).any(1).any(0)
    expected = torch.tensor([[downstream(direction, source, (h, w)) for w in range(6)] for h in range(5)])
    assert torch.equal(changed, expected)


@pytest.mark.parametrize(("direction", "size"), [(0, (5, 1)), (1, (1, 1)), (2, (1, 5)), (3, (1, 4))])
def test_single_line_sweep_changes_nothing(direction: int, size: tuple[int, int]) -> None:
    cell = nn.GRUCell(9, 3)
    a = torch.randn(2, 3, *size)
    assert torch.equal(sweep(a, cell, direction), a)


def test_res_sdn_layer_gating() -> None:
    layer = ResSDNLayer(3, 4, 5, [0, 1]).double()
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    s, g = reference_layer(layer.sdn, x).split(4, dim=1)
    expected = torch.sigmoid(g) * layer.conv(x) + (1 - torch.sigmoid(g)) * s
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-9)


def test_res_sdn_layer_upsamples_like_a_transposed_conv() -> None:
    layer = ResSDNLayer(3, 4, 5, [2], 4, 2, 1, upsample=True)
    assert isinstance(layer.conv, nn.ConvTranspose2d)
    assert isinstance(layer.sdn.project_in, nn.ConvTranspose2d)
    assert layer(torch.randn(2, 3, 4, 5)).shape == (2, 4, 8, 10)


def test_public_structure() -> None:
    layer = SDNLayer(3, 7, 5, [2, 0, 2])
    assert isinstance(layer.project_in, nn.Conv2d)
    assert isinstance(layer.project_out, nn.Conv2d)
    assert layer.project_out.kernel_size == (1, 1)
    assert isinstance(layer.corrections, nn.ModuleList)
    assert [c.direction for c in layer.corrections] == [2, 0, 2]
    for correction in layer.corrections:
        assert type(correction.direction) is int
        assert isinstance(correction.cell, nn.GRUCell)
        assert correction.cell.weight_ih.shape == (15, 15)
        assert correction.cell.weight_hh.shape == (15, 5)
        assert correction.cell.bias_ih.shape == correction.cell.bias_hh.shape == (15,)
    assert "corrections.1.cell.weight_ih" in layer.state_dict()
    up = SDNLayer(3, 7, 5, [1], 4, 2, 1, upsample=True)
    assert isinstance(up.project_in, nn.ConvTranspose2d)
    res = ResSDNLayer(3, 7, 5, [1])
    assert res.sdn.project_out.out_channels == 14
    assert isinstance(res.conv, nn.Conv2d) and res.conv.out_channels == 7


@pytest.mark.parametrize("layer_type", [SDNLayer, ResSDNLayer])
def test_bfloat16_autocast_is_close_to_float32(layer_type: type[nn.Module]) -> None:
    layer = layer_type(4, 6, 8, [0, 3])
    x = torch.randn(2, 4, 8, 9)
    params = list(layer.parameters())
    y32 = layer(x)
    grads32 = torch.autograd.grad(y32.sum(), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x)
    grads16 = torch.autograd.grad(y16.float().sum(), params)
    torch.testing.assert_close(y16.float(), y32, rtol=0, atol=0.05 * y32.abs().max().item())
    for g16, g32 in zip(grads16, grads32, strict=True):
        assert g16.dtype == torch.float32
        torch.testing.assert_close(g16, g32, rtol=0, atol=0.05 * g32.abs().max().item())


def test_bfloat16_sweep_gradients_reach_the_input() -> None:
    cell = nn.GRUCell(12, 4)
    a = torch.randn(2, 4, 5, 6, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sweep(a, cell, 1)
    y.sum().backward()
    assert y.dtype == torch.float32
    assert a.grad.dtype == torch.bfloat16 and torch.isfinite(a.grad).all()
    assert cell.weight_ih.grad.dtype == torch.float32


def saved_activation_bytes(run: Callable[[], Tensor], parameters: list[Tensor]) -> int:
    """Bytes of distinct storages autograd saves for backward during `run()`, parameters aside."""
    skip = {p.untyped_storage().data_ptr() for p in parameters}
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def test_saves_only_input_and_one_map_per_sweep() -> None:
    directions = [0, 1, 3]
    layer = SDNLayer(8, 8, 16, directions)
    x = torch.randn(2, 8, 12, 10, requires_grad=True)
    parameters = list(layer.parameters())
    saved = saved_activation_bytes(lambda: layer(x), parameters)
    feature_map = 2 * 16 * 12 * 10 * 4
    # x for project_in, tanh's output (the first sweep's input), then each sweep's output
    assert saved <= x.nbytes + (1 + len(directions)) * feature_map
    assert 5 * saved <= saved_activation_bytes(lambda: reference_layer(layer, x), parameters)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"directions": [4]}, "directions"),
        ({"directions": [-1]}, "directions"),
        ({"directions": ["0"]}, "directions"),
        ({"directions": [True]}, "directions"),
        ({"directions": "01"}, "directions"),
        ({"directions": 2}, "directions"),
        ({"num_features": 0}, "num_features"),
        ({"in_channels": 0}, "in_channels"),
        ({"out_channels": 2.0}, "out_channels"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"stride": (1, 0)}, "stride"),
        ({"padding": -1}, "padding"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict, message: str) -> None:
    arguments = {"in_channels": 3, "out_channels": 4, "num_features": 5, "directions": [0]}
    with pytest.raises(ValueError, match=message):
        SDNLayer(**(arguments | kwargs))
    with pytest.raises(ValueError, match=message):
        ResSDNLayer(**(arguments | kwargs))


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        SDNLayer(3, 4, 5, [0])(torch.randn(3, 6, 6))
    with pytest.raises(ValueError, match="direction"):
        sweep(torch.randn(1, 5, 3, 3), nn.GRUCell(15, 5), 4)
    with pytest.raises(ValueError, match=r"\(B, 5, H, W\)"):
        sweep(torch.randn(1, 4, 3, 3), nn.GRUCell(15, 5), 0)


def test_direction_cycle() -> None:
    cycle = DirectionCycle()
    assert cycle.take(3) == [0, 1, 2]
    assert cycle.take(2) == [3, 0]
    assert cycle.take(0) == []
    assert cycle.take(4) == [1, 2, 3, 0]
    assert cycle.take(6) == [1, 2, 3, 0, 1, 2]
    assert cycle.take(1) == [3]
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        cycle.take(-1)
