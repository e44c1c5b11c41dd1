"""NFE, the way the CRoCoDiL paper counts it, and a FLOP-based equivalent: the cost reports of generators.py.

Paper map (arXiv 2603.20210): Sec. 5 footnote 4, Fig. 6, App. G ("adding less than 2 to the NFE"). The paper's
NFE is the number of demasker calls plus every other model's calls weighted by its size,
    nfe = demasker calls + sum_m calls_m x params(m) / params(demasker)
("the denoiser (400M parameters) is activated 128 times, leading to an overall load of ~6 demasker (8B)
activations"; with the 32-step conditional refresh the reported points are 32 + 8 = 40): `paper_nfe`.

`nfe_report` returns that count as "nfe" (with "prior_equivalent"), the raw call counts (demasker, DiT,
conditional DiT, encoder), the parameter counts, and beside it a FLOP-based equivalent
"nfe_flops" = demasker calls + sum(calls x forward FLOPs) / demasker forward FLOPs, all per example. The FLOP
count is ours, not the paper's: a DiT over K = 8 registers costs far less than its parameter share (its 8
tokens against the demasker's L): at L = 512, K = 8 the 128-step prior is 6.53 by parameters but 0.105 by
FLOPs, the 32-step conditional one 1.69 vs 0.027 (the encoder call 0.074 vs 0.065). The generators also time
themselves ("seconds_per_sample", wall clock, CUDA synchronised: `clock`).

Forward FLOPs come from the configs (`*_flops`): 2 x (multiply-adds of every matmul-like layer applied per
token) + the attention matmuls 4 x T_q x T_k x heads x head_dim per layer (QK^T and AV, a full score matrix
also for causal attention, as SDPA with a mask computes it). Norms, activations, softmax and RoPE are ignored
(< 1% at these widths). Embedding lookups cost nothing; the demasker's LM head is counted on the L text
positions, the encoder has none. tests/test_generators.py checks the formulas against torch's FlopCounterMode
on the tiny models. Nothing here imports generators.py (which re-exports these names).
"""

import time

import torch

# ------------------------------------------------------------------------------------------------
# Forward FLOPs from the configs
# ------------------------------------------------------------------------------------------------


def _linear(tokens, fan_in, fan_out):
    return 2 * tokens * fan_in * fan_out


def _attention(q_tokens, k_tokens, heads, head_dim):
    return 4 * q_tokens * k_tokens * heads * head_dim  # QK^T and AV


def _swiglu_block(tokens, width, heads, kv_heads, head_dim, mlp_hidden):
    q, kv = heads * head_dim, kv_heads * head_dim
    projections = _linear(tokens, width, q) + 2 * _linear(tokens, width, kv) + _linear(tokens, q, width)
    return projections + _attention(tokens, tokens, heads, head_dim) + 3 * _linear(tokens, width, mlp_hidden)


def demasker_flops(cfg, length, num_registers=0):
    """One demasker forward on one sequence of `length` tokens with k registers (prefix k + 2 tokens)."""
    tokens = length + (num_registers + 2 if num_registers else 0)
    block = _swiglu_block(tokens, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_hidden_size)
    projection = _linear(num_registers, cfg.register_dim, cfg.d_model) if num_registers else 0
    return cfg.n_layers * block + projection + _linear(length, cfg.d_model, cfg.vocab_size)


def encoder_flops(cfg, length):
    """One encoder forward on `length` tokens plus its K - 1 suffix registers (no LM head)."""
    tokens = length + cfg.num_registers - 1
    block = _swiglu_block(tokens, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                          cfg.intermediate_size)
    return cfg.num_layers * block


def dit_flops(cfg, num_registers, cond_tokens=0):
    """One LatentDiT forward on K registers (and S conditioning tokens for a conditional model)."""
    K, h, S = num_registers, cfg.hidden_size, cond_tokens
    heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    embed = _linear(K, cfg.register_dim, h) + _linear(K, cfg.frequency_embedding_size, h) + _linear(K, h, h) \
        + _linear(K, h, 6 * h)
    block = 4 * _linear(K, h, h) + _attention(K, K, heads, head_dim) + 2 * _linear(K, h, cfg.mlp_hidden_size)
    if cfg.cond_dim:
        embed += _linear(S, cfg.cond_dim, h) + _linear(S, h, h)
        block += 2 * _linear(K, h, h) + 2 * _linear(S, h, h) + _attention(K, S, heads, head_dim)
    return embed + cfg.depth * block + _linear(K, h, cfg.register_dim)


# ------------------------------------------------------------------------------------------------
# The paper's count (parameters) and the report
# ------------------------------------------------------------------------------------------------


def param_count(module):
    """Parameters of a model (each shared tensor once): the paper's unit of cost per call."""
    return sum(p.numel() for p in module.parameters())


def config_param_count(model_class, cfg):
    """Parameters of model_class(cfg) without allocating them (built on the meta device): paper sizes."""
    with torch.device("meta"):
        return param_count(model_class(cfg))


def paper_nfe(demasker_calls, demasker_params, others=()):
    """The paper's NFE: demasker calls + sum over the other models of calls x params / params(demasker).
    others: (calls, params) pairs. Returns (nfe, the others' share in demasker calls)."""
    equivalent = sum(calls * params for calls, params in others) / demasker_params
    return demasker_calls + equivalent, equivalent


def nfe_report(demasker_cfg, gen_length, num_registers, demasker_calls, prior=None, prior_calls=0,
               cond_prior=None, cond_prior_calls=0, encoder_calls=0, demasker_params=None, seconds=None,
               batch_size=None):
    """Raw call counts and the two NFE counts, per example (module docstring).

    "nfe" / "prior_equivalent": the paper's count, by parameters (needs demasker_params; without it "nfe"
    falls back to the FLOP count and says so in "nfe_count"). "nfe_flops" / "prior_equivalent_flops": by
    forward FLOPs. num_registers: k fed to the demasker. The conditional prior's cost per call is its DiT on
    K registers cross-attending to the Kc conditioning registers; each refresh also runs the encoder once on
    the gen_length canvas. seconds, batch_size: the generator's wall clock for the batch ->
    "seconds_per_sample"."""
    per_call = demasker_flops(demasker_cfg, gen_length, num_registers)
    prior_flops, others, params = 0, [], {"demasker": demasker_params}
    if prior is not None and prior_calls:
        prior_flops += prior_calls * dit_flops(prior.dit.cfg, prior.num_registers)
        params["prior"] = param_count(prior.dit)
        others.append((prior_calls, params["prior"]))
    if cond_prior is not None and (cond_prior_calls or encoder_calls):
        cond_registers = cond_prior.encoder.cfg.num_registers
        prior_flops += cond_prior_calls * dit_flops(cond_prior.dit.cfg, cond_prior.num_registers,
                                                    cond_registers)
        prior_flops += encoder_calls * encoder_flops(cond_prior.encoder.cfg, gen_length)
        params["cond_prior"], params["encoder"] = param_count(cond_prior.dit), param_count(cond_prior.encoder)
        others += [(cond_prior_calls, params["cond_prior"]), (encoder_calls, params["encoder"])]
    flops_equivalent = prior_flops / per_call
    report = {"demasker_calls": demasker_calls, "prior_calls": prior_calls,
              "cond_prior_calls": cond_prior_calls, "encoder_calls": encoder_calls, "params": params,
              "demasker_flops_per_call": per_call, "prior_flops": prior_flops,
              "prior_equivalent_flops": flops_equivalent,
              "nfe_flops": demasker_calls + flops_equivalent}
    if demasker_params:
        report["nfe"], report["prior_equivalent"] = paper_nfe(demasker_calls, demasker_params, others)
        report["nfe_count"] = "params"
    else:
        report["nfe"], report["prior_equivalent"] = report["nfe_flops"], flops_equivalent
        report["nfe_count"] = "flops"
    if seconds is not None:
        report["seconds"] = seconds
        report["seconds_per_sample"] = seconds / batch_size if batch_size else seconds
    return report


def clock(device):
    """Wall-clock seconds, after the device's queued work (CUDA kernels run asynchronously): every timing of
    a decoding reads this, so that a GPU's queued kernels are counted where they belong."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


_clock = clock  # the name generators.py and extensions/prompting.py import
