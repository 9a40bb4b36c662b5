"""Linear-attention students: quality on the 64-token reference, the pass on every bundled model, and speed
against tokens on a PixArt-XL/2-sized model (PyTorch and ONNX Runtime).

    python -m benchmarks.linear_attention --part train --variant linear-attention          # one student
    python -m benchmarks.linear_attention --part train --variant linear-attention-hybrid   # (run both at once)
    python -m benchmarks.linear_attention --part quality --samples 1000   # both students + composite vs source
    python -m benchmarks.linear_attention --part matrix                   # reference, reference-p1, DiT-B/2
    python -m benchmarks.linear_attention --part speed                    # PixArt-XL/2: 1k / 4k / 16k tokens

``train`` applies a bundled recipe, as shipped, to ``reference-p1`` (the 64-token reference: attention
matters there) under ``runs/linear-attention/<variant>``; a killed run resumes from ``<variant>.work``.
``quality`` trains what is missing, then benches every student against the source on the same seeds
(FD against real digits, class accuracy, PSNR against the source's own samples, sample grids), and the
composite ``linear-attention-hybrid-w8a8`` (the hybrid artifact followed by the recipe's quantize pass).

``matrix`` runs the pass (ReLU + DWC, a short attention-KD stage) on each bundled model, saves, reloads,
compares outputs bit for bit and exports to ONNX with validation. ``speed`` times random-weight PixArt-XL/2
(28 blocks, 1152 wide, 16 heads) with source / hybrid / all-linear attention per call at 1,024 and 4,096
tokens (whole model) and 16,384 tokens (a 4-block slice), ONNX Runtime at 4,096 tokens (a 4-block slice),
and the attention's own time and peak memory (fresh processes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console

import compress
from benchmarks.pruning import recipe_with, trained
from compress.bench import BenchConfig, Variant, run_bench
from compress.bench.report import write_json
from compress.machine import machine_info
from compress.nn.attention import LinearAttention
from compress.models.reference import REFERENCE_CFG, REFERENCE_STEPS
from compress.passes import CalibrationConfig, PassContext
from compress.recipe import load_recipe

VARIANTS = ("linear-attention", "linear-attention-hybrid")
MODEL = "reference-p1"


def student(name: str, a, console: Console) -> Variant:
    model = compress.load_model(MODEL)
    ctx = PassContext.for_model(model, load_recipe(name).defaults.calibration, show_progress=False)
    return trained(name, recipe_with(name, a.recovery_steps), model, ctx, console, runs=a.runs)


def train_part(a, console: Console) -> None:
    v = student(a.variant, a, console)
    for p in v.info["passes"]:
        console.print(f"{p['pass']}: {p['seconds']:.0f} s; " + "; ".join(p["notes"]))


def quality_part(a, console: Console) -> None:
    model = compress.load_model(MODEL)
    students = [student(name, a, console) for name in VARIANTS]
    command = f"python -m benchmarks.linear_attention --part quality --samples {a.samples}"
    cfg = BenchConfig(samples=a.samples, steps=REFERENCE_STEPS, cfg_scale=REFERENCE_CFG, speed_batch=64)
    variants = list(students)
    if a.composite:
        composite = load_recipe("linear-attention-hybrid-w8a8").model_dump(mode="json", by_alias=True)
        quant = {**composite, "name": "linear-attention-hybrid-w8a8", "passes": composite["passes"][2:]}
        ctx = PassContext.for_model(model, load_recipe("linear-attention-hybrid-w8a8").defaults.calibration,
                                    show_progress=False)
        q = compress.apply_recipe(students[1].model, quant, ctx=ctx, show_progress=False)
        variants.append(Variant("linear-attention-hybrid-w8a8", q, recipe="linear-attention-hybrid-w8a8 (its "
                                                                         "quantize pass on the hybrid artifact)"))
    run_bench(Variant("source", model), variants, cfg, a.out / "quality", console=console,
              extra={"command": command, "model": MODEL})


def linearised(model, softmax_blocks: int, **fields):
    """A copy of ``model`` with the bundled recipe's kernel (ReLU + 3x3 DWC) in all but the first
    ``softmax_blocks`` blocks, untrained (speed does not depend on weights; which blocks keep softmax does not
    either). The pass's own function on a copy, without ``apply_recipe``'s NaN checks: at 4k tokens those
    are 12 PixArt-XL/2 calls per variant, longer than the timing itself."""
    import copy

    from compress.passes.linear_attention import LinearAttentionConfig, apply_linear_attention

    first = load_recipe("linear-attention").passes[0].model_dump(mode="json", by_alias=True)
    first.update({"softmax_blocks": softmax_blocks, "selection": "first", "layer_kd": None, **fields})
    ctx = PassContext.for_model(model, CalibrationConfig(samples=1, steps=1), show_progress=False)
    return apply_linear_attention(copy.deepcopy(model), LinearAttentionConfig(**first), ctx).eval()


def matrix_part(a, console: Console) -> None:
    """The pass (with a short attention-KD stage) on each bundled model: reload bit-identically, export, validate."""
    import tempfile

    from exporters.onnx import export_onnx
    from compress.models.adapters import get_adapter

    rows = []
    for name in a.models.split(","):
        model = compress.load_model(name)
        if name.startswith("DiT-"):  # a preset: adaLN-Zero init makes every block (and the output) zero; fill it
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if pname != "pos_embed":
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        ctx = PassContext.for_model(model, load_recipe("linear-attention").defaults.calibration.model_copy(
            update={"samples": 8, "steps": 10}), show_progress=False)
        first = load_recipe("linear-attention-hybrid").passes[0].model_dump(mode="json", by_alias=True)
        first["layer_kd"].update({"steps": a.matrix_steps, "batch_size": 4})
        first["max_rows"] = 16  # the sensitivity's calibration rows (DiT-B/2: 13 forward passes over them)
        out = compress.apply_recipe(model, {"name": "linear-attention-hybrid", "description": "matrix",
                                            "passes": [first]}, ctx=ctx, show_progress=False)
        adapter = get_adapter(out)
        g = torch.Generator().manual_seed(0)
        x = torch.randn((2, *adapter.latent_shape), generator=g)
        cond = adapter.contract().example_cond(2, g)
        t = torch.tensor([100.0, 700.0])
        with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
            compress.save(out, Path(tmp) / "a")
            again = compress.load(Path(tmp) / "a")
            same = torch.equal(adapter.forward(x, t, cond), get_adapter(again).forward(x, t, cond))
            meta = __import__("json").loads((export_onnx(again, Path(tmp) / "onnx") / "export.json").read_text())
        notes = provenance_notes(out)
        rows.append({"model": name, "reloads_bit_identically": same, "onnx_validation": meta["validation"],
                     "notes": notes})
        console.print(f"{name}: reload bit-identical {same}; ONNX validation passed {meta['validation']['passed']} "
                      f"(max rel err {meta['validation'].get('max_rel_err')}); " + "; ".join(notes))
    write_json({"command": f"python -m benchmarks.linear_attention --part matrix --matrix-steps {a.matrix_steps} "
                           f"--models {a.models}",
                "machine": machine_info(), "models": rows}, a.out / "matrix.json")


def provenance_notes(model) -> list[str]:
    from compress.models.provenance import provenance

    return [n for p in provenance(model)["passes"] for n in p["notes"]]


ATTENTION_PROBE = """
import sys, time, torch, torch.nn.functional as F
from compress.machine import peak_rss_mb, reset_peak_rss
from compress.nn.attention import LinearAttention, WindowAttention
torch.set_num_threads(int(sys.argv[3]))
n = int(sys.argv[2])
if sys.argv[1].startswith("linear"):  # as a model forward calls it (its query is scratch), or allocating its output
    kernel = LinearAttention(16, 72, (int(n ** 0.5),) * 2)
    scratch = sys.argv[1] == "linear"
    def call(q, k, v):
        return kernel(q, k, v, query_is_scratch=scratch)
elif sys.argv[1] == "window":
    call = WindowAttention(16, 72, (int(n ** 0.5),) * 2, window=7)
else:  # "softmax": torch's fused (flash) CPU kernel; "softmax-math": q k^T, softmax, p v (as exported to ONNX)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = SDPBackend.MATH if sys.argv[1] == "softmax-math" else SDPBackend.FLASH_ATTENTION
    def call(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
g = torch.Generator().manual_seed(0)
# head views of (1, tokens, 16 * 72) projection outputs, as diffusers' processors pass them
q, k, v = (torch.randn(1, n, 16 * 72, generator=g).view(1, n, 16, 72).transpose(1, 2) for _ in range(3))
with torch.no_grad():
    reset_peak_rss(); base = peak_rss_mb(); t0 = time.perf_counter()
    out = call(q, k, v)
    print((time.perf_counter() - t0) * 1e3, peak_rss_mb() - base)
"""


def attention_peak_mb(kind: str, tokens: int, threads: int) -> tuple[float, float]:
    """(ms, MiB) of one attention computation on (1, 16 heads, tokens, 72) q, k, v (head views of projection
    outputs, as model forwards pass them), in a fresh process. Kinds: 'softmax' (torch's flash SDPA),
    'softmax-math' (the unfused q k^T / softmax / p v an ONNX export computes, with its N x N matrices),
    'linear' (the ReLU + DWC kernel as the adapters call it: its output written over the query, which the model
    never reads again), 'linear-own-output' (the same kernel allocating its output), 'window' (7 x 7 local
    softmax). The peak RSS is reset once q, k, v exist, so the figure is what the attention itself allocates (a
    warmed-up process would reuse freed memory and show 0)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", ATTENTION_PROBE, kind, str(tokens), str(threads)], check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1])


def speed_part(a, console: Console) -> None:
    """Per-call latency against tokens, PyTorch and ONNX Runtime, and the attention's own peak memory."""
    command = (f"python -m benchmarks.linear_attention --part speed --threads {a.threads} --repeats {a.repeats} "
               f"--tokens {','.join(map(str, a.tokens))}" + (" --onnx-whole" if a.onnx_whole else "")
               + ("" if a.onnx else " --no-onnx"))
    results = {"command": command, "machine": machine_info(), "threads": a.threads, "runs": {}}

    def reuse(k: str, n: int, px: int) -> None:  # an earlier run's report for this size
        if (a.out / "speed" / k / "report.json").exists():
            rep = json.loads((a.out / "speed" / k / "report.json").read_text())
            results["runs"][k] = {"tokens": n, "px": px, "model": rep.get("model"), "from_earlier_run": True,
                                  "ms_per_call": {v["name"]: v["speed"]["ms_per_call"] for v in rep["variants"]}}
    cfg = BenchConfig(samples=1, quality=False, grid=False, speed_batch=1, warmup=1, repeats=a.repeats)
    tokens = {512: 1024, 1024: 4096, 2048: 16384}
    for px, n in tokens.items():
        key = f"{px}px-{n}-tokens"
        if n not in a.tokens:
            for k in (key, f"{key}-onnx", f"{key}-onnx-whole"):
                reuse(k, n, px)
            continue
        if a.onnx_whole or not a.onnx:  # ONNX rows this run does not measure: an earlier run's
            reuse(f"{key}-onnx", n, px)
        if not (a.onnx and a.onnx_whole):
            reuse(f"{key}-onnx-whole", n, px)
        if px == 2048 or a.slice_all:
            src, label = slice_of(px), "4-block slice"
        else:
            src, label = compress.load_model(f"PixArt-XL/2-{px}"), "whole model (28 blocks)"
        # hybrid: the bundled recipe's count (2 of 28 blocks keep softmax); on the 4-block slice, 1 (its 1/4)
        keep = 1 if label == "4-block slice" else load_recipe("linear-attention-hybrid").passes[0].softmax_blocks
        hybrid = linearised(src, keep)
        linear = linearised(src, 0)
        variants = [Variant(f"hybrid ({keep} softmax)", hybrid), Variant("all linear", linear)]
        if px == 2048:  # the ceiling of any attention replacement: the same slice with attention costing nothing
            variants.append(Variant("attention-free bound", attention_free(linear)))
        if px == 1024 and a.onnx and not a.onnx_whole:
            onnx_part(a, px, console, results, key)
        report = run_bench(Variant(f"PixArt-XL/2 {px} px source", src), variants, cfg, a.out / "speed" / key,
                           console=console, extra={"command": results["command"], "model": label, "tokens": n})
        results["runs"][key] = {"tokens": n, "px": px, "model": label,
                                "ms_per_call": {v["name"]: v["speed"]["ms_per_call"] for v in report["variants"]},
                                "peak_rss_mb": {v["name"]: v["speed"]["peak_mem_mb"] for v in report["variants"]}}
        del hybrid, variants
        if px == 1024 and a.onnx and a.onnx_whole:
            onnx_part(a, px, console, results, key, whole=(src, linear))
        del src, linear
    for n in tokens.values():
        kinds = ["softmax", "linear", "linear-own-output", "window"] + (["softmax-math"] if n <= 4096 else [])
        # (softmax-math at 16k would hold two 17 GB N x N matrices)
        results.setdefault("attention_alone", {})[n] = {
            k: dict(zip(("ms", "peak_mb"), (round(x, 1) for x in attention_peak_mb(k, n, a.threads))))
            for k in kinds}
    write_json(results, a.out / "speed" / "speed.json")
    plot_speed(results, a.out / "speed" / "ms-per-call-vs-tokens.png")
    console.print(results)


def onnx_part(a, px: int, console: Console, results: dict, key: str, whole: tuple | None = None) -> None:
    """ONNX Runtime at 4,096 tokens: source and all-linear exports, validated, timed with their PyTorch models.

    By default on a 4-block slice (blocks are identical, so the per-call ratio is the whole model's up to the
    embedders); ``whole`` = the caller's (whole source, all-linear) models: all 28 blocks exported (about half a
    CPU-hour per variant here to export and validate, weights in an external-data file), reported under
    ``<key>-onnx-whole``."""
    from exporters.onnx import OnnxRunner, export_onnx

    piece, linear = whole if whole else (slice_of(px), None)
    linear = linearised(piece, 0) if linear is None else linear
    label = "whole model (28 blocks)" if whole else "4-block slice"
    short = "" if whole else " slice"
    work = a.runs / ("speed-onnx-whole" if whole else "speed-onnx")
    cfg = BenchConfig(samples=1, quality=False, grid=False, speed_batch=1, warmup=1, repeats=a.repeats)
    runners = [Variant(f"source{short} (ONNX Runtime)", OnnxRunner(export_onnx(piece, work / "source", force=True),
                                                                 threads=a.threads)),
               Variant(f"all linear{short} (ONNX Runtime)",
                       OnnxRunner(export_onnx(linear, work / "linear", force=True), threads=a.threads))]
    out_key = f"{key}-onnx" + ("-whole" if whole else "")
    report = run_bench(Variant(f"source{short} (PyTorch)", piece), [Variant(f"all linear{short} (PyTorch)", linear),
                                                                   *runners],
                       cfg, a.out / "speed" / out_key, console=console,
                       extra={"command": results["command"], "model": label, "tokens": 4096})
    results["runs"][out_key] = {"tokens": 4096, "model": f"{label}, PyTorch and ONNX Runtime",
                                "ms_per_call": {v["name"]: v["speed"]["ms_per_call"] for v in report["variants"]}}


class _NoMixing(LinearAttention):
    """A bound, not a kernel: returns the values as they are (no token mixing, no arithmetic), so a model with it
    costs what its projections, MLPs and cross-attention cost. Benchmark-only: never saved or exported."""

    def attend(self, q, k, v, scale):
        return v

    attend_into_query = attend


def attention_free(model):
    """A copy of a linearised ``model`` whose self-attentions compute nothing (``_NoMixing``)."""
    import copy

    free = copy.deepcopy(model)
    for m in free.modules():
        if isinstance(m, LinearAttention):
            m.__class__ = _NoMixing
    return free


def slice_of(px: int):
    """PixArt-XL/2 at ``px`` with 4 of its 28 blocks (the same block shapes, random weights): speed per block at
    long sequences in tractable time, built directly (no pass: the toolkit's NaN checks would run the whole
    28-block model at 16k tokens first)."""
    import diffusers

    from compress.models.loading import DIFFUSERS_PRESETS
    from compress.models.provenance import stamp_source

    cls_name, cfg = DIFFUSERS_PRESETS[f"PixArt-XL/2-{px}"]
    torch.manual_seed(0)
    return stamp_source(getattr(diffusers, cls_name)(**{**cfg, "num_layers": 4}).eval(),
                        f"preset:PixArt-XL/2-{px} (4 blocks)", None)


def plot_speed(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    runs = sorted((r for k, r in results["runs"].items() if "-onnx" not in k), key=lambda r: r["tokens"])  # PyTorch rows
    per_block = {}
    for r in runs:
        blocks = 4 if r["model"] == "4-block slice" else 28
        for i, (name, ms) in enumerate(r["ms_per_call"].items()):
            kind = ["source", "hybrid", "all linear"][i] if i < 3 else name  # then the 16k bound's point
            per_block.setdefault(kind, []).append((r["tokens"], ms / blocks))
    for kind, pts in per_block.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("image tokens per call")
    ax.set_ylabel("ms per call per transformer block (PyTorch CPU)")
    ax.set_title("PixArt-XL/2, batch 1: softmax vs linear attention", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["train", "quality", "matrix", "speed"], default="quality")
    p.add_argument("--variant", choices=VARIANTS, default=VARIANTS[0], help="train: which recipe")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--recovery-steps", type=int, default=None, help="override the recipes' distill steps")
    p.add_argument("--no-composite", dest="composite", action="store_false", help="quality: skip the w8a8 composite")
    p.add_argument("--threads", type=int, default=2, help="speed: torch and ONNX Runtime threads")
    p.add_argument("--repeats", type=int, default=2, help="speed: timed calls per variant")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="speed: skip the ONNX Runtime rows")
    p.add_argument("--onnx-whole", action="store_true", help="speed: ONNX Runtime at 4k tokens on all 28 blocks")
    p.add_argument("--slice-all", action="store_true", help="speed: the 4-block slice at every token count")
    p.add_argument("--tokens", default="1024,4096,16384", help="speed: token counts to run (others: earlier reports)")
    p.add_argument("--matrix-steps", type=int, default=10, help="matrix: attention-KD steps per model")
    p.add_argument("--models", default="reference,reference-p1,DiT-B/2", help="matrix: which models")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/linear-attention"))
    p.add_argument("--runs", type=Path, default=Path("runs/linear-attention"), help="trained artifacts, checkpoints")
    a = p.parse_args()
    a.tokens = [int(x) for x in a.tokens.split(",")]
    torch.set_num_threads(a.threads if a.part == "speed" else 1)
    console = Console(width=180)
    {"train": train_part, "quality": quality_part, "matrix": matrix_part, "speed": speed_part}[a.part](a, console)


if __name__ == "__main__":
    main()
