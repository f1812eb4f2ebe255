"""Typed, validated, serialisable experiment configs.

One `ExperimentConfig` describes one training run: the model, the data and the recipe. It
flattens to dotted keys (`model.rep_grid`, `train.lr`, ...) for MLflow params and Tune search
spaces, and rebuilds from them. Every bad value raises `ConfigError` naming the field and what
is allowed, so that a study fails at start-up with one clear message instead of inside a worker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package (pyproject.toml)
    import tomli as tomllib

from cbtlab.attention import ATTENTION_REGISTRY
from cbtlab.attention.common import window_grid
from cbtlab.models.adapt import vit_fields
from cbtlab.models.stems import STEMS
from cbtlab.models.transformer import layer_attentions
from cbtlab.overrides import ConfigError

Grid = tuple[int, int]

# A switch that a driver may decide from the cluster: true, false or "auto" (resolved before
# the workers see it; see cbtlab.cluster).
AUTO = "auto"
AutoBool = bool | typing.Literal["auto"]
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def parse_grid(value: Any, field_name: str = "grid") -> Grid:
    """Parse a grid given as `(h, w)`, `[h, w]`, `"HxW"` or a single int `n` (meaning `n x n`)."""
    if isinstance(value, bool):
        raise ConfigError(field_name, f"expected a grid like '4x4' or [4, 4], got {value!r}")
    if isinstance(value, int):
        dims = (value, value)
    elif isinstance(value, str):
        parts = value.lower().replace("*", "x").split("x")
        try:
            dims = tuple(int(p) for p in parts)
        except ValueError:
            raise ConfigError(field_name, f"expected a grid like '4x4', got {value!r}") from None
        if len(dims) == 1:
            dims = (dims[0], dims[0])
    elif isinstance(value, (list, tuple)):
        try:
            dims = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(field_name, f"expected two integers, got {value!r}") from None
    else:
        raise ConfigError(field_name, f"expected a grid like '4x4' or [4, 4], got {value!r}")
    if len(dims) != 2 or min(dims) < 1:
        raise ConfigError(field_name, f"expected two positive integers (h x w), got {value!r}")
    return (dims[0], dims[1])


def format_grid(grid: Grid) -> str:
    return f"{grid[0]}x{grid[1]}"


def parse_auto_bool(value: Any, field_name: str) -> bool | str:
    """True, False or "auto" from a bool, 0/1 or a string (any case: true/false/yes/no/1/0/auto,
    as flags, TOML/JSON files and logged MLflow params spell them)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        if text in _TRUE + _FALSE:
            return text in _TRUE
    raise ConfigError(field_name, f"expected true, false or 'auto', got {value!r}")


# The prefixes of timm's augmentation strings (timm.data.auto_augment).
AUTO_AUGMENT_KINDS = ("rand", "augmix", "original", "v0", "3a")
# torch.compile's modes (train.compile_mode).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _choice(field_name: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(field_name, f"{value!r} is not one of {', '.join(map(repr, allowed))}")


def _finite_floats(section: str, values: Any) -> None:
    """Refuse NaN and +/-infinity in every float field of a config section: they pass every
    range check (NaN compares false, inf is positive) and would fail only inside the workers."""
    for name, hint in typing.get_type_hints(type(values)).items():
        value = getattr(values, name)
        if hint is float and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{section}.{name}", f"must be a finite number, got {value!r}")


def _positive(field_name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(field_name, f"must be {bound}, got {value!r}")


@dataclass
class ModelConfig:
    """Architecture of the transformer: sizes, attention variant and its options."""

    # An attention name, or comma-separated names splitting the layers into equal consecutive
    # groups ("mssa,cbsa": the CRATE+CBT hybrid).
    attention: str = "cbsa"
    stem: str = "patch"
    block: str = "ista"
    mlp_ratio: float = 4.0
    img_size: int = 16
    patch_size: int = 2
    in_chans: int = 1
    num_classes: int = 10
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    # CBSA: the representatives are the patch grid pooled to rep_grid, so m = g_h * g_w.
    rep_grid: Grid = (4, 4)
    rep_pool: str = "avg"
    # Fixed k x k pooling windows every `stride` patches (0: adaptive pooling to rep_grid).
    rep_pool_kernel: int = 0
    rep_pool_stride: int = 0
    rep_init: str = "pool"
    legacy_pool: bool = False
    stop_grad_init: bool = False
    contraction: str = "softmax"
    contraction_beta: float = 1.0
    # Linear variant (eq. 12): beta = p / (N * linear_eps^2).
    linear_eps: float = 0.5
    # Initialisation of the two learnable per-head step sizes (eta_rep, eta_x).
    step_init: str = "normal"
    step_scale: float = 1.0
    ista_step: float = 0.1
    ista_lambda: float = 0.1
    global_pool: str = "avg"
    drop_rate: float = 0.0
    # A timm ViT (vit_{tiny,small,base,large}_patch16_224[.tag]) adapted to model.attention
    # (the paper's Fig. 9, cbtlab.models.adapt): the architecture fields must be that ViT's,
    # and train.init_from gives its pretrained weights (a timm .safetensors/.pth/.npz file).
    # Empty: none.
    adapt_from: str = ""

    def validate(self) -> None:
        _finite_floats("model", self)
        for name in self.attention.split(","):
            _choice("model.attention", name.strip(), sorted(ATTENTION_REGISTRY))
        try:
            layer_attentions(self.attention, self.depth)
        except ValueError as exc:
            raise ConfigError("model.attention", str(exc)) from None
        _choice("model.stem", self.stem, sorted(STEMS))
        _choice("model.block", self.block, ("ista", "mlp"))
        _positive("model.mlp_ratio", self.mlp_ratio)
        for name in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim"):
            _positive(f"model.{name}", getattr(self, name))
        _positive("model.depth", self.depth)
        _positive("model.num_heads", self.num_heads)
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ConfigError(
                "model.patch_size",
                f"the conv stem needs a power of two >= 2, got {self.patch_size}",
            )
        if self.img_size % self.patch_size:
            raise ConfigError(
                "model.patch_size",
                f"{self.patch_size} does not divide model.img_size={self.img_size}",
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                "model.num_heads",
                f"{self.num_heads} does not divide model.embed_dim={self.embed_dim}",
            )
        self.rep_grid = parse_grid(self.rep_grid, "model.rep_grid")
        side = self.img_size // self.patch_size
        if self.rep_grid[0] > side or self.rep_grid[1] > side:
            raise ConfigError(
                "model.rep_grid",
                f"{format_grid(self.rep_grid)} exceeds the {side}x{side} patch grid "
                f"(img_size {self.img_size} / patch_size {self.patch_size})",
            )
        _choice("model.rep_pool", self.rep_pool, ("avg", "max"))
        _positive("model.rep_pool_kernel", self.rep_pool_kernel, allow_zero=True)
        _positive("model.rep_pool_stride", self.rep_pool_stride, allow_zero=True)
        if self.rep_pool_kernel > side:
            raise ConfigError(
                "model.rep_pool_kernel",
                f"{self.rep_pool_kernel} exceeds the {side}x{side} patch grid",
            )
        if self.rep_pool_kernel:
            stride = self.rep_pool_stride or self.rep_pool_kernel
            got = window_grid((side, side), self.rep_pool_kernel, stride)
            if got != self.rep_grid:
                raise ConfigError(
                    "model.rep_grid",
                    f"{self.rep_pool_kernel}x{self.rep_pool_kernel} windows with stride {stride} "
                    f"on the {side}x{side} patch grid give {format_grid(got)}; "
                    f"set model.rep_grid={format_grid(got)}",
                )
        _choice("model.rep_init", self.rep_init, ("pool", "learned"))
        _choice("model.contraction", self.contraction, ("softmax", "exact", "none"))
        _positive("model.contraction_beta", self.contraction_beta)
        _positive("model.linear_eps", self.linear_eps)
        _choice("model.step_init", self.step_init, ("normal", "constant", "zero"))
        if self.step_init == "normal":
            # The scale is a standard deviation there; "constant" may be negative.
            _positive("model.step_scale", self.step_scale, allow_zero=True)
        _positive("model.ista_step", self.ista_step, allow_zero=True)
        _positive("model.ista_lambda", self.ista_lambda, allow_zero=True)
        _choice("model.global_pool", self.global_pool, ("token", "avg"))
        if not 0 <= self.drop_rate < 1:
            raise ConfigError("model.drop_rate", f"must be in [0, 1), got {self.drop_rate!r}")
        self._check_adapted()

    def _check_adapted(self) -> None:
        """With adapt_from, the architecture fields must be the ViT's: one message naming every
        field to set."""
        if not self.adapt_from:
            return
        try:
            fields = vit_fields(self.adapt_from)
        except ValueError as exc:
            raise ConfigError("model.adapt_from", str(exc)) from None
        wrong = {k: v for k, v in fields.items() if getattr(self, k) != v}
        if wrong:
            sets = " ".join(f"--set model.{k}={v}" for k, v in wrong.items())
            now = ", ".join(f"{k}={getattr(self, k)!r}" for k in wrong)
            raise ConfigError(
                "model.adapt_from",
                f"{self.adapt_from} fixes the architecture: {sets} (now {now})",
            )

    @property
    def num_representatives(self) -> int:
        return self.rep_grid[0] * self.rep_grid[1]


@dataclass
class DataConfig:
    """Which dataset, where its shards live, how images are augmented and batches formed."""

    # "digits": the built-in dataset, sharded on first use; "shapes": the generated segmentation
    # dataset (cbtlab.data.segmentation; model.num_classes of 2..6 classes); "shards": a prebuilt
    # shard folder or URL (data.root) holding a dataset card (card.json).
    dataset: str = "digits"
    # The prebuilt shards (data.dataset="shards"): a folder, a URL (http(s)://, s3://, ... read
    # through webdataset or fsspec) or a "pipe:" command with "{}" for the file name.
    root: str = ""
    # Folder for the built-in dataset's shards; empty means `<CBTLAB_HOME>/data`.
    cache_dir: str = ""
    val_fraction: float = 0.2
    split_seed: int = 0
    samples_per_shard: int = 128
    # Global batch size, split evenly over the training workers.
    batch_size: int = 64
    shuffle_buffer: int = 512
    # Loader worker processes per training worker, kept for the whole run (0: decode in the
    # training process).
    # Give the Ray workers the CPUs for them (train.cpus_per_worker).
    loader_workers: int = 0
    # Training augmentation: "none"; "digits" (a mild random affine warp); "imagenet" (the
    # paper's random-resized crop, scale (0.08, 1), and horizontal flip); "auto": "none" for the
    # digits, "imagenet" for prebuilt shards.
    augment: str = "auto"
    # A timm RandAugment/AutoAugment string added to "imagenet" augmentation, e.g.
    # "rand-m9-mstd0.5-inc1"; empty: none.
    auto_augment: str = ""
    # Evaluation of prebuilt shards: the shorter side resized to img_size / crop_pct, then a
    # centre crop of img_size (the digits are resized whole).
    crop_pct: float = 0.875
    # Decode JPEGs at a reduced scale (libjpeg's DCT scaling) when the transform would shrink
    # them further anyway; never below the resolution the output needs.
    jpeg_draft: bool = True
    # What a sample whose image bytes differ from the manifest's sha256 does as it is read:
    # "skip" (counted in data/corrupt_samples and skipped), "stop" (the run fails naming the
    # shard and key) or "off" (not checked: a corrupt but decodable image is trained on).
    # Hashing costs tens of microseconds per ImageNet JPEG (`cbtlab data bench`).
    checksums: str = "skip"

    def validate(self) -> None:
        _finite_floats("data", self)
        _choice("data.dataset", self.dataset, ("digits", "shapes", "shards"))
        if self.dataset == "shards" and not self.root:
            raise ConfigError("data.root", 'set the shard folder or URL for data.dataset="shards"')
        if not 0 < self.val_fraction < 1:
            raise ConfigError("data.val_fraction", f"must be in (0, 1), got {self.val_fraction!r}")
        _positive("data.samples_per_shard", self.samples_per_shard)
        _positive("data.batch_size", self.batch_size)
        _positive("data.shuffle_buffer", self.shuffle_buffer)
        _positive("data.loader_workers", self.loader_workers, allow_zero=True)
        _choice("data.augment", self.augment, ("auto", "none", "digits", "imagenet"))
        _choice("data.checksums", self.checksums, ("skip", "stop", "off"))
        if self.auto_augment and self.train_augment != "imagenet":
            raise ConfigError(
                "data.auto_augment", 'goes with data.augment="imagenet" (or "auto" on shards)'
            )
        if self.auto_augment and not self.auto_augment.startswith(AUTO_AUGMENT_KINDS):
            raise ConfigError(
                "data.auto_augment",
                f"{self.auto_augment!r} is not a timm augmentation string starting with one of "
                f"{', '.join(AUTO_AUGMENT_KINDS)}",
            )
        if not 0 < self.crop_pct <= 1:
            raise ConfigError("data.crop_pct", f"must be in (0, 1], got {self.crop_pct!r}")

    @property
    def train_augment(self) -> str:
        """`augment` with "auto" resolved for this dataset."""
        if self.augment != "auto":
            return self.augment
        return "none" if self.dataset == "digits" else "imagenet"

    @property
    def eval_crop_pct(self) -> float | None:
        """The evaluation crop fraction; None: resize whole images (the digits)."""
        return None if self.dataset == "digits" else self.crop_pct


@dataclass
class TrainConfig:
    """The recipe and the Ray Train scaling of one run."""

    epochs: int = 12
    # "adamw", "sgd" (Nesterov momentum 0.9) or "lion" (timm's; the paper's ImageNet recipe).
    optimizer: str = "adamw"
    lr: float = 5e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    # Autocast dtype: "bf16", "fp32", or "auto" (bf16 on CUDA, fp32 on CPU). bf16 needs no
    # loss scaling.
    precision: str = "auto"
    # torch.compile the model (on CPU, inductor needs a C++ compiler). A model that fails to
    # compile trains eagerly, with a warning that names the reason.
    compile: bool = False
    # torch.compile's mode when train.compile is on: "default", "reduce-overhead" (CUDA graphs:
    # each step replays recorded kernels, for static shapes; a new batch shape records anew),
    # "max-autotune" (autotuned kernels and CUDA graphs) or "max-autotune-no-cudagraphs".
    compile_mode: str = "default"
    # Keep images and convolution weights in channels-last (NHWC) order: faster convolution
    # stems on GPUs with tensor cores; no effect on the numbers.
    channels_last: bool = False
    # Micro-batches of data.batch_size per optimizer step: the effective global batch is
    # data.batch_size x grad_accum_steps, and the schedule counts optimizer steps.
    grad_accum_steps: int = 1
    # Fine-tuning: start from these weights, a cbtlab checkpoint (folder or state.pt) or the
    # authors' reference checkpoint; the head is new where model.num_classes differs, and the
    # position embedding is resampled to model.img_size.
    init_from: str = ""
    # Fine-tuning: the first this many epochs train the head alone (the backbone's rate is 0),
    # and the backbone's rate is the head's times backbone_lr_scale.
    head_only_epochs: int = 0
    backbone_lr_scale: float = 1.0
    num_workers: int = 2
    cpus_per_worker: float = 0.5
    # One GPU per worker: true, false, or "auto" (true where the Ray cluster has a GPU). Only a
    # driver resolves "auto" (cbtlab.cluster.resolve_use_gpu); workers see true or false.
    use_gpu: AutoBool = AUTO
    # Intra-op threads per worker; 0 means "the CPUs this worker was given less its
    # data.loader_workers, at least 1".
    torch_threads: int = 0
    # Every this many epochs (0: never), log the compression term of every layer
    # (rc/layer_XX, rc_norm/layer_XX) on the first probe_samples validation images.
    probe_every: int = 0
    probe_samples: int = 64
    # Checkpoint every this many epochs (and after the last; 0: never); keep the best this many
    # by val/top1 (the latest is always kept); restart from the latest after a worker failure.
    checkpoint_every: int = 1
    # Also every this many optimizer steps (0: never) within an epoch, with the data position
    # and every rank's random state, so that a restart continues mid-epoch exactly.
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2
    max_failures: int = 2

    def validate(self) -> None:
        _finite_floats("train", self)
        _positive("train.epochs", self.epochs)
        _choice("train.optimizer", self.optimizer, ("adamw", "sgd", "lion"))
        _positive("train.lr", self.lr)
        _positive("train.weight_decay", self.weight_decay, allow_zero=True)
        _positive("train.warmup_epochs", self.warmup_epochs, allow_zero=True)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("train.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(
                "train.label_smoothing", f"must be in [0, 1), got {self.label_smoothing!r}"
            )
        _positive("train.grad_clip", self.grad_clip, allow_zero=True)
        _choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        _choice("train.compile_mode", self.compile_mode, COMPILE_MODES)
        _positive("train.grad_accum_steps", self.grad_accum_steps)
        _positive("train.head_only_epochs", self.head_only_epochs, allow_zero=True)
        if self.head_only_epochs and not self.init_from:
            raise ConfigError(
                "train.head_only_epochs", "needs train.init_from (a random backbone would stay so)"
            )
        if self.head_only_epochs >= self.epochs:
            raise ConfigError(
                "train.head_only_epochs",
                f"{self.head_only_epochs} leaves none of the {self.epochs} epochs to the backbone",
            )
        _positive("train.backbone_lr_scale", self.backbone_lr_scale, allow_zero=True)
        _positive("train.num_workers", self.num_workers)
        _positive("train.cpus_per_worker", self.cpus_per_worker)
        self.use_gpu = parse_auto_bool(self.use_gpu, "train.use_gpu")
        _positive("train.torch_threads", self.torch_threads, allow_zero=True)
        _positive("train.probe_every", self.probe_every, allow_zero=True)
        _positive("train.probe_samples", self.probe_samples)
        _positive("train.checkpoint_every", self.checkpoint_every, allow_zero=True)
        _positive("train.checkpoint_every_steps", self.checkpoint_every_steps, allow_zero=True)
        _positive("train.keep_checkpoints", self.keep_checkpoints)
        _positive("train.max_failures", self.max_failures, allow_zero=True)


TASKS = ("classification", "segmentation")


@dataclass
class TaskConfig:
    """What the run learns: image classification (the default; the model section's backbone
    and head) or semantic segmentation (an encoder and a mask-transformer decoder,
    `cbtlab.models.segmenter`, on segmentation shards; docs/models.md). Every other field is
    read for segmentation only; a classification config holds none of them (`flat` leaves
    the section out), so its params and hash are those it had before the section existed."""

    kind: str = "classification"
    # The encoder: "" for the model section's backbone (its head dropped), or a timm model
    # name (e.g. "vit_tiny_patch16_224", "cbt_tiny_patch16_224") at model.img_size.
    encoder: str = ""
    # Weights for a timm encoder: a file (timm's pretrained_cfg_overlay); empty: random.
    encoder_weights: str = ""
    # Any attention name of cbtlab.attention; its options (rep_grid, ...) are the model
    # section's.
    decoder_attention: str = "cbsa"
    decoder_depth: int = 2
    # 0: the encoder's width and heads.
    decoder_dim: int = 0
    decoder_heads: int = 0
    # A feed-forward module in every decoder layer; "auto": only for softmax (Segmenter's).
    decoder_ffn: AutoBool = AUTO
    # The training crop is model.img_size. Images are resized to a shorter side of
    # base_size x r, r uniform in [scale_min, scale_max], then cropped; evaluation resizes the
    # shorter side to base_size and slides windows of the crop every eval_stride pixels
    # (0: base_size 4/3 of the crop, stride 2/3 of it, as ADE20K's 512 crop on 2048x512).
    base_size: int = 0
    scale_min: float = 0.5
    scale_max: float = 2.0
    # A crop is redrawn (up to 10 times) while one category holds more than this share of it.
    cat_max_ratio: float = 0.75
    flip: bool = True
    photometric: bool = True
    eval_stride: int = 0
    # The learning rate after warm-up: (1 - t / T) ** poly_power of its peak (Segmenter).
    poly_power: float = 0.9

    def validate(self) -> None:
        _finite_floats("task", self)
        _choice("task.kind", self.kind, TASKS)
        _choice("task.decoder_attention", self.decoder_attention, sorted(ATTENTION_REGISTRY))
        _positive("task.decoder_depth", self.decoder_depth)
        for name in ("decoder_dim", "decoder_heads", "base_size", "eval_stride"):
            _positive(f"task.{name}", getattr(self, name), allow_zero=True)
        self.decoder_ffn = parse_auto_bool(self.decoder_ffn, "task.decoder_ffn")
        if not 0 < self.scale_min <= self.scale_max:
            raise ConfigError(
                "task.scale_min",
                f"need 0 < scale_min <= scale_max, got {self.scale_min} and {self.scale_max}",
            )
        if not 0 < self.cat_max_ratio <= 1:
            raise ConfigError("task.cat_max_ratio", f"must be in (0, 1], got {self.cat_max_ratio}")
        _positive("task.poly_power", self.poly_power, allow_zero=True)

    @property
    def segmentation(self) -> bool:
        return self.kind == "segmentation"

    def eval_size(self, crop: int) -> int:
        """The shorter side images are evaluated at (and scaled around in training)."""
        return self.base_size or crop * 4 // 3

    def stride(self, crop: int) -> int:
        return min(crop, self.eval_stride or max(1, crop * 2 // 3))


@dataclass
class ExperimentConfig:
    """One training run: model, data and recipe (and, for segmentation, the task)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def validate(self) -> ExperimentConfig:
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.task.validate()
        if self.data.dataset == "shapes" and not self.task.segmentation:
            raise ConfigError("data.dataset", '"shapes" is a segmentation dataset: set task.kind')
        if self.task.segmentation:
            self._check_segmentation()
        if self.data.batch_size % self.train.num_workers:
            raise ConfigError(
                "data.batch_size",
                f"the global batch {self.data.batch_size} does not split evenly over "
                f"train.num_workers={self.train.num_workers}",
            )
        return self

    def _check_segmentation(self) -> None:
        """Refuse the training options the segmentation worker does not honour."""
        unsupported = {
            "train.checkpoint_every_steps": (0, "segmentation runs checkpoint at epoch ends only"),
            "train.init_from": ("", "give the encoder's weights as task.encoder_weights"),
            "train.grad_accum_steps": (1, "not in the segmentation worker"),
            "train.probe_every": (0, "the compression probes read classifiers"),
            "train.compile": (False, "not in the segmentation worker"),
            "train.label_smoothing": (0.0, "not in the segmentation worker"),
        }
        for key, (default, why) in unsupported.items():
            value = getattr(self.train, key.partition(".")[2])
            if value != default:
                raise ConfigError(key, f"{value!r} with task.kind=segmentation: {why}")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Every section; the task section only for segmentation (see `TaskConfig`)."""
        return {
            section.name: _jsonable(dataclasses.asdict(getattr(self, section.name)))
            for section in dataclasses.fields(self)
            if section.name != "task" or self.task.segmentation
        }

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> plain values (grids as 'HxW'), the form MLflow params and Tune use."""
        return {
            f"{section}.{key}": format_grid(value) if key.endswith("_grid") else value
            for section, values in self.to_dict().items()
            for key, value in values.items()
        }

    @staticmethod
    def keys() -> list[str]:
        """Every dotted key a config may hold, the task section's included (which `flat`
        leaves out of a classification config)."""
        return [
            f"{section.name}.{f.name}"
            for section in dataclasses.fields(ExperimentConfig)
            for f in dataclasses.fields(typing.get_type_hints(ExperimentConfig)[section.name])
        ]

    def config_hash(self) -> str:
        """Short, stable hash of every field: equal configs give equal hashes."""
        blob = json.dumps(self.flat(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        """Build from a nested dict (as `to_dict` writes) and validate."""
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(sections)
        if unknown:
            name = sorted(unknown)[0]
            raise ConfigError(name, f"unknown section; allowed: {', '.join(sections)}")
        built = {
            name: _build_section(name, typing.get_type_hints(cls)[name], data.get(name, {}))
            for name in sections
        }
        return cls(**built).validate()

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> ExperimentConfig:
        """Build from dotted keys (`model.depth`: 6, ...), missing keys take their defaults."""
        nested: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            section, dot, name = key.partition(".")
            if not dot:
                raise ConfigError(key, "expected a dotted key such as 'model.depth'")
            nested.setdefault(section, {})[name] = value
        return cls.from_dict(nested)

    def with_overrides(self, overrides: dict[str, Any]) -> ExperimentConfig:
        """A copy with some dotted keys replaced, validated."""
        return ExperimentConfig.from_flat({**self.flat(), **overrides})


def load_config_file(path: str | Path) -> ExperimentConfig:
    """An experiment config from a JSON or TOML file with the sections model / data / train
    (missing fields keep their defaults)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", f"no such file: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError("--config", f"{path}: expected a .json or .toml file")
    except ValueError as exc:  # tomllib's and json's decode errors are ValueErrors
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError("--config", f"cannot parse {path}: {exc}") from exc
    return ExperimentConfig.from_dict(data)


# Fields that configs no longer have, with the value they always held in runs that logged them:
# a saved config (a study's resume state, a checkpoint) that holds one at that value still reads;
# any other value is refused, since no run today can honour it.
RETIRED_FIELDS: dict[str, Any] = {
    "train.inject_failure": "",  # a test hook now (cbtlab.train.faults.FailAt)
}


def _build_section(section: str, section_type: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(section, f"expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(section_type)
    names = [f.name for f in dataclasses.fields(section_type)]
    kwargs = {}
    for key, value in values.items():
        retired = f"{section}.{key}"
        if retired in RETIRED_FIELDS and key not in hints:
            if value != RETIRED_FIELDS[retired]:
                raise ConfigError(retired, f"this field was retired; it cannot be {value!r}")
            continue
        if key not in hints:
            raise ConfigError(f"{section}.{key}", f"unknown field; allowed: {', '.join(names)}")
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], value)
    return section_type(**kwargs)


def _coerce(field_name: str, hint: Any, value: Any) -> Any:
    """Convert a value read from JSON, a flag or a Tune sample to the field's declared type."""
    if hint is Grid or typing.get_origin(hint) is tuple:
        return parse_grid(value, field_name)
    if hint == AutoBool:
        return parse_auto_bool(value, field_name)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(field_name, f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(field_name, f"expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(field_name, f"expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(field_name, f"expected an integer, got {value!r}")
        return int(as_float)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(field_name, f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(field_name, f"expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(field_name, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"{field_name}: no coercion for declared type {hint!r}")


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
