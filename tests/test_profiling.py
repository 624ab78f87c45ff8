"""fastblt.profiling: op names from HLO text, and a traced step reduced to components."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from fastblt.profiling import classify, format_table, op_kinds, op_names, profile_components

HLO = """HloModule jit_f

%fused_computation.3 (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %tanh.1 = f32[4]{0} tanh(%p), metadata={op_name="jit(f)/jvp(M)/enc/tanh"}
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %dot.2 = f32[4]{0} multiply(%a, %a), metadata={op_name="jit(f)/transpose(jvp(M))/dec/mul"}
  ROOT %fusion.3 = f32[4]{0} fusion(%dot.2), kind=kLoop, calls=%fused_computation.3
}
"""


def test_op_names_from_hlo_text():
    names = op_names(HLO)
    assert names["dot.2"] == "jit(f)/transpose(jvp(M))/dec/mul"
    # A fusion without metadata takes its called computation's root op name.
    assert names["fusion.3"] == "jit(f)/jvp(M)/enc/tanh"


KINDS_HLO = """HloModule jit_g

%triton_gemm_computation (a: bf16[64,64], b: bf16[64,64]) -> bf16[64,64] {
  %a = bf16[64,64]{1,0} parameter(0)
  %b = bf16[64,64]{1,0} parameter(1)
  ROOT %dot.0 = bf16[64,64]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%add_computation (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %add.1 = f32[4]{0} add(%p, %p)
}

ENTRY %main (x: bf16[64,64], q: bf16[1,8,64,64]) -> bf16[64,64] {
  %x = bf16[64,64]{1,0} parameter(0)
  %gemm_fusion_dot.3 = bf16[64,64]{1,0} fusion(%x, %x), kind=kCustom, calls=%triton_gemm_computation
  %custom-call.4 = (bf16[1,8,64,64]{3,2,1,0}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmax"
  %custom-call.5 = bf16[64,64]{1,0} custom-call(%x, %x), custom_call_target="__cublas$gemm"
  %fusion.6 = f32[4]{0} fusion(%x), kind=kLoop, calls=%add_computation
  ROOT %r = bf16[64,64]{1,0} copy(%gemm_fusion_dot.3)
}
"""


def test_op_kinds_from_hlo_text():
    kinds = op_kinds(KINDS_HLO)
    assert kinds["gemm_fusion_dot.3"] == "matmul"  # by its called computation's dot
    assert kinds["custom-call.4"] == "attention"
    assert kinds["custom-call.5"] == "matmul"
    assert kinds["r"] == "copy"
    assert "fusion.6" not in kinds  # an elementwise fusion is "other"


def test_classify_first_rule_wins():
    rules = (("cross", "dec/cross"), ("decoder", "dec"))
    assert classify("jit/dec/cross_attn/x", rules) == "cross"
    assert classify("jit/dec/layers_0/x", rules) == "decoder"
    assert classify("jit/optimizer/x", rules) == "other"


class _Two(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(64, name="enc")(x))
        return nn.Dense(8, name="dec")(x).sum()


@pytest.mark.slow
def test_profile_components_of_a_traced_step():
    model = _Two()
    x = jnp.ones((512, 32))
    params = model.init(jax.random.key(0), x)
    step = jax.jit(jax.grad(lambda p, x: model.apply(p, x)))
    prof = profile_components(step, (params, x), rules=(("enc", "/enc"), ("dec", "/dec")), steps=2)
    assert prof["total_ms"] > 0
    assert {"enc", "dec"} <= set(prof["ms_per_step"])
    fwd, bwd = prof["fwd_bwd"]["enc"]
    assert fwd > 0 and bwd > 0  # the backward's ops carry transpose(...) in their names
    assert sum(sum(v.values()) for v in prof["kinds"].values()) == pytest.approx(prof["total_ms"])
    assert "| enc |" in format_table(prof)
