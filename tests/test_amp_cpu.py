"""Mixed precision on the CPU (issue 14): bf16 autocast through the notebook's own train_one_epoch, predict and
SWA's BatchNorm recompute, and its GradScaler path. What only a GPU shows (fp16, pinned memory, peak memory)
is bench/gpu_check.py's."""

import copy
import math

import pytest
import torch

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pieces(nb, tmp_path_factory):
    """A bf16 run's config (tiny: bf16 is emulated, ~14x slower than fp32, on CPUs without bf16 instructions),
    an 8-sample training set (2 steps) and an 8-sample evaluation set from the session's studies."""
    config = {**nb["CONFIG"], "cache_dir": str(tmp_path_factory.mktemp("cache")), "num_folds": 4,
              "precision": "bf16", "img_size": 32, "num_slices": 3, "batch_size": 4, "gru_hidden": 16,
              "attention_hidden": 8, "learning_rate": 1e-3, "backbone_lr": 1e-3}
    samples, _ = nb["build_sample_table"](config)
    samples = nb["assign_folds"](samples, config)
    samples, images, masks, failures = nb["build_cache"](samples, config, workers=1)
    assert failures.empty
    train = nb["RSNADatasetV9"](samples[samples["fold"] != 0].head(8), images, masks, config, train=True)
    held = nb["RSNADatasetV9"](samples[samples["fold"] == 0].head(8), images, masks, config, train=False)
    one_step = nb["RSNADatasetV9"](samples[samples["fold"] != 0].head(4), images, masks, config, train=True)
    return config, train, held, one_step


def model_and_loader(nb, config, dataset):
    torch.manual_seed(0)
    model = nb["SpineModelV9"](config)
    loader = nb["make_loader"](dataset, config, CPU, train=True, generator=torch.Generator().manual_seed(0))
    return model, loader, nb["CompetitionWeightedCE"](config["class_weights"]), nb["make_optimizer"](model, config)


def conv_output_dtypes(model):
    """dtypes the backbone's first convolution produces, recorded per call: bf16 means autocast really ran."""
    seen = []
    model.backbone[0][0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    return seen


def test_bf16_is_what_runs_on_the_cpu(nb):
    config = nb["CONFIG"]
    assert nb["precision_in_use"](CPU, {**config, "precision": "bf16"}) == "bf16"
    assert nb["precision_in_use"](CPU, {**config, "precision": "fp16"}) == "fp32"
    with nb["autocast"](CPU, {**config, "precision": "bf16"}):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")


def test_bf16_training_epoch_has_finite_losses_and_changes_the_float32_weights(nb, pieces):
    config, train, *_ = pieces
    model, loader, criterion, optimizer = model_and_loader(nb, config, train)
    before = copy.deepcopy(model.state_dict())
    dtypes = conv_output_dtypes(model)
    # as train_fold makes it: enabled only for fp16, so here a pass-through
    scaler = torch.amp.GradScaler("cpu", enabled=nb["precision_in_use"](CPU, config) == "fp16")
    state = {"nonfinite": 0}
    stats, lrs = nb["train_one_epoch"](model, loader, criterion, optimizer, None, scaler, CPU, config, state, 1)
    assert dtypes == [torch.bfloat16] * 2  # 8 samples, batch 4: every step under bf16 autocast
    assert state["nonfinite"] == 0 and math.isfinite(stats["train_loss"]) and 0.3 < stats["train_loss"] < 5
    assert math.isfinite(stats["grad_norm_max"]) and stats["grad_norm_max"] > 0
    after = model.state_dict()
    for name in ("backbone.0.0.weight", "gru.weight_ih_l0", "attention.score.0.weight", "classifier.3.weight"):
        if name in after:
            assert after[name].dtype == torch.float32, name  # autocast keeps float32 master weights
            assert not torch.equal(after[name], before[name]), f"{name} did not change"
    changed = sum(not torch.equal(after[k], before[k]) for k in after if after[k].is_floating_point())
    assert changed > 0.9 * sum(v.is_floating_point() for v in after.values())


def test_grad_scaler_on_the_cpu_skips_overflowing_steps_and_halves_its_scale(nb, pieces):
    """The GradScaler path train_one_epoch takes for fp16 on CUDA, on the CPU: a scale that overflows the
    gradients makes the step a no-op and halves the scale; an ordinary scale steps and keeps it."""
    config, *_, one_step = pieces
    model, loader, criterion, optimizer = model_and_loader(nb, config, one_step)
    before = copy.deepcopy(model.state_dict())
    huge = 3e38  # loss x 3e38 overflows float32 in the backward pass
    scaler = torch.amp.GradScaler("cpu", init_scale=huge)
    nb["train_one_epoch"](model, loader, criterion, optimizer, None, scaler, CPU, config, {"nonfinite": 0}, 1)
    assert scaler.get_scale() == pytest.approx(huge * 0.5)  # the one step skipped, the scale halved
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if "running" not in k
               and "num_batches" not in k)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    stats, _ = nb["train_one_epoch"](model, loader, criterion, optimizer, None, scaler, CPU, config,
                                     {"nonfinite": 0}, 1)
    assert scaler.get_scale() == 2.0 ** 16 and math.isfinite(stats["grad_norm_max"])
    assert not torch.equal(model.state_dict()["classifier.3.weight"], before["classifier.3.weight"])


def test_bf16_predict_returns_float32_probabilities_and_attention_close_to_fp32(nb, pieces):
    config, train, held, _ = pieces
    model, *_ = model_and_loader(nb, config, train)
    criterion = nb["CompetitionWeightedCE"](config["class_weights"])
    loader = nb["make_loader"](held, config, CPU, train=False)
    dtypes = conv_output_dtypes(model)
    bf16 = nb["predict"](model, loader, criterion, CPU, config)
    assert dtypes == [torch.bfloat16]  # 8 samples in one evaluation batch of 2 x 4
    fp32 = nb["predict"](model, loader, criterion, CPU, {**config, "precision": "fp32"})
    assert dtypes[1:] == [torch.float32]
    for key in ("probs", "attention"):
        assert bf16[key].dtype == fp32[key].dtype == "float32", key
        assert bf16[key].shape == fp32[key].shape == (8, 3 if key == "probs" else config["num_slices"])
        assert abs(bf16[key].sum(1) - 1).max() < 1e-5, key
        assert abs(bf16[key] - fp32[key]).max() < 0.05, key  # bf16 keeps ~3 significant digits
    assert math.isfinite(bf16["loss"]) and bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05)


def test_swa_batchnorm_recompute_after_bf16_training_then_bf16_predict(nb, pieces):
    config, train, held, _ = pieces
    model, loader, criterion, optimizer = model_and_loader(nb, config, train)
    swa = torch.optim.swa_utils.AveragedModel(model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for epoch in (1, 2):
        nb["train_one_epoch"](model, loader, criterion, optimizer, None, scaler, CPU, config, {"nonfinite": 0}, epoch)
        swa.update_parameters(model)
    bn = [m for m in swa.module.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    copied = [m.running_var.clone() for m in bn]
    nb["recompute_swa_batchnorm"](swa, nb["make_loader"](train, config, CPU, train=False), CPU)
    assert all(torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all() for m in bn)
    assert all(m.running_mean.dtype == torch.float32 for m in bn)
    assert sum(not torch.allclose(c, m.running_var) for c, m in zip(copied, bn)) > 0.9 * len(bn)
    out = nb["predict"](swa, nb["make_loader"](held, config, CPU, train=False), criterion, CPU, config)
    assert out["probs"].dtype == "float32" and math.isfinite(out["loss"])
    assert abs(out["probs"].sum(1) - 1).max() < 1e-5
