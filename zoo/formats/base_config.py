"""The numbers of a base's config.json that `zoo check` / `zoo export` read, checked before any use.

transformers validates some fields only when it builds a model (and then with a traceback), others not at
all: a negative head count loops, a billion layers takes minutes on the meta device, a string reaches
`int()`. Each is one line here, naming the field.
"""

from __future__ import annotations

from zoo.errors import ZooError

MAX_LAYERS = 1024  # the deepest released LLMs have ~130 layers; more is a typo or a hostile file
MAX_WIDTH = 1 << 20
# the fields that set module shapes, under their usual names (GPT-2's n_* too); None means "not given"
FIELDS = {"num_hidden_layers": MAX_LAYERS, "n_layer": MAX_LAYERS, "num_attention_heads": MAX_WIDTH, "n_head": MAX_WIDTH,
          "num_key_value_heads": MAX_WIDTH, "hidden_size": MAX_WIDTH, "n_embd": MAX_WIDTH, "intermediate_size": MAX_WIDTH,
          "head_dim": MAX_WIDTH}


def check_base_config(config: dict, where: str) -> None:
    """
    Refuse a base config whose shape fields are not integers in range, whose `text_config` is not an object,
    or whose `architectures` is not a list of class names.

    Raises:
        ZooError: the first bad field, in one line with where it is.
    """
    text = config.get("text_config")
    if text is not None and not isinstance(text, dict):
        raise ZooError(f"{where}: text_config must be a JSON object, found {type(text).__name__}", "pass the base model's own config.json")
    architectures = config.get("architectures")
    if architectures is not None and (not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures)):
        raise ZooError(f"{where}: architectures must be a list of class names, found {architectures!r:.80}", "pass the base model's own config.json")
    for section, values in (("", config), ("text_config.", text or {})):
        for key, most in FIELDS.items():
            value = values.get(key)
            if value is None:
                continue
            least = 0 if key in ("num_hidden_layers", "n_layer") else 1
            if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= most:
                raise ZooError(f"{where}: {section}{key} is {value!r:.40}, not an integer from {least} to {most:,}", "pass the base model's own config.json")
