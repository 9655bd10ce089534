import torch

from fedhealth.data.loading import make_loader, read_datalist
from fedhealth.models import build_model
from fedhealth.training import evaluate, seed_everything, train
from fedhealth.training.loop import proximal_term


def _loaders(cohort, cfg):
    data = read_datalist(cohort / "site-0" / "dataset.json")
    tr = make_loader(data.train, 32, 1.0, 2, train=True, seed=0)
    te = make_loader(data.test, 32, 1.0, 1, train=False, seed=0)
    return tr, te


def test_training_improves_dice_over_the_untrained_model(cohort, small_cfg):
    seed_everything(0, 2)
    tr, te = _loaders(cohort, small_cfg)
    model = build_model(small_cfg.model)
    before = evaluate(model, te, 32)
    result = train(model, tr, epochs=8, lr=3e-3)
    after = evaluate(model, te, 32)
    assert result.num_examples == 6 and result.steps == 8 * 3
    assert after.loss < before.loss
    assert after.dice > before.dice + 0.2


def test_dice_of_perfect_prediction_is_one_on_whole_volumes(cohort):
    data = read_datalist(cohort / "site-2" / "dataset.json")
    volumes = list(make_loader(data.test, 16, 1.0, 1, train=False, seed=0))
    assert all(v["label"].shape[2:] != (16, 16, 16) for v in volumes), "bigger than a window"
    # the label shown as the image: an oracle that segments what it sees, window by window
    shown = [{"image": v["label"].float(), "label": v["label"]} for v in volumes]

    class Oracle(torch.nn.Module):
        def forward(self, x):
            return torch.cat([-x, x], dim=1) * 10.0

    result = evaluate(Oracle(), shown, 16)
    assert result.dice > 0.999 and result.num_examples == len(volumes)
    wrong = [{"image": 1.0 - v["label"].float(), "label": v["label"]} for v in volumes]
    assert evaluate(Oracle(), wrong, 16).dice < 0.01


def test_proximal_term_keeps_weights_near_the_global_model(cohort, small_cfg):
    tr, _ = _loaders(cohort, small_cfg)
    drift = {}
    for mu in (0.0, 1000.0):
        seed_everything(0, 2)
        model = build_model(small_cfg.model)
        anchor = [p.detach().clone() for p in model.parameters()]
        train(model, tr, epochs=1, lr=3e-3, proximal_mu=mu)
        drift[mu] = float(proximal_term(model, anchor).detach())
    assert drift[1000.0] < 0.5 * drift[0.0]
