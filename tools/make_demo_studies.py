"""Generate small study sets in the exact layout of the RSNA 2024 Lumbar Spine competition.

The real data cannot be downloaded here, so tests, the demo run and benchmarks use sets written by
this module. They mimic the competition root file for file (CSV columns and spellings, the
``train_images/{study}/{series}/{instance}.dcm`` tree, 12-bit MR DICOM, RLE Lossless on part of
the series) and the quirks a reader must survive: instance numbers that do not start at 1 or run
against anatomical order, per-series image size, pixel spacing and intensity scale, and annotated
slices near the series edge.

The images carry a learnable signal for spinal canal stenosis: on the Sagittal T2/STIR midline
slice a bright CSF band is narrowed at each disc level according to the level's severity, and the
label's (x, y) is the canal centre there. Anatomy is defined in patient millimetres (LPS) and
sampled on each series' own pixel grid, so fixed-size crops in mm look alike across series.
Foraminal (Sagittal T1) and subarticular (Axial T2) severities are reflected more loosely.

Usage: ``python tools/make_demo_studies.py OUT_DIR --studies 40 --seed 0 --mix 0.6,0.2,0.2``
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.encoders import RLELosslessEncoder
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

CONDITIONS = [
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
    "left_subarticular_stenosis",
    "right_subarticular_stenosis",
]
LEVELS = ["l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"]
CONDITION_NAMES = {c: c.replace("_", " ").title() for c in CONDITIONS}
LEVEL_NAMES = {lv: lv.upper().replace("_", "/") for lv in LEVELS}
SEVERITIES = ["Normal/Mild", "Moderate", "Severe"]
SERIES_TYPES = ["Sagittal T1", "Sagittal T2/STIR", "Axial T2"]
# Which series each condition is annotated on (as in the real labels).
CONDITION_SERIES = {
    "spinal_canal_stenosis": "Sagittal T2/STIR",
    "left_neural_foraminal_narrowing": "Sagittal T1",
    "right_neural_foraminal_narrowing": "Sagittal T1",
    "left_subarticular_stenosis": "Axial T2",
    "right_subarticular_stenosis": "Axial T2",
}
# Severity mix of the non-spinal conditions, roughly the real proportions.
OTHER_MIX = (0.7, 0.2, 0.1)
# Fraction of the canal (or foramen / recess) left open at a disc, per severity: (low, high).
CANAL_OPEN = [(0.85, 1.0), (0.42, 0.58), (0.10, 0.20)]
SIDE_OPEN = [(0.85, 1.0), (0.50, 0.65), (0.25, 0.35)]
SAG_IOP = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # rows run posterior, columns run inferior
AX_IOP = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # rows run to patient left, columns posterior
EDGE_FRAC = 0.10  # studies whose annotated spinal slice lies at or next to the series edge
REVERSED_FRAC = 0.15  # series whose instance numbers run against anatomical order
CANAL_FADE_SLICES = 1.5  # sigma (in slices) of the canal contrast around the midline slice


def _ramp(inside_mm, edge_mm=1.0):
    """Soft 0..1 mask from a signed distance (positive inside): anti-aliased edges."""
    return np.clip(inside_mm / edge_mm + 0.5, 0.0, 1.0)


def _plateau(dz, half_mm):
    """Flat-topped bump (~2*half_mm wide at half height) used for narrowing at a disc."""
    return np.exp(-0.5 * (dz / (0.96 * half_mm)) ** 4)


class _Anatomy:
    """One study's lumbar spine in patient mm; z up (superior), y posterior, x patient left."""

    def __init__(self, rng, spinal, sub_left, sub_right, fora_left, fora_right):
        s = rng.uniform(0.9, 1.1)  # patient size: all lengths scale together
        self.body, self.disc = 25.0 * s, 9.0 * s
        pitch = self.body + self.disc
        # L1/L2 .. L5/S1 with L3/L4 at z = 0; float32 keeps the image arithmetic in float32.
        self.z_disc = ((2 - np.arange(5)) * pitch).astype(np.float32)
        self.col_top = self.z_disc[0] + self.disc / 2 + self.body  # top of L1
        self.col_bot = self.z_disc[-1] - self.disc / 2 - self.body  # bottom of S1
        self.y_canal = rng.uniform(-10, 10)
        self.lordosis = rng.uniform(-8, 8)  # mm of canal bow over the lumbar span
        self.hw0 = 6.0 * rng.uniform(0.9, 1.1)  # canal half-width (~12 mm wide)
        self.body_depth = 35.0 * s
        self.canal_open = self._open(rng, spinal, CANAL_OPEN)
        self.sub_open = [self._open(rng, sev, SIDE_OPEN) for sev in (sub_left, sub_right)]
        self.fora_open = [self._open(rng, sev, SIDE_OPEN) for sev in (fora_left, fora_right)]
        self.fora_x = rng.uniform(16, 20)  # lateral distance of the foramina
        self.recess_x = rng.uniform(9, 11)  # lateral distance of the subarticular recesses

    @staticmethod
    def _open(rng, sev, table):
        return np.array([rng.uniform(*table[k]) for k in sev], np.float32)

    def yc(self, z):
        """Canal centre (y) at height z: a gentle bow stands in for lordosis."""
        return self.y_canal + self.lordosis * (z / (2.2 * self.body + 2.2 * self.disc)) ** 2

    def narrowing(self, z, open_frac):
        """1 where the structure is fully open, open_frac[i] at disc i, smooth over ~10 mm."""
        shut = sum((1 - f) * _plateau(z - zi, 5.0) for f, zi in zip(open_frac, self.z_disc))
        return 1.0 - shut

    def disc_weight(self, z):
        """1 inside an intervertebral disc, 0 inside a vertebral body (soft edges)."""
        dz = np.min(np.abs(np.subtract.outer(z, self.z_disc)), axis=-1)
        return _ramp(self.disc / 2 - dz)

    def column(self, z):
        """1 between the top of L1 and the bottom of S1: 6 bodies and 5 discs, nothing else."""
        return _ramp(np.minimum(self.col_top - z, z - self.col_bot))


def _finish(rng, img, scale):
    """Rician-like noise, a smooth bias field and the series' own scale -> uint16 12-bit values."""
    # |signal + noise| is Rician-like where it matters (dark background) at half the cost.
    noisy = np.abs(img + rng.uniform(0.025, 0.04) * rng.standard_normal(img.shape, np.float32))
    r = np.linspace(-1, 1, img.shape[-2], dtype=np.float32)[:, None]
    c = np.linspace(-1, 1, img.shape[-1], dtype=np.float32)[None, :]
    a = rng.uniform(-0.2, 0.2, 3)
    bias = np.exp(a[0] * r + a[1] * c + a[2] * r * c)
    return np.clip(np.rint(noisy * bias * scale), 0, 4095).astype(np.uint16)


def _geometry(rng, size_choices, fov_range):
    """Rows, columns and isotropic spacing so that the field of view is fov_range mm."""
    rows = int(rng.choice(size_choices))
    cols = rows if rng.random() < 0.7 else int(rng.choice(size_choices))
    spacing = rng.uniform(*fov_range) / max(rows, cols)
    return rows, cols, spacing


def _sagittal(rng, anat, kind, n, mid, gap):
    """Sagittal series: pixel volume, per-slice IPP (anatomical order) and pixel-frame info."""
    rows, cols, sp = _geometry(rng, [256, 320, 384, 448], (220, 300))
    # Canal sits a bit posterior of the image centre, spine vertically centred +/- 10 mm.
    y0 = anat.y_canal - rng.uniform(0.5, 0.62) * cols * sp
    z0 = rng.uniform(-10, 10) + rows * sp / 2
    y = (y0 + np.arange(cols, dtype=np.float32) * sp)[None, :]
    z = (z0 - np.arange(rows, dtype=np.float32) * sp)[:, None]
    x = -(np.arange(n) - mid) * gap + rng.uniform(-0.5, 0.5)  # slice `mid` is the midline
    d = np.arange(n) - mid  # slice distance from the midline, in slices

    yc = anat.yc(z)
    front = yc - anat.hw0 - 3  # posterior wall of the bodies: 3 mm in front of the canal
    body_ap = _ramp(np.minimum(front - y, y - (front - anat.body_depth)))
    col = body_ap * anat.column(z)
    discw = anat.disc_weight(z)
    canal = _ramp(anat.hw0 * anat.narrowing(z, anat.canal_open) - np.abs(y - yc))

    if kind == "Sagittal T2/STIR":  # dark tissue, bodies moderate, discs darker, CSF bright
        bg, body, disc, csf = 0.12, 0.45, 0.36, 0.95
    else:  # T1: CSF dark, marrow bright
        bg, body, disc, csf = 0.18, 0.55, 0.35, 0.06
    anat2d = bg + col * (body + (disc - body) * discw - bg)
    # Bodies fade only mildly laterally, so outer slices still show them; the canal (and its
    # narrowing) fades fast so that only slices near the midline carry the label's signal.
    body_amp = (0.6 + 0.4 * np.exp(-(d**2) / (2 * 5.0**2)))[:, None, None]
    canal_amp = np.exp(-(d**2) / (2 * CANAL_FADE_SLICES**2))[:, None, None]
    vol = bg + body_amp * (anat2d - bg) + canal_amp * canal * (csf - anat2d)

    fora_pts = None
    if kind == "Sagittal T1":  # bright foraminal fat on parasagittal slices, shrunk by severity
        fora_pts = []
        for side, sign in enumerate((1, -1)):  # left (+x in LPS) then right
            zf = anat.z_disc + 4.0
            yf = anat.yc(zf) + 1.0
            op = anat.fora_open[side]
            ry, rz = 3.5 * op, 6.0 * op
            mask = sum(_ramp(np.minimum(ry[i], rz[i]) * (1 - np.hypot((y - yf[i]) / ry[i],
                                                                      (z - zf[i]) / rz[i])))
                       for i in range(5))
            amp = np.exp(-((x - sign * anat.fora_x) ** 2) / (2 * 3.0**2))[:, None, None]
            vol = vol + amp * mask * (0.75 - vol)
            k = int(np.argmin(np.abs(x - sign * anat.fora_x)))
            fora_pts.append((k, (yf - y0) / sp, (z0 - zf) / sp))

    ipp = [[float(xi), float(y0), float(z0)] for xi in x]
    return vol.astype(np.float32), ipp, (rows, cols, sp, y0, z0), fora_pts


def _axial(rng, anat):
    """Axial T2: 2-4 slices per disc level, canal, vertebra and subarticular recesses."""
    rows, cols, sp = _geometry(rng, [256, 320], (160, 220))
    per, gap = int(rng.integers(2, 5)), rng.uniform(3, 4)
    stack = (np.arange(per) - (per - 1) / 2) * gap  # a short stack centred on each disc
    z = np.sort(np.concatenate([zi + stack for zi in anat.z_disc]) + rng.uniform(-1, 1, 5 * per))
    z = z.astype(np.float32)
    x0 = -cols * sp / 2 + rng.uniform(-8, 8)
    y0 = anat.y_canal - rng.uniform(0.55, 0.65) * rows * sp
    xx = (x0 + np.arange(cols, dtype=np.float32) * sp)[None, None, :]
    yy = (y0 + np.arange(rows, dtype=np.float32) * sp)[None, :, None]
    zz = z[:, None, None]
    yc = anat.yc(zz)

    def ellipse(cx, cy, rx, ry):
        return _ramp(np.minimum(rx, ry) * (1 - np.hypot((xx - cx) / rx, (yy - cy) / ry)))

    vol = 0.02 + 0.16 * ellipse(0, anat.y_canal + 10, 140, 100)  # trunk in air (2D: cheap)
    vb = ellipse(0, yc - anat.hw0 - 19, 22, 16) * anat.column(zz)
    vol = vol + vb * (0.45 - 0.09 * anat.disc_weight(zz) - vol)
    canal = ellipse(0, yc, 9, anat.hw0 * anat.narrowing(zz, anat.canal_open))
    vol = vol + canal * (0.95 - vol)
    ry = yc - anat.hw0 * 0.3
    for side, sign in enumerate((1, -1)):
        g = anat.narrowing(zz, anat.sub_open[side])
        vol = vol + ellipse(sign * anat.recess_x, ry, 3.0 * g, 2.5 * g) * (0.9 - vol)
    ipp = [[float(x0), float(y0), float(zk)] for zk in z]
    return vol.astype(np.float32), ipp, (rows, cols, sp, x0, y0), z


def _write_series(folder, vol, ipp, iop, spacing, thickness, instances, meta, rle):
    """Write one series, one file per slice named by its instance number."""
    folder.mkdir(parents=True, exist_ok=True)
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    sub = vol[:, ::4, ::4]
    lo, hi = np.percentile(sub, [1, 99.5])  # each file carries its series' window
    plugin = "pylibjpeg" if "pylibjpeg" in RLELosslessEncoder.available_plugins else ""
    for k, inst in enumerate(instances):
        sop = generate_uid(entropy_srcs=[meta["uid_seed"], str(meta["series_id"]), str(inst)])
        fm = FileMetaDataset()
        fm.MediaStorageSOPClassUID = MRImageStorage
        fm.MediaStorageSOPInstanceUID = sop
        fm.TransferSyntaxUID = ExplicitVRLittleEndian
        fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        fm.ImplementationVersionName = "RSNA_DEMO"  # not pydicom's version: stable bytes
        ds = Dataset()
        ds.file_meta = fm
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        ds.Modality = "MR"
        ds.PatientID = ds.StudyID = str(meta["study_id"])
        ds.StudyInstanceUID = meta["study_uid"]
        ds.SeriesInstanceUID = meta["series_uid"]
        ds.FrameOfReferenceUID = meta["for_uid"]
        ds.SeriesNumber = meta["series_number"]
        ds.SeriesDescription = meta["description"]
        ds.InstanceNumber = int(inst)
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [round(v, 4) for v in ipp[k]]
        ds.SliceLocation = round(float(np.dot(ipp[k], normal)), 4)
        ds.SliceThickness = round(thickness, 3)
        ds.PixelSpacing = [round(spacing, 6)] * 2
        ds.Rows, ds.Columns = vol.shape[1:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.WindowCenter, ds.WindowWidth = int((lo + hi) / 2), max(1, int(hi - lo))
        if rle:  # UID kept: compress() would otherwise draw a random one and break determinism
            ds.compress(RLELossless, vol[k], encoding_plugin=plugin, generate_instance_uid=False)
        else:
            ds.PixelData = vol[k].tobytes()
        ds.save_as(folder / f"{inst}.dcm", enforce_file_format=True)


def _unique_ints(rng, n, lo, hi, taken):
    """n distinct random ints in [lo, hi) not in `taken` (ids must be unique set-wide)."""
    out = []
    while len(out) < n:
        v = int(rng.integers(lo, hi))
        if v not in taken:
            taken.add(v)
            out.append(v)
    return out


def _force_one(rng, flags, value=True):
    """Make sure a quirk really occurs: set one random entry of a bool array to value if none is."""
    if flags.size and not (flags == value).any():
        flags[np.unravel_index(rng.integers(flags.size), flags.shape)] = value
    return flags


def make_study_set(out_dir, n_studies=40, seed=0, class_mix=(0.6, 0.2, 0.2),
                   missing_label_frac=0.03, rle_fraction=0.5) -> dict:
    """Write a competition-layout study set under out_dir and return a summary dict.

    class_mix: probabilities of Normal/Mild, Moderate, Severe for the spinal canal labels.
    The same seed gives byte-identical CSVs and DICOM files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    mix = np.asarray(class_mix, float) / np.sum(class_mix)
    taken: set[int] = set()
    study_ids = _unique_ints(rng, n_studies, 1_000_000, 10_000_000, taken)
    series_ids = np.array(_unique_ints(rng, 3 * n_studies, 10_000_000, 4_000_000_000, taken))
    series_ids = series_ids.reshape(n_studies, 3)  # T1, T2/STIR, Axial per study

    # Labels as severity indices; the hidden truth still shapes the image when a cell is missing.
    sev = np.empty((n_studies, 5, 5), int)
    sev[:, 0] = rng.choice(3, (n_studies, 5), p=mix)
    sev[:, 1:] = rng.choice(3, (n_studies, 4, 5), p=OTHER_MIX)
    missing = rng.random((n_studies, 5, 5)) < missing_label_frac
    if n_studies >= 10:
        spinal_missing = missing[:, 0]  # a view: forcing writes through to `missing`
        _force_one(rng, spinal_missing)  # readers must cope with a missing spinal label

    # Set-wide quirk draws happen before any per-study draw so forcing one keeps seeds stable.
    edge = _force_one(rng, rng.random(n_studies) < EDGE_FRAC)
    reversed_ = rng.random((n_studies, 3)) < REVERSED_FRAC
    _force_one(rng, reversed_[:, 1])
    rle = rng.random((n_studies, 3)) < rle_fraction
    if 0 < rle_fraction < 1 and rle.size > 1:  # both transfer syntaxes must occur
        _force_one(rng, rle, True)
        _force_one(rng, rle, False)
    uid_seed = f"rsna-demo-{seed}"

    desc_rows, coord_rows, n_files = [], [], 0
    for s, study in enumerate(study_ids):
        anat = _Anatomy(rng, *sev[s, [0, 3, 4, 1, 2]])  # spinal, subarticular L/R, foraminal L/R
        study_uid = generate_uid(entropy_srcs=[uid_seed, str(study)])
        pts = {}  # condition -> list of (anatomical slice index, col px, row px) per level

        n2 = int(rng.integers(15, 18))
        mid2 = int(rng.choice([0, 1, n2 - 2, n2 - 1]) if edge[s] else n2 // 2 + rng.integers(-1, 2))
        gap2 = rng.uniform(3.3, 4.4)
        n1 = int(rng.integers(10, 16))
        gap1 = rng.uniform(4.0, 5.5)
        series = {}
        vol, ipp, (rows, cols, sp, y0, z0), _ = _sagittal(rng, anat, "Sagittal T2/STIR",
                                                          n2, mid2, gap2)
        jit = rng.normal(0, 1.0, (2, 5)) / sp  # ~1 mm annotation jitter
        pts["spinal_canal_stenosis"] = [
            (mid2, (anat.yc(zi) - y0) / sp + jit[0, i], (z0 - zi) / sp + jit[1, i])
            for i, zi in enumerate(anat.z_disc)]
        series["Sagittal T2/STIR"] = (vol, ipp, SAG_IOP, sp, gap2 - 0.3, rows, cols)

        vol, ipp, (rows, cols, sp, y0, z0), fora = _sagittal(rng, anat, "Sagittal T1",
                                                             n1, n1 // 2, gap1)
        for side, cond in enumerate(CONDITIONS[1:3]):
            k, cx, cy = fora[side]
            jit = rng.normal(0, 0.7, (2, 5)) / sp
            pts[cond] = [(k, cx[i] + jit[0, i], cy[i] + jit[1, i]) for i in range(5)]
        series["Sagittal T1"] = (vol, ipp, SAG_IOP, sp, gap1 - 0.5, rows, cols)

        vol, ipp, (rows, cols, sp, x0, y0), z = _axial(rng, anat)
        for side, cond in enumerate(CONDITIONS[3:5]):
            sign = 1 if side == 0 else -1
            ks = [int(np.argmin(np.abs(z - zi))) for zi in anat.z_disc]
            pts[cond] = [(k, (sign * anat.recess_x - x0) / sp,
                          (anat.yc(z[k]) - anat.hw0 * 0.3 - y0) / sp) for k in ks]
        series["Axial T2"] = (vol, ipp, AX_IOP, sp, 3.0, rows, cols)

        instances = {}
        for t, kind in enumerate(SERIES_TYPES):
            vol, ipp, iop, sp, thick, rows, cols = series[kind]
            n = len(vol)
            start = int(rng.integers(1, 21))  # real instance numbers rarely start at 1
            order = np.arange(n)[::-1] if reversed_[s, t] else np.arange(n)
            instances[kind] = start + order  # instance number of each anatomical index
            scale = rng.uniform(600, 3800) / 0.95  # brightest tissue lands near this max
            sid = int(series_ids[s, t])
            meta = {"study_id": study, "series_id": sid, "description": kind,
                    "uid_seed": uid_seed, "study_uid": study_uid,
                    "series_number": t + 1 + int(rng.integers(0, 10)),
                    "series_uid": generate_uid(entropy_srcs=[uid_seed, str(sid)]),
                    "for_uid": generate_uid(entropy_srcs=[uid_seed, str(study), "for"])}
            _write_series(out / "train_images" / str(study) / str(sid), _finish(rng, vol, scale),
                          ipp, iop, sp, thick, instances[kind], meta, bool(rle[s, t]))
            n_files += n
            desc_rows.append((study, sid, kind))

        for c, cond in enumerate(CONDITIONS):
            kind = CONDITION_SERIES[cond]
            t = SERIES_TYPES.index(kind)
            _, _, _, _, _, rows, cols = series[kind]
            for i, (k, cx, cy) in enumerate(pts[cond]):
                if missing[s, c, i]:
                    continue
                coord_rows.append((study, int(series_ids[s, t]), int(instances[kind][k]),
                                   CONDITION_NAMES[cond], LEVEL_NAMES[LEVELS[i]],
                                   round(float(np.clip(cx, 0, cols - 1)), 6),
                                   round(float(np.clip(cy, 0, rows - 1)), 6)))

    # --- CSVs, in the competition's spellings and column order ---
    label_cols = [f"{c}_{lv}" for c in CONDITIONS for lv in LEVELS]
    names = np.array(SEVERITIES, dtype=object)[sev.reshape(n_studies, 25)]
    names[missing.reshape(n_studies, 25)] = None
    train = pd.DataFrame(names, columns=label_cols)
    train.insert(0, "study_id", study_ids)
    train.to_csv(out / "train.csv", index=False)
    pd.DataFrame(coord_rows, columns=["study_id", "series_id", "instance_number", "condition",
                                      "level", "x", "y"]).to_csv(
        out / "train_label_coordinates.csv", index=False)
    desc = pd.DataFrame(desc_rows, columns=["study_id", "series_id", "series_description"])
    desc.to_csv(out / "train_series_descriptions.csv", index=False)

    # A couple of studies double as the "test" set so inference code has images to read.
    test_ids = study_ids[-min(2, n_studies):]
    desc[desc.study_id.isin(test_ids)].to_csv(out / "test_series_descriptions.csv", index=False)
    for st in test_ids:
        dst = out / "test_images" / str(st)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(out / "train_images" / str(st), dst)
    pd.DataFrame({"row_id": [f"{st}_{col}" for st in test_ids for col in label_cols],
                  "normal_mild": 1 / 3, "moderate": 1 / 3, "severe": 1 / 3}).to_csv(
        out / "sample_submission.csv", index=False)
    # lets a results report say the data were generated, never mistaken for the competition's
    (out / "GENERATED_BY.txt").write_text(
        f"tools/make_demo_studies.py, {n_studies} studies, seed {seed}, class mix {tuple(class_mix)}\n")

    spinal = sev[:, 0][~missing[:, 0]]
    return {
        "out_dir": str(out),
        "seed": seed,
        "n_studies": n_studies,
        "n_series": 3 * n_studies,
        "n_dicom_files": n_files,
        "n_coordinates": len(coord_rows),
        "n_missing_labels": int(missing.sum()),
        "spinal_canal_counts": {n: int((spinal == k).sum()) for k, n in enumerate(SEVERITIES)},
        "reversed_series": [int(v) for v in series_ids[reversed_]],
        "rle_series": [int(v) for v in series_ids[rle]],
        "edge_studies": [study_ids[i] for i in np.flatnonzero(edge)],
        "test_study_ids": list(test_ids),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--studies", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", default="0.6,0.2,0.2", help="Normal/Mild,Moderate,Severe (spinal)")
    p.add_argument("--missing", type=float, default=0.03, help="fraction of empty label cells")
    p.add_argument("--rle", type=float, default=0.5, help="fraction of RLE Lossless series")
    a = p.parse_args(argv)
    mix = tuple(float(v) for v in a.mix.split(","))
    if len(mix) != 3:
        p.error("--mix needs three comma-separated probabilities")
    t0 = time.perf_counter()
    summary = make_study_set(a.out_dir, a.studies, a.seed, mix, a.missing, a.rle)
    print(json.dumps(summary, indent=1))
    print(f"written in {time.perf_counter() - t0:.1f} s (pydicom {pydicom.__version__})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
