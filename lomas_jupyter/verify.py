"""`lomas-verify NOTEBOOK [--key KEY ...] [--user NAME]`: a grader's check, offline, that a notebook's DP answers are real.

For every output that carries a release (its metadata keeps the signed answer and the service's receipt), the
signature is checked, and the output is drawn again from the signed answer: any edit to a shown number, cost
or user fails. An output that looks like a DP answer but carries no receipt, or a %%dpquery cell whose answer
is missing, is flagged. With --key (the services' public keys, from `lomas-admin key` or GET receipts/key) only
those services' signatures count; without it, a receipt shows only that its output was not edited.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import certificate, receipts
from .client import Release
from .display import federated_html, federated_text, release_html, release_text
from .federation import SiteOutcome, assemble

# what our displays say, so that a typed imitation of one is caught even where no %%dpquery cell is
LOOKS_LIKE_DP = re.compile(r"DP release #|Replay of DP release|Combined DP answer|\[brackets\]: 95% interval")
NOTES = {"", "ε from your kernel default, %lomas epsilon"}  # the only unsigned text a release output may carry


@dataclass
class Report:
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)
    entries: list[certificate.Entry] = field(default_factory=list)
    trusted: bool = False
    users: frozenset[str] = frozenset()  # --user: whom the releases must have been made for (empty: anyone)

    @property
    def ok(self) -> bool:
        return not self.problems


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value or "")


def _shown(output: dict[str, Any]) -> str:
    if output.get("output_type") == "stream":
        return _text(output.get("text"))
    data = output.get("data") or {}
    return _text(data.get("text/plain")) + _text(data.get("text/html"))


def _drawn_again(output: dict[str, Any], plain: str, rich: str) -> bool:
    data = output.get("data") or {}
    return _text(data.get("text/plain")) == plain and _text(data.get("text/html")) == rich


def _check_user(where: str, answer: dict[str, Any], report: Report) -> None:
    """A valid receipt for someone else's release: a copied answer (what it cost was charged to them)."""
    if report.users and str(answer.get("user", "")) not in report.users:
        report.problems.append(f"{where}: release #{answer.get('release_id')} was made for "
                               f"'{answer.get('user', '')}', not for {' or '.join(sorted(report.users))} (copied?)")


def _check_release(where: str, output: dict[str, Any], kept: dict[str, Any], keys: dict[str, bytes] | None,
                   report: Report) -> None:
    answer, receipt = kept.get("answer"), kept.get("receipt")
    if not isinstance(answer, dict):
        report.problems.append(f"{where}: the output's release record is damaged")
        return
    outcome = receipts.check(answer, receipt, keys)
    report.entries.append(certificate.Entry.of(answer, receipt, outcome.problem is None))
    if outcome.problem:
        report.problems.append(f"{where}: {outcome.problem}")
        return
    _check_user(where, answer, report)
    note = kept.get("note", "")
    release = Release.from_json(answer)
    if note not in NOTES or not _drawn_again(output, release_text(release, note), release_html(release, note)):
        report.problems.append(f"{where}: the shown answer differs from the signed release #{answer.get('release_id')}"
                               " (edited after release)")


def _check_federated(where: str, output: dict[str, Any], kept: dict[str, Any], keys: dict[str, bytes] | None,
                     report: Report) -> None:
    outcomes: dict[str, SiteOutcome] = {}
    bad = False
    for site in kept.get("sites") or []:
        name = str(site.get("site", ""))
        outcome = SiteOutcome(name, str(site.get("dataset", "")))
        if "answer" in site:
            result = receipts.check(site["answer"], site.get("receipt"), keys)
            report.entries.append(certificate.Entry.of(site["answer"], site.get("receipt"), result.problem is None))
            if result.problem:
                report.problems.append(f"{where}, site {name}: {result.problem}")
                bad = True
                continue
            _check_user(f"{where}, site {name}", site["answer"], report)
            outcome.release = Release.from_json(site["answer"])
        else:
            outcome.problem, outcome.charged = site.get("problem"), site.get("charged")
        outcomes[name] = outcome
    if bad:
        return
    try:
        answer = assemble(str(kept.get("dataset", "")), str(kept.get("sql", "")), outcomes)
    except Exception as err:  # noqa: BLE001 - a damaged record is a finding, not a crash
        report.problems.append(f"{where}: the combined answer cannot be rebuilt from the receipts ({err})")
        return
    if not _drawn_again(output, federated_text(answer), federated_html(answer)):
        report.problems.append(f"{where}: the shown combined answer differs from the one its sites' signed releases "
                               "give (edited after release)")


def _expects_release(source: str) -> bool:
    first = source.lstrip().splitlines()[0] if source.strip() else ""
    return first.startswith("%%dpquery") and not re.search(r"--(preview|dummy|help)\b|(^|\s)-h\b", first)


def verify_notebook(notebook: dict[str, Any], keys: dict[str, bytes] | None = None,
                    users: list[str] | None = None) -> Report:
    report = Report(trusted=keys is not None, users=frozenset(users or ()))
    for index, cell in enumerate(notebook.get("cells") or []):
        if cell.get("cell_type") != "code":
            if LOOKS_LIKE_DP.search(_text(cell.get("source"))):
                report.problems.append(f"cell {index + 1} ({cell.get('cell_type')}): text that looks like a DP "
                                       "answer, with no receipt")
            continue
        source = _text(cell.get("source"))
        released = 0
        for number, output in enumerate(cell.get("outputs") or []):
            where = f"cell {index + 1}, output {number + 1}"
            kept = (output.get("metadata") or {}).get(receipts.METADATA_KEY)
            if isinstance(kept, dict) and kept.get("kind") in ("release", "federated"):
                report.checked += 1
                released += 1
                check = _check_release if kept["kind"] == "release" else _check_federated
                check(where, output, kept, keys, report)
            elif LOOKS_LIKE_DP.search(_shown(output)):
                report.problems.append(f"{where}: looks like a DP answer but carries no receipt (typed or pasted?)")
        if _expects_release(source) and not released:
            failed = any(o.get("output_type") == "stream" and o.get("name") == "stderr"
                         for o in cell.get("outputs") or [])
            if failed:
                report.info.append(f"cell {index + 1}: %%dpquery failed there (no release)")
            else:
                report.problems.append(f"cell {index + 1}: a %%dpquery cell with no released answer (not run, "
                                       "cleared, or its output replaced)")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lomas-verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", help="the .ipynb file to check")
    parser.add_argument("--key", action="append", default=None,
                        help="a service's public key (PEM file from lomas-admin key, base64, or receipts/key JSON); "
                        "repeat for several sites")
    parser.add_argument("--user", action="append", default=None,
                        help="the student's user name: a release made for anyone else is flagged (repeat when their "
                        "accounts at several sites have different names)")
    parser.add_argument("--json", action="store_true", help="print the findings and totals as JSON")
    args = parser.parse_args(argv)
    try:
        notebook = json.loads(Path(args.notebook).read_text())
    except (OSError, ValueError) as err:
        print(f"error: cannot read {args.notebook} as a notebook ({err.__class__.__name__})", file=sys.stderr)
        return 2
    keys = None
    if args.key:
        try:
            keys = dict(receipts.load_key(k) for k in args.key)
        except (OSError, ValueError) as err:
            print(f"error: --key: {err}", file=sys.stderr)
            return 2
    report = verify_notebook(notebook, keys, args.user)
    if args.json:
        print(json.dumps({"ok": report.ok, "checked": report.checked, "trusted_keys": report.trusted,
                          "problems": report.problems, "info": report.info,
                          **certificate.as_json(report.entries)}, indent=2))
        return 0 if report.ok else 1
    for line in report.problems:
        print(f"FLAGGED  {line}")
    for line in report.info:
        print(f"note     {line}")
    print(certificate.as_text(report.entries, "DP releases shown"))
    verdict = "OK" if report.ok else f"NOT OK: {len(report.problems)} finding(s)"
    print(f"{verdict}: {report.checked} DP output(s) checked in {args.notebook}")
    if not report.trusted:
        print("warning: no --key given, so a receipt shows only that its output was not edited, not which service "
              "signed it (anyone can make a key): pass each service's key from lomas-admin key")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
