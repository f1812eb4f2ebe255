"""Named architectures, registered with timm: `timm.create_model("cbt_tiny_patch16_224")`.

| family                   | stem   | block | attention   | sizes      | paper        |
|--------------------------|--------|-------|-------------|------------|--------------|
| `cbt_*`                  | conv   | ISTA  | CBSA        | T, S, B, L | Table 3      |
| `crate_conv_*`           | conv   | ISTA  | MSSA        | T, S       | Table 4      |
| `tost_conv_*`            | conv   | ISTA  | TSSA        | T, S       | Table 4      |
| `agent_conv_*`           | conv   | ISTA  | agent       | T, S       | Table 4      |
| `crate_cbt_hybrid_*`     | conv   | ISTA  | MSSA, CBSA  | T, S       | hybrid       |
| `crate_*`                | linear | ISTA  | MSSA        | B, L       | Table 3 (original CRATE) |
| `sdpa_vit_*`             | patch  | MLP   | softmax     | T, S, B, L | ViT baseline |

The `_conv` families share CBT's skeleton (the paper's fair comparison); `crate_base/large`
are the original CRATE models with the linear patch stem. Keyword arguments override any
field (`img_size=448`, `num_classes=10`, `rep_grid=(4, 4)`, ...).
"""

from __future__ import annotations

from typing import Any

from timm.models import register_model

from cbtlab.models.transformer import CBTransformer

SIZES = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}
CBT_SKELETON = {"stem": "conv", "block": "ista", "global_pool": "token"}
FAMILIES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "cbt": ({**CBT_SKELETON, "attention": "cbsa"}, ("tiny", "small", "base", "large")),
    "crate_conv": ({**CBT_SKELETON, "attention": "mssa"}, ("tiny", "small")),
    "tost_conv": ({**CBT_SKELETON, "attention": "tssa"}, ("tiny", "small")),
    "agent_conv": ({**CBT_SKELETON, "attention": "agent"}, ("tiny", "small")),
    "crate_cbt_hybrid": ({**CBT_SKELETON, "attention": "mssa,cbsa"}, ("tiny", "small")),
    "crate": (
        {"stem": "linear", "block": "ista", "global_pool": "token", "attention": "mssa"},
        ("base", "large"),
    ),
    "sdpa_vit": (
        {"stem": "patch", "block": "mlp", "global_pool": "token", "attention": "softmax"},
        ("tiny", "small", "base", "large"),
    ),
}
# Keyword arguments that go to the attention layers rather than the backbone.
ATTENTION_OPTIONS = frozenset(
    {
        "rep_grid",
        "rep_pool",
        "rep_pool_kernel",
        "rep_pool_stride",
        "rep_init",
        "legacy_pool",
        "stop_grad_init",
        "contraction",
        "contraction_beta",
        "step_init",
        "step_scale",
        "eps",
    }
)
# Arguments timm passes to every model function that our models do not take.
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")

MODEL_NAMES: list[str] = []


def architecture(name: str) -> dict[str, Any]:
    """The constructor arguments of a registered name (before user overrides)."""
    for family, (fields, sizes) in FAMILIES.items():
        for size in sizes:
            if name == f"{family}_{size}_patch16_224":
                return {"img_size": 224, "patch_size": 16, **SIZES[size], **fields}
    raise KeyError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")


def _register(name: str) -> None:
    def create(pretrained: bool = False, **kwargs: Any) -> CBTransformer:
        if pretrained:
            raise ValueError(
                f"{name}: no weights are downloaded here; load the authors' checkpoint with "
                "cbtlab.models.from_reference(torch.load(path), name)"
            )
        kwargs = {k: v for k, v in kwargs.items() if k not in _TIMM_ONLY}
        options = {"rep_grid": (8, 8)}
        options.update({k: kwargs.pop(k) for k in list(kwargs) if k in ATTENTION_OPTIONS})
        return CBTransformer(**{**architecture(name), **kwargs}, attn_options=options)

    create.__name__ = name
    create.__qualname__ = name
    create.__doc__ = f"{name}: see cbtlab.models.zoo."
    register_model(create)
    MODEL_NAMES.append(name)


for _family, (_fields, _sizes) in FAMILIES.items():
    for _size in _sizes:
        _register(f"{_family}_{_size}_patch16_224")
