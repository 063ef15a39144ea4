"""Lock glue: lockdep-checked acquire/release, mmap_lock and VMA-lock helpers, PTL lookup.

Models ``include/linux/mmap_lock.h`` (``mmap_read_lock`` … ``mmap_write_downgrade``,
``mmap_assert_locked`` / ``mmap_assert_write_locked``), ``vma_start_write`` of
``include/linux/mm.h`` (6.4 per-VMA locks) and ``pte_lockptr`` / ``pte_offset_map_lock``
of ``include/linux/mm.h`` and ``mm/pgtable-generic.c``. The lock objects themselves and
lockdep live in :mod:`cowenv.kernel.locks`.

Version note (``config.base``): on 6.5 ``pte_offset_map_lock`` re-checks the PMD under
the PTL and retries, as ``__pte_offset_map_lock`` does since 6.5; on 6.2/6.4 it is the
macro of ``include/linux/mm.h`` and cannot fail: it reads the PMD once, locks that
table's PTL and hands back that table, whatever the PMD holds by then.
"""

from __future__ import annotations

from .cost import LOCK_CATEGORIES
from .locks import READ, WRITE, Lock
from .mm import (
    MmStruct,
    Vma,
)
from .pgtable import (
    PteTable,
)
from .sched import Gen, Thread
from .trace import Event

_tuple_new = tuple.__new__

#: Lock classes whose lockdep class (:meth:`LockingMixin.lockdep_key`) can be ``ptlock``.
_PTLOCK_SOURCES = frozenset(("ptl", "page_table_lock", "ptlock"))


class LockingMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    def lockdep_key(self, lk: Lock) -> str:
        """The lockdep class (``struct lock_class_key``) of ``lk``.

        Every split page-table lock is initialised at one place, ``ptlock_init``
        (``include/linux/mm.h``, 6.2: ``spin_lock_init(ptlock_ptr(page));``, whose static
        key makes one class): the PTE tables' locks (``pte_lockptr``) and, with split PMD
        ptlocks (x86-64: ``ARCH_ENABLE_SPLIT_PMD_PTLOCK``; the model's ``split_ptl``),
        ``pmd_lock``, which is the PMD table page's ptlock (``pmd_lockptr`` →
        ``ptlock_ptr(pmd_pgtable_page(pmd))``, initialised by ``pgtable_pmd_page_ctor`` →
        ``ptlock_init``). So ``ptl`` and ``page_table_lock`` are class ``ptlock`` then;
        without split ptlocks both are ``mm->page_table_lock``.
        """
        c = lk.cls
        if c == "ptl" or (c == "page_table_lock" and self.config.split_ptl):
            return "ptlock"
        return c
    def lock(self, t: Thread, lk: Lock, mode: str, site: str,
             subclass: int = 0) -> Gen | tuple[()]:
        """Acquire ``lk``; yields ``site:wait`` while blocked.

        ``subclass`` is ``spin_lock_nested(lock, subclass)``'s (``SINGLE_DEPTH_NESTING``
        = 1): lockdep treats (class, subclass) as a class of its own. Acquiring a lock
        whose (class, subclass) a held lock already has is lockdep's "possible recursive
        locking detected" (``check_deadlock`` → ``print_deadlock_bug``, which turns
        lockdep off), checked for the ``ptlock`` class (:meth:`lockdep_key`); other
        classes' nestings (``dup_mmap``'s two ``mmap_lock``, annotated upstream) are not.

        Lock contract: none (this is the primitive).
        """
        held = t.held
        if held:  # (nothing held: nothing to check, and lockdep records no edge)
            for h, _ in held:
                if h is lk:
                    self._report("lock-discipline", site, f"recursive acquisition of {lk.name}")
                    break
            if self.config.lockdep:
                c = lk.cls
                # (_lockdep_recursion can only report for the ptlock class: lockdep_key)
                msg = self._lockdep_recursion(t, lk, subclass) if c in _PTLOCK_SOURCES \
                    else None
                if msg is None and self.lockdep.debug_locks:  # (else acquire: None)
                    msg = self.lockdep.acquire([h.cls for h, _ in held], c)
                if msg:
                    self._report("lock-discipline", site, msg)
        if subclass:
            t.nest[lk] = subclass
        if not lk.can_acquire(t.tid, mode):
            return self._lock_wait(t, lk, mode, site)
        # Uncontended: take it now and hand ``yield from`` an empty iterable (no
        # generator to create and run); every caller does ``yield from self.lock(...)``
        # at once, so the effects happen at the same point as in a generator body.
        lk.acquire(t.tid, mode)
        held.append((lk, mode))
        self.cost.charge(LOCK_CATEGORIES[lk.cls])  # == cost.charge_lock(lk.cls)
        if self.tracing:  # == self._ev(t.tid, "lock", lk.name, mode), inlined
            self.events.append(_tuple_new(Event, (self.step_no, t.tid, "lock", lk.name, mode)))
        return ()
    def _lock_wait(self, t: Thread, lk: Lock, mode: str, site: str) -> Gen:
        """The contended half of :meth:`lock`: queue, yield ``site:wait``, then acquire."""
        lk.waiters.append((t.tid, mode))
        t.waiting = (lk, mode)
        self._ev(t.tid, "wait", lk.name, mode)
        while not lk.can_acquire(t.tid, mode):
            yield f"{site}:wait"
        lk.waiters.remove((t.tid, mode))
        t.waiting = None
        lk.acquire(t.tid, mode)
        t.held.append((lk, mode))
        self.cost.charge_lock(lk.cls)
        self._ev(t.tid, "lock", lk.name, mode)
    def _lockdep_recursion(self, t: Thread, lk: Lock, subclass: int) -> str | None:
        """Lockdep's ``check_deadlock``: a held lock of the same (class, subclass)?"""
        if not self.lockdep.debug_locks:
            return None
        key = self.lockdep_key(lk)
        if key != "ptlock":
            return None
        nest = t.nest
        for h, _ in t.held:
            if h is not lk and self.lockdep_key(h) == key and nest.get(h, 0) == subclass:
                self.lockdep.debug_locks = False  # print_deadlock_bug: debug_locks_off()
                return (f"possible recursive locking detected: acquiring {lk.name} while "
                        f"holding {h.name}, both lock class ptlock subclass {subclass} "
                        "(no spin_lock_nested annotation)")
        return None
    def lock_set_subclass(self, t: Thread, lk: Lock, subclass: int) -> None:
        """Lockdep's ``lock_set_subclass``: record a held lock under another subclass."""
        if subclass:
            t.nest[lk] = subclass
        else:
            t.nest.pop(lk, None)
    def unlock(self, t: Thread, lk: Lock, mode: str, site: str) -> None:
        """Release ``lk``; releasing a lock not held is a lock-discipline violation."""
        held = t.held
        i = 0
        for h, m in held:
            if h is lk and m == mode:
                del held[i]
                if t.nest:
                    t.nest.pop(lk, None)
                lk.release(t.tid, mode)
                if self.tracing:  # == self._ev(t.tid, "unlock", lk.name, mode), inlined
                    self.events.append(
                        _tuple_new(Event, (self.step_no, t.tid, "unlock", lk.name, mode)))
                return
            i += 1
        self._report("lock-discipline", site, f"releasing {lk.name} ({mode}) not held")
    def holds(self, t: Thread, lk: Lock, mode: str | None = None) -> bool:
        """Whether ``t`` holds ``lk`` (in ``mode`` if given)."""
        for h, m in t.held:
            if h is lk and (mode is None or m == mode):
                return True
        return False
    def mmap_assert_locked(self, t: Thread, mm: MmStruct, site: str) -> None:
        """``mmap_assert_locked``: splat unless mmap_lock is held (any mode)."""
        if not self.holds(t, mm.mmap_lock):
            self._report("lock-discipline", site, "mmap_assert_locked: mmap_lock not held")
    def mmap_assert_write_locked(self, t: Thread, mm: MmStruct, site: str) -> None:
        """``mmap_assert_write_locked``: a lockdep splat unless held for write.

        ``lockdep_assert_held_write`` (``include/linux/lockdep.h``) is
        ``WARN_ON(debug_locks && !lockdep_is_held_type(l, 0))``: it warns every time while
        lockdep is on, and never after lockdep turned itself off. Without lockdep only
        ``VM_BUG_ON_MM(!rwsem_is_locked(&mm->mmap_lock))`` remains.
        """
        if not self.config.lockdep:
            if not mm.mmap_lock.is_locked():
                self._report("lock-discipline", site, "VM_BUG_ON_MM: mmap_lock not locked")
            return
        if not self.lockdep.debug_locks:
            # lockdep turned itself off after an earlier splat: lockdep_assert_held_write
            # is WARN_ON(debug_locks && ...); only the VM_BUG_ON_MM remains.
            if not mm.mmap_lock.is_locked():
                self._report("lock-discipline", site, "VM_BUG_ON_MM: mmap_lock not locked")
            return
        if not self.holds(t, mm.mmap_lock, WRITE):
            held = "held for read" if self.holds(t, mm.mmap_lock) else "not held"
            self._report("lock-discipline", site, f"mmap_assert_write_locked: mmap_lock {held}")
    def mmap_write_unlock(self, t: Thread, mm: MmStruct, site: str) -> None:
        """``mmap_write_unlock`` + ``vma_end_write_all`` (bumps ``mm_lock_seq``)."""
        mm.mm_lock_seq += 1
        self.unlock(t, mm.mmap_lock, WRITE, site)
    def mmap_write_downgrade(self, t: Thread, mm: MmStruct) -> None:
        """``mmap_write_downgrade`` (also ends VMA write locks, as 6.4 does)."""
        mm.mm_lock_seq += 1
        for i, (h, m) in enumerate(t.held):
            if h is mm.mmap_lock and m == WRITE:
                t.held[i] = (h, READ)
                mm.mmap_lock.downgrade(t.tid)
                self._ev(t.tid, "downgrade", mm.mmap_lock.name)
                return
        self._report("lock-discipline", "mmap_write_downgrade", "mmap_lock not write-held")
    def vma_start_write(self, t: Thread, vma: Vma) -> Gen:
        """``vma_start_write``: wait out VMA readers, mark the VMA write-locked.

        The VMA stays write-locked until the mmap_lock write section ends
        (``vm_lock_seq = mm_lock_seq``).

        Lock contract: mmap_lock held for write.
        """
        yield from self.lock(t, vma.lock, WRITE, "vma_start_write")
        vma.lock_seq = vma.mm.mm_lock_seq
        self.unlock(t, vma.lock, WRITE, "vma_start_write")
    def pte_lockptr(self, mm: MmStruct, table: PteTable) -> Lock:
        """``pte_lockptr``: the table's split PTL, or ``mm->page_table_lock``."""
        return table.ptl if self.config.split_ptl else mm.page_table_lock
    def pte_offset_map_lock(self, t: Thread, mm: MmStruct, idx: int, site: str,
                            subclass: int = 0) -> Gen:
        """``pte_offset_map_lock``: lock the PMD's table; returns ``(table, ptl)`` or None.

        ``subclass`` 1 stands for the open-coded ``pte_offset_map`` + ``spin_lock_nested(ptl,
        SINGLE_DEPTH_NESTING)`` of callers holding another PTL (``copy_pte_range``).

        Base 6.5 (``__pte_offset_map_lock`` in ``mm/pgtable-generic.c``, since 6.5): lock
        the table the PMD points at and re-check ``pmd_same`` under the lock, retrying;
        None if the PMD is none (``pte_offset_map`` failing).

        Base 6.2/6.4 (the ``include/linux/mm.h`` macro: ``__ptl = pte_lockptr(mm, pmd);
        __pte = pte_offset_map(pmd, address); spin_lock(__ptl);``): the PMD is read once
        and never re-checked. None stands for the ``pmd_none`` test every 6.2 caller does
        before (``handle_pte_fault``, ``follow_pmd_mask``, ``__pte_alloc``).
        """
        if not self.config.base_at_least("6.5"):
            pmd = mm.pmd.get(idx)
            if pmd is None:
                return None
            table = pmd.table
            ptl = self.pte_lockptr(mm, table)
            yield from self.lock(t, ptl, WRITE, site, subclass)
            return table, ptl
        while True:
            pmd = mm.pmd.get(idx)
            if pmd is None:
                return None
            table = pmd.table
            ptl = self.pte_lockptr(mm, table)
            yield from self.lock(t, ptl, WRITE, site, subclass)
            cur = mm.pmd.get(idx)
            if cur is not None and cur.table is table:
                return table, ptl
            self.unlock(t, ptl, WRITE, site)
