"""The admin's command line, as an admin types it: helpful help, no silent empty stores, pipes that close."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .servers import BIN, lomas_admin


def test_every_subcommand_explains_its_arguments() -> None:
    for args, expected in ((["grant", "--help"], "total ε the user may spend"),
                           (["dataset", "import", "--help"], "public metadata, YAML or JSON"),
                           (["user", "add", "--help"], "default: analyst"),
                           (["--help"], "./.lomas")):
        out = subprocess.run([str(BIN / "lomas-admin"), *args], capture_output=True, text=True, check=True)
        assert expected in out.stdout, (args, out.stdout)


def test_a_read_on_a_folder_without_a_store_is_refused_and_creates_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "not-the-store"
    out = subprocess.run([str(BIN / "lomas-admin"), "--storage-dir", str(empty), "user", "list"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "no lomas store in" in out.stderr and "--storage-dir" in out.stderr
    assert not (empty / "lomas.sqlite3").exists()
    # writing commands may start a new store, and say so
    made = subprocess.run([str(BIN / "lomas-admin"), "--storage-dir", str(empty), "user", "add", "ann"],
                          capture_output=True, text=True, check=True)
    assert "creating a new lomas store" in made.stderr and (empty / "lomas.sqlite3").exists()


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`lomas-admin ledger | head`: the reader is gone before the output is written. Here stdout is a pipe whose
    reading end is already closed, so the write fails every time, not only when the output outruns `head`."""
    storage = tmp_path / "store"
    lomas_admin(storage, "user", "add", "ann")
    code = ("import os, sys\n"
            "read_end, write_end = os.pipe()\nos.close(read_end)\nos.dup2(write_end, 1)\n"
            "from lomas_jupyter_server.cli import main\n"
            f"sys.argv = ['lomas-admin', '--storage-dir', {str(storage)!r}, 'user', 'list']\nmain()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "BrokenPipe" not in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_jupyter_lomas_help_shows_the_service_options() -> None:
    out = subprocess.run([str(BIN / "jupyter-lomas"), "--help"], capture_output=True, text=True, check=True)
    for option in ("--storage-dir", "--query-timeout", "--max-epsilon-per-query", "--timing-padding", "--port"):
        assert option in out.stdout, option
    assert "lomas-admin --storage-dir /srv/lomas user add boss" in out.stdout


def test_an_instructor_runs_a_course_from_the_command_line(tmp_path: Path) -> None:
    import json

    storage = tmp_path / "store"
    lomas_admin(storage, "demo", "--user", "prof")
    lomas_admin(storage, "user", "add", "sam")
    lomas_admin(storage, "course", "create", "stats101", "--hub-group", "stats101-students")
    lomas_admin(storage, "course", "dataset", "stats101", "penguins", "--epsilon-per-student", "2",
                "--epsilon-cap", "5")
    course = json.loads(lomas_admin(storage, "--json", "course", "add", "stats101", "sam"))
    assert course["members"] == ["sam"] and course["datasets"][0]["epsilon_cap"] == 5.0
    assert json.loads(lomas_admin(storage, "--json", "budget", "sam", "penguins"))["epsilon_total"] == 2.0
    spending = json.loads(lomas_admin(storage, "--json", "course", "spending", "stats101", "penguins"))
    assert spending["epsilon_spent"] == 0.0 and set(spending["per_student"]) == {"sam"}

    # sam asks for more; the instructor answers from the command line, within the class cap (the class may spend 5)
    from lomas_jupyter_server.store.sql import SQLStore

    store = SQLStore(storage / "lomas.sqlite3")
    asked = store.request_budget("sam", "penguins", 6.0, 0.0, "for the project").id
    store.close()
    waiting = json.loads(lomas_admin(storage, "--json", "request", "list", "--status", "pending"))
    assert [(r["id"], r["username"], r["epsilon"]) for r in waiting] == [(asked, "sam", 6.0)]
    over = subprocess.run([str(BIN / "lomas-admin"), "--storage-dir", str(storage), "request", "approve", str(asked)],
                          capture_output=True, text=True)
    assert over.returncode == 2 and "left under its cap" in over.stderr and "Traceback" not in over.stderr
    done = json.loads(lomas_admin(storage, "--json", "request", "approve", str(asked), "--epsilon", "1.5",
                                  "--note", "the rest next week"))
    assert done["status"] == "approved" and done["granted_epsilon"] == 1.5
    assert json.loads(lomas_admin(storage, "--json", "budget", "sam", "penguins"))["epsilon_total"] == 3.5
    assert json.loads(lomas_admin(storage, "--json", "request", "list", "--status", "pending")) == []


def test_a_draft_is_printed_for_review_and_imports_once_saved(tmp_path: Path) -> None:
    from lomas_jupyter_server.demo import penguins_csv

    storage = tmp_path / "store"
    out = subprocess.run([str(BIN / "lomas-admin"), "--storage-dir", str(storage), "dataset", "draft",
                          str(penguins_csv())], capture_output=True, text=True, check=True)
    assert not storage.exists()  # a draft stores nothing
    assert out.stdout.startswith("# REVIEW privacy_unit:") and "# REVIEW species.categories:" in out.stdout
    (tmp_path / "penguins.yaml").write_text(out.stdout)
    lomas_admin(storage, "dataset", "import", "birds", str(penguins_csv()), "--metadata", str(tmp_path / "penguins.yaml"))
    assert '"name": "birds"' in lomas_admin(storage, "--json", "dataset", "list")
    # issue 24.10: a table by default, one line a dataset, not its whole metadata
    table = lomas_admin(storage, "dataset", "list").splitlines()
    assert table[0].split()[:3] == ["name", "version", "columns"] and len(table) == 3  # header, rule, birds
    assert any(line.startswith("birds ") for line in table) and "categories" not in "\n".join(table)
    bad = subprocess.run([str(BIN / "lomas-admin"), "dataset", "draft", str(tmp_path / "penguins.yaml")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: data must be CSV or Parquet (.csv or .parquet)"


def test_a_relative_storage_dir_stores_absolute_data_paths(tmp_path: Path) -> None:
    """Issue 17.10: `lomas-admin --storage-dir store ...` from one folder, the service from another."""
    from lomas_jupyter_server.store import SQLStore

    subprocess.run([str(BIN / "lomas-admin"), "--storage-dir", "store", "demo", "--user", "boss"], cwd=tmp_path,
                   capture_output=True, text=True, check=True)
    record = SQLStore(tmp_path / "store" / "lomas.sqlite3").get_dataset("penguins")
    assert record is not None
    path = Path(record.parquet_path)
    assert path.is_absolute() and path.is_file() and path.is_relative_to(tmp_path / "store")


def test_the_cli_does_not_import_jupyter_server_or_the_engine_for_store_commands(tmp_path: Path) -> None:
    """Issue 24.10: `lomas-admin user list` took 5 s, importing Jupyter Server, polars and OpenDP. The modules a
    store command loads are checked, not its time."""
    storage = tmp_path / "store"
    lomas_admin(storage, "user", "add", "ann")
    code = ("import sys\nfrom lomas_jupyter_server.cli import run\n"
            f"run(['--storage-dir', {str(storage)!r}, 'user', 'list'])\n"
            "print(sorted(m for m in ('jupyter_server', 'polars', 'opendp', 'tornado') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]", out
    assert out.splitlines()[0].split() == ["username", "role", "created_at"] and "ann" in out
