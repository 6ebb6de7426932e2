"""Task 4.1 metrics, the official competition score, and the training helpers that read metrics
(dead-class warnings, save gate, the plan's checkpoints and class-weight actions, success criteria, report
tables): the notebook's own definitions on small cases whose answers are computed by hand here."""

import math

import numpy as np
import pandas as pd
import pytest

# ---------------------------------------------------------------- classification metrics

LABELS = [0, 0, 0, 1, 1, 2, 2, 2]
PREDS = [0, 0, 1, 1, 0, 2, 2, 0]


def probs_for(preds):
    """Probabilities whose argmax is `preds` (rows deliberately unnormalised-looking but valid)."""
    probs = np.full((len(preds), 3), 0.1)
    probs[np.arange(len(preds)), preds] = 0.8
    return probs


def test_classification_metrics_by_hand(nb):
    m = nb["classification_metrics"](np.array(LABELS), probs_for(PREDS))
    # true 0: predicted 0,0,1 | true 1: 1,0 | true 2: 2,2,0
    assert m["confusion"] == [[2, 1, 0], [1, 1, 0], [1, 0, 2]]
    assert m["recall"] == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    assert m["ba"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)  # 11/18
    assert m["pred_counts"] == [4, 2, 2]


def test_classification_metrics_with_a_never_predicted_class(nb):
    m = nb["classification_metrics"](np.array(LABELS), probs_for([0, 0, 0, 0, 0, 2, 0, 0]))
    assert m["pred_counts"] == [7, 0, 1]
    assert m["recall"] == pytest.approx([1.0, 0.0, 1 / 3])
    assert m["ba"] == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert m["confusion"] == [[3, 0, 0], [2, 0, 0], [2, 0, 1]]


# ---------------------------------------------------------------- the official competition metric

COLS = ["normal_mild", "moderate", "severe"]
# (study, condition, level, true class or None = unlabelled, submitted raw scores: not normalised on purpose)
ROWS = [
    (101, "spinal_canal_stenosis", "l1_l2", 0, [0.8, 0.15, 0.05]),
    (101, "spinal_canal_stenosis", "l2_l3", 0, [0.7, 0.2, 0.1]),
    (101, "spinal_canal_stenosis", "l3_l4", 1, [0.3, 0.5, 0.2]),
    (101, "spinal_canal_stenosis", "l4_l5", 2, [2.0, 3.0, 5.0]),
    (101, "spinal_canal_stenosis", "l5_s1", 0, [0.9, 0.05, 0.05]),
    (202, "spinal_canal_stenosis", "l1_l2", 0, [0.6, 0.3, 0.1]),
    (202, "spinal_canal_stenosis", "l2_l3", 1, [0.4, 0.4, 0.2]),
    (202, "spinal_canal_stenosis", "l3_l4", 0, [1.0, 1.0, 1.0]),
    (202, "spinal_canal_stenosis", "l4_l5", 0, [0.9, 0.08, 0.02]),
    (202, "spinal_canal_stenosis", "l5_s1", None, [1.0, 1.0, 18.0]),  # unlabelled: must not count anywhere
    (101, "left_neural_foraminal_narrowing", "l4_l5", 1, [0.5, 0.4, 0.1]),
    (202, "right_neural_foraminal_narrowing", "l5_s1", 0, [0.85, 0.1, 0.05]),
    (101, "right_subarticular_stenosis", "l4_l5", 2, [0.2, 0.3, 0.5]),
    (202, "left_subarticular_stenosis", "l3_l4", 0, [3.0, 1.0, 0.0]),
]
WEIGHT = {0: 1.0, 1: 2.0, 2: 4.0}


def kaggle_case():
    solution = pd.DataFrame({
        "row_id": [f"{s}_{c}_{lv}" for s, c, lv, _, _ in ROWS],
        **{col: [float(y == k) if y is not None else 0.0 for _, _, _, y, _ in ROWS] for k, col in enumerate(COLS)},
        "sample_weight": [WEIGHT[y] if y is not None else 1.0 for _, _, _, y, _ in ROWS],
    })
    submission = pd.DataFrame({"row_id": solution["row_id"],
                               **{col: [r[4][k] for r in ROWS] for k, col in enumerate(COLS)}})
    return solution, submission


def expected_terms():
    """The metric by hand: per-group weighted log loss and any_severe_spinal, then their mean."""
    def weighted_log_loss(rows):
        num = den = 0.0
        for _, _, _, y, raw in rows:
            p = np.array(raw) / np.sum(raw)
            num += WEIGHT[y] * -math.log(p[y])
            den += WEIGHT[y]
        return num / den

    labelled = [r for r in ROWS if r[3] is not None]
    terms = {
        "spinal": weighted_log_loss([r for r in labelled if r[1] == "spinal_canal_stenosis"]),
        "foraminal": weighted_log_loss([r for r in labelled if "foraminal" in r[1]]),
        "subarticular": weighted_log_loss([r for r in labelled if "subarticular" in r[1]]),
    }
    num = den = 0.0
    for study in (101, 202):
        rows = [r for r in labelled if r[0] == study and r[1] == "spinal_canal_stenosis"]
        severe = any(r[3] == 2 for r in rows)
        p = max(r[4][2] / sum(r[4]) for r in rows)
        w = max(WEIGHT[r[3]] for r in rows)
        num += w * -math.log(p if severe else 1 - p)
        den += w
    terms["any_severe_spinal"] = num / den
    return terms


def test_expected_terms_are_what_the_case_says():
    """Guard on the hand computation itself: study 101 has a severe level (p 0.5, weight 4), study 202
    none (max p(severe) over its labelled rows 1/3, weight 2; the unlabelled 0.9 is ignored)."""
    terms = expected_terms()
    assert terms["any_severe_spinal"] == pytest.approx(-(4 * math.log(0.5) + 2 * math.log(2 / 3)) / 6)
    assert terms["subarticular"] == pytest.approx(-(4 * math.log(0.5) + 1 * math.log(0.75)) / 5)
    assert terms["foraminal"] == pytest.approx(-(2 * math.log(0.4) + 1 * math.log(0.85)) / 3)


def test_competition_terms_and_score_by_hand(nb):
    solution, submission = kaggle_case()
    terms = nb["competition_terms"](solution, submission)
    expected = expected_terms()
    assert set(terms) == set(expected)
    for key in expected:
        assert terms[key] == pytest.approx(expected[key], abs=1e-9), key
    score = nb["competition_score"](solution, submission)
    assert score == pytest.approx(np.mean(list(expected.values())), abs=1e-9)


def test_competition_score_ignores_row_order_and_row_scale(nb):
    solution, submission = kaggle_case()
    reference = nb["competition_score"](solution, submission)
    rng = np.random.default_rng(0)
    shuffled = submission.sample(frac=1, random_state=1).reset_index(drop=True)
    shuffled[COLS] = shuffled[COLS].to_numpy() * rng.uniform(0.1, 10, size=(len(shuffled), 1))
    assert nb["competition_score"](solution, shuffled) == pytest.approx(reference, abs=1e-9)
    reordered_solution = solution.iloc[::-1].reset_index(drop=True)
    assert nb["competition_score"](reordered_solution, shuffled) == pytest.approx(reference, abs=1e-9)


def test_unlabelled_row_prediction_does_not_matter(nb):
    solution, submission = kaggle_case()
    reference = nb["competition_score"](solution, submission)
    unlabelled = submission["row_id"] == "202_spinal_canal_stenosis_l5_s1"
    submission.loc[unlabelled, COLS] = [1.0, 0.0, 0.0]
    assert nb["competition_score"](solution, submission) == pytest.approx(reference, abs=1e-12)


def test_submission_missing_a_row_is_a_value_error(nb):
    solution, submission = kaggle_case()
    with pytest.raises(ValueError, match="lacks 1 row_id"):
        nb["competition_score"](solution, submission.drop(index=3))


def test_kaggle_frames(nb):
    oof = pd.DataFrame({"study_id": [7, 7, 8], "level": ["l1_l2", "l4_l5", "l5_s1"], "label": [0, 2, 1],
                        "p_normal_mild": [0.7, 0.2, 0.3], "p_moderate": [0.2, 0.3, 0.6],
                        "p_severe": [0.1, 0.5, 0.1], "fold": 0, "condition": "spinal_canal_stenosis"})
    solution, submission = nb["kaggle_frames"](oof)
    row_ids = ["7_spinal_canal_stenosis_l1_l2", "7_spinal_canal_stenosis_l4_l5", "8_spinal_canal_stenosis_l5_s1"]
    assert solution["row_id"].tolist() == row_ids
    assert submission["row_id"].tolist() == row_ids
    assert solution[COLS].to_numpy().tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    assert solution["sample_weight"].tolist() == [1.0, 4.0, 2.0]
    assert submission[COLS].to_numpy().tolist() == [[0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.3, 0.6, 0.1]]
    terms = nb["competition_terms"](solution, submission)
    assert set(terms) == {"spinal", "any_severe_spinal"}
    spinal = -(1 * math.log(0.7) + 4 * math.log(0.5) + 2 * math.log(0.6)) / 7
    any_severe = -(4 * math.log(0.5) + 2 * math.log(0.9)) / 6  # study 7: severe, max p 0.5; study 8: none, 0.1
    assert terms["spinal"] == pytest.approx(spinal, abs=1e-9)
    assert terms["any_severe_spinal"] == pytest.approx(any_severe, abs=1e-9)


# ---------------------------------------------------------------- post-training analysis


def test_confused_pairs(nb):
    confusion = [[50, 8, 2], [10, 5, 1], [3, 4, 7]]
    table = nb["confused_pairs"](confusion)
    assert list(table.columns) == ["true", "predicted", "count", "share of true class"]
    assert list(zip(table["true"], table["predicted"], table["count"])) == [
        ("Moderate", "Normal/Mild", 10), ("Normal/Mild", "Moderate", 8), ("Severe", "Moderate", 4),
        ("Severe", "Normal/Mild", 3), ("Normal/Mild", "Severe", 2), ("Moderate", "Severe", 1)]
    assert table["share of true class"].tolist() == pytest.approx(
        [10 / 16, 8 / 60, 4 / 14, 3 / 14, 2 / 60, 1 / 16], abs=1e-3)  # shown to 3 decimals


def test_attention_analysis(nb):
    n = 7
    weights = np.array([
        [0.00, 0.10, 0.20, 0.40, 0.20, 0.10, 0.00],  # both edges padded (weight 0)
        [0.10, 0.12, 0.15, 0.26, 0.15, 0.12, 0.10],
        [0.05, 0.10, 0.15, 0.30, 0.20, 0.15, 0.05],
        [0.02, 0.08, 0.10, 0.50, 0.20, 0.08, 0.02],
    ])
    oof = pd.DataFrame(weights, columns=[f"attn_{j}" for j in range(n)]).assign(label=[0, 0, 1, 2])
    a = nb["attention_analysis"](oof)
    assert a["profile"].index.tolist() == ["Normal/Mild", "Moderate", "Severe"]
    np.testing.assert_allclose(a["profile"].loc["Normal/Mild"].to_numpy(), (weights[0] + weights[1]) / 2)
    np.testing.assert_allclose(a["profile"].loc["Severe"].to_numpy(), weights[3])
    assert a["centre_mean"] == pytest.approx((0.40 + 0.26 + 0.30 + 0.50) / 4)
    nonzero_edges = [0.10, 0.10, 0.05, 0.05, 0.02, 0.02]  # the padded zeros are left out
    assert a["edge_mean"] == pytest.approx(np.mean(nonzero_edges))
    assert a["uniform"] == pytest.approx(1 / 7)
    assert a["edge_vs_uniform"] == pytest.approx(np.mean(nonzero_edges) * 7)
    # Spearman = Pearson of ranks: labels [0,0,1,2] -> ranks [1.5,1.5,3,4]; centre [.4,.26,.3,.5] -> [3,1,2,4]
    x, y = np.array([1.5, 1.5, 3, 4]), np.array([3, 1, 2, 4])
    rho = ((x - x.mean()) * (y - y.mean())).sum() / math.sqrt(((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum())
    assert a["spearman_label_vs_centre_weight"] == pytest.approx(rho)
    assert a["argmax_slice_by_class"].to_dict() == {"Moderate": 0, "Severe": 0, "Normal/Mild": 0}
    # issue 13.8: the ratio per class, so that a pooled ratio > 1 cannot hide a class with centre < edge
    assert a["centre_over_edge_by_class"] == pytest.approx(
        {"Normal/Mild": 0.33 / 0.10, "Moderate": 0.30 / 0.05, "Severe": 0.50 / 0.02})


# ---------------------------------------------------------------- training helpers


def test_dead_class_warnings(nb):
    warnings = nb["dead_class_warnings"]([100, 2, 5])
    assert len(warnings) == 2
    assert "Moderate" in warnings[0] and "DEAD" in warnings[0]
    assert "Severe" in warnings[1] and "marginal" in warnings[1] and "DEAD" not in warnings[1]
    assert nb["dead_class_warnings"]([100, 50, 10]) == []
    # the edges: < 3 is dead, 3..9 marginal
    assert ["DEAD" in w for w in nb["dead_class_warnings"]([0, 3, 9])] == [True, False, False]


GATE = {"min_minority_recall": 0.20}


def test_save_gate_refuses_a_dead_minority_class_even_when_ba_improved(nb):
    save, why = nb["save_gate"]({"ba": 0.70, "recall": [0.9, 0.6, 0.0]}, 0.50, GATE)
    assert save is False and "minority recall" in why


def test_save_gate_refuses_when_ba_did_not_improve(nb):
    assert nb["save_gate"]({"ba": 0.60, "recall": [0.8, 0.5, 0.5]}, 0.65, GATE)[0] is False
    assert nb["save_gate"]({"ba": 0.60, "recall": [0.8, 0.5, 0.5]}, 0.60, GATE)[0] is False  # equal is no gain


def test_save_gate_accepts_when_both_hold(nb):
    save, why = nb["save_gate"]({"ba": 0.61, "recall": [0.8, 0.2, 0.45]}, 0.60, GATE)  # minority == floor
    assert save is True and "saved" in why
    assert nb["save_gate"]({"ba": 0.30, "recall": [0.5, 0.3, 0.3]}, -1.0, GATE)[0] is True  # first validation


def rows_by_quantity(rows):
    return {r["quantity"]: r for r in rows}


def test_checkpoint_epoch_1(nb):
    good = rows_by_quantity(nb["checkpoint_rows"](1, {"pred_counts": [80, 10, 10], "recall": [0.80, 0.30, 0.35],
                                                      "ba": 0.52}, 0.55))
    assert list(good) == ["classes predicted", "recall Normal/Mild", "recall Moderate", "recall Severe",
                          "balanced accuracy"]
    assert all(r["status"] == "PASS" and r["action"] == "" for r in good.values())
    assert good["recall Moderate"]["expected"] == "0.25-0.4" and good["classes predicted"]["expected"] == "3"
    assert good["classes predicted"]["measured"] == 3
    bad = rows_by_quantity(nb["checkpoint_rows"](1, {"pred_counts": [10, 0, 5], "recall": [0.9, 0.0, 0.3],
                                                     "ba": 0.40}, 0.5))
    assert bad["classes predicted"]["status"] == "WARN" and bad["classes predicted"]["measured"] == 2
    assert "2x" in bad["classes predicted"]["action"]
    assert bad["recall Moderate"]["status"] == "WARN"
    assert bad["balanced accuracy"]["status"] == "WARN" and "45 %" in bad["balanced accuracy"]["action"]


def test_checkpoint_epoch_3(nb):
    rows = rows_by_quantity(nb["checkpoint_rows"](3, {"pred_counts": [50, 20, 20], "recall": [0.9, 0.3, 0.55],
                                                      "ba": 0.66}, 0.7))
    assert list(rows) == ["recall Moderate", "recall Severe", "balanced accuracy"]
    moderate = rows["recall Moderate"]
    assert (moderate["status"], moderate["measured"], moderate["expected"]) == ("WARN", 0.3, "0.45-0.6")
    assert "Moderate" in moderate["action"] and "4.0 -> 5.0" in moderate["action"]
    assert rows["recall Severe"]["status"] == "PASS" and rows["recall Severe"]["action"] == ""
    assert rows["balanced accuracy"]["status"] == "PASS"


def test_checkpoint_epoch_10(nb):
    rows = rows_by_quantity(nb["checkpoint_rows"](10, {"pred_counts": [50, 20, 20], "recall": [0.9, 0.62, 0.7],
                                                       "ba": 0.74}, 0.85))
    assert list(rows) == ["balanced accuracy", "min class recall", "train - val BA gap"]
    assert rows["balanced accuracy"]["status"] == "PASS" and rows["min class recall"]["status"] == "PASS"
    gap = rows["train - val BA gap"]
    assert (gap["status"], gap["measured"], gap["expected"]) == ("WARN", 0.11, "<= 0.05")
    assert "dropout to 0.4" in gap["action"]
    plateau = rows_by_quantity(nb["checkpoint_rows"](10, {"pred_counts": [50, 20, 20], "recall": [0.8, 0.55, 0.7],
                                                          "ba": 0.70}, 0.72))
    assert plateau["balanced accuracy"]["status"] == "WARN" and "epoch 30" in plateau["balanced accuracy"]["action"]
    assert plateau["min class recall"]["status"] == "WARN"
    assert plateau["train - val BA gap"]["status"] == "PASS"


def test_no_checkpoint_rows_between_the_plans_epochs(nb):
    metrics = {"pred_counts": [50, 20, 20], "recall": [0.9, 0.6, 0.6], "ba": 0.7}
    assert [nb["checkpoint_rows"](e, metrics, 0.7) for e in (2, 4, 9, 11, 25)] == [[]] * 5


def test_plan_weight_actions_epoch_1_doubles_a_never_predicted_class(nb):
    weights = [1.0, 4.0, 6.0]
    new, done = nb["plan_weight_actions"](1, {"pred_counts": [10, 0, 5], "recall": [1.0, 0.0, 0.5]}, weights)
    assert new == [1.0, 8.0, 6.0]
    assert len(done) == 1 and "Moderate" in done[0]
    assert weights == [1.0, 4.0, 6.0]  # the caller's list is not changed


def test_plan_weight_actions_epoch_3(nb):
    new, done = nb["plan_weight_actions"](3, {"pred_counts": [50, 5, 5], "recall": [0.9, 0.3, 0.3]}, [1.0, 4.0, 6.0])
    assert new == [1.0, 5.0, 8.0]  # exactly
    assert len(done) == 2
    unchanged = [nb["plan_weight_actions"](3, {"pred_counts": [50, 9, 9], "recall": recall}, [1.0, 4.0, 6.0])
                 for recall in ([0.9, 0.40, 0.45], [0.9, 0.6, 0.6])]  # at the floors: no action
    assert unchanged == [([1.0, 4.0, 6.0], [])] * 2
    assert nb["plan_weight_actions"](10, {"pred_counts": [50, 0, 0], "recall": [1, 0, 0]}, [1.0, 4.0, 6.0]) == (
        [1.0, 4.0, 6.0], [])


# ---------------------------------------------------------------- results report


ATTN = {"centre_mean": 0.2, "edge_mean": 0.1, "pooling": "attention"}


def history(recalls_at_epoch_3):
    rows = [{"epoch": 1, "val_ba": 0.5, "recall_0": 0.8, "recall_1": 0.3, "recall_2": 0.3}, {"epoch": 2}]
    if recalls_at_epoch_3 is not None:
        rows.append({"epoch": 3, "val_ba": 0.66, **{f"recall_{c}": r for c, r in enumerate(recalls_at_epoch_3)}})
    return [{"fold": 0, "history": rows}]


def test_success_table(nb):
    final = {"ba": 0.75, "recall": [0.84, 0.65, 0.69]}
    table = nb["success_table"](final, history([0.9, 0.45, 0.25]), ATTN)
    status = dict(zip(table["criterion"], table["status"]))
    assert status == {
        "No dead class: all 3 classes > 20 % recall by epoch 3": "PASS",  # min 0.25
        "BA >= 74.9 % (match v4)": "PASS",
        "BA >= 75.5 %": "FAIL",
        "Moderate recall >= 65 %": "PASS",  # at the threshold
        "Severe recall >= 70 %": "FAIL",
        "BA >= 77 %": "FAIL",
        "All classes >= 75 % recall": "FAIL",
        "Attention interpretable: mean centre-slice weight / mean edge-slice weight > 1 over all validation "
        "samples (a ratio test only: no per-class or severity test, see Analysis)": "PASS",  # 2.0 > 1
    }
    assert set(table["model"]) == {"swa", "per epoch"}
    assert table["tier"].tolist() == ["Minimum"] * 2 + ["Target"] * 3 + ["Stretch"] * 3
    assert table["measured"].tolist() == pytest.approx([0.25, 0.75, 0.75, 0.65, 0.69, 0.75, 0.65, 2.0])


def test_success_table_na_without_an_epoch_3_row(nb):
    final = {"ba": 0.80, "recall": [0.8, 0.8, 0.8]}
    table = nb["success_table"](final, history(None), ATTN)
    assert table["status"].tolist() == ["N/A"] + ["PASS"] * 7
    assert math.isnan(table["measured"].iloc[0])
    not_validated = [{"fold": 0, "history": [{"epoch": 3, "train_loss": 0.9}]}]  # epoch 3 without validation
    assert nb["success_table"](final, not_validated, ATTN)["status"].iloc[0] == "N/A"
    dead = nb["success_table"](final, history([0.9, 0.2, 0.5]), ATTN)
    assert dead["status"].iloc[0] == "FAIL"  # exactly 20 % is not "> 20 %"


def test_md_table(nb):
    frame = pd.DataFrame({"tier": ["Minimum", "Target"], "value": [0.749123, 3.0], "n": [1, 2]})
    assert nb["md_table"](frame) == ("| tier | value | n |\n"
                                     "|---|---|---|\n"
                                     "| Minimum | 0.7491 | 1 |\n"
                                     "| Target | 3 | 2 |")
    named = pd.DataFrame({"w": [0.5]}, index=pd.Index(["Severe"], name="class"))
    lines = nb["md_table"](named).split("\n")
    assert lines == ["| class | w |", "|---|---|", "| Severe | 0.5 |"]


def test_success_table_says_when_the_final_model_was_selected_on_its_validation_fold(nb):
    final = {"ba": 0.80, "recall": [0.8, 0.8, 0.8]}
    table = nb["success_table"](final, history(None), ATTN, ["best"])
    assert (table.loc[table["criterion"].str.startswith("BA"), "model"]
            == "best (selected on its own validation fold: optimistic)").all()


def test_mean_pooling_has_no_attention_criterion(nb):
    final = {"ba": 0.80, "recall": [0.8, 0.8, 0.8]}
    table = nb["success_table"](final, history(None), {**ATTN, "pooling": "mean"})
    assert table["status"].iloc[-1] == "N/A"


# ---------------------------------------------------------------- prior correction (issue 13.2)


def weighted_log_loss(labels, probs):
    w = np.array([1.0, 2.0, 4.0])[labels]
    return -(w * np.log(probs[np.arange(len(labels)), labels])).sum() / w.sum()


def test_prior_correction_is_the_formula(nb):
    probs = np.array([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]])
    expected = probs * np.array([1, 2, 4]) / np.array([1, 4, 6])
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(nb["prior_corrected"](probs, [1.0, 4.0, 6.0]), expected)
    # with class weights equal to the metric's row weights nothing changes
    np.testing.assert_allclose(nb["prior_corrected"](probs, [1.0, 2.0, 4.0]), probs)


def test_prior_corrected_probabilities_lower_the_official_weighted_log_loss(nb):
    """Known answer: labels drawn from known q; a weighted-CE model's optimum is q * w (normalised). The
    correction must recover the metric's optimum q * [1, 2, 4] and score a lower weighted log loss."""
    rng = np.random.default_rng(0)
    n = 20000
    q = rng.dirichlet([4, 1, 1], size=n)  # each row's true class probabilities
    labels = np.array([rng.choice(3, p=row) for row in q])
    class_weights = np.array([1.0, 4.0, 6.0])
    raw = q * class_weights
    raw /= raw.sum(1, keepdims=True)
    corrected = nb["prior_corrected"](raw, class_weights)
    optimum = q * np.array([1.0, 2.0, 4.0])
    np.testing.assert_allclose(corrected, optimum / optimum.sum(1, keepdims=True))
    assert weighted_log_loss(labels, corrected) < weighted_log_loss(labels, raw) - 0.01
    # the notebook's own scorer agrees
    oof = pd.DataFrame({"study_id": np.arange(n) // 5, "level": np.array(["l1_l2", "l2_l3", "l3_l4", "l4_l5",
                                                                           "l5_s1"])[np.arange(n) % 5],
                        "label": labels, "condition": "spinal_canal_stenosis"})
    oof[nb["P_COLUMNS"]] = raw
    scored = nb["summarize"](nb["with_corrected"](oof, class_weights))
    assert scored["competition_terms"]["spinal"] == pytest.approx(weighted_log_loss(labels, raw))
    assert scored["corrected"]["competition_terms"]["spinal"] == pytest.approx(weighted_log_loss(labels, corrected))


# ---------------------------------------------------------------- the report's headline (issue 30)

def headline_case(nb, seed):
    """An out-of-fold frame of every condition and level of 8 studies, random labels and probabilities."""
    rng = np.random.default_rng(seed)
    rows = [(study, condition, level) for study in range(1, 9) for condition in nb["CONDITION_SERIES"]
            for level in nb["LEVELS"]]
    oof = pd.DataFrame(rows, columns=["study_id", "condition", "level"]).assign(label=rng.integers(0, 3, len(rows)),
                                                                               fold=0)
    probs = rng.dirichlet([2, 1, 1], len(rows))
    oof[nb["P_COLUMNS"]] = probs
    oof[nb["PC_COLUMNS"]] = nb["prior_corrected"](probs, [1.0, 4.0, 6.0])
    return oof


def markdown_rows(lines):
    """{first cell: {column: cell}} of the first Markdown table in `lines`."""
    table = [line for line in "\n".join(lines).split("\n\n") if line.startswith("| ")][0].splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])}


def test_headline_is_a_table_of_the_terms_with_oracle_and_predicted_points(nb):
    oof = headline_case(nb, 0)
    final = nb["summarize"](oof)
    predicted = nb["summarize"](headline_case(nb, 1))
    choice = {c: {"candidate": k} for c, k in zip(nb["CONDITION_SERIES"], ("corrected", "raw T", "priors", "raw",
                                                                           "raw"))}
    loc = nb["Localisation"](None, {"predicted": predicted}, choice)
    result = {"fold": 0, "class_weights": [1.0, 4.0, 6.0], "actions": [], "history": [{"epoch": 1}]}
    config = {**nb["CONFIG"], "num_folds": 5, "train_folds": [0]}
    lines = nb["headline_lines"](config, [result], {0: "swa"}, final, oof, "fp32", loc)
    rows = markdown_rows(lines)
    assert list(rows) == ["spinal", "foraminal", "subarticular", "any_severe_spinal", "mean"]
    assert list(rows["mean"]) == ["term", "oracle raw", "oracle corrected", "predicted raw", "predicted corrected",
                                  "submitted"]
    for column, score in (("oracle raw", final), ("oracle corrected", final["corrected"]),
                          ("predicted raw", predicted), ("predicted corrected", predicted["corrected"])):
        for term, value in score["competition_terms"].items():
            assert float(rows[term][column]) == pytest.approx(value, abs=5e-5), (term, column)
        assert float(rows["mean"][column]) == pytest.approx(np.mean(list(score["competition_terms"].values())),
                                                            abs=5e-5)
    assert [rows[t]["submitted"] for t in ("spinal", "foraminal", "subarticular", "any_severe_spinal")] == [
        "corrected", "left raw T, right priors", "left raw, right raw", "corrected"]
    text = "\n".join(lines)
    assert "- Oracle: crops at the annotated slice and point" in text and "- Predicted: the same rows" in text
    assert "Not comparable with leaderboard scores" in text and "(raw" not in text
    # without localisation: the oracle columns only, and a term not trained is a dash, never 'nan'
    spinal = oof[oof["condition"] == nb["SPINAL"]]
    final = nb["summarize"](spinal)
    rows = markdown_rows(nb["headline_lines"](config, [result], {0: "swa"}, final, spinal, "fp32"))
    assert list(rows["mean"]) == ["term", "oracle raw", "oracle corrected"]
    assert rows["foraminal"]["oracle raw"] == rows["subarticular"]["oracle corrected"] == "-"
    assert float(rows["mean"]["oracle raw"]) == pytest.approx(final["competition_score_part"], abs=5e-5)
    assert float(rows["any_severe_spinal"]["oracle corrected"]) == pytest.approx(
        final["corrected"]["competition_terms"]["any_severe_spinal"], abs=5e-5)
