"""Memory after fork with 1 GiB populated: classic vs COW PTE, beside the cover letter.

For each variant: fork a process whose 1 GiB private anonymous mapping is fully
populated (x86_64 geometry: 262,144 PTEs in 512 tables), then report the parent's and
child's ``VmRSS``/``VmPTE`` as /proc/PID/status would print them, the number of
page-table pages that exist in the whole system, and the simulated fork cost when the
cost model is present.

Usage: ``python benchmarks/fork_memory.py [--json] [--mib N]``
"""

from __future__ import annotations

import argparse
import json
import time

from cowenv.kernel import make_kernel
from cowenv.kernel.config import KernelConfig
from cowenv.kernel.mm import MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES

#: The v3/v4 cover letters' table ("Memory after forking with 1 GB mapped", kB).
COVER_LETTER = {
    "classic": {"parent": (1049688, 2096), "child": (1048688, 2096)},
    "cowpte": {"parent": (1049968, 2096), "child": (2576, 44)},
}


def status(mm) -> tuple[int, int]:
    """(VmRSS, VmPTE) in kB, as ``task_mem()`` prints them."""
    rss = (mm.rss[MM_ANONPAGES] + mm.rss[MM_FILEPAGES] + mm.rss[MM_SHMEMPAGES]) * 4
    return rss, mm.pgtables_bytes() // 1024


def run(variant: str, mib: int) -> dict:
    """Fork once with ``mib`` MiB populated; return the figures."""
    npages = mib * 256
    cfg = KernelConfig(variant=variant, ptrs_per_pte=512, nr_frames=npages + npages // 256 + 4096,
                       nr_swap_slots=0)
    k = make_kernel(cfg, oracles=False, trace=False)
    k.do(1, "mmap", addr=0x40000000, length=mib << 20, prot="rw", populate=True)
    if variant == "cowpte":
        k.do(1, "prctl_cow_pte")
    before = len(k.tables)
    cost0 = k.cost.total()
    t0 = time.perf_counter()
    pid = k.do(1, "fork")
    wall = time.perf_counter() - t0
    parent, child = k.procs[1].mm, k.procs[pid].mm
    out = {
        "variant": variant, "mib": mib,
        "parent": dict(zip(("VmRSS_kB", "VmPTE_kB"), status(parent), strict=True)),
        "child": dict(zip(("VmRSS_kB", "VmPTE_kB"), status(child), strict=True)),
        "pte_tables_before_fork": before,
        "pte_tables_after_fork": len(k.tables),
        "fork_wall_s": round(wall, 4),
    }
    out["fork_cost_ms"] = round((k.cost.total() - cost0) / 1e6, 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--mib", type=int, default=1024)
    a = ap.parse_args()
    rows = [run(v, a.mib) for v in ("classic", "cowpte")]
    if a.json:
        print(json.dumps({"results": rows, "cover_letter_kB": COVER_LETTER}, indent=1))
        return
    print(f"fork with {a.mib} MiB populated (x86_64 geometry)")
    hdr = (f"{'variant':8} {'who':6} {'VmRSS kB':>10} {'VmPTE kB':>9} {'letter RSS':>11} "
           f"{'letter PTE':>10}")
    print(hdr)
    for r in rows:
        for who in ("parent", "child"):
            lr, lp = COVER_LETTER[r["variant"]][who]
            print(f"{r['variant']:8} {who:6} {r[who]['VmRSS_kB']:>10} {r[who]['VmPTE_kB']:>9} "
                  f"{lr:>11} {lp:>10}")
    for r in rows:
        extra = f", simulated fork cost {r['fork_cost_ms']} ms" if "fork_cost_ms" in r else ""
        print(f"{r['variant']}: PTE tables in the system {r['pte_tables_before_fork']} -> "
              f"{r['pte_tables_after_fork']} (fork wall {r['fork_wall_s']} s{extra})")
    print("Where they differ: v4 does all per-page accounting at fork, so the child is "
          "charged every page (VmRSS) and every shared table (mm_inc_nr_ptes in pmd_install, "
          "VmPTE); the letter's child figures (2576 kB / 44 kB) match RFC v2's deferred "
          "accounting. What v4 saves is page-table pages in the system, not the child's "
          "counters. The letter's processes also map a binary, libraries and a stack "
          "(about 1 MB RSS and 40-48 kB of tables) that the simulation does not.")


if __name__ == "__main__":
    main()
