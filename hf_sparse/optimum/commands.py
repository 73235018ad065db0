"""``optimum-cli export hf-sparse``: the Optimum CLI face of :class:`HfSparseQuantizer`.

Kept import-light (torch/transformers load inside ``run``): Optimum imports every registered command
file at CLI start-up.
"""

from __future__ import annotations

import sys
from argparse import ArgumentParser

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

__all__ = ["HfSparseExportCommand"]


class HfSparseExportCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(
        name="hf-sparse",
        help="Prune a causal LM to N:M (2:4) and export packed (optionally int4/int8) safetensors (hf_sparse).",
    )

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        from ..cli import DefaultsHelpFormatter  # argparse only: keeps optimum-cli's start-up light

        parser.formatter_class = DefaultsHelpFormatter  # --help shows every default
        parser.add_argument("-m", "--model", required=True, help="model directory or hub id")
        parser.add_argument("output", help="export directory (written atomically)")
        parser.add_argument("--n", type=int, default=2, help="kept values per group")
        parser.add_argument("--m", type=int, default=4, help="group size along the input dimension")
        parser.add_argument("--bits", type=int, default=16, choices=(4, 8, 16), help="kept-value storage bits")
        parser.add_argument("--group-size", type=int, default=128, help="input channels per scale; 0 = per channel")
        parser.add_argument("--asymmetric", action="store_true", help="store zero-points (default symmetric)")
        parser.add_argument("--method", default="rtn", choices=("rtn",), help="quantization method (gptq: use hf-sparse export)")
        parser.add_argument("--prune", default="magnitude", choices=("magnitude", "sparsegpt", "wanda", "none"),
                            help="how to make dense targets N:M: 'magnitude' destroys a dense model's quality (a "
                                 "warning says so), 'sparsegpt'/'wanda' calibrate on --calibration-file, 'none' fails "
                                 "if a target is not N:M; best: AST training (hf-sparse train), then export")
        parser.add_argument("--calibration-file", default=None, help="UTF-8 text for --prune sparsegpt/wanda")
        parser.add_argument("--num-samples", type=int, default=32, help="calibration sequences")
        parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
        parser.add_argument("--targets", nargs="*", default=None, help="target modules: names/suffixes as in PEFT (default: decoder linears)")
        parser.add_argument("--exclude", nargs="*", default=None, help="modules kept dense: names/suffixes")
        parser.add_argument("--overwrite", action="store_true",
                            help="replace OUTPUT even if it holds other files (never the model or the current directory)")

    def run(self) -> None:
        from .quantizer import HfSparseQuantizer

        from .quantizer import CALIBRATED_PRUNE_METHODS, MAGNITUDE_PRUNE_WARNING

        a = self.args
        if a.prune in CALIBRATED_PRUNE_METHODS and not a.calibration_file:
            raise SystemExit(f"optimum-cli export hf-sparse: --prune {a.prune} needs --calibration-file (a text file)")
        quantizer = HfSparseQuantizer.from_pretrained(
            a.model, n=a.n, m=a.m, target_modules=a.targets, exclude_modules=a.exclude
        )
        calibration = None
        if a.prune in CALIBRATED_PRUNE_METHODS:
            from ..calibration import calibration_ids_from_text

            if quantizer.tokenizer is None:
                raise SystemExit(f"optimum-cli export hf-sparse: --prune {a.prune} needs a tokenizer at {a.model}")
            with open(a.calibration_file, encoding="utf-8") as f:
                calibration = calibration_ids_from_text(quantizer.tokenizer, [f.read()], a.num_samples, a.seq_len)
        report = quantizer.prune(a.prune, calibration)  # before the export: the warning comes first
        if quantizer.pruned_with == "magnitude":
            print(f"WARNING: {sum(not v for v in report.values())} dense target(s) were magnitude-pruned: "
                  + MAGNITUDE_PRUNE_WARNING.format(n=a.n, m=a.m), file=sys.stderr, flush=True)
        out = quantizer.quantize(
            a.output, bits=a.bits, group_size=a.group_size or None, symmetric=not a.asymmetric, method=a.method,
            prune="none", overwrite=a.overwrite,
        )
        print(f"hf_sparse export written to {out}")
