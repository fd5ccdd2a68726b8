"""The DP services (sites) this kernel's analyst has accounts on, by a short name of their choosing.

A site is a service with its own users, ledger and budgets; nothing is shared between sites. Only the kernel
knows the list (never a service): `%lomas sites add NAME URL [TOKEN]`, or `Client.sites.add(...)`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .errors import LomasError

NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,39}$")


@dataclass
class Site:
    name: str
    url: str
    token: str = field(default="", repr=False)
    datasets: dict[str, str] = field(default_factory=dict)  # a federated dataset name -> this site's dataset
    connect: Callable[[str, str], Any] | None = field(default=None, repr=False, compare=False)
    _client: Any = field(default=None, repr=False, compare=False)

    @property
    def client(self) -> Any:
        """The site's `Client` (made by the registry's `connect`: this module imports no client)."""
        if self._client is None:
            assert self.connect is not None
            self._client = self.connect(self.url, self.token)
        return self._client

    def dataset(self, federated: str) -> str:
        """This site's name for a federated dataset (the same name unless mapped)."""
        return self.datasets.get(federated, federated)


def resolve_token(token: str) -> str:
    """A token as given, or `$NAME` for one kept in an environment variable (out of the notebook)."""
    if token.startswith("$"):
        value = os.environ.get(token[1:])
        if value is None:
            raise LomasError(f"the environment variable {token[1:]} is not set")
        return value
    return token


class Sites:
    """The registered sites, in the order they were added."""

    def __init__(self, connect: Callable[[str, str], Any]) -> None:
        self._sites: dict[str, Site] = {}
        self.connect = connect  # (url, token) -> a Client

    def add(self, name: str, url: str, token: str = "", datasets: dict[str, str] | None = None) -> Site:
        """Register (or replace) a site. `token` may be `$VAR` to read it from the environment; `datasets` maps
        a federated dataset name to the site's own name for it."""
        if not NAME.match(name):
            raise LomasError(f"site name '{name[:40]}' must start with a letter and hold only letters, digits, - "
                             "and _ (at most 40)")
        if not re.match(r"^https?://", url):
            raise LomasError(f"site {name}: the URL must start with http:// or https://")
        site = Site(name, url.rstrip("/") + "/", resolve_token(token), dict(datasets or {}), self.connect)
        self._sites[name] = site
        return site

    def remove(self, name: str) -> None:
        if self._sites.pop(name, None) is None:
            raise LomasError(f"no site named {name}")

    def get(self, name: str) -> Site:
        try:
            return self._sites[name]
        except KeyError:
            known = ", ".join(self._sites) or "none yet: %lomas sites add NAME URL [TOKEN]"
            raise LomasError(f"no site named {name} (sites: {known})") from None

    def select(self, names: list[str] | None) -> list[Site]:
        """The named sites (all, if None); at least one."""
        chosen = [self.get(n) for n in names] if names else list(self._sites.values())
        if not chosen:
            raise LomasError("no sites registered: %lomas sites add NAME URL [TOKEN]")
        if len({s.name for s in chosen}) != len(chosen):
            raise LomasError("a site is named twice")
        return chosen

    def __iter__(self) -> Iterator[Site]:
        return iter(list(self._sites.values()))

    def __len__(self) -> int:
        return len(self._sites)

    def status(self, dataset: str | None = None) -> list[dict[str, Any]]:
        """Per site: reachable or not, who the analyst is there, and the budget left on `dataset` (or on every
        dataset they have a grant for). Asked of all sites at once; a down site is a row, not an error."""
        def ask(site: Site) -> dict[str, Any]:
            row: dict[str, Any] = {"site": site.name, "url": site.url}
            try:
                me = site.client.whoami()
                row.update(reachable=True, user=me["username"])
                if dataset is not None:
                    budget = site.client.budget(site.dataset(dataset))
                    row.update(dataset=site.dataset(dataset), epsilon_remaining=budget["epsilon_remaining"],
                               delta_remaining=budget["delta_remaining"])
                else:
                    row["budgets"] = {b["dataset"]: b["epsilon_remaining"] for b in site.client.budget()}
            except LomasError as err:
                row.setdefault("reachable", False)
                row["problem"] = str(err)
            return row

        sites = list(self)
        if not sites:
            return []
        with ThreadPoolExecutor(max_workers=min(8, len(sites))) as pool:
            return list(pool.map(ask, sites))
