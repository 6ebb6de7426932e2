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
