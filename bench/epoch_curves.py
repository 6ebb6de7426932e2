"""Issue 29 item 3: how many epochs the shared model needs, from validation curves. The whole notebook runs the
demo's sizes (mobilenet_v3_small at 64 px on the CPU) with the plan's schedule (25 epochs, warmup 2, SWA from
epoch 18, every epoch validated, early stopping off) twice on the same generated study set (the demo's, seed 42),
fold and seed: the
spinal canal alone (the plan's run) and all five conditions (five times the optimiser steps per epoch). For each it
prints the validation loss and balanced accuracy per epoch, the optimiser steps per epoch, and the first epoch whose
validation loss comes within 5 % of the run's lowest before SWA starts.

    python bench/epoch_curves.py [--studies 48] [--out /tmp/epoch_curves]
    python bench/epoch_curves.py --shared --out /tmp/epoch_curves15   # all five at SHARED_SCHEDULE's shape
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from notebook_cells import notebook_namespace  # noqa: E402


def curve(name, conditions, studies, out, schedule):
    """One notebook run; its per-epoch validation curve and when it levels off."""
    start = time.time()
    folder = out / name.replace(" ", "_")
    ns = notebook_namespace({"demo": True, "conditions": conditions, "demo_studies": studies, "num_workers": 2,
                             "output_dir": str(folder), **schedule}, tags=None)
    history = json.loads((folder / "metrics.json").read_text())["history"]["0"]
    losses = [row["val_loss"] for row in history]
    before_swa = losses[:schedule["swa_start_epoch"] - 1]
    level = next(e for e, loss in enumerate(before_swa, 1) if loss <= 1.05 * min(before_swa))
    steps = len(ns["SAMPLES"].query("fold != 0 and fold >= 0")) // ns["CONFIG"]["batch_size"]
    return {"run": name, "steps_per_epoch": steps, "seconds": round(time.time() - start),
            "levels_off_at_epoch": level, "lowest_val_loss_before_swa": round(min(before_swa), 4),
            "val_loss": [round(v, 3) for v in losses], "val_ba": [round(row["val_ba"], 3) for row in history],
            "data_root": str(ns["CONFIG"]["data_root"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("/tmp/epoch_curves"))
    parser.add_argument("--shared", action="store_true", help="all five conditions only, at the notebook's "
                        "SHARED_SCHEDULE (early stopping off, every epoch validated) instead of the plan's schedule")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    nb = notebook_namespace({}, tags=("parameters", "defs"))  # the notebook's schedules and conditions
    table = nb["SHARED_SCHEDULE" if args.shared else "PLAN_SCHEDULE"]
    schedule = {**table, "patience": table["epochs"], "val_every": 1}  # early stopping off, every epoch validated
    runs = {"all five": list(nb["CONDITION_SERIES"])}
    if not args.shared:
        runs = {"spinal canal alone": [nb["SPINAL"]], **runs}
    rows = []
    for name, conditions in runs.items():
        rows.append(curve(name, conditions, args.studies, args.out, schedule))
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "curves.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
