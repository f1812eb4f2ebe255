"""Training: the worker loop (plain PyTorch) and its Ray Train trainer."""

from cbtlab.train.loop import run_training, train_loop_per_worker
from cbtlab.train.trainer import build_trainer

__all__ = ["build_trainer", "run_training", "train_loop_per_worker"]
