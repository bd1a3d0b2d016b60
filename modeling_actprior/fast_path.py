"""CPU fast paths of the layers every flow step runs: plain torch layers applied through their parameters (no module
call, no per-call checks), ATen's GELU kernel for the few hundred values of one step, and the first-token output of a
pre-norm transformer encoder layer. Any other layer (a LoRA or quantized wrapper) is called as a module, so the results
are those of the modules.

This file is copied next to exported checkpoints for ``trust_remote_code`` loading, with the model files that import it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Inputs of 2 to this many rows go through a plain ``nn.Linear`` as ``weight @ x.T`` (see ``_linear``).
_FEW_ROWS = 16


def _linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; a plain ``nn.Linear`` is applied through its parameters, which skips the module call (several
    microseconds at batch 1 on a CPU, paid by every layer of every flow step). Any other layer (a LoRA or quantized
    wrapper) is called as a module.

    A few rows (the modulations of all flow steps of one chunk, a small batch) are multiplied as
    ``(weight @ x.T).T``: on this project's 2-core CPU the BLAS kernel for a transposed weight is up to twice as
    slow at 14-16 rows on 512 x 1024 weights, though about even or faster below 12; end to end the two choices
    differ by a few percent either way.
    """
    if type(layer) is not nn.Linear:
        return layer(x)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if 1 < rows <= _FEW_ROWS and layer.bias is not None and x.device.type == "cpu":
        y = torch.addmm(layer.bias[:, None], layer.weight, x.reshape(rows, -1).t()).t()
        return y.reshape(*x.shape[:-1], y.shape[-1])
    return F.linear(x, layer.weight, layer.bias)


def _layer_norm(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for an ``nn.LayerNorm`` without the module call (see ``_linear``)."""
    if type(layer) is nn.LayerNorm:
        return F.layer_norm(x, layer.normalized_shape, layer.weight, layer.bias, layer.eps)
    return layer(x)


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` for an ``nn.Sequential(Linear, SiLU, Linear)`` without the module calls (see ``_linear``)."""
    if type(mlp) is nn.Sequential and len(mlp) == 3 and type(mlp[1]) is nn.SiLU:
        return _linear(mlp[2], F.silu(_linear(mlp[0], x)))
    return mlp(x)


#: Up to this many values, GELU on a CPU runs ATen's own kernel rather than oneDNN's (see ``_gelu``).
_SMALL_GELU = 8192


def _gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu(x)``. On a CPU, torch hands a contiguous float32 input of exact GELU to oneDNN, whose per-call setup
    (~10 us) dwarfs the work on the few hundred values of one flow step; a transposed view of the same values runs
    ATen's vectorized kernel instead: the same exact (erf) GELU, to rounding."""
    if x.device.type == "cpu" and x.dim() == 2 and x.shape[-1] % 2 == 0 and x.numel() <= _SMALL_GELU:
        b = x.shape[0]
        return F.gelu(x.view(b, 2, -1).transpose(1, 2), approximate=approximate).transpose(1, 2).reshape(b, -1)
    return F.gelu(x, approximate=approximate)


def _first_token_output(layer: nn.Module, h: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """``layer(h, src_key_padding_mask=pad)[:, 0]`` ``(B, d)`` for a pre-norm ``nn.TransformerEncoderLayer``, computing
    the query, attention output and MLP of the first position only (the others contribute their keys and values).
    Any other layer runs whole."""
    attn = getattr(layer, "self_attn", None)
    if (type(layer) is not nn.TransformerEncoderLayer or not layer.norm_first or type(attn) is not nn.MultiheadAttention
            or not attn.batch_first or not attn._qkv_same_embed_dim or attn.in_proj_bias is None
            or attn.bias_k is not None or attn.add_zero_attn):
        return layer(h, src_key_padding_mask=pad)[:, 0]
    b, t, d = h.shape
    heads = attn.num_heads
    a = F.layer_norm(h, layer.norm1.normalized_shape, layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
    q = F.linear(a[:, 0], attn.in_proj_weight[:d], attn.in_proj_bias[:d]).view(b, heads, 1, d // heads)
    k, v = F.linear(a, attn.in_proj_weight[d:], attn.in_proj_bias[d:]).view(b, t, 2, heads, d // heads).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=~pad[:, None, None, :],
                                       dropout_p=attn.dropout if layer.training else 0.0)
    x = h[:, 0] + layer.dropout1(F.linear(o.reshape(b, d), attn.out_proj.weight, attn.out_proj.bias))
    y = F.layer_norm(x, layer.norm2.normalized_shape, layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
    y = _linear(layer.linear1, y)
    y = _gelu(y) if layer.activation is F.gelu else layer.activation(y)
    return x + layer.dropout2(_linear(layer.linear2, layer.dropout(y)))


def _has_forward_hooks(module: nn.Module) -> bool:
    m = torch.nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks or m._global_forward_hooks
                or m._global_forward_pre_hooks)
