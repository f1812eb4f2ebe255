"""GPU-sized defaults without a GPU: `train.use_gpu` is true, false or "auto"; a driver resolves
"auto" from the cluster's resources (plain dicts here, no Ray); the imagenet preset sizes CPUs and
loader processes per GPU worker from the GPU node; the CPU path keeps the 2-core values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cbtlab.cluster import (
    MAX_LOADER_WORKERS,
    gpu_node_shape,
    gpu_worker_sizing,
    resolve_use_gpu,
    size_from_node,
    use_gpu_on,
)
from cbtlab.config import ConfigError, ExperimentConfig, TrainConfig, load_config_file
from cbtlab.tracking.schema import config_from_params
from cbtlab.train.cli import gpu_note, train_main
from cbtlab.tune.cli import model_scaling_parser, rep_count_parser
from cbtlab.tune.definitions import rep_count_spec
from cbtlab.tune.resources import plan_resources
from cbtlab.tune.spec import StudySpec

GPU_NODE = {"CPU": 16.0, "GPU": 1.0}
CPU_NODE = {"CPU": 2.0}


def rep_count(*argv: str) -> StudySpec:
    return rep_count_spec(rep_count_parser().parse_args(list(argv))).validate()


def imagenet(*argv: str) -> StudySpec:
    return rep_count("--preset", "imagenet", "--data-root", "/data/imagenet-wds", *argv)


# --- the tri-state field ---------------------------------------------------------------------


def test_use_gpu_defaults_to_auto_and_takes_every_spelling_of_true_false_auto() -> None:
    cfg = ExperimentConfig()
    assert cfg.train.use_gpu == "auto" and cfg.flat()["train.use_gpu"] == "auto"
    spellings = [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        ("true", True),
        ("True", True),  # as MLflow logs a bool param
        ("FALSE", False),
        ("yes", True),
        ("no", False),
        ("auto", "auto"),
        ("AUTO", "auto"),
    ]
    for given, expected in spellings:
        got = cfg.with_overrides({"train.use_gpu": given}).train.use_gpu
        assert got == expected and type(got) is type(expected), given
    # A dataclass built directly is normalised by validate(), as from_dict does.
    direct = TrainConfig(use_gpu="Yes")  # type: ignore[arg-type]
    direct.validate()
    assert direct.use_gpu is True


@pytest.mark.parametrize("bad", ["maybe", "gpu", "", 2, -1, 0.5, None, [True]])
def test_a_bad_use_gpu_gets_one_message_naming_the_field(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"^train\.use_gpu: expected true, false or 'auto'"):
        ExperimentConfig().with_overrides({"train.use_gpu": bad})
    with pytest.raises(ConfigError, match=r"^train\.use_gpu:"):
        TrainConfig(use_gpu=bad).validate()  # type: ignore[arg-type]


def test_files_flags_and_logged_runs_keep_their_resolved_bools(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nuse_gpu = true\n")
    assert load_config_file(toml).train.use_gpu is True
    toml.write_text('[train]\nuse_gpu = "auto"\n')
    assert load_config_file(toml).train.use_gpu == "auto"
    # A run logged before "auto" existed (MLflow params are strings) re-runs as it ran.
    logged = {
        k: str(v)
        for k, v in ExperimentConfig().with_overrides({"train.use_gpu": False}).flat().items()
    }
    assert logged["train.use_gpu"] == "False"
    rebuilt = config_from_params(logged)
    assert rebuilt.train.use_gpu is False
    # A resolved config round-trips through JSON with its bool (and its hash) unchanged.
    on_gpu = ExperimentConfig().with_overrides({"train.use_gpu": True})
    again = ExperimentConfig.from_dict(json.loads(json.dumps(on_gpu.to_dict())))
    assert again.train.use_gpu is True and again.config_hash() == on_gpu.config_hash()
    assert on_gpu.config_hash() != ExperimentConfig().config_hash()  # auto hashes apart


# --- resolution on the driver ----------------------------------------------------------------


def test_auto_resolves_to_a_gpu_where_the_cluster_has_one_explicit_values_stay() -> None:
    assert use_gpu_on("auto", {"CPU": 8.0, "GPU": 1.0}) is True
    assert use_gpu_on("auto", {"CPU": 8.0, "GPU": 8.0}) is True
    assert use_gpu_on("auto", {"CPU": 8.0}) is False
    assert use_gpu_on("auto", {"CPU": 8.0, "GPU": 0.5}) is False  # no whole GPU to give
    assert use_gpu_on(False, {"GPU": 4.0}) is False
    assert use_gpu_on(True, {"CPU": 2.0}) is True
    auto = ExperimentConfig()
    assert resolve_use_gpu(auto, GPU_NODE).train.use_gpu is True
    assert resolve_use_gpu(auto, CPU_NODE).train.use_gpu is False
    assert auto.train.use_gpu == "auto"  # a copy: the caller's config is left as it was
    forced = auto.with_overrides({"train.use_gpu": False})
    assert resolve_use_gpu(forced, GPU_NODE) is forced


def test_every_study_takes_the_gpus_unless_told_not_to() -> None:
    default = rep_count("--seeds", "2", "--grids", "2x2")
    assert default.base.train.use_gpu == "auto"  # resolved by the plan, on the driver
    on_gpus = plan_resources(default, {"CPU": 16.0, "GPU": 4.0})
    assert on_gpus.base.train.use_gpu is True and on_gpus.trial_gpus == 2
    on_cpus = plan_resources(default, {"CPU": 16.0})
    assert on_cpus.base.train.use_gpu is False and on_cpus.trial_gpus == 0
    # An explicit false (config or flag) keeps a GPU cluster's trials on the CPUs.
    for argv in (["--set", "train.use_gpu=false"], ["--gpus-per-worker", "0"]):
        plan = plan_resources(rep_count("--grids", "2x2", *argv), {"CPU": 16.0, "GPU": 4.0})
        assert plan.base.train.use_gpu is False and plan.trial_gpus == 0, argv
    # And an explicit true asks for GPUs the cluster lacks: the trials wait for them.
    want = plan_resources(rep_count("--grids", "2x2", "--gpus-per-worker", "1"), CPU_NODE)
    assert want.base.train.use_gpu is True and want.fits == 0
    assert "waits for resources" in want.summary


def test_build_trainer_hands_the_workers_a_resolved_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray
    import torch

    from cbtlab.train import build_trainer

    def built(cfg: ExperimentConfig) -> tuple[bool, float, object]:
        trainer = build_trainer(cfg, name="t", storage_path="/tmp/unused")
        scaling = trainer.scaling_config
        worker = trainer.train_loop_config["experiment"]["train"]["use_gpu"]
        return scaling.use_gpu, scaling.resources_per_worker.get("GPU", 0), worker

    # Before Ray is started (fit() would start it here): this machine's GPUs decide.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    for gpus, expected in ((0, False), (2, True)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda gpus=gpus: gpus)
        assert built(ExperimentConfig()) == (expected, int(expected), expected)
    # Connected: the cluster's GPUs decide, not this machine's (none here).
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    for cluster, expected in (({"CPU": 4.0, "GPU": 4.0}, True), ({"CPU": 4.0}, False)):
        monkeypatch.setattr(ray, "cluster_resources", lambda cluster=cluster: cluster)
        assert built(ExperimentConfig()) == (expected, int(expected), expected)
    # An explicit value is never second-guessed.
    off = ExperimentConfig().with_overrides({"train.use_gpu": False})
    assert built(off) == (False, 0, False)


# --- sizing a GPU worker from the node -------------------------------------------------------


def test_gpu_worker_sizing_shares_the_node_cpus_among_its_gpus() -> None:
    assert gpu_worker_sizing(16, 1) == (15.0, 14)  # one H200 box: 1 CPU left to Ray
    assert gpu_worker_sizing(64, 8) == (7.0, 6)  # (64 - 1) / 8 = 7.875 -> 7
    assert gpu_worker_sizing(192, 8) == (23.0, MAX_LOADER_WORKERS)  # loader processes capped
    assert gpu_worker_sizing(10, 8) == (1.0, 0)  # one CPU each: decode in the training process
    assert gpu_worker_sizing(8, 8) == (0.87, 0)  # less than a CPU per GPU: fractions fit all
    assert gpu_worker_sizing(1, 2) == (0.5, 0)  # no room for the reserve: share everything
    assert gpu_worker_sizing(16, 1, reserved_cpus=4) == (12.0, 11)
    for cpus, gpus in ((16, 0), (0, 1)):
        with pytest.raises(ValueError):
            gpu_worker_sizing(cpus, gpus)


def test_the_tightest_gpu_node_sizes_the_workers() -> None:
    nodes = [{"CPU": 64.0, "GPU": 8.0}, {"CPU": 32.0, "GPU": 8.0}, {"CPU": 96.0}]
    assert gpu_node_shape(nodes) == (32.0, 8.0)
    assert gpu_node_shape([{"CPU": 96.0}, {"CPU": 4.0, "GPU": 0.0}]) is None
    gpu = ExperimentConfig().with_overrides({"train.use_gpu": True})
    sized, said = size_from_node(gpu, nodes)
    assert (sized.train.cpus_per_worker, sized.data.loader_workers) == (3.0, 2)
    assert "32 CPU, 8 GPU" in said and "train.cpus_per_worker=3" in said
    # One trial driver per GPU: 16 GPUs x 0.25 CPU = 4 CPUs kept back, not 1.
    wide, _ = size_from_node(gpu, [{"CPU": 66.0, "GPU": 16.0}], driver_cpus=0.25)
    assert wide.train.cpus_per_worker == 3.0  # (66 - 4) / 16, not (66 - 1) / 16
    # Only the keys asked for; nothing on CPUs or unresolved.
    only, _ = size_from_node(gpu, nodes, ["data.loader_workers"])
    assert (only.train.cpus_per_worker, only.data.loader_workers) == (0.5, 2)
    for cfg in (gpu.with_overrides({"train.use_gpu": False}), ExperimentConfig()):
        assert size_from_node(cfg, nodes) == (cfg, "")
    with pytest.raises(ValueError, match=r"train\.lr"):
        size_from_node(gpu, nodes, ["train.lr"])


def test_imagenet_preset_sizes_from_the_gpu_node_and_keeps_smoke_values_on_cpus() -> None:
    spec = imagenet()
    assert spec.node_sized == ["train.cpus_per_worker", "data.loader_workers"]
    assert spec.base.train.use_gpu == "auto"
    one_gpu = plan_resources(spec, GPU_NODE, [GPU_NODE])
    train, data = one_gpu.base.train, one_gpu.base.data
    assert (train.use_gpu, train.cpus_per_worker, data.loader_workers) == (True, 15.0, 14)
    assert "sized from the GPU node (16 CPU, 1 GPU)" in one_gpu.summary
    two_nodes = [{"CPU": 16.0, "GPU": 2.0}, {"CPU": 64.0, "GPU": 2.0}]
    cluster = {"CPU": 80.0, "GPU": 4.0}
    plan = plan_resources(spec, cluster, two_nodes)
    assert (plan.base.train.cpus_per_worker, plan.base.data.loader_workers) == (7.0, 6)
    assert plan.trial_cpus == pytest.approx(0.1 + 2 * 7.0)
    # No GPU, or told to stay on the CPUs: the config's 2-core values, nothing sized.
    for cpu_plan in (
        plan_resources(spec, CPU_NODE, [CPU_NODE]),
        plan_resources(imagenet("--gpus-per-worker", "0"), GPU_NODE, [GPU_NODE]),
    ):
        train, data = cpu_plan.base.train, cpu_plan.base.data
        assert (train.use_gpu, train.cpus_per_worker, data.loader_workers) == (False, 0.5, 0)
        assert "sized" not in cpu_plan.summary
    # What --set gives stays; the rest is sized.
    mine = imagenet("--set", "data.loader_workers=6")
    assert mine.node_sized == ["train.cpus_per_worker"]
    base = plan_resources(mine, GPU_NODE, [GPU_NODE]).base
    assert (base.train.cpus_per_worker, base.data.loader_workers) == (15.0, 6)
    # The smoke preset sizes nothing, on GPUs too.
    smoke = plan_resources(rep_count("--grids", "2x2"), GPU_NODE, [GPU_NODE]).base
    assert (smoke.train.use_gpu, smoke.train.cpus_per_worker, smoke.data.loader_workers) == (
        True,
        0.5,
        0,
    )
    with pytest.raises(ConfigError, match=r"study\.node_sized"):
        StudySpec(
            name="x", base=ExperimentConfig(), space={"model.depth": [1]}, node_sized=["train.lr"]
        ).validate()


# --- the commands ----------------------------------------------------------------------------


def test_train_help_documents_the_gpu_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--help"], prog="cbtlab train")
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--gpus-per-worker {0,1}" in out and "'auto'" in out
    for flag in (["--gpus-per-worker", "2"], ["--set", "train.use_gpu=maybe"]):
        with pytest.raises(SystemExit) as exit_info:
            train_main(flag, prog="cbtlab train")  # refused before Ray starts
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 2" in err and "train.use_gpu: expected true, false or 'auto'" in err
    help_text = " ".join(model_scaling_parser().format_help().split())
    assert "0: CPU only, even where the cluster has GPUs" in help_text


def test_train_says_when_its_workers_want_more_gpus_than_the_cluster_has() -> None:
    gpu = resolve_use_gpu(ExperimentConfig(), GPU_NODE)  # 2 workers, 1 GPU
    assert "needs 2 GPUs" in gpu_note(gpu, GPU_NODE) and "--workers" in gpu_note(gpu, GPU_NODE)
    one = gpu.with_overrides({"train.num_workers": 1})
    assert "1 GPU)" in gpu_note(one, GPU_NODE) and "needs" not in gpu_note(one, GPU_NODE)
    cpu = resolve_use_gpu(ExperimentConfig(), CPU_NODE)
    assert "GPU)" not in gpu_note(cpu, CPU_NODE) and "needs" not in gpu_note(cpu, CPU_NODE)
