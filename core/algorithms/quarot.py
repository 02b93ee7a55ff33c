"""QuaRot-style rotation: randomized Hadamard rotations that remove activation outliers without calibration.

1. Fuse every RMSNorm's weight into the linears that read it (q/k/v, gate/up, lm_head) and set it to one: an
   RMSNorm without weight commutes with any orthogonal Q (‖xQ‖ = ‖x‖).
2. Rotate the residual stream by one randomized Hadamard Q (core.hadamard): embeddings E·Q, every linear reading
   the stream W·Q (its input arrives as x·Q), every linear writing it Qᵀ·W (bias b·Q), lm_head W·Q. The float model
   computes the same function; the rotation lives in the weights (offline, float64, then the weights' dtype).
3. An online Hadamard before down_proj (a HadamardTransform as its input transform: W·H is folded, x·H runs
   online), whose input the residual rotation cannot reach.

Then the RTN modules of core.flat quantize the rotated model (per-channel weights, per-token activations), so real
quant, folding and GPTQ weight rounding apply unchanged. As in the QuaRot paper's setup, each weight row's clip ratio
is the MSE-optimal one of a grid (w_clip) and activations are clipped at a fixed 0.9 of their absmax (a_clip); both
are calibration-free and can be turned off."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
from torch import nn

from ..adapters import ModelAdapter, adapter_for
from ..config import FlatQuantConfig
from ..flat import FlatQuantLinear, flat_state, fold_layer, load_flat_state, wrap_layer
from ..hadamard import HadamardTransform, random_hadamard
from ..models import outside_layers, unshare_tensors
from ..quantizer import WeightQuantizer
from .base import LayerAlgorithm, build_uncalibrated


@dataclass
class QuaRotConfig:
    seed: int = 0  # the rotations are a function of it: saving the seed saves them
    online_down: bool = True  # the online Hadamard before down_proj
    w_clip: bool = True  # per-row MSE-optimal weight clip ratio (searched on the rotated weight)
    a_clip: Optional[float] = 0.9  # fixed activation clip ratio; None: no clipping


def _scale_columns(linear: nn.Linear, scale: torch.Tensor) -> None:
    linear.weight.data = (linear.weight.double() * scale[None, :]).to(linear.weight.dtype)


@torch.no_grad()
def untie_lm_head(model: nn.Module, ad: ModelAdapter) -> None:
    """Give lm_head its own weight when it shares the embedding's (SmolLM2): the two are changed differently."""
    head, embed = model.get_submodule(ad.lm_head_path), model.get_submodule(ad.embed_path)
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False


@torch.no_grad()
def fuse_layer_norms(layer: nn.Module, ad: ModelAdapter) -> None:
    """One decoder layer's part of fuse_norms."""
    for group in ad.groups:
        norm = layer.get_submodule(group.norm)
        w = norm.weight.double()
        for m in group.members:
            _scale_columns(layer.get_submodule(f"{group.parent}.{m}"), w)
        norm.weight.data.fill_(1.0)


@torch.no_grad()
def fuse_final_norm(model: nn.Module, ad: ModelAdapter) -> None:
    """The part of fuse_norms outside the decoder layers: lm_head gets its own weight, the final norm's."""
    untie_lm_head(model, ad)
    final = model.get_submodule(ad.final_norm_path)
    _scale_columns(model.get_submodule(ad.lm_head_path), final.weight.double())
    final.weight.data.fill_(1.0)


@torch.no_grad()
def fuse_norms(model: nn.Module, ad: Optional[ModelAdapter] = None) -> None:
    """Move every residual-stream RMSNorm's weight into the linears it feeds; the norms keep a weight of ones."""
    ad = ad or adapter_for(model)
    fuse_final_norm(model, ad)
    for layer in ad.decoder_layers(model):
        fuse_layer_norms(layer, ad)


def _rotate(t: torch.Tensor, fn) -> None:
    t.data = fn(t.data.double()).to(t.dtype)


@torch.no_grad()
def rotate_layer(layer: nn.Module, q: torch.Tensor, ad: ModelAdapter) -> None:
    """One decoder layer's part of rotate_residual: readers W·Q, writers Qᵀ·W (bias b·Q)."""
    for path in ad.readers():
        _rotate(layer.get_submodule(path).weight, lambda w: w @ q)
    for path in ad.writers():
        lin = layer.get_submodule(path)
        _rotate(lin.weight, lambda w: q.t() @ w)
        if lin.bias is not None:
            _rotate(lin.bias, lambda b: b @ q)


@torch.no_grad()
def rotate_outside(model: nn.Module, q: torch.Tensor, ad: ModelAdapter) -> None:
    """The part of rotate_residual outside the decoder layers: embeddings E·Q, lm_head W·Q."""
    _rotate(model.get_submodule(ad.embed_path).weight, lambda e: e @ q)
    _rotate(model.get_submodule(ad.lm_head_path).weight, lambda w: w @ q)


@torch.no_grad()
def rotate_residual(model: nn.Module, q: torch.Tensor, ad: Optional[ModelAdapter] = None) -> None:
    """Rotate the residual stream by the orthogonal q (float64): fuse_norms must have run first."""
    ad = ad or adapter_for(model)
    rotate_outside(model, q, ad)
    for layer in ad.decoder_layers(model):
        rotate_layer(layer, q, ad)


def check_float(model: nn.Module, ad: ModelAdapter) -> None:
    for layer in ad.decoder_layers(model):
        for path in ad.linears():
            kind = type(layer.get_submodule(path))
            if not issubclass(kind, nn.Linear):
                raise ValueError(f"rotate_model needs a float model; {path} is already a {kind.__name__}")


@torch.no_grad()
def rotate_model(model: nn.Module, cfg: Optional[QuaRotConfig] = None) -> nn.Module:
    """Steps 1 and 2 in place on a float model (not yet wrapped): same function, rotated weights."""
    cfg = cfg or QuaRotConfig()
    ad = adapter_for(model)
    check_float(model, ad)
    fuse_norms(model, ad)
    rotate_residual(model, residual_rotation(model, cfg), ad)
    return model


def residual_rotation(model: nn.Module, cfg: QuaRotConfig) -> torch.Tensor:
    return random_hadamard(int(model.config.hidden_size), cfg.seed)


def down_rotation(dim: int, index: int, cfg: QuaRotConfig) -> HadamardTransform:
    return HadamardTransform(dim, seed=cfg.seed + 1 + index)


def wrap_layer_quarot(layer: nn.Module, index: int, flat_cfg: FlatQuantConfig, cfg: Optional[QuaRotConfig] = None,
                      prefix: str = "model.layers", adapter: Optional[ModelAdapter] = None) -> None:
    """The RTN modules (per-channel int4 weights, per-token int4 activations, no learned transforms or clips) on a
    rotated layer, with the online Hadamard as down_proj's input transform."""
    cfg = cfg or QuaRotConfig()
    ad = adapter or adapter_for(layer)
    wrap_layer(layer, index, flat_cfg, None, use_transforms=False, prefix=prefix, adapter=ad)
    down = layer.get_submodule(ad.down_proj)
    if cfg.online_down and isinstance(down, FlatQuantLinear) and down.in_trans is None:
        h = down_rotation(down.in_features, index, cfg).to(down.linear.weight.device)  # the layer may be on a GPU
        ad.put(layer, ad.down_proj, FlatQuantLinear(down.linear, down.weight_quantizer.bits, down.act_quantizer.bits,
                                                    False, down.act_quantizer, in_trans=h, weight_trans=h,
                                                    ascend_served=down.ascend_served))
    set_clips(layer, cfg)


@torch.no_grad()
def set_clips(layer: nn.Module, cfg: QuaRotConfig) -> None:
    """The calibration-free clip ratios of cfg on every quantized linear of a wrapped layer (weights as rotated)."""
    for m in layer.modules():
        if not isinstance(m, FlatQuantLinear):
            continue
        if cfg.w_clip and m.weight_quantizer.bits < 16 and m.weight_quantizer.clip is None:
            m.weight_quantizer = WeightQuantizer(m.out_features, m.weight_quantizer.bits, lwc=True).requires_grad_(False)
            m.weight_quantizer.init_clip_mse(m.effective_weight())
        aq = m.act_quantizer
        if cfg.a_clip is not None and aq.bits < 16 and aq.clip is None:  # shared by q/k/v (gate/up): set once
            aq.clip = nn.Parameter(torch.logit(torch.tensor(float(cfg.a_clip))), requires_grad=False)


STATE_PREFIX = "quarot."


class QuaRotAlgorithm(LayerAlgorithm):
    """QuaRot as a layer-wise algorithm: the model-level step fuses the norms and rotates the residual stream
    (prepare_outside: embeddings, final norm, lm_head; prepare_model_layer: each decoder layer's linears and norms);
    each layer then gets the RTN modules, the online Hadamard before down_proj and the calibration-free clips. No
    calibration data. A layer's state is its quantizer tensors (clips, the online Hadamard's factors) plus the
    settings (``quarot.seed`` ...), from which --load_matrix rotates the model the same way again."""

    name = "quarot"
    needs_data = False

    def __init__(self, cfg: FlatQuantConfig, settings: Optional[dict] = None):
        super().__init__(cfg)
        known = {f.name for f in fields(QuaRotConfig)}
        unknown = set(settings or {}) - known
        if unknown:
            raise ValueError(f"unknown QuaRot setting(s) {sorted(unknown)}; known: {sorted(known)}")
        self.qcfg = QuaRotConfig(**(settings or {}))

    def settings(self) -> dict:
        return asdict(self.qcfg)

    @staticmethod
    def settings_from_state(state: dict) -> dict:
        if STATE_PREFIX + "seed" not in state:
            raise KeyError(f"{STATE_PREFIX}seed")
        a_clip = float(state[STATE_PREFIX + "a_clip"])  # -1: no activation clip (NaN would be refused on save)
        return {"seed": int(state[STATE_PREFIX + "seed"]), "online_down": bool(state[STATE_PREFIX + "online_down"]),
                "w_clip": bool(state[STATE_PREFIX + "w_clip"]), "a_clip": None if a_clip < 0 else a_clip}

    def prepare_outside(self, model: nn.Module, unshare: bool = False) -> torch.Tensor:
        """Norm fusion and rotation of the embeddings and lm_head; returns the rotation for every layer's part."""
        ad = adapter_for(model)
        check_float(model, ad)
        if unshare:
            unshare_tensors(model, outside_layers(model))
        fuse_final_norm(model, ad)
        q = residual_rotation(model, self.qcfg)
        rotate_outside(model, q, ad)
        return q

    def prepare_model_layer(self, layer: nn.Module, index: int, carry: torch.Tensor, unshare: bool = False) -> None:
        if unshare:
            unshare_tensors(layer)
        ad = adapter_for(layer)
        fuse_layer_norms(layer, ad)
        rotate_layer(layer, carry, ad)

    def prepare_layer(self, layer: nn.Module, index: int, stats) -> None:
        wrap_layer_quarot(layer, index, self.cfg, self.qcfg)

    def restore_layer(self, layer: nn.Module, index: int, state: dict) -> None:
        saved = self.settings_from_state(state)
        if saved != self.settings():
            raise KeyError(f"layer {index} was saved with QuaRot settings {saved}, not {self.settings()}")
        load_flat_state(layer, {k: v for k, v in state.items() if not k.startswith(STATE_PREFIX)})

    def layer_state(self, layer: nn.Module) -> dict:
        c = self.qcfg
        return {**flat_state(layer), STATE_PREFIX + "seed": torch.tensor(c.seed, dtype=torch.int64),
                STATE_PREFIX + "online_down": torch.tensor(c.online_down), STATE_PREFIX + "w_clip": torch.tensor(c.w_clip),
                STATE_PREFIX + "a_clip": torch.tensor(-1.0 if c.a_clip is None else c.a_clip, dtype=torch.float64)}

    def fold_layer(self, layer: nn.Module) -> None:
        fold_layer(layer)


def apply_quarot(model: nn.Module, flat_cfg: FlatQuantConfig, cfg: Optional[QuaRotConfig] = None,
                 num_layers: Optional[int] = None) -> nn.Module:
    """QuaRot-RTN on a float model in place: rotate, then wrap every layer (call core.flat.fold_model next, or
    GPTQ-round the folded weights with core.gptq)."""
    return build_uncalibrated(QuaRotAlgorithm(flat_cfg, asdict(cfg or QuaRotConfig())), model, num_layers)
