"""Validates the numpy oracle (tests/oracle.py) on its own and against the Hugging Face BLT port.

The HF port agrees with the reference only where the two share semantics, so every comparison here
uses: no EOS inside a row (HF has no document masking), cross_attn_k = 2 (HF's only working value),
MHA in the local models (HF's cross-attention inherits the local n_kv_heads; the reference's has no
grouped kv), patch lengths given from outside (HF style to HF, reference style to the oracle), and the
HF local window equal to the oracle's encoder/decoder window. Things found while writing these tests:

* HF (transformers 5.23) applies ``local_attention_window_len`` to the encoder *and* the decoder (both
  use the encoder's sliding-window mask) and ``patcher_config.sliding_window`` to the entropy model,
  with the reference rule "i - j < window"; the global model is plain causal.
* HF re-pools and re-projects before every encoder cross-attention when the encoder has
  cross_attn_all_layers (so the slots of earlier layers are discarded); the oracle matches it with
  ``encoder_repool_every_layer=True``.
* HF fills a fully masked cross-attention row (the slots of the empty "next byte" patch) with a uniform
  average where the oracle gives 0; only the last global position sees it and no byte reads it, so the
  logits still agree.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastblt import config as fconfig
from fastblt.config import (
    EntropyModelConfig,
    HashConfig,
    LocalModelConfig,
    ModelConfig,
    TransformerConfig,
)

try:  # pytest puts tests/ on sys.path while it is not a package; `tests.oracle` once it is one
    import oracle
except ImportError:  # pragma: no cover - depends on how pytest put tests/ on sys.path
    from tests import oracle

TOL = 1e-4

# --------------------------------------------------------------------------------------------------
# Oracle-only checks (no torch needed)
# --------------------------------------------------------------------------------------------------

HELLO = [1, 76, 105, 112, 112, 115, 48, 36, 123, 115, 118, 112, 104, 37]  # BOS + "Hello, world!"
HASH_VECTORS = {  # §3 of the reference notes: prime 1000000007, vocab 500002
    3: [443987, 124875, 393970, 386145, 358223, 190185, 141703, 484917, 141967, 146186, 10172, 334275,
        306354, 205291],
    4: [437197, 433869, 117936, 254402, 246577, 30240, 114083, 12253, 461502, 217488, 33292, 467104,
        390141, 114099],
    8: [172383, 205585, 456240, 129346, 299568, 322649, 430431, 246559, 94549, 155186, 258407, 498251,
        491201, 418709],
}  # fmt: skip


@pytest.mark.parametrize("n", sorted(HASH_VECTORS))
def test_hash_ids_match_reference_vectors(n):
    ids = oracle.hash_ids_np(np.array([HELLO]), n, 1000000007, 500002)
    np.testing.assert_array_equal(ids[0], HASH_VECTORS[n])


def test_primes_agree_with_config():
    assert tuple(oracle.PRIMES) == tuple(fconfig.HASH_PRIMES)


def test_patch_ids_worked_example():
    lengths = np.array([[1, 2, 2, 1, 1]])  # §6.3: N = 6, the last patch is the unseen next byte
    np.testing.assert_array_equal(oracle.patch_ids(lengths, 6)[0], [0, 1, 1, 2, 2, 3])
    np.testing.assert_array_equal(oracle.decoder_patch_ids(lengths, 6)[0], [0, 0, 1, 1, 2, 3])


def test_patch_ids_right_padded_row():
    lengths = np.array([[1, 3, 3, 0, 0], [1, 1, 2, 2, 1]])
    np.testing.assert_array_equal(oracle.patch_ids(lengths, 6), [[0, 1, 1, 1, 2, 2], [0, 1, 2, 2, 3, 3]])
    np.testing.assert_array_equal(
        oracle.decoder_patch_ids(lengths, 6), [[0, 0, 0, 1, 1, 1], [0, 1, 1, 2, 2, 3]]
    )


def test_masks_follow_window_and_documents():
    tokens = np.array([[1, 10, 2, 11, 12, 13]])
    m = oracle.local_self_mask(tokens, window=2, document_masking=True)[0]
    expect = np.zeros((6, 6), bool)
    for i, js in {0: [0], 1: [0, 1], 2: [1, 2], 3: [3], 4: [3, 4], 5: [4, 5]}.items():
        expect[i, js] = True
    np.testing.assert_array_equal(m, expect)
    # Patches [1] [10, 2] [11] [12, 13] [next]: the EOS patch 1 closes the first document.
    pids = oracle.patch_ids(np.array([[1, 2, 1, 2, 1]]), 6)
    g = oracle.global_self_mask(tokens, pids, 5, None, True)[0]
    assert g[1, 0] and g[1, 1] and not g[2, 1] and g[4, 2] and g[4, 3] and not g[3, 4]


def test_patch_lengths_convention_is_enforced():
    params = {}
    with pytest.raises(ValueError, match="sum to 4"):
        oracle.blt_forward(params, ModelConfig(), np.ones((1, 3), np.int64), np.array([[1, 2, 0]]))


def _lin(rng, i: int, o: int) -> dict:
    return {"kernel": rng.normal(0, i**-0.5, (i, o))}


def _norm(rng, d: int) -> dict:
    return {"scale": 1 + 0.2 * rng.normal(size=d)}


def _random_blocks(rng, cfg: TransformerConfig) -> dict:
    d, f, kv = cfg.dim, cfg.hidden_dim, cfg.kv_heads * cfg.head_dim
    shapes = {"wq": (d, d), "wk": (d, kv), "wv": (d, kv), "wo": (d, d)}
    return {
        f"layers_{i}": {
            "attention": {w: _lin(rng, *shape) for w, shape in shapes.items()},
            "feed_forward": {"w1": _lin(rng, d, f), "w3": _lin(rng, d, f), "w2": _lin(rng, f, d)},
            "attention_norm": _norm(rng, d),
            "ffn_norm": _norm(rng, d),
        }
        for i in range(cfg.n_layers)
    }


def _random_cross(rng, cfg: LocalModelConfig) -> dict:
    d = cfg.dim
    return {
        f"cross_attn_layers_{i}": {
            **{w: _lin(rng, d, d) for w in ("wq", "wk", "wv", "wo")},
            "cross_attn_norm_q": _norm(rng, d),
            "cross_attn_norm_kv": _norm(rng, d),
        }
        for i in range(cfg.n_cross_layers)
    }


def _random_entropy_params(rng, ecfg: EntropyModelConfig) -> dict:
    p = {"tok_embeddings": {"embedding": rng.normal(0, 1, (ecfg.vocab_size, ecfg.dim))}}
    p.update(_random_blocks(rng, ecfg))
    p["norm"] = _norm(rng, ecfg.dim)
    p["output"] = _lin(rng, ecfg.dim, ecfg.vocab_size)
    return p


def _random_blt_params(rng, config: ModelConfig) -> dict:
    """Random parameters in the Flax layout (no entropy model: blt_forward does not read it)."""
    de, dd, dg, k = config.encoder.dim, config.decoder.dim, config.global_model.dim, config.cross_attn_k
    tables = {
        f"table_{j}": {"embedding": rng.normal(0, de**-0.5, (config.hash.vocab, de))}
        for j in range(config.hash.n_tables)
    }
    enc = {
        "tok_embeddings": {"embedding": rng.normal(0, de**-0.5, (config.vocab_size, de))},
        "patch_embedding_projection": _lin(rng, de, de * k),
        **_random_blocks(rng, config.encoder),
        **_random_cross(rng, config.encoder),
    }
    glob = _random_blocks(rng, config.global_model)
    if config.needs_global_projection:
        glob["token_embedding_projection"] = _lin(rng, k * de, dg)
    dec = {
        "patch_embedding_projection": _lin(rng, dg, dd * k),
        **_random_blocks(rng, config.decoder),
        **_random_cross(rng, config.decoder),
        "norm": _norm(rng, dd),
        "output": _lin(rng, dd, config.vocab_size),
    }
    return {"hash_embed": tables, "local_encoder": enc, "global_transformer": glob, "local_decoder": dec}


def _small_config(k: int, **changes) -> ModelConfig:
    """A tiny reference-semantics config (document masking on, windows 6) for oracle-only checks."""
    return ModelConfig(
        encoder=LocalModelConfig(
            dim=16, n_layers=2, n_heads=2, ffn_dim=24, window=6, cross_attn_all_layers=True
        ),
        global_model=TransformerConfig(dim=40, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=32),
        decoder=LocalModelConfig(
            dim=16, n_layers=2, n_heads=4, ffn_dim=24, window=6, cross_attn_all_layers=True
        ),
        entropy_model=None,
        patcher=fconfig.PatcherConfig(mode="space"),
        hash=HashConfig(group_sizes=(2, 3), nb_functions=2, vocab=31),
        cross_attn_k=k,
        **changes,
    )  # fmt: skip


def test_batch_rows_are_independent_of_padding():
    """A batch with unequal patch counts (zero-padded) and an EOS inside gives each row's own logits.

    Extra zero-length patches only add global positions after the real ones (causal) that no byte
    reads, so padding must not change anything.
    """
    config = _small_config(k=3)
    params = _random_blt_params(np.random.default_rng(1), config)
    tokens = np.array([[1, 40, 41, 2, 1, 50, 51, 52, 53, 54], [1, 60, 61, 62, 63, 64, 65, 66, 67, 68]])
    rows = [[1, 2, 1, 3, 4], [1, 1, 1, 1, 2, 2, 2, 1]]
    padded = np.array([r + [0] * (8 - len(r)) for r in rows])
    batch = oracle.blt_forward(params, config, tokens, padded)
    for b, row in enumerate(rows):
        alone = oracle.blt_forward(params, config, tokens[b : b + 1], np.array([row]))
        np.testing.assert_allclose(batch[b], alone[0], atol=1e-10)
    assert np.all(np.isfinite(batch))


def test_document_masking_isolates_documents():
    """With document masking, a document after an EOS gives the same logits as the document alone.

    RoPE is relative, so only the mask can make a difference; unigram hashes (n = 1) keep the hash
    embeddings from looking back across the EOS (larger n-grams do, in the reference too).
    """
    config = _small_config(k=2, document_masking=True)
    config = config.replace(hash=HashConfig(group_sizes=(1,), nb_functions=2, vocab=31))
    params = _random_blt_params(np.random.default_rng(4), config)
    doc1, doc2 = [1, 40, 41, 42, 43, 2], [1, 50, 51, 52, 53, 54, 55]
    tokens = np.array([doc1 + doc2])
    # Patches [1] [40 41] [42 43 2] | [1] [50 51 52] [53 54] [55 next]: the EOS patch closes doc 1.
    full = oracle.blt_forward(params, config, tokens, np.array([[1, 2, 3, 1, 3, 2, 2]]))[0]
    alone = oracle.blt_forward(params, config, np.array([doc2]), np.array([[1, 3, 2, 2]]))[0]
    np.testing.assert_allclose(full[len(doc1) :], alone, atol=1e-10)
    leaky = oracle.blt_forward(
        params, config.replace(document_masking=False), tokens, [[1, 2, 3, 1, 3, 2, 2]]
    )
    assert np.abs(leaky[0, len(doc1) :] - alone).max() > 1e-3


def test_cross_attn_k_slots_generalize():
    """k = 3 with every slot given the same projection columns equals k = 1 (slot layout check).

    Identical slots attend identically, the global input [x, x, x] through projection G equals x
    through G1 + G2 + G3, and a byte attending k identical slots equals it attending one.
    """
    c3 = _small_config(k=3)
    c1 = _small_config(k=1)
    p3 = _random_blt_params(np.random.default_rng(2), c3)
    p1 = _random_blt_params(np.random.default_rng(2), c1)  # same draws for tables, blocks, cross layers
    de, dg = c3.encoder.dim, c3.global_model.dim
    w_enc = p1["local_encoder"]["patch_embedding_projection"]["kernel"]
    p3["local_encoder"]["patch_embedding_projection"]["kernel"] = np.concatenate([w_enc] * 3, axis=1)
    g3 = p3["global_transformer"]["token_embedding_projection"]["kernel"]
    p1["global_transformer"]["token_embedding_projection"]["kernel"] = sum(
        g3[j * de : (j + 1) * de] for j in range(3)
    )
    w_dec = p1["local_decoder"]["patch_embedding_projection"]["kernel"]
    p3["local_decoder"]["patch_embedding_projection"]["kernel"] = np.concatenate([w_dec] * 3, axis=1)
    for name in ("local_encoder", "local_decoder", "hash_embed"):
        for key in p1[name]:
            if key != "patch_embedding_projection":
                p3[name][key] = p1[name][key]
    for key in p1["global_transformer"]:
        if key.startswith("layers_"):
            p3["global_transformer"][key] = p1["global_transformer"][key]
    assert g3.shape == (3 * de, dg)
    tokens = np.array([[1, 30, 31, 32, 2, 1, 33, 34, 35]])
    lengths = np.array([[1, 3, 2, 1, 3]])
    inter3, inter1 = {}, {}
    out3 = oracle.blt_forward(p3, c3, tokens, lengths, intermediates=inter3)
    out1 = oracle.blt_forward(p1, c1, tokens, lengths, intermediates=inter1)
    for j in range(3):
        np.testing.assert_allclose(
            inter3["patch_embeds"][..., j * de : (j + 1) * de], inter1["patch_embeds"], atol=1e-10
        )
    np.testing.assert_allclose(out3, out1, atol=1e-9)


def test_entropy_model_window_and_documents_are_local():
    """Self-consistency: RoPE is relative, so position i only depends on its visible context.

    With L layers of window W, byte i depends on bytes i - L*(W-1) .. i only; with document masking,
    a document after an EOS gives the same logits as the document run alone.
    """
    rng = np.random.default_rng(0)
    ecfg = EntropyModelConfig(
        dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24, window=4, document_masking=True
    )
    p = _random_entropy_params(rng, ecfg)
    doc1 = [1, *rng.integers(4, 260, 6).tolist(), 2]
    doc2 = [1, *rng.integers(4, 260, 14).tolist()]
    full = oracle.entropy_model_forward(p, ecfg, np.array([doc1 + doc2]))[0]
    alone = oracle.entropy_model_forward(p, ecfg, np.array([doc2]))[0]
    np.testing.assert_allclose(full[len(doc1) :], alone, atol=1e-10)
    reach = ecfg.n_layers * (ecfg.window - 1)
    i = len(doc2) - 1
    cut = oracle.entropy_model_forward(p, ecfg, np.array([doc2[i - reach :]]))[0]
    np.testing.assert_allclose(cut[-1], alone[i], atol=1e-10)
    cut_short = oracle.entropy_model_forward(p, ecfg, np.array([doc2[i - reach + 1 :]]))[0]
    assert np.abs(cut_short[-1] - alone[i]).max() > 1e-6  # one byte less of context does change it


def test_entropies_of_uniform_and_peaked_logits():
    logits = np.zeros((1, 2, 260))
    logits[0, 1, 7] = 1e4
    ent = oracle.entropies(logits)
    np.testing.assert_allclose(ent[0], [np.log(260), 0.0], atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Parity with the Hugging Face port
# --------------------------------------------------------------------------------------------------


def _torch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return torch


def _rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": theta}


# Each case: sub-model shapes and the switches the brief asks to cover. All local models are MHA (see
# the module docstring); the global model and the patcher use grouped kv heads.
CASES = {
    "enc_last_dec_all_1fn": dict(
        de=32, dg=64, enc_heads=4, dec_heads=4, g_heads=4, g_kv=2, enc_layers=2, dec_layers=2,
        g_layers=2, enc_all=False, dec_all=True, nb_functions=1, group_sizes=(3, 4, 5), window=16,
    ),
    "enc_all_dec_first_3fn_proj": dict(
        de=32, dg=48, enc_heads=2, dec_heads=4, g_heads=6, g_kv=3, enc_layers=2, dec_layers=3,
        g_layers=2, enc_all=True, dec_all=False, nb_functions=3, group_sizes=(2, 4), window=16,
    ),
}  # fmt: skip
HASH_VOCAB = 97
ENC_THETA, DEC_THETA, GLOBAL_THETA, PATCHER_THETA = 10000.0, 500000.0, 1000.0, 10000.0
ENC_EPS, DEC_EPS, GLOBAL_EPS, PATCHER_EPS = 1e-5, 1e-6, 1e-5, 1e-6
PATCHER = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, window=8)


def _hf_model(case: dict, seed: int):
    """A small random BltForCausalLM in eval mode (float32, eager attention, perturbed norm scales)."""
    torch = _torch()
    from transformers import BltConfig, BltForCausalLM

    c = case
    enc = dict(
        hidden_size=c["de"], num_hidden_layers=c["enc_layers"], num_attention_heads=c["enc_heads"],
        intermediate_size=48, rms_norm_eps=ENC_EPS, rope_parameters=_rope(ENC_THETA),
        cross_attn_all_layers=c["enc_all"], cross_attn_k=2, hidden_size_global=c["dg"],
        max_position_embeddings=128,
    )  # fmt: skip
    dec = dict(
        hidden_size=c["de"], num_hidden_layers=c["dec_layers"], num_attention_heads=c["dec_heads"],
        intermediate_size=40, rms_norm_eps=DEC_EPS, rope_parameters=_rope(DEC_THETA),
        cross_attn_all_layers=c["dec_all"], cross_attn_k=2, hidden_size_global=c["dg"],
        max_position_embeddings=128,
    )  # fmt: skip
    glob = dict(
        hidden_size=c["dg"], num_hidden_layers=c["g_layers"], num_attention_heads=c["g_heads"],
        num_key_value_heads=c["g_kv"], intermediate_size=72, rms_norm_eps=GLOBAL_EPS,
        rope_parameters=_rope(GLOBAL_THETA), max_position_embeddings=128,
    )  # fmt: skip
    patcher = dict(
        hidden_size=PATCHER["dim"], num_hidden_layers=PATCHER["n_layers"],
        num_attention_heads=PATCHER["n_heads"], num_key_value_heads=PATCHER["n_kv_heads"],
        intermediate_size=PATCHER["ffn_dim"], rms_norm_eps=PATCHER_EPS, rope_parameters=_rope(PATCHER_THETA),
        sliding_window=PATCHER["window"], max_position_embeddings=128,
    )  # fmt: skip
    config = BltConfig(
        vocab_size=260,
        cross_attn_k=2,
        local_attention_window_len=c["window"],
        encoder_hash_byte_group_size=list(c["group_sizes"]),
        encoder_hash_byte_group_vocab=HASH_VOCAB,
        encoder_hash_byte_group_nb_functions=c["nb_functions"],
        encoder_config=enc,
        decoder_config=dec,
        global_config=glob,
        patcher_config=patcher,
        rope_parameters=_rope(GLOBAL_THETA),
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = BltForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # Norm scales start at 1, which would hide a missing or misplaced scale: perturb them.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
    return model


def _fastblt_config(case: dict) -> ModelConfig:
    """The ModelConfig describing the same model as :func:`_hf_model`, with HF's semantics switches."""
    c = case
    config = ModelConfig(
        encoder=LocalModelConfig(
            dim=c["de"], n_layers=c["enc_layers"], n_heads=c["enc_heads"], ffn_dim=48,
            rope_theta=ENC_THETA, norm_eps=ENC_EPS, window=c["window"], cross_attn_all_layers=c["enc_all"],
        ),
        global_model=TransformerConfig(
            dim=c["dg"], n_layers=c["g_layers"], n_heads=c["g_heads"], n_kv_heads=c["g_kv"], ffn_dim=72,
            rope_theta=GLOBAL_THETA, norm_eps=GLOBAL_EPS,
        ),
        decoder=LocalModelConfig(
            dim=c["de"], n_layers=c["dec_layers"], n_heads=c["dec_heads"], ffn_dim=40,
            rope_theta=DEC_THETA, norm_eps=DEC_EPS, window=c["window"], cross_attn_all_layers=c["dec_all"],
        ),
        entropy_model=_entropy_config(),
        hash=HashConfig(group_sizes=c["group_sizes"], nb_functions=c["nb_functions"], vocab=HASH_VOCAB),
        cross_attn_k=2,
        document_masking=False,  # HF has no EOS blocking
        encoder_repool_every_layer=c["enc_all"],  # HF re-pools before every encoder cross-attn
    )  # fmt: skip
    fconfig.validate(config)
    return config


def _entropy_config() -> EntropyModelConfig:
    return EntropyModelConfig(
        dim=PATCHER["dim"], n_layers=PATCHER["n_layers"], n_heads=PATCHER["n_heads"],
        n_kv_heads=PATCHER["n_kv_heads"], ffn_dim=PATCHER["ffn_dim"], rope_theta=PATCHER_THETA,
        norm_eps=PATCHER_EPS, window=PATCHER["window"], document_masking=False,
    )  # fmt: skip


# Flax name -> HF projection name (HF key = f"{module}.{name}_proj.weight").
ATTN_NAMES = (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o"))
MLP_NAMES = (("w1", "gate"), ("w3", "up"), ("w2", "down"))


def _to_flax(model) -> dict:
    """Maps the HF state dict to the Flax layout the oracle reads (torch Linear (out, in) -> (in, out))."""
    sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    cfg = model.config

    def lin(key):
        return {"kernel": sd[key].T}

    def scale(key):
        return {"scale": sd[key]}

    def block(prefix):
        a, m = f"{prefix}.self_attn", f"{prefix}.mlp"
        return {
            "attention": {w: lin(f"{a}.{n}_proj.weight") for w, n in ATTN_NAMES},
            "feed_forward": {w: lin(f"{m}.{n}_proj.weight") for w, n in MLP_NAMES},
            "attention_norm": scale(f"{prefix}.input_layernorm.weight"),
            "ffn_norm": scale(f"{prefix}.post_attention_layernorm.weight"),
        }

    def cross(prefix):
        p = {w: lin(f"{prefix}.{n}_proj.weight") for w, n in ATTN_NAMES}
        p["cross_attn_norm_q"] = scale(f"{prefix}.q_norm.weight")
        p["cross_attn_norm_kv"] = scale(f"{prefix}.k_norm.weight")
        return p

    def n_cross(sub):
        return sub.num_hidden_layers if sub.cross_attn_all_layers else 1

    enc_cfg, dec_cfg, glob_cfg, pat_cfg = (
        cfg.encoder_config,
        cfg.decoder_config,
        cfg.global_config,
        cfg.patcher_config,
    )
    vh = cfg.encoder_hash_byte_group_vocab
    fused = sd["model.encoder_hash_tok_embedding.weight"]
    n_tables = fused.shape[0] // vh
    params = {
        "hash_embed": {f"table_{j}": {"embedding": fused[j * vh : (j + 1) * vh]} for j in range(n_tables)},
        "local_encoder": {
            "tok_embeddings": {"embedding": sd["model.local_encoder.embed_tokens.weight"]},
            "patch_embedding_projection": lin("model.local_encoder.patch_embedding_projection.weight"),
        },
        "global_transformer": {},
        "local_decoder": {
            "patch_embedding_projection": lin("model.local_decoder.patch_embedding_projection.weight"),
            "norm": scale("model.local_decoder.norm.weight"),
            "output": lin("lm_head.weight"),
        },
        "entropy_model": {
            "tok_embeddings": {"embedding": sd["model.patcher.embed_tokens.weight"]},
            "norm": scale("model.patcher.norm.weight"),
            "output": lin("model.patcher.lm_head.weight"),
        },
    }  # fmt: skip
    for i in range(enc_cfg.num_hidden_layers):
        params["local_encoder"][f"layers_{i}"] = block(f"model.local_encoder.layers.{i}")
    for i in range(n_cross(enc_cfg)):
        params["local_encoder"][f"cross_attn_layers_{i}"] = cross(
            f"model.local_encoder.cross_attn_layers.{i}"
        )
    if "model.global_transformer.token_embedding_projection.weight" in sd:
        params["global_transformer"]["token_embedding_projection"] = lin(
            "model.global_transformer.token_embedding_projection.weight"
        )
    for i in range(glob_cfg.num_hidden_layers):
        params["global_transformer"][f"layers_{i}"] = block(f"model.global_transformer.layers.{i}")
    for i in range(dec_cfg.num_hidden_layers):
        params["local_decoder"][f"layers_{i}"] = block(f"model.local_decoder.layers.{i}")
    for i in range(n_cross(dec_cfg)):
        params["local_decoder"][f"cross_attn_layers_{i}"] = cross(
            f"model.local_decoder.cross_attn_layers.{i}"
        )
    for i in range(pat_cfg.num_hidden_layers):
        params["entropy_model"][f"layers_{i}"] = block(f"model.patcher.layers.{i}")
    return params


def _hf_style_lengths(rng, n: int, trailing_empty: bool, num_patches: int | None = None) -> list[int]:
    """HF-style lengths (sum n, first 1): random patches of 1..5 bytes, optionally an empty last one.

    With num_patches, the row is forced to exactly that many entries (the caller picks a feasible one).
    """
    if n == 1:
        return [1, 0]  # HF's patcher output for one byte: the next byte always opens a patch
    while True:
        rest, row = n - 1, [1]
        while rest > 0:
            size = int(min(rest, rng.integers(1, 6)))
            row.append(size)
            rest -= size
        if trailing_empty:
            row.append(0)
        if num_patches is None or len(row) == num_patches:
            return row


def _ref_style(row: list[int]) -> list[int]:
    """HF-style (sum N) -> reference-style (sum N + 1): the next byte joins the last patch."""
    return [*row[:-1], row[-1] + 1]


def _compare(case_name: str, n: int, batch: int, trailing_empty: bool, seed: int) -> None:
    torch = _torch()
    case = CASES[case_name]
    model = _hf_model(case, seed)
    config = _fastblt_config(case)
    params = _to_flax(model)
    rng = np.random.default_rng(seed)
    # No EOS (2) inside the rows: HF has no document masking.
    tokens = np.concatenate([np.ones((batch, 1), np.int64), rng.integers(3, 260, (batch, n - 1))], axis=1)
    tokens[tokens == 2] = 3
    first = _hf_style_lengths(rng, n, trailing_empty)
    rows = [first] + [_hf_style_lengths(rng, n, trailing_empty, len(first)) for _ in range(batch - 1)]
    hf_lengths = np.array(rows)
    ref_lengths = np.array([_ref_style(r) for r in rows])
    with torch.no_grad():
        hf = model(
            input_ids=torch.from_numpy(tokens), patch_lengths=torch.from_numpy(hf_lengths), use_cache=False
        ).logits
    got = oracle.blt_forward(params, config, tokens, ref_lengths)
    assert got.shape == (batch, n, 260)
    np.testing.assert_allclose(got, hf.double().numpy(), atol=TOL, rtol=0)


@pytest.mark.parity
@pytest.mark.parametrize("case_name", sorted(CASES))
@pytest.mark.parametrize("n,trailing_empty", [(1, True), (7, True), (40, False)])
def test_blt_forward_matches_hf(case_name, n, trailing_empty):
    """Lengths 1 and 7 fit the window (16); length 40 runs past it in the encoder and decoder."""
    _compare(case_name, n, batch=1, trailing_empty=trailing_empty, seed=n)


@pytest.mark.parity
def test_blt_forward_matches_hf_batch_equal_patch_counts():
    """HF only handles batches whose rows have the same number of patches; lengths still differ."""
    _compare("enc_last_dec_all_1fn", 24, batch=2, trailing_empty=True, seed=5)


@pytest.mark.parity
def test_entropy_model_matches_hf_patcher():
    torch = _torch()
    model = _hf_model(CASES["enc_last_dec_all_1fn"], seed=11)
    params = _to_flax(model)["entropy_model"]
    rng = np.random.default_rng(11)
    tokens = rng.integers(0, 260, (2, 40))  # longer than the patcher window (8); EOS-free (see above)
    tokens[tokens == 2] = 3
    with torch.no_grad():
        hf_ent, _, hf_logits = model.model.patcher(torch.from_numpy(tokens))
    logits = oracle.entropy_model_forward(params, _entropy_config(), tokens)
    np.testing.assert_allclose(logits, hf_logits.double().numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(oracle.entropies(logits), hf_ent.double().numpy(), atol=TOL, rtol=0)


@pytest.mark.parity
def test_hash_ids_match_hf_for_every_prime():
    torch = _torch()
    from transformers.models.blt.modeling_blt import byte_group_hash_function

    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 260, (2, 30))
    for prime in oracle.PRIMES:
        for n in (1, 3, 6, 8):
            hf = byte_group_hash_function(torch.from_numpy(tokens), n, prime, 500002).numpy()
            np.testing.assert_array_equal(oracle.hash_ids_np(tokens, n, prime, 500002), hf)
