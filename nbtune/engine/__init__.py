"""The headless engine: model loading, the Trainer-driven run, events, memory, saving.

Nothing here imports IPython, ipywidgets or traitlets; the notebook layer observes the engine.
"""

import logging


class _DropHubKernelNotice(logging.Filter):
    # bitsandbytes logs at import (peft imports it) that its fast CPU 4-bit kernel would come from a
    # hub. Offline that is always so, and it only matters to 4-bit runs, so it is noise for LoRA users.
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropHubKernelNotice())
