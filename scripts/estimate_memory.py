"""GPU memory of one training step at GPU size, estimated on a machine without a GPU.

    python scripts/estimate_memory.py [--experiments gpt cnn ...] [--precisions bf16 fp32] [--out DIR]
    python scripts/estimate_memory.py --smoke             # the tiny configs (CI: seconds)
    python scripts/estimate_memory.py --config experiment=cnn_digits [--config ...]   # a Hydra experiment

For every experiment of scripts/bench_models.py (its GPU-sized config), and every Hydra experiment
given with --config, one training step (bench_models' step: forward, loss, backward, optimizer step;
the GAN's discriminator and generator steps) runs in three variants on fresh copies of the model:

    triton   kernels.backend=triton: gpudl's ops on the Triton kernels' custom ops
    torch    kernels.backend=torch: gpudl's ops on the PyTorch reference
    eager    the eager PyTorch twin: the same modules and parameters, each gpudl op replaced by what
             a PyTorch user writes (F.linear then the activation, F.conv2d, torch.nn.RNN's cuDNN
             kernel, F.scaled_dot_product_attention, F.cross_entropy, ...)

and reports, in MiB, for bf16 autocast and for fp32:

    saved      bytes autograd keeps for backward (saved-tensor hooks; each storage once; parameters
               excluded, their low-precision casts included)
    fwd+bwd    peak live bytes from the start of forward to the end of backward, without optimizer
               state (parameters, batch, activations, gradients, every op's outputs and host code)
    step       peak live bytes of a steady-state step (the second one): the same plus the optimizer
               state (Adam's two moments; foreach, as PyTorch picks on CUDA) and its temporaries

Method (no GPU; nothing is computed). Tensors live on PyTorch's `meta` device, which stands for
the GPU: every op returns correctly shaped and strided outputs without data, autograd records and
runs the backward as on a GPU. (A CPU-only PyTorch build cannot run autograd on fake CUDA tensors:
the engine asks for a CUDA device guard and aborts.) Each of gpudl's custom ops runs its
registered fake implementation, so the triton variant allocates what the kernels' host code
allocates and what each kernel returns. Around that:
  - a TorchDispatchMode sees every op's outputs and keeps, per storage, its size rounded up to the
    caching allocator's 512-byte blocks, freed when the storage is freed (a weak reference);
  - autocast on CUDA is emulated for meta tensors: gpudl's ops read their CUDA autocast class, and
    a TorchFunctionMode casts the inputs of PyTorch's functions as CUDA autocast's op lists do
    (lower precision: linear, convolutions, matmul family, attention, RNN; float32: norms,
    softmax, losses, exp/log/sum/pow ...) — at the Python API, so an op's inner calls are not cast;
  - F.scaled_dot_product_attention runs PyTorch's flash kernel (half precision, no mask, head dim
    <= 256) or its memory-efficient kernel (otherwise), as the GPU dispatcher would choose, not the
    math fallback that materializes the attention matrix;
  - the eager twin's RNN runs aten._cudnn_rnn (what torch.nn.RNN runs on CUDA).

What the estimate leaves out: the allocator's fragmentation and its segment rounding (2 MiB / 20 MiB
segments, blocks split and cached), library workspaces (cuBLAS/cuBLASLt, cuDNN's workspace and the
cuDNN RNN reserve, which the meta kernel reports as empty), Triton's autotuning buffers, the CUDA
context (hundreds of MiB per process), and anything computed from data (no value-dependent shapes).

Writes a Markdown table to stdout and, with --out DIR, DIR/memory.json and DIR/memory.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import traceback
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_models  # noqa: E402  (its experiments, batches and step functions)

import gpudl  # noqa: E402
from gpudl import backend, ops, reference  # noqa: E402

DEVICE = torch.device("meta")
MiB = 2**20
BLOCK = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes
VARIANTS = ("triton", "torch", "eager")
PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}


# --------------------------------------------------------------------------- live bytes
class LiveBytes(TorchDispatchMode):
    """Bytes held by live storages (each rounded up to 512), and their peak, as ops run.

    A gpudl custom op's fake returns its outputs only; with `host_code`, its real implementation
    also runs, once, on fake CUDA tensors with every Triton launch a no-op (`HostCode`), and the
    scratch it allocates and frees on the way (repacked operands, partial sums) counts toward
    the peak at that moment."""

    def __init__(self, host_code: "HostCode | None" = None):
        super().__init__()
        self.host_code = host_code
        self.host_peaks: dict[str, int] = {}  # per gpudl op: the most its host code held at once
        self.live: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.current = self.peak = 0

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        size = math.ceil(st.nbytes() / BLOCK) * BLOCK
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        self._refs[key] = weakref.ref(st, functools.partial(self._free, key))

    def _free(self, key: int, _ref=None) -> None:
        size = self.live.pop(key, 0)
        self._refs.pop(key, None)
        self.current -= size

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.host_code is not None and getattr(func, "namespace", None) == "gpudl":
            inner_peak = self.host_code.peak_bytes(func, args, kwargs or {})
            if inner_peak is not None:
                self.peak = max(self.peak, self.current + inner_peak)
                name = func._schema.name
                self.host_peaks[name] = max(self.host_peaks.get(name, 0), inner_peak)
        out = func(*args, **(kwargs or {}))
        for t in _tensors(out):
            self.track(t)
        self.peak = max(self.peak, self.current)
        return out


class _Counter(TorchDispatchMode):
    """Live bytes of the storages created while it is on (LiveBytes without pre-existing tensors).

    `existing` tensors (the op's arguments) are already counted by the caller: their storages, and
    so every view of them (a reshape of an input), add nothing here."""

    def __init__(self, existing: Any = ()):
        super().__init__()
        self.inner = LiveBytes()
        self._existing = []  # keeps the argument storages (and so their keys) alive while counting
        for t in _tensors(existing):
            st = t.untyped_storage()
            self._existing.append(st)
            self.inner.live[st._cdata] = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        try:
            out = func(*args, **(kwargs or {}))
        except RuntimeError as err:
            # A CPU-only PyTorch has no CUDA device guard, which a few in-place kernels (copy_)
            # ask for even on fake tensors; they allocate nothing, so their result is their target.
            if "not linked with support for cuda" in str(err) and func._schema.is_mutable:
                return args[0]
            raise
        for t in _tensors(out):
            self.inner.track(t)
        return out


class HostCode:
    """Runs a gpudl custom op's real implementation (its host code: argument preparation, scratch
    buffers, the launch grid) on fake CUDA tensors, with the Triton launches replaced by no-ops and
    the GPU's properties those of an H100 SXM (132 SMs), to see what it allocates. An op whose
    host code cannot run so (it reads data) is listed in `skipped` and counted by its fake alone."""

    SM_COUNT = 132

    def __init__(self):
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.skipped: dict[str, str] = {}

    @contextlib.contextmanager
    def _no_launches(self) -> Iterator[None]:
        import types

        class _NoLaunch:
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                return lambda *args, **kwargs: None

        props = types.SimpleNamespace(multi_processor_count=self.SM_COUNT, major=9, minor=0,
                                      shared_memory_per_block_optin=227 * 1024, name="H100 (modelled)",
                                      total_memory=80 * 2**30, L2_cache_size=50 * MiB)
        def in_place(self, *args, **kwargs):  # writes values only: no allocation to see
            return self

        # A CPU-only PyTorch's Python bindings ask for a CUDA device guard before these in-place
        # methods run, even on fake tensors; they allocate nothing, so they become no-ops here.
        def contiguous(self, memory_format=torch.contiguous_format):  # the copy's allocation, no copy
            if self.is_contiguous(memory_format=memory_format):
                return self
            return torch.empty_like(self, memory_format=memory_format)

        def clone(self, memory_format=torch.preserve_format):
            return torch.empty_like(self, memory_format=memory_format)

        getitem = torch.Tensor.__getitem__

        def basic_index(self, index):  # the view itself, through aten (the binding asks for a guard)
            try:
                return getitem(self, index)
            except RuntimeError as err:
                if "not linked with support for cuda" not in str(err):
                    raise
            items = index if isinstance(index, tuple) else (index,)
            explicit = sum(1 for i in items if i is not None and i is not Ellipsis)
            out, dim = self, 0
            for item in items:
                if item is Ellipsis:
                    dim += self.dim() - explicit
                elif item is None:
                    out, dim = torch.ops.aten.unsqueeze(out, dim), dim + 1
                elif isinstance(item, int):
                    out = torch.ops.aten.select.int(out, dim, item)
                elif isinstance(item, slice):
                    out = torch.ops.aten.slice.Tensor(out, dim, item.start, item.stop, item.step or 1)
                    dim += 1
                else:
                    raise TypeError(f"estimate_memory: advanced indexing with {type(item).__name__} in host code")
            return out

        in_place_methods = ("copy_", "zero_", "fill_", "add_", "sub_", "mul_", "div_", "clamp_", "addcmul_",
                            "addcdiv_", "masked_fill_", "index_add_", "scatter_", "scatter_add_", "__iadd__",
                            "__isub__", "__imul__", "__itruediv__", "__setitem__")
        patched = [(torch.Tensor, name, in_place) for name in in_place_methods]
        patched += [(torch.Tensor, "contiguous", contiguous), (torch.Tensor, "clone", clone),
                    (torch.Tensor, "__getitem__", basic_index)]
        patched += [(torch.library, "wrap_triton", _NoLaunch),
                   (torch.cuda, "get_device_properties", lambda *a, **k: props),
                   (torch.cuda, "current_device", lambda: 0)]
        patched += [(m, "wrap_triton", _NoLaunch) for name, m in list(sys.modules.items())
                    if name.startswith("gpudl.kernels") and hasattr(m, "wrap_triton")]
        saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patched]
        for obj, attr, value in patched:
            setattr(obj, attr, value)
        try:
            yield
        finally:
            for obj, attr, value in saved:
                setattr(obj, attr, value)

    def _as_fake_cuda(self, value):
        if isinstance(value, torch.Tensor):
            with self.fake_mode:
                return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cuda")
        if isinstance(value, (list, tuple)):
            return type(value)(self._as_fake_cuda(v) for v in value)
        return value

    def peak_bytes(self, func, args, kwargs) -> int | None:
        """Peak bytes the implementation allocates beyond its inputs, or None when it cannot run."""
        from torch._library.custom_ops import OPDEFS

        name = func._schema.name
        opdef = OPDEFS.get(name)
        if opdef is None or name in self.skipped:
            return None
        fake_args = self._as_fake_cuda(args)
        fake_kwargs = {k: self._as_fake_cuda(v) for k, v in kwargs.items()}
        counter = _Counter((fake_args, list(fake_kwargs.values())))
        try:
            with self._no_launches(), torch.no_grad(), self.fake_mode, counter, warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
                out = opdef._init_fn(*fake_args, **fake_kwargs)
        except Exception as err:  # noqa: BLE001 - counted by its fake instead, and said so
            if os.environ.get("GPUDL_ESTIMATE_DEBUG"):
                traceback.print_exc()
            self.skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
            return None
        del out
        return counter.inner.peak


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


@contextlib.contextmanager
def saved_bytes(params: set[int], into: list[int]) -> Iterator[None]:
    """Append to `into` the bytes of each storage autograd saves for backward, once per storage
    (parameters' storages excluded). A storage is known by its address while it lives; a freed
    one's address may come back for another (the GAN's second step), which then counts anew."""
    alive: dict[int, weakref.ref] = {}

    def pack(t):
        st = t.untyped_storage()
        key = st._cdata
        if key not in params and (key not in alive or alive[key]() is None):
            alive[key] = weakref.ref(st)
            into.append(math.ceil(st.nbytes() / BLOCK) * BLOCK)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


# --------------------------------------------------------------------------- CUDA semantics on meta
# CUDA autocast's op lists (PyTorch's "Autocast Op Reference"), by the Python API names they arrive as.
LOWER_PRECISION = {"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                   "conv_transpose3d", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm",
                   "addbmm", "addmv", "addr", "mv", "prelu", "scaled_dot_product_attention", "rnn_tanh", "rnn_relu"}
FLOAT32 = {"layer_norm", "group_norm", "softmax", "log_softmax", "softmin", "softplus", "cross_entropy",
           "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "binary_cross_entropy_with_logits", "kl_div",
           "exp", "expm1", "log", "log10", "log1p", "log2", "pow", "__pow__", "__rpow__", "__rtruediv__",
           "reciprocal", "rsqrt", "sum", "prod", "cumsum", "cumprod", "norm", "normalize", "dist", "cdist",
           "acos", "asin", "cosh", "sinh", "tan", "erfinv"}


def sdpa_as_on_a_gpu(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """F.scaled_dot_product_attention as a GPU runs it: the flash kernel for fp16/bf16 without a mask
    and head dim <= 256, else the memory-efficient kernel (PyTorch's dispatch order; the math
    fallback is not what a GPU picks for these shapes)."""
    half = query.dtype in (torch.float16, torch.bfloat16)
    if half and attn_mask is None and query.shape[-1] <= 256 and not enable_gqa:
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, scale=scale)[0]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, grad, dropout_p, is_causal, scale=scale)[0]


class CudaOnMeta(TorchFunctionMode):
    """PyTorch's functions as on CUDA, for meta tensors: autocast's casts (when `dtype` is set)
    and the SDPA kernel choice."""

    def __init__(self, dtype: torch.dtype | None):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.dtype is not None:
            target = self.dtype if name in LOWER_PRECISION else torch.float32 if name in FLOAT32 else None
            if target is not None:
                def cast(a):
                    if isinstance(a, torch.Tensor) and a.is_floating_point() and a.is_meta and a.dtype != target:
                        return a.to(target)
                    if isinstance(a, (list, tuple)) and a and all(isinstance(x, torch.Tensor) for x in a):
                        return type(a)(cast(x) for x in a)
                    return a
                args = tuple(cast(a) for a in args)
                kwargs = {k: cast(v) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention:
            return sdpa_as_on_a_gpu(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def gpu_on_meta(dtype: torch.dtype | None) -> Iterator[None]:
    """Meta tensors treated as CUDA tensors: gpudl's backends accept them, gpudl's ops apply their
    CUDA autocast class (autocast emulated at `dtype`, or off), PyTorch's functions cast as CUDA
    autocast does and pick the GPU's attention kernels."""
    saved = {"on_gpu": backend._on_gpu, "enabled": torch.is_autocast_enabled, "dtype": torch.get_autocast_dtype}
    tables = [fn.autocast_classes for fn in vars(ops).values() if hasattr(fn, "autocast_classes")]

    def is_autocast_enabled(device_type=None):
        if device_type == "meta":
            return dtype is not None
        return saved["enabled"]() if device_type is None else saved["enabled"](device_type)

    def get_autocast_dtype(device_type):
        return dtype if device_type == "meta" and dtype is not None else saved["dtype"](device_type)

    backend._on_gpu = lambda tensors: all(t.is_meta for t in tensors if t is not None)
    torch.is_autocast_enabled, torch.get_autocast_dtype = is_autocast_enabled, get_autocast_dtype
    for table in tables:
        table["meta"] = table["cuda"]
    try:
        with CudaOnMeta(dtype):
            yield
    finally:
        backend._on_gpu = saved["on_gpu"]
        torch.is_autocast_enabled, torch.get_autocast_dtype = saved["enabled"], saved["dtype"]
        for table in tables:
            table.pop("meta", None)


# --------------------------------------------------------------------------- the eager twin
def _eager_linear(input, weight, bias=None, activation=None):
    return reference.activation(F.linear(input, weight, bias), activation)


def _eager_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, activation=None):
    return reference.activation(F.conv2d(input, weight, bias, stride, padding, dilation, groups), activation)


def _eager_conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1,
                            activation=None):
    out = F.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)
    return reference.activation(out, activation)


def _eager_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    return F.layer_norm(input, tuple(normalized_shape), weight, bias, eps)


def _eager_rnn(input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, nonlinearity="tanh", batch_first=False):
    """One layer of torch.nn.RNN as CUDA runs it: aten._cudnn_rnn over the whole sequence (weights in
    one flat buffer, as nn.RNN keeps them on a GPU), in the autocast dtype when autocast is on."""
    weights = [w for w in (weight_ih, weight_hh, bias_ih, bias_hh) if w is not None]
    tensors = [input, hx, *weights]
    if torch.is_autocast_enabled("meta"):
        low = torch.get_autocast_dtype("meta")
        tensors = [t.to(low) for t in tensors]
    x, h0, *weights = tensors
    flat = torch.empty(sum(w.numel() for w in weights), dtype=x.dtype, device=x.device)
    mode = 1 if nonlinearity == "tanh" else 0  # cuDNN's RNN_TANH / RNN_RELU
    out, h_n, *_ = torch.ops.aten._cudnn_rnn(
        x, weights, len(weights), flat, h0.unsqueeze(0), None, mode, weight_hh.shape[0], 0, 1, batch_first,
        0.0, True, False, [], None)
    return out, h_n.squeeze(0)


def _register_cudnn_rnn_backward_meta() -> None:
    """aten._cudnn_rnn_backward has no meta kernel in PyTorch: its gradients are shaped like the
    input, hx, cx and each weight (cuDNN's workspace is not modelled)."""
    if torch._C._dispatch_has_kernel_for_dispatch_key("aten::_cudnn_rnn_backward", "Meta"):
        return
    lib = torch.library.Library("aten", "IMPL")  # noqa: TOR901 - lives as long as the process
    _LIBRARIES.append(lib)

    def meta(input, weight, weight_stride0, weight_buf, hx, cx, *rest):
        grad_cx = cx.new_empty(cx.shape) if cx is not None else hx.new_empty(0)
        return input.new_empty(input.shape), hx.new_empty(hx.shape), grad_cx, [w.new_empty(w.shape) for w in weight]

    lib.impl("_cudnn_rnn_backward", meta, "Meta")


_LIBRARIES: list = []


EAGER_OPS: dict[str, Callable] = {
    "linear": _eager_linear,
    "conv2d": _eager_conv2d,
    "conv_transpose2d": _eager_conv_transpose2d,
    "max_pool2d": F.max_pool2d,
    "layer_norm": _eager_layer_norm,
    "scaled_dot_product_attention": F.scaled_dot_product_attention,
    "cross_entropy": F.cross_entropy,
    "mse_loss": F.mse_loss,
    "binary_cross_entropy_with_logits": F.binary_cross_entropy_with_logits,
    "gan_discriminator_loss": lambda real, fake: F.softplus(-real).mean() + F.softplus(fake).mean(),
    "gan_generator_loss": lambda fake: F.softplus(-fake).mean(),
    "rnn": _eager_rnn,
}


def _torch_self_attention(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                          average_attn_weights=True, is_causal=False):
    """torch.nn.MultiheadAttention's training forward for self-attention without masks, step by step
    as torch.nn.functional.multi_head_attention_forward takes it (packed in-projection and its
    contiguous q/k/v copy, SDPA, the output's permute+reshape copy, out_proj), written out so that
    each PyTorch call is cast as CUDA autocast casts it. Anything else runs torch's own forward."""
    if not (query is key is value) or key_padding_mask is not None or attn_mask is not None or need_weights:
        return torch.nn.MultiheadAttention.forward(self, query, key, value, key_padding_mask, need_weights,
                                                   attn_mask, average_attn_weights, is_causal)
    x = query.transpose(1, 0) if self.batch_first else query  # [L, N, E]
    length, batch, embed = x.shape
    heads, head_dim = self.num_heads, embed // self.num_heads
    proj = F.linear(x, self.in_proj_weight, self.in_proj_bias)
    proj = proj.unflatten(-1, (3, embed)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    q, k, v = (t.view(length, batch * heads, head_dim).transpose(0, 1).view(batch, heads, length, head_dim)
               for t in (proj[0], proj[1], proj[2]))
    out = F.scaled_dot_product_attention(q, k, v, None, self.dropout if self.training else 0.0, is_causal)
    out = out.permute(2, 0, 1, 3).reshape(batch * length, embed)
    out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(length, batch, embed)
    return (out.transpose(1, 0) if self.batch_first else out), None


@contextlib.contextmanager
def eager_twin() -> Iterator[None]:
    """gpudl.ops' functions replaced by their eager PyTorch twins (gpudl.nn's modules and the models
    call them through the module, so the same model becomes its eager twin); gpudl.nn.MultiheadAttention
    runs torch.nn.MultiheadAttention's forward (`_torch_self_attention`)."""
    from gpudl import nn as gnn

    _register_cudnn_rnn_backward_meta()
    saved = {name: getattr(ops, name) for name in EAGER_OPS}
    saved_mha = gnn.MultiheadAttention.forward
    for name, fn in EAGER_OPS.items():
        setattr(ops, name, fn)

    gnn.MultiheadAttention.forward = _torch_self_attention
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)
        gnn.MultiheadAttention.forward = saved_mha


# --------------------------------------------------------------------------- one measurement
class Workload:
    """What one row measures: build() -> model on meta, batch() -> batch on meta, step(model, optimizers,
    batch, autocast) -> loss; `label` and `config` describe it."""

    def __init__(self, label: str, config: str, build: Callable, batch: Callable, step: Callable):
        self.label, self.config, self.build, self.batch, self.step = label, config, build, batch, step


def bench_workload(name: str, smoke: bool) -> Workload:
    exp = bench_models.EXPERIMENTS[name]

    def build():
        torch.manual_seed(0)
        with torch.device(DEVICE):
            return exp.build(smoke)

    def batch():
        return tuple(t.to(DEVICE) for t in exp.batch(smoke, torch.device("cpu"), torch.Generator().manual_seed(1)))

    return Workload(name, exp.config(smoke), build, batch, exp.step)


def config_workload(override: str) -> Workload:
    """A Hydra experiment (e.g. experiment=cnn_digits): its model, one batch of its datamodule's
    training data at the configured batch size, bench_models' step for its kind of model."""
    from hydra.utils import instantiate

    from gpudl.utils import compose

    cfg = compose([override], output_dir=Path("/tmp/gpudl-estimate-memory"))
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    first = next(iter(datamodule.train_dataloader()))
    step = bench_models.gan_step if "GAN" in str(cfg.model._target_) else bench_models.supervised_step
    if step is bench_models.gan_step:
        real = first[0] if isinstance(first, (list, tuple)) else first
        latent = int(cfg.model.get("latent_dim", 64))
        cpu_batch = (real, torch.randn(real.shape[0], latent))
    else:
        cpu_batch = tuple(first)

    def build():
        torch.manual_seed(0)
        with torch.device(DEVICE):
            return instantiate(cfg.model)

    def batch():
        return tuple(t.to(DEVICE) for t in cpu_batch)

    shapes = ", ".join(str(tuple(t.shape)) for t in cpu_batch)
    return Workload(override, f"{cfg.model._target_.rsplit('.', 1)[-1]}, batch {shapes}", build, batch, step)


def _optimizers(model):
    """The model's optimizers as on CUDA: foreach where PyTorch would pick it for CUDA parameters;
    a fused optimizer (which meta parameters refuse) built as fused, then stepped one tensor at a
    time (the fused kernel allocates no temporaries; the per-tensor loop only one tensor's)."""
    import torch.optim.optimizer as optimizer_module

    supported = optimizer_module._get_fused_kernels_supported_devices
    optimizer_module._get_fused_kernels_supported_devices = lambda: [*supported(), "meta"]
    try:
        optimizers = bench_models._optimizers(model)
    finally:
        optimizer_module._get_fused_kernels_supported_devices = supported
    for opt in optimizers:
        for group in opt.param_groups:
            if group.get("fused"):
                group["fused"], group["foreach"] = False, False
            elif "foreach" in group:
                group["foreach"] = True
    return optimizers


def measure(work: Workload, variant: str, dtype: torch.dtype | None) -> dict[str, float]:
    """Saved, fwd+bwd and step MiB of one variant at one precision (see the module docstring)."""
    model = work.build()
    model.train()
    optimizers = _optimizers(model)
    batch = work.batch()
    autocast = contextlib.nullcontext
    twin = eager_twin() if variant == "eager" else contextlib.nullcontext()
    chosen = gpudl.use_backend("torch" if variant == "eager" else variant)
    host_code = HostCode()
    tracker = LiveBytes(host_code)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: list[int] = []
    with twin, chosen, gpu_on_meta(dtype), tracker:
        for t in [*model.parameters(), *model.buffers(), *batch]:
            tracker.track(t)
        # fwd+bwd: no optimizer state yet, no gradients before backward
        with saved_bytes(params, saved):
            work.step(model, _no_step(optimizers), batch, autocast)
        fwd_bwd = tracker.peak
        # steady state: the optimizer's state exists, a whole step (forward, backward, update)
        work.step(model, optimizers, batch, autocast)
        tracker.reset_peak()
        work.step(model, optimizers, batch, autocast)
        full = tracker.peak
    row = {"saved_mib": sum(saved) / MiB, "fwd_bwd_mib": fwd_bwd / MiB, "step_mib": full / MiB}
    if tracker.host_peaks:  # which op's launch needs the most at once (its outputs and scratch)
        largest = sorted(tracker.host_peaks.items(), key=lambda kv: -kv[1])[:5]
        row["largest_op_allocations_mib"] = {op: round(b / MiB, 3) for op, b in largest}
    if host_code.skipped:
        row["host_code_not_run"] = dict(host_code.skipped)
    return row


class _NoStep:
    """An optimizer stand-in whose step does nothing (the fwd+bwd measurement keeps no optimizer state)."""

    def __init__(self, opt):
        self.opt = opt

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        pass


def _no_step(optimizers):
    return [_NoStep(o) for o in optimizers]


# --------------------------------------------------------------------------- report
def _mib(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def markdown(rows: list[dict]) -> str:
    lines = [
        "MiB per training step, estimated with meta tensors (no GPU; see scripts/estimate_memory.py): "
        "gpudl triton / gpudl torch / eager PyTorch twin.",
        "",
        "| model | config | precision | saved activations | peak of forward+backward "
        "| full step with optimizer state |",
        "|---|---|---|---|---|---|",
    ]
    by_key: dict[tuple[str, str], dict[str, dict]] = {}
    for row in rows:
        by_key.setdefault((row["model"], row["precision"]), {})[row["variant"]] = row
    for (model, precision), variants in by_key.items():
        config = next(iter(variants.values()))["config"]

        def cell(metric):
            return " / ".join(_mib(variants[v][metric]) if metric in variants.get(v, {}) else
                              ("error" if v in variants else "-") for v in VARIANTS)

        lines.append(f"| {model} | {config} | {precision} | {cell('saved_mib')} | {cell('fwd_bwd_mib')} | "
                     f"{cell('step_mib')} |")
    skipped = sorted({op for r in rows for op in r.get("host_code_not_run", {})})
    if skipped:
        lines += ["", "Host code not run (counted by the op's fake outputs alone): " + ", ".join(skipped)]
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "Errors:", *(f"- {r['model']} {r['variant']} {r['precision']}: {r['error']}" for r in errors)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", nargs="*", default=None,
                        help=f"bench_models experiments (default: all of {', '.join(bench_models.EXPERIMENTS)})")
    parser.add_argument("--config", action="append", default=[],
                        help="a Hydra override selecting an experiment, e.g. experiment=cnn_digits (repeatable)")
    parser.add_argument("--precisions", nargs="*", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--smoke", action="store_true", help="the tiny configs (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="write memory.json and memory.md here")
    args = parser.parse_args(argv)
    names = args.experiments if args.experiments is not None else ([] if args.config else
                                                                   list(bench_models.EXPERIMENTS))
    for name in names:
        if name not in bench_models.EXPERIMENTS:
            parser.error(f"--experiments: unknown experiment {name!r}; expected some of "
                         f"{', '.join(bench_models.EXPERIMENTS)}")
    works = [bench_workload(n, args.smoke) for n in names] + [config_workload(c) for c in args.config]
    rows = []
    for work in works:
        for precision in args.precisions:
            for variant in args.variants:
                row = {"model": work.label, "config": work.config, "precision": precision, "variant": variant}
                try:
                    row.update(measure(work, variant, PRECISIONS[precision]))
                except Exception as err:  # one failing variant must not lose the others
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "method": "meta tensors, see scripts/estimate_memory.py",
                "smoke": args.smoke}
        (args.out / "memory.json").write_text(json.dumps({"environment": meta, "rows": rows}, indent=1) + "\n")
        (args.out / "memory.md").write_text(table + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
