"""`lomas-admin`: the admin CLI. It works on the store directly, so run it as the service's OS user."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.exc import SQLAlchemyError

from .engine.metadata_formats import FORMATS
from .engine.metadata_formats import convert as convert_metadata
from .errors import LomasError
from .paths import default_storage_dir
from .store import SQLStore, database_url

# Imported only by the commands that need them (polars, OpenDP): `lomas-admin user list` stays fast.
AS_JSON = False  # --json: every answer as JSON, for scripts


def _print(obj: Any, columns: list[str] | None = None) -> None:
    """A table for a list, `key: value` lines for one object; JSON with --json."""
    if AS_JSON:
        print(json.dumps(obj, indent=2))
        return
    if isinstance(obj, dict):
        width = max((len(k) for k in obj), default=0)
        for key, value in obj.items():
            print(f"{key.ljust(width)}  {_cell(value)}")
        return
    rows = list(obj)
    if not rows:
        print("(none)")
        return
    columns = columns or list(rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(",", ":"))
        return text if len(text) <= 60 else text[:57] + "..."
    return str(value)


def _dataset_row(record: Any) -> dict[str, Any]:
    meta = record.metadata
    return {"name": record.name, "version": record.version, "columns": len(meta.get("columns", {})),
            "max_rows": meta.get("max_rows"), "privacy_unit": meta.get("privacy_unit"),
            "created_at": record.created_at, "description": record.description}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lomas-admin", description="Administer a lomas DP service (run it as the service's OS user).",
        epilog="The demo (./scripts/demo.sh) keeps its store in ./.lomas: use --storage-dir .lomas, or export "
        "LOMAS_STORAGE_DIR=$PWD/.lomas. Commands that only read refuse a folder that holds no store.")
    parser.add_argument("--json", action="store_true", help="print answers as JSON (for scripts); default: tables")
    parser.add_argument("--storage-dir", default=None,
                        help="the service's storage folder (default: $LOMAS_STORAGE_DIR, else <jupyter data dir>/lomas)")
    parser.add_argument("--db-url", default=None,
                        help="the store's database, as the service's LomasApp.db_url (default: $LOMAS_DB_URL, else "
                        "lomas.sqlite3 in the storage folder); e.g. postgresql+psycopg://lomas@dbhost/lomas")
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="the store's schema").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", help="upgrade the store's schema to this release (back the database up first; a "
                  "SQLite file is copied aside automatically)")
    db.add_parser("revision", help="print the store's schema revision and the one this release needs")

    demo = sub.add_parser("demo", help="load the penguins demo dataset and grant a user a budget")
    demo.add_argument("--user", default=None, help="user to grant (default: your OS user, as admin)")
    demo.add_argument("--epsilon", type=float, default=10.0, help="the user's ε budget on penguins (default 10)")

    user = sub.add_parser("user", help="manage users").add_subparsers(dest="action", required=True)
    add = user.add_parser("add", help="create a user (then issue them a token)")
    add.add_argument("username", help="letters, digits, . _ - @")
    add.add_argument("--role", choices=["admin", "analyst"], default="analyst", help="default: analyst")
    user.add_parser("list", help="all users with their roles")
    remove = user.add_parser("remove", help="end a user's access (their ledger and releases are kept)")
    remove.add_argument("username", help="the user to remove")
    role = user.add_parser("role", help="make a user an admin or an analyst")
    role.add_argument("username", help="the user to change")
    role.add_argument("role", choices=["admin", "analyst"], help="the new role")

    token = sub.add_parser("token", help="issue or revoke API tokens").add_subparsers(dest="action", required=True)
    issue = token.add_parser("issue", help="print a new API token for a user (shown once)")
    issue.add_argument("username", help="the token's owner")
    issue.add_argument("--label", default="", help="a note, e.g. the machine it is for")
    revoke = token.add_parser("revoke", help="revoke all of a user's tokens")
    revoke.add_argument("username", help="the user whose tokens end")

    dataset = sub.add_parser("dataset", help="manage datasets").add_subparsers(dest="action", required=True)
    imp = dataset.add_parser("import", help="import CSV or Parquet with its metadata (YAML or JSON)")
    imp.add_argument("name", help="the dataset's name, used in FROM")
    imp.add_argument("data", help="a .csv or .parquet file, a folder of .parquet files, or Parquet in an object "
                     "store (s3://bucket/key.parquet, or a folder s3://bucket/prefix/); endpoint and credentials "
                     "from AWS_* environment variables")
    imp.add_argument("--to", default=None, metavar="URL",
                     help="write the checked copy under this object-store prefix (s3://bucket/prefix), not the "
                     "storage folder")
    imp.add_argument("--in-place", action="store_true",
                     help="use Parquet data where it is, a local file or folder or in an object store (checked, "
                     "streamed, not copied: for big data); it must not change afterwards")
    imp.add_argument("--metadata", type=Path, required=True, help="public metadata, YAML or JSON (see README)")
    imp.add_argument("--metadata-format", default="auto", choices=FORMATS,
                     help="the metadata's format: ours, Lomas's metadata YAML or SmartNoise SQL's (default: detected); "
                     "what a peer's format has and lomas does not is printed as notes")
    imp.add_argument("--description", default=None, help="overrides the metadata's description")
    dataset.add_parser("list", help="all datasets with their public metadata")
    draft = dataset.add_parser("draft", help="print metadata proposed from the data, as YAML with a REVIEW comment "
                               "for every choice taken from the data (nothing is stored)")
    draft.add_argument("data", type=Path, help="a .csv or .parquet file")

    grant = sub.add_parser("grant", help="set a user's budget on a dataset")
    grant.add_argument("username", help="the user")
    grant.add_argument("dataset", help="the dataset")
    grant.add_argument("--epsilon", type=float, required=True, help="total ε the user may spend on it")
    grant.add_argument("--delta", type=float, default=0.0, help="total δ (default 0: Gaussian noise never chosen)")

    budget = sub.add_parser("budget", help="show a user's budget on a dataset")
    budget.add_argument("username", help="the user")
    budget.add_argument("dataset", help="the dataset")

    course = sub.add_parser("course", help="courses: a Hub group of students, per-student grants, a class cap"
                            ).add_subparsers(dest="action", required=True)
    create = course.add_parser("create", help="create a course bound to a JupyterHub group")
    create.add_argument("name", help="the course's name")
    create.add_argument("--hub-group", required=True, help="the Hub group its students are in")
    course.add_parser("list", help="all courses with students, datasets and caps")
    attach = course.add_parser("dataset", help="attach a dataset, or top it up (grants only ever go up)")
    attach.add_argument("name", help="the course")
    attach.add_argument("dataset", help="the dataset")
    attach.add_argument("--epsilon-per-student", type=float, required=True, help="each student's ε grant")
    attach.add_argument("--epsilon-cap", type=float, required=True,
                        help="what the whole class may spend on it, together")
    attach.add_argument("--delta-per-student", type=float, default=0.0, help="each student's δ (default 0)")
    attach.add_argument("--delta-cap", type=float, default=0.0, help="the class's δ cap (default 0)")
    enrol = course.add_parser("add", help="enrol a user (they get the per-student grants)")
    enrol.add_argument("name", help="the course")
    enrol.add_argument("username", help="the student")
    leave = course.add_parser("remove", help="remove a student (their spending stays in the class pool)")
    leave.add_argument("name", help="the course")
    leave.add_argument("username", help="the student")
    share = course.add_parser("share", help="shared answers on or off: a question a classmate already paid for is "
                              "answered again, free, to the rest of the class (off by default)")
    share.add_argument("name", help="the course")
    share.add_argument("switch", choices=["on", "off"])
    spending = course.add_parser("spending", help="the class's spending on a dataset, per student and in total")
    spending.add_argument("name", help="the course")
    spending.add_argument("dataset", help="the dataset")

    req = sub.add_parser("request", help="students' budget requests: list, approve (all or part), decline"
                         ).add_subparsers(dest="action", required=True)
    listed = req.add_parser("list", help="budget requests, newest first")
    listed.add_argument("--status", choices=["pending", "approved", "declined"], default=None,
                        help="only these (default: all)")
    approve = req.add_parser("approve", help="grant what was asked (or --epsilon, less), within the class cap")
    approve.add_argument("request_id", type=int, help="the request's number")
    approve.add_argument("--epsilon", type=float, default=None, help="grant this much instead (at most what was asked)")
    approve.add_argument("--note", default="", help="a note the student sees")
    approve.add_argument("--raise-cap", action="store_true",
                         help="raise the class cap just enough if the approval would exceed it")
    decline = req.add_parser("decline", help="decline, with a note the student sees")
    decline.add_argument("request_id", type=int, help="the request's number")
    decline.add_argument("--note", default="", help="why")

    key = sub.add_parser("key", help="print the public key that checks this service's release receipts (PEM; "
                         "hand it to graders for lomas-verify --key); makes the signing key if there is none")
    key.add_argument("--key-file", default=None,
                     help="the signing key, as LomasApp.receipt_key_file (default: in the storage folder)")

    ledger = sub.add_parser("ledger", help="show the newest ledger rows")
    ledger.add_argument("--user", default=None, help="only this user's rows")
    ledger.add_argument("--limit", type=int, default=50, help="how many rows (default 50)")
    return parser


READ_ONLY = {("db", "revision"), ("user", "list"), ("dataset", "list"), ("budget", None), ("ledger", None), ("course", "list"),
             ("course", "spending"), ("request", "list")}


def _print_key(path: Path) -> int:
    from .receipts import ReceiptSigner

    key = ReceiptSigner.load_or_create(path).public_json()
    if AS_JSON:
        print(json.dumps(key, indent=2))
    else:
        print(key["pem"], end="")
        print(f"key id {key['key_id']} (Ed25519); lomas-verify NOTEBOOK --key FILE checks receipts with it",
              file=sys.stderr)
    return 0


def _print_draft(data: Path) -> int:
    from .service.importing import propose_metadata

    try:
        draft = propose_metadata(data)
    except LomasError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 1
    for note in draft["review"]:
        where = f"{note['column']}." if note["column"] else ""
        print(f"# REVIEW {where}{note['field']}: {note['note']}")
    print(yaml.safe_dump(draft["metadata"], sort_keys=False, default_flow_style=None, width=110), end="")
    return 0


def run(argv: list[str] | None = None) -> int:
    global AS_JSON
    args = build_parser().parse_args(argv)
    AS_JSON = args.json
    if args.command == "dataset" and args.action == "draft":
        return _print_draft(args.data)
    storage = Path(args.storage_dir or default_storage_dir())
    if args.command == "key":
        from .receipts import KEY_FILE

        return _print_key(Path(args.key_file) if args.key_file else storage / KEY_FILE)
    db_url = args.db_url or os.environ.get("LOMAS_DB_URL") or str(storage / "lomas.sqlite3")
    try:
        url = database_url(db_url)
    except LomasError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 2
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").exists():
        if (args.command, getattr(args, "action", None)) in READ_ONLY:
            print(f"error: no lomas store in {storage}. Point --storage-dir (or LOMAS_STORAGE_DIR) at the "
                  "service's storage folder; the demo's is ./.lomas", file=sys.stderr)
            return 2
        print(f"... creating a new lomas store in {storage}", file=sys.stderr)
    if args.command == "db":
        return _db_command(url, args.action)
    try:
        store = SQLStore(url)
    except LomasError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 2
    except SQLAlchemyError as err:  # the driver's own errors name hosts and ports: say only what went wrong
        print(f"error: cannot reach the store's database ({err.__class__.__name__})", file=sys.stderr)
        return 2
    actor = "cli"
    try:
        if args.command == "demo":
            import getpass

            from .demo import setup_demo

            username = args.user or getpass.getuser()
            setup_demo(store, storage, username, args.epsilon, progress=lambda m: print(f"... {m}", file=sys.stderr))
            budget = store.budget(username, "penguins")
            print(f"demo ready: user '{username}' may query 'penguins' "
                  f"(epsilon remaining {budget.epsilon_remaining:g})" if budget else "demo ready")
        elif args.command == "user":
            if args.action == "add":
                _print(store.create_user(args.username, args.role, actor).to_json())
            elif args.action == "list":
                _print([u.to_json() for u in store.list_users()])
            elif args.action == "remove":
                print(f"removed '{args.username}'; revoked {store.remove_user(args.username, actor)} token(s)")
            else:
                _print(store.set_role(args.username, args.role, actor).to_json())
        elif args.command == "token":
            if args.action == "issue":
                print(store.issue_token(args.username, args.label, actor))
            else:
                print(f"revoked {store.revoke_tokens(args.username, actor)} token(s)")
        elif args.command == "dataset":
            if args.action == "import":
                from .service.importing import import_dataset

                doc, notes = convert_metadata(yaml.safe_load(args.metadata.read_text()), args.metadata_format)
                for note in notes:
                    print(f"note: {note}", file=sys.stderr)
                from .engine.locations import is_remote

                source = args.data if is_remote(args.data) else Path(args.data)
                record = import_dataset(store, storage, args.name, source, doc, args.description, actor=actor,
                                        progress=lambda m: print(f"... {m}", file=sys.stderr),
                                        target_url=args.to, in_place=args.in_place)
                from .engine import metadata_warnings  # OpenDP loads only for this command

                for warning in metadata_warnings(record.metadata):
                    print(f"warning: {warning}", file=sys.stderr)
                _print(record.to_public_json())
            else:
                if AS_JSON:
                    _print([d.to_public_json() for d in store.list_datasets()])
                else:  # the whole metadata is `lomas-admin --json dataset list` (or the sidebar's Datasets part)
                    _print([_dataset_row(d) for d in store.list_datasets()])
        elif args.command == "grant":
            _print(store.set_grant(args.username, args.dataset, args.epsilon, args.delta, actor).to_json())
        elif args.command == "budget":
            budget = store.budget(args.username, args.dataset)
            if budget is None:
                raise LomasError(f"'{args.username}' has no grant on '{args.dataset}'")
            _print(budget.to_json())
        elif args.command == "course":
            _print(_course_command(store, args, actor))
        elif args.command == "ledger":
            _print(store.ledger(args.user, args.limit))
        elif args.command == "request":
            if args.action == "list":
                _print([r.to_json() for r in store.list_budget_requests(status=args.status)])
            else:
                _print(store.decide_budget_request(
                    args.request_id, args.action == "approve", actor, epsilon=getattr(args, "epsilon", None),
                    note=args.note, raise_cap=getattr(args, "raise_cap", False)).to_json())
    except LomasError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # the reader of our output left (`| head`): main() ends quietly
    except (OSError, yaml.YAMLError) as err:
        print(f"error: {err.__class__.__name__}: {err}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


def _db_command(url: Any, action: str) -> int:
    from .store import migrate
    from .store.sql import make_engine

    engine = make_engine(url)
    try:
        if action == "revision":
            with engine.connect() as conn:
                _print({"revision": migrate.current_revision(conn), "head": migrate.head_revision()})
            return 0
        found, head = migrate.upgrade(engine, allow=True)
        print(f"the store is at revision {head}" + ("" if found == head else f" (upgraded from {found or 'empty'})"))
        return 0
    except LomasError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 2
    except SQLAlchemyError as err:
        print(f"error: cannot reach the store's database ({err.__class__.__name__})", file=sys.stderr)
        return 2
    finally:
        engine.dispose()


def _course_command(store: SQLStore, args: argparse.Namespace, actor: str) -> Any:
    if args.action == "create":
        return store.create_course(args.name, args.hub_group, actor).to_json()
    if args.action == "list":
        return [c.to_json() for c in store.list_courses()]
    if args.action == "dataset":
        return store.set_course_dataset(args.name, args.dataset, args.epsilon_per_student, args.delta_per_student,
                                        args.epsilon_cap, args.delta_cap, actor).to_json()
    if args.action == "add":
        return store.add_course_member(args.name, args.username, actor).to_json()
    if args.action == "remove":
        return store.remove_course_member(args.name, args.username, actor).to_json()
    if args.action == "share":
        return store.set_course_sharing(args.name, args.switch == "on", actor).to_json()
    return store.class_spending(args.name, args.dataset).to_json()


def main() -> None:
    try:
        code = run()
        sys.stdout.flush()
    except BrokenPipeError:  # `lomas-admin ledger | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)
