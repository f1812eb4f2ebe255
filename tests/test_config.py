"""Configs: round trips, overrides, and one clear error naming the bad field."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import typing

import pytest

from cbtlab.config import ConfigError, ExperimentConfig, parse_grid
from cbtlab.overrides import parse_override


def test_flat_round_trip_and_hash() -> None:
    cfg = ExperimentConfig().with_overrides({"model.rep_grid": "2x4", "train.lr": 0.01})
    again = ExperimentConfig.from_flat(cfg.flat())
    assert again == cfg
    assert again.model.rep_grid == (2, 4)
    assert cfg.flat()["model.rep_grid"] == "2x4"
    assert again.config_hash() == cfg.config_hash()
    assert ExperimentConfig().config_hash() != cfg.config_hash()
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("text", "grid"),
    [("4x4", (4, 4)), ("2X8", (2, 8)), ("3", (3, 3)), ([1, 2], (1, 2)), (5, (5, 5))],
)
def test_parse_grid(text: object, grid: tuple[int, int]) -> None:
    assert parse_grid(text) == grid


@pytest.mark.parametrize(
    ("override", "field", "hint"),
    [
        ({"model.rep_grid": "16x16"}, "model.rep_grid", "exceeds the 8x8 patch grid"),
        ({"model.rep_grid": "4by4"}, "model.rep_grid", "4x4"),
        ({"model.rep_grid": "0x2"}, "model.rep_grid", "positive"),
        ({"model.attention": "flash"}, "model.attention", "'cbsa'"),
        ({"model.step_init": "ones"}, "model.step_init", "'normal', 'constant', 'zero'"),
        ({"model.num_heads": 5}, "model.num_heads", "does not divide"),
        ({"model.depth": 2.5}, "model.depth", "integer"),
        ({"train.lr": "fast"}, "train.lr", "number"),
        ({"train.lr": -1}, "train.lr", "> 0"),
        ({"data.batch_size": 63}, "data.batch_size", "split evenly"),
        ({"data.augment": "maybe"}, "data.augment", "'none', 'digits', 'imagenet'"),
        ({"data.augment": True}, "data.augment", "expected a string"),
        ({"data.dataset": "shards"}, "data.root", "shard folder or URL"),
        ({"data.auto_augment": "rand-m9"}, "data.auto_augment", "imagenet"),
        ({"data.loader_workers": -1}, "data.loader_workers", ">= 0"),
        ({"model.nonsense": 1}, "model.nonsense", "allowed: attention"),
        ({"model.rep_pool_kernel": 3}, "model.rep_grid", "set model.rep_grid=2x2"),
        ({"model.rep_pool_kernel": 9}, "model.rep_pool_kernel", "exceeds the 8x8"),
        ({"model.attention": "mssa,cbsa,tssa"}, "model.attention", "do not split"),
        ({"model.stem": "conv", "model.patch_size": 1}, "model.patch_size", "power of two"),
        ({"optim.lr": 1}, "optim", "allowed: model, data, train"),
        ({"train.optimizer": "adam"}, "train.optimizer", "'adamw', 'sgd', 'lion'"),
        ({"train.precision": "fp16"}, "train.precision", "'auto', 'fp32', 'bf16'"),
        ({"train.grad_accum_steps": 0}, "train.grad_accum_steps", "> 0"),
        ({"train.checkpoint_every_steps": -1}, "train.checkpoint_every_steps", ">= 0"),
        ({"train.head_only_epochs": 1}, "train.head_only_epochs", "needs train.init_from"),
        (
            {"train.head_only_epochs": 12, "train.init_from": "ckpt"},
            "train.head_only_epochs",
            "none of the 12 epochs",
        ),
        ({"train.backbone_lr_scale": -0.1}, "train.backbone_lr_scale", ">= 0"),
        ({"train.compile": "maybe"}, "train.compile", "true or false"),
        ({"train.compile_mode": "cudagraphs"}, "train.compile_mode", "'reduce-overhead'"),
    ],
)
def test_bad_values_name_the_field(override: dict, field: str, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        ExperimentConfig().with_overrides(override)
    assert err.value.field_name == field
    assert hint in str(err.value)


FLOAT_FIELDS = [
    f"{section.name}.{name}"
    for section in dataclasses.fields(ExperimentConfig)
    for name, hint in typing.get_type_hints(
        typing.get_type_hints(ExperimentConfig)[section.name]
    ).items()
    if hint is float
]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "Infinity", math.nan, -math.inf])
@pytest.mark.parametrize("key", FLOAT_FIELDS)
def test_every_float_field_refuses_nan_and_infinity(key: str, value: object) -> None:
    """NaN passes every range check (it compares false) and inf passes `> 0`: each float field
    refuses both by name, whether set by flag (text), file or code (a float)."""
    with pytest.raises(ConfigError) as err:
        ExperimentConfig().with_overrides({key: value})
    assert err.value.field_name == key
    assert "must be a finite number" in str(err.value)


def test_a_config_built_in_code_refuses_nan_when_validated() -> None:
    from cbtlab.config import TrainConfig

    assert "train.lr" in FLOAT_FIELDS and len(FLOAT_FIELDS) >= 15
    with pytest.raises(ConfigError, match=r"train\.lr: must be a finite number, got nan"):
        ExperimentConfig(train=TrainConfig(lr=math.nan)).validate()


def test_a_config_error_pickles_as_itself() -> None:
    """Raised in a Ray worker, it travels to the driver pickled (unpickling it used to fail,
    which Ray took for a crashed worker and retried)."""
    import pickle

    error = pickle.loads(pickle.dumps(ConfigError("train.lr", "must be a finite number")))
    assert isinstance(error, ConfigError) and error.field_name == "train.lr"
    assert str(error) == "train.lr: must be a finite number"


def test_parse_override_reads_json_values() -> None:
    assert parse_override("train.lr=0.01") == ("train.lr", 0.01)
    assert parse_override("data.augment=true") == ("data.augment", True)
    assert parse_override("model.rep_grid=4x2") == ("model.rep_grid", "4x2")
    with pytest.raises(ConfigError):
        parse_override("train.lr")


def test_config_files(tmp_path) -> None:
    from cbtlab.config import load_config_file

    (tmp_path / "a.toml").write_text('[model]\nrep_grid = "2x4"\n\n[train]\nepochs = 3\n')
    cfg = load_config_file(tmp_path / "a.toml")
    assert cfg.model.rep_grid == (2, 4) and cfg.train.epochs == 3 and cfg.model.depth == 4
    (tmp_path / "b.json").write_text('{"train": {"lr": "fast"}}')
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config_file(tmp_path / "b.json")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config_file(tmp_path / "c.json")
    with pytest.raises(ConfigError, match="no such file"):
        load_config_file(tmp_path / "missing.toml")


def test_toml_configs_read_without_tomllib(tmp_path) -> None:
    """Python 3.10 has no tomllib: the config reader takes tomli there (a dependency on 3.10
    only, and in the dev extra so that this runs on any Python)."""
    (tmp_path / "a.toml").write_text('[model]\nrep_grid = "2x4"\n\n[train]\nlr = nan\n')
    code = (
        "import sys\n"
        "sys.modules['tomllib'] = None  # as on Python 3.10: `import tomllib` fails\n"
        "from cbtlab import config\n"
        "print(config.tomllib.__name__)\n"
        f"(path := {str(tmp_path / 'a.toml')!r})\n"
        "try:\n"
        "    config.load_config_file(path)\n"
        "except config.ConfigError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["tomli", "train.lr: must be a finite number, got nan"]


def test_train_command_refuses_a_bad_checkpoint_before_starting(tmp_path, capsys) -> None:
    from cbtlab.train.cli import train_main

    with pytest.raises(SystemExit) as exit_info:
        train_main(["--resume", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no state.pt in checkpoint" in capsys.readouterr().err
    import torch

    from cbtlab.models import build_model

    deeper = build_model(ExperimentConfig().with_overrides({"model.depth": 5}).model)
    torch.save(deeper.state_dict(), tmp_path / "deeper.pt")
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--set", f"train.init_from={tmp_path / 'deeper.pt'}"])
    assert exit_info.value.code == 2
    assert "train.init_from: the checkpoint has 'blocks.4." in capsys.readouterr().err


def test_a_normal_step_init_needs_a_non_negative_scale() -> None:
    base = ExperimentConfig()
    with pytest.raises(ConfigError, match=r"model\.step_scale"):
        base.with_overrides({"model.step_init": "normal", "model.step_scale": -0.5}).validate()
    negative = base.with_overrides({"model.step_init": "constant", "model.step_scale": -0.5})
    assert negative.validate().model.step_scale == -0.5


def test_a_retired_field_reads_at_its_old_value_and_only_there() -> None:
    """Runs and study states saved before `train.inject_failure` became a test hook hold it as
    "": they still read; any other value names the retired field."""
    old = {**ExperimentConfig().flat(), "train.inject_failure": ""}
    assert ExperimentConfig.from_flat(old) == ExperimentConfig()
    nested = ExperimentConfig().to_dict()
    nested["train"]["inject_failure"] = ""
    assert ExperimentConfig.from_dict(nested) == ExperimentConfig()
    with pytest.raises(ConfigError, match=r"train\.inject_failure: this field was retired"):
        ExperimentConfig.from_flat({**old, "train.inject_failure": "0:1:1"})
    with pytest.raises(ConfigError, match=r"train\.no_such_field: unknown field"):
        ExperimentConfig.from_flat({"train.no_such_field": ""})
