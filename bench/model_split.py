"""One classifier for all five conditions (a condition x level embedding, the notebook's choice) against one classifier
per series type (spinal canal; the two foramina; the two subarticular sides), on the same generated studies and the
same validation fold (issue 24 item 1: choose, measure, say why).

For each seed it generates a clean study set, assigns folds once from the five-condition sample table (so both
arrangements validate on the same studies), trains fold 0 at the demo preset's sizes for each arrangement with the
notebook's own functions, and prints per condition the final (SWA) model's balanced accuracy on fold 0's rows, the
official metric's terms at the annotated points, the training seconds and the parameter count.

Usage (from the repository root):
  python bench/model_split.py                  # 48 studies, seed 7: about 8 min on 2 cores
  python bench/model_split.py --seeds 7 11 --studies 48
Expected: bench/RESULTS.md ("One model or one per series type").
"""

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from make_demo_studies import make_study_set  # noqa: E402
from notebook_cells import notebook_namespace  # noqa: E402

SPINAL = "spinal_canal_stenosis"
FORAMINA = ["left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"]
SUBARTICULAR = ["left_subarticular_stenosis", "right_subarticular_stenosis"]
ARRANGEMENTS = {"one model": [[SPINAL, *FORAMINA, *SUBARTICULAR]],
                "one per series type": [[SPINAL], FORAMINA, SUBARTICULAR]}


def namespace(root, out, conditions, workers, preset=None):
    """The notebook's namespace and CONFIG for `conditions` at the demo preset's sizes (the preset read from a first
    namespace when not given)."""
    if preset is None:
        first = notebook_namespace({"data_root": str(root), "output_dir": str(out)})
        preset = {k: v for k, v in first["DEMO_PRESET"].items() if k != "output_dir"}
    nb = notebook_namespace({**preset, "data_root": str(root), "output_dir": str(out), "num_workers": workers,
                             "conditions": conditions})
    return nb, nb["CONFIG"], preset


def train_group(conditions, root, out, folds, workers, preset):
    """Fold 0 of one classifier over `conditions`: (out-of-fold frame of its final model, training seconds,
    parameters, the namespace)."""
    nb, config, _ = namespace(root, out, conditions, workers, preset)
    samples, _ = nb["build_sample_table"](config)
    cached = nb["build_cache"](samples.assign(fold=samples["study_id"].map(folds)), config, workers)[:3]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the epoch lines: the table printed at the end is the output
        result = nb["train_fold"](0, *cached, config, torch.device("cpu"))
    seconds = time.perf_counter() - start
    kind = nb["final_kind"](result, config)
    params = sum(p.numel() for p in nb["SpineModelV9"](config).parameters())
    return nb["oof_frame"]([result], lambda r: kind), seconds, params, nb


def compare(seed, studies, workers, tmp):
    """Rows of the table for one generated set: each arrangement's per-condition BA, terms, seconds, parameters."""
    root = tmp / f"data_{seed}"
    make_study_set(root, n_studies=studies, seed=seed)
    everything = ARRANGEMENTS["one model"][0]
    nb, config, preset = namespace(root, tmp / f"folds_{seed}", everything, workers)
    table = nb["assign_folds"](nb["build_sample_table"](config)[0], config)
    folds = dict(zip(table["study_id"], table["fold"]))  # shared by every classifier: the same validation studies
    rows = []
    for name, groups in ARRANGEMENTS.items():
        runs = [train_group(conditions, root, tmp / f"run_{seed}_{len(rows)}_{k}", folds, workers, preset)
                for k, conditions in enumerate(groups)]
        oof = pd.concat([r[0] for r in runs], ignore_index=True)
        ba = nb["per_condition"](oof)["BA"].astype(float).reindex(everything)
        terms = nb["competition_terms"](*nb["kaggle_frames"](oof))
        rows.append({"seed": seed, "arrangement": name, **{f"BA {c}": round(v, 3) for c, v in ba.items()},
                     **{f"term {t}": round(v, 3) for t, v in terms.items()},
                     "train s": round(sum(r[1] for r in runs)), "parameters": sum(r[2] for r in runs)})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[7])
    p.add_argument("--studies", type=int, default=48)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for seed in a.seeds for r in compare(seed, a.studies, a.workers, Path(tmp))]
    table = pd.DataFrame(rows).set_index(["seed", "arrangement"]).T
    print("| quantity | " + " | ".join(f"seed {s}: {a}" for s, a in table.columns) + " |")
    print("|---" * (len(table.columns) + 1) + "|")
    for quantity, values in table.iterrows():
        print(f"| {quantity} | " + " | ".join(str(int(v) if float(v).is_integer() else v) for v in values) + " |")


if __name__ == "__main__":
    main()
