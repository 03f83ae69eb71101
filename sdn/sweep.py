"""The SDN correction sweep (docs/maths.md#sweep) as a memory-lean autograd Function.

A sweep over a (B, F, H, W) map visits lines (columns or rows) in order; the first line is
kept, every later line is updated by a GRU cell from its own state and three neighbours on
the line updated just before it. Recording this with autograd line by line keeps about a dozen
feature maps per sweep alive until backward. Here only the sweep's input and output are saved:
from those, every line's neighbours and state are known at once, so backward recomputes all
gates in a few batched products and runs only the gradient recursion into the previous line
sequentially.

Internally a map is held in a canonical "lines" layout (L, B, N, F): L lines in index order,
N positions along a line. In that layout the three neighbours of position n are positions
n-1, n, n+1 of the previous line in sweep order, for all four directions; directions 1 and 3
just visit the lines in reverse.

`reference_sweep` is the same sweep written plainly, one GRU cell call per line with autograd
recording every step: the definition the fused `CorrectionSweep` must equal, and the baseline
the benchmarks time it against.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# direction -> (axis swept along: "columns" or "rows", visits lines in reverse index order)
_SWEEPS = {0: ("columns", False), 1: ("columns", True), 2: ("rows", False), 3: ("rows", True)}
# (B, F, H, W) -> (L, B, N, F) and back
_TO_LINES = {"columns": (3, 0, 2, 1), "rows": (2, 0, 3, 1)}
_FROM_LINES = {"columns": (1, 3, 2, 0), "rows": (1, 3, 0, 2)}


def _lines(x: Tensor, axis: str, dtype: torch.dtype) -> Tensor:
    """`x` in the lines layout as a fresh contiguous tensor (safe to modify in place)."""
    view = x.permute(_TO_LINES[axis])
    return torch.empty(view.shape, dtype=dtype, device=x.device).copy_(view)


def _lines_view(x: Tensor, axis: str, dtype: torch.dtype) -> Tensor:
    """`x` in the lines layout, without a copy when it already is (read-only use)."""
    return x.permute(_TO_LINES[axis]).to(dtype).contiguous()


def _line_order(num_lines: int, reverse: bool) -> tuple[int, slice, slice]:
    """(first line, the updated lines, their previous lines), as index / slices along L."""
    if reverse:
        return num_lines - 1, slice(0, num_lines - 1), slice(1, num_lines)
    return 0, slice(1, num_lines), slice(0, num_lines - 1)


# fused g * (1 - y^2) and g * y * (1 - y), written into a given tensor
_tanh_backward = torch.ops.aten.tanh_backward.grad_input
_sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input


def _no_autocast(device: torch.device):
    # The sweep runs in one dtype chosen up front; autocast must not re-cast its products.
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


class CorrectionSweep(torch.autograd.Function):
    """One correction sweep; saves only its input and output for backward."""

    @staticmethod
    def forward(ctx, x, weight_ih, weight_hh, bias_ih, bias_hh, direction, dtype):
        axis, reverse = _SWEEPS[direction]
        with _no_autocast(x.device):
            w_ih, w_hh, b_ih, b_hh = (p.to(dtype) for p in (weight_ih, weight_hh, bias_ih, bias_hh))
            a = _lines_view(x, axis, dtype)
            num_lines, batch, length, features = a.shape
            rows = batch * length
            first, rest, prev = _line_order(num_lines, reverse)
            out = torch.empty_like(a)
            out[first] = a[first]
            # The hidden-side products do not depend on the sweep: one product for all lines.
            # `pre` starts as [gh_r + b_ir, gh_z + b_iz, b_in]; each line then adds its input
            # product in place, which leaves r, z pre-activations and gi_n.
            h = a[rest].view(-1, features)
            pre = a.new_empty(h.shape[0], 3 * features)
            rz = slice(0, 2 * features)
            torch.addmm(b_ih[rz] + b_hh[rz], h, w_hh[rz].t(), out=pre[:, rz])
            pre[:, 2 * features :] = b_ih[2 * features :]
            pre = pre.view(num_lines - 1, rows, 3 * features)
            gh_n = torch.addmm(b_hh[2 * features :], h, w_hh[2 * features :].t())
            # Neighbour buffer [line[n-1]; line[n]; line[n+1]]: the zero padding is written once.
            u = a.new_zeros(batch, length, 3 * features)
            u_left, u_mid, u_right = (
                u[:, 1:, :features],
                u[:, :, features : 2 * features],
                u[:, :-1, 2 * features :],
            )
            n = a.new_empty(rows, features)
            # Per-line views made up front: slicing inside the loop costs more than the math
            # on small maps.
            steps = list(
                zip(
                    out[prev].unbind(0),
                    out[prev][:, :, :-1].unbind(0),
                    out[prev][:, :, 1:].unbind(0),
                    pre.unbind(0),
                    pre[..., : 2 * features].unbind(0),
                    pre[..., :features].unbind(0),
                    pre[..., features : 2 * features].unbind(0),
                    pre[..., 2 * features :].unbind(0),
                    gh_n.view(num_lines - 1, rows, features).unbind(0),
                    a[rest].view(num_lines - 1, rows, features).unbind(0),
                    out[rest].view(num_lines - 1, rows, features).unbind(0),
                    strict=True,
                )
            )
            u_rows, w_ih_t = u.view(rows, -1), w_ih.t()
            for p_mid, p_left, p_right, pre_line, pre_rz, r, z, gi_n, gh_n_line, h_line, o in (
                reversed(steps) if reverse else steps
            ):
                u_mid.copy_(p_mid)
                u_left.copy_(p_left)
                u_right.copy_(p_right)
                pre_line.addmm_(u_rows, w_ih_t)
                pre_rz.sigmoid_()
                torch.addcmul(gi_n, r, gh_n_line, out=n).tanh_()
                torch.lerp(n, h_line, z, out=o)  # (1 - z) * n + z * h
        y = out.permute(_FROM_LINES[axis])
        ctx.save_for_backward(x, y, weight_ih, weight_hh, bias_ih, bias_hh)
        ctx.direction = direction
        ctx.dtype = dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, y, weight_ih, weight_hh, bias_ih, bias_hh = ctx.saved_tensors
        axis, reverse = _SWEEPS[ctx.direction]
        dtype = ctx.dtype
        with _no_autocast(x.device):
            w_ih, w_hh, b_ih, b_hh = (p.to(dtype) for p in (weight_ih, weight_hh, bias_ih, bias_hh))
            a = _lines_view(x, axis, dtype)
            out = _lines_view(y, axis, dtype)
            # grad flowing into each output line; the recursion adds into it in place
            g = _lines(grad_y, axis, dtype)
            num_lines, batch, length, features = a.shape
            rows = batch * length
            _, rest, prev = _line_order(num_lines, reverse)

            # Recompute every updated line's gates at once from the saved input and output.
            # Large fresh tensors are costly on CPU (page faults), so intermediates are written
            # in place into the few buffers below.
            p = out[prev]
            u = p.new_empty(*p.shape[:-1], 3 * features)
            u[..., features : 2 * features] = p
            u[..., 1:, :features] = p[..., :-1, :]
            u[..., 0, :features] = 0
            u[..., :-1, 2 * features :] = p[..., 1:, :]
            u[..., -1, 2 * features :] = 0
            u = u.view(-1, 3 * features)
            h = a[rest].view(-1, features)
            gi = torch.addmm(b_ih, u, w_ih.t())
            gh = torch.addmm(b_hh, h, w_hh.t())
            rz = gh[:, : 2 * features].add_(gi[:, : 2 * features]).sigmoid_()
            r, z = rz[:, :features], rz[:, features:]
            gh_n = gh[:, 2 * features :]
            n = gi[:, 2 * features :].addcmul_(r, gh_n).tanh_()

            # d out = g  =>  d_gi = g * [c_r, c_z, c_n] per position (pre-activation gates):
            # c_n = (1 - z)(1 - n^2), c_z = (h - n) z (1 - z), c_r = c_n gh_n r (1 - r).
            # They take the place of gi_r, gi_z (consumed above) and n, in this order.
            coeff = gi.view(-1, 3, features)
            c_r, c_z, c_n = coeff.unbind(1)
            _sigmoid_backward(torch.sub(h, n, out=c_z), z, grad_input=c_z)
            _tanh_backward(torch.sub(z.new_ones(()), z, out=c_r), n, grad_input=c_n)
            _sigmoid_backward(torch.mul(c_n, gh_n, out=c_r), r, grad_input=c_r)
            coeff = coeff.view(num_lines - 1, batch, length, 3, features)

            # The only sequential part: the gradient into the previous line, in reverse sweep
            # order. Afterwards `coeff` holds d_gi of every updated line.
            du = a.new_empty(batch, length, 3 * features)
            du_rows = du.view(rows, -1)
            # d prev[m] = du_1[m + 1] + du_2[m] + du_3[m - 1]
            du_left, du_mid, du_right = (
                du[:, 1:, :features],
                du[:, :, features : 2 * features],
                du[:, :-1, 2 * features :],
            )
            steps = list(
                zip(
                    coeff.unbind(0),
                    coeff.view(num_lines - 1, rows, 3 * features).unbind(0),
                    g[rest].unsqueeze(-2).unbind(0),
                    g[prev].unbind(0),
                    g[prev][:, :, :-1].unbind(0),
                    g[prev][:, :, 1:].unbind(0),
                    strict=True,
                )
            )
            for d_gi, d_gi_rows, g_line, g_mid, g_left, g_right in steps if reverse else reversed(steps):
                d_gi.mul_(g_line)
                torch.mm(d_gi_rows, w_ih, out=du_rows)
                g_mid.add_(du_mid)
                g_left.add_(du_left)
                g_right.add_(du_right)

            d_gi = coeff.view(-1, 3 * features)
            grad_w_ih = (d_gi.t() @ u).to(weight_ih.dtype)
            grad_b_ih = d_gi.sum(0).to(bias_ih.dtype)
            d_gh = d_gi  # d_gh equals d_gi except for the n gate, which is scaled by r
            d_gh[:, 2 * features :].mul_(r)
            grad_w_hh = (d_gh.t() @ h).to(weight_hh.dtype)
            grad_b_hh = d_gh.sum(0).to(bias_hh.dtype)

            # d a = g z + d_gh W_hh on updated lines; the first line passes g through unchanged
            g[rest].view(-1, features).mul_(z).addmm_(d_gh, w_hh)
        grad_x = g.permute(_FROM_LINES[axis]).to(x.dtype)
        return grad_x, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, None, None


def sweep(a: Tensor, cell: nn.GRUCell, direction: int) -> Tensor:
    """Apply one correction sweep of `cell` over `a` (B, F, H, W) in `direction` (0..3).

    Under autocast with a lower-precision input the sweep computes and returns float32 (its
    long recurrence is where low precision hurts); otherwise it keeps `a.dtype`.
    """
    if direction not in _SWEEPS:
        raise ValueError(f"direction must be one of 0, 1, 2, 3, got {direction!r}")
    if a.dim() != 4 or a.shape[1] != cell.hidden_size:
        raise ValueError(
            f"sweep expects a (B, {cell.hidden_size}, H, W) map for this cell, got {tuple(a.shape)}"
        )
    if cell.bias_ih is None:
        raise ValueError("the correction cell needs biases: build it as nn.GRUCell(3F, F)")
    dtype = a.dtype
    # (a device without autocast, such as `meta`, cannot even be asked whether it is on)
    autocast = torch.amp.is_autocast_available(a.device.type) and torch.is_autocast_enabled(a.device.type)
    if autocast and a.dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    axis, _ = _SWEEPS[direction]
    if a.shape[3 if axis == "columns" else 2] == 1:
        return a.to(dtype)  # a single line: the sweep leaves it unchanged
    return CorrectionSweep.apply(
        a, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, direction, dtype
    )


def reference_sweep(a: Tensor, cell: nn.GRUCell, direction: int) -> Tensor:
    """The sweep as its definition reads (docs/maths.md#sweep): lines visited in sweep order, the
    first kept, each later line updated by one `cell` call from its own values and the values at
    positions n-1, n, n+1 of the line updated just before it (zero beyond either end).

    What `sweep` must equal, in value and gradient; plain autograd, so it keeps every line's
    intermediate values for backward."""
    axis, reverse = _SWEEPS[direction]
    dim = 3 if axis == "columns" else 2
    lines = a.unbind(dim)  # each (B, F, N)
    if reverse:
        lines = lines[::-1]
    outputs = [lines[0]]
    for line in lines[1:]:
        previous = F.pad(outputs[-1], (1, 1))
        neighbours = torch.cat([previous[..., :-2], previous[..., 1:-1], previous[..., 2:]], dim=1)
        batch, features, length = line.shape
        updated = cell(
            neighbours.permute(0, 2, 1).reshape(-1, 3 * features),
            line.permute(0, 2, 1).reshape(-1, features),
        )
        outputs.append(updated.view(batch, length, features).permute(0, 2, 1))
    if reverse:
        outputs = outputs[::-1]
    return torch.stack(outputs, dim=dim)
