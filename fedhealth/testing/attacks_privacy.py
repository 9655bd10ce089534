"""Privacy attacks on a site: what a curious coordinator can send, against the site's own ledger.

The site approves the app, not the messages: a coordinator (or whoever runs its SuperLink) can
send the approved ClientApp any instruction, with any run config, any round, any model. Each
row (here: the policy's refusals; :mod:`fedhealth.testing.attacks_ledger`: charging) sends such
instructions to the site's real ClientApp (:func:`fedhealth.clientapp.app.
make_client_app`, called as Flower's SuperNode calls it) with a real ledger, on real NIfTI data,
and checks what left the site and what the ledger says: the site's policy refuses before
anything is charged, every update that leaves is charged (a retry resends the stored bytes),
concurrent runs never pass the cap together (recomputed with Google's ``dp-accounting``), and a
shortened ledger stops training.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedhealth.privacy.policy import SitePolicy
from fedhealth.testing.attacks_ledger import (
    concurrent_runs,
    one_patient_fewer,
    replay_after_purge,
    replays,
    retry_while_training,
    same_instruction_twice,
    truncated_ledger,
)
from fedhealth.testing.attacks_rows import Row
from fedhealth.testing.attacks_site import Site, outcome

__all__ = ["Site", "privacy_rows"]


def _refused_before_training(
    site: Site, name: str, tried: str, send: Callable[[], Any], field: str
) -> Row:
    """Check that ``send`` is refused with reply 1007 naming ``field`` and nothing is charged."""
    row = Row(name, tried, f"reply 1007 [policy: {field}]; ledger unchanged, no update")
    before = site.snapshot()
    reply = send()
    after = site.snapshot()
    row.evidence += [f"reply: {outcome(reply)}", f"ledger files unchanged: {before == after}"]
    row.refused = (
        reply.has_error()
        and reply.error.code == 1007
        and reply.error.reason.endswith(f"[policy: {field}]")
        and before == after
    )
    row.happened = "refused before training, nothing charged" if row.refused else "NOT refused"
    return row


def policy_rows(strict: Site, plain: Site) -> list[Row]:
    """Send one instruction per field the site's policy bounds: each refused, nothing charged.

    ``strict`` keeps the default policy (DP and secure aggregation required); ``plain`` allows
    plain train instructions, so each bound is the first limit its instruction breaks.
    """
    cases = [
        ("DP switched off", strict, ("privacy=off",), "require_dp"),
        ("plain train, secure agg. required", strict, (), "require_secure_aggregation"),
        ("rounds over the site's limit", plain, ("rounds=500",), "max_rounds_per_run"),
        ("clip norm out of bounds", plain, ("privacy.max_grad_norm=1000",), "max_grad_norm"),
        ("local epochs over the limit", plain, ("train.local_epochs=50",), "max_local_epochs"),
        ("learning rate out of bounds", plain, ("train.lr=50",), "lr"),
        ("a model the site does not train", plain, ("model=segresnet",), "models"),
        ("noise above ceiling", plain, ("privacy.noise_multiplier=40",), "max_noise_multiplier"),
        ("a model too large for the site", plain,
         ("model.channels=[64,128,256]", "model.strides=[2,2]"), "max_model_parameters"),
        ("a patch too large", plain, ("data.patch_size=512",), "max_patch_size"),
        ("a grid too fine", plain, ("data.target_spacing=0.05",), "min_target_spacing"),
        ("a batch too large", plain, ("train.batch_size=4096",), "max_batch_size"),
        ("too many windows at once", plain, ("data.sw_batch_size=4096",), "max_sw_batch_size"),
        ("more threads than the site has", plain, ("train.num_threads=4096",), "max_num_threads"),
    ]  # fmt: skip
    rows = []
    for name, site, overrides, field in cases:

        def send(site: Site = site, overrides: tuple[str, ...] = overrides) -> Any:
            return site.send(overrides)

        tried = f"a train instruction with {' '.join(overrides) or 'no secure aggregation'}"
        rows.append(_refused_before_training(site, name, tried, send, field))

    def evaluate() -> Any:  # the compute limits hold for evaluation instructions too
        return plain.deliver(plain.instruction(("data.patch_size=512",), message_type="evaluate"))

    rows.append(
        _refused_before_training(
            plain,
            "an evaluation patch too large",
            "an evaluate instruction with data.patch_size=512",
            evaluate,
            "max_patch_size",
        )
    )
    return rows


def out_of_range_fields(site: Site) -> Row:
    """Send instruction fields no coordinator's config would allow, one at a time.

    The coordinator validates its own config, but the site reads what arrives: each value is
    written straight into an otherwise valid train instruction's ``config`` record.
    """
    from fedhealth.protocol import keys as K

    cases: list[tuple[str, float | int | str]] = [
        ("model.num_res_units", 300),  # 600 convolutions' activations
        ("data.sw_overlap", 0.999),  # sliding windows one voxel apart
        ("train.weight_decay", -1.0),
        ("train.lr_decay", 0.0),
        ("model.norm", "batch"),  # BatchNorm breaks DP-SGD's per-sample gradients
        ("model.in_channels", 7),  # not the sequences the site's dataset.json declares
        ("privacy.accountant", "none"),
        (K.PROXIMAL_MU, -1.0),
        (K.SERVER_ROUND, -1),
        (K.SERVER_ROUND, float("inf")),
        (K.SERVER_ROUND, 1e300),
        (K.EVALUATE_ROUND, -2),
    ]
    row = Row(
        "out-of-range instruction fields",
        "a train instruction with, one at a time: "
        + ", ".join(f"{key}={value!r}" for key, value in cases),
        "each refused with an error reply before anything is read, trained or charged",
    )
    before, held = site.snapshot(), []
    for key, value in cases:
        msg = site.instruction()
        msg.content[K.CONFIG][key] = value
        reply = site.deliver(msg)
        held.append(reply.has_error() and reply.error.code in (1001, 1003, 1007))
        row.evidence += [f"{key}={value!r}: {outcome(reply)}"]
    unchanged = site.snapshot() == before
    row.evidence += [f"ledger files unchanged: {unchanged}"]
    row.refused = all(held) and unchanged
    row.happened = "every field refused, nothing charged" if row.refused else "NOT all refused"
    return row


def _advertise(site: Site, neighbours: list[int], threshold: int) -> Any:
    """Send the site a secure sum's advertise stage: it is site 1 among ``neighbours``."""
    from flwr.app import ConfigRecord, ConfigRecordValues, Message, RecordDict

    from fedhealth.protocol import keys as K

    record: dict[str, ConfigRecordValues] = {
        K.SECAGG_SITE_ID: 1,
        K.SECAGG_NEIGHBOURS: neighbours,
        K.SECAGG_THRESHOLD: threshold,
        K.SECAGG_CLIP: 8.0,
        K.SECAGG_LEVELS: 1 << 20,
        K.SECAGG_MAX_EXAMPLES: 1024,
        K.SECAGG_SIZE: len(neighbours) + 1,
    }
    content = RecordDict({K.SECAGG: ConfigRecord(record)})
    return site.app(Message(content, 0, f"train.{K.STAGE_ADVERTISE}"), site.context())


def secure_sum_too_small(site: Site) -> Row:
    """Announce a secure sum of two sites (each could subtract its own update from the sum)."""
    return _refused_before_training(
        site,
        "secure sum of 2 sites",
        "a secure-aggregation round announcing 2 sites (the site's policy: at least 3)",
        lambda: _advertise(site, [2], 2),
        "min_secagg_sites",
    )


def secagg_threshold_too_low(site: Site) -> Row:
    """Announce a Shamir threshold of half the share holders (2 of 4).

    Sites told different survivor lists at unmask would then reveal two seed shares and two
    key shares of one site: enough to rebuild both and unmask its update.
    """
    return _refused_before_training(
        site,
        "Shamir threshold of half",
        "a secure sum of 4 sites announcing threshold 2 (half the share holders)",
        lambda: _advertise(site, [2, 3, 4], 2),
        "threshold",  # fedhealth.protocol.keys.SECAGG_THRESHOLD
    )


class _SiteLog(logging.Handler):
    """Keep the site's log lines (the reply carries only the catalogue text)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def non_finite_global_models(site: Site) -> list[Row]:
    """Send a global model with a NaN or infinite value, in each wire dtype a site accepts.

    A coordinator chooses the record: one float32 array per tensor, or one packed vector in
    float16 or bfloat16 (``federation.transport_dtype``). Training from such a model would
    charge the ledger for an update the site then has to refuse: the site refuses it first.
    """
    import numpy as np

    from fedhealth.protocol import keys as K
    from fedhealth.protocol.packing import pack

    cases = [("float32", float("nan")), ("float16", float("inf")), ("bfloat16", float("nan"))]
    rows = []
    for wire, value in cases:
        msg = site.instruction()
        state = msg.content.array_records[K.ARRAYS].to_numpy_ndarrays()
        keys = list(msg.content.array_records[K.ARRAYS].keys())
        tensors = {k: np.array(v, dtype=np.float32) for k, v in zip(keys, state, strict=True)}
        tensors[keys[-1]].flat[0] = value
        if wire == "float32":
            from flwr.app import Array, ArrayRecord

            record = ArrayRecord({k: Array(v) for k, v in tensors.items()})
        else:
            record = pack(tensors, wire)
        msg.content.array_records[K.ARRAYS] = record
        name = f"{'NaN' if value != value else 'inf'} in a {wire} global model"
        row = Row(name, f"a train instruction whose global model ({wire}) holds {value}",
                  f"reply 1003, site log names {keys[-1]!r}; ledger unchanged")  # fmt: skip
        before, said = site.snapshot(), _SiteLog()
        logging.getLogger("fedhealth.site").addHandler(said)
        try:
            reply = site.deliver(msg)
        finally:
            logging.getLogger("fedhealth.site").removeHandler(said)
        after = site.snapshot()
        named = any(repr(keys[-1]) in line and "NaN or infinite" in line for line in said.lines)
        row.evidence += [
            f"reply: {outcome(reply)}",
            f"site log names the tensor: {named}",
            f"ledger files unchanged: {before == after}",
        ]
        row.refused = reply.has_error() and reply.error.code == 1003 and named and before == after
        row.happened = (
            "refused before training, nothing charged" if row.refused else "NOT refused first"
        )
        rows.append(row)
    return rows


def privacy_rows(workdir: Path, data: Path) -> list[Row]:
    """Run every privacy row against fresh sites under ``workdir`` (``data`` is only read).

    Parameters
    ----------
    workdir : Path
        Where the sites' ledgers go (created).
    data : Path
        A site's data directory (a Decathlon ``dataset.json`` with patient ids).

    Returns
    -------
    list of Row
        The rows, in the table's order.
    """
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    workdir.mkdir(parents=True, exist_ok=True)
    # a site with modest hardware: U-Nets of up to a million parameters
    strict = Site(
        workdir / "strict", data, SitePolicy(models=["unet"], max_model_parameters=1_000_000)
    )
    plain_policy = dataclasses.replace(strict.policy, require_secure_aggregation=False)
    plain = Site(workdir / "plain", data, plain_policy)
    rows = policy_rows(strict, plain)
    withheld = Site(workdir / "withheld", data, dataclasses.replace(plain_policy, release=[]))

    def evaluate() -> Any:  # un-noised, uncharged statistics of the site's test cases
        return withheld.deliver(withheld.instruction(message_type="evaluate"))

    rows.append(
        _refused_before_training(
            withheld,
            "evaluation the site withholds",
            "an evaluate instruction to a site whose policy.release lacks evaluation",
            evaluate,
            "release",
        )
    )
    rows.append(out_of_range_fields(plain))
    rows.append(secure_sum_too_small(strict))
    rows.append(secagg_threshold_too_low(strict))
    rows += non_finite_global_models(plain)
    rows.append(replays(plain, one_patient_fewer(data, workdir / "changed-data")))
    rows.append(replay_after_purge(plain))
    rows.append(retry_while_training(plain))
    rows.append(same_instruction_twice(plain))
    _, rate, steps = plain.phases()[0]  # what one round of this run costs at this site
    rows.append(truncated_ledger(plain))
    rows.append(concurrent_runs(workdir / "concurrent", data, plain_policy, rate, int(steps)))
    shutil.rmtree(workdir / "changed-data", ignore_errors=True)
    return rows
