"""fastblt.profiling: op names from HLO text, and a traced step reduced to components."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from fastblt.profiling import classify, format_table, op_names, profile_components

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
    assert "| enc |" in format_table(prof)
