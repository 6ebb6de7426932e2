"""Section 1 of the notebook: the CONFIG of the plan, override merging and path detection."""

import re
from pathlib import Path

import pytest

SPINAL = "spinal_canal_stenosis"
PLAN_CONFIG = {  # the plan's CONFIG block, verbatim values
    "seed": 42, "img_size": 256, "num_slices": 7, "batch_size": 12, "epochs": 25, "learning_rate": 1e-4,
    "backbone_lr": 1e-5, "weight_decay": 0.03, "class_weights": [1.0, 4.0, 6.0], "freeze_backbone_epochs": 0,
    "warmup_epochs": 2, "clip_grad_norm": 1.0, "patience": 12, "use_swa": True, "swa_start_epoch": 18,
    "swa_lr": 5e-6, "gru_hidden": 512, "gru_layers": 2, "gru_dropout": 0.3, "attention_hidden": 256,
    "dropout": 0.35, "num_folds": 5, "train_folds": [0],
}


@pytest.fixture(scope="module")
def params():
    """The parameters and definition cells, without setup: CONFIG exactly as the user sees it."""
    from notebook_cells import notebook_namespace

    return notebook_namespace({}, tags=("parameters", "defs"))


def test_config_holds_the_plan_at_its_values(params):
    """CONFIG as written holds the plan's values, but for the keys written 'auto': img_size and the schedule
    (epochs, warmup_epochs, swa_start_epoch, patience). 'auto' is the plan's value for the plan's run (the spinal
    canal alone) and the shared model's (SHARED_IMG_SIZE, SHARED_SCHEDULE) when more conditions train (issue 29)."""
    auto = {"img_size", *params["PLAN_SCHEDULE"]}
    for key, value in PLAN_CONFIG.items():
        assert params["CONFIG"][key] == ("auto" if key in auto else value), key
    assert params["CONFIG_OVERRIDES"] == {}
    plan = params["merge_config"](params["CONFIG"], {"conditions": [SPINAL]})
    assert {key: plan[key] for key in PLAN_CONFIG} == PLAN_CONFIG
    assert {key: PLAN_CONFIG[key] for key in params["PLAN_SCHEDULE"]} == params["PLAN_SCHEDULE"]
    five = params["merge_config"](params["CONFIG"], {})
    assert five["img_size"] == params["SHARED_IMG_SIZE"] == 128
    assert {key: five[key] for key in params["SHARED_SCHEDULE"]} == params["SHARED_SCHEDULE"]
    two = params["merge_config"](params["CONFIG"], {"conditions": [SPINAL, "left_subarticular_stenosis"]})
    assert two["img_size"] == 128 and two["epochs"] == params["SHARED_SCHEDULE"]["epochs"]
    assert params["merge_config"](params["CONFIG"], {"img_size": 160})["img_size"] == 160  # a number is kept
    assert params["merge_config"](params["CONFIG"], {"epochs": 20})["epochs"] == 20
    with pytest.raises(ValueError, match="img_size.*'auto'"):
        params["merge_config"](params["CONFIG"], {"img_size": "big"})


def test_the_shared_schedule_keeps_the_plans_shape(params):
    """The shared model's schedule: warmup, then cosine, SWA over the last epochs and early stopping that cannot
    end the run before SWA, as the plan's; the plan's checkpoint epochs (1, 3, 10) all fall inside it."""
    shared, plan = params["SHARED_SCHEDULE"], params["PLAN_SCHEDULE"]
    assert 0 < shared["warmup_epochs"] < shared["swa_start_epoch"] <= shared["epochs"] < plan["epochs"]
    assert max(params["PLAN_CHECKPOINT_EPOCHS"]) <= shared["epochs"]
    swa_share = lambda s: (s["epochs"] - s["swa_start_epoch"] + 1) / s["epochs"]  # noqa: E731
    assert abs(swa_share(shared) - swa_share(plan)) < 0.05  # the plan averages its last 8 of 25 epochs
    assert shared["patience"] < shared["epochs"]


def test_every_config_key_has_a_why_comment():
    source = (Path(__file__).resolve().parents[1] / "le3ba_v9.py").read_text()
    block = source[source.index("CONFIG = {"):source.index("CONFIG_OVERRIDES = {}")]
    for line in block.splitlines()[1:-1]:
        if re.match(r"\s+'\w+':", line):
            assert "#" in line, f"no comment: {line.strip()}"


def test_unknown_override_names_the_key_and_the_nearest(nb):
    with pytest.raises(KeyError, match="Unknown CONFIG key 'learning_rat'.*Did you mean 'learning_rate'"):
        nb["merge_config"](nb["CONFIG"], {"learning_rat": 1e-3})
    with pytest.raises(KeyError, match="Unknown CONFIG key 'zzz'"):
        nb["merge_config"](nb["CONFIG"], {"zzz": 1})


def test_overrides_and_demo_preset_merge_in_order(params):
    config, preset = params["CONFIG"], params["DEMO_PRESET"]
    merged = params["merge_config"](config, {"batch_size": 4})
    assert merged["batch_size"] == 4 and merged["epochs"] == params["SHARED_SCHEDULE"]["epochs"]
    assert config["batch_size"] == 12  # the user's CONFIG is not modified
    demo = params["merge_config"](config, {"demo": True, "epochs": 2, "swa_start_epoch": 2})
    assert demo["epochs"] == 2  # the user's override sits above the preset
    assert demo["img_size"] == preset["img_size"] != config["img_size"]
    assert set(preset) <= set(config)  # the preset only sets known keys


def test_kaggle_data_root_is_found_in_both_layouts(params, tmp_path, monkeypatch):
    for layout in ("input/rsna", "input/competitions/rsna"):
        root = tmp_path / layout
        root.mkdir(parents=True)
        (root / "train.csv").write_text("study_id\n")
        monkeypatch.setitem(params, "KAGGLE_DATA_ROOTS", [tmp_path / "input/rsna-missing", root])
        config = params["resolve_paths"]({**params["CONFIG"], "output_dir": str(tmp_path / "out")})
        assert config["data_root"] == str(root)
        assert config["cache_dir"] == str(tmp_path / "out" / "cache")
        (root / "train.csv").unlink()


def test_missing_data_root_says_what_to_do(params, tmp_path, monkeypatch):
    monkeypatch.setitem(params, "KAGGLE_DATA_ROOTS", [tmp_path / "nowhere"])
    with pytest.raises(FileNotFoundError, match="demo"):
        params["resolve_paths"]({**params["CONFIG"], "output_dir": str(tmp_path / "out")})
    with pytest.raises(FileNotFoundError, match="no train.csv"):
        params["resolve_paths"]({**params["CONFIG"], "output_dir": str(tmp_path / "out"), "data_root": str(tmp_path)})


@pytest.mark.parametrize("change, message", [
    ({"num_slices": 6}, "odd number"), ({"intensity": "ct"}, "intensity"), ({"precision": "fp8"}, "precision"),
    ({"final_model": "ema"}, "final_model"), ({"pooling": "max"}, "pooling"),
    # issue 13.9: mistakes that used to fail after the cache build or a whole epoch stop at merge time
    ({"train_folds": [5]}, r"train_folds.*range\(num_folds=5\)"), ({"train_folds": [-1]}, "train_folds"),
    ({"class_weights": [1.0, 4.0]}, "class_weights.*3 positive"), ({"img_size": 0}, "img_size"),
    ({"epochs": 3}, r"swa_start_epoch'\] = 11 > epochs = 3 with use_swa on"),
    ({"epochs": 3, "conditions": [SPINAL]}, r"swa_start_epoch'\] = 18 > epochs = 3 with use_swa on"),
    ({"epochs": "long"}, r"epochs'\] = 'long': give a whole number of epochs or 'auto'"),
    ({"patience": -1}, r"patience'\] = -1")])
def test_invalid_settings_stop_with_a_clear_message(params, change, message):
    with pytest.raises(ValueError, match=message):
        params["merge_config"](params["CONFIG"], change)


def test_missing_pretrained_file_stops_at_merge(params, tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained.*no such file"):
        params["merge_config"](params["CONFIG"], {"pretrained": str(tmp_path / "missing.pth")})
    (tmp_path / "there.pth").write_bytes(b"")
    assert params["merge_config"](params["CONFIG"], {"pretrained": str(tmp_path / "there.pth")})


def test_settings_that_switch_a_planned_feature_off_are_reported_at_merge(params, capsys):
    params["WARNINGS"].clear()
    params["merge_config"](params["CONFIG"], {"use_swa": False})
    assert any("use_swa is off: the final model will be 'last'" in w for w in params["WARNINGS"])
    params["merge_config"](params["CONFIG"], {"epochs": 5, "swa_start_epoch": 4})
    assert "checkpoint epoch(s) [10] lie beyond epochs = 5" in capsys.readouterr().out


def test_default_workers_follow_the_cpu_affinity(params, monkeypatch):
    monkeypatch.setattr(params["os"], "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(params["os"], "cpu_count", lambda: 64)
    assert params["worker_count"]({"num_workers": None}) == 2
    assert params["worker_count"]({"num_workers": 5}) == 5


def test_kaggle_cache_goes_to_kaggle_temp(params, tmp_path, monkeypatch):
    root = tmp_path / "input"
    root.mkdir()
    (root / "train.csv").write_text("study_id\n")
    monkeypatch.setitem(params, "runtime_environment", lambda: "kaggle")
    monkeypatch.setitem(params, "KAGGLE_TEMP", tmp_path / "kaggle_temp")
    config = params["resolve_paths"]({**params["CONFIG"], "output_dir": str(tmp_path / "out"), "data_root": str(root)})
    assert config["cache_dir"] == str(tmp_path / "kaggle_temp" / "le3ba_v9_cache")
    own = params["resolve_paths"]({**params["CONFIG"], "output_dir": str(tmp_path / "out"), "data_root": str(root),
                                   "cache_dir": str(tmp_path / "mine")})
    assert own["cache_dir"] == str(tmp_path / "mine")
