"""Validate a site's training reply before it can touch the global model.

A reply is accepted only if its arrays have exactly the global model's keys, shapes and dtypes,
every value is finite, and its example count is a whole number within ``[1, max_examples]``
(FedAvg weights by that count, so an unbounded count would let one site outvote the rest).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedhealth.errors import UpdateRejected

WEIGHT_KEY = "num-examples"


def validate_update(
    reference: ArrayRecord, content: RecordDict, max_examples: int, site: str = "?"
) -> int:
    """Raise :class:`UpdateRejected` naming the site and field; returns the example count."""
    arrays = content.array_records
    if list(arrays) != ["arrays"]:
        raise UpdateRejected(f"site {site}: expected one ArrayRecord 'arrays', got {list(arrays)}")
    update = arrays["arrays"]
    missing, extra = set(reference) - set(update), set(update) - set(reference)
    if missing or extra:
        raise UpdateRejected(
            f"site {site}: parameter keys differ (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(extra)[:3]})"
        )
    for key, ref in reference.items():
        arr = update[key]
        if tuple(arr.shape) != tuple(ref.shape) or arr.dtype != ref.dtype:
            raise UpdateRejected(
                f"site {site}: parameter {key!r} is {arr.dtype}{list(arr.shape)}, "
                f"expected {ref.dtype}{list(ref.shape)}"
            )
        values = arr.numpy()
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise UpdateRejected(f"site {site}: parameter {key!r} has NaN or infinite values")
    metrics = content.metric_records
    if len(metrics) != 1:
        raise UpdateRejected(f"site {site}: expected one MetricRecord, got {list(metrics)}")
    record = next(iter(metrics.values()))
    count = record.get(WEIGHT_KEY)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= max_examples:
        raise UpdateRejected(
            f"site {site}: field {WEIGHT_KEY!r}={count!r} is not an integer in [1, {max_examples}]"
        )
    return count
