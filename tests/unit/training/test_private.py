"""DP noise and Poisson sampling from the site's own secret randomness; empty Poisson batches
(small sites) are real DP steps; no ``secure_rng`` switch that cannot work."""

import pytest
import torch
from torch import nn

from fedhealth.config import SITE_KEYS, validate
from fedhealth.data.loading import make_loader, read_datalist
from fedhealth.errors import ConfigError
from fedhealth.training import DPSettings, private, seed_everything, train

ROI = 8  # small patches: these tests run many trainings


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1))


def _setup(cohort, n=6, batch=2, seed=0):
    """What one instruction gives a site: the run seed, the data, the global model."""
    seed_everything(seed, 2)
    data = read_datalist(cohort / "site-0" / "dataset.json")
    loader = make_loader(data.train[:n], ROI, 1.0, batch, train=True, seed=seed)
    return _tiny(), loader


def _run(cohort, dp, n=6, batch=2, seed=0, epochs=1):
    model, loader = _setup(cohort, n, batch, seed)
    result = train(model, loader, epochs, 1e-2, dp=dp)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), result, len(loader)


def test_the_same_instruction_twice_gives_two_different_dp_updates(cohort):
    first, _, _ = _run(cohort, DPSettings(1.0, 1.0))
    second, _, _ = _run(cohort, DPSettings(1.0, 1.0))
    assert not torch.equal(first, second)


def test_a_fixed_site_local_noise_seed_reproduces_the_update(cohort):
    first, _, _ = _run(cohort, DPSettings(1.0, 1.0, noise_seed=123))
    second, _, _ = _run(cohort, DPSettings(1.0, 1.0, noise_seed=123))
    other, _, _ = _run(cohort, DPSettings(1.0, 1.0, noise_seed=124))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_noise_and_sampling_ignore_torchs_global_generator(cohort):
    updates = []
    for global_seed in (0, 1):
        model, loader = _setup(cohort)
        torch.manual_seed(global_seed)  # what the run's seed sets; the DP path must not read it
        train(model, loader, 1, 1e-2, dp=DPSettings(1.0, 1.0, noise_seed=7))
        updates.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(updates[0], updates[1])


def test_without_dp_training_stays_deterministic_under_the_run_seed(cohort):
    first, _, _ = _run(cohort, None, seed=3)
    second, _, _ = _run(cohort, None, seed=3)
    other, _, _ = _run(cohort, None, seed=4)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_the_site_generator_is_seeded_from_os_entropy_unless_a_seed_is_given():
    assert not torch.equal(
        torch.rand(4, generator=private.site_generator()),
        torch.rand(4, generator=private.site_generator()),
    )
    fixed = [torch.rand(4, generator=private.site_generator(5)) for _ in range(2)]
    assert torch.equal(*fixed)
    with pytest.raises(ValueError, match="noise_seed"):
        private.site_generator(-1)


@pytest.mark.parametrize("batch", [1, 2])
def test_small_sites_train_and_every_step_is_counted(cohort, monkeypatch, batch):
    empties = {"any": 0, "first": 0}
    collate = private.EmptySafeCollate.__call__

    def counting(self, samples):
        if not samples:
            empties["any"] += 1
            empties["first"] += not getattr(self, "seen", False)
        self.seen = True
        return collate(self, samples)

    monkeypatch.setattr(private.EmptySafeCollate, "__call__", counting)
    for noise_seed in range(30):
        update, result, planned = _run(
            cohort, DPSettings(1.0, 1.0, noise_seed=noise_seed), n=5, batch=batch, epochs=2
        )
        assert result.steps == 2 * planned
        assert result.history == ((1.0, 1 / planned, 2 * planned),)
        assert torch.isfinite(update).all()
    # the seeds cover what used to crash: an empty first batch and an empty later batch
    assert empties["first"] > 0 and empties["any"] > empties["first"]


def test_an_empty_batch_is_a_noise_only_step(cohort, monkeypatch):
    def nothing(self):  # Poisson sampling that draws no record, every time
        for _ in range(self.steps):
            yield []

    monkeypatch.setattr(private.UniformWithReplacementSampler, "__iter__", nothing)
    model, loader = _setup(cohort, n=5)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    result = train(model, loader, 1, 1e-2, dp=DPSettings(1.0, 1.0, noise_seed=0))
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert result.num_examples == 0 and result.steps == len(loader)
    assert result.history == ((1.0, 1 / len(loader), len(loader)),)
    assert not torch.equal(before, after), "noise was added"
    # the control: without noise an empty step leaves Adam's parameters where they were
    model, loader = _setup(cohort, n=5)
    train(model, loader, 1, 1e-2, dp=DPSettings(0.0, 1.0, noise_seed=0))
    assert torch.equal(before, torch.cat([p.detach().flatten() for p in model.parameters()]))


def test_an_empty_batch_keeps_the_keys_shapes_and_dtypes(cohort):
    _, loader = _setup(cohort, n=5)
    template = next(iter(loader))
    empty = private.EmptySafeCollate(loader.collate_fn, template)([])
    assert set(empty) == set(template)
    for key, value in template.items():
        assert empty[key].shape == (0, *value.shape[1:])
        assert empty[key].dtype == value.dtype


def test_there_is_no_secure_rng_switch():
    assert "privacy.secure_rng" not in SITE_KEYS
    with pytest.raises(ConfigError, match="secure_rng"):
        validate({"privacy": {"secure_rng": True}})
    with pytest.raises(TypeError):
        DPSettings(1.0, 1.0, secure_rng=True)  # type: ignore[call-arg]
