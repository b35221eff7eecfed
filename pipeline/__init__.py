"""Visual Echoes: a unified masked generative transformer for image-to-audio generation.

All pipeline logic lives in this package; `stages/` holds the thin DVC entries. Importing it has
no side effects: no tracking URI is set, no folder is made, Ray is not started.
"""

__version__ = "0.1.0"
