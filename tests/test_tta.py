"""Issue 28: five views of each crop after training (tta_shift): the setting, the dataset's wider crop, predict's
mean over the views by hand, the fold's evaluations with views while the per-epoch validation sees the crop alone,
and the projected prediction cost."""

import numpy as np
import pytest
import torch
from test_training import cached, small_config, train  # noqa: F401 (cached: the module's fixture)

CPU = torch.device("cpu")
SPINAL = "spinal_canal_stenosis"


@pytest.fixture(scope="module")
def params():
    """The parameters and definition cells, without setup: CONFIG as the user sees it, 'auto' unresolved."""
    from notebook_cells import notebook_namespace

    return notebook_namespace({}, tags=("parameters", "defs"))


def test_tta_shift_auto_is_off_for_the_plans_run_and_five_views_with_more_conditions(params):
    merge, config = params["merge_config"], params["CONFIG"]
    assert config["tta_shift"] == "auto"
    assert merge(config, {"conditions": [SPINAL]})["tta_shift"] == 0.0  # the plan's run: the plan's evaluation
    assert merge(config, {})["tta_shift"] == params["TTA_SHIFT"] == 0.05  # all five conditions
    assert merge(config, {"conditions": [SPINAL, "left_subarticular_stenosis"]})["tta_shift"] == 0.05
    assert merge(config, {"tta_shift": 0})["tta_shift"] == 0
    assert merge(config, {"conditions": [SPINAL], "tta_shift": 0.1})["tta_shift"] == 0.1
    for bad in (0.3, -0.01, True, "0.05"):
        with pytest.raises(ValueError, match=r"CONFIG\['tta_shift'\] = .*\[0, 0.2\]"):
            merge(config, {"tta_shift": bad})
    five = merge(config, {})
    assert params["tta_pad"](five) == 6  # round(0.05 x 128 = 6.4)
    assert params["tta_pad"]({**five, "tta_shift": 0.2}) == 26 and five["img_size"] + 52 <= params["crop_side"](five)


def test_the_dataset_hands_out_the_crop_with_its_pad_around_the_same_centre(nb, cached):  # noqa: F811
    samples, images, masks = cached
    config = nb["CONFIG"]
    plain = nb["RSNADatasetV9"](samples.head(3), images, masks, config, train=False)
    wide = nb["RSNADatasetV9"](samples.head(3), images, masks, config, train=False, pad=5)
    size = config["img_size"]
    for i in range(3):
        assert plain[i]["image"].shape[-2:] == (size, size) and wide[i]["image"].shape[-2:] == (size + 10, size + 10)
        assert torch.equal(wide[i]["image"][..., 5:-5, 5:-5], plain[i]["image"])
        assert torch.equal(wide[i]["mask"], plain[i]["mask"]) and wide[i]["label"] == plain[i]["label"]


class Where(torch.nn.Module):
    """A stand-in for SpineModelV9 whose answer follows where the image is bright: logits from the left-right and
    top-bottom balance of each slice and its mean brightness, attention from the left-right balance."""

    def forward(self, images, level, mask):
        x = images.mean(2)  # (B, slices, S, S)
        ramp = torch.linspace(-1, 1, x.shape[-1])
        across, down = (x * ramp).mean((-2, -1)), (x * ramp[:, None]).mean((-2, -1))
        logits = 20 * torch.stack([across.mean(1), down.mean(1), x.mean((1, 2, 3))], 1) + level[:, None] / 10
        return logits, torch.softmax(10 * across, 1)


def test_predict_averages_the_five_shifted_views_by_hand(nb, cached, tmp_path):  # noqa: F811
    """By hand: the model on the crop and on the crop moved 4 px up, down, left and right (slices of the cached
    crop), softmax averaged, and the attention averaged; the loss is that mean's weighted cross entropy. The crop
    alone gives the model's own answer, as before views existed."""
    samples, images, masks = cached
    config = small_config(nb, tmp_path)
    rows = samples.head(10)
    model = Where()  # an untrained SpineModelV9 answers its head's prior whatever it is shown
    criterion = nb["CompetitionWeightedCE"](config["class_weights"])
    d, size = 4, config["img_size"]
    outs = {}
    for pad in (0, d):
        loader = nb["make_loader"](nb["RSNADatasetV9"](rows, images, masks, config, train=False, pad=pad),
                                   config, CPU, False)
        outs[pad] = nb["predict"](model, loader, criterion, CPU, config)
    cached_side = images.shape[-1]
    start = (cached_side - size) // 2
    level = torch.tensor(rows["target_idx"].to_numpy())
    mask = torch.from_numpy(masks[rows["cache_index"].to_numpy()])
    stacks = torch.from_numpy(np.asarray(images[rows["cache_index"].to_numpy()])).unsqueeze(2)  # (B, n, 1, S, S)
    probs, attention = [], []
    with torch.no_grad():
        for dy, dx in ((0, 0), (-d, 0), (d, 0), (0, -d), (0, d)):
            view = stacks[..., start + dy:start + dy + size, start + dx:start + dx + size]
            logits, attn = model(nb["to_model_input"](view), level, mask)
            probs.append(torch.softmax(logits, 1))
            attention.append(attn)
    by_hand = torch.stack(probs).mean(0)
    np.testing.assert_allclose(outs[0]["probs"], probs[0].numpy(), atol=1e-6)  # the crop alone
    np.testing.assert_allclose(outs[d]["probs"], by_hand.numpy(), atol=1e-6)
    np.testing.assert_allclose(outs[d]["attention"], torch.stack(attention).mean(0).numpy(), atol=1e-6)
    labels = torch.tensor(rows["label"].to_numpy())
    assert outs[d]["loss"] == pytest.approx(float(criterion(by_hand.log(), labels)), abs=1e-6)
    assert np.abs(outs[d]["probs"] - outs[0]["probs"]).max() > 1e-4  # the views do move the answer


def f_loader(nb, cached, config, pad):  # noqa: F811
    """Fold 0's validation rows, evaluation crops `pad` pixels wider each side."""
    samples, images, masks = cached
    dataset = nb["RSNADatasetV9"](samples[samples["fold"] == 0], images, masks, config, train=False, pad=pad)
    return nb["make_loader"](dataset, config, CPU, False)


def test_a_fold_evaluates_with_five_views_and_validates_each_epoch_on_the_crop_alone(nb, cached, tmp_path,  # noqa
                                                                                    monkeypatch, capsys):
    """A 2-epoch fold with tta_shift 0.1: every per-epoch validation batch is img_size wide, the final evaluations
    (and nothing else) are img_size + 2 x 6 px wide, and the final model's out-of-fold probabilities are its five-view
    predictions on the validation rows. Run again with the crop alone, the finished fold is evaluated again, not
    trained again."""
    config = small_config(nb, tmp_path, epochs=2, swa_start_epoch=2, tta_shift=0.1)
    pad = nb["tta_pad"](config)
    assert pad == 6
    sides, predict = [], nb["predict"]

    def spy(model, loader, *args):
        sides.append(loader.dataset.side)
        return predict(model, loader, *args)

    monkeypatch.setitem(nb, "predict", spy)
    result = train(nb, cached, config)
    size, n = config["img_size"], len(result["evaluations"])
    assert n >= 2 and sides[-n:] == [size + 2 * pad] * n  # the final evaluations (last, swa, best if saved)
    assert len(sides) > n and set(sides[:-n]) == {size}  # every per-epoch validation (and train-BA probe)
    final = torch.load(tmp_path / "fold0" / "final.pt", weights_only=False)
    model = nb["SpineModelV9"]({**config, "pretrained": "none"})
    model.load_state_dict(final["model"])
    loader = f_loader(nb, cached, config, pad)
    again = predict(model, loader, nb["CompetitionWeightedCE"](final["class_weights"]), CPU, config)
    np.testing.assert_allclose(result["evaluations"][final["kind"]]["probs"], again["probs"], atol=1e-6)

    # the same fold, finished, with the crop alone: not trained again (tta_shift is not a training setting), its
    # final models evaluated again on img_size crops; the first run's five-view probabilities differ from these
    sides.clear()
    alone = train(nb, cached, {**config, "tta_shift": 0.0})
    assert capsys.readouterr().out.count("evaluated again on tta_shift 0") == 1
    assert alone["history"] == result["history"] and alone["tta_shift"] == 0.0 and result["tta_shift"] == 0.1
    assert sides == [size] * len(alone["evaluations"])
    one_view = predict(model, f_loader(nb, cached, config, pad=0), nb["CompetitionWeightedCE"](final["class_weights"]),
                       CPU, config)
    np.testing.assert_allclose(alone["evaluations"][final["kind"]]["probs"], one_view["probs"], atol=1e-6)
    assert np.abs(one_view["probs"] - again["probs"]).max() > 1e-4


def test_projected_prediction_counts_five_classifier_passes_with_views(params):
    config = params["merge_config"](params["CONFIG"], {})
    localisers, five = params["test_study_flops"](config)
    localisers_one, one = params["test_study_flops"]({**config, "tta_shift": 0.0})
    assert five == pytest.approx(5 * one) and localisers == localisers_one
    assert params["views_wording"]({**config, "tta_shift": 0.0}) == ""
    assert "five views" in params["views_wording"](config) and "6 px" in params["views_wording"](config)
