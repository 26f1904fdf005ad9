"""Drop-in modules over `gpudl.ops`, with the constructor arguments and parameter names of their
`torch.nn` twins, so a `torch.nn` state_dict loads into them and back.

Each one subclasses its twin for parameters and initialization and only replaces `forward`, so
they run on whichever backend `gpudl.backend` selects.
"""

from __future__ import annotations

import torch
from torch import nn

from gpudl import ops


class Linear(nn.Linear):
    """`torch.nn.Linear` with an optional fused activation. input [..., in_features] -> [..., out_features]."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, activation=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, input):
        return ops.linear(input, self.weight, self.bias, activation=self.activation)

    def extra_repr(self):
        return super().extra_repr() + (f", activation={self.activation}" if self.activation else "")


class Conv2d(nn.Conv2d):
    """`torch.nn.Conv2d` (padding_mode 'zeros') with an optional fused activation.
    input [N, C_in, H, W] -> [N, C_out, H_out, W_out]."""

    def __init__(self, *args, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ValueError(f"gpudl.nn.Conv2d supports padding_mode='zeros' only, got {self.padding_mode!r}")
        self.activation = activation

    def forward(self, input):
        return ops.conv2d(
            input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
            activation=self.activation,
        )

    def extra_repr(self):
        return super().extra_repr() + (f", activation={self.activation}" if self.activation else "")


class ConvTranspose2d(nn.ConvTranspose2d):
    """`torch.nn.ConvTranspose2d` with an optional fused activation.
    input [N, C_in, H, W] -> [N, C_out, H_out, W_out]; forward's `output_size` picks the
    output_padding, as in torch."""

    def __init__(self, *args, activation=None, **kwargs):
        super().__init__(*args, **kwargs)  # torch itself allows only padding_mode='zeros' here
        self.activation = activation

    def forward(self, input, output_size=None):
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        return ops.conv_transpose2d(
            input, self.weight, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation,
            activation=self.activation,
        )

    def extra_repr(self):
        return super().extra_repr() + (f", activation={self.activation}" if self.activation else "")


class RNN(nn.RNNBase):
    """`torch.nn.RNN` (Elman, tanh or relu; layers, bidirectional, dropout between layers), each
    layer and direction one `gpudl.ops.rnn` call. input [L, N, H_in] ([N, L, H_in] if batch_first)
    or [L, H_in]; hx [layers * directions, N, H]. Returns (output [..., directions * H], h_n).

    Same constructor, parameters and state_dict as `torch.nn.RNN`, built on its base class
    `nn.RNNBase` rather than on `nn.RNN` itself: torch.compile refuses to trace `nn.RNN`
    instances (cuDNN's RNN has no tracing rules), and this forward is plain gpudl ops."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    def forward(self, input, hx=None):
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise TypeError("gpudl.nn.RNN does not take PackedSequence input; pad the batch instead")
        unbatched = input.dim() == 2
        if unbatched:
            input = input.unsqueeze(0 if self.batch_first else 1)
            hx = None if hx is None else hx.unsqueeze(1)
        directions = 2 if self.bidirectional else 1
        batch = input.shape[0] if self.batch_first else input.shape[1]
        expected = (self.num_layers * directions, batch, self.hidden_size)
        if hx is None:
            hx = input.new_zeros(expected)
        elif tuple(hx.shape) != expected:
            raise ValueError(
                f"hx must have shape {expected} (layers * directions, batch, hidden), got {tuple(hx.shape)}"
            )
        time_dim = 1 if self.batch_first else 0
        layer_input, final_states = input, []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                x = layer_input.flip(time_dim) if direction == 1 else layer_input
                out, h_n = ops.rnn(
                    x,
                    hx[layer * directions + direction],
                    getattr(self, "weight_ih" + suffix),
                    getattr(self, "weight_hh" + suffix),
                    getattr(self, "bias_ih" + suffix, None),
                    getattr(self, "bias_hh" + suffix, None),
                    nonlinearity=self.nonlinearity,
                    batch_first=self.batch_first,
                )
                outputs.append(out.flip(time_dim) if direction == 1 else out)
                final_states.append(h_n)
            layer_input = torch.cat(outputs, -1) if directions == 2 else outputs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = nn.functional.dropout(layer_input, self.dropout, training=True)
        h_n = torch.stack(final_states, 0)
        if unbatched:
            return layer_input.squeeze(time_dim), h_n.squeeze(1)
        return layer_input, h_n


class MultiheadAttention(nn.MultiheadAttention):
    """`torch.nn.MultiheadAttention` whose attention runs on `gpudl.ops.scaled_dot_product_attention`.

    Same constructor and parameter names (in_proj_weight, in_proj_bias, out_proj.*). Differences:
    need_weights defaults to False (fused attention never forms the weights); with need_weights=True
    the weights are computed explicitly, averaged over heads unless average_attn_weights=False.
    query [L, N, E] ([N, L, E] if batch_first); returns (output, weights or None).

    Self-attention (query, key and value the same tensor) runs ONE projection GEMM with the packed
    in_proj_weight [3E, E], so its input is read (and, under autocast, cast to half precision and
    saved) once; q, k and v are views of its [N, L, 3E] output, and the attention output, stored
    as [N, L, H, Dh] by the kernel, reaches out_proj as a view too. key is value (cross-attention
    over a memory) packs the k and v projections the same way.

    State dicts with the projections under other names load through a pre-hook: separate
    q_proj_weight / k_proj_weight / v_proj_weight (torch's form when kdim or vdim differ), and
    qkv.* / proj.* (a packed nn.Linear pair, as gpudl's GPT attention stored them).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_load_state_dict_pre_hook(_packed_projection_keys)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self._qkv_same_embed_dim or self.bias_k is not None or self.add_zero_attn:
            raise ValueError(
                "gpudl.nn.MultiheadAttention supports kdim == vdim == embed_dim, no add_bias_kv, no add_zero_attn"
            )
        if query.dim() != 3:
            raise ValueError(
                f"query must be 3-D ([L, N, E], or [N, L, E] with batch_first), got shape {tuple(query.shape)}"
            )
        self_attention, shared_kv = query is key and key is value, key is value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, lq, embed = query.shape
        lk = key.shape[1]
        heads, head_dim = self.num_heads, self.head_dim
        weight, bias = self.in_proj_weight, self.in_proj_bias

        def split_heads(projected, count, length):
            """[N, L, count * E] -> `count` views [N, H, L, Dh] (no copy)."""
            return [t.view(batch, length, heads, head_dim).transpose(1, 2) for t in projected.split(embed, -1)]

        def rows(start, stop):
            return weight[start * embed:stop * embed], (bias[start * embed:stop * embed] if bias is not None else None)

        if self_attention:
            q, k, v = split_heads(ops.linear(query, weight, bias), 3, lq)
        else:
            (q,) = split_heads(ops.linear(query, *rows(0, 1)), 1, lq)
            if shared_kv:
                k, v = split_heads(ops.linear(key, *rows(1, 3)), 2, lk)
            else:
                (k,) = split_heads(ops.linear(key, *rows(1, 2)), 1, lk)
                (v,) = split_heads(ops.linear(value, *rows(2, 3)), 1, lk)
        mask = _combine_masks(attn_mask, key_padding_mask, batch, heads, lq, lk, q.dtype)
        if is_causal and mask is not None:
            causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
            mask = mask.masked_fill(~causal, float("-inf"))
            is_causal = False
        dropout = self.dropout if self.training else 0.0
        out = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
        # [N, H, Lq, Dh] stored as [N, Lq, H, Dh] by gpudl's kernel (and torch's flash backend): a view.
        out = ops.linear(out.transpose(1, 2).reshape(batch, lq, embed), self.out_proj.weight, self.out_proj.bias)
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / head_dim**0.5
            if mask is not None:
                scores = scores + mask
            if is_causal:
                causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
                scores = scores.masked_fill(~causal, float("-inf"))
            weights = scores.softmax(-1)
            weights = weights.mean(1) if average_attn_weights else weights
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _packed_projection_keys(module, state_dict, prefix, *args):
    """load_state_dict pre-hook of MultiheadAttention: rename or pack projection keys stored in
    another form into in_proj_weight / in_proj_bias / out_proj.* (see the class docstring)."""
    separate = [prefix + f"{name}_proj_weight" for name in "qkv"]
    if prefix + "in_proj_weight" not in state_dict and all(k in state_dict for k in separate):
        state_dict[prefix + "in_proj_weight"] = torch.cat([state_dict.pop(k) for k in separate])
    renames = {"qkv.weight": "in_proj_weight", "qkv.bias": "in_proj_bias",
               "proj.weight": "out_proj.weight", "proj.bias": "out_proj.bias"}
    for old, new in renames.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def _additive(mask, dtype):
    """A bool mask (True = masked out) as -inf/0 to add to the scores; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _combine_masks(attn_mask, key_padding_mask, batch, heads, lq, lk, dtype):
    """Merge torch.nn.MultiheadAttention's two masks (True = masked out there) into one additive mask."""
    mask = None
    if attn_mask is not None:
        m = attn_mask
        if m.dim() == 3:  # [N * heads, Lq, Lk]
            m = m.view(batch, heads, lq, lk)
        mask = _additive(m, dtype)
    if key_padding_mask is not None:
        k = key_padding_mask.view(batch, 1, 1, lk)
        pad = _additive(k, dtype)
        mask = pad if mask is None else mask + pad
    return mask


class LayerNorm(nn.LayerNorm):
    """`torch.nn.LayerNorm` (same constructor and parameter names: weight, bias) running on
    `gpudl.ops.layer_norm`. input [..., *normalized_shape] -> the same shape."""

    def forward(self, input):
        return ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
