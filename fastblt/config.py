"""Model configuration: frozen, hashable dataclasses validated at load time.

Experiment files hold ml-collections ``ConfigDict``s; the model reads the frozen dataclasses built
from them by :func:`model_config_from_dict`, which rejects unknown keys and inconsistent shapes with a
message that names the offending key (``model.encoder.n_heads``) and what to change.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

# Primes of the reference's rolling hash, one per hash function (order matters).
HASH_PRIMES = (
    1000000007,
    5915587277,
    1500450271,
    3267000013,
    5754853343,
    4093082899,
    9576890767,
    3628273133,
    2860486313,
    5463458053,
    3367900313,
)

PATCHING_MODES = ("entropy", "static", "space", "byte")
ATTENTION_IMPLS = ("xla", "cudnn", "auto")
INIT_STD_FACTORS = ("current_depth", "global_depth", "dim_ratio", "disabled")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value is unknown, missing or inconsistent; the message names the key."""


def ffn_hidden_dim(dim: int, multiplier: float = 1.0, multiple_of: int = 256) -> int:
    """SwiGLU hidden width of the reference: ``multiple_of * ceil(int(mult * int(8 * dim / 3)) / m)``."""
    hidden = int(multiplier * int(2 * (4 * dim) / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """A stack of pre-norm transformer blocks (attention + SwiGLU)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads == n_heads)
    ffn_dim: int | None = None  # None: the reference rule, see ffn_hidden_dim
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    window: int | None = None  # sliding window in keys (self included); None: full causal

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        return self.ffn_dim or ffn_hidden_dim(self.dim)


@dataclasses.dataclass(frozen=True)
class LocalModelConfig(TransformerConfig):
    """Local encoder or decoder: transformer blocks plus patch cross-attention."""

    window: int | None = 512
    cross_attn_all_layers: bool = False  # False: encoder after the last layer, decoder before the first
    cross_attn_nheads: int | None = None  # None: n_heads (as the Hugging Face port)

    @property
    def cross_heads(self) -> int:
        return self.cross_attn_nheads or self.n_heads

    @property
    def n_cross_layers(self) -> int:
        return self.n_layers if self.cross_attn_all_layers else 1


@dataclasses.dataclass(frozen=True)
class EntropyModelConfig(TransformerConfig):
    """The small byte LM whose next-byte entropies place patch boundaries."""

    dim: int = 768
    n_layers: int = 14
    n_heads: int = 12
    rope_theta: float = 10000.0
    window: int | None = 512
    vocab_size: int = 260
    dtype: str = "float32"  # the reference runs it in bfloat16
    document_masking: bool = True


@dataclasses.dataclass(frozen=True)
class PatcherConfig:
    """How patch boundaries are placed; the buffer is fixed-shape (``max_patches`` slots)."""

    mode: str = "entropy"  # entropy | static | space | byte
    threshold: float | None = 1.335442066192627  # nats; global threshold (entropy mode)
    threshold_add: float | None = None  # relative threshold combined with `threshold`
    monotonicity: bool = False  # relative rule H[t-1] - H[t-2] > threshold
    max_patch_length: int | None = None  # split longer patches
    patch_size: int = 4  # static mode patch length
    max_patches: int | None = None  # patch buffer size; None: bytes + 1 (never overflows)


@dataclasses.dataclass(frozen=True)
class HashConfig:
    """Hash n-gram embeddings added to the byte embedding of the local encoder."""

    group_sizes: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
    nb_functions: int = 1
    vocab: int = 500002

    @property
    def n_tables(self) -> int:
        return self.nb_functions * len(self.group_sizes)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole BLT: hash embeddings, local encoder, global transformer, local decoder, patcher."""

    encoder: LocalModelConfig = LocalModelConfig(dim=1024, n_layers=1, n_heads=16)
    global_model: TransformerConfig = TransformerConfig(dim=2048, n_layers=25, n_heads=16)
    decoder: LocalModelConfig = LocalModelConfig(dim=1024, n_layers=9, n_heads=16, cross_attn_all_layers=True)
    entropy_model: EntropyModelConfig | None = EntropyModelConfig()
    patcher: PatcherConfig = PatcherConfig()
    hash: HashConfig = HashConfig()
    vocab_size: int = 260
    cross_attn_k: int = 2
    document_masking: bool = True  # EOS ends a document in local and global attention
    # The Hugging Face port re-pools and re-projects before every encoder cross-attention when
    # encoder.cross_attn_all_layers is set; the reference pools once and refines (False).
    encoder_repool_every_layer: bool = False
    init_std_factor: str = "current_depth"
    max_bytes: int = 24576  # longest byte row (RoPE positions, buffers)
    max_global_patches: int = 4096
    dtype: str = "float32"  # compute dtype; parameters are float32, logits float32
    attention_impl: str = "xla"  # xla | cudnn | auto (cudnn on GPU when possible)
    remat: bool = False  # recompute each transformer block in the backward pass (saves memory)
    # Run the global model's layers as one lax.scan over their stacked parameters: compile time and
    # program size stop growing with depth. Same parameter tree (layers_0 .. layers_{L-1}), so
    # checkpoints, exports and HF conversion are unaffected; a compute setting only.
    scan_layers: bool = False
    # The sampler's form of the same idea: the entropy model's, global model's and decoder's layers
    # as one lax.scan each in every generation program (fastblt.sampler.state.scanned_stacks).
    # Programs 4.5x smaller and compiles 31% shorter, but each byte 1.7x slower on one H200 (jax
    # 0.11.2: XLA copies each layer's weights out of the stack), so off by default
    # (experiments/results/generate_speed.md, run 7). A compute setting only.
    scan_decode_layers: bool = False
    # BLT-D (fastblt/train/blt_d.py): the decoder owns a learned [MASK] input vector
    # (``local_decoder.mask_embedding``). Off: plain BLT's parameter tree, unchanged.
    mask_embedding: bool = False

    @property
    def global_input_dim(self) -> int:
        return self.cross_attn_k * self.encoder.dim

    @property
    def needs_global_projection(self) -> bool:
        return self.global_input_dim != self.global_model.dim

    def to_dict(self) -> dict[str, Any]:
        return _asdict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def as_dict(obj: Any) -> Any:
    """Plain nested dict (tuples as lists) of a config dataclass, JSON-serialisable."""
    return _asdict(obj)


def _asdict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _asdict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return list(obj)
    return obj


_NESTED = {
    ModelConfig: {
        "encoder": LocalModelConfig,
        "global_model": TransformerConfig,
        "decoder": LocalModelConfig,
        "entropy_model": EntropyModelConfig,
        "patcher": PatcherConfig,
        "hash": HashConfig,
    }
}


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}"
        )
    kwargs: dict[str, Any] = {}
    nested = _NESTED.get(cls, {})
    for key, value in values.items():
        if key in nested and value is not None:
            if dataclasses.is_dataclass(value):
                value = _asdict(value)
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}{key} must be a mapping of keys, got {value!r}")
            value = _build(nested[key], value, f"{prefix}{key}.")
        elif key == "group_sizes":
            value = tuple(int(v) for v in value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'model'}: {e}") from None


def model_config_from_dict(values: Mapping[str, Any] | Any, prefix: str = "model.") -> ModelConfig:
    """Builds and validates a ModelConfig from a mapping (a dict or an ml-collections ConfigDict).

    Missing keys take the BLT-1B defaults. Raises ConfigError naming the key on any problem.
    """
    if hasattr(values, "to_dict"):
        values = values.to_dict()
    config = _build(ModelConfig, values, prefix)
    validate(config, prefix)
    return config


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _validate_stack(c: TransformerConfig, key: str) -> None:
    for field in ("dim", "n_layers", "n_heads"):
        value = getattr(c, field)
        _check(
            isinstance(value, int) and value > 0, f"{key}.{field}", f"must be a positive int, got {value!r}"
        )
    _check(c.dim % c.n_heads == 0, f"{key}.n_heads", f"{c.n_heads} heads do not divide dim {c.dim}")
    _check(c.head_dim % 2 == 0, f"{key}.n_heads", f"head dim {c.head_dim} must be even for RoPE")
    _check(
        c.n_heads % c.kv_heads == 0,
        f"{key}.n_kv_heads",
        f"{c.kv_heads} kv heads do not divide {c.n_heads} heads",
    )
    _check(c.ffn_dim is None or c.ffn_dim > 0, f"{key}.ffn_dim", "must be positive or None")
    _check(c.window is None or c.window > 0, f"{key}.window", "must be positive or None")
    _check(c.rope_theta > 0, f"{key}.rope_theta", "must be positive")


def validate(config: ModelConfig, prefix: str = "model.") -> None:
    """Raises ConfigError (naming the key) if the config cannot describe a working BLT."""
    p = prefix
    _validate_stack(config.encoder, f"{p}encoder")
    _validate_stack(config.decoder, f"{p}decoder")
    _validate_stack(config.global_model, f"{p}global_model")
    for side in ("encoder", "decoder"):
        c: LocalModelConfig = getattr(config, side)
        _check(
            c.dim % c.cross_heads == 0,
            f"{p}{side}.cross_attn_nheads",
            f"{c.cross_heads} cross-attention heads do not divide dim {c.dim}",
        )
    _check(
        config.decoder.dim == config.encoder.dim,
        f"{p}decoder.dim",
        f"the decoder reads the encoder's byte states, so it must equal encoder.dim "
        f"({config.encoder.dim}), got {config.decoder.dim}",
    )
    _check(config.cross_attn_k >= 1, f"{p}cross_attn_k", "must be >= 1")
    _check(config.vocab_size >= 5, f"{p}vocab_size", "must hold the 4 special ids and bytes")
    h = config.hash
    _check(len(h.group_sizes) > 0 or h.nb_functions == 0, f"{p}hash.group_sizes", "is empty")
    _check(all(n >= 1 for n in h.group_sizes), f"{p}hash.group_sizes", "sizes must be >= 1")
    _check(
        0 <= h.nb_functions <= len(HASH_PRIMES),
        f"{p}hash.nb_functions",
        f"must be in [0, {len(HASH_PRIMES)}] (one prime per function)",
    )
    _check(h.vocab >= 1, f"{p}hash.vocab", "must be >= 1")
    pc = config.patcher
    _check(pc.mode in PATCHING_MODES, f"{p}patcher.mode", f"{pc.mode!r} is not one of {PATCHING_MODES}")
    if pc.mode == "entropy":
        _check(
            config.entropy_model is not None,
            f"{p}entropy_model",
            "patcher.mode='entropy' needs an entropy_model config",
        )
        _check(pc.threshold is not None, f"{p}patcher.threshold", "entropy patching needs a threshold")
    _check(
        pc.max_patch_length is None or pc.max_patch_length >= 1,
        f"{p}patcher.max_patch_length",
        "must be >= 1 or None",
    )
    _check(pc.patch_size >= 1, f"{p}patcher.patch_size", "must be >= 1")
    _check(pc.max_patches is None or pc.max_patches >= 2, f"{p}patcher.max_patches", "must be >= 2")
    if config.entropy_model is not None:
        _validate_stack(config.entropy_model, f"{p}entropy_model")
        _check(config.entropy_model.dtype in DTYPES, f"{p}entropy_model.dtype", f"must be one of {DTYPES}")
    _check(config.dtype in DTYPES, f"{p}dtype", f"must be one of {DTYPES}")
    _check(
        isinstance(config.mask_embedding, bool),
        f"{p}mask_embedding",
        f"must be a bool, got {config.mask_embedding!r}",
    )
    _check(
        config.attention_impl in ATTENTION_IMPLS,
        f"{p}attention_impl",
        f"{config.attention_impl!r} is not one of {ATTENTION_IMPLS}",
    )
    _check(
        config.init_std_factor in INIT_STD_FACTORS,
        f"{p}init_std_factor",
        f"{config.init_std_factor!r} is not one of {INIT_STD_FACTORS}",
    )


def count_params(config: ModelConfig, include_entropy_model: bool = False) -> int:
    """Stored parameter count of a config (hash tables included), computed from shapes."""
    import jax

    from fastblt.model import abstract_params  # local import: keeps `import fastblt.config` light

    params = dict(abstract_params(config))
    if not include_entropy_model:
        params.pop("entropy_model", None)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
