"""Config validation: ranges, thresholds and detector names fail at load time, naming the field."""

import math

import pytest

from curation.config import ConfigError, ThresholdConfig, load_config

ONE_DETECTOR = "detectors=[{kind: mcm, name: mcm, task_texts: [apple, banana]}]"


def load(*overrides):
    return load_config(None, [ONE_DETECTOR, *overrides])


def test_partition_size_zero_fails_before_the_run_directory_is_claimed(tmp_path, capsys):
    from curation.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(f"source: {{uri: {tmp_path / 'images'}, partition_size: 0}}\n"
                      f"output: {{uri: {tmp_path / 'out'}}}\n"
                      "detectors: [{kind: mcm, task_texts: [apple, banana]}]\n")
    with pytest.raises(ConfigError, match=r"^source\.partition_size: must be a positive integer, got 0$"):
        load_config(config)
    assert main(["curate", "--config", str(config)]) == 2
    assert "source.partition_size: must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["curate", "--config", str(config), "--set", "source.partition_size=8",
                 "--set", "compute.actors=0"]) == 2
    assert not (tmp_path / "out").exists(), "nothing written, so the corrected config is not a conflict"


@pytest.mark.parametrize("override, message", [
    ("source.max_pixels=-1", "source.max_pixels: must be a positive integer, got -1"),
    ("model.batch_size=0", "model.batch_size: must be a positive integer or null, got 0"),
    ("compute.actors=0", "compute.actors: must be a positive integer, got 0"),
    ("compute.cpus_per_actor=-0.5", "compute.cpus_per_actor: must be a finite number >= 0"),
    ("compute.gpus_per_actor=.nan", "compute.gpus_per_actor: must be a finite number >= 0, got nan"),
    ("compute.decode_cpus=.inf", "compute.decode_cpus: must be a finite number >= 0, got inf"),
    ("compute.torch_threads=-1", "compute.torch_threads: must be a finite number >= 0"),
    ("detectors.0.threshold.sample_size=0", "detectors[0].threshold.sample_size: must be a positive integer"),
    ("detectors.0.threshold.min_sample=0", "detectors[0].threshold.min_sample: must be a positive integer"),
    ("detectors.0.threshold.value=1.5", "detectors[0].threshold.value: must be an unwanted score in [0, 1]"),
    ("detectors.0.threshold.value=-0.1", "detectors[0].threshold.value: must be an unwanted score in [0, 1]"),
    ("detectors.0.threshold.value=.nan", "detectors[0].threshold.value: must be a finite number, got nan"),
    ("detectors.0.threshold={strategy: tpr, value: 0}", "detectors[0].threshold.value: must be a tpr fraction in (0, 1]"),
    ("detectors.0.threshold={strategy: quantile, value: 0.1, sample_size: 50}",
     "detectors[0].threshold.min_sample: must be <= sample_size (50), got 100"),
])
def test_out_of_range_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load(override)
    assert message in str(err.value)


def test_a_quantile_given_as_a_percentage_says_so():
    with pytest.raises(ConfigError, match=r"detectors\[0\]\.threshold\.value: a quantile value is a fraction in "
                                          r"\[0, 1\]; 10 looks like a percentage, use 0\.1"):
        load("detectors.0.threshold={strategy: quantile, value: 10}")
    assert load("detectors.0.threshold={strategy: quantile, value: 0.1}").detectors[0].threshold.value == 0.1


def test_direct_construction_is_checked_too():
    with pytest.raises(ConfigError, match="value: must be a finite number"):
        ThresholdConfig(value=math.inf)


def test_min_sample_is_not_part_of_the_decision():
    """Lowering min_sample after a refused calibration must resume the same run directory."""
    quantile = "detectors.0.threshold={strategy: quantile, value: 0.1, sample_size: 64, min_sample: %d}"
    assert load(quantile % 50).decision_hash() == load(quantile % 5).decision_hash()


@pytest.mark.parametrize("name", ["../../x", "a/b", "a,b", "a b", "tab\there", ".hidden", "-dash", "", "x" * 65,
                                  "naïve"])
def test_detector_names_are_identifiers(name):
    with pytest.raises(ConfigError, match=r"detectors\[0\]\.name: .* is not a valid detector name"):
        load_config(None, ["detectors=[{kind: mcm, task_texts: [apple]}]", f"detectors.0.name={name!r}"])


def test_valid_detector_names_pass():
    cfg = load_config(None, ["detectors=[{kind: mcm, name: food_mcm-2, task_texts: [apple, plum]}, "
                             "{kind: mcm, name: _x, task_texts: [pear, fig]}]"])
    assert [d.label for d in cfg.detectors] == ["food_mcm-2", "_x"]
