"""A class of simulated students running the quickstart's requests at once, through a real JupyterHub.

    sudo .venv/bin/python benchmarks/hub_class.py [--students 50] [--cap-share 0.8]

Starts the Hub of the tests (configurable-http-proxy, the lomas service as its own OS user, 2 query workers),
creates the students as Hub users in one course group with a per-student grant of ε=1 (what the quickstart
spends) and a class cap of `cap-share` of the class's total demand, so the cap binds near the end. Every student
then runs the quickstart's sequence (whoami, datasets, describe, budget, two previews, a dummy query, three
charged queries, the archive) with their own Hub token, all students at once. Reports p50/p95 latency per kind
of request, throughput, and checks that no student's grant and not the class cap was exceeded. Writes
benchmarks/results/hub-class.md. Needs root (OS users) and `npm ci --prefix deploy/hub`.
"""

from __future__ import annotations

import argparse
import base64
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lomas_jupyter_server.demo import penguins_csv, penguins_metadata  # noqa: E402
from tests.hubs import Hub, hub_unavailable, running_hub  # noqa: E402

GROUP = "bench-class"
SPECIES = "SELECT species, COUNT(*) AS n, AVG(bill_length_mm) AS mean_bill FROM penguins GROUP BY species"
WIDE = ("SELECT species, island, sex, COUNT(*) AS n, AVG(bill_length_mm) AS bill, MEDIAN(bill_length_mm) AS "
        "bill_median, AVG(body_mass_g) AS mass, MEDIAN(body_mass_g) AS mass_median FROM penguins "
        "GROUP BY species, island, sex")
ISLAND = ("SELECT island, COUNT(*) AS n, MEDIAN(body_mass_g) AS median_mass FROM penguins WHERE sex = 'female' "
          "AND year BETWEEN 2008 AND 2009 GROUP BY island")
SEX = "SELECT sex, SUM(body_mass_g) AS total_mass FROM penguins GROUP BY sex"
# (kind, method, path, body): the quickstart notebook's requests, in its order
SEQUENCE = [
    ("read", "GET", "whoami", None),
    ("read", "GET", "datasets", None),
    ("read", "GET", "datasets/penguins", None),
    ("read", "GET", "budget", None),
    ("preview", "POST", "preview", {"dataset": "penguins", "sql": SPECIES, "epsilon": 0.5}),
    ("preview", "POST", "preview", {"dataset": "penguins", "sql": WIDE, "epsilon": 0.5, "delta": 1e-6}),
    ("dummy", "POST", "dummy", {"dataset": "penguins", "sql": SPECIES, "epsilon": 0.5}),
    ("query", "POST", "query", {"dataset": "penguins", "sql": SPECIES, "epsilon": 0.5}),
    ("query", "POST", "query", {"dataset": "penguins", "sql": ISLAND, "epsilon": 0.3}),
    ("query", "POST", "query", {"dataset": "penguins", "sql": SEX, "epsilon": 0.2}),
    ("read", "GET", "archive", None),
]
PER_STUDENT = 1.0  # the three charged queries' epsilons


def setup(hub: Hub, students: list[str], cap: float) -> None:
    body = {"name": "penguins", "format": "csv", "metadata": penguins_metadata(),
            "data_base64": base64.b64encode(penguins_csv().read_bytes()).decode()}
    assert hub.service("POST", "admin/datasets", "benchteacher", json=body).status_code == 201
    assert hub.service("POST", "admin/courses", "benchteacher", json={"name": GROUP, "hub_group": GROUP}).ok
    assert hub.service("PUT", f"admin/courses/{GROUP}/datasets", "benchteacher", json={
        "dataset": "penguins", "epsilon_per_student": PER_STUDENT, "epsilon_cap": cap, "delta_per_student": 1e-6,
        "delta_cap": 1e-4}).ok
    hub.set_group(GROUP, add=students)  # creates each Hub user and token first


def student(hub: Hub, name: str, start: threading.Barrier, timings: list[tuple[str, float, int, str]]) -> None:
    start.wait()
    for kind, method, path, body in SEQUENCE:
        t0 = time.perf_counter()
        r = hub.service(method, path, name, json=body)
        timings.append((kind, time.perf_counter() - t0, r.status_code, r.text[:200] if r.status_code >= 400 else ""))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--students", type=int, default=50)
    parser.add_argument("--cap-share", type=float, default=0.8)
    parser.add_argument("--groups-max-age", type=float, default=0.0,
                        help="LomasHubIdentityProvider.groups_max_age of the service (0: groups read per request)")
    parser.add_argument("--results", default=None, help="file stem in benchmarks/results (default: hub-class)")
    args = parser.parse_args()
    if hub_unavailable():
        sys.exit(f"cannot run a Hub here: {hub_unavailable()}")
    students = [f"benchstudent{i:02d}" for i in range(args.students)]
    cap = round(args.students * PER_STUDENT * args.cap_share, 6)
    service_args = (f"--LomasHubIdentityProvider.groups_max_age={args.groups_max_age}",)
    with running_hub([], "benchteacher", GROUP, service_args) as hub:
        setup(hub, students, cap)
        timings: list[tuple[str, float, int, str]] = []
        barrier = threading.Barrier(len(students))
        threads = [threading.Thread(target=student, args=(hub, s, barrier, timings)) for s in students]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        spending = hub.service("GET", f"admin/courses/{GROUP}/spending/penguins", "benchteacher").json()
        budgets = [hub.service("GET", "budget/penguins", s).json() for s in students]

    unexpected = [t for t in timings if t[2] >= 400 and not (t[0] == "query" and "has reached its cap" in t[3])]
    cap_refusals = sum(1 for t in timings if t[0] == "query" and "has reached its cap" in t[3])
    charged = sum(1 for t in timings if t[0] == "query" and t[2] == 201)
    over_grant = [b for b in budgets if b["epsilon_spent"] > b["epsilon_total"] + 1e-9]
    lines = [
        f"# A class of {args.students} students through JupyterHub",
        "",
        f"`sudo .venv/bin/python benchmarks/hub_class.py --students {args.students} --cap-share {args.cap_share} "
        f"--groups-max-age {args.groups_max_age:g}`"
        f" on this machine ({time.strftime('%Y-%m-%d')}, 2 cores; Hub, proxy, service with 2 query workers and "
        "this client all on it).",
        "",
        f"Each student ran the quickstart's {len(SEQUENCE)} requests with their own Hub token, all students at once "
        f"(a barrier): {len(timings)} requests in {wall:.1f} s, {len(timings) / wall:.1f} requests/s, "
        f"{charged / wall:.2f} charged queries/s.",
        "",
        "| request | count | p50 (ms) | p95 (ms) | max (ms) |",
        "|---|---|---|---|---|",
    ]
    for kind in ["read", "preview", "dummy", "query"]:
        values = [t[1] * 1000 for t in timings if t[0] == kind]
        lines.append(f"| {kind} | {len(values)} | {percentile(values, 0.5):.0f} | {percentile(values, 0.95):.0f} | "
                     f"{max(values):.0f} |")
    everything = [t[1] * 1000 for t in timings]
    lines += [
        f"| all | {len(everything)} | {percentile(everything, 0.5):.0f} | {percentile(everything, 0.95):.0f} | "
        f"{max(everything):.0f} |",
        "",
        f"- Class cap ε={cap:g}; the class spent ε={spending['epsilon_spent']:.6f} "
        f"({'within' if spending['epsilon_spent'] <= cap + 1e-9 else 'OVER'} the cap); {charged} queries charged, "
        f"{cap_refusals} refused by the class cap, nothing charged for those.",
        f"- Per-student grant ε={PER_STUDENT:g}: the most any student spent is "
        f"{max(b['epsilon_spent'] for b in budgets):.6f}; students over their grant: {len(over_grant)}.",
        f"- Other errors: {len(unexpected)}" + (f" (first: {unexpected[0]})" if unexpected else "") + ".",
    ]
    report = "\n".join(lines) + "\n"
    suffix = f"-groups-{args.groups_max_age:g}s" if args.groups_max_age else ""
    out = ROOT / "benchmarks" / "results" / f"{args.results or 'hub-class' + suffix}.md"
    out.write_text(report)
    print(report)
    if over_grant or spending["epsilon_spent"] > cap + 1e-9 or unexpected:
        sys.exit("FAILED: a budget was exceeded or a request failed")


if __name__ == "__main__":
    main()
