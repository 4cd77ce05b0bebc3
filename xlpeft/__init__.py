"""xlpeft: zero-shot cross-lingual transfer with composable parameter-efficient modules.

Public API::

    base = xlpeft.load_base("xlmr")            # frozen masked-LM encoder + fingerprint
    module = xlpeft.load_module("modules/lang-sw-adapter")
    model = xlpeft.compose(base, ["xlpeft-lang-sw-adapter", "xlpeft-task-ner-adapter"])
    model = xlpeft.compose(base, xlpeft.Composition(xlpeft.Stack(ref_lang, ref_domain, ref_task), base.fingerprint))

Methods register on import (``xlpeft.methods``); see ``docs/architecture.md`` for the protocol.
"""

__version__ = "0.1.0"

import xlpeft.methods  # noqa: E402, F401  (registers the built-in methods)
from xlpeft.compose import Composition, ModuleRef, Stack, Sum, activate, compose  # noqa: E402
from xlpeft.composed import load_composed, save_composed  # noqa: E402
from xlpeft.errors import XlpeftError  # noqa: E402
from xlpeft.io import load_module, save_module  # noqa: E402
from xlpeft.models import load_base  # noqa: E402

__all__ = ["Composition", "ModuleRef", "Stack", "Sum", "XlpeftError", "__version__", "activate", "compose", "load_base",
           "load_composed", "load_module", "save_composed", "save_module"]
