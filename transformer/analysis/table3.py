"""The paper's Table 3 at a smaller width: which rows, their settings, their table.

The paper varies its base model one setting at a time (Table 3): (A) the head
count at constant computation, (B) the key size, (C) depth and widths, (D)
dropout and label smoothing, (E) learned positions. `rows` gives those
variants around a narrower base model, scaling what the paper scales: widths
(d_model, d_ff, d_k, d_v) by width.d_model / 512 and the layer counts by
width's / 6, so that each row differs from its base as the paper's does. The
base itself is `width` with the paper's 8 heads; head counts are kept, so the
width must be divisible by 32 (the (A) rows' largest) for d_k = d_v = D / h.

`summarize` turns the runs' results into the Markdown table and `plot` into
a PNG; experiments/table3.py trains the rows.
"""

from __future__ import annotations

import dataclasses
import statistics

from transformer import config
from transformer.config import BASE, ModelConfig

WIDTHS = ("d_model", "d_ff", "d_k", "d_v")
DEPTHS = ("num_encoder_layers", "num_decoder_layers")
GROUPS = ("A", "B", "C", "D", "E")


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: the paper's preset name, its label, and the
    settings that differ from the run's flagfile (model and recipe alike)."""

    name: str
    label: str
    settings: dict


def _group(preset_name: str) -> str:
    """'A'..'E' for the rows of Table 3's groups, else the preset's name ('base', 'big')."""
    label = config.PRESETS[preset_name].row
    return label[1] if label.startswith("(") else preset_name


def base_settings(width: ModelConfig) -> dict:
    """The narrow base row: `width` with the paper's 8 heads.

    The depths are stated too, so that a recipe flagfile that sets its own
    (the CPU demo's trains 2+2) cannot change the base row the others scale from.
    """
    heads = BASE.num_heads
    if width.d_model % 32:
        raise config.ConfigError(
            f"d_model={width.d_model} must be divisible by 32 for the (A) rows' head counts"
        )
    depths = {name: getattr(width, name) for name in DEPTHS}
    return {
        "num_heads": heads,
        "d_k": width.d_model // heads,
        "d_v": width.d_model // heads,
        **depths,
    }


def row_settings(preset_name: str, width: ModelConfig) -> dict:
    """The paper's change of this row, scaled to `width`, over base_settings."""
    paper = config.PRESETS[preset_name]
    width_scale = width.d_model / BASE.d_model
    depth_scale = width.num_encoder_layers / BASE.num_encoder_layers
    settings = base_settings(width)
    for field in dataclasses.fields(ModelConfig):
        value = getattr(paper.model, field.name)
        if value == getattr(BASE, field.name):
            continue
        if field.name in WIDTHS:
            value = max(1, round(value * width_scale))
        elif field.name in DEPTHS:
            value = max(1, round(value * depth_scale))
        settings[field.name] = value
    return {**settings, **paper.recipe}


def rows(groups: list[str], width: ModelConfig) -> list[Row]:
    """The base row, then every Table 3 row of the given groups (A-E), in the paper's order."""
    unknown = sorted(set(groups) - set(GROUPS) - {"base"})
    if unknown:
        raise config.ConfigError(
            f"unknown Table 3 rows {', '.join(unknown)}; choose among {', '.join(GROUPS)}"
        )
    chosen = [name for name in config.TABLE3 if _group(name) in {"base", *groups}]
    return [Row(name, config.PRESETS[name].row, row_settings(name, width)) for name in chosen]


# ----------------------------------------------------------------------------
# The table and the plot
# ----------------------------------------------------------------------------

METRICS = ("validation_perplexity", "sacrebleu", "chrf")


def _mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (0 for one value)."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def _cell(values: list[float], digits: int) -> str:
    mean, spread = _mean_spread(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {spread:.{digits}f}"


def summarize(results: dict[str, list[dict]], models: dict[str, ModelConfig], recipes: dict) -> str:
    """Markdown: one line per row, from each row's runs (one per seed).

    results[name]: the runs' metrics (METRICS, "params", "steps"); models and
    recipes[name]: the settings each row trained with. A row whose BLEU and
    perplexity both lie within the seeds' range around the base row is marked
    "within noise"; with one base seed the range is not known, and the table says so.
    """
    header = (
        "| row | N | d_model | d_ff | h | d_k | d_v | P_drop | eps_ls | positions | params "
        "| steps | val PPL | sacreBLEU | chrF | |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    base = results.get("base")
    lines = []
    for name, runs in results.items():
        m, label = models[name], config.PRESETS[name].row
        cells = [
            label, m.num_encoder_layers, m.d_model, m.d_ff, m.num_heads, m.d_k, m.d_v,
            m.dropout, recipes[name], m.positional, f"{runs[0]['params'] / 1e6:.2f}M",
            f"{statistics.fmean(r['steps'] for r in runs):.0f}",
            _cell([r["validation_perplexity"] for r in runs], 2),
            _cell([r["sacrebleu"] for r in runs], 2),
            _cell([r["chrf"] for r in runs], 2),
            _noise_note(name, runs, base),
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return header + "\n".join(lines) + "\n\n" + _seeds_note(results) + "\n"


def _seeds_note(results: dict[str, list[dict]]) -> str:
    counts = {name: len(runs) for name, runs in results.items()}
    base, others = counts.get("base", 0), [n for k, n in counts.items() if k != "base"]
    if base < 2:
        return (
            "One seed per row: the seed-to-seed spread is not measured, so no difference "
            "here is known to exceed the noise; --base_seeds=3 measures it."
        )
    seeds = (
        f"{base} seeds"
        if not others or set(others) == {base}
        else (f"base {base} seeds, the other rows {', '.join(sorted(set(map(str, others))))}")
    )
    return (
        f'Seeds: {seeds}; mean ± half the range. "within noise": the row\'s perplexity and '
        "sacreBLEU both differ from the base row's mean by no more than the range of the "
        "base row's seeds (or of the row's own, if wider)."
    )


def _noise_note(name: str, runs: list[dict], base: list[dict] | None) -> str:
    if name == "base" or base is None or len(base) < 2:
        return ""
    within = True
    for key in ("validation_perplexity", "sacrebleu"):
        mine, theirs = [r[key] for r in runs], [r[key] for r in base]
        noise = max(max(v) - min(v) for v in (mine, theirs))
        within &= abs(statistics.fmean(mine) - statistics.fmean(theirs)) <= noise
    return "within noise" if within else ""


def plot(results: dict[str, list[dict]], path: str, title: str) -> None:
    """Validation perplexity and sacreBLEU per row (bars: mean; lines: seeds' range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    figure, axes = plt.subplots(1, 2, figsize=(max(6, 1.0 * len(names) + 3), 4))
    for axis, key, label in (
        (axes[0], "validation_perplexity", "validation perplexity (lower is better)"),
        (axes[1], "sacrebleu", "sacreBLEU (higher is better)"),
    ):
        stats = [_mean_spread([r[key] for r in results[n]]) for n in names]
        axis.bar(range(len(names)), [s[0] for s in stats], yerr=[s[1] for s in stats])
        axis.set_xticks(range(len(names)), [config.PRESETS[n].row for n in names], rotation=45,
                        ha="right")  # fmt: skip
        axis.set_title(label)
        if key == "validation_perplexity":
            axis.set_ylim(bottom=0.9 * min(s[0] for s in stats) if stats else 0)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
