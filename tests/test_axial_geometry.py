"""Issue 24 item 2, geometry: pixel <-> patient point on one slice, and the axial slice of a level from a
sagittal point, checked against hand-computed geometry and against the generator's axial annotations."""

import math

import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import Dataset


def header(iop, ipp, spacing, rows=256, cols=256):
    """A DICOM header holding only a slice's geometry. spacing: PixelSpacing (between rows, between columns)."""
    ds = Dataset()
    ds.ImageOrientationPatient, ds.ImagePositionPatient = list(iop), list(ipp)
    ds.PixelSpacing, ds.Rows, ds.Columns = list(spacing), rows, cols
    return ds


def axial(centre, tilt_deg=0.0, sp=0.75, rows=256, cols=256):
    """An axial slice (rows to patient left, columns posterior) tilted by tilt_deg about patient x (posterior
    toward head), its image centre at the patient point `centre`."""
    t = math.radians(tilt_deg)
    row, col = np.array([1.0, 0, 0]), np.array([0, math.cos(t), math.sin(t)])
    ipp = np.asarray(centre, float) - (cols - 1) / 2 * sp * row - (rows - 1) / 2 * sp * col
    return header([*row, *col], ipp, [sp, sp], rows, cols)


def test_patient_point_and_pixel_point_by_hand(nb):
    """DICOM's convention: x (column index) runs along IOP[:3] at PixelSpacing[1], y (row index) along IOP[3:] at
    PixelSpacing[0]; the distance is signed along IOP[:3] x IOP[3:]."""
    to_patient, to_pixel = nb["patient_point"], nb["pixel_point"]
    sagittal = header([0, 1, 0, 0, 0, -1], [10, -100, 80], [0.8, 0.5])  # anisotropic; normal (-1, 0, 0)
    np.testing.assert_allclose(to_patient(sagittal, 20, 30), [10, -100 + 20 * 0.5, 80 - 30 * 0.8])
    np.testing.assert_allclose(to_pixel(sagittal, [13, -90, 56]), [20, 30, -3])
    ax = header([1, 0, 0, 0, 1, 0], [-100, -120, 30], [0.7, 0.9])  # anisotropic; normal (0, 0, 1)
    np.testing.assert_allclose(to_patient(ax, 10.5, 4), [-100 + 10.5 * 0.9, -120 + 4 * 0.7, 30])
    np.testing.assert_allclose(to_pixel(ax, [-100 + 10.5 * 0.9, -120 + 4 * 0.7, 32]), [10.5, 4, 2])
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    oblique = header([1, 0, 0, 0, c, s], [0, 0, 0], [2.0, 1.0])  # columns tilted 30 deg; normal (0, -s, c)
    np.testing.assert_allclose(to_patient(oblique, 3, 4), [3, 8 * c, 8 * s])
    np.testing.assert_allclose(to_pixel(oblique, [3, 8 * c - 5 * s, 8 * s + 5 * c]), [3, 4, 5], atol=1e-12)
    # a double-oblique slice (rotated about all three axes): any pixel and offset round trip
    rot = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    double = header([*rot[:, 0], *rot[:, 1]], [5, -7, 11], [0.6, 1.1])
    normal = np.cross(rot[:, 0], rot[:, 1])
    for x, y, d in np.random.default_rng(1).uniform(-50, 300, (20, 3)):
        np.testing.assert_allclose(to_pixel(double, to_patient(double, x, y) + d * normal), [x, y, d], atol=1e-9)


@pytest.mark.parametrize("order", ["reversed", "interleaved"])
def test_axial_slice_for_any_instance_order(nb, order):
    """One continuous stack at z = 0, 4, ... 36: the slice nearest the point whatever the instance numbers and
    the dict's order; an exact tie goes to the lower instance."""
    z = np.arange(10) * 4.0
    instances = np.arange(10, 0, -1) if order == "reversed" else np.array([1, 6, 2, 7, 3, 8, 4, 9, 5, 10])
    shuffled = np.random.default_rng(2).permutation(10)
    headers = {int(instances[k]): axial([0, 0, z[k]]) for k in shuffled}
    instance, x, y, d = nb["axial_slice_for"]([5, 3, 13], headers)
    assert instance == instances[3]  # z = 12
    assert (x, y, d) == pytest.approx((127.5 + 5 / 0.75, 127.5 + 3 / 0.75, 1.0))
    tie = nb["axial_slice_for"]([0, 0, 14], headers)  # 2 mm from z = 12 and from z = 16
    assert tie[0] == min(instances[3], instances[4]) and abs(tie[3]) == pytest.approx(2.0)


def tilted_blocks():
    """Three blocks of 3 slices 4 mm apart along their own normal, tilted +15 / 0 / -15 degrees about patient x,
    centred at z = 40 / 0 / -40; instances numbered out of anatomical order. {instance: header}, and
    {(tilt, k): instance} with k = -1, 0, 1 the slice's step along its block's normal."""
    headers, where, instance = {}, {}, 0
    for tilt, zb in ((0, 0.0), (-15, -40.0), (15, 40.0)):
        normal = np.array([0, -math.sin(math.radians(tilt)), math.cos(math.radians(tilt))])
        for k in (1, -1, 0):
            instance += 1
            headers[instance] = axial(np.array([0, 0, zb]) + 4 * k * normal, tilt)
            where[tilt, k] = instance
    return headers, where


@pytest.mark.parametrize("tilt, zb, k", [(15, 40.0, -1), (0, 0.0, 0), (-15, -40.0, 1)])
def test_axial_slice_for_tilted_blocks(nb, tilt, zb, k):
    """The point (2, 12, zb + 1) picks its block's nearest slice by that slice's own normal n = (0, -sin t, cos t):
    distance (p - centre) . n - 4 k = -12 sin t + cos t - 4 k (t = +15: k = -1, 1.860 mm; t = -15: k = 1, 0.072 mm).
    A series-wide normal (0, 0, 1) would pick k = 0 in all three blocks (distance 1 - 3.86 k)."""
    headers, where = tilted_blocks()
    t = math.radians(tilt)
    instance, x, y, d = nb["axial_slice_for"]([2, 12, zb + 1], headers)
    assert instance == where[tilt, k]
    assert d == pytest.approx(-12 * math.sin(t) + math.cos(t) - 4 * k)
    assert x == pytest.approx(127.5 + 2 / 0.75)  # rows run along patient x, untilted
    assert y == pytest.approx(127.5 + (12 * math.cos(t) + math.sin(t)) / 0.75)  # (p - centre) . columns' direction


def test_axial_slice_for_bounds(nb):
    """A point between blocks is a missing level (None) within max_mm; a slice whose image does not hold the
    point's projection (beyond edge_mm) is passed over for a farther one that does."""
    pick = nb["axial_slice_for"]
    headers, where = tilted_blocks()
    assert pick([2, 12, 20], headers) is None  # 16 mm above block 0's top slice, 18.4 mm below block +15's
    found = pick([2, 12, 20], headers, max_mm=20)
    assert found[0] == where[0, 1] and found[3] == pytest.approx(16.0)
    assert pick([300, 0, 0], headers) is None  # beside every image
    # slice A (z = 0) covers x 0 .. 96 mm, slice B (z = 3) covers x -96 .. 0 mm
    halves = {1: axial([48, 0, 0], cols=128), 2: axial([-48, 0, 3], cols=128)}
    instance, _, _, d = pick([-50, 0, 0.5], halves)  # nearer A's plane, but outside its image
    assert instance == 2 and d == pytest.approx(-2.5)
    instance, _, _, d = pick([-4, 0, 0.5], halves)  # 4 mm beyond A's edge: within edge_mm = 5
    assert instance == 1 and d == pytest.approx(0.5)
    assert pick([-6, 0, 0.5], halves)[0] == 2
    assert pick([-4, 0, 0.5], halves, edge_mm=0)[0] == 2


JITTER_MM = 3.0  # the generator's annotation jitter of the canal point's height: 1 mm sd, so under 3 mm


def test_generated_canal_points_find_the_subarticular_slices(nb, tmp_path):
    """On a generated set (one axial stack, IOP (1, 0, 0, 0, 1, 0)): the spinal canal point of each level on its
    Sagittal T2/STIR slice, in patient space, picks the axial slice whose z (ImagePositionPatient) is nearest its
    own, at that distance. The coordinates CSV lists the slice nearest the disc, and the canal point is the disc
    point plus up to JITTER_MM of height: the same slice, or its neighbour when the point is at most JITTER_MM
    past the midpoint between them. The projection lies midway between the left and right recesses (the canal is
    at patient x within 0.5 mm of 0, the recesses at +/- the same distance) and 0.3 canal half-widths (~1.8 mm)
    anterior of them, give or take the jitter."""
    from make_demo_studies import make_study_set

    make_study_set(tmp_path, n_studies=4, seed=0)
    coords = pd.read_csv(tmp_path / "train_label_coordinates.csv")
    series = pd.read_csv(tmp_path / "train_series_descriptions.csv").set_index(["study_id", "series_description"])
    checked = 0
    for (study, level), rows in coords.groupby(["study_id", "level"]):
        rows = rows.set_index("condition")
        if "Spinal Canal Stenosis" not in rows.index:  # a label left out by the generator
            continue
        folder = tmp_path / "train_images" / str(study)
        sagittal = nb["read_series_headers"](folder / str(series.loc[(study, "Sagittal T2/STIR"), "series_id"]))[0]
        headers = nb["read_series_headers"](folder / str(series.loc[(study, "Axial T2"), "series_id"]))[0]
        canal = rows.loc["Spinal Canal Stenosis"]
        ds = sagittal[canal["instance_number"]]
        point = nb["patient_point"](ds, canal["x"], canal["y"])
        sp_r, sp_c = (float(v) for v in ds.PixelSpacing)  # sagittal: rows run posterior, columns inferior
        np.testing.assert_allclose(point, np.add(ds.ImagePositionPatient, [0, canal["x"] * sp_c, -canal["y"] * sp_r]))
        instance, x, y, d = nb["axial_slice_for"](point, headers)
        heights = {i: float(h.ImagePositionPatient[2]) for i, h in headers.items()}
        assert d == pytest.approx(point[2] - heights[instance])
        assert abs(d) == pytest.approx(min(abs(point[2] - z) for z in heights.values()))
        order = sorted(heights, key=heights.get)
        ax_sp = [float(v) for v in headers[instance].PixelSpacing]
        for side in ("Left", "Right"):
            if f"{side} Subarticular Stenosis" not in rows.index:
                continue
            listed = int(rows.loc[f"{side} Subarticular Stenosis", "instance_number"])
            checked += 1
            past_midpoint = (abs(point[2] - heights[listed]) - abs(d)) / 2
            assert instance == listed or (abs(order.index(instance) - order.index(listed)) == 1
                                          and past_midpoint <= JITTER_MM), (study, level, side)
            recess_y = rows.loc[f"{side} Subarticular Stenosis", "y"]
            assert abs((y - recess_y) * ax_sp[0] - 1.8) <= 1.0 + JITTER_MM  # 0.2: canal width, 0.8: lordosis
        if {"Left Subarticular Stenosis", "Right Subarticular Stenosis"} <= set(rows.index):
            left, right = (rows.loc[f"{side} Subarticular Stenosis", "x"] for side in ("Left", "Right"))
            assert right < x < left  # patient left is +x, and the axial rows run to patient left
            assert abs(x - (left + right) / 2) * ax_sp[1] <= 0.55
    assert checked >= 30  # 4 studies x 5 levels x 2 sides, less the labels the generator left out


def fake_localiser(n, size, peaks):
    """A stand-in localiser whose logits are +10 at each map's (slot, row, column) in `peaks` {map: [(slot, v, u)]}
    and -10 elsewhere (for any input: the decoding and the side rule are what is tested)."""
    import torch

    class Fixed(torch.nn.Module):
        def forward(self, x):
            logits = torch.full((n, len(peaks), size, size), -10.0)
            for m, points in peaks.items():
                for j, v, u, value in points:
                    logits[j, m, v, u] = value
            return logits

    return Fixed()


def sagittal_volume(xs, size=64):
    """A localiser volume of len(xs) slices whose image centres lie at patient x = xs (slot order: increasing x,
    patient right to left), 1 mm grid pixels."""
    n = len(xs)
    return {"image": np.zeros((n, size, size), np.uint8), "valid": np.ones(n, bool), "instance": np.arange(n),
            "to_grid": np.tile([1.0, 0.0, 1.0, 0.0], (n, 1)), "image_shape": np.tile([size, size], (n, 1)),
            "spacing": np.ones((n, 2)), "centre_mm": np.array([[x, 0.0, 0.0] for x in xs])}


def test_a_left_foramen_is_never_read_from_the_right_side(nb):
    """Heatmaps that put each left level's strongest peak on a slice right of the canal (patient x -15 mm, LPS)
    and a weaker one on the left (+15 mm), and the right levels the other way round: unconstrained, the decoder
    takes the wrong sides; with side_slices (midline x = 0, the canal's) every left point is on the left slice and
    every right point on the right one; a side with no slice (all slices right of the midline) has no point."""
    import torch

    xs = [-20.0, -15.0, -10.0, -5.0, 0.0, 5.0, 10.0, 15.0, 20.0]
    maps = nb["map_names"](["left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"])
    rows = [2, 17, 32, 47, 62]  # 15 mm apart: the levels' order rule (LEVEL_GAP_MM) holds
    wrong, right_side = 1, 7  # slots at x = -15 (patient right) and x = +15 (patient left)
    peaks = {m: [((wrong if cond.startswith("left") else right_side), rows[level], 30, 10.0),
                 ((right_side if cond.startswith("left") else wrong), rows[level], 30, 8.0)]
             for m, (cond, level) in enumerate(maps)}
    volume, config = sagittal_volume(xs), {**nb["CONFIG"], "precision": "fp32"}
    model = fake_localiser(len(xs), 64, peaks)
    cpu = torch.device("cpu")
    free = nb["localise"]([model], volume, cpu, config)
    assert (free[:5, 0] == wrong).all() and (free[5:, 0] == right_side).all()  # the mirror-image mistake
    sided = nb["localise"]([model], volume, cpu, config, allowed=nb["side_slices"](volume, maps, 0.0))
    assert (sided[:5, 0] == right_side).all() and (sided[5:, 0] == wrong).all()
    x_of = np.array(xs)[sided[:, 0].astype(int)]
    assert (x_of[:5] > 0).all() and (x_of[5:] < 0).all()
    np.testing.assert_allclose(sided[:, 2], rows * 2, atol=0.5)
    right_only = sagittal_volume([x - 30 for x in xs])  # every slice right of the midline
    none_left = nb["localise"]([model], right_only, cpu, config, allowed=nb["side_slices"](right_only, maps, 0.0))
    assert np.isnan(none_left[:5]).all() and not np.isnan(none_left[5:]).any()
