"""infra/checkpoint.py: the crash-safe folder swap (a fault at every named point, in-process and as a real process death),
recovery by resume, stray cleaning, and readable errors for damaged files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infra import checkpoint as C


def save(folder, value):
    return C.save_model_dir(folder, {"w": torch.full((3,), float(value))}, {"value": value})


def read_value(folder):
    return C.read_safetensors(folder)["w"][0].item()


class Crash(Exception):
    pass


@pytest.mark.parametrize("point", C.FAULT_POINTS)
def test_a_fault_at_each_point_leaves_a_complete_folder(tmp_path, monkeypatch, point):
    """Old value 1, new value 2: after a fault at `point`, recover_folder finds a complete copy (1 before the new
    folder is in place, 2 after), and the next good save leaves no stray."""
    folder = tmp_path / "model"
    save(folder, 1)

    def hook(name, where):
        if name == point and where == folder:
            raise Crash(name)

    monkeypatch.setattr(C, "FAULT_HOOKS", [hook])
    with pytest.raises(Crash):
        save(folder, 2)
    monkeypatch.setattr(C, "FAULT_HOOKS", [])
    assert (folder.exists()) == (point != "old_moved")  # only between the renames is the live folder gone
    C.recover_folder(folder)
    assert read_value(folder) == (1 if point in ("staged", "old_moved") else 2)
    assert C.read_config(folder)["value"] == read_value(folder)
    save(folder, 3)
    assert read_value(folder) == 3 and C.strays(folder) == []


def test_a_real_process_death_between_the_renames_is_recovered(tmp_path):
    """CROCODIL_FAULT_AT=old_moved kills the writer (os._exit(137)) with the live folder renamed away."""
    folder = tmp_path / "model"
    save(folder, 1)
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r}); import torch; from infra import checkpoint; "
            f"checkpoint.save_model_dir({str(folder)!r}, {{'w': torch.full((3,), 2.0)}}, {{'value': 2}})")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, C.FAULT_ENV: "old_moved"})
    assert result.returncode == 137 and not folder.exists()
    assert len(C.strays(folder, ("old",))) == 1 and len(C.strays(folder)) == 2  # the old copy and the new stage
    assert C.find_folder(folder) != folder  # the complete old copy, found read-only
    assert C.recover_folder(folder) and read_value(folder) == 1
    save(folder, 3)
    assert read_value(folder) == 3 and C.strays(folder) == []


def test_recovery_ignores_partial_staging_folders(tmp_path):
    folder = tmp_path / "model"
    (tmp_path / ".model.tmp-123").mkdir()  # a save killed while writing its first copy
    (tmp_path / ".model.tmp-123" / "config.json").write_text("{")
    assert not C.recover_folder(folder) and not folder.exists()
    save(folder, 1)
    assert C.strays(folder) == []


def test_damaged_files_name_the_file_and_the_fix(tmp_path):
    folder = tmp_path / "model"
    save(folder, 1)
    weights = folder / C.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:40])  # truncated
    with pytest.raises(C.CheckpointError, match=r"model\.safetensors is unreadable .*truncated.*Restore"):
        C.read_safetensors(folder)
    weights.write_bytes(os.urandom(200))  # random bytes
    with pytest.raises(C.CheckpointError, match="model.safetensors is unreadable"):
        C.read_safetensors(folder)
    (folder / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(C.CheckpointError, match=r"config\.json is not valid JSON.*restore it"):
        C.read_config(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(C.CheckpointError, match="not a JSON object"):
        C.read_config(folder)
    (folder / C.INDEX_FILE).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(C.CheckpointError, match="weight_map"):
        C.weight_files(folder)


def test_non_finite_names_every_bad_tensor():
    state = {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")]),
             "opt": {"state": {"c": {"exp_avg": torch.tensor([float("inf")]), "step": torch.tensor(3.0)}}},
             "ids": torch.tensor([1, 2])}
    assert C.non_finite(state) == ["b", "opt.state.c.exp_avg"]


def test_weights_with_nan_are_refused_on_loading(tmp_path):
    """Saving refuses non-finite tensors; a file written by another tool (or edited) with a NaN is refused when
    loaded, naming the tensor, instead of decoding to empty programs."""
    from safetensors.torch import save_file
    from demasker import Demasker, DemaskerConfig
    folder = tmp_path / "demasker"
    Demasker(DemaskerConfig.tiny()).save_pretrained(folder)
    state = C.read_safetensors(folder)
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(folder / C.WEIGHTS_FILE))
    with pytest.raises(C.CheckpointError, match=f"NaN or inf in 1 tensor.*{key}.*Restore"):
        Demasker.from_pretrained(str(folder))
