"""What you do with finished (or running) run folders: redraw them, compare them, and split a
test-set-only MNIST copy into train and test parts.

    python tools/runs.py redraw RUN [RUN ...]             # metrics.png, metrics.csv, summary.json again
    python tools/runs.py compare RUN RUN ... [--out cmp.png] [--at 1e4 --keys test_acc]
    python tools/runs.py split-mnist SOURCE OUT [--train 5000]

compare puts runs of one setting (seeds: a mean line and a min-max band) or of a sweep (one
colour per setting) in one figure and prints a table of onsets and final values.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
from common import die  # noqa: E402


def plot_runs(groups, path, title):
    """groups: {label: [records of each run]}. A group of several runs (seeds of one setting): the
    mean over the runs that logged each step, a band from their minimum to their maximum. Several
    groups (a sweep): one colour per group (the legend at the bottom); within a panel, one line
    style per metric (its legend below the panel, in grey): for PGD, solid the toolkit's attack,
    dashed the papers', dotted the zero-gradient fraction, and a marker per ε."""
    from matplotlib.lines import Line2D
    runs = [records for members in groups.values() for records in members]
    seeds = max(len(members) for members in groups.values())
    fig, panels, zero_at = common.panel_figure(runs, title + (" (lines: mean over a setting's runs, band: min to max)"
                                                              if seeds > 1 else ""))
    several = len(groups) > 1
    for ax, (panel, ks, ylabel) in panels:
        radii = list(dict.fromkeys(k.rsplit("_", 1)[1] for k in ks if k.startswith("pgd_")))
        styles = {}
        for m, k in enumerate(ks):
            if k.startswith("pgd_"):
                styles[k] = {"ls": "--" if "ce32" in k else "-", "marker": "osD^v"[radii.index(k.rsplit("_", 1)[1]) % 5]}
            elif k == "zero_grad_frac":
                styles[k] = {"ls": ":", "marker": None}
            else:
                styles[k] = {"ls": ("-", "--", ":", "-.")[m % 4], "marker": "."}
        for g, (group, members) in enumerate(groups.items()):
            for k in ks:
                per_run = [dict(zip(*common.curve(records, k, zero_at))) for records in members]
                xs = sorted(set().union(*per_run))
                if not xs:
                    continue
                ys = [[v[x] for v in per_run if x in v] for x in xs]
                style = ({"color": f"C{g % 10}", **styles[k], "ms": 3} if several else
                         {**common._style(k, ks), "marker": styles[k]["marker"] or ".", "ms": 3})
                line, = ax.plot(xs, [np.mean(y) for y in ys], lw=1.2, label=None if several else common._label(k),
                                **style)
                if len(members) > 1:
                    ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], alpha=0.2, color=line.get_color())
        if several:  # the metrics' styles in grey; the settings' colours are in the figure's legend
            for k in ks:
                ax.plot([], [], color="0.35", lw=1.2, ms=4, label=common._label(k), **styles[k])
        common.finish_panel(ax, panel, ylabel)
    footer = ("colours: the settings (legend under the title); line styles and markers: each panel's legend"
              if several else "PGD: a colour per ε, solid the toolkit's attack, dashed the papers'")
    common.save_figure(fig, path, footer + "; step 0 is drawn at half the first logged step (log axis)")
    if several:  # the settings' colours under the title, with room made for them
        height, legend_rows = fig.get_figheight(), math.ceil(len(groups) / 4)
        fig.legend([Line2D([], [], color=f"C{g % 10}", lw=3) for g in range(len(groups))], list(groups),
                   loc="upper center", bbox_to_anchor=(0.5, 1 - 0.45 / height), ncol=min(len(groups), 4), fontsize=9,
                   frameon=False)
        fig.subplots_adjust(top=1 - (1.05 + 0.3 * legend_rows) / height)
        fig.savefig(path, dpi=100)
    return [panel for _, (panel, _, _) in panels]


def run_groups(folders):
    """{label: [folder, ...]}: runs that differ only by seed (or by fields that do not define the
    experiment, common.NOT_THE_EXPERIMENT) in one group, labelled by the config fields that differ
    between the groups (e.g. weight_decay=0.1). Refuses (one line) the same folder twice, and runs
    of different scripts or data sets."""
    seen, infos = set(), {}
    for folder in folders:
        key = Path(folder).resolve()
        if key in seen:
            die(f"{folder} is given twice; name each run folder once")
        seen.add(key)
        try:
            infos[folder] = json.loads((Path(folder) / "config.json").read_text())
        except (OSError, ValueError):
            infos[folder] = {"config": {}}
    scripts = {f: common.script_of(i) for f, i in infos.items()}
    for what, of in (("script", lambda f: scripts[f]), ("data set", lambda f: infos[f]["config"].get("dataset"))):
        kinds = {of(f) for f in folders}
        if len(kinds) > 1:
            die(f"these runs come from different {what}s ({', '.join(sorted(map(str, kinds)))}); compare runs of one "
                f"setting, or sweeps of one script")
    fields = sorted({k for i in infos.values() for k in i["config"]} - set(common.NOT_THE_EXPERIMENT) - {"seed"})
    differ = [k for k in fields if len({json.dumps(i["config"].get(k)) for i in infos.values()}) > 1]
    groups = {}
    for folder in folders:
        config = infos[folder]["config"]
        label = ", ".join(f"{k}={config.get(k)}" for k in differ) or "all runs"
        groups.setdefault(label, []).append(folder)
    return groups


def compare_runs(folders, path, at=(), keys=()):
    """Runs of one setting (seeds) or of a sweep in one figure (see plot_runs, run_groups) and a
    table of their onsets and final values: per quantity, each run's value and, for each group of
    several runs, their mean and range. at and keys add rows: each key's value at the logged step
    nearest each step of at (in log distance). Returns the table as markdown."""
    records = {f: common.read_metrics(f) for f in folders}
    empty = next((f for f in folders if not records[f]), None)
    if empty is not None:
        die(f"no metrics in {empty}/metrics.jsonl to compare")
    groups = run_groups(folders)
    name = ", ".join(Path(f).name for f in folders) if len(folders) <= 3 else f"{len(folders)} runs"
    plot_runs({label: [records[f] for f in members] for label, members in groups.items()}, path, name)
    summaries = {f: common.onset_summary(records[f]) for f in folders}
    for f in folders:
        for step in at:
            near = min(records[f], key=lambda r: abs(math.log((r["step"] or 0.5) / step)))
            summaries[f].update({f"{k} at ~{step:g} (step {near['step']})": near.get(k) for k in keys})
    several = {label: members for label, members in groups.items() if len(members) > 1}
    if len(groups) > 1:
        heads = [f"{label} mean | {label} min - max" for label in several]
    else:
        heads = ["mean | min - max"] * bool(several)
    lines = ["| quantity | " + " | ".join(Path(f).name for f in folders) + "".join(f" | {h}" for h in heads) + " |",
             "|---" * (1 + len(folders) + 2 * len(heads)) + "|"]
    if len(groups) > 1:
        label_of = {f: label for label, members in groups.items() for f in members}
        lines.append("| setting | " + " | ".join(label_of[f] for f in folders) + " | -" * (2 * len(heads)) + " |")
    for key in dict.fromkeys(k for s in summaries.values() for k in s):
        cells = ["-" if summaries[f].get(key) is None else summaries[f][key] if isinstance(summaries[f][key], str)
                 else f"{summaries[f][key]:.4g}" for f in folders]
        for members in several.values():
            known = [summaries[f].get(key) for f in members if isinstance(summaries[f].get(key), (int, float))]
            cells.append(f"{np.mean(known):.4g} | {min(known):.4g} - {max(known):.4g}" if known else "- | -")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def split_mnist(source, out, n_train):
    """A test-set-only MNIST copy (t10k-* in source) split in torchvision's layout under out: the
    first n_train digits as train-*, the rest as t10k-* (the real test set is not sorted by class)."""
    names = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    missing = [n for n in names if common.idx_file(source, n) is None]
    if missing:
        die(f"{source} has no {' or '.join(missing)} (plain or .gz)")
    x, y = (common.read_idx(common.idx_file(source, name)) for name in names)
    if not 0 < n_train < len(x):
        die(f"--train {n_train}: must be between 1 and {len(x) - 1} (the copy holds {len(x)} digits)")
    raw = Path(out) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, part in (("train-images-idx3-ubyte", x[:n_train]), ("train-labels-idx1-ubyte", y[:n_train]),
                       ("t10k-images-idx3-ubyte", x[n_train:]), ("t10k-labels-idx1-ubyte", y[n_train:])):
        header = bytes([0, 0, 8, part.dim()]) + b"".join(n.to_bytes(4, "big") for n in part.shape)
        (raw / name).write_bytes(header + part.numpy().tobytes())
    return raw


def redraw(folders):
    """metrics.png, metrics.csv and the onsets of summary.json again (its time breakdown is kept)."""
    for folder in folders:
        if not (Path(folder) / "metrics.jsonl").is_file():
            die(f"{folder} is not a run folder (no metrics.jsonl)")
    for folder in folders:
        common.plot_run(folder)
        common.write_csv(folder)
        path = Path(folder) / "summary.json"
        common.write_summary(folder, json.loads(path.read_text()).get("time") if path.exists() else None)
        print(f"{folder}: metrics.png, metrics.csv and summary.json written")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python tools/runs.py", allow_abbrev=False, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("redraw", help="redraw each run's plot, csv and summary (also while it runs)")
    p.add_argument("runs", nargs="+", help="run folders")
    p = commands.add_parser("compare", help="several runs in one figure, and a table of onsets with their spread")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default="compare.png", help="the figure (PNG)")
    p.add_argument("--at", type=float, nargs="*", default=[], help="steps at which to tabulate --keys")
    p.add_argument("--keys", nargs="*", default=[], help="metrics to tabulate at --at steps")
    p = commands.add_parser("split-mnist", help="a test-set-only MNIST copy (t10k-* files) as train and test parts")
    p.add_argument("source", help="folder with t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (or .gz)")
    p.add_argument("out", help="root to write <out>/MNIST/raw/ into; pass it as --data-dir")
    p.add_argument("--train", type=common.whole_number, default=5000, help="the first N digits become the train part")
    args = parser.parse_args(argv)
    if args.command == "redraw":
        redraw(args.runs)
    elif args.command == "compare":
        if any(not (math.isfinite(a) and a > 0) for a in args.at):
            die(f"--at {' '.join(map(str, args.at))}: steps must be finite and above 0")
        out = Path(args.out)
        if out.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
            die(f"--out {out}: name a figure file ending in .png, .pdf, .svg or .jpg")
        if not out.parent.is_dir():
            die(f"--out {out}: the folder {out.parent} does not exist; make it first")
        print(compare_runs(args.runs, args.out, args.at, args.keys))
        print(f"figure: {args.out}")
    else:
        print(f"written: {split_mnist(args.source, args.out, args.train)}")


if __name__ == "__main__":
    main()
