"""The README's "Adding a kernel" example works as written: its three code blocks (the kernel
file, the reference, the gpudl.ops function) register an op that passes the registry harness
(outputs, gradients, a Triton launch), the float64 gradcheck and `torch.library.opcheck`, and
that behaves as its `torch.nn.functional` twin under torch.compile(fullgraph=True) and autocast."""

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

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("### Adding a kernel"):]
    section = section[:section.index("\n## ")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_kernel_example(tmp_path, device, launches, monkeypatch):
    kernel_code, reference_code, ops_code = _readme_blocks()
    path = tmp_path / "silu.py"
    path.write_text(kernel_code)  # triton.jit reads the kernel's source from its file
    spec_obj = importlib.util.spec_from_file_location("readme_silu", path)
    module = importlib.util.module_from_spec(spec_obj)
    monkeypatch.setitem(sys.modules, "readme_silu", module)  # as an imported kernel file is
    # The other two blocks run in the namespaces of the modules they belong in.
    reference_ns, ops_ns = dict(vars(reference)), dict(vars(ops))
    exec(reference_code, reference_ns)
    exec(ops_code, ops_ns)
    monkeypatch.setattr(reference, "silu", reference_ns["silu"], raising=False)
    monkeypatch.setattr(ops, "silu", ops_ns["silu"], raising=False)
    try:
        spec_obj.loader.exec_module(module)
        spec = registry.REGISTRY["silu"]
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
        torch.library.opcheck(torch.ops.gpudl.silu, (x,))
        torch.library.opcheck(torch.ops.gpudl.silu_backward, (x.detach(), torch.randn_like(x)))

        with gpudl.use_backend("triton"):
            compiled = torch.compile(ops.silu, backend="aot_eager", fullgraph=True)
            y = compiled(x)
            (g,) = torch.autograd.grad(y.sum(), x)
            torch.testing.assert_close(y, F.silu(x))
            torch.testing.assert_close(g, torch.autograd.grad(F.silu(x).sum(), x)[0])
            with torch.autocast(device.type, dtype=torch.float16):
                assert ops.silu(x).dtype == F.silu(x).dtype == torch.float32
    finally:
        registry.REGISTRY.pop("silu", None)
