"""Issue 23: one question asked of several sites. Three real standalone services on 127.0.0.1, each with its own
users, tokens, ledger and a different slice of one table with known totals."""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import nbformat
import numpy as np
import polars as pl
import pytest
from nbclient import NotebookClient
from scipy.stats import binom

from lomas_jupyter import Client, LomasError, col
from lomas_jupyter import len as lj_len
from lomas_jupyter.client import SITES
from lomas_jupyter.display import federated_text
from lomas_jupyter.noise_sums import Draw, half_width

from .servers import BIN, add_analyst, lomas_admin, running_server

KINDS = ["x", "y", "z"]
SIZES = {"north": 300, "south": 500, "east": 200}
META = {"privacy_unit": 1, "max_rows": 1000, "description": "visits",
        "columns": {"kind": {"type": "string", "nullable": False, "categories": KINDS},
                    "value": {"type": "int", "nullable": True, "bounds": [0, 100]},
                    "score": {"type": "float", "nullable": False, "bounds": [-10.0, 10.0]}}}
POOLED = "SELECT kind, COUNT(*) AS n, SUM(value) AS total, AVG(value) AS mean, SUM(score) AS s FROM visits GROUP BY kind"


def _slice(name: str, rows: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    value = rng.integers(0, 101, rows).astype(float)
    value[rng.random(rows) < 0.1] = np.nan
    return pl.DataFrame({"kind": np.array(KINDS)[rng.integers(0, 3, rows)],
                         "value": pl.Series(value).fill_nan(None).cast(pl.Int64),
                         "score": rng.uniform(-10, 10, rows)})


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict]]:
    root = tmp_path_factory.mktemp("sites")
    (root / "visits.json").write_text(json.dumps(META))
    out: dict[str, dict] = {}
    with ExitStack() as stack:
        for n, (name, rows) in enumerate(SIZES.items()):
            storage = root / name / "storage"
            frame = _slice(name, rows, n)
            frame.write_parquet(root / f"{name}.parquet")
            lomas_admin(storage, "dataset", "import", "visits", str(root / f"{name}.parquet"), "--metadata",
                        str(root / "visits.json"))
            token = add_analyst(storage, "ana", {"visits": 1000.0})
            env = {"JUPYTER_CONFIG_DIR": str(root / name / "config"), "JUPYTER_DATA_DIR": str(root / name / "data")}
            url, _ = stack.enter_context(running_server(
                "jupyter-lomas", [f"--LomasApp.storage_dir={storage}", "--LomasApp.workers=1",
                                  "--LomasApp.pricing_workers=1"], root / name, env))
            out[name] = {"url": url, "token": token, "frame": frame, "storage": storage}
        yield out


@pytest.fixture
def client(sites: dict[str, dict]) -> Iterator[Client]:
    for site in list(SITES):
        SITES.remove(site.name)
    for name, site in sites.items():
        SITES.add(name, site["url"], site["token"])
    yield Client(sites["north"]["url"], sites["north"]["token"])
    for site in list(SITES):
        SITES.remove(site.name)


def _truth(sites: dict[str, dict]) -> dict[str, dict[str, float]]:
    pooled = pl.concat([s["frame"] for s in sites.values()])
    grouped = pooled.group_by("kind").agg(n=pl.len(), total=pl.col("value").sum(), mean=pl.col("value").mean(),
                                          s=pl.col("score").sum())
    return {row["kind"]: row for row in grouped.to_dicts()}


def _spent(sites: dict[str, dict], client_for: str) -> float:
    site = sites[client_for]
    return Client(site["url"], site["token"]).budget("visits")["epsilon_spent"]


def test_the_sum_of_noises_interval_is_exact_where_known_and_valid_where_not() -> None:
    """Gaussians add exactly; one draw's interval is its own; a Laplace sum's is checked by simulation."""
    one = half_width([Draw("gaussian", False, 3.0)])
    assert 3 * 1.959964 <= one <= 3 * 1.959964 * 1.002
    three = half_width([Draw("gaussian", False, 1.0), Draw("gaussian", False, 2.0), Draw("gaussian", False, 2.0)])
    assert 3 * 1.959964 <= three <= 3 * 1.959964 * 1.003  # sqrt(1 + 4 + 4) = 3
    assert 12 <= half_width([Draw("laplace", True, 4.0)]) < 12.02  # the service's own count accuracy: 12
    rng = np.random.default_rng(7)
    draws = [Draw("laplace", False, 1.0), Draw("laplace", False, 2.5, weight=-1.5)]
    t = half_width(draws)
    sample = rng.laplace(0, 1.0, 400_000) - 1.5 * rng.laplace(0, 2.5, 400_000)
    assert 0.95 <= float(np.mean(np.abs(sample) <= t)) <= 0.953  # valid, and tight


def test_one_cell_at_three_sites_covers_the_pooled_truth(sites: dict[str, dict], client: Client) -> None:
    """Combined COUNT, SUM (centred, nulls), AVG and a float SUM cover the pooled truth at their stated rate:
    60 releases x 3 groups x 4 aggregates = 720 intervals, and the COUNT alone has 180 (with SUM: 360)."""
    truth = _truth(sites)
    misses, checked = 0, 0
    before = {name: _spent(sites, name) for name in sites}
    charged = {name: 0.0 for name in sites}
    for i in range(60):
        answer = client.federated("visits", POOLED, epsilon=1.0 + i / 1000, fresh=True)
        assert answer.complete and answer.covered == list(SIZES)
        for name, cost in answer.cost.items():
            charged[name] += cost["epsilon"]
        for row, interval in zip(answer.rows, answer.intervals):
            for column in ("n", "total", "mean", "s"):
                low, high = interval[column]
                assert low <= row[column] <= high
                checked += 1
                misses += not (low - 1e-9 <= truth[row["kind"]][column] <= high + 1e-9)
    assert checked == 720
    # at a 95% rate, more misses than this happen with probability below 1e-6
    assert misses <= binom.ppf(1 - 1e-6, checked, 0.05), misses
    for name in sites:  # each site's ledger charged exactly its own price, and nothing else
        assert _spent(sites, name) - before[name] == pytest.approx(charged[name], abs=1e-9)
        assert charged[name] <= sum(1.0 + i / 1000 for i in range(60)) + 1e-9


def test_a_thousand_combined_releases_cover_at_their_stated_rate(sites: dict[str, dict], client: Client) -> None:
    """1,000 federated releases (3,000 site releases) of the pooled row count and value sum per kind: each
    combined interval covers the pooled truth at 95%, overall and per group, and no release's miss is shared."""
    truth = _truth(sites)
    sql = "SELECT kind, COUNT(*) AS n, SUM(value) AS total FROM visits GROUP BY kind"
    misses = {(kind, column): 0 for kind in KINDS for column in ("n", "total")}
    releases = 1000
    for i in range(releases):
        answer = client.federated("visits", sql, epsilon=0.5 + i / 100000, fresh=True)
        assert answer.complete
        for row, interval in zip(answer.rows, answer.intervals):
            for column in ("n", "total"):
                low, high = interval[column]
                misses[(row["kind"], column)] += not (low - 1e-9 <= truth[row["kind"]][column] <= high + 1e-9)
    # each of the 6 (group, aggregate) series alone, and all 6,000 intervals together: more misses than these
    # happen with probability below 1e-6 each (and far fewer than these would mean intervals wider than stated:
    # below the 1e-6 quantile too)
    for series, missed in misses.items():
        assert binom.ppf(1e-6, releases, 0.05) <= missed <= binom.ppf(1 - 1e-6, releases, 0.05), (series, missed)
    total = sum(misses.values())
    assert binom.ppf(1e-6, 6 * releases, 0.05) <= total <= binom.ppf(1 - 1e-6, 6 * releases, 0.05), total


def test_combined_intervals_follow_from_the_sites_noise(sites: dict[str, dict], client: Client) -> None:
    """A combined count's interval is narrower than the sum of the sites' own, wider than any one; the
    per-site answers are beside it, each with its own charge."""
    answer = client.federated("visits", "SELECT COUNT(*) AS n FROM visits", epsilon=0.7, fresh=True)
    width = answer.intervals[0]["n"][1] - answer.rows[0]["n"]
    site_widths = [r.intervals[0]["n"][1] - r.rows[0]["n"] for r in answer.releases.values()]
    assert max(site_widths) < width < sum(site_widths)
    assert set(answer.per_site()["site"]) == set(SIZES)
    assert answer.rows[0]["n"] == sum(r.raw["statistics"][0][0] for r in answer.releases.values()) or \
        answer.rows[0]["n"] == 0
    assert all(c["epsilon"] > 0 for c in answer.cost.values())


def test_a_refusing_site_means_no_charge_anywhere(sites: dict[str, dict], client: Client) -> None:
    before = {name: _spent(sites, name) for name in sites}
    # east's admin lowers the analyst's grant there: east alone cannot afford the query
    lomas_admin(sites["east"]["storage"], "grant", "ana", "visits", "--epsilon", str(before["east"] + 0.1))
    try:
        with pytest.raises(LomasError) as info:
            client.federated("visits", "SELECT COUNT(*) AS n FROM visits", epsilon=0.5)
    finally:
        lomas_admin(sites["east"]["storage"], "grant", "ana", "visits", "--epsilon", "1000")
    assert "nothing was spent at any site: east: not enough budget" in str(info.value)
    # a quantile cannot be combined: refused before anything is spent
    with pytest.raises(LomasError, match="cannot be combined across sites"):
        client.federated("visits", "SELECT MEDIAN(value) FROM visits", epsilon=0.5)
    with pytest.raises(LomasError, match="filter or sort the combined frame"):
        client.federated("visits", "SELECT kind, COUNT(*) AS n FROM visits GROUP BY kind HAVING COUNT(*) > 10",
                         epsilon=0.5)
    with pytest.raises(LomasError, match="arithmetic on aggregates"):
        client.federated("visits", "SELECT SUM(value) / COUNT(*) AS r FROM visits", epsilon=0.5)
    # a site that is down
    SITES.add("gone", "http://127.0.0.1:9", "x")
    with pytest.raises(LomasError, match="gone: the DP service at .* is unreachable"):
        client.federated("visits", "SELECT COUNT(*) AS n FROM visits", epsilon=0.5)
    assert {name: _spent(sites, name) for name in sites} == before
    # --allow-partial: the others answer, and the answer says which sites it covers
    answer = client.federated("visits", "SELECT COUNT(*) AS n FROM visits", epsilon=0.5, allow_partial=True,
                              fresh=True)
    assert not answer.complete and answer.covered == list(SIZES) and "not gone" in answer.notes[0]
    assert "gone" not in answer.cost


def test_a_site_that_fails_after_charging_is_reported_with_its_charge(sites: dict[str, dict],
                                                                     client: Client) -> None:
    """East's stored data file is damaged after import: its preview (public metadata) passes, its worker fails
    once it reads the data, and east charges the attempt (such a failure can depend on the data). The combined
    answer covers the others, says east failed, and shows east's charge as east's own ledger has it."""
    (data,) = (sites["east"]["storage"] / "datasets" / "visits").glob("*.parquet")
    kept = data.read_bytes()
    before = {name: _spent(sites, name) for name in sites}
    data.write_bytes(b"not a parquet file" * 64)
    try:
        answer = client.federated("visits", "SELECT COUNT(*) AS n FROM visits", epsilon=0.25, fresh=True)
    finally:
        data.write_bytes(kept)
    after = {name: _spent(sites, name) for name in sites}
    assert not answer.complete and answer.covered == ["north", "south"]
    assert "east: failed" in answer.notes[0] and "charged" in answer.notes[0]
    price = answer.releases["north"].cost["epsilon"]
    assert after["east"] - before["east"] == pytest.approx(price, abs=1e-12)  # east charged its price
    assert answer.cost["east"]["epsilon"] == pytest.approx(after["east"] - before["east"], abs=1e-12)
    for name in ("north", "south"):
        assert after[name] - before[name] == pytest.approx(answer.cost[name]["epsilon"], abs=1e-12)
    shown = federated_text(answer)  # what the cell shows
    assert shown.startswith("PARTIAL") and "not included: failed" in shown
    assert str(sites["east"]["storage"]) not in shown and "parquet" not in shown  # no paths, no file formats
    (east_line,) = [line for line in shown.splitlines() if line.strip().startswith("east")]
    assert f"{price:.4g}"[:4] in east_line, east_line
    # the same question again, once east's file is back: east answers
    again = client.federated("visits", "SELECT COUNT(*) AS n FROM visits", epsilon=0.25, fresh=True)
    assert again.complete


def test_sites_must_agree_on_the_columns_used(sites: dict[str, dict], client: Client, tmp_path: Path) -> None:
    """A fourth site whose bounds for `value` differ: one clear line, nothing spent; columns the query does
    not use may differ."""
    storage = tmp_path / "storage"
    other = {**META, "columns": {**META["columns"], "value": {"type": "int", "nullable": True, "bounds": [0, 500]}}}
    (tmp_path / "m.json").write_text(json.dumps(other))
    _slice("west", 100, 9).write_parquet(tmp_path / "w.parquet")
    lomas_admin(storage, "dataset", "import", "visits_w", str(tmp_path / "w.parquet"), "--metadata",
                str(tmp_path / "m.json"))
    token = add_analyst(storage, "ana", {"visits_w": 10.0})
    env = {"JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    with running_server("jupyter-lomas", [f"--LomasApp.storage_dir={storage}", "--LomasApp.workers=1"], tmp_path,
                        env) as (url, _):
        SITES.add("west", url, token, {"visits": "visits_w"})  # a federated name mapped to the site's own
        before = {name: _spent(sites, name) for name in sites}
        with pytest.raises(LomasError) as info:
            client.federated("visits", "SELECT AVG(value) AS m FROM visits", epsilon=0.5)
        assert "disagree on column value" in str(info.value) and "[0, 500]" in str(info.value)
        assert "nothing was spent" in str(info.value)
        assert {name: _spent(sites, name) for name in sites} == before
        assert Client(url, token).budget("visits_w")["epsilon_spent"] == 0
        answer = client.federated("visits", "SELECT kind, SUM(score) AS s FROM visits GROUP BY kind", epsilon=0.5,
                                  fresh=True)
        assert answer.covered == [*SIZES, "west"]
        listed = {row["site"]: row for row in SITES.status("visits")}
        assert listed["west"]["dataset"] == "visits_w" and listed["west"]["reachable"]


def test_the_builder_and_sql_ask_the_same_of_every_site_and_replays_are_free(sites: dict[str, dict],
                                                                             client: Client) -> None:
    query = client.table("visits").group_by("kind").agg(col("value").mean().alias("mean"), lj_len().alias("n"))
    first = query.federated(epsilon=0.3)
    again = client.federated("visits", "SELECT kind, AVG(value) AS mean, COUNT(*) AS n FROM visits GROUP BY kind",
                             epsilon=0.3)
    assert all(r.replay for r in again.releases.values()) and again.rows == first.rows
    assert all(c["epsilon"] == 0 for c in again.cost.values())
    planned = client.federated("visits", "SELECT COUNT(*) AS n FROM visits", epsilon=0.3, preview=True)
    assert planned.ready == list(SIZES) and planned.accuracy["n"] > 0
    assert math.isclose(sum(p.preview["cost"]["epsilon"] for p in planned.sites.values()), 0.9, rel_tol=0.01)


def test_a_notebook_asks_three_sites_and_restart_and_run_all_is_free(sites: dict[str, dict],
                                                                    tmp_path: Path) -> None:
    """`%lomas sites add` with tokens from the environment, `%lomas sites`, `%%dpquery --sites`; run twice:
    the second run spends nothing at any site."""
    cells = ["%load_ext lomas_jupyter"]
    cells += [f"%lomas sites add {name} {site['url']} $TOKEN_{name.upper()}" for name, site in sites.items()]
    cells += ["%lomas sites visits",
              "%%dpquery --sites north,south,east visits --epsilon 0.25 -o combined\n"
              "SELECT kind, COUNT(*) AS n, AVG(value) AS mean FROM visits GROUP BY kind",
              "print(combined.height, combined.columns)",
              "%%dpquery --sites north,south,east visits --epsilon 0.25\nSELECT MEDIAN(value) FROM visits"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    env = {f"TOKEN_{name.upper()}": site["token"] for name, site in sites.items()}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        spent = []
        for _ in range(2):
            before = {name: _spent(sites, name) for name in sites}
            done = NotebookClient(nbformat.from_dict(json.loads(json.dumps(nb))), timeout=240,
                                  kernel_name="python3", allow_errors=True,
                                  resources={"metadata": {"path": str(tmp_path)}}).execute()
            spent.append({name: _spent(sites, name) - before[name] for name in sites})
        outputs = ["".join(o.get("text", "") + json.dumps(o.get("data", {}), ensure_ascii=False) for o in c.get("outputs", []))
                   for c in done.cells]
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert "site north:" in outputs[1] and "as ana" in outputs[1]
    assert "ε left on visits at each site" in outputs[4] and "yes" in outputs[4]
    assert "Combined DP answer on visits from 3 site(s): north, south, east" in outputs[5]
    assert "3 ['kind', 'n', 'mean']" in outputs[6]
    assert "LomasError" in outputs[7] and "cannot be combined across sites" in outputs[7]
    assert all(v > 0 for v in spent[0].values()) and all(v == 0 for v in spent[1].values()), spent
    # the combined answer verifies against the three sites' keys, offline; an edited digit in it does not
    keys = []
    for name, site in sites.items():
        keys += ["--key", str(tmp_path / f"{name}.pem")]
        (tmp_path / f"{name}.pem").write_text(lomas_admin(site["storage"], "key"))
    notebook = tmp_path / "sites.ipynb"
    nbformat.write(done, notebook)
    checked = subprocess.run([str(BIN / "lomas-verify"), str(notebook), *keys], capture_output=True, text=True)
    assert checked.returncode == 0 and "OK: 1 DP output(s) checked" in checked.stdout, checked.stdout
    assert checked.stdout.count("(replay)") == 3  # the second run's answers: replays at every site
    doc = json.loads(notebook.read_text())
    shown = doc["cells"][5]["outputs"][-1]["data"]
    text = "".join(shown["text/plain"])
    at = text.index("[") - 3
    shown["text/plain"] = text[:at] + str((int(text[at]) + 1) % 10 if text[at].isdigit() else 7) + text[at + 1:]
    notebook.write_text(json.dumps(doc))
    checked = subprocess.run([str(BIN / "lomas-verify"), str(notebook), *keys], capture_output=True, text=True)
    assert checked.returncode == 1 and "edited after release" in checked.stdout, checked.stdout
