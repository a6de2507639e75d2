#!/usr/bin/env python3
"""cpuconv's ConvTranspose2d against onnxruntime's ConvTranspose, interleaved in one run on this machine.

    python3 -m venv "$HOME/ort-venv" && "$HOME/ort-venv/bin/pip" install -q -r ../shared/bench/requirements.txt
    cargo build --release -p cpuconv-tools
    "$HOME/ort-venv/bin/python" tools/bench/vs_onnxruntime_transpose.py --threads 1 [--rounds 3] [--layers a,b] [--shape NAME=SPEC]

Run from the project root. The companion of ../shared/bench/vs_onnxruntime.py (the forward Conv), with
the same discipline, for the transposed convolution. For each layer and each round: onnxruntime times a
one-node ConvTranspose model (weight and bias as initializers; ORT_ENABLE_ALL, intra-op threads =
--threads, inter-op 1, sequential; warm-up, then >= 20 calls and >= 0.5 s, median per call) in this
process, then `target/release/cpuconv compare --pass transpose --plan --algo auto --json --threads T
--shape NAME=SPEC` times cpuconv's planned ConvTranspose2d in a child process. Each side's figure is
the median over the rounds. Both sides see the same machine at nearly the same moment, so the ratio is
what counts; absolute GFLOP/s move with the machine and its neighbours.

FLOPs of a transposed convolution: 2 * N * C_in * H * W * (C_out / groups) * R * S (every input pixel
scattered through the whole kernel), the count `ConvTranspose2d::flops` gives.

Layers: the default list is the tool's transposed suite (`TRANSPOSED_SUITE` in tools/src/suite.rs;
keep the two in step). `--shape NAME=SPEC` adds any layer in the tool's transposed --shape syntax,
N,C_in,H,W:C_out,RxS[,sS][,pP|pT,B,L,R][,opO][,dD][,gG] (opO: output padding, opHxW per axis).

Last line: `vs onnxruntime ConvTranspose: min R (layer), median R, vs min(1.05x ORT, 0.95x peak) R (layer)`
(cpuconv / ORT in GFLOP/s; the last divides cpuconv's GFLOP/s by the lower of 1.05x ORT and 95% of the
FMA peak `cpuconv compare` measured, so >= 1 means "5% ahead of ORT, or at 95% of the machine").
Exit status 0 when every cpuconv run worked; the ratios are for you to read, not a pass/fail.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

# name -> the tool's transposed --shape syntax (N,C_in,H,W:C_out,kernel,...).
SUITE = {
    "gan_up_k4s2": "1,128,16,16:64,4x4,s2,p1",
    "unet_up_k2s2": "1,256,28,28:128,2x2,s2",
    "fcn_up_k3s2": "1,64,56,56:32,3x3,s2,p1,op1",
    "dcgan_b8": "8,256,8,8:128,4x4,s2,p1",
}


def pair(val, what, spec):
    """`3` or `3x2` -> (3, 3) or (3, 2)."""
    parts = val.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        sys.exit(f"{spec!r}: bad {what} {val!r}")
    a = int(parts[0])
    return a, int(parts[-1])


def parse_spec(spec):
    """The tool's transposed --shape syntax -> dict of ints (pads as top, bottom, left, right)."""
    spec = spec.replace(" ", "")
    inp, sep, rest = spec.partition(":")
    dims = inp.split(",")
    if not sep or len(dims) != 4 or not all(d.isdigit() for d in dims):
        sys.exit(f"cannot parse shape {spec!r}: expected N,C,H,W:C_out,RxS[,...]")
    toks = rest.split(",")
    if len(toks) < 2 or not toks[0].isdigit():
        sys.exit(f"cannot parse shape {spec!r}: expected N,C,H,W:C_out,RxS[,...]")
    n, c, h, w = (int(d) for d in dims)
    r, s = pair(toks[1], "kernel", spec)
    d = dict(n=n, c=c, h=h, w=w, k=int(toks[0]), r=r, s=s, sh=1, sw=1, pads=(0, 0, 0, 0),
             oph=0, opw=0, dh=1, dw=1, g=1)
    pads = None
    for tok in toks[2:]:
        if not tok:
            continue
        if tok.isdigit():  # continues pT,B,L,R
            if pads is None or len(pads) >= 4:
                sys.exit(f"{spec!r}: unexpected number {tok!r}")
            pads.append(int(tok))
            continue
        m = re.fullmatch(r"(op|[spdg])(.+)", tok)
        if not m:
            sys.exit(f"{spec!r}: unknown option {tok!r} (use s, p, op, d, g)")
        key, val = m.groups()
        if key == "p":
            a, b = pair(val, "padding", spec)
            pads = [a] if "x" not in val.lower() else [a, a, b, b]
        elif key == "s":
            d["sh"], d["sw"] = pair(val, "stride", spec)
        elif key == "op":
            d["oph"], d["opw"] = pair(val, "output padding", spec)
        elif key == "d":
            d["dh"], d["dw"] = pair(val, "dilation", spec)
        else:
            d["g"] = int(val)
    if pads is not None:
        if len(pads) == 1:
            pads = pads * 4
        if len(pads) != 4:
            sys.exit(f"{spec!r}: padding takes 1 value or 4 (T,B,L,R), got {len(pads)}")
        d["pads"] = tuple(pads)
    return d


def out_hw(d):
    pt, pb, pl, pr = d["pads"]
    oh = (d["h"] - 1) * d["sh"] - pt - pb + d["dh"] * (d["r"] - 1) + d["oph"] + 1
    ow = (d["w"] - 1) * d["sw"] - pl - pr + d["dw"] * (d["s"] - 1) + d["opw"] + 1
    return oh, ow


def flops(d):
    return 2 * d["n"] * d["c"] * d["h"] * d["w"] * (d["k"] // d["g"]) * d["r"] * d["s"]


def ort_session(name, d, threads):
    oh, ow = out_hw(d)
    rng = np.random.default_rng(1234)
    # ONNX ConvTranspose weight: [C_in, C_out / group, R, S], as cpuconv's ConvTranspose2d.
    wt = rng.standard_normal((d["c"], d["k"] // d["g"], d["r"], d["s"]), dtype=np.float32) * 0.1
    b = rng.standard_normal((d["k"],), dtype=np.float32)
    pt, pb, pl, pr = d["pads"]
    node = helper.make_node("ConvTranspose", ["X", "W", "B"], ["Y"], kernel_shape=[d["r"], d["s"]],
                            strides=[d["sh"], d["sw"]], pads=[pt, pl, pb, pr],
                            output_padding=[d["oph"], d["opw"]], dilations=[d["dh"], d["dw"]],
                            group=d["g"])
    graph = helper.make_graph(
        [node], name,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [d["n"], d["c"], d["h"], d["w"]])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [d["n"], d["k"], oh, ow])],
        initializer=[onnx.numpy_helper.from_array(wt, "W"), onnx.numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((d["n"], d["c"], d["h"], d["w"]), dtype=np.float32)
    y = sess.run(None, {"X": x})[0]
    if y.shape != (d["n"], d["k"], oh, ow):
        sys.exit(f"{name}: onnxruntime gave shape {y.shape}, expected {(d['n'], d['k'], oh, ow)}")
    return sess, x


def time_ort(sess, x, warmup=5, min_runs=20, min_time=0.5, max_runs=5000):
    """Median seconds per call: warm-up, then enough calls for >= min_time (>= min_runs)."""
    feed = {"X": x}
    for _ in range(warmup):
        sess.run(None, feed)
    t0 = time.perf_counter()
    sess.run(None, feed)
    runs = max(min_runs, min(max_runs, int(min_time / max(time.perf_counter() - t0, 1e-7))))
    ts = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        ts[i] = time.perf_counter() - t0
    return float(np.median(ts))


def time_cpuconv(binary, name, spec, threads):
    """(seconds per call, Auto's pick, the FMA peak GFLOP/s cpuconv measured, cpuconv's FLOPs)."""
    cmd = [binary, "compare", "--pass", "transpose", "--plan", "--algo", "auto", "--json",
           "--threads", str(threads), "--shape", f"{name}={spec}"]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-400:]}")
    for line in p.stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        if row.get("algorithm") == "auto" and row.get("pass") == "transpose":
            if not row.get("supported", True):
                raise RuntimeError(f"cpuconv does not run it: {row.get('unsupported')}")
            peak = row["gflops"] / row["peak_fraction"] if row.get("peak_fraction") else float("nan")
            return row["median_ms"] / 1e3, row.get("picked") or "", peak, row.get("flops")
    raise RuntimeError(f"no transpose auto row in: {p.stdout[-400:]!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", default=",".join(SUITE), help="comma list from the transposed suite")
    ap.add_argument("--shape", action="append", default=[],
                    help="NAME=SPEC, the tool's transposed --shape syntax")
    ap.add_argument("--binary", default="target/release/cpuconv")
    a = ap.parse_args()
    if not os.access(a.binary, os.X_OK):
        sys.exit(f"{a.binary} not found: run `cargo build --release -p cpuconv-tools` in the project root first")
    layers = []
    for n in (n for n in a.layers.split(",") if n):
        if n not in SUITE:
            sys.exit(f"unknown layer {n!r}; the transposed suite has {', '.join(SUITE)}")
        layers.append((n, SUITE[n]))
    for s in a.shape:
        name, _, spec = s.partition("=")
        layers.append((name, spec) if spec else (f"shape{len(layers)}", name))
    rows, failed = [], False
    for name, spec in layers:
        d = parse_spec(spec)
        fl = flops(d)
        sess, x = ort_session(name, d, a.threads)
        o, c, pk, picked = [], [], [], ""
        for rnd in range(a.rounds):
            # Interleaved: ORT, then cpuconv, every round, so both see the same machine.
            o.append(fl / time_ort(sess, x) / 1e9)
            try:
                secs, picked, peak, their_flops = time_cpuconv(a.binary, name, spec, a.threads)
            except RuntimeError as e:
                print(f"{name}: {e}", file=sys.stderr)
                failed = True
                break
            if their_flops is not None and their_flops != fl:
                print(f"{name}: cpuconv counts {their_flops} FLOPs, this script {fl}", file=sys.stderr)
                failed = True
            c.append(fl / secs / 1e9)
            pk.append(peak)
            print(f"  [{name} {rnd + 1}/{a.rounds}] ORT {o[-1]:.1f}  cpuconv {c[-1]:.1f} GFLOP/s ({picked})",
                  file=sys.stderr, flush=True)
        if c:
            rows.append((name, spec, float(np.median(o)), float(np.median(c)), picked,
                         float(np.nanmax(pk)) if pk else float("nan")))
    print(f"## cpuconv ConvTranspose2d vs onnxruntime {ort.__version__} ConvTranspose, {a.threads} thread(s), "
          f"median of {a.rounds} interleaved rounds\n")
    print("FLOPs: 2·N·C_in·H·W·(C_out/g)·R·S. FMA peak: what `cpuconv compare` measured in its own run "
          "(the higher of the rounds).\n")
    print("| layer | spec | ORT GFLOP/s | cpuconv GFLOP/s | cpuconv / ORT | ORT % peak | cpuconv % peak | Auto picked |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for name, spec, o, cc, picked, peak in rows:
        print(f"| {name} | {spec} | {o:.1f} | {cc:.1f} | {cc / o:.3f} | {100 * o / peak:.0f}% | "
              f"{100 * cc / peak:.0f}% | {picked} |")
    parts = []
    ratios = [(cc / o, n) for n, _, o, cc, _, _ in rows]
    if ratios:
        r, n = min(ratios)
        parts.append(f"min {r:.3f} ({n})")
        parts.append(f"median {float(np.median([r for r, _ in ratios])):.3f}")
    capped = [(cc / min(1.05 * o, 0.95 * peak), n) for n, _, o, cc, _, peak in rows if np.isfinite(peak)]
    if capped:
        r, n = min(capped)
        parts.append(f"vs min(1.05x ORT, 0.95x peak) {r:.3f} ({n})")
    print("\nvs onnxruntime ConvTranspose: " + (", ".join(parts) if parts else "no layer ran"))
    sys.exit(1 if failed or not rows else 0)


if __name__ == "__main__":
    main()
