"""Issue 28's pieces, each against a hand-made answer: the submission's choice per condition (raw, prior-corrected,
priors, a temperature; the spinal canal's loss with any_severe_spinal), the axial sides, the priors' spellings, the
mirror of a side trained alone, and the settings and warnings that no longer fall back in silence."""

import numpy as np
import pandas as pd
import pytest
from make_demo_studies import LEVELS

PRIOR = [0.8, 0.15, 0.05]


def oof_rows(nb, condition, labels, probs, studies=None):
    """Out-of-fold rows as localisation_cost makes them: a study per five levels, raw and corrected columns, the
    fold's training priors, no row on priors."""
    n = len(labels)
    frame = pd.DataFrame({"study_id": studies if studies is not None else np.arange(n) // 5 + 100,
                          "condition": condition, "level": [LEVELS[i % 5] for i in range(n)], "label": labels,
                          "fold": 0, "on_priors": False})
    frame[nb["P_COLUMNS"]] = probs
    frame[nb["PC_COLUMNS"]] = nb["prior_corrected"](probs, [1.0, 2.0, 4.0])
    frame[nb["PRIOR_COLUMNS"]] = np.tile(PRIOR, (n, 1))
    return frame


def test_the_priors_are_chosen_where_the_model_is_worse_and_reported(nb):
    rng = np.random.default_rng(0)
    labels = rng.choice(3, 60, p=PRIOR)
    wrong = np.full((60, 3), 0.02)
    wrong[np.arange(60), (labels + 1) % 3] = 0.96  # confidently the wrong class, every row
    right = np.full((60, 3), 0.05)
    right[np.arange(60), labels] = 0.9
    frame = pd.concat([oof_rows(nb, "left_neural_foraminal_narrowing", labels, wrong),
                       oof_rows(nb, "right_neural_foraminal_narrowing", labels, right)], ignore_index=True)
    choice = nb["choose_probabilities"](frame)
    left, right_ = choice["left_neural_foraminal_narrowing"], choice["right_neural_foraminal_narrowing"]
    # the priors' loss by hand: weighted log loss of the re-weighted priors, weights 1/2/4 by label
    weights = np.array([1.0, 2.0, 4.0])[labels]
    constant = np.array(PRIOR) * [1, 2, 4] / (np.array(PRIOR) @ [1, 2, 4])
    assert left["priors"] == pytest.approx(-(weights * np.log(constant[labels])).sum() / weights.sum())
    assert left["candidate"] == "priors" and left["chosen"] == "priors" and left["temperature"] == 1.0
    assert left["priors"] < min(left[k] for k in ("raw", "corrected", "raw T", "corrected T"))
    assert right_["chosen"] in ("raw", "corrected") and right_[right_["candidate"]] < right_["priors"]
    table = nb["choice_table"](choice)
    assert table.loc["left_neural_foraminal_narrowing", "submitted"] == "priors"
    # submitted: the priors on every row of that condition, the model's rows included
    sample = pd.DataFrame({"row_id": [f"100_{c}_{lv}" for c in ("left_neural_foraminal_narrowing",
                                                                 "right_neural_foraminal_narrowing") for lv in LEVELS]})
    priors = {r.split("_", 1)[1]: PRIOR for r in sample["row_id"]}
    rows = frame[frame["study_id"] == 100]
    submission, from_model = nb["build_submission"](sample, rows, priors, choice)
    got = submission.set_index("row_id")[["normal_mild", "moderate", "severe"]]
    np.testing.assert_allclose(got.loc["100_left_neural_foraminal_narrowing_l1_l2"], constant)
    assert from_model == {"right_neural_foraminal_narrowing": 5}


def test_a_fitted_temperature_is_applied_as_fitted(nb):
    """Over-confident but right more often than not: softening (T > 1) lowers the loss; build_submission applies the
    same T to the model's rows. A timid model is not sharpened (T stays 1: TEMPERATURE_RANGE)."""
    rng = np.random.default_rng(1)
    labels = rng.choice(3, 200, p=[0.6, 0.25, 0.15])
    guess = np.where(rng.random(200) < 0.6, labels, rng.choice(3, 200))
    probs = np.full((200, 3), 0.005)
    probs[np.arange(200), guess] = 0.99
    choice = nb["choose_probabilities"](oof_rows(nb, "left_subarticular_stenosis", labels, probs))
    c = choice["left_subarticular_stenosis"]
    assert c["temperatures"]["raw"] > 1.5 and c["raw T"] < c["raw"]
    timid = np.full((200, 3), 0.3)
    timid[np.arange(200), labels] = 0.4  # right every time, but timid: sharpening would pay here, and is not taken
    timid_choice = nb["choose_probabilities"](oof_rows(nb, "left_subarticular_stenosis", labels, timid))
    assert timid_choice["left_subarticular_stenosis"]["temperatures"]["raw"] == pytest.approx(1.0, abs=0.01)
    softened = nb["with_temperature"](probs[:1], 2.0)
    np.testing.assert_allclose(softened, np.sqrt(probs[:1]) / np.sqrt(probs[:1]).sum())
    sample = pd.DataFrame({"row_id": [f"100_left_subarticular_stenosis_{lv}" for lv in LEVELS]})
    rows = oof_rows(nb, "left_subarticular_stenosis", labels[:5], probs[:5])
    pick = {"left_subarticular_stenosis": {"chosen": "raw", "temperature": 2.0}}
    submission, _ = nb["build_submission"](sample, rows, {r.split("_", 1)[1]: PRIOR for r in sample["row_id"]}, pick)
    np.testing.assert_allclose(submission[["normal_mild", "moderate", "severe"]].to_numpy(),
                               nb["with_temperature"](probs[:5], 2.0))


def test_the_spinal_canals_choice_counts_any_severe_spinal(nb):
    """condition_loss of the spinal canal = its weighted log loss + any_severe_spinal, both by hand."""
    labels = np.array([0, 0, 2, 1, 0, 0, 0, 0, 1, 0])  # study 100 has a Severe level, study 101 none
    probs = np.array([[0.7, 0.2, 0.1]] * 10)
    probs[2] = [0.2, 0.3, 0.5]
    rows = oof_rows(nb, "spinal_canal_stenosis", labels, probs)
    weights = np.array([1.0, 2.0, 4.0])[labels]
    spinal = -(weights * np.log(probs[np.arange(10), labels])).sum() / weights.sum()
    p_any = np.array([0.5, 0.1])  # each study's highest P(severe)
    y_any = np.array([1, 0])
    w_any = np.array([4.0, 2.0])  # the metric: the study's highest row weight
    severe = -(w_any * np.log(np.where(y_any == 1, p_any, 1 - p_any))).sum() / w_any.sum()
    assert nb["condition_loss"](rows, probs) == pytest.approx(spinal + severe)


def test_axial_points_stay_on_their_own_side_of_the_canal(nb):
    """A localiser that puts both maps on the patient's right: with the canal's point, the left map may only take
    the columns left of the canal (grid columns run toward the patient's left), the right one those right of it."""
    class RightOnly(nb["nn"].Module):
        def forward(self, x):
            out = np.full((len(x), 2, x.shape[-2], x.shape[-1]), -10.0, np.float32)
            out[:, :, 32, 10] = 10.0  # a strong peak at column 10: the patient's right of a canal at column 32
            out[:, 0, 32, 50] = 0.0  # a weak one for the left map at column 50
            return nb["torch"].from_numpy(out)

    size = 64
    volume = {"image": np.full((5, size, size), 100, np.uint8), "valid": np.array([False, False, True, False, False]),
              "instance": np.array([-1, -1, 7, -1, -1]), "to_grid": np.tile([1.0, 0.0, 1.0, 0.0], (5, 1)),
              "image_shape": np.tile([size, size], (5, 1)), "spacing": np.ones((5, 2)),
              "centre_mm": np.zeros((5, 3)), "series_dir": "/nowhere", "issues": []}
    ds = nb["SimpleNamespace"](ImageOrientationPatient=[1, 0, 0, 0, 1, 0], ImagePositionPatient=[-32, -32, 0],
                               PixelSpacing=[1, 1], filename="7.dcm")
    conds = ["left_subarticular_stenosis", "right_subarticular_stenosis"]
    canal = np.full((5, 3), np.nan)
    canal[2] = [0.0, 0.0, 0.0]  # LPS (0, 0): column 32
    cpu = nb["torch"].device("cpu")
    config = {**nb["CONFIG"], "loc_size": size}
    free = nb["localise_levels"]([RightOnly()], volume, cpu, config, conds)
    assert free[2, 1] == pytest.approx(10, abs=0.5) and free[7, 1] == pytest.approx(10, abs=0.5)
    real = nb["series_headers"]
    nb["series_headers"] = lambda series_dir, cache: {7: ds}
    try:
        sided = nb["localise_levels"]([RightOnly()], volume, cpu, config, conds, canal)
    finally:
        nb["series_headers"] = real
    assert sided[2, 1] == pytest.approx(50, abs=0.5)  # left: only left of the canal
    assert sided[7, 1] == pytest.approx(10, abs=0.5)  # right: its peak is already right of it
    assert np.isnan(sided[[0, 1, 3, 4, 5, 6, 8, 9], 0]).all()  # levels without a slice


def test_label_priors_count_label_spellings_as_the_sample_table_does(nb, tmp_path):
    pd.DataFrame({"study_id": [1, 2, 3, 4], "spinal_canal_stenosis_l1_l2": ["Normal/Mild", "normal / mild", "Severe",
                                                                           None]}).to_csv(tmp_path / "train.csv",
                                                                                          index=False)
    priors = nb["label_priors"](tmp_path)
    np.testing.assert_allclose(priors["spinal_canal_stenosis_l1_l2"], np.array([2 + 1, 0 + 1, 1 + 1]) / 6)
    without = nb["label_priors"](tmp_path, exclude={1, 3})  # a fold's validation studies left out
    np.testing.assert_allclose(without["spinal_canal_stenosis_l1_l2"], np.array([1 + 1, 1, 1]) / 4)


def test_a_side_trained_alone_is_never_mirrored_and_settings_without_silent_fallbacks(nb, tmp_path):
    assert nb["mirror_maps"](["left_neural_foraminal_narrowing"]) is False
    pair = nb["mirror_maps"](["left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"])
    assert list(pair) == [5, 6, 7, 8, 9, 0, 1, 2, 3, 4]
    nb["check_settings"]({**nb["CONFIG"], "crop_mm_by_series": None})  # None: crop_mm for every series type
    for name in ("test_series_descriptions.csv", "sample_submission.csv"):
        (tmp_path / name).write_text("")
    (tmp_path / "test_images").mkdir()
    nb["WARNINGS"].clear()
    config = {**nb["CONFIG"], "data_root": str(tmp_path), "localiser": "auto",
              "conditions": ["left_neural_foraminal_narrowing"]}
    assert nb["localiser_wanted"](config) is False and nb["localiser_wanted"](config) is False
    assert len(nb["WARNINGS"]) == 1 and "spinal_canal_stenosis is not trained" in nb["WARNINGS"][0]
