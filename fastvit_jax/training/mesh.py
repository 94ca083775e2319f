"""Device mesh, batch / parameter shardings and multi-host start-up.

Classic auto-sharded (GSPMD) mesh: ``jax.sharding.Mesh(devices.reshape(...), names)``.
(``jax.make_mesh`` defaults to Explicit axes in JAX 0.10, which the linen model does not
expect.) The batch is split over every batch-like axis ('data' and 'fsdp'); parameters
are replicated, or with an 'fsdp' axis the large ones are split along their largest
dimension that the fsdp size divides.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # the mesh axes there are; the batch is split over all of them, in this order


def parse_mesh_spec(spec: str, num_devices: int) -> List[Tuple[str, int]]:
    """'data:-1,fsdp:4' -> [('data', n/4), ('fsdp', 4)]. At most one size may be -1."""
    axes = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if ":" not in part:
            raise ValueError(f"bad mesh axis {part!r} in {spec!r}; expected NAME:SIZE, e.g. 'data:-1,fsdp:4'")
        name, size = part.split(":", 1)
        name = name.strip()
        if name not in BATCH_AXES:
            raise ValueError(f"unknown mesh axis {name!r} in {spec!r}; known axes: {', '.join(BATCH_AXES)}")
        if name in [a for a, _ in axes]:
            raise ValueError(f"mesh axis {name!r} repeated in {spec!r}")
        try:
            n = int(size)
        except ValueError:
            raise ValueError(f"bad size {size!r} for mesh axis {name!r} in {spec!r}") from None
        if n == 0 or n < -1:
            raise ValueError(f"mesh axis {name!r} has size {n}; use a positive size or -1")
        axes.append((name, n))
    if not axes:
        raise ValueError(f"empty mesh spec {spec!r}")
    fixed = int(np.prod([n for _, n in axes if n != -1]))
    n_auto = sum(n == -1 for _, n in axes)
    if n_auto > 1:
        raise ValueError(f"at most one mesh axis may be -1 in {spec!r}")
    if n_auto == 1:
        if num_devices % fixed:
            raise ValueError(f"mesh {spec!r}: {num_devices} devices are not divisible by {fixed}")
        axes = [(a, num_devices // fixed if n == -1 else n) for a, n in axes]
    total = int(np.prod([n for _, n in axes]))
    if total != num_devices:
        raise ValueError(f"mesh {spec!r} has {total} devices but {num_devices} are available")
    return axes


def create_mesh(spec: str = "data:-1", devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A Mesh over all (global) devices, with auto axes."""
    devices = list(jax.devices() if devices is None else devices)
    axes = parse_mesh_spec(spec, len(devices))
    arr = np.array(devices, dtype=object).reshape([n for _, n in axes])
    return Mesh(arr, tuple(a for a, _ in axes))


def batch_axes(mesh: Mesh) -> Tuple[str, ...]:
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_size_divisor(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over all batch-like axes, rest replicated."""
    axes = batch_axes(mesh)
    return NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: Tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    """Shard the largest dim divisible by ``fsdp_size`` of tensors with >= min_size elements."""
    if fsdp_size <= 1 or not shape or int(np.prod(shape)) < min_size:
        return P()
    order = sorted(range(len(shape)), key=lambda i: (-shape[i], i))
    for i in order:
        if shape[i] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(mesh: Mesh, shape_tree: Any, *, fsdp_min_size: int) -> Any:
    """NamedShardings for a pytree of shapes (params, optimizer state, EMA, ...)."""
    fsdp = mesh.shape["fsdp"] if "fsdp" in mesh.axis_names else 1

    def rule(x):
        shape = tuple(getattr(x, "shape", ()))
        return NamedSharding(mesh, fsdp_spec(shape, fsdp, fsdp_min_size))

    return jax.tree.map(rule, shape_tree)
