"""adapter-zoo: a registry and composition engine for parameter-efficient adapters.

The public API (`zoo.add`, `zoo.load`, ...) lives in `zoo.api`; importing `zoo` stays cheap (no torch).
"""

from zoo.api import add, list_adapters, remove, schema, show, verify
from zoo.errors import ZooError
from zoo.loading import detach, load

__all__ = ["ZooError", "add", "detach", "list_adapters", "load", "remove", "schema", "show", "verify"]
__version__ = "0.1.0"
