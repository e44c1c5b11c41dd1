"""Per-GPU memory plan for the paper preset (App. C), computed from the model configs.

The paper fine-tunes LLaDA-8B-Base (demasker f_theta) jointly with Qwen3-Embedding-0.6B
(encoder h_phi, K = 128 registers) on programs of up to L = 4096 tokens with AdamW and a
global batch of 512. This script answers: on N GPUs of M GiB with FSDP2 (infra/distributed.py),
which micro-batch and which flags fit, and how many gradient-accumulation steps follow.

Parameter counts come from the config presets (the models are built on the meta device and
counted; the FSDP units are the ones distributed.wrap_model shards). Everything else is a
formula, per GPU, in bytes:

  states      16 P / N        fp32 master weights (4) + fp32 gradients (4, FSDP reduce_dtype
                              fp32) + AdamW exp_avg and exp_avg_sq (4 + 4), sharded N ways
  fsdp        8 U_max + 2 U_block + 8 P_root
                              the unit being back-propagated unsharded (bf16 params 2 + bf16
                              grads 2 + fp32 grads for the fp32 reduce-scatter 4), the next
                              block prefetched (bf16), the root's own parameters for the step
  activations per micro-batch example, summed over both models (bf16 compute):
    no checkpointing:  n_layers * T * a_block          (everything a block saves for backward)
    checkpointing:     n_layers * T * 2 d  +  T * a_block of one block (recomputed in backward)
    with a_block, bytes per token per layer (formula checked against the tensors autograd
    really saves, `--verify` and tests/test_memory_plan.py):
      16 d          two RMSNorms: fp32 upcast 4d + normed bf16 2d + bf16 output into a Linear 2d
      8 q           SDPA (flash / memory-efficient, no L^2 term) keeps q, k, v (k, v repeated to
                    every query head by layers.attention) and its output (the o_proj input)
      8 ff          SwiGLU: gate, silu(gate), up, and their product (the down_proj input)
      6 (q + kv)    Qwen3 only: per-head q/k RMSNorm (fp32 upcast + normed bf16)
      2 q + 2       with a (1, S) key mask (demasker + register mask): the masked output copy
                    (out * row_sees_something) and the bf16 bias row
      2 q + 2 + 2 T with a dense (T, T) mask (encoder: causal + padding): the same, a per-row
                    mask, and the dense bf16 bias, saved by every layer
      4 (2 + h ...) fp32 rsqrt per norm row, fp32 log-sum-exp per head
    outside blocks: demasker ln_f + LM-head input (8 d per text token); encoder final
    norm (6 d) and per-example fp32 RoPE tables (8 head_dim) per token
  logits      12 V per text token: fp32 log-softmax kept for backward (4V) + the fp32
              gradients of log-probs and logits at the start of backward (4V + 4V)
  overhead    CUDA context, NCCL buffers, allocator fragmentation: a fixed allowance (flag)

Sequence lengths: demasker T = L + K + 2 ([START, z_1..z_K, END, text]); encoder
T = L + K - 1 (text + K-1 suffix registers). Run `python -m scripts.memory_plan --help`.
"""

import argparse
from dataclasses import dataclass

import torch
import torch.nn as nn

from demasker import Demasker, DemaskerConfig
from infra.distributed import default_shard_modules, find_blocks
from encoder import Encoder, EncoderConfig

GIB = 2 ** 30


@dataclass
class BlockShape:
    """What a transformer block's activation memory depends on."""
    d: int            # residual width
    q_dim: int        # n_heads * head_dim
    kv_dim: int       # n_kv_heads * head_dim
    ff: int           # SwiGLU hidden width
    n_heads: int
    n_kv_heads: int
    qk_norm: bool
    n_layers: int


def demasker_shape(cfg):
    return BlockShape(cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim,
                      cfg.mlp_hidden_size, cfg.n_heads, cfg.n_kv_heads, False, cfg.n_layers)


def encoder_shape(cfg):
    return BlockShape(cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                      cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, True, cfg.num_layers)


def block_activation_bytes(shape, key_mask=False, dense_mask_len=0):
    """Bytes per token one block saves for backward (bf16 activations, fp32 norms).

    key_mask: a (B, 1, 1, S) key mask is passed (demasker with a register mask).
    dense_mask_len: T when a dense (B, 1, T, T) mask is built (encoder: causal + padding).
    """
    s = shape
    saved = 16 * s.d + 8 * s.q_dim + 8 * s.ff
    if s.qk_norm:
        saved += 6 * (s.q_dim + s.kv_dim)
    if dense_mask_len:  # out * row_sees_something, the (B, 1, T, 1) row mask, bf16 bias (B, 1, T, S)
        saved += 2 * s.q_dim + 2 + 2 * dense_mask_len
    elif key_mask:      # out * row_sees_something, bf16 bias row (B, 1, 1, S)
        saved += 2 * s.q_dim + 2
    norm_rows = 2 + (s.n_heads + s.n_kv_heads if s.qk_norm else 0)
    return saved + 4 * norm_rows + 4 * s.n_heads  # fp32 rsqrt per norm row, log-sum-exp per head


def model_activation_bytes(shape, tokens, outside, checkpointing, key_mask=False, dense_mask=False):
    """Saved activations of one example: the blocks (block inputs + one recomputed block when
    checkpointing) plus `outside` bytes saved outside the blocks (final norm, head input)."""
    per_token = block_activation_bytes(shape, key_mask, tokens if dense_mask else 0)
    if checkpointing:
        blocks = shape.n_layers * tokens * 2 * shape.d + tokens * per_token
    else:
        blocks = shape.n_layers * tokens * per_token
    return blocks + outside


def demasker_activation_bytes(cfg, seq_len, num_registers, checkpointing):
    """[START, z_1..z_k, END, text] with a register key mask; ln_f (6d) + LM-head input (2d) per text token."""
    return model_activation_bytes(demasker_shape(cfg), seq_len + num_registers + 2, seq_len * 8 * cfg.d_model,
                                  checkpointing, key_mask=True)


def encoder_activation_bytes(cfg, seq_len, checkpointing, padded=True):
    """[text, r_1..r_{K-1}], causal (+ padding: dense mask); final norm (6d) and per-example
    fp32 RoPE cos/sin (8 head_dim) per token."""
    tokens = seq_len + cfg.num_registers - 1
    outside = tokens * (6 * cfg.hidden_size + 8 * cfg.head_dim)
    return model_activation_bytes(encoder_shape(cfg), tokens, outside, checkpointing, dense_mask=padded)


def count_parameters(encoder_cfg, demasker_cfg):
    """Total parameters, per-unit counts of FSDP units, and the root's remainder (meta device)."""
    with torch.device("meta"):
        joint = nn.Module()
        joint.encoder = Encoder(encoder_cfg)
        joint.demasker = Demasker(demasker_cfg)
    numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    units = default_shard_modules(joint)
    return {
        "encoder": numel(joint.encoder), "demasker": numel(joint.demasker),
        "total": numel(joint),
        "units": [numel(u) for u in units],
        "block": max(numel(b) for b in find_blocks(joint)),
        "root": numel(joint) - sum(numel(u) for u in units),
    }


def plan(encoder_cfg, demasker_cfg, seq_len, global_batch, gpus, gpu_gib, micro_batches,
         overhead_gib, logit_tokens=None):
    """Rows of the plan: one per (activation checkpointing, micro batch)."""
    params = count_parameters(encoder_cfg, demasker_cfg)
    logit_tokens = seq_len if logit_tokens is None else logit_tokens
    states = 16 * params["total"] / gpus
    fsdp = 8 * max(params["units"]) + 2 * params["block"] + 8 * params["root"]
    rows = []
    for checkpointing in (False, True):
        enc = encoder_activation_bytes(encoder_cfg, seq_len, checkpointing)
        dem = demasker_activation_bytes(demasker_cfg, seq_len, encoder_cfg.num_registers, checkpointing)
        logits = 12 * demasker_cfg.vocab_size * logit_tokens
        for micro in micro_batches:
            per_pass = micro * gpus
            accum = global_batch // per_pass if global_batch % per_pass == 0 else None
            total = states + fsdp + micro * (enc + dem + logits) + overhead_gib * GIB
            rows.append({"checkpointing": checkpointing, "micro": micro, "accum": accum,
                         "states": states, "fsdp": fsdp, "enc": micro * enc, "dem": micro * dem,
                         "logits": micro * logits, "overhead": overhead_gib * GIB, "total": total,
                         "fits": total <= gpu_gib * GIB})
    return params, rows


def markdown(params, rows, args):
    gib = lambda x: f"{x / GIB:.1f}"  # noqa: E731
    lines = [
        f"Memory plan: Qwen3-Embedding-0.6B ({params['encoder'] / 1e9:.3f}B params, K="
        f"{args.num_registers}) + LLaDA-8B ({params['demasker'] / 1e9:.3f}B) = "
        f"{params['total'] / 1e9:.3f}B, L={args.seq_len}, global batch {args.global_batch}, "
        f"{args.gpus} x {args.gpu_gib} GiB, FSDP2 (bf16 params / fp32 reduce), AdamW. GiB per GPU.",
        "",
        "| act. ckpt | micro batch | accum steps | params+grads+AdamW | FSDP unsharded | "
        "encoder act. | demasker act. | logits/CE | overhead | total | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        accum = r["accum"] if r["accum"] is not None else "n/a"
        lines.append(f"| {'on' if r['checkpointing'] else 'off'} | {r['micro']} | {accum} | "
                     f"{gib(r['states'])} | {gib(r['fsdp'])} | {gib(r['enc'])} | {gib(r['dem'])} | "
                     f"{gib(r['logits'])} | {gib(r['overhead'])} | **{gib(r['total'])}** | "
                     f"{'yes' if r['fits'] else 'no'} |")
    ddp_states = 16 * params["total"]
    lines += ["", f"DDP instead of FSDP would replicate the states: {gib(ddp_states)} GiB per GPU "
              f"before any activation, so FSDP (`--fsdp`) is required."]
    for checkpointing in (False, True):
        fitting = [r for r in rows if r["fits"] and r["accum"] is not None
                   and r["checkpointing"] == checkpointing]
        flags = "--fsdp --bf16" + (" --activation-checkpointing" if checkpointing else "")
        if not fitting:
            lines.append(f"`{flags}`: no tabulated micro batch fits.")
            continue
        best = max(fitting, key=lambda r: r["micro"])
        cost = ("recomputes each block's forward in backward (about 1/3 more compute)" if checkpointing
                else "no recomputation")
        lines.append(f"`{flags} --micro-batch {best['micro']}`: fits ({gib(best['total'])} of "
                     f"{args.gpu_gib} GiB, {best['accum']} accumulation steps; {cost}).")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Checking the per-token formula against what autograd really saves
# ---------------------------------------------------------------------------

def measure_saved_bytes(fn, exclude=()):
    """Bytes of distinct storages autograd saves while running fn(), minus `exclude`d tensors."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(seen.values())


def measure_block(model, shape, batch=2, tokens=48, mask=None, causal=False):
    """Measured bytes per token that model.blocks[0] saves, for a bf16 block on CPU."""
    from layers import rope_angles, rope_cos_sin, rope_inv_freq
    block = model.blocks[0].to(torch.bfloat16)
    head_dim = shape.q_dim // shape.n_heads
    x = torch.randn(batch, tokens, shape.d, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_cos_sin(rope_angles(torch.arange(tokens), rope_inv_freq(head_dim, 1e4)))
    allowed = None
    if mask is not None:
        allowed = torch.ones(batch, 1, 1, tokens, dtype=torch.bool)
        allowed[0, ..., -3:] = False
    exclude = [x, cos, sin, *block.parameters()] + ([allowed] if allowed is not None else [])
    saved = measure_saved_bytes(lambda: block(x, cos, sin, allowed=allowed, causal=causal), exclude)
    return saved / (batch * tokens), tokens


def verify():
    """Print formula vs measured bytes per token for tiny LLaDA- and Qwen3-type blocks."""
    torch.manual_seed(0)
    dem_cfg = DemaskerConfig.tiny()
    enc_cfg = EncoderConfig.tiny()
    cases = [("demasker block", Demasker(dem_cfg), demasker_shape(dem_cfg), None, False),
             ("demasker block, key mask", Demasker(dem_cfg), demasker_shape(dem_cfg), "key", False),
             ("encoder block, causal", Encoder(enc_cfg), encoder_shape(enc_cfg), None, True),
             ("encoder block, causal + padding", Encoder(enc_cfg), encoder_shape(enc_cfg), "key", True)]
    results = []
    for name, model, shape, mask, causal in cases:
        measured, tokens = measure_block(model, shape, mask=mask, causal=causal)
        dense = tokens if (mask and causal) else 0
        formula = block_activation_bytes(shape, key_mask=bool(mask), dense_mask_len=dense)
        results.append((name, measured, formula))
        print(f"{name:34s} measured {measured:9.1f} B/token   formula {formula:9.1f} B/token")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096, help="program length L in tokens (paper: up to 4096)")
    parser.add_argument("--global-batch", type=int, default=512, help="examples per optimizer step (paper: 512)")
    parser.add_argument("--gpus", type=int, default=8, help="number of GPUs FSDP shards over")
    parser.add_argument("--gpu-gib", type=float, default=80, help="memory of one GPU in GiB")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4],
                        help="micro-batch sizes per GPU to tabulate")
    parser.add_argument("--num-registers", type=int, default=128, help="K, encoder registers (paper: up to 128)")
    parser.add_argument("--overhead-gib", type=float, default=4.0,
                        help="fixed allowance for CUDA context, NCCL buffers and fragmentation")
    parser.add_argument("--logit-tokens", type=int, default=None,
                        help="text positions that get LM-head logits and CE (default L; fewer if the "
                             "training loss evaluates only masked positions)")
    parser.add_argument("--verify", action="store_true",
                        help="also measure tiny blocks' saved tensors on CPU and compare with the formula")
    args = parser.parse_args()
    encoder_cfg = EncoderConfig.qwen3_embedding_0_6b(num_registers=args.num_registers)
    demasker_cfg = DemaskerConfig.llada_8b_base(max_registers=args.num_registers)
    params, rows = plan(encoder_cfg, demasker_cfg, args.seq_len, args.global_batch, args.gpus,
                        args.gpu_gib, args.micro_batches, args.overhead_gib, args.logit_tokens)
    print(markdown(params, rows, args))
    if args.verify:
        print()
        verify()


if __name__ == "__main__":
    main()
