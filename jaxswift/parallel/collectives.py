"""Counting the collectives of a compiled step: how many of each kind run per call, and how many bytes they move.

Reads the optimized HLO text (`jax.jit(f).lower(...).compile().as_text()`). A collective inside a while loop
(a scan) counts once per iteration: loops carry XLA's `known_trip_count`, and nested computations multiply.
Bytes are the collective's output per device (for all-gather the gathered result, for reduce-scatter the
scattered shard, for all-reduce / all-to-all / collective-permute the buffer itself), summed over tuple outputs.
"""

from __future__ import annotations

import collections
import dataclasses
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
                "s4": 0.5, "u4": 0.5}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(?:body|to_apply|calls|true_computation|false_computation|branch_computations)="
                     r"\{?%?([\w.\-]+(?:,\s*%?[\w.\-]+)*)\}?")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass
class CollectiveStats:
    count: int = 0
    bytes: float = 0

    def __iadd__(self, other):
        self.count += other.count
        self.bytes += other.bytes
        return self


def shape_bytes(type_text: str) -> float:
    """Bytes of an HLO type such as `f32[4,16]{1,0}` or a tuple `(f32[2], bf16[3,3])`."""
    total = 0.0
    for dtype, dims in _SHAPE.findall(type_text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def _kind(op: str) -> str | None:
    base = op.removesuffix("-start")
    return base if base in KINDS else None


def _parse(hlo_text: str):
    """{computation: (local {kind: CollectiveStats}, [(callee, multiplier)])} and the entry's name."""
    comps, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(1)
            comps[current] = (collections.defaultdict(CollectiveStats), [])
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is None:
            continue
        inst = _INSTRUCTION.match(line)
        if not inst:
            continue
        out_type, op, rest = inst.groups()
        kind = _kind(op)
        if kind:
            comps[current][0][kind] += CollectiveStats(1, shape_bytes(out_type))
        trips = 1
        if op == "while":
            found = _TRIP.search(rest)
            trips = int(found.group(1)) if found else 1
        for group in _CALLEE.findall(rest):
            for callee in re.split(r",\s*%?", group):
                comps[current][1].append((callee.lstrip("%"), trips if op == "while" else 1))
    return comps, entry


def count_collectives(hlo_text: str) -> dict[str, CollectiveStats]:
    """{kind: CollectiveStats(count, bytes)} per execution of the module's entry computation."""
    comps, entry = _parse(hlo_text)
    memo: dict[str, dict] = {}

    def total(name: str, stack=()) -> dict:
        if name in memo:
            return memo[name]
        out = collections.defaultdict(CollectiveStats)
        if name not in comps or name in stack:
            return out
        local, callees = comps[name]
        for kind, stats in local.items():
            out[kind] += CollectiveStats(stats.count, stats.bytes)
        for callee, times in callees:
            for kind, stats in total(callee, stack + (name,)).items():
                out[kind] += CollectiveStats(stats.count * times, stats.bytes * times)
        memo[name] = out
        return out

    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return {k: v for k, v in total(entry).items() if v.count}


def compiled_collectives(jitted, *args, **kwargs) -> dict[str, CollectiveStats]:
    """Lowers and compiles `jitted` for these arguments and counts its collectives."""
    return count_collectives(jitted.lower(*args, **kwargs).compile().as_text())
