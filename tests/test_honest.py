"""Issue 13: every number the notebook reports means what its label says (SWA, train BA, gradient statistics,
pooling, resume and rerun), driven through the notebook's own definitions on CPU."""

import math

import numpy as np
import pytest
import torch
from test_training import CPU, cached, epoch_pieces, small_config, train  # noqa: F401  (cached: fixture)


def test_early_stopping_cannot_end_the_run_before_swa(nb, cached, tmp_path):  # noqa: F811
    """The save gate never passes (minority recall 1.01), so patience 2 would stop at epoch 2, before SWA
    (epochs 4-5): the run goes on, says so loudly, and the final model is the SWA one."""
    nb["WARNINGS"].clear()
    config = small_config(nb, tmp_path, epochs=5, swa_start_epoch=4, patience=2, min_minority_recall=1.01)
    result = train(nb, cached, config)
    assert [row["epoch"] for row in result["history"]] == [1, 2, 3, 4, 5]
    assert nb["final_kind"](result, config) == "swa"
    loud = [w for w in nb["WARNINGS"] if "early stopping would end the run before SWA averages epochs 4-5" in w]
    assert len(loud) == 1 and "fold 0 epoch 2" in loud[0]


def test_final_model_falls_back_swa_then_last_then_best(nb):
    config = {"final_model": "swa"}
    assert nb["final_kind"]({"evaluations": {"best": 0, "last": 0}}, config) == "last"
    assert nb["final_kind"]({"evaluations": {"best": 0}}, config) == "best"
    assert nb["final_kind"]({"evaluations": {"best": 0, "last": 0, "swa": 0}}, {"final_model": "best"}) == "best"


def test_train_ba_is_measured_in_eval_mode_on_a_fixed_subset_the_size_of_the_validation_fold(nb, cached, tmp_path):  # noqa: F811
    config = small_config(nb, tmp_path, epochs=1, use_swa=False, dropout=0.9)
    result = train(nb, cached, config)
    row = result["history"][0]
    samples, images, masks = cached
    train_rows = samples[(samples["fold"] != 0) & (samples["fold"] >= 0)]
    subset = train_rows.sample(n=(samples["fold"] == 0).sum(), random_state=config["seed"])
    model = nb["SpineModelV9"](config)
    model.load_state_dict(torch.load(tmp_path / "fold0/last.pt", weights_only=False)["model"])
    loader = nb["make_loader"](nb["RSNADatasetV9"](subset, images, masks, config, train=False), config, CPU, False)
    expected = nb["evaluate"](model, loader, nb["CompetitionWeightedCE"](config["class_weights"]), CPU, config)
    assert row["train_eval_ba"] == pytest.approx(expected["ba"])
    # the plan's epoch-1 checkpoints use it; the epoch-10 gap row is computed by checkpoint_rows from it
    metrics = {"ba": 0.5, "recall": [0.7, 0.5, 0.3], "pred_counts": [5, 5, 5]}
    gap = {r["quantity"]: r for r in nb["checkpoint_rows"](10, metrics, 0.8)}["train - val BA gap"]
    assert gap["measured"] == pytest.approx(0.3) and gap["status"] == "WARN"


def test_an_overflow_step_leaves_finite_gradient_statistics(nb, cached, tmp_path, monkeypatch):  # noqa: F811
    config = small_config(nb, tmp_path)
    model, loader, criterion, optimizer, scaler = epoch_pieces(nb, cached, config)
    real, norms = torch.nn.utils.clip_grad_norm_, []

    def clip(parameters, max_norm):  # the first step overflows, as an fp16 step skipped by the GradScaler does
        norm = real(parameters, max_norm)
        norms.append(float(norm))
        return torch.tensor(float("inf")) if len(norms) == 1 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    stats, _ = nb["train_one_epoch"](model, loader, criterion, optimizer, None, scaler, CPU, config,
                                     {"nonfinite": 0}, 1)
    assert len(norms) == 4 and stats["nonfinite_steps"] == 1
    assert stats["grad_norm_mean"] == pytest.approx(np.mean(norms[1:]), rel=1e-5)
    assert stats["grad_norm_max"] == pytest.approx(max(norms[1:]), rel=1e-5)
    assert math.isfinite(stats["clipped_frac"])


def test_mean_pooling_averages_the_unpadded_slices(nb):
    features = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[True, True, True], [False, True, True]])
    pooled, weights = nb["MeanMIL"]()(features, mask)
    torch.testing.assert_close(pooled, torch.stack([features[0].mean(0), features[1, 1:].mean(0)]))
    torch.testing.assert_close(weights, torch.tensor([[1 / 3] * 3, [0, 0.5, 0.5]]))
    model = nb["SpineModelV9"]({**nb["CONFIG"], "pooling": "mean", "gru_hidden": 8})
    assert isinstance(model.attention, nb["MeanMIL"])
    assert not any(p.requires_grad for p in model.attention.parameters())  # nothing to learn


def test_every_epoch_loaders_keep_their_workers_and_still_draw_a_new_augmentation_each_epoch(nb, cached):  # noqa: F811
    samples, images, masks = cached
    config = {**nb["CONFIG"], "num_workers": 1, "batch_size": 4}
    dataset = nb["RSNADatasetV9"](samples.head(4), images, masks, config, train=True)
    loader = nb["make_loader"](dataset, config, CPU, train=True, generator=torch.Generator().manual_seed(0))
    assert loader.persistent_workers
    assert nb["make_loader"](dataset, config, CPU, False, every_epoch=True).persistent_workers
    assert not nb["make_loader"](dataset, config, CPU, False).persistent_workers
    draws = []
    for epoch in (1, 2):
        dataset.set_epoch(epoch)
        batch = next(iter(loader))
        order = batch["index"].argsort()
        draws.append(batch["aug"][order])
    assert not torch.equal(draws[0], draws[1])  # the persistent worker saw the new epoch
    dataset.set_epoch(2)
    in_process = torch.stack([dataset[i]["aug"] for i in range(4)])
    torch.testing.assert_close(draws[1], in_process)


def test_resume_is_checked_up_front_with_the_choices(nb, cached, tmp_path, capsys):  # noqa: F811
    config = small_config(nb, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(nb, cached, config, interrupt_after=1)
    nb["resume_check"](config)
    assert "fold 0: resumes after epoch 1 (resume=False would start it again)" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"other settings .*'epochs': \(3, 4\).*resume=False"):
        nb["resume_check"]({**config, "epochs": 4})
    # the localiser's settings do not change what the classifier trains: a fold resumes under new ones
    nb["resume_check"]({**config, "loc_size": 128, "loc_epochs": 3, "loc_sigma": 1.0, "loc_augment": False,
                        "localiser": "on"})
    assert "fold 0: resumes after epoch 1" in capsys.readouterr().out


def test_resume_refuses_a_changed_sample_table_or_fold_assignment(nb, cached, tmp_path):  # noqa: F811
    samples, images, masks = cached
    config = small_config(nb, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(nb, cached, config, interrupt_after=1)
    nb["resume_check"](config, nb["data_fingerprint"](samples))  # the same data: resumable
    fewer = samples[samples["study_id"] != samples["study_id"].iloc[0]]
    refolded = nb["assign_folds"](fewer.drop(columns="fold"), {**config, "seed": 1})
    with pytest.raises(ValueError, match="sample table or fold assignment changed"):
        nb["resume_check"](config, nb["data_fingerprint"](refolded))
    with pytest.raises(ValueError, match="sample table or fold assignment changed"):
        nb["train_fold"](0, refolded, images, masks, config, CPU)


def test_a_new_run_moves_an_earlier_runs_artefacts_out_of_the_way(nb, cached, tmp_path):  # noqa: F811
    config = small_config(nb, tmp_path)
    train(nb, cached, config)  # a finished run with SWA
    for name in ("v9_Results.md", "metrics.json"):
        (tmp_path / name).write_text("an earlier run")
    fresh = {**config, "resume": False, "use_swa": False}
    nb["resume_check"](fresh)
    assert not (tmp_path / "v9_Results.md").exists() and not (tmp_path / "metrics.json").exists()
    assert (tmp_path / "superseded/v9_Results.md").read_text() == "an earlier run"
    assert (tmp_path / "superseded/fold0/swa.pt").exists()
    train(nb, cached, fresh)
    assert not (tmp_path / "fold0/swa.pt").exists()  # no SWA model of another run beside this one's


def test_warnings_printed_before_an_interruption_reach_the_resumed_run(nb, cached, tmp_path):  # noqa: F811
    config = small_config(nb, tmp_path)
    nb["WARNINGS"].clear()
    with pytest.raises(KeyboardInterrupt):
        train(nb, cached, config, interrupt_after=2)
    before = list(nb["WARNINGS"])
    assert before  # the tiny validation fold gives dead/marginal class warnings
    nb["WARNINGS"].clear()  # a new kernel session
    train(nb, cached, config)
    assert nb["WARNINGS"][:len(before)] == [f"{w} (printed before the run was resumed)" for w in before]


def test_report_writes_are_atomic(nb, tmp_path, monkeypatch):
    path = tmp_path / "v9_Results.md"
    path.write_text("old")
    nb["write_atomic"](path, "new")
    assert path.read_text() == "new" and not list(tmp_path.glob("*.tmp"))
