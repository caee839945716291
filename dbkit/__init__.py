"""dbkit: a DreamBooth experiment workbench (params → papermill notebooks → HTML reports)."""

__version__ = "0.1.0"

import logging as _logging


class _NoTorchvisionNotice(_logging.Filter):
    """transformers 5 announces on import that it uses its PIL image processors because
    torchvision is missing (there is no CPU build of it here). That fallback is what dbkit
    wants, and the notice filled the top of every report page."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())
