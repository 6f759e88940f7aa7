"""Simulated machines: what exists only to test, drill and demo the runner.

- imds.py: a local EC2 metadata service (IMDSv2) that can be told to issue
  a spot notice or a rebalance recommendation (`runner imds-sim`);
- instance.py: one simulated instance, an empty scratch directory with one
  `runner start` in it, watched through the child's progress reports;
- drill/: `runner drill`, the user's own command run straight and with K
  interruptions, final snapshots compared bitwise;
- demo.py: `runner demo`, the example voice model through one spot notice.

Nothing on the runtime path (supervisor, checkpoint, notices) imports this
package; it imports them, and the CLI imports it only when a command needs it.
"""
