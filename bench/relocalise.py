"""A finished training run's localisers trained again under other loc_* settings, its classifiers untouched, so that
bench/point_gap.py can score the same validation rows and models at the new localisers' points (issue 28: how much
of the gap between oracle and predicted points the localiser's grid makes).

The run folder is copied to OUT without its localisers; each of its folds' localisers is trained again by the
notebook's own `train_localisers`, from the run's saved settings with --set overrides, on the run's own folds, on
one thread as section 11 trains them; OUT/localisation.csv is the new localisers' table. With the run's own settings
it gives the run's localisation.csv to the digit (checked on the flow run, 2026-12-07).

    python bench/relocalise.py <run output folder> <its data root> OUT --set loc_size=128 --set loc_epochs=40
    python bench/point_gap.py OUT <its data root>
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from notebook_cells import notebook_namespace, one_thread  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="output folder of a training run (fold*/final.pt and localiser.pt, oof.csv)")
    p.add_argument("data", help="the data root it trained on")
    p.add_argument("out", help="new folder: the run's copy with the new localisers")
    p.add_argument("--set", action="append", default=[], metavar="loc_KEY=VALUE",
                   help="a localiser setting (JSON value), e.g. loc_size=128; repeatable")
    a = p.parse_args(argv)
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    if not all(k.startswith("loc_") for k in overrides):
        raise SystemExit(f"--set takes localiser settings (loc_*) only: the classifiers stay the run's ({overrides})")
    run_dir, out, cpu = Path(a.run), Path(a.out), torch.device("cpu")
    if out.exists():
        raise SystemExit(f"{out} exists: give a new folder")
    nb = notebook_namespace({"data_root": a.data, "output_dir": str(out), "pretrained": "none", "num_workers": 0})
    finals = sorted(run_dir.glob("fold*/final.pt"))
    trained = torch.load(finals[0], map_location="cpu", weights_only=False)["config"]  # the run's whole CONFIG
    config = {**nb["CONFIG"], **trained, "data_root": a.data, "output_dir": str(out), "cache_dir": str(out / "cache"),
              **overrides}
    shutil.copytree(run_dir, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        "localiser.pt", "localisation.csv", "cache", "superseded"))
    samples = nb["assign_folds"](nb["build_sample_table"](config)[0], config)
    oof = pd.read_csv(run_dir / "oof.csv")
    folds = [int(f.parent.name.removeprefix("fold")) for f in finals]
    same = samples.set_index(["study_id", "condition", "level"]).loc[
        pd.MultiIndex.from_frame(oof[["study_id", "condition", "level"]]), "fold"].to_numpy()
    if (same != oof["fold"].to_numpy()).any():
        raise SystemExit("these settings fold the data otherwise than the run did (seed, num_folds, data)")
    start = time.time()
    with one_thread():  # as section 11 trains them: the run's own rounding
        loc = nb["train_localisers"](samples, folds, config, cpu, 0)
    loc.table.to_csv(out / "localisation.csv", index=False)
    print(f"localisers of folds {folds} trained again with {overrides} in {time.time() - start:.0f} s -> {out}")
    print(loc.metrics.round(3).to_string())
    return loc


if __name__ == "__main__":
    main()
