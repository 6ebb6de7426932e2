"""Issue 29 item 2: the crop grid, measured. The whole notebook (the demo preset, all five conditions, the localiser
off: oracle points) runs once per grid on the same generated study set (the demo's generator at the run's seed, in
each run's folder), folds and seed; each run's four official terms (out-of-fold, fold 0's final model) are printed
beside its cost: the CPU seconds of the run and the FLOPs ratio to the plan's fold that the real backbone would
cost at that grid (`training_projection`).

The CPU runs the demo's small backbone (mobilenet_v3_small, random init): EfficientNet-V2-S at 256 px does not
train on 2 cores in an afternoon. The terms say whether a coarser grid loses what the images hold; the FLOPs
ratio says what each grid costs on the real run.

One seed and one validation fold leave each term noisy, so the script also prints a paired bootstrap over the
validation studies (the same rows at every grid): each grid's mean of the four terms minus the reference grid's
(the largest, the plan's 256 px by default), with its 95 % interval. `--analyse` prints only that, from the runs'
oof.csv.

    python bench/grid_sweep.py [--grids 96 128 160 256] [--studies 48] [--seed 42] [--out /tmp/grid_sweep]
    python bench/grid_sweep.py --analyse --out /tmp/grid_sweep
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from notebook_cells import notebook_namespace  # noqa: E402


def run(grid, studies, out, seed):
    """One notebook run at `grid` px; returns its row of the table."""
    start = time.time()
    ns = notebook_namespace({"demo": True, "img_size": grid, "demo_studies": studies, "num_workers": 2,
                             "seed": seed, "output_dir": str(out / f"px{grid}"),
                             "cache_dir": str(out / f"cache{grid}")}, tags=None)
    seconds = time.time() - start
    metrics = json.loads((out / f"px{grid}" / "metrics.json").read_text())
    terms = metrics["final"]["competition_terms"]
    written = notebook_namespace({}, tags=("parameters", "defs"))  # CONFIG as written: the real run's backbone
    real = written["merge_config"](written["CONFIG"], {"img_size": grid})  # the default run at this grid
    cost = written["training_projection"](real, written["real_data_rows"](real))
    return {"grid_px": grid, "seconds": round(seconds), **{t: round(v, 4) for t, v in terms.items()},
            "mean": round(sum(terms.values()) / len(terms), 4),
            "fold_ratio_to_plan": round(cost["fold"] / cost["plan_fold"], 3),
            "cache_gb": round(cost["cache_bytes"] / 1e9, 1),
            "data_root": str(ns["CONFIG"]["data_root"])}


def paired_bootstrap(out, grids, reference=256, reps=500, seed=0):
    """{grid: (mean of the four terms minus the reference grid's, 2.5 %, 97.5 %)} over `reps` resamples of the
    validation studies, the same resample for every grid (their oof.csv hold the same rows)."""
    ns = notebook_namespace({}, tags=("parameters", "defs"))
    frames = {g: pd.read_csv(out / f"px{g}" / "oof.csv") for g in grids}
    studies = frames[reference]["study_id"].unique()
    rng = np.random.default_rng(seed)

    def score(frame, pick):
        parts = [frame[frame["study_id"] == s].assign(study_id=1000 * s + k) for k, s in enumerate(pick)]
        terms = ns["competition_terms"](*ns["kaggle_frames"](pd.concat(parts), ns["P_COLUMNS"]))
        return np.mean(list(terms.values()))
    diffs = {g: [] for g in grids}
    for _ in range(reps):
        pick = rng.choice(studies, len(studies))
        ref = score(frames[reference], pick)
        for g in grids:
            diffs[g].append(score(frames[g], pick) - ref)
    return {g: (float(np.mean(d)), *map(float, np.percentile(d, [2.5, 97.5]))) for g, d in diffs.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[96, 128, 160, 256])
    parser.add_argument("--studies", type=int, default=48)
    parser.add_argument("--seed", type=int, default=42, help="CONFIG seed: the generated set, folds and training")
    parser.add_argument("--out", type=Path, default=Path("/tmp/grid_sweep"))
    parser.add_argument("--analyse", action="store_true", help="only the paired bootstrap of earlier runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for grid in [] if args.analyse else args.grids:
        rows.append(run(grid, args.studies, args.out, args.seed))
        print(json.dumps(rows[-1]), flush=True)
        (args.out / "sweep.json").write_text(json.dumps(rows, indent=1))
    reference = max(args.grids)
    for grid, (mean, low, high) in paired_bootstrap(args.out, args.grids, reference).items():
        print(f"{grid} px: mean of the four terms minus {reference} px's {mean:+.3f} (95 % interval {low:+.3f} to "
              f"{high:+.3f}; paired bootstrap over the validation studies)")


if __name__ == "__main__":
    main()
