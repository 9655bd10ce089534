"""DP-SGD reference tests: Opacus's per-sample gradients against a brute-force loop, clipping
bounds per patient, every DP-ready network, and the patient as the privacy unit."""

import json
import shutil

import pytest
import torch
from opacus import PrivacyEngine

from fedhealth.config import ModelConfig
from fedhealth.data.loading import make_loader, read_datalist
from fedhealth.models import DP_READY, build_model
from fedhealth.training import (
    DPSettings,
    grad_samplers,  # noqa: F401  (what a site trains with)
    seed_everything,
    train,
)
from fedhealth.training.loop import loss_fn

CLIP = 0.05  # small enough that every per-patient gradient here is clipped


def _config(name):
    return ModelConfig(
        name=name,
        norm="group" if name == "segresnet" else "instance",
        channels=[4, 8] if name == "unet" else [4],
        strides=[2] if name == "unet" else [],
    )


def _batch(cohort, n):
    data = read_datalist(cohort / "site-0" / "dataset.json")
    return next(iter(make_loader(data.train[:n], 32, 1.0, n, train=True, seed=0)))


def _private(model, batch, mode):
    loader = torch.utils.data.DataLoader(
        [
            {"image": batch["image"][i], "label": batch["label"][i]}
            for i in range(batch["image"].shape[0])
        ],
        batch_size=batch["image"].shape[0],
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    return PrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=CLIP,
        poisson_sampling=False,
        grad_sample_mode=mode,
    )


@pytest.mark.parametrize("name", sorted(DP_READY))
def test_per_sample_gradients_match_a_brute_force_loop(cohort, name):
    seed_everything(0, 2)
    batch = _batch(cohort, 3)
    reference_model = build_model(_config(name))
    model = build_model(_config(name))
    model.load_state_dict(reference_model.state_dict())
    criterion = loss_fn()
    brute = []
    for i in range(3):
        reference_model.zero_grad()
        criterion(reference_model(batch["image"][i : i + 1]), batch["label"][i : i + 1]).backward()
        brute.append([p.grad.clone() for p in reference_model.parameters()])
    private, optimizer, _ = _private(model, batch, DP_READY[name])
    criterion(private(batch["image"]), batch["label"]).backward()
    for j, p in enumerate(p for p in private.parameters() if p.requires_grad):
        # Opacus undoes the batch mean (loss_reduction="mean"): grad_sample is each patient's
        # gradient of its own loss, what a batch of one computes.
        expected = torch.stack([b[j] for b in brute])
        torch.testing.assert_close(p.grad_sample, expected, rtol=1e-3, atol=2e-4)


@pytest.mark.parametrize("name", sorted(DP_READY))
def test_clipped_per_patient_gradient_never_exceeds_the_bound(cohort, name):
    seed_everything(0, 2)
    batch = _batch(cohort, 4)
    private, optimizer, _ = _private(build_model(_config(name)), batch, DP_READY[name])
    loss_fn()(private(batch["image"]), batch["label"]).backward()
    params = [p for p in private.parameters() if p.requires_grad]
    raw = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params]).norm(dim=0)
    assert (raw > CLIP).all(), "test needs gradients above the bound"
    # Opacus clips and sums; run it once per patient with only that patient's gradient kept,
    # so what it adds is exactly that patient's clipped contribution.
    originals = [p.grad_sample for p in params]
    for i in range(4):
        for p, full in zip(params, originals, strict=True):
            alone = torch.zeros_like(full)
            alone[i] = full[i]
            p.grad_sample, p.summed_grad = alone, None
        optimizer.clip_and_accumulate()
        norm = float(torch.stack([p.summed_grad.norm() for p in params]).norm())
        assert norm <= CLIP * (1 + 1e-4)
        assert norm == pytest.approx(CLIP, rel=1e-3)  # above the bound: clipped exactly to it
    for p, full in zip(params, originals, strict=True):
        p.grad_sample, p.summed_grad = full, None
    optimizer.clip_and_accumulate()
    total = float(torch.stack([p.summed_grad.norm() for p in params]).norm())
    assert total <= 4 * CLIP * (1 + 1e-4)  # the sum of 4 clipped patients


@pytest.mark.parametrize("name", sorted(DP_READY))
def test_every_dp_ready_network_trains_privately(cohort, name):
    seed_everything(0, 2)
    data = read_datalist(cohort / "site-0" / "dataset.json")
    loader = make_loader(data.train, 32, 1.0, 2, train=True, seed=0)
    model = build_model(_config(name))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, loader, 1, 1e-3, dp=DPSettings(1.0, 1.0, grad_sample_mode=DP_READY[name]))
    assert result.history == ((1.0, 1 / len(loader), len(loader)),)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_a_patient_with_several_scans_is_one_record(cohort, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(cohort / "site-0", site)
    listing = json.loads((site / "dataset.json").read_text())
    for entry in listing["training"][:3]:
        entry["patient"] = "same-patient"  # three scans of one patient
    (site / "dataset.json").write_text(json.dumps(listing))
    data = read_datalist(site / "dataset.json")
    assert len(data.train) == 6
    loader = make_loader(data.train, 32, 1.0, 1, train=True, seed=0)
    assert len(loader.dataset) == 4  # 1 patient with 3 scans + 3 patients with 1
    seed_everything(0, 2)
    result = train(build_model(_config("unet")), loader, 1, 1e-3, dp=DPSettings(1.0, 1.0))
    assert result.history[0][1] == pytest.approx(1 / 4), "sampling rate is per patient"
