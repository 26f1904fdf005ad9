"""gpudl's functional API: the same names, arguments and defaults as `torch.nn.functional`.

Every op validates its arguments (raising ValueError/TypeError that name the argument, what it
got and what was expected), normalizes them (tuples, explicit padding, resolved scale), then runs
either our Triton kernel (`gpudl.kernels`, as a `torch.ops.gpudl` custom op) or the PyTorch
reference (`gpudl.reference`), as `gpudl.backend` decides. Models call these, never
`torch.nn.functional`, so switching backend changes no model code.

Inside `torch.autocast` each op behaves as its `torch.nn.functional` twin does: the `@autocast`
line above each op states its class, per device type, as PyTorch's own autocast op lists do, and
both backends follow it:
    lower_precision  floating inputs cast to the autocast dtype (convolutions, linear, attention, rnn)
    float32          floating inputs cast to float32, float32 result (losses; norms on CUDA)
    input_dtype      computed in float32, the result in the input's dtype (what CPU autocast
                     does for layer_norm and softplus, which are on none of its lists)
    none             run as given (max_pool2d: it keeps its input's dtype; sgd_step)
Outside autocast, mismatched dtypes are an error that names the arguments.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

from gpudl import backend, reference
from gpudl.reference import ACTIVATIONS

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- validation helpers
def _check_tensor(name: str, t, ndims: Sequence[int] | None = None, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndims is not None and t.dim() not in ndims:
        expected = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {expected}, got shape {tuple(t.shape)} ({t.dim()}-D)")
    if floating and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32, float64), got {t.dtype}")


def _check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put them on one device")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; they must match")


def _pair(name: str, value, minimum: int) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(value)}")
    return int(value[0]), int(value[1])


def _check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_reduction(reduction) -> None:
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


_CANDIDATES: dict[str, dict] = {}


def _candidates(op: str) -> dict:
    """Both sides of `op`, for the `auto` backend to time: the Triton entry and the reference."""
    if op not in _CANDIDATES:

        def triton(*args):
            from gpudl.kernels import registry

            return registry.REGISTRY[op].triton(*args)

        _CANDIDATES[op] = {"triton": triton, "torch": getattr(reference, op)}
    return _CANDIDATES[op]


def _dispatch(op: str, tensors: list, args: tuple):
    """Run the Triton kernel registered for `op`, or `gpudl.reference.<op>`, with the same
    normalized args, as `gpudl.backend.resolve` decides (under `auto` on a GPU: the measured
    winner for this call's key). Arguments the kernel's spec declares unsupported run on the
    reference, with a one-time warning pointing at the caller."""
    side = backend.resolve(op, tensors, args, _candidates(op))
    if side == "triton":
        from gpudl.kernels import registry

        spec = registry.REGISTRY[op]
        reason = spec.unsupported(*args) if spec.unsupported is not None else None
        if reason is None:
            if not torch.compiler.is_compiling():
                backend.note_call(op, "triton")
            return spec.triton(*args)
        registry.fall_back(op, reason)
        side = "torch (unsupported: " + reason + ")"
    if not torch.compiler.is_compiling():
        backend.note_call(op, side)
    return getattr(reference, op)(*args)


# --------------------------------------------------------------------------- autocast policy
AUTOCAST_CLASSES = ("lower_precision", "float32", "input_dtype", "none")


def _tensors_in(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a


def autocast_class(cuda: str, cpu: str | None = None):
    """Decorator stating an op's autocast class on CUDA and on the CPU (default: the same).

    Inside `torch.autocast` for the device of the op's tensors, the op's floating-point tensor
    arguments are cast as its class says before anything else runs, so validation, the backend
    choice and both backends see the cast tensors; autograd records the casts, so gradients come
    back in each argument's own dtype. Outside autocast it adds nothing."""
    classes = {"cuda": cuda, "cpu": cuda if cpu is None else cpu}
    for name in classes.values():
        if name not in AUTOCAST_CLASSES:
            raise ValueError(f"autocast class must be one of {AUTOCAST_CLASSES}, got {name!r}")

    def decorate(fn):
        @functools.wraps(fn)
        def op(*args, **kwargs):
            first = next(_tensors_in(args, kwargs), None)
            if first is None:
                return fn(*args, **kwargs)
            device_type = first.device.type
            policy = classes.get(device_type, "none")
            if policy == "none" or not torch.is_autocast_enabled(device_type):
                return fn(*args, **kwargs)
            dtype = torch.get_autocast_dtype(device_type) if policy == "lower_precision" else torch.float32

            def cast(a):
                return a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a

            out = fn(*(cast(a) for a in args), **{k: cast(v) for k, v in kwargs.items()})
            if policy == "input_dtype" and first.is_floating_point() and out.dtype != first.dtype:
                out = out.to(first.dtype)
            return out

        op.autocast_classes = classes
        return op

    return decorate


# --------------------------------------------------------------------------- convolution
def _batched_conv_input(input, weight, groups):
    """The checks every convolution shares; returns (input as [N, C, H, W], whether it was unbatched)."""
    _check_tensor("input", input, (3, 4))
    _check_tensor("weight", weight, (4,))
    _check_same("weight", weight, "input", input)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    unbatched = input.dim() == 3
    return (input.unsqueeze(0) if unbatched else input), unbatched


@autocast_class("lower_precision")
def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, activation=None):
    """2-D convolution followed by a fused activation, as `F.conv2d` then `activation`.

    input [N, C_in, H, W] or unbatched [C_in, H, W]; weight [C_out, C_in/groups, kH, kW];
    bias [C_out] or None; padding an int, a pair, 'same' or 'valid'.
    Returns [N, C_out, H_out, W_out] (or [C_out, H_out, W_out] for unbatched input).
    """
    x, unbatched = _batched_conv_input(input, weight, groups)
    c_out, c_in_per_group, kh, kw = weight.shape
    if x.shape[1] != c_in_per_group * groups:
        raise ValueError(
            f"input has {x.shape[1]} channels (shape {tuple(input.shape)}) but weight {tuple(weight.shape)} "
            f"with groups={groups} expects {c_in_per_group * groups}"
        )
    if c_out % groups != 0:
        raise ValueError(f"weight has {c_out} output channels, which groups={groups} does not divide")
    if c_in_per_group == 0:  # F.conv2d returns a shape that ignores weight's C_out here
        raise ValueError(f"weight {tuple(weight.shape)} has no input channels; a convolution needs at least one")
    if bias is not None:
        _check_tensor("bias", bias, (1,))
        _check_same("bias", bias, "input", input)
        if bias.shape[0] != c_out:
            raise ValueError(
                f"bias must have shape ({c_out},) to match weight {tuple(weight.shape)}, got {tuple(bias.shape)}"
            )
    stride = _pair("stride", stride, 1)
    dilation = _pair("dilation", dilation, 1)
    if isinstance(padding, str):
        if padding == "valid":
            pad4 = (0, 0, 0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(
                    f"padding='same' needs stride 1, got stride={stride} (as in torch.nn.functional.conv2d)"
                )
            total_h, total_w = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
            pad4 = (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)
        else:
            raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    else:
        ph, pw = _pair("padding", padding, 0)
        pad4 = (ph, ph, pw, pw)
    _check_activation(activation)
    h_eff = x.shape[2] + pad4[0] + pad4[1] - dilation[0] * (kh - 1)
    w_eff = x.shape[3] + pad4[2] + pad4[3] - dilation[1] * (kw - 1)
    if h_eff < 1 or w_eff < 1:
        raise ValueError(
            f"input spatial size {tuple(x.shape[2:])} with padding {pad4} is smaller than the dilated kernel "
            f"({dilation[0] * (kh - 1) + 1}, {dilation[1] * (kw - 1) + 1})"
        )
    out = _dispatch("conv2d", [x, weight, bias], (x, weight, bias, stride, pad4, dilation, groups, activation))
    return out.squeeze(0) if unbatched else out


@autocast_class("lower_precision")
def conv_transpose2d(
    input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, activation=None
):
    """Transposed 2-D convolution followed by a fused activation, as `F.conv_transpose2d` then
    `activation` (the same argument order: output_padding before groups, dilation last).

    input [N, C_in, H, W] or unbatched [C_in, H, W]; weight [C_in, C_out/groups, kH, kW];
    bias [C_out] or None. Returns [N, C_out, H_out, W_out] with
    H_out = (H - 1) * stride - 2 * padding + dilation * (kH - 1) + output_padding + 1.
    """
    x, unbatched = _batched_conv_input(input, weight, groups)
    c_in, c_out_per_group, kh, kw = weight.shape
    if x.shape[1] != c_in:
        raise ValueError(
            f"input has {x.shape[1]} channels (shape {tuple(input.shape)}) but weight {tuple(weight.shape)} "
            f"expects {c_in} (a transposed convolution's weight is [C_in, C_out/groups, kH, kW])"
        )
    if c_in % groups != 0:
        raise ValueError(f"weight has {c_in} input channels, which groups={groups} does not divide")
    if c_out_per_group == 0:
        raise ValueError(f"weight {tuple(weight.shape)} has no output channels; a convolution needs at least one")
    c_out = c_out_per_group * groups
    if bias is not None:
        _check_tensor("bias", bias, (1,))
        _check_same("bias", bias, "input", input)
        if bias.shape[0] != c_out:
            raise ValueError(
                f"bias must have shape ({c_out},) to match weight {tuple(weight.shape)} with "
                f"groups={groups}, got {tuple(bias.shape)}"
            )
    stride = _pair("stride", stride, 1)
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int or a pair of ints for a transposed convolution, got {padding!r}")
    padding = _pair("padding", padding, 0)
    output_padding = _pair("output_padding", output_padding, 0)
    dilation = _pair("dilation", dilation, 1)
    for op_, s, d in zip(output_padding, stride, dilation):
        if op_ >= max(s, d):
            raise ValueError(
                f"output_padding {output_padding} must be smaller than stride {stride} or dilation {dilation} "
                "in each dimension (as in torch.nn.functional.conv_transpose2d)"
            )
    _check_activation(activation)
    out_size = tuple(
        (size - 1) * s - 2 * p + d * (k - 1) + op_ + 1
        for size, s, p, d, k, op_ in zip(x.shape[2:], stride, padding, dilation, (kh, kw), output_padding)
    )
    if min(out_size) < 1:
        raise ValueError(
            f"input spatial size {tuple(x.shape[2:])} with stride {stride}, padding {padding}, dilation {dilation} "
            f"and kernel ({kh}, {kw}) gives an output of size {out_size}; every size must be >= 1"
        )
    out = _dispatch(
        "conv_transpose2d",
        [x, weight, bias],
        (x, weight, bias, stride, padding, output_padding, groups, dilation, activation),
    )
    return out.squeeze(0) if unbatched else out


@autocast_class("none")
def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """Max pooling, as `F.max_pool2d` (return_indices is not offered). input [N, C, H, W] or [C, H, W]."""
    _check_tensor("input", input, (3, 4))
    kernel_size = _pair("kernel_size", kernel_size, 1)
    stride = kernel_size if stride is None else _pair("stride", stride, 1)
    padding = _pair("padding", padding, 0)
    dilation = _pair("dilation", dilation, 1)
    if padding[0] > kernel_size[0] // 2 or padding[1] > kernel_size[1] // 2:
        raise ValueError(f"padding {padding} must be at most half of kernel_size {kernel_size}")
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    out_size = tuple(
        (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
        for size, k, s, p, d in zip(x.shape[2:], kernel_size, stride, padding, dilation)
    )
    if min(out_size) < 1:
        raise ValueError(
            f"input spatial size {tuple(x.shape[2:])} with kernel_size {kernel_size}, padding {padding} and "
            f"dilation {dilation} gives output size {out_size}; it must be at least 1"
        )
    out = _dispatch("max_pool2d", [x], (x, kernel_size, stride, padding, dilation, bool(ceil_mode)))
    return out.squeeze(0) if unbatched else out


# --------------------------------------------------------------------------- linear
@autocast_class("lower_precision")
def linear(input, weight, bias=None, activation=None):
    """`F.linear` followed by a fused activation. input [..., in]; weight [out, in]; bias [out] or None."""
    _check_tensor("input", input)
    _check_tensor("weight", weight, (2,))
    _check_same("weight", weight, "input", input)
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (the features), got a 0-D tensor")
    if input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"input has {input.shape[-1]} features (shape {tuple(input.shape)}) but weight {tuple(weight.shape)} "
            f"expects {weight.shape[1]}"
        )
    if bias is not None:
        _check_tensor("bias", bias, (1,))
        _check_same("bias", bias, "input", input)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"bias must have shape ({weight.shape[0]},) to match weight {tuple(weight.shape)}, "
                f"got {tuple(bias.shape)}"
            )
    _check_activation(activation)
    return _dispatch("linear", [input, weight, bias], (input, weight, bias, activation))


# --------------------------------------------------------------------------- attention
@autocast_class("lower_precision")
def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """Attention softmax(q kᵀ · scale + mask) v, as `F.scaled_dot_product_attention`.

    query [B, H, Lq, D] or [B, Lq, D]; key [B, H, Lk, D] or [B, Lk, D]; value likewise with Dv;
    attn_mask None, bool (True = attend) or float (added to the scores), broadcastable to
    [B, H, Lq, Lk]. Returns [B, H, Lq, Dv] (or [B, Lq, Dv] for 3-D inputs).
    """
    _check_tensor("query", query, (3, 4))
    _check_tensor("key", key, (query.dim(),))
    _check_tensor("value", value, (query.dim(),))
    _check_same("key", key, "query", query)
    _check_same("value", value, "query", query)
    three_d = query.dim() == 3
    q, k, v = (t.unsqueeze(1) for t in (query, key, value)) if three_d else (query, key, value)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"query head dim {q.shape[-1]} (shape {tuple(query.shape)}) != "
            f"key head dim {k.shape[-1]} (shape {tuple(key.shape)})"
        )
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree in every dim but the last")
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must agree in batch and heads")
    batch, heads, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    mask = None
    if attn_mask is not None:
        if is_causal:
            raise ValueError("pass either attn_mask or is_causal=True, not both (as in torch.nn.functional)")
        _check_tensor("attn_mask", attn_mask, floating=False)
        if attn_mask.dtype != torch.bool:
            _check_tensor("attn_mask", attn_mask)
            _check_same("attn_mask", attn_mask, "query", query)
        else:
            _check_same("attn_mask", attn_mask, "query", query, dtype=False)
        target = (batch, heads, lq, lk)
        m = attn_mask
        if three_d and m.dim() == 3:
            m = m.unsqueeze(1)  # [B, Lq, Lk] pairs with 3-D q/k/v: heads is the inserted dim
        try:
            mask = m.expand(target) if m.dim() <= 4 else None
        except RuntimeError:
            mask = None
        if mask is None:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {target} (batch, heads, Lq, Lk)"
            )
    out = _dispatch(
        "scaled_dot_product_attention",
        [q, k, v, mask],
        (q, k, v, mask, float(dropout_p), bool(is_causal), float(scale)),
    )
    return out.squeeze(1) if three_d else out


# --------------------------------------------------------------------------- losses
def _check_pair_shapes(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.shape != ref.shape:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}; they must match"
        )


def _check_broadcastable(name: str, t: torch.Tensor, to: torch.Size) -> None:
    try:
        torch.broadcast_shapes(t.shape, to)
        ok = torch.broadcast_shapes(t.shape, to) == to
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to the input shape {tuple(to)}")


@autocast_class("float32")
def binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean", pos_weight=None):
    """Numerically stable BCE on logits, as `F.binary_cross_entropy_with_logits`."""
    _check_tensor("input", input)
    _check_tensor("target", target)
    _check_same("target", target, "input", input)
    _check_pair_shapes("target", target, "input", input)
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is not None:
            _check_tensor(name, t)
            _check_same(name, t, "input", input)
            _check_broadcastable(name, t, input.shape)
    _check_reduction(reduction)
    return _dispatch(
        "binary_cross_entropy_with_logits",
        [input, target, weight, pos_weight],
        (input, target, weight, reduction, pos_weight),
    )


@autocast_class("float32", cpu="input_dtype")
def gan_discriminator_loss(real_logits, fake_logits):
    """Discriminator loss: mean softplus(-real) + mean softplus(fake). Shapes may differ."""
    _check_tensor("real_logits", real_logits)
    _check_tensor("fake_logits", fake_logits)
    _check_same("fake_logits", fake_logits, "real_logits", real_logits)
    return _dispatch("gan_discriminator_loss", [real_logits, fake_logits], (real_logits, fake_logits))


@autocast_class("float32", cpu="input_dtype")
def gan_generator_loss(fake_logits):
    """Non-saturating generator loss: mean softplus(-fake)."""
    _check_tensor("fake_logits", fake_logits)
    return _dispatch("gan_generator_loss", [fake_logits], (fake_logits,))


@autocast_class("float32")
def mse_loss(input, target, reduction="mean"):
    """Mean squared error, as `F.mse_loss` (shapes must match: no silent broadcasting)."""
    _check_tensor("input", input)
    _check_tensor("target", target)
    _check_same("target", target, "input", input)
    _check_pair_shapes("target", target, "input", input)
    _check_reduction(reduction)
    return _dispatch("mse_loss", [input, target], (input, target, reduction))


@autocast_class("float32")
def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """Softmax cross-entropy on logits, as `F.cross_entropy`. input [N, C] (or [N, C, d...]);
    target class indices [N] (int64) or class probabilities shaped like input."""
    _check_tensor("input", input, floating=True)
    _check_tensor("target", target, floating=False)
    if input.dim() < 1:
        raise ValueError("input must be at least 1-D (the classes), got a 0-D tensor")
    if target.is_floating_point():
        _check_same("target", target, "input", input)
        _check_pair_shapes("target", target, "input", input)
    else:
        if target.dtype != torch.int64:
            raise TypeError(f"target must hold int64 class indices or float probabilities, got {target.dtype}")
        _check_same("target", target, "input", input, dtype=False)
        expected = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
        if target.shape != expected:
            raise ValueError(
                f"target of class indices must have shape {tuple(expected)} for input {tuple(input.shape)}, "
                f"got {tuple(target.shape)}"
            )
    num_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    if weight is not None:
        _check_tensor("weight", weight, (1,))
        _check_same("weight", weight, "input", input)
        if weight.shape[0] != num_classes:
            raise ValueError(f"weight must have shape ({num_classes},), one per class, got {tuple(weight.shape)}")
    _check_reduction(reduction)
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    return _dispatch(
        "cross_entropy",
        [input, target, weight],
        (input, target, weight, int(ignore_index), reduction, float(label_smoothing)),
    )


# --------------------------------------------------------------------------- recurrence
@autocast_class("lower_precision")
def rnn(input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, nonlinearity="tanh", batch_first=False):
    """One Elman RNN layer over a whole sequence, as one layer of `torch.nn.RNN`.

    input [L, N, H_in] ([N, L, H_in] if batch_first) or unbatched [L, H_in]; hx [N, H] (or [1, N, H],
    or [H] when unbatched, or None for zeros); weight_ih [H, H_in]; weight_hh [H, H]; biases [H].
    Returns (output [L, N, H] or [N, L, H] or [L, H], h_n [N, H] or [H]).
    """
    _check_tensor("input", input, (2, 3))
    _check_tensor("weight_ih", weight_ih, (2,))
    _check_tensor("weight_hh", weight_hh, (2,))
    for name, t in (("weight_ih", weight_ih), ("weight_hh", weight_hh)):
        _check_same(name, t, "input", input)
    hidden = weight_hh.shape[0]
    if weight_hh.shape != (hidden, hidden):
        raise ValueError(f"weight_hh must be square [H, H], got {tuple(weight_hh.shape)}")
    if weight_ih.shape[0] != hidden:
        raise ValueError(
            f"weight_ih must have {hidden} rows to match weight_hh {tuple(weight_hh.shape)}, "
            f"got {tuple(weight_ih.shape)}"
        )
    if input.shape[-1] != weight_ih.shape[1]:
        raise ValueError(
            f"input has {input.shape[-1]} features (shape {tuple(input.shape)}) but weight_ih "
            f"{tuple(weight_ih.shape)} expects {weight_ih.shape[1]}"
        )
    for name, b in (("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        if b is not None:
            _check_tensor(name, b, (1,))
            _check_same(name, b, "input", input)
            if b.shape[0] != hidden:
                raise ValueError(f"{name} must have shape ({hidden},), got {tuple(b.shape)}")
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    unbatched = input.dim() == 2
    x = input.unsqueeze(0 if batch_first else 1) if unbatched else input
    batch = x.shape[0] if batch_first else x.shape[1]
    if hx is None:
        h0 = x.new_zeros(batch, hidden)
    else:
        _check_tensor("hx", hx, (1, 2, 3))
        _check_same("hx", hx, "input", input)
        h0 = hx.reshape(-1, hx.shape[-1]) if hx.dim() != 1 else hx.unsqueeze(0)
        if h0.shape != (batch, hidden) or (hx.dim() == 3 and hx.shape[0] != 1):
            raise ValueError(
                f"hx must have shape ({batch}, {hidden}) (or (1, {batch}, {hidden})), got {tuple(hx.shape)}"
            )
    output, h_n = _dispatch(
        "rnn",
        [x, h0, weight_ih, weight_hh, bias_ih, bias_hh],
        (x, h0, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity, bool(batch_first)),
    )
    if unbatched:
        return output.squeeze(0 if batch_first else 1), h_n.squeeze(0)
    return output, h_n


# --------------------------------------------------------------------------- optimizer update
def check_sgd_hyperparameters(lr, momentum, dampening, weight_decay, nesterov) -> None:
    """torch.optim.SGD's checks and messages, shared by gpudl.optim.SGD and sgd_step."""
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


@autocast_class("none")
def sgd_step(
    params,
    grads,
    momentum_buffers=None,
    lr=1e-3,
    momentum=0.0,
    dampening=0.0,
    weight_decay=0.0,
    nesterov=False,
    maximize=False,
    inplace=True,
):
    """One torch.optim.SGD update of many tensors at once (what `gpudl.optim.SGD.step` runs).

    params, grads: sequences of tensors, grads[i] with params[i]'s shape, dtype and device (dense);
    momentum_buffers: None or a sequence of tensors shaped like params, None entries meaning "no
    buffer yet" (that tensor's first momentum step); lr: float or 1-element tensor.
    inplace=True updates params and buffers in place; False returns new tensors.
    Returns (params, momentum_buffers) as lists (buffers all None when momentum == 0).
    """
    if not isinstance(params, (list, tuple)) or not isinstance(grads, (list, tuple)):
        raise TypeError(
            "params and grads must be lists or tuples of tensors, "
            f"got {type(params).__name__} and {type(grads).__name__}"
        )
    if len(grads) != len(params):
        raise ValueError(f"grads must have one tensor per parameter: got {len(grads)} grads for {len(params)} params")
    if momentum_buffers is None:
        momentum_buffers = [None] * len(params)
    elif not isinstance(momentum_buffers, (list, tuple)) or len(momentum_buffers) != len(params):
        raise ValueError(
            f"momentum_buffers must be None or a list with one entry (tensor or None) per parameter ({len(params)})"
        )
    for i, (p, g, b) in enumerate(zip(params, grads, momentum_buffers)):
        _check_tensor(f"params[{i}]", p)
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"grads[{i}] must be a torch.Tensor, got {type(g).__name__}")
        if g.is_sparse or p.is_sparse:
            raise TypeError(f"grads[{i}] is sparse; sgd_step supports dense gradients only")
        _check_same(f"grads[{i}]", g, f"params[{i}]", p)
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but params[{i}] has shape {tuple(p.shape)}")
        if b is not None and momentum != 0:
            if not isinstance(b, torch.Tensor):
                raise TypeError(f"momentum_buffers[{i}] must be a torch.Tensor or None, got {type(b).__name__}")
            _check_same(f"momentum_buffers[{i}]", b, f"params[{i}]", p)
            if b.shape != p.shape:
                raise ValueError(
                    f"momentum_buffers[{i}] has shape {tuple(b.shape)} but params[{i}] has shape {tuple(p.shape)}"
                )
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        lr = lr.item()
    for name, value in (("lr", lr), ("momentum", momentum), ("dampening", dampening), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"{name} must be a finite number, got {value!r}")
    check_sgd_hyperparameters(lr, momentum, dampening, weight_decay, nesterov)
    if not params:
        return [], []

    return _dispatch(
        "sgd_step",
        list(params) + list(grads),
        (
            list(params),
            list(grads),
            list(momentum_buffers),
            float(lr),
            float(momentum),
            float(dampening),
            float(weight_decay),
            bool(nesterov),
            bool(maximize),
            bool(inplace),
        ),
    )


# --------------------------------------------------------------------------- normalization
@autocast_class("float32", cpu="input_dtype")
def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer normalization over the last len(normalized_shape) dims, as `F.layer_norm`.

    input [..., *normalized_shape]; normalized_shape an int or a sequence of ints (at least one);
    weight, bias [*normalized_shape] or None. Returns input's shape. The normalized dims are
    flattened into one last dim N (a view for contiguous input) before the backend runs.
    """
    _check_tensor("input", input)
    if isinstance(normalized_shape, int) and not isinstance(normalized_shape, bool):
        normalized_shape = (normalized_shape,)
    if not isinstance(normalized_shape, (tuple, list, torch.Size)) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in normalized_shape
    ):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")
    normalized_shape = tuple(int(d) for d in normalized_shape)
    if not normalized_shape:
        raise ValueError("normalized_shape must have at least one dim, got ()")
    k = len(normalized_shape)
    if input.dim() < k or tuple(input.shape[input.dim() - k :]) != normalized_shape:
        raise ValueError(f"input of shape {tuple(input.shape)} must end with normalized_shape {normalized_shape}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check_tensor(name, t)
            _check_same(name, t, "input", input)
            if tuple(t.shape) != normalized_shape:
                raise ValueError(f"{name} must have shape normalized_shape {normalized_shape}, got {tuple(t.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    n = math.prod(normalized_shape)
    x = input.reshape(tuple(input.shape[: input.dim() - k]) + (n,))
    w = None if weight is None else weight.reshape(n)
    b = None if bias is None else bias.reshape(n)
    out = _dispatch("layer_norm", [x, w, b], (x, w, b, float(eps)))
    return out.reshape(input.shape)
