"""Planted faults, for proving that each drill can fail: `python -m
promptline.devtools.drills.faults <fault> <service module>` breaks one thing in that service
process, then runs the service as `python -m <service module>` would. Never used by a service
itself; the drills' tests start a deployment through it (`Env(fault=...)`). Each drill module
declares the faults it must catch next to the drill, with `@fault(name, service)`.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Callable

FAULTS: dict[str, tuple[str, Callable[[], None]]] = {}
"""fault name -> (the service module it applies to, the patch)."""


def fault(name: str, service: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(patch: Callable[[], None]) -> Callable[[], None]:
        FAULTS[name] = (service, patch)
        return patch
    return register


def main(argv: list[str]) -> None:
    # Run as __main__, this file is not the module the drills register with: use that one.
    from promptline.devtools.drills import faults, soak  # noqa: F401  # soak's faults too
    from promptline.devtools.drills.runner import catalog

    catalog()  # imports every drill module, which registers its faults
    if len(argv) != 2 or argv[0] not in faults.FAULTS:
        raise SystemExit(f"usage: faults <{'|'.join(sorted(faults.FAULTS))}> <service module>")
    name, module = argv
    service, patch = faults.FAULTS[name]
    if module == service:
        patch()
    sys.argv = [module]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
