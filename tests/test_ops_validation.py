"""gpudl.ops rejects bad arguments with ValueError/TypeError naming the argument and the shapes,
before any backend runs; valid but unusual inputs (unbatched, zero-size) give torch's answer."""

import pytest
import torch
import torch.nn.functional as F

from gpudl import ops

x4 = torch.randn(2, 3, 8, 8)
w4 = torch.randn(4, 3, 3, 3)
wt4 = torch.randn(3, 4, 3, 3)  # a transposed convolution's weight: [C_in, C_out/groups, kH, kW]


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda: ops.conv2d(x4, torch.randn(4, 2, 3, 3)), ValueError, r"input has 3 channels .*expects 2"),
        (
            lambda: ops.conv2d(x4.double(), w4),
            TypeError,
            r"weight has dtype torch.float32 but input has dtype torch.float64",
        ),
        (lambda: ops.conv2d(x4, w4.to("meta")), ValueError, r"weight is on meta but input is on cpu"),
        (lambda: ops.conv2d(torch.randn(8, 8), w4), ValueError, r"input must be 3-D or 4-D, got shape \(8, 8\)"),
        (lambda: ops.conv2d(x4.long(), w4), TypeError, r"input must be a floating-point tensor"),
        (lambda: ops.conv2d(x4, w4, bias=torch.randn(5)), ValueError, r"bias must have shape \(4,\)"),
        (lambda: ops.conv2d(x4, w4, stride=0), ValueError, r"stride must be >= 1, got \(0, 0\)"),
        (lambda: ops.conv2d(x4, w4, padding="full"), ValueError, r"padding must be .*'same' or 'valid'"),
        (lambda: ops.conv2d(x4, w4, padding="same", stride=2), ValueError, r"padding='same' needs stride 1"),
        (lambda: ops.conv2d(x4, w4, activation="swish"), ValueError, r"activation must be one of"),
        (lambda: ops.conv2d(torch.randn(1, 3, 2, 2), w4), ValueError, r"smaller than the dilated kernel"),
        (lambda: ops.conv2d(x4, torch.randn(4, 1, 3, 3), groups=2), ValueError, r"groups=2 expects 2"),
        (lambda: ops.conv_transpose2d(x4, torch.randn(4, 2, 3, 3)), ValueError, r"input has 3 channels .*expects 4"),
        (lambda: ops.conv_transpose2d(x4, wt4.half()), TypeError, r"weight has dtype torch.float16 but input"),
        (lambda: ops.conv_transpose2d(x4, wt4, groups=2), ValueError, r"3 input channels, which groups=2"),
        (lambda: ops.conv_transpose2d(x4, wt4, bias=torch.randn(3)), ValueError, r"bias must have shape \(4,\)"),
        (lambda: ops.conv_transpose2d(x4, wt4, padding="same"), ValueError, r"padding must be an int or a pair"),
        (
            lambda: ops.conv_transpose2d(x4, wt4, stride=2, output_padding=2),
            ValueError,
            r"output_padding \(2, 2\) must be smaller than stride \(2, 2\) or dilation",
        ),
        (lambda: ops.conv_transpose2d(x4, wt4, padding=6), ValueError, r"gives an output of size \(-2, -2\)"),
        (lambda: ops.conv_transpose2d(x4, wt4, activation="swish"), ValueError, r"activation must be one of"),
        (
            lambda: ops.linear(torch.randn(5, 7), torch.randn(3, 6)),
            ValueError,
            r"input has 7 features \(shape \(5, 7\)\) but weight \(3, 6\)",
        ),
        (
            lambda: ops.linear(torch.randn(5, 6), torch.randn(3, 6), torch.randn(4)),
            ValueError,
            r"bias must have shape \(3,\)",
        ),
        (lambda: ops.linear([1.0], torch.randn(3, 6)), TypeError, r"input must be a torch.Tensor, got list"),
        (
            lambda: ops.scaled_dot_product_attention(
                torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 8)
            ),
            ValueError,
            r"query head dim 8 .* key head dim 4",
        ),
        (
            lambda: ops.scaled_dot_product_attention(
                torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 5, 8)
            ),
            ValueError,
            r"key \(1, 2, 6, 8\) and value \(1, 2, 5, 8\)",
        ),
        (
            lambda: ops.scaled_dot_product_attention(
                torch.randn(1, 2, 5, 8),
                torch.randn(1, 2, 5, 8),
                torch.randn(1, 2, 5, 8),
                attn_mask=torch.ones(3, 5, dtype=torch.bool),
            ),
            ValueError,
            r"attn_mask of shape \(3, 5\) does not broadcast to \(1, 2, 5, 5\)",
        ),
        (
            lambda: ops.scaled_dot_product_attention(
                torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), dropout_p=1.5
            ),
            ValueError,
            r"dropout_p must be a float in \[0, 1\)",
        ),
        (
            lambda: ops.binary_cross_entropy_with_logits(torch.randn(4, 3), torch.rand(4, 2)),
            ValueError,
            r"target has shape \(4, 2\) but input has shape \(4, 3\)",
        ),
        (
            lambda: ops.binary_cross_entropy_with_logits(torch.randn(4, 3), torch.rand(4, 3), pos_weight=torch.ones(2)),
            ValueError,
            r"pos_weight of shape \(2,\) does not broadcast to the input shape \(4, 3\)",
        ),
        (
            lambda: ops.binary_cross_entropy_with_logits(torch.randn(4), torch.rand(4), reduction="avg"),
            ValueError,
            r"reduction must be",
        ),
        (
            lambda: ops.mse_loss(torch.randn(4, 1), torch.randn(4)),
            ValueError,
            r"target has shape \(4,\) but input has shape \(4, 1\)",
        ),
        (
            lambda: ops.cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 2, 1], dtype=torch.int32)),
            TypeError,
            r"int64 class indices",
        ),
        (
            lambda: ops.cross_entropy(torch.randn(4, 3), torch.zeros(5, dtype=torch.long)),
            ValueError,
            r"target of class indices must have shape \(4,\)",
        ),
        (
            lambda: ops.gan_discriminator_loss(torch.randn(4), torch.randn(4).double()),
            TypeError,
            r"fake_logits has dtype",
        ),
        (
            lambda: ops.gan_generator_loss(torch.ones(3, dtype=torch.long)),
            TypeError,
            r"fake_logits must be a floating-point tensor",
        ),
        (
            lambda: ops.rnn(torch.randn(5, 2, 3), None, torch.randn(4, 3), torch.randn(4, 5)),
            ValueError,
            r"weight_hh must be square",
        ),
        (
            lambda: ops.rnn(torch.randn(5, 2, 3), torch.zeros(3, 4), torch.randn(4, 3), torch.randn(4, 4)),
            ValueError,
            r"hx must have shape \(2, 4\)",
        ),
        (
            lambda: ops.rnn(torch.randn(5, 2, 3), None, torch.randn(4, 3), torch.randn(4, 4), nonlinearity="sigmoid"),
            ValueError,
            r"nonlinearity must be 'tanh' or 'relu'",
        ),
        (lambda: ops.max_pool2d(x4, 2, padding=2), ValueError, r"padding \(2, 2\) must be at most half of kernel_size"),
    ],
)
def test_bad_arguments_name_what_is_wrong(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_unusual_but_valid_inputs_match_torch():
    torch.testing.assert_close(ops.conv2d(x4[0], w4, padding=1), F.conv2d(x4[0], w4, padding=1))  # unbatched
    torch.testing.assert_close(ops.conv2d(x4[:0], w4), F.conv2d(x4[:0], w4))  # zero-size batch
    xc = x4.to(memory_format=torch.channels_last)
    torch.testing.assert_close(ops.conv2d(xc, w4, padding="same"), F.conv2d(x4, w4, padding="same"))
    w2 = torch.randn(4, 3, 2, 2)  # even kernel: 'same' pads asymmetrically
    torch.testing.assert_close(ops.conv2d(x4, w2, padding="same", dilation=1), F.conv2d(x4, w2, padding="same"))
    q = torch.randn(2, 5, 8)  # 3-D attention, mask broadcast from [Lq, Lk]
    mask = torch.rand(5, 5) > 0.3
    mask[:, 0] = True
    torch.testing.assert_close(
        ops.scaled_dot_product_attention(q, q, q, attn_mask=mask),
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask),
    )
    xt = torch.randn(7, 5).t()  # non-contiguous
    torch.testing.assert_close(ops.linear(xt, torch.randn(3, 7)).shape, torch.Size([5, 3]))
    out, h = ops.rnn(torch.randn(6, 3), None, torch.randn(4, 3), torch.randn(4, 4))  # unbatched
    assert out.shape == (6, 4) and h.shape == (4,)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(stride=2, padding=1, output_padding=1),
        dict(dilation=2, padding=2),
        dict(stride=(2, 3), output_padding=(1, 2), groups=3),
    ],
)
def test_conv_transpose2d_matches_torch(kwargs):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7)
    w = torch.randn(6, 2, 3, 4)
    b = torch.randn(2 * kwargs.get("groups", 1))
    torch.testing.assert_close(ops.conv_transpose2d(x, w, b, **kwargs), F.conv_transpose2d(x, w, b, **kwargs))
    torch.testing.assert_close(ops.conv_transpose2d(x[0], w, b, **kwargs), F.conv_transpose2d(x[0], w, b, **kwargs))
    torch.testing.assert_close(ops.conv_transpose2d(x[:0], w, b, **kwargs), F.conv_transpose2d(x[:0], w, b, **kwargs))
    torch.testing.assert_close(
        ops.conv_transpose2d(x, w, b, activation="tanh", **kwargs), torch.tanh(F.conv_transpose2d(x, w, b, **kwargs))
    )


def test_conv_transpose2d_module_is_a_drop_in():
    from gpudl import nn

    torch.manual_seed(0)
    ours = nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1, activation="relu")
    twin = torch.nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1)
    twin.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(ours(x), torch.relu(twin(x)))
    # output_size picks the output_padding, as in torch
    torch.testing.assert_close(ours(x, output_size=(11, 11)), torch.relu(twin(x, output_size=(11, 11))))
