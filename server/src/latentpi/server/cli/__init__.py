"""Subcommands of `latentpi` provided by latentpi-server: each module has add_arguments() and run(). Keep imports at module top light; heavy ones go inside run()."""
