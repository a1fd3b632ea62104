"""The cover MLP's inference path (:meth:`FractionalCover.fractions`) against the same layers run chunk by chunk
with the features concatenated: the same values, bit for bit, whatever the number of pixels."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.analysis.cover import CHUNK, FRACTIONS, FractionalCover, _features_first, _features_into


@pytest.fixture(scope="module")
def model() -> FractionalCover:
    return FractionalCover.load(torch.device("cpu"))


def reference(model: FractionalCover, reflectance: torch.Tensor) -> torch.Tensor:
    layers = model._folded()
    parts = []
    for chunk in torch.split(reflectance.float(), CHUNK, dim=1):
        h = _features_first(chunk)
        for k, (weight, bias) in enumerate(layers):
            h = torch.addmm(bias, weight, h)
            if k < len(layers) - 1:
                h = h.relu_()
        parts.append(h.softmax(dim=0))
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("pixels", [0, 1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 123])
def test_fractions_equal_the_chunks_run_one_by_one(model: FractionalCover, pixels: int) -> None:
    x = torch.rand(5, pixels, generator=torch.Generator().manual_seed(pixels)) * 0.6 - 0.05
    with torch.inference_mode():
        got, want = model.fractions(x), reference(model, x)
    assert got.shape == (len(FRACTIONS), pixels)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_features_into_writes_the_features() -> None:
    x = torch.rand(5, 1000, generator=torch.Generator().manual_seed(0)).t().contiguous().t()  # rows not contiguous
    out = torch.full((20, 1000), float("nan"))
    assert _features_into(x, out) is out
    assert torch.equal(out, _features_first(x))


def test_fractions_keep_the_dtype_of_autocast(model: FractionalCover) -> None:
    x = torch.rand(5, CHUNK + 5, generator=torch.Generator().manual_seed(1)) * 0.5
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = model.fractions(x), reference(model, x)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)
