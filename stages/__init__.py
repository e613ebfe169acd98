"""The duda pipeline: one module per stage, plus the shared pieces the stages use.

Nothing in this package prints to the console, exits the process or imports the command-line
layer; stages raise :class:`stages.runtime.errors.DudaError` for problems a user can fix.
"""

__version__ = "0.1.0"
