import torch

from fedhealth.data.loading import make_loader, read_datalist
from fedhealth.models import build_model
from fedhealth.training import evaluate, seed_everything, train
from fedhealth.training.loop import proximal_term


def _loaders(cohort, cfg):
    data = read_datalist(cohort / "site-0" / "dataset.json")
    tr = make_loader(data.train, 32, 1.0, 2, train=True, seed=0)
    te = make_loader(data.test, 32, 1.0, 2, train=False, seed=0)
    return tr, te


def test_training_improves_dice_over_the_untrained_model(cohort, small_cfg):
    seed_everything(0, 2)
    tr, te = _loaders(cohort, small_cfg)
    model = build_model(small_cfg.model)
    before = evaluate(model, te)
    result = train(model, tr, epochs=8, lr=3e-3)
    after = evaluate(model, te)
    assert result.num_examples == 6 and result.steps == 8 * 3
    assert after.loss < before.loss
    assert after.dice > before.dice + 0.2


def test_dice_of_perfect_prediction_is_one(cohort):
    data = read_datalist(cohort / "site-2" / "dataset.json")
    loader = make_loader(data.test, 32, 1.0, 3, train=False, seed=0)

    class Oracle(torch.nn.Module):
        def forward(self, x):  # logits that put the label where the lesion is
            return torch.cat([-self.label, self.label], dim=1) * 10.0

    oracle = Oracle()
    oracle.label = next(iter(loader))["label"]
    assert evaluate(oracle, loader).dice > 0.999


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
