"""SparseMultiheadAttention: :class:`torch.nn.MultiheadAttention` with sparse projections."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsekit.nn.linear import SparseLinear, linear_from_weight

__all__ = ["SparseMultiheadAttention"]


def _proj(weight: Tensor, bias: Tensor | None, choice: tuple[str, tuple[int, int] | None] | None,
          value_dtype: torch.dtype | None, backend: str) -> nn.Module:
    lin = linear_from_weight(weight, bias)
    if choice is None:
        return lin
    fmt, bs = choice
    return SparseLinear.from_dense(lin, format=fmt, blocksize=bs, value_dtype=value_dtype,
                                   backend=backend)


class SparseMultiheadAttention(nn.Module):
    """Drop-in replacement of :class:`torch.nn.MultiheadAttention` (packed ``in_proj_weight``).

    The packed ``(3E, E)`` input projection is split into ``q_proj`` / ``k_proj`` / ``v_proj``
    and the output projection kept as ``out_proj``; each is a :class:`SparseLinear` or, where
    sparse does not pay, a dense :class:`torch.nn.Linear`. Forward signature, argument checks,
    masks (``key_padding_mask``, ``attn_mask``, ``is_causal``), ``bias_k`` / ``bias_v``,
    ``add_zero_attn``, ``batch_first``, unbatched inputs, dropout in training mode and the
    returned attention weights (averaged or per head) are those of
    ``torch.nn.functional.multi_head_attention_forward``; only the four projections differ.

    The three input projections are separate products, so self- and cross-attention cost the
    same. Build it with :meth:`from_module`; :func:`sparsekit.sparsify` does that for you.
    """

    def __init__(self, embed_dim: int, num_heads: int, q_proj: nn.Module, k_proj: nn.Module,
                 v_proj: nn.Module, out_proj: nn.Module, *, dropout: float = 0.0,
                 bias_k: Tensor | None = None, bias_v: Tensor | None = None,
                 add_zero_attn: bool = False, batch_first: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim: expected a multiple of num_heads={num_heads}, got "
                             f"{embed_dim}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = self.vdim = embed_dim
        self.dropout, self.add_zero_attn, self.batch_first = dropout, add_zero_attn, batch_first
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.bias_k = None if bias_k is None else nn.Parameter(bias_k.detach().clone())
        self.bias_v = None if bias_v is None else nn.Parameter(bias_v.detach().clone())
        # Modules that inspect their attention (nn.TransformerEncoderLayer's fused fast path)
        # read these; False / None keeps them off the dense fused kernel and on this forward.
        self._qkv_same_embed_dim = False
        self.in_proj_weight = None
        self.in_proj_bias = None

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention,
                    in_proj: tuple[str, tuple[int, int] | None] | None = ("csr", None),
                    out_proj: tuple[str, tuple[int, int] | None] | None = ("csr", None), *,
                    value_dtype: torch.dtype | None = None,
                    backend: str = "auto") -> SparseMultiheadAttention:
        """Build from a (pruned) ``nn.MultiheadAttention``; exact zeros are dropped.

        ``in_proj`` / ``out_proj`` are ``(format, blocksize)`` for a sparse projection or None
        to keep that projection dense.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha: expected torch.nn.MultiheadAttention, got "
                            f"{type(mha).__name__}")
        if not isinstance(mha.in_proj_weight, nn.Parameter):
            raise ValueError("mha: separate q/k/v weights (kdim/vdim != embed_dim) are not "
                             "supported; expected a packed in_proj_weight")
        e = mha.embed_dim
        w = mha.in_proj_weight.detach()
        b = None if mha.in_proj_bias is None else mha.in_proj_bias.detach()
        projs = [_proj(w[i * e:(i + 1) * e], None if b is None else b[i * e:(i + 1) * e],
                       in_proj, value_dtype, backend) for i in range(3)]
        op = mha.out_proj
        outp = _proj(op.weight.detach(), None if op.bias is None else op.bias.detach(), out_proj,
                     value_dtype, backend)
        new = cls(e, mha.num_heads, *projs, outp, dropout=mha.dropout, bias_k=mha.bias_k,
                  bias_v=mha.bias_v, add_zero_attn=mha.add_zero_attn,
                  batch_first=mha.batch_first)
        return new.train(mha.training)

    @classmethod
    def empty_like(cls, mha: nn.MultiheadAttention) -> SparseMultiheadAttention:
        """A dense-projection SparseMultiheadAttention with ``mha``'s geometry and weights
        (a ``load_state_dict`` target: sparse projections are installed by the loader)."""
        return cls.from_module(mha, None, None)

    def to_module(self) -> nn.MultiheadAttention:
        """The equivalent ``nn.MultiheadAttention`` with the exact dense weights."""
        def dense(p: nn.Module) -> nn.Linear:
            return p.to_linear() if isinstance(p, SparseLinear) else p

        q, k, v, o = (dense(p) for p in (self.q_proj, self.k_proj, self.v_proj, self.out_proj))
        w = torch.cat([q.weight.detach(), k.weight.detach(), v.weight.detach()])
        has_bias = q.bias is not None
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout,
                                    bias=has_bias, add_bias_kv=self.bias_k is not None,
                                    add_zero_attn=self.add_zero_attn,
                                    batch_first=self.batch_first, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(w)
            mha.out_proj.weight.copy_(o.weight.detach())
            if has_bias:
                mha.in_proj_bias.copy_(torch.cat([q.bias, k.bias, v.bias]).detach())
                mha.out_proj.bias.copy_(o.bias.detach())
            if self.bias_k is not None:
                mha.bias_k.copy_(self.bias_k)
                mha.bias_v.copy_(self.bias_v)
        return mha.train(self.training)

    def geometry(self) -> dict[str, int]:
        """JSON-able shape parameters (written by :func:`sparsekit.save`)."""
        return {"embed_dim": self.embed_dim, "num_heads": self.num_heads}

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}")

    def _check(self, query: Tensor, key: Tensor, value: Tensor) -> bool:
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key, value: expected all 2-D (unbatched) or all 3-D, got "
                             f"{query.dim()}-D, {key.dim()}-D, {value.dim()}-D")
        for arg, t in (("query", query), ("key", key), ("value", value)):
            if t.shape[-1] != self.embed_dim:
                raise ValueError(f"{arg}: expected last dimension embed_dim={self.embed_dim}, "
                                 f"got shape {tuple(t.shape)}")
        if key.shape != value.shape:
            raise ValueError(f"key, value: expected equal shapes, got {tuple(key.shape)} and "
                             f"{tuple(value.shape)}")
        return query.dim() == 3

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        is_batched = self._check(query, key, value)
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
            target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                      other_name="", target_type=query.dtype, check_other=False)
        if self.batch_first and is_batched:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        if not is_batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        out, weights = self._attend(query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal)
        if not is_batched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(1, 0)
        return out, weights

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                need_weights: bool, attn_mask: Tensor | None, average_attn_weights: bool,
                is_causal: bool) -> tuple[Tensor, Tensor | None]:
        # (L, N, E) layout, as in torch.nn.functional.multi_head_attention_forward
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        heads, head_dim = self.num_heads, self.head_dim
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal: needs attn_mask (the causal mask itself, e.g. from "
                               "nn.Transformer.generate_square_subsequent_mask)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        elif key_padding_mask is not None:
            is_causal = False
        q = self.q_proj(query)
        k = self.k_proj(key)
        v = self.v_proj(value)
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(f"attn_mask: 2-D mask must have shape {(tgt_len, src_len)}"
                                       f", got {tuple(attn_mask.shape)}")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (bsz * heads, tgt_len, src_len):
                    raise RuntimeError(f"attn_mask: 3-D mask must have shape "
                                       f"{(bsz * heads, tgt_len, src_len)}, got "
                                       f"{tuple(attn_mask.shape)}")
            else:
                raise RuntimeError(f"attn_mask: expected 2 or 3 dimensions, got "
                                   f"{attn_mask.dim()}")
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k = torch.cat([k, zeros], dim=1)
            v = torch.cat([v, zeros], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise RuntimeError(f"key_padding_mask: expected shape {(bsz, src_len)}, got "
                                   f"{tuple(key_padding_mask.shape)}")
            kpm = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
                   .reshape(bsz * heads, 1, src_len))
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                w = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                w = torch.bmm(q_scaled, k.transpose(-2, -1))
            w = F.softmax(w, dim=-1)
            if dropout_p > 0.0:
                w = F.dropout(w, p=dropout_p)
            out = torch.bmm(w, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = self.out_proj(out).view(tgt_len, bsz, -1)
            w = w.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                w = w.mean(dim=1)
            return out, w
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, heads, -1, src_len)
        q = q.view(bsz, heads, tgt_len, head_dim)
        k = k.view(bsz, heads, src_len, head_dim)
        v = v.view(bsz, heads, src_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        return self.out_proj(out).view(tgt_len, bsz, -1), None
