"""The one measure the project compares two outputs by (parity tests, converters, exports, benchmarks)."""

from typing import Any

import numpy as np


def relative_error(actual: Any, reference: Any) -> float:
    """max |actual - reference| / max |reference|, in float64.

    Array-likes of one shape: NumPy or JAX arrays, CPU torch tensors (detached here), TF tensors.
    """
    a, b = (np.asarray(x.detach() if hasattr(x, "detach") else x, dtype=np.float64) for x in (actual, reference))
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
