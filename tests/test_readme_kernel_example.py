"""The README's "Adding a kernel" example works as written: its code block, saved as a kernel
file, registers a spec that passes the registry harness (outputs, gradients, a Triton launch)
and the float64 gradcheck, on the test device."""

import importlib.util
import re
from pathlib import Path

import torch
from helpers import compare_with_reference, recording_launches

from gpudl.kernels import registry

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_kernel_example(tmp_path, device, launches):
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
            compare_with_reference(spec, case, torch.float32, device, launches)
        (x64,) = spec.gradcheck_case.make(torch.float64, device)
        with recording_launches() as gradcheck_launches:
            assert torch.autograd.gradcheck(spec.triton, (x64,), fast_mode=True)
        assert len(gradcheck_launches) > 0
        assert len(spec.compile_variants()) == 2 and spec.bytes_moved(spec.bench_cases[0].make(torch.float32, "meta")) > 0
    finally:
        registry.REGISTRY.pop("silu", None)
