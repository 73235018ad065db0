"""The hf_sparse on-disk format, in code: names, shapes and dtypes of the packed tensors (docs/format.md).

Per sparsified linear ``<name>`` with logical weight ``[out, in]`` (GPT-2 Conv1D is transposed to
``[out, in]`` at export) and N:M sparsity along ``in``:

* ``<name>.nm_values``: bits=16: the kept values (fp16/bf16) ``[out, in*N/M]``; bits=8: uint8 codes of the
  same shape; bits=4: uint8 ``[out, in*N/M/2]``, two codes per byte, low nibble = even index.
* ``<name>.nm_positions``: uint8, the in-group positions of the kept values bit-packed with
  :func:`hf_sparse.sparsity.pack_bits` at ``position_bits(M)`` bits (``[out, in*N/M*2/8]`` for 2:4).
* ``<name>.nm_scales``: ``[out, ceil(in/group_size)]`` (group_size counts *original* input channels; per-channel
  = ``[out, 1]``); ``<name>.nm_zeros`` (asymmetric only), same shape, zero-point in code units.
  Dequantization: ``w = (code - zero) * scale``; symmetric uses ``zero = 2**(bits-1)`` (no zeros tensor).
* ``<name>.bias`` as is; SLoRB: ``<name>.slorb.weight`` (and ``<name>.slorb.projection`` when the projection was
  trained). Version 1 files call them ``slorb.S``/``slorb.X`` (:data:`LEGACY_SLORB_KEYS`); both versions are read.

Per sparsified fused MoE expert parameter ``<param>`` (version 2; ``quantization_config.expert_targets`` lists them,
e.g. ``model.layers.0.mlp.experts.gate_up_proj``) with ``E`` experts, each expert matrix stored in the logical
``[out, in]`` layout (gpt-oss/Llama-4's ``[E, in, out]`` parameters are transposed at export, back at load):
the same ``nm_values``/``nm_positions``/``nm_scales``/``nm_zeros`` as a linear, with a leading expert dimension
(``<param>.nm_values`` ``[E, out, in*N/M]`` ...), :func:`expected_expert_tensors`. Expert biases stay dense tensors.

Both the writer and the loader derive expected shapes/dtypes from :class:`NMSpec`, so they cannot drift.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from .sparsity.packing import pack_bits, position_bits, scatter_nm, unpack_bits

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "VALUES",
    "POSITIONS",
    "SCALES",
    "ZEROS",
    "SLORB_WEIGHT",
    "SLORB_PROJECTION",
    "SLORB_KEYS",
    "LEGACY_SLORB_KEYS",
    "READABLE_FORMAT_VERSIONS",
    "canonical_slorb_suffix",
    "slorb_keys",
    "CHECKSUM_KEY",
    "NMSpec",
    "FormatError",
    "dtype_names",
    "parse_dtype",
    "safetensors_dtype",
    "expected_tensors",
    "pack_codes",
    "unpack_codes",
    "dequantize_values",
    "unpack_weight",
    "EXPERT_TENSORS",
    "expected_expert_tensors",
    "unpack_expert_weight",
]

# 2: SLoRB tensors renamed slorb.S/X -> slorb.weight/projection; packed fused MoE expert tensors (expert_targets).
# Version 1 files load (names mapped at load).
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
QUANT_METHOD = "hf_sparse"

VALUES = "nm_values"
POSITIONS = "nm_positions"
SCALES = "nm_scales"
ZEROS = "nm_zeros"
SLORB_WEIGHT = "slorb.weight"
SLORB_PROJECTION = "slorb.projection"
# version-1 names of the same tensors
LEGACY_SLORB_KEYS = {"slorb.S": SLORB_WEIGHT, "slorb.X": SLORB_PROJECTION}
# every suffix a SLoRB tensor of a readable file can carry
SLORB_KEYS = (SLORB_WEIGHT, SLORB_PROJECTION, *LEGACY_SLORB_KEYS)
# safetensors ``__metadata__`` keys written into every shard
CHECKSUM_KEY = "hf_sparse.sha256"
VERSION_KEY = "hf_sparse.format_version"

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# the one table of user-facing dtype names (CLI flags, recipes, training arguments)
_DTYPE_ALIASES = {**_DTYPES, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# safetensors header dtype codes this format stores
_SAFETENSORS_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "U8": torch.uint8,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}


class FormatError(ValueError):
    """A checkpoint does not match the hf_sparse format (shape, dtype, N:M pattern, version, corruption)."""


def canonical_slorb_suffix(key: str) -> Optional[str]:
    """``slorb.weight``/``slorb.projection`` for a tensor key of a SLoRB branch (either version's name), else None."""
    for suffix in SLORB_KEYS:
        if key == suffix or key.endswith("." + suffix):
            return LEGACY_SLORB_KEYS.get(suffix, suffix)
    return None


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise FormatError(f"unsupported dtype name {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise FormatError(f"unsupported dtype {dtype}; expected one of {sorted(_DTYPES)}")


def parse_dtype(name: Optional[str], argument: str = "dtype", allow_auto: bool = True):
    """A user-given dtype name (``float16``/``fp16``/``bfloat16``/``bf16``/``float32``/``fp32``; ``auto``/None -> None)
    as a torch dtype; an unknown name is an error naming the argument (never a silent float32)."""
    if name is None or (allow_auto and name == "auto"):
        return None
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPE_ALIASES[str(name)]
    except KeyError:
        choices = sorted(_DTYPE_ALIASES) + (["auto"] if allow_auto else [])
        raise ValueError(f"argument `{argument}`={name!r} is not a dtype name; choose one of {choices}") from None


def dtype_names(allow_auto: bool = True) -> tuple[str, ...]:
    """The names :func:`parse_dtype` accepts (for argparse ``choices``)."""
    return tuple(sorted(_DTYPE_ALIASES)) + (("auto",) if allow_auto else ())


def safetensors_dtype(code: str, key: str = "<tensor>") -> torch.dtype:
    """The torch dtype of a safetensors header dtype code; an unknown code is a FormatError naming the tensor."""
    try:
        return _SAFETENSORS_DTYPES[code]
    except KeyError:
        raise FormatError(f"{key}: safetensors dtype {code!r} is not one hf_sparse stores") from None


@dataclass
class NMSpec:
    """Everything needed to read one export: the N:M pattern, the quantization and the targets.

    Serialised as ``config.json["quantization_config"]`` (plus ``quant_method`` and ``format_version``).
    ``values_dtype`` is the storage dtype of kept values when ``bits == 16``; ``scale_dtype`` that of
    scales and zeros. ``slorb`` is ``None`` or ``{"group_size": k, "train_projection": bool}``.
    """

    n: int = 2
    m: int = 4
    bits: int = 16
    group_size: Optional[int] = 128
    symmetric: bool = True
    values_dtype: str = "float16"
    scale_dtype: str = "float16"
    targets: list[str] = field(default_factory=list)
    slorb: Optional[dict[str, Any]] = None
    format_version: int = FORMAT_VERSION
    expert_targets: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.format_version not in READABLE_FORMAT_VERSIONS:
            raise FormatError(
                f"quantization_config.format_version={self.format_version!r} is not supported by this hf_sparse "
                f"(reads versions {list(READABLE_FORMAT_VERSIONS)}); upgrade hf_sparse or re-export the model."
            )
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 1 <= self.n < self.m):
            raise FormatError(f"quantization_config: invalid N:M pattern n={self.n!r}, m={self.m!r}")
        if self.bits not in (4, 8, 16):
            raise FormatError(f"quantization_config: argument `bits` must be 4, 8 or 16, got {self.bits!r}")
        if self.group_size is not None:
            if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % self.m:
                raise FormatError(
                    f"quantization_config: argument `group_size`={self.group_size!r} must be a positive multiple "
                    f"of m={self.m} (it counts original input channels), or None for per-channel scales"
                )
        dtype_from_name(self.values_dtype)
        dtype_from_name(self.scale_dtype)
        if self.expert_targets and self.format_version < 2:
            raise FormatError(
                f"quantization_config.expert_targets needs format_version >= 2, got {self.format_version!r}"
            )
        if self.slorb is not None and not isinstance(self.slorb.get("group_size"), int):
            raise FormatError(f"quantization_config.slorb must carry an integer group_size, got {self.slorb!r}")

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    @property
    def has_zeros(self) -> bool:
        return self.quantized and not self.symmetric

    @property
    def pos_bits(self) -> int:
        return position_bits(self.m)

    def kept(self, in_features: int) -> int:
        return in_features * self.n // self.m

    def num_groups(self, in_features: int) -> int:
        """Scale groups per row: ``ceil(in / group_size)`` (the last group may be shorter, e.g. 576 = 4x128 + 64)."""
        return 1 if self.group_size is None else ceil_div(in_features, self.group_size)

    def kept_per_group(self, in_features: int) -> int:
        """Kept values per full group (the last group holds the remainder)."""
        return self.kept(in_features) if self.group_size is None else self.group_size * self.n // self.m

    def check_shape(self, in_features: int, module_name: str) -> None:
        """Raise naming the module when its input dimension cannot carry this spec."""
        if in_features % self.m:
            raise FormatError(f"{module_name}: in_features={in_features} is not divisible by m={self.m}")
        kept = self.kept(in_features)
        if (kept * self.pos_bits) % 8:
            raise FormatError(f"{module_name}: {kept} kept positions per row do not fill whole bytes")
        if self.bits == 4 and kept % 2:
            raise FormatError(f"{module_name}: {kept} kept values per row is odd; 4-bit codes pack two per byte")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not out["expert_targets"]:  # dense-expert exports read exactly as before
            out.pop("expert_targets")
        out["quant_method"] = QUANT_METHOD
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NMSpec":
        data = dict(data)
        method = data.pop("quant_method", QUANT_METHOD)
        if str(method) != QUANT_METHOD:
            raise FormatError(f"quantization_config.quant_method={method!r}, expected {QUANT_METHOD!r}")
        if "format_version" not in data:
            raise FormatError("quantization_config has no `format_version`: not an hf_sparse export")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        for key in unknown:
            data.pop(key)
        return cls(**data)


def expected_tensors(spec: NMSpec, out_features: int, in_features: int, has_bias: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Suffix -> (shape, dtype) of every tensor one packed linear stores (bias dtype: the model's, checked loosely)."""
    kept = spec.kept(in_features)
    if spec.bits == 16:
        values = ((out_features, kept), dtype_from_name(spec.values_dtype))
    elif spec.bits == 8:
        values = ((out_features, kept), torch.uint8)
    else:
        values = ((out_features, kept // 2), torch.uint8)
    tensors = {
        VALUES: values,
        POSITIONS: ((out_features, kept * spec.pos_bits // 8), torch.uint8),
    }
    if spec.quantized:
        scale_shape = (out_features, spec.num_groups(in_features))
        tensors[SCALES] = (scale_shape, dtype_from_name(spec.scale_dtype))
        if spec.has_zeros:
            tensors[ZEROS] = (scale_shape, dtype_from_name(spec.scale_dtype))
    if has_bias:
        tensors["bias"] = ((out_features,), torch.float32)
    if spec.slorb is not None:
        k = spec.slorb["group_size"]
        weight_key, projection_key = slorb_keys(spec.format_version)
        tensors[weight_key] = ((out_features, in_features // k), torch.float32)
        if spec.slorb.get("train_projection"):
            tensors[projection_key] = ((in_features // k, in_features), torch.float32)
    return tensors


#: the tensors of one packed fused expert parameter (no bias, no SLoRB: expert biases stay dense)
EXPERT_TENSORS = (VALUES, POSITIONS, SCALES, ZEROS)


def expected_expert_tensors(spec: NMSpec, num_experts: int, out_features: int, in_features: int
                            ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Suffix -> (shape, dtype) of a packed fused expert parameter: a linear's packed tensors, ``[E, ...]``."""
    linear = expected_tensors(spec, out_features, in_features, False)
    return {k: ((num_experts, *shape), dtype) for k, (shape, dtype) in linear.items() if k in EXPERT_TENSORS}


def unpack_expert_weight(values: torch.Tensor, positions: torch.Tensor, scales: Optional[torch.Tensor],
                         zeros: Optional[torch.Tensor], spec: NMSpec, dtype: torch.dtype = torch.float32
                         ) -> torch.Tensor:
    """The dense ``[E, out, in]`` N:M expert weights, exactly dequantized (each expert as :func:`unpack_weight`)."""
    experts, rows = values.shape[:2]
    flat = [None if t is None else t.reshape(experts * rows, *t.shape[2:]) for t in (values, positions, scales, zeros)]
    return unpack_weight(*flat, spec, dtype).reshape(experts, rows, -1)


def slorb_keys(format_version: int = FORMAT_VERSION) -> tuple[str, str]:
    """The (weight, projection) suffixes of a SLoRB branch as files of ``format_version`` store them."""
    if format_version == 1:
        return tuple(LEGACY_SLORB_KEYS)  # type: ignore[return-value]
    return SLORB_WEIGHT, SLORB_PROJECTION


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes -> stored ``nm_values`` (4-bit: two per byte, low nibble = even index)."""
    return pack_bits(codes, 4) if bits == 4 else codes.to(torch.uint8)


def unpack_codes(stored: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_bits(stored, 4) if bits == 4 else stored


def dequantize_values(
    values: torch.Tensor,
    scales: Optional[torch.Tensor],
    zeros: Optional[torch.Tensor],
    spec: NMSpec,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Kept values ``[out, kept]`` as floats: ``(code - zero) * scale`` per group (bits=16: a cast).

    Computed in float32 then cast, so the writer's fake quantization and the loader agree bit for bit.
    """
    if spec.bits == 16:
        return values.to(dtype)
    codes = unpack_codes(values, spec.bits)
    rows, kept = codes.shape
    per_group = kept if spec.group_size is None else spec.group_size * spec.n // spec.m
    out = torch.empty(rows, kept, dtype=dtype, device=codes.device)
    # per group by broadcasting (no repeat_interleave copies of scales/zeros); the same float32 ops per element
    full = kept // per_group * per_group
    for start, stop in ((0, full), (full, kept)):
        if stop == start:
            continue
        width = per_group if stop - start >= per_group else stop - start  # the last group may be shorter
        g0, g1 = start // per_group, -(-stop // per_group)
        scale = scales[:, g0:g1].to(torch.float32).unsqueeze(-1)
        zero = float(2 ** (spec.bits - 1)) if zeros is None else zeros[:, g0:g1].to(torch.float32).unsqueeze(-1)
        block = codes[:, start:stop].reshape(rows, g1 - g0, width).to(torch.float32)
        out[:, start:stop].view(rows, g1 - g0, width).copy_((block - zero) * scale)
    return out


#: kept values per chunk of :func:`unpack_weight`: its float32/int64 temporaries stay ~8-24 MB; not smaller, because
#: every op is an OpenMP region, and on a loaded machine each region can wait a scheduler tick for its threads
UNPACK_CHUNK = 1 << 20


def unpack_positions(positions: torch.Tensor, spec: NMSpec, kept: int) -> torch.Tensor:
    return unpack_bits(positions, spec.pos_bits)[:, :kept]


def unpack_weight(
    values: torch.Tensor,
    positions: torch.Tensor,
    scales: Optional[torch.Tensor],
    zeros: Optional[torch.Tensor],
    spec: NMSpec,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The dense ``[out, in]`` N:M weight (zeros at pruned places), exactly dequantized.

    In row chunks (dequantize, then :func:`hf_sparse.sparsity.packing.scatter_nm`), bit-exact with the plain
    ``repeat_interleave`` + ``scatter_`` formulation and ~5x faster (CPU prefill re-dequantizes on every call).
    """
    rows = values.shape[0]
    kept = values.shape[1] * (2 if spec.bits == 4 else 1)
    dense = torch.empty(rows, kept // spec.n * spec.m, dtype=dtype, device=values.device)
    step = max(1, UNPACK_CHUNK // max(1, kept))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        deq = dequantize_values(values[r0:r1], None if scales is None else scales[r0:r1],
                                None if zeros is None else zeros[r0:r1], spec, dtype)
        scatter_nm(deq, unpack_positions(positions[r0:r1], spec, kept), spec.n, spec.m, out=dense[r0:r1])
    return dense


def positions_valid(positions: torch.Tensor, spec: NMSpec, kept: int) -> bool:
    """True when every group's positions are strictly increasing and < M (what compress_nm writes)."""
    pos = unpack_positions(positions, spec, kept).reshape(positions.shape[0], -1, spec.n).to(torch.int16)
    if bool((pos >= spec.m).any()):
        return False
    return spec.n == 1 or bool((pos[..., 1:] > pos[..., :-1]).all())


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def packed_bytes(spec: NMSpec, out_features: int, in_features: int) -> int:
    """Bytes one packed weight takes on disk (without bias/SLoRB): used by benchmarks and docs."""
    total = 0
    for suffix, (shape, dtype) in expected_tensors(spec, out_features, in_features, False).items():
        if canonical_slorb_suffix(suffix) is not None:
            continue
        total += math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return total
