"""Markdown table, plot and environment of a benchmark run.

    python bench/report.py results.json [more.json ...] --out DIR

reads pytest-benchmark JSON written by ``pytest bench --benchmark-only --benchmark-json FILE`` (several files
are merged, e.g. one per test file) and writes DIR/table.md, DIR/plot.png and DIR/env.json (merged into an
env.json already there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

IMPL_ORDER = ("eager", "compile", "formula", "formula-compile", "fastvae-torch", "fastvae-triton", "fastvae")
REFERENCES = ("eager", "compile", "formula", "formula-compile")  # as bench/conftest.py's
OP_ORDER = (
    "sample",
    "kl",
    "sample_kl",
    "nll_var_scalar",
    "nll_var",
    "nll_logvar",
    "elbo",
    "mlp_vae",
    "conv_vae",
)
TRAIN_OPS = ("mlp_vae", "conv_vae")
OP_TITLES = {
    "sample": "sample z = mu + exp(logvar/2) eps",
    "kl": "KL(q || N(0, I)), summed",
    "sample_kl": "sample + KL",
    "nll_var_scalar": "Gaussian NLL, fixed scalar variance",
    "nll_var": "Gaussian NLL, per-element variance",
    "nll_logvar": "Gaussian NLL, per-element log-variance",
    "elbo": "ELBO loss step (sample + KL -> fixed linear 64 -> 784 -> NLL); shape is (B, latent)",
    "mlp_vae": "training step, MLP VAE (784 -> 2 x 512 -> 64)",
    "conv_vae": "training step, conv VAE (3 x 64 x 64, latent 128)",
}


def load(paths: Sequence[str]) -> tuple[list[dict], dict[str, Any]]:
    """Rows (extra_info + median) of all files, and the run metadata of the first."""
    rows: list[dict] = []
    meta: dict[str, Any] = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        bench_meta = data.get("fastvae_bench", {})
        if not meta:
            meta = dict(bench_meta)
        else:
            for k in ("train_max_batch", "train_oom_batch"):
                for model, per_impl in bench_meta.get(k, {}).items():
                    meta.setdefault(k, {}).setdefault(model, {}).update(per_impl)
        for b in data["benchmarks"]:
            info = dict(b.get("extra_info", {}))
            if "op" not in info:
                continue
            # the harness's device time per call (CUDA events); pytest-benchmark's median in older files
            info["median_s"] = info.get("median_s") or b["stats"]["median"]
            info["iqr_s"] = b["stats"].get("iqr")
            rows.append(info)
    fill_speedups(rows)
    return rows, meta


def case_key(r: dict) -> tuple:
    return r.get("op"), r.get("mode"), r.get("dtype"), tuple(r.get("shape") or ())


def speedups(medians: dict[tuple, float], key: tuple, median: float) -> dict[str, Any]:
    """speedup_vs_<reference> (the reference's median over ``median``; None where it did not run), and
    speedup_vs_best / best_ref: over the fastest reference of the case (``medians``: by (case key, impl))."""
    out: dict[str, Any] = {}
    refs = {}
    for ref in REFERENCES:
        m = medians.get((key, ref))
        out[f"speedup_vs_{ref.replace('-', '_')}"] = m / median if m else None
        if m:
            refs[ref] = m
    best = min(refs, key=refs.__getitem__) if refs else None
    out["best_ref"] = best
    out["speedup_vs_best"] = refs[best] / median if best else None
    return out


def fill_speedups(rows: list[dict]) -> None:
    """Recompute the speedups (medians of the same case across files)."""
    medians = {(case_key(r), r["impl"]): r["median_s"] for r in rows}
    for r in rows:
        r.update(speedups(medians, case_key(r), r["median_s"]))


def impl_rank(impl: str) -> int:
    return IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER)


def _order(values: Iterable[str], order: Sequence[str]) -> list[str]:
    return sorted(set(values), key=lambda v: (order.index(v) if v in order else len(order), v))


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def fmt_mb(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def fmt_host(r: dict) -> str:
    """Host time per call, with the share of the call it is and the host syncs of one call."""
    host, syncs = r.get("host_s"), r.get("host_syncs")
    if host is None:
        return "-"
    out = f"{fmt_time(host)} ({100 * host / r['median_s']:.0f}%)"
    return out + (f", {syncs} sync{'s' * (syncs > 1)}" if syncs else "")


def fmt_best(r: dict) -> str:
    best = r.get("best_ref")
    if best is None or r["impl"] in REFERENCES:
        return "-"
    return f"{fmt(r.get('speedup_vs_best'), '.2f', 'x')} ({best})"


def md_row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def shape_str(shape: Sequence[int]) -> str:
    return " x ".join(map(str, shape))


def op_table(rows: list[dict]) -> list[str]:
    out = [
        "| shape | impl | median | host | GB/s | % copy BW | vs eager | vs compile | vs best ref | peak MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(rows, key=lambda r: (r["numel"], tuple(r["shape"]), impl_rank(r["impl"]))):
        frac = r.get("frac_copy_bw")
        out.append(
            md_row(
                shape_str(r["shape"]),
                r["impl"],
                fmt_time(r["median_s"]),
                fmt_host(r),
                fmt(r.get("gbps"), ".1f"),
                fmt(frac * 100 if frac is not None else None, ".0f", "%"),
                fmt(r.get("speedup_vs_eager"), ".2f", "x"),
                fmt(r.get("speedup_vs_compile"), ".2f", "x"),
                fmt_best(r),
                fmt_mb(r.get("peak_mem_bytes")),
            )
        )
    return out


def train_table(rows: list[dict]) -> list[str]:
    out = [
        "| batch | impl | step | host | images/s | vs eager | vs compile | vs best ref | peak MiB |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(rows, key=lambda r: (r["shape"][0], impl_rank(r["impl"]))):
        out.append(
            md_row(
                str(r["shape"][0]),
                r["impl"],
                fmt_time(r["median_s"]),
                fmt_host(r),
                fmt(r.get("items_per_s"), ",.0f"),
                fmt(r.get("speedup_vs_eager"), ".2f", "x"),
                fmt(r.get("speedup_vs_compile"), ".2f", "x"),
                fmt_best(r),
                fmt_mb(r.get("peak_mem_bytes")),
            )
        )
    return out


def slower_than_eager(rows: list[dict], tolerance: float = 0.95) -> list[str]:
    """fastvae cases slower than eager (beyond ``tolerance``) or holding more memory at peak."""
    eager = {case_key(r): r for r in rows if r["impl"] == "eager"}
    out = []
    for r in rows:
        ref = eager.get(case_key(r))
        if not r["impl"].startswith("fastvae") or ref is None:
            continue
        speed = r.get("speedup_vs_eager")
        notes = []
        if speed is not None and speed < tolerance:
            times = f"{fmt_time(r['median_s'])} vs {fmt_time(ref['median_s'])}"
            notes.append(f"{speed:.2f}x the speed of eager ({times})")
        pm, pe = r.get("peak_mem_bytes"), ref.get("peak_mem_bytes")
        if pm is not None and pe is not None and pm > pe * 1.01 + 65536:
            notes.append(f"peak {fmt_mb(pm)} MiB vs eager {fmt_mb(pe)} MiB")
        if notes:
            out.append(
                f"- {r['op']} {r['mode']} {r['dtype']} {shape_str(r['shape'])} {r['impl']}: "
                + "; ".join(notes)
            )
    return out


def slower_than_best(rows: list[dict], tolerance: float = 0.95) -> list[str]:
    """fastvae cases slower (beyond ``tolerance``) than the fastest reference of their case, eager or not."""
    out = []
    for r in rows:
        speed, best = r.get("speedup_vs_best"), r.get("best_ref")
        if r["impl"].startswith("fastvae") and speed is not None and speed < tolerance:
            out.append(f"- {r['op']} {r['mode']} {r['dtype']} {shape_str(r['shape'])} {r['impl']}: {speed:.2f}x "
                       f"the speed of {best} ({fmt_time(r['median_s'])} vs {fmt_time(r['median_s'] * speed)})")
    return out


def markdown(rows: list[dict], meta: dict[str, Any]) -> str:
    env = meta.get("env", {})
    lines = ["# fastvae benchmarks", ""]
    if env:
        lines += [
            f"{env.get('device_name')} ({env.get('device')}), torch {env.get('torch')}, "
            f"triton {env.get('triton')}, {env.get('date')}. Copy bandwidth measured in the same session "
            f"(`dst.copy_(src)`, {fmt_mb(env.get('copy_bytes'))} MiB, 2 x size moved): "
            f"**{fmt(env.get('copy_gbps'), '.1f')} GB/s**.",
            "",
        ]
    lines += [
        "*median*: time per call, the median over rounds of back-to-back calls with no synchronization between "
        "them (on CUDA the device time between events recorded around each round, so launch gaps count). "
        "*host*: the host's own time per call (Python, dispatch, launches) and its share of the call (near "
        "100%: the device waits on the host), with the synchronizing CUDA calls of one call. GB/s counts the "
        "minimal bytes of the op (every tensor read once, every tensor produced written once; see the "
        "`min_bytes` functions in bench/). References: *eager*, the torch function fastvae replaces (or the "
        "formula VAE code writes where torch has none), *compile*, torch.compile of it, and where the torch "
        "function does more than its formula, *formula* / *formula-compile*, the formula written by hand. "
        "*vs eager* / *vs compile*: the reference's median over this row's (> 1 is faster); *vs best ref*: "
        "over the fastest reference of the case. Peak MiB: memory allocated at the peak of one call above the "
        "inputs.",
        "",
    ]
    ops = _order((r["op"] for r in rows), OP_ORDER)
    for op in ops:
        op_rows = [r for r in rows if r["op"] == op]
        for mode in _order((r["mode"] for r in op_rows), ("fwd", "fwdbwd", "train")):
            for dtype in _order((r["dtype"] for r in op_rows), ("float32", "bfloat16", "float16")):
                sel = [r for r in op_rows if r["mode"] == mode and r["dtype"] == dtype]
                if not sel:
                    continue
                lines += [f"## {op} - {mode} - {dtype}", "", f"{OP_TITLES.get(op, op)}", ""]
                lines += train_table(sel) if op in TRAIN_OPS else op_table(sel)
                lines.append("")
    fits = meta.get("train_max_batch") or {}
    if fits:
        lines += [
            "## Largest training batch that fits",
            "",
            "| model | impl | largest batch run | first batch out of memory |",
            "| --- | --- | ---: | ---: |",
        ]
        ooms = meta.get("train_oom_batch") or {}
        for model in _order(set(fits) | set(ooms), OP_ORDER):
            for impl in _order(set(fits.get(model, {})) | set(ooms.get(model, {})), IMPL_ORDER):
                lines.append(
                    f"| {model} | {impl} | {fits.get(model, {}).get(impl, '-')} | "
                    f"{ooms.get(model, {}).get(impl, '-')} |"
                )
        lines.append("")
    slow = slower_than_eager(rows)
    lines += ["## fastvae slower than eager or above its peak memory", ""]
    lines += slow or ["None (within 5% of eager's median time and 1% of its peak memory)."]
    lines.append("")
    slow = slower_than_best(rows)
    lines += ["## fastvae slower than the fastest reference", ""]
    lines += slow or ["None (within 5% of the fastest reference's median time)."]
    lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], meta: dict[str, Any], path: str) -> None:
    """GB/s against elements, one subplot per op/mode/dtype, one line per implementation (and inner shape)."""
    import matplotlib  # here, not at the top: bench/conftest.py imports this module for its speedups

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r.get("gbps")]
    panels = sorted(
        {(r["op"], r["mode"], r["dtype"]) for r in rows},
        key=lambda k: (OP_ORDER.index(k[0]) if k[0] in OP_ORDER else 99, k[1], k[2]),
    )
    if not panels:
        return
    ncols = len({(m, d) for _, m, d in panels})
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    colors = {impl: f"C{i}" for i, impl in enumerate(IMPL_ORDER)}
    styles = ["-", "--", ":", "-."]
    copy_gbps = meta.get("env", {}).get("copy_gbps")
    for ax, (op, mode, dtype) in zip(axes.flat, panels):
        sel = [r for r in rows if (r["op"], r["mode"], r["dtype"]) == (op, mode, dtype)]
        inner = sorted({tuple(r["shape"][1:]) for r in sel})
        lines: dict[tuple, list[dict]] = defaultdict(list)
        for r in sel:
            lines[(r["impl"], tuple(r["shape"][1:]))].append(r)
        for (impl, tail), pts in sorted(lines.items(), key=lambda kv: (impl_rank(kv[0][0]), kv[0][1])):
            pts.sort(key=lambda r: r["numel"])
            label = impl + (f" (x {shape_str(tail)})" if len(inner) > 1 else "")
            ax.plot(
                [r["numel"] for r in pts],
                [r["gbps"] for r in pts],
                marker="o",
                ms=3,
                color=colors.get(impl, "k"),
                ls=styles[inner.index(tail) % len(styles)],
                label=label,
            )
        if copy_gbps:
            ax.axhline(copy_gbps, color="gray", lw=0.8, ls="--", label="copy")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{op} {mode} {dtype}", fontsize=9)
        ax.set_xlabel("elements (B x D or B x F)", fontsize=8)
        ax.set_ylabel("GB/s", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    env = meta.get("env", {})
    fig.suptitle(
        f"achieved GB/s (minimal bytes) - {env.get('device_name', '')}, torch {env.get('torch', '')}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_env(meta: dict[str, Any], path: str) -> None:
    env: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            try:
                env = json.load(f)
            except json.JSONDecodeError:
                env = {}
    env.update(meta.get("env", {}))
    with open(path, "w") as f:
        json.dump(env, f, indent=2)
        f.write("\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON file(s)")
    parser.add_argument("--out", required=True, help="folder for table.md, plot.png, env.json")
    args = parser.parse_args(argv)
    rows, meta = load(args.results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(markdown(rows, meta))
    plot(rows, meta, os.path.join(args.out, "plot.png"))
    write_env(meta, os.path.join(args.out, "env.json"))
    print(f"{len(rows)} results -> {args.out}/table.md, plot.png, env.json")


if __name__ == "__main__":
    main()
