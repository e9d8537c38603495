"""`MultiheadAttention`: torch.nn.MultiheadAttention with the attention core on the fused kernel."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.sdpa import _dense


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in subclass of ``torch.nn.MultiheadAttention`` (same constructor, parameters and
    state_dict keys: ``load_state_dict`` of a torch module's state works both ways).

    ``forward`` follows ``torch.nn.functional.multi_head_attention_forward`` (torch 2.13):
    batch_first or not, unbatched 2-D inputs, packed ``in_proj_weight`` or separate
    ``q/k/v_proj_weight`` (kdim/vdim != embed_dim), ``bias_k``/``bias_v`` (add_bias_kv) and
    ``add_zero_attn`` appended as extra keys, ``out_proj``. The attention itself runs on
    `tritformer`'s fused kernel (via ``tritformer.ops.sdpa._dense``: the same fallback to
    torch's SDPA for float64 or head_dim > 256).

    Not fused:

    - ``need_weights=True`` (torch's default): the weights are the [L, S] probability matrix,
      which a fused kernel never forms; this delegates to ``torch.nn.MultiheadAttention.forward``
      (torch's own implementation, identical results). Pass ``need_weights=False`` to fuse.
    - nested-tensor inputs (torch's fast path handles those): delegated as well.

    Masks (as torch): ``attn_mask`` 2-D [L, S] or 3-D [B * num_heads, L, S]; bool True = NOT
    allowed (the opposite of SDPA's), float additive. ``key_padding_mask`` [B, S] ([S]
    unbatched); bool True = padding, float additive. ``is_causal`` is a hint that attn_mask is
    the causal mask, exactly as in torch: it needs an attn_mask (RuntimeError otherwise, torch's
    error); without a key_padding_mask the attn_mask is then ignored and a top-left causal mask
    is applied, with one the given attn_mask is used as is. Dropout (p = ``dropout``) on the
    attention probabilities only in training mode. Rows whose every key is masked give 0.

    Returns ``(attn_output, None)`` when fused (``need_weights=False``).
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if need_weights or query.is_nested or key.is_nested or value.is_nested:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        return self._fused_forward(query, key, value, key_padding_mask, attn_mask, is_causal)

    # -----------------------------------------------------------------------------------------
    def _check(self, query, key, value, key_padding_mask, attn_mask):
        """torch's _mha_shape_check as ValueError/TypeError naming the argument; returns is_batched."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (unbatched [L, E]) or 3-D (batched), got {query.dim()}-D")
        batched = query.dim() == 3
        for name, t in (("key", key), ("value", value)):
            if t.dim() != query.dim():
                raise ValueError(f"{name} must be {query.dim()}-D like query, got {t.dim()}-D")
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is None:
                continue
            if not isinstance(m, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(m).__name__}")
            if m.dtype != torch.bool and not m.dtype.is_floating_point:
                raise TypeError(f"{name} must be bool or floating point, got {m.dtype}")
            if m.device != query.device:
                raise ValueError(f"{name} must be on query's device {query.device}, got {m.device}")
        if key_padding_mask is not None and key_padding_mask.dim() != (2 if batched else 1):
            raise ValueError(f"key_padding_mask must be {'2-D [B, S]' if batched else '1-D [S]'} for "
                             f"{query.dim()}-D query, got shape {tuple(key_padding_mask.shape)}")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise ValueError(f"attn_mask must be 2-D [L, S] or 3-D [B * num_heads, L, S], got shape {tuple(attn_mask.shape)}")
        return batched

    def _fused_forward(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        batched = self._check(query, key, value, key_padding_mask, attn_mask)
        if (key_padding_mask is not None and attn_mask is not None
                and key_padding_mask.dtype != attn_mask.dtype):
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. "
                          "Use same type for both instead.", stacklevel=3)
        # torch's layout: [L, B, E] (the module transposes batch_first inputs; it keeps the
        # q is k is v identities, which select the packed self-attention projection)
        if batched and self.batch_first:
            if key is value:
                if query is key:
                    query = key = value = query.transpose(0, 1)
                else:
                    query = query.transpose(0, 1)
                    key = value = key.transpose(0, 1)
            else:
                query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)

        L, B, E = query.shape
        S = key.shape[0]
        H, D = self.num_heads, self.head_dim
        if E != self.embed_dim:
            raise ValueError(f"query's embedding dim must be embed_dim={self.embed_dim}, got {E}")
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise ValueError(f"key shape {tuple(key.shape)} does not match value shape {tuple(value.shape)}")
        elif key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key's sequence and batch dims {tuple(key.shape[:2])} do not match value's {tuple(value.shape[:2])}")
        if key.shape[1] != B:
            raise ValueError(f"key's batch size must be query's ({B}), got {key.shape[1]}")
        for name, t, dim in (("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != dim:
                raise ValueError(f"{name}'s embedding dim must be {'kdim' if name == 'key' else 'vdim'}={dim}, got {t.shape[-1]}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(f"key_padding_mask must have shape [B, S] = [{B}, {S}], got {tuple(key_padding_mask.shape)}")
        if is_causal and attn_mask is None:  # torch's error, type and text
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                               "Transformer module method `generate_square_subsequent_mask` to "
                               "create this mask.")
        if is_causal and key_padding_mask is None:
            attn_mask = None  # the hint: SDPA's is_causal instead of the given mask (as torch)
        else:
            is_causal = False  # a key padding mask merged into attn_mask: no longer causal
        if attn_mask is not None:
            want = (L, S) if attn_mask.dim() == 2 else (B * H, L, S)
            if tuple(attn_mask.shape) != want:
                raise ValueError(f"the {attn_mask.dim()}-D attn_mask must have shape {list(want)}, got {tuple(attn_mask.shape)}")

        q, k, v = self._in_projection(query, key, value)  # [L, B, E], [S, B, E] x2

        def pad_masks(attn_mask, key_padding_mask):
            # one more key, allowed: False (bool; "True = masked" for both masks here) or 0.0
            return (None if attn_mask is None else F.pad(attn_mask, (0, 1)),
                    None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1)))

        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, B, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, B, 1)])
            attn_mask, key_padding_mask = pad_masks(attn_mask, key_padding_mask)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(1, B, E)])
            v = torch.cat([v, v.new_zeros(1, B, E)])
            attn_mask, key_padding_mask = pad_masks(attn_mask, key_padding_mask)
        S = k.shape[0]

        # [N, B, E] -> [B, H, N, D] views (the kernel reads strided tensors in place)
        q = q.view(L, B, H, D).permute(1, 2, 0, 3)
        k = k.view(S, B, H, D).permute(1, 2, 0, 3)
        v = v.view(S, B, H, D).permute(1, 2, 0, 3)

        mask = None
        if attn_mask is not None:
            mask = attn_mask.view(1, 1, L, S) if attn_mask.dim() == 2 else attn_mask.view(B, H, L, S)
            if mask.dtype == torch.bool:
                mask = ~mask  # MHA: True = not allowed; SDPA / _attention: True = attend
        kpm = None
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool:
                kpm = key_padding_mask
            else:  # float: additive over the keys, folded into the attention mask
                add = key_padding_mask.view(B, 1, 1, S)
                if mask is None:
                    mask = add
                elif mask.dtype == torch.bool:
                    mask = torch.zeros_like(mask, dtype=add.dtype).masked_fill(~mask, float("-inf")) + add
                else:
                    mask = mask + add

        dropout_p = self.dropout if self.training else 0.0
        out = _dense(q, k, v, attn_mask=mask, key_padding_mask=kpm, causal=is_causal,
                     dropout_p=dropout_p)  # [B, H, L, D]
        out = out.permute(2, 0, 1, 3).reshape(L * B, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(L, B, E)
        if not batched:
            return out.squeeze(1), None
        if self.batch_first:
            return out.transpose(0, 1), None
        return out, None

    def _in_projection(self, query, key, value):
        """torch's _in_projection_packed / _in_projection: [N, B, E_in] -> [N, B, E]."""
        E = self.embed_dim
        b = self.in_proj_bias
        if not self._qkv_same_embed_dim:
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                    F.linear(value, self.v_proj_weight, bv))
        w = self.in_proj_weight
        if key is value:
            if query is key:  # self-attention: one projection
                proj = F.linear(query, w, b).unflatten(-1, (3, E))
                return proj[..., 0, :], proj[..., 1, :], proj[..., 2, :]
            w_q, w_kv = w.split([E, 2 * E])
            b_q, b_kv = (None, None) if b is None else b.split([E, 2 * E])
            kv = F.linear(key, w_kv, b_kv).unflatten(-1, (2, E))
            return F.linear(query, w_q, b_q), kv[..., 0, :], kv[..., 1, :]
        w_q, w_k, w_v = w.chunk(3)
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
