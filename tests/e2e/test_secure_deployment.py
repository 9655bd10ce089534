"""TLS on every link and enrolled sites only, on a real SuperLink: the good path and every way in
that must be refused (unregistered key, foreign CA, plaintext)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from flwr.proto.fleet_pb2 import PullMessagesRequest  # pylint: disable=E0611
from flwr.proto.fleet_pb2_grpc import FleetStub

from fedhealth.config import compose
from fedhealth.runs.rundir import read_metrics
from fedhealth.security.certs import create_ca, create_server_cert, create_site_keys
from fedhealth.serverapp.runconfig import write_run_config
from fedhealth.testing.loopback import (
    Procs,
    flower_env,
    flwr,
    free_ports,
    node_policy,
    superlink_listen,
)

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]
AUTH_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def test_enrolled_sites_over_tls_run_and_intruders_are_refused(cohort, tmp_path):
    keys, foreign = tmp_path / "certs", tmp_path / "foreign"
    ca = create_ca(keys)
    create_server_cert(ca, keys, ["localhost", "127.0.0.1"])
    create_ca(foreign)
    for site in ("hospital-0", "hospital-1", "intruder"):
        create_site_keys(keys, site)

    env = flower_env(tmp_path / "flwr-home")
    procs = Procs(tmp_path, env)
    link, control, *node_ports = free_ports(7)
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "tls"\n\n[superlink.tls]\naddress = "127.0.0.1:{control}"\n'
        f'root-certificates = "{keys / "ca.crt"}"\n'
    )

    def supernode(name: str, key: str | None, *transport: str, data: int = 0):
        auth = (
            ["--auth-supernode-private-key", str(keys / "sites" / key / "auth.key")] if key else []
        )
        return procs.start(
            name,
            [
                "flower-supernode",
                "--superlink",
                f"127.0.0.1:{link}",
                "--port",
                str(node_ports.pop()),
                *transport,
                *auth,
                "--node-config",
                f"data-dir='{Path(cohort) / f'site-{data}'}' site-name='{name}' "
                + node_policy(require_dp=False, min_secagg_sites=2),  # privacy=off, 2 sites
            ],
        )

    try:
        procs.start(
            "superlink",
            [
                "flower-superlink",
                *superlink_listen(link, control),
                "--ssl-ca-certfile",
                str(keys / "ca.crt"),
                "--ssl-certfile",
                str(keys / "server.crt"),
                "--ssl-keyfile",
                str(keys / "server.key"),
                "--enable-supernode-auth",
                "--database",
                str(tmp_path / "state.db"),
                "--disable-runtime-dependency-installation",
            ],
        )
        procs.wait_port(link)
        procs.wait_port(control)
        for site in ("hospital-0", "hospital-1"):
            flwr(
                env,
                [
                    "supernode",
                    "register",
                    str(keys / "sites" / site / "auth.pub"),
                    "tls",
                    "--name",
                    site,
                ],
                cwd=tmp_path,
                timeout=60,
            )
        tls = ["--root-certificates", str(keys / "ca.crt")]
        supernode("hospital-0", "hospital-0", *tls, data=0)
        supernode("hospital-1", "hospital-1", *tls, data=1)
        unregistered = supernode("intruder", "intruder", *tls, data=2)
        foreign_ca = supernode(
            "foreign", "hospital-0", "--root-certificates", str(foreign / "ca.crt"), data=2
        )
        plaintext = supernode("plaintext", None, "--insecure", data=2)  # no TLS, no key

        deadline = time.monotonic() + 60
        while unregistered.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert unregistered.returncode not in (None, 0), procs.logs()

        cfg = compose(
            [
                "sites=3",
                "rounds=1",
                "train.local_epochs=1",
                "privacy=off",
                "strategy.min_sites=2",
                f"run_root={tmp_path / 'runs'}",
                "run_name=secure",
                "federation.round_timeout=240",
            ]
        )
        submitted = flwr(
            env,
            [
                "run",
                str(PROJECT),
                "tls",
                "--stream",
                "--run-config",
                str(write_run_config(cfg, tmp_path / "run.toml")),
            ],
            cwd=tmp_path,
            timeout=420,
        )
        listing = flwr(
            env, ["ls", "tls", "--run-id", str(submitted["run-id"])], cwd=tmp_path, timeout=60
        )
        assert listing["runs"][0]["status"] == "finished:completed", procs.logs()
        assert foreign_ca.poll() is None or foreign_ca.returncode != 0
        assert plaintext.poll() is None or plaintext.returncode != 0
        # The sites' door is gRPC: the port the SuperNodes trained through answers a gRPC call
        # (Flower's Fleet service) with a gRPC status, refusing a caller without a node key.
        creds = grpc.ssl_channel_credentials((keys / "ca.crt").read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{link}", creds) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                FleetStub(channel).PullMessages(PullMessagesRequest(), timeout=30)
        assert refused.value.code() in AUTH_REFUSED, refused.value
    finally:
        procs.stop()

    lines = read_metrics(tmp_path / "runs" / "secure")
    assert set(lines[1]["train"]["sites"]) == {"hospital-0", "hospital-1"}, "no intruder in a round"
    logs = {name: log.read_text(errors="replace") for name, _, log in procs.running}
    assert "Failed to activate SuperNode" in logs["intruder"]  # the SuperLink said no
    assert "CERTIFICATE_VERIFY_FAILED" in logs["foreign"]  # our CA did not sign it
    assert "Connection attempt failed" in logs["plaintext"]  # no TLS, no way in
    assert "intruder" not in str(lines) and "foreign" not in str(lines)
