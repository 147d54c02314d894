"""The study as a person reads it: headline sentences, tables, figures and the self-contained HTML report.

    study = json.loads(Path("study/study.json").read_text())   # written by python -m vggattn.study
    summary_markdown(study)                                     # the app's Dataset tab
    write_study(study, "study/")                                # study.json, report.html, the figures as PNG

Only words and pictures: every number comes from `vggattn.study`'s computation (study.json).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from ..attention.adapters import TOKEN_MODES

MODES = ("off", "mean", "uniform")  # the interventions, as vggattn.study runs them


def finite(v) -> bool:
    return v is not None and bool(np.isfinite(v))


def fmt(v, spec: str) -> str:
    """A number as `spec` formats it, or "—" where there is none (NaN: the measure does not apply)."""
    return format(v, spec) if finite(v) else "—"


def percent(v) -> str:
    return f"{100 * v:.0f}%" if finite(v) else "—"


NOT_SCORED = ("None run: the model has no class names (a backbone with no classifier), so there is no top-1 to "
              "score an intervention by; give --classes for a model that has a classifier.")


def headline(study: dict) -> list[str]:
    """One sentence per layer and per finding, from the numbers."""
    lines = []
    base = study["interventions"].get("baseline", {}).get("top1")  # none: a model with no classifier
    for name, s in study["layers"].items():
        h, w = s["grid"]
        if finite(s["sink_mass"]):
            text = (f"{name} ({h}x{w}): the most attended cell takes {100 * s['sink_mass']:.0f}% of all attention "
                    f"on average (sink-dominated in {100 * s['sink_dominated_share']:.0f}% of images, "
                    f"{100 * s['sink_border_share']:.0f}% of sinks on the border);")
        else:
            text = (f"{name} ({h}x{w}): its rows are no distributions over its grid (a share falls off it, on "
                    "prefix tokens or padding, or no softmax makes them), so it has no sink statistics;")
        if finite(s["cosine_distance"]):
            text += (f" rows differ by cosine distance {s['cosine_distance']:.2f} (input features "
                     f"{fmt(s['cosine_distance_input'], '.2f')}).")
        else:
            text += " no cosine distance between its rows."
        if s.get("prefix"):
            p = s["prefix"]
            lo, hi = p["total_ci95"]
            text += (f" The patches give {100 * p['total']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}] of their attention to"
                     " the prefix tokens (" + ", ".join(f"{n.split('.')[-1]} {100 * v:.0f}%" for n, v in p["share"].items())
                     + ").")
        if s.get("prefix_own"):
            text += " Their own rows read from the patches: " + ", ".join(
                f"{n.split('.')[-1]} {100 * v['on_patches']:.0f}% (spread {v['patch_entropy']:.2f} of uniform)"
                for n, v in s["prefix_own"].items()) + "."
        if s.get("norms"):
            nm = s["norms"]
            text += (f" {100 * nm['images_with_high_norm']:.0f}% of images have a high-norm patch entering it "
                     f"({nm['high_norm_per_image']:.2f} an image; the largest patch {nm['max_over_median']:.1f}x the "
                     "median; prefix tokens " + ", ".join(f"{n.split('.')[-1]} {v:.1f}x" for n, v in
                                                          nm["prefix_over_median"].items()) + ").")
        iv = study["interventions"]
        parts = []
        for mode in MODES:
            r = iv.get(f"{name}:{mode}")
            if r:
                lo, hi = r["top1_delta_ci95"]
                parts.append(f"{mode} {100 * r['top1_delta']:+.2f} pts [{100 * lo:+.2f}, {100 * hi:+.2f}]")
        if parts:
            text += f" Top-1 change (baseline {100 * base:.2f}%): " + ", ".join(parts) + "."
        lines.append(text)
    return lines


def layer_table(study: dict) -> list[list]:
    """Rows for a per-layer table (header first)."""
    header = ["layer", "grid", "γ", "sink mass", "sink-dominated", "sinks on border", "top-1 weight", "cos dist (attn)",
              "cos dist (input)", "cos dist (output)", "JSD", "entropy / ln N", "mean dist px", "contribution"]
    rows = [header]
    for name, s in study["layers"].items():
        sinks = finite(s["sink_mass"])  # the sink shares mean nothing without a sink
        rows.append([name, "{}x{}".format(*s["grid"]), fmt(s["gamma"], "+.4f"), fmt(s["sink_mass"], ".3f"),
                     percent(s["sink_dominated_share"] if sinks else None),
                     percent(s["sink_border_share"] if sinks else None),
                     fmt(s["top1_weight"], ".3f"), fmt(s["cosine_distance"], ".3f"),
                     fmt(s["cosine_distance_input"], ".3f"), fmt(s["cosine_distance_output"], ".3f"),
                     fmt(s["jsd"], ".3f"), fmt(s["entropy_frac"], ".3f"), fmt(s["mean_distance_px"], ".1f"),
                     fmt(s["contribution"], ".4f")])
    return rows


def intervention_table(study: dict) -> list[list]:
    rows = [["intervention", "top-1", "top-5", "Δ top-1 (pts)", "95% CI (pts)"]]
    for key, r in study["interventions"].items():
        if key == "baseline":
            rows.append([key, f"{100 * r['top1']:.2f}%", f"{100 * r['top5']:.2f}%", "", ""])
        else:
            lo, hi = r["top1_delta_ci95"]
            mode = key.split(":")[-1]
            label = f"{key} ({TOKEN_MODES[mode]})" if mode in TOKEN_MODES else key
            rows.append([label, f"{100 * r['top1']:.2f}%", f"{100 * r['top5']:.2f}%", f"{100 * r['top1_delta']:+.2f}",
                         f"[{100 * lo:+.2f}, {100 * hi:+.2f}]"])
    return rows


def sanity_table(study: dict) -> list[list]:
    rows = [["layer", "Spearman vs Q/K re-init", "Spearman vs full re-init", "passes",
             "sink mass (Q/K re-init)", "cos dist (Q/K re-init)"]]
    for name, s in study["sanity"].get("layers", {}).items():
        rows.append([name, fmt(s["spearman_qk_reinit"], ".3f"), fmt(s["spearman_full_reinit"], ".3f"),
                     "yes" if s["passes"] else "NO", fmt(s["qk_reinit"].get("sink_mass"), ".3f"),
                     fmt(s["qk_reinit"].get("cosine_distance"), ".3f")])
    return rows


def faithfulness_tables(study: dict) -> tuple[list[list], list[list]]:
    """(deletion at each k per selection, sink anatomy), one row per layer; empty without the section."""
    f = study.get("faithfulness")
    if not f:
        return [], []
    ks = f["ks"]
    deletion = [["layer", "measure"] + [f"{sel}, k={k}" for sel in f["selections"] for k in ks]]
    for name, layer in f["layers"].items():
        for what, label in (("deletion", "output change"), ("logit", "|top-1 logit change|")):
            deletion.append([name, label] + [f"{point['mean']:.3g} [{point['ci95'][0]:.3g}, {point['ci95'][1]:.3g}]"
                                             for sel in f["selections"] for point in layer[what][sel]])
    sink = [["layer", "value norm at the sink / mean", "sink's share of the attention output", "sink-dominated images",
             "nop sinks", "broadcast sinks"]]
    for name, layer in f["layers"].items():
        s_ = layer["sink"]
        pct = lambda v: "—" if v is None else f"{v:.0%}"  # noqa: E731
        sink.append([name, f"{s_['value_norm_ratio']:.2f} [{s_['value_norm_ratio_ci95'][0]:.2f}, {s_['value_norm_ratio_ci95'][1]:.2f}]",
                     f"{s_['output_share']:.2f} [{s_['output_share_ci95'][0]:.2f}, {s_['output_share_ci95'][1]:.2f}]",
                     s_["sink_dominated_images"], pct(s_["nop_share"]), pct(s_["broadcast_share"])])
    return deletion, sink


def faithfulness_text(study: dict) -> str:
    f = study["faithfulness"]
    d = f["definitions"]
    return (f"On {f['images']} evenly spaced images. Deletion: {d['deletion']}. Selections: {d['selections']}. "
            f"Sinks: {d['sink']}. CI: {d['ci']}.")


def transposed(rows: list[list]) -> list[list]:
    """A table's rows as its columns: a per-layer table with one column per layer reads at any width."""
    return [list(column) for column in zip(*rows)]


def markdown_table(rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(str, rows[0])) + " |", "|" + " --- |" * len(rows[0])]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows[1:]]
    return "\n".join(lines)


def summary_markdown(study: dict) -> str:
    """The study as markdown: what it says, the per-layer, intervention and sanity tables."""
    defs = study["definitions"]
    return "\n\n".join([
        f"**{study['images']} images** of `{study['data']}` at {study['input_size']} px, checkpoint "
        f"`{study['checkpoint']}` (`python -m vggattn.study`).",
        "\n".join(f"- {line}" for line in headline(study)),
        "#### Per layer (mean over images)", markdown_table(transposed(layer_table(study))),
        f"Sink-dominated: {defs['sink_dominated']}. Cosine distances are GCNet's measure between positions "
        "(0: every position the same).",
        "#### Interventions", markdown_table(intervention_table(study)) if study["interventions"] else NOT_SCORED,
        f"off: the block returns x; mean: every row replaced by the image's mean row (GCNet's query-independent "
        f"block); uniform: every row 1/N. CI: {defs['ci']}.",
        f"#### Sanity check ({study['sanity']['images']} images)", markdown_table(sanity_table(study)),
        f"Passes: {defs['sanity_pass']}.",
        *(["#### Faithfulness: query-conditioned deletion", markdown_table(faithfulness_tables(study)[0]),
           "#### Faithfulness: the sink's anatomy", markdown_table(faithfulness_tables(study)[1]),
           faithfulness_text(study)] if study.get("faithfulness") else []),
    ])


def missing_study_markdown(checkpoint: str | Path | None) -> str:
    name = Path(checkpoint).name if checkpoint else "this checkpoint"
    return (f"No dataset study ships with `{name}`. Make one (it writes `<checkpoint stem>.study.json` beside "
            "the checkpoint, which the app shows here on its next start):\n\n"
            f"```bash\npython -m vggattn.study --checkpoint {checkpoint or 'PATH'} --data <ImageFolder split> "
            "--out study/ --ship\n```")


def figures(study: dict) -> dict[str, bytes]:
    """PNG bytes of the study's figures, by file name."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    del plt  # only Figure is used (no global backend state)
    out = {}
    names = list(study["layers"])

    def png(fig: Figure) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return buf.getvalue()

    fig = Figure(figsize=(4 * len(names), 3.6))
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        heat = np.array(study["layers"][name]["sink_heatmap"], dtype=float) / max(study["images"], 1)
        im = ax.imshow(heat, cmap="magma")
        ax.set_title(f"{name}: where the sink is\n(share of images)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    out["sink_heatmaps.png"] = png(fig)

    shown = ("sink_mass", "top1_weight", "cosine_distance", "jsd", "entropy_frac", "mean_distance_px", "contribution")
    fig = Figure(figsize=(14, 6.5))
    for ax, stat in zip(fig.subplots(2, 4).flat, shown):
        for name in names:
            d = study["layers"][name]["distribution"].get(stat)
            if d:
                counts, edges = np.array(d["histogram"]["counts"]), np.array(d["histogram"]["edges"])
                ax.stairs(counts / max(counts.sum(), 1), edges, label=name, linewidth=1.5)
        ax.set_title(stat, fontsize=9)
    fig.axes[0].legend(fontsize=8)
    fig.axes[-1].set_visible(False)
    fig.suptitle("Per-image distributions (share of images)", fontsize=10)
    out["distributions.png"] = png(fig)

    keys = [k for k in study["interventions"] if k != "baseline"]
    if keys:  # none: nothing intervened on (a model with no classifier, or --interventions none)
        fig = Figure(figsize=(9, 4))
        ax = fig.subplots()
        deltas = [100 * study["interventions"][k]["top1_delta"] for k in keys]
        err = np.array([[100 * (study["interventions"][k]["top1_delta"] - study["interventions"][k]["top1_delta_ci95"][0]),
                         100 * (study["interventions"][k]["top1_delta_ci95"][1] - study["interventions"][k]["top1_delta"])]
                        for k in keys]).T
        colors = [{"off": "#888888", "mean": "#1f77b4", "uniform": "#ff7f0e"}.get(k.split(":")[1], "#2ca02c")  # a token mode
                  for k in keys]
        ax.bar(range(len(keys)), deltas, yerr=err, color=colors, capsize=3)
        ax.set_xticks(range(len(keys)), keys, rotation=45, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("Δ top-1 vs baseline (points, 95% CI)")
        out["interventions.png"] = png(fig)

    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    width = 0.25
    for j, (stat, label) in enumerate((("cosine_distance_input", "input features"),
                                       ("cosine_distance", "attention maps"),
                                       ("cosine_distance_output", "attention output"))):
        ax.bar(np.arange(len(names)) + (j - 1) * width, [study["layers"][n][stat] for n in names], width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("mean cosine distance between positions")
    ax.legend(fontsize=8)
    ax.set_title("GCNet's measure: do positions differ?", fontsize=9)
    out["cosine_distance.png"] = png(fig)

    f = study.get("faithfulness")
    measured = list(f["layers"]) if f else []  # the blocks whose rows are distributions
    if measured:  # deletion curves over k, one panel per layer, 95% CIs as bands
        fig = Figure(figsize=(4 * len(measured), 3.4))
        for ax, name in zip(fig.subplots(1, len(measured), squeeze=False)[0], measured):
            for sel, curve in f["layers"][name]["deletion"].items():
                ks = [p["k"] for p in curve]
                ax.plot(ks, [p["mean"] for p in curve], marker="o", label=sel)
                ax.fill_between(ks, [p["ci95"][0] for p in curve], [p["ci95"][1] for p in curve], alpha=0.2)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("keys deleted (k)", fontsize=8)
            ax.set_title(f"{name}: output change / what attention adds", fontsize=9)
        fig.axes[0].legend(fontsize=7)
        out["faithfulness.png"] = png(fig)
    return out


def report_html(study: dict, images: dict[str, bytes]) -> str:
    """One self-contained page (figures as data URIs)."""
    def table(rows: list[list]) -> str:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows[1:])
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def img(name: str, alt: str) -> str:
        data = base64.b64encode(images[name]).decode()
        return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"><figcaption>{html.escape(alt)}</figcaption></figure>'

    stats = ("sink_mass", "jsd", "cosine_distance", "entropy_frac")
    class_rows = [["class"] + [f"{n} {s}" for n in study["layers"] for s in stats]]
    for c in next(iter(study["layers"].values()))["per_class"]:
        class_rows.append([c] + [fmt(study["layers"][n]["per_class"][c][s], ".3f") for n in study["layers"] for s in stats])
    defs = study["definitions"]
    sanity = study["sanity"]
    faithfulness_html = ""
    if study.get("faithfulness"):
        deletion, sink = faithfulness_tables(study)
        faithfulness_html = (f"<h2>Faithfulness</h2><p>{html.escape(faithfulness_text(study))}</p>"
                             f"<h3>Query-conditioned deletion</h3>{table(deletion)}"
                             f"{img('faithfulness.png', 'Deletion curves: the change of a query output against k, per selection of keys')}"
                             f"<h3>The sink's anatomy</h3>{table(sink)}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vggattn study: {html.escape(str(study['checkpoint']))}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 7px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }} figcaption {{ font-size: 12px; color: #555; }}
li {{ margin: 0.4em 0; }}
</style></head><body>
<h1>Attention at dataset scale</h1>
<p>Checkpoint <code>{html.escape(str(study['checkpoint']))}</code> on <code>{html.escape(str(study['data']))}</code>:
{study['images']} images at {study['input_size']} px ({study['wall_s']:.0f} s).</p>
<h2>What it says</h2><ul>{''.join(f'<li>{html.escape(t)}</li>' for t in headline(study))}</ul>
<h2>Per layer (mean over images)</h2>{table(layer_table(study))}
<p>Sink-dominated: {html.escape(defs['sink_dominated'])}. Cosine distances are GCNet's measure (0: every position the same).</p>
{img('cosine_distance.png', 'Mean cosine distance between positions: input features, attention maps, attention outputs')}
{img('sink_heatmaps.png', 'Where the sink (the most attended cell) of each image is, over the grid')}
{img('distributions.png', 'Per-image distributions of each statistic')}
<h2>Interventions</h2>
<p>off: the block returns x; mean: every row replaced by the image's query-averaged row (GCNet's query-independent
block, no retraining); uniform: every row 1/N (global average pooling of V). CI: {html.escape(defs['ci'])}.</p>
{table(intervention_table(study)) + img('interventions.png', 'Top-1 change against the baseline, with 95% CI')
 if "interventions.png" in images else f"<p>{html.escape(NOT_SCORED)}</p>"}
<h2>Sanity check (Adebayo et al. 2018)</h2>
<p>Mean Spearman rank correlation of attention rows with the same layer after re-initialising its conv_query/conv_key,
and in a fully re-initialised model, over {sanity['images']} evenly spaced images. A layer passes when
{html.escape(defs['sanity_pass'])}: maps that survive randomisation are not evidence of anything learned.</p>
{table(sanity_table(study))}
{faithfulness_html}
<h2>Per class (mean over the class's images)</h2>{table(class_rows)}
</body></html>
"""


def write_study(study: dict, out: str | Path) -> list[Path]:
    """study.json, report.html and the figures into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = figures(study)
    paths = []
    for name, data in images.items():
        (out / name).write_bytes(data)
        paths.append(out / name)
    (out / "study.json").write_text(json.dumps(study, indent=1))
    (out / "report.html").write_text(report_html(study, images), encoding="utf-8")
    return paths + [out / "study.json", out / "report.html"]




def _ci(v) -> str:
    return "–" if v is None else f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def tokens_report_html(study: dict) -> str:
    """The page of a study of tokens that are no place on the image: a detector's queries (`vggattn.tokens.
    query_study`) or a prompt's words (`vggattn.diffusion.word_study`), a table each."""
    layers = study["layers"]
    if "queries" in study:
        title = (f"Object queries over {study['images']} images: how often each predicts an object (score >= "
                 f"{study['score_threshold']}), and the share of its attention inside its own box per layer (mean, "
                 "bootstrap 95% interval over the images where it predicts one) beside the box's share of the image")
        head = ["query", "objects", "classes"] + [f"in box: {n}" for n in layers] + ["box's share of the image"]
        rows = [[q, f"{e['object_rate']:.0%}", ", ".join(f"{c} {k}" for c, k in sorted(e["classes"].items(),
                                                                                       key=lambda kv: -kv[1]))]
                + [_ci(e["in_box"].get(n)) for n in layers] + [_ci(e["box_area"])] for q, e in study["queries"].items()]
    else:
        title = (f"Words over {study['prompts']} prompts ({study['steps']} denoising steps each): the share of the "
                 "latent places' attention each receives (a place's row sums to 1 over the prompt's tokens; mean over "
                 "places, heads and steps), per layer and over all, bootstrap 95% intervals over the prompts with it")
        head = ["word", "prompts", "all layers"] + list(layers)
        rows = [[w, e["prompts"], _ci(e["share"])] + [_ci(e["per_layer"][n]) for n in layers]
                for w, e in study["words"].items()]
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>vggattn study: tokens</title><style>"
            "body{font-family:sans-serif;margin:24px}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            f"padding:4px 8px;font-size:13px}}</style></head><body><h1>vggattn study</h1><p>{html.escape(title)}</p>"
            f"<table><thead><tr>{header}</tr></thead><tbody>{cells}</tbody></table></body></html>")


def maps_tables(study: dict) -> tuple[list[list], list[list]]:
    """(the scores table, the orderings table) of a map study (`vggattn.study.maps.maps_study`)."""
    def ci(v):
        return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"
    scores = [["map", "positive perturbation AUC (lower better)", "negative perturbation AUC (higher better)",
               "insertion AUC (higher better)", "Spearman with blank-out (higher better)", "seconds to make the map"]]
    for kind, s in study["scores"].items():
        scores.append([kind, ci(s["pos"]), ci(s["neg"]), ci(s["ins"]), ci(s["spearman"]),
                       f"{study['seconds_per_image'][kind]:.3f}"])
    orderings = [["the papers' ordering", "difference here [95% CI]", "here"]]
    for o in study["orderings"]:
        orderings.append([o["claim"], f"{o['difference'][0]:+.3f} [{o['difference'][1]:+.3f}, {o['difference'][2]:+.3f}]",
                          o["verdict"]])
    return scores, orderings


def maps_report_html(study: dict) -> str:
    scores, orderings = maps_tables(study)

    def table(rows):
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows[1:])
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>vggattn study: maps</title><style>"
            "body{font-family:sans-serif;margin:24px}table{border-collapse:collapse;margin:12px 0}td,th{border:1px "
            "solid #ccc;padding:4px 8px;font-size:13px}</style></head><body><h1>Which map to believe</h1>"
            f"<p>{study['images']} images; the top class's probability as patches are deleted or inserted in each "
            f"map's order ({study['steps']} steps), and each map's Spearman correlation with each patch's own "
            "importance; means with bootstrap 95% intervals over the images.</p>"
            f"{table(scores)}{table(orderings)}</body></html>")


def write_tokens_study(study: dict, out: str | Path) -> list[Path]:
    """study.json and report.html of a tokens study (or a map study) into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(study, indent=1))
    (out / "report.html").write_text(maps_report_html(study["maps"]) if "maps" in study else
                                     tokens_report_html(study), encoding="utf-8")
    return [out / "study.json", out / "report.html"]
