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

Each name is built through timm's `build_model_with_cfg`, with a `pretrained_cfg` (`CFG`: the
paper's ImageNet input, normalisation and evaluation crop; the classifier; the stem's first
convolution) that `timm.data.resolve_model_data_config` reads. No weights are downloaded:
`pretrained=True` needs a file, `pretrained_cfg_overlay=dict(file=PATH)`, a cbtlab checkpoint or
an authors' one (`checkpoint_filter_fn` renames and fits it).
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    register_model,
    resolve_pretrained_cfg,
)

from cbtlab.models.reference import checkpoint_filter_fn
from cbtlab.models.stems import STEMS
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
# The pretrained_cfg of every name (the stem's first convolution is added per family): the
# paper's ImageNet recipe, evaluated on the centre 87.5 % (data.crop_pct's default), bicubic.
CFG: dict[str, Any] = {
    "url": "",
    "num_classes": 1000,
    "input_size": (3, 224, 224),
    "pool_size": None,
    "crop_pct": 0.875,
    "interpolation": "bicubic",
    "fixed_input_size": False,  # other sizes resample the position embedding
    "mean": IMAGENET_DEFAULT_MEAN,
    "std": IMAGENET_DEFAULT_STD,
    "classifier": "head",
}

MODEL_NAMES: list[str] = [
    f"{family}_{size}_patch16_224" for family, (_, sizes) in FAMILIES.items() for size in sizes
]


def architecture(name: str) -> dict[str, Any]:
    """The constructor arguments of a registered name (before user overrides)."""
    for family, (fields, sizes) in FAMILIES.items():
        for size in sizes:
            if name == f"{family}_{size}_patch16_224":
                return {"img_size": 224, "patch_size": 16, **SIZES[size], **fields}
    raise KeyError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")


def _first_conv(name: str) -> str | None:
    first_conv = STEMS[architecture(name)["stem"]].first_conv
    return None if first_conv is None else f"patch_embed.{first_conv}"


# Read by timm's `register_model` from this module: each name's pretrained_cfg.
default_cfgs = generate_default_cfgs(
    {name: {**CFG, "first_conv": _first_conv(name)} for name in MODEL_NAMES}
)


def _register(name: str) -> None:
    def create(pretrained: bool = False, **kwargs: Any) -> CBTransformer:
        if pretrained:
            _check_weights_given(name, kwargs)
        options = {"rep_grid": (8, 8)}
        options.update({k: kwargs.pop(k) for k in list(kwargs) if k in ATTENTION_OPTIONS})
        return build_model_with_cfg(
            CBTransformer,
            name,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            **{**architecture(name), **kwargs},
            attn_options=options,
        )

    create.__name__ = name
    create.__qualname__ = name
    create.__doc__ = f"{name}: see cbtlab.models.zoo."
    register_model(create)


def _check_weights_given(name: str, kwargs: dict[str, Any]) -> None:
    """No weights are published for download: refuse `pretrained=True` without a file, with
    the ways to load one."""
    cfg = resolve_pretrained_cfg(
        name,
        pretrained_cfg=kwargs.get("pretrained_cfg"),
        pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
    )
    if not cfg.has_weights:
        raise ValueError(
            f"{name}: no weights are downloaded here; give a checkpoint file (a cbtlab state.pt "
            "or the authors' .pth) with pretrained_cfg_overlay=dict(file=PATH), or load the "
            "authors' checkpoint with cbtlab.models.from_reference(torch.load(path), name)"
        )


for _name in MODEL_NAMES:
    _register(_name)
