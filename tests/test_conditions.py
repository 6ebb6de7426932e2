"""Issue 24: every condition through the classifier with oracle points. The sample table reads each
condition on its own series (foramina on Sagittal T1, one lateral slice per side; subarticular on Axial T2), the
model has one embedding row per condition and level, the out-of-fold frame is scored with the official metric's
four terms, and each side condition is learned from its own side (a control with left and right exchanged in
train.csv is not)."""

import math
from pathlib import Path

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


def test_each_series_type_is_cropped_at_its_own_field_of_view(nb):
    """crop_mm_by_series: an Axial T2 sample's anchor slice is cropped at 30 mm (one subarticular recess, not the
    other side's ~20 mm across the canal), a Sagittal T1 one at crop_mm 60; both at the same cached side. Each
    cached anchor equals crop_slice of that slice at that field of view, and differs from the other one's."""
    config = {**nb["CONFIG"], "conditions": ["left_neural_foraminal_narrowing", "left_subarticular_stenosis"]}
    assert nb["series_crop"](config, "Axial T2")["crop_mm"] == 30.0
    assert nb["series_crop"](config, "Sagittal T1")["crop_mm"] == config["crop_mm"] == 60.0
    samples, _ = nb["build_sample_table"](config)
    half = config["num_slices"] // 2
    for condition, mm, other in (("left_subarticular_stenosis", 30.0, 60.0),
                                 ("left_neural_foraminal_narrowing", 60.0, 30.0)):
        rows = samples[samples["condition"].eq(condition)].iloc[:1]
        _, stacks, masks, _ = nb["preprocess_series"]((str(Path(rows["path"].iloc[0]).parent), rows, config))
        ds = pydicom.dcmread(rows["path"].iloc[0])
        point = nb["patient_point"](ds, rows["x"].iloc[0], rows["y"].iloc[0])
        image = nb["read_slice"](rows["path"].iloc[0], config)
        assert masks[0, half] and stacks.shape[-1] == nb["crop_side"](config)
        expected = nb["crop_slice"](image, ds, point, {**config, "crop_mm": mm})
        assert (stacks[0, half] == expected).all(), condition
        assert (stacks[0, half] != nb["crop_slice"](image, ds, point, {**config, "crop_mm": other})).mean() > 0.5
    with pytest.raises(ValueError, match="crop_mm_by_series"):
        nb["check_settings"]({**config, "crop_mm_by_series": {"Axial T1": 30.0}})


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
    """Balanced accuracy of the SWA model on fold 0's validation rows (48 studies, the demo preset's sizes; about 58
    rows per side), per side and with left and right pooled ('both_'). Each side condition is learned from its own
    side; the control, every left and right label exchanged in train.csv only, stays near chance (1/3): a foramen's
    other side lies on another slice, and the Axial T2 crop (crop_mm_by_series: 30 mm) holds one subarticular recess,
    not the other side's ~20 mm across the canal. Measured (2026-12-03, torch 2.14.1, `python -m pytest -s
    tests/test_conditions.py -k learned`): foramina 0.76 / 0.68, subarticular 0.72 / 0.87 (pooled 0.71 / 0.79);
    exchanged 0.28 / 0.38 / 0.32 / 0.33 (pooled 0.33 / 0.32). The same test has given the foramina 0.89-0.97 on
    other runs (one side's balanced accuracy on ~58 rows with ~6 Severe moves by ~0.05 a row): the bounds leave
    room for that spread. The lowest seen: a CI run on 2026-12-07 (the classifier's code as on 2026-12-03) gave the
    left foramen 0.59 and the foramina pooled 0.65, so the bounds are 0.55 per side and 0.62 pooled, well above the
    control's chance level. With the subarticular crop at 60 mm the other recess was in view and its control learned
    the exchanged label (0.56 / 0.36, once 0.74 on the left)."""
    real, exchanged = side_runs
    print(pd.DataFrame({"real": real, "left/right exchanged": exchanged}).round(3).to_string())
    assert (real[SIDES] >= 0.55).all(), real
    assert (exchanged[SIDES] < 0.45).all(), exchanged
    assert (real - exchanged)[SIDES].min() >= 0.20, real - exchanged
    both = ["both_neural_foraminal_narrowing", "both_subarticular_stenosis"]
    assert (real[both] >= 0.62).all() and ((real - exchanged)[both] >= 0.25).all(), (real[both], exchanged[both])
