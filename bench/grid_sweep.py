"""Issue 29 item 2: the crop grid, measured. The whole notebook (the demo preset, all five conditions, the
localiser off: oracle points) runs once per grid on the same generated study set (the demo's generator, seed 42,
in each run's folder), folds and seed; each run's
four official terms (out-of-fold, fold 0's final model) are printed beside its cost: the CPU seconds of the run
and the FLOPs ratio to the plan's fold that the real backbone would cost at that grid (`fold_flops`).

The CPU runs the demo's small backbone (mobilenet_v3_small, random init): EfficientNet-V2-S at 256 px does not
train on 2 cores in an afternoon. The terms say whether a coarser grid loses what the images hold; the FLOPs
ratio says what each grid costs on the real run.

    python bench/grid_sweep.py [--grids 96 128 160 256] [--studies 48] [--out /tmp/grid_sweep]
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from notebook_cells import notebook_namespace  # noqa: E402


def run(grid, studies, out):
    """One notebook run at `grid` px; returns its row of the table."""
    start = time.time()
    ns = notebook_namespace({"demo": True, "img_size": grid, "demo_studies": studies, "num_workers": 2,
                             "output_dir": str(out / f"px{grid}"), "cache_dir": str(out / f"cache{grid}")}, tags=None)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[96, 128, 160, 256])
    parser.add_argument("--studies", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("/tmp/grid_sweep"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for grid in args.grids:
        rows.append(run(grid, args.studies, args.out))
        print(json.dumps(rows[-1]), flush=True)
        (args.out / "sweep.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
