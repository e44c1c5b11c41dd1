"""Tests for experiments/eval_prompt.py (`eval.py prompt`): the table over NFE for base / ConThenDisc / ConWithinDisc and the
infilling rows, on tiny random models, with intervals; bad input named."""

import json
import shutil

import numpy as np
import pytest
import torch

import eval as E
from dataprep import prompts as P
from experiments import train_prompted as T
from dataprep.data import build_dataset
from dataprep.latent_data import encoder_fingerprint
from demasker import Demasker, DemaskerConfig
from encoder import Encoder, EncoderConfig
from latent_dit import DiTConfig, LatentDiT
from schedules import register_blocks

K, D = 4, 64


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_prompt")
    rng = np.random.default_rng(0)
    lines, pairs = [], []
    for i in range(40):
        n, m = int(rng.integers(2, 9)), int(rng.integers(0, 99))
        prompt = f'def f_{i}(x):\n    """Multiply x by {n} and add {m}."""'
        answer = f"    y = x * {n}\n    return y + {m}"
        pairs.append(P.Pair(f"f{i}.py", prompt, answer))
        lines.append(json.dumps({"text": prompt + "\n" + answer, "path": f"f{i}.py"}))
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    meta = build_dataset(root / "data", root / "corpus.jsonl", seq_len=48, vocab_size=300, overlong="cut")
    P.write_pairs(root / "pairs", {"train": pairs[:30], "val": pairs[30:34], "test": pairs[34:]})
    V = meta["vocab_size"]
    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig.tiny(vocab_size=V, hidden_size=D, num_registers=K, pad_token_id=meta["pad_id"],
                                         eos_token_id=meta["eos_id"], mask_token_id=meta["mask_id"]))
    special = dict(vocab_size=V, mask_token_id=meta["mask_id"], eos_token_id=meta["eos_id"],
                   bos_token_id=meta["bos_id"], pad_token_id=meta["eos_id"])
    for name, demasker in (("ae", Demasker(DemaskerConfig.tiny(register_dim=D, max_registers=K, **special))),
                           ("base", Demasker(DemaskerConfig.tiny(register_dim=0, **special)))):
        demasker.save_pretrained(root / name / "demasker")
        shutil.copy(root / "data" / "tokenizer.json", root / name / "tokenizer.json")
        (root / name / "args.json").write_text(json.dumps({"data": str(root / "data")}))
    encoder.save_pretrained(root / "ae" / "encoder")
    T.main(["--ae", str(root / "ae"), "--pairs", str(root / "pairs"), "--out-dir", str(root / "pprior"), "--seq-len",
            "48", "--num-registers", str(K), "--steps", "2", "--batch-size", "4"])
    dit = LatentDiT(DiTConfig.tiny(register_dim=D, num_registers=K, cond_dim=D))  # a conditional prior folder
    dit.save_pretrained(root / "cprior" / "dit")
    (root / "cprior" / "prior.json").write_text(json.dumps({
        "ae": str(root / "ae"), "num_registers": K, "max_offset": 0.2, "block_offsets": True, "conditional": True,
        "cond_registers": K, "shared_tokenizer": True, "register_blocks": register_blocks(K),
        "encoder_fingerprint": encoder_fingerprint(root / "ae" / "encoder")}))
    return root


def argv(root, out, *extra):
    return ["prompt", "--ae", str(root / "ae"), "--base", str(root / "base"), "--pairs", str(root / "pairs"),
            "--prompted-prior", str(root / "pprior"), "--num", "3", "--batch-size", "2", "--length", "48",
            "--nfe", "2", "4", "--prior-steps", "2", "--refresh-prior-steps", "2", "--bootstrap", "20",
            "--out", str(out), *extra]


def test_table_over_nfe_for_every_method_with_intervals(runs, tmp_path):
    record = E.main(argv(runs, tmp_path / "out", "--cond-prior", str(runs / "cprior")))
    rows = record["results"]["rows"]
    prompt_rows = [r for r in rows if r["task"] == "prompt"]
    assert [(r["method"], r["steps"]) for r in prompt_rows] == [
        (m, s) for s in (2, 4) for m in ("base", "conthendisc", "conwithindisc")]
    for r in rows:
        assert 0 <= r["token_f1"] <= 1 and r["cer"] >= 0 and 0 <= r["parse_rate"] <= 1
        assert 0 <= r["empty_rate"] <= 1
        lo, hi = r["cer_ci"]
        assert lo <= r["cer"] <= hi
    base = [r for r in prompt_rows if r["method"] == "base"]
    assert [r["nfe"] for r in base] == [2.0, 4.0]
    guided = [r for r in prompt_rows if r["method"] != "base"]
    assert all(r["nfe"] > r["steps"] for r in guided)  # the priors and h_kappa count by parameter ratio
    infill = [r for r in rows if r["task"] == "infill"]
    assert {r["method"] for r in infill} == {"infill base", "infill guided"}
    assert record["results"]["rows"][0]["examples"][0].startswith("def f_")  # prompt + generated body
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "token F1 [95% CI]" in report and "conwithindisc" in report


def test_keep_reaches_the_prompted_and_infilling_demasker(runs, tmp_path, monkeypatch):
    from extensions import prompting as PR
    seen, loop = [], PR._loop

    def spy(demasker, canvas, steps, temperature, remasking, mask_id, registers=None, *rest, **kwargs):
        if registers is not None:  # the base rows have none
            seen.append(registers.shape[1])
        return loop(demasker, canvas, steps, temperature, remasking, mask_id, registers, *rest, **kwargs)
    monkeypatch.setattr(PR, "_loop", spy)
    record = E.main(argv(runs, tmp_path / "out", "--cond-prior", str(runs / "cprior"), "--keep", "2"))
    assert record["results"]["keep"] == 2 and seen and set(seen) == {2}


def test_bad_input_is_named(runs, tmp_path, capsys):
    with pytest.raises(ValueError, match="needs --pairs"):
        E.main([a for a in argv(runs, tmp_path / "o") if a not in ("--pairs", str(runs / "pairs"))])
    with pytest.raises(SystemExit):
        E.main(argv(runs, tmp_path / "o", "--span-fraction", "1.5"))
    assert "--span-fraction" in capsys.readouterr().err
    with pytest.raises(ValueError, match="raise --length"):
        E.main(argv(runs, tmp_path / "o")[:-9] + ["--length", "8", "--nfe", "2", "--out", str(tmp_path / "o")])


def _rank_main(rank, world_size, port, args, counts):
    import os

    from extensions import prompting
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    original = prompting.base_prompted

    def counting(demasker, canvas, **kwargs):  # how many base canvases this rank decodes
        with open(f"{counts}.{rank}", "a") as f:
            f.write(f"{canvas.shape[0]}\n")
        return original(demasker, canvas, **kwargs)
    prompting.base_prompted = counting
    E.main(args)


def test_two_ranks_give_the_one_process_table(runs, tmp_path):
    """Under torchrun the batches are dealt over the ranks; every batch's seed depends on its first row only,
    so 2 gloo ranks write the rows of one process."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    extra = ("--num", "5", "--nfe", "4", "--device", "cpu")
    counts = tmp_path / "counts"
    mp.spawn(_rank_main, args=(2, port, argv(runs, tmp_path / "two", *extra), str(counts)), nprocs=2, join=True)
    decoded = [sum(int(n) for n in open(f"{counts}.{rank}")) for rank in (0, 1)]
    assert decoded == [3, 2]  # batches of 2 at rows 0, 2, 4: rank 0 takes 0 and 4, rank 1 takes 2
    one = E.main(argv(runs, tmp_path / "one", *extra))["results"]["rows"]
    two = json.loads((tmp_path / "two" / "prompt.json").read_text())["results"]["rows"]
    assert len(one) == 3 and json.loads(json.dumps(one)) == two


def test_a_prompted_prior_paired_with_another_demasker_or_without_fingerprint_is_refused(runs, tmp_path):
    """--ae decodes: the prior must sample the registers its demasker is guided by (the AE's own reads whole
    programs) and belong to its encoder (prompted.json's fingerprint); either problem is named with the fix."""
    from extensions.prompting import FINE_TUNED_BY
    folder, tuned = tmp_path / "pprior", tmp_path / "tuned"
    shutil.copytree(runs / "pprior", folder)
    shutil.copytree(runs / "ae", tuned)  # as if fine-tuned on the answer's registers: the prior's own pair
    (tuned / "args.json").write_text(json.dumps({"data": str(runs / "data"), "fine_tuned_by": FINE_TUNED_BY,
                                                 "guide": "answer"}))
    record = folder / "prompted.json"
    settings = json.loads(record.read_text())
    record.write_text(json.dumps({**settings, "target": "answer", "guide": "answer", "demasker": str(tuned)}))
    args = [a if a != str(runs / "pprior") else str(folder) for a in argv(runs, tmp_path / "o")]
    with pytest.raises(ValueError, match="samples the registers of the answer.*retrain the prior with --target program"):
        E.main(args)
    record.write_text(json.dumps({k: v for k, v in settings.items() if k != "encoder_fingerprint"}))
    with pytest.raises(ValueError, match="records no encoder fingerprint"):
        E.main(args)
    assert not (tmp_path / "o" / "prompt.json").exists()
