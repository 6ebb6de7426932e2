"""Issue 12: real series are messier than the clean generated set. Each test copies one generated Sagittal T2/STIR
series, gives it one real-data quirk (pydicom read / modify / save) and runs the notebook's `preprocess_series` on
it. Expected stacks are built here from the files themselves: the slice order from ImagePositionPatient, the crops
through the notebook's own `read_slice` / `crop_slice` (tested in test_dataset.py).
"""

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from make_demo_studies import make_study_set  # tools/ is put on sys.path by conftest.py
from pydicom.uid import ExplicitVRLittleEndian

HALF = 3  # 7 slices: the annotated one and 3 on each side


@pytest.fixture(scope="module")
def messy(nb, tmp_path_factory):
    """A 6-study set and its sample table; the series picked have their annotated slice >= 4 slices from
    either edge, so a neighbour can go missing inside the series."""
    root = tmp_path_factory.mktemp("messy")
    make_study_set(root, n_studies=6, seed=3)
    cfg = {**nb["CONFIG"], "data_root": str(root)}
    samples, _ = nb["build_sample_table"](cfg)
    interior = []
    for series_id, rows in samples.groupby("series_id"):
        names = ordered_names(Path(rows["path"].iloc[0]).parent)
        ranks = [names.index(f"{i}.dcm") for i in rows["instance_number"]]
        if min(ranks) >= HALF + 1 and max(ranks) < len(names) - HALF - 1:
            interior.append(series_id)
    assert len(interior) >= 2
    return cfg, samples, interior


def along_patient_axis(ds):
    """The ImagePositionPatient coordinate on the patient axis closest to the slice normal (sagittal: LPS x)."""
    iop = np.asarray(ds.ImageOrientationPatient, float)
    return float(ds.ImagePositionPatient[int(np.argmax(np.abs(np.cross(iop[:3], iop[3:]))))])


def ordered_names(folder):
    """File names of a series sorted by increasing patient-axis position (the documented convention)."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in Path(folder).glob("*.dcm")]
    return [Path(ds.filename).name for ds in sorted(headers, key=along_patient_axis)]


def copy_series(messy, tmp_path, which=0):
    """A private copy of one interior series and its sample rows (all levels)."""
    _, samples, interior = messy
    rows = samples[samples["series_id"] == interior[which]].copy()
    folder = tmp_path / str(interior[which])
    shutil.copytree(Path(rows["path"].iloc[0]).parent, folder)
    return folder, rows


def run(nb, folder, rows, config):
    ids, stacks, masks, issues = nb["preprocess_series"]((str(folder), rows, config))
    assert not isinstance(issues, str), f"the whole series failed: {issues}"
    return stacks, masks, pd.DataFrame(issues, columns=nb["ISSUE_COLUMNS"])


def point_mm(ds, x, y):
    iop = np.asarray(ds.ImageOrientationPatient, float)
    spacing_row, spacing_col = (float(v) for v in ds.PixelSpacing)
    return np.asarray(ds.ImagePositionPatient, float) + x * spacing_col * iop[:3] + y * spacing_row * iop[3:]


def window(names, anchor, missing=()):
    """The 7 expected file names around the anchor (None: padding or a masked slice)."""
    rank = names.index(anchor)
    return [names[r] if 0 <= r < len(names) and names[r] not in missing else None
            for r in range(rank - HALF, rank + HALF + 1)]


def check_stack(nb, folder, stack, mask, expected, anchor_ds, x, y, config):
    """The stack holds exactly the expected slices (crop of each file at the annotated point) and black elsewhere."""
    point = point_mm(anchor_ds, x, y)
    np.testing.assert_array_equal(mask, [name is not None for name in expected])
    for j, name in enumerate(expected):
        if name is None:
            assert (stack[j] == 0).all()
        else:
            ds = pydicom.dcmread(folder / name, stop_before_pixels=True)
            crop = nb["crop_slice"](nb["read_slice"](folder / name, config), ds, point, config)
            np.testing.assert_array_equal(stack[j], crop, err_msg=f"slice {j}: {name}")


def rewrite(path, change):
    """Read a DICOM file, change it (header and/or pixels), save it uncompressed."""
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    change(ds)
    ds.save_as(path)


def set_pixels(ds, pixels):
    ds.PixelData = np.ascontiguousarray(pixels, np.uint16).tobytes()
    ds.Rows, ds.Columns = pixels.shape
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def anchor_of(folder, rows, k=0):
    row = rows.iloc[k]
    return f"{row['instance_number']}.dcm", pydicom.dcmread(folder / f"{row['instance_number']}.dcm"), row


def check_every_stack(nb, folder, rows, stacks, masks, names, config, missing=()):
    """Every row's stack holds its anchor's 7-slice window of `names` (files in `missing` masked)."""
    for k in range(len(rows)):
        anchor, ds, row = anchor_of(folder, rows, k)
        check_stack(nb, folder, stacks[k], masks[k], window(names, anchor, missing), ds, row["x"], row["y"], config)


# --------------------------------------------------------------------------- point 2: slices without geometry
@pytest.mark.parametrize("tag", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_slice_without_geometry_far_from_samples_is_skipped_not_the_series(nb, messy, tmp_path, tag):
    config = messy[0]
    folder, rows = copy_series(messy, tmp_path)
    names = ordered_names(folder)
    far = names[0]  # the series' first slice: no sample's neighbour
    rewrite(folder / far, lambda ds: delattr(ds, tag))
    stacks, masks, issues = run(nb, folder, rows, config)
    assert issues[["file", "what"]].values.tolist() == [[far, "slice skipped"]]
    assert str(folder / far) in issues["reason"].iloc[0]  # the message names the file
    check_every_stack(nb, folder, rows, stacks, masks, names, config)


def test_neighbour_without_geometry_is_a_masked_slice(nb, messy, tmp_path):
    config = messy[0]
    folder, rows = copy_series(messy, tmp_path)
    names = ordered_names(folder)
    anchor, _, _ = anchor_of(folder, rows)
    neighbour = names[names.index(anchor) + 2]
    rewrite(folder / neighbour, lambda ds: delattr(ds, "ImagePositionPatient"))
    stacks, masks, issues = run(nb, folder, rows, config)
    assert len(issues[issues["what"] == "sample dropped"]) == 0
    masked = issues[issues["what"] == "slice masked"]
    expected_masked = sum(neighbour in window(names, f"{i}.dcm") for i in rows["instance_number"])
    assert expected_masked >= 1 and len(masked) == expected_masked and (masked["file"] == neighbour).all()
    assert issues.loc[issues["what"] == "slice skipped", "file"].tolist() == [neighbour]
    check_every_stack(nb, folder, rows, stacks, masks, names, config, missing={neighbour})


def test_annotated_slice_without_geometry_drops_only_its_own_samples(nb, messy, tmp_path):
    config = messy[0]
    folder, rows = copy_series(messy, tmp_path)
    names = ordered_names(folder)
    anchor, _, _ = anchor_of(folder, rows)
    other = names[names.index(anchor) + 1]
    rows = rows.copy()
    moved = rows.index[0]
    rows.loc[moved, "instance_number"] = int(Path(other).stem)  # one level annotated on the next slice
    rewrite(folder / anchor, lambda ds: delattr(ds, "PixelSpacing"))
    stacks, masks, issues = run(nb, folder, rows, config)
    dropped = issues[issues["what"] == "sample dropped"]
    assert sorted(dropped["level"]) == sorted(rows["level"].iloc[1:]) and (dropped["file"] == anchor).all()
    assert dropped["reason"].str.contains(str(folder / anchor), regex=False).all()
    assert dropped["reason"].str.contains("PixelSpacing").all()
    assert not masks[1:].any() and (stacks[1:] == 0).all()
    _, ds, row = anchor_of(folder, rows, 0)
    check_stack(nb, folder, stacks[0], masks[0], window(names, other, missing={anchor}), ds, row["x"], row["y"],
                config)


# --------------------------------------------------------------------------- point 12: a missing neighbour file
def test_missing_neighbour_file_is_a_masked_gap_not_a_shifted_stack(nb, messy, tmp_path):
    config = messy[0]
    folder, rows = copy_series(messy, tmp_path)
    names = ordered_names(folder)
    anchor, _, _ = anchor_of(folder, rows)
    lost = names[names.index(anchor) - 2]
    (folder / lost).unlink()
    stacks, masks, issues = run(nb, folder, rows, config)
    check_every_stack(nb, folder, rows, stacks, masks, names, config, missing={lost})
    assert set(issues["what"]) == {"slice masked"} and (issues["file"] == lost).all()
    assert issues["reason"].str.contains("file missing").all() and len(issues) == len(rows)


def test_planned_gap_with_contiguous_file_numbers_is_padding_not_an_issue(nb, messy, tmp_path):
    """As between the per-disc stacks of an axial series: no file number is missing, so nothing is reported lost,
    but the positions inside the gap stay empty instead of pulling in far slices."""
    config = messy[0]
    folder, rows = copy_series(messy, tmp_path)
    names = ordered_names(folder)
    anchor, _, _ = anchor_of(folder, rows)
    x = [float(pydicom.dcmread(folder / n, stop_before_pixels=True).ImagePositionPatient[0]) for n in names]
    step = float(np.median(np.diff(x)))
    def move(ds):
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0] + 2 * step, *ds.ImagePositionPatient[1:]]

    for name in names[names.index(anchor) + 2:]:  # two positions left empty beyond the anchor's next slice
        rewrite(folder / name, move)
    stacks, masks, issues = run(nb, folder, rows, config)
    assert len(issues) == 0
    rank = names.index(anchor)
    expected = window(names, anchor)[:HALF + 2] + [None, None]  # slots +2 and +3 fall in the gap
    assert expected[HALF + 1] == names[rank + 1]
    for k in range(len(rows)):
        _, ds, row = anchor_of(folder, rows, k)
        check_stack(nb, folder, stacks[k], masks[k], expected, ds, row["x"], row["y"], config)


# --------------------------------------------------------------------------- point 3: a repeated stack
def test_repeated_stack_gives_one_slice_per_position_from_the_anchors_acquisition(nb, messy, tmp_path):
    """A second acquisition at the same positions (half the image size, other instance numbers, other contrast);
    a sample annotated on either stack gets 7 distinct positions, all from its own stack."""
    config = messy[0]
    folder, rows = copy_series(messy, tmp_path)
    names = ordered_names(folder)
    offset = max(int(Path(n).stem) for n in names) + 10
    for name in names:
        second = folder / f"{int(Path(name).stem) + offset}.dcm"
        shutil.copy(folder / name, second)

        def halve(ds):
            set_pixels(ds, (ds.pixel_array[::2, ::2] // 2))  # pixel (0, 0) stays at ImagePositionPatient
            ds.PixelSpacing = [2 * float(v) for v in ds.PixelSpacing]
            ds.InstanceNumber += offset
            ds.AcquisitionNumber = 2

        rewrite(second, halve)
    rows = rows.copy()
    second = rows.index[1]  # level 2 annotated on the second stack
    rows.loc[second, "instance_number"] += offset
    rows.loc[second, ["x", "y"]] = rows.loc[second, ["x", "y"]] / 2
    stacks, masks, issues = run(nb, folder, rows, config)
    assert len(issues) == 0
    second_names = [f"{int(Path(n).stem) + offset}.dcm" for n in names]
    for k in range(len(rows)):
        anchor, ds, row = anchor_of(folder, rows, k)
        own = second_names if k == 1 else names
        check_stack(nb, folder, stacks[k], masks[k], window(own, anchor), ds, row["x"], row["y"], config)


# --------------------------------------------------------------------------- point 4: slice order
def flip_normal(folder, rows):
    """Mirror every image left-right and negate the row direction: the same anatomy in patient space, the slice
    normal reversed. The annotations follow the mirrored columns."""
    for path in folder.glob("*.dcm"):
        def flip(ds):
            iop = np.asarray(ds.ImageOrientationPatient, float)
            spacing_col = float(ds.PixelSpacing[1])
            ds.ImagePositionPatient = list(np.asarray(ds.ImagePositionPatient, float)
                                           + (ds.Columns - 1) * spacing_col * iop[:3])
            ds.ImageOrientationPatient = [*(-iop[:3]), *iop[3:]]
            set_pixels(ds, ds.pixel_array[:, ::-1])

        rewrite(path, flip)
    columns = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).Columns
    return rows.assign(x=columns - 1 - rows["x"])


def test_slices_ordered_by_increasing_patient_x_whatever_the_normal(nb, messy, tmp_path):
    config = messy[0]
    folder, rows = copy_series(messy, tmp_path / "as_written")
    flipped, flipped_rows = copy_series(messy, tmp_path / "flipped")
    flipped_rows = flip_normal(flipped, flipped_rows)
    for where, series_rows in ((folder, rows), (flipped, flipped_rows)):
        headers = {Path(p).name: pydicom.dcmread(p, stop_before_pixels=True) for p in where.glob("*.dcm")}
        normal_x = {np.sign(np.cross(*np.reshape(ds.ImageOrientationPatient, (2, 3)))[0]) for ds in headers.values()}
        assert len(normal_x) == 1 and (normal_x == {-1.0}) == (where == folder)  # the two normals differ
        by_x = [name for name, _ in sorted(headers.items(), key=lambda item: item[1].ImagePositionPatient[0])]
        stacks, masks, issues = run(nb, where, series_rows, config)
        assert len(issues) == 0
        for k in range(len(series_rows)):
            anchor, ds, row = anchor_of(where, series_rows, k)
            expected = window(by_x, anchor)
            check_stack(nb, where, stacks[k], masks[k], expected, ds, row["x"], row["y"], config)
            x = [float(headers[n].ImagePositionPatient[0]) for n in expected]
            assert x == sorted(x)  # slice j + 1 lies to the patient's left of slice j


# --------------------------------------------------------------------------- point 5: file name vs InstanceNumber
def test_headers_keyed_by_file_name_not_the_instance_number_tag(nb, messy, tmp_path):
    config = messy[0]
    folder, rows = copy_series(messy, tmp_path)
    names = ordered_names(folder)
    anchor, _, _ = anchor_of(folder, rows)
    neighbour = names[names.index(anchor) + 1]
    tags = {anchor: 9000, neighbour: int(Path(anchor).stem)}  # a tag equal to another file's name, and a stray one

    for name, number in tags.items():
        rewrite(folder / name, lambda ds, number=number: setattr(ds, "InstanceNumber", number))
    stacks, masks, issues = run(nb, folder, rows, config)
    assert len(issues) == 0
    check_every_stack(nb, folder, rows, stacks, masks, names, config)


# --------------------------------------------------------------------------- point 11: points outside the image
def test_point_far_outside_is_a_dropped_sample_and_a_little_outside_stays(nb, messy, tmp_path):
    config = messy[0]
    folder, rows = copy_series(messy, tmp_path)
    names = ordered_names(folder)
    ds = pydicom.dcmread(folder / f"{rows['instance_number'].iloc[0]}.dcm", stop_before_pixels=True)
    spacing_col = float(ds.PixelSpacing[1])
    tolerance = nb["EDGE_TOLERANCE"] * config["crop_mm"] / spacing_col  # pixels beyond the edge still accepted
    assert tolerance > 3
    points = [(5000.0, 40.0), (40.0, -300.0), (np.nan, 40.0), (-3.0, 40.0), (-tolerance + 1, 40.0),
              (-tolerance - 1, 40.0), (ds.Columns - 1 + tolerance - 1, 40.0)]
    rows = pd.concat([rows.iloc[:1]] * len(points), ignore_index=True)
    rows["level"] = [f"p{k}" for k in range(len(points))]
    rows[["x", "y"]] = points
    stacks, masks, issues = run(nb, folder, rows, config)
    dropped = issues[issues["what"] == "sample dropped"].set_index("level")["reason"]
    assert sorted(dropped.index) == ["p0", "p1", "p2", "p5"] and len(issues) == 4
    assert dropped[["p0", "p1", "p5"]].str.contains("outside the").all()
    assert "not a number" in dropped["p2"]
    for k in (0, 1, 2, 5):
        assert not masks[k].any() and (stacks[k] == 0).all()
    for k in (3, 4, 6):  # kept: real crops, partly black beyond the edge
        anchor, ds, row = anchor_of(folder, rows, k)
        check_stack(nb, folder, stacks[k], masks[k], window(names, anchor), ds, row["x"], row["y"], config)
        assert stacks[k, HALF].max() > 0


# --------------------------------------------------------------------------- point 14: truncated neighbour
@pytest.mark.parametrize("compressed", [True, False])
def test_truncated_neighbour_is_masked_and_reported_as_truncated(nb, messy, tmp_path, compressed):
    config = messy[0]
    folder, rows = copy_series(messy, tmp_path)
    names = ordered_names(folder)
    anchor, _, _ = anchor_of(folder, rows)
    neighbour = folder / names[names.index(anchor) + 1]
    if not compressed:
        rewrite(neighbour, lambda ds: None)  # saved uncompressed
    elif not pydicom.dcmread(neighbour, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed:
        ds = pydicom.dcmread(neighbour)
        ds.compress(pydicom.uid.RLELossless, ds.pixel_array, generate_instance_uid=False)
        ds.save_as(neighbour)
    data = neighbour.read_bytes()
    neighbour.write_bytes(data[: len(data) * 2 // 3])
    stacks, masks, issues = run(nb, folder, rows, config)
    assert set(issues["what"]) == {"slice masked"} and (issues["file"] == neighbour.name).all()
    assert issues["reason"].str.contains("truncated").all() and issues["reason"].str.contains(str(neighbour)).all()
    assert not issues["reason"].str.contains("no 'Pixel Data'").any()
    check_every_stack(nb, folder, rows, stacks, masks, names, config, missing={neighbour.name})


# --------------------------------------------------------------------------- point 9: one scale per series
def test_series_percentile_keeps_a_samples_slices_on_one_scale_despite_an_outlier(nb, messy, tmp_path):
    config = {**messy[0], "intensity": "series_percentile"}
    _, samples, interior = messy
    brightest = [pydicom.dcmread(samples.loc[samples["series_id"] == s, "path"].iloc[0]).pixel_array.max()
                 for s in interior]
    folder, rows = copy_series(messy, tmp_path, which=int(np.argmin(brightest)))  # the darkest series
    rows = rows.iloc[:1]  # one sample: the series' decoded slices are its 7
    names = ordered_names(folder)
    anchor, anchor_ds, row = anchor_of(folder, rows)
    assert anchor_ds.pixel_array.max() < 2000  # the outliers below are far brighter than the anatomy
    bright = names[names.index(anchor) + 1]

    def add_outliers(ds):
        pixels = ds.pixel_array.copy()
        pixels[5:9, 5:9] = 4095  # 16 pixels in a corner
        set_pixels(ds, pixels)

    rewrite(folder / bright, add_outliers)
    stacks, masks, issues = run(nb, folder, rows, config)
    assert len(issues) == 0 and masks[0].all()
    # expected, by hand: one (lo, hi) from the 0.5 / 99.5 percentiles of the 7 slices' modality values
    expected = window(names, anchor)
    pixels = {n: pydicom.dcmread(folder / n) for n in expected}
    pixels = {n: (ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).astype(np.float32)
              for n, ds in pixels.items()}
    lo, hi = np.percentile(np.concatenate([p.ravel() for p in pixels.values()]), config["series_percentiles"])
    assert config["series_percentiles"] == (0.5, 99.5)
    clahe = cv2.createCLAHE(clipLimit=config["clahe_clip"], tileGridSize=(config["clahe_grid"],) * 2)
    point = point_mm(anchor_ds, row["x"], row["y"])
    for j, name in enumerate(expected):
        mapped = np.round(np.clip((pixels[name] - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
        crop = nb["crop_slice"](clahe.apply(mapped), pydicom.dcmread(folder / name, stop_before_pixels=True),
                                point, config)
        assert np.mean(stacks[0, j] != crop) < 0.002, name  # float rounding may move a pixel by one level
    # the outlier slice: per-slice min-max squeezes the anatomy; the series range spreads it
    per_slice, _ = nb["map_intensity"](pixels[bright], None, {**config, "intensity": "minmax"})
    per_series, _ = nb["map_intensity"](pixels[bright], None, config, (lo, hi))
    anatomy = np.ones(per_slice.shape, bool)
    anatomy[5:9, 5:9] = False
    assert np.percentile(per_slice[anatomy], 99) < 128 and len(np.unique(per_slice[anatomy])) < 128
    assert np.percentile(per_series[anatomy], 99) > 200 and len(np.unique(per_series[anatomy])) > 200


# --------------------------------------------------------------------------- the generator's realistic preset
@pytest.fixture(scope="module")
def realistic(nb, tmp_path_factory):
    """12 studies under make_demo_studies.REALISTIC (every quirk at least once), cached once at img_size 64."""
    from make_demo_studies import REALISTIC

    root = tmp_path_factory.mktemp("realistic")
    summary = make_study_set(root, n_studies=12, seed=0, **REALISTIC)
    cfg = {**nb["CONFIG"], "data_root": str(root), "cache_dir": str(root / "cache")}
    samples, _ = nb["build_sample_table"](cfg)
    kept, images, masks, issues = nb["build_cache"](samples, cfg, 0)
    return summary["quirks"], samples, kept, images, masks, issues, cfg


def test_realistic_preset_drops_only_the_samples_that_cannot_be_built(realistic):
    quirks, samples, kept, _, _, issues, _ = realistic
    assert list(issues.columns) == ["study_id", "series_id", "condition", "level", "file", "what", "reason"]
    dropped = issues[issues["what"] == "sample dropped"]
    level_name = {lv.upper().replace("_", "/"): lv for lv in samples["level"].unique()}
    unusable = {(q["study_id"], level_name[q["level"]]) for q in quirks["bad_coordinates"] if q["kind"] != "edge"}
    in_table = {(s, lv) for s, lv in zip(samples["study_id"], samples["level"])}
    assert set(zip(dropped["study_id"], dropped["level"])) == unusable & in_table  # far, negative or NaN points
    assert len(unusable & in_table) >= 2 and len(kept) == len(samples) - len(dropped)
    assert {q["study_id"] for q in quirks["bad_coordinates"] if q["kind"] == "edge"} <= set(kept["study_id"])


def test_realistic_preset_records_every_skipped_and_masked_slice_with_its_file(realistic):
    quirks, samples, kept, images, masks, issues, _ = realistic
    rel = {name: {(q["study_id"], Path(q["file"]).name): q for q in quirks[name]}
           for name in ("missing_geometry", "truncated_file", "missing_slice")}
    skipped = issues[issues["what"] == "slice skipped"]
    assert set(zip(skipped["study_id"], skipped["file"])) == set(rel["missing_geometry"])
    masked = issues[issues["what"] == "slice masked"]
    recorded = set(zip(masked["study_id"], masked["file"]))
    checked = 0
    for name, items in rel.items():
        for (study, file), q in items.items():
            series_kept = kept[kept["series_id"] == q["series_id"]]
            if q.get("neighbour", True):  # a neighbour of the annotated slice: its slot is black in every sample
                slot = HALF - q["offset"]  # the generator's slice index runs against increasing patient x
                assert len(series_kept) and not masks[series_kept["cache_index"], slot].any(), (name, q)
                assert (np.asarray(images[series_kept["cache_index"], slot]) == 0).all()
                assert (study, file) in recorded or name != "truncated_file", (name, q)
                checked += 1
    assert checked >= 3
    assert masked.loc[masked["file"].isin([Path(q["file"]).name for q in quirks["truncated_file"]]),
                      "reason"].str.contains("truncated").all()


def test_realistic_preset_repeated_stacks_give_the_annotated_acquisitions_slices(nb, realistic):
    """Each slice of a sample on a repeated-stack series is the annotated stack's slice at that position."""
    quirks, _, kept, images, masks, _, config = realistic
    checked = 0
    for q in quirks["repeated_stack"]:
        stack = q["stacks"][q["annotated_stack"] - 1]  # instance number of each anatomical slice index
        for row in kept[kept["series_id"] == q["series_id"]].itertuples():
            folder = Path(row.path).parent
            mid = stack.index(row.instance_number)
            anchor = pydicom.dcmread(row.path, stop_before_pixels=True)
            expected = [f"{stack[mid + HALF - j]}.dcm" if 0 <= mid + HALF - j < len(stack) else None for j in range(7)]
            check_stack(nb, folder, np.asarray(images[row.cache_index]), masks[row.cache_index], expected, anchor,
                        row.x, row.y, config)
            checked += 1
    assert checked >= 4 and {q["annotated_stack"] for q in quirks["repeated_stack"]} >= {2}


def test_realistic_preset_flipped_and_oblique_series_run_along_increasing_patient_x(nb, realistic):
    quirks, _, kept, images, masks, _, config = realistic
    messy_files = {q["series_id"] for name in ("repeated_stack", "missing_slice", "truncated_file", "missing_geometry")
                   for q in quirks[name]}
    series = {q["series_id"] for name in ("flipped_normal", "oblique") for q in quirks[name]
              if q["series_description"] == "Sagittal T2/STIR"} - messy_files
    checked = 0
    for row in kept[kept["series_id"].isin(series)].itertuples():
        folder = Path(row.path).parent
        anchor = pydicom.dcmread(row.path, stop_before_pixels=True)
        check_stack(nb, folder, np.asarray(images[row.cache_index]), masks[row.cache_index],
                    window(ordered_names(folder), Path(row.path).name), anchor, row.x, row.y, config)
        checked += 1
    assert checked >= 5


# --------------------------------------------------------------------------- issue 17: one slice failing to map or crop
def drop_window(ds):
    del ds.WindowCenter, ds.WindowWidth


def test_neighbour_without_window_tags_under_dicom_intensity_is_a_masked_slice(nb, messy, tmp_path):
    config = {**messy[0], "intensity": "dicom"}
    folder, rows = copy_series(messy, tmp_path)
    names = ordered_names(folder)
    anchor, _, _ = anchor_of(folder, rows)
    neighbour = names[names.index(anchor) - 1]
    rewrite(folder / neighbour, drop_window)
    stacks, masks, issues = run(nb, folder, rows, config)
    assert (issues["what"] == "slice masked").all() and (issues["file"] == neighbour).all()
    assert len(issues) == sum(neighbour in window(names, f"{i}.dcm") for i in rows["instance_number"]) >= 1
    assert issues["reason"].str.contains("WindowCenter").all()
    assert issues["reason"].str.contains(str(folder / neighbour), regex=False).all()  # names the file
    check_every_stack(nb, folder, rows, stacks, masks, names, config, missing={neighbour})


def test_annotated_slice_without_window_tags_drops_only_its_own_samples(nb, messy, tmp_path):
    config = {**messy[0], "intensity": "dicom"}
    folder, rows = copy_series(messy, tmp_path)
    names = ordered_names(folder)
    anchor, _, _ = anchor_of(folder, rows)
    other = names[names.index(anchor) + 1]
    rows = rows.copy()
    rows.loc[rows.index[0], "instance_number"] = int(Path(other).stem)  # one level annotated on the next slice
    rewrite(folder / anchor, drop_window)
    stacks, masks, issues = run(nb, folder, rows, config)
    dropped = issues[issues["what"] == "sample dropped"]
    assert sorted(dropped["level"]) == sorted(rows["level"].iloc[1:]) and (dropped["file"] == anchor).all()
    assert dropped["reason"].str.contains("WindowCenter").all()
    masked = issues[issues["what"] == "slice masked"]
    assert masked[["level", "file"]].values.tolist() == [[rows["level"].iloc[0], anchor]]
    assert not masks[1:].any() and (stacks[1:] == 0).all()
    _, ds, row = anchor_of(folder, rows, 0)
    check_stack(nb, folder, stacks[0], masks[0], window(names, other, missing={anchor}), ds, row["x"], row["y"],
                config)


def test_a_crop_that_fails_masks_that_slice_of_that_sample_only(nb, messy, tmp_path, monkeypatch):
    """The crop is per (sample, slice): one failing costs that slice of that sample (or the sample, when it is
    the annotated slice), never the series."""
    config = messy[0]
    folder, rows = copy_series(messy, tmp_path)
    names = ordered_names(folder)
    anchor, _, first = anchor_of(folder, rows)
    neighbour = names[names.index(anchor) + 1]
    crop = nb["crop_slice"]

    def failing(image, ds, point, config):
        if Path(ds.filename).name == neighbour and np.allclose(point, point_mm(pydicom.dcmread(
                folder / anchor, stop_before_pixels=True), first["x"], first["y"])):
            raise cv2.error("simulated OpenCV failure")
        return crop(image, ds, point, config)

    monkeypatch.setitem(nb, "crop_slice", failing)
    stacks, masks, issues = run(nb, folder, rows, config)
    assert issues[["level", "file", "what"]].values.tolist() == [[first["level"], neighbour, "slice masked"]]
    assert "simulated OpenCV failure" in issues["reason"].iloc[0]
    monkeypatch.setitem(nb, "crop_slice", crop)
    _, ds, row = anchor_of(folder, rows, 0)
    check_stack(nb, folder, stacks[0], masks[0], window(names, anchor, missing={neighbour}), ds, row["x"], row["y"],
                config)
    for k in range(1, len(rows)):
        other, ds, row = anchor_of(folder, rows, k)
        check_stack(nb, folder, stacks[k], masks[k], window(names, other), ds, row["x"], row["y"], config)


def test_realistic_preset_under_dicom_intensity_masks_the_slice_without_window_tags(nb, realistic):
    """Through build_cache: the generator's missing_window file is a masked slice in every sample of its series
    that reaches it, named in the issues table; none of those samples is lost."""
    quirks, samples, _, _, _, _, config = realistic
    config = {**config, "intensity": "dicom", "cache_dir": str(Path(config["cache_dir"]) / "dicom")}
    hit = [q for q in quirks["missing_window"] if q["neighbour"]]
    assert hit
    series = samples[samples["series_id"].isin([q["series_id"] for q in hit])]
    kept, images, masks, issues = nb["build_cache"](series, config, 0)
    dropped = issues[issues["what"] == "sample dropped"]
    assert len(kept) == len(series) - len(dropped)
    assert not dropped["reason"].str.contains("WindowCenter|series failed").any()
    for q in hit:
        rows = kept[kept["series_id"] == q["series_id"]]
        masked = issues[(issues["file"] == Path(q["file"]).name) & (issues["what"] == "slice masked")]
        assert len(rows) and len(masked) >= 1 and masked["reason"].str.contains("WindowCenter").all()
        slot = HALF - q["offset"]  # the generator's slice index runs against increasing patient x
        assert not masks[rows["cache_index"], slot].any()
        assert (np.asarray(images[rows["cache_index"], slot]) == 0).all()
        assert masks[rows["cache_index"], HALF].all()  # the annotated slices are there


def test_realistic_preset_localiser_volumes_list_every_lost_slice_with_its_file(nb, realistic):
    """Issue 23 item 8: the localiser's volumes lose slices too (a file without geometry, a truncated file, a gap);
    volume_issues lists each with its file and reason, as the classifier's issues table does."""
    quirks, samples, _, _, _, _, cfg = realistic
    config = {**cfg, "loc_size": 64}
    jobs, _ = nb["annotated_series"](samples, cfg["data_root"])
    volumes = nb["read_volumes"](jobs, config, 1)
    issues = nb["volume_issues"]([(study, d, volumes[study]) for study, d, _ in jobs], "localiser")
    assert list(issues.columns) == nb["ISSUE_COLUMNS"]
    read = {(study, int(Path(d).name)) for study, d, _ in jobs}
    lost = issues[issues["what"] == "localiser slice lost"]
    listed = set(zip(lost["study_id"], lost["series_id"], lost["file"]))
    for name, cause in (("missing_geometry", ""), ("truncated_file", "truncated")):
        expected = {(q["study_id"], q["series_id"], Path(q["file"]).name) for q in quirks[name]
                    if (q["study_id"], q["series_id"]) in read}
        assert expected and expected <= listed, name
        rows = lost[[(s, f) in {(s, f) for s, _, f in expected} for s, f in zip(lost["study_id"], lost["file"])]]
        assert len(rows) == len(expected) and rows["reason"].str.len().gt(0).all()
        assert rows["reason"].str.contains(cause).all(), rows["reason"].tolist()
    gaps = lost[lost["reason"].str.startswith("gap in the slice positions")]
    missing = {(q["study_id"], Path(q["file"]).name) for q in quirks["missing_slice"]}
    assert {(s, f) for s, f in zip(gaps["study_id"], gaps["file"])} & missing  # a deleted file named as the gap
    # nothing else: the rows are exactly the volumes' own issues
    assert len(lost) == sum(len(v["issues"]) for v in volumes.values() if not isinstance(v, str))
