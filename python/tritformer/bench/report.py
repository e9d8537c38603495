"""What `python -m tritformer bench` shows and leaves in its output folder, from the rows written
so far (a finished run, or a partial one after Ctrl-C or an op's failure):

- `summary_lines`: per op, tritformer's headline ratios against naive and SDPA at the largest
  point both ran (memory everywhere; latency / TFLOP/s only for compiled kernels, never for
  Triton-interpreter rows);
- `skip_lines`: the skipped (op, provider) pairs, one line per reason (`skips.txt`: all);
- `format_table`: the full table (`table.txt`);
- `plot_results`: one PNG per (op, metric, mode, head dim), memory in MiB, a marker and line style
  per provider, a bar chart where every line would be a single point, and a caption saying what
  is held fixed;
- `write_report`: `report.md` and `index.html` showing the summary, the skips and every plot with
  its caption.
"""
from __future__ import annotations

import html
import os
import sys
from typing import Optional

SUBJECT = "tritformer"
# other subjects, for the metrics that are their point
EXTRA_SUBJECTS = {"tritformer_recompute": ("saved_bytes",),
                  "tritformer_paged": ("peak_memory", "latency", "tflops", "gbps")}
BASELINES = ("naive", "sdpa")
HEADLINE_MODES = ("fwd", "fwd_bwd", "decode")
# the columns that make two rows one measurement point (provider and backend aside)
POINT = ("op", "metric", "mode", "x_value", "batch", "heads", "head_dim", "causal", "dtype")
# ops whose sweep is a grid over batch and x: one plot per batch size, B shown in the table
BATCH_GRID_OPS = ("decode",)
# ops without a causal switch
NO_CAUSAL_OPS = ("softmax", "gpt", "ffn", "gated_ffn", "decode")


def interpreted(row: dict) -> bool:
    return "interpreter" in (row.get("backend") or "")


def _mib(value) -> str:
    return f"{value / 2**20:.3g} MiB"


def fmt_value(value, unit) -> str:
    if value is None:
        return "-"
    if unit == "bytes":
        return _mib(value)
    return f"{value:.4g} {unit}"


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
def _point_text(r: dict) -> str:
    bits = [f"{r['x_name']}={r['x_value']}"]
    if r["op"] not in ("softmax", "ffn", "gated_ffn") and r["batch"] is not None:
        bits.append(f"B={r['batch']}")
    if r["heads"] is not None:
        bits.append(f"H={r['heads']}")
    if r["head_dim"] is not None:
        bits.append(("d" if r["op"] in ("ffn", "gated_ffn") else "D") + f"={r['head_dim']}")
    if r["causal"] is not None and r["op"] not in NO_CAUSAL_OPS:
        bits.append("causal" if r["causal"] else "non-causal")
    return " ".join(bits)


def _ratio_text(metric: str, subject: float, base: float) -> str:
    if not subject or not base:
        return "n/a"
    if abs(subject / base - 1) < 0.005:
        return "same"
    if metric in ("latency",):  # lower is better: a speed-up
        s = base / subject
        return f"{s:.3g}x faster" if s >= 1 else f"{1 / s:.3g}x slower"
    if metric in ("tflops", "gbps"):  # higher is better
        s = subject / base
        return f"{s:.3g}x faster" if s >= 1 else f"{1 / s:.3g}x slower"
    s = subject / base  # memory: lower is better
    return f"{1 / s:.3g}x less" if s <= 1 else f"{s:.3g}x more"


def headlines(rows: list[dict]) -> list[dict]:
    """One entry per (op, metric, mode): tritformer's row at the largest point measured with the
    most baselines (naive, sdpa), with those baselines' rows. Memory metrics always; latency and
    TFLOP/s / GB/s only when tritformer's row is not a Triton-interpreter row."""
    index = {}
    for r in rows:
        if r["value"] is not None:
            index[(r["provider"],) + tuple(r[c] for c in POINT)] = r
    best: dict[tuple, tuple] = {}
    order: list[tuple] = []
    for r in rows:
        if r["value"] is None or r["mode"] not in HEADLINE_MODES or not (
                r["provider"] == SUBJECT or r["metric"] in EXTRA_SUBJECTS.get(r["provider"], ())):
            continue
        memory = r["metric"] in ("peak_memory", "saved_bytes")
        speed = r["metric"] in ("latency", "tflops", "gbps") and not interpreted(r)
        if not (memory or speed):
            continue
        point = tuple(r[c] for c in POINT)
        bases = {b: index[(b,) + point] for b in BASELINES if (b,) + point in index}
        if not bases:
            continue
        rank = (len(bases), r["x_value"] or 0, r["causal"] is True, r["head_dim"] or 0,
                (r["batch"] or 0) * (r["heads"] or 0))
        key = (r["op"], r["metric"], r["mode"], r["provider"])
        if key not in best:
            order.append(key)
        if key not in best or rank > best[key][0]:
            best[key] = (rank, r, bases)
    return [dict(op=k[0], metric=k[1], mode=k[2], provider=k[3], row=best[k][1],
                 baselines=best[k][2]) for k in order]


_METRIC_ORDER = {"peak_memory": 0, "saved_bytes": 1, "latency": 2, "tflops": 3, "gbps": 4}


def summary_lines(rows: list[dict]) -> list[str]:
    """The short summary: one line per op and headline metric (ratio = tritformer against the
    baseline at the same point)."""
    hs = headlines(rows)
    # the throughput at a latency line's point goes on that line (the same ratio)
    rates = {(r["provider"], r["metric"]) + tuple(r[c] for c in POINT if c != "metric"): r
             for r in rows if r["metric"] in ("tflops", "gbps") and r["value"] is not None}
    timed = {(h["op"], h["mode"]) for h in hs if h["metric"] == "latency"}
    hs = [h for h in hs if h["metric"] not in ("tflops", "gbps") or (h["op"], h["mode"]) not in timed]
    ops = list(dict.fromkeys(h["op"] for h in hs))
    hs.sort(key=lambda h: (ops.index(h["op"]), _METRIC_ORDER.get(h["metric"], 9),
                           HEADLINE_MODES.index(h["mode"])))
    table = []
    for h in hs:
        r = h["row"]
        vs = []
        for b in BASELINES:
            br = h["baselines"].get(b)
            vs.append("-" if br is None else
                      f"{_ratio_text(h['metric'], r['value'], br['value'])} "
                      f"({fmt_value(br['value'], br['unit'])})")
        who = "" if h["provider"] == SUBJECT else " " + h["provider"].replace(SUBJECT + "_", "")
        value = fmt_value(r["value"], r["unit"])
        if h["metric"] == "latency":
            for m in ("tflops", "gbps"):
                rate = rates.get((r["provider"], m) + tuple(r[c] for c in POINT if c != "metric"))
                if rate is not None:
                    value += f" ({fmt_value(rate['value'], rate['unit'])})"
        table.append((h["op"], f"{h['metric']} {h['mode']}{who}", _point_text(r), value, *vs))
    if not table:
        return ["(no tritformer row with a naive or sdpa row at the same point)"]
    head = ("op", "metric", "at", SUBJECT, *(f"vs {b}" for b in BASELINES))
    widths = [max(len(str(t[i])) for t in table + [head]) for i in range(len(head))]
    line = lambda t: "  ".join(str(c).ljust(w) for c, w in zip(t, widths)).rstrip()
    return [line(head), line(tuple("-" * w for w in widths))] + [line(t) for t in table]


# ---------------------------------------------------------------------------------------------
# Skips
# ---------------------------------------------------------------------------------------------
def _skip_parts(what: str, why: str) -> tuple[str, str, str]:
    """('attention', 'flash_attn', 'runs on CUDA only') from 'attention flash_attn' and
    'flash_attn runs on CUDA only'."""
    parts = what.split()
    provider = parts[-1]
    op = " ".join(parts[:-1]) or "attention"
    reason = why[len(provider) + 1:] if why.startswith(provider + " ") else why
    return op, provider, reason


def skip_lines(skipped: dict) -> list[str]:
    """One line per reason: the providers it skipped and in which ops."""
    groups: dict[str, tuple[dict, dict]] = {}
    for what, why in skipped.items():
        op, provider, reason = _skip_parts(what, why)
        provs, ops = groups.setdefault(reason, ({}, {}))
        provs[provider] = None
        ops[op] = None
    return [f"skipped {', '.join(provs)}: {reason} ({len(ops)} op{'s' * (len(ops) > 1)}: "
            f"{', '.join(ops)})" for reason, (provs, ops) in groups.items()]


def skips_text(skipped: dict) -> str:
    return "".join(f"{what}: {why}\n" for what, why in skipped.items())


# ---------------------------------------------------------------------------------------------
# The full table
# ---------------------------------------------------------------------------------------------
def _key(r: dict) -> tuple:
    return tuple(r[c] for c in POINT)


def format_table(rows: list[dict]) -> str:
    """One line per measurement; peak memory and (for PyTorch / compiled rows) latency also as a
    ratio to naive at the same point. Triton-interpreter latencies are never a speed ratio."""
    naive = {_key(r): r["value"] for r in rows if r["provider"] == "naive"}
    cols = ("op", "provider", "backend", "mode", "D", "causal", "x", "metric", "value",
            "p20..p80", "vs naive")
    out = []
    for r in rows:
        ratio = ""
        comparable = r["metric"] in ("peak_memory", "saved_bytes") or (
            r["metric"] == "latency" and not interpreted(r))
        if comparable and naive.get(_key(r)) and r["value"] is not None:
            ratio = f"{r['value'] / naive[_key(r)]:.3f}x"
        spread = ("-" if r["p20"] is None else
                  f"{fmt_value(r['p20'], r['unit'])}..{fmt_value(r['p80'], r['unit'])}")
        x = f"{r['x_name']}={r['x_value']}"
        if r["op"] in BATCH_GRID_OPS:
            x += f" B={r['batch']}"
        out.append((r["op"], r["provider"], r["backend"] or "", r["mode"],
                    "-" if r["head_dim"] is None else str(r["head_dim"]),
                    "-" if r["causal"] is None else str(r["causal"]),
                    x, r["metric"], fmt_value(r["value"], r["unit"]), spread, ratio))
    widths = [max([len(c)] + [len(t[i]) for t in out]) for i, c in enumerate(cols)]
    right = {4, 8, 9, 10}
    line = lambda t: "  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(t, widths))).rstrip()
    return "\n".join([line(cols), line(tuple("-" * w for w in widths))] + [line(t) for t in out])


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------
# provider: (colour, marker, marker size, filled, line style, line width). Lines that coincide
# (naive and sdpa_math on CPU) stay visible: the one drawn first is wide and pale with large
# hollow markers, the later ones thin with small filled markers of another shape.
STYLES = {
    "naive": ("tab:red", "o", 10, False, "-", 4.0),
    "sdpa": ("tab:blue", "s", 7, False, "--", 2.0),
    "sdpa_math": ("tab:purple", "^", 5, True, ":", 1.5),
    "sdpa_flash": ("tab:cyan", "v", 5, True, "-.", 1.5),
    "sdpa_efficient": ("tab:olive", "<", 5, True, "--", 1.5),
    "sdpa_cudnn": ("tab:gray", ">", 5, True, ":", 1.5),
    "tritformer": ("tab:green", "D", 6, True, "-", 1.8),
    "tritformer_recompute": ("tab:olive", "P", 7, True, "--", 1.5),
    "tritformer_paged": ("tab:olive", "P", 7, True, "--", 1.5),
    "flash_attn": ("tab:orange", "X", 6, True, "-.", 1.5),
    "flash_attn_paged": ("tab:pink", "d", 6, True, ":", 1.5),
    "flex": ("tab:brown", "*", 8, True, ":", 1.5),
}
_DRAW_ORDER = list(STYLES)


def _style(provider: str):
    return STYLES.get(provider, ("black", "x", 6, True, "-", 1.2))


_OP_NOTES = {
    "masked_padding": "padded batch, key-padding mask (~25% padding)",
    "masked_dense": "dense bool document mask",
    "varlen": "packed sequences; x = the longest, the packed total of tokens held fixed, "
              "B = number of sequences",
    "ffn": "Linear -> GELU -> Linear, d = model dim, hidden = 4d",
    "gated_ffn": "SwiGLU, d = model dim",
    "gpt": "the whole model (every layer, lm_head, loss)",
    "softmax": "causal scaled softmax",
    "decode": "one new query per row (Nq = 1) against a KV cache; Hkv = H/4 (GQA); valid keys "
              "per row: the first row cache_len, the others uniform in [cache_len/2, cache_len]; "
              "*_paged: the same keys in a paged cache (block_table)",
}


def _constant(rs, col):
    vals = {r[col] for r in rs}
    return next(iter(vals)) if len(vals) == 1 else None


def caption(rs: list[dict], tag: str = "") -> str:
    """What the plot shows and what is held fixed across its x axis."""
    r0 = rs[0]
    op, x_name = r0["op"], r0["x_name"]
    xs = sorted({r["x_value"] for r in rs})
    fixed = []
    batch_name = {"softmax": "rows", "ffn": "tokens", "gated_ffn": "tokens"}.get(op, "B")
    products = {r["batch"] * r["x_value"] for r in rs if r["batch"] is not None}
    if op in ("ffn", "gated_ffn"):
        pass  # batch is the x (tokens)
    elif _constant(rs, "batch") is not None:
        fixed.append(f"{batch_name}={r0['batch']}")
    elif len(products) == 1 and len(xs) > 1 and op != "varlen":  # varlen: see _OP_NOTES
        fixed.append(f"{batch_name} x {x_name} = {next(iter(products))} held fixed")
    if _constant(rs, "heads") is not None:
        fixed.append(f"H={r0['heads']}")
    if _constant(rs, "head_dim") is not None:
        fixed.append(("d" if op in ("ffn", "gated_ffn") else "D") + f"={r0['head_dim']}")
    causal = {r["causal"] for r in rs}
    if op not in NO_CAUSAL_OPS:
        fixed.append("causal" if causal == {True} else "non-causal" if causal == {False}
                     else "causal and non-causal lines")
    fixed.append(str(r0["dtype"]))
    what = {"peak_memory": "peak memory (bytes the call allocates, MiB)",
            "saved_bytes": "bytes autograd saves for the backward (MiB)",
            "latency": "latency", "max_error": "max error"}.get(r0["metric"], r0["metric"])
    text = f"{op} {r0['mode']}: {what} against {x_name}"
    if len(xs) == 1:
        text = f"{op} {r0['mode']}: {what} at {x_name}={xs[0]}"
    text += "; " + ", ".join(fixed)
    if _OP_NOTES.get(op):
        text += f"; {_OP_NOTES[op]}"
    if tag == "seqlen_sweep":
        text += "; one sequence, one head: the memory sweep"
    if r0["metric"] == "latency" and any(interpreted(r) for r in rs):
        text += ("; tritformer rows are Triton-interpreter times on CPU, not GPU speed; "
                 "PyTorch rows: torch.utils.benchmark, adaptive repetition")
    return text + f". {r0['device']}."


def plot_groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["metric"] == "max_error" or r["value"] is None:
            continue
        memory_sweep = r["metric"] == "peak_memory" and r["batch"] == 1 and r["heads"] == 1
        tag = "seqlen_sweep" if memory_sweep else ""
        if r["op"] in BATCH_GRID_OPS:
            tag = f"b{r['batch']}"
        key = (r["op"], r["metric"], r["mode"], r["head_dim"], tag)
        groups.setdefault(key, []).append(r)
    return dict(sorted(groups.items(), key=str))


def plot_name(key: tuple) -> str:
    op, metric, mode, d, tag = key
    return f"{op}_{metric}_{mode}{'' if d is None else f'_d{d}'}{'_' + tag if tag else ''}.png"


def plot_results(rows: list[dict], out_dir: str, progress=None) -> list[tuple[str, str]]:
    """One PNG per (op, metric, mode, head_dim); returns [(path, caption)]. progress(name) is
    called before each plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return []
    out = []
    for key, rs in plot_groups(rows).items():
        op, metric, mode, d, tag = key
        name = plot_name(key)
        if progress:
            progress(name)
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        lines: dict[tuple, list] = {}
        for r in rs:
            lines.setdefault((r["provider"], r["causal"]), []).append((r["x_value"], r["value"]))
        order = sorted(lines, key=lambda k: (_DRAW_ORDER.index(k[0]) if k[0] in _DRAW_ORDER
                                             else 99, str(k[1])))
        causal_both = len({k[1] for k in lines}) > 1
        bytes_unit = rs[0]["unit"] == "bytes"
        scale = 2**20 if bytes_unit else 1.0
        unit = "MiB" if bytes_unit else rs[0]["unit"]
        label = lambda k: k[0] + ((" causal" if k[1] else " non-causal") if causal_both else "")
        single = all(len(lines[k]) == 1 for k in lines)
        if single:  # one x value: bars, not single-point "lines"
            vals = [lines[k][0][1] / scale for k in order]
            for i, k in enumerate(order):
                colour, marker, _, _, _, _ = _style(k[0])
                ax.bar(i, vals[i], color=colour, alpha=0.45 if k[1] is False else 0.85,
                       hatch="//" if k[1] is False else None, edgecolor="black", linewidth=0.6)
            ax.set_xticks(range(len(order)), [label(k) for k in order], rotation=20, ha="right",
                          fontsize=8)
            positive = [v for v in vals if v > 0]
            if positive and max(positive) / min(positive) > 30:
                ax.set_yscale("log")
        else:
            for k in order:
                pts = sorted(lines[k])
                colour, marker, ms, filled, ls, lw = _style(k[0])
                ax.plot([x for x, _ in pts], [y / scale for _, y in pts], color=colour,
                        marker=marker, markersize=ms, linestyle=ls, linewidth=lw,
                        alpha=(0.55 if lw >= 3 else 0.95) * (0.6 if k[1] is False else 1.0),
                        markerfacecolor=colour if filled else "none", markeredgewidth=1.4,
                        label=label(k))
            ax.set_xscale("log", base=2)
            ax.set_xlabel(rs[0]["x_name"])
            if metric in ("peak_memory", "saved_bytes", "latency"):
                ax.set_yscale("log")
            ax.legend(fontsize=8)
        ax.set_ylabel(f"{metric} ({unit})")
        dim = "" if d is None else (" d=" if op in ("ffn", "gated_ffn") else " D=") + str(d)
        at = f" at {rs[0]['x_name']}={rs[0]['x_value']}" if single else ""
        note = {"seqlen_sweep": " (B=1 H=1)"}.get(tag, f" B={rs[0]['batch']}" if tag else "")
        ax.set_title(f"{op} {mode} {metric}{dim}{at}{note}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append((path, caption(rs, tag)))
    return out


# ---------------------------------------------------------------------------------------------
# report.md and index.html
# ---------------------------------------------------------------------------------------------
def write_report(out_dir: str, title: str, status: list[str], meta: list[str], summary: list[str],
                 skips: list[str], plots: Optional[list[tuple[str, str]]], files: list[str],
                 plots_note: str = "") -> list[str]:
    """report.md and index.html: status (PARTIAL ... when the run stopped early), machine, the
    summary, the skips, every plot with its caption, the files. Written atomically."""
    md = [f"# {title}", ""]
    md += [f"**{s}**" for s in status] + ([""] if status else [])
    md += [f"- {m}" for m in meta] + ["", "## Summary", "", "```text", *summary, "```", ""]
    if skips:
        md += ["## Skipped", "", "```text", *skips, "```", "", "Full list: [skips.txt](skips.txt)",
               ""]
    md += ["## Plots", ""]
    if plots is None:
        md += [plots_note or "(plots not drawn yet)", ""]
    for path, cap in plots or []:
        name = os.path.basename(path)
        md += [f"### {name[:-4]}", "", f"![{name}]({name})", "", cap, ""]
    md += ["## Files", ""] + [f"- [{f}]({f.split(' ')[0]})" for f in files] + [""]
    e = html.escape
    h = ["<!doctype html>", "<html><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
         "<style>body{font-family:sans-serif;max-width:60em;margin:auto}pre{background:#f4f4f4;"
         "padding:.5em;overflow-x:auto}figure{margin:1.5em 0}img{max-width:100%}"
         ".partial{color:#b00}</style>", "</head><body>", f"<h1>{e(title)}</h1>"]
    h += [f"<p class='partial'><b>{e(s)}</b></p>" for s in status]
    h += ["<ul>"] + [f"<li>{e(m)}</li>" for m in meta] + ["</ul>"]
    h += ["<h2>Summary</h2>", "<pre>" + e("\n".join(summary)) + "</pre>"]
    if skips:
        h += ["<h2>Skipped</h2>", "<pre>" + e("\n".join(skips)) + "</pre>",
              "<p>Full list: <a href='skips.txt'>skips.txt</a></p>"]
    h += ["<h2>Plots</h2>"]
    if plots is None:
        h += [f"<p>{e(plots_note or '(plots not drawn yet)')}</p>"]
    for path, cap in plots or []:
        name = os.path.basename(path)
        h += [f"<figure id='{e(name[:-4])}'><img src='{e(name)}' alt='{e(name)}'>"
              f"<figcaption>{e(cap)}</figcaption></figure>"]
    h += ["<h2>Files</h2>", "<ul>"] + [
        f"<li><a href='{e(f.split(' ')[0])}'>{e(f)}</a></li>" for f in files] + ["</ul>",
                                                                                "</body></html>"]
    written = []
    for name, text in (("report.md", "\n".join(md)), ("index.html", "\n".join(h) + "\n")):
        path = os.path.join(out_dir, name)
        _write_atomic(path, text)
        written.append(path)
    return written


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
