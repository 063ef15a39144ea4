"""The operation catalogue: names, argument specs and validation.

The system calls and events a thread can start: the user API of ``mm/mmap.c``,
``mm/mprotect.c``, ``mm/madvise.c``, ``kernel/fork.c``, the v4 ``prctl``, pins as
``pin_user_pages``/io_uring fixed buffers, and kswapd's reclaim (6.2 semantics).

This is plain data shared by the kernel (dispatch), the scenario loader (validation) and
the environment (action templates). Addresses and lengths are bytes; they must be
page-aligned. ``prot`` is a string of ``r``/``w`` letters or ``none``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EPERM = 1
ENOENT = 2
ESRCH = 3
EINTR = 4
EAGAIN = 11
ENOMEM = 12
EACCES = 13
EFAULT = 14
EBUSY = 16
EINVAL = 22

ERRNO_NAMES = {EPERM: "EPERM", ENOENT: "ENOENT", ESRCH: "ESRCH", EINTR: "EINTR",
               EAGAIN: "EAGAIN", ENOMEM: "ENOMEM", EACCES: "EACCES", EFAULT: "EFAULT",
               EBUSY: "EBUSY", EINVAL: "EINVAL"}

ADVICES = ("DONTNEED", "FREE", "PAGEOUT", "WIPEONFORK", "KEEPONFORK", "DONTFORK", "DOFORK")

#: Highest user address the model accepts (exclusive), 128 TiB like x86-64 4-level.
TASK_SIZE = 1 << 47


@dataclass(frozen=True)
class Arg:
    """One argument of an operation: name, type tag, default (``REQUIRED`` if none)."""

    name: str
    type: str  # "addr", "len", "prot", "bool", "advice", "int", "pin", "pid"
    default: Any = None
    required: bool = False


@dataclass(frozen=True)
class OpSpec:
    """An operation: its name, arguments, who may run it and what it models."""

    name: str
    args: tuple[Arg, ...]
    kthread: bool  # True: runs on kswapd (tid 0); False: on a user thread
    doc: str


def _a(name: str, typ: str, default: Any = None) -> Arg:
    return Arg(name, typ, default, default is None)


OPS: dict[str, OpSpec] = {o.name: o for o in (
    OpSpec("mmap", (_a("addr", "addr"), _a("length", "len"), _a("prot", "prot", "rw"),
                    _a("shared", "bool", False), _a("populate", "bool", False)), False,
           "mmap(MAP_FIXED|MAP_ANONYMOUS|MAP_PRIVATE or MAP_SHARED [|MAP_POPULATE])"),
    OpSpec("munmap", (_a("addr", "addr"), _a("length", "len")), False, "munmap"),
    OpSpec("mprotect", (_a("addr", "addr"), _a("length", "len"), _a("prot", "prot")), False,
           "mprotect"),
    OpSpec("madvise", (_a("addr", "addr"), _a("length", "len"), _a("advice", "advice")), False,
           "madvise(MADV_*)"),
    OpSpec("read", (_a("addr", "addr"),), False, "a user load from addr (faults as needed)"),
    OpSpec("write", (_a("addr", "addr"),), False,
           "a user store to addr: writes a fresh content token (faults as needed)"),
    OpSpec("fork", (), False, "fork(): new process with one thread"),
    OpSpec("clone", (), False, "clone(CLONE_VM|CLONE_THREAD): new thread in this process"),
    OpSpec("exit", (), False, "exit the thread; the last thread tears the mm down"),
    OpSpec("prctl_cow_pte", (), False, "prctl(PR_SET_COW_PTE)"),
    OpSpec("pin", (_a("addr", "addr"), _a("write", "bool", False), _a("fast", "bool", False)),
           False, "pin_user_pages[_fast](FOLL_PIN|FOLL_LONGTERM[|FOLL_WRITE]) of one page"),
    OpSpec("unpin", (_a("pin", "pin"),), False, "unpin_user_page"),
    OpSpec("dev_read", (_a("pin", "pin"),), False, "a device (DMA) read through a pin"),
    OpSpec("dev_write", (_a("pin", "pin"),), False,
           "a device (DMA) write through a writable pin: a fresh token"),
    OpSpec("reclaim", (_a("nr", "int", 1), _a("pid", "pid", 0), _a("addr", "addr", -1)), True,
           "kswapd: shrink the inactive anon LRU by nr pages (optionally starting with the "
           "page mapped at pid:addr)"),
    # Walkers of issue 13 (appended: the catalogue's and observation's op order).
    OpSpec("numa_hint", (_a("addr", "addr"), _a("length", "len")), False,
           "NUMA-hinting scan (task_numa_work -> change_prot_numa) of the thread's mm"),
    OpSpec("swapoff", (), False, "swapoff(2) of the swap device (then swapon again)"),
    OpSpec("clear_refs", (_a("type", "int", 4), _a("pid", "pid", 0)), False,
           "echo TYPE > /proc/PID/clear_refs (1-3: accessed bits, 4: soft-dirty; pid 0 = "
           "self)"),
    OpSpec("pagemap", (_a("addr", "addr"), _a("pid", "pid", 0)), False,
           "read /proc/PID/pagemap at addr: the flag bits 55-63 >> 55 (pid 0 = self)"),
    OpSpec("mremap", (_a("addr", "addr"), _a("old_length", "len"), _a("new_length", "len"),
                      _a("maymove", "bool", True), _a("new_addr", "addr", -1)), False,
           "mremap(addr, old_length, new_length, MREMAP_MAYMOVE [|MREMAP_FIXED, new_addr])"),
    OpSpec("move_pages", (_a("addr", "addr"), _a("length", "len"), _a("all", "bool", False),
                          _a("stat", "bool", False)),
           False, "move_pages(0, ...) of every page of [addr, addr+length) to node 0: "
           "MPOL_MF_MOVE (or MPOL_MF_MOVE_ALL with all); stat: nodes NULL (query only); "
           "the per-page status array is traced as an 'out' event"),
    OpSpec("compact", (_a("nr", "int", 1), _a("pid", "pid", 0), _a("addr", "addr", -1)), True,
           "kcompactd: migrate up to nr movable LRU pages in pfn order (optionally starting "
           "with the page mapped at pid:addr)"),
)}


def parse_prot(p: Any) -> int:
    """Parse ``"rw"``, ``"r"``, ``"w"``, ``"none"`` into PROT_* bits; ValueError if bad."""
    if not isinstance(p, str):
        raise ValueError("expected a string of r/w letters or 'none'")
    s = p.strip().lower()
    if s in ("none", "", "-"):
        return 0
    bits = 0
    for c in s:
        if c == "r":
            bits |= 1
        elif c == "w":
            bits |= 2
        else:
            raise ValueError("expected a string of r/w letters or 'none'")
    return bits


def prot_str(bits: int) -> str:
    """Inverse of :func:`parse_prot`."""
    return ("r" if bits & 1 else "") + ("w" if bits & 2 else "") or "none"


#: :func:`validate_args_memo`'s results, by operation, page size and argument items.
_VALID_MEMO: dict[tuple[Any, ...], dict[str, Any]] = {}

#: Most results :func:`validate_args_memo` keeps (each a small dict).
_VALID_MEMO_MAX = 8192


def validate_args_memo(op: str, args: dict[str, Any], page_size: int = 4096) -> dict[str, Any]:
    """:func:`validate_args`, memoised for arguments that are all exact ``int`` or ``str``.

    :func:`validate_args` is a pure function of ``op``, ``page_size`` and the argument
    items, so a result can be reused; the key keeps each value's class out of the
    question by taking only exact ``int``/``str`` values (a ``bool`` or ``np.int64``
    equals an int of the same value but is validated differently) and goes to
    :func:`validate_args` otherwise. Errors are not memoised (they raise again). Returns
    a fresh dict each time, as :func:`validate_args` does.
    """
    key: list[Any] = [op, page_size]
    for k, v in args.items():
        c = v.__class__
        if c is not int and c is not str:
            return validate_args(op, args, page_size)
        key.append(k)
        key.append(v)
    tk = tuple(key)
    out = _VALID_MEMO.get(tk)
    if out is None:
        out = validate_args(op, args, page_size)
        if len(_VALID_MEMO) < _VALID_MEMO_MAX:
            _VALID_MEMO[tk] = out
        return dict(out)
    return dict(out)


def validate_args(op: str, args: dict[str, Any], page_size: int = 4096) -> dict[str, Any]:
    """Check and complete an operation's arguments.

    Returns:
        The arguments with defaults filled in, ints normalised.

    Raises:
        ValueError: ``"<arg>: <what was expected>"``.
    """
    if op not in OPS:
        raise ValueError(f"op: unknown operation {op!r} (known: {', '.join(OPS)})")
    spec = OPS[op]
    if not isinstance(args, dict):
        raise ValueError("args: expected a mapping")
    known = {a.name for a in spec.args}
    for k in args:
        if k not in known:
            raise ValueError(f"args.{k}: not an argument of {op} "
                             f"(takes {', '.join(known) or 'none'})")
    out: dict[str, Any] = {}
    for a in spec.args:
        if a.name not in args:
            if a.required:
                raise ValueError(f"args.{a.name}: required by {op}")
            out[a.name] = a.default
            continue
        v = args[a.name]
        where = f"args.{a.name}"
        if a.type in ("addr", "len", "int", "pin", "pid"):
            if isinstance(v, str):
                try:
                    v = int(v, 0)
                except ValueError:
                    raise ValueError(f"{where}: expected an integer, got {v!r}") from None
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{where}: expected an integer, got {v!r}")
            if a.type == "addr" and not (a.default == -1 and v == -1):
                if v < 0 or v >= TASK_SIZE or v % page_size:
                    raise ValueError(f"{where}: expected a page-aligned address below "
                                     f"{TASK_SIZE:#x}, got {v:#x}")
            if a.type == "len" and (v <= 0 or v % page_size or v > TASK_SIZE):
                raise ValueError(f"{where}: expected a positive multiple of {page_size}, got {v}")
            if a.type in ("int", "pin") and v < (1 if a.type == "pin" else 0):
                raise ValueError(f"{where}: expected a positive integer, got {v}")
            if a.type == "pid" and v < 0:
                raise ValueError(f"{where}: expected a pid >= 0, got {v}")
        elif a.type == "bool":
            if not isinstance(v, bool):
                raise ValueError(f"{where}: expected true or false, got {v!r}")
        elif a.type == "prot":
            try:
                parse_prot(v)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        elif a.type == "advice":
            if not isinstance(v, str) or v.upper().removeprefix("MADV_") not in ADVICES:
                raise ValueError(f"{where}: expected one of {', '.join(ADVICES)}, got {v!r}")
            v = v.upper().removeprefix("MADV_")
        out[a.name] = v
    return out
