"""`mm1` subcommands, one module each."""
