"""What Ray Train costs: the same training through Ray Train's TorchTrainer and as a plain
PyTorch DDP job (`studies/bench_ray_overhead.py`).

Both sides run `run_training` on the same config with the same number of gloo DDP worker
processes; only the launcher differs (`torch.multiprocessing.spawn`, or a `TorchTrainer` on
a Ray started once beforehand). Epoch checkpoints are off; the plain workers take Ray's worker
niceness (`--plain-niceness`). Per run: the wall time, and the steady-state time per epoch
(the median over epochs 2.. of rank 0's report-to-report intervals). Runs alternate plain, ray,
ray, plain, ...; the ratio is the median over back-to-back pairs.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cbtlab.cluster import connect_ray, free_port
from cbtlab.config import ExperimentConfig
from cbtlab.data import prepare_dataset
from cbtlab.overrides import ConfigError, add_override_argument, parse_override
from cbtlab.train.loop import Report, run_training

KINDS = ("plain", "ray")


@dataclass
class OverheadSpec:
    """The bench's settings: `overrides` are config keys (`--set`) over the embedded defaults."""

    epochs: int = 8
    repeats: int = 2
    workers: int = 2
    # The plain workers' niceness: Ray's worker niceness by default (see the module docstring).
    plain_niceness: int = field(default_factory=lambda: ray_worker_niceness())
    overrides: dict[str, Any] = field(default_factory=dict)

    def config(self) -> ExperimentConfig:
        return ExperimentConfig().with_overrides(
            {
                "train.epochs": self.epochs,
                "train.num_workers": self.workers,
                "train.checkpoint_every": 0,
                **self.overrides,
            }
        )


def ray_worker_niceness() -> int:
    """The niceness Ray gives its worker processes: `RAY_worker_niceness`, else Ray's 15."""
    return int(os.environ.get("RAY_worker_niceness", "15"))  # noqa: SIM112 (Ray's spelling)


@dataclass
class RunTimes:
    kind: str
    wall_s: float
    epoch_s: list[float]  # rank 0's report-to-report intervals, epochs 2..
    train_epoch_s: list[float]  # time/train_epoch_s of epochs 2..

    @property
    def steady_epoch_s(self) -> float:
        return statistics.median(self.epoch_s) if self.epoch_s else float("nan")


@dataclass
class OverheadResult:
    spec: OverheadSpec
    ray_init_s: float
    runs: list[RunTimes]

    def pooled(self, kind: str, attr: str) -> float:
        values = [v for r in self.runs if r.kind == kind for v in getattr(r, attr)]
        return statistics.median(values) if values else float("nan")

    def fastest(self, kind: str) -> float:
        return min(v for r in self.runs if r.kind == kind for v in r.epoch_s)

    def wall(self, kind: str) -> float:
        return statistics.median(r.wall_s for r in self.runs if r.kind == kind)

    def ratios(self) -> dict[str, float]:
        """ray/plain: `epoch`, the median over back-to-back (plain, ray) pairs of their steady
        epochs' ratio (robust to the machine's load drifting between pairs); `fastest`, of the
        fastest epochs (noise only adds time); `train`, of the training part alone (pooled
        medians); `wall`, of the median wall times."""
        pairs = [self.runs[i : i + 2] for i in range(0, len(self.runs) - 1, 2)]
        by_kind = [{r.kind: r.steady_epoch_s for r in pair} for pair in pairs]
        return {
            "epoch": statistics.median(p["ray"] / p["plain"] for p in by_kind),
            "fastest": self.fastest("ray") / self.fastest("plain"),
            "train": self.pooled("ray", "train_epoch_s") / self.pooled("plain", "train_epoch_s"),
            "wall": self.wall("ray") / self.wall("plain"),
        }

    def lines(self) -> list[str]:
        cfg = self.spec.config()
        out = [
            f"{self.spec.workers} workers x {cfg.train.cpus_per_worker} CPU, "
            f"{cfg.data.dataset}, batch {cfg.data.batch_size}, {self.spec.epochs} epochs, "
            f"model {cfg.model.attention} d={cfg.model.embed_dim} depth={cfg.model.depth}; "
            f"plain workers at niceness {self.spec.plain_niceness}, Ray's at "
            f"{ray_worker_niceness()}",
            f"ray.init (once, not in any run): {self.ray_init_s:.1f} s",
            f"{'run':<10}{'wall_s':>9}{'epoch_s':>10}{'fastest_s':>11}{'train_epoch_s':>15}",
        ]
        seen: dict[str, int] = {}
        for run in self.runs:
            seen[run.kind] = seen.get(run.kind, 0) + 1
            train = statistics.median(run.train_epoch_s) if run.train_epoch_s else float("nan")
            out.append(
                f"{run.kind + ' #' + str(seen[run.kind]):<10}{run.wall_s:>9.1f}"
                f"{run.steady_epoch_s:>10.3f}{min(run.epoch_s):>11.3f}{train:>15.3f}"
            )
        r = self.ratios()
        out.append(
            f"ray/plain time ratio: {r['epoch']:.3f} per steady-state epoch (median of epochs "
            f"2..{self.spec.epochs}, paired runs; fastest epochs {r['fastest']:.3f}, training "
            f"part {r['train']:.3f}); wall with start-up {r['wall']:.3f}"
        )
        return out


def run_overhead(
    spec: OverheadSpec, *, say: Callable[[str], None] = lambda text: None
) -> OverheadResult:
    """Alternate plain and Ray runs of `spec.config()` (see the module docstring)."""
    if spec.epochs < 2:
        raise ValueError("the steady state needs at least 2 epochs")
    cfg = spec.config()
    prepare_dataset(cfg.data)  # built once here, not by racing workers
    start = time.perf_counter()
    connect_ray(None)
    ray_init_s = time.perf_counter() - start
    runs = []
    order = [kind for i in range(spec.repeats) for kind in (KINDS if i % 2 == 0 else KINDS[::-1])]
    with tempfile.TemporaryDirectory(prefix="cbtlab_overhead_") as tmp:
        for i, kind in enumerate(order):
            log_path = Path(tmp) / f"{i}_{kind}.jsonl"
            start = time.perf_counter()
            if kind == "plain":
                run_plain(cfg, log_path, niceness=spec.plain_niceness)
            else:
                run_ray(cfg, log_path, Path(tmp))
            wall = time.perf_counter() - start
            runs.append(_times(kind, wall, log_path))
            say(f"{kind}: wall {wall:.1f} s, steady epoch {runs[-1].steady_epoch_s:.3f} s")
    return OverheadResult(spec, ray_init_s, runs)


def _times(kind: str, wall: float, log_path: Path) -> RunTimes:
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    stamps = [r["t"] for r in records]
    return RunTimes(
        kind,
        wall,
        [b - a for a, b in itertools.pairwise(stamps)],
        [r["train_epoch_s"] for r in records[1:]],
    )


def _recorder(log_path: Path, rank: int) -> Report:
    """Rank 0 appends each epoch's report time to `log_path`."""

    def record(metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        if rank == 0:
            line = {"t": time.perf_counter(), "train_epoch_s": metrics["time/train_epoch_s"]}
            with open(log_path, "a") as handle:
                handle.write(json.dumps(line) + "\n")

    return record


def run_plain(cfg: ExperimentConfig, log_path: Path, *, niceness: int = 0) -> None:
    """`run_training` in `train.num_workers` processes of a gloo DDP group, each at
    `niceness` (added to this process's)."""
    import torch.multiprocessing as mp

    port = free_port()  # for the process group's rendezvous
    world = cfg.train.num_workers
    mp.spawn(
        _plain_worker, args=(cfg.to_dict(), world, port, str(log_path), niceness), nprocs=world
    )


def _plain_worker(
    rank: int, cfg_dict: dict[str, Any], world: int, port: int, log: str, niceness: int
) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if niceness:
        os.nice(niceness)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run_training(
            ExperimentConfig.from_dict(cfg_dict),
            rank=rank,
            world_size=world,
            report=_recorder(Path(log), rank),
            prepare_model=DistributedDataParallel if world > 1 else lambda m: m,
            device=torch.device("cpu"),
        )
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def run_ray(cfg: ExperimentConfig, log_path: Path, tmp: Path) -> None:
    """`run_training` in a TorchTrainer's workers (Ray started already)."""
    # Ray here, not at the top: the module's results and flags are read without Ray.
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"experiment": cfg.to_dict(), "log": str(log_path)},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=RunConfig(name=log_path.stem, storage_path=str(tmp / "ray_results")),
    )
    trainer.fit()


def _ray_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    record = _recorder(Path(config["log"]), rank)

    def report(metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        ray.train.report(metrics)
        record(metrics, state)

    run_training(
        ExperimentConfig.from_dict(config["experiment"]),
        rank=rank,
        world_size=ctx.get_world_size(),
        report=report,
        prepare_model=ray.train.torch.prepare_model,
        device=ray.train.torch.get_device(),
    )


def overhead_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`studies/bench_ray_overhead.py`: parse flags, run, print; the last line is the ratio."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Time the same training under Ray Train and as a plain PyTorch DDP job.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = OverheadSpec()
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs per run")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="runs of each")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="DDP processes")
    parser.add_argument(
        "--quick", action="store_true", help="3 epochs, one run each (a smoke test)"
    )
    parser.add_argument(
        "--plain-niceness",
        type=int,
        default=defaults.plain_niceness,
        help="CPU niceness of the plain workers (default: Ray's worker niceness)",
    )
    add_override_argument(parser)
    args = parser.parse_args(argv)
    spec = OverheadSpec(
        epochs=3 if args.quick else args.epochs,
        repeats=1 if args.quick else args.repeats,
        workers=args.workers,
        plain_niceness=args.plain_niceness,
    )
    try:
        spec.overrides = dict(parse_override(text) for text in args.overrides)
        spec.config()
    except ConfigError as exc:
        parser.error(str(exc))
    result = run_overhead(spec, say=lambda text: print(text, flush=True))
    for line in result.lines():
        print(line, flush=True)
    return 0
