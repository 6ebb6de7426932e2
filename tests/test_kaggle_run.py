"""Issue 23: the Kaggle run end to end. The pieces here (the work after training kept inside the time budget, the
localisers stopping at their deadline, the section's GPU work in a child process, a submission run on the test
files alone); the whole flow, budget-stopped inside fold 0 with fold 1 never started, in tests/test_submission.py."""

import os
import shutil
import signal

import numpy as np
import pandas as pd
import pytest
import torch
from test_longrun import fake_epochs
from test_training import CPU, cached, small_config  # noqa: F401  (cached: fixture)


def test_after_training_plan_by_hand(nb, tmp_path):
    """Per study: read 2 s, a localiser epoch 0.5 s, localise 0.1 s, classify 0.4 s; 10 studies in folds
    0,0,0,1,1,1,2,2,-1,-1 (hold-out), 2 loader workers, 3 test studies in sample_submission.csv."""
    root = tmp_path / "data"
    root.mkdir()
    pd.DataFrame({"row_id": [f"{s}_spinal_canal_stenosis_l1_l2" for s in (7, 8, 9)]}).to_csv(
        root / "sample_submission.csv", index=False)
    samples = pd.DataFrame({"study_id": np.repeat(np.arange(10), 5),
                            "fold": np.repeat([0, 0, 0, 1, 1, 1, 2, 2, -1, -1], 5)})
    probe = {"read": 2.0, "step": 0.5, "localise": 0.1, "classify": 0.4}
    config = {**nb["CONFIG"], "data_root": str(root), "train_folds": [0, 1], "loc_epochs": 20, "num_workers": 2}
    parts = nb["after_training_parts"](probe, samples, config, [0, 1])
    assert parts == pytest.approx({"volumes": 10 * 2.0 / 2,  # every study, read on 2 workers
                                   "localisers": 20 * (5 + 5) * 0.5,  # folds 0 and 1 train on 5 studies each
                                   "validation": (3 + 3) * 0.5,  # their validation studies, one model each
                                   "submission": 3 * (2.0 + 2 * 0.5)})  # each test study: read, 2 models
    plan = nb["after_training_plan"](probe, samples, config)
    assert plan == pytest.approx([0.0, 10 + 50 + 1.5 + 3 * 2.5, 10 + 100 + 3 + 3 * 3.0])


def test_the_time_budget_keeps_the_work_after_training_free(nb, cached, tmp_path, monkeypatch):  # noqa: F811
    """Epochs of 100 s, a budget of 250 s: alone, fold 0 would stop after epoch 2 (test_longrun); with 100 s kept
    for the work after one fold it stops after epoch 1, fold 1 is not started (the reserve for two folds, 200 s,
    leaves no epoch), and the projection counts the reserve."""
    fake_epochs(nb, monkeypatch)
    monkeypatch.setitem(nb, "AFTER_TRAINING_S", [0.0, 100.0, 200.0])
    config = small_config(nb, tmp_path, train_folds=[0, 1], time_budget_h=250 / 3600)
    nb["WARNINGS"].clear()
    results = nb["train_folds"](*cached, config, CPU)
    assert [r["fold"] for r in results] == [0]
    assert results[0]["stopped_by"] == "budget" and results[0]["epochs_trained"] == 1
    assert any("fold 1 not started" in w and "0.06 h for the work after training" in w for w in nb["WARNINGS"])
    plan = nb["project_run"](100.0, 10.0, config, {"train": 80, "val": 20, "holdout": 0}, epochs_done=1,
                             folds_after=1, elapsed_s=110.0)
    monkeypatch.setitem(nb, "AFTER_TRAINING_S", [0.0])
    without = nb["project_run"](100.0, 10.0, config, {"train": 80, "val": 20, "holdout": 0}, epochs_done=1,
                                folds_after=1, elapsed_s=110.0)
    assert plan["run_s"] == pytest.approx(without["run_s"] + 200.0)
    assert "0.06 h of it after training" in plan["text"] and "after training" not in without["text"]


@pytest.fixture(scope="module")
def loc_setup(loc_study_set, tmp_path_factory):
    from notebook_cells import notebook_namespace
    from test_localiser import LOC

    out = tmp_path_factory.mktemp("loc_budget")
    nb = notebook_namespace({"data_root": str(loc_study_set), "output_dir": str(out), "img_size": 64,
                             "num_workers": 0, "backbone": "mobilenet_v3_small", "pretrained": "none",
                             "conditions": ["spinal_canal_stenosis"],
                             "num_folds": 4, **LOC, "loc_epochs": 6})
    samples, _ = nb["build_sample_table"](nb["CONFIG"])
    return nb, nb["assign_folds"](samples, nb["CONFIG"])


def test_localisers_share_the_time_left_and_stop_at_their_deadline(loc_setup, monkeypatch):
    """A clock on which every localiser epoch takes 10 s (each training study's loss moves it 10 / n s). With 35 s
    left for 2 folds, fold 0 gets half (17.5 s): a second epoch would end after it, so it stops after 1; fold 1
    then has the 25 s left: it stops after 2. Each sizes its one-cycle schedule to those epochs after its first step
    (so its learning rate is annealed by its last epoch) and says so, and each still localises its validation
    studies, as test studies are (issue 28): every series by pick_series' rule, read around its middle file, never
    around the annotated instance."""
    nb, samples = loc_setup
    config = nb["CONFIG"]
    clock, real = [0.0], nb["localiser_loss"]
    fold_of = samples.groupby("study_id")["fold"].first()

    def loss(logits, targets, valid, sigma):
        clock[0] += 10.0 / studies[0]
        return real(logits, targets, valid, sigma)

    studies = [int(((fold_of != 0) & (fold_of >= 0)).sum())]
    monkeypatch.setitem(nb, "localiser_loss", loss)
    monkeypatch.setitem(nb, "now", lambda: clock[0])
    real_train = nb["train_localiser"]

    def train_localiser(volumes, targets, train, *args):
        studies[0] = len(train)
        return real_train(volumes, targets, train, *args)

    monkeypatch.setitem(nb, "train_localiser", train_localiser)
    schedules, real_scheduler = [], nb["loc_scheduler"]

    def loc_scheduler(optimizer, config, steps, done=0):
        schedules.append([steps, done])
        schedules[-1].append(real_scheduler(optimizer, config, steps, done))
        return schedules[-1][-1]

    monkeypatch.setitem(nb, "loc_scheduler", loc_scheduler)
    reads, real_read = [], nb["read_volume"]

    def read_volume(series_dir, config, anchor=None):
        reads.append((int(nb["Path"](series_dir).parent.name), int(nb["Path"](series_dir).name), anchor))
        return real_read(series_dir, config, anchor)

    monkeypatch.setitem(nb, "read_volume", read_volume)
    nb["WARNINGS"].clear()
    loc = nb["train_localisers"](samples, [0, 1], config, CPU, 1, deadline=35.0)
    batches = [int(((fold_of != f) & (fold_of >= 0)).sum()) for f in (0, 1)]  # loc_batch 1: a step per study
    assert [s[:2] for s in schedules] == [[6 * batches[0], 0], [1 * batches[0], 1], [6 * batches[1], 0],
                                          [2 * batches[1], 1]]
    for _, _, scheduler in schedules[1::2]:  # each stepped to its resized schedule's end: the last optimiser step ran
        assert scheduler.last_epoch == scheduler.total_steps  # at the schedule's final, annealed rate
    validation = set(fold_of.index[fold_of.isin([0, 1])])
    desc = pd.read_csv(nb["Path"](config["data_root"]) / "train_series_descriptions.csv")
    rule = {s: nb["pick_series"](desc, s, nb["Path"](config["data_root"]) / "train_images", ["Sagittal T2/STIR"])
            for s in validation}
    read = {(study, series) for study, series, anchor in reads if study in validation and anchor is None}
    assert read == {(s, int(rule[s]["Sagittal T2/STIR"][0].name)) for s in validation}
    for study in validation:  # the points are on the volume read by the rule
        (volume, _), = loc.found["Sagittal T2/STIR"][study]
        assert volume["series_dir"] == str(rule[study]["Sagittal T2/STIR"][0])
    assert {f: len(losses["Sagittal T2/STIR"]) for f, losses in loc.losses.items()} == {0: 1, 1: 2}
    assert clock[0] == pytest.approx(30.0)
    assert [w for w in nb["WARNINGS"] if "localiser stopped" in w] == [
        "fold 0: Sagittal T2/STIR localiser stopped by the time budget after epoch 1 of 6",
        "fold 1: Sagittal T2/STIR localiser stopped by the time budget after epoch 2 of 6"]
    assert set(loc.found["Sagittal T2/STIR"]) == set(fold_of.index[fold_of.isin([0, 1])])  # every one predicted
    lines = nb["localisation_report"](nb["Localisation"](loc), None, config)
    assert ("- Localisers stopped by the time budget: fold 0 Sagittal T2/STIR after epoch 1 of 6, fold 1 Sagittal "
            "T2/STIR after epoch 2 of 6.") in lines


def test_on_device_runs_in_a_child_unless_this_process_initialised_cuda(nb, monkeypatch):
    """The section's GPU work runs in a forked process (the kernel stays CUDA-free: a second Run all can still fork
    one training process per GPU), with its value and warnings brought back; where the kernel initialised CUDA
    already (one-GPU training ran in it), here."""
    def work(device):  # a CPU op on torch's OpenMP threads (a kernel's forked child hung in one)
        nb["warn"]("from the work")
        return {"pid": os.getpid(), "device": str(device),
                "sum": float(torch.ones(1024, 1024, dtype=torch.uint8).float().sum())}

    def too_long(*_):
        raise TimeoutError("the forked process did not finish in 120 s (OpenMP after fork?)")

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # this thread's OpenMP threads exist when it forks, as in a kernel after section 6
    float(torch.ones(1024, 1024, dtype=torch.uint8).float().sum())
    nb["WARNINGS"].clear()
    before = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(120)  # the fork must come from this thread, the one whose OpenMP threads exist
    try:
        out = nb["on_device"](work)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
        torch.set_num_threads(threads)
    assert out["pid"] != os.getpid() and out == {**out, "device": "cpu", "sum": 1024.0 ** 2}
    assert nb["WARNINGS"] == ["from the work"]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert nb["on_device"](work)["pid"] == os.getpid()


def test_setup_says_a_restart_is_needed_when_cuda_is_initialised_with_two_gpus(nb, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    nb["WARNINGS"].clear()
    nb["cuda_restart_warning"]({**nb["CONFIG"], "processes": "auto"})
    assert nb["WARNINGS"] == []  # CUDA not initialised: nothing to say
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    nb["cuda_restart_warning"]({**nb["CONFIG"], "processes": 1})
    assert nb["WARNINGS"] == []  # one process wanted: nothing lost
    nb["cuda_restart_warning"]({**nb["CONFIG"], "processes": "auto"})
    (said,) = nb["WARNINGS"]
    assert "2 training processes cannot be started" in said and "restart the kernel" in said


def test_a_submission_run_needs_only_the_test_files(nb, loc_study_set, tmp_path):
    """submit_from: the data root needs sample_submission.csv (not train.csv); the disk check counts the test
    rows' crops and no fold checkpoints; the missing file is named otherwise."""
    root = tmp_path / "test_only"
    root.mkdir()
    for name in ("sample_submission.csv", "test_series_descriptions.csv"):
        shutil.copy(loc_study_set / name, root / name)
    config = {**nb["CONFIG"], "data_root": str(root), "output_dir": str(tmp_path / "out"), "cache_dir": None,
              "submit_from": str(tmp_path / "attached"), "demo": False}
    resolved = nb["resolve_paths"](config)
    assert resolved["data_root"] == str(root)
    rows = nb["submission_rows"](resolved)
    assert rows == 6 * 5  # the generated test split: 6 studies
    needs = nb["disk_needs"](resolved, rows, 10 ** 9)
    crop = resolved["num_slices"] * nb["crop_side"](resolved) ** 2
    assert needs == {resolved["cache_dir"]: rows * crop, resolved["output_dir"]: 0}
    (root / "sample_submission.csv").unlink()
    with pytest.raises(FileNotFoundError, match="has no sample_submission.csv.*needs only test_images/"):
        nb["resolve_paths"](config)
    with pytest.raises(FileNotFoundError, match="has no train.csv"):
        nb["resolve_paths"]({**config, "submit_from": None})
