"""The ``model`` section: the BLT's stacks, patcher and hash embeddings; the ``entropy_model`` section.

Frozen, hashable dataclasses (the model reads them; a module reads its own sub-config). The defaults
are BLT-1B in float32. Rules between keys live in each class's ``check``, which the one validator
(fastblt/config/schema.py's ``build``) runs with the section's dotted key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from fastblt.config.schema import as_dict, build, join, require, setting

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
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "auto")
INIT_STD_FACTORS = ("current_depth", "global_depth", "dim_ratio", "disabled")
DTYPES = ("float32", "bfloat16", "float16")
# What a rematerialised block keeps for its backward pass (MaxText's remat_policy names): "full"
# keeps only the block's input and recomputes the rest; "minimal" also keeps every projection's
# output (matmuls without batch dimensions) and recomputes norms, RoPE, attention and SwiGLU.
REMAT_POLICIES = ("full", "minimal")


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

    def check(self, key: str) -> None:
        for name in ("dim", "n_layers", "n_heads"):
            value = getattr(self, name)
            require(value > 0, join(key, name), f"must be a positive int, got {value!r}")
        require(
            self.dim % self.n_heads == 0,
            join(key, "n_heads"),
            f"{self.n_heads} heads do not divide dim {self.dim}",
        )
        require(
            self.head_dim % 2 == 0, join(key, "n_heads"), f"head dim {self.head_dim} must be even for RoPE"
        )
        require(
            self.n_heads % self.kv_heads == 0,
            join(key, "n_kv_heads"),
            f"{self.kv_heads} kv heads do not divide {self.n_heads} heads",
        )
        require(self.ffn_dim is None or self.ffn_dim > 0, join(key, "ffn_dim"), "must be positive or None")
        require(self.window is None or self.window > 0, join(key, "window"), "must be positive or None")
        require(self.rope_theta > 0, join(key, "rope_theta"), "must be positive")


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

    def check(self, key: str) -> None:
        super().check(key)
        require(
            self.dim % self.cross_heads == 0,
            join(key, "cross_attn_nheads"),
            f"{self.cross_heads} cross-attention heads do not divide dim {self.dim}",
        )


@dataclasses.dataclass(frozen=True)
class EntropyModelConfig(TransformerConfig):
    """The small byte LM whose next-byte entropies place patch boundaries."""

    dim: int = 768
    n_layers: int = 14
    n_heads: int = 12
    rope_theta: float = 10000.0
    window: int | None = 512
    vocab_size: int = 260
    dtype: str = setting("float32", choices=DTYPES)  # the reference runs it in bfloat16
    document_masking: bool = True


@dataclasses.dataclass(frozen=True)
class PatcherConfig:
    """How patch boundaries are placed; the buffer is fixed-shape (``max_patches`` slots)."""

    mode: str = setting("entropy", choices=PATCHING_MODES)
    threshold: float | None = 1.335442066192627  # nats; global threshold (entropy mode)
    threshold_add: float | None = None  # relative threshold combined with `threshold`
    monotonicity: bool = False  # relative rule H[t-1] - H[t-2] > threshold
    max_patch_length: int | None = setting(None, ge=1)  # split longer patches
    patch_size: int = setting(4, ge=1)  # static mode patch length
    max_patches: int | None = setting(None, ge=2)  # patch buffer size; None: bytes + 1 (never overflows)


@dataclasses.dataclass(frozen=True)
class HashConfig:
    """Hash n-gram embeddings added to the byte embedding of the local encoder."""

    group_sizes: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
    nb_functions: int = setting(1, ge=0, lt=len(HASH_PRIMES) + 1)  # one prime per function
    vocab: int = setting(500002, ge=1)

    @property
    def n_tables(self) -> int:
        return self.nb_functions * len(self.group_sizes)

    def check(self, key: str) -> None:
        require(len(self.group_sizes) > 0 or self.nb_functions == 0, join(key, "group_sizes"), "is empty")
        require(all(n >= 1 for n in self.group_sizes), join(key, "group_sizes"), "sizes must be >= 1")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole BLT: hash embeddings, local encoder, global transformer, local decoder, patcher."""

    encoder: LocalModelConfig = LocalModelConfig(dim=1024, n_layers=1, n_heads=16)
    global_model: TransformerConfig = TransformerConfig(dim=2048, n_layers=25, n_heads=16)
    decoder: LocalModelConfig = LocalModelConfig(dim=1024, n_layers=9, n_heads=16, cross_attn_all_layers=True)
    entropy_model: EntropyModelConfig | None = EntropyModelConfig()
    patcher: PatcherConfig = PatcherConfig()
    hash: HashConfig = HashConfig()
    vocab_size: int = setting(260, ge=5)  # the 4 special ids and the bytes
    cross_attn_k: int = setting(2, ge=1)
    document_masking: bool = True  # EOS ends a document in local and global attention
    # The Hugging Face port re-pools and re-projects before every encoder cross-attention when
    # encoder.cross_attn_all_layers is set; the reference pools once and refines (False).
    encoder_repool_every_layer: bool = False
    init_std_factor: str = setting("current_depth", choices=INIT_STD_FACTORS)
    max_bytes: int = 24576  # longest byte row (RoPE positions, buffers)
    max_global_patches: int = 4096
    dtype: str = setting("float32", choices=DTYPES)  # compute dtype; parameters and logits float32
    # auto: on a GPU cuDNN for bf16/fp16 training and prefill calls and the decode kernel for decode
    # steps, on a TPU splash where a call fits, the XLA path elsewhere (CPU; float32 calls of many
    # queries on a GPU): fastblt.model.attention.resolve_impl. "xla" is the reference path everywhere.
    attention_impl: str = setting("auto", choices=ATTENTION_IMPLS)
    remat: bool = False  # recompute each transformer block in the backward pass (saves memory)
    remat_policy: str = setting("full", choices=REMAT_POLICIES)  # what a recomputed block keeps
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
        return as_dict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def check(self, key: str) -> None:
        require(
            self.decoder.dim == self.encoder.dim,
            join(key, "decoder.dim"),
            f"the decoder reads the encoder's byte states, so it must equal encoder.dim "
            f"({self.encoder.dim}), got {self.decoder.dim}",
        )
        require(
            self.remat or self.remat_policy == "full",
            join(key, "remat_policy"),
            f"{self.remat_policy!r} says what a recomputed block keeps, and nothing is recomputed: "
            "set model.remat=True as well (or leave the policy at 'full')",
        )
        if self.patcher.mode == "entropy":
            require(
                self.entropy_model is not None,
                join(key, "entropy_model"),
                "patcher.mode='entropy' needs an entropy_model config",
            )
            require(
                self.patcher.threshold is not None,
                join(key, "patcher.threshold"),
                "entropy patching needs a threshold",
            )


def model_config_from_dict(values: Any, prefix: str = "model.") -> ModelConfig:
    """The validated ModelConfig of a mapping (a dict or an ml-collections ConfigDict) holding every
    key; raises ConfigError naming the dotted key (``prefix`` + key) on any problem.

    A config saved by an older fastblt lacks keys added since: read it through
    :func:`fastblt.config.saved.upgrade_model` first.
    """
    return build(ModelConfig, values, prefix)


def validate(config: ModelConfig, prefix: str = "model.") -> None:
    """Raises ConfigError (naming the key) if ``config`` (built in code) cannot describe a working BLT."""
    build(ModelConfig, config, prefix)


def count_params(config: ModelConfig, include_entropy_model: bool = False) -> int:
    """Stored parameter count of a config (hash tables included), computed from shapes."""
    import jax

    from fastblt.model import abstract_params  # local import: keeps `import fastblt.config` light

    params = dict(abstract_params(config))
    if not include_entropy_model:
        params.pop("entropy_model", None)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
