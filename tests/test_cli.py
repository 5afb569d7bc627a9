"""The command line `python -m refimpl {run,init,info}`, run as subprocesses."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import refimpl
from refimpl.io.checkpoint import DEFAULT_MODEL_DIR, load_model
from refimpl.config import parameter_count, preset


def cli(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "REFIMPL_DEBUG"}
    return subprocess.run([sys.executable, "-m", "refimpl", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "tiny"
    result = cli("init", "--preset", "tiny-moge", "--out", d, "--seed", "7", "--dtype", "fp32",
                 "--max-shard-bytes", "200000")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {d}: ") and "shards + index" in result.stdout
    return d


@pytest.mark.parametrize("command", [[], ["run"], ["init"], ["info"]])
def test_help(command):
    result = cli(*command, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: ")
    for name in ("run", "init", "info"):
        if not command:
            assert name in result.stdout


def test_init_writes_the_seeded_model(tiny_dir):
    model = load_model(tiny_dir)
    ref = refimpl.init_model("tiny-moge", seed=7)
    ids = np.array([1, 2, 3, 4])
    np.testing.assert_array_equal(model.forward(ids), ref.forward(ids))


def test_init_with_layers_and_bf16(tmp_path):
    result = cli("init", "--preset", "tiny-dense", "--out", tmp_path / "b", "--layers", "2")
    assert result.returncode == 0, result.stderr
    assert "model.safetensors" in result.stdout and "bfloat16" in result.stdout
    model = load_model(tmp_path / "b", numerics="bf16")
    ref = refimpl.init_model("tiny-dense", seed=0, numerics="bf16", num_hidden_layers=2)
    np.testing.assert_array_equal(model.forward([1, 9]), ref.forward([1, 9]))


def test_run_prints_the_generated_ids_and_figures(tiny_dir):
    result = cli("run", "--model", tiny_dir, "--token-ids", "1,2,3", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    expected = list(refimpl.generate(refimpl.init_model("tiny-moge", seed=7), [1, 2, 3],
                                     max_new_tokens=5))
    assert result.stdout.split() == [str(t) for t in expected]
    figures = result.stderr.strip().splitlines()[-1]
    assert f"prompt tokens 3 | new tokens {len(expected)}" in figures
    assert "prefill" in figures and "tokens/s" in figures


def test_run_a_preset_with_sampling_is_seeded():
    args = ("run", "--model", "tiny-dense", "--token-ids", "1, 5", "--max-new-tokens", "6",
            "--temperature", "0.9", "--top-k", "50", "--top-p", "0.9", "--seed", "3",
            "--numerics", "bf16")
    first, second = cli(*args), cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    model = refimpl.init_model("tiny-dense", seed=0, numerics="bf16")
    expected = list(refimpl.generate(model, [1, 5], max_new_tokens=6, temperature=0.9,
                                     top_k=50, top_p=0.9, seed=3))
    assert first.stdout.split() == [str(t) for t in expected]


def test_run_without_a_tokenizer_starts_from_bos(tiny_dir):
    result = cli("run", "--model", tiny_dir, "--max-new-tokens", "2", "--layers", "2",
                 "--lazy", "--numerics", "fp16")
    assert result.returncode == 0, result.stderr
    assert "prompt tokens 1 | new tokens 2" in result.stderr


def test_info_of_a_checkpoint_and_of_presets(tiny_dir):
    result = cli("info", "--model", tiny_dir)
    assert result.returncode == 0, result.stderr
    config = preset("tiny-moge")
    assert f"parameters: {parameter_count(config):,}" in result.stdout
    assert f"active parameters per token: {parameter_count(config, active=True):,}" \
        in result.stdout
    assert "stored: " in result.stdout and "KV cache" in result.stdout
    result = cli("info", "--model", "pro-moe-72b", "--json")
    info = json.loads(result.stdout)
    assert info["parameters"] == parameter_count(preset("pro-moe-72b"))
    assert 16e9 < info["active_parameters_per_token"] < 17e9  # "72B-A16B"
    assert info["memory"]["bf16"]["weights_bytes"] == 2 * info["parameters"]
    # 2 (k, v) x 48 layers x 8 KV heads x 128 x 1000 tokens x 2 bytes
    assert info["memory"]["bf16"]["kv_cache_bytes_per_1000_tokens"] == 2 * 48 * 8 * 128 * 2000
    result = cli("info", "--model", "embedded-1b", "--layers", "2")
    line = next(x for x in result.stdout.splitlines() if x.split()[0] == "num_hidden_layers")
    assert line.split()[1] == "2"
    assert "active parameters" not in result.stdout  # dense: all parameters are active


@pytest.mark.parametrize("args, fragments", [
    (["run", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["run", "--model", "tiny-dense", "--numerics", "fp8"], ["invalid choice: 'fp8'"]),
    (["run", "--model", "tiny-dense", "--max-new-tokens", "many"], ["invalid int value"]),
    (["run", "--model", "tiny-dense", "--token-ids", "1,x"], ["--token-ids"]),
    (["run", "--model", "tiny-dense", "--token-ids", "1,300"], ["token id 300"]),
    (["run", "--model", "tiny-dense", "--prompt", "hi"], ["no tokenizer.model", "--token-ids"]),
    (["run", "--model", "tiny-dense", "--chat", "--token-ids", "1"], ["--chat"]),
    (["run", "--model", "tiny-dense", "--top-p", "1.5"], ["--top-p"]),
    (["run", "--model", "tiny-dense", "--prompt", "a", "--token-ids", "1"], ["not allowed"]),
    (["run", "--model", "no-such-model"], ["neither a checkpoint directory nor a preset"]),
    (["init", "--out", "x"], ["--preset"]),
    (["init", "--preset", "tiny-dense", "--out", "{tmp}/a/b"], ["no such directory"]),
    (["init", "--preset", "tiny-dense", "--out", "{tmp}", "--layers", "0"], ["--layers"]),
    (["info", "--model", "{tmp}"], ["no config.json"]),
    (["nosuchcommand"], ["invalid choice"]),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, fragments):
    result = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert_one_line_error(result, *fragments)


def test_a_corrupt_checkpoint_is_one_line_and_exit_2(tmp_path):
    assert cli("init", "--preset", "tiny-dense", "--out", tmp_path / "c").returncode == 0
    path = tmp_path / "c" / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2)
    assert_one_line_error(cli("run", "--model", tmp_path / "c", "--token-ids", "1"),
                          "truncated file")
    assert_one_line_error(cli("init", "--preset", "tiny-dense", "--out", tmp_path / "c"),
                          "already exists")


def test_run_with_no_arguments_uses_the_default_model():
    from refimpl.commands.run import DEFAULT_PROMPT
    from refimpl.tokenizer import Tokenizer

    result = cli("run")
    assert result.returncode == 0, result.stderr
    tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    ids = tok.encode(DEFAULT_PROMPT)
    new = expected_new(DEFAULT_MODEL_DIR, ids, 32, tok)
    assert result.stdout.startswith(DEFAULT_PROMPT)
    assert result.stdout == tok.decode(ids[1:] + new) + "\n"
    figures = result.stderr.strip().splitlines()[-1]
    assert f"prompt tokens {len(ids)} | new tokens " in figures and "fp32, numpy" in figures


def test_run_chat_with_the_default_model_and_info():
    result = cli("run", "--chat", "--max-new-tokens", "8", "--numerics", "bf16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    info = json.loads(cli("info", "--json").stdout)
    assert info["stored"]["tokenizer"] and info["family"] == "dense"


# ---------------------------------------------------------------------- with a tokenizer
from .test_checkpoint import sp_model  # noqa: E402,F401  (a 30-piece SentencePiece model)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory, sp_model):  # noqa: F811
    """A tiny-dense model whose 32-id vocabulary covers its 30-piece tokenizer."""
    from refimpl.io.checkpoint import save_checkpoint
    from refimpl.random_init import random_weights

    config = preset("tiny-dense").replace(vocab_size=32)
    d = tmp_path_factory.mktemp("text") / "m"
    save_checkpoint(d, config, random_weights(config, 11), "fp32", tokenizer=sp_model)
    return d


def expected_new(directory, ids, n, tok):
    model = load_model(directory)
    new = list(refimpl.generate(model, ids, max_new_tokens=n, eos_id=tok.eos_id))
    return new[:-1] if new and new[-1] == tok.eos_id else new


def test_run_streams_the_prompt_and_its_continuation(text_dir):
    from refimpl.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(text_dir)
    result = cli("run", "--model", text_dir, "--prompt", "alpha beta", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    ids = tok.encode("alpha beta")
    new = expected_new(text_dir, ids, 6, tok)
    assert result.stdout == tok.decode(ids[1:] + new) + "\n"
    assert f"prompt tokens {len(ids)} |" in result.stderr.splitlines()[-1]
    ids_only = cli("run", "--model", text_dir, "--prompt", "alpha beta", "--max-new-tokens", "6",
                   "--print-ids")
    assert ids_only.stdout.split() == [str(t) for t in
                                       list(refimpl.generate(load_model(text_dir), ids, 6,
                                                             eos_id=tok.eos_id))]


def test_run_chat_prints_only_the_reply(text_dir):
    from refimpl.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(text_dir)
    result = cli("run", "--model", text_dir, "--chat", "--prompt", "gamma", "--max-new-tokens",
                 "5")
    assert result.returncode == 0, result.stderr
    ids = tok.encode_chat([{"role": "user", "content": "gamma"}])
    assert result.stdout == tok.decode(expected_new(text_dir, ids, 5, tok)) + "\n"


def test_run_a_preset_with_a_smaller_tokenizer(sp_model):  # noqa: F811
    result = cli("run", "--model", "tiny-dense", "--tokenizer", sp_model, "--prompt", "delta",
                 "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("delta")  # ids past the 30 pieces show as <id N>


@pytest.mark.parametrize("option, value", [("--temperature", "nan"), ("--temperature", "inf"),
                                           ("--temperature", "-1"), ("--top-p", "nan"),
                                           ("--top-k", "-2")])
def test_non_finite_or_negative_sampling_values_are_refused(option, value):
    result = cli("run", "--model", "tiny-dense", "--token-ids", "1,2", option, value)
    assert_one_line_error(result, option)


def test_more_new_tokens_than_positions_stops_cleanly():
    """tiny-dense has 512 positions: a 500-token prompt leaves room for 13 new tokens."""
    ids = ",".join(str(1 + i % 200) for i in range(500))
    result = cli("run", "--model", "tiny-dense", "--token-ids", ids, "--max-new-tokens", "40")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 13
    stats = result.stderr.strip().splitlines()[-1]
    assert "new tokens 13 (stopped: all 512 positions (max_position_embeddings) used; 40 " \
           "were asked for)" in stats, stats


@pytest.mark.parametrize("field, value, fragment", [
    ("max_position_embeddings", "512", "'max_position_embeddings': must be a positive integer"),
    ("tie_word_embeddings", "yes", "'tie_word_embeddings': must be true or false"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "'rope_scaling'"),
    ("sliding_window", 128, "'sliding_window'"),
])
def test_a_bad_config_json_is_one_line_and_exit_2(tmp_path, field, value, fragment):
    """A config field of the wrong type, or one that would change the math but is not
    implemented: `run` and `info` refuse the checkpoint with one line (no TypeError)."""
    assert cli("init", "--preset", "tiny-dense", "--out", tmp_path / "c").returncode == 0
    config = tmp_path / "c" / "config.json"
    d = json.loads(config.read_text())
    d[field] = value
    config.write_text(json.dumps(d))
    for command in (["run", "--model", tmp_path / "c", "--token-ids", "1,2"],
                    ["info", "--model", tmp_path / "c"]):
        assert_one_line_error(cli(*command), fragment)
