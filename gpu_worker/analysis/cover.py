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
_CHUNK = 1 << 18  # pixels per MLP call: bounds the hidden activations to ~64 MB

CAVEAT = (
    "Fractional cover comes from a model fitted to Landsat surface reflectance over Australian rangelands and "
    "crops. On top-of-atmosphere input (Sentinel-2 L1C, Landsat L1) the atmosphere brightens the visible bands "
    "and the fractions are biased; no sensor harmonisation is applied. Treat the values as indicative."
)


def features(reflectance: torch.Tensor) -> torch.Tensor:
    """[P, 5] used-band reflectance -> [P, 20]: the bands, their logs and their pairwise normalised differences."""
    x = reflectance.clamp_min(_FLOOR)
    i, j = _PAIRS.to(x.device)
    return torch.cat([x, x.log(), (x[:, i] - x[:, j]) / (x[:, i] + x[:, j])], dim=1)


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
        """[P, 5] used-band reflectance (finite) -> [P, 3] fractions. Used by training and by :meth:`forward`."""
        z = (features(reflectance) - self.feature_mean) / self.feature_std
        out: torch.Tensor = self.mlp(z).softmax(dim=1)
        return out

    def forward(self, reflectance: torch.Tensor) -> torch.Tensor:
        if reflectance.ndim != 4 or reflectance.shape[1] != len(self.BANDS):
            raise ValueError(f"expected [N, {len(self.BANDS)}, H, W] reflectance, got {list(reflectance.shape)}")
        n, _, h, w = reflectance.shape
        pixels = reflectance.permute(0, 2, 3, 1).reshape(-1, len(self.BANDS)).float()
        valid = pixels.isfinite().all(dim=1)
        used = torch.where(valid[:, None], pixels[:, USED], 0.1)
        out = torch.cat([self.predict_pixels(chunk) for chunk in torch.split(used, _CHUNK)])
        out = out.masked_fill(~valid[:, None], float("nan"))
        return out.reshape(n, h, w, len(FRACTIONS)).permute(0, 3, 1, 2)


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
