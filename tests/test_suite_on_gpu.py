"""The suite as the GPU check machine collects it, checked here without a GPU: CUDA taken as
present (GPUDL_TEST_AS_CUDA=1, so the interpreter stays off and the fp16/bf16 harness cases are
added) and hydra-core, omegaconf, wandb and mlxtend missing, as they are there
(scripts/gpu_check.sh). Collection must succeed, with the tests that need those packages skipped
by name instead of failing to import. Nothing runs: only collection can be simulated here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
MISSING = ("hydra", "omegaconf", "wandb", "mlxtend")
# Each file, and the package it cannot be collected without on that machine.
NEEDS = {"test_bad_input.py": "hydra", "test_configs.py": "hydra", "test_eval.py": "hydra",
         "test_resume.py": "hydra", "test_scale.py": "hydra", "test_sweeps.py": "hydra", "test_train.py": "hydra",
         "test_train_scripts.py": "hydra", "test_package.py": "hydra", "test_precision_and_compile_runs.py": "hydra"}

# Runs pytest in-process after putting a finder in front of the import system that refuses the
# missing packages exactly as an absent package does (ModuleNotFoundError).
RUNNER = """
import sys

MISSING = {missing!r}


class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {{name!r}} (simulated)", name=name)
        return None


sys.meta_path.insert(0, Missing())
import pytest

sys.exit(pytest.main({args!r}))
"""


def _collect(*extra: str) -> subprocess.CompletedProcess:
    args = ["--collect-only", "-q", "-rs", "-p", "no:cacheprovider", "-o", "addopts=", *extra, str(TESTS)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_")}
    # No entry-point plugins: hydra's own pytest plugin would import hydra; xdist is not needed.
    env.update(GPUDL_TEST_AS_CUDA="1", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    code = RUNNER.format(missing=MISSING, args=args)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=TESTS.parent,
                          timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the suite itself runs as collected")
def test_collection_on_the_gpu_machine():
    proc = _collect()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert not re.search(r"^ERROR|errors? during collection", out, re.M), out[-5000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    for dtype in ("torch.float32", "torch.float16", "torch.bfloat16"):
        assert any(f"test_kernel_matches_reference[{dtype}-conv2d" in i for i in ids), f"no {dtype} harness cases"
    for name, package in NEEDS.items():
        skipped = re.search(rf"SKIPPED \[\d+\] tests/{name}:\d+: needs {package}", out)
        assert skipped, f"{name} not skipped: {out[-3000:]}"
        assert not any(i.startswith(f"tests/{name}::") for i in ids), f"{name} collected without {package}"
    # What runs there: the kernels, ops, models, data and optimizer tests, and the GPU-only ones.
    for name in ("test_kernels.py", "test_attention_kernel.py", "test_backends_agree.py", "test_models.py",
                 "test_data.py", "test_optim.py", "test_harness.py"):
        assert any(i.startswith(f"tests/{name}::") for i in ids), f"nothing of {name} collected"
    assert "tests/test_backend.py::test_auto_runs_the_kernels_on_cuda_tensors" in ids
