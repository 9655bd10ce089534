"""The site's device: its own choice (never the coordinator's), CPU and CUDA code paths."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict

from fedhealth.clientapp.instruction import Site
from fedhealth.config import compose, from_site_settings, site_settings
from fedhealth.errors import ConfigError
from fedhealth.protocol import keys as K
from fedhealth.simulation import ray_init_args
from fedhealth.training.device import device_generator, resolve_device

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def test_auto_is_cuda_only_where_pytorch_sees_a_gpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("CPU") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu", "mps", "cuda:x", ""])
def test_an_unknown_device_names_the_setting(spec: str) -> None:
    with pytest.raises(ConfigError, match=r"site.yaml device=.*expected one of"):
        resolve_device(spec, "site.yaml device")


def test_a_gpu_the_machine_lacks_is_refused_with_the_count() -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=f"sees {count} CUDA device"):
        resolve_device(f"cuda:{count}")


def test_the_coordinator_cannot_choose_a_sites_device() -> None:
    cfg = compose(["train.device=cpu"])
    sent = site_settings(cfg)
    assert "train.device" not in sent and "train.lr" in sent  # never sent
    forced = from_site_settings({**sent, "train.device": "cuda:7"})
    assert forced.train.device == "auto"  # ignored when a coordinator sends it anyway
    with pytest.raises(ConfigError, match="train.device"):
        compose(["train.device=gpu"])


def test_a_site_reads_its_device_from_its_node_config(tmp_path) -> None:
    def context(node: dict) -> Context:
        return Context(run_id=1, node_id=0, node_config=node, state=RecordDict(), run_config={})

    node = {K.NODE_DATA_DIR: str(tmp_path), K.NODE_SITE_NAME: "h"}
    assert Site.from_context(context(node)).device == "auto"
    assert Site.from_context(context({**node, K.NODE_DEVICE: "cpu"})).device == "cpu"
    # simulation: every virtual site takes train.device; a node config would win
    sim = {K.NODE_PARTITION_ID: 0}
    assert Site.from_context(context(sim), (str(tmp_path),), None, "cpu").device == "cpu"


def test_the_cpu_keeps_the_sites_secret_generator() -> None:
    secret = torch.Generator().manual_seed(5)
    assert device_generator(secret, torch.device("cpu")) is secret


def test_simulation_resources_and_cluster_address() -> None:
    local = ray_init_args(compose(["federation.ray_num_cpus=2"]))
    assert local["num_cpus"] == 2 and local["_node_ip_address"] == "127.0.0.1"
    assert local["address"] == "local"  # never another process's cluster found on this machine
    joined = ray_init_args(compose(["federation.ray_address=10.0.0.5:6379"]))
    assert joined == {"address": "10.0.0.5:6379"}  # the cluster's nodes bring their resources
    on_this_machine = ray_init_args(compose(["federation.ray_address=127.0.0.1:6379"]))
    assert on_this_machine == {"address": "127.0.0.1:6379", "_node_ip_address": "127.0.0.1"}
    with pytest.raises(ConfigError, match="gpus_per_site"):
        compose(["federation.gpus_per_site=-1"])


@CUDA
def test_dp_training_and_inference_run_on_cuda() -> None:
    from fedhealth.training import DPSettings, train
    from fedhealth.training.inference import infer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1))
    data = [{"image": torch.randn(1, 8, 8, 8), "label": torch.randint(0, 2, (1, 8, 8, 8))}] * 4
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    cuda = resolve_device("cuda")
    result = train(model, loader, 1, 1e-2, dp=DPSettings(1.0, 1.0), device=cuda)
    assert result.steps >= 1 and next(model.parameters()).device.type == "cuda"
    secret = torch.Generator().manual_seed(1)
    assert device_generator(secret, cuda).device.type == "cuda"
    logits = infer(model.eval(), torch.randn(1, 1, 12, 12, 12), 8, device=cuda)
    assert logits.device.type == "cpu" and logits.shape == (1, 2, 12, 12, 12)
