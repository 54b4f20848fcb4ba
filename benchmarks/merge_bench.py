"""Throughput and peak memory of the streaming merge kernels in ``cmm_utils.merging.kernels``.

Usage::

    python benchmarks/merge_bench.py --sizes resnet18 vit_b16 --tasks 2 5 10 20 \\
        --out results/bench/merge_bench.csv --markdown results/bench/merge_bench.md
    python benchmarks/merge_bench.py --quick --out /tmp/merge_bench.csv   # seconds, in-process

For each model size and each number of tasks T, every case runs in a fresh child
process, forked from a server that has only imported torch. A case is one
streaming rule (average, task_arithmetic, magmax, random, cmm), the authors'
stack-then-reduce style of the same rule, or a plain copy. T task vectors are
cycled from a pool of ``--pool`` (default 3) distinct random vectors, built once in
the child, so that the random generator is not what gets measured.

* **Throughput**: best-of-``--repeats`` wall time. GB/s = T × (bytes one task
  feeds the rule) / time. That is one task vector for the T-vector rules and the
  copy. The CMM fold reads two per task, θ_t and its importance F_t, and is
  counted so.
* **Copy** (the practical limit): ``dst.copy_(src)`` per tensor over the same T
  vectors into one preallocated vector. It is timed again inside every child,
  interleaved with the case, and ``ratio`` = case GB/s / that copy GB/s, so the
  ratio is taken under the same machine load as the case.
* **Threads**: 1 intra-op thread by default (``--threads``). On the shared
  2-core machine, 2-thread OpenMP kernels stall at barriers whenever one thread is
  descheduled (see benchmarks/README.md).
* **Extra peak memory**: after the pool is built, the child reads VmRSS, resets
  the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), runs the
  case once, and reads VmHWM. The figure is VmHWM − VmRSS before the run: output,
  accumulators, temporaries and allocator slack, counted in pages actually
  touched. If clear_refs cannot be written, the lifetime ``ru_maxrss`` is used
  instead (an upper bound) and the ``mem_method`` column says so.
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TIMM_NAMES = {"resnet18": "resnet18", "vit_b16": "vit_base_patch16_224"}
# a tiny synthetic shape set for --quick (~0.4M parameters)
TINY = {"conv1.weight": (64, 3, 7, 7), "conv2.weight": (64, 64, 3, 3), "bn.weight": (64,), "bn.bias": (64,),
        "fc.weight": (10, 3000), "fc.bias": (10,), "ln.weight": (768,), "proj.weight": (256, 512)}  # fmt: skip

STREAMING = ["average", "task_arithmetic", "magmax", "random", "cmm"]
STACKED = ["average", "task_arithmetic", "magmax", "random", "cmm"]
FIELDS = ["size", "params", "vector_mb", "T", "method", "impl", "time_s", "gbps", "copy_gbps", "ratio",
          "extra_peak_mb", "extra_peak_vectors", "mem_method", "threads"]  # fmt: skip


def model_shapes(size: str) -> dict[str, tuple[int, ...]]:
    """Floating state-dict shapes of the real timm model (built without weights)."""
    if size == "tiny":
        return dict(TINY)
    import timm
    import torch

    model = timm.create_model(TIMM_NAMES[size], pretrained=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if torch.is_floating_point(v)}


# ----------------------------------------------------------------- child side


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _make_pool(shapes, n, seed, positive=False):
    """n distinct random vectors. A 4M-element random block is tiled into them,
    which is much faster than drawing 86M normals per vector."""
    import torch

    g = torch.Generator().manual_seed(seed)
    block = torch.randn(min(1 << 22, sum(math.prod(s) for s in shapes.values())), generator=g)
    if positive:
        block.abs_()
    pool = []
    for i in range(n):
        vec, offset = {}, 997 * i
        for k, s in shapes.items():
            t = torch.empty(s)
            flat, done = t.view(-1), 0
            while done < flat.numel():
                start = (offset + done) % block.numel()
                m = min(flat.numel() - done, block.numel() - start)
                flat[done : done + m] = block[start : start + m]
                done += m
            offset += 7919
            vec[k] = t
        pool.append(vec)
    return pool


def _case_fn(method, impl, pool, fpool, T):
    """A zero-argument callable running one case and returning its result."""
    import torch

    from cmm_utils import merging as M

    P = len(pool)

    def gen():
        return (pool[i % P] for i in range(T))

    def lst():
        return [pool[i % P] for i in range(T)]

    if impl == "copy":
        dst = {k: torch.empty_like(v) for k, v in pool[0].items()}

        def copy():
            for tv in gen():
                for k, v in tv.items():
                    dst[k].copy_(v)
            return dst

        return copy
    if impl == "streaming":
        return {
            "average": lambda: M.average(gen()),
            "task_arithmetic": lambda: M.task_arithmetic(gen(), 0.3),
            "magmax": lambda: M.magmax(gen()),
            "random": lambda: M.random_select(gen(), seed=0),
            "cmm": lambda: M.continual_importance_merge(((pool[i % P], fpool[i % P]) for i in range(T)), 0.4),
        }[method]

    # impl == "stacked": the authors' style, all T vectors at hand, per key
    def stacked_magmax():
        out = {}
        for k in pool[0]:
            s = torch.stack([tv[k] for tv in lst()])
            idx = s.abs().max(0, keepdim=True).indices  # ties go to the first task: timing only
            out[k] = s.gather(0, idx)[0]
        return out

    def stacked_random():
        out = {}
        for k in pool[0]:
            s = torch.stack([tv[k] for tv in lst()])
            out[k] = s.gather(0, torch.randint(0, T, (1, *s.shape[1:])))[0]
        return out

    def cmm_formula():  # interpolate_weights: ((1-a)F θ + a F_t θ_t) / ((1-a)F + a F_t), per key
        a = 0.4
        theta = {k: v.clone() for k, v in pool[0].items()}
        fis = {k: v.clone() for k, v in fpool[0].items()}
        for i in range(1, T):
            th_t, f_t = pool[i % P], fpool[i % P]
            for k in theta:
                den = (1 - a) * fis[k] + a * f_t[k]
                theta[k] = ((1 - a) * fis[k] * theta[k] + a * f_t[k] * th_t[k]) / den
                fis[k] = den
        return theta

    return {
        "average": lambda: {k: torch.stack([tv[k] for tv in lst()]).mean(0) for k in pool[0]},
        "task_arithmetic": lambda: {k: torch.stack([tv[k] for tv in lst()]).sum(0) * 0.3 for k in pool[0]},
        "magmax": stacked_magmax,
        "random": stacked_random,
        "cmm": cmm_formula,
    }[method]


def run_case(conn, case):
    try:
        conn.send(_run_case(**case))
    except BaseException as e:  # report, do not hang the parent
        conn.send({"error": repr(e)})
    finally:
        conn.close()


def _run_case(size, shapes, T, method, impl, repeats, pool_size, threads):
    import torch

    torch.set_num_threads(threads)
    pool = _make_pool(shapes, pool_size, seed=0)
    fpool = _make_pool(shapes, pool_size, seed=1, positive=True) if method == "cmm" else None
    vec_bytes = sum(v.numel() * v.element_size() for v in pool[0].values())
    fn = _case_fn(method, impl, pool, fpool, T)
    copy_fn = _case_fn("copy", "copy", pool, None, T) if impl != "copy" else fn
    # Warm up code paths and the thread pool on a tiny copy of the case, so that
    # one-off costs are not timed; the copy's destination is not touched yet.
    tiny = [{k: v.view(-1)[:4096] for k, v in list(vec.items())[:3]} for vec in pool]
    tiny_f = [{k: v.view(-1)[:4096] for k, v in list(vec.items())[:3]} for vec in fpool] if fpool else None
    _case_fn(method, impl, tiny, tiny_f, 2)()
    _case_fn("copy", "copy", tiny, None, 2)()
    del tiny, tiny_f

    base_kb = _status_kb("VmRSS")
    exact = _reset_peak()
    t0 = time.perf_counter()
    res = fn()
    times = [time.perf_counter() - t0]
    peak_kb = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = None  # noqa: F841  (free the result before timing again)
    copy_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        copy_fn()
        copy_times.append(time.perf_counter() - t0)
        if len(times) < repeats:
            t0 = time.perf_counter()
            res = fn()
            times.append(time.perf_counter() - t0)
            res = None  # noqa: F841
    per_task = vec_bytes * (2 if method == "cmm" and impl != "copy" else 1)
    best, best_copy = min(times), min(copy_times)
    gbps = T * per_task / best / 1e9
    copy_gbps = T * vec_bytes / best_copy / 1e9
    extra_mb = (peak_kb - base_kb) * 1024 / 1e6
    return {
        "size": size,
        "params": sum(v.numel() for v in pool[0].values()),
        "vector_mb": round(vec_bytes / 1e6, 1),
        "T": T,
        "method": method,
        "impl": impl,
        "time_s": f"{best:.4g}",
        "gbps": f"{gbps:.4g}",
        "copy_gbps": f"{copy_gbps:.4g}",
        "ratio": round(gbps / copy_gbps, 3),
        "extra_peak_mb": round(extra_mb, 1),
        "extra_peak_vectors": round(extra_mb * 1e6 / vec_bytes, 2),
        "mem_method": "VmHWM-VmRSS (clear_refs)" if exact else "ru_maxrss-VmRSS (upper bound)",
        "threads": threads,
    }


# ---------------------------------------------------------------- parent side


def run_all(sizes, tasks, repeats, pool_size, methods=None, inprocess=False, threads=1, log=print):
    """Run every case; in a fresh forked child each unless ``inprocess`` (smoke tests:
    the memory figures are then only indicative, the allocator being shared)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "cmm_utils.merging"])
    rows = []
    cases = [("copy", "copy")] + [(m, "streaming") for m in STREAMING] + [(m, "stacked") for m in STACKED]
    if methods:
        cases = [c for c in cases if c[0] in methods or c[0] == "copy"]
    for size in sizes:
        shapes = model_shapes(size)
        for T in tasks:
            for method, impl in cases:
                case = dict(size=size, shapes=shapes, T=T, method=method, impl=impl, repeats=repeats,
                            pool_size=pool_size, threads=threads)  # fmt: skip
                if inprocess:
                    import torch

                    saved = torch.get_num_threads()
                    try:
                        row = _run_case(**case)
                    finally:
                        torch.set_num_threads(saved)
                else:
                    parent, child = ctx.Pipe(duplex=False)
                    proc = ctx.Process(target=run_case, args=(child, case))
                    proc.start()
                    child.close()
                    row = parent.recv()
                    proc.join()
                if "error" in row:
                    raise RuntimeError(f"{size} T={T} {method}/{impl}: {row['error']}")
                rows.append(row)
                log(
                    f"{size:9s} T={T:<3d} {method:16s} {impl:9s} {float(row['time_s']):8.3f}s {float(row['gbps']):6.2f} GB/s "
                    f"x{row['ratio']:.2f} copy  +{row['extra_peak_mb']:8.1f} MB ({row['extra_peak_vectors']:.2f} vec)"
                )
    return rows


def to_markdown(rows) -> str:
    """One table per size: rows = rule/impl, columns = T (ratio to copy; extra peak in vectors)."""
    out = []
    for size in dict.fromkeys(r["size"] for r in rows):
        rs = [r for r in rows if r["size"] == size]
        Ts = sorted({r["T"] for r in rs})
        r0 = rs[0]
        out.append(f"**{size}**: {r0['params'] / 1e6:.1f}M parameters, one task vector = {r0['vector_mb']} MB (float32)\n")
        out.append("| rule | impl | " + " | ".join(f"T={T}: GB/s (×copy), +peak" for T in Ts) + " |")
        out.append("|---|---|" + "---|" * len(Ts))
        for method, impl in dict.fromkeys((r["method"], r["impl"]) for r in rs):
            cells = []
            for T in Ts:
                r = next(x for x in rs if x["method"] == method and x["impl"] == impl and x["T"] == T)
                ratio = "" if impl == "copy" else f" (×{r['ratio']:.2f})"
                cells.append(f"{float(r['gbps']):.2f}{ratio}, +{r['extra_peak_vectors']:.2f} v")
            out.append(f"| {method} | {impl} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["resnet18"], choices=[*TIMM_NAMES, "tiny"])
    p.add_argument("--tasks", nargs="+", type=int, default=[2, 5, 10, 20])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (best is reported)")
    p.add_argument("--pool", type=int, default=3, help="distinct random vectors cycled through")
    p.add_argument("--methods", nargs="+", choices=STREAMING, help="subset of rules (copy always runs)")
    p.add_argument("--out", type=Path, default=Path("results/bench/merge_bench.csv"))
    p.add_argument("--markdown", type=Path, help="also write the tables as Markdown here")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads per case (default 1: on a shared 2-core machine, 2-thread "
        "OpenMP kernels stall at barriers whenever a thread is descheduled)",
    )
    p.add_argument("--inprocess", action="store_true", help="no child processes (memory figures indicative only)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, T = 2, one repeat, in-process (tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.tasks, args.repeats, args.inprocess = ["tiny"], [2], 1, True
    rows = run_all(args.sizes, args.tasks, args.repeats, args.pool, args.methods, args.inprocess, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    md = to_markdown(rows)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(md)
    print(f"\nwrote {args.out}  (cpu threads: {os.cpu_count()})\n\n{md}")
    return rows


if __name__ == "__main__":
    main()
