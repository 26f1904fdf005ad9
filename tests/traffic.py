"""Traffic of the memory-bound kernels, counted under the Triton interpreter, against the spec's
byte model (`KernelSpec.bytes_moved`: the minimum bytes the op's forward must move).

Counted: for every launch of the forward call, each active (mask-true) element loaded or stored
times its element size, per tensor argument (tests/gpu_semantics.py records them); an element
read twice counts twice. That is what the kernel's instructions ask of memory; on a GPU, caches
may serve some re-reads (the `distinct` column: bytes of the distinct elements loaded plus those of
the distinct elements stored, the floor with a perfect cache). Not a GPU measurement.

    TRITON_INTERPRET=1 python tests/traffic.py [--op layer_norm ...] [-v]   (-v: bytes per kernel argument)
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings

import torch

# ops whose speed is their memory traffic (each has a bytes_moved model)
MEMORY_BOUND = ("binary_cross_entropy_with_logits", "gan_discriminator_loss", "gan_generator_loss", "mse_loss",
                "cross_entropy", "layer_norm", "sgd_step", "max_pool2d")
RATIO_LIMIT = 1.10  # counted bytes over the model's, at most


@dataclasses.dataclass
class TrafficRow:
    op: str
    case: str
    model: float  # spec.bytes_moved
    loaded: int
    stored: int
    distinct: int
    kernels: str  # the forward's launches, "kernel(grid)"
    per_tensor: dict[str, tuple[int, int]]  # "kernel.argument" -> (loaded, stored) bytes

    @property
    def counted(self) -> int:
        return self.loaded + self.stored

    @property
    def ratio(self) -> float:
        return self.counted / self.model

    @property
    def distinct_ratio(self) -> float:
        return self.distinct / self.model

    def breakdown(self) -> str:
        """Bytes loaded + stored per kernel argument."""
        return ", ".join(f"{name} {loaded:,}+{stored:,}" for name, (loaded, stored) in self.per_tensor.items()
                         if loaded or stored)


def forward_traffic(spec, case, device) -> TrafficRow | None:
    """The counted traffic of the forward call of one case (float32), or None where the byte model
    does not apply (a case answered without a kernel, or a model of 0 bytes)."""
    from gpu_semantics import checking_gpu_semantics

    if case.expect_fallback or spec.bytes_moved is None:
        return None
    torch.manual_seed(0)
    args = case.make(torch.float32, torch.device(device))
    model = spec.bytes_moved(args)  # before the call: an in-place op (sgd_step) changes its arguments
    if not model:
        return None
    with checking_gpu_semantics(count_distinct=True) as semantics:
        spec.triton(*args)
    traffic = [t for launch in semantics.launches for t in launch.traffic.values()]
    kernels = ", ".join(f"{launch.kernel}{launch.grid[:_ndim(launch.grid)]}" for launch in semantics.launches)
    per_tensor: dict[str, tuple[int, int]] = {}
    for launch in semantics.launches:
        for name, t in launch.traffic.items():
            loaded, stored = per_tensor.get(f"{launch.kernel}.{name}", (0, 0))
            per_tensor[f"{launch.kernel}.{name}"] = (loaded + t.loaded, stored + t.stored)
    return TrafficRow(spec.op, case.name, float(model), sum(t.loaded for t in traffic),
                      sum(t.stored for t in traffic), sum(t.distinct for t in traffic), kernels, per_tensor)



def _ndim(grid) -> int:
    n = len(grid)
    while n > 1 and grid[n - 1] == 1:
        n -= 1
    return n


def traffic_rows(ops=MEMORY_BOUND, device="cpu") -> list[TrafficRow]:
    from gpudl.kernels import REGISTRY
    from gpudl.kernels.registry import FallbackWarning

    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        for op in ops:
            spec = REGISTRY[op]
            for case in spec.cases:
                row = forward_traffic(spec, case, device)
                if row is not None:
                    rows.append(row)
    return rows


def format_table(rows: list[TrafficRow]) -> str:
    """A Markdown table: one row per case."""
    lines = ["| op | case | model bytes | counted bytes (loaded + stored) | counted / model | distinct / model |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.op} | {r.case} | {r.model:,.0f} | {r.counted:,} ({r.loaded:,} + {r.stored:,}) | "
                     f"{r.ratio:.3f} | {r.distinct_ratio:.3f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1: the traffic is counted under the Triton interpreter", file=sys.stderr)
        return 2
    ops = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--op"] or list(MEMORY_BOUND)
    torch.set_num_threads(1)
    rows = traffic_rows(ops)
    print(format_table(rows))
    if "-v" in argv:
        for r in rows:
            print(f"{r.op} {r.case}: {r.breakdown()}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main(sys.argv[1:]))
