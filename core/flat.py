"""FlatQuant modules swapped into a decoder layer, and the folding (reparameterization) that turns the calibrated
transforms into deployable weights. Which module is which comes from the family's adapter (core/adapters/).

Per decoder layer (the LLaMA names; every supported family has these roles):
  input_layernorm          -> FlatNormTransform (norm, then the q/k/v transform P_qkv; its diag folds into the norm)
  q/k/v_proj               -> FlatQuantLinear (weight W·P_qkv⁻ᵀ, per-token int4 activations, per-channel int4 weights)
  o_proj                   -> FlatQuantLinear with its own online transform (only with use_o_quant)
  post_attention_layernorm -> FlatNormTransform (P_upgate)
  gate/up_proj             -> FlatQuantLinear
  down_proj                -> FlatQuantLinear with its own online transform P_down (its diag folds into up_proj)
  kv-cache                 -> per-head transforms + fake quant of k (after RoPE) and v (use_kcache/vcache_quant)
Per model, with lm_head not in skip_layers: lm_head -> FlatQuantLinear, int8 weights and activations (wrap_lm_head).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .adapters import LinearGroup, ModelAdapter, adapter_for
from .attention import use_flatquant_attention
from .config import FlatQuantConfig
from .quantizer import (ActQuantizer, WeightQuantizer, fake_quant_asym, fake_quant_sym, integer_linear, quantize_codes,
                        row_spans)
from .transforms import KroneckerTransform, kronecker_matmul

FOLD_BLOCK_ELEMENTS = 1 << 22  # folding: float64 temporaries of at most 32 MiB (a 7B weight whole is 360 MiB)
WEIGHT_BLOCK_ELEMENTS = 1 << 22  # training with recompute: the weight is rebuilt in blocks of output rows this size


def _fold_blocks(weight: torch.Tensor) -> list[tuple[int, int]]:
    return row_spans(weight.shape[0], weight[0].numel(), FOLD_BLOCK_ELEMENTS)


def _weight_blocks(module: "FlatQuantLinear") -> list[tuple[int, int]]:
    return row_spans(module.out_features, module.in_features, WEIGHT_BLOCK_ELEMENTS)


class _RecomputedWeightLinear(torch.autograd.Function):
    """``F.linear(x, module._quantized_weight(), bias)`` in training that keeps only ``x`` for backward: the
    transformed, fake-quantized weight is built in blocks of output rows (rows are independent: the transform acts
    on each row, the quantizer's scale is per row), used and dropped, in the forward and again in backward, where
    each block gives its slice of the output gradient's matmuls and its share of the parameters' gradients. So a
    7B layer's weight-sized temporaries (fp32 copies, casts, their gradients) exist one block at a time. The
    gradients are the plain expression's (same casts, same matmuls), up to float summation order."""

    @staticmethod
    def forward(ctx, x, module, *params):
        ctx.module = module
        kind = x.device.type
        ctx.cast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        bias = module.linear.bias
        with torch.no_grad():
            parts = [F.linear(x, module._quantized_weight(a, b).to(x.dtype),
                              None if bias is None else bias[a:b].to(x.dtype)) for a, b in _weight_blocks(module)]
            y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        ctx.save_for_backward(x, *params)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, *params = ctx.saved_tensors
        kind, cast = x.device.type, ctx.cast
        xc = x.to(cast) if cast is not None else x
        x2 = xc.reshape(-1, xc.shape[-1])
        grad_x = None
        grad_params: list = [None] * len(params)
        for a, b in _weight_blocks(ctx.module):
            with torch.enable_grad():
                with torch.autocast(kind, dtype=cast or torch.get_autocast_dtype(kind), enabled=cast is not None):
                    w = ctx.module._quantized_weight(a, b).to(x.dtype)  # as in the forward, same autocast state
                wc = w.to(cast) if cast is not None else w  # the copy autocast's linear used
            g = grad_y[..., a:b].to(wc.dtype)
            if params:
                grad_w = g.reshape(-1, b - a).t().mm(x2)
                # retain: the path to the params runs through tensors the outer backward still needs (cached
                # transform matrices shared with the activation side, and with the other blocks)
                for k, gp in enumerate(torch.autograd.grad(wc, params, grad_w, allow_unused=True, retain_graph=True)):
                    if gp is not None:
                        grad_params[k] = gp if grad_params[k] is None else grad_params[k].add_(gp)
            if ctx.needs_input_grad[0]:
                gx = g.matmul(wc.detach()).float()
                grad_x = gx if grad_x is None else grad_x.add_(gx)
        return (None if grad_x is None else grad_x.to(x.dtype), None, *grad_params)


class FlatQuantLinear(nn.Module):
    """A linear layer whose input arrives transformed by P (by the norm before it, or by ``in_trans`` here) and whose
    weight is W·P⁻ᵀ, both fake-quantized. ``weight_trans`` is the transform to undo (not owned unless it is in_trans)."""

    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: int, lwc: bool,
                 act_quantizer: Optional[ActQuantizer] = None, in_trans: Optional[KroneckerTransform] = None,
                 weight_trans: Optional[KroneckerTransform] = None, ascend_served: bool = True):
        super().__init__()
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_quantizer = WeightQuantizer(linear.out_features, w_bits, lwc)
        self.act_quantizer = act_quantizer if act_quantizer is not None else ActQuantizer(a_bits, lac=False)
        self.in_trans = in_trans
        self.__dict__["weight_trans"] = weight_trans  # shared with the norm: not registered twice
        # weights and activations quantized: an integer GEMM (RealQuantLinear) computes it
        self.real_quant_eligible = w_bits < 16 and self.act_quantizer.bits < 16
        # and vllm-ascend's W4A4 FlatQuant method serves it (not o_proj: exported float there, see realquant.ascend)
        self.ascend_served = ascend_served and self.real_quant_eligible
        self.quant_enabled = True
        self.folded = False
        # Training: recompute the transformed, fake-quantized weight in backward instead of keeping it and its
        # temporaries for the whole step (a 7B layer's would be several GiB); gradients are unchanged, the step
        # ~11% slower on a small layer (set_weight_recompute).
        self.checkpoint_weight = True

    def _quantized_weight(self, a: Optional[int] = None, b: Optional[int] = None) -> torch.Tensor:
        """The transformed, fake-quantized weight, or its output rows a..b alone."""
        if a is None:
            return self.weight_quantizer(self.effective_weight())
        w = self.linear.weight[a:b]
        if not self.folded and self.weight_trans is not None:
            w = self.weight_trans.transform_weight(w)
        return self.weight_quantizer(w, rows=(a, b))

    def _weight_params(self):
        yield from self.weight_quantizer.parameters()
        if self.weight_trans is not None:
            yield from self.weight_trans.parameters()

    def effective_weight(self) -> torch.Tensor:
        w = self.linear.weight
        if not self.folded and self.weight_trans is not None:
            w = self.weight_trans.transform_weight(w)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_trans is not None:
            x = self.in_trans(x)
        if self.quant_enabled and not self.folded and self.checkpoint_weight and torch.is_grad_enabled():
            params = [p for p in self._weight_params() if p.requires_grad]
            if params:
                return _RecomputedWeightLinear.apply(self.act_quantizer(x), self, *params)
        w = self.effective_weight()
        if self.quant_enabled and self.folded and self.weight_quantizer.bits < 16 and self.act_quantizer.bits < 16:
            # the deployable form: the real kernels' integer math, so real-quant equals this model bit for bit
            w_codes, w_scale = quantize_codes(w, self.weight_quantizer.bits, 1, self.weight_quantizer.clip_ratio())
            return integer_linear(x, w_codes, w_scale, self.linear.bias, self.act_quantizer.bits,
                                  self.act_quantizer.clip_ratio(), self.weight_quantizer.bits)
        if self.quant_enabled:
            x = self.act_quantizer(x)
            w = self.weight_quantizer(w)
        return F.linear(x, w.to(x.dtype), None if self.linear.bias is None else self.linear.bias.to(x.dtype))

    @torch.no_grad()
    def fold(self) -> None:
        """Store W·P⁻ᵀ (computed in float64) as the weight; the online transform, if any, keeps only its matrices."""
        if self.folded:
            return
        if self.weight_trans is not None:
            weight = self.linear.weight.data
            folded = torch.empty_like(weight)
            self.weight_trans.double()
            for a, b in _fold_blocks(weight):  # rows are independent: float64 temporaries of one block at a time
                folded[a:b] = self.weight_trans.transform_weight(weight[a:b].double()).to(weight.dtype)
            self.weight_trans.float()
            self.linear.weight.data = folded
        self.__dict__["weight_trans"] = None
        self.folded = True

    @torch.no_grad()
    def export_state(self) -> dict:
        """Everything a real-quant kernel needs, in the folded form (see the real-quant backends)."""
        if not self.folded:
            raise RuntimeError("export_state() needs a folded model: call fold_model(model) first.")
        w_clip = self.weight_quantizer.clip_ratio()
        a_clip = self.act_quantizer.clip_ratio()
        left = right = None
        if self.in_trans is not None:
            left, right, _, _ = self.in_trans.matrices()
        return {
            "weight": self.linear.weight.detach().float().clone(),
            "bias": None if self.linear.bias is None else self.linear.bias.detach().float().clone(),
            "w_bits": self.weight_quantizer.bits,
            "w_clip": None if w_clip is None else w_clip.detach().float().clone(),
            "a_bits": self.act_quantizer.bits,
            "a_clip": None if a_clip is None else float(a_clip),
            "trans_left": None if left is None else left.detach().float().clone(),
            "trans_right": None if right is None else right.detach().float().clone(),
            "real_quant_eligible": self.real_quant_eligible,
            "ascend_served": self.ascend_served,
        }

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w_bits={self.weight_quantizer.bits}, "
                f"a_bits={self.act_quantizer.bits}, folded={self.folded}")


class FlatNormTransform(nn.Module):
    """RMSNorm followed by the group's transform. Folding multiplies the diag scale into the norm's weight."""

    def __init__(self, norm: nn.Module, trans: KroneckerTransform):
        super().__init__()
        self.norm = norm
        self.trans = trans

    @property
    def weight(self) -> torch.Tensor:  # some callers introspect norm.weight
        return self.norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trans(self.norm(x))

    @torch.no_grad()
    def fold(self) -> None:
        if self.trans.diag is not None and self.trans.use_diag:
            self.norm.weight.data = (self.norm.weight.double() * self.trans.diag.double()).to(self.norm.weight.dtype)
            self.trans.use_diag = False


class KVCacheQuantizer(nn.Module):
    """Fake-quantizes k (after RoPE, in a learnable head_dim basis) and v per token and head. Attached to the
    attention module and applied by the 'flatquant' attention function registered below."""

    def __init__(self, head_dim: int, k_bits: int, k_sym: bool, v_bits: int, v_sym: bool, seed: int):
        super().__init__()
        self.k_bits, self.k_sym, self.v_bits, self.v_sym = k_bits, k_sym, v_bits, v_sym
        self.k_trans = KroneckerTransform(head_dim, add_diag=False, seed=seed) if k_bits < 16 else None
        self.v_trans = KroneckerTransform(head_dim, add_diag=False, seed=seed + 1) if v_bits < 16 else None
        self.quant_enabled = True

    @staticmethod
    def _fq(x: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
        return fake_quant_sym(x, bits) if sym else fake_quant_asym(x, bits)

    def forward(self, query, key, value):
        if self.k_trans is not None:
            # q·kᵀ == (q·P⁻ᵀ)·(k·P)ᵀ: transform both, quantize only k.
            _, _, l_it, r_it = self.k_trans.matrices()
            query = kronecker_matmul(query, l_it.to(query.dtype), r_it.to(query.dtype))
            key = self.k_trans(key)
            if self.quant_enabled:
                key = self._fq(key, self.k_bits, self.k_sym)
        if self.v_trans is not None:
            l, r, l_it, r_it = self.v_trans.matrices()
            v = kronecker_matmul(value, l.to(value.dtype), r.to(value.dtype))
            if self.quant_enabled:
                v = self._fq(v, self.v_bits, self.v_sym)
            # undo P (P⁻¹ = (P⁻ᵀ)ᵀ) so the attention output is in the original basis
            value = kronecker_matmul(v, l_it.t().to(v.dtype), r_it.t().to(v.dtype))
        return query, key, value


# --- building, folding and (de)serializing ---------------------------------------------------------------------


@dataclass
class ActivationStats:
    """Per-channel absmax of the inputs of each transform group, for the SmoothQuant-style diag init."""

    qkv: Optional[torch.Tensor] = None
    up_gate: Optional[torch.Tensor] = None
    down: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)


def smooth_init(weights: list[torch.Tensor], act_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """d = max|W|^(1-α) / max|X|^α per input channel: x·d flattens activation outliers into the weights."""
    w_max = torch.cat([w.detach().float() for w in weights], dim=0).abs().amax(dim=0)
    return (w_max.clamp(min=1e-5).pow(1 - alpha) / act_absmax.float().clamp(min=1e-5).pow(alpha)).clamp(min=1e-5)


def _flat_linear(linear: nn.Linear, cfg: FlatQuantConfig, act_q: ActQuantizer, trans, lwc: bool, in_trans=None,
                 skipped: bool = False, ascend_served: bool = True) -> FlatQuantLinear:
    if skipped:  # stays full precision but must still undo the transform its input went through
        return FlatQuantLinear(linear, 16, 16, False, ActQuantizer(16, False), in_trans, trans, False)
    return FlatQuantLinear(linear, cfg.w_bits, cfg.a_bits, lwc, act_q, in_trans, trans, ascend_served)


def wrap_layer(layer: nn.Module, index: int, cfg: FlatQuantConfig, stats: Optional[ActivationStats] = None,
               use_transforms: bool = True, prefix: str = "model.layers",
               adapter: Optional[ModelAdapter] = None) -> None:
    """Swap FlatQuant modules into one decoder layer in place. use_transforms=False gives the RTN baseline
    (no transforms, no learnable clipping) on the same code path. ``adapter``: the family's (found from the
    layer's class when not given)."""
    ad = adapter or adapter_for(layer)
    attn = ad.get(layer, ad.attn)
    base = f"{prefix}.{index}"
    seed = 1000 * index
    lwc = cfg.lwc and use_transforms
    lac = cfg.lac and use_transforms
    add_diag = cfg.add_diag and use_transforms
    hidden = ad.get(layer, ad.qkv.norm).weight.shape[0]

    def make_trans(dim, offset, diag=add_diag):
        return KroneckerTransform(dim, add_diag=diag, seed=seed + offset) if use_transforms else None

    def wrap_group(group: LinearGroup, act_absmax, offset: int):
        """Linears fed by one RMSNorm share one transform (applied after the norm) and one activation quantizer."""
        parent = ad.get(layer, group.parent)
        names = {n: f"{base}.{group.parent}.{n}" for n in group.members}
        skipped = {n: cfg.is_skipped(names[n]) for n in group.members}
        if all(skipped.values()):
            return
        trans = make_trans(hidden, offset)
        if trans is not None:
            if act_absmax is not None and trans.diag is not None:
                trans.diag.data = smooth_init([getattr(parent, n).weight for n in group.members], act_absmax,
                                              cfg.diag_alpha)
            ad.put(layer, group.norm, FlatNormTransform(ad.get(layer, group.norm), trans))
        act_q = ActQuantizer(cfg.a_bits, lac, members=sum(not s for s in skipped.values()))
        for n in group.members:
            setattr(parent, n, _flat_linear(getattr(parent, n), cfg, act_q, trans, lwc, skipped=skipped[n]))

    wrap_group(ad.qkv, stats.qkv if stats else None, 1)

    if cfg.use_o_quant and not cfg.is_skipped(f"{base}.{ad.o_proj}"):
        o_proj = ad.get(layer, ad.o_proj)
        o_trans = make_trans(o_proj.in_features, 2, diag=False)
        ad.put(layer, ad.o_proj, _flat_linear(o_proj, cfg, ActQuantizer(cfg.a_bits, lac), o_trans, lwc,
                                              in_trans=o_trans, ascend_served=False))

    if cfg.use_kcache_quant or cfg.use_vcache_quant:
        head_dim = attn.head_dim
        attn.kv_quantizer = KVCacheQuantizer(head_dim, cfg.k_bits if cfg.use_kcache_quant else 16, cfg.k_sym,
                                             cfg.v_bits if cfg.use_vcache_quant else 16, cfg.v_sym, seed + 3)
        use_flatquant_attention(attn.config, force=True)  # the attention function applies the quantizer

    wrap_group(ad.up_gate, stats.up_gate if stats else None, 5)

    if cfg.use_down_quant and not cfg.is_skipped(f"{base}.{ad.down_proj}"):
        down = ad.get(layer, ad.down_proj)
        d_trans = make_trans(down.in_features, 7)
        if d_trans is not None and stats is not None and stats.down is not None and d_trans.diag is not None:
            d_trans.diag.data = smooth_init([down.weight], stats.down, cfg.diag_alpha)
        ad.put(layer, ad.down_proj, _flat_linear(down, cfg, ActQuantizer(cfg.a_bits, lac), d_trans, lwc,
                                                 in_trans=d_trans))


@torch.no_grad()
def init_weight_clips(layer: nn.Module) -> None:
    """MSE-optimal starting clip ratios for every learnable weight clip, on the weights as first transformed."""
    for m in layer.modules():
        if isinstance(m, FlatQuantLinear) and m.weight_quantizer.clip is not None:
            m.weight_quantizer.init_clip_mse(m.effective_weight())


def iter_transforms(module: nn.Module):
    for m in module.modules():
        if isinstance(m, KroneckerTransform):
            yield m


@torch.no_grad()
def fold_layer(layer: nn.Module, adapter: Optional[ModelAdapter] = None) -> None:
    """Reparameterize one calibrated layer: freeze transforms, fold P⁻ᵀ into weights and diag scales into the
    preceding RMSNorm (q/k/v, gate/up) or into up_proj's rows (down_proj). Output is unchanged up to rounding."""
    ad = adapter or adapter_for(layer)
    for t in iter_transforms(layer):
        t.freeze()
    for m in list(layer.modules()):
        if isinstance(m, FlatQuantLinear):
            m.fold()
    for group in ad.groups:
        norm = ad.get(layer, group.norm)
        if isinstance(norm, FlatNormTransform):
            norm.fold()
    down = ad.get(layer, ad.down_proj)
    if isinstance(down, FlatQuantLinear) and down.in_trans is not None and down.in_trans.use_diag:
        d = down.in_trans.diag.double()
        up = ad.get(layer, ad.up_proj)
        up_linear = up.linear if isinstance(up, FlatQuantLinear) else up
        # act(gate)·(up·d) == (act(gate)·up)·d: the scale moves into up_proj's output rows.
        weight = up_linear.weight.data
        scaled = torch.empty_like(weight)  # a new tensor: the old one may be shared with a float original
        for a, b in _fold_blocks(weight):
            scaled[a:b] = (weight[a:b].double() * d[a:b, None]).to(weight.dtype)
        up_linear.weight.data = scaled
        if up_linear.bias is not None:
            up_linear.bias.data = (up_linear.bias.double() * d).to(up_linear.bias.dtype)
        down.in_trans.use_diag = False


def fold_model(model: nn.Module) -> None:
    ad = adapter_for(model)
    for layer in ad.decoder_layers(model):
        fold_layer(layer, ad)


def is_wrapped(layer: nn.Module) -> bool:
    return any(isinstance(m, (FlatQuantLinear, FlatNormTransform)) for m in layer.modules())


def set_weight_recompute(layer: nn.Module, enabled: bool) -> None:
    """Whether training recomputes each FlatQuantLinear's transformed, fake-quantized weight in backward (less
    memory) or keeps it from the forward (faster); the gradients are the same."""
    for m in layer.modules():
        if isinstance(m, FlatQuantLinear):
            m.checkpoint_weight = enabled


def set_quant_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn fake quantization on/off everywhere (transforms stay): off gives the float transformed model."""
    for m in model.modules():
        if isinstance(m, (FlatQuantLinear, KVCacheQuantizer)):
            m.quant_enabled = enabled


LM_HEAD_MIN_BITS = 8  # an lm_head int4 per channel costs 1.4-1.8x PPL on SmolLM2, int8 0.5% (BENCHMARKS.md)


def wrap_lm_head(model: nn.Module, cfg: FlatQuantConfig) -> bool:
    """With ``lm_head`` out of skip_layers: the output projection quantized with at least 8 bits (int8 weights per
    channel, round to nearest; int8 activations per token), no transform; the embedding it may share its weight
    with stays float. Done once per model, after the algorithm's model-level step (QuaRot rotates lm_head first);
    returns whether lm_head is quantized."""
    ad = adapter_for(model)
    if cfg.is_skipped(ad.lm_head_path):
        return False
    head = model.get_submodule(ad.lm_head_path)
    if not isinstance(head, nn.Linear):  # wrapped already (or converted)
        return True
    w_bits, a_bits = max(cfg.w_bits, LM_HEAD_MIN_BITS), max(cfg.a_bits, LM_HEAD_MIN_BITS)
    wrapped = FlatQuantLinear(head, w_bits, a_bits, False, ActQuantizer(a_bits, lac=False), ascend_served=False)
    wrapped.fold()  # nothing to fold: the deployable form from the start
    model.set_submodule(ad.lm_head_path, wrapped)
    return True


def flat_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The calibrated tensors of one (frozen, not yet folded) layer: transforms, diag scales, clip factors."""
    keep = ("trans.", "quantizer.", "kv_quantizer.")
    return {k: v.detach().cpu().clone() for k, v in layer.state_dict().items()
            if any(s in k for s in keep) or ".trans." in k}


def load_flat_state(layer: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of flat_state on a freshly wrapped layer: freeze its transforms to get buffers, then copy."""
    for t in iter_transforms(layer):
        t.freeze()
    own = layer.state_dict()
    expected = set(flat_state(layer))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise KeyError(f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise KeyError(f"{k}: shape {tuple(v.shape)} does not match the model's {tuple(own[k].shape)}")
    layer.load_state_dict(state, strict=False)
