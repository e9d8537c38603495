"""`MultiheadAttention`: torch.nn.MultiheadAttention with the attention core on the fused kernel."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_mha_inputs, check_mha_shapes
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
    def _fused_forward(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        """forward with need_weights=False: input handling, then the fused attention core."""
        batched, (query, key, value, key_padding_mask, attn_mask, is_causal) = self._inputs(
            query, key, value, key_padding_mask, attn_mask, is_causal)
        L, B, E = query.shape
        q, k, v, mask, kpm = self._heads(query, key, value, key_padding_mask, attn_mask)
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

    def _inputs(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        """Checked arguments in torch's layout: (batched, (query [L, B, E], key [S, B, kdim],
        value [S, B, vdim], key_padding_mask [B, S] or None, attn_mask or None, is_causal)),
        the is_causal hint resolved as torch does."""
        batched = check_mha_inputs(query, key, value, key_padding_mask, attn_mask)
        if (key_padding_mask is not None and attn_mask is not None
                and key_padding_mask.dtype != attn_mask.dtype):
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. "
                          "Use same type for both instead.", stacklevel=4)
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
        check_mha_shapes(self, query, key, value, key_padding_mask, attn_mask, is_causal)
        if is_causal and key_padding_mask is None:
            attn_mask = None  # the hint: SDPA's is_causal instead of the given mask (as torch)
        else:
            is_causal = False  # a key padding mask merged into attn_mask: no longer causal
        return batched, (query, key, value, key_padding_mask, attn_mask, is_causal)

    def _heads(self, query, key, value, key_padding_mask, attn_mask):
        """The projected q, k, v as [B, H, N, D] views (bias_k / bias_v and add_zero_attn
        appended as keys) and the masks in `_dense`'s meaning: (q, k, v, attn_mask (bool True =
        attend, or float additive; a float key_padding_mask folded in), key_padding_mask (bool
        True = padding) or None)."""
        L, B, E = query.shape
        H, D = self.num_heads, self.head_dim
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
        return (q, k, v, *_sdpa_masks(attn_mask, key_padding_mask, B, H, L, S))

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


def _sdpa_masks(attn_mask, key_padding_mask, B, H, L, S):
    """MultiheadAttention's masks (bool True = NOT allowed, or float additive; attn_mask [L, S]
    or [B * H, L, S], key_padding_mask [B, S]) -> (attn_mask broadcastable to [B, H, L, S] in
    SDPA's meaning (bool True = attend, or float additive; a float key_padding_mask is added
    in), bool key_padding_mask (True = padding) or None)."""
    mask = None
    if attn_mask is not None:
        mask = attn_mask.view(1, 1, L, S) if attn_mask.dim() == 2 else attn_mask.view(B, H, L, S)
        if mask.dtype == torch.bool:
            mask = ~mask  # MHA: True = not allowed; SDPA / _attention: True = attend
    if key_padding_mask is None or key_padding_mask.dtype == torch.bool:
        return mask, key_padding_mask
    add = key_padding_mask.view(B, 1, 1, S)  # float: additive over the keys, folded into the mask
    if mask is None:
        return add, None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=add.dtype).masked_fill(~mask, float("-inf")) + add, None
    return mask + add, None
