"""
Low-Rank Clone (LRC) in one file: an exact from-scratch teacher (Qwen2/Qwen2.5, Llama 3.x or dense
Qwen3), the LRC student whose every weight is generated from the teacher's by trainable low-rank
projections, the three losses, and the export of the merged student as a plain model of the teacher's
family. Section numbers refer to docs/spec.md.

Read top to bottom: config (the families and their switches), norm, RoPE, attention, the one decoder
layer, the model, the KV cache for generation, the loss head, the LRC student and the two baselines,
export, and at the end the Hugging Face checkpoint files (loading, saving, atomic writes).
"""
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import safe_open
from safetensors.torch import save_file


class LRCError(ValueError):
    """A problem with the user's input. Scripts print its one-line message instead of a traceback."""


# -----------------------------------------------------------------------------
# Config (spec section 2): three teacher families, one architecture with a few switches. Everything
# else (RMSNorm, SwiGLU FFN, grouped-query attention, rotate-half RoPE) is shared by all three.

class Family(NamedTuple):
    architecture: str                # config.json "architectures" of an exported student
    qkv_bias: bool                   # q/k/v projections carry biases (Qwen2); no other linear has one
    qk_norm: bool                    # per-head RMSNorm of q and k after the projection, before RoPE (Qwen3)
    default_head_dim: Optional[int]  # head_dim when config.json has none (None: hidden_size // heads)
    must_be_off: tuple               # config.json switches lrc refuses when true; written false on export


FAMILIES = {
    "qwen2": Family("Qwen2ForCausalLM", True, False, None, ("use_sliding_window",)),                 # Qwen2, Qwen2.5
    "llama": Family("LlamaForCausalLM", False, False, None, ("attention_bias", "mlp_bias")),          # Llama 3.x
    "qwen3": Family("Qwen3ForCausalLM", False, True, 128, ("attention_bias", "use_sliding_window")),  # dense Qwen3
}


def unsupported_family(model_type) -> LRCError:
    return LRCError(f"model_type={model_type!r} is not supported: lrc clones qwen2 (Qwen2, Qwen2.5), llama "
                    f"(Llama 3.x) and qwen3 (dense Qwen3) models, not MoE, sliding-window or other families: "
                    f"pick such a teacher")


LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None  # None: the family's default_head_dim, else hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    model_type: str = "qwen2"       # a key of FAMILIES
    rope_scaling: Optional[dict] = None  # None: plain RoPE; Llama 3: {"rope_type": "llama3", LLAMA3_ROPE...}
    extra: dict = field(default_factory=dict)  # other config.json keys (token ids, ...), kept on export

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise unsupported_family(self.model_type)
        if self.head_dim is None:
            self.head_dim = self.family.default_head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise LRCError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                           f"num_key_value_heads={self.num_key_value_heads}: fix config.json")

    # the switches of the one decoder layer (decoder_layer) and of the model's parameter names
    family = property(lambda self: FAMILIES[self.model_type])
    qkv_bias = property(lambda self: self.family.qkv_bias)
    qk_norm = property(lambda self: self.family.qk_norm)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        refuse_unsupported(d)
        names = {f.name for f in fields(cls)} - {"extra", "rope_theta", "rope_scaling"}
        known = {k: d[k] for k in names if d.get(k) is not None}
        # newer files nest theta and the rope type in rope_parameters, older ones use rope_scaling
        theta = d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta"))
        if theta is not None:
            known["rope_theta"] = float(theta)
        stated = [(key, rope_scaling_of(d[key], key)) for key in ("rope_parameters", "rope_scaling")
                  if isinstance(d.get(key), dict) and ({"rope_type", "type"} & set(d[key]))]
        if len(stated) == 2 and stated[0][1] != stated[1][1]:
            raise LRCError("config.json's rope_parameters and rope_scaling ask for different RoPE: keep one of them")
        skip = names | {"rope_theta", "rope_parameters", "rope_scaling", "architectures", "sliding_window",
                        "max_window_layers", "layer_types", "hidden_act", "attention_dropout",
                        *(key for family in FAMILIES.values() for key in family.must_be_off)}  # to_dict writes them
        extra = {k: v for k, v in d.items() if k not in skip}
        return cls(**known, rope_scaling=stated[0][1] if stated else None, extra=extra)

    @classmethod
    def from_pretrained(cls, path: str) -> "ModelConfig":
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise LRCError(f"no config.json in {path!r}: point to a Hugging Face checkpoint directory")
        with open(file) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        """config.json as Hugging Face writes it for the family: explicit head_dim, top-level rope_theta,
        Llama 3 scaling as rope_scaling (the form of the released Llama 3.x files)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("extra", "rope_scaling")}
        out = {"architectures": [self.family.architecture], **self.extra, **d, "hidden_act": "silu",
               "attention_dropout": 0.0, **{key: False for key in self.family.must_be_off}}
        if self.rope_scaling:
            out["rope_scaling"] = dict(self.rope_scaling)
        return out


def refuse_unsupported(d: dict):
    """One line for a family lrc does not clone, or a config.json switch the shared layer does not implement."""
    if d.get("model_type") not in FAMILIES:
        raise unsupported_family(d.get("model_type"))
    for key in FAMILIES[d["model_type"]].must_be_off:
        if d.get(key):
            raise LRCError(f"config.json sets {key}=true, which lrc does not implement for model_type "
                           f"{d['model_type']!r}: use a checkpoint with {key} false")
    if any(layer_type != "full_attention" for layer_type in d.get("layer_types") or []):
        raise LRCError("config.json's layer_types asks for sliding-window attention, which lrc does not implement: "
                       "use a checkpoint whose layers are all full_attention")
    if d.get("hidden_act", "silu") != "silu":
        raise LRCError(f"config.json has hidden_act={d['hidden_act']!r}; lrc's FFN is SwiGLU (silu): "
                       f"use a silu checkpoint")
    partial = (d.get("partial_rotary_factor", 1.0), (d.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    if set(partial) != {1.0}:
        raise LRCError("config.json asks for partial rotary embeddings, which lrc does not support: "
                       "use a checkpoint with RoPE on the whole head (partial_rotary_factor 1)")


def rope_scaling_of(params: dict, key: str) -> Optional[dict]:
    """None for plain RoPE, or the four numbers of Llama 3's 'llama3' rule; any other type is refused."""
    rope_type = params.get("rope_type", params.get("type"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise LRCError(f"config.json asks for rope type {rope_type!r} in {key}; lrc supports plain RoPE "
                       f"('default') and Llama 3's 'llama3' scaling: use a checkpoint with one of those")
    missing = [k for k in LLAMA3_ROPE if k not in params]
    if missing:
        raise LRCError(f"config.json's {key} of type 'llama3' lacks {missing[0]!r}: add it to config.json")
    return {"rope_type": "llama3", **{k: float(params[k]) for k in LLAMA3_ROPE[:3]},
            "original_max_position_embeddings": int(params["original_max_position_embeddings"])}


# -----------------------------------------------------------------------------
# RMSNorm and RoPE (spec section 2)

def rms_norm(x, weight, eps):
    # in float32, cast back to the input dtype, then scale: exactly Hugging Face's order of operations
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(head_dim, theta, scaling=None, device=None):
    """The rotation frequencies [head_dim/2] in float32. With Llama 3's 'llama3' scaling (spec section 2),
    exactly as transformers computes them: wavelengths 2*pi/f longer than original/low_freq_factor are
    slowed down by factor, those shorter than original/high_freq_factor are kept, and those in between are
    blended with smooth = (original/wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    if scaling is None:
        return inv_freq
    factor, low, high, original = (scaling[k] for k in LLAMA3_ROPE)
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_between = ~(wavelength < original / high) * ~(wavelength > original / low)
    return torch.where(in_between, blended, scaled)


def rope_cos_sin(positions, head_dim, theta, scaling=None):
    """cos, sin [T, head_dim] in float32 for the rotate-half convention."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):  # x [B, heads, T, head_dim]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


# -----------------------------------------------------------------------------
# Attention: causal, grouped-query; during generation it reads and extends a KVCache

def attention(q, k, v, cos, sin, head_dim, cache=None, layer_index=0):
    """q [B,T,H*hd], k/v [B,T,Hkv*hd] (after projection and bias) -> [B,T,H*hd]."""
    B, T, _ = q.shape
    q, k, v = (t.view(B, T, -1, head_dim).transpose(1, 2) for t in (q, k, v))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None:
        k, v = cache.update(layer_index, k, v)
    S = k.shape[2]
    if S == T:
        mask, causal = None, True
    else:  # the T queries are positions S-T .. S-1 of a cached sequence
        mask = torch.arange(S, device=q.device)[None, :] <= torch.arange(S - T, S, device=q.device)[:, None]
        causal = False
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                       scale=1.0 / math.sqrt(head_dim), enable_gqa=k.shape[1] != q.shape[1])
    return y.transpose(1, 2).reshape(B, T, -1)


# -----------------------------------------------------------------------------
# One decoder layer as a function of its weights, shared by the teacher, the LRC student and the
# exported student of every family, so that all of them compute exactly the same thing. The config's
# switches (qkv_bias, qk_norm, rope_scaling) are the only differences between the families.

class LayerWeights(NamedTuple):
    attn_norm: torch.Tensor     # [d]
    q: torch.Tensor             # [H*hd, d]
    q_bias: Optional[torch.Tensor]  # [H*hd]   (qkv_bias only, else None)
    k: torch.Tensor             # [Hkv*hd, d]
    k_bias: Optional[torch.Tensor]  # [Hkv*hd]
    v: torch.Tensor             # [Hkv*hd, d]
    v_bias: Optional[torch.Tensor]  # [Hkv*hd]
    o: torch.Tensor             # [d, H*hd]
    ffn_norm: torch.Tensor      # [d]
    gate: torch.Tensor          # [f, d]
    up: torch.Tensor            # [f, d]
    down: torch.Tensor          # [d, f]
    q_norm: Optional[torch.Tensor] = None  # [hd]   (qk_norm only: one RMSNorm weight for every q head)
    k_norm: Optional[torch.Tensor] = None  # [hd]


# where each weight lives in a Hugging Face checkpoint, below model.layers.{i}.
HF_NAMES = LayerWeights(
    attn_norm="input_layernorm.weight", q="self_attn.q_proj.weight", q_bias="self_attn.q_proj.bias",
    k="self_attn.k_proj.weight", k_bias="self_attn.k_proj.bias", v="self_attn.v_proj.weight",
    v_bias="self_attn.v_proj.bias", o="self_attn.o_proj.weight", ffn_norm="post_attention_layernorm.weight",
    gate="mlp.gate_proj.weight", up="mlp.up_proj.weight", down="mlp.down_proj.weight",
    q_norm="self_attn.q_norm.weight", k_norm="self_attn.k_norm.weight")


class Activations(NamedTuple):
    """What the clone loss compares (spec section 4): q, k, v as the projections give them (after the
    bias, before the q/k norm and RoPE), gate before SiLU, up, and the attention and FFN outputs
    (after o_proj / down_proj, before the residual add). attn, the attention output before o_proj
    [B,T,H*hd], serves clone_attn_out='teacher'."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    ffn_out: torch.Tensor
    attn: Optional[torch.Tensor] = None


def decoder_layer(x, w: LayerWeights, cos, sin, config, cache=None, layer_index=0):
    eps, hd = config.rms_norm_eps, config.head_dim
    h = rms_norm(x, w.attn_norm, eps)
    q, k, v = F.linear(h, w.q, w.q_bias), F.linear(h, w.k, w.k_bias), F.linear(h, w.v, w.v_bias)
    q_rope, k_rope = q, k
    if config.qk_norm:  # Qwen3: RMSNorm over each head's hd features, then RoPE
        q_rope = rms_norm(q.unflatten(-1, (-1, hd)), w.q_norm, eps).flatten(-2)
        k_rope = rms_norm(k.unflatten(-1, (-1, hd)), w.k_norm, eps).flatten(-2)
    attn = attention(q_rope, k_rope, v, cos, sin, hd, cache, layer_index)  # [B,T,H*hd]
    o = F.linear(attn, w.o)
    x = x + o
    h = rms_norm(x, w.ffn_norm, eps)
    gate, up = F.linear(h, w.gate), F.linear(h, w.up)
    ffn_out = F.linear(F.silu(gate) * up, w.down)
    return x + ffn_out, Activations(q, k, v, o, gate, up, ffn_out, attn)


# -----------------------------------------------------------------------------
# The model, with Hugging Face's parameter names so checkpoints of each family load by name

class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        d, hd = c.hidden_size, c.head_dim
        self.input_layernorm = RMSNorm(d, c.rms_norm_eps)
        self.self_attn = nn.ModuleDict(dict(
            q_proj=nn.Linear(d, c.num_attention_heads * hd, bias=c.qkv_bias),
            k_proj=nn.Linear(d, c.num_key_value_heads * hd, bias=c.qkv_bias),
            v_proj=nn.Linear(d, c.num_key_value_heads * hd, bias=c.qkv_bias),
            o_proj=nn.Linear(c.num_attention_heads * hd, d, bias=False)))
        self.qk_norm = c.qk_norm
        if c.qk_norm:
            self.self_attn.update(dict(q_norm=RMSNorm(hd, c.rms_norm_eps), k_norm=RMSNorm(hd, c.rms_norm_eps)))
        self.post_attention_layernorm = RMSNorm(d, c.rms_norm_eps)
        self.mlp = nn.ModuleDict(dict(
            gate_proj=nn.Linear(d, c.intermediate_size, bias=False),
            up_proj=nn.Linear(d, c.intermediate_size, bias=False),
            down_proj=nn.Linear(c.intermediate_size, d, bias=False)))

    def weights(self) -> LayerWeights:
        a, m = self.self_attn, self.mlp  # (biases are None without qkv_bias, as are q/k norms without qk_norm)
        return LayerWeights(
            attn_norm=self.input_layernorm.weight,
            q=a.q_proj.weight, q_bias=a.q_proj.bias, k=a.k_proj.weight, k_bias=a.k_proj.bias,
            v=a.v_proj.weight, v_bias=a.v_proj.bias, o=a.o_proj.weight,
            ffn_norm=self.post_attention_layernorm.weight,
            gate=m.gate_proj.weight, up=m.up_proj.weight, down=m.down_proj.weight,
            q_norm=a.q_norm.weight if self.qk_norm else None, k_norm=a.k_norm.weight if self.qk_norm else None)

    def forward(self, x, cos, sin, config, cache=None, layer_index=0):
        """This layer (decoder_layer with this block's weights). CausalLM.hidden, and LRCLayer for the teacher
        stream, run a block through it, so that a wrapper hooked on forward() (FSDP2, which gathers a unit around
        its modules' forwards) sees the block run."""
        return decoder_layer(x, self.weights(), cos, sin, config, cache, layer_index)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(c.vocab_size, c.hidden_size),
            layers=nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers)),
            norm=RMSNorm(c.hidden_size, c.rms_norm_eps)))
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module, std=0.02):  # Hugging Face's initializer_range; used for scratch/KD students
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden(self, idx, cache=None):
        """idx [B,T] -> final-normed hidden states [B,T,d]."""
        c = self.config
        start = cache.pos if cache is not None else 0
        positions = torch.arange(start, start + idx.shape[1], device=idx.device)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, c.rope_scaling)
        x = self.model.embed_tokens(idx)
        for layer_index, block in enumerate(self.model.layers):
            x, _ = block(x, cos, sin, c, cache, layer_index)
        if cache is not None:
            cache.pos += idx.shape[1]
        return self.model.norm(x)

    def forward(self, idx, cache=None):
        return self.lm_head(self.hidden(idx, cache))  # logits [B,T,V]


# The names from before Llama and Qwen3 teachers, kept: tests, scripts and users import them.
Qwen2Config, Qwen2, qwen2_layer = ModelConfig, CausalLM, decoder_layer


# -----------------------------------------------------------------------------
# The KV cache: incremental decoding for generation (eval_tiny.generate), one position per new token

class KVCache:
    """Preallocated keys and values for incremental decoding: each new token costs one position."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached; advanced by CausalLM.hidden after all layers

    def update(self, layer_index, k, v):  # k, v [B, Hkv, T, hd] -> all keys/values so far
        end = self.pos + k.shape[2]
        if end > self.k.shape[3]:
            raise LRCError(f"KV cache holds {self.k.shape[3]} positions, {end} needed: allocate a longer cache")
        self.k[layer_index, :, :, self.pos:end] = k
        self.v[layer_index, :, :, self.pos:end] = v
        return self.k[layer_index, :, :, :end], self.v[layer_index, :, :, :end]


# -----------------------------------------------------------------------------
# The loss head: L_KL + L_LM straight from the final hidden states (spec section 4)
#
# At a 152k vocabulary one [N, V] float32 tensor is ~10 GB for N = 16k positions. The head therefore
# walks over chunks of positions, fuses logits, log-softmax, both losses and their gradients per chunk,
# and keeps only the gradients w.r.t. its inputs (the size of the hidden states and of the head weight).

class DistillHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, W_s, h_t, W_t, targets, tau, batch_size, chunk_size, need_grad):
        """h_s [N,d_s], W_s [V,d_s]: student; h_t [N,d], W_t [V,d]: teacher, or None for no KL;
        targets [N], -1 = ignore; N = B*T positions. Returns (L_KL + L_LM, L_KL, L_LM); the gradient
        of the first is computed here, chunk by chunk, and only scaled in backward."""
        # Autocast is turned off in here and the dtype of every matmul is written out: the logits in autocast's
        # dtype when it is on (bf16 on GPU, as F.linear would run them; else the inputs' dtype), softmax, the
        # losses and grad_W in float32. Left on, autocast would run grad_W's float32 product in bf16 (undoing
        # the .float() and making a second bf16 copy of each [n, V] grad chunk) and, for a float32 W_s (kd,
        # scratch, sft), cast W_s.T to bf16 again in every chunk. backward has no matmul: autocast is moot there.
        device = h_s.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        with torch.autocast(device, enabled=False):
            W_c = W_s.to(dtype or W_s.dtype)                          # cast once, not per chunk
            W_tc = W_t.to(dtype or W_t.dtype) if h_t is not None else None
            n_valid = (targets >= 0).sum().clamp(min=1).float()
            kl_sum = torch.zeros((), device=h_s.device)
            nll_sum = torch.zeros((), device=h_s.device)
            grad_h = torch.empty_like(h_s) if need_grad else None
            grad_W = torch.zeros(W_s.shape, device=W_s.device, dtype=torch.float32) if need_grad else None
            for start in range(0, h_s.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                logits = (h_s[rows].to(W_c.dtype) @ W_c.T).float()    # [n, V]
                tgt = targets[rows]
                valid = tgt >= 0
                log_q = torch.log_softmax(logits, dim=-1)
                # in place where a value is used for the last time, freed as soon as done: each [n, V]
                # temporary is memory (at most four are alive at once)
                log_q_tau = torch.log_softmax(logits.div_(tau), dim=-1) if h_t is not None else None
                del logits
                nll_sum += -(log_q.gather(1, tgt.clamp(min=0)[:, None])[:, 0] * valid).sum()
                if need_grad:  # d L_LM / d logits = (softmax(z_s) - onehot) / n_valid
                    grad = log_q.exp_()
                    # the one-hot as a scatter, not boolean indexing: no host sync on GPU; rows
                    # with no target add -0.0 (a no-op) and are zeroed by the next line anyway
                    grad.scatter_add_(1, tgt.clamp(min=0)[:, None], -valid[:, None].to(grad.dtype))
                    grad *= valid[:, None] / n_valid
                del log_q
                if h_t is not None:
                    log_p = torch.log_softmax((h_t[rows].to(W_tc.dtype) @ W_tc.T).float().div_(tau), dim=-1)
                    p = log_p.exp()
                    kl_sum += log_p.sub_(log_q_tau).mul_(p).sum()
                    if need_grad:  # d L_KL / d logits = (softmax(z_s / tau) - p) / (tau * B)
                        grad += log_q_tau.exp_().sub_(p).div_(tau * batch_size)
                    del log_p, log_q_tau, p
                if need_grad:
                    grad_h[rows] = (grad.to(W_c.dtype) @ W_c).to(h_s.dtype)
                    grad_W.addmm_(grad.T, h_s[rows].float())          # float32 (TF32 on GPU: train.py allows it), in place
                    del grad
            kl, lm = kl_sum / batch_size, nll_sum / n_valid
        ctx.save_for_backward(grad_h, grad_W)
        ctx.W_dtype = W_s.dtype
        ctx.mark_non_differentiable(kl, lm)
        return kl + lm, kl, lm

    @staticmethod
    def backward(ctx, grad_total, _grad_kl, _grad_lm):
        grad_h, grad_W = ctx.saved_tensors
        return (grad_h * grad_total.to(grad_h.dtype), (grad_W * grad_total).to(ctx.W_dtype),
                None, None, None, None, None, None, None)


def distill_loss(student_hidden, student_head, targets, teacher_hidden=None, teacher_head=None,
                 tau=40.0, chunk_size=None):
    """(L_KL + L_LM, L_KL, L_LM) with the reference reductions (spec section 4):
    L_KL = sum over positions of KL(softmax(z_t/tau) || softmax(z_s/tau)) / B  (no tau^2 factor),
    L_LM = mean cross-entropy at tau = 1. No teacher: L_KL = 0 (the scratch baseline)."""
    B, T, _ = student_hidden.shape
    V = student_head.shape[0]
    chunk_size = chunk_size or max(1, 2**26 // V)  # ~256 MB of float32 per [chunk, V] temporary
    need_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.requires_grad)
    h_t = teacher_hidden.reshape(B * T, -1) if teacher_hidden is not None else None
    return DistillHead.apply(student_hidden.reshape(B * T, -1), student_head, h_t, teacher_head,
                             targets.reshape(B * T), tau, B, chunk_size, need_grad)


# -----------------------------------------------------------------------------
# The LRC student (spec section 3): projections generate every student weight from the teacher's

def student_shape(teacher_config: ModelConfig, student_hidden: int, tie_proj: bool) -> ModelConfig:
    """The student's architecture (spec sections 3 and 5): the teacher's (same family and RoPE) with
    hidden_size = d_s and an explicit head_dim; its embeddings are tied exactly when the teacher's are and
    tie_proj is on. The LRC student is exported in this shape, and the kd / scratch baselines are built in it."""
    c = teacher_config
    if not 1 <= student_hidden <= c.hidden_size:
        raise LRCError(f"student_hidden={student_hidden} must be between 1 and the teacher's hidden_size "
                       f"{c.hidden_size} (equal only reproduces the teacher): pick a smaller student_hidden")
    return replace(c, hidden_size=student_hidden, head_dim=c.head_dim,
                   tie_word_embeddings=c.tie_word_embeddings and tie_proj, extra=dict(c.extra),
                   rope_scaling=dict(c.rope_scaling) if c.rope_scaling else None)


# Qwen3 teachers (spec sections 3 and 4). The per-head q/k norms act on head_dim, which the student keeps:
# their weights [hd] are the teacher's, reused unchanged and frozen like Qwen2's q/k/v biases (W^S = W).
# The clone loss compares q and k as the projections give them, q = h @ W_q^S.T, before the q/k norm and
# RoPE: (1) that is what the generated weights produce, as every other term compares (gate before SiLU,
# q/k/v before RoPE), so each q/k term stays a least-squares fit of the generated weight's output;
# (2) the norm is a fixed, shared function of it, so matching before the norm implies matching after,
# and the identity property still gives L_clone = 0; (3) a term after the norm would reach P_q only
# through the per-head normalisation, which drops each head's radial component and scales by 1/rms(q).
# Not measured: Qwen3's pre-norm q/k may be larger than the other activations and weigh more in L_clone.

INPUT_SIDE = ("P_q", "P_k", "P_v", "P_gate", "P_up")   # [d, d_s]: W_S = W @ P
OUTPUT_SIDE = ("P_o", "P_down")                         # [d_s, d]: W_S = P @ W
GENERATED = {"q": "P_q", "k": "P_k", "v": "P_v", "o": "P_o", "gate": "P_gate", "up": "P_up", "down": "P_down"}
# the seven terms of L_clone (spec section 4), by the activation they compare: q, k, v (before RoPE), the
# attention output o, gate (before SiLU), up, and the FFN output down; "attn" and "ffn" name the two halves
CLONE_TERMS = ("q", "k", "v", "o", "gate", "up", "down")
CLONE_GROUPS = {"all": CLONE_TERMS, "attn": ("q", "k", "v", "o"), "ffn": ("gate", "up", "down"), "none": ()}


def clone_terms_of(spec) -> tuple:
    """'all', 'attn', 'ffn', 'none', or a comma-separated list ('q,k,v,o'), or an iterable of names ->
    the selected terms in CLONE_TERMS order."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen = set()
    for name in (n.strip() for n in names):
        if name not in CLONE_GROUPS and name not in CLONE_TERMS:
            raise LRCError(f"clone term {name!r} is not one of {', '.join(CLONE_TERMS)} (or the groups "
                           f"{', '.join(CLONE_GROUPS)}): e.g. clone_terms='attn' or 'q,k,v,o'")
        chosen.update(CLONE_GROUPS.get(name, (name,)))
    return tuple(t for t in CLONE_TERMS if t in chosen)


def project(W, P, input_side: bool):
    """One generated weight, in W's dtype: W @ P (input side) or P @ W (output side)."""
    P = P.to(W.dtype)
    return W @ P if input_side else P @ W


# Generating once per optimizer step (generate='step', spec section 3). The projections change only at
# optimizer.step(), so every micro-step of one optimizer step uses the same student weights. generate='micro_step'
# makes them in every forward and forms dP = W.T @ dW_S in every backward. generate='step' makes them once,
# before the first micro-step (LRC.generated_once); each micro-step's backward adds its dW_S to a float32
# sum, and the last one forms dP from the whole sum, in the backward where DDP all-reduces and FSDP2
# reduce-scatters the projections' gradients. W.T @ sum_m dW_m = sum_m W.T @ dW_m: the same gradients to
# rounding, for 2 weight-sized matmuls per weight and step instead of 2 x grad_accum.

class StepWeights:
    """The generated weights of one module for the current optimizer step: name -> W_S [out, in] in the
    compute dtype, a leaf that every micro-step's forward reads, and the float32 sum of the gradients the
    micro-steps' backwards gave it (a hook moves each one there). Kept from step to step, refilled in place."""

    def __init__(self):
        self.weights, self.grad_sums = {}, {}

    def make(self, name, made):
        """This step's value of a weight (made under no_grad); its gradient sum starts again from zero."""
        if name not in self.weights:
            weight = made.detach().requires_grad_()
            grad_sum = torch.zeros(made.shape, dtype=torch.float32, device=made.device)
            weight.register_post_accumulate_grad_hook(lambda w, grad_sum=grad_sum: _move_grad(w, grad_sum))
            self.weights[name], self.grad_sums[name] = weight, grad_sum
        else:
            self.weights[name].detach().copy_(made)
            self.grad_sums[name].zero_()

    def read(self, name, W, P, input_side, last_micro_step):
        """W_S for a micro-step's forward: the leaf; in the last micro-step, the same values through
        FinishGeneration, whose backward forms the projection's gradient of the whole step."""
        if not last_micro_step:
            return self.weights[name]
        return FinishGeneration.apply(self.weights[name].detach(), self.grad_sums[name], W, P, input_side)


def _move_grad(weight, grad_sum):  # after each backward into a StepWeights leaf: its gradient joins the sum
    if weight.grad is not None:  # None: a compiled last micro-step, which reads the leaf only through detach()
        grad_sum += weight.grad
        weight.grad = None


class FinishGeneration(torch.autograd.Function):
    """The last micro-step's W_S. Forward: the weight made at the step's start, as is (nothing is recomputed).
    Backward: this micro-step's dW_S plus the earlier ones' sum, through the projection once: dP = W.T @ sum
    (input side) or sum @ W.T (output side), a matmul in W's dtype as in generate='micro_step'."""

    @staticmethod
    def forward(ctx, made, grad_sum, W, P, input_side):
        ctx.save_for_backward(grad_sum, W)
        ctx.input_side, ctx.P_dtype = input_side, P.dtype
        return made.view_as(made)

    @staticmethod
    def backward(ctx, grad):
        grad_sum, W = ctx.saved_tensors
        total = (grad_sum + grad).to(W.dtype)
        grad_P = W.T @ total if ctx.input_side else total @ W.T
        return None, None, None, grad_P.to(ctx.P_dtype), None


class LRCLayer(nn.Module):
    def __init__(self, d, d_s, init_std, device=None):
        super().__init__()
        # drawn by the CPU's generator, then moved: the same seed gives the same student on any device
        for name in INPUT_SIDE:
            setattr(self, name, nn.Parameter((torch.randn(d, d_s) * init_std).to(device)))
        for name in OUTPUT_SIDE:
            setattr(self, name, nn.Parameter((torch.randn(d_s, d) * init_std).to(device)))
        self.attn_norm = nn.Parameter(torch.ones(d_s, device=device))
        self.ffn_norm = nn.Parameter(torch.ones(d_s, device=device))
        self.step_weights = StepWeights()  # generate='step' only

    def generate(self, teacher: LayerWeights) -> LayerWeights:
        """The student layer's weights, made here: one matmul per weight, never per token (spec 3). The
        student computes in the teacher's dtype; the projections stay float32 masters. What acts on head_dim
        only (q/k/v biases, q/k norm weights) is the teacher's, unchanged and frozen."""
        made = {name: project(getattr(teacher, name), getattr(self, P), P in INPUT_SIDE) for name, P in GENERATED.items()}
        return self.with_norms(teacher._replace(**made))

    def read_step_weights(self, teacher: LayerWeights, last_micro_step: bool) -> LayerWeights:
        """generate='step': the weights LRC.generated_once made for this optimizer step (StepWeights)."""
        made = {name: self.step_weights.read(name, getattr(teacher, name), getattr(self, P), P in INPUT_SIDE,
                                             last_micro_step) for name, P in GENERATED.items()}
        return self.with_norms(teacher._replace(**made))

    def with_norms(self, weights: LayerWeights) -> LayerWeights:
        dt = weights.q.dtype  # the norms are trained directly, never generated
        return weights._replace(attn_norm=self.attn_norm.to(dt), ffn_norm=self.ffn_norm.to(dt))

    def clone_loss(self, s: Activations, t: Activations, terms=CLONE_TERMS, teacher_o=None):
        """Spec section 4: the sum over `terms` of the MSE of q, k, v, gate, up, the attention output (o) and
        the FFN output (down); terms not selected are not computed. Gradient flows through both sides, as
        in the reference. The FFN output of the teacher is brought to student width by the very P_down
        that generates W_down^S; the attention output likewise by P_o (clone_attn_out='student', the
        paper's form), or, given the teacher's W_o (clone_attn_out='teacher', the official code's form),
        both are compared at teacher width d before P_o: E(a_s @ W_o.T, a_t @ W_o.T), with a the attention
        output before o_proj. q and k: before Qwen3's q/k norm (see above)."""
        dt = t.o.dtype
        loss = 0.0
        for term in terms:
            if term == "o" and teacher_o is not None:
                student, teacher = F.linear(s.attn, teacher_o), t.o
            elif term == "o":
                student, teacher = s.o, t.o @ self.P_o.to(dt).T
            elif term == "down":
                student, teacher = s.ffn_out, t.ffn_out @ self.P_down.to(dt).T
            else:
                student, teacher = getattr(s, term), getattr(t, term)
            loss = loss + F.mse_loss(student, teacher)
        return loss

    def forward(self, block: "Block", x_t, x_s, cos, sin, config, with_teacher=True, checkpoint=False,
                terms=CLONE_TERMS, clone_attn_out="student", last_micro_step=None):
        """Layer i of both streams (spec section 4): generate the student weights from the teacher block's,
        run the teacher layer (no grad), then the student layer and its clone loss over `terms`. Returns
        (x_t, x_s, clone_i); clone_i is None without the teacher or without terms. last_micro_step: None,
        the weights are made here; False or True, generate='step' made them for this optimizer step.

        Organised for a wrapper that gathers parameters around forward() calls (FSDP2's fully_shard([block,
        layer]) as one unit, distributed.py): everything layer i reads, the teacher block's weights and this
        layer's projections, is read inside this forward(), and the teacher stream runs through the block's
        own forward(), since FSDP2 completes a unit (frees it after forward, hooks its backward) only once
        each of its modules has run."""
        teacher_weights = block.weights()
        # generated outside any checkpoint, so recomputation never generates them twice (spec 3)
        student_weights = (self.generate(teacher_weights) if last_micro_step is None else
                           self.read_step_weights(teacher_weights, last_micro_step))
        teacher_o = teacher_weights.o if clone_attn_out == "teacher" else None
        act_t = None
        if with_teacher:
            with torch.no_grad():
                x_t, act_t = block(x_t, cos, sin, config)
            if not terms:
                act_t = None  # nothing to compare: the teacher's activations need not be kept
        args = (self, x_s, student_weights, act_t, cos, sin, config, terms, teacher_o)
        if checkpoint and torch.is_grad_enabled():
            # recomputes the student layer and its clone loss only: the teacher's activations are
            # inputs (kept anyway for the clone loss), so the teacher never runs twice
            x_s, clone_i = torch.utils.checkpoint.checkpoint(student_layer, *args, use_reentrant=False)
        else:
            x_s, clone_i = student_layer(*args)
        return x_t, x_s, clone_i


def student_layer(layer: LRCLayer, x_s, weights: LayerWeights, act_t: Optional[Activations], cos, sin, config,
                  terms=CLONE_TERMS, teacher_o=None):
    """One student layer and, given the teacher's activations, its clone loss (spec section 4)."""
    x_s, act_s = decoder_layer(x_s, weights, cos, sin, config)
    return x_s, (layer.clone_loss(act_s, act_t, terms, teacher_o) if act_t is not None else None)


class LRC(nn.Module):
    def __init__(self, teacher: CausalLM, student_hidden: int, tie_proj: bool = True, alpha: float = 0.5,
                 tau: float = 40.0, init_std: float = 0.02, checkpoint_layers: bool = False,
                 clone_attn_out: str = "student", clone_terms="all"):
        super().__init__()
        # checkpoint_layers: keep only each student layer's inputs and recompute the rest in backward
        # (less activation memory for ~one more student forward; losses and gradients unchanged)
        self.checkpoint_layers = checkpoint_layers
        # clone_attn_out: the attention-output clone term at student width ("student", the paper) or at
        # teacher width ("teacher", the official code; LRCLayer.clone_loss). Export does not depend on it.
        if clone_attn_out not in ("student", "teacher"):
            raise LRCError(f"clone_attn_out={clone_attn_out!r}: use 'student' (the paper's term, at student "
                           f"width) or 'teacher' (the official code's, at teacher width)")
        self.clone_attn_out = clone_attn_out
        # the terms of L_clone (CLONE_TERMS, by default all seven); with none, or alpha = 0, the teacher's
        # intermediate activations are not kept and no clone term is computed: weight generation with KL + LM
        self.clone_terms = clone_terms_of(clone_terms) if alpha != 0 else ()
        c = teacher.config
        student_shape(c, student_hidden, tie_proj)  # checks student_hidden
        teacher.requires_grad_(False)
        self.teacher = teacher
        self.student_hidden, self.tie_proj, self.alpha, self.tau = student_hidden, tie_proj, alpha, tau
        d, d_s = c.hidden_size, student_hidden
        # drawn by the CPU's generator, then moved to the teacher's device: the same seed gives the same student
        # whether the teacher is on a GPU (DDP) or in host memory until FSDP2 shards it
        device = teacher.lm_head.weight.device
        self.layers = nn.ModuleList(LRCLayer(d, d_s, init_std, device) for _ in range(c.num_hidden_layers))
        self.P_emb = nn.Parameter((torch.randn(d, d_s) * init_std).to(device))
        self.P_lm = None if tie_proj else nn.Parameter((torch.randn(d, d_s) * init_std).to(device))
        self.final_norm = nn.Parameter(torch.ones(d_s, device=device))
        # generate='step' (StepWeights): whether the weights of the optimizer step in progress were made by
        # generated_once, and whether the coming forward is its last micro-step (set by distributed.micro_step)
        self.head_step_weights = StepWeights()
        self.step_weights_ready = False
        self.last_micro_step = False

    @property
    def student_config(self) -> ModelConfig:
        return student_shape(self.teacher.config, self.student_hidden, self.tie_proj)

    def student_head(self):
        """W_lm^S = W_lm @ P_lm, or W_lm @ P_emb with tie_proj (spec section 3): [V, d_s]. For a tied
        teacher W_lm is E, so with tie_proj the student's head is its embedding E @ P_emb."""
        P = self.P_emb if self.P_lm is None else self.P_lm
        W = self.teacher.lm_head.weight
        if self.step_weights_ready:
            return self.head_step_weights.read("head", W, P, True, self.last_micro_step)
        return project(W, P, input_side=True)

    def step_weight_tensors(self):
        """What generate='step' keeps allocated from one optimizer step to the next: each generated weight and
        its float32 gradient sum (StepWeights), refilled in place every step."""
        return [t for s in [*(layer.step_weights for layer in self.layers), self.head_step_weights]
                for t in (*s.weights.values(), *s.grad_sums.values())]

    @contextmanager
    def generated_once(self, gathered=lambda module: nullcontext()):
        """generate='step': the micro-steps of one optimizer step run inside this block; every student weight is
        made here, once, layer by layer (StepWeights). gathered(module) makes a module whole while its weights
        are made, if FSDP2 shards it (distributed.gathered)."""
        with torch.no_grad():
            for block, layer in zip(self.teacher.model.layers, self.layers):
                with gathered(layer):
                    made = layer.generate(block.weights())
                    for name in GENERATED:
                        layer.step_weights.make(name, getattr(made, name))
            with gathered(self):
                self.head_step_weights.make("head", self.student_head())
        self.step_weights_ready = True
        try:
            yield
        finally:
            self.step_weights_ready = self.last_micro_step = False

    def side_by_side(self, idx, with_teacher=True):
        """Run teacher and student side by side, layer by layer (spec section 4).
        Returns the final-normed student hidden [B,T,d_s], teacher hidden [B,T,d] and L_clone."""
        teacher, c = self.teacher, self.teacher.config
        cos, sin = rope_cos_sin(torch.arange(idx.shape[1], device=idx.device), c.head_dim, c.rope_theta,
                                c.rope_scaling)
        with torch.no_grad():
            x_t = teacher.model.embed_tokens(idx)
        # E^S[idx] = E[idx] @ P_emb: same value as looking up E @ P_emb, without forming the [V, d_s] matrix
        x_s = x_t @ self.P_emb.to(x_t.dtype)
        clone = torch.zeros((), device=idx.device)
        for block, layer in zip(teacher.model.layers, self.layers):
            x_t, x_s, layer_clone = layer(block, x_t, x_s, cos, sin, c, with_teacher, self.checkpoint_layers,
                                          self.clone_terms, self.clone_attn_out,
                                          self.last_micro_step if self.step_weights_ready else None)
            if layer_clone is not None:
                clone = clone + layer_clone
        h_s = rms_norm(x_s, self.final_norm.to(x_s.dtype), c.rms_norm_eps)
        h_t = teacher.model.norm(x_t) if with_teacher else None
        return h_s, h_t, clone

    def forward(self, idx, targets):
        """L = L_KL + L_LM + alpha * L_clone (spec section 4); targets[b,t] follows idx[b,t]."""
        h_s, h_t, clone = self.side_by_side(idx)
        head_loss, kl, lm = distill_loss(h_s, self.student_head(), targets, h_t, self.teacher.lm_head.weight,
                                         tau=self.tau)
        loss = head_loss + self.alpha * clone
        return loss, {"kl": kl, "lm": lm, "clone": clone.detach()}

    def checkpoint_tensors(self):
        """What a training checkpoint holds: the trainable parameters by name (P_emb, layers.0.P_q, ...)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def student_logits(self, idx):
        """The training-time student's logits [B,T,V], without running the teacher stream."""
        h_s, _, _ = self.side_by_side(idx, with_teacher=False)
        return h_s @ self.student_head().T

    # -------------------------------------------------------------------------
    # Export (spec section 5): multiply the projections into plain weights

    @torch.no_grad()
    def export_student(self, dtype=None) -> CausalLM:
        teacher = self.teacher
        E = teacher.model.embed_tokens.weight
        dtype = as_dtype(dtype) if dtype is not None else E.dtype
        with torch.device("meta"):
            student = CausalLM(self.student_config)
        merged = {"model.embed_tokens.weight": E @ self.P_emb.to(E.dtype), "model.norm.weight": self.final_norm}
        if not student.config.tie_word_embeddings:
            merged["lm_head.weight"] = self.student_head()
        for i, (block, layer) in enumerate(zip(teacher.model.layers, self.layers)):
            w = layer.generate(block.weights())
            merged.update({f"model.layers.{i}.{name}": tensor for name, tensor in zip(HF_NAMES, w)
                           if tensor is not None})
        # clone(): the exported model must not share storage with the teacher's biases and q/k norms
        missing, unexpected = student.load_state_dict({k: v.to(dtype).clone() for k, v in merged.items()},
                                                      strict=False, assign=True)
        assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
        if student.config.tie_word_embeddings:
            student.lm_head.weight = student.model.embed_tokens.weight
        return student.requires_grad_(False)
# -----------------------------------------------------------------------------
# The two baselines LRC is compared with, trained by the same loop: an ordinary student of the
# LRC student's exported shape (student_shape), randomly initialised.

class Baseline(nn.Module):
    """kd: L_KL + L_LM against the frozen teacher (same head and reductions as LRC, no clone term);
    scratch (teacher=None): L_LM on the data alone."""

    def __init__(self, student: CausalLM, teacher: Optional[CausalLM] = None, tau: float = 40.0):
        super().__init__()
        self.student, self.teacher, self.tau = student, teacher, tau
        if teacher is not None:
            teacher.requires_grad_(False)

    def forward(self, idx, targets):
        h_s = self.student.hidden(idx)
        h_t = W_t = None
        if self.teacher is not None:
            with torch.no_grad():
                h_t, W_t = self.teacher.hidden(idx), self.teacher.lm_head.weight
        loss, kl, lm = distill_loss(h_s, self.student.lm_head.weight, targets, h_t, W_t, tau=self.tau)
        return loss, {"kl": kl, "lm": lm, "clone": torch.zeros((), device=idx.device)}

    def checkpoint_tensors(self):
        """What a training checkpoint holds: the student's whole state with Hugging Face names
        (lm_head.weight omitted when tied, as in a Hugging Face checkpoint)."""
        state = dict(self.student.state_dict(keep_vars=True))
        if self.student.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        return state


# -----------------------------------------------------------------------------
# Loading and saving Hugging Face checkpoint directories (spec section 2)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"]


def as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise LRCError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_checkpoint(path_or_id: str) -> str:
    """A local directory as is; anything else is a hub id, fetched with only the files lrc needs."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id) or path_or_id.startswith((".", "/")) or path_or_id.count("/") != 1:
        raise LRCError(f"{path_or_id!r} is not a checkpoint directory (nor a hub id like 'Qwen/Qwen2.5-3B-Instruct'): "
                       f"check the path")
    import huggingface_hub
    try:
        return huggingface_hub.snapshot_download(path_or_id, allow_patterns=HUB_FILES)
    except Exception as e:
        raise LRCError(f"could not download {path_or_id!r} from the Hugging Face hub ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}): check the id and your network, "
                       f"or pass a local directory") from None


def checkpoint_files(path: str) -> dict:
    """{tensor name: safetensors file} for a single-file or sharded checkpoint."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        for shard in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(path, shard)):
                raise LRCError(f"shard {shard!r} is listed in {index} but missing: re-download the checkpoint")
        return {name: os.path.join(path, shard) for name, shard in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise LRCError(f"no model.safetensors or model.safetensors.index.json in {path!r}: "
                       f"lrc reads safetensors checkpoints only")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def load_model(path_or_id: str, device="cpu", dtype=None) -> CausalLM:
    """Build on the meta device, then assign each tensor straight from its file in the requested dtype,
    so a 7B teacher never needs twice its size in memory. Any failure to read it is a one-line LRCError."""
    try:
        return _load_model(path_or_id, device, dtype)
    except LRCError:
        raise
    except Exception as e:  # truncated safetensors, unreadable file, malformed config.json
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise LRCError(f"could not read the teacher {path_or_id!r} ({type(e).__name__}: {first}): "
                       f"re-download or re-save the checkpoint") from None


def _load_model(path_or_id, device, dtype):
    path = resolve_checkpoint(path_or_id)
    config = ModelConfig.from_pretrained(path)
    if dtype is None:
        dtype = config.extra.get("torch_dtype") or config.extra.get("dtype") or "float32"
    dtype = as_dtype(dtype)
    with torch.device("meta"):
        model = CausalLM(config)
    expected = dict(model.state_dict(keep_vars=True))
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    files = checkpoint_files(path)
    unexpected = set(files) - set(expected) - {"lm_head.weight"}
    if unexpected:
        raise LRCError(f"{path!r} holds tensors a {config.model_type} model does not have (e.g. "
                       f"{sorted(unexpected)[0]!r}): is config.json's model_type right for these weights?")
    for name in expected:
        if name not in files:
            raise LRCError(f"tensor {name!r} is missing from {path!r}: re-download or re-export the checkpoint")
    by_file = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in names:
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(expected[name].shape):
                    raise LRCError(f"tensor {name!r} in {file} has shape {list(tensor.shape)} but config.json implies "
                                   f"{list(expected[name].shape)}: the weights and config.json do not match")
                module_name, _, attr = name.rpartition(".")
                module = model.get_submodule(module_name)
                setattr(module, attr, nn.Parameter(tensor.to(dtype), requires_grad=expected[name].requires_grad))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def save_model(model: CausalLM, path: str, extra_config: Optional[dict] = None, max_shard_bytes: int = 5 * 2**30):
    """config.json + safetensors (sharded with an index above max_shard_bytes, as Hugging Face does),
    written atomically (atomic_directory): a crash never leaves half a checkpoint."""
    config = model.config.to_dict()
    config.update(extra_config or {})
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    # both names: transformers >= 4.56 writes and prefers "dtype", so a stale one copied from the teacher's
    # config.json would make transformers load a bf16 checkpoint as float32
    config["torch_dtype"] = config["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    shards, size = [{}], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    with atomic_directory(path) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


load_qwen2, save_qwen2 = load_model, save_model  # the names from before Llama and Qwen3 teachers


# Atomic writes: everything lrc writes (checkpoints, model directories, token files, manifests) appears
# whole or not at all. Work happens in a temporary sibling, flushed to disk, then renamed into place.

def check_writable_dir(path: str, option: str = "--out"):
    """Refuse, with one line naming `option`, a directory to be written that cannot be: a regular file, a path
    inside a file, or one whose nearest existing parent is not writable. Nothing is created."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        what = "is a file" if parent == os.path.abspath(path) else f"is inside the file {parent!r}"
        raise LRCError(f"{option}={path!r} {what}, not a directory: pass {option}=DIR for a new or existing directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LRCError(f"{option}={path!r} cannot be written ({parent!r} is not writable): choose another {option}")


@contextmanager
def atomic_directory(path: str):
    """Yield an empty temporary directory beside `path`; when the block succeeds its files are fsynced
    and it replaces `path` (an existing `path` is swapped out first, never left half-written); when
    the block fails it is deleted and `path` is untouched."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        yield tmp
        # the modes a plain mkdir and open give under this process's umask, as save_pretrained leaves them:
        # mkdtemp makes 0700 and safetensors writes 0600, which no other user (a serving process under another
        # account, a colleague) could read
        umask = os.umask(0)
        os.umask(umask)
        for name in os.listdir(tmp):  # on disk before the rename makes the directory visible
            file = os.path.join(tmp, name)
            os.chmod(file, 0o666 & ~umask)
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~umask)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".tmp-old-", dir=parent)
            os.replace(path, os.path.join(old, "previous"))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str, mode: str = "w"):
    """Yield a file object writing a temporary sibling of `path`; when the block succeeds it is fsynced
    and renamed to `path`; when it fails it is deleted and `path` is untouched."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": "\n"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


