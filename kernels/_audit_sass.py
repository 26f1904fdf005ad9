"""Reading SASS (the `cuobjdump -sass` text of one kernel) for the audit: instruction classes, the
loops of the control-flow graph, the hot loop (the loop that holds the tensor-core instructions)
and its modeled upper bound on tensor-core utilisation, and the widths of global accesses.

The hot-loop model is a model: an upper bound that sees instruction issue, tensor-core and MUFU
throughput, and not memory latency, bandwidth or stalls. Per iteration of the hot loop of one
program (CTA), with `warps` its warps:

    tensor-core cycles = multiply-adds per iteration / the SM's dense multiply-adds per clock
    issue cycles       = loop instructions x warps / 4      (4 schedulers per SM, one instruction
                                                             per clock each)
    MUFU cycles        = MUFU instructions x warps x 32 / 16 (16 MUFU results per clock per SM)
    bound              = tensor-core cycles / max(tensor-core, issue, MUFU cycles)

Multiply-adds per iteration come from the instructions themselves: an HGMMA.64xNxK is issued by
each warpgroup (warps / 4 of them) and does 64*N*K; an HMMA.MNK by each warp and does M*N*K.
The loop's instructions are every instruction of its blocks (a predicated-off or rarely taken path
counts too), NOPs left out. Dense tensor-core rates per SM per clock (multiply-adds), from NVIDIA's
whitepapers: A100 (Ampere GA100 whitepaper: 256 FP16/BF16 FMA per clock per tensor core, 4 per SM;
312 TFLOPS FP16/BF16, 156 TF32 at 108 SMs and 1410 MHz), H100 SXM5 (Hopper H100 whitepaper: twice
A100's rate per SM per clock; 989.4 TFLOPS FP16/BF16, 494.7 TF32 dense at 132 SMs and 1830 MHz).
MUFU: 16 results per clock per SM on compute capability 8.0 and 9.0 (CUDA C++ Programming Guide,
arithmetic instruction throughput table), i.e. about 3.9 TFLOPS on an H100 SXM5 (as the
FlashAttention-3 paper counts).
"""

from __future__ import annotations

import re

# Dense multiply-adds per clock per SM, by the MMA's input type (see the module docstring).
TENSOR_MACS_PER_CLOCK = {
    80: {"fp16": 1024, "bf16": 1024, "tf32": 512},
    90: {"fp16": 2048, "bf16": 2048, "tf32": 1024, "fp8": 4096},
}
SCHEDULERS_PER_SM = 4
MUFU_PER_CLOCK = 16
MODEL_NOTE = ("hot-loop model: an upper bound on tensor-core use from instruction issue, tensor-core and "
              "MUFU throughput; it does not see memory latency, bandwidth or stalls (not a GPU measurement)")

CLASSES = ("tensor", "global", "shared", "async", "integer", "float", "mufu", "sync", "branch", "other")
_TENSOR = {"HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "DMMA", "BMMA", "BGMMA"}
_GLOBAL = {"LDG", "STG", "LD", "ST", "ATOM", "ATOMG", "RED", "REDG", "CCTL", "LDGMC"}
_SHARED = {"LDS", "STS", "LDSM", "STSM", "ATOMS", "REDS"}
_ASYNC = {"LDGSTS", "LDGDEPBAR", "UTMALDG", "UTMASTG", "UTMAREDG", "UTMAPF", "UTMACCTL", "UTMACMDFLUSH",
          "UBLKCP", "UBLKRED", "UBLKPF"}
_SYNC = {"BAR", "DEPBAR", "WARPGROUP", "WARPSYNC", "SYNCS", "MEMBAR", "FENCE", "ERRBAR", "BSSY", "BSYNC",
         "ARRIVES", "NANOSLEEP", "YIELD", "CGAERRBAR", "UCGABAR_ARV", "UCGABAR_WAIT", "ELECT"}
_BRANCH = {"BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BREAK", "BPT", "KILL"}
_FLOAT = {"FADD", "FMUL", "FFMA", "FFMA2", "FADD2", "FMUL2", "FMNMX", "FSETP", "FSET", "FSEL", "FCHK",
          "FRND", "FSWZADD", "F2F", "F2I", "I2F", "I2FP", "F2IP", "F2FP", "HADD2", "HMUL2", "HFMA2", "HMNMX2",
          "HSETP2", "HSET2", "DADD", "DMUL", "DFMA", "DSETP", "DMNMX", "FMNMX3", "FADD32I", "FMUL32I", "FFMA32I"}
_INTEGER = {"IMAD", "IADD3", "IADD", "IADD32I", "LOP3", "LOP", "LOP32I", "SHF", "SHL", "SHR", "LEA", "ISETP",
            "IMNMX", "SEL", "VIADD", "VIADDMNMX", "VIMNMX", "VIMNMX3", "IABS", "POPC", "FLO", "BREV", "PRMT",
            "SGXT", "BMSK", "ISCADD", "IMUL", "IMUL32I", "IMAD32I", "IDP", "IDP4A", "BFE", "BFI", "ICMP",
            "UIADD3", "UIMAD", "ULOP3", "ULOP", "USHF", "ULEA", "UISETP", "USEL", "UPRMT", "USGXT", "UBMSK",
            "UFLO", "UPOPC", "UBREV", "UIMNMX", "UVIADD", "UIABS", "ULOP32I", "UIADD3.64"}

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*([^;]*);")
_TARGET = re.compile(r"0x([0-9a-f]+)\s*$")
_HGMMA_SHAPE = re.compile(r"\.(\d+)x(\d+)x(\d+)")
_HMMA_SHAPE = re.compile(r"\.(16|8)(8|16)(\d+)\b")


def parse(sass: str) -> list[dict]:
    """The instructions of the first function in `sass`, in address order: {addr, pred, op (the
    opcode with its modifiers), base (the opcode), args}. NOPs are kept (the loops' bounds need
    every address); counts leave them out."""
    body = sass.split("Function :", 1)[-1]
    out = []
    for m in _LINE.finditer(body):
        addr, pred, op, args = m.groups()
        out.append({"addr": int(addr, 16), "pred": (pred or "").strip(), "op": op, "base": op.split(".")[0],
                    "args": args.strip()})
    return out


def instruction_class(base: str) -> str:
    if base in _TENSOR:
        return "tensor"
    if base in _ASYNC:
        return "async"
    if base in _GLOBAL:
        return "global"
    if base in _SHARED:
        return "shared"
    if base == "MUFU":
        return "mufu"
    if base in _SYNC:
        return "sync"
    if base in _BRANCH:
        return "branch"
    if base in _FLOAT:
        return "float"
    if base in _INTEGER or (base.startswith("U") and base[1:] in _INTEGER):
        return "integer"
    return "other"


# --------------------------------------------------------------------------- control flow
def _blocks(instrs: list[dict]) -> tuple[list[tuple[int, int]], dict[int, list[int]]]:
    """Basic blocks as [start, end) index ranges and each block's successors (block indices)."""
    index_of = {ins["addr"]: i for i, ins in enumerate(instrs)}
    leaders = {0}
    targets = {}
    for i, ins in enumerate(instrs):
        if ins["base"] in ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "KILL"):
            m = _TARGET.search(ins["args"]) if ins["base"] in ("BRA", "JMP") else None
            if m and int(m.group(1), 16) in index_of:
                targets[i] = index_of[int(m.group(1), 16)]
                leaders.add(targets[i])
            leaders.add(i + 1)
    starts = sorted(s for s in leaders if s < len(instrs))
    ranges = [(s, e) for s, e in zip(starts, starts[1:] + [len(instrs)])]
    block_of = {s: b for b, (s, _) in enumerate(ranges)}
    succ: dict[int, list[int]] = {}
    for b, (s, e) in enumerate(ranges):
        last = instrs[e - 1]
        out = []
        if e - 1 in targets:
            out.append(block_of[targets[e - 1]])
        conditional = bool(last["pred"]) and last["pred"] not in ("@PT",)
        ends = last["base"] in ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "KILL")
        if (not ends or conditional) and e < len(instrs):
            out.append(b + 1)
        succ[b] = out
    return ranges, succ


def _dominators(n: int, succ: dict[int, list[int]]) -> list[int | None]:
    """Immediate dominators from block 0 (Cooper, Harvey and Kennedy's iterative algorithm)."""
    order, seen, stack = [], {0}, [(0, iter(succ[0]))]
    while stack:  # reverse postorder by an explicit DFS
        node, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            order.append(node)
            stack.pop()
        elif nxt not in seen:
            seen.add(nxt)
            stack.append((nxt, iter(succ[nxt])))
    order.reverse()
    rank = {b: i for i, b in enumerate(order)}
    preds: dict[int, list[int]] = {b: [] for b in range(n)}
    for b, outs in succ.items():
        for s in outs:
            preds[s].append(b)
    idom: list[int | None] = [None] * n
    idom[0] = 0

    def intersect(a, b):
        while a != b:
            while rank[a] > rank[b]:
                a = idom[a]
            while rank[b] > rank[a]:
                b = idom[b]
        return a

    changed = True
    while changed:
        changed = False
        for b in order[1:]:
            done = [p for p in preds[b] if idom[p] is not None and p in rank]
            if not done:
                continue
            new = done[0]
            for p in done[1:]:
                new = intersect(p, new)
            if idom[b] != new:
                idom[b], changed = new, True
    return idom


def _dominates(idom, a: int, b: int) -> bool:
    while True:
        if a == b:
            return True
        if idom[b] is None or idom[b] == b:
            return False
        b = idom[b]


def natural_loops(instrs: list[dict]) -> list[list[int]]:
    """Each natural loop (back edges to one header merged) as the sorted instruction indices of its
    blocks."""
    if not instrs:
        return []
    ranges, succ = _blocks(instrs)
    idom = _dominators(len(ranges), succ)
    preds: dict[int, list[int]] = {b: [] for b in range(len(ranges))}
    for b, outs in succ.items():
        for s in outs:
            preds[s].append(b)
    bodies: dict[int, set[int]] = {}
    for b, outs in succ.items():
        for h in outs:
            if idom[b] is not None and _dominates(idom, h, b):  # a back edge b -> h
                body = bodies.setdefault(h, {h})
                stack = [b]
                while stack:
                    x = stack.pop()
                    if x not in body:
                        body.add(x)
                        stack.extend(preds[x])
    return [sorted(i for blk in body for i in range(*ranges[blk])) for body in bodies.values()]


# --------------------------------------------------------------------------- the hot-loop model
def mma_shape(ins: dict) -> tuple[int, int, int] | None:
    if ins["base"] in ("HGMMA", "IGMMA", "QGMMA", "BGMMA"):
        m = _HGMMA_SHAPE.search(ins["op"])
    elif ins["base"] in ("HMMA", "IMMA", "DMMA", "BMMA"):
        m = _HMMA_SHAPE.search(ins["op"])
    else:
        return None
    return tuple(int(x) for x in m.groups()) if m else None


def mma_input(ins: dict) -> str:
    """The MMA's input type: bf16, fp16, tf32, fp8, int8 or fp64 (from its modifiers; an HMMA
    without one takes fp16)."""
    mods = set(ins["op"].split(".")[1:])
    if ins["base"] == "DMMA":
        return "fp64"
    if ins["base"] in ("IMMA", "IGMMA"):
        return "int8"
    for name, key in (("BF16", "bf16"), ("TF32", "tf32"), ("E4M3", "fp8"), ("E5M2", "fp8")):
        if name in mods:
            return key
    return "fp16"


def loop_counts(instrs: list[dict], indices: list[int]) -> dict:
    counts = dict.fromkeys(CLASSES, 0)
    for i in indices:
        if instrs[i]["base"] != "NOP":
            counts[instruction_class(instrs[i]["base"])] += 1
    return counts


def model_loop(instrs: list[dict], indices: list[int], num_warps: int, arch: int) -> dict:
    """The modeled bound of one loop (see the module docstring)."""
    counts = loop_counts(instrs, indices)
    macs, inputs = 0, set()
    for i in indices:
        shape = mma_shape(instrs[i])
        if shape is None:
            continue
        m, n, k = shape
        per = num_warps / 4 if instrs[i]["base"].endswith("GMMA") else num_warps
        macs += m * n * k * per
        inputs.add(mma_input(instrs[i]))
    total = sum(counts.values())
    rate = TENSOR_MACS_PER_CLOCK.get(arch, {}).get(next(iter(inputs)) if len(inputs) == 1 else "", None)
    issue = total * num_warps / SCHEDULERS_PER_SM
    mufu = counts["mufu"] * num_warps * 32 / MUFU_PER_CLOCK
    out = {"instructions": total, **counts, "macs": int(macs), "mma_input": ",".join(sorted(inputs)),
           "issue_cycles": round(issue, 1), "mufu_cycles": round(mufu, 1), "tensor_cycles": None, "bound": None,
           "limit": None}
    if rate and macs:
        tensor = macs / rate
        cycles = {"tensor": tensor, "issue": issue, "mufu": mufu}
        limit = max(cycles, key=cycles.get)
        out.update(tensor_cycles=round(tensor, 1), bound=round(tensor / cycles[limit], 3), limit=limit)
    return out


def hot_loop(sass: str, num_warps: int, arch: int) -> dict | None:
    """The hot loop of a kernel and its model, or None when no loop holds a tensor-core
    instruction. Innermost loops holding tensor-core instructions are candidates; the hot one
    does the most multiply-adds per iteration, and of those has the fewest instructions (a
    causal attention's unmasked loop rather than its diagonal one). `loops` lists every
    candidate."""
    instrs = parse(sass)
    loops = [set(body) for body in natural_loops(instrs)]
    tensor_loops = [b for b in loops if any(instrs[i]["base"] in _TENSOR for i in b)]
    innermost = [b for b in tensor_loops if not any(o < b for o in tensor_loops)]
    if not innermost:
        return None
    models = [model_loop(instrs, sorted(b), num_warps, arch) | {"first": hex(instrs[min(b)]["addr"])}
              for b in innermost]
    models.sort(key=lambda m: (-m["macs"], m["instructions"]))
    brief = ("first", "instructions", "tensor", "macs", "bound")
    return {**models[0], "loops": len(models), "other_loops": [{k: m[k] for k in brief} for m in models[1:]]}


# --------------------------------------------------------------------------- access widths
def global_access_widths(sass: str) -> dict:
    """Global loads and stores of the whole kernel by width in bits: {"load": {128: n, ...},
    "store": {...}} (LDG/STG; 32 where the opcode names no width)."""
    widths = {"load": {}, "store": {}}
    for ins in parse(sass):
        if ins["base"] not in ("LDG", "STG"):
            continue
        mods = ins["op"].split(".")[1:]
        bits = next((int(m) for m in mods if m in ("64", "128", "256")), None)
        if bits is None:
            bits = 16 if any(m in ("U16", "S16") for m in mods) else 8 if any(m in ("U8", "S8") for m in mods) else 32
        side = widths["load" if ins["base"] == "LDG" else "store"]
        side[bits] = side.get(bits, 0) + 1
    return widths
