"""The CUDA path's dtype conversions and copies, counted without a GPU: the models run on fake
CUDA tensors (`FakeTensorMode`: shapes and dtypes, no data, no device) under CUDA's autocast
policy, which is not the CPU's (LayerNorm, softmax and norms run in float32 there), with the
CBSA kernels as their registered ops. A token-sized conversion or copy is a pass over the
activations on a GPU; this is where issue 19's profile found 16% of a step. The same fake
tensors show what `torch.compile` traces there: one graph per model, the kernels inside."""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import timm
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import cbtlab.models  # noqa: F401  (registers the models with timm)
from cbtlab.attention.family import TSSA
from cbtlab.models.zoo import MODEL_NAMES
from tensor_recorder import TensorRecorder

pytest.importorskip("triton")


@contextlib.contextmanager
def _cuda_autocast(dtype: torch.dtype) -> Iterator[None]:
    """CUDA's autocast, on also where no CUDA device is (`torch.autocast` turns itself off)."""
    enabled, previous = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_dtype("cuda", dtype)
    torch.set_autocast_enabled("cuda", True)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", previous)


def _cuda_forward(
    module: torch.nn.Module,
    shape: tuple[int, ...],
    *args: object,
    dtype: torch.dtype = torch.float32,
) -> tuple[TensorRecorder, torch.Tensor]:
    """`module`'s forward pass on a fake CUDA input of `shape` and `dtype` (then `args`)
    under bf16 autocast, recorded (the module is moved to fake CUDA tensors)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        module = module.to("cuda")
        x = torch.empty(shape, device="cuda", dtype=dtype)
        with _cuda_autocast(torch.bfloat16), TensorRecorder() as rec:
            out = module(x, *args)
    return rec, out


@pytest.mark.parametrize(
    ("name", "img_size"),
    [("cbt_tiny_patch16_224", 224), ("cbt_tiny_patch16_224", 448), ("cbt_small_patch16_224", 224)],
)
def test_cbt_forward_on_cuda_converts_the_tokens_twice_and_copies_them_never(
    name: str, img_size: int
) -> None:
    """Under bf16 autocast the tokens are converted twice in a whole forward pass: the first
    block's two LayerNorms read the stem + position-embedding stream, float32 under autocast;
    every later block gets bf16 from the ISTA before it (no residual). No LayerNorm, ISTA or
    CBSA layer converts or lays out the tokens, and every layer runs the kernels."""
    batch = 4
    model = timm.create_model(name, img_size=img_size)
    depth, width = len(model.blocks), model.num_features
    images, stream = (batch, 3, img_size, img_size), (batch, 1 + (img_size // 16) ** 2, width)
    rec, logits = _cuda_forward(model, images)
    # Activations as large as half the token stream or more (Q0, (B, K, m, p), is smaller).
    big = [
        c
        for c in rec.calls
        if c.shape[:1] == (batch,) and math.prod(c.shape) * 2 >= math.prod(stream)
    ]
    casts = [(c.shape, c.dtype) for c in big if c.op == "aten._to_copy"]
    copies = [c for c in big if c.op in ("aten.clone", "aten.copy_", "aten.contiguous")]
    assert casts == [(images, torch.float32)] + [(stream, torch.float32)] * 2, casts
    assert copies == [], copies
    assert rec.ops["cbtlab.cbsa_extract"] == rec.ops["cbtlab.cbsa_broadcast"] == depth
    assert logits.shape == (batch, 1000) and logits.device.type == "cuda"


def test_tosts_attention_on_cuda_keeps_the_tokens_in_bf16() -> None:
    """ToST's TSSA under bf16 autocast: only the normalised energy (two token-sized tensors)
    is float32, as autocast's float32 rule for norms asks; the squares, the scaling and the
    output stay bf16, with no conversion of token-sized tensors (ten token-sized tensors were
    written, seven of them float32, and the output converted for the projection)."""
    batch, tokens = 4, 197
    rec, out = _cuda_forward(TSSA(192, 3), (batch, tokens, 192), (14, 14), dtype=torch.bfloat16)
    size = batch * tokens * 192
    token_sized = [dtype for shape, dtype in rec.tensors if math.prod(shape) == size]
    casts = [c for c in rec.calls if c.op == "aten._to_copy" and math.prod(c.shape) == size]
    assert token_sized.count(torch.float32) == 2, token_sized
    assert casts == [], casts
    assert out.dtype == torch.bfloat16


def _cuda_explain(name: str, img_size: int) -> Any:
    """`torch._dynamo.explain` of model `name`'s forward on a fake CUDA batch of 2 under bf16
    autocast: the graphs and graph breaks `torch.compile` would see there."""
    model = timm.create_model(name, img_size=img_size, num_classes=10)
    torch._dynamo.reset()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to("cuda")
        x = torch.empty(2, 3, img_size, img_size, device="cuda")
        with _cuda_autocast(torch.bfloat16):
            return torch._dynamo.explain(model)(x)


# One model of each family (the hybrid is two of them, layer by layer).
FAMILIES = [n for n in MODEL_NAMES if "_tiny_" in n and not n.startswith("crate_cbt_hybrid")]


@pytest.mark.parametrize("name", FAMILIES)
def test_the_cuda_path_traces_into_one_graph_with_the_kernels_inside(name: str) -> None:
    """What `torch.compile` sees on a GPU under bf16 autocast (fake CUDA tensors): each model of
    the zoo is one graph with no graph break (the condition for compiling it whole and for CUDA
    graphs), CBT's CBSA layers as the kernels' custom ops, forward and backward."""
    torch.manual_seed(0)
    explained = _cuda_explain(name, 128)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    kernels = Counter(
        str(node.target)
        for graph in explained.graphs
        for module in graph.modules()
        if isinstance(module, torch.fx.GraphModule)
        for node in module.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("cbtlab.")
    )
    layers = 12 if name.startswith("cbt_") else 0
    ops = ("cbsa_extract", "cbsa_broadcast", "cbsa_reps_grad", "cbsa_inputs_grad")
    assert kernels == Counter({f"cbtlab.{op}.default": layers for op in ops if layers})


def test_the_cuda_path_asks_no_untraceable_autocast_question_when_compiled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Dynamo in torch 2.11 (the GPU machines' release) cannot trace
    `torch.amp.is_autocast_available`: asked in every LayerNorm, ISTA and CBSA layer, it broke a
    compiled CBT-T into 11 graphs there, though 2.14 traces it. Made untraceable here as it is
    there, it must not be asked while compiling: CBT still traces into one graph, at 224 px
    too, where the 14 x 14 patch grid is pooled to 8 x 8 by the separable mean (at 128 px the
    grid is 8 x 8 equal tiles)."""
    untraceable = torch.compiler.disable(torch.amp.is_autocast_available)
    monkeypatch.setattr(torch.amp, "is_autocast_available", untraceable)
    explained = _cuda_explain("cbt_tiny_patch16_224", 224)
    assert explained.graph_break_count == 0, explained.break_reasons
