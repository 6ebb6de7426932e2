"""Tests of tools/make_demo_studies.py: the generated set must look like the competition data."""

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
