"""GPU semantics on the CPU: what the Triton interpreter hides, checked while it runs.

The interpreter (triton/runtime/interpreter.py) runs a launch's programs one after another, in
grid order; a GPU runs them at once, in any order. `checking_gpu_semantics()` hooks the
interpreter in two places, never the kernels:

- its memory primitives (`InterpreterBuilder.create_masked_load` / `create_masked_store`, which
  plain, descriptor and atomic loads/stores all reach, plus `create_atomic_rmw` and
  `create_atomic_cas`): every active (mask-true) element is recorded with the program that
  touched it, as a plain load, a plain store or an atomic;
- its grid loop (`GridExecutor.__call__`, replaced by `_run_launch`, which does what Triton's
  does but runs the programs in an order we choose, and can skip them).

Per launch it then checks:

- out of bounds: every active element lies inside one tensor argument's span (the bytes between
  its first and its last element; for a TensorDescriptor, its base tensor's);
- races: no element is stored by one program and stored, loaded or atomically updated by another,
  and no element is atomically updated by one program and plainly loaded by another (atomics
  among themselves are allowed);
- order dependence: the launch run again in reverse and in a shuffled grid order leaves the same
  bits in every tensor argument. Without a race and without atomics, no program can see another's
  writes, so the bits cannot depend on the order: the reruns are made only for launches that use
  atomics or race (and no out-of-bounds access, whose stores could not be undone), unless
  `all_orders=True` (env GPUDL_SEMANTICS_ALL_ORDERS=1) asks for every launch of several programs.

It also counts each launch's traffic: active elements x element size, per tensor argument,
loaded and stored (an atomic counts as both), and on request the bytes of the distinct elements
loaded plus those of the distinct elements stored.

Limits: the interpreter's memory model is sequential, not a GPU's (no caches, no weak ordering,
no warps, no shared memory). What no program touches in this run is not checked (other shapes,
other configs, masked-off lanes). Races inside one program (between its threads) are not visible;
the interpreter has none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import os
import random
from typing import Iterator

import numpy as np
import torch

LOAD, STORE, ATOMIC = 0, 1, 2
_KIND_NAMES = {LOAD: "loaded", STORE: "stored", ATOMIC: "atomically updated"}
MAX_REPORTED = 3  # examples per problem kind and launch


@dataclasses.dataclass
class Span:
    """The bytes a tensor argument covers, [lo, hi)."""

    name: str
    lo: int
    hi: int
    itemsize: int

    def describe(self, address: int) -> str:
        return f"{self.name}[element {(address - self.lo) // self.itemsize}] (address {address:#x})"


@dataclasses.dataclass
class Traffic:
    loaded: int = 0  # bytes: active elements x element size, every access counted
    stored: int = 0
    distinct: int = 0  # bytes of distinct elements loaded + of distinct elements stored (when count_distinct)


@dataclasses.dataclass
class LaunchReport:
    kernel: str
    module: str
    grid: tuple[int, int, int]
    spans: list[Span]
    traffic: dict[str, Traffic]  # tensor argument -> traffic
    problems: list[str]
    uses_atomics: bool = False
    reordered: tuple[str, ...] = ()  # the orders it was rerun in

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def program(self, pid: int) -> tuple[int, ...]:
        """The program id (x, y, z) of a linear program index, trailing unit axes dropped."""
        _, ny, nz = self.grid
        ids = (pid // (ny * nz), pid // nz % ny, pid % nz)
        while len(ids) > 1 and self.grid[len(ids) - 1] == 1:
            ids = ids[:-1]
        return ids

    def bytes(self) -> tuple[int, int]:
        return (sum(t.loaded for t in self.traffic.values()), sum(t.stored for t in self.traffic.values()))


class Semantics:
    """What `checking_gpu_semantics` saw: one LaunchReport per interpreted launch, in order."""

    def __init__(self, all_orders: bool, run_programs: bool, count_distinct: bool):
        self.all_orders = all_orders
        self.run_programs = run_programs
        self.count_distinct = count_distinct
        self.launches: list[LaunchReport] = []
        self._current: _Recorder | None = None
        self._atomic_depth = 0

    def problems(self) -> list[str]:
        return [p for launch in self.launches for p in launch.problems]

    def assert_ok(self, what: str = "") -> None:
        problems = self.problems()
        if problems:
            head = f"{what}: " if what else ""
            raise AssertionError(f"{head}GPU-semantics check failed ({len(problems)} problem(s)):\n  "
                                 + "\n  ".join(problems))


class _Recorder:
    """The accesses of the launch being interpreted, gathered per program."""

    def __init__(self, report: LaunchReport, count_distinct: bool):
        self.report = report
        self.count_distinct = count_distinct
        self.program = 0
        self.recording = True
        self.uses_atomics = False
        self._chunks: list[tuple[int, np.ndarray, int]] = []  # (kind, addresses, itemsize) of this program
        self._lo = np.array([s.lo for s in report.spans], dtype=np.uint64)
        self._hi = np.array([s.hi for s in report.spans], dtype=np.uint64)
        # for the binary search: the spans by start, an argument passed twice (a placeholder
        # pointer) only once, as its first argument
        first = {}
        for i, span in enumerate(report.spans):
            first.setdefault((span.lo, span.hi), i)
        self._by_lo = np.array(sorted(first.values(), key=lambda i: (report.spans[i].lo, -i)), dtype=np.int64)
        self._lo_sorted = self._lo[self._by_lo]
        # the distinct accesses of every program: per kind, arrays of (address, itemsize, program)
        self._distinct: list[tuple[int, np.ndarray, int, int]] = []
        self._oob: list[str] = []
        self.out_of_bounds = False

    def add(self, kind: int, ptrs, mask) -> None:
        if not self.recording:
            return
        if kind == ATOMIC:
            self.uses_atomics = True
        data = np.asarray(ptrs.data)
        active = np.broadcast_to(np.asarray(mask.data, dtype=bool), data.shape) if mask is not None else None
        addresses = (data[active] if active is not None else data.reshape(-1)).astype(np.uint64, copy=False)
        if addresses.size:
            itemsize = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
            self._chunks.append((kind, addresses.reshape(-1), itemsize))

    def end_program(self) -> None:
        """Count the program's traffic, check its bounds, keep its distinct accesses."""
        chunks, self._chunks = self._chunks, []
        for kind, addresses, itemsize in chunks:
            span = self._span_of(addresses, itemsize)
            outside = span < 0
            self.out_of_bounds |= bool(outside.any())
            if outside.any() and len(self._oob) < MAX_REPORTED:
                self._oob.append(self._describe_outside(kind, int(addresses[outside][0]), itemsize, int(outside.sum())))
            counts = np.bincount(span[~outside], minlength=len(self.report.spans))
            for i in np.nonzero(counts)[0]:
                traffic = self.report.traffic[self.report.spans[i].name]
                if kind in (LOAD, ATOMIC):
                    traffic.loaded += int(counts[i]) * itemsize
                if kind in (STORE, ATOMIC):
                    traffic.stored += int(counts[i]) * itemsize
        by_kind: dict[tuple[int, int], list[np.ndarray]] = {}
        for kind, addresses, itemsize in chunks:
            by_kind.setdefault((kind, itemsize), []).append(addresses)
        for (kind, itemsize), parts in by_kind.items():
            self._distinct.append((kind, _sorted_distinct(np.concatenate(parts)), itemsize, self.program))

    def _span_of(self, addresses: np.ndarray, itemsize: int) -> np.ndarray:
        """Index of a tensor argument whose span holds each element, -1 where none does: the one
        starting last at or before it, else (overlapping arguments) the first that holds it."""
        if not self.report.spans:
            return np.full(addresses.shape, -1, dtype=np.int64)
        end = addresses + np.uint64(itemsize)
        i = np.searchsorted(self._lo_sorted, addresses, side="right") - 1
        candidate = self._by_lo[np.maximum(i, 0)]
        span = np.where((i >= 0) & (end <= self._hi[candidate]), candidate, -1)
        missed = np.nonzero(span < 0)[0]
        for j in range(len(self.report.spans)) if missed.size else ():
            inside = (addresses[missed] >= self._lo[j]) & (end[missed] <= self._hi[j]) & (span[missed] < 0)
            span[missed[inside]] = j
        return span

    def _describe_outside(self, kind: int, address: int, itemsize: int, count: int) -> str:
        report = self.report
        nearest = min(report.spans, key=lambda s: min(abs(address - s.lo), abs(address - s.hi)), default=None)
        where = "no tensor argument"
        if nearest is not None:
            if address < nearest.lo:
                where = f"{(nearest.lo - address) // itemsize} element(s) before {nearest.name}"
            else:
                where = f"element {(address - nearest.lo) // itemsize} of {nearest.name}, " \
                        f"which has {(nearest.hi - nearest.lo) // nearest.itemsize}"
        return (f"{report.kernel} grid {report.grid[:_ndim(report.grid)]}: out of bounds: program "
                f"{report.program(self.program)} {_KIND_NAMES[kind]} {count} active element(s) outside every "
                f"tensor argument, first at address {address:#x} ({where})")

    def finish(self) -> None:
        report = self.report
        report.uses_atomics = self.uses_atomics
        report.problems.extend(self._oob)
        if not self._distinct:
            return
        kinds = np.concatenate([np.full(a.size, k, np.int8) for k, a, _, _ in self._distinct])
        addresses = np.concatenate([a for _, a, _, _ in self._distinct])
        sizes = np.concatenate([np.full(a.size, s, np.int64) for _, a, s, _ in self._distinct])
        pids = np.concatenate([np.full(a.size, p, np.int64) for _, a, _, p in self._distinct])
        one_size = bool((sizes == sizes[0]).all())
        spans = self._span_of_each(addresses, sizes) if self.count_distinct or not one_size else None
        if self.count_distinct:
            for direction in ((kinds == LOAD) | (kinds == ATOMIC), (kinds == STORE) | (kinds == ATOMIC)):
                self._count_distinct(addresses[direction], sizes[direction], spans[direction])
        if report.programs > 1:
            report.problems.extend(self._races(kinds, addresses, sizes, pids, spans))

    def _span_of_each(self, addresses: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        span = np.full(addresses.shape, -1, dtype=np.int64)
        for size in np.unique(sizes):
            chosen = sizes == size
            span[chosen] = self._span_of(addresses[chosen], int(size))
        return span

    def _count_distinct(self, addresses: np.ndarray, sizes: np.ndarray, spans: np.ndarray) -> None:
        for i, span in enumerate(self.report.spans):
            here = spans == i
            for size in np.unique(sizes[here]):
                distinct = _sorted_distinct(addresses[here & (sizes == size)]).size
                self.report.traffic[span.name].distinct += distinct * int(size)

    def _races(self, kinds, addresses, sizes, pids, spans) -> list[str]:
        """Elements one program stores and another touches, or one updates atomically and another
        loads plainly. Compared in units of the smallest element size used in each tensor argument
        (an int64 store and an int32 load of its upper half do overlap)."""
        if spans is not None:  # several element sizes
            smallest = np.full(len(self.report.spans) + 1, 1 << 30, dtype=np.int64)
            np.minimum.at(smallest, spans, sizes)  # index -1 (outside): the extra last slot
            unit = smallest[spans]
            repeat = sizes // unit
        if spans is not None and (repeat > 1).any():
            total = int(repeat.sum())
            within = np.arange(total) - np.repeat(np.cumsum(repeat) - repeat, repeat)
            kinds, pids = np.repeat(kinds, repeat), np.repeat(pids, repeat)
            addresses = np.repeat(addresses, repeat) + (within * np.repeat(unit, repeat)).astype(np.uint64)
        loads, stores, atomics = (kinds == LOAD), (kinds == STORE), (kinds == ATOMIC)
        store_cells, store_lo, store_hi = _programs_per_cell(addresses[stores], pids[stores])
        writes = stores | atomics
        write_cells, write_lo, write_hi = _programs_per_cell(addresses[writes], pids[writes])
        racy = [store_cells[store_lo != store_hi]]  # stored by two programs
        racy.append(_touched_by_another(addresses[loads], pids[loads], write_cells, write_lo, write_hi))
        racy.append(_touched_by_another(addresses[atomics], pids[atomics], store_cells, store_lo, store_hi))
        racy = _sorted_distinct(np.concatenate(racy))
        if not racy.size:
            return []
        cells = racy
        problems = []
        for address in cells[:MAX_REPORTED].tolist():
            here = addresses == np.uint64(address)
            who = {k: sorted({self.report.program(int(p)) for p in pids[here & (kinds == k)]})
                   for k in (LOAD, STORE, ATOMIC)}
            what = "; ".join(f"{_KIND_NAMES[k]} by program(s) {_few(v)}" for k, v in who.items() if v)
            problems.append(f"{self.report.kernel} grid {self.report.grid[:_ndim(self.report.grid)]}: race on "
                            f"{self._describe(address)}: {what}")
        if cells.size > MAX_REPORTED:
            problems.append(f"{self.report.kernel}: ... {cells.size} racing elements in all")
        return problems

    def writers(self, address: int) -> list[tuple[int, ...]]:
        """The programs that stored or atomically updated the element at `address`."""
        return sorted({self.report.program(pid) for kind, addresses, itemsize, pid in self._distinct
                       if kind != LOAD and _holds(addresses, itemsize, address)})

    def _describe(self, address: int) -> str:
        for span in self.report.spans:
            if span.lo <= address < span.hi:
                return span.describe(address)
        return f"address {address:#x}"


def _sorted_distinct(values: np.ndarray) -> np.ndarray:
    """np.unique(values), by a sort (numpy 2's hash-based np.unique is many times slower here)."""
    values = np.sort(values)
    keep = np.ones(values.size, bool)
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def _programs_per_cell(addresses: np.ndarray, pids: np.ndarray):
    """The distinct addresses (sorted) and, for each, the lowest and highest program touching it."""
    if not addresses.size:
        empty = np.zeros(0, np.int64)
        return addresses, empty, empty
    low, spread = int(addresses.min()), int(addresses.max()) - int(addresses.min()) + 1
    programs = int(pids.max()) + 1
    if spread * programs < 1 << 62:  # one int64 key: a plain sort
        keys = np.sort((addresses - np.uint64(low)).astype(np.int64) * programs + pids)
        addresses, pids = (keys // programs).astype(np.uint64) + np.uint64(low), keys % programs
    else:
        order = np.lexsort((pids, addresses))
        addresses, pids = addresses[order], pids[order]
    start = np.ones(addresses.size, bool)
    start[1:] = addresses[1:] != addresses[:-1]
    first = np.nonzero(start)[0]
    last = np.append(first[1:], addresses.size) - 1
    return addresses[first], pids[first], pids[last]


def _touched_by_another(addresses, pids, cells, lo, hi) -> np.ndarray:
    """The addresses among `addresses` that lie in `cells` and that a program other than the one
    touching them here (`pids`) also touched there (lo/hi: the cell's lowest and highest program)."""
    if not addresses.size or not cells.size:
        return np.zeros(0, np.uint64)
    i = np.clip(np.searchsorted(cells, addresses), 0, cells.size - 1)
    hit = cells[i] == addresses
    other = hit & ((lo[i] != pids) | (hi[i] != pids))
    return addresses[other]


def _holds(addresses: np.ndarray, itemsize: int, address: int) -> bool:
    """Whether an element of `itemsize` bytes starting at one of the sorted `addresses` covers `address`."""
    i = int(np.searchsorted(addresses, np.uint64(address), side="right")) - 1
    return i >= 0 and int(addresses[i]) + itemsize > address


def _few(items: list, limit: int = 6) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} programs)" if len(items) > limit else "")


def _ndim(grid: tuple[int, int, int]) -> int:
    n = 3
    while n > 1 and grid[n - 1] == 1:
        n -= 1
    return n


# --------------------------------------------------------------------------- tensor arguments
def _tensor_spans(named_args: dict) -> list[Span]:
    """The span of every tensor argument (tuples and TensorDescriptors looked into)."""
    spans = []

    def visit(name, value):
        if isinstance(value, torch.Tensor):
            if value.numel() > 0:
                last = sum((size - 1) * stride for size, stride in zip(value.shape, value.stride()))
                lo = value.data_ptr()
                spans.append(Span(name, lo, lo + (last + 1) * value.element_size(), value.element_size()))
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                visit(f"{name}[{i}]", item)
        elif hasattr(value, "base") and isinstance(getattr(value, "base"), torch.Tensor):  # TensorDescriptor
            visit(name, value.base)

    for name, value in named_args.items():
        visit(name, value)
    return spans


POINTER_MIN = 1 << 20  # an int64 argument whose elements all lie above this may be a table of addresses


def _pointed_tensors(named_args: dict) -> dict[str, torch.Tensor]:
    """Tensors reached through a pointer table: live tensors whose data pointer is an element of an
    int64 tensor argument (a multi-tensor kernel's table of addresses, as sgd_step's). A GPU kernel
    may read and write them; their spans join the arguments'. Named `table[i]->shape dtype`."""
    tables = {name: value for name, value in named_args.items()
              if isinstance(value, torch.Tensor) and value.dtype == torch.int64 and 0 < value.numel() <= 1 << 16}
    candidates = {}
    for name, table in tables.items():
        for i, v in enumerate(table.reshape(-1).tolist()):
            if v >= POINTER_MIN:
                candidates.setdefault(v, f"{name}[{i}]")
    if not candidates:
        return {}
    found: dict[str, torch.Tensor] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu" and obj.numel() > 0:
            try:
                address = obj.data_ptr()
            except RuntimeError:  # a fake or functional tensor (left alive by torch.compile) has no storage
                continue
            where = candidates.get(address)
            if where is not None:
                key = f"{where}->{list(obj.shape)} {str(obj.dtype)[6:]}"
                found.setdefault(key, obj.detach())
    return found


def _storages(named_args: dict) -> list[torch.UntypedStorage]:
    """Every distinct storage the tensor arguments live in."""
    found: dict[int, torch.UntypedStorage] = {}

    def visit(value):
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            found.setdefault(storage.data_ptr(), storage)
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)
        elif hasattr(value, "base") and isinstance(getattr(value, "base"), torch.Tensor):
            visit(value.base)

    for value in named_args.values():
        visit(value)
    return list(found.values())


# --------------------------------------------------------------------------- the hooks
def _grid_orders(programs: int, seed: int) -> dict[str, list[int]]:
    shuffled = list(range(programs))
    random.Random(seed).shuffle(shuffled)
    return {"reversed": list(range(programs - 1, -1, -1)), "shuffled": shuffled}


def _run_launch(semantics: Semantics, executor, *args_dev, **kwargs) -> None:
    """GridExecutor.__call__ (triton 3.9) with the grid loop ours: the programs run in grid order
    while their accesses are recorded, then again in other orders where that can matter."""
    from triton.runtime import interpreter as interp

    fn = executor.fn
    argspec = inspect.getfullargspec(fn)
    kwargs = {k: v for k, v in kwargs.items() if k in argspec.args or k in argspec.kwonlyargs}
    args_hst, kwargs_hst = executor._init_args_hst(args_dev, kwargs)
    for hook in executor.pre_run_hooks:
        hook(*args_hst, **kwargs_hst)
    patch_scope = interp._patch_lang(fn)
    try:
        named = inspect.getcallargs(fn, *args_hst, **kwargs_hst)
        args = {name: arg if name in executor.constexprs else interp._implicit_cvt(arg) for name, arg in named.items()}
        grid = executor.grid(args) if callable(executor.grid) else executor.grid
        assert len(grid) <= 3, "grid must have at most 3 dimensions"
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        interp.interpreter_builder.set_grid_dim(*grid)
        tensors = {name: value for name, value in named.items() if name not in executor.constexprs}
        tensors.update(_pointed_tensors(tensors))
        spans = _tensor_spans(tensors)
        report = LaunchReport(fn.__name__, getattr(fn, "__module__", "?"), grid, spans,
                              {s.name: Traffic() for s in spans}, [])
        semantics.launches.append(report)
        if semantics.run_programs:
            _run_programs(semantics, report, fn, args, tensors)
    finally:
        patch_scope.restore()
    executor._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)


def _run_programs(semantics: Semantics, report: LaunchReport, fn, args: dict, tensors: dict) -> None:
    from triton import knobs
    from triton.runtime import interpreter as interp

    builder = interp.interpreter_builder
    _, ny, nz = report.grid
    storages = [torch.empty(0, dtype=torch.uint8).set_(s) for s in _storages(tensors)]  # as bytes
    before = [s.clone() for s in storages] if report.programs > 1 else []
    recorder = _Recorder(report, semantics.count_distinct)

    def run(order):
        for pid in order:
            builder.set_grid_idx(pid // (ny * nz), pid // nz % ny, pid % nz)
            recorder.program = pid
            fn(**args)
            recorder.end_program()

    semantics._current = recorder
    try:
        try:
            run(range(report.programs))
            recorder.finish()
            # (not after an out-of-bounds access: what it stored outside the arguments cannot be put back)
            if before and not recorder.out_of_bounds and (semantics.all_orders or report.uses_atomics
                                                          or report.problems):
                recorder.recording = False
                natural = [s.clone() for s in storages]
                for name, order in _grid_orders(report.programs, seed=len(semantics.launches)).items():
                    for storage, saved in zip(storages, before):
                        storage.copy_(saved)
                    run(order)
                    report.reordered += (name,)
                    report.problems.extend(_differences(report, name, storages, natural, recorder))
                for storage, saved in zip(storages, natural):
                    storage.copy_(saved)  # continue from the grid-order result
        except Exception as e:
            if knobs.compilation.front_end_debugging:
                raise
            raise interp.InterpreterError(repr(e)) from e
    finally:
        semantics._current = None


def _differences(report: LaunchReport, order: str, storages, natural, recorder: _Recorder) -> list[str]:
    """Where the bits after running the grid in `order` differ from the grid-order run."""
    problems = []
    for got_bytes, want_bytes in zip(storages, natural):
        if torch.equal(got_bytes, want_bytes):
            continue
        offset = int(torch.nonzero(got_bytes != want_bytes)[0])
        address = got_bytes.data_ptr() + offset
        span = next((s for s in report.spans if s.lo <= address < s.hi), None)
        where = span.describe(span.lo + (address - span.lo) // span.itemsize * span.itemsize) if span \
            else f"address {address:#x}"
        changed = int((got_bytes != want_bytes).sum())
        problems.append(f"{report.kernel} grid {report.grid[:_ndim(report.grid)]}: order dependence: with the "
                        f"programs run {order}, {where} differs from the grid-order run ({changed} byte(s) "
                        f"differ in its storage); written by program(s) {_few(recorder.writers(address))}")
    return problems


@contextlib.contextmanager
def checking_gpu_semantics(all_orders: bool | None = None, run_programs: bool = True,
                           count_distinct: bool = False) -> Iterator[Semantics]:
    """Check every interpreted Triton launch made inside the block (see the module docstring).

    `run_programs=False` records each launch's kernel and grid without running any program: the
    tensors the kernels would write keep whatever they held (for listing launches cheaply).
    `count_distinct=True` also counts the distinct bytes each tensor argument has touched."""
    from triton.runtime import interpreter as interp

    if all_orders is None:
        all_orders = os.environ.get("GPUDL_SEMANTICS_ALL_ORDERS") == "1"
    semantics = Semantics(all_orders, run_programs, count_distinct)
    builder_cls, executor_cls = interp.InterpreterBuilder, interp.GridExecutor
    saved = {name: builder_cls.__dict__[name] for name in
             ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas",
              "create_atomic_load", "create_atomic_store")}
    saved_call = executor_cls.__dict__["__call__"]

    def kind(plain):
        return ATOMIC if semantics._atomic_depth else plain

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        if semantics._current is not None:
            semantics._current.add(kind(LOAD), ptrs, mask)
        return saved["create_masked_load"](self, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        if semantics._current is not None:
            semantics._current.add(kind(STORE), ptrs, mask)
        return saved["create_masked_store"](self, ptrs, value, mask, cache_policy)

    def atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope):
        if semantics._current is not None:
            semantics._current.add(ATOMIC, ptr, mask)
        return saved["create_atomic_rmw"](self, rmw_op, ptr, val, mask, sem, scope)

    def atomic_cas(self, ptr, cmp, val, sem, scope):
        if semantics._current is not None:
            semantics._current.add(ATOMIC, ptr, None)
        return saved["create_atomic_cas"](self, ptr, cmp, val, sem, scope)

    def atomically(name):
        def call(self, *args, **kwargs):
            semantics._atomic_depth += 1
            try:
                return saved[name](self, *args, **kwargs)
            finally:
                semantics._atomic_depth -= 1

        return call

    def run_launch(self, *args, **kwargs):
        return _run_launch(semantics, self, *args, **kwargs)

    patches = {"create_masked_load": masked_load, "create_masked_store": masked_store,
               "create_atomic_rmw": atomic_rmw, "create_atomic_cas": atomic_cas,
               "create_atomic_load": atomically("create_atomic_load"),
               "create_atomic_store": atomically("create_atomic_store")}
    for name, patch in patches.items():
        setattr(builder_cls, name, patch)
    executor_cls.__call__ = run_launch
    try:
        yield semantics
    finally:
        for name, original in saved.items():
            setattr(builder_cls, name, original)
        executor_cls.__call__ = saved_call
