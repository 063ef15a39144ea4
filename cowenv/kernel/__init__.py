"""The simulated kernel: a pure simulation library laid out like the Linux source tree.

No gymnasium and no agents here. :func:`make_kernel` builds the kernel a configuration
asks for: :class:`~cowenv.kernel.kernel.Kernel` (``classic``, upstream) or
:class:`~cowenv.kernel.cowpte.CowPteKernel` (the COW PTE v4 patch). See
:mod:`cowenv.kernel.kernel` for the module map.
"""

from __future__ import annotations

from typing import Any

from .config import KernelConfig
from .cowpte import CowPteKernel
from .kernel import Kernel
from .sched import KSWAPD_TID, KernelUsageError, Pin, Process, Thread

#: Kernel class of each variant.
VARIANT_CLASSES: dict[str, type[Kernel]] = {"classic": Kernel, "cowpte": CowPteKernel}


def make_kernel(config: KernelConfig, **kw: Any) -> Kernel:
    """Instantiate the kernel class for ``config.variant`` (``oracles``, ``trace`` pass on)."""
    return VARIANT_CLASSES[config.variant](config, **kw)


__all__ = ["KSWAPD_TID", "CowPteKernel", "Kernel", "KernelConfig", "KernelUsageError", "Pin",
           "Process", "Thread", "VARIANT_CLASSES", "make_kernel"]
