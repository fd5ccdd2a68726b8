"""The JupyterHub room: Hub identities as lomas users (`identity`), the landing page (`landing`) and
`configure_hub` for a Hub's config (`config`). The `lomas-hub-service` command is wired in `app`.

May import: `service`, `store`, `errors` (never `api`); the domain knows nothing of the Hub.
"""

from __future__ import annotations

from .config import ADMIN_SCOPE, SERVICE_NAME, configure_hub
from .identity import LomasHubIdentityProvider, LomasHubUser

__all__ = ["ADMIN_SCOPE", "SERVICE_NAME", "LomasHubIdentityProvider", "LomasHubUser", "configure_hub"]
