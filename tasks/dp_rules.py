"""Per-sample gradients from one plain backward pass and a closed-form rule per layer.

DP-SGD needs each sample's gradient. ``torch.func.vmap`` (:mod:`medfed.tasks.dp_vmap`)
vectorizes the whole forward and backward per sample, and Opacus's hooks mode runs
the ordinary backward (which also computes the batch's weight gradients, unused)
and then a rule per layer (``unfold`` + ``einsum`` for convolutions). Here:

1. The forward runs with the parameters frozen and the first layer's output
   marked as needing a gradient, so autograd computes activation gradients only:
   none of the batch weight gradients Opacus's hooks mode computes and discards.
2. A forward hook on each layer with parameters keeps its input; a tensor hook
   on its output keeps the gradient there (what Opacus calls activations and
   backprops).
3. Each layer's per-sample gradients come from a rule: Opacus's own table
   (``GradSampleModule.GRAD_SAMPLERS``, with medfed's PReLU rule) for most layers,
   :mod:`medfed.tasks.dp_samplers`'s faster GroupNorm rule, and for (transposed)
   convolutions the fastest of several exact computations of the weight gradient
   per sample, timed on the first batch per layer shape and remembered:

   - ``"loop"``: the layer's own weight-gradient kernel once per sample (best for
     large maps and kernels: the lesion DenseNet's 7^3 stem);
   - ``"grouped"``: one call of that kernel with the batch as groups (best for the
     UNet's strided 3x3 convolutions, and SegResNet's 3x3x3 ones: 98 ms against 350 ms
     for ``slabs`` on its 16-channel 32^3 level, batch 16);
   - ``"gemm"``: one batched matmul per kernel offset (1x1 convolutions);
   - ``"slabs"`` (stride 1, no dilation): unfold all spatial dims but the first,
     then one batched matmul per offset along it, on views (3x3 on small maps);
   - ``"shifted"`` (stride 1): input and output gradient on one flattened padded
     grid, one batched matmul per offset on a shifted view, no copy per offset
     (the DenseNet's 3x3x3 convolutions);
   - ``"unfold"`` (transposed): :mod:`medfed.tasks.dp_samplers`'s rule.

   Opacus's ``unfold`` copies the input once per kernel offset all at once (27x
   for 3x3x3), which costs more than all of these here.

Measured on CPU (2 threads, batch 16; ``benchmarks/dp_overhead.py``), the lesion
DenseNet's per-sample convolution weight gradients cost about 20 ms a step this way
(15 ms for the batch's own weight gradients) against 73 ms of vmap's batched
convolution backward; most of it is the 7^3 stem (``loop``, 13 ms), and its
3x3x3 convolutions on 10x12x10 maps take 2.3-2.5 ms each with ``shifted`` (5 ms
with ``slabs``). The per-sample gradients equal vmap's and Opacus's (tests);
like Opacus's hooks mode, the rules assume the loss is the mean of per-sample
losses, which :func:`medfed.tasks.dp.choose_grad_sample_mode` checks (against vmap,
or against the samples' own losses) before it picks this mode.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfed.tasks import dp_samplers

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
Rule = Callable[[nn.Module, list[torch.Tensor], torch.Tensor], dict[nn.Parameter, torch.Tensor]]
Method = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
#: Chosen weight-gradient method per convolution shape (see :func:`_conv_method`).
_METHOD: dict[tuple[Any, ...], str] = {}


def _backward_args(layer: nn.Module, dims: int) -> tuple[Any, ...]:
    """``aten.convolution_backward``'s arguments after the weight: the layer's geometry."""
    transposed = isinstance(layer, _CONV_T)
    output_padding = list(layer.output_padding) if transposed else [0] * dims
    return (None, layer.stride, layer.padding, layer.dilation, transposed, output_padding)


def _weight_loop(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The layer's own weight-gradient kernel on one sample at a time."""
    args = _backward_args(layer, x.dim() - 2)
    return torch.stack(
        [
            torch.ops.aten.convolution_backward(
                g[i : i + 1], x[i : i + 1], layer.weight, *args, layer.groups, [False, True, False]
            )[1]
            for i in range(x.shape[0])
        ]
    )


def _weight_grouped(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The batch as groups: one weight-gradient call of the layer with ``n * groups`` groups."""
    n = x.shape[0]
    weight = layer.weight
    # only its shape is read, but a real tensor: an expanded one gave a zero-stride gradient
    grouped = weight.new_empty((n * weight.shape[0], *weight.shape[1:]))
    grad = torch.ops.aten.convolution_backward(
        g.reshape(1, -1, *g.shape[2:]),
        x.reshape(1, -1, *x.shape[2:]),
        grouped,
        *_backward_args(layer, x.dim() - 2),
        layer.groups * n,
        [False, True, False],
    )[1]
    return grad.view(n, *weight.shape)


def _weight_gemm(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """One batched matmul per kernel offset k: ``sum_s g[b, o, s] x[b, i, s*stride + k*dil]``."""
    n, c_in = x.shape[:2]
    spatial = g.shape[2:]
    pads = [p for p in reversed(layer.padding) for _ in (0, 1)]
    xp = F.pad(x, pads) if any(layer.padding) else x
    gf = g.reshape(n, g.shape[1], -1)
    out = x.new_empty((n, g.shape[1], c_in, *layer.kernel_size))
    for k in itertools.product(*(range(size) for size in layer.kernel_size)):
        window = tuple(
            slice(
                k[d] * layer.dilation[d],
                k[d] * layer.dilation[d] + layer.stride[d] * (spatial[d] - 1) + 1,
                layer.stride[d],
            )
            for d in range(len(spatial))
        )
        xk = xp[(slice(None), slice(None), *window)].reshape(n, c_in, -1)
        out[(slice(None), slice(None), slice(None), *k)] = torch.bmm(gf, xk.transpose(1, 2))
    return out


def _weight_slabs(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Stride 1, no dilation: unfold all spatial dims but the first, a matmul per first-dim offset.

    The unfolded copy holds ``prod(k[1:])`` shifted inputs (9 for 3x3x3 instead of
    27); each offset along the first dim is then a slab of it, read without a copy.
    Each matmul writes a contiguous block of a ``(k0, N, O, C, k1..)`` buffer; the
    result is a permuted view of it (writing ``out[..., z, ...]`` in place cost a
    strided copy as large as the result, 7 ms on the wide UNet's deepest layer).
    """
    n, c_in = x.shape[:2]
    c_out = g.shape[1]
    spatial = g.shape[2:]
    kernel = layer.kernel_size
    pads = [p for p in reversed(layer.padding) for _ in (0, 1)]
    t = F.pad(x, pads) if any(layer.padding) else x
    for d in range(1, len(spatial)):  # -> (N, C, P1, S2.., k2..)
        t = t.unfold(2 + d, kernel[d], 1)
    rest = len(spatial) - 1
    order = [0, 1, *range(2 + len(spatial), 2 + len(spatial) + rest), *range(2, 2 + len(spatial))]
    t = t.permute(order).contiguous()  # (N, C, k2.., P1, S2..)
    gf = g.reshape(n, c_out, -1)
    out = x.new_empty((kernel[0], n, c_out, c_in * math.prod(kernel[1:])))
    for z in range(kernel[0]):
        slab = t[(slice(None),) * (2 + rest) + (slice(z, z + spatial[0]),)]
        slab = slab.reshape(n, -1, gf.shape[-1])  # a view: the slab's rows are contiguous
        torch.bmm(gf, slab.transpose(1, 2), out=out[z])
    out = out.view(kernel[0], n, c_out, c_in, *kernel[1:])
    return out.permute(1, 2, 3, 0, *range(4, 4 + rest))  # (N, O, C, k0, k1..), a view


def _weight_shifted(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Stride 1: one batched matmul per kernel offset on shifted views, no unfolded copy.

    The input, zero-padded, is flattened; the output gradient is laid on the same
    grid (zeros in the columns past the output's extent). Offset ``k`` then reads
    the input at one fixed flat shift, a plain view: ``dW[k] = g_grid @ x_flat[shift:]``.
    The zero columns cost extra multiply-adds (``prod(padded[1:]) / prod(out[1:])``,
    1.4x on the DenseNet's 10x12x10 maps) but no copy of the input per offset.
    """
    n, c_in = x.shape[:2]
    c_out = g.shape[1]
    spatial = g.shape[2:]
    dims = len(spatial)
    kernel, dilation, padding = layer.kernel_size, layer.dilation, layer.padding
    read = [s + (k - 1) * d for s, k, d in zip(spatial, kernel, dilation, strict=True)]
    steps = [math.prod(read[i + 1 :]) for i in range(dims)]
    tail = sum((k - 1) * d * st for k, d, st in zip(kernel, dilation, steps, strict=True))
    flat = x.new_zeros((n, c_in, math.prod(read) + tail))  # the tail: the last shifts' overrun
    grid = flat[:, :, : math.prod(read)].view(n, c_in, *read)
    src, dst = [], []  # x at its padding offset, cropped to what the kernel reads
    for i in range(dims):
        lo = max(0, -padding[i])
        hi = min(x.shape[2 + i], read[i] - padding[i])
        src.append(slice(lo, hi))
        dst.append(slice(lo + padding[i], hi + padding[i]))
    grid[(slice(None), slice(None), *dst)] = x[(slice(None), slice(None), *src)]
    g_grid = g.new_zeros((n, c_out, spatial[0], *read[1:]))
    g_grid[(slice(None), slice(None), slice(None), *(slice(0, s) for s in spatial[1:]))] = g
    g_grid = g_grid.view(n, c_out, -1)
    length = g_grid.shape[-1]
    offsets = list(itertools.product(*(range(k) for k in kernel)))
    out = x.new_empty((len(offsets), n, c_out, c_in))
    for index, k in enumerate(offsets):
        shift = sum(kk * d * st for kk, d, st in zip(k, dilation, steps, strict=True))
        torch.bmm(g_grid, flat[:, :, shift : shift + length].transpose(1, 2), out=out[index])
    out = out.view(*kernel, n, c_out, c_in)
    return out.permute(dims, dims + 1, dims + 2, *range(dims))  # (N, O, C, k..), a view


def _weight_unfold_transposed(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Transposed convolutions: medfed's unfold rule (:mod:`medfed.tasks.dp_samplers`)."""
    return dp_samplers.conv_transpose_grad_sample(layer, [x], g)[layer.weight]


_METHODS: dict[str, Method] = {
    "loop": _weight_loop,
    "grouped": _weight_grouped,
    "gemm": _weight_gemm,
    "slabs": _weight_slabs,
    "shifted": _weight_shifted,
    "unfold": _weight_unfold_transposed,
}


def _candidates(layer: nn.Module, spatial: tuple[int, ...]) -> list[str]:
    """The exact methods that apply to ``layer`` on inputs of this spatial shape."""
    # torch 2.13's CPU conv3d weight gradient, its plain one included, is wrong (on one
    # thread) or corrupts the heap when an input is no larger than the kernel; grouped
    # 3D is offered only where every input dim exceeds the kernel's reach, and not for
    # transposed 3D (not checked). (Checked on 1,584 shapes, 1 and 2 threads, against
    # float64: exact wherever that holds.)
    reach = [(k - 1) * d + 1 for k, d in zip(layer.kernel_size, layer.dilation, strict=True)]
    roomy = all(s > r for s, r in zip(spatial, reach, strict=True))
    plain_3d = isinstance(layer, nn.Conv3d) and roomy
    grouped = ["grouped"] if layer.weight.dim() < 5 or plain_3d else []
    if isinstance(layer, _CONV_T):
        return ["loop", *grouped] + (["unfold"] if layer.groups == 1 else [])
    if layer.groups != 1:
        return ["loop", *grouped]
    stride_one = all(s == 1 for s in layer.stride)
    unit = stride_one and all(d == 1 for d in layer.dilation)
    few_offsets = math.prod(layer.kernel_size) <= 27  # one matmul each
    return (
        ["loop", *grouped]
        + (["gemm"] if few_offsets else [])
        + (["slabs"] if unit else [])
        + (["shifted"] if stride_one else [])
    )


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float]:
    """``fn()`` and the seconds it took on ``device`` (CUDA: until its kernels finish)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def wall_time(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes on ``device`` (CUDA: until its kernels finish)."""
    return _timed(fn, device)[1]  # type: ignore[arg-type]


def _conv_method(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> str:
    """The fastest exact method for this layer and input shape, timed once and remembered."""
    key = (
        type(layer),
        tuple(layer.weight.shape),
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
        getattr(layer, "output_padding", None),
        tuple(x.shape[1:]),
        x.device.type,
        torch.get_num_threads(),  # a kernel's result may depend on it: checked per count
    )
    if key not in _METHOD:
        # "loop" is the layer's own kernel, as autograd runs it on one sample: the
        # reference. A method that disagrees with it on this batch is not used.
        first: dict[str, float] = {}
        reference, first["loop"] = _timed(lambda: _METHODS["loop"](layer, x, g), x.device)
        tolerance = 1e-5 * float(reference.abs().max()) + 1e-12
        for m in _candidates(layer, tuple(x.shape[2:])):
            if m != "loop":
                got, seconds = _timed(lambda m=m: _METHODS[m](layer, x, g), x.device)
                if torch.allclose(got, reference, rtol=1e-3, atol=tolerance):
                    first[m] = seconds
        # Each was run once above (a warm-up, cold: hence the wide margin); one more than
        # three times the fastest there is not timed again (on SegResNet's 32^3 level
        # the loop took 10x grouped's time: its first DP round took 23 s with every
        # method timed).
        # Three timed rounds, the methods taking turns, and each method's fastest run
        # decides: a burst of load from another process then slows one run, not a
        # method's every run (a wrong pick for the wide UNet's deepest layer cost 10 ms a
        # step).
        methods = [m for m, t in first.items() if t <= 3 * min(first.values())]
        best = dict.fromkeys(methods, math.inf)
        for _ in range(3):
            for m in methods:
                best[m] = min(best[m], wall_time(lambda m=m: _METHODS[m](layer, x, g), x.device))
        _METHOD[key] = min(methods, key=best.__getitem__)
    return _METHOD[key]


def conv_grad_sample(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a (transposed) convolution's weight and bias."""
    x = activations[0].to(backprops.dtype)
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        out[layer.weight] = _METHODS[_conv_method(layer, x, backprops)](layer, x, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.reshape(*backprops.shape[:2], -1).sum(-1)
    return out


def _rule_for(module: nn.Module) -> Rule | None:
    from opacus.grad_sample import GradSampleModule

    if type(module) in _CONV + _CONV_T:
        # other padding modes pad inside forward: the kept input is not what the kernel saw
        plain = module.padding_mode == "zeros" and not isinstance(module.padding, str)
        return conv_grad_sample if plain else None
    if type(module) is nn.GroupNorm:
        return dp_samplers.group_norm_grad_sample
    return GradSampleModule.GRAD_SAMPLERS.get(type(module))  # PReLU: dp_samplers.register()


def _layers(module: nn.Module) -> list[nn.Module]:
    """The modules that own trainable parameters directly."""
    return [
        m for m in module.modules() if any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def unsupported(module: nn.Module) -> list[str]:
    """Layers with trainable parameters that have no rule here (empty: supported)."""
    dp_samplers.register()
    names = {m: name or "(model)" for name, m in module.named_modules()}
    return [f"{names[m]} ({type(m).__name__})" for m in _layers(module) if _rule_for(m) is None]


def per_sample_grads(
    module: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Set ``p.grad_sample`` (each sample's own loss gradient) on every trainable parameter.

    ``loss_fn`` must average per-sample losses over the batch (as for Opacus's hooks).
    Returns the batch's mean loss (detached).
    """
    dp_samplers.register()
    layers = _layers(module)
    params = [p for p in module.parameters() if p.requires_grad]
    captured: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in layers}

    def keep(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not output.requires_grad:  # parameters frozen: start autograd's graph here
            output.requires_grad_()
        activation = inputs[0].detach()
        output.register_hook(lambda grad: captured[layer].append((activation, grad.detach())))

    handles = [m.register_forward_hook(keep) for m in layers]
    try:
        for p in params:
            p.requires_grad_(False)
        loss = loss_fn(module(x), y)
        (loss * x.shape[0]).backward()  # the mean's gradient times n: each sample's own
    finally:
        for p in params:
            p.requires_grad_(True)
        for h in handles:
            h.remove()
    grads: dict[nn.Parameter, torch.Tensor] = {}
    with torch.no_grad():
        _apply_rules(layers, captured, grads)
    for p in params:  # a parameter the loss did not reach has zero gradients
        p.grad_sample = grads[p] if p in grads else x.new_zeros((x.shape[0], *p.shape))
    return loss.detach()


def _apply_rules(
    layers: list[nn.Module],
    captured: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]],
    grads: dict[nn.Parameter, torch.Tensor],
) -> None:
    for layer in layers:
        rule = _rule_for(layer)
        if rule is None:
            raise TypeError(f"no per-sample gradient rule for {type(layer).__name__}")
        for activation, grad in captured[layer]:  # a layer called twice: its gradients add
            for p, g in rule(layer, [activation], grad).items():
                grads[p] = grads[p] + g if p in grads else g
