# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # le3ba v9: lumbar spine degenerative classification (RSNA 2024)
#
# This notebook trains a classifier of degenerative lumbar spine conditions on MRI and writes a Kaggle submission.
# It predicts all **25 targets** of the competition: five conditions (spinal canal stenosis, left and right neural
# foraminal narrowing, left and right subarticular stenosis) at five intervertebral levels (L1/L2 to L5/S1), each as
# Normal/Mild, Moderate or Severe. The plan's own run is `conditions: ['spinal_canal_stenosis']`, at the plan's
# values (`v9_Implementation_Plan.md`); the components are described in `v9_Architecture.md`.
#
# One sample is one (study, level, condition): 7 neighbouring slices of the condition's series, cropped around the
# annotated point. The model: EfficientNet-V2-S per slice -> 2-layer bidirectional GRU over the slices ->
# attention-MIL pooling -> + level embedding -> classifier.
#
# **Use:** edit `CONFIG` (or put changes in `CONFIG_OVERRIDES`) in the parameters cell, then *Run all*. Without the
# competition data, `CONFIG_OVERRIDES = {'demo': True}` generates a small synthetic study set in the competition's
# layout and trains a CPU-sized preset. Cells tagged `defs` only define; the cells between them do the work.
#
# | section | what it does | what it writes to `output_dir` |
# |---|---|---|
# | 1 Setup | packages, CONFIG checks, GPU, paths, resume, disk | moves an earlier run to `superseded/` |
# | 2 Data tables | one row per (study, level, condition), folds | |
# | 3 Task 1.1 Dataset | DICOM -> crops, cached once; visual checks | the crop cache, `figures/` |
# | 4-6 Tasks 1.2, 1.3, 2.1 | attention-MIL, weighted loss, the model | |
# | 7 Localisers and submission (definitions) | what section 11 runs | |
# | 8 Task 3.1 Training | the folds | `fold*/` checkpoints, `progress.md` |
# | 9 Task 4.1 Metrics and plots | out-of-fold scores | `figures/` |
# | 10 Post-training analysis | attention, errors, ensemble | `figures/` |
# | 11 Localisers and submission (run) | points of unseen studies | `localisation.csv`, `submission.csv` |
# | 12 Results report | the report | `v9_Results.md`, `metrics.json`, `oof.csv` |

# %% [markdown]
# ## 1. Setup
#
# ### 1.1 Packages
# Installs only what this runtime lacks: Kaggle's and Colab's images have no pydicom. In the README's environment
# everything is present and the cell does nothing. It then checks that torchvision loads with this torch.

# %% tags=["install"]
# Installs only what this runtime lacks (Kaggle's and Colab's images have no pydicom); in the README's venv and
# in papermill runs on it everything is present and it does nothing. Standard library only: it runs before the
# imports. Then it checks that torchvision loads with this torch (a torchvision of another build fails there).
import importlib
import importlib.metadata
import importlib.util
import subprocess
from pathlib import Path

RUNTIME_PACKAGES = {  # import name: what pip installs if it is missing or older (floors: requirements.txt)
    'torch': 'torch', 'torchvision': 'torchvision', 'cv2': 'opencv-python-headless', 'numpy': 'numpy',
    'pandas': 'pandas', 'sklearn': 'scikit-learn', 'scipy': 'scipy', 'matplotlib': 'matplotlib', 'tqdm': 'tqdm',
    'pydicom': 'pydicom>=3.0.1',  # 3.0 brought pydicom.pixels; the platforms' own packages are left as they are
}
# Where attached datasets are mounted: a submission runs with Internet off, so a missing package comes from a
# wheel in one of them. Kaggle mounts a dataset at <root>/<dataset> or <root>/datasets/<owner>/<dataset>; a wheel
# is looked for there or one folder down (an uploaded folder), never deeper, so the competition's ~150k DICOM
# files (<root>/[competitions/]<competition>/train_images/<study>/<series>/) are never walked.
WHEEL_ROOTS = [Path('/kaggle/input')]
WHEEL_PATTERNS = ('*/*.whl', '*/*/*.whl', 'datasets/*/*/*.whl', 'datasets/*/*/*/*.whl')


def version_key(version):
    """'3.0.2' -> (3, 0, 2); '2.10.0+cu128' -> (2, 10, 0); '3.1rc1' -> (3, 1)."""
    key = []
    for part in version.split('+')[0].split('.')[:3]:
        digits = next((part[:i] for i in range(len(part), 0, -1) if part[:i].isdigit()), '')
        key.append(int(digits or 0))
    return tuple(key)


def missing_packages(packages=RUNTIME_PACKAGES):
    """{pip requirement: why} for each package that is absent, or older than its requirement's floor."""
    missing = {}
    for name, requirement in packages.items():
        distribution, _, floor = requirement.partition('>=')
        if importlib.util.find_spec(name) is None:
            missing[requirement] = 'not installed'
        elif floor and version_key(importlib.metadata.version(distribution)) < version_key(floor):
            missing[requirement] = (f'{distribution} {importlib.metadata.version(distribution)} is installed; '
                                    f'the notebook needs >= {floor}')
    return missing


def wheel_name(distribution):
    """How a wheel's file name spells a distribution: 'opencv-python-headless' -> 'opencv_python_headless'."""
    return distribution.replace('-', '_').replace('.', '_').lower()


def attached_wheels():
    """Every wheel file in the attached datasets (WHEEL_ROOTS, to WHEEL_PATTERNS' depth)."""
    return sorted({wheel for root in WHEEL_ROOTS for pattern in WHEEL_PATTERNS for wheel in root.glob(pattern)})


def newest_wheel(requirement, wheels):
    """The newest of `wheels` that is of `requirement`'s distribution and meets its floor, or None."""
    distribution, _, floor = requirement.partition('>=')
    versions = {}
    for wheel in wheels:
        name, version = (wheel.name.split('-') + [''])[:2]  # {distribution}-{version}-...-{platform}.whl
        if name.lower() == wheel_name(distribution) and version_key(version) >= version_key(floor or '0'):
            versions[wheel] = version_key(version)
    return max(versions, key=versions.get, default=None)


def install_error(requirements, error):
    """The error that stops the notebook when pip could not install `requirements`, saying how to get them."""
    patterns = ', '.join(f'{root}/<dataset>/{wheel_name(req.partition(">=")[0])}-*.whl'
                         for root in WHEEL_ROOTS for req in requirements)
    return RuntimeError(
        f"pip could not install {', '.join(requirements)} ({error}). Offline? On Kaggle: Settings -> Internet on, "
        f'or Add Input -> a dataset holding a wheel of each (this cell looks for {patterns}, also one folder down '
        "and under datasets/<owner>/; README: Kaggle); elsewhere: `pip install -r requirements.txt`. Then run "
        'this cell again.')


def install_missing(packages=RUNTIME_PACKAGES, run=subprocess.check_call):
    """pip-installs what missing_packages finds, from attached wheels where there are, else from pip's index,
    quietly, and says what, why and from where; offline, stops naming what it could not install."""
    import sys  # here, not above: the imports cell imports it for everything else

    missing = missing_packages(packages)
    if not missing:
        return []
    wheels = attached_wheels()
    chosen = {req: newest_wheel(req, wheels) for req in missing}
    print('Installing ' + ', '.join(f'{req} ({why}' + (f'; from {chosen[req]})' if chosen[req] else ')')
                                    for req, why in missing.items()) + ': needed by the imports below')
    # Two pip commands, not one with --find-links: the wheels go in with no index contacted (offline they still
    # install, and the error names only what had none); with --find-links pip would ask the index for them too.
    from_wheels = [req for req in missing if chosen[req]]
    from_index = [req for req in missing if not chosen[req]]
    for requirements, args in ((from_wheels, ['--no-index', *(str(chosen[req]) for req in from_wheels)]),
                               (from_index, from_index)):
        if not requirements:
            continue
        try:
            run([sys.executable, '-m', 'pip', 'install', '--quiet', *args])
        except (subprocess.CalledProcessError, OSError) as error:
            raise install_error(requirements, error) from None
    importlib.invalidate_caches()
    upgraded = [name for name, req in packages.items() if missing.get(req, 'not installed') != 'not installed']
    if any(name in sys.modules for name in upgraded):
        raise RuntimeError(f"{', '.join(upgraded)} was upgraded but the old one is already imported: restart the "
                           'runtime (Runtime -> Restart session), then Run all.')
    return list(missing)


def check_torchvision(load=importlib.import_module):
    """Imports torchvision: one built for another torch (from another index, or one of the two upgraded alone)
    fails with 'operator torchvision::nms does not exist'; stops naming both versions and the command that
    installs the torchvision of this torch (torch 2.N: torchvision 0.N+15) from torch's index (its +cpu/+cuXYZ)."""
    try:
        load('torchvision')
    except RuntimeError as error:
        if 'torchvision::' not in str(error):
            raise
        torch, vision = importlib.metadata.version('torch'), importlib.metadata.version('torchvision')
        major, minor, patch = (version_key(torch) + (0, 0))[:3]
        pin = f'==0.{minor + 15}.{patch}' if major == 2 else ''  # torch 2.14.1: 0.29.1; 2.10.0: 0.25.0
        build = torch.partition('+')[2]  # cpu, cu128, ...: PyTorch's index of that name; none: PyPI
        index = f' --index-url https://download.pytorch.org/whl/{build}' if build else ''
        raise RuntimeError(
            f'torch {torch} and torchvision {vision} come from different builds (import torchvision: {error}). '
            'Install both from one index at matching versions; to keep this torch: `pip install --force-reinstall '
            f'--no-deps torchvision{pin}{index}`, then restart the runtime (Runtime -> Restart session) and Run '
            'all (README: Install).') from None


install_missing()
check_torchvision()

# %% [markdown]
# ### 1.2 CONFIG
# Every setting of the run, with the plan's values where the plan sets one. Edit it here, or put the changes in
# `CONFIG_OVERRIDES` (papermill's parameters). An unknown key stops the run at once, naming the nearest known key.

# %% tags=["parameters"]
CONFIG = {
    # --- the plan's CONFIG, at the plan's values ---
    'seed': 42,                  # folds, initial weights, shuffling and augmentation all follow it
    'img_size': 'auto',          # side of each slice crop fed to the backbone; auto = the plan's 256 for the plan's
                                 # run (the spinal canal alone), 128 when more conditions train (issue 29: measured)
    'num_slices': 7,             # neighbouring sagittal slices per sample, odd: the annotated one in the middle
    'batch_size': 12,            # samples (x 7 slices = 84 backbone images) per optimiser step
    'epochs': 'auto',            # auto = the plan's 25 for the plan's run (the spinal canal alone, ~8-9 min each on a
                                 # Kaggle GPU by the plan); SHARED_SCHEDULE's when more conditions train (issue 29)
    'learning_rate': 1e-4,       # GRU, attention, level embedding, classifier
    'backbone_lr': 1e-5,         # 10x slower: the pretrained backbone needs only gentle adaptation
    'weight_decay': 0.03,        # AdamW decoupled decay on every parameter group
    'class_weights': [1.0, 4.0, 6.0],  # Normal/Mild, Moderate, Severe: counters ~88/6/5 % imbalance
    'freeze_backbone_epochs': 0,  # the plan trains the backbone from the first epoch
    'warmup_epochs': 'auto',     # linear LR warmup, then cosine decay (stepped per batch); auto: the plan's 2, or
                                 # SHARED_SCHEDULE's
    'clip_grad_norm': 1.0,       # max global gradient norm; the pre-clip norm is logged
    'patience': 'auto',          # early stop after this many epochs without a saved improvement; auto: the plan's 12,
                                 # or SHARED_SCHEDULE's
    'use_swa': True,             # stochastic weight averaging over the last epochs
    'swa_start_epoch': 'auto',   # 1-based: SWA averages epochs swa_start_epoch..epochs; auto: the plan's 18 (18..25),
                                 # or SHARED_SCHEDULE's
    'swa_lr': 5e-6,              # head LR during SWA; the backbone keeps its 10x smaller ratio
    'gru_hidden': 512,           # bidirectional -> 1024-d per slice
    'gru_layers': 2,             # GRU layers over the slice sequence
    'gru_dropout': 0.3,          # between the GRU layers
    'attention_hidden': 256,     # width of the attention-MIL scoring MLP
    'pooling': 'attention',      # attention | mean (the plan's Risk 1 fallback: mean over the unpadded slices)
    'dropout': 0.35,             # in the classifier head
    'num_folds': 5,              # cross-validation folds, grouped by study, stratified by label
    'train_folds': [0],          # folds to train now; list(range(5)) for the full out-of-fold run
    # --- added by this project ---
    'data_root': None,           # competition folder; None = auto-detect on Kaggle (see Setup)
    'output_dir': None,          # None = /kaggle/working/le3ba_v9 on Kaggle, ./runs/v9 elsewhere
    'cache_dir': None,           # None = <output_dir>/cache (/kaggle/temp/le3ba_v9_cache on Kaggle: ~11 GiB for
                                 # the five conditions at 128 px, ~9 GiB for the plan's run at 256 px); crops, reused
    'demo': False,               # True: generate a synthetic study set and train a short CPU preset
    'demo_studies': None,        # size of that synthetic set; None = 48 for one condition, 24 for more (a study
                                 # gives 5 samples per condition: the CPU demo of all five stays under 2x the spinal's)
    'demo_data': 'clean',        # clean: learnable in minutes | realistic: the real class mix and data quirks
                                 # (tools/make_demo_studies.py REALISTIC): tests the data handling, learns little
    'conditions': [              # train.csv column prefixes trained, each on its own series (CONDITION_SERIES):
        'spinal_canal_stenosis',  # all five, the competition's 25 targets (one model, a condition x level
        'left_neural_foraminal_narrowing', 'right_neural_foraminal_narrowing',  # embedding);
        'left_subarticular_stenosis', 'right_subarticular_stenosis'],  # ['spinal_canal_stenosis'] alone is
                                 # exactly the plan's run
    'intensity': 'minmax',       # minmax (v4's choice) | window | percentile | series_percentile | dicom: Task 1.1
    'window_center': 50,         # used by intensity='window' (the plan's literal WC/WW)
    'window_width': 350,         # (WW 350 keeps values in [-125, 225] only)
    'percentiles': (1.0, 99.0),  # used by intensity='percentile'
    'series_percentiles': (0.5, 99.5),  # intensity='series_percentile': one range per series, so a sample's
                                 # slices share one scale and a few outlier pixels do not squeeze the anatomy
    'clahe_clip': 2.0,           # CLAHE clip limit (OpenCV's default is 40; 2 is the usual for MR)
    'clahe_grid': 8,             # CLAHE tiles per side
    'crop_mm': 60.0,             # crop side in millimetres (PixelSpacing): the disc level plus
                                 # half of each neighbouring vertebral body, equal anatomy on every scanner
    'crop_mm_by_series': {'Axial T2': 30.0},  # series types cropped otherwise: 30 mm around one subarticular
                                 # recess keeps the other side's (~20 mm across the canal) out of view
    'aug_shift': 0.06,           # crop-centre jitter, fraction of the crop side (~ +/-3.6 mm)
    'aug_scale': 0.10,           # zoom in [1 - s, 1 + s]
    'aug_rotate': 10.0,          # degrees
    'aug_brightness': 0.10,      # additive, fraction of full range
    'aug_contrast': 0.20,        # multiplicative about mid-grey
    'aug_gamma': 0.20,           # gamma in [1 - g, 1 + g]
    'aug_noise': 0.02,           # Gaussian noise std, fraction of full range
    'backbone': 'efficientnet_v2_s',  # or 'mobilenet_v3_small' (CPU demos and tests only)
    'pretrained': 'imagenet',    # 'imagenet' (torchvision download) | path to a .pth file | 'none'
    'min_minority_recall': 0.20,  # save gate: min(Moderate, Severe) recall needed to save a best model
    'auto_class_weight_actions': False,  # apply the plan's class-weight actions at checkpoints 1 and 3
    'precision': 'fp16',         # autocast: fp16 (CUDA, GradScaler) | bf16 (CUDA or CPU) | fp32; CPU runs fp16 as fp32
    'compile': False,            # torch.compile the model (CUDA; faster after a slow first epoch)
    'channels_last': True,       # faster convolutions on tensor cores
    'val_every': 1,              # validate every N epochs, and always on the plan's checkpoint epochs (1, 3, 10)
                                 # and the last; 0 = only those
    'num_workers': None,         # DataLoader/cache workers; None = the CPU cores this process may use
    'prefetch_factor': 4,        # batches each loader worker keeps ready in shared memory (/dev/shm); setup
                                 # lowers it, then the workers, when /dev/shm is too small for them
    'resume': True,              # continue an interrupted fold from its last epoch checkpoint
    'time_budget_h': None,       # hours from setup after which no epoch starts that would not end in time;
                                 # the fold ends cleanly (SWA so far, else last). None = Kaggle 11 (of its
                                 # 12 h session), Colab 5 (its limit varies), local none; 0 = no limit
    'continue_from': None,       # a previous run's output folder (read-only is fine, e.g. under /kaggle/input):
                                 # its fold checkpoints are copied into output_dir and the run goes on
    'max_nonfinite_steps': 5,    # stop the run after this many skipped steps (non-finite gradient norm)
    'final_model': 'swa',        # model reported as final: swa | last | best (falls back in that order)
    'tta_shift': 'auto',         # evaluation after training and prediction: the mean softmax of five views, the crop
                                 # and the crop moved this fraction of img_size up, down, left and right (0: the crop
                                 # alone); auto: 0 for the plan's run, TTA_SHIFT with more conditions. The per-epoch
                                 # validation that selects, gates and stops early always sees the crop alone
    'holdout_frac': 0.0,         # share of studies kept out of every fold to measure a fold ensemble
                                 # honestly (0 = none, else 0.05-0.5; 0.2 keeps 1/5 of the studies aside)
    'processes': 'auto',         # training processes per fold (DistributedDataParallel): 'auto' = one per visible
                                 # GPU; 1 = this process only; N >= 2 without a GPU = N CPU processes (gloo)
    'sync_bn': False,            # BatchNorm statistics over the global batch (SyncBatchNorm, GPUs only) instead of
                                 # each process's share (batch_size / processes samples)
    # --- beyond the plan: level localiser, predicted points, Kaggle submission (section 11) ---
    'localiser': 'auto',         # on | off | auto = on when the data root holds the competition's test files
                                 # (a submission is wanted) or submit_from is set; off: the plan's path only
    'submit_from': None,         # a previous run's output folder (read-only, e.g. an attached Kaggle output):
                                 # skip training, load its fold*/final.pt and fold*/localiser.pt, write submission.csv
    'loc_size': 256,             # every sagittal slice resized to this square grid (~1.2 mm per pixel at a
                                 # 300 mm field of view); a multiple of 32 (the UNet halves it 5 times)
    'loc_channels': 16,          # UNet width after its stride-2 stem, doubled at each of its 4 levels down
    'loc_epochs': 20,            # passes over the fold's training studies
    'loc_lr': 1e-3,              # AdamW, one-cycle schedule
    'loc_batch': 4,              # studies per optimiser step (a study = all slices of its series)
    'loc_sigma': 2.0,            # target blob width in grid pixels: forgives the annotations' ~1 mm jitter
    'loc_augment': True,         # localiser training: random zoom, rotation, shift, contrast, slice order
    'loc_submit_probs': 'auto',  # auto | corrected | raw: probabilities written to submission.csv per condition
                                 # (the metric weights rows 1/2/4 by label: 'corrected' re-weights to that); auto:
                                 # per condition the candidate (raw, corrected, priors, with a fitted temperature)
                                 # with the lowest out-of-fold loss at predicted points (see the section)
}
CONFIG_OVERRIDES = {}

# %% [markdown]
# ### 1.3 Imports and the conditions table
# `CONDITION_SERIES` is the one table of what is trained: each condition of `train.csv` and the series type its
# points are annotated on. The dataset, the localisers, the scores and the submission all read it.

# %% tags=["defs"]
import contextlib
import ctypes
import datetime
import difflib
import errno
import functools
import hashlib
import inspect
import itertools
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import cv2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pydicom
import scipy.optimize
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from pydicom.pixels import apply_modality_lut
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, log_loss, recall_score
from sklearn.model_selection import StratifiedGroupKFold
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import Conv2dNormActivation
from tqdm import tqdm

# torch.cuda.is_available() asks NVML instead of initialising the CUDA driver in this kernel, which forks the
# training processes of a multi-GPU run (a child of a process that initialised CUDA cannot use it)
os.environ.setdefault('PYTORCH_NVML_BASED_CUDA_CHECK', '1')

# %% [markdown]
# The competition's names: its classes, levels and conditions, and the two crop grids of `img_size: 'auto'`.
# `DEMO_PRESET` is what `demo: True` changes: sizes that train on two CPU cores.

# %% tags=["defs"]
COMPETITION = 'rsna-2024-lumbar-spine-degenerative-classification'


# Kaggle has mounted competition data at both of these places over the years.
KAGGLE_TEMP = Path('/kaggle/temp')  # scratch disk, not saved with the notebook's output


KAGGLE_DATA_ROOTS = [Path('/kaggle/input') / COMPETITION, Path('/kaggle/input/competitions') / COMPETITION]


CLASSES = ['Normal/Mild', 'Moderate', 'Severe']


LEVELS = ['l1_l2', 'l2_l3', 'l3_l4', 'l4_l5', 'l5_s1']


SPINAL = 'spinal_canal_stenosis'


CONDITION_SERIES = {  # each condition of train.csv and the series type its points are annotated on
    SPINAL: 'Sagittal T2/STIR',
    'left_neural_foraminal_narrowing': 'Sagittal T1',  # each side on its own lateral slice
    'right_neural_foraminal_narrowing': 'Sagittal T1',
    'left_subarticular_stenosis': 'Axial T2',  # each level on its own axial slices
    'right_subarticular_stenosis': 'Axial T2',
}


PLAN_IMG_SIZE = 256  # img_size 'auto' for the plan's run: the spinal canal alone


SHARED_IMG_SIZE = 128  # img_size 'auto' for more conditions: 25 targets at 0.78x the plan's FLOPs (15 epochs); keeps
#                        the ~85-120 source pixels of a 60 mm sagittal crop (v9_Architecture.md, "The crop grid")


PLAN_SCHEDULE = {'epochs': 25, 'warmup_epochs': 2, 'swa_start_epoch': 18, 'patience': 12}  # 'auto' in the plan's run
SHARED_SCHEDULE = {'epochs': 15, 'warmup_epochs': 1, 'swa_start_epoch': 11, 'patience': 8}  # 'auto' with more
#   conditions: each epoch is 5x the plan's optimiser steps (v9_Architecture.md, "The schedule of the shared model")


TTA_SHIFT = 0.05  # tta_shift 'auto' with more conditions: five views 5 % of img_size apart (inside aug_shift's
#                   training range) halve the subarticular term's gap between predicted and annotated points
#                   (measured: v9_Architecture.md 6c, "Five views over every fold")


DEMO_PRESET = {  # small enough to train on 2 CPU cores, big enough to learn the synthetic signal
    'epochs': 10, 'img_size': 64, 'batch_size': 8, 'num_folds': 4, 'warmup_epochs': 1,
    'swa_start_epoch': 7, 'patience': 10, 'backbone': 'mobilenet_v3_small', 'pretrained': 'none',
    'gru_hidden': 64, 'attention_hidden': 32, 'learning_rate': 1e-3, 'backbone_lr': 1e-3,
    'swa_lr': 5e-4, 'output_dir': 'runs/demo',
    'localiser': 'off',  # the demo's test images are copies of training studies; 'on' adds a tiny localiser:
    'loc_size': 64, 'loc_channels': 8, 'loc_epochs': 20, 'loc_sigma': 1.0,  # ~4-5 mm per grid pixel, ~30 s per fold
}

# %% [markdown]
# ### 1.4 Settings, checked before any work
# `merge_config` applies the overrides (the demo preset first) and resolves the `'auto'` settings: the plan's 256 px
# and 25-epoch schedule for the plan's run, 128 px, `SHARED_SCHEDULE` (15 epochs) and five views at prediction
# (`TTA_SHIFT`) when more conditions train.
# `check_settings` stops on a value that would fail late, naming the key. Every warning is also kept in `WARNINGS`,
# which the report repeats.

# %% tags=["defs"]
WARNINGS = []  # every warning printed during the run, repeated in the report


def warn(message):
    WARNINGS.append(message)
    print(f'WARNING: {message}')


INTENSITY_MODES = ('minmax', 'window', 'percentile', 'series_percentile', 'dicom')


AMP_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': None}  # autocast dtype; None = float32


def merge_config(config, overrides):
    """The plan's CONFIG with overrides applied; an unknown key is an error naming the nearest valid key."""
    for key in overrides:
        if key not in config:
            near = difflib.get_close_matches(key, sorted(config), n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ''
            raise KeyError(f"Unknown CONFIG key '{key}'.{hint}")
    merged = {**config, **overrides}
    if merged['demo']:  # the preset sits under the user's own overrides
        merged = {**config, **DEMO_PRESET, **overrides}
    plan_run = list(merged['conditions']) == [SPINAL]
    if merged['img_size'] == 'auto':
        merged['img_size'] = PLAN_IMG_SIZE if plan_run else SHARED_IMG_SIZE
    for key, value in (PLAN_SCHEDULE if plan_run else SHARED_SCHEDULE).items():
        merged[key] = value if merged[key] == 'auto' else merged[key]
    if merged['tta_shift'] == 'auto':
        merged['tta_shift'] = 0.0 if plan_run else TTA_SHIFT
    choices = {'intensity': INTENSITY_MODES, 'precision': tuple(AMP_DTYPES),
               'final_model': ('swa', 'last', 'best'), 'pooling': ('attention', 'mean'),
               'demo_data': ('clean', 'realistic'), 'localiser': ('auto', 'on', 'off'),
               'loc_submit_probs': ('auto', 'corrected', 'raw')}
    for key, allowed in choices.items():
        if merged[key] not in allowed:
            raise ValueError(f"CONFIG['{key}'] = {merged[key]!r}; choose one of {allowed}")
    if merged['num_slices'] % 2 == 0:
        raise ValueError(f"CONFIG['num_slices'] = {merged['num_slices']}: use an odd number, the annotated "
                         'slice sits in the middle')
    check_settings(merged)
    return merged


def check_schedule(config):
    """The epoch settings (check_settings' part): whole numbers, SWA inside the run, and what early stopping and the
    plan's checkpoint epochs can still see, said now."""
    for key in PLAN_SCHEDULE:
        if not isinstance(config[key], int) or config[key] < (1 if key == 'epochs' else 0):
            raise ValueError(f"CONFIG['{key}'] = {config[key]!r}: give a whole number of epochs or 'auto'")
    if config['use_swa'] and config['swa_start_epoch'] > config['epochs']:
        # an error, not a warning: the run would silently report the model selected on its validation fold
        raise ValueError(f"CONFIG['swa_start_epoch'] = {config['swa_start_epoch']} > epochs = {config['epochs']} "
                         "with use_swa on: SWA would never run. Lower swa_start_epoch or set use_swa=False.")
    if not config['use_swa'] and config['final_model'] == 'swa':
        warn("use_swa is off: the final model will be 'last' (final_model 'swa' falls back to last, then best)")
    if config['use_swa'] and config['patience'] < config['epochs']:
        print(f"note: early stopping (patience {config['patience']}) cannot end the run before SWA has averaged "
              f"epochs {config['swa_start_epoch']}-{config['epochs']}")
    missed = [e for e in (1, 3, 10) if e > config['epochs']]
    if missed:
        print(f"note: the plan's checkpoint epoch(s) {missed} lie beyond epochs = {config['epochs']}: not checked")


def check_settings(config):
    """Mistakes that would otherwise fail late (after the cache build or a whole epoch) stop here, with the
    key named; settings that switch a planned feature off are legal but warned about now, not discovered
    in the report."""
    folds = config['train_folds']
    if not folds or any(not isinstance(f, int) or not 0 <= f < config['num_folds'] for f in folds):
        raise ValueError(f"CONFIG['train_folds'] = {folds!r}: each must be an integer in "
                         f"range(num_folds={config['num_folds']})")
    if len(config['class_weights']) != len(CLASSES) or min(config['class_weights']) <= 0:
        raise ValueError(f"CONFIG['class_weights'] = {config['class_weights']!r}: give {len(CLASSES)} positive "
                         f'weights, one per class {CLASSES}')
    check_schedule(config)
    if not isinstance(config['img_size'], int) or config['img_size'] <= 0:
        raise ValueError(f"CONFIG['img_size'] = {config['img_size']!r}: give a positive number of pixels or 'auto'")
    shift = config['tta_shift']
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 <= shift <= 0.2:
        raise ValueError(f"CONFIG['tta_shift'] = {shift!r}: give a fraction of img_size in [0, 0.2] (0: the crop "
                         "alone; the views stay inside the cached crop, 1.45 x img_size) or 'auto'")
    if not isinstance(config['val_every'], int) or config['val_every'] < 0:
        raise ValueError(f"CONFIG['val_every'] = {config['val_every']!r}: give a whole number of epochs >= 0 (0: "
                         "validate only on the plan's checkpoint epochs 1, 3, 10 and the last)")
    if config['holdout_frac'] != 0 and not 0.05 <= config['holdout_frac'] <= 0.5:
        raise ValueError(f"CONFIG['holdout_frac'] = {config['holdout_frac']!r}: use 0 (no hold-out) or a share of "
                         'the studies in [0.05, 0.5]: less is one of at most 20 parts of the split, more leaves the '
                         'folds fewer studies to train on than the ensemble is measured on')
    if config['pretrained'] not in ('imagenet', 'none', None) and not Path(config['pretrained']).is_file():
        raise FileNotFoundError(f"CONFIG['pretrained'] = {config['pretrained']!r}: no such file (use 'imagenet', "
                                "'none' or the path of a .pth file)")
    if config['time_budget_h'] is not None and config['time_budget_h'] < 0:
        raise ValueError(f"CONFIG['time_budget_h'] = {config['time_budget_h']}: hours (> 0), 0 for no limit, or "
                         'None for the platform default')
    if config['continue_from'] and not config['resume']:
        raise ValueError("CONFIG['continue_from'] is set but resume=False: continuing needs resume=True")
    unknown = [c for c in config['conditions'] if c not in CONDITION_SERIES]
    if not config['conditions'] or unknown or len(set(config['conditions'])) < len(config['conditions']):
        raise ValueError(f"CONFIG['conditions'] = {config['conditions']!r}: a list of distinct conditions from "
                         f'{list(CONDITION_SERIES)}')
    crops = config['crop_mm_by_series'] or {}  # None: crop_mm for every series type
    if set(crops) - set(CONDITION_SERIES.values()) or not all(float(v) > 0 for v in crops.values()):
        raise ValueError(f"CONFIG['crop_mm_by_series'] = {crops!r}: millimetres (> 0) per series type of "
                         f'{sorted(set(CONDITION_SERIES.values()))}')
    if config['localiser'] == 'on' and not config['submit_from'] and SPINAL not in config['conditions']:
        raise ValueError(f"CONFIG['localiser'] = 'on' needs {SPINAL!r} in CONFIG['conditions'] (the localiser finds "
                         'its points from the spinal canal annotations)')
    check_processes(config)
    if config['loc_size'] % 32:
        raise ValueError(f"CONFIG['loc_size'] = {config['loc_size']}: use a multiple of 32 (the localiser halves "
                         'it 5 times)')
    if config['submit_from'] and not sorted(Path(config['submit_from']).glob('fold*/final.pt')):
        raise FileNotFoundError(f"CONFIG['submit_from'] = {config['submit_from']!r}: no fold*/final.pt there (the "
                                'output folder of a finished training run; on Kaggle, attach it as an input)')


# %% [markdown]
# ### 1.5 GPUs and processes
# The GPUs are probed in a subprocess, so this kernel never initialises CUDA and can fork one training process per
# GPU. A GPU this torch cannot drive stops the run here; bf16 or `torch.compile` that it cannot do are turned down,
# loudly. Steered by `processes`, `precision` and `compile`.

# %% tags=["defs"]
def check_processes(config):
    """'processes' and 'sync_bn': the global batch stays batch_size, so it must split evenly over the processes."""
    processes, gpus = config['processes'], torch.cuda.device_count()  # NVML: no CUDA context in the kernel
    if processes != 'auto' and (isinstance(processes, bool) or not isinstance(processes, int) or processes < 1):
        raise ValueError(f"CONFIG['processes'] = {processes!r}: 'auto' (one per visible GPU) or a whole number >= 1")
    n = planned_processes(config)
    if gpus and n > gpus:
        raise ValueError(f"CONFIG['processes'] = {n}, but {gpus} GPU(s) are visible: one process per GPU at most")
    if config['batch_size'] % n:
        raise ValueError(f"CONFIG['batch_size'] = {config['batch_size']} does not split evenly over {n} processes "
                         f"(the global batch stays batch_size): use a multiple of {n}, or set processes=1")
    if not isinstance(config['sync_bn'], bool):
        raise ValueError(f"CONFIG['sync_bn'] = {config['sync_bn']!r}: True or False")
    if config['sync_bn'] and n > 1 and not gpus:
        warn('sync_bn: SyncBatchNorm runs on GPUs only; the CPU processes keep per-process BatchNorm')


def planned_processes(config):
    """Processes a fold trains on: CONFIG['processes'], 'auto' = one per visible GPU (1 without a GPU)."""
    return max(1, torch.cuda.device_count()) if config['processes'] == 'auto' else config['processes']


def cuda_restart_warning(config):
    """Said at setup, before any work: CUDA initialised in this kernel (a cell run by hand, an earlier Run all's
    one-GPU work) stops the training processes from being forked, so every fold would train on one GPU."""
    if torch.cuda.is_initialized() and planned_processes(config) > 1:
        warn(f'CUDA is already initialised in this kernel, so its {planned_processes(config)} training processes '
             'cannot be started and every fold would train on ONE GPU: restart the kernel (Run -> Restart) and '
             "Run all, or set processes=1.")


# %% [markdown]
# The probe itself: a short script run by a fresh Python. It reports each GPU's name, memory and compute
# capability, this torch's kernel architectures, and the result of one fp16 convolution and one matmul on the GPU.

# %% tags=["defs"]
# The GPU check's CUDA work runs in a subprocess: this kernel must not initialise CUDA before training, which
# forks one process per GPU from it (a forked child cannot use a CUDA context its parent made). NVML answers
# torch.cuda.is_available()/device_count() without touching the CUDA driver (PYTORCH_NVML_BASED_CUDA_CHECK,
# set with the imports).
GPU_PROBE = r'''
import importlib.util, json, torch
facts = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'arch_list': torch.cuda.get_arch_list(),
         'triton': importlib.util.find_spec('triton') is not None, 'gpus': []}
for i in range(torch.cuda.device_count()):
    capability = torch.cuda.get_device_capability(i)
    gpu = {'index': i, 'name': torch.cuda.get_device_name(i), 'capability': list(capability),
           'bf16': capability >= (8, 0), 'memory_gib': torch.cuda.get_device_properties(i).total_memory / 2**30}
    try:  # one matmul and one fp16 convolution: the kinds of kernel training needs
        x = torch.randn(2, 3, 16, 16, device=i)
        with torch.autocast('cuda', dtype=torch.float16):
            y = torch.nn.functional.conv2d(x, torch.randn(4, 3, 3, 3, device=i)).flatten(1)
        z = y.float() @ torch.randn(y.shape[1], 2, device=i)
        gpu['kernel'] = 'OK' if bool(torch.isfinite(z).all()) else 'the test kernel returned non-finite values'
    except Exception as error:
        gpu['kernel'] = f'{type(error).__name__}: {error}'.strip()[:500]
    facts['gpus'].append(gpu)
print(json.dumps(facts))
'''


NO_GPU = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'arch_list': [], 'triton': False, 'gpus': []}


KAGGLE_GPU_ADVICE = ('On Kaggle: Settings -> Accelerator -> "GPU T4 x2" or "GPU L4" (a P100 no longer works with '
                     "Kaggle's torch); on Colab: Runtime -> Change runtime type -> T4, L4 or A100; elsewhere: a "
                     'torch build whose arch list covers this GPU (pytorch.org/get-started).')


def probe_gpus(timeout=300):
    """GPU_PROBE's facts about each visible GPU (name, capability, bf16, one test kernel's outcome), from a
    subprocess; the torch build's arch list and whether triton is installed."""
    run = subprocess.run([sys.executable, '-c', GPU_PROBE], capture_output=True, text=True, timeout=timeout)
    if run.returncode != 0:
        raise RuntimeError(f'The GPU check (a subprocess) failed: {run.stderr.strip()[-2000:]}')
    return json.loads(run.stdout.strip().splitlines()[-1])


def gpu_facts():
    """probe_gpus() where a GPU is visible; NO_GPU without starting a subprocess elsewhere."""
    return probe_gpus() if torch.cuda.is_available() else NO_GPU


def arch_runs_on(arch, capability):
    """Whether code compiled for `arch` (an entry of torch.cuda.get_arch_list()) runs on a GPU of compute
    `capability` (major, minor): an sm_XY binary runs on X.Y and the later minors of major X (sm_XYa only on
    X.Y itself); compute_XY (PTX) is compiled by the driver for any capability from X.Y up."""
    kind, _, number = arch.partition('_')
    code = int(number.rstrip('af'))
    device = 10 * capability[0] + capability[1]
    if kind == 'compute':
        return device >= code
    if number.endswith('a'):
        return device == code
    return capability[0] == code // 10 and capability[1] >= code % 10


def judge_gpus(facts, config):
    """CONFIG as the visible GPUs can run it. A GPU this torch has no kernels for, or whose test kernel failed,
    stops the run here (naming it, its capability, what this torch supports and what to do); bf16 on a GPU
    without it (capability < 8.0) becomes fp16, and compile without triton or below capability 7.0 is turned
    off, each with a warning. No GPU: CONFIG unchanged (the CPU path)."""
    supported = ' '.join(facts['arch_list']) or 'no CUDA kernels'
    for gpu in facts['gpus']:
        major, minor = gpu['capability']
        where = f"GPU {gpu['index']} ({gpu['name']}, compute capability {major}.{minor})"
        if not any(arch_runs_on(arch, gpu['capability']) for arch in facts['arch_list']):
            raise RuntimeError(f"{where} cannot run this torch {facts['torch']} (CUDA {facts['cuda']}): it has kernels "
                               f"for {supported} only, none for {major}.{minor}. {KAGGLE_GPU_ADVICE}")
        if gpu['kernel'] != 'OK':
            raise RuntimeError(f"{where}: a test kernel failed with torch {facts['torch']} (kernels for {supported}): "
                               f"{gpu['kernel']}. {KAGGLE_GPU_ADVICE}")
    no_bf16 = [gpu for gpu in facts['gpus'] if not gpu['bf16']]
    if no_bf16 and config['precision'] == 'bf16':
        warn(f"precision 'bf16' needs compute capability 8.0 or newer; {no_bf16[0]['name']} has "
             f"{'.'.join(map(str, no_bf16[0]['capability']))}: running fp16 (with a GradScaler) instead")
        config = {**config, 'precision': 'fp16'}
    old = [gpu for gpu in facts['gpus'] if gpu['capability'] < [7, 0]]
    if facts['gpus'] and config['compile'] and (old or not facts['triton']):
        why = f"{old[0]['name']} is below 7.0" if old else 'triton is not installed'
        warn(f'compile needs triton and compute capability 7.0 or newer; {why}: the model runs uncompiled')
        config = {**config, 'compile': False}
    return config


def pick_device(facts):
    """cuda when the GPU check found a GPU (judge_gpus has passed it), else cpu."""
    return torch.device('cuda' if facts['gpus'] else 'cpu')


def machine_description(device, facts=None):
    """The GPUs (from the setup's GPU check: no CUDA call in this process), CPU cores and versions."""
    gpus = (facts or GPU_FACTS)['gpus']
    gpu = (', '.join(f"{g['name']} (compute capability {g['capability'][0]}.{g['capability'][1]})" for g in gpus)
           if device.type == 'cuda' else 'no GPU (float32 on CPU)')
    return f'{gpu}; {os.cpu_count()} CPU cores; torch {torch.__version__}, torchvision {torchvision.__version__}'


# %% [markdown]
# ### 1.6 Paths and the demo data
# `resolve_paths` finds the competition data (Kaggle's input folders, or `data_root`) and the output and cache
# folders, which differ on Kaggle, Colab and a local machine. With `demo: True` a synthetic study set in the
# competition's layout is generated once, the same for the same settings.

# %% tags=["defs"]
def runtime_environment():
    """'kaggle', 'colab' or 'local': decides default paths."""
    if os.environ.get('KAGGLE_KERNEL_RUN_TYPE') or Path('/kaggle/working').is_dir():
        return 'kaggle'
    if 'google.colab' in sys.modules or os.environ.get('COLAB_RELEASE_TAG'):
        return 'colab'
    return 'local'


def resolve_paths(config):
    """Fill data_root / output_dir / cache_dir; the demo generates its own study set."""
    env = runtime_environment()
    out = Path(config['output_dir'] or {'kaggle': '/kaggle/working/le3ba_v9', 'colab': '/content/le3ba_v9'}
               .get(env, 'runs/v9'))
    out.mkdir(parents=True, exist_ok=True)
    # on Kaggle the cache goes to /kaggle/temp: /kaggle/working counts against the output quota and is
    # saved with every notebook version
    cache = config['cache_dir'] or (KAGGLE_TEMP / 'le3ba_v9_cache' if env == 'kaggle' else out / 'cache')
    config = {**config, 'output_dir': str(out), 'cache_dir': str(cache)}
    if config['demo']:
        config['demo_studies'] = config['demo_studies'] or (48 if len(config['conditions']) == 1 else 24)
        config['data_root'] = str(make_demo_data(out / f"demo_data_{config['demo_studies']}_seed{config['seed']}",
                                                 config))
    elif config['data_root'] is None:
        found = [p for p in KAGGLE_DATA_ROOTS if (p / data_marker(config)).exists()]
        if not found:
            raise FileNotFoundError(
                f"No data_root given and the competition data is not under {[str(p) for p in KAGGLE_DATA_ROOTS]}. "
                "On Kaggle: Add Input -> Competitions -> RSNA 2024 Lumbar Spine. Elsewhere: set "
                "CONFIG['data_root'] to the folder holding train.csv, or use CONFIG_OVERRIDES = {'demo': True}.")
        config['data_root'] = str(found[0])
    if not (Path(config['data_root']) / data_marker(config)).exists():
        raise FileNotFoundError(f"{config['data_root']} has no {data_marker(config)}: is it the competition folder?"
                                + (' (submit_from: a data root needs only test_images/, test_series_descriptions.csv '
                                   'and sample_submission.csv)' if config['submit_from'] else ''))
    return config


def data_marker(config):
    """The file a data root must hold: train.csv to train; a submission run (submit_from) reads only the test files,
    so sample_submission.csv (Kaggle's scoring run may mount the test files alone)."""
    return 'sample_submission.csv' if config['submit_from'] else 'train.csv'


def make_demo_data(folder, config):
    """A synthetic study set in the competition's layout, from the repository's generator; one folder per preset."""
    if config['demo_data'] != 'clean':
        folder = folder.with_name(f"{folder.name}_{config['demo_data']}")
    if (folder / 'train.csv').exists():
        print(f'demo data: reusing {folder}')
        return folder
    tools = Path.cwd() / 'tools'
    if not (tools / 'make_demo_studies.py').exists():
        raise FileNotFoundError('demo=True needs tools/make_demo_studies.py: run from the repository root.')
    sys.path.insert(0, str(tools))
    from make_demo_studies import REALISTIC, make_study_set
    preset = REALISTIC if config['demo_data'] == 'realistic' else {}
    made = make_study_set(folder, n_studies=config['demo_studies'], seed=config['seed'], **preset)
    (folder / 'generator_summary.json').write_text(json.dumps(made, indent=1))  # where each quirk is
    quirks = sum(len(v) for v in made['quirks'].values())
    quirks = f"{quirks} quirks of {len(made['quirks'])} kinds (generator_summary.json)" if quirks else 'no quirks'
    print(f"demo data ({config['demo_data']}): {made['n_studies']} studies, {made['n_dicom_files']} DICOM files, "
          f"spinal canal labels {made['spinal_canal_counts']}, {quirks}, in {folder}")
    return folder


def worker_count(config):
    """CONFIG['num_workers'], else the cores this process may run on (CPU affinity / cgroup cpuset: a
    container often sees more cores than it may use)."""
    if config['num_workers'] is not None:
        return config['num_workers']
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


# %% [markdown]
# ### 1.7 Resume or start again
# A rerun with the same settings resumes each fold from its last checkpoint. A rerun whose settings change the
# results starts again, and first moves the earlier run's checkpoints, report, metrics and figures to
# `output_dir/superseded`. `continue_from` copies the folds of an earlier session's output (Kaggle).

# %% tags=["defs"]
RESUME_EXEMPT = {'resume', 'num_workers', 'prefetch_factor', 'compile', 'output_dir', 'cache_dir', 'data_root',
                 'train_folds', 'final_model', 'time_budget_h', 'continue_from', 'processes', 'localiser',
                 'submit_from', 'tta_shift'} | {k for k in CONFIG if k.startswith('loc_')}  # settings that do not
# change what the classifier trains (processes keeps the global batch: a fold started on 2 GPUs may continue on 1;
# the localiser is trained after the folds, from its own settings, saved in its own localiser.pt; a finished fold
# evaluated on other views is evaluated again: finished_fold)


RUN_OUTPUTS = ['v9_Results.md', 'metrics.json', 'oof.csv', 'figures', 'progress.md']  # written by the run


def comparable(config):
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in RESUME_EXEMPT}))


def data_fingerprint(samples):
    """Hash of the sample table and its fold assignment: a resumed fold must train and validate on the same
    rows, or studies it trained on could land in its validation fold."""
    cols = ['study_id', 'series_id', 'instance_number', 'condition', 'level', 'label', 'fold']
    return hashlib.sha256(samples[cols].to_csv(index=False).encode()).hexdigest()[:16]


def resume_check(config, fingerprint=None):
    """Before any work: which trained fold resumes and which starts again. A fold whose checkpoint was
    written with other settings (or, given `fingerprint`, other data) stops the run here, with the choices.
    What a fresh start would leave behind of an earlier run (its fold checkpoints, report, metrics,
    figures) is moved to output_dir/superseded, so that nothing of another run looks like this one's."""
    out, superseded = Path(config['output_dir']), Path(config['output_dir']) / 'superseded'

    def supersede(path):
        if path.exists():
            target = superseded / path.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            shutil.move(str(path), str(target))
            print(f'  moved {path} (an earlier run) to {target}')

    if fingerprint is None:  # the setup cell's call: nothing of this run exists yet
        for name in RUN_OUTPUTS:
            supersede(out / name)
    for fold in config['train_folds']:
        last = out / f'fold{fold}' / 'last.pt'
        if not last.exists():
            supersede(out / f'fold{fold}')
            print(f'fold {fold}: starts from epoch 1')
            continue
        if not config['resume']:
            print(f'fold {fold}: resume=False, starts again')
            supersede(out / f'fold{fold}')
            continue
        saved = torch.load(last, map_location='cpu', weights_only=False)
        changed = {k: (saved['config'].get(k), comparable(config).get(k))
                   for k in set(saved['config']) | set(comparable(config))
                   if k != 'data_fingerprint' and saved['config'].get(k) != comparable(config).get(k)}
        if changed:
            raise ValueError(
                f'fold {fold}: {last} was written with other settings {{key: (then, now)}} = {changed}. Choose: '
                'restore those settings to resume it, or set resume=False to start again (the earlier run is '
                'then moved to superseded/).')
        if fingerprint is not None and saved['config'].get('data_fingerprint') != fingerprint:
            raise ValueError(
                f'fold {fold}: the sample table or fold assignment changed since {last} was written (train.csv, '
                'holdout_frac, num_folds or cache failures): resuming would mix two validation splits. Set '
                'resume=False to start again.')
        print(f"fold {fold}: resumes after epoch {saved['state']['epoch']} (resume=False would start it again)")


FOLD_FILES = ('last.pt', 'best.pt', 'swa.pt', 'result.pt', 'final.pt')  # what continue_from takes over


def continue_from_previous(config):
    """continue_from: copy a previous run's fold checkpoints into output_dir (the previous folder, e.g. an
    attached notebook output under /kaggle/input, is only read). A fold this run already has a last.pt
    for keeps its own. resume_check then checks their settings and data like any resume."""
    if not config['continue_from']:
        return
    source, out = Path(config['continue_from']), Path(config['output_dir'])
    if source.resolve() == out.resolve():
        raise ValueError(f"continue_from = output_dir = {out}: name the previous run's folder, or leave "
                         'continue_from at None (resume=True continues a run in its own folder)')
    if not source.is_dir():
        raise FileNotFoundError(f"continue_from = {source}: no such folder (on Kaggle: Add Input -> the "
                                'notebook whose output holds the run, then its path under /kaggle/input)')
    for fold in config['train_folds']:
        files = [source / f'fold{fold}' / name for name in FOLD_FILES if (source / f'fold{fold}' / name).is_file()]
        if not files or (out / f'fold{fold}' / 'last.pt').exists():
            print(f'fold {fold}: nothing taken from {source}' + (' (this run has its own)' if files else ''))
            continue
        (out / f'fold{fold}').mkdir(parents=True, exist_ok=True)
        for path in files:
            shutil.copyfile(path, out / f'fold{fold}' / path.name)  # not copy2: the copy must be writable
        print(f"fold {fold}: took {', '.join(p.name for p in files)} from {source / f'fold{fold}'}")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# %% [markdown]
# ### 1.8 Disk and shared memory
# Checked before the first work, not discovered at hour three: the disk for the cache, checkpoints and outputs, and
# `/dev/shm` for the loader workers' batches (Docker's default 64 MiB is too small; fewer workers or a smaller
# `prefetch_factor` are chosen, and said so).

# %% tags=["defs"]
SHM = Path('/dev/shm')  # where loader workers hand their batches to this process


KAGGLE_WORKING = Path('/kaggle/working')


KAGGLE_OUTPUT_CAP = 20 * 10**9  # Kaggle keeps at most ~20 GB of a notebook's saved output (/kaggle/working)


CHECKPOINT_COPIES = 7  # weight copies a fold leaves: last.pt 4 (model, AdamW's 2 moments, SWA's average),
#                        best.pt, swa.pt and final.pt 1 each


MiB, GiB = 2**20, 2**30


def loader_shm_bytes(config, workers, prefetch):
    """Bytes the training and validation loaders can hold in /dev/shm at once: each worker keeps up to
    `prefetch` batches there, one uint8 channel each (collate_one_channel); training batches are whole
    cached crops (crop_side), evaluation batches twice as many img_size centres (with tta_pad's margin)."""
    per_sample = 256  # mask, level, label, index, augmentation parameters
    train = config['batch_size'] * (config['num_slices'] * crop_side(config) ** 2 + per_sample)
    val = 2 * config['batch_size'] * (config['num_slices'] * (config['img_size'] + 2 * tta_pad(config)) ** 2
                                      + per_sample)
    return workers * prefetch * (train + val)


def fit_shared_memory(config, workers, free):
    """(workers, prefetch) whose batches take at most half of `free` bytes of /dev/shm (the rest is left to
    other processes): the prefetch is lowered first, then the workers (0: batches are made in this process and
    nothing goes through /dev/shm), with a warning. A full /dev/shm kills a worker with a bus error."""
    prefetch = config['prefetch_factor']
    wanted = (workers, prefetch)
    while workers and loader_shm_bytes(config, workers, prefetch) > free / 2:
        prefetch, workers = (prefetch - 1, workers) if prefetch > 1 else (prefetch, workers - 1)
    if (workers, prefetch) != wanted:
        warn(f'/dev/shm has {free / MiB:.0f} MiB free; {wanted[0]} loader workers x prefetch {wanted[1]} would hold '
             f'{loader_shm_bytes(config, *wanted) / MiB:.0f} MiB there: using {workers} workers x prefetch '
             f'{prefetch} ({loader_shm_bytes(config, workers, prefetch) / MiB:.0f} MiB), slower loading. More '
             "shared memory (Docker: --shm-size=2g) restores them.")
    return workers, prefetch


def weights_bytes(config):
    """Bytes of one float32 copy of the model's weights: the backbone's features and the GRU, counted on the
    meta device (no memory, no download), plus 8 MiB for the attention and classifier head."""
    with torch.device('meta'):
        net = torchvision.models.get_model(config['backbone'])
        channels = next(m for m in net.classifier.modules() if isinstance(m, nn.Linear)).in_features
        gru = nn.GRU(channels, config['gru_hidden'], num_layers=config['gru_layers'], bidirectional=True)
    return 4 * sum(p.numel() for p in [*net.features.parameters(), *gru.parameters()]) + 8 * MiB


def folder_bytes(folder):
    folder = Path(folder)
    return sum(f.stat().st_size for f in folder.rglob('*') if f.is_file()) if folder.is_dir() else 0


def disk_needs(config, n_samples, weights):
    """{folder: bytes the run will write there}: the crop cache (uint8, samples x num_slices x crop_side^2,
    less what cache_dir holds already) and, in output_dir, each trained fold's checkpoints plus a last.pt
    being written beside its predecessor (none in a submission run: it writes crops of the test rows only)."""
    cache = n_samples * config['num_slices'] * crop_side(config) ** 2 - folder_bytes(config['cache_dir'])
    folds = 0 if config['submit_from'] else (len(config['train_folds']) * CHECKPOINT_COPIES + 4) * weights
    return {config['cache_dir']: max(cache, 0), config['output_dir']: folds}


def disk_free(folder):
    """Free bytes where `folder` is (or will be); on Kaggle, /kaggle/working also counts against the
    saved-output cap."""
    folder = Path(folder).resolve()
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if folder.is_relative_to(KAGGLE_WORKING) and runtime_environment() == 'kaggle':
        free = min(free, KAGGLE_OUTPUT_CAP - folder_bytes(KAGGLE_WORKING))
    return free


def check_disk(needs):
    """Stops the run before any work when a folder's disk (folders on one disk counted together) has less
    free space than what the run will write there, plus 10 %."""
    disks = {}
    for folder, need in needs.items():
        path = Path(folder).resolve()
        device = os.stat(next(p for p in [path, *path.parents] if p.exists())).st_dev
        disks.setdefault(device, []).append((folder, need))
    for shared in disks.values():
        need, free = sum(n for _, n in shared), disk_free(shared[0][0])
        if free < 1.1 * need:
            what = ' and '.join(f'{folder} ({n / GiB:.2f} GiB)' for folder, n in shared)
            kaggle = (f' (Kaggle keeps at most {KAGGLE_OUTPUT_CAP / 1e9:.0f} GB of saved output in {KAGGLE_WORKING})'
                      if runtime_environment() == 'kaggle' else '')
            raise OSError(f'Not enough disk: this run will write {need / GiB:.2f} GiB to {what}, and only '
                          f'{free / GiB:.2f} GiB is free there{kaggle}. Free some space, or point output_dir / '
                          'cache_dir at a larger disk, or train fewer folds per run; the crop cache shrinks with '
                          'fewer conditions (each adds its studies x 5 samples) or a smaller img_size.')


def check_resources(config, n_samples):
    """Before any work: the disk for what the run will write (check_disk), and loader workers and prefetch
    that fit the free /dev/shm (fit_shared_memory; CONFIG updated)."""
    needs = disk_needs(config, n_samples, weights_bytes(config))
    check_disk(needs)
    print('disk: ' + '; '.join(f'{folder} gets ~{need / GiB:.2f} GiB ({disk_free(folder) / GiB:.1f} GiB free)'
                               for folder, need in needs.items()))
    if not SHM.is_dir():  # no /dev/shm (macOS): torch shares through other means
        return config
    free = shutil.disk_usage(SHM).free
    workers, prefetch = fit_shared_memory(config, worker_count(config), free)
    print(f'/dev/shm: {workers} loader workers x prefetch {prefetch} hold up to '
          f'{loader_shm_bytes(config, workers, prefetch) / MiB:.0f} MiB ({free / MiB:.0f} MiB free)')
    if workers != worker_count(config):
        config = {**config, 'num_workers': workers}
    return {**config, 'prefetch_factor': prefetch}


# %% [markdown]
# ### 1.9 Run the setup
# Merges the overrides, checks the GPU, picks the paths, seeds, and says which fold resumes and which starts again.

# %% tags=["setup"]
CONFIG = merge_config(CONFIG, CONFIG_OVERRIDES)
GPU_FACTS = gpu_facts()  # from a subprocess: this kernel leaves CUDA uninitialised until training
CONFIG = judge_gpus(GPU_FACTS, CONFIG)  # stops on a GPU this torch cannot drive; bf16/compile downgraded loudly
DEVICE = pick_device(GPU_FACTS)
cuda_restart_warning(CONFIG)
CONFIG = resolve_paths(CONFIG)
seed_everything(CONFIG['seed'])
cv2.setNumThreads(1)  # parallelism comes from the loader/cache workers; set before any OpenCV call
NUM_WORKERS = worker_count(CONFIG)
OUTPUT_DIR = Path(CONFIG['output_dir'])
RUN_START = time.time()  # the time budget counts from here, across folds
SUBMIT_ONLY = bool(CONFIG['submit_from'])  # a submission run: the training sections are skipped
if not SUBMIT_ONLY:
    continue_from_previous(CONFIG)
    resume_check(CONFIG)
FIGURES = OUTPUT_DIR / 'figures'
FIGURES.mkdir(exist_ok=True)
print(f"device {DEVICE}: {machine_description(DEVICE, GPU_FACTS)}"
      + (f"; precision {CONFIG['precision']}" if DEVICE.type == 'cuda' else '')
      + f"; {NUM_WORKERS} workers; data {CONFIG['data_root']}; outputs {OUTPUT_DIR}")


# %% [markdown]
# ## 2. Data tables
#
# ### 2.1 Labels to samples
# One row per (study, level, condition) of the trained conditions, with its annotated series, instance and point.
# Every row that cannot be used is counted by reason; nothing disappears silently. Label columns take the
# competition's spellings as they are written in `train.csv`.

# %% tags=["defs"]
def official_labels(values):
    """Label cells in the official spelling: a value differing only by case or spaces is mapped, and the
    mapping is counted in a warning; an empty string is no label; other values are left for the caller to
    report as unknown, with the value."""
    official = {''.join(c.split()).lower(): c for c in CLASSES}

    def fix(value):
        key = ''.join(value.split()).lower() if isinstance(value, str) else None
        return value if key is None else official.get(key, value) if key else np.nan

    fixed = values.map(fix)
    changed = fixed.isin(CLASSES) & (fixed != values)
    if changed.any():
        pairs = (values[changed].map(repr) + ' -> ' + fixed[changed]).value_counts()
        warn(f'train.csv: {int(changed.sum())} labels normalised to the official spelling: '
             + ', '.join(f'{pair} ({n})' for pair, n in pairs.items()))
    return fixed


def rows_of_condition(cond, labels, coords, series, root):
    """One row per (study, level) of condition `cond` with its annotated series, instance and point, and the
    reason it cannot be used ('' when it can); plus the reasons of the coordinate rows left out."""
    wanted = CONDITION_SERIES[cond]
    columns = [f'{cond}_{lv}' for lv in LEVELS]
    if not set(columns) <= set(labels.columns):
        raise ValueError(f"train.csv has no columns {sorted(set(columns) - set(labels.columns))}: "
                         f"check CONFIG['conditions'] ({cond!r})")
    table = labels.melt(id_vars='study_id', value_vars=columns, var_name='column', value_name='severity')
    table['level'] = table['column'].str[len(cond) + 1:]
    table['severity'] = official_labels(table['severity'])
    # One coordinate per (study, level): a row on the condition's series type wins over rows on other series
    # (the real data has spinal levels annotated on Sagittal T1 too); among equals the first in the file.
    coords = coords[coords['condition'] == cond.replace('_', ' ').title()]
    coords = (coords.assign(level=coords['level'].str.lower().str.replace('/', '_'))
              .merge(series, on=['study_id', 'series_id'], how='left'))
    coords['on_series'] = coords['series_description'] == wanted
    coords = coords.sort_values('on_series', ascending=False, kind='stable')
    extra = coords.duplicated(['study_id', 'level'])
    kept_on_series = coords.groupby(['study_id', 'level'])['on_series'].transform('first')
    extra_reason = np.where(coords['on_series'], 'duplicate coordinate on the trained series (first kept)',
                            np.where(kept_on_series, f'coordinate on another series (ignored: one on {wanted} exists)',
                                     'duplicate coordinate on another series (first kept)'))[extra.to_numpy()]
    table = table.merge(coords[~extra].drop(columns=['on_series', 'condition']), on=['study_id', 'level'],
                        how='left')
    table['path'] = [root / 'train_images' / f'{s}/{int(r)}/{int(i)}.dcm' if pd.notna(r) and pd.notna(i) else None
                     for s, r, i in zip(table['study_id'], table['series_id'], table['instance_number'])]
    unknown = sorted(set(table['severity'].dropna()) - set(CLASSES), key=str)
    # the first matching reason wins, in this order; points outside the image need its size: preprocess_series
    reasons = [
        ('no label', table['severity'].isna()),
        *[(f'unknown label {value!r}', table['severity'] == value) for value in unknown],
        ('no coordinate', table['series_id'].isna()),
        ('series not in train_series_descriptions.csv', table['series_description'].isna()),
        (f'annotated on a series other than {wanted}', table['series_description'] != wanted),
        ('coordinate x or y missing (NaN)', table[['x', 'y']].isna().any(axis=1)),
        ('DICOM file missing', ~table['path'].map(lambda p: p is not None and p.exists())),
    ]
    table['skip'] = ''
    for reason, hit in reasons:
        table.loc[hit & (table['skip'] == ''), 'skip'] = reason
    return table.assign(condition=cond), pd.Series(extra_reason, dtype=object)


def build_sample_table(config):
    """(samples, skipped): usable rows of every condition in CONFIG['conditions'] (one per study, condition and
    level; `target_idx` = the model's condition x level embedding row), and a count of the dropped ones (label
    rows or coordinate rows) by condition and reason."""
    root = Path(config['data_root'])
    labels = pd.read_csv(root / 'train.csv')
    coords = pd.read_csv(root / 'train_label_coordinates.csv')
    series = pd.read_csv(root / 'train_series_descriptions.csv')
    tables, skipped = [], []
    for cond in config['conditions']:
        table, extra = rows_of_condition(cond, labels, coords, series, root)
        tables.append(table)
        skipped.append(pd.concat([table.loc[table['skip'] != '', 'skip'], extra]).rename('reason').to_frame()
                       .assign(condition=cond))
    table = pd.concat(tables, ignore_index=True)
    skipped = (pd.concat(skipped).value_counts(['condition', 'reason'], sort=False).rename('rows').reset_index()
               .sort_values(['condition', 'rows'], ascending=[True, False], kind='stable').reset_index(drop=True))
    samples = table[table['skip'] == ''].copy()
    if samples.empty:
        why = '; '.join(f'{c} {r}: {n}' for c, r, n in skipped.itertuples(False)) or 'train.csv has no rows'
        raise ValueError(f"No usable sample of {config['conditions']} in {root}: every (study, level) row was dropped "
                         f"({why}). Check the CSVs and CONFIG['conditions'].")
    samples['label'] = samples['severity'].map(CLASSES.index).astype(int)
    samples['level_idx'] = samples['level'].map(LEVELS.index).astype(int)
    samples['target_idx'] = samples['condition'].map(config['conditions'].index) * len(LEVELS) + samples['level_idx']
    samples[['series_id', 'instance_number']] = samples[['series_id', 'instance_number']].astype(int)
    samples['path'] = samples['path'].astype(str)
    cols = ['study_id', 'series_id', 'instance_number', 'x', 'y', 'condition', 'level', 'level_idx', 'target_idx',
            'label', 'path']
    return samples[cols].reset_index(drop=True), skipped


# %% [markdown]
# ### 2.2 Folds, the hold-out and the test rows
# Folds are grouped by study (no study on both sides) and stratified by label with scikit-learn's
# `StratifiedGroupKFold`. With `holdout_frac` > 0 some studies are seen by no fold, to measure the fold ensemble.
# The test rows are those of `sample_submission.csv`.

# %% tags=["defs"]
def assign_folds(samples, config):
    """Fold index per row: grouped by study, stratified by label; -1 marks held-out studies (holdout_frac)."""
    samples = samples.assign(fold=-1)
    pool = samples
    if config['holdout_frac'] > 0:
        pool = samples.drop(holdout_rows(samples, config))
    folds = StratifiedGroupKFold(n_splits=config['num_folds'], shuffle=True, random_state=config['seed'])
    for fold, (_, val) in enumerate(folds.split(pool, pool['label'], groups=pool['study_id'])):
        samples.loc[pool.index[val], 'fold'] = fold
    return samples


HOLDOUT_PARTS = 20  # most parts the hold-out split cuts the studies into (the split's time grows with them)


def holdout_rows(samples, config):
    """Index of the held-out rows: m of the k parts of a stratified group split, m / k within 0.005 of
    holdout_frac with k as small as that allows (1/k fractions hold out the first part, as before), else the
    nearest m / k (within 0.015 for k up to HOLDOUT_PARTS; fewer studies than that, coarser). Prints the share."""
    frac, studies = config['holdout_frac'], samples['study_id'].nunique()
    held_parts = {k: max(1, round(frac * k)) for k in range(2, max(2, min(HOLDOUT_PARTS, studies)) + 1)}
    error = {k: abs(m / k - frac) for k, m in held_parts.items()}
    k = next((k for k, e in error.items() if e <= 0.005), min(error, key=error.get))
    split = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=config['seed'] + 1)
    with warnings.catch_warnings():  # parts with fewer Severe rows than k: the union of m parts is what counts
        warnings.filterwarnings('ignore', 'The least populated class', UserWarning)
        parts = split.split(samples, samples['label'], groups=samples['study_id'])
        held = samples.index[np.concatenate([part for _, part in itertools.islice(parts, held_parts[k])])]
    count = samples.loc[held, 'study_id'].nunique()
    print(f'hold-out: {count} of {studies} studies ({count / studies:.1%}; holdout_frac {frac:g})')
    return held


def submission_studies(config):
    """The test studies of sample_submission.csv (none without it): what a submission predicts."""
    sample = Path(config['data_root']) / 'sample_submission.csv'
    if not sample.exists():
        return []
    return sorted({int(row.split('_')[0]) for row in pd.read_csv(sample, usecols=['row_id'])['row_id']})


def submission_rows(config):
    """Classifier rows a submission crops: one per test study, trained condition and level."""
    return len(submission_studies(config)) * len(config['conditions']) * len(LEVELS)


# %% [markdown]
# ### 2.3 Build the tables
# Prints the samples per fold and class, and every row left out with its reason.

# %%
if not SUBMIT_ONLY:  # a submission run reads the test files only: see section 11
    SAMPLES, SKIPPED = build_sample_table(CONFIG)
    SAMPLES = assign_folds(SAMPLES, CONFIG)
    print(f"{len(SAMPLES)} samples from {SAMPLES['study_id'].nunique()} studies; rows not used:")
    print(SKIPPED.to_string(index=False) if len(SKIPPED) else '  none')
    print(pd.crosstab(SAMPLES['fold'], SAMPLES['label'].map(dict(enumerate(CLASSES))), margins=True))

# %% [markdown]
# ## 3. Task 1.1: the DICOM dataset
#
# ### 3.1 Reading a slice
# Each slice: decode -> Rescale Slope/Intercept -> (invert MONOCHROME1) -> intensity mapping to 8 bit -> CLAHE.
#
# **Intensity mapping** departs from the plan's text. The plan names a CT soft-tissue window (WC 50 / WW 350); MR
# values run 0-4095 on a per-scanner scale, so that window saturates most of the image. The default is per-slice
# min-max, as in the plan's foundation (v4, 74.9 % BA). `window` is the plan's literal text, `percentile` a 1-99 %
# stretch, `dicom` each file's own window, and `series_percentile` one 0.5-99.5 % range for the slices a series'
# samples use. Steered by `intensity`, `window_*`, `percentiles`, `series_percentiles`, `clahe_clip`, `clahe_grid`.

# %% tags=["defs"]
PREPROCESS_KEYS = ('img_size', 'num_slices', 'intensity', 'window_center', 'window_width', 'percentiles',
                   'series_percentiles',
                   'clahe_clip', 'clahe_grid', 'crop_mm', 'crop_mm_by_series', 'conditions')


def decode_dicom(path):
    """(dataset, float32 pixels in modality units, bright = high). Errors name the file and the cause: pydicom's
    warnings while reading (e.g. a truncated file) come before the error they lead to."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        try:
            ds = pydicom.dcmread(path)
            pixels = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
        except Exception as error:  # pydicom raises many types: missing pixels, no decoder, truncated file
            # a file cut short shows as pydicom warnings (then a misleading 'no Pixel Data') or too few pixel bytes
            cause = '; '.join(dict.fromkeys(str(w.message) for w in caught))
            if cause or 'less than expected' in str(error):
                cause = f'file truncated or damaged: {cause or error}'
            raise ValueError(f'cannot read DICOM {path}: {cause or f"{type(error).__name__}: {error}"}') from error
    if pixels.ndim != 2:
        raise ValueError(f'cannot read DICOM {path}: expected one 2-D frame, got shape {pixels.shape}')
    if pixels.size and pixels.min() == pixels.max():  # nothing to see: never read as a black slice
        raise ValueError(f'cannot read DICOM {path}: blank image (every pixel {pixels.flat[0]:g})')
    if ds.get('PhotometricInterpretation') == 'MONOCHROME1':
        pixels = pixels.max() - pixels
    return ds, pixels


def intensity_range(pixels, ds, config):
    """(lo, hi) of the modality values mapped to 0..255 under CONFIG['intensity']. `pixels` may hold several
    slices: 'series_percentile' gets those of a whole series (one slice alone gives its own percentiles)."""
    mode = config['intensity']
    if mode == 'minmax':
        lo, hi = float(pixels.min()), float(pixels.max())
    elif mode == 'window':
        lo = config['window_center'] - config['window_width'] / 2
        hi = lo + config['window_width']
    elif mode in ('percentile', 'series_percentile'):
        lo, hi = np.percentile(pixels, config['percentiles' if mode == 'percentile' else 'series_percentiles'])
    elif mode == 'dicom':
        if 'WindowCenter' not in ds or 'WindowWidth' not in ds:
            raise ValueError(f"{ds.filename} has no WindowCenter/WindowWidth: use intensity='minmax'")
        center, width = (float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)
                         for v in (ds.WindowCenter, ds.WindowWidth))
        lo, hi = center - width / 2, center + width / 2
    else:
        raise ValueError(f"CONFIG['intensity'] = {mode!r}; choose one of {INTENSITY_MODES}")
    return float(lo), float(max(hi, lo + 1e-6))  # a constant image maps to black, not NaN


def map_intensity(pixels, ds, config, window=None):
    """uint8 image and the fraction of pixels clipped at either end of the range (`window`: a (lo, hi) computed
    beforehand, e.g. over the series; None: from this slice under CONFIG['intensity'])."""
    lo, hi = window or intensity_range(pixels, ds, config)
    clipped = float(np.mean((pixels < lo) | (pixels > hi)))
    return np.round(np.clip((pixels - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8), clipped


def series_window(pixels, config):
    """(lo, hi) shared by the given slices of one series under intensity='series_percentile', else None."""
    if config['intensity'] != 'series_percentile' or not pixels:
        return None
    return intensity_range(np.concatenate([p.ravel() for p in pixels]), None, config)


def apply_clahe(image, config):
    grid = config['clahe_grid']
    return cv2.createCLAHE(clipLimit=config['clahe_clip'], tileGridSize=(grid, grid)).apply(image)


def read_slice(path, config, window=None):
    """One DICOM slice as uint8 (H, W): modality LUT, intensity mapping, CLAHE."""
    ds, pixels = decode_dicom(path)
    return apply_clahe(map_intensity(pixels, ds, config, window)[0], config)


# %% [markdown]
# ### 3.2 Geometry and the crop
# Points are moved between pixels and the patient frame (mm) with the DICOM geometry tags. A crop is taken around the
# annotated point at `img_size / crop_mm` pixels per mm; shrinking averages the source pixels (INTER_AREA), so fine
# pixel spacing does not alias. The cache holds `crop_side` = 1.45 x `img_size` pixels: room for the largest
# training warp, so augmented crops have no black corners. A series type in `crop_mm_by_series` has its own field of
# view (Axial T2: 30 mm, one subarticular recess).

# %% tags=["defs"]
def slice_geometry(ds):
    """Row and column direction, position and pixel size (x, y) in mm of one slice. Errors name the file."""
    try:
        iop = np.asarray(ds.ImageOrientationPatient, float)
        position = np.asarray(ds.ImagePositionPatient, float)
        spacing_y, spacing_x = (float(v) for v in ds.PixelSpacing)  # DICOM order: between rows, columns
        if iop.shape != (6,) or position.shape != (3,) or min(spacing_x, spacing_y) <= 0:
            raise ValueError(f'orientation {list(iop)}, position {list(position)}, spacing {ds.PixelSpacing}')
    except (AttributeError, TypeError, ValueError) as error:
        raise ValueError(f'{ds.filename}: no usable slice geometry ({error})') from error
    return iop[:3], iop[3:], position, np.array([spacing_x, spacing_y])


def slice_normal(ds):
    iop = np.asarray(ds.ImageOrientationPatient, float)
    return np.cross(iop[:3], iop[3:])


def patient_point(ds, x, y):
    """Pixel (column x, row y; floats, pixel centres at integers) of a slice -> its LPS point in mm."""
    row_dir, col_dir, position, spacing = slice_geometry(ds)  # row_dir: along a row, i.e. increasing x
    return position + x * spacing[0] * row_dir + y * spacing[1] * col_dir


def pixel_point(ds, point):
    """(x, y, distance): the pixel of `point` projected onto the slice's plane and its signed distance in mm from
    the plane along the slice normal (row_dir x col_dir). DICOM's directions are unit and orthogonal."""
    row_dir, col_dir, position, spacing = slice_geometry(ds)
    offset = np.asarray(point, float) - position
    return (float(offset @ row_dir / spacing[0]), float(offset @ col_dir / spacing[1]),
            float(offset @ np.cross(row_dir, col_dir)))


def crop_slice(image, ds, point_mm, config):
    """Square crop centred on a patient-space point: crop_side(config) pixels at img_size / crop_mm pixels per
    mm (the field of view crop_mm plus the augmentation margin); black beyond the image edge. Shrinking
    averages the source: cv2.warpAffine ignores INTER_AREA (bilinear taps alias at fine pixel spacing), so
    the crop is sampled on a grid m times finer than the output, with m the smallest integer that is no
    coarser than the source, then averaged over m x m blocks (cv2.resize INTER_AREA at an integer factor)."""
    row_dir, col_dir, position, spacing = slice_geometry(ds)
    offset = point_mm - position
    centre = np.array([offset @ row_dir, offset @ col_dir]) / spacing  # (x, y) pixels on this slice
    side = crop_side(config)
    scale = config['img_size'] / (config['crop_mm'] / spacing)  # output pixels per input pixel, along x and y
    m = np.ceil(1 / scale - 1e-9).astype(int)  # per axis; 1 when the source is not finer than the output
    fine = scale * m  # fine-grid pixels per input pixel (>= 1: no aliasing); output o = fine (m o + (m - 1) / 2)
    affine = np.array([[fine[0], 0, m[0] * side / 2 - fine[0] * centre[0] + (m[0] - 1) / 2],
                       [0, fine[1], m[1] * side / 2 - fine[1] * centre[1] + (m[1] - 1) / 2]])
    crop = cv2.warpAffine(image, affine, (side * m[0], side * m[1]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA) if m.max() > 1 else crop


def series_crop(config, series):
    """config with crop_mm set to this series type's field of view (crop_mm_by_series, else crop_mm). The cached
    side in pixels is the same for every series type: only the pixels per mm differ."""
    by_series = config.get('crop_mm_by_series') or {}  # a run saved before the key: crop_mm for every series
    return {**config, 'crop_mm': float(by_series.get(series, config['crop_mm']))}


CACHE_MARGIN = 1.45  # cached side / img_size: room for the largest training warp (see crop_side)


def warp_reach(config):
    """Farthest input pixel centre, in pixels from the crop centre along x or y, that the largest training
    warp (rotation, zoom-out and shift all at their limits) reads for an img_size output."""
    half = (config['img_size'] - 1) / 2 + config['aug_shift'] * config['img_size']
    angle = math.radians(min(abs(config['aug_rotate']), 45.0))
    return half * (math.cos(angle) + math.sin(angle)) / (1 - config['aug_scale'])


def crop_side(config):
    """Side in pixels of the crops stored in the cache: img_size x CACHE_MARGIN (even, so the img_size centre
    crop is exact). Training warps the whole cached crop and keeps the img_size centre, evaluation keeps the
    centre as it is: both see crop_mm at img_size, and the warp never reaches beyond the cached pixels."""
    side = 2 * math.ceil(config['img_size'] * CACHE_MARGIN / 2)
    if warp_reach(config) > (side - 1) / 2:
        raise ValueError(f"aug_rotate={config['aug_rotate']}, aug_scale={config['aug_scale']}, aug_shift="
                         f"{config['aug_shift']} warp beyond the cached margin ({CACHE_MARGIN} x img_size): training "
                         "crops would get black corners; lower them or raise CACHE_MARGIN")
    return side


# %% [markdown]
# ### 3.3 Slice order
# Slices are ordered by ImagePositionPatient along the patient axis closest to the slice normal, in its positive
# direction: sagittal slices from the patient's right to left, axial ones from feet to head. Slice j means the same
# side in every sample, whatever the scanner's normal. Files are keyed by their name (the competition's instance
# number). A repeated stack keeps one slice per position; a step of k times the series' own spacing marks k - 1
# missing positions.

# %% tags=["defs"]
ISSUE_COLUMNS = ['study_id', 'series_id', 'condition', 'level', 'file', 'what', 'reason']  # DATA_ISSUES: a row per
#                                                                                            problem


EDGE_TOLERANCE = 0.25  # an annotated point may lie up to this fraction of crop_mm outside its image: the crop
#                        still holds at least a quarter of its side of image (real annotations near the border)


def read_series_headers(series_dir):
    """({instance: header} of the slices with usable geometry, {file name: reason} of the files skipped).
    Keyed by the file name, which is the competition's instance number (the InstanceNumber tag may differ)."""
    headers, skipped = {}, {}
    for file in sorted(Path(series_dir).glob('*.dcm')):
        try:
            instance = int(file.stem)
            with warnings.catch_warnings(record=True):  # a damaged file is reported below, not warned twice
                ds = pydicom.dcmread(file, stop_before_pixels=True)
            slice_geometry(ds)
            int(ds.Rows), int(ds.Columns)
            headers[instance] = ds
        except Exception as error:  # unreadable header, name not a number, a geometry tag missing
            skipped[file.name] = failure_text(error)
    return headers, skipped


PLANES = ('sagittal', 'coronal', 'axial')  # a slice's plane: the LPS axis its normal mostly follows (x, y, z)


def main_orientation(headers):
    """(the slices of the plane most of a series' slices share, {file: reason} for the others): an image of
    another plane inside a series (a scout, a reformat) is left out and counted, never read as a slice of the
    stack. Tilted axial blocks and oblique sagittal slices keep their plane. Ties: the plane listed first."""
    plane = {i: int(np.argmax(np.abs(slice_normal(ds)))) for i, ds in headers.items()}
    counts = np.bincount(list(plane.values()), minlength=3)
    main = int(np.argmax(counts))
    return ({i: ds for i, ds in headers.items() if plane[i] == main},
            {f'{i}.dcm': f'{PLANES[p]} image in a series of {counts[main]} {PLANES[main]} slices: not used'
             for i, p in plane.items() if p != main})


def anatomical_order(headers, normal=None):
    """The slices of `headers` ({instance: header}) in anatomical order, as sorted [(position in mm, instance)]:
    along the patient axis closest to `normal` (default: the normal of the middle slice by instance), in that
    axis's positive direction (sagittal: patient right to left, i.e. increasing LPS x; axial: feet to head), so
    that slot j is the same side in every series whatever the sign of its normal; ties: the lower instance. The
    position is ImagePositionPatient along `normal` turned to that direction where it is given (one stack's
    parallel slices: stack_slots), along the axis itself otherwise (every slice of a series, tilted blocks
    included: slice_ranks). The one definition of slice order for the classifier and the localisers."""
    axis_only = normal is None
    if axis_only:
        normal = slice_normal(headers[sorted(headers)[len(headers) // 2]])
    axis = int(np.argmax(np.abs(normal)))
    direction = np.eye(3)[axis] if axis_only else normal * np.sign(normal[axis])
    return sorted((float(np.asarray(ds.ImagePositionPatient, float) @ direction), i) for i, ds in headers.items())


def stack_slots(headers, skipped, anchor):
    """The anchor's stack in anatomical order (anatomical_order of the slices parallel to the anchor). One slice
    per position (a repeated stack keeps the anchor's acquisition and image size); a step of k times the series'
    own spacing (median step) leaves k - 1 gap slots: a (file, reason) for the slice that should be there, or
    None (padding) where no file number is missing between the two sides (a planned gap, e.g. between the
    per-disc stacks of an axial series)."""
    ref = headers[anchor]
    normal = slice_normal(ref)
    positions = anatomical_order({i: ds for i, ds in headers.items() if abs(slice_normal(ds) @ normal) > 0.99},
                                 normal)
    steps = np.diff([p for p, _ in positions])
    spacing = float(np.median(steps[steps > 0.5])) if (steps > 0.5).any() else 1.0  # < 0.5 mm: same position

    def preference(i):  # at one position: the anchor, its image size, its acquisition, the nearest number
        ds = headers[i]
        return (i != anchor, (ds.Rows, ds.Columns) != (ref.Rows, ref.Columns),
                ds.get('AcquisitionNumber') != ref.get('AcquisitionNumber'), abs(i - anchor))

    groups = []
    for p, i in positions:
        if groups and p - groups[-1][0][0] < max(0.5, 0.25 * spacing):
            groups[-1].append((p, i))
        else:
            groups.append([(p, i)])
    kept = [min(group, key=lambda item: preference(item[1])) for group in groups]
    slots = [kept[0][1]]  # instances, and (file, reason) where a slice is missing
    for (p0, a), (p1, b) in zip(kept, kept[1:]):
        gap = round((p1 - p0) / spacing) - 1
        absent = [f'{i}.dcm' for i in range(min(a, b) + 1, max(a, b)) if i not in headers][::1 if a < b else -1]
        reason = f'gap in the slice positions ({p1 - p0:.1f} mm from {a}.dcm to {b}.dcm, spacing {spacing:.1f} mm)'
        for g in range(gap if absent else 0):
            file = absent[g] if len(absent) == gap else ' or '.join(absent)
            cause = skipped.get(file, 'file missing') if len(absent) == gap else 'files missing or skipped'
            slots.append((file, f'{reason}: {cause}'))
        slots += [None] * (0 if absent else gap)
        slots.append(b)
    return slots


# %% [markdown]
# ### 3.4 The samples of a series
# **Messy data loses as little as possible.** A file without usable geometry is skipped; a neighbour that is
# missing, skipped or unreadable becomes a black slice with mask False, which the attention pooling ignores. Only a
# sample whose own slice cannot be read, or whose point lies more than a quarter of `crop_mm` outside its image, is
# dropped. Every dropped sample and every masked or skipped slice is listed in `DATA_ISSUES` with its file and
# reason.

# %% tags=["defs"]
def failure_text(error):
    """An error as an issue's reason (the notebook's ValueErrors already name the file and the cause)."""
    return str(error) if isinstance(error, ValueError) else f'{type(error).__name__}: {error}'


def mapped_slices(headers, instances, config):
    """({instance: uint8 image after the intensity mapping and CLAHE}, {instance: reason it has none}) for the
    given slices of one series. A slice that cannot be decoded or mapped (e.g. intensity='dicom' and a file
    without window tags) fails alone; 'series_percentile' takes its range over the slices that decoded."""
    decoded, failed = {}, {}
    for instance in instances:
        try:
            decoded[instance] = decode_dicom(headers[instance].filename)
        except Exception as error:
            failed[instance] = failure_text(error)
    window = series_window([pixels for _, pixels in decoded.values()], config)
    images = {}
    for instance, (ds, pixels) in decoded.items():
        try:
            images[instance] = apply_clahe(map_intensity(pixels, ds, config, window)[0], config)
        except Exception as error:
            failed[instance] = failure_text(error)
    return images, failed


def plan_samples(rows, headers, skipped, config, note):
    """{row position: ((condition, level), anchor instance, annotated point in patient mm, [(slice j, slot)])} for
    the rows of one series whose annotated file and point are usable (the others are noted as dropped samples); a
    slot is an instance, or (file, reason) for a gap (stack_slots). Padding beyond the series edge has no slot."""
    n = config['num_slices']
    plans, slots_of = {}, {}  # slots per annotated instance: levels annotated on one slice share them
    for k, (instance, x, y, *level) in enumerate(rows[['instance_number', 'x', 'y', 'condition', 'level']]
                                                 .itertuples(False)):
        file = f'{instance}.dcm'
        if instance not in headers:
            note(level, file, 'sample dropped', skipped.get(file, 'annotated file not found'))
            continue
        ds = headers[instance]
        margin = EDGE_TOLERANCE * config['crop_mm'] / slice_geometry(ds)[3]  # pixels, along x and y
        if not (-margin[0] <= x <= ds.Columns - 1 + margin[0] and -margin[1] <= y <= ds.Rows - 1 + margin[1]):
            note(level, file, 'sample dropped', f'annotated point ({x:g}, {y:g}) outside the {ds.Columns}x'
                 f'{ds.Rows} image by more than {EDGE_TOLERANCE:g} of the crop' if np.isfinite([x, y]).all()
                 else f'annotated point ({x:g}, {y:g}) is not a number')
            continue
        if instance not in slots_of:
            slots_of[instance] = stack_slots(headers, skipped, instance)
        slots = slots_of[instance]
        centre = slots.index(instance)
        plans[k] = (tuple(level), instance, patient_point(ds, x, y),
                    [(j, slots[s]) for j, s in enumerate(range(centre - n // 2, centre + n // 2 + 1))
                     if 0 <= s < len(slots) and slots[s] is not None])  # padding, not an issue
    return plans


def preprocess_series(job):
    """All samples of one series: (row ids, stacks (n, slices, S, S) uint8, masks (n, slices), issues: one dict
    of ISSUE_COLUMNS per dropped sample, masked slice and skipped file). A sample is dropped only when its own
    slice or point is unusable (unreadable, or failing in the intensity mapping or the crop); such a neighbour, or
    one that is missing or skipped, is a masked (black) slice. Headers are read once per file; pixels are decoded
    and mapped once, only for the slices some sample uses."""
    series_dir, rows, config = job
    config = series_crop(config, CONDITION_SERIES[rows['condition'].iloc[0]])
    n, size = config['num_slices'], crop_side(config)
    stacks = np.zeros((len(rows), n, size, size), np.uint8)
    masks = np.zeros((len(rows), n), bool)
    issues = []

    def note(sample, file, what, reason):  # sample: (condition, level), or ('', '') for a file of the series
        issues.append(dict(zip(ISSUE_COLUMNS, (int(rows['study_id'].iloc[0]), int(rows['series_id'].iloc[0]),
                                               *sample, file, what, reason))))

    try:
        headers, skipped = read_series_headers(series_dir)
        for file, reason in skipped.items():
            note(('', ''), file, 'slice skipped', reason)
        plans = plan_samples(rows, headers, skipped, config, note)
        images, failed = mapped_slices(headers, sorted({slot for *_, plan in plans.values() for _, slot in plan
                                                        if isinstance(slot, int)}), config)

        def crop(slot, point_mm):  # (crop, None), or (None, why this slice is unusable)
            if slot in failed:
                return None, failed[slot]
            try:
                return crop_slice(images[slot], headers[slot], point_mm, config), None
            except Exception as error:  # costs this slice of this sample only
                return None, failure_text(error)

        for k, (level, anchor, point_mm, plan) in plans.items():
            anchor_crop, why = crop(anchor, point_mm)
            if why:
                note(level, f'{anchor}.dcm', 'sample dropped', why)
                continue
            for j, slot in plan:
                if not isinstance(slot, int):  # a gap: (file, reason)
                    note(level, slot[0], 'slice masked', slot[1])
                    continue
                image, why = (anchor_crop, None) if slot == anchor else crop(slot, point_mm)
                if why:
                    note(level, f'{slot}.dcm', 'slice masked', why)
                else:
                    stacks[k, j], masks[k, j] = image, True
    except Exception as error:  # unexpected: the series' samples are reported dropped; the other series go on
        stacks[:], masks[:] = 0, False
        issues.clear()
        for sample in rows[['condition', 'level']].itertuples(False):
            note(tuple(sample), '', 'sample dropped', f'series failed: {type(error).__name__}: {error}')
    return rows.index.to_numpy(), stacks, masks, issues


# %% [markdown]
# ### 3.5 The crop cache
# Every series is decoded once, in parallel, and the crops are stored as uint8 in a memory-mapped file. The folder
# name hashes every preprocessing setting and `PREPROCESS_VERSION`, so a changed setting rebuilds and an unchanged
# rerun starts training at once. Each series' files are fingerprinted: a series replaced since the build is rebuilt,
# and said so. Steered by `cache_dir` and `num_workers`.

# %% tags=["defs"]
PREPROCESS_VERSION = 4  # part of the cache key: bump it whenever the preprocessing code changes


def cache_folder(samples, config):
    """Cache location: a hash of every preprocessing setting, of the preprocessing code's version and of
    the sample rows. The DICOM files themselves are checked per series on reuse (`series_fingerprint`)."""
    settings = {k: config[k] for k in PREPROCESS_KEYS}
    settings['data_root'] = str(Path(config['data_root']).resolve())
    settings['preprocess_version'] = PREPROCESS_VERSION
    settings['cached_side'] = crop_side(config)
    rows = samples[['study_id', 'series_id', 'instance_number', 'x', 'y']].to_csv(index=False)
    settings['rows'] = hashlib.sha1(rows.encode()).hexdigest()
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return Path(config['cache_dir']) / key, settings


def series_fingerprint(series_dir):
    """Name, size and modification time of every DICOM file of a series, hashed: cheap (no file is opened),
    and changed when a file is replaced, repaired, added or removed."""
    stats = sorted((entry.name, entry.stat().st_size, entry.stat().st_mtime_ns)
                   for entry in os.scandir(series_dir) if entry.name.endswith('.dcm'))
    return hashlib.sha1(json.dumps(stats).encode()).hexdigest()


def die_with_parent(parent_pid):
    """Pool initializer: the kernel kills this worker when the process that started it dies (Linux prctl
    PR_SET_PDEATHSIG), so a killed notebook kernel leaves no cache worker running."""
    if sys.platform.startswith('linux'):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def cache_series(jobs, samples, images, masks, workers, quiet=False):
    """Run preprocess_series on `jobs` (in `workers` forked processes) and write each series' crops and masks
    into the cache arrays, in place. Returns (slices written, issues: a list of ISSUE_COLUMNS dicts)."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('fork'), initializer=die_with_parent,
                               initargs=(os.getpid(),)) if workers > 1 else None
    issues = []
    try:
        results = pool.map(preprocess_series, jobs, chunksize=4) if pool else map(preprocess_series, jobs)
        for rows, stacks, series_masks, series_issues in tqdm(results, total=len(jobs), desc='cache (series)',
                                                              disable=quiet, mininterval=30):
            rows = samples.index.get_indexer(rows)  # index labels -> positions in the cache arrays
            images[rows], masks[rows] = stacks, series_masks
            issues += series_issues
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    images.flush()
    return int(masks[samples.index.get_indexer([r for _, group, _ in jobs for r in group.index])].sum()), issues


def build_cache(samples, config, workers, quiet=False):
    """Crops of every sample as a memory-mapped uint8 array; built once per settings, then reused. On reuse,
    a series whose DICOM files changed since (replaced, repaired) is rebuilt in place, and said so.
    Returns (samples that have a crop, images memmap, masks, issues: every dropped sample and masked or
    skipped slice with its file and reason, ISSUE_COLUMNS). `quiet`: no progress bar and no messages."""
    folder, settings = cache_folder(samples, config)
    print_ = (lambda *_: None) if quiet else print
    jobs = {str(Path(group['path'].iloc[0]).parent): group for _, group in samples.groupby(['study_id', 'series_id'])}
    fingerprints = {series_dir: series_fingerprint(series_dir) for series_dir in jobs}
    start = time.time()
    if not (folder / 'done.json').exists():
        tmp = folder.with_name(folder.name + '.partial')
        tmp.mkdir(parents=True, exist_ok=True)
        n, size = config['num_slices'], crop_side(config)
        images = np.lib.format.open_memmap(tmp / 'images.npy', 'w+', np.uint8, (len(samples), n, size, size))
        masks = np.zeros((len(samples), n), bool)
        slices, issues = cache_series([(d, group, config) for d, group in jobs.items()], samples, images, masks,
                                      workers, quiet)
        np.save(tmp / 'masks.npy', masks)
        pd.DataFrame(issues, columns=ISSUE_COLUMNS).to_csv(tmp / 'issues.csv', index=False)
        seconds = time.time() - start
        (tmp / 'done.json').write_text(json.dumps({**settings, 'seconds': seconds, 'slices': slices,
                                                   'fingerprints': fingerprints}))
        tmp.rename(folder)
        print_(f'cache built in {seconds:.0f} s: {slices / seconds:.0f} slices/s -> {folder}')
    else:
        done = json.loads((folder / 'done.json').read_text())
        changed = [d for d in jobs if done.get('fingerprints', {}).get(d) != fingerprints[d]]
        if changed:
            print_(f'cache {folder}: the DICOM files of {len(changed)} series changed since it was built '
                  f'(e.g. {changed[0]}): rebuilding those series')
            images = np.load(folder / 'images.npy', mmap_mode='r+')
            masks = np.load(folder / 'masks.npy')
            slices, new = cache_series([(d, jobs[d], config) for d in changed], samples, images, masks, workers,
                                       quiet)
            rebuilt = [int(jobs[d]['series_id'].iloc[0]) for d in changed]
            old = read_issues(folder)
            np.save(folder / 'masks.npy', masks)
            pd.concat([old[~old['series_id'].isin(rebuilt)], pd.DataFrame(new, columns=ISSUE_COLUMNS)]).to_csv(
                folder / 'issues.csv', index=False)
            # written last: a rebuild interrupted before this line is redone at the next call
            (folder / 'done.json').write_text(json.dumps({**done, 'fingerprints': fingerprints}))
            print_(f'{len(changed)} series rebuilt in {time.time() - start:.0f} s ({slices} slices)')
        else:
            print_(f'cache reused: {folder}')
    issues = read_issues(folder)
    key = ['study_id', 'condition', 'level']
    dropped = issues.loc[issues['what'] == 'sample dropped', key]
    ok = ~pd.MultiIndex.from_frame(samples[key]).isin(pd.MultiIndex.from_frame(dropped))
    kept = samples[ok].assign(cache_index=np.flatnonzero(ok))
    return kept, np.load(folder / 'images.npy', mmap_mode='r'), np.load(folder / 'masks.npy'), issues


def read_issues(folder):
    return pd.read_csv(folder / 'issues.csv', keep_default_na=False, dtype={'condition': str, 'level': str,
                                                                            'file': str})


# %% [markdown]
# ### 3.6 Augmentation and the dataset
# Training only: crop-centre shift, zoom and rotation, one transform for all slices of a sample, then gamma,
# contrast, brightness and light noise (`aug_*`). The loader workers only draw each sample's parameters (from seed,
# epoch and index) and copy uint8 bytes, so a few CPU cores keep up with the GPU. After training, evaluation can
# average five views of each crop (`tta_shift`): the crop, and the crop moved a little each way.

# %% tags=["defs"]
AUG_PARAMS = ('angle_deg', 'scale', 'shift_x', 'shift_y', 'gamma', 'contrast', 'brightness')


def draw_augmentation(rng, config):
    """The random part of the training augmentation of one sample, as AUG_PARAMS: cheap to draw in a loader
    worker. `augment_on_device` applies it to the whole batch on the GPU."""
    u = rng.uniform(-1, 1, len(AUG_PARAMS))
    return np.array([u[0] * config['aug_rotate'], 1 + u[1] * config['aug_scale'],
                     u[2] * config['aug_shift'], u[3] * config['aug_shift'],
                     1 + u[4] * config['aug_gamma'], 1 + u[5] * config['aug_contrast'],
                     u[6] * config['aug_brightness']], np.float32)


def centre_crop(images, size):
    """The size x size centre of the last two axes (array or tensor): the field of view the model sees."""
    start = (images.shape[-1] - size) // 2
    return images[..., start:start + size, start:start + size]


def tta_pad(config):
    """Pixels each side of the evaluation crop for the five views (tta_shift x img_size; 0: the crop alone)."""
    pad = round(config['tta_shift'] * config['img_size'])
    if config['img_size'] + 2 * pad > crop_side(config):
        raise ValueError(f"tta_shift={config['tta_shift']}: views {pad} px off the centre leave the cached crop "
                         f"({crop_side(config)} px at img_size {config['img_size']})")
    return pad


def views_wording(config):
    """How the evaluations after training saw each crop, for the report: '' for the crop alone."""
    pad = tta_pad(config)
    return (f", on five views of each crop (tta_shift {config['tta_shift']:g}: the crop and the crop moved {pad} px "
            "up, down, left and right, softmax averaged; the per-epoch validation saw the crop alone)") if pad else ''


TTA_STEPS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))  # the views' (row, column) moves, in units of the pad


def tta_views(images, size):
    """The views predict averages of an evaluation batch (..., S, S): the size x size centre, and when S > size the
    centre moved d = (S - size) / 2 pixels up, down, left and right (RSNADatasetV9's `pad`: TTA_STEPS x d)."""
    d = (images.shape[-1] - size) // 2
    steps = TTA_STEPS if d else TTA_STEPS[:1]
    return [images[..., d + d * dy:d + d * dy + size, d + d * dx:d + d * dx + size] for dy, dx in steps]


class RSNADatasetV9(Dataset):
    """Cached samples as uint8 (slices, 3, S, S), the plan's sample shape, plus mask, level, label and, for
    training, the sample's augmentation parameters ('aug'). Evaluation samples are the img_size centre of
    the cached crop (S = img_size); training samples are the whole cached crop (S = crop_side), which
    `to_model_input` warps and crops to img_size on the device. The pixel work (augmentation, normalisation
    for the ImageNet backbone) happens there, and the loader ships one of the 3 identical channels
    (`collate_one_channel`): a worker only copies bytes out of the memory map. The augmentation is a
    function of (seed, epoch, sample), so runs and resumes are reproducible whatever the number of workers.
    `pad` > 0 (evaluation only): the centre comes with `pad` more pixels each side, for predict's five views."""

    def __init__(self, samples, images, masks, config, train, pad=0):
        self.images, self.config, self.train, self.side = images, config, train, config['img_size'] + 2 * pad
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # seen by persistent (forked) workers
        self.cache_index = samples['cache_index'].to_numpy()
        self.study_ids = samples['study_id'].to_numpy()
        self.masks = torch.from_numpy(masks[self.cache_index])
        self.levels = torch.tensor(samples['target_idx'].to_numpy())  # the model's condition x level row
        self.labels = torch.tensor(samples['label'].to_numpy())

    def set_epoch(self, epoch):
        self.epoch.fill_(epoch)

    def __len__(self):
        return len(self.cache_index)

    def __getitem__(self, i):
        stack = self.images[self.cache_index[i]]
        stack = np.array(stack if self.train else centre_crop(stack, self.side))  # a copy, not a view
        image = torch.from_numpy(stack).unsqueeze(1).expand(-1, 3, -1, -1)
        sample = {'image': image, 'mask': self.masks[i], 'level': self.levels[i], 'label': self.labels[i], 'index': i}
        if self.train:
            rng = np.random.default_rng([self.config['seed'], int(self.epoch), i])
            sample['aug'] = torch.from_numpy(draw_augmentation(rng, self.config))
        return sample


# %% [markdown]
# ### 3.7 The model's input, on the device
# The pixel work of augmentation runs on the GPU: one affine grid per sample, then the intensity changes, the
# ImageNet normalisation and the 3 channels the backbone expects.

# %% tags=["defs"]
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 1, 3, 1, 1)


IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 1, 3, 1, 1)


@functools.lru_cache
def imagenet_stats(device):
    """IMAGENET_MEAN and IMAGENET_STD on `device`, copied once: a blocking host-to-GPU copy on every batch
    would wait for all queued GPU work each time. Made outside inference mode (predict may be the first
    caller), so training may use them too."""
    with torch.inference_mode(False):
        return IMAGENET_MEAN.to(device), IMAGENET_STD.to(device)


def collate_one_channel(batch):
    """default_collate, except that the images keep one of their 3 identical channels: (B, slices, 1, S, S).
    A third of the bytes to write into the workers' shared memory, to pin and to copy to the device;
    to_model_input broadcasts the channel back to 3 on the device."""
    return torch.utils.data.default_collate([{**sample, 'image': sample['image'][:, :1]} for sample in batch])


def augment_on_device(x, aug, mask, size):
    """Training augmentation of a float batch x (B, slices, C, S, S) in [0, 1] (S = the cached side), on x's
    device, to (B, slices, C, size, size). Per sample (aug rows, AUG_PARAMS): one rotation + zoom about the
    centre + shift (a fraction of `size`), the same for all its slices (they are neighbours in one volume;
    cv2.getRotationMatrix2D's convention), bilinear, sampled only for the size x size centre of the warped
    crop: the cached margin fills what would be black corners; then gamma, contrast about mid-grey and
    brightness. Padded slices (mask False) stay black."""
    b, n, c, s, _ = x.shape
    angle, scale, shift = torch.deg2rad(aug[:, 0]), aug[:, 1], aug[:, 2:4]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # affine_grid wants the inverse map (output -> input) in [-1, 1] coordinates, where a shift of f x size
    # is 2f; inverse of (s R p + 2f) is R^T (p - 2f) / s, then x size / s: output [-1, 1] spans size pixels
    inverse = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    theta = torch.cat([inverse, -(inverse @ (2 * shift).unsqueeze(2))], 2) * (size / s)
    grid = F.affine_grid(theta, (b, n * c, size, size), align_corners=False)
    x = F.grid_sample(x.reshape(b, n * c, s, s), grid, mode='bilinear', padding_mode='zeros',
                      align_corners=False).view(b, n, c, size, size)
    gamma, contrast, brightness = (aug[:, k].view(b, 1, 1, 1, 1) for k in (4, 5, 6))
    x = ((x.clamp(0, 1) ** gamma - 0.5) * contrast + 0.5 + brightness).clamp_(0, 1)
    return x * mask.view(b, n, 1, 1, 1)


def to_model_input(images, aug=None, mask=None, noise_std=0.0, size=None):
    """uint8 (B, slices, 3 or 1, S, S) on the device -> float (B, slices, 3, size, size) normalised for the
    ImageNet backbone (size None: S). Training batches pass the whole cached crops with their `aug`
    parameters, slice mask, Gaussian noise std and size = img_size (warp, then the centre); evaluation
    batches pass only the images (already the centre crop: RSNADatasetV9), a larger S is centre-cropped.
    Padded slices (mask False) stay black, noise included."""
    size = size or images.shape[-1]
    if aug is not None:
        x = augment_on_device(images.float().div_(255), aug.float(), mask, size)
    else:
        x = centre_crop(images, size).float().div_(255)
    if noise_std:
        noise = torch.randn_like(x[:, :, :1]) * noise_std  # same noise in the 3 identical channels
        x.add_(noise if mask is None else noise * mask.view(*mask.shape, 1, 1, 1))
    mean, std = imagenet_stats(x.device)
    return (x - mean) / std


# %% [markdown]
# ### 3.8 Task 1.1 visual checks
# The plan's validation: samples of shape (7, 3, 256, 256) at the plan's size; crops of each class for each series
# type; CLAHE really applied; and the intensity choices side by side with their clipped fraction.

# %% tags=["defs"]
def show(fig, name):
    """Save a figure under output_dir/figures and show it inline."""
    fig.tight_layout()
    fig.savefig(FIGURES / f'{name}.png', dpi=90)
    plt.show()
    plt.close(fig)


def plot_class_crops(samples, images, masks, size, name='crops_by_class'):
    """The slices of one sample per class of each trained condition as the model sees them (the img_size centre;
    padded slices marked): a group of rows per condition in `samples`, in CONDITION_SERIES' order, each on its own
    series type (the spinal canal on Sagittal T2/STIR, each foramen on Sagittal T1, each subarticular recess on
    Axial T2), a row per class the condition has. Returns the rows' (condition, class), top to bottom."""
    picks = [(condition, label, rows[rows['label'] == label].iloc[0])
             for condition in CONDITION_SERIES for rows in [samples[samples['condition'] == condition]]
             for label in range(len(CLASSES)) if (rows['label'] == label).any()]
    n = images.shape[1]
    fig, axes = plt.subplots(len(picks), n, figsize=(1.8 * n, 2.0 * len(picks)), squeeze=False)
    for ax_row, (condition, label, row) in zip(axes, picks):
        for j, ax in enumerate(ax_row):
            ax.imshow(centre_crop(images[row['cache_index'], j], size), cmap='gray', vmin=0, vmax=255)
            ax.set_title(('' if masks[row['cache_index'], j] else 'padded ') + f'slice {j - n // 2:+d}', fontsize=8)
            ax.axis('off')
        ax_row[0].text(-0.1, 0.5, f"{condition.replace('_', ' ')}\n{CONDITION_SERIES[condition]}\n"
                       f"{CLASSES[label]}\n{row['study_id']} {row['level']}",
                       transform=ax_row[0].transAxes, ha='right', va='center', fontsize=8)
    show(fig, name)
    return [(condition, label) for condition, label, _ in picks]


def plot_augmentations(samples, images, masks, config, views=6, name='augmentation'):
    """The middle slice of one training sample as cached (the img_size field of view dashed inside the
    cached margin) and as the model sees it in training epochs 1..views (the device augmentation, here run
    on the CPU; noise included). Returns the epochs shown."""
    dataset = RSNADatasetV9(samples.head(1), images, masks, config, train=True)
    middle, side, size = images.shape[1] // 2, images.shape[-1], config['img_size']
    fig, axes = plt.subplots(1, views + 1, figsize=(2.2 * (views + 1), 2.6))
    axes[0].imshow(images[samples['cache_index'].iloc[0], middle], cmap='gray', vmin=0, vmax=255)
    axes[0].add_patch(plt.Rectangle(((side - size) / 2 - 0.5,) * 2, size, size, fill=False, ls='--', color='y'))
    axes[0].set_title('cached (field of view dashed)', fontsize=8)
    epochs = list(range(1, views + 1))  # numbered as training numbers them
    for epoch, ax in zip(epochs, axes[1:]):
        dataset.set_epoch(epoch)
        item = dataset[0]
        x = to_model_input(item['image'][None], item['aug'][None], item['mask'][None], config['aug_noise'], size)
        grey = (x[0, middle, 0] * IMAGENET_STD[0, 0, 0] + IMAGENET_MEAN[0, 0, 0]).clamp(0, 1)
        ax.imshow(grey.numpy(), cmap='gray', vmin=0, vmax=1)
        angle, scale, *_ = item['aug'].tolist()
        ax.set_title(f'epoch {epoch}: {angle:+.0f} deg, x{scale:.2f}', fontsize=8)
    for ax in axes:
        ax.axis('off')
    show(fig, name)
    return epochs


def plot_preprocessing(path, config, name='intensity_and_clahe'):
    """One slice under every intensity choice, before and after CLAHE, with the clipped fraction; the
    series_percentile range comes from the slice and its neighbours (the cache: every slice its series' samples
    use). Returns {mode: clipped fraction}."""
    ds, pixels = decode_dicom(path)
    headers, skipped = read_series_headers(Path(path).parent)
    slots = stack_slots(headers, skipped, int(Path(path).stem))
    centre, half = slots.index(int(Path(path).stem)), config['num_slices'] // 2
    series = []
    for slot in slots[max(0, centre - half):centre + half + 1]:
        try:
            series.append(decode_dicom(headers[slot].filename)[1])
        except (KeyError, ValueError):  # a gap or a damaged neighbour: the range comes from the others
            pass
    windows = {'series_percentile': series_window(series, {**config, 'intensity': 'series_percentile'})}
    fig, axes = plt.subplots(2, len(INTENSITY_MODES), figsize=(3.2 * len(INTENSITY_MODES), 6.4))
    clipped = {}
    for col, mode in enumerate(INTENSITY_MODES):
        try:
            mapped, clipped[mode] = map_intensity(pixels, ds, {**config, 'intensity': mode}, windows.get(mode))
        except ValueError as error:
            axes[0, col].set_title(f'{mode}: {error}', fontsize=7)
            continue
        chosen = ' (chosen)' if mode == config['intensity'] else ''
        axes[0, col].imshow(mapped, cmap='gray', vmin=0, vmax=255)
        over = f' ({len(series)} slices)' if mode in windows else ''
        axes[0, col].set_title(f'{mode}{over}{chosen}: {clipped[mode]:.0%} clipped', fontsize=9)
        axes[1, col].imshow(apply_clahe(mapped, config), cmap='gray', vmin=0, vmax=255)
        axes[1, col].set_title('after CLAHE', fontsize=9)
    for ax in axes.flat:
        ax.axis('off')
    show(fig, name)
    if clipped.get(config['intensity'], 0) > 0.5:
        warn(f"intensity='{config['intensity']}' clips {clipped[config['intensity']]:.0%} of this slice's pixels: "
             "most of the image is saturated; 'minmax' or 'percentile' keep the anatomy")
    return clipped


# %% [markdown]
# ### 3.9 Build the cache and look at the crops
# Before the first work, the disk for what the run writes and `/dev/shm` for the loaders' batches, checked at the
# run's real sizes (section 1.8).

# %%
# Before the first work (the cache): the disk for what the run writes, and /dev/shm for the loaders' batches
CONFIG = check_resources(CONFIG, submission_rows(CONFIG) if SUBMIT_ONLY else len(SAMPLES))
NUM_WORKERS = worker_count(CONFIG)

# %% [markdown]
# Then the cache. Prints every dropped sample and masked slice with its reason, the shapes of 5 samples, and
# draws the checks.

# %%
if not SUBMIT_ONLY:  # a submission run (submit_from) trains nothing: see section 11
    SAMPLES, IMAGES, MASKS, DATA_ISSUES = build_cache(SAMPLES, CONFIG, NUM_WORKERS)
    if len(DATA_ISSUES):  # every dropped sample, masked and skipped slice, with its file and reason (in the report)
        warn('preprocessing: ' + ', '.join(f'{n} {what}' for what, n in DATA_ISSUES.groupby('what').size().items()))
        print(DATA_ISSUES.head(10).to_string(index=False)
              + (f'\n... {len(DATA_ISSUES) - 10} more: every one in v9_Results.md' if len(DATA_ISSUES) > 10 else ''))
    _masked = int((DATA_ISSUES['what'] == 'slice masked').sum())
    print(f'{len(SAMPLES)} samples cached; black slices: {_masked} masked (listed above), '
          f'{int((~MASKS[SAMPLES["cache_index"]]).sum()) - _masked} padding (beyond a series edge or in a planned gap)')
    _check = RSNADatasetV9(SAMPLES.head(5), IMAGES, MASKS, CONFIG, train=False)  # training ones carry the margin
    print('5 samples:', [tuple(_check[i]['image'].shape) for i in range(len(_check))])
    plot_class_crops(SAMPLES, IMAGES, MASKS, CONFIG['img_size'])
    plot_augmentations(SAMPLES, IMAGES, MASKS, CONFIG)
    CLIPPED = plot_preprocessing(SAMPLES['path'].iloc[0], CONFIG)


# %% [markdown]
# ## 4. Task 1.2: attention-MIL pooling over slices
# A small MLP scores each slice; a softmax over the slices gives weights that sum to 1, and the output is the
# weighted sum of slice features. Padded slices (mask False) get weight exactly 0. The weights are returned for the
# attention plots. `pooling: 'mean'` is the ablation without learned weights.

# %% tags=["defs"]
class AttentionMIL(nn.Module):
    def __init__(self, feature_dim=1024, hidden_dim=256):
        super().__init__()
        self.attention = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1))

    def forward(self, features, mask=None):
        """features (B, N, D), mask (B, N) bool -> attended (B, D), weights (B, N)."""
        scores = self.attention(features).squeeze(-1).float()  # softmax in float32 under autocast
        if mask is not None:
            scores = scores.masked_fill(~mask, float('-inf'))
        weights = F.softmax(scores, dim=1)
        return (features * weights.unsqueeze(-1).to(features.dtype)).sum(dim=1), weights


class MeanMIL(nn.Module):
    """`pooling: 'mean'`, the plan's Risk 1 fallback: the mean of the unpadded slices' features. Its
    'weights' (1/n on each unpadded slice) are fixed, not learned: the attention plots say so."""

    def forward(self, features, mask=None):
        if mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        weights = mask.float() / mask.float().sum(1, keepdim=True).clamp(min=1)
        return (features * weights.unsqueeze(-1).to(features.dtype)).sum(dim=1), weights


# %% [markdown]
# ## 5. Task 1.3: class-weighted cross entropy
# The weights live in a registered buffer, so they follow the model to the GPU and into checkpoints. PyTorch's
# weighted mean divides by the summed weights of the batch's targets. Steered by `class_weights`.

# %% tags=["defs"]
class CompetitionWeightedCE(nn.Module):
    def __init__(self, weights=(1.0, 4.0, 6.0)):
        super().__init__()
        self.register_buffer('weights', torch.tensor(weights, dtype=torch.float32))

    def forward(self, logits, labels):
        return F.cross_entropy(logits.float(), labels, weight=self.weights.float())


# %% [markdown]
# A model trained with these weights over-predicts the weighted classes by their ratio, while the official
# metric weights rows 1/2/4 by their true label. `prior_corrected` moves the probabilities to the metric's weights:
# `p * [1, 2, 4] / class_weights`, renormalised. Both are kept and scored (section 9).

# %% tags=["defs"]
PROB_COLUMNS = ['normal_mild', 'moderate', 'severe']


P_COLUMNS = [f'p_{c}' for c in PROB_COLUMNS]  # the same probabilities in oof.csv


PC_COLUMNS = [f'pc_{c}' for c in PROB_COLUMNS]  # prior-corrected for the official metric


PRIOR_COLUMNS = [f'prior_{c}' for c in PROB_COLUMNS]  # a validation row's training priors (the cost figures)


ROW_WEIGHTS = [1.0, 2.0, 4.0]  # official sample weight by true label


def prior_corrected(probs, class_weights):
    """Probabilities of a model trained with `class_weights`, re-weighted to the official metric's row weights
    (p * [1, 2, 4] / class_weights, renormalised): the minimiser of the metric's expected loss when the raw
    probabilities minimise the class-weighted cross entropy."""
    corrected = np.asarray(probs, float) * np.array(ROW_WEIGHTS) / np.asarray(class_weights, float)
    return corrected / corrected.sum(1, keepdims=True)


# %% [markdown]
# ## 6. Task 2.1: the model
# Per slice, EfficientNet-V2-S features (1280-d, average-pooled, unfrozen) -> 2-layer bidirectional GRU across the
# slices -> attention-MIL -> concat a level embedding -> classifier 1280 -> 512 -> 3. The backbone's ImageNet
# weights come from torchvision, or from an attached Kaggle dataset when the notebook has no Internet
# (`pretrained`).

# %% tags=["defs"]
BACKBONES = {  # name -> (torchvision constructor, ImageNet weights, feature channels)
    'efficientnet_v2_s': (torchvision.models.efficientnet_v2_s,
                          torchvision.models.EfficientNet_V2_S_Weights.IMAGENET1K_V1, 1280),
    'mobilenet_v3_small': (torchvision.models.mobilenet_v3_small,
                           torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1, 576),
}


HEAD_BIAS = [2.0, -2.5, -3.0]


def build_backbone(config):
    """Backbone feature extractor (torchvision `.features`) and its channel count."""
    features, channels = load_backbone(config)
    for module in features.modules():
        if isinstance(module, nn.BatchNorm2d):
            # MobileNet ships momentum 0.01 (tuned for ImageNet's 10k steps per epoch); at a few hundred
            # steps per epoch its running statistics would lag the weights and spoil validation
            module.momentum = 0.1
    return features, channels


def load_backbone(config):
    if config['backbone'] not in BACKBONES:
        raise ValueError(f"CONFIG['backbone'] = {config['backbone']!r}; choose one of {list(BACKBONES)}")
    build, imagenet, channels = BACKBONES[config['backbone']]
    weights = config['pretrained']
    if weights == 'imagenet':
        try:
            return build(weights=imagenet).features, channels
        except Exception as error:  # no internet (Kaggle scoring, offline machines), proxy, disk
            raise RuntimeError(
                f"Could not download the ImageNet weights of {config['backbone']} ({type(error).__name__}: "
                f"{error}). Offline, attach the file {imagenet.url.rsplit('/', 1)[-1]} as a Kaggle dataset "
                "and set CONFIG['pretrained'] to its path, or set 'none' to train from scratch.") from None
    net = build(weights=None)
    if weights not in (None, 'none'):
        # only the feature extractor is used: a checkpoint with another classifier head loads too
        state = torch.load(weights, map_location='cpu', weights_only=True)
        features = {k.removeprefix('features.'): v for k, v in state.items() if k.startswith('features.')}
        try:
            net.features.load_state_dict(features)  # strict: every key and shape
        except RuntimeError as error:
            raise ValueError(f"{weights} does not hold {config['backbone']} weights: {str(error)[:500]}") from None
        print(f'backbone weights loaded from {weights}')
    return net.features, channels


# %% [markdown]
# The last bias starts at [2.0, -2.5, -3.0], the plan's: softmax [0.982, 0.011, 0.007], so the untrained head
# already predicts mostly Normal/Mild, as the data are (~88 %); the class weights then pull the minority classes up.

# %% tags=["defs"]
class SpineModelV9(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.backbone, channels = build_backbone(config)
        self.gru = nn.GRU(channels, config['gru_hidden'], num_layers=config['gru_layers'], batch_first=True,
                          bidirectional=True, dropout=config['gru_dropout'] if config['gru_layers'] > 1 else 0)
        slice_dim = 2 * config['gru_hidden']
        self.attention = (AttentionMIL(slice_dim, config['attention_hidden']) if config['pooling'] == 'attention'
                          else MeanMIL())
        self.level_embedding = nn.Embedding(len(LEVELS) * len(config['conditions']), 256)  # condition x level
        self.classifier = nn.Sequential(nn.Linear(slice_dim + 256, 512), nn.ReLU(inplace=True),
                                        nn.Dropout(config['dropout']), nn.Linear(512, len(CLASSES)))
        with torch.no_grad():
            self.classifier[-1].bias.copy_(torch.tensor(HEAD_BIAS))
        self.channels_last = config['channels_last']

    def forward(self, images, levels, mask=None):
        """images (B, N, 3, H, W) normalised, levels (B,), mask (B, N) -> logits (B, 3), weights (B, N)."""
        b, n = images.shape[:2]
        x = images.flatten(0, 1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = F.adaptive_avg_pool2d(self.backbone(x), 1).flatten(1).view(b, n, -1)
        if mask is not None:  # padded slices: zero features, so their pixels cannot reach the real slices' GRU states
            features = features * mask.unsqueeze(-1).to(features.dtype)
        sequence, _ = self.gru(features)
        pooled, weights = self.attention(sequence, mask)
        logits = self.classifier(torch.cat([pooled, self.level_embedding(levels)], dim=1))
        return logits, weights


def parameter_table(model):
    """Trainable parameter count per component, from the model itself."""
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()}
    counts['total'] = sum(p.numel() for p in model.parameters())
    return pd.Series(counts, name='parameters')


# %% [markdown]
# A dummy forward checks the shapes: logits (batch, 3) and attention weights (batch, slices).

# %%
_model = SpineModelV9({**CONFIG, 'pretrained': 'none'})
print(parameter_table(_model).map('{:,}'.format).to_string())
with torch.no_grad():
    _logits, _weights = _model.eval()(torch.zeros(2, CONFIG['num_slices'], 3, 64, 64), torch.tensor([0, 4]))
print('dummy forward: logits', tuple(_logits.shape), 'attention', tuple(_weights.shape),
      'initial softmax', F.softmax(_logits[0], 0).numpy().round(3))
del _model, _logits, _weights

# %% [markdown]
# ## 7. Localisers, predicted points and the submission: definitions
# Everything the plan measures is on crops at the annotated point; test studies have no annotations. This section
# defines how their points are found and how the submission is built. It **runs in section 11**, after the analysis;
# it is defined here because training (section 8) first measures its work per study (`probe_after_training`) and
# keeps that time free in the time budget. It runs when the data holds the competition's test files, with
# `localiser: 'on'`, or with `submit_from` set.

# %% [markdown]
# ### 7.1 The localisers' tables
# One localiser per series type. `LOC_MODE` gives each a `LocMode`: a 'volume' localiser finds each level's slice
# and point in the whole series (Sagittal T2/STIR: the spinal canal, 5 maps; Sagittal T1: each foramen, 10 maps); a
# 'slice' one finds the left and right points on the slice the geometry picks per level (Axial T2). A new series
# type is a row of this table. Which series of a study: to train, the annotated one; to predict, every series of the
# type in turn, most DICOM files first, each point from the first that places it.

# %% tags=["defs"]
LOC_SLICE_SIGMA = 0.5  # target blob width across slices, in slices: the annotated slice clearly first


LOCALISER_VERSION = 3  # saved in localiser.pt: 2 = slices framed at equal mm per pixel and one orientation
#                        (fit_square), trained augmented; 3 = one localiser per series type (LOC_MODE), each slice's
#                        place in the series an input channel


class LocMode(NamedTuple):
    """How one kind of localiser reads its annotated series, trains and finds a study's points. LOC_MODE gives each
    series type one; the localisation code asks it and never tests a mode's name, so a new series type is a row of
    LOC_MODE. (The functions are called through lambdas: they are defined further down.)"""
    name: str  # what the text calls it: 'volume' or 'slice'
    per_level: bool  # False: the whole series, one map per condition and level, its softmax over every slice and
    #                  pixel (the slice and the point); True: per level the one slice the DICOM geometry places at
    #                  the level's predicted spinal canal point (axial_slice_for), one map per condition in it
    mirrored: bool  # reversing the slice order mirrors the patient left-right: augment_study may (mirror_maps)
    slots: object  # (a study's annotated rows, their anchor instance) -> what read_volumes reads of its series
    items: object  # (localiser_data's data, studies) -> (volumes, targets, keys) the localiser trains on
    points: object  # (models, folders, series, conds, canal, config, device, read, notes) -> ([(volume,
    #                 prediction)], {map index: why not placed}): one study's points on its series of the type

    def maps(self, conds):
        """The localiser's maps (output channels) for `conds`: a map per condition, for each level unless per_level."""
        return len(conds) * (1 if self.per_level else len(LEVELS))


VOLUME_LOC = LocMode('volume', per_level=False, mirrored=True, slots=lambda rows, anchor: anchor,
                     items=lambda data, studies: volume_items(data, studies),
                     points=lambda *args: sagittal_points(*args))


SLICE_LOC = LocMode('slice', per_level=True, mirrored=False, slots=lambda rows, anchor: level_instances(rows),
                    items=lambda data, studies: level_items(data, studies), points=lambda *args: axial_points(*args))


LOC_MODE = {  # series type -> how its localiser finds its conditions' points (Sagittal T2/STIR first: the axial
    #           slices are placed from its spinal canal points)
    'Sagittal T2/STIR': VOLUME_LOC,  # the slice and the point of each level
    'Sagittal T1': VOLUME_LOC,       # a foramen: its side's lateral slice
    'Axial T2': SLICE_LOC,  # per level, the slice the geometry picks from that level's predicted spinal canal point
}


LOC_OWN_KEYS = ('loc_size', 'loc_channels', 'loc_sigma')  # the localiser's own shape; with the classifier's


LOC_KEYS = LOC_OWN_KEYS + ('intensity', 'window_center', 'window_width', 'percentiles',  # preprocessing: what a
                           'series_percentiles', 'clahe_clip', 'clahe_grid')  # volume depends on


LOCALISATION = SUBMISSION_INFO = None  # this section's results; write_report adds its section when set


def localiser_wanted(config):
    """'on' / 'off', or for 'auto': on when a submission is wanted (test files in the data root, or submit_from)
    and the spinal canal is trained (its points place the axial slices; check_settings stops 'on' without it)."""
    if config['localiser'] != 'auto':
        return config['localiser'] == 'on'
    if not config['submit_from'] and has_test_files(config) and SPINAL not in config['conditions']:
        message = (f"localiser 'auto': the data root has the test files, but {SPINAL} is not trained (its points "
                   "place the axial slices and split the sides): no localiser and no submission.csv")
        if message not in WARNINGS:  # asked once before training and once after it
            warn(message)
    return bool(config['submit_from']) or (has_test_files(config) and SPINAL in config['conditions'])


def localised_series(conditions):
    """{series type: its conditions among `conditions`, in that order}, in LOC_MODE's order."""
    out = {series: [c for c in conditions if CONDITION_SERIES[c] == series] for series in LOC_MODE}
    return {series: conds for series, conds in out.items() if conds}


def map_names(conds):
    """The (condition, level index) of each point a series type's localisation gives, condition-major (a 'volume'
    localiser's maps; a 'slice' localiser has one map per condition and runs once per level)."""
    return [(c, level) for c in conds for level in range(len(LEVELS))]


def mirror_maps(conds):
    """Permutation of map_names(conds) exchanging each left condition with its right one: reversing a sagittal
    series' slice order mirrors the patient left-right. False (augment_study never reverses) when a side's mirror is
    not trained: reversed, its map would learn the other side's anatomy."""
    other = [c.replace('left_', '@').replace('right_', 'left_').replace('@', 'right_') for c in conds]
    if not set(other) <= set(conds):
        return False
    return np.concatenate([np.arange(len(LEVELS)) + conds.index(c) * len(LEVELS) for c in other])


def has_test_files(config):
    root = Path(config['data_root'])
    return all((root / name).exists() for name in ('test_series_descriptions.csv', 'test_images',
                                                     'sample_submission.csv'))


def pick_series(descriptions, study_id, images_dir, series_types):
    """{series type: the study's series folders of that type holding DICOM files, in the order they are tried: the
    most files first (ties: the lowest series_id)}. A description outside `series_types` (another sequence, an
    unknown name) is never read. The same rule for validation and test studies."""
    rows = descriptions[descriptions['study_id'] == study_id]
    out = {}
    for series in series_types:
        ids = sorted(int(s) for s in rows.loc[rows['series_description'] == series, 'series_id'])
        counts = {s: len(list((Path(images_dir) / str(study_id) / str(s)).glob('*.dcm'))) for s in ids}
        out[series] = [Path(images_dir) / str(study_id) / str(s) for s in sorted(ids, key=lambda s: -counts[s])
                       if counts[s]]
    return out


# %% [markdown]
# ### 7.2 Reading a whole series
# Each series is read through the classifier's path (`read_series_headers`, `stack_slots`, `decode_dicom`,
# `map_intensity`, `apply_clahe`), and every slice is framed on a `loc_size` square grid in one view orientation.
# Images of another plane inside a series (a scout) and blank images are left out and counted.

# %% tags=["defs"]
def read_volume(series_dir, config, anchor=None):
    """One series as the localiser sees it: slices in anatomical order (stack_slots around `anchor`, default the
    middle file), each framed by frame_slots. Raises ValueError when no slice is usable."""
    headers, skipped = read_series_headers(series_dir)
    if not headers:
        raise ValueError(f'{series_dir}: no readable slice ({len(skipped)} files skipped'
                         + (f', e.g. {next(iter(skipped.values()))})' if skipped else ')'))
    headers, other = main_orientation(headers)
    skipped = {**skipped, **other}
    anchor = anchor if anchor in headers else sorted(headers)[len(headers) // 2]
    slots = stack_slots(headers, skipped, anchor)
    gaps = [slot for slot in slots if isinstance(slot, tuple)]  # (file, reason): a skipped file in a gap names it
    issues = [(f, why) for f, why in skipped.items() if f not in {g for g, _ in gaps}] + gaps
    return frame_slots(headers, slots, config, series_dir, issues)


def read_slices(series_dir, config, instances):
    """The given instances of a series, one slot each in the given order (-1: an empty slot), framed by
    frame_slots: the axial localiser's input, a slice per level. A missing or skipped file is an empty slot and an
    issue. Raises ValueError when no slice is usable."""
    headers, skipped = read_series_headers(series_dir)
    slots = [None if i < 0 else i if i in headers else (f'{i}.dcm', skipped.get(f'{i}.dcm', 'file missing'))
             for i in instances]
    if not any(isinstance(slot, int) for slot in slots):
        raise ValueError(f'{series_dir}: none of the slices {list(instances)} is readable')
    return frame_slots(headers, slots, config, series_dir, [slot for slot in slots if isinstance(slot, tuple)])


def frame_slots(headers, slots, config, series_dir, issues):
    """Slots (an instance, or None / (file, reason) for an empty one) decoded through the classifier's path and
    each framed on the loc_size square at equal mm per grid pixel along x and y, in one view orientation
    (fit_square). Returns {'image' uint8 (n, S, S), 'valid' (n,) bool, 'instance' (n,) int (-1 in an empty slot
    or for an unreadable file), 'to_grid' (n, 4) (kx, ox, ky, oy): grid u + 0.5 = kx (x + 0.5) + ox (v likewise),
    'image_shape' (n, 2) rows, columns, 'spacing' (n, 2) mm per series pixel along x, y, 'centre_mm' (n, 3) each
    image centre's patient point (NaN: none), 'series_dir', 'issues': [(file, reason)]}."""
    size, ref = config['loc_size'], headers[next(slot for slot in slots if isinstance(slot, int))]
    n = len(slots)
    volume = {'image': np.zeros((n, size, size), np.uint8), 'valid': np.zeros(n, bool), 'instance': np.full(n, -1),
              'to_grid': np.tile([size / int(ref.Columns), 0.0, size / int(ref.Rows), 0.0], (n, 1)),
              'image_shape': np.tile([int(ref.Rows), int(ref.Columns)], (n, 1)),
              'spacing': np.tile(slice_geometry(ref)[3], (n, 1)), 'centre_mm': np.full((n, 3), np.nan),
              'series_dir': str(series_dir), 'issues': issues}
    images, failed = mapped_slices(headers, [slot for slot in slots if isinstance(slot, int)], config)
    volume['issues'] += [(f'{instance}.dcm', reason) for instance, reason in failed.items()]
    if not images:
        raise ValueError(f'{series_dir}: no slice could be decoded ({len(failed)} tried, e.g. '
                         f'{next(iter(failed.values()), "none")})')
    for j, image in ((j, images[slot]) for j, slot in enumerate(slots) if isinstance(slot, int) and slot in images):
        row_dir, col_dir, _, volume['spacing'][j] = slice_geometry(headers[slots[j]])
        volume['image'][j], volume['to_grid'][j] = fit_square(image, volume['spacing'][j], size,
                                                              view_flips(row_dir, col_dir))
        volume['image_shape'][j] = image.shape
        volume['centre_mm'][j] = patient_point(headers[slots[j]], (image.shape[1] - 1) / 2, (image.shape[0] - 1) / 2)
        volume['valid'][j], volume['instance'][j] = True, slots[j]
    return volume


VIEW_AXES = np.array([1.0, 1.0, -1.0])  # grid columns and rows run toward patient left, posterior and feet (LPS
#   signs): a sagittal slice faces left, head up; an axial one is seen from the feet, the patient's left on the right


def view_flips(row_dir, col_dir):
    """(mirror x, mirror y) for fit_square: each in-plane direction turned to VIEW_AXES along the patient axis it
    mostly follows."""
    return tuple(bool(d[k] * VIEW_AXES[k] < 0) for d in (row_dir, col_dir) for k in [int(np.argmax(np.abs(d)))])


def one_slot(volume, j):
    """Slot j of a volume as a volume of its own (an axial level's slice for the 'slice' localiser)."""
    return {**volume, **{k: volume[k][j:j + 1] for k in ('image', 'valid', 'instance', 'to_grid', 'image_shape',
                                                          'spacing', 'centre_mm')}}


def fit_square(image, spacing, size, flip=(False, False)):
    """(size x size uint8, (kx, ox, ky, oy)): `image` shrunk (INTER_AREA) to the same mm per pixel along x and y
    (`spacing`), its longer side filling the square, centred, black around, and mirrored along x / y where `flip`
    says; u + 0.5 = kx (x + 0.5) + ox (kx < 0: mirrored). Anatomy keeps its shape and its side whatever the matrix
    (384 x 640), pixel aspect or in-plane orientation: the UNet sees one spine, as a radiologist's viewer shows it."""
    rows, cols = image.shape
    mm = max(cols * spacing[0], rows * spacing[1]) / size  # mm per grid pixel
    width, height = (max(1, min(size, round(n * sp / mm))) for n, sp in ((cols, spacing[0]), (rows, spacing[1])))
    ox, oy = (size - width) // 2, (size - height) // 2
    shrunk = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)[::-1 if flip[1] else 1,
                                                                             ::-1 if flip[0] else 1]
    out = np.zeros((size, size), np.uint8)
    out[oy:oy + height, ox:ox + width] = shrunk
    kx, ky = width / cols, height / rows
    return out, (-kx if flip[0] else kx, ox + width if flip[0] else ox, -ky if flip[1] else ky,
                 oy + height if flip[1] else oy)


def read_volume_job(job):
    """(key, volume or the error text) for a job (key, series_dir, anchor, config): an unreadable series is
    reported by the caller and the others go on. An anchor list reads those slices (read_slices)."""
    key, series_dir, anchor, config = job
    try:
        read = read_slices if isinstance(anchor, list) else read_volume
        return key, read(series_dir, config, anchor)
    except Exception as error:
        return key, f'{type(error).__name__}: {error}'


def read_volumes(jobs, config, workers):
    """{key: volume or error text} for jobs [(key, series_dir, anchor)], read in `workers` forked processes."""
    jobs = [(*job, config) for job in jobs]
    if workers <= 1 or len(jobs) < 2:
        return dict(map(read_volume_job, jobs))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('fork'), initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        return dict(tqdm(pool.map(read_volume_job, jobs, chunksize=2), total=len(jobs), desc='localiser volumes',
                         mininterval=30))


# %% [markdown]
# ### 7.3 The localiser model and its targets
# A small UNet sees each slice with its two neighbours and its place in the series, and draws one heatmap per
# point. Targets are Gaussian blobs (`loc_sigma`) at the points of `train_label_coordinates.csv`; the loss is one
# softmax per map over all slices and pixels.

# %% tags=["defs"]
def grid_point(volume, j, x, y):
    """Series pixel (x, y) on slot j -> loc grid (u, v) (pixel centres map to pixel centres)."""
    kx, ox, ky, oy = volume['to_grid'][j]
    return kx * (x + 0.5) + ox - 0.5, ky * (y + 0.5) + oy - 0.5


def series_point(volume, j, u, v):
    kx, ox, ky, oy = volume['to_grid'][j]
    return (u + 0.5 - ox) / kx - 0.5, (v + 0.5 - oy) / ky - 0.5


def level_targets(volume, rows, conds=(SPINAL,)):
    """(maps, 3) float array of (slot, u, v) per map_names(conds) from annotated rows (instance_number, x, y,
    condition, level_idx); NaN where a point has no annotation or its slice is not in the volume."""
    index = {m: k for k, m in enumerate(map_names(list(conds)))}
    targets = np.full((len(index), 3), np.nan)
    slot_of = {int(i): j for j, i in enumerate(volume['instance']) if i >= 0}
    for instance, x, y, cond, level in rows[['instance_number', 'x', 'y', 'condition', 'level_idx']].itertuples(False):
        if int(instance) in slot_of and (cond, level) in index:
            j = slot_of[int(instance)]
            targets[index[cond, level]] = (j, *grid_point(volume, j, x, y))
    return targets


def conv_block(cin, cout):
    return nn.Sequential(Conv2dNormActivation(cin, cout, 3), Conv2dNormActivation(cout, cout, 3))


class LevelLocaliser(nn.Module):
    """A small UNet: (slices, 4, S, S) -> (slices, levels, S, S) logits, one map per point (a level, or a side's
    level). Input channels: each slice and its two neighbours (the slice choice sees the canal fade across slices),
    the slice's place in the series, -1 (patient right) .. 1 (left) (the two foramina look alike: their side tells
    them apart), plus the pixel's row and column position in [-1, 1] (five discs look alike: where a disc sits in
    the image tells the levels apart, beside the column's ends). A stride-2 stem keeps the work at half
    resolution; the logits are upsampled at the end."""

    def __init__(self, width, levels=5, depth=4):
        super().__init__()
        widths = [width * 2 ** i for i in range(depth + 1)]
        self.stem = Conv2dNormActivation(6, widths[0], 3, stride=2)
        self.down = nn.ModuleList([conv_block(widths[0], widths[0])] + [conv_block(widths[i], widths[i + 1])
                                                                        for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(depth)])
        self.merge = nn.ModuleList([conv_block(2 * widths[i], widths[i]) for i in range(depth)])
        self.head = nn.Conv2d(widths[0], levels, 1)

    def forward(self, x):
        n, _, h, w = x.shape
        rows = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(n, 1, h, w)
        cols = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(n, 1, h, w)
        x = self.stem(torch.cat([x, rows, cols], 1))
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for i in reversed(range(len(self.up))):
            x = self.merge[i](torch.cat([self.up[i](x), skips[i]], 1))
        return F.interpolate(self.head(x), size=(h, w), mode='bilinear', align_corners=False)


def neighbour_channels(x):
    """float slices (n, S, S) in [0, 1] -> (n, 4, S, S) normalised: each slice between its neighbours (black beyond
    the first and last), then its place in the series from -1 (first) to 1 (last; 0 for a single slice)."""
    n = len(x)
    place = torch.linspace(-1, 1, n, device=x.device) if n > 1 else torch.zeros(1, device=x.device)
    x = F.pad((x - 0.5) / 0.25, (0, 0, 0, 0, 1, 1), value=-2.0)
    return torch.stack([x[:-2], x[1:-1], x[2:], place.view(n, 1, 1).expand_as(x[1:-1])], 1)


def volume_input(volume, device):
    """A volume's uint8 slices (n, S, S) -> the localiser's input (n, 4, S, S)."""
    return neighbour_channels(torch.from_numpy(volume['image']).to(device).float().div_(255))


# %% [markdown]
# Training views: the classifier's augmentation with wider ranges, the slice order reversed half the time (the
# patient mirrored), and, for the sagittal localisers, the spine shifted up to 30 % of the image and a share of views
# framed tightly at the top or bottom level, as some real series are. Without those the localiser names a level by
# its height in the image, and puts every level of a series that starts just above L1/L2 one disc low.

# %% tags=["defs"]
LOC_AUGMENT = {'aug_rotate': 10.0, 'aug_scale': 0.2, 'aug_shift': 0.1}  # over the classifier's aug_* settings: whole
#     series differ more in field of view and where the spine sits than crops around a point do
LOC_SPINE_SHIFT = 0.3  # a volume localiser's shift range (of the image's side, LOC_AUGMENT's 0.1 elsewhere): where
#     a disc sits in the image says little of which disc it is
LOC_EDGE_VIEWS = (0.3, 0.05)  # a volume localiser's views framed tightly (edge_view): their share, and the most
#     grid left beyond the end level (a fraction of its rows); real series sometimes start just above L1/L2


def augment_study(volume, target, rng, config, device, mirror=None, spine=False):
    """One training view of a study: (input (n, 4, S, S), target (maps, 3), valid (n,)). With `spine` (maps of
    levels down the spine), a share of the views framed tightly first (edge_view), and shifts up to LOC_SPINE_SHIFT.
    Then the classifier's augmentation (draw_augmentation, augment_on_device: one zoom, rotation and shift for all
    slices, then gamma, contrast and brightness) with LOC_AUGMENT's ranges, so the row/column channels stop being a
    shortcut; the slice order is reversed half the time, the patient mirrored left-right: `mirror` permutes the
    maps to match (mirror_maps; None: none to exchange; False: never reversed). Targets move with the image; a point
    pushed out of view is dropped."""
    size, valid = volume['image'].shape[-1], volume['valid']
    image = torch.from_numpy(volume['image']).to(device).float().div_(255)
    target = np.array(target, float)
    if spine and rng.random() < LOC_EDGE_VIEWS[0]:
        image, target = edge_view(image, target, rng)
    aug = draw_augmentation(rng, {**config, **LOC_AUGMENT, **({'aug_shift': LOC_SPINE_SHIFT} if spine else {})})
    angle, scale, shift = math.radians(aug[0]), aug[1], aug[2:4]
    rotate_back = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    q = (2 * target[:, 1:] + 1) / size - 1  # pixel centres -> [-1, 1] (affine_grid, align_corners=False)
    target[:, 1:] = ((scale * q @ rotate_back.T + 2 * shift + 1) * size - 1) / 2  # augment_on_device's forward map
    target[((target[:, 1:] < -0.5) | (target[:, 1:] > size - 0.5)).any(1)] = np.nan
    if mirror is not False and rng.random() < 0.5:
        target = target if mirror is None else target[mirror]
        image, valid, target[:, 0] = image.flip(0), valid[::-1].copy(), len(valid) - 1 - target[:, 0]
    x = augment_on_device(image[None, :, None], torch.from_numpy(aug)[None].to(device),
                          torch.from_numpy(valid)[None].to(device), size)
    return neighbour_channels(x[0, :, 0]), target, valid


def edge_view(image, target, rng):
    """The slices (n, S, S) and targets (maps, 3) as a series framed tightly along the spine shows them: the spine
    moved up (or, half the time, down) so that its top level L1/L2 (bottom level L5/S1) lies 0 to LOC_EDGE_VIEWS[1]
    of the rows inside the image's top (bottom) edge (fit_square's band), what it moved beyond that edge cut off (a
    level with it: no target), black where it left; only to an end whose level is annotated. The levels then sit
    higher or lower than a series framed around the whole lumbar spine puts them: without such views the localiser
    learned a level's name from its height and put every level of a series starting just above L1/L2 one disc low
    (issue 28)."""
    level = np.arange(len(target)) % len(LEVELS)  # maps: the levels of each condition in turn
    ends = [end for end in (0, len(LEVELS) - 1) if not np.isnan(target[level == end, 2]).all()]
    filled = torch.nonzero(image.amax((0, 2)) > 0).flatten().tolist()  # the image's rows inside fit_square's band
    if not ends or not filled:  # an end level not annotated: its neighbour at the edge would be a wrong lesson
        return image, target
    size, margin = image.shape[-2], rng.uniform(0, LOC_EDGE_VIEWS[1]) * image.shape[-2]
    end = ends[rng.integers(len(ends))]  # rows run head to feet (fit_square): L1/L2 at the top
    rows = target[level == end, 2]
    shift = round(filled[0] + margin - np.nanmin(rows)) if end == 0 else round(filled[-1] - margin - np.nanmax(rows))
    moved = torch.zeros_like(image)
    moved[:, max(0, shift):size + min(0, shift)] = image[:, max(0, -shift):size - max(0, shift)]
    moved[:, :filled[0]] = 0
    moved[:, filled[-1] + 1:] = 0
    target = target + np.array([0, 0, shift])
    target[(target[:, 2] < filled[0] - 0.5) | (target[:, 2] > filled[-1] + 0.5)] = np.nan  # cut off with its disc
    return moved, target


def level_log_probs(logits, valid):
    """(n, maps, S, S) logits -> (maps, n, S, S) log-probabilities, one softmax per map over every slice and pixel
    of the series; slices that are not there (gaps, unreadable) get none."""
    logits = logits.float().permute(1, 0, 2, 3).masked_fill(~valid.view(1, -1, 1, 1), -1e4)
    return logits.flatten(1).log_softmax(1).view(logits.shape)


def localiser_loss(logits, targets, valid, sigma):
    """Cross entropy between each level's softmax and a Gaussian blob at its target (sigma grid pixels in-plane,
    LOC_SLICE_SIGMA slices across), averaged over the annotated levels."""
    have = ~torch.isnan(targets[:, 0])
    if not have.any():
        return logits.sum() * 0.0
    n, _, size, _ = logits.shape
    t = targets[have].view(-1, 3, 1, 1, 1)
    j = torch.arange(n, device=logits.device, dtype=torch.float32).view(1, -1, 1, 1)
    grid = torch.arange(size, device=logits.device, dtype=torch.float32)
    blob = torch.exp(-(j - t[:, 0]) ** 2 / (2 * LOC_SLICE_SIGMA ** 2)
                     - ((grid.view(1, 1, 1, -1) - t[:, 1]) ** 2 + (grid.view(1, 1, -1, 1) - t[:, 2]) ** 2)
                     / (2 * sigma ** 2)) * valid.view(1, -1, 1, 1)
    blob = blob / blob.sum((1, 2, 3), keepdim=True)
    return -(blob * level_log_probs(logits, valid)[have]).sum((1, 2, 3)).mean()


# %% [markdown]
# ### 7.4 From heatmaps to points
# The slice with the most mass is the point's slice and the weighted centre around the peak its (x, y). The five
# levels are decoded together, in order and at plausible gaps along the spine; a foramen is searched only on the
# slices on its side of the predicted canal.

# %% tags=["defs"]
LEVEL_GAP_MM = (15.0, 60.0)  # consecutive disc levels lie this far apart along the spine (adult pitch ~30-40 mm)


def peak_candidates(p, count, window):
    """The `count` strongest local maxima of a 2-D map p (3 x 3 neighbourhood: two discs a few pixels apart stay
    two), each scored by the mass within +-window pixels, down to 1/20 of the strongest: (log masses, rows, columns)
    tensors."""
    side = 2 * window + 1
    mass = F.avg_pool2d(p[None, None], side, 1, window)[0, 0] * side ** 2
    peaks = mass * (p == F.max_pool2d(p[None, None], 3, 1, 1)[0, 0])
    values, index = peaks.flatten().topk(min(count, peaks.numel()))
    keep = values >= values[0] * 0.05  # a faint bump is no candidate: better a slip than a point on noise
    values, index = values[keep], index[keep]
    return values.clamp_min(1e-30).log(), index // p.shape[1], index % p.shape[1]


def decode_levels(probs, gap, window=2, count=4, area=None):
    """(5, n, S, S) probabilities -> (5, 3) array of (slot, u, v). Per level, its slice is the one holding the most
    probability; on it, `count` candidate peaks. The five peaks chosen maximise their summed log mass among the
    choices that keep the levels in order down the spine (fit_square turns rows to run head to feet), each between
    gap = (least, most) grid pixels below the one above: two levels never land on one disc, the commonest slip of
    a heatmap localiser, nor does a level jump to a faint bump far away. The point is the probability-weighted
    centre of the (2 window + 1)^2 pixels around the chosen peak. No such choice: the best ordered choice of the
    other levels without the top one, or without the bottom one (a disc at the image's edge, whose map has no
    peak of its own: its only bump sits on its neighbour's disc), and the dropped end level one step beyond its
    two nearest neighbours (2 p1 - p2, on its neighbour's slice), kept on the grid and, with `area` ((n, S, S)
    bool, image_area), inside the image on that slice. No such choice either: each level's strongest peak."""
    slices = probs.sum((2, 3)).argmax(1).tolist()
    candidates = [peak_candidates(p[j], count, window) for p, j in zip(probs, slices)]

    def best_ordered(levels):  # (summed log mass, {level: candidate}) of the best ordered choice; None: no choice
        best, choice = -math.inf, None
        for pick in itertools.product(*(range(len(candidates[k][0])) for k in levels)):
            rows = [float(candidates[k][1][i]) for k, i in zip(levels, pick)]
            score = sum(float(candidates[k][0][i]) for k, i in zip(levels, pick))
            if score > best and all(gap[0] <= b - a <= gap[1] for a, b in zip(rows, rows[1:])):
                best, choice = score, dict(zip(levels, pick))
        return best, choice

    n = len(probs)
    _, choice = best_ordered(range(n))
    dropped = None
    if choice is None and n >= 3:  # an end level left out (the top one first on a tie)
        (_, choice), dropped = max((best_ordered(range(1, n)), 0), (best_ordered(range(n - 1)), n - 1),
                                   key=lambda e: e[0][0])
    if choice is None:
        choice, dropped = dict.fromkeys(range(n), 0), None
    out = np.zeros((n, 3))
    for level, i in choice.items():
        p, j, (_, rows, cols) = probs[level], slices[level], candidates[level]
        v, u = int(rows[i]), int(cols[i])
        v0, u0 = max(v - window, 0), max(u - window, 0)
        patch = p[j, v0:v + window + 1, u0:u + window + 1]
        vv, uu = torch.meshgrid(torch.arange(v0, v0 + patch.shape[0]), torch.arange(u0, u0 + patch.shape[1]),
                                indexing='ij')
        out[level] = j, float((patch * uu).sum() / patch.sum()), float((patch * vv).sum() / patch.sum())
    if dropped is not None:
        near, far = (1, 2) if dropped == 0 else (n - 2, n - 3)
        j, size = int(out[near, 0]), probs.shape[-1]
        (u_lo, u_hi), (v_lo, v_hi) = ((0, size - 1),) * 2
        if area is not None and area[j].any():  # the image's first and last grid pixels on that slice
            (v_lo, v_hi), (u_lo, u_hi) = ((idx[0], idx[-1]) for idx in (np.flatnonzero(area[j].any(1)),
                                                                        np.flatnonzero(area[j].any(0))))
        u, v = 2 * out[near, 1:] - out[far, 1:]
        out[dropped] = j, np.clip(u, u_lo, u_hi), np.clip(v, v_lo, v_hi)
    return out


def image_area(volume):
    """(n, S, S) bool: the grid pixels each slot's image covers (fit_square leaves black bands around a
    non-square field of view; a point there has no crop)."""
    n, size = volume['image'].shape[:2]
    grid = np.arange(size) + 0.5
    area = np.zeros((n, size, size), bool)
    for j, (kx, ox, ky, oy) in enumerate(volume['to_grid']):
        cols, rows = (np.sort([o, o + k * extent]) for o, k, extent in
                      ((ox, kx, volume['image_shape'][j][1]), (oy, ky, volume['image_shape'][j][0])))
        area[j] = np.outer((grid > rows[0]) & (grid < rows[1]), (grid > cols[0]) & (grid < cols[1]))
    return area


@torch.inference_mode()
def localise(models, volume, device, config, group=5, allowed=None):
    """(maps, 3) (slot, u, v) per map from the probabilities of `models` averaged (one model per fold), on the slices'
    image area only and, where `allowed` ((maps, n) or (maps, n, S, S) bool) is given, on the slices (or pixels) it
    allows each map (NaN: none); each `group` of maps (a condition's five levels) decoded together by decode_levels
    (group 1: each map alone, a 'slice' localiser's)."""
    x, valid = volume_input(volume, device), torch.from_numpy(volume['valid']).to(device)
    probs = 0
    for model in models:
        with autocast(device, config):
            logits = model.eval()(x)
        probs = probs + level_log_probs(logits, valid).exp() / len(models)
    area = image_area(volume)
    probs = (probs * torch.from_numpy(area).to(probs.device)).cpu()
    if allowed is not None:  # per map and slice, or per map, slice and pixel
        probs = probs * torch.from_numpy(allowed if allowed.ndim == 4 else allowed[:, :, None, None])
    grid_mm = np.median(volume['spacing'][volume['valid'], 1] / np.abs(volume['to_grid'][volume['valid'], 2]))
    out = np.concatenate([decode_levels(probs[g:g + group], (LEVEL_GAP_MM[0] / grid_mm, LEVEL_GAP_MM[1] / grid_mm),
                                        area=area) for g in range(0, len(probs), group)])
    out[~(probs.flatten(1) > 0).any(1).numpy()] = np.nan  # a map with no slice it may take
    return out


def side_of(condition):
    """+1 for a left condition (the patient's left: +x in LPS), -1 for a right one, 0 otherwise."""
    return 1 if condition.startswith('left_') else -1 if condition.startswith('right_') else 0


def side_slices(volume, maps, midline_x):
    """(maps, n) bool: the slices each map may take; a left point only on slices whose centre lies left of the
    midline (LPS x above `midline_x`), a right one only right of it: a foramen is never read from the other side."""
    side = np.array([side_of(c) for c, _ in maps])[:, None]
    offset = np.nan_to_num(volume['centre_mm'][:, 0] - midline_x)[None]
    return (side == 0) | (side * offset > 0)


def localise_levels(models, volume, device, config, conds, canal=None):
    """A 'slice' localiser on a volume of one slot per level (read_slices): (maps, 3) (slot, u, v) per
    map_names(conds), the slot being the level's; NaN for a level without a slice. With the levels' spinal canal
    points (`canal`, (5, 3) LPS mm), a left point is found only left of the canal in its slice, a right one only
    right of it."""
    out, size, cache = np.full((len(conds) * len(LEVELS), 3), np.nan), volume['image'].shape[-1], {}
    side = np.array([side_of(c) for c in conds])[:, None, None, None]
    for level in np.flatnonzero(volume['valid']):
        allowed = None
        if canal is not None and not np.isnan(canal[level]).any() and side.any():
            ds = series_headers(volume['series_dir'], cache)[int(volume['instance'][level])]
            u = grid_point(volume, level, *pixel_point(ds, canal[level])[:2])[0]  # the canal's grid column
            allowed = (side == 0) | (side * (np.arange(size)[None, None, None, :] - u) > 0)  # grid x: patient left
            allowed = np.broadcast_to(allowed, (len(conds), 1, size, size)).copy()
        out[level::len(LEVELS)] = localise(models, one_slot(volume, level), device, config, 1, allowed) + [level, 0, 0]
    return out


# %% [markdown]
# ### 7.5 Training a localiser
# AdamW with a one-cycle schedule over `loc_epochs`, and the classifier's guarded step (a non-finite step is
# skipped and counted). With a deadline, the schedule is resized to the epochs it leaves, so the localisers end in
# time for the rest of the run. Steered by `loc_lr`, `loc_batch`, `loc_augment`.

# %% tags=["defs"]
def train_localiser(volumes, targets, studies, config, device, seed, name='localiser', deadline=None, mirror=None,
                    spine=False):
    """A LevelLocaliser with a map per target row, trained on `studies` (keys of volumes/targets): AdamW, one-cycle
    LR, `loc_batch` studies per step (their slices in one forward pass), each step through guarded_step (a
    GradScaler under fp16; no clipping; a non-finite step skipped, reported as `name`'s and counted towards
    max_nonfinite_steps). `mirror`, `spine`: augment_study's. With a `deadline` (now() time), the first step's time
    sizes the schedule to the epochs that end before it, so the learning rate is annealed by the last of them; no
    epoch starts that would not end in time. Returns (model, mean loss of the applied steps per epoch, skipped
    steps)."""
    seed_everything(seed)
    model = LevelLocaliser(config['loc_channels'], len(targets[studies[0]])).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config['loc_lr'], weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision_in_use(device, config) == 'fp16')
    batches, epochs = math.ceil(len(studies) / config['loc_batch']), config['loc_epochs']
    scheduler = loc_scheduler(optimizer, config, epochs * batches)
    rng, losses, state, skipped = np.random.default_rng(seed), [], {'nonfinite': 0, 'nonfinite_pending': 0}, 0
    bar = tqdm(total=epochs, desc=f'{name} epochs', leave=False, mininterval=30)
    for epoch in range(1, epochs + 1):
        start = now()
        model.train()
        order, applied = rng.permutation(len(studies)), []
        for b in range(batches):
            batch = [studies[i] for i in order[b * config['loc_batch']:(b + 1) * config['loc_batch']]]
            views = [augment_study(volumes[s], targets[s], rng, config, device, mirror, spine) if config['loc_augment']
                     else (volume_input(volumes[s], device), targets[s], volumes[s]['valid']) for s in batch]
            saved_bn = batchnorm_buffers(model)
            with autocast(device, config):
                logits = model(torch.cat([x for x, _, _ in views])).split([len(valid) for _, _, valid in views])
            loss = sum(localiser_loss(out, torch.as_tensor(target, dtype=torch.float32, device=device),
                                      torch.from_numpy(valid).to(device), config['loc_sigma'])
                       for out, (_, target, valid) in zip(logits, views)) / len(batch)
            skip = functools.partial(skip_step, loss, scaler, device, config, state, f'{name} epoch {epoch} step {b}',
                                     f'studies {batch}')
            if guarded_step(model, loss, optimizer, scaler, math.inf, saved_bn, state, skip) is None:
                skipped += 1
            else:
                applied.append(loss.item())
            scheduler.step()
            if epoch == 1 and b == 0 and deadline is not None:  # the epochs that fit, from the first step's time
                fit = max(1, min(epochs, int((deadline - start) // max((now() - start) * batches, 1e-9))))
                if fit < epochs:  # a schedule that ends, annealed, with the last epoch that fits
                    epochs, scheduler = fit, loc_scheduler(optimizer, config, fit * batches, done=1)
                    bar.total = fit
        losses.append(float(np.mean(applied)) if applied else math.nan)
        bar.update()
        if epoch == epochs or (deadline is not None and deadline - now() < now() - start):
            break  # the schedule's end, or the next epoch would end after the deadline
    bar.close()
    return model, losses, skipped


def loc_scheduler(optimizer, config, steps, done=0):
    """The localiser's one-cycle schedule over `steps` optimiser steps, `done` of them taken already (a schedule
    resized to the epochs a deadline leaves)."""
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config['loc_lr'], total_steps=steps, pct_start=0.15)
    with warnings.catch_warnings():  # stepping to where training is: not a skipped optimiser step
        warnings.simplefilter('ignore', UserWarning)
        for _ in range(done):
            scheduler.step()
    return scheduler


# %% [markdown]
# ### 7.6 Measuring localisation
# On the validation fold, each study predicted exactly as a test study is: per condition, exact and within-one-slice
# accuracy of the slice (anatomical position) and the distance between predicted and annotated points in patient
# mm, with a figure per series type. An annotated point no series placed is a miss, never dropped.

# %% tags=["defs"]
def localisation_table(volumes, targets, found, maps):
    """One row per annotated (study, map): annotated and predicted instance and series, slices between them in the
    annotated series' anatomical order (the predicted point's nearest slice there), and the distance between the
    two points in patient mm. `found`: {study: [(volume, prediction)]} (predict_study); a point no series placed,
    or a study whose prediction failed, is a miss (no predicted instance), never dropped."""
    records, headers = [], {}
    for study, target in targets.items():
        vt = volumes[study]
        for k, ((cond, level), (j, u, v)) in enumerate(zip(maps, target)):
            if np.isnan(j):
                continue
            record = {'study_id': study, 'condition': cond, 'level': LEVELS[level],
                      'instance_number': int(vt['instance'][int(j)]), 'pred_series': -1, 'pred_instance': -1,
                      'slice_error': np.nan, 'error_mm': np.nan}
            for vp, prediction in found.get(study, []):
                pj, pu, pv = prediction[k]
                if np.isnan(pj):
                    continue
                point = point_mm(vp, int(pj), pu, pv, headers)
                record.update(pred_series=int(Path(vp['series_dir']).name), pred_instance=int(vp['instance'][int(pj)]),
                              slice_error=slice_error(vt['series_dir'], record['instance_number'], point, headers),
                              error_mm=float(np.linalg.norm(point - point_mm(vt, int(j), u, v, headers))))
                break
            records.append(record)
    return pd.DataFrame(records, columns=['study_id', 'condition', 'level', 'instance_number', 'pred_series',
                                          'pred_instance', 'slice_error', 'error_mm'])


def slice_error(series_dir, instance, point, cache):
    """Slices between `instance` and the slice of its series whose plane is nearest the patient point `point`
    (ties: `instance`), in the series' anatomical order (slice_ranks)."""
    headers = series_headers(series_dir, cache)
    nearest = min(headers, key=lambda i: (abs(pixel_point(headers[i], point)[2]), i != instance))
    return float(abs(np.subtract(*slice_ranks(series_dir, cache).get_indexer([nearest, instance]))))


def series_headers(series_dir, cache):
    """{instance: header} of a series' slices of its main plane (main_orientation), read once per `cache`."""
    if series_dir not in cache:
        cache[series_dir] = main_orientation(read_series_headers(series_dir)[0])[0]
    return cache[series_dir]


def point_mm(volume, j, u, v, cache):
    """The patient point (LPS mm) of grid point (u, v) on slot j of a volume (`cache`: headers by series)."""
    return patient_point(series_headers(volume['series_dir'], cache)[int(volume['instance'][j])],
                         *series_point(volume, j, u, v))


def slice_ranks(series_dir, cache):
    """The series' instances in anatomical order (anatomical_order: along the patient axis its middle slice's
    normal follows most), as a pandas Index: get_indexer gives ranks."""
    return pd.Index([i for _, i in anatomical_order(series_headers(series_dir, cache))])


def localisation_metrics(table):
    """Per level (one condition) or per condition, and overall: rows, exact and within-one-slice accuracy, median
    and 90th percentile error in mm; a point not predicted (its level not covered) counts as a wrong slice."""
    def stats(t):
        return {'n': len(t), 'slice exact': (t['slice_error'] == 0).mean(),
                'slice within 1': (t['slice_error'] <= 1).mean(), 'median mm': t['error_mm'].median(),
                'p90 mm': t['error_mm'].quantile(0.9)}
    by = 'level' if table['condition'].nunique() == 1 else 'condition'
    per = {key: stats(t) for key, t in table.groupby(by, sort=False)}
    return pd.DataFrame({**per, 'all': stats(table)}).T.rename_axis(by).round(3)


def plotted_studies(loc, series, count=4):
    """The validation studies plot_localisation shows: the first `count` annotated ones whose first series read
    placed the L3/L4 point of the series' first condition."""
    found = loc.found[series]
    return [s for s in found if s in loc.targets[series] and found[s] and not np.isnan(found[s][0][1][2, 0])][:count]


def plot_localisation(loc, series, name, count=4):
    """Annotated (circles) and predicted (crosses) points of a few validation studies on the slice predicted for
    the L3/L4 point of the series' first condition (the axial localiser: that level's slice, its annotated points
    drawn at their place on their own slice); the caption gives each point's slice error."""
    studies = plotted_studies(loc, series, count)
    if not studies:
        return
    fig, axes = plt.subplots(1, len(studies), figsize=(3.2 * len(studies), 3.6), squeeze=False)
    for ax, study in zip(axes[0], studies):
        (volume, pred), target = loc.found[series][study][0], loc.targets[series][study]
        j, t = int(pred[2, 0]), target[2, 0]
        ax.imshow(volume['image'][j], cmap='gray')
        shown = pred[:, 0] == j  # the points placed on this slice (the axial localiser: the level's slot)
        on_target = (target[:, 0] == t) if not np.isnan(t) else shown & False
        ax.scatter(target[on_target, 1], target[on_target, 2], s=60, facecolors='none', edgecolors='lime',
                   label='annotated')
        ax.scatter(pred[shown, 1], pred[shown, 2], s=40, marker='x', color='red', label='predicted')
        table = loc.table[(loc.table['study_id'] == study) & (loc.table['series'] == series)]
        ax.set_title(f"{study}: slice error " + ','.join('-' if np.isnan(e) else str(int(e))
                                                         for e in table['slice_error']), fontsize=8)
        ax.axis('off')
    axes[0, 0].legend(fontsize=7, loc='lower left')
    fig.suptitle(f"{series} localiser on validation studies ({', '.join(loc.series[series])})", fontsize=9)
    show(fig, name)


# %% [markdown]
# ### 7.7 One set of localisers per fold
# Each trained fold gets its localisers, trained on that fold's training studies only, so no validation study is
# seen by them.

# %% tags=["defs"]
def annotated_series(samples, root, conds=(SPINAL,)):
    """Localiser jobs from the sample table's rows of `conds` (conditions of one series type): per study, its most
    annotated series, anchored at its most annotated instance (the stack the annotations were made on); returns
    (jobs, {study: rows on that series})."""
    jobs, rows_of = [], {}
    for study, rows in samples[samples['condition'].isin(conds)].groupby('study_id'):
        series = rows['series_id'].mode().iloc[0]
        rows = rows[rows['series_id'] == series]
        rows_of[study] = rows
        jobs.append((study, Path(root) / 'train_images' / str(study) / str(series),
                     int(rows['instance_number'].mode().iloc[0])))
    return jobs, rows_of


def level_instances(rows):
    """A 'slice' localiser's slots: per level the instance most of its rows are annotated on (-1: none)."""
    instances = [-1] * len(LEVELS)
    for level, group in rows.groupby('level_idx'):
        instances[level] = int(group['instance_number'].mode().iloc[0])
    return instances


def localiser_data(samples, config, series, conds, workers):
    """One series type's annotated volumes: {'volumes': {study: volume}, 'targets': {study: (maps, 3)}, 'failed':
    {study: why its series cannot be read}, 'issues': its lost slices (volume_issues)}. What is read of each
    annotated series (annotated_series) is its LOC_MODE's slots: the annotated stack around its anchor ('volume'),
    or a slot per level, its annotated slice (level_instances, 'slice')."""
    jobs, rows_of = annotated_series(samples, config['data_root'], conds)
    jobs = [(study, series_dir, LOC_MODE[series].slots(rows_of[study], anchor)) for study, series_dir, anchor in jobs]
    volumes = read_volumes(jobs, config, workers)
    issues = volume_issues([(study, series_dir, volumes[study]) for study, series_dir, _ in jobs], 'localiser')
    failed = {s: v for s, v in volumes.items() if isinstance(v, str)}
    for study, reason in failed.items():
        warn(f'{series} localiser: study {study} not used, its series cannot be read ({reason})')
    volumes = {s: v for s, v in volumes.items() if s not in failed}
    return {'volumes': volumes, 'targets': {s: level_targets(v, rows_of[s], conds) for s, v in volumes.items()},
            'failed': failed, 'issues': issues}


def volume_items(data, studies):
    """(volumes, targets, keys) a 'volume' localiser trains on: the studies' volumes with a target."""
    return data['volumes'], data['targets'], [s for s in studies if not np.isnan(data['targets'][s][:, 0]).all()]


def level_items(data, studies):
    """(volumes, targets, keys) a 'slice' localiser trains on: each annotated level's slice (key (study, level), a
    target per condition on its slot 0)."""
    volumes, targets = {}, {}
    for study in studies:
        for level in range(len(LEVELS)):
            target = data['targets'][study][level::len(LEVELS)] - [level, 0, 0]
            target[target[:, 0] != 0] = np.nan  # a side annotated on another level's slice: not this one's
            if not np.isnan(target[:, 0]).all():
                volumes[study, level] = one_slot(data['volumes'][study], level)
                targets[study, level] = target
    return volumes, targets, list(volumes)


# %% [markdown]
# `train_localisers` returns a `Localisers` result, which nothing after it changes: the models' files, the
# validation table and metrics, and what was lost on the way.

# %% tags=["defs"]
class Localisers(NamedTuple):
    """train_localisers' result (read only: a NamedTuple; what comes later builds its own values)."""
    series: dict  # {series type: its conditions}, LOC_MODE's order
    found: dict  # {series type: {validation study: [(volume, prediction)]}} (predict_points)
    why: dict  # {validation study: {(condition, level index): why not placed}}
    targets: dict  # {series type: {study: the annotated points (maps, 3)}} of the validation folds' studies
    target_volumes: dict | None  # {series type: {study: the annotated volume}}; None once handed to the kernel
    points: pd.DataFrame  # the classifier rows at the predicted points (point_rows)
    table: pd.DataFrame  # one row per annotated point (localisation_table; a point not placed: a miss)
    metrics: pd.DataFrame  # localisation_metrics(table)
    losses: dict  # {fold: {series type: loss per epoch}}
    failed: dict  # {series type: {study: why its annotated series was not read}}
    nonfinite_steps: dict  # {fold: steps skipped}
    issues: pd.DataFrame  # every lost slice (ISSUE_COLUMNS)


def train_localisers(samples, folds, config, device, workers, deadline=None):
    """Per fold of `folds` (those whose classifier finished): a localiser per series type (localised_series) on the
    fold's training studies, all in fold{k}/localiser.pt, measured on its validation studies, each predicted as a
    test study is (predict_points: the series by pick_series' rule, every slice from the localisers), against the
    annotated points. `deadline` (now() time): the localisers share the time left equally; each stops after the
    last epoch that ends within its share. Returns Localisers."""
    series_of = localised_series(config['conditions'])
    data = {series: localiser_data(samples, config, series, conds, workers) for series, conds in series_of.items()}
    fold_of = samples.groupby('study_id')['fold'].first()
    descriptions = pd.read_csv(Path(config['data_root']) / 'train_series_descriptions.csv')
    found, why, losses, skipped, issues = {series: {} for series in series_of}, {}, {}, {}, [d['issues'] for d in
                                                                                           data.values()]
    for i, fold in enumerate(folds):
        start = time.time()
        train = [s for s in fold_of.index if fold_of[s] != fold and fold_of[s] >= 0]
        models, losses[fold], skipped[fold] = train_fold_localisers(data, series_of, train, fold, config, device,
                                                                    deadline, (len(folds) - i) * len(series_of))
        val = [s for s in fold_of.index if fold_of[s] == fold]
        out = predict_points({s: [m] for s, m in models.items()}, series_of, descriptions,
                             Path(config['data_root']) / 'train_images', val, config, device, 'validation')
        issues.append(out['issues'])
        why.update(out['why'])
        for series in series_of:
            found[series].update(out['found'][series])
        print(f"fold {fold}: localisers ({', '.join(series_of)}) trained on {len(train)} studies in "
              f'{time.time() - start:.0f} s, loss ' + ', '.join(f'{v[0]:.3f} -> {v[-1]:.3f}'
                                                            for v in losses[fold].values())
              + f', {skipped[fold]} non-finite step(s) skipped; {len(val)} validation studies predicted, '
              f"{sum(1 for s in val if out['errors'].get(s))} failed")
    targets = {series: {s: t for s, t in d['targets'].items() if fold_of.get(s, -1) in folds}
               for series, d in data.items()}
    table = pd.concat([localisation_table(data[series]['volumes'], targets[series], found[series],
                                          map_names(conds)).assign(series=series)
                       for series, conds in series_of.items()], ignore_index=True)
    return Localisers(
        series=series_of, found=found, why=why, targets=targets,
        target_volumes={series: {s: d['volumes'][s] for s in targets[series]} for series, d in data.items()},
        points=point_rows(found, series_of), table=table, metrics=localisation_metrics(table), losses=losses,
        failed={series: d['failed'] for series, d in data.items()}, nonfinite_steps=skipped,
        issues=pd.concat(issues, ignore_index=True))


def train_fold_localisers(data, series_of, train, fold, config, device, deadline, left):
    """One fold's localisers, one per series type (the `train` studies of localiser_data's `data`), saved together
    in fold{k}/localiser.pt. `left`: the localisers still to train, these included; each takes an equal share of
    the time to `deadline`. Returns ({series type: model}, {series type: loss per epoch}, skipped steps)."""
    models, losses, skipped = {}, {}, 0
    for k, (series, conds) in enumerate(series_of.items()):
        share = None if deadline is None else now() + (deadline - now()) / (left - k)
        mode = LOC_MODE[series]
        items = mode.items(data[series], [s for s in train if s in data[series]['volumes']])
        if not items[2]:
            raise ValueError(f'fold {fold}: no training study has a readable annotated {series} series')
        models[series], losses[series], n = train_localiser(
            *items, config, device, config['seed'] + 100 + fold + 1000 * k, f'fold {fold} {series} localiser',
            share, mirror_maps(conds) if mode.mirrored else False, not mode.per_level)
        skipped += n
        if len(losses[series]) < config['loc_epochs']:
            warn(f"fold {fold}: {series} localiser stopped by the time budget after epoch {len(losses[series])} of "
                 f"{config['loc_epochs']}")
    (Path(config['output_dir']) / f'fold{fold}').mkdir(parents=True, exist_ok=True)
    save_atomic({'models': {s: m.state_dict() for s, m in models.items()}, 'series': series_of,
                 'config': {k: config[k] for k in LOC_KEYS}, 'fold': fold, 'version': LOCALISER_VERSION,
                 'losses': losses}, Path(config['output_dir']) / f'fold{fold}' / 'localiser.pt')
    return models, losses, skipped


# %% [markdown]
# ### 7.8 The points of one study
# Each study is predicted alone: an exception in one study puts its rows on the priors with the reason, and changes
# no other study's rows. Sagittal points come from the volume localisers.

# %% tags=["defs"]
def predict_points(models, series_of, descriptions, images_dir, studies, config, device, who):
    """The points of `studies` (validation or test studies alike), each predicted alone by predict_study from the
    series pick_series names (`descriptions`, `images_dir`): whatever fails inside one study costs that study's
    points alone, with the exception as their reason. `models`: {series type: [model per fold]}. Returns
    {'found': {series type: {study: [(volume, prediction)]}}, 'why': {study: {(condition, level index): why not
    placed}}, 'errors': {study: the exception}, 'issues': every lost slice, unread series and failed study
    (ISSUE_COLUMNS, `who` reading)}."""
    out = {'found': {series: {} for series in series_of}, 'why': {}, 'errors': {}}
    issues = []
    for study in tqdm(studies, desc=f'{who} studies', mininterval=30, disable=len(studies) < 2):
        read, notes = [], []  # (series folder, volume or error text) read, even when the study fails later; and
        try:  # (series folder, a fallback taken)
            found, why = predict_study(models, pick_series(descriptions, study, images_dir, series_of), series_of,
                                       config, device, read, notes)
        except Exception as error:
            out['errors'][study] = text = f'prediction failed: {type(error).__name__}: {error}'
            found, why = {}, {m: text for conds in series_of.values() for m in map_names(conds)}
            issues.append([(study, '', '', '', '', f'{who} study failed', text)])
        for series in series_of:
            out['found'][series][study] = found.get(series, [])
        out['why'][study] = why
        issues.append(volume_issues([(study, folder, volume) for folder, volume in read], who).values.tolist())
        issues.append([(study, int(folder.name), '', '', '', f'{who} fallback', text) for folder, text in notes])
    out['issues'] = pd.DataFrame([row for rows in issues for row in rows], columns=ISSUE_COLUMNS)
    return out


def predict_study(models, folders, series_of, config, device, read, notes):
    """One study's points, each from the first of its series (`folders`: pick_series) that places it: the sagittal
    series types on their volumes (sagittal_points), then each axial level (axial_points) from the predicted spinal
    canal points. Appends what it reads to `read`, and each fallback it takes to `notes`. Returns ({series type:
    [(volume, (maps, 3) (slot, u, v), NaN where that volume placed no point)]}, {(condition, level index): why not
    placed})."""
    found, why, canal = {}, {}, None
    for series, conds in series_of.items():
        found[series], reasons = LOC_MODE[series].points(models[series], folders[series], series, conds, canal,
                                                         config, device, read, notes)
        if SPINAL in conds:
            canal = canal_points_mm(found[series], conds)
            canal = None if np.isnan(canal[:, 0]).all() else canal  # no series of the spinal canal's type read
        maps = map_names(conds)
        why.update({maps[k]: reason for k, reason in reasons.items()})
    return found, why


def sagittal_points(models, folders, series, conds, canal, config, device, read, notes):
    """A 'volume' localiser over the study's series of one type in turn: each map's point from the first series that
    places it (a side's point only on slices on its side of the midline, the median LPS x of the predicted spinal
    canal points `canal`, or of the series' own middle without them, noted in `notes`: side_slices). Returns
    ([(volume, prediction)], {map: why not placed})."""
    maps = map_names(conds)
    midline = None if canal is None or np.isnan(canal[:, 0]).all() else float(np.nanmedian(canal[:, 0]))
    pairs, todo, reason = [], np.ones(len(maps), bool), f'no {series} series with DICOM files'
    for folder in folders:
        try:
            volume = read_volume(folder, config)
        except Exception as error:
            read.append((folder, failure_text(error)))
            reason = f'{series} series {folder.name} not read: {failure_text(error)}'
            continue
        read.append((folder, volume))
        middle = midline if midline is not None else float(np.nanmedian(volume['centre_mm'][:, 0]))
        if midline is None and any(side_of(c) for c, _ in maps):
            notes.append((folder, "sides split at the series' middle slice: no spinal canal points"))
        prediction = localise(models, volume, device, config, allowed=side_slices(volume, maps, middle))
        prediction[~todo] = np.nan
        if not np.isnan(prediction[:, 0]).all():
            pairs.append((volume, prediction))
        todo &= np.isnan(prediction[:, 0])
        reason = f'no {series} slice on its side of the spinal canal'
        if not todo.any():
            break
    return pairs, {k: reason for k in np.flatnonzero(todo)}


# %% [markdown]
# ### 7.9 Axial geometry
# An axial level's slice is the one the DICOM geometry (ImagePositionPatient, ImageOrientationPatient,
# PixelSpacing) places at the level's predicted spinal canal point, within `AXIAL_MAX_MM`. A level that no slice
# covers goes to the priors with its reason: real axial series often cover only the lower levels.

# %% tags=["defs"]
def axial_points(models, folders, series, conds, canal, config, device, read, notes=()):
    """The 'slice' localiser: per level, the slice the DICOM geometry places at the level's predicted spinal canal
    point (`canal`, (5, 3) LPS mm, NaN: none), in the first of the study's axial series that has one; then the
    points in it (`notes`: sagittal_points' argument, no fallback here). Returns ([(volume of a slot per level,
    prediction)], {map: why not placed})."""
    n = len(LEVELS)
    points = np.full((n, 3), np.nan) if canal is None else canal.copy()
    reason = [f'no {series} series with DICOM files' if not folders else
              'no spinal canal points to place its axial slices' if canal is None else
              'no spinal canal point predicted at this level' if np.isnan(p[0]) else
              f'no axial slice within {AXIAL_MAX_MM:g} mm of the predicted level' for p in points]
    pairs, placed = [], np.zeros(n, bool)
    for folder in folders:
        instances = axial_slices(points, folder)
        if max(instances) < 0:
            continue
        try:
            volume = read_slices(folder, config, instances)
        except Exception as error:
            read.append((folder, failure_text(error)))
            for level in np.flatnonzero(np.array(instances) >= 0):
                reason[level] = f'{series} series {folder.name} not read: {failure_text(error)}'
            continue
        read.append((folder, volume))
        pairs.append((volume, localise_levels(models, volume, device, config, conds, canal)))
        for level in np.flatnonzero((np.array(instances) >= 0) & ~volume['valid']):
            reason[level] = f'its axial slice {instances[level]}.dcm could not be read'
        placed |= volume['valid']
        points[volume['valid']] = np.nan  # placed: the next series is asked for the others only
    return pairs, {c * n + level: reason[level] for c in range(len(conds)) for level in np.flatnonzero(~placed)}


def canal_points_mm(pairs, conds):
    """(5, 3) patient points (LPS mm) of the spinal canal levels predicted on the Sagittal T2/STIR volumes `pairs`
    ([(volume, prediction)]); NaN where none placed it."""
    first, cache, out = conds.index(SPINAL) * len(LEVELS), {}, np.full((len(LEVELS), 3), np.nan)
    for volume, prediction in pairs:
        for level, (j, u, v) in enumerate(prediction[first:first + len(LEVELS)]):
            if not np.isnan(j) and np.isnan(out[level, 0]):
                out[level] = point_mm(volume, int(j), u, v, cache)
    return out


def axial_slices(points, series_dir):
    """Per level, the instance of the axial series' slice at its patient point (axial_slice_for, among the slices of
    the series' main plane; -1 where the series has no slice near it or the point is NaN)."""
    headers = main_orientation(read_series_headers(series_dir)[0])[0]
    found = [None if np.isnan(point).any() else axial_slice_for(point, headers) for point in points]
    return [-1 if f is None else f[0] for f in found]


def volume_issues(read, who):
    """ISSUE_COLUMNS rows of the series read [(study, series_dir, volume or the error text)]: each lost slice (a gap,
    a skipped, blank or undecodable file, an image of another plane) with its file and reason, and each series
    that could not be read at all; `who` ('localiser', 'validation', 'test') names the reading in 'what'."""
    rows = []
    for study, series_dir, volume in read:
        series = int(Path(series_dir).name)
        if isinstance(volume, str):
            rows.append((study, series, '', '', '', f'{who} series not read', volume))
        else:
            rows += [(study, series, '', '', file, f'{who} slice lost', reason) for file, reason in volume['issues']]
    return pd.DataFrame(rows, columns=ISSUE_COLUMNS)


def point_rows(found, series_of, condition_rows=None):
    """Classifier rows at the predicted slices and points: one per (study, condition, level) placed (`found`:
    {series type: {study: [(volume, prediction)]}}, predict_points'), with the columns build_cache needs (label 0
    when `condition_rows`, the validation rows with their labels, is not given)."""
    records = []
    for series, by_study in found.items():
        maps = map_names(series_of[series])
        for study, pairs in by_study.items():
            for volume, prediction in pairs:
                for (condition, level), (j, u, v) in zip(maps, prediction):
                    if np.isnan(j):  # placed in another series, or not at all
                        continue
                    x, y = series_point(volume, int(j), u, v)
                    instance = int(volume['instance'][int(j)])
                    records.append({'study_id': study, 'series_id': int(Path(volume['series_dir']).name),
                                    'instance_number': instance, 'x': x, 'y': y, 'condition': condition,
                                    'level': LEVELS[level], 'level_idx': level,
                                    'path': str(Path(volume['series_dir']) / f'{instance}.dcm')})
    rows = pd.DataFrame(records, columns=['study_id', 'series_id', 'instance_number', 'x', 'y', 'condition', 'level',
                                          'level_idx', 'path'])
    if condition_rows is None:
        return rows.assign(label=0)
    return rows.merge(condition_rows[['study_id', 'condition', 'level', 'label']],
                      on=['study_id', 'condition', 'level'])


AXIAL_MAX_MM = 10.0  # farthest slice plane from the point that still shows its level: about one disc height
#                      (8-12 mm); an axial block is 3-4 mm per slice, so a level with slices is within ~2 mm, while
#                      a missing level's nearest slices belong to a neighbouring disc, 20+ mm away (pitch 30-40 mm)


AXIAL_EDGE_MM = 5.0  # the point's projection may fall this far outside a slice's image (an annotation near the
#                      edge of a tight field of view); farther, the slice (e.g. a tilted block's plane met far from
#                      its image) does not show the point


def axial_slice_for(point, headers, max_mm=AXIAL_MAX_MM, edge_mm=AXIAL_EDGE_MM):
    """(instance, x, y, distance) of the slice of `headers` ({instance: header}) whose plane is nearest the patient
    point `point`, among the slices whose image (within edge_mm) holds its projection; None when no such slice
    is within max_mm (a level the series does not cover). Each slice's own orientation and position: several
    differently tilted blocks, any file order; ties go to the lower instance."""
    best = None
    for instance, ds in headers.items():
        x, y, distance = pixel_point(ds, point)
        spacing = slice_geometry(ds)[3]
        inside = all(-0.5 - edge_mm / sp <= v <= n - 0.5 + edge_mm / sp  # the image spans -0.5 .. n - 0.5 pixels
                     for v, n, sp in ((x, int(ds.Columns), spacing[0]), (y, int(ds.Rows), spacing[1])))
        if inside and abs(distance) <= max_mm and (best is None or (abs(distance), instance) < (abs(best[3]), best[0])):
            best = (instance, x, y, distance)
    return best


# %% [markdown]
# ### 7.10 Classifying the predicted rows, and the priors
# The classifier runs on crops at the predicted points. The priors are the training set's class frequencies per
# (condition, level), add-one smoothed: what a target gets when it cannot be predicted.

# %% tags=["defs"]
def classify_rows(rows, classifiers, config, device, workers, quiet=False):
    """Mean probabilities (raw P_COLUMNS and prior-corrected PC_COLUMNS) of `classifiers` [(model, class weights)]
    on crops at the rows' instance and point (built like the training crops, by build_cache; tta_shift's views;
    `quiet`: without its messages, a test study at a time). Rows whose crop cannot be built keep NaN (the caller
    fills them with the priors and counts them)."""
    rows = rows.reset_index(drop=True)
    rows['target_idx'] = rows['condition'].map(config['conditions'].index) * len(LEVELS) + rows['level_idx']
    out = rows.copy()
    out[P_COLUMNS + PC_COLUMNS] = np.nan
    if rows.empty:
        return out
    kept, images, masks, _ = build_cache(rows, config, workers, quiet)
    if kept.empty:
        return out
    dataset = RSNADatasetV9(kept, images, masks, config, train=False, pad=tta_pad(config))
    loader = make_loader(dataset, config, device, False)
    raw = corrected = 0
    for model, weights in classifiers:
        probs = predict(model, loader, CompetitionWeightedCE(weights).to(device), device, config)['probs']
        raw, corrected = raw + probs / len(classifiers), corrected + prior_corrected(probs, weights) / len(classifiers)
    out.loc[kept.index, P_COLUMNS], out.loc[kept.index, PC_COLUMNS] = raw, corrected
    return out


def label_priors(data_root, exclude=()):
    """{train.csv column: [normal_mild, moderate, severe]}: the class frequencies of each (condition, level) in
    train.csv (labels spelled as official_labels maps them), add-one smoothed (a class never seen still gets a
    finite loss), over the studies not in `exclude` (the cost figures: a fold's validation studies)."""
    labels = pd.read_csv(Path(data_root) / 'train.csv')
    labels = labels[~labels['study_id'].isin(list(exclude))]
    return {column: ((counts := np.array([(official_labels(labels[column]) == c).sum() for c in CLASSES], float) + 1)
                     / counts.sum()).tolist() for column in labels.columns if column != 'study_id'}


def fill_priors(frame, priors):
    """Rows of `frame` (study_id, condition, level, P/PC columns) without probabilities get the priors of their
    condition and level (PC: re-weighted by the metric's row weights, as the model's), marked 'on_priors'. Returns
    (frame, rows filled)."""
    frame = frame.copy()
    empty = frame[P_COLUMNS[0]].isna()
    prior = np.array([priors[f'{c}_{level}'] for c, level in frame.loc[empty, ['condition', 'level']]
                      .itertuples(False)]).reshape(-1, 3)
    frame.loc[empty, P_COLUMNS] = prior
    frame.loc[empty, PC_COLUMNS] = prior_corrected(prior, [1.0, 1.0, 1.0]) if len(prior) else prior
    frame['on_priors'] = empty.to_numpy()
    return frame, int(empty.sum())


PREDICT_KEYS = PREPROCESS_KEYS + (  # the classifier's saved settings a prediction uses (batch size, precision and
    'backbone', 'gru_hidden', 'gru_layers', 'attention_hidden', 'pooling', 'dropout', 'gru_dropout',  # the views
    'precision', 'batch_size', 'tta_shift')  # too: a submission run computes the training run's submission bit for
#                                              bit, on the views its out-of-fold choice and temperatures were fitted on


def load_run(folder, config, device, folds=None):
    """The classifiers (fold*/final.pt), localisers (fold*/localiser.pt), priors (priors.json) and out-of-fold
    choice of probabilities (probabilities.json, None without it) of a finished run's output folder, checked:
    every fold saved with the same settings, each localiser with the settings of its classifier's run (the same
    preprocessing, a localiser for each series type its conditions need) and with the other folds' localisers,
    every weight loaded strictly. Returns {'config': this run's CONFIG with the saved prediction settings (the
    classifiers' PREDICT_KEYS, the localisers' LOC_OWN_KEYS), 'classifiers': [(model, class weights)],
    'localisers': {series type: [model per fold]}, 'series': {series type: conditions}, 'priors', 'choice',
    'folds'}."""
    folder = Path(folder)
    run = {'classifiers': [], 'localisers': {}, 'folds': []}
    saved_settings = loc_settings = None
    paths = (sorted(folder.glob('fold*/final.pt')) if folds is None
             else [folder / f'fold{f}' / 'final.pt' for f in folds])
    for path in paths:
        if folds is None and not path.with_name('localiser.pt').exists():  # a submission run takes what is whole
            warn(f'{path.parent}: final.pt without localiser.pt (its run ended before training the fold\'s '
                 'localisers): this fold is not used')
            continue
        saved = torch.load(path, map_location='cpu', weights_only=False)
        settings = {k: saved['config'].get(k) for k in PREDICT_KEYS}
        settings['conditions'] = settings['conditions'] or [saved['config']['condition']]  # saved before issue 24
        settings['tta_shift'] = settings['tta_shift'] or 0.0  # saved before the views: its oof saw the crop alone
        if saved_settings is not None and settings != saved_settings:
            raise ValueError(f'{path} was trained with other settings than {run["folds"][0]}: '
                             f'{ {k: (saved_settings[k], v) for k, v in settings.items() if v != saved_settings[k]} }')
        saved_settings = settings
        model = SpineModelV9({**saved['config'], 'conditions': settings['conditions'], 'pretrained': 'none'})
        model.load_state_dict(saved['model'])
        run['classifiers'].append((model.to(device).eval(), saved['class_weights']))
        run['folds'].append(path.parent.name)
        loc_settings = load_localisers(path.with_name('localiser.pt'), settings, loc_settings, run, device)
    if not run['classifiers']:
        raise FileNotFoundError(f'{folder}: no fold*/final.pt with its localiser.pt (the output folder of a finished '
                                'training run)')
    saved_settings = {**saved_settings, **loc_settings}
    differ = {k: (v, config[k]) for k, v in saved_settings.items() if config[k] != v}
    if differ:
        print(f'{folder}: prediction uses the settings the models were trained with; this run differs in '
              f'{{key: (trained, here)}} = {differ}')
    run['config'] = {**config, **saved_settings}
    priors = folder / 'priors.json'
    if not priors.exists() and not (Path(config['data_root']) / 'train.csv').exists():
        raise FileNotFoundError(f"{priors} is missing and {config['data_root']} has no train.csv to count the "
                                'priors from: attach the whole output folder of the training run')
    run['priors'] = json.loads(priors.read_text()) if priors.exists() else label_priors(config['data_root'])
    choice = folder / 'probabilities.json'
    run['choice'] = json.loads(choice.read_text()) if choice.exists() else None
    return run


def load_localisers(loc_path, settings, loc_settings, run, device):
    """Adds one fold's localisers (localiser.pt beside its final.pt) to run['localisers'] after load_run's checks;
    returns their own settings (LOC_OWN_KEYS)."""
    if not loc_path.exists():
        raise FileNotFoundError(f'{loc_path} is missing: that run trained no localiser (localiser: off?)')
    loc = torch.load(loc_path, map_location='cpu', weights_only=False)
    if loc.get('version') != LOCALISER_VERSION:
        raise ValueError(f"{loc_path} was saved by an older notebook (localiser version {loc.get('version', 1)}, "
                         f'this one reads volumes as version {LOCALISER_VERSION}): train the localiser again')
    changed = {k: (settings[k], v) for k, v in loc['config'].items() if k in settings and settings[k] != v}
    if loc['series'] != localised_series(settings['conditions']):
        changed['series'] = (localised_series(settings['conditions']), loc['series'])
    if changed:
        raise ValueError(f'{loc_path} does not belong to the run of its final.pt: {{key: (classifier, localiser)}} '
                         f'= {changed}')
    own = {k: loc['config'][k] for k in LOC_OWN_KEYS}
    if loc_settings is not None and own != loc_settings:
        raise ValueError(f'{loc_path} was trained with other settings than the localiser of {run["folds"][0]}: '
                         f'{ {k: (loc_settings[k], v) for k, v in own.items() if v != loc_settings[k]} }')
    run['series'] = loc['series']
    for series, state in loc['models'].items():
        localiser = LevelLocaliser(own['loc_channels'], state['head.weight'].shape[0])
        localiser.load_state_dict(state)
        run['localisers'].setdefault(series, []).append(localiser.to(device).eval())
    return own


# %% [markdown]
# ### 7.11 The cost of localisation and the submitted probabilities
# The same validation rows and final model, cropped at the predicted points instead of the annotated ones: the
# official terms side by side. Each condition is then submitted as the candidate with the lowest loss on those
# out-of-fold rows: raw, prior-corrected, the priors, or a fitted temperature (it only softens). Chosen and fitted
# on the same rows, so optimistic for them. `loc_submit_probs` can force one.

# %% tags=["defs"]
def localisation_cost(oof, loc, run, config, device, workers):
    """The final models on their validation rows (the OOF rows) cropped at the predicted points, beside the same
    rows at the annotated points (oracle). A row without a predicted point or crop gets the priors of its fold's
    training studies (never counted from the rows it is scored on), counted per condition; the frame keeps those
    priors ('prior' columns) for choose_probabilities. Returns the two summaries, the predicted rows' 'frame' and
    the counts."""
    frames = []
    by_fold = dict(zip(run['folds'], run['classifiers']))
    keys = ['study_id', 'condition', 'level']
    for fold, rows in oof.groupby('fold'):
        points = loc.points[loc.points['study_id'].isin(rows['study_id'])]
        probs = classify_rows(points.drop(columns='label').merge(rows[keys + ['label']], on=keys),
                              [by_fold[f'fold{fold}']], run['config'], device, workers)
        frame = rows[keys + ['label', 'fold']].merge(probs[keys + P_COLUMNS + PC_COLUMNS], on=keys, how='left')
        priors = label_priors(config['data_root'], exclude=set(rows['study_id']))
        frame[PRIOR_COLUMNS] = [priors[f'{c}_{level}'] for c, level in frame[['condition', 'level']].itertuples(False)]
        frames.append(fill_priors(frame, priors)[0])
    predicted = pd.concat(frames, ignore_index=True)
    fallback = predicted.loc[predicted['on_priors'], 'condition'].value_counts().to_dict()
    oracle = oof.set_index(keys).loc[pd.MultiIndex.from_frame(predicted[keys])].reset_index()
    return {'oracle': summarize(oracle), 'predicted': summarize(predicted), 'frame': predicted,
            'fallback_rows': int(sum(fallback.values())), 'fallback_by_condition': fallback, 'rows': len(predicted)}


def candidate_probabilities(rows, kind, temperature=1.0):
    """A condition's rows' probabilities under one submission candidate: 'raw' (P_COLUMNS), 'corrected'
    (PC_COLUMNS) or 'priors' (the fold's training priors re-weighted by the metric's row weights, the constant with
    the lowest expected loss); the model's rows (not 'on_priors') sharpened or softened by `temperature` (p^(1/T),
    renormalised), as build_submission does."""
    if kind == 'priors':
        return prior_corrected(rows[PRIOR_COLUMNS].to_numpy(float), [1.0, 1.0, 1.0])
    probs = rows[P_COLUMNS if kind == 'raw' else PC_COLUMNS].to_numpy(float, copy=True)
    model = ~rows['on_priors'].to_numpy(bool) if 'on_priors' in rows else np.ones(len(rows), bool)
    probs[model] = with_temperature(probs[model], temperature)
    return probs / probs.sum(1, keepdims=True)


def with_temperature(probs, temperature):
    """p^(1/T), renormalised: T < 1 sharpens, T > 1 softens (the logits divided by T)."""
    logp = np.log(np.clip(probs, 1e-12, 1)) / temperature
    p = np.exp(logp - logp.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def condition_loss(rows, probs):
    """What one condition's probabilities cost in the official metric on out-of-fold rows: the condition's weighted
    log loss (row weights 1/2/4 by label); for the spinal canal plus the any_severe_spinal term, which its severe
    probabilities also set."""
    frame = rows[['study_id', 'condition', 'level', 'label']].assign(**dict(zip(P_COLUMNS, probs.T)))
    terms = competition_terms(*kaggle_frames(frame))
    return float(sum(terms.values()))


SUBMISSION_KINDS = ('raw', 'corrected', 'priors')


TEMPERATURE_RANGE = (1.0, 4.0)  # a fitted temperature only softens: sharpening fitted on a fold's few out-of-fold
#   rows is what shifted data punishes (measured, v9_Architecture.md 6c: a left foramen's T 0.42 took the realistic
#   split's foraminal term from 0.95 to 1.21, above the priors' 1.07; T >= 1 gave 0.90)


def choose_probabilities(frame):
    """{condition: {candidate: out-of-fold loss, ..., 'chosen', 'temperature'}}: each condition's probabilities
    as submitted, chosen by condition_loss on the out-of-fold rows at predicted points (`frame`,
    localisation_cost's): raw, prior-corrected, the training priors alone, and raw or corrected with a temperature
    fitted on the same rows ('raw T', 'corrected T'). Fitted and chosen on those rows, so the chosen loss is
    optimistic for them; a condition the model does worse on than the priors gets the priors."""
    choice = {}
    for condition, rows in frame.groupby('condition', sort=False):
        loss = {kind: condition_loss(rows, candidate_probabilities(rows, kind)) for kind in SUBMISSION_KINDS}
        temperature = {}
        for kind in ('raw', 'corrected'):
            fit = scipy.optimize.minimize_scalar(
                lambda log_t, rows=rows, kind=kind: condition_loss(rows, candidate_probabilities(rows, kind,
                                                                                                 math.exp(log_t))),
                bounds=np.log(TEMPERATURE_RANGE), method='bounded', options={'xatol': 1e-3})
            temperature[kind] = round(math.exp(fit.x), 3)
            loss[f'{kind} T'] = condition_loss(rows, candidate_probabilities(rows, kind, temperature[kind]))
        chosen = min(loss, key=loss.get)
        choice[condition] = {**loss, 'temperatures': temperature, 'chosen': chosen.split()[0],
                             'temperature': temperature[chosen.split()[0]] if chosen.endswith(' T') else 1.0,
                             'candidate': chosen}
    return choice


# %% [markdown]
# ### 7.12 Predicting the test studies
# Every row of `sample_submission.csv`: the fold localisers' heatmaps averaged, each fold's classifier on the crops
# at those points, probabilities averaged over folds. No study starts that would not end inside `time_budget_h`;
# the studies left take the priors, counted and warned. A prediction that fails as a whole still writes every row,
# on the priors, with the error in `submission.json`.

# %% tags=["defs"]
def predict_test(run, config, device, workers, deadline=None):
    """Probabilities of every trained condition and level of every test study in sample_submission.csv (study_id,
    condition, level, P/PC columns; NaN without a point or crop), the rows without them with why (study_id,
    condition, level, reason), and the test volumes' lost slices and failed studies (ISSUE_COLUMNS). Each study is
    predicted alone (predict_test_study): one study's fault costs that study's rows, never another's. `deadline`
    (now() time): no study starts that would not end before it at the mean time per study so far; the studies left
    take the priors, counted and warned (a submission must end inside its time limit)."""
    descriptions = pd.read_csv(Path(config['data_root']) / 'test_series_descriptions.csv')
    studies, results, start, skipped = submission_studies(config), [], now(), 0
    print(prediction_line({**config, **run['config']}, len(run['classifiers']), len(studies)))
    for study in tqdm(studies, desc='test studies', mininterval=30):
        per_study = (now() - start) / max(len(results) - skipped, 1)
        if skipped or (deadline is not None and now() + per_study > deadline):  # out of time: the rest too
            results.append(unpredicted(run, study, 'not predicted: the time budget (time_budget_h) ran out'))
            skipped += 1
        else:
            results.append(predict_test_study(run, study, descriptions, config, device, workers))
    if skipped:
        warn(f'submission: {skipped} of {len(studies)} test studies not predicted (the time budget ran out at '
             f'{(now() - start) / max(len(studies) - skipped, 1):.1f} s per study): their rows are the priors')
    keys = ['study_id', 'condition', 'level']
    empty = (pd.DataFrame(columns=keys + P_COLUMNS + PC_COLUMNS), pd.DataFrame(columns=keys + ['reason']),
             pd.DataFrame(columns=ISSUE_COLUMNS))
    return tuple(pd.concat([e] + [r[k] for r in results], ignore_index=True) for k, e in enumerate(empty))


def unpredicted(run, study, reason):
    """predict_test_study's value for a study left on the priors: every trained row, no probabilities, `reason`."""
    rows = pd.DataFrame([(study, c, level) for c in run['config']['conditions'] for level in LEVELS],
                        columns=['study_id', 'condition', 'level'])
    return (rows.assign(**dict.fromkeys(P_COLUMNS + PC_COLUMNS, np.nan)), rows.assign(reason=reason),
            pd.DataFrame(columns=ISSUE_COLUMNS))


def predict_test_study(run, study, descriptions, config, device, workers):
    """One test study in isolation: its points (predict_points) and the fold classifiers on crops there (in a
    scratch cache, removed after). Any exception costs this study's rows alone, on the priors with the exception
    as their reason. Returns (probabilities of its trained rows, NaN where none; its rows without them, with why;
    its issues)."""
    keys, series_of = ['study_id', 'condition', 'level'], run['series']
    points = predict_points(run['localisers'], series_of, descriptions, Path(config['data_root']) / 'test_images',
                            [study], run['config'], device, 'test')
    why, issues = {(c, LEVELS[k]): r for (c, k), r in points['why'][study].items()}, points['issues']
    try:
        with tempfile.TemporaryDirectory(prefix='le3ba_test_') as scratch:
            probs = classify_rows(point_rows(points['found'], series_of), run['classifiers'],
                                  {**run['config'], 'cache_dir': scratch, 'num_workers': 0}, device, workers, True)
        probs = unpredicted(run, study, '')[0][keys].merge(probs[keys + P_COLUMNS + PC_COLUMNS], on=keys, how='left')
    except Exception as error:
        text = f'prediction failed: {type(error).__name__}: {error}'
        probs, on_priors, _ = unpredicted(run, study, text)
        return probs, on_priors, pd.concat([issues, pd.DataFrame([(study, '', '', '', '', 'test study failed', text)],
                                                                 columns=ISSUE_COLUMNS)], ignore_index=True)
    on_priors = probs.loc[probs[P_COLUMNS[0]].isna(), keys].copy()
    on_priors['reason'] = [why.get((c, level), 'no crop built at the predicted point')
                           for c, level in on_priors[['condition', 'level']].itertuples(False)]
    return probs, on_priors, issues


def build_submission(sample, rows, priors, choice):
    """sample_submission's rows, in its order: from `rows` (study_id, condition, level, P/PC columns; NaN: none)
    where they have probabilities, every other row the priors of its (condition, level). Each condition as `choice`
    says ({condition: 'raw' | 'corrected' | 'priors', or choose_probabilities' entry with its 'chosen' and
    'temperature'}; not in it: 'corrected'): the model's raw or prior-corrected probabilities (with the temperature)
    and the priors alike (corrected and 'priors': re-weighted by the metric's row weights), or the priors on every
    row. Checked: nothing missing, rows sum to 1. Returns (submission, {condition: rows from the models})."""
    column = sample['row_id'].str.split('_', n=1).str[1]
    unknown = sorted(set(column) - set(priors))
    if unknown:
        raise ValueError(f'sample_submission.csv names targets that train.csv has no column for: {unknown[:3]}')
    condition = column.str.rsplit('_', n=2).str[0]
    picked = {c: (v, 1.0) if isinstance(v, str) else (v['chosen'], v.get('temperature', 1.0))
              for c, v in choice.items()}
    kind = condition.map(lambda c: picked.get(c, ('corrected', 1.0))[0]).to_numpy()
    temperature = condition.map(lambda c: picked.get(c, ('corrected', 1.0))[1]).to_numpy(float)
    probs = np.array([priors[c] for c in column]).reshape(-1, 3)
    probs[kind != 'raw'] = prior_corrected(probs[kind != 'raw'], [1.0, 1.0, 1.0])
    rows = rows.dropna(subset=P_COLUMNS)  # a row on priors has no model probabilities
    rows = rows.set_index(rows['study_id'].astype(str) + '_' + rows['condition'] + '_' + rows['level'])
    model = (sample['row_id'].isin(rows.index) & (kind != 'priors')).to_numpy()
    found = rows.loc[sample['row_id'][model]]
    probs[model] = np.where((kind[model] == 'corrected')[:, None], found[PC_COLUMNS].to_numpy(float),
                            found[P_COLUMNS].to_numpy(float))
    for t in np.unique(temperature[model]):
        at = model & (temperature == t)
        probs[at] = with_temperature(probs[at], t)
    probs = probs / probs.sum(1, keepdims=True)
    submission = pd.DataFrame(probs, columns=PROB_COLUMNS).assign(row_id=sample['row_id'].to_numpy())
    submission = submission[['row_id'] + PROB_COLUMNS]
    if submission[PROB_COLUMNS].isna().any().any() or not np.allclose(submission[PROB_COLUMNS].sum(axis=1), 1):
        raise ValueError('submission has missing probabilities or rows that do not sum to 1')
    return submission, condition[model].value_counts().to_dict()


# %% [markdown]
# ### 7.13 Writing the submission
# `submission.csv` in `output_dir`, and in `/kaggle/working` on Kaggle, with `submission.json` beside it: per row
# where its probabilities came from, and every study or level that took the priors with its reason.

# %% tags=["defs"]
def write_submission(run, config, device, workers, error=None):
    """submission.csv in output_dir (and in /kaggle/working, where Kaggle looks for it) from the run in `run`;
    returns (submission, facts for the report). A prediction that fails as a whole, or no run (`run` None: it could
    not be loaded, `error` says why), still writes every row: the priors, with the error in submission.json."""
    start = time.time()
    sample = pd.read_csv(Path(config['data_root']) / 'sample_submission.csv')
    keys = ['study_id', 'condition', 'level']
    try:
        if run is None:
            raise RuntimeError(error)
        budget = time_budget_s(config)
        probs, on_priors, issues = predict_test(run, config, device, workers,
                                                None if budget is None else RUN_START + budget)
        choice = submitted_probabilities(run, config)
    except Exception as failure:
        error = f'{type(failure).__name__}: {failure}' if run is not None else error
        warn(f'submission: the prediction failed as a whole ({error}): every row on the priors')
        conditions = (run or {'config': config})['config']['conditions']
        on_priors = pd.DataFrame([(s, c, level) for s in submission_studies(config) for c in conditions
                                  for level in LEVELS], columns=keys).assign(reason=f'prediction failed: {error}')
        probs, issues, choice = on_priors[keys].assign(**dict.fromkeys(P_COLUMNS + PC_COLUMNS, np.nan)), \
            pd.DataFrame(columns=ISSUE_COLUMNS), {}
    priors = run['priors'] if run is not None else fallback_priors(config)
    submission, from_model = build_submission(sample, probs, priors, choice)
    seconds, studies = time.time() - start, sample['row_id'].str.split('_').str[0].nunique()
    out = Path(config['output_dir'])
    write_atomic(out / 'submission.csv', submission.to_csv(index=False))
    kaggle = Path('/kaggle/working/submission.csv')  # where a Kaggle submission is looked for
    if runtime_environment() == 'kaggle' and kaggle.resolve() != (out / 'submission.csv').resolve():
        shutil.copy(out / 'submission.csv', kaggle)
    for (study, condition), rows in on_priors.groupby(['study_id', 'condition'], sort=False):
        if error is None:
            warn(f"submission: study {study}: {condition} {', '.join(rows['level'])} from the priors "
                 f"({rows['reason'].iloc[0]})")
    info = {'rows': len(submission), 'studies': studies, 'rows_from_model': from_model,
            'on_priors': on_priors.to_dict(orient='records'), 'probabilities': choice, 'error': error,
            'conditions': list(on_priors['condition'].unique()) if run is None else run['config']['conditions'],
            'folds': [] if run is None else run['folds'], 'localisers': 0 if run is None else len(run['folds']),
            'seconds': seconds, 'seconds_per_study': seconds / max(studies, 1), 'device': str(device),
            'issues': json.loads(issues.to_json(orient='records'))}
    write_atomic(out / 'submission.json', json.dumps(info, indent=1, default=int))
    print(f"submission.csv: {len(submission)} rows, {studies} studies, {sum(from_model.values())} rows from the "
          f"models ({len(on_priors)} trained rows on priors), {seconds:.1f} s ({info['seconds_per_study']:.2f} s "
          f"per study on {device})" + (f'; PREDICTION FAILED: {error}' if error else ''))
    return submission, info


def fallback_priors(config):
    """The priors of a submission whose run could not be loaded: priors.json of the run's folder (submit_from, or
    output_dir), else counted from train.csv, else a flat third each (said in a warning)."""
    for folder in (config['submit_from'], config['output_dir']):
        if folder and (Path(folder) / 'priors.json').exists():
            return json.loads((Path(folder) / 'priors.json').read_text())
    if (Path(config['data_root']) / 'train.csv').exists():
        return label_priors(config['data_root'])
    warn('submission: no priors.json and no train.csv: every row 1/3 each')
    return {f'{c}_{level}': [1 / 3] * 3 for c in CONDITION_SERIES for level in LEVELS}


def submitted_probabilities(run, config):
    """{condition: 'raw' | 'corrected', or the training run's out-of-fold choice (choose_probabilities' entry)}:
    loc_submit_probs for every condition, or for 'auto' the choice in probabilities.json (without it,
    'corrected')."""
    if config['loc_submit_probs'] != 'auto':
        return {c: config['loc_submit_probs'] for c in run['config']['conditions']}
    if run['choice'] is None:
        warn("loc_submit_probs 'auto': the run has no probabilities.json (no out-of-fold choice): corrected")
        return {c: 'corrected' for c in run['config']['conditions']}
    return run['choice']


# %% [markdown]
# ### 7.14 The after-training probe, and the section as one call
# Before training, the probe runs this section on two studies and measures its seconds per study, so the time
# budget keeps the work after training free. `localise_and_submit` is what section 11 runs, in a child process.

# %% tags=["defs"]
def probe_after_training(device, samples, config, studies=2):
    """Seconds per study of the work after training, measured on `studies` training studies with untrained
    models, summed over the series types localised: reading its annotated volumes ('read'), one localiser epoch
    over them ('step', the second of two: the first pays for warm-up), predicting their points as a test study's
    ('localise', predict_points) and cropping and classifying them with one classifier ('classify'; crops in a
    scratch cache). The studies are the first whose rows name every series type localised (the first ones
    otherwise); a series type none of them has adds no step time, said in a warning."""
    series_of = localised_series(config['conditions'])
    wanted = {c for conds in series_of.values() for c in conds}
    complete = samples.groupby('study_id')['condition'].agg(lambda c: wanted <= set(c))
    ids = (list(complete.index[complete]) + list(complete.index[~complete]))[:studies]
    picked = samples[samples['study_id'].isin(ids)]
    classifier = [(SpineModelV9({**config, 'pretrained': 'none'}).to(device).eval(), config['class_weights'])]
    times, models = {'read': 0.0, 'step': 0.0, 'localise': 0.0, 'classify': 0.0}, {}
    with tempfile.TemporaryDirectory(prefix='le3ba_probe_') as scratch:
        one = {**config, 'loc_epochs': 1, 'loc_batch': 1, 'cache_dir': scratch}
        for series, conds in series_of.items():
            start = time.time()
            data = localiser_data(picked, config, series, conds, 0)
            times['read'] += time.time() - start
            mode = LOC_MODE[series]  # trained below as train_fold_localisers does: mirrored and spine views alike
            items = mode.items(data, list(data['volumes']))
            models[series] = [LevelLocaliser(config['loc_channels'], mode.maps(conds)).to(device)]
            if not items[2]:
                warn(f'time budget probe: none of studies {ids} has a readable annotated {series} series: its '
                     'localiser epochs are not in the projection of the work after training')
                continue
            for _ in range(2):
                start = time.time()
                models[series] = [train_localiser(*items, one, device, config['seed'],
                                                  mirror=mirror_maps(conds) if mode.mirrored else False,
                                                  spine=not mode.per_level)[0]]
            times['step'] += time.time() - start
        start = time.time()
        descriptions = pd.read_csv(Path(config['data_root']) / 'train_series_descriptions.csv')
        points = predict_points(models, series_of, descriptions, Path(config['data_root']) / 'train_images', ids,
                                config, device, 'probe')
        times['localise'] += time.time() - start
        start = time.time()
        classify_rows(point_rows(points['found'], series_of), classifier, one, device, 0)
        times['classify'] += time.time() - start
    return {k: v / len(ids) for k, v in times.items()}


def after_training_parts(probe, samples, config, folds):
    """{part: projected seconds} of the work after training once `folds` finished, from the probe's seconds per
    study: reading every annotated study's volume (on the loader workers); loc_epochs over each fold's training
    studies; localising and classifying each fold's validation studies; reading, localising and classifying
    every test study with each fold's models."""
    fold_of = samples.groupby('study_id')['fold'].first()
    per_model = probe['localise'] + probe['classify']
    return {'volumes': probe['read'] * len(fold_of) / max(1, min(worker_count(config), len(fold_of))),
            'localisers': sum(config['loc_epochs'] * ((fold_of != f) & (fold_of >= 0)).sum() * probe['step']
                              for f in folds),
            'validation': sum((fold_of == f).sum() for f in folds) * per_model,
            'submission': len(submission_studies(config)) * (probe['read'] + len(folds) * per_model)}


def after_training_plan(probe, samples, config):
    """AFTER_TRAINING_S: [k] = projected seconds of the work after training once the first k folds of train_folds
    finished."""
    return [0.0] + [float(sum(after_training_parts(probe, samples, config, config['train_folds'][:k]).values()))
                    for k in range(1, len(config['train_folds']) + 1)]


class Localisation(NamedTuple):
    """What the localisation section hands the kernel (localise_and_submit): the localisers' measurement with the
    volumes of the studies plot_localisation shows only, the cost of localisation (localisation_cost) and the
    submitted candidate per condition (choose_probabilities), both None where the classifiers did not load."""
    localisers: Localisers
    cost: dict | None = None
    choice: dict | None = None


def localise_and_submit(device, samples, oof, folds, config, workers, deadline=None, probe=None):
    """The section's GPU work (run through on_device): in a training run (`samples` given) the localisers of the
    finished `folds`, the cost of localisation on their validation rows and the choice of the submitted
    probabilities per condition from it (probabilities.json); then, where the data root has the test files,
    submission.csv. The localisers' epochs end by `deadline` less what the work after them needs
    (after_training_parts from the `probe`). A submission run (submit_from, `samples` None) loads every fold of
    that folder. Where the data root has the test files, nothing before the submission can stop it: a failure
    leaves every row on the priors, with the error (write_submission). Returns (Localisation or None, submission
    facts or None)."""
    loc, cost, choice, run, error, out = None, None, None, None, None, Path(config['output_dir'])
    try:
        if samples is not None:
            write_atomic(out / 'priors.json', json.dumps(label_priors(config['data_root'])))
            if deadline is not None and probe is not None:
                parts = after_training_parts(probe, samples, config, folds)
                deadline -= parts['validation'] + parts['submission']
            loc = train_localisers(samples, folds, config, device, workers, deadline)
        run = load_run(config['submit_from'] or out, config, device, folds=folds)
        if loc is not None:
            cost = localisation_cost(oof, loc, run, config, device, workers)
            run['choice'] = choice = choose_probabilities(cost['frame'])
            write_atomic(out / 'probabilities.json', json.dumps(choice, indent=1))
    except Exception as failure:
        if not has_test_files(config):
            raise
        print(traceback.format_exc())
        error = f'{type(failure).__name__}: {failure}'
        warn(f'localisation section: {error}; the submission is written ' + (
            'with every row on the priors' if run is None else "without the out-of-fold choice ('corrected')"))
    result = None if loc is None else Localisation(loc._replace(  # the kernel gets the volumes its figures show,
        target_volumes=None, found={series: {s: found[s] for s in plotted_studies(loc, series)}  # not a fold's worth
                                    for series, found in loc.found.items()}), cost, choice)
    if has_test_files(config):
        return result, write_submission(run, config, device, workers, error if run is None else None)[1]
    if samples is None:
        raise FileNotFoundError(f"submit_from is set but {config['data_root']} has no test_series_descriptions.csv, "
                                'test_images/ and sample_submission.csv (on Kaggle: add the competition as an input)')
    return result, None


# %% [markdown]
# ### 7.15 What the section prints and reports

# %% tags=["defs"]
def cost_line(cost):
    """The report's one line on the cost of localisation."""
    oracle, pred = cost['oracle'], cost['predicted']
    return (f"- Cost of localisation ({cost['rows']} validation rows, the same final models): BA "
            f"{oracle['ba']:.4f} oracle -> {pred['ba']:.4f} predicted points; mean of the terms prior-corrected "
            f"{oracle['corrected']['competition_score_part']:.4f} -> "
            f"{pred['corrected']['competition_score_part']:.4f}, "
            f"raw {oracle['competition_score_part']:.4f} -> {pred['competition_score_part']:.4f} (lower is better; "
            f"{cost['fallback_rows']} rows on priors: no predicted point or crop).")


def cost_table(cost, choice):
    """The official metric's terms with oracle and predicted points side by side on the same rows, raw and
    prior-corrected, and the candidate each term's conditions are submitted with (choose_probabilities)."""
    oracle, pred = cost['oracle'], cost['predicted']
    chosen = {term: ', '.join(sorted({v['candidate'] for c, v in choice.items()
                                      if METRIC_GROUPS.get(term, SPINAL) in c}))
              for term in oracle['competition_terms']}
    return pd.DataFrame({'oracle raw': oracle['competition_terms'], 'predicted raw': pred['competition_terms'],
                         'oracle corrected': oracle['corrected']['competition_terms'],
                         'predicted corrected': pred['corrected']['competition_terms'],
                         'submitted': chosen}).rename_axis('term').round(4)


def choice_table(choice):
    """Per condition, each submission candidate's out-of-fold loss (condition_loss) side by side, the fitted
    temperatures and the candidate submitted."""
    return pd.DataFrame({c: {**{k: v[k] for k in (*SUBMISSION_KINDS, 'raw T', 'corrected T')},
                             'T raw': v['temperatures']['raw'], 'T corrected': v['temperatures']['corrected'],
                             'submitted': v['candidate']} for c, v in choice.items()}).T.rename_axis('condition')


def localisation_report(result, submission_info, config):
    """Markdown lines of the report's 'Localisation and submission' section (empty when the section did not run);
    `result`: a Localisation."""
    if result is None and submission_info is None:
        return []
    lines = ['## Localisation and submission', '']
    if result is not None:
        loc, cost, choice = result
        lines += [(f"Localisers: a UNet of width {config['loc_channels']} per series type "
                   f"({', '.join(f'{s}: {len(c)} condition(s)' for s, c in loc.series.items())}) on "
                   f"{config['loc_size']} px slices, {config['loc_epochs']} epochs, one set per trained fold, measured "
                   'on its validation studies, each predicted as a test study is (its series by the same rule, every '
                   'slice from the localisers; slice accuracy by anatomical position; point error: patient mm between '
                   'the predicted and annotated points; a point not placed counts as a wrong slice):'), '',
                  md_table(loc.metrics), '']
        if cost is not None:
            lines += [cost_line(cost), '',
                      ("The official metric's terms on those rows, oracle and predicted points (lower is better; "
                       "'submitted': the candidate submission.csv takes for the term's conditions):"), '',
                      md_table(cost_table(cost, choice)), '',
                      ("Submission candidates per condition: the out-of-fold loss at predicted points of each "
                       "(the condition's weighted log loss; the spinal canal's plus any_severe_spinal), raw, "
                       "prior-corrected, the training folds' priors alone, and raw or corrected with a temperature "
                       'T (p^(1/T)). The temperatures are fitted and the candidate chosen on these same rows '
                       '(probabilities.json), so the submitted loss is optimistic for them:'), '',
                      md_table(choice_table(choice).round(4)), '']
            if cost['fallback_rows']:
                lines.append("- Validation rows on priors (their fold's training priors: no predicted point or crop), "
                             'by condition: ' + ', '.join(f'{c} {n}' for c, n in
                                                          cost['fallback_by_condition'].items()) + '.')
        failed = {s: len(f) for s, f in loc.failed.items() if f}
        if failed:
            lines.append(f'- Studies whose annotated series could not be read (no localiser target): {failed}.')
        short = {(f, s): len(v) for f, by in loc.losses.items() for s, v in by.items()
                 if len(v) < config['loc_epochs']}
        if short:
            lines.append('- Localisers stopped by the time budget: ' + ', '.join(
                f"fold {f} {s} after epoch {n} of {config['loc_epochs']}" for (f, s), n in short.items()) + '.')
        lines.append('')
    if submission_info is not None:
        lines += submission_lines(submission_info)
    return lines


def submission_lines(info):
    """The report's lines on submission.csv."""
    untrained = sorted(set(CONDITION_SERIES) - set(info['conditions']))
    on_priors = pd.DataFrame(info['on_priors'], columns=['study_id', 'condition', 'level', 'reason'])
    lines = [f"- **The prediction failed as a whole; every row is on the priors**: {info['error']}."] if info.get(
        'error') else []
    lines += [(f"- submission.csv: {info['rows']} rows, {info['studies']} test studies; rows from the localisers and "
               f"the fold models ({', '.join(info['folds'])}) averaged, by condition: "
               + ', '.join(f'{c} {n}' for c, n in info['rows_from_model'].items()) + '.'),
              (f'- Trained rows on priors (train.csv\'s class frequencies for that condition and level, add-one '
               f'smoothed): {len(on_priors)}' + ('.' if on_priors.empty else ', by condition and reason: ' + '; '.join(
                   f'{c}: {r} ({n})' for (c, r), n in on_priors.groupby(['condition', 'reason']).size().items())
                   + '.'))]
    if untrained:
        lines.append(f'- Not trained here, all rows on priors: {", ".join(untrained)}.')
    lines += ['- Probabilities submitted per condition (raw softmax, or prior-corrected: re-weighted to the metric\'s '
              '1/2/4 row weights, the priors the same way; or the priors alone; T: a temperature): ' + ', '.join(
                  f'{c} {v if isinstance(v, str) else v["candidate"]}'
                  + (f" (T {v['temperature']:g})" if isinstance(v, dict) and v['temperature'] != 1 else '')
                  for c, v in info['probabilities'].items()) + '.',
              f"- Prediction time: {info['seconds_per_study']:.2f} s per study on {info['device']}.", '']
    return lines


# %% [markdown]
# ## 8. Task 3.1: training
#
# ### 8.1 The plan's checks
# Each validated epoch prints the predictions per class (a class predicted fewer than 3 times is *dead*, fewer than
# 10 *marginal*) and saves a best model only when balanced accuracy improves **and** both minority recalls reach
# `min_minority_recall`. The plan's Critical Checkpoints (epochs 1, 3, 10) are checked as they pass, with train BA
# measured in eval mode on a fixed training subset.

# %% tags=["defs"]
DEAD_BELOW, MARGINAL_BELOW = 3, 10  # predictions of a class in one validation pass


PLAN_CHECKPOINT_EPOCHS = (1, 3, 10)


PLAN_CHECKPOINTS = [  # (epoch, quantity, expected low, expected high, the plan's action when below)
    (1, 'classes predicted', 3, 3, 'a class has 0 predictions: increase that class weight 2x'),
    (1, 'recall Normal/Mild', 0.75, 0.85, ''),
    (1, 'recall Moderate', 0.25, 0.40, ''),
    (1, 'recall Severe', 0.25, 0.40, ''),
    (1, 'balanced accuracy', 0.50, 0.55, 'if BA < 45 %: check loss values, may need a higher overall LR'),
    (3, 'recall Moderate', 0.45, 0.60, 'if Moderate < 40 %: increase its weight 4.0 -> 5.0'),
    (3, 'recall Severe', 0.50, 0.65, 'if Severe < 45 %: increase its weight 6.0 -> 8.0'),
    (3, 'balanced accuracy', 0.65, 0.70, ''),
    (10, 'balanced accuracy', 0.72, 0.76, 'if BA plateaued < 72 %: extend training to epoch 30'),
    (10, 'min class recall', 0.60, 1.00, ''),
    (10, 'train - val BA gap', None, 0.05, 'if overfitting (gap > 5 %): increase dropout to 0.4'),
]


def classification_metrics(labels, probs):
    """Per-class recall, balanced accuracy, predictions per class, confusion matrix (scikit-learn)."""
    preds = np.asarray(probs).argmax(1)
    return {
        'recall': recall_score(labels, preds, labels=[0, 1, 2], average=None, zero_division=0).tolist(),
        'ba': float(balanced_accuracy_score(labels, preds)),
        'pred_counts': np.bincount(preds, minlength=3).tolist(),
        'confusion': confusion_matrix(labels, preds, labels=[0, 1, 2]).tolist(),
    }


def dead_class_warnings(pred_counts):
    return [f"{CLASSES[c]} predicted {n}x: {'DEAD' if n < DEAD_BELOW else 'marginal'}"
            for c, n in enumerate(pred_counts) if n < MARGINAL_BELOW]


def save_gate(metrics, best_ba, config):
    """(save?, why): a new best needs higher BA and min(Moderate, Severe) recall >= min_minority_recall."""
    minority = min(metrics['recall'][1], metrics['recall'][2])
    if metrics['ba'] <= best_ba:
        return False, f"BA {metrics['ba']:.3f} <= best {best_ba:.3f}"
    if minority < config['min_minority_recall']:
        return False, f"BA improved but minority recall {minority:.2f} < {config['min_minority_recall']:.2f}: not saved"
    return True, f"BA improved to {metrics['ba']:.3f}: saved"


def is_validation_epoch(epoch, config):
    """Every val_every-th epoch (val_every 0: none of those), the plan's checkpoint epochs and the last."""
    every = config['val_every']
    return epoch in PLAN_CHECKPOINT_EPOCHS or epoch == config['epochs'] or (every > 0 and epoch % every == 0)


def checkpoint_rows(epoch, metrics, train_ba):
    """The plan's Critical Checkpoint rows for this epoch: expected vs measured, PASS/WARN."""
    values = {'classes predicted': sum(n > 0 for n in metrics['pred_counts']),
              'balanced accuracy': metrics['ba'], 'min class recall': min(metrics['recall']),
              'train - val BA gap': np.nan if train_ba is None else train_ba - metrics['ba'],
              **{f'recall {name}': r for name, r in zip(CLASSES, metrics['recall'])}}
    rows = []
    for at, quantity, low, high, action in PLAN_CHECKPOINTS:
        if at == epoch:
            value = values[quantity]
            ok = value <= high if low is None else value >= low
            expected = f'<= {high:g}' if low is None else (f'{low:g}' if low == high else f'{low:g}-{high:g}')
            rows.append({'epoch': epoch, 'quantity': quantity, 'expected': expected, 'measured': round(value, 3),
                         'status': 'PASS' if ok else 'WARN', 'action': '' if ok else action})
    return rows


def plan_weight_actions(epoch, metrics, weights):
    """The plan's class-weight actions (opt-in): new weights and what was done."""
    new, done = list(weights), []
    if epoch == 1:
        for c, n in enumerate(metrics['pred_counts']):
            if n == 0:
                new[c] *= 2
                done.append(f'{CLASSES[c]} never predicted: weight x2 -> {new[c]:g}')
    if epoch == 3:
        for c, floor, factor in ((1, 0.40, 5 / 4), (2, 0.45, 8 / 6)):  # 4.0 -> 5.0 and 6.0 -> 8.0
            if metrics['recall'][c] < floor:
                new[c] *= factor
                done.append(f'{CLASSES[c]} recall {metrics["recall"][c]:.2f} < {floor}: weight -> {new[c]:g}')
    return new, done


# %% [markdown]
# ### 8.2 Optimiser, schedule, precision and loaders
# AdamW with two learning-rate groups (backbone `backbone_lr`, the rest `learning_rate`); linear warmup then cosine
# decay, stepped per batch; AMP on CUDA (`precision`), float32 on the CPU; plain shuffling, no class-balancing
# sampler (the class weights carry the imbalance).

# %% tags=["defs"]
def warmup_cosine(optimizer, config, steps_per_epoch):
    """Linear warmup over warmup_epochs, then cosine decay to 0 at the last epoch; stepped per batch."""
    total, warmup = config['epochs'] * steps_per_epoch, config['warmup_epochs'] * steps_per_epoch
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    if warmup == 0:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup - 1)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def make_optimizer(model, config):
    backbone = [p for p in model.backbone.parameters()]
    ids = {id(p) for p in backbone}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.AdamW([{'params': backbone, 'lr': config['backbone_lr']},
                              {'params': rest, 'lr': config['learning_rate']}],
                             weight_decay=config['weight_decay'])


def precision_in_use(device, config):
    """The precision that really runs: CONFIG['precision'] on CUDA; on the CPU bf16 when asked for (it has
    no fast fp16), else fp32. Reports name this, not the setting."""
    if device.type == 'cuda' or config['precision'] != 'fp16':
        return config['precision']
    return 'fp32'


def autocast(device, config):
    dtype = AMP_DTYPES[precision_in_use(device, config)]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def make_loader(dataset, config, device, train, generator=None, every_epoch=False, sampler=None):
    """Training loaders shuffle; `every_epoch` loaders (training, validation) keep their worker processes
    between epochs instead of forking new ones each time. A `sampler` (several processes: each one's share)
    replaces the shuffle; a training batch is then batch_size / processes per process."""
    workers = worker_count(config)  # and config['prefetch_factor']: both fitted to /dev/shm by check_resources
    batch = config['batch_size'] // world_size() if train else 2 * config['batch_size']
    return DataLoader(dataset, batch_size=batch, shuffle=train and sampler is None, sampler=sampler,
                      generator=generator, drop_last=train and len(dataset) > config['batch_size'],
                      num_workers=workers, pin_memory=device.type == 'cuda',
                      multiprocessing_context='fork' if workers else None,
                      persistent_workers=bool(workers) and (train or every_epoch),
                      prefetch_factor=config['prefetch_factor'] if workers else None, collate_fn=collate_one_channel)


# %% [markdown]
# ### 8.3 One training epoch
# Gradient clipping at `clip_grad_norm`, with the pre-clip norm logged.

# %% tags=["defs"]
def train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, device, config, state, epoch):
    """One pass over the training loader; returns loss, train BA, gradient-norm statistics, LR per step.
    A step whose gradient norm is not finite is never applied, under any precision (guarded_step, skip_step)."""
    model.train()
    losses, norms, preds, labels, lrs = [], [], [], [], []
    skipped = 0
    bar = tqdm(loader, desc=f'epoch {epoch}', leave=False, mininterval=30)  # papermill logs every refresh
    for step, batch in enumerate(bar):
        mask = batch['mask'].to(device, non_blocking=True)
        images = to_model_input(batch['image'].to(device, non_blocking=True),
                                batch['aug'].to(device, non_blocking=True), mask, config['aug_noise'],
                                config['img_size'])
        target = batch['label'].to(device, non_blocking=True)
        saved_bn = batchnorm_buffers(model)  # the forward moves them; a skipped step puts them back
        with autocast(device, config):
            logits, _ = model(images, batch['level'].to(device, non_blocking=True), mask)
            loss = criterion(logits, target)
        # backward even on a non-finite loss: under DDP every process must join the gradient all-reduce,
        # and the decision then rests on the same global norm everywhere
        skip = functools.partial(skip_step, loss, scaler, device, config, state, f'epoch {epoch} step {step}',
                                 f"samples {sample_ids(loader.dataset, batch['index'])}")
        share = global_batch_share(criterion, target)  # several processes: this one's part of the global batch
        norm = guarded_step(model, loss * share, optimizer, scaler, config['clip_grad_norm'], saved_bn, state, skip)
        if norm is not None:
            norms.append(norm)
            losses.append(loss.detach().float() * share / world_size())  # summed over processes: the batch's loss
            preds.append(logits.detach().argmax(1))
            labels.append(target)
        else:
            skipped += 1
        lrs.append([g['lr'] for g in optimizer.param_groups])
        if scheduler is not None:
            scheduler.step()
        if step % 10 == 0 and losses:  # this process's rows only (the epoch's figure is over all processes)
            bar.set_postfix(loss=f'{world_size() * torch.stack(losses[-10:]).mean().item():.3f}',
                            lr=f"{lrs[-1][1]:.1e}")
    if skipped:
        print(f'epoch {epoch}: {skipped} step(s) with a non-finite gradient norm skipped (not applied)')
    losses = torch.stack(losses) if losses else None  # a step is skipped in every process or in none
    if losses is not None and world_size() > 1:
        dist.all_reduce(losses)
    agree_on_buffers(model)  # several processes: process 0's BatchNorm statistics in all
    preds, labels = gather_batches(device, preds, labels)  # several processes: train BA over all processes' rows
    norms = torch.stack(norms).float().cpu().numpy() if norms else np.zeros(0)
    stat = (lambda f: float(f(norms))) if len(norms) else (lambda f: float('nan'))
    train_ba = (float(balanced_accuracy_score(torch.cat(labels).cpu().numpy(), torch.cat(preds).cpu().numpy()))
                if preds else float('nan'))
    return {'train_loss': float(losses.mean()) if losses is not None else float('nan'), 'train_ba': train_ba,
            'grad_norm_mean': stat(np.mean), 'grad_norm_max': stat(np.max),
            'clipped_frac': stat(lambda n: (n > config['clip_grad_norm']).mean()),
            'nonfinite_steps': skipped}, lrs


# %% [markdown]
# ### 8.4 A guarded optimiser step
# A step whose loss or gradients are not finite is skipped, with the BatchNorm buffers restored, and counted; after
# `max_nonfinite_steps` the run stops with advice for the precision in use.

# %% tags=["defs"]
NONFINITE_ADVICE = {  # what to try when steps keep coming out non-finite, by the precision that ran
    'fp16': "fp16's range is small: use precision='bf16' on a GPU that has it (compute capability 8.0 or "
            'newer: A100, L4, H100, RTX Pro 6000; not the T4 or P100), or lower the learning rates',
    'bf16': 'lower the learning rates (learning_rate, backbone_lr) and inspect the samples listed above',
    'fp32': 'lower the learning rates (learning_rate, backbone_lr) and inspect the samples listed above',
}


def batchnorm_buffers(model):
    """(buffer, copy) for every BatchNorm running statistic of `model`: a forward in train mode updates them in
    place, so a step that is then skipped must put them back (guarded_step)."""
    return [(b, b.clone()) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in m.buffers()]


def guarded_step(model, loss, optimizer, scaler, max_norm, saved_bn, state, skip):
    """The training step of every model here, after its forward: backward through the GradScaler, unscale, clip
    the global gradient norm to `max_norm` (math.inf: measured, never clipped) and apply the optimizer step only
    when that norm is finite. A skipped step also puts BatchNorm's running statistics back to `saved_bn` (taken by
    batchnorm_buffers before the forward that went non-finite) and calls skip() (skip_step: counts, reports, may
    stop the run). Returns the pre-clip norm, or None when the step was skipped."""
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    applied = bool(torch.isfinite(norm))  # the one host sync per step
    if applied:
        scaler.step(optimizer)
        state['nonfinite_pending'] = 0  # the skips held before it were the GradScaler's calibration
    else:
        with torch.no_grad():
            for buffer, value in saved_bn:
                buffer.copy_(value)
        skip()  # before scaler.update: skip_step judges the scale this step ran at
    scaler.update()  # with a GradScaler: a skipped step halves the loss scale
    optimizer.zero_grad(set_to_none=True)  # a skipped step's gradients are dropped here
    return norm if applied else None


def skip_step(loss, scaler, device, config, state, where, trained_on):
    """Count and report a step whose gradient norm is not finite (guarded_step did not apply it); beyond
    max_nonfinite_steps counted skips, stop with advice for the precision that ran. `where` (e.g. 'epoch 3 step
    7') and `trained_on` (e.g. "samples [...]") go into the warning.
    Under fp16 a GradScaler overflow while the loss scale is above 1 may be its calibration (the scaler halves the
    scale and retries): such a skip is held as pending in state['nonfinite_pending'], consecutive pending skips
    add up, and an applied step clears them (guarded_step). A skip at the scale's floor (<= 1) counts itself and
    every pending skip before it towards max_nonfinite_steps: a NaN that persists from the default scale 65536
    stops the run once 16 halvings have brought the scale to 1, not max_nonfinite_steps skips later."""
    if scaler.is_enabled() and scaler.get_scale() > 1.0:
        state['nonfinite_pending'] = state.get('nonfinite_pending', 0) + 1
        return
    pending = state.get('nonfinite_pending', 0)
    state['nonfinite'] += 1 + pending
    state['nonfinite_pending'] = 0
    before = f'; counted with the {pending} skipped just before it at higher loss scales' if pending else ''
    warn(f'{where}: non-finite gradient norm (loss {loss.item():.4g}); step skipped; {trained_on}{before}')
    if state['nonfinite'] > config['max_nonfinite_steps']:
        ran = precision_in_use(device, config)
        raise FloatingPointError(f"{state['nonfinite']} non-finite steps under precision {ran} (more than "
                                 f"max_nonfinite_steps = {config['max_nonfinite_steps']}): stopping. "
                                 f'{NONFINITE_ADVICE[ran]}.')


# %% [markdown]
# ### 8.5 Evaluation and SWA's BatchNorm
# SWA averages the weights of the last epochs (`use_swa`, `swa_start_epoch`, `swa_lr`, with
# `torch.optim.swa_utils`); its BatchNorm statistics are recomputed before the averaged model is evaluated.
# `predict` averages the five views of crops handed out wider than `img_size`.

# %% tags=["defs"]
def sample_ids(dataset, index):
    """Sample ids (study_condition_level, as the competition's row ids) of dataset positions, for error messages."""
    conditions = dataset.config['conditions']
    return [f'{dataset.study_ids[i]}_{conditions[dataset.levels[i] // len(LEVELS)]}_'
            f'{LEVELS[dataset.levels[i] % len(LEVELS)]}' for i in index.tolist()]


@torch.inference_mode()
def predict(model, loader, criterion, device, config):
    """Probabilities, attention weights and the weighted loss over a whole (unshuffled) loader. A loader of crops
    wider than img_size (RSNADatasetV9's `pad`) gets the mean softmax and attention of its tta_views, and the loss
    of that mean."""
    model.eval()
    logits, weights, labels = [], [], []
    for batch in loader:
        level, mask = batch['level'].to(device, non_blocking=True), batch['mask'].to(device, non_blocking=True)
        outs = []
        for view in tta_views(batch['image'].to(device, non_blocking=True), config['img_size']):
            with autocast(device, config):
                outs.append(model(to_model_input(view), level, mask))
        if len(outs) == 1:
            out, attn = outs[0]
        else:  # log of the views' mean probabilities: softmax gives that mean back, the loss is its cross entropy
            out = torch.stack([F.softmax(o.float(), 1) for o, _ in outs]).mean(0).log()
            attn = torch.stack([a.float() for _, a in outs]).mean(0)
        logits.append(out.float())
        weights.append(attn.float())
        labels.append(batch['label'].to(device, non_blocking=True))
    logits, weights, labels = gather_batches(device, logits, weights, labels)  # several processes: every row, in order
    logits, labels = torch.cat(logits), torch.cat(labels)
    return {'loss': float(criterion(logits, labels)), 'probs': F.softmax(logits, 1).cpu().numpy(),
            'attention': torch.cat(weights).cpu().numpy(), 'labels': labels.cpu().numpy()}


def evaluate(model, loader, criterion, device, config):
    out = predict(model, loader, criterion, device, config)
    return {**out, **classification_metrics(out['labels'], out['probs'])}


def recompute_swa_batchnorm(swa_model, loader, device):
    """BatchNorm running statistics for the averaged weights: the averaged model never saw a batch, so
    its copied statistics belong to no set of weights (torch.optim.swa_utils.update_bn on the backbone,
    the only part with BatchNorm)."""
    images = (to_model_input(b['image'].to(device, non_blocking=True)).flatten(0, 1) for b in loader)
    update_bn(images, swa_model.module.backbone)
    average_batchnorm_over_processes(swa_model.module.backbone, len(loader))  # several processes: all shards


# %% [markdown]
# ### 8.6 Checkpoints that survive an interruption
# Files are written atomically (a temporary file, then a rename). A checkpoint after every epoch holds the model,
# optimiser, scheduler, SWA, scaler and every random state, so an interrupted run resumes exactly.

# %% tags=["defs"]
def save_atomic(obj, path):
    """torch.save to a temporary file renamed over `path`: a save that dies midway never leaves half a
    checkpoint under the real name. A failed save removes its partial file and names the path, the free
    space and the cause (a full disk shows in torch as 'unexpected pos ...' or as OSError ENOSPC)."""
    path = Path(path)
    tmp = path.with_suffix('.tmp')
    try:
        torch.save(obj, tmp)
    except (RuntimeError, OSError) as error:
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        full = getattr(error, 'errno', None) == errno.ENOSPC or any(
            text in str(error) for text in ('unexpected pos', 'No space left', 'file write failed'))
        cause = 'no space left on its disk' if full else f'{type(error).__name__}: {str(error)[:300]}'
        raise OSError(f'Could not save {path}: {cause} ({free / GiB:.2f} GiB free there). The partial file was '
                      'removed; the previous version under that name (if any) is intact.') from error
    tmp.replace(path)


def write_atomic(path, text):
    """Write via a temporary file: an interrupted write never leaves half a file under the real name."""
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(text)
    tmp.replace(path)


def rng_states():
    return {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    torch.set_rng_state(states['torch'].cpu())  # .cpu(): a checkpoint loaded with map_location='cuda' moved it
    np.random.set_state(states['numpy'])
    random.setstate(states['python'])
    if states['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states['cuda']])


def process_seed(config, fold, rank, epoch=0):
    """Seed of process `rank`'s random streams (dropout masks, augmentation noise) in a fold: process 0's is the
    fold's seed, so one process draws as it always did; `epoch` > 0: a stream started afresh after that epoch."""
    return config['seed'] + fold + 10_000 * rank + 1_000_000 * epoch


def restore_rng_states(saved, f, config):
    """This process's random streams from a checkpoint's 'rng': a list by rank (an older checkpoint's single dict:
    process 0's streams, in every process, as before). A process beyond the list (resumed on more processes than
    saved it) starts its own stream from process_seed at the checkpoint's epoch."""
    saved = [saved] * world_size() if isinstance(saved, dict) else saved
    if world_size() > len(saved) and is_main_process():  # process 0 says it (the others' output is silenced)
        print(f"fold {f.fold}: the checkpoint holds the random streams of {len(saved)} process(es); processes "
              f"{len(saved)}-{world_size() - 1} start new ones (from seed, fold, rank and epoch {f.state['epoch']})")
    if process_rank() < len(saved):
        set_rng_states(saved[process_rank()])
    else:
        seed_everything(process_seed(config, f.fold, process_rank(), f.state['epoch']))


# %% [markdown]
# ### 8.7 Several GPUs: the processes
# With `processes: 'auto'` and more than one GPU, each fold trains in one process per GPU (DistributedDataParallel),
# forked from this notebook. A failure in any process stops them all with its error.

# %% tags=["defs"]
# --- Several processes per fold: DistributedDataParallel, one process per GPU, forked from the notebook ---
# A notebook cannot torchrun itself, so the kernel forks the processes (as accelerate's notebook_launcher does);
# the kernel must not have initialised CUDA before (a forked child could not use it). The functions below are
# the whole of it; train_fold and its helpers call them at the lines marked "several processes", and each is a
# no-op in a single process.
DDP_TIMEOUT = datetime.timedelta(minutes=30)  # a collective waiting longer fails (all processes stop), never hangs


STARTUP_TIMEOUT = datetime.timedelta(minutes=5)


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def process_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process():
    """Process 0, the only one that writes checkpoints (and the one whose result reaches the notebook)."""
    return process_rank() == 0


def process_device(rank):
    """GPU `rank` when there are GPUs, else the CPU (N CPU processes: tests, CI, machines without GPUs)."""
    return torch.device('cuda', rank) if torch.cuda.device_count() else torch.device('cpu')


def process_backend(device):
    return 'nccl' if device.type == 'cuda' else 'gloo'


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def process_main(rank, world, port, parent, folder, fn, timeout):
    """One forked process: dies with the kernel, joins the process group, runs fn(device). Process 0 writes fn's
    value (and the warnings it printed, for the report); a failing process writes its traceback, timed, so that
    the launcher shows the first failure, not a peer's 'connection closed'."""
    die_with_parent(parent)
    device = process_device(rank)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    # One intra-op thread: GNU OpenMP cannot start a parallel region in a child forked from a process whose OpenMP
    # threads exist (the kernel's CPU forward passes started them): it waits for them forever. On a GPU the CPU
    # side of the work is small; on the CPU (tests, the demo) this costs speed, and changes results only by float
    # rounding (bench/point_gap.py also runs on one thread to reproduce a run's figures to the digit).
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    warnings_before = len(WARNINGS)
    try:
        dist.init_process_group(process_backend(device), rank=rank, world_size=world, timeout=timeout)
        with contextlib.ExitStack() as quiet:
            if rank:  # the others would repeat process 0's lines and progress bars
                devnull = quiet.enter_context(open(os.devnull, 'w'))
                quiet.enter_context(contextlib.redirect_stdout(devnull))
                quiet.enter_context(contextlib.redirect_stderr(devnull))
            value = fn(device)
        if rank == 0:
            torch.save({'value': value, 'warnings': WARNINGS[warnings_before:]}, Path(folder) / 'result.pt')
        dist.destroy_process_group()
    except BaseException:
        (Path(folder) / f'error{rank}.txt').write_text(f'{time.time()}\n{traceback.format_exc()}')
        raise


def first_failure(folder, error):
    """The traceback of the process that failed first, else what torch.multiprocessing said (a killed process)."""
    failures = sorted((float(text.split('\n', 1)[0]), path.stem.removeprefix('error'), text.split('\n', 1)[1])
                      for path in Path(folder).glob('error*.txt') for text in [path.read_text()])
    if not failures:
        return f'{type(error).__name__}: {error}'.strip()
    _, rank, trace = failures[0]
    return f'process {rank} failed first:\n{trace}'


def run_in_processes(fn, processes, timeout=DDP_TIMEOUT):
    """fn(device) in `processes` processes forked from this one and joined in one process group (NCCL on GPUs,
    gloo on CPUs); returns process 0's value. A failure in any process (an exception, a kill) ends all of them
    and raises here with the first failure's traceback; a collective waiting longer than `timeout` fails rather
    than hangs; no process outlives this one."""
    if torch.cuda.is_initialized():
        raise RuntimeError('CUDA was initialised in the notebook process before training: forked processes cannot '
                           "use it. Restart the kernel and run all cells, or set CONFIG['processes'] = 1.")
    with tempfile.TemporaryDirectory(prefix='le3ba_processes_') as folder:
        context = torch.multiprocessing.start_processes(
            process_main, args=(processes, free_port(), os.getpid(), folder, fn, timeout), nprocs=processes,
            join=False, start_method='fork')
        try:
            while not context.join():  # on a failure join() ends the other processes, then raises
                pass
        except BaseException as error:
            for process in context.processes:  # an interrupt of the notebook reaches here without that
                if process.is_alive():
                    process.kill()
                process.join()
            if isinstance(error, KeyboardInterrupt):
                raise
            raise RuntimeError(first_failure(folder, error)) from None
        if not (Path(folder) / 'result.pt').exists():  # e.g. an interrupt inside the processes: they exit quietly
            raise RuntimeError(first_failure(folder, 'the processes ended without a result (interrupted?)'))
        out = torch.load(Path(folder) / 'result.pt', weights_only=False)
    WARNINGS.extend(out['warnings'])
    return out['value']


def error_line(error):
    """An exception in one line: the last line of the traceback a run_in_processes error carries (the failed
    process's exception), else 'Type: message'."""
    text = str(error).strip()
    return text.splitlines()[-1] if text.startswith('process ') and '\n' in text else f'{type(error).__name__}: {text}'


# %% [markdown]
# ### 8.8 Several GPUs: inside a fold
# The global batch stays `batch_size`; validation covers every row once; process 0 takes the decisions and writes
# the files. With one process the same code runs unchanged.

# %% tags=["defs"]
def on_device(fn):
    """fn(device) for the GPU work outside training (the localisers, predicted points, the submission, the probe
    of their time): in one forked process, so that this kernel stays CUDA-free and the next Run all can still
    fork one training process per GPU; here when the kernel initialised CUDA already (training on one GPU ran
    here, so there is nothing to keep free). fn's value must hold CPU data only: loading CUDA tensors here would
    initialise CUDA."""
    if torch.cuda.is_initialized():
        return fn(process_device(0))
    return run_in_processes(fn, 1)


def distributed_model(model, device, config):
    """What a training step runs: `model` wrapped in DistributedDataParallel (gradients averaged over the
    processes in backward), with SyncBatchNorm when sync_bn on GPUs; `model` itself in a single process. The
    wrapper shares model's parameters, so model.state_dict() is what checkpoints store, as with one process.
    Buffers are not broadcast at each forward: that is a collective, and evaluation shards may differ in batch
    count; agree_on_buffers gives every process process 0's at the end of each epoch instead."""
    if world_size() == 1:
        return model
    if config['sync_bn'] and device.type == 'cuda':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # the newer name of the switch where it exists (torch 2.14 deprecates broadcast_buffers; Kaggle's 2.10 has
    # only that); both leave the buffers alone at each forward
    no_buffer_sync = ({'forward_sync_buffers': False} if 'forward_sync_buffers' in
                      inspect.signature(DistributedDataParallel).parameters else {'broadcast_buffers': False})
    return DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None,
                                   find_unused_parameters=config['freeze_backbone_epochs'] > 0, **no_buffer_sync)


def training_sampler(dataset, config):
    """This process's share of each training batch. One shuffle keyed on (seed, epoch) for any number of
    processes (set_epoch before each epoch), each process taking every N-th sample of it: N processes at
    batch_size / N make the same global batches as one process at batch_size. drop_last: every process takes
    the same number of steps."""
    return DistributedSampler(dataset, num_replicas=world_size(), rank=process_rank(), shuffle=True,
                              seed=config['seed'] * 1000, drop_last=True)


def evaluation_shard(dataset, config):
    """This process's share of an evaluation, as a sampler: a contiguous run of whole evaluation batches
    (make_loader's 2 x batch_size), so the processes together see every row exactly once (no padding rows, unlike
    DistributedSampler), gather_batches puts them back in order, and the batches are one process's batches.
    None in a single process."""
    if world_size() == 1:
        return None
    batch = 2 * config['batch_size']
    mine = np.array_split(np.arange(math.ceil(len(dataset) / batch)), world_size())[process_rank()]
    return range(min(len(dataset), mine[0] * batch), min(len(dataset), (mine[-1] + 1) * batch)) if len(mine) \
        else range(0)


def gather_batches(device, *outputs):
    """Lists of per-batch tensors of this process's shard -> the same lists over every process's shard, in
    process order (so in the rows' order: evaluation_shard), on `device`. Unchanged in a single process."""
    if world_size() == 1:
        return outputs
    everyone = gathered([[t.cpu() for t in batches] for batches in outputs])
    return tuple([t.to(device) for shard in everyone for t in shard[k]] for k in range(len(outputs)))


def gathered(value):
    """Every process's `value` (any picklable object), as a list by rank, in every process (a collective: every
    process must call it); [value] in a single process."""
    if world_size() == 1:
        return [value]
    everyone = [None] * world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def global_batch_share(criterion, target):
    """Factor that turns this process's weighted-mean loss into its share of the global batch's weighted mean.
    CompetitionWeightedCE divides by the summed class weights of its own rows and DDP averages the processes'
    gradients: without it, a process holding a Severe sample would count that sample less than one process
    training on the whole batch does. 1 in a single process."""
    if world_size() == 1:
        return 1.0
    mine = criterion.weights[target].sum()
    total = mine.detach().clone()
    dist.all_reduce(total)
    return (mine * world_size() / total).detach()


def agree_on_buffers(model):
    """Process 0's BatchNorm running statistics in every process (each process's own saw other rows): the
    evaluation and the checkpoint then use one model."""
    if world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def from_process0(value):
    """Process 0's value (any picklable object) in every process: a decision is taken once and shared."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_batchnorm_over_processes(module, batches):
    """SWA's BatchNorm statistics from every process's shard: update_bn averaged each process's own `batches`
    batches (momentum None: a plain mean over batches); their mean weighted by batch count is the mean over all
    batches, the statistics one process computes (the shards are whole batches: evaluation_shard)."""
    if world_size() == 1:
        return
    share = torch.tensor(float(batches), device=next(module.parameters()).device)
    total = share.clone()
    dist.all_reduce(total)
    for bn in (m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        for statistic in (bn.running_mean, bn.running_var):
            statistic.mul_(share / total)
            dist.all_reduce(statistic)
        dist.all_reduce(bn.num_batches_tracked)


# %% [markdown]
# ### 8.9 The start-up check
# Before a fold trains on several GPUs, one short step checks that the processes start and agree.

# %% tags=["defs"]
def startup_step(device, config):
    """The start-up check, in every process: one all-reduce, then one training step of the fold's model at the
    per-process batch (DDP, sync_bn, the precision), after which the replicas must be equal. Returns each
    process's device name."""
    world = dist.get_world_size()
    count = torch.ones(1, device=device)
    dist.all_reduce(count)
    if count.item() != world:
        raise RuntimeError(f'an all-reduce over {world} processes summed to {count.item()}')
    torch.manual_seed(config['seed'])
    model = SpineModelV9({**config, 'pretrained': 'none'}).to(device)
    step_model, optimizer = distributed_model(model, device, config), make_optimizer(model, config)
    scaler = torch.amp.GradScaler(device.type, enabled=precision_in_use(device, config) == 'fp16')
    b, size = config['batch_size'] // world, config['img_size']
    images = torch.rand(b, config['num_slices'], 3, size, size, device=device) + process_rank()
    target = torch.arange(b, device=device) % len(CLASSES)
    with autocast(device, config):
        levels = torch.arange(b, device=device) % len(LEVELS)
        logits, _ = step_model(images, levels, torch.ones(b, config['num_slices'], dtype=torch.bool, device=device))
        loss = CompetitionWeightedCE(config['class_weights']).to(device)(logits, target)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(sums, checksum)
    if any(not torch.equal(s, checksum) for s in sums):
        raise RuntimeError(f'the model replicas differ after one step: parameter sums {[s.item() for s in sums]}')
    names = [None] * world
    dist.all_gather_object(names, torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU')
    return names


def checked_processes(config):
    """The processes the folds train on: planned_processes, once they pass the start-up check (the processes
    start, one all-reduce, one training step). A failed check continues on one process and says why, loudly."""
    n = planned_processes(config)
    if n > 1:
        try:
            names = run_in_processes(functools.partial(startup_step, config=config), n, STARTUP_TIMEOUT)
        except Exception as error:
            warn(f'the {n} training processes failed their start-up check, so every fold trains on ONE process '
                 f'(set processes=1 to skip the check). The error:\n{str(error)[-2000:]}')
            return 1
        backend = process_backend(process_device(0))
        print(f'training on {n} processes (DistributedDataParallel, {backend}, global batch '
              f"{config['batch_size']} = {config['batch_size'] // n} per process): "
              + ', '.join(f'process {rank}: {name}' for rank, name in enumerate(names)))
        return n
    print(f"training on one process ({'GPU 0' if torch.cuda.device_count() else 'CPU'})")
    return 1


def run_fold(fold, samples, images, masks, config, device, processes, on_epoch_end=None, deadline=None,
             timeout=DDP_TIMEOUT):
    """train_fold here (processes 1), or in `processes` forked processes: the same result either way."""
    if processes == 1:
        return train_fold(fold, samples, images, masks, config, device, on_epoch_end, deadline)
    config = {**config, 'num_workers': worker_count(config) // processes}  # the processes share the CPU cores
    return run_in_processes(lambda dev: train_fold(fold, samples, images, masks, config, dev, on_epoch_end,
                                                   deadline), processes, timeout)


# %% [markdown]
# ### 8.10 The time budget
# A Kaggle session ends after 12 h, a Colab one sooner. `time_budget_h` (default by platform) ends training in time
# for the work after it: an epoch starts only if it, the fold's finish and the after-training work fit.

# %% tags=["defs"]
SESSION_LIMIT = {'kaggle': 'Kaggle GPU sessions end after 12 h',
                 'colab': "Colab's session limit varies (up to 12 h; the free tier often ends sooner)",
                 'local': 'no session limit known here'}


# time_budget_h = None: Kaggle keeps 1 h of its 12 h session for the last fold's finish, the report and
# saving the output; Colab's free tier gives no promise, so 5 h stops before the sessions that end
# soonest usually do (every epoch is checkpointed anyway, and continue_from picks a run up)
DEFAULT_BUDGET_H = {'kaggle': 11.0, 'colab': 5.0}


def now():
    return time.time()  # the training clock (tests replace it)


def time_budget_s(config):
    """Seconds from the setup cell in which training may start epochs; None = no limit."""
    hours = config['time_budget_h']
    hours = DEFAULT_BUDGET_H.get(runtime_environment()) if hours is None else hours
    return hours * 3600 if hours else None


AFTER_TRAINING_S = [0.0]  # [k]: projected seconds of the work after training (localisers, predicted points,
#                            submission) once k folds finished; the training cell measures it (after_training_plan)


def after_training_s(folds_finished):
    return AFTER_TRAINING_S[min(folds_finished, len(AFTER_TRAINING_S) - 1)]


def project_run(train_s, val_s, config, rows, epochs_done=1, folds_after=0, elapsed_s=0.0):
    """Projected seconds of this fold and of the whole run, from one epoch's measured training time
    (`train_s`) and one validation pass (`val_s`); `rows` = {'train', 'val', 'holdout'} sample counts.
    Counted: the remaining epochs and their validations, the train-BA probes at the plan's checkpoint
    epochs, and each fold's finish (SWA's BatchNorm pass over the training rows, the evaluation of up to
    three models, the hold-out predictions); `folds_after` whole folds follow this one; then the work after
    training (AFTER_TRAINING_S, measured per study before training)."""
    finish = finish_seconds([{'val_seconds': val_s}], rows)

    def fold_s(first):
        epochs = range(first, config['epochs'] + 1)
        checks = sum(e in PLAN_CHECKPOINT_EPOCHS or e == config['epochs'] for e in epochs)
        return len(epochs) * train_s + (sum(is_validation_epoch(e, config) for e in epochs) + checks) * val_s + finish

    fold, whole = fold_s(epochs_done + 1), fold_s(1)
    after = after_training_s(len(config['train_folds']))
    run = elapsed_s + fold + folds_after * whole + after
    budget = time_budget_s(config)
    text = (f'projected: this fold {fold / 3600:.2f} h more, a whole fold {whole / 3600:.2f} h, the run '
            f'{run / 3600:.2f} h from setup ({len(config["train_folds"])} fold(s)'
            + (f', {after / 3600:.2f} h of it after training: localisers, predicted points, submission'
               if after else '') + f'); {SESSION_LIMIT[runtime_environment()]}; time budget '
            + (f'{budget / 3600:.1f} h' if budget else 'none'))
    if budget and run > budget:
        text += ': the budget ends first, the fold that reaches it stops cleanly (continue_from goes on)'
    return {'fold_s': fold, 'whole_fold_s': whole, 'run_s': run, 'text': text}


def finish_seconds(history, rows):
    """Projected seconds of finish_fold from the fold's last validation pass (the last val_seconds of the epoch rows
    `history`; 0 before one): SWA's BatchNorm pass over the training rows and the hold-out predictions at the
    validation's forward-only rate, and the evaluation of up to three models. `rows`: {'train', 'val', 'holdout'}
    counts."""
    val_s = next((row['val_seconds'] for row in reversed(history) if 'val_seconds' in row), 0.0)
    return val_s / max(rows['val'], 1) * (rows['train'] + rows.get('holdout', 0)) + 3 * val_s


# %% [markdown]
# ### 8.11 The projected cost
# Before the first epoch the training cell prints the run's cost **projected from FLOPs**: the model's forward
# counted per series type (a training step 3x it), as a ratio to the plan's fold (the spinal canal alone, 256 px,
# 7 slices, 25 epochs), and hours on one T4, T4 x2 and an L4 from the plan's 3.5 h per fold. After epoch 1 the
# measured projection replaces it. `bench/cost.py` prints the same model for any CONFIG.

# %% tags=["defs"]
PLAN_RUN = {'conditions': [SPINAL], 'img_size': PLAN_IMG_SIZE, 'num_slices': 7, 'epochs': PLAN_SCHEDULE['epochs'],
            'val_every': 1,
            'holdout_frac': 0.0, 'num_folds': 5}  # the plan's run (v9_Implementation_Plan.md): every cost ratio's 1.0


PLAN_BACKBONE = 'efficientnet_v2_s'


PLAN_FOLD_HOURS_T4 = 3.5  # the anchor of every projected hour: the plan's fold, 25 epochs x 8-9 min on a Kaggle GPU


REAL_LABELLED_ROWS = 9700  # per condition at the real data's counts: the plan's ~9.7k spinal canal rows of 1,975 x 5


GPU_SPEED = {  # name: (speed over one T4, where the factor comes from); none measured on a GPU yet
    'one T4': (1.0, 'the anchor'),
    'T4 x2': (1.8, "1.8x one T4: README's expectation, not measured"),
    'L4': (121 / 65, '121/65 = 1.86x one T4: dense fp16 tensor TFLOPS, an assumption'),
}


MODEL_FLOP_KEYS = ('gru_hidden', 'gru_layers', 'pooling', 'attention_hidden')  # what a classifier's FLOPs follow


FLOP_COUNTS = {}  # (backbone, MODEL_FLOP_KEYS' values, px, slices) -> forward FLOPs: each shape counted once


def forward_flops(module, *inputs):
    """FLOPs of one forward of `module` on `inputs`, counted by torch's FlopCounterMode (no gradients). A training
    step is taken as 3x the forward: the counter counts a grouped convolution's backward as a dense one, which
    would inflate EfficientNet's depthwise layers about 5x (bench/cost.py shows it)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops()


def classifier_flops(config, px, slices):
    """Forward FLOPs of SpineModelV9 (config's backbone, pretrained 'none') on one sample of `slices` slices at
    px x px, counted once per shape. Model and input live on the meta device: shapes only, no arithmetic and no
    GPU (the kernel stays CUDA-free), the CPU's count in a fraction of a second even for EfficientNet-V2-S."""
    key = (config['backbone'], *(config[k] for k in MODEL_FLOP_KEYS), px, slices)
    if key not in FLOP_COUNTS:
        with torch.device('meta'):
            model = SpineModelV9({**config, 'pretrained': 'none'}).eval()
            FLOP_COUNTS[key] = forward_flops(model, torch.zeros(1, slices, 3, px, px), torch.tensor([0]),
                                             torch.ones(1, slices, dtype=torch.bool))
    return FLOP_COUNTS[key]


def by_series(config, key, by_key, series_types, override=None):
    """{series type: value}: config[by_key] (a per-series-type setting such as 'img_size_by_series', where a
    CONFIG holds one) where it names the series type, else config[key]; `override` ({series type: value}) over
    both."""
    table = {**(config.get(by_key) or {}), **(override or {})}
    return {s: int(table.get(s, config[key])) for s in series_types}


def real_data_rows(config):
    """{condition: {'labelled', 'train', 'val', 'holdout'}} rows of one fold at the real data's counts
    (REAL_LABELLED_ROWS per condition, floats; holdout_frac, num_folds): the plan's run is counted so."""
    holdout = REAL_LABELLED_ROWS * config['holdout_frac']
    val = (REAL_LABELLED_ROWS - holdout) / config['num_folds']
    return {c: {'labelled': REAL_LABELLED_ROWS, 'train': REAL_LABELLED_ROWS - holdout - val, 'val': val,
                'holdout': holdout} for c in config['conditions']}


def run_rows(samples, config):
    """The same counts from this run's sample table (its `fold` column), for its first fold in train_folds."""
    fold, out = config['train_folds'][0], {}
    for condition in config['conditions']:
        folds = samples.loc[samples['condition'] == condition, 'fold']
        out[condition] = {'labelled': len(folds), 'train': int(((folds != fold) & (folds >= 0)).sum()),
                          'val': int((folds == fold).sum()), 'holdout': int((folds < 0).sum())}
    return out


def fold_flops(config, forward, rows):
    """FLOPs of one fold: project_run with FLOPs in place of seconds (every epoch trains its training rows at 3x
    the forward; validations, train-BA probes and the fold's finish forward only). `forward`: {condition: forward
    FLOPs per sample}; `rows`: real_data_rows' or run_rows' counts."""
    train = 3 * sum(r['train'] * forward[c] for c, r in rows.items())
    val = sum(r['val'] * forward[c] for c, r in rows.items())
    totals = {k: sum(r[k] for r in rows.values()) for k in ('train', 'val', 'holdout')}
    return project_run(train, val, config, totals)['whole_fold_s']


def plan_fold_flops(config, backbone):
    """FLOPs of one fold of the plan's run (PLAN_RUN at the real data's counts) with `backbone` and config's other
    model settings."""
    plan = {**config, **PLAN_RUN, 'backbone': backbone}
    forward = classifier_flops(plan, PLAN_RUN['img_size'], PLAN_RUN['num_slices'])
    return fold_flops(plan, {c: forward for c in PLAN_RUN['conditions']}, real_data_rows(plan))


# %% [markdown]
# The projection of a run, printed before its first epoch, and the note that says what it is.

# %% tags=["defs"]
def training_projection(config, rows, grid=None):
    """One fold's training cost before it runs (a dict): per series type its grid and slices (img_size, num_slices),
    forward FLOPs and cached bytes per sample; the fold's FLOPs on `rows` and the plan's fold's with the same
    backbone (their ratio: the data's, grid's, slices' and epochs' share); one T4's effective FLOP rate, the
    plan's fold with PLAN_BACKBONE in PLAN_FOLD_HOURS_T4; projected hours per fold on each GPU_SPEED; the crop
    cache's bytes for `rows`. `grid`: {series type: px} over the configured grid."""
    series_types = list(dict.fromkeys(CONDITION_SERIES[c] for c in config['conditions']))
    grid = by_series(config, 'img_size', 'img_size_by_series', series_types, grid)
    slices = by_series(config, 'num_slices', 'num_slices_by_series', series_types)
    forward = {s: classifier_flops(config, grid[s], slices[s]) for s in series_types}
    fold = fold_flops(config, {c: forward[CONDITION_SERIES[c]] for c in config['conditions']}, rows)
    anchor = plan_fold_flops(config, PLAN_BACKBONE)
    t4_rate = anchor / (PLAN_FOLD_HOURS_T4 * 3600)
    side = {s: crop_side({**config, 'img_size': grid[s]}) for s in series_types}
    sample_bytes = {s: slices[s] * side[s] ** 2 + slices[s] for s in series_types}  # uint8 crops + bool masks
    return {'grid': grid, 'slices': slices, 'forward': forward, 'fold': fold, 'anchor_fold': anchor,
            'plan_fold': plan_fold_flops(config, config['backbone']), 't4_rate': t4_rate,
            'hours': {gpu: fold / t4_rate / 3600 / speed for gpu, (speed, _) in GPU_SPEED.items()},
            'crop_side': side, 'sample_bytes': sample_bytes,
            'cache_bytes': sum(r['labelled'] * sample_bytes[CONDITION_SERIES[c]] for c, r in rows.items())}


def projection_line(config, samples):
    """The line the training cell prints before the first epoch: training_projection of this run (its backbone,
    conditions, grid, slices and epochs, on its own sample counts) as a ratio to the plan's fold and in hours per
    fold; after epoch 1, project_run prints the measured projection."""
    rows = run_rows(samples, config)
    p = training_projection(config, rows)
    ratio, cache = p['fold'] / p['plan_fold'], p['cache_bytes']
    ratio = f'{ratio:.2f}x' if ratio >= 0.01 else f'{ratio:.2g}x'  # a CPU demo's run is a tiny share of the plan's
    cache = f'{cache / 1e9:.1f} GB' if cache >= 1e8 else f'{cache / 1e6:.1f} MB'
    rate = '' if config['backbone'] == PLAN_BACKBONE else f", its {PLAN_BACKBONE} FLOP rate applied"

    def each(values, unit):  # '256 px', or per series type where they differ
        if len(set(values.values())) == 1:
            return f'{next(iter(values.values()))} {unit}'
        return ', '.join(f'{s} {v}' for s, v in values.items()) + f' {unit}'

    def hours(gpu):
        h = p['hours'][gpu]
        return f'{h:.1f} h' if h >= 1 else f'{h * 60:.1f} min' if h >= 1 / 600 else f'{h * 3600:.1f} s'

    train, val = (sum(r[k] for r in rows.values()) for k in ('train', 'val'))
    return (f"projected before training (FLOPs counted on the CPU, anchor: the plan's {PLAN_FOLD_HOURS_T4} h per "
            f"fold on one T4{rate}): this run {ratio} the plan's per fold ({config['backbone']}, "
            f"{len(config['conditions'])} condition(s), {each(p['grid'], 'px')}, {each(p['slices'], 'slices')}, "
            f"{config['epochs']} epochs; this run's samples, fold {config['train_folds'][0]}: {train:,} trained per "
            f"epoch, {val:,} validated), ~{hours('one T4')} per fold on one T4, {hours('T4 x2')} on T4 x2, "
            f"{hours('L4')} on an L4 ({len(config['train_folds'])} fold(s) to train); crop cache {cache}; "
            'measured after epoch 1')


def projection_note(config, samples):
    """projection_line, or one line saying why it is not available: a projection never stops a run."""
    try:
        return projection_line(config, samples)
    except Exception as error:
        why = ' '.join(str(error).split())[:300]  # one line
        return f'projected before training: not available ({type(error).__name__}: {why})'


# %% [markdown]
# The hidden test's projection: per study, the localisers' and classifiers' FLOPs plus the CPU work measured
# outside the models (`bench/predict_time.py`). Section 11 prints it before it predicts.

# %% tags=["defs"]
SAGITTAL_SLICES = 17  # slices of a typical sagittal series, a 'volume' localiser's input (real ones hold 15-20)


TEST_CPU_SECONDS = {  # per test study, the work outside the models' forwards (reading, DICOM decoding, resizing,
    'seconds': 4.10,  # crops, geometry) on the 2-core CPU, where the hidden-test projection takes it as it is
    'measured': ('`python bench/predict_time.py --studies 2 --workers 1`, 2026-12-06, generated studies, load '
                 'average 5.7 on 2 cores (other jobs running: an upper bound)')}


def localiser_flops(channels, size, maps):
    """Forward FLOPs of a LevelLocaliser with `maps` maps on ONE size x size slice (its work is per slice), on the
    meta device, counted once per shape."""
    key = ('localiser', channels, size, maps)
    if key not in FLOP_COUNTS:
        with torch.device('meta'):
            FLOP_COUNTS[key] = forward_flops(LevelLocaliser(channels, maps).eval(), torch.zeros(1, 4, size, size))
    return FLOP_COUNTS[key]


def test_study_flops(config, grid=None, sagittal_slices=SAGITTAL_SLICES):
    """({series type: localiser FLOPs}, classifier FLOPs) of ONE fold's models on one test study: a 'volume' series
    type's localiser over every slice of a typical series, a 'slice' one once per level on one slice; the
    classifier once per condition and level at its series type's grid (`grid` over config's), on each of tta_shift's
    views."""
    series_types = list(dict.fromkeys(CONDITION_SERIES[c] for c in config['conditions']))
    grid = by_series(config, 'img_size', 'img_size_by_series', series_types, grid)
    slices = by_series(config, 'num_slices', 'num_slices_by_series', series_types)
    localisers = {}
    for series, conds in localised_series(config['conditions']).items():
        mode = LOC_MODE[series]
        per_slice = localiser_flops(config['loc_channels'], config['loc_size'], mode.maps(conds))
        localisers[series] = per_slice * (len(LEVELS) if mode.per_level else sagittal_slices)
    views = len(TTA_STEPS) if tta_pad(config) else 1  # tta_views
    classifier = views * sum(len(LEVELS) * classifier_flops(config, grid[CONDITION_SERIES[c]],
                                                            slices[CONDITION_SERIES[c]]) for c in config['conditions'])
    return localisers, classifier


def prediction_projection(config, folds, studies, grid=None, sagittal_slices=SAGITTAL_SLICES):
    """The hidden test's prediction with `folds` folds' models (each volume read once, every fold's models run on
    it), projected on one T4: per study TEST_CPU_SECONDS (measured on the CPU, outside the models) plus the models'
    forward FLOPs at the anchor's effective rate (training_projection's t4_rate)."""
    localisers, classifier = test_study_flops(config, grid, sagittal_slices)
    flops = folds * (sum(localisers.values()) + classifier)
    t4_rate = plan_fold_flops(config, PLAN_BACKBONE) / (PLAN_FOLD_HOURS_T4 * 3600)
    seconds = TEST_CPU_SECONDS['seconds'] + flops / t4_rate
    return {'localisers': localisers, 'classifier': classifier, 'flops': flops, 't4_rate': t4_rate,
            'model_seconds': flops / t4_rate, 'seconds': seconds, 'hours': studies * seconds / 3600}


def prediction_line(config, folds, studies):
    """The line printed before the test studies are predicted: prediction_projection, labelled a projection; one
    line saying why where it cannot be made (a projection never stops a submission)."""
    try:
        p = prediction_projection(config, folds, studies)
    except Exception as error:
        return f"projected prediction: not available ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
    return (f"projected prediction of {studies} test studies with {folds} fold(s)' models: {p['hours']:.2f} h on one "
            f"T4 ({p['seconds']:.1f} s per study: {TEST_CPU_SECONDS['seconds']:.1f} s of reading and crops measured "
            f"on a 2-core CPU, {p['model_seconds']:.2f} s of model FLOPs at the anchor's rate); the time budget "
            "stops it in time, the studies left on the priors")


# %% [markdown]
# ### 8.12 A fold's pieces, and resuming one

# %% tags=["defs"]
def fold_pieces(fold, samples, images, masks, config, device):
    """Everything one fold trains with (a namespace): its rows, loaders, model, criterion, optimizer,
    schedulers, GradScaler, SWA average and the training state that a checkpoint restores."""
    f = SimpleNamespace(fold=fold, dir=Path(config['output_dir']) / f'fold{fold}', swa_scheduler=None)
    f.dir.mkdir(parents=True, exist_ok=True)
    f.last_path = f.dir / 'last.pt'
    seed_everything(config['seed'] + fold)
    f.train_rows = samples[(samples['fold'] != fold) & (samples['fold'] >= 0)]
    f.val_rows, f.holdout_rows = samples[samples['fold'] == fold], samples[samples['fold'] < 0]
    f.train_set = RSNADatasetV9(f.train_rows, images, masks, config, train=True)
    f.train_sampler = training_sampler(f.train_set, config)  # each process's share of every batch
    f.train_loader = make_loader(f.train_set, config, device, train=True, sampler=f.train_sampler)

    def eval_loader(rows, every_epoch=False, pad=0):  # fixed order, no augmentation
        dataset = RSNADatasetV9(rows, images, masks, config, train=False, pad=pad)
        return make_loader(dataset, config, device, False, every_epoch=every_epoch,
                           sampler=evaluation_shard(dataset, config))  # several processes: each one's shard

    f.eval_loader = eval_loader
    f.val_loader = eval_loader(f.val_rows, every_epoch=True)
    # train BA for the overfitting check: eval mode, no augmentation, a fixed training subset as large as
    # the validation fold (the running BA over augmented batches with dropout on understates overfitting)
    f.train_probe = eval_loader(f.train_rows.sample(n=min(len(f.val_rows), len(f.train_rows)),
                                                    random_state=config['seed']))
    f.fingerprint = data_fingerprint(samples)
    f.model = SpineModelV9(config).to(device)
    if config['channels_last']:
        f.model = f.model.to(memory_format=torch.channels_last)
    f.criterion = CompetitionWeightedCE(config['class_weights']).to(device)
    f.optimizer = make_optimizer(f.model, config)
    f.scheduler = warmup_cosine(f.optimizer, config, len(f.train_loader))
    f.scaler = torch.amp.GradScaler(device.type, enabled=precision_in_use(device, config) == 'fp16')
    f.swa_model = AveragedModel(f.model) if config['use_swa'] else None
    f.step_model = distributed_model(f.model, device, config)  # several processes: DDP (after SWA's plain copy)
    f.step_model = torch.compile(f.step_model) if config['compile'] and device.type == 'cuda' else f.step_model
    if process_rank():  # the same initial weights everywhere (above), then each process its own dropout and noise
        seed_everything(process_seed(config, fold, process_rank()))
    f.state = {'epoch': 0, 'history': [], 'checkpoints': [], 'actions': [], 'lr_steps': [], 'best_ba': -1.0,
               'best_epoch': None, 'nonfinite': 0, 'nonfinite_pending': 0, 'stopped_by': None, 'patience_out': False,
               'warnings': []}
    f.rows = {'train': len(f.train_rows), 'val': len(f.val_rows), 'holdout': len(f.holdout_rows)}
    f.folds_after = len(config['train_folds']) - 1 - config['train_folds'].index(fold) \
        if fold in config['train_folds'] else 0
    return f


def swa_phase_scheduler(optimizer, config):
    ratio = config['backbone_lr'] / config['learning_rate']  # keep the backbone's slower pace
    return SWALR(optimizer, swa_lr=[config['swa_lr'] * ratio, config['swa_lr']], anneal_epochs=1)


def checked_checkpoint(path, config, fingerprint, device):
    """A fold checkpoint written with this run's settings and data, else a clear error."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    saved = {k: v for k, v in ckpt['config'].items() if k != 'data_fingerprint'}
    changed = sorted(k for k in set(saved) | set(comparable(config)) if saved.get(k) != comparable(config).get(k))
    if changed:
        raise ValueError(f'{path} was written with other settings ({changed}): set resume=False '
                         'or delete the fold folder to start again.')
    if ckpt['config'].get('data_fingerprint') != fingerprint:
        raise ValueError(f'{path}: the sample table or fold assignment changed since it was written: '
                         'resuming would mix two validation splits. Set resume=False to start again.')
    return ckpt


def resume_fold(f, config, device):
    """Load the fold's last epoch checkpoint into its pieces: the run goes on exactly where it stopped."""
    ckpt = checked_checkpoint(f.last_path, config, f.fingerprint, device)
    f.model.load_state_dict(ckpt['model'])
    f.optimizer.load_state_dict(ckpt['optimizer'])
    f.scheduler.load_state_dict(ckpt['scheduler'])
    f.scaler.load_state_dict(ckpt['scaler'])
    f.criterion.load_state_dict(ckpt['criterion'])
    if ckpt['swa_model'] is not None:
        f.swa_model.load_state_dict(ckpt['swa_model'])
    if ckpt['swa_scheduler'] is not None:
        f.swa_scheduler = swa_phase_scheduler(f.optimizer, config)
        f.swa_scheduler.load_state_dict(ckpt['swa_scheduler'])
    f.state = ckpt['state']
    if f.state.pop('stopped_early', False) and not f.state.get('stopped_by'):  # a last.pt from before 'stopped_by'
        f.state['stopped_by'] = 'early'
    if f.state.get('stopped_by') == 'budget':  # a new session, a new budget: the fold goes on
        f.state['stopped_by'] = None
    restore_rng_states(ckpt['rng'], f, config)  # each process its own streams
    for message in f.state['warnings']:  # printed before the interruption: they belong in this run's report
        WARNINGS.append(f'{message} (printed before the run was resumed)')
    print(f"fold {f.fold}: resumed after epoch {f.state['epoch']}")


def save_fold_checkpoint(f, config):
    """last.pt: everything resume_fold needs to continue after this epoch (written by process 0), with every
    process's random streams (a list by rank)."""
    rng = gathered(rng_states())  # a collective: before the other processes return
    if not is_main_process():
        return
    save_atomic({'model': f.model.state_dict(), 'optimizer': f.optimizer.state_dict(),
                 'scheduler': f.scheduler.state_dict(), 'scaler': f.scaler.state_dict(),
                 'criterion': f.criterion.state_dict(),
                 'swa_model': f.swa_model.state_dict() if f.swa_model is not None else None,
                 'swa_scheduler': f.swa_scheduler.state_dict() if f.swa_scheduler is not None else None,
                 'state': f.state, 'rng': rng,
                 'config': {**comparable(config), 'data_fingerprint': f.fingerprint}}, f.last_path)


# %% [markdown]
# ### 8.13 The epoch loop
# Train, validate every `val_every` epochs, decide (save gate, the plan's class-weight actions, early stopping with
# `patience`), checkpoint. With SWA on, early stopping never ends a run before SWA has averaged its epochs.

# %% tags=["defs"]
def run_epoch(f, epoch, config, device):
    """Train one epoch (SWA averaging in the SWA phase); returns the history row."""
    for p in f.model.backbone.parameters():
        p.requires_grad_(epoch > config['freeze_backbone_epochs'])
    in_swa = config['use_swa'] and epoch >= config['swa_start_epoch']
    if in_swa and f.swa_scheduler is None:
        f.swa_scheduler = swa_phase_scheduler(f.optimizer, config)
    f.train_sampler.set_epoch(epoch)  # shuffling depends on (seed, epoch) only, for any number of processes
    f.train_set.set_epoch(epoch)
    stats, lrs = train_one_epoch(f.step_model, f.train_loader, f.criterion, f.optimizer,
                                 None if in_swa else f.scheduler, f.scaler, device, config, f.state, epoch)
    f.state['lr_steps'] += lrs
    if in_swa:
        f.swa_model.update_parameters(f.model)
        f.swa_scheduler.step()
    return {'epoch': epoch, **stats, 'lr_backbone': lrs[-1][0], 'lr_head': lrs[-1][1], 'swa': in_swa}


def validate_epoch(f, epoch, row, config, device):
    """Validation metrics into `row`, the plan's checkpoint rows (and opt-in weight actions); returns the
    metrics, or None in an epoch that is not validated."""
    if not is_validation_epoch(epoch, config):
        return None
    start = now()
    metrics = evaluate(f.step_model, f.val_loader, f.criterion, device, config)
    row.update(val_seconds=now() - start, val_loss=metrics['loss'], val_ba=metrics['ba'],
               pred_counts=metrics['pred_counts'], **{f'recall_{c}': r for c, r in enumerate(metrics['recall'])})
    for message in dead_class_warnings(metrics['pred_counts']):
        warn(f'fold {f.fold} epoch {epoch}: {message}')
    if epoch in PLAN_CHECKPOINT_EPOCHS or epoch == config['epochs']:
        row['train_eval_ba'] = evaluate(f.step_model, f.train_probe, f.criterion, device, config)['ba']
    checks = checkpoint_rows(epoch, metrics, row.get('train_eval_ba'))
    f.state['checkpoints'] += checks
    if checks:
        print(pd.DataFrame(checks).to_string(index=False))
    if config['auto_class_weight_actions'] and checks:
        weights, done = plan_weight_actions(epoch, metrics, f.criterion.weights.tolist())
        f.criterion.weights.copy_(torch.tensor(weights))
        f.state['actions'] += [f'epoch {epoch}: {d}' for d in done]
        for d in done:
            print(f'plan action applied: {d}')
    return metrics


def epoch_decisions(metrics, state, epoch, config, seconds, left=None):
    """The end-of-epoch decisions, from values one process can share with the others: save a new best?
    stop (early stopping, or the time budget: `left` seconds remain and the next epoch takes about
    `seconds`, as this one did)? Returns {'save', 'why', 'stop', 'patience_out', 'since'}."""
    decision = {'save': False, 'why': None, 'stop': None, 'patience_out': state['patience_out']}
    best_epoch = state['best_epoch']
    if metrics is not None:
        decision['save'], decision['why'] = save_gate(metrics, state['best_ba'], config)
        best_epoch = epoch if decision['save'] else best_epoch
    decision['since'] = since = epoch - (best_epoch or 0)
    out_of_patience = since >= config['patience'] and epoch < config['epochs']
    if out_of_patience and config['use_swa']:  # stopping now would report the model selected on this fold
        decision['patience_out'] = True
    elif out_of_patience:
        decision['stop'] = 'early'
    if decision['stop'] is None and left is not None and epoch < config['epochs'] and left < seconds:
        decision['stop'] = 'budget'
    return decision


def apply_decisions(f, epoch, row, metrics, decision, config):
    """Act on epoch_decisions: best.pt, the stop flags, the messages."""
    state = f.state
    if metrics is not None:
        row['saved'] = decision['save']
    if decision['save']:
        state['best_ba'], state['best_epoch'] = metrics['ba'], epoch
    if decision['save'] and is_main_process():  # several processes: process 0 writes
        save_atomic({'model': f.model.state_dict(), 'config': config, 'epoch': epoch,
                     'metrics': {k: metrics[k] for k in ('recall', 'ba', 'pred_counts')}}, f.dir / 'best.pt')
    state['history'].append(row)
    state['epoch'] = epoch
    print(epoch_summary(row) + (f" | {decision['why']}" if 'val_ba' in row else ''))
    since = decision['since']
    if decision['patience_out'] and not state['patience_out']:
        warn(f"fold {f.fold} epoch {epoch}: {since} epochs without a saved improvement (patience "
             f"{config['patience']}), but early stopping would end the run before SWA averages epochs "
             f"{config['swa_start_epoch']}-{config['epochs']}: training continues to the SWA model")
    state['patience_out'] = decision['patience_out']
    state['stopped_by'] = decision['stop']
    if decision['stop'] == 'early':
        print(f"early stop: {since} epochs without a saved improvement (patience {config['patience']})")
    elif decision['stop'] == 'budget':
        print(f"time budget: the next epoch (~{row['seconds'] / 60:.0f} min) would not end in time: the fold ends "
              f"after epoch {epoch} of {config['epochs']}")


def train_epochs(f, config, device, on_epoch_end=None, deadline=None):
    """The epoch loop: train, validate, decide, checkpoint; after the first epoch, the projected time."""
    warnings_before = len(WARNINGS)
    earlier_warnings = list(f.state['warnings'])
    first = f.state['epoch'] + 1
    for epoch in range(first, config['epochs'] + 1):  # progress: each epoch's batch bar and its summary line
        if f.state.get('stopped_by'):
            break
        start = now()
        row = run_epoch(f, epoch, config, device)
        trained = now() - start
        metrics = validate_epoch(f, epoch, row, config, device)
        row['seconds'] = now() - start
        left = None if deadline is None else deadline - now() - finish_seconds(f.state['history'] + [row], f.rows)
        decision = epoch_decisions(metrics, f.state, epoch, config, row['seconds'], left)
        decision = from_process0(decision)  # several processes: one decision (the clocks differ) for all
        apply_decisions(f, epoch, row, metrics, decision, config)
        if epoch == first and metrics is not None:
            print(project_run(trained, row['val_seconds'], config, f.rows, epoch, f.folds_after,
                              now() - RUN_START)['text'])
        f.state['warnings'] = earlier_warnings + WARNINGS[warnings_before:]
        f.state = from_process0(f.state)  # several processes: process 0's history (its clock) in all
        save_fold_checkpoint(f, config)
        if on_epoch_end is not None:
            on_epoch_end(epoch)


# %% [markdown]
# ### 8.14 Finishing a fold, and all the folds
# After the last epoch: SWA's BatchNorm pass, the three models evaluated (best, last, swa), the hold-out studies,
# each with `tta_shift`'s five views.

# %% tags=["defs"]
def finish_fold(f, config, device):
    """SWA's BatchNorm statistics, the evaluation of each model kind and the hold-out predictions; writes
    the fold's final.pt (the one file a prediction run needs) and result.pt."""
    models = {'last': f.model}
    if (f.dir / 'best.pt').exists() and f.state['best_epoch'] is not None:
        models['best'] = SpineModelV9({**config, 'pretrained': 'none'}).to(device)
        models['best'].load_state_dict(torch.load(f.dir / 'best.pt', map_location=device,
                                                  weights_only=False)['model'])
    if f.swa_model is not None and f.swa_model.n_averaged.item() > 0:  # also after a time-budget stop
        with autocast(device, config):
            recompute_swa_batchnorm(f.swa_model, f.eval_loader(f.train_rows), device)
        if is_main_process():  # several processes: process 0 writes
            save_atomic({'model': f.swa_model.module.state_dict(), 'config': config}, f.dir / 'swa.pt')
        models['swa'] = f.swa_model.module
    pad = tta_pad(config)  # after training: tta_shift's five views, where the per-epoch validation saw the crop
    loader = f.eval_loader(f.val_rows, pad=pad) if pad else f.val_loader
    evaluations = {kind: evaluate(m, loader, f.criterion, device, config) for kind, m in models.items()}
    state = f.state
    result = {'fold': f.fold, 'history': state['history'], 'checkpoints': state['checkpoints'],
              'actions': state['actions'], 'lr_steps': state['lr_steps'], 'best_epoch': state['best_epoch'],
              'evaluations': evaluations, 'val_rows': f.val_rows, 'class_weights': f.criterion.weights.tolist(),
              'stopped_by': state.get('stopped_by'), 'epochs_trained': state['epoch'],
              'nonfinite_steps': sum(row.get('nonfinite_steps', 0) for row in state['history']),
              'processes': world_size(), 'tta_shift': config['tta_shift']}
    kind = final_kind(result, config)
    if len(f.holdout_rows):  # the final model's view of the studies no fold saw, for the ensemble evaluation
        probs = predict(models[kind], f.eval_loader(f.holdout_rows, pad=pad), f.criterion, device, config)['probs']
        result['holdout'] = {'kind': kind, 'rows': f.holdout_rows, 'probs': probs}
    if is_main_process():  # several processes: process 0 writes
        save_atomic({'model': models[kind].state_dict(), 'kind': kind, 'config': config,
                     'class_weights': result['class_weights']}, f.dir / 'final.pt')
        save_atomic({**result, 'config': {**comparable(config), 'data_fingerprint': f.fingerprint}},
                    f.dir / 'result.pt')
    return result


def finished_fold(fold, samples, config, device):
    """The result of a fold an earlier run finished (result.pt beside a last.pt of these settings and this
    data), or None: it is (re)trained. A fold the time budget stopped is continued, not taken as finished."""
    fold_dir = Path(config['output_dir']) / f'fold{fold}'
    if not (config['resume'] and (fold_dir / 'result.pt').exists() and (fold_dir / 'last.pt').exists()):
        return None
    checked_checkpoint(fold_dir / 'last.pt', config, data_fingerprint(samples), device)
    result = torch.load(fold_dir / 'result.pt', map_location='cpu', weights_only=False)
    if result.get('stopped_by') == 'budget' and result['epochs_trained'] < config['epochs']:
        return None
    evaluated_on = result.get('tta_shift', 0.0)  # saved before the views: the crop alone
    if evaluated_on != config['tta_shift']:
        print(f"fold {fold}: finished by an earlier run on tta_shift {evaluated_on:g}: its final models are evaluated "
              f"again on tta_shift {config['tta_shift']:g}")
        return None
    print(f"fold {fold}: finished by an earlier run ({result['epochs_trained']} epochs): loaded, not trained again")
    result['val_rows'] = samples[samples['fold'] == fold]  # the same rows (fingerprint), this session's cache_index
    if 'holdout' in result:
        result['holdout']['rows'] = samples[samples['fold'] < 0]
    return {k: v for k, v in result.items() if k != 'config'}


def train_fold(fold, samples, images, masks, config, device, on_epoch_end=None, deadline=None):
    """Train one fold (or load it, when an earlier run finished it); returns history, checkpoint table and
    the evaluation of the best, last and SWA models. `deadline`: time (now()) after which no epoch starts
    that would not end before it."""
    done = finished_fold(fold, samples, config, device)
    if done is not None:
        return done
    f = fold_pieces(fold, samples, images, masks, config, device)
    if config['resume'] and f.last_path.exists():
        resume_fold(f, config, device)
    train_epochs(f, config, device, on_epoch_end, deadline)
    if f.state.get('stopped_by') == 'budget':
        warn(f"fold {fold}: stopped by the time budget after epoch {f.state['epoch']} of {config['epochs']}")
    return finish_fold(f, config, device)


def train_folds(samples, images, masks, config, device, processes=1, on_epoch_end=None):
    """Every fold of train_folds in turn, within the time budget (counted from the setup cell, less the time the
    work after training needs: AFTER_TRAINING_S); each fold's result, out-of-fold rows and a progress report are
    written as soon as it ends. Each fold trains on `processes` processes (run_fold). `on_epoch_end(fold, epoch)`
    is called after each epoch's checkpoint."""
    budget = time_budget_s(config)
    results = []
    for fold in config['train_folds']:
        # the fold's epochs end in time for the work after training on the folds finished with it
        deadline = None if budget is None else RUN_START + budget - after_training_s(len(results) + 1)
        epoch_s = max((r['history'][-1]['seconds'] for r in results if r['history']), default=0)
        if deadline is not None and results and deadline - now() < epoch_s:
            warn(f"fold {fold} not started: {max(deadline - now(), 0) / 3600:.2f} h of the time budget "
                 f"({budget / 3600:.1f} h) left after keeping {after_training_s(len(results) + 1) / 3600:.2f} h "
                 f"for the work after training, one epoch takes {epoch_s / 3600:.2f} h; continue_from "
                 'in a new session trains it')
            continue
        hook = None if on_epoch_end is None else functools.partial(on_epoch_end, fold)
        results.append(run_fold(fold, samples, images, masks, config, device, processes, hook, deadline))
        write_progress(results, config)
    return results


# %% [markdown]
# ### 8.15 The out-of-fold table and progress

# %% tags=["defs"]
def with_corrected(frame, class_weights):
    """`frame` (with P_COLUMNS) plus the prior-corrected PC_COLUMNS."""
    frame = frame.copy()
    frame[PC_COLUMNS] = prior_corrected(frame[P_COLUMNS].to_numpy(), class_weights)
    return frame


def oof_frame(results, kind_of):
    """One row per validation sample: ids, label, raw and prior-corrected probabilities, attention per slice,
    fold, model."""
    frames = []
    for result in results:
        kind = kind_of(result)
        ev = result['evaluations'][kind]
        frame = result['val_rows'][['study_id', 'condition', 'level', 'label', 'cache_index']].reset_index(drop=True)
        frame[P_COLUMNS] = ev['probs']
        frame = with_corrected(frame, result['class_weights'])
        frame[[f'attn_{j}' for j in range(ev['attention'].shape[1])]] = ev['attention']
        frames.append(frame.assign(fold=result['fold'], model=kind))
    return pd.concat(frames, ignore_index=True)


def write_progress(results, config):
    """After each fold: its out-of-fold rows (fold{k}/oof.csv) and progress.md, the finished folds so far."""
    out, lines = Path(config['output_dir']), []
    for r in results:
        kind = final_kind(r, config)
        ev = r['evaluations'][kind]
        frame = oof_frame([r], lambda _, kind=kind: kind).drop(columns='cache_index')  # oof.csv's columns
        (out / f"fold{r['fold']}").mkdir(exist_ok=True)
        write_atomic(out / f"fold{r['fold']}" / 'oof.csv', frame.to_csv(index=False))
        stop = {'budget': ', stopped by the time budget', 'early': ', stopped early'}.get(r.get('stopped_by'), '')
        lines.append(f"| {r['fold']} | {kind} | {r['epochs_trained']} of {config['epochs']}{stop} | {ev['ba']:.4f} "
                     f"| {r.get('nonfinite_steps', 0)} |")
    text = ['# le3ba v9: progress', '', (f"Folds finished: {len(results)} of {len(config['train_folds'])} "
                                         f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})."), '',
            '| fold | final model | epochs | balanced accuracy | non-finite steps skipped |', '|---|---|---|---|---|',
            *lines, '']
    write_atomic(out / 'progress.md', '\n'.join(text))


def final_kind(result, config):
    """The model reported as final: CONFIG['final_model'] when it exists, else swa > last > best (best was
    selected on the fold it is scored on: the last resort, and the report says so)."""
    order = [config['final_model']] + ['swa', 'last', 'best']
    return next(k for k in order if k in result['evaluations'])


def epoch_summary(row):
    text = (f"epoch {row['epoch']:>2} | train loss {row['train_loss']:.3f} | lr {row['lr_backbone']:.1e}/"
            f"{row['lr_head']:.1e} | grad {row['grad_norm_mean']:.2f} ({row['clipped_frac']:.0%} clipped)")
    if 'val_ba' in row:
        recalls = '/'.join(f"{row[f'recall_{c}']:.2f}" for c in range(3))
        text += (f" | val loss {row['val_loss']:.3f} | recall N/M/S {recalls} | BA {row['val_ba']:.3f}"
                 f" | preds {row['pred_counts']}")
    skipped = f" | {row['nonfinite_steps']} non-finite step(s) skipped" if row.get('nonfinite_steps') else ''
    return text + skipped + f" | {row['seconds']:.0f} s" + (' | SWA' if row['swa'] else '')


# %% [markdown]
# ### 8.16 Train
# Prints the projection, then one line per epoch. `progress.md` in `output_dir` is rewritten after each epoch.

# %%
if not SUBMIT_ONLY:  # a submission run (submit_from) trains nothing: see section 11
    resume_check(CONFIG, data_fingerprint(SAMPLES))  # every fold's checkpoint against this data, before any training
    PROCESSES = checked_processes(CONFIG)  # one per GPU (DistributedDataParallel) once they pass a start-up check
    AFTER_TRAINING_PROBE = None
    if localiser_wanted(CONFIG):  # the work after training shares the time budget: its seconds per study, first
        AFTER_TRAINING_PROBE = on_device(functools.partial(probe_after_training, samples=SAMPLES, config=CONFIG))
        AFTER_TRAINING_S = after_training_plan(AFTER_TRAINING_PROBE, SAMPLES, CONFIG)
        print(f'after training (localisers, predicted points, submission): {AFTER_TRAINING_S[-1] / 3600:.2f} h '
              'projected, kept free in the time budget; measured per study: '
              + ', '.join(f'{k} {v:.2f} s' for k, v in AFTER_TRAINING_PROBE.items()))
    print(projection_note(CONFIG, SAMPLES))  # from FLOPs, no GPU; epoch 1 prints the measured projection
    FOLD_RESULTS = train_folds(SAMPLES, IMAGES, MASKS, CONFIG, DEVICE, PROCESSES)

# %% [markdown]
# ## 9. Task 4.1: metrics and plots
#
# ### 9.1 The official metric
# Three models per fold, labelled honestly: **best** was chosen on this same validation fold (its figures are
# optimistic), **last** and **swa** were not selected on it. `final_model` names the one reported as final and
# written to `oof.csv`. Beside balanced accuracy: the official metric's terms of the trained conditions with
# **oracle localisation** (crops at the ground-truth point): the sample-weighted log loss of each condition group
# and `any_severe_spinal`, lower is better. Not comparable with leaderboard scores: section 11 puts predicted
# points beside them.

# %% tags=["defs"]
SCORE_NAME = "the official metric's terms of the trained conditions, oracle localisation"


METRIC_GROUPS = {'spinal': 'spinal_canal_stenosis', 'foraminal': 'neural_foraminal_narrowing',
                 'subarticular': 'subarticular_stenosis'}


def competition_terms(solution, submission):
    """The official RSNA 2024 loss terms present in `solution`: one sample-weighted log loss per condition
    group (left/right pooled) and any_severe_spinal. Frames: row_id + normal_mild/moderate/severe
    (solution one-hot + sample_weight). Unlabelled solution rows (all zero) are not scored."""
    solution = solution.set_index('row_id')
    missing = solution.index.difference(submission['row_id'])
    if len(missing):
        raise ValueError(f'submission lacks {len(missing)} row_ids, e.g. {list(missing[:3])}')
    probs = submission.set_index('row_id').loc[solution.index, PROB_COLUMNS].to_numpy(float)
    if (probs < 0).any():
        raise ValueError('submission probabilities must be >= 0')
    probs = probs / probs.sum(1, keepdims=True)
    onehot = solution[PROB_COLUMNS].to_numpy(float)
    scored = onehot.sum(1) > 0
    labels, weights = onehot.argmax(1), solution['sample_weight'].to_numpy(float)
    condition = np.array(['_'.join(r.split('_')[1:-2]) for r in solution.index])
    terms = {}
    for group, pattern in METRIC_GROUPS.items():
        rows = scored & np.char.endswith(condition.astype(str), pattern)
        if rows.any():
            terms[group] = log_loss(labels[rows], probs[rows], sample_weight=weights[rows], labels=[0, 1, 2])
    spinal = scored & (condition == 'spinal_canal_stenosis')
    if spinal.any():
        per_study = pd.DataFrame({'study': [r.split('_')[0] for r in solution.index[spinal]],
                                  'severe': labels[spinal] == 2, 'p': probs[spinal, 2], 'w': weights[spinal]})
        study = per_study.groupby('study').max()
        terms['any_severe_spinal'] = log_loss(study['severe'].astype(int), study['p'], sample_weight=study['w'],
                                              labels=[0, 1])
    return {k: float(v) for k, v in terms.items()}


def competition_score(solution, submission):
    """The official RSNA 2024 score (mean of the loss terms; lower is better) on Kaggle-format frames."""
    return float(np.mean(list(competition_terms(solution, submission).values())))


def kaggle_frames(oof, columns=P_COLUMNS):
    """(solution, submission) frames in the competition's format from out-of-fold predictions (rows with their
    study_id, condition, level, label)."""
    row_id = oof['study_id'].astype(str) + '_' + oof['condition'] + '_' + oof['level']
    solution = pd.DataFrame(np.eye(3)[oof['label']], columns=PROB_COLUMNS).assign(
        row_id=row_id.to_numpy(), sample_weight=np.array(ROW_WEIGHTS)[oof['label']])
    submission = pd.DataFrame(oof[columns].to_numpy(), columns=PROB_COLUMNS)
    return solution, submission.assign(row_id=row_id.to_numpy())


def summarize(oof):
    """Classification metrics (pooled over the frame's conditions) and the competition terms of one OOF frame, on
    the raw probabilities and (under 'corrected') on the prior-corrected ones when the frame has them."""
    def scores(columns):
        metrics = classification_metrics(oof['label'].to_numpy(), oof[columns].to_numpy())
        terms = competition_terms(*kaggle_frames(oof, columns))
        return {**metrics, 'competition_terms': terms,
                'competition_score_part': float(np.mean(list(terms.values())))}
    return {**scores(P_COLUMNS), **({'corrected': scores(PC_COLUMNS)} if set(PC_COLUMNS) <= set(oof) else {})}


def per_condition(oof, columns=P_COLUMNS):
    """Rows: each condition of the frame; balanced accuracy, recall per class, predictions per class, rows."""
    table = {}
    for condition, rows in oof.groupby('condition', sort=False):
        m = classification_metrics(rows['label'].to_numpy(), rows[columns].to_numpy())
        table[condition] = {'rows': len(rows), 'BA': m['ba'],
                            **{f'recall {c}': r for c, r in zip(CLASSES, m['recall'])},
                            'predicted per class': m['pred_counts'], 'confusion': m['confusion']}
    return pd.DataFrame(table).T.rename_axis('condition')


# %% [markdown]
# ### 9.2 Models compared, and the hold-out

# %% tags=["defs"]
def model_comparison(results):
    """Metrics of every model kind, pooled over the trained folds (rows) -> table."""
    rows = {}
    for kind in ('best', 'last', 'swa'):
        if all(kind in r['evaluations'] for r in results):
            s = summarize(oof_frame(results, lambda r, k=kind: k))
            rows[kind + (' (selected on val: optimistic)' if kind == 'best' else '')] = {
                'BA': s['ba'], 'BA prior-corrected': s['corrected']['ba'],
                **{f'recall {c}': r for c, r in zip(CLASSES, s['recall'])},
                **{f'{term} raw': v for term, v in s['competition_terms'].items()},
                **{f'{term} corrected': v for term, v in s['corrected']['competition_terms'].items()}}
    return pd.DataFrame(rows).T.rename_axis('model').round(4)


def holdout_evaluation(results):
    """Each fold's final model, and the average of their probabilities, on the held-out studies: the only
    honest measure of what a fold ensemble adds (out-of-fold predictions come from one model each)."""
    rows = {}
    frames = []
    for r in results:
        frame = r['holdout']['rows'][['study_id', 'condition', 'level', 'label']].reset_index(drop=True)
        frame[P_COLUMNS] = r['holdout']['probs']
        frames.append(with_corrected(frame, r['class_weights']))
        rows[f"fold {r['fold']} ({r['holdout']['kind']})"] = summarize(frames[-1])
    ensemble = frames[0].copy()
    for columns in (P_COLUMNS, PC_COLUMNS):
        ensemble[columns] = np.mean([f[columns].to_numpy() for f in frames], axis=0)
    rows[f'ensemble of {len(frames)} folds'] = summarize(ensemble)
    return pd.DataFrame({name: {'BA': s['ba'], 'BA prior-corrected': s['corrected']['ba'],
                                **{f'recall {c}': v for c, v in zip(CLASSES, s['recall'])},
                                'metric terms raw': s['competition_score_part'],
                                'metric terms corrected': s['corrected']['competition_score_part']}
                         for name, s in rows.items()}).T.rename_axis('model').round(4)


# %% [markdown]
# ### 9.3 Plots
# Training curves, confusion matrices, the attention weights per slice and class, and strips of example crops.

# %% tags=["defs"]
def plot_curves(results, name='training_curves'):
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for result in results:
        h = pd.DataFrame(result['history'])
        f = result['fold']
        axes[0].plot(h['epoch'], h['train_loss'], label=f'train f{f}')
        if 'val_loss' in h:
            v = h.dropna(subset=['val_loss'])
            axes[0].plot(v['epoch'], v['val_loss'], '--', label=f'val f{f}')
            axes[1].plot(v['epoch'], v['val_ba'], 'o-', label=f'val f{f}')
            for c in range(3):
                axes[2].plot(v['epoch'], v[f'recall_{c}'], 'o-', label=f'{CLASSES[c]} f{f}')
        axes[1].plot(h['epoch'], h['train_ba'], ':', label=f'train running (augmented, dropout on) f{f}')
        if 'train_eval_ba' in h:
            t = h.dropna(subset=['train_eval_ba'])
            axes[1].plot(t['epoch'], t['train_eval_ba'], 's-', label=f'train (eval mode, fixed subset) f{f}')
        lrs = np.array(result['lr_steps'])
        axes[3].plot(lrs[:, 0], label=f'backbone f{f}')
        axes[3].plot(lrs[:, 1], label=f'head f{f}')
    titles = ['loss (class-weighted CE)', 'balanced accuracy', 'recall per class', 'LR per step']
    for ax, title, ylabel in zip(axes, titles, ['loss', 'balanced accuracy', 'recall', 'learning rate']):
        ax.set_title(title)
        ax.set_xlabel('optimiser step' if ax is axes[3] else 'epoch')
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    axes[3].set_yscale('log')
    show(fig, name)


def not_applicable(title, name):
    """A figure that says why it has nothing to show (mean pooling has no learned slice weights)."""
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.text(0.5, 0.5, "not applicable: pooling = 'mean' (fixed equal weights on the unpadded slices)",
            ha='center', va='center')
    ax.set_title(title)
    ax.axis('off')
    show(fig, name)


def score_caveat(oof, config):
    """What the competition numbers are, next to them."""
    terms = sorted({group for group, pattern in METRIC_GROUPS.items() if oof['condition'].str.endswith(pattern).any()}
                   | ({'any_severe_spinal'} if (oof['condition'] == SPINAL).any() else set()))
    return (f"Scored: the mean of {', '.join(terms)}, {len(terms)} of the leaderboard's 4 terms (the "
            "sample-weighted log losses), on crops at the ground-truth point and instance (perfect "
            f"localisation), for the {len(oof)} rows of {oof['study_id'].nunique()} studies that survived "
            f"filtering, validation folds {sorted(set(oof['fold']))} of {config['num_folds']}. Not comparable "
            'with leaderboard scores.')


def plot_confusion(confusion, title, name):
    confusion = np.asarray(confusion)
    normalised = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, data, fmt in ((axes[0], confusion, 'd'), (axes[1], normalised, '.2f')):
        ax.imshow(normalised, cmap='Blues', vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(data):
            ax.text(j, i, format(v, fmt), ha='center', va='center',
                    color='white' if normalised[i, j] > 0.5 else 'black')
        ax.set_xticks(range(3), CLASSES)
        ax.set_yticks(range(3), CLASSES)
        ax.set_xlabel('predicted')
        ax.set_ylabel('true')
    axes[0].set_title(f'{title}: counts')
    axes[1].set_title('row-normalised (recall on the diagonal)')
    show(fig, name)


def plot_attention_heatmap(oof, name='attention_heatmap', pooling='attention'):
    """Every validation sample's slice weights, one band per class (named on the left)."""
    title = 'attention weight per slice, validation samples by true class'
    if pooling != 'attention':
        return not_applicable(title, name)
    cols = [c for c in oof if c.startswith('attn_')]
    ordered = oof.sort_values(['label', f'p_{PROB_COLUMNS[0]}'])
    fig, ax = plt.subplots(figsize=(6, 8))
    im = ax.imshow(ordered[cols].to_numpy(), aspect='auto', cmap='viridis', interpolation='nearest')
    counts = ordered['label'].value_counts().sort_index()
    ends = np.cumsum(counts.to_numpy())
    for end in ends[:-1]:
        ax.axhline(end - 0.5, color='white')
    ax.set_yticks(ends - counts.to_numpy() / 2 - 0.5, [f'{CLASSES[c]} ({n})' for c, n in counts.items()])
    n = len(cols)
    ax.set_xticks(range(n), [f'{j - n // 2:+d}' for j in range(n)])
    ax.set_xlabel('slice (0 = annotated)')
    ax.set_ylabel('validation samples by true class (count)')
    ax.set_title(title)
    fig.colorbar(im, label='attention weight')
    show(fig, name)


def plot_strips(oof, images, size, title, name, per_class=2, rows=None):
    """Example samples as the model saw them (the `size` centre of each cached crop), each slice's attention
    weight in its caption."""
    if rows is None:
        rows = pd.concat([oof[oof['label'] == c].head(per_class) for c in range(3)])
    if rows.empty:
        return
    n = images.shape[1]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.7 * n, 1.9 * len(rows)), squeeze=False)
    for ax_row, (_, row) in zip(axes, rows.iterrows()):
        probs = row[P_COLUMNS].to_numpy(float)
        for j, ax in enumerate(ax_row):
            ax.imshow(centre_crop(images[int(row['cache_index']), j], size), cmap='gray', vmin=0, vmax=255)
            ax.set_title(f"w={row[f'attn_{j}']:.2f}", fontsize=8)
            ax.axis('off')
        ax_row[0].text(-0.1, 0.5, f"true {CLASSES[int(row['label'])]}\npred {CLASSES[probs.argmax()]} "
                       f"({probs.max():.2f})\n{row['study_id']} {row['level']}",
                       transform=ax_row[0].transAxes, ha='right', va='center', fontsize=8)
    fig.suptitle(title)
    show(fig, name)


# %% [markdown]
# ### 9.4 Score the folds
# Prints the final model's per-condition figures and draws the plots; the full tables go to the report.

# %%
if not SUBMIT_ONLY:  # a submission run (submit_from) trains nothing: see section 11
    OOF = oof_frame(FOLD_RESULTS, lambda r: final_kind(r, CONFIG))
    FINAL = summarize(OOF)
    COMPARISON = model_comparison(FOLD_RESULTS)
    PER_CONDITION = per_condition(OOF)
    print(PER_CONDITION.drop(columns='confusion').to_string())
    print(f"final model per fold: {dict(zip(OOF['fold'], OOF['model']))}")
    print(f"{SCORE_NAME} (raw / prior-corrected): {FINAL['competition_score_part']:.4f} / "
          f"{FINAL['corrected']['competition_score_part']:.4f}")
    print(score_caveat(OOF, CONFIG))
    print(COMPARISON.iloc[:, :5].to_string())  # each model's terms: in v9_Results.md
    HOLDOUT = holdout_evaluation(FOLD_RESULTS) if 'holdout' in FOLD_RESULTS[0] else None
    if HOLDOUT is not None:
        print(f"held-out studies ({FOLD_RESULTS[0]['holdout']['rows']['study_id'].nunique()}):")
        print(HOLDOUT.to_string())
    for message in dead_class_warnings(FINAL['pred_counts']):
        warn(f'final model: {message}')
    plot_curves(FOLD_RESULTS)
    plot_confusion(FINAL['confusion'], f"final ({', '.join(sorted(set(OOF['model'])))})", 'confusion_matrix')
    for _condition, _confusion in PER_CONDITION['confusion'].items() if len(PER_CONDITION) > 1 else ():
        plot_confusion(_confusion, f'{_condition} (final)', f'confusion_{_condition}')
    plot_attention_heatmap(OOF, pooling=CONFIG['pooling'])
    plot_strips(OOF, IMAGES, CONFIG['img_size'],
                f"{CONFIG['pooling']} pooling weight of each slice (examples per class)", 'attention_strips')


# %% [markdown]
# ## 10. Post-training analysis
# The plan's three questions, answered with numbers and figures:
# 1. **Attention:** which slices get the weight; does it follow severity; are the edge slices ignored?
# 2. **Errors:** the most confused class pairs, and a gallery of the worst errors (motion, poor crop, wrong level).
# 3. **Ensemble potential:** per-fold spread and, with `holdout_frac` > 0, each fold model against their average
#    on studies that no fold saw.

# %% tags=["defs"]
def attention_analysis(oof, pooling='attention'):
    """Mean attention per slice and class, its relation to severity, and the weight of the edge slices
    (over all samples and per class: a pooled centre/edge ratio above 1 can hide a class whose centre
    weight is below its edge weight)."""
    from scipy.stats import spearmanr  # scikit-learn's own dependency

    cols = [c for c in oof if c.startswith('attn_')]
    n, weights = len(cols), oof[cols].to_numpy()
    profile = oof.groupby('label')[cols].mean().rename(index=dict(enumerate(CLASSES)))
    centre = weights[:, n // 2]
    edges = weights[:, [0, n - 1]]

    def centre_over_edge(rows):  # padded slices have weight 0: left out of the edge mean
        e = edges[rows]
        return float(centre[rows].mean() / e[e > 0].mean()) if (e > 0).any() else float('nan')

    edge_mean = float(edges[edges > 0].mean()) if (edges > 0).any() else float('nan')
    rho, p = spearmanr(oof['label'], centre) if oof['label'].nunique() > 1 else (float('nan'), float('nan'))
    labels = oof['label'].to_numpy()
    return {'pooling': pooling, 'profile': profile, 'centre_mean': float(centre.mean()), 'edge_mean': edge_mean,
            'centre_over_edge_by_class': {CLASSES[c]: centre_over_edge(labels == c) for c in sorted(set(labels))},
            'uniform': 1 / n, 'edge_vs_uniform': edge_mean * n, 'edge_vs_centre': edge_mean / float(centre.mean()),
            'spearman_label_vs_centre_weight': float(rho), 'spearman_p': float(p),
            'argmax_slice_by_class': (oof.assign(top=weights.argmax(1) - n // 2).groupby('label')['top']
                                      .agg(lambda s: s.value_counts().idxmax()).rename(index=dict(enumerate(CLASSES))))}


def confused_pairs(confusion):
    """Off-diagonal cells, most frequent first, with their share of the true class."""
    confusion = np.asarray(confusion)
    rows = [{'true': CLASSES[i], 'predicted': CLASSES[j], 'count': int(confusion[i, j]),
             'share of true class': round(confusion[i, j] / max(confusion[i].sum(), 1), 3)}
            for i in range(3) for j in range(3) if i != j]
    return pd.DataFrame(rows).sort_values('count', ascending=False, ignore_index=True)


def worst_errors(oof, k=6):
    """Misclassified samples with the lowest probability on their true class."""
    probs = oof[P_COLUMNS].to_numpy()
    wrong = oof.assign(p_true=probs[np.arange(len(oof)), oof['label']])[probs.argmax(1) != oof['label']]
    return wrong.sort_values('p_true').head(k)


def plot_attention_profile(analysis, name='attention_profile'):
    if analysis['pooling'] != 'attention':
        return not_applicable('mean attention weight per slice and class', name)
    profile = analysis['profile']
    n = profile.shape[1]
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, row in profile.iterrows():
        ax.plot(range(-(n // 2), n // 2 + 1), row.to_numpy(), 'o-', label=label)
    ax.axhline(analysis['uniform'], color='grey', ls=':', label='uniform 1/n')
    ax.set_xlabel('slice relative to the annotated one')
    ax.set_ylabel('mean attention weight')
    ax.set_title('mean attention weight per slice and class (validation)')
    ax.legend()
    show(fig, name)


# %% [markdown]
# Prints the attention profile per class and the most confused pairs, and draws the worst errors.

# %%
if not SUBMIT_ONLY:  # a submission run (submit_from) trains nothing: see section 11
    ANALYSIS = attention_analysis(OOF, CONFIG['pooling'])
    CONFUSED = confused_pairs(FINAL['confusion'])
    WORST = worst_errors(OOF)
    plot_attention_profile(ANALYSIS)
    print(ANALYSIS['profile'].round(3).to_string())
    print(f"centre slice weight {ANALYSIS['centre_mean']:.3f}, edge slices {ANALYSIS['edge_mean']:.3f} "
          f"(uniform {ANALYSIS['uniform']:.3f}); centre / edge per class "
          f"{ {c: round(v, 2) for c, v in ANALYSIS['centre_over_edge_by_class'].items()} }; Spearman(label, centre "
          f"weight) = {ANALYSIS['spearman_label_vs_centre_weight']:.3f} (p = {ANALYSIS['spearman_p']:.3g})"
          + ('' if CONFIG['pooling'] == 'attention' else " (pooling = 'mean': fixed weights, nothing learned)"))
    print(CONFUSED.to_string(index=False))
    plot_strips(OOF, IMAGES, CONFIG['img_size'], 'worst errors (lowest probability on the true class)',
                'worst_errors', rows=WORST)

# %% [markdown]
# ## 11. Localisers, predicted points and the submission
# Runs section 7's definitions in one child process, so the kernel stays CUDA-free and a second *Run all* still
# trains on every GPU: the localisers of the folds that finished, the cost of localisation on their validation rows,
# and `submission.csv` (also in `/kaggle/working` on Kaggle). A failure here never loses training's results: the
# report below is written in any case.

# %%
if localiser_wanted(CONFIG):
    _budget = time_budget_s(CONFIG)  # the localisers end in time for the rest (deadline: seconds since the epoch)
    try:  # training's results must not be lost by what comes after them: the report below is written in any case
        LOCALISATION, SUBMISSION_INFO = on_device(functools.partial(  # in a child process: the kernel stays CUDA-free
            localise_and_submit, samples=None if SUBMIT_ONLY else SAMPLES, oof=None if SUBMIT_ONLY else OOF,
            folds=None if SUBMIT_ONLY else [r['fold'] for r in FOLD_RESULTS],  # those that finished (time budget)
            config=CONFIG, workers=NUM_WORKERS, deadline=None if _budget is None else RUN_START + _budget,
            probe=None if SUBMIT_ONLY else AFTER_TRAINING_PROBE))
    except Exception as _error:
        if SUBMIT_ONLY:
            raise
        print(_error)
        warn(f'the localisation and submission section failed: {error_line(_error)}')
        if has_test_files(CONFIG):  # the child process died before writing it: every row on the priors
            SUBMISSION_INFO = write_submission(None, CONFIG, torch.device('cpu'), 0, error_line(_error))[1]
    if LOCALISATION is not None:
        _loc, _cost, _choice = LOCALISATION
        _loc.table.to_csv(OUTPUT_DIR / 'localisation.csv', index=False)
        print(_loc.metrics.to_string())
        for _series in _loc.series:  # localisation.png: the spinal canal's series; then one figure per series type
            plot_localisation(_loc, _series, 'localisation' + ('' if _series == CONDITION_SERIES[SPINAL] else
                                                                '_' + _series.lower().replace(' ', '_')))
        if _cost is not None:
            print(cost_line(_cost))
            print(cost_table(_cost, _choice).to_string())
            print(choice_table(_choice).round(4).to_string())

# %% [markdown]
# ## 12. Results report
# `v9_Results.md`, `metrics.json` and `oof.csv` in `output_dir`, written from this run only. The headline is a table
# of the official metric's terms; what each figure is and is not comparable to is said under it.

# %% tags=["defs"]
SUCCESS_CRITERIA = [  # (tier, criterion, quantity, threshold, strictly above?) from the plan's Success Criteria
    ('Minimum', 'No dead class: all 3 classes > 20 % recall by epoch 3', 'min recall at epoch 3', 0.20, True),
    ('Minimum', 'BA >= 74.9 % (match v4)', 'BA', 0.749, False),
    ('Target', 'BA >= 75.5 %', 'BA', 0.755, False),
    ('Target', 'Moderate recall >= 65 %', 'recall Moderate', 0.65, False),
    ('Target', 'Severe recall >= 70 %', 'recall Severe', 0.70, False),
    ('Stretch', 'BA >= 77 %', 'BA', 0.77, False),
    ('Stretch', 'All classes >= 75 % recall', 'min recall', 0.75, False),
    ('Stretch', ('Attention interpretable: mean centre-slice weight / mean edge-slice weight > 1 over all '
                 'validation samples (a ratio test only: no per-class or severity test, see Analysis)'),
     'centre / edge weight', 1.0, True),
]


def success_table(final, results, analysis, final_kinds=('swa',)):
    """The plan's Success Criteria with the measured value and PASS / FAIL (N/A when not measurable). The
    'model' column names the final model(s); 'best' is marked as selected on the validation fold it is
    scored on (its figures are optimistic)."""
    epoch3 = [min(row[f'recall_{c}'] for c in range(3)) for r in results for row in r['history']
              if row['epoch'] == 3 and 'val_ba' in row]
    attention = analysis['pooling'] == 'attention'
    values = {'BA': final['ba'], 'recall Moderate': final['recall'][1], 'recall Severe': final['recall'][2],
              'min recall': min(final['recall']), 'min recall at epoch 3': min(epoch3) if epoch3 else np.nan,
              'centre / edge weight': analysis['centre_mean'] / analysis['edge_mean'] if attention else np.nan}
    model = ', '.join(sorted(set(final_kinds)))
    if 'best' in final_kinds:
        model += ' (selected on its own validation fold: optimistic)'
    rows = []
    for tier, text, quantity, threshold, strict in SUCCESS_CRITERIA:
        value = values[quantity]
        passed = value > threshold if strict else value >= threshold
        rows.append({'tier': tier, 'criterion': text, 'model': 'per epoch' if 'epoch' in quantity else model,
                     'measured': round(value, 4),
                     'status': 'N/A' if not np.isfinite(value) else 'PASS' if passed else 'FAIL'})
    return pd.DataFrame(rows)


def md_table(frame):
    """A DataFrame as a Markdown table (no extra dependency)."""
    frame = frame.reset_index() if frame.index.name or not isinstance(frame.index, pd.RangeIndex) else frame
    cells = [[str(c) for c in frame.columns]] + [[f'{v:.4g}' if isinstance(v, float) else str(v) for v in row]
                                                 for row in frame.itertuples(index=False)]
    lines = ['| ' + ' | '.join(r) + ' |' for r in cells]
    return '\n'.join([lines[0], '|' + '---|' * len(frame.columns)] + lines[1:])


def data_source(config):
    marker = Path(config['data_root']) / 'GENERATED_BY.txt'
    return f'generated study set ({marker.read_text().strip()})' if marker.exists() else 'competition data'


def model_wording(kind, result):
    """How a fold's final model came about, for the report: where validation had a part in it (early stopping
    ended the fold, the plan's class-weight actions were applied from its results), the wording says so."""
    if kind == 'best':
        return 'the best epoch, SELECTED ON ITS OWN VALIDATION FOLD: its figures below are optimistic'
    text = {'swa': 'the SWA average of the last epochs', 'last': 'the last epoch'}[kind]
    decided = []
    if result.get('stopped_by') == 'early':
        decided.append(f"when training stopped (early stopping after epoch {result['history'][-1]['epoch']})")
    if result['actions']:
        epochs = sorted({int(a.split(':')[0].removeprefix('epoch ')) for a in result['actions']})
        decided.append(f"the class weights (the plan's actions at epoch{'s' * (len(epochs) > 1)} "
                       + ', '.join(map(str, epochs)) + ')')
    return text + ('; validation decided ' + ' and '.join(decided) if decided else ', not selected on validation')


# %% [markdown]
# The headline: a table of the official metric's four terms and their mean, with oracle points, with predicted
# points where localisation ran, and the candidate submitted per condition; short notes under it say what each
# figure is and is not comparable to.

# %% tags=["defs"]
HEADLINE_TERMS = (*METRIC_GROUPS, 'any_severe_spinal')  # the official metric's four terms, the headline's rows


def submitted_candidates(choice, term):
    """The candidate submission.csv takes for each of a term's conditions (choose_probabilities' `choice`): one
    word for one condition (any_severe_spinal: the spinal canal's), 'left x, right y' for a side pair."""
    conditions = [c for c in choice if c.endswith(METRIC_GROUPS.get(term, SPINAL))]
    if len(conditions) == 1:
        return choice[conditions[0]]['candidate']
    return ', '.join(f"{c.split('_')[0]} {choice[c]['candidate']}" for c in conditions) or '-'


def headline_table(final, localisation=None):
    """The headline's table: a row per term of the official metric (HEADLINE_TERMS) and their mean, the out-of-fold
    loss (4 decimals; '-' for a term not trained) with oracle points, raw and prior-corrected, and, where the
    localisation section measured its cost (a Localisation with a cost), with predicted points on the same rows and
    the candidate submitted for the term's conditions."""
    scores = {'oracle raw': final, 'oracle corrected': final['corrected']}
    cost = None if localisation is None else localisation.cost
    if cost is not None:
        scores.update({'predicted raw': cost['predicted'], 'predicted corrected': cost['predicted']['corrected']})
    table = pd.DataFrame({name: [f"{score['competition_terms'][t]:.4f}" if t in score['competition_terms'] else '-'
                                 for t in HEADLINE_TERMS] + [f"{score['competition_score_part']:.4f}"]
                          for name, score in scores.items()}, index=[*HEADLINE_TERMS, 'mean'])
    if cost is not None:
        table['submitted'] = [submitted_candidates(localisation.choice, t) if t in final['competition_terms'] else '-'
                              for t in HEADLINE_TERMS] + ['-']
    return table.rename_axis('term')


def headline_lines(config, results, kinds, final, oof, ran, localisation=None):
    """The report's headline: the official metric's terms as a table (headline_table) with notes on what each
    figure is and is not comparable to; then the final model per fold and how it was chosen, what stopped a fold,
    skipped steps, training processes, pooling and class weights, and balanced accuracy."""
    how = {r['fold']: model_wording(kinds[r['fold']], r) for r in results}
    trained = [t for t in HEADLINE_TERMS if t in final['competition_terms']]
    cost = None if localisation is None else localisation.cost
    return [
        '## Headline', '',
        "The official metric's terms, out of fold (sample-weighted log loss, lower is better):", '',
        md_table(headline_table(final, localisation)), '',
        (f"- Rows: {len(oof)} validation rows of {oof['study_id'].nunique()} studies that survived filtering, folds "
         f"{sorted(set(oof['fold']))} of {config['num_folds']}, each scored by the final model of its fold"
         f"{views_wording(config)}."),
        '- Oracle: crops at the annotated slice and point (perfect localisation).',
        *([("- Predicted: the same rows and models at the localisers' points; a row without one is on its fold's "
            'training priors.'),
           ("- Submitted: the candidate submission.csv takes for the term's conditions, chosen and its temperature T "
            'fitted on these same rows: optimistic for them.')] if cost is not None else []),
        "- Raw: the softmax; corrected: re-weighted to the metric's 1/2/4 row weights.",
        (f"- Mean: of the {len(trained)} trained term(s) of the leaderboard's 4. Not comparable with leaderboard "
         'scores: those are the four terms on hidden test studies at predicted points.'),
        ('- Temperature scaling: none in the oracle and predicted figures (no labelled data here that the reported '
         'model was neither selected nor scored on).'),
        f"- Balanced accuracy: raw {final['ba']:.4f}, prior-corrected {final['corrected']['ba']:.4f}.",
        '- Final model: ' + '; '.join(f'fold {f}: {k} ({how[f]})' for f, k in kinds.items())
        + f"; CONFIG final_model '{config['final_model']}', fallback swa > last > best.",
        *[f"- Fold {r['fold']}: stopped by the time budget after epoch {r['epochs_trained']} of {config['epochs']} "
          f"(time_budget_h; continue_from in a new session trains the rest)." for r in results
          if r.get('stopped_by') == 'budget'],
        *([f"- Folds not started (time budget): {sorted(set(config['train_folds']) - set(kinds))}."]
          if set(config['train_folds']) - set(kinds) else []),
        ('- Steps skipped for a non-finite gradient norm (never applied): '
         + '; '.join(f"fold {r['fold']}: {r.get('nonfinite_steps', 0)}" for r in results) + f'; precision {ran}.'),
        ('- Training processes (DistributedDataParallel when more than one; global batch batch_size): '
         + '; '.join(f"fold {r['fold']}: {r.get('processes', 1)}" for r in results) + '.'),
        f"- Pooling: {config['pooling']}; class weights: "
        + '; '.join(f"fold {r['fold']}: {r['class_weights']}" for r in results) + '.', '',
    ]


# %% [markdown]
# The analysis in words, and `write_report`, which writes the report with the data, the configuration, the
# per-epoch history, the figures and every warning.

# %% tags=["defs"]
def analysis_lines(analysis, confused, results, holdout, config):
    """The report's analysis: attention, errors and ensemble potential."""
    return [
        '## Analysis', '',
        '### Attention', '',
        *(["Not applicable: pooling = 'mean' (every unpadded slice weighs the same; nothing is learned)."]
          if analysis['pooling'] != 'attention' else [
            md_table(analysis['profile'].round(4)), '',
            (f"- Centre slice mean weight {analysis['centre_mean']:.3f}; edge slices {analysis['edge_mean']:.3f}; "
             f"uniform would be {analysis['uniform']:.3f} (edge / uniform = {analysis['edge_vs_uniform']:.2f})."),
            '- Centre / edge weight per class: ' + ', '.join(
                f'{c} {v:.2f}' for c, v in analysis['centre_over_edge_by_class'].items())
            + '. The pooled ratio (the stretch criterion) only says that, on average over all samples, the '
            'annotated slice outweighs the outermost ones; it does not show that this holds for every class, '
            'nor that attention follows severity (that is the Spearman test below).',
            (f"- Spearman correlation of severity with the centre slice's weight: "
             f"{analysis['spearman_label_vs_centre_weight']:.3f} (p = {analysis['spearman_p']:.3g})."),
            '- Most attended slice per class: ' + ', '.join(f'{c} {v:+d}' for c, v in
                                                           analysis['argmax_slice_by_class'].items())]), '',
        '### Errors', '', md_table(confused), '',
        '### Ensemble potential', '',
        f"{len(results)} of {config['num_folds']} fold(s) trained. " + (
            'Each fold model and their average on the held-out studies (holdout_frac '
            f"{config['holdout_frac']:g}), which no fold trained or validated on:\n\n" + md_table(holdout)
            if holdout is not None else
            'No held-out studies (holdout_frac = 0): out-of-fold predictions come from one model each, so '
            'an ensemble gain cannot be measured; set holdout_frac (e.g. 0.2) and train several folds.'),
    ]


def final_metrics_lines(final, oof, comparison, fold_ba, config):
    """The report's final metrics: the final model's pooled out-of-fold figures, per condition, every model kind,
    per fold."""
    return [
        "## Final metrics (validation folds " + ', '.join(map(str, fold_ba)) + ')', '',
        f"Final model: {', '.join(sorted(set(oof['model'])))}. Balanced accuracy {final['ba']:.4f}; recall "
        + ', '.join(f'{c} {r:.4f}' for c, r in zip(CLASSES, final['recall']))
        + f"; predictions per class {final['pred_counts']}. Prior-corrected probabilities: balanced accuracy "
        f"{final['corrected']['ba']:.4f}; predictions per class {final['corrected']['pred_counts']}.",
        f'{SCORE_NAME[0].upper() + SCORE_NAME[1:]} (lower is better), raw: '
        + ', '.join(f'{k} {v:.4f}' for k, v in final['competition_terms'].items()) + '; prior-corrected: '
        + ', '.join(f'{k} {v:.4f}' for k, v in final['corrected']['competition_terms'].items())
        + f'. {score_caveat(oof, config)}', '',
        'Per condition (final model, raw probabilities):', '',
        md_table(per_condition(oof).drop(columns='confusion')), '',
        'All model kinds, pooled over folds (best = chosen on the same fold, so optimistic):', '',
        md_table(comparison), '',
        'Per-fold balanced accuracy of the final model: ' + ', '.join(f'fold {f}: {v:.4f}' for f, v in fold_ba.items())
        + (f' (std {np.std(list(fold_ba.values())):.4f}).' if len(fold_ba) > 1 else '.'), '']


def write_report(config, samples, skipped, failures, results, oof, final, comparison, holdout, analysis, confused,
                 localisation=None, submission_info=None):
    """v9_Results.md (from this run only), metrics.json and oof.csv in output_dir, with section 11's `localisation`
    and `submission_info` where it ran; returns the report text."""
    out = Path(config['output_dir'])
    kinds = {r['fold']: final_kind(r, config) for r in results}
    success = success_table(final, results, analysis, list(kinds.values()))
    counts = samples['label'].map(dict(enumerate(CLASSES))).value_counts().reindex(CLASSES, fill_value=0)
    history = pd.concat([pd.DataFrame(r['history']).assign(fold=r['fold']) for r in results], ignore_index=True)
    history_cols = [c for c in ['fold', 'epoch', 'train_loss', 'val_loss', 'train_ba', 'train_eval_ba', 'val_ba',
                                'recall_0', 'recall_1', 'recall_2', 'pred_counts', 'lr_head', 'grad_norm_mean',
                                'clipped_frac', 'nonfinite_steps', 'saved', 'swa', 'seconds'] if c in history]
    checkpoints = pd.DataFrame([dict(row, fold=r['fold']) for r in results for row in r['checkpoints']])
    fold_ba = {r['fold']: r['evaluations'][kinds[r['fold']]]['ba'] for r in results}
    figures = sorted(p.name for p in FIGURES.glob('*.png'))
    ran = precision_in_use(DEVICE, config)
    shown = {**config, 'precision': ran if ran == config['precision'] else f"{ran} (CONFIG: {config['precision']})"}
    text = [
        '# le3ba v9 results', '',
        (f"Written by le3ba_v9.ipynb on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f'Machine: {machine_description(DEVICE)}; precision {ran}.'), '',
        *headline_lines(config, results, kinds, final, oof, ran, localisation), '',
        '## Data', '',
        f"- Source: {data_source(config)} at `{config['data_root']}`",
        "- Conditions: " + ', '.join(f'{c} on {CONDITION_SERIES[c]}' for c in config['conditions'])
        + f"; {samples['study_id'].nunique()} "
        f'studies, {len(samples)} samples; classes: ' + ', '.join(f'{c} {n}' for c, n in counts.items()),
        (f"- Rows not used: {int(skipped['rows'].sum()) if len(skipped) else 0}; preprocessing: "
        + (', '.join(f'{n} {w}' for w, n in failures.groupby('what').size().items()) or 'no data issue')), '',
        md_table(skipped) if len(skipped) else '', '', md_table(failures) if len(failures) else '', '',
        '## Configuration', '', '```json', json.dumps(shown, indent=1, default=str), '```', '',
        '## Per-epoch history', '', md_table(history[history_cols].astype(object).where(history[history_cols].notna(),
                                                                               '-')), '',
        *final_metrics_lines(final, oof, comparison, fold_ba, config),
        '## Success criteria (the plan)', '', md_table(success), '',
        "## Critical checkpoints (the plan's epochs 1, 3, 10)", '',
        md_table(checkpoints) if len(checkpoints) else 'No checkpoint epoch was reached.', '',
        'Class-weight actions applied: ' + ('; '.join(a for r in results for a in r['actions']) or 'none') + '.', '',
        *analysis_lines(analysis, confused, results, holdout, config),
        '', *localisation_report(localisation, submission_info, config),
        '## Figures', '', *[f'- [{f}](figures/{f})' for f in figures], '',
        '## Warnings', '', *([f'- {w}' for w in WARNINGS] or ['none']), '']
    report = '\n'.join(text)
    write_atomic(out / 'oof.csv', oof.drop(columns='cache_index').to_csv(index=False))
    metrics = {'config': shown, 'final': final, 'comparison': comparison.to_dict('index'),
               'success': success.to_dict('records'), 'checkpoints': checkpoints.to_dict('records'),
               'holdout': None if holdout is None else holdout.to_dict('index'),
               'history': {r['fold']: r['history'] for r in results},
               'attention': {k: v for k, v in analysis.items() if not hasattr(v, 'to_dict')},
               'warnings': WARNINGS}
    write_atomic(out / 'metrics.json', json.dumps(metrics, indent=1, default=str))
    write_atomic(out / 'v9_Results.md', report)  # last: a report present means the run reached its end
    return report


# %% [markdown]
# Writes the report and prints the plan's success criteria, met or not.

# %%
if not SUBMIT_ONLY:  # a submission run (submit_from) trains nothing: see section 11
    _issues = [DATA_ISSUES] + ([] if LOCALISATION is None else [LOCALISATION.localisers.issues]) + (
        [] if SUBMISSION_INFO is None else [pd.DataFrame(SUBMISSION_INFO['issues'], columns=ISSUE_COLUMNS)])
    REPORT = write_report(CONFIG, SAMPLES, SKIPPED, pd.concat(_issues, ignore_index=True), FOLD_RESULTS, OOF, FINAL,
                          COMPARISON, HOLDOUT, ANALYSIS, CONFUSED, LOCALISATION, SUBMISSION_INFO)
    _success = success_table(FINAL, FOLD_RESULTS, ANALYSIS, list(OOF['model']))
    print(f"wrote {OUTPUT_DIR / 'v9_Results.md'}, metrics.json, oof.csv; the plan's success criteria: "
          f"{(_success['status'] == 'PASS').sum()} of {len(_success)} met")
    print(_success[['tier', 'measured', 'status']].assign(
        criterion=_success['criterion'].str.split(':').str[0].str[:70]).to_string(index=False))
