"""Cost model of a training run and of the hidden-test prediction (issue 29 item 1), from FLOPs counted here.

The training cost model is the notebook's own (section 8.11, beside project_run: training_projection and the
functions it calls), so the notebook's projection before its first epoch and this script's are one computation;
this script adds the hidden test's FLOPs, the command line and the tables.

What is counted (torch.utils.flop_counter.FlopCounterMode; the weights do not change a count):
- the classifier's forward per sample of each series type (the notebook's classifier_flops): its SpineModelV9 with
  the configured backbone (pretrained 'none'), one sample of num_slices slices at that series type's grid, built on
  the meta device (shapes only: the CPU's count, without the arithmetic). A training step counts as 3x the
  forward (forward + a backward of about twice its work). The backward is NOT counted directly: torch's counter
  counts a grouped convolution's backward as a dense one. A 256-group 3x3 convolution on 32x32 (256 channels) is
  4.72 MFLOP forward by hand and by the counter, but the counter gives 1,217 MFLOP for forward plus backward
  (1,212.7 MFLOP of convolution_backward against ~9.4 by hand): EfficientNet's depthwise layers would inflate its
  count about 5x (tests/test_cost.py checks both figures).
- a fold's work (the notebook's fold_flops), through its project_run with FLOPs in place of seconds: every epoch
  trains its training rows (3x forward), validates on the validated epochs (is_validation_epoch) and probes the
  training BA at the plan's checkpoint epochs (forward), and the fold's finish (SWA's BatchNorm pass, three
  evaluations). The plan's run (PLAN_RUN: the spinal canal alone, 256 px, 7 slices, 25 epochs, validated every
  epoch, five folds, no hold-out) is the same accounting with the same backbone, so the ratio is the data's,
  grid's, slices' and epochs' share; its hours come from the anchor below.
- per test study, one fold's models (the notebook's test_study_flops): the localisers (its LevelLocaliser at
  loc_size, a map per condition and level; 'volume' series types over all slices of a typical series, 'slice' ones
  once per level on one slice) and the classifier (the configured conditions x 5 levels, one forward each). The
  submission averages every trained fold's models (load_run), so the ensemble of `--folds` folds is that x folds.
- the crop cache: every labelled row x (num_slices x crop_side^2 uint8 + num_slices mask bytes), crop_side being
  the notebook's own crop_side (img_size plus the training margin, 1.45x).

Data counts (the notebook's real_data_rows): 1,975 studies (../shared/context/rsna2024.md). That file gives no
labelled rows per condition (only that ~193 studies lack some label), so every condition is taken at the plan's
~9.7k spinal canal samples (REAL_LABELLED_ROWS): 9,700 of 1,975 x 5 = 9,875 rows labelled (1.8 % missing). A fold
trains (num_folds - 1) / num_folds of the rows left after the hold-out. Typical slices per sagittal series: 17 (an
assumption, the real series commonly hold 15-20; rsna2024.md gives none); change it with --sagittal-slices.

Anchor of every hour figure (all projections, none measured on a GPU; the notebook's PLAN_FOLD_HOURS_T4 and
GPU_SPEED): the plan's 3.5 h per fold (25 epochs x 8-9 min) on a Kaggle GPU, taken as one T4, for the plan's run
with EfficientNet-V2-S: its FLOPs per 3.5 h are the effective FLOP rate of one T4. T4 x2: 1.8x one T4 (README's
expectation, bench/ddp_check.py; not measured). L4: 121 / 65 = 1.86x one T4, an assumption from NVIDIA's
published dense fp16 tensor throughput (L4 121 TFLOPS, 242 with sparsity; T4 65 TFLOPS); its memory bandwidth
(300 GB/s) is no higher than a T4's (320 GB/s), so bandwidth-bound layers (depthwise convolutions, BatchNorm) may
gain less. For a backbone other than EfficientNet-V2-S the anchor's FLOP rate is applied to its FLOPs: a weaker
projection (small backbones run further below a GPU's peak). The hidden-test hours (the notebook's
prediction_projection, which it prints before predicting) add, per study, the seconds outside the models that
bench/predict_time.py measured on the 2-core CPU (reading, DICOM decoding, resizing, crops: the notebook's
TEST_CPU_SECONDS, taken as they are on Kaggle's CPU) to the models' FLOPs at the anchor's rate.

Usage (from the repository root):
  python bench/cost.py                            # the default CONFIG (all five conditions, EfficientNet-V2-S)
  python bench/cost.py --json
  python bench/cost.py --conditions spinal_canal_stenosis          # the plan's run: ratio 1.00
  python bench/cost.py --grid "Sagittal T2/STIR=256,Sagittal T1=128,Axial T2=128" --epochs 15 --folds 5
  python bench/cost.py --backbone mobilenet_v3_small               # a CPU backbone (weaker hour projection)
A run takes a few seconds (loading the notebook's definitions; each count is a fraction of a second).
"""

import argparse
import contextlib
import functools
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from notebook_cells import notebook_namespace  # noqa: E402  (needs tools/ on sys.path)

REAL_STUDIES = 1975  # train.csv (rsna2024.md)
HIDDEN_TEST_STUDIES = 700  # about 270 public + 440 private (rsna2024.md, medium confidence)


@functools.lru_cache(maxsize=1)
def load_notebook():
    """The notebook's parameters and defs cells (no setup: no paths, GPU probe or data needed): its CONFIG as
    written and its definitions, the cost model's included."""
    with contextlib.redirect_stdout(sys.stderr):
        return notebook_namespace({}, tags=("parameters", "defs"))


def parse_grid(text, known):
    """'Sagittal T2/STIR=256,Sagittal T1=128' -> {series type: px}; an unknown series type is an error."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        series, _, px = item.rpartition("=")
        if series.strip() not in known or not px.strip().isdigit() or int(px) <= 0:
            raise SystemExit(f"--grid {item!r}: give SERIES TYPE=PIXELS, series types {sorted(known)}")
        out[series.strip()] = int(px)
    return out


def cost(config, backbone, grid_override=None, folds=5, sagittal_slices=None, nb=None):
    """The cost model of `config` (a merged notebook CONFIG) with `backbone` as a dict (main prints it): the
    notebook's training_projection at the real data's counts, and the hidden test's FLOPs."""
    nb = nb or load_notebook()
    sagittal_slices = sagittal_slices or nb["SAGITTAL_SLICES"]
    config = {**config, "backbone": backbone}
    rows = nb["real_data_rows"](config)
    with contextlib.redirect_stdout(sys.stderr):
        p = nb["training_projection"](config, rows, grid_override)
    run_fold, plan_fold, t4_rate = p["fold"], p["plan_fold"], p["t4_rate"]
    test = nb["prediction_projection"](config, folds, HIDDEN_TEST_STUDIES, grid_override, sagittal_slices)
    loc_per_study, classifier_per_study = test["localisers"], test["classifier"]
    test_one_fold = sum(loc_per_study.values()) + classifier_per_study
    loc_train_studies = REAL_STUDIES * (1 - config["holdout_frac"]) * (config["num_folds"] - 1) / config["num_folds"]
    loc_train_fold = config["loc_epochs"] * loc_train_studies * 3 * sum(loc_per_study.values())  # 3x forward
    hours = {gpu: {"fold": p["hours"][gpu], "run": folds * run_fold / t4_rate / 3600 / speed, "factor": speed,
                   "source": source} for gpu, (speed, source) in nb["GPU_SPEED"].items()}
    return {
        "grid_px": p["grid"],
        "num_slices": p["slices"],
        "samples_per_epoch": {c: round(r["train"]) for c, r in rows.items()},
        "epochs": config["epochs"],
        "train_gflop_per_sample": {s: 3 * f / 1e9 for s, f in p["forward"].items()},
        "fold_ratio_to_plan": run_fold / plan_fold,
        "run_ratio_to_plan": folds * run_fold / (nb["PLAN_RUN"]["num_folds"] * plan_fold),
        "cache_gb": p["cache_bytes"] / 1e9,
        "test_gflop_per_study": folds * test_one_fold / 1e9,
        "test_hours_t4": test["hours"],
        # beyond the keys
        "backbone": backbone,
        "conditions": list(config["conditions"]),
        "folds": folds,
        "forward_gflop_per_sample": {s: f / 1e9 for s, f in p["forward"].items()},
        "labelled_rows": {c: r["labelled"] for c, r in rows.items()},
        "validation_rows": {c: round(r["val"]) for c, r in rows.items()},
        "crop_side_px": p["crop_side"],
        "cache_bytes_per_sample": p["sample_bytes"],
        "cache_gib": p["cache_bytes"] / 2**30,
        "fold_pflop": run_fold / 1e15,
        "plan_fold_pflop": plan_fold / 1e15,
        "anchor": (f"the plan's {nb['PLAN_FOLD_HOURS_T4']} h per fold on a Kaggle GPU = one T4, for its run with "
                   f"{nb['PLAN_BACKBONE']} ({p['anchor_fold'] / 1e15:.1f} PFLOP): {t4_rate / 1e12:.2f} TFLOP/s "
                   "effective"),
        "t4_effective_tflops": t4_rate / 1e12,
        "hours_projected": hours,
        "test_gflop_per_study_one_fold": test_one_fold / 1e9,
        "test_localiser_gflop_one_fold": {s: f / 1e9 for s, f in loc_per_study.items()},
        "test_classifier_gflop_one_fold": classifier_per_study / 1e9,
        "test_studies": HIDDEN_TEST_STUDIES,
        "test_hours_note": ("per study the seconds outside the models measured on the CPU (TEST_CPU_SECONDS) plus "
                            "all folds' models' FLOPs at the anchor's rate"),
        "test_cpu_seconds_per_study": nb["TEST_CPU_SECONDS"]["seconds"],
        "test_cpu_seconds_measured": nb["TEST_CPU_SECONDS"]["measured"],
        "test_model_seconds_per_study_t4": test["model_seconds"],
        "test_hours_t4_flops_only": HIDDEN_TEST_STUDIES * test["model_seconds"] / 3600,
        "localiser_train_pflop_per_fold": loc_train_fold / 1e15,
        "localiser_train_hours_t4_per_fold": loc_train_fold / t4_rate / 3600,
        "sagittal_slices_assumed": sagittal_slices,
    }


def print_table(c):
    nb = load_notebook()
    folds, plan = c["folds"], nb["PLAN_RUN"]
    print(f"le3ba_v9 cost model: {c['backbone']}, {len(c['conditions'])} condition(s) "
          f"({5 * len(c['conditions'])} targets), {c['epochs']} epochs, {folds} fold(s); FLOPs counted on this "
          f"CPU (torch {torch.__version__}); every hour figure is a projection")
    print()
    print("| series type | grid px | slices | crop side px | fwd GFLOP/sample | train GFLOP/sample (3x fwd) "
          "| cache bytes/sample |")
    print("|---|---|---|---|---|---|---|")
    for s, px in c["grid_px"].items():
        print(f"| {s} | {px} | {c['num_slices'][s]} | {c['crop_side_px'][s]} | {c['forward_gflop_per_sample'][s]:.2f} "
              f"| {c['train_gflop_per_sample'][s]:.2f} | {c['cache_bytes_per_sample'][s]:,} |")
    print()
    print("| condition | labelled rows | samples/epoch (one fold's training rows) | validation rows |")
    print("|---|---|---|---|")
    for cond, n in c["samples_per_epoch"].items():
        print(f"| {cond} | {c['labelled_rows'][cond]:,} | {n:,} | {c['validation_rows'][cond]:,} |")
    print()
    print(f"training FLOPs: {c['fold_pflop']:.2f} PFLOP per fold; the plan's fold ({plan['conditions'][0]}, "
          f"{plan['img_size']} px, {plan['num_slices']} slices, {plan['epochs']} epochs, same backbone) "
          f"{c['plan_fold_pflop']:.2f} PFLOP")
    print(f"ratio to the plan: fold {c['fold_ratio_to_plan']:.2f}x, run of {folds} fold(s) "
          f"{c['run_ratio_to_plan']:.2f}x the plan's five folds")
    print(f"anchor: {c['anchor']}")
    print()
    print(f"| GPU | factor over one T4 | projected h per fold | projected h for {folds} fold(s) |")
    print("|---|---|---|---|")
    for gpu, h in c["hours_projected"].items():
        print(f"| {gpu} | {h['source']} | {h['fold']:.1f} | {h['run']:.1f} |")
    print()
    print(f"crop cache: {sum(c['labelled_rows'].values()):,} samples, {c['cache_gb']:.2f} GB "
          f"({c['cache_gib']:.2f} GiB), projected")
    loc = ", ".join(f"{s} {g:.1f}" for s, g in c["test_localiser_gflop_one_fold"].items())
    print(f"hidden test: {c['test_gflop_per_study_one_fold']:.0f} GFLOP per study per fold (localisers: {loc}; "
          f"classifier {c['test_classifier_gflop_one_fold']:.0f}), x{folds} fold(s) = {c['test_gflop_per_study']:.0f}; "
          f"{c['test_studies']} studies: projected {c['test_hours_t4']:.2f} h on one T4 (per study "
          f"{c['test_cpu_seconds_per_study']:.1f} s outside the models, measured on the CPU: "
          f"{c['test_cpu_seconds_measured']}; plus {c['test_model_seconds_per_study_t4']:.2f} s of model FLOPs)")
    print("localisers' training (not in the ratio; the plan's anchor has none): "
          f"{c['localiser_train_pflop_per_fold']:.2f} PFLOP per fold, projected "
          f"{c['localiser_train_hours_t4_per_fold']:.2f} h on one T4 (FLOPs only)")
    print(f"assumed: {nb['REAL_LABELLED_ROWS']:,} labelled rows per condition (the plan's ~9.7k of {REAL_STUDIES} "
          "x 5), "
          f"{c['sagittal_slices_assumed']} slices per sagittal series")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--backbone", help="default: CONFIG's")
    p.add_argument("--conditions", nargs="+", help="default: CONFIG's")
    p.add_argument("--grid", help='per series type, e.g. "Sagittal T2/STIR=256,Sagittal T1=128,Axial T2=128" '
                                  "(default: CONFIG's img_size_by_series where set, else img_size)")
    p.add_argument("--epochs", type=int, help="default: CONFIG's")
    p.add_argument("--folds", type=int, default=5, help="folds trained (and averaged at prediction)")
    p.add_argument("--sagittal-slices", type=int, default=load_notebook()["SAGITTAL_SLICES"],
                   help="slices of a typical sagittal series (a localiser's input at prediction)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    nb = load_notebook()
    overrides = {k: v for k, v in (("backbone", a.backbone), ("conditions", a.conditions)) if v is not None}
    with contextlib.redirect_stdout(sys.stderr):  # merge_config's notes: stdout holds only the figures
        config = nb["merge_config"](nb["CONFIG"], overrides)  # rejects an unknown condition or backbone setting
    if a.epochs is not None:  # only the accounting reads it (SWA and patience settings need not follow)
        config = {**config, "epochs": a.epochs}
    grid = parse_grid(a.grid, set(nb["CONDITION_SERIES"].values())) if a.grid else None
    result = cost(config, config["backbone"], grid, a.folds, a.sagittal_slices, nb)
    if a.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return result


if __name__ == "__main__":
    main()
