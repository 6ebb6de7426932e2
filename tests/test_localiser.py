"""Issue 19: the level localiser (learns the generated anatomy; a shuffled-target control does not) and the
classifier scored with predicted points beside oracle, through the notebook's own definitions on CPU."""

import ast

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from notebook_cells import NOTEBOOK, notebook_namespace
from pydicom.dataset import Dataset

CPU = torch.device("cpu")
LOC = {"loc_size": 64, "loc_channels": 8, "loc_epochs": 40, "loc_batch": 1, "loc_lr": 2e-3,  # ~35 s on 2 CPU cores
       "loc_sigma": 1.0}
MEDIAN_MM = 4.0  # median in-plane error on validation must be below this (64 px grid: ~4-5 mm per pixel)


def loc_namespace(root, out):
    """The notebook's definitions for a spinal-canal localiser run on `root` (4 folds, LOC's sizes)."""
    return notebook_namespace({"data_root": str(root), "output_dir": str(out), "img_size": 64, "num_workers": 0,
                               "backbone": "mobilenet_v3_small", "pretrained": "none",
                               "conditions": ["spinal_canal_stenosis"], "num_folds": 4, **LOC})


@pytest.fixture(scope="module")
def setup(loc_study_set, tmp_path_factory):
    nb = loc_namespace(loc_study_set, tmp_path_factory.mktemp("loc_run"))
    config = nb["CONFIG"]
    samples, _ = nb["build_sample_table"](config)
    return nb, config, nb["assign_folds"](samples, config)


@pytest.fixture(scope="module")
def trained(setup):
    nb, config, samples = setup
    return nb["train_localisers"](samples, config["train_folds"], config, CPU, 1)


def test_volume_follows_the_classifier_read_path(setup, loc_study_set):
    """Slices in anatomical order whatever the file order; every slot's file is the one stack_slots puts there."""
    nb, config, samples = setup
    summary_reversed = []
    for study, rows in samples.groupby("study_id"):
        series_dir = loc_study_set / "train_images" / str(study) / str(rows["series_id"].iloc[0])
        headers, skipped = nb["read_series_headers"](series_dir)
        anchor = int(rows["instance_number"].iloc[0])
        volume = nb["read_volume"](series_dir, config, anchor)
        slots = nb["stack_slots"](headers, skipped, anchor)
        assert volume["instance"].tolist() == [s if isinstance(s, int) else -1 for s in slots]
        assert volume["image"].shape == (len(slots), LOC["loc_size"], LOC["loc_size"]) and volume["valid"].all()
        x = [float(headers[i].ImagePositionPatient[0]) for i in volume["instance"]]
        assert np.all(np.diff(x) > 0)  # patient right to left
        summary_reversed.append(np.all(np.diff(volume["instance"]) < 0))
        # the annotated point maps onto the grid and back exactly
        target = nb["level_targets"](volume, rows)
        level = int(rows["level_idx"].iloc[0])
        j, u, v = target[level]
        assert volume["instance"][int(j)] == rows["instance_number"].iloc[0]
        np.testing.assert_allclose(nb["series_point"](volume, int(j), u, v), rows[["x", "y"]].iloc[0], atol=1e-9)
    assert any(summary_reversed)  # the set has a series whose instance numbers run against anatomy


def oblique_stack(xs, instances, tilt_deg, reversed_normal):
    """{instance: header} of parallel sagittal slices tilted by `tilt_deg` about the patient's z axis, the slice at
    xs[k] (patient x of its position) numbered instances[k]; the normal pointing to the patient's right (-x) when
    `reversed_normal`. Keys in the order given."""
    t = np.radians(tilt_deg)
    row = np.array([np.sin(t), np.cos(t), 0.0]) * (1 if reversed_normal else -1)
    headers = {}
    for x, instance in zip(xs, instances):
        ds = Dataset()
        ds.ImageOrientationPatient = [*row, 0.0, 0.0, -1.0]
        ds.ImagePositionPatient = [float(x), float(x) * np.tan(t) - 100.0, 60.0]  # along the tilted normal
        ds.PixelSpacing, ds.Rows, ds.Columns = [0.8, 0.8], 64, 64
        headers[instance] = ds
    return headers


def test_one_anatomical_order_for_the_classifier_and_the_localisers(setup):
    """Issue 30: anatomical_order is the one slice order. On a shuffled oblique stack numbered against anatomy
    (normal to the patient's right, file order, key order and instance numbers all scrambled), along the axis or
    along the normal it gives increasing patient x, the order stack_slots (the classifier, the localiser's volumes)
    and slice_ranks (the localisation metrics) use; the position along the normal is the hand formula."""
    nb = setup[0]
    rng = np.random.default_rng(3)
    xs = np.arange(9) * 4.0 - 16.0
    instances = [int(i) for i in rng.permutation(np.arange(1, 10) * 3)]
    order = [instances[k] for k in np.argsort(xs)]
    shuffled = rng.permutation(9)
    for reversed_normal in (True, False):
        headers = oblique_stack(xs[shuffled], [instances[k] for k in shuffled], 12.0, reversed_normal)
        assert [i for _, i in nb["anatomical_order"](headers)] == order
        normal = nb["slice_normal"](headers[order[0]])
        along = nb["anatomical_order"](headers, normal)
        assert [i for _, i in along] == order
        direction = normal * np.sign(normal[0])
        np.testing.assert_allclose([p for p, _ in along], [np.asarray(headers[i].ImagePositionPatient) @ direction
                                                           for i in order])
        assert nb["stack_slots"](headers, {}, order[4]) == order
        assert list(nb["slice_ranks"]("stack", {"stack": headers})) == order
    # an exact tie (a repeated position): the lower instance first, in both
    headers = oblique_stack([0.0, 4.0, 4.0, 8.0], [40, 31, 12, 5], 0.0, True)
    assert [i for _, i in nb["anatomical_order"](headers)] == [40, 12, 31, 5]
    assert list(nb["slice_ranks"]("tie", {"tie": headers})) == [40, 12, 31, 5]


def test_series_names_and_localiser_modes_live_only_in_the_tables(setup):
    """Issue 30: no code cell spells a series type outside CONDITION_SERIES, LOC_MODE and CONFIG (settings), and
    no code compares a localiser mode's name: the localiser, submission and run cells take both from the tables."""
    nb = setup[0]
    names = set(nb["CONDITION_SERIES"].values())
    tables = {"CONDITION_SERIES", "LOC_MODE", "CONFIG"}
    found, in_tables = [], 0
    for cell in nbformat.read(NOTEBOOK, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        for statement in ast.parse(cell.source).body:
            table = isinstance(statement, ast.Assign) and {getattr(t, "id", None) for t in statement.targets} & tables
            for node in ast.walk(statement):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                    in_tables += bool(table)
                    if not table:
                        found.append((getattr(statement, "name", "cell"), node.lineno, node.value))
                if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value in ("volume", "slice")
                                                         for c in [node.left, *node.comparators]):
                    found.append((getattr(statement, "name", "cell"), node.lineno, "a mode's name compared"))
    assert in_tables >= 2 * len(names)  # the walk does see the names where they belong
    assert not found, found
    assert {m.name for m in nb["LOC_MODE"].values()} == {"volume", "slice"}
    assert [nb["LOC_MODE"][s].maps(["a", "b"]) for s in ("Sagittal T1", "Axial T2")] == [10, 2]


def test_pick_series_rule(setup, tmp_path):
    nb = setup[0]
    for series, files in ((11, 3), (12, 5), (13, 5)):
        (tmp_path / "7" / str(series)).mkdir(parents=True)
        for i in range(files):
            (tmp_path / "7" / str(series) / f"{i}.dcm").write_bytes(b"")
    desc = pd.DataFrame({"study_id": [7, 7, 7, 7], "series_id": [11, 12, 13, 14],
                         "series_description": ["Sagittal T2/STIR"] * 3 + ["Sagittal T1"]})
    desc.loc[len(desc)] = [7, 15, "Coronal STIR"]  # an unknown description: never read
    (tmp_path / "7" / "15").mkdir()
    (tmp_path / "7" / "15" / "1.dcm").write_bytes(b"")
    picked = nb["pick_series"](desc, 7, tmp_path, ["Sagittal T2/STIR", "Sagittal T1"])
    # every series of a type, tried in this order: most files, then lowest id; a folder without files: none
    assert picked == {"Sagittal T2/STIR": [tmp_path / "7" / "12", tmp_path / "7" / "13", tmp_path / "7" / "11"],
                      "Sagittal T1": []}
    assert nb["pick_series"](desc, 8, tmp_path, ["Sagittal T2/STIR"]) == {"Sagittal T2/STIR": []}


def test_localiser_learns_the_anatomy_and_a_shuffled_control_does_not(setup, trained, loc_study_set):
    nb, config, samples = setup
    metrics = trained.metrics
    print(metrics.to_string())
    assert metrics.loc["all", "n"] >= 20  # fold 0's validation studies, every annotated level
    assert metrics.loc["all", "median mm"] < MEDIAN_MM
    assert metrics.loc["all", "slice within 1"] >= 0.9
    assert (config["output_dir"] and (nb["Path"](config["output_dir"]) / "fold0" / "localiser.pt").exists())
    # control: the same training with each training study given another study's targets
    jobs, rows_of = nb["annotated_series"](samples, loc_study_set)
    volumes = nb["read_volumes"](jobs, config, 1)
    targets = {s: nb["level_targets"](v, rows_of[s]) for s, v in volumes.items()}
    fold = samples.groupby("study_id")["fold"].first()
    train = [s for s in volumes if fold[s] != 0]
    shuffled = dict(zip(train, [targets[s] for s in np.random.default_rng(0).permutation(train)]))
    model, *_ = nb["train_localiser"](volumes, shuffled, train, config, CPU, config["seed"] + 100)
    val = [s for s in volumes if fold[s] == 0]
    predictions = {s: [(volumes[s], nb["localise"]([model], volumes[s], CPU, config))] for s in val}
    control = nb["localisation_metrics"](nb["localisation_table"](volumes, targets, predictions,
                                                                  nb["map_names"]([nb["SPINAL"]])))
    print(control.to_string())
    # measured (2026-12-07, seed 5 set, fold 0): median 1.8 mm, p90 3.1 mm, every slice exact (1.7 and 2.9 mm before
    # edge views, issue 28); control median 12.0 mm, p90 34.7 mm, 1 % of slices exact
    assert control.loc["all", "median mm"] > 3 * metrics.loc["all", "median mm"]
    assert control.loc["all", "p90 mm"] > 3 * metrics.loc["all", "p90 mm"]
    assert control.loc["all", "slice exact"] < metrics.loc["all", "slice exact"]


@pytest.fixture(scope="module")
def edge_set(tmp_path_factory):
    """The learning test's 24 studies (seed 5) with sagittal_top_edge on ~30 % of them (at least one in fold 0's
    validation studies): (root, ids of the edge-framed studies)."""
    from make_demo_studies import make_study_set

    root = tmp_path_factory.mktemp("rsna_edge")
    summary = make_study_set(root, n_studies=24, seed=5, quirks={"sagittal_top_edge": 0.3})
    return root, {item["study_id"] for item in summary["quirks"]["sagittal_top_edge"]}


def test_localiser_finds_the_levels_of_a_series_framed_at_the_top_edge(edge_set, tmp_path):
    """Issue 28: a Sagittal T2/STIR series framed with L1/L2 a few rows below its top edge (sagittal_top_edge),
    validated in every fold that holds one (3 of the 4 folds, ~100 s). A localiser that reads a level's identity
    from its height in the image puts all five levels of such a study one disc low (30-37 mm). Measured on this set
    and on seed 7's, every fold (bench/level_shift.py, bench/RESULTS.md): with edge views alone three of the four
    edge studies were one disc low and a clean one too (fold 0's was right: CI's other fold split failed); with
    the wider spine shift (LOC_SPINE_SHIFT) at 20 epochs 9 of 98 clean rows were; at these 40 epochs (18 training
    studies, 720 steps) no row of either set was over 15 mm. Every level, edge-framed or clean, must be within half
    a disc (15 mm) and on its slice or the next, and the clean studies as good as in the learning test. Not every
    split passes: the Kaggle-like environment's (scikit-learn 1.6.1, folds 0 and 3 here) left 6140659 one disc
    low; CI runs this test in the first environment only, as the other learning tests."""
    root, edge = edge_set
    nb = loc_namespace(root, tmp_path)
    config = nb["CONFIG"]
    samples = nb["assign_folds"](nb["build_sample_table"](config)[0], config)
    folds = sorted(samples.loc[samples["study_id"].isin(edge), "fold"].unique().tolist())
    table = nb["train_localisers"](samples, folds, config, CPU, 1).table
    table["edge"] = table["study_id"].isin(edge)
    print(folds, table.sort_values(["edge", "study_id"]).to_string())
    assert table["edge"].sum() >= 10 and (~table["edge"]).sum() >= 40  # edge studies and clean ones
    assert (table["error_mm"] < 15).all() and (table["slice_error"] <= 1).all()
    clean = nb["localisation_metrics"](table[~table["edge"]])
    assert clean.loc["all", "median mm"] < MEDIAN_MM and clean.loc["all", "slice within 1"] >= 0.9


def test_the_localisers_result_is_read_only(trained):
    """Issue 30: train_localisers returns a NamedTuple nothing downstream changes: its fields cannot be set, and
    the cost of localisation and the submitted choice are a Localisation's own fields."""
    assert isinstance(trained, tuple) and type(trained).__name__ == "Localisers"
    with pytest.raises(AttributeError):
        trained.points = None
    with pytest.raises(TypeError):
        trained["cost"] = {}
    assert "cost" not in trained._fields and "choice" not in trained._fields


def test_classifier_with_predicted_points_beside_oracle(setup, trained):
    """Scored on the same rows with the same final.pt; with the annotated points as the 'predictions' the
    predicted-point probabilities are the oracle ones (the grid round trip is exact)."""
    nb, config, samples = setup
    config = {**config, "epochs": 2, "batch_size": 8, "warmup_epochs": 1, "swa_start_epoch": 2,
              "gru_hidden": 16, "attention_hidden": 8, "learning_rate": 1e-3, "backbone_lr": 1e-3,
              "cache_dir": str(nb["Path"](config["output_dir"]) / "cache")}
    cached, images, masks, _ = nb["build_cache"](samples, config, 1)
    result = nb["train_fold"](0, cached, images, masks, config, CPU)
    saved = torch.load(nb["Path"](config["output_dir"]) / "fold0" / "final.pt", weights_only=False)
    assert saved["kind"] == "swa" and saved["class_weights"] == result["class_weights"]
    oof = nb["oof_frame"]([result], lambda r: nb["final_kind"](r, config))
    (nb["Path"](config["output_dir"]) / "priors.json").write_text(nb["json"].dumps(nb["label_priors"](
        config["data_root"])))
    run = nb["load_run"](config["output_dir"], config, CPU, folds=[0])
    cost = nb["localisation_cost"](oof, trained, run, config, CPU, 1)
    assert cost["rows"] == len(oof) and cost["fallback_rows"] == 0
    oracle = nb["summarize"](oof)
    assert cost["oracle"]["ba"] == pytest.approx(oracle["ba"])
    assert cost["oracle"]["corrected"]["competition_terms"] == pytest.approx(
        oracle["corrected"]["competition_terms"])
    assert np.isfinite(cost["predicted"]["corrected"]["competition_score_part"])
    found = {series: {s: [(trained.target_volumes[series][s], t)] for s, t in targets.items()}
             for series, targets in trained.targets.items()}  # the annotated points as predictions
    perfect = trained._replace(points=nb["point_rows"](found, trained.series))
    exact = nb["localisation_cost"](oof, perfect, run, config, CPU, 1)
    assert exact["predicted"]["corrected"]["competition_terms"] == pytest.approx(
        oracle["corrected"]["competition_terms"], abs=1e-4)
    choice = nb["choose_probabilities"](cost["frame"])
    spinal = choice["spinal_canal_stenosis"]
    candidates = ("raw", "corrected", "priors", "raw T", "corrected T")
    assert spinal["candidate"] == min(candidates, key=spinal.get) and spinal["chosen"] == spinal["candidate"].split()[0]
    lines = nb["localisation_report"](nb["Localisation"](trained, cost, choice), None, config)
    assert any(line.startswith("- Cost of localisation") for line in lines)
    assert "\n| spinal | " in "\n".join(lines)  # the terms, oracle beside predicted


# --- the localiser's pieces, each against a hand-made answer (no training) ---
@pytest.fixture(scope="module")
def defs(nb):
    return nb  # the session's notebook namespace (conftest)


def test_fit_square_keeps_anatomy_shape_and_maps_points_both_ways(defs):
    """A 60 x 40 mm ellipse on a non-square, anisotropic series (rows 0.9 mm, columns 0.6 mm) is drawn with the same
    mm per grid pixel along x and y; series pixel -> grid -> series is exact; a mirrored series is shown unmirrored."""
    rows, cols, spacing = 200, 300, np.array([0.6, 0.9])  # x: mm per column, y: mm per row
    y, x = np.mgrid[:rows, :cols]
    image = ((((x - 150) * 0.6 / 30) ** 2 + ((y - 100) * 0.9 / 20) ** 2) <= 1).astype(np.uint8) * 255
    square, (kx, ox, ky, oy) = defs["fit_square"](image, spacing, 64)
    assert square.shape == (64, 64)
    assert spacing[0] / kx == pytest.approx(spacing[1] / ky, rel=0.02)  # mm per grid pixel, x == y
    mm = spacing[0] / kx  # 180 mm across the 64 px: the longer side (300 x 0.6 mm) fills the square
    assert mm == pytest.approx(180 / 64, rel=0.02)
    on = np.argwhere(square > 127)
    width_mm, height_mm = (np.ptp(on[:, 1]) + 1) * mm, (np.ptp(on[:, 0]) + 1) * mm
    assert width_mm == pytest.approx(60, abs=2 * mm) and height_mm == pytest.approx(40, abs=2 * mm)
    assert on[:, 1].mean() == pytest.approx(31.5, abs=0.6) and on[:, 0].mean() == pytest.approx(31.5, abs=0.6)
    volume = {"to_grid": np.array([[kx, ox, ky, oy]])}
    u, v = defs["grid_point"](volume, 0, 150.0, 100.0)
    assert (u, v) == pytest.approx((31.5, 31.5), abs=0.6)  # the ellipse centre lands at the grid centre
    np.testing.assert_allclose(defs["series_point"](volume, 0, u, v), (150.0, 100.0), atol=1e-9)
    # a series whose columns run anterior (flipped_normal) is shown the usual way round: the same square
    asym = image.copy()
    asym[95:105, 200:260] = 255  # a bar on the patient's posterior side
    square, to_grid = defs["fit_square"](asym, spacing, 64)
    mirrored, to_grid_m = defs["fit_square"](asym[:, ::-1], spacing, 64, (True, False))
    assert np.abs(mirrored.astype(int) - square).max() <= 2
    for x, y in ((150.0, 100.0), (230.0, 99.0), (3.0, 7.0)):
        here = defs["grid_point"]({"to_grid": np.array([to_grid])}, 0, x, y)
        there = defs["grid_point"]({"to_grid": np.array([to_grid_m])}, 0, cols - 1 - x, y)
        np.testing.assert_allclose(there, here, atol=1e-9)
        np.testing.assert_allclose(defs["series_point"]({"to_grid": np.array([to_grid_m])}, 0, *there),
                                   (cols - 1 - x, y), atol=1e-9)


def test_augment_study_moves_targets_with_the_image(defs):
    """A bright dot at each annotated point: after any augmentation (zoom, rotation, shift, slice reversal) the
    dot's brightest pixel is where the target went; a missing target stays NaN."""
    size = 64
    image = np.zeros((5, size, size), np.uint8)
    targets = np.array([[1, 20, 30], [2, 40, 12], [3, 33, 50], [np.nan] * 3, [0, 10, 10]], float)
    for j, u, v in targets[[0, 1, 2, 4]]:
        image[int(j), int(v) - 1:int(v) + 2, int(u) - 1:int(u) + 2] = 255
    volume = {"image": image, "valid": np.array([True, True, True, True, False])}
    rng, reversed_seen = np.random.default_rng(0), 0
    for _ in range(30):
        x, target, valid = defs["augment_study"](volume, targets, rng, defs["CONFIG"], CPU)
        assert x.shape == (5, 4, size, size) and valid.tolist() in ([1, 1, 1, 1, 0], [0, 1, 1, 1, 1])
        np.testing.assert_allclose(x[:, 3, 0, 0], np.linspace(-1, 1, 5))  # channel 3: the slice's place, as seen
        reversed_seen += not valid[-1]
        assert np.isnan(target[3]).all()
        for level in (0, 1, 2, 4):
            if np.isnan(target[level, 0]):  # pushed out of view
                continue
            middle = x[int(target[level, 0]), 1]  # channel 1: the slice itself
            v, u = divmod(int(middle.argmax()), size)
            assert abs(u - target[level, 1]) <= 1.5 and abs(v - target[level, 2]) <= 1.5
            assert middle.max() > 0  # the dot survived (not a black slice)
    assert 5 <= reversed_seen <= 25  # half the time


def test_edge_view_frames_the_spine_at_an_edge_of_the_image(defs, monkeypatch):
    """Issue 28: a wide series (fit_square's band: rows 5-57 of 64) with five levels at rows 15-47, a dot at each.
    Each edge view moves the spine so that its top level lies 0-3.2 rows (LOC_EDGE_VIEWS' 5 %) inside the band's top
    edge, or its bottom level as far inside the bottom edge, about half the time each; the dots go where the
    targets say, nothing lies outside the band, and a level moved out of it has no target. augment_study frames
    about 30 % of its views so with `spine`, none without, and shifts the views up to LOC_SPINE_SHIFT (0.3 of the
    image) with `spine`, LOC_AUGMENT's 0.1 without."""
    size, band = 64, (5, 57)
    rows = np.array([15.0, 23, 31, 39, 47])
    image = np.zeros((3, size, size), np.uint8)
    image[:, band[0]:band[1] + 1] = 60  # the series' own pixels
    for r in rows:
        image[1, int(r), 30:33] = 255
    target = np.stack([np.ones(5), np.full(5, 31.0), rows], 1)
    rng, ends = np.random.default_rng(0), {"top": 0, "bottom": 0}
    margin = defs["LOC_EDGE_VIEWS"][1] * size
    for _ in range(40):
        moved, t = defs["edge_view"](torch.from_numpy(image).float().div(255), target.copy(), rng)
        moved = moved.numpy()
        assert (moved[:, :band[0]] == 0).all() and (moved[:, band[1] + 1:] == 0).all()
        kept = ~np.isnan(t[:, 2])
        assert kept.sum() >= 4 and np.all(np.diff(t[kept, 2]) == 8)  # moved together, rows apart as before
        if band[0] - 0.5 <= t[kept, 2].min() <= band[0] + margin + 0.5:
            ends["top"] += 1
        else:
            assert band[1] - margin - 0.5 <= t[kept, 2].max() <= band[1] + 0.5
            ends["bottom"] += 1
        for r in t[kept, 2]:  # each dot where its target went
            assert moved[1, int(r), 31] == 1.0
        assert (moved[1, :, 31] == 1.0).sum() == kept.sum()
        assert all(np.isnan(t[~kept, 2]))  # the other levels' dots were cut off with the image
    assert min(ends.values()) >= 12
    unnamed = target.copy()
    unnamed[0] = np.nan  # L1/L2 not annotated: L2/L3 at the top edge would be taught as the top level; bottom only
    for _ in range(10):
        t = defs["edge_view"](torch.from_numpy(image).float().div(255), unnamed.copy(), rng)[1]
        assert band[1] - margin - 0.5 <= np.nanmax(t[:, 2]) <= band[1] + 0.5
    volume, framed, shifts = {"image": image, "valid": np.ones(3, bool)}, [], []
    view, draw = defs["edge_view"], defs["draw_augmentation"]
    monkeypatch.setitem(defs, "edge_view", lambda *args: framed.append(1) or view(*args))
    monkeypatch.setitem(defs, "draw_augmentation", lambda rng, config: shifts.append(config["aug_shift"]) or
                        draw(rng, config))
    for spine, share, most in ((True, (0.15, 0.45), 0.3), (False, (0.0, 0.0), 0.1)):
        rng, framed[:], shifts[:] = np.random.default_rng(1), [], []
        for _ in range(60):
            defs["augment_study"](volume, target, rng, defs["CONFIG"], CPU, None, spine)
        assert share[0] * 60 <= len(framed) <= share[1] * 60, (spine, len(framed))
        assert set(shifts) == {most}  # the shift range each view is drawn from


def blobs(levels_rows, size=32, slices=3, extra=()):
    """(5, slices, size, size) probabilities: per level a Gaussian blob at (row, column 16) on slice 1, plus the
    (level, row, weight) extras; each level normalised."""
    grid = torch.arange(size, dtype=torch.float32)
    probs = torch.zeros(5, slices, size, size)
    for level, row in enumerate(levels_rows):
        probs[level, 1] += torch.exp(-((grid.view(-1, 1) - row) ** 2 + (grid.view(1, -1) - 16) ** 2) / 2)
    for level, row, weight in extra:
        probs[level, 1] += weight * torch.exp(-((grid.view(-1, 1) - row) ** 2 + (grid.view(1, -1) - 16) ** 2) / 2)
    return probs / probs.sum((1, 2, 3), keepdim=True)


def test_decode_levels_keeps_the_levels_in_order_along_the_spine(defs):
    decode = defs["decode_levels"]
    rows, gap = [4, 10, 16, 22, 28], (3, 12)
    clear = decode(blobs(rows), gap)
    np.testing.assert_allclose(clear[:, 0], 1)
    np.testing.assert_allclose(clear[:, 2], rows, atol=1e-4)
    np.testing.assert_allclose(clear[:, 1], 16, atol=1e-4)
    # level L3/L4's strongest bump sits on L4/L5's disc (row 22), its right one (row 16) is weaker
    slipped = blobs([4, 10, 22, 22, 28], extra=[(2, 16, 0.6)])
    assert decode(slipped, (-99, 99))[2, 2] == pytest.approx(22, abs=0.5)  # no order asked: the slip
    assert decode(slipped, gap)[2, 2] == pytest.approx(16, abs=0.5)  # in order: the right disc
    # a bump under 1/20 of the level's strongest is no candidate: no ordered choice, each level's own peak
    faint = blobs([4, 10, 22, 22, 28], extra=[(2, 16, 0.01)])
    assert decode(faint, gap)[2, 2] == pytest.approx(22, abs=0.5)
    # L5/S1 slipped onto L4/L5's disc, its only other bump far below at the image's edge: too far to be the next
    # level (the gap's upper bound), so no ordered choice of five and no point on the edge; L5/S1 goes one step
    # below L4/L5 (test_decode_levels_survives_a_level_at_the_image_edge; before issue 28: on L4/L5's disc, 22)
    edge = blobs([4, 10, 16, 22, 22], extra=[(4, 31, 0.3)])
    assert decode(edge, (3, 99))[4, 2] == pytest.approx(31, abs=1)
    assert decode(edge, (3, 8))[4, 2] == pytest.approx(28, abs=0.5)  # levels 6 apart: 9 is too far
    # two discs 4 pixels apart are two candidates (local maxima of the map itself, not of its 5 x 5 mass)
    close = blobs([4, 10, 16, 20, 20], extra=[(4, 24, 0.5)])
    assert decode(close, (3, 12))[4, 2] == pytest.approx(24, abs=0.5)


def test_decode_levels_survives_a_level_at_the_image_edge(defs):
    """Issue 28: L1/L2's disc at the image's top edge, so its map's only peak sits on L2/L3's disc; levels 2-5 are
    right, 6 rows apart. No ordered choice of all five exists: levels 2-5 stay on their own discs and L1/L2 goes one
    step above L2/L3 (extrapolated), not on L2/L3's disc (each map's own peak: the rule before, which failed this)."""
    decode, gap = defs["decode_levels"], (3, 12)
    top = decode(blobs([10, 10, 16, 22, 28]), gap)  # L1/L2's own disc would be at row 4
    np.testing.assert_allclose(top[:, 0], 1)
    np.testing.assert_allclose(top[:, 2], [4, 10, 16, 22, 28], atol=1e-3)
    np.testing.assert_allclose(top[:, 1], 16, atol=1e-3)
    # the same at the bottom edge: L5/S1's only peak on L4/L5's disc
    bottom = decode(blobs([4, 10, 16, 22, 22]), gap)
    np.testing.assert_allclose(bottom[:, 2], [4, 10, 16, 22, 28], atol=1e-3)
    # L1/L2's disc above the image (row -2): kept on the grid, on its neighbour's slice and column
    above = blobs([4, 4, 10, 16, 22])
    above[0] = above[0].roll(1, 0)  # L1/L2's mass on slice 2, L2/L3's peak there: the point stays on slice 1
    clipped = decode(above, gap)
    np.testing.assert_allclose(clipped[:, 2], [0, 4, 10, 16, 22], atol=1e-3)
    np.testing.assert_allclose(clipped[:, :2], [[1, 16]] * 5, atol=1e-3)
    # ... and, given the image area, inside the image on that slice (here rows 3-28 of the 32-row grid)
    area = np.zeros((3, 32, 32), bool)
    area[:, 3:29] = True
    assert decode(above, gap, area=area)[0, 2] == pytest.approx(3)
    assert decode(blobs([10, 10, 16, 22, 28]), gap, area=area)[0, 2] == pytest.approx(4, abs=1e-3)
    # two levels slipped in the middle: dropping an end level does not order them: each map's own peak, as before
    middle = decode(blobs([4, 10, 22, 22, 28]), gap)
    np.testing.assert_allclose(middle[:, 2], [4, 10, 22, 22, 28], atol=1e-3)


def test_localise_never_places_a_point_off_the_image(defs):
    """A tall field of view leaves black bands left and right of the square; a model whose strongest response
    sits in a band still gets a point on the image (where a crop can be built)."""
    image, spacing = np.full((128, 64), 100, np.uint8), np.array([1.0, 1.0])
    square, to_grid = defs["fit_square"](image, spacing, 64)
    volume = {"image": np.stack([square] * 3), "valid": np.ones(3, bool), "to_grid": np.array([to_grid] * 3),
              "image_shape": np.array([[128, 64]] * 3), "spacing": np.array([spacing] * 3)}
    area = defs["image_area"](volume)
    assert area.shape == (3, 64, 64) and area[:, :, 16:48].all() and not area[:, :, :16].any()
    assert not area[:, :, 48:].any()

    class BandLover(torch.nn.Module):  # level k: a strong bump at column 3 (the band), a weak one at column 30
        def forward(self, x):
            logits = torch.zeros(len(x), 5, 64, 64)
            for level in range(5):
                logits[1, level, 6 + 12 * level, 3] = 8.0
                logits[1, level, 6 + 12 * level, 30] = 4.0
            return logits

    points = defs["localise"]([BandLover()], volume, CPU, defs["CONFIG"])
    np.testing.assert_allclose(points[:, 0], 1)
    assert (points[:, 1] > 16).all() and (points[:, 1] < 48).all()
    for j, u, v in points:
        x, y = defs["series_point"](volume, int(j), u, v)
        assert 0 <= x < 64 and 0 <= y < 128


# --- the localiser's training step (issue 23 item 6): guarded_step, as the classifier's ---
LOC_TINY = {"loc_channels": 4, "loc_epochs": 2, "loc_batch": 1, "loc_augment": False, "loc_sigma": 1.0,
            "loc_lr": 1e-3, "precision": "fp32"}


def tiny_studies(n=2, size=32, slices=4):
    rng = np.random.default_rng(0)
    volumes = {s: {"image": rng.integers(0, 256, (slices, size, size), dtype=np.uint8),
                   "valid": np.ones(slices, bool)} for s in range(n)}
    targets = {s: np.array([[1 + k % 2, 16, 4 + 6 * k] for k in range(5)], float) for s in range(n)}
    return volumes, targets


def nan_input_on_calls(defs, monkeypatch, bad):
    """The notebook's LevelLocaliser, its input's first slice NaN on the `bad` calls (0-based, or 'all');
    returns the BatchNorm statistics recorded before each call's forward."""
    seen = []

    class Flaky(defs["LevelLocaliser"]):
        def forward(self, x):
            seen.append({k: v.clone() for k, v in self.state_dict().items() if "running" in k or "num_batches" in k})
            if bad == "all" or len(seen) - 1 in bad:
                x = x.clone()
                x[0] = float("nan")
            return super().forward(x)

    monkeypatch.setitem(defs, "LevelLocaliser", Flaky)
    return seen


def test_a_nan_localiser_step_is_skipped_counted_and_its_batchnorm_put_back(defs, monkeypatch):
    config = {**defs["CONFIG"], **LOC_TINY, "max_nonfinite_steps": 5}
    volumes, targets = tiny_studies()
    seen = nan_input_on_calls(defs, monkeypatch, {3})  # the last of 2 epochs x 2 steps
    defs["WARNINGS"].clear()
    model, losses, skipped = defs["train_localiser"](volumes, targets, [0, 1], config, CPU, 0, "fold 9 localiser")
    assert skipped == 1 and len(seen) == 4
    assert len(defs["WARNINGS"]) == 1
    assert defs["WARNINGS"][0].startswith("fold 9 localiser epoch 2 step 1: non-finite gradient norm (loss nan)")
    assert "studies [" in defs["WARNINGS"][0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    after = {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    assert len(after) > 20 and all(torch.equal(after[k], seen[3][k]) for k in after)  # as before the NaN forward
    assert len(losses) == 2 and all(np.isfinite(losses))  # epoch 2's loss: its applied step alone


def test_persistent_nan_in_the_localiser_stops_beyond_max_nonfinite_steps(defs, monkeypatch):
    config = {**defs["CONFIG"], **LOC_TINY, "max_nonfinite_steps": 2}
    volumes, targets = tiny_studies()
    nan_input_on_calls(defs, monkeypatch, "all")
    defs["WARNINGS"].clear()
    with pytest.raises(FloatingPointError, match="3 non-finite steps under precision fp32.*lower the learning"):
        defs["train_localiser"](volumes, targets, [0, 1], config, CPU, 0)
    assert [w.split(":")[0] for w in defs["WARNINGS"]] == ["localiser epoch 1 step 0", "localiser epoch 1 step 1",
                                                          "localiser epoch 2 step 0"]
