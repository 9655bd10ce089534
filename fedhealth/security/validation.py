"""Validate a site's reply before it can touch the global model or the round log.

A training reply is accepted only if

* it holds exactly one ArrayRecord, ``arrays``, with exactly the global model's keys and no more
  bytes than the global model: both are checked before any array is decoded;
* for every parameter, the Array's metadata *and* the ``.npy`` header inside its bytes give the
  global model's dtype and shape, the bytes hold exactly that many values (no more, no less) and
  every value is finite. Flower aggregates what the bytes decode to, not what the metadata says,
  so the header is read, and bounded, before the bytes are loaded;
* it holds exactly one MetricRecord of at most :data:`MAX_METRICS` finite numbers (no bool,
  string or list), with an example count that is a whole number within ``[1, max_examples]``
  (FedAvg weights by that count, so an unbounded count would let one site outvote the rest).

Every rejection raises :class:`UpdateRejected` naming the site and the field. Names and values
that come from the site are shortened (``reprlib``) before they go into a reason.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fedhealth.errors import UpdateRejected
from fedhealth.protocol import keys as K
from fedhealth.protocol.npy import npy_header
from fedhealth.protocol.packing import packed_key

WEIGHT_KEY = K.NUM_EXAMPLES
MAX_METRICS = 64
HISTORY_KEYS = (K.HISTORY_NOISE, K.HISTORY_RATE, K.HISTORY_STEPS)
NUMPY_STYPE = "numpy.ndarray"
_INT_RANGE = (-(2**63), 2**64 - 1)  # what a MetricRecord carries on the wire (sint64, uint64)

_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist = 60, 60, 3


def _r(value: object) -> str:
    return _short.repr(value)


def _keys(keys: Iterable[str]) -> str:
    return _r(sorted(keys))


def is_number(value: object) -> bool:
    """Tell whether ``value`` is a finite int or float, as a MetricRecord carries it.

    Parameters
    ----------
    value : object
        A value from a site's reply.

    Returns
    -------
    bool
        True for an ``int`` within [-2**63, 2**64 - 1] or a finite ``float`` (exact types:
        bool and subclasses are refused); False for anything else (str, list, NaN, inf).
    """
    if type(value) is int:
        return _INT_RANGE[0] <= value <= _INT_RANGE[1]
    return type(value) is float and math.isfinite(value)


def nbytes(record: ArrayRecord) -> int:
    """Count the bytes of the arrays' payloads (``.npy`` header included).

    Parameters
    ----------
    record : ArrayRecord
        A model or an update.

    Returns
    -------
    int
        Sum of ``len(array.data)`` over its arrays.
    """
    return sum(len(array.data) for array in record.values())


def validate_update(
    reference: ArrayRecord,
    content: RecordDict,
    max_examples: int,
    site: str = "?",
    required_metrics: Iterable[str] = (WEIGHT_KEY,),
) -> int:
    """Validate a site's training reply against the global model; return its example count.

    Checks run in the order of the module docstring: the record's layout and size before any
    array is decoded, then the metrics, then each parameter's metadata, ``.npy`` header,
    length and values.

    Parameters
    ----------
    reference : ArrayRecord
        The global model the site trained from.
    content : RecordDict
        The reply's content.
    max_examples : int
        Largest example count accepted.
    site : str, default "?"
        The site's name, for the error message.
    required_metrics : iterable of str, default (``num-examples``,)
        Metrics the reply must hold.

    Returns
    -------
    int
        The reply's example count, in [1, max_examples].

    Raises
    ------
    UpdateRejected
        Naming the site and the field, at the first check that fails.
    """
    arrays = content.array_records
    if list(arrays) != [K.ARRAYS]:
        raise UpdateRejected(
            f"site {site}: field 'arrays': expected exactly one ArrayRecord "
            f"'arrays', got {len(arrays)}: {_keys(arrays)}"
        )
    update = arrays[K.ARRAYS]
    if len(update) != len(reference) or set(update) != set(reference):
        missing, extra = set(reference) - set(update), set(update) - set(reference)
        raise UpdateRejected(
            f"site {site}: field 'arrays': parameter keys differ ({len(update)} parameters, "
            f"expected {len(reference)}; missing {_keys(missing)}, unexpected {_keys(extra)})"
        )
    size, limit = nbytes(update), nbytes(reference)
    if size > limit:
        detail = ""
        for key, ref in reference.items():  # name the (first) parameter that grew
            got = update[key]
            if len(got.data) > len(ref.data):
                detail = (
                    f"; parameter {key!r} is {len(got.data)} bytes, declared "
                    f"{_r(got.dtype)}{_r(list(got.shape))}, expected {len(ref.data)} "
                    f"bytes, {ref.dtype}{list(ref.shape)}"
                )
                break
        raise UpdateRejected(
            f"site {site}: field 'arrays' is {size} bytes, more than the "
            f"reference model's {limit} bytes{detail}"
        )
    metrics = content.metric_records
    if len(metrics) != 1:
        raise UpdateRejected(
            f"site {site}: expected exactly one MetricRecord, got {len(metrics)}: {_keys(metrics)}"
        )
    count = validate_metrics(next(iter(metrics.values())), max_examples, site, required_metrics)
    for key, ref in reference.items():
        _check_array(site, key, update[key], ref)
    return count


BFLOAT16_KEY = packed_key("bfloat16")
"""A packed bfloat16 vector travels as uint16 bits: its NaN and infinities are checked by bits."""


def _check_array(site: str, key: str, array: Array, ref: Array) -> None:
    """Metadata, then the ``.npy`` header, then the exact length, then the values."""
    field = f"site {site}: parameter {key!r}"
    want_dtype, want_shape = np.dtype(ref.dtype), tuple(ref.shape)
    if array.stype != NUMPY_STYPE or array.dtype != ref.dtype or tuple(array.shape) != want_shape:
        raise UpdateRejected(
            f"{field} is declared {_r(array.stype)} {_r(array.dtype)}"
            f"{_r(list(array.shape))}, expected {NUMPY_STYPE} {ref.dtype}"
            f"{list(want_shape)}"
        )
    data = array.data
    try:  # the header only: a header may claim any shape, loading it could allocate terabytes
        shape, _, dtype, offset = npy_header(data)
    except Exception as exc:  # noqa: BLE001 - any unreadable header is a rejection, never a crash
        raise UpdateRejected(f"{field}: bytes are not a .npy array ({_r(str(exc))})") from None
    if dtype != want_dtype or tuple(shape) != want_shape:
        raise UpdateRejected(
            f"{field}: its bytes hold {_r(str(dtype))}{_r(list(shape))}, "
            f"expected {want_dtype}{list(want_shape)}"
        )
    expected = offset + want_dtype.itemsize * math.prod(want_shape)
    if len(data) != expected:
        raise UpdateRejected(f"{field} is {len(data)} bytes, its shape and header make {expected}")
    # read in place: the length is exact (checked above), so no copy through np.load
    values = np.frombuffer(data, dtype=want_dtype, count=math.prod(want_shape), offset=offset)
    if values.dtype.kind in "fc" and not np.isfinite(values).all():
        raise UpdateRejected(f"{field} has NaN or infinite values")
    if key == BFLOAT16_KEY and ((values & 0x7F80) == 0x7F80).any():  # exponent all ones
        raise UpdateRejected(f"{field} has NaN or infinite values (bfloat16 bits)")


def validate_metrics(
    record: Mapping[str, Any],
    max_examples: int,
    site: str = "?",
    required: Iterable[str] = (WEIGHT_KEY,),
    bounds: Mapping[str, tuple[float, float]] | None = None,
    *,
    weighted: bool = True,
) -> int:
    """Validate a reply's metrics; return its example count.

    At most :data:`MAX_METRICS` finite numbers (:func:`is_number`), the ``required`` keys
    present, each within its ``bounds``, the example count an int in ``[1, max_examples]``.

    Parameters
    ----------
    record : mapping of str to Any
        The reply's MetricRecord (or its items).
    max_examples : int
        Largest example count accepted.
    site : str, default "?"
        The site's name, for the error message.
    required : iterable of str, default (``num-examples``,)
        Metrics that must be present.
    bounds : mapping of str to (float, float) or None, default None
        Metric -> inclusive (low, high); unlisted metrics are unbounded.
    weighted : bool, default True
        Keyword-only. The reply must carry its example count. False: a site's metrics beside
        its masked update, whose count is inside the secure sum; a count it releases anyway
        is still checked.

    Returns
    -------
    int
        The example count (0 when ``weighted`` is False and the reply carries none).

    Raises
    ------
    UpdateRejected
        Naming the site and the metric that fails.
    """
    values = dict(record.items())
    if len(values) > MAX_METRICS:
        raise UpdateRejected(
            f"site {site}: MetricRecord has {len(values)} entries, at most "
            f"{MAX_METRICS} are accepted"
        )
    for key in required:
        if key not in values:
            raise UpdateRejected(f"site {site}: metric {key!r} is missing")
    count = values.get(WEIGHT_KEY)
    if not weighted and count is None:
        count = 0
    elif type(count) is not int or not 1 <= count <= max_examples:
        raise UpdateRejected(
            f"site {site}: field {WEIGHT_KEY!r}={_r(count)} is not an integer in "
            f"[1, {max_examples}]"
        )
    for key, value in values.items():
        if not is_number(value):
            raise UpdateRejected(
                f"site {site}: metric {_r(key)}={_r(value)} is not a finite number"
            )
        low, high = (bounds or {}).get(key, (-math.inf, math.inf))
        if not low <= value <= high:
            raise UpdateRejected(
                f"site {site}: metric {key!r}={_r(value)} is outside [{low}, {high}]"
            )
    return count


def validate_accounting(about: Mapping[str, Any], site: str = "?") -> None:
    """Validate the DP history a site sends with its epsilon (``site`` ConfigRecord).

    The noise multipliers, sample rates and steps must be lists of finite numbers, one entry
    per phase, so that anyone can recompute the epsilon; a missing list counts as empty.

    Parameters
    ----------
    about : mapping of str to Any
        The reply's ``site`` ConfigRecord.
    site : str, default "?"
        The site's name, for the error message.

    Raises
    ------
    UpdateRejected
        If a list holds something other than finite numbers, or the lists differ in length.
    """
    lists = {key: about.get(key, []) for key in HISTORY_KEYS}
    for key, value in lists.items():
        if not isinstance(value, list) or not all(is_number(v) for v in value):
            raise UpdateRejected(
                f"site {site}: field {key!r}={_r(value)} is not a list of finite numbers"
            )
    if len({len(v) for v in lists.values()}) > 1:
        raise UpdateRejected(
            f"site {site}: privacy history lengths differ "
            f"({', '.join(f'{k}: {len(v)}' for k, v in lists.items())})"
        )
