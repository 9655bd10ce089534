"""Every configuration the README shows composes, builds its network and segments a patch."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from fedhealth.config import compose
from fedhealth.models import build_model

README = Path(__file__).resolve().parents[2] / "README.md"
COMMANDS = ("simulate", "baseline centralized", "baseline local", "data synth")


def _shown() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    found = []
    for line in (ln.split("#", 1)[0].strip() for b in blocks for ln in b.splitlines()):
        words = shlex.split(line.replace(".venv/bin/", ""), posix=False)
        for command in COMMANDS:
            head = ["fedhealth", *command.split()]
            if words[: len(head)] == head:
                found.append([w for w in words[len(head) :] if "=" in w and "&&" not in w])
    return found


SHOWN = _shown()


def test_the_readme_shows_configs():
    assert len(SHOWN) >= 6, SHOWN
    assert ["model.norm=group"] in SHOWN


@pytest.mark.parametrize("overrides", SHOWN, ids=[" ".join(o) or "defaults" for o in SHOWN])
def test_every_readme_config_builds_and_segments_a_patch(overrides):
    cfg = compose(overrides)
    model = build_model(cfg.model)
    p = cfg.data.patch_size
    with torch.no_grad():
        out = model(torch.zeros(1, cfg.model.in_channels, p, p, p))
    assert out.shape == (1, cfg.model.out_channels, p, p, p)
