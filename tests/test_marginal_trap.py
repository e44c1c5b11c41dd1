"""marginal_trap.py: the synthetic App. B corpus, the optimal-factorised reference, and Theorem B.1 in miniature."""

import itertools
import math

import pytest
import torch

import marginal_trap as T




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


def test_guided_demasking_escapes_the_marginal_trap():
    """Theorem B.1 in miniature: revealing all tokens in ONE step, the base MDM is valid about as often as the
    optimal factorised model (1/4 here), the guided one (registers of a valid sequence) nearly always."""
    task = T.TrapTask(pairs=2, choices=2)
    torch.manual_seed(0)
    base = T.Demasker(T.demasker_config(task, width=32))
    encoder = T.Encoder(T.encoder_config(task, 2, 32))
    guided = T.Demasker(T.demasker_config(task, register_dim=32, max_registers=2, width=32))
    T.train_mdm(task, base, None, steps=100, batch_size=32)
    T.train_mdm(task, guided, encoder, steps=100, batch_size=32, seed=1)
    one_step_base = T.sample_validity(task, base, 1, num=256)["valid"]
    one_step_guided = T.sample_validity(task, guided, 1, num=256, encoder=encoder)
    assert one_step_base < 0.45 and one_step_guided["valid"] > 0.85
    assert one_step_guided["distinct_valid"] == 1.0  # all 4 valid sequences, not one mode
    assert T.sample_validity(task, base, task.length, num=256)["valid"] > 0.8  # one token per step: fine


def test_run_returns_every_row():
    result = T.run(pairs=2, choices=2, train_steps=3, batch_size=8, num_samples=8, width=32, trials=100,
                   remaskings=("random",), log=lambda message: None)
    assert [row["steps"] for row in result["rows"]] == [4, 2, 1]
    assert set(result["rows"][0]) == {"steps", "tokens_per_step", "optimal_factorized_random", "base_random",
                                      "base_random_distinct", "guided_random", "guided_random_distinct"}
    assert result["task"]["chance_valid_at_one_step"] == 0.25
