"""dbkit: a DreamBooth experiment workbench (params → papermill notebooks → HTML reports)."""

__version__ = "0.1.0"
