"""A site still uploading is not dropped as dead.

A real consortium (TLS, enrolled sites, site daemons, coordinator service) where one site
reaches the coordinator through a throttled uplink: its update (a 4.7M-parameter U-Net, 19 MB)
takes longer to upload than the SuperLink's patience for a silent node (2 x the heartbeat
interval, 20 s here: ``heartbeat_interval=10``, the shortest the SuperLink accepts). The site's
heartbeats must go on during the upload and its update must be in the round.
"""

from __future__ import annotations

import pytest

from fedhealth.config import compose
from fedhealth.protocol.transport import model_values, wire_bytes
from fedhealth.runs.rundir import read_metrics

from .consortium import Consortium
from .throttle import ThrottledLink

pytestmark = pytest.mark.slow

HEARTBEAT = 10.0  # seconds; the SuperLink takes a node for dead after 2 x this
RATE = 600_000.0  # bytes per second upstream on the slow site's link (4.8 Mb/s)
MODEL = [
    "model.channels=[32,64,128,256]",
    "model.strides=[2,2,2]",
    "model.num_res_units=2",
]


def test_a_site_uploading_for_longer_than_the_heartbeat_patience_stays_in_the_round(
    cohort, tmp_path
):
    run_dir = tmp_path / "runs" / "slow-uplink"
    overrides = [
        *MODEL,
        "sites=2",
        "rounds=1",
        "strategy.min_sites=2",
        "train.local_epochs=1",
        "federation.round_timeout=300",
        f"run_root={run_dir.parent}",
        "run_name=slow-uplink",
    ]
    cfg = compose(overrides)
    _, up = wire_bytes(model_values(cfg.model), "float32", secure=cfg.federation.secure_aggregation)
    assert up / RATE > 2 * HEARTBEAT + 5, "the upload must outlast the patience window"

    sites = (f"heartbeat_interval={HEARTBEAT}", "policy.min_secagg_sites=2")  # a sum of two
    c = Consortium(tmp_path, cohort, sites=2, site_settings=sites)
    link = ThrottledLink(c.port, RATE)
    slow = "site-0"
    try:
        c.start_coordinator()
        args = c.site_args(slow)
        args[args.index(f"coordinator=127.0.0.1:{c.port}")] = f"coordinator=127.0.0.1:{link.port}"
        c.procs.start(slow, args)
        c.start_site("site-1")
        c.wait_connected(c.names)
        launch = c.launch(overrides, timeout=600)
        assert c.wait_exit(launch, 600) == 0, c.log("launch")
    finally:
        c.stop()
        link.close()

    seconds, sent = link.longest_upload()
    assert sent >= up and seconds > 2 * HEARTBEAT, (seconds, sent, up)
    lines = read_metrics(run_dir)
    assert [ln["round"] for ln in lines] == [0, 1]
    assert set(lines[1]["train"]["sites"]) == {"site-0", "site-1"}, lines[1]["train"]
    assert "heartbeat interval 10 s" in c.log(slow)
