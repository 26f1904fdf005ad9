"""gpudl.kernels: our Triton kernels, one file per family, each registering a KernelSpec.

Importing this package imports every kernel module in this folder, so dropping a new file here
registers its kernel (see `registry.py` and docs/adding-a-kernel.md).
Set TRITON_INTERPRET=1 before importing it to run the kernels on the CPU.
"""

import importlib
import pkgutil

from gpudl.kernels.registry import REGISTRY, Case, CompileVariant, KernelSpec, register  # noqa: F401

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in ("registry", "compile_check", "audit"):
        importlib.import_module(f"{__name__}.{_module.name}")
