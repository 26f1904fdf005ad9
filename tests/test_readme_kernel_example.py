"""The README's "Adding a kernel" example works as written: its code block, saved as a kernel
file, registers a spec whose outputs, gradients and gradcheck match the reference."""

import importlib.util
import re
from pathlib import Path

import torch

from gpudl.kernels import registry

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_kernel_example(tmp_path):
    text = README.read_text()
    section = text[text.index("### Adding a kernel"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    path = tmp_path / "silu.py"
    path.write_text(code)  # triton.jit reads the kernel's source from its file
    spec_obj = importlib.util.spec_from_file_location("readme_silu", path)
    module = importlib.util.module_from_spec(spec_obj)
    try:
        spec_obj.loader.exec_module(module)
        spec = registry.REGISTRY["silu"]
        for case in spec.cases:
            torch.manual_seed(0)
            (x,) = case.make(torch.float32, torch.device("cpu"))
            xr = x.detach().clone().requires_grad_()
            y, yr = spec.triton(x), spec.reference(xr)
            torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
            g = torch.randn_like(yr)
            torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(yr, xr, g)[0], atol=1e-5, rtol=1e-5)
        (x64,) = spec.gradcheck_case.make(torch.float64, torch.device("cpu"))
        assert torch.autograd.gradcheck(spec.triton, (x64,), fast_mode=True)
        assert len(spec.compile_variants()) == 2 and spec.bytes_moved(spec.bench_cases[0].make(torch.float32, "meta")) > 0
    finally:
        registry.REGISTRY.pop("silu", None)
