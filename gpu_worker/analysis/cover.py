"""Fractional cover: bare soil, green (photosynthetic) and non-green (dry) vegetation fractions per pixel.

A small MLP trained by ``python -m gpu_worker.analysis.train_cover`` on the 3,937 field observations that ship in
the ``fractionalcover3`` package (MIT, Joint Remote Sensing Research Program, University of Queensland): Landsat
TM/ETM+ surface reflectance (OLI adjusted to ETM+) against measured ground cover. Weights, held-out RMSE and the
training command are in ``weights/``. ``docs/analysis.md`` explains the band mapping and the caveats.

Inputs are the six reflective bands in :attr:`FractionalCover.BANDS` order, as reflectance (0-1). Like the original
model, the blue band is accepted but not used (the field data has no blue band); a NaN in any of the six bands makes
that pixel NaN in all three outputs. Outputs (bare, green, non_green) come through a softmax, so they sum to 1.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shared.bands import BandSet

WEIGHTS = Path(__file__).parent / "weights" / "fractional_cover.pt"
FRACTIONS = ("bare", "green", "non_green")
USED = slice(1, 6)  # green, red, nir, swir16, swir22: the bands of the field data
N_USED = 5
_PAIRS = torch.triu_indices(N_USED, N_USED, 1)  # the 10 normalised differences between used bands
N_FEATURES = 2 * N_USED + _PAIRS.shape[1]
_FLOOR = 1e-4  # reflectance floor before logs and ratios (dark water, negative L2A offsets)
# Pixels per MLP call at inference. The hidden activations (64 floats per pixel, 4 MB at 2**14) then stay in the
# CPU's cache: 2**14-pixel chunks ran 4.9x faster than 2**18 on this project's 2-core CI CPU (854 -> 175 ms/Mpx,
# together with the channel-first layout and the folded normalisation of :meth:`FractionalCover.fractions`).
CHUNK = 1 << 14

CAVEAT = (
    "Fractional cover comes from a model fitted to Landsat surface reflectance over Australian rangelands and "
    "crops. On top-of-atmosphere input (Sentinel-2 L1C, Landsat L1) the atmosphere brightens the visible bands "
    "and the fractions are biased; no sensor harmonisation is applied. Treat the values as indicative."
)


def features(reflectance: torch.Tensor) -> torch.Tensor:
    """[P, 5] used-band reflectance -> [P, 20]: the bands, their logs and their pairwise normalised differences."""
    return _features_first(reflectance.t()).t()


def _features_first(reflectance: torch.Tensor) -> torch.Tensor:
    """:func:`features` channel-first: [5, P] -> [20, P], each feature a contiguous row."""
    x = reflectance.clamp_min(_FLOOR)
    i, j = _PAIRS.to(x.device)
    return torch.cat([x, x.log(), (x[i] - x[j]) / (x[i] + x[j])], dim=0)


def _features_into(reflectance: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """:func:`_features_first` written into ``out`` ([20, P], contiguous), the same values without the copy of
    ``torch.cat``."""
    x = torch.clamp_min(reflectance, _FLOOR, out=out[:N_USED])
    torch.log(x, out=out[N_USED : 2 * N_USED])
    i, j = _PAIRS.to(x.device)
    xi, xj = x[i], x[j]
    torch.sub(xi, xj, out=out[2 * N_USED :]).div_(xi.add_(xj))
    return out


class FractionalCover(nn.Module):
    """Per-pixel MLP: ``forward([N, 6, H, W] reflectance) -> [N, 3, H, W]`` fractions (bare, green, non_green)."""

    BANDS = ("blue", "green", "red", "nir", "swir16", "swir22")
    FRACTIONS = FRACTIONS
    VERSION = "fc-mlp-1.0"
    HIDDEN = (64, 64)

    feature_mean: torch.Tensor
    feature_std: torch.Tensor

    def __init__(self, hidden: tuple[int, ...] = HIDDEN, dropout: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(N_FEATURES))
        self.register_buffer("feature_std", torch.ones(N_FEATURES))
        layers: list[nn.Module] = []
        width = N_FEATURES
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]  # same keys whatever the dropout
            width = size
        layers.append(nn.Linear(width, len(FRACTIONS)))
        self.mlp = nn.Sequential(*layers)

    @classmethod
    def load(cls, device: torch.device, path: Path = WEIGHTS) -> FractionalCover:
        """The committed weights, in eval mode, frozen (no autograd graph is built), on ``device``."""
        model = cls()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval().requires_grad_(False).to(device)

    def predict_pixels(self, reflectance: torch.Tensor) -> torch.Tensor:
        """[P, 5] used-band reflectance (finite) -> [P, 3] fractions, through the modules (dropout and all): the
        training path. Inference goes through :meth:`fractions`, which agrees with it within 2e-6."""
        z = (features(reflectance) - self.feature_mean) / self.feature_std
        out: torch.Tensor = self.mlp(z).softmax(dim=1)
        return out

    def fractions(self, reflectance: torch.Tensor) -> torch.Tensor:
        """[5, P] used-band reflectance (finite), channel-first -> [3, P] fractions, in :data:`CHUNK`-pixel chunks.

        The inference path: features as contiguous rows, the feature normalisation folded into the first layer's
        weights, each layer one ``addmm`` whose output is rectified in place; the features of every chunk go to one
        buffer and the fractions straight into the result. Call under ``torch.inference_mode``."""
        layers = self._folded()
        x = reflectance.float()
        pixels = x.shape[1]
        buffer = x.new_empty((N_FEATURES, min(CHUNK, pixels)))
        out: torch.Tensor | None = None
        for start in range(0, max(pixels, 1), CHUNK):  # no pixel: one empty chunk, as torch.split gives
            chunk = x[:, start : start + CHUNK]
            n = chunk.shape[1]
            if buffer.shape[1] != n:  # the last, shorter chunk: a buffer of its own, contiguous
                buffer = x.new_empty((N_FEATURES, n))
            fractions = self._chunk(_features_into(chunk, buffer), layers)
            if out is None:  # the dtype of the MLP's output (bfloat16 under autocast to it)
                out = fractions.new_empty((len(FRACTIONS), pixels))
            out[:, start : start + n] = fractions
        assert out is not None
        return out

    @staticmethod
    def _chunk(h: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        for k, (weight, bias) in enumerate(layers):
            h = torch.addmm(bias, weight, h)
            if k < len(layers) - 1:
                h = h.relu_()
        return h.softmax(dim=0)

    def _folded(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weight [out, in], bias [out, 1]) per linear layer; the first absorbs ``(f - mean) / std``."""
        linears = [m for m in self.mlp if isinstance(m, nn.Linear)]
        first = linears[0]
        weight = first.weight / self.feature_std[None, :]
        bias = first.bias - (first.weight * (self.feature_mean / self.feature_std)[None, :]).sum(dim=1)
        layers = [(weight, bias)] + [(m.weight, m.bias) for m in linears[1:]]
        return [(w.detach(), b.detach()[:, None]) for w, b in layers]

    def forward(self, reflectance: torch.Tensor) -> torch.Tensor:
        if reflectance.ndim != 4 or reflectance.shape[1] != len(self.BANDS):
            raise ValueError(f"expected [N, {len(self.BANDS)}, H, W] reflectance, got {list(reflectance.shape)}")
        n, _, h, w = reflectance.shape
        pixels = reflectance.permute(1, 0, 2, 3).reshape(len(self.BANDS), -1).float()
        valid = pixels.isfinite().all(dim=0)
        out = self.fractions(torch.where(valid[None, :], pixels[USED], 0.1))
        out = out.masked_fill(~valid[None, :], float("nan"))
        return out.reshape(len(FRACTIONS), n, h, w).permute(1, 0, 2, 3)


def band_indices(bands: BandSet) -> list[int] | None:
    """File indices of the six :attr:`FractionalCover.BANDS` for ``bands``, or None when the file lacks one.

    NIR is the ``nir`` role (Sentinel-2 B08, Landsat OLI B5); a Sentinel-2 file without B08 falls back to B8A
    (``nir08``). Blue is required only because the model's input layout keeps it, as the original does.
    """
    roles = {role: bands.roles.get(role) for role in FractionalCover.BANDS}
    if roles["nir"] is None:
        roles["nir"] = bands.roles.get("nir08")
    if any(index is None for index in roles.values()):
        return None
    return [index for index in roles.values() if index is not None]


def cover_caveat(bands: BandSet) -> str | None:
    """:data:`CAVEAT` unless the band names say surface reflectance (Landsat Collection-2 ``SR_B*``). The job
    carries no processing level, so Sentinel-2 names (L1C or L2A alike) and common names get the caveat."""
    return None if all(name.upper().startswith("SR_") for name in bands.names) else CAVEAT
