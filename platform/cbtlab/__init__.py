"""cbtlab: a Ray-distributed ablation platform for Contract-and-Broadcast Transformers."""

__version__ = "0.1.0"
