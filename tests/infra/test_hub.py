"""infra/hub.py: model cards from what a run recorded, folder checks, and the upload plan (no network)."""

import json

import pytest
import torch

from infra import hub
from demasker import Demasker, DemaskerConfig
from encoder import Encoder, EncoderConfig
from latent_dit import DiTConfig, LatentDiT


def make_run(tmp_path):
    """A run folder shaped like train_ae.py's: checkpoint/{encoder,demasker}/ + args.json + log.jsonl."""
    torch.manual_seed(0)
    run = tmp_path / "ae"
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"seq_len": 32, "shared_tokenizer": True}))
    ckpt = run / "checkpoint"
    Encoder(EncoderConfig.tiny(vocab_size=64, num_registers=4)).save_pretrained(ckpt / "encoder")
    Demasker(DemaskerConfig.tiny(vocab_size=64)).save_pretrained(ckpt / "demasker")
    (ckpt / "progress.json").write_text(json.dumps({"step": 7}))
    (run / "args.json").write_text(json.dumps({"preset": "tiny", "max_steps": 7, "lr": 3e-3, "data": str(data)}))
    (run / "log.jsonl").write_text(json.dumps({"type": "train", "step": 7, "loss": 4.2}) + "\n"
                                   + json.dumps({"type": "val", "step": 7, "results": {"0.5": {"ce": 3.25}}})
                                   + "\n{cut by a cra")
    # staging copies must never be uploaded
    Encoder(EncoderConfig.tiny(vocab_size=64, num_registers=4)).save_pretrained(run / ".checkpoint.stage-1" / "encoder")
    return run


def test_cards_name_what_the_run_recorded(tmp_path):
    run = make_run(tmp_path)
    folders = hub.write_cards(run, "me/tiny")
    assert sorted(f.name for f in folders) == ["demasker", "encoder"]
    card = (run / "checkpoint" / "encoder" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: crocodil")
    assert "h_phi" in card and "Alg. 1" in card
    assert '"ce": 3.25' in card                                  # the measured validation record
    assert "| `steps done` | `7` |" in card and "| `lr` | `0.003` |" in card
    assert "| `seq_len` | `32` |" in card                        # from the data cache's meta.json
    assert 'Encoder.from_pretrained(snapshot_download("me/tiny") + "/checkpoint/encoder")' in card
    assert "f_theta" in (run / "checkpoint" / "demasker" / "README.md").read_text()


def test_dit_card_and_single_folder(tmp_path):
    folder = tmp_path / "prior" / "dit"
    LatentDiT(DiTConfig.tiny(num_registers=4)).save_pretrained(folder)
    (tmp_path / "prior" / "prior.json").write_text(json.dumps({"num_registers": 4}))
    hub.write_cards(folder, "me/dit")
    card = (folder / "README.md").read_text()
    assert "g_psi" in card and '"num_registers": 4' in card and 'LatentDiT.from_pretrained("me/dit")' in card


def test_check_refuses_broken_weights_and_missing_card(tmp_path):
    run = make_run(tmp_path)
    folder = run / "checkpoint" / "encoder"
    with pytest.raises(SystemExit, match="README.md"):
        hub.check_hub_folder(folder)
    hub.write_cards(run)
    assert "model.safetensors" in hub.check_hub_folder(folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(SystemExit, match="readable model.safetensors"):
        hub.check_hub_folder(folder)


class FakeApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))

    def upload_file(self, **kwargs):
        self.calls.append(("upload_file", kwargs))


def test_upload_plan_and_calls(tmp_path, capsys):
    run = make_run(tmp_path)
    hub.main(["upload", str(run), "--repo", "me/tiny", "--dry-run"])
    out = capsys.readouterr().out
    assert "would upload" in out and "checkpoint/encoder" in out and ".checkpoint.stage" not in out
    api = FakeApi()
    hub.upload(run, "me/tiny", private=True, api=api)
    assert api.calls[0] == ("create_repo", {"repo_id": "me/tiny", "private": True, "exist_ok": True})
    paths = sorted(call[1]["path_in_repo"] for call in api.calls[1:] if call[0] == "upload_folder")
    assert paths == ["checkpoint/demasker", "checkpoint/encoder"]


def test_upload_carries_the_tokenizers_and_cards_carry_no_local_path(tmp_path):
    """A downloaded run can be sampled (sample.py reads tokenizer.json beside the models), and a card does not
    publish where the run sat on the training machine."""
    run = make_run(tmp_path)
    (run / "checkpoint" / "tokenizer.json").write_text("{}")
    (run / "checkpoint" / "encoder_tokenizer.json").write_text("{}")
    api = FakeApi()
    hub.upload(run, "me/tiny", api=api)
    files = sorted(call[1]["path_in_repo"] for call in api.calls if call[0] == "upload_file")
    assert files == ["checkpoint/encoder_tokenizer.json", "checkpoint/tokenizer.json"]
    for folder in ("encoder", "demasker"):
        card = (run / "checkpoint" / folder / "README.md").read_text()
        assert str(tmp_path) not in card and "<local>/data" in card


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit):
        hub.main(["cards", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="no model folders"):
        hub.main(["cards", str(tmp_path)])
