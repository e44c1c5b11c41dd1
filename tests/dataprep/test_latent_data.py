"""dataprep/latent_data.py under concurrency: two processes that want the same register bank never collide; the
second reuses what the first finished (demo.sh trains both priors side by side on one AE run)."""

import multiprocessing as mp
import time

import numpy as np

from dataprep import latent_data as LD
from infra.atomic import exclusive
from test_train_prior import run  # noqa: F401  (the tiny data cache + AE run fixture)


def _build(encoder_dir, data_dir, cache, queue):
    import torch
    torch.set_num_threads(1)
    try:
        folder = LD.build_bank(encoder_dir, data_dir, "train", 4, cache, batch_size=4, chunk_size=8, progress=False)
        queue.put(("ok", str(folder)))
    except BaseException as error:  # report, never hang the parent
        queue.put(("error", repr(error)))


def _start(run, cache, queue):  # noqa: F811
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_build, args=(str(run["ae"] / "encoder"), str(run["data"]), str(cache), queue))
    proc.start()
    return proc


def test_two_processes_build_one_bank_together(run, tmp_path):  # noqa: F811
    cache = tmp_path / "banks"
    queue = mp.get_context("spawn").Queue()
    procs = [_start(run, cache, queue) for _ in range(2)]
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert [status for status, _ in results] == ["ok", "ok"], results
    assert results[0][1] == results[1][1]
    bank = LD.RegisterBank(results[0][1])
    serial = LD.RegisterBank(LD.build_bank(run["ae"] / "encoder", run["data"], "train", 4, tmp_path / "serial",
                                           batch_size=4, chunk_size=8, progress=False))
    assert np.array_equal(np.asarray(bank.registers), np.asarray(serial.registers))
    assert not list((cache / bank.folder.name).glob("*.tmp")) and not list(cache.glob("*.tmp"))


def test_a_second_builder_waits_for_the_lock_then_reuses_the_bank(run, tmp_path):  # noqa: F811
    cache = tmp_path / "banks"
    folder = LD.build_bank(run["ae"] / "encoder", run["data"], "train", 4, cache, batch_size=4, chunk_size=8,
                           progress=False)
    meta = (folder / "meta.json").read_text()
    (folder / "meta.json").write_text(meta.replace('"complete": true', '"complete": false'))  # as if mid-build
    queue = mp.get_context("spawn").Queue()
    with exclusive(cache / f".{folder.name}.lock"):  # the lock build_bank takes
        proc = _start(run, cache, queue)
        time.sleep(3)
        assert queue.empty()  # blocked on the lock while "the first builder" holds it
        (folder / "meta.json").write_text(meta)  # the first builder finishes
    status, built = queue.get(timeout=120)
    proc.join(timeout=60)
    assert (status, built) == ("ok", str(folder))


def test_an_unreadable_bank_meta_is_named_and_a_rebuild_starts_it_over(run, tmp_path):  # noqa: F811
    import pytest
    cache = tmp_path / "banks"

    def build():
        return LD.build_bank(run["ae"] / "encoder", run["data"], "train", 4, cache, batch_size=4, chunk_size=8,
                             progress=False)

    folder = build()
    registers = np.asarray(LD.RegisterBank(folder).registers).copy()
    (folder / "meta.json").write_text('{"key": ')  # a torn write
    with pytest.raises(ValueError, match=r"meta.json is not readable JSON.*delete .*bank-train"):
        LD.RegisterBank(folder)
    assert build() == folder and np.array_equal(np.asarray(LD.RegisterBank(folder).registers), registers)


def test_the_cli_names_the_flag(capsys):
    import pytest
    for flag in ("--num-registers", "--batch-size", "--chunk-size"):
        with pytest.raises(SystemExit):
            LD.parse_args(["--ae", "run", "--data", "data", flag, "0"])
        assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err
