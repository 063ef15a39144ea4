"""Greybox: a coverage-guided schedule fuzzer (AFL/syzkaller-style) as an agent.

Why an agent: a campaign's worker loop plays episodes of catalogue actions with the
generator of ``SeedSequence([seed, w, e])`` and records the schedule of whatever it
found. A corpus schedule *is* a list of catalogue indices (stable for a configuration),
so replaying a mutated one is just choosing those actions: the fuzzer fits the loop,
the step budget, findings, minimisation and resume unchanged, and is measured by the
same benchmark as the other agents.

Per episode (``rng`` is the episode's only randomness):

1. The first episodes play the **seed plans** (:func:`cowenv.greybox.seed_plan`): the
   scenarios of ``scenarios/`` (minus ``seed_exclude``) and, in a campaign, the
   findings already in the out dir, mapped onto this configuration's catalogue.
2. Afterwards a parent is chosen from the corpus (entries reaching the rarest features,
   or favoured entries, the less-picked of two; :meth:`cowenv.greybox.Corpus.choose`),
   cut at one of the points where it reached something new
   (:meth:`cowenv.greybox.Corpus.choose_cut`) and mutated
   (:func:`cowenv.greybox.mutate`), or with probability ``extend`` replayed as it is;
   with probability ``explore`` (or while the corpus is empty) the episode is purely
   random.
3. The child is played: an action that is illegal when its turn comes is skipped; after
   the child's last action the episode goes on with **kind-first** random choice (the
   kind of action with the soak's weights, then an entry of that kind; a pressure
   event with probability ``event_prob``; ``choice``); a start chosen so is preceded
   by its thread's ``fail_nth`` with probability ``fault_prob`` (per-call fault
   injection, as syzkaller's).
4. Each step's features (:class:`cowenv.greybox.FeatureTracker`) are collected; if the
   episode reached a feature the corpus has not, its actions, trimmed to the last step
   that reached a new feature, join the corpus (and, in a campaign, are written to
   ``OUT/greybox/`` as a replayable scenario file).

Sharing: every ``sync_every`` episodes the agent loads the corpus files other workers of
the campaign wrote to ``OUT/greybox/`` since its last look (as AFL's ``-M/-S`` sync).
With one worker, or ``sync_every=0``, a worker's episodes depend only on
``(seed, worker, settings)``; with sharing, what another worker has written by then
depends on timing, as in AFL. Resume: ``state_dict`` lists the corpus files the agent had
loaded or written; a resumed worker reloads exactly those.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cowenv.greybox import (
    DEFAULT_MUTATIONS,
    MUTATIONS,
    REC_ACTIONS,
    REC_CATALOGUE,
    REC_CUTS,
    REC_FEATURES,
    REC_STATES,
    WHOLE_VMA,
    CatalogueIndex,
    Corpus,
    CorpusEntry,
    FeatureTracker,
    catalogue_digest,
    entry_class,
    mutate,
    scenario_files,
    seed_plan,
)
from cowenv.kernel import KSWAPD_TID
from cowenv.kernel.memory import PG_allocated, PG_anon_exclusive
from cowenv.kernel.pgtable import PFN_SHIFT, PTE_PRESENT, PTE_WRITE

from .base import CHOICES, Agent, KindChooser, uniform_legal
from .greybox_faultctx import Call, Context, FaultContexts
from .greybox_race import RacePairs
from .greybox_triage import FaultTriage, _Job
from .greybox_window import WindowStage

if TYPE_CHECKING:
    from cowenv.env import CowEnv

#: Default seed folder: the repository's scenarios.
DEFAULT_SEEDS = str(Path(__file__).resolve().parent.parent / "scenarios")
CORPUS_DIR = "greybox"
_PLAN_STEP_LIMIT = 64  # runs spent on one "until"/"finish" plan item at most


class GreyboxAgent(RacePairs, FaultTriage, FaultContexts, WindowStage, Agent):
    """Coverage-guided schedule fuzzing (see the module docstring).

    Args:
        feedback: ``interleaving`` (default) or ``label`` (:data:`cowenv.greybox.FEEDBACKS`).
        seeds: Scenario files or folders to seed the corpus from (default: the
            repository's ``scenarios/``); ``[]`` for none.
        seed_exclude: Scenario names (file stems) to leave out of the seeds.
        explore: Probability of a purely random episode.
        run_prob: In random choice, probability of running a thread (when one can run).
        event_prob: In random choice, probability of a pressure event (when legal).
        sync_every: Episodes between loads of other workers' corpus files (0 = never).
        corpus_dir: Where corpus files go (set by campaigns: ``OUT/greybox``); None keeps
            the corpus in memory.
        cull_every: Episodes between corpus minimisations (keep the favoured set only).
        extend: Probability that a parent is replayed unmutated (only the random
            continuation after it differs).
        choice: How random actions are chosen: ``weighted`` (default; kind first with
            the soak's weights, as the random agent), another of
            :data:`cowenv_agents.base.CHOICES`, or ``thread`` (a runnable thread with
            probability ``run_prob``, else an idle thread, an operation, a template;
            ``run_prob`` is used only here).
        fault_prob: In random choice, probability that a chosen start is preceded by a
            ``fail_nth`` event of its thread (syzkaller's per-call fault injection:
            the fault is armed right before the call it should hit).
        use_prob: In random choice, probability of a *use* when the kernel holds
            something stale that an access would use (:meth:`_use`): a load through a
            paging-structure-cache entry of a freed table, a load or store through a
            stale TLB entry, a device read of a pin whose page sits in a COW-shared
            table (or is not exclusive), or a store by its process to that page.
            Off by default (0): measured worse (README "Greybox").
        tlb_features: Include the TLB staleness features
            (:class:`cowenv.greybox.FeatureTracker`); off by default, measured worse.
        mutations: The mutations to use (default
            :data:`cowenv.greybox.DEFAULT_MUTATIONS`).
        race_prob: In random choice, probability of a *race pair* (:meth:`_race`):
            a thread's operation run to a point, then another related thread's
            operation on the page table the first is inside, run to its end (or until
            it blocks) before the first goes on; the pairs of (pause label, operation
            variant) tried fewest times so far first. 0: off.
        race_len: Most points each operation of a race pair is run for.
        race_episodes: Probability that an episode (after the seed plans) is a *race
            episode*: from the workload's state, or 1 in 4 from a corpus entry's cut
            point, a race pair starts at every random step where one can. Default 0.2
            (README "Greybox, round 5": 17 of 23 flaws in 8/8 against 15 without, on
            the same tree); 0 turns race episodes off (``greybox-norace``).
        fault_triage: syzkaller's fault-injection triage (``failCall``): each call
            that reached a new *code* feature (:attr:`cowenv.greybox.FeatureTracker.code`:
            the call's variant on a new state of the page it addresses, a new
            injected-failure site) is queued; a queued job replays the episode up to
            there with the call's thread's ``fail_nth`` n = 1 armed right before the
            call, and while the trace shows the fault fired inside the call, again with
            n + 1 (up to the catalogue's largest n). Jobs are taken rarest first
            (:meth:`_triage_pop`). Off by default.
        triage_prob: With ``fault_triage``, probability that an episode after the seed
            plays takes a queued job (when there is one and it is not a random one).
        fault_features: Whether injected allocation failures (operation, site) are
            corpus features (default: with ``fault_triage`` or ``explore_max``).
        arg_features: Whether call argument states (operation, variant, state of the
            page it addresses: :func:`cowenv.greybox.call_context`) are corpus features.
        cut_fault: Probability that an unmutated replay of a parent's prefix arms a
            fault on the call that reached the cut's new feature (sampled triage,
            :meth:`_cut_fault_child`). Off by default; measured no better.
        explore_max: Adaptive exploration (:meth:`explore_rate`): the rate of purely
            random episodes rises from ``explore`` to ``explore_max`` while no episode
            reaches a new code feature; None (default) keeps ``explore`` fixed.
        explore_window: Episodes without a new code feature at which the rate reaches
            ``explore_max``.
        fault_contexts: Context-sensitive fault injection
            (:class:`cowenv_agents.greybox_faultctx.FaultContexts`): outside the seed
            plays and the calls of race pairs, the first ``fault_contexts``
            calls of user threads in each *context* (operation, variant, state of the
            page it addresses: :func:`cowenv.greybox.call_context`) get their thread's
            ``fail_nth`` n armed right before them: per template, n = 1 first, n + 1
            next if the failure fired inside the call, else 1 again (syzkaller's
            ``failCall`` loop, one try per call in that context instead of one replay
            per try; FIFUZZ's calling contexts). Default 4 (round 6); 0: off (the round-5
            agent, ``--agents greybox-r5`` in the bug-finding benchmark).
        window_prob: Systematic windows (:mod:`cowenv_agents.greybox_window`): the
            probability that an operation working inside a page table shared between
            mms, started at a quiescent point by a thread with a sibling, has the
            window of operations around it searched (CHESS from the cut before it); a
            violation the search shows is played as the next episode. Default 1.0 (with
            ``window_decay`` 4 and ``window_share`` 0.3: round 6); 0: off.
        window_bound: Preemption bound of a window's search.
        window_cap: Most transitions one window's search executes (each counts as a
            step: ``offline_steps``).
        window_uses: Accesses to the shared table by the sibling thread in a window.
        window_decay: ``d``: an operation (kind and variant) around which ``n`` windows
            were searched opens the next with probability ``window_prob * d / (d + n)``
            (0: no decay; default 4).
        window_share: Windows open only while the steps they took are at most this
            share of all steps so far (default 0.3; 0.2 at first, measured below 0.3
            over 16 seeds: README "Greybox, round 6 — the default now").
        window_release: Probability that a step ending an operation at a quiescent
            point opens a *table-release window*
            (:meth:`cowenv_agents.greybox_window.WindowStage._release_observe`): a
            ``munmap`` of a whole COW-shared table, by a thread whose sibling can load
            from it, searched against the other mm's release. Default 0.1 (round 7);
            0: off.
        window_release_bound: Preemption bound of a table-release window's search
            (None: ``window_bound``). The free/use/free triangle's stale walk can need
            two preemptions (measured: ``free-pmd-deferred-flush`` seed 32, missed by
            round 11 whose nine release windows at bound 1 showed nothing; at bound 2
            one shows the stale walk with two). Default None: measured over seeds
            0-55 of that flaw and ``mremap-ignores-break-failure`` (``greybox-rb2``
            with round 12's other settings) no better than bound 1 (README "Greybox,
            round 12").
        window_kthread: Probability that a step ending an operation at a quiescent
            point, in a state that has one, opens a *kernel-thread window*
            (:meth:`cowenv_agents.greybox_window.WindowStage._kthread_observe`): the
            kernel thread's reclaim or compaction of a page against a ``fork`` of the
            page's process (COW PTE on), searched with ``window_bound`` preemptions.
            Default 1 (round 17: README "Greybox, round 17"); 0: off (rounds 1-16).
        window_kthread_share: Kernel-thread windows open only while their steps are at
            most this share of all steps (default 0.1); ``window_share`` then bounds
            the other windows' steps alone.
        window_faults: Probability that a step ending an operation at a quiescent
            point, in a state that has calls meeting a COW-shared table, opens a
            *fault window* (:meth:`cowenv_agents.greybox_window.WindowStage._fault_observe`):
            up to ``window_fault_calls`` of those calls, each run alone from that
            state with ``fail_nth`` n = 1 .. ``window_fault_n``. Default 1 (round 17);
            0: off (rounds 1-16).
        window_faults_share: Fault windows open only while their steps are at most this
            share of all steps (default 0.05); ``window_share`` does not count them.
        window_fault_calls: Calls tried per fault window (default 12).
        window_fault_n: ``fail_nth`` values tried per call (default 2: 1 and 2).
        window_kthread_multi: Kernel-thread windows aim only at pages whose PMD spans two
            or more VMAs, where there are any. On by default from round 18 (README
            "Greybox, round 18"); off: round 17.
        window_kthread_gup: Kernel-thread windows may also put a sibling thread's
            GUP-fast ``pin`` of a page against the ``fork`` (the other lockless walker
            of the mm; the kind, kernel thread or GUP-fast, chosen first, alike). On by
            default from round 18; off: round 17.
        window_forks: Probability that a step ending an operation at a quiescent point,
            where an idle thread's mm is in a corner fork layout with data, opens a
            *fork-layout window*
            (:meth:`cowenv_agents.greybox_window.WindowStage._fork_observe`): that
            thread's ``fork`` run alone from the state now. Default 1 (round 18); 0:
            off (rounds 1-17).
        window_forks_share: Fork-layout windows open only while their steps are at
            most this share of all steps (default 0.03).
        window_release_nosplit: Table-release windows take a ``munmap`` that splits no
            VMA at a COW-protected PMD, where there is one
            (:func:`cowenv.greybox.release_window_candidates`): the split's
            ``break_cow_pte`` flushes the sibling's cached walk before the drop, and
            the stale walk then needs a second preemption. On by default from round
            19 (README "Greybox, round 19"); off: rounds 7-18.
        window_whole_release: The other holder's release in a window is its ``exit``
            or a ``munmap`` covering the whole table (``free_pgtables`` drops its
            reference), as the release window's own ``munmap`` is; off (round 11), any
            ``munmap`` meeting the PMD, a part of the table too (a zap of some
            entries, which releases nothing). On by default from round 12.
        race_settle: After a race pair (``A`` resumed to its end), the other threads
            still inside an operation run until the kernel is quiescent
            (:meth:`cowenv_agents.greybox_race.RacePairs._race_settle`), so that the
            quiescent-point checks see the state the pair left. On by default from
            round 12; off: round 11.
        race_walk: A race pair's ``A`` paused inside a walk over a range of entries
            (:attr:`cowenv.kernel.sched.Thread.walk`) gets a ``B`` that addresses a
            populated entry of that range, when one can
            (:meth:`cowenv_agents.greybox_race.RacePairs._race`). On by default from
            round 12; off: round 11.
        race_nest: Probability that a race pair is *nested* (a second preemption, as
            CHESS's bound 2 allows): ``B`` stops at a point inside a page table too (1
            in 3 at each, as ``A`` does), ``A`` is resumed to its end, then ``B``
            (:meth:`cowenv_agents.greybox_race.RacePairs._race`); needs
            ``race_settle``, which runs ``B`` on. 0: off.
        fault_n_context: The ``fail_nth`` n of a context's next try follows the
            context (the last try of any template in it fired: n + 1), not the call's
            template (:meth:`cowenv_agents.greybox_faultctx.FaultContexts._fc_arm`):
            with ``fault_ranges``, the templates of a context allocate alike (an
            ``mprotect(PROT_NONE)`` of part of a VMA ending at a PMD boundary breaks the
            table at the split first, its walker's second), and a context's few tries
            otherwise go to n = 1 on a new template each time.
        plan_cycle: Probability that an episode after the first pass over the seed
            plans (and not a race episode) replays one of them, with a fresh random
            continuation (``plan_tail``) and fresh tie-breaks of its mapping: AFL's
            queue cycles. The plans are replayed in cycles, each in a new random order
            of all of them. Default 0.5 (round 15; round 14 had 0.3, with
            ``plan_tail_faults``); 0: each plan is played once (round 13).
        plan_tail_faults: Whether the random continuation after a seed plan
            (``plan_tail``) gets context-sensitive fault tries (``fault_contexts``)
            like the random part of other episodes; the plan itself never does. On
            by default from round 14; off: none in a plan's episode (round 13).
        plan_race: Probability that a seed plan's random continuation (``plan_tail``)
            is played as race pairs (:meth:`_race`, as in a race episode) from the
            state the plan left: Razzer's pairs run from the states its seeds reach,
            and a plan's end state is one a scenario author chose (two VMAs of
            different anon_vmas in a COW-shared PMD, a migration entry in a shared
            table). Counter ``plan_races``. Only in the replays after the first pass
            (``plan_cycle``), unless ``plan_race_first``. 0: off, the default
            (measured on round 15, README "Greybox, round 15": 0.3 found 1,285 of
            1,288 runs on seeds 0-55 against 1,283, but 365 of 368 on the fresh seeds
            72-87 against 367; with ``plan_race_first``, the same runs found as
            without and a 15 % higher geometric mean).
        plan_race_first: Whether ``plan_race`` applies to the first pass over the
            seed plans too (their plain continuations find many rows early).
        race_kthread_b: The kernel thread's reclaim and compaction may be a race pair's
            ``B`` (aimed at a page mapped through ``A``'s tables, or untargeted), not its
            ``A`` (``race_kthreads`` makes it both): a fork paused after sharing a PMD,
            then kcompactd migrating a page of a later VMA of it, which dup_mmap has not
            linked into the child's rmap yet (v4's ``fork-shares-migration-entry``).
        race_kthread_a: Probability that a race pair's ``A`` is the kernel thread's
            reclaim or compaction (when it is idle and a user thread is too): kswapd
            paused inside its rmap walk while a fork runs (v4's ``rmap-stale-table``:
            the fork blocks in ``anon_vma_fork`` on the anon_vma lock kswapd holds),
            or, nested (1 in 2 of these pairs), kcompactd paused with its migration
            entry in place while a fork stops after sharing the table
            (``fork-shares-migration-entry``). 0: off (``race_kthreads`` makes the
            kernel thread one more candidate ``A`` among the user threads).
        content_features: Whether what the COW-shared tables hold at the end of each
            operation (:func:`cowenv.greybox._shared_contents`: a NUMA-hinting, swap,
            migration or pinned entry in a table two mms map, a thread's cached walk
            through one) is a corpus feature. On by default from round 7 (with
            ``tail`` 32 and ``window_release`` 0.1: README "Greybox, round 7");
            ``--agents greybox-r6`` in the bug-finding benchmark is the agent without
            the three.
        tail: Mean length of the random continuation after a corpus parent's child
            (drawn per episode, geometric); then the agent is :meth:`done` and the
            harness's teardown observes the state the child left (AFL's test cases
            have their own length: a short child is one more execution of the state
            it reached, not 200 random actions away from it). Default 32 (round 7);
            0: the child's episode runs to ``env.max_steps`` as every other episode.
        race_block_ops: Whether a race pair's ``B`` whose variant was never tried
            against a lock class ``A`` holds counts as blocked on it when every variant
            of its operation tried against that class blocked at its first point (an
            ``mremap`` of a new length blocks on ``mmap_lock`` held for write as every
            other ``mremap`` did; a GUP-fast ``pin`` does not inherit the slow pin's
            block, since the fast variants did not block). Off: every variant learns
            its own blocks (round 7). On by default from round 8.
        race_meet: Whether a race pair's ``B`` template is drawn, within its group,
            from those that address a populated entry of the tables ``A`` is in
            (:func:`cowenv.greybox.meets_entries`, Snowboard's memory communication at
            PTE grain), when there are any. On by default from round 8; off: any
            template of the group (round 7).
        race_kthreads: Whether the kernel thread (kswapd/kcompactd: a reclaim or a
            compaction, targeted at a page or in LRU order) takes part in race pairs,
            as ``A`` (paused inside the table its rmap walk holds locked, or its target
            page's) and as ``B`` (aimed at a page of the tables ``A`` is in): the
            reclaim paused mid-rmap-walk and the migration that completes while a fork
            is half done. Off: user threads only (round 7).
        plan_tail: Mean length of the random continuation after a seed plan has been
            played (geometric, at least one action); then the agent is :meth:`done` and
            the harness's teardown observes. Default 64 (round 8); 0: the plan's
            episode runs to ``env.max_steps`` (round 7).
        state_pick: Probability that a corpus child starts from a *state* instead of
            a parent drawn by :meth:`cowenv.greybox.Corpus.choose`: a state feature
            (what a COW-shared table holds after an operation: a NUMA-hinting,
            migration, swap or pinned entry...) drawn rarest first
            (:meth:`cowenv.greybox.Corpus.choose_state`), the schedule of an entry that
            reached it up to that point, then a random continuation (``tail``). Such a
            state is one step from a trigger, and the interleaving pairs new in nearly
            every episode keep the entries that reach it from being drawn more often
            than any other (measured: ``numa-fault-writes-shared`` seed 0 reached a
            NUMA-hinting entry in a shared table in 8 of 462 episodes). Default 0.3
            (round 9); 0: off (round 8).
        layout_states: Whether the fork layouts of a COW PTE process's populated PMDs
            (:func:`cowenv.greybox._fork_layouts`: a ``VM_DONTCOPY`` or
            ``VM_WIPEONFORK`` VMA before, after or among populated entries, which a
            fork sends down the recover path) are sharing states too (``C`` features
            and state-child kinds). On by default from round 10; off: round 9.
        layout_data: With ``layout_states``, a fork layout whose pages hold data (a
            store reached them: :func:`cowenv.greybox._fork_layouts` ``data``) is a
            sharing state of its own, so that the state picks come back to it: the
            oracles see a page lost or leaked by the recover path only if it held
            something other than zeroes. Off by default (README "Greybox, round
            12": it finds ``recover-skips-vma`` seed 2, which round 11 misses, but was
            not better over the benchmark).
        fault_ranges: Whether a fault-injection context (``fault_contexts``) also
            holds the call's range class (:func:`cowenv.greybox.range_class`: it splits
            a VMA first, or covers whole VMAs), whose first allocations are at other
            call sites: an ``mprotect(PROT_NONE)`` of a whole VMA over a shared table
            fails in ``change_pte_range``'s break (v4's ``return 0``), one of part of it
            in ``__split_vma``'s (-ENOMEM, nothing wrong). On by default from round
            11; off: round 10.
        fault_split_pmd: The range class tells a split at PMD-aligned addresses
            (``split-pmd``: the walker breaks its own table after the split's break,
            so n = 2 reaches v4's ignored failure) from one inside a table. On by
            default from round 11.
        aim_shared: In the operation-level random choice, the probability that a
            thread whose mm shares a page table with another mm draws its template
            among those addressing a shared table (:meth:`_aim`). Default 0.3 (round
            11); 0: off.
        fault_shared: Once a fault-injection context has had its ``fault_contexts``
            tries, the probability that a ranged call in it (``mprotect``, ``mremap``,
            ``madvise``, ``munmap``... over whole VMAs or splitting one:
            :func:`cowenv.greybox.range_class`) whose range meets a COW-shared table of
            its mm still gets its try (n as the context's tries go on): the patch's own
            allocation, ``break_cow_pte``'s table copy, failed again in later states
            (AFLGo's patch targets, with FIFUZZ's unit). Loads, stores and pins are
            left alone: failing them on shared tables (a first version) starves the
            flaws that need those calls to succeed. Default 0.1 (round 11); 0: off.
        aim_untried: Whether an aimed choice (``aim_shared``) takes, among the
            templates of the operation on a COW-shared table, one whose fault-injection
            context has had the fewest tries (:meth:`_fc_untried`): the contexts not
            yet failed first. Off by default: over seeds 0-55 1,284 of 1,288 runs
            found (round 15 1,283) but 17 runs above 70k steps against 12 (README
            "Greybox, round 16").
        plan_fault_scope: Whether a seed plan's continuation (``plan_tail_faults``) has
            fault-injection tries of its own: the plan is part of the call context
            (each plan's continuation gets ``fault_contexts`` tries, and its own n, in
            every context), so a replayed plan's continuation tries faults again where
            the first pass already used the context's tries up. syzkaller triages the
            fault injection of each program's calls on their own. Off by default:
            worse on the four hard rows (README "Greybox, round 16").
        fault_kthreads: Whether the kernel thread's calls (compaction, reclaim) get
            context-sensitive fault tries too (``fault_contexts``), armed with the
            kernel-wide ``pressure_fail_nth`` n right before the call (the kernel thread
            has no ``fail-nth`` file of its own; :meth:`_fc_fails`): the allocations of
            migration and of the rmap walks' ``break_cow_pte`` (v4 04/14's
            ``PVMW_BREAK_COW_PTE``) failed one after another per context, as a user
            call's are. Off by default: worse on the four hard rows; the kernel-wide
            counter stays armed after a call that allocated fewer than n times and
            fails the next allocation of any thread (README "Greybox, round 16").
        window_early: A window's search stops at the end of its first run that shows a
            violation this agent has not seen, and the episode it opened in ends there
            (the harness teardown), so that the violation is played at once as the
            next episode; off, the search runs to its cap and the episode to its end
            first (round 11). On by default from round 12.

    """

    name = "greybox"
    #: What the current episode is (set by :meth:`begin_episode`): ``plan`` (a seed
    #: plan), ``window`` (a violation a systematic window showed, played), ``triage``
    #: (a fault-injection job), ``race`` (a race episode), ``extend`` (a parent's prefix
    #: replayed as it is), ``mutate`` (a mutated child) or ``random``. The bug-finding
    #: benchmark records it for each detection (``stage``).
    episode_kind = "random"

    def __init__(self, feedback: str = "interleaving", seeds: list[str] | None = None,
                 seed_exclude: list[str] | None = None, explore: float = 0.1,
                 run_prob: float = 0.5, event_prob: float = 0.03, sync_every: int = 20,
                 corpus_dir: str | None = None, cull_every: int = 200,
                 choice: str = "weighted", extend: float = 0.3,
                 fault_prob: float = 0.05, use_prob: float = 0.0, tlb_features: bool = False,
                 mutations: list[str] | None = None, race_prob: float = 0.0,
                 race_len: int = 16, race_episodes: float = 0.2, fault_triage: bool = False,
                 triage_prob: float = 1.0, fault_features: bool | None = None,
                 cut_fault: float = 0.0, explore_max: float | None = None,
                 explore_window: int = 40, fault_contexts: int = 4, arg_features: bool = False,
                 window_prob: float = 1.0,
                 window_bound: int = 1, window_cap: int = 2000, window_uses: int = 2,
                 window_decay: float = 4.0, window_share: float = 0.3,
                 content_features: bool = True, tail: float = 32.0,
                 window_release: float = 0.1, race_block_ops: bool = True,
                 race_meet: bool = True, plan_tail: float = 64.0,
                 race_kthreads: bool = False, state_pick: float = 0.3,
                 layout_states: bool = True, fault_ranges: bool = True,
                 aim_shared: float = 0.3, fault_shared: float = 0.1,
                 fault_split_pmd: bool = True, window_early: bool = True,
                 layout_data: bool = False, window_release_bound: int | None = None,
                 window_whole_release: bool = True, race_settle: bool = True,
                 race_walk: bool = True, race_nest: float = 0.0,
                 race_kthread_b: bool = False, fault_n_context: bool = False,
                 plan_cycle: float = 0.5, race_kthread_a: float = 0.0,
                 plan_tail_faults: bool = True, plan_race: float = 0.0,
                 plan_race_first: bool = False, fault_kthreads: bool = False,
                 aim_untried: bool = False, plan_fault_scope: bool = False,
                 window_kthread: float = 1.0, window_kthread_share: float = 0.1,
                 window_faults: float = 1.0, window_faults_share: float = 0.05,
                 window_fault_calls: int = 12, window_fault_n: int = 2,
                 window_kthread_multi: bool = True,
                 window_kthread_gup: bool = True, window_forks: float = 1.0,
                 window_forks_share: float = 0.03,
                 window_release_nosplit: bool = True) -> None:
        super().__init__()
        for nm, p in (("explore", explore), ("run_prob", run_prob), ("event_prob", event_prob),
                      ("fault_prob", fault_prob), ("use_prob", use_prob),
                      ("triage_prob", triage_prob), ("cut_fault", cut_fault),
                      ("state_pick", state_pick), ("extend", extend),
                      ("race_nest", race_nest), ("race_kthread_a", race_kthread_a),
                      ("plan_cycle", plan_cycle), ("plan_race", plan_race),
                      ("aim_shared", aim_shared),
                      ("fault_shared", fault_shared)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{nm}: expected 0..1")
        if tail < 0:
            raise ValueError("tail: expected >= 0")
        self.tail = float(tail)
        self._tail_left = -1  # random actions left in this episode (-1: no limit)
        if plan_tail < 0:
            raise ValueError("plan_tail: expected >= 0")
        self.plan_tail = float(plan_tail)
        self.state_pick = float(state_pick)
        self._state_pos: dict[int, int] = {}  # state feature -> action count first at
        self._window_init(window_prob, window_bound, window_cap, window_uses, window_decay,
                          window_share, window_release, window_early, window_release_bound,
                          window_whole_release, window_kthread, window_kthread_share,
                          window_faults, window_faults_share, window_fault_calls,
                          window_fault_n, window_kthread_multi, window_kthread_gup,
                          window_forks, window_forks_share,
                          window_release_nosplit)
        if not 0.0 <= race_prob <= 1.0 or not 0.0 <= race_episodes <= 1.0 or race_len < 1:
            raise ValueError("race_prob, race_episodes: expected 0..1; race_len: expected >= 1")
        self.race_prob = float(race_prob)
        self.race_episodes = float(race_episodes)
        self._race_now = False
        self.race_len = int(race_len)
        # 0: no race pair; 1: running A; 2: running B; 3: draining; 4: resuming A (_race)
        self._race_phase = 0
        self._race_tid = -1  # the thread the race pair runs now
        self._race_left = 0
        #: (lock class/mode A held, operation, variant) -> times B blocked on it.
        self._race_blocked: dict[tuple[str, str, str], int] = {}
        #: (lock class/mode A held, operation) -> the variants B started against it.
        self._race_tried: dict[tuple[str, str], set[str]] = {}
        self.race_block_ops = bool(race_block_ops)
        self.race_meet = bool(race_meet)
        self.race_kthreads = bool(race_kthreads)
        self.race_settle = bool(race_settle)
        self.race_walk = bool(race_walk)
        self.race_nest = float(race_nest)
        self._race_nested = False  # this pair's B stops early (race_nest)
        self.race_nested_pairs = 0  # pairs whose B was preempted (race_nest), so far
        self.race_kthread_b = bool(race_kthread_b)
        self.race_kthread_a = float(race_kthread_a)
        self.fault_n_context = bool(fault_n_context)
        self.plan_cycle = float(plan_cycle)
        self.plan_tail_faults = bool(plan_tail_faults)
        self._cycle_order: list[int] = []  # this cycle's plans still to replay
        self.plans_replayed = 0  # seed plans replayed after the first pass, so far
        self.plan_race = float(plan_race)
        self.plan_races = 0  # seed plans' continuations played as race pairs, so far
        self.plan_race_first = bool(plan_race_first)
        self._replay = False
        self._race_blockkey: tuple[str, str] = ("", "")
        self._race_held: list[str] = []
        self._race_a = -1  # A's thread (phase 4 resumes it)
        self._starts_of: dict[int, np.ndarray] = {}
        #: operation -> (points run, times) of every operation run to its end.
        self._race_oplen: dict[str, tuple[int, int]] = {}
        self._op_cur: dict[int, tuple[str, int]] = {}  # tid -> (operation, points so far)
        #: (pause label, operation, variant) -> race pairs tried (fewest first).
        self._race_tries: dict[tuple[str, str, str], int] = {}
        self.extend = float(extend)
        if choice != "thread" and choice not in CHOICES:
            raise ValueError(f"choice: expected thread or one of {', '.join(CHOICES)}")
        self.choice = choice
        self._chooser: KindChooser | None = None
        if explore_max is not None and not explore <= explore_max <= 1.0:
            raise ValueError("explore_max: expected explore..1")
        if explore_window < 1:
            raise ValueError("explore_window: expected >= 1")
        self.explore_max = explore_max
        self.explore_window = int(explore_window)
        self._stale = 0  # episodes since one reached a new code feature
        if sync_every < 0 or cull_every < 0:
            raise ValueError("sync_every/cull_every: expected >= 0")
        self.tracker = FeatureTracker(
            feedback, tlb=tlb_features,
            faults=(fault_triage or explore_max is not None) if fault_features is None
            else bool(fault_features), args=arg_features, contents=content_features,
            layouts=layout_states, layout_data=layout_data)
        self.fault_triage = bool(fault_triage)
        self.triage_prob = float(triage_prob)
        self.cut_fault = float(cut_fault)
        #: Fault-injection jobs (:meth:`_triage_child`): (actions, call index, n, the
        #: call's new code features).
        self._triage_q: list[_Job] = []
        self._job: _Job | None = None
        self._job_state = 0  # 0 not armed yet, 1 armed, 2 call started, 3 done
        self._job_fired = False
        self._ev_pos = 0
        self._call_of: dict[int, int] = {}  # tid -> index in _taken of its current start
        #: Calls (index in _taken) that reached new code -> those code features.
        self._novel_calls: dict[int, set[int]] = {}
        self._code_seen: set[int] = set()  # code features earlier episodes reached
        self._code_hits: dict[int, int] = {}  # code feature -> episodes that reached it
        self._ep_code: set[int] = set()  # code features this episode reached
        self._last_code = -1  # index in _taken of the last step that reached new code
        self.triage_stats = {"jobs": 0, "fired": 0}
        if fault_contexts < 0:
            raise ValueError("fault_contexts: expected >= 0")
        self.fault_contexts = int(fault_contexts)
        self.fault_ranges = bool(fault_ranges)
        self.fault_split_pmd = bool(fault_split_pmd)
        self.aim_shared = float(aim_shared)
        self.fault_shared = float(fault_shared)
        self.fault_kthreads = bool(fault_kthreads)
        self.aim_untried = bool(aim_untried)
        self.plan_fault_scope = bool(plan_fault_scope)
        #: Call context -> tries so far; (context, template) -> the fail_nth n its
        #: next try arms (absent: 1).
        self._fc_tries: dict[Context, int] = {}
        self._fc_n: dict[Call, int] = {}
        #: tid -> ((context, template), n, call started, fault fired) of an armed try.
        self._fc_pending: dict[int, tuple[Call, int, bool, bool]] = {}
        self._fc_queued = -1  # the start to take after the try's fail_nth event
        self._fc_ev = 0
        self.fc_stats = {"armed": 0, "fired": 0, "shared": 0}
        self._triage_next: _Job | None = None
        #: Whether the triage bookkeeping runs (any of its three options set).
        self._triage_on = self.fault_triage or self.cut_fault > 0 or explore_max is not None
        self.mutations = tuple(mutations) if mutations is not None else DEFAULT_MUTATIONS
        bad = [m for m in self.mutations if m not in MUTATIONS]
        if bad or not self.mutations:
            raise ValueError(f"mutations: expected some of {', '.join(MUTATIONS)}")
        self.feedback = feedback
        self.seed_paths = [DEFAULT_SEEDS] if seeds is None else list(seeds)
        self.seed_exclude = list(seed_exclude or ())
        self.explore = float(explore)
        self.run_prob = float(run_prob)
        self.event_prob = float(event_prob)
        self.fault_prob = float(fault_prob)
        self.use_prob = float(use_prob)
        self._queued = -1  # a start the random part chose, after its injected fault
        self.sync_every = int(sync_every)
        self.cull_every = int(cull_every)
        self.corpus_dir = Path(corpus_dir) if corpus_dir else None
        self.worker = 0
        self.workers = 1
        self.corpus = Corpus(state=self.tracker.state_ids)
        self.episodes = 0
        self._added = 0
        self._files: list[str] = []  # corpus files loaded or written, in order
        self._pending_files: list[str] | None = None
        self._plans: list[tuple[str, list[tuple[Any, ...]]]] | None = None
        self._extra_seeds: list[Path] = []
        self._ci: CatalogueIndex | None = None
        self._digest = ""
        self._env_id = 0
        # Episode state.
        self._child: list[int] = []
        self._ci_pos = 0
        self._plan: list[tuple[Any, ...]] = []
        self._plan_pos = 0
        self._plan_budget = 0
        self._taken: list[int] = []
        self._feats: set[int] = set()
        self._last_new = -1
        self._cuts: list[int] = []
        self._from_plan = ""
        self._scn_ptrs = 0  # entries per table of the plan's scenario (0: the env's)
        self._pmd_map: dict[int, int] = {}  # scenario PMD index -> workload PMD index
        self._tmap: dict[int, int] = {}  # scenario thread id -> workload thread id
        self._spawns: dict[int, frozenset[int]] = {}  # new scenario tid -> tids before
        self._skip_clone = -1  # a plan's clone the workload has already done (its tid)
        self._rank: dict[int, int] = {}  # tid -> occurrence an "until" waits for
        self._regions: set[tuple[int, int]] = set()  # the workload's mappings

    # ------------------------------------------------------------------ campaign
    def attach_campaign(self, out: str | Path, worker: int, workers: int = 1) -> None:
        """Campaign hook: share the corpus through ``OUT/greybox`` and seed from findings.

        The seed plans are dealt out: worker ``w`` of ``workers`` plays plans ``w``,
        ``w + workers``, ... (the others' results reach it through the shared corpus).
        """
        self.worker = int(worker)
        self.workers = max(1, int(workers))
        self.corpus_dir = Path(out) / CORPUS_DIR
        self._extra_seeds = sorted(p for p in Path(out).glob("*.yaml"))

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"episodes": self.episodes, "added": self._added, "files": list(self._files)}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        if not state:
            return
        self.episodes = int(state.get("episodes", 0))
        self._added = int(state.get("added", 0))
        self._pending_files = [str(x) for x in state.get("files", [])]

    # ------------------------------------------------------------------ setup
    def _setup(self, env: CowEnv) -> None:
        if self._env_id == id(env):
            return
        self._env_id = id(env)
        self._ci = CatalogueIndex(env.catalogue, env.kernel.config.ptrs_per_pte)
        self._starts_of = {}
        if self.choice != "thread":
            self._chooser = KindChooser(env.catalogue, self.choice)
        self._digest = catalogue_digest(env.catalogue)
        if self._plans is None:
            from cowenv.scenario import load_scenario

            plans = []
            for p in scenario_files(self.seed_paths, self.seed_exclude) + self._extra_seeds:
                try:
                    sc = load_scenario(p)
                except Exception:  # noqa: BLE001 - a bad seed file is skipped, not fatal
                    continue
                plans.append((p.stem, seed_plan(sc.steps, sc.config.ptrs_per_pte)))
            self._plans = [pl for i, pl in enumerate(plans)
                           if i % self.workers == self.worker % self.workers]
        if self._pending_files is not None:
            for f in self._pending_files:
                self._load_file(Path(f))
            self._pending_files = None

    def _load_file(self, path: Path) -> bool:
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
            rec = data.get("recorded", {})
            if rec.get(REC_CATALOGUE) != self._digest:
                return False
            acts = [int(x) for x in str(rec.get(REC_ACTIONS, "")).split(",") if x]
            feats = frozenset(int(x, 16) for x in str(rec.get(REC_FEATURES, "")).split(",")
                              if x)
            cuts = tuple(int(x) for x in str(rec.get(REC_CUTS, "")).split(",") if x)
            states = {int(f, 16): (int(n), c) for f, n, c in (
                x.split(":", 2) for x in str(rec.get(REC_STATES, "")).split(",") if x)}
        except (OSError, ValueError, AttributeError, TypeError, yaml.YAMLError):
            return False
        ok = self.corpus.add(CorpusEntry(acts, feats, path.stem, cuts=cuts,
                                         state_at={f: n for f, (n, _) in states.items()}))
        if ok:
            self.corpus.state.update({f: c for f, (_, c) in states.items()})
            self._files.append(str(path))
        return ok

    def _sync(self) -> None:
        if self.corpus_dir is None or not self.corpus_dir.is_dir():
            return
        for p in sorted(self.corpus_dir.glob("*.yaml")):
            if p.stem not in self.corpus.names and not p.stem.startswith(f"w{self.worker}-"):
                self._load_file(p)

    # ------------------------------------------------------------------ episode
    def begin_episode(self, env: CowEnv, rng: np.random.Generator) -> None:  # noqa: D102
        super().begin_episode(env, rng)
        self._setup(env)
        assert self._plans is not None and self._ci is not None
        if self.sync_every and self.episodes and self.episodes % self.sync_every == 0:
            self._sync()
        if self.cull_every and self.episodes and self.episodes % self.cull_every == 0:
            self.corpus.cull()
        self._taken, self._feats, self._last_new, self._cuts = [], set(), -1, []
        self._state_pos = {}
        self._plan, self._plan_pos, self._child, self._ci_pos = [], 0, [], 0
        self._from_plan = ""
        self._queued = -1
        self._race_phase, self._race_tid, self._race_left = 0, -1, 0
        self._op_cur = {}
        self._scn_ptrs, self._pmd_map, self._tmap, self._spawns = 0, {}, {}, {}
        self._skip_clone, self._rank = -1, {}
        self._race_now = False
        self._tail_left = -1
        self._replay = False  # this episode replays a seed plan (plan_cycle)
        self.episode_kind = "random"
        self._job, self._job_state, self._job_fired = None, 0, False
        self._call_of, self._novel_calls, self._ep_code = {}, {}, set()
        self._last_code = -1
        self._fc_pending, self._fc_queued = {}, -1
        self._win_playing = False
        self._win_cut = {}
        if self._win_next is not None:
            # A violation a systematic window showed, played as an episode (its actions
            # up to the window's cut, then the window's schedule).
            self._child, self._win_next = self._win_next, None
            self._win_playing = True  # played as found: no fault-context tries in it
            self.episode_kind = "window"
            self.window_stats["played"] += 1
            if self.episodes - self._win_plan_skips < len(self._plans):
                self._win_plan_skips += 1  # the seed plan of this episode comes next
        elif self.episodes - self._win_plan_skips < len(self._plans):
            self._start_plan(env, self.episodes - self._win_plan_skips)
        elif self._triage_next is not None:
            self._child = self._triage_child(self._triage_pop())
            self.episode_kind = "triage"
        elif self.race_episodes and rng.random() < self.race_episodes:
            # A race episode (:meth:`_race`): race pairs wherever one can be, from the
            # workload's state or (1 in 4) from a corpus entry's cut point. (Measured on
            # gup-fast-fork-race, seeds 0-7: with 1 in 2 the slowest seed needed 98,589
            # steps, with 1 in 4 60,509: a race of two operations is most often clean
            # on the workload's fresh tables, before other operations shared or
            # write-protected them.)
            self._race_now = True
            self.episode_kind = "race"
            if self.corpus.entries and rng.random() < 0.25:
                self._child = self.corpus.choose_cut(self.corpus.choose(rng), rng)
        elif self.plan_cycle and self._plans and rng.random() < self.plan_cycle:
            # A seed plan again (plan_cycle), the next of this cycle's random order.
            if not self._cycle_order:
                self._cycle_order = [int(i) for i in rng.permutation(len(self._plans))]
            self._start_plan(env, self._cycle_order.pop())
            self.plans_replayed += 1
            self._replay = True
        elif self.fault_triage or self.explore_max is not None:
            # A purely random episode (the adaptive rate :meth:`explore_rate`), else a
            # queued fault-injection job (with probability triage_prob), else a child.
            if not self.corpus.entries or rng.random() < self.explore_rate():
                pass
            elif self._triage_q and (self.triage_prob >= 1.0
                                     or rng.random() < self.triage_prob):
                self._child = self._triage_child(self._triage_pop())
                self.episode_kind = "triage"
            else:
                self._parent_child(env, rng)
        elif self.corpus.entries and rng.random() >= self.explore:
            self._parent_child(env, rng)
        self._feats.update(self.tracker.reset(env.kernel))
        self._ev_pos = self._fc_ev = len(env.kernel.events)

    def _start_plan(self, env: CowEnv, i: int) -> None:
        """Make this episode a play of seed plan ``i``, mapped onto ``env``'s tables."""
        assert self._plans is not None
        self._from_plan, plan = self._plans[i]
        self.episode_kind = "plan"
        self._plan = list(plan)
        self._plan_budget = _PLAN_STEP_LIMIT
        self._map_pmds(env)

    def explore_rate(self) -> float:
        """Probability of a purely random episode now.

        ``explore``; with ``explore_max``, an AFL-like schedule between exploitation and
        exploration: the rate rises linearly from ``explore`` to ``explore_max`` as the
        number of episodes since one reached a new *code* feature
        (:attr:`cowenv.greybox.FeatureTracker.code`: a call on a new argument state, a
        new injected-failure site) grows to ``explore_window``, and falls back to
        ``explore`` at the next new one (AFL's ``cycles_wo_finds`` drives its switch to
        havoc/splice in the same way; the interleaving features are new in nearly every
        episode, so they cannot tell a stalled corpus).
        """
        if self.explore_max is None:
            return self.explore
        f = min(1.0, self._stale / self.explore_window)
        return self.explore + (self.explore_max - self.explore) * f

    def _parent_child(self, env: CowEnv, rng: np.random.Generator) -> None:
        """A child of a corpus parent: cut, then replayed as it is or mutated."""
        if self.state_pick and rng.random() < self.state_pick:
            got = self.corpus.choose_state(rng)
            if got is not None:
                # A state one step from a trigger, the rarer first (state_pick): the
                # parent up to where it reached it, then on at random from there.
                e, f = got
                self._child = list(e.actions[:e.state_at.get(f, len(e.actions))])
                self.episode_kind = "state"
                if self.tail:
                    self._tail_left = int(rng.geometric(1.0 / (1.0 + self.tail))) - 1
                return
        parent = self.corpus.choose(rng)
        # The parent up to one of its cut points (a state where it reached something
        # new), so that the search goes on from there.
        prefix = self.corpus.choose_cut(parent, rng)
        if rng.random() < self.extend:
            # Replay the prefix as it is and go on at random from there: a race is
            # often reached in stages (a thread paused at one point, then another's
            # progress, then a use).
            self._child = prefix
            self.episode_kind = "extend"
            if self.cut_fault and rng.random() < self.cut_fault:
                self._child = self._cut_fault_child(prefix, rng)
        else:
            other = self.corpus.entries[int(rng.integers(len(self.corpus.entries)))]
            self._child, _ = mutate(prefix, rng, self._ci, other.actions,
                                    max_len=env.max_steps, kinds=self.mutations)
            self.episode_kind = "mutate"
        if self.tail:
            self._tail_left = int(rng.geometric(1.0 / (1.0 + self.tail))) - 1

    def done(self) -> bool:  # noqa: D102
        if self.window_early and self._win_next is not None and self._fc_queued < 0:
            return True  # a window's violation is played next: no need to go on
        return (self._tail_left == 0 and self._fc_queued < 0
                and self._ci_pos >= len(self._child))

    def act(self, env: CowEnv, obs: np.ndarray, mask: np.ndarray) -> int:  # noqa: D102
        q, self._fc_queued = self._fc_queued, -1
        if 0 <= q < len(mask) and mask[q]:
            return self._take(env, mask, q)
        a = self._next_planned(env, mask)
        if a is None:
            if self.episode_kind == "plan" and self._tail_left < 0 and self.plan_tail:
                # The seed plan has been played: a geometric continuation (plan_tail),
                # made of race pairs from the plan's end state with probability
                # plan_race.
                self._tail_left = int(self.rng.geometric(1.0 / (1.0 + self.plan_tail)))
                if (self.plan_race and (self._replay or self.plan_race_first)
                        and self.rng.random() < self.plan_race):
                    self._race_now = True
                    self.plan_races += 1
            a = self._random(env, mask)
            if self._tail_left > 0:
                self._tail_left -= 1
        # Not on a race pair's calls (RacePairs._race sets _race_phase when it chose
        # one): a call failing early tests no race (README "Greybox", measured on
        # gup-fast-fork-race); not in the seed plans nor in a window's violation played.
        if self.fault_contexts and self._job is None and not self._race_phase \
                and not self._win_playing and (self.episode_kind != "plan" or (
                    self.plan_tail_faults and self._plan_pos >= len(self._plan))):
            f = self._fc_arm(env, mask, a)
            if f is not None:
                self._fc_queued = a
                self._taken.append(f)
                return f
        return self._take(env, mask, a)

    def _take(self, env: CowEnv, mask: np.ndarray, a: int) -> int:
        """Take action ``a`` (noted for a systematic window's cut first)."""
        if self.window_prob and 0 <= a < len(mask) and mask[a]:
            self._window_note_start(env, a)
        self._taken.append(a)
        return a

    def _next_planned(self, env: CowEnv, mask: np.ndarray) -> int | None:
        while self._plan_pos < len(self._plan):
            a = self._plan_action(env, mask, self._plan[self._plan_pos])
            if a is not None:
                return a
            self._plan_pos += 1
            self._plan_budget = _PLAN_STEP_LIMIT
        while self._ci_pos < len(self._child):
            a = self._child[self._ci_pos]
            self._ci_pos += 1
            if 0 <= a < len(mask) and mask[a]:
                return a
        return None

    def _map_pmds(self, env: CowEnv) -> None:
        """Map the plan's page tables onto the workload's, once per play of a plan.

        A scenario's addresses are its own layout's; the plan is played on the workload's
        regions. Each PMD the scenario addresses (in the order it first does) is mapped
        to the workload PMD, not yet taken, whose address templates hold the most of the
        entries (:func:`cowenv.greybox.entry_class`) the plan addresses in it (ties at
        random, so that each play of a plan may differ), so that the plan's operations
        on one table stay on one table (a read that fills a paging-structure cache and
        the munmap of that table; a pin and the fork that shares its page).
        """
        ci = self._ci
        assert ci is not None
        P = env.kernel.config.ptrs_per_pte
        Ps = P
        want: dict[int, list[tuple[Any, ...]]] = {}
        for item in self._plan:
            if item[0] == "geometry":
                Ps = int(item[1])
            elif item[0] == "start":
                sh = _shape(item[2], item[3], Ps)
                if sh is not None:
                    want.setdefault(sh[0], []).append(sh[1:])
        self._scn_ptrs = Ps
        self._regions = _regions(env)
        if not want:
            return
        have: dict[int, set[tuple[Any, ...]]] = {}
        regions = _regions(env)
        for sp in ci.catalogue:
            sh = _shape(sp.op, dict(sp.args), P, regions) if sp.kind == "start" else None
            if sh is not None:
                hs = have.setdefault(sh[0], set())
                hs.add(sh[1:])
                hs.add(sh[1:2])
        free = sorted(have)
        last = -1
        for spmd in sorted(want):
            shapes = want[spmd]
            if not free:
                break
            # An entry the PMD's templates address scores one, the same operation on
            # the same range shape (a whole table, half of one...) one more.
            scores = [sum((sh[:1] in have[t]) + (sh in have[t]) for sh in shapes)
                      for t in free]
            top = max(scores)
            best = [t for t, sc in zip(free, scores, strict=True) if sc == top]
            after = [t for t in best if t > last]
            t = after[0] if after else best[0]
            self._pmd_map[spmd] = t
            last = t
            free.remove(t)

    def _tid(self, env: CowEnv, stid: int) -> int:
        """The workload thread a plan's thread id stands for (see ``("spawn", ...)``)."""
        if stid in self._tmap:
            return self._tmap[stid]
        before = self._spawns.get(stid)
        if before is None:
            return stid
        k = env.kernel
        mapped = set(self._tmap.values())
        for t in sorted(k.threads):
            th = k.threads[t]
            if t not in before and t not in mapped and not th.exited:
                self._tmap[stid] = t
                del self._spawns[stid]
                return t
        return stid  # not there yet (the fork has not finished): as numbered

    def _walk_rank(self, env: CowEnv, t: Any, op: str) -> int:
        """Which table of a whole-mm walk (fork, exit) stands for the scenario's first.

        A scenario's mm has its tables where the plan's addresses are; the workload's
        has more, below them. A walk reaches the plan's lowest table after the
        workload's tables below the PMD it is mapped to (:meth:`_map_pmds`), so an
        ``until`` of the walk stops at that occurrence of its label: 1 + the number of
        the thread's mm's PMD entries below that PMD (1 for any other operation).
        """
        if op not in ("fork", "exit") or not self._pmd_map or t is None:
            return 1
        m = self._pmd_map[min(self._pmd_map)]
        p = env.kernel.procs.get(t.pid)
        if p is None:
            return 1
        return 1 + sum(1 for idx in p.mm.pmd if idx < m)

    def _pageout_as_reclaim(self, env: CowEnv, mask: np.ndarray, t: Any,
                            want: dict[str, Any]) -> int | None:
        """A plan's ``MADV_PAGEOUT`` of a few pages, where the catalogue's are far longer.

        The catalogue's ``PAGEOUT`` templates cover whole regions and portions: with 512
        entries per table that is hundreds of pages, more preemption points than an
        episode has, where the scenario (small geometry) paged out one or two. The same
        effect -- that page swapped out through ``shrink_folio_list`` /
        ``try_to_unmap`` -- is kswapd's one-page reclaim at that address in the caller's
        process (:func:`cowenv.catalogue.build_kswapd_templates`): the plan item becomes
        that reclaim, and its ``finish`` runs kswapd. None when the catalogue has a
        ``PAGEOUT`` short enough, or no such reclaim.
        """
        ci = self._ci
        assert ci is not None
        P = env.kernel.config.ptrs_per_pte
        pages = int(want.get("length", 4096)) >> 12
        Ps = self._scn_ptrs or P
        lens = [int(dict(ci.catalogue[i].args).get("length", 0)) >> 12
                for i in ci.by_tid_op.get((t.tid, "madvise"), [])
                if dict(ci.catalogue[i].args).get("advice") == "PAGEOUT"]
        if not lens or min(lens) <= max(4 * pages, 16) or pages >= Ps:
            return None
        a = want.get("addr")
        if not isinstance(a, int):
            return None
        pids = [p.pid for p in env.kernel.live_procs()]
        if t.pid not in pids:
            return None
        slot = pids.index(t.pid)
        vp = a >> 12
        pmd = self._pmd_map.get(vp // Ps)
        best, score = None, -1.0
        for i in ci.by_tid_op.get((KSWAPD_TID, "reclaim"), []):
            sp = ci.catalogue[i]
            ha = dict(sp.args).get("addr")
            if sp.proc_slot != slot or not isinstance(ha, int) or not mask[i]:
                continue
            sc = float(entry_class(vp, Ps) == entry_class(ha >> 12, P))
            if pmd is not None:
                sc += 1.0 if (ha >> 12) // P == pmd else -1.0
            if sc > score:
                best, score = i, sc
        if best is None:
            return None
        self._plan_pos += 1
        self._plan_budget = _PLAN_STEP_LIMIT
        nxt = self._plan[self._plan_pos] if self._plan_pos < len(self._plan) else ()
        if nxt and nxt[0] == "finish" and self._tid(env, nxt[1]) == t.tid:
            self._plan[self._plan_pos] = ("finish", KSWAPD_TID)
        return best

    def _plan_action(self, env: CowEnv, mask: np.ndarray, item: tuple[Any, ...]) -> int | None:
        """The next action for plan item ``item``, or None when it is done (or impossible)."""
        ci = self._ci
        assert ci is not None
        k = env.kernel
        kind = item[0]
        if kind == "geometry":
            return None
        if kind == "event":
            tid = item[2] if len(item) > 2 else -1
            if tid > 0:
                tid = self._tid(env, tid)
            for i in ci.events:
                sp = ci.catalogue[i]
                if sp.n == item[1] and sp.tid == tid and mask[i]:
                    self._plan_pos += 1
                    return i
            return None
        if kind == "spawn":
            # The thread the scenario's fork/clone creates. A clone whose new thread the
            # workload already has (the default workload clones tid 2 at reset) is not
            # played: the plan's thread is that one. Otherwise the new thread is the one
            # that appears once the operation is done.
            _, stid, new, op = item
            cloner = k.threads.get(self._tid(env, stid))
            mapped = set(self._tmap.values())
            if op == "clone" and cloner is not None:
                for t in sorted(k.threads):
                    th = k.threads[t]
                    if (th.pid == cloner.pid and t != cloner.tid and not th.exited
                            and t not in mapped and t not in self._tmap):
                        self._tmap[new] = t
                        self._skip_clone = stid
                        return None
            self._tmap.pop(new, None)
            self._spawns[new] = frozenset(t for t, th in k.threads.items() if not th.exited)
            return None
        tid = self._tid(env, item[1])
        t = k.threads.get(tid)
        run = ci.run.get(tid)
        if kind == "start":
            if item[2] == "clone" and self._skip_clone == item[1]:
                self._skip_clone = -1
                return None
            if item[2] == "madvise" and item[3].get("advice") == "PAGEOUT" and t is not None:
                alt = self._pageout_as_reclaim(env, mask, t, item[3])
                if alt is not None:
                    return alt
            best, score, ties = None, -1e9, 0
            for i in ci.by_tid_op.get((tid, item[2]), []):
                if not mask[i]:
                    continue
                s = _arg_score(ci.catalogue[i], item[3], k.config.ptrs_per_pte,
                               self._scn_ptrs, self._pmd_map, self._regions)
                if s > score:
                    best, score, ties = i, s, 1
                elif s == score:
                    # Ties (templates that differ in what the scenario leaves open) are
                    # broken at random, so that each play of a plan varies them.
                    ties += 1
                    if self.rng.random() * ties < 1.0:
                        best = i
            if best is None and t is not None and t.gen is not None and run is not None \
                    and mask[run] and self._plan_budget > 0:
                self._plan_budget -= 1
                return run  # the thread is still busy: finish its operation first
            if best is not None:
                self._plan_pos += 1
                self._plan_budget = _PLAN_STEP_LIMIT
                self._rank[tid] = self._walk_rank(env, t, item[2])
            return best
        if t is None or run is None or t.gen is None or not mask[run] or self._plan_budget <= 0:
            return None
        if kind == "until" and t.label == item[2]:
            # A walk over the whole mm (fork, exit) passes a per-table label once per
            # table: the scenario's first one is the workload's table ``rank``.
            seen = (item[3] if len(item) > 3 else 0) + 1
            if seen >= self._rank.get(tid, 1):
                return None
            self._plan[self._plan_pos] = ("until", item[1], item[2], seen)
        if kind == "steps":
            if item[2] <= 0:
                return None
            self._plan[self._plan_pos] = ("steps", item[1], item[2] - 1)
        self._plan_budget -= 1
        return run

    def _random(self, env: CowEnv, mask: np.ndarray) -> int:
        """Random choice, with per-call fault injection (``fault_prob``) and uses."""
        q, self._queued = self._queued, -1
        if 0 <= q < len(mask) and mask[q]:
            return q
        if self.race_prob or self._race_now:
            r = self._race(env, mask)
            if r is not None:
                return r
        if self.use_prob and self.rng.random() < self.use_prob:
            u = self._use(env, mask)
            if u is not None:
                return u
        a = self._choose(env, mask)
        ci = self._ci
        assert ci is not None
        if self.fault_prob and ci.catalogue[a].kind == "start" \
                and self.rng.random() < self.fault_prob:
            f = ci.fault_for(self.rng, a)
            if f is not None and mask[f]:
                self._queued = a
                return f
        return a

    def _use(self, env: CowEnv, mask: np.ndarray) -> int | None:
        """An access that would use a stale state the kernel holds now, or None.

        Greybox, as the pin and TLB features (:func:`cowenv.greybox._tlb_states`,
        :func:`cowenv.greybox._pin_states`): the fuzzer reads the model's state, here to
        aim its next access, the way the ``DEBUG_VM`` checks and the page-table check
        look at state a later read would show. The candidates (legal ones, one chosen at
        random):

        * a thread's paging-structure-cache entry whose table was freed or reused: a
          load by that thread of a page of that PMD its TLB does not hold (the walk goes
          through the cached entry);
        * a TLB entry whose frame was freed or reused, or writable where the page tables
          no longer grant it while no flush is pending: a load (freed) or a store
          (write-protected) by that thread at that page;
        * an active pin whose page is still mapped at the pinned address but sits in a
          write-protected (COW-shared) table or is not ``PageAnonExclusive``: the
          device's read of that pin by a thread of its process, or a store by one of
          them at the pinned address.

        States the fixed kernel passes through all the time (a table unlinked behind a
        pending flush, a pinned page unmapped by the process) are left alone: a use
        there is harmless, and the probe would crowd out the search.
        """
        ci = self._ci
        assert ci is not None
        k = env.kernel
        cands: list[int] = []
        pool = k.pool
        P = k.config.ptrs_per_pte
        if k.config.tlb:
            for tid in ci.user_tids:
                t = k.threads.get(tid)
                if t is None or t.exited or t.gen is not None or (not t.psc and not t.tlb):
                    continue
                p = k.procs.get(t.pid)
                if p is None:
                    continue
                mm = p.mm
                for idx, (table, tgen, _w) in t.psc.items():
                    tp = table.pfn
                    if pool.gen[tp] != tgen or not pool.flags[tp] & PG_allocated:
                        cands.extend(i for i in ci.reads_in.get((tid, idx), ())
                                     if ci.where[i][1] >> 12 not in t.tlb)
                if len(t.tlb) > 64:
                    continue
                pending = k.tlb_pending.get(mm.id, 0)
                for vpn, (pfn, gen, writable, _d) in t.tlb.items():
                    if pool.gen[pfn] != gen or not pool.flags[pfn] & PG_allocated:
                        i = ci.access_at.get((tid, "read", vpn))
                    elif writable and not pending:
                        e = mm.pmd.get(vpn // P)
                        pte = int(e.table.entries[vpn % P]) if e is not None else 0
                        if e is not None and e.write and pte & PTE_WRITE \
                                and pte >> PFN_SHIFT == pfn:
                            continue
                        i = ci.access_at.get((tid, "write", vpn))
                    else:
                        continue
                    if i is not None:
                        cands.append(i)
        if k.pins:
            slots: dict[int, int] = {}
            for pin in k.pins.values():
                if not pin.active:
                    continue
                slot = slots.get(pin.pid, 0)
                slots[pin.pid] = slot + 1
                e = pin.mm.pmd.get(pin.vpn // P)
                pte = int(e.table.entries[pin.vpn % P]) if e is not None else 0
                mapped = bool(pte & PTE_PRESENT) and pte >> PFN_SHIFT == pin.pfn
                excl = bool(int(pool.flags[pin.pfn]) & PG_anon_exclusive)
                if not mapped or (e is not None and e.write and excl):
                    continue
                proc = k.procs.get(pin.pid)
                for tid in (proc.tids if proc is not None else ()):
                    for i in (ci.dev_read_of.get((tid, slot)),
                              ci.access_at.get((tid, "write", pin.vpn))):
                        if i is not None:
                            cands.append(i)
        cands = [i for i in cands if mask[i]]
        if not cands:
            return None
        return cands[int(self.rng.integers(len(cands)))]

    def _choose(self, env: CowEnv, mask: np.ndarray) -> int:
        """Operation-level random choice (see the module docstring)."""
        ci = self._ci
        assert ci is not None
        rng = self.rng
        if ci.events and rng.random() < self.event_prob:
            ev = [i for i in ci.events if mask[i]]
            if ev:
                return ev[int(rng.integers(len(ev)))]
        if self._chooser is not None:
            a = self._chooser.choose(rng, mask)
            sp = ci.catalogue[a]
            if self.aim_shared and sp.kind == "start" and ci.span[a]:
                c = [i for i in ci.by_tid_op[(sp.tid, sp.op)] if mask[i]]
                if len(c) > 1:
                    on = self._aim(env.kernel, sp.tid, c)
                    if on is not c:
                        a = on[int(rng.integers(len(on)))]
            return a
        runs = [i for t, i in ci.run.items() if mask[i]]
        if runs and rng.random() < self.run_prob:
            return runs[int(rng.integers(len(runs)))]
        k = env.kernel
        idle = [t for t in ci.tids if t in ci.ops_of and k.threads.get(t) is not None
                and k.threads[t].gen is None and not k.threads[t].exited]
        rng.shuffle(idle)
        for t in idle:
            ops = [op for op in ci.ops_of[t] if any(mask[i] for i in ci.by_tid_op[(t, op)])]
            if not ops:
                continue
            op = ops[int(rng.integers(len(ops)))]
            c = [i for i in ci.by_tid_op[(t, op)] if mask[i]]
            if self.aim_shared and len(c) > 1:
                c = self._aim(k, t, c)
            return c[int(rng.integers(len(c)))]
        if runs:
            return runs[int(rng.integers(len(runs)))]
        return uniform_legal(rng, mask)

    @staticmethod
    def _shared_pmds(k: Any, tid: int) -> set[int]:
        """PMD indices where ``tid``'s mm maps a page table another mm maps too."""
        t = k.threads.get(tid)
        p = k.procs.get(t.pid) if t is not None else None
        if p is None:  # kswapd's reclaim templates: no mm of their own
            return set()
        return {i for i, e in p.mm.pmd.items() if e.table.refcount > 1}

    def _aim(self, k: Any, tid: int, cands: list[int]) -> list[int]:
        """``aim_shared``: the templates of ``cands`` on a COW-shared table, maybe.

        When ``tid``'s mm maps a page table another mm maps too (``refcount > 1``), with
        probability ``aim_shared`` the templates whose address range meets such a table
        (``cands`` itself if none does). Directed greybox fuzzing (AFLGo, Böhme et al.,
        CCS 2017) with the shared tables as the targets: every COW PTE path starts from
        an operation on one, and the uniform template choice spends most calls of an
        operation on the other tables of the address space.
        """
        ci = self._ci
        assert ci is not None
        shared = self._shared_pmds(k, tid)
        if not shared or self.rng.random() >= self.aim_shared:
            return cands
        on = [i for i in cands if not shared.isdisjoint(ci.span[i])]
        if on and self.aim_untried and self.fault_contexts:
            on = self._fc_untried(k, on)
        return on or cands

    def observe(self, env: CowEnv, action: int, obs: np.ndarray, reward: float,  # noqa: D102
                terminated: bool, truncated: bool, info: dict[str, Any]) -> None:
        assert self._ci is not None
        sp = self._ci.catalogue[action]
        if self.race_prob or self.race_episodes:
            self._op_length(env, sp)
        fs = self.tracker.step(env.kernel, sp)
        for f in fs:
            if f in self.corpus.state and f not in self._state_pos:
                self._state_pos[f] = len(self._taken)
            if f not in self._feats:
                self._feats.add(f)
                if f not in self.corpus.seen:
                    n = len(self._taken)
                    if n != self._last_new:
                        self._cuts.append(n)
                    self._last_new = n
        if self._triage_on:
            self._triage_observe(env, sp)
        if self.fault_contexts:
            self._fc_observe(env, sp)
        if self.window_prob:
            self._window_observe(env, sp)
            if (self.window_release or self.window_kthread or self.window_faults
                    or self.window_forks):
                mask = info.get("action_mask")
                mask = env.action_masks() if mask is None else mask
                if self.window_release:
                    self._release_observe(env, sp, mask)
                if self.window_kthread:
                    self._kthread_observe(env, sp, mask)
                if self.window_faults:
                    self._fault_observe(env, sp, mask)
                if self.window_forks:
                    self._fork_observe(env, sp, mask)

    def end_episode(self, env: CowEnv) -> None:  # noqa: D102
        self.episodes += 1
        if self.window_prob:
            self._win_sigs.update(env.kernel.signatures)
        if self._triage_on:
            self._stale = 0 if self._ep_code - self._code_seen else self._stale + 1
            self._triage_finish()
        if self.fault_triage:
            self._triage_enqueue()
        self.corpus.count(self._feats)
        novel = self.corpus.novel(self._feats)
        if not novel or self._last_new < 0:
            return
        acts = self._taken[:self._last_new]
        name = f"w{self.worker}-{self._added:06d}"
        self._added += 1
        entry = CorpusEntry(acts, frozenset(self._feats), name, cuts=tuple(self._cuts),
                            state_at={f: n for f, n in self._state_pos.items()
                                      if n <= len(acts)})
        self.corpus.add(entry)
        if self.corpus_dir is not None:
            self._write(env, entry)

    def _write(self, env: CowEnv, entry: CorpusEntry) -> None:
        from cowenv.fileio import atomic_write_text
        from cowenv.scenario import dump_scenario

        assert self.corpus_dir is not None
        data = env.get_schedule(name=entry.name)
        data["description"] = (f"greybox corpus entry ({self.feedback} feedback, "
                               f"{len(entry.features)} features"
                               + (f", seed {self._from_plan}" if self._from_plan else "") + ")")
        rec = dict(data.get("recorded", {}))
        rec[REC_ACTIONS] = ",".join(map(str, entry.actions))
        rec[REC_FEATURES] = ",".join(f"{f:x}" for f in sorted(entry.features))
        rec[REC_CATALOGUE] = self._digest
        rec[REC_CUTS] = ",".join(map(str, entry.cuts))
        st = self.corpus.state
        rec[REC_STATES] = ",".join(f"{f:x}:{n}:{st[f]}"
                                   for f, n in sorted(entry.state_at.items()))
        data["recorded"] = rec
        path = self.corpus_dir / f"{entry.name}.yaml"
        self.corpus_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, dump_scenario(data))
        self._files.append(str(path))


def _shape(op: str, args: dict[str, Any], ptrs_per_pte: int,
           regions: set[tuple[int, int]] | None = None) -> tuple[Any, ...] | None:
    """``(pmd, entry class, op, length class)`` of an operation on an address, else None.

    The length class is ``"VMA"`` for a whole mapping (plan argument
    :data:`cowenv.greybox.WHOLE_VMA`, or a template's range that is one of the
    workload's ``regions``), else ``("T", n)`` for ``n`` whole tables, else the page count.
    """
    a = args.get("addr")
    if not isinstance(a, int) or isinstance(a, bool):
        return None
    n = args.get("length")
    lc: Any = None
    if args.get(WHOLE_VMA) or (regions and (a, n) in regions):
        lc = "VMA"
    elif isinstance(n, int) and not isinstance(n, bool):
        pages = n >> 12
        lc = ("T", pages // ptrs_per_pte) if pages % ptrs_per_pte == 0 else pages
    return ((a >> 12) // ptrs_per_pte, entry_class(a >> 12, ptrs_per_pte), op, lc)


def _regions(env: Any) -> set[tuple[int, int]]:
    """The workload's mappings ``(addr, length)`` (the harness's ``regions``)."""
    h = getattr(env, "harness", env)
    return {(int(a), int(n)) for a, n in getattr(h, "regions", ())}


def _arg_score(sp: Any, want: dict[str, Any], ptrs_per_pte: int = 0, scn_ptrs: int = 0,
               pmd_map: dict[int, int] | None = None,
               regions: set[tuple[int, int]] | None = None) -> float:
    """How well template ``sp`` matches scenario arguments ``want`` (higher is better).

    Addresses cannot match (the scenario's regions are not the workload's); an address
    at the same place in its page table (:func:`cowenv.greybox.entry_class`: the second
    VMA of a PMD, a table's first or last page; the scenario's addresses read with
    ``scn_ptrs`` entries per table, default ``ptrs_per_pte``) scores half a point, and,
    when the scenario's PMD is mapped (``pmd_map``, :meth:`GreyboxAgent._map_pmds`), an
    address in the mapped PMD one point (elsewhere minus one). A length scores half a
    point when equal, or the same number of whole tables in both geometries; a range
    that is a whole mapping in the scenario (:data:`cowenv.greybox.WHOLE_VMA`) scores one
    point more on a template whose range is one of the workload's ``regions``.
    """
    have = dict(sp.args)
    Ps = scn_ptrs or ptrs_per_pte
    s = 0.0
    for key, v in want.items():
        if key == "addr" and ptrs_per_pte and isinstance(v, int) \
                and isinstance(have.get("addr"), int):
            vp, hp = v >> 12, have["addr"] >> 12
            if entry_class(vp, Ps) == entry_class(hp, ptrs_per_pte):
                s += 0.5
            if pmd_map and vp // Ps in pmd_map:
                s += 1.0 if pmd_map[vp // Ps] == hp // ptrs_per_pte else -1.0
            continue
        if key in ("addr", "length"):
            continue
        if key == WHOLE_VMA:
            s += 1.0 if regions and (have.get("addr"), have.get("length")) in regions else 0.0
            continue
        if key == "pin" and sp.pin_slot == 0:
            s += 1.0
        elif key in have and have[key] == v:
            s += 1.0
    if "length" in want and "length" in have:
        wl, hl = want["length"], have["length"]
        same = wl == hl
        if not same and ptrs_per_pte and isinstance(wl, int) and isinstance(hl, int):
            wp, hp = wl >> 12, hl >> 12
            same = wp % Ps == 0 and hp % ptrs_per_pte == 0 and wp // Ps == hp // ptrs_per_pte
        s += 0.5 if same else 0.0
    if sp.tid == KSWAPD_TID and "addr" in have and "addr" not in want:
        s -= 0.5
    return s


__all__ = ["GreyboxAgent"]
