# A complete JupyterHub config for a class with the lomas DP service: start from it, then choose a real
# authenticator. Run as root (the Hub starts each student's server, and the service, as their own OS users):
#
#   pip install ".[hub]"                         # in the Hub's environment (from a clone of lomas-jupyter)
#   npm ci --prefix deploy/hub                   # configurable-http-proxy, the Hub's proxy (Node.js)
#   useradd --system --create-home lomas && install -d -o lomas -g lomas -m 700 /srv/lomas
#   useradd --create-home prof; useradd --create-home student1   # OS users for LocalProcessSpawner
#   jupyterhub -f deploy/hub/jupyterhub_config.py
#
# Then open http://127.0.0.1:8000/, log in as prof (any password with the dummy authenticator below), and in a
# notebook: `from lomas_jupyter import Client; Client().create_course("stats101", hub_group="stats101")`.
import os

from lomas_jupyter_server.hub import configure_hub

c = get_config()  # noqa: F821

here = os.path.dirname(os.path.abspath(__file__))
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = 8000
c.ConfigurableHTTPProxy.command = [os.path.join(here, "node_modules", ".bin", "configurable-http-proxy")]
c.JupyterHub.db_url = "sqlite:////srv/jupyterhub/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "/srv/jupyterhub/cookie_secret"
os.makedirs("/srv/jupyterhub", mode=0o700, exist_ok=True)

# Who may log in: the dummy authenticator accepts any password (try-out only). For a class, use
# "pam" (the machine's accounts), or an OAuth authenticator (oauthenticator), with an allow list.
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allowed_users = {"prof", "student1"}
c.Authenticator.admin_users = {"prof"}

# Each user's server runs as their own OS user, so no kernel can read another's files or the service's.
c.JupyterHub.spawner_class = "localprocess"
c.Spawner.default_url = "/lab"

# The class: a Hub group is the course roster; instructors get the lomas admin scope.
c.JupyterHub.load_groups = {"stats101": {"users": ["student1"]}, "teachers": {"users": ["prof"]}}
configure_hub(c, storage_dir="/srv/lomas", os_user="lomas", instructor_groups=["teachers"])
