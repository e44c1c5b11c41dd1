"""infra/dist_checkpoint.py on one process: a joint model saved as from_pretrained part folders and resumed (weights and
AdamW moments bitwise), strict resume listing every missing / unexpected / mis-shaped tensor, and no NaN ever
saved. The save-on-2-ranks / resume-on-1 (and back) cases run in tests/infra/test_distributed.py's 2-rank fixture.
Also: the old names stay reachable through infra/distributed.py; the global RNG states round-trip through
torch.save / torch.load(weights_only=True); a resumed run refuses a data cache whose tokenizer differs."""

import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from infra import dist_checkpoint as DC
from infra import distributed as D
from demasker import Demasker, DemaskerConfig
from encoder import Encoder, EncoderConfig


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


def test_distributed_does_not_import_the_checkpoint_module():
    """No import circle: dist_checkpoint builds on distributed, never the other way round."""
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(D))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "dist_checkpoint" not in imported and not hasattr(D, "save_checkpoint")


class _Joint(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = Encoder(EncoderConfig.tiny())
        self.demasker = Demasker(DemaskerConfig.tiny(register_dim=EncoderConfig.tiny().hidden_size))

    def loss(self, x0):
        registers = self.encoder(x0)  # (B, K, d)
        return self.demasker(x0, registers=registers).float().logsumexp(-1).mean()


def test_checkpoint_parts_are_from_pretrained_folders_and_resume(tmp_path):
    env = D.setup(device="cpu")
    joint = _Joint()
    optimizer = make_optimizer(joint)
    x0 = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    joint.loss(x0).backward()
    optimizer.step()
    parts = {"encoder": {**joint.encoder.cfg.to_dict(), "crocodil_model": "encoder"},
             "demasker": {**joint.demasker.cfg.to_dict(), "crocodil_model": "demasker"}}
    with pytest.raises(ValueError, match=r"leave the model's \['demasker'\] unsaved"):
        DC.save_checkpoint(tmp_path / "ckpt", joint, optimizer, env, parts={"encoder": parts["encoder"]})
    for _ in range(2):  # the second save replaces the first atomically
        DC.save_checkpoint(tmp_path / "ckpt", joint, optimizer, env, parts=parts, extra={"step": 1})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["demasker", "encoder", DC.TRAINING_STATE_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left
    encoder = Encoder.from_pretrained(tmp_path / "ckpt" / "encoder")
    for key, value in joint.encoder.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key

    restored = _Joint()
    torch.manual_seed(5)
    for param in restored.parameters():  # scramble: everything must come from the files
        param.data.normal_()
    restored_optimizer = make_optimizer(restored)
    assert DC.load_checkpoint(tmp_path / "ckpt", restored, restored_optimizer, env) == {"step": 1}
    for key, value in joint.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    for a, b in zip(joint.parameters(), restored.parameters()):
        assert torch.equal(optimizer.state[a]["exp_avg_sq"], restored_optimizer.state[b]["exp_avg_sq"])
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        DC.load_checkpoint(tmp_path / "ckpt" / "encoder", restored, restored_optimizer, env)


def _saved_joint(tmp_path):
    env = D.setup(device="cpu")
    joint = _Joint()
    optimizer = make_optimizer(joint)
    joint.loss(torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))).backward()
    optimizer.step()
    parts = {"encoder": {**joint.encoder.cfg.to_dict(), "crocodil_model": "encoder"},
             "demasker": {**joint.demasker.cfg.to_dict(), "crocodil_model": "demasker"}}
    DC.save_checkpoint(tmp_path / "ckpt", joint, optimizer, env, parts=parts, extra={"step": 1})
    return env, tmp_path / "ckpt"


def test_strict_resume_lists_missing_unexpected_and_mis_shaped_tensors(tmp_path):
    """A deleted, added or reshaped tensor (model or AdamW) is one CheckpointError listing each,
    never a tensor silently left at its initial value."""
    from safetensors.torch import save_file

    from infra.checkpoint import CheckpointError, read_safetensors
    env, folder = _saved_joint(tmp_path)
    state = read_safetensors(folder / "encoder")
    del state["norm.weight"]
    state["extra.bias"] = torch.zeros(2)
    state["embed_tokens.weight"] = state["embed_tokens.weight"][:-1]
    save_file(state, str(folder / "encoder" / "model.safetensors"))
    training = torch.load(folder / DC.TRAINING_STATE_FILE, weights_only=True)
    name = next(iter(training["optimizer"]["state"]))
    del training["optimizer"]["state"][name]["exp_avg"]
    torch.save(training, folder / DC.TRAINING_STATE_FILE)
    restored = _Joint()
    with pytest.raises(CheckpointError) as error:
        DC.load_checkpoint(folder, restored, make_optimizer(restored), env)
    message = str(error.value)
    for text in ("missing", "encoder.norm.weight", f"optimizer.{name}.exp_avg", "unexpected", "encoder.extra.bias",
                 "wrong shape", "encoder.embed_tokens.weight: checkpoint"):
        assert text in message, message
    training["optimizer"]["state"] = {k: v for k, v in training["optimizer"]["state"].items() if k != name}
    torch.save(training, folder / DC.TRAINING_STATE_FILE)
    with pytest.raises(CheckpointError, match=f"optimizer.{name}[,\n]"):
        DC.load_checkpoint(folder, restored, make_optimizer(restored), env)


def test_a_non_finite_model_is_never_saved(tmp_path):
    env, folder = _saved_joint(tmp_path)
    before = (folder / "encoder" / "model.safetensors").read_bytes()
    joint = _Joint()
    with torch.no_grad():
        joint.encoder.norm.weight[0] = float("nan")
    with pytest.raises(FloatingPointError, match="encoder.norm.weight"):
        DC.save_checkpoint(folder, joint, make_optimizer(joint), env, parts={"encoder": {}, "demasker": {}})
    assert (folder / "encoder" / "model.safetensors").read_bytes() == before

def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    torch.save(DC.rng_states(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    DC.set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_a_different_tokenizer_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tokenizer.json").write_text('{"a": 1}')
    (tmp_path / "same.json").write_text('{"a": 1}')
    (tmp_path / "other.json").write_text('{"a": 2}')
    DC.check_same_tokenizers(tmp_path / "run", {"tokenizer.json": tmp_path / "same.json"})
    DC.check_same_tokenizers(tmp_path / "run", {"encoder_tokenizer.json": tmp_path / "other.json"})  # not saved: ok
    with pytest.raises(ValueError, match="not the tokenizer"):
        DC.check_same_tokenizers(tmp_path / "run", {"tokenizer.json": tmp_path / "other.json"})
