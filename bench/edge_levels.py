"""Issue 28: the level decoding before and after the end-level rule, on the SAME trained localiser and studies.

The Kaggle-flow test's data (tests/test_submission.py's flow_set: the clean 48-study set, seed 5, a 16-study test
split; or, with --quirk, the same set with an EXTRA_QUIRKS quirk on) and settings (TINY: all five conditions, so
the folds are the flow run's), fold 0. Trains fold 0's localiser of each --series type as train_fold_localisers
does (same seed, same studies; saved in --out, reused on a second run), then predicts fold 0's validation studies
as the notebook does (predict_points) twice: once with `decode_levels` at BASE ('old': with no ordered choice of
all five levels, each map's own peak) and once with the notebook's ('new': the best ordered four without an end
level, the end extrapolated). Prints, per rule, localisation_metrics per level, and every study whose points the
two rules place differently (grid rows, target / old / new). Where no point differs, the classifier's rows, crops
and so the official terms are the same under both rules: no classifier is trained here.

Usage: python bench/edge_levels.py [--out /tmp/edge_levels] [--quirk sagittal_top_edge=0.15]
       [--series "Sagittal T2/STIR" "Sagittal T1"]
"""

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tools"), str(REPO / "tests")]

from make_demo_studies import make_study_set  # noqa: E402
from notebook_cells import notebook_namespace  # noqa: E402
from test_submission import TINY  # noqa: E402  (the Kaggle-flow test's settings)

BASE = "94f5cdd"  # the notebook before the end-level rule
CPU = torch.device("cpu")


def old_decode_source():
    """decode_levels' source at BASE."""
    text = subprocess.run(["git", "-C", str(REPO), "show", f"{BASE}:le3ba_v9.py"], check=True, capture_output=True,
                          text=True).stdout
    return re.search(r"^def decode_levels\(.*?(?=^def )", text, re.S | re.M).group(0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/edge_levels")
    parser.add_argument("--quirk", default="", help="name=fraction of an EXTRA_QUIRKS quirk (sagittal_top_edge=0.15)")
    parser.add_argument("--series", nargs="+", default=["Sagittal T2/STIR"])
    parser.add_argument("--loc-epochs", type=int, help="a smoke run's fewer localiser epochs (TINY: 20)")
    args = parser.parse_args(argv)
    out, start = Path(args.out), time.time()
    root = out / "data"
    if not (root / "train.csv").exists():
        quirks = {args.quirk.split("=")[0]: float(args.quirk.split("=")[1])} if args.quirk else None
        make_study_set(root, n_studies=48, seed=5, test_studies=16, quirks=quirks)
    nb = notebook_namespace({**TINY, "data_root": str(root), "output_dir": str(out / "run"),
                             **({"loc_epochs": args.loc_epochs} if args.loc_epochs else {})})
    config = nb["CONFIG"]
    samples = nb["assign_folds"](nb["build_sample_table"](config)[0], config)
    every = nb["localised_series"](config["conditions"])
    series_of = {series: every[series] for series in args.series}
    fold_of = samples.groupby("study_id")["fold"].first()
    train = [s for s in fold_of.index if fold_of[s] != 0 and fold_of[s] >= 0]
    val = [s for s in fold_of.index if fold_of[s] == 0]
    models, data = {}, {}
    for series, conds in series_of.items():
        data[series] = nb["localiser_data"](samples, config, series, conds, 1)
        path = out / f"localiser {series.replace('/', '_')}.pt"
        if path.exists():
            models[series] = torch.load(path, map_location="cpu", weights_only=False)
        else:
            k = list(every).index(series)  # train_fold_localisers' seed for fold 0
            mode = nb["LOC_MODE"][series]
            items = mode.items(data[series], [s for s in train if s in data[series]["volumes"]])
            models[series] = nb["train_localiser"](*items, config, CPU, config["seed"] + 100 + 1000 * k,
                                                   f"fold 0 {series} localiser", None,
                                                   nb["mirror_maps"](conds) if mode.mirrored else False,
                                                   not mode.per_level)[0]
            torch.save(models[series], path)
        print(f"{series}: localiser ready at {time.time() - start:.0f} s")
    rules = {"new": nb["decode_levels"]}
    exec(old_decode_source(), nb)
    base = nb["decode_levels"]
    rules["old"] = lambda probs, gap, window=2, count=4, area=None: base(probs, gap, window, count)  # no area then
    descriptions = pd.read_csv(root / "train_series_descriptions.csv")
    found = {}
    for name in ("old", "new"):
        nb["decode_levels"] = rules[name]  # the notebook's functions look it up in their namespace
        found[name] = nb["predict_points"]({s: [m] for s, m in models.items()}, series_of, descriptions,
                                           root / "train_images", val, config, CPU, "validation")["found"]
    nb["decode_levels"] = rules["new"]
    print(f"data: {(root / 'GENERATED_BY.txt').read_text().strip()}; fold 0: {len(train)} training, {len(val)} "
          "validation studies")
    for series, conds in series_of.items():
        targets = {s: t for s, t in data[series]["targets"].items() if s in val}
        for name in ("old", "new"):
            table = nb["localisation_table"](data[series]["volumes"], targets, found[name][series],
                                             nb["map_names"](conds))
            print(f"\n=== {series}, decode rule {name} ===")
            print(nb["localisation_metrics"](table).to_string())
            print(f"points one disc or more off (> 20 mm): {int((table['error_mm'] > 20).sum())} of {len(table)}, "
                  f"in studies {sorted(set(table.loc[table['error_mm'] > 20, 'study_id']))}")
        print(f"\n{series}: studies the rules place differently (grid rows v: target / old / new)")
        for study in val:
            old, new = (found[name][series].get(study) or [] for name in ("old", "new"))
            if old and new and not np.allclose(np.nan_to_num(old[0][1]), np.nan_to_num(new[0][1])):
                target = targets.get(study, np.full((len(old[0][1]), 3), np.nan))
                print(study, np.round(target[:, 2], 1), np.round(old[0][1][:, 2], 1), np.round(new[0][1][:, 2], 1))
    print(f"total: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
