"""The demo: Palmer penguins (CC0) with hand-written public metadata, and a granted user."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from ..service.importing import import_dataset
from ..store import AdminStore

DEMO_DATASET = "penguins"


def penguins_csv() -> Path:
    return Path(str(resources.files("palmerpenguins") / "data" / "penguins.csv"))


def penguins_metadata() -> dict:
    return yaml.safe_load((resources.files(__package__) / "penguins.yaml").read_text())


def setup_demo(store: AdminStore, storage_dir: str | Path, username: str, epsilon: float = 10.0,
               role: str = "admin", progress=None) -> None:
    """Idempotent: imports penguins if missing, creates the user if missing, and sets the grant."""
    if store.get_dataset(DEMO_DATASET) is None:
        import_dataset(store, storage_dir, DEMO_DATASET, penguins_csv(), penguins_metadata(), actor="demo",
                       progress=progress)
    if store.get_user(username) is None:
        store.create_user(username, role, actor="demo")
    if store.get_grant(username, DEMO_DATASET) is None:
        store.set_grant(username, DEMO_DATASET, epsilon, 1e-6, actor="demo")
