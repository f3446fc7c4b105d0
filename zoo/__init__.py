"""adapter-zoo: a registry and composition engine for parameter-efficient adapters.

The public API (`zoo.add`, `zoo.load`, ...) lives in `zoo.api`; importing `zoo` stays cheap (no torch).
"""

from zoo.api import add, list_adapters, remove, schema, show, verify
from zoo.check import check
from zoo.composition import compose
from zoo.errors import ZooError
from zoo.export import export_gguf, export_peft
from zoo.extract import extract
from zoo.hub import pull, push, search
from zoo.loading import detach, load, unmerge
from zoo.merge import merge_adapters as merge
from zoo.repair import repair
from zoo.resize import resize

__all__ = [
    "ZooError", "add", "check", "compose", "detach", "export_gguf", "export_peft", "extract", "list_adapters", "load", "merge",
    "pull", "push", "remove", "repair", "resize", "schema", "search", "show", "unmerge", "verify",
]
__version__ = "0.1.0"
