"""Framework integrations: thin adapters between trainers people already use and runner's snapshots.

Each submodule is an optional extra and imports its framework only when it is
imported itself: `runner.integrations.transformers` (`pip install
runner[transformers]`, a Hugging Face `TrainerCallback`) and
`runner.integrations.lightning` (`pip install runner[lightning]`).  They hear
the same control channel as the Checkpointer (`runner.control`), save at the
next step on a notice, stop the trainer, and publish the framework's own
checkpoint through the manifest protocol.
"""
