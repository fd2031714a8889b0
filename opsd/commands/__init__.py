"""CLI subcommands that are thin wrappers (the stages with real logic own their CLI)."""
