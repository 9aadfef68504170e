"""chatkit: turn ChatGPT conversations into a chat model, fine-tune small chat models, talk to them.

The top-level scripts are thin command lines over this package; each module owns one job, and
docs/ARCHITECTURE.md maps them (what each does and what it may import).
"""

__version__ = "0.2.0"
