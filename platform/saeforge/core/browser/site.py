"""The feature browser's static site: an overview page and one page per chosen latent, written
as plain HTML files with inline SVG charts, inline CSS and a few lines of inline JavaScript (sort
and search the latent table). Nothing is fetched: the folder opens from disk, from a copy, or
from MLflow's artifact viewer.

The pages are built from `SiteData` (what `jobs.browse` measured); this module only formats.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from saeforge.core.browser.stats import WINDOW_BEFORE, LatentStats
from saeforge.core.metrics import DENSE_FIRING_RATE

INDEX = "index.html"
LATENT_DIR = "latents"
TABLE_TOKENS = 5  # promoted tokens shown per latent in the overview table


@dataclass
class SiteData:
    """Everything the pages show."""

    title: str
    info: dict[str, str]  # label -> value, shown at the top of the overview
    stats: LatentStats
    pages: list[int]  # latents that get a page of their own
    tokens: np.ndarray  # (contexts, T) token ids; a row's index is its context id
    token_text: Callable[[int], str]  # token id -> its text
    promoted: dict[int, list[tuple[int, float]]]  # latent -> [(token id, logit effect)], best first
    suppressed: dict[int, list[tuple[int, float]]]
    similar: dict[int, list[tuple[int, float]]]  # latent -> [(latent, decoder cosine)]
    cosine_hist: tuple[list[float], list[int]]
    group_kind: str = ""  # "" when the variant has no groups or levels
    group_labels: list[int] = field(default_factory=list)  # the part of each latent


def latent_page(latent: int) -> str:
    return f"{LATENT_DIR}/{latent}.html"


# -- charts ----------------------------------------------------------------------------------------


def svg_bars(counts, *, labels: tuple[str, str, str], xlabel: str, ylabel: str = "count", width: int = 440) -> str:
    """A bar chart as inline SVG: one bar per count, the first / middle / last x labels."""
    height, left, bottom, top = 170, 44, 34, 10
    n = max(len(counts), 1)
    peak = max(max(counts, default=0), 1)
    plot_w, plot_h = width - left - 8, height - bottom - top
    bars = []
    for i, c in enumerate(counts):
        h = plot_h * c / peak
        x = left + plot_w * i / n
        bars.append(
            f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{max(plot_w / n - 1, 0.5):.1f}" '
            f'height="{h:.1f}" fill="#4c78a8"><title>{c:g}</title></rect>'
        )
    first, mid, last = (html.escape(s) for s in labels)
    axis_y = top + plot_h
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">'
        f'<line x1="{left}" y1="{axis_y}" x2="{width - 8}" y2="{axis_y}" stroke="#888"/>'
        + "".join(bars)
        + f'<text x="{left}" y="{axis_y + 14}" font-size="11">{first}</text>'
        f'<text x="{left + plot_w / 2}" y="{axis_y + 14}" font-size="11" text-anchor="middle">{mid}</text>'
        f'<text x="{width - 8}" y="{axis_y + 14}" font-size="11" text-anchor="end">{last}</text>'
        f'<text x="{left + plot_w / 2}" y="{height - 4}" font-size="11" text-anchor="middle">'
        f"{html.escape(xlabel)}</text>"
        f'<text x="4" y="{top + 10}" font-size="11">{peak:g}</text>'
        f'<text x="4" y="{axis_y}" font-size="11">0</text>'
        f'<text x="12" y="{top + plot_h / 2 + 30}" font-size="11" transform="rotate(-90 12,{top + plot_h / 2 + 30})">'
        f"{html.escape(ylabel)}</text></svg>"
    )


def edge_labels(edges: list[float], fmt: str = "{:.3g}") -> tuple[str, str, str]:
    return fmt.format(edges[0]), fmt.format(edges[len(edges) // 2]), fmt.format(edges[-1])


def chart(title: str, svg: str, note: str = "") -> str:
    note = f'<p class="note">{html.escape(note)}</p>' if note else ""
    return f'<figure class="chart"><figcaption>{html.escape(title)}</figcaption>{svg}{note}</figure>'


def l0_chart(stats: LatentStats, max_bars: int = 50) -> str:
    counts = stats.l0_counts.tolist()
    last = max((i for i, c in enumerate(counts) if c), default=0)
    width = max(1, math.ceil((last + 1) / max_bars))
    binned = [sum(counts[s : s + width]) for s in range(0, last + 1, width)]
    edges = [float(s) for s in range(0, last + 1 + width, width)]
    mean = sum(i * c for i, c in enumerate(counts)) / max(stats.tokens, 1)
    svg = svg_bars(
        binned, labels=edge_labels(edges, "{:.0f}"), xlabel="latents firing on a token (L0)", ylabel="tokens"
    )
    return chart("L0 distribution", svg, f"mean L0 {mean:.1f} over {stats.tokens:,} tokens")


def frequency_chart(stats: LatentStats, step: float = 0.25) -> str:
    freq = stats.frequency.numpy()
    alive = freq[freq > 0]
    low = math.floor(math.log10(1 / max(stats.tokens, 1)) / step) * step
    edges = [low + step * i for i in range(int(round(-low / step)) + 1)]
    counts = np.histogram(np.log10(alive), bins=edges)[0].tolist() if len(alive) and len(edges) > 1 else []
    svg = svg_bars(counts, labels=edge_labels(edges, "{:.2f}"), xlabel="log10 firing frequency", ylabel="latents")
    return chart("Latent firing frequency (log10, latents that fired)", svg)


# -- tokens and contexts ---------------------------------------------------------------------------


def shown(text: str) -> str:
    """A token's text, escaped, with newlines and tabs made visible."""
    return html.escape(text).replace("\n", "\u21b5").replace("\t", "\u21e5")


def token_chip(text: str) -> str:
    return f'<code class="tok">{shown(text) or "&nbsp;"}</code>'


def render_example(data: SiteData, latent: int, part, slot: int, scale: float) -> str:
    """One context window: each token shaded by the latent's activation there, the peak marked."""
    context = int(part.context[latent, slot])
    peak = int(part.peak[latent, slot])
    row = data.tokens[context]
    spans = []
    for w, act in enumerate(part.window[latent, slot].tolist()):
        pos = peak - WINDOW_BEFORE + w
        if math.isnan(act):
            continue
        alpha = min(1.0, max(act, 0.0) / scale) if scale > 0 else 0.0
        cls = "t peak" if pos == peak else "t"
        style = f' style="background:rgba(255,102,0,{alpha:.2f})"' if alpha > 0 else ""
        text = shown(data.token_text(int(row[pos])))
        spans.append(f'<span class="{cls}"{style} title="{act:.3g}">{text}</span>')
    value = float(part.value[latent, slot])
    return (
        f'<div class="example"><span class="act">{value:.3g}</span>'
        f'<span class="ctx" data-context="{context}">{"".join(spans)}</span></div>'
    )


# -- pages -----------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 8px} h2{font-size:17px;margin:22px 0 8px}
.info{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:13px}
.info dt{color:#666} .info dd{margin:0}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px} .card span{color:#666;font-size:12px}
.charts{display:flex;flex-wrap:wrap;gap:18px} figure.chart{margin:0} figcaption{font-size:13px;font-weight:600}
.note{font-size:12px;color:#666;margin:2px 0}
table{border-collapse:collapse;font-size:13px} th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}
#latents th{cursor:pointer;user-select:none;background:#f5f5f5;position:sticky;top:0}
#latents th[aria-sort=ascending]::after{content:" \\25B2"} #latents th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code.tok{background:#f0f0f0;border-radius:3px;padding:0 3px;margin-right:3px;white-space:pre;font-size:12px}
#search{font-size:14px;padding:4px 8px;width:320px;margin:6px 0}
.example{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;margin:3px 0;line-height:1.7}
.example .act{display:inline-block;width:64px;color:#666;text-align:right;margin-right:10px}
.ctx{white-space:pre-wrap}
.t.peak{outline:2px solid #c00;border-radius:2px;font-weight:700}
.cols{display:flex;gap:40px;flex-wrap:wrap}
a{color:#1f5fa8}
"""

TABLE_SCRIPT = """
(function(){
  var table=document.getElementById('latents'), body=table.tBodies[0];
  var rows=Array.prototype.slice.call(body.rows);
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,col){
    th.addEventListener('click',function(){
      var desc=th.getAttribute('aria-sort')!=='descending';
      Array.prototype.forEach.call(table.tHead.rows[0].cells,function(o){o.removeAttribute('aria-sort');});
      th.setAttribute('aria-sort',desc?'descending':'ascending');
      var text=th.dataset.type==='text';
      rows.sort(function(a,b){
        var x=a.cells[col].dataset.v, y=b.cells[col].dataset.v;
        var c=text?x.localeCompare(y):(parseFloat(x)-parseFloat(y));
        return desc?-c:c;
      });
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
  var search=document.getElementById('search'), shown=document.getElementById('shown');
  search.addEventListener('input',function(){
    var q=search.value.toLowerCase().trim(), n=0;
    rows.forEach(function(r){var hit=!q||r.dataset.search.indexOf(q)>=0; r.style.display=hit?'':'none'; if(hit)n++;});
    shown.textContent=n;
  });
})();
"""


def page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>{body}</body></html>\n"
    )


def info_list(info: dict[str, str]) -> str:
    items = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in info.items())
    return f'<dl class="info">{items}</dl>'


def cards(items: list[tuple[str, str]]) -> str:
    return (
        '<div class="cards">'
        + "".join(f'<div class="card"><b>{v}</b><span>{k}</span></div>' for k, v in items)
        + "</div>"
    )


def groups_section(data: SiteData) -> str:
    """Sizes, dead latents and zero fraction of each group or level (for variants that have them)."""
    if not data.group_kind:
        return ""
    labels = np.asarray(data.group_labels)
    fires = data.stats.fire_counts.numpy()
    parts = sorted(set(labels.tolist()))
    rows, sizes, zero = [], [], []
    for part in parts:
        members = labels == part
        size = int(members.sum())
        zf = 1 - fires[members].sum() / max(data.stats.tokens * size, 1)
        sizes.append(size)
        zero.append(zf)
        rows.append(
            f'<tr><td>{part}</td><td class="num">{size}</td><td class="num">{int((fires[members] == 0).sum())}</td>'
            f'<td class="num">{zf:.4f}</td></tr>'
        )
    kind = html.escape(data.group_kind)
    n = len(parts)
    ends = (str(parts[0]), str(parts[n // 2]), str(parts[-1]))
    charts_ = chart(f"latents per {kind}", svg_bars(sizes, labels=ends, xlabel=kind, ylabel="latents")) + chart(
        f"zero fraction per {kind}", svg_bars(zero, labels=ends, xlabel=kind, ylabel="zero fraction")
    )
    table = (
        f'<table class="groups"><thead><tr><th>{kind}</th><th>latents</th><th>dead</th><th>zero fraction</th></tr>'
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )
    return (
        f'<h2 id="groups">Structure: {n} {kind}s</h2><p class="note">zero fraction: share of (token, latent) '
        f'entries of the {kind} that are 0</p><div class="charts">{charts_}</div>{table}'
    )


def latent_table(data: SiteData) -> str:
    stats = data.stats
    freq, top, mean = stats.frequency.tolist(), stats.act_max.tolist(), stats.mean_activation.tolist()
    has_page = set(data.pages)
    rows = []
    for i in range(stats.d_sae):
        toks = [data.token_text(t) for t, _ in data.promoted.get(i, [])[:TABLE_TOKENS]]
        name = f'<a href="{latent_page(i)}">{i}</a>' if i in has_page else str(i)
        search = html.escape(f"{i} " + " ".join(toks).lower(), quote=True)
        rows.append(
            f'<tr data-search="{search}"><td data-v="{i}">{name}</td>'
            f'<td class="num" data-v="{freq[i]:.6g}">{100 * freq[i]:.4f}%</td>'
            f'<td class="num" data-v="{top[i]:.6g}">{top[i]:.3g}</td>'
            f'<td class="num" data-v="{mean[i]:.6g}">{mean[i]:.3g}</td>'
            f'<td data-v="{html.escape(" ".join(toks), quote=True)}">{"".join(token_chip(t) for t in toks)}</td></tr>'
        )
    return (
        '<h2 id="table">Latents</h2><input id="search" type="search" placeholder="search latent id or token">'
        f' <span class="note"><span id="shown">{stats.d_sae}</span> shown; click a column to sort; '
        f"{len(data.pages)} latents have a page</span>"
        '<table id="latents"><thead><tr><th data-type="num">latent</th><th data-type="num">frequency</th>'
        '<th data-type="num">max activation</th><th data-type="num">mean activation</th>'
        '<th data-type="text">top promoted tokens</th></tr></thead><tbody>'
        + "".join(rows)
        + f"</tbody></table><script>{TABLE_SCRIPT}</script>"
    )


def overview(data: SiteData) -> str:
    stats = data.stats
    freq = stats.frequency
    dead = int((stats.fire_counts == 0).sum())
    dense = int((freq > DENSE_FIRING_RATE).sum())
    mean_l0 = float(stats.fire_counts.sum()) / max(stats.tokens, 1)
    edges, counts = data.cosine_hist
    body = (
        f"<h1>{html.escape(data.title)}</h1>"
        + info_list(data.info)
        + cards(
            [
                ("latents", f"{stats.d_sae:,}"),
                ("tokens read", f"{stats.tokens:,}"),
                ("mean L0", f"{mean_l0:.1f}"),
                ("dead (never fired)", f"{dead:,}"),
                (f"dense (> {DENSE_FIRING_RATE:.0%} of tokens)", f"{dense:,}"),
            ]
        )
        + '<div class="charts">'
        + l0_chart(stats)
        + frequency_chart(stats)
        + chart(
            "Decoder cosine similarity (all pairs of latents)",
            svg_bars(counts, labels=edge_labels(edges, "{:.1f}"), xlabel="cosine", ylabel="pairs"),
        )
        + "</div>"
        + groups_section(data)
        + latent_table(data)
    )
    return page(data.title, body)


def token_table(title: str, items: list[tuple[int, float]], data: SiteData) -> str:
    rows = "".join(f'<tr><td>{token_chip(data.token_text(t))}</td><td class="num">{v:+.3f}</td></tr>' for t, v in items)
    return f'<div><h2>{title}</h2><table class="tokens"><tbody>{rows}</tbody></table></div>'


def latent_link(latent: int, has_page: set[int]) -> str:
    """A link from one latent's page to another's, when that one has a page."""
    return f'<a href="{latent}.html">{latent}</a>' if latent in has_page else str(latent)


def latent_body(data: SiteData, latent: int) -> str:
    stats = data.stats
    scale = float(stats.act_max[latent])
    top = "".join(render_example(data, latent, stats.top, j, scale) for j in stats.top.kept(latent))
    bands = []
    for lo, hi, slots in reversed(stats.quantile_examples(latent)):
        examples = "".join(render_example(data, latent, stats.sample, j, scale) for j in slots)
        bands.append(f'<h3 class="note">quantile {lo:.0%}-{hi:.0%} of its firing contexts</h3>{examples}')
    edges, counts = stats.histogram(latent)
    has_page = set(data.pages)
    similar = "".join(
        f'<tr><td>{latent_link(j, has_page)}</td><td class="num">{c:.3f}</td></tr>'
        for j, c in data.similar.get(latent, [])
    )
    freq = float(stats.frequency[latent])
    info = {
        "frequency": f"{100 * freq:.4f}% of tokens ({int(stats.fire_counts[latent]):,} of {stats.tokens:,})",
        "max activation": f"{scale:.4g}",
        "mean activation when firing": f"{float(stats.mean_activation[latent]):.4g}",
    }
    if data.group_kind:
        info[data.group_kind] = str(data.group_labels[latent])
    return (
        f'<p><a href="../{INDEX}">&larr; overview</a></p><h1>Latent {latent}</h1>'
        + info_list(info)
        + '<div class="charts">'
        + chart(
            "activation histogram (tokens it fires on)",
            svg_bars(counts, labels=edge_labels(edges), xlabel="activation", ylabel="tokens"),
        )
        + "</div>"
        + f'<h2>Top activating contexts</h2><div id="top">{top or "<p>never fired on these tokens</p>"}</div>'
        + f'<h2>Examples across activation quantiles</h2><div id="quantiles">{"".join(bands)}</div>'
        + '<div class="cols">'
        + token_table("Promoted tokens (W_dec x unembedding)", data.promoted.get(latent, []), data)
        + token_table("Suppressed tokens", data.suppressed.get(latent, []), data)
        + "<div><h2>Most similar latents (decoder cosine)</h2>"
        + f'<table class="similar"><tbody>{similar}</tbody></table></div>'
        + "</div>"
    )


def write_site(data: SiteData, folder: str | Path) -> Path:
    """Write the overview and every chosen latent's page under `folder`; returns index.html."""
    folder = Path(folder)
    (folder / LATENT_DIR).mkdir(parents=True, exist_ok=True)
    for latent in data.pages:
        title = f"Latent {latent} - {data.title}"
        (folder / latent_page(latent)).write_text(page(title, latent_body(data, latent)), "utf-8")
    index = folder / INDEX
    index.write_text(overview(data), "utf-8")
    return index
