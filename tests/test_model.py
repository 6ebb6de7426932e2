"""Tasks 1.2, 1.3 and 2.1 of the plan (attention-MIL, class-weighted CE, the full model), plus the
backbone loader: the plan's validation items, run on the notebook's own definitions (random init, CPU)."""

import copy
import math
import urllib.error

import pytest
import torch
import torch.nn as nn
import torchvision

# ---------------------------------------------------------------- Task 1.2: AttentionMIL


@pytest.fixture(scope="module")
def features():
    return torch.randn(4, 7, 1024, generator=torch.Generator().manual_seed(0))


def test_attention_mil_shapes_and_weights(nb, features):
    torch.manual_seed(0)
    attended, weights = nb["AttentionMIL"](1024, 256)(features)
    assert attended.shape == (4, 1024)
    assert weights.shape == (4, 7)
    assert torch.all(weights > 0)
    torch.testing.assert_close(weights.sum(1), torch.ones(4))


def test_attention_mil_output_is_the_weighted_sum(nb, features):
    torch.manual_seed(0)
    attended, weights = nb["AttentionMIL"](1024, 256)(features)
    by_hand = torch.zeros(4, 1024)
    for b in range(4):
        for j in range(7):
            by_hand[b] += weights[b, j] * features[b, j]
    torch.testing.assert_close(attended, by_hand, rtol=1e-5, atol=1e-6)


def test_attention_mil_mask_gives_padded_slices_zero_weight(nb, features):
    torch.manual_seed(0)
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[0, :2] = False   # first two slices padded (series edge)
    mask[1, -3:] = False  # last three padded
    mask[3, [0, 6]] = False
    module = nb["AttentionMIL"](1024, 256)
    attended, weights = module(features, mask)
    assert torch.all(weights[~mask] == 0)
    assert torch.all(weights[mask] > 0)
    torch.testing.assert_close(weights.sum(1), torch.ones(4))
    by_hand = sum(weights[1, j] * features[1, j] for j in range(4))
    torch.testing.assert_close(attended[1], by_hand, rtol=1e-5, atol=1e-6)
    # padded slices change nothing: the same as attention over the kept slices alone
    alone, alone_weights = module(features[1:2, :4])
    torch.testing.assert_close(attended[1:2], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights[1:2, :4], alone_weights)


def test_attention_mil_gradients_reach_every_parameter(nb, features):
    torch.manual_seed(0)
    module = nb["AttentionMIL"](1024, 256)
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[2, :3] = False
    attended, _ = module(features, mask)
    (attended ** 2).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- Task 1.3: CompetitionWeightedCE

LOGITS = [[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-1.5, 1.0, 2.5], [0.0, 3.0, -2.0], [1.0, 1.0, 1.0]]
LABELS = [0, 2, 1, 1, 2]


def test_weighted_ce_equals_hand_computation(nb):
    w = [1.0, 4.0, 6.0]
    numerator = denominator = 0.0
    for row, y in zip(LOGITS, LABELS):
        log_softmax_y = row[y] - math.log(sum(math.exp(v) for v in row))
        numerator += w[y] * -log_softmax_y
        denominator += w[y]
    loss = nb["CompetitionWeightedCE"](w)(torch.tensor(LOGITS), torch.tensor(LABELS))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(numerator / denominator, rel=1e-6)


def test_weighted_ce_weights_are_a_buffer_that_follows_the_module(nb):
    criterion = nb["CompetitionWeightedCE"]([1.0, 4.0, 6.0])
    assert any(b is criterion.weights for b in criterion.buffers())
    assert list(criterion.state_dict()) == ["weights"]
    torch.testing.assert_close(criterion.state_dict()["weights"], torch.tensor([1.0, 4.0, 6.0]))
    assert list(criterion.parameters()) == []  # not trained
    moved = criterion.to(torch.device("cpu"))
    assert moved.weights.device.type == "cpu"
    assert nb["CompetitionWeightedCE"]([1.0, 4.0, 6.0]).to(torch.float64).weights.dtype == torch.float64
    assert nb["CompetitionWeightedCE"]([1.0, 4.0, 6.0]).to("meta").weights.device.type == "meta"
    # a checkpoint restores changed weights (the plan's class-weight actions are saved with the run)
    changed = nb["CompetitionWeightedCE"]([1.0, 5.0, 8.0])
    criterion.load_state_dict(changed.state_dict())
    torch.testing.assert_close(criterion.weights, torch.tensor([1.0, 5.0, 8.0]))


def test_weighted_ce_still_works_after_a_dtype_move(nb):
    criterion = nb["CompetitionWeightedCE"]([1.0, 4.0, 6.0]).to(torch.float64)
    loss = criterion(torch.tensor(LOGITS), torch.tensor(LABELS))
    expected = nb["CompetitionWeightedCE"]([1.0, 4.0, 6.0])(torch.tensor(LOGITS), torch.tensor(LABELS))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_weighted_ce_reasonable_range_on_random_logits(nb):
    g = torch.Generator().manual_seed(0)
    criterion = nb["CompetitionWeightedCE"]([1.0, 4.0, 6.0])
    for _ in range(5):
        logits = torch.randn(512, 3, generator=g)
        labels = torch.randint(0, 3, (512,), generator=g)
        assert 0.5 < criterion(logits, labels).item() < 3.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_weighted_ce_on_cuda_under_autocast(nb):
    device = torch.device("cuda")
    criterion = nb["CompetitionWeightedCE"]([1.0, 4.0, 6.0]).to(device)
    assert criterion.weights.device.type == "cuda"
    torch.manual_seed(0)
    layer = nn.Linear(16, 3).to(device)
    x = torch.randn(8, 16, device=device)
    labels = torch.tensor(LABELS + [0, 1, 2], device=device)
    with torch.autocast("cuda", dtype=torch.float16):
        logits = layer(x)
        assert logits.dtype == torch.float16
        loss = criterion(logits, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
    on_cpu = nb["CompetitionWeightedCE"]([1.0, 4.0, 6.0])(logits.detach().float().cpu(), labels.cpu())
    assert loss.item() == pytest.approx(on_cpu.item(), rel=1e-5)


# ---------------------------------------------------------------- Task 2.1: SpineModelV9 (the plan's sizes)


@pytest.fixture(scope="module")
def plan_config(nb):
    return {**nb["CONFIG"], "backbone": "efficientnet_v2_s", "pretrained": "none", "gru_hidden": 512,
            "gru_layers": 2, "gru_dropout": 0.3, "attention_hidden": 256, "dropout": 0.35}


@pytest.fixture(scope="module")
def plan_model(nb, plan_config):
    torch.manual_seed(0)
    return nb["SpineModelV9"](plan_config).eval()


def tiny_batch(size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 7, 3, size, size, generator=g), torch.tensor([0, 4])


def test_model_structure_matches_the_plan(plan_model):
    m = plan_model
    assert isinstance(m.gru, nn.GRU)
    assert (m.gru.input_size, m.gru.hidden_size, m.gru.num_layers) == (1280, 512, 2)
    assert m.gru.bidirectional and m.gru.batch_first and m.gru.dropout == 0.3
    assert isinstance(m.level_embedding, nn.Embedding)
    assert (m.level_embedding.num_embeddings, m.level_embedding.embedding_dim) == (5, 256)
    att = m.attention.attention
    assert (att[0].in_features, att[0].out_features) == (1024, 256) and isinstance(att[1], nn.Tanh)
    assert (att[2].in_features, att[2].out_features) == (256, 1)
    linears = [layer for layer in m.classifier if isinstance(layer, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(2 * 512 + 256, 512), (512, 3)]
    assert linears[0].in_features == 1280
    dropouts = [layer for layer in m.classifier if isinstance(layer, nn.Dropout)]
    assert [d.p for d in dropouts] == [0.35]
    assert m.classifier[-1].bias.tolist() == [2.0, -2.5, -3.0]


def test_forward_with_mask(plan_model):
    images, levels = tiny_batch(32)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :2] = False  # the second sample sits at the series edge
    with torch.no_grad():
        logits, weights = plan_model(images, levels, mask)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert weights.shape == (2, 7)
    torch.testing.assert_close(weights.sum(1), torch.ones(2))
    assert torch.all(weights[1, :2] == 0) and torch.all(weights[mask] > 0)


def test_forward_at_img_size_64_without_mask(plan_model):
    images, levels = tiny_batch(64, seed=1)
    with torch.no_grad():
        logits, weights = plan_model(images, torch.tensor([1, 3]))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert weights.shape == (2, 7) and torch.all(weights > 0)
    torch.testing.assert_close(weights.sum(1), torch.ones(2))


def test_initial_softmax_is_the_head_prior(plan_model):
    """The last bias is [2.0, -2.5, -3.0]; its weights (|w| <= 1/sqrt(512) = 0.044) move the softmax
    by < 0.005 at initialisation on zero or normalised input (measured); asserted within 0.01."""
    exps = [math.exp(v) for v in (2.0, -2.5, -3.0)]
    prior = torch.tensor([e / sum(exps) for e in exps])  # 0.9825, 0.0109, 0.0066
    assert plan_model.classifier[-1].weight.abs().max() <= 1 / math.sqrt(512)
    with torch.no_grad():
        for images in (torch.zeros(2, 7, 3, 32, 32), tiny_batch(32, seed=2)[0]):
            logits, _ = plan_model(images, torch.tensor([2, 0]))
            probs = torch.softmax(logits, 1)
            assert (probs - prior).abs().max() < 0.01, probs


def test_parameter_table_counts(nb, plan_model):
    table = nb["parameter_table"](plan_model)
    children = dict(plan_model.named_children())
    assert list(table.index) == [*children, "total"]
    for name, module in children.items():
        assert table[name] == sum(p.numel() for p in module.parameters()), name
    assert table["total"] == sum(table[name] for name in children)
    assert table["total"] == sum(p.numel() for p in plan_model.parameters())
    # hand formulas of the plan's components (GRU: 3 gates x (input + hidden weights + 2 biases) per direction)
    gru_layer = lambda inp: 2 * 3 * (512 * inp + 512 * 512 + 2 * 512)  # noqa: E731
    assert table["gru"] == gru_layer(1280) + gru_layer(1024) == 10_235_904
    assert table["attention"] == (1024 * 256 + 256) + (256 + 1) == 262_657
    assert table["level_embedding"] == 5 * 256
    assert table["classifier"] == (1280 * 512 + 512) + (512 * 3 + 3) == 657_411
    backbone = sum(p.numel() for p in torchvision.models.efficientnet_v2_s().features.parameters())
    assert table["backbone"] == backbone == 20_177_488  # ~20.2 M
    assert table["total"] == 31_334_740


def test_one_adamw_step_updates_every_component(nb, plan_model):
    model = copy.deepcopy(plan_model).train()
    images, levels = tiny_batch(32, seed=3)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, -1] = False
    # no weight decay: a parameter may only move if a gradient reached it
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    before = {name: [p.detach().clone() for p in module.parameters()] for name, module in model.named_children()}
    logits, _ = model(images, levels, mask)
    loss = nb["CompetitionWeightedCE"]([1.0, 4.0, 6.0])(logits, torch.tensor([1, 2]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    optimizer.step()
    for name, module in model.named_children():
        changed = [not torch.equal(a, b) for a, b in zip(before[name], module.parameters())]
        assert any(changed), f"{name}: no parameter changed"
        if name != "backbone":  # BatchNorm/bias corner cases aside, every head tensor moves
            assert all(changed), f"{name}: {changed}"


# ---------------------------------------------------------------- build_backbone: pretrained weights


def config_for(nb, backbone, pretrained):
    return {**nb["CONFIG"], "backbone": backbone, "pretrained": pretrained}


@pytest.mark.parametrize("error", [urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
                                   OSError(101, "Network is unreachable")])
def test_imagenet_without_network_asks_for_a_local_file(nb, monkeypatch, error):
    build, weights, channels = nb["BACKBONES"]["mobilenet_v3_small"]

    def offline(**kwargs):
        raise error

    monkeypatch.setitem(nb["BACKBONES"], "mobilenet_v3_small", (offline, weights, channels))
    with pytest.raises(RuntimeError) as info:
        nb["build_backbone"](config_for(nb, "mobilenet_v3_small", "imagenet"))
    message = str(info.value)
    assert "attach" in message and "CONFIG['pretrained']" in message and "path" in message
    assert weights.url.rsplit("/", 1)[-1] in message  # the file to attach, by name
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no network traceback chained


def test_imagenet_download_failure_through_torchvision(nb, monkeypatch, tmp_path):
    """The real constructor, with torch.hub's download cut (and an empty hub cache)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(RuntimeError, match=r"attach the file .*\.pth.*CONFIG\['pretrained'\]") as info:
        nb["build_backbone"](config_for(nb, "efficientnet_v2_s", "imagenet"))
    assert "URLError" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "efficientnet_v2_s"])
def test_pretrained_path_loads_the_saved_weights(nb, tmp_path, backbone):
    torch.manual_seed(1)
    source = getattr(torchvision.models, backbone)(weights=None)
    path = tmp_path / f"{backbone}.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)  # a different random init, so equality proves the load
    features, channels = nb["build_backbone"](config_for(nb, backbone, str(path)))
    assert channels == {"mobilenet_v3_small": 576, "efficientnet_v2_s": 1280}[backbone]
    loaded, saved = features.state_dict(), source.features.state_dict()
    assert list(loaded) == list(saved)
    for key in saved:
        assert torch.equal(loaded[key], saved[key]), key


@pytest.mark.parametrize("other", ["resnet18", "mobilenet_features_only"])
def test_pretrained_path_of_another_layout_is_a_value_error(nb, tmp_path, other):
    state = (torchvision.models.resnet18().state_dict() if other == "resnet18"
             else torchvision.models.mobilenet_v3_small().features.state_dict())  # keys lack 'features.'
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="does not hold mobilenet_v3_small weights"):
        nb["build_backbone"](config_for(nb, "mobilenet_v3_small", str(path)))


def test_pretrained_path_of_a_related_architecture_is_a_value_error(nb, tmp_path):
    path = tmp_path / "efficientnet.pth"
    torch.save(torchvision.models.efficientnet_v2_s().state_dict(), path)
    with pytest.raises(ValueError, match="does not hold mobilenet_v3_small weights"):
        nb["build_backbone"](config_for(nb, "mobilenet_v3_small", str(path)))


def test_pretrained_path_with_another_classifier_head_loads_the_features(nb, tmp_path):
    torch.manual_seed(3)
    source = torchvision.models.mobilenet_v3_small(num_classes=3)
    path = tmp_path / "finetuned.pth"
    torch.save(source.state_dict(), path)
    features, _ = nb["build_backbone"](config_for(nb, "mobilenet_v3_small", str(path)))
    for key, value in source.features.state_dict().items():
        assert torch.equal(features.state_dict()[key], value), key
