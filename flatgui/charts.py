"""Plotly figures from the runner's event lists and from report.json sections. Plotting only, no math."""
from __future__ import annotations

from typing import Optional

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .i18n import t

ORIGINAL_COLOR = "#64748b"
QUANTIZED_COLOR = "#ea580c"
RTN_COLOR = "#a3a3a3"
QUAROT_COLOR = "#7c3aed"
REAL_COLOR = "#16a34a"
_LAYOUT = dict(template="plotly_white", margin=dict(l=50, r=20, t=60, b=40), height=360,
               legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1))


def _empty(title: str, note: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, **_LAYOUT)
    fig.add_annotation(text=note, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=14, color="#94a3b8"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def loss_figure(events: list[dict], step_events: list[dict], lang: str = "en") -> go.Figure:
    """Left: the final loss of every calibrated layer (grows one point per layer). Right: the current
    layer's loss at every optimizer step, so a stuck or diverging layer is visible before it ends."""
    done = [e for e in events if e.get("stage") == "layer_done" and e.get("loss") is not None]
    if not done and not step_events:
        return _empty(t("loss_chart", lang), t("chart_empty_loss", lang))
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4],
                        subplot_titles=(t("loss_per_layer", lang), t("loss_per_step", lang)))
    if done:
        # layers numbered from 1, as in the status line
        fig.add_trace(go.Scatter(x=[e["layer"] + 1 for e in done], y=[e["loss"] for e in done],
                                 mode="lines+markers", name=t("loss_per_layer", lang),
                                 line=dict(color=QUANTIZED_COLOR)), row=1, col=1)
    if step_events:
        layer = step_events[-1].get("layer")
        cur = [e for e in step_events if e.get("layer") == layer and e.get("loss") is not None]
        xs = [(e.get("epoch") or 0) * (e.get("steps") or 1) + (e.get("step") or 0) + 1 for e in cur]
        fig.add_trace(go.Scatter(x=xs, y=[e["loss"] for e in cur], mode="lines+markers",
                                 name=t("loss_per_step", lang), line=dict(color="#0ea5e9")), row=1, col=2)
    fig.update_xaxes(title_text=t("axis_layer", lang), row=1, col=1)
    fig.update_xaxes(title_text=t("axis_step", lang), row=1, col=2)
    fig.update_xaxes(type="category", row=1, col=1)  # integer layer indices, no 0.5 ticks
    steps = max([(e.get("epochs") or 1) * (e.get("steps") or 1) for e in step_events[-1:]] or [1])
    fig.update_xaxes(tickformat="d", dtick=max(1, -(-steps // 10)), row=1, col=2)  # whole steps, no repeated labels
    fig.update_layout(title=t("loss_chart", lang), showlegend=False, **{k: v for k, v in _LAYOUT.items()
                                                                        if k != "legend"})
    return fig


SERIES = (("original", "original", ORIGINAL_COLOR), ("quantized", "quantized", QUANTIZED_COLOR),
          ("rtn", "rtn", RTN_COLOR), ("quarot", "quarot", QUAROT_COLOR),
          ("quantized_real", "quantized_real", REAL_COLOR))  # every baseline the quantize job can report


def _grouped(title: str, categories: list[str], series: dict[str, list], lang: str, fmt: str = "{:.2f}",
             yaxis: str = "", log: bool = False, inside: bool = False) -> go.Figure:
    """Grouped bars. log: a log y axis (perplexities of very different size stay comparable); inside: the value
    written vertically inside each bar (many narrow bars: labels never overlap)."""
    fig = go.Figure()
    for key, label_key, color in SERIES:
        ys = series.get(key)
        if not ys or all(v is None for v in ys):
            continue
        fig.add_trace(go.Bar(x=categories, y=ys, name=t(label_key, lang), marker_color=color,
                             text=[fmt.format(v) if v is not None else "—" for v in ys],
                             textposition="inside" if inside else "outside", textangle=-90 if inside else 0,
                             insidetextanchor="end", cliponaxis=False))
    values = [v for ys in series.values() for v in (ys or []) if v is not None and v > 0] or [1.0]
    fig.update_layout(title=title, barmode="group", yaxis_title=yaxis, **_LAYOUT)
    if log:
        import math

        lo, hi = math.log10(min(values)), math.log10(max(values))
        fig.update_yaxes(type="log", range=[max(0.0, lo - 0.3), hi + 0.25])  # room for the numbers on top
    else:
        fig.update_yaxes(range=[0, 1.2 * max(values)])
    fig.update_xaxes(tickangle=0, automargin=True)
    return fig


def ppl_table(report: dict) -> dict[str, dict[str, Optional[float]]]:
    """{"seqlen N": {series: ppl}} from report['ppl']: {seqlen, original, quantized, rtn} (the quantize job and
    core.evaluate), plus by_seqlen {"N": {original, ...}} when core.evaluate ran several window lengths."""
    ppl = report.get("ppl") or {}
    out: dict[str, dict] = {}
    by = ppl.get("by_seqlen")
    if isinstance(by, dict) and by:
        for seqlen, row in by.items():
            if isinstance(row, dict):
                vals = {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}
                if vals:
                    out[f"seqlen {seqlen}"] = vals
        return out
    vals = {key: float(ppl[key]) for key, _, _ in SERIES if isinstance(ppl.get(key), (int, float))}
    if vals:
        out[f"seqlen {ppl.get('seqlen', '?')}"] = vals
    return out


def ppl_figure(report: dict, lang: str = "en") -> go.Figure:
    rows = ppl_table(report)
    if not rows:
        return _empty(t("ppl_chart", lang), t("chart_empty_eval", lang))
    cats = list(rows)
    series = {key: [rows[c].get(key) for c in cats] for key, _, _ in SERIES}
    labels = [t("seqlen_n", lang, n=c.split()[-1]) for c in cats]
    return _grouped(t("ppl_chart", lang), labels, series, lang, yaxis=t("ppl_axis", lang), log=True)


def accuracy_table(report: dict) -> dict[str, dict[str, float]]:
    """{series: {task: percent, ..., acc_avg: percent}} from report['accuracy'] (core.evaluate schema)."""
    acc = report.get("accuracy") or {}
    table = acc.get("acc")
    if isinstance(table, dict):
        return {k: v for k, v in table.items() if isinstance(v, dict)}
    return {k: acc[k]["acc"] for k in ("original", "quantized") if isinstance(acc.get(k), dict)
            and isinstance(acc[k].get("acc"), dict)}


def accuracy_figure(report: dict, lang: str = "en") -> go.Figure:
    table = accuracy_table(report)
    tasks: list[str] = []
    for side in table.values():
        tasks += [k for k, v in side.items() if isinstance(v, (int, float)) and k not in tasks]
    if not tasks:
        return _empty(t("acc_chart", lang), t("chart_empty_eval", lang))
    series = {key: [table.get(key, {}).get(k) for k in tasks] for key, _, _ in SERIES}
    labels = [t("acc_avg", lang) if k == "acc_avg" else k for k in tasks]
    return _grouped(t("acc_chart", lang), labels, series, lang, fmt="{:.1f}", yaxis="%", inside=True)


LATENCY_METRICS = (("prefill_ms", "lat_prefill"), ("decode_ms_per_token", "lat_decode"),
                   ("tokens_per_s", "lat_tps"), ("peak_memory_mb", "lat_peak"), ("weights_mb", "lat_weights"))


def latency_figure(report: dict, lang: str = "en") -> go.Figure:
    """report['latency'] = {original: {prefill_ms, ...}, quantized: {...}[, quantized_real: {...}]}: one panel per
    metric, since their units differ."""
    lat = report.get("latency") or {}
    sides = [(key, label_key, color) for key, label_key, color in SERIES if isinstance(lat.get(key), dict)]
    metrics = [(k, label) for k, label in LATENCY_METRICS if any(lat[s].get(k) is not None for s, _, _ in sides)]
    if not metrics:
        return _empty(t("latency_chart", lang), t("chart_empty_eval", lang))
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[t(label, lang) for _, label in metrics])
    for i, (metric, _) in enumerate(metrics, start=1):
        values = []
        for key, label_key, color in sides:
            v = lat[key].get(metric)
            values.append(v or 0.0)
            fig.add_trace(go.Bar(x=[t(label_key, lang)], y=[v], name=t(label_key, lang), marker_color=color,
                                 showlegend=(i == 1), legendgroup=key,
                                 text=[f"{v:.1f}" if v is not None else "n/a"], textposition="outside",
                                 cliponaxis=False),
                          row=1, col=i)
        fig.update_xaxes(showticklabels=False, row=1, col=i)
        fig.update_yaxes(range=[0, 1.2 * max(values) or 1.0], row=1, col=i)  # room for the numbers on top
    layout = dict(_LAYOUT, height=400, margin=dict(l=50, r=20, t=90, b=30),
                  legend=dict(orientation="h", yanchor="top", y=-0.05, xanchor="center", x=0.5))
    fig.update_layout(title=t("latency_chart", lang), **layout)
    return fig
