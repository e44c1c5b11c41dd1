"""train_ae.py: Alg. 1's random corruption (latent noise, nested dropout, all-mask), staged training, exact
resume, and the paper's core claim in miniature (guided autoencoding reconstructs what the base MDM cannot).

Training tests run the real `train(parse_args([...]))` on a dataprep/data.py cache built from a handful of tiny
programs (JSONL corpus, BPE of 320 tokens, L = 32), so they exercise the whole script in seconds.
"""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from infra import checkpoint as C
from dataprep import data
from infra import guards
import train_ae as T
from infra.checkpoint import read_safetensors
from encoder import Encoder
from sample import autoencode, cer, decode_programs, generate

SEQ_LEN = 32
NAMES = ["add", "scale", "shift", "mix", "blend", "clip", "pad", "wrap", "fold", "push", "pull", "spin",
         "grow", "trim", "join", "split", "merge", "swap", "tilt", "zoom"]
OPS = ["+", "-", "*", "//"]


def tiny_programs(count=11):
    """Distinct two-line functions, ~40 characters each."""
    programs = []
    for i in range(count):
        a, b = "xyzuvw"[i % 6], "pqrst"[i % 5]
        programs.append(f"def {NAMES[i]}({a}, {b}):\n    return {a} {OPS[i % 4]} {b} * {i + 2}")
    return programs




@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A dataprep/data.py cache of tiny_programs(): prog_4 and prog_10 land in val (data.split_of), 9 in train."""
    folder = tmp_path_factory.mktemp("data")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text, "path": f"prog_{i}.py"}) + "\n"
                              for i, text in enumerate(tiny_programs())))
    data.build_dataset(folder / "cache", corpus, seq_len=SEQ_LEN, vocab_size=320, overlong="drop")
    return folder / "cache"


def run_args(cache, out_dir, *extra):
    return T.parse_args(["--data", str(cache), "--seq-len", str(SEQ_LEN), "--out-dir", str(out_dir),
                         "--num-registers", "4", "--global-batch-size", "8", "--micro-batch-size", "4",
                         "--warmup-steps", "2", "--eval-interval", "0", "--log-interval", "1", *extra])


def initial_model(args, cache):
    """The EncoderDemasker train() starts from (same seed, same build; shared tokenizer)."""
    meta = data.load_meta(cache)
    vocab = {"vocab_size": meta["vocab_size"], "pad_id": meta["eos_id"], "eos_id": meta["eos_id"],
             "mask_id": meta["mask_id"]}
    torch.manual_seed(args.seed)
    return T.EncoderDemasker(*T.build_models(args, meta, vocab))


def weights(folder):
    return {**{f"encoder.{k}": v for k, v in read_safetensors(folder / "encoder").items()},
            **{f"demasker.{k}": v for k, v in read_safetensors(folder / "demasker").items()}}


# Alg. 1 lines 2-5 (corruption.py): tests/test_corruption.py


def test_rewarm_when_the_demasker_unfreezes(cache, tmp_path):
    """--rewarm-steps N: after W warm-up steps the LR restarts linearly over N steps, then follows the schedule."""
    plain = run_args(cache, tmp_path, "--lr", "1e-2", "--warmup-steps", "2", "--encoder-warmup-steps", "5")
    args = run_args(cache, tmp_path, "--lr", "1e-2", "--warmup-steps", "2", "--encoder-warmup-steps", "5",
                    "--rewarm-steps", "3")
    lrs, ref = [T.get_lr(s, args, 20) for s in range(20)], [T.get_lr(s, plain, 20) for s in range(20)]
    assert lrs[:5] == ref[:5] and lrs[8:] == ref[8:]
    assert [lrs[s] / ref[s] for s in (5, 6, 7)] == pytest.approx([0.25, 0.5, 0.75])
    assert T.parse_args(["--preset", "paper", "--demasker-init", "GSAI-ML/LLaDA-8B-Base"]).rewarm_steps == 500
    assert T.parse_args([]).rewarm_steps == 0


def test_new_conditioning_is_initialised_at_the_token_embeddings_rms(cache, tmp_path):
    """A register of norm sqrt(d) projects to the RMS of the token embeddings (and START/END too)."""
    model = initial_model(run_args(cache, tmp_path), cache)
    dem = model.demasker
    target = dem.wte.weight.pow(2).mean().sqrt()
    z = torch.nn.functional.normalize(torch.randn(256, dem.cfg.register_dim), dim=-1) * math.sqrt(dem.cfg.register_dim)
    projected = dem.register_proj(z).pow(2).mean().sqrt()
    assert projected.item() == pytest.approx(target.item(), rel=0.05)
    for vector in (dem.start_embedding, dem.end_embedding):
        assert vector.pow(2).mean().sqrt().item() == pytest.approx(target.item(), rel=1e-4)


def test_lr_schedule_and_weight_decay_groups(cache, tmp_path):
    args = run_args(cache, tmp_path, "--lr", "1e-2", "--warmup-steps", "10", "--min-lr-ratio", "0.1")
    lrs = [T.get_lr(s, args, 110) for s in range(111)]
    assert lrs[0] == pytest.approx(1e-2 / 11) and max(lrs) == pytest.approx(1e-2, rel=1e-3)
    assert lrs[110] == pytest.approx(1e-3) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    model = initial_model(args, cache)
    decay, no_decay = T.make_optimizer(model, args).param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ------------------------------------------------------------------------------------------------
# The training script
# ------------------------------------------------------------------------------------------------

CONDITIONING = ("demasker.register_proj.weight", "demasker.start_embedding", "demasker.end_embedding")


def test_staged_training_freezes_the_demasker_then_unfreezes(cache, tmp_path):
    """App. C: steps 1-3 update h_phi and the new conditioning interface (projection, START, END) only, the
    demasker's other weights stay at their initial values; after --resume, steps 4-5 update everything."""
    args = run_args(cache, tmp_path / "run", "--max-steps", "5", "--encoder-warmup-steps", "3", "--stop-at", "3")
    initial = initial_model(args, cache).state_dict()
    T.train(args)
    warm = weights(tmp_path / "run" / "checkpoint")
    for name, value in warm.items():
        if name in CONDITIONING:
            assert not torch.equal(value, initial[name]), f"{name} did not train during the encoder warm-up"
        elif name.startswith("demasker."):
            assert torch.equal(value, initial[name]), f"{name} changed while the demasker was frozen"
    assert all(not torch.equal(v, initial[n]) for n, v in warm.items() if n.startswith("encoder.blocks"))
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["demasker_frozen"] for r in log] == [True, True, True]

    T.train(run_args(cache, tmp_path / "run", "--max-steps", "5", "--encoder-warmup-steps", "3", "--resume"))
    joint = weights(tmp_path / "run" / "checkpoint")
    assert not torch.equal(joint["demasker.blocks.0.attn.q_proj.weight"], initial["demasker.blocks.0.attn.q_proj.weight"])
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5] and [r["demasker_frozen"] for r in log][3:] == [False, False]


def test_guided_demasker_starts_from_a_trained_base_mdm(cache, tmp_path):
    """Sec. 5 "building on the above as a baseline": --from-base <base run> (= --demasker-init <base>/checkpoint)
    loads the base MDM's weights and adds new conditioning parameters; during the warm-up (2 steps) the base
    weights stay put while the projection, START and END get gradients and change."""
    T.train(run_args(cache, tmp_path / "base", "--max-steps", "2", "--no-registers"))
    args = run_args(cache, tmp_path / "guided", "--max-steps", "2", "--encoder-warmup-steps", "2",
                    "--from-base", str(tmp_path / "base"))
    assert args.demasker_init == str(tmp_path / "base" / "checkpoint")
    start = initial_model(args, cache).state_dict()
    T.train(args)
    base = read_safetensors(tmp_path / "base" / "checkpoint" / "demasker")
    guided = read_safetensors(tmp_path / "guided" / "checkpoint" / "demasker")
    assert sorted(set(guided) - set(base)) == ["end_embedding", "register_proj.weight", "start_embedding"]
    for name, value in base.items():
        assert torch.equal(guided[name], value), name
    for name in CONDITIONING:
        assert not torch.equal(guided[name[len("demasker."):]], start[name]), f"{name} did not train"
    # what gets gradients in a warm-up step: exactly the encoder and the conditioning interface
    model = initial_model(args, cache)
    T.set_demasker_trainable(model, False)
    batch = data.TokenData(cache, "train").batch(np.arange(4))
    noisy = T.corrupt(batch["ids"], [0, 1, 2, 3], 0, model.demasker.cfg.mask_token_id, 0.25, 4, True, 64, 0.75)
    logits = model(noisy["x_t"], batch["encoder_ids"], batch["encoder_mask"], noisy["keep"], noisy["noise"])
    logits.float().logsumexp(-1).mean().backward()
    graded = {name for name, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
    assert set(CONDITIONING) <= graded
    assert not any(name.startswith("demasker.") and name not in CONDITIONING for name in graded)
    assert any(name.startswith("encoder.") for name in graded)
    config = json.loads((tmp_path / "guided" / "checkpoint" / "demasker" / "config.json").read_text())
    assert config["register_dim"] == 64 and config["max_registers"] == 4


@pytest.mark.parametrize("no_registers", [False, True])
def test_resume_continues_exactly(cache, tmp_path, no_registers):
    """6 steps in one go == 3 steps, stop, --resume for 3 more: identical weights and AdamW state (bitwise)."""
    flags = ["--max-steps", "6", "--eval-interval", "3", "--val-programs", "2"] + (["--no-registers"] if no_registers else [])
    T.train(run_args(cache, tmp_path / "once", *flags))
    T.train(run_args(cache, tmp_path / "split", *flags, "--stop-at", "3"))
    T.train(run_args(cache, tmp_path / "split", *flags, "--resume"))
    parts = ["demasker"] + ([] if no_registers else ["encoder"])
    for part in parts:
        once = read_safetensors(tmp_path / "once" / "checkpoint" / part)
        split = read_safetensors(tmp_path / "split" / "checkpoint" / part)
        assert once.keys() == split.keys()
        for name in once:
            assert torch.equal(once[name], split[name]), f"{part}.{name} differs after resume"
    states = [torch.load(tmp_path / run / "checkpoint" / "training_state.pt", weights_only=True) for run in ("once", "split")]
    assert states[0]["extra"]["step"] == states[1]["extra"]["step"] == 6
    for name, moments in states[0]["optimizer"]["state"].items():
        assert torch.equal(moments["exp_avg_sq"], states[1]["optimizer"]["state"][name]["exp_avg_sq"])
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("once", "split")]
    assert logs[0] == logs[1] or [r.get("loss") for r in logs[0]] == [r.get("loss") for r in logs[1]]
    assert sorted((tmp_path / "split" / "checkpoint").iterdir()) == sorted(
        tmp_path / "split" / "checkpoint" / name for name in parts + ["args.json", "progress.json", "tokenizer.json", "training_state.pt"])
    val = [r for r in logs[0] if r["type"] == "val"]
    assert [r["step"] for r in val] == [3, 6] and len(val[0]["results"]) == 1


def test_resume_refuses_changed_flags_and_keeps_the_runs_values(cache, tmp_path, capsys):
    """On --resume, unset flags take the run's values; a changed model/data/objective flag is refused
    (exit 2) with every difference listed (run vs now); --max-steps and logging may change."""
    T.train(run_args(cache, tmp_path, "--max-steps", "1", "--lr", "1e-2"))
    resumed = T.parse_args(["--out-dir", str(tmp_path), "--resume", "--max-steps", "2", "--log-interval", "5"])
    assert (resumed.lr, resumed.num_registers, resumed.data, resumed.max_steps) == (1e-2, 4, str(cache), 2)
    with pytest.raises(SystemExit) as exit_info:
        run_args(cache, tmp_path, "--max-steps", "2", "--resume", "--seed", "1", "--lr", "1e-2",
                 "--num-registers", "6", "--encoder-width", "32", "--latent-cos", "0.9")
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    for line in ("--seed: run 0, now 1", "--num-registers: run 4, now 6", "--encoder-width: run None, now 32",
                 "--latent-cos: run 0.8, now 0.9", "another --out-dir"):
        assert line in message, message
    assert "--lr:" not in message and "--max-steps" in message.split("may change")[1]
    T.train(resumed)
    recorded = json.loads((tmp_path / "args.json").read_text())
    assert recorded["max_steps"] == 2 and recorded["lr"] == 1e-2  # args.json = what the run really uses
    with pytest.raises(FileNotFoundError, match="--resume"):
        T.train(run_args(cache, tmp_path / "nothing", "--max-steps", "2", "--resume"))


def test_resume_refuses_a_data_cache_with_another_tokenizer(cache, tmp_path):
    other = tmp_path / "other"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text, "path": f"prog_{i}.py"}) + "\n"
                              for i, text in enumerate(tiny_programs())))
    data.build_dataset(other, corpus, seq_len=SEQ_LEN, vocab_size=300, overlong="drop")
    T.train(run_args(cache, tmp_path / "run", "--max-steps", "1"))
    with pytest.raises(ValueError, match="is not the tokenizer the run") as error:
        T.train(run_args(other, tmp_path / "run", "--max-steps", "2", "--resume"))
    assert str(other / "tokenizer.json") in str(error.value) and "checkpoint/tokenizer.json" in str(error.value)


def test_a_missing_data_folder_is_an_error_not_a_rebuild(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished dataprep/data.py cache"):
        T.train(run_args(tmp_path / "absent", tmp_path / "run", "--max-steps", "1"))
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("flags, text", [
    (["--max-steps", "0"], "--max-steps must be an integer >= 1, got 0"),
    (["--global-batch-size", "0"], "--global-batch-size must be an integer >= 1"),
    (["--micro-batch-size", "-2"], "--micro-batch-size must be an integer >= 1"),
    (["--vocab-size", "-1"], "--vocab-size must be an integer >= 5"),
    (["--seq-len", "2"], "--seq-len must be an integer >= 3"),
    (["--lr", "0"], "--lr must be a number > 0"),
    (["--val-keep", "1,5"], "--val-keep must be an integer in [1, 4], got 5"),
    (["--latent-cos", "0"], "--latent-cos must be a number in (0, 1]"),
    (["--all-mask-prob", "1.5"], "--all-mask-prob must be a number in [0, 1]"),
    (["--num-registers", "0"], "--num-registers must be an integer >= 1"),
    (["--encoder-width", "40"], "--encoder-width must be 16 or a multiple of 32"),
    (["--max-bad-steps", "0"], "--max-bad-steps must be an integer >= 1"),
])
def test_numbers_are_checked_up_front(cache, tmp_path, capsys, flags, text):
    with pytest.raises(SystemExit) as exit_info:
        run_args(cache, tmp_path, "--max-steps", "3", *flags)
    assert exit_info.value.code == 2 and text in capsys.readouterr().err


def test_non_finite_steps_are_skipped_then_the_run_stops(cache, tmp_path, monkeypatch):
    """A NaN loss from step 4 on never reaches weights, AdamW state or a checkpoint: steps 4-6 are skipped
    and the end-of-run checkpoint equals a clean run stopped at step 3; with --max-bad-steps 2 the run stops at
    step 5 with an error naming the last good checkpoint (step 2), which is left bit-identical."""
    flags = ["--max-steps", "6", "--save-interval", "2"]
    T.train(run_args(cache, tmp_path / "clean", *flags, "--stop-at", "3"))
    T.train(run_args(cache, tmp_path / "clean2", *flags, "--stop-at", "2"))
    real, calls = T.masked_diffusion_loss, []

    def poisoned(*a, **k):  # 2 micro-batches per step: calls 7.. are steps 4..
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) > 6 else 1.0)

    monkeypatch.setattr(T, "masked_diffusion_loss", poisoned)
    T.train(run_args(cache, tmp_path / "skip", *flags, "--max-bad-steps", "5"))
    log = [json.loads(line) for line in open(tmp_path / "skip" / "log.jsonl")]
    assert [r["step"] for r in log if r["type"] == "skipped"] == [4, 5, 6]
    assert log[-1]["skipped_total"] == 3 and log[-1]["loss"] == "nan"
    state = lambda run: torch.load(tmp_path / run / "checkpoint" / "training_state.pt", weights_only=True)["optimizer"]
    for name, value in weights(tmp_path / "clean" / "checkpoint").items():
        assert torch.equal(value, weights(tmp_path / "skip" / "checkpoint")[name]), name
    for name, moments in state("clean")["state"].items():
        assert torch.equal(moments["exp_avg"], state("skip")["state"][name]["exp_avg"])

    calls.clear()
    with pytest.raises(guards.NonFiniteError, match=r"step 5: .*2 consecutive.*checkpoint \(step 2\), untouched"):
        T.train(run_args(cache, tmp_path / "stop", *flags, "--max-bad-steps", "2"))
    kept = weights(tmp_path / "stop" / "checkpoint")
    assert all(torch.isfinite(v).all() for v in kept.values())
    for name, value in weights(tmp_path / "clean2" / "checkpoint").items():
        assert torch.equal(value, kept[name]), name
    assert json.loads((tmp_path / "stop" / "checkpoint" / "progress.json").read_text())["step"] == 2


def test_lr_1e6_diverges_into_a_clear_error(cache, tmp_path):
    with pytest.raises(guards.NonFiniteError, match="consecutive non-finite steps"):
        T.train(run_args(cache, tmp_path, "--max-steps", "40", "--lr", "1e6", "--warmup-steps", "0",
                         "--save-interval", "1", "--max-bad-steps", "2"))
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "checkpoint").values())


def test_a_kill_at_any_point_of_a_save_leaves_a_checkpoint_resume_finds(cache, tmp_path, monkeypatch):
    """The run folder as a kill -9 would leave it at every named point of the step-2 save (snapshots taken
    by a checkpoint.FAULT_HOOKS hook) resumes by itself into the uninterrupted run, bit for bit, and the save
    after resuming removes every stray staging / old folder."""
    flags = ["--max-steps", "3", "--save-interval", "1"]
    T.train(run_args(cache, tmp_path / "once", *flags))
    snapshots, saves = [], []
    run_dir = tmp_path / "run"

    def snapshot(point, folder):  # a save swaps each part folder, stage/checkpoint, then run/checkpoint
        if len(saves) == 1 and (folder == run_dir / "checkpoint" or (point == "staged" and folder.name == "checkpoint")):
            target = tmp_path / f"kill-{len(snapshots)}-{point}"
            shutil.copytree(run_dir, target, symlinks=True)
            snapshots.append(target)
        if point == "cleaned" and folder == run_dir / "checkpoint":
            saves.append(1)

    monkeypatch.setattr(C, "FAULT_HOOKS", [snapshot])
    T.train(run_args(cache, run_dir, *flags, "--stop-at", "2"))
    monkeypatch.setattr(C, "FAULT_HOOKS", [])
    points = [path.name.split("-")[-1] for path in snapshots]
    assert points == ["staged", "staged", "old_moved", "new_moved", "cleaned"], points
    assert not (snapshots[2] / "checkpoint").exists()  # the instant with no live checkpoint
    once = weights(tmp_path / "once" / "checkpoint")
    for folder in snapshots:
        T.train(run_args(cache, folder, *flags, "--resume"))
        resumed = weights(folder / "checkpoint")
        for name in once:
            assert torch.equal(once[name], resumed[name]), (folder.name, name)
        assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == [], folder.name


def test_guided_autoencoder_reconstructs_what_the_base_mdm_cannot(cache, tmp_path):
    """The core claim in miniature: after overfitting the 9 training programs, h_phi + guided f_theta rebuild
    each of them from an all-[M] start with 1 token per step (CER < 0.05); the base MDM trained the same
    way decodes the same all-[M] input for every program, so its CER stays high. Robust latent noise on;
    nested dropout off (it slows memorisation ~2x; App. C: it mostly matters for the prior, not for AE)."""
    flags = ["--max-steps", "200", "--lr", "3e-3", "--warmup-steps", "20", "--micro-batch-size", "8",
             "--no-nested-dropout", "--save-interval", "1000"]
    guided = T.train(run_args(cache, tmp_path / "guided", *flags)).eval()
    base = T.train(run_args(cache, tmp_path / "base", *flags, "--no-registers")).eval()
    train = data.TokenData(cache, "train")
    tokenizer = data.load_tokenizer(cache / "tokenizer.json")
    batch = train.batch(np.arange(len(train)))
    cfg = guided.demasker.cfg

    def mean_cer(tokens):
        texts = decode_programs(tokenizer, tokens, cfg.eos_token_id, cfg.bos_token_id)
        return float(np.mean([cer(source, text) for source, text in zip(sources, texts)]))

    sources = decode_programs(tokenizer, batch["ids"], cfg.eos_token_id, cfg.bos_token_id)
    assert len(set(sources)) == len(sources) == 9
    tokens, nfe = autoencode(guided.encoder, guided.demasker, batch["encoder_ids"], batch["encoder_mask"], SEQ_LEN)
    assert nfe == SEQ_LEN  # one token per step
    guided_cer = mean_cer(tokens)
    base_cer = mean_cer(generate(base.demasker, len(sources), SEQ_LEN, SEQ_LEN, SEQ_LEN)[0])
    assert guided_cer < 0.05, guided_cer
    assert base_cer > 0.3 and base_cer > 5 * guided_cer, (base_cer, guided_cer)


# ------------------------------------------------------------------------------------------------
# The same script on 2 gloo processes (what torchrun would start) against one process
# ------------------------------------------------------------------------------------------------

def _rank_main(rank, world_size, port, argv):
    """One rank: the environment torchrun sets, then train_ae.train (one run per spawn: a process group is
    set up and torn down once per process, as under torchrun)."""
    import os
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    T.train(T.parse_args(argv))


def _free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _argv(cache, out_dir, *extra):
    return ["--data", str(cache), "--seq-len", str(SEQ_LEN), "--out-dir", str(out_dir), "--num-registers", "4",
            "--global-batch-size", "8", "--micro-batch-size", "4", "--warmup-steps", "2", "--eval-interval", "4",
            "--val-programs", "2", "--log-interval", "1", "--max-steps", "4", "--device", "cpu", *extra]


def test_two_ranks_match_one_process_and_resume_on_one(cache, tmp_path):
    """2 gloo ranks (DDP: 4 micro-batches of 4 = 1 per rank; 1 process: 2 accumulated micro-batches)
    give the 1-process weights; FSDP2 the same losses; a run saved on 2 ranks at step 2 resumes on 1 process
    into the 1-process run; the rank-averaged validation equals the single-process one."""
    import torch.multiprocessing as mp
    runs = [_argv(cache, tmp_path / "ddp", "--parallel", "ddp"),
            _argv(cache, tmp_path / "split", "--parallel", "ddp", "--stop-at", "2"),
            _argv(cache, tmp_path / "fsdp", "--parallel", "fsdp")]
    for argv in runs:
        mp.spawn(_rank_main, args=(2, _free_port(), argv), nprocs=2, join=True)
    T.train(T.parse_args(_argv(cache, tmp_path / "one")))
    T.train(T.parse_args(_argv(cache, tmp_path / "split", "--resume")))

    one, initial = weights(tmp_path / "one" / "checkpoint"), initial_model(T.parse_args(_argv(cache, tmp_path)), cache)
    update = max((one[n] - p).abs().max().item() for n, p in initial.state_dict().items())
    assert update > 1e-3  # the runs moved the weights, so the comparisons below mean something
    for run in ("ddp", "split", "fsdp"):
        other = weights(tmp_path / run / "checkpoint")
        assert other.keys() == one.keys()
        worst = max((other[n] - one[n]).abs().max().item() for n in one)
        assert worst < 1e-3 * update + 1e-6, (run, worst, update)
    logs = {run: [json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("one", "ddp", "fsdp")}
    for run in ("ddp", "fsdp"):
        train_losses = [r["loss"] for r in logs[run] if r["type"] == "train"]
        assert train_losses == pytest.approx([r["loss"] for r in logs["one"] if r["type"] == "train"], rel=1e-5)
        val, val_one = [r for r in logs[run] if r["type"] == "val"][-1], [r for r in logs["one"] if r["type"] == "val"][-1]
        assert val["results"]["k=4"]["ce"] == pytest.approx(val_one["results"]["k=4"]["ce"], rel=1e-4)


# ------------------------------------------------------------------------------------------------
# The paper preset (App. C), register dropout (the null bank of register guidance), hub model cards
# ------------------------------------------------------------------------------------------------

def test_paper_preset_no_registers_parses_and_builds_the_8b_base_on_meta(monkeypatch, capsys):
    """`--preset paper --no-registers` used to stop on the preset's encoder; now it is the base MDM fine-tuned from
    LLaDA-8B-Base (no encoder, no all-mask), and the models build (meta device: nothing allocated). The guided
    paper run must start from a base run (--from-base) or say so explicitly."""
    from demasker import Demasker, DemaskerConfig
    from encoder import EncoderConfig as EC

    args = T.parse_args(["--preset", "paper", "--no-registers"])
    assert args.encoder_init is None and args.demasker_init == "GSAI-ML/LLaDA-8B-Base" and args.all_mask_prob == 0
    assert (args.lr, args.global_batch_size, args.epochs, args.seq_len) == (2.5e-5, 512, 3, 4096)
    with pytest.raises(SystemExit):
        T.parse_args(["--preset", "paper"])
    assert "--from-base" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        T.parse_args(["--preset", "paper", "--no-registers", "--encoder-init", "x"])
    with pytest.raises(SystemExit):
        T.parse_args(["--no-registers", "--register-dropout", "0.1"])
    with pytest.raises(SystemExit):
        T.parse_args(["--preset", "paper", "--from-base", "/nonexistent/base"])
    assert "no base MDM checkpoint" in capsys.readouterr().err

    def meta_demasker(name, register_dim=None, max_registers=None, **kw):
        with torch.device("meta"):
            return Demasker(DemaskerConfig.llada_8b_base(register_dim=register_dim or 0, max_registers=max_registers or 1))

    def meta_encoder(name, num_registers=None, **kw):
        with torch.device("meta"):
            return Encoder(EC.qwen3_embedding_0_6b(num_registers=num_registers))

    monkeypatch.setattr(T.Demasker, "from_pretrained", staticmethod(meta_demasker))
    monkeypatch.setattr(T.Encoder, "from_pretrained", staticmethod(meta_encoder))
    meta = {"vocab_size": 126464, "mask_id": 126336, "eos_id": 126081, "bos_id": 126080}
    qwen = {"vocab_size": 151669, "pad_id": 151643, "eos_id": 151643, "mask_id": 151643}
    encoder, demasker = T.build_models(args, meta, qwen)
    assert encoder is None and demasker.cfg.register_dim == 0 and demasker.wte.weight.is_meta
    assert sum(p.numel() for p in demasker.parameters()) > 7.5e9
    guided = T.parse_args(["--preset", "paper", "--demasker-init", "GSAI-ML/LLaDA-8B-Base"])
    encoder, demasker = T.build_models(guided, meta, qwen)
    assert encoder.cfg.num_registers == 128 and demasker.cfg.register_dim == encoder.cfg.hidden_size == 1024


def test_help_lists_from_base_rewarm_and_register_dropout(capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--from-base", "--rewarm-steps", "--register-dropout", "AE_FROM_BASE"):
        assert flag in out, flag


def test_register_dropout_in_training(cache, tmp_path, monkeypatch):
    """P = 1: the demasker never sees a register (register_mask all False in every forward); P = 0: bit-identical
    weights to a run without the flag."""
    from demasker import Demasker

    masks = []
    original = Demasker.forward

    def spy(self, input_ids, registers=None, register_mask=None, attention_mask=None):
        if self.training:
            masks.append(register_mask.clone())
        return original(self, input_ids, registers, register_mask, attention_mask)

    monkeypatch.setattr(Demasker, "forward", spy)
    T.train(run_args(cache, tmp_path / "null", "--max-steps", "2", "--register-dropout", "1"))
    assert len(masks) == 4 and not any(bool(m.any()) for m in masks)
    monkeypatch.setattr(Demasker, "forward", original)
    T.train(run_args(cache, tmp_path / "zero", "--max-steps", "2", "--register-dropout", "0"))
    T.train(run_args(cache, tmp_path / "off", "--max-steps", "2"))
    zero, off = weights(tmp_path / "zero" / "checkpoint"), weights(tmp_path / "off" / "checkpoint")
    assert zero.keys() == off.keys() and all(torch.equal(zero[k], off[k]) for k in zero)
    # hub model cards: every save writes README.md into the model folders
    for part in ("encoder", "demasker"):
        card = (tmp_path / "off" / "checkpoint" / part / "README.md").read_text()
        assert "library_name: crocodil" in card and f"crocodil {part}" in card


def test_a_card_that_cannot_be_written_never_fails_a_save(cache, tmp_path, monkeypatch):
    from infra import hub

    def broken(folder, *a, **k):
        raise SystemExit("broken records")

    monkeypatch.setattr(hub, "write_cards", broken)
    with pytest.warns(UserWarning, match="model cards not written"):
        T.train(run_args(cache, tmp_path, "--max-steps", "1", "--no-registers"))
    assert (tmp_path / "checkpoint" / "demasker" / "model.safetensors").is_file()


def test_keep_distribution_geometric_draws_only_the_levels(cache, tmp_path, monkeypatch):
    """--keep-distribution geometric: nested dropout keeps k in {1, 2, 4, ..., K} (App. E's grouping);
    uniform (the default) is the run of before, number for number."""
    import corruption

    kept = []
    original = corruption.corrupt

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        kept.extend(out["keep"].tolist())
        return out

    monkeypatch.setattr(T, "corrupt", spy)
    T.train(run_args(cache, tmp_path / "geo", "--max-steps", "3", "--keep-distribution", "geometric"))
    levels = {1, 2, 4}  # K = 4
    assert set(kept) <= levels and len(set(kept)) > 1, sorted(set(kept))
    assert json.loads((tmp_path / "geo" / "args.json").read_text())["keep_distribution"] == "geometric"
    monkeypatch.setattr(T, "corrupt", original)
    T.train(run_args(cache, tmp_path / "uni", "--max-steps", "2", "--keep-distribution", "uniform"))
    T.train(run_args(cache, tmp_path / "default", "--max-steps", "2"))
    a, b = weights(tmp_path / "uni" / "checkpoint"), weights(tmp_path / "default" / "checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pad_eos_weight_scales_the_padding_terms_of_eq5():
    """--pad-eos-weight W: each masked padding position (after the first EOS) contributes W x CE / p_mask; W = 0
    drops it; W = 1 is LLaDA's loss unchanged; program tokens (BOS .. first EOS) always count fully."""
    from schedules import masked_diffusion_loss
    torch.manual_seed(0)
    logits, x0 = torch.randn(2, 6, 9), torch.randint(0, 9, (2, 6))
    masked = torch.tensor([[1, 0, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    p_mask = torch.full((2, 6), 0.5)
    lengths = torch.tensor([3, 5])  # padding: positions 3.. of row 0, 5 of row 1
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none").view(2, 6) / 0.5
    pad = torch.arange(6)[None, :] >= lengths[:, None]

    def loss(weight):
        return float(masked_diffusion_loss(logits, x0, *T.pad_weighted(masked, p_mask, lengths, weight)))
    for weight in (0.0, 0.25, 1.0):
        expected = float((ce * masked * torch.where(pad, weight, 1.0)).sum() / 12)
        assert math.isclose(loss(weight), expected, rel_tol=1e-6)
    assert loss(0.0) < loss(0.25) < loss(1.0)


def test_pad_eos_weight_reaches_training(cache, tmp_path):
    """The flag is checked up front and changes the trained weights; its default is LLaDA's objective."""
    T.train(run_args(cache, tmp_path / "w0", "--max-steps", "2", "--pad-eos-weight", "0"))
    T.train(run_args(cache, tmp_path / "w1", "--max-steps", "2", "--pad-eos-weight", "1"))
    T.train(run_args(cache, tmp_path / "off", "--max-steps", "2"))
    w0, w1, off = (weights(tmp_path / name / "checkpoint") for name in ("w0", "w1", "off"))
    assert all(torch.equal(w1[k], off[k]) for k in off)
    assert any(not torch.equal(w0[k], off[k]) for k in off)
    with pytest.raises(SystemExit):
        run_args(cache, tmp_path / "bad", "--max-steps", "2", "--pad-eos-weight", "1.5")
