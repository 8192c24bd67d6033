"""Launch-script templates, rendered from a plan with every value shell-quoted (installed as
`uniap.launch_templates`)."""

from __future__ import annotations

import shlex
from importlib.resources import files
from string import Template


def render(name: str, **values: object) -> str:
    """Fill template `name` (a file beside this module); every value is shell-quoted, lists are
    joined as separately quoted words."""
    text = files(__name__).joinpath(name).read_text()
    quoted = {
        k: " ".join(shlex.quote(str(x)) for x in v) if isinstance(v, (list, tuple)) else shlex.quote(str(v))
        for k, v in values.items()
    }
    return Template(text).substitute(quoted)
