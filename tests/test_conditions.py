"""Issue 24 (in progress): every condition through the classifier with oracle points. The sample table reads each
condition on its own series (foramina on Sagittal T1, one lateral slice per side; subarticular on Axial T2), the
model has one embedding row per condition and level, the out-of-fold frame is scored with the official metric's
four terms, and each side condition is learned from its own side (a control with left and right exchanged in
train.csv is not)."""

import math

import pandas as pd
import pydicom
import pytest
import torch
from make_demo_studies import make_study_set
from notebook_cells import notebook_namespace

CPU = torch.device("cpu")
SIDES = ["left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing", "left_subarticular_stenosis",
         "right_subarticular_stenosis"]
COLS = ["normal_mild", "moderate", "severe"]


def test_every_condition_is_read_on_its_own_series_and_side(nb, study_set):
    """Five conditions: 25 embedding rows; each row's file is of its condition's series type; a left foramen's
    slice lies on the patient's left of the canal's (+x in LPS), a right one's on the right, for every level."""
    config = {**nb["CONFIG"], "conditions": list(nb["CONDITION_SERIES"])}
    samples, skipped = nb["build_sample_table"](config)
    series = pd.read_csv(study_set / "train_series_descriptions.csv").set_index("series_id")["series_description"]
    for condition, rows in samples.groupby("condition"):
        assert (series.loc[rows["series_id"]] == nb["CONDITION_SERIES"][condition]).all(), condition
        first = list(config["conditions"]).index(condition) * 5
        assert sorted(set(rows["target_idx"])) == list(range(first, first + 5))
    assert set(skipped["condition"]) <= set(config["conditions"])

    def patient_x(row):
        return float(pydicom.dcmread(row["path"], stop_before_pixels=True).ImagePositionPatient[0])

    key = samples.set_index(["study_id", "condition", "level"])
    checked = 0
    for (study, level), _ in samples.groupby(["study_id", "level"]):
        try:
            canal, left, right = (key.loc[(study, c, level)] for c in (
                "spinal_canal_stenosis", "left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"))
        except KeyError:  # a level without one of the three labels
            continue
        assert patient_x(left) > patient_x(canal) + 5 > patient_x(right) + 10, (study, level)
        checked += 1
    assert checked >= 40


def test_the_four_terms_of_the_official_metric_by_hand(nb):
    """One study, every condition at L4/L5 and the spinal canal at L1/L2 too: the foraminal and subarticular terms
    pool left and right, any_severe_spinal takes the study's largest spinal P(severe)."""
    rows = [("spinal_canal_stenosis", "l1_l2", 0, [0.7, 0.2, 0.1]),
            ("spinal_canal_stenosis", "l4_l5", 2, [0.2, 0.3, 0.5]),
            ("left_neural_foraminal_narrowing", "l4_l5", 1, [0.3, 0.6, 0.1]),
            ("right_neural_foraminal_narrowing", "l4_l5", 0, [0.8, 0.1, 0.1]),
            ("left_subarticular_stenosis", "l4_l5", 2, [0.5, 0.25, 0.25]),
            ("right_subarticular_stenosis", "l4_l5", 1, [0.4, 0.4, 0.2])]
    oof = pd.DataFrame([(7, c, lv, y, *p) for c, lv, y, p in rows],
                       columns=["study_id", "condition", "level", "label"] + nb["P_COLUMNS"])
    terms = nb["competition_terms"](*nb["kaggle_frames"](oof))
    assert set(terms) == {"spinal", "foraminal", "subarticular", "any_severe_spinal"}
    assert terms["spinal"] == pytest.approx(-(1 * math.log(0.7) + 4 * math.log(0.5)) / 5)
    assert terms["foraminal"] == pytest.approx(-(2 * math.log(0.6) + 1 * math.log(0.8)) / 3)
    assert terms["subarticular"] == pytest.approx(-(4 * math.log(0.25) + 2 * math.log(0.4)) / 6)
    assert terms["any_severe_spinal"] == pytest.approx(-math.log(0.5))  # severe, max P(severe) 0.5, weight 4
    table = nb["per_condition"](oof)
    assert list(table.index) == [c for c, *_ in rows[1:]] and table.loc["spinal_canal_stenosis", "rows"] == 2
    assert "the mean of any_severe_spinal, foraminal, spinal, subarticular, 4 of the leaderboard's 4 terms" in \
        nb["score_caveat"](oof.assign(fold=0), nb["CONFIG"])


def exchange_sides(root):
    """train.csv with every left label and its right twin exchanged (the images and coordinates unchanged)."""
    labels = pd.read_csv(root / "train.csv")
    for left in [c for c in labels.columns if c.startswith("left_")]:
        right = "right_" + left[len("left_"):]
        labels[[left, right]] = labels[[right, left]].to_numpy()
    labels.to_csv(root / "train.csv", index=False)


def side_fold(root, out, nb):
    """Fold 0 of 4 of the four side conditions at the demo preset's sizes: per-condition balanced accuracy of the
    final (SWA) model on its validation rows."""
    preset = {k: v for k, v in nb["DEMO_PRESET"].items() if k != "output_dir"}
    ns = notebook_namespace({**preset, "data_root": str(root), "output_dir": str(out), "num_workers": 2,
                             "conditions": SIDES})
    config = ns["CONFIG"]
    samples, _ = ns["build_sample_table"](config)
    cached = ns["build_cache"](ns["assign_folds"](samples, config), config, 2)[:3]
    result = ns["train_fold"](0, *cached, config, CPU)
    kind = ns["final_kind"](result, config)
    oof = ns["oof_frame"]([result], lambda r: kind)
    pooled = oof.assign(condition=oof["condition"].str.replace("^(left|right)_", "both_", regex=True))
    return pd.concat([ns["per_condition"](frame)["BA"].astype(float) for frame in (oof, pooled)])


@pytest.fixture(scope="module")
def side_runs(nb, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sides")
    make_study_set(tmp / "real", n_studies=48, seed=7)
    make_study_set(tmp / "exchanged", n_studies=48, seed=7)
    exchange_sides(tmp / "exchanged")
    return side_fold(tmp / "real", tmp / "run_real", nb), side_fold(tmp / "exchanged", tmp / "run_exchanged", nb)


def test_each_side_condition_is_learned_from_its_own_side(side_runs):
    """Balanced accuracy of the SWA model on fold 0's validation rows (48 studies, the demo preset's sizes), per side
    and with left and right pooled ('both_'). Each side condition is learned from its own side; the control, every
    left and right label exchanged in train.csv only, stays near chance (1/3) for the foramina, whose other side lies
    on another slice. The axial crop of one subarticular recess (60 mm) also holds the other side's, ~20 mm off its
    centre, so the subarticular control can learn some of the exchanged label from there: it is held below the real
    model per side and pooled, not below 0.45. Measured (2026-12-03, torch 2.14.1, `python -m pytest -s
    tests/test_conditions.py -k learned`): foramina 0.97 / 0.97, subarticular 0.75 / 0.81 (pooled 0.79); exchanged
    0.28 / 0.37 / 0.56 / 0.36 (pooled subarticular 0.45). Before the recesses grew (3.0 x 2.5 mm open, axes linear
    in the open fraction): subarticular 0.43 / 0.48 (pooled 0.43), exchanged 0.32 / 0.31."""
    real, exchanged = side_runs
    print(pd.DataFrame({"real": real, "left/right exchanged": exchanged}).round(3).to_string())
    fora, sub = SIDES[:2], SIDES[2:]
    assert (real[fora] >= 0.70).all(), real
    assert (exchanged[fora] < 0.45).all(), exchanged
    assert (real - exchanged)[fora].min() >= 0.25
    assert (real[sub] >= 0.60).all(), real
    assert (real - exchanged)[sub].min() >= 0.10, (real - exchanged)[sub]
    both = "both_subarticular_stenosis"
    assert real[both] >= 0.65 and real[both] - exchanged[both] >= 0.20, (real[both], exchanged[both])
