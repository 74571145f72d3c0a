"""The ``loraloom`` command line (``server.cli.main:app``)."""
