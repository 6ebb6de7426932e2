"""Task 1.1 (issue 3): the DICOM dataset, its cache and its visual checks, through the notebook's own functions.

Expected values are computed here independently (pydicom, OpenCV, pandas on the CSVs); nothing of the notebook
is copied. Expensive things (cache builds, small corrupted study sets) are built once per module.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import cv2
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from augment_helpers import AUG_KEYS, aug_row, smooth_image  # tests/ is on sys.path (rootdir)
from make_demo_studies import make_study_set  # tools/ is put on sys.path by conftest.py
from pydicom.dataset import Dataset

SEVERITY_INDEX = {"Normal/Mild": 0, "Moderate": 1, "Severe": 2}
LEVELS = ["l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"]
SPINAL = "spinal_canal_stenosis"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
HALF = 3  # 7 slices: the annotated one and 3 on each side


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def config(nb, tmp_path_factory):
    """The session's CONFIG with a cache folder private to this module (other modules may build their own)."""
    return {**nb["CONFIG"], "cache_dir": str(tmp_path_factory.mktemp("cache_dataset"))}


@pytest.fixture(scope="module")
def table(nb, config):
    return nb["build_sample_table"](config)


@pytest.fixture(scope="module")
def samples(table):
    return table[0]


@pytest.fixture(scope="module")
def cache(nb, samples, config):
    """(kept samples, images memmap, masks, failures) of every sample at the session's img_size (64)."""
    return nb["build_cache"](samples, config, 0)


@pytest.fixture(scope="module")
def cache256(nb, samples, config, tmp_path_factory):
    """The plan's validation size: the first 5 samples cached at img_size 256."""
    cfg = {**config, "img_size": 256, "cache_dir": str(tmp_path_factory.mktemp("cache256"))}
    return cfg, nb["build_cache"](samples.head(5), cfg, 0)


def along_patient_axis(ds):
    """Anatomical order: the ImagePositionPatient coordinate on the patient axis (LPS) closest to the slice normal
    (row x col), increasing (sagittal: right to left), whatever the sign of the normal."""
    iop = np.asarray(ds.ImageOrientationPatient, float)
    return float(ds.ImagePositionPatient[int(np.argmax(np.abs(np.cross(iop[:3], iop[3:]))))])


@pytest.fixture(scope="module")
def series_order(samples):
    """series_id -> list of (instance number, path, header) in anatomical order, read here from the headers."""
    out = {}
    for series_id, path in samples.groupby("series_id")["path"].first().items():
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in Path(path).parent.glob("*.dcm")]
        headers.sort(key=along_patient_axis)
        out[series_id] = [(int(ds.InstanceNumber), ds.filename, ds) for ds in headers]
    return out


def point_mm(ds, x, y):
    """Patient-space position of pixel (column x, row y) of a slice (DICOM C.7.6.2.1.1)."""
    iop = np.asarray(ds.ImageOrientationPatient, float)
    spacing_row, spacing_col = (float(v) for v in ds.PixelSpacing)
    return np.asarray(ds.ImagePositionPatient, float) + x * spacing_col * iop[:3] + y * spacing_row * iop[3:]


# ------------------------------------------------------------------------- 1. the plan's validation
def test_five_samples_at_256_are_uint8_7x3x256x256_with_identical_channels(nb, cache256):
    cfg, (kept, images, masks, failures) = cache256
    assert len(kept) == 5 and len(failures) == 0
    side = nb["crop_side"](cfg)  # training samples carry the cached margin, the model input is 256
    for train, shipped in ((True, side), (False, 256)):
        dataset = nb["RSNADatasetV9"](kept, images, masks, cfg, train=train)
        assert len(dataset) == 5
        for i in range(5):
            item = dataset[i]
            image = item["image"]
            assert tuple(image.shape) == (7, 3, shipped, shipped)
            assert image.dtype == torch.uint8
            assert torch.equal(image[:, 0], image[:, 1]) and torch.equal(image[:, 0], image[:, 2])
            assert image.float().std() > 10  # real anatomy, not a blank crop
            x = nb["to_model_input"](image[None], item["aug"][None] if train else None,
                                     item["mask"][None], 0.0, cfg["img_size"])
            assert tuple(x.shape) == (1, 7, 3, 256, 256)


def test_to_model_input_normalises_with_imagenet_mean_std(nb, cache256):
    cfg, (kept, images, masks, _) = cache256
    dataset = nb["RSNADatasetV9"](kept, images, masks, cfg, train=False)
    batch = torch.stack([dataset[i]["image"] for i in range(5)])
    out = nb["to_model_input"](batch)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    # one known pixel, by hand
    value = int(batch[2, 3, 0, 128, 128])
    for c in range(3):
        expected = (value / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert out[2, 3, c, 128, 128].item() == pytest.approx(expected, abs=1e-5)
    # the extremes of the uint8 range
    extremes = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 1, 2).expand(1, 1, 3, 1, 2)
    ext = nb["to_model_input"](extremes)
    for c in range(3):
        assert ext[0, 0, c, 0, 0].item() == pytest.approx(-IMAGENET_MEAN[c] / IMAGENET_STD[c], abs=1e-5)
        assert ext[0, 0, c, 0, 1].item() == pytest.approx((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], abs=1e-5)
    # the whole batch against the formula
    mean = torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
    torch.testing.assert_close(out, (batch.double() / 255 - mean) / std, check_dtype=False, atol=1e-5, rtol=0)
    assert torch.equal(batch, torch.stack([dataset[i]["image"] for i in range(5)]))  # input left untouched
    cpu = torch.device("cpu")
    assert all(a is b for a, b in zip(nb["imagenet_stats"](cpu), nb["imagenet_stats"](cpu)))  # made once per device
    # training noise: the same noise in the 3 identical channels, so they stay identical once de-normalised
    torch.manual_seed(0)
    noisy = nb["to_model_input"](batch, noise_std=0.1) * std + mean
    torch.testing.assert_close(noisy[:, :, 0], noisy[:, :, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(noisy[:, :, 0], noisy[:, :, 2], atol=1e-5, rtol=0)
    assert (noisy[:, :, 0] - batch[:, :, 0].float() / 255).abs().mean() > 0.05  # noise really added


def test_plot_class_crops_writes_one_row_per_class(nb, cache):
    kept, images, masks, _ = cache
    assert set(kept["label"]) == {0, 1, 2}
    png = nb["FIGURES"] / "crops_by_class.png"
    png.unlink(missing_ok=True)
    nb["plot_class_crops"](kept, images, masks, 64)
    assert png.exists() and png.stat().st_size > 20_000
    one = nb["FIGURES"] / "test_one_class.png"
    nb["plot_class_crops"](kept[kept["label"] == 2], images, masks, 64, name="test_one_class")
    height3, width3 = mpimg.imread(png).shape[:2]
    height1, width1 = mpimg.imread(one).shape[:2]
    one.unlink()  # only crops_by_class.png is the notebook's own figure
    assert width3 == width1 and height3 == 3 * height1  # three rows of the same slices


def test_plot_class_crops_has_a_row_group_per_trained_condition(nb):
    """Issue 30: every condition in the sample table gets its own rows, one per class it has, in CONDITION_SERIES'
    order (the spinal canal, then each foramen, then each subarticular recess); a row's figure height is fixed."""
    conditions = list(nb["CONDITION_SERIES"])
    labels = {c: [0, 1, 2] for c in conditions} | {conditions[2]: [0, 2]}  # the right foramen: no Moderate
    rows = [(c, label) for c in reversed(conditions) for label in labels[c] for _ in range(2)]
    samples = pd.DataFrame(rows, columns=["condition", "label"]).assign(
        study_id=7, level="l4_l5", cache_index=range(len(rows)))
    images = np.random.default_rng(0).integers(0, 255, (len(rows), 3, 48, 48), dtype=np.uint8)
    masks = np.ones((len(rows), 3), bool)
    shown = nb["plot_class_crops"](samples, images, masks, 32, name="test_conditions")
    assert shown == [(c, label) for c in conditions for label in labels[c]]
    for c, label in shown:  # the row shows a sample of that condition and class
        assert ((samples["condition"] == c) & (samples["label"] == label)).any()
    one = nb["plot_class_crops"](samples[samples["condition"] == nb["SPINAL"]], images, masks, 32, name="test_one")
    assert one == [(nb["SPINAL"], 0), (nb["SPINAL"], 1), (nb["SPINAL"], 2)]
    height = mpimg.imread(nb["FIGURES"] / "test_conditions.png").shape[0]
    assert height == pytest.approx(len(shown) / 3 * mpimg.imread(nb["FIGURES"] / "test_one.png").shape[0], rel=0.01)
    for name in ("test_conditions", "test_one"):
        (nb["FIGURES"] / f"{name}.png").unlink()


def test_plot_augmentations_writes_cached_plus_one_panel_per_view(nb, cache, config):
    kept, images, masks, _ = cache
    nb["plot_augmentations"](kept, images, masks, config, views=3, name="test_aug3")
    nb["plot_augmentations"](kept, images, masks, config, views=6, name="test_aug6")
    small = mpimg.imread(nb["FIGURES"] / "test_aug3.png")
    large = mpimg.imread(nb["FIGURES"] / "test_aug6.png")
    assert large.shape[1] / small.shape[1] == pytest.approx(7 / 4, rel=0.05)  # panel count sets the width
    assert small.std() > 0.05  # images drawn, not a blank canvas


def test_read_slice_is_minmax_then_opencv_clahe(nb, samples, config):
    grid = config["clahe_grid"]
    clahe = cv2.createCLAHE(clipLimit=config["clahe_clip"], tileGridSize=(grid, grid))
    for path in samples.drop_duplicates("series_id")["path"].head(4):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        mapped = np.round((pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255).astype(np.uint8)
        got = nb["read_slice"](path, config)
        assert got.dtype == np.uint8 and got.shape == (ds.Rows, ds.Columns)
        np.testing.assert_array_equal(got, clahe.apply(mapped))
        assert np.mean(got != mapped) > 0.5  # CLAHE really changed the image
        other = nb["read_slice"](path, {**config, "clahe_clip": 4 * config["clahe_clip"]})
        assert not np.array_equal(other, got)  # and its clip limit is the CONFIG's


# ----------------------------------------------------------------------------------- 2. sample table
def test_sample_table_one_row_per_labelled_study_level(nb, study_set, table):
    samples, skipped = table
    train = pd.read_csv(study_set / "train.csv").set_index("study_id")
    spinal = train[[f"{SPINAL}_{lv}" for lv in LEVELS]]
    n_empty = int(spinal.isna().values.sum())
    assert n_empty >= 1
    assert dict(zip(skipped["reason"], skipped["rows"])) == {"no label": n_empty}
    assert len(samples) == spinal.size - n_empty
    assert not samples.duplicated(["study_id", "level"]).any()
    labelled = {(s, c[len(SPINAL) + 1:]) for (s, c), v in spinal.stack().items() if isinstance(v, str)}
    assert set(zip(samples["study_id"], samples["level"])) == labelled
    expected = [SEVERITY_INDEX[train.loc[s, f"{SPINAL}_{lv}"]] for s, lv in zip(samples["study_id"], samples["level"])]
    assert samples["label"].tolist() == expected
    assert set(samples["label"]) == {0, 1, 2}
    assert samples["level_idx"].tolist() == [LEVELS.index(lv) for lv in samples["level"]]


def test_sample_table_points_at_the_annotated_file(study_set, samples):
    coords = pd.read_csv(study_set / "train_label_coordinates.csv")
    coords = coords[coords["condition"] == "Spinal Canal Stenosis"].assign(
        level=lambda d: d["level"].str.lower().str.replace("/", "_"))
    merged = samples.merge(coords, on=["study_id", "level"], suffixes=("", "_csv"), validate="one_to_one")
    assert len(merged) == len(samples)
    assert (merged["series_id"] == merged["series_id_csv"]).all()
    assert (merged["instance_number"] == merged["instance_number_csv"]).all()
    np.testing.assert_allclose(merged[["x", "y"]].to_numpy(float), merged[["x_csv", "y_csv"]].to_numpy(float))
    for row in samples.itertuples():
        expected = study_set / "train_images" / str(row.study_id) / str(row.series_id) / f"{row.instance_number}.dcm"
        assert Path(row.path) == expected and expected.exists()
    series = pd.read_csv(study_set / "train_series_descriptions.csv").set_index("series_id")
    assert (series.loc[samples["series_id"], "series_description"] == "Sagittal T2/STIR").all()


# ------------------------------------------------------------------------------ 3. anatomical order
def test_reversed_series_cached_in_ipp_order(nb, cache, config, series_order):
    kept, images, masks, _ = cache
    reversed_ = [sid for sid, order in series_order.items()
                 if [inst for inst, _, _ in order] == sorted((inst for inst, _, _ in order), reverse=True)]
    assert reversed_, "the study set has a Sagittal T2/STIR series with instance numbers against IPP order"
    checked = 0
    for series_id in reversed_:
        order = series_order[series_id]
        by_instance = sorted(order, key=lambda item: item[0])
        for row in kept[kept["series_id"] == series_id].itertuples():
            rank = [inst for inst, _, _ in order].index(row.instance_number)
            if not HALF <= rank < len(order) - HALF:
                continue  # edge samples are the next test's
            anchor = order[rank][2]
            point = point_mm(anchor, row.x, row.y)
            rank_by_instance = [inst for inst, _, _ in by_instance].index(row.instance_number)
            assert masks[row.cache_index].all()
            for j in range(7):
                _, path, ds = order[rank - HALF + j]
                expected = nb["crop_slice"](nb["read_slice"](path, config), ds, point, config)
                np.testing.assert_array_equal(images[row.cache_index, j], expected)
                if j != HALF:  # not the slice at the same place in instance-number order
                    _, wrong_path, wrong_ds = by_instance[rank_by_instance - HALF + j]
                    wrong = nb["crop_slice"](nb["read_slice"](wrong_path, config), wrong_ds, point, config)
                    assert not np.array_equal(images[row.cache_index, j], wrong)
            checked += 1
    assert checked >= 3


# ------------------------------------------------------------------------------------ 4. edge padding
def test_edge_samples_padded_and_masked_exactly(cache, series_order):
    kept, images, masks, _ = cache
    n_padded_samples = 0
    for row in kept.itertuples():
        order = [inst for inst, _, _ in series_order[row.series_id]]
        rank = order.index(row.instance_number)
        expected = np.array([0 <= rank - HALF + j < len(order) for j in range(7)])
        np.testing.assert_array_equal(masks[row.cache_index], expected)
        stack = np.asarray(images[row.cache_index])
        assert (stack[~expected] == 0).all()
        assert all(stack[j].max() > 0 for j in np.flatnonzero(expected))
        n_padded_samples += int(not expected.all())
    assert n_padded_samples >= 1, "the study set has an annotated slice at or next to the series edge"


# ------------------------------------------------------------------- 5. corrupt and missing DICOM files
@pytest.fixture(scope="module")
def damaged(nb, tmp_path_factory):
    """A 4-study set: study A's annotated file truncated, B's annotated file deleted, C's non-annotated
    neighbour overwritten with garbage bytes, D intact. Returns what the tests need, cache built once."""
    root = tmp_path_factory.mktemp("damaged")
    make_study_set(root, n_studies=4, seed=1)
    cfg = {**nb["CONFIG"], "data_root": str(root), "cache_dir": str(root / "cache")}
    before, _ = nb["build_sample_table"](cfg)
    a, b, c, d = sorted(before["study_id"].unique())
    truncated = Path(before.loc[before["study_id"] == a, "path"].iloc[0])
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    deleted = Path(before.loc[before["study_id"] == b, "path"].iloc[0])
    deleted.unlink()
    annotated = Path(before.loc[before["study_id"] == c, "path"].iloc[0])
    series_c = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in annotated.parent.glob("*.dcm")),
                      key=along_patient_axis)  # read while intact
    names = [Path(ds.filename).name for ds in series_c]
    rank = names.index(annotated.name)
    # a neighbour slice of the same series, not at the series edge (a lost edge slice leaves no gap to see)
    garbage = annotated.with_name(names[rank + 1 if rank + 2 < len(names) else rank - 1])
    assert garbage.exists() and garbage != annotated and 0 < names.index(garbage.name) < len(names) - 1
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, garbage.stat().st_size, np.uint8).tobytes())
    samples, skipped = nb["build_sample_table"](cfg)
    kept, images, masks, issues = nb["build_cache"](samples, cfg, 0)
    return {"config": cfg, "before": before, "studies": (a, b, c, d), "truncated": truncated, "deleted": deleted,
            "garbage": garbage, "series_c": series_c, "samples": samples, "skipped": skipped, "kept": kept,
            "images": images, "masks": masks, "issues": issues}


def test_read_slice_corrupt_file_raises_valueerror_naming_it(nb, damaged):
    for path in (damaged["truncated"], damaged["garbage"]):
        with pytest.raises(ValueError, match=str(path)):
            nb["read_slice"](path, damaged["config"])
        with pytest.raises(ValueError, match=str(path)):
            nb["read_slice"](str(path), damaged["config"])


def test_missing_dicom_counted_in_skipped_table(damaged):
    before, samples, skipped = damaged["before"], damaged["samples"], damaged["skipped"]
    a, b, c, d = damaged["studies"]
    n_b = int((before["study_id"] == b).sum())
    assert n_b >= 1
    reasons = dict(zip(skipped["reason"], skipped["rows"]))
    assert reasons["DICOM file missing"] == n_b
    assert b not in set(samples["study_id"])
    assert len(samples) == len(before) - n_b


def test_truncated_annotated_file_drops_only_the_samples_it_anchors(damaged):
    samples, kept, issues = damaged["samples"], damaged["kept"], damaged["issues"]
    a, b, c, d = damaged["studies"]
    truncated = damaged["truncated"]
    anchored = samples[(samples["study_id"] == a) & (samples["instance_number"] == int(truncated.stem))]
    dropped = issues[issues["what"] == "sample dropped"]
    assert sorted(dropped.loc[dropped["study_id"] == a, "level"]) == sorted(anchored["level"])
    assert (dropped["file"] == truncated.name).all()
    # the message names the file and the real cause (bytes missing), not "no Pixel Data element"
    assert dropped["reason"].str.contains(str(truncated), regex=False).all()
    assert dropped["reason"].str.contains("truncated|less than expected").all()
    assert not dropped["reason"].str.contains("no 'Pixel Data'").any()
    assert set(dropped["study_id"]) == {a}
    assert len(kept) == len(samples) - len(anchored)
    kept_d = kept[kept["study_id"] == d]
    assert sorted(kept_d["level"]) == sorted(samples.loc[samples["study_id"] == d, "level"])


def test_unreadable_neighbour_is_a_masked_slice_not_a_lost_sample(nb, damaged):
    """Issue 12 point 2: a garbage neighbour file costs one masked slice per sample, named with its file."""
    samples, kept, issues, masks, images = (damaged[k] for k in ("samples", "kept", "issues", "masks", "images"))
    c, garbage = damaged["studies"][2], damaged["garbage"]
    kept_c = kept[kept["study_id"] == c]
    assert sorted(kept_c["level"]) == sorted(samples.loc[samples["study_id"] == c, "level"])  # none lost
    skipped = issues[(issues["what"] == "slice skipped")]
    assert skipped[["study_id", "file"]].values.tolist() == [[c, garbage.name]]
    assert skipped["reason"].str.contains("InvalidDicomError|cannot|header", case=False).all()
    order = [int(Path(ds.filename).stem) for ds in damaged["series_c"]]  # the intact series, anatomical order
    n_masked = 0
    for row in kept_c.itertuples():
        rank = order.index(row.instance_number)
        window = [order[r] if 0 <= r < len(order) else None for r in range(rank - HALF, rank + HALF + 1)]
        expected = np.array([inst is not None and inst != int(garbage.stem) for inst in window])
        np.testing.assert_array_equal(masks[row.cache_index], expected)
        assert (np.asarray(images[row.cache_index])[~expected] == 0).all()
        n_masked += int(int(garbage.stem) in window)
    masked = issues[(issues["what"] == "slice masked") & (issues["study_id"] == c)]
    assert n_masked >= 1 and len(masked) == n_masked and (masked["file"] == garbage.name).all()


# ------------------------------------------------------------------------------------------- 6. cache
def test_cache_reused_with_same_settings(nb, samples, config, cache, capsys):
    kept, images, masks, _ = cache
    folder = nb["cache_folder"](samples, config)[0]
    assert (folder / "done.json").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in [folder, *folder.iterdir()]}
    capsys.readouterr()
    kept2, images2, masks2, failures2 = nb["build_cache"](samples, config, 0)
    printed = capsys.readouterr().out
    assert "cache reused" in printed and "cache built" not in printed
    assert {p.name: p.stat().st_mtime_ns for p in [folder, *folder.iterdir()]} == stamps
    assert sorted(p.name for p in Path(config["cache_dir"]).iterdir()) == [folder.name]  # nothing else built
    np.testing.assert_array_equal(images2, images)
    np.testing.assert_array_equal(masks2, masks)
    pd.testing.assert_frame_equal(kept2, kept)
    assert len(failures2) == 0


def test_cache_is_memory_mapped_uint8(nb, samples, config, cache):
    kept, images, masks, failures = cache
    folder = nb["cache_folder"](samples, config)[0]
    assert isinstance(images, np.memmap)
    assert Path(images.filename).resolve() == (folder / "images.npy").resolve()
    assert not images.flags.writeable
    side = nb["crop_side"](config)
    assert side % 2 == 0 and 1.4 * 64 <= side <= 1.5 * 64  # the cached margin around img_size 64
    assert images.dtype == np.uint8 and images.shape == (len(samples), 7, side, side)
    assert masks.shape == (len(samples), 7) and masks.dtype == bool
    assert len(failures) == 0 and kept["cache_index"].tolist() == list(range(len(samples)))


@pytest.mark.parametrize("key, value", [("clahe_clip", 4.0), ("crop_mm", 45.0), ("intensity", "percentile"),
                                        ("img_size", 32), ("clahe_grid", 4)])
def test_changed_preprocessing_setting_changes_folder(nb, samples, config, key, value):
    assert config[key] != value
    assert nb["cache_folder"](samples, {**config, key: value})[0] != nb["cache_folder"](samples, config)[0]


@pytest.mark.parametrize("key, value", [("batch_size", 3), ("seed", 7), ("aug_rotate", 0.0), ("epochs", 1)])
def test_training_setting_keeps_folder(nb, samples, config, key, value):
    assert nb["cache_folder"](samples, {**config, key: value})[0] == nb["cache_folder"](samples, config)[0]


def test_changed_clahe_clip_rebuilds_different_crops(nb, samples, config, tmp_path, capsys):
    head = samples.head(5)
    base = {**config, "cache_dir": str(tmp_path)}
    _, images1, _, _ = nb["build_cache"](head, base, 0)
    _, images2, _, _ = nb["build_cache"](head, {**base, "clahe_clip": 4.0}, 0)
    assert capsys.readouterr().out.count("cache built") == 2
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert len(folders) == 2 and all((tmp_path / f / "done.json").exists() for f in folders)
    assert not np.array_equal(np.asarray(images1), np.asarray(images2))


def test_cache_of_a_reordered_table_matches_its_rows(nb, samples, config, cache, tmp_path):
    full_kept, full_images, _, _ = cache
    shuffled = samples.sample(frac=1, random_state=0)  # index is a permutation of 0..n-1
    kept, images, _, _ = nb["build_cache"](shuffled, {**config, "cache_dir": str(tmp_path)}, 0)
    full = full_kept.set_index(["study_id", "level"])["cache_index"]
    for row in kept.itertuples():
        np.testing.assert_array_equal(images[row.cache_index], full_images[full[(row.study_id, row.level)]])


# ------------------------------------------------------------------------------------ 7. intensity
@pytest.fixture(scope="module")
def one_file(samples):
    path = samples["path"].iloc[0]
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return path, ds, pixels


@pytest.mark.parametrize("mode", ["minmax", "window", "percentile", "series_percentile", "dicom"])
def test_every_intensity_mode_gives_uint8_of_the_input_size(nb, config, one_file, mode):
    path, ds, _ = one_file
    image = nb["read_slice"](path, {**config, "intensity": mode})
    assert image.dtype == np.uint8 and image.shape == (ds.Rows, ds.Columns)
    assert image.max() > image.min()


def test_intensity_modes_differ_and_clip_as_expected(nb, config, one_file):
    path, ds, pixels = one_file
    mapped, clipped = {}, {}
    for mode in ("minmax", "window", "percentile", "dicom"):
        mapped[mode], clipped[mode] = nb["map_intensity"](pixels, ds, {**config, "intensity": mode})
        assert mapped[mode].dtype == np.uint8
    assert (config["window_center"], config["window_width"]) == (50, 350)  # the plan's literal WC/WW
    assert clipped["window"] > 0.5
    assert clipped["window"] == pytest.approx(np.mean((pixels < -125) | (pixels > 225)))
    assert clipped["minmax"] == 0.0
    assert 0.0 < clipped["percentile"] <= 0.021
    lo, hi = float(ds.WindowCenter) - float(ds.WindowWidth) / 2, float(ds.WindowCenter) + float(ds.WindowWidth) / 2
    assert clipped["dicom"] == pytest.approx(np.mean((pixels < lo) | (pixels > hi)))
    window = np.round(np.clip((pixels.astype(np.float64) + 125) / 350, 0, 1) * 255).astype(np.uint8)
    assert np.mean(mapped["window"] != window) < 1e-3
    assert not np.array_equal(mapped["minmax"], mapped["window"])
    assert not np.array_equal(mapped["minmax"], mapped["percentile"])


def test_plot_preprocessing_shows_series_percentile_over_the_slice_and_its_neighbours(nb, config, samples,
                                                                                      series_order):
    row = samples.iloc[0]
    order = series_order[row["series_id"]]
    rank = [inst for inst, _, _ in order].index(row["instance_number"])
    modality = [pydicom.dcmread(path) for _, path, _ in order[max(0, rank - HALF):rank + HALF + 1]]
    modality = [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in modality]
    assert len(modality) >= 4
    lo, hi = np.percentile(np.concatenate([p.ravel() for p in modality]), (0.5, 99.5))
    own = modality[min(rank, HALF)]
    png = nb["FIGURES"] / "test_intensity.png"
    clipped = nb["plot_preprocessing"](row["path"], config, name="test_intensity")
    width = mpimg.imread(png).shape[1]
    png.unlink()  # only intensity_and_clahe.png is the notebook's own figure
    assert list(clipped) == ["minmax", "window", "percentile", "series_percentile", "dicom"]
    assert clipped["series_percentile"] == pytest.approx(np.mean((own < lo) | (own > hi)), abs=1e-6)
    assert 0 < clipped["series_percentile"] < 0.1
    assert width == pytest.approx(5 * 3.2 * 90, rel=0.02)  # one column per mode


def test_unknown_intensity_mode_raises(nb, config, one_file):
    with pytest.raises(ValueError, match="bogus"):
        nb["read_slice"](one_file[0], {**config, "intensity": "bogus"})


# --------------------------------------------------------------------------------------- 8. augmentation
def test_aug_params_are_named_in_the_order_used(nb):
    assert nb["AUG_PARAMS"] == AUG_KEYS


def test_training_augmentation_deterministic_by_seed_epoch_index(nb, cache, config):
    kept, images, masks, _ = cache
    train = nb["RSNADatasetV9"](kept, images, masks, config, train=True)
    val = nb["RSNADatasetV9"](kept, images, masks, config, train=False)
    size = config["img_size"]
    start = (nb["crop_side"](config) - size) // 2
    for i in (0, 7):
        row = kept.iloc[i]
        cached = torch.from_numpy(np.array(images[row["cache_index"]]))
        v1, v2 = val[i], val[i]
        assert torch.equal(v1["image"], v2["image"])
        assert torch.equal(v1["image"][:, 0], cached[:, start:start + size, start:start + size])  # the centre
        assert "aug" not in v1  # validation is deterministic: nothing to augment with
        assert v1["label"].item() == row["label"] and v1["level"].item() == row["level_idx"]
        assert torch.equal(v1["mask"], torch.from_numpy(masks[row["cache_index"]]))
        t0 = train[i]
        assert torch.equal(t0["image"][:, 0], cached)  # the worker ships the cached bytes; pixels change on the device
        assert t0["aug"].shape == (7,) and t0["aug"].dtype == torch.float32
        assert torch.equal(t0["aug"], train[i]["aug"])  # same (seed, epoch, index): same parameters
        again = nb["RSNADatasetV9"](kept, images, masks, config, train=True)
        assert torch.equal(t0["aug"], again[i]["aug"])  # no hidden state in the instance
        train.set_epoch(1)
        t1 = train[i]["aug"]
        assert not torch.equal(t0["aug"], t1) and torch.equal(t1, train[i]["aug"])
        train.set_epoch(0)
        other_seed = nb["RSNADatasetV9"](kept, images, masks, {**config, "seed": config["seed"] + 1}, train=True)
        assert not torch.equal(t0["aug"], other_seed[i]["aug"])
        # the model input: augmented, different from validation's, and the same for the same parameters
        batch = t0["image"][None]
        mask = t0["mask"][None]
        augmented = nb["to_model_input"](batch, t0["aug"][None], mask, size=size)
        assert augmented.shape[-1] == size
        assert not torch.allclose(augmented, nb["to_model_input"](v1["image"][None]))
        assert torch.equal(augmented, nb["to_model_input"](batch, train[i]["aug"][None], mask, size=size))
        assert torch.equal(torch.from_numpy(np.array(images[row["cache_index"]])), cached)  # cache untouched


def test_draw_augmentation_spans_the_configured_ranges(nb, config):
    draws = np.stack([nb["draw_augmentation"](np.random.default_rng([1, k]), config) for k in range(2000)])
    bounds = [(config["aug_rotate"], 0), (config["aug_scale"], 1), (config["aug_shift"], 0),
              (config["aug_shift"], 0), (config["aug_gamma"], 1), (config["aug_contrast"], 1),
              (config["aug_brightness"], 0)]
    for column, (half_width, centre) in zip(draws.T, bounds):
        assert column.min() >= centre - half_width and column.max() <= centre + half_width
        assert column.min() < centre - 0.95 * half_width and column.max() > centre + 0.95 * half_width
    no_ranges = {**config, **{key: 0.0 for key in config if key.startswith("aug_")}}
    off = nb["draw_augmentation"](np.random.default_rng(0), no_ranges)
    np.testing.assert_array_equal(off, aug_row().numpy()[0])  # every range at 0: the identity


def test_identity_parameters_leave_the_input_unchanged(nb):
    images = torch.from_numpy(np.stack([smooth_image(48, seed) for seed in range(7)]))[None, :, None]
    mask = torch.ones(1, 7, dtype=torch.bool)
    torch.testing.assert_close(nb["to_model_input"](images, aug_row(), mask), nb["to_model_input"](images),
                               atol=1e-5, rtol=0)


def test_device_warp_matches_opencv_warp_affine(nb):
    size = 96
    base = smooth_image(size)
    x = torch.from_numpy(base).float().div(255).view(1, 1, 1, size, size)
    mask = torch.ones(1, 1, dtype=torch.bool)
    for angle, scale, sx, sy in [(7.5, 1.08, 0.05, -0.03), (-10.0, 0.9, -0.06, 0.02), (90.0, 1.0, 0.0, 0.0)]:
        out = nb["augment_on_device"](x, aug_row(angle_deg=angle, scale=scale, shift_x=sx, shift_y=sy), mask, size)
        affine = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), angle, scale)
        affine[:, 2] += np.array([sx, sy]) * size
        expected = cv2.warpAffine(base.astype(np.float32) / 255, affine, (size, size), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        inner = slice(size // 5, size - size // 5)  # away from the border, where both pad with black
        diff = np.abs(out[0, 0, 0].numpy() - expected)[inner, inner]
        assert diff.max() < 0.01 and diff.mean() < 0.002, (angle, diff.max(), diff.mean())
    # exact directions: 90 degrees is numpy's rot90 (counter-clockwise on screen), a 3-pixel shift moves right
    rotated = nb["augment_on_device"](x, aug_row(angle_deg=90.0), mask, size)[0, 0, 0].numpy()
    np.testing.assert_allclose(rotated, np.rot90(base).astype(np.float32) / 255, atol=1e-4)
    shifted = nb["augment_on_device"](x, aug_row(shift_x=3 / size), mask, size)[0, 0, 0].numpy()
    np.testing.assert_allclose(shifted[:, 3:], base[:, :-3].astype(np.float32) / 255, atol=1e-5)
    assert np.all(shifted[:, :3] == 0)


def test_device_intensity_matches_hand_formula_and_keeps_padding_black(nb):
    values = torch.tensor([0, 51, 102, 204, 255], dtype=torch.uint8)
    images = values.view(1, 5, 1, 1, 1).expand(1, 5, 1, 8, 8).clone()
    mask = torch.tensor([[True, True, True, True, False]])  # the last slice is padding
    gamma, contrast, brightness = 1.2, 1.3, 0.2
    out = nb["augment_on_device"](images.float() / 255, aug_row(gamma=gamma, contrast=contrast,
                                                                  brightness=brightness), mask, 8)
    for k, value in enumerate(values.tolist()[:4]):
        expected = min(max(((value / 255) ** gamma - 0.5) * contrast + 0.5 + brightness, 0.0), 1.0)
        assert out[0, k].flatten().numpy() == pytest.approx(np.full(64, expected), abs=1e-5)
    assert out[0, 3].max().item() == 1.0  # 204 brightened past white: clipped at 1
    assert out[0, 4].abs().max().item() == 0.0  # padded slice stays black despite the brightness shift


def test_augmentation_applies_one_transform_to_all_slices(nb, config):
    size = config["img_size"]
    base = smooth_image(size)
    images = torch.from_numpy(np.repeat(base[None, None, None], 7, axis=1))  # (1, 7, 1, S, S), equal slices
    mask = torch.ones(1, 7, dtype=torch.bool)
    for epoch in range(4):
        aug = torch.from_numpy(nb["draw_augmentation"](np.random.default_rng([0, epoch, 0]), config))[None]
        out = nb["to_model_input"](images, aug, mask)
        for j in range(1, 7):
            torch.testing.assert_close(out[0, j], out[0, 0], atol=0, rtol=0)
        plain = nb["to_model_input"](images)
        assert (out[0, 0] - plain[0, 0]).abs().gt(0.02).float().mean() > 0.5  # really transformed


def test_training_batches_carry_aug_and_evaluation_batches_do_not(nb, cache, config):
    kept, images, masks, _ = cache
    device = torch.device("cpu")
    train = nb["make_loader"](nb["RSNADatasetV9"](kept, images, masks, config, train=True), config, device, True,
                              generator=torch.Generator().manual_seed(0))
    batch = next(iter(train))
    assert batch["aug"].shape == (config["batch_size"], 7)
    side, size = nb["crop_side"](config), config["img_size"]
    assert batch["image"].shape == (config["batch_size"], 7, 1, side, side)  # warped and cropped on the device
    evaluation = nb["make_loader"](nb["RSNADatasetV9"](kept, images, masks, config, train=False), config, device,
                                   False)
    batch = next(iter(evaluation))
    assert "aug" not in batch and batch["image"].shape[-2:] == (size, size)  # the centre crop only


# ------------------------------------------------------------------------------- 9. crop near a border
def _fake_header(rows, cols, spacing):
    ds = Dataset()
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # sagittal, as the series here
    ds.ImagePositionPatient = [12.5, -80.0, 95.0]
    ds.PixelSpacing = [spacing, spacing]
    ds.Rows, ds.Columns = rows, cols
    return ds


@pytest.mark.parametrize("corner", ["top-left", "bottom-right"])
def test_crop_slice_at_a_corner_pads_black_outside(nb, config, corner):
    rows, cols, spacing, size = 80, 100, 0.5, 64
    image = np.random.default_rng(1).integers(1, 256, (rows, cols), dtype=np.uint8)  # no black pixel inside
    ds = _fake_header(rows, cols, spacing)
    cfg = {**config, "img_size": size, "crop_mm": size * spacing}  # one output pixel per input pixel
    side = nb["crop_side"](cfg)  # the cached crop: the field of view plus the margin, at the same scale
    half = side // 2
    if corner == "top-left":
        out = nb["crop_slice"](image, ds, point_mm(ds, 0, 0), cfg)
        inner, outer_rows, outer_cols = out[half:, half:], out[:half], out[:, :half]
        expected = image[:half, :half]
    else:
        out = nb["crop_slice"](image, ds, point_mm(ds, cols - 1, rows - 1), cfg)
        inner, outer_rows, outer_cols = out[:half + 1, :half + 1], out[half + 1:], out[:, half + 1:]
        expected = image[-(half + 1):, -(half + 1):]
    assert out.shape == (side, side) and out.dtype == np.uint8
    np.testing.assert_array_equal(inner, expected)
    assert (outer_rows == 0).all() and (outer_cols == 0).all()


def test_crop_slice_on_a_real_slice_at_its_corner(nb, config, one_file):
    path, ds, _ = one_file
    image = nb["read_slice"](path, config)
    out = nb["crop_slice"](image, ds, point_mm(ds, 0, 0), config)
    half = nb["crop_side"](config) // 2
    assert (out[: half - 1] == 0).all() and (out[:, : half - 1] == 0).all()
    assert out[half + 1:, half + 1:].mean() > 5 and out.std() > 0

