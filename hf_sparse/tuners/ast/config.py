"""ASTConfig: the PEFT configuration of the Adaptive Sparse Trainer (AST) method."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ...sparsity.nm import validate_nm
from ...targets import DEFAULT_EXCLUDE_MODULES, DEFAULT_TARGET_MODULES, TargetSelector

AST_PEFT_TYPE = "AST"

# kept for code that imported them from here (the selector owns them now: hf_sparse.targets)
DEFAULT_TARGET_PATTERN = DEFAULT_TARGET_MODULES
DEFAULT_EXCLUDE_PATTERNS = (DEFAULT_EXCLUDE_MODULES,)


@dataclass
class ASTConfig(PeftConfig):
    """Configuration of AST (arXiv 2407.20584): N:M masks recomputed during training over a trainable dense weight.

    With no arguments it is the paper's setup: every ``nn.Linear``/``Conv1D`` inside the decoder blocks at 2:4 along
    the input dimension, embeddings and ``lm_head`` dense, all parameters trainable, magnitude masks recomputed every
    10 optimizer steps, annealed masked decay, SLoRB off.

    Args:
        target_modules: PEFT's rule (as in ``LoraConfig``): a str is a regex ``re.fullmatch``-ed against qualified
            module names; a list holds exact names or name suffixes (``["q_proj", "mlp.down_proj"]``). ``None``:
            every Linear/Conv1D inside a decoder block. (A list of regexes, the pre-0.2 meaning, still works with a
            FutureWarning.) One implementation for AST, one-shot, export and Optimum: :mod:`hf_sparse.targets`.
        exclude_modules: same rule; matching modules stay dense. ``None``: MoE routers (``gate``/``router``).
        target_parameters: names or suffixes of ``nn.Parameter`` s to sparsify that are not Linear modules: the fused
            3-D MoE expert tensors (``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``), PEFT's
            ``LoraConfig(target_parameters=...)`` rule (one ``ParamWrapper`` per parameter). ``None``: every fused
            expert weight of the MoE blocks (:func:`hf_sparse.sparsity.experts.default_expert_parameters`); ``[]``:
            experts stay dense. N:M runs per expert along each matrix's input dimension (``[E, out, in]`` for
            Mixtral/Qwen-MoE/OLMoE/DeepSeek-V3, ``[E, in, out]`` for gpt-oss/Llama-4); routers stay dense. SLoRB is
            not available for expert parameters (refused).
        n, m: the N:M pattern (N kept of every M consecutive input weights).
        mask_init: how the first mask is chosen: ``"magnitude"`` (|W|), or a one-shot method that the trainer or
            :mod:`hf_sparse.oneshot` applies from calibration data (``"wanda"``, ``"sparsegpt"``).
        mask_score: score used by the periodic recomputes: ``"magnitude"`` (the paper) or ``"activation"``
            (|W|·running input norm).
        mask_update_interval: recompute the mask every this many optimizer steps (paper: 10). 0 keeps it fixed.
        mask_update_start: first optimizer step at which recomputes may happen (0: from the first interval on);
            lets the weights adapt to a one-shot initial mask before magnitude takes over.
        mask_update_stop: last optimizer step at which recomputes may happen (``None``: to the end); freezing
            the mask for the final steps lets the kept weights settle.
        activation_norm_ema: for ``mask_score="activation"``: ``None`` scores with the sum of squared inputs
            seen since the last recompute; a float in (0, 1) keeps an exponential moving average of per-batch
            squared norms with this decay instead (the score never forgets older batches entirely).
        masked_decay_peak: peak λ of the masked (SR-STE) decay on pruned weights.
        masked_decay_ramp_steps: steps over which λ ramps linearly from 0 to the peak; ``None`` = 25% of training.
        use_slorb: add the SLoRB branch ``S·(X·x)`` beside each sparse weight.
        slorb_group_size: k, the number of consecutive input channels one SLoRB projection row sums (paper: 16).
        slorb_init: ``"mean"`` (S = group means of the pruned weights, the paper) or ``"zero"``.
        slorb_train_projection: train X (a d/k×d matrix initialised to the 0/1 group sums). False keeps X fixed and
            computes it as a reshape-and-sum, never materialising the matrix.
        trainable_non_target: which non-target parameters train: ``"all"`` (the paper), ``"none"``, or a list of
            regexes over parameter names. Target weights always train: they are what AST trains. These parameters
            are saved with the adapter whatever their current ``requires_grad``: an adapter loaded for inference
            (``PeftModel.from_pretrained(..., is_trainable=False)``, the default) is frozen, and saves the same file.
        schedule: ``"ast"`` (the paper: masked forward, STE, SR-STE masked decay) or ``"progressive"`` (CAST-style,
            arXiv 2509.25996, after a third-party reproduction: the forward stays dense, the weights outside the
            current N:M mask get an L1 decay ``cast_decay·r(t)·sign(W)`` added to their gradient, so it enters Adam's
            first moment and the second moment is taken of that sum, with ``r`` ramping 0 -> 1 over training; the mask
            is recomputed every ``mask_update_interval`` steps; a learnable scale per row and half row (``cast_scales``)
            compensates the decay; at the end of training one hard N:M prune with the scales folded into the weight,
            after which the layer is an ordinary masked AST layer). ``masked_decay_peak`` is set to 0 (the L1 decay
            replaces it); SLoRB is refused. See :mod:`hf_sparse.tuners.ast.progressive`.
        cast_decay: peak strength of the progressive schedule's L1 decay (not tuned: measure).
        cast_scales: learn the per-half-row scales of the progressive schedule (``in_features`` must be a multiple of
            ``2*m``, so that no N:M group straddles the halves).

    Limits (AST trains the base weights themselves, not a separate delta):
        - One AST adapter per model: ``add_adapter``/``load_adapter`` of a second one raise a ValueError. Train
          another variant on a fresh copy of the base model.
        - ``disable_adapter()`` runs the *trained dense* weights without the mask (and without SLoRB), not the
          original model. Keep a copy of the base model (or reload it) for the original outputs, e.g. as the teacher.
        - ``merge_and_unload()`` with SLoRB leaves ``SparseLinear`` modules and records them in
          ``config.quantization_config`` (``quant_method="hf_sparse_slorb"``), so ``save_pretrained`` /
          ``AutoModelForCausalLM.from_pretrained`` round-trip them when ``hf_sparse`` is imported.
    """

    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "regex (str) or names/suffixes"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "regex (str) or names kept dense"})
    target_parameters: Optional[list[str]] = field(default=None, metadata={"help": "parameter names/suffixes (MoE)"})
    n: int = field(default=2, metadata={"help": "kept weights per group"})
    m: int = field(default=4, metadata={"help": "group size along the input dimension"})
    mask_init: str = field(default="magnitude", metadata={"help": "magnitude | wanda | sparsegpt"})
    mask_score: str = field(default="magnitude", metadata={"help": "recompute score: magnitude | activation"})
    mask_update_interval: int = field(default=10, metadata={"help": "optimizer steps between mask recomputes"})
    mask_update_start: int = field(default=0, metadata={"help": "first step at which masks are recomputed"})
    mask_update_stop: Optional[int] = field(default=None, metadata={"help": "last step at which masks are recomputed"})
    activation_norm_ema: Optional[float] = field(default=None, metadata={"help": "EMA decay of input norms"})
    masked_decay_peak: float = field(default=1e-4, metadata={"help": "peak lambda of the masked decay"})
    masked_decay_ramp_steps: Optional[int] = field(default=None, metadata={"help": "linear ramp length of lambda"})
    use_slorb: bool = field(default=False, metadata={"help": "add SLoRB low-rank branches"})
    slorb_group_size: int = field(default=16, metadata={"help": "SLoRB group size k"})
    slorb_init: Literal["mean", "zero"] = field(default="mean", metadata={"help": "SLoRB weight init: mean | zero"})
    slorb_train_projection: bool = field(default=False, metadata={"help": "train the SLoRB projection X"})
    trainable_non_target: Union[str, list[str]] = field(default="all", metadata={"help": "all | none | regexes"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "PEFT modules_to_save"})
    schedule: Literal["ast", "progressive"] = field(default="ast", metadata={"help": "ast | progressive (CAST)"})
    cast_decay: float = field(default=1e-4, metadata={"help": "peak L1 decay of the progressive schedule"})
    cast_scales: bool = field(default=True, metadata={"help": "learn per-half-row scales (progressive)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = AST_PEFT_TYPE
        validate_nm(self.n, self.m, module_name="ASTConfig")
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, set):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.target_parameters, str):
            raise ValueError(
                f"ASTConfig: argument `target_parameters` must be None or a list of parameter names/suffixes, got the "
                f"str {self.target_parameters!r} (PEFT's rule: [{self.target_parameters!r}])"
            )
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = sorted(self.target_parameters)
        if self.slorb_init not in ("mean", "zero"):
            raise ValueError(f"ASTConfig: argument `slorb_init` must be 'mean' or 'zero', got {self.slorb_init!r}")
        if self.slorb_group_size < 1:
            raise ValueError(f"ASTConfig: argument `slorb_group_size` must be >= 1, got {self.slorb_group_size}")
        if self.mask_update_interval < 0:
            raise ValueError(f"ASTConfig: argument `mask_update_interval` must be >= 0, got {self.mask_update_interval}")
        if self.mask_update_start < 0:
            raise ValueError(f"ASTConfig: argument `mask_update_start` must be >= 0, got {self.mask_update_start}")
        if self.activation_norm_ema is not None and not 0.0 < self.activation_norm_ema < 1.0:
            raise ValueError(
                f"ASTConfig: argument `activation_norm_ema` must be None or in (0, 1), got {self.activation_norm_ema}"
            )
        if not math.isfinite(self.masked_decay_peak) or self.masked_decay_peak < 0:
            raise ValueError(
                f"ASTConfig: argument `masked_decay_peak` must be a finite number >= 0, got {self.masked_decay_peak}"
            )
        for name in ("masked_decay_ramp_steps", "mask_update_stop"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"ASTConfig: argument `{name}` must be None or an integer >= 0, got {value!r}")
        from ...oneshot.registry import PRUNERS  # the one-shot pruner registry (users may register their own)

        known_inits = sorted({"magnitude", "wanda", "sparsegpt", *PRUNERS})
        if self.mask_init not in known_inits:
            raise ValueError(f"ASTConfig: argument `mask_init` must be one of {known_inits}, got {self.mask_init!r}")
        if self.mask_score not in ("magnitude", "activation"):
            raise ValueError(f"ASTConfig: argument `mask_score` must be 'magnitude' or 'activation', got {self.mask_score!r}")
        if isinstance(self.trainable_non_target, str) and self.trainable_non_target not in ("all", "none"):
            self.trainable_non_target = [self.trainable_non_target]
        self._check_schedule()

    def _check_schedule(self) -> None:
        if self.schedule not in ("ast", "progressive"):
            raise ValueError(f"ASTConfig: argument `schedule` must be 'ast' or 'progressive', got {self.schedule!r}")
        if not math.isfinite(self.cast_decay) or self.cast_decay < 0:
            raise ValueError(f"ASTConfig: argument `cast_decay` must be a finite number >= 0, got {self.cast_decay}")
        if self.schedule == "progressive":
            if self.use_slorb:
                raise ValueError("ASTConfig: `schedule='progressive'` does not support `use_slorb=True` (the dense "
                                 "forward and its per-half-row scales already compensate the pruned weights)")
            self.masked_decay_peak = 0.0  # the L1 decay of the progressive schedule replaces the masked decay

    def target_selector(self) -> TargetSelector:
        """The selector these fields describe (the one implementation in :mod:`hf_sparse.targets`)."""
        return TargetSelector(self.target_modules, self.exclude_modules, self.target_parameters)
