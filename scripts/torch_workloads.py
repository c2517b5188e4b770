#!/usr/bin/env python3
"""The W1-W5 benchmark workloads of WORKLOADS.md in PyTorch, as the baseline
that wgrad-bench's figures are compared with.

Each workload runs in two modes: `eager`, and `compile` (torch.compile, default
mode, of the whole step function). A step is forward + backward (+ W1's SGD
update p -= 0.01*grad under no_grad) + the loss read back once with .item(),
so every timed step is synchronised. Reported per workload and mode: the
first step (pays torch.compile / cuBLAS set-up), then median / min / max over
--steps steps after 3 warm-ups; as in wgrad-bench, the measured steps of the
modes are interleaved. --matmul times fp32 A @ B alone (TF32 off; on CUDA also
a second row with TF32 allowed), each run synchronised, as GFLOP/s.

    python3 scripts/torch_workloads.py [--device cuda|cpu] [--steps 20]
        [--workload W1,W2,..] [--mode eager,compile] [--matmul 1024,2048]
        [--compile-cap 75] [--json FILE]

Inputs: fixed seed, uniform in [-1, 1) (W1's weights scaled by 1/sqrt(fan_in)),
labels uniform in 0..10. The random numbers are torch's, not wgrad's, so
losses agree between the two modes here but not with wgrad-bench.
A compile mode whose first step + warm-ups take over --compile-cap seconds is
recorded as failed (W5's 50-step chain makes Inductor's codegen slow: about
3 min on a 2-core CPU). The JSON is rewritten after every workload, so a run
cut short keeps what it measured. Standard library and torch only.
"""

import argparse
import json
import math
import platform
import signal
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

WARMUPS = 3
NAMES = {"W1": "W1 mlp", "W2": "W2 elementwise", "W3": "W3 matmul", "W4": "W4 norm-softmax", "W5": "W5 tiny-chain"}


def uniform(shape, gen, device, scale=1.0, grad=False):
    t = ((torch.rand(shape, generator=gen) * 2 - 1) * scale).to(device)
    return t.requires_grad_(grad)


def build(wid, device, seed=0):
    """(params, data, loss_fn, sgd) of workload `wid`, as WORKLOADS.md writes it."""
    g = torch.Generator().manual_seed(seed)
    if wid == "W1":
        x = uniform((64, 784), g, device)
        y = torch.randint(0, 10, (64,), generator=g).to(device)
        params = [
            uniform((784, 512), g, device, 1 / math.sqrt(784), True),
            uniform((512,), g, device, 1.0, True),
            uniform((512, 512), g, device, 1 / math.sqrt(512), True),
            uniform((512,), g, device, 1.0, True),
            uniform((512, 10), g, device, 1 / math.sqrt(512), True),
            uniform((10,), g, device, 1.0, True),
        ]

        def loss_fn(w1, b1, w2, b2, w3, b3, x, y):
            h1 = torch.relu(x @ w1 + b1)
            h2 = torch.relu(h1 @ w2 + b2)
            return F.cross_entropy(h2 @ w3 + b3, y)

        return params, [x, y], loss_fn, True
    if wid == "W2":
        params = [uniform((1 << 20,), g, device, 1.0, True) for _ in range(3)]

        def loss_fn(x, a, b):
            return (torch.tanh(x * a + b) * torch.sigmoid(x) + torch.exp(-x * x)).sum()

        return params, [], loss_fn, False
    if wid == "W3":
        params = [uniform((1024, 1024), g, device, 1.0, True) for _ in range(2)]

        def loss_fn(a, b):
            return (a @ b).sum()

        return params, [], loss_fn, False
    if wid == "W4":
        params = [uniform((256, 1024), g, device, 1.0, True)]
        params += [uniform((1024,), g, device, 1.0, True) for _ in range(2)]
        t = uniform((256, 1024), g, device)

        def loss_fn(x, gamma, beta, t):
            y = F.layer_norm(x, (x.shape[-1],), eps=1e-5) * gamma + beta
            return (torch.softmax(y, dim=-1) * t).sum()

        return params, [t], loss_fn, False
    if wid == "W5":
        params = [uniform((16,), g, device, 1.0, True)]

        def loss_fn(x):
            for _ in range(50):
                x = torch.sin(x) * 0.9 + x * 0.1
            return x.sum()

        return params, [], loss_fn, False
    raise ValueError(f"unknown workload {wid}")


class Runner:
    """One mode's side of a workload: its own copy of the tensors."""

    def __init__(self, wid, mode, device):
        self.mode, self.times = mode, []
        params, data, loss_fn, sgd = build(wid, device)

        def step():
            loss = loss_fn(*params, *data)
            loss.backward()
            if sgd:
                with torch.no_grad():
                    for p in params:
                        p -= 0.01 * p.grad
            return loss

        self.params = params
        if mode == "compile":
            torch._dynamo.reset()  # one step function, recompiled per workload
            step = torch.compile(step)
        self.fn = step
        graphs = torch._dynamo.utils.counters["stats"]
        before = graphs["unique_graphs"]
        sync(device)
        self.first_ms = self.step()
        for _ in range(WARMUPS):
            self.step()
        # Graphs Dynamo compiled: 1 = whole step, more = graph breaks.
        self.graphs = graphs["unique_graphs"] - before if mode == "compile" else None

    def step(self):
        t = time.perf_counter()
        for p in self.params:
            p.grad = None
        self.loss = self.fn().item()
        return (time.perf_counter() - t) * 1e3

    def row(self, wid):
        return {
            "workload": wid,
            "name": NAMES[wid],
            "mode": self.mode,
            "first_ms": self.first_ms,
            "median_ms": statistics.median(self.times),
            "min_ms": min(self.times),
            "max_ms": max(self.times),
            "loss": self.loss,
            "compiled_graphs": self.graphs,
            "error": None,
        }


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(wid, modes, device, steps, cap):
    rows, runners = [], []

    def failed(mode, e):  # torch.compile failures: record and go on
        traceback.print_exc(limit=-3)
        rows.append({"workload": wid, "name": NAMES[wid], "mode": mode, "error": f"{type(e).__name__}: {e}"[:2000]})

    def too_long(*_):
        raise TimeoutError(f"first step + warm-ups took over {cap} s (--compile-cap)")

    for mode in modes:
        try:
            signal.signal(signal.SIGALRM, too_long)
            signal.alarm(cap if mode == "compile" else 0)
            runners.append(Runner(wid, mode, device))
        except Exception as e:
            failed(mode, e)
        finally:
            signal.alarm(0)
    for _ in range(steps):
        for r in list(runners):
            try:
                r.times.append(r.step())
            except Exception as e:
                failed(r.mode, e)
                runners.remove(r)
    return [r.row(wid) for r in runners] + rows


def matmul(n, device, runs, tf32):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    g = torch.Generator().manual_seed(1)
    a, b = uniform((n, n), g, device), uniform((n, n), g, device)
    for _ in range(2):
        a @ b
    sync(device)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        c = a @ b
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
        del c
    torch.backends.cuda.matmul.allow_tf32 = False
    ms = statistics.median(times)
    return {"n": n, "tf32": tf32, "median_ms": ms, "min_ms": min(times), "gflops": 2 * n**3 / (ms * 1e-3) / 1e9}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workload", default="W1,W2,W3,W4,W5")
    ap.add_argument("--mode", default="eager,compile")
    ap.add_argument("--matmul", default="", help="sizes, e.g. 1024,2048,4096")
    ap.add_argument("--compile-cap", type=int, default=75, help="seconds for a compile mode's first steps")
    ap.add_argument("--json")
    o = ap.parse_args()
    wids = [w.strip().upper() for w in o.workload.split(",") if w.strip()]
    modes = [m.strip() for m in o.mode.split(",") if m.strip()]
    sizes = [int(s) for s in o.matmul.split(",") if s.strip()]

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 matmuls, as wgrad computes them
    torch.backends.cudnn.allow_tf32 = False
    if o.device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        torch.zeros(1, device=o.device).item()  # CUDA context, outside every timing
    else:
        name = platform.processor() or platform.machine()
    out = {
        "device": f"{name} ({o.device})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "steps": o.steps,
        "results": [],
        "matmul": [],
    }
    print(f"device: {out['device']}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"steps: {o.steps} after {WARMUPS} warm-ups", flush=True)

    def save():
        if o.json:
            with open(o.json, "w") as f:
                json.dump(out, f, indent=2)

    start = time.perf_counter()
    # Matmul first: short, and kept if the compile runs are cut short.
    for n in sizes:
        for tf32 in [False, True] if o.device.startswith("cuda") else [False]:
            r = matmul(n, o.device, o.steps, tf32)
            out["matmul"].append(r)
            print(f"matmul {n}{' tf32' if tf32 else ''}: {r['median_ms']:.3f} ms, {r['gflops']:.1f} GFLOP/s", flush=True)
        save()
    for wid in wids:
        t = time.perf_counter()
        for r in measure(wid, modes, o.device, o.steps, o.compile_cap):
            out["results"].append(r)
            if r["error"]:
                print(f"{r['name']} {r['mode']}: FAILED {r['error'][:200]}", flush=True)
            else:
                print(f"{r['name']} {r['mode']}: first {r['first_ms']:.1f} ms, median {r['median_ms']:.3f} ms", flush=True)
        print(f"  ({wid} took {time.perf_counter() - t:.1f} s)", flush=True)
        save()
    print(f"total {time.perf_counter() - start:.1f} s\n")

    print("| workload | mode | first ms | median ms | min ms | max ms | loss |\n|---|---|---:|---:|---:|---:|---:|")
    for r in out["results"]:
        if r["error"]:
            print(f"| {r['name']} | {r['mode']} | failed: {r['error'].splitlines()[0][:80]} | | | | |")
        else:
            print(
                f"| {r['name']} | {r['mode']} | {r['first_ms']:.1f} | {r['median_ms']:.3f} | {r['min_ms']:.3f}"
                f" | {r['max_ms']:.3f} | {r['loss']:.6g} |"
            )
    if out["matmul"]:
        print("\n| matmul n×n @ n×n | tf32 | median ms | GFLOP/s |\n|---:|---|---:|---:|")
        for r in out["matmul"]:
            print(f"| {r['n']} | {'yes' if r['tf32'] else 'no'} | {r['median_ms']:.3f} | {r['gflops']:.1f} |")
    return 1 if any(r["error"] for r in out["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
