"""Prediction time per test study on this machine's CPU at the notebook's default sizes (EfficientNet-V2-S classifier
at the default grid, localisers at 256 px, one fold; random weights: the time does not depend on them), for all 25
targets by default: the three series types' localisers, the axial slices placed through the geometry, 25 crops (the
geometry search runs, then the annotated axial slices are taken: random weights would place none). It also prints
the seconds outside the models' forwards (reading, decoding, resizing, crops): the notebook's TEST_CPU_SECONDS,
which its hidden-test projection adds to the models' FLOPs on a GPU.

Usage: python bench/predict_time.py [--studies 4] [--workers 2] [--conditions spinal_canal_stenosis ...]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from make_demo_studies import LEVEL_NAMES, LEVELS, TEST_SOLUTION, make_study_set  # noqa: E402
from notebook_cells import notebook_namespace  # noqa: E402

ALL_FIVE = ["spinal_canal_stenosis", "left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing",
            "left_subarticular_stenosis", "right_subarticular_stenosis"]


def annotated_axial_slices(geometry_search, solution):
    """axial_slices that runs the notebook's geometry search (its time counts) and then returns the slices the
    generator annotated for each level: random localiser weights place the canal anywhere, so the geometry would
    find no axial slice and those rows would be priors, untimed; with these, every target is classified."""
    coords = pd.read_csv(solution / "train_label_coordinates.csv")
    coords = coords[coords["condition"].str.contains("Subarticular")]
    level_of = {LEVEL_NAMES[level]: k for k, level in enumerate(LEVELS)}

    def axial_slices(points, series_dir):
        found = geometry_search(points, series_dir)
        rows = coords[coords["series_id"] == int(Path(series_dir).name)]
        annotated = dict(zip(rows["level"].map(level_of), rows["instance_number"]))
        return [int(annotated.get(k, f)) for k, f in enumerate(found)]
    return axial_slices


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--studies", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--conditions", nargs="+", default=ALL_FIVE, help="default: all five (the 25 targets)")
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    make_study_set(tmp / "data", n_studies=2, seed=0, test_studies=a.studies)
    nb = notebook_namespace({"data_root": str(tmp / "data"), "output_dir": str(tmp / "out"), "pretrained": "none",
                             "num_workers": a.workers, "conditions": a.conditions})
    config, cpu = nb["CONFIG"], torch.device("cpu")
    fold = tmp / "out" / "fold0"
    fold.mkdir(parents=True)
    torch.save({"model": nb["SpineModelV9"](config).state_dict(), "kind": "swa", "config": config,
                "class_weights": config["class_weights"]}, fold / "final.pt")
    series = nb["localised_series"](config["conditions"])  # a localiser per series type, maps as trained
    maps = {s: nb["LOC_MODE"][s].maps(c) for s, c in series.items()}
    torch.save({"models": {s: nb["LevelLocaliser"](config["loc_channels"], m).state_dict() for s, m in maps.items()},
                "series": series, "config": {k: config[k] for k in nb["LOC_KEYS"]},
                "version": nb["LOCALISER_VERSION"]}, fold / "localiser.pt")
    (tmp / "out" / "priors.json").write_text(json.dumps(nb["label_priors"](config["data_root"])))
    run = nb["load_run"](tmp / "out", config, cpu)
    nb["axial_slices"] = annotated_axial_slices(nb["axial_slices"], tmp / "data" / TEST_SOLUTION)
    model_seconds = [0.0]
    for name in ("LevelLocaliser", "SpineModelV9"):  # every forward of the models timed (this process runs them)
        nb[name].forward = timed(nb[name].forward, model_seconds)
    cpu_start = time.process_time()  # CPU time of all this process's threads (--workers 1: all the work)
    _, info = nb["write_submission"](run, config, cpu, a.workers)
    cpu_seconds = (time.process_time() - cpu_start) / info["studies"]
    models = model_seconds[0] / info["studies"]
    print(f"{info['seconds_per_study']:.2f} s wall, {cpu_seconds:.2f} s CPU per study ({info['studies']} studies, "
          f"{sum(info['rows_from_model'].values())} rows from the models, {len(info['on_priors'])} on priors, "
          f"one fold, {torch.get_num_threads()} torch threads, {a.workers} workers; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"of which the models' forwards {models:.2f} s, the rest (reading, decoding, resizing, crops, geometry) "
          f"{info['seconds_per_study'] - models:.2f} s per study: the notebook's TEST_CPU_SECONDS "
          f"(classifier at {config['img_size']} px, localisers at {config['loc_size']} px)")
    return {"wall": info["seconds_per_study"], "models": models, "outside_models": info["seconds_per_study"] - models}


def timed(forward, total):
    """`forward` that adds its wall seconds to total[0]."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - start
    return wrapper


if __name__ == "__main__":
    main()
