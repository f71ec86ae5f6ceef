"""The configuration: YAML text in, validated frozen dataclasses out (pure).

The package's public names are re-exported here, so that callers need not know which
module of the package holds them.
"""

from splicerelay.config.config import *  # noqa: F403
from splicerelay.config.config import __all__ as __all__
