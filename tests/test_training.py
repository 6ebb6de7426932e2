"""Task 3.1: the training pipeline (issue 5), driven through the notebook's own definitions on CPU."""

import math

import numpy as np
import pytest
import torch
from make_demo_studies import make_study_set
from notebook_cells import notebook_namespace

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cached(nb, tmp_path_factory):
    """Samples (with folds) and the crop cache of the session's study set, at the fixture's img_size."""
    config = {**nb["CONFIG"], "cache_dir": str(tmp_path_factory.mktemp("cache")), "num_folds": 4}
    samples, _ = nb["build_sample_table"](config)
    samples = nb["assign_folds"](samples, config)
    samples, images, masks, failures = nb["build_cache"](samples, config, workers=1)
    assert failures.empty
    return samples, images, masks


def small_config(nb, out, **changes):
    """A run small enough for CPU: 3 epochs, SWA from epoch 2, narrow GRU/attention."""
    return {**nb["CONFIG"], "output_dir": str(out), "epochs": 3, "batch_size": 8, "num_folds": 4,
            "warmup_epochs": 1, "swa_start_epoch": 2, "gru_hidden": 32, "attention_hidden": 16,
            "learning_rate": 1e-3, "backbone_lr": 1e-3, "swa_lr": 5e-4, "patience": 10, **changes}


def train(nb, cached, config, interrupt_after=None):
    """train_fold on fold 0; `interrupt_after` raises KeyboardInterrupt after that epoch (a killed run)."""
    def stop(epoch):
        if epoch == interrupt_after:
            raise KeyboardInterrupt
    return nb["train_fold"](0, *cached, config, CPU, on_epoch_end=stop)


def test_lr_schedule_warmup_then_cosine_per_step(nb):
    weights = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.SGD([{"params": [weights[0]], "lr": 1e-5}, {"params": [weights[1]], "lr": 1e-4}])
    scheduler = nb["warmup_cosine"](optimizer, {"epochs": 5, "warmup_epochs": 2}, steps_per_epoch=10)
    seen = []
    for _ in range(50):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    seen = np.array(seen)
    for base, column in ((1e-5, 0), (1e-4, 1)):
        # linear warmup over 20 steps: (step + 1) / 20 of the base LR
        for step in (0, 9, 19):
            assert seen[step, column] == pytest.approx(base * (step + 1) / 20, rel=1e-6)
        # cosine over the remaining 30 steps
        for step in (20, 35, 49):
            assert seen[step, column] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * (step - 20) / 30)),
                                                       rel=1e-6, abs=1e-12)
    assert seen[35, 1] == pytest.approx(0.5e-4)
    assert np.all(np.diff(seen[20:, 1]) < 0)


def epoch_pieces(nb, cached, config):
    samples, images, masks = cached
    subset = samples[samples["fold"] != 0].head(32)
    dataset = nb["RSNADatasetV9"](subset, images, masks, config, train=True)
    loader = nb["make_loader"](dataset, config, CPU, train=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = nb["SpineModelV9"](config)
    criterion = nb["CompetitionWeightedCE"](config["class_weights"])
    optimizer = nb["make_optimizer"](model, config)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, loader, criterion, optimizer, scaler


@pytest.mark.parametrize("clip, clipped", [(1e-6, 1.0), (1e9, 0.0)])
def test_gradient_clipping_is_active_and_logged(nb, cached, tmp_path, clip, clipped):
    config = small_config(nb, tmp_path, clip_grad_norm=clip)
    model, loader, criterion, optimizer, scaler = epoch_pieces(nb, cached, config)
    stats, lrs = nb["train_one_epoch"](model, loader, criterion, optimizer, None, scaler, CPU, config,
                                       {"nonfinite": 0}, 1)
    assert len(lrs) == len(loader) == 4
    assert stats["clipped_frac"] == clipped
    assert stats["grad_norm_max"] >= stats["grad_norm_mean"] > 1e-6  # pre-clip norms are what is logged
    assert math.isfinite(stats["train_loss"])


def test_training_steps_see_device_augmented_batches_and_predict_plain_ones(nb, cached, tmp_path):
    config = small_config(nb, tmp_path, aug_noise=0.0)
    model, loader, criterion, optimizer, scaler = epoch_pieces(nb, cached, config)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    nb["train_one_epoch"](model, loader, criterion, optimizer, None, scaler, CPU, config, {"nonfinite": 0}, 0)
    same_order = nb["make_loader"](loader.dataset, config, CPU, train=True, generator=torch.Generator().manual_seed(0))
    batches = list(same_order)
    assert len(seen) == len(batches) == 4
    for images, batch in zip(seen, batches):
        size = config["img_size"]  # the loader ships the cached margin; the model sees img_size
        augmented = nb["to_model_input"](batch["image"], batch["aug"], batch["mask"], size=size)
        torch.testing.assert_close(images, augmented, atol=1e-6, rtol=0)
        assert (images - nb["to_model_input"](batch["image"], size=size)).abs().mean() > 0.05  # not the plain crops
    seen.clear()
    plain = nb["make_loader"](nb["RSNADatasetV9"](cached[0].head(16), *cached[1:], config, train=False),
                              config, CPU, False)
    nb["predict"](model, plain, criterion, CPU, config)
    for images, batch in zip(seen, plain):
        torch.testing.assert_close(images, nb["to_model_input"](batch["image"]), atol=0, rtol=0)
    assert len(seen) == len(plain) == 1  # 16 samples, evaluation batch 2 x 8


def test_nonfinite_loss_is_reported_skipped_and_stops_the_run(nb, cached, tmp_path):
    config = small_config(nb, tmp_path, max_nonfinite_steps=2)
    model, loader, _, optimizer, scaler = epoch_pieces(nb, cached, config)

    class NaNLoss(nb["CompetitionWeightedCE"]):
        def forward(self, logits, labels):
            return super().forward(logits, labels) * float("nan")

    before = {k: v.clone() for k, v in model.named_parameters()}
    nb["WARNINGS"].clear()
    with pytest.raises(FloatingPointError, match="3 non-finite steps under precision fp32.*lower the learning"):
        nb["train_one_epoch"](model, loader, NaNLoss(config["class_weights"]), optimizer, None, scaler, CPU,
                              config, {"nonfinite": 0}, 1)
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())  # no step was taken
    assert len(nb["WARNINGS"]) == 3
    assert all("non-finite gradient norm (loss nan); step skipped; samples ['" in w for w in nb["WARNINGS"])
    # the batch's samples are named as the competition's row ids, study_condition_level
    assert any(f"'{s}_spinal_canal_stenosis_l" in nb["WARNINGS"][0] for s in loader.dataset.study_ids)


def test_swa_batchnorm_statistics_are_recomputed(nb, cached, tmp_path):
    config = small_config(nb, tmp_path)
    model, train_loader, *_ = epoch_pieces(nb, cached, config)
    loader = nb["make_loader"](train_loader.dataset, config, CPU, train=False)  # fixed batches, no shuffling
    swa = torch.optim.swa_utils.AveragedModel(model)
    swa.update_parameters(model)
    bn = [m for m in swa.module.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    copied = [m.running_mean.clone() for m in bn]
    assert all(torch.equal(c, torch.zeros_like(c)) for c in copied)  # a fresh model's statistics
    nb["recompute_swa_batchnorm"](swa, loader, CPU)
    assert sum(not torch.allclose(c, m.running_mean) for c, m in zip(copied, bn)) > 0.9 * len(bn)
    # the first BatchNorm now holds the mean of the per-batch channel means of its input
    conv = swa.module.backbone[0][0]
    with torch.no_grad():
        means = [conv(nb["to_model_input"](b["image"]).flatten(0, 1)).mean((0, 2, 3)) for b in loader]
    torch.testing.assert_close(bn[0].running_mean, torch.stack(means).mean(0), rtol=1e-4, atol=1e-5)


def test_interrupted_run_resumes_to_identical_history_and_weights(nb, cached, tmp_path):
    config = small_config(nb, tmp_path / "straight")
    straight = train(nb, cached, config)
    resumed_config = small_config(nb, tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        train(nb, cached, resumed_config, interrupt_after=2)
    assert torch.load(tmp_path / "resumed/fold0/last.pt", weights_only=False)["state"]["epoch"] == 2
    resumed = train(nb, cached, resumed_config)

    def without_time(history):
        return [{k: v for k, v in row.items() if k not in ("seconds", "val_seconds")} for row in history]

    assert [row["epoch"] for row in resumed["history"]] == [1, 2, 3]
    assert without_time(resumed["history"]) == without_time(straight["history"])
    assert resumed["lr_steps"] == straight["lr_steps"]
    for name in ("last.pt", "swa.pt"):
        a = torch.load(tmp_path / "straight/fold0" / name, weights_only=False)["model"]
        b = torch.load(tmp_path / "resumed/fold0" / name, weights_only=False)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert set(straight["evaluations"]) >= {"last", "swa"}
    np.testing.assert_array_equal(straight["evaluations"]["swa"]["probs"], resumed["evaluations"]["swa"]["probs"])
    # a changed setting refuses to resume instead of silently mixing two runs
    with pytest.raises(ValueError, match="other settings"):
        train(nb, cached, {**resumed_config, "learning_rate": 5e-4})


def test_save_gate_refuses_dead_minority_and_early_stopping(nb, cached, tmp_path):
    config = small_config(nb, tmp_path, epochs=5, patience=2, min_minority_recall=1.01, use_swa=False)
    result = train(nb, cached, config)
    assert [row["epoch"] for row in result["history"]] == [1, 2]  # stopped early: nothing ever saved
    assert not any(row["saved"] for row in result["history"])
    assert not (tmp_path / "fold0/best.pt").exists()
    assert set(result["evaluations"]) == {"last"}


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_learns_a_clear_signal_to_balanced_accuracy_080(tmp_path, pooling):
    """A generated set whose canal narrowing carries the label: a short CPU run (the demo preset, 48
    studies, fold 0 of 4) must reach balanced accuracy >= 0.8 with a model not selected on validation,
    with either pooling (the plan's Risk 1 fallback is one override away)."""
    root = tmp_path / "data"
    make_study_set(root, n_studies=48, seed=7, class_mix=(0.5, 0.25, 0.25))
    ns = notebook_namespace({"demo": True, "data_root": str(root), "output_dir": str(tmp_path / "run"),
                             "num_workers": 2, "pooling": pooling, "conditions": ["spinal_canal_stenosis"]})
    config = ns["CONFIG"]
    samples, _ = ns["build_sample_table"](config)
    cached = ns["build_cache"](ns["assign_folds"](samples, config), config, 2)[:3]
    result = ns["train_fold"](0, *cached, config, CPU)
    final = result["evaluations"][ns["final_kind"](result, config)]
    assert ns["final_kind"](result, config) == "swa"
    assert min(final["pred_counts"]) > 0  # all three classes predicted
    assert final["ba"] >= 0.8, final


def test_two_lr_groups_split_backbone_from_the_rest(nb, tmp_path):
    config = small_config(nb, tmp_path, backbone_lr=1e-5, learning_rate=1e-4)
    model = nb["SpineModelV9"](config)
    groups = nb["make_optimizer"](model, config).param_groups
    assert [g["lr"] for g in groups] == [1e-5, 1e-4]
    assert [g["weight_decay"] for g in groups] == [config["weight_decay"]] * 2
    backbone = {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in groups[0]["params"]} == backbone
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.parameters()} - backbone


def test_frozen_backbone_epoch_and_validation_every_n_epochs(nb, cached, tmp_path):
    config = small_config(nb, tmp_path, epochs=5, freeze_backbone_epochs=1, val_every=5, use_swa=False)
    after_epoch = {}

    def snapshot(epoch):
        after_epoch[epoch] = torch.load(tmp_path / "fold0/last.pt", weights_only=False)["model"]

    result = nb["train_fold"](0, *cached, config, CPU, on_epoch_end=snapshot)
    # validated: the plan's checkpoint epochs 1 and 3, and the last; epochs 2 and 4 are skipped
    assert ["val_ba" in row for row in result["history"]] == [True, False, True, False, True]
    assert nb["final_kind"](result, {**config, "final_model": "swa"}) in {"best", "last"}  # no SWA: falls back
    nb["seed_everything"](config["seed"])  # train_fold's seed for fold 0: the same initial weights
    initial = nb["SpineModelV9"](config).state_dict()
    weights = [k for k in initial if k.startswith("backbone.") and k.endswith("weight")]
    assert all(torch.equal(after_epoch[1][k], initial[k]) for k in weights)  # frozen in epoch 1
    assert not all(torch.equal(after_epoch[2][k], initial[k]) for k in weights)  # trained from epoch 2
    assert not torch.equal(after_epoch[1]["classifier.0.weight"], initial["classifier.0.weight"])


def test_holdout_studies_are_kept_out_of_every_fold(nb, cached):
    samples = cached[0]
    config = {**nb["CONFIG"], "num_folds": 3, "holdout_frac": 0.25}
    folds = nb["assign_folds"](samples, config)
    held = folds[folds["fold"] == -1]
    assert 0.15 < held["study_id"].nunique() / folds["study_id"].nunique() < 0.35
    assert set(folds["fold"]) == {-1, 0, 1, 2}
    assert folds.groupby("study_id")["fold"].nunique().max() == 1  # a study never straddles two parts
    assert nb["assign_folds"](samples, {**config, "holdout_frac": 0.0})["fold"].min() == 0


def test_holdout_evaluation_averages_the_fold_models(nb):
    import pandas as pd

    rows = pd.DataFrame({"study_id": [1, 1, 2, 3], "level": ["l1_l2", "l2_l3", "l1_l2", "l1_l2"],
                         "label": [0, 1, 2, 0], "condition": "spinal_canal_stenosis"})
    a = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.3, 0.6, 0.1]])
    b = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.7, 0.2, 0.1]])
    results = [{"fold": k, "holdout": {"kind": "swa", "rows": rows, "probs": p}, "class_weights": [1.0, 4.0, 6.0]}
               for k, p in ((0, a), (1, b))]
    table = nb["holdout_evaluation"](results)
    # fold 0 gets label 1 and 0 wrong -> recalls [0.5, 0, 1]; fold 1 gets label 2 wrong -> [1, 1, 0];
    # the average [[.85,.075,.075],[.4,.5,.1],[.35,.15,.5],[.5,.4,.1]] is right on all four
    assert table.loc["fold 0 (swa)", "BA"] == pytest.approx(0.5)
    assert table.loc["fold 1 (swa)", "BA"] == pytest.approx(round(2 / 3, 4))
    assert table.loc["ensemble of 2 folds", "BA"] == pytest.approx(1.0)
    assert table.loc["ensemble of 2 folds", "metric terms raw"] < table.loc["fold 0 (swa)", "metric terms raw"]
    assert np.isfinite(table["metric terms corrected"]).all()


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_nan_gradient_is_never_applied_and_the_next_step_trains(nb, cached, tmp_path, precision):
    """Issue 17 item 3: with the GradScaler off (bf16 and fp32 run without one), a NaN gradient used to reach
    optimizer.step. Now the step is skipped on its non-finite gradient norm: weights and AdamW state unchanged
    and finite, the step counted; the next batch trains normally."""
    config = small_config(nb, tmp_path, precision=precision)
    model, loader, criterion, optimizer, scaler = epoch_pieces(nb, cached, config)
    samples, images, masks = cached
    eight = nb["RSNADatasetV9"](samples[samples["fold"] != 0].head(8), images, masks, config, train=True)
    one_batch = nb["make_loader"](eight, config, CPU, train=True, generator=torch.Generator().manual_seed(0))
    assert len(one_batch) == 1 and nb["precision_in_use"](CPU, config) == precision
    target = model.classifier[0].weight
    hook = target.register_hook(lambda grad: grad * float("nan"))  # one parameter's gradient turns NaN
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = {"nonfinite": 0}
    stats, _ = nb["train_one_epoch"](model, one_batch, criterion, optimizer, None, scaler, CPU, config, state, 1)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before)  # no weight moved, not even the finite groups
    # BatchNorm's running statistics saw the (finite) batch in the forward pass, as on any training step
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert optimizer.state_dict()["state"] == {}  # AdamW took no step: no moments, no step count
    assert stats["nonfinite_steps"] == 1 and state["nonfinite"] == 1
    assert all(p.grad is None for p in model.parameters())  # the bad gradients were dropped
    hook.remove()
    stats, _ = nb["train_one_epoch"](model, one_batch, criterion, optimizer, None, scaler, CPU, config, state, 2)
    assert stats["nonfinite_steps"] == 0 and state["nonfinite"] == 1
    changed = model.state_dict()
    assert not torch.equal(before["classifier.0.weight"], changed["classifier.0.weight"])
    assert optimizer.state_dict()["state"][0]["step"] == 1
    assert all(torch.isfinite(v).all() for v in changed.values() if v.is_floating_point())


def test_the_stop_message_names_the_precision_that_ran_and_what_fits_it(nb, tmp_path):
    config = small_config(nb, tmp_path, precision="fp16", max_nonfinite_steps=5)
    off = torch.amp.GradScaler("cpu", enabled=False)  # a scale that can go no lower: every skip counts
    for device, ran, advice in ((torch.device("cuda"), "fp16", "precision='bf16' on a GPU that has it"),
                                (CPU, "fp32", "lower the learning rates")):  # fp16 on the CPU runs as fp32
        with pytest.raises(FloatingPointError, match=rf"6 non-finite steps under precision {ran} .*{advice}"):
            nb["skip_step"](torch.tensor(float("nan")), off, device, config, {"nonfinite": 5}, "here", "samples []")


def one_batch_loader(nb, cached, config):
    samples, images, masks = cached
    eight = nb["RSNADatasetV9"](samples[samples["fold"] != 0].head(8), images, masks, config, train=True)
    return nb["make_loader"](eight, config, CPU, train=True, generator=torch.Generator().manual_seed(0))


def batchnorm_statistics(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_a_skipped_step_puts_the_batchnorm_statistics_back(nb, cached, tmp_path):
    """Issue 23 item 7a: a NaN image makes the forward's BatchNorm update NaN; the skipped step restores the
    running statistics (and num_batches_tracked) the model had before that forward."""
    config = small_config(nb, tmp_path)
    model, _, criterion, optimizer, scaler = epoch_pieces(nb, cached, config)
    loader = one_batch_loader(nb, cached, config)
    before, moved = batchnorm_statistics(model), []

    def nan_image(module, args):  # the batch's first sample turns NaN
        images = args[0].clone()
        images[0] = float("nan")
        return (images, *args[1:])

    model.register_forward_pre_hook(nan_image)
    model.register_forward_hook(lambda module, args, out: moved.append(batchnorm_statistics(module)))
    state = {"nonfinite": 0}
    stats, _ = nb["train_one_epoch"](model, loader, criterion, optimizer, None, scaler, CPU, config, state, 1)
    assert stats["nonfinite_steps"] == 1 and state["nonfinite"] == 1
    assert len(before) > 30 and len(moved) == 1
    first_mean = next(k for k in before if k.endswith("running_mean"))
    assert torch.isnan(moved[0][first_mean]).any()  # the forward did move them (to NaN)
    assert all(int(moved[0][k]) == int(before[k]) + 1 for k in before if "num_batches" in k)
    after = batchnorm_statistics(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


class NaNOnCalls(torch.nn.Module):
    """A criterion (the notebook's weighted CE) whose loss is NaN on the given calls (1-based)."""

    def __init__(self, criterion, bad):
        super().__init__()
        self.criterion, self.bad, self.calls = criterion, bad, 0

    def forward(self, logits, labels):
        self.calls += 1
        loss = self.criterion(logits, labels)
        return loss * float("nan") if self.bad == "all" or self.calls in self.bad else loss


def test_fp16_skips_above_scale_1_are_pending_and_count_once_the_scale_is_at_its_floor(nb, cached, tmp_path):
    """Issue 23 item 7b with a CPU GradScaler (fp16's scaler). A persistent NaN from scale 8: skips at 8, 4 and 2
    are held pending, the skip at scale 1 counts all 4 and stops the run (max_nonfinite_steps 2). A skip at scale 2
    followed by an applied step counts nothing; a later skip at scale 1 then counts itself alone."""
    config = small_config(nb, tmp_path, precision="fp16", max_nonfinite_steps=2)
    model, loader, criterion, optimizer, _ = epoch_pieces(nb, cached, config)
    assert len(loader) == 4
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    scaler, state = torch.amp.GradScaler("cpu", init_scale=8.0), {"nonfinite": 0}
    nb["WARNINGS"].clear()
    with pytest.raises(FloatingPointError, match="4 non-finite steps under precision fp32"):
        nb["train_one_epoch"](model, loader, NaNOnCalls(criterion, "all"), optimizer, None, scaler, CPU, config,
                              state, 1)
    assert scaler.get_scale() == 1.0 and state == {"nonfinite": 4, "nonfinite_pending": 0}
    assert len(nb["WARNINGS"]) == 1 and "counted with the 3 skipped just before it" in nb["WARNINGS"][0]
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
    # calibration: NaN on steps 1 and 3, from scale 2
    scaler, state = torch.amp.GradScaler("cpu", init_scale=2.0), {"nonfinite": 0}
    nb["WARNINGS"].clear()
    stats, _ = nb["train_one_epoch"](model, loader, NaNOnCalls(criterion, {1, 3}), optimizer, None, scaler, CPU,
                                     config, state, 1)
    assert stats["nonfinite_steps"] == 2 and state == {"nonfinite": 1, "nonfinite_pending": 0}
    assert len(nb["WARNINGS"]) == 1 and "epoch 1 step 2:" in nb["WARNINGS"][0]
    assert "counted with" not in nb["WARNINGS"][0]
    # one skip at a high scale, then applied steps: nothing counted
    scaler, state = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10), {"nonfinite": 0}
    stats, _ = nb["train_one_epoch"](model, loader, NaNOnCalls(criterion, {1}), optimizer, None, scaler, CPU,
                                     config, state, 2)
    assert stats["nonfinite_steps"] == 1 and state == {"nonfinite": 0, "nonfinite_pending": 0}
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
