"""The training plot (``ast_training.png``): loss, flip rates and the masked-decay λ against the optimizer step.

Kept out of the callbacks so that training imports no plotting library; matplotlib is imported when a plot is drawn.
"""

from __future__ import annotations

import os

from ..atomic import atomic_write

__all__ = ["PLOT_FILE", "plot_training"]

PLOT_FILE = "ast_training.png"


def plot_training(log_history: list[dict], output_dir: str) -> str:
    """Plot loss, flip rates and λ from ``log_history`` into ``output_dir/ast_training.png`` (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list, list]:
        rows = [(h["step"], h[key]) for h in log_history if key in h and "step" in h]
        return [r[0] for r in rows], [r[1] for r in rows]

    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    axes[0].plot(*series("loss"), label="train loss")
    if series("eval_loss")[0]:
        axes[0].plot(*series("eval_loss"), label="eval loss")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[1].plot(*series("ast/flip_rate"), label="vs previous mask")
    axes[1].plot(*series("ast/flip_rate_vs_initial"), label="vs initial mask")
    axes[1].set_ylabel("flip rate")
    axes[1].legend()
    axes[2].plot(*series("ast/lambda"))
    axes[2].set_ylabel("masked decay λ")
    axes[2].set_xlabel("optimizer step")
    fig.suptitle("AST training")
    fig.tight_layout()
    path = os.path.join(output_dir, PLOT_FILE)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
