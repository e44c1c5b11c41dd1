"""Watching the decoding: a step-by-step trace of the canvas x_t, written as one self-contained HTML page.

Masked diffusion is easiest to understand by watching it (Sec. 4.2-4.3, Alg. 2-3, 6): which tokens are
revealed at each step, how confident the model was, and how the registers change that. `Trace` wraps a
demasker (base MDM or guided) and records every call the sampling loop makes, without touching the loop:

    traced = Trace(demasker, mask_id, label="ConThenDisc")           # evaluation/decode_trace.py
    tokens, report = generators.conthendisc(traced, prior, ...)      # any sampler that calls the model
    traced.finish(tokens)                                            # resolves the last step
    write_html("trace.html", [panel(traced, 0, tokenizer, eos_id)])

At call s the wrapper sees the canvas x_s the loop chose after call s-1, so the positions that changed
between x_{s-1} and x_s are the tokens revealed at step s-1; their confidence is the probability the
model gave, at step s-1, to the token actually placed (softmax of that call's logits, any temperature).
The registers the loop passes in are compared with the previous call's: a cosine below 1 marks a
ConWithinDisc refresh (Alg. 3), reported per sample. Recording reads the logits and draws no random
numbers, so tracing changes neither the samples nor the RNG stream (tested).

The page (no network, no external scripts or fonts): a slider and step buttons over the steps; per
sample the canvas as monospace text with [M] as a grey box, newly revealed tokens outlined and coloured
by confidence (red low, green high); panels side by side (e.g. base vs ConThenDisc from one seed); a
small bar plot of tokens revealed per step; the refresh steps and register cosines.
"""

import html
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from infra.atomic import write_text


class Trace(torch.nn.Module):
    """A demasker that records the canvas, revealed positions and confidences of every sampling step."""

    def __init__(self, model, mask_id, label="", gen_start=0):
        super().__init__()
        self.inner = model
        self.mask_id, self.label, self.gen_start = int(mask_id), label, gen_start
        # frames: 0 = the canvas before the first step, f >= 1 = after step f (1-based steps):
        # {"canvas": (B, L) list, "revealed": B lists of positions, "confidence": B lists of probabilities}
        self.steps = []
        self.refresh = []        # per model call s (step s + 1): B register cosines to call s - 1, or None
        self._last = None        # (x, logits, registers) of the previous call, until the next one resolves it
        self.finished = False

    def __getattr__(self, name):  # cfg, config fields, helper methods: the wrapped model's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, x, registers=None, **kwargs):
        if self.finished:
            raise RuntimeError("this Trace was finished; wrap the model again for another sampling run")
        if self._last is None and not self.steps:  # frame 0: the canvas before any step
            self.steps.append({"canvas": x.tolist(), "revealed": [[] for _ in range(x.shape[0])],
                               "confidence": [[] for _ in range(x.shape[0])]})
        self.refresh.append(self._cosine(registers))
        self._resolve(x)
        logits = self.inner(x, registers=registers, **kwargs)  # (B, L, V)
        self._last = (x.detach().clone(), logits.detach(), None if registers is None else registers.detach().clone())
        return logits

    def _cosine(self, registers):
        """Mean cosine, per sample, between these registers and the previous call's (None: no registers)."""
        previous = self._last[2] if self._last is not None else None
        if registers is None or previous is None or previous.shape != registers.shape:
            return None
        cos = F.cosine_similarity(registers.float(), previous.float(), dim=-1)  # (B, k)
        return [round(v, 5) for v in cos.mean(dim=-1).tolist()]

    def _resolve(self, x_after):
        """Record the step that turned the previous call's canvas into x_after."""
        if self._last is None:
            return
        x_before, logits, _ = self._last
        x_after = x_after[:, :x_before.shape[1]].to(x_before.device)
        changed = (x_before == self.mask_id) & (x_after != self.mask_id)  # (B, L) revealed at this step
        probs = F.softmax(logits.float(), dim=-1)  # (B, L, V)
        chosen = torch.gather(probs, -1, x_after.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, L)
        revealed, confidence = [], []
        for row in range(x_after.shape[0]):
            cols = changed[row].nonzero().flatten()
            revealed.append(cols.tolist())
            confidence.append([round(v, 4) for v in chosen[row, cols].tolist()])
        self.steps.append({"canvas": x_after.tolist(), "revealed": revealed, "confidence": confidence})
        self._last = None

    def finish(self, tokens):
        """Resolve the last step with the sampler's output; tokens: (B, L) or (B, L - gen_start)."""
        if self._last is not None:
            width = self._last[0].shape[1]
            if tokens.shape[1] < width:  # the generator returned only the generated part
                tokens = torch.cat([self._last[0][:, :width - tokens.shape[1]], tokens.to(self._last[0].device)], 1)
            self._resolve(tokens)
        self.finished = True
        return self



def panel(trace, sample, tokenizer, eos_id, label=None, bos_id=None):
    """The data one page panel shows: one sample of one Trace (steps, pieces of text, per-step counts)."""
    if not trace.finished:
        raise ValueError("call trace.finish(tokens) before writing the page")
    if not trace.steps:
        raise ValueError("the trace recorded no step; was the traced model passed to the sampler?")
    ids = sorted({t for step in trace.steps for t in step["canvas"][sample]} - {trace.mask_id})
    pieces = {str(i): tokenizer.decode([i]) for i in ids}
    refresh = [(s + 1, cos[sample]) for s, cos in enumerate(trace.refresh)
               if cos is not None and cos[sample] < 0.9999]  # (1-based step, cosine)
    return {
        "label": label or trace.label or "sample",
        "sample": sample,
        "mask_id": trace.mask_id,
        "eos_id": eos_id,
        "bos_id": bos_id,  # not shown (decode_programs drops it too)
        "gen_start": trace.gen_start,
        "pieces": pieces,
        "canvases": [step["canvas"][sample] for step in trace.steps],
        "revealed": [step["revealed"][sample] for step in trace.steps],
        "confidence": [step["confidence"][sample] for step in trace.steps],
        "refresh": [{"step": s, "cosine": c} for s, c in refresh],
    }


def text_at(panel_data, step):
    """The program text of a panel at a step (Python side of the page's rendering): pieces of the
    generated tokens, [M] as '_', cut at the first EOS."""
    out = []
    for token in panel_data["canvases"][step][panel_data["gen_start"]:]:
        if token == panel_data["eos_id"]:
            break
        if token == panel_data.get("bos_id"):
            continue
        out.append("_" if token == panel_data["mask_id"] else panel_data["pieces"][str(token)])
    return "".join(out)


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:sans-serif;margin:16px;background:#fafafa;color:#222}
.bar{position:sticky;top:0;background:#fafafa;padding:6px 0;border-bottom:1px solid #ddd}
.panels{display:flex;gap:12px;flex-wrap:wrap;margin-top:10px}
.panel{flex:1 1 420px;background:#fff;border:1px solid #ddd;border-radius:4px;padding:8px;min-width:320px}
.panel h3{margin:0 0 4px 0;font-size:15px}
pre{font-family:monospace;font-size:12px;white-space:pre-wrap;word-break:break-all;line-height:1.5;margin:6px 0}
.m{display:inline-block;width:.6em;height:1em;background:#bbb;border-radius:2px;vertical-align:text-bottom;margin:0 1px}
.new{outline:2px solid #222;border-radius:2px}
.info{font-size:12px;color:#555}
svg{display:block;margin-top:4px}
</style></head><body>
<h2>__TITLE__</h2>
<div class="bar">step <b id="stepno"></b> / <span id="nsteps"></span>
<button id="first">&#124;&lt;</button><button id="prev">&lt;</button><button id="play">play</button>
<button id="next">&gt;</button><button id="last">&gt;&#124;</button>
<input id="slider" type="range" min="0" value="0" style="width:50%;vertical-align:middle">
<div class="info">Grey boxes: [M]. Outlined: revealed at this step, coloured by the model's confidence in the
token it placed (red 0, green 1). Bars: tokens revealed per step (the current step in black).</div></div>
<div class="panels" id="panels"></div>
<script>
const DATA = __DATA__;
const nsteps = Math.max(...DATA.map(p => p.canvases.length));
const slider = document.getElementById("slider");
slider.max = nsteps - 1;
document.getElementById("nsteps").textContent = nsteps - 1;
function esc(s){return s.replace(/&/g,"&amp;").replace(/</g,"&lt;").replace(/>/g,"&gt;");}
function colour(p){return "hsl(" + Math.round(120*p) + ",75%,78%)";}
function bars(p, step){
  const w = 400, h = 40, n = p.revealed.length, bw = w / n;
  const top = Math.max(1, ...p.revealed.map(r => r.length));
  let s = '<svg width="'+w+'" height="'+h+'">';
  p.revealed.forEach((r, i) => { const bh = h * r.length / top;
    s += '<rect x="'+(i*bw)+'" y="'+(h-bh)+'" width="'+Math.max(1,bw-1)+'" height="'+bh+'" fill="'+(i==step?"#000":"#7aa")+'"/>'; });
  return s + "</svg>";
}
const root = document.getElementById("panels");
DATA.forEach((p, j) => { const d = document.createElement("div"); d.className = "panel"; d.id = "panel"+j; root.appendChild(d); });
function render(step){
  document.getElementById("stepno").textContent = step === 0 ? "0 (start)" : step;
  slider.value = step;
  DATA.forEach((p, j) => {
    const s = Math.min(step, p.canvases.length - 1), canvas = p.canvases[s];
    const conf = {}; p.revealed[s].forEach((pos, i) => conf[pos] = p.confidence[s][i]);
    let out = "", done = false;
    for (let pos = p.gen_start; pos < canvas.length && !done; pos++) {
      const t = canvas[pos];
      if (t === p.bos_id) continue;
      if (t === p.eos_id) { out += '<span class="info">&#9632;EOS</span>'; done = true; continue; }
      const piece = t === p.mask_id ? '<span class="m"></span>' : esc(p.pieces[String(t)]);
      out += pos in conf ? '<span class="new" style="background:'+colour(conf[pos])+'" title="p='+conf[pos]+'">'+piece+'</span>' : piece;
    }
    const masked = canvas.slice(p.gen_start).filter(t => t === p.mask_id).length;
    const rf = p.refresh.map(r => "before step " + r.step + " (cosine " + r.cosine + ")").join(", ");
    document.getElementById("panel"+j).innerHTML = "<h3>" + esc(p.label) + "</h3><div class='info'>revealed at this step: " +
      p.revealed[s].length + " | still masked: " + masked + (rf ? " | register refresh: " + rf : "") + "</div>" +
      bars(p, s) + "<pre>" + out + "</pre>";
  });
}
let timer = null;
slider.oninput = () => render(+slider.value);
document.getElementById("first").onclick = () => render(0);
document.getElementById("last").onclick = () => render(nsteps - 1);
document.getElementById("prev").onclick = () => render(Math.max(0, +slider.value - 1));
document.getElementById("next").onclick = () => render(Math.min(nsteps - 1, +slider.value + 1));
document.getElementById("play").onclick = () => { if (timer) { clearInterval(timer); timer = null; return; }
  timer = setInterval(() => { const s = +slider.value + 1; if (s >= nsteps) { clearInterval(timer); timer = null; } else render(s); }, 150); };
const wanted = location.hash.match(/step=([0-9]+)/);  // e.g. trace.html#step=40 opens at step 40
render(wanted ? Math.min(nsteps - 1, +wanted[1]) : nsteps - 1);
</script></body></html>
"""


def write_html(path, panels, title="crocodil: decoding trace"):
    """Write the page for a list of panel() dicts, atomically (temporary file, then rename)."""
    path = Path(path)
    data = json.dumps(panels, separators=(",", ":")).replace("</", "<\\/")  # no '</script>' inside the JSON
    write_text(path, PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data))
    return path


def read_panels(path):
    """The panel dicts stored in a page written by write_html (for tests and tools)."""
    page = Path(path).read_text(encoding="utf-8")
    start = page.index("const DATA = ") + len("const DATA = ")
    end = page.index(";\nconst nsteps")
    return json.loads(page[start:end].replace("<\\/", "</"))


def main(argv=None):
    """python -m evaluation.decode_trace merge A.html B.html ... --out BOTH.html: the panels of several traces side by
    side on one page (e.g. the base MDM and ConThenDisc from the same seed)."""
    import argparse
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=["merge"], help="merge: put the panels of several pages on one page")
    parser.add_argument("pages", nargs="+", help="trace pages written by sample.py --trace")
    parser.add_argument("--out", required=True, help="the page to write")
    parser.add_argument("--title", default="crocodil: decoding traces side by side", help="page title")
    args = parser.parse_args(argv)
    missing = [page for page in args.pages if not Path(page).is_file()]
    if missing:
        parser.error(f"no such trace page: {', '.join(missing)} (write them with sample.py --trace FILE.html)")
    panels = [p for page in args.pages for p in read_panels(page)]
    print(write_html(args.out, panels, args.title))


if __name__ == "__main__":
    main()
