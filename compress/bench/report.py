"""Writing a benchmark report: JSON, a markdown table, Pareto plots (quality vs latency and vs size), a rich table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from compress.io import atomic_write_bytes, atomic_write_text

PEAK_MEM_NOTE_CPU = ("Peak memory is the peak resident set size (RSS) of the whole benchmark process while that "
                     "variant's transformer calls ran (VmHWM, reset before each call): it includes Python, torch and "
                     "every loaded model, so compare differences between rows rather than absolute values.")
PEAK_MEM_NOTE_CUDA = "Peak memory is torch.cuda.max_memory_allocated during that variant's transformer calls."
SPEED_NOTE = (
    "Speed: one transformer call at batch {speed_batch} on fixed seeded inputs (a mid-schedule timestep), "
    "{warmup} untimed warm-up calls then {repeats} timed calls (time.perf_counter) per variant, interleaved "
    "round-robin across variants; median and p90 per call. ms/image = median ms/call / batch x NFE "
    "(NFE = steps x 2 with CFG). Speed-up = baseline median / variant median from the same run."
)
SPEED_NOTE_SAMPLING = (
    "Speed: whole sampling runs of {speed_batch} images on fixed seeded noise (a step-cache policy makes calls "
    "cost differently step by step), {warmup} untimed then {repeats} timed runs per variant (time.perf_counter), "
    "interleaved round-robin across variants; median. ms/image = median ms/run / batch (sampler included); "
    "ms/call = ms/run / steps. Speed-up = baseline ms/image / variant ms/image from the same run."
)



def write_json(report: dict, path: Path) -> Path:
    return atomic_write_text(path, json.dumps(report, indent=2, allow_nan=False) + "\n")


def sampling_summary(report: dict) -> str:
    """'50 steps, CFG 1.5' when every variant samples alike, else 'each variant's own steps / guidance'."""
    vs = report["variants"]
    steps = {v["steps"] for v in vs}
    cfgs = {v.get("cfg_scale") for v in vs}
    s = f"{steps.pop()} steps" if len(steps) == 1 else "each variant's own steps"
    s += f", CFG {cfgs.pop()}" if len(cfgs) == 1 else ", each variant's own guidance"
    return s


# ---- formatting -------------------------------------------------------------------------------
def _fmt(v, spec: str = ".3g", suffix: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return "–"
    return f"{v:{spec}}{suffix}"


def _si(v: int | None) -> str:
    if v is None:
        return "–"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return str(v)


COLUMNS = ["Variant", "Recipe", "Steps", "NFE", "FD ↓", "Class acc", "PSNR dB", "SSIM", "ms/call", "p90 ms",
           "ms/image", "img/s", "Speed-up", "× / image", "Peak mem MB", "Params", "Size MB", "MACs/call"]
# what the console shows: fits 120 columns; the full table is in report.md
CONSOLE_COLUMNS = ["Variant", "Runtime", "NFE", "FD ↓", "Class acc", "PSNR dB", "ms/image", "× / image", "Size MB"]


def image_speedup(report: dict, v: dict) -> float | None:
    """Baseline ms per image over the variant's (a few-step student's gain shows here, not per call)."""
    base, mine = report["variants"][0]["speed"]["ms_per_image"], v["speed"]["ms_per_image"]
    return base / mine if base and mine else None


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for v in report["variants"]:
        per_image = image_speedup(report, v)
        q, s = v["quality"], v["speed"]
        rows.append([
            v["name"], v["recipe"] or "–", str(v["steps"]), str(v["nfe"]),
            _fmt(q["fd"], ".4g"), _fmt(q["class_acc"], ".1%"), _fmt(q["psnr_db"], ".2f"), _fmt(q["ssim"], ".4f"),
            _fmt(s["ms_per_call"], ".3g"), _fmt(s["p90_ms_per_call"], ".3g"), _fmt(s["ms_per_image"], ".3g"),
            _fmt(s["images_per_s"], ".4g"), _fmt(s["speedup"], ".2f", "x"), _fmt(per_image, ".3g", "x"),
            _fmt(s["peak_mem_mb"], ".0f"),
            _si(v["params"]), _fmt(v["size_mb"], ".3g"), _si(v["macs_per_call"]),
        ])
    return rows


def write_markdown(report: dict, path: Path) -> Path:
    c, m = report["config"], report["machine"]
    lines = [
        f"# Benchmark: {report['variants'][0]['name']} and {len(report['variants']) - 1} variant(s)",
        "",
        f"- **Config**: {c['samples']} samples, {sampling_summary(report)}, seed {c['seed']}; speed batch "
        f"{c['speed_batch']}, warm-up {c['warmup']}, "
        f"repeats {c['repeats']}; quality {'on' if c['quality'] else 'off'}, speed {'on' if c['speed'] else 'off'}",
        f"- **Machine**: {m['summary']}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(COLUMNS) - 2)) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    lines += [
        "",
        f"The first row is the baseline (the source model): PSNR / SSIM of every variant are measured against "
        f"its samples (same seeds, labels and noise), so the baseline's own are empty. FD / class accuracy are "
        f"computed by the bundled digits evaluator and only for the digits reference model family (lower FD "
        f"is better). Sizes in MB are 2^20 bytes.",
        "",
        report["notes"]["speed"] + " " + report["notes"]["peak_mem"],
        "",
    ]
    note = report["notes"].get("distributed")
    if note:
        lines += [note[:1].upper() + note[1:], ""]
    if report.get("pareto"):
        lines += [f"![Pareto]({report['pareto']})", ""]
    return atomic_write_text(path, "\n".join(lines))


def short_machine(summary: str) -> str:
    """The machine summary without its CPU flag list (the full one is in report.md / report.json)."""
    import re

    return re.sub(r"(\d+ cpu): [^;)]*", r"\1", summary)


def short_runtime(description: str | None) -> str:
    """'PyTorch eager' -> 'torch', 'OpenVINO 2026.4.1 CPU (f32)' -> 'OpenVINO f32', 'ONNX Runtime (X)' -> 'ORT X'."""
    if not description:
        return "–"
    d = description.replace("PyTorch eager", "torch").replace("PyTorch (torch.compile)", "torch.compile")
    if d.startswith("OpenVINO"):
        return "OpenVINO " + d.rsplit("(", 1)[-1].rstrip(")") if "(" in d else "OpenVINO"
    if d.startswith("ONNX Runtime"):
        return "ORT " + d.split("(", 1)[-1].rstrip(")").replace("ExecutionProvider", "") if "(" in d else "ORT"
    return d[:20]


def console_rows(report: dict) -> list[list[str]]:
    rows = []
    for v in report["variants"]:
        q, s = v["quality"], v["speed"]
        rows.append([v["name"], short_runtime(v.get("runtime")), str(v["nfe"]), _fmt(q["fd"], ".4g"),
                     _fmt(q["class_acc"], ".1%"), _fmt(q["psnr_db"], ".2f"), _fmt(s["ms_per_image"], ".3g"),
                     _fmt(image_speedup(report, v), ".3g", "x"), _fmt(v["size_mb"], ".3g")])
    return rows


def print_table(report: dict, console) -> None:
    """The headline columns only (fits 120 columns); every column is in report.md."""
    from rich.table import Table

    c = report["config"]
    t = Table(title=f"{c['samples']} samples, {sampling_summary(report)}", caption=(
        f"{short_machine(report['machine']['summary'])}\n"
        f"speed: median of interleaved timed calls, batch {c['speed_batch']}; "
        f"every column (per-call times, memory, params, MACs) in report.md"))
    for i, col in enumerate(CONSOLE_COLUMNS):
        t.add_column(col, justify="left" if i < 2 else "right", overflow="fold", max_width=28 if i == 0 else None)
    for i, r in enumerate(console_rows(report)):
        t.add_row(*r, style="bold" if i == 0 else None)
    console.print(t)


# ---- Pareto plot ------------------------------------------------------------------------------
def pareto_front(points: list[tuple[float, float]], lower_is_better: bool) -> list[int]:
    """Indices of the non-dominated points (minimise x; minimise or maximise y), sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1] if lower_is_better else -points[i][1]))
    front, best = [], math.inf
    for i in order:
        y = points[i][1] if lower_is_better else -points[i][1]
        if y < best:
            front.append(i)
            best = y
    return front


def plot_pareto(report: dict, path: Path) -> Path | None:
    """Two panels: quality against ms per image and against size on disk (FD if every timed variant has it,
    else PSNR vs the baseline); the Pareto front of each drawn as a staircase. None if not plottable."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    vs = [v for v in report["variants"] if v["speed"]["ms_per_image"] is not None]
    if not vs:
        return None
    base = report["variants"][0]
    if all(v["quality"]["fd"] is not None for v in vs):
        metric, label, lower = "fd", "FD vs real digits (lower is better)", True
    elif any(v["quality"]["psnr_db"] is not None for v in vs):
        metric, label, lower = "psnr_db", f"PSNR vs {base['name']} samples, dB (higher is better)", False
    else:
        return None
    points = []  # (name, is_base, ms/image, size MB, quality)
    for v in vs:
        y = v["quality"][metric]
        if y is None and metric == "psnr_db" and v is base:
            y = math.inf  # the baseline is its own reference: perfect, drawn as a vertical line
        if y is not None:
            points.append((v["name"], v is base, v["speed"]["ms_per_image"], v["size_mb"], y))
    if not points:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), dpi=110)
    c = report["config"]
    panels = ((axes[0], 2, "latency, ms per image (median, lower is better)", "Quality vs latency"),
              (axes[1], 3, "size on disk, MB (lower is better)", "Quality vs size"))
    for ax, col, xlabel, title in panels:
        pts = [(p[col], p[4]) for p in points if p[col] is not None]
        names = [p[0] for p in points if p[col] is not None]
        is_base = [p[1] for p in points if p[col] is not None]
        if not pts:
            ax.set_axis_off()
            continue
        leg = _pareto_panel(ax, pts, names, is_base, lower, xlabel, label if ax is axes[0] else None)
        ax.set_title(title, fontsize=10)
        fig.canvas.draw()
        _place_labels(fig, ax, [(names[i], p) for i, p in enumerate(pts) if math.isfinite(p[1])],
                      avoid=[leg.get_window_extent()] if leg is not None else [])
    fig.suptitle(f"{c['samples']} samples, {sampling_summary(report)}, batch {c['speed_batch']} — "
                 f"{short_machine(report['machine']['summary'])}", fontsize=8)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _pareto_panel(ax, pts, names, is_base, lower: bool, xlabel: str, ylabel: str | None):
    """One panel: points (orange on the front, blue dominated, a star for the baseline) and the front."""
    front = set(pareto_front(pts, lower))
    finite = [(i, p) for i, p in enumerate(pts) if math.isfinite(p[1])]
    xs_all = [p[0] for p in pts]
    if max(xs_all) / max(min(xs_all), 1e-12) > 8:
        ax.set_xscale("log")
    fpts = sorted((pts[i] for i in front if math.isfinite(pts[i][1])), key=lambda p: p[0])
    if len(fpts) >= 2:  # the front as a staircase through the finite non-dominated points
        ax.step([p[0] for p in fpts], [p[1] for p in fpts], where="post", color="tab:orange", lw=1.5,
                alpha=0.8, label="Pareto front", zorder=1)
    for i, (x, y) in finite:
        ax.scatter([x], [y], s=170 if is_base[i] else 55, zorder=3, marker="*" if is_base[i] else "o",
                   color="tab:orange" if i in front else "tab:blue", edgecolor="black", linewidth=0.6)
    for i, (x, y) in enumerate(pts):
        if not math.isfinite(y):
            ax.axvline(x, color="black", ls="--", lw=1, zorder=2, label=f"{names[i]} (baseline, PSNR reference)")
    if any(is_base[i] for i, _ in finite):
        ax.scatter([], [], s=120, marker="*", color="white", edgecolor="black", label="baseline (source)")
    ax.scatter([], [], color="tab:orange", edgecolor="black", label="on the front")
    ax.scatter([], [], color="tab:blue", edgecolor="black", label="dominated")
    if finite:
        ys = [p[1] for _, p in finite]
        lo, hi = min(ys), max(ys)
        pad = (hi - lo) * 0.15 or max(abs(hi) * 0.05, 0.5)
        ax.set_ylim(lo - pad, hi + pad)
    ax.margins(x=0.1)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    return ax.legend(loc="best", fontsize=7, framealpha=0.8)


def _place_labels(fig, ax, labelled: list[tuple[str, tuple[float, float]]], avoid=()) -> None:
    """Greedy label placement: try offsets around each point, keep the first that overlaps nothing placed."""
    from matplotlib.text import Text

    offsets = [(7, 7), (7, -13), (-7, 7), (-7, -13), (10, 18), (-10, 18), (10, -24), (-10, -24), (0, 28), (0, -34)]
    renderer = fig.canvas.get_renderer()
    marker_boxes = []
    for _, (x, y) in labelled:
        px, py = ax.transData.transform((x, y))
        marker_boxes.append((px - 5, py - 5, px + 5, py + 5))
    placed: list[tuple[float, float, float, float]] = [(b.x0, b.y0, b.x1, b.y1) for b in avoid]

    def overlaps(b, others):
        return any(not (b[2] < o[0] or o[2] < b[0] or b[3] < o[1] or o[3] < b[1]) for o in others)

    axbox = ax.get_window_extent(renderer)
    for name, (x, y) in sorted(labelled, key=lambda it: it[1][0]):
        chosen = None
        for dx, dy in offsets:
            ann = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8,
                              ha="left" if dx >= 0 else "right", va="bottom" if dy >= 0 else "top",
                              bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="0.7", alpha=0.85),
                              arrowprops=dict(arrowstyle="-", color="0.5", lw=0.6, shrinkA=0, shrinkB=4),
                              zorder=4)
            ann.update_positions(renderer)
            bb = Text.get_window_extent(ann, renderer)  # the label box only, not the leader line
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            inside = bb.x0 >= axbox.x0 and bb.x1 <= axbox.x1 and bb.y0 >= axbox.y0 and bb.y1 <= axbox.y1
            if inside and not overlaps(box, placed) and not overlaps(box, marker_boxes):
                chosen = box
                break
            if chosen is None and (dx, dy) == offsets[-1]:
                chosen = box  # nothing fits: keep the last try rather than dropping the label
                break
            ann.remove()
        placed.append(chosen)
