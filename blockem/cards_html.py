"""The latent cards page: one self-contained static HTML file from a cards document
(`blockem.cards.build_cards`).

Everything is inline (CSS, a small script, SVG charts): the page needs no network and renders its
content without JavaScript (the script only filters, sorts and folds the cards). The one external
reference is the Neuronpedia link of each latent of a pretrained SAE, a plain hyperlink.
"""

from __future__ import annotations

import html
import math

# the discovery funnel a latent passes, in order (a card's `filters`)
FILTERS = ("candidate", "screened", "shortlisted", "induces", "repairs", "valid", "selected")
K_COLORS = {1: "#c0392b", -1: "#2364aa"}
LABEL_CLASS = {"misaligned": "lab-mis", "aligned": "lab-ok", "refusal": "lab-ref",
               "incoherent": "lab-inc"}
RANKING_TITLES = {"base": "highest in the base model", "mis": "highest in the misaligned model",
                  "shift": "largest shift toward misalignment, s·(z_mis − z_base)"}
SOURCE_TITLES = {"corpus": "SAE corpus", "core": "core prompts"}

CSS = """
:root { --fg:#1d2330; --muted:#5d6678; --line:#dfe3ea; --bg:#f6f7f9; --card:#fff;
  --kp:#c0392b; --kn:#2364aa; --ok:#1e8449; --bad:#b03a2e; }
* { box-sizing: border-box; }
body { margin:0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color:var(--fg); background:var(--bg); }
header, #summary, nav, main, footer { max-width: 1180px; margin: 0 auto; padding: 0 20px; }
header { padding-top: 22px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 18px 0 8px; }
h3 { font-size: 14px; margin: 14px 0 6px; color: var(--muted); text-transform: uppercase;
  letter-spacing: .04em; }
h4 { font-size: 13px; margin: 12px 0 4px; }
.legend { font-size: 12px; color: var(--muted); margin: 2px 0 8px; }
.meta { color: var(--muted); margin: 0; }
.meta b { color: var(--fg); font-weight: 600; }
.panel { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 14px 16px; margin: 14px 0; }
.summary-grid { display: grid; grid-template-columns: minmax(260px, 1fr) minmax(420px, 1.6fr);
  gap: 16px; align-items: start; }
@media (max-width: 860px) { .summary-grid { grid-template-columns: 1fr; } }
.funnel .step { display: grid; grid-template-columns: 92px 1fr 40px; gap: 8px;
  align-items: center; margin: 5px 0; }
.funnel .bar { height: 18px; background: #cfd8e6; border-radius: 4px; }
.funnel .bar.sel { background: #7d5ba6; }
.funnel .n { font-variant-numeric: tabular-nums; font-weight: 600; text-align: right; }
.funnel .what { grid-column: 2 / 4; color: var(--muted); font-size: 12px; margin-top: -4px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: 12px; }
.num { text-align: right; }
a { color: #2e5aac; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px;
  font-weight: 600; color: #fff; }
.badge.kp { background: var(--kp); } .badge.kn { background: var(--kn); }
nav.controls { position: sticky; top: 0; z-index: 5; background: var(--bg);
  padding-top: 8px; padding-bottom: 8px; border-bottom: 1px solid var(--line);
  display: flex; flex-wrap: wrap; gap: 10px; align-items: center; }
nav.controls input[type=search] { padding: 5px 8px; border: 1px solid var(--line);
  border-radius: 6px; min-width: 320px; }
nav.controls select, nav.controls button { padding: 4px 8px; border: 1px solid var(--line);
  border-radius: 6px; background: #fff; cursor: pointer; }
#shown { color: var(--muted); margin-left: auto; }
.card { background: var(--card); border: 1px solid var(--line); border-left: 5px solid var(--kp);
  border-radius: 10px; padding: 14px 18px; margin: 16px 0; }
.card[data-sign="-1"] { border-left-color: var(--kn); }
.card.hidden { display: none; }
.card-head { display: flex; flex-wrap: wrap; gap: 10px; align-items: baseline; }
.card-head h2 { margin: 0; font-size: 19px; }
.card-head .sub { color: var(--muted); }
.card-head .np { margin-left: auto; }
.pills { display: flex; flex-wrap: wrap; gap: 4px; margin: 10px 0 4px; }
.pill { font-size: 12px; padding: 1px 8px; border-radius: 10px; border: 1px solid; }
.pill.y { color: var(--ok); border-color: #a9d9bb; background: #eefaf2; }
.pill.n { color: #8a8f99; border-color: var(--line); background: #f4f5f7; }
.pill .arrow { color: #b5bac4; }
.cols { display: grid; grid-template-columns: repeat(auto-fit, minmax(330px, 1fr)); gap: 14px; }
dl.stats { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 0; }
dl.stats dt { color: var(--muted); }
dl.stats dd { margin: 0; font-variant-numeric: tabular-nums; }
.chart text { font-size: 10px; fill: #5d6678; }
.chart .title { font-size: 11px; fill: #1d2330; font-weight: 600; }
.tok-list { display: grid; grid-template-columns: max-content 1fr max-content; gap: 1px 8px;
  align-items: center; font-size: 13px; }
.tok-list code { white-space: pre; background: #f1f3f6; border-radius: 3px; padding: 0 4px; }
.tok-list .b { height: 8px; border-radius: 2px; }
.ctx { display: grid; grid-template-columns: 150px 1fr; gap: 8px; padding: 3px 0;
  border-bottom: 1px dashed #eceef2; align-items: baseline; }
.ctx .vals { font-size: 12px; color: var(--muted); font-variant-numeric: tabular-nums; }
.ctx .win { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 12.5px; white-space: pre-wrap; word-break: break-word; }
.t { border-radius: 2px; }
.t.f { outline: 2px solid #222; outline-offset: 0; font-weight: 700; }
details { margin: 6px 0; }
summary { cursor: pointer; font-weight: 600; }
.gen td { font-size: 13px; }
.lab { font-size: 11px; padding: 0 6px; border-radius: 8px; margin-right: 4px; color: #fff;
  background: #8a8f99; white-space: nowrap; }
.lab-mis { background: var(--bad); } .lab-ok { background: var(--ok); }
.lab-ref { background: #9a7d0a; } .lab-inc { background: #6c3483; }
.note { color: var(--muted); font-style: italic; }
footer { color: var(--muted); font-size: 12px; padding-bottom: 40px; }
"""

SCRIPT = """
(function () {
  var cards = Array.prototype.slice.call(document.querySelectorAll('article.card'));
  var main = document.getElementById('cards');
  var q = document.getElementById('filter');
  var kp = document.getElementById('show-kp');
  var kn = document.getElementById('show-kn');
  var sort = document.getElementById('sort');
  var shown = document.getElementById('shown');
  function num(card, key) {
    var v = parseFloat(card.getAttribute('data-' + key));
    return isNaN(v) ? -Infinity : v;
  }
  function apply() {
    var text = (q.value || '').trim().toLowerCase();
    var n = 0;
    cards.forEach(function (c) {
      var sign = c.getAttribute('data-sign');
      // a number is a latent id; anything else is searched in the card's text
      var match = !text || (/^[0-9]+$/.test(text) ? c.getAttribute('data-latent') === text
                                                   : c.textContent.toLowerCase().indexOf(text) >= 0);
      var ok = (sign === '1' ? kp.checked : kn.checked) && match;
      c.classList.toggle('hidden', !ok);
      if (ok) { n += 1; }
    });
    shown.textContent = 'showing ' + n + ' of ' + cards.length + ' latents';
  }
  function reorder() {
    var key = sort.value;
    var sorted = cards.slice().sort(function (a, b) {
      if (key === 'rank') { return num(a, 'rank') - num(b, 'rank'); }
      if (key === 'latent') { return num(a, 'latent') - num(b, 'latent'); }
      if (key === 'absdelta') { return Math.abs(num(b, 'delta')) - Math.abs(num(a, 'delta')); }
      return num(b, key) - num(a, key);
    });
    sorted.forEach(function (c) { main.appendChild(c); });
  }
  function fold(open) {
    document.querySelectorAll('article.card details').forEach(function (d) { d.open = open; });
  }
  q.addEventListener('input', apply);
  kp.addEventListener('change', apply);
  kn.addEventListener('change', apply);
  sort.addEventListener('change', reorder);
  document.getElementById('expand').addEventListener('click', function () { fold(true); });
  document.getElementById('collapse').addEventListener('click', function () { fold(false); });
  apply();
  document.documentElement.setAttribute('data-ready', 'true');
})();
"""


def esc(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        if x != 0 and abs(x) < 10 ** -digits:
            return f"{x:.2e}"
        return f"{x:.{digits}f}"
    return str(x)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    out, v = [], start
    while v <= hi + 1e-12:
        out.append(round(v, 10))
        v += step
    return out


# --- summary ----------------------------------------------------------------------------------

def funnel_html(doc: dict) -> str:
    top = max([f["n"] for f in doc["funnel"]] + [1])
    rows = []
    for f in doc["funnel"]:
        w = 100.0 * f["n"] / top
        sel = " sel" if f["stage"] == "selected" else ""
        rows.append(f'<div class="step"><span>{esc(f["stage"])}</span>'
                    f'<div class="bar{sel}" style="width:{w:.1f}%"></div>'
                    f'<span class="n">{f["n"]}</span><span class="what">{esc(f["what"])}</span>'
                    f'</div>')
    return '<div class="funnel">' + "".join(rows) + "</div>"


def scatter_svg(doc: dict, width: int = 640, height: int = 340) -> str:
    sc = doc["scatter"]
    pts = sc["points"]
    if not pts:
        return '<p class="note">no stage-1 shift table: no scatter</p>'
    signs = {c["latent"]: c["sign"] for c in doc["latents"]}
    ml, mr, mt, mb = 56, 14, 14, 40
    xs = [p[1] for p in pts]
    ys = [p[2] for p in pts]
    x0, x1 = min(xs + [0.0]), max(xs + [1e-9])
    y0, y1 = min(ys + [0.0]), max(ys + [1e-9])
    pad_x, pad_y = 0.04 * (x1 - x0 or 1), 0.08 * (y1 - y0 or 1)
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y

    def X(v):
        return ml + (v - x0) / (x1 - x0) * (width - ml - mr)

    def Y(v):
        return height - mb - (v - y0) / (y1 - y0) * (height - mt - mb)

    out = [f'<svg class="chart scatter" viewBox="0 0 {width} {height}" width="100%" '
           f'role="img" aria-label="Delta against mean base activation" '
           f'xmlns="http://www.w3.org/2000/svg">']
    for t in _ticks(x0, x1):
        out.append(f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{mt}" y2="{height - mb}" '
                   f'stroke="#eef0f4"/><text x="{X(t):.1f}" y="{height - mb + 14}" '
                   f'text-anchor="middle">{t:g}</text>')
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{ml}" x2="{width - mr}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" '
                   f'stroke="#eef0f4"/><text x="{ml - 6}" y="{Y(t) + 3:.1f}" '
                   f'text-anchor="end">{t:g}</text>')
    out.append(f'<line x1="{ml}" x2="{width - mr}" y1="{Y(0):.1f}" y2="{Y(0):.1f}" '
               f'stroke="#9aa3b2"/>')
    out.append(f'<text x="{(ml + width - mr) / 2:.0f}" y="{height - 6}" text-anchor="middle">'
               f'mean activation in the base model (core prompts)</text>')
    out.append(f'<text transform="translate(14 {(mt + height - mb) / 2:.0f}) rotate(-90)" '
               f'text-anchor="middle">Delta = mean mis − mean base</text>')
    # background latents first, then candidates, then the set on top
    for layer in (0, 1, 2):
        for latent, mb_, d, sel, cand, dense in pts:
            kind = 2 if sel else 1 if cand else 0
            if kind != layer:
                continue
            tip = (f"latent {latent}: Delta {d:.4g}, mean base {mb_:.4g}"
                   + (", candidate" if cand else "") + (", dense" if dense else "")
                   + (", selected" if sel else ""))
            cx, cy = X(mb_), Y(d)
            if kind == 2:
                color = K_COLORS.get(signs.get(latent, 1 if d >= 0 else -1), "#c0392b")
                out.append(f'<a href="#latent-{latent}"><circle cx="{cx:.1f}" cy="{cy:.1f}" '
                           f'r="5.5" '
                           f'fill="{color}" stroke="#fff" stroke-width="1.2"><title>{esc(tip)}'
                           f'</title></circle><text x="{cx + 7:.1f}" y="{cy + 3:.1f}" '
                           f'style="fill:{color};font-weight:600">{latent}</text></a>')
            elif kind == 1:
                fill = "none" if dense else "#566074"
                out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3.2" fill="{fill}" '
                           f'stroke="#566074"><title>{esc(tip)}</title></circle>')
            else:
                fill = "none" if dense else "#aab2c0"
                out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="2.2" fill="{fill}" '
                           f'stroke="#aab2c0" stroke-width="0.6" opacity="0.7"><title>{esc(tip)}'
                           f'</title></circle>')
    out.append("</svg>")
    more = (f" The {sc['n_shown']} of {sc['n_latents']} latents plotted are every candidate, every "
            f"set member and the largest |Delta| of the rest." if sc["n_shown"] < sc["n_latents"]
            else "")
    cap = (f'<figcaption>Stage 1 activation shift of every latent. '
           f'<span style="color:{K_COLORS[1]}">●</span> selected K+ (rises under misalignment), '
           f'<span style="color:{K_COLORS[-1]}">●</span> selected K−, dark grey: candidate pool, '
           f'light grey: the rest, hollow: dense (active on more than the dense threshold of '
           f'tokens in both models). Hover a point for its numbers; click a selected latent '
           f'for its card.{more}</figcaption>')
    return "<figure style=\"margin:0\">" + "".join(out) + cap + "</figure>"


def overview_table(doc: dict) -> str:
    rows = []
    for c in doc["latents"]:
        s1, cal = c["stage1"] or {}, c["calibration"] or {}
        badge = "kp" if c["sign"] > 0 else "kn"
        rows.append(
            f'<tr><td class="num">{c["set_rank"]}</td>'
            f'<td><a href="#latent-{c["latent"]}">{c["latent"]}</a></td>'
            f'<td><span class="badge {badge}">{c["group"]}</span></td>'
            f'<td class="num">{fmt(s1.get("delta"))}</td>'
            f'<td class="num">{fmt(cal.get("score"))}</td>'
            f'<td class="num">{fmt(cal.get("alpha_ind"), 2)}</td>'
            f'<td class="num">{fmt(cal.get("alpha_rep"), 2)}</td>'
            f'<td>{_top_tokens_inline(c)}</td></tr>')
    return ('<table class="overview"><thead><tr><th class="num">#</th><th>latent</th><th>sign</th>'
            '<th class="num">Delta</th><th class="num">ValidReduc score</th>'
            '<th class="num">α*<sub>ind</sub></th><th class="num">α*<sub>rep</sub></th>'
            '<th>top promoted tokens</th></tr></thead><tbody>' + "".join(rows)
            + "</tbody></table>")


def _top_tokens_inline(c: dict) -> str:
    ue = c.get("unembed")
    if not ue:
        return '<span class="note">–</span>'
    return " ".join(f"<code>{esc(t['token'])}</code>" for t in ue["promoted"][:5])


# --- a card -----------------------------------------------------------------------------------

FILTER_TITLES = {"candidate": "candidate pool", "screened": "screened",
                 "shortlisted": "shortlisted", "induces": "induces", "repairs": "repairs",
                 "valid": "valid", "selected": "selected"}


def pills(card: dict) -> str:
    out = []
    for i, k in enumerate(FILTERS):
        v = card["filters"].get(k)
        if i:
            out.append('<span class="pill-sep arrow">›</span>')
        mark = "✓" if v else "✗"
        out.append(f'<span class="pill {"y" if v else "n"}">{mark} {FILTER_TITLES[k]}</span>')
    return '<div class="pills">' + "".join(out) + "</div>"


def stats(card: dict, doc: dict) -> str:
    s1, scr, cal = card["stage1"], card["screen"], card["calibration"]
    items = []
    if s1:
        pool = (f"#{s1['candidate_rank'] + 1} of {s1['pool_size']} "
                f"{'K+' if (s1.get('sign') or 0) > 0 else 'K−'} candidates"
                if s1["candidate_rank"] >= 0 else "outside the pool")
        items += [("Delta", f"{fmt(s1['delta'], 4)} <span class=\"note\">(|Delta| rank "
                            f"{s1['abs_delta_rank']} of {s1['d_sae']})</span>"),
                  ("mean activation", f"base {fmt(s1['mean_base'])} → misaligned "
                                      f"{fmt(s1['mean_mis'])}"),
                  ("firing density", f"base {fmt(s1['density_base'])} → misaligned "
                                     f"{fmt(s1['density_mis'])}"),
                  ("dense", fmt(bool(s1["dense"]))), ("candidate rank", pool)]
    else:
        items.append(("stage 1", '<span class="note">no shift table</span>'))
    if scr:
        items += [("screen (α " + fmt(scr["alpha"], 2) + ")",
                   f"induce gain {fmt(scr['induce_gain'])}, repair gain {fmt(scr['repair_gain'])}"),
                  ("IndPP", f"{fmt(scr['indpp'])} <span class=\"note\">(rank {scr['indpp_rank']})"
                            f"</span>")]
    if cal:
        rank = (f"rank {cal['score_rank']} of {cal['n_valid']} valid" if cal.get("score_rank")
                else "not valid")
        items += [("α*<sub>ind</sub> / α*<sub>rep</sub>",
                   f"{fmt(cal['alpha_ind'], 2)} / {fmt(cal['alpha_rep'], 2)}"),
                  ("ValidReduc score", f"<b>{fmt(cal['score'])}</b> <span class=\"note\">({rank}; "
                                       f"EM reduction of the misaligned model at α*<sub>rep</sub>)"
                                       f"</span>")]
    items.append(("steering strength in the set", f"α<sub>rep</sub> {fmt(card['alpha_rep'], 2)}"))
    return ('<dl class="stats">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)
            + "</dl>")


def curve_svg(curve: dict, mode: str, alpha_star, doc: dict, width: int = 360,
              height: int = 200) -> str:
    pts = ([curve["unsteered"]] if curve.get("unsteered") else []) + curve["points"]
    who = "base, steered +α" if mode == "induce" else "misaligned, steered −α"
    title = f"{mode} ({who})"
    if not curve["points"]:
        return (f'<div><b>{esc(title)}</b><p class="note">not steered in stages 2-3</p></div>')
    ml, mr, mt, mb = 40, 10, 22, 30
    rate = doc["incoherence_unit"] == "rate"
    vals = [p["em"] + (p["em_sem"] or 0) for p in pts]
    vals += [p["incoherence"] + (p["incoherence_sem"] or 0) for p in pts]
    y1 = max(1.0, max(vals)) if rate else max(1.0, max(vals) * 1.1)
    y0 = min([0.0] + [p["incoherence"] - (p["incoherence_sem"] or 0) for p in pts])
    y0 = y0 - 0.05 * (y1 - y0) if y0 < 0 else 0.0  # negative: an NLL shift (nats) below zero
    x1 = max(p["alpha"] for p in pts) or 1.0

    def X(a):
        return ml + a / x1 * (width - ml - mr)

    def Y(v):
        return height - mb - (v - y0) / (y1 - y0) * (height - mt - mb)

    out = [f'<svg class="chart curve" viewBox="0 0 {width} {height}" width="{width}" '
           f'height="{height}" role="img" aria-label="{esc(title)}" '
           f'xmlns="http://www.w3.org/2000/svg"><text class="title" x="{ml}" y="13">'
           f'{esc(title)}</text>']
    for t in _ticks(y0, y1, 4):
        out.append(f'<line x1="{ml}" x2="{width - mr}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" '
                   f'stroke="#eef0f4"/><text x="{ml - 5}" y="{Y(t) + 3:.1f}" '
                   f'text-anchor="end">{t:g}</text>')
    for t in _ticks(0, x1, 4):
        out.append(f'<text x="{X(t):.1f}" y="{height - mb + 13}" text-anchor="middle">{t:g}</text>')
    out.append(f'<text x="{(ml + width - mr) / 2:.0f}" y="{height - 3}" '
               f'text-anchor="middle">α</text>')
    budget = doc.get("incoherence_budget") or {}
    if budget.get("value") is not None:
        limit = budget["value"] + (curve["unsteered"]["incoherence"]
                                   if budget.get("mode") == "relative" and curve.get("unsteered")
                                   else 0.0)
        if y0 <= limit <= y1:
            out.append(f'<line x1="{ml}" x2="{width - mr}" y1="{Y(limit):.1f}" y2="{Y(limit):.1f}" '
                       f'stroke="#6c3483" stroke-dasharray="2 3"><title>incoherence budget '
                       f'{limit:.3g}</title></line>')
    if alpha_star is not None:
        out.append(f'<line x1="{X(alpha_star):.1f}" x2="{X(alpha_star):.1f}" y1="{mt}" '
                   f'y2="{height - mb}" stroke="#1e8449" stroke-dasharray="4 3"/>'
                   + (f'<text x="{X(alpha_star) - 3:.1f}" y="{mt + 9}" text-anchor="end" '
                      if X(alpha_star) > width - mr - 40 else
                      f'<text x="{X(alpha_star) + 3:.1f}" y="{mt + 9}" ')
                   + f'style="fill:#1e8449">α*={alpha_star:g}</text>')
    for key, color, dash in (("em", "#b03a2e", ""), ("incoherence", "#6c3483", "5 3")):
        path = " ".join(f"{'M' if i == 0 else 'L'}{X(p['alpha']):.1f},{Y(p[key]):.1f}"
                        for i, p in enumerate(pts))
        out.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.8" '
                   f'stroke-dasharray="{dash}"/>')
        for p in pts:
            sem = p.get(f"{key}_sem")
            if sem:
                out.append(f'<line x1="{X(p["alpha"]):.1f}" x2="{X(p["alpha"]):.1f}" '
                           f'y1="{Y(p[key] - sem):.1f}" y2="{Y(p[key] + sem):.1f}" '
                           f'stroke="{color}" stroke-width="1"/>')
            tip = (f"α {p['alpha']:g}: {key} {p[key]:.3f}" + (f" ± {sem:.3f}" if sem else "")
                   + (f" (n {p['n']})" if p.get("n") else ""))
            out.append(f'<circle cx="{X(p["alpha"]):.1f}" cy="{Y(p[key]):.1f}" r="2.6" '
                       f'fill="{color}"><title>{esc(tip)}</title></circle>')
    out.append("</svg>")
    return "".join(out)


def curves(card: dict, doc: dict) -> str:
    cal = card["calibration"] or {}
    src = {m: card["curves"][m]["source"] for m in ("induce", "repair")}
    srcs = {s for s in src.values() if s}
    unit = "" if doc["incoherence_unit"] == "rate" else " (nats: MC neutral NLL shift)"
    note = ("stage 3 calibration sweep" if srcs == {"calibration"} else
            "stage 2 screen only (not shortlisted)" if srcs == {"screen"} else "")
    return ('<div class="cols">'
            + curve_svg(card["curves"]["induce"], "induce", cal.get("alpha_ind"), doc)
            + curve_svg(card["curves"]["repair"], "repair", cal.get("alpha_rep"), doc)
            + f'</div><p class="legend"><span style="color:#b03a2e">━ EM rate</span> · '
            f'<span style="color:#6c3483">╍ incoherence{unit}</span> · '
            f'<span style="color:#6c3483">┈ incoherence budget</span> · '
            f'<span style="color:#1e8449">╎ α*</span> · ± SEM bars; α = 0 is the unsteered model; '
            f'{esc(note)}.</p>')


def unembed_html(card: dict, doc: dict) -> str:
    ue = card["unembed"]
    if not ue:
        return '<p class="note">no unembedding table</p>'
    top = max([abs(t["value"]) for k in ue.values() for t in k] + [1e-9])
    cols = []
    for kind, color in (("promoted", "#1e8449"), ("suppressed", "#7d3c98")):
        rows = "".join(
            f'<code>{esc(t["token"])}</code><div class="b" '
            f'style="width:{70 * abs(t["value"]) / top:.0f}px;'
            f'background:{color}"></div><span class="num">{t["value"]:+.3f}</span>'
            for t in ue[kind])
        cols.append(f'<div><h4>{kind}</h4><div class="tok-list">{rows}</div></div>')
    return '<div class="cols">' + "".join(cols) + "</div>"


def _window(c: dict, ranking: str, scale: float) -> str:
    acts = c["window_base"] if ranking == "base" else c["window_mis"]
    out = []
    for i, tok in enumerate(c["tokens"]):
        a = acts[i] if i < len(acts) else None
        b, m = ((c["window_base"][i], c["window_mis"][i]) if i < len(c["window_base"])
                else (None, None))
        if ranking == "shift" and b is not None and m is not None:
            a = abs(m - b)
        alpha = 0.0 if a is None or scale <= 0 else max(0.0, min(1.0, a / scale))
        hue = "125,60,152" if ranking == "shift" else "255,140,0"
        cls = "t f" if i == c["focus"] else "t"
        tip = f"base {fmt(b)} · misaligned {fmt(m)}"
        out.append(f'<span class="{cls}" style="background:rgba({hue},{0.85 * alpha:.2f})" '
                   f'title="{esc(tip)}">{esc(tok.replace(chr(10), "↵"))}</span>')
    return "".join(out)


def contexts_html(card: dict) -> str:
    ctx = card["contexts"]
    if not ctx:
        return '<p class="note">no top-activating contexts (no contexts table, or this latent ' \
               'never fires on the corpus or the core prompts)</p>'
    out = []
    for si, source in enumerate(("corpus", "core")):
        blocks = ctx.get(source) or {}
        inner = []
        for ranking in ("base", "mis", "shift"):
            cs = blocks.get(ranking) or []
            if not cs:
                inner.append(f'<h4>{esc(RANKING_TITLES[ranking])}</h4><p class="note">none '
                             f'(never above zero)</p>')
                continue
            if ranking == "shift":
                scale = max(abs((m or 0) - (b or 0)) for c in cs
                            for b, m in zip(c["window_base"], c["window_mis"]))
            else:
                key = "window_base" if ranking == "base" else "window_mis"
                scale = max((a or 0) for c in cs for a in c[key])
            lines = "".join(
                f'<div class="ctx"><span class="vals">base {fmt(c["act_base"], 2)} · mis '
                f'{fmt(c["act_mis"], 2)}<br>{esc(c["doc_id"])}</span>'
                f'<span class="win">{_window(c, ranking, scale)}</span></div>' for c in cs)
            inner.append(f'<h4>{esc(RANKING_TITLES[ranking])}</h4>{lines}')
        opened = " open" if si == 0 else ""
        out.append(f'<details{opened}><summary>Top contexts: {SOURCE_TITLES[source]}</summary>'
                   + "".join(inner) + "</details>")
    return "".join(out)


def _labels(labels) -> str:
    return "".join(f'<span class="lab {LABEL_CLASS.get(x, "")}">{esc(x or "unlabelled")}</span>'
                   for x in labels or [])


def generations_html(card: dict) -> str:
    g = card["generations"]
    if not g["available"]:
        return f'<p class="note">{esc(g["reason"])}</p>'
    out = []
    for mode, who in (("repair", "misaligned model repaired by this latent alone (−α)"),
                      ("induce", "base model induced by this latent alone (+α)")):
        m = g.get(mode) or {}
        if not m.get("samples"):
            continue
        rows = "".join(
            f'<tr><td>{esc(s["prompt"])}</td><td>{_labels(s["unsteered_labels"])}'
            f'{esc(s["unsteered"])}</td><td>{_labels(s["steered_labels"])}{esc(s["steered"])}'
            f'</td></tr>' for s in m["samples"])
        out.append(f'<h4>{esc(who)}, α {fmt(m["alpha"], 2)} ({esc(m["source"])})</h4>'
                   f'<table class="gen"><thead><tr><th>prompt</th><th>unsteered</th>'
                   f'<th>steered</th></tr></thead><tbody>{rows}</tbody></table>')
    return "".join(out) + ('<p class="note">Answers kept from the stage 2-3 runs (not generated '
                           'again), with the judge\'s label.</p>')


def card_html(card: dict, doc: dict) -> str:
    s1, cal = card["stage1"] or {}, card["calibration"] or {}
    badge = "kp" if card["sign"] > 0 else "kn"
    meaning = "rises under misalignment" if card["sign"] > 0 else "falls under misalignment"
    np_link = (f'<a class="np" href="{esc(card["neuronpedia"])}" target="_blank" '
               f'rel="noopener noreferrer">Neuronpedia ↗</a>' if card["neuronpedia"] else "")
    attrs = (f'id="latent-{card["latent"]}" data-latent="{card["latent"]}" '
             f'data-sign="{1 if card["sign"] > 0 else -1}" data-rank="{card["set_rank"]}" '
             f'data-delta="{s1.get("delta", "")}" data-score="{cal.get("score", "")}"')
    return (f'<article class="card" {attrs}>'
            f'<div class="card-head"><h2>Latent {card["latent"]}</h2>'
            f'<span class="badge {badge}">{card["group"]}</span>'
            f'<span class="sub">{meaning} · #{card["set_rank"]} in {esc(doc["set"])}</span>'
            f'{np_link}</div>'
            + pills(card)
            + '<div class="cols"><div><h3>Stages 1-3</h3>' + stats(card, doc) + "</div>"
            + '<div><h3>Decoder direction through the unembedding</h3>'
            + unembed_html(card, doc) + "</div></div>"
            + "<h3>Induce and repair curves</h3>" + curves(card, doc)
            + "<h3>Top-activating contexts</h3>" + contexts_html(card)
            + "<details><summary>Generations kept from stages 2-3</summary>"
            + generations_html(card) + "</details>"
            + "</article>")


# --- the page ---------------------------------------------------------------------------------

def render_page(doc: dict) -> str:
    sae = doc["sae"] or {}
    budget = doc.get("incoherence_budget") or {}
    meta = (f'<p class="meta">rule <b>{esc(doc["rule"])}</b> · model <b>{esc(doc["key"])}</b> '
            f'(fine-tuned on {esc(doc["domain"])}) · SAE <b>{esc(sae.get("id"))}</b> at layer '
            f'<b>{esc(doc["layer"])}</b>, {esc(sae.get("d_sae"))} latents · activation '
            f'<b>{esc(doc["activation"])}</b> · stages 2-3 scorer <b>{esc(doc["scorer"])}</b> · '
            f'incoherence budget {esc(budget.get("mode"))} {esc(budget.get("value"))} · '
            f'steering scale {fmt(doc.get("scale"), 3)}</p>')
    unsteered = "".join(
        f'<li>unsteered {"base" if m == "induce" else "misaligned"} model: EM '
        f'{fmt(p["em"])}, incoherence {fmt(p["incoherence"])}</li>'
        for m, p in sorted(doc.get("unsteered", {}).items()))
    notes = "".join(f"<li>{esc(n)}</li>" for n in doc.get("notes", []))
    empty = ('<p class="note">This set is empty: no latent passed the selection rule.</p>'
             if doc.get("empty") else "")
    summary = (
        '<section id="summary"><div class="panel summary-grid">'
        f'<div><h2>Discovery funnel</h2>{funnel_html(doc)}'
        f'<ul>{unsteered}</ul>{f"<ul class=note>{notes}</ul>" if notes else ""}</div>'
        f'<div><h2>Activation shift</h2>{scatter_svg(doc)}</div></div>'
        f'<div class="panel"><h2>The set: {len(doc["latents"])} latents '
        f'(K+ {len(doc.get("K_pos", []))}, K− {len(doc.get("K_neg", []))})</h2>{empty}'
        f'{overview_table(doc) if doc["latents"] else ""}</div></section>')
    controls = (
        '<nav class="controls"><input id="filter" type="search" '
        'placeholder="filter: a latent id, or any text (tokens, answers)" aria-label="filter cards">'
        '<label><input id="show-kp" type="checkbox" checked> K+</label>'
        '<label><input id="show-kn" type="checkbox" checked> K−</label>'
        '<label>sort <select id="sort"><option value="rank">set order</option>'
        '<option value="score">ValidReduc score</option><option value="delta">Delta</option>'
        '<option value="absdelta">|Delta|</option><option value="latent">latent id</option>'
        '</select></label><button id="expand" type="button">expand all</button>'
        '<button id="collapse" type="button">collapse all</button><span id="shown"></span></nav>')
    cards = "".join(card_html(c, doc) for c in doc["latents"])
    footer = (
        '<footer><p><b>How to read a card.</b> Stage 1: Delta is the mean activation over the '
        'core prompts in the misaligned model minus that in the base; density is the fraction of '
        'tokens where the latent is active. Stages 2-3: induce steers the base along '
        '+α·s·d̂<sub>k</sub>, repair steers the misaligned model along −α·s·d̂<sub>k</sub> '
        '(units of the steering scale); α* is the strongest α whose incoherence stays within the '
        'budget, and the ValidReduc score is the misaligned model\'s EM at α = 0 minus at '
        'α*<sub>rep</sub>. Contexts: one token per document (its highest), with both models\' '
        'activations; the highlighted token is the one ranked, shading is the activation '
        '(orange) or its change between the models (purple). Unembedding: '
        f'{esc(doc.get("unembed_method") or "not computed")}.</p>'
        f'<p>Made by <code>python -m blockem latent-cards</code> from {esc(doc["set"])}.json; '
        f'the same content is in {esc(doc["set"])}.cards.json.</p></footer>')
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>Latent cards: {esc(doc["set"])}</title><style>{CSS}</style></head><body>'
            f'<header><h1>Latent cards · {esc(doc["set"])}</h1>{meta}</header>'
            f'{summary}{controls}<main id="cards">{cards}</main>{footer}'
            f'<script>{SCRIPT}</script></body></html>\n')
