"""Tests for dataprep/latent_data.py and train_prior.py: register banks, the training objective, overfitting, the
conditional prior's advantage, exact resume, and the run folder the generators read."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dataprep import data
import generators as G
from infra import guards
from dataprep import latent_data as LD
import train_prior as T
from demasker import Demasker, DemaskerConfig
from encoder import Encoder, EncoderConfig
from tiny_models import copy_with_other_encoder
from latent_dit import DiTConfig, LatentDiT
from schedules import alpha_bar, register_times

K, D = 8, 64


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny data cache (shared tokenizer) and a tiny AE run folder (encoder/, demasker/, args.json)."""
    root = tmp_path_factory.mktemp("prior")
    rng = np.random.default_rng(0)
    names = ["alpha", "beta", "gamma", "delta", "omega", "kappa"]
    lines = []
    for i in range(80):
        a, b, n = rng.choice(names), rng.choice(names), int(rng.integers(1, 9))
        text = f"def {a}_{i}({b}):\n    total = {n}\n    for k in range({b}):\n        total += k * {n}\n    return total\n"
        lines.append(json.dumps({"text": text, "path": f"f{i}.py"}))
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    meta = data.build_dataset(root / "data", root / "corpus.jsonl", seq_len=40, vocab_size=280, overlong="cut")
    assert meta["splits"]["val"]["programs"] > 0
    torch.manual_seed(0)
    V = meta["vocab_size"]
    encoder = Encoder(EncoderConfig.tiny(vocab_size=V, hidden_size=D, num_registers=K, pad_token_id=meta["pad_id"],
                                         eos_token_id=meta["eos_id"], mask_token_id=meta["mask_id"]))
    with torch.no_grad():  # larger random weights: registers that differ more between programs
        for name, param in encoder.named_parameters():
            if param.dim() == 2 and not name.startswith("embed"):
                param.mul_(5)
    demasker = Demasker(DemaskerConfig.tiny(vocab_size=V, mask_token_id=meta["mask_id"], eos_token_id=meta["eos_id"],
                                            bos_token_id=meta["bos_id"], pad_token_id=meta["eos_id"],
                                            register_dim=D, max_registers=K))
    ae = root / "ae"
    encoder.save_pretrained(ae / "encoder")
    demasker.save_pretrained(ae / "demasker")
    shutil.copy(root / "data" / "tokenizer.json", ae / "tokenizer.json")
    (ae / "args.json").write_text(json.dumps({"data": str(root / "data")}))
    return {"root": root, "data": root / "data", "ae": ae, "meta": meta, "encoder": encoder.eval()}


# ------------------------------------------------------------------------------------------------
# dataprep/latent_data.py
# ------------------------------------------------------------------------------------------------


def test_visible_view_hand_cases():
    E = 1
    ids = torch.tensor([[0, 5, 6, E, E, E], [0, 5, E, E, E, E], [0, 5, 6, 7, 8, 9]])
    masked = torch.tensor([[0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    attention, hide = LD.visible_view(ids, masked, E)
    assert attention.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert hide.tolist() == (masked & attention).tolist()
    assert hide[1, 2]  # a masked EOS is hidden; the next visible EOS ends the text
    attention, hide = LD.visible_view(ids, torch.zeros_like(masked), E)
    assert attention[0].tolist() == [1, 1, 1, 1, 0, 0] and not hide.any()


def test_bank_matches_encoder_reuses_cache_resumes_and_rekeys(run, tmp_path, monkeypatch):
    cache = tmp_path / "banks"
    folder = LD.build_bank(run["ae"] / "encoder", run["data"], "train", 4, cache, batch_size=5, chunk_size=16,
                           progress=False)
    bank = LD.RegisterBank(folder)
    tokens = data.TokenData(run["data"], "train")
    rows = np.arange(len(tokens))
    batch = tokens.batch(rows)
    expected = run["encoder"](batch["encoder_ids"], attention_mask=batch["encoder_mask"])[:, :4]
    assert bank.registers.shape == (len(tokens), 4, D)
    assert torch.allclose(bank.batch(rows), expected, atol=1e-4)  # the first 4 of the K = 8 registers
    # finished: reused without encoding
    monkeypatch.setattr(Encoder, "forward", lambda *a, **k: pytest.fail("a finished bank was re-encoded"))
    assert LD.build_bank(run["ae"] / "encoder", run["data"], "train", 4, cache, progress=False) == folder
    monkeypatch.undo()
    # interrupted: only unfinished chunks are encoded again
    registers = np.load(folder / "registers.npy", mmap_mode="r+")
    registers[:16] = 7.0  # chunk 0, marked done: must stay as is
    registers[16:32] = 0.0  # chunk 1, marked not done: must be recomputed
    registers.flush()
    done = np.load(folder / "done.npy")
    done[1] = 0
    np.save(folder / "done.npy", done)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    LD.build_bank(run["ae"] / "encoder", run["data"], "train", 4, cache, batch_size=5, chunk_size=999, progress=False)
    resumed = LD.RegisterBank(folder).batch(rows)
    assert torch.all(resumed[:16] == 7.0)
    assert torch.allclose(resumed[16:], expected[16:], atol=1e-4)
    # a changed encoder gets a new bank
    changed = Encoder.from_pretrained(str(run["ae"] / "encoder"))
    with torch.no_grad():
        changed.norm.weight.mul_(1.5)
    changed.save_pretrained(tmp_path / "encoder2")
    assert LD.build_bank(tmp_path / "encoder2", run["data"], "train", 4, cache, progress=False) != folder
    with pytest.raises(ValueError, match="num-registers"):
        LD.build_bank(run["ae"] / "encoder", run["data"], "train", K + 1, cache, progress=False)


# ------------------------------------------------------------------------------------------------
# The objective
# ------------------------------------------------------------------------------------------------


class Recorder(torch.nn.Module):
    def forward(self, z_t, t, **cond):
        self.z_t, self.t = z_t, t
        return torch.zeros_like(z_t)


def test_training_noise_matches_alpha_bar_with_block_offsets():
    draws = T.step_draws(0, 3, 4096, K, D, 0.3, True)
    t = register_times(draws["t"], K, 0.3)
    assert draws["t"].min() < 0 and draws["t"].max() > 0.9  # base times span [-max_offset, 1]
    assert torch.all(t[:, 1:] >= t[:, :-1]) and t.min() == 0 and t.max() <= 1
    z0 = torch.nn.functional.normalize(torch.randn(4096, K, D), dim=-1) * math.sqrt(D)
    recorder = Recorder()
    loss = T.prior_loss(recorder, z0, t, draws["noise"])
    assert loss.item() == pytest.approx(1.0, rel=1e-5)  # a zero prediction of unit-RMS registers
    ab = alpha_bar(t)[..., None]  # float64
    assert torch.allclose(recorder.z_t, (ab.sqrt() * z0 + (1 - ab).sqrt() * draws["noise"]).float(), atol=1e-6)
    # E[z_t . z0] / d = sqrt(alpha_bar(t)) per example
    coefficient = (recorder.z_t * z0).mean(-1)  # (N, K)
    assert torch.allclose(coefficient.mean(0), ab[..., 0].sqrt().mean(0).float(), atol=0.02)


def test_batch_rows_cover_each_epoch_and_wrap():
    rows = np.concatenate([T.batch_rows(s, 4, 10, seed=1) for s in range(5)])  # 20 = two epochs
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
    assert len(T.batch_rows(0, 25, 10, 0)) == 25  # a batch larger than the data


def train_steps(model, banks, steps, lr=1e-2, cond_fn=None, batch=16, seed=0):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        rows = T.batch_rows(step, batch, len(banks), seed)
        draws = T.step_draws(seed, step, batch, K, D, 0.2, True, seq_len=None if cond_fn is None else 40)
        t = register_times(draws["t"], K, 0.2)
        cond = {} if cond_fn is None else cond_fn(rows, draws)
        loss = T.prior_loss(model, banks[rows], t, draws["noise"], **cond)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def denoise_mse(model, banks, t_values, cond=None):
    n = len(banks)
    draws = T.step_draws(123, 0, n * len(t_values), K, D, 0.2, True)
    t = register_times(torch.tensor(t_values).repeat_interleave(n), K, 0.2)
    z0 = banks.repeat(len(t_values), 1, 1)
    kwargs = {} if cond is None else {"cond": cond.repeat(len(t_values), 1, 1)}
    with torch.no_grad():
        return T.prior_loss(model, z0, t, draws["noise"], **kwargs).item()


def test_prior_overfits_a_handful_of_banks():
    torch.manual_seed(0)
    banks = torch.nn.functional.normalize(torch.randn(4, K, D), dim=-1) * math.sqrt(D)
    model = T.PriorTrainee(LatentDiT(DiTConfig.tiny(register_dim=D, num_registers=K)))
    before = denoise_mse(model, banks, [0.0, 0.25, 0.5])
    train_steps(model, banks, 120)
    after = denoise_mse(model, banks, [0.0, 0.25, 0.5])
    assert before == pytest.approx(1.0) and after < before / 10


def test_conditional_prior_recovers_a_fully_visible_sequence_better(run):
    tokens = data.TokenData(run["data"], "train")
    rows = np.arange(6)
    batch = tokens.batch(rows)
    encoder = run["encoder"]
    with torch.no_grad():
        banks = encoder(batch["encoder_ids"], attention_mask=batch["encoder_mask"])
    from dataprep.cross_tokenizer import SharedView
    view = SharedView(run["meta"]["eos_id"], run["meta"]["pad_id"])  # one tokenizer: the row itself

    def cond_fn(rows_, draws):
        ids, attention, hide = T.conditioning_inputs(view, tokens, rows_, draws["u"], draws["r"], "cpu")
        with torch.no_grad():
            return {"cond": encoder(ids, attention_mask=attention, hide=hide)}

    torch.manual_seed(1)
    unconditional = train_steps(T.PriorTrainee(LatentDiT(DiTConfig.tiny(register_dim=D, num_registers=K))),
                                banks, 200, lr=3e-3)
    torch.manual_seed(1)
    conditional = train_steps(T.PriorTrainee(LatentDiT(DiTConfig.tiny(register_dim=D, num_registers=K, cond_dim=D))),
                              banks, 200, lr=3e-3, cond_fn=cond_fn)
    ids, attention, hide = T.conditioning_inputs(view, tokens, rows, torch.ones(6, 40), torch.zeros(6), "cpu")
    assert not hide.any()  # r = 0: the whole sequence is visible
    with torch.no_grad():
        full_view = encoder(ids, attention_mask=attention, hide=hide)
    to_psnr = lambda mse: 10 * math.log10(1 / mse)  # noqa: E731  (metrics.psnr, peak 1, of the mean MSE)
    t_values = [0.95, 1.0]  # (nearly) pure noise: only the conditioning can tell the programs apart
    psnr_unconditional = to_psnr(denoise_mse(unconditional, banks, t_values))
    psnr_conditional = to_psnr(denoise_mse(conditional, banks, t_values, cond=full_view))
    assert psnr_conditional > psnr_unconditional + 2.0
    # at t = 1 no unconditional model beats the mean bank; the conditional one does
    best_unconditional = to_psnr(float((banks - banks.mean(0)).pow(2).mean()))
    assert to_psnr(denoise_mse(conditional, banks, [1.0], cond=full_view)) > best_unconditional + 1.0


# ------------------------------------------------------------------------------------------------
# The script: run folder, exact resume, generators reading it
# ------------------------------------------------------------------------------------------------


def train(run, out, *extra):
    return T.main(["--ae", str(run["ae"]), "--out-dir", str(out), "--max-steps", "6", "--global-batch-size", "8",
                   "--warmup-steps", "2", "--eval-interval", "3", "--val-examples", "4", "--save-interval", "100",
                   "--log-interval", "1", "--quiet", "--bank-cache", str(run["root"] / "banks"), *extra])


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("extra", [[], ["--conditional", "--train-cond-encoder", "--micro-batch-size", "4"]])
def test_resume_is_exact(run, tmp_path, extra):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(run, straight, *extra)
    train(run, split, "--stop-at", "3", *extra)
    train(run, split, "--resume", *extra)
    parts = ["dit", "train_state/dit"] + (["cond_encoder", "train_state/cond_encoder"] if extra else [])
    for part in parts:  # EMA (sampling) and raw weights
        a, b = weights(straight / part), weights(split / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    log = lambda folder: [{k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
                          for line in (folder / "log.jsonl").read_text().splitlines()]
    assert log(straight) == log(split)
    assert any("psnr" in line and len(line["psnr"]) == len(T.VAL_TIMES) for line in log(straight))
    with pytest.raises(FileExistsError, match="--resume"):
        train(run, straight, *extra)


def test_run_folder_feeds_the_generators(run, tmp_path):
    train(run, tmp_path / "p")
    train(run, tmp_path / "c", "--conditional")
    settings = json.loads((tmp_path / "c" / G.PRIOR_SETTINGS_FILE).read_text())
    assert settings["ae"] == str(run["ae"].resolve()) and settings["conditional"] and settings["num_registers"] == K
    prior, cond_prior = G.load_prior(tmp_path / "p"), G.load_prior(tmp_path / "c")
    assert not prior.conditional and cond_prior.conditional and cond_prior.encoder.cfg.num_registers == K
    assert prior.max_offset == 0.2 and prior.block_offsets
    demasker = Demasker.from_pretrained(str(run["ae"] / "demasker")).eval()
    tokens, report = G.conwithindisc(demasker, cond_prior, 2, gen_length=16, steps=4, prior=prior, prior_steps=3,
                                     refresh_prior_steps=2)
    assert tokens.shape == (2, 16) and report["demasker_calls"] == 4 and report["encoder_calls"] == 1


def test_conditional_validation_logs_consistency_and_resume_keeps_it(run, tmp_path, capsys):
    """--val-consistency N: every validation record of the conditional prior carries the agreement rows (oracle,
    conditional, blank at each revealed share) and the copy rows (the oracle's registers are h_phi(x) itself: cosine
    1, MSE 0), measured on N held-out programs; --resume keeps the run's N, prints the line, and the flag is refused
    without --conditional. Off by default."""
    out = tmp_path / "c"
    T.main(["--ae", str(run["ae"]), "--out-dir", str(out), "--max-steps", "6", "--global-batch-size", "8",
            "--eval-interval", "3", "--bank-cache", str(run["root"] / "banks"), "--conditional",
            "--val-consistency", "3", "--val-consistency-steps", "4", "--stop-at", "3"])
    assert "agreement (conditional/blank/oracle) r=0.25" in capsys.readouterr().out
    T.main(["--ae", str(run["ae"]), "--out-dir", str(out), "--resume", "--quiet"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val = [r for r in records if r["type"] == "val"]
    assert [r["step"] for r in val] == [3, 6]
    for record in val:
        result = record["consistency"]
        assert result["num_programs"] == 3 and result["steps"] == 4 and result["cer_unit"] == "characters"
        assert [(row["source"], row["share"]) for row in result["agreement"]] == \
            [(s, r) for r in (0.25, 0.5, 0.75) for s in ("oracle", "conditional", "blank")]
        assert all(row["agreement"] is None or 0 <= row["agreement"] <= 1 for row in result["agreement"])
        copy = {row["source"]: row for row in result["copy"]}
        assert copy["oracle"]["cosine"] == pytest.approx(1.0) and copy["oracle"]["mse"] == pytest.approx(0, abs=1e-9)
        assert copy["conditional"]["cer_ci"][0] <= copy["conditional"]["cer"] <= copy["conditional"]["cer_ci"][1]
    assert json.loads((out / "args.json").read_text())["val_consistency"] == 3
    base = ["--ae", str(run["ae"]), "--out-dir", str(tmp_path / "x")]
    assert T.parse_all(base).val_consistency == 0
    for flags, text in ((["--val-consistency", "2"], "add --conditional"),
                        (["--conditional", "--val-consistency", "-1"], "--val-consistency must be an integer >= 0")):
        with pytest.raises(SystemExit) as exit_info:
            T.parse_all(base + flags)
        assert exit_info.value.code == 2 and text in capsys.readouterr().err
    with pytest.raises(SystemExit):
        T.parse_all(["--help"])
    assert "--val-consistency N" in capsys.readouterr().out


def test_resume_refuses_changed_flags_and_another_encoder(run, tmp_path, capsys):
    """--resume keeps the run's flags (unset ones inherited), refuses a changed objective flag (exit 2,
    old vs new listed) and an AE whose encoder fingerprint differs from prior.json's (both named)."""
    out = tmp_path / "p"
    train(run, out, "--stop-at", "2", "--lr", "2e-3")
    with pytest.raises(SystemExit) as exit_info:
        train(run, out, "--resume", "--lr", "1e-2", "--num-registers", "4")
    message = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--lr: run 0.002, now 0.01" in message and "--num-registers: run 8, now 4" in message
    other = copy_with_other_encoder(run["ae"], tmp_path / "other_ae")
    with pytest.raises(ValueError, match="is not the one this prior was trained on") as error:
        T.main(["--ae", str(other), "--out-dir", str(out), "--resume", "--quiet", "--bank-cache", str(run["root"] / "banks")])
    assert str(other / "encoder") in str(error.value) and str(run["ae"].resolve()) in str(error.value)
    T.main(["--ae", str(run["ae"]), "--out-dir", str(out), "--resume", "--quiet"])  # the run's own flags: fine
    recorded = json.loads((out / "args.json").read_text())
    assert recorded["lr"] == 2e-3 and recorded["max_steps"] == 6
    assert torch.load(out / "train_state" / "training_state.pt", weights_only=True)["extra"]["step"] == 6


@pytest.mark.parametrize("flags, text", [
    (["--max-steps", "0"], "--max-steps must be an integer >= 1, got 0"),
    (["--global-batch-size", "0"], "--global-batch-size must be an integer >= 1"),
    (["--lr", "-1"], "--lr must be a number > 0"),
    (["--num-registers", "0"], "--num-registers must be an integer >= 1"),
    (["--ema-decay", "1"], "--ema-decay must be a number in [0, 1)"),
    (["--hidden-size", "64", "--num-heads", "5"], "divisible by --num-heads 5"),
])
def test_prior_numbers_are_checked_up_front(run, tmp_path, capsys, flags, text):
    with pytest.raises(SystemExit) as exit_info:
        T.parse_args(["--ae", str(run["ae"]), "--out-dir", str(tmp_path), *flags])
    assert exit_info.value.code == 2 and text in capsys.readouterr().err


def test_non_finite_prior_steps_never_reach_weights_ema_or_checkpoint(run, tmp_path, monkeypatch):
    """A NaN loss from step 3 on: steps 3.. are skipped (no AdamW step, no EMA update); with --max-bad-steps 2 the
    run stops at step 4 naming the last good checkpoint (step 2), whose raw and EMA weights stay those of a clean
    run stopped at step 2."""
    train(run, tmp_path / "clean", "--stop-at", "2", "--save-interval", "2")
    real, calls = T.prior_loss, []

    def poisoned(*a, **k):
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) > 2 else 1.0)

    monkeypatch.setattr(T, "prior_loss", poisoned)
    with pytest.raises(guards.NonFiniteError, match=r"step 4: .*train_state \(step 2\), untouched"):
        train(run, tmp_path / "bad", "--save-interval", "2", "--max-bad-steps", "2")
    for part in ("dit", "train_state/dit"):
        a, b = weights(tmp_path / "clean" / part), weights(tmp_path / "bad" / part)
        assert all(torch.equal(a[k], b[k]) and torch.isfinite(b[k]).all() for k in a), part
    skipped = [json.loads(line) for line in (tmp_path / "bad" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in skipped if r["type"] == "skipped"] == [3, 4]


def _rank_main(rank, world_size, port, argv):
    """One torchrun-like rank (gloo) running train_prior.main."""
    import os
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    T.main(argv)


def test_two_ranks_match_one_process(run, tmp_path):
    """The conditional prior (with a trained h_mu) on 2 gloo ranks, DDP, each rank half of the global
    batch, ends with the 1-process weights and losses."""
    import socket

    import torch.multiprocessing as mp
    argv = lambda out: ["--ae", str(run["ae"]), "--out-dir", str(out), "--max-steps", "4", "--global-batch-size", "8",
                        "--warmup-steps", "2", "--eval-interval", "4", "--val-examples", "4", "--save-interval", "100",
                        "--log-interval", "1", "--quiet", "--bank-cache", str(run["root"] / "banks"), "--device", "cpu",
                        "--conditional", "--train-cond-encoder"]
    T.main(argv(tmp_path / "one"))  # builds the bank cache first, so the ranks only read it
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, argv(tmp_path / "two")), nprocs=2, join=True)
    start = weights(run["ae"] / "encoder")  # h_mu starts as h_phi: the runs must have moved away from it
    moved = weights(tmp_path / "one" / "train_state/cond_encoder")
    assert max((moved[k] - start[k]).abs().max().item() for k in start) > 1e-4
    for part in ("train_state/dit", "train_state/cond_encoder"):
        one, two = weights(tmp_path / "one" / part), weights(tmp_path / "two" / part)
        assert one.keys() == two.keys()
        worst = max((one[k] - two[k]).abs().max().item() for k in one)
        assert worst < 1e-5, (part, worst)
    log = lambda folder: [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    losses = lambda folder: [r["loss"] for r in log(folder) if r["type"] == "train"]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# The paper's shape (App. E, App. G (i)): all K registers, the paper preset's optimisation; hub cards
# ------------------------------------------------------------------------------------------------


def test_all_registers_presets_and_cards(run, tmp_path, capsys):
    """--num-registers all models every register of the encoder's bank (K = 8 here; the paper's 128); the paper
    preset's optimisation (DiT's recipe, documented as our choice) fills unset flags, explicit flags win; each
    save writes a hub card into dit/."""
    base = ["--ae", str(run["ae"]), "--out-dir", str(tmp_path / "x")]
    assert T.parse_args(base + ["--num-registers", "all"]).num_registers == K
    paper = T.parse_args(base + ["--preset", "paper"])
    assert (paper.lr, paper.ema_decay, paper.global_batch_size, paper.max_steps, paper.weight_decay, paper.amp) == \
        (1e-4, 0.9999, 256, 100_000, 0.0, "bf16")
    tiny = T.parse_args(base)
    assert (tiny.lr, tiny.ema_decay, tiny.global_batch_size, tiny.max_steps, tiny.amp) == (1e-3, 0.999, 64, 2000, "none")
    assert T.parse_args(base + ["--preset", "paper", "--lr", "3e-4"]).lr == 3e-4
    with pytest.raises(SystemExit):
        T.parse_args(base + ["--num-registers", "most"])
    with pytest.raises(SystemExit):
        T.parse_args(["--ae", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "x"), "--num-registers", "all"])
    assert "cannot read the encoder's K" in capsys.readouterr().err
    out = tmp_path / "all"
    train(run, out, "--num-registers", "all", "--max-steps", "2")
    assert json.loads((out / G.PRIOR_SETTINGS_FILE).read_text())["num_registers"] == K
    assert G.load_prior(out).dit.cfg.num_registers == K
    card = (out / "dit" / "README.md").read_text()
    assert "library_name: crocodil" in card and "latent_dit" in card
    assert not (out / STATE / "dit" / "README.md").exists()


STATE = T.STATE_DIR
