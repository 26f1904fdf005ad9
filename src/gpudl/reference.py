"""PyTorch reference implementations of every op in `gpudl.ops`.

They are the `torch` backend and the oracle every kernel test compares against. Each takes the
*normalized* arguments that `gpudl.ops` passes on after validation (tuples instead of ints,
explicit padding, resolved scale), which is also exactly what the Triton entry of the same op
receives. Keep the maths here plain: no fusion tricks, no custom autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.optim.sgd import sgd as _functional_sgd

ACTIVATIONS = (None, "relu", "leaky_relu", "tanh", "sigmoid", "gelu")
LEAKY_RELU_SLOPE = 0.01  # torch.nn.functional.leaky_relu's default


def activation(x: torch.Tensor, name: str | None) -> torch.Tensor:
    """Apply a fused-epilogue activation by name (None is the identity; gelu is the exact erf form)."""
    if name is None:
        return x
    if name == "relu":
        return F.relu(x)
    if name == "leaky_relu":
        return F.leaky_relu(x, LEAKY_RELU_SLOPE)
    if name == "tanh":
        return torch.tanh(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "gelu":
        return F.gelu(x)
    raise ValueError(f"activation: unknown name {name!r}; expected one of {ACTIVATIONS}")


def conv2d(input, weight, bias, stride, padding, dilation, groups, activation_name):
    """input [N, C_in, H, W]; weight [C_out, C_in/groups, kH, kW]; bias [C_out] or None;
    stride, dilation: (sH, sW); padding: (top, bottom, left, right). Returns [N, C_out, H_out, W_out]."""
    top, bottom, left, right = padding
    if top == bottom and left == right:
        out = F.conv2d(input, weight, bias, stride, (top, left), dilation, groups)
    else:  # asymmetric, as padding="same" gives for even effective kernel sizes
        out = F.conv2d(F.pad(input, (left, right, top, bottom)), weight, bias, stride, 0, dilation, groups)
    return activation(out, activation_name)


def conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation, activation_name):
    """input [N, C_in, H, W]; weight [C_in, C_out/groups, kH, kW]; bias [C_out] or None;
    stride, padding, output_padding, dilation: pairs. Returns [N, C_out, H_out, W_out]."""
    out = F.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)
    return activation(out, activation_name)


def linear(input, weight, bias, activation_name):
    """input [..., in]; weight [out, in]; bias [out] or None. Returns [..., out]."""
    return activation(F.linear(input, weight, bias), activation_name)


def scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale):
    """query [B, H, Lq, D]; key [B, H, Lk, D]; value [B, H, Lk, Dv]; attn_mask None, bool or
    float, already expanded (possibly with zero strides) to [B, H, Lq, Lk]; scale a float.
    Returns [B, H, Lq, Dv]."""
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )


def binary_cross_entropy_with_logits(input, target, weight, reduction, pos_weight):
    return F.binary_cross_entropy_with_logits(input, target, weight, reduction=reduction, pos_weight=pos_weight)


def gan_discriminator_loss(real_logits, fake_logits):
    """mean softplus(-real) + mean softplus(fake): BCE of real against 1 plus fake against 0."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def gan_generator_loss(fake_logits):
    """Non-saturating generator loss: mean softplus(-fake), i.e. BCE of fake against 1."""
    return F.softplus(-fake_logits).mean()


def mse_loss(input, target, reduction):
    return F.mse_loss(input, target, reduction=reduction)


def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing):
    return F.cross_entropy(
        input, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )


def max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode):
    """input [N, C, H, W]; kernel_size, stride, padding, dilation: pairs."""
    return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)


def rnn(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity, batch_first):
    """One Elman RNN layer, as one layer of torch.nn.RNN.

    input [L, N, H_in] ([N, L, H_in] if batch_first); hx [N, H] (never None here);
    weight_ih [H, H_in]; weight_hh [H, H]; biases [H] or None.
    Returns (output [L, N, H] or [N, L, H], h_n [N, H]).
    """
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    x = input.transpose(0, 1) if batch_first else input
    projected = F.linear(x, weight_ih, bias_ih)  # every time step in one GEMM
    h = hx
    outputs = []
    for t in range(x.shape[0]):
        h = act(projected[t] + F.linear(h, weight_hh, bias_hh))
        outputs.append(h)
    output = torch.stack(outputs, 0) if outputs else x.new_empty(0, x.shape[1], weight_hh.shape[0])
    if batch_first:
        output = output.transpose(0, 1)
    return output, h


def layer_norm(input, weight, bias, eps):
    """input [..., N] (gpudl.ops flattens normalized_shape into the last dim); weight, bias [N] or
    None; eps a float. Returns [..., N]."""
    return F.layer_norm(input, input.shape[-1:], weight, bias, eps)


def sgd_step(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, inplace):
    """torch.optim's functional SGD over lists of tensors. momentum_buffers: one tensor or None
    ("no buffer yet") per param. Returns (params, buffers): updated in place, or new tensors."""
    params, grads = list(params), list(grads)
    buffers = list(momentum_buffers) if momentum != 0 else [None] * len(params)
    if not inplace:
        params = [p.detach().clone() for p in params]
        buffers = [None if b is None else b.clone() for b in buffers]
    # foreach=False when not in place: torch's foreach nesterov path adds into the grads themselves.
    _functional_sgd(
        params, grads, buffers, weight_decay=weight_decay, momentum=momentum, lr=lr, dampening=dampening,
        nesterov=nesterov, maximize=maximize, foreach=None if inplace else False,
    )
    return params, buffers
