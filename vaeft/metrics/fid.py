"""rFID: Fréchet distance between InceptionV3 pool features of originals and reconstructions.

Features come from torch-fidelity's ``inception-v3-compat`` (the TF-2015 port every published
FID uses) with its weights from the weight store. Statistics are accumulated as running sums in
float64 on the device, so memory stays flat in the number of images (2048x2048 sums, not N x 2048
features) and nothing goes to the host per batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vaeft.compat.torchvision_cpu import ensure_torchvision
from vaeft.errors import VaeftError

FEATURE_EXTRACTOR = "inception-v3-compat"
FEATURE_LAYER = "2048"


class FidWeightsError(VaeftError):
    pass


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2) for symmetric PSD S1, S2.

    tr((S1 S2)^1/2) = sum of sqrt(eigenvalues of S1^1/2 S2 S1^1/2): that matrix is symmetric PSD,
    so eigh is stable where a general sqrtm of the non-symmetric S1 S2 is not.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


class RunningStats:
    """Mean and (sample, ddof=1, like np.cov) covariance of feature rows, added batch by batch.

    The sums are float64 tensors on the features' device (one d x d product per batch there, no
    copy to the host); numpy arrays come out once, for the final distance.

    While there are no more rows than feature dimensions the rows themselves are kept too (at
    most d x d numbers, the size of the running sums): FID then needs only an n x n SVD instead
    of d x d eigendecompositions (2048^2: seconds to minutes on a small CPU).
    """

    def __init__(self) -> None:
        self.n = 0
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None
        self.rows: list[torch.Tensor] | None = []

    def update(self, feats: np.ndarray | torch.Tensor) -> None:
        f = torch.as_tensor(feats).to(torch.float64)
        if self._sum is None:
            self._sum = f.new_zeros(f.shape[1])
            self._outer = f.new_zeros((f.shape[1], f.shape[1]))
        self.n += f.shape[0]
        self._sum += f.sum(dim=0)
        self._outer += f.T @ f
        if self.rows is not None:
            self.rows = self.rows + [f] if self.n <= f.shape[1] else None

    @property
    def sum(self) -> np.ndarray | None:
        return None if self._sum is None else self._sum.cpu().numpy()

    @property
    def outer(self) -> np.ndarray | None:
        return None if self._outer is None else self._outer.cpu().numpy()

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 images, got {self.n}")
        mu = self.sum / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, cov

    def centred_rows(self) -> np.ndarray | None:
        if self.rows is None or self.n < 2:
            return None
        f = torch.cat(self.rows).cpu().numpy()
        return f - f.mean(axis=0)


def frechet_distance_low_rank(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance of the Gaussians fitted to feature rows f1 (n1 x d) and f2 (n2 x d).

    With S = A^T A / (n - 1) for centred rows A, the non-zero eigenvalues of S1 S2 are the squared
    singular values of A1 A2^T / sqrt((n1 - 1)(n2 - 1)), so tr((S1 S2)^1/2) is their sum.
    """
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    n1, n2 = len(f1), len(f2)
    if n1 < 2 or n2 < 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"need >= 2 rows of equal width, got {f1.shape} and {f2.shape}")
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    a1, a2 = f1 - mu1, f2 - mu2
    tr1, tr2 = float((a1 * a1).sum()) / (n1 - 1), float((a2 * a2).sum()) / (n2 - 1)
    tr_covmean = float(np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()) / np.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return float(diff @ diff + tr1 + tr2 - 2.0 * tr_covmean)


def fid_from_stats(a: RunningStats, b: RunningStats) -> float:
    ra, rb = a.centred_rows(), b.centred_rows()
    if ra is not None and rb is not None:
        mu_a, mu_b = a.sum / a.n, b.sum / b.n
        return frechet_distance_low_rank(ra + mu_a, rb + mu_b)
    return frechet_distance(*a.mean_cov(), *b.mean_cov())


class InceptionFeatures:
    """torch-fidelity's InceptionV3 (``inception-v3-compat``) with weights from a local file."""

    def __init__(self, weights_file: str | Path, device: torch.device | str = "cpu") -> None:
        weights_file = Path(weights_file)
        # torch-fidelity unpickles the file with weights_only=False; refuse anything that is not
        # plain tensors before it gets there.
        try:
            torch.load(weights_file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means: not a usable weight file
            raise FidWeightsError(f"{weights_file}: not a plain state dict ({type(err).__name__})") from None
        ensure_torchvision()
        from torch_fidelity.utils import create_feature_extractor

        self.device = torch.device(device)
        self.model = create_feature_extractor(
            FEATURE_EXTRACTOR, [FEATURE_LAYER], cuda=False, feature_extractor_weights_path=str(weights_file),
            verbose=False,
        ).to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """N x 2048 features (on the device) of uint8 N x 3 x H x W images (resized to 299 inside, as TF did)."""
        (feats,) = self.model(images.to(self.device))
        return feats
