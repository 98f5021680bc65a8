# Makes conf/ importable as maml_cli.conf (see pyproject.toml), so the installed
# console scripts locate the configs inside the package, from any directory.
