"""The one numerical kernel SparseGPT and GPTQ share: the upper Cholesky factor of a damped inverse Hessian."""

from __future__ import annotations

import torch

__all__ = ["damped_inverse_cholesky"]


def damped_inverse_cholesky(hessian: torch.Tensor, percdamp: float = 0.01, what: str = "Hessian",
                            retries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp·I)⁻¹`` with ``damp = percdamp · mean(diag H)``.

    Dead inputs (zero diagonal: a channel that never fired) get a unit diagonal so H stays invertible. If H is
    numerically not positive definite the damping grows tenfold, up to ``retries`` times; then a RuntimeError
    names ``what`` and suggests more calibration data.
    """
    H = hessian.to(torch.float32).clone()
    diag = torch.arange(H.shape[0], device=H.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    mean_diag = float(torch.mean(torch.diag(H)))
    damp = percdamp * mean_diag if mean_diag > 0 else 1e-6
    for _ in range(retries):
        Hd = H.clone()
        Hd[diag, diag] += damp
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                return U
        damp *= 10
    raise RuntimeError(
        f"{what} is not positive definite even with damping {damp:.3g}; use more calibration samples"
    )
