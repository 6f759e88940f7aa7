"""Supervisor: child process, control channel to the child, restart policy, run status and exit codes."""
