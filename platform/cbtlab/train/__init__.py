"""Training: the worker loop (plain PyTorch) and its Ray Train trainer."""

from cbtlab.train.loop import run_training, train_loop_per_worker
from cbtlab.train.messages import Diverged
from cbtlab.train.trainer import build_trainer, fit

__all__ = ["Diverged", "build_trainer", "fit", "run_training", "train_loop_per_worker"]
