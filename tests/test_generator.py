"""Tests of tools/make_demo_studies.py: the generated set must look like the competition data."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import make_demo_studies as gen  # tools/ is put on sys.path by conftest.py
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

CONDITION_SPELLINGS = {
    "Spinal Canal Stenosis",
    "Left Neural Foraminal Narrowing",
    "Right Neural Foraminal Narrowing",
    "Left Subarticular Stenosis",
    "Right Subarticular Stenosis",
}
LEVEL_SPELLINGS = {"L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"}
SEVERITIES = {"Normal/Mild", "Moderate", "Severe"}
CSVS = ["train.csv", "train_label_coordinates.csv", "train_series_descriptions.csv",
        "test_series_descriptions.csv", "sample_submission.csv"]


@pytest.fixture(scope="module")
def tables(study_set):
    return {name: pd.read_csv(study_set / name) for name in CSVS}


@pytest.fixture(scope="module")
def headers(study_set):
    """Every train DICOM read once: (study, series, file instance) -> dataset with pixels."""
    out = {}
    for f in sorted(study_set.glob("train_images/*/*/*.dcm")):
        ds = pydicom.dcmread(f)
        ds.arr = ds.pixel_array  # decode now: every file must decode
        out[(int(f.parts[-3]), int(f.parts[-2]), int(f.stem))] = ds
    return out


@pytest.fixture(scope="module")
def series(headers):
    """(study, series) -> list of datasets in anatomical order (IPP projected on the normal)."""
    groups = {}
    for (st, se, _), ds in headers.items():
        groups.setdefault((st, se), []).append(ds)

    def along_normal(ds):
        iop = np.array(ds.ImageOrientationPatient, float)
        return float(np.dot(ds.ImagePositionPatient, np.cross(iop[:3], iop[3:])))

    return {k: sorted(v, key=along_normal) for k, v in groups.items()}


def test_constants():
    assert gen.CONDITIONS[0] == "spinal_canal_stenosis" and len(gen.CONDITIONS) == 5
    assert gen.LEVELS == ["l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"]
    assert set(gen.CONDITION_NAMES.values()) == CONDITION_SPELLINGS
    assert gen.LEVEL_NAMES["l5_s1"] == "L5/S1"
    assert gen.SEVERITIES == ["Normal/Mild", "Moderate", "Severe"]


def test_csv_columns_and_spellings(tables):
    train = tables["train.csv"]
    assert len(train.columns) == 26
    assert list(train.columns[:3]) == ["study_id", "spinal_canal_stenosis_l1_l2",
                                       "spinal_canal_stenosis_l2_l3"]
    assert train.columns[6] == "left_neural_foraminal_narrowing_l1_l2"
    assert train.columns[-1] == "right_subarticular_stenosis_l5_s1"
    assert list(train.columns[1:]) == [f"{c}_{lv}" for c in gen.CONDITIONS for lv in gen.LEVELS]
    labels = train.iloc[:, 1:]
    assert set(labels.stack().dropna()) <= SEVERITIES
    assert labels.isna().values.sum() >= 1
    assert labels.filter(like="spinal_canal").isna().values.sum() >= 1
    assert train.study_id.is_unique and train.study_id.between(10**6, 10**7 - 1).all()

    coords = tables["train_label_coordinates.csv"]
    assert list(coords.columns) == ["study_id", "series_id", "instance_number", "condition",
                                    "level", "x", "y"]
    assert set(coords.condition) == CONDITION_SPELLINGS
    assert set(coords.level) == LEVEL_SPELLINGS
    assert coords.x.dtype == float and (coords.x % 1 != 0).any()
    # One row per labelled (study, condition, level) cell and none for an empty cell.
    assert not coords.duplicated(["study_id", "condition", "level"]).any()
    assert len(coords) == labels.notna().values.sum()

    desc = tables["train_series_descriptions.csv"]
    assert list(desc.columns) == ["study_id", "series_id", "series_description"]
    assert desc.series_id.is_unique and desc.series_id.between(10**7, 10**10 - 1).all()
    per_study = desc.groupby("study_id").series_description.apply(sorted)
    assert (per_study.apply(tuple) == ("Axial T2", "Sagittal T1", "Sagittal T2/STIR")).all()
    assert set(desc.study_id) == set(train.study_id)
    # Each condition is annotated on its own series type.
    kind = coords.merge(desc, on=["study_id", "series_id"]).groupby("condition")
    assert kind.series_description.unique().apply(list).to_dict() == {
        "Spinal Canal Stenosis": ["Sagittal T2/STIR"],
        "Left Neural Foraminal Narrowing": ["Sagittal T1"],
        "Right Neural Foraminal Narrowing": ["Sagittal T1"],
        "Left Subarticular Stenosis": ["Axial T2"],
        "Right Subarticular Stenosis": ["Axial T2"],
    }

    test_desc, sub = tables["test_series_descriptions.csv"], tables["sample_submission.csv"]
    assert list(test_desc.columns) == list(desc.columns) and len(test_desc) >= 3
    assert list(sub.columns) == ["row_id", "normal_mild", "moderate", "severe"]
    assert len(sub) == 25 * test_desc.study_id.nunique()
    first = test_desc.study_id.iloc[0]
    assert sub.row_id.iloc[0] == f"{first}_spinal_canal_stenosis_l1_l2"
    assert np.allclose(sub[["normal_mild", "moderate", "severe"]].sum(axis=1), 1.0)


def test_files_exist(study_set, tables):
    coords = tables["train_label_coordinates.csv"]
    for r in coords.itertuples():
        path = study_set / f"train_images/{r.study_id}/{r.series_id}/{r.instance_number}.dcm"
        assert path.is_file()
    for r in tables["train_series_descriptions.csv"].itertuples():
        assert (study_set / f"train_images/{r.study_id}/{r.series_id}").is_dir()
    for r in tables["test_series_descriptions.csv"].itertuples():
        assert any((study_set / f"test_images/{r.study_id}/{r.series_id}").glob("*.dcm"))


def test_dicom_attributes(headers, tables):
    desc = tables["train_series_descriptions.csv"].set_index("series_id").series_description
    syntaxes = {}
    for (_, se, inst), ds in headers.items():
        assert ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.MRImageStorage
        assert ds.Modality == "MR" and ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 12, 0)
        assert (ds.RescaleSlope, ds.RescaleIntercept) == (1, 0)
        assert ds.InstanceNumber == inst and ds.SeriesDescription == desc[se]
        assert len(ds.ImageOrientationPatient) == 6 and len(ds.ImagePositionPatient) == 3
        assert len(ds.PixelSpacing) == 2 and ds.SliceThickness > 0
        assert 0 < ds.WindowCenter < 4096 and ds.WindowWidth > 0
        assert ds.arr.dtype == np.uint16 and ds.arr.shape == (ds.Rows, ds.Columns)
        assert ds.arr.max() <= 4095
        syntaxes.setdefault(se, set()).add(ds.file_meta.TransferSyntaxUID)
    assert all(len(s) == 1 for s in syntaxes.values())  # one syntax per series
    used = set.union(*syntaxes.values())
    assert used == {RLELossless, ExplicitVRLittleEndian}
    uids = [ds.SOPInstanceUID for ds in headers.values()]
    assert len(set(uids)) == len(uids)


def test_series_quirks(series):
    maxima, shapes, spacings = [], set(), set()
    reversed_kinds = []
    for dss in series.values():
        inst = [int(ds.InstanceNumber) for ds in dss]
        assert sorted(inst) == list(range(min(inst), min(inst) + len(inst)))
        if inst[0] > inst[-1]:
            reversed_kinds.append(dss[0].SeriesDescription)
        shapes.add((dss[0].Rows, dss[0].Columns))
        spacings.add(round(float(dss[0].PixelSpacing[0]), 3))
        maxima.append(max(int(ds.arr.max()) for ds in dss))
        if dss[0].SeriesDescription == "Sagittal T2/STIR":
            assert 15 <= len(dss) <= 17
            assert dss[0].ImageOrientationPatient == [0, 1, 0, 0, 0, -1]
            assert len({float(ds.ImagePositionPatient[0]) for ds in dss}) == len(dss)
        if dss[0].SeriesDescription == "Axial T2":
            assert dss[0].ImageOrientationPatient == [1, 0, 0, 0, 1, 0]
    assert min(min(int(ds.InstanceNumber) for ds in d) for d in series.values()) >= 1
    assert any(min(int(ds.InstanceNumber) for ds in d) > 1 for d in series.values())
    assert "Sagittal T2/STIR" in reversed_kinds
    assert len(reversed_kinds) < len(series) / 2
    assert len(shapes) > 1 and len(spacings) > 1
    assert max(maxima) > 2 * min(maxima)  # intensity scale differs between series


def _slice_index(series, row):
    """Anatomical index of the annotated slice, and its series in anatomical order."""
    dss = series[(row.study_id, row.series_id)]
    order = [int(ds.InstanceNumber) for ds in dss]
    return order.index(row.instance_number), dss


def test_spinal_slice_placement(series, tables):
    coords = tables["train_label_coordinates.csv"]
    spinal = coords[coords.condition == "Spinal Canal Stenosis"]
    at_edge = 0
    for r in spinal.drop_duplicates("series_id").itertuples():
        k, dss = _slice_index(series, r)
        n = len(dss)
        at_edge += k <= 1 or k >= n - 2
        # Otherwise the annotated slice is the midline slice +/- 1.
        assert k <= 1 or k >= n - 2 or abs(k - n // 2) <= 1
    assert at_edge >= 1


def test_coordinates_inside_image(series, tables):
    for r in tables["train_label_coordinates.csv"].itertuples():
        _, dss = _slice_index(series, r)
        assert 0 <= r.x < dss[0].Columns and 0 <= r.y < dss[0].Rows


def _window(img, x, y, sp, half_x=4.0, half_y=1.5):
    """Mean of a box of +/-half_x mm across the canal and +/-half_y mm along it at (x, y)."""
    r, c, hy, hx = round(y), round(x), max(1, round(half_y / sp)), max(1, round(half_x / sp))
    return float(img[max(r - hy, 0):r + hy + 1, max(c - hx, 0):c + hx + 1].mean())


def test_canal_signal(series, tables):
    coords = tables["train_label_coordinates.csv"]
    train = tables["train.csv"].set_index("study_id")
    spinal = coords[coords.condition == "Spinal Canal Stenosis"]
    by_sev = {s: [] for s in SEVERITIES}
    near, far = [], []
    for r in spinal.itertuples():
        k, dss = _slice_index(series, r)
        sev = train.loc[r.study_id, f"spinal_canal_stenosis_{r.level.lower().replace('/', '_')}"]
        sp = float(dss[0].PixelSpacing[0])
        img = dss[k].arr.astype(float)
        by_sev[sev].append(_window(img, r.x, r.y, sp) / max(d.arr.max() for d in dss))
        if sev == "Normal/Mild":
            # Canal vs tissue 15 mm posterior: strong on the annotated slice, faded 3 away.
            k3 = k + 3 if k + 3 < len(dss) else k - 3
            x_post = min(r.x + 15 / sp, dss[0].Columns - 1)
            for lst, a in ((near, img), (far, dss[k3].arr.astype(float))):
                lst.append(_window(a, r.x, r.y, sp) / _window(a, x_post, r.y, sp))
    assert min(len(v) for v in by_sev.values()) >= 3
    normal, moderate, severe = (np.mean(by_sev[s]) for s in ["Normal/Mild", "Moderate", "Severe"])
    assert normal > moderate > severe
    assert normal > 1.5 * severe
    assert np.mean(near) > 3 and np.mean(far) < 0.5 * np.mean(near)


def test_determinism_and_summary(tmp_path):
    a = gen.make_study_set(tmp_path / "a", n_studies=3, seed=5)
    b = gen.make_study_set(tmp_path / "b", n_studies=3, seed=5)
    gen.make_study_set(tmp_path / "c", n_studies=3, seed=6)
    for name in CSVS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a/train.csv").read_bytes() != (tmp_path / "c/train.csv").read_bytes()
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.dcm"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.dcm"))
    assert files_a == files_b
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert {k: v for k, v in a.items() if k != "out_dir"} == {
        k: v for k, v in b.items() if k != "out_dir"}

    train = pd.read_csv(tmp_path / "a/train.csv")
    assert a["n_studies"] == 3 and a["n_series"] == 9
    assert a["n_dicom_files"] == len(list((tmp_path / "a").glob("train_images/*/*/*.dcm")))
    counts = train.filter(like="spinal_canal").stack().value_counts().to_dict()
    assert {k: v for k, v in a["spinal_canal_counts"].items() if v} == counts
    series_ids = set(pd.read_csv(tmp_path / "a/train_series_descriptions.csv").series_id)
    assert a["reversed_series"] and set(a["reversed_series"]) <= series_ids
    assert a["rle_series"] and set(a["rle_series"]) < series_ids
    assert set(a["edge_studies"]) <= set(train.study_id)


def test_cli(tmp_path):
    script = Path(gen.__file__)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "cli"), "--studies", "2",
                          "--seed", "3", "--mix", "0,0,1"],
                         capture_output=True, text=True, timeout=120, check=True)
    summary = json.loads(out.stdout)
    assert summary["n_studies"] == 2
    assert summary["spinal_canal_counts"]["Normal/Mild"] == 0
    assert summary["spinal_canal_counts"]["Severe"] >= 9  # all 10 unless one cell is empty
    assert (tmp_path / "cli/train.csv").is_file()


# --- the realistic preset: every quirk of the real data, each where the summary says -------------------

@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """(root, summary) of a 12-study set on the REALISTIC preset (seed 0)."""
    root = tmp_path_factory.mktemp("realistic")
    return root, gen.make_study_set(root, n_studies=12, seed=0, **gen.REALISTIC)


def _header(root, item):
    return pydicom.dcmread(root / item["file"], stop_before_pixels=True)


def _any_file(root, item):
    """Header of one readable file of the item's series (the annotated-stack quirks spare most files)."""
    for f in sorted((root / f"train_images/{item['study_id']}/{item['series_id']}").glob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if all(tag in ds for tag in gen.GEOMETRY_TAGS):
            return ds
    raise AssertionError(f"no complete header in {item}")


def _position(ds):
    iop = np.array(ds.ImageOrientationPatient, float)
    return float(np.dot(np.array(ds.ImagePositionPatient, float), np.cross(iop[:3], iop[3:])))


def test_realistic_lists_every_quirk(realistic):
    root, summary = realistic
    assert set(summary["quirks"]) == set(gen.QUIRKS)
    for name, items in summary["quirks"].items():
        assert items, name
        assert all({"study_id", "series_id"} <= set(it) for it in items)
    t2 = {name: [it for it in summary["quirks"][name] if it["series_description"] == "Sagittal T2/STIR"]
          for name in gen.GEOMETRY_QUIRKS}
    assert all(t2.values())  # every geometry quirk reaches the trained series type
    assert "realistic preset" in (root / "GENERATED_BY.txt").read_text()
    json.dumps(summary, allow_nan=False)  # the CLI prints it: valid JSON


def test_realistic_geometry_quirks(realistic):
    root, summary = realistic
    q = summary["quirks"]
    for it in q["anisotropic"]:
        ds = _any_file(root, it)
        row_sp, col_sp = (float(v) for v in ds.PixelSpacing)
        assert 1.09 < col_sp / row_sp < 1.31
    sizes = set()
    for f in root.glob("train_images/*/*/*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        sizes.add((ds.Rows, ds.Columns))
    assert max(max(s) for s in sizes) == 1024 and any(r != c for r, c in sizes) and len(sizes) >= 6
    for it in q["flipped_normal"]:
        iop = np.array(_any_file(root, it).ImageOrientationPatient, float)
        clean = np.array(gen.SAG_IOP if it["series_description"].startswith("Sagittal") else gen.AX_IOP)
        # axial_blocks tilt the column direction up to 20 degrees about x; the row direction stays patient x
        assert np.dot(iop[:3], clean[:3]) < -0.98 and np.dot(iop[3:], clean[3:]) > 0.93 and iop[3] == 0
    for it in q["oblique"]:
        iop = np.array(_any_file(root, it).ImageOrientationPatient, float)
        angle = np.degrees(np.arccos(abs(iop[1])))  # row direction against patient y, rotated about z
        assert 0.99 < angle < 8.01 and iop[2] == 0 and np.allclose(iop[3:], [0, 0, -1])


def _box(img, x, y, row_sp, col_sp):
    """Mean of +/-4 mm across the canal (columns) and +/-1.5 mm along it (rows) at pixel (x, y)."""
    hx, hy, r, c = max(1, round(4 / col_sp)), max(1, round(1.5 / row_sp)), round(y), round(x)
    return float(img[max(r - hy, 0):r + hy + 1, max(c - hx, 0):c + hx + 1].mean())


def test_realistic_anatomy_in_patient_space(realistic):
    """Flipped, oblique, anisotropic and resized series alike: the labelled point is on the bright canal
    and 15 mm posterior of it (patient +y, mapped back through each file's own geometry) is dark."""
    root, summary = realistic
    coords = pd.read_csv(root / "train_label_coordinates.csv")
    desc = pd.read_csv(root / "train_series_descriptions.csv")
    train = pd.read_csv(root / "train.csv").set_index("study_id")
    rows = coords[coords.condition == "Spinal Canal Stenosis"].merge(desc, on=["study_id", "series_id"])
    rows = rows[rows.series_description == "Sagittal T2/STIR"].dropna(subset=["x", "y"])
    quirky = {it["series_id"] for name in ("flipped_normal", "oblique", "anisotropic", "varied_sizes",
                                          "repeated_stack") for it in summary["quirks"][name]}
    ratios, seen = [], set()
    for r in rows.itertuples():
        sev = train.loc[r.study_id, f"spinal_canal_stenosis_{r.level.lower().replace('/', '_')}"]
        ds = pydicom.dcmread(root / f"train_images/{r.study_id}/{r.series_id}/{r.instance_number}.dcm")
        if sev != "Normal/Mild" or not (0 <= r.x < ds.Columns and 0 <= r.y < ds.Rows):
            continue
        img, iop = ds.pixel_array.astype(float), np.array(ds.ImageOrientationPatient, float)
        sr, sc = (float(v) for v in ds.PixelSpacing)
        offset = r.x * sc * iop[:3] + r.y * sr * iop[3:] + np.array([0.0, 15.0, 0.0])
        px, py = offset @ iop[:3] / sc, offset @ iop[3:] / sr
        ratios.append(_box(img, r.x, r.y, sr, sc) / _box(img, px, py, sr, sc))
        seen.add(r.series_id)
    assert len(ratios) >= 20 and len(seen & quirky) >= 4
    assert min(ratios) > 3


def test_realistic_repeated_stack(realistic):
    root, summary = realistic
    coords = pd.read_csv(root / "train_label_coordinates.csv")
    for it in summary["quirks"]["repeated_stack"]:
        folder = root / f"train_images/{it['study_id']}/{it['series_id']}"
        stacks = [[pydicom.dcmread(folder / f"{i}.dcm", stop_before_pixels=True) for i in inst
                   if (folder / f"{i}.dcm").exists()] for inst in it["stacks"]]
        assert len(it["stacks"][0]) == len(it["stacks"][1]) and not set(it["stacks"][0]) & set(it["stacks"][1])
        assert {(ds.Rows, ds.Columns) for ds in stacks[1]} == {tuple(it["sizes"][1])}
        positions = [{round(_position(ds), 2) for ds in st if "ImagePositionPatient" in ds} for st in stacks]
        assert positions[0] == positions[1] and len(positions[0]) >= 14  # same slice positions twice
        annotated = set(coords[coords.series_id == it["series_id"]].instance_number)
        assert annotated and annotated <= set(it["stacks"][it["annotated_stack"] - 1])
    assert any(it["annotated_stack"] == 2 for it in summary["quirks"]["repeated_stack"])


def test_realistic_file_quirks(realistic):
    root, summary = realistic
    q = summary["quirks"]
    coords = pd.read_csv(root / "train_label_coordinates.csv")
    annotated = set(zip(coords.series_id, coords.instance_number))
    for it in q["missing_geometry"]:
        ds = _header(root, it)
        assert it["tag"] not in ds and (it["series_id"], it["instance_number"]) not in annotated
        assert (1 <= abs(it["offset"]) <= 3) == it["neighbour"]
    assert {it["neighbour"] for it in q["missing_geometry"]} == {True, False}
    for it in q["instance_mismatch"]:
        ds = _header(root, it)
        assert int(Path(it["file"]).stem) == it["instance_number"] != ds.InstanceNumber
    assert any((it["series_id"], it["instance_number"]) in annotated for it in q["instance_mismatch"])
    for it in q["outlier_pixels"]:
        arr = pydicom.dcmread(root / it["file"]).pixel_array
        assert all(arr[r, c] == 4095 for r, c in it["pixels"]) and len(it["pixels"]) >= 3
    for it in q["missing_slice"]:
        assert not (root / it["file"]).exists() and 1 <= abs(it["offset"]) <= 3
        folder = (root / it["file"]).parent
        pos = np.sort([_position(pydicom.dcmread(f, stop_before_pixels=True)) for f in folder.glob("*.dcm")
                       if "ImagePositionPatient" in pydicom.dcmread(f, stop_before_pixels=True)])
        steps = np.diff(np.unique(pos.round(2)))
        assert steps.max() > 1.8 * np.median(steps)  # a gap where the slice was
    for it in q["truncated_file"]:
        assert 1 <= abs(it["offset"]) <= 3 and (root / it["file"]).stat().st_size == it["bytes_kept"]
        with pytest.warns(UserWarning), pytest.raises(AttributeError):
            pydicom.dcmread(root / it["file"]).pixel_array  # noqa: B018  (the truncation loses Pixel Data)
    for it in q["missing_window"]:
        ds = _header(root, it)
        assert it["tags"] == gen.WINDOW_TAGS and not any(tag in ds for tag in it["tags"])
        assert (it["series_id"], it["instance_number"]) not in annotated
        assert (1 <= abs(it["offset"]) <= 3) == it["neighbour"]
        others = [f for f in (root / it["file"]).parent.glob("*.dcm") if f.name != Path(it["file"]).name]
        assert all("WindowCenter" in pydicom.dcmread(f, stop_before_pixels=True) for f in others[:5])
    assert any(it["neighbour"] for it in q["missing_window"])


def test_realistic_coordinate_quirks(realistic):
    root, summary = realistic
    q = summary["quirks"]
    coords = pd.read_csv(root / "train_label_coordinates.csv")
    desc = pd.read_csv(root / "train_series_descriptions.csv").set_index("series_id").series_description
    for it in q["duplicate_coordinates"]:
        rows = coords[(coords.study_id == it["study_id"]) & (coords.level == it["level"])
                      & (coords.condition == "Spinal Canal Stenosis")]
        assert list(rows.series_id.map(desc)) == ["Sagittal T1", "Sagittal T2/STIR"]  # the T1 row first
        assert rows.index[0] == it["row"] and rows.series_id.iloc[1] == it["valid_series_id"]
    kinds = {}
    for it in q["bad_coordinates"]:
        r = coords.loc[it["row"]]
        assert (r.study_id, r.series_id, r.level) == (it["study_id"], it["series_id"], it["level"])
        cols = pydicom.dcmread(root / f"train_images/{r.study_id}/{r.series_id}/{r.instance_number}.dcm",
                               stop_before_pixels=True).Columns
        kinds[it["kind"]] = {"x_far": r.x > 10 * cols, "y_negative": r.y < -100, "x_nan": np.isnan(r.x),
                             "edge": cols <= r.x <= cols + 3}[it["kind"]]
    assert kinds == {"x_far": True, "y_negative": True, "x_nan": True, "edge": True}


def test_realistic_class_mix(tmp_path):
    """The preset's labels follow the real mix (checked on 40 studies: 200 spinal labels, uncompressed
    to write faster)."""
    s = gen.make_study_set(tmp_path, n_studies=40, seed=1, rle_fraction=0.0,
                           class_mix=gen.REALISTIC["class_mix"], missing_label_frac=gen.REALISTIC["missing_label_frac"])
    counts = np.array(list(s["spinal_canal_counts"].values()), float)
    share = counts / counts.sum()
    assert abs(share[0] - 0.88 / 0.99) < 0.05 and 0.02 < share[1] < 0.11 and 0.02 < share[2] < 0.10
    assert s["n_missing_labels"] / (25 * 40) < 0.03


def test_realistic_deterministic_and_cli(tmp_path):
    a = gen.make_study_set(tmp_path / "a", n_studies=2, seed=4, **gen.REALISTIC)
    script = Path(gen.__file__)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "b"), "--studies", "2", "--seed", "4",
                          "--realistic"], capture_output=True, text=True, timeout=120, check=True)
    b = json.loads(out.stdout)
    assert {k: v for k, v in a.items() if k != "out_dir"} == {k: v for k, v in b.items() if k != "out_dir"}
    for rel in sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*")):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert all(b["quirks"].values())  # forced even on 2 studies


# --- issue 24: the Sagittal T1 / Axial T2 quirks and each condition's signal at its own point ------------------

def _series_files(root, item):
    """(instance number from the file name) -> dataset with pixels, for the item's series."""
    folder = root / f"train_images/{item['study_id']}/{item['series_id']}"
    return {int(f.stem): pydicom.dcmread(f) for f in folder.glob("*.dcm")}


def _to_patient(ds, x, y):
    """Patient (x, y, z) mm of pixel (column x, row y) through the file's own geometry."""
    iop = np.array(ds.ImageOrientationPatient, float)
    sr, sc = (float(v) for v in ds.PixelSpacing)
    return np.array(ds.ImagePositionPatient, float) + x * sc * iop[:3] + y * sr * iop[3:]


def _anatomical_key(ds):
    """The generator's anatomical order without its normal's sign: image centre's -x (sagittal) or z (axial)."""
    centre = _to_patient(ds, (ds.Columns - 1) / 2, (ds.Rows - 1) / 2)
    return -centre[0] if ds.SeriesDescription.startswith("Sagittal") else centre[2]


def _normal(ds):
    iop = np.array(ds.ImageOrientationPatient, float)
    return np.cross(iop[:3], iop[3:])


def test_realistic_axial_blocks(realistic):
    """Each level's block has its own tilt about x (its slices parallel and evenly spaced), and the level's
    subarticular points lie on a slice of that block, on the bright recess."""
    root, summary = realistic
    coords = pd.read_csv(root / "train_label_coordinates.csv")
    items = summary["quirks"]["axial_blocks"]
    assert len(items) >= 2 and all(it["series_description"] == "Axial T2" for it in items)
    checked = 0
    for it in items:
        files = _series_files(root, it)
        blocks = {lv: inst for lv, inst in it["block_instances"].items() if inst}
        assert sorted(files) == sorted(i for inst in blocks.values() for i in inst)
        normals = {tuple(np.round(_normal(files[i]), 6)) for i in files}
        assert len(normals) == len(blocks) in (4, 5)
        for lv, inst in blocks.items():
            iops = {tuple(files[i].ImageOrientationPatient) for i in inst}
            assert len(iops) == 1  # one block: parallel slices
            iop = np.array(iops.pop(), float)
            assert abs(iop[0]) == 1 and iop[1:4].tolist() == [0, 0, 0]  # rotated about x (flipped_normal: -x rows)
            angle = np.degrees(np.arctan2(iop[5], iop[4]))
            assert abs(angle - it["tilt_degrees"][lv]) < 1e-3 and 5 <= abs(angle) <= 20
            pos = np.sort([np.dot(files[i].ImagePositionPatient, _normal(files[i])) for i in inst])
            assert np.ptp(np.diff(pos)) < 1e-3 and np.diff(pos).min() > 2.9  # evenly spaced along the normal
            rows = coords[(coords.series_id == it["series_id"]) & (coords.level == lv)]
            for r in rows.itertuples():
                assert r.instance_number in inst
                ds = files[r.instance_number]
                side = 1 if r.condition.startswith("Left") else -1
                lateral = (side * 8 / float(ds.PixelSpacing[1])) * ds.ImageOrientationPatient[0]
                img = ds.pixel_array.astype(float)
                assert img[round(r.y), round(r.x)] > 2 * img[round(r.y), round(r.x + lateral)]
                checked += 1
    assert checked >= 20
    signs = {np.sign(a) for it in items for a in it["tilt_degrees"].values()}
    assert signs == {-1.0, 1.0}  # tilts change sign along the spine


def test_realistic_axial_missing_level(realistic):
    root, summary = realistic
    coords = pd.read_csv(root / "train_label_coordinates.csv")
    train = pd.read_csv(root / "train.csv").set_index("study_id")
    items = summary["quirks"]["axial_missing_level"]
    assert items and any(it["series_id"] in {b["series_id"] for b in summary["quirks"]["axial_blocks"]}
                         for it in items)
    for it in items:
        files = _series_files(root, it)
        assert it["block_instances"][it["level"]] == []
        present = [inst for inst in it["block_instances"].values() if inst]
        assert len(present) == 4 and sorted(files) == sorted(i for inst in present for i in inst)
        rows = coords[(coords.study_id == it["study_id"]) & (coords.level == it["level"])]
        assert not rows.condition.str.contains("Subarticular").any()
        lv = it["level"].lower().replace("/", "_")
        labels = train.loc[it["study_id"], [f"left_subarticular_stenosis_{lv}", f"right_subarticular_stenosis_{lv}"]]
        assert labels.notna().any()  # the labels stay
        other = coords[(coords.study_id == it["study_id"]) & (coords.series_id == it["series_id"])]
        assert set(other.level) == set(gen.LEVEL_NAMES.values()) - {it["level"]}


def _order_in_files(root, item):
    """Instance numbers (file names) in anatomical order, read back from the files' positions."""
    files = _series_files(root, item)
    return [i for i, _ in sorted(files.items(), key=lambda kv: _anatomical_key(kv[1]))]


def test_realistic_interleaved_and_reversed_order(realistic):
    root, summary = realistic
    q = summary["quirks"]
    for it in q["interleaved_order"]:
        inst = _order_in_files(root, it)
        assert inst == it["instance_numbers"]
        assert inst != sorted(inst) and inst != sorted(inst, reverse=True)
        half = (len(inst) + 1) // 2  # the 1st, 3rd, ... slices first, then the 2nd, 4th, ...
        assert inst[::2] == list(range(min(inst), min(inst) + half)) and inst[1::2] == list(
            range(min(inst) + half, min(inst) + len(inst)))
    for it in q["reversed_order"]:
        inst = _order_in_files(root, it)
        assert inst == it["instance_numbers"] == sorted(inst, reverse=True)
        assert it["series_id"] in summary["reversed_series"]
    kinds = {name: {it["series_description"] for it in q[name]} for name in ("interleaved_order", "reversed_order")}
    assert kinds["reversed_order"] == {"Sagittal T1", "Axial T2"} and kinds["interleaved_order"]
    assert not {it["series_id"] for it in q["interleaved_order"]} & set(summary["reversed_series"])


SIDE_CONDITIONS = gen.CONDITIONS[1:]  # foraminal (Sagittal T1) and subarticular (Axial T2), left then right
SIGNAL_SET = {"n_studies": 1, "seed": 7, "rle_fraction": 0.0, "missing_label_frac": 0.0,
              "quirks": {"axial_blocks": 1.0, "flipped_normal": 1.0}}
ALL_NORMAL = {(0, c, lv): 0 for c in SIDE_CONDITIONS for lv in gen.LEVELS}


@pytest.fixture(scope="module")
def all_normal(tmp_path_factory):
    """A one-study set (tilted axial blocks, every series flipped) whose side conditions are all Normal/Mild."""
    root = tmp_path_factory.mktemp("all_normal")
    gen.make_study_set(root, _labels=ALL_NORMAL, **SIGNAL_SET)
    return root


def _pixel_positions(ds):
    """Patient (x, y, z) of every pixel of a file, (rows, columns, 3)."""
    r, c = np.mgrid[:ds.Rows, :ds.Columns]
    return _to_patient(ds, c[..., None], r[..., None])


def _point(root, coords, cond, level):
    """The condition's annotated point at a level: its file and patient position."""
    r = coords[(coords.condition == gen.CONDITION_NAMES[cond]) & (coords.level == level)].iloc[0]
    ds = pydicom.dcmread(root / f"train_images/{r.study_id}/{r.series_id}/{r.instance_number}.dcm")
    return f"train_images/{r.study_id}/{r.series_id}/{r.instance_number}.dcm", _to_patient(ds, r.x, r.y)


@pytest.mark.parametrize("cond", SIDE_CONDITIONS)
def test_side_signal_only_at_its_own_point(all_normal, tmp_path, cond):
    """The same anatomy and noise with one label at L3/L4 made Severe: the files change only within 15 mm of that
    condition's annotated point (darker there: the foramen or recess narrows), not at the other side's point at
    that level nor at the condition's other levels."""
    gen.make_study_set(tmp_path, _labels={**ALL_NORMAL, (0, cond, "l3_l4"): 2}, **SIGNAL_SET)
    coords = pd.read_csv(all_normal / "train_label_coordinates.csv")
    assert coords.equals(pd.read_csv(tmp_path / "train_label_coordinates.csv"))
    _, at = _point(all_normal, coords, cond, "L3/L4")
    mirror = cond.replace("left", "@").replace("right", "left").replace("@", "right")
    quiet = [_point(all_normal, coords, mirror, "L3/L4")[1]]
    quiet += [_point(all_normal, coords, cond, lv)[1] for lv in sorted(set(gen.LEVEL_NAMES.values()) - {"L3/L4"})]
    changed, near_point = set(), []
    for f in sorted(all_normal.glob("train_images/*/*/*.dcm")):
        a, rel = pydicom.dcmread(f), f.relative_to(all_normal)
        diff = a.pixel_array.astype(int) - pydicom.dcmread(tmp_path / rel).pixel_array.astype(int)
        pos = _pixel_positions(a)
        dist = np.linalg.norm(pos - at, axis=-1)
        if (np.abs(diff) > 2).any():  # beyond rounding of the faint tail across slices
            changed.add(a.SeriesDescription)
            assert dist[np.abs(diff) > 2].max() < 15, rel
        near_point.extend(diff[dist < 3])
        for q in quiet:
            assert np.abs(diff[np.linalg.norm(pos - q, axis=-1) < 5]).max(initial=0) <= 2, rel
    assert changed == {gen.CONDITION_SERIES[cond]}
    assert np.mean(near_point) > 100  # Normal/Mild minus Severe: darker at the point


# --- axial_partial: an Axial T2 series that covers only the lowest levels ---------------------------------------

PARTIAL_SET = {"n_studies": 4, "seed": 35, "missing_label_frac": 0.0,
               "quirks": {"axial_partial": 1.0, "axial_blocks": 0.5, "axial_missing_level": 0.3}}
LEVEL_ORDER = list(gen.LEVEL_NAMES.values())  # L1/L2 .. L5/S1, top to bottom


def _hashes(root, skip=()):
    """relative path -> sha1 of every file under root, but those whose path starts with one of skip."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and not str(p.relative_to(root)).startswith(tuple(skip))}


@pytest.fixture(scope="module")
def partial_set(tmp_path_factory):
    """(root, summary) of a 4-study set whose Axial T2 series all cover only their lowest levels."""
    root = tmp_path_factory.mktemp("partial")
    return root, gen.make_study_set(root, **PARTIAL_SET)


def test_axial_partial_keeps_the_lowest_levels(partial_set):
    """Each series keeps a contiguous run of the lowest 1-3 levels (of those axial_missing_level left), 3-9 slices,
    exactly the recorded files; the kept points lie at their own level's height, the others have no row but
    keep their labels."""
    root, summary = partial_set
    q = summary["quirks"]
    assert "axial_partial" not in gen.REALISTIC["quirks"] and "axial_partial" in gen.T1_AXIAL_QUIRKS
    coords = pd.read_csv(root / "train_label_coordinates.csv")
    train = pd.read_csv(root / "train.csv").set_index("study_id")
    missing = {it["series_id"]: it["level"] for it in q["axial_missing_level"]}
    tilted = {it["series_id"] for it in q["axial_blocks"]}
    items = q["axial_partial"]
    assert json.loads(json.dumps(items, allow_nan=False)) == items
    assert len(items) == PARTIAL_SET["n_studies"] and {it["series_description"] for it in items} == {"Axial T2"}
    assert set(missing) & {it["series_id"] for it in items} and tilted & {it["series_id"] for it in items}
    for it in items:
        left = [lv for lv in LEVEL_ORDER if lv != missing.get(it["series_id"])]
        kept = it["levels"]
        assert 1 <= len(kept) <= 3 and kept == left[-len(kept):]  # the lowest, contiguous among those left
        assert list(it["instance_numbers"]) == kept and it["uncovered_levels"] == [lv for lv in LEVEL_ORDER
                                                                                   if lv not in kept]
        files = _series_files(root, it)
        inst = [i for lv in kept for i in it["instance_numbers"][lv]]
        assert sorted(files) == sorted(inst) and 3 <= len(files) <= 9
        assert len({len(v) for v in it["instance_numbers"].values()}) == 1  # 2-4 slices a level
        if it["series_id"] in tilted:  # each kept block keeps its own tilt
            assert len({tuple(files[i].ImageOrientationPatient) for i in inst}) == len(kept)
        rows = coords[(coords.series_id == it["series_id"])]
        assert sorted(rows.level.unique()) == sorted(kept) and len(rows) == 2 * len(kept)
        for r in rows.itertuples():
            assert r.instance_number in it["instance_numbers"][r.level]
            z = _to_patient(files[r.instance_number], r.x, r.y)[2]  # L3/L4 at z = 0, ~34 mm a level
            assert int(np.argmin([abs(z - (2 - i) * 34.0) for i in range(5)])) == LEVEL_ORDER.index(r.level)
        study = coords[(coords.study_id == it["study_id"]) & coords.condition.str.contains("Subarticular")]
        assert set(study.level) == set(kept)
        for lv in it["uncovered_levels"]:
            key = lv.lower().replace("/", "_")
            assert train.loc[it["study_id"], [f"{side}_subarticular_stenosis_{key}"
                                              for side in ("left", "right")]].notna().all()  # labels stay
    assert {len(it["levels"]) for it in items} == {1, 2, 3}
    # seed 35: one series lost L3/L4 (axial_missing_level) and keeps the three lowest left, L2/L3, L4/L5, L5/S1
    gaps = [it["levels"] for it in items if missing.get(it["series_id"]) == "L3/L4"]
    assert gaps == [["L2/L3", "L4/L5", "L5/S1"]]


def test_axial_partial_reproducible_and_nothing_else_changes(partial_set, tmp_path):
    """The same seed gives the same files; without the quirk (its own random stream) every other file is the same
    and the partial series' slices are the full series' ones, pixel for pixel."""
    root, summary = partial_set
    again = gen.make_study_set(tmp_path / "again", **PARTIAL_SET)
    assert _hashes(root) == _hashes(tmp_path / "again")
    assert {k: v for k, v in again.items() if k != "out_dir"} == {k: v for k, v in summary.items() if k != "out_dir"}
    quirks = {k: v for k, v in PARTIAL_SET["quirks"].items() if k != "axial_partial"}
    full = gen.make_study_set(tmp_path / "full", **{**PARTIAL_SET, "quirks": quirks})
    assert full["quirks"]["axial_missing_level"] == [  # as far as they go, the other quirks' records agree
        {**it, "block_instances": full_it["block_instances"]}
        for it, full_it in zip(summary["quirks"]["axial_missing_level"], full["quirks"]["axial_missing_level"])]
    partial = {f"{split}/{it['study_id']}/{it['series_id']}/" for it in summary["quirks"]["axial_partial"]
               for split in ("train_images", "test_images")}
    ours, theirs = _hashes(root, skip=partial), _hashes(tmp_path / "full", skip=partial)
    assert len(ours) == len(theirs) > 100
    assert {k for k in ours if ours[k] != theirs[k]} == {"train_label_coordinates.csv", "GENERATED_BY.txt"}
    for it in summary["quirks"]["axial_partial"]:
        whole = {tuple(ds.ImagePositionPatient): ds for ds in _series_files(tmp_path / "full", it).values()}
        kept = _series_files(root, it).values()
        assert len(whole) > len(kept)
        for ds in kept:
            np.testing.assert_array_equal(ds.pixel_array, whole[tuple(ds.ImagePositionPatient)].pixel_array)
    coords = [pd.read_csv(r / "train_label_coordinates.csv") for r in (root, tmp_path / "full")]
    other = [c[~c.condition.str.contains("Subarticular")].reset_index(drop=True) for c in coords]
    pd.testing.assert_frame_equal(other[0], other[1])


# --- sagittal_top_edge: sagittal series framed so that L1/L2 lies at the image's top edge ---------------------------

TOP_EDGE_SET = {"n_studies": 5, "seed": 3, "missing_label_frac": 0.0, "quirks": {"sagittal_top_edge": 0.5}}
TOP_EDGE_ROWS = 8  # the annotated L1/L2 point's row on a hit series is at most this (TOP_EDGE_PX plus jitter)


def test_sagittal_top_edge_puts_l1_l2_at_the_top_and_nothing_else_changes(tmp_path):
    """Read back from the files: on each hit study both sagittal series start a few rows above the L1/L2 point
    (as recorded), every annotated point sits at the same patient position as in the set made without the quirk
    (coordinates follow the DICOM geometry), the canal is bright at the edge point, and every other file and
    coordinate row is byte for byte the same."""
    root, clean = tmp_path / "edge", tmp_path / "clean"
    summary = gen.make_study_set(root, **TOP_EDGE_SET)
    gen.make_study_set(clean, **{**TOP_EDGE_SET, "quirks": None})
    assert "sagittal_top_edge" in gen.EXTRA_QUIRKS and "sagittal_top_edge" not in gen.REALISTIC["quirks"]
    items = summary["quirks"]["sagittal_top_edge"]
    assert json.loads(json.dumps(items, allow_nan=False)) == items
    studies = {it["study_id"] for it in items}
    assert 1 <= len(studies) < TOP_EDGE_SET["n_studies"] and len(items) == 2 * len(studies)
    assert sorted(it["series_description"] for it in items) == sorted(["Sagittal T1", "Sagittal T2/STIR"]
                                                                      * len(studies))
    coords = {r: pd.read_csv(r / "train_label_coordinates.csv") for r in (root, clean)}
    train = pd.read_csv(root / "train.csv").set_index("study_id")
    hit = {it["series_id"] for it in items}
    for it in items:
        assert gen.TOP_EDGE_PX[0] <= it["top_px"] <= gen.TOP_EDGE_PX[1]
        assert it["level_rows"][0] == pytest.approx(it["top_px"], abs=1e-3)
        assert np.all(np.diff(it["level_rows"]) > 20)  # the other levels below, in order
        files, before = _series_files(root, it), _series_files(clean, it)
        assert sorted(files) == sorted(before) and [files[i].Rows for i in files] == [before[i].Rows for i in files]
        rows = coords[root][coords[root].series_id == it["series_id"]]
        kinds = ({"Spinal Canal Stenosis"} if it["series_description"] == "Sagittal T2/STIR" else
                 {"Left Neural Foraminal Narrowing", "Right Neural Foraminal Narrowing"})
        assert set(rows.condition) == kinds and len(rows) == 5 * len(kinds)
        top = rows[rows.level == "L1/L2"]
        assert ((top.y >= 0) & (top.y <= TOP_EDGE_ROWS)).all()
        assert (rows[rows.level != "L1/L2"].y > TOP_EDGE_ROWS + 10).all()
        old = coords[clean][coords[clean].series_id == it["series_id"]]
        assert (old.y > TOP_EDGE_ROWS + 10).all()  # the clean set had room above L1/L2
        for r, o in zip(rows.itertuples(), old.itertuples()):
            assert (r.instance_number, r.level, r.x) == (o.instance_number, o.level, o.x)
            if r.y > 0:  # a point jittered above row 0 is clipped, as everywhere
                ds, dso = files[r.instance_number], before[o.instance_number]
                assert np.allclose(_to_patient(ds, r.x, r.y), _to_patient(dso, o.x, o.y), atol=2e-3)
                assert np.allclose(ds.ImagePositionPatient[:2], dso.ImagePositionPatient[:2])
        if it["series_description"] == "Sagittal T2/STIR":
            r = top.iloc[0]
            if train.loc[r.study_id, "spinal_canal_stenosis_l1_l2"] == "Normal/Mild":  # bright canal at the edge
                ds = files[r.instance_number]
                img, iop = ds.pixel_array.astype(float), np.array(ds.ImageOrientationPatient, float)
                sr, sc = (float(v) for v in ds.PixelSpacing)
                post = (r.x * sc * iop[:3] + r.y * sr * iop[3:] + np.array([0.0, 15.0, 0.0])) @ iop[:3] / sc
                assert _box(img, r.x, r.y, sr, sc) > 3 * _box(img, post, r.y, sr, sc)
    skip = {f"{split}/{it['study_id']}/{it['series_id']}/" for it in items for split in ("train_images", "test_images")}
    ours, theirs = _hashes(root, skip=skip), _hashes(clean, skip=skip)
    assert len(ours) == len(theirs) > 100
    assert {k for k in ours if ours[k] != theirs[k]} == {"train_label_coordinates.csv", "GENERATED_BY.txt"}
    other = [c[~c.series_id.isin(hit)].reset_index(drop=True) for c in coords.values()]
    pd.testing.assert_frame_equal(other[0], other[1])
    again = gen.make_study_set(tmp_path / "again", **TOP_EDGE_SET)
    assert _hashes(tmp_path / "again") == _hashes(root) and again["quirks"] == summary["quirks"]


# --- test_faults: a hostile test split, one fault on each of its last seven studies -------------------------------

FAULT_SET = {"n_studies": 2, "seed": 2, "test_studies": 9}


@pytest.fixture(scope="module")
def fault_sets(tmp_path_factory):
    """(root, summary, plain root): a clean set with a 9-study test split made hostile, and the same seed without
    the faults."""
    base = tmp_path_factory.mktemp("faults")
    faulty = gen.make_study_set(base / "faulty", test_faults=True, **FAULT_SET)
    gen.make_study_set(base / "plain", **FAULT_SET)
    return base / "faulty", faulty, base / "plain"


def _folder(root, study, series):
    """instance number (file name) -> dataset with pixels, of test_images/{study}/{series}."""
    return {int(f.stem): pydicom.dcmread(f) for f in (root / f"test_images/{study}/{series}").glob("*.dcm")}


def _test_desc(root):
    return pd.read_csv(root / "test_series_descriptions.csv")


def _series_of(root, study, kind):
    (sid,) = _test_desc(root).query("study_id == @study and series_description == @kind").series_id
    return int(sid)


def test_test_faults_only_where_recorded(fault_sets, tmp_path):
    """One fault a study on the last seven, in TEST_FAULTS' order; everything else (training set, labels kept aside,
    sample submission, the first test studies' files and rows) as without faults; the same seed, the same faults."""
    root, summary, plain = fault_sets
    split = summary["test_split"]
    faults = split["faults"]
    assert gen.TEST_FAULTS == ("two_axial", "two_t1", "stray_image", "unknown_series", "no_geometry",
                               "blank_images", "empty_study")
    assert list(faults) == list(gen.TEST_FAULTS)
    assert json.loads(json.dumps(split, allow_nan=False)) == split  # the CLI prints it: plain JSON types
    assert [it["study_id"] for it in faults.values()] == split["study_ids"][-7:]
    touched = tuple(f"test_images/{s}/" for s in split["study_ids"][-7:]) + ("test_series_descriptions.csv",)
    ours, theirs = _hashes(root, skip=touched), _hashes(plain, skip=touched)
    assert ours == theirs and any(k.startswith(f"test_images/{split['study_ids'][0]}/") for k in ours)
    assert any(k.startswith("test_solution/") for k in ours) and "sample_submission.csv" in ours
    desc, before = _test_desc(root), _test_desc(plain)
    first = set(split["study_ids"][:2])
    pd.testing.assert_frame_equal(desc[desc.study_id.isin(first)], before[before.study_id.isin(first)])
    sample = pd.read_csv(root / "sample_submission.csv")
    assert len(sample) == 25 * 9 and sample.row_id.str.split("_").str[0].astype(int).nunique() == 9
    again = gen.make_study_set(tmp_path / "again", test_faults=True, **FAULT_SET)
    assert _hashes(tmp_path / "again") == _hashes(root) and again["test_split"] == split
    with pytest.raises(ValueError, match="test_faults needs test_studies >= 9"):
        gen.make_study_set(tmp_path / "few", n_studies=1, test_studies=8, test_faults=True)
    with pytest.raises(ValueError, match="test_studies >= 9"):  # the CLI flag reaches make_study_set
        gen.main([str(tmp_path / "cli"), "--studies", "1", "--test-studies", "3", "--test-faults"])


def test_fault_two_axial(fault_sets):
    """Two "Axial T2" series of the study that hold the original files between them: the larger (new) one holds the
    upper three levels, the original the two lowest, where the L4/L5 and L5/S1 points are."""
    root, summary, plain = fault_sets
    it = summary["test_split"]["faults"]["two_axial"]
    study, (old, new) = it["study_id"], it["series_ids"]
    desc = _test_desc(root).query("study_id == @study")
    assert list(desc.series_id[desc.series_description == "Axial T2"]) == [old, new] == [old, it["new_series_id"]]
    before = _folder(plain, study, old)
    parts = [_folder(root, study, old), _folder(root, study, new)]
    assert [sorted(p) for p in parts] == [sorted(i) for i in it["instance_numbers"]]
    assert not set(parts[0]) & set(parts[1]) and sorted({**parts[0], **parts[1]}) == sorted(before)
    assert len(parts[1]) > len(parts[0]) and it["levels"] == [["L4/L5", "L5/S1"], ["L1/L2", "L2/L3", "L3/L4"]]
    z = [[float(ds.ImagePositionPatient[2]) for ds in p.values()] for p in parts]
    assert max(z[0]) < min(z[1])  # the original: the lower slices
    coords = pd.read_csv(root / "test_solution/train_label_coordinates.csv").query("study_id == @study")
    sub = coords[coords.condition.str.contains("Subarticular")]
    assert len(sub) >= 8 and set(sub.instance_number) <= set(before)
    for r in sub.itertuples():
        assert (r.instance_number in parts[0]) == (r.level in ("L4/L5", "L5/S1"))
    uids = [{str(ds.SeriesInstanceUID) for ds in p.values()} for p in parts]
    assert all(len(u) == 1 for u in uids) and uids[0] != uids[1]
    assert uids[0] == {str(ds.SeriesInstanceUID) for ds in before.values()}
    for inst, ds in parts[1].items():  # same files but the series UID and number
        ref = before[inst]
        assert ds.SeriesNumber != ref.SeriesNumber and ds.SOPInstanceUID == ref.SOPInstanceUID
        for tag in ("SeriesInstanceUID", "SeriesNumber"):
            delattr(ds, tag)
            delattr(ref, tag)
        assert ds == ref and ds.PixelData == ref.PixelData
    for inst in parts[0]:
        assert (root / f"test_images/{study}/{old}/{inst}.dcm").read_bytes() == (
            plain / f"test_images/{study}/{old}/{inst}.dcm").read_bytes()


def test_fault_two_t1(fault_sets):
    """Two "Sagittal T1" series: the original (more files) keeps the midline and one side, the new one the other
    side, where that side's foraminal points are."""
    root, summary, plain = fault_sets
    it = summary["test_split"]["faults"]["two_t1"]
    study, (old, new) = it["study_id"], it["series_ids"]
    desc = _test_desc(root).query("study_id == @study")
    assert list(desc.series_id[desc.series_description == "Sagittal T1"]) == [old, new]
    before = _folder(plain, study, old)
    parts = [_folder(root, study, old), _folder(root, study, new)]
    assert [sorted(p) for p in parts] == [sorted(i) for i in it["instance_numbers"]]
    assert not set(parts[0]) & set(parts[1]) and sorted({**parts[0], **parts[1]}) == sorted(before)
    assert len(parts[0]) > len(parts[1]) >= 4 and it["midline_instance"] in parts[0]
    sign = -1 if it["side"] == "right" else 1  # LPS: patient left is +x
    x_mid = float(before[it["midline_instance"]].ImagePositionPatient[0])
    x = [np.array([float(ds.ImagePositionPatient[0]) for ds in p.values()]) for p in parts]
    assert (sign * (x[1] - x_mid) > 2).all() and (sign * (x[0] - x_mid) <= 0).all()
    coords = pd.read_csv(root / "test_solution/train_label_coordinates.csv").query("study_id == @study")
    fora = coords[coords.condition == f"{it['side'].title()} Neural Foraminal Narrowing"]
    assert len(fora) >= 4 and set(fora.instance_number) <= set(parts[1])  # "most files" loses these points
    assert {str(ds.SeriesInstanceUID) for ds in parts[1].values()} != {
        str(ds.SeriesInstanceUID) for ds in parts[0].values()}


def test_fault_stray_image(fault_sets):
    """One axial image, a copy of the Axial T2 series' middle slice, among the Sagittal T2/STIR files."""
    root, summary, plain = fault_sets
    it = summary["test_split"]["faults"]["stray_image"]
    study, sid = it["study_id"], it["series_id"]
    assert sid == _series_of(root, study, "Sagittal T2/STIR")
    files, before = _folder(root, study, sid), _folder(plain, study, sid)
    assert sorted(files) == sorted(before) + [max(before) + 1] and it["instance_number"] == max(before) + 1
    assert it["file"] == f"test_images/{study}/{sid}/{max(before) + 1}.dcm"
    ds, src = files[it["instance_number"]], pydicom.dcmread(root / it["source_file"])
    assert ds.ImageOrientationPatient == [1, 0, 0, 0, 1, 0] and ds.InstanceNumber == it["instance_number"]
    assert ds.ImagePositionPatient == src.ImagePositionPatient and ds.PixelSpacing == src.PixelSpacing
    np.testing.assert_array_equal(ds.pixel_array, src.pixel_array)
    assert src.SeriesDescription == "Axial T2" and ds.SeriesDescription == "Sagittal T2/STIR"
    ref = before[min(before)]
    assert (ds.SeriesInstanceUID, ds.StudyInstanceUID) == (ref.SeriesInstanceUID, ref.StudyInstanceUID)
    assert ds.file_meta.TransferSyntaxUID == ref.file_meta.TransferSyntaxUID
    assert ds.SOPInstanceUID not in {d.SOPInstanceUID for d in before.values()} | {src.SOPInstanceUID}
    assert {tuple(d.ImageOrientationPatient) for d in before.values()} == {(0, 1, 0, 0, 0, -1)}  # the others: sagittal
    for inst in before:
        assert (root / f"test_images/{study}/{sid}/{inst}.dcm").read_bytes() == (
            plain / f"test_images/{study}/{sid}/{inst}.dcm").read_bytes()


def test_fault_unknown_series(fault_sets):
    root, summary, plain = fault_sets
    it = summary["test_split"]["faults"]["unknown_series"]
    study, sid = it["study_id"], it["series_id"]
    desc = _test_desc(root).query("study_id == @study")
    assert len(desc) == 4 and desc.series_id.iloc[-1] == sid
    (description,) = desc.series_description[desc.series_id == sid]
    assert description == it["series_description"] == gen.UNKNOWN_DESCRIPTION == "Coronal STIR"
    assert description not in gen.SERIES_TYPES and sorted(desc.series_description[desc.series_id != sid]) == sorted(
        gen.SERIES_TYPES)
    files = _folder(root, study, sid)
    assert sorted(files) == [1, 2, 3, 4] and it["files"] == [f"test_images/{study}/{sid}/{i}.dcm" for i in range(1, 5)]
    for i, ds in files.items():
        assert ds.SeriesDescription == description and ds.ImageOrientationPatient == [1, 0, 0, 0, 0, -1]
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns) and ds.pixel_array.max() > 0
        np.testing.assert_array_equal(ds.pixel_array, pydicom.dcmread(root / it["source_files"][i - 1]).pixel_array)
    assert len({str(ds.SeriesInstanceUID) for ds in files.values()}) == 1
    assert len({float(ds.ImagePositionPatient[1]) for ds in files.values()}) == 4
    assert not (plain / f"test_images/{study}/{sid}").exists()


def test_fault_no_geometry(fault_sets):
    root, summary, plain = fault_sets
    it = summary["test_split"]["faults"]["no_geometry"]
    study, sid = it["study_id"], it["series_id"]
    assert sid == _series_of(root, study, "Sagittal T1") and it["tags"] == gen.GEOMETRY_TAGS
    files, before = _folder(root, study, sid), _folder(plain, study, sid)
    assert sorted(files) == sorted(before) and len(files) >= 10 and len(it["files"]) == len(files)
    for inst, ds in files.items():
        assert not any(tag in ds for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"))
        assert all(tag in before[inst] for tag in gen.GEOMETRY_TAGS)
        np.testing.assert_array_equal(ds.pixel_array, before[inst].pixel_array)
        assert ds.SliceThickness == before[inst].SliceThickness and ds.InstanceNumber == inst


def test_fault_blank_images(fault_sets):
    root, summary, plain = fault_sets
    it = summary["test_split"]["faults"]["blank_images"]
    study, sid = it["study_id"], it["series_id"]
    assert sid == _series_of(root, study, "Sagittal T2/STIR")
    files, before = _folder(root, study, sid), _folder(plain, study, sid)
    assert sorted(files) == sorted(before) and len(files) >= 15 and 0 < it["value"] < 4096
    for inst, ds in files.items():
        arr = ds.pixel_array
        assert arr.shape == before[inst].pixel_array.shape and (arr == it["value"]).all()
        assert before[inst].pixel_array.std() > 10  # it was an image
        assert ds.ImagePositionPatient == before[inst].ImagePositionPatient


def test_fault_empty_study(fault_sets):
    root, summary, plain = fault_sets
    it = summary["test_split"]["faults"]["empty_study"]
    study = it["study_id"]
    folder = root / f"test_images/{study}"
    assert folder.is_dir() and not any(folder.iterdir())
    assert study not in set(_test_desc(root).study_id)
    assert sorted(it["series_ids"]) == sorted(_test_desc(plain).query("study_id == @study").series_id)
    assert len(it["series_ids"]) == 3 and all((plain / f"test_images/{study}/{s}").is_dir() for s in it["series_ids"])
    sample = pd.read_csv(root / "sample_submission.csv")
    assert sample.row_id.str.startswith(f"{study}_").sum() == 25
    assert study in set(pd.read_csv(root / "test_solution/train.csv").study_id)


def test_test_faults_on_a_quirky_split(tmp_path):
    """Faults over quirks: flipped series (the stray image is mirrored back to rows along +x), partial axial series
    (test split too: two_axial splits what the series has), and the study without a Sagittal T2/STIR is the empty one.
    Every test file decodes."""
    s = gen.make_study_set(tmp_path, n_studies=1, seed=4, test_studies=9, test_faults=True, rle_fraction=0.0,
                           quirks={"flipped_normal": 1.0, "axial_partial": 1.0})
    split, root = s["test_split"], tmp_path
    faults = split["faults"]
    partial = {it["series_id"]: it for it in split["quirks"]["axial_partial"]}
    assert len(partial) == 9 and split["no_sagittal_t2"][0]["study_id"] == faults["empty_study"]["study_id"]
    it = faults["two_axial"]
    series = partial[it["series_ids"][0]]
    assert sorted(i for inst in it["instance_numbers"] for i in inst) == sorted(
        i for inst in series["instance_numbers"].values() for i in inst)
    assert len(it["instance_numbers"][1]) > len(it["instance_numbers"][0]) >= 1
    stray = faults["stray_image"]
    ds, src = pydicom.dcmread(root / stray["file"]), pydicom.dcmread(root / stray["source_file"])
    assert src.ImageOrientationPatient[0] == -1 and ds.ImageOrientationPatient == [1, 0, 0, 0, 1, 0]
    np.testing.assert_array_equal(ds.pixel_array, src.pixel_array[:, ::-1])
    first = _to_patient(src, src.Columns - 1, 0)  # the source's last column is the stray's first
    np.testing.assert_allclose(np.array(ds.ImagePositionPatient, float), first, atol=1e-3)
    files = sorted(root.glob("test_images/*/*/*.dcm"))
    assert len(files) > 200
    for f in files:
        arr = pydicom.dcmread(f).pixel_array
        assert arr.ndim == 2 and arr.dtype == np.uint16
