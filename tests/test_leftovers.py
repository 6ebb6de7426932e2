"""Issue 17, items left from the last round: validation every N epochs with N = 0, the attention strips and
worst-errors gallery at the model's field of view, and the report's honest wording of each final model."""

import numpy as np
import pandas as pd
import pytest
import torch

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cached(nb, tmp_path_factory):
    """Samples (with folds) and the crop cache of the session's study set."""
    config = {**nb["CONFIG"], "cache_dir": str(tmp_path_factory.mktemp("cache")), "num_folds": 4}
    samples, _ = nb["build_sample_table"](config)
    samples, images, masks, _ = nb["build_cache"](nb["assign_folds"](samples, config), config, workers=1)
    return samples, images, masks


# --------------------------------------------------------------------------- val_every: 0
def test_val_every_zero_validates_only_the_plans_checkpoint_epochs_and_the_last(nb, cached, tmp_path):
    config = {**nb["CONFIG"], "output_dir": str(tmp_path), "epochs": 4, "batch_size": 8, "num_folds": 4,
              "warmup_epochs": 1, "use_swa": False, "gru_hidden": 16, "attention_hidden": 16, "val_every": 0}
    result = nb["train_fold"](0, *cached, config, CPU)
    assert ["val_ba" in row for row in result["history"]] == [True, False, True, True]  # epochs 1, 3 and 4


@pytest.mark.parametrize("value", [-1, 1.5, "2"])
def test_val_every_that_is_not_a_whole_number_of_epochs_stops_at_merge(nb, value):
    with pytest.raises(ValueError, match=r"val_every'\] = .*whole number of epochs >= 0"):
        nb["merge_config"](nb["CONFIG"], {"val_every": value})


# --------------------------------------------------------------------------- strips at the model's field of view
def test_attention_strips_and_worst_errors_show_the_img_size_centre_the_model_saw(nb, monkeypatch):
    config = nb["CONFIG"]
    side, size = nb["crop_side"](config), config["img_size"]
    assert side > size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 7, side, side), dtype=np.uint8)
    oof = pd.DataFrame({"cache_index": [2, 0, 3], "label": [0, 1, 2], "study_id": [1, 2, 3], "level": "l1_l2",
                        **{c: [0.5, 0.3, 0.2] for c in nb["P_COLUMNS"]}, **{f"attn_{j}": 1 / 7 for j in range(7)}})
    drawn = []
    monkeypatch.setitem(nb, "show", lambda fig, name: drawn.append([ax.images[0].get_array() for ax in fig.axes]))
    nb["plot_strips"](oof, images, size, "strips", "attention_strips")
    nb["plot_strips"](oof, images, size, "worst", "worst_errors", rows=oof.iloc[[2]])
    expected = [[images[i, j] for i in (2, 0, 3) for j in range(7)], [images[3, j] for j in range(7)]]
    for arrays, wanted in zip(drawn, expected, strict=True):
        assert len(arrays) == len(wanted)
        for array, image in zip(arrays, wanted):
            np.testing.assert_array_equal(np.asarray(array), nb["centre_crop"](image, size))


# --------------------------------------------------------------------------- the report's wording of each model
@pytest.fixture(scope="module")
def stopped_early(nb, cached, tmp_path_factory):
    """A fold that early stopping ended after epoch 1 (nothing ever passes the save gate), without SWA."""
    out = tmp_path_factory.mktemp("stopped")
    config = {**nb["CONFIG"], "output_dir": str(out), "epochs": 3, "batch_size": 8, "num_folds": 4, "patience": 1,
              "warmup_epochs": 1, "use_swa": False, "min_minority_recall": 1.01, "gru_hidden": 16,
              "attention_hidden": 16}
    result = nb["train_fold"](0, *cached, config, CPU)
    assert [row["epoch"] for row in result["history"]] == [1] and set(result["evaluations"]) == {"last"}
    return config, cached[0], result


def headline_model(nb, config, samples, result):
    """The report's 'Final model' line for one fold result."""
    oof = nb["oof_frame"]([result], lambda r: nb["final_kind"](r, config))
    final = nb["summarize"](oof)
    tables = (pd.DataFrame(columns=["reason", "rows"]), pd.DataFrame(columns=nb["ISSUE_COLUMNS"]))
    report = nb["write_report"](config, samples, *tables, [result], oof, final,
                                nb["model_comparison"]([result]), None,
                                nb["attention_analysis"](oof, config["pooling"]),
                                nb["confused_pairs"](final["confusion"]))
    return next(line for line in report.splitlines() if line.startswith("- Final model:"))


def test_report_says_validation_decided_when_early_stopping_ended_the_fold(nb, stopped_early):
    config, samples, result = stopped_early
    line = headline_model(nb, config, samples, result)
    stopped = "fold 0: last (the last epoch; validation decided when training stopped (early stopping after epoch 1)"
    assert stopped in line and "not selected on validation" not in line
    actions = {**result, "actions": ["epoch 1: a class has 0 predictions: Moderate weight 4.0 -> 8.0"]}
    line = headline_model(nb, config, samples, actions)
    assert f"{stopped} and the class weights (the plan's actions at epoch 1))" in line
    plain = {**result, "stopped_by": None, "actions": []}
    assert "fold 0: last (the last epoch, not selected on validation)" in headline_model(nb, config, samples, plain)


@pytest.mark.parametrize("stopped, actions, wording", [
    (False, [], "the SWA average of the last epochs, not selected on validation"),
    (False, ["epoch 3: Severe weight 6.0 -> 8.0"],
     "the SWA average of the last epochs; validation decided the class weights (the plan's actions at epoch 3)"),
    (False, ["epoch 1: x", "epoch 3: y", "epoch 3: z"],
     "the SWA average of the last epochs; validation decided the class weights (the plan's actions at epochs 1, 3)"),
])
def test_swa_wording_names_the_class_weight_actions(nb, stopped, actions, wording):
    result = {"stopped_by": "early" if stopped else None, "actions": actions, "history": []}
    assert nb["model_wording"]("swa", result) == wording
    best = nb["model_wording"]("best", {"stopped_by": "early", "actions": actions, "history": []})
    assert best.startswith("the best epoch, SELECTED ON ITS OWN VALIDATION FOLD")
