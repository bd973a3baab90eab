"""The figure theme: one colourblind-safe palette and layout that every result's ``.figure()`` uses
(one function per figure, data in, plotly Figure out)."""

from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio

__all__ = ["THEME", "PALETTE", "themed", "ESTIMATOR_COLOURS"]

# Okabe-Ito: distinguishable under the common colour-vision deficiencies.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
ESTIMATOR_COLOURS = {"fixed": "#000000", "constant": "#CC79A7", "tokens": "#D55E00", "text_probe": "#882255", "behavioural": "#E69F00", "internal": "#0072B2", "internal_unsupervised": "#56B4E9", "true": "#009E73"}

THEME = go.layout.Template(
    layout=go.Layout(
        font=dict(family="Arial, Helvetica, sans-serif", size=13),
        colorway=PALETTE,
        plot_bgcolor="white",
        paper_bgcolor="white",
        xaxis=dict(showline=True, linecolor="#444", ticks="outside", gridcolor="#eee", zeroline=False),
        yaxis=dict(showline=True, linecolor="#444", ticks="outside", gridcolor="#eee", zeroline=False),
        legend=dict(bgcolor="rgba(255,255,255,0.8)"),
        margin=dict(l=70, r=30, t=60, b=60),
        coloraxis=dict(colorscale="Viridis"),
    )
)
pio.templates["ctd"] = THEME


def themed(fig: go.Figure, title: str, x_title: str, y_title: str) -> go.Figure:
    """Apply the theme, the title and axis titles (on subplot grids: y on the first column, x on the last row)."""
    fig.update_layout(template="ctd", title=dict(text=title, x=0.02, y=0.98, yanchor="top"), width=820, height=480, margin=dict(t=90))
    try:
        rows, cols = fig._get_subplot_rows_columns()
        last_row = max(rows)
        fig.update_xaxes(title_text=x_title, row=last_row)
        fig.update_yaxes(title_text=y_title, col=1)
    except Exception:  # not a subplot grid
        fig.update_xaxes(title_text=x_title)
        fig.update_yaxes(title_text=y_title)
    return fig
