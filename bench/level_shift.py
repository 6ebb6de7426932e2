"""Issue 28: does the sagittal localiser name the levels by anatomy or by their height in the image?

The localiser tests' set (tests/test_localiser.py: 24 studies of --seed with sagittal_top_edge on ~30 % of them,
whose series start a few rows above L1/L2) and settings (LOC, 18 training studies per fold). Trains the spinal
canal's localiser of every fold as train_localisers does, with the spine's shift range (LOC_SPINE_SHIFT), the share
of edge views (LOC_EDGE_VIEWS) and the epochs given, and prints each fold's clean rows (median, 90th percentile and
largest in-plane error) and each edge-framed study's five errors; last, the rows over 15 mm (half a disc: a level
named one disc off) among the clean and among the edge rows. About 20 s per fold and 20 epochs on 2 CPU cores.

Usage: python bench/level_shift.py [--seed 5] [--shift 0.3] [--edge-share 0.3] [--epochs 40] [--out DIR]
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tools"), str(REPO / "tests")]

from make_demo_studies import make_study_set  # noqa: E402
from test_localiser import loc_namespace  # noqa: E402  (the localiser tests' settings)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--shift", type=float, default=None, help="LOC_SPINE_SHIFT (default: the notebook's)")
    parser.add_argument("--edge-share", type=float, default=None, help="LOC_EDGE_VIEWS' share (default: notebook's)")
    parser.add_argument("--epochs", type=int, default=None, help="loc_epochs (default: the tests' LOC)")
    parser.add_argument("--out", default="/tmp/level_shift")
    args = parser.parse_args(argv)
    root = Path(args.out) / f"set{args.seed}"
    if not (root / "edge.txt").exists():
        summary = make_study_set(root, n_studies=24, seed=args.seed, quirks={"sagittal_top_edge": 0.3})
        (root / "edge.txt").write_text(" ".join(str(q["study_id"]) for q in summary["quirks"]["sagittal_top_edge"]))
    edge = {int(s) for s in (root / "edge.txt").read_text().split()}
    nb = loc_namespace(root, Path(args.out) / "run")
    if args.shift is not None:
        nb["LOC_SPINE_SHIFT"] = args.shift
    if args.edge_share is not None:
        nb["LOC_EDGE_VIEWS"] = (args.edge_share, nb["LOC_EDGE_VIEWS"][1])
    config = {**nb["CONFIG"], **({"loc_epochs": args.epochs} if args.epochs else {})}
    print(f"seed {args.seed}: LOC_SPINE_SHIFT {nb['LOC_SPINE_SHIFT']}, LOC_EDGE_VIEWS {nb['LOC_EDGE_VIEWS']}, "
          f"{config['loc_epochs']} epochs; edge-framed studies {sorted(edge)}")
    samples = nb["assign_folds"](nb["build_sample_table"](config)[0], config)
    tables = []
    for fold in range(config["num_folds"]):
        table = nb["train_localisers"](samples, [fold], config, torch.device("cpu"), 1).table
        table["edge"] = table["study_id"].isin(edge)
        clean = table.loc[~table["edge"], "error_mm"]
        print(f"fold {fold}: clean median {clean.median():.1f} mm, p90 {clean.quantile(0.9):.1f}, "
              f"largest {clean.max():.1f}")
        for study, rows in table[table["edge"]].groupby("study_id"):
            print(f"  edge-framed {study}: {np.round(rows['error_mm'].to_numpy(), 1).tolist()} mm")
        tables.append(table)
    table = pd.concat(tables)
    over = table["error_mm"] > 15
    print(f"over 15 mm: clean {int(over[~table['edge']].sum())} of {int((~table['edge']).sum())} rows, "
          f"edge-framed {int(over[table['edge']].sum())} of {int(table['edge'].sum())}")


if __name__ == "__main__":
    main()
