"""The TPU compiler's own time estimate of a compiled program, per instruction and per model scope.

libtpu writes an ``"estimated_cycles"`` figure into the backend config of each instruction it
schedules (fusions, convolutions, copies). Summed over the instructions that run (those of the
entry computation and of loop and branch bodies, not the bodies of fusions, which their fusion
instruction already counts), it is the compiler's estimate of a step's length in cycles. Unlike
the roofline of ``aot.roofline``, which sees only FLOPs and bytes, it also sees work done badly:
a kernel whose layout wastes most of its lanes, or a relayout copy.

This is an undocumented field of the compiler's output, read from ``compiled.as_text()``: use it
to compare programs compiled by the same libtpu (before/after a change, one scope against
another), not as a time. Loop bodies count once (the training step has only small loops).
A program without the field (CPU, GPU) has no estimate: ``total_cycles`` returns None.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Dict, Iterator, List, Optional, Tuple

_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+)")
_INSTRUCTION = re.compile(r"^(?:ROOT )?%([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
_CALLED = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# wrappers of JAX's name stack that say how a scope was reached, not which model scope it is
_TRANSFORMS = re.compile(r"^(?:jit|jvp|transpose|vmap|pjit|checkpoint|remat|rematted_computation)\b")


@dataclasses.dataclass(frozen=True)
class InstructionCycles:
    """One scheduled instruction: its name, opcode, estimated cycles and JAX's op_name (the model
    scope that produced it, e.g. ``jit(train_step)/transpose(jvp(FastVit))/.../conv_general_dilated``)."""

    name: str
    opcode: str
    cycles: int
    op_name: str


def _computations(hlo_text: str) -> Dict[str, List[str]]:
    """Computation name -> its instruction lines."""
    computations: Dict[str, List[str]] = {}
    current: Optional[List[str]] = None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            match = _HEADER.match(line)
            current = computations.setdefault(match.group(1), []) if match else None
        elif current is not None and line.startswith("  "):
            current.append(line.strip())
    return computations


def instructions(hlo_text: str) -> Iterator[InstructionCycles]:
    """The instructions that carry a cycle estimate, outside fusion and reduction bodies."""
    computations = _computations(hlo_text)
    inlined = {name for lines in computations.values() for line in lines for name in _CALLED.findall(line)}
    for name, lines in computations.items():
        if name in inlined:
            continue
        for line in lines:
            cycles = _CYCLES.search(line)
            head = _INSTRUCTION.match(line)
            if cycles is None or head is None:
                continue
            op_name = _OP_NAME.search(line)
            yield InstructionCycles(head.group(1), head.group(2), int(cycles.group(1)),
                                    op_name.group(1) if op_name else "")


def total_cycles(hlo_text: str) -> Optional[int]:
    """The compiler's estimated cycles of the whole program, or None when it gives none."""
    found = [i.cycles for i in instructions(hlo_text)]
    return sum(found) if found else None


def scope_of(op_name: str) -> Tuple[str, str]:
    """(direction, scope) of an op_name: 'backward' when autodiff's transpose produced it, and the
    model path without JAX's transform wrappers and method scopes (``FastVit.forward_features``),
    blocks of a stage merged (``blocks_3`` -> ``blocks_*``)."""
    direction = "backward" if "transpose(" in op_name else "forward"
    parts = [p for p in op_name.split("/") if p and not _TRANSFORMS.match(p) and "." not in p]
    scope = re.sub(r"\bblocks_\d+\b", "blocks_*", "/".join(parts))
    return direction, scope or "(no scope)"


def cycles_by_scope(hlo_text: str) -> List[Tuple[str, str, int]]:
    """(direction, scope, cycles) summed per scope, largest first."""
    sums: collections.Counter = collections.Counter()
    for instruction in instructions(hlo_text):
        sums[scope_of(instruction.op_name)] += instruction.cycles
    return [(direction, scope, cycles) for (direction, scope), cycles in sums.most_common()]
