"""The GPU check: the built-in digits CBT trained on every visible GPU through `run_training`
under a real NCCL process group and, where Ray is installed, through Ray Train; one PASS/FAIL
line per check, and a non-zero exit naming what failed (`studies/gpu_check.py`).

The process-group part needs no Ray: `torch.multiprocessing` spawns one process per GPU (world
size = GPU count), each pins its GPU (`torch.cuda.set_device(rank)`), joins an NCCL group over
a free localhost port, wraps the model in `DistributedDataParallel(device_ids=[rank])` and
trains in bf16. It runs twice: straight through, then again from the checkpoint of the first
epoch. `--device cpu` runs the same code with gloo and CPU processes, so that this machinery is
tested where there is no GPU (`tests/test_gpu_check.py`); it tests no GPU then.

Checks of the process-group part (prefixed with the backend, "nccl:" or "gloo:"):
- run: both runs finish on every rank;
- training loss falls: rank 0's `train/loss`, first epoch to last;
- metrics finite: every number every rank reported, at the chosen precision;
- ranks report identical metrics: every epoch's reduced metrics are the same on every rank
  (bit for bit; `time/` and `throughput/` are per rank and left out);
- ranks end with identical parameters: a SHA-256 of every rank's parameters, both runs;
- checkpoint state on CPU: every tensor of the last checkpoint state lives on the CPU;
- checkpoint round-trips: that state, through `save_state`/`load_state`, comes back equal;
- resume matches: the run resumed from the epoch-1 checkpoint ends with the straight run's
  parameters (and, on CPU, its metrics) exactly on CPU; on CUDA a relative L2 difference up to
  `--resume-rtol` is allowed, because CUDA kernels that accumulate with atomic adds (attention
  backward, pooling backward) sum in an order that varies from run to run, so two runs of the
  same steps may differ in the last bits;
- val/top1 floor (`--min-top1`, 0 for none): the last epoch's validation accuracy.
The Ray part ("ray:") trains the same config through `build_trainer`/`fit` (a GPU per worker
on CUDA), checks that the loss falls, that every kept epoch's metrics are finite, that its last
checkpoint loads with its tensors on the CPU, and that a run resumed from its epoch-1
checkpoint ends with the same parameters.

Only torch, torchvision, timm, numpy, pillow and pyarrow (with webdataset, braceexpand, pyyaml
and cloudpickle carried) are needed for the process-group part: nothing on the import path of
this module imports Ray, MLflow, Optuna, scikit-learn, pandas, matplotlib or scipy
(`tests/test_bare_imports.py`). The digits need scikit-learn to be built, so a bare machine
gets prebuilt shards with `--data-root` (see `DataUnavailable`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.util
import json
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from cbtlab.checkpoint import load_state, save_state
from cbtlab.cluster import connect_ray, free_port
from cbtlab.config import ExperimentConfig
from cbtlab.data import prepare_dataset
from cbtlab.data.digits import digits_dir
from cbtlab.overrides import ConfigError, add_override_argument, parse_override
from cbtlab.train.faults import FailAt
from cbtlab.train.loop import check_training_data, run_training
from cbtlab.train.trainer import build_trainer, fit

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
# The check's model: the digits CBT (ExperimentConfig's defaults: 16 px, patch 2, embed 96,
# 3 heads, 4x4 representatives) at depth 2, a few seconds an epoch on one CPU core.
CHECK_MODEL = {"model.depth": 2}
# The global batch: this, rounded up to a multiple of the world size (ExperimentConfig's
# default, so that the check learns as the CPU runs do).
GLOBAL_BATCH = 64
# Per-rank values in an epoch's metrics (wall-clock times and rates); everything else reported
# is reduced over the ranks and must agree on every rank.
PER_RANK_PREFIXES = ("time/", "throughput/")
# Measured, not computed: differ from run to run (perf/ is reduced, so the same on every rank).
TIMED_PREFIXES = (*PER_RANK_PREFIXES, "perf/")
# Resumed vs. straight run on CUDA: the largest relative L2 difference of the parameters taken
# for rounding (see the module docstring). A resume that lost the optimiser's or the schedule's
# state differs by orders of magnitude more after an epoch.
CUDA_RESUME_RTOL = 1e-4
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=5)
BUILD_HINT = (
    "build them where scikit-learn is installed, `python data_pipelines/prepare_digits.py "
    "--set data.cache_dir=DIR` (it prints the folder it wrote, DIR/{name}), copy DIR to this "
    "machine and pass --data-root DIR (or the {name} folder itself)"
)


class DataUnavailable(RuntimeError):
    """The digits shards are not where the check looks, and cannot be built here."""


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def line(self) -> str:
        return f"{self.status}  {self.name}" + (f"  {self.detail}" if self.detail else "")


def _verdict(name: str, ok: bool, detail: str) -> Check:
    return Check(name, PASS if ok else FAIL, detail)


@dataclass
class CheckSpec:
    """What to run: the command-line flags of `gpu_check_main`."""

    device: str = "cuda"  # "cuda" (NCCL) or "cpu" (gloo)
    processes: int = 0  # 0: every visible GPU on CUDA, 2 on CPU
    epochs: int = 5
    precision: str = ""  # "": bf16 on CUDA, fp32 on CPU
    data_root: str = ""
    min_top1: float = 0.5
    resume_rtol: float = CUDA_RESUME_RTOL
    ray: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"

    @property
    def exact(self) -> bool:
        """Whether a resumed run must match bit for bit (see the module docstring)."""
        return self.device == "cpu"

    def world_size(self) -> int:
        if self.processes:
            return self.processes
        return torch.cuda.device_count() if self.device == "cuda" else 2

    def config(self, world_size: int) -> ExperimentConfig:
        """The run's config: the digits CBT at `--precision`, `data.batch_size` split over
        `world_size` ranks, then the `--set` overrides, then what the checks rely on (the
        epochs, the world size, a checkpoint at every epoch's end and none within)."""
        per_rank = -(-GLOBAL_BATCH // world_size)
        defaults = {
            **CHECK_MODEL,
            "train.precision": self.precision or ("bf16" if self.device == "cuda" else "fp32"),
            "data.batch_size": per_rank * world_size,
        }
        required = {
            "train.epochs": self.epochs,
            "train.num_workers": world_size,
            "train.checkpoint_every": 1,
            "train.checkpoint_every_steps": 0,
        }
        cfg = ExperimentConfig().with_overrides({**defaults, **self.overrides, **required})
        data = digits_overrides(self.data_root, cfg) if self.data_root else {}
        return cfg.with_overrides(data) if data else cfg


def digits_overrides(data_root: str, cfg: ExperimentConfig) -> dict[str, Any]:
    """`data.cache_dir` for prebuilt digits shards at `data_root`: a folder holding the digits
    folder (a `data.cache_dir`), or that folder itself. The built-in dataset is read as it is
    in every run (`data.dataset="shards"` would evaluate it with ImageNet's crop and augment it
    with ImageNet's random crops)."""
    root = Path(data_root).expanduser().resolve()
    d = cfg.data
    name = digits_dir(Path(), d.val_fraction, d.split_seed, d.samples_per_shard).name
    if root.name == name and (root / "card.json").is_file():
        return {"data.cache_dir": str(root.parent)}
    if (root / name / "card.json").is_file():
        return {"data.cache_dir": str(root)}
    raise DataUnavailable(
        f"--data-root {root} holds no digits shards ({name}/card.json); "
        + BUILD_HINT.format(name=name)
    )


def prepare_digits(cfg: ExperimentConfig) -> Path | str:
    """The run's shards, built once here (not by racing ranks); DataUnavailable with the way to
    pre-build them where scikit-learn is missing."""
    try:
        return prepare_dataset(cfg.data)
    except ModuleNotFoundError as exc:
        d = cfg.data
        name = digits_dir(Path(), d.val_fraction, d.split_seed, d.samples_per_shard).name
        raise DataUnavailable(
            f"the digits shards are not built here and building them needs {exc.name} "
            f"({exc}); " + BUILD_HINT.format(name=name)
        ) from exc


# ---- the process-group part: what each rank does ------------------------------------------


@dataclass(frozen=True)
class RankPlan:
    """What every spawned rank needs (picklable)."""

    config: dict[str, Any]  # ExperimentConfig.to_dict()
    world_size: int
    device: str  # "cuda" or "cpu"
    backend: str
    port: int
    out_dir: str
    # A test's injected failure in the straight run (`cbtlab.train.faults`): the tests put it in
    # through `gpu_check_main`'s `launch`.
    fail_at: FailAt | None = None

    def rank_device(self, rank: int) -> torch.device:
        return torch.device("cuda", rank) if self.device == "cuda" else torch.device("cpu")


@dataclass
class RankResult:
    """What one rank reports back: its epochs' metrics in both runs and its parameters' digest;
    rank 0 also its checkpoint findings and both runs' final weights."""

    rank: int
    device_name: str
    straight: list[dict[str, float]]
    resumed: list[dict[str, float]]
    digest: str
    resumed_digest: str
    # Rank 0: the tensor devices of the last checkpoint state, and how it differed after
    # save_state/load_state ("" when equal).
    state_devices: list[str] | None = None
    roundtrip: str | None = None
    # Rank 0: the final state_dict of each run ("straight", "resumed"), on the CPU.
    weights: dict[str, dict[str, Tensor]] | None = None


Launch = Callable[[RankPlan], list[RankResult]]
Say = Callable[[str], None]


class RankFailed(RuntimeError):
    """A rank raised: the message ends with the first rank's error (the others' are usually
    consequences: their peer went away)."""


def spawn_ranks(plan: RankPlan) -> list[RankResult]:
    """Run `_rank_main` in `plan.world_size` spawned processes; their results, in rank order.
    When a rank raises, the others are stopped and RankFailed is raised here with the error of
    the rank that failed first and its traceback."""
    import torch.multiprocessing as mp

    out = Path(plan.out_dir)
    try:
        mp.spawn(_rank_main, args=(plan,), nprocs=plan.world_size, join=True)
    except Exception as exc:
        # torch.multiprocessing raises the error of whichever failed rank it looked at first:
        # often one whose peer went away, not the rank that failed first.
        errors = [json.loads(path.read_text()) for path in out.glob("rank*.error.json")]
        if not errors:
            raise
        first = min(errors, key=lambda error: error["time"])
        raise RankFailed(
            f"{first['traceback'].rstrip()}\nrank {first['rank']}: {first['error']}"
        ) from exc
    results = []
    for rank in range(plan.world_size):
        data = json.loads((out / f"rank{rank}.json").read_text())
        results.append(RankResult(**data))
    results[0].weights = torch.load(out / "weights.pt", map_location="cpu", weights_only=True)
    return results


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def _rank_main(rank: int, plan: RankPlan) -> None:
    """One rank: join the group, train straight through, check the last checkpoint (rank 0),
    train again from the epoch-1 checkpoint, write the results to `plan.out_dir`."""
    import torch.distributed as dist

    device = plan.rank_device(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        plan.backend,
        init_method=f"tcp://127.0.0.1:{plan.port}",
        rank=rank,
        world_size=plan.world_size,
        timeout=PROCESS_GROUP_TIMEOUT,
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    try:
        _train_twice(rank, plan, device)
    except Exception as exc:  # when and why, for spawn_ranks to tell which rank failed first
        error = {
            "rank": rank,
            "time": time.time(),
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
        (Path(plan.out_dir) / f"rank{rank}.error.json").write_text(json.dumps(error))
        raise
    finally:
        dist.destroy_process_group()


def _train_twice(rank: int, plan: RankPlan, device: torch.device) -> None:
    import torch.distributed as dist

    cfg = ExperimentConfig.from_dict(plan.config)
    out = Path(plan.out_dir)
    first = out / "epoch1"

    def wrap(model: nn.Module) -> nn.Module:
        return _ddp(model, device)

    straight: list[dict[str, float]] = []
    states: list[dict[str, Any]] = []

    def report(metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        straight.append(dict(metrics))
        if state is not None:  # rank 0, every epoch (train.checkpoint_every=1)
            states.append(state)
            if len(states) == 1:
                save_state(state, first)

    model = run_training(
        cfg,
        rank=rank,
        world_size=plan.world_size,
        report=report,
        prepare_model=wrap,
        device=device,
        fail_at=plan.fail_at,
    )
    result: dict[str, Any] = {
        "rank": rank,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "straight": straight,
        "digest": parameter_digest(model),
    }
    if rank == 0:
        last = states[-1]
        result["state_devices"] = sorted({t.device.type for t in iter_tensors(last)})
        save_state(last, out / "last")
        result["roundtrip"] = state_difference(last, load_state(out / "last"))
    dist.barrier()  # rank 0 has written the epoch-1 checkpoint that every rank reads now
    resumed: list[dict[str, float]] = []
    again = run_training(
        cfg,
        rank=rank,
        world_size=plan.world_size,
        report=lambda metrics, state: resumed.append(dict(metrics)),
        prepare_model=wrap,
        device=device,
        resume=load_state(first),
    )
    result["resumed"] = resumed
    result["resumed_digest"] = parameter_digest(again)
    if rank == 0:
        weights = {"straight": cpu_state(model), "resumed": cpu_state(again)}
        torch.save(weights, out / "weights.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(result, default=float))


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of the model's parameters (names, dtypes and bytes, in logical order)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().to("cpu").reshape(-1)
        digest.update(f"{name}:{flat.dtype}:".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}


def iter_tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor in nested dicts, lists and tuples."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from iter_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from iter_tensors(value)


def state_difference(a: Any, b: Any, where: str = "state") -> str:
    """Where two nested states first differ ("" if nowhere): tensors by dtype, shape and value
    (bit for bit), containers by keys and items, the rest by ==."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return f"{where}: a tensor on one side only"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        return "" if torch.equal(a.cpu(), b.cpu()) else f"{where}: values differ"
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return f"{where}: keys {sorted(map(str, set(a) ^ set(b)))} on one side only"
        for key in a:
            found = state_difference(a[key], b[key], f"{where}[{key!r}]")
            if found:
                return found
        return ""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = state_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return ""
    if a == b or (_is_number(a) and _is_number(b) and math.isnan(a) and math.isnan(b)):
        return ""
    return f"{where}: {a!r} vs {b!r}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def weight_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[float, float]:
    """(max |a - b|, ||a - b|| / ||a||) over every floating-point tensor of two state_dicts."""
    biggest, diff_sq, norm_sq = 0.0, 0.0, 0.0
    for name, x in a.items():
        if not x.is_floating_point():
            continue
        x, y = x.double(), b[name].double()
        delta = (x - y).abs()
        biggest = max(biggest, delta.max().item() if delta.numel() else 0.0)
        diff_sq += delta.square().sum().item()
        norm_sq += x.square().sum().item()
    return biggest, math.sqrt(diff_sq) / max(math.sqrt(norm_sq), 1e-30)


def metrics_difference(
    a: dict[str, float], b: dict[str, float], skip: tuple[str, ...] = PER_RANK_PREFIXES
) -> str:
    """The first key, of those not starting with `skip`, whose values differ (bit for bit; NaN
    equals NaN), "" if none."""
    a = {k: v for k, v in a.items() if not k.startswith(skip)}
    b = {k: v for k, v in b.items() if not k.startswith(skip)}
    if set(a) != set(b):
        return f"keys {sorted(set(a) ^ set(b))} on one side only"
    for key in sorted(a):
        x, y = a[key], b[key]
        if x != y and not (_is_number(x) and _is_number(y) and math.isnan(x) and math.isnan(y)):
            return f"{key} {x!r} vs {y!r}"
    return ""


def non_finite(reports: Sequence[dict[str, Any]]) -> list[str]:
    """Every non-finite number in `reports`, as "epoch E key=value"."""
    return [
        f"epoch {r.get('epoch', '?')} {k}={v}"
        for r in reports
        for k, v in r.items()
        if _is_number(v) and not math.isfinite(v)
    ]


# ---- the checks ---------------------------------------------------------------------------


def loss_falls(name: str, reports: Sequence[dict[str, float]]) -> Check:
    losses = [r["train/loss"] for r in reports]
    detail = " -> ".join(f"{v:.4f}" for v in losses) + f" (epochs 1..{len(losses)})"
    return _verdict(name, len(losses) >= 2 and losses[-1] < losses[0], detail)


def top1_floor(name: str, reports: Sequence[dict[str, float]], floor: float) -> Check:
    top1 = reports[-1]["val/top1"]
    if floor <= 0:
        return Check(name, SKIP, f"{top1:.4f} (no floor: --min-top1 0)")
    return _verdict(name, top1 >= floor, f"{top1:.4f} (floor {floor:g})")


def resume_check(
    name: str,
    straight: Sequence[dict[str, float]],
    resumed: Sequence[dict[str, float]],
    weights: tuple[dict[str, Tensor], dict[str, Tensor]],
    *,
    exact: bool,
    rtol: float,
) -> Check:
    """The run resumed from the epoch-1 checkpoint against the uninterrupted one, given each
    run's epoch metrics and final (straight, resumed) `weights`: it reports the epochs after the
    first, and ends with the same weights, identical where `exact` (and then with the same
    metrics), else within a relative L2 difference of `rtol`. A run resumed in process first
    reports the epochs its checkpoint finished again (`cbtlab.train.loop.run_training`): the
    epoch-1 checkpoint's report is the uninterrupted run's as saved, timings included (a run
    started over differs there)."""
    if resumed and straight and resumed[0] == straight[0]:
        resumed = resumed[1:]
    epochs, expected = [r.get("epoch") for r in resumed], [r.get("epoch") for r in straight[1:]]
    if epochs != expected:
        return Check(
            name,
            FAIL,
            f"the resumed run reported epochs {epochs}, the uninterrupted run's after the "
            f"first are {expected}: it did not continue from the epoch-1 checkpoint",
        )
    found = state_difference(*weights, "weights")
    if exact and not found:
        for a, b in zip(straight[1:], resumed, strict=True):
            found = found or metrics_difference(a, b, TIMED_PREFIXES)
    if not found:
        span = f"epochs {epochs[0]}..{epochs[-1]}" if len(epochs) > 1 else f"epoch {epochs[0]}"
        return Check(name, PASS, f"{span}, identical to the uninterrupted run")
    largest, relative = weight_difference(*weights)
    numbers = f"max |diff| {largest:.3g}, relative L2 {relative:.3g}"
    if exact:
        return Check(name, FAIL, f"differs from the uninterrupted run: {found} ({numbers})")
    return _verdict(
        name,
        relative <= rtol,
        f"{numbers} (tolerance {rtol:g}: CUDA's atomic-add kernels sum in a varying order)",
    )


def process_group_checks(
    results: Sequence[RankResult], spec: CheckSpec, precision: str
) -> list[Check]:
    """The checks of the process-group part (see the module docstring) over the ranks'
    results."""
    p = f"{spec.backend}:"
    zero = results[0]
    everything = [r for result in results for r in (*result.straight, *result.resumed)]
    checks = [
        loss_falls(f"{p} training loss falls", zero.straight),
        _verdict(
            f"{p} metrics finite ({precision})",
            not non_finite(everything),
            ", ".join(non_finite(everything)[:5])
            or f"{len(everything)} reports of {len(results)} ranks",
        ),
    ]
    disagree = []
    for result in results[1:]:
        for run in ("straight", "resumed"):
            ours, theirs = getattr(zero, run), getattr(result, run)
            if len(ours) != len(theirs):
                disagree.append(f"rank {result.rank} {run}: {len(theirs)} epochs vs {len(ours)}")
            for a, b in zip(ours, theirs, strict=False):
                found = metrics_difference(a, b)
                if found:
                    disagree.append(f"rank {result.rank} {run} epoch {a.get('epoch')}: {found}")
    checks.append(
        _verdict(
            f"{p} ranks report identical metrics",
            not disagree,
            "; ".join(disagree[:3]) or f"{len(results)} ranks, every epoch of both runs",
        )
    )
    digests = [(r.digest, r.resumed_digest) for r in results]
    odd = [r.rank for r in results if (r.digest, r.resumed_digest) != digests[0]]
    checks.append(
        _verdict(
            f"{p} ranks end with identical parameters",
            not odd,
            f"ranks {odd} differ from rank 0" if odd else f"sha256 {zero.digest[:12]}",
        )
    )
    devices = zero.state_devices or []
    checks.append(
        _verdict(f"{p} checkpoint state on CPU", devices == ["cpu"], f"tensors on {devices}")
    )
    checks.append(
        _verdict(
            f"{p} checkpoint round-trips",
            not zero.roundtrip,
            zero.roundtrip or "save_state -> load_state gives the same state",
        )
    )
    weights = zero.weights or {}
    checks.append(
        resume_check(
            f"{p} run resumed from epoch 1 matches",
            zero.straight,
            zero.resumed,
            (weights["straight"], weights["resumed"]),
            exact=spec.exact,
            rtol=spec.resume_rtol,
        )
    )
    checks.append(top1_floor(f"{p} val/top1", zero.straight, spec.min_top1))
    return checks


def run_process_group(
    spec: CheckSpec, cfg: ExperimentConfig, world_size: int, say: Say, *, launch: Launch
) -> list[Check]:
    """Spawn the ranks (through `launch`) and check what they report."""
    name = f"{spec.backend}: run_training on {world_size} rank" + "s" * (world_size > 1)
    say(f"..    {name}: {cfg.train.epochs} epochs, then again from the epoch-1 checkpoint")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cbtlab_gpu_check_") as tmp:
        plan = RankPlan(
            config=cfg.to_dict(),
            world_size=world_size,
            device=spec.device,
            backend=spec.backend,
            port=free_port(),
            out_dir=tmp,
        )
        try:
            results = launch(plan)
        except Exception as exc:
            say(traceback.format_exc().rstrip())
            return [Check(name, FAIL, _last_line(exc))]
    devices = sorted({r.device_name for r in results})
    checks = [Check(name, PASS, f"{time.perf_counter() - start:.1f} s on {', '.join(devices)}")]
    return checks + process_group_checks(results, spec, cfg.train.precision)


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


# ---- the Ray part -------------------------------------------------------------------------


def ray_importable() -> str:
    """Why `ray.train` does not import here ("" where it does)."""
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed"
    try:
        import ray.train  # noqa: F401
    except ImportError as exc:
        return f"ray.train does not import: {exc}"
    return ""


@contextlib.contextmanager
def _ray_started() -> Iterator[None]:
    """Ray for the check: the connected instance if any, else the study's way of starting it
    (`cbtlab.cluster.connect_ray`: $RAY_ADDRESS, or a local instance that ships cbtlab to
    its workers); shut down afterwards if started here."""
    import ray  # here: the process-group part runs on a bare machine without Ray

    if ray.is_initialized():
        yield
        return
    connect_ray(None)
    try:
        yield
    finally:
        ray.shutdown()


def ray_checks(spec: CheckSpec, cfg: ExperimentConfig, world_size: int, say: Say) -> list[Check]:
    """The same training through Ray Train (`build_trainer`/`fit`), straight and resumed from
    its epoch-1 checkpoint."""
    if not spec.ray:
        return [Check("ray", SKIP, "--no-ray")]
    why = ray_importable()
    if why:
        return [Check("ray", SKIP, why)]
    ray_cfg = cfg.with_overrides(
        {
            # A bool is valid for train.use_gpu whether it is a bool or true/false/"auto".
            "train.use_gpu": spec.device == "cuda",
            "train.num_workers": world_size,
            "train.keep_checkpoints": cfg.train.epochs,  # every epoch's, with its metrics
            "train.max_failures": 0,  # a failure is reported, not retried
        }
    )
    gpus = f", {world_size} GPU" if spec.device == "cuda" else ""
    name = f"ray: TorchTrainer on {world_size} workers{gpus}"
    say(f"..    {name}: {cfg.train.epochs} epochs, then again from the epoch-1 checkpoint")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cbtlab_gpu_check_ray_") as tmp:
        try:
            with _ray_started():
                straight = fit(build_trainer(ray_cfg, name="straight", storage_path=tmp))
                first = min(straight.best_checkpoints, key=lambda kept: kept[1]["epoch"])[0]
                resumed = fit(
                    build_trainer(ray_cfg, name="resumed", storage_path=tmp, resume_from=first.path)
                )
            with straight.checkpoint.as_directory() as directory:
                last = load_state(Path(directory))
            with resumed.checkpoint.as_directory() as directory:
                again = load_state(Path(directory))
        except Exception as exc:
            say(traceback.format_exc().rstrip())
            return [Check(name, FAIL, _last_line(exc))]
    reports, resumed_reports = (_epoch_reports(result) for result in (straight, resumed))
    devices = sorted({t.device.type for t in iter_tensors(last)})
    checks = [
        Check(name, PASS, f"{time.perf_counter() - start:.1f} s"),
        loss_falls("ray: training loss falls", reports),
        _verdict(
            f"ray: metrics finite ({cfg.train.precision})",
            not non_finite([*reports, *resumed_reports]),
            ", ".join(non_finite([*reports, *resumed_reports])[:5])
            or f"{len(reports) + len(resumed_reports)} reports",
        ),
        _verdict(
            "ray: checkpoint loads, on CPU",
            devices == ["cpu"] and last["epochs_done"] == cfg.train.epochs,
            f"epochs_done {last['epochs_done']}, tensors on {devices}",
        ),
        resume_check(
            "ray: run resumed from epoch 1 matches",
            reports,
            resumed_reports,
            (last["model"], again["model"]),
            exact=spec.exact,
            rtol=spec.resume_rtol,
        ),
        top1_floor("ray: val/top1", reports, spec.min_top1),
    ]
    return checks


def _epoch_reports(result: Any) -> list[dict[str, float]]:
    """A Ray Train result's epoch metrics, in order (every epoch's checkpoint is kept)."""
    return sorted((metrics for _, metrics in result.best_checkpoints), key=lambda m: m["epoch"])


# ---- the command --------------------------------------------------------------------------


def describe(spec: CheckSpec, cfg: ExperimentConfig, world_size: int) -> str:
    m = cfg.model
    what = (
        f"digits CBT (depth {m.depth}, embed {m.embed_dim}, {m.attention}), "
        f"{cfg.train.epochs} epochs, batch {cfg.data.batch_size}, {cfg.train.precision}"
    )
    if spec.device == "cuda":
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
        where = (
            f"{world_size} x {torch.cuda.get_device_name(0)}, torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}, NCCL {nccl})"
        )
    else:
        where = (
            f"CPU, {world_size} gloo processes, torch {torch.__version__} (this runs the GPU "
            "check's code on the CPU; it tests no GPU)"
        )
    return f"GPU check: {where}; {what}"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train the digits CBT on every visible GPU under NCCL (and through Ray "
        "Train where installed); one PASS/FAIL line per check, exit status 1 if any failed "
        "(2 if the check could not start).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = CheckSpec()
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default=defaults.device,
        help="cuda: one process per GPU, NCCL; cpu: CPU processes, gloo (the same code path)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=defaults.processes,
        help="ranks (0: every visible GPU on cuda, 2 on cpu)",
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="train.epochs (>= 2)")
    parser.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        default=None,
        help="train.precision; None: bf16 on cuda, fp32 on cpu",
    )
    parser.add_argument(
        "--data-root",
        default=defaults.data_root,
        help="prebuilt digits shards: a data.cache_dir holding the digits folder, or that "
        "folder; empty: the cache under CBTLAB_HOME, built there if needed (with scikit-learn)",
    )
    parser.add_argument(
        "--min-top1",
        type=float,
        default=defaults.min_top1,
        help="the last epoch's val/top1 must reach this (0: not checked)",
    )
    parser.add_argument(
        "--resume-rtol",
        type=float,
        default=defaults.resume_rtol,
        help="on cuda: the relative L2 difference allowed between the resumed and the "
        "uninterrupted run's parameters (on cpu they must be identical)",
    )
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Train part")
    add_override_argument(parser)
    return parser


def gpu_check_main(
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    launch: Launch = spawn_ranks,
    out: TextIO | None = None,
) -> int:
    """Run the check; 0 if every check passed, 1 if one failed, 2 if it could not start.
    `launch` runs the ranks of the process-group part (`spawn_ranks`)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    stream = out or sys.stdout

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    if args.epochs < 2:
        parser.error("--epochs: the loss must fall over at least 2 epochs")
    spec = CheckSpec(
        device=args.device,
        processes=args.processes,
        epochs=args.epochs,
        precision=args.precision or "",
        data_root=args.data_root,
        min_top1=args.min_top1,
        resume_rtol=args.resume_rtol,
        ray=not args.no_ray,
    )
    try:
        spec.overrides = dict(parse_override(text) for text in args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    if spec.device == "cuda" and not torch.cuda.is_available():
        say(
            f"FAIL  setup  no CUDA device is visible (torch {torch.__version__}, built for "
            f"CUDA {torch.version.cuda}); --device cpu runs the same code on the CPU"
        )
        return 2
    world_size = spec.world_size()
    if spec.device == "cuda" and world_size > torch.cuda.device_count():
        parser.error(f"--processes {world_size}: {torch.cuda.device_count()} GPUs are visible")
    if world_size < 1:
        parser.error("--processes must be at least 1")
    try:
        cfg = spec.config(world_size)
        prepare_digits(cfg)
        check_training_data(cfg, world_size)
    except (ConfigError, DataUnavailable, ValueError) as exc:
        say(f"FAIL  setup  {exc}")
        return 2
    say(describe(spec, cfg, world_size))
    checks: list[Check] = []

    def record(part: list[Check]) -> None:
        for check in part:
            say(check.line())
        checks.extend(part)

    record(run_process_group(spec, cfg, world_size, say, launch=launch))
    record(ray_checks(spec, cfg, world_size, say))
    failed = [c.name for c in checks if c.failed]
    if failed:
        say(f"GPU check FAILED ({len(failed)} of {len(checks)}): {'; '.join(failed)}")
        return 1
    passed = sum(c.status == PASS for c in checks)
    say(f"GPU check passed: {passed} checks passed, {len(checks) - passed} skipped")
    return 0


__all__ = [
    "Check",
    "CheckSpec",
    "DataUnavailable",
    "RankPlan",
    "RankResult",
    "gpu_check_main",
    "process_group_checks",
    "spawn_ranks",
]
