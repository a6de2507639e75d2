#!/usr/bin/env python3
"""XLA's (JAX on CPU) input and weight gradients of the tool's layer suite: the yardstick issue 10
names for the backward passes. Prints a Markdown table of GFLOP/s (FLOPs = the forward's,
2·N·K·OH·OW·(C/g)·R·S, as `cpuconv compare --pass grad-input|grad-weight` counts them).

    "$HOME/ort-venv/bin/pip" install -q "jax[cpu]"          # the onnxruntime venv serves
    taskset -c 0 "$HOME/ort-venv/bin/python" tools/bench/xla_backward.py 1
    "$HOME/ort-venv/bin/python" tools/bench/xla_backward.py 2

XLA's own thread flags do not hold it to one core (on a 2-core machine it reported more than one
core's FMA peak), so pin the 1-thread run with `taskset`. Each gradient is a jitted `jax.vjp` of
`lax.conv_general_dilated` (NCHW/OIHW, PyTorch padding), timed after a warm-up as the median of >= 10
calls and >= 1 s. Run it next to `cpuconv compare --pass all` in the same session: only figures from
one run on one machine compare.
"""
import os
import statistics
import sys
import time

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
os.environ["XLA_FLAGS"] = f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

# name: (N, C, H=W, K, kernel, stride, padding, dilation, groups), as tools/src/suite.rs.
SUITE = {
    "r50_conv1": (1, 3, 224, 64, 7, 2, 3, 1, 1),
    "r50_3x3": (1, 64, 56, 64, 3, 1, 1, 1, 1),
    "r50_1x1": (1, 256, 56, 64, 1, 1, 0, 1, 1),
    "r50_3x3_s2": (1, 128, 56, 128, 3, 2, 1, 1, 1),
    "r50_deep": (1, 256, 14, 256, 3, 1, 1, 1, 1),
    "r50_last1x1": (1, 512, 7, 2048, 1, 1, 0, 1, 1),
    "mbv2_dw": (1, 144, 56, 144, 3, 1, 1, 1, 144),
    "dilated": (1, 64, 56, 64, 3, 1, 2, 2, 1),
    "batch16": (16, 32, 32, 64, 3, 1, 1, 1, 1),
    "grouped": (1, 128, 28, 128, 3, 1, 1, 1, 32),
}


def median_seconds(f, *args):
    f(*args).block_until_ready()
    times = []
    start = time.perf_counter()
    while len(times) < 10 or (time.perf_counter() - start < 1.0 and len(times) < 200):
        t = time.perf_counter()
        f(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    print(f"XLA (jax {jax.__version__}), {threads} thread(s), GFLOP/s\n")
    print("| layer | grad input | grad weight |")
    print("|---|---:|---:|")
    key = jax.random.PRNGKey(0)
    for name, (n, c, h, k, r, s, p, d, g) in SUITE.items():
        x = jax.random.normal(key, (n, c, h, h), jnp.float32)
        w = jax.random.normal(key, (k, c // g, r, r), jnp.float32)

        def conv(x, w):
            return lax.conv_general_dilated(
                x, w, (s, s), [(p, p), (p, p)], rhs_dilation=(d, d),
                feature_group_count=g, dimension_numbers=("NCHW", "OIHW", "NCHW"))

        y = conv(x, w)
        flops = 2 * n * k * y.shape[2] * y.shape[3] * (c // g) * r * r
        dy = jax.random.normal(key, y.shape, jnp.float32)
        grad_input = jax.jit(lambda w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
        grad_weight = jax.jit(lambda x, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
        ti = median_seconds(grad_input, w, dy)
        tw = median_seconds(grad_weight, x, dy)
        print(f"| {name} | {flops / ti / 1e9:.1f} | {flops / tw / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
