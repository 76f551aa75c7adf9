"""Subcommands of the `flagsim` CLI, one module each (`add_parser(sub)`, `run(args)`)."""
