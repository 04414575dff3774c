"""experiments/plans.py: every documented plan is a valid run config, and the record holds each entry's
current command (an entry changed without re-planning would leave the docs quoting another plan)."""

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("ml_collections")

from experiments import plans, run_config

REPO = Path(__file__).resolve().parents[1]


def test_every_plan_entry_is_a_valid_config():
    for name, (devices, overrides) in plans.PLANS.items():
        config = run_config.load_config_file(str(REPO / plans.GPT2))
        for key, value in {**plans.BASE, **overrides}.items():
            section, field = key.split(".")
            assert field in config[section], (name, key)
            config[section][field] = value
        run_config.validate(config)
        mesh = [config.mesh[a] for a in ("data", "fsdp", "tensor", "stage", "sequence")]
        assert -1 not in mesh and devices == math.prod(mesh), (name, mesh, devices)


def test_the_record_holds_every_entry_with_its_command():
    record = json.loads((REPO / "docs" / "results" / "plans.json").read_text())
    assert set(record["plans"]) == set(plans.PLANS)
    for name, (devices, overrides) in plans.PLANS.items():
        entry = record["plans"][name]
        assert entry["command"] == plans.command(devices, overrides), name
        assert entry["devices"] == devices and entry["collective_mib"] * 2**20 == entry["collective_bytes"]
