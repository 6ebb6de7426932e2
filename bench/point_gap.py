"""Where the gap between oracle and predicted points comes from (issue 28), on a finished training run's
validation rows: the official metric's terms three ways on the same rows and final models,

- oracle: the run's oof.csv (crops at the annotated slice and point, the cached path);
- annotated via the test path: the annotated points handed to the predicted-point path (point_rows,
  localisation_cost), which must give the oracle terms, or that path itself is off;
- predicted: the run's own localisers (each fold's localiser.pt) predicting its fold's validation studies as test
  studies;

then, per condition, the mean log loss of its rows at oracle and predicted points by the localiser's slice error
(localisation.csv), and the rows whose loss grows most, with their slice and in-plane (mm) errors and what each
adds to its term. Returns (the terms three ways, the rows); tests/test_submission.py runs it on the flow run.

The crops are classified on the run's own views (the notebook's tta_shift, saved with its models); --tta-shift F
classifies the annotated and predicted points on others: five views of each crop, the crop and the crop moved
F * img_size up, down, left and right, softmax averaged (0: the crop alone). The oracle line stays the run's
oof.csv, on the run's views.

    python bench/point_gap.py <run output folder, e.g. the Kaggle-flow test's kaggle_flow0/train> <its data root>
        [--tta-shift 0.05]
"""

import argparse
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from notebook_cells import notebook_namespace, one_thread  # noqa: E402

KEYS = ["study_id", "condition", "level"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="output folder of a training run (fold*/final.pt and localiser.pt, oof.csv, "
                               "localisation.csv)")
    p.add_argument("data", help="the data root it trained on")
    p.add_argument("--rows", type=int, default=10, help="rows listed (default 10)")
    p.add_argument("--out", help="folder for the crop caches (default: a new temporary folder)")
    p.add_argument("--tta-shift", type=float, help="the notebook's tta_shift for the crops classified here (default: "
                                                   "the run's own; 0: the crop alone)")
    a = p.parse_args(argv)
    with one_thread():  # as section 11 runs: the report's figures to the digit
        return gap(a)


def gap(a):
    """main's work, on its parsed arguments."""
    run_dir, cpu, out = Path(a.run), torch.device("cpu"), Path(a.out or tempfile.mkdtemp())
    nb = notebook_namespace({"data_root": a.data, "output_dir": str(out), "pretrained": "none", "num_workers": 0})
    run = nb["load_run"](run_dir, nb["CONFIG"], cpu)
    if a.tta_shift is not None:  # the oracle row stays oof.csv's, on the run's own views
        run["config"]["tta_shift"] = a.tta_shift
    config = {**run["config"], "data_root": a.data, "output_dir": str(out), "cache_dir": str(out / "cache")}
    oof = pd.read_csv(run_dir / "oof.csv")
    studies = sorted(set(oof["study_id"]))
    samples = nb["build_sample_table"](config)[0]
    samples = samples[samples["study_id"].isin(studies)]
    series_of = nb["localised_series"](config["conditions"])
    annotated = {}
    for series, conds in series_of.items():
        data = nb["localiser_data"](samples, config, series, conds, 1)
        annotated[series] = {s: [(data["volumes"][s], t)] for s, t in data["targets"].items()}
    descriptions = pd.read_csv(Path(a.data) / "train_series_descriptions.csv")
    found = {series: {} for series in series_of}
    for k, fold in enumerate(run["folds"]):  # each fold's validation studies by that fold's localisers alone
        fold_studies = sorted(set(oof.loc[oof["fold"] == int(fold.removeprefix("fold")), "study_id"]))
        models = {series: [fold_models[k]] for series, fold_models in run["localisers"].items()}
        for series, by_study in nb["predict_points"](models, series_of, descriptions, Path(a.data) / "train_images",
                                                     fold_studies, config, cpu, "validation")["found"].items():
            found[series].update(by_study)
    costs = {name: nb["localisation_cost"](oof, SimpleNamespace(points=nb["point_rows"](points, series_of)), run,
                                           config, cpu, 0)
             for name, points in (("annotated via the test path", annotated), ("predicted", found))}
    terms = {"oracle": costs["predicted"]["oracle"]["competition_terms"],
             **{name: cost["predicted"]["competition_terms"] for name, cost in costs.items()}}
    print(f"{len(oof)} validation rows of {len(studies)} studies, {run['folds']}; official terms (raw):")
    print(pd.DataFrame(terms).T.round(4).to_string())

    frame = costs["predicted"]["frame"]
    oracle = oof.set_index(KEYS).loc[pd.MultiIndex.from_frame(frame[KEYS])].reset_index()
    frame = frame.assign(loss_oracle=log_loss_rows(oracle, nb["P_COLUMNS"]),
                         loss_predicted=log_loss_rows(frame, nb["P_COLUMNS"]))
    loc = pd.read_csv(run_dir / "localisation.csv")[KEYS + ["slice_error", "error_mm"]]
    frame = frame.merge(loc, on=KEYS, how="left")
    print("\nmean log loss per row by slice error (NaN: not placed), oracle -> predicted:")
    print(frame.groupby(["condition", "slice_error"], dropna=False)[["loss_oracle", "loss_predicted"]]
          .agg(["mean", "count"]).round(3).to_string())
    weight = pd.Series(np.array(nb["ROW_WEIGHTS"])[frame["label"]], frame.index)  # the metric's row weights
    term = frame["condition"].map(lambda c: next(g for g, end in nb["METRIC_GROUPS"].items() if c.endswith(end)))
    grows = weight * (frame["loss_predicted"] - frame["loss_oracle"])
    frame["term share"] = grows / weight.groupby(term).transform("sum")
    print(f"\nthe {a.rows} rows whose loss grows most ('term share': what the row adds to its term, weighted by its "
          "label's 1/2/4 as the metric does):")
    print(frame.sort_values("term share", ascending=False).head(a.rows)[
        KEYS + ["label", "slice_error", "error_mm", "loss_oracle", "loss_predicted", "term share"]]
        .round(3).to_string(index=False))
    return pd.DataFrame(terms).T, frame


def log_loss_rows(frame, columns):
    """Each row's log loss of its label under `columns` (the probabilities)."""
    p = frame[columns].to_numpy(float)
    return -np.log(np.clip(p[np.arange(len(frame)), frame["label"].to_numpy(int)], 1e-15, 1))


if __name__ == "__main__":
    main()
