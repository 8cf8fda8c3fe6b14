"""The `cskl` command, in-process through main([...]) (a second Python process would import torch and
Avalanche again): a real end-to-end run on Split Digits, the shipped configs, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from lightning_cskl.cli import RunConfig, TrainOptions, WandbOptions, build_parser, main, run

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QUICK = ["--train.epochs", "2", "--model.width", "8", "--progress", "false"]


def benchmark_with_an_empty_experience():
    """A user's benchmark (``--data.benchmark module:function``) whose second experience holds no sample."""
    from avalanche.benchmarks import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.utils import DataAttribute
    from avalanche.benchmarks.utils.classification_dataset import ClassificationDataset
    from torch.utils.data import TensorDataset

    def dataset(n: int, label: int) -> ClassificationDataset:
        x, y = torch.rand(n, 1, 8, 8), torch.full((n,), label, dtype=torch.long)
        return ClassificationDataset([TensorDataset(x, y)], data_attributes=[DataAttribute(y.tolist(), "targets")])

    return with_classes_timeline(  # classes_in_this_experience, which the expanding head reads
        benchmark_from_datasets(train=[dataset(64, 0), dataset(0, 1)], test=[dataset(16, 0), dataset(16, 1)]))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One `cskl run` on Split Digits (CsKO, checkpoint, W&B offline), made once; tests work on copies."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("digits_run")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["run", "--output_dir", str(root), "--name", "digits", *QUICK])
    return root / "digits", out.getvalue()


def _copy_run(digits_run, tmp_path) -> Path:
    folder = tmp_path / "digits"
    shutil.copytree(digits_run[0], folder)
    return folder


def test_run_on_digits_end_to_end(digits_run, tmp_path, capsys):
    out = digits_run[1]
    folder = digits_run[0]
    results = json.loads((folder / "results.json").read_text())
    accuracy = results["accuracy"]
    assert len(accuracy) == 4 and all(len(row) == 4 for row in accuracy)  # base 4 classes + 3 × 2
    assert all(0.0 <= a <= 1.0 for row in accuracy for a in row)
    assert accuracy[0][0] > 0.5  # the base session learned something in 2 epochs (chance: 0.25)
    for key in ("acc", "aia", "forgetting", "bwt"):
        assert key in results
    assert results["config"]["engine"]["channel_ratio"] == 0.75 and results["config"]["method"] == "csko"
    png = folder / "accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert (folder / "checkpoint.pt").is_file()
    runs = list((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert f"wandb sync {runs[0]}" in out
    assert "ACC (after the last experience)" in out and "average incremental accuracy" in out and "forgetting" in out
    assert f"{results['acc']:.3f}" in out

    # resuming the finished run trains nothing and gives the same matrix; another config is refused
    folder = _copy_run(digits_run, tmp_path)
    main(["run", "--output_dir", str(tmp_path), "--name", "digits", *QUICK, "--resume", "true", "--wandb.mode", "disabled"])
    assert json.loads((folder / "results.json").read_text())["accuracy"] == accuracy
    capsys.readouterr()
    err = _error(capsys, ["run", "--output_dir", str(tmp_path), "--name", "digits", *QUICK, "--resume", "true",
                          "--model.width", "4"])
    assert "was written with another config (model.width differ)" in err

    # a fresh run over it (resume false) keeps the earlier checkpoint and config instead of deleting them
    saved = (folder / "checkpoint.pt").read_bytes()
    main(["run", "--output_dir", str(tmp_path), "--name", "digits", *QUICK, "--wandb.mode", "disabled",
          "--train.epochs", "1"])
    assert (folder / "checkpoint.previous.pt").read_bytes() == saved
    assert json.loads((folder / "config.previous.json").read_text())["train"]["epochs"] == 2
    assert "checkpoint.previous.pt" in capsys.readouterr().err


def test_default_config_is_configs_digits_yaml():
    parser = build_parser()
    default = parser.parse_args(["run"])["run"]
    shipped = parser.parse_args(["run", "--config", str(CONFIGS / "digits.yaml")])["run"]
    default.pop("config"), shipped.pop("config")
    assert default == shipped


@pytest.mark.parametrize("name", ["digits", "fmnist_class", "fmnist_task", "cifar100_b50_5", "cifar100_b50_10"])
def test_shipped_configs_parse(name):
    parsed = build_parser().parse_args(["run", "--config", str(CONFIGS / f"{name}.yaml")])["run"]
    assert yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["data"]["benchmark"] == parsed.data.benchmark


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err  # one line, no traceback
    return err


def test_unknown_keys_are_named(tmp_path, capsys):
    assert "--engine.chanel_ratio" in _error(capsys, ["run", "--engine.chanel_ratio", "0.5"])
    config = tmp_path / "bad.yaml"
    config.write_text("engine:\n  chanel_ratio: 0.5\n")
    assert "engine.chanel_ratio" in _error(capsys, ["run", "--config", str(config)])


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.25"])
def test_channel_ratio_outside_the_interval(capsys, ratio):
    err = _error(capsys, ["run", "--engine.channel_ratio", ratio])
    assert err.startswith("cskl run: error: channel_ratio=") and "it must be a number in (0, 1]" in err


@pytest.mark.parametrize("config", ["cifar100_b50_5", "cifar100_b50_10"])
def test_cifar100_without_data(tmp_path, capsys, config):
    err = _error(capsys, ["run", "--config", str(CONFIGS / f"{config}.yaml"), "--data.root", str(tmp_path)])
    assert f"CIFAR-100 is not in {tmp_path / 'cifar-100-python'}" in err and "--data.download true" in err


def test_fashion_mnist_without_data(tmp_path, capsys):
    err = _error(capsys, ["run", "--config", str(CONFIGS / "fmnist_class.yaml"), "--data.root", str(tmp_path),
                          "--data.source", str(tmp_path / "nothing-here"), "--wandb.mode", "disabled"])
    assert "Fashion-MNIST is not in" in err and "apt-get install -y dataset-fashion-mnist" in err


def test_model_without_eligible_convolutions(tmp_path, capsys):
    err = _error(capsys, ["run", "--engine.layers", "head.*", "--output_dir", str(tmp_path),
                          "--wandb.mode", "disabled", *QUICK])
    assert "layers='head.*' matches no convolution of ClassIncrementalNet" in err


def test_experience_without_samples(tmp_path, capsys):
    err = _error(capsys, ["run", "--data.benchmark", f"{__name__}:benchmark_with_an_empty_experience",
                          "--output_dir", str(tmp_path), "--wandb.mode", "disabled", *QUICK])
    assert "experience 1 of stream 'train' has no samples" in err


def test_bad_class_split_and_unknown_benchmark(capsys):
    assert "do not split 10 classes" in _error(capsys, ["run", "--data.classes_per_exp", "4"])
    assert "data.benchmark='mnist' is not allowed" in _error(capsys, ["run", "--data.benchmark", "mnist"])


def test_bench_smoke_writes_tables_and_plots(tmp_path, capsys):
    """`cskl bench` end to end: three methods, one seed, Split Digits, one epoch."""
    main(["bench", "--methods", "[full_finetune,gpm,csko_dces]", "--scenarios", "[class]", "--seeds", "[0]",
          "--epochs", "1", "--threads", "1", "--output_dir", str(tmp_path), "--progress", "false"])
    folder = tmp_path / "bench"
    for name in ("bench.md", "bench.csv", "bench_runs.csv", "bench.json", "claims.md", "acc_vs_memory_class.png",
                 "acc_vs_flops_class.png", "accuracy_matrices_class.png"):
        assert (folder / name).is_file(), name
    table = (folder / "bench.md").read_text()
    assert all(f"| {m} | class | 1 |" in table for m in ("full_finetune", "gpm", "csko_dces"))
    claims = (folder / "claims.md").read_text()
    assert "| ACC ≥ best on-device method + 20 points |" in claims and "(full_finetune)" in claims
    assert "| training memory ≤ 8% of gpm's |" in claims and claims in capsys.readouterr().out
    summary = {row["method"]: row for row in json.loads((folder / "bench.json").read_text())["summary"]}
    assert summary["csko_dces"]["gradient_bytes_mean"] < summary["full_finetune"]["gradient_bytes_mean"]
    assert 0.0 <= summary["csko_dces"]["acc_mean"] <= 1.0


def test_bench_unknown_method_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--methods", "[gmp]"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cskl bench: error: methods ['gmp'] are not known: use some of full_finetune")
    assert "\n" not in err


def test_bench_fmnist_config_parses():
    parsed = build_parser().parse_args(["bench", "--config", str(CONFIGS / "bench_fmnist.yaml")])["bench"]
    assert parsed.data.benchmark == "fashion_mnist" and parsed.data.train_per_class == 1000
    assert len(parsed.seeds) == 3 and "csko_dces_filter" in parsed.methods
    assert parsed.model.name == "small_cnn" and parsed.model.width == 16
    resnet = build_parser().parse_args(["bench", "--config", str(CONFIGS / "bench_fmnist_resnet.yaml")])["bench"]
    assert resnet.model.name == "resnet18" and resnet.model.width == 20 and resnet.scenarios == ["class"]


def test_bench_builds_the_configured_backbone(tmp_path, capsys):
    main(["bench", "--methods", "[csko_dces]", "--scenarios", "[task]", "--seeds", "[0]", "--epochs", "1",
          "--model.name", "mobilenet_v2", "--model.width", "0.25", "--threads", "1", "--time_steps", "false",
          "--output_dir", str(tmp_path), "--progress", "false"])
    weights = torch.load(tmp_path / "bench" / "base" / "task-seed0.pt", weights_only=True)
    assert any(key.startswith("backbone.1.block") for key in weights)  # MobileNetV2's inverted residuals
    assert weights["backbone.0.0.weight"].shape[1] == 1  # fed 1-channel digits
    err = _error(capsys, ["bench", "--model.width", "-1"])
    assert "model.width=-1.0 is not allowed: it must be > 0" in err


def test_study_subcommand_end_to_end(tmp_path, capsys):
    main(["study", "--dataset", "digits", "--samples_per_class", "40", "--test_per_class", "20", "--width", "4",
          "--base_epochs", "1", "--epochs", "1", "--probe_epochs", "2", "--depths", "[layer4]",
          "--positions", "[center,top_left]", "--output_dir", str(tmp_path), "--progress", "false",
          "--threads", "1"])
    assert (tmp_path / "study.json").is_file() and (tmp_path / "heatmap_layer4.png").is_file()
    assert len(json.loads((tmp_path / "study.json").read_text())["runs"]) == 2


def test_study_bad_position_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--positions", "[centre]"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cskl study: error:") and "'centre' is not a kernel position" in err and "\n" not in err


@pytest.mark.parametrize("name,benchmark,scenario", [("bench_fmnist_domain", "fashion_mnist", "domain"),
                                                    ("bench_fmnist_cross", "fashion_digits", "class")])
def test_scenario_bench_configs_parse(name, benchmark, scenario):
    parsed = build_parser().parse_args(["bench", "--config", str(CONFIGS / f"{name}.yaml")])["bench"]
    assert parsed.data.benchmark == benchmark and parsed.scenarios == [scenario]
    assert {"head_replay", "slda", "csko_dces_lda"} <= set(parsed.methods)


def test_run_accepts_every_registry_method_and_refuses_others(tmp_path, capsys):
    results = {method: run(RunConfig(method=method, output_dir=str(tmp_path), progress=False, checkpoint=False,
                                     train=TrainOptions(epochs=2), wandb=WandbOptions(mode="disabled")))
               for method in ("slda", "head_replay")}
    assert results["slda"]["config"]["method"] == "slda"
    # the same base session; the frozen features with an LDA head keep every class, the head alone does not
    assert results["slda"]["acc"] > results["head_replay"]["acc"] + 0.1
    err = _error(capsys, ["run", "--method", "slad"])
    assert "method='slad' is not allowed: use csko, naive or one of" in err and "slda" in err


def test_domain_and_cross_dataset_data_options_are_refused_where_they_do_not_apply(capsys):
    assert "data.scenario='domain' is not allowed with data.benchmark='cifar100'" in _error(
        capsys, ["run", "--data.benchmark", "cifar100", "--data.scenario", "domain"])
    assert "data.scenario='task' is not allowed with data.benchmark='fashion_digits'" in _error(
        capsys, ["run", "--data.benchmark", "fashion_digits", "--data.scenario", "task"])
    assert "lr=-1.0 is not allowed" in _error(capsys, ["bench", "--lr", "-1"])
    assert "epochs=0 is not allowed" in _error(capsys, ["bench", "--epochs", "0"])
    assert "data.train_per_class is not allowed with data.benchmark='digits'" in _error(
        capsys, ["run", "--data.train_per_class", "10"])
    if not torch.cuda.is_available():
        assert "train.device='cuda' is not allowed here: this machine has no CUDA device" in _error(
            capsys, ["run", "--train.device", "cuda"])
    assert "batch_size=0 is not allowed" in _error(capsys, ["bench", "--batch_size", "0"])


def test_damaged_or_foreign_checkpoints_are_refused_in_one_line(digits_run, tmp_path, capsys):
    quick = ["--output_dir", str(tmp_path), *QUICK, "--wandb.mode", "disabled"]
    checkpoint = _copy_run(digits_run, tmp_path) / "checkpoint.pt"
    main(["run", "--name", "theirs", "--method", "naive", *quick])
    capsys.readouterr()
    # another run's checkpoint beside this run's config.json: the checkpoint carries its own identity
    checkpoint.write_bytes((tmp_path / "theirs" / "checkpoint.pt").read_bytes())
    err = _error(capsys, ["run", "--name", "digits", *quick, "--resume", "true"])
    assert "was written by another run (method differ)" in err
    for damaged in (b"", b"\x00garbage" * 10, (tmp_path / "theirs" / "checkpoint.pt").read_bytes()[:500]):
        checkpoint.write_bytes(damaged)
        assert "cannot be read as a checkpoint" in _error(capsys, ["run", "--name", "digits", *quick, "--resume", "true"])


def test_an_output_dir_that_cannot_be_written_fails_before_the_data_loads(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    err = _error(capsys, ["run", "--output_dir", str(blocker), "--data.benchmark", "fashion_mnist",
                          "--data.source", str(tmp_path / "no-data-here")])
    assert f"output folder {blocker}" in err and "cannot be written" in err  # not the missing-data error


def test_a_full_disk_is_named_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    from lightning_cskl.avalanche import run as run_module

    def full_disk(value, path):  # what torch.save meets on a full disk
        open(path, "wb").write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_module.torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write .*state.pt: the disk is full"):
        run_module._save_atomically({"x": 1}, tmp_path / "state.pt")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_config_file_sets_nothing(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n\n")
    parsed = build_parser().parse_args(["run"])
    from lightning_cskl.cli import _without_empty_configs

    args = _without_empty_configs(["run", "--config", str(empty), "--train.epochs", "3", f"--config={empty}"])
    assert args == ["run", "--train.epochs", "3"]
    assert build_parser().parse_args(args)["run"].train.epochs == 3 != parsed["run"].train.epochs
