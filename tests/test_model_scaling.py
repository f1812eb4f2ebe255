"""The model-scaling study: sizes, downstream checks and the table (no Ray), and both stages
end to end on local Ray (two sizes pre-trained, then fine-tuned from their checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cbtlab.config import ConfigError, ExperimentConfig
from cbtlab.models.zoo import architecture
from cbtlab.tune.cli import model_scaling_main, model_scaling_parser
from cbtlab.tune.definitions import model_scaling_spec
from cbtlab.tune.scaling import (
    ScalingRow,
    finetune_base,
    format_scaling,
    parse_downstream,
    size_cells,
    size_name,
)


def test_imagenet_sizes_are_the_registered_cbt_models_and_smoke_keeps_their_ratios() -> None:
    cells = size_cells("imagenet", ["tiny", "small", "base", "large"])
    for name, cell in zip(("tiny", "small", "base", "large"), cells, strict=True):
        arch = architecture(f"cbt_{name}_patch16_224")
        assert cell == {
            "model.embed_dim": arch["embed_dim"],
            "model.depth": arch["depth"],
            "model.num_heads": arch["num_heads"],
        }
    smoke = size_cells("smoke", ["tiny", "small", "base", "large"])
    # The same number of heads, and L twice as deep as the others, as in the paper's ladder.
    assert [c["model.num_heads"] for c in smoke] == [c["model.num_heads"] for c in cells]
    assert [c["model.depth"] for c in smoke] == [4, 4, 4, 8]
    assert size_name(smoke[2], ["tiny", "small", "base", "large"], smoke) == "base"
    with pytest.raises(ConfigError, match="huge"):
        size_cells("smoke", ["tiny", "huge"])


def test_the_spec_is_a_grid_of_sizes_with_the_same_seeds() -> None:
    args = model_scaling_parser().parse_args(["--sizes", "tiny", "large", "--seeds", "2"])
    spec = model_scaling_spec(args).validate()
    assert spec.grid and spec.seed_values == [0, 1] and len(spec.cells) == 2
    assert spec.cells[1] == {"model.embed_dim": 256, "model.depth": 8, "model.num_heads": 16}
    # Every cell is a valid config: heads divide the width.
    for cell in spec.cells:
        cfg = spec.base.with_overrides(cell)
        assert cfg.model.embed_dim % cfg.model.num_heads == 0


def test_downstream_items_are_checked() -> None:
    assert parse_downstream(["c10=/d/c10", "pets=s3://b/p=1"]) == {
        "c10": "/d/c10",
        "pets": "s3://b/p=1",
    }
    for bad, message in (
        (["c10"], "NAME=ROOT"),
        (["=/d"], "NAME=ROOT"),
        (["a b=/d"], "letters"),
        (["c10=/a", "c10=/b"], "twice"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_downstream(bad)


def test_finetune_base_takes_the_cards_classes_and_refuses_other_channels(
    digits_root: Path, tmp_path: Path
) -> None:
    pretrain = ExperimentConfig().with_overrides({"model.num_classes": 7})
    base = finetune_base(pretrain, str(digits_root), "smoke", {"train.epochs": 2})
    assert base.data.dataset == "shards" and base.data.root == str(digits_root)
    assert base.model.num_classes == 10  # the card's, not the pre-training's
    assert base.train.epochs == 2 and base.train.lr == pretrain.train.lr / 4
    assert base.model.embed_dim == pretrain.model.embed_dim
    rgb = ExperimentConfig().with_overrides({"model.in_chans": 3})
    with pytest.raises(ConfigError, match="1-channel images; the pre-trained models take 3"):
        finetune_base(rgb, str(digits_root), "smoke", {})
    with pytest.raises(ConfigError, match="card"):
        finetune_base(pretrain, str(tmp_path / "nothing"), "smoke", {})


def test_a_bad_downstream_root_stops_the_study_before_anything_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        model_scaling_main(["--downstream", f"gone={tmp_path / 'gone'}"])
    assert exc.value.code == 2
    assert "--downstream" in capsys.readouterr().err
    assert not (tmp_path / "gone").exists()


def test_the_scaling_table_shows_means_intervals_and_missing_stages() -> None:
    rows = [
        ScalingRow("tiny", 1_790_000, 1_295_000_000, {"pretrain": [0.5, 0.7], "c10": [0.9]}),
        ScalingRow("small", 6_670_000, 4_723_000_000, {"pretrain": [0.8, 0.8], "c10": []}),
    ]
    lines = format_scaling(rows, ["pretrain", "c10"]).splitlines()
    assert lines[0].split() == [
        "size",
        "params",
        "(M)",
        "GFLOPs",
        "pretrain",
        "top-1",
        "c10",
        "top-1",
    ]
    # mean 0.6, t(0.975, 1) x sd 0.1414 / sqrt(2) = 12.706 x 0.1 = 1.2706
    assert "tiny" in lines[2] and "1.79" in lines[2] and "1.295" in lines[2]
    assert "0.6000 ± 1.2706 (n=2)" in lines[2] and "0.9000 (n=1)" in lines[2]
    assert "0.8000 ± 0.0000 (n=2)" in lines[3] and lines[3].rstrip().endswith("-")
    as_dict = rows[0].as_dict()
    assert as_dict["pretrain"]["values"] == [0.5, 0.7]
    assert as_dict["pretrain"]["mean"] == pytest.approx(0.6)


@pytest.mark.ray
def test_two_sizes_pretrain_then_finetune_from_their_own_checkpoints(
    ray_session: None, digits_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = model_scaling_main(
        [
            "--sizes", "tiny", "small",
            "--epochs", "1",
            "--finetune-epochs", "1",
            "--workers", "1",  # a trial in 0.6 CPU: both sizes at once on 2 cores
            "--downstream", f"again={digits_root}",
            "--name", "scaling",
            "--tracking-uri", uri,
            "--storage-path", str(tmp_path / "ray"),
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "fine-tuning on again" in out and "model scaling (final val/top1" in out

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("scaling")  # both stages, one experiment
    runs = client.search_runs([experiment.experiment_id])
    parents = {r.info.run_name: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert set(parents) == {"scaling", "scaling-again"}
    children = {
        name: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
        for name, p in parents.items()
    }
    assert len(children["scaling"]) == len(children["scaling-again"]) == 2
    checkpoint_of = {
        r.data.params["model.embed_dim"]: r.data.tags["cbtlab.checkpoint"]
        for r in children["scaling"]
    }
    for run in children["scaling-again"]:
        assert run.info.status == "FINISHED"
        assert run.data.params["data.dataset"] == "shards"
        assert run.data.params["train.epochs"] == "1"
        # Each size starts from its own pre-trained weights.
        assert (
            run.data.params["train.init_from"] == checkpoint_of[run.data.params["model.embed_dim"]]
        )

    pretrain_id = parents["scaling"].info.run_id
    artifacts = {a.path for a in client.list_artifacts(pretrain_id)}
    assert {"scaling.txt", "scaling.json", "stats.parquet"} <= artifacts
    table = json.loads(
        Path(client.download_artifacts(pretrain_id, "scaling.json", str(tmp_path))).read_text()
    )
    assert [row["size"] for row in table] == ["tiny", "small"]
    assert table[0]["params"] < table[1]["params"] and table[0]["flops"] < table[1]["flops"]
    finals = {
        (r.data.params["model.embed_dim"], stage): r.data.metrics["val/top1"]
        for stage, runs_ in (
            ("pretrain", children["scaling"]),
            ("again", children["scaling-again"]),
        )
        for r in runs_
    }
    for row, width in zip(table, ("48", "96"), strict=True):
        assert row["pretrain"]["values"] == [pytest.approx(finals[width, "pretrain"])]
        assert row["again"]["values"] == [pytest.approx(finals[width, "again"])]
