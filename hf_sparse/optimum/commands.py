"""``optimum-cli export hf-sparse``: the Optimum CLI face of :class:`HfSparseQuantizer`.

Kept import-light (torch/transformers load inside ``run``): Optimum imports every registered command
file at CLI start-up.
"""

from __future__ import annotations

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
        parser.add_argument("-m", "--model", required=True, help="model directory or hub id")
        parser.add_argument("output", help="export directory (written atomically)")
        parser.add_argument("--n", type=int, default=2, help="kept values per group (default 2)")
        parser.add_argument("--m", type=int, default=4, help="group size along the input dimension (default 4)")
        parser.add_argument("--bits", type=int, default=16, choices=(4, 8, 16), help="kept-value storage bits")
        parser.add_argument("--group-size", type=int, default=128, help="input channels per scale; 0 = per channel")
        parser.add_argument("--asymmetric", action="store_true", help="store zero-points (default symmetric)")
        parser.add_argument("--method", default="rtn", choices=("rtn",), help="quantization method (gptq: use hf-sparse export)")
        parser.add_argument("--prune", default="magnitude", choices=("magnitude", "none"),
                            help="how to make non-sparse targets N:M ('none': fail if a target is not N:M)")
        parser.add_argument("--targets", nargs="*", default=None, help="target modules: names/suffixes as in PEFT (default: decoder linears)")
        parser.add_argument("--exclude", nargs="*", default=None, help="modules kept dense: names/suffixes")
        parser.add_argument("--overwrite", action="store_true",
                            help="replace OUTPUT even if it holds other files (never the model or the current directory)")

    def run(self) -> None:
        from .quantizer import HfSparseQuantizer

        a = self.args
        quantizer = HfSparseQuantizer.from_pretrained(
            a.model, n=a.n, m=a.m, target_modules=a.targets, exclude_modules=a.exclude
        )
        out = quantizer.quantize(
            a.output, bits=a.bits, group_size=a.group_size or None, symmetric=not a.asymmetric, method=a.method,
            prune=a.prune, overwrite=a.overwrite,
        )
        print(f"hf_sparse export written to {out}")
