"""`train.compile` on a GPU for every model of the zoo at 224 and 448 px: a training step
compiles, or falls back to eager with a warning that names the reason (torch 2.11's Inductor
raised an AssertionError compiling CBT-T at 448 px on an H200). Skipped without CUDA."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from torch import nn

from cbtlab.models.zoo import MODEL_NAMES
from cbtlab.train.recipe import TrainStep, autocast, compile_model, warmup_cosine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# The sizes users train (the large presets would only add compile time).
ZOO = [name for name in MODEL_NAMES if "_tiny_" in name or "_small_" in name]


@pytest.mark.parametrize("img_size", [224, 448])
@pytest.mark.parametrize("name", ZOO)
def test_every_model_trains_compiled_or_falls_back_with_the_reason(
    name: str, img_size: int
) -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=img_size, num_classes=10).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = TrainStep(
        compile_model(model, device),
        optimizer,
        warmup_cosine(optimizer, warmup_steps=0, total_steps=4, min_ratio=1.0),
        nn.CrossEntropyLoss(),
        autocast=autocast("bf16", device),
        compiled=True,
    )
    images = torch.randn(4, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 10, (4,), device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [step(images, labels)[0].item() for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    fell_back = [w for w in caught if "train.compile=true" in str(w.message)]
    if not step.compiled:  # fell back: the warning says why
        assert fell_back and "torch.compile failed (" in str(fell_back[0].message)
        print(f"{name} at {img_size} px fell back: {fell_back[0].message}")


CBSA_MODELS = [name for name in ZOO if name.startswith(("cbt_", "crate_cbt_hybrid_"))]


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("img_size", [224, 448])
@pytest.mark.parametrize("name", CBSA_MODELS)
def test_cbsa_models_compile_with_the_kernels_inside(name: str, img_size: int, mode: str) -> None:
    """The models with CBSA compile (no fallback) with the Triton kernels as custom ops inside,
    plain and with CUDA graphs, and the compiled loss matches the eager one."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=img_size, num_classes=10).to(device)
    images = torch.randn(4, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 10, (4,), device=device)
    with autocast("bf16", device)():
        eager = nn.functional.cross_entropy(model(images), labels).item()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay as they are
    step = TrainStep(
        compile_model(model, device, mode),
        optimizer,
        warmup_cosine(optimizer, warmup_steps=0, total_steps=4, min_ratio=1.0),
        nn.CrossEntropyLoss(),
        autocast=autocast("bf16", device),
        compiled=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback warns: fail on it
        losses = [step(images, labels)[0].item() for _ in range(3)]
    assert step.compiled
    assert losses == pytest.approx([eager] * 3, rel=2e-2)
