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
