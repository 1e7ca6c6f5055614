"""evomerge's merge toolkit: merge recipes in, tensors out.

Importing this package is cheap: torch and transformers are imported only by the modules that
compute or load tensors, so `mergekit-yaml --help` and config errors answer in well under a second.
"""

__version__ = "0.1.0"
