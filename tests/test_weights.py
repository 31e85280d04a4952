"""The shipped weights: each loads with its checksum checked, fits the size limit, and its card says
what the model is, how it was trained, how it was measured and where it falls short."""

from __future__ import annotations

import json

import pytest

from dials_diffnet.inference import card_summary
from dials_diffnet.weights import MAX_FILE_BYTES, SHIPPED_DIR, WeightError, load_model

SHIPPED = ("crystal", "crystal_fast", "spi_multi", "spi_twin")


def test_the_package_ships_exactly_the_documented_models():
    assert sorted(p.stem for p in SHIPPED_DIR.glob("*.safetensors")) == sorted(SHIPPED)
    assert sorted(p.stem for p in SHIPPED_DIR.glob("*.json")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_and_its_card_documents_it(name):
    weights = SHIPPED_DIR / f"{name}.safetensors"
    model, card = load_model(weights)
    assert weights.stat().st_size <= MAX_FILE_BYTES and card["bytes"] == weights.stat().st_size
    assert card["name"] == name and card["version"].endswith("-cpu")
    assert card["architecture"]["class"] == type(model).__name__
    label_definitions = {"crystal": "labels", "crystal_fast": "labels", "spi_multi": "particle_types",
                         "spi_twin": "triplet_classes"}[name]
    assert card["outputs"] and card[label_definitions]
    training = card["training"]
    assert training["data"] and "seed" in training and training["epochs"]
    assert card["evaluation"]
    if card["task"] == "crystal":  # each evaluation names the command that made it
        assert all(e["command"].startswith("diffnet.evaluate ") for e in card["evaluation"].values())
        # the P(hit) bar diffnet.filter min_p_hit=Auto uses, how it was chosen, and what it costs on held-out stills
        bar = card["operating_point"]
        assert bar["min_p_hit"] == {"crystal": 0.15, "crystal_fast": 0.3}[name]
        assert bar["rule"] and bar["command"].startswith("diffnet.evaluate ")
        assert card_summary(card)["min_p_hit"] == bar["min_p_hit"]
    assert card["reproduce"].startswith("make train-")
    assert len(card["limitations"]) > 200 and "simulated" in card["limitations"]


def test_a_card_edited_by_hand_still_loads_but_a_changed_checksum_does_not(tmp_path):
    weights = tmp_path / "crystal.safetensors"
    weights.write_bytes((SHIPPED_DIR / "crystal.safetensors").read_bytes())
    card = json.loads((SHIPPED_DIR / "crystal.json").read_text())
    card["limitations"] += " (edited)"  # prose is not covered by the checksum ...
    weights.with_suffix(".json").write_text(json.dumps(card))
    assert load_model(weights)[1]["limitations"].endswith("(edited)")
    card["sha256"] = "0" * 64  # ... the weights are
    weights.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(WeightError, match="checksum"):
        load_model(weights)
