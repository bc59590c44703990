"""Attention weights of a translation, drawn as heatmaps (the paper's Figures 3-5).

`attention_weights` runs the model teacher-forced on a source sentence and its
translation with the 'intermediates' collection mutable: every attention layer
then records its softmax weights (transformer/attention.py) instead of taking
the fused path. `plot` draws one PNG per attention kind and layer, a panel per
head, with the tokens on the axes: rows are the attending positions (queries),
columns the positions attended to (keys).
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from transformer.architecture import Model

KINDS = {  # (stack, sublayer) -> file name part
    ("encoder", "self_attention"): "encoder_self",
    ("decoder", "self_attention"): "decoder_self",
    ("decoder", "cross_attention"): "encoder_decoder",
}


def attention_weights(
    model: Model, params: Any, inputs: jax.Array, targets: jax.Array
) -> dict[tuple[str, int], np.ndarray]:
    """inputs [1, S], targets [1, T] -> {(kind, layer): weights [N, T or S, S or T]}."""
    _, state = model.apply({"params": params}, inputs, targets, mutable=["intermediates"])
    found = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state["intermediates"]):
        names = [getattr(k, "key", None) for k in path]
        stack = names[0]
        # The LSTM baseline attends once, after its last layer: "layer" 0.
        layer = next((int(n.split("_")[1]) for n in names if n and n.startswith("layer_")), 0)
        sublayer = next(n for n in names if n in ("self_attention", "cross_attention"))
        found[(KINDS[(stack, sublayer)], layer)] = np.asarray(leaf[0], np.float32)  # [N, Q, K]
    return dict(sorted(found.items()))


def decoder_inputs_labels(target_pieces: list[str]) -> list[str]:
    """The decoder reads <s> then the output shifted right: its query/key labels."""
    return ["<s>", *target_pieces[:-1]]


def plot(
    weights: np.ndarray, query_labels: list[str], key_labels: list[str], title: str, path: str
) -> None:
    """Writes one PNG: a heatmap per head of weights [N, Q, K]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = weights.shape[0]
    cols = min(heads, 4)
    rows = math.ceil(heads / cols)
    size = 0.28 * max(len(query_labels), len(key_labels)) + 1.5
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size), squeeze=False)
    for head, ax in enumerate(axes.flat):
        if head >= heads:
            ax.axis("off")
            continue
        ax.imshow(weights[head], cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_title(f"head {head + 1}", fontsize=9)
        ax.set_xticks(range(len(key_labels)), key_labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(query_labels)), query_labels, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    epath.Path(path).write_bytes(png.getvalue())  # a gs:// workdir's folder too


def write_maps(
    model: Model,
    params: Any,
    source_ids: list[int],
    target_ids: list[int],
    source_pieces: list[str],
    target_pieces: list[str],
    out_dir: str,
) -> list[str]:
    """PNG files of every attention layer for one translation; returns their paths."""
    inputs = jnp.asarray([source_ids], jnp.int32)
    targets = jnp.asarray([target_ids], jnp.int32)
    decoder_labels = decoder_inputs_labels(target_pieces)
    labels = {
        "encoder_self": (source_pieces, source_pieces),
        "decoder_self": (decoder_labels, decoder_labels),
        "encoder_decoder": (decoder_labels, source_pieces),
    }
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = []
    for (kind, layer), weights in attention_weights(model, params, inputs, targets).items():
        path = os.path.join(out_dir, f"{kind}_layer{layer + 1}.png")
        title = f"{kind.replace('_', '-')} attention, layer {layer + 1}"
        plot(weights, *labels[kind], title, path)
        paths.append(path)
    return paths
