"""Generate small study sets in the exact layout of the RSNA 2024 Lumbar Spine competition.

The real data cannot be downloaded here, so tests, the demo run and benchmarks use sets written by
this module. They mimic the competition root file for file (CSV columns and spellings, the
``train_images/{study}/{series}/{instance}.dcm`` tree, 12-bit MR DICOM, RLE Lossless on part of
the series) and the quirks a reader must survive: instance numbers that do not start at 1 or run
against anatomical order, per-series image size, pixel spacing and intensity scale, and annotated
slices near the series edge. With quirks on (QUIRKS, REALISTIC) the Sagittal T1 and Axial T2 series get
their own too: axial blocks tilted to each disc, a missing axial level, interleaved or reversed order.
Opt-in (EXTRA_QUIRKS, not in REALISTIC): axial_partial, an Axial T2 series that covers only the lowest 1-3 levels;
sagittal_top_edge, sagittal series whose field of view starts a few pixels above the L1/L2 level.
A test split (test_studies) can be made hostile (test_faults: split series, a stray image, an unknown series,
no geometry, blank images, an empty study folder; see _apply_test_faults).

The images carry a learnable signal for all five conditions, each only near its own annotated point:
on the Sagittal T2/STIR midline slice a bright CSF band is narrowed at each disc by the spinal level's
severity (the label's (x, y) is the canal centre there); on the lateral Sagittal T1 slices (left = +x)
the bright foraminal fat shrinks with that side's foraminal severity; on each level's Axial T2 slices
the subarticular recess of each side shrinks with its severity. Anatomy is defined in patient
millimetres (LPS) and sampled on each series' own pixel grid (tilted planes included), so fixed-size
crops in mm look alike across series.

Usage: ``python tools/make_demo_studies.py OUT_DIR --studies 40 --seed 0 --mix 0.6,0.2,0.2 [--realistic]
[--test-studies 10 [--test-faults]]``
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import shutil
import sys
import time
import warnings
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
# Subarticular recess on Axial T2: an ellipse of half-axes (x, y) RECESS_HALF_MM times open ** RECESS_SHRINK, so that
# its area falls with the cube of the open fraction: up to 12 x 10 mm open (26 x 21 px of a 64 px crop of 30 mm),
# ~5 x 4 mm moderate, ~2 x 1.5 mm severe. Centred 9-11 mm from the midline (recess_x), it shows as an ear lateral of the
# canal (the canal's pixels are left as they are); its soft edge stays 2.5 mm or more off the midline, clear of the
# other side's recess, and within 6.5 mm (x) and 5.5 mm (y) of its own annotated point.
RECESS_HALF_MM = (6.0, 5.0)
RECESS_SHRINK = 1.5
SAG_IOP = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # rows run posterior, columns run inferior
AX_IOP = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # rows run to patient left, columns posterior
EDGE_FRAC = 0.10  # studies whose annotated spinal slice lies at or next to the series edge
REVERSED_FRAC = 0.15  # series whose instance numbers run against anatomical order
CANAL_FADE_SLICES = 1.5  # sigma (in slices) of the canal contrast around the midline slice

QUIRKS = ("anisotropic", "varied_sizes", "flipped_normal", "oblique", "repeated_stack", "missing_geometry",
          "instance_mismatch", "duplicate_coordinates", "outlier_pixels", "missing_slice", "bad_coordinates",
          "truncated_file", "missing_window", "axial_blocks", "axial_missing_level", "interleaved_order",
          "reversed_order")
GEOMETRY_QUIRKS = QUIRKS[:4]  # drawn per series, all three series types (oblique: sagittal ones only)
# The preset the tests and the realistic demo use: real class mix, real share of empty label cells
# (about 1-2 % of the 1,975 x 25 cells), every quirk on, each at least once (see _quirk_flags).
REALISTIC = {
    "class_mix": (0.88, 0.06, 0.05),
    "missing_label_frac": 0.015,
    "quirks": {"anisotropic": 0.3, "varied_sizes": 0.3, "flipped_normal": 0.4, "oblique": 0.3,
               "repeated_stack": 0.1, "missing_geometry": 0.1, "instance_mismatch": 0.05,
               "duplicate_coordinates": 0.05, "outlier_pixels": 0.1, "missing_slice": 0.05,
               "bad_coordinates": 0.02, "truncated_file": 0.05, "missing_window": 0.05, "axial_blocks": 0.5,
               "axial_missing_level": 0.05, "interleaved_order": 0.05, "reversed_order": 0.1},
}
LARGE_SIZES = [384, 512, 640, 768, 1024]  # varied_sizes: real series run 384-1024 px
GEOMETRY_TAGS = ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"]
WINDOW_TAGS = ["WindowCenter", "WindowWidth"]  # missing_window: what intensity='dicom' reads
LATE_QUIRKS = ("missing_window",)  # added later: drawn from a stream of their own, so the files and places of
#                                    the earlier quirks stay as they were for a given seed
# Quirks of the Sagittal T1 and Axial T2 series (issue 24), drawn from a third stream of their own
# (axial_partial: from a fourth, [seed, 15], drawn only when it is on).
T1_AXIAL_QUIRKS = ("axial_blocks", "axial_missing_level", "interleaved_order", "reversed_order", "axial_partial")
# Quirks make_study_set accepts that are not in QUIRKS (so not in REALISTIC, whose summary lists every name of
# QUIRKS): on only when asked for by name. axial_partial: the Axial T2 series covers only the lowest 1-3 levels.
# sagittal_top_edge: a study's two sagittal series start TOP_EDGE_PX rows above its top annotated point.
EXTRA_QUIRKS = ("axial_partial", "sagittal_top_edge")
TOP_EDGE_PX = (1.5, 4.0)  # sagittal_top_edge: row of the L1/L2 point (T2/STIR: canal; T1: foramina), before jitter
PARTIAL_SLICES = (3, 9)  # axial_partial: slices kept (levels x slices per level), fewest levels most likely
PARTIAL_WEIGHTS = (0.6, 0.3, 0.1)  # of keeping 1, 2 or 3 levels, among those that fit PARTIAL_SLICES
BLOCK_TILT = (5.0, 20.0)  # axial_blocks: degrees about patient x, each block tilted to its own disc
BAD_KINDS = {"x_far": ("x", 5000.0), "y_negative": ("y", -300.0), "x_nan": ("x", float("nan")),
             "edge": ("x", None)}  # edge: 2 px beyond the last column, must stay usable


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


def _finish(rng, img, scale, keep=None):
    """Rician-like noise, a smooth bias field and the series' own scale -> uint16 12-bit values.

    keep: the slices of a full stack that img holds (axial_missing_level): noise is drawn for the full
    stack, so that the random stream, and every file written after this one, stays as without the quirk."""
    sigma = rng.uniform(0.025, 0.04)
    noise = rng.standard_normal(img.shape if keep is None else (len(keep), *img.shape[1:]), np.float32)
    # |signal + noise| is Rician-like where it matters (dark background) at half the cost.
    noisy = np.abs(img + sigma * (noise if keep is None else noise[keep]))
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


def _grid(rows, cols, sp, q):
    """Rows, columns and (row, column) spacing after the series' size and anisotropy quirks.

    varied_sizes keeps the field of view (so a 1024 px image has fine spacing); anisotropic widens
    the column spacing, the anatomy being sampled on that grid either way."""
    sp_r = sp_c = sp
    if "size" in q:
        fov = sp * max(rows, cols)
        rows, cols = q["size"]
        sp_r = sp_c = fov / max(rows, cols)
    if "aniso" in q:
        sp_c = sp_r * q["aniso"]
    return rows, cols, sp_r, sp_c


def _sagittal(rng, anat, kind, n, mid, gap, q=None, x_off=None):
    """Sagittal series: pixel volume, per-slice IPP (anatomical order), IOP and the pixel grid g.

    q: the series' geometry quirks (size, aniso, tilt in degrees about patient z; top_px: sagittal_top_edge's row
    of the L1/L2 point, the canal's on T2/STIR, the foramina's on T1); x_off: the slice positions' offset, given
    for a repeated stack so that it lies at the first stack's positions."""
    q = q or {}
    rows, cols, sp_r, sp_c = _grid(*_geometry(rng, [256, 320, 384, 448], (220, 300)), q)
    tilt = np.radians(q.get("tilt", 0.0))
    ystep = float(sp_c * np.cos(tilt))  # patient y per column: the row direction leans by `tilt`
    # Canal sits a bit posterior of the image centre, spine vertically centred +/- 10 mm.
    y0 = anat.y_canal - rng.uniform(0.5, 0.62) * cols * ystep
    z0 = rng.uniform(-10, 10) + rows * sp_r / 2
    if "top_px" in q:  # drawn above all the same: the stream stays as without the quirk
        z0 = float(anat.z_disc[0] + (4.0 if kind == "Sagittal T1" else 0.0) + q["top_px"] * sp_r)
    y = (y0 + np.arange(cols, dtype=np.float32) * ystep)[None, :]
    z = (z0 - np.arange(rows, dtype=np.float32) * sp_r)[:, None]
    x_off = rng.uniform(-0.5, 0.5) if x_off is None else x_off
    x = -(np.arange(n) - mid) * gap + x_off  # slice `mid` is the midline
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
            fora_pts.append((k, (yf - y0) / ystep, (z0 - zf) / sp_r))

    iop = SAG_IOP
    if tilt:  # rows lean toward -x; shift each slice so that it still crosses the canal at x
        iop = [-float(np.sin(tilt)), float(np.cos(tilt)), 0.0, 0.0, 0.0, -1.0]
        x = x + (anat.y_canal - y0) / ystep * sp_c * np.sin(tilt)
    ipp = [[float(xi), float(y0), float(z0)] for xi in x]
    g = {"rows": rows, "cols": cols, "sp_r": sp_r, "sp_c": sp_c, "ystep": ystep, "y0": y0, "z0": z0,
         "x_off": x_off}
    return vol.astype(np.float32), ipp, iop, g, fora_pts


def _axial(rng, anat, q=None):
    """Axial T2: 2-4 slices per disc level (ascending z), canal, vertebra and subarticular recesses.

    q: the series' quirks; q["blocks"]: tilt in degrees of each level's block (see _block_planes).
    Returns the volume, per-slice IPP and IOP, the grid g and planes: (y, z, cos, sin) of each slice's
    first row and direction, which _recess_points needs."""
    q = q or {}
    rows, cols, sp_r, sp_c = _grid(*_geometry(rng, [256, 320], (160, 220)), q)
    per, gap = int(rng.integers(2, 5)), rng.uniform(3, 4)
    stack = (np.arange(per) - (per - 1) / 2) * gap  # a short stack centred on each disc
    jitter = rng.uniform(-1, 1, 5 * per)
    z = np.sort(np.concatenate([zi + stack for zi in anat.z_disc]) + jitter).astype(np.float32)
    x0 = -cols * sp_c / 2 + rng.uniform(-8, 8)
    y0 = anat.y_canal - rng.uniform(0.55, 0.65) * rows * sp_r
    xx = (x0 + np.arange(cols, dtype=np.float32) * sp_c)[None, None, :]
    g = {"rows": rows, "cols": cols, "sp_r": sp_r, "sp_c": sp_c, "x0": x0, "y0": y0, "per": per}
    if "blocks" in q:  # one jitter per block: its slices stay evenly spaced along its own normal
        ipp, iop, yy, zz, planes = _block_planes(anat, q["blocks"], stack + jitter[::per, None], g)
    else:
        yy = (y0 + np.arange(rows, dtype=np.float32) * sp_r)[None, :, None]
        zz = z[:, None, None]
        ipp, iop = [[float(x0), float(y0), float(zk)] for zk in z], AX_IOP
        planes = [(y0, zk, 1.0, 0.0) for zk in z]
    return _axial_anatomy(anat, xx, yy, zz), ipp, iop, g, planes


def _block_planes(anat, tilts, offsets, g):
    """Tilted axial blocks, ascending z: block i crosses the canal centre at disc i, rotated tilts[i] degrees
    about patient x; its slices lie offsets[i] mm along the block's normal (0, -sin, cos).

    Returns per-slice IPP and IOP, each pixel row's patient y and z (slices, rows, 1) and the planes."""
    ipp, iop, planes = [], [], []
    for i in range(4, -1, -1):  # L5/S1 first: ascending z, as the untilted stack
        a = np.radians(tilts[i])
        c, s = float(np.cos(a)), float(np.sin(a))
        zi = float(anat.z_disc[i])
        yi = float(anat.yc(zi))
        pivot = (yi - g["y0"]) / g["sp_r"]  # the row that crosses the canal: where it sits untilted
        for off in offsets[4 - i]:
            py = yi - off * s - pivot * g["sp_r"] * c
            pz = zi + off * c - pivot * g["sp_r"] * s
            ipp.append([float(g["x0"]), float(py), float(pz)])
            iop.append([1.0, 0.0, 0.0, 0.0, c, s])
            planes.append((py, pz, c, s))
    r = np.arange(g["rows"], dtype=np.float32) * np.float32(g["sp_r"])
    yy = np.stack([(p[0] + r * p[2]).astype(np.float32) for p in planes])[:, :, None]
    zz = np.stack([(p[1] + r * p[3]).astype(np.float32) for p in planes])[:, :, None]
    return ipp, iop, yy, zz, planes


def _axial_anatomy(anat, xx, yy, zz):
    """The axial anatomy at patient points (xx, yy, zz), arrays that broadcast to (slices, rows, columns)."""
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
        g = anat.narrowing(zz, anat.sub_open[side]) ** RECESS_SHRINK
        recess = ellipse(sign * anat.recess_x, ry, RECESS_HALF_MM[0] * g, RECESS_HALF_MM[1] * g)
        vol = vol + recess * np.maximum(0.9 - vol, 0)  # brightens up to 0.9, never dims the canal
    return vol.astype(np.float32)


def _recess_points(anat, g, planes, sign):
    """(slice, col px, row px) of one side's subarticular recess at each disc: the slice nearest the disc
    (by its plane's z at the canal), the row where the slice meets the recess centre."""
    out = []
    for zi in anat.z_disc:
        zc = np.array([pz + ((anat.yc(zi) - py) / c) * s for py, pz, c, s in planes])  # each plane's z at the canal
        k = int(np.argmin(np.abs(zc - zi)))
        py, pz, c, s = planes[k]
        r = (anat.yc(pz) - anat.hw0 * 0.3 - py) / (g["sp_r"] * c)
        for _ in range(4 if s else 0):  # a tilted row's z moves with it: a few fixed-point steps
            y, z = py + r * g["sp_r"] * c, pz + r * g["sp_r"] * s
            r = r + (anat.yc(z) - anat.hw0 * 0.3 - y) / (g["sp_r"] * c)
        out.append((k, (sign * anat.recess_x - g["x0"]) / g["sp_c"], r))
    return out


def _write_series(folder, vol, ipp, iop, spacing, thickness, instances, meta, rle, edits=None):
    """Write one series, one file per slice named by its instance number.

    spacing: (row, column) PixelSpacing; edits: instance -> {tag: value, or None to leave it out}."""
    folder.mkdir(parents=True, exist_ok=True)
    iops = _per_slice(iop, len(ipp))
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
        ds.ImageOrientationPatient = [float(v) for v in iops[k]]
        ds.ImagePositionPatient = [round(v, 4) for v in ipp[k]]
        ds.SliceLocation = round(float(np.dot(ipp[k], np.cross(iops[k][:3], iops[k][3:]))), 4)
        ds.SliceThickness = round(thickness, 3)
        ds.PixelSpacing = [round(spacing[0], 6), round(spacing[1], 6)]
        ds.Rows, ds.Columns = vol.shape[1:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.WindowCenter, ds.WindowWidth = int((lo + hi) / 2), max(1, int(hi - lo))
        for tag, value in (edits or {}).get(int(inst), {}).items():
            if value is None:
                delattr(ds, tag)
            else:
                setattr(ds, tag, value)
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


def _quirk_flags(rng, quirks, n_studies):
    """Where each quirk that is on goes: a (study, series type) bool array for the geometry quirks, one
    bool per study (its Sagittal T2/STIR series) for the others. Each occurs on at least one Sagittal
    T2/STIR series; missing_geometry on two (one slice far from an annotated one, one next to it)."""
    flags = {}
    for name in QUIRKS:
        if name not in quirks or name == "bad_coordinates":  # bad coordinates are drawn over the rows
            continue
        f = rng.random((n_studies, 3) if name in GEOMETRY_QUIRKS else n_studies) < quirks[name]
        if name == "oblique":
            f[:, 2] = False  # an oblique axial series would need an in-plane rotation: not modelled
        t2 = f[:, 1] if f.ndim == 2 else f  # a view: forcing writes through
        while t2.sum() < min(2 if name == "missing_geometry" else 1, n_studies):
            t2[rng.integers(n_studies)] = True
        flags[name] = f
    return flags


def _force_among(rng, flags, allowed):
    """Make sure a quirk occurs on an allowed entry: set one random allowed entry if none is set."""
    if allowed.any() and not (flags & allowed).any():
        flags.flat[rng.choice(np.flatnonzero(allowed))] = True
    return flags


def _t1_axial_flags(rng, quirks, n_studies, reversed_):
    """Where the Sagittal T1 / Axial T2 quirks go: (study, series type) arrays (order quirks, the T1 and axial
    columns only) or one bool per study (axial ones). reversed_order adds reversed T1/axial series to reversed_
    (in place), at least one of each type; interleaved_order wins over a reversed order on the same series."""
    flags, other = {}, np.zeros((n_studies, 3), bool)
    other[:, [0, 2]] = True
    for name in T1_AXIAL_QUIRKS:
        if name in quirks and name not in EXTRA_QUIRKS:  # axial_partial: its own stream (make_study_set)
            flags[name] = rng.random((n_studies, 3) if name.endswith("order") else n_studies) < quirks[name]
    if "interleaved_order" in flags:
        flags["interleaved_order"] &= other
        _force_among(rng, flags["interleaved_order"], other)
        reversed_ &= ~flags["interleaved_order"]
    if "reversed_order" in flags:
        free = other & ~flags.get("interleaved_order", np.zeros_like(other))
        reversed_ |= flags.pop("reversed_order") & free
        for t in (0, 2):
            _force_among(rng, reversed_[:, t], free[:, t])
        flags["reversed_order"] = reversed_ & other
    if "axial_blocks" in flags:
        _force_one(rng, flags["axial_blocks"])
    if "axial_missing_level" in flags:  # at least one on a study whose axial series is in blocks
        _force_among(rng, flags["axial_missing_level"], flags.get("axial_blocks", np.ones(n_studies, bool)))
    return flags


def _axial_quirks(rng, flags, s):
    """This study's axial_blocks tilts (degrees per level, L1/L2 first) and axial_missing_level level index."""
    q = {}
    if "axial_blocks" in flags and flags["axial_blocks"][s]:
        # Lordosis-like: the upper blocks lean one way, the lower ones the other, L3/L4 either way.
        signs = np.array([-1, -1, rng.choice([-1, 1]), 1, 1]) * rng.choice([-1, 1])
        q["blocks"] = [float(v) for v in signs * rng.uniform(*BLOCK_TILT, 5)]
    if "axial_missing_level" in flags and flags["axial_missing_level"][s]:
        q["missing_level"] = int(rng.integers(5))
    return q


def _partial_levels(rng, per, gone=None):
    """axial_partial: the level indices kept (ascending, L1/L2 = 0): the lowest 1-3 of the levels present (all but
    axial_missing_level's `gone`), so that the series has PARTIAL_SLICES slices (per slices a level)."""
    present = [lv for lv in range(4, -1, -1) if lv != gone]  # lowest first
    n = np.array([k for k in (1, 2, 3) if PARTIAL_SLICES[0] <= k * per <= PARTIAL_SLICES[1]])
    w = np.array(PARTIAL_WEIGHTS)[n - 1]
    return sorted(present[:int(rng.choice(n, p=w / w.sum()))])


def _axial_present(q):
    """Level indices the axial series has slices of, in its anatomical order (ascending z: L5/S1 first)."""
    return [lv for lv in range(4, -1, -1) if lv != q.get("missing_level") and lv in q.get("partial", range(5))]


def _instance_order(n, reverse, interleave):
    """Instance number offset of each anatomical slice: in order, reversed, or odd positions (1st, 3rd, ...)
    first then even ones (interleaved acquisition)."""
    if interleave:
        return np.argsort(np.concatenate([np.arange(0, n, 2), np.arange(1, n, 2)]))
    return np.arange(n)[::-1] if reverse else np.arange(n)


def _series_quirks(rng, flags, s, t):
    """Geometry quirk parameters of one series (see _grid, _sagittal and _flip)."""
    on = {name: name in flags and bool(flags[name][s, t]) for name in GEOMETRY_QUIRKS}
    q = {}
    if on["anisotropic"]:
        q["aniso"] = float(rng.uniform(1.1, 1.3))  # column spacing / row spacing
    if on["varied_sizes"]:
        rows = int(rng.choice(LARGE_SIZES))
        q["size"] = (rows, int(rng.choice(LARGE_SIZES)) if rng.random() < 0.5 else rows)
    if on["flipped_normal"]:
        q["flip"] = True
    if on["oblique"]:
        q["tilt"] = float(rng.uniform(1, 8) * rng.choice([-1, 1]))
    return q


def _per_slice(iop, n):
    """One IOP per slice: iop is the series' one (6 numbers) or already a list per slice (axial_blocks)."""
    return list(iop) if np.ndim(iop) == 2 else [iop] * n


def _flip(vol, ipp, iop, g):
    """Mirror the columns and negate the row direction: same anatomy in patient space, normal reversed."""
    iops = _per_slice(iop, len(ipp))
    ipp = [[float(v) for v in np.add(p, (g["cols"] - 1) * g["sp_c"] * np.asarray(o[:3]))] for p, o in zip(ipp, iops)]
    flipped = [[-v + 0.0 for v in o[:3]] + list(o[3:]) for o in iops]
    return np.ascontiguousarray(vol[:, :, ::-1]), ipp, flipped if np.ndim(iop) == 2 else flipped[0]


def _canal_points(anat, g, k, jit_mm):
    """(slice, col px, row px) of the canal centre at each disc on a sagittal grid, plus jitter in mm."""
    return [(k, (anat.yc(zi) - g["y0"]) / g["ystep"] + jit_mm[0, i] / g["ystep"],
             (g["z0"] - zi) / g["sp_r"] + jit_mm[1, i] / g["sp_r"]) for i, zi in enumerate(anat.z_disc)]


def _plan_file_quirks(rng, flags, s, n, mid, count):
    """Anatomical slice indices (of the annotated stack) that this series' file quirks hit, all distinct:
    neighbours are 1-3 slices from the annotated one `mid`, far slices more than 3 away."""
    near = [mid + d for d in (-3, -2, -1, 1, 2, 3) if 0 <= mid + d < n]
    far = [k for k in range(n) if abs(k - mid) > 3]
    rng.shuffle(near)
    rng.shuffle(far)
    plan = {}
    on = {name: name in flags and bool(flags[name][s]) for name in QUIRKS
          if name not in GEOMETRY_QUIRKS + T1_AXIAL_QUIRKS}
    for name in ("missing_slice", "truncated_file"):
        if on[name]:
            plan[name] = near.pop()
    if on["missing_geometry"]:  # alternately far from and next to the annotated slice
        i = count["missing_geometry"] = count.get("missing_geometry", -1) + 1
        pool = near if i % 2 and near else far
        plan["missing_geometry"] = (pool.pop(), GEOMETRY_TAGS[i % len(GEOMETRY_TAGS)])
    if on["instance_mismatch"]:  # alternately the annotated slice and a neighbour
        i = count["instance_mismatch"] = count.get("instance_mismatch", -1) + 1
        plan["instance_mismatch"] = near.pop() if i % 2 and near else mid
    if on["outlier_pixels"]:
        plan["outlier_pixels"] = [mid, (near + far)[0]]
    if on["missing_window"]:  # a neighbour; a far slice only when the others took every neighbour
        plan["missing_window"] = (near or far).pop()
    return plan


def _drop_level(vol, ipp, iop, g, pts, level):
    """axial_missing_level: the level's slices (its block: per slices, ascending z) gone and its subarticular
    points None; g["keep"] marks the slices left, the other points are re-indexed to them."""
    return _keep_levels(vol, ipp, iop, g, pts, [lv for lv in range(5) if lv != level])


def _keep_levels(vol, ipp, iop, g, pts, levels):
    """Only the slices of `levels` (level indices; each level's block: per slices, ascending z) kept, the other
    levels' subarticular points None (axial_missing_level, axial_partial); g["keep"] marks the slices kept, the
    kept points are re-indexed to them."""
    keep = np.zeros(len(ipp), bool)
    for lv in levels:
        keep[(4 - lv) * g["per"]:(5 - lv) * g["per"]] = True
    g["keep"] = keep
    new_index = np.cumsum(keep) - 1
    for cond in CONDITIONS[3:5]:
        assert all(keep[k] for i, (k, _, _) in enumerate(pts[cond]) if i in levels)  # each point on its own block
        pts[cond] = [(int(new_index[k]), cx, cy) if i in levels else None for i, (k, cx, cy) in enumerate(pts[cond])]
    iops = _per_slice(iop, len(ipp))
    return vol[keep], [p for p, k in zip(ipp, keep) if k], [o for o, k in zip(iops, keep) if k]


def _record_t1_axial(found, where, flags, s, t, q, inst_of):
    """The summary's record of the T1/axial quirks on one series; inst_of: instance number per anatomical slice."""
    inst = [int(v) for v in inst_of]
    for name in ("interleaved_order", "reversed_order"):
        if name in flags and flags[name][s, t]:
            found[name].append({**where, "instance_numbers": inst})
    if "blocks" in q or "missing_level" in q or "partial" in q:  # the axial series: its slices per level, ascending z
        gone = q.get("missing_level")
        present = _axial_present(q)
        per = len(inst) // len(present)
        blocks = {LEVEL_NAMES[LEVELS[lv]]: inst[j * per:(j + 1) * per] for j, lv in enumerate(present)}
        if gone is not None:
            blocks[LEVEL_NAMES[LEVELS[gone]]] = []
        uncovered = [LEVEL_NAMES[lv] for i, lv in enumerate(LEVELS) if i not in present]  # L1/L2 first
        blocks.update({name: [] for name in uncovered if name not in blocks})  # axial_partial's uncovered levels
        if gone is not None:
            found["axial_missing_level"].append({**where, "level": LEVEL_NAMES[LEVELS[gone]],
                                                 "block_instances": blocks})
        if "partial" in q:
            kept = [LEVEL_NAMES[LEVELS[lv]] for lv in sorted(present)]  # L1/L2 side first, as LEVELS
            found["axial_partial"].append({**where, "levels": kept, "instance_numbers": {lv: blocks[lv] for lv in kept},
                                           "uncovered_levels": uncovered})
        if "blocks" in q:
            tilts = {LEVEL_NAMES[lv]: a for lv, a in zip(LEVELS, q["blocks"])}
            found["axial_blocks"].append({**where, "tilt_degrees": tilts, "block_instances": blocks})


def _file_item(where, inst_of, mid, k, **extra):
    """The summary's record of a quirk on one file: anatomical slice k, `offset` slices from the annotated one."""
    inst = int(inst_of[k])
    return {**where, "file": f"train_images/{where['study_id']}/{where['series_id']}/{inst}.dcm",
            "instance_number": inst, "offset": int(k - mid), **extra}


def make_study_set(out_dir, n_studies=40, seed=0, class_mix=(0.6, 0.2, 0.2),
                   missing_label_frac=0.03, rle_fraction=0.5, quirks=None, test_studies=0, test_faults=False,
                   _taken=None, _labels=None, _layout=None) -> dict:
    """Write a competition-layout study set under out_dir and return a summary dict.

    class_mix: probabilities of Normal/Mild, Moderate, Severe for the spinal canal labels.
    quirks: {name in QUIRKS or EXTRA_QUIRKS: fraction of the series, studies or (bad_coordinates) spinal rows
    hit}; None = a clean set. The summary's `quirks` lists, per quirk, the study, series, file, instance
    and level it hit. The same seed gives byte-identical CSVs and DICOM files; without quirks, the
    same files as before quirks existed (quirks draw from their own random stream).
    axial_partial (EXTRA_QUIRKS, not in REALISTIC): on the studies it hits (at least one), the Axial T2 series
    covers only a contiguous run of the lowest 1-3 levels (3-9 slices, mostly 3-5: e.g. L4/L5-L5/S1); the
    uncovered levels' subarticular points get no coordinate row (their labels stay in train.csv). With
    axial_missing_level on the same study, the run is the lowest levels of those left (a gap where the
    missing level was, if it falls in the run); axial_blocks keep their tilts. Summary item: {study_id,
    series_id, series_description, "levels": [kept level names, L1/L2 side first], "instance_numbers": {kept
    level name: [instance numbers, ascending z]}, "uncovered_levels": [level names without slices]}. It applies
    to a test split too (made with the same quirks).
    sagittal_top_edge (EXTRA_QUIRKS): on the studies it hits (at least one), both sagittal series' field of view
    is moved along patient z so that the L1/L2 point (Sagittal T2/STIR: the canal centre; Sagittal T1: the
    foramina) lies TOP_EDGE_PX rows below the top row, before its ~1 mm annotation jitter (the coordinates
    follow the anatomy; a point jittered above row 0 is clipped to it, as every point is); real series are
    sometimes framed so tightly. Only those series' pixels and positions change. Summary item per series:
    {study_id, series_id, series_description, "top_px", "size": [rows, columns], "level_rows": [the five
    points' rows before jitter, L1/L2 first]}.
    test_studies: N > 0 writes a test split of N other studies in the competition's layout (see
    _write_test_split) instead of the two training studies copied as test images; 0 keeps the output as it was.
    test_faults: True (needs test_studies >= 9) makes the test split hostile: one fault of TEST_FAULTS on each
    of its last seven studies (see _apply_test_faults); the summary's test_split["faults"] says where.
    _labels: {(study index, condition, level): severity index} set over the drawn labels (tests: the same
    anatomy and noise with one label changed).
    _layout: a dict to fill with {(study id, series description): {"series_id", "instances": [instance number
    of each anatomical slice (sagittal: patient left first; axial: ascending z)], "levels" (Axial T2): [level
    name of each anatomical slice]}} (the test faults need it); it changes no file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    quirks = {k: float(v) for k, v in (quirks or {}).items() if v}
    if set(quirks) - set(QUIRKS + EXTRA_QUIRKS):
        raise ValueError(f"unknown quirks {sorted(set(quirks) - set(QUIRKS + EXTRA_QUIRKS))}; "
                         f"choose from {QUIRKS + EXTRA_QUIRKS}")
    if test_faults and test_studies < len(TEST_FAULTS) + 2:
        raise ValueError(f"test_faults needs test_studies >= {len(TEST_FAULTS) + 2} (got {test_studies}): "
                         f"{len(TEST_FAULTS)} faulty studies and two left as they are")
    rng = np.random.default_rng(seed)
    qrng = np.random.default_rng([seed, 12])  # quirk draws: the clean set's stream stays as it was
    mix = np.asarray(class_mix, float) / np.sum(class_mix)
    taken: set[int] = set() if _taken is None else _taken  # a test split draws ids unused by its training set
    study_ids = _unique_ints(rng, n_studies, 1_000_000, 10_000_000, taken)
    series_ids = np.array(_unique_ints(rng, 3 * n_studies, 10_000_000, 4_000_000_000, taken))
    series_ids = series_ids.reshape(n_studies, 3)  # T1, T2/STIR, Axial per study

    # Labels as severity indices; the hidden truth still shapes the image when a cell is missing.
    sev = np.empty((n_studies, 5, 5), int)
    sev[:, 0] = rng.choice(3, (n_studies, 5), p=mix)
    sev[:, 1:] = rng.choice(3, (n_studies, 4, 5), p=OTHER_MIX)
    for (st, cond, lv), k in (_labels or {}).items():  # after the draws: the random stream does not move
        sev[st, CONDITIONS.index(cond), LEVELS.index(lv)] = k
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
    early = {k: v for k, v in quirks.items() if k not in LATE_QUIRKS + T1_AXIAL_QUIRKS}
    flags = _quirk_flags(qrng, early, n_studies)
    flags.update(_quirk_flags(np.random.default_rng([seed, 13]),
                              {k: v for k, v in quirks.items() if k in LATE_QUIRKS}, n_studies))
    arng = np.random.default_rng([seed, 14])  # the T1/axial quirks' stream (issue 24)
    flags.update(_t1_axial_flags(arng, quirks, n_studies, reversed_))
    if "axial_partial" in quirks:  # a stream of its own, drawn only when on: other sets stay as they were
        prng = np.random.default_rng([seed, 15])
        flags["axial_partial"] = _force_one(prng, prng.random(n_studies) < quirks["axial_partial"])
    if "sagittal_top_edge" in quirks:  # a stream of its own, drawn only when on
        erng = np.random.default_rng([seed, 16])
        flags["sagittal_top_edge"] = _force_one(erng, erng.random(n_studies) < quirks["sagittal_top_edge"])
        top_px = erng.uniform(*TOP_EDGE_PX, n_studies)
    found = {name: [] for name in quirks}  # the summary's record of where each quirk is
    count, large_done = {}, False
    spinal_rows, protected = [], set()  # (row index, image columns) of spinal rows; rows bad_coordinates spares

    desc_rows, coord_rows, n_files = [], [], 0
    for s, study in enumerate(study_ids):
        anat = _Anatomy(rng, *sev[s, [0, 3, 4, 1, 2]])  # spinal, subarticular L/R, foraminal L/R
        study_uid = generate_uid(entropy_srcs=[uid_seed, str(study)])
        pts = {}  # condition -> list of (anatomical slice index, col px, row px) per level
        qs = [_series_quirks(qrng, flags, s, t) for t in range(3)]
        if "size" in qs[1] and not large_done:  # the first resized T2/STIR series is the largest real size
            qs[1]["size"], large_done = (1024, 1024), True
        if "sagittal_top_edge" in flags and flags["sagittal_top_edge"][s]:  # both sagittal series (and stacks)
            qs[0]["top_px"] = qs[1]["top_px"] = float(top_px[s])

        n2 = int(rng.integers(15, 18))
        mid2 = int(rng.choice([0, 1, n2 - 2, n2 - 1]) if edge[s] else n2 // 2 + rng.integers(-1, 2))
        gap2 = rng.uniform(3.3, 4.4)
        n1 = int(rng.integers(10, 16))
        gap1 = rng.uniform(4.0, 5.5)
        series = {}  # kind -> list of stacks (vol, ipp, iop, grid), thickness
        kind = "Sagittal T2/STIR"
        vol, ipp, iop, g, _ = _sagittal(rng, anat, kind, n2, mid2, gap2, qs[1])
        jit_mm = rng.normal(0, 1.0, (2, 5))  # ~1 mm annotation jitter
        stacks, annotated = [(vol, ipp, iop, g)], 0
        if "repeated_stack" in flags and flags["repeated_stack"][s]:  # same positions, another size
            q2 = {**qs[1], "size": tuple(int(v) for v in qrng.choice([256, 320, 384, 448, 512], 2))}
            stacks.append(_sagittal(qrng, anat, kind, n2, mid2, gap2, q2, x_off=g["x_off"])[:4])
            i = count["repeated_stack"] = count.get("repeated_stack", -1) + 1
            annotated = 1 - i % 2  # the first such series is annotated on its second stack
        pts["spinal_canal_stenosis"] = _canal_points(anat, stacks[annotated][3], mid2, jit_mm)
        series[kind] = (stacks, annotated, gap2 - 0.3)

        kind = "Sagittal T1"
        vol, ipp, iop, g, fora = _sagittal(rng, anat, kind, n1, n1 // 2, gap1, qs[0])
        for side, cond in enumerate(CONDITIONS[1:3]):
            k, cx, cy = fora[side]
            jit = rng.normal(0, 0.7, (2, 5)) / np.array([[g["ystep"]], [g["sp_r"]]])
            pts[cond] = [(k, cx[i] + jit[0, i], cy[i] + jit[1, i]) for i in range(5)]
        pts["spinal_on_t1"] = _canal_points(anat, g, n1 // 2, np.zeros((2, 5)))  # duplicate_coordinates
        series[kind] = ([(vol, ipp, iop, g)], 0, gap1 - 0.5)

        kind = "Axial T2"
        qs[2].update(_axial_quirks(arng, flags, s))
        vol, ipp, iop, g, planes = _axial(rng, anat, qs[2])
        for side, cond in enumerate(CONDITIONS[3:5]):
            pts[cond] = _recess_points(anat, g, planes, 1 if side == 0 else -1)
        if "axial_partial" in flags and flags["axial_partial"][s]:  # the lowest levels (of those left)
            qs[2]["partial"] = _partial_levels(prng, g["per"], qs[2].get("missing_level"))
            vol, ipp, iop = _keep_levels(vol, ipp, iop, g, pts, qs[2]["partial"])
        elif "missing_level" in qs[2]:
            vol, ipp, iop = _drop_level(vol, ipp, iop, g, pts, qs[2]["missing_level"])
        series[kind] = ([(vol, ipp, iop, g)], 0, 3.0)

        for t, kind in enumerate(SERIES_TYPES):  # geometry quirks, recorded where they are
            stacks, annotated, thick = series[kind]
            sid = int(series_ids[s, t])
            if qs[t].get("flip"):
                stacks = [(*_flip(vol, ipp, iop, g), g) for vol, ipp, iop, g in stacks]
                cols = stacks[annotated][3]["cols"]
                for cond in pts:
                    if CONDITION_SERIES.get(cond, "Sagittal T1") == kind:
                        pts[cond] = [p and (p[0], cols - 1 - p[1], p[2]) for p in pts[cond]]  # None: no slice
                series[kind] = (stacks, annotated, thick)
            g, iop = stacks[0][3], stacks[0][2]
            where = {"study_id": study, "series_id": sid, "series_description": kind}
            for name, key in (("anisotropic", "aniso"), ("varied_sizes", "size"), ("flipped_normal", "flip"),
                              ("oblique", "tilt")):
                if key in qs[t]:
                    found[name].append({**where, "pixel_spacing": [g["sp_r"], g["sp_c"]],
                                        "size": [g["rows"], g["cols"]], "orientation": list(iop),
                                        name: list(qs[t][key]) if key == "size" else qs[t][key]})
            if "top_px" in qs[t]:  # the annotated stack's rows of the five levels' points, before jitter
                ga = stacks[annotated][3]
                z_pts = anat.z_disc + (4.0 if kind == "Sagittal T1" else 0.0)
                found["sagittal_top_edge"].append({**where, "top_px": qs[t]["top_px"], "size": [ga["rows"], ga["cols"]],
                                                   "level_rows": [float((ga["z0"] - z) / ga["sp_r"]) for z in z_pts]})

        instances = {}
        for t, kind in enumerate(SERIES_TYPES):
            stacks, annotated, thick = series[kind]
            n = len(stacks[0][0])
            start = int(rng.integers(1, 21))  # real instance numbers rarely start at 1
            interleave = "interleaved_order" in flags and flags["interleaved_order"][s, t]
            order = _instance_order(n, reversed_[s, t], interleave)
            stack_inst = [start + j * n + order for j in range(len(stacks))]  # a second stack follows on
            instances[kind] = stack_inst[annotated]  # instance number of each anatomical index
            scale = rng.uniform(600, 3800) / 0.95  # brightest tissue lands near this max
            sid = int(series_ids[s, t])
            meta = {"study_id": study, "series_id": sid, "description": kind,
                    "uid_seed": uid_seed, "study_uid": study_uid,
                    "series_number": t + 1 + int(rng.integers(0, 10)),
                    "series_uid": generate_uid(entropy_srcs=[uid_seed, str(sid)]),
                    "for_uid": generate_uid(entropy_srcs=[uid_seed, str(study), "for"])}
            folder = out / "train_images" / str(study) / str(sid)
            pixels = [_finish(rng, stacks[0][0], scale, stacks[0][3].get("keep"))]
            pixels += [_finish(qrng, v, qrng.uniform(600, 3800) / 0.95) for v, *_ in stacks[1:]]
            where = {"study_id": study, "series_id": sid}
            _record_t1_axial(found, {**where, "series_description": kind}, flags, s, t, qs[t], instances[kind])
            if _layout is not None:
                _layout[(study, kind)] = {"series_id": sid, "instances": [int(v) for v in instances[kind]]}
                if kind == "Axial T2":
                    per = n // len(_axial_present(qs[t]))
                    _layout[(study, kind)]["levels"] = [LEVEL_NAMES[LEVELS[lv]] for lv in _axial_present(qs[t])
                                                        for _ in range(per)]
            if len(stacks) > 1:
                found["repeated_stack"].append({
                    **where, "stacks": [[int(v) for v in si] for si in stack_inst],
                    "sizes": [[st[3]["rows"], st[3]["cols"]] for st in stacks], "annotated_stack": annotated + 1,
                    "instance_number": int(instances[kind][mid2])})
            plan = (_plan_file_quirks(qrng, flags, s, n, mid2, count) if kind == "Sagittal T2/STIR" else {})
            inst_of = instances[kind]
            item = functools.partial(_file_item, where, inst_of, mid2)
            edits = {}
            if "missing_geometry" in plan:
                k, tag = plan["missing_geometry"]
                edits[int(inst_of[k])] = {tag: None}
                found["missing_geometry"].append(item(k, tag=tag, neighbour=abs(k - mid2) <= 3))
            if "instance_mismatch" in plan:
                k = plan["instance_mismatch"]
                edits[int(inst_of[k])] = {"InstanceNumber": int(inst_of[k]) + 1000}
                found["instance_mismatch"].append(item(k, tag_instance_number=int(inst_of[k]) + 1000))
            if "missing_window" in plan:
                k = plan["missing_window"]
                edits.setdefault(int(inst_of[k]), {}).update(dict.fromkeys(WINDOW_TAGS))
                found["missing_window"].append(item(k, tags=WINDOW_TAGS, neighbour=abs(k - mid2) <= 3))
            for k in plan.get("outlier_pixels", []):
                px = pixels[annotated]
                m = int(qrng.integers(3, 9))
                rr, cc = qrng.integers(0, px.shape[1], m), qrng.integers(0, px.shape[2], m)
                px[k, rr, cc] = 4095
                found["outlier_pixels"].append(item(k, pixels=[[int(r), int(c)] for r, c in zip(rr, cc)]))
            for j, (_, ipp, iop, g) in enumerate(stacks):
                _write_series(folder, pixels[j], ipp, iop, (g["sp_r"], g["sp_c"]), thick, stack_inst[j], meta,
                              bool(rle[s, t]), edits if j == annotated else None)
                n_files += n
            if "truncated_file" in plan:  # cut the pixel data (the last element) in half
                k = plan["truncated_file"]
                f = folder / f"{int(inst_of[k])}.dcm"
                data = f.read_bytes()
                at = data.find(b"\xe0\x7f\x10\x00")  # tag (7FE0,0010) Pixel Data, little endian
                f.write_bytes(data[:at + (len(data) - at) // 2])
                found["truncated_file"].append(item(k, bytes_kept=at + (len(data) - at) // 2, bytes=len(data)))
            if "missing_slice" in plan:
                k = plan["missing_slice"]
                (folder / f"{int(inst_of[k])}.dcm").unlink()
                n_files -= 1
                found["missing_slice"].append(item(k))
            desc_rows.append((study, sid, kind))

        dup_level = None
        if "duplicate_coordinates" in flags and flags["duplicate_coordinates"][s]:
            labelled = np.flatnonzero(~missing[s, 0])
            dup_level = int(qrng.choice(labelled)) if labelled.size else None
        for c, cond in enumerate(CONDITIONS):
            kind = CONDITION_SERIES[cond]
            t = SERIES_TYPES.index(kind)
            stacks, annotated, _ = series[kind]
            rows, cols = stacks[annotated][3]["rows"], stacks[annotated][3]["cols"]
            for i, pt in enumerate(pts[cond]):
                if missing[s, c, i] or pt is None:  # None: axial_missing_level, the label stays
                    continue
                k, cx, cy = pt
                if c == 0 and i == dup_level:  # the same level on Sagittal T1, listed first
                    g1 = series["Sagittal T1"][0][0][3]
                    k1, x1, y1 = pts["spinal_on_t1"][i]
                    inst1 = int(instances["Sagittal T1"][k1])
                    coord_rows.append((study, int(series_ids[s, 0]), inst1, CONDITION_NAMES[cond],
                                       LEVEL_NAMES[LEVELS[i]], round(float(np.clip(x1, 0, g1["cols"] - 1)), 6),
                                       round(float(np.clip(y1, 0, g1["rows"] - 1)), 6)))
                    found["duplicate_coordinates"].append({
                        "study_id": study, "series_id": int(series_ids[s, 0]), "instance_number": inst1,
                        "level": LEVEL_NAMES[LEVELS[i]], "row": len(coord_rows) - 1,
                        "valid_series_id": int(series_ids[s, 1]), "valid_instance_number": int(instances[kind][k])})
                    protected.add(len(coord_rows))
                if c == 0:
                    spinal_rows.append((len(coord_rows), cols))
                coord_rows.append((study, int(series_ids[s, t]), int(instances[kind][k]),
                                   CONDITION_NAMES[cond], LEVEL_NAMES[LEVELS[i]],
                                   round(float(np.clip(cx, 0, cols - 1)), 6),
                                   round(float(np.clip(cy, 0, rows - 1)), 6)))

    if "bad_coordinates" in quirks:  # spinal rows whose point is unusable, plus one just past the edge
        pool = [(j, cols) for j, cols in spinal_rows if j not in protected]
        n_bad = min(len(pool), max(len(BAD_KINDS), round(quirks["bad_coordinates"] * len(pool))))
        for pick, kind in zip(qrng.choice(len(pool), n_bad, replace=False), itertools.cycle(BAD_KINDS)):
            j, cols = pool[pick]
            axis, value = BAD_KINDS[kind]
            row = list(coord_rows[j])
            row[5 if axis == "x" else 6] = cols + 2.0 if value is None else value
            coord_rows[j] = tuple(row)
            found["bad_coordinates"].append({  # NaN listed as None: the summary stays valid JSON
                "study_id": row[0], "series_id": row[1], "instance_number": row[2], "level": row[4], "kind": kind,
                "x": None if np.isnan(row[5]) else row[5], "y": row[6], "row": j})

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

    test_split = None
    if test_studies:
        test_split = _write_test_split(out, test_studies, seed, taken, faults=test_faults, class_mix=class_mix,
                                       missing_label_frac=missing_label_frac, rle_fraction=rle_fraction, quirks=quirks)
        test_ids = test_split["study_ids"]
    else:  # a couple of training studies double as the "test" set so inference code has images to read
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
    marker = f"tools/make_demo_studies.py, {n_studies} studies, seed {seed}, class mix {tuple(class_mix)}"
    if quirks:  # one line: the report quotes it inside a list item
        preset = "realistic preset, " if quirks == REALISTIC["quirks"] else ""
        marker += f", {preset}quirks: " + ", ".join(f"{k} {v:g}" for k, v in quirks.items())
    (out / "GENERATED_BY.txt").write_text(marker + "\n")

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
        "quirks": found,
        **({"test_split": test_split} if test_split else {}),
    }


TEST_SOLUTION = "test_solution"  # the test split's labels and points: a folder no competition file is named like
# test_faults: one per study, on the test split's last seven studies in this order (see _apply_test_faults).
TEST_FAULTS = ("two_axial", "two_t1", "stray_image", "unknown_series", "no_geometry", "blank_images", "empty_study")
UNKNOWN_DESCRIPTION = "Coronal STIR"  # unknown_series: none of SERIES_TYPES (and "STIR" traps a substring match)
UNKNOWN_FILES = 4  # unknown_series: its files


def _write_test_split(out, n_test, seed, taken, faults=False, **preset):
    """A test split in the competition's layout: test_images/{study}/{series}/{instance}.dcm,
    test_series_descriptions.csv (sample_submission.csv: the caller), from n_test more studies generated with
    the same preset (seed + 1, ids unused by the training set). Their labels and points are kept aside in
    test_solution/ (train.csv, train_label_coordinates.csv, solution.csv in the official metric's format: one-hot
    columns and sample_weight 1/2/4; an unlabelled row is all zero, i.e. not scored), which the notebook never
    reads. With quirks on and at least 3 test studies, the last one has no Sagittal T2/STIR series (a submission
    must still cover it).
    faults: after the split is written as without them, _apply_test_faults edits test_images/ and
    test_series_descriptions.csv of the last len(TEST_FAULTS) studies (test_solution/ stays the ground truth of
    the unchanged anatomy; with quirks on, the study without a Sagittal T2/STIR series is the one emptied); the
    returned dict then has "faults"."""
    solution = out / TEST_SOLUTION
    shutil.rmtree(solution, ignore_errors=True)
    shutil.rmtree(out / "test_images", ignore_errors=True)
    layout = {} if faults else None
    made = make_study_set(solution, n_test, seed + 1, _taken=taken, _layout=layout, **preset)
    (solution / "train_images").rename(out / "test_images")
    for name in ("test_images", "test_series_descriptions.csv", "sample_submission.csv"):  # the nested split's
        target = solution / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    desc = pd.read_csv(solution / "train_series_descriptions.csv")
    dropped = []
    if preset.get("quirks") and n_test >= 3:
        gone = desc[(desc.study_id == desc.study_id.iloc[-1]) & (desc.series_description == "Sagittal T2/STIR")]
        for study, series in zip(gone.study_id, gone.series_id):
            shutil.rmtree(out / "test_images" / str(study) / str(series))
            dropped.append({"study_id": int(study), "series_id": int(series)})
        desc = desc.drop(gone.index)
    if faults:
        desc, faulty = _apply_test_faults(out, desc, layout, seed + 1, taken)
    desc.to_csv(out / "test_series_descriptions.csv", index=False)
    (solution / "train_series_descriptions.csv").unlink()
    labels = pd.read_csv(solution / "train.csv")
    long = labels.melt(id_vars="study_id", var_name="column", value_name="severity")
    onehot = np.stack([(long.severity == name).to_numpy(float) for name in SEVERITIES], 1)
    pd.DataFrame({"row_id": long.study_id.astype(str) + "_" + long.column,
                  "normal_mild": onehot[:, 0], "moderate": onehot[:, 1], "severe": onehot[:, 2],
                  "sample_weight": onehot @ np.array([1.0, 2.0, 4.0])}).to_csv(solution / "solution.csv", index=False)
    return {"study_ids": [int(v) for v in labels.study_id], "seed": seed + 1, "folder": TEST_SOLUTION,
            "no_sagittal_t2": dropped, "quirks": made["quirks"], "spinal_canal_counts": made["spinal_canal_counts"],
            **({"faults": faulty} if faults else {})}


def _apply_test_faults(out, desc, layout, seed, taken):
    """test_faults: one fault of TEST_FAULTS on each of the test split's last seven studies (in that order), by
    editing test_images/ and the rows of desc (test_series_descriptions.csv) only; the earlier studies' files
    stay byte-identical. seed: the split's own; new series ids are drawn from [seed, 16], unused set-wide.

    two_axial: the Axial T2 series split by level: the upper levels (the larger part: 3 of 5, 3 of 4, 2 of 3)
      move to a new series (new folder and id; the files as they were but SeriesInstanceUID and SeriesNumber),
      the lower levels stay; both listed as "Axial T2", the new one right after it. A "most files" rule picks
      the series without the lowest levels. An axial_partial series of 1-2 levels is split by slice instead (the
      lowest (n - 1) // 2 slices stay), so there the larger part may hold a slice of the lowest level.
    two_t1: the Sagittal T1 split by slice position: the smaller side of the midline (the right, or either when
      both are as large) moves to a new series; the original keeps the midline and the other side, more files,
      so a "most files" rule loses a side. Both listed as "Sagittal T1".
    stray_image: an axial image (IOP 1,0,0,0,1,0; the pixels, spacing and position of the Axial T2 series'
      middle slice, un-flipped; the series' transfer syntax) in the Sagittal T2/STIR folder, with its series'
      UIDs and description and the next instance number above the highest there.
    unknown_series: a new series described as UNKNOWN_DESCRIPTION, UNKNOWN_FILES coronal images (pixels of
      evenly spaced Sagittal T2/STIR files, IOP 1,0,0,0,0,-1, 8 mm apart in y), listed after the study's rows.
    no_geometry: ImagePositionPatient, ImageOrientationPatient and PixelSpacing gone from every Sagittal T1 file.
    blank_images: every Sagittal T2/STIR file's pixels set to one value (the median of its middle file).
    empty_study: test_images/{study}/ is left empty and its rows leave the CSV (sample_submission.csv keeps its
      25 rows).

    Returns the new desc and {fault: {"study_id", ...}}: series_ids ([original, new] for the splits), files
    (test_images/... paths), "levels" / "instance_numbers" per series (lists in series_ids' order), "side"."""
    frng = np.random.default_rng([seed, 16])
    uid_seed = f"rsna-demo-{seed}"
    studies = [int(v) for v in pd.read_csv(out / TEST_SOLUTION / "train.csv").study_id]
    rows = [tuple(r) for r in desc.itertuples(index=False)]
    images = out / "test_images"
    plugin = "pylibjpeg" if "pylibjpeg" in RLELosslessEncoder.available_plugins else ""

    def rel(path):
        return str(path.relative_to(out))

    def sid_of(study, kind):
        return layout[(study, kind)]["series_id"]

    def new_series(study):
        """A new series id, its UID and a SeriesNumber above the study's others."""
        sid = _unique_ints(frng, 1, 10_000_000, 4_000_000_000, taken)[0]
        numbers = [pydicom.dcmread(next(f.glob("*.dcm")), stop_before_pixels=True).SeriesNumber
                   for f in sorted((images / str(study)).iterdir())]
        return sid, generate_uid(entropy_srcs=[uid_seed, str(sid)]), int(max(numbers)) + 1

    def add_row(study, sid, kind, after):
        rows.insert(rows.index((study, after, kind)) + 1, (study, sid, kind))

    def move(study, src, dst, uid, number, inst):
        """Files `inst` of series src moved into series dst: headers as they were but the series UID and number."""
        (images / str(study) / str(dst)).mkdir()
        for i in inst:
            f = images / str(study) / str(src) / f"{i}.dcm"
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID, ds.SeriesNumber = uid, number
            ds.save_as(images / str(study) / str(dst) / f.name, enforce_file_format=True)
            f.unlink()

    def set_pixels(ds, arr):
        """arr as the file's pixel data, in its own transfer syntax."""
        ds.Rows, ds.Columns = arr.shape
        if ds.file_meta.TransferSyntaxUID == RLELossless:
            ds.compress(RLELossless, arr, encoding_plugin=plugin, generate_instance_uid=False)
        else:
            ds.add_new(0x7FE00010, "OW", arr.astype(np.uint16).tobytes())  # Pixel Data, native 16 bit

    def complete(folder):
        """The folder's files untouched by the file quirks (geometry, window, pixels, instance number as the
        name), read whole, in instance order: [(file, dataset)]."""
        out = []
        for f in sorted(folder.glob("*.dcm"), key=lambda f: int(f.stem)):
            with warnings.catch_warnings():  # truncated_file
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(f)
            if (all(t in ds for t in GEOMETRY_TAGS + WINDOW_TAGS + ["PixelData"])
                    and ds.InstanceNumber == int(f.stem)):
                out.append((f, ds))
        return out

    made = {}
    for name, study in zip(TEST_FAULTS, studies[-len(TEST_FAULTS):]):
        item = {"study_id": study}
        if name == "two_axial":
            ax = layout[(study, "Axial T2")]
            inst, levels = ax["instances"], ax["levels"]  # ascending z: the lowest level first
            names = list(dict.fromkeys(levels))
            n_low = (len(names) - 1) // 2  # whole levels, fewer files than the upper ones
            k = sum(lv in names[:n_low] for lv in levels) if n_low else (len(inst) - 1) // 2
            sid, uid, number = new_series(study)
            move(study, ax["series_id"], sid, uid, number, inst[k:])
            add_row(study, sid, "Axial T2", ax["series_id"])
            parts = [(inst[:k], levels[:k]), (inst[k:], levels[k:])]
            item.update({"series_ids": [ax["series_id"], sid], "new_series_id": sid,
                         "levels": [list(dict.fromkeys(reversed(lv))) for _, lv in parts],
                         "instance_numbers": [list(i) for i, _ in parts]})
        elif name == "two_t1":
            t1 = layout[(study, "Sagittal T1")]
            inst = t1["instances"]  # patient left (+x) first; the midline is n // 2, as _sagittal has it
            mid = len(inst) // 2
            left, right = inst[:mid], inst[mid + 1:]
            side = ("right" if len(right) < len(left) else "left" if len(left) < len(right)
                    else str(frng.choice(["left", "right"])))
            moved = right if side == "right" else left
            sid, uid, number = new_series(study)
            move(study, t1["series_id"], sid, uid, number, moved)
            add_row(study, sid, "Sagittal T1", t1["series_id"])
            kept = [i for i in inst if i not in moved]
            item.update({"series_ids": [t1["series_id"], sid], "new_series_id": sid, "side": side,
                         "midline_instance": inst[mid], "instance_numbers": [kept, list(moved)]})
        elif name == "stray_image":
            t2 = sid_of(study, "Sagittal T2/STIR")
            folder = images / str(study) / str(t2)
            ax = layout[(study, "Axial T2")]
            src = images / str(study) / str(ax["series_id"]) / f"{ax['instances'][len(ax['instances']) // 2]}.dcm"
            a = pydicom.dcmread(src)
            arr, iop = a.pixel_array, np.array(a.ImageOrientationPatient, float)
            ipp = np.array(a.ImagePositionPatient, float)
            if iop[0] < 0:  # flipped_normal: mirror back, the first column moves to the other end
                arr = arr[:, ::-1]
                ipp = ipp + (a.Columns - 1) * float(a.PixelSpacing[1]) * iop[:3]
            _, ds = complete(folder)[0]
            inst = max(int(f.stem) for f in folder.glob("*.dcm")) + 1
            sop = generate_uid(entropy_srcs=[uid_seed, str(t2), str(inst), "stray"])
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.InstanceNumber = inst
            ds.ImageOrientationPatient = [float(v) for v in AX_IOP]
            ds.ImagePositionPatient = [round(float(v), 4) for v in ipp]
            ds.SliceLocation = round(float(ipp[2]), 4)
            for tag in ("PixelSpacing", "SliceThickness", "WindowCenter", "WindowWidth"):
                setattr(ds, tag, getattr(a, tag))
            set_pixels(ds, np.ascontiguousarray(arr))
            ds.save_as(folder / f"{inst}.dcm", enforce_file_format=True)
            item.update({"series_id": t2, "file": rel(folder / f"{inst}.dcm"), "instance_number": inst,
                         "source_file": rel(src)})
        elif name == "unknown_series":
            t2 = sid_of(study, "Sagittal T2/STIR")
            srcs = complete(images / str(study) / str(t2))
            srcs = [srcs[j] for j in np.linspace(0, len(srcs) - 1, UNKNOWN_FILES).round().astype(int)]
            sid, uid, number = new_series(study)
            folder = images / str(study) / str(sid)
            folder.mkdir()
            for i, (_, ds) in enumerate(srcs, 1):
                arr, (sr, sc) = ds.pixel_array, (float(v) for v in ds.PixelSpacing)
                o = np.array(ds.ImageOrientationPatient, float)
                centre = (np.array(ds.ImagePositionPatient, float) + (ds.Columns - 1) / 2 * sc * o[:3]
                          + (ds.Rows - 1) / 2 * sr * o[3:])  # the sagittal image's centre, patient mm
                y = float(centre[1]) + 8.0 * (i - (UNKNOWN_FILES + 1) / 2)  # 8 mm apart around it, front to back
                ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = uid, number, UNKNOWN_DESCRIPTION
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
                    entropy_srcs=[uid_seed, str(sid), str(i)])
                ds.InstanceNumber = i
                ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # rows to patient left, columns down
                ds.ImagePositionPatient = [round(-(ds.Columns - 1) * sc / 2, 4), round(y, 4),
                                           round(float(centre[2]) + (ds.Rows - 1) / 2 * sr, 4)]
                ds.SliceLocation = round(y, 4)
                ds.SliceThickness = 6.0
                set_pixels(ds, arr)
                ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)
            last = max(j for j, r in enumerate(rows) if r[0] == study)
            rows.insert(last + 1, (study, sid, UNKNOWN_DESCRIPTION))  # after the study's other series
            item.update({"series_id": sid, "series_description": UNKNOWN_DESCRIPTION,
                         "files": [rel(folder / f"{i}.dcm") for i in range(1, UNKNOWN_FILES + 1)],
                         "source_files": [rel(f) for f, _ in srcs]})
        elif name in ("no_geometry", "blank_images"):
            kind = "Sagittal T1" if name == "no_geometry" else "Sagittal T2/STIR"
            sid = sid_of(study, kind)
            files = sorted((images / str(study) / str(sid)).glob("*.dcm"), key=lambda f: int(f.stem))
            item.update({"series_id": sid, "series_description": kind, "files": [rel(f) for f in files]})
            if name == "blank_images":  # one value for the series (a truncated file comes back whole, blank)
                done = complete(files[0].parent)
                item["value"] = int(np.median(done[len(done) // 2][1].pixel_array))
            for f in files:
                with warnings.catch_warnings():  # truncated_file
                    warnings.simplefilter("ignore")
                    ds = pydicom.dcmread(f)
                if name == "no_geometry":
                    for tag in GEOMETRY_TAGS:
                        if tag in ds:
                            delattr(ds, tag)
                else:
                    set_pixels(ds, np.full((ds.Rows, ds.Columns), item["value"], np.uint16))
                ds.save_as(f, enforce_file_format=True)
            if name == "no_geometry":
                item["tags"] = list(GEOMETRY_TAGS)
        elif name == "empty_study":
            gone = sorted(int(f.name) for f in (images / str(study)).iterdir())
            for sid in gone:
                shutil.rmtree(images / str(study) / str(sid))
            rows = [r for r in rows if r[0] != study]
            item["series_ids"] = gone
        made[name] = item
    return pd.DataFrame(rows, columns=desc.columns), made


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--studies", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", help="Normal/Mild,Moderate,Severe (spinal); default 0.6,0.2,0.2, realistic 0.88,0.06,0.05")
    p.add_argument("--missing", type=float, help="fraction of empty label cells (default 0.03, realistic 0.015)")
    p.add_argument("--rle", type=float, default=0.5, help="fraction of RLE Lossless series")
    p.add_argument("--realistic", action="store_true", help="the REALISTIC preset: real class mix, every quirk on")
    p.add_argument("--test-studies", type=int, default=0,
                   help="studies in a test split (test_images/, labels kept aside in test_solution/); 0 = none")
    p.add_argument("--test-faults", action="store_true",
                   help="a hostile test split: one fault of TEST_FAULTS on each of its last 7 studies (needs "
                        "--test-studies 9 or more)")
    a = p.parse_args(argv)
    kwargs = dict(REALISTIC) if a.realistic else {}
    if a.mix is not None:
        kwargs["class_mix"] = tuple(float(v) for v in a.mix.split(","))
        if len(kwargs["class_mix"]) != 3:
            p.error("--mix needs three comma-separated probabilities")
    if a.missing is not None:
        kwargs["missing_label_frac"] = a.missing
    t0 = time.perf_counter()
    summary = make_study_set(a.out_dir, a.studies, a.seed, rle_fraction=a.rle, test_studies=a.test_studies,
                             test_faults=a.test_faults, **kwargs)
    print(json.dumps(summary, indent=1))
    print(f"written in {time.perf_counter() - t0:.1f} s (pydicom {pydicom.__version__})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
