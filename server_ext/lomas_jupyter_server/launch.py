"""The commands that start the standalone service (`jupyter lomas`, `lomas-hub-service`).

They prepare the process before the Jupyter server is imported: `jsonschema` (through jupyter_events) imports
`rfc3987_syntax` when it is installed, only to check the "iri" string formats, and that module builds a parser
for its grammar at import time: about 1.4 s of a 3 s start. No schema the service validates uses those formats,
so the launcher marks the module as absent (`sys.modules[name] = None`, Python's way to make an import fail)
and jsonschema goes on without that one check. Embedded in JupyterLab, nothing changes.
"""

from __future__ import annotations

import sys

SKIPPED_OPTIONAL_IMPORTS = ("rfc3987_syntax",)  # optional extras of libraries we use, slow to import, unused


def skip_slow_optional_imports() -> None:
    for name in SKIPPED_OPTIONAL_IMPORTS:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # an import already done stays done


def main() -> None:
    """`jupyter lomas`: the standalone service."""
    skip_slow_optional_imports()
    from .app import main as launch

    launch()


def hub_service() -> None:
    """`lomas-hub-service`: the command a Hub runs."""
    skip_slow_optional_imports()
    from .app import hub_service as launch

    launch()
