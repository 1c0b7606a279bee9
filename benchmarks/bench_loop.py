"""Training steps per second: the scripts' loop (data on the device as tensors, batches drawn by
indexing) against the plain torchvision + DataLoader loop of the same model and batch size, and
torch.compile on and off, for the MNIST MLP and the CIFAR CNN; on a GPU also against the floor, the
whole step captured as one CUDA graph ("/floor": the scripts' loop over it; target >= 0.8).

    python benchmarks/bench_loop.py                 # CPU (and GPU when there is one)
    python benchmarks/bench_loop.py --compile       # also time --compile (slow to compile)
    python benchmarks/bench_loop.py --compile --threads --steps 2000     # the GPU alone

The DataLoader loop reads a data set whose __getitem__ is torchvision's MNIST / CIFAR10 one
(a uint8 array in memory -> PIL image -> transform=ToTensor()), shuffled, with 0 and 2 workers.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import exp_cifar_cnn  # noqa: E402
import exp_mnist_mlp  # noqa: E402


def tensor_loop(model, x, y, batch, steps, device, loss_fn):
    """The scripts' loop: batches drawn on the device by a device generator, fused Adam, no sync."""
    opt = common.make_optimizer(torch.optim.Adam, model.parameters(), lr=1e-3)
    gen = torch.Generator(device).manual_seed(0)
    for i in range(steps + 5):
        if i == 5:  # warm-up done
            common.sync(device)
            t = time.perf_counter()
        idx = torch.randint(len(x), (batch,), device=device, generator=gen)
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    common.sync(device)
    return steps / (time.perf_counter() - t)


def captured_loop(model, x, y, batch, steps, device, loss_fn):
    """The floor on a GPU: the whole step (batch draw, forward, backward, Adam) captured once as a
    CUDA graph and replayed, so no Python or launch overhead is left. CUDA only."""
    opt = torch.optim.Adam(model.parameters(), 1e-3, capturable=True)
    static_x, static_y = x[:batch].clone(), y[:batch].clone()

    def step():
        idx = torch.randint(len(x), (batch,), device=device)  # the default CUDA generator is graph-safe
        static_x.copy_(x[idx])
        static_y.copy_(y[idx])
        loss = loss_fn(model(static_x), static_y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(5):  # warm-up on a side stream, as graph capture requires
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    common.sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    common.sync(device)
    return steps / (time.perf_counter() - t)


class TorchvisionStyleImages(torch.utils.data.Dataset):
    """Per item what torchvision.datasets.MNIST/CIFAR10 do: uint8 array -> PIL image -> ToTensor."""

    def __init__(self, n, shape):
        c, h, w = shape
        self.data = np.random.default_rng(0).integers(0, 256, (n, h, w) if c == 1 else (n, h, w, c), dtype=np.uint8)
        self.targets = np.random.default_rng(1).integers(0, 10, n)
        self.transform = torchvision.transforms.ToTensor()

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.data[i])), int(self.targets[i])


def dataloader_loop(model, shape, batch, steps, device, loss_fn, workers):
    data = TorchvisionStyleImages(50_000, shape)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=True)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    done = 0
    for i, (xb, yb) in enumerate(loader):
        if i == 5:
            common.sync(device)
            t = time.perf_counter()
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        loss = loss_fn(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = i - 5
        if done == steps:
            break
    common.sync(device)
    return done / (time.perf_counter() - t)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2],
                        help="CPU thread counts to time (none: the GPU alone)")
    args = parser.parse_args()
    runs = [(torch.device("cpu"), t) for t in args.threads] + ([(torch.device("cuda"), 1)] if torch.cuda.is_available() else [])
    settings = {"mnist_mlp": (exp_mnist_mlp.make_model, exp_mnist_mlp.Config(), (1, 28, 28), 200, exp_mnist_mlp.mse_one_hot),
                "cifar_cnn": (exp_cifar_cnn.make_model, exp_cifar_cnn.Config(), (3, 32, 32), 128, F.cross_entropy)}
    print(f"torch {torch.__version__}, {args.steps} timed steps, steps/s (ratio: tensor loop / best DataLoader)")
    print(f"{'model':<10} {'device':<7} {'threads':>7} {'tensor loop':>12} {'DataLoader w=0':>15} {'DataLoader w=2':>15} "
          f"{'ratio':>6} {'compiled':>9} {'captured':>9} {'/floor':>8}")
    for name, (make, cfg, shape, batch, loss_fn) in settings.items():
        for device, threads in runs:
            torch.set_num_threads(threads)
            x = torch.rand(10_000, *shape, device=device)
            y = torch.randint(0, 10, (10_000,), device=device)
            fast = tensor_loop(make(cfg).to(device), x, y, batch, args.steps, device, loss_fn)
            plain0 = dataloader_loop(make(cfg).to(device), shape, batch, args.steps, device, loss_fn, 0)
            plain2 = dataloader_loop(make(cfg).to(device), shape, batch, args.steps, device, loss_fn, 2)
            compiled = captured = float("nan")
            if args.compile:
                model = make(cfg).to(device)  # as the scripts' --compile: CUDA graphs on a GPU
                compiled = tensor_loop(common.compiled(model, True, device), x, y, batch, args.steps, device, loss_fn)
            if device.type == "cuda":
                captured = captured_loop(make(cfg).to(device), x, y, batch, args.steps, device, loss_fn)
            print(f"{name:<10} {device.type:<7} {threads:>7} {fast:>12.1f} {plain0:>15.1f} {plain2:>15.1f} "
                  f"{fast / max(plain0, plain2):>6.2f} {compiled:>9.1f} {captured:>9.1f} {fast / captured:>8.2f}")


if __name__ == "__main__":
    main()
