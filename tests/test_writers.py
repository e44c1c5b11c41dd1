"""One rule for every writer of a run or results folder (infra/run_folder.py), checked on each writer:
train_ae.py, train_prior.py, experiments/train_scorer.py, experiments/train_prompted.py and eval.py --out.

- a folder that holds a run is refused (message: the folder, --resume where it exists, --overwrite) and left
  byte for byte; --resume / --overwrite are accepted;
- a second writer on a folder whose lock another process holds is refused at once;
- --overwrite stages: a run that fails mid-way leaves the old one intact, byte for byte, and no staging folder;
- a symlink, FIFO or file where the output folder goes is refused before any work, and left as it was;
- files and folders get the user's umask, not mkstemp's / mkdtemp's 0600 / 0700.
"""

import json
import os
from pathlib import Path

import pytest

import eval as E
import train_ae
import train_prior
from dataprep import data
from dataprep import prompts as P
from experiments import train_prompted
from experiments import train_scorer
from infra import atomic
from infra import run_folder as RF
from unwritable import UNWRITABLE, make_unwritable

SEQ_LEN = 32


def _programs(count=24):
    names = ["add", "sub", "mul", "div", "mod", "neg", "inc", "dec"]
    return [f'def {names[i % 8]}_{i}(x, y):\n    """Combine x and y by {i}."""\n    return x + y * {i + 2}'
            for i in range(count)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A data cache, a one-step AE run (train_ae.py) on it and prompt/answer pairs: every writer's inputs."""
    root = tmp_path_factory.mktemp("writers")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "path": f"m{i}.py"}) + "\n" for i, t in enumerate(_programs())))
    data.build_dataset(root / "data", corpus, seq_len=SEQ_LEN, vocab_size=300, overlong="drop", val_fraction=0.2)
    train_ae.train(train_ae.parse_args(_ae_argv(root, root / "ae")))
    pairs = [P.Pair(f"m{i}.py", t.split("\n    return")[0], "    return" + t.split("\n    return")[1])
             for i, t in enumerate(_programs())]
    P.write_pairs(root / "pairs", {"train": pairs[:16], "val": pairs[16:], "test": []})
    return root


def _ae_argv(root, out, *extra):
    return ["--data", str(root / "data"), "--seq-len", str(SEQ_LEN), "--out-dir", str(out), "--num-registers", "4",
            "--global-batch-size", "4", "--micro-batch-size", "4", "--warmup-steps", "1", "--eval-interval", "0",
            "--max-steps", "1", "--threads", "1", *extra]


def _run_ae(root, out, *extra):
    return train_ae.train(train_ae.parse_args(_ae_argv(root, out, *extra)))


def _run_prior(root, out, *extra):
    return train_prior.main(["--ae", str(root / "ae"), "--out-dir", str(out), "--max-steps", "1",
                             "--global-batch-size", "4", "--depth", "1", "--num-registers", "4", "--eval-interval", "0",
                             "--val-examples", "2", "--quiet", "--threads", "1", *extra])


def _run_scorer(root, out, *extra):
    return train_scorer.main(["--data", str(root / "data"), "--out", str(out), "--steps", "1", "--batch-size", "4",
                              "--device", "cpu", "--threads", "1", *extra])


def _run_prompted(root, out, *extra):
    return train_prompted.main(["--ae", str(root / "ae"), "--pairs", str(root / "pairs"), "--out-dir", str(out),
                                "--seq-len", "64", "--num-registers", "4", "--steps", "1", "--batch-size", "4",
                                "--log-interval", "1000", *extra])


def _run_eval(root, out, *extra):
    return E.main(["marginal-trap", "--trap-pairs", "2", "--trap-choices", "2", "--trap-steps", "2",
                   "--trap-samples", "4", "--trap-prior-steps", "2", "--bootstrap", "0", "--device", "cpu",
                   "--threads", "1", "--out", str(out), *extra])


def _failing_eval(monkeypatch):
    title, _ = E.EXPERIMENTS["marginal-trap"]

    def broken(ctx):
        raise RuntimeError("simulated failure mid-run")
    monkeypatch.setitem(E.EXPERIMENTS, "marginal-trap", (title, broken))


def _patch(module, name):
    """A monkeypatch step: module.name raises (a failure at that point of the run)."""
    def apply(monkeypatch):
        def broken(*args, **kwargs):
            raise RuntimeError("simulated failure mid-run")
        monkeypatch.setattr(module, name, broken)
    return apply


# run(root, out, *flags); product: a file of a finished run, compared byte for byte; resumable: has --resume;
# fail: makes the run fail mid-way (after the folder is claimed); work: makes the first piece of work fail
WRITERS = {
    "train_ae": dict(run=_run_ae, product="checkpoint/demasker/model.safetensors", resumable=True,
                     fail=_patch(train_ae, "training_loss"), work=_patch(train_ae, "prepare_data")),
    "train_prior": dict(run=_run_prior, product="dit/model.safetensors", resumable=True,
                        fail=_patch(train_prior, "prior_loss"), work=_patch(train_prior, "load_banks")),
    "train_scorer": dict(run=_run_scorer, product="model.safetensors", resumable=False,
                         fail=_patch(train_scorer, "lm_loss"), work=_patch(data, "load_split")),
    "train_prompted": dict(run=_run_prompted, product="dit/model.safetensors", resumable=True,
                           fail=_patch(train_prompted, "prior_step"), work=_patch(train_prompted, "load_ae")),
    "eval": dict(run=_run_eval, product="marginal-trap.json", resumable=False, fail=_failing_eval,
                 work=_patch(E, "Context")),
}
WRITER_NAMES = sorted(WRITERS)


def _tree(folder):
    """{relative path: bytes} of every file under folder (hidden ones too)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _lock_path(name, out):
    return out / ".marginal-trap.lock" if name == "eval" else RF.lock_file(out)


def _hidden(folder):
    """Hidden entries of `folder` other than lock files (staging folders, temporary files)."""
    return [p.name for p in Path(folder).iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]


@pytest.mark.parametrize("name", WRITER_NAMES)
def test_an_existing_run_is_refused_then_resumed_or_overwritten(inputs, tmp_path, name):
    w = WRITERS[name]
    out = tmp_path / "out"
    w["run"](inputs, out)
    before = _tree(out)
    modes = {p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")] if p.is_dir()}, \
        {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert modes == ({atomic.DIR_MODE}, {atomic.FILE_MODE})  # the user's umask, not mkdtemp's / mkstemp's
    with pytest.raises(FileExistsError) as refused:
        w["run"](inputs, out, "--seed", "1")
    message = str(refused.value)
    assert str(out) in message and "--overwrite" in message and ("--resume" in message) == w["resumable"]
    assert _tree(out) == before  # nothing touched
    if w["resumable"]:
        w["run"](inputs, out, "--resume", "--max-steps", "2")
        assert (out / w["product"]).read_bytes() != before[w["product"]]  # one more step
        with pytest.raises(SystemExit):  # both: exit 2 from the parser
            w["run"](inputs, out, "--resume", "--overwrite")
    w["run"](inputs, out, "--seed", "1", "--overwrite")
    assert (out / w["product"]).is_file()
    if name != "eval":  # eval.py's other results stay; a trainer's folder holds the new run alone
        assert (out / w["product"]).read_bytes() != before[w["product"]]
    assert not RF.staging_folder(out).exists() and not _hidden(tmp_path)


@pytest.mark.parametrize("name", [n for n in WRITER_NAMES if n != "eval"])
def test_a_folder_holding_anything_is_refused(inputs, tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        WRITERS[name]["run"](inputs, out)
    assert _tree(out) == {"notes.txt": b"mine"}


def test_eval_shares_its_out_with_other_subcommands(inputs, tmp_path):
    """Other subcommands' results in --out are fine, REPORT.md is appended to; only NAME.json is refused."""
    out = tmp_path / "results"
    out.mkdir()
    (out / "fig4.json").write_text("{}")
    (out / "REPORT.md").write_text("## fig4: earlier\n")
    _run_eval(inputs, out)
    assert (out / "fig4.json").read_text() == "{}" and (out / "marginal-trap.json").is_file()
    report = (out / "REPORT.md").read_text()
    assert report.startswith("## fig4: earlier\n") and "## marginal-trap:" in report
    (out / "marginal-trap.json").unlink()  # reproduce.sh reruns only what is missing
    _run_eval(inputs, out)
    assert (out / "marginal-trap.json").is_file() and (out / "REPORT.md").read_text().count("## marginal-trap:") == 2


@pytest.mark.parametrize("name", WRITER_NAMES)
def test_a_second_writer_is_refused_at_once(inputs, tmp_path, monkeypatch, name):
    w = WRITERS[name]
    out = tmp_path / "out"
    out.mkdir()
    w["work"](monkeypatch)  # the refusal must come before any work
    with atomic.exclusive(_lock_path(name, out), wait=False):  # another process's lock (flock: per open file)
        with pytest.raises(BlockingIOError) as refused:
            w["run"](inputs, out)
    assert str(out) in str(refused.value) and "another process" in str(refused.value)
    assert [p.name for p in out.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize("name", WRITER_NAMES)
def test_a_failed_overwrite_leaves_the_old_run_byte_for_byte(inputs, tmp_path, monkeypatch, name):
    w = WRITERS[name]
    out = tmp_path / "out"
    w["run"](inputs, out)
    before = _tree(out)
    w["fail"](monkeypatch)
    with pytest.raises(RuntimeError, match="simulated failure"):
        w["run"](inputs, out, "--seed", "1", "--overwrite")
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["out"]  # no staging left


def test_a_killed_overwrite_leaves_the_old_run_and_the_next_one_cleans_up(inputs, tmp_path):
    """A kill leaves the staging folder (nothing can remove it); the old run is at its path, untouched, and the
    next --overwrite starts by removing the stale staging folder."""
    out = tmp_path / "out"
    _run_ae(inputs, out)
    before = _tree(out)
    stale = RF.staging_folder(out)
    stale.mkdir()
    (stale / "half-written").write_text("x")
    _run_ae(inputs, out, "--seed", "1", "--overwrite")
    assert not stale.exists() and _tree(out) != before and not (out / "half-written").exists()


@pytest.mark.parametrize("kind", ["symlink", "fifo", "file"])
@pytest.mark.parametrize("name", WRITER_NAMES)
def test_a_symlink_fifo_or_file_is_refused_before_any_work(inputs, tmp_path, monkeypatch, capsys, name, kind):
    w = WRITERS[name]
    out, target = tmp_path / "out", tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious").write_text("keep")
    {"symlink": lambda: out.symlink_to(target), "fifo": lambda: os.mkfifo(out),
     "file": lambda: out.write_text("a file")}[kind]()
    w["work"](monkeypatch)
    with pytest.raises((NotADirectoryError, SystemExit)) as refused:  # eval.py: its parser's exit 2
        w["run"](inputs, out)
    message = str(refused.value) + capsys.readouterr().err
    assert str(out) in message and {"symlink": "a symlink", "fifo": "a FIFO", "file": "a regular file"}[kind] in message
    assert "another path" in message or "points to" in message  # the fix
    assert out.is_symlink() == (kind == "symlink") and (out.is_fifo() if kind == "fifo" else True)
    assert _tree(target) == {"precious": b"keep"} and sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]


@pytest.mark.parametrize("case", [*UNWRITABLE, "parent not writable"])
@pytest.mark.parametrize("name", WRITER_NAMES)
def test_a_location_that_cannot_be_written_is_refused_before_any_work(inputs, tmp_path, monkeypatch, capsys, name,
                                                                      case):
    """A file where a parent folder must be, a folder that is not writable (os.access: a read-only mount, another
    user's folder; stood in for here, as root writes anywhere) or a full disk: refused before any work, naming the
    path and the fix, where it used to fail with a raw OSError at the first save or after the whole run."""
    w = WRITERS[name]
    out = tmp_path / "runs" / "out"
    (tmp_path / "runs").mkdir()
    if case == "parent not writable":  # the run folder is there and writable, its parent (the lock and
        if name == "eval":              # --overwrite's staging go there) is not
            pytest.skip("eval.py's lock sits inside --out")
        out.mkdir()
        monkeypatch.setattr(RF, "_writable", lambda folder: Path(folder) != out.parent)
        phrase = f"{out.parent} is not writable"
    else:
        if case == "under a file":
            out = tmp_path / "runs" / "a_file" / "out"
        phrase = make_unwritable(case, out.parent, monkeypatch)
    w["work"](monkeypatch)  # the refusal must come before any work
    with pytest.raises((OSError, SystemExit)) as refused:
        w["run"](inputs, out)
    message = str(refused.value) + capsys.readouterr().err
    assert str(out) in message and "nothing was written" in message
    assert "a writable folder with free space" in message
    assert phrase in message
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == (["out"] if case == "parent not writable" else
                                                                    ["a_file"] if case == "under a file" else [])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder: chmod does not bite")
@pytest.mark.parametrize("name", WRITER_NAMES)
def test_a_read_only_folder_is_refused_before_any_work(inputs, tmp_path, monkeypatch, name):
    w = WRITERS[name]
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    w["work"](monkeypatch)
    try:
        with pytest.raises((PermissionError, SystemExit), match=r"cannot be written: .*out is not writable"):
            w["run"](inputs, out)
    finally:
        out.chmod(0o755)
    assert list(out.iterdir()) == []


def test_eval_refuses_a_result_file_that_is_not_a_file(inputs, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    os.mkfifo(out / "REPORT.md")  # appending to it would block forever, after the work
    with pytest.raises(NotADirectoryError, match="REPORT.md.*a FIFO"):
        _run_eval(inputs, out)


def test_a_refused_run_leaves_no_folder_it_created(inputs, tmp_path, monkeypatch):
    _patch(train_ae, "prepare_data")(monkeypatch)
    with pytest.raises(RuntimeError):
        _run_ae(inputs, tmp_path / "a" / "out")
    assert not (tmp_path / "a" / "out").exists()
    with pytest.raises(FileNotFoundError, match="--resume"):
        _run_ae(inputs, tmp_path / "b", "--resume")
    assert not (tmp_path / "b").exists()


def test_files_and_folders_get_the_users_umask(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    assert atomic.UMASK == mask
    written = atomic.write_text(tmp_path / "f.json", "{}")
    plain = tmp_path / "plain"
    plain.write_text("")
    assert written.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~mask
    temporary = atomic.temporary_path(tmp_path / "g.png")
    assert temporary.stat().st_mode & 0o777 == 0o666 & ~mask
    with RF.claim(tmp_path / "run" / "deep") as folder:
        (folder / "x").write_text("")
    assert (tmp_path / "run" / "deep").stat().st_mode & 0o777 == 0o777 & ~mask
    with RF.claim(tmp_path / "run" / "deep", overwrite=True) as folder:
        assert folder == RF.staging_folder(tmp_path / "run" / "deep")
        (folder / "y").write_text("")
    assert (tmp_path / "run" / "deep").stat().st_mode & 0o777 == 0o777 & ~mask
    assert sorted(p.name for p in (tmp_path / "run" / "deep").iterdir()) == ["y"]


def test_ranks_other_than_0_neither_check_nor_lock(tmp_path, monkeypatch):
    """Under torchrun rank 0 claims; the others write where it says (the staging folder with --overwrite)."""
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("")
    with atomic.exclusive(RF.lock_file(out), wait=False):
        with RF.claim(out) as folder:
            assert folder == out
        with RF.claim(out, overwrite=True) as folder:
            assert folder == RF.staging_folder(out)


def test_a_second_trainer_process_is_refused_from_the_command_line(inputs, tmp_path):
    """The case as a user meets it: another process holds the folder; the CLI stops at once, non-zero, naming it."""
    import subprocess
    import sys
    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[1]
    with atomic.exclusive(RF.lock_file(out), wait=False):
        done = subprocess.run([sys.executable, "train_ae.py", *_ae_argv(inputs, out)], cwd=root, capture_output=True,
                              text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode != 0 and "another process holds its lock" in done.stderr and str(out) in done.stderr
    assert not out.exists()
