"""Hand-edited and mismatched inputs are refused with a message naming the file (the line, for JSONL) and the fix,
never a raw traceback, and nothing is written or lost (docs/failures.md):

- sample.py --prompt-file that is not UTF-8 or is a folder; a UTF-8 byte order mark is dropped;
- a JSONL corpus line whose fields have the wrong type (dataprep/corpus.py): skipped, counted and named;
- a run folder edited before --resume: args.json (config/ae_args.py, infra/guards.read_run_record),
  checkpoint/*/config.json (training/ae_setup.resumed_part), progress.json, log.jsonl (training/runs.RunLog);
- provenance at sampling: a prior record without the encoder fingerprint, a prior of another tokenizer layout,
  a run whose tokenizer.json is not its demasker's (config/sample_args.check_priors, training/runs.load_run).

Every run is the tiny one of tests/test_train_ae.py (L = 32, two steps), trained once for the module.
"""

import json
import shutil
from pathlib import Path

import pytest

import sample as S
import train_ae as T
from config import sample_args as SA
from dataprep import corpus, data
from infra import checkpoint as C
from infra import guards
from training.runs import RunLog

SEQ_LEN = 32


def _programs(count=11):
    return [f"def f{i}(x, y):\n    return x * {i + 2} + y" for i in range(count)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A data cache and a two-step train_ae.py run on it."""
    root = tmp_path_factory.mktemp("bad_input")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t, "path": f"p{i}.py"}) + "\n"
                                               for i, t in enumerate(_programs())))
    data.build_dataset(root / "data", root / "corpus.jsonl", seq_len=SEQ_LEN, vocab_size=300, overlong="drop")
    T.train(T.parse_args(_argv(root, root / "ae", "--max-steps", "2")))
    return root


def _argv(root, out, *extra):
    return ["--data", str(root / "data"), "--seq-len", str(SEQ_LEN), "--out-dir", str(out), "--num-registers", "4",
            "--global-batch-size", "4", "--micro-batch-size", "4", "--warmup-steps", "1", "--eval-interval", "0",
            "--threads", "1", *extra]


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _edited_copy(run, tmp_path, name, edit):
    """A copy of the run with OUT/`name` rewritten by edit(text) -> text; returns (folder, its tree)."""
    out = tmp_path / "ae"
    shutil.copytree(run / "ae", out)
    path = out / name
    path.write_text(edit(path.read_text()))
    return out, _tree(out)


# ------------------------------------------------------------------------------------------------
# sample.py --prompt-file
# ------------------------------------------------------------------------------------------------

def test_a_prompt_file_that_is_not_utf8_or_a_folder_is_named(tmp_path, capsys):
    latin = tmp_path / "latin.txt"
    latin.write_bytes('def f(x):\n    """caf\xe9"""\n'.encode("latin-1"))
    for path, text in ((latin, "latin.txt is not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"),
                       (tmp_path, "is a folder; pass a text file")):
        with pytest.raises(SystemExit):
            SA.parse_args(["--ckpt", str(tmp_path), "--prompt-file", str(path)])
        assert text in capsys.readouterr().err
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b'\xef\xbb\xbfdef f(x):\n    """Doc."""')
    assert SA.parse_args(["--ckpt", str(tmp_path), "--prompt-file", str(bom)]).prompt == 'def f(x):\n    """Doc."""'


# ------------------------------------------------------------------------------------------------
# A JSONL corpus with lines that give no program
# ------------------------------------------------------------------------------------------------

def test_corpus_lines_with_wrong_fields_are_skipped_and_named(tmp_path, capsys):
    lines = [json.dumps({"text": "def a():\n    return 1", "path": "a.py"}), json.dumps({"text": "x = 1", "path": 5}),
             json.dumps(["not", "an", "object"]), json.dumps({"text": 3}), "{broken",
             json.dumps({"text": "def b():\n    return 2", "path": None})]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    programs, stats = corpus.collect_programs(path)
    assert stats["skipped_unparsable"] == 5 and stats["programs"] == 1
    warning = capsys.readouterr().err
    assert str(path) in warning and "5 line(s)" in warning
    for number, why in ((2, '"path" is not a string'), (3, "a JSON list, not an object"), (4, '"text" is not a string'),
                        (5, "not JSON")):
        assert f"line {number}: {why}" in warning
    assert "fix or remove them" in warning


# ------------------------------------------------------------------------------------------------
# A run folder edited before --resume
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, text", [
    (lambda s: s[:-10], "is not readable JSON"),
    (lambda s: "[1, 2]", "holds a JSON list, not the object of flags"),
    (lambda s: s.replace('"num_registers": 4', '"num_registers": 4.5'), '"num_registers" is 4.5, but --num-registers '
                                                                       'takes an integer'),
    (lambda s: s.replace('"seq_len": 32', '"seq_len": "abc"'), '"seq_len" is \'abc\', but --seq-len does not take'),
    (lambda s: s.replace('"preset": "tiny"', '"preset": "huge"'), "--preset takes one of paper, tiny"),
    (lambda s: s.replace('"nested_dropout": true', '"nested_dropout": "yes"'), "--nested-dropout is a switch"),
    (lambda s: s.replace('"data": "', '"data": 5, "was": "'), '"data" is 5, but --data takes a text'),
])
def test_an_edited_args_json_is_refused_naming_it(run, tmp_path, capsys, edit, text):
    out, before = _edited_copy(run, tmp_path, "checkpoint/args.json", edit)
    with pytest.raises(SystemExit):
        T.parse_args(["--out-dir", str(out), "--resume", "--max-steps", "3"])
    message = capsys.readouterr().err
    assert str(out / "checkpoint" / "args.json") in message and text in message
    assert "restore it" in message and "another --out-dir" in message
    assert _tree(out) == before


def test_record_values_are_checked_against_their_flags():
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int)
    p.add_argument("--rate", type=float)
    p.add_argument("--mode", choices=["a", "b"])
    p.add_argument("--flag", action="store_true")
    p.add_argument("--many", type=int, nargs="+")
    actions = {a.dest: a for a in p._actions}
    assert guards.record_problem(actions["n"], 3) is None and guards.record_problem(actions["n"], "3") is None
    assert guards.record_problem(actions["n"], True) == "takes an integer"
    assert guards.record_problem(actions["rate"], 1) is None and guards.record_problem(actions["rate"], "x")
    assert guards.record_problem(actions["mode"], "c") == "takes one of a, b"
    assert guards.record_problem(actions["flag"], 1) == "is a switch (true or false)"
    assert guards.record_problem(actions["many"], 2) == "takes a list"
    assert guards.record_problem(actions["many"], [1, 2.5]) == "takes an integer"


def test_an_integer_flag_refuses_a_fraction(capsys):
    import argparse
    p = argparse.ArgumentParser()
    with pytest.raises(SystemExit):
        guards.check_range(p, argparse.Namespace(k=4.5), "k", low=1, integer=True)
    assert "--k must be an integer >= 1, got 4.5" in capsys.readouterr().err
    guards.check_range(p, argparse.Namespace(k=4), "k", low=1, integer=True)


@pytest.mark.parametrize("part, edit, text", [
    ("demasker", lambda s: '{"crocodil_model": "demasker"}', "does not describe the weights beside it"),  # LLaDA-8B
    ("demasker", lambda s: s.replace('"d_model": 64', '"d_model": 32'), "wrong shape"),
    ("demasker", lambda s: s.replace('"d_model": 64', '"d_modl": 64'), "unknown DemaskerConfig fields ['d_modl']"),
    ("encoder", lambda s: s.replace('"crocodil_model": "encoder"', '"crocodil_model": "demasker"'),
     "names crocodil_model='demasker', not 'encoder'"),
    ("encoder", lambda s: "[]", "holds a list, not a JSON object"),
], ids=["llada_8b_defaults", "width", "unknown_field", "another_kind", "a_list"])
def test_an_edited_config_json_is_refused_before_anything_is_allocated(run, tmp_path, part, edit, text):
    """A config.json edited to LLaDA-8B's defaults used to build the 8B model on the CPU (killed by the kernel)."""
    out, before = _edited_copy(run, tmp_path, f"checkpoint/{part}/config.json", edit)
    with pytest.raises(C.CheckpointError) as refused:
        T.train(T.parse_args(_argv(run, out, "--resume", "--max-steps", "3")))
    assert str(out / "checkpoint" / part / "config.json") in str(refused.value) and text in str(refused.value)
    assert "restore it" in str(refused.value)
    assert _tree(out) == before


@pytest.mark.parametrize("edit, text", [
    (lambda s: s[:-3], "is not readable JSON"),
    (lambda s: "{}", 'holds no step count ("step": a whole number >= 0; got None)'),
    (lambda s: s.replace('"step": 2', '"step": 1'), 'says step 1, but the checkpoint\'s training state was saved at '
                                                    'step 2: the file was edited; write "step": 2 back'),
])
def test_an_edited_progress_json_is_refused_naming_it(run, tmp_path, edit, text):
    out, before = _edited_copy(run, tmp_path, "checkpoint/progress.json", edit)
    with pytest.raises(ValueError) as refused:
        T.train(T.parse_args(_argv(run, out, "--resume", "--max-steps", "3")))
    assert str(out / "checkpoint" / "progress.json") in str(refused.value) and text in str(refused.value)
    assert _tree(out) == before


def test_a_torn_last_log_line_is_dropped_and_a_damaged_one_named(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"type": "tra')  # killed while appending
    RunLog(log).truncate(2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    log.write_text('{"step": 1}\n{"step": oops}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"log.jsonl line 2 is not a log record .*delete or repair that line"):
        RunLog(log).truncate(2)
    assert log.read_text() == '{"step": 1}\n{"step": oops}\n{"step": 3}\n'  # left as it was


# ------------------------------------------------------------------------------------------------
# Provenance at sampling
# ------------------------------------------------------------------------------------------------

def _prior_record(folder, **settings):
    folder.mkdir()
    (folder / "prior.json").write_text(json.dumps({"ae": "somewhere", "num_registers": 4, "shared_tokenizer": True,
                                                   **settings}))
    return folder


def _sample(run, tmp_path, *extra):
    S.main(["--ckpt", str(run / "ae"), "--method", "conthendisc", "--length", "16", "--steps", "2", "--num", "1",
            "--prior-steps", "2", "--quiet", "--out", str(tmp_path / "s.jsonl"), *extra])


def test_a_prior_record_without_the_encoder_fingerprint_is_refused(run, tmp_path):
    prior = _prior_record(tmp_path / "prior")
    with pytest.raises(SystemExit) as refused:
        _sample(run, tmp_path, "--prior", str(prior))
    message = str(refused.value)
    assert str(prior / "prior.json") in message and "records no encoder_fingerprint" in message
    assert f"train_prior.py --ae {run / 'ae'}" in message and not (tmp_path / "s.jsonl").exists()


def test_a_prior_of_another_tokenizer_layout_is_refused(run, tmp_path):
    prior = _prior_record(tmp_path / "prior", encoder_fingerprint="0" * 64, shared_tokenizer=False)
    with pytest.raises(SystemExit) as refused:
        _sample(run, tmp_path, "--prior", str(prior))
    message = str(refused.value)
    assert "an encoder with its own tokenizer" in message and "one tokenizer shared by encoder and demasker" in message
    assert str(prior / "prior.json") in message and "train_prior.py --ae" in message


def test_a_tokenizer_that_is_not_the_demaskers_is_refused(run, tmp_path):
    import random
    random.seed(0)
    words = ["".join(random.choice("abcdefghijklmnop") for _ in range(6)) for _ in range(2000)]
    other = data.train_tokenizer([" ".join(words[i:i + 40]) for i in range(0, 2000, 40)], vocab_size=400)
    assert other.vocab_size > 300
    ae = tmp_path / "ae"
    shutil.copytree(run / "ae", ae)
    other.save(ae / "checkpoint" / "tokenizer.json")
    with pytest.raises(ValueError) as refused:
        S.main(["--ckpt", str(ae), "--length", "16", "--num", "1", "--quiet", "--out", str(tmp_path / "s.jsonl")])
    message = str(refused.value)
    assert str(ae / "checkpoint" / "tokenizer.json") in message and "is not the tokenizer the demasker" in message
    assert "vocabulary 400 vs" in message and "copy back the tokenizer.json" in message
    assert not (tmp_path / "s.jsonl").exists()
