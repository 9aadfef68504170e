"""chatkit: turn ChatGPT conversations into a chat model, fine-tune small chat models, talk to them.

The top-level scripts are thin command lines over this package; every module owns one concern:
errors, device, models, formatting, export, redact, datasets, training, chat, gpt2.
"""

__version__ = "0.1.0"
