"""Deep Grokking's depth contrast (Fan et al. 2024, Fig. 1 and 4): runs of exp_deep_mlp_rank.py that
differ only in --depth, in one figure. Left: train (dashed) and test (solid) accuracy, one colour
per depth. Then one panel per depth: the feature rank of every hidden layer, coloured by its
place in the network (first layer dark, last yellow), so eleven lines never share a colour.

    python benchmarks/depth_contrast.py results/deep_mlp_d4_mnist results/deep_mlp_d8_mnist \
        results/deep_mlp_d12_mnist --out results/deep_mlp_depth_contrast.png
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402


def main():
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders of exp_deep_mlp_rank.py that differ only in depth")
    parser.add_argument("--out", default="depth_contrast.png", help="the figure (PNG)")
    args = parser.parse_args()
    configs = [json.loads((Path(r) / "config.json").read_text()) for r in args.runs]
    if any("exp_deep_mlp_rank.py" not in (c.get("script") or c["command"]) for c in configs):
        common.die("every folder must be a run of exp_deep_mlp_rank.py")
    shared = set.intersection(*(set(c["config"]) for c in configs)) - {"depth", "out", "data_dir", "resume"}
    settings = [{k: c["config"][k] for k in shared} for c in configs]  # older runs lack later flags
    if any(s != settings[0] for s in settings):
        common.die("the runs differ in more than --depth; compare them with `python tools/runs.py compare`")
    runs = sorted(zip((c["config"]["depth"] for c in configs), args.runs))
    fig = Figure(figsize=(4.2 * (len(runs) + 1), 3.8), layout="constrained")
    axes = fig.subplots(1, len(runs) + 1)
    for i, (depth, run) in enumerate(runs):
        records = common.read_metrics(run)
        steps = [r["step"] or records[1]["step"] / 2 for r in records]  # step 0 drawn at half the first
        for key, ls in (("test_acc", "-"), ("train_acc", "--")):
            axes[0].plot(steps, [r[key] for r in records], ls, color=f"C{i}", label=f"depth {depth} {key[:-4]}")
        ranked = [r for r in records if "rank_1" in r]
        ax = axes[i + 1]
        for layer in range(1, depth):
            colour = matplotlib.colormaps["viridis"]((layer - 1) / max(depth - 2, 1))
            ax.plot([r["step"] or records[1]["step"] / 2 for r in ranked], [r[f"rank_{layer}"] for r in ranked],
                    color=colour, label=f"layer {layer}")
        ax.set(title=f"depth {depth}: feature rank per hidden layer", xscale="log", xlabel="step", ylabel="rank")
        ax.legend(fontsize=7, ncol=2, loc="lower left")
    axes[0].set(title="accuracy (train dashed, test solid)", xscale="log", xlabel="step", ylim=(0, 1.02))
    axes[0].legend(fontsize=8)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
