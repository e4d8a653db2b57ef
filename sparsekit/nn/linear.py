"""SparseLinear: a drop-in, inference-oriented replacement for :class:`torch.nn.Linear`."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from sparsekit import ops
from sparsekit.formats import BSRMatrix, CSRMatrix

__all__ = ["SparseLinear", "FusedActivation", "FORMATS", "heuristic_choice",
           "DEFAULT_BLOCKSIZES"]

#: Storage formats SparseLinear understands.
FORMATS = ("csr", "bsr")

#: Candidate BSR block shapes of the format heuristic and of ``sparsify`` tuning.
DEFAULT_BLOCKSIZES: tuple[tuple[int, int], ...] = ((4, 4), (8, 8), (16, 16), (1, 8), (1, 16))
#: Largest BSR fill ratio (stored entries / true nonzeros) considered by default.
DEFAULT_MAX_FILL = 1.5

_BUFFERS = ("weight_indptr", "weight_indices", "weight_values")

# module -> its CSRMatrix/BSRMatrix view of the buffers. Kept outside the module's __dict__ so
# deepcopy/pickle-free state handling never copies backend caches; dies with the module.
_MODULE_MATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def linear_from_weight(weight_2d: Tensor, bias: Tensor | None) -> nn.Linear:
    """An nn.Linear holding a copy of an ``(out, K)`` weight and bias (the dense form of a
    transformers Conv1D or an attention projection)."""
    lin = nn.Linear(weight_2d.shape[1], weight_2d.shape[0], bias=bias is not None,
                    device=weight_2d.device, dtype=weight_2d.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight_2d)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def block_fill(mask: Tensor, blocksize: tuple[int, int]) -> tuple[int, int]:
    """Return ``(nnz_blocks, nnz)`` of a boolean ``(M, K)`` mask tiled with ``blocksize``.

    ``nnz_blocks * r * c / nnz`` is the fill ratio of BSR storage (1.0 = blocks fully dense).
    O(M*K).
    """
    r, c = blocksize
    m, k = mask.shape
    mb, kb = -(-m // r), -(-k // c)
    padded = torch.zeros((mb * r, kb * c), dtype=torch.bool, device=mask.device)
    padded[:m, :k] = mask
    blocks = padded.reshape(mb, r, kb, c).any(dim=3).any(dim=1)
    return int(blocks.sum()), int(mask.sum())


def heuristic_choice(
    mask: Tensor,
    formats: Sequence[str] = FORMATS,
    blocksizes: Sequence[tuple[int, int]] = DEFAULT_BLOCKSIZES,
    max_fill: float = DEFAULT_MAX_FILL,
    *,
    allow_dense: bool = True,
) -> tuple[str, tuple[int, int] | None, str]:
    """The one measurement-free format rule: ``(format, blocksize, reason)``.

    Used by ``SparseLinear.from_dense(format="auto")`` (``allow_dense=False``: the layer is
    sparse by construction) and ``sparsify(tune=False)``.

    * BSR with the largest-area candidate block (area > 1) whose fill ratio (stored entries /
      true nonzeros) is at most ``max_fill`` and whose *block* density (stored entries / M*K)
      is at most 0.5: blocks amortise one index over r*c values and vectorise along c;
    * else CSR if the density is at most 0.3 (below ~30 % nonzeros a CSR kernel reading
      6 bytes per nonzero -- bf16/fp32 value + uint16 index -- moves clearly less memory than
      the dense weight, which dominates batch-1 latency), or if dense is not allowed;
    * else dense.
    """
    m, k = mask.shape
    nnz = int(mask.sum())
    density = nnz / float(m * k) if m * k else 0.0
    if "bsr" in formats and nnz:
        best = None
        for bs in blocksizes:
            area = bs[0] * bs[1]
            nnzb, _ = block_fill(mask, bs)
            if (area > 1 and nnzb * area <= max_fill * nnz and nnzb * area <= 0.5 * m * k
                    and (best is None or area > best[0])):
                best = (area, tuple(bs))
        if best is not None:
            return "bsr", best[1], "heuristic: blocky pattern"
    if "csr" in formats and (density <= 0.3 or not allow_dense):
        return "csr", None, "heuristic: density <= 0.3" if density <= 0.3 else "heuristic: csr"
    if not allow_dense:
        raise ValueError(f"formats: expected 'csr' among {tuple(formats)} when dense is not "
                         "allowed and the pattern is not blocky")
    return "dense", None, "heuristic: too dense"


class SparseLinear(nn.Module):
    r"""Linear layer ``y = x W^T + b`` with a frozen CSR or BSR weight.

    Same forward contract as :class:`torch.nn.Linear`: ``x`` of shape ``(*, in_features)``,
    output ``(*, out_features)`` in ``x``'s dtype (accumulation in fp32); ``x`` and ``bias``
    follow the same dtype rules as :func:`sparsekit.linear` (float64 ``x`` raises
    ``TypeError``: convert explicitly). The forward pass goes
    through the ``sparsekit::csr_linear`` / ``sparsekit::bsr_linear`` custom ops, so the module
    works under ``torch.compile(fullgraph=True)`` and ``torch.export``.

    The compressed weight is stored as **buffers** (``weight_indptr``, ``weight_indices``,
    ``weight_values`` plus the int64 ``weight_meta = [out_features, in_features, r, c]``, with
    ``r = c = 0`` for CSR): it is not trained. Gradients flow to the input (via the sparse
    transpose, computed lazily and cached) and to ``bias`` if it requires grad.

    Parameters
    ----------
    weight : CSRMatrix or BSRMatrix
        The sparse weight, shape ``(out_features, in_features)``.
    bias : Tensor or None
        ``(out_features,)`` bias; wrapped in a :class:`~torch.nn.Parameter`.
    backend : str
        Kernel backend name passed to the ops (``"auto"``: cuda for CUDA tensors, then cpp,
        numba, torch).
    activation : {None, "relu"}
        Fused activation: the layer computes ``relu(x W^T + b)`` (the C++ kernels apply it to
        each output before storing it). :func:`sparsekit.sparsify` sets it when an ``nn.ReLU``
        follows the layer in an ``nn.Sequential`` (and puts a :class:`FusedActivation` in the
        ReLU's place); :meth:`to_linear` returns the linear part only.

    Attributes
    ----------
    in_features, out_features : int
    format : str
        ``"csr"`` or ``"bsr"``.
    blocksize : tuple of int or None
        BSR block shape ``(r, c)``; None for CSR.

    Examples
    --------
    >>> lin = torch.nn.Linear(64, 32)
    >>> sl = SparseLinear.from_dense(lin, format="csr")
    >>> sl(torch.randn(4, 64)).shape
    torch.Size([4, 32])
    """

    weight_indptr: Tensor
    weight_indices: Tensor
    weight_values: Tensor
    weight_meta: Tensor
    # (indptr, indices, values, their version counters, matrix): the state the eager fast path
    # of forward() checks before calling the matrix's launcher. Set in the instance __dict__
    # by the general path; never pickled or deep-copied (the launcher holds C++ objects).
    _fast: tuple | None = None

    # the kernels' code of `activation` (ops.activation_code), read by forward()'s fast path
    _act: int = 0

    def __init__(self, weight: Any, bias: Tensor | None = None, *, backend: str = "auto",
                 activation: str | None = None) -> None:
        super().__init__()
        self.activation = activation
        if not isinstance(weight, (CSRMatrix, BSRMatrix)):
            raise TypeError(
                f"weight: expected a sparsekit CSRMatrix or BSRMatrix, got {type(weight).__name__}"
                " (use SparseLinear.from_dense(nn.Linear) for dense weights)"
            )
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
        from sparsekit.kernels import BACKEND_NAMES

        if backend != "auto" and backend not in BACKEND_NAMES:
            raise ValueError(
                f"backend: expected 'auto' or one of {', '.join(map(repr, BACKEND_NAMES))}, "
                f"got {backend!r}"
            )
        self.backend = backend
        self._set_matrix(weight)
        if bias is not None:
            if not isinstance(bias, Tensor):
                raise TypeError(f"bias: expected a Tensor or None, got {type(bias).__name__}")
            if bias.shape != (self.out_features,):
                raise ValueError(
                    f"bias: expected shape ({self.out_features},), got {tuple(bias.shape)}"
                )
            if bias.dtype not in ops.FLOAT_DTYPES:
                raise TypeError(
                    f"bias: expected dtype float32, bfloat16 or float16, got {bias.dtype}"
                )
            if bias.device != self.weight_values.device:
                raise ValueError(
                    f"bias: expected device {self.weight_values.device}, got {bias.device}"
                )
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        else:
            self.register_parameter("bias", None)

    @property
    def activation(self) -> str | None:
        """The fused activation (None or ``"relu"``), applied after the bias."""
        return self.__dict__.get("_activation")

    @activation.setter
    def activation(self, value: str | None) -> None:
        self.__dict__["_act"] = ops.activation_code(value)  # validates
        self.__dict__["_activation"] = value

    # ------------------------------------------------------------------ construction
    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_fast", None)
        return state

    def _set_matrix(self, mat: Any) -> None:
        self.__dict__.pop("_fast", None)
        m, k = (int(s) for s in mat.shape)
        if isinstance(mat, BSRMatrix):
            r, c = (int(b) for b in mat.blocksize)
            self.format, self.blocksize = "bsr", (r, c)
        else:
            r = c = 0
            self.format, self.blocksize = "csr", None
        self.out_features, self.in_features = m, k
        dev = mat.values.device
        # Buffers are (re)registered so a new nnz replaces the old storage wholesale.
        self.register_buffer("weight_indptr", mat.indptr)
        self.register_buffer("weight_indices", mat.indices)
        self.register_buffer("weight_values", mat.values)
        self.register_buffer(
            "weight_meta", torch.tensor([m, k, r, c], dtype=torch.int64, device=dev)
        )
        # int8 values: per-row fp32 scales travel as one more buffer (only then, so float
        # models keep their state_dict keys).
        if mat.scales is not None:
            self.register_buffer("weight_scales", mat.scales)
        else:
            self._buffers.pop("weight_scales", None)
        self.quantization = mat.quantization

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        format: str = "auto",
        blocksize: tuple[int, int] | None = None,
        value_dtype: torch.dtype | None = None,
        backend: str = "auto",
        index_encoding: str | None = None,
        activation: str | None = None,
    ) -> SparseLinear:
        """Build from a (pruned) :class:`torch.nn.Linear`; exact zeros are dropped.

        Parameters
        ----------
        linear : nn.Linear
            Source layer; its weight is read, not modified.
        format : {"auto", "csr", "bsr"}
            ``"auto"`` uses :func:`heuristic_choice` (BSR when blocks are nearly full).
        blocksize : (int, int), optional
            BSR block shape; with ``format="bsr"`` and no blocksize, the heuristic's best block
            (or ``(4, 4)``) is used.
        value_dtype : torch.dtype, optional
            float32, bfloat16 or float16; default: the weight's dtype if supported, else float32.
            torch.int8 stores int8 values with per-output-row fp32 scales (weight-only
            quantization; activations stay float); ``quantization`` then reports the error.
        backend : str
            Kernel backend (see class docs).
        index_encoding : {"plain", "delta8", "auto"}, optional
            Column index coding (see :meth:`sparsekit.CSRMatrix.from_dense`); default
            ``"plain"``.
        activation : {None, "relu"}
            Fused activation (see the class docs).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected torch.nn.Linear, got {type(linear).__name__}")
        if format not in ("auto", *FORMATS):
            raise ValueError(f"format: expected one of 'auto', 'csr', 'bsr', got {format!r}")
        w = linear.weight.detach()
        if value_dtype is None:
            value_dtype = w.dtype if w.dtype in ops.FLOAT_DTYPES else torch.float32
        if value_dtype not in (*ops.FLOAT_DTYPES, torch.int8):
            raise TypeError(
                f"value_dtype: expected one of float32, bfloat16, float16, int8, got {value_dtype}"
            )
        if blocksize is not None:
            if format == "csr":
                raise ValueError("blocksize: only valid with format='bsr' or 'auto', got CSR")
            format = "bsr"
        if format == "auto":
            format, blocksize, _ = heuristic_choice(w != 0, allow_dense=False)
        elif format == "bsr" and blocksize is None:
            fmt, bs, _ = heuristic_choice(w != 0, allow_dense=False)
            blocksize = bs if fmt == "bsr" else (4, 4)
        if format == "csr":
            mat = CSRMatrix.from_dense(w, value_dtype=value_dtype, index_encoding=index_encoding)
        else:
            mat = BSRMatrix.from_dense(w, blocksize=tuple(blocksize), value_dtype=value_dtype,
                                       index_encoding=index_encoding)
        bias = None if linear.bias is None else linear.bias.detach()
        if bias is not None and bias.dtype not in ops.FLOAT_DTYPES:
            bias = bias.float()  # e.g. a float64 nn.Linear: its weight is stored as fp32 too
        out = cls(mat, bias, backend=backend, activation=activation)
        if out.bias is not None:
            out.bias.requires_grad_(linear.bias.requires_grad)
        return out

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        format: str = "csr",
        blocksize: tuple[int, int] | None = None,
        value_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        backend: str = "auto",
    ) -> SparseLinear:
        """An all-zero (nnz = 0) layer of the given shape, e.g. as a ``load_state_dict`` target.

        ``load_state_dict`` replaces the compressed buffers wholesale (any nnz, CSR or BSR).
        """
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        w = torch.zeros((out_features, in_features), dtype=value_dtype, device=device)
        lin = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=value_dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if lin.bias is not None:
                lin.bias.zero_()
        return cls.from_dense(
            lin, format=format, blocksize=blocksize, value_dtype=value_dtype, backend=backend
        )

    # ------------------------------------------------------------------ inspection
    def _registered_matrix(self):
        """This module's matrix object over its current buffers, registered with the ops so
        backend caches persist across forward calls (rebuilt when buffers are replaced,
        invalidated when they are modified in place)."""
        b = self._buffers  # direct dict access: Module.__getattr__ costs ~1 us per lookup
        ip, ix, v = b["weight_indptr"], b["weight_indices"], b["weight_values"]
        mat = _MODULE_MATS.get(self)
        if mat is None or mat.values is not v or mat.indices is not ix or mat.indptr is not ip:
            mat = ops.matrix_from_parts(
                ip, ix, v, (self.out_features, self.in_features), self.blocksize
            )
            ops.register_matrix(mat)
            _MODULE_MATS[self] = mat
        else:
            mat.cache_sync()
        sc = b.get("weight_scales")
        if sc is not mat.scales:
            mat.cache_invalidate()
            mat._set_compression(sc, self.quantization)
        return mat

    @property
    def matrix(self):
        """The weight as a CSRMatrix / BSRMatrix sharing this module's buffers (no copy)."""
        return self._registered_matrix()

    @property
    def weight(self) -> Tensor:
        """The dense ``(out_features, in_features)`` weight, **materialised** on every access.

        For inspection and tests only: it allocates ``out_features * in_features`` values.
        """
        return self.matrix.to_dense()

    @property
    def nnz(self) -> int:
        """Stored entries (CSR) / nonzero values inside the stored blocks (BSR; the zero fill
        of partially empty blocks is excluded, like ``BSRMatrix.nnz``)."""
        if "weight_scales" in self._buffers or self.weight_indices.dtype == torch.uint8:
            return self.matrix.nnz
        if self.blocksize is None:
            return int(self.weight_values.numel())
        return int(torch.count_nonzero(self.weight_values))

    @property
    def density(self) -> float:
        """``nnz / (out_features * in_features)``."""
        return self.nnz / float(self.out_features * self.in_features)

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed weight (indptr + indices + values; bias excluded)."""
        return sum(t.numel() * t.element_size() for t in self._weight_tensors())

    def _weight_tensors(self) -> tuple[Tensor, ...]:
        sc = self._buffers.get("weight_scales")
        base = (self.weight_indptr, self.weight_indices, self.weight_values)
        return base if sc is None else (*base, sc)

    def extra_repr(self) -> str:
        bs = f", blocksize={self.blocksize}" if self.blocksize is not None else ""
        dt = str(self.weight_values.dtype).replace("torch.", "")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.format}{bs}, "
            f"density={self.density:.4f}, value_dtype={dt}, bytes={self.nbytes}"
            + ("" if self.activation is None else f", activation={self.activation}")
        )

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():
            # Eager fast path: the buffers are the ones the launcher was built for and were
            # not modified in place, plain tensor, no tracing mode, no autograd graph needed.
            # The launcher returns None for any argument it does not take as is; the general
            # path below then checks (and raises) exactly as on the first call.
            st = self._fast
            if st is not None and type(x) is Tensor:
                b = self._buffers
                ip, ix, v, versions, mat = st
                if (b["weight_values"] is v and b["weight_indices"] is ix
                        and b["weight_indptr"] is ip
                        and (versions is None
                             or (ip._version, ix._version, v._version) == versions)
                        and "weight_scales" not in b and self.backend == "auto"
                        and _current_dispatch_mode() is None):
                    bias = self._parameters["bias"]
                    if not torch.is_grad_enabled() or not (
                            x.requires_grad or (bias is not None and bias.requires_grad)):
                        launch = mat.cache_get(ops.LAUNCHER_KEY)
                        if launch is not None:
                            y = launch(x, bias, self._act)
                            if y is not None:
                                return y
        b = self._buffers
        if "weight_scales" in b or b["weight_indices"].dtype == torch.uint8:
            # int8 values / uint8 gaps: an inference-only weight (no gradient to x)
            bias = self._parameters["bias"]
            bias = None if bias is None else bias.detach()
            if not torch.compiler.is_compiling() and _current_dispatch_mode() is None:
                return ops.linear_matrix(x, self._registered_matrix(), bias, self.backend,
                                         self._act)
            return self._activate(ops.linear_compressed_op(
                x.detach(), b["weight_indptr"], b["weight_indices"], b["weight_values"],
                b.get("weight_scales"), bias, self.out_features, self.in_features,
                self.blocksize, self.backend))
        if not torch.compiler.is_compiling():
            mat = self._registered_matrix()  # keeps backend caches warm in eager mode
            bias = self._parameters["bias"]
            if type(x) is Tensor and _current_dispatch_mode() is None and (
                not torch.is_grad_enabled()
                or not (x.requires_grad or (bias is not None and bias.requires_grad))
            ):
                # Plain eager inference (no autograd, no tracing mode, no tensor subclass):
                # call the kernels directly. The dispatcher + autograd wrapper of the custom
                # op cost tens of microseconds per layer -- the whole product at batch 1.
                y = ops.linear_matrix(x, mat, bias, self.backend, self._act)
                if self.backend == "auto":
                    self._enable_fast_path(mat)
                return y
        if self.blocksize is None:
            return self._activate(torch.ops.sparsekit.csr_linear(
                x, self.weight_indptr, self.weight_indices, self.weight_values, self.bias,
                self.out_features, self.in_features, self.backend,
            ))
        r, c = self.blocksize
        return self._activate(torch.ops.sparsekit.bsr_linear(
            x, self.weight_indptr, self.weight_indices, self.weight_values, self.bias,
            self.out_features, self.in_features, r, c, self.backend,
        ))

    def _activate(self, y: Tensor) -> Tensor:
        # the ops' path (autograd, tracing): the activation as its own differentiable op
        return torch.relu(y) if self._act else y

    def _enable_fast_path(self, mat) -> None:
        """Remember ``mat`` for forward()'s fast path once its launcher exists (float values).
        In-place edits are noticed by the buffers' version counters. Inference tensors have
        none (versions None): as on the general path (``cache_sync``), edits to them need
        ``matrix.cache_invalidate()``, which drops the launcher and so the fast path."""
        if ops.fast_launcher(mat) is None or "weight_scales" in self._buffers:
            return
        b = self._buffers
        ip, ix, v = b["weight_indptr"], b["weight_indices"], b["weight_values"]
        if not (mat.indptr is ip and mat.indices is ix and mat.values is v):
            return
        if ip.is_inference() and ix.is_inference() and v.is_inference():
            versions = None
        else:
            try:
                versions = (ip._version, ix._version, v._version)
            except RuntimeError:  # some, not all, inference tensors
                return
        self.__dict__["_fast"] = (ip, ix, v, versions, mat)

    def to_linear(self) -> nn.Linear:
        """A :class:`torch.nn.Linear` with the exact dense weight (the linear part only: a fused
        :attr:`activation` is not part of it; :func:`sparsekit.densify` restores its module).

        The weight takes the bias's dtype when there is a bias (e.g. fp32 for a layer built
        with ``value_dtype=torch.bfloat16`` from an fp32 ``nn.Linear``: widening is exact and
        keeps weight and bias consistent for ``F.linear``), else the values' dtype.
        """
        w = self.weight
        dt = w.dtype if self.bias is None else self.bias.dtype
        w = w.to(dt)
        lin = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device=w.device, dtype=dt,
        )
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias = nn.Parameter(
                    self.bias.detach().clone(), requires_grad=self.bias.requires_grad
                )
        return lin

    # ------------------------------------------------------------------ device/dtype moves
    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype)/half()/bfloat16() already skip integer tensors, but a custom
        # fn may not: index buffers only ever follow the device, never the dtype. Values may
        # only become one of the kernel value dtypes.
        self.__dict__.pop("_fast", None)
        extra = ("weight_scales",) if "weight_scales" in self._buffers else ()
        old = {n: getattr(self, n) for n in (*_BUFFERS, "weight_meta", *extra)}
        super()._apply(fn, recurse)
        for n in ("weight_indptr", "weight_indices", "weight_meta", *extra):
            new = getattr(self, n)
            if new.dtype != old[n].dtype:
                self._buffers[n] = old[n].to(device=new.device)
        vals = self.weight_values
        if vals.dtype not in ops.FLOAT_DTYPES and not (
                vals.dtype == torch.int8 and old["weight_values"].dtype == torch.int8):
            # Undo (keep module consistent) and explain.
            for n in (*_BUFFERS, "weight_meta"):
                self._buffers[n] = old[n]
            raise TypeError(
                f"SparseLinear: values can be float32, bfloat16 or float16, got {vals.dtype} "
                "(from a .to()/.double()-style conversion); convert the rest of the model only, "
                "or call sparsekit.densify first"
            )
        return self

    # ------------------------------------------------------------------ state dict
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ):
        keys = [prefix + n for n in (*_BUFFERS, "weight_meta")]
        present = [k in state_dict for k in keys]
        if all(present):
            try:
                mat = matrix_from_state(
                    state_dict[keys[0]], state_dict[keys[1]], state_dict[keys[2]],
                    state_dict[keys[3]], prefix=prefix,
                    expect_shape=(self.out_features, self.in_features),
                    scales=state_dict.get(prefix + "weight_scales"),
                )
            except (ValueError, TypeError) as e:
                error_msgs.append(str(e))
                mat = None
            if mat is not None:
                dev = self.weight_values.device
                self._set_matrix(mat.to(device=dev))
        # The base class copies parameters (bias) and reports missing/unexpected keys; our
        # buffers now have the incoming sizes, so its per-tensor copy_ is exact.
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
            error_msgs,
        )


class FusedActivation(nn.Module):
    """Stands in an ``nn.Sequential`` where an activation module was fused into the
    :class:`SparseLinear` before it (:func:`sparsekit.sparsify`); passes its input through.

    ``original`` is the activation module it replaced, which :func:`sparsekit.densify` puts
    back. Calling it costs one Python call, not a module call: the point of fusing is to skip
    the activation's call, so ``__call__`` is ``forward`` itself and hooks registered on this
    placeholder do not run (register them on the layer before it).
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        if not isinstance(original, nn.Module):
            raise TypeError(f"original: expected an nn.Module, got {type(original).__name__}")
        self.original = original

    def forward(self, x: Tensor) -> Tensor:
        return x

    def __call__(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return x

    def extra_repr(self) -> str:
        return "fused into the preceding layer"


def fused_placeholder_after(parent: nn.Module, name: str) -> str | None:
    """The name of the :class:`FusedActivation` right after child ``name`` of ``parent`` when
    ``parent`` is a plain ``nn.Sequential`` (where :func:`sparsekit.sparsify` puts it), else
    None."""
    if type(parent) is not nn.Sequential:
        return None
    names = list(parent._modules)
    i = names.index(name) + 1
    if i < len(names) and isinstance(parent._modules[names[i]], FusedActivation):
        return names[i]
    return None


def matrix_from_state(
    indptr: Tensor,
    indices: Tensor,
    values: Tensor,
    meta: Tensor,
    *,
    prefix: str = "",
    expect_shape: tuple[int, int] | None = None,
    scales: Tensor | None = None,
):
    """Validate raw compressed arrays + ``weight_meta`` and build the CSR/BSR matrix.

    Validation (indices in range, monotone indptr, dtypes, lengths) is done by the format
    constructors; this checks the metadata and that it agrees with ``values``.
    """
    name = f"{prefix}weight_meta"
    if not isinstance(meta, Tensor) or meta.dtype != torch.int64 or meta.shape != (4,):
        got = (meta.dtype, tuple(meta.shape)) if isinstance(meta, Tensor) else type(meta).__name__
        raise ValueError(f"{name}: expected an int64 tensor of shape (4,), got {got}")
    m, k, r, c = (int(v) for v in meta.tolist())
    if m <= 0 or k <= 0 or r < 0 or c < 0 or (r == 0) != (c == 0):
        raise ValueError(f"{name}: expected [M>0, K>0, r, c] with r=c=0 (CSR) or r,c>0 (BSR), "
                         f"got {[m, k, r, c]}")
    if expect_shape is not None and (m, k) != tuple(expect_shape):
        raise ValueError(
            f"{name}: shape (out_features, in_features) = {(m, k)} does not match the module's "
            f"{tuple(expect_shape)}"
        )
    # int8 values come with ``<prefix>weight_scales``; uint8 indices are delta8 gaps.
    comp: dict = {
        "scales": None if scales is None else scales.cpu(),
        "index_encoding": "delta8" if indices.dtype == torch.uint8 else "plain",
    }
    if values.dtype == torch.int8 and scales is None:
        raise ValueError(f"{prefix}weight_scales: expected float32 per-row scales for int8 "
                         "weight_values, got none")
    if r == 0:
        if values.dim() != 1:
            raise ValueError(f"{prefix}weight_values: expected 1-D values for CSR, got "
                             f"shape {tuple(values.shape)}")
        return CSRMatrix(indptr.cpu(), indices.cpu(), values.cpu(), (m, k), **comp).to(
            device=values.device
        )
    if values.dim() != 3 or tuple(values.shape[1:]) != (r, c):
        raise ValueError(f"{prefix}weight_values: expected shape (nnzb, {r}, {c}) for BSR, got "
                         f"{tuple(values.shape)}")
    return BSRMatrix(indptr.cpu(), indices.cpu(), values.cpu(), (m, k), blocksize=(r, c),
                     **comp).to(device=values.device)
