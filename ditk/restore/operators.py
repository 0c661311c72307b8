"""Degradation operators y = A x (+ noise) for zero-shot restoration: one OPERATORS registry entry per task.

Every operator is linear and acts on a batch of images x (N, C, H, W) in [-1, 1]. It provides

- `A(x)` and its adjoint `At(y)` (checked by the tests: <A x, y> = <x, At y>);
- the eigen-decomposition of the Gram matrix A A^T in measurement space, as an orthonormal change of basis
  (`to_basis`, `from_basis`) and the eigenvalues `eig` (the squared singular values of A). Every method that
  needs more than A and A^T goes through it:
    pinv(y)                = A^T (A A^T)^+ y                     (A^dagger, DDNM / PiGDM noiseless),
    gram_solve(y, r2, s2)  = (r2 A A^T + s2 I)^-1 y              (PiGDM with measurement noise),
  so A^dagger exists for every operator here and A A^dagger A = A holds (tests), up to the singular values
  below `pinv_tol * max` that the pseudo-inverse treats as zero (only motion blur has such values at the
  default settings).

The Gram decompositions are cheap: diagonal for inpainting, colourisation, denoising, average-pool SR and the
Walsh-Hadamard compressed sensing (whose rows are orthonormal); the 2-D Fourier basis for blurs (circular
convolution); a Kronecker product of two small eigen-decompositions for bicubic SR (separable).

Settings follow DPS / DDRM / DDNM scaled to small images: blurs use the paper's sigma 3 on 256 x 256 images,
i.e. sigma = 3 * H / 256, but at least 1 pixel, with a (2 ceil(3 sigma) + 1)-tap kernel (61 x 61 at 256 px);
the inpainting box is the centre half of the image (DPS: 128 x 128 of 256 x 256); random inpainting hides 50 %.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import difflib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError


class Operator(ABC):
    """Base class: subclasses define A, At, y_shape and the Gram decomposition (eig, to_basis, from_basis)."""

    name = ""
    pinv_tol = 1e-3  # singular values below pinv_tol * the largest count as zero in pinv

    def __init__(self, shape: tuple[int, int, int]):
        self.shape = tuple(int(s) for s in shape)  # (C, H, W) of the clean image

    # -- to define ---------------------------------------------------------------------------------------------
    @abstractmethod
    def A(self, x: torch.Tensor) -> torch.Tensor:
        """The degradation, batched: (N, C, H, W) -> (N, *y_shape())."""

    @abstractmethod
    def At(self, y: torch.Tensor) -> torch.Tensor:
        """The adjoint: <A x, y> = <x, At y>."""

    def y_shape(self) -> tuple:
        """Shape of one measurement (without the batch dimension); by default found by applying A once."""
        return tuple(self.A(torch.zeros(1, *self.shape)).shape[1:])

    def eig(self) -> torch.Tensor:
        """Eigenvalues of A A^T, broadcastable against to_basis(y) (without the batch dimension). Optional: an
        operator without this decomposition (methods check `type(op).eig is Operator.eig`) offers no SVD form."""
        raise ConfigError(f"task {self.name} has no eigen-decomposition of A A^T: use a method that needs only A "
                          "and A^T (dps)")

    def to_basis(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def from_basis(self, z: torch.Tensor) -> torch.Tensor:
        return z

    # -- derived ------------------------------------------------------------------------------------------------
    def gram_apply(self, y: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """f(A A^T) y for a function f of the eigenvalues."""
        lam = self.eig().to(y.device)
        return self.from_basis(fn(lam).to(y.dtype) * self.to_basis(y))

    def _inv_eig(self, lam: torch.Tensor) -> torch.Tensor:
        keep = lam > (self.pinv_tol ** 2) * lam.max()
        return torch.where(keep, 1.0 / lam.clamp_min(1e-30), torch.zeros_like(lam))

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """A^dagger y = A^T (A A^T)^+ y."""
        return self.At(self.gram_apply(y, self._inv_eig))

    def gram_solve(self, y: torch.Tensor, r2: float, s2: float) -> torch.Tensor:
        """(r2 A A^T + s2 I)^-1 y; with s2 = 0 the pseudo-inverse of r2 A A^T."""
        if s2 == 0:
            return self.gram_apply(y, lambda lam: self._inv_eig(lam) / r2)
        return self.gram_apply(y, lambda lam: 1.0 / (r2 * lam + s2))

    def lipschitz(self) -> float:
        """The largest eigenvalue of A^T A (the step size bound of a gradient step on 1/2 ||A x - y||^2)."""
        return float(self.eig().max())

    # -- images of measurements (what `restore` reads and writes) -------------------------------------------------
    def y_to_image(self, y: torch.Tensor) -> torch.Tensor:
        """A picture of y for the output folder: y itself where it is an image, else A^dagger y."""
        return y

    def y_from_image(self, image: torch.Tensor) -> torch.Tensor:
        """A measurement from a degraded input picture (the inverse of y_to_image)."""
        return image

    def describe(self) -> dict:
        return {"task": self.name}


def _check_divides(shape, factor: int, task: str) -> None:
    if shape[1] % factor or shape[2] % factor:
        raise ConfigError(f"task {task} needs an image size divisible by {factor}, got {shape[1]}x{shape[2]}")


# ----------------------------------------------------------------------------------------------------------------
# Pixel masks, identity, colourisation, average pooling: diagonal Gram matrices.


class Inpaint(Operator):
    """y = m * x: the known pixels (mask 1) and zeros elsewhere; the same mask for every channel."""

    def __init__(self, shape, mask: torch.Tensor, name: str):
        super().__init__(shape)
        self.name = name
        self.mask = mask.float().reshape(1, 1, *self.shape[1:]).expand(1, self.shape[0], *self.shape[1:]).contiguous()

    def A(self, x):
        return x * self.mask.to(x)

    At = A

    def y_shape(self):
        return self.shape

    def eig(self):
        return self.mask[0]

    def describe(self):
        return {"task": self.name, "known_fraction": round(float(self.mask.mean()), 4)}


class Denoise(Operator):
    name = "denoise"

    def A(self, x):
        return x

    At = A

    def y_shape(self):
        return self.shape

    def eig(self):
        return torch.ones(1)


class Colorize(Operator):
    """y = the mean of the RGB channels (DDNM / DDRM colourisation)."""

    name = "colorize"

    def __init__(self, shape):
        super().__init__(shape)
        if self.shape[0] != 3:
            raise ConfigError(f"task colorize needs RGB images, the model makes {self.shape[0]}-channel ones")

    def A(self, x):
        return x.mean(dim=1, keepdim=True)

    def At(self, y):
        return y.expand(-1, 3, -1, -1) / 3.0

    def y_shape(self):
        return (1, *self.shape[1:])

    def eig(self):
        return torch.full((1,), 1.0 / 3.0)

    def y_to_image(self, y):
        return y.expand(-1, 3, -1, -1)

    def y_from_image(self, image):
        return image.mean(dim=1, keepdim=True)


class AvgPoolSR(Operator):
    """y = the mean of each factor x factor block (DDRM/DDNM "SR averaging")."""

    def __init__(self, shape, factor: int):
        super().__init__(shape)
        _check_divides(self.shape, factor, f"sr{factor}")
        self.factor = int(factor)
        self.name = f"sr{factor}"

    def A(self, x):
        return F.avg_pool2d(x, self.factor)

    def At(self, y):
        return F.interpolate(y, scale_factor=self.factor, mode="nearest") / self.factor ** 2

    def y_shape(self):
        return (self.shape[0], self.shape[1] // self.factor, self.shape[2] // self.factor)

    def eig(self):
        return torch.full((1,), 1.0 / self.factor ** 2)

    def describe(self):
        return {"task": self.name, "factor": self.factor, "kernel": "average pooling"}


# ----------------------------------------------------------------------------------------------------------------
# Bicubic SR: separable, A x = D_h X D_w^T per channel.


def cubic(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel (a = -0.5: MATLAB imresize, PIL, torch)."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def bicubic_matrix(n: int, factor: int) -> torch.Tensor:
    """(n / factor, n) antialiased bicubic downsampling: output i is centred at (i + 0.5) factor - 0.5, the kernel
    is stretched by the factor, and taps outside the image are dropped and the rest renormalised (what torch's
    interpolate(mode="bicubic", antialias=True) and PIL do)."""
    m = n // factor
    centres = (torch.arange(m, dtype=torch.float64) + 0.5) * factor - 0.5
    taps = torch.arange(n, dtype=torch.float64)
    w = cubic((taps[None, :] - centres[:, None]) / factor)
    return w / w.sum(dim=1, keepdim=True)


class BicubicSR(Operator):
    def __init__(self, shape, factor: int):
        super().__init__(shape)
        _check_divides(self.shape, factor, f"sr{factor}-bicubic")
        self.factor = int(factor)
        self.name = f"sr{factor}-bicubic"
        self.Dh = bicubic_matrix(self.shape[1], factor).float()
        self.Dw = bicubic_matrix(self.shape[2], factor).float()
        # A A^T = (Dh Dh^T) (x) (Dw Dw^T): eigenvectors Qh (x) Qw, eigenvalues lh_i lw_j.
        lh, self.Qh = torch.linalg.eigh(self.Dh.double() @ self.Dh.double().T)
        lw, self.Qw = torch.linalg.eigh(self.Dw.double() @ self.Dw.double().T)
        self.Qh, self.Qw = self.Qh.float(), self.Qw.float()
        self._eig = (lh[:, None] * lw[None, :]).clamp_min(0).float()

    def A(self, x):
        return self.Dh.to(x) @ x @ self.Dw.to(x).T

    def At(self, y):
        return self.Dh.to(y).T @ y @ self.Dw.to(y)

    def y_shape(self):
        return (self.shape[0], self.shape[1] // self.factor, self.shape[2] // self.factor)

    def eig(self):
        return self._eig

    def to_basis(self, y):
        return self.Qh.to(y).T @ y @ self.Qw.to(y)

    def from_basis(self, z):
        return self.Qh.to(z) @ z @ self.Qw.to(z).T

    def describe(self):
        return {"task": self.name, "factor": self.factor, "kernel": "bicubic (Keys a=-0.5, antialiased)"}


# ----------------------------------------------------------------------------------------------------------------
# Blur: circular convolution, diagonal in the 2-D Fourier basis.


def gaussian_kernel(sigma: float, size: int) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    k = g[:, None] * g[None, :]
    return (k / k.sum()).float()


def motion_kernel(length: float, angle_deg: float, size: int) -> torch.Tensor:
    """A linear motion blur: a segment of `length` pixels through the centre at `angle_deg`, drawn by
    bilinear splatting of 8 points per pixel of length, normalised to sum 1."""
    k = torch.zeros(size, size, dtype=torch.float64)
    c = (size - 1) / 2
    n = max(2, int(8 * length))
    s = torch.linspace(-length / 2, length / 2, n, dtype=torch.float64)
    theta = math.radians(angle_deg)
    xs, ys = c + s * math.cos(theta), c - s * math.sin(theta)
    for x, y in zip(xs.tolist(), ys.tolist()):
        x0, y0 = math.floor(x), math.floor(y)
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            xi, yi = x0 + dx, y0 + dy
            if 0 <= xi < size and 0 <= yi < size:
                k[yi, xi] += (1 - abs(x - xi)) * (1 - abs(y - yi))
    return (k / k.sum()).float()


class Blur(Operator):
    """y = k (*) x, a circular convolution (periodic boundary: A is diagonal in the Fourier basis, so A^T, A^dagger
    and the SVD are exact; DPS/DDRM use zero or reflect padding, which differs only within the kernel's radius
    of the border)."""

    def __init__(self, shape, kernel: torch.Tensor, name: str, info: dict):
        super().__init__(shape)
        self.name, self.info = name, info
        C, H, W = self.shape
        kh, kw = kernel.shape
        if kh > H or kw > W:
            raise ConfigError(f"task {name}: the {kh}x{kw} kernel is larger than the {H}x{W} image: use a smaller kernel")
        # Place the kernel's centre at pixel (0, 0) of an H x W array: convolution without a shift.
        padded = torch.zeros(H, W)
        padded[:kh, :kw] = kernel
        padded = torch.roll(padded, shifts=(-(kh // 2), -(kw // 2)), dims=(0, 1))
        self.kernel = kernel
        self.H = torch.fft.fft2(padded.double())  # transfer function
        self._eig = (self.H.abs() ** 2).float()

    def _filter(self, x, h):
        return torch.fft.ifft2(torch.fft.fft2(x.double()) * h.to(x.device)).real.to(x.dtype)

    def A(self, x):
        return self._filter(x, self.H)

    def At(self, y):
        return self._filter(y, self.H.conj())

    def y_shape(self):
        return self.shape

    def eig(self):
        return self._eig

    def to_basis(self, y):
        return torch.fft.fft2(y.double(), norm="ortho")

    def from_basis(self, z):
        return torch.fft.ifft2(z, norm="ortho").real.float()

    def gram_apply(self, y, fn):
        lam = self.eig().to(y.device).double()
        return self.from_basis(fn(lam) * self.to_basis(y)).to(y.dtype)

    def describe(self):
        return {"task": self.name, **self.info, "boundary": "circular"}


# ----------------------------------------------------------------------------------------------------------------
# Compressed sensing: subsampled, sign-randomised block Walsh-Hadamard transform (orthonormal rows).


def hadamard(n: int) -> torch.Tensor:
    """The n x n orthonormal Walsh-Hadamard matrix (Sylvester), n a power of two."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).float()


class CompressedSensing(Operator):
    """Each block x block patch of each channel, flattened, is multiplied by random signs, Walsh-Hadamard
    transformed and `ratio` of its coefficients are kept (the same rows for every patch): A's rows are
    orthonormal, so A A^T = I and A^dagger = A^T."""

    def __init__(self, shape, ratio: float, block: int, seed: int):
        super().__init__(shape)
        if block & (block - 1) or block < 2:
            raise ConfigError(f"task cs: block {block} must be a power of two >= 2")
        _check_divides(self.shape, block, "cs")
        if not 0 < ratio <= 1:
            raise ConfigError(f"task cs: ratio {ratio} must be in (0, 1]")
        self.block, self.ratio, self.seed = int(block), float(ratio), int(seed)
        n = block * block
        g = torch.Generator().manual_seed(seed)
        self.signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
        self.m = max(1, round(ratio * n))
        self.rows = torch.randperm(n, generator=g)[: self.m].sort().values
        self.M = hadamard(n)[self.rows] * self.signs[None, :]  # (m, n)
        self.name = "cs"

    def _blocks(self, x):  # (N, C, H, W) -> (N, C, nblocks, b*b)
        b = self.block
        N, C, H, W = x.shape
        return x.reshape(N, C, H // b, b, W // b, b).permute(0, 1, 2, 4, 3, 5).reshape(N, C, -1, b * b)

    def _unblocks(self, v):
        b = self.block
        C, H, W = self.shape
        N = v.shape[0]
        return v.reshape(N, C, H // b, W // b, b, b).permute(0, 1, 2, 4, 3, 5).reshape(N, C, H, W)

    def A(self, x):
        return self._blocks(x) @ self.M.to(x).T

    def At(self, y):
        return self._unblocks(y @ self.M.to(y))

    def y_shape(self):
        C, H, W = self.shape
        return (C, (H // self.block) * (W // self.block), self.m)

    def eig(self):
        return torch.ones(1)

    def y_to_image(self, y):
        return self.pinv(y)

    def y_from_image(self, image):
        raise ConfigError("task cs measures Walsh-Hadamard coefficients, not an image: restore clean images with --degrade")

    def describe(self):
        return {"task": "cs", "ratio": self.ratio, "block": self.block, "measurements_per_block": self.m,
                "seed": self.seed}


# ----------------------------------------------------------------------------------------------------------------
# The registry of tasks: name -> builder(shape, options) -> Operator.


@dataclass(frozen=True)
class Task:
    name: str
    build: Callable
    help: str
    options: tuple[str, ...] = ()


TASKS: dict[str, Task] = {}


def _task(name: str, help: str, options: tuple[str, ...] = ()):
    def decorator(fn):
        TASKS[name] = Task(name, fn, help, options)
        return fn

    return decorator


def default_blur_sigma(shape) -> float:
    return max(1.0, 3.0 * shape[1] / 256)


for _f in (2, 4, 8):
    _task(f"sr{_f}", f"super-resolution x{_f}, average pooling")(lambda shape, o, f=_f: AvgPoolSR(shape, f))
    _task(f"sr{_f}-bicubic", f"super-resolution x{_f}, antialiased bicubic")(lambda shape, o, f=_f: BicubicSR(shape, f))


@_task("blur", "Gaussian blur (DPS: 61x61, sigma 3 at 256 px; sigma 3H/256 >= 1 here)", ("sigma", "size"))
def _gaussian(shape, o):
    sigma = float(o.get("sigma", default_blur_sigma(shape)))
    if sigma <= 0:
        raise ConfigError(f"task blur: sigma must be > 0, got {sigma}")
    size = int(o.get("size", min(61, 2 * math.ceil(3 * sigma) + 1)))
    return Blur(shape, gaussian_kernel(sigma, size), "blur", {"kernel": "gaussian", "sigma": sigma, "size": size})


@_task("motion-blur", "linear motion blur (length, angle in degrees)", ("length", "angle", "size"))
def _motion(shape, o):
    length = float(o.get("length", max(3.0, 5.0 * shape[1] / 64)))
    angle = float(o.get("angle", 30.0))
    size = int(o.get("size", 2 * math.ceil(length / 2) + 1))
    return Blur(shape, motion_kernel(length, angle, size), "motion-blur",
                {"kernel": "linear motion", "length": length, "angle": angle, "size": size})


def box_mask(shape, fraction: float = 0.5) -> torch.Tensor:
    """1 = known. The centred box of `fraction` of the height and width is hidden (DPS: 128 of 256)."""
    H, W = shape[1:]
    bh, bw = round(H * fraction), round(W * fraction)
    m = torch.ones(H, W)
    m[(H - bh) // 2:(H - bh) // 2 + bh, (W - bw) // 2:(W - bw) // 2 + bw] = 0
    return m


def random_mask(shape, missing: float, seed: int) -> torch.Tensor:
    H, W = shape[1:]
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(H, W, generator=g) >= missing).float()


def mask_from_file(path: str, shape) -> torch.Tensor:
    """A PNG mask: white (>= 128) = known pixel, black = to fill; resized (nearest) to the image size."""
    from pathlib import Path

    from PIL import Image

    if not Path(path).is_file():
        raise ConfigError(f"mask file '{path}' does not exist: pass a PNG (white = known, black = fill)")
    img = Image.open(path).convert("L").resize((shape[2], shape[1]), Image.NEAREST)
    return (torch.from_numpy(__import__("numpy").asarray(img).copy()).float() >= 128).float()


@_task("inpaint-box", "fill the centred box (half the height and width, as DPS)", ("fraction",))
def _box(shape, o):
    return Inpaint(shape, box_mask(shape, float(o.get("fraction", 0.5))), "inpaint-box")


@_task("inpaint-random", "fill 50 % randomly hidden pixels (the same mask for all images, seeded)", ("missing", "seed"))
def _random(shape, o):
    missing = float(o.get("missing", 0.5))
    if not 0 <= missing < 1:
        raise ConfigError(f"task inpaint-random: missing {missing} must be in [0, 1)")
    return Inpaint(shape, random_mask(shape, missing, int(o.get("seed", 0))), "inpaint-random")


@_task("inpaint-mask", "fill the black pixels of a mask PNG (--task-opt mask=FILE)", ("mask",))
def _mask(shape, o):
    if "mask" not in o:
        raise ConfigError("task inpaint-mask needs a mask: add --task-opt mask=FILE.png (white = known)")
    return Inpaint(shape, mask_from_file(str(o["mask"]), shape), "inpaint-mask")


_task("colorize", "colourisation from the mean of the RGB channels")(lambda shape, o: Colorize(shape))
_task("denoise", "denoising (A = I; set the noise with --sigma-y)")(lambda shape, o: Denoise(shape))


@_task("cs", "compressed sensing: block Walsh-Hadamard, ratio of coefficients kept", ("ratio", "block", "seed"))
def _cs(shape, o):
    return CompressedSensing(shape, float(o.get("ratio", 0.25)), int(o.get("block", 8)), int(o.get("seed", 0)))


def build_operator(task: str, shape, options: Optional[dict] = None) -> Operator:
    """The operator of `task` for images of `shape` (C, H, W); unknown tasks and options name the closest."""
    if task not in TASKS:
        close = difflib.get_close_matches(task, TASKS, n=1, cutoff=0.4)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of: {', '.join(sorted(TASKS))}"
        raise ConfigError(f"unknown task '{task}': {hint}")
    options = dict(options or {})
    entry = TASKS[task]
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        allowed = ", ".join(entry.options) or "none"
        raise ConfigError(f"task {task} has no option '{unknown[0]}': its options are {allowed}")
    return entry.build(tuple(shape), options)


def degrade(op: Operator, x: torch.Tensor, sigma_y: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """y = A x + sigma_y n, n ~ N(0, I) from `generator`."""
    y = op.A(x)
    if sigma_y > 0:
        y = y + sigma_y * torch.randn(y.shape, generator=generator).to(y)
    return y
