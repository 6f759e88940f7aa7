"""The `runner` command line (DESIGN.md 3.1): parse -> config -> wire up; no logic.

- parser.py: every command's flags, their RUNNER_<FLAG> defaults, help text;
- commands.py: one handler per command: build the config, call the package
  that does the work (ops/, supervisor/, cost/, sim/), render the result;
- terminal.py: every byte the CLI writes (tables, JSON, progress, log lines);
- app.py: `main`, the one place exceptions become exit codes and one line.

`runner.cli:main` is the console script; `python -m runner` calls it too.
"""

from runner.cli.app import main
from runner.cli.parser import add_flag, build_parser, env_name

__all__ = ["add_flag", "build_parser", "env_name", "main"]
