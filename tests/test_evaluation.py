"""fastblt.evaluation: metrics on hand-worked strings, task construction, the run plan, and a real run
of the harness (table, plot, resumption) and of `fastblt eval` on a tiny random model."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastblt import cli
from fastblt.config import ConfigError, load_config, model_config
from fastblt.evaluation import Example, Task, evaluate, function_examples, parse_settings, plan, translation
from fastblt.evaluation.harness import agreement, judge_bits_per_byte
from fastblt.evaluation.tasks import exact_first_line
from fastblt.io.export import abstract_params, save_export

MODULE = b'''import os


def one_liner(x): return x


@decorator
def documented(a,
               b=2):
    """Adds.

    Really."""
    total = a + b
    return total


class K:
    def method(self):
        def inner():
            return 1
        return inner()
'''


def test_function_examples_split_header_and_body():
    ex = {e.key.split(":")[-1]: e for e in function_examples(MODULE, "m.py", 10_000)}
    assert sorted(ex) == ["documented", "inner", "method"]  # the one-line def has no body to complete
    d = ex["documented"]
    assert d.prompt.endswith(b'               b=2):\n    """Adds.\n\n    Really."""\n')
    assert d.prompt.startswith(b"import os")  # the module up to the function is the prompt
    assert d.reference == b"    total = a + b\n    return total\n"
    assert ex["method"].reference == b"        def inner():\n            return 1\n        return inner()\n"
    assert function_examples(MODULE, "m.py", 12)[0].prompt == d.prompt[-12:]  # the prompt's tail
    assert function_examples(b"def broken(:\n", "b.py", 100) == []
    assert function_examples(b"\xff\xfe", "bin.py", 100) == []


def test_a_completion_ends_where_its_function_ends():
    ex = {e.key.split(":")[-1]: e for e in function_examples(MODULE, "m.py", 10_000)}
    task = Task("code_completion", tuple(ex.values()), None, ("chrf",))
    # A top-level function ends at the next line of code at column 0; blank and comment lines at
    # any depth stay inside it.
    out = b"    total = a + b\n\n# note\n    return total\n\n\nclass L:\n    pass\n"
    assert task.cut(out, ex["documented"]) == b"    total = a + b\n\n# note\n    return total\n\n\n"
    # A method ends at a line indented like its def (4) or less, not at a deeper one.
    out = b"        x = 1\n            y\n    def other(self):\n        pass\n"
    assert task.cut(out, ex["method"]) == b"        x = 1\n            y\n"
    assert task.cut(b"    def other(self): ...\n", ex["method"]) == b""  # the model closed it at once
    assert task.cut(out) == out  # no example: the task's stop alone (none here)
    assert task.cuts([out, out]) == [out, task.cut(out, ex["method"])]  # each its example's end


def test_code_completion_with_a_limit_takes_functions_in_turn_from_each_module(tmp_path):
    from fastblt.evaluation.tasks import code_completion

    def module(*names: str) -> str:
        return "".join(f"def {n}(x):\n    return x\n\n" for n in names)

    held = tmp_path / "held"
    held.mkdir()
    (held / "a.py").write_text(module("a1", "a2", "a3"))
    (held / "b.py").write_text(module("b1"))
    (held / "c.py").write_text("x = 1\n")  # no function: no turn
    (held / "d.py").write_text(module("d1", "d2"))
    (tmp_path / "train.py").write_text(module("t"))
    data = load_config("base").data
    data.source, data.paths, data.eval_paths = "text", [str(tmp_path / "train.py")], [str(held / "*.py")]

    def names(limit):
        return [e.key.split(":")[-1] for e in code_completion(data, limit, 1000).examples]

    assert names(None) == ["a1", "a2", "a3", "b1", "d1", "d2"]  # all, in corpus order
    assert names(5) == ["a1", "b1", "d1", "a2", "d2"]  # round by round over the modules
    assert names(2) == ["a1", "b1"]  # one from each of the first modules that have one


def test_word_type_token_ratio_on_hand_worked_texts():
    from fastblt.evaluation.tasks import word_type_token_ratio

    # "codecs.codecs.codecs": 1 type / 3 words; "return a + b": 3 / 3; a text without words is left out.
    assert word_type_token_ratio(["codecs.codecs.codecs", "return a + b", " + "]) == pytest.approx(
        (1 / 3 + 1) / 2
    )
    assert word_type_token_ratio(["", "()"]) is None
    task = Task("t", (Example("k", b"", b"x x"),), None, ())
    assert task.score([b"x x y y"]) == {"type_token_ratio": 0.5}


def test_metrics_on_hand_worked_strings():
    assert exact_first_line(["\n  return a + b  \nmore"], ["return a + b\n"]) == 1.0
    assert exact_first_line(["return a"], ["return b"]) == 0.0
    ref = b"the cat sat on the mat today"  # long enough for BLEU's 4-grams
    task = Task("t", (Example("k", b"", ref),), b"\n", ("bleu", "chrf"))
    assert task.cut(ref + b"\nignored") == ref
    same = task.score([ref + b"\nanything after the stop"])
    assert same["chrf"] == pytest.approx(100.0) and same["bleu"] == pytest.approx(100.0)
    other = task.score([b"zzzz qqqq"])
    assert other["chrf"] == pytest.approx(0.0) and other["bleu"] == pytest.approx(0.0)
    assert agreement([b"abcd", b"xy"], [b"abzz", b"xyz"]) == pytest.approx(4 / 7)


def test_translation_prompts_have_the_few_shot_prefix(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"src": f"s{i}", "tgt": f"t{i}"} for i in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = translation(str(path), None, 10_000, "src", "tgt", shots=1)
    assert [e.reference for e in task.examples] == [b"t1", b"t2", b"t3"]
    assert task.examples[0].prompt == b"Source: s0\nTarget: t0\n\nSource: s1\nTarget: "
    assert task.stop == b"\n"
    with pytest.raises(ConfigError, match="--source-field/--target-field"):
        translation(str(path), None, 100, "source", "target")


def test_plan_runs_ar_first_then_each_rule_once_over_the_other_settings():
    settings = parse_settings(["draft=4,8", "block_size=4,8", "alpha=0.7,0.9", "gamma=0.5", "one_step=true"])
    assert settings == {
        "draft": [4, 8],
        "block_size": [4, 8],
        "alpha": [0.7, 0.9],
        "gamma": [0.5],
        "one_step": [True],
    }
    runs = plan(["blt_s", "blt_d"], settings)
    rules = [{"alpha": 0.7}, {"alpha": 0.9}, {"gamma": 0.5}, {"one_step": True}]
    assert runs == [("ar", {}), ("blt_s", {"draft": 4}), ("blt_s", {"draft": 8})] + [
        ("blt_d", {"block_size": b, **rule}) for b in (4, 8) for rule in rules
    ]
    # No rule given: the method's default rule, once per other setting; one_step=false is no rule.
    assert plan(["blt_dv"], {"block_size": [4], "one_step": [False]}) == [
        ("ar", {}),
        ("blt_dv", {"block_size": 4}),
    ]
    # anchor takes words and crosses the rules (blt_s ignores it).
    anchors = parse_settings(["anchor=forced,patch", "one_step=true"])
    assert anchors == {"anchor": ["forced", "patch"], "one_step": [True]}
    assert plan(["blt_dv", "blt_s"], anchors) == [
        ("ar", {}),
        ("blt_dv", {"anchor": "forced", "one_step": True}),
        ("blt_dv", {"anchor": "patch", "one_step": True}),
        ("blt_s", {}),
    ]
    with pytest.raises(ConfigError, match="anchor='patchy'.*forced, patch"):
        parse_settings(["anchor=patchy"])
    with pytest.raises(ConfigError, match="--setting"):
        parse_settings(["temperature=1"])
    with pytest.raises(ConfigError, match="--method"):
        plan(["beam"], {})


@pytest.fixture(scope="module")
def tiny():
    config = model_config(load_config("tiny:patching=static"))
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: 0.05 * rng.standard_normal(s.shape).astype(s.dtype), abstract_params(config)
    )
    return config, params


def test_judge_bits_per_byte_is_the_unpadded_forward_nll(tiny):
    from fastblt.model import BLT
    from fastblt.tokenizer import encode

    config, params = tiny
    # Three lengths in chunks of two: padded rows and a short last chunk must not change a byte's score.
    prompts, outputs = [b"def f(x):", b"ab", b"x" * 70], [b" return x", b"c", b"yz"]
    want_nll, n = 0.0, 0
    forward = jax.jit(BLT(config).apply)  # one compile per length, not one per operation
    for p, o in zip(prompts, outputs, strict=True):
        ids = encode(p + o, add_bos=True, add_eos=False)
        logits = forward({"params": params}, jnp.asarray(ids)[None])[0]
        logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
        for t in range(len(ids) - len(o), len(ids)):
            want_nll -= logp[t - 1, ids[t]]
            n += 1
    got = judge_bits_per_byte(params, config, prompts, outputs, batch_size=2)
    assert got == pytest.approx(want_nll / n / np.log(2), rel=1e-4)


@pytest.mark.slow
def test_harness_writes_table_plot_and_resumes(tiny, tmp_path, monkeypatch):
    config, params = tiny
    examples = tuple(Example(f"k{i}", f"def f{i}(x):\n".encode(), b"    return x\n") for i in range(3))
    task = Task("code_completion", examples, None, ("exact_first_line", "chrf"))
    out = str(tmp_path / "eval")
    rows = evaluate(
        params,
        config,
        task,
        ["ar", "blt_s"],
        {"draft": [2]},
        max_bytes=6,
        batch_size=2,
        out=out,
        compile_workers=2,
    )
    assert [(r["method"], r["setting"]) for r in rows] == [("ar", {}), ("blt_s", {"draft": 2})]
    ar, spec = rows
    assert ar["agreement_with_ar"] == 1.0 and spec["agreement_with_ar"] == 1.0  # greedy blt_s is ar
    assert ar["decoder_passes_per_byte"] == pytest.approx(1.0) and ar["generated_bytes"] == 18
    assert spec["bandwidth_gb_per_byte"] > 0 and ar["judge_bits_per_byte"] > 0
    table = (tmp_path / "eval" / "results.md").read_text()
    assert (
        "| blt_s draft=2 |" in table and (tmp_path / "eval" / "quality_vs_bandwidth.png").stat().st_size > 0
    )

    import fastblt.sampler

    def refuse(*a, **k):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(fastblt.sampler, "generate", refuse)
    again = evaluate(
        params, config, task, ["ar", "blt_s"], {"draft": [2]}, max_bytes=6, batch_size=2, out=out
    )
    assert [r["chrf"] for r in again] == [r["chrf"] for r in rows]
    # A later call with fewer runs returns its own, but the directory's table keeps every run in it
    # of the same family: not a run over other examples (another key digest) or another byte budget.
    with (
        open(tmp_path / "eval" / "results.jsonl", "a") as f,
        open(tmp_path / "eval" / "generations.jsonl", "a") as g,
    ):
        for family in (["other", 6], [json.loads(ar["key"])[3], 7]):
            key = json.dumps([3, "code_completion", 3, *family, "blt_s", [["draft", 9]]])
            f.write(json.dumps(dict(spec, key=key, setting={"draft": 9})) + "\n")
            g.write(json.dumps({"key": key, "outputs": ["", "", ""]}) + "\n")
    only_ar = evaluate(params, config, task, ["ar"], {}, max_bytes=6, batch_size=2, out=out)
    assert [r["method"] for r in only_ar] == ["ar"]
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "| ar |" in table and "| blt_s draft=2 |" in table and "draft=9" not in table


@pytest.mark.slow
def test_eval_cli_runs_translation(tiny, tmp_path, capsys):
    config, params = tiny
    export = str(save_export(tmp_path / "export", config, params))
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps({"source": f"word {i}", "target": f"mot {i}"}) + "\n" for i in range(5))
    )
    argv = ["eval", "--checkpoint", export, "--task", "translation", "--data", str(data), "--limit", "2",
            "--max-bytes", "5", "--out", str(tmp_path / "out")]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "task translation: 2 prompts" in out and "| ar |" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--checkpoint", export, "--task", "translation"])
    assert e.value.code == 2 and "--data FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(argv[:-2] + ["--max-prompt-bytes", str(config.max_bytes)])
    assert e.value.code == 2 and "--max-prompt-bytes" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- humaneval


def test_cut_at_the_first_of_several_stops():
    from fastblt.evaluation.tasks import HUMANEVAL_STOPS, Task

    task = Task("t", (), HUMANEVAL_STOPS, ())
    out = b"    return x\n\n\nif __name__ == '__main__':\n    f()\ndef g():\n"
    assert task.cut(out) == b"    return x\n\n"
    assert task.cut(b"    return 1") == b"    return 1"


def test_humaneval_pass_at_1_of_a_passing_a_failing_and_a_hanging_completion():
    from fastblt.evaluation import humaneval, pass_at_1

    task = humaneval(limit=3, max_prompt_bytes=10_000)
    assert [e.key for e in task.examples] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    first = task.examples[0]
    assert (
        first.prompt.decode().startswith("from typing import List")
        and "def has_close_elements" in first.check[0]
    )
    canonical = first.reference.decode()
    assert pass_at_1([first], [canonical]) == 1.0
    assert pass_at_1([first], ["    return False\n"]) == 0.0  # fails the tests
    hangs = "    while True:\n        pass\n"
    exits = "    raise SystemExit(0)\n"  # status 0 before the tests ran
    os_exit = "    import os\n    os._exit(0)\n"
    outs = [canonical, hangs, exits, os_exit]
    assert pass_at_1([first] * 4, outs, timeout=2.0) == pytest.approx(1 / 4)  # only the canonical body
    # The model sees the prompt's tail; the check keeps the whole prompt.
    short = humaneval(limit=1, max_prompt_bytes=50).examples[0]
    assert len(short.prompt) == 50 and short.check == first.check


def test_sandbox_blocks_network_processes_and_memory():
    from fastblt.evaluation.sandbox import network_isolated, run_program

    assert run_program("x = 1").passed
    assert not run_program("import os; os.system('true')").passed  # the guard removed os.system
    assert run_program("x = bytearray(4 << 30)", memory_bytes=1 << 30).result.endswith("MemoryError")
    if network_isolated():
        out = run_program("import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)")
        assert not out.passed and "unreachable" in out.result
