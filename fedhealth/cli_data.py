"""``fedhealth data synth``, ``baseline`` and ``predict``: the commands about a site's data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedhealth.errors import ConfigError

__all__ = ["add_data_commands"]


def cmd_data_synth(args: argparse.Namespace) -> int:
    """Run ``fedhealth data synth``: write the synthetic cohort's missing sites."""
    from fedhealth.config import compose
    from fedhealth.data.sites import synthesize

    cfg = compose(args.overrides)
    if cfg.data.site_dirs:
        raise ConfigError("data synth writes a synthetic cohort under data.root, not site_dirs")
    for path in synthesize(cfg):
        print(path)
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    """Run ``fedhealth baseline centralized|local``: the comparison points for federation."""
    from fedhealth.config import compose
    from fedhealth.simulation import ensure_sites
    from fedhealth.training import baselines

    cfg = compose(args.overrides)
    ensure_sites(cfg)
    if args.kind == "centralized":
        results = {"centralized": baselines.centralized(cfg)}
    else:
        results = {f"local:{k}": v for k, v in baselines.local(cfg).items()}
    table = {
        model: {
            **{s: round(r.dice, 4) if r.num_examples else None for s, r in per_site.items()},
            "pooled": round(baselines.pooled_dice(per_site), 4),
        }
        for model, per_site in results.items()
    }
    print(json.dumps(table, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Run ``fedhealth predict``: segment scans with a run's global model, in their own grid."""
    from fedhealth.training.predict import predict

    written = predict(args.model, args.data, args.out, device=args.device)
    for path in written:
        print(path)
    print(f"{len(written)} segmentation(s) in {args.out}; model card: {args.out}/model_card.json")
    return 0


def add_data_commands(sub: Any) -> None:
    """Register ``data synth``, ``baseline`` and ``predict`` on the CLI's subparsers.

    Parameters
    ----------
    sub : argparse._SubParsersAction
        The ``fedhealth`` parser's subcommands.
    """
    data = sub.add_parser("data", help="site data tools").add_subparsers(
        dest="data_cmd", required=True
    )
    p = data.add_parser("synth", help="write synthetic NIfTI sites with dataset.json")
    p.add_argument("overrides", nargs="*", help="e.g. sites=4 data.root=data/synthetic seed=1")
    p.set_defaults(func=cmd_data_synth)

    baseline = sub.add_parser(
        "baseline", help="centralized or local-only training on the same sites"
    ).add_subparsers(dest="kind", required=True)
    for kind, text in (
        (
            "centralized",
            "one model on every site's training data pooled (what federation aims for)",
        ),
        ("local", "one model per site on its own data alone, tested on every site's test set"),
    ):
        p = baseline.add_parser(kind, help=text, description=text)
        p.add_argument("overrides", nargs="*", help="e.g. data.site_dirs=[/data/a,/data/b]")
        p.set_defaults(func=cmd_baseline)

    p = sub.add_parser(
        "predict",
        help="segment scans with a run's global model; NIfTI written in each scan's own grid",
    )
    p.add_argument("--model", required=True, type=Path, help="run dir or its checkpoint file")
    p.add_argument("--data", required=True, type=Path, help="dataset.json or a folder of NIfTI")
    p.add_argument("--out", required=True, type=Path, help="output folder (outside the data)")
    p.add_argument(
        "--device", default="auto", help="auto (CUDA when PyTorch sees a GPU), cpu, cuda, cuda:N"
    )
    p.set_defaults(func=cmd_predict)
