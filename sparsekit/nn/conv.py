"""SparseConv2d: a groups=1 :class:`torch.nn.Conv2d` as a sparse matrix times image patches."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsekit._layers import conv2d_extra_padding
from sparsekit.nn.linear import SparseLinear

__all__ = ["SparseConv2d"]


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_padding_arg(conv: nn.Conv2d) -> Any:
    """``padding`` for an equivalent plain nn.Conv2d, or None when only explicit
    (possibly asymmetric) padding expresses it."""
    if conv2d_extra_padding(conv) == (0, 0, 0, 0):
        return conv.padding
    return None


class SparseConv2d(nn.Module):
    """Drop-in replacement of a ``groups=1``, ``padding_mode='zeros'`` :class:`torch.nn.Conv2d`.

    The weight ``(C_out, C_in, kh, kw)`` is stored as a :class:`SparseLinear` ``linear`` of shape
    ``(C_out, kh * kw * C_in)`` with its columns in ``(kh, kw, C_in)`` order, the order of a
    channels-last patch. The forward pass views the input as NHWC (free for
    ``torch.channels_last`` inputs, one copy for NCHW), gathers the ``kh x kw`` patches with one
    strided copy (none for a 1x1, stride-1 convolution on a channels-last input: the pixels are
    already the rows of the product), multiplies by the sparse weight and returns the
    ``(N, C_out, H_out, W_out)`` result in ``torch.channels_last`` memory format (values equal to
    the dense convolution's). Stride, padding (numbers, ``"same"``, ``"valid"``) and dilation
    are honoured; unbatched ``(C, H, W)`` inputs work as for ``nn.Conv2d``.
    """

    def __init__(self, linear: nn.Module, in_channels: int, out_channels: int,
                 kernel_size: tuple[int, int], stride: tuple[int, int] = (1, 1),
                 padding: tuple[int, int, int, int] = (0, 0, 0, 0),
                 dilation: tuple[int, int] = (1, 1), conv_padding: Any = None) -> None:
        super().__init__()
        kh, kw = kernel_size
        if (linear.out_features, linear.in_features) != (out_channels, kh * kw * in_channels):
            raise ValueError(f"linear: expected shape ({out_channels}, {kh * kw * in_channels}), "
                             f"got ({linear.out_features}, {linear.in_features})")
        self.linear = linear
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = (kh, kw), tuple(stride), tuple(dilation)
        #: (top, bottom, left, right) zero padding
        self.padding = tuple(padding)
        #: the ``padding`` argument of an equivalent ``nn.Conv2d`` (for :meth:`to_conv`), None
        #: when the padding is asymmetric and needs an explicit pad
        if conv_padding is None and padding[0] == padding[1] and padding[2] == padding[3]:
            conv_padding = (padding[0], padding[2])
        self.conv_padding = conv_padding

    @staticmethod
    def padding_of(conv: nn.Conv2d) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)`` zero padding of ``conv`` (strings resolved, a fixed
        ``static_padding`` of a TensorFlow-"SAME" subclass added)."""
        extra = conv2d_extra_padding(conv)
        if extra is None:
            raise ValueError(f"conv: {type(conv).__name__} overrides nn.Conv2d.forward; only "
                             f"plain Conv2d and a fixed static_padding are understood")
        kh, kw = conv.kernel_size
        if isinstance(conv.padding, str):
            own = [0, 0, 0, 0]
            if conv.padding == "same":
                own = []
                for d, k in zip(conv.dilation, (kh, kw)):
                    total = d * (k - 1)
                    own += [total // 2, total - total // 2]
        else:
            ph, pw = _pair(conv.padding)
            own = [ph, ph, pw, pw]
        return tuple(a + b for a, b in zip(own, extra))

    @classmethod
    def from_module(cls, conv: nn.Conv2d, format: str = "csr",
                    blocksize: tuple[int, int] | None = None,
                    value_dtype: torch.dtype | None = None,
                    backend: str = "auto") -> SparseConv2d:
        """Build from a (pruned) ``nn.Conv2d`` with ``groups=1``; exact zeros are dropped."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv: expected torch.nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"conv: expected groups=1, got groups={conv.groups} (depthwise and "
                             f"grouped convolutions stay dense)")
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv: expected padding_mode='zeros', got {conv.padding_mode!r}")
        w = conv.weight.detach()
        cout, cin, kh, kw = w.shape
        lin = nn.Linear(kh * kw * cin, cout, bias=conv.bias is not None, device=w.device,
                        dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w.permute(0, 2, 3, 1).reshape(cout, -1))
            if conv.bias is not None:
                lin.bias.copy_(conv.bias.detach())
        sl = SparseLinear.from_dense(lin, format=format, blocksize=blocksize,
                                     value_dtype=value_dtype, backend=backend)
        return cls(sl, cin, cout, (kh, kw), _pair(conv.stride), cls.padding_of(conv),
                   _pair(conv.dilation), _conv_padding_arg(conv)).train(conv.training)

    @classmethod
    def empty_like(cls, conv: nn.Conv2d, *, value_dtype: torch.dtype | None = None,
                   backend: str = "auto") -> SparseConv2d:
        """An all-zero SparseConv2d with ``conv``'s geometry (a ``load_state_dict`` target)."""
        cout, cin, kh, kw = conv.weight.shape
        lin = SparseLinear.empty(kh * kw * cin, cout, bias=conv.bias is not None,
                                 value_dtype=value_dtype or conv.weight.dtype,
                                 device=conv.weight.device, backend=backend)
        return cls(lin, cin, cout, (kh, kw), _pair(conv.stride), cls.padding_of(conv),
                   _pair(conv.dilation), _conv_padding_arg(conv)).train(conv.training)

    def to_conv(self) -> nn.Module:
        """The equivalent dense ``nn.Conv2d`` (exact weights; dtype as SparseLinear.to_linear);
        preceded by an ``nn.ZeroPad2d`` in an ``nn.Sequential`` when the padding is
        asymmetric."""
        lin = self.linear.to_linear() if isinstance(self.linear, SparseLinear) else self.linear
        w = lin.weight.detach()
        kh, kw = self.kernel_size
        conv = nn.Conv2d(self.in_channels, self.out_channels, (kh, kw), self.stride,
                         0 if self.conv_padding is None else self.conv_padding, self.dilation,
                         bias=lin.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w.reshape(self.out_channels, kh, kw, self.in_channels)
                              .permute(0, 3, 1, 2))
            if lin.bias is not None:
                conv.bias.copy_(lin.bias.detach())
        if self.conv_padding is None:
            t, b, left, right = self.padding
            return nn.Sequential(nn.ZeroPad2d((left, right, t, b)), conv).train(self.training)
        return conv.train(self.training)

    def geometry(self) -> dict[str, Any]:
        """JSON-able shape parameters (written by :func:`sparsekit.save`)."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation)}

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}")

    def patches(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """``(N * H_out * W_out, kh * kw * C_in)`` patch rows of a 4-D input and ``(N, Ho, Wo)``."""
        n, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"input: expected {self.in_channels} channels (dim 1), got shape "
                             f"{tuple(x.shape)}")
        kh, kw = self.kernel_size
        sh, sw = self.stride
        dh, dw = self.dilation
        pt, pb, pl, pr = self.padding
        xh = x.permute(0, 2, 3, 1)  # NHWC view: contiguous for channels_last inputs
        if (kh, kw, sh, sw, pt, pb, pl, pr) == (1, 1, 1, 1, 0, 0, 0, 0):
            return xh.reshape(n * h * w, c), (n, h, w)
        if pt or pb or pl or pr:
            xh = F.pad(xh, (0, 0, pl, pr, pt, pb))
        hp, wp = xh.shape[1], xh.shape[2]
        ho = (hp - dh * (kh - 1) - 1) // sh + 1
        wo = (wp - dw * (kw - 1) - 1) // sw + 1
        if ho <= 0 or wo <= 0:
            raise ValueError(f"input: spatial size {(h, w)} is smaller than the (dilated) kernel "
                             f"{(dh * (kh - 1) + 1, dw * (kw - 1) + 1)} after padding")
        s0, s1, s2, s3 = xh.stride()
        win = xh.as_strided((n, ho, wo, kh, kw, c), (s0, s1 * sh, s2 * sw, s1 * dh, s2 * dw, s3))
        return win.reshape(n * ho * wo, kh * kw * c), (n, ho, wo)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (3, 4):
            raise ValueError(f"input: expected (N, C, H, W) or (C, H, W), got shape "
                             f"{tuple(x.shape)}")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        cols, (n, ho, wo) = self.patches(x)
        y = self.linear(cols).view(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)
        return y[0] if unbatched else y
