"""Issue 19: the generator's test split, and the Kaggle submission written from it (clean and realistic)."""

import hashlib

import numpy as np
import pandas as pd
from make_demo_studies import CONDITIONS, LEVELS, REALISTIC, TEST_SOLUTION, make_study_set


def tree_hashes(root, skip=("test_images", TEST_SOLUTION, "test_series_descriptions.csv", "sample_submission.csv")):
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] not in skip}


def test_test_split_layout_and_training_files_unchanged(tmp_path):
    plain = make_study_set(tmp_path / "plain", n_studies=3, seed=3, **REALISTIC)
    split = make_study_set(tmp_path / "split", n_studies=3, seed=3, test_studies=3, **REALISTIC)
    again = make_study_set(tmp_path / "again", n_studies=3, seed=3, test_studies=3, **REALISTIC)
    root = tmp_path / "split"
    # without a test split, two training studies are copied as test images, as before
    assert plain["test_study_ids"] == pd.read_csv(tmp_path / "plain" / "train.csv")["study_id"].tolist()[-2:]
    assert "test_split" not in plain
    # the test split: other studies, competition layout, labels kept aside, deterministic
    test_ids = split["test_split"]["study_ids"]
    train_ids = set(pd.read_csv(root / "train.csv")["study_id"])
    assert len(test_ids) == 3 and not set(test_ids) & train_ids
    assert tree_hashes(root) == tree_hashes(tmp_path / "again")
    assert tree_hashes(root, skip=()) == tree_hashes(tmp_path / "again", skip=())
    assert again["test_split"] == split["test_split"]
    sample = pd.read_csv(root / "sample_submission.csv")
    assert list(sample.columns) == ["row_id", "normal_mild", "moderate", "severe"]
    assert sample["row_id"].tolist() == [f"{s}_{c}_{lv}" for s in test_ids for c in CONDITIONS for lv in LEVELS]
    desc = pd.read_csv(root / "test_series_descriptions.csv")
    assert list(desc.columns) == ["study_id", "series_id", "series_description"]
    for study, series in zip(desc["study_id"], desc["series_id"]):
        files = list((root / "test_images" / str(study) / str(series)).glob("*.dcm"))
        assert files and all(f.stem.isdigit() for f in files)
    # realistic, 3 test studies: the last one has no Sagittal T2/STIR series, neither listed nor on disk
    (gone,) = split["test_split"]["no_sagittal_t2"]
    assert gone["study_id"] == test_ids[-1] and gone["series_id"] not in set(desc["series_id"])
    assert not (root / "test_images" / str(gone["study_id"]) / str(gone["series_id"])).exists()
    assert set(desc["study_id"]) == set(test_ids)
    # nothing under a competition file name holds the test labels; the solution is in the metric's format
    assert sorted(p.name for p in (root / TEST_SOLUTION).iterdir()) == [
        "GENERATED_BY.txt", "solution.csv", "train.csv", "train_label_coordinates.csv"]
    solution = pd.read_csv(root / TEST_SOLUTION / "solution.csv")
    assert set(solution["row_id"]) == set(sample["row_id"])
    onehot = solution[["normal_mild", "moderate", "severe"]].to_numpy()
    assert set(onehot.sum(1)) <= {0.0, 1.0}
    np.testing.assert_array_equal(solution["sample_weight"], onehot @ [1, 2, 4])
    labels = pd.read_csv(root / TEST_SOLUTION / "train.csv").set_index("study_id")
    row = solution.iloc[7]
    study, column = row["row_id"].split("_", 1)
    expected = labels.loc[int(study), column]
    assert (["Normal/Mild", "Moderate", "Severe"].index(expected) if isinstance(expected, str) else None) == (
        int(np.argmax(onehot[7])) if onehot[7].sum() else None)
    # the training files are the same with or without a test split
    assert tree_hashes(root) == tree_hashes(tmp_path / "plain")
    # the test coordinates (kept aside) point into the test images
    coords = pd.read_csv(root / TEST_SOLUTION / "train_label_coordinates.csv")
    first = coords.iloc[0]
    assert (root / "test_images" / str(first["study_id"]) / str(first["series_id"])
            / f"{first['instance_number']}.dcm").exists()


def test_cli_test_studies(tmp_path):
    from make_demo_studies import main

    main([str(tmp_path / "cli"), "--studies", "3", "--seed", "1", "--test-studies", "2"])
    sample = pd.read_csv(tmp_path / "cli" / "sample_submission.csv")
    assert len(sample) == 2 * 25
    assert (tmp_path / "cli" / TEST_SOLUTION / "solution.csv").exists()
