#!/usr/bin/env python3
"""PyTorch CPU reference for wgrad-bench: workloads W1-W5 of WORKLOADS.md.

Runs the same five workloads as `wgrad-bench` (src/bin/wgrad-bench/
workloads.rs), with the same shapes and the same step: forward + backward
(+ W1's SGD update p -= 0.01 * grad) + the loss read back once with
`.item()`. Two modes:

  eager     plain PyTorch autograd.
  compiled  `torch.compile` of the whole step function (zero grads,
            forward, backward, update). Should that fail on a workload, the
            script falls back to compiling only the loss function (eager
            backward through the compiled forward) and says so.

Per (workload, mode) it reports the first step (which pays tracing and C++
compilation), then runs 3 warm-up steps, then `--steps` measured steps,
eager and compiled interleaved step by step as wgrad-bench does, and
prints the median / min / max in wgrad-bench's table layout. Expect the
compiled W5 first step to take minutes: inductor fuses the 50-deep chain
(and its backward) into one kernel whose code generation is slow. CPU only,
float32, `torch.set_num_threads(2)`. Inputs come from a fixed seed, uniform
in [-1, 1) (W1's weights scaled by 1/sqrt(fan_in)); the values differ from
wgrad's generator, the shapes do not. This script is not run by the
project's tests.

Install (CPU wheel; torch.compile on CPU also needs g++):

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu

Run:

    /tmp/torchvenv/bin/python benches/torch_reference.py [--steps 20] [--workload W1,W3] [--small] [--json FILE]
"""

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

# Inductor caches compiled kernels on disk across runs; a fresh cache
# directory makes "first ms" always include compilation, as wgrad's does.
# It must be set before torch is imported.
_CACHE_DIR = tempfile.mkdtemp(prefix="torch_reference_inductor_")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _CACHE_DIR
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
# Compile in this process: on a 2-core machine inductor would otherwise
# start a pool of 2 compile workers that compete with the measured steps
# and make "first ms" depend on pool start-up. Overridable from outside.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

THREADS = 2
WARMUPS = 3
LR = 0.01
NAMES = {
    "W1": "W1 mlp",
    "W2": "W2 elementwise",
    "W3": "W3 matmul",
    "W4": "W4 norm-softmax",
    "W5": "W5 tiny-chain",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="PyTorch CPU reference for wgrad-bench (W1-W5).")
    p.add_argument("--steps", type=int, default=20, help="measured steps after 3 warm-ups (default 20)")
    p.add_argument("--workload", default="W1,W2,W3,W4,W5", help="comma-separated subset, e.g. W1,W3")
    p.add_argument("--json", metavar="FILE", help="also write the rows as a JSON list")
    p.add_argument("--small", action="store_true", help="shrunken sizes, as wgrad-bench --small")
    args = p.parse_args(argv)
    args.steps = max(1, args.steps)
    args.workloads = [w.strip().upper() for w in args.workload.split(",") if w.strip()]
    unknown = [w for w in args.workloads if w not in NAMES]
    if unknown:
        p.error(f"unknown workload(s) {unknown} (W1..W5)")
    return args


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------- workloads


def uniform(shape, seed, scale=1.0):
    """Uniform in [-scale, scale) from `seed`, as WORKLOADS.md fills inputs."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float32) * (2 * scale) - scale


def leaf(shape, seed, scale=1.0):
    return uniform(shape, seed, scale).requires_grad_(True)


def build(wid, small):
    """The leaves (parameters, gradients wanted) and data of workload `wid`.

    Sizes and seeds follow workloads.rs, `small` its --small sizes."""
    if wid == "W1":
        batch, inp, hidden = (16, 64, 32) if small else (64, 784, 512)
        labels = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(7))
        data = [uniform((batch, inp), 1), labels]
        leaves = [
            leaf((inp, hidden), 2, inp**-0.5),
            leaf((hidden,), 3),
            leaf((hidden, hidden), 4, hidden**-0.5),
            leaf((hidden,), 5),
            leaf((hidden, 10), 6, hidden**-0.5),
            leaf((10,), 7),
        ]
        return leaves, data
    if wid == "W2":
        n = 1 << 12 if small else 1 << 20
        return [leaf((n,), 1), leaf((n,), 2), leaf((n,), 3)], []
    if wid == "W3":
        n = 64 if small else 1024
        return [leaf((n, n), 1), leaf((n, n), 2)], []
    if wid == "W4":
        rows, cols = (16, 64) if small else (256, 1024)
        return [leaf((rows, cols), 1), leaf((cols,), 2), leaf((cols,), 3)], [uniform((rows, cols), 4)]
    if wid == "W5":
        # wgrad-bench's --small keeps W5 as is: it is tiny already.
        return [leaf((16,), 1)], []
    raise ValueError(wid)


def loss_w1(p, data):
    x, y = data
    h1 = torch.relu(x @ p[0] + p[1])
    h2 = torch.relu(h1 @ p[2] + p[3])
    return F.cross_entropy(h2 @ p[4] + p[5], y)


def loss_w2(p, data):
    x, a, b = p
    return (torch.tanh(x * a + b) * torch.sigmoid(x) + torch.exp(-x * x)).sum()


def loss_w3(p, data):
    return (p[0] @ p[1]).sum()


def loss_w4(p, data):
    x, gamma, beta = p
    y = F.layer_norm(x, (x.shape[-1],), eps=1e-5) * gamma + beta
    return (torch.softmax(y, dim=-1) * data[0]).sum()


def loss_w5(p, data):
    x = p[0]
    for _ in range(50):
        x = torch.sin(x) * 0.9 + x * 0.1
    return x.sum()


LOSSES = {"W1": loss_w1, "W2": loss_w2, "W3": loss_w3, "W4": loss_w4, "W5": loss_w5}
# Only W1 updates its parameters; the others just want the gradients.
HAS_SGD = {"W1"}


def make_step(loss_fn, sgd):
    """One step (zero grads, forward, backward, optional SGD) as a function
    of (leaves, data) returning the loss tensor; the caller reads it back,
    so that `.item()` stays outside anything compiled."""

    def step(leaves, data):
        for p in leaves:
            p.grad = None
        loss = loss_fn(leaves, data)
        loss.backward()
        if sgd:
            with torch.no_grad():
                for p in leaves:
                    p -= LR * p.grad
        return loss.detach()

    return step


# ---------------------------------------------------------------- measuring


class Runner:
    """One mode's side of a workload: its own copy of the tensors (W1's SGD
    changes them) and its own step function."""

    def __init__(self, wid, mode, small):
        self.wid, self.mode, self.small = wid, mode, small
        self.leaves, self.data = build(wid, small)
        self.note = ""
        self.times = []
        self.loss = float("nan")
        step = make_step(LOSSES[wid], wid in HAS_SGD)
        self.fn = torch.compile(step) if mode == "compiled" else step

    def step(self):
        """One step; its wall time in ms, the loss read back included."""
        t = time.perf_counter()
        self.loss = self.fn(self.leaves, self.data).item()
        return (time.perf_counter() - t) * 1e3

    def first_step(self):
        """The first step, which pays compilation, then the warm-ups.

        If compiling the whole step fails, start again on fresh tensors
        with only the loss compiled (backward and update eager)."""
        try:
            self.first_ms = self.step()
        except Exception as e:  # torch.compile raises many kinds (BackendCompilerFailed, Unsupported, ...)
            if self.mode != "compiled":
                raise
            self.note = f"whole-step compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); compiled the loss only"
            print(f"{NAMES[self.wid]}: {self.note}", file=sys.stderr)
            torch._dynamo.reset()
            self.leaves, self.data = build(self.wid, self.small)
            self.mode = "compiled-loss"
            self.fn = make_step(torch.compile(LOSSES[self.wid]), self.wid in HAS_SGD)
            self.first_ms = self.step()
        for _ in range(WARMUPS):
            self.step()

    def row(self):
        t = sorted(self.times)
        return {
            "workload": self.wid,
            "mode": self.mode,
            "first_ms": self.first_ms,
            # wgrad-bench takes the upper median (t[n/2]); so does this.
            "median_ms": t[len(t) // 2],
            "min_ms": t[0],
            "max_ms": t[-1],
            "loss": self.loss,
            "note": self.note,
        }


def graph_stats():
    """Dynamo's graph and graph-break counts so far (the backward() call
    always splits the step: dynamo hands it to AOTAutograd's compiled
    backward rather than tracing through it)."""
    c = torch._dynamo.utils.counters
    return c["stats"]["unique_graphs"], sum(c["graph_break"].values())


def measure(wid, small, steps):
    """Both modes of one workload: first steps and warm-ups mode by mode,
    then the measured steps interleaved (eager, compiled, eager, ...) so
    that a busy machine slows both alike, as wgrad-bench does."""
    torch._dynamo.reset()
    graphs0, breaks0 = graph_stats()
    runners = []
    for mode in ("eager", "compiled"):
        r = Runner(wid, mode, small)
        r.first_step()
        runners.append(r)
    graphs, breaks = graph_stats()
    print(f"{NAMES[wid]}: compiled into {graphs - graphs0} graph(s), {breaks - breaks0} graph break(s)", file=sys.stderr)
    for _ in range(steps):
        for r in runners:
            r.times.append(r.step())
    rows = [r.row() for r in runners]
    for row in rows:
        print(f"{NAMES[wid]} {row['mode']}: median {row['median_ms']:.2f} ms", file=sys.stderr)
    return rows


def warm_up_compiler():
    """Compile a trivial function once, so that torch.compile's one-time
    setup (importing inductor, probing the C++ compiler) is not charged to
    whichever workload happens to run first; like wgrad-bench's device
    creation, it stays outside every row. Returns its time in ms."""
    t = time.perf_counter()
    torch.compile(lambda x: x + 1)(torch.ones(4))
    torch._dynamo.reset()
    return (time.perf_counter() - t) * 1e3


def table(rows):
    lines = [
        "| workload | mode | first ms | median ms | min ms | max ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {NAMES[r['workload']]} | {r['mode']} | {r['first_ms']:.1f} | {r['median_ms']:.2f} "
            f"| {r['min_ms']:.2f} | {r['max_ms']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    torch.set_default_dtype(torch.float32)
    print(f"torch: {torch.__version__}")
    print(f"threads: {torch.get_num_threads()}")
    print(f"cpu: {cpu_model()}")
    print(f"steps: {args.steps} after {WARMUPS} warm-ups{' (small sizes)' if args.small else ''}")
    print(f"torch.compile one-time setup: {warm_up_compiler():.0f} ms (in no row)")
    rows = []
    for wid in args.workloads:
        rows.extend(measure(wid, args.small, args.steps))
    print()
    print(table(rows))
    for r in rows:
        if r["note"]:
            print(f"note: {NAMES[r['workload']]}: {r['note']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
