"""diffnet.filter: rules, consistent ids/identifiers, and outputs that reload as exactly the kept images."""

from __future__ import annotations

import importlib.metadata
import json
import os

import pytest
from dials.array_family import flex
from dxtbx.model.experiment_list import ExperimentListFactory
from test_predict import (
    crystal_model,  # noqa: F401  (fixture)
    diffnet,
    dials_import,
    find_spots,
    load_records,
    spotty_image,
    sweep,  # noqa: F401  (fixture)
    write_stills,
)

from dials_diffnet.images import iter_image_refs


@pytest.fixture(scope="module")
def four_stills(tmp_path_factory, crystal_model):  # noqa: F811
    d = tmp_path_factory.mktemp("four")
    expt = dials_import(d, write_stills(d, [spotty_image(10 + i) for i in range(4)]))
    refl = find_spots(d, expt)
    result = diffnet(d, "predict", expt, f"model.crystal={crystal_model}", "nproc=0", "output.reflections=None")
    assert result.returncode == 0, result.stderr
    return expt, refl, d / "diffnet.json"


def edited_json(source, target, **fields):
    """A copy of a diffnet.json with chosen per-image values, so the rules' outcome is known."""
    document = json.loads(source.read_text())
    for name, values in fields.items():
        for record, value in zip(document["records"], values):
            record[name] = value
    target.write_text(json.dumps(document))
    return target


def test_filter_keeps_exactly_the_passing_stills(four_stills, tmp_path):
    expt, refl, records_json = four_stills
    rules = edited_json(
        records_json, tmp_path / "rules.json",
        p_hit=[0.9, 0.1, 0.9, 0.9], p_multi=[0.1, 0.1, 0.8, 0.1], d_min=[2.0, 2.0, 2.0, 2.0],
    )
    result = diffnet(tmp_path, "filter", expt, refl, rules, "d_min=2.5", "max_p_multi=0.5")
    assert result.returncode == 0, result.stderr
    assert "not a hit" in result.stdout and "multi-lattice" in result.stdout
    assert "drops strong single-lattice shots first" in result.stdout  # the rule's cost, said where it is used
    # the log names the program version, as diffnet.predict's does
    version = importlib.metadata.version("dials-diffnet")
    assert f"dials-diffnet {version}\n" in (tmp_path / "diffnet.filter.log").read_text()

    original = ExperimentListFactory.from_json_file(str(expt), check_format=False)
    filtered = ExperimentListFactory.from_json_file(str(tmp_path / "filtered.expt"), check_format=True)
    assert list(filtered.identifiers()) == [original[0].identifier, original[3].identifier]
    refs = list(iter_image_refs(filtered))
    assert [os.path.basename(r.path) for r in refs] == ["still_00001.cbf", "still_00004.cbf"]
    assert all(len(e.imageset) == 1 for e in filtered)

    reflections = flex.reflection_table.from_file(str(tmp_path / "filtered.refl"))
    reflections.assert_experiment_identifiers_are_consistent(filtered)
    assert set(reflections["id"]) == {0, 1}
    strong = flex.reflection_table.from_file(str(refl))
    for new_id, old_id in ((0, 0), (1, 3)):
        assert (reflections["id"] == new_id).count(True) == (strong["id"] == old_id).count(True) > 0


@pytest.mark.parametrize("card_bar, bar, kept", [(0.15, "0.15", [0, 1, 3]), (None, "0.3", [3])])
def test_min_p_hit_auto_is_the_bar_of_the_judging_models_card(four_stills, tmp_path, card_bar, bar, kept):
    """Auto takes the bar the crystal model's card records (the records file carries it); a card that
    records none (models made before session 30) gets 0.3."""
    expt, refl, records_json = four_stills
    rules = edited_json(records_json, tmp_path / "rules.json", p_hit=[0.2, 0.2, 0.1, 0.9])
    document = json.loads(rules.read_text())
    document["models"]["crystal"].pop("min_p_hit", None)
    if card_bar is not None:
        document["models"]["crystal"]["min_p_hit"] = card_bar
    rules.write_text(json.dumps(document))
    result = diffnet(tmp_path, "filter", expt, refl, rules)
    assert result.returncode == 0, result.stderr
    assert f"min_p_hit={bar}, from" in result.stdout
    original = ExperimentListFactory.from_json_file(str(expt), check_format=False)
    filtered = ExperimentListFactory.from_json_file(str(tmp_path / "filtered.expt"), check_format=False)
    assert list(filtered.identifiers()) == [original[i].identifier for i in kept]


def test_filter_predicts_itself_without_json_and_drops_failed_by_default(four_stills, crystal_model, tmp_path):  # noqa: F811
    expt, _, _ = four_stills
    result = diffnet(tmp_path, "filter", expt, f"model.crystal={crystal_model}", "nproc=0", "min_p_hit=0", "max_p_multi=1")
    assert result.returncode == 0, result.stderr
    assert len(load_records(tmp_path / "diffnet.json")) == 4
    assert len(ExperimentListFactory.from_json_file(str(tmp_path / "filtered.expt"), check_format=True)) == 4


@pytest.fixture(scope="module")
def sweep_json(sweep, crystal_model, tmp_path_factory):  # noqa: F811
    expt, _ = sweep
    d = tmp_path_factory.mktemp("sweep_predict")
    result = diffnet(d, "predict", expt, f"model.crystal={crystal_model}", "nproc=0", "output.reflections=None")
    assert result.returncode == 0, result.stderr
    return expt, d / "diffnet.json"


@pytest.mark.parametrize("fraction, kept", [(0.5, 1), (0.75, 0)])
def test_rotation_sequence_kept_or_dropped_whole(sweep_json, tmp_path, fraction, kept):
    expt, records_json = sweep_json
    rules = edited_json(records_json, tmp_path / "rules.json", p_hit=[0.9, 0.1, 0.9, 0.1], p_multi=[0.0] * 4)
    result = diffnet(tmp_path, "filter", expt, rules, f"rotation.min_good_fraction={fraction}")
    assert result.returncode == 0, result.stderr
    filtered = ExperimentListFactory.from_json_file(str(tmp_path / "filtered.expt"), check_format=True)
    assert len(filtered) == kept
    if kept:
        assert len(filtered[0].imageset) == 4, "a kept sequence is kept whole"
    assert "rotation sequences" in result.stdout


def test_rotation_rule_set_to_none_keeps_every_sequence_whole(sweep_json, tmp_path):
    expt, records_json = sweep_json
    rules = edited_json(records_json, tmp_path / "rules.json", p_hit=[0.1] * 4, p_multi=[0.0] * 4)  # no image passes
    result = diffnet(tmp_path, "filter", expt, rules, "rotation.min_good_fraction=None")
    assert result.returncode == 0, result.stderr
    filtered = ExperimentListFactory.from_json_file(str(tmp_path / "filtered.expt"), check_format=True)
    assert len(filtered) == 1 and len(filtered[0].imageset) == 4
    assert "not a hit" in result.stdout  # the image rules are still applied and counted
