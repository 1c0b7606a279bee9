"""LC throughput next to the bare forward pass over the same vertices, for the MNIST MLP and the
CIFAR CNN, on CPU and (when there is one) on the GPU. LC should cost about one forward pass.

    python benchmarks/bench_lc.py               # prints a table; --points, --directions, --batch
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import exp_cifar_cnn  # noqa: E402
import exp_mnist_mlp  # noqa: E402


def timed(fn, device, repeats=3):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        common.sync(device)
        t = time.perf_counter()
        fn()
        common.sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=256)
    parser.add_argument("--directions", type=int, default=25)
    parser.add_argument("--batch", type=int, default=64, help="points per LC chunk")
    args = parser.parse_args()
    torch.set_num_threads(1)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    models = {"mnist_mlp": (exp_mnist_mlp.make_model(exp_mnist_mlp.Config()), (1, 28, 28)),
              "cifar_cnn": (exp_cifar_cnn.make_model(exp_cifar_cnn.Config()), (3, 32, 32))}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), {args.points} points, "
          f"P={args.directions} ({2 * args.directions} vertices a point), chunks of {args.batch} points")
    print(f"{'model':<10} {'device':<8} {'LC points/s':>12} {'forward points/s':>17} {'LC / forward time':>18}")
    for name, (model, shape) in models.items():
        for device in devices:
            model = model.to(device)
            x = torch.rand(args.points, *shape, device=device)
            v = common.random_directions(args.directions, x[0].numel()).to(device)
            offsets = 0.005 * torch.cat([v, -v])

            def lc():
                common.local_complexity(model, x, 0.005, v, batch_size=args.batch)

            def forward():  # the same vertices, same chunks, nothing else
                with torch.no_grad(), common.tf32_flags(False):
                    for i in range(0, len(x), args.batch):
                        xb = x[i:i + args.batch]
                        model((xb.reshape(len(xb), 1, -1) + offsets).reshape(-1, *shape))

            t_lc, t_fwd = timed(lc, device), timed(forward, device)
            print(f"{name:<10} {device.type:<8} {args.points / t_lc:>12.0f} {args.points / t_fwd:>17.0f} {t_lc / t_fwd:>18.2f}")


if __name__ == "__main__":
    main()
