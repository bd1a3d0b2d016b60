"""CPU fast paths of the layers every flow step runs: plain torch layers applied through their parameters (no module
call, no per-call checks), ATen's GELU kernel for the few hundred values of one step, the first-token output of a
pre-norm transformer encoder layer, and the action decoder's velocity on its layers resolved to plain tensors once
per chunk (``plain_decoder_weights``, ``plain_velocity``). Any other layer (a LoRA or quantized wrapper) is called as a module, so the results
are those of the modules.

This file is copied next to exported checkpoints for ``trust_remote_code`` loading, with the model files that import it."""

from __future__ import annotations

from typing import NamedTuple

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


# ------------------------------------------------------------------------------ the decoder on plain weights
class PlainBlockWeights(NamedTuple):
    """One ``ModulatedResidualBlock`` of plain layers, as the tensors a flow step needs (weights transposed)."""

    up_bias: torch.Tensor
    up_weight_t: torch.Tensor
    down_bias: torch.Tensor
    down_weight_t: torch.Tensor
    norm_eps: float
    approximate: str  # the GELU's
    dropout: float  # the MLP's dropout probability when training, else 0


class PlainDecoderWeights(NamedTuple):
    """The decoder's layers resolved once per conditioning, when every one is a plain ``nn.Linear`` / ``nn.LayerNorm``
    / ``nn.GELU`` / ``nn.Dropout``: each flow step then runs ``addmm`` / ``layer_norm`` / ``gelu`` / ``addcmul`` on
    these tensors directly, without module calls or per-layer checks."""

    input_weight_t: torch.Tensor  # (H * D_max, width): x_in's columns of the chunk's values
    blocks: tuple[PlainBlockWeights, ...]
    out_bias: torch.Tensor
    out_weight_t: torch.Tensor
    out_norm_eps: float


def plain_decoder_weights(decoder: nn.Module) -> PlainDecoderWeights | None:
    """A ``FlowMatchingActionDecoder``'s layers as tensors for the flow steps, or None if one of them is not a plain
    torch layer."""
    x_in, out, norm_out = decoder.x_in, decoder.out, decoder.norm_out
    if not (type(x_in) is nn.Linear and x_in.bias is not None and type(out) is nn.Linear and out.bias is not None
            and type(norm_out) is nn.LayerNorm and norm_out.weight is None):
        return None
    blocks = []
    for block in decoder.blocks:
        up, act, drop, down = block.mlp
        if not (type(up) is nn.Linear and type(down) is nn.Linear and up.bias is not None and down.bias is not None
                and type(act) is nn.GELU and type(drop) is nn.Dropout and type(block.norm) is nn.LayerNorm
                and block.norm.weight is None):
            return None
        blocks.append(PlainBlockWeights(up.bias, up.weight.t(), down.bias, down.weight.t(), block.norm.eps,
                                        act.approximate, drop.p if drop.training else 0.0))
    flat = decoder.config.chunk_size * decoder.config.max_action_dim
    return PlainDecoderWeights(x_in.weight[:, :flat].t(), tuple(blocks), out.bias, out.weight.t(), norm_out.eps)


def plain_velocity(x: torch.Tensor, w: PlainDecoderWeights, input_bias: torch.Tensor,
                   modulation: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The velocity on plain weights ``w`` (a conditioning's ``weights``, ``input_bias`` and one step's
    ``modulation``), as ``(B, H * D_max)`` NOT yet masked: ``x`` is the flattened chunk ``(B, H * D_max)``,
    already zero in padded dimensions. The same computation as the modules', on the resolved tensors."""
    h = torch.addmm(input_bias, x, w.input_weight_t)
    shape = h.shape[-1:]
    for (b1, w1, b2, w2, eps, approximate, p), (one_plus_scale, shift, gate) in zip(w.blocks, modulation):
        if one_plus_scale.dim() == 1:  # shared by the batch: the layer norm's affine
            y = F.layer_norm(h, shape, one_plus_scale, shift, eps)
        else:
            y = torch.addcmul(shift, F.layer_norm(h, shape, None, None, eps), one_plus_scale)
        y = _gelu(torch.addmm(b1, y, w1), approximate)
        if p > 0:
            y = F.dropout(y, p, True)
        h = torch.addcmul(h, gate, torch.addmm(b2, y, w2))
    return torch.addmm(w.out_bias, F.layer_norm(h, shape, None, None, w.out_norm_eps), w.out_weight_t)


def euler_flow(decoder: nn.Module, z: torch.Tensor, dim_mask: torch.Tensor, noise: torch.Tensor,
               time_condition: torch.Tensor, step_sizes: tuple[float, ...]) -> torch.Tensor:
    """Euler integration of a ``FlowMatchingActionDecoder`` from ``noise`` ``(B, H, D_max)`` float32 (already zero in
    padded dimensions) to the chunk, NOT yet masked: the conditioning of every step (``time_condition``, ``(S, 1,
    width)``, from ``grid_time_condition``), then each step's velocity and update on the flattened chunk. Straight-line
    tensor code with no host synchronization and no context managers: what ``FlowMatchingActionDecoder.compile_flow``
    hands to ``torch.compile`` (the eager sampler runs the same steps in ``integrate_flow``)."""
    b, shape = noise.shape[0], noise.shape
    dtype = decoder.out.weight.dtype
    mask = dim_mask[:, None, :]
    c = decoder.conditioning(z.to(dtype), None, dim_mask, time_condition=time_condition)
    flat = noise.reshape(b, -1)
    flat_mask = mask.expand(shape).reshape(b, -1).to(torch.float32)
    if c.weights is not None:
        for modulation, dt in zip(c.step_modulations(), step_sizes):
            v = plain_velocity(flat.to(dtype), c.weights, c.input_bias, modulation)
            flat = torch.addcmul(flat, v.float(), flat_mask, value=dt)
        return flat.view(shape)
    x = flat.view(shape)  # a wrapped layer (LoRA, quantized...): call the modules
    for step, dt in zip(c.steps(), step_sizes):
        x = x + dt * decoder(x.to(dtype), conditioning=step).float()
    return x


def fresh_flow_inputs(z: torch.Tensor, dim_mask: torch.Tensor, time_condition: torch.Tensor,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z, dim_mask, time_condition)`` as the compiled loop is compiled for: fresh inference tensors with default
    strides (``z`` and the time conditioning in the head's ``dtype``), whatever the caller passes (a view of the
    posterior, a tensor made outside inference mode, a cached grid): the guards of a compiled graph check all of this,
    strides of size-1 dimensions included, so one graph serves every call. Call under ``torch.inference_mode``."""
    dev = z.device
    return (torch.empty(z.shape, dtype=dtype, device=dev).copy_(z),
            torch.empty(dim_mask.shape, dtype=torch.bool, device=dev).copy_(dim_mask),
            torch.empty(time_condition.shape, dtype=dtype, device=dev).copy_(time_condition))


def compile_euler_flow(decoder: nn.Module, num_inference_steps: int | tuple[int, ...], batch_size: int, scheduler,
                       **compile_kwargs):
    """``torch.compile`` of ``euler_flow`` for ``decoder`` (``FlowMatchingActionDecoder.compile_flow``), compiled now
    for each of ``num_inference_steps`` at ``batch_size`` on ``scheduler``'s time grid, with inputs as
    ``integrate_flow`` passes them. Returns the compiled function ``(z, dim_mask, noise, time_condition,
    step_sizes) -> chunk``."""
    import types

    def flow(z, dim_mask, noise, time_condition, step_sizes):
        return euler_flow(decoder, z, dim_mask, noise, time_condition, step_sizes)

    # torch.compile keeps its graphs (and its limit of 8 per function) on the function's code object; a copy of it
    # per decoder keeps each decoder's graphs apart, so a process may compile any number of models.
    flow = types.FunctionType(flow.__code__.replace(), flow.__globals__, flow.__name__, None, flow.__closure__)
    compiled = torch.compile(flow, **{"dynamic": False, "fullgraph": True, **compile_kwargs})
    steps = (num_inference_steps,) if isinstance(num_inference_steps, int) else tuple(num_inference_steps or ())
    if steps and scheduler.config.solver == "heun":
        raise ValueError("compile_flow compiles the Euler and shortcut solvers; this scheduler uses 'heun', which "
                         "keeps sampling eagerly. Compile with an Euler or shortcut scheduler.")
    config, dtype, device = decoder.config, decoder.out.weight.dtype, decoder.out.weight.device
    z = torch.zeros(batch_size, config.latent_dim, device=device)
    dim_mask = torch.ones(batch_size, config.max_action_dim, dtype=torch.bool, device=device)
    for n in steps:
        run = scheduler.for_run(n, device=device)
        try:
            with torch.inference_mode():  # the inputs exactly as integrate_flow passes them
                time_condition = decoder.grid_time_condition(run.timestep_values, dtype, device,
                                                             run.model_step_sizes())
                noise = torch.zeros(batch_size, config.chunk_size, config.max_action_dim, device=device)
                z_in, mask_in, time_in = fresh_flow_inputs(z, dim_mask, time_condition, dtype)
                compiled(z_in, mask_in, noise, time_in, tuple(run.euler_step_sizes()))
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise RuntimeError(
                f"compile_flow: torch.compile could not compile the {n}-step flow ({e.__class__.__name__}: {first}). "
                "On a CPU it needs a working C++ compiler (g++ or clang++ on PATH); the decoder keeps sampling "
                "eagerly.") from e
    return compiled
