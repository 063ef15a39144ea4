"""Sleeping and spinning locks, with lockdep-style checking.

Locks are tiny state records in the spirit of loom's ``rt/mutex.rs``: who holds them,
who waits (FIFO), and a lockdep *class* used to detect lock-order inversions between
classes (``mmap_lock`` → ``vma_lock`` → ``anon_vma`` → ``page_table_lock`` → ``ptl``,
the kernel's documented order, see ``mm/rmap.c`` header comment).

Acquisition is done by the kernel's generator helper (:meth:`Kernel.lock`): a thread
that cannot take a lock is *blocked* and not runnable until :meth:`can_acquire` holds.
"""

from __future__ import annotations

READ = "read"
WRITE = "write"

#: ``SINGLE_DEPTH_NESTING`` (include/linux/lockdep.h): the subclass of
#: ``spin_lock_nested(lock, SINGLE_DEPTH_NESTING)``.
SINGLE_DEPTH_NESTING = 1


class Lock:
    """Common state of a lock: name, lockdep class, FIFO wait queue.

    Attributes:
        name: Unique, stable name (e.g. ``mm1.mmap_lock``, ``ptl:37``).
        cls: Lockdep class (``mmap_lock``, ``vma_lock``, ``anon_vma``,
            ``page_table_lock``, ``ptl``).
        waiters: FIFO list of ``(tid, mode)`` waiting for the lock.
    """

    __slots__ = ("name", "cls", "waiters")

    def __init__(self, name: str, cls: str) -> None:
        self.name = name
        self.cls = cls
        self.waiters: list[tuple[int, str]] = []

    def _ahead(self, tid: int) -> list[tuple[int, str]]:
        for i, (t, _) in enumerate(self.waiters):
            if t == tid:
                return self.waiters[:i]
        return self.waiters

    def holders(self) -> list[tuple[int, str]]:
        """``(tid, mode)`` of every current holder."""
        raise NotImplementedError

    def can_acquire(self, tid: int, mode: str) -> bool:
        """Whether ``tid`` may take the lock in ``mode`` now (fairness included)."""
        raise NotImplementedError

    def acquire(self, tid: int, mode: str) -> None:
        """Take the lock (caller checked :meth:`can_acquire`)."""
        raise NotImplementedError

    def release(self, tid: int, mode: str) -> bool:
        """Drop the lock; return False if ``tid`` did not hold it in ``mode``."""
        raise NotImplementedError


class SpinLock(Lock):
    """``spinlock_t``: the split PTE lock (``pte_lockptr``) or ``mm->page_table_lock``."""

    __slots__ = ("owner",)

    def __init__(self, name: str, cls: str) -> None:
        super().__init__(name, cls)
        self.owner: int | None = None

    def holders(self) -> list[tuple[int, str]]:  # noqa: D102
        return [] if self.owner is None else [(self.owner, WRITE)]

    def can_acquire(self, tid: int, mode: str) -> bool:  # noqa: D102
        # == owner is None and not self._ahead(tid): nobody queued before tid
        if self.owner is not None:
            return False
        w = self.waiters
        return not w or w[0][0] == tid

    def acquire(self, tid: int, mode: str) -> None:  # noqa: D102
        self.owner = tid

    def release(self, tid: int, mode: str) -> bool:  # noqa: D102
        if self.owner != tid:
            return False
        self.owner = None
        return True


class RwSemaphore(Lock):
    """``struct rw_semaphore``: ``mmap_lock``, the per-VMA lock, ``anon_vma->rwsem``.

    Fair in FIFO order: a reader queues behind an earlier waiting writer, as the
    kernel's rwsem hands off to waiting writers. ``downgrade`` models
    ``mmap_write_downgrade``.
    """

    __slots__ = ("readers", "writer")

    def __init__(self, name: str, cls: str) -> None:
        super().__init__(name, cls)
        self.readers: list[int] = []
        self.writer: int | None = None

    def holders(self) -> list[tuple[int, str]]:  # noqa: D102
        h = [(t, READ) for t in self.readers]
        if self.writer is not None:
            h.append((self.writer, WRITE))
        return h

    def can_acquire(self, tid: int, mode: str) -> bool:  # noqa: D102
        # Same as: ahead = self._ahead(tid); READ: no WRITE ahead; WRITE: nothing ahead.
        if self.writer is not None:
            return False
        if mode == READ:
            for t, m in self.waiters:
                if t == tid:
                    return True
                if m == WRITE:
                    return False
            return True
        if self.readers:
            return False
        w = self.waiters
        return not w or w[0][0] == tid

    def try_acquire(self, tid: int, mode: str) -> bool:
        """``down_read_trylock``/``down_write_trylock``: never waits."""
        if self.writer is not None or (mode == WRITE and self.readers):
            return False
        if self.waiters and mode == WRITE:
            return False
        self.acquire(tid, mode)
        return True

    def acquire(self, tid: int, mode: str) -> None:  # noqa: D102
        if mode == READ:
            self.readers.append(tid)
        else:
            self.writer = tid

    def release(self, tid: int, mode: str) -> bool:  # noqa: D102
        if mode == READ:
            if tid not in self.readers:
                return False
            self.readers.remove(tid)
            return True
        if self.writer != tid:
            return False
        self.writer = None
        return True

    def downgrade(self, tid: int) -> bool:
        """``downgrade_write``: writer becomes a reader without a window."""
        if self.writer != tid:
            return False
        self.writer = None
        self.readers.append(tid)
        return True

    def is_locked(self) -> bool:
        """``rwsem_is_locked``."""
        return self.writer is not None or bool(self.readers)


#: The kernel's lock order (outermost first). Lockdep starts from it (see
#: :class:`Lockdep`), so an acquisition against it is reported the first time it happens.
#: Sources: the "Lock ordering in mm" comment at the top of ``mm/rmap.c`` (v6.2:
#: ``mm->mmap_lock`` … ``anon_vma->rwsem`` … ``mm->page_table_lock or pte_lock``;
#: ``vma_start_write`` joins it in 6.4, between the page lock and ``i_mmap_rwsem``), and
#: for the PMD lock before the PTE lock the upstream nesting ``pml = pmd_lock(mm, pmd); …
#: if (ptl != pml) spin_lock_nested(ptl, SINGLE_DEPTH_NESTING);`` of
#: ``retract_page_tables`` and ``collapse_pte_mapped_thp`` (``mm/khugepaged.c``, 6.5,
#: Hugh Dickins). ``page_table_lock`` here is ``pmd_lock`` (``mm->page_table_lock`` or
#: the split PMD ptlock); ``ptl`` is ``pte_lockptr``.
LOCK_ORDER = ("mmap_lock", "vma_lock", "anon_vma", "page_table_lock", "ptl")


class Lockdep:
    """Lock-order checking between lock classes, as ``kernel/locking/lockdep.c``.

    Starts from the documented order :data:`LOCK_ORDER` (as if every documented nesting
    had been observed once), then records an edge ``A -> B`` whenever a thread takes a
    lock of class ``B`` while holding
    one of class ``A``; an acquisition that closes a cycle is an inversion. Nesting
    within one class (``ptl`` → ``ptl`` in ``copy_pte_range`` with
    ``SINGLE_DEPTH_NESTING``, two ``mmap_lock`` in ``dup_mmap``) is annotated in the
    kernel and not reported here either.
    """

    def __init__(self, order: tuple[str, ...] = LOCK_ORDER) -> None:
        # Primed with the documented order: A -> B for every B after A in ``order``.
        self.edges: dict[str, set[str]] = {a: set(order[i + 1:]) for i, a in enumerate(order)}
        #: ``debug_locks``: lockdep reports once, then turns itself off, as the kernel's
        #: ``print_circular_bug`` / ``print_deadlock_bug`` do (``debug_locks_off()``:
        #: "turning off the locking correctness validator"); ``lockdep_assert_held*``
        #: (``WARN_ON(debug_locks && !...)``) is silent from then on too.
        self.debug_locks = True

    def _reaches(self, src: str, dst: str) -> bool:
        seen = {src}
        todo = [src]
        while todo:
            n = todo.pop()
            if n == dst:
                return True
            for m in self.edges.get(n, ()):  # reachability does not depend on the order
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return False

    def acquire(self, held_classes: list[str], new: str) -> str | None:
        """Record the acquisition; return a message if it inverts a known order.

        After the first message ``debug_locks`` is off and nothing more is checked.
        """
        if not self.debug_locks:
            return None
        msg = None
        edges = self.edges
        for h in held_classes:
            if h == new:
                continue
            out = edges.get(h)
            if out is not None and new in out:
                # A known edge h -> new. While debug_locks is on the graph has no cycle
                # (every edge was added only after checking it closes none; the primed
                # order is acyclic), so new cannot reach h: _reaches would say False.
                continue
            if msg is None and self._reaches(new, h):
                msg = f"possible circular locking: acquiring {new} while holding {h}"
            if out is None:
                edges[h] = {new}
            else:
                out.add(new)
        if msg is not None:
            self.debug_locks = False
        return msg
