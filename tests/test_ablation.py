"""The ablation command's settings: memory fields, training fields, and a clear error for anything else."""

import pytest

from smf_lib.ablation import parse_settings


def test_settings_split_into_memory_and_training_fields():
    memory, train = parse_settings(["temperature=0.05", "lr=3.0", "count_on=entities", "write_on=counted"])
    assert memory == {"temperature": 0.05}
    assert train == {"lr": 3.0, "count_on": "entities", "write_on": "counted"}


def test_unknown_or_malformed_settings_are_refused():
    with pytest.raises(ValueError, match="fields: "):
        parse_settings(["temprature=0.05"])
    with pytest.raises(ValueError, match="is not key=value"):
        parse_settings(["lr"])
