"""`tspeft-rt report`: the module-importance picture of a run or an exported adapter.

    tspeft-rt report runs/demo                 # the run's last gate statistics + its last checkpoint
    tspeft-rt report runs/demo/adapter --out keep.png

Prints a table of every module with its token keep rate, its weight norm ||s B A||_F, and its rank by
each (the paper's claim: keep rate indicates importance better than weight norm), the Spearman
correlation of the two rankings, and writes a heatmap PNG of keep rates (layers x module types).
"""

from __future__ import annotations

import re
from pathlib import Path

from tspeft_rt.adapter import ADAPTER_CONFIG, AdapterError, load_adapter
from tspeft_rt.checkpoint import read_log
from tspeft_rt.config import build_config, is_rate
from tspeft_rt.errors import CheckpointError, TspeftError
from tspeft_rt.export import find_checkpoint, module_scaling, read_checkpoint, weight_norm
from tspeft_rt.layers import lora_scaling

_LAYER = re.compile(r"layers\.(\d+)\.(?:.+\.)?([^.]+)$")


def module_scores(source: Path) -> dict[str, dict]:
    """{module: {keep_rate, weight_norm, pruned}} from an adapter directory or a run folder."""
    if (source / ADAPTER_CONFIG).is_file():
        adapter = load_adapter(source)
        if not adapter.gated:
            raise AdapterError(f"{source}: a plain {adapter.kind} adapter has no keep rates to report")
        scores = {n: {"keep_rate": m.keep_rate, "pruned": False,
                      "weight_norm": weight_norm({"lora_A.weight": m.lora_A, "lora_B.weight": m.lora_B},
                                                 lora_scaling(m.alpha, m.rank, bool(adapter.config.get("use_rslora"))))}
                  for n, m in adapter.modules.items()}
        for n, p in adapter.pruned.items():
            scores[n] = {"keep_rate": p["keep_rate"], "weight_norm": p["weight_norm"], "pruned": True}
        return scores
    stats_file = source / "gate_stats.jsonl"
    if not stats_file.is_file():
        raise AdapterError(f"{source}: neither an adapter directory ({ADAPTER_CONFIG}) nor a TS run folder "
                           "(gate_stats.jsonl)")
    last = _last_gate_stats(stats_file)
    modules, meta = read_checkpoint(find_checkpoint(source))
    cfg = build_config(meta["config"], str(source))
    return {n: {"keep_rate": last[n]["keep"], "pruned": False,
                "weight_norm": weight_norm(m, module_scaling(cfg, n, m["lora_A.weight"].shape[0]))}
            for n, m in modules.items() if n in last}


def _last_gate_stats(stats_file: Path) -> dict[str, dict]:
    """{module: {keep, ...}} of the last complete record (a run that is writing, or was killed, may have
    torn the last line)."""
    records = read_log(stats_file).records
    if not records:
        raise CheckpointError(f"{stats_file}: holds no gate statistics yet (one record every log_every steps)")
    modules = records[-1].get("modules")
    if not (isinstance(modules, dict)
            and all(isinstance(m, dict) and is_rate(m.get("keep")) for m in modules.values())):
        raise CheckpointError(f"{stats_file}: the last record's 'modules' must map module paths to "
                              "{keep: rate in [0, 1], ...}")
    return modules


def ranks(values: dict[str, float]) -> dict[str, int]:
    """1 = largest."""
    return {n: i + 1 for i, n in enumerate(sorted(values, key=lambda n: -values[n]))}


def spearman(a: dict[str, int], b: dict[str, int]) -> float:
    n = len(a)
    if n < 2:
        return float("nan")
    d2 = sum((a[k] - b[k]) ** 2 for k in a)
    return 1 - 6 * d2 / (n * (n * n - 1))


def table(scores: dict[str, dict]) -> str:
    by_keep = ranks({n: s["keep_rate"] for n, s in scores.items()})
    by_norm = ranks({n: s["weight_norm"] for n, s in scores.items()})
    lines = [f"{'module':<40} {'keep':>6} {'||sBA||':>9} {'#keep':>6} {'#norm':>6}"]
    for n in sorted(scores, key=by_keep.get):
        s = scores[n]
        mark = "  (pruned)" if s["pruned"] else ""
        lines.append(f"{n:<40} {s['keep_rate']:>6.3f} {s['weight_norm']:>9.4f} {by_keep[n]:>6} {by_norm[n]:>6}{mark}")
    lines.append(f"Spearman correlation of the keep-rate and weight-norm rankings: {spearman(by_keep, by_norm):.3f}")
    return "\n".join(lines)


def heatmap(scores: dict[str, dict], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = {}
    for name, s in scores.items():
        m = _LAYER.search(name)
        if m:
            cells[(int(m.group(1)), m.group(2))] = s["keep_rate"]
    if not cells:
        raise AdapterError(f"no module paths of the form ...layers.<i>.<type> to lay out: {list(scores)[:3]}")
    order = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    types = sorted({t for _, t in cells}, key=lambda t: (order.index(t) if t in order else len(order), t))
    layers = sorted({l for l, _ in cells})
    grid = np.full((len(layers), len(types)), np.nan)
    for (l, t), v in cells.items():
        grid[layers.index(l), types.index(t)] = v
    fig, ax = plt.subplots(figsize=(1.1 * len(types) + 2, 0.25 * len(layers) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="token keep rate")
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=100)
    except (OSError, ValueError) as e:  # a missing folder, no permission, an unknown image format
        raise TspeftError(f"--out {out}: cannot write the heatmap ({e})") from None
    finally:
        plt.close(fig)
    return out
