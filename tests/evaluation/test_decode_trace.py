"""evaluation/decode_trace.py: recording the canvas at every step, without changing samples or RNG; the HTML page."""

import math

import torch

from evaluation import decode_trace as T
import generators as G
from demasker import Demasker, DemaskerConfig
from encoder import Encoder, EncoderConfig
from latent_dit import DiTConfig, LatentDiT
from sample import generate

K, D = 4, 64


class CharTokenizer:
    """decode(ids) -> one letter per id, so a program's text is known exactly."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def tiny_models():
    torch.manual_seed(0)
    demasker = Demasker(DemaskerConfig.tiny(register_dim=D, max_registers=K)).eval()
    cfg = demasker.cfg
    encoder = Encoder(EncoderConfig.tiny(vocab_size=cfg.vocab_size, hidden_size=D, num_registers=K,
                                         pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id)).eval()
    dits = []
    for seed, cond in ((1, None), (2, D)):
        torch.manual_seed(seed)
        dit = LatentDiT(DiTConfig.tiny(register_dim=D, num_registers=K, cond_dim=cond))
        with torch.no_grad():
            dit.final_layer.linear.weight.normal_(0, 0.2)
        dits.append(dit.eval())
    return demasker, G.Prior(dits[0], K, max_offset=0.2), G.Prior(dits[1], K, max_offset=0.2, encoder=encoder)


def test_tracing_changes_neither_samples_nor_the_rng_stream():
    demasker, _, _ = tiny_models()
    mask_id = demasker.cfg.mask_token_id
    plain_gen, traced_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain, _ = generate(demasker, 3, gen_length=16, block_length=8, steps=8, temperature=1.0, generator=plain_gen)
    traced = T.Trace(demasker, mask_id, label="base")
    tokens, nfe = generate(traced, 3, gen_length=16, block_length=8, steps=8, temperature=1.0, generator=traced_gen)
    traced.finish(tokens)
    assert torch.equal(plain, tokens) and nfe == 8
    assert torch.equal(plain_gen.get_state(), traced_gen.get_state())
    # frame 0 is all [M]; each step reveals 16 / 8 = 2 tokens; the last frame is the output
    assert len(traced.steps) == 9
    assert all(t == mask_id for t in traced.steps[0]["canvas"][0])
    assert all(len(step["revealed"][row]) == 2 for step in traced.steps[1:] for row in range(3))
    assert traced.steps[-1]["canvas"] == tokens.tolist()
    for step in traced.steps[1:]:
        for row in range(3):
            assert all(0 <= p <= 1 for p in step["confidence"][row])


def test_confidence_is_the_probability_of_the_placed_token():
    demasker, _, _ = tiny_models()
    traced = T.Trace(demasker, demasker.cfg.mask_token_id)
    tokens, _ = generate(traced, 1, gen_length=8, block_length=8, steps=8)  # greedy, one token per step
    traced.finish(tokens)
    x0 = torch.tensor(traced.steps[0]["canvas"])
    with torch.no_grad():
        probs = torch.softmax(demasker(x0).float(), -1)[0]  # (L, V) at the first step
    pos = traced.steps[1]["revealed"][0][0]
    assert math.isclose(traced.steps[1]["confidence"][0][0], float(probs[pos].max()), rel_tol=1e-3)
    assert int(probs[pos].argmax()) == tokens[0, pos]  # greedy: the most confident token, placed


def test_page_holds_every_step_and_ends_with_the_sample_text(tmp_path):
    demasker, prior, cond_prior = tiny_models()
    mask_id, eos_id = demasker.cfg.mask_token_id, demasker.cfg.eos_token_id
    base = T.Trace(demasker, mask_id, label="base MDM")
    base_tokens, _ = generate(base, 2, gen_length=16, block_length=16, steps=8, generator=torch.Generator().manual_seed(1))
    base.finish(base_tokens)
    within = T.Trace(demasker, mask_id, label="ConWithinDisc")
    within_tokens, _ = G.conwithindisc(within, cond_prior, 2, gen_length=16, steps=8, prior=prior, prior_steps=3,
                                       refresh_at=(0.5,), refresh_prior_steps=3,
                                       prior_generator=torch.Generator().manual_seed(2))
    within.finish(within_tokens)
    tok = CharTokenizer()
    panels = [T.panel(base, 0, tok, eos_id), T.panel(within, 1, tok, eos_id)]
    assert [r["step"] for r in panels[1]["refresh"]] == [5]  # redrawn before step 5 of 8 (refresh_at 0.5)
    assert panels[1]["refresh"][0]["cosine"] < 0.9999 and panels[0]["refresh"] == []
    path = T.write_html(tmp_path / "trace.html", panels, title="base vs ConWithinDisc")
    page = path.read_text()
    assert "http" not in page and "<script src" not in page and "<link" not in page  # self-contained
    stored = T.read_panels(path)
    assert stored == panels and all(len(p["canvases"]) == 9 for p in stored)
    for p, tokens in zip(stored, (base_tokens[0], within_tokens[1])):
        ids = tokens.tolist()
        program = ids[:ids.index(eos_id)] if eos_id in ids else ids
        assert T.text_at(p, len(p["canvases"]) - 1) == tok.decode(program)
        assert set(T.text_at(p, 0)) <= {"_"}  # nothing revealed at the start
