"""experiments/marginal_trap.py: the synthetic App. B corpus, the optimal-factorised reference, and Theorem B.1 in miniature."""

import itertools
import json
import math

import pytest
import torch

from experiments import marginal_trap as T
from experiments import trap_demo


def test_task_validity():
    task = T.TrapTask(pairs=2, choices=3)
    assert task.length == 4 and task.num_valid == 9 and task.vocab_size == 9
    b = task.bos_id
    x = torch.tensor([[b, 0, 2, 3, 5], [b, 0, 2, 3, 4], [b, 3, 2, 6, 5], [b, 1, 1, 4, 4]])
    assert task.is_valid(x).tolist() == [True, False, False, True]
    samples = task.sample(200, torch.Generator().manual_seed(0))
    assert task.is_valid(samples).all() and (samples[:, 0] == b).all()
    assert len({tuple(row) for row in samples.tolist()}) == task.num_valid  # all 9 appear


def exact_optimal_validity(task, steps):
    """Average over every reveal order of (1/A)^(pairs revealed together), LLaDA's per-step counts."""
    from schedules import num_transfer_tokens
    L, P = task.length, task.pairs
    counts = num_transfer_tokens(torch.ones(1, L, dtype=torch.bool), steps)[0].tolist()
    step_of_rank = [s for s, c in enumerate(counts) for _ in range(c)]
    total = 0.0
    orders = list(itertools.permutations(range(L)))
    for order in orders:
        step = {position: step_of_rank[rank] for rank, position in enumerate(order)}
        together = sum(step[i] == step[P + i] for i in range(P))
        total += (1.0 / task.choices) ** together
    return total / len(orders)


def test_optimal_factorized_validity():
    cat_dog = T.TrapTask(pairs=1, choices=2)  # App. B: (cat, meows) / (dog, barks)
    assert T.optimal_factorized_validity(cat_dog, steps=1) == 0.5  # eq. (8): 25% + 25% invalid
    assert T.optimal_factorized_validity(cat_dog, steps=2) == 1.0
    task = T.TrapTask(pairs=2, choices=2)
    for steps in (1, 2, 3, 4):
        exact = exact_optimal_validity(task, steps)
        assert math.isclose(T.optimal_factorized_validity(task, steps, trials=20000), exact, abs_tol=0.015)


@pytest.fixture(scope="module")
def trained():
    """Base MDM and encoder + guided demasker on 2 pairs over 2 choices (4 valid sequences), 100 steps each."""
    task = T.TrapTask(pairs=2, choices=2)
    torch.manual_seed(0)
    base = T.Demasker(T.demasker_config(task, width=32))
    encoder = T.Encoder(T.encoder_config(task, 2, 32))
    guided = T.Demasker(T.demasker_config(task, register_dim=32, max_registers=2, width=32))
    T.train_mdm(task, base, None, steps=100, batch_size=32)
    T.train_mdm(task, guided, encoder, steps=100, batch_size=32, seed=1)
    return task, base, encoder, guided


def test_guided_demasking_escapes_the_marginal_trap(trained):
    """Theorem B.1 in miniature: revealing all tokens in ONE step, the base MDM is valid about as often as the
    optimal factorised model (1/4 here), the guided one (registers of a valid sequence) nearly always."""
    task, base, encoder, guided = trained
    one_step_base = T.sample_validity(task, base, 1, num=256)["valid"]
    one_step_guided = T.sample_validity(task, guided, 1, num=256, encoder=encoder)
    assert one_step_base < 0.45 and one_step_guided["valid"] > 0.85
    assert one_step_guided["distinct_valid"] == 1.0  # all 4 valid sequences, not one mode
    assert one_step_guided["tokens_per_step"] == task.length
    assert T.sample_validity(task, base, task.length, num=256)["valid"] > 0.8  # one token per step: fine


def test_threshold_decoding_validity_vs_tokens_per_step(trained):
    """tau above the marginal 1/A: the base reveals the forced token of a fresh pair, then its partner at the next
    step (valid, one token per step); tau below 1/A: every slot at step one (L tokens per step), back in the trap.
    A guided model is confident everywhere: valid at well over 2 tokens per step."""
    from mdm import Decoding
    task, base, encoder, guided = trained
    careful = T.sample_validity(task, base, task.length, 256, decoding=Decoding(rule="threshold", threshold=0.9))
    greedy = T.sample_validity(task, base, task.length, 256, decoding=Decoding(rule="threshold", threshold=0.0))
    assert careful["valid"] > 0.8 and 1.0 <= careful["tokens_per_step"] <= 1.2
    assert greedy["tokens_per_step"] == task.length and greedy["valid"] < 0.45
    fast = T.sample_validity(task, guided, task.length, 256, encoder=encoder,
                             decoding=Decoding(rule="threshold", threshold=0.5))
    assert fast["valid"] > 0.85 and fast["tokens_per_step"] > 2.5


def test_learned_prior_generates_valid_sequences(trained):
    """ConThenDisc with a prior trained on the trap's register bank: far above the base MDM at one step, its
    registers of the encoder's norm sqrt(d); the training loss falls."""
    task, _, encoder, guided = trained
    prior, losses = T.train_prior(task, encoder, steps=150, batch_size=64, bank_size=512, width=32)
    assert sum(losses[-10:]) < 0.6 * sum(losses[:10])
    registers, refresh = T.prior_source(task, prior, prior_steps=16)(8, torch.Generator().manual_seed(0))
    assert refresh is None and registers.shape == (8, 2, 32)
    assert torch.allclose(registers.norm(dim=-1), torch.full((8, 2), 32 ** 0.5), atol=1e-4)
    one_step = T.sample_validity(task, guided, 1, 256, source=T.prior_source(task, prior, prior_steps=16))
    assert one_step["valid"] > 0.5


def test_conwithindisc_refreshes_once_at_half_the_slots(trained):
    """The refresh hook redraws from the conditional prior at the first canvas with >= half of the slots
    revealed (and not all), once; a 1-step decode (nothing half revealed before the step) never refreshes."""
    task, _, encoder, guided = trained
    prior, _ = T.train_prior(task, encoder, steps=2, batch_size=8, bank_size=16, width=32)
    cond_prior, _ = T.train_prior(task, encoder, conditional=True, steps=2, batch_size=8, bank_size=16, width=32)
    assert cond_prior.conditional and cond_prior.encoder is encoder
    registers, refresh = T.prior_source(task, prior, cond_prior, 4, 4)(3, torch.Generator().manual_seed(0))
    x = task.sample(3)
    canvas = x.clone()
    canvas[:, 1:] = task.mask_id
    assert refresh(0, canvas, registers, None) is None  # nothing revealed
    canvas[:, 1:3] = x[:, 1:3]  # 2 of 4 slots
    new, mask = refresh(1, canvas, registers, None)
    assert new.shape == registers.shape and mask is None and not torch.allclose(new, registers)
    canvas[:, 3] = x[:, 3]
    assert refresh(2, canvas, registers, None) is None  # once only
    calls = []
    source = T.prior_source(task, prior, cond_prior, 4, 4)

    def spy(count, generator):
        registers, hook = source(count, generator)
        return registers, lambda *a: calls.append(a[0]) or hook(*a)
    T.sample_validity(task, guided, task.length, 8, source=spy)
    assert calls == [0, 1, 2, 3]  # the hook sees every step (it returns new registers at step 2 only)


@pytest.mark.parametrize("conditioning", ["hmu", "xt"])
def test_jointly_trained_conditioning_is_what_the_prior_reads(trained, conditioning):
    """Sec. 4.3.2 comments (iii) / (ii): the conditional prior's conditioning module (h_mu, initialised from h_phi,
    or CanvasTokens) is trained with the DiT, and that trained module (its EMA) is what embeds x_t at sampling
    time; h_phi itself is left as it was. The frozen variant keeps h_phi."""
    task, _, encoder, _ = trained
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    cond_prior, losses = T.train_prior(task, encoder, conditional=True, steps=30, batch_size=16, bank_size=64,
                                       width=32, conditioning=conditioning)
    assert cond_prior.conditional and cond_prior.encoder is not encoder and all(map(math.isfinite, losses))
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())  # h_phi untouched
    if conditioning == "hmu":
        trained_mu = cond_prior.encoder.state_dict()
        assert trained_mu.keys() == before.keys()
        assert any(not torch.allclose(trained_mu[k].float(), before[k].float()) for k in before)  # h_mu moved
    else:
        assert isinstance(cond_prior.encoder, T.CanvasTokens)
    x = task.sample(4, torch.Generator().manual_seed(1))
    canvas = x.clone()
    canvas[:, 2:] = task.mask_id
    from generators import embed_canvas
    cond, _ = embed_canvas(cond_prior.encoder, canvas, task.mask_id, T.eos_id(task))  # what ConWithinDisc presents
    ids, attention, hide = T.canvas_inputs(task, canvas, cond_prior.encoder.cfg.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(cond, cond_prior.encoder(ids, attention_mask=attention, hide=hide).float())
    prior, _ = T.train_prior(task, encoder, steps=2, batch_size=8, bank_size=16, width=32)
    registers, refresh = T.prior_source(task, prior, cond_prior, 2, 2)(4, torch.Generator().manual_seed(0))
    half = canvas.clone()
    half[:, 2] = x[:, 2]  # 2 of 4 slots revealed: the redraw is due
    new, _ = refresh(1, half, registers, None)
    assert new.shape == registers.shape == (4, 2, 32) and torch.isfinite(new).all()
    frozen, _ = T.train_prior(task, encoder, conditional=True, steps=2, batch_size=8, bank_size=16, width=32)
    assert frozen.encoder is encoder
    with pytest.raises(ValueError, match="conditioning"):
        T.train_prior(task, encoder, conditional=True, steps=1, conditioning="nope")


def test_run_rows_per_conditioning():
    """One ConWithinDisc row per conditioning asked for, fractions in [0, 1]; the frozen row keeps its key; the
    conditionings do not change each other's numbers (each prior has its own seed)."""
    kwargs = {"pairs": 2, "choices": 2, "train_steps": 3, "batch_size": 8, "num_samples": 8, "width": 32,
              "trials": 50, "remaskings": ("random",), "thresholds": (), "prior_steps": 2, "refresh_prior_steps": 2,
              "prior_train_steps": 3, "log": lambda message: None}
    every = T.run(conditionings=("frozen", "hmu", "xt"), **kwargs)
    for row in every["rows"]:
        for method in ("conwithindisc", "conwithindisc_hmu", "conwithindisc_xt"):
            assert 0 <= row[f"{method}_random"] <= 1
    assert every["training"]["conditionings"] == ["frozen", "hmu", "xt"]
    assert set(every["sampling"]["conditionings"]) == {"frozen", "hmu", "xt"}
    only = T.run(conditionings=("hmu",), **kwargs)
    assert "conwithindisc_random" not in only["rows"][0]
    for key in ("conwithindisc_hmu_random", "conthendisc_random"):
        assert [r[key] for r in only["rows"]] == [r[key] for r in every["rows"]]
    text, _ = T.report(every)
    assert T.LABELS["conwithindisc_hmu"] in text and T.LABELS["conwithindisc_xt"] in text
    with pytest.raises(ValueError, match="unknown conditioning"):
        T.run(conditionings=("frozen", "hphi"), **kwargs)


def test_run_returns_every_row():
    result = T.run(pairs=2, choices=2, train_steps=3, batch_size=8, num_samples=8, width=32, trials=100,
                   remaskings=("random",), thresholds=(0.5,), prior_steps=2, refresh_prior_steps=2,
                   log=lambda message: None)
    assert [row["steps"] for row in result["rows"]] == [4, 2, 1]
    methods = ("base", "guided", "conthendisc", "conwithindisc", "conwithindisc_hmu")  # default: frozen, hmu
    assert set(result["rows"][0]) == {"steps", "tokens_per_step", "optimal_factorized_random"} | {
        f"{m}_random{d}" for m in methods for d in ("", "_distinct")}
    assert [(r["method"], r["threshold"]) for r in result["threshold_rows"]] == [(m, 0.5) for m in methods]
    assert all(1 <= r["tokens_per_step"] <= 4 for r in result["threshold_rows"])
    assert result["task"]["chance_valid_at_one_step"] == 0.25
    text, panels = T.report(result)
    assert "guided (oracle registers)" in text and "ConWithinDisc" in text and "0.5 |" in text
    assert [p["title"] for p in panels] == ["App. B: valid vs tokens per step (random)", "App. B: threshold decoding"]


def test_cli_prints_and_writes_the_demo_table(tmp_path, capsys):
    """demo.sh's first stage (python -m experiments.trap_demo) end to end at tiny settings: the heading, the
    five rows (ConWithinDisc with frozen h_phi and with h_mu by default) over tokens per step 1, 2, 4, the one-line
    reading; the JSON table; --reuse prints it back."""
    out = tmp_path / "trap" / "table.json"
    argv = ["--pairs", "2", "--choices", "2", "--train-steps", "3", "--prior-train-steps", "2", "--samples", "8",
            "--trials", "50", "--out", str(out), "--reuse"]
    payload = trap_demo.main(argv)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("The marginal trap (App. B)") and printed[-1].startswith("Theorem B.1 predicts")
    assert len(printed) == 1 + 6 + 1  # heading, header + five rows, reading
    saved = json.loads(out.read_text())
    assert saved["tokens_per_step"] == [1, 2, 4]
    assert [r["method"] for r in saved["rows"]] == ["base", "optimal_factorized", "conthendisc", "conwithindisc",
                                                     "conwithindisc_hmu"]
    assert "frozen h_phi" in saved["rows"][3]["label"] and "h_mu" in saved["rows"][4]["label"]
    assert saved["settings"]["conditioning"] == "frozen,hmu" and "h_mu" in printed[-1]
    for row in saved["rows"]:
        assert len(row["valid"]) == 3 and all(math.isfinite(v) and 0 <= v <= 1 for v in row["valid"])
        assert row["label"] in saved["text"]
    assert saved["rows"][1]["valid"][0] == 1.0 and saved["rows"][1]["valid"][-1] == 0.25  # eq. 8: (1/2)^2
    assert saved["settings"]["train_steps"] == 3 and saved["seconds"] >= 0 and payload["text"] == saved["text"]
    trap_demo.main(argv)  # same settings: reused, not retrained
    again = capsys.readouterr().out
    assert "(reused: " in again and saved["text"] in again and "training" not in again
    trap_demo.main(argv[:-3] + ["--seed", "1", "--out", str(out), "--reuse"])  # other settings: trained again
    assert "training again" in capsys.readouterr().out and json.loads(out.read_text())["settings"]["seed"] == 1
    trap_demo.main(argv[:-3] + ["--seed", "1", "--conditioning", "xt,frozen", "--out", str(out), "--reuse"])
    assert "training again" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["settings"]["conditioning"] == "frozen,xt"
    assert [r["method"] for r in saved["rows"]][3:] == ["conwithindisc", "conwithindisc_xt"]


def test_cli_rejects_bad_flags(capsys):
    for argv in (["--reuse"], ["--samples", "0"], ["--choices", "1"], ["--threads", "-1"], ["--conditioning", "hphi"],
                 ["--conditioning", "hmu,hmu"]):
        with pytest.raises(SystemExit):
            trap_demo.parse_args(argv)
    assert "--reuse needs --out" in capsys.readouterr().err

