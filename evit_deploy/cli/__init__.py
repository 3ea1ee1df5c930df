"""The `evit-deploy` command line: parses options, calls the library, renders results.

app.py holds the app and the error handling every command shares, options.py the options
declared once (the EViT and output groups), render.py the tables; the commands live by area.
"""

from evit_deploy.cli import (  # noqa: F401 (registers the commands)
    export_commands, measure_commands, optimize_commands, serve_commands, tool_commands,
)
from evit_deploy.cli.app import app, main

__all__ = ["app", "main"]
