"""`fastblt sample` input and output: strict JSON, raw-byte prompt files, --buffer-bytes, and errors
that name a flag the user can change."""

from __future__ import annotations

import io
import json
import sys

import jax
import numpy as np
import pytest

from fastblt import cli, config_command
from fastblt.config import load_config, model_config
from fastblt.io.export import abstract_params, save_export


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """An export of a random static-patching tiny BLT (no entropy model: nothing to train)."""
    config = model_config(load_config("tiny:patching=static"))
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: 0.05 * rng.standard_normal(s.shape).astype(s.dtype), abstract_params(config)
    )
    return str(save_export(tmp_path_factory.mktemp("sample") / "export", config, params))


class _Stdout(io.StringIO):
    """A text stdout with a binary .buffer, as sys.stdout has."""

    def __init__(self):
        super().__init__()
        self.buffer = io.BytesIO()


def _run(monkeypatch, argv, stdin: bytes = b""):
    out = _Stdout()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stdin", type("In", (), {"buffer": io.BytesIO(stdin)})())
    code = cli.main(argv)
    return code, out.getvalue(), out.buffer.getvalue()


def test_json_is_strict_without_drafts(monkeypatch, export_dir):
    code, text, _ = _run(
        monkeypatch, ["sample", "--checkpoint", export_dir, "--prompt", "ab", "--max-bytes", "4", "--json"]
    )
    assert code == 0
    assert "NaN" not in text
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert record["counters"]["acceptance_rate"] is None  # ar drafts nothing


def test_prompt_file_takes_raw_bytes_and_stdin(monkeypatch, export_dir, tmp_path):
    raw = b"\xff\xfe\x00caf\xc3"  # not UTF-8
    path = tmp_path / "prompt.bin"
    path.write_bytes(raw)
    argv = ["sample", "--checkpoint", export_dir, "--max-bytes", "3"]
    code, _, out = _run(monkeypatch, [*argv, "--prompt-file", str(path), "--prompt-file", "-"], stdin=b"xyz")
    assert code == 0
    lines = out.split(b"\n")
    assert lines[0].startswith(raw)  # the prompt comes back byte for byte, then the generation
    assert out.count(b"\n") == 2 and b"xyz" in out


def test_errors_name_flags_that_exist(monkeypatch, export_dir, tmp_path, capsys):
    base = ["sample", "--checkpoint", export_dir]
    with pytest.raises(SystemExit) as e:
        cli.main(base)
    assert e.value.code == 2 and "--prompt-file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*base, "--prompt", "x" * 100, "--buffer-bytes", "64"])
    assert "--buffer-bytes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*base, "--prompt", "x" * 2000])  # longer than the tiny model's max_bytes (1024)
    assert "model.max_bytes=1024" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*base, "--prompt-file", str(tmp_path / "missing.txt")])
    assert "--prompt-file" in capsys.readouterr().err


def test_compilation_cache_flag_keeps_the_program_there(monkeypatch, export_dir, tmp_path):
    from jax.experimental.compilation_cache.compilation_cache import reset_cache

    before = jax.config.jax_compilation_cache_dir
    enabled = jax.config.jax_enable_compilation_cache
    min_secs = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_enable_compilation_cache", True)  # whatever the suite runs with
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # and however fast it compiles
    cache = tmp_path / "programs"
    try:
        argv = ["sample", "--checkpoint", export_dir, "--prompt", "ab", "--max-bytes", "3"]
        # A buffer no other test uses: the program is compiled (and cached) by this call.
        code, _, _ = _run(monkeypatch, argv + ["--buffer-bytes", "200", "--compilation-cache", str(cache)])
        assert code == 0 and any(cache.iterdir()), "no compiled program was written to the cache"
        jax.config.update("jax_compilation_cache_dir", before)
        # The same program, found compiled in this process: the flag is read before any compile
        # (fastblt.sampler.api.prepare), so a second program (~15 CPU-s) would check nothing more.
        code, _, _ = _run(monkeypatch, argv + ["--buffer-bytes", "200", "--no-compilation-cache"])
        assert code == 0 and jax.config.jax_compilation_cache_dir == before
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        jax.config.update("jax_enable_compilation_cache", enabled)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
        reset_cache()  # the open cache follows the restored directory


def test_a_malformed_corpus_is_one_line_and_debug_shows_the_traceback(monkeypatch, tmp_path, capsys):
    """A bad JSONL line found when the pipeline reads it (in a grain worker) is an input error."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "fine"}\n{"other": "no text key"}\n')
    argv = ["config", "--config", "tiny", "--set", "data.source='jsonl'", "--set", f"data.paths='{corpus}'"]
    assert cli.main(argv) == 0  # the config is valid: the content is read by the pipeline
    from fastblt.data.pipeline import make_train_iterator
    from fastblt.errors import DataError

    with pytest.raises(DataError, match="no key 'text'"):
        it = make_train_iterator({"source": "jsonl", "paths": str(corpus), "seq_len": 8, "batch_size": 2,
                                  "eval_fraction": 0.0, "worker_count": 1})  # fmt: skip
        for _ in range(3):
            next(it)

    def bad(_args):
        raise DataError(f"{corpus}:2: no key 'text' (data.jsonl_field)")

    monkeypatch.setattr(config_command, "_run_config", bad)  # the handler `fastblt config` runs
    parser_args = ["config", "--config", "tiny"]
    with pytest.raises(SystemExit) as e:
        cli.main(parser_args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("fastblt: error: ") and "Traceback" not in err
    with pytest.raises(DataError):
        cli.main(["--debug", *parser_args])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(DataError):
        cli.main(parser_args)


def test_exact_flag_gives_blt_s_the_ar_output_and_checks_its_width(monkeypatch, export_dir, capsys):
    base = ["sample", "--checkpoint", export_dir, "--prompt", "abc", "--max-bytes", "12", "--exact"]
    texts = {}
    for method in ("ar", "blt_s"):
        code, _, out = _run(monkeypatch, [*base, "--method", method, "--draft", "3", "--exact-width", "4"])
        assert code == 0
        texts[method] = out
    assert texts["blt_s"] == texts["ar"] and len(texts["ar"]) > len(b"abc\n")
    with pytest.raises(SystemExit):
        cli.main([*base, "--method", "blt_s", "--draft", "3", "--exact-width", "3"])
    assert "--exact-width 3 must be an int >= 4" in capsys.readouterr().err


def test_attention_impl_flag_overrides_the_checkpoints(monkeypatch, tmp_path):
    """A checkpoint saved with "xla" (the default before "auto") keeps it unless --attention-impl says
    otherwise; the model config that reaches generate() is the witness."""
    import fastblt.sampler as sampler

    config = model_config(load_config("tiny:patching=static")).replace(attention_impl="xla")
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(config))
    export = str(save_export(tmp_path / "export", config, params))
    seen = []

    def fake_generate(params, config, prompts, **kwargs):
        seen.append(config.attention_impl)
        raise ValueError("stop here")

    monkeypatch.setattr(sampler, "generate", fake_generate)
    argv = ["sample", "--checkpoint", export, "--prompt", "ab"]
    for extra in ([], ["--attention-impl", "auto"]):
        with pytest.raises(SystemExit):  # the stand-in's error, as a usage error
            _run(monkeypatch, argv + extra)
    assert seen == ["xla", "auto"]
