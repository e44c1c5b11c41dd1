"""Tests for experiments/train_prompted.py: the Eq. 12 prior recovers a program's registers from its prompt (better than
the unconditional prior, tiny overfit case), the prompt is never masked, the run folder feeds extensions/prompting.py,
the prior and the demasker are a consistent pair (defaults, refusals, the record's fingerprint), --resume is
bit-exact in either phase, two gloo ranks give the one-process run, and an encoder with its own tokenizer trains."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import generators as G
from extensions import prompting as PR
from dataprep import prompts as P
from experiments import train_prompted as T
from demasker import Demasker, DemaskerConfig
from encoder import Encoder, EncoderConfig
from tiny_models import copy_with_other_encoder
from latent_dit import DiTConfig, LatentDiT
from dataprep.tokenization import train_tokenizer
from train_prior import prior_loss

K, D = 4, 64


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Pairs whose answer follows from the prompt, a BPE, and a tiny AE run folder."""
    root = tmp_path_factory.mktemp("prompted")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]
    pairs = []
    for i in range(12):
        n, m = int(rng.integers(2, 9)), int(rng.integers(0, 99))
        word = words[i % len(words)]
        prompt = f'def {word}_{i}(x):\n    """Multiply x by {n} and add {m}."""'
        loop = f"    for k in range({n}):\n        x += {m}\n    return x"
        body = f"    y = x * {n}\n    return y + {m}" if i % 2 else loop
        pairs.append(P.Pair(f"f{i}.py", prompt, body))
    P.write_pairs(root / "pairs", {"train": pairs[:8], "val": pairs[8:], "test": []})
    tokenizer = train_tokenizer([p.program for p in pairs] * 3, vocab_size=300)
    ae = root / "ae"
    ae.mkdir()
    tokenizer.save(str(ae / "tokenizer.json"))
    torch.manual_seed(0)
    V = tokenizer.vocab_size
    encoder = Encoder(EncoderConfig.tiny(vocab_size=V, hidden_size=D, num_registers=K, pad_token_id=tokenizer.pad_id,
                                         eos_token_id=tokenizer.eos_id, mask_token_id=tokenizer.mask_id))
    with torch.no_grad():  # larger random weights: registers that differ more between programs
        for name, param in encoder.named_parameters():
            if param.dim() == 2 and not name.startswith("embed"):
                param.mul_(5)
    demasker = Demasker(DemaskerConfig.tiny(vocab_size=V, mask_token_id=tokenizer.mask_id,
                                            eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.bos_id,
                                            pad_token_id=tokenizer.eos_id, register_dim=D, max_registers=K))
    encoder.save_pretrained(ae / "encoder")
    demasker.save_pretrained(ae / "demasker")
    return {"root": root, "ae": ae, "pairs": root / "pairs", "tokenizer": tokenizer}


def argv(run, out, *extra):
    return ["--ae", str(run["ae"]), "--pairs", str(run["pairs"]), "--out-dir", str(out), "--seq-len", "64",
            "--num-registers", str(K), "--batch-size", "8", "--log-interval", "1000", *extra]


def test_masked_answer_canvas_never_masks_the_prompt():
    ids = torch.arange(10).repeat(3, 1)
    prompt_len = torch.tensor([2, 5, 9])
    x = T.masked_answer_canvas(ids, prompt_len, torch.ones(3), torch.zeros(3, 10), mask_id=-1)
    for row, n in enumerate(prompt_len.tolist()):
        assert torch.equal(x[row, :n], ids[row, :n]) and (x[row, n:] == -1).all()
    assert torch.equal(T.masked_answer_canvas(ids, prompt_len, torch.zeros(3), torch.rand(3, 10), -1), ids)


def test_prompted_prior_recovers_its_programs_registers_better_than_the_unconditional(run, tmp_path):
    """Tiny overfit case: 8 programs; the prompted prior samples z_0 given each program's own prompt, the
    unconditional prior (same DiT size, same steps) samples blindly. Cosine to the program's own registers."""
    T.main(argv(run, tmp_path / "p", "--steps", "150", "--lr", "3e-3", "--warmup-steps", "10", "--ema-decay", "0.9",
           "--xt-drop", "1", "--target", "answer", "--demasker-steps", "1"))  # the answer's registers: a fine-tuned f
    pprior = PR.load_prompted_prior(tmp_path / "p")
    tokenizer = run["tokenizer"]
    batch = P.encode_pairs(P.load_pairs(run["pairs"], "train"), tokenizer, 64)
    encoder = Encoder.from_pretrained(str(run["ae"] / "encoder")).eval()
    z0 = T.bank(encoder, *batch["answer"], K)  # (8, K, d) the targets
    g = torch.Generator().manual_seed(1)
    prompted, _ = PR.prompt_registers(pprior, *batch["prompt"], steps=20, generator=g)
    torch.manual_seed(0)
    dit = LatentDiT(DiTConfig.tiny(register_dim=D, num_registers=K))
    optimizer = torch.optim.AdamW(dit.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(150):  # Alg. 5 on the same banks, the same budget
        sg = torch.Generator().manual_seed(step)
        t = torch.rand(8, 1, generator=sg).expand(8, K)
        loss = prior_loss(dit, z0, t, torch.randn(z0.shape, generator=sg))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    blind, _ = G.sample_registers(G.Prior(dit.eval(), K), 8, 20, generator=torch.Generator().manual_seed(1))
    own = F.cosine_similarity(prompted, z0, dim=-1).mean()
    unconditional = F.cosine_similarity(blind, z0, dim=-1).mean()
    assert own > unconditional + 0.1, (own, unconditional)
    shuffled, _ = PR.prompt_registers(pprior, *(t.roll(1, 0) for t in batch["prompt"]), steps=20,
                                      generator=torch.Generator().manual_seed(1))
    assert own > F.cosine_similarity(shuffled, z0, dim=-1).mean()  # another program's prompt: worse
    log = [json.loads(line) for line in (tmp_path / "p" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["type"] == "prior"]
    assert losses[-1] < losses[0]


def test_run_folder_feeds_the_prompted_generators_and_finetunes_the_demasker(run, tmp_path):
    T.main(argv(run, tmp_path / "p", "--steps", "3", "--demasker-steps", "3", "--freeze-kappa", "--target", "program",
                "--kappa-registers", "2"))
    out = tmp_path / "p"
    settings = json.loads((out / "prompted.json").read_text())
    assert settings["target"] == "program" and settings["freeze_kappa"] and settings["kappa_registers"] == 2
    before = Encoder.from_pretrained(str(run["ae"] / "encoder"), num_registers=2).state_dict()
    after = Encoder.from_pretrained(str(out / "kappa")).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # --freeze-kappa: h_kappa = h_phi
    for name in ("demasker", "encoder", "tokenizer.json"):
        assert (out / "ae" / name).exists()
    tuned = Demasker.from_pretrained(str(out / "ae" / "demasker")).state_dict()
    original = Demasker.from_pretrained(str(run["ae"] / "demasker")).state_dict()
    assert any(not torch.equal(tuned[k], original[k]) for k in tuned)
    pprior = PR.load_prompted_prior(out)
    demasker = Demasker.from_pretrained(str(out / "ae" / "demasker")).eval()
    tokenizer = run["tokenizer"]
    canvas, n = P.prompt_canvas('def f(x):\n    """Multiply x by 3 and add 4."""', tokenizer, 40, tokenizer.mask_id)
    prompt_ids, prompt_mask = P.encoder_rows(['def f(x):\n    """Multiply x by 3 and add 4."""'], tokenizer, 64, True)
    tokens, report = PR.conwithindisc_prompted(demasker, pprior, canvas[None], prompt_ids, prompt_mask, steps=8,
                                               prior_steps=3, refresh_prior_steps=2)
    assert torch.equal(tokens[0, :n], canvas[:n]) and report["encoder_calls"] == 1
    assert math.isfinite(report["nfe"])


def test_an_existing_run_is_refused_unless_overwrite(run, tmp_path, capsys):
    out = tmp_path / "p"
    T.main(argv(run, out, "--steps", "2", "--demasker-steps", "1"))
    before = (out / "dit" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a run.*--overwrite"):
        T.main(argv(run, out, "--steps", "2", "--seed", "1"))
    assert (out / "dit" / "model.safetensors").read_bytes() == before and (out / "ae").is_dir()  # untouched
    T.main(argv(run, out, "--steps", "2", "--seed", "1", "--overwrite"))
    assert (out / "dit" / "model.safetensors").read_bytes() != before
    assert not (out / "ae").exists()  # the old run's fine-tuned demasker is not this run's
    assert (out / "prompted.json").is_file() and not list(out.glob(".stage-*")) and [p.name for p in tmp_path.glob(".*")] == [".p.lock"]
    PR.load_prompted_prior(out)


@pytest.mark.parametrize("flags, text", [(["--xt-drop", "2"], "--xt-drop"), (["--steps", "0"], "--steps"),
                                         (["--num-registers", "9"], "K=4")])
def test_numbers_are_checked_with_the_flag_named(run, tmp_path, capsys, flags, text):
    with pytest.raises(SystemExit) as stop:
        T.main(argv(run, tmp_path / "p", *flags))
    assert text in capsys.readouterr().err + str(stop.value)
    assert not (tmp_path / "p" / "prompted.json").exists()


def test_the_default_pair_is_consistent_and_a_mismatch_is_refused_with_the_fix(run, tmp_path, capsys):
    """The AE's own demasker (--demasker-steps 0) reads h_phi of whole programs: the default prior samples those;
    the answer's registers need a demasker fine-tuned on them, and --guide may not differ from --target."""
    args = T.parse_args(argv(run, tmp_path / "p"))
    assert (args.target, args.guide, args.demasker_steps) == ("program", "program", 0)
    assert T.parse_args(argv(run, tmp_path / "p", "--target", "answer", "--demasker-steps", "2")).guide == "answer"
    for flags, fix in ((["--target", "answer"], "pass --target program"),
                       (["--guide", "answer"], "drop --guide"),
                       (["--target", "answer", "--demasker-steps", "2", "--guide", "program"], "drop --guide")):
        with pytest.raises(SystemExit) as stop:
            T.main(argv(run, tmp_path / "p", *flags))
        assert stop.value.code == 2 and fix in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_the_record_pairs_the_prior_with_its_encoder_and_demasker(run, tmp_path):
    """prompted.json carries the target, the demasker it pairs with and the AE encoder's fingerprint; loading
    checks them against the run that decodes."""
    from dataprep.latent_data import encoder_fingerprint
    out = tmp_path / "p"
    T.main(argv(run, out, "--steps", "2", "--target", "answer", "--demasker-steps", "1"))
    settings = json.loads((out / "prompted.json").read_text())
    assert (settings["target"], settings["guide"], settings["demasker"]) == ("answer", "answer", "ae")
    assert settings["encoder_fingerprint"] == encoder_fingerprint(run["ae"] / "encoder")
    assert PR.load_prompted_prior(out).target == PR.load_prompted_prior(out, ae=out / "ae").target == "answer"
    with pytest.raises(ValueError, match="guided by the registers of the program"):
        PR.load_prompted_prior(out, ae=run["ae"])  # the AE's own demasker: trained on whole programs


# ------------------------------------------------------------------------------------------------
# --resume, torchrun, two tokenizers
# ------------------------------------------------------------------------------------------------


def weights(folder):
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def records(folder):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (folder / "log.jsonl").read_text().splitlines()]


def test_resume_is_bit_exact_in_either_phase(run, tmp_path):
    """4 prior + 3 demasker steps straight == stopped at step 2 (the prior), resumed to step 6 (the demasker's
    second), resumed to the end: every weight, EMA and log record identical."""
    common = ("--steps", "4", "--demasker-steps", "3", "--warmup-steps", "1", "--log-interval", "1",
              "--save-interval", "100")
    straight, split = tmp_path / "straight", tmp_path / "split"
    T.main(argv(run, straight, *common))
    T.main(argv(run, split, *common, "--stop-at", "2"))
    assert not (split / "prompted.json").exists() and not (split / "dit").exists()
    with pytest.raises(FileNotFoundError, match="--resume"):
        PR.load_prompted_prior(split)
    T.main(argv(run, split, *common, "--resume", "--stop-at", "6"))
    assert (split / "demasker_state").is_dir() and not (split / "prompted.json").exists()
    T.main(["--ae", str(run["ae"]), "--pairs", str(run["pairs"]), "--out-dir", str(split), "--resume"])  # its flags
    for part in ("dit", "kappa", "ae/demasker", "train_state/dit", "train_state/kappa", "demasker_state"):
        assert same_weights(straight / part, split / part), part
    assert records(straight) == records(split)
    assert [r["step"] for r in records(split) if r["type"] == "demasker"] == [1, 2, 3]
    with pytest.raises(FileExistsError, match="--resume"):
        T.main(argv(run, straight, *common))


def test_resume_refuses_changed_flags_and_another_autoencoder(run, tmp_path, capsys):
    out = tmp_path / "p"
    T.main(argv(run, out, "--steps", "3", "--stop-at", "1", "--lr", "2e-3"))
    with pytest.raises(SystemExit) as stop:
        T.main(argv(run, out, "--resume", "--lr", "1e-2"))
    assert stop.value.code == 2 and "--lr: run 0.002, now 0.01" in capsys.readouterr().err
    other = copy_with_other_encoder(run["ae"], tmp_path / "other")
    before = (out / "args.json").read_text()
    with pytest.raises(ValueError, match="encoder of --ae .* differ from the ones the run .* was trained on"):
        T.main(["--ae", str(other), "--pairs", str(run["pairs"]), "--out-dir", str(out), "--resume"])
    assert (out / "args.json").read_text() == before  # refused before anything is written
    T.main(["--ae", str(run["ae"]), "--pairs", str(run["pairs"]), "--out-dir", str(out), "--resume"])
    assert json.loads((out / "args.json").read_text())["lr"] == 2e-3 and (out / "prompted.json").is_file()


def _rank_main(rank, world_size, port, args):
    """One torchrun-like rank (gloo) running experiments/train_prompted.main."""
    import os
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    T.main(args)


def test_two_ranks_match_one_process(run, tmp_path):
    """The same script under torchrun: 2 gloo ranks, DDP, each rank half of every global batch, end with the
    one-process weights (prior, h_kappa and the fine-tuned demasker) and losses."""
    import socket

    import torch.multiprocessing as mp
    flags = ("--steps", "3", "--demasker-steps", "2", "--warmup-steps", "1", "--log-interval", "1", "--device", "cpu")
    T.main(argv(run, tmp_path / "one", *flags))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, argv(run, tmp_path / "two", *flags)), nprocs=2, join=True)
    for part in ("dit", "kappa", "ae/demasker"):
        one, two = weights(tmp_path / "one" / part), weights(tmp_path / "two" / part)
        assert one.keys() == two.keys()
        worst = max((one[k] - two[k]).abs().max().item() for k in one)
        assert worst < 1e-5, (part, worst)
    losses = lambda folder: [r["loss"] for r in records(folder) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    PR.load_prompted_prior(tmp_path / "two")


@pytest.fixture(scope="module")
def two_tokenizers(run, tmp_path_factory):
    """The AE of `run` with an encoder of its own tokenizer (a smaller BPE: demasker ids would not even fit it)."""
    root = tmp_path_factory.mktemp("two")
    own = train_tokenizer([p.program for p in P.load_pairs(run["pairs"], "train")] * 3, vocab_size=270)
    ae = root / "ae"
    Demasker.from_pretrained(str(run["ae"] / "demasker")).save_pretrained(ae / "demasker")
    run["tokenizer"].save(str(ae / "tokenizer.json"))
    own.save(str(ae / "encoder_tokenizer.json"))
    torch.manual_seed(1)
    encoder = Encoder(EncoderConfig.tiny(vocab_size=own.vocab_size, hidden_size=D, num_registers=K,
                                         pad_token_id=own.pad_id, eos_token_id=own.eos_id))
    encoder.save_pretrained(ae / "encoder")
    return {"ae": ae, "encoder_tokenizer": own}


def test_two_tokenizers_encoder_reads_its_own_tokens(run, two_tokenizers, tmp_path):
    """With the encoder's own tokenizer, h_phi and h_kappa read encoder tokens and h(x^(r)) the cross-tokenizer
    view of the demasker canvas; the record carries the view and the prompted generators use it."""
    from dataprep.cross_tokenizer import CrossTokenizerView
    out = tmp_path / "p"
    T.main(["--ae", str(two_tokenizers["ae"]), "--pairs", str(run["pairs"]), "--out-dir", str(out), "--seq-len", "64",
            "--num-registers", str(K), "--batch-size", "8", "--steps", "2", "--xt-drop", "0", "--target", "answer",
            "--demasker-steps", "1"])
    settings = json.loads((out / "prompted.json").read_text())
    assert not settings["shared_tokenizer"] and settings["cross_tokenizer"]["slots_per_token"] > 0
    assert (out / "ae" / "encoder_tokenizer.json").is_file()
    with pytest.raises(ValueError, match="prompt_rows"):  # demasker-token prompts would be silently wrong
        PR.load_prompted_prior(out)
    pprior = PR.load_prompted_prior(out, encoder_prompts=True)
    assert isinstance(pprior.prior.view, CrossTokenizerView)
    tokenizer, own = run["tokenizer"], two_tokenizers["encoder_tokenizer"]
    prompt = 'def f(x):\n    """Multiply x by 3 and add 4."""'
    prompt_ids, prompt_mask = PR.prompt_rows(pprior, [prompt], tokenizer)
    assert prompt_ids[0, :int(prompt_mask.sum())].tolist() == own.encode(prompt) + [own.eos_id]
    views = []
    real = pprior.prior.view
    pprior.prior.view = lambda ids, masked, length=None: views.append(1) or real(ids, masked, length)
    canvas, n = P.prompt_canvas(prompt, tokenizer, 40, tokenizer.mask_id)
    demasker = Demasker.from_pretrained(str(out / "ae" / "demasker")).eval()
    tokens, report = PR.conwithindisc_prompted(demasker, pprior, canvas[None], prompt_ids, prompt_mask, steps=6,
                                               prior_steps=2, refresh_prior_steps=2)
    assert views == [1] and report["encoder_calls"] == 1 and torch.equal(tokens[0, :n], canvas[:n])
