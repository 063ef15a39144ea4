"""Scenarios: a schedule with an expectation, as one plain YAML file.

The same format serves hand-written regression scenarios (``scenarios/``) and the
schedules recorded from agent episodes, so a minimised finding can be promoted as it is.

Format (``version: 1``)::

    version: 1
    name: basic-cow-after-fork
    description: free text
    config:                 # cowenv.kernel.config.config_from_dict
      preset: classic       # or variant + flaws
      geometry: small       # x86_64 (512) / small (8) / tiny (4) / an int
      nr_frames: 256
    seed: 0                 # the run's numpy seed (recorded for agents' reproducibility)
    steps:
      - {tid: 1, do: mmap, args: {addr: 0x10000, length: 0x8000}}   # start + run to end
      - {tid: 1, do: write, args: {addr: 0x10000}, as: A}           # bind the result
      - {tid: 2, do: read, args: {addr: 0x10000}, expect: A, check: "No leak"}
      - {tid: 1, start: write, args: {addr: 0x10000}}               # start only
      - {tid: 1, step: 2}                                           # two preemption points
      - {tid: 1, until: "wp_page_copy:copied"}                      # step to a label
      - {tid: 1, finish: true}                                      # run to completion
      - {tid: 2, run: true}         # step while runnable: stops when done or blocked,
                                    # a no-op on an idle thread (schedules that must
                                    # run on several variants whose locking differs)
      - {event: fail_nth, tid: 1, n: 1}    # /proc/thread-self/fail-nth for tid 1's next op
      - {event: pressure_fail_nth, n: 1}   # n-th next allocation anywhere (old: fail_nth)
    expect:
      violation: null       # or {kind, site[, step]} or a list of them
    expect_by_variant:      # optional: expectation when run as another preset
      fixed: {violation: null}

``version`` is required in a file. ``tid`` is an int, ``kswapd`` (0), or a name bound by
an earlier ``fork``/``clone`` step's ``as`` (the child's thread: ``{tid: 1, do: fork, as:
CHILD}`` then ``{tid: CHILD, do: read, ...}``). Argument values and ``expect`` may name a
result bound earlier with ``as``. ``expect`` is an int, a bound name, ``{not: NAME}``,
``zero``, ``ok`` (>= 0), ``any-errno`` (< 0), an errno such as ``-EFAULT``, or a range
``{min: A, max: B}`` (inclusive, either end optional); a mismatch is a ``selftest``
violation whose site is the step's ``check`` text (the selftest's own message).
``expect_by_variant`` applies when a run uses another preset than the file's own; an entry
for the file's own preset must equal ``expect``. Resource sizes are capped
(:data:`cowenv.kernel.config.MAX_FRAMES`, :data:`MAX_RANGE_TABLES`). Files are loaded with
``yaml.safe_load`` and validated field by field; they can never run code. The README's
"Scenario format reference" lists every field.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .fileio import atomic_write_text
from .kernel import Kernel, KernelUsageError, make_kernel
from .kernel.config import PRESETS, KernelConfig, config_from_dict
from .kernel.ops import ERRNO_NAMES, OPS, validate_args
from .kernel.trace import KINDS, Violation, trace_hash

FORMAT_VERSION = 1
#: Words with a meaning of their own in ``tid``/``expect``; not usable as ``as`` names.
RESERVED_NAMES = ("kswapd", "zero", "ok", "any-errno")
#: Cap on the page tables a ``length`` may span: the simulated kernel walks a range one
#: PMD at a time, so a range of the whole address space (2**24 tables at 8 entries per
#: table) would take minutes; 65536 tables is 128 GiB at x86-64 geometry.
MAX_RANGE_TABLES = 1 << 16
#: Prefix of the key under which a fork/clone ``as`` name's thread id is kept at run time.
TID_KEY = "\x00tid:"
STEP_KINDS = ("do", "start", "step", "until", "finish", "run", "event")
MAX_UNTIL = 10_000


class ScenarioError(ValueError):
    """A malformed scenario: the message is one line naming file, field, expectation."""


@dataclass
class Expectation:
    """What a run must show: no violation (``violations == []``) or each listed one."""

    violations: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> str:
        """Short text for tables."""
        if not self.violations:
            return "none"
        return ", ".join(f"{v['kind']}@{v['site']}" + (f"#{v['step']}" if "step" in v else "")
                         for v in self.violations)

    def to_data(self) -> dict[str, Any]:
        """Plain data form."""
        if not self.violations:
            return {"violation": None}
        vs = [dict(v) for v in self.violations]
        return {"violation": vs[0] if len(vs) == 1 else vs}


@dataclass
class Scenario:
    """A parsed, validated scenario."""

    name: str
    description: str
    config: KernelConfig
    steps: list[dict[str, Any]]
    expect: Expectation
    expect_by_variant: dict[str, Expectation]
    seed: int = 0
    path: str = ""
    version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_data(self) -> dict[str, Any]:
        """Plain data in file order (for writing YAML)."""
        d: dict[str, Any] = {"version": self.version, "name": self.name}
        if self.description:
            d["description"] = self.description
        d["config"] = self.config.to_dict()
        d["seed"] = self.seed
        d["steps"] = [dict(s) for s in self.steps]
        d["expect"] = self.expect.to_data()
        if self.expect_by_variant:
            d["expect_by_variant"] = {k: v.to_data() for k, v in self.expect_by_variant.items()}
        d.update(self.extra)
        return d


# ------------------------------------------------------------------------------ parsing
def _int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{where}: expected an integer, got {v!r}")
    return v


def _parse_expectation(d: Any, where: str) -> Expectation:
    if d is None:
        return Expectation([])
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping with 'violation'")
    unknown = set(d) - {"violation", "violations"}
    if unknown:
        raise ValueError(f"{where}.{sorted(unknown)[0]}: unknown field (expected 'violation')")
    v = d.get("violation", d.get("violations"))
    if v is None or v == "none" or v == []:
        return Expectation([])
    items = v if isinstance(v, list) else [v]
    out = []
    for i, it in enumerate(items):
        w = f"{where}.violation" + (f"[{i}]" if isinstance(v, list) else "")
        if not isinstance(it, dict):
            raise ValueError(f"{w}: expected a mapping with kind and site")
        extra = set(it) - {"kind", "site", "step", "message"}
        if extra:
            raise ValueError(f"{w}.{sorted(extra)[0]}: unknown field (expected kind, site, step)")
        if it.get("kind") not in KINDS:
            raise ValueError(f"{w}.kind: expected one of {', '.join(KINDS)}, "
                             f"got {it.get('kind')!r}")
        if not isinstance(it.get("site"), str) or not it["site"]:
            raise ValueError(f"{w}.site: expected a kernel function name")
        e = {"kind": it["kind"], "site": it["site"]}
        if "step" in it:
            e["step"] = _int(it["step"], f"{w}.step")
        out.append(e)
    return Expectation(out)


def _tid(v: Any, where: str, threads: set[str] | None = None) -> int | str:
    if v == "kswapd":
        return 0
    if isinstance(v, str) and threads is not None and v in threads:
        return v
    if isinstance(v, str) and v.isidentifier():
        raise ValueError(f"{where}: {v!r} is not a thread name bound by an earlier fork or "
                         "clone step's 'as' (expected a thread id, 'kswapd' or such a name)")
    t = _int(v, where)
    if t < 0:
        raise ValueError(f"{where}: expected a thread id >= 0 or 'kswapd'")
    return t


def _expect_ok(ev: Any, bound: set[str]) -> bool:
    """Whether ``ev`` is a valid step ``expect`` (see the module docstring)."""
    if isinstance(ev, int) and not isinstance(ev, bool):
        return True
    if isinstance(ev, str):
        return (ev in bound or ev in ("zero", "ok", "any-errno")
                or ev.lstrip("-") in ERRNO_NAMES.values())
    if isinstance(ev, dict) and set(ev) == {"not"}:
        return isinstance(ev["not"], str) and ev["not"] in bound
    if isinstance(ev, dict) and ev and set(ev) <= {"min", "max"}:
        vals = [ev[k] for k in ("min", "max") if k in ev]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in vals):
            return False
        return len(vals) < 2 or ev["min"] <= ev["max"]
    return False


def _parse_status(v: Any, where: str) -> list[int | None]:
    """A ``move_pages`` step's expected status array: ints, errno names or null."""
    if not isinstance(v, list):
        raise ValueError(f"{where}: expected a list of node numbers, errnos like -EFAULT "
                         "or null (not written)")
    inv = {n: c for c, n in ERRNO_NAMES.items()}
    out: list[int | None] = []
    for j, x in enumerate(v):
        if x is None or (isinstance(x, int) and not isinstance(x, bool)):
            out.append(x)
        elif isinstance(x, str) and x.lstrip("-") in inv:
            out.append(-inv[x.lstrip("-")])
        else:
            raise ValueError(f"{where}[{j}]: expected a node number, an errno like -EFAULT "
                             f"or null, got {x!r}")
    return out


def _parse_step(s: Any, i: int, bound: set[str], page_size: int,
                threads: set[str] | None = None, pmd_size: int = 0) -> dict[str, Any]:
    if threads is None:
        threads = set()
    w = f"steps[{i}]"
    if not isinstance(s, dict):
        raise ValueError(f"{w}: expected a mapping")
    kinds = [k for k in STEP_KINDS if k in s]
    if len(kinds) != 1:
        raise ValueError(f"{w}: expected exactly one of {', '.join(STEP_KINDS)}")
    kind = kinds[0]
    allowed = {"do": {"tid", "do", "args", "as", "expect", "check", "status"},
               "start": {"tid", "start", "args", "as", "expect", "check", "status"},
               "step": {"tid", "step"}, "until": {"tid", "until"},
               "finish": {"tid", "finish"}, "run": {"tid", "run"},
               "event": {"event", "n", "tid"}}[kind]
    extra = set(s) - allowed
    if extra:
        raise ValueError(f"{w}.{sorted(extra)[0]}: unknown field for a '{kind}' step")
    out = dict(s)
    if kind == "event":
        if s["event"] not in ("fail_nth", "pressure_fail_nth"):
            raise ValueError(f"{w}.event: expected 'fail_nth' or 'pressure_fail_nth', "
                             f"got {s['event']!r}")
        if "tid" in s:
            if s["event"] != "fail_nth":
                raise ValueError(f"{w}.tid: only fail_nth is per thread")
            out["tid"] = _tid(s["tid"], f"{w}.tid")
        out["n"] = _int(s.get("n", 1), f"{w}.n")
        if out["n"] < 0:
            raise ValueError(f"{w}.n: expected >= 0")
        return out
    if "tid" not in s:
        raise ValueError(f"{w}.tid: required")
    out["tid"] = _tid(s["tid"], f"{w}.tid", threads)
    if kind in ("do", "start"):
        op = s[kind]
        if not isinstance(op, str) or op not in OPS:
            raise ValueError(f"{w}.{kind}: unknown operation {op!r} (known: {', '.join(OPS)})")
        if OPS[op].kthread != (out["tid"] == 0):
            who = "kswapd (tid 0)" if OPS[op].kthread else "a user thread (tid >= 1)"
            raise ValueError(f"{w}.tid: {op} runs on {who}")
        args = s.get("args", {}) or {}
        if not isinstance(args, dict):
            raise ValueError(f"{w}.args: expected a mapping")
        concrete = {k: (0x1000 if isinstance(v, str) and v in bound else v)
                    for k, v in args.items()}
        for k, v in args.items():
            if isinstance(v, str) and v in bound and OPS[op].args and k not in (
                    "pin", "pid", "addr", "nr"):
                raise ValueError(f"{w}.args.{k}: a bound name cannot stand for a {k}")
            if (isinstance(v, str) and v.isidentifier() and v not in bound
                    and k in ("pin", "pid", "addr", "nr")):
                raise ValueError(f"{w}.args.{k}: {v!r} is neither a number nor a name bound "
                                 "by an earlier step's 'as'")
        try:
            checked = validate_args(op, concrete, page_size)
        except ValueError as e:
            raise ValueError(f"{w}.{e}") from None
        n = checked.get("length")
        if pmd_size and isinstance(n, int) and n > MAX_RANGE_TABLES * pmd_size:
            raise ValueError(f"{w}.args.length: expected at most {MAX_RANGE_TABLES} page "
                             f"tables' worth ({MAX_RANGE_TABLES * pmd_size:#x} bytes at this "
                             f"geometry), got {n:#x}")
        out["args"] = dict(args)
        if "as" in s:
            if (not isinstance(s["as"], str) or not s["as"].isidentifier()
                    or s["as"] in RESERVED_NAMES):
                raise ValueError(f"{w}.as: expected a name (not {', '.join(RESERVED_NAMES)})")
            bound.add(s["as"])
            if op in ("fork", "clone"):
                threads.add(s["as"])
        if "expect" in s:
            ev = s["expect"]
            if not _expect_ok(ev, bound):
                raise ValueError(f"{w}.expect: expected an int, zero, ok, any-errno, an errno "
                                 f"like -EFAULT, a bound name, {{not: NAME}} or {{min: A, max: "
                                 f"B}}, got {ev!r}")
        if "check" in s and not isinstance(s["check"], str):
            raise ValueError(f"{w}.check: expected a string")
        if "status" in s:
            if op != "move_pages":
                raise ValueError(f"{w}.status: only move_pages has a status array")
            out["status"] = _parse_status(s["status"], f"{w}.status")
    elif kind == "step":
        out["step"] = _int(s["step"], f"{w}.step")
        if out["step"] < 1:
            raise ValueError(f"{w}.step: expected >= 1")
    elif kind == "until":
        if not isinstance(s["until"], str) or ":" not in s["until"]:
            raise ValueError(f"{w}.until: expected a preemption label 'function:point'")
    elif kind == "finish" and s["finish"] is not True:
        raise ValueError(f"{w}.finish: expected true")
    elif kind == "run" and s["run"] is not True:
        raise ValueError(f"{w}.run: expected true")
    return out


_HEX64 = frozenset("0123456789abcdef")


def _check_extras(extra: dict[str, Any], nsteps: int) -> None:
    """Validate the recording fields ``outcome`` and ``recorded`` (see cowenv.replay)."""
    if "outcome" in extra:
        o = extra["outcome"]
        if not isinstance(o, dict):
            raise ValueError("outcome: expected a mapping with trace_hash, steps, events, labels")
        unknown = set(o) - {"trace_hash", "steps", "events", "labels"}
        if unknown:
            raise ValueError(f"outcome.{sorted(unknown)[0]}: unknown field "
                             "(expected trace_hash, steps, events, labels)")
        h = o.get("trace_hash")
        if h is not None and not (isinstance(h, str) and len(h) == 64 and set(h) <= _HEX64):
            raise ValueError(f"outcome.trace_hash: expected 64 lowercase hex digits (SHA-256), "
                             f"got {h!r}")
        for k in ("steps", "events"):
            if k in o and _int(o[k], f"outcome.{k}") < 0:
                raise ValueError(f"outcome.{k}: expected >= 0")
        if "labels" in o:
            lab = o["labels"]
            if not isinstance(lab, list) or not all(x is None or isinstance(x, str) for x in lab):
                raise ValueError("outcome.labels: expected a list of preemption labels or null")
            if len(lab) != nsteps:
                raise ValueError(f"outcome.labels: expected one entry per step ({nsteps}), "
                                 f"got {len(lab)}")
    if "recorded" in extra:
        r = extra["recorded"]
        if not isinstance(r, dict):
            raise ValueError("recorded: expected a mapping of provenance fields")
        for k, v in r.items():
            if not isinstance(k, str) or not (v is None or isinstance(v, str | int | float | bool)):
                raise ValueError(f"recorded.{k}: expected a plain value (string or number)")


def parse_scenario(data: Any, path: str = "<data>") -> Scenario:
    """Validate plain data into a :class:`Scenario`.

    Raises:
        ScenarioError: one line: ``<path>: <field>: <what was expected>``.
    """
    try:
        if not isinstance(data, dict):
            raise ValueError("top level: expected a mapping")
        known = {"version", "name", "description", "config", "seed", "steps", "expect",
                 "expect_by_variant", "outcome", "recorded"}
        extra = set(data) - known
        if extra:
            raise ValueError(f"{sorted(extra)[0]}: unknown field")
        version = data.get("version", FORMAT_VERSION)
        version = _int(version, "version")
        if version > FORMAT_VERSION:
            raise ValueError(f"version: file is format {version}, this cowenv reads up to "
                             f"{FORMAT_VERSION}; upgrade cowenv")
        if version < 1:
            raise ValueError("version: expected >= 1")
        name = data.get("name", Path(path).stem)
        if not isinstance(name, str) or not name:
            raise ValueError("name: expected a non-empty string")
        desc = data.get("description", "") or ""
        if not isinstance(desc, str):
            raise ValueError("description: expected a string")
        cfg_d = data.get("config", {}) or {}
        if not isinstance(cfg_d, dict):
            raise ValueError("config: expected a mapping")
        for key in ("preset", "variant", "fault_mode"):
            if key in cfg_d and not isinstance(cfg_d[key], str):
                raise ValueError(f"config.{key}: expected a name, got {cfg_d[key]!r}")
        try:
            cfg = config_from_dict(cfg_d)
        except ValueError as e:
            raise ValueError(f"config.{e}") from None
        seed = _int(data.get("seed", 0), "seed")
        steps_d = data.get("steps")
        if not isinstance(steps_d, list):
            raise ValueError("steps: expected a list")
        bound: set[str] = set()
        threads: set[str] = set()
        steps = [_parse_step(s, i, bound, cfg.page_size, threads, cfg.pmd_size)
                 for i, s in enumerate(steps_d)]
        expect = _parse_expectation(data.get("expect"), "expect")
        ebv: dict[str, Expectation] = {}
        e2 = data.get("expect_by_variant", {}) or {}
        if not isinstance(e2, dict):
            raise ValueError("expect_by_variant: expected a mapping of preset -> expectation")
        for k, v in e2.items():
            if k not in PRESETS:
                raise ValueError(f"expect_by_variant.{k}: expected one of {', '.join(PRESETS)}")
            ebv[k] = _parse_expectation(v, f"expect_by_variant.{k}")
        own = preset_of(cfg)
        if own in ebv and ebv[own].violations != expect.violations:
            raise ValueError(f"expect_by_variant.{own}: the file's own preset; when it runs "
                             f"as {own} the expectation is `expect` (expected this entry to "
                             f"equal `expect`, or no entry)")
        for i, st in enumerate(steps):
            if isinstance(st.get("tid"), int) and st["tid"] > cfg.max_threads:
                raise ValueError(f"steps[{i}].tid: expected 0 (kswapd) to {cfg.max_threads} "
                                 f"(config.max_threads), got {st['tid']}")
        extra_d = {k: data[k] for k in ("outcome", "recorded") if k in data}
        _check_extras(extra_d, len(steps))
        return Scenario(name, desc, cfg, steps, expect, ebv, seed, path, version, extra_d)
    except ValueError as e:
        # One line even when a field name (or the path) holds a line break.
        raise ScenarioError(_one_line(f"{path}: {e}")) from None
    except (TypeError, KeyError, AttributeError) as e:  # last resort: still one line
        raise ScenarioError(_one_line(
            f"{path}: malformed scenario ({type(e).__name__}: {e})")) from None


def _one_line(msg: str) -> str:
    """``msg`` with its line breaks escaped, so an error stays one line."""
    return msg.replace("\r", "\\r").replace("\n", "\\n")


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate one scenario file (safe YAML only)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ScenarioError(f"{p}: cannot read file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ScenarioError(f"{p}: byte {e.start}: not UTF-8 text (expected a YAML file)") from None
    try:
        data = yaml.load(text, Loader=_SafeLoader)  # a safe loader (no Python objects)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "document"
        prob = getattr(e, "problem", None) or "invalid YAML"
        raise ScenarioError(f"{p}: {where}: not valid YAML ({prob})") from None
    if isinstance(data, dict) and "version" not in data:
        raise ScenarioError(f"{p}: version: required in a file (expected `version: "
                            f"{FORMAT_VERSION}` as the first line)")
    return parse_scenario(data, str(p))


def collect(paths: list[str]) -> list[Path]:
    """Expand files and folders into scenario files (``*.yaml``/``*.yml``), sorted."""
    out: list[Path] = []
    for s in paths:
        p = Path(s)
        if p.is_dir():
            out.extend(sorted(x for x in p.rglob("*") if x.suffix in (".yaml", ".yml")))
        elif p.exists():
            out.append(p)
        else:
            raise ScenarioError(f"{p}: no such file or folder")
    return out


#: libyaml's safe loader/dumper when available (same documents, ~10x faster).
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_SafeDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def dump_scenario(data: dict[str, Any]) -> str:
    """Return readable YAML for scenario data: block style, one flow-style line per step.

    ``yaml.safe_load(dump_scenario(d)) == d`` for any plain scenario data.
    """
    out = []
    for key, v in data.items():
        if key == "steps" and isinstance(v, list) and v:
            out.append("steps:")
            out.extend("  - " + yaml.dump(s, Dumper=_SafeDumper, sort_keys=False,
                                          default_flow_style=True, width=1 << 20).rstrip("\n")
                       for s in v)
        else:
            flow = None if isinstance(v, dict | list) and v else False
            out.append(yaml.dump({key: v}, Dumper=_SafeDumper, sort_keys=False,
                                 default_flow_style=flow, width=100).rstrip("\n"))
    return "\n".join(out) + "\n"


def save_scenario(sc: Scenario | dict[str, Any], path: str | Path, *, mkdir: bool = True
                  ) -> None:
    """Write a scenario atomically (temp file + rename), readable YAML.

    Args:
        sc: The scenario or its plain data.
        path: Destination file.
        mkdir: Create missing folders (False for a user's ``-o``: a missing folder is an
            ``OSError``).
    """
    data = sc.to_data() if isinstance(sc, Scenario) else sc
    atomic_write_text(path, dump_scenario(data), mkdir=mkdir)


# ------------------------------------------------------------------------------ running
def preset_of(cfg: KernelConfig) -> str | None:
    """Name of the preset a config equals, if any."""
    if cfg.variant == "classic":
        return "classic"
    for name, (variant, flaws) in PRESETS.items():
        if variant == cfg.variant and set(flaws) == set(cfg.flaws):
            return name
    return None


def override_config(cfg: KernelConfig, variant: str | None, flaws: list[str] | None
                    ) -> KernelConfig:
    """Apply ``--variant`` (a variant or preset name) and ``--flaws`` overrides."""
    d = cfg.to_dict()
    if variant is not None:
        if variant in PRESETS:
            d["variant"], d["flaws"] = PRESETS[variant][0], list(PRESETS[variant][1])
        else:
            d["variant"] = variant
            if variant == "classic":
                d["flaws"] = []
    if flaws is not None:
        d["flaws"] = flaws
        if flaws:
            d["variant"] = "cowpte"
    return config_from_dict(d)


@dataclass
class RunResult:
    """Outcome of running a scenario."""

    name: str
    path: str
    expected: Expectation
    violations: list[Violation]
    passed: bool
    error: str | None
    steps: int
    trace_hash: str
    kernel: Kernel | None = None
    config: KernelConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary.

        ``config`` is the kernel configuration that ran (after ``--variant``/``--flaws``),
        ``preset`` its preset name (None for another flaw set).
        """
        cfg = self.config.to_dict() if self.config is not None else None
        pre = preset_of(self.config) if self.config is not None else None
        return {"name": self.name, "path": self.path, "expected": self.expected.describe(),
                "config": cfg, "preset": pre,
                "passed": self.passed, "error": self.error, "steps": self.steps,
                "trace_hash": self.trace_hash,
                "violations": [{"kind": v.kind, "site": v.site, "signature": v.signature,
                                "step": v.step, "message": v.message} for v in self.violations]}


def _resolve(v: Any, names: dict[str, Any]) -> Any:
    if isinstance(v, str) and v in names:
        return names[v]
    return v


def _expected_value(ev: Any, names: dict[str, Any]) -> tuple[str, Any]:
    if isinstance(ev, dict) and "not" in ev:
        return "ne", names[ev["not"]]
    if isinstance(ev, dict):
        return "range", (ev.get("min"), ev.get("max"))
    if ev == "zero":
        return "eq", 0
    if ev == "ok":
        return "range", (0, None)
    if ev == "any-errno":
        return "range", (None, -1)
    if isinstance(ev, str) and ev in names:
        return "eq", names[ev]
    if isinstance(ev, str):
        inv = {n: c for c, n in ERRNO_NAMES.items()}
        return "eq", -inv[ev.lstrip("-")]
    return "eq", ev


class StepError(Exception):
    """A schedule step that cannot be carried out (illegal at that point)."""


def resolve_tid(tid: int | str, names: dict[str, Any]) -> int:
    """The thread id a step's ``tid`` stands for (an int, or a fork/clone ``as`` name).

    Raises:
        StepError: the name's fork or clone failed or has not completed.
    """
    if isinstance(tid, int):
        return tid
    try:
        return int(names[TID_KEY + tid])
    except KeyError:
        raise StepError(f"thread {tid!r} does not exist (its fork or clone failed or has "
                        "not finished)") from None


def apply_step(k: Kernel, s: dict[str, Any], names: dict[str, Any], pending: dict[int, dict],
               index: int) -> None:
    """Carry out one scenario step on kernel ``k``.

    Raises:
        StepError: the step is illegal in the current state (e.g. thread not idle).
    """

    def complete(tid: int) -> None:
        spec = pending.pop(tid, None)
        if spec is None:
            return
        res = k.threads[tid].result
        if "as" in spec:
            names[spec["as"]] = res
        op = spec.get("do") or spec.get("start")
        if "as" in spec and op in ("fork", "clone") and isinstance(res, int) and res > 0:
            proc = k.procs.get(res) if op == "fork" else None
            names[TID_KEY + spec["as"]] = proc.tids[0] if proc is not None else res
        if "expect" in spec:
            how, want = _expected_value(spec["expect"], names)
            if how == "range":
                lo, hi = want
                ok = isinstance(res, int) and (lo is None or res >= lo) and (
                    hi is None or res <= hi)
                text = {(0, None): "ok (>= 0)", (None, -1): "any errno (< 0)"}.get(
                    want, f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}")
            else:
                ok = (res == want) if how == "eq" else (res != want)
                text = f"{'not ' if how == 'ne' else ''}{want}"
            if not ok:
                site = spec.get("check") or f"{op}"
                k.report("selftest", site, f"step {spec['_i']}: {op} returned {res}, "
                                           f"expected {text}")
        if "status" in spec:
            out = k.threads[tid].out or {}
            got = out.get("status")
            if got != spec["status"]:
                site = spec.get("check") or f"{op}"
                k.report("selftest", site, f"step {spec['_i']}: {op} status {got}, "
                                           f"expected {spec['status']}")

    def step_once(tid: int) -> str:
        try:
            label = k.step(tid)
        except KernelUsageError as e:
            raise StepError(str(e)) from None
        if k.threads[tid].gen is None:
            complete(tid)
        return label

    if "event" in s:
        if "tid" in s:
            k.event("fail_nth", n=s["n"], tid=s["tid"])
        else:
            k.event(s["event"], n=s["n"])
        return
    tid = resolve_tid(s["tid"], names)
    if "do" in s or "start" in s:
        op = s.get("do") or s.get("start")
        args = {a: _resolve(v, names) for a, v in (s.get("args") or {}).items()}
        try:
            k.start(tid, op, args)
        except KernelUsageError as e:
            raise StepError(str(e)) from None
        pending[tid] = dict(s, _i=index)
        if "do" in s:
            for _ in range(MAX_UNTIL):
                if k.threads[tid].gen is None:
                    return
                if not k.is_runnable(k.threads[tid]):
                    raise StepError(f"thread {tid} blocked in {op} at {k.threads[tid].label}")
                step_once(tid)
            raise StepError(f"thread {tid} did not finish {op}")
        return
    if "step" in s:
        for _ in range(s["step"]):
            step_once(tid)
        return
    if "until" in s:
        for _ in range(MAX_UNTIL):
            t = k.threads.get(tid)
            if t is None or t.gen is None:
                raise StepError(f"thread {tid} finished before reaching {s['until']}")
            step_once(tid)
            if k.threads[tid].label == s["until"]:
                return
        raise StepError(f"thread {tid} did not reach {s['until']}")
    if "run" in s:
        for _ in range(MAX_UNTIL):
            t = k.threads.get(tid)
            if t is None or t.gen is None or not k.is_runnable(t):
                return
            step_once(tid)
        raise StepError(f"thread {tid} did not finish or block")
    if "finish" in s:
        for _ in range(MAX_UNTIL):
            t = k.threads.get(tid)
            if t is None or t.gen is None:
                return
            step_once(tid)
        raise StepError(f"thread {tid} did not finish")


def expectation_for(sc: Scenario, cfg: KernelConfig) -> Expectation:
    """The expectation that applies when running ``sc`` under ``cfg``."""
    if cfg != sc.config:
        pre = preset_of(cfg)
        if pre is not None and pre in sc.expect_by_variant:
            return sc.expect_by_variant[pre]
    return sc.expect


def matches(exp: Expectation, vs: list[Violation]) -> bool:
    """Whether observed violations ``vs`` satisfy ``exp``."""
    if not exp.violations:
        return not vs
    for e in exp.violations:
        if not any(v.kind == e["kind"] and v.site == e["site"]
                   and ("step" not in e or v.step == e["step"]) for v in vs):
            return False
    return True


def run_scenario(sc: Scenario, variant: str | None = None, flaws: list[str] | None = None,
                 keep_kernel: bool = False, final_check: bool = True) -> RunResult:
    """Run ``sc`` on a fresh kernel (optionally overriding variant/flaws)."""
    cfg = override_config(sc.config, variant, flaws) if (variant or flaws is not None) \
        else sc.config
    exp = expectation_for(sc, cfg)
    k = make_kernel(cfg)
    names: dict[str, Any] = {}
    pending: dict[int, dict] = {}
    error = None
    for i, s in enumerate(sc.steps):
        try:
            apply_step(k, copy.deepcopy(s), names, pending, i)
        except StepError as e:
            error = f"step {i}: {e}"
            break
    if final_check and error is None and k.oracle is not None and k.quiescent():
        k.oracle.check_accounting()
    vs = dedup(k.violations)
    passed = error is None and matches(exp, vs) and not k.defects
    return RunResult(sc.name, sc.path, exp, vs, passed, error, k.step_no,
                     trace_hash(k.events), k if keep_kernel else None, cfg)


def dedup(vs: list[Violation]) -> list[Violation]:
    """First occurrence of each signature, in order."""
    seen: set[str] = set()
    out = []
    for v in vs:
        if v.signature not in seen:
            seen.add(v.signature)
            out.append(v)
    return out
