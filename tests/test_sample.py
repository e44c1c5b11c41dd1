"""Tests for sample.py: exact parity with LLaDA's generate(), NFE, guidance, decoding, CER."""

import math
import sys

import pytest
import torch
import torch.nn as nn

import sample as S
from unwritable import UNWRITABLE, make_unwritable

V, MASK = 37, 36


class TinyMixer(nn.Module):
    """Stand-in demasker: token + position embedding, one random bidirectional mixing layer, linear head.
    Registers (B, k, d) are averaged (over register_mask) and added to every position."""

    def __init__(self, vocab=V, d=16, max_len=64, seed=0, mask_bias=-1e4):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tok = nn.Parameter(torch.randn(vocab, d, generator=g))
        self.pos = nn.Parameter(torch.randn(max_len, d, generator=g))
        self.mix = nn.Parameter(torch.randn(max_len, max_len, generator=g) / math.sqrt(max_len))
        self.head = nn.Parameter(torch.randn(d, vocab, generator=g) * 2)
        self.bias = nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            self.bias[MASK] = mask_bias  # a trained demasker never predicts [M] (default)
        self.calls, self.seen_registers = 0, []

    def forward(self, x, registers=None, register_mask=None, attention_mask=None):
        self.calls += 1
        self.seen_registers.append(registers)
        B, L = x.shape
        h = self.tok[x] + self.pos[:L]  # (B, L, d)
        mix = self.mix[:L, :L].expand(B, L, L)
        if attention_mask is not None:
            mix = mix * attention_mask[:, None, :].float()
        h = h + torch.tanh(mix @ h)
        if registers is not None:
            w = torch.ones(registers.shape[:2]) if register_mask is None else register_mask.float()
            h = h + (registers * w[..., None]).sum(1, keepdim=True) / w.sum(1).clamp_min(1)[:, None, None]
        return h @ self.head + self.bias  # (B, L, V)


def reference_generate(model, prompt, steps, gen_length, block_length, temperature, remasking, mask_id,
                       attention_mask=None):
    """Independent re-statement of LLaDA's reference generate() (ML-GSAI/LLaDA generate.py), plain loops,
    global RNG: torch.rand_like(float64) for Gumbel when T > 0, then torch.rand((B, L)) for random remasking."""
    B, P = prompt.shape
    total = P + gen_length
    seq = torch.full((B, total), mask_id, dtype=torch.long)
    seq[:, :P] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones(B, gen_length, dtype=torch.bool)], 1)
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for blk in range(n_blocks):
        lo, hi = P + blk * block_length, P + (blk + 1) * block_length
        plan = []
        for b in range(B):
            n = sum(1 for pos in range(lo, hi) if seq[b, pos].item() == mask_id)
            plan.append([n // per_block + (1 if s < n % per_block else 0) for s in range(per_block)])
        for s in range(per_block):
            is_mask = seq == mask_id
            logits = model(seq, attention_mask=attention_mask)
            if temperature > 0:
                l64 = logits.to(torch.float64)
                u = torch.rand_like(l64, dtype=torch.float64)
                scores = l64.exp() / (-torch.log(u)) ** temperature
            else:
                scores = logits
            pred = scores.argmax(-1)
            if remasking == "low_confidence":
                probs, picks = torch.softmax(logits, dim=-1).tolist(), pred.tolist()
                conf = [[probs[b][pos][picks[b][pos]] for pos in range(total)] for b in range(B)]
            else:
                conf = torch.rand((B, total)).tolist()
            for b in range(B):
                for pos in range(total):
                    if pos >= hi or not is_mask[b, pos]:
                        conf[b][pos] = -float("inf")
            conf = torch.tensor(conf, dtype=logits.dtype if remasking == "low_confidence" else torch.float32)
            new_seq = seq.clone()
            for b in range(B):
                chosen = torch.topk(conf[b], k=plan[b][s]).indices.tolist()
                for pos in chosen:
                    new_seq[b, pos] = pred[b, pos]
            seq = new_seq
    return seq


CASES = [  # (seed, temperature, remasking, gen_length, block_length, steps, prompt_len, batch)
    (0, 0.0, "low_confidence", 24, 24, 24, 0, 3),
    (1, 0.0, "low_confidence", 24, 8, 12, 3, 2),
    (2, 1.0, "low_confidence", 24, 24, 8, 0, 3),
    (3, 0.7, "low_confidence", 24, 6, 8, 5, 2),
    (4, 0.0, "random", 20, 10, 10, 2, 3),
    (5, 1.0, "random", 24, 12, 6, 0, 2),
    (6, 0.5, "random", 18, 6, 9, 4, 2),
    (7, 2.0, "low_confidence", 16, 4, 16, 1, 4),
]


@pytest.mark.parametrize("seed,temperature,remasking,gen_length,block_length,steps,plen,batch", CASES)
def test_generate_matches_llada_reference(seed, temperature, remasking, gen_length, block_length, steps, plen, batch):
    model = TinyMixer(seed=seed)
    prompt = torch.randint(0, MASK, (batch, plen), generator=torch.Generator().manual_seed(100 + seed))
    torch.manual_seed(seed)
    ref = reference_generate(model, prompt, steps, gen_length, block_length, temperature, remasking, MASK)
    torch.manual_seed(seed)
    out, nfe = S.generate(model, prompt if plen else batch, gen_length, block_length, steps, temperature,
                          remasking, mask_id=MASK)
    assert torch.equal(out, ref)
    assert nfe == steps
    assert (out != MASK).all() and torch.equal(out[:, :plen], prompt)
    # the explicit generator reproduces the global-RNG stream
    out_g, _ = S.generate(model, prompt if plen else batch, gen_length, block_length, steps, temperature,
                          remasking, mask_id=MASK, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(out_g, ref)


@pytest.mark.parametrize("temperature,remasking", [(0.0, "low_confidence"), (1.0, "random")])
def test_generate_parity_when_the_model_predicts_mask(temperature, remasking):
    # A revealed [M] stays a candidate in later steps and blocks (LLaDA's semantics, kept exactly).
    model = TinyMixer(seed=8, mask_bias=6.0)
    torch.manual_seed(4)
    ref = reference_generate(model, torch.zeros(2, 0, dtype=torch.long), 12, 24, 8, temperature, remasking, MASK)
    torch.manual_seed(4)
    out, _ = S.generate(model, 2, 24, 8, 12, temperature, remasking, mask_id=MASK)
    assert (ref == MASK).any()  # the case really happens
    assert torch.equal(out, ref)


def test_add_gumbel_noise_is_llada_expression_and_leaves_input_alone():
    for dtype in [torch.float32, torch.float64, torch.bfloat16]:
        logits = torch.randn(2, 5, 11).to(dtype)
        before = logits.clone()
        for temperature in [0.5, 1.0, 2.0]:
            torch.manual_seed(0)
            l64 = logits.to(torch.float64)
            ref = l64.exp() / (-torch.log(torch.rand_like(l64, dtype=torch.float64))) ** temperature
            torch.manual_seed(0)
            assert torch.equal(S.add_gumbel_noise(logits, temperature), ref)
            assert torch.equal(logits, before)
    assert S.add_gumbel_noise(logits, 0.0) is logits


class FlatModel(nn.Module):
    """Same logits at every position: every confidence ties, so only identical top-k calls agree."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(V, generator=torch.Generator().manual_seed(0)))

    def forward(self, x, registers=None, register_mask=None, attention_mask=None):
        return self.logits.expand(*x.shape, V).clone()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_parity_when_confidences_tie(temperature):
    model = FlatModel()
    torch.manual_seed(0)
    ref = reference_generate(model, torch.zeros(3, 0, dtype=torch.long), 10, 40, 20, temperature,
                             "low_confidence", MASK)
    torch.manual_seed(0)
    out, _ = S.generate(model, 3, 40, 20, 10, temperature, mask_id=MASK)
    assert torch.equal(out, ref)


def test_generate_parity_with_left_padded_prompt_and_attention_mask():
    model = TinyMixer(seed=11)
    prompt = torch.tensor([[0, 0, 5, 6, 7], [9, 8, 7, 6, 5]])
    att = torch.tensor([[False, False, True, True, True], [True] * 5])
    torch.manual_seed(3)
    ref = reference_generate(model, prompt, 8, 16, 8, 0.8, "low_confidence", MASK, attention_mask=att)
    torch.manual_seed(3)
    out, _ = S.generate(model, prompt, 16, 8, 8, 0.8, "low_confidence", mask_id=MASK, attention_mask=att)
    assert torch.equal(out, ref)
    unmasked, _ = S.generate(model, prompt, 16, 8, 8, 0.0, mask_id=MASK)
    masked, _ = S.generate(model, prompt, 16, 8, 8, 0.0, mask_id=MASK, attention_mask=att)
    assert not torch.equal(unmasked[0], masked[0])  # the mask reaches the model


def test_nfe_counts_forward_calls_and_blocks_fill_left_to_right():
    model = TinyMixer(seed=2)
    snapshots = []

    def record(step, x, registers, register_mask):
        snapshots.append(x.clone())
        return None

    out, nfe = S.generate(model, 2, gen_length=24, block_length=8, steps=12, mask_id=MASK, refresh_registers=record)
    assert nfe == model.calls == 12 == len(snapshots)
    # before step 4 (first step of block 1) block 0 is complete and blocks 1, 2 are untouched
    x4 = snapshots[4]
    assert (x4[:, :8] != MASK).all() and (x4[:, 8:] == MASK).all()
    # each step of a block reveals ceil/floor(8 / 4) = 2 tokens per row
    revealed = [(s == MASK).sum(1) for s in snapshots] + [(out == MASK).sum(1)]
    for a, b in zip(revealed, revealed[1:]):
        assert ((a - b) == 2).all()


def test_steps_more_than_tokens_still_costs_forwards():
    model = TinyMixer(seed=3)
    out, nfe = S.generate(model, 1, gen_length=4, block_length=4, steps=8, mask_id=MASK)
    assert nfe == model.calls == 8 and (out != MASK).all()


def test_registers_reach_the_model_and_refresh_replaces_them():
    model = TinyMixer(seed=4)
    regs = torch.randn(2, 3, 16)
    out_plain, _ = S.generate(model, 2, 12, 12, 6, mask_id=MASK)
    model.seen_registers.clear()
    out_guided, _ = S.generate(model, 2, 12, 12, 6, mask_id=MASK, registers=regs)
    assert all(r is regs for r in model.seen_registers) and len(model.seen_registers) == 6
    assert not torch.equal(out_plain, out_guided)

    new = torch.randn(2, 3, 16)

    def refresh_at_3(step, x, registers, register_mask):
        assert registers is (regs if step <= 3 else new)  # the callback sees the registers in use
        return (new, None) if step == 3 else None

    model.seen_registers.clear()
    S.generate(model, 2, 12, 12, 6, mask_id=MASK, registers=regs, refresh_registers=refresh_at_3)
    assert [r is new for r in model.seen_registers] == [False] * 3 + [True] * 3


def test_schedule_errors_name_the_fix():
    model = TinyMixer()
    with pytest.raises(ValueError, match="multiple of block_length"):
        S.generate(model, 1, 10, 4, 10, mask_id=MASK)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        S.generate(model, 1, 12, 4, 10, mask_id=MASK)
    with pytest.raises(ValueError, match="remasking"):
        S.generate(model, 1, 8, 8, 8, mask_id=MASK, remasking="greedy")
    with pytest.raises(ValueError, match="mask_id"):
        S.generate(model, 1, 8, 8, 8)


class StandInEncoder(nn.Module):
    """Registers from a mean-pooled embedding, K of them, norm sqrt(d); zeroed beyond keep."""

    def __init__(self, K=4, d=16):
        super().__init__()
        self.emb = nn.Parameter(torch.randn(V, K, d, generator=torch.Generator().manual_seed(9)))
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, hide=None, keep=None):
        self.calls += 1
        m = torch.ones_like(input_ids, dtype=torch.float) if attention_mask is None else attention_mask.float()
        z = (self.emb[input_ids] * m[..., None, None]).sum(1) / m.sum(1)[:, None, None]  # (B, K, d)
        z = torch.nn.functional.normalize(z, dim=-1) * math.sqrt(z.shape[-1])
        if keep is not None:
            z = z * (torch.arange(z.shape[1])[None, :] < keep[:, None]).float()[..., None]
        return z


def test_autoencode_is_generate_with_fixed_encoder_registers():
    enc, dem = StandInEncoder(), TinyMixer(seed=5)
    ids = torch.randint(0, MASK, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 7:] = False
    out, nfe = S.autoencode(enc, dem, ids, mask, gen_length=16, block_length=8, steps=8, mask_id=MASK)
    assert enc.calls == 1 and nfe == 8 and out.shape == (3, 16)
    z = enc(ids, attention_mask=mask)
    ref, _ = S.generate(dem, 3, 16, 8, 8, mask_id=MASK, registers=z)
    assert torch.equal(out, ref)
    # keep as an int drops registers; keep per example hides them through register_mask
    out_k, _ = S.autoencode(enc, dem, ids, mask, 16, 8, 8, mask_id=MASK, keep=2)
    assert dem.seen_registers[-1].shape == (3, 2, 16)
    keep = torch.tensor([2, 2, 2])
    out_kb, _ = S.autoencode(enc, dem, ids, mask, 16, 8, 8, mask_id=MASK, keep=keep)
    assert torch.equal(out_k, out_kb)


def test_generate_runs_on_tiny_demasker_with_and_without_registers():
    demasker = pytest.importorskip("demasker")
    torch.manual_seed(0)
    cfg = demasker.DemaskerConfig.tiny()
    model = demasker.Demasker(cfg).eval()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    prompt = torch.full((2, 1), cfg.bos_token_id)
    torch.manual_seed(1)
    out, nfe = S.generate(model, prompt, gen_length=32, block_length=16, steps=8, temperature=1.0)
    assert nfe == len(calls) == 8 and out.shape == (2, 33)
    torch.manual_seed(1)
    ref = reference_generate(lambda x, attention_mask=None: model(x), prompt, 8, 32, 16, 1.0,
                             "low_confidence", cfg.mask_token_id)
    assert torch.equal(out, ref)
    regs = torch.randn(2, 4, cfg.register_dim)
    out_r, _ = S.generate(model, 2, 16, 16, 4, registers=regs, register_mask=torch.ones(2, 4, dtype=torch.bool))
    assert out_r.shape == (2, 16)


class CharTokenizer:
    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


def test_decode_programs_drops_bos_and_text_after_first_eos():
    EOS, BOS = 30, 31
    tokens = torch.tensor([[BOS, 0, 1, 2, EOS, 3, EOS],
                           [0, 1, EOS, EOS, EOS, EOS, EOS],
                           [BOS, 2, 2, 2, 2, 2, 2],
                           [EOS, 1, 1, 1, 1, 1, 1]])
    assert S.decode_programs(CharTokenizer(), tokens, EOS, BOS) == ["abc", "ab", "cccccc", ""]
    # without bos_id a leading BOS is kept
    assert S.decode_programs(CharTokenizer(), tokens[:1], EOS)[0] == chr(ord("a") + BOS) + "abc"


def test_levenshtein_and_cer():
    assert S.levenshtein("kitten", "sitting") == 3
    assert S.levenshtein("", "abc") == 3 and S.levenshtein("abc", "") == 3
    assert S.levenshtein("flaw", "lawn") == 2
    assert S.cer("abcd", "abcd") == 0.0
    assert S.cer("abcd", "abed") == 0.25
    assert S.cer("", "") == 0.0 and S.cer("", "xy") == 2.0


def test_through_first_eos():
    ids = torch.tensor([[1, 5, 6, 2, 2, 2], [1, 5, 5, 5, 5, 5], [2, 2, 2, 2, 2, 2]])
    expected = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(S.through_first_eos(ids, 2), expected)


def test_cli_base_and_autoencode_on_a_tiny_checkpoint(tmp_path, monkeypatch, capsys):
    """main() end to end on a saved tiny encoder + demasker, with a stub `data` module (tokenizer, val split)."""
    import json
    import types

    demasker_mod = pytest.importorskip("demasker")
    encoder_mod = pytest.importorskip("encoder")
    torch.manual_seed(0)
    dcfg = demasker_mod.DemaskerConfig.tiny()
    ecfg = encoder_mod.EncoderConfig.tiny(vocab_size=dcfg.vocab_size, hidden_size=dcfg.register_dim,
                                          eos_token_id=dcfg.eos_token_id, pad_token_id=dcfg.eos_token_id)
    demasker_mod.Demasker(dcfg).save_pretrained(tmp_path / "run" / "demasker")
    encoder_mod.Encoder(ecfg).save_pretrained(tmp_path / "run" / "encoder")
    (tmp_path / "run" / "tokenizer.json").write_text("{}")
    L = 16
    val = torch.full((5, L), dcfg.eos_token_id)
    val[:, 0] = dcfg.bos_token_id
    val[:, 1:6] = torch.arange(25).view(5, 5) + 40

    class Tok:
        def decode(self, ids):
            return "".join(chr(33 + i % 90) for i in ids)

    from dataprep import data as real_data
    stub = types.SimpleNamespace(load_tokenizer=lambda path: Tok(),
                                 load_split=lambda data_dir, split: {"ids": val.numpy()},
                                 check_tokenizer_matches=real_data.check_tokenizer_matches)
    monkeypatch.setitem(sys.modules, "dataprep.data", stub)

    out = tmp_path / "base.jsonl"
    S.main(["--ckpt", str(tmp_path / "run"), "--method", "base", "--gen-length", "16", "--steps", "8",
            "--num", "3", "--batch-size", "2", "--out", str(out), "--device", "cpu"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and all(r["nfe"] == 8 and len(r["tokens"]) == 16 for r in records)
    assert records[0]["text"] == Tok().decode(S.program_ids(records[0]["tokens"], dcfg.eos_token_id, dcfg.bos_token_id))

    out = tmp_path / "ae.jsonl"
    errors = S.main(["--ckpt", str(tmp_path / "run"), "--method", "autoencode", "--data", "unused", "--steps", "4",
                     "--num", "4", "--batch-size", "3", "--out", str(out), "--device", "cpu"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4 and len(errors) == 4
    assert records[1]["source"] == Tok().decode(list(range(45, 50)))
    assert all(r["cer"] == S.cer(r["source"], r["text"]) and len(r["tokens"]) == L for r in records)
    printed = capsys.readouterr().out
    assert "--- source" in printed and "mean CER" in printed

    # A data cache tokenized with another tokenizer: refused before decoding, naming both; --out untouched.
    (tmp_path / "other_data").mkdir()
    (tmp_path / "other_data" / "tokenizer.json").write_text('{"another": 1}')
    before = out.read_text()
    with pytest.raises(ValueError, match=r"other_data/tokenizer.json \(sha256 \w+\) is not the tokenizer the AE run"):
        S.main(["--ckpt", str(tmp_path / "run"), "--method", "autoencode", "--data", str(tmp_path / "other_data"),
                "--steps", "4", "--num", "2", "--out", str(out), "--device", "cpu"])
    assert out.read_text() == before
    with pytest.raises(SystemExit, match=r"--keep 99 but the encoder has K=\d+ registers; choose 1 <= --keep <= "):
        S.main(["--ckpt", str(tmp_path / "run"), "--method", "autoencode", "--data", "unused", "--keep", "99",
                "--steps", "4", "--num", "2", "--out", str(out), "--device", "cpu"])
    assert out.read_text() == before


class _CharTokenizer:
    def decode(self, ids):
        return "".join(chr(33 + i % 90) for i in ids)


def _sample_rank(rank, world_size, port, argv):
    """One torchrun-like rank running sample.main with a stub `data` module (tokenizer only)."""
    import os
    import types
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.modules["dataprep.data"] = types.SimpleNamespace(load_tokenizer=lambda path: _CharTokenizer())
    torch.set_num_threads(1)
    S.main(argv)


def test_cli_shards_batches_over_two_ranks_with_the_same_output(tmp_path, monkeypatch):
    """Under torchrun the batches are dealt to the ranks and gathered on rank 0; every batch has its
    own seed, so 2 gloo ranks write exactly the JSONL of one process."""
    import json
    import socket
    import types

    import torch.multiprocessing as mp
    from demasker import Demasker, DemaskerConfig

    torch.manual_seed(0)
    Demasker(DemaskerConfig.tiny(register_dim=0)).save_pretrained(tmp_path / "run" / "demasker")
    (tmp_path / "run" / "tokenizer.json").write_text("{}")
    argv = lambda out: ["--ckpt", str(tmp_path / "run"), "--method", "base", "--gen-length", "16", "--steps", "8",
                        "--num", "5", "--batch-size", "2", "--temperature", "1", "--out", str(out), "--device", "cpu",
                        "--quiet"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_sample_rank, args=(2, port, argv(tmp_path / "two.jsonl")), nprocs=2, join=True)
    monkeypatch.setitem(sys.modules, "dataprep.data", types.SimpleNamespace(load_tokenizer=lambda path: _CharTokenizer()))
    S.main(argv(tmp_path / "one.jsonl"))
    one, two = ([json.loads(line) for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()] for n in ("one", "two"))
    assert [r["index"] for r in two] == list(range(5))
    assert all(r.pop("seconds_per_sample") > 0 for r in one + two)  # wall-clock: measured, not compared
    assert one == two
    assert len({tuple(r["tokens"]) for r in one}) > 1  # batches differ: the seeds are per batch


@pytest.mark.parametrize("flags,message", [
    (["--num", "0"], "--num must be >= 1"), (["--steps", "0"], "--steps must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"), (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--prior-steps", "0"], "--prior-steps must be >= 1"), (["--keep", "0"], "--keep must be >= 1"),
    (["--refresh-at", "1.5"], "--refresh-at"), (["--threshold", "-0.1"], "--threshold"),
])
def test_cli_numbers_are_refused_before_any_file_is_touched(tmp_path, capsys, flags, message):
    out = tmp_path / "existing.jsonl"
    out.write_text('{"kept": true}\n')
    with pytest.raises(SystemExit):
        S.parse_args(["--ckpt", str(tmp_path), "--out", str(out), *flags])
    assert message in capsys.readouterr().err
    assert out.read_text() == '{"kept": true}\n'  # never emptied


def test_cli_trace_and_adaptive_decoding_on_a_tiny_checkpoint(tmp_path, monkeypatch, capsys):
    import json
    import types

    from evaluation import decode_trace
    from demasker import Demasker, DemaskerConfig

    torch.manual_seed(0)
    Demasker(DemaskerConfig.tiny(register_dim=0)).save_pretrained(tmp_path / "run" / "demasker")
    (tmp_path / "run" / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "dataprep.data", types.SimpleNamespace(load_tokenizer=lambda path: _CharTokenizer()))
    common = ["--ckpt", str(tmp_path / "run"), "--gen-length", "16", "--num", "3", "--batch-size", "2",
              "--temperature", "1", "--device", "cpu", "--quiet"]
    S.main(common + ["--out", str(tmp_path / "plain.jsonl")])
    S.main(common + ["--out", str(tmp_path / "traced.jsonl"), "--trace", str(tmp_path / "t.html")])
    plain, traced = ([json.loads(line) for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
                     for n in ("plain", "traced"))
    assert [r["tokens"] for r in plain] == [r["tokens"] for r in traced]  # tracing changes no sample
    panels = decode_trace.read_panels(tmp_path / "t.html")
    assert len(panels) == 2 and len(panels[0]["canvases"]) == 17  # start + 16 steps
    assert decode_trace.text_at(panels[0], 16) == traced[0]["text"]
    S.main(common + ["--out", str(tmp_path / "tau.jsonl"), "--decoding", "threshold", "--threshold", "0"])
    tau = [json.loads(line) for line in (tmp_path / "tau.jsonl").read_text().splitlines()]
    assert all(r["demasker_calls"] == 1 and r["tokens_per_step"] == 16 for r in tau)  # tau = 0: one step


# ------------------------------------------------------------------------------------------------
# --prompt / --prompt-file / --infill (App. H; the runs of tests/experiments/test_eval_prompt.py)
# ------------------------------------------------------------------------------------------------

from test_eval_prompt import runs  # noqa: E402,F401  (the module-scoped fixture: tiny AE, base, priors, pairs)

PROMPT = 'def f(x):\n    """Multiply x by 3 and add 4."""'


@pytest.fixture(scope="module")
def recorded_runs(runs):  # noqa: F811
    """`runs` with the conditional prior's prior.json completed as train_prior.py writes it: the fingerprint of the
    encoder it was trained on (sample.py refuses a prior record without one)."""
    import json
    from dataprep.latent_data import encoder_fingerprint
    record = runs / "cprior" / "prior.json"
    settings = json.loads(record.read_text())
    settings.setdefault("encoder_fingerprint", encoder_fingerprint(runs / "ae" / "encoder"))
    record.write_text(json.dumps(settings))
    return runs


def _records(path):
    import json
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("method", ["base", "conthendisc", "conwithindisc"])
def test_prompt_is_the_fixed_prefix_of_every_sample(runs, tmp_path, method):  # noqa: F811
    from dataprep.tokenization import load_tokenizer
    tok = load_tokenizer(str(runs / "ae" / "tokenizer.json"))
    ckpt = runs / ("base" if method == "base" else "ae")
    extra = {"base": [], "conthendisc": ["--prompted-prior", str(runs / "pprior"), "--prior-steps", "2"]}
    extra["conwithindisc"] = extra["conthendisc"] + ["--refresh-prior-steps", "2"]
    S.main(["--ckpt", str(ckpt), "--method", method, "--prompt", PROMPT, *extra[method],
            "--length", "40", "--steps", "8", "--num", "3", "--batch-size", "2",
            "--temperature", "1", "--out", str(tmp_path / "s.jsonl"), "--quiet"])
    prefix = [tok.bos_id] + tok.encode(PROMPT + "\n")
    for record in _records(tmp_path / "s.jsonl"):
        assert record["tokens"][:len(prefix)] == prefix and record["prompt"] == PROMPT
        assert record["text"].startswith(PROMPT) and record["steps"] == 8
        assert tok.mask_id not in record["tokens"]


def test_prompt_file_and_infill_keep_their_tokens(recorded_runs, tmp_path):
    from dataprep.tokenization import load_tokenizer
    runs = recorded_runs  # noqa: F811
    tok = load_tokenizer(str(runs / "ae" / "tokenizer.json"))
    (tmp_path / "p.txt").write_text(PROMPT)
    S.main(["--ckpt", str(runs / "base"), "--prompt-file", str(tmp_path / "p.txt"), "--length", "40", "--steps", "4",
            "--num", "2", "--out", str(tmp_path / "f.jsonl"), "--quiet"])
    assert all(r["text"].startswith(PROMPT) for r in _records(tmp_path / "f.jsonl"))
    text = "def f(x):\n<|span|>\n    return y"
    for method, extra in (("base", []), ("conwithindisc", ["--cond-prior", str(runs / "cprior"),
                                                            "--refresh-prior-steps", "2"])):
        ckpt = runs / ("base" if method == "base" else "ae")
        S.main(["--ckpt", str(ckpt), "--method", method, "--infill", text, "--span-tokens", "6", "--length", "40",
                "--num", "2", "--out", str(tmp_path / "i.jsonl"), "--quiet", *extra])
        before = [tok.bos_id] + tok.encode("def f(x):\n")
        after = tok.encode("\n    return y") + [tok.eos_id]
        for record in _records(tmp_path / "i.jsonl"):
            t = record["tokens"]
            assert t[:len(before)] == before and t[len(before) + 6:len(before) + 6 + len(after)] == after
            assert tok.mask_id not in t and record["steps"] == 6 and record["infill"] == text


@pytest.mark.parametrize("flags, text", [
    (["--prompt", "  "], "the prompt is empty"),
    (["--prompt", PROMPT * 3, "--length", "16"], "shorten the prompt or raise --length"),
    (["--infill", "def f(x):\n    return y"], "span marker <|span|> exactly once"),
    (["--prompt", PROMPT, "--infill", "a<|span|>b"], "one of --prompt, --prompt-file and --infill"),
    (["--prompt-file", "/nonexistent/p.txt"], "does not exist"),
    (["--prompt", PROMPT, "--method", "conthendisc"], "needs --prompted-prior"),
    (["--infill", "a<|span|>b", "--method", "conwithindisc"], "needs --cond-prior"),
    (["--cfg-scale", "1"], "--cfg-scale applies to --prompt / --prompt-file"),
])
def test_bad_prompt_input_is_named(runs, tmp_path, capsys, flags, text):  # noqa: F811
    ckpt = runs / ("ae" if "--method" in flags else "base")
    with pytest.raises(SystemExit) as stop:
        S.main(["--ckpt", str(ckpt), "--length", "40", "--num", "1", "--quiet", "--out", str(tmp_path / "x.jsonl"),
                *flags])
    assert text in capsys.readouterr().err + str(stop.value)
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_every_method_samples_in_float32_bfloat16_and_float16(recorded_runs, tmp_path, dtype):
    """GPU runs keep every model in bf16 / fp16: the base MDM, the autoencoder, prompted ConThenDisc and
    ConWithinDisc (the conditional prior's refresh) and infilling all decode to token ids of the vocabulary
    (random tiny models: the ids, not their quality)."""
    runs = recorded_runs  # noqa: F811
    from dataprep.tokenization import load_tokenizer
    tok = load_tokenizer(str(runs / "ae" / "tokenizer.json"))
    common = ["--length", "40", "--steps", "8", "--num", "2", "--batch-size", "2", "--temperature", "1",
              "--dtype", dtype, "--quiet"]
    cases = {
        "base": ["--ckpt", str(runs / "base"), "--method", "base"],
        "autoencode": ["--ckpt", str(runs / "ae"), "--method", "autoencode", "--data", str(runs / "data")],
        "conthendisc": ["--ckpt", str(runs / "ae"), "--method", "conthendisc", "--prompt", PROMPT,
                        "--prompted-prior", str(runs / "pprior"), "--prior-steps", "2"],
        "conwithindisc": ["--ckpt", str(runs / "ae"), "--method", "conwithindisc", "--prompt", PROMPT,
                          "--prompted-prior", str(runs / "pprior"), "--prior-steps", "2", "--refresh-prior-steps", "2"],
        "infill": ["--ckpt", str(runs / "ae"), "--method", "conwithindisc", "--infill", "def f(x):\n<|span|>\n",
                   "--span-tokens", "6", "--cond-prior", str(runs / "cprior"), "--refresh-prior-steps", "2"],
    }
    for name, flags in cases.items():
        if name == "autoencode":  # decodes the held-out programs at their own length
            argv = [*flags, *[a for a in common if a not in ("--length", "40")], "--out", str(tmp_path / "a.jsonl")]
        else:
            argv = [*flags, *common, "--out", str(tmp_path / f"{name}.jsonl")]
        S.main(argv)
        records = _records(tmp_path / ("a.jsonl" if name == "autoencode" else f"{name}.jsonl"))
        assert len(records) == 2, name
        for record in records:
            assert len(record["tokens"]) > 0 and all(0 <= t < tok.vocab_size for t in record["tokens"]), name


# ------------------------------------------------------------------------------------------------
# A flag set where it does not act is refused (config/sample_args.py APPLIES); --guidance needs register dropout
# ------------------------------------------------------------------------------------------------

from config import sample_args as SA  # noqa: E402

MODE_FLAGS = {"--prompt": "prompt", "--prompt-file": "prompt", "--infill": "infill"}
CONTEXTS = [(method, mode, rule, trace) for method in SA.METHODS for mode in SA.MODES for rule in SA.RULES
            for trace in (False, True) if not (method == "autoencode" and mode != "plain")]


def _flag_argv(flag, tmp_path):
    """The flag with a valid value, as the parser reads it."""
    action = next(a for a in SA.build_parser()._actions if flag in a.option_strings)
    if action.nargs == 0:
        return [flag]
    value = {"--prompt": PROMPT, "--infill": "a<|span|>b", "--prompt-file": str(tmp_path / "p.txt")}.get(flag)
    if value is None:
        value = action.choices[0] if action.choices else {int: "1", float: "0.5"}.get(action.type, "x")
    return [flag, value]


def _context_argv(flag, context, tmp_path):
    method, mode, rule, trace = context
    argv = ["--ckpt", str(tmp_path), "--method", method, "--decoding", rule]
    if flag not in MODE_FLAGS:
        argv += {"plain": [], "prompt": ["--prompt", PROMPT], "infill": ["--infill", "a<|span|>b"]}[mode]
    return argv + (["--trace", str(tmp_path / "t.html")] if trace else []) + _flag_argv(flag, tmp_path)


def _run(context, cadd=None):
    return dict(zip(("method", "mode", "rule", "trace"), context), cadd=cadd)


@pytest.mark.parametrize("flag", sorted(SA.APPLIES))
def test_a_flag_is_refused_where_it_does_not_act_and_accepted_where_it_does(flag, tmp_path, capsys):
    (tmp_path / "p.txt").write_text(PROMPT)
    contexts = [c for c in CONTEXTS if flag not in MODE_FLAGS or c[1] == MODE_FLAGS[flag]]
    acts = [c for c in contexts if SA.applies(flag, _run(c))]
    assert acts, f"{flag} acts on no run"
    for context in contexts:
        argv = _context_argv(flag, context, tmp_path)
        if context in acts:
            args = S.parse_args(argv)
            assert flag in args.explicit
            for cadd in (False, True):  # once the checkpoint is read: the CADD rows
                if cadd and context[0] != "base":
                    continue  # a CADD checkpoint is sampled by --method base only (check_run refuses the rest)
                refused = [p for p in SA.unused_flags(args, cadd) if p.startswith(f"{flag} applies to ")]
                assert bool(refused) != SA.applies(flag, _run(context, cadd)), (flag, context, cadd)
                if refused:
                    with pytest.raises(SystemExit, match=f"{flag} applies to "):
                        SA.check_run(args, cadd)
        else:
            with pytest.raises(SystemExit):
                S.parse_args(argv)
            assert f"{flag} applies to {SA.APPLIES[flag][0]}" in capsys.readouterr().err, (flag, context)
    # the default, not set on the command line, is never refused
    assert flag not in S.parse_args(["--ckpt", str(tmp_path)]).explicit


def test_threshold_without_its_rule_is_an_error_not_the_fixed_schedule(tmp_path, capsys):
    with pytest.raises(SystemExit):
        S.parse_args(["--ckpt", str(tmp_path), "--threshold", "0"])
    err = capsys.readouterr().err
    assert "--threshold applies to --decoding threshold" in err and "drop --threshold" in err
    assert S.parse_args(["--ckpt", str(tmp_path), "--threshold", "0", "--decoding", "threshold"]).threshold == 0
    with pytest.raises(SystemExit):  # every unused flag is named at once
        S.parse_args(["--ckpt", str(tmp_path), "--factor", "2", "--prior", "p", "--trace-samples", "3"])
    err = capsys.readouterr().err
    assert all(f"{flag} applies to" in err for flag in ("--factor", "--prior", "--trace-samples"))


def test_records_name_only_the_inputs_the_run_used(tmp_path):
    """A prior set programmatically where the method does not read it is not recorded as used."""
    args = S.parse_args(["--ckpt", str(tmp_path), "--method", "conthendisc", "--prior", "p"])
    args.cond_prior = "c"  # what a conthendisc run never reads
    stats = {"nfe_per_sample": [4], "tokens_per_step": [1] * 4}
    record = S.record_of(args, "hybrid", 0, "t", torch.tensor([1]), 4, {"nfe": 4}, stats, 0, (8, 8, 4), 0.1, None)
    assert (record["prior"], record["cond_prior"], record["prior_steps"]) == ("p", None, 128)
    args = S.parse_args(["--ckpt", str(tmp_path), "--method", "conthendisc", "--prompt", PROMPT,
                         "--prompted-prior", "pp"])
    args.prior, args.cond_prior = "p", "c"
    record = S.record_of(args, "conditional", 0, "t", torch.tensor([1]), 4, {"nfe": 4}, stats, 0, (8, 8, 4), 0.1,
                         None)
    assert (record["prompted_prior"], record["cond_prior"], "prior" in record) == ("pp", None, False)


@pytest.mark.parametrize("dropout", [0.0, None, 0.1])
def test_guidance_needs_a_demasker_trained_with_register_dropout(runs, tmp_path, capsys, dropout):  # noqa: F811
    import json
    import shutil
    ae = tmp_path / "ae"
    shutil.copytree(runs / "ae", ae)
    record = {"data": str(runs / "data")} | ({} if dropout is None else {"register_dropout": dropout})
    (ae / "args.json").write_text(json.dumps(record))
    argv = ["--ckpt", str(ae), "--method", "autoencode", "--data", str(runs / "data"), "--steps", "8", "--num", "2",
            "--quiet", "--out", str(tmp_path / "g.jsonl")]
    if dropout == 0.0:
        with pytest.raises(SystemExit, match=r"trained with --register-dropout 0: its null branch is untrained; "
                                             r"retrain with --register-dropout 0.1 or drop --guidance"):
            S.main(argv + ["--guidance", "2"])
        assert not (tmp_path / "g.jsonl").exists()
        S.main(argv + ["--guidance", "1"])  # plain guided decoding needs no null branch
        return
    S.main(argv + ["--guidance", "2"])
    warned = "records no --register-dropout" in capsys.readouterr().err
    assert warned == (dropout is None) and len(_records(tmp_path / "g.jsonl")) == 2


def test_output_locations_are_checked_before_any_sampling(tmp_path, capsys):
    """A FIFO, symlink or folder at --out / --trace, or an unwritable folder, is refused before a model is
    loaded (it failed, or replaced the node, only after the whole run)."""
    import os
    fifo, link, ro = tmp_path / "fifo.jsonl", tmp_path / "link.jsonl", tmp_path / "ro"
    os.mkfifo(fifo)
    (tmp_path / "target.jsonl").write_text("keep\n")
    link.symlink_to(tmp_path / "target.jsonl")
    ro.mkdir()
    ro.chmod(0o500)
    cases = [(["--out", str(fifo)], "a FIFO"), (["--out", str(link)], "a symlink"),
             (["--out", str(tmp_path)], "is a folder"), (["--trace", str(fifo)], "a FIFO")]
    if not os.access(ro, os.W_OK):  # root may write anywhere
        cases.append((["--out", str(ro / "new" / "s.jsonl")], "not writable"))
    for flags, text in cases:
        with pytest.raises(SystemExit):
            S.parse_args(["--ckpt", str(tmp_path / "no_run"), *flags])
        assert text in capsys.readouterr().err, flags
    assert (tmp_path / "target.jsonl").read_text() == "keep\n" and fifo.exists()
    S.parse_args(["--ckpt", str(tmp_path / "no_run"), "--out", str(tmp_path / "new" / "deeper" / "s.jsonl")])


@pytest.mark.parametrize("case", UNWRITABLE)
def test_an_out_that_cannot_be_written_is_refused_before_any_sampling(tmp_path, capsys, monkeypatch, case):
    """A file where a parent folder must be (it raised a raw NotADirectoryError), a folder that is not writable (a
    read-only mount; stood in for here, as root writes anywhere) or a full disk: refused before a model is loaded."""
    out = tmp_path / "runs" / "s.jsonl"
    phrase = make_unwritable(case, tmp_path / "runs", monkeypatch, free_bytes=100)
    for flag in ("--out", "--trace"):
        with pytest.raises(SystemExit):
            S.parse_args(["--ckpt", str(tmp_path / "no_run"), flag, str(out)])
        message = capsys.readouterr().err
        assert f"{flag} {out}" in message and "nothing was sampled" in message
        assert phrase in message


def test_a_disk_that_fills_during_sampling_names_the_out_and_keeps_the_old_file(tmp_path, monkeypatch):
    """The location is checked before the work; a disk filled meanwhile fails the final write: one line naming
    --out and the fix, and an earlier file there is kept whole."""
    import errno
    import types

    from demasker import Demasker, DemaskerConfig
    from infra import atomic
    ckpt = tmp_path / "run"
    Demasker(DemaskerConfig.tiny(register_dim=0)).save_pretrained(ckpt / "demasker")
    (ckpt / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "dataprep.data", types.SimpleNamespace(load_tokenizer=lambda path: _CharTokenizer()))
    out = tmp_path / "s.jsonl"
    out.write_text("earlier\n")

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(atomic, "write_text", full)
    with pytest.raises(SystemExit) as refused:
        S.main(["--ckpt", str(ckpt), "--length", "8", "--num", "1", "--quiet", "--out", str(out)])
    message = str(refused.value)
    assert f"--out {out} could not be written (No space left on device)" in message and "free space" in message
    assert out.read_text() == "earlier\n"
