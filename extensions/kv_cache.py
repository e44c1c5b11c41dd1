"""Approximate key/value caching for semi-autoregressive MDM decoding (Fast-dLLM's prefix and dual cache).

Not in the CRoCoDiL paper: an option of the decoding loop (mdm.py, `Decoding.cache`), off by default. The
demasker is bidirectional, so nothing can be cached exactly between steps: every token's hidden state
depends on every other token, and each step changes some [M] of the current block.
Fast-dLLM (Wu et al. 2025, Sec. 3.2) observes that the keys and values of positions OUTSIDE the current
block barely change while that block is decoded, and reuses them:

- at the first step of every block (and after ConWithinDisc redraws the registers) the demasker runs on the
  whole sequence [START, z_1..z_k, END, text] and every layer stores its keys and values (`fill`);
- at the other steps of the block only a window of the text is recomputed: the queries, keys and values of
  the window's positions are fresh, the rest are the stored ones;
      "prefix": the window is the current block and everything after it (the registers and the finished
                blocks are cached: Fast-dLLM's prefix cache);
      "dual":   the window is the current block only (the suffix of [M] is cached too: its dual cache).
  The window's fresh keys and values overwrite their stored copies, so later steps see the newest ones.

What is exact: a window step right after a fill gives the full forward's logits on the window (nothing
changed in between), and with ONE layer every step is exact (layer-1 keys and values depend on the tokens
alone, and tokens outside the window do not change within a block). With more layers the reuse is an
approximation whose quality cost is measured in docs/decoding.md ("Decoding options"); the demasker calls
(NFE) are unchanged, each window step is cheaper.

The objects are duck-typed: layers.Attention calls `merge(k, v)` on the one it is given, the Demasker reads
`window` and hands each block its `layer(i)`; the decoding loop calls the demasker through `CachedModel`
(extensions/decoding.StepLogits). Nothing here imports the rest of the project.
"""

CACHE_MODES = ("none", "prefix", "dual")


class LayerKV:
    """One layer's keys and values for the whole sequence: (B, H_kv, S, D) each, or None before a fill."""

    def __init__(self, owner):
        self.owner = owner
        self.k = self.v = None

    def merge(self, k, v):
        """k, v (B, H_kv, T, D) of the positions being computed. On a fill (T = S) store and return them;
        on a window step write them over their stored copies and return the full (B, H_kv, S, D) pair."""
        start = self.owner.key_start
        if start is None:  # fill: the whole sequence
            self.k, self.v = k, v
            return k, v
        if self.k is None:
            raise RuntimeError("a cached window step before any fill; call BlockCache.refill() first")
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k, self.v


class BlockCache:
    """The stored keys and values of every layer, and which text window the next forward recomputes.

    mode: "prefix" | "dual" (see the module docstring). The decoding loop calls `refill()` before a full
    forward and `use(block_start, block_end, length)` before a window step; the Demasker reads `window`
    (text positions [lo, hi) of the input, or None for a full forward) and sets `prefix_length` (the
    register prefix in front of the text, 0 without registers) on a fill.
    """

    def __init__(self, mode):
        if mode not in CACHE_MODES[1:]:
            raise ValueError(f"cache mode must be one of {CACHE_MODES[1:]}, got {mode!r}")
        self.mode = mode
        self.layers = []
        self.window = None
        self.prefix_length = None
        self.filled = False

    def layer(self, index):
        while len(self.layers) <= index:
            self.layers.append(LayerKV(self))
        return self.layers[index]

    @property
    def key_start(self):
        """Where the window's keys sit in the stored (prefix + text) sequence; None on a fill."""
        return None if self.window is None else self.prefix_length + self.window[0]

    def refill(self):
        """The next forward runs on the whole sequence and stores every layer's keys and values."""
        self.window = None

    def use(self, block_start, block_end, length):
        """The next forward recomputes only the window of this mode (text positions; length = input's L)."""
        if not self.filled:
            raise RuntimeError("BlockCache.use() before a fill; the first step of a block must refill")
        self.window = (block_start, length if self.mode == "prefix" else block_end)


class CachedModel:
    """The demasker called through a BlockCache, as the decoding loop uses it: `prepare` before each step
    (a full forward when `fresh`: the first step of a block, or new registers; else the window of this mode),
    then calls with cache= added, then `full_logits` to put the window's logits back in the full sequence."""

    def __init__(self, model, mode):
        self.model, self.cache = model, BlockCache(mode)
        self.logits = None  # the last full logits (B, L, V); a window step writes its rows into them

    def prepare(self, fresh, block_start, block_end, length):
        if fresh:
            self.cache.refill()
        else:
            self.cache.use(block_start, block_end, length)

    def __call__(self, *args, **kwargs):
        return self.model(*args, cache=self.cache, **kwargs)

    def full_logits(self, logits):
        """logits (B, L, V) of a full forward, or (B, W, V) of the window -> (B, L, V)."""
        if self.cache.window is None:
            self.logits = logits
        else:
            lo, hi = self.cache.window
            self.logits[:, lo:hi] = logits
        return self.logits
