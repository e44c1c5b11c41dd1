"""extensions/cadd.py: the schedule, the forward marginal, the fused input, z0_hat, the Gaussian posterior, the sampler."""

import dataclasses
import math

import pytest
import torch

from extensions import cadd
from demasker import Demasker, DemaskerConfig
from mdm import generate


def tiny(schedule="linear", **over):
    torch.manual_seed(0)
    return Demasker(DemaskerConfig.tiny(vocab_size=64, mask_token_id=63, eos_token_id=62, bos_token_id=61,
                                        pad_token_id=62, register_dim=0, max_registers=0, cadd_schedule=schedule,
                                        **over)).eval()


def test_schedules_run_from_clean_to_noise():
    t = torch.tensor([0.0, 0.5, 1.0])
    linear, cosine = cadd.gamma_bar(t, "linear"), cadd.gamma_bar(t, "cosine")
    eps = cadd.SCHEDULE_EPS
    assert torch.allclose(linear, torch.tensor([1 - eps, 0.5, eps]))
    assert torch.allclose(cosine, torch.tensor([1 - eps, (1 - 2 * eps) * (1 - 0.5 ** 0.5) + eps, eps]))
    assert (cadd.gamma_bar(torch.linspace(0, 1, 11), "cosine").diff() < 0).all()
    with pytest.raises(ValueError, match="schedule must be one of"):
        cadd.gamma_bar(t, "sigmoid")


def test_config_rejects_unknown_cadd_settings():
    with pytest.raises(ValueError, match="cadd_schedule"):
        DemaskerConfig.tiny(cadd_schedule="sigmoid")


def test_no_or_zero_latents_equal_the_plain_demasker():
    model = tiny()
    x = torch.randint(0, 60, (2, 12))
    x[:, 3:9] = 63
    plain = model(x)
    assert torch.equal(model(x, latents=torch.zeros(2, 12, 64)), plain)
    # gamma_bar = 0 everywhere (no signal) with the noise at its mean 0: the fused latents are 0, the demasker is plain
    zero = cadd.forward_latents(torch.randn(2, 12, 64), torch.zeros(2, 1), torch.zeros(2, 12, 64))
    assert torch.equal(model(x, latents=zero), plain)
    # latents are added only at [M]: changing them at revealed positions changes nothing
    latents = torch.randn(2, 12, 64)
    moved = latents.clone()
    moved[:, :3] += 5.0
    assert torch.equal(model(x, latents=latents), model(x, latents=moved))
    assert not torch.allclose(model(x, latents=latents), plain)
    with pytest.raises(ValueError, match="latents must be"):
        model(x, latents=torch.zeros(2, 12, 8))


def test_forward_marginal_matches_the_closed_form():
    torch.manual_seed(1)
    z0 = torch.randn(1, 1, 16).expand(20000, 1, 16)
    for gb in (0.0, 0.3, 0.9):
        z = cadd.forward_latents(z0, torch.full((20000, 1), gb), torch.randn(20000, 1, 16))
        assert torch.allclose(z.mean(0), gb ** 0.5 * z0[0], atol=0.03)
        assert torch.allclose(z.var(0), torch.full((1, 16), 1 - gb), atol=0.04)
    # at gamma_bar = 0 the latent is independent of the token: the same law for two different z0
    a = cadd.forward_latents(torch.ones(20000, 4), torch.zeros(20000), torch.randn(20000, 4))
    assert a.mean().abs() < 0.02 and (a.var() - 1).abs() < 0.03


def test_training_latents_units_and_gradients():
    model = tiny()
    x0 = torch.randint(0, 60, (3, 8))
    noise = cadd.training_noise([0, 1, 2], 0, 8, 64)
    assert torch.equal(noise, cadd.training_noise([0, 1, 2], 0, 8, 64))  # a pure function of the stream position
    table, scale = cadd.latent_table(model)
    assert abs(float(table.detach().pow(2).mean()) - 1.0) < 1e-4
    clean = cadd.training_latents(model, x0, torch.zeros(3), torch.zeros_like(noise))  # t = 0: the own embedding
    assert torch.allclose(clean, model.wte(x0) * (1 - cadd.SCHEDULE_EPS) ** 0.5, atol=1e-5)
    clean.sum().backward()
    assert model.wte.weight.grad is not None and model.wte.weight.grad.abs().sum() > 0
    frozen = tiny(cadd_table="frozen")
    assert not cadd.training_latents(frozen, x0, torch.zeros(3), noise).requires_grad  # no gradient into w


def test_hard_and_soft_agree_on_one_hot_predictions():
    table = torch.randn(10, 5)
    probs = torch.nn.functional.one_hot(torch.tensor([[3, 7, 0]]), 10).float()
    hard = cadd.estimate_z0(probs, table, 0.0)
    assert torch.allclose(hard, cadd.estimate_z0(probs, table, 1.0), atol=1e-6)
    assert torch.allclose(hard, cadd.estimate_z0(probs, table, 0.4), atol=1e-6)
    assert torch.equal(hard, table[[3, 7, 0]][None])
    spread = torch.full((1, 1, 10), 0.1)
    assert torch.allclose(cadd.estimate_z0(spread, table, 1.0), table.mean(0)[None, None], atol=1e-6)
    with pytest.raises(ValueError, match="softness"):
        cadd.estimate_z0(probs, table, 1.5)


def test_posterior_matches_monte_carlo_regression():
    """z_s ~ q(z_s | z0), z_t = sqrt(g) z_s + sqrt(1 - g) e: E[z_s | z_t] = a z0 + b z_t, Var = var."""
    torch.manual_seed(2)
    gb_s, gb_t, z0, n = torch.tensor(0.7), torch.tensor(0.2), 1.5, 400000
    z_s = gb_s.sqrt() * z0 + (1 - gb_s).sqrt() * torch.randn(n)
    g = gb_t / gb_s
    z_t = g.sqrt() * z_s + (1 - g).sqrt() * torch.randn(n)
    a, b, var = cadd.posterior_coefficients(gb_t, gb_s)
    slope = ((z_t - z_t.mean()) * (z_s - z_s.mean())).mean() / z_t.var()
    intercept = z_s.mean() - slope * z_t.mean()
    assert abs(float(slope - b)) < 0.01 and abs(float(intercept - a * z0)) < 0.01
    assert abs(float((z_s - intercept - slope * z_t).var() - var)) < 0.01
    same = cadd.posterior_coefficients(gb_t, gb_t)  # nothing revealed: the latent stays
    assert float(same[0]) == 0.0 and abs(float(same[1]) - 1.0) < 1e-6 and float(same[2]) == 0.0


@pytest.mark.parametrize("softness,num_latents,noise", [(0.0, 1, False), (1.0, 1, True), (0.5, 3, False)])
def test_sampler_never_changes_revealed_tokens(softness, num_latents, noise):
    model = tiny("cosine")
    prompt = torch.randint(0, 60, (2, 4))
    seen = []

    class Spy(torch.nn.Module):  # records every canvas the decoder sees
        def __init__(self):
            super().__init__()
            self.inner = cadd.CaddDecoder(model, softness, num_latents, noise, gen_start=4,
                                          generator=torch.Generator().manual_seed(0))
            self.cfg = model.cfg

        def forward(self, x, **kw):
            seen.append(x.clone())
            return self.inner(x, **kw)

    out, nfe = generate(Spy(), prompt, 12, 4, 6, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert nfe == 6 and len(seen) == 6 and (out != 63).all() and torch.equal(out[:, :4], prompt)
    for before, after in zip(seen, seen[1:] + [out]):
        revealed = before != 63
        assert torch.equal(after[revealed], before[revealed])
    tokens, k_nfe = cadd.cadd_generate(model, prompt, 12, 4, 6, 1.0, softness=softness, num_latents=num_latents,
                                       posterior_noise=noise, generator=torch.Generator().manual_seed(1),
                                       latent_generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens, out) and k_nfe == 6 * num_latents


def test_latents_move_toward_the_estimate():
    model = tiny()
    decoder = cadd.CaddDecoder(model, generator=torch.Generator().manual_seed(0))
    x = torch.full((1, 8), 63)
    decoder(x)
    start, target = decoder.z.clone(), decoder.z0_hat.clone()
    x[0, :4] = 5  # half revealed: t 1 -> 0.5
    decoder(x)
    a, b, _ = cadd.posterior_coefficients(cadd.gamma_bar(torch.tensor([1.0]), "linear"),
                                          cadd.gamma_bar(torch.tensor([0.5]), "linear"))
    assert torch.allclose(decoder.z, a * target + b * start, atol=1e-5)


def test_plain_and_cadd_demaskers_are_not_mixed_up():
    plain = tiny("none")
    with pytest.raises(ValueError, match="trained without CADD"):
        cadd.CaddDecoder(plain)
    with pytest.raises(ValueError, match="is a CADD demasker"):
        cadd.check_cadd(tiny(), wanted=False)
    cfg = dataclasses.replace(plain.cfg, cadd_schedule="cosine")
    assert DemaskerConfig.from_dict(cfg.to_dict()).cadd_schedule == "cosine"
    old = {k: v for k, v in plain.cfg.to_dict().items() if not k.startswith("cadd_")}
    assert DemaskerConfig.from_dict(old).cadd_schedule == "none"  # a checkpoint saved before CADD: a plain MDM


# ------------------------------------------------------------------------------------------------
# train_ae.py --cadd: a few real steps, the checkpoint records the settings, loading is checked
# ------------------------------------------------------------------------------------------------

PROGRAMS = [f"def f{i}(x, y):\n    return x {'+-*'[i % 3]} y * {i + 2}" for i in range(11)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    import json

    from dataprep import data
    folder = tmp_path_factory.mktemp("cadd_data")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "path": f"prog_{i}.py"}) + "\n" for i, t in enumerate(PROGRAMS)))
    data.build_dataset(folder / "cache", corpus, seq_len=32, vocab_size=320, overlong="drop")
    return folder / "cache"


def train_args(cache, out_dir, *extra):
    import train_ae
    return train_ae.parse_args(["--data", str(cache), "--seq-len", "32", "--out-dir", str(out_dir),
                                "--num-registers", "4", "--global-batch-size", "8", "--micro-batch-size", "4",
                                "--warmup-steps", "1", "--log-interval", "1", "--max-steps", "3",
                                "--eval-interval", "3", "--val-programs", "2", "--threads", "1", *extra])


def losses(folder):
    import json
    return [json.loads(line) for line in open(folder / "log.jsonl")]


def test_train_ae_cadd_trains_saves_and_loads(cache, tmp_path, capsys):
    import json

    import train_ae
    train_ae.train(train_args(cache, tmp_path / "base", "--no-registers"))
    train_ae.train(train_args(cache, tmp_path / "cadd", "--no-registers", "--cadd", "--cadd-schedule", "cosine"))
    train_ae.train(train_args(cache, tmp_path / "both", "--cadd"))  # CADD + registers
    base, plain = losses(tmp_path / "cadd"), losses(tmp_path / "base")
    assert all(math.isfinite(r["loss"]) for r in base if r["type"] == "train")
    # the same data, masks and init: only the latents differ, so the very first loss differs
    assert base[0]["loss"] != plain[0]["loss"]
    val = [r for r in base if r["type"] == "val"][0]["results"]["base"]  # with latents at the ratio's gamma_bar
    assert all(math.isfinite(c) and c > 0 for c in val["ce"])
    config = json.loads((tmp_path / "cadd" / "checkpoint" / "demasker" / "config.json").read_text())
    assert (config["cadd_schedule"], config["cadd_table"]) == ("cosine", "own")
    loaded = Demasker.from_pretrained(str(tmp_path / "cadd" / "checkpoint" / "demasker"))
    assert loaded.cfg.cadd_schedule == "cosine"
    tokens, nfe = cadd.cadd_generate(loaded.eval(), 2, 8, 8, 4, 1.0, generator=torch.Generator().manual_seed(0),
                                     latent_generator=torch.Generator().manual_seed(1))
    assert tokens.shape == (2, 8) and nfe == 4 and (tokens != loaded.cfg.mask_token_id).all()
    plain_model = Demasker.from_pretrained(str(tmp_path / "base" / "checkpoint" / "demasker"))
    assert plain_model.cfg.cadd_schedule == "none"
    with pytest.raises(ValueError, match="trained without CADD"):
        cadd.CaddDecoder(plain_model)
    with pytest.raises(ValueError, match="is a CADD demasker"):
        cadd.check_cadd(loaded, wanted=False)
    both = Demasker.from_pretrained(str(tmp_path / "both" / "checkpoint" / "demasker"))
    assert both.cfg.register_dim > 0 and both.cfg.cadd_schedule == "linear"
    # resuming with another CADD setting is refused (the objective changes)
    with pytest.raises(SystemExit):
        train_ae.parse_args(["--out-dir", str(tmp_path / "cadd"), "--resume", "--cadd-schedule", "linear"])
    assert "--cadd-schedule: run 'cosine', now 'linear'" in capsys.readouterr().err


def test_k_latents_average_the_probabilities_of_each_latent():
    model = tiny()
    x = torch.randint(0, 60, (2, 8))
    x[:, 2:] = 63
    decoder = cadd.CaddDecoder(model, num_latents=3, generator=torch.Generator().manual_seed(4))
    logits = decoder(x)
    _, scale = cadd.latent_table(model)
    each = [torch.softmax(model(x, latents=scale * decoder.z[k]), dim=-1) for k in range(3)]
    assert torch.allclose(logits.exp(), torch.stack(each).mean(0), atol=1e-5)
    assert torch.allclose(logits.exp().sum(-1), torch.ones(2, 8), atol=1e-5)


def test_sample_py_samples_a_cadd_checkpoint_with_the_cadd_sampler(cache, tmp_path, capsys):
    """sample.py --method base on a train_ae.py --no-registers --cadd run: extensions/cadd.py's sampler, with the
    --cadd-* options, the same tokens as cadd_generate under sample.py's per-batch seeds; what does not fit is named."""
    import json

    import sample
    import train_ae
    from mdm import Decoding
    train_ae.train(train_args(cache, tmp_path / "cadd", "--no-registers", "--cadd"))
    train_ae.train(train_args(cache, tmp_path / "base", "--no-registers"))
    common = ["--method", "base", "--gen-length", "8", "--steps", "4", "--num", "3", "--batch-size", "2",
              "--temperature", "1", "--device", "cpu", "--quiet"]
    options = ["--cadd-softness", "0.5", "--cadd-latents", "2", "--cadd-posterior-noise"]
    sample.main(["--ckpt", str(tmp_path / "cadd"), *common, *options, "--out", str(tmp_path / "s.jsonl")])
    records = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    demasker = Demasker.from_pretrained(str(tmp_path / "cadd" / "checkpoint" / "demasker")).eval()
    for first, count in ((0, 2), (2, 1)):
        seed = sample.batch_seed(0, first)
        torch.manual_seed(seed)
        tokens, nfe = cadd.cadd_generate(demasker, count, 8, 8, 4, 1.0, softness=0.5, num_latents=2,
                                         posterior_noise=True, latent_generator=torch.Generator().manual_seed(seed + 1),
                                         decoding=Decoding())
        assert [r["tokens"] for r in records[first:first + count]] == tokens.tolist()
        assert all(r["nfe"] == nfe == 8 and r["cadd_latents"] == 2 and r["cadd_softness"] == 0.5
                   for r in records[first:first + count])
    sample.main(["--ckpt", str(tmp_path / "cadd"), *common, "--trace", str(tmp_path / "t.html"),
                 "--out", str(tmp_path / "t.jsonl")])  # the defaults: hard z0_hat, one latent; traced
    assert (tmp_path / "t.html").is_file()
    refusals = [(["--ckpt", str(tmp_path / "base"), *common, "--cadd-latents", "2"], "--cadd-latents applies to a CADD"),
                (["--ckpt", str(tmp_path / "cadd"), *common, "--cache", "prefix"], "--cache applies to a non-CADD"),
                (["--ckpt", str(tmp_path / "cadd"), *common, "--infill", "a<|span|>b"], "--infill applies to"),
                (["--ckpt", str(tmp_path / "cadd"), *common[2:], "--method", "conthendisc", "--prior", "p"],
                 "sample.py samples it with --method base"),
                (["--ckpt", str(tmp_path / "cadd"), *common, *options, "--trace", "t.html"], "drop --trace or --cadd")]
    for argv, message in refusals:
        with pytest.raises(SystemExit) as stop:
            sample.main(argv + ["--out", str(tmp_path / "x.jsonl")])
        assert message in str(stop.value) + capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
