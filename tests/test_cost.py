"""bench/cost.py (issue 29 item 1) and the notebook's cost model it calls (training_projection and its parts): the
FLOP counting against counts done by hand, why a training step is 3x the forward (the counter's grouped-convolution
backward), the --json figures' consistency (ratios to the plan's run, the cache bytes), with a small backbone where
the real one is not needed, and the line the notebook prints before training."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import cost  # noqa: E402  (bench/cost.py, as the command line runs it)

KEYS = {"grid_px", "num_slices", "samples_per_epoch", "epochs", "train_gflop_per_sample", "fold_ratio_to_plan",
        "run_ratio_to_plan", "cache_gb", "test_gflop_per_study", "test_hours_t4"}
SMALL = ["--backbone", "mobilenet_v3_small"]
AT_256 = "Sagittal T2/STIR=256,Sagittal T1=256,Axial T2=256"  # all five at the plan's grid (the default is 128)
ALL_FIVE = ["spinal_canal_stenosis", "left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing",
            "left_subarticular_stenosis", "right_subarticular_stenosis"]


def conv_flops(cin, cout, k, h, w, groups=1):
    """A convolution's multiply-adds x 2, by hand: each output pixel of each output channel sums cin / groups x k x k
    products."""
    return 2 * cout * (cin // groups) * k * k * h * w


@pytest.fixture(scope="module")
def notebook():
    """The notebook's parameters and defs cells, as bench/cost.py loads them."""
    return cost.load_notebook()


def run_json(capsys, *argv):
    cost.main(["--json", *argv])
    return json.loads(capsys.readouterr().out)


def test_flop_count_matches_a_count_by_hand_on_a_tiny_model(notebook):
    """Conv2d (dense and grouped, stride 1, padding keeps the size) + Linear, batch 2, and a 2-layer bidirectional
    GRU like the classifier's: the notebook's forward_flops (the function the cost model counts with) gives the
    formulas' FLOPs exactly (bias adds and activations are not counted, by the counter's convention and the
    formulas')."""
    forward_flops = notebook["forward_flops"]
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4),
                          nn.Flatten(), nn.Linear(8 * 12 * 10, 5))
    by_hand = 2 * (conv_flops(3, 8, 3, 12, 10) + conv_flops(8, 8, 3, 12, 10, groups=4) + 2 * 8 * 12 * 10 * 5)
    assert forward_flops(model, torch.zeros(2, 3, 12, 10)) == by_hand

    gru = nn.GRU(16, 8, num_layers=2, batch_first=True, bidirectional=True)
    steps, hidden = 7, 8
    per_step = [2 * (3 * hidden * inputs + 3 * hidden * hidden) for inputs in (16, 2 * hidden)]  # W_ih x, W_hh h
    assert forward_flops(gru, torch.zeros(1, steps, 16)) == sum(2 * steps * f for f in per_step)  # 2 directions


def test_grouped_convolution_backward_is_counted_dense_so_a_step_is_3x_the_forward(notebook):
    """A 256-group 3x3 convolution on 32x32: the forward is the hand count (4.72 MFLOP), but torch's counter
    counts its backward as a dense convolution (about 1,213 MFLOP, ~128x the 9.4 MFLOP of gradient work by hand;
    1,217 MFLOP forward plus backward), which would inflate EfficientNet's depthwise layers. So the cost model
    counts the forward only and takes a training step as 3x it."""
    conv = nn.Conv2d(256, 256, 3, padding=1, groups=256, bias=False)
    forward = conv_flops(256, 256, 3, 32, 32, groups=256)
    assert forward == 4_718_592 and notebook["forward_flops"](conv, torch.zeros(1, 256, 32, 32)) == forward
    x = torch.randn(1, 256, 32, 32, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        conv(x).sum().backward()
    backward = counter.get_total_flops() - forward
    assert backward > 50 * 2 * forward, counter.get_total_flops()  # by hand: input and weight gradients, 2x forward
    assert backward == pytest.approx(conv_flops(256, 256, 3, 32, 32) + forward, rel=0.01)  # a dense one, + weights'


def test_json_has_the_keys_and_the_plans_run_is_ratio_one(capsys, notebook):
    """Default CONFIG with a small backbone: the spinal canal alone at 256 px, 7 slices, 25 epochs is the plan's
    run (ratio 1); all five conditions at 256 px are five times its samples, so five times its FLOPs (every
    condition is taken at the same labelled rows); five folds against the plan's five folds: the same ratio, and
    three folds 3/5 of it. The cache is every labelled row x (7 x crop_side^2 + 7 mask bytes)."""
    spinal = run_json(capsys, *SMALL, "--conditions", "spinal_canal_stenosis")
    assert KEYS <= set(spinal)
    assert spinal["grid_px"] == {"Sagittal T2/STIR": 256} and spinal["num_slices"] == {"Sagittal T2/STIR": 7}
    assert spinal["epochs"] == 25
    assert spinal["fold_ratio_to_plan"] == pytest.approx(1.0, abs=1e-6)
    assert spinal["run_ratio_to_plan"] == pytest.approx(1.0, abs=1e-6)
    rows = spinal["samples_per_epoch"]["spinal_canal_stenosis"]
    assert rows == round(notebook["REAL_LABELLED_ROWS"] * 4 / 5)  # a fold trains 4 of the 5 folds' rows

    five = run_json(capsys, *SMALL, "--grid", AT_256, "--epochs", "25")  # the plan's grid and epochs for all five
    assert KEYS <= set(five) and set(five["samples_per_epoch"]) == set(ALL_FIVE)
    assert set(five["grid_px"]) == {"Sagittal T2/STIR", "Sagittal T1", "Axial T2"}
    assert five["fold_ratio_to_plan"] == pytest.approx(5.0, rel=1e-6)
    assert five["run_ratio_to_plan"] == pytest.approx(5.0, rel=1e-6)
    for series, gflop in five["train_gflop_per_sample"].items():
        assert gflop == pytest.approx(3 * five["forward_gflop_per_sample"][series], rel=1e-12) and gflop > 0
    side = 2 * math.ceil(256 * 1.45 / 2)
    assert side == 372 and set(five["crop_side_px"].values()) == {side}
    assert five["cache_gb"] == pytest.approx(5 * notebook["REAL_LABELLED_ROWS"] * (7 * side**2 + 7) / 1e9, rel=1e-12)
    assert spinal["cache_gb"] == pytest.approx(five["cache_gb"] / 5, rel=1e-12)
    # the test: localisers + 25 targets x 5 views (tta_shift 'auto' with more conditions) of classifier forwards per
    # fold's models, all five folds averaged
    one_fold = five["test_gflop_per_study_one_fold"]
    assert one_fold == pytest.approx(sum(five["test_localiser_gflop_one_fold"].values())
                                     + 5 * 25 * five["forward_gflop_per_sample"]["Sagittal T2/STIR"], rel=1e-9)
    assert five["test_gflop_per_study"] == pytest.approx(5 * one_fold, rel=1e-12) and five["test_hours_t4"] > 0

    three = run_json(capsys, *SMALL, "--grid", AT_256, "--folds", "3", "--epochs", "10")
    assert three["epochs"] == 10 and three["fold_ratio_to_plan"] < five["fold_ratio_to_plan"]
    assert three["run_ratio_to_plan"] == pytest.approx(3 / 5 * three["fold_ratio_to_plan"], rel=1e-12)


def test_grid_per_series_type_from_config_or_command_line(capsys, notebook):
    """CONFIG's img_size_by_series where it names a series type, else img_size; --grid over both; a smaller
    grid: fewer FLOPs and a smaller cached crop (crop_side of that grid)."""
    config = {"img_size": 256, "img_size_by_series": {"Axial T2": 96}}
    by_series = notebook["by_series"]
    assert by_series(config, "img_size", "img_size_by_series", ["Sagittal T1", "Axial T2"]) == \
        {"Sagittal T1": 256, "Axial T2": 96}
    assert by_series(config, "img_size", "img_size_by_series", ["Axial T2"], {"Axial T2": 64}) == {"Axial T2": 64}
    assert cost.parse_grid("Sagittal T2/STIR=256, Axial T2=128", {"Sagittal T2/STIR", "Axial T2"}) == \
        {"Sagittal T2/STIR": 256, "Axial T2": 128}
    with pytest.raises(SystemExit):
        cost.parse_grid("Coronal=128", {"Axial T2"})

    out = run_json(capsys, *SMALL, "--grid", "Sagittal T2/STIR=256,Sagittal T1=128,Axial T2=128")
    assert out["grid_px"] == {"Sagittal T2/STIR": 256, "Sagittal T1": 128, "Axial T2": 128}
    assert out["crop_side_px"] == {"Sagittal T2/STIR": 372, "Sagittal T1": 186, "Axial T2": 186}
    flops = out["train_gflop_per_sample"]
    assert flops["Sagittal T1"] == flops["Axial T2"] < flops["Sagittal T2/STIR"] / 3
    assert 1 < out["fold_ratio_to_plan"] < 5

    nb = notebook
    merged = {**nb["merge_config"](nb["CONFIG"], {"backbone": "mobilenet_v3_small", "img_size": 256}),
              "img_size_by_series": {"Sagittal T1": 128, "Axial T2": 128}}  # as a later CONFIG may hold it
    from_config = cost.cost(merged, "mobilenet_v3_small", nb=nb)
    assert from_config["grid_px"] == out["grid_px"]
    assert from_config["fold_ratio_to_plan"] == pytest.approx(out["fold_ratio_to_plan"], rel=1e-12)


def test_the_plans_run_on_its_backbone_projects_the_anchor(capsys):
    """The plan's run with EfficientNet-V2-S is the anchor: 3.5 projected hours per fold on one T4, 3.5 / 1.8 on
    T4 x2; the table says 'projected' and names the anchor and what the test figure leaves out."""
    plan = run_json(capsys, "--conditions", "spinal_canal_stenosis")
    assert plan["backbone"] == "efficientnet_v2_s"
    hours = plan["hours_projected"]
    assert hours["one T4"]["fold"] == pytest.approx(3.5, rel=1e-9)
    assert hours["one T4"]["run"] == pytest.approx(17.5, rel=1e-9)
    assert hours["T4 x2"]["fold"] == pytest.approx(3.5 / 1.8, rel=1e-9)
    assert hours["L4"]["fold"] == pytest.approx(3.5 * 65 / 121, rel=1e-9)
    cost.main(["--conditions", "spinal_canal_stenosis"])
    table = capsys.readouterr().out
    assert "projected" in table and "anchor: the plan's 3.5 h per fold" in table
    assert "outside the models, measured on the CPU" in table
    assert "ratio to the plan: fold 1.00x" in table


def counted_samples(conditions, rows, folds, holdout=0):
    """A sample table with only what run_rows reads: `rows` per condition spread evenly over `folds` folds, then
    `holdout` more per condition held out (fold -1)."""
    fold = np.concatenate([np.arange(rows) % folds, -np.ones(holdout, dtype=int)])
    return pd.DataFrame({"condition": np.repeat(conditions, rows + holdout), "fold": np.tile(fold, len(conditions))})


def merged(notebook, capsys, **overrides):
    """The notebook's CONFIG with `overrides`, merged as the notebook merges them (its notes not printed)."""
    config = notebook["merge_config"](notebook["CONFIG"], overrides)
    capsys.readouterr()
    return config


def test_notebook_projection_is_the_plans_run_at_one_and_all_five_at_five(notebook, capsys):
    """The notebook's training_projection at the real data's counts with its default backbone (EfficientNet-V2-S):
    the spinal canal alone at 256 px, 7 slices, 25 epochs is the plan's run (ratio 1, the anchor's 3.5 h per fold
    on one T4, 3.5 / 1.8 on T4 x2, 3.5 x 65 / 121 on an L4); all five conditions at the same grid five times its
    FLOPs, hours and cache; a hold-out takes its rows out of every fold's training and validation."""
    project, rows_of = notebook["training_projection"], notebook["real_data_rows"]
    spinal = merged(notebook, capsys, conditions=["spinal_canal_stenosis"])
    assert spinal["backbone"] == "efficientnet_v2_s" and spinal["img_size"] == 256 and spinal["epochs"] == 25
    plan = project(spinal, rows_of(spinal))
    assert plan["fold"] / plan["plan_fold"] == pytest.approx(1.0, rel=1e-12) and plan["anchor_fold"] == plan["fold"]
    assert plan["hours"]["one T4"] == pytest.approx(3.5, rel=1e-12)
    assert plan["hours"]["T4 x2"] == pytest.approx(3.5 / 1.8, rel=1e-12)
    assert plan["hours"]["L4"] == pytest.approx(3.5 * 65 / 121, rel=1e-12)

    five = merged(notebook, capsys, img_size=256, epochs=25)  # all five at the plan's grid and epochs
    assert len(five["conditions"]) == 5
    all_five = project(five, rows_of(five))
    assert all_five["grid"] == {"Sagittal T2/STIR": 256, "Sagittal T1": 256, "Axial T2": 256}
    assert all_five["fold"] / all_five["plan_fold"] == pytest.approx(5.0, rel=1e-12)
    assert all_five["hours"]["one T4"] == pytest.approx(17.5, rel=1e-12)
    assert all_five["cache_bytes"] == pytest.approx(5 * plan["cache_bytes"], rel=1e-12)
    assert plan["cache_bytes"] == notebook["REAL_LABELLED_ROWS"] * (7 * 372**2 + 7)

    held = rows_of({**five, "holdout_frac": 0.2})["spinal_canal_stenosis"]
    assert held == pytest.approx({"labelled": 9700, "holdout": 1940, "val": 1552, "train": 6208})


def test_classifier_flops_on_the_meta_device_equal_the_cpus_count(notebook, capsys):
    """classifier_flops builds the model on the meta device (shapes, no arithmetic, no GPU): the same count as the
    model's forward on the CPU, here with the tests' small backbone at 64 px."""
    config = merged(notebook, capsys, backbone="mobilenet_v3_small", pretrained="none", gru_hidden=32)
    model = notebook["SpineModelV9"](config).eval()
    on_cpu = notebook["forward_flops"](model, torch.zeros(1, 5, 3, 64, 64), torch.tensor([0]),
                                       torch.ones(1, 5, dtype=torch.bool))
    assert notebook["classifier_flops"](config, 64, 5) == on_cpu > 0
    assert not torch.cuda.is_initialized()


def test_the_line_printed_before_training(notebook, capsys):
    """projection_line on a sample table at the real data's counts for the default CONFIG (all five conditions,
    fold 0 of five): one line, labelled a projection, naming its anchor, the run's settings and sample counts, the
    ratio, the hours on the three GPUs and the cache; a failure is one line that names it, never an exception."""
    config = merged(notebook, capsys, img_size=256, epochs=25)
    samples = counted_samples(config["conditions"], 9700, 5)
    line = notebook["projection_line"](config, samples)
    assert line == (
        "projected before training (FLOPs counted on the CPU, anchor: the plan's 3.5 h per fold on one T4): this "
        "run 5.00x the plan's per fold (efficientnet_v2_s, 5 condition(s), 256 px, 7 slices, 25 epochs; this "
        "run's samples, fold 0: 38,800 trained per epoch, 9,700 validated), ~17.5 h per fold on one T4, 9.7 h on "
        "T4 x2, 9.4 h on an L4 (1 fold(s) to train); crop cache 47.0 GB; measured after epoch 1")
    assert notebook["projection_note"](config, samples) == line

    small = {**config, "img_size_by_series": {"Sagittal T1": 128, "Axial T2": 128}, "train_folds": [2, 3]}
    rows = notebook["run_rows"](counted_samples(config["conditions"], 100, 5, holdout=10), small)
    assert rows["left_subarticular_stenosis"] == {"labelled": 110, "train": 80, "val": 20, "holdout": 10}
    line = notebook["projection_line"](small, counted_samples(config["conditions"], 9700, 5))
    assert "\n" not in line and "Sagittal T2/STIR 256, Sagittal T1 128, Axial T2 128 px" in line
    assert "fold 2:" in line and "(2 fold(s) to train)" in line

    demo = merged(notebook, capsys, demo=True)
    line = notebook["projection_line"](demo, counted_samples(demo["conditions"], 120, demo["num_folds"]))
    assert "its efficientnet_v2_s FLOP rate applied" in line and " s per fold on one T4" in line and " MB;" in line

    note = notebook["projection_note"]({**config, "backbone": "resnet"}, samples)
    assert note.startswith("projected before training: not available (ValueError: CONFIG['backbone']")
    assert "\n" not in note


def test_the_hidden_test_projection_by_hand(notebook, capsys):
    """prediction_projection: per study the measured seconds outside the models (TEST_CPU_SECONDS) plus every fold's
    models' forward FLOPs at the anchor's rate; the localiser's FLOPs on the meta device equal the CPU's count; a
    'volume' localiser runs over every slice of a typical series, a 'slice' one once per level."""
    config = merged(notebook, capsys)
    loc = notebook["LevelLocaliser"](config["loc_channels"], 10).eval()
    on_cpu = notebook["forward_flops"](loc, torch.zeros(1, 4, 64, 64))
    assert notebook["localiser_flops"](config["loc_channels"], 64, 10) == on_cpu > 0
    localisers, classifier = notebook["test_study_flops"](config)
    size, slices = config["loc_size"], notebook["SAGITTAL_SLICES"]
    assert localisers == {"Sagittal T2/STIR": slices * notebook["localiser_flops"](16, size, 5),
                          "Sagittal T1": slices * notebook["localiser_flops"](16, size, 10),
                          "Axial T2": 5 * notebook["localiser_flops"](16, size, 2)}
    assert classifier == 5 * 25 * notebook["classifier_flops"](config, 128, 7)  # 25 targets, five views each
    p = notebook["prediction_projection"](config, 3, 700)
    rate = notebook["plan_fold_flops"](config, "efficientnet_v2_s") / (3.5 * 3600)
    assert p["flops"] == 3 * (sum(localisers.values()) + classifier)
    seconds = notebook["TEST_CPU_SECONDS"]["seconds"] + p["flops"] / rate
    assert p["seconds"] == pytest.approx(seconds, rel=1e-12) and p["hours"] == pytest.approx(700 * seconds / 3600)
    line = notebook["prediction_line"](config, 3, 700)
    assert line.startswith(f"projected prediction of 700 test studies with 3 fold(s)' models: {p['hours']:.2f} h")
    assert notebook["prediction_line"]({**config, "loc_size": "x"}, 3, 700).startswith(
        "projected prediction: not available (TypeError")


def test_the_default_run_fits_kaggle(capsys):
    """Issue 29's targets, projected for the default CONFIG (all five conditions, EfficientNet-V2-S, five folds at
    SHARED_IMG_SIZE and SHARED_SCHEDULE's epochs): training FLOPs at most 1.5x the plan's five folds, a crop cache
    of at most 15 GB and the hidden test's 700 studies in at most 2 h on one T4 (reading and crops measured on the
    CPU, models by FLOPs). The ratio by hand: 128 px is a quarter of 256 px's pixels, five times the samples, over
    15 of 25 epochs: about 5 x 15/25 / 4 = 0.75 (a little more: the GRU and head do not shrink with the grid)."""
    c = run_json(capsys)
    assert c["backbone"] == "efficientnet_v2_s" and c["folds"] == 5 and len(c["conditions"]) == 5
    assert c["grid_px"] == {"Sagittal T2/STIR": 128, "Sagittal T1": 128, "Axial T2": 128} and c["epochs"] == 15
    assert 0.75 < c["run_ratio_to_plan"] <= 0.85
    assert c["cache_gb"] <= 15
    assert c["test_hours_t4"] <= 2 and c["test_hours_t4"] > 700 * c["test_cpu_seconds_per_study"] / 3600
