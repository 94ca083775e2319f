"""Human-readable outputs: metrics.jsonl, TensorBoard scalars, a PNG of the curves.

View the TensorBoard scalars with ``tensorboard --logdir <workdir>/tensorboard``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional, Tuple

from fastvit_jax.io import write_text_atomically

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"  # view with: tensorboard --logdir <workdir>/tensorboard

log = logging.getLogger("fastvit_jax.training")


class MetricWriter:
    """Appends {'step', 'kind', ...} records to metrics.jsonl and TensorBoard (process 0)."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILENAME)
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            drop_torn_last_line(self.path)  # what kill -9 or a full disk mid-append leaves
            if tensorboard:
                import tensorflow as tf

                self._tb = tf.summary.create_file_writer(os.path.join(workdir, TENSORBOARD_DIRNAME))

    def write(self, step: int, kind: str, scalars: Dict[str, float]) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "kind": kind, **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            import tensorflow as tf

            with self._tb.as_default():
                for k, v in scalars.items():
                    tf.summary.scalar(f"{kind}/{k}", float(v), step=int(step))
            self._tb.flush()

    def truncate_after(self, step: int) -> int:
        """Drops metrics.jsonl records after ``step`` (a resume from that checkpoint logs them again).

        Returns how many were dropped. TensorBoard does the same for its event files when it
        sees a step go back (its default ``--purge_orphaned_data``).
        """
        if not self.enabled or not os.path.exists(self.path):
            return 0
        records = read_metrics(self.path)
        kept = [r for r in records if r["step"] <= step]
        if len(kept) < len(records):
            write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return len(records) - len(kept)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _parse_records(path: str) -> Tuple[List[dict], int]:
    """(records, bytes of a torn last line or 0). A damaged line before the last is a ValueError naming it."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records: List[dict] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if number == len(lines):  # no newline after it: an append cut short
                return records, len(line)
            raise ValueError(f"{path} line {number} is not a JSON record ({e}); edit or delete that line") from None
    return records, 0


def drop_torn_last_line(path: str) -> None:
    """Removes a torn last record of metrics.jsonl (with a warning); the steps it held are logged again."""
    if not os.path.exists(path):
        return
    records, torn = _parse_records(path)
    if torn:
        log.warning("%s: dropped a torn last line (%d bytes, an append cut short by a crash or a full disk)", path,
                    torn)
        write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in records))


def read_metrics(workdir_or_path: str) -> List[dict]:
    """The records of metrics.jsonl (a torn last line is left out)."""
    path = workdir_or_path
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILENAME)
    if not os.path.exists(path):
        return []
    return _parse_records(path)[0]


def _last_per_step(records: List[dict], kind: str, key: str) -> Tuple[List[int], List[float]]:
    """(steps, values) of ``key`` in records of ``kind``; a resumed run's re-logged step keeps its last value."""
    by_step = {r["step"]: r[key] for r in records if r["kind"] == kind and key in r}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_curves(workdir: str, out_path: Optional[str] = None) -> Optional[str]:
    """Loss, validation accuracy and learning rate against the step, one shared x axis -> PNG.

    Returns the path, or None when there is nothing to plot. Evaluations are drawn as
    lines with markers, so several form a curve.
    """
    records = read_metrics(workdir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(3, 1, sharex=True, figsize=(8, 9))
    steps, losses = _last_per_step(records, "train", "loss")
    if steps:
        ax_loss.plot(steps, losses, label="train loss")
    for prefix, style in (("", "-o"), ("ema_", "--s")):
        which = "EMA" if prefix else "raw"
        steps, losses = _last_per_step(records, "eval", f"{prefix}loss")
        if steps:
            ax_loss.plot(steps, losses, style, label=f"val loss ({which})")
        for k in ("top1", "top5"):
            steps, accs = _last_per_step(records, "eval", f"{prefix}{k}")
            if steps:
                ax_acc.plot(steps, [100 * a for a in accs], style, label=f"val {k} ({which})")
    steps, rates = _last_per_step(records, "train", "lr")
    if steps:
        ax_lr.plot(steps, rates, label="learning rate (mean over each log interval)")
    for ax, title, ylabel in ((ax_loss, "loss", "loss"), (ax_acc, "validation accuracy", "accuracy (%)"),
                              (ax_lr, "learning rate", "lr")):
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    ax_lr.set_xlabel("step")
    fig.tight_layout()
    out_path = out_path or os.path.join(workdir, "curves.png")
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
