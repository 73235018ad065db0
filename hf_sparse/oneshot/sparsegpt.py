"""SparseGPT N:M pruning (Frantar & Alistarh 2023): layer-wise OBS with weight updates.

H = 2·XXᵀ/n over calibration tokens (damped by 1% of its mean diagonal). Columns are processed left to
right in blocks of 128; at every column i with i % M == 0 each row prunes the M−N weights of columns
i..i+M−1 with the smallest w²/[U]_ii² (U = upper Cholesky factor of H⁻¹, as in the reference code), and the
error of every pruned/kept column is spread onto the columns still to come, so the kept weights compensate.
All math in fp32. Deviation from the reference: input channels that never fired (zero Hessian diagonal)
keep their weights instead of being zeroed; they are decoupled in H, so nothing else changes.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..linalg import damped_inverse_cholesky
from .registry import OneShotPruner, register_pruner

__all__ = ["SparseGPTPruner"]


@register_pruner("sparsegpt")
class SparseGPTPruner(OneShotPruner):
    """Args (beyond :class:`OneShotPruner`): ``blocksize`` (columns per lazy-update block, rounded to a multiple
    of M) and ``percdamp`` (damping as a fraction of the mean Hessian diagonal)."""

    def __init__(self, *args, blocksize: int = 128, percdamp: float = 0.01, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.blocksize = max(self.m, (blocksize // self.m) * self.m)
        self.percdamp = percdamp
        self.H: Optional[torch.Tensor] = None

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        rows = self._rows(x)
        if self.H is None:
            self.H = torch.zeros(self.in_features, self.in_features, device=rows.device, dtype=torch.float32)
        t = rows.shape[0]
        if t == 0:
            return
        # running H = 2/n Σ x xᵀ without keeping the tokens
        self.H.mul_(self.num_tokens / (self.num_tokens + t))
        self.num_tokens += t
        rows = rows * (2.0 / self.num_tokens) ** 0.5
        self.H.addmm_(rows.t(), rows)

    def _inverse_cholesky(self, H: torch.Tensor) -> torch.Tensor:
        """Upper Cholesky factor of (H + damp·I)⁻¹ (:func:`hf_sparse.linalg.damped_inverse_cholesky`)."""
        try:
            return damped_inverse_cholesky(H, self.percdamp, what=f"{self.name}: SparseGPT Hessian")
        except RuntimeError as err:
            raise RuntimeError(f"{err} or method='wanda'") from None

    @torch.no_grad()
    def prune(self) -> torch.Tensor:
        W = self.weight_out_in().clone()
        rows, cols = W.shape
        n_prune = self.m - self.n
        if self.H is None or self.num_tokens == 0:
            H = torch.eye(cols, device=W.device)  # no data: plain magnitude selection, no update
        else:
            H = self.H.to(W.device)
        self.H = None
        dead = torch.diag(H) == 0
        if bool(dead.any()):
            H = H.clone()
            H[dead, dead] = 1.0
        Hinv = self._inverse_cholesky(H)
        del H
        pruned = torch.zeros_like(W, dtype=torch.bool)
        for i1 in range(0, cols, self.blocksize):
            i2 = min(i1 + self.blocksize, cols)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            hdiag = torch.diag(Hinv1)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)  # True = pruned
            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                if i % self.m == 0:
                    err = W1[:, i : i + self.m] ** 2 / hdiag[i : i + self.m].reshape(1, -1) ** 2
                    mask1.scatter_(1, i + torch.topk(err, n_prune, dim=1, largest=False).indices, True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            pruned[:, i1:i2] = mask1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        self.write_out_in(W)
        keep = ~pruned
        return keep.t().contiguous() if self.input_dim == 0 else keep

    def free(self) -> None:
        self.H = None
