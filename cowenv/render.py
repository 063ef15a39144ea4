"""Pictures of the kernel state for ``render_mode="ansi"`` and ``"rgb_array"``.

Both read the kernel through its public attributes only: threads (state, operation,
preemption label, locks held and awaited), live processes → PMD entries → PTE tables
(refcount, PMD write bit, which processes share a table) and the pressure state.
matplotlib is imported only when an RGB frame is drawn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .kernel import KSWAPD_TID, Kernel
from .kernel.locks import WRITE
from .kernel.mm import (
    MM_ANONPAGES,
    MM_SHMEMPAGES,
    MM_SWAPENTS,
    MMF_COW_PTE,
    MMF_COW_PTE_READY,
    MMF_HAS_PINNED,
)

_FLAG_NAMES = ((MMF_COW_PTE, "COW_PTE"), (MMF_COW_PTE_READY, "COW_PTE_READY"),
               (MMF_HAS_PINNED, "HAS_PINNED"))


def _mode(m: str) -> str:
    return "w" if m == WRITE else "r"


def _thread_rows(k: Kernel) -> list[dict[str, Any]]:
    rows = []
    for tid in sorted(k.threads):
        t = k.threads[tid]
        state = k.thread_state(tid)
        if state == "exited":
            continue
        rows.append({
            "tid": tid,
            "who": "kswapd" if tid == KSWAPD_TID else f"pid{t.pid}",
            "state": state,
            "op": t.op if t.gen is not None else "",
            "label": t.label if t.gen is not None else "",
            "held": [f"{lk.name}({_mode(m)})" for lk, m in t.held],
            "waits": f"{t.waiting[0].name}({_mode(t.waiting[1])})" if t.waiting else "",
        })
    return rows


def _table_users(k: Kernel) -> dict[int, list[tuple[int, int, bool]]]:
    """Table pfn -> [(pid, pmd index, pmd writable)] over live processes."""
    users: dict[int, list[tuple[int, int, bool]]] = {}
    for p in k.live_procs():
        for idx in sorted(p.mm.pmd):
            e = p.mm.pmd[idx]
            users.setdefault(e.table.pfn, []).append((p.pid, idx, e.write))
    return users


def render_ansi(k: Kernel, pmd_indices: tuple[int, ...] = (), last_label: str = "") -> str:
    """Draw the kernel state as text.

    Args:
        k: The kernel.
        pmd_indices: PMD indices the env observes (marked with ``*``).
        last_label: Label reached by the last ``run`` action.

    Returns:
        Lines: header, threads, processes with their PMDs, tables, violations.

    """
    pool = k.pool
    pins = sum(1 for p in k.pins.values() if p.active)
    out = [f"kernel step {k.step_no}  variant {k.config.variant}"
           f"{' +' + str(len(k.config.flaws)) + ' flaws' if k.config.flaws else ''}  "
           f"fail_nth {k.fail_nth}  free frames {pool.nr_free}/{pool.nr}  "
           f"swap free {len(k.swap.free)}/{k.swap.nr}  pins {pins}"
           + (f"  last: {last_label}" if last_label else "")]
    out.append("threads:")
    for r in _thread_rows(k):
        line = f"  t{r['tid']:<2} {r['who']:<7} {r['state']:<9}"
        if r["op"]:
            line += f" {r['op']:<13} @ {r['label'] or '(not started)'}"
        if r["held"]:
            line += f"  holds {' '.join(r['held'])}"
        if r["waits"]:
            line += f"  waits {r['waits']}"
        out.append(line)
    users = _table_users(k)
    out.append("processes:")
    for p in k.live_procs():
        mm = p.mm
        flags = "|".join(n for b, n in _FLAG_NAMES if mm.flags & b) or "-"
        ml = mm.mmap_lock
        lock = f"r{sorted(ml.readers)}" if ml.readers else ""
        lock += f" w[t{ml.writer}]" if ml.writer is not None else ""
        out.append(f"  pid{p.pid} mm{mm.id} threads {p.tids} rss anon={mm.rss[MM_ANONPAGES]} "
                   f"swap={mm.rss[MM_SWAPENTS]} shmem={mm.rss[MM_SHMEMPAGES]} "
                   f"nr_ptes={mm.nr_ptes} flags={flags} mmap_lock {lock or 'free'}")
        for idx in sorted(mm.pmd):
            e = mm.pmd[idx]
            tb = e.table
            others = [f"pid{pid}" for pid, _, _ in users.get(tb.pfn, []) if pid != p.pid]
            live = int(np.count_nonzero(tb.entries))
            out.append(f"    {'*' if idx in pmd_indices else ' '}pmd[{idx}] -> table {tb.pfn} "
                       f"ref {tb.refcount} {'rw' if e.write else 'ro'} {live} entries"
                       f"{' FREED' if tb.freed else ''}"
                       f"{'  shared with ' + ','.join(others) if others else ''}")
    out.append("tables:")
    for pfn in sorted(users):
        us = users[pfn]
        tb = next(e.table for p in k.live_procs() for i, e in sorted(p.mm.pmd.items())
                  if e.table.pfn == pfn)
        ptl = k.pte_lockptr(k.procs[us[0][0]].mm, tb)
        owner = getattr(ptl, "owner", None)
        out.append(f"  table {pfn} ref {tb.refcount} "
                   f"ptl {'t' + str(owner) if owner is not None else 'free'}  pmds: "
                   + " ".join(f"pid{pid}[{idx}]{'' if w else '(ro)'}" for pid, idx, w in us))
    if k.violations:
        out.append("violations:")
        for v in k.violations[:20]:
            out.append(f"  #{v.step} {v.signature}: {v.message}")
        if len(k.violations) > 20:
            out.append(f"  … {len(k.violations) - 20} more")
    return "\n".join(out) + "\n"


def render_rgb(k: Kernel, pmd_indices: tuple[int, ...] = (), width: int = 800,
               height: int = 600) -> np.ndarray:
    """Draw the kernel state as an RGB image.

    Processes (with their threads) on the left, their PMD entries in the middle, PTE
    tables on the right; an edge per PMD entry (solid = writable PMD, dashed = read-only,
    i.e. COW-shared), tables shaded by refcount (orange = shared, red = freed),
    blocked threads in red.

    Returns:
        ``uint8`` array of shape ``(height, width, 3)``.

    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    procs = k.live_procs()
    users = _table_users(k)
    tables = sorted(users)
    rows = _thread_rows(k)
    ax.text(0.01, 0.98, f"step {k.step_no}  fail_nth {k.fail_nth}  free {k.pool.nr_free}/"
            f"{k.pool.nr}  violations {len(k.violations)}", fontsize=9, va="top",
            family="monospace")
    # Processes and their PMD entries.
    pmd_pos: dict[tuple[int, int], float] = {}
    nrows = sum(max(1, len(p.mm.pmd)) for p in procs) + 2 * len(procs)
    dy = min(0.08, 0.86 / max(1, nrows))
    y = 0.92
    for p in procs:
        mm = p.mm
        flags = ",".join(n for b, n in _FLAG_NAMES if mm.flags & b)
        ax.text(0.02, y, f"pid{p.pid} (mm{mm.id})", fontsize=9, va="top", weight="bold",
                bbox={"boxstyle": "round", "fc": "#dde8f8", "ec": "#4060a0"})
        ths = [r for r in rows if r["who"] == f"pid{p.pid}"]
        tl = "  ".join(f"t{r['tid']}:{r['state'][0]}" + (f"@{r['label']}" if r["label"] else "")
                       for r in ths)
        ax.text(0.02, y - dy, f"{flags} {tl}"[:60], fontsize=6, va="top", family="monospace",
                color="#a00000" if any(r["state"] == "blocked" for r in ths) else "#303030")
        y -= 2 * dy
        for idx in sorted(mm.pmd):
            e = mm.pmd[idx]
            mark = "*" if idx in pmd_indices else " "
            ax.text(0.30, y, f"{mark}pmd[{idx}] {'rw' if e.write else 'ro'}", fontsize=7,
                    va="center", family="monospace")
            pmd_pos[(p.pid, idx)] = y
            y -= dy
        if not mm.pmd:
            y -= dy
    # Tables.
    tdy = min(0.1, 0.86 / max(1, len(tables)))
    tpos: dict[int, float] = {}
    for i, pfn in enumerate(tables):
        ty = 0.9 - i * tdy
        tpos[pfn] = ty
        us = users[pfn]
        tb = next(e.table for p in procs for _, e in sorted(p.mm.pmd.items())
                  if e.table.pfn == pfn)
        fc = "#f4a0a0" if tb.freed else ("#ffc070" if tb.refcount > 1 else "#c8e6c8")
        live = int(np.count_nonzero(tb.entries))
        ptl = k.pte_lockptr(k.procs[us[0][0]].mm, tb)
        owner = getattr(ptl, "owner", None)
        ax.text(0.72, ty, f"table {pfn} ref {tb.refcount} ({live} PTEs)"
                + (f" ptl:t{owner}" if owner is not None else ""), fontsize=7, va="center",
                family="monospace", bbox={"boxstyle": "square", "fc": fc, "ec": "#606060"})
    for (pid, idx), py in pmd_pos.items():
        e = k.procs[pid].mm.pmd[idx]
        ty = tpos.get(e.table.pfn)
        if ty is None:
            continue
        ax.annotate("", xy=(0.71, ty), xytext=(0.45, py),
                    arrowprops={"arrowstyle": "->", "lw": 0.8,
                                "ls": "-" if e.write else "--",
                                "color": "#303030" if e.write else "#c06000"})
    ks = next((r for r in rows if r["tid"] == KSWAPD_TID), None)
    if ks is not None and ks["op"]:
        ax.text(0.01, 0.02, f"kswapd: {ks['state']} @ {ks['label']}", fontsize=7,
                family="monospace")
    canvas.draw()
    buf = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(buf[:, :, :3])
