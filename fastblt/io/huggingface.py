"""Conversion between fastblt parameters and the Hugging Face ``BltForCausalLM`` format.

``from_hf(src)`` reads a ``save_pretrained`` directory (config.json + safetensors, sharded or not;
no torch needed) or a loaded ``BltForCausalLM`` and returns ``(ModelConfig, params)`` with the
entropy model (HF's ``model.patcher``) included. ``to_hf(config, params, out_dir)`` writes a
directory that ``BltForCausalLM.from_pretrained`` loads.

Semantics carried across: the HF port re-pools before every encoder cross-attention when the
encoder cross-attends on all layers, so such a model converts with
``encoder_repool_every_layer=True`` and reproduces HF's logits. Document (EOS) masking is kept on:
that is the reference's behaviour, and equals HF's for rows without an EOS inside.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from fastblt.config import (
    EntropyModelConfig,
    HashConfig,
    LocalModelConfig,
    ModelConfig,
    PatcherConfig,
    TransformerConfig,
    validate,
)

_TOP = {
    "local_encoder": "model.local_encoder",
    "global_transformer": "model.global_transformer",
    "local_decoder": "model.local_decoder",
    "entropy_model": "model.patcher",
}
_SEGMENTS = {
    "attention": "self_attn",
    "feed_forward": "mlp",
    "wq": "q_proj",
    "wk": "k_proj",
    "wv": "v_proj",
    "wo": "o_proj",
    "w1": "gate_proj",
    "w3": "up_proj",
    "w2": "down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "cross_attn_norm_q": "q_norm",
    "cross_attn_norm_kv": "k_norm",
    "tok_embeddings": "embed_tokens",
    "output": "lm_head",
}
_HASH_KEY = "model.encoder_hash_tok_embedding.weight"


def hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """HF tensor name of a fastblt parameter path, and whether the array is transposed."""
    if path == ("local_decoder", "output", "kernel"):
        return "lm_head.weight", True
    parts = [_TOP[path[0]]]
    for seg in path[1:-1]:
        m = re.fullmatch(r"(layers|cross_attn_layers)_(\d+)", seg)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m else _SEGMENTS.get(seg, seg))
    return ".".join(parts) + ".weight", path[-1] == "kernel"


def expected_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened parameter path -> shape that ``BLT(config).init`` creates."""
    from flax import traverse_util  # lazy, as Flax is everywhere here: `import fastblt.cli` stays light

    from fastblt.model import abstract_params

    return {
        path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(abstract_params(config)).items()
    }


def _unbox(tree: Any) -> Any:
    import flax.linen as nn

    return nn.meta.unbox(tree)


# ----------------------------------------------------------------------------- configs


def _rope_theta(sub: Mapping[str, Any], default: float) -> float:
    rope = sub.get("rope_parameters") or {}
    return float(rope.get("rope_theta", sub.get("rope_theta", default)))


def _kv(sub: Mapping[str, Any]) -> int | None:
    kv = sub.get("num_key_value_heads")
    return None if kv in (None, sub["num_attention_heads"]) else int(kv)


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a ``BltConfig`` dict (config.json)."""
    enc, dec, glob = hf["encoder_config"], hf["decoder_config"], hf["global_config"]
    window = hf.get("local_attention_window_len")

    def local(sub: Mapping[str, Any]) -> LocalModelConfig:
        return LocalModelConfig(
            dim=sub["hidden_size"],
            n_layers=sub["num_hidden_layers"],
            n_heads=sub["num_attention_heads"],
            n_kv_heads=_kv(sub),
            ffn_dim=sub["intermediate_size"],
            rope_theta=_rope_theta(sub, 500000.0),
            norm_eps=sub.get("rms_norm_eps", 1e-5),
            window=window,
            cross_attn_all_layers=bool(sub["cross_attn_all_layers"]),
        )

    entropy_model = None
    mode = "byte"
    if hf.get("patch_in_forward", True) and hf.get("patching_mode", "entropy") == "entropy":
        pat = hf["patcher_config"]
        mode = "entropy"
        entropy_model = EntropyModelConfig(
            dim=pat["hidden_size"],
            n_layers=pat["num_hidden_layers"],
            n_heads=pat["num_attention_heads"],
            n_kv_heads=_kv(pat),
            ffn_dim=pat["intermediate_size"],
            rope_theta=_rope_theta(pat, 10000.0),
            norm_eps=pat.get("rms_norm_eps", 1e-5),
            window=pat.get("sliding_window"),
            vocab_size=pat.get("vocab_size", 260),
        )
    config = ModelConfig(
        encoder=local(enc),
        decoder=local(dec),
        global_model=TransformerConfig(
            dim=glob["hidden_size"],
            n_layers=glob["num_hidden_layers"],
            n_heads=glob["num_attention_heads"],
            n_kv_heads=_kv(glob),
            ffn_dim=glob["intermediate_size"],
            rope_theta=_rope_theta(glob, 500000.0),
            norm_eps=glob.get("rms_norm_eps", 1e-5),
        ),
        entropy_model=entropy_model,
        patcher=PatcherConfig(
            mode=mode,
            threshold=hf.get("patching_threshold"),
            max_patch_length=hf.get("max_patch_length"),
            patch_size=int(hf.get("patch_size") or 4),
        ),
        hash=HashConfig(
            group_sizes=tuple(hf.get("encoder_hash_byte_group_size") or (3, 4, 5, 6, 7, 8)),
            nb_functions=hf.get("encoder_hash_byte_group_nb_functions", 1),
            vocab=hf.get("encoder_hash_byte_group_vocab", 500002),
        ),
        vocab_size=hf.get("vocab_size", 260),
        cross_attn_k=hf.get("cross_attn_k", 2),
        encoder_repool_every_layer=bool(enc["cross_attn_all_layers"]),
        max_bytes=enc.get("max_position_embeddings", 24576),
        max_global_patches=glob.get("max_position_embeddings", 4096),
    )
    validate(config)
    return config


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """``BltConfig`` dict for a ModelConfig; raises ValueError for what the HF port cannot express."""
    m = config
    problems = []
    if m.encoder.window != m.decoder.window:
        problems.append("model.encoder.window and model.decoder.window differ (HF has one window)")
    for side in ("encoder", "decoder"):
        c = getattr(m, side)
        if c.cross_attn_nheads not in (None, c.n_heads):
            problems.append(f"model.{side}.cross_attn_nheads must equal n_heads for HF")
    if m.hash.nb_functions < 1:
        problems.append("model.hash.nb_functions must be >= 1 for HF")
    if m.patcher.mode not in ("entropy", "byte"):
        problems.append(f"model.patcher.mode={m.patcher.mode!r}: HF patches by entropy or by byte only")
    if problems:
        raise ValueError("cannot express this config in BltConfig: " + "; ".join(problems))
    if m.encoder.cross_attn_all_layers and not m.encoder_repool_every_layer:
        warnings.warn(
            "HF re-pools before every encoder cross-attention; this model (encoder_repool_every_layer="
            "False, the reference) will give different logits under transformers",
            stacklevel=2,
        )
    if m.mask_embedding:
        warnings.warn(
            "the BLT-D mask embedding has no place in BltForCausalLM: the export is the plain "
            "next-byte BLT (diffusion decoding needs fastblt)",
            stacklevel=2,
        )
    if m.patcher.monotonicity or m.patcher.threshold_add is not None:
        warnings.warn("HF's patcher ignores monotonicity and threshold_add", stacklevel=2)

    def sub(c: TransformerConfig, **extra: Any) -> dict[str, Any]:
        return {
            "hidden_size": c.dim,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.kv_heads,
            "intermediate_size": c.hidden_dim,
            "rms_norm_eps": c.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            **extra,
        }

    local_extra = {
        "cross_attn_k": m.cross_attn_k,
        "hidden_size_global": m.global_model.dim,
        "max_position_embeddings": m.max_bytes,
        "vocab_size": m.vocab_size,
    }
    entropy = m.entropy_model or EntropyModelConfig()
    hf: dict[str, Any] = {
        "model_type": "blt",
        "architectures": ["BltForCausalLM"],
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_global_patches,
        "patch_in_forward": m.patcher.mode == "entropy",
        "patch_size": m.patcher.patch_size,
        "patching_mode": "entropy" if m.patcher.mode == "entropy" else "byte",
        "patching_threshold": m.patcher.threshold,
        "patching_batch_size": 1,
        "max_patch_length": m.patcher.max_patch_length,
        "local_attention_window_len": m.encoder.window,
        "cross_attn_k": m.cross_attn_k,
        "encoder_hash_byte_group_size": list(m.hash.group_sizes),
        "encoder_hash_byte_group_vocab": m.hash.vocab,
        "encoder_hash_byte_group_nb_functions": m.hash.nb_functions,
        "tie_word_embeddings": False,
        "dtype": "float32",
        "encoder_config": sub(
            m.encoder, cross_attn_all_layers=m.encoder.cross_attn_all_layers, **local_extra
        ),
        "decoder_config": sub(
            m.decoder, cross_attn_all_layers=m.decoder.cross_attn_all_layers, **local_extra
        ),
        "global_config": sub(m.global_model, max_position_embeddings=m.max_global_patches),
        "patcher_config": sub(
            entropy,
            vocab_size=entropy.vocab_size,
            max_position_embeddings=8192,
            sliding_window=entropy.window,
        ),
    }
    return hf


# ----------------------------------------------------------------------------- tensors


def _read_safetensors(directory: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no .safetensors file in {directory}: save the model with "
            "BltForCausalLM.save_pretrained(dir, safe_serialization=True)"
        )
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        # framework="flax" reads bfloat16 too (numpy cannot represent it).
        with safe_open(os.path.join(directory, name), framework="flax") as f:
            for key in f.keys():
                tensors[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
    return tensors


def _load_source(src: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if hasattr(src, "state_dict") and hasattr(src, "config"):
        hf_config = src.config.to_dict()
        tensors = {k: v.detach().float().cpu().numpy() for k, v in src.state_dict().items()}
        return hf_config, tensors
    directory = os.fspath(src)
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{config_path} not found: --src must be a BltForCausalLM.save_pretrained directory"
        )
    with open(config_path) as f:
        hf_config = json.load(f)
    if hf_config.get("model_type") != "blt":
        raise ValueError(f"{config_path} has model_type={hf_config.get('model_type')!r}, expected 'blt'")
    return hf_config, _read_safetensors(directory)


def from_hf(src: Any) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads a Hugging Face BLT (directory or loaded ``BltForCausalLM``).

    Returns: the ModelConfig and a params pytree of float32 numpy arrays (``{"hash_embed": ...,
    "local_encoder": ..., "global_transformer": ..., "local_decoder": ..., "entropy_model": ...}``).
    """
    hf_config, tensors = _load_source(src)
    config = config_from_hf(hf_config)
    shapes = expected_shapes(config)
    used = set()
    flat: dict[tuple[str, ...], np.ndarray] = {}
    n_tables = config.hash.n_tables
    for path, shape in shapes.items():
        if path[0] == "hash_embed":
            continue
        name, transpose = hf_name(path)
        if name not in tensors:
            raise KeyError(f"tensor {name} (for fastblt {'/'.join(path)}) is missing from the HF checkpoint")
        value = tensors[name].T if transpose else tensors[name]
        if tuple(value.shape) != shape:
            raise ValueError(f"{name}: shape {value.shape} does not match {shape} expected by the config")
        flat[path] = np.ascontiguousarray(value, dtype=np.float32)
        used.add(name)
    if n_tables:
        fused = tensors[_HASH_KEY]
        vocab = config.hash.vocab
        if fused.shape[0] != n_tables * vocab:
            raise ValueError(f"{_HASH_KEY} has {fused.shape[0]} rows, expected {n_tables} tables x {vocab}")
        for j in range(n_tables):
            flat[("hash_embed", f"table_{j}", "embedding")] = np.ascontiguousarray(
                fused[j * vocab : (j + 1) * vocab], dtype=np.float32
            )
        used.add(_HASH_KEY)
    leftover = sorted(k for k in set(tensors) - used if "rotary_emb" not in k)
    if leftover:
        raise ValueError(f"HF tensors not understood by the conversion: {leftover[:5]}")
    from flax import traverse_util

    return config, traverse_util.unflatten_dict(flat)


def to_hf(config: ModelConfig, params: Mapping[str, Any], out_dir: str) -> None:
    """Writes ``config.json`` and ``model.safetensors`` that ``BltForCausalLM.from_pretrained`` loads."""
    from safetensors.numpy import save_file

    hf_config = config_to_hf(config)
    params = _unbox(params)
    if "params" in params and "local_encoder" not in params:
        params = params["params"]
    from flax import traverse_util

    flat = traverse_util.flatten_dict(dict(params))  # dict(): any Mapping at the top, as before
    shapes = expected_shapes(config)
    if config.entropy_model is None:
        shapes = {p: s for p, s in shapes.items() if p[0] != "entropy_model"}
    missing = sorted("/".join(p) for p in set(shapes) - set(flat))
    if missing:
        raise KeyError(f"params lack {missing[:5]} that the config implies")
    tensors: dict[str, np.ndarray] = {}
    tables = []
    for path, shape in shapes.items():
        value = np.asarray(flat[path], dtype=np.float32)
        if tuple(value.shape) != shape:
            raise ValueError(f"param {'/'.join(path)} has shape {value.shape}, config implies {shape}")
        if path[0] == "hash_embed":
            tables.append((int(path[1].split("_")[1]), value))
            continue
        if path == ("local_decoder", "mask_embedding"):
            continue  # BLT-D only (warned about in config_to_hf)
        name, transpose = hf_name(path)
        tensors[name] = np.ascontiguousarray(value.T if transpose else value)
    if tables:
        tensors[_HASH_KEY] = np.concatenate([v for _, v in sorted(tables, key=lambda t: t[0])], axis=0)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
