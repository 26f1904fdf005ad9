"""The walkthrough of docs/adding-a-kernel.md works as written: its five code blocks (the three
files of the kernel family, the reference, the gpudl.ops function) register an op that passes the
registry harness (outputs, gradients, a Triton launch), the float64 gradcheck and
`torch.library.opcheck`, and that behaves as its `torch.nn.functional` twin under
torch.compile(fullgraph=True) and autocast.

The blocks run under the op name `docs_silu` (every `silu` but `F.silu` renamed), so the test
still runs once a reader has followed the page and created `kernels/silu.py`: the page's own
name is then taken, by the reader's kernel."""

import importlib.util
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from helpers import compare_with_reference, recording_launches

import gpudl
from gpudl import ops, reference
from gpudl.kernels import registry

PAGE = Path(__file__).resolve().parents[1] / "docs" / "adding-a-kernel.md"
OP = "docs_silu"


def _page_blocks() -> list[str]:
    """The page's python blocks, with the op renamed to OP."""
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
    return [re.sub(r"(?<!F\.)silu", OP, block) for block in blocks]


def _load(tmp_path, monkeypatch, name: str, code: str):
    """Import `code` as the module gpudl.kernels.<name>, from a file (triton.jit reads its source)."""
    path = tmp_path / f"{name}.py"
    path.write_text(code)
    module_name = f"gpudl.kernels.{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, module_name, module)  # as an imported kernel file is
    spec.loader.exec_module(module)
    return module


def test_page_follows_the_three_file_layout():
    kernels_code, op_code, spec_code, _, _ = _page_blocks()
    assert "@triton.jit" in kernels_code and "kernel_op" not in kernels_code and "register(" not in kernels_code
    assert "@kernel_op" in op_code and "@triton.jit" not in op_code and "register(" not in op_code
    assert "register(KernelSpec(" in spec_code and "@triton.jit" not in spec_code and "kernel_op" not in spec_code


def test_page_kernel_example(tmp_path, device, launches, monkeypatch):
    kernels_code, op_code, spec_code, reference_code, ops_code = _page_blocks()
    # The last two blocks run in the namespaces of the modules they belong in.
    reference_ns, ops_ns = dict(vars(reference)), dict(vars(ops))
    exec(reference_code, reference_ns)
    exec(ops_code, ops_ns)
    monkeypatch.setattr(reference, OP, reference_ns[OP], raising=False)
    monkeypatch.setattr(ops, OP, ops_ns[OP], raising=False)
    try:
        _load(tmp_path, monkeypatch, f"{OP}_triton", kernels_code)
        _load(tmp_path, monkeypatch, OP, op_code)
        _load(tmp_path, monkeypatch, f"{OP}_spec", spec_code)
        spec = registry.REGISTRY[OP]
        for case in spec.cases:
            compare_with_reference(spec, case, torch.float32, device, launches)
        (x64,) = spec.gradcheck_case.make(torch.float64, device)
        with recording_launches() as gradcheck_launches:
            assert torch.autograd.gradcheck(spec.triton, (x64,), fast_mode=True)
        assert len(gradcheck_launches) > 0
        assert (
            len(spec.compile_variants()) == 2 and spec.bytes_moved(spec.bench_cases[0].make(torch.float32, "meta")) > 0
        )

        x = torch.randn(3, 7, 37, device=device, requires_grad=True)
        silu_op, silu_backward_op = getattr(torch.ops.gpudl, OP), getattr(torch.ops.gpudl, f"{OP}_backward")
        torch.library.opcheck(silu_op, (x,))
        torch.library.opcheck(silu_backward_op, (x.detach(), torch.randn_like(x)))

        with gpudl.use_backend("triton"):
            compiled = torch.compile(getattr(ops, OP), backend="aot_eager", fullgraph=True)
            y = compiled(x)
            (g,) = torch.autograd.grad(y.sum(), x)
            torch.testing.assert_close(y, F.silu(x))
            torch.testing.assert_close(g, torch.autograd.grad(F.silu(x).sum(), x)[0])
            with torch.autocast(device.type, dtype=torch.float16):
                assert getattr(ops, OP)(x).dtype == F.silu(x).dtype == torch.float32
    finally:
        registry.REGISTRY.pop(OP, None)
