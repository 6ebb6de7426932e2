"""Issue 17 item 4: long runs are planned (project_run), stop cleanly at the time budget, keep each finished
fold, and continue in a new session from a previous run's (read-only) output folder."""

import shutil
import stat

import numpy as np
import pandas as pd
import pytest
import torch
from test_training import CPU, cached, small_config, train  # noqa: F401  (cached: fixture)


def test_project_run_counts_epochs_validations_finish_and_later_folds(nb):
    config = {**nb["CONFIG"], "epochs": 5, "val_every": 1, "train_folds": [0, 1, 2], "time_budget_h": 0.5}
    plan = nb["project_run"](100.0, 10.0, config, {"train": 80, "val": 20, "holdout": 0}, epochs_done=1,
                             folds_after=2, elapsed_s=110.0)
    # epochs 2-5: 4 x 100 s training + 4 validations + train-BA probes at epochs 3 and 5 (6 x 10 s);
    # finish: SWA BatchNorm over 80 rows at 0.5 s/row + 3 model evaluations = 70 s
    assert plan["fold_s"] == pytest.approx(400 + 60 + 70)
    assert plan["whole_fold_s"] == pytest.approx(500 + 80 + 70)  # 5 validations + probes at 1, 3, 5
    assert plan["run_s"] == pytest.approx(110 + 530 + 2 * 650)
    assert "time budget 0.5 h: the budget ends first" in plan["text"]
    assert "no session limit known here" in plan["text"]  # the tests run locally


@pytest.mark.parametrize("epochs_in_time", [1, 2])
def test_the_time_budget_keeps_the_folds_finish_free(nb, cached, tmp_path, monkeypatch, epochs_in_time):  # noqa: F811
    """Epochs of 100 s training, every evaluation 10 s (epoch 1: validation and the plan's train-BA probe, 120 s; epoch
    2: 110 s). The fold's finish (SWA's BatchNorm pass over the training rows and the hold-out predictions at the
    validation's rate, three evaluations) is kept free like the work after training: a deadline at 240 s + the
    finish lets 2 epochs run (after epoch 1, 120 s are left beside the finish); a second less, and the fold stops
    after epoch 1."""
    clock, real = fake_epochs(nb, monkeypatch), nb["evaluate"]

    def evaluate(*args):
        clock[0] += 10.0
        return real(*args)

    monkeypatch.setitem(nb, "evaluate", evaluate)
    samples = cached[0]
    rows = {"train": int(((samples["fold"] != 0) & (samples["fold"] >= 0)).sum()),
            "val": int((samples["fold"] == 0).sum()), "holdout": int((samples["fold"] < 0).sum())}
    finish = 10.0 / rows["val"] * (rows["train"] + rows["holdout"]) + 3 * 10.0  # by hand
    assert nb["finish_seconds"]([{"val_seconds": 10.0}], rows) == pytest.approx(finish)
    deadline = 240.0 + finish - (1.0 if epochs_in_time == 1 else 0.0)
    result = nb["train_fold"](0, *cached, small_config(nb, tmp_path), CPU, deadline=deadline)
    assert result["stopped_by"] == "budget" and result["epochs_trained"] == epochs_in_time


def test_settings_for_long_runs_are_checked(nb):
    with pytest.raises(ValueError, match="time_budget_h"):
        nb["check_settings"]({**nb["CONFIG"], "time_budget_h": -1})
    with pytest.raises(ValueError, match="continue_from.*resume=False"):
        nb["check_settings"]({**nb["CONFIG"], "continue_from": "/somewhere", "resume": False})
    assert nb["time_budget_s"]({"time_budget_h": 0}) is None and nb["time_budget_s"]({"time_budget_h": 2}) == 7200


def fake_epochs(nb, monkeypatch, seconds=100.0):
    """A clock that stands still except that each training epoch takes `seconds`."""
    clock = [0.0]
    real = nb["run_epoch"]

    def run_epoch(*args):
        clock[0] += seconds
        return real(*args)

    monkeypatch.setitem(nb, "now", lambda: clock[0])
    monkeypatch.setitem(nb, "run_epoch", run_epoch)
    monkeypatch.setitem(nb, "RUN_START", 0.0)
    return clock


@pytest.mark.parametrize("deadline, stopped_after, kind", [(150.0, 1, "last"), (250.0, 2, "swa")])
def test_the_time_budget_ends_the_fold_cleanly_and_a_new_session_continues_it(
        nb, cached, tmp_path, monkeypatch, deadline, stopped_after, kind):  # noqa: F811
    """Epochs of 100 s: with 150 s the 2nd epoch would not end in time (stop after 1, no SWA yet: last);
    with 250 s the 3rd would not (stop after 2, SWA over epoch 2)."""
    fake_epochs(nb, monkeypatch)
    config = small_config(nb, tmp_path)  # 3 epochs, SWA from epoch 2
    nb["WARNINGS"].clear()
    result = nb["train_fold"](0, *cached, config, CPU, deadline=deadline)
    assert [row["epoch"] for row in result["history"]] == list(range(1, stopped_after + 1))
    assert result["stopped_by"] == "budget" and result["epochs_trained"] == stopped_after
    assert nb["final_kind"](result, config) == kind and set(result["evaluations"]) >= {kind}
    assert f"fold 0: stopped by the time budget after epoch {stopped_after} of 3" in nb["WARNINGS"]
    final = torch.load(tmp_path / "fold0/final.pt", weights_only=False)
    assert final["kind"] == kind and set(final) == {"model", "kind", "config", "class_weights"}
    assert (tmp_path / "fold0/result.pt").exists()
    # a new session (no deadline): the fold is not taken as finished, it trains its remaining epochs
    calls = []
    result = nb["train_fold"](0, *cached, config, CPU, on_epoch_end=calls.append)
    assert calls == list(range(stopped_after + 1, 4)) and result["stopped_by"] is None
    assert [row["epoch"] for row in result["history"]] == [1, 2, 3]


def test_a_fold_that_cannot_train_one_epoch_in_the_budget_is_not_started(nb, tmp_path, monkeypatch):
    clock = fake_epochs(nb, monkeypatch)
    trained = []

    def train_fold(fold, *args, **kwargs):  # a finished fold whose epochs took 100 s each
        trained.append(fold)
        clock[0] += 150.0
        rows = pd.DataFrame({"study_id": [1, 2], "condition": "spinal_canal_stenosis", "level": ["l1_l2", "l1_l2"],
                             "label": [0, 1], "cache_index": [0, 1]})
        return {"fold": fold, "history": [{"seconds": 100.0}], "val_rows": rows, "epochs_trained": 1,
                "class_weights": [1.0, 2.0, 4.0],
                "evaluations": {"last": {"probs": np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1]]), "ba": 1.0,
                                         "attention": np.full((2, 7), 1 / 7)}}}

    monkeypatch.setitem(nb, "train_fold", train_fold)
    config = {**nb["CONFIG"], "output_dir": str(tmp_path), "num_folds": 4, "train_folds": [0, 1, 2],
              "time_budget_h": 320 / 3600}  # 320 s: fold 0 ends at 150 s, fold 1 at 300 s, 20 s left
    nb["WARNINGS"].clear()
    results = nb["train_folds"](None, None, None, config, CPU)
    assert trained == [0, 1] and [r["fold"] for r in results] == [0, 1]
    assert any(w.startswith("fold 2 not started") for w in nb["WARNINGS"])
    assert "Folds finished: 2 of 3" in (tmp_path / "progress.md").read_text()
    assert len(pd.read_csv(tmp_path / "fold1/oof.csv")) == 2


def test_each_finished_fold_is_written_and_not_trained_again(nb, cached, tmp_path):  # noqa: F811
    config = small_config(nb, tmp_path, epochs=2, train_folds=[0, 1])
    calls = []

    def killed_in_fold_1(fold, epoch):
        calls.append((fold, epoch))
        if (fold, epoch) == (1, 1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        nb["train_folds"](*cached, config, CPU, on_epoch_end=killed_in_fold_1)
    assert calls == [(0, 1), (0, 2), (1, 1)]
    first = torch.load(tmp_path / "fold0/result.pt", weights_only=False)
    oof = pd.read_csv(tmp_path / "fold0/oof.csv")
    assert len(oof) == len(first["val_rows"]) and (oof["model"] == "swa").all()
    assert oof["condition"].eq("spinal_canal_stenosis").all() and {"level", "label", "pc_severe"} <= set(oof)
    np.testing.assert_allclose(oof[["p_normal_mild", "p_moderate", "p_severe"]].to_numpy(),
                               first["evaluations"]["swa"]["probs"], rtol=1e-6)
    assert "Folds finished: 1 of 2" in (tmp_path / "progress.md").read_text()
    final = torch.load(tmp_path / "fold0/final.pt", weights_only=False)
    swa = torch.load(tmp_path / "fold0/swa.pt", weights_only=False)["model"]
    assert final["kind"] == "swa" and all(torch.equal(final["model"][k], swa[k]) for k in swa)
    calls.clear()
    results = nb["train_folds"](*cached, config, CPU, on_epoch_end=lambda fold, epoch: calls.append((fold, epoch)))
    assert calls == [(1, 2)]  # no epoch of fold 0 ran; fold 1 resumed after its epoch 1
    assert [r["fold"] for r in results] == [0, 1]
    np.testing.assert_array_equal(results[0]["evaluations"]["swa"]["probs"], first["evaluations"]["swa"]["probs"])
    assert "Folds finished: 2 of 2" in (tmp_path / "progress.md").read_text()


def test_continue_from_a_read_only_copy_gives_the_uninterrupted_run(nb, cached, tmp_path):  # noqa: F811
    straight = train(nb, cached, small_config(nb, tmp_path / "straight"))
    with pytest.raises(KeyboardInterrupt):
        train(nb, cached, small_config(nb, tmp_path / "session1"), interrupt_after=2)
    previous = tmp_path / "input/session1"  # as an attached notebook output is mounted: read-only
    shutil.copytree(tmp_path / "session1", previous)
    for path in [previous, *previous.rglob("*")]:
        path.chmod(stat.S_IREAD | stat.S_IEXEC if path.is_dir() else stat.S_IREAD)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in previous.rglob("*") if p.is_file()}
    config = small_config(nb, tmp_path / "session2", continue_from=str(previous))
    (tmp_path / "session2").mkdir()
    nb["continue_from_previous"](config)
    nb["resume_check"](config, nb["data_fingerprint"](cached[0]))  # settings and data checked
    calls = []
    resumed = nb["train_fold"](0, *cached, config, CPU, on_epoch_end=calls.append)
    assert calls == [3]
    assert before == {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in previous.rglob("*") if p.is_file()}
    for name in ("last.pt", "swa.pt", "final.pt"):
        a = torch.load(tmp_path / "straight/fold0" / name, weights_only=False)["model"]
        b = torch.load(tmp_path / "session2/fold0" / name, weights_only=False)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for kind in straight["evaluations"]:
        np.testing.assert_array_equal(straight["evaluations"][kind]["probs"], resumed["evaluations"][kind]["probs"])
    with pytest.raises(ValueError, match="continue_from = output_dir"):
        nb["continue_from_previous"]({**config, "continue_from": config["output_dir"]})


def test_an_older_last_pt_that_stopped_early_stays_stopped_on_resume(nb, cached, tmp_path, monkeypatch):  # noqa: F811
    """A last.pt written before 'stopped_by' existed says 'stopped_early': True; resuming it must not train on."""
    fake_epochs(nb, monkeypatch)
    config = small_config(nb, tmp_path)  # 3 epochs
    nb["train_fold"](0, *cached, config, CPU, deadline=150.0)  # stops after epoch 1: last.pt exists
    path = tmp_path / "fold0" / "last.pt"
    ckpt = torch.load(path, weights_only=False)
    del ckpt["state"]["stopped_by"]
    ckpt["state"]["stopped_early"] = True
    torch.save(ckpt, path)
    result = nb["train_fold"](0, *cached, config, CPU)  # no deadline: only the old early stop can end it
    assert result["stopped_by"] == "early" and result["epochs_trained"] == 1
    assert [row["epoch"] for row in result["history"]] == [1]
