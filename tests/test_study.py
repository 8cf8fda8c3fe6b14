"""The knowledge-intensity study on a few hundred Split Digits samples: the files it writes, the
tap-only training (exactly one tap of each trained conv moves, everything else bit-identical), the base
checkpoint cache, and the errors for bad settings."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lightning_cskl.models import SmallCNN, resnet18
from lightning_cskl.experiments.study import (
    FULL,
    POSITIONS,
    StudyConfig,
    TapMask,
    convs_in,
    main,
    run_study,
    tap_index,
    train_new_task,
)


def _tiny(tmp_path, **overrides) -> StudyConfig:
    values = dict(dataset="digits", samples_per_class=40, test_per_class=20, width=4, base_epochs=1, epochs=1,
                  probe_epochs=2,
                  depths=["layer4"], positions=["center", "top_left"], output_dir=str(tmp_path), progress=False)
    values.update(overrides)
    return StudyConfig(**values)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return run_study(_tiny(out)), out


def test_study_writes_table_json_and_heatmaps(study):
    result, out = study
    assert {p.name for p in out.iterdir()} == {"base.pt", "study.json", "study.md", "heatmap_layer4.png"}
    assert (out / "heatmap_layer4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "study.json").read_text()) == json.loads(json.dumps(result))
    runs = result["runs"]
    assert [(r["depth"], r["position"]) for r in runs] == [("layer4", "center"), ("layer4", "top_left")]
    base = result["base"]
    for run in runs:
        assert 0.0 <= run["new_acc"] <= 100.0 and 0.0 <= run["old_acc"] <= 100.0
        assert run["gained"] == pytest.approx(run["new_acc"] - base["head_only_new_acc"])
        assert run["lost"] == pytest.approx(base["old_acc"] - run["old_acc"])
    # the new head (4 features of nf=4... layer4 has 32 channels -> 6 classes) plus one tap of each conv
    head = 32 * 6 + 6
    taps = 16 * 32 + 3 * 32 * 32  # layer4.0.conv1 (32, 16), then three (32, 32) convs
    assert runs[0]["trainable_parameters"] == head + taps
    assert base["head_only_trainable_parameters"] == head
    assert 0.0 <= base["probe_new_acc"] <= 100.0 and base["reused_checkpoint"] is False
    assert set(result["summary"]["layer4"]) == {"center", "top_left"}
    table = (out / "study.md").read_text()
    assert "| position | layer4 |" in table and "| center | " in table and "| top_left | " in table


def test_base_checkpoint_is_reused_only_for_the_same_base_settings(study, tmp_path):
    _, out = study
    config = _tiny(out, positions=["center"], output_dir=str(out))
    again = run_study(config)
    assert again["base"]["reused_checkpoint"] is True
    assert again["runs"][0]["new_acc"] == study[0]["runs"][0]["new_acc"]  # same base, seed, batches
    fresh = run_study(_tiny(tmp_path, positions=["center"], base_epochs=2, probe_epochs=0, repeats=2))
    assert fresh["base"]["reused_checkpoint"] is False
    assert [r["seed"] for r in fresh["runs"]] == [0, 1]
    assert "± " in (tmp_path / "study.md").read_text()  # repeats > 1: mean ± std


@pytest.mark.parametrize(("position", "optimizer"), [("center", "adam"), ("top_left", "adam"), ("bottom", "sgd")])
def test_tap_only_training_moves_exactly_that_tap(position, optimizer):
    torch.manual_seed(0)
    model = resnet18(4, 1, nf=4)
    model.train()
    model(torch.randn(16, 1, 8, 8))  # BatchNorm running statistics that are not the defaults
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = nn.Linear(model.feature_dim, 3)
    images, labels = torch.randn(48, 1, 8, 8), torch.randint(0, 3, (48,))
    train_new_task(model, head, images, labels, depth="layer3", position=position, epochs=2, lr=1e-2,
                   batch_size=16, seed=0, optimizer=optimizer)
    trained = convs_in(model, "layer3")
    row, col = tap_index((3, 3), position)
    after = model.state_dict()
    for name, value in after.items():
        old = before[name]
        if name.removesuffix(".weight") in trained:
            changed = value != old
            assert changed[:, :, row, col].any(), name
            changed[:, :, row, col] = False
            assert not changed.any(), f"{name}: an element outside the {position} tap moved"
        else:
            assert torch.equal(value, old), f"{name} changed"  # bit-identical, buffers included
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(p._backward_hooks for p in model.parameters())  # the gradient masks are removed


def test_full_kernel_and_head_only():
    torch.manual_seed(0)
    model = SmallCNN(4, 1, width=4)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = nn.Linear(model.feature_dim, 2)
    images, labels = torch.randn(32, 1, 8, 8), torch.randint(0, 2, (32,))
    info = train_new_task(model, head, images, labels, depth=None, position=None, epochs=1, lr=1e-2,
                          batch_size=16, seed=0)
    assert info["trainable_parameters"] == 8 * 2 + 2
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    train_new_task(model, head, images, labels, depth="features.1", position=FULL, epochs=1, lr=1e-2,
                   batch_size=16, seed=0)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == ["features.1.0.weight"]
    assert (model.features[1][0].weight != before["features.1.0.weight"]).float().mean() > 0.9


def test_tap_mask_undoes_weight_decay_and_momentum_outside_the_tap():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    before = conv.weight.detach().clone()
    mask = TapMask({"conv": conv}, "right")
    optimizer = torch.optim.AdamW([conv.weight], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        conv(torch.randn(2, 2, 5, 5)).square().sum().backward()
        assert (conv.weight.grad[:, :, 1, 2] != 0).any() and not conv.weight.grad[:, :, :, :2].any()
        optimizer.step()
        mask.restore()
    mask.remove()
    changed = (conv.weight != before).any(0).any(0)
    assert changed.tolist() == [[False, False, False], [False, False, True], [False, False, False]]


def test_tap_index_names_the_nine_taps():
    assert sorted(tap_index((3, 3), p) for p in POSITIONS) == [(r, c) for r in range(3) for c in range(3)]
    assert tap_index((5, 5), "bottom_left") == (4, 0) and tap_index((5, 5), "center") == (2, 2)
    with pytest.raises(ValueError, match="position='middle' is not a tap"):
        tap_index((3, 3), "middle")
    with pytest.raises(ValueError, match="no center element"):
        tap_index((2, 2), "center")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"positions": ["centre"]}, r"positions: 'centre' is not a kernel position; allowed: top_left, .*full"),
        ({"positions": []}, "positions is empty"),
        ({"positions": ["center", "center"]}, "lists a position twice"),
        ({"depths": []}, r"depths=\[\] is not allowed"),
        ({"new_classes": [3, 4]}, r"share \[3\]"),
        ({"base_classes": [0, 10]}, r"base_classes=\[0, 10\] is not allowed: give distinct class labels in 0..9"),
        ({"new_classes": [5]}, "at least 2 classes"),
        ({"epochs": 0}, "epochs=0 is not allowed: it must be an int >= 1"),
        ({"samples_per_class": 0}, "samples_per_class=0 is not allowed"),
        ({"lr": -1.0}, "lr=-1.0 is not allowed"),
        ({"probe_lr": 0.0}, "probe_lr=0.0 is not allowed"),
        ({"base_lr": float("nan")}, "base_lr=nan is not allowed"),
        ({"optimizer": "rmsprop"}, "optimizer='rmsprop' is not allowed: use adam or sgd"),
        ({"probe_epochs": -1}, "probe_epochs=-1 is not allowed: it must be an int >= 0"),
        ({"repeats": 0}, "repeats=0 is not allowed"),
        ({"dataset": "cifar10"}, "dataset='cifar10' is not allowed: use one of fashion_mnist, digits"),
        ({"model": "vgg"}, "model='vgg' is not allowed"),
    ],
)
def test_bad_config_values_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _tiny(tmp_path, **overrides)


def test_unknown_depth_is_refused_before_any_training(tmp_path):
    config = _tiny(tmp_path, depths=["layer4", "layer5"])
    with pytest.raises(ValueError, match=r"depths: 'layer5' is not a stage of the model with 3×3 convolutions; "
                                         r"allowed: conv1, layer1, layer2, layer3, layer4"):
        run_study(config)
    assert not (tmp_path / "base.pt").exists()
    with pytest.raises(ValueError, match=r"'pool' is not a stage .*allowed: features.0, features.1, features.2"):
        convs_in(SmallCNN(4, 1, width=4), "pool")


def test_depth_needs_a_known_position():
    model = resnet18(4, 1, nf=4)
    with pytest.raises(ValueError, match="position=None is not allowed with depth='layer1'"):
        train_new_task(model, nn.Linear(32, 2), torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long),
                       depth="layer1", position=None, epochs=1, lr=1e-3, batch_size=4, seed=0)


def test_entry_point_reads_a_yaml_config(study, tmp_path, capsys):
    _, cached = study
    (tmp_path / "study.yaml").write_text(
        "dataset: digits\nsamples_per_class: 40\ntest_per_class: 20\nwidth: 4\nbase_epochs: 1\nepochs: 1\n"
        f"probe_epochs: 2\ndepths: [layer4]\npositions: [center]\noutput_dir: {cached}\nprogress: false\n"
    )
    result = main(["--config", str(tmp_path / "study.yaml")])
    assert result["base"]["reused_checkpoint"] is True and len(result["runs"]) == 1
    assert "**New-task accuracy gained**" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--config", str(tmp_path / "study.yaml"), "--positions", "[centre]"])
    assert "'centre' is not a kernel position" in capsys.readouterr().err
