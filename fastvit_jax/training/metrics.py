"""Human-readable outputs: metrics.jsonl, TensorBoard summaries, a PNG of the curves."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

METRICS_FILENAME = "metrics.jsonl"


def _scalar_metadata():
    from tensorflow.core.framework import summary_pb2

    md = summary_pb2.SummaryMetadata()
    md.plugin_data.plugin_name = "scalars"
    return md


class MetricWriter:
    """Appends {'step', 'kind', ...} records to metrics.jsonl and TensorBoard (process 0)."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILENAME)
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                try:
                    import tensorflow as tf

                    self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
                except Exception:  # pragma: no cover - TensorBoard is optional
                    self._tb = None

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
                    # tf.summary.scalar needs the tensorboard package; the core op with the
                    # scalars-plugin metadata writes the same event TensorBoard reads.
                    tf.summary.write(f"{kind}/{k}", tf.constant(float(v), tf.float32), step=int(step),
                                     metadata=_scalar_metadata())
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir_or_path: str) -> List[dict]:
    path = workdir_or_path
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILENAME)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(workdir: str, out_path: Optional[str] = None) -> Optional[str]:
    """Training loss and eval accuracy vs step -> PNG. Returns the path (None if no data)."""
    recs = read_metrics(workdir)
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = {}
    for r in recs:  # a resumed run may re-log steps: keep the last record per step
        if r["kind"] == "train" and "loss" in r:
            train[r["step"]] = r["loss"]
    evals = [r for r in recs if r["kind"] == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if train:
        steps = sorted(train)
        ax.plot(steps, [train[s] for s in steps], label="train loss")
    for prefix, style in (("", "-o"), ("ema_", "--s")):
        pts = [(r["step"], r[f"{prefix}loss"]) for r in evals if f"{prefix}loss" in r]
        if pts:
            ax.plot(*zip(*pts), style, label=f"val loss ({'EMA' if prefix else 'raw'})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    for prefix, style in (("", "-o"), ("ema_", "--s")):
        for k in ("top1", "top5"):
            pts = [(r["step"], 100 * r[f"{prefix}{k}"]) for r in evals if f"{prefix}{k}" in r]
            if pts:
                ax.plot(*zip(*pts), style, label=f"val {k} ({'EMA' if prefix else 'raw'})")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("validation accuracy")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    out_path = out_path or os.path.join(workdir, "curves.png")
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
