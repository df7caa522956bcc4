"""Subcommands of ``lmeval-regions``, one module per group."""
