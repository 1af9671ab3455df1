"""Public path of the drop-in modules (``from exdrop.nn import ExcitationDropout``): the very
module :mod:`exdrop.engine.nn`, under the name users import it by."""
import sys

from exdrop.engine import nn as _nn

sys.modules[__name__] = _nn
