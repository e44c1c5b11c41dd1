"""Tests for extensions/prompting.py: prompted base / ConThenDisc / ConWithinDisc (App. H) and infilling."""

import math

import pytest
import torch

import generators as G
from extensions import prompting as PR
from demasker import Demasker, DemaskerConfig
from mdm import Decoding
from tiny_models import D, K, random_dit, tiny_encoder

L = 24


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    demasker = Demasker(DemaskerConfig.tiny(register_dim=D, max_registers=K)).eval()
    c = demasker.cfg
    dit = lambda seed: random_dit(seed, conditional=True, reads_condition=True)  # noqa: E731
    pprior = PR.PromptedPrior(G.Prior(dit(1), K, max_offset=0.2, encoder=tiny_encoder(c, 3)),
                              kappa=tiny_encoder(c, 4, 4))
    cond_prior = G.Prior(dit(2), K, max_offset=0.2, encoder=tiny_encoder(c, 3))
    return demasker, pprior, cond_prior


def prompted_canvas(cfg, lengths=(5, 9, 3)):
    """Rows BOS prompt [M]...: prompts of different lengths; and the prompts in the encoder layout."""
    g = torch.Generator().manual_seed(7)
    canvas = torch.full((len(lengths), L), cfg.mask_token_id)
    prompt_ids = torch.full((len(lengths), 12), cfg.eos_token_id)
    prompt_mask = torch.zeros(len(lengths), 12, dtype=torch.bool)
    for i, n in enumerate(lengths):
        canvas[i, 0] = cfg.bos_token_id
        canvas[i, 1:n] = torch.randint(0, 500, (n - 1,), generator=g)
        prompt_ids[i, :n] = canvas[i, :n]
        prompt_ids[i, n] = cfg.eos_token_id
        prompt_mask[i, :n + 1] = True
    return canvas, prompt_ids, prompt_mask


@pytest.mark.parametrize("method", ["base", "conthendisc", "conwithindisc"])
def test_prompt_tokens_never_change(models, method):
    demasker, pprior, _ = models
    canvas, prompt_ids, prompt_mask = prompted_canvas(demasker.cfg)
    fixed = canvas != demasker.cfg.mask_token_id
    seen = []
    if method == "base":
        tokens, report = PR.base_prompted(demasker, canvas, steps=7, temperature=1.0)
    elif method == "conthendisc":
        tokens, report = PR.conthendisc_prompted(demasker, pprior, canvas, prompt_ids, prompt_mask, steps=7,
                                                 temperature=1.0, prior_steps=4)
    else:
        tokens, report = PR.conwithindisc_prompted(demasker, pprior, canvas, prompt_ids, prompt_mask, steps=8,
                                                   temperature=1.0, prior_steps=4, refresh_prior_steps=3,
                                                   on_refresh=lambda step, x, old, new: seen.append((step, x.clone())))
        assert [s for s, _ in seen] == [4] and report["cond_prior_calls"] == 4 + 3 and report["encoder_calls"] == 1
        assert torch.equal(seen[0][1][fixed], canvas[fixed])  # the refresh read the prompt too
    assert torch.equal(tokens[fixed], canvas[fixed])
    assert not (tokens == demasker.cfg.mask_token_id).any()
    if method != "base":
        assert report["kappa_calls"] == 1 and report["nfe"] > report["demasker_calls"]


def test_kappa_is_called_once_however_many_refreshes(models):
    """The report's kappa_calls (and so the paper's NFE) is what really runs: the prompt's encoding is made
    once and reused by every refresh of prompted ConWithinDisc."""
    demasker, pprior, _ = models
    canvas, prompt_ids, prompt_mask = prompted_canvas(demasker.cfg)
    calls = []
    hook = pprior.kappa.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        _, report = PR.conwithindisc_prompted(demasker, pprior, canvas, prompt_ids, prompt_mask, steps=8,
                                              temperature=1.0, prior_steps=4, refresh_at=(0.25, 0.5, 0.75),
                                              refresh_prior_steps=2)
    finally:
        hook.remove()
    assert report["encoder_calls"] == 3 and report["kappa_calls"] == len(calls) == 1


def test_conwithindisc_without_refresh_is_conthendisc(models):
    demasker, pprior, _ = models
    canvas, prompt_ids, prompt_mask = prompted_canvas(demasker.cfg)
    runs = []
    for fn, extra in ((PR.conthendisc_prompted, {}), (PR.conwithindisc_prompted, {"refresh_at": ()})):
        torch.manual_seed(0)
        runs.append(fn(demasker, pprior, canvas, prompt_ids, prompt_mask, steps=6, temperature=1.0, prior_steps=4,
                       prior_generator=torch.Generator().manual_seed(5), **extra)[0])
    assert torch.equal(runs[0], runs[1])


def test_prompted_cond_withholds_the_xt_half_for_conthendisc(models):
    _, pprior, _ = models
    _, prompt_ids, prompt_mask = prompted_canvas(models[0].cfg)
    cond, mask = PR.prompted_cond(pprior, prompt_ids, prompt_mask)
    assert cond.shape == (3, K + 4, D) and mask[:, :K].eq(False).all() and mask[:, K:].all()
    xt = torch.randn(3, K, D)
    cond, mask = PR.prompted_cond(pprior, prompt_ids, prompt_mask, xt)
    assert mask.all() and torch.equal(cond[:, :K], xt)
    norms = cond[:, K:].norm(dim=-1)  # h_kappa's registers have the encoder's norm sqrt(d)
    assert torch.allclose(norms, torch.full_like(norms, math.sqrt(D)), atol=1e-3)


def test_the_prompt_changes_the_registers(models):
    _, pprior, _ = models
    _, prompt_ids, prompt_mask = prompted_canvas(models[0].cfg)
    same = torch.Generator().manual_seed(1)
    a, calls = PR.prompt_registers(pprior, prompt_ids, prompt_mask, 4, generator=same)
    b, _ = PR.prompt_registers(pprior, prompt_ids.flip(0), prompt_mask.flip(0), 4,
                               generator=torch.Generator().manual_seed(1))
    assert calls == 4 and not torch.allclose(a, b) and torch.allclose(a[1], b[1], atol=1e-5)  # row 1 kept its prompt


def test_infilling_keeps_every_context_token(models):
    demasker, _, cond_prior = models
    cfg = demasker.cfg
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 500, (2, L), generator=g)
    ids[:, 0], ids[:, -3:] = cfg.bos_token_id, cfg.eos_token_id
    span = torch.zeros(2, L, dtype=torch.bool)
    span[0, 4:10], span[1, 12:15] = True, True
    canvas = ids.masked_fill(span, cfg.mask_token_id)
    for tokens, report in (PR.infill(demasker, cond_prior, canvas, temperature=1.0, prior_steps=3),
                           PR.base_infill(demasker, canvas, temperature=1.0)):
        assert torch.equal(tokens[~span], ids[~span]) and not (tokens == cfg.mask_token_id).any()
        assert report["demasker_calls"] == 6  # default steps: the longest span, one token per step


def test_cfg_needs_one_prompt_length_and_zero_scale_is_plain(models):
    demasker, _, _ = models
    canvas, _, _ = prompted_canvas(demasker.cfg)
    with pytest.raises(ValueError, match="one prompt length per batch"):
        PR.base_prompted(demasker, canvas, steps=4, decoding=Decoding(cfg_scale=1.0))
    same, _, _ = prompted_canvas(demasker.cfg, (5, 5))
    plain = PR.base_prompted(demasker, same, steps=4, decoding=Decoding(cfg_scale=0.0))[0]
    assert torch.equal(plain, PR.base_prompted(demasker, same, steps=4)[0])
    guided, report = PR.base_prompted(demasker, same, steps=4, decoding=Decoding(cfg_scale=2.0))
    assert report["demasker_calls"] == 8 and torch.equal(guided[:, :5], same[:, :5])


def test_bad_canvases_are_refused(models):
    demasker, _, cond_prior = models
    full = torch.full((2, L), 5)
    with pytest.raises(ValueError, match="at least one \\[M\\]"):
        PR.base_prompted(demasker, full)
    with pytest.raises(ValueError, match="conditional prior"):
        PR.infill(demasker, G.Prior(cond_prior.dit, K), full)


# ------------------------------------------------------------------------------------------------
# Loading: a prompted prior pairs with one autoencoder and one kind of demasker
# ------------------------------------------------------------------------------------------------


def saved_runs(tmp_path, models, target="program"):
    """By hand, the folders the trainers write: an AE run (train_ae.py: encoder/, demasker/), a demasker fine-tuned
    on the answer's registers (experiments/train_prompted.py's OUT/ae) and a prompted prior of `target` paired with
    the one guided by that target. Returns (ae, tuned, prompted)."""
    import json
    import shutil

    from dataprep.latent_data import encoder_fingerprint
    demasker, pprior, _ = models
    ae, tuned, prompted = tmp_path / "ae", tmp_path / "tuned", tmp_path / "prompted"
    demasker.save_pretrained(ae / "demasker")
    pprior.prior.encoder.save_pretrained(ae / "encoder")
    shutil.copytree(ae, tuned)
    (tuned / "args.json").write_text(json.dumps({"fine_tuned_by": PR.FINE_TUNED_BY, "guide": "answer"}))
    pprior.prior.dit.save_pretrained(prompted / "dit")
    pprior.kappa.save_pretrained(prompted / "kappa")
    settings = {"ae": str(ae), "encoder_fingerprint": encoder_fingerprint(ae / "encoder"), "target": target,
                "guide": target, "demasker": str(ae if target == "program" else tuned), "num_registers": K,
                "cond_registers": K, "kappa_registers": 4, "max_offset": 0.2, "block_offsets": True,
                "shared_tokenizer": True, "seq_len": L, "encoder_seq_len": L}
    (prompted / PR.PROMPTED_SETTINGS_FILE).write_text(json.dumps(settings))
    return ae, tuned, prompted


@pytest.mark.parametrize("target", ["program", "answer"])
def test_a_prompted_prior_decodes_only_with_a_demasker_guided_by_its_target(models, tmp_path, target):
    """The AE's own demasker read h_phi of whole programs; a fine-tuned one records its guide. The prior's target
    must match the demasker that decodes (`ae`), else it would decode from registers it was never trained on."""
    ae, tuned, prompted = saved_runs(tmp_path, models, target)
    right, wrong = (ae, tuned) if target == "program" else (tuned, ae)
    for decoder in (right, None):  # None: the demasker prompted.json pairs it with
        pprior = PR.load_prompted_prior(prompted, ae=decoder)
        assert pprior.target == target and pprior.prior.encoder.cfg.num_registers == K
    with pytest.raises(ValueError, match=f"samples the registers of the {target}.*guided by the registers of the") as e:
        PR.load_prompted_prior(prompted, ae=wrong)
    assert str(right) in str(e.value) and f"--target {'answer' if target == 'program' else 'program'}" in str(e.value)
    assert PR.demasker_guide(ae) == "program" and PR.demasker_guide(tuned) == "answer"


def test_a_prompted_prior_refuses_another_encoder_and_a_record_without_its_fingerprint(models, tmp_path):
    import json
    import shutil

    from encoder import Encoder
    ae, _, prompted = saved_runs(tmp_path, models)
    other = tmp_path / "other"
    shutil.copytree(ae, other)
    encoder = Encoder.from_pretrained(str(other / "encoder"))
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)
    encoder.save_pretrained(other / "encoder")
    with pytest.raises(ValueError, match="has another encoder") as e:
        PR.load_prompted_prior(prompted, ae=other)
    assert str(other) in str(e.value) and str(ae) in str(e.value)
    record = prompted / PR.PROMPTED_SETTINGS_FILE
    settings = json.loads(record.read_text())
    del settings["encoder_fingerprint"]
    record.write_text(json.dumps(settings))
    for decoder in (None, ae):
        with pytest.raises(ValueError, match="records no encoder fingerprint.*experiments.train_prompted.*--overwrite"):
            PR.load_prompted_prior(prompted, ae=decoder)


def test_a_run_stopped_before_its_end_is_named_with_resume(tmp_path):
    (tmp_path / "p" / "train_state").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="--resume --out-dir"):
        PR.load_prompted_prior(tmp_path / "p")
