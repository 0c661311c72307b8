"""Classical (prior-free) restorations: the baselines of the restoration benchmark.

- super-resolution: bicubic upsampling of the low-resolution image (torch, align_corners=False);
- blur: Wiener deconvolution in the Fourier basis of the (circular) blur, X = conj(H) Y / (|H|^2 + NSR) with the
  noise-to-signal ratio NSR = max(sigma_y, 0.01)^2 / 0.25 (0.25: the variance of an image spread over [-1, 1]);
- inpainting: every unknown pixel takes the value of its nearest known pixel (Euclidean distance transform);
- denoising: the adaptive local Wiener filter (scipy.signal.wiener, 3x3 window, noise power sigma_y^2);
- colourisation: the gray image itself (A^dagger y); compressed sensing: A^dagger y.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .operators import AvgPoolSR, BicubicSR, Blur, Denoise, Inpaint, Operator


def name_for(op: Operator) -> str:
    return {AvgPoolSR: "bicubic", BicubicSR: "bicubic", Blur: "wiener", Inpaint: "nearest fill",
            Denoise: "wiener (local)"}.get(type(op), "pseudo-inverse")


def classical(op: Operator, y: torch.Tensor, sigma_y: float) -> torch.Tensor:
    if isinstance(op, (AvgPoolSR, BicubicSR)):
        return F.interpolate(y, size=op.shape[1:], mode="bicubic", align_corners=False).clamp(-1, 1)
    if isinstance(op, Blur):
        nsr = max(sigma_y, 0.01) ** 2 / 0.25
        h = op.H.to(y.device)
        x = torch.fft.ifft2(torch.fft.fft2(y.double()) * h.conj() / (h.abs() ** 2 + nsr)).real
        return x.float().clamp(-1, 1)
    if isinstance(op, Inpaint):
        from scipy.ndimage import distance_transform_edt

        known = op.mask[0, 0].numpy() > 0.5
        _, (iy, ix) = distance_transform_edt(~known, return_indices=True)
        return y[:, :, torch.from_numpy(iy), torch.from_numpy(ix)].clamp(-1, 1)
    if isinstance(op, Denoise):
        from scipy.signal import wiener

        arr = y.double().numpy()
        out = np.stack([[wiener(ch, (3, 3), noise=max(sigma_y, 1e-3) ** 2) for ch in img] for img in arr])
        return torch.from_numpy(out).float().clamp(-1, 1)
    return op.pinv(y).clamp(-1, 1)
