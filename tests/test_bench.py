"""The bench suite runs end to end on the tiny model and writes every contract figure (no timing assertions)."""

import json
import math

import pytest

from smf_lib.bench import CONTRACT_KEYS, format_table, run_bench
from smf_lib.workloads import gpu_profile_peaks

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "b.json"
    return run_bench("tiny", out, repeats=2, progress=False), out


def test_contract_keys_are_finite_and_positive(bench_run):
    result, _ = bench_run
    for key in CONTRACT_KEYS:
        assert key in result, key
        value = result[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)


def test_written_file_equals_the_result(bench_run):
    result, out = bench_run
    assert json.loads(out.read_text()) == result
    assert result["profile"] == "tiny" and result["repeats"] == 2
    assert result["memory_measured_by"] and result["hardware"]["torch"]
    assert set(result["packed_step_seconds"]) == {"packed", "padded"} and result["packed_vs_padded_step_ratio"] > 0
    assert set(result["heldout_scoring_seconds"]) == {"full", "from_memory"}
    assert result["heldout_scoring_from_memory_ratio"] > 0


def test_scaling_lists(bench_run):
    scaling = bench_run[0]["memory_scaling"]
    assert [s["slots"] for s in scaling["by_slots"]] == [128**2, 256**2, 512**2, 1024**2]
    assert [s["seq_len"] for s in scaling["by_seq_len"]] == [64, 128, 256, 512]
    assert all(s["seconds"] > 0 for s in scaling["by_slots"] + scaling["by_seq_len"])


def test_table_mentions_every_key(bench_run):
    table = format_table(bench_run[0])
    for key in CONTRACT_KEYS:
        assert key in table


def test_unknown_profile_is_refused(tmp_path):
    with pytest.raises(ValueError, match="profile"):
        run_bench("nope", tmp_path / "b.json", progress=False)


def test_gpu_profile_budget_runs_its_children(bench_run):
    """The budget's child processes train and score beside a reference copy; here on the tiny profile and model."""
    result = gpu_profile_peaks(profile="tiny", model="tiny", methods=("smf_kl", "lora"))
    peaks, budget = result["gpu_profile_peak_mb"], result["gpu_profile_budget"]
    assert set(peaks) == {"smf_kl", "lora"} and all(mb > 0 for mb in peaks.values())
    assert budget["model"] == "tiny" and budget["profile"] == "tiny"
    assert all(budget["run_peak_mb"][m] >= mb for m, mb in peaks.items())
    assert "gpu profile peak MB" in format_table({**bench_run[0], **result})
