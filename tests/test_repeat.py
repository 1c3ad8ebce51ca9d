import json
import math

import pytest
import torch

from model import build_model
from results import make_results
from utils import TrainConfig, fit

from lab import repeat

CONFIG = TrainConfig(epochs=2, batch_size=50, precision="fp32", seed=1)


@pytest.fixture
def reference(tiny_data):
    """A finished 2-epoch run's results, as a results file holds them (through JSON)."""
    model = build_model("batch", seed=CONFIG.seed)
    history = fit(model, tiny_data, CONFIG, "cpu", progress=False)
    return json.loads(json.dumps(make_results(model, tiny_data, CONFIG, history, "cpu")))


def test_a_run_repeated_on_the_same_machine_is_identical_to_the_last_digit(reference,
                                                                          tiny_data):
    result = repeat.repeat(reference, tiny_data, epochs=2)
    assert result["identical"] and result["first_difference"] is None
    assert [row["epoch"] for row in result["epochs"]] == [1, 2]
    row = result["epochs"][1]["train_loss"]
    assert row["repeat"] == row["reference"] == reference["history"]["train_loss"][1]


def test_one_ulp_in_one_logged_value_is_a_difference_and_is_located(reference, tiny_data):
    loss = reference["history"]["test_loss"]
    loss[1] = math.nextafter(loss[1], math.inf)
    result = repeat.repeat(reference, tiny_data, epochs=2)
    assert not result["identical"]
    assert result["first_difference"] == (2, "test_loss")


def test_the_repeat_runs_with_the_reference_runs_cpu_threads(reference, tiny_data):
    # a LayerNorm run repeated with 2 threads differed from its 1-thread original; with 1 it did not
    before = torch.get_num_threads()
    reference["hardware"]["cpu_threads"] = 1 if before > 1 else 2
    try:
        repeat.repeat(reference, tiny_data, epochs=1)
        assert torch.get_num_threads() == reference["hardware"]["cpu_threads"]
    finally:
        torch.set_num_threads(before)


def test_runs_it_cannot_repeat_are_refused_with_the_reason(reference, tiny_data):
    with pytest.raises(repeat.RepeatError, match="logged 2 epochs"):
        repeat.repeat(reference, tiny_data, epochs=3)
    reference["precision"] = "fp32, bf16"  # resumed on another machine
    with pytest.raises(repeat.RepeatError, match="never changed machines"):
        repeat.repeat(reference, tiny_data, epochs=1)


def test_an_existing_out_file_is_never_replaced(tmp_path):
    out = tmp_path / "check.json"
    out.write_text("{}")
    with pytest.raises(SystemExit, match="exists"):
        repeat.main([str(tmp_path / "run.json"), "--out", str(out)])
    assert out.read_text() == "{}"
