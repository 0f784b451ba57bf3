"""The bench's table: each row timed (a warm-up call, then the timed calls), its FLOPs counted once on
the timed function, its peak memory, printed as soon as it is measured.
"""
import time
from dataclasses import dataclass

import torch

from bench.estimate import percent
from bench.flops import count_flops, utilisation
from sail import common, files


@dataclass
class Row:
    work: str
    unit: str
    ours: float            # units per second of the kit's code
    naive: float           # units per second of the straightforward code, or None
    peak: float            # peak memory, MiB
    flops: float           # FLOPs per unit
    tflops: float          # TFLOP/s of ours
    mfu: float             # share of the device's peak, or None


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats, warm_up=None):
    """Seconds per call of fn, after one warm-up call (warm_up, if given, in its place)."""
    (warm_up or fn)()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def peak_memory_mb():
    """GPU memory allocated where there is a GPU, else the process's resident RAM (files.peak_memory)."""
    memory = files.peak_memory()
    return 1024 * memory.get("peak_gpu_gib", memory["peak_ram_gib"])


class Table:
    """Rows of timed work, each printed when measured."""

    def __init__(self, peak_tflops):
        self.rows, self.peak = [], peak_tflops
        print(f"{'work':38s} {'unit':10s} {'ours':>10s} {'naive':>10s} {'ratio':>7s} {'peak MiB':>9s} "
              f"{'TFLOP/unit':>11s} {'TFLOP/s':>9s} {'MFU':>6s}", flush=True)

    def measure(self, work, unit, count, fn_ours, fn_naive, repeats, flops=None):
        """Time fn_ours (count units per call) and fn_naive; the warm-up call of fn_ours counts its FLOPs
        unless `flops` (per unit) is given: a row doing the same work as an earlier one (a compiled UNet
        is timed, not counted: the counter would run it uncompiled)."""
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        counted = {}
        count_once = None if flops is not None else lambda: counted.update(flops=count_flops(fn_ours)[1] / count)
        try:
            a = timed(fn_ours, repeats, count_once)
            b = timed(fn_naive, repeats) if fn_naive else None
        except torch.cuda.OutOfMemoryError:
            raise common.SailError(f"out of GPU memory in {work}: use a smaller --micro-batch / --gen-batch / "
                                   "--reward-batch, or --gradient-checkpointing") from None
        flops = counted.get("flops", flops)
        tflops, mfu = utilisation(flops, count / a, self.peak)
        row = Row(work, unit, count / a, b and count / b, peak_memory_mb(), flops, tflops, mfu)
        self.rows.append(row)
        naive, ratio = (f"{row.naive:10.2f}", f"{row.ours / row.naive:6.2f}x") if b else (f"{'':10s}", f"{'':7s}")
        print(f"{work:38s} {unit:10s} {row.ours:10.2f} {naive} {ratio} {row.peak:9.0f} {flops / 1e12:11.4g} "
              f"{tflops:9.4g} {percent(mfu):>6s}", flush=True)
        return row.ours

    def row(self, work):
        return next(r for r in self.rows if r.work == work)
