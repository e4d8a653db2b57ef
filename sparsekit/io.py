"""save / load sparsified models as safetensors files (no pickle, validated on load).

File layout (the `safetensors <https://github.com/huggingface/safetensors>`_ format, written
here without the library so there is no extra runtime dependency)::

    [8 bytes]  little-endian uint64 N = header length
    [N bytes]  UTF-8 JSON header, space-padded to a multiple of 8:
               {"<tensor name>": {"dtype": "F32"|"BF16"|"U16"|..., "shape": [...],
                                  "data_offsets": [begin, end]},     # relative to the data
                ...,
                "__metadata__": {"<str>": "<str>", ...}}
    [...]      raw little-endian tensor bytes, tensors back to back in header order

Tensors: the model's full ``state_dict()`` -- for every :class:`~sparsekit.nn.SparseLinear`
its compressed buffers (``<name>.weight_indptr``, ``.weight_indices``, ``.weight_values``,
``.weight_meta``) and bias, and the dense parameters / persistent buffers of everything else.
A sparsified model's file is therefore about as large as its compressed weights.

``__metadata__`` (string map, as safetensors requires)::

    "format": "pt"
    "sparsekit.file_version": "1"
    "sparsekit.library_version": "<sparsekit __version__>"
    "sparsekit.wrappers": JSON list (optional), one object per module that holds SparseLinear
        children in place of a dense layer: {"name", "type": "SparseConv2d" |
        "SparseMultiheadAttention", "geometry": {...}}; on load into a dense model the
        nn.Conv2d / nn.MultiheadAttention at "name" is first replaced by that wrapper.
    "sparsekit.modules": JSON list, one object per SparseLinear:
        {"name", "format": "csr"|"bsr", "shape": [M, K], "blocksize": [r, c] | null,
         "value_dtype": "float32"|"bfloat16"|"float16"|"int8",
         "index_dtype": "uint16"|"int32"|"uint8" (uint8: 8-bit column gaps, "delta8"),
         "indptr_dtype": "int32"|"int64", "bias": bool,
         "nnz": int (stored values, BSR block padding included)}

Loading validates everything before building anything: header length within the file, JSON
well-formed (no duplicate keys), every entry's dtype allowed, shape non-negative ints, offsets
in range, contiguous, non-overlapping and consistent with dtype * shape, the metadata version
and schema, the metadata agreeing with the tensors, and finally every matrix through the
validating :class:`~sparsekit.CSRMatrix` / :class:`~sparsekit.BSRMatrix` constructors (indices
in range, monotone indptr, ...). Any problem raises :class:`SparsekitFileError` (a
``ValueError``) naming the tensor or field; nothing is ever read out of bounds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["save", "load", "SparsekitFileError", "LoadedFile", "FILE_VERSION"]

#: Version of the sparsekit metadata layout written by :func:`save`.
FILE_VERSION = 1
_MAX_HEADER = 100 * 1024 * 1024  # same cap as the safetensors library

# safetensors dtype code <-> torch dtype (those sparsekit writes or may meet in a state_dict)
_ST_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}
_DTYPE_NAMES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "uint16": torch.uint16,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int64": torch.int64,
}
_SPARSE_KEYS = ("weight_indptr", "weight_indices", "weight_values", "weight_meta")


class SparsekitFileError(ValueError):
    """A sparsekit / safetensors file is malformed, truncated, tampered with or incompatible."""


@dataclasses.dataclass
class LoadedFile:
    """What :func:`load` returns without a model.

    Attributes
    ----------
    modules : dict[str, SparseLinear]
        One validated SparseLinear per sparse layer, keyed by its qualified module name.
    state_dict : dict[str, Tensor]
        All other tensors (dense parameters and buffers of the rest of the model).
    metadata : dict[str, str]
        The raw ``__metadata__`` string map.
    """

    modules: dict[str, nn.Module]
    state_dict: dict[str, Tensor]
    metadata: dict[str, str]


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    # A byte view works for every dtype (bf16/uint16 included) without numpy dtype support.
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def save(
    model: nn.Module, path: str | os.PathLike[str], *, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``model`` (sparsified or not) to a safetensors file at ``path``.

    Parameters
    ----------
    model : nn.Module
        Its ``state_dict()`` is written; SparseLinear layers are described in the metadata.
    path : str or os.PathLike
        Destination; written to a temporary file in the same directory, then atomically
        renamed.
    metadata : mapping of str to str, optional
        Extra user metadata (keys must not start with ``"sparsekit."``).

    Notes
    -----
    Tensors that share storage (tied weights) are written once per name. Requires a
    little-endian host (as does the safetensors format).
    """
    from sparsekit.nn.linear import SparseLinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if sys.byteorder != "little":  # pragma: no cover
        raise RuntimeError("sparsekit.save: big-endian hosts are not supported")
    user_meta = dict(metadata or {})
    for k, v in user_meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata: expected str -> str, got {k!r}: {type(v).__name__}")
        if k.startswith("sparsekit.") or k == "format":
            raise ValueError(f"metadata: key {k!r} is reserved")
    try:
        from sparsekit import __version__ as libv
    except Exception:
        libv = "unknown"

    from sparsekit.nn.attention import SparseMultiheadAttention
    from sparsekit.nn.conv import SparseConv2d

    wrappers = [{"name": name, "type": type(mod).__name__, "geometry": mod.geometry()}
                for name, mod in model.named_modules()
                if isinstance(mod, (SparseConv2d, SparseMultiheadAttention))]
    modules = []
    for name, mod in model.named_modules():
        if isinstance(mod, SparseLinear):
            modules.append({
                "name": name,
                "format": mod.format,
                "shape": [mod.out_features, mod.in_features],
                "blocksize": None if mod.blocksize is None else list(mod.blocksize),
                "value_dtype": _dtype_name(mod.weight_values.dtype),
                "index_dtype": _dtype_name(mod.weight_indices.dtype),
                "indptr_dtype": _dtype_name(mod.weight_indptr.dtype),
                "bias": mod.bias is not None,
                "nnz": int(mod.weight_values.numel()),
            })
    state = model.state_dict()
    header: dict[str, Any] = {}
    blobs: list[bytes] = []
    offset = 0
    for name, t in state.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"state_dict[{name!r}]: expected a Tensor, got {type(t).__name__}")
        if t.dtype not in _TORCH_TO_ST:
            raise TypeError(f"state_dict[{name!r}]: dtype {t.dtype} cannot be stored")
        b = _tensor_bytes(t)
        header[name] = {
            "dtype": _TORCH_TO_ST[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(b)],
        }
        blobs.append(b)
        offset += len(b)
    header["__metadata__"] = {
        **user_meta,
        "format": "pt",
        "sparsekit.file_version": str(FILE_VERSION),
        "sparsekit.library_version": str(libv),
        "sparsekit.modules": json.dumps(modules, separators=(",", ":")),
    }
    if wrappers:
        header["__metadata__"]["sparsekit.wrappers"] = json.dumps(wrappers,
                                                                  separators=(",", ":"))
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * (-len(hjson) % 8)  # 8-byte alignment of the data, as safetensors does
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".sparsekit-save-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(hjson)))
            f.write(hjson)
            for b in blobs:
                f.write(b)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# load: safetensors container
# --------------------------------------------------------------------------------------------


def _no_dup_pairs(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise SparsekitFileError(f"header: duplicate key {k!r}")
        out[k] = v
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read and validate any safetensors file; returns ``(tensors, metadata)``.

    Tensors are copied into fresh CPU memory. Raises :class:`SparsekitFileError` on any
    inconsistency (see the module docstring).
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise SparsekitFileError(f"path: cannot open {path!r}: {e}") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise SparsekitFileError(
                f"{path}: file is {size} bytes, too short for the 8-byte header length"
            )
        (hlen,) = struct.unpack("<Q", f.read(8))
        if hlen > size - 8:
            raise SparsekitFileError(
                f"header length: {hlen} bytes exceeds the file ({size - 8} bytes after the "
                "length field); truncated or corrupt file"
            )
        if hlen > _MAX_HEADER:
            raise SparsekitFileError(f"header length: {hlen} exceeds the {_MAX_HEADER} cap")
        raw = f.read(hlen)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_dup_pairs)
        except SparsekitFileError:
            raise
        except (UnicodeDecodeError, ValueError) as e:
            raise SparsekitFileError(f"header: not valid UTF-8 JSON ({e})") from e
        if not isinstance(header, dict):
            raise SparsekitFileError(
                f"header: expected a JSON object, got {type(header).__name__}"
            )
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise SparsekitFileError("__metadata__: expected a map of strings to strings")
        data_len = size - 8 - hlen
        entries = []
        for name, ent in header.items():
            where = f"tensor {name!r}"
            if not isinstance(ent, dict) or set(ent) != {"dtype", "shape", "data_offsets"}:
                raise SparsekitFileError(
                    f"{where}: expected an object with keys dtype, shape, data_offsets, got "
                    f"{sorted(ent) if isinstance(ent, dict) else type(ent).__name__}"
                )
            dt = ent["dtype"]
            if dt not in _ST_TO_TORCH:
                raise SparsekitFileError(
                    f"{where}: dtype: expected one of {sorted(_ST_TO_TORCH)}, got {dt!r}"
                )
            shape = ent["shape"]
            if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
                raise SparsekitFileError(
                    f"{where}: shape: expected a list of non-negative ints, got {shape!r}"
                )
            offs = ent["data_offsets"]
            if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
                raise SparsekitFileError(
                    f"{where}: data_offsets: expected [begin, end] ints, got {offs!r}"
                )
            b, e = offs
            if not 0 <= b <= e <= data_len:
                raise SparsekitFileError(
                    f"{where}: data_offsets: expected 0 <= begin <= end <= {data_len} (data "
                    f"section size), got [{b}, {e}]"
                )
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel * _ST_TO_TORCH[dt].itemsize
            if e - b != nbytes:
                raise SparsekitFileError(
                    f"{where}: data_offsets: span {e - b} bytes does not match dtype {dt} x "
                    f"shape {shape} = {nbytes} bytes"
                )
            entries.append((b, e, name, dt, shape))
        entries.sort()
        pos = 0
        for b, e, name, _dt, _shape in entries:
            if b < pos:
                raise SparsekitFileError(
                    f"tensor {name!r}: data_offsets [{b}, {e}] overlap the previous tensor "
                    f"(ends at {pos})"
                )
            if b > pos:
                raise SparsekitFileError(
                    f"tensor {name!r}: data_offsets [{b}, {e}] leave a gap after byte {pos}"
                )
            pos = e
        if pos != data_len:
            raise SparsekitFileError(
                f"data section: tensors cover {pos} bytes but the file holds {data_len}; "
                "trailing or missing data"
            )
        data = f.read(data_len)
        if len(data) != data_len:  # pragma: no cover - file changed while reading
            raise SparsekitFileError(f"{path}: short read ({len(data)} of {data_len} bytes)")
    buf = bytearray(data)
    tensors: dict[str, Tensor] = {}
    for b, e, name, dt, shape in entries:
        tdt = _ST_TO_TORCH[dt]
        if e == b:
            t = torch.empty(shape, dtype=tdt)
        else:
            t = torch.frombuffer(buf, dtype=torch.uint8, offset=b, count=e - b).clone()
            t = t.view(tdt).reshape(shape)
        tensors[name] = t
    return tensors, meta


# --------------------------------------------------------------------------------------------
# load: sparsekit layer
# --------------------------------------------------------------------------------------------


def _parse_modules(meta: dict[str, str]) -> list[dict[str, Any]]:
    ver = meta.get("sparsekit.file_version")
    if ver is None:
        if "sparsekit.modules" in meta:
            raise SparsekitFileError("__metadata__: sparsekit.file_version missing")
        return []  # a plain safetensors state dict: no sparse layers
    if ver != str(FILE_VERSION):
        raise SparsekitFileError(
            f"__metadata__: sparsekit.file_version: expected {FILE_VERSION}, got {ver!r}"
        )
    try:
        mods = json.loads(meta.get("sparsekit.modules", "[]"), object_pairs_hook=_no_dup_pairs)
    except SparsekitFileError:
        raise
    except ValueError as e:
        raise SparsekitFileError(f"__metadata__: sparsekit.modules: invalid JSON ({e})") from e
    if not isinstance(mods, list):
        raise SparsekitFileError("__metadata__: sparsekit.modules: expected a JSON list")
    seen = set()
    required = {
        "name": str, "format": str, "shape": list, "value_dtype": str, "index_dtype": str,
        "indptr_dtype": str, "bias": bool, "nnz": int,
    }
    for i, m in enumerate(mods):
        where = f"sparsekit.modules[{i}]"
        if not isinstance(m, dict):
            raise SparsekitFileError(f"{where}: expected an object, got {type(m).__name__}")
        for k, typ in required.items():
            if k not in m or not isinstance(m[k], typ) or (typ is int and isinstance(m[k], bool)):
                raise SparsekitFileError(
                    f"{where}: field {k!r}: expected {typ.__name__}, got {m.get(k)!r}"
                )
        where = f"sparsekit.modules[{i}] ({m['name']!r})"
        if m["name"] in seen:
            raise SparsekitFileError(f"{where}: duplicate module name")
        seen.add(m["name"])
        if m["format"] not in ("csr", "bsr"):
            raise SparsekitFileError(f"{where}: format: expected 'csr' or 'bsr', got "
                                     f"{m['format']!r}")
        if len(m["shape"]) != 2 or not all(_is_int(s) and s > 0 for s in m["shape"]):
            raise SparsekitFileError(f"{where}: shape: expected [M>0, K>0], got {m['shape']!r}")
        bs = m.get("blocksize")
        if m["format"] == "bsr":
            if not (isinstance(bs, list) and len(bs) == 2 and all(_is_int(v) and v > 0
                                                                   for v in bs)):
                raise SparsekitFileError(f"{where}: blocksize: expected [r>0, c>0], got {bs!r}")
        elif bs is not None:
            raise SparsekitFileError(f"{where}: blocksize: expected null for CSR, got {bs!r}")
        for k, allowed in (
            ("value_dtype", ("float32", "bfloat16", "float16", "int8")),
            ("index_dtype", ("uint16", "int32", "uint8")),
            ("indptr_dtype", ("int32", "int64")),
        ):
            if m[k] not in allowed:
                raise SparsekitFileError(f"{where}: {k}: expected one of {allowed}, got {m[k]!r}")
    return mods


def _build_modules(
    mods: list[dict[str, Any]], tensors: dict[str, Tensor]
) -> dict[str, nn.Module]:
    from sparsekit.nn.linear import SparseLinear, matrix_from_state

    out: dict[str, nn.Module] = {}
    for m in mods:
        name = m["name"]
        pre = f"{name}." if name else ""
        where = f"module {name!r}"
        arrays = {}
        for k in _SPARSE_KEYS:
            if pre + k not in tensors:
                raise SparsekitFileError(f"{where}: tensor {pre + k!r} missing from the file")
            arrays[k] = tensors[pre + k]
        expect = {
            "weight_indptr": _DTYPE_NAMES[m["indptr_dtype"]],
            "weight_indices": _DTYPE_NAMES[m["index_dtype"]],
            "weight_values": _DTYPE_NAMES[m["value_dtype"]],
            "weight_meta": torch.int64,
        }
        for k, dt in expect.items():
            if arrays[k].dtype != dt:
                raise SparsekitFileError(
                    f"tensor {pre + k!r}: dtype: expected {_dtype_name(dt)} (per metadata), "
                    f"got {_dtype_name(arrays[k].dtype)}"
                )
        r, c = m["blocksize"] if m["format"] == "bsr" else (0, 0)
        meta_expect = [*m["shape"], r, c]
        if arrays["weight_meta"].shape != (4,) or arrays["weight_meta"].tolist() != meta_expect:
            raise SparsekitFileError(
                f"tensor {pre}weight_meta: expected {meta_expect} (per metadata), got "
                f"{arrays['weight_meta'].tolist()}"
            )
        if arrays["weight_values"].numel() != m["nnz"]:
            raise SparsekitFileError(
                f"tensor {pre}weight_values: expected nnz = {m['nnz']} entries (per metadata), "
                f"got {arrays['weight_values'].numel()}"
            )
        scales = tensors.get(pre + "weight_scales")
        if (m["value_dtype"] == "int8") != (scales is not None):
            raise SparsekitFileError(
                f"{where}: tensor {pre + 'weight_scales'!r}: expected "
                f"{'float32 per-row scales' if m['value_dtype'] == 'int8' else 'none'} for "
                f"value_dtype {m['value_dtype']!r}, got "
                f"{'none' if scales is None else 'a tensor'}"
            )
        try:
            mat = matrix_from_state(
                arrays["weight_indptr"], arrays["weight_indices"], arrays["weight_values"],
                arrays["weight_meta"], prefix=pre, scales=scales,
            )
        except (ValueError, TypeError) as e:
            raise SparsekitFileError(f"{where}: invalid sparse weight: {e}") from e
        bias = tensors.get(pre + "bias")
        if m["bias"]:
            if bias is None:
                raise SparsekitFileError(f"{where}: tensor {pre + 'bias'!r} missing from the file")
            if tuple(bias.shape) != (m["shape"][0],) or not bias.is_floating_point():
                raise SparsekitFileError(
                    f"tensor {pre}bias: expected a float tensor of shape ({m['shape'][0]},), "
                    f"got {_dtype_name(bias.dtype)} {tuple(bias.shape)}"
                )
        elif bias is not None:
            raise SparsekitFileError(f"{where}: metadata says no bias but {pre}bias is present")
        out[name] = SparseLinear(mat, bias if m["bias"] else None)
    return out


def load(
    path: str | os.PathLike[str], model: nn.Module | None = None, *, strict: bool = True
) -> nn.Module | LoadedFile:
    """Load a file written by :func:`save`.

    Parameters
    ----------
    path : str or os.PathLike
        The safetensors file.
    model : nn.Module, optional
        Target model with the same architecture, dense or already sparsified. Every layer
        stored sparse in the file is (re)installed as a SparseLinear (on the device of the
        module it replaces; values keep the stored dtype); every layer stored dense but
        sparse in ``model`` is turned back into an ``nn.Linear``; then all other
        parameters/buffers are loaded with ``load_state_dict``.
    strict : bool
        With a model: every file tensor must be used and every model tensor provided.

    Returns
    -------
    nn.Module or LoadedFile
        ``model`` (modified in place) if given; otherwise a :class:`LoadedFile` with the
        validated SparseLinear modules (CPU), the remaining tensors and the metadata.

    Raises
    ------
    SparsekitFileError
        Malformed, truncated or tampered file, or a file that does not fit ``model``.
    """
    from sparsekit._layers import is_hf_conv1d
    from sparsekit.nn.linear import SparseLinear

    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module or None, got {type(model).__name__}")
    tensors, meta = read_safetensors(path)
    mods = _parse_modules(meta)
    sparse = _build_modules(mods, tensors)
    used = set()
    for name, mod in sparse.items():
        pre = f"{name}." if name else ""
        used.update(pre + k for k in _SPARSE_KEYS)
        if "weight_scales" in mod._buffers:
            used.add(pre + "weight_scales")
        if mod.bias is not None:
            used.add(pre + "bias")
    if model is None:
        rest = {k: v for k, v in tensors.items() if k not in used}
        return LoadedFile(sparse, rest, dict(meta))

    _install_wrappers(model, _parse_wrappers(meta))
    for name, new in sparse.items():
        if name == "":
            raise SparsekitFileError("module '': a bare SparseLinear file needs model=None")
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise SparsekitFileError(f"module {name!r}: not found in model") from e
        if is_hf_conv1d(old):  # transformers Conv1D: weight (in, out)
            old_shape = (old.weight.shape[1], old.weight.shape[0])
        elif isinstance(old, (nn.Linear, SparseLinear)):
            old_shape = (old.out_features, old.in_features)
        else:
            raise SparsekitFileError(
                f"module {name!r}: expected nn.Linear, transformers Conv1D or SparseLinear in "
                f"model, got {type(old).__name__}"
            )
        if old_shape != (new.out_features, new.in_features):
            raise SparsekitFileError(
                f"module {name!r}: shape (out, in) in file {(new.out_features, new.in_features)}"
                f" does not match the model's {old_shape}"
            )
        ref = old.weight_values if isinstance(old, SparseLinear) else old.weight
        new = new.to(ref.device)
        new.train(old.training)
        new.backend = getattr(old, "backend", new.backend)
        # a fused activation belongs to the model's structure (a FusedActivation stands in
        # the activation's place), not to the file: the installed layer keeps the old one's
        new.activation = old.activation if isinstance(old, SparseLinear) else None
        _set_submodule(model, name, new)
    # layers sparse in the model but dense in the file
    for name, mod in list(model.named_modules()):
        if isinstance(mod, SparseLinear) and name not in sparse:
            pre = f"{name}." if name else ""
            if pre + "weight" in tensors:
                if mod.activation is not None and not _unfuse(model, name):
                    raise SparsekitFileError(
                        f"module {name!r}: dense in the file, but the model's layer has the "
                        f"fused activation {mod.activation!r} and no FusedActivation after it "
                        "to restore; densify the model first")
                _set_submodule(model, name, mod.to_linear())
    rest = {k: v for k, v in tensors.items() if k not in used}
    try:
        missing, unexpected = model.load_state_dict(rest, strict=False)
    except RuntimeError as e:  # size/dtype mismatches in dense tensors
        raise SparsekitFileError(f"file does not match the model: {e}") from e
    missing = [k for k in missing if k not in used]
    if strict and (missing or unexpected):
        raise SparsekitFileError(
            f"file does not match the model: missing tensors {missing[:10]}"
            f"{'...' if len(missing) > 10 else ''}, unexpected tensors {unexpected[:10]}"
            f"{'...' if len(unexpected) > 10 else ''}"
        )
    return model


def _parse_wrappers(meta: dict[str, str]) -> list[dict[str, Any]]:
    raw = meta.get("sparsekit.wrappers")
    if raw is None:
        return []
    try:
        items = json.loads(raw, object_pairs_hook=_no_dup_pairs)
    except SparsekitFileError:
        raise
    except ValueError as e:
        raise SparsekitFileError(f"__metadata__: sparsekit.wrappers: invalid JSON ({e})") from e
    if not isinstance(items, list):
        raise SparsekitFileError("__metadata__: sparsekit.wrappers: expected a JSON list")
    for i, w in enumerate(items):
        where = f"sparsekit.wrappers[{i}]"
        if not (isinstance(w, dict) and isinstance(w.get("name"), str) and w["name"]
                and w.get("type") in ("SparseConv2d", "SparseMultiheadAttention")
                and isinstance(w.get("geometry"), dict)):
            raise SparsekitFileError(f"{where}: expected {{'name': non-empty str, 'type': "
                                     f"'SparseConv2d' | 'SparseMultiheadAttention', 'geometry': "
                                     f"{{...}}}}, got {w!r}")
    return items


def _install_wrappers(model: nn.Module, wrappers: list[dict[str, Any]]) -> None:
    """Replace dense Conv2d / MultiheadAttention modules by the wrappers the file expects."""
    from sparsekit.nn.attention import SparseMultiheadAttention
    from sparsekit.nn.conv import SparseConv2d

    for w in wrappers:
        name, typ = w["name"], w["type"]
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise SparsekitFileError(f"module {name!r}: not found in model") from e
        cls, dense_cls = ((SparseConv2d, nn.Conv2d) if typ == "SparseConv2d"
                          else (SparseMultiheadAttention, nn.MultiheadAttention))
        if isinstance(old, cls):
            new = old
        elif isinstance(old, dense_cls):
            try:
                new = cls.empty_like(old)
            except (ValueError, TypeError) as e:
                raise SparsekitFileError(f"module {name!r}: cannot hold the file's {typ}: {e}"
                                         ) from e
        else:
            raise SparsekitFileError(f"module {name!r}: expected {dense_cls.__name__} or {typ} "
                                     f"in model, got {type(old).__name__}")
        if new.geometry() != w["geometry"]:
            raise SparsekitFileError(f"module {name!r}: geometry in file {w['geometry']} does "
                                     f"not match the model's {new.geometry()}")
        if new is not old:
            _set_submodule(model, name, new)


def _unfuse(model: nn.Module, name: str) -> bool:
    """Puts back the activation module fused into layer ``name`` (the FusedActivation right
    after it in its nn.Sequential); False when there is none."""
    from sparsekit.nn.linear import fused_placeholder_after

    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    slot = fused_placeholder_after(parent, child)
    if slot is None:
        return False
    setattr(parent, slot, parent._modules[slot].original)
    return True


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
