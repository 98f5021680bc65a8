"""The class lists of the published few-shot splits, as data (README.md here gives their sources and licences)."""
